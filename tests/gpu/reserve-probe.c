// Reserve probe, not part of nbd-vram: how soon the swap daemon can know
// that a GPU job took memory (--reserve). The device machine has no nbd
// driver, so the daemon cannot run there; this measures its trigger, in
// two processes on one GPU as in real use:
//   watcher  holds TIER_GIB of VRAM, as the daemon's slices do, and asks
//            cuMemGetInfo every POLL_MS (the daemon: once a second), and
//            notes when free memory first falls below RESERVE_GIB;
//   job      a co-tenant that, at a random phase, allocates JOB_GIB with
//            cuMemAlloc, notes when that returned, holds it and frees it.
// Prints per round the time from the job's allocation to the watcher's
// sight of it (CLOCK_MONOTONIC, shared by both processes), then the p50
// and max.
//   gcc -O2 -o target/probe/reserve-probe tests/gpu/reserve-probe.c -ldl
//   target/probe/reserve-probe TIER_GIB RESERVE_GIB JOB_GIB POLL_MS ROUNDS
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
typedef int R; typedef uint64_t DP; typedef void *H;
static R (*cuInit)(unsigned); static R (*cuDeviceGet)(int*,int); static R (*cuDevicePrimaryCtxRetain)(H*,int);
static R (*cuCtxSetCurrent)(H); static R (*cuMemAlloc_v2)(DP*,size_t); static R (*cuMemFree_v2)(DP);
static R (*cuMemGetInfo_v2)(size_t*,size_t*);
#define L(f) do { *(void**)&f = dlsym(lib, #f); if (!f) { printf("no %s\n", #f); exit(1);} } while (0)
#define C(x) do { R r_ = (x); if (r_) { printf("%s = %d (line %d)\n", #x, r_, __LINE__); exit(1);} } while (0)
#define GIB ((size_t)1 << 30)

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

static void open_gpu(void) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) { printf("dlopen: %s\n", dlerror()); exit(1); }
    L(cuInit); L(cuDeviceGet); L(cuDevicePrimaryCtxRetain); L(cuCtxSetCurrent); L(cuMemAlloc_v2); L(cuMemFree_v2); L(cuMemGetInfo_v2);
    int dev; H ctx;
    C(cuInit(0)); C(cuDeviceGet(&dev, 0)); C(cuDevicePrimaryCtxRetain(&ctx, dev)); C(cuCtxSetCurrent(ctx));
}

// What the two processes share: per round, when the job's allocation
// returned and when the watcher saw it; the watcher's readiness, and the
// rounds after which it saw the memory come back.
struct shared { volatile double took[64], seen[64]; volatile int ready, back; };

static int cmp(const void *a, const void *b) { double x = *(double *)a, y = *(double *)b; return (x > y) - (x < y); }

int main(int argc, char **argv) {
    if (argc != 6) { printf("usage: reserve-probe TIER_GIB RESERVE_GIB JOB_GIB POLL_MS ROUNDS\n"); return 2; }
    size_t tier = strtoull(argv[1], 0, 0) * GIB, reserve = strtoull(argv[2], 0, 0) * GIB, job = strtoull(argv[3], 0, 0) * GIB;
    int poll_ms = atoi(argv[4]), rounds = atoi(argv[5]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (rounds < 1 || rounds > 64) rounds = 64;
    struct shared *sh = mmap(0, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    pid_t watcher = fork();
    if (watcher == 0) {
        open_gpu();
        DP held; C(cuMemAlloc_v2(&held, tier));
        sh->ready = 1;
        for (int r = 0; r < rounds; r++) {
            size_t free, total;
            for (;;) { // wait for memory to go below the reserve
                C(cuMemGetInfo_v2(&free, &total));
                if (free < reserve) break;
                usleep(poll_ms * 1000);
            }
            sh->seen[r] = now();
            for (;;) { // and to come back before the next round
                C(cuMemGetInfo_v2(&free, &total));
                if (free >= reserve) break;
                usleep(poll_ms * 1000);
            }
            sh->back = r + 1;
        }
        C(cuMemFree_v2(held));
        _exit(0);
    }
    while (!sh->ready) usleep(1000);
    open_gpu();
    size_t free, total; C(cuMemGetInfo_v2(&free, &total));
    printf("reserve-probe: %.1f GiB free of %.1f with the tier's %zu GiB held; reserve %zu GiB, job %zu GiB, poll %d ms\n",
           free / (double)GIB, total / (double)GIB, tier / GIB, reserve / GIB, job / GIB, poll_ms);
    if (free < reserve || free - job >= reserve) { printf("reserve-probe: the job would not cross the reserve\n"); kill(watcher, 9); return 1; }
    srand(getpid());
    double gaps[64];
    for (int r = 0; r < rounds; r++) {
        usleep(500 * 1000 + rand() % (poll_ms * 1000 + 1)); // a random phase against the watcher's polls
        DP p; C(cuMemAlloc_v2(&p, job));
        sh->took[r] = now();
        while (sh->seen[r] == 0) usleep(1000);
        gaps[r] = (sh->seen[r] - sh->took[r]) * 1e3;
        printf("reserve-probe: round %d: seen %.1f ms after the job's cuMemAlloc returned\n", r, gaps[r]);
        C(cuMemFree_v2(p));
        while (sh->back < r + 1) usleep(1000); // the watcher must see it free first
    }
    waitpid(watcher, 0, 0);
    qsort(gaps, rounds, sizeof gaps[0], cmp);
    printf("reserve-probe: poll %d ms, %d rounds: p50 %.1f ms, max %.1f ms\n", poll_ms, rounds, gaps[rounds / 2], gaps[rounds - 1]);
    return 0;
}
