/* A fake CUDA driver (libcuda.so.1) for testing nbd-vram without a GPU.
 *
 * It exports the 30 driver entry points nbd-vram needs and the seven it uses
 * where present (cuMemcpyBatchAsync_v2, the copy and mailbox kernels' module
 * and launch calls, cuStreamQuery, cuDeviceGetAttribute), with the real ABI,
 * and backs "device memory" with
 * ordinary memory of this process, so a CUdeviceptr is a real address here.
 * The current context is per thread, as in CUDA (a table of thread ids, not
 * thread-local storage): a thread that never made one current gets
 * CUDA_ERROR_INVALID_CONTEXT. Async copies and memsets are deferred to a
 * queue per stream that runs at the latest legal moment (a sync of that
 * stream, an event recorded on it, a synchronous copy, a free), so a caller
 * that skips a sync, or waits for one stream where its data went through
 * another, sees stale data. The mailbox kernel runs on threads of its own,
 * started by cuInit as the driver starts its threads, and does whatever its
 * PTX's memory ordering allows, at the worst moment. Behaviour is tuned by FAKE_CUDA_* variables read
 * once, at the first cuInit(0); see README.md beside this file.
 * Build: cc -shared -fPIC -O2 -Wall -Wextra -o DIR/libcuda.so.1 libcuda.c
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <errno.h>
#include <time.h>
#include <unistd.h>

#define API __attribute__((visibility("default")))

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st *CUcontext;
typedef struct CUstream_st *CUstream;
typedef struct CUevent_st *CUevent;

enum {
    OK = 0, E_VALUE = 1, E_OOM = 2, E_NOT_INIT = 3, E_NO_DEVICE = 100,
    E_DEVICE = 101, E_CONTEXT = 201, E_HANDLE = 400, E_ILLEGAL = 700,
    E_UNKNOWN = 999,
};

/* Names and texts exactly as the real cuGetErrorName/cuGetErrorString. */
static const struct { CUresult code; const char *name, *text; } errors[] = {
    {0, "CUDA_SUCCESS", "no error"},
    {1, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {3, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {4, "CUDA_ERROR_DEINITIALIZED", "driver shutting down"},
    {34, "CUDA_ERROR_STUB_LIBRARY", "CUDA driver is a stub library"},
    {100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {101, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {201, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {400, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {500, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {700, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {716, "CUDA_ERROR_MISALIGNED_ADDRESS", "misaligned address"},
    {803, "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
     "system has unsupported display driver / cuda driver combination"},
    {804, "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
     "forward compatibility was attempted on non supported HW"},
    {218, "CUDA_ERROR_INVALID_PTX", "a PTX JIT compilation failed"},
    {600, "CUDA_ERROR_NOT_READY", "device not ready"},
    {221, "CUDA_ERROR_JIT_COMPILER_NOT_FOUND", "PTX JIT compiler library not found"},
    {999, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

#define MIB (1ULL << 20)
#define PAGE 4096ULL
#define MAX_DEVICES 16

struct CUctx_st { int dev, refs; };        /* a device's primary context */
/* Async work waiting to run: a copy or memset, or a wait for another
 * queue's ops below `n` (WAIT, `host` that queue). A queue holds one
 * stream's, in order: op number seq (counted from 0) lives in
 * ops[seq % QCAP]; [done, queued) are pending. */
enum copy_kind { H2D, D2H, SET, WAIT, FAULT };
struct op { enum copy_kind kind; unsigned char val; char *dev; void *host; size_t n; };
#define QCAP 4096
/* busy_told: `queued` when a query last looked at pending work; turns:
 * how often it did (every other time, it said the work still runs). */
struct queue { struct op *ops; unsigned long long done, queued, busy_told; unsigned turns; };
/* The mailbox kernel resident on a stream, if any (see "The SMs" below):
 * `last` is the sequence it took last; `on_sm` while an SM thread runs it;
 * `started` once it may write `alive` (FAKE_CUDA_LATE_START: at the first
 * query or sync); `acquire`, `release`, `fresh`: what its PTX promises;
 * `own`: its stream's queue, whose work is ordered with it. */
struct mailbox {
    unsigned char *slot, *landing;
    struct queue *own;
    unsigned long long base;
    unsigned last;
    int running, on_sm, started, acquire, release, fresh;
    pthread_t owner;   /* the thread that launched it, which alone tells it to end */
};
/* flags & 1: CU_STREAM_NON_BLOCKING; q: its pending work, ops allocated at
 * cuStreamCreate (and faulted in then). */
struct CUstream_st { int dev; unsigned flags; struct mailbox mb; struct queue q; struct CUstream_st *next; };
/* The queue and position recorded (q NULL: never recorded, or its stream
 * is gone and its work has run: syncs at once). */
struct CUevent_st { int dev; struct queue *q; unsigned long long seq; struct CUevent_st *next; };
struct block { char *p; size_t size; int dev; struct block *next; };

static struct device {
    size_t total, free;   /* bytes; "free" also counts FAKE_CUDA_FREE_MIB's phantom use */
    char *base;           /* backing mode: this device's slice of the mapping */
    char *space;          /* else: address space reserved for its allocations */
    struct CUctx_st ctx;
} devs[MAX_DEVICES];

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static CUresult init_rc = -1;             /* -1: cuInit(0) not called yet */
static int ndev;
static size_t max_alloc = SIZE_MAX;

/* Gives a freed block's pages back, its addresses staying reserved. */
static void unmap_block(char *p, size_t size)
{
    if (mmap(p, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0) == MAP_FAILED) {
        fprintf(stderr, "fake libcuda: cannot give back %zu bytes at %p: %s\n", size, (void *)p, strerror(errno));
        abort();
    }
}
static unsigned long long fail_copy, copies, fail_sync, syncs, no_jit, exec_timeout, fail_mailbox, mailbox_jobs, late_start;
static unsigned long long sms = 132, stall_job, jobs_seen, stream_delay_ms, fail_record, records, late_jobs = 8;
static int short_sync;                    /* FAKE_CUDA_FAIL_RECORD: the next stream sync fails too */
static CUresult sticky;                   /* FAKE_CUDA_FAIL_SYNC's error, once it fired */
static char log_path[PATH_MAX], others_path[PATH_MAX];
static struct block *allocs;              /* device memory, sorted by address */
static struct block *host_allocs;         /* cuMemHostAlloc memory */
static struct CUstream_st *streams;
static struct CUevent_st *events;
/* As in CUDA, the current context is per thread: {thread id, context} for
 * each thread that made one current, here under the lock. Not a __thread
 * variable: a dlopen'ed library's thread-local storage is malloc'ed at its
 * first use in each thread, which a swap server under memory pressure may
 * wait on for ever. An exited thread's entry stays until its id is reused
 * (the new thread then inherits it) or the table is full (then entries of
 * threads that are gone are taken back). */
#define THREADS 256
static struct { pid_t tid; struct CUctx_st *ctx; } bound[THREADS];

static pid_t my_tid(void) { return (pid_t)syscall(SYS_gettid); }

/* The calling thread's current context, or NULL. Lock held. */
static struct CUctx_st *cur(void)
{
    pid_t t = my_tid();
    for (int i = 0; i < THREADS; i++)
        if (bound[i].tid == t) return bound[i].ctx;
    return NULL;
}

/* Lock held, as for every logf_ line it goes into. */
static const char *short_name(CUresult rc)
{
    static char buf[16];
    if (rc == OK) return "ok";
    for (size_t i = 0; i < sizeof errors / sizeof *errors; i++)
        if (errors[i].code == rc) return errors[i].name + strlen("CUDA_ERROR_");
    snprintf(buf, sizeof buf, "%d", rc);
    return buf;
}

/* One line to FAKE_CUDA_LOG, opened per line with O_APPEND. Lock held. */
__attribute__((format(printf, 1, 2))) static void logf_(const char *fmt, ...)
{
    char line[256];
    va_list ap;
    if (!log_path[0]) return;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof line - 2) n = sizeof line - 2;
    line[n++] = '\n';
    int fd = open(log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return;
    if (write(fd, line, n) != n) { /* nothing sensible to do */ }
    close(fd);
}

/* Reads an unsigned knob; 0 if unset (keeps *out), 1 if set, -1 if bad. */
static int knob(const char *name, unsigned long long *out)
{
    const char *s = getenv(name);
    char *end;
    if (!s || !*s) return 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (*end || *s == '-') {
        fprintf(stderr, "fake libcuda: bad %s=%s\n", name, s);
        return -1;
    }
    *out = v;
    return 1;
}

static int knob_mib(const char *name, size_t *out)
{
    unsigned long long v;
    int r = knob(name, &v);
    if (r == 1 && v > SIZE_MAX / MIB) { fprintf(stderr, "fake libcuda: %s too big\n", name); r = -1; }
    if (r == 1) *out = v * MIB;
    return r;
}

static unsigned long sysfs_hex(const char *dir, const char *dev, const char *file)
{
    char path[PATH_MAX], buf[32] = "";
    snprintf(path, sizeof path, "%s/%s/%s", dir, dev, file);
    FILE *f = fopen(path, "re");
    if (!f) return 0;
    if (!fgets(buf, sizeof buf, f)) buf[0] = 0;
    fclose(f);
    return strtoul(buf, NULL, 16);
}

/* Finds the ivshmem-plain device (1af4:1110), enables it, returns the path
 * of its BAR 2 (the shared memory). FAKE_CUDA_PCI_DIR overrides the sysfs
 * directory, for tests of this scan. */
static int find_ivshmem(char *out, size_t len)
{
    const char *dir = getenv("FAKE_CUDA_PCI_DIR");
    if (!dir || !*dir) dir = "/sys/bus/pci/devices";
    DIR *d = opendir(dir);
    struct dirent *e;
    int found = -1;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.' || sysfs_hex(dir, e->d_name, "vendor") != 0x1af4 ||
            sysfs_hex(dir, e->d_name, "device") != 0x1110)
            continue;
        snprintf(out, len, "%s/%s/enable", dir, e->d_name);
        int fd = open(out, O_WRONLY | O_CLOEXEC);
        if (fd >= 0) { if (write(fd, "1", 1) != 1) { /* may be enabled already */ } close(fd); }
        snprintf(out, len, "%s/%s/resource2", dir, e->d_name);
        found = 0;
        break;
    }
    if (d) closedir(d);
    return found;
}

/* Maps FAKE_CUDA_BACKING; 0 ok, else the cuInit error. */
static CUresult map_backing(const char *what, char **base, size_t *size)
{
    char path[PATH_MAX];
    struct stat st;
    if (!strcmp(what, "ivshmem")) {
        if (find_ivshmem(path, sizeof path)) {
            fprintf(stderr, "fake libcuda: no ivshmem PCI device (1af4:1110)\n");
            return E_NO_DEVICE;
        }
    } else {
        snprintf(path, sizeof path, "%s", what);
    }
    int fd = open(path, O_RDWR | O_CLOEXEC);
    /* fstat, not lseek: a sysfs resource file gives the BAR size in st_size */
    if (fd < 0 || fstat(fd, &st) || st.st_size < (off_t)PAGE) {
        fprintf(stderr, "fake libcuda: cannot use backing %s\n", path);
        if (fd >= 0) close(fd);
        return E_UNKNOWN;
    }
    *size = (size_t)st.st_size;
    *base = mmap(NULL, *size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);   /* the mapping outlives the descriptor, and the process */
    if (*base == MAP_FAILED) {
        fprintf(stderr, "fake libcuda: cannot map backing %s\n", path);
        return E_UNKNOWN;
    }
    return OK;
}

static int start_sms(void);
static CUresult do_init(void)
{
    unsigned long long v = 1;
    size_t total = 16384 * MIB, free = 0, bsize = 0;
    char *base = NULL;
    const char *backing = getenv("FAKE_CUDA_BACKING");
    int r;

    if ((r = knob("FAKE_CUDA_INIT_ERROR", &v)) == 1 && v != 0) return (CUresult)v;
    if (r < 0) return E_UNKNOWN;
    v = 1;
    if (knob("FAKE_CUDA_DEVICES", &v) < 0 || v > MAX_DEVICES) return E_UNKNOWN;
    if (v == 0) return E_NO_DEVICE;
    ndev = (int)v;
    int total_set = knob_mib("FAKE_CUDA_TOTAL_MIB", &total);
    int free_set = knob_mib("FAKE_CUDA_FREE_MIB", &free);
    if (total_set < 0 || free_set < 0 || knob_mib("FAKE_CUDA_MAX_ALLOC_MIB", &max_alloc) < 0 ||
        knob("FAKE_CUDA_FAIL_COPY", &fail_copy) < 0 || knob("FAKE_CUDA_FAIL_SYNC", &fail_sync) < 0 ||
        knob("FAKE_CUDA_NO_JIT", &no_jit) < 0 || knob("FAKE_CUDA_EXEC_TIMEOUT", &exec_timeout) < 0 ||
        knob("FAKE_CUDA_FAIL_MAILBOX", &fail_mailbox) < 0 || knob("FAKE_CUDA_LATE_START", &late_start) < 0 ||
        knob("FAKE_CUDA_SMS", &sms) < 0 || knob("FAKE_CUDA_MAILBOX_STALL", &stall_job) < 0 ||
        knob("FAKE_CUDA_LATE_JOBS", &late_jobs) < 0 ||
        knob("FAKE_CUDA_STREAM_DELAY_MS", &stream_delay_ms) < 0 || knob("FAKE_CUDA_FAIL_RECORD", &fail_record) < 0)
        return E_UNKNOWN;
    if (backing && *backing) {
        CUresult rc = map_backing(backing, &base, &bsize);
        if (rc) return rc;
        /* each device gets an equal page-aligned slice of the one mapping */
        bsize = bsize / ndev / PAGE * PAGE;
        if (!total_set || total > bsize) total = bsize;
    }
    if (start_sms()) return E_UNKNOWN;
    for (int i = 0; i < ndev; i++) {
        devs[i].total = total;
        devs[i].free = free_set && free < total ? free : total;
        devs[i].base = base ? base + (size_t)i * bsize : NULL;
        devs[i].ctx.dev = i;
    }
    return OK;
}

API CUresult cuInit(unsigned flags)
{
    pthread_mutex_lock(&lock);
    if (!log_path[0] && getenv("FAKE_CUDA_LOG"))
        snprintf(log_path, sizeof log_path, "%s", getenv("FAKE_CUDA_LOG"));
    if (!others_path[0] && getenv("FAKE_CUDA_OTHERS_FILE"))
        snprintf(others_path, sizeof others_path, "%s", getenv("FAKE_CUDA_OTHERS_FILE"));
    CUresult rc = E_VALUE;   /* CUDA defines no flags: anything else is invalid */
    if (flags == 0) {
        if (init_rc < 0) init_rc = do_init();   /* like CUDA, the outcome sticks */
        rc = init_rc;
    }
    logf_("init -> %s", short_name(rc));
    pthread_mutex_unlock(&lock);
    return rc;
}

API CUresult cuDriverGetVersion(int *v)
{
    if (!v) return E_VALUE;
    *v = 12040;   /* CUDA 12.4 */
    return OK;
}

/* Every call below takes the lock and starts with one of these. */
static CUresult need_init(void) { return init_rc == OK ? OK : E_NOT_INIT; }
static CUresult need_dev(CUdevice d) { return need_init() ? E_NOT_INIT : d < 0 || d >= ndev ? E_DEVICE : OK; }
/* Frees use ctx_ok, so a process can clean up after a sticky error; every
 * other call that needs a context uses need_ctx, which reports it. */
static CUresult ctx_ok(void)
{
    if (need_init()) return E_NOT_INIT;
    struct CUctx_st *c = cur();
    return c && c->refs > 0 ? OK : E_CONTEXT;
}
static CUresult need_ctx(void) { CUresult rc = ctx_ok(); return rc ? rc : sticky; }
static void held_back(const char *call);
#define LOCKED(expr) do { pthread_mutex_lock(&lock); held_back(__func__); CUresult rc_ = (expr); \
                          pthread_mutex_unlock(&lock); return rc_; } while (0)

/* The pending async work: a queue per stream (struct queue, above), and
 * one for the legacy streams (NULL, CU_STREAM_LEGACY, CU_STREAM_PER_THREAD).
 * CUDA may run async work at any moment before the sync that waits for it;
 * running it as late as allowed makes a caller that reads a host buffer
 * before its sync, reuses one before its copy ran, or waits for one stream
 * where the work it needs went through another, see the damage. A stream's
 * sync or event runs that stream's work (and, after a non-blocking
 * stream's, the legacy stream's pending work: run_unordered), no other
 * stream's. An event records its queue and `queued` there. */
static struct op legacy_ops[QCAP];
static struct queue legacy = {legacy_ops, 0, 0, 0, 0};

static void run_until(struct queue *q, unsigned long long seq);
static void run_op(const struct op *o)
{
    if (o->kind == FAULT) sticky = E_ILLEGAL;        /* a kernel touched memory the GPU cannot reach */
    else if (o->kind == WAIT) run_until(o->host, o->n);   /* its queue's ops first */
    else if (o->kind == H2D) memcpy(o->dev, o->host, o->n);
    else if (o->kind == D2H) memcpy(o->host, o->dev, o->n);
    else memset(o->dev, o->val, o->n);
}

/* Runs q's pending ops numbered below seq, oldest first. */
static void run_until(struct queue *q, unsigned long long seq)
{
    for (; q->done < seq && q->done < q->queued; q->done++) run_op(&q->ops[q->done % QCAP]);
}
static void drain_queue(struct queue *q) { run_until(q, q->queued); }

/* The legacy stream's implicit sync: its work waits for the earlier work of
 * every blocking stream (created without CU_STREAM_NON_BLOCKING), theirs
 * for its. Running the earlier side's work when the later is queued keeps
 * that order (and one side at most with work pending). */
static void drain_blocking(void)
{
    for (struct CUstream_st *t = streams; t; t = t->next)
        if (!(t->flags & 1)) drain_queue(&t->q);
}

/* Every stream's work: what a synchronous copy or a free waits for here. */
static void drain(void)
{
    drain_queue(&legacy);
    for (struct CUstream_st *t = streams; t; t = t->next) drain_queue(&t->q);
}

/* The queue of a valid stream handle. */
static struct queue *queue_of(CUstream s) { return (uintptr_t)s <= 2 ? &legacy : &s->q; }

static void enqueue(CUstream s, const struct op *o)
{
    struct queue *q = queue_of(s);
    if (q == &legacy) drain_blocking();
    else if (!(s->flags & 1)) drain_queue(&legacy);
    if (q->queued - q->done == QCAP) run_until(q, q->done + 1);   /* full: the oldest makes room */
    q->ops[q->queued++ % QCAP] = *o;
}

/* Runs q's ops below seq. Work on a non-blocking stream is ordered with
 * none of the legacy stream's: legacy work still pending (a device
 * memset, say) runs after any that ran, the order that shows a caller who
 * needed it first. */
static void run_unordered(struct queue *q, unsigned long long seq)
{
    unsigned long long before = q->done;
    run_until(q, seq);
    for (struct CUstream_st *t = streams; t; t = t->next)
        if (&t->q == q && (t->flags & 1) && q->done > before) drain_queue(&legacy);
}

/* A sync call that passed its checks, waiting for q's ops below seq (q
 * NULL: none). FAKE_CUDA_FAIL_SYNC: as when a kernel faults, the pending
 * work of every stream is lost and the context is poisoned until it is
 * destroyed. */
static CUresult sync_to(struct queue *q, unsigned long long seq)
{
    if (++syncs == fail_sync) {
        legacy.done = legacy.queued;
        for (struct CUstream_st *t = streams; t; t = t->next) t->q.done = t->q.queued;
        sticky = E_ILLEGAL;
        return E_ILLEGAL;
    }
    if (q) run_unordered(q, seq);
    return sticky;   /* a fault among the work run */
}

/* A stream about to be freed, its work and every other stream's run:
 * events recorded on it are complete, and no wait for it is pending. */
static void forget_stream(struct CUstream_st *s)
{
    for (struct CUevent_st *e = events; e; e = e->next)
        if (e->q == &s->q) e->q = NULL;
}

static CUresult device_get(CUdevice *d, int ordinal)
{
    CUresult rc = need_init() ? E_NOT_INIT : !d ? E_VALUE : need_dev(ordinal);
    if (!rc) *d = ordinal;
    return rc;
}
API CUresult cuDeviceGet(CUdevice *d, int ordinal) { LOCKED(device_get(d, ordinal)); }

static CUresult device_count(int *n)
{
    CUresult rc = need_init() ? E_NOT_INIT : !n ? E_VALUE : OK;
    if (!rc) *n = ndev;
    return rc;
}
API CUresult cuDeviceGetCount(int *n) { LOCKED(device_count(n)); }

static CUresult device_name(char *name, int len, CUdevice d)
{
    CUresult rc = need_init() ? E_NOT_INIT : !name || len <= 0 ? E_VALUE : need_dev(d);
    if (!rc) snprintf(name, (size_t)len, "Fake GPU %d (nbd-vram test)", d);
    return rc;
}
API CUresult cuDeviceGetName(char *name, int len, CUdevice d) { LOCKED(device_name(name, len, d)); }

static CUresult total_mem(size_t *bytes, CUdevice d)
{
    CUresult rc = need_init() ? E_NOT_INIT : !bytes ? E_VALUE : need_dev(d);
    if (!rc) *bytes = devs[d].total;
    return rc;
}
API CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice d) { LOCKED(total_mem(bytes, d)); }

static CUresult ctx_retain(CUcontext *ctx, CUdevice d)
{
    CUresult rc = need_init() ? E_NOT_INIT : !ctx ? E_VALUE : need_dev(d);
    if (!rc) { devs[d].ctx.refs++; *ctx = &devs[d].ctx; }
    return rc;
}
API CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice d) { LOCKED(ctx_retain(ctx, d)); }

/* The last release destroys the primary context; like CUDA, that frees the
 * memory, streams and events made in it, once the pending work has run. The
 * log line says what was still live. */
static void no_resident_kernel(const char *call);
static CUresult ctx_release(CUdevice d)
{
    CUresult rc = need_dev(d);
    if (!rc && devs[d].ctx.refs == 0) rc = E_CONTEXT;
    if (rc) { logf_("release %d -> %s", d, short_name(rc)); return rc; }
    size_t leaked = 0, leaked_host = 0;
    if (--devs[d].ctx.refs == 0) {
        no_resident_kernel("destroying the context");
        drain();
        for (struct block **pp = &allocs, *b; (b = *pp);) {
            if (b->dev != d) { pp = &b->next; continue; }
            leaked += b->size;
            devs[d].free += b->size;
            if (!devs[d].base) unmap_block(b->p, b->size);
            *pp = b->next;
            free(b);
        }
        for (struct block **pp = &host_allocs, *b; (b = *pp);) {
            if (b->dev != d) { pp = &b->next; continue; }
            leaked_host += b->size;
            munmap(b->p, b->size);
            *pp = b->next;
            free(b);
        }
        for (struct CUstream_st **pp = &streams, *s; (s = *pp);) {
            if (s->dev != d) { pp = &s->next; continue; }
            forget_stream(s);
            *pp = s->next;
            free(s->q.ops);
            free(s);
        }
        for (struct CUevent_st **pp = &events, *e; (e = *pp);) {
            if (e->dev != d) { pp = &e->next; continue; }
            *pp = e->next;
            free(e);
        }
        /* a fresh context has no sticky error; the fake keeps one for all
         * contexts, so it lasts until none is left */
        int live = 0;
        for (int i = 0; i < ndev; i++) live |= devs[i].ctx.refs > 0;
        if (!live) sticky = OK;
    }
    char extra[64] = "";
    if (leaked || leaked_host) snprintf(extra, sizeof extra, " leaked=%zu leaked_host=%zu", leaked, leaked_host);
    logf_("release %d -> ok refs=%d%s", d, devs[d].ctx.refs, extra);
    return OK;
}
API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) { LOCKED(ctx_release(d)); }

/* A full table: takes back the entries of threads that are gone; the
 * first one freed, or -1. */
static int reclaim_bound(void)
{
    int first = -1, saved = errno;
    for (int i = 0; i < THREADS; i++)
        if (bound[i].tid && syscall(SYS_tgkill, getpid(), bound[i].tid, 0) < 0 && errno == ESRCH) {
            bound[i].tid = 0;
            bound[i].ctx = NULL;
            if (first < 0) first = i;
        }
    errno = saved;
    return first;
}

/* Binds ctx to the calling thread only; NULL unbinds, as in CUDA. */
static CUresult ctx_set(CUcontext ctx)
{
    if (need_init()) return E_NOT_INIT;
    if (ctx) {   /* must be one of ours, and not destroyed */
        int i = 0;
        while (i < ndev && ctx != &devs[i].ctx) i++;
        if (i == ndev || ctx->refs == 0) return E_CONTEXT;
    }
    pid_t t = my_tid();
    int at = -1, empty = -1;
    for (int i = 0; i < THREADS && at < 0; i++) {
        if (bound[i].tid == t) at = i;
        else if (!bound[i].tid && empty < 0) empty = i;
    }
    if (!ctx) {
        if (at >= 0) { bound[at].tid = 0; bound[at].ctx = NULL; }
        return OK;
    }
    if (at < 0) at = empty >= 0 ? empty : reclaim_bound();
    if (at < 0) {
        fprintf(stderr, "fake libcuda: cuCtxSetCurrent: %d live threads have a current context already; "
                        "the fake has no room for more\n", THREADS);
        return E_UNKNOWN;
    }
    bound[at].tid = t;
    bound[at].ctx = ctx;
    return OK;
}
API CUresult cuCtxSetCurrent(CUcontext ctx) { LOCKED(ctx_set(ctx)); }

/* MiB that other processes hold: the number in FAKE_CUDA_OTHERS_FILE,
 * read at each call, so that a test can come and go as another process. */
static size_t others(void)
{
    FILE *f = others_path[0] ? fopen(others_path, "r") : NULL;
    unsigned long mib = 0;
    if (f) { if (fscanf(f, "%lu", &mib) != 1) mib = 0; fclose(f); }
    return (size_t)mib << 20;
}

static CUresult mem_info(size_t *free, size_t *total)
{
    CUresult rc = need_ctx() ? need_ctx() : !free || !total ? E_VALUE : OK;
    if (!rc) {
        size_t held = others(), left = devs[cur()->dev].free;
        *free = held < left ? left - held : 0;
        *total = devs[cur()->dev].total;
    }
    return rc;
}
API CUresult cuMemGetInfo_v2(size_t *free, size_t *total) { LOCKED(mem_info(free, total)); }

/* Backing mode: first fit, page-aligned, in the gaps between the live
 * blocks of this device's slice (freed space is reused; no fragmentation
 * handling beyond that). Returns where to link the new block, or NULL. */
static struct block **place(char *base, size_t total, size_t size, char **out)
{
    char *at = base, *end = base + total;
    size_t need = (size + PAGE - 1) / PAGE * PAGE;
    struct block **pp = &allocs;
    for (; *pp && (*pp)->p < end; pp = &(*pp)->next) {
        if ((*pp)->p < base) continue;
        if ((size_t)((*pp)->p - at) >= need) break;
        at = (*pp)->p + ((*pp)->size + PAGE - 1) / PAGE * PAGE;
    }
    if (need < size || (size_t)(end - at) < need) return NULL;
    *out = at;
    return pp;
}

static CUresult mem_alloc(CUdeviceptr *dptr, size_t size)
{
    CUresult rc = need_ctx() ? need_ctx() : !dptr || size == 0 ? E_VALUE : OK;
    struct device *dv = rc ? NULL : &devs[cur()->dev];
    struct block **pp = NULL, *b = NULL;
    char *p = NULL;
    /* free is exact bytes; CUDA would round up to its page size */
    if (!rc && (size > dv->free || size > max_alloc)) rc = E_OOM;
    /* A driver hands out allocations end to end: a copy that runs on from
     * one into the next must fail here (check_copy) as it may there, so
     * without a backing file they are placed the same way, in address
     * space reserved up front. */
    if (!rc && !dv->base && !dv->space) {
        dv->space = mmap(NULL, dv->total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (dv->space == MAP_FAILED) dv->space = NULL;
    }
    char *area = rc ? NULL : dv->base ? dv->base : dv->space;
    if (!rc && (!area || !(pp = place(area, dv->total, size, &p)))) rc = E_OOM;
    if (!rc && !dv->base &&
        mmap(p, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0) == MAP_FAILED) {
        unmap_block(p, size);   /* the reservation, whole again */
        rc = E_OOM;
    }
    if (!rc && !(b = malloc(sizeof *b))) {
        if (!dv->base) unmap_block(p, size);
        rc = E_OOM;
    }
    if (!rc) {
        *b = (struct block){p, size, cur()->dev, *pp};
        *pp = b;
        dv->free -= size;
        *dptr = (CUdeviceptr)(uintptr_t)p;
    }
    logf_("alloc %zu -> %s", size, short_name(rc));
    return rc;
}
API CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t size) { LOCKED(mem_alloc(dptr, size)); }

/* Calls that wait for every kernel to end (tests/gpu/blocking-probe.c:
 * cuMemFree, cuMemFreeHost, cuModuleLoadData, cuModuleUnload; and the
 * context's destruction, not measured) hold every other thread's calls
 * until they return: the first three do on a GPU, and the fake is as
 * strict with the others. A mailbox kernel ends once it takes the end
 * posted to it; one not told to end never does (the fake stops the test
 * instead), nor does one whose launching thread, the only one that tells
 * it, makes a call meanwhile: that call waits behind the one that waits
 * for its kernel. */
static const char *waiting_call;   /* such a call, waiting, or NULL */
static pthread_t waiting_thread;
static pthread_cond_t waited = PTHREAD_COND_INITIALIZER;
static int resident_ends(struct CUstream_st *s);
static void no_resident_kernel(const char *call)
{
    waiting_call = call;
    waiting_thread = pthread_self();
    for (struct CUstream_st *s = streams; s; s = s->next)
        if (!resident_ends(s)) {
            fprintf(stderr, "fake libcuda: %s while nbd_vram_mailbox runs would wait for ever\n", call);
            abort();
        }
    waiting_call = NULL;
    pthread_cond_broadcast(&waited);
}

/* The job posted to m is its end, not taken yet. */
static int told_to_end(const struct mailbox *m)
{
    unsigned long long word = __atomic_load_n((unsigned long long *)m->slot, __ATOMIC_ACQUIRE);
    return (unsigned)(word & 0xff) != m->last && (word >> 9 & 0x3fff) == 0;
}

/* Every API call starts here (lock held): it waits while another thread's
 * call waits for every kernel. */
static void held_back(const char *call)
{
    while (waiting_call && !pthread_equal(waiting_thread, pthread_self())) {
        for (struct CUstream_st *s = streams; s; s = s->next)
            if (s->mb.running && pthread_equal(s->mb.owner, pthread_self()) && !told_to_end(&s->mb)) {
                fprintf(stderr, "fake libcuda: %s waits behind %s, which waits for this thread's "
                        "nbd_vram_mailbox to end: both would wait for ever\n", call, waiting_call);
                abort();
            }
        pthread_cond_wait(&waited, &lock);
    }
}

static CUresult mem_free(CUdeviceptr dptr)
{
    no_resident_kernel("cuMemFree");
    CUresult rc = ctx_ok();
    struct block **pp = &allocs, *b = NULL;
    while (!rc && *pp && (*pp)->p != (char *)(uintptr_t)dptr) pp = &(*pp)->next;
    if (!rc && !(b = *pp)) rc = E_VALUE;
    if (rc) { logf_("free 0x%llx -> %s", dptr, short_name(rc)); return rc; }
    drain();   /* cuMemFree synchronises; pending ops may use the block */
    *pp = b->next;
    devs[b->dev].free += b->size;
    if (!devs[b->dev].base) unmap_block(b->p, b->size);
    logf_("free %zu", b->size);
    free(b);
    return OK;
}
API CUresult cuMemFree_v2(CUdeviceptr dptr) { LOCKED(mem_free(dptr)); }

/* NULL (the legacy default stream), CU_STREAM_LEGACY (1) and
 * CU_STREAM_PER_THREAD (2) are always valid, as in CUDA. */
static int stream_ok(CUstream s)
{
    if ((uintptr_t)s <= 2) return 1;
    for (struct CUstream_st *t = streams; t; t = t->next)
        if (t == s) return 1;
    return 0;
}

/* The checks of every copy and memset, made at the call, async or not.
 * FAKE_CUDA_FAIL_COPY counts the calls that pass them, zero-length ones
 * included. */
static CUresult check_copy(const struct op *o, int async, CUstream s)
{
    CUresult rc = need_ctx();
    char *p = o->dev;
    if (!rc && async && !stream_ok(s)) rc = E_HANDLE;
    if (!rc && o->kind != SET && !o->host) rc = E_VALUE;
    if (!rc && o->n) {   /* the range must lie inside one live allocation */
        struct block *b = allocs;
        while (b && !(p >= b->p && p < b->p + b->size)) b = b->next;
        if (!b || o->n > b->size - (size_t)(p - b->p)) rc = E_VALUE;
    }
    /* A call that fails at once and leaves the context usable: a driver
     * short of memory for its own bookkeeping may answer so. (An illegal
     * address shows only at a sync, and sticks: FAKE_CUDA_FAIL_SYNC.) */
    if (!rc && ++copies == fail_copy) rc = E_OOM;
    return rc;
}

/* Async forms are queued on their stream. So is a synchronous memset, on
 * the legacy stream: CUDA's memsets of device memory do not wait for the
 * device ("API synchronization behavior"). Synchronous copies run after
 * all pending work of every stream (the legacy stream waits for the
 * blocking ones; the fake waits for the non-blocking ones too). */
static CUresult copy(enum copy_kind kind, CUdeviceptr dptr, void *host, unsigned char val,
                     size_t n, int async, CUstream s)
{
    struct op o = {kind, val, (char *)(uintptr_t)dptr, host, n};
    CUresult rc = check_copy(&o, async, s);
    if (rc || !n) return rc;
    if (async) enqueue(s, &o);
    else if (kind == SET) enqueue(NULL, &o);
    else { drain(); run_op(&o); }
    return OK;
}

API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n)
{ LOCKED(copy(H2D, dst, (void *)src, 0, n, 0, NULL)); }
API CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n)
{ LOCKED(copy(D2H, src, dst, 0, n, 0, NULL)); }
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUstream s)
{ LOCKED(copy(H2D, dst, (void *)src, 0, n, 1, s)); }
API CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUstream s)
{ LOCKED(copy(D2H, src, dst, 0, n, 1, s)); }
API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char uc, size_t n)
{ LOCKED(copy(SET, dst, NULL, uc, n, 0, NULL)); }
/* Logged, as the compute engine runs memsets on a real GPU: tests see
 * which zeroing took which way. */
static CUresult memset_async(CUdeviceptr dst, unsigned char uc, size_t n, CUstream s)
{
    CUresult rc = copy(SET, dst, NULL, uc, n, 1, s);
    logf_("memset %zu -> %s", n, short_name(rc));
    return rc;
}
API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char uc, size_t n, CUstream s)
{ LOCKED(memset_async(dst, uc, n, s)); }

/* cuMemcpy2DAsync_v2, host to device only (what nbd-vram uses): each row
 * is one queued copy, counted as one by FAKE_CUDA_FAIL_COPY; all rows are
 * checked before any is queued. Logged, as
 * on a real GPU this is what stays on a copy engine. */
typedef struct {
    size_t src_x, src_y; unsigned src_type; const void *src_host; CUdeviceptr src_dev; void *src_array; size_t src_pitch;
    size_t dst_x, dst_y; unsigned dst_type; void *dst_host; CUdeviceptr dst_dev; void *dst_array; size_t dst_pitch;
    size_t width, height;
} memcpy2d;
static CUresult copy2d(const memcpy2d *c, CUstream s)
{
    CUresult rc = need_ctx();
    if (!rc && (!c || c->src_type != 1 || c->dst_type != 2 || !c->src_host || !c->width || !c->height
                || c->src_pitch < c->width || c->dst_pitch < c->width))
        rc = E_VALUE;
    for (int pass = 0; pass < 2 && !rc; pass++)   /* all rows checked before any is queued */
        for (size_t row = 0; !rc && row < c->height; row++) {
            const char *from = (const char *)c->src_host + (c->src_y + row) * c->src_pitch + c->src_x;
            CUdeviceptr to = c->dst_dev + (c->dst_y + row) * c->dst_pitch + c->dst_x;
            struct op o = {H2D, 0, (char *)(uintptr_t)to, (void *)from, c->width};
            if (pass == 0) rc = check_copy(&o, 1, s);
            else enqueue(s, &o);
        }
    logf_("memcpy2d %zu rows of %zu -> %s", c ? c->height : 0, c ? c->width : 0, short_name(rc));
    return rc;
}
API CUresult cuMemcpy2DAsync_v2(const memcpy2d *c, CUstream s) { LOCKED(copy2d(c, s)); }

/* "0000:01:00.0" for device 0, and so on, as NVML's fake expects. */
static CUresult bus_id(char *id, int len, CUdevice d)
{
    CUresult rc = need_init() ? E_NOT_INIT : !id || len <= 0 ? E_VALUE : need_dev(d);
    if (!rc) snprintf(id, (size_t)len, "0000:%02x:00.0", d + 1);
    return rc;
}
API CUresult cuDeviceGetPCIBusId(char *id, int len, CUdevice d) { LOCKED(bus_id(id, len, d)); }

static int is_device(CUdeviceptr ptr)
{
    char *p = (char *)(uintptr_t)ptr;
    for (struct block *b = allocs; b; b = b->next)
        if (p >= b->p && p < b->p + b->size) return 1;
    return 0;
}

/* CUDA 13's cuMemcpyBatchAsync_v2. CUDA runs a batch's copies in any order;
 * this queues them last to first, so a caller that puts dependent copies in
 * one batch reads stale data here too. All are checked (and counted) before
 * any is queued, so a failing batch queues nothing. */
typedef struct { unsigned order; struct { unsigned type; int id; } src_hint, dst_hint; unsigned flags; } memcpy_attrs;
static CUresult batch(CUdeviceptr *dsts, CUdeviceptr *srcs, size_t *sizes, size_t count,
                      memcpy_attrs *attrs, size_t *idxs, size_t nattrs, CUstream s)
{
    CUresult rc = need_ctx();
    if (!rc && (!dsts || !srcs || !sizes || !count || !attrs || !idxs || !nattrs || nattrs > count || idxs[0] != 0))
        rc = E_VALUE;
    for (size_t a = 0; !rc && a < nattrs; a++)   /* STREAM, DURING_API_CALL or ANY */
        if (attrs[a].order < 1 || attrs[a].order > 3 || (a && idxs[a] <= idxs[a - 1])) rc = E_VALUE;
    for (int pass = 0; pass < 2 && !rc; pass++)
        for (size_t i = count; !rc && i-- > 0;) {
            int h2d = is_device(dsts[i]);
            struct op o = {h2d ? H2D : D2H, 0, (char *)(uintptr_t)(h2d ? dsts[i] : srcs[i]),
                           (void *)(uintptr_t)(h2d ? srcs[i] : dsts[i]), sizes[i]};
            if (pass == 0) rc = check_copy(&o, 1, s);
            else if (o.n) enqueue(s, &o);
        }
    return rc;
}
API CUresult cuMemcpyBatchAsync_v2(CUdeviceptr *dsts, CUdeviceptr *srcs, size_t *sizes, size_t count,
                                   void *attrs, size_t *idxs, size_t nattrs, CUstream s)
{ LOCKED(batch(dsts, srcs, sizes, count, attrs, idxs, nattrs, s)); }

/* Modules: the fake cannot run PTX, so it knows two kernels by name, the
 * copy and mailbox kernels whose behaviour it reproduces (see README.md).
 * A module is a handle to its image; a function is the address of a static. */
static char copy_kernel, mailbox_kernel;
static const char *mailbox_image;   /* the PTX it was loaded from */
#define COPY_KERNEL "nbd_vram_copy"
#define MAILBOX_KERNEL "nbd_vram_mailbox"

static CUresult module_load(void **mod, const void *image)
{
    no_resident_kernel("cuModuleLoadData");
    CUresult rc = need_ctx() ? need_ctx() : !mod || !image ? E_VALUE : OK;
    if (!rc && no_jit) rc = 221;
    if (!rc && !strstr(image, ".entry " COPY_KERNEL "(") && !strstr(image, ".entry " MAILBOX_KERNEL "(")) rc = 218;
    if (!rc) *mod = (void *)image;
    return rc;
}
API CUresult cuModuleLoadData(void **mod, const void *image) { LOCKED(module_load(mod, image)); }

static CUresult module_function(void **fn, void *mod, const char *name)
{
    CUresult rc = need_ctx() ? need_ctx() : !fn || !mod || !name ? E_VALUE : OK;
    char entry[64];
    snprintf(entry, sizeof entry, ".entry %s(", name ? name : "");
    if (!rc && (strlen(name) > 32 || !strstr(mod, entry))) rc = 500;   /* CUDA_ERROR_NOT_FOUND */
    if (!rc && strcmp(name, COPY_KERNEL) && strcmp(name, MAILBOX_KERNEL)) rc = 500;
    if (!rc) *fn = strcmp(name, COPY_KERNEL) ? (void *)&mailbox_kernel : (void *)&copy_kernel;
    if (!rc && !strcmp(name, MAILBOX_KERNEL)) mailbox_image = mod;
    return rc;
}
API CUresult cuModuleGetFunction(void **fn, void *mod, const char *name) { LOCKED(module_function(fn, mod, name)); }
static CUresult module_unload(void *mod)
{
    no_resident_kernel("cuModuleUnload");
    return mod ? OK : E_HANDLE;
}
API CUresult cuModuleUnload(void *mod) { LOCKED(module_unload(mod)); }

static int inside(const struct block *list, const void *p, size_t n);

/* The copy kernel: params are a u32 count and up to 128 {dst, src, len},
 * one block each, 16-byte aligned. Queued like a batch, last to first,
 * since blocks run in any order. */
static CUresult mailbox_launch(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                               unsigned bz, unsigned shared, CUstream s, void **params, void **extra);
static CUresult launch(void *fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                       unsigned bz, unsigned shared, CUstream s, void **params, void **extra)
{
    if (fn == &mailbox_kernel && !need_ctx()) return mailbox_launch(gx, gy, gz, bx, by, bz, shared, s, params, extra);
    CUresult rc = need_ctx() ? need_ctx() : fn != &copy_kernel ? E_HANDLE : OK;
    if (rc) return rc;
    unsigned count = params ? *(unsigned *)params[0] : 0;
    const unsigned long long (*pieces)[3] = params ? params[1] : NULL;
    if (!params || extra || shared || gy != 1 || gz != 1 || by != 1 || bz != 1 || bx == 0 || bx > 1024 ||
        count == 0 || count > 128 || gx != count)
        return E_VALUE;
    CUdeviceptr dsts[128], srcs[128];
    size_t sizes[128];
    int reaches = 1;
    for (unsigned i = 0; i < count; i++) {
        if ((pieces[i][0] | pieces[i][1] | pieces[i][2]) % 16) return 716;   /* CUDA_ERROR_MISALIGNED_ADDRESS */
        /* The kernel reaches host memory only through the GPU's mapping of
         * pinned memory: any other host address faults when it runs. */
        CUdeviceptr host = is_device(pieces[i][0]) ? pieces[i][1] : pieces[i][0];
        reaches &= inside(host_allocs, (void *)(uintptr_t)host, pieces[i][2]);
        dsts[i] = pieces[i][0];
        srcs[i] = pieces[i][1];
        sizes[i] = pieces[i][2];
    }
    if (!reaches) {
        struct op fault = {FAULT, 0, NULL, NULL, 0};
        enqueue(s, &fault);
        logf_("launch " COPY_KERNEL " %u -> a piece off pinned memory: faults when it runs", count);
        return OK;
    }
    memcpy_attrs attrs = {1, {0, 0}, {0, 0}, 0};
    size_t first = 0;
    rc = batch(dsts, srcs, sizes, count, &attrs, &first, 1, s);
    logf_("launch " COPY_KERNEL " %u -> %s", count, short_name(rc));
    return rc;
}
/* The mailbox kernel: params are the slot page, the landing buffer (both
 * pinned host memory here) and the sequence taken as done; one block. A
 * job copies between VRAM and the landing buffer (the length's top bit: to
 * VRAM), or runs a list. On a GPU it runs at once on an SM of its own and
 * polls the slot; here an SM thread (started by cuInit, as the driver
 * starts its threads) runs it, concurrently with the caller and as late as
 * a GPU may: see "The SMs" below. */
/* The job word at slot offset 0: sequence (bits 0-7), write (8), list
 * (9), length in 16-byte units or a list's count (10-22), the VRAM
 * address's offset from `base` in 16-byte units (23-63). */
#define JOB_SEQ(w) ((unsigned)(w) & 0xff)
#define SLOT_DONE 64
#define SLOT_ALIVE 128
#define SLOT_LEN 4096
#define SLOT_LIST 1024
#define SLOT_ROW 32
#define SLOT_LISTED 0x40000000u
#define LANDING_MAX 65536

/* Whether p..p+n lies inside one block of `list`. */
static int inside(const struct block *list, const void *p, size_t n)
{
    for (const struct block *b = list; b; b = b->next)
        if ((const char *)p >= b->p && (const char *)p < b->p + b->size &&
            n <= b->size - (size_t)((const char *)p - b->p))
            return 1;
    return 0;
}

static pthread_cond_t sm_kick = PTHREAD_COND_INITIALIZER;   /* a launch, or a late start allowed */
static pthread_cond_t sm_done = PTHREAD_COND_INITIALIZER;   /* a job taken, or a kernel ended */

/* Whether the mailbox kernel on s, if any, ends by itself: waits (lock
 * held, released while waiting) until it has ended, or until it has taken
 * every job posted to it and still runs, which a GPU would wait for for
 * ever. Lets a late-starting kernel start, as a sync would. */
static int resident_ends(struct CUstream_st *s)
{
    struct mailbox *m = &s->mb;
    while (m->running) {
        if (!m->started) {
            m->started = 1;
            pthread_cond_broadcast(&sm_kick);
        }
        unsigned posted = JOB_SEQ(__atomic_load_n((unsigned long long *)m->slot, __ATOMIC_ACQUIRE));
        if (m->on_sm && posted == m->last) return 0;
        struct timespec t;
        clock_gettime(CLOCK_REALTIME, &t);
        t.tv_nsec += 1000000;
        if (t.tv_nsec >= 1000000000) { t.tv_sec++; t.tv_nsec -= 1000000000; }
        pthread_cond_timedwait(&sm_done, &lock, &t);
    }
    return 1;
}

/* Whether every global load of the kernel bypasses L1 (`.cv` or `.cg`):
 * one default-cached (or `.ca`) load may read host memory stale. */
static int reads_past_l1(const char *ptx)
{
    for (const char *p = ptx; (p = strstr(p, "ld.global.")); p += 10)
        if (strncmp(p + 10, "cv.", 3) && strncmp(p + 10, "cg.", 3)) return 0;
    return 1;
}

static CUresult mailbox_launch(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                               unsigned bz, unsigned shared, CUstream s, void **params, void **extra)
{
    if (!params || extra || shared || gx != 1 || gy != 1 || gz != 1 || by != 1 || bz != 1 || bx == 0 || bx > 1024)
        return E_VALUE;
    if ((uintptr_t)s <= 2 || !stream_ok(s)) return E_HANDLE;
    unsigned char *slot = *(unsigned char **)params[0], *landing = *(unsigned char **)params[1];
    if (!inside(host_allocs, slot, SLOT_LEN) || !inside(host_allocs, landing, LANDING_MAX)) return E_VALUE;
    if (!(s->flags & 1)) {
        fprintf(stderr, "fake libcuda: " MAILBOX_KERNEL " on a blocking stream: the legacy stream's calls would wait for it for ever\n");
        return E_VALUE;
    }
    /* stream order: the last one takes its jobs (an end?) first */
    if (!resident_ends(s)) {
        fprintf(stderr, "fake libcuda: " MAILBOX_KERNEL " launched behind one that was never told to end: it would never start\n");
        return E_VALUE;
    }
    if (sticky) return sticky;
    drain_queue(&s->q);   /* the stream's earlier work: done before it starts */
    /* What the PTX promises decides what the fake may do (see "The SMs"). */
    const char *ptx = mailbox_image ? mailbox_image : "";
    s->mb = (struct mailbox){
        .slot = slot, .landing = landing, .own = &s->q, .base = *(unsigned long long *)params[3],
        .last = *(unsigned *)params[2], .running = 1, .started = !late_start,
        .acquire = strstr(ptx, "ld.acquire.sys") != NULL,
        .release = strstr(ptx, "st.release.sys") || strstr(ptx, "fence.acq_rel.sys") ||
                   strstr(ptx, "fence.sc.sys") || strstr(ptx, "membar.sys"),
        .fresh = reads_past_l1(ptx),
        .owner = pthread_self(),
    };
    pthread_cond_broadcast(&sm_kick);
    logf_("launch " MAILBOX_KERNEL " -> ok");
    return OK;
}

/* One piece of a mailbox job, between device memory and cuMemHostAlloc
 * memory (the landing buffer, or any in a list): 16-byte aligned, at most
 * 64 KiB, else MISALIGNED_ADDRESS; outside those memories, a fault. */
static CUresult mailbox_piece(const struct op *o)
{
    if (o->n == 0 || o->n > LANDING_MAX || ((uintptr_t)o->dev | (uintptr_t)o->host | o->n) % 16) return 716;
    if (!inside(allocs, o->dev, o->n) || !inside(host_allocs, o->host, o->n)) return E_ILLEGAL;
    return OK;
}

/* A list job's pieces, {dst u64, src u64, len u32, 4 unused} at slot
 * offset 1024 (here `rows`, as the kernel read them), checked, into ops. */
static CUresult mailbox_list(const unsigned char *rows, unsigned count, unsigned write, struct op *ops)
{
    if (count == 0 || SLOT_LIST + count * SLOT_ROW > SLOT_LEN) return E_ILLEGAL;
    for (unsigned i = 0; i < count; i++) {
        const unsigned char *row = rows + i * SLOT_ROW;
        unsigned long long dst, src;
        unsigned len;
        memcpy(&dst, row, 8);
        memcpy(&src, row + 8, 8);
        memcpy(&len, row + 16, 4);
        char *vram = (char *)(uintptr_t)(write ? dst : src);
        void *host = (void *)(uintptr_t)(write ? src : dst);
        ops[i] = (struct op){write ? H2D : D2H, 0, vram, host, len};
        CUresult rc = mailbox_piece(&ops[i]);
        if (rc) return rc;
    }
    return OK;
}

/* The SMs. Each thread runs one mailbox kernel at a time, and may do
 * whatever the PTX memory model lets a GPU do with what the kernel's PTX
 * promises, at the worst moment:
 * - it polls host memory on its own, never in step with a driver call;
 * - without an acquire load of the job word (`ld.acquire.sys`), it reads
 *   the landing buffer and a list's rows before the word, as a plain load
 *   orders nothing after it, so a job can run on data not yet written;
 * - without a release (`st.release.sys`, a system-scope fence or
 *   `membar.sys`), `done` shows before the copy has landed;
 * - with a global load that does not bypass L1 (not `.cv` or `.cg`), a
 *   write job reads the landing buffer as it was at the kernel's first job;
 * - it reads a write job's data right after seeing its job word, and
 *   reports a landing buffer changed after the job was posted as a race;
 * - it pauses for random microseconds between its steps, and before one
 *   job in eight (FAKE_CUDA_LATE_JOBS) for up to 400. */
#define SMS 4
#define SPINS 2000   /* polls without a pause after a job: jobs come back to back */

/* An SM thread's own state, given at its start: no __thread variable, as
 * a dlopen'ed library's thread-local storage is malloc'ed at its first
 * use in each thread, and an SM must not need memory while serving swap. */
struct sm { unsigned char data[LANDING_MAX], rows[SLOT_LEN - SLOT_LIST]; unsigned rnd; };

static void pause_us(struct sm *sm, unsigned max)
{
    sm->rnd ^= sm->rnd << 13; sm->rnd ^= sm->rnd >> 17; sm->rnd ^= sm->rnd << 5;
    struct timespec t = {0, (long)(sm->rnd % (max + 1)) * 1000};
    if (t.tv_nsec) nanosleep(&t, NULL);
}

/* Whether [a, a + an) and [b, b + bn) share a byte. */
static int overlap(const void *a, size_t an, const void *b, size_t bn)
{
    const char *x = a, *y = b;
    return an && bn && x < y + bn && y < x + an;
}

/* Whether ops a and b touch the same memory, one of them writing it: a
 * memset or an HtoD copy writes device memory, a DtoH copy host memory. */
static int conflict(const struct op *a, const struct op *b)
{
    if (a->kind == WAIT || b->kind == WAIT) return 0;
    if ((a->kind != D2H || b->kind != D2H) && overlap(a->dev, a->n, b->dev, b->n)) return 1;
    return a->kind != SET && b->kind != SET && (a->kind == D2H || b->kind == D2H) &&
           overlap(a->host, a->n, b->host, b->n);
}

/* The first pending async op of any stream that a mailbox job's pieces
 * would race with on a GPU (the kernel runs beside the streams' work,
 * ordered with none of it), or NULL. */
static const struct op *queue_conflict(const struct queue *q, const struct op *ops, unsigned n)
{
    for (unsigned long long i = q->done; i < q->queued; i++)
        for (unsigned j = 0; j < n; j++)
            if (conflict(&ops[j], &q->ops[i % QCAP])) return &q->ops[i % QCAP];
    return NULL;
}
static const struct op *pending_conflict(const struct queue *own, const struct op *ops, unsigned n)
{
    const struct op *o = queue_conflict(&legacy, ops, n);
    for (struct CUstream_st *t = streams; t && !o; t = t->next)
        if (&t->q != own) o = queue_conflict(&t->q, ops, n);   /* its own stream's wait behind it */
    return o;
}

/* Takes the job just read (lock held): checks it, runs it (from `data`
 * for a lone write), publishes done. Returns non-zero to end the kernel.
 * A job whose device memory or host memory pending async work of any
 * stream would also touch (one side writing) races with that work. */
static CUresult mailbox_job(struct sm *sm, struct mailbox *m, unsigned seq, char *vram, unsigned len)
{
    const unsigned char *data = sm->data;
    unsigned write = len >> 31, listed = len & SLOT_LISTED;
    len &= 0x7fffffff;
    const char *what = listed ? "list " : "";
    struct op ops[(SLOT_LEN - SLOT_LIST) / SLOT_ROW];
    unsigned n = 0;
    CUresult rc = OK;
    const struct op *other;
    m->last = seq;
    if (listed) {
        n = len & 0xffff;
        len = n;
        rc = mailbox_list(sm->rows, n, write, ops);
    } else if (len) {
        ops[n++] = (struct op){write ? H2D : D2H, 0, vram, m->landing, len};
        rc = mailbox_piece(&ops[0]);
    }
    if (!rc && (other = pending_conflict(m->own, ops, n))) {
        fprintf(stderr, "fake libcuda: a " MAILBOX_KERNEL " job while async work is pending on the same memory: "
                        "it would race with it (a queued %s of %zu bytes, device %p, host %p)\n",
                other->kind == H2D ? "HtoD copy" : other->kind == D2H ? "DtoH copy" : "memset", other->n,
                (void *)other->dev, other->host);
        rc = E_ILLEGAL;
    }
    if (!rc && write && !listed && len) ops[0].host = (void *)data;   /* what the kernel read */
    if (!rc && len && ++mailbox_jobs == fail_mailbox) rc = E_ILLEGAL;
    if (!rc && write && !listed && len && m->fresh && memcmp(data, m->landing, len)) {
        fprintf(stderr, "fake libcuda: a " MAILBOX_KERNEL " write's data changed after its job was posted\n");
        rc = E_ILLEGAL;
    }
    if (rc) {
        sticky = rc;
        logf_(MAILBOX_KERNEL " job %llu %s%s -> %s", mailbox_jobs, what, write ? "write" : "read", short_name(rc));
        return rc;
    }
    if (!m->release) {   /* nothing orders the copy before done */
        __atomic_store_n((unsigned *)(m->slot + SLOT_DONE), seq, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&lock);
        pause_us(sm, 20);
        pthread_mutex_lock(&lock);
    }
    for (unsigned i = 0; i < n; i++) run_op(&ops[i]);
    if (len) logf_(MAILBOX_KERNEL " job %llu %s%s %u -> ok", mailbox_jobs, what, write ? "write" : "read", len);
    __atomic_store_n((unsigned *)(m->slot + SLOT_DONE), seq, __ATOMIC_RELEASE);
    if (!len) logf_(MAILBOX_KERNEL " ended after %llu jobs", mailbox_jobs);
    return len ? OK : -1;
}

/* What the kernel reads of host memory besides the job word: `n` bytes
 * of the landing buffer (none while L1 still holds it) and `rows` bytes of
 * a list's rows. */
static void snapshot(struct sm *sm, const struct mailbox *m, size_t n, size_t rows, int keep_landing)
{
    if (!keep_landing) memcpy(sm->data, m->landing, n);
    memcpy(sm->rows, m->slot + SLOT_LIST, rows);
}

/* Runs the kernel on s until it ends or faults (lock held, released while
 * it polls). `sm->data` is its copy of the landing buffer. */
static void resident(struct sm *sm, struct mailbox *m)
{
    while (!m->started) pthread_cond_wait(&sm_kick, &lock);
    __atomic_store_n((unsigned *)(m->slot + SLOT_ALIVE), m->last, __ATOMIC_RELEASE);
    int cached = 0;
    unsigned idle = 0;
    for (;;) {
        pthread_mutex_unlock(&lock);
        unsigned long long word;
        if (!m->acquire) {
            /* A plain load orders nothing after it: the job's data may be
             * read before the word that says it is there. */
            snapshot(sm, m, LANDING_MAX, sizeof sm->rows, !m->fresh && cached);
            pause_us(sm, idle < SPINS ? 2 : 20);
        }
        word = __atomic_load_n((unsigned long long *)m->slot, m->acquire ? __ATOMIC_ACQUIRE : __ATOMIC_RELAXED);
        unsigned seq = JOB_SEQ(word);
        if (seq == m->last) {
            if (++idle > SPINS) pause_us(sm, 20);
            pthread_mutex_lock(&lock);
            if (sticky) break;   /* a fault elsewhere in the context ends every kernel in it */
            continue;
        }
        idle = 0;
        unsigned n = (unsigned)(word >> 10) & 0x1fff, listed = (unsigned)(word >> 9) & 1;
        unsigned len = (listed ? n | SLOT_LISTED : n * 16) | (unsigned)(word >> 8 & 1) << 31;
        unsigned long long vram = m->base + (word >> 23) * 16;
        if (m->acquire) {   /* too long a job faults below; read no more than there is */
            size_t bytes = listed ? 0 : n * 16, rows = listed ? n * SLOT_ROW : 0;
            snapshot(sm, m, bytes < LANDING_MAX ? bytes : LANDING_MAX, rows < sizeof sm->rows ? rows : sizeof sm->rows,
                     !m->fresh && cached);
        }
        cached = 1;
        /* Now and then a job runs late, as when another context has the
         * GPU's time slice: long after its answer could have gone out. */
        pause_us(sm, late_jobs && sm->rnd % late_jobs == 0 ? 400 : 5);
        pthread_mutex_lock(&lock);
        if (++jobs_seen == stall_job) {   /* FAKE_CUDA_MAILBOX_STALL: not scheduled for a while */
            pthread_mutex_unlock(&lock);
            sleep(3);
            pthread_mutex_lock(&lock);
        }
        if (sticky) break;   /* the job is never done */
        if (mailbox_job(sm, m, seq, (char *)(uintptr_t)vram, len)) break;
        pthread_cond_broadcast(&sm_done);
    }
    m->running = 0;
}

static void *sm_main(void *arg)
{
    struct sm *sm = arg;
    pthread_mutex_lock(&lock);
    for (;;) {
        struct CUstream_st *s = streams;
        while (s && !(s->mb.running && !s->mb.on_sm)) s = s->next;
        if (!s) {
            pthread_cond_wait(&sm_kick, &lock);
            continue;
        }
        s->mb.on_sm = 1;
        resident(sm, &s->mb);
        s->mb.on_sm = 0;
        pthread_cond_broadcast(&sm_done);
    }
    return NULL;
}

/* Started by the first cuInit, as the driver starts its own threads there:
 * they inherit the caller's signal mask. Small stacks, faulted in now. */
static int start_sms(void)
{
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (int i = 0; i < SMS; i++) {
        pthread_t t;
        struct sm *sm = calloc(1, sizeof *sm);
        if (sm) sm->rnd = 0x9e3779b9u * (unsigned)(i + 1) ^ (unsigned)time(NULL);
        if (!sm || pthread_create(&t, &attr, sm_main, sm)) {
            fprintf(stderr, "fake libcuda: cannot start its SM threads\n");
            return -1;
        }
    }
    pthread_attr_destroy(&attr);
    return 0;
}

/* A query says NOT_READY while a mailbox kernel runs on the stream (and
 * lets a late one start), and at every other first look at work queued
 * since the last, leaving it unrun: a GPU may or may not be done with a
 * copy just queued, and a caller that takes "not ready" for "done" must
 * see the damage. Else it runs the stream's pending async work (CUDA may
 * run it any time). */
static CUresult stream_query(CUstream s)
{
    CUresult rc = need_ctx() ? need_ctx() : stream_ok(s) ? OK : E_HANDLE;
    if (!rc && (uintptr_t)s > 2 && s->mb.running) {
        if (!s->mb.started) {
            s->mb.started = 1;
            pthread_cond_broadcast(&sm_kick);
        }
        return 600;
    }
    struct queue *q = rc ? NULL : queue_of(s);
    if (q && q->done < q->queued && q->busy_told != q->queued) {
        q->busy_told = q->queued;
        if (!(q->turns++ & 1)) return 600;
    }
    if (!rc) run_unordered(q, q->queued);
    if (!rc && (uintptr_t)s <= 2) drain_blocking();
    return rc;
}
API CUresult cuStreamQuery(CUstream s) { LOCKED(stream_query(s)); }

/* KERNEL_EXEC_TIMEOUT (17) and MULTIPROCESSOR_COUNT (16) only */
static CUresult device_attribute(int *v, int attr, CUdevice d)
{
    CUresult rc = need_dev(d) ? need_dev(d) : !v || (attr != 17 && attr != 16) ? E_VALUE : OK;
    if (!rc) *v = attr == 17 ? exec_timeout != 0 : (int)sms;
    return rc;
}
API CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) { LOCKED(device_attribute(v, attr, d)); }

/* CU_EXEC_AFFINITY_TYPE_SM_COUNT (0) only: the SMs of FAKE_CUDA_SMS, as an
 * MPS client limited to them would see. */
struct exec_affinity { int type; unsigned sms; };
static CUresult exec_affinity(struct exec_affinity *p, int type)
{
    CUresult rc = need_ctx() ? need_ctx() : !p || type != 0 ? E_VALUE : OK;
    if (!rc) *p = (struct exec_affinity){0, (unsigned)sms};
    return rc;
}
API CUresult cuCtxGetExecAffinity(struct exec_affinity *p, int type) { LOCKED(exec_affinity(p, type)); }

API CUresult cuLaunchKernel(void *fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                            unsigned bz, unsigned shared, CUstream s, void **params, void **extra)
{ LOCKED(launch(fn, gx, gy, gz, bx, by, bz, shared, s, params, extra)); }

static CUresult host_alloc(void **pp, size_t size, unsigned flags)
{
    /* PORTABLE | DEVICEMAP | WRITECOMBINED are the only flags CUDA knows */
    CUresult rc = need_ctx() ? need_ctx() : !pp || size == 0 || (flags & ~7u) ? E_VALUE : OK;
    void *p = MAP_FAILED;
    struct block *b = NULL;
    if (!rc) p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (!rc && (p == MAP_FAILED || !(b = malloc(sizeof *b)))) rc = E_OOM;
    if (rc) { if (p != MAP_FAILED) munmap(p, size); return rc; }
    *b = (struct block){p, size, cur()->dev, host_allocs};
    host_allocs = b;
    *pp = p;
    return OK;
}
API CUresult cuMemHostAlloc(void **pp, size_t size, unsigned flags) { LOCKED(host_alloc(pp, size, flags)); }

static CUresult free_host(void *p)
{
    no_resident_kernel("cuMemFreeHost");
    CUresult rc = ctx_ok();
    struct block **pp = &host_allocs, *b = NULL;
    while (!rc && *pp && (*pp)->p != p) pp = &(*pp)->next;
    if (!rc && !(b = *pp)) rc = E_VALUE;
    if (rc) return rc;
    drain();   /* pending ops may use the pinned buffer */
    *pp = b->next;
    munmap(b->p, b->size);
    free(b);
    return OK;
}
API CUresult cuMemFreeHost(void *p) { LOCKED(free_host(p)); }

static CUresult stream_create(CUstream *ps, unsigned flags)
{
    /* CU_STREAM_DEFAULT 0 and CU_STREAM_NON_BLOCKING 1 are the only flags */
    CUresult rc = need_ctx() ? need_ctx() : !ps || flags > 1 ? E_VALUE : OK;
    struct CUstream_st *s = rc ? NULL : malloc(sizeof *s);
    struct op *ops = s ? malloc(QCAP * sizeof *ops) : NULL;
    if (!rc && !ops) { free(s); rc = E_OOM; }
    if (rc) return rc;
    memset(ops, 0, QCAP * sizeof *ops);   /* faulted in now, not while serving swap */
    *s = (struct CUstream_st){cur()->dev, flags, {0}, {ops, 0, 0, 0, 0}, streams};
    streams = *ps = s;
    return OK;
}
API CUresult cuStreamCreate(CUstream *ps, unsigned flags)
{
    if (stream_delay_ms) usleep(stream_delay_ms * 1000);   /* FAKE_CUDA_STREAM_DELAY_MS, outside the lock */
    LOCKED(stream_create(ps, flags));
}

/* A stream's sync runs its own pending work, no other stream's (the legacy
 * stream's, the blocking streams' too; a non-blocking stream's, the legacy
 * stream's after it). A mailbox kernel that was not told to end would make
 * it wait for ever. */
static CUresult stream_sync(CUstream s)
{
    CUresult rc = need_ctx() ? need_ctx() : stream_ok(s) ? OK : E_HANDLE;
    if (!rc && (uintptr_t)s > 2 && !resident_ends(s)) {
        fprintf(stderr, "fake libcuda: cuStreamSynchronize would wait for ever for " MAILBOX_KERNEL "\n");
        abort();
    }
    if (!rc && (uintptr_t)s > 2 && sticky) rc = sticky;
    if (!rc && short_sync) {   /* FAKE_CUDA_FAIL_RECORD: runs nothing */
        short_sync = 0;
        return E_OOM;
    }
    if (!rc) rc = sync_to(queue_of(s), queue_of(s)->queued);
    if (!rc && (uintptr_t)s <= 2) drain_blocking();   /* the legacy stream waits for them */
    return rc;
}
API CUresult cuStreamSynchronize(CUstream s) { LOCKED(stream_sync(s)); }

static CUresult stream_destroy(CUstream s)
{
    CUresult rc = ctx_ok();
    struct CUstream_st **pp = &streams;
    while (!rc && *pp && *pp != s) pp = &(*pp)->next;
    if (!rc && !*pp) rc = E_HANDLE;   /* includes the built-in streams */
    if (rc) return rc;
    if (!resident_ends(s)) {
        fprintf(stderr, "fake libcuda: cuStreamDestroy while " MAILBOX_KERNEL " runs on it for ever\n");
        abort();
    }
    drain();   /* CUDA finishes a destroyed stream's work; this does it now */
    forget_stream(s);
    *pp = s->next;
    free(s->q.ops);
    free(s);
    return OK;
}
API CUresult cuStreamDestroy_v2(CUstream s) { LOCKED(stream_destroy(s)); }

/* Where the handle is a live event, the link pointing at it, else NULL. */
static struct CUevent_st **find_event(CUevent e)
{
    struct CUevent_st **pp = &events;
    while (*pp && *pp != e) pp = &(*pp)->next;
    return e && *pp ? pp : NULL;
}

static CUresult event_create(CUevent *pe, unsigned flags)
{
    /* DEFAULT 0, BLOCKING_SYNC 1, DISABLE_TIMING 2, INTERPROCESS 4 */
    CUresult rc = need_ctx() ? need_ctx() : !pe || (flags & ~7u) ? E_VALUE : OK;
    struct CUevent_st *e = rc ? NULL : malloc(sizeof *e);
    if (!rc && !e) rc = E_OOM;
    if (rc) return rc;
    *e = (struct CUevent_st){cur()->dev, NULL, 0, events};
    events = *pe = e;
    return OK;
}
API CUresult cuEventCreate(CUevent *pe, unsigned flags) { LOCKED(event_create(pe, flags)); }

static CUresult event_record(CUevent e, CUstream s)
{
    CUresult rc = need_ctx() ? need_ctx() : !find_event(e) || !stream_ok(s) ? E_HANDLE : OK;
    if (!rc && ++records == fail_record) {   /* records nothing */
        short_sync = 1;
        return E_OOM;
    }
    if (!rc && (uintptr_t)s <= 2) drain_blocking();   /* the legacy stream waits for them */
    if (!rc) {   /* the stream's work so far; no other stream's */
        e->q = queue_of(s);
        e->seq = e->q->queued;
    }
    return rc;
}
API CUresult cuEventRecord(CUevent e, CUstream s) { LOCKED(event_record(e, s)); }

/* Queues a wait, run when the stream's later work is due (never sooner:
 * the other stream's work stays as late as it may), for the ops the event
 * was last recorded behind. */
static CUresult stream_wait_event(CUstream s, CUevent e, unsigned flags)
{
    CUresult rc = need_ctx() ? need_ctx() : !find_event(e) || !stream_ok(s) ? E_HANDLE : flags ? E_VALUE : OK;
    if (!rc && e->q && e->q != queue_of(s)) enqueue(s, &(struct op){WAIT, 0, NULL, e->q, e->seq});
    return rc;
}
API CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned flags) { LOCKED(stream_wait_event(s, e, flags)); }

static CUresult event_sync(CUevent e)
{
    CUresult rc = need_ctx() ? need_ctx() : find_event(e) ? OK : E_HANDLE;
    return rc ? rc : sync_to(e->q, e->seq);
}
API CUresult cuEventSynchronize(CUevent e) { LOCKED(event_sync(e)); }

static CUresult event_destroy(CUevent e)
{
    CUresult rc = ctx_ok();
    struct CUevent_st **pp = rc ? NULL : find_event(e);
    if (!rc && !pp) rc = E_HANDLE;
    if (rc) return rc;
    *pp = e->next;
    free(e);
    return OK;
}
API CUresult cuEventDestroy_v2(CUevent e) { LOCKED(event_destroy(e)); }

/* Like CUDA: unknown codes give CUDA_ERROR_INVALID_VALUE and *str = NULL. */
static CUresult error_text(CUresult code, const char **str, int want_name)
{
    if (!str) return E_VALUE;
    for (size_t i = 0; i < sizeof errors / sizeof *errors; i++)
        if (errors[i].code == code) {
            *str = want_name ? errors[i].name : errors[i].text;
            return OK;
        }
    *str = NULL;
    return E_VALUE;
}
API CUresult cuGetErrorName(CUresult code, const char **str) { return error_text(code, str, 1); }
API CUresult cuGetErrorString(CUresult code, const char **str) { return error_text(code, str, 0); }
