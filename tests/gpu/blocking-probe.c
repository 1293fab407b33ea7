// Blocking probe, not part of nbd-vram: which driver calls wait for a
// kernel that runs until told to end (the mailbox kernel), and whether
// other threads' calls wait with them. nbd-vram keeps a call that waits
// from ever meeting a mailbox kernel that nobody has told to end
// (src/cuda/gate.rs); the fake driver models what this prints
// (tests/fake_cuda/libcuda.c, "Calls that wait for every kernel"), and
// tests/gpu/run.sh checks that no other call waits.
// For each call: a kernel spinning on a flag in mapped pinned memory is
// started on a non-blocking stream, a helper thread lifts the flag HOLD_MS
// later, and the call is timed on the main thread; meanwhile a third
// thread, 20 ms after the call began, queues a 4 KiB host-to-device copy
// on its own non-blocking stream and times that. A call or copy taking
// about HOLD_MS waited for the kernel.
//   gcc -O2 -o target/probe/blocking-probe tests/gpu/blocking-probe.c -ldl -lpthread
//   target/probe/blocking-probe [HOLD_MS]
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
typedef int R; typedef uint64_t DP; typedef void *H;
static R (*cuInit)(unsigned); static R (*cuDeviceGet)(int*,int); static R (*cuDevicePrimaryCtxRetain)(H*,int);
static R (*cuCtxSetCurrent)(H); static R (*cuMemAlloc_v2)(DP*,size_t); static R (*cuMemFree_v2)(DP);
static R (*cuMemHostAlloc)(void**,size_t,unsigned); static R (*cuMemFreeHost)(void*);
static R (*cuMemHostGetDevicePointer_v2)(DP*,void*,unsigned);
static R (*cuModuleLoadData)(H*,const void*); static R (*cuModuleUnload)(H); static R (*cuModuleGetFunction)(H*,H,const char*);
static R (*cuLaunchKernel)(H,unsigned,unsigned,unsigned,unsigned,unsigned,unsigned,unsigned,H,void**,void**);
static R (*cuStreamCreate)(H*,unsigned); static R (*cuStreamDestroy_v2)(H); static R (*cuStreamSynchronize)(H);
static R (*cuStreamQuery)(H); static R (*cuMemcpyHtoDAsync_v2)(DP,const void*,size_t,H);
static R (*cuMemsetD8_v2)(DP,unsigned char,size_t); static R (*cuMemsetD8Async)(DP,unsigned char,size_t,H);
static R (*cuEventCreate)(H*,unsigned); static R (*cuEventDestroy_v2)(H); static R (*cuEventRecord)(H,H);
static R (*cuMemGetInfo_v2)(size_t*,size_t*);
#define L(f) do { *(void**)&f = dlsym(lib, #f); if (!f) { printf("no %s\n", #f); exit(1);} } while (0)
#define C(x) do { R r_ = (x); if (r_) { printf("%s = %d (line %d)\n", #x, r_, __LINE__); exit(1);} } while (0)

// Spins until the flag at [p] is nonzero; writes 1 to [p+8] once it runs.
static const char SPIN[] =
    ".version 7.0\n.target sm_75\n.address_size 64\n"
    ".visible .entry spin(.param .u64 p)\n{\n .reg .b64 %rd<3>;\n .reg .b32 %r<3>;\n .reg .pred %q;\n"
    " ld.param.u64 %rd1, [p];\n mov.u32 %r2, 1;\n st.volatile.global.u32 [%rd1+8], %r2;\n"
    "L: ld.volatile.global.u32 %r1, [%rd1];\n setp.eq.u32 %q, %r1, 0;\n @%q bra L;\n ret;\n}\n";
static const char EMPTY[] = ".version 7.0\n.target sm_75\n.address_size 64\n.visible .entry nothing()\n{\n ret;\n}\n";

static H ctx, spin_fn, spin_stream, copy_stream;
static volatile uint32_t *flag;
static DP flag_dev, dev_buf;
static void *host_buf;
static int hold_ms = 300;

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

static void *lift(void *arg) {
    (void)arg;
    usleep(hold_ms * 1000);
    __atomic_store_n(&flag[0], 1, __ATOMIC_RELEASE);
    return NULL;
}

static double copy_ms;
static void *copier(void *arg) {
    (void)arg;
    C(cuCtxSetCurrent(ctx));
    usleep(20 * 1000);
    double t = now();
    C(cuMemcpyHtoDAsync_v2(dev_buf, host_buf, 4096, copy_stream));
    copy_ms = (now() - t) * 1e3;
    return NULL;
}

// The calls timed, each with what it needs made before and undone after.
static DP d; static void *h; static H m, s, e;
static void pre_none(void) {}
static void pre_dev(void) { C(cuMemAlloc_v2(&d, 64 << 20)); }
static void pre_host(void) { C(cuMemHostAlloc(&h, 8 << 20, 0)); }
static void pre_mod(void) { C(cuModuleLoadData(&m, EMPTY)); }
static void pre_stream(void) { C(cuStreamCreate(&s, 1)); }
static void pre_event(void) { C(cuEventCreate(&e, 2)); }
static void c_alloc(void) { C(cuMemAlloc_v2(&d, 64 << 20)); }
static void c_free(void) { C(cuMemFree_v2(d)); }
static void c_host_alloc(void) { C(cuMemHostAlloc(&h, 8 << 20, 0)); }
static void c_free_host(void) { C(cuMemFreeHost(h)); }
static void c_load(void) { C(cuModuleLoadData(&m, EMPTY)); }
static void c_unload(void) { C(cuModuleUnload(m)); }
static void c_stream_create(void) { C(cuStreamCreate(&s, 1)); }
static void c_stream_destroy(void) { C(cuStreamDestroy_v2(s)); }
static void c_event_create(void) { C(cuEventCreate(&e, 2)); }
static void c_event_destroy(void) { C(cuEventDestroy_v2(e)); }
static void c_event_record(void) { C(cuEventRecord(e, copy_stream)); }
static void c_memset(void) { C(cuMemsetD8_v2(dev_buf, 0, 4096)); }
static void c_memset_async(void) { C(cuMemsetD8Async(dev_buf, 0, 4096, copy_stream)); C(cuStreamSynchronize(copy_stream)); }
static void c_mem_info(void) { size_t f, t; C(cuMemGetInfo_v2(&f, &t)); }
static void post_none(void) {}
static void post_dev(void) { C(cuMemFree_v2(d)); }
static void post_host(void) { C(cuMemFreeHost(h)); }
static void post_mod(void) { C(cuModuleUnload(m)); }
static void post_stream(void) { C(cuStreamDestroy_v2(s)); }
static void post_event(void) { C(cuEventDestroy_v2(e)); }

struct call { const char *name; void (*pre)(void), (*call)(void), (*post)(void); };
static const struct call CALLS[] = {
    {"cuMemAlloc_v2", pre_none, c_alloc, post_dev},
    {"cuMemFree_v2", pre_dev, c_free, post_none},
    {"cuMemHostAlloc", pre_none, c_host_alloc, post_host},
    {"cuMemFreeHost", pre_host, c_free_host, post_none},
    {"cuModuleLoadData", pre_none, c_load, post_mod},
    {"cuModuleUnload", pre_mod, c_unload, post_none},
    {"cuStreamCreate", pre_none, c_stream_create, post_stream},
    {"cuStreamDestroy_v2", pre_stream, c_stream_destroy, post_none},
    {"cuEventCreate", pre_none, c_event_create, post_event},
    {"cuEventDestroy_v2", pre_event, c_event_destroy, post_none},
    {"cuEventRecord", pre_event, c_event_record, post_event},
    {"cuMemsetD8_v2 (legacy stream)", pre_none, c_memset, post_none},
    {"cuMemsetD8Async + sync (own stream)", pre_none, c_memset_async, post_none},
    {"cuMemGetInfo_v2", pre_none, c_mem_info, post_none},
};

int main(int argc, char **argv) {
    if (argc > 1) hold_ms = atoi(argv[1]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    void *lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) { printf("dlopen: %s\n", dlerror()); return 1; }
    L(cuInit); L(cuDeviceGet); L(cuDevicePrimaryCtxRetain); L(cuCtxSetCurrent); L(cuMemAlloc_v2); L(cuMemFree_v2);
    L(cuMemHostAlloc); L(cuMemFreeHost); L(cuMemHostGetDevicePointer_v2); L(cuModuleLoadData); L(cuModuleUnload);
    L(cuModuleGetFunction); L(cuLaunchKernel); L(cuStreamCreate); L(cuStreamDestroy_v2); L(cuStreamSynchronize);
    L(cuStreamQuery); L(cuMemcpyHtoDAsync_v2); L(cuMemsetD8_v2); L(cuMemsetD8Async); L(cuEventCreate);
    L(cuEventDestroy_v2); L(cuEventRecord); L(cuMemGetInfo_v2);
    int dev;
    C(cuInit(0)); C(cuDeviceGet(&dev, 0)); C(cuDevicePrimaryCtxRetain(&ctx, dev)); C(cuCtxSetCurrent(ctx));
    H mod;
    C(cuModuleLoadData(&mod, SPIN)); C(cuModuleGetFunction(&spin_fn, mod, "spin"));
    C(cuStreamCreate(&spin_stream, 1)); C(cuStreamCreate(&copy_stream, 1));
    C(cuMemHostAlloc((void **)&flag, 4096, 0x02 /* DEVICEMAP */)); C(cuMemHostGetDevicePointer_v2(&flag_dev, (void *)flag, 0));
    C(cuMemHostAlloc(&host_buf, 4096, 0)); C(cuMemAlloc_v2(&dev_buf, 4096));
    printf("blocking-probe: a kernel spinning for %d ms on a non-blocking stream; each call on another thread\n", hold_ms);
    printf("%-38s %10s %10s  %s\n", "call", "call ms", "copy ms", "waits for the kernel");
    for (size_t i = 0; i < sizeof CALLS / sizeof CALLS[0]; i++) {
        const struct call *c = &CALLS[i];
        c->pre();
        memset((void *)flag, 0, 16);
        void *params[] = {&flag_dev};
        C(cuLaunchKernel(spin_fn, 1, 1, 1, 1, 1, 1, 0, spin_stream, params, NULL));
        while (!__atomic_load_n(&flag[2], __ATOMIC_ACQUIRE)) ; // running
        pthread_t lifter, third;
        pthread_create(&lifter, NULL, lift, NULL);
        pthread_create(&third, NULL, copier, NULL);
        double t = now();
        c->call();
        double ms = (now() - t) * 1e3;
        pthread_join(third, NULL);
        pthread_join(lifter, NULL);
        C(cuStreamSynchronize(spin_stream)); C(cuStreamSynchronize(copy_stream));
        c->post();
        const char *verdict = ms > hold_ms * 0.5 ? (copy_ms > hold_ms * 0.3 ? "yes, and the other thread's copy waited too" : "yes")
                                                 : copy_ms > hold_ms * 0.5 ? "no (but the copy waited?)" : "no";
        printf("%-38s %10.2f %10.2f  %s\n", c->name, ms, copy_ms, verdict);
    }
    return 0;
}
