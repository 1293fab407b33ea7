// Co-tenant probe, not part of nbd-vram: another process's GPU work, as a
// job sharing the GPU with nbd-vram would run it. Launches a short compute
// kernel (every SM busy for some microseconds) and waits for it, back to
// back, and prints once a second how many it finished and their p50/p99
// time from launch to done, so a run shows what nbd-vram's traffic (and its
// resident mailbox kernel) costs the other tenant.
// Plain C against a dlopen'd libcuda, like dtoh-probe.c:
//   mkdir -p target/probe && gcc -O2 -o target/probe/cotenant tests/gpu/cotenant.c -ldl
//   target/probe/cotenant SECONDS [ITERATIONS]   (used by tests/gpu/cotenant.sh)
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
typedef int R; typedef uint64_t DP; typedef void *H;
static R (*cuInit)(unsigned); static R (*cuDeviceGet)(int*,int); static R (*cuDevicePrimaryCtxRetain)(H*,int);
static R (*cuCtxSetCurrent)(H); static R (*cuMemAlloc_v2)(DP*,size_t); static R (*cuStreamCreate)(H*,unsigned);
static R (*cuStreamSynchronize)(H); static R (*cuModuleLoadData)(H*,const void*); static R (*cuModuleGetFunction)(H*,H,const char*);
static R (*cuLaunchKernel)(H,unsigned,unsigned,unsigned,unsigned,unsigned,unsigned,unsigned,H,void**,void**);
#define L(f) do { *(void**)&f = dlsym(lib, #f); if (!f) { printf("no %s\n", #f); exit(1);} } while (0)
#define C(x) do { R r_ = (x); if (r_) { printf("%s = %d (line %d)\n", #x, r_, __LINE__); exit(1);} } while (0)
// Each thread runs a dependent chain of `n` FMAs; the result is stored
// only if it is zero (never), which keeps the chain from being optimised away.
static const char *PTX =
".version 7.0\n.target sm_75\n.address_size 64\n"
".visible .entry busy(.param .u64 out, .param .u32 n)\n{\n"
" .reg .pred %p<3>; .reg .b32 %r<4>; .reg .f32 %f<2>; .reg .b64 %rd<2>;\n"
" ld.param.u64 %rd1, [out];\n ld.param.u32 %r1, [n];\n mov.u32 %r2, 0;\n mov.f32 %f1, 0f3F800000;\n"
"LOOP:\n fma.rn.f32 %f1, %f1, 0f3F800001, 0f33800000;\n add.u32 %r2, %r2, 1;\n setp.lt.u32 %p1, %r2, %r1;\n @%p1 bra LOOP;\n"
" setp.eq.f32 %p2, %f1, 0f00000000;\n @%p2 st.global.f32 [%rd1], %f1;\n ret;\n}\n";
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec / 1e3; }
static int cmp(const void *a, const void *b) { double x = *(const double*)a, y = *(const double*)b; return x < y ? -1 : x > y; }
#define MAX 1000000
static double lat[MAX];
int main(int argc, char **argv) {
	int seconds = argc > 1 ? atoi(argv[1]) : 10;
	unsigned n = argc > 2 ? (unsigned)atoi(argv[2]) : 2000;
	void *lib = dlopen("libcuda.so.1", RTLD_NOW);
	if (!lib) { printf("dlopen: %s\n", dlerror()); return 1; }
	L(cuInit); L(cuDeviceGet); L(cuDevicePrimaryCtxRetain); L(cuCtxSetCurrent); L(cuMemAlloc_v2); L(cuStreamCreate);
	L(cuStreamSynchronize); L(cuModuleLoadData); L(cuModuleGetFunction); L(cuLaunchKernel);
	int dev; H ctx, st, mod, fn; DP out;
	C(cuInit(0)); C(cuDeviceGet(&dev, 0)); C(cuDevicePrimaryCtxRetain(&ctx, dev)); C(cuCtxSetCurrent(ctx));
	C(cuStreamCreate(&st, 1)); C(cuMemAlloc_v2(&out, 4)); C(cuModuleLoadData(&mod, PTX)); C(cuModuleGetFunction(&fn, mod, "busy"));
	void *params[] = {&out, &n};
	for (int s = 0; s < seconds; s++) {
		int k = 0;
		double end = now() + 1e6;
		while (k < MAX) {
			double t = now();
			if (t >= end) break;
			C(cuLaunchKernel(fn, 1024, 1, 1, 256, 1, 1, 0, st, params, NULL));
			C(cuStreamSynchronize(st));
			lat[k++] = now() - t;
		}
		qsort(lat, k, sizeof lat[0], cmp);
		struct timespec w; clock_gettime(CLOCK_REALTIME, &w);
		printf("%ld.%03ld cotenant: second %2d: %6d kernels, p50 %8.1f us, p99 %8.1f us, max %8.1f us\n", (long)w.tv_sec, w.tv_nsec / 1000000, s + 1, k, lat[k / 2], lat[k * 99 / 100], lat[k - 1]);
		fflush(stdout);
	}
	return 0;
}
