// Probe, not part of nbd-vram: whether NVML (libnvidia-ml.so.1, shipped
// with the driver) can tell nbd-vram that another process computes on its
// GPU, including one that was there first, which free memory cannot tell;
// and what asking costs, since nbd-vram would ask from its serving loop.
// Prints the processes NVML lists on GPU 0 and the time per call.
//   gcc -O2 -o target/probe/nvml-probe tests/gpu/nvml-probe.c -ldl
//   target/probe/nvml-probe [CALLS]   (used by tests/gpu/cotenant.sh)
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
typedef struct { unsigned pid; unsigned long long used; unsigned gi, ci; } Proc;
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec / 1e3; }
static int cmp(const void *a, const void *b) { double x = *(const double*)a, y = *(const double*)b; return x < y ? -1 : x > y; }
int main(int argc, char **argv) {
	int calls = argc > 1 ? atoi(argv[1]) : 200;
	void *lib = dlopen("libnvidia-ml.so.1", RTLD_NOW);
	if (!lib) { printf("nvml-probe: dlopen: %s\n", dlerror()); return 1; }
	int (*init)(void) = dlsym(lib, "nvmlInit_v2");
	int (*handle)(unsigned, void**) = dlsym(lib, "nvmlDeviceGetHandleByIndex_v2");
	int (*procs)(void*, unsigned*, Proc*) = dlsym(lib, "nvmlDeviceGetComputeRunningProcesses_v3");
	if (!init || !handle || !procs) { printf("nvml-probe: missing symbols\n"); return 1; }
	void *h; int r;
	double t0 = now();
	if ((r = init())) { printf("nvml-probe: nvmlInit = %d\n", r); return 1; }
	printf("nvml-probe: nvmlInit took %.0f us\n", now() - t0);
	if ((r = handle(0, &h))) { printf("nvml-probe: handle = %d\n", r); return 1; }
	Proc p[64]; unsigned n = 64;
	double *lat = calloc(calls, sizeof *lat);
	for (int i = 0; i < calls; i++) {
		n = 64; double t = now();
		r = procs(h, &n, p);
		lat[i] = now() - t;
		if (r) { printf("nvml-probe: processes = %d\n", r); return 1; }
	}
	printf("nvml-probe: %u compute processes (we are %d):", n, getpid());
	for (unsigned i = 0; i < n; i++) printf(" pid %u (%llu MiB)", p[i].pid, p[i].used >> 20);
	qsort(lat, calls, sizeof *lat, cmp);
	printf("\nnvml-probe: per call p50 %.1f us, p99 %.1f us, max %.1f us over %d calls\n", lat[calls / 2], lat[calls * 99 / 100], lat[calls - 1], calls);
	n = 0; double t = now(); r = procs(h, &n, NULL);
	printf("nvml-probe: count-only call: %d (%u processes) in %.1f us\n", r, n, now() - t);
	return 0;
}
