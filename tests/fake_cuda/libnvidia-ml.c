/* A fake NVML (libnvidia-ml.so.1) for nbd-vram's tests: only what
 * src/nvml.rs calls. The GPUs are those of the fake libcuda, found by the
 * PCI address it gives ("0000:01:00.0" for device 0). The compute list
 * holds the calling process and as many others as the number in
 * FAKE_NVML_OTHERS_FILE says (no file: none), read at every call; the
 * graphics list is empty. With FAKE_NVML_HOST_PIDS set, the caller is
 * listed under another PID, as NVML lists host PIDs in a container.
 * With FAKE_NVML_LOG set, each list call appends "list by THREAD" there,
 * THREAD the calling thread's name: serving threads must never call.
 * Tests put its directory on LD_LIBRARY_PATH. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/prctl.h>

#define API __attribute__((visibility("default")))
enum { OK = 0, UNINITIALIZED = 1, INVALID_ARGUMENT = 2, NOT_FOUND = 6, INSUFFICIENT_SIZE = 7 };
typedef struct { unsigned pid; unsigned long long used; unsigned gi, ci; } proc;

static int inits;

API int nvmlInit_v2(void) { inits++; return OK; }
API int nvmlShutdown(void) { if (!inits) return UNINITIALIZED; inits--; return OK; }

API const char *nvmlErrorString(int r)
{
    switch (r) {
    case OK: return "Success";
    case UNINITIALIZED: return "Uninitialized";
    case INVALID_ARGUMENT: return "Invalid Argument";
    case NOT_FOUND: return "Not Found";
    case INSUFFICIENT_SIZE: return "Insufficient Size";
    default: return "Unknown Error";
    }
}

API int nvmlDeviceGetHandleByPciBusId_v2(const char *bus, void **dev)
{
    unsigned n;
    char end;
    if (!inits) return UNINITIALIZED;
    if (!bus || !dev) return INVALID_ARGUMENT;
    if (sscanf(bus, "0000:%2x:00.0%c", &n, &end) != 1 || n == 0) return NOT_FOUND;
    *dev = (void *)(unsigned long)n;
    return OK;
}

static unsigned others(void)
{
    const char *path = getenv("FAKE_NVML_OTHERS_FILE");
    FILE *f = path ? fopen(path, "r") : NULL;
    unsigned n = 0;
    if (f) {
        if (fscanf(f, "%u", &n) != 1) n = 0;
        fclose(f);
    }
    return n;
}

static void log_caller(void)
{
    const char *path = getenv("FAKE_NVML_LOG");
    FILE *f = path ? fopen(path, "a") : NULL;
    char name[17] = "";
    if (!f) return;
    prctl(PR_GET_NAME, name);
    fprintf(f, "list by %s\n", name);
    fclose(f);
}
static int list(void *dev, unsigned *n, proc *p, unsigned want)
{
    log_caller();
    if (!inits) return UNINITIALIZED;
    if (!dev || !n || (*n && !p)) return INVALID_ARGUMENT;
    if (*n < want) { *n = want; return INSUFFICIENT_SIZE; }
    unsigned me = (unsigned)getpid() + (getenv("FAKE_NVML_HOST_PIDS") ? 1000000 : 0);
    for (unsigned i = 0; i < want; i++)
        p[i] = (proc){i ? 100000 + i : me, 512ull << 20, ~0u, ~0u};
    *n = want;
    return OK;
}

API int nvmlDeviceGetComputeRunningProcesses_v3(void *dev, unsigned *n, proc *p) { return list(dev, n, p, 1 + others()); }
API int nvmlDeviceGetGraphicsRunningProcesses_v3(void *dev, unsigned *n, proc *p) { return list(dev, n, p, 0); }
