/* Self-test of the fake libcuda: dlopens it and checks every knob.
 * Each scenario runs in a forked child with its own FAKE_CUDA_* variables,
 * since the fake reads them once, at cuInit.
 *
 *   cc -Wall -Wextra -Werror -O2 -pthread -o DIR/check tests/fake_cuda/check.c
 *   DIR/check DIR/libcuda.so.1      # exit status 0: all checks passed
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st *CUcontext;
typedef struct CUstream_st *CUstream;
typedef struct CUevent_st *CUevent;
typedef struct { unsigned order; struct { unsigned type; int id; } src_hint, dst_hint; unsigned flags; } memcpy_attrs;
typedef struct {
    size_t src_x, src_y; unsigned src_type; const void *src_host; CUdeviceptr src_dev; void *src_array; size_t src_pitch;
    size_t dst_x, dst_y; unsigned dst_type; void *dst_host; CUdeviceptr dst_dev; void *dst_array; size_t dst_pitch;
    size_t width, height;
} memcpy2d;

#define APIS(X) \
    X(cuInit, (unsigned)) X(cuDriverGetVersion, (int *)) X(cuDeviceGet, (CUdevice *, int)) \
    X(cuDeviceGetCount, (int *)) X(cuDeviceGetName, (char *, int, CUdevice)) \
    X(cuDeviceTotalMem_v2, (size_t *, CUdevice)) X(cuDevicePrimaryCtxRetain, (CUcontext *, CUdevice)) \
    X(cuDevicePrimaryCtxRelease_v2, (CUdevice)) X(cuCtxSetCurrent, (CUcontext)) \
    X(cuMemGetInfo_v2, (size_t *, size_t *)) X(cuMemAlloc_v2, (CUdeviceptr *, size_t)) \
    X(cuMemFree_v2, (CUdeviceptr)) X(cuMemcpyHtoD_v2, (CUdeviceptr, const void *, size_t)) \
    X(cuMemcpyDtoH_v2, (void *, CUdeviceptr, size_t)) \
    X(cuMemcpyHtoDAsync_v2, (CUdeviceptr, const void *, size_t, CUstream)) \
    X(cuMemcpyDtoHAsync_v2, (void *, CUdeviceptr, size_t, CUstream)) \
    X(cuMemsetD8_v2, (CUdeviceptr, unsigned char, size_t)) \
    X(cuMemsetD8Async, (CUdeviceptr, unsigned char, size_t, CUstream)) \
    X(cuMemHostAlloc, (void **, size_t, unsigned)) X(cuMemFreeHost, (void *)) \
    X(cuStreamCreate, (CUstream *, unsigned)) X(cuStreamSynchronize, (CUstream)) \
    X(cuStreamDestroy_v2, (CUstream)) X(cuGetErrorName, (CUresult, const char **)) \
    X(cuGetErrorString, (CUresult, const char **)) X(cuEventCreate, (CUevent *, unsigned)) \
    X(cuEventRecord, (CUevent, CUstream)) X(cuEventSynchronize, (CUevent)) \
    X(cuEventDestroy_v2, (CUevent)) \
    X(cuMemcpyBatchAsync_v2, (CUdeviceptr *, CUdeviceptr *, size_t *, size_t, void *, size_t *, size_t, CUstream)) \
    X(cuModuleLoadData, (void **, const void *)) X(cuModuleGetFunction, (void **, void *, const char *)) \
    X(cuModuleUnload, (void *)) \
    X(cuLaunchKernel, (void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, \
                       CUstream, void **, void **)) \
    X(cuStreamQuery, (CUstream)) X(cuDeviceGetAttribute, (int *, int, CUdevice)) \
    X(cuMemcpy2DAsync_v2, (const memcpy2d *, CUstream)) X(cuDeviceGetPCIBusId, (char *, int, CUdevice))

#define FIELD(name, args) CUresult(*name) args;
static struct { APIS(FIELD) } cu;

#define MIB (1ULL << 20)
static const char *lib, *scenario;
static char tmp[64];
static int fails;

#define EQ(a, b) do { long long a_ = (long long)(a), b_ = (long long)(b); if (a_ != b_) { \
    fprintf(stderr, "%s:%d [%s] %s == %lld, want %lld\n", __FILE__, __LINE__, scenario, #a, a_, b_); \
    fails++; } } while (0)
#define STR(a, b) do { const char *a_ = (a); if (!a_ || strcmp(a_, b)) { \
    fprintf(stderr, "%s:%d [%s] %s == \"%s\", want \"%s\"\n", __FILE__, __LINE__, scenario, #a, \
            a_ ? a_ : "(null)", b); fails++; } } while (0)

/* cuInit, then the primary context of device `dev` made current. */
static CUcontext start(CUdevice dev)
{
    CUcontext ctx = NULL;
    EQ(cu.cuInit(0), 0);
    EQ(cu.cuDevicePrimaryCtxRetain(&ctx, dev), 0);
    EQ(cu.cuCtxSetCurrent(ctx), 0);
    return ctx;
}

static void fill(unsigned char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(i * 7 + seed);
}

static int all(const unsigned char *p, size_t n, unsigned char c)
{
    for (size_t i = 0; i < n; i++) if (p[i] != c) return 0;
    return 1;
}

static void *other_thread(void *arg)
{
    size_t f, t;
    EQ(cu.cuMemGetInfo_v2(&f, &t), 201);   /* the current context is per thread */
    EQ(cu.cuCtxSetCurrent(arg), 0);
    EQ(cu.cuMemGetInfo_v2(&f, &t), 0);
    return NULL;
}

static void s_basic(void)
{
    int v, n;
    char name[64];
    size_t total, f, t;
    CUdeviceptr d, z;
    CUdevice dev;
    const char *s;
    EQ(cu.cuDriverGetVersion(&v), 0);
    EQ(v, 12040);
    EQ(cu.cuDeviceGetCount(&n), 3);
    EQ(cu.cuMemAlloc_v2(&d, 4096), 3);
    EQ(cu.cuGetErrorName(2, &s), 0);
    STR(s, "CUDA_ERROR_OUT_OF_MEMORY");
    EQ(cu.cuGetErrorString(2, &s), 0);
    STR(s, "out of memory");
    EQ(cu.cuGetErrorString(400, &s), 0);
    STR(s, "invalid resource handle");
    EQ(cu.cuGetErrorName(12345, &s), 1);
    EQ(s == NULL, 1);
    EQ(cu.cuInit(1), 1);
    CUcontext ctx = NULL;
    EQ(cu.cuInit(0), 0);
    EQ(cu.cuDeviceGetCount(&n), 0);
    EQ(n, 1);
    EQ(cu.cuDeviceGet(&dev, 0), 0);
    EQ(cu.cuDeviceGet(&dev, 1), 101);
    EQ(cu.cuDeviceGet(&dev, -1), 101);
    EQ(cu.cuDeviceGetName(name, sizeof name, 0), 0);
    STR(name, "Fake GPU 0 (nbd-vram test)");
    EQ(cu.cuDeviceGetName(name, 5, 0), 0);
    STR(name, "Fake");
    EQ(cu.cuDeviceTotalMem_v2(&total, 0), 0);
    EQ(total, 16384 * MIB);
    EQ(cu.cuMemAlloc_v2(&d, 4096), 201);   /* no current context yet */
    EQ(cu.cuCtxSetCurrent((CUcontext)&v), 201);
    ctx = start(0);
    EQ(cu.cuMemGetInfo_v2(&f, &t), 0);
    EQ(f, 16384 * MIB);
    EQ(t, 16384 * MIB);
    EQ(cu.cuMemAlloc_v2(&d, 0), 1);
    EQ(cu.cuMemAlloc_v2(&d, MIB), 0);
    EQ(cu.cuMemGetInfo_v2(&f, &t), 0);
    EQ(f, 16383 * MIB);

    static unsigned char in[MIB], out[MIB];
    fill(in, MIB, 1);
    EQ(cu.cuMemcpyHtoD_v2(d, in, MIB), 0);
    EQ(cu.cuMemcpyDtoH_v2(out, d, MIB), 0);
    EQ(memcmp(in, out, MIB), 0);
    EQ(cu.cuMemsetD8_v2(d + 100, 0xab, 50), 0);
    EQ(cu.cuMemcpyDtoH_v2(out, d, 200), 0);
    EQ(out[99] == in[99] && out[100] == 0xab && out[149] == 0xab && out[150] == in[150], 1);

    CUstream st;
    EQ(cu.cuStreamCreate(&st, 2), 1);
    EQ(cu.cuStreamCreate(&st, 0), 0);
    fill(in, MIB, 2);
    memset(out, 0, MIB);
    EQ(cu.cuMemcpyHtoDAsync_v2(d, in, MIB, st), 0);
    EQ(cu.cuMemsetD8Async(d, 7, 10, st), 0);
    EQ(cu.cuMemcpyDtoHAsync_v2(out, d, MIB, NULL), 0);   /* the default stream: after st's work */
    EQ(cu.cuStreamSynchronize(st), 0);   /* st's own work: not the default stream's copy */
    EQ(all(out, MIB, 0), 1);
    EQ(cu.cuStreamSynchronize(NULL), 0);
    EQ(out[9] == 7 && out[10] == in[10] && !memcmp(in + 10, out + 10, MIB - 10), 1);
    EQ(cu.cuMemcpyHtoDAsync_v2(d, in, 1, (CUstream)&v), 400);
    EQ(cu.cuStreamDestroy_v2(st), 0);
    EQ(cu.cuMemsetD8Async(d, 0, 1, st), 400);
    EQ(cu.cuStreamSynchronize(st), 400);
    EQ(cu.cuStreamDestroy_v2(st), 400);

    EQ(cu.cuMemcpyHtoD_v2(d + MIB - 10, in, 20), 1);   /* runs past the end */
    EQ(cu.cuMemcpyHtoD_v2(d + MIB - 10, in, 10), 0);
    EQ(cu.cuMemcpyDtoH_v2(out, d - 1, 1), 1);
    EQ(cu.cuMemcpyDtoH_v2(out, 0, 1), 1);
    EQ(cu.cuMemcpyDtoH_v2(NULL, d, 1), 1);
    EQ(cu.cuMemcpyDtoH_v2(out, d, 0), 0);
    EQ(cu.cuMemAlloc_v2(&z, 4096), 0);   /* two allocations: no range spans them */
    EQ(cu.cuMemsetD8_v2(z, 1, 4097), 1);
    EQ(cu.cuMemFree_v2(z), 0);
    EQ(cu.cuMemFree_v2(d + 4096), 1);
    EQ(cu.cuMemFree_v2(d), 0);
    EQ(cu.cuMemFree_v2(d), 1);
    EQ(cu.cuMemsetD8_v2(d, 0, 1), 1);
    EQ(cu.cuMemGetInfo_v2(&f, &t), 0);
    EQ(f, 16384 * MIB);

    void *h;
    EQ(cu.cuMemHostAlloc(&h, 8192, 8), 1);
    EQ(cu.cuMemHostAlloc(&h, 8192, 0), 0);
    memset(h, 1, 8192);
    EQ(cu.cuMemFreeHost(h), 0);
    EQ(cu.cuMemFreeHost(h), 1);

    pthread_t th;
    EQ(pthread_create(&th, NULL, other_thread, ctx), 0);
    pthread_join(th, NULL);

    EQ(cu.cuDevicePrimaryCtxRelease_v2(0), 0);
    EQ(cu.cuDevicePrimaryCtxRelease_v2(0), 201);
    EQ(cu.cuDevicePrimaryCtxRelease_v2(1), 101);
    EQ(cu.cuMemAlloc_v2(&d, 4096), 201);   /* the current context was destroyed */
    EQ(cu.cuCtxSetCurrent(ctx), 201);
    EQ(cu.cuCtxSetCurrent(NULL), 0);
}

/* The current context is per thread: another thread, until it makes one
 * current, gets INVALID_CONTEXT from every call that needs one. */
struct bind { CUcontext ctx; CUstream st; CUevent ev; CUdeviceptr d; pthread_barrier_t *hold; CUresult rc; };
static void *unbound_thread(void *arg)
{
    struct bind *b = arg;
    CUdeviceptr d;
    CUstream st;
    CUevent ev;
    size_t f, t;
    unsigned char buf[16] = {0};
    EQ(cu.cuMemGetInfo_v2(&f, &t), 201);
    EQ(cu.cuMemAlloc_v2(&d, 4096), 201);
    EQ(cu.cuStreamCreate(&st, 0), 201);
    EQ(cu.cuEventCreate(&ev, 0), 201);
    EQ(cu.cuMemcpyHtoDAsync_v2(b->d, buf, 16, b->st), 201);
    EQ(cu.cuMemcpyHtoD_v2(b->d, buf, 16), 201);
    EQ(cu.cuStreamSynchronize(b->st), 201);
    EQ(cu.cuStreamQuery(b->st), 201);
    EQ(cu.cuEventRecord(b->ev, b->st), 201);
    EQ(cu.cuEventSynchronize(b->ev), 201);
    EQ(cu.cuDevicePrimaryCtxRetain(&b->ctx, 0), 0);   /* retaining makes nothing current */
    EQ(cu.cuMemAlloc_v2(&d, 4096), 201);
    EQ(cu.cuCtxSetCurrent(b->ctx), 0);
    EQ(cu.cuMemGetInfo_v2(&f, &t), 0);
    EQ(cu.cuMemcpyHtoDAsync_v2(b->d, buf, 16, b->st), 0);
    EQ(cu.cuStreamSynchronize(b->st), 0);
    EQ(cu.cuCtxSetCurrent(NULL), 0);   /* unbinds this thread only */
    EQ(cu.cuMemGetInfo_v2(&f, &t), 201);
    EQ(cu.cuCtxSetCurrent(NULL), 0);
    EQ(cu.cuDevicePrimaryCtxRelease_v2(0), 0);
    return NULL;
}

/* Binds the context, then holds until told (a live thread keeps its entry). */
static void *binding_thread(void *arg)
{
    struct bind *b = arg;
    b->rc = cu.cuCtxSetCurrent(b->ctx);
    pthread_barrier_wait(b->hold);
    pthread_barrier_wait(b->hold);
    return NULL;
}

static void *rebind_thread(void *arg)
{
    size_t f, t;
    EQ(cu.cuCtxSetCurrent(arg), 0);
    EQ(cu.cuMemGetInfo_v2(&f, &t), 0);
    return NULL;
}

static void s_threads(void)
{
    CUcontext ctx = NULL;
    CUdeviceptr d;
    size_t f, t;
    EQ(cu.cuInit(0), 0);
    EQ(cu.cuDevicePrimaryCtxRetain(&ctx, 0), 0);
    EQ(cu.cuMemAlloc_v2(&d, 4096), 201);   /* retained, not current */
    EQ(cu.cuCtxSetCurrent(ctx), 0);
    struct bind b = {0};
    b.d = 0;
    EQ(cu.cuMemAlloc_v2(&b.d, 4096), 0);
    EQ(cu.cuStreamCreate(&b.st, 0), 0);
    EQ(cu.cuEventCreate(&b.ev, 0), 0);
    pthread_t th;
    EQ(pthread_create(&th, NULL, unbound_thread, &b), 0);
    pthread_join(th, NULL);
    EQ(cu.cuMemGetInfo_v2(&f, &t), 0);   /* this thread's binding is untouched */

    /* 256 threads hold a current context at once: this one and 255 more;
     * one more fails cleanly, and once they are gone their entries are
     * taken back */
    enum { MORE = 255 };
    static pthread_t ths[MORE + 1];
    static struct bind bs[MORE + 1];
    pthread_barrier_t hold;
    pthread_attr_t attr;
    pthread_barrier_init(&hold, NULL, MORE + 2);
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    int started = 0;
    for (int i = 0; i <= MORE; i++) {
        bs[i] = (struct bind){.ctx = ctx, .hold = &hold};
        if (pthread_create(&ths[i], &attr, binding_thread, &bs[i])) break;
        started++;
    }
    EQ(started, MORE + 1);
    pthread_barrier_wait(&hold);
    int ok = 0, full = 0;
    for (int i = 0; i <= MORE; i++) { ok += bs[i].rc == 0; full += bs[i].rc == 999; }
    EQ(ok, MORE);
    EQ(full, 1);   /* with a line on stderr */
    pthread_barrier_wait(&hold);
    for (int i = 0; i < started; i++) pthread_join(ths[i], NULL);
    EQ(pthread_create(&th, NULL, rebind_thread, ctx), 0);   /* room again */
    pthread_join(th, NULL);
    pthread_attr_destroy(&attr);
    EQ(cu.cuMemGetInfo_v2(&f, &t), 0);
}

static void s_init_803(void)
{
    int n;
    const char *s;
    EQ(cu.cuInit(0), 803);
    EQ(cu.cuInit(0), 803);   /* sticky, as in CUDA */
    EQ(cu.cuDeviceGetCount(&n), 3);
    EQ(cu.cuGetErrorName(803, &s), 0);
    STR(s, "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH");
    EQ(cu.cuGetErrorString(803, &s), 0);
    STR(s, "system has unsupported display driver / cuda driver combination");
}

static void s_no_device(void) { EQ(cu.cuInit(0), 100); }
static void s_bad_knob(void) { EQ(cu.cuInit(0), 999); }

static void s_oom(void)   /* TOTAL 8192, FREE 6000 */
{
    CUdeviceptr a, b, c;
    size_t f, t, total;
    start(0);
    EQ(cu.cuDeviceTotalMem_v2(&total, 0), 0);
    EQ(total, 8192 * MIB);
    EQ(cu.cuMemGetInfo_v2(&f, &t), 0);
    EQ(f, 6000 * MIB);
    EQ(t, 8192 * MIB);
    EQ(cu.cuMemAlloc_v2(&a, 7ULL << 30), 2);
    EQ(cu.cuMemAlloc_v2(&a, 2560 * MIB), 0);
    EQ(cu.cuMemAlloc_v2(&b, 2560 * MIB), 0);
    EQ(cu.cuMemAlloc_v2(&c, 2560 * MIB), 2);
    EQ(cu.cuMemAlloc_v2(&c, 880 * MIB), 0);
    EQ(cu.cuMemGetInfo_v2(&f, &t), 0);
    EQ(f, 0);
    EQ(cu.cuMemAlloc_v2(&b, 1), 2);
    EQ(cu.cuMemsetD8_v2(a + 2560 * MIB - 1, 1, 1), 0);
    EQ(cu.cuMemFree_v2(a), 0);
    EQ(cu.cuMemFree_v2(b), 0);
    EQ(cu.cuMemFree_v2(c), 0);
    EQ(cu.cuMemGetInfo_v2(&f, &t), 0);
    EQ(f, 6000 * MIB);
}

static void s_max_alloc(void)   /* MAX_ALLOC 1024 */
{
    CUdeviceptr d[4];
    start(0);
    EQ(cu.cuMemAlloc_v2(d, 1025 * MIB), 2);
    for (int i = 0; i < 4; i++) EQ(cu.cuMemAlloc_v2(&d[i], 1024 * MIB), 0);
    for (int i = 0; i < 4; i++) EQ(cu.cuMemFree_v2(d[i]), 0);
}

static void s_two_devices(void)   /* DEVICES 2, TOTAL 64 */
{
    CUcontext c1 = NULL;
    CUdeviceptr a, b;
    size_t f, t;
    char name[64];
    CUcontext c0 = start(0);
    EQ(cu.cuMemAlloc_v2(&a, 4 * MIB), 0);
    EQ(cu.cuDeviceGetName(name, sizeof name, 1), 0);
    STR(name, "Fake GPU 1 (nbd-vram test)");
    EQ(cu.cuDevicePrimaryCtxRetain(&c1, 1), 0);
    EQ(cu.cuCtxSetCurrent(c1), 0);
    EQ(cu.cuMemAlloc_v2(&b, 16 * MIB), 0);
    EQ(cu.cuMemGetInfo_v2(&f, &t), 0);
    EQ(f, 48 * MIB);
    EQ(cu.cuMemsetD8_v2(a, 3, 4 * MIB), 0);   /* unified addressing: any context may copy */
    EQ(cu.cuDevicePrimaryCtxRelease_v2(1), 0);   /* reclaims b */
    EQ(cu.cuCtxSetCurrent(c0), 0);
    EQ(cu.cuMemGetInfo_v2(&f, &t), 0);
    EQ(f, 60 * MIB);
    EQ(cu.cuMemFree_v2(b), 1);
    EQ(cu.cuDevicePrimaryCtxRetain(&c1, 1), 0);
    EQ(cu.cuCtxSetCurrent(c1), 0);
    EQ(cu.cuMemGetInfo_v2(&f, &t), 0);
    EQ(f, 64 * MIB);
    EQ(cu.cuMemFree_v2(a), 0);
}

static void s_fail_copy(void)   /* FAIL_COPY 3 */
{
    CUdeviceptr d;
    unsigned char buf[64] = {0}, out[64];
    start(0);
    EQ(cu.cuMemAlloc_v2(&d, 4096), 0);
    EQ(cu.cuMemcpyHtoD_v2(d, buf, 64), 0);     /* 1 */
    EQ(cu.cuMemsetD8_v2(d, 9, 8192), 1);       /* invalid: not counted */
    EQ(cu.cuMemsetD8_v2(d, 9, 16), 0);         /* 2 */
    memset(buf, 5, sizeof buf);
    EQ(cu.cuMemcpyHtoDAsync_v2(d, buf, 64, NULL), 2);   /* 3: fails, copies nothing */
    EQ(cu.cuMemcpyDtoH_v2(out, d, 64), 0);     /* 4 */
    EQ(out[0] == 9 && out[15] == 9 && out[16] == 0, 1);
    EQ(cu.cuMemcpyHtoD_v2(d, buf, 64), 0);     /* 5 */
    EQ(cu.cuMemFree_v2(d), 0);
}

static void s_async(void)   /* deferred async work and events */
{
    CUdeviceptr d, e;
    CUstream st;
    CUevent ev, ev2;
    int x;
    void *h;
    static unsigned char buf[8192], out[8192], out2[64];
    EQ(cu.cuInit(0), 0);
    EQ(cu.cuEventCreate(&ev, 0), 201);   /* needs a current context */
    CUcontext ctx = start(0);
    EQ(cu.cuMemAlloc_v2(&d, 8192), 0);
    EQ(cu.cuStreamCreate(&st, 0), 0);
    memset(buf, 1, 64);
    EQ(cu.cuMemcpyHtoD_v2(d, buf, 64), 0);

    /* DtoH: the host buffer is untouched until the sync */
    memset(out, 0, 64);
    EQ(cu.cuMemcpyDtoHAsync_v2(out, d, 64, st), 0);
    EQ(all(out, 64, 0), 1);
    EQ(cu.cuStreamSynchronize(NULL), 0);   /* the legacy stream's sync waits for blocking streams */
    EQ(all(out, 64, 1), 1);

    /* HtoD reads the host buffer when it runs, not at the call */
    memset(buf, 2, 64);
    EQ(cu.cuMemcpyHtoDAsync_v2(d, buf, 64, st), 0);
    memset(buf, 3, 64);
    EQ(cu.cuStreamSynchronize(st), 0);
    memset(buf, 4, 64);
    EQ(cu.cuMemcpyDtoH_v2(out, d, 64), 0);
    EQ(all(out, 64, 3), 1);

    /* a synchronous copy or memset runs the pending work first */
    EQ(cu.cuMemsetD8Async(d, 5, 64, st), 0);
    EQ(cu.cuMemcpyDtoH_v2(out, d, 64), 0);
    EQ(all(out, 64, 5), 1);
    EQ(cu.cuMemcpyDtoHAsync_v2(out, d, 64, st), 0);
    EQ(cu.cuMemsetD8_v2(d, 6, 64), 0);
    EQ(all(out, 64, 5), 1);   /* the copy ran before the memset */

    /* a memset of device memory does not wait for the device: it runs on
     * the legacy stream, before a blocking stream's later work and after
     * a non-blocking stream's, which nothing orders with it */
    CUdeviceptr f;
    CUstream nb;
    EQ(cu.cuMemAlloc_v2(&f, 64), 0);
    EQ(cu.cuStreamCreate(&nb, 1), 0);
    unsigned char *fdev = (unsigned char *)(uintptr_t)f;
    memset(buf, 13, 64);
    EQ(cu.cuMemsetD8_v2(f, 12, 64), 0);
    EQ(all(fdev, 64, 12), 0);
    EQ(cu.cuMemcpyHtoDAsync_v2(f, buf, 64, st), 0);
    EQ(cu.cuStreamSynchronize(st), 0);
    EQ(all(fdev, 64, 13), 1);
    EQ(cu.cuMemsetD8_v2(f, 12, 64), 0);
    EQ(cu.cuMemcpyHtoDAsync_v2(f, buf, 64, nb), 0);
    EQ(cu.cuStreamSynchronize(nb), 0);
    EQ(all(fdev, 64, 12), 1);   /* the copy's bytes, zeroed late */
    EQ(cu.cuMemsetD8_v2(f, 14, 64), 0);
    EQ(cu.cuStreamQuery(nb), 0);   /* nothing queued on it: done, the memset not */
    EQ(cu.cuStreamSynchronize(nb), 0);
    EQ(all(fdev, 64, 12), 1);
    EQ(cu.cuStreamSynchronize(NULL), 0);
    EQ(all(fdev, 64, 14), 1);
    EQ(cu.cuStreamDestroy_v2(nb), 0);
    EQ(cu.cuMemFree_v2(f), 0);

    /* events: a sync runs the work recorded before it, no more */
    EQ(cu.cuEventCreate(NULL, 0), 1);
    EQ(cu.cuEventCreate(&ev, 8), 1);
    EQ(cu.cuEventCreate(&ev2, 7), 0);
    EQ(cu.cuEventCreate(&ev, 2), 0);
    EQ(cu.cuEventSynchronize(ev), 0);   /* never recorded: at once */
    memset(out, 0, 64);
    memset(out2, 0, 64);
    EQ(cu.cuMemcpyDtoHAsync_v2(out, d, 64, st), 0);
    EQ(cu.cuEventRecord(ev, st), 0);
    EQ(cu.cuMemcpyDtoHAsync_v2(out2, d, 64, NULL), 0);
    EQ(cu.cuEventSynchronize(ev), 0);
    EQ(all(out, 64, 6), 1);
    EQ(all(out2, 64, 0), 1);
    EQ(cu.cuEventSynchronize(ev), 0);   /* again: nothing more runs */
    EQ(all(out2, 64, 0), 1);
    EQ(cu.cuEventRecord(ev, NULL), 0);   /* a new record moves it on */
    EQ(cu.cuEventSynchronize(ev), 0);
    EQ(all(out2, 64, 6), 1);
    EQ(cu.cuEventRecord(ev, (CUstream)&x), 400);
    EQ(cu.cuEventRecord((CUevent)&x, st), 400);
    EQ(cu.cuEventRecord(NULL, st), 400);
    EQ(cu.cuEventSynchronize((CUevent)&x), 400);
    EQ(cu.cuEventSynchronize(NULL), 400);
    EQ(cu.cuEventDestroy_v2((CUevent)&x), 400);
    EQ(cu.cuEventDestroy_v2(ev), 0);
    EQ(cu.cuEventSynchronize(ev), 400);
    EQ(cu.cuEventRecord(ev, st), 400);
    EQ(cu.cuEventDestroy_v2(ev), 400);

    /* a full queue runs its oldest op to make room */
    memset(out, 0, 64);
    EQ(cu.cuMemcpyDtoHAsync_v2(out, d, 64, st), 0);
    for (int i = 0; i < 4095; i++) EQ(cu.cuMemsetD8Async(d + 64 + i, (unsigned char)i, 1, st), 0);
    EQ(all(out, 64, 0), 1);   /* 4096 pending */
    EQ(cu.cuMemsetD8Async(d + 64 + 4095, 0xff, 1, st), 0);
    EQ(all(out, 64, 6), 1);
    EQ(cu.cuMemcpyDtoHAsync_v2(out, d, 8192, st), 0);
    EQ(cu.cuStreamSynchronize(st), 0);
    int in_order = 1;
    for (int i = 0; i < 4095; i++) in_order &= out[64 + i] == (unsigned char)i;
    EQ(in_order && out[64 + 4095] == 0xff, 1);

    /* a batch is deferred too, its copies run last to first */
    EQ(cu.cuMemAlloc_v2(&e, 64), 0);
    memset(buf, 7, 64);
    memset(out2, 0, 64);
    memcpy_attrs attrs = {.order = 1};
    size_t idx = 0, sizes[2] = {64, 64};
    CUdeviceptr dsts[2] = {e, (CUdeviceptr)(uintptr_t)out2}, srcs[2] = {(CUdeviceptr)(uintptr_t)buf, e};
    EQ(cu.cuMemsetD8_v2(e, 8, 64), 0);
    EQ(cu.cuMemcpyBatchAsync_v2(dsts, srcs, sizes, 2, &attrs, &idx, 1, st), 0);
    memset(buf, 9, 64);
    EQ(all(out2, 64, 0), 1);
    EQ(cu.cuStreamSynchronize(st), 0);
    EQ(all(out2, 64, 8), 1);   /* read before the write */
    EQ(cu.cuMemcpyDtoH_v2(out, e, 64), 0);
    EQ(all(out, 64, 9), 1);

    /* frees and destruction run the pending work before freeing */
    memset(out, 0, 64);
    EQ(cu.cuMemcpyDtoHAsync_v2(out, e, 64, st), 0);
    EQ(cu.cuMemFree_v2(e), 0);
    EQ(all(out, 64, 9), 1);
    EQ(cu.cuMemHostAlloc(&h, 4096, 0), 0);
    memset(h, 10, 64);
    EQ(cu.cuMemcpyHtoDAsync_v2(d, h, 64, st), 0);
    EQ(cu.cuMemFreeHost(h), 0);   /* would fault if the copy ran later */
    EQ(cu.cuMemsetD8Async(d + 64, 11, 64, st), 0);
    EQ(cu.cuMemcpyDtoHAsync_v2(out, d, 128, st), 0);
    EQ(cu.cuStreamDestroy_v2(st), 0);
    EQ(all(out, 64, 10) && all(out + 64, 64, 11), 1);
    memset(out2, 0, 64);
    EQ(cu.cuMemcpyDtoHAsync_v2(out2, d + 64, 64, NULL), 0);
    EQ(cu.cuDevicePrimaryCtxRelease_v2(0), 0);   /* frees d and ev2 */
    EQ(all(out2, 64, 11), 1);
    ctx = start(0);
    EQ(cu.cuEventSynchronize(ev2), 400);   /* went with the context */
    EQ(cu.cuEventDestroy_v2(ev2), 400);
    (void)ctx;
}

/* The copy kernel: known by name only, run like a batch, last to first;
 * host memory only if pinned, else a fault when it runs. */
static const char ptx[] = ".version 7.0\n.visible .entry nbd_vram_copy(.param .u32 count)\n{ ret; }\n";
static void s_kernel(void)
{
    void *mod, *fn, *none, *pinned;
    CUdeviceptr d;
    unsigned char *in, *out, plain[32] __attribute__((aligned(16)));
    start(0);
    EQ(cu.cuMemHostAlloc(&pinned, 96, 0), 0);
    in = pinned;
    out = in + 64;
    EQ(cu.cuModuleLoadData(&mod, ".version 7.0\n.visible .entry other(\n"), 218);
    EQ(cu.cuModuleLoadData(&mod, ptx), 0);
    EQ(cu.cuModuleGetFunction(&none, mod, "other"), 500);
    EQ(cu.cuModuleGetFunction(&fn, mod, "nbd_vram_copy"), 0);
    EQ(cu.cuMemAlloc_v2(&d, 64), 0);
    EQ(cu.cuMemsetD8_v2(d, 5, 64), 0);
    memset(in, 1, 32);
    memset(in + 32, 2, 32);
    memset(out, 0, 32);
    unsigned long long pieces[3][3] = {
        {(uintptr_t)out, d + 16, 32},       /* runs last: reads what the others wrote */
        {d, (uintptr_t)in, 32},
        {d + 32, (uintptr_t)(in + 32), 32},
    };
    unsigned count = 3;
    void *params[2] = {&count, pieces};
    EQ(cu.cuLaunchKernel(fn, 2, 1, 1, 256, 1, 1, 0, NULL, params, NULL), 1);   /* grid != count */
    EQ(cu.cuLaunchKernel(&count, 3, 1, 1, 256, 1, 1, 0, NULL, params, NULL), 400);
    pieces[1][2] = 24;
    EQ(cu.cuLaunchKernel(fn, 3, 1, 1, 256, 1, 1, 0, NULL, params, NULL), 716);
    pieces[1][2] = 32;
    EQ(cu.cuLaunchKernel(fn, 3, 1, 1, 256, 1, 1, 0, NULL, params, NULL), 0);
    EQ(all(out, 32, 0), 1);   /* deferred */
    EQ(cu.cuStreamSynchronize(NULL), 0);
    EQ(all(out, 16, 1) && all(out + 16, 16, 2), 1);
    unsigned char back[64];
    EQ(cu.cuMemcpyDtoH_v2(back, d, 64), 0);
    EQ(all(back, 32, 1) && all(back + 32, 32, 2), 1);
    unsigned long long off_pinned[1][3] = {{(uintptr_t)plain, d, 32}};
    void *params2[2] = {&(unsigned){1}, off_pinned};
    EQ(cu.cuLaunchKernel(fn, 1, 1, 1, 256, 1, 1, 0, NULL, params2, NULL), 0);   /* faults when it runs */
    EQ(cu.cuStreamSynchronize(NULL), 700);
    EQ(cu.cuMemcpyDtoH_v2(back, d, 64), 700);   /* sticky */
    EQ(cu.cuModuleUnload(mod), 0);
}

/* The mailbox kernel: alive at launch, each posted job (a read into the
 * landing buffer, or with the length's top bit a write from it) run at the
 * next query or sync of its stream, length 0 ends it. */
/* The orderings the fake looks for in nbd-vram's kernel (see README.md). */
static const char mailbox_ptx[] = ".version 7.0\n.visible .entry nbd_vram_mailbox(.param .u64 slot)\n"
    "{ ld.acquire.sys.global.u64 ...; ld.global.cv.v4.u32 ...; st.release.sys.global.u32 ...; ret; }\n";
/* The kernel's base: the device memory `mailbox` allocates. */
static CUdeviceptr base;
/* Posts a job: `len` bytes (bit 31: a write; bit 30: a list, its count in
 * the low bits) at `src`, as one word (see the fake's README). */
static void post(unsigned char *slot, CUdeviceptr src, unsigned seq, unsigned len)
{
    unsigned long long listed = len >> 30 & 1, n = listed ? len & 0xffff : (len & 0x3fffffff) / 16;
    unsigned long long word = (seq & 0xff) | (unsigned long long)(len >> 31) << 8 | listed << 9 | n << 10;
    if (!listed && len & 0x3fffffff) word |= (src - base) / 16 << 23;
    __atomic_store_n((unsigned long long *)slot, word, __ATOMIC_RELEASE);
}
static unsigned flag(unsigned char *slot, int at) { return __atomic_load_n((unsigned *)(slot + at), __ATOMIC_ACQUIRE); }

/* The kernel runs on its own thread: `flag` at `at` reaches `want` with no
 * call into the library, within 2 s; returns what it read last. */
static unsigned flag_becomes(unsigned char *slot, int at, unsigned want)
{
    for (int i = 0; i < 200000 && flag(slot, at) != want; i++) usleep(10);
    return flag(slot, at);
}

/* What cuStreamQuery says once the kernel has stopped running (a fault, or
 * the end), within 2 s; 600 if it still runs. */
static CUresult settled(CUstream st)
{
    CUresult rc = 600;
    for (int i = 0; i < 200000 && (rc = cu.cuStreamQuery(st)) == 600; i++) usleep(10);
    return rc;
}

/* Loads the kernel and launches it on a new non-blocking stream, over
 * fresh device memory of 8 KiB filled with 7. The slot's sequence is 0,
 * and the kernel takes it as done. */
static CUstream mailbox(void **fn, unsigned char **slot, unsigned char **landing, CUdeviceptr *d)
{
    unsigned last = 0;
    void *mod;
    CUstream st;
    start(0);
    EQ(cu.cuModuleLoadData(&mod, mailbox_ptx), 0);
    EQ(cu.cuModuleGetFunction(fn, mod, "nbd_vram_copy"), 500);   /* not in this module */
    EQ(cu.cuModuleGetFunction(fn, mod, "nbd_vram_mailbox"), 0);
    EQ(cu.cuMemHostAlloc((void **)slot, 4096, 2), 0);
    EQ(cu.cuMemHostAlloc((void **)landing, 65536, 2), 0);
    EQ(cu.cuMemAlloc_v2(d, 8192), 0);
    EQ(cu.cuMemsetD8_v2(*d, 7, 8192), 0);
    EQ(cu.cuStreamSynchronize(NULL), 0);   /* the memset may still run, beside the kernel */
    EQ(cu.cuStreamCreate(&st, 1), 0);
    __atomic_store_n((unsigned *)(*slot + 128), ~0u, __ATOMIC_RELEASE);
    base = *d;
    void *params[4] = {slot, landing, &last, &base};
    EQ(cu.cuLaunchKernel(*fn, 1, 1, 1, 256, 1, 1, 0, st, params, NULL), 0);
    EQ(flag_becomes(*slot, 128, last), last);   /* alive */
    return st;
}

static void s_mailbox(void)
{
    void *fn;
    unsigned char *slot, *landing;
    CUdeviceptr d;
    CUstream blocking;
    int v = -1;
    CUstream st = mailbox(&fn, &slot, &landing, &d);
    EQ(cu.cuDeviceGetAttribute(&v, 17, 0), 0);
    EQ(v, 0);
    EQ(cu.cuDeviceGetAttribute(&v, 16, 0), 0);   /* SMs */
    EQ(v, 132);
    EQ(cu.cuDeviceGetAttribute(&v, 1, 0), 1);
    unsigned last = 0;
    void *params[4] = {&slot, &landing, &last, &base};
    EQ(cu.cuStreamCreate(&blocking, 0), 0);
    EQ(cu.cuLaunchKernel(fn, 1, 1, 1, 256, 1, 1, 0, blocking, params, NULL), 1);   /* the legacy stream would wait */
    EQ(cu.cuLaunchKernel(fn, 1, 1, 1, 256, 1, 1, 0, st, params, NULL), 1);         /* behind one that never ends */
    EQ(cu.cuStreamQuery(st), 600);
    post(slot, d + 16, 1, 4096);
    EQ(flag_becomes(slot, 64, 1), 1);  /* on its own, no call needed */
    EQ(all(landing, 4096, 7), 1);
    memset(landing, 3, 32);
    post(slot, d + 32, 2, 32 | 1u << 31);   /* a write: landing to VRAM */
    EQ(flag_becomes(slot, 64, 2), 2);
    unsigned char back[96];
    EQ(cu.cuMemcpyDtoH_v2(back, d, 96), 0);
    EQ(all(back, 32, 7) && all(back + 32, 32, 3) && all(back + 64, 32, 7), 1);
    post(slot, 0, 3, 0);              /* end */
    EQ(cu.cuStreamSynchronize(st), 0);
    EQ(flag(slot, 64), 3);
    EQ(cu.cuStreamQuery(st), 0);
    last = 3;
    EQ(cu.cuLaunchKernel(fn, 1, 1, 1, 256, 1, 1, 0, st, params, NULL), 0);
    EQ(flag_becomes(slot, 128, 3), 3);
    EQ(cu.cuMemsetD8Async(d, 9, 16, NULL), 0);
    post(slot, d, 4, 16);             /* with a memset pending: a race on a GPU */
    EQ(settled(st), 700);
    EQ(flag(slot, 64), 3);
    EQ(cu.cuStreamQuery(st), 700);    /* sticky */
}

/* Writes piece i of a list job into the slot page. */
static void row(unsigned char *slot, unsigned i, unsigned long long dst, unsigned long long src, unsigned len)
{
    unsigned char *r = slot + 1024 + 32 * i;
    memcpy(r, &dst, 8);
    memcpy(r + 8, &src, 8);
    memcpy(r + 16, &len, 4);
}

/* A list job moves each piece between VRAM and pinned memory, either way;
 * a piece outside pinned memory faults before any piece runs. */
static void s_mailbox_list(void)
{
    void *fn;
    unsigned char *slot, *landing, stack[32];
    CUdeviceptr d;
    CUstream st = mailbox(&fn, &slot, &landing, &d);
    memset(landing, 5, 64);
    row(slot, 0, d, (uintptr_t)landing, 32);
    row(slot, 1, d + 4096, (uintptr_t)landing + 32, 16);
    post(slot, 0, 1, 2 | 1u << 30 | 1u << 31);   /* a list of two writes */
    EQ(flag_becomes(slot, 64, 1), 1);
    unsigned char back[64];
    EQ(cu.cuMemcpyDtoH_v2(back, d, 48), 0);
    EQ(all(back, 32, 5) && all(back + 32, 16, 7), 1);
    EQ(cu.cuMemcpyDtoH_v2(back, d + 4096, 32), 0);
    EQ(all(back, 16, 5) && all(back + 16, 16, 7), 1);
    row(slot, 0, (uintptr_t)landing + 1024, d + 16, 32);
    row(slot, 1, (uintptr_t)landing + 2048, d + 8000, 64);
    post(slot, 0, 2, 2 | 1u << 30);              /* two reads */
    EQ(flag_becomes(slot, 64, 2), 2);
    EQ(all(landing + 1024, 16, 5) && all(landing + 1040, 16, 7) && all(landing + 2048, 64, 7), 1);
    memset(landing + 1024, 0, 32);
    row(slot, 0, (uintptr_t)landing + 1024, d, 32);
    row(slot, 1, (uintptr_t)stack, d, 32);       /* not pinned */
    post(slot, 0, 3, 2 | 1u << 30);
    EQ(settled(st), 700);
    EQ(flag(slot, 64), 2);
    EQ(all(landing + 1024, 32, 0), 1);          /* nothing ran */
}

static void s_fail_mailbox(void)   /* FAIL_MAILBOX 2, EXEC_TIMEOUT 1 */
{
    void *fn;
    unsigned char *slot, *landing;
    CUdeviceptr d;
    int v = -1;
    CUstream st = mailbox(&fn, &slot, &landing, &d);
    EQ(cu.cuDeviceGetAttribute(&v, 17, 0), 0);
    EQ(v, 1);
    post(slot, d, 1, 4096);
    EQ(flag_becomes(slot, 64, 1), 1);
    row(slot, 0, (uintptr_t)landing, d + 8, 32);   /* a misaligned piece (a lone job's word cannot say one) */
    row(slot, 1, (uintptr_t)landing + 64, d, 32);
    post(slot, 0, 2, 2 | 1u << 30);
    EQ(settled(st), 716);
    EQ(cu.cuMemsetD8_v2(d, 0, 16), 716);
}

static void s_fail_mailbox_job(void)   /* FAIL_MAILBOX 2 */
{
    void *fn;
    unsigned char *slot, *landing;
    CUdeviceptr d;
    CUstream st = mailbox(&fn, &slot, &landing, &d);
    post(slot, d, 1, 4096);
    EQ(flag_becomes(slot, 64, 1), 1);
    post(slot, d, 2, 4096);
    EQ(settled(st), 700);
    EQ(flag(slot, 64), 1);
    EQ(cu.cuMemsetD8_v2(d, 0, 16), 700);
}

/* A fault in other work ends the kernel too, as every kernel of a context
 * ends with its sticky error: a job posted after it is never done. */
static void s_fault_ends_mailbox(void)   /* FAIL_SYNC 2 */
{
    void *fn;
    unsigned char *slot, *landing;
    CUdeviceptr d;
    CUstream other;
    CUstream st = mailbox(&fn, &slot, &landing, &d);   /* its sync is the first */
    post(slot, d, 1, 4096);
    EQ(flag_becomes(slot, 64, 1), 1);
    EQ(cu.cuStreamCreate(&other, 1), 0);
    EQ(cu.cuStreamSynchronize(other), 700);
    post(slot, d, 2, 4096);
    usleep(100 * 1000);
    EQ(flag(slot, 64), 1);
    EQ(cu.cuStreamQuery(st), 700);
    EQ(cu.cuStreamDestroy_v2(st), 0);   /* nothing runs on it for ever */
}

/* Mailbox jobs beside other streams' pending work: a race only where both
 * touch the same memory, one writing it. stderr goes to a file, to check
 * what the fake said. */
static int err_fd = -1;
static void capture_stderr(void)
{
    char path[128];
    snprintf(path, sizeof path, "%s/stderr.%d", tmp, (int)getpid());
    err_fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    EQ(err_fd >= 0, 1);
    fflush(stderr);
    dup2(err_fd, 2);
}
static int said(const char *text)
{
    char buf[4096] = "";
    ssize_t n = pread(err_fd, buf, sizeof buf - 1, 0);
    if (n > 0) buf[n] = 0;
    return strstr(buf, text) != NULL;
}
#define RACE "fake libcuda: a nbd_vram_mailbox job while async work is pending"

static void s_mailbox_overlap(void)   /* lone jobs, device memory */
{
    void *fn;
    unsigned char *slot, *landing;
    CUdeviceptr d;
    CUstream other;
    static unsigned char buf[64], out[64];
    capture_stderr();
    CUstream st = mailbox(&fn, &slot, &landing, &d);
    unsigned char *dev = (unsigned char *)(uintptr_t)d;
    EQ(cu.cuStreamCreate(&other, 1), 0);
    memset(buf, 2, 64);
    EQ(cu.cuMemcpyHtoDAsync_v2(d + 4096, buf, 64, other), 0);   /* pending: writes 4096..4160 */
    EQ(cu.cuMemcpyDtoHAsync_v2(out, d, 64, other), 0);         /* pending: reads 0..64 */
    post(slot, d, 1, 4096);                       /* reads 0..4096: a read beside a read */
    EQ(flag_becomes(slot, 64, 1), 1);
    EQ(all(landing, 4096, 7), 1);
    memset(landing, 3, 16);
    post(slot, d + 4080, 2, 16 | 1u << 31);       /* writes 4080..4096: next to both */
    EQ(flag_becomes(slot, 64, 2), 2);
    EQ(all(dev + 4080, 16, 3), 1);
    EQ(cu.cuMemsetD8Async(d + 2048, 5, 16, st), 0);   /* on the kernel's stream: waits behind it */
    post(slot, d + 2048, 3, 16);
    EQ(flag_becomes(slot, 64, 3), 3);
    EQ(all(landing, 16, 7), 1);
    EQ(said(RACE), 0);
    post(slot, d + 4144, 4, 32);                  /* reads 4144..4176: the pending copy writes it */
    EQ(settled(st), 700);
    EQ(flag(slot, 64), 3);
    EQ(said(RACE), 1);
    EQ(all(dev + 4096, 64, 7) && all(out, 64, 0), 1);   /* the other stream's work is still pending */
}

static void s_mailbox_overlap_list(void)   /* each row of a list job */
{
    void *fn;
    unsigned char *slot, *landing;
    CUdeviceptr d;
    CUstream other;
    capture_stderr();
    CUstream st = mailbox(&fn, &slot, &landing, &d);
    EQ(cu.cuStreamCreate(&other, 0), 0);
    EQ(cu.cuMemsetD8Async(d + 1024, 9, 64, other), 0);   /* pending: writes 1024..1088 */
    memset(landing, 0, 4096);
    row(slot, 0, (uintptr_t)landing, d, 32);
    row(slot, 1, (uintptr_t)landing + 64, d + 1088, 32);
    post(slot, 0, 1, 2 | 1u << 30);               /* two reads beside it */
    EQ(flag_becomes(slot, 64, 1), 1);
    EQ(all(landing, 32, 7) && all(landing + 64, 32, 7), 1);
    EQ(said(RACE), 0);
    memset(landing, 0, 4096);
    row(slot, 0, (uintptr_t)landing, d, 32);
    row(slot, 1, (uintptr_t)landing + 64, d + 1072, 32);   /* 1072..1104: its second row overlaps */
    post(slot, 0, 2, 2 | 1u << 30);
    EQ(settled(st), 700);
    EQ(flag(slot, 64), 1);
    EQ(said(RACE), 1);
    EQ(all(landing, 4096, 0), 1);                 /* no row ran */
}

/* Calls that wait for every kernel (FAKE_CUDA_MAILBOX_STALL=2: the kernel
 * takes its second job 3 s late). A cuMemFree on another thread waits for
 * the kernel to take its end; this thread's calls wait behind it. */
static CUdeviceptr spare;
static void *free_spare(void *ctx)
{
    EQ(cu.cuCtxSetCurrent(ctx), 0);
    EQ(cu.cuMemFree_v2(spare), 0);
    return NULL;
}
static double seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
static CUstream free_while_running(unsigned char **slot, unsigned second_job, pthread_t *t)
{
    void *fn;
    unsigned char *landing;
    CUdeviceptr d;
    CUstream st = mailbox(&fn, slot, &landing, &d);
    EQ(cu.cuMemAlloc_v2(&spare, 4096), 0);
    post(*slot, d, 1, 4096);
    EQ(flag_becomes(*slot, 64, 1), 1);   /* running, not told to end */
    post(*slot, d, 2, second_job);
    CUcontext ctx = NULL;
    EQ(cu.cuDevicePrimaryCtxRetain(&ctx, 0), 0);
    EQ(pthread_create(t, NULL, free_spare, ctx), 0);
    usleep(200 * 1000);   /* the free waits for the kernel (a loaded machine may take longer: see below) */
    return st;
}
static void s_wait_all(void)
{
    unsigned char *slot;
    pthread_t t;
    CUstream st = free_while_running(&slot, 0, &t);   /* the second job: the end */
    /* Once the free waits, a query is held until it returns, after the
     * kernel has taken its end, 3 s late; until then it says "running". */
    double longest = 0;
    CUresult rc = 600;
    for (double t0 = seconds(); rc == 600 && seconds() - t0 < 10;) {
        double t1 = seconds();
        rc = cu.cuStreamQuery(st);
        if (seconds() - t1 > longest) longest = seconds() - t1;
    }
    EQ(rc, 0);
    EQ(longest > 1.0, 1);
    EQ(pthread_join(t, NULL), 0);
}
static void wait_all_deadlock(void)
{
    unsigned char *slot;
    pthread_t t;
    CUstream st = free_while_running(&slot, 16, &t);   /* the second job: a read */
    for (double t0 = seconds(); seconds() - t0 < 10;)
        cu.cuStreamQuery(st);   /* once the free waits for this thread's kernel: never returns */
}
static void s_wait_all_deadlock(void)
{
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        capture_stderr();
        wait_all_deadlock();
        _exit(0);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    EQ(WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT, 1);
    char path[128], buf[4096] = "";
    snprintf(path, sizeof path, "%s/stderr.%d", tmp, (int)pid);
    int fd = open(path, O_RDONLY);
    EQ(fd >= 0 && read(fd, buf, sizeof buf - 1) > 0, 1);
    if (fd >= 0) close(fd);
    EQ(strstr(buf, "cuStreamQuery waits behind cuMemFree, which waits for this thread's nbd_vram_mailbox") != NULL, 1);
}

static void s_mailbox_overlap_host(void)   /* the landing buffer */
{
    void *fn;
    unsigned char *slot, *landing;
    CUdeviceptr d;
    CUstream other;
    capture_stderr();
    CUstream st = mailbox(&fn, &slot, &landing, &d);
    unsigned char *dev = (unsigned char *)(uintptr_t)d;
    EQ(cu.cuStreamCreate(&other, 1), 0);
    memset(landing, 4, 65536);
    EQ(cu.cuMemcpyHtoDAsync_v2(d + 4096, landing + 8192, 64, other), 0);   /* pending: reads landing 8192.. */
    post(slot, d, 1, 4096);                       /* writes landing 0..4096 */
    EQ(flag_becomes(slot, 64, 1), 1);
    EQ(all(landing, 4096, 7), 1);
    EQ(said(RACE), 0);
    EQ(cu.cuMemcpyHtoDAsync_v2(d + 4096, landing + 1024, 64, other), 0);   /* pending: reads landing 1024.. */
    post(slot, d + 16, 2, 4096);                  /* would overwrite it */
    EQ(settled(st), 700);
    EQ(flag(slot, 64), 1);
    EQ(said(RACE), 1);
    EQ(all(dev + 4096, 64, 7), 1);
}

static void s_no_jit(void)
{
    void *mod;
    start(0);
    EQ(cu.cuModuleLoadData(&mod, ptx), 221);
}

static void s_fail_copy_batch(void)   /* FAIL_COPY 3: a failing batch queues nothing */
{
    CUdeviceptr d;
    unsigned char a[16], b[16], c[16];
    memcpy_attrs attrs = {.order = 3};
    size_t idx = 0, sizes[3] = {16, 16, 16};
    start(0);
    EQ(cu.cuMemAlloc_v2(&d, 64), 0);
    memset(a, 1, 16);
    memset(b, 2, 16);
    memset(c, 0xee, 16);
    CUdeviceptr dsts[3] = {d, d + 16, (CUdeviceptr)(uintptr_t)c};
    CUdeviceptr srcs[3] = {(CUdeviceptr)(uintptr_t)a, (CUdeviceptr)(uintptr_t)b, d};
    EQ(cu.cuMemsetD8_v2(d, 0, 64), 0);   /* 1 */
    /* 2 is its last copy (checked first, passes), 3 its second (fails) */
    EQ(cu.cuMemcpyBatchAsync_v2(dsts, srcs, sizes, 3, &attrs, &idx, 1, NULL), 2);
    EQ(cu.cuStreamSynchronize(NULL), 0);
    unsigned char out[64];
    EQ(cu.cuMemcpyDtoH_v2(out, d, 64), 0);
    EQ(all(out, 64, 0) && all(c, 16, 0xee), 1);
    EQ(cu.cuMemcpyBatchAsync_v2(dsts, srcs, sizes, 3, &attrs, &idx, 1, NULL), 0);
    EQ(cu.cuStreamSynchronize(NULL), 0);
    EQ(cu.cuMemcpyDtoH_v2(out, d, 64), 0);
    EQ(all(out, 16, 1) && all(out + 16, 16, 2) && all(c, 16, 0), 1);
}

static void s_fail_sync(void)   /* FAIL_SYNC 2 */
{
    CUdeviceptr d, e;
    CUstream st, other;
    CUevent ev, ev2;
    void *h;
    int x;
    size_t f, t;
    unsigned char out[64];
    start(0);
    EQ(cu.cuMemAlloc_v2(&d, 4096), 0);
    EQ(cu.cuMemHostAlloc(&h, 4096, 0), 0);
    EQ(cu.cuStreamCreate(&st, 0), 0);
    EQ(cu.cuStreamCreate(&other, 1), 0);
    EQ(cu.cuEventCreate(&ev, 0), 0);
    EQ(cu.cuMemsetD8_v2(d, 0, 128), 0);
    EQ(cu.cuMemsetD8Async(d, 1, 64, st), 0);
    EQ(cu.cuStreamSynchronize((CUstream)&x), 400);   /* invalid: not counted */
    EQ(cu.cuEventSynchronize((CUevent)&x), 400);
    EQ(cu.cuStreamSynchronize(st), 0);   /* 1 */
    EQ(cu.cuMemsetD8Async(d, 2, 64, st), 0);
    memset(out, 0, 64);
    EQ(cu.cuMemcpyDtoHAsync_v2(out, d, 64, st), 0);
    EQ(cu.cuEventRecord(ev, st), 0);
    EQ(cu.cuMemsetD8Async(d + 64, 9, 64, other), 0);
    EQ(cu.cuEventSynchronize(ev), 700);   /* 2: the pending work is lost, every stream's */
    EQ(all(out, 64, 0), 1);
    /* sticky: everything that needs the context fails */
    EQ(cu.cuStreamSynchronize(st), 700);
    EQ(cu.cuEventSynchronize(ev), 700);
    EQ(cu.cuEventRecord(ev, st), 700);
    EQ(cu.cuEventCreate(&ev2, 0), 700);
    EQ(cu.cuMemcpyDtoH_v2(out, d, 64), 700);
    EQ(cu.cuMemcpyHtoD_v2(d, out, 64), 700);
    EQ(cu.cuMemsetD8_v2(d, 3, 64), 700);
    EQ(cu.cuMemsetD8Async(d, 3, 64, st), 700);
    EQ(cu.cuMemcpyDtoHAsync_v2(out, d, 64, st), 700);
    EQ(cu.cuMemcpyHtoDAsync_v2(d, out, 64, NULL), 700);
    EQ(cu.cuMemAlloc_v2(&e, 4096), 700);
    EQ(cu.cuMemGetInfo_v2(&f, &t), 700);
    EQ(cu.cuMemHostAlloc(&h, 4096, 0), 700);
    EQ(cu.cuStreamCreate(&st, 0), 700);
    EQ(all(out, 64, 0), 1);
    EQ(all((unsigned char *)(uintptr_t)d, 64, 1) && all((unsigned char *)(uintptr_t)d + 64, 64, 0), 1);   /* as it was */
    /* frees still work, so the process can clean up */
    EQ(cu.cuEventDestroy_v2(ev), 0);
    EQ(cu.cuStreamDestroy_v2(other), 0);
    EQ(all((unsigned char *)(uintptr_t)d, 64, 1) && all((unsigned char *)(uintptr_t)d + 64, 64, 0), 1);
    EQ(cu.cuStreamDestroy_v2(st), 0);
    EQ(cu.cuMemFreeHost(h), 0);
    EQ(cu.cuMemFree_v2(d), 0);
    EQ(cu.cuMemFree_v2(d), 1);
    EQ(cu.cuDevicePrimaryCtxRelease_v2(0), 0);
    EQ(all(out, 64, 0), 1);   /* the lost work never ran, not even at the frees */
    /* a fresh context is clean, and only the Nth sync fails */
    start(0);
    EQ(cu.cuMemAlloc_v2(&d, 4096), 0);
    EQ(cu.cuMemsetD8Async(d, 4, 64, NULL), 0);
    EQ(cu.cuStreamSynchronize(NULL), 0);   /* 3 */
    EQ(cu.cuMemcpyDtoH_v2(out, d, 64), 0);
    EQ(all(out, 64, 4), 1);
    EQ(cu.cuMemFree_v2(d), 0);
}

/* A queue per stream: a stream's sync or event runs its own work only. */
struct waiter { CUcontext ctx; CUevent ev; CUstream st; };
static void *event_waiter(void *arg)   /* another thread, as another connection */
{
    struct waiter *w = arg;
    EQ(cu.cuCtxSetCurrent(w->ctx), 0);
    EQ(cu.cuEventSynchronize(w->ev), 0);
    return NULL;
}

static void s_streams(void)
{
    CUdeviceptr d;
    CUstream a, b, nb;
    CUevent ev;
    static unsigned char buf[4][64], out[64];
    CUcontext ctx = start(0);
    EQ(cu.cuMemAlloc_v2(&d, 4096), 0);
    unsigned char *dev = (unsigned char *)(uintptr_t)d;   /* device memory is ours to look at */
    EQ(cu.cuMemsetD8_v2(d, 1, 4096), 0);
    EQ(cu.cuStreamCreate(&a, 0), 0);
    EQ(cu.cuStreamCreate(&b, 1), 0);
    EQ(cu.cuStreamCreate(&nb, 1), 0);
    EQ(cu.cuEventCreate(&ev, 2), 0);

    /* a sync of a leaves b's HtoD copy unrun until b syncs */
    memset(buf[0], 2, 64);
    memset(out, 0, 64);
    EQ(cu.cuMemcpyHtoDAsync_v2(d, buf[0], 64, b), 0);
    EQ(cu.cuMemcpyDtoHAsync_v2(out, d + 1024, 64, a), 0);
    EQ(cu.cuStreamSynchronize(a), 0);
    EQ(all(out, 64, 1), 1);
    EQ(all(dev, 64, 1), 1);   /* still old */
    EQ(cu.cuStreamQuery(a), 0);   /* a query runs its own stream's work only */
    EQ(all(dev, 64, 1), 1);
    memset(buf[0], 3, 64);    /* the copy reads it when it runs */
    EQ(cu.cuStreamSynchronize(b), 0);
    EQ(all(dev, 64, 3), 1);

    /* a query may say that work just queued still runs, and leaves it
     * unrun; the next look runs it */
    memset(buf[0], 5, 64);
    EQ(cu.cuMemcpyHtoDAsync_v2(d, buf[0], 64, a), 0);
    EQ(cu.cuStreamQuery(a), 600);
    EQ(all(dev, 64, 3), 1);
    EQ(cu.cuStreamQuery(a), 0);
    EQ(all(dev, 64, 5), 1);

    /* an event recorded on b, synchronized on another thread: b's work up
     * to it runs, not b's later work nor a's */
    memset(buf[1], 4, 64);
    memset(buf[2], 5, 64);
    memset(buf[3], 6, 64);
    EQ(cu.cuMemcpyHtoDAsync_v2(d + 64, buf[1], 64, b), 0);
    EQ(cu.cuEventRecord(ev, b), 0);
    EQ(cu.cuMemcpyHtoDAsync_v2(d + 128, buf[2], 64, b), 0);
    EQ(cu.cuMemcpyHtoDAsync_v2(d + 192, buf[3], 64, a), 0);
    struct waiter w = {ctx, ev, a};
    pthread_t th;
    EQ(pthread_create(&th, NULL, event_waiter, &w), 0);
    pthread_join(th, NULL);
    EQ(all(dev + 64, 64, 4) && all(dev + 128, 64, 1) && all(dev + 192, 64, 1), 1);
    EQ(cu.cuStreamSynchronize(b), 0);
    EQ(all(dev + 128, 64, 5) && all(dev + 192, 64, 1), 1);
    EQ(cu.cuStreamSynchronize(a), 0);
    EQ(all(dev + 192, 64, 6), 1);

    /* the legacy stream: its sync waits for the blocking streams (a), not
     * the non-blocking ones (b, nb); its work runs after a's earlier work */
    EQ(cu.cuMemsetD8Async(d, 7, 64, a), 0);
    EQ(cu.cuMemsetD8Async(d + 64, 8, 64, nb), 0);
    EQ(cu.cuMemsetD8Async(d, 9, 16, NULL), 0);
    EQ(cu.cuStreamSynchronize(NULL), 0);
    EQ(all(dev, 16, 9) && all(dev + 16, 48, 7) && all(dev + 64, 64, 4), 1);
    EQ(cu.cuStreamSynchronize(nb), 0);
    EQ(all(dev + 64, 64, 8), 1);

    /* an event whose stream is destroyed: its work ran, it syncs at once */
    EQ(cu.cuMemsetD8Async(d, 10, 64, nb), 0);
    EQ(cu.cuEventRecord(ev, nb), 0);
    EQ(cu.cuStreamDestroy_v2(nb), 0);
    EQ(all(dev, 64, 10), 1);
    EQ(cu.cuEventSynchronize(ev), 0);

    /* a synchronous copy waits for every stream */
    EQ(cu.cuMemsetD8Async(d, 11, 64, b), 0);
    EQ(cu.cuMemsetD8Async(d + 64, 12, 64, a), 0);
    EQ(cu.cuMemcpyDtoH_v2(out, d + 1024, 64), 0);
    EQ(all(dev, 64, 11) && all(dev + 64, 64, 12), 1);

    /* each stream's queue is full at its own 4096 ops */
    for (int i = 0; i < 4096; i++) EQ(cu.cuMemsetD8Async(d + 2048 + i % 1024, 13, 1, a), 0);
    for (int i = 0; i < 4096; i++) EQ(cu.cuMemsetD8Async(d + 3072 + i % 1024, 14, 1, b), 0);
    EQ(all(dev + 2048, 2048, 1), 1);
    EQ(cu.cuMemsetD8Async(d + 3072, 15, 1, b), 0);   /* b's oldest runs, a's none */
    EQ(dev[3072] == 14 && all(dev + 3073, 1023, 1) && all(dev + 2048, 1024, 1), 1);
    EQ(cu.cuStreamDestroy_v2(a), 0);
    EQ(all(dev + 2048, 1024, 13) && dev[3072] == 15 && all(dev + 3073, 1023, 14), 1);
    EQ(cu.cuStreamDestroy_v2(b), 0);
    EQ(cu.cuMemFree_v2(d), 0);
}

static long long file_byte(const char *path, long off)
{
    unsigned char c = 0;
    int fd = open(path, O_RDONLY);
    long long r = fd >= 0 && pread(fd, &c, 1, off) == 1 ? c : -1;
    if (fd >= 0) close(fd);
    return r;
}

static void make_file(const char *path, long size, const char *text)
{
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    EQ(fd >= 0, 1);
    if (text) EQ(write(fd, text, strlen(text)), (long long)strlen(text));
    if (size) EQ(ftruncate(fd, size), 0);
    close(fd);
}

static void s_backing(void)   /* BACKING tmp/backing, 64 MiB */
{
    CUdeviceptr d[4], e, x, y;
    size_t f, t;
    char path[128];
    snprintf(path, sizeof path, "%s/backing", tmp);
    start(0);
    EQ(cu.cuMemGetInfo_v2(&f, &t), 0);
    EQ(f, 64 * MIB);
    EQ(t, 64 * MIB);
    for (int i = 0; i < 4; i++) EQ(cu.cuMemAlloc_v2(&d[i], 16 * MIB), 0);
    EQ(d[1] - d[0], 16 * MIB);
    EQ(d[3] - d[0], 48 * MIB);
    EQ(cu.cuMemAlloc_v2(&e, 4096), 2);
    EQ(cu.cuMemsetD8_v2(d[2] + 5, 0x5a, 1), 0);
    EQ(cu.cuStreamSynchronize(NULL), 0);
    EQ(file_byte(path, 32 * MIB + 5), 0x5a);   /* device memory is the file */
    EQ(cu.cuMemFree_v2(d[1]), 0);
    EQ(cu.cuMemAlloc_v2(&x, 5000), 0);          /* first fit reuses the hole */
    EQ(x, d[1]);
    EQ(cu.cuMemAlloc_v2(&y, 8 * MIB), 0);
    EQ(y, d[1] + 8192);                          /* page-aligned */
    EQ(cu.cuMemAlloc_v2(&e, 8 * MIB), 2);
    EQ(cu.cuMemFree_v2(x), 0);
    EQ(cu.cuMemFree_v2(y), 0);
    EQ(cu.cuMemFree_v2(d[1]), 1);   /* already freed */
    EQ(cu.cuMemFree_v2(d[0]), 0);
    EQ(cu.cuMemFree_v2(d[2]), 0);
    EQ(cu.cuMemFree_v2(d[3]), 0);
    EQ(cu.cuMemGetInfo_v2(&f, &t), 0);
    EQ(f, 64 * MIB);
}

static void s_backing_capped(void)   /* BACKING 64 MiB, TOTAL 32 */
{
    size_t total;
    EQ(cu.cuInit(0), 0);
    EQ(cu.cuDeviceTotalMem_v2(&total, 0), 0);
    EQ(total, 32 * MIB);
}

static void s_ivshmem(void)   /* a fake sysfs with an ivshmem device */
{
    CUdeviceptr d;
    size_t total;
    char path[128], buf[8] = "";
    start(0);
    EQ(cu.cuDeviceTotalMem_v2(&total, 0), 0);
    EQ(total, 8 * MIB);
    EQ(cu.cuMemAlloc_v2(&d, 8 * MIB), 0);
    EQ(cu.cuMemsetD8_v2(d + 8 * MIB - 1, 0x77, 1), 0);
    EQ(cu.cuStreamSynchronize(NULL), 0);
    snprintf(path, sizeof path, "%s/pci/0000:00:05.0/resource2", tmp);
    EQ(file_byte(path, 8 * MIB - 1), 0x77);
    snprintf(path, sizeof path, "%s/pci/0000:00:05.0/enable", tmp);
    int fd = open(path, O_RDONLY);
    EQ(read(fd, buf, sizeof buf - 1), 2);
    close(fd);
    STR(buf, "1\n");   /* "1" written over the "0\n" */
    EQ(cu.cuMemFree_v2(d), 0);
}

static void s_log(void)   /* LOG, TOTAL 8192, FREE 6000 */
{
    CUdeviceptr a, b;
    char path[128], buf[1024] = "";
    snprintf(path, sizeof path, "%s/log", tmp);
    start(0);
    EQ(cu.cuMemAlloc_v2(&a, 7516192768ULL), 2);
    EQ(cu.cuMemAlloc_v2(&a, 2684354560ULL), 0);
    EQ(cu.cuMemAlloc_v2(&b, 2684354560ULL), 0);
    EQ(cu.cuMemFree_v2(a), 0);
    EQ(cu.cuMemFree_v2(a), 1);
    EQ(cu.cuDevicePrimaryCtxRelease_v2(0), 0);   /* b leaks */
    start(0);
    EQ(cu.cuDevicePrimaryCtxRelease_v2(0), 0);
    int fd = open(path, O_RDONLY);
    EQ(read(fd, buf, sizeof buf - 1) > 0, 1);
    close(fd);
    char want[512];
    snprintf(want, sizeof want,
             "init -> ok\nalloc 7516192768 -> OUT_OF_MEMORY\nalloc 2684354560 -> ok\n"
             "alloc 2684354560 -> ok\nfree 2684354560\nfree 0x%llx -> INVALID_VALUE\n"
             "release 0 -> ok refs=0 leaked=2684354560 leaked_host=0\ninit -> ok\n"
             "release 0 -> ok refs=0\n", a);
    STR(buf, want);
}

static void s_rows(void)   /* 2D copies (host to device) and PCI addresses */
{
    CUdeviceptr d;
    CUstream st;
    char id[32];
    static unsigned char src[32], out[128], zero[128];
    start(0);
    EQ(cu.cuDeviceGetPCIBusId(id, sizeof id, 0), 0);
    STR(id, "0000:01:00.0");
    EQ(cu.cuDeviceGetPCIBusId(id, sizeof id, 1), 101);   /* one device: INVALID_DEVICE */
    EQ(cu.cuMemAlloc_v2(&d, 128), 0);
    EQ(cu.cuStreamCreate(&st, 0), 0);
    EQ(cu.cuMemcpyHtoD_v2(d, zero, 128), 0);
    fill(src, 32, 7);
    /* two rows of 8 bytes, 16 apart in host memory, to (4, 1) and (4, 2) of rows 32 apart */
    memcpy2d c = {0, 0, 1, src, 0, NULL, 16, 4, 1, 2, NULL, d, NULL, 32, 8, 2};
    EQ(cu.cuMemcpy2DAsync_v2(&c, st), 0);
    EQ(cu.cuMemcpyDtoH_v2(out, d, 128), 0);   /* a synchronous copy runs the queue first */
    EQ(memcmp(out + 36, src, 8), 0);
    EQ(memcmp(out + 68, src + 16, 8), 0);
    EQ(all(out, 36, 0) && all(out + 44, 24, 0) && all(out + 76, 52, 0), 1);
    memcpy2d bad = c;
    bad.src_type = 2;   /* device to device: not something nbd-vram sends */
    EQ(cu.cuMemcpy2DAsync_v2(&bad, st), 1);
    bad = c;
    bad.width = 17;   /* wider than the source's pitch */
    EQ(cu.cuMemcpy2DAsync_v2(&bad, st), 1);
    bad = c;
    bad.height = 4;   /* the last row ends past the allocation: none is copied */
    memset(src, 0xee, sizeof src);
    EQ(cu.cuMemcpy2DAsync_v2(&bad, st), 1);
    EQ(cu.cuStreamSynchronize(st), 0);
    EQ(cu.cuMemcpyDtoH_v2(out, d, 128), 0);
    EQ(out[36] != 0xee && out[68] != 0xee && out[100] == 0, 1);
}

static void s_fail_record(void)   /* FAIL_RECORD 2: that record and the next sync fail, not sticky */
{
    CUdeviceptr d;
    CUstream st;
    CUevent ev, ev2;
    void *h;
    unsigned char *out;
    start(0);
    EQ(cu.cuMemAlloc_v2(&d, 4096), 0);
    EQ(cu.cuMemHostAlloc(&h, 4096, 0), 0);
    out = h;
    EQ(cu.cuStreamCreate(&st, 0), 0);
    EQ(cu.cuEventCreate(&ev, 0), 0);
    EQ(cu.cuEventCreate(&ev2, 0), 0);
    EQ(cu.cuMemsetD8_v2(d, 5, 64), 0);
    EQ(cu.cuEventRecord(ev, (CUstream)&d), 400);   /* invalid: not counted */
    EQ(cu.cuEventRecord(ev, st), 0);   /* 1 */
    memset(out, 0, 64);
    EQ(cu.cuMemcpyDtoHAsync_v2(out, d, 64, st), 0);
    EQ(cu.cuEventRecord(ev2, st), 2);   /* 2: records nothing */
    EQ(cu.cuEventSynchronize(ev2), 0);   /* never recorded: nothing to wait for */
    EQ(all(out, 64, 0), 1);
    EQ(cu.cuStreamSynchronize(st), 2);   /* the next sync fails, running nothing */
    EQ(all(out, 64, 0), 1);
    EQ(cu.cuEventRecord(ev2, st), 0);   /* not sticky */
    EQ(cu.cuEventSynchronize(ev2), 0);
    EQ(all(out, 64, 5), 1);
    EQ(cu.cuStreamSynchronize(st), 0);
}

extern char **environ;
static int run(const char *name, void (*fn)(void), const char *env)
{
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        scenario = name;
        char *e = strdup(env), *save = NULL;   /* "K=V K=V" */
        for (char **v = environ; *v;) {   /* every knob the caller had set */
            char *was = *v, *var = strncmp(was, "FAKE_CUDA_", 10) ? NULL : strndup(was, strcspn(was, "="));
            if (var) unsetenv(var);   /* moves the rest up */
            free(var);
            if (*v == was) v++;       /* kept: no knob, or one unsetenv cannot take */
        }
        for (char *kv = strtok_r(e, " ", &save), *eq; kv; kv = strtok_r(NULL, " ", &save))
            if ((eq = strchr(kv, '='))) { *eq = 0; setenv(kv, eq + 1, 1); }
        free(e);
        void *h = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
        if (!h) { fprintf(stderr, "%s\n", dlerror()); _exit(2); }
#define LOAD(n, args) if (!(*(void **)&cu.n = dlsym(h, #n))) { fprintf(stderr, "no %s\n", #n); _exit(2); }
        APIS(LOAD)
        fn();
        fflush(stderr);
        _exit(fails ? 1 : 0);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    int ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
    printf("%-20s %s\n", name, ok ? "ok" : "FAILED");
    return !ok;
}

int main(int argc, char **argv)
{
    char env[512], path[160];
    int bad = 0;
    lib = argc > 1 ? argv[1] : "./libcuda.so.1";
    snprintf(tmp, sizeof tmp, "/tmp/fake_cuda_check.XXXXXX");
    if (!mkdtemp(tmp)) { perror("mkdtemp"); return 2; }
    snprintf(path, sizeof path, "%s/backing", tmp);
    make_file(path, 64 * MIB, NULL);
    snprintf(path, sizeof path, "%s/pci", tmp);
    mkdir(path, 0700);
    static const char *const pci[][2] = {
        {"0000:00:04.0/vendor", "0x8086\n"}, {"0000:00:04.0/device", "0x1110\n"},
        {"0000:00:05.0/vendor", "0x1af4\n"}, {"0000:00:05.0/device", "0x1110\n"},
        {"0000:00:05.0/enable", "0\n"}, {"0000:00:05.0/resource2", NULL},
    };
    snprintf(path, sizeof path, "%s/pci/0000:00:04.0", tmp);
    mkdir(path, 0700);
    snprintf(path, sizeof path, "%s/pci/0000:00:05.0", tmp);
    mkdir(path, 0700);
    for (size_t i = 0; i < sizeof pci / sizeof *pci; i++) {
        snprintf(path, sizeof path, "%s/pci/%s", tmp, pci[i][0]);
        make_file(path, pci[i][1] ? 0 : 8 * MIB, pci[i][1]);
    }
    bad |= run("basic", s_basic, "");
    bad |= run("init_error_803", s_init_803, "FAKE_CUDA_INIT_ERROR=803");
    bad |= run("init_error_100", s_no_device, "FAKE_CUDA_INIT_ERROR=100");
    bad |= run("no_device", s_no_device, "FAKE_CUDA_DEVICES=0");
    bad |= run("bad_knob", s_bad_knob, "FAKE_CUDA_TOTAL_MIB=12x");
    bad |= run("bad_knob_sync", s_bad_knob, "FAKE_CUDA_FAIL_SYNC=-1");
    bad |= run("oom", s_oom, "FAKE_CUDA_TOTAL_MIB=8192 FAKE_CUDA_FREE_MIB=6000");
    bad |= run("max_alloc", s_max_alloc, "FAKE_CUDA_MAX_ALLOC_MIB=1024");
    bad |= run("two_devices", s_two_devices, "FAKE_CUDA_DEVICES=2 FAKE_CUDA_TOTAL_MIB=64");
    bad |= run("fail_copy", s_fail_copy, "FAKE_CUDA_FAIL_COPY=3");
    bad |= run("async", s_async, "");
    bad |= run("threads", s_threads, "");
    bad |= run("streams", s_streams, "");
    bad |= run("fail_copy_batch", s_fail_copy_batch, "FAKE_CUDA_FAIL_COPY=3");
    bad |= run("fail_sync", s_fail_sync, "FAKE_CUDA_FAIL_SYNC=2");
    bad |= run("fail_record", s_fail_record, "FAKE_CUDA_FAIL_RECORD=2");
    bad |= run("rows", s_rows, "");
    bad |= run("kernel", s_kernel, "");
    bad |= run("no_jit", s_no_jit, "FAKE_CUDA_NO_JIT=1");
    bad |= run("mailbox", s_mailbox, "");
    bad |= run("mailbox_list", s_mailbox_list, "");
    bad |= run("mailbox_misalign", s_fail_mailbox, "FAKE_CUDA_EXEC_TIMEOUT=1");
    bad |= run("fail_mailbox", s_fail_mailbox_job, "FAKE_CUDA_FAIL_MAILBOX=2");
    bad |= run("fault_ends_mailbox", s_fault_ends_mailbox, "FAKE_CUDA_FAIL_SYNC=2");
    bad |= run("mailbox_overlap", s_mailbox_overlap, "");
    bad |= run("mailbox_overlap_list", s_mailbox_overlap_list, "");
    bad |= run("mailbox_overlap_host", s_mailbox_overlap_host, "");
    bad |= run("wait_all", s_wait_all, "FAKE_CUDA_MAILBOX_STALL=2");
    bad |= run("wait_all_deadlock", s_wait_all_deadlock, "FAKE_CUDA_MAILBOX_STALL=2");
    snprintf(env, sizeof env, "FAKE_CUDA_BACKING=%s/backing", tmp);
    bad |= run("backing_file", s_backing, env);
    snprintf(env, sizeof env, "FAKE_CUDA_BACKING=%s/backing FAKE_CUDA_TOTAL_MIB=32", tmp);
    bad |= run("backing_capped", s_backing_capped, env);
    snprintf(env, sizeof env, "FAKE_CUDA_BACKING=ivshmem FAKE_CUDA_PCI_DIR=%s/pci", tmp);
    bad |= run("ivshmem", s_ivshmem, env);
    snprintf(env, sizeof env, "FAKE_CUDA_BACKING=ivshmem FAKE_CUDA_PCI_DIR=%s", tmp);
    bad |= run("ivshmem_missing", s_no_device, env);
    snprintf(env, sizeof env, "FAKE_CUDA_LOG=%s/log FAKE_CUDA_TOTAL_MIB=8192 FAKE_CUDA_FREE_MIB=6000", tmp);
    bad |= run("log", s_log, env);
    snprintf(env, sizeof env, "rm -rf '%s'", tmp);
    if (system(env) != 0) fprintf(stderr, "could not remove %s\n", tmp);
    printf("%s\n", bad ? "FAILED" : "all passed");
    return bad;
}
