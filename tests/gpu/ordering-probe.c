// Ordering probe, not part of nbd-vram: what the driver does with a
// synchronous memset of device memory and with work still queued, which
// the fake driver models (tests/fake_cuda/README.md, "Async work and
// events") and nbd-vram relies on (DeviceMem::clear in src/cuda/mod.rs:
// the store's first copies come after the zeroing only because its
// copier streams are blocking ones).
// Prints one line per question, "yes" or "no" (by the bytes a copy left,
// or the code returned) and the times seen:
//   - a cuMemsetD8 of SIZE_MIB returns before the device has done it;
//   - a copy queued behind it on a blocking stream waits for it;
//   - one queued on a non-blocking stream does not, and the memset, done
//     later, lands over the copy's bytes;
//   - cuStreamQuery says CUDA_ERROR_NOT_READY (600) while work is queued.
//   gcc -O2 -o target/probe/ordering-probe tests/gpu/ordering-probe.c -ldl
//   target/probe/ordering-probe [SIZE_MIB]        default 8192
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
typedef int R; typedef uint64_t DP; typedef void *H;
static R (*cuInit)(unsigned); static R (*cuDeviceGet)(int*,int); static R (*cuDevicePrimaryCtxRetain)(H*,int);
static R (*cuCtxSetCurrent)(H); static R (*cuMemAlloc_v2)(DP*,size_t); static R (*cuMemFree_v2)(DP);
static R (*cuMemHostAlloc)(void**,size_t,unsigned); static R (*cuStreamCreate)(H*,unsigned);
static R (*cuStreamSynchronize)(H); static R (*cuStreamQuery)(H);
static R (*cuMemcpyHtoDAsync_v2)(DP,const void*,size_t,H); static R (*cuMemcpyDtoH_v2)(void*,DP,size_t);
static R (*cuMemsetD8_v2)(DP,unsigned char,size_t); static R (*cuMemsetD8Async)(DP,unsigned char,size_t,H);
#define L(f) do { *(void**)&f = dlsym(lib, #f); if (!f) { printf("no %s\n", #f); exit(1);} } while (0)
#define C(x) do { R r_ = (x); if (r_) { printf("%s = %d (line %d)\n", #x, r_, __LINE__); exit(1);} } while (0)

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static double ms_since(double t) { return (now() - t) * 1e3; }

static int all(const unsigned char *p, size_t n, unsigned char c)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != c) return 0;
    return 1;
}

/* Sets `size` bytes at d to `value` with cuMemsetD8, then copies 4 KiB of
 * 7s on `stream` to the last 4 KiB, which the memset reaches last; returns
 * how long that stream's sync took, and in *out what those bytes hold
 * once the memset is done too. */
static double behind_memset(DP d, size_t size, unsigned char value, H stream, unsigned char **out)
{
    static unsigned char *h;
    if (!h) C(cuMemHostAlloc((void **)&h, 4096, 0));
    DP last = d + size - 4096;
    memset(h, 7, 4096);
    C(cuMemsetD8_v2(d, value, size));
    double t = now();
    C(cuMemcpyHtoDAsync_v2(last, h, 4096, stream));
    C(cuStreamSynchronize(stream));
    double ms = ms_since(t);
    C(cuStreamSynchronize(NULL));
    C(cuMemcpyDtoH_v2(h, last, 4096));
    *out = h;
    return ms;
}

int main(int argc, char **argv)
{
    size_t size = (size_t)(argc > 1 ? atoi(argv[1]) : 8192) << 20;
    setvbuf(stdout, NULL, _IOLBF, 0);
    void *lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) { printf("dlopen: %s\n", dlerror()); return 1; }
    L(cuInit); L(cuDeviceGet); L(cuDevicePrimaryCtxRetain); L(cuCtxSetCurrent); L(cuMemAlloc_v2); L(cuMemFree_v2);
    L(cuMemHostAlloc); L(cuStreamCreate); L(cuStreamSynchronize); L(cuStreamQuery);
    L(cuMemcpyHtoDAsync_v2); L(cuMemcpyDtoH_v2); L(cuMemsetD8_v2); L(cuMemsetD8Async);
    int dev;
    H ctx, blocking, non_blocking;
    DP d;
    C(cuInit(0)); C(cuDeviceGet(&dev, 0)); C(cuDevicePrimaryCtxRetain(&ctx, dev)); C(cuCtxSetCurrent(ctx));
    C(cuStreamCreate(&blocking, 0)); C(cuStreamCreate(&non_blocking, 1));
    C(cuMemAlloc_v2(&d, size));
    C(cuMemsetD8_v2(d, 0, size)); C(cuStreamSynchronize(NULL));   // first touch out of the way
    printf("ordering-probe: memsets of %zu MiB on the legacy stream\n", size >> 20);

    double t = now();
    C(cuMemsetD8_v2(d, 1, size));
    double call = ms_since(t);
    t = now();
    C(cuStreamSynchronize(NULL));
    double rest = ms_since(t);
    printf("memset returns before done: %s (call %.2f ms, then the legacy stream's sync %.2f ms)\n",
           call < rest ? "yes" : "no", call, rest);

    unsigned char *h;
    double after = behind_memset(d, size, 2, blocking, &h);
    printf("a blocking stream's copy waits for it: %s (its sync %.2f ms; its bytes %s)\n",
           all(h, 4096, 7) ? "yes" : "no", after, all(h, 4096, 7) ? "kept" : "overwritten");
    double apart = behind_memset(d, size, 3, non_blocking, &h);
    printf("a non-blocking stream's copy does not wait, and the memset lands over it: %s (its sync %.2f ms; its bytes %s)\n",
           all(h, 4096, 3) ? "yes" : "no", apart, all(h, 4096, 3) ? "overwritten" : all(h, 4096, 7) ? "kept" : "torn");

    C(cuMemsetD8Async(d, 4, size, blocking));
    R r = cuStreamQuery(blocking);
    C(cuStreamSynchronize(blocking));
    printf("cuStreamQuery with work queued says not ready: %s (it said %d)\n", r == 600 ? "yes" : "no", r);
    C(cuMemFree_v2(d));
    return 0;
}
