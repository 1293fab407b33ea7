// Probe, not part of nbd-vram: how fast the copy engines move 1 MiB
// pieces between pinned host memory and VRAM on STREAMS streams at once,
// each direction alone: the ceiling that several connections' sequential
// transfers share. One thread queues 16 copies per stream, then waits for
// all; pinned buffers are 64 MiB per stream. Plain C against a dlopen'd
// libcuda:
//   mkdir -p target/probe && gcc -O2 -o target/probe/bandwidth-probe tests/gpu/bandwidth-probe.c -ldl
//   target/probe/bandwidth-probe [STREAMS] [SECONDS]      (default 8 and 3)
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
typedef int R; typedef uint64_t DP; typedef void *H;
static R (*cuInit)(unsigned); static R (*cuDeviceGet)(int*,int); static R (*cuDevicePrimaryCtxRetain)(H*,int);
static R (*cuCtxSetCurrent)(H); static R (*cuMemAlloc_v2)(DP*,size_t); static R (*cuMemHostAlloc)(void**,size_t,unsigned);
static R (*cuStreamCreate)(H*,unsigned); static R (*cuStreamSynchronize)(H);
static R (*cuMemcpyHtoDAsync_v2)(DP,const void*,size_t,H); static R (*cuMemcpyDtoHAsync_v2)(void*,DP,size_t,H);
#define L(f) do { *(void**)&f = dlsym(lib, #f); if (!f) { printf("no %s\n", #f); exit(1);} } while (0)
#define C(x) do { R r_ = (x); if (r_) { printf("%s = %d (line %d)\n", #x, r_, __LINE__); exit(1);} } while (0)
#define MIB (1u << 20)
#define PER 64
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

int main(int argc, char **argv)
{
	int streams = argc > 1 ? atoi(argv[1]) : 8;
	double seconds = argc > 2 ? atof(argv[2]) : 3;
	void *lib = dlopen("libcuda.so.1", RTLD_NOW);
	if (!lib || streams < 1 || streams > 64) { printf("no libcuda.so.1, or STREAMS not 1..64\n"); return 1; }
	L(cuInit); L(cuDeviceGet); L(cuDevicePrimaryCtxRetain); L(cuCtxSetCurrent); L(cuMemAlloc_v2);
	L(cuMemHostAlloc); L(cuStreamCreate); L(cuStreamSynchronize); L(cuMemcpyHtoDAsync_v2); L(cuMemcpyDtoHAsync_v2);
	int dev; H ctx;
	C(cuInit(0)); C(cuDeviceGet(&dev, 0)); C(cuDevicePrimaryCtxRetain(&ctx, dev)); C(cuCtxSetCurrent(ctx));
	H s[64]; void *host[64]; DP vram[64];
	for (int i = 0; i < streams; i++) {
		C(cuStreamCreate(&s[i], 1));
		C(cuMemHostAlloc(&host[i], (size_t)PER * MIB, 2));   // DEVICEMAP, as nbd-vram's staging
		C(cuMemAlloc_v2(&vram[i], (size_t)PER * MIB));
		for (size_t b = 0; b < (size_t)PER * MIB; b += 4096) ((char *)host[i])[b] = 1;
	}
	for (int dir = 0; dir < 2; dir++) {
		double start = now(), bytes = 0;
		for (unsigned round = 0; now() - start < seconds; round++) {
			for (int i = 0; i < streams; i++)
				for (unsigned k = 0; k < 16; k++) {
					size_t at = (size_t)((round * 16 + k) % PER) * MIB;
					if (dir == 0) C(cuMemcpyHtoDAsync_v2(vram[i] + at, (char *)host[i] + at, MIB, s[i]));
					else C(cuMemcpyDtoHAsync_v2((char *)host[i] + at, vram[i] + at, MIB, s[i]));
				}
			for (int i = 0; i < streams; i++) C(cuStreamSynchronize(s[i]));
			bytes += (double)streams * 16 * MIB;
		}
		printf("bandwidth-probe: streams=%d direction=%s mbps=%.0f\n", streams, dir == 0 ? "htod" : "dtoh", bytes / (now() - start) / 1e6);
	}
	return 0;
}
