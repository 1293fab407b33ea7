// Co-tenant probe, not part of nbd-vram: which ways of copying one small
// piece of host memory into VRAM leave another process's kernels alone.
// Lone 4 KiB cuMemcpyHtoDAsync writes cost a co-tenant 87 % of its
// throughput (docs/performance.md, "Sharing the GPU with another process") while lone DtoH reads cost it
// nothing, which suggests the driver carries small HtoD copies on the
// compute engine. Each way runs SECONDS, back to back (copy, then wait),
// after a second of idle, and its start and end are stamped with the wall
// clock so the co-tenant's per-second lines (cotenant.c) can be read
// against them. Plain C against a dlopen'd libcuda:
//   mkdir -p target/probe && gcc -O2 -o target/probe/htod-probe tests/gpu/htod-probe.c -ldl
//   target/probe/htod-probe [SECONDS]   (used by tests/gpu/cotenant.sh)
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
typedef int R; typedef uint64_t DP; typedef void *H;
typedef struct { int type, id; } Loc;
typedef struct { int order; Loc src, dst; unsigned flags; } Attrs;
static R (*cuInit)(unsigned); static R (*cuDeviceGet)(int*,int); static R (*cuDevicePrimaryCtxRetain)(H*,int);
static R (*cuCtxSetCurrent)(H); static R (*cuMemAlloc_v2)(DP*,size_t); static R (*cuMemHostAlloc)(void**,size_t,unsigned);
static R (*cuMemHostGetDevicePointer_v2)(DP*,void*,unsigned); static R (*cuStreamCreate)(H*,unsigned);
static R (*cuStreamSynchronize)(H); static R (*cuMemcpyHtoDAsync_v2)(DP,const void*,size_t,H);
static R (*cuMemcpyDtoHAsync_v2)(void*,DP,size_t,H); static R (*cuMemcpyDtoDAsync_v2)(DP,DP,size_t,H);
static R (*cuMemGetInfo_v2)(size_t*,size_t*);
static R (*cuMemcpyBatchAsync)(DP*,DP*,size_t*,size_t,Attrs*,size_t*,size_t,size_t*,H);
typedef struct {
	size_t srcX, srcY; int srcType; const void *srcHost; DP srcDev; H srcArray; size_t srcPitch;
	size_t dstX, dstY; int dstType; void *dstHost; DP dstDev; H dstArray; size_t dstPitch;
	size_t width, height;
} Copy2D;
static R (*cuMemcpy2DAsync_v2)(const Copy2D*,H); static R (*cuMemsetD8Async)(DP,unsigned char,size_t,H);
#define L(f) do { *(void**)&f = dlsym(lib, #f); if (!f) { printf("no %s\n", #f); exit(1);} } while (0)
#define C(x) do { R r_ = (x); if (r_) { printf("%s = %d (line %d)\n", #x, r_, __LINE__); exit(1);} } while (0)
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec / 1e3; }
static void wall(const char *what, const char *name) {
	struct timespec w; clock_gettime(CLOCK_REALTIME, &w);
	printf("%ld.%03ld htod-probe: %s %s\n", (long)w.tv_sec, w.tv_nsec / 1000000, what, name); fflush(stdout);
}
static int cmp(const void *a, const void *b) { double x = *(const double*)a, y = *(const double*)b; return x < y ? -1 : x > y; }
#define MAX 2000000
static double lat[MAX];
enum way { HTOD, HTOD_PAGEABLE, DTOH, DTOD_MAPPED, DTOD, BATCH, BATCH_OVERLAP, BATCH16_HTOD, BATCH16_DTOD,
	TWO_D, TWO_D_ROWS, TWO_D16, HTOD16, STAGED, RMW, MEMSET, MEMINFO };
static size_t rows_ = 16;
static H st; static DP dev, dev2, mapped; static void *pinned, *pageable;
// 16 copies of n bytes, 64 KiB apart, by one cuMemcpyBatchAsync.
static void batch16(DP dst, DP src, size_t n) {
	DP d[16], s[16]; size_t sz[16], zero = 0, fail; Attrs a = {1, {0, 0}, {0, 0}, 0};
	for (int i = 0; i < 16; i++) { d[i] = dst + i * 65536; s[i] = src + i * n; sz[i] = n; }
	C(cuMemcpyBatchAsync(d, s, sz, 16, &a, &zero, 1, &fail, st));
}
static void one(enum way w, size_t n) {
	size_t fail, zero = 0; DP d = dev, s = (DP)(uintptr_t)pinned;
	Attrs a = {1, {0, 0}, {0, 0}, 0};
	switch (w) {
	case HTOD: C(cuMemcpyHtoDAsync_v2(dev, pinned, n, st)); break;
	case HTOD_PAGEABLE: C(cuMemcpyHtoDAsync_v2(dev, pageable, n, st)); break;
	case DTOH: C(cuMemcpyDtoHAsync_v2(pinned, dev, n, st)); break;
	case DTOD_MAPPED: C(cuMemcpyDtoDAsync_v2(dev, mapped, n, st)); break;
	case BATCH_OVERLAP: a.flags = 1; /* fall through */
	case BATCH: C(cuMemcpyBatchAsync(&d, &s, &n, 1, &a, &zero, 1, &fail, st)); break;
	case DTOD: C(cuMemcpyDtoDAsync_v2(dev, dev2, n, st)); break;
	case BATCH16_HTOD: batch16(dev, (DP)(uintptr_t)pinned, n); break;
	case BATCH16_DTOD: batch16(dev, dev2, n); break;
	case TWO_D: case TWO_D_ROWS: {
		size_t rows = w == TWO_D ? 1 : rows_;
		Copy2D c = {0, 0, 1, pinned, 0, 0, n / rows, 0, 0, 2, 0, dev, 0, n / rows, n / rows, rows};
		C(cuMemcpy2DAsync_v2(&c, st)); break;
	}
	// 16 copies of n bytes to places 64 KiB apart, one call each, as a
	// batch of writes would go without cuMemcpyBatchAsync.
	case TWO_D16: case HTOD16:
		for (int i = 0; i < 16; i++) {
			Copy2D c = {0, 0, 1, (char*)pinned + i * n, 0, 0, n / rows_, 0, 0, 2, 0, dev + i * 65536, 0, n / rows_, n / rows_, rows_};
			if (w == TWO_D16) C(cuMemcpy2DAsync_v2(&c, st)); else C(cuMemcpyHtoDAsync_v2(dev + i * 65536, (char*)pinned + i * n, n, st));
		}
		break;
	// A window of n bytes into VRAM staging by the copy engine, then 16
	// pieces of 4 KiB of it to their places by one batch.
	case STAGED: C(cuMemcpyHtoDAsync_v2(dev2, pinned, n, st)); batch16(dev, dev2, 4096); break;
	// Read-modify-write of an n-byte window around a 4 KiB write.
	case RMW: C(cuMemcpyDtoHAsync_v2(pinned, dev, n, st)); C(cuStreamSynchronize(st));
		memset(pinned, 3, 4096); C(cuMemcpyHtoDAsync_v2(dev, pinned, n, st)); break;
	case MEMSET: C(cuMemsetD8Async(dev, 0, n, st)); break;
	case MEMINFO: { size_t f, t; C(cuMemGetInfo_v2(&f, &t)); return; }
	}
	C(cuStreamSynchronize(st));
}
static void run(const char *name, enum way w, size_t n, int seconds) {
	sleep(1);
	wall("start", name);
	int k = 0; double end = now() + seconds * 1e6;
	while (k < MAX) { double t = now(); if (t >= end) break; one(w, n); lat[k++] = now() - t; }
	qsort(lat, k, sizeof lat[0], cmp);
	wall("end  ", name);
	printf("    %-28s %8d ops/s, p50 %7.1f us, p99 %7.1f us\n", name, k / seconds, lat[k / 2], lat[k * 99 / 100]); fflush(stdout);
}
int main(int argc, char **argv) {
	int s = argc > 1 ? atoi(argv[1]) : 2;
	void *lib = dlopen("libcuda.so.1", RTLD_NOW);
	if (!lib) { printf("dlopen: %s\n", dlerror()); return 1; }
	L(cuInit); L(cuDeviceGet); L(cuDevicePrimaryCtxRetain); L(cuCtxSetCurrent); L(cuMemAlloc_v2); L(cuMemHostAlloc);
	L(cuMemHostGetDevicePointer_v2); L(cuStreamCreate); L(cuStreamSynchronize); L(cuMemcpyHtoDAsync_v2);
	L(cuMemcpyDtoHAsync_v2); L(cuMemcpyDtoDAsync_v2); L(cuMemGetInfo_v2); L(cuMemcpy2DAsync_v2); *(void**)&cuMemsetD8Async = dlsym(lib, "cuMemsetD8Async_v2") ?: dlsym(lib, "cuMemsetD8Async");
	*(void**)&cuMemcpyBatchAsync = dlsym(lib, "cuMemcpyBatchAsync");
	int d; H ctx;
	C(cuInit(0)); C(cuDeviceGet(&d, 0)); C(cuDevicePrimaryCtxRetain(&ctx, d)); C(cuCtxSetCurrent(ctx));
	C(cuStreamCreate(&st, 1)); C(cuMemAlloc_v2(&dev, 2 << 20)); C(cuMemAlloc_v2(&dev2, 2 << 20));
	C(cuMemHostAlloc(&pinned, 1 << 20, 2 /* DEVICEMAP */)); C(cuMemHostGetDevicePointer_v2(&mapped, pinned, 0));
	pageable = malloc(1 << 20); memset(pageable, 1, 1 << 20); memset(pinned, 2, 1 << 20);
	sleep(1); wall("start", "idle (no copies)"); sleep(s); wall("end  ", "idle (no copies)");
	const char *only = argc > 2 ? argv[2] : "copies";
	if (!strcmp(only, "copies")) { // the first ways measured (docs/performance.md, "Sharing the GPU with another process")
		run("cuMemGetInfo", MEMINFO, 0, s);
		run("HtoD pinned 4K", HTOD, 4096, s);
		run("HtoD pinned 8K", HTOD, 8192, s);
		run("HtoD pinned 16K", HTOD, 16384, s);
		run("HtoD pinned 64K", HTOD, 65536, s);
		run("HtoD pinned 128K", HTOD, 131072, s);
		run("HtoD pinned 1M", HTOD, 1 << 20, s);
		run("HtoD pageable 4K", HTOD_PAGEABLE, 4096, s);
		run("DtoH pinned 4K", DTOH, 4096, s);
		run("DtoD from mapped host 4K", DTOD_MAPPED, 4096, s);
		run("DtoD from mapped host 64K", DTOD_MAPPED, 65536, s);
		run("batch 4K", BATCH, 4096, s);
		run("batch 4K prefer-overlap", BATCH_OVERLAP, 4096, s);
	} else if (!strcmp(only, "rows")) { // how few rows a 2D copy needs to stay on the copy engine
		run("HtoD pinned 4K", HTOD, 4096, s);
		rows_ = 2; run("2D HtoD 4K, 2 rows", TWO_D_ROWS, 4096, s);
		rows_ = 4; run("2D HtoD 4K, 4 rows", TWO_D_ROWS, 4096, s);
		rows_ = 8; run("2D HtoD 4K, 8 rows", TWO_D_ROWS, 4096, s);
		rows_ = 16; run("2D HtoD 4K, 16 rows", TWO_D_ROWS, 4096, s);
		rows_ = 2; run("2D HtoD 512, 2 rows", TWO_D_ROWS, 512, s);
		rows_ = 16; run("2D HtoD 512, 16 rows", TWO_D_ROWS, 512, s);
		rows_ = 2; run("2D HtoD 24K, 2 rows", TWO_D_ROWS, 24576, s);
		run("16 HtoD 4K, one sync", HTOD16, 4096, s);
		rows_ = 16; run("16 2D HtoD 4K (16 rows), one sync", TWO_D16, 4096, s);
		run("memset 4K", MEMSET, 4096, s);
		run("memset 1M", MEMSET, 1 << 20, s);
	} else { // where the line lies, and ways around it
		run("HtoD pinned 24K", HTOD, 24576, s);
		run("HtoD pinned 32K", HTOD, 32768, s);
		run("HtoD pinned 48K", HTOD, 49152, s);
		run("HtoD pinned 60K", HTOD, 61440, s);
		run("HtoD pinned 64K", HTOD, 65536, s);
		run("DtoD 4K", DTOD, 4096, s);
		run("DtoD 64K", DTOD, 65536, s);
		run("batch of 16 HtoD 4K", BATCH16_HTOD, 4096, s);
		run("batch of 16 DtoD 4K", BATCH16_DTOD, 4096, s);
		run("2D HtoD 4K, one row", TWO_D, 4096, s);
		run("2D HtoD 4K, 16 rows", TWO_D_ROWS, 4096, s);
		run("2D HtoD 64K, 16 rows", TWO_D_ROWS, 65536, s);
		run("HtoD 64K + 16 DtoD 4K", STAGED, 65536, s);
		run("RMW 4K in 64K", RMW, 65536, s);
		run("RMW 4K in 32K", RMW, 32768, s);
	}
	return 0;
}
