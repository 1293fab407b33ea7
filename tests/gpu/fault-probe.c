// Fault probe, not part of nbd-vram: whether a fault in one kernel ends a
// kernel that runs until told to end (as the mailbox kernel does) on
// another stream of the same context. The fake driver assumes it does
// (tests/fake_cuda/README.md: a sticky error ends every running mailbox
// kernel, whose job is then never done), and nbd-vram relies on such a
// job being reported failed, never done late over newer writes.
// A kernel spinning on a flag in mapped pinned memory is started on a
// non-blocking stream; once it runs, a kernel that stores to an address
// nothing maps runs on a second stream; then the flag is lifted, and the
// spinning kernel, were it still running, would write that it saw it.
// Prints one line per question, "yes" or "no", with the codes returned.
//   gcc -O2 -o target/probe/fault-probe tests/gpu/fault-probe.c -ldl
//   target/probe/fault-probe
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
typedef int R; typedef uint64_t DP; typedef void *H;
static R (*cuInit)(unsigned); static R (*cuDeviceGet)(int*,int); static R (*cuDevicePrimaryCtxRetain)(H*,int);
static R (*cuCtxSetCurrent)(H); static R (*cuMemHostAlloc)(void**,size_t,unsigned);
static R (*cuMemHostGetDevicePointer_v2)(DP*,void*,unsigned);
static R (*cuModuleLoadData)(H*,const void*); static R (*cuModuleGetFunction)(H*,H,const char*);
static R (*cuLaunchKernel)(H,unsigned,unsigned,unsigned,unsigned,unsigned,unsigned,unsigned,H,void**,void**);
static R (*cuStreamCreate)(H*,unsigned); static R (*cuStreamSynchronize)(H); static R (*cuStreamQuery)(H);
#define L(f) do { *(void**)&f = dlsym(lib, #f); if (!f) { printf("no %s\n", #f); exit(1);} } while (0)
#define C(x) do { R r_ = (x); if (r_) { printf("%s = %d (line %d)\n", #x, r_, __LINE__); exit(1);} } while (0)

// spin: writes 1 to [p+8] once it runs, spins until [p] is nonzero, then
// writes 1 to [p+12]. fault: stores to the address it is given.
static const char PTX[] =
    ".version 7.0\n.target sm_75\n.address_size 64\n"
    ".visible .entry spin(.param .u64 p)\n{\n .reg .b64 %rd<3>;\n .reg .b32 %r<3>;\n .reg .pred %q;\n"
    " ld.param.u64 %rd1, [p];\n mov.u32 %r2, 1;\n st.volatile.global.u32 [%rd1+8], %r2;\n"
    "L: ld.volatile.global.u32 %r1, [%rd1];\n setp.eq.u32 %q, %r1, 0;\n @%q bra L;\n"
    " st.volatile.global.u32 [%rd1+12], %r2;\n ret;\n}\n"
    ".visible .entry fault(.param .u64 a)\n{\n .reg .b64 %rd<2>;\n .reg .b32 %r<2>;\n"
    " ld.param.u64 %rd1, [a];\n mov.u32 %r1, 1;\n st.global.u32 [%rd1], %r1;\n ret;\n}\n";

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    alarm(30);   // a spinning kernel that nothing ends would hold the probe for ever
    void *lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) { printf("dlopen: %s\n", dlerror()); return 1; }
    L(cuInit); L(cuDeviceGet); L(cuDevicePrimaryCtxRetain); L(cuCtxSetCurrent); L(cuMemHostAlloc);
    L(cuMemHostGetDevicePointer_v2); L(cuModuleLoadData); L(cuModuleGetFunction); L(cuLaunchKernel);
    L(cuStreamCreate); L(cuStreamSynchronize); L(cuStreamQuery);
    int dev;
    H ctx, mod, spin, fault, spinning, faulting;
    C(cuInit(0)); C(cuDeviceGet(&dev, 0)); C(cuDevicePrimaryCtxRetain(&ctx, dev)); C(cuCtxSetCurrent(ctx));
    C(cuModuleLoadData(&mod, PTX));
    C(cuModuleGetFunction(&spin, mod, "spin")); C(cuModuleGetFunction(&fault, mod, "fault"));
    C(cuStreamCreate(&spinning, 1)); C(cuStreamCreate(&faulting, 1));
    volatile uint32_t *word;
    DP dword;
    C(cuMemHostAlloc((void **)&word, 4096, 0x2 /* DEVICEMAP */));
    C(cuMemHostGetDevicePointer_v2(&dword, (void *)word, 0));
    word[0] = word[2] = word[3] = 0;

    void *spin_args[] = {&dword};
    C(cuLaunchKernel(spin, 1, 1, 1, 1, 1, 1, 0, spinning, spin_args, NULL));
    double t = now();
    while (!word[2] && now() - t < 5) {}
    if (!word[2]) { printf("the spinning kernel did not start in 5 s\n"); return 1; }

    DP nowhere = 16;   // page 0: nothing maps it
    void *fault_args[] = {&nowhere};
    C(cuLaunchKernel(fault, 1, 1, 1, 1, 1, 1, 0, faulting, fault_args, NULL));
    t = now();
    while (cuStreamQuery(faulting) == 600 && now() - t < 5) {}
    if (cuStreamQuery(faulting) == 600) { printf("the faulting kernel did not run beside the spinning one in 5 s\n"); return 1; }
    R faulted = cuStreamSynchronize(faulting);
    printf("a store to an unmapped address faults its stream's sync: %s (it said %d)\n", faulted == 700 ? "yes" : "no", faulted);

    __atomic_store_n(&word[0], 1, __ATOMIC_RELEASE);
    t = now();
    while (!word[3] && now() - t < 0.5) {}
    printf("it ends the kernel spinning on another stream, which never sees the flag lifted after it: %s (%s)\n",
           word[3] ? "no" : "yes", word[3] ? "the kernel wrote that it saw the flag" : "nothing written in 500 ms");
    R queried = cuStreamQuery(spinning), synced = cuStreamSynchronize(spinning);
    printf("that kernel's stream reports the fault too: %s (query %d, sync %d)\n",
           queried == 700 && synced == 700 ? "yes" : "no", queried, synced);
    return 0;
}
