/* hog: a memory hog that proves what it wrote comes back.
 *
 *     hog [-f FILE] [-z N] [-w FILE] MIB [SEED]
 *
 * Maps MIB MiB, writes into every 8-byte word a pattern derived from the
 * word's address and SEED (default: from the clock, so stale data from an
 * earlier run can never pass), then reads everything back and checks every
 * word. Prints progress and one final line, "hog: PASS <MiB> MiB verified"
 * (exit 0) or "hog: FAIL ..." (exit 1).
 *
 * -f FILE maps FILE MAP_SHARED instead of anonymous memory, e.g. a PCI BAR's
 * sysfs resourceN (its size comes from fstat: lseek does not work there).
 *
 * -w FILE waits, once everything is written, until FILE exists before it
 * verifies, printing "hog: written, waiting for FILE": the swap tier can
 * change under pages it holds meanwhile.
 *
 * -z N keeps the pattern in the first 1/N of each 4 KiB page only and
 * zeroes the rest (still every word checked), so pages compress about N:1,
 * as real swap does, and zram can hold more than guest RAM: random data
 * would just fill zram's RAM and get the hog OOM-killed.
 *
 * Built static (gcc -static -O2) so the VM's initramfs needs no libraries.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024UL * 1024)
#define STEP (32 * MIB) /* progress every STEP bytes */

/* splitmix64 of address ^ seed: neighbouring words differ in every bit. */
static uint64_t pattern(uint64_t addr, uint64_t seed)
{
    uint64_t z = (addr ^ seed) + 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int usage(void)
{
    fprintf(stderr, "usage: hog [-f FILE] [-z N] [-w FILE] MIB [SEED]\n");
    return 2;
}

int main(int argc, char **argv)
{
    const char *file = NULL, *go = NULL;
    unsigned long z = 1;
    int opt;
    while ((opt = getopt(argc, argv, "f:w:z:")) != -1) {
        if (opt == 'f')
            file = optarg;
        else if (opt == 'w')
            go = optarg;
        else if (opt == 'z' && (z = strtoul(optarg, NULL, 0)) >= 1 && z <= 512)
            continue;
        else
            return usage();
    }
    size_t keep = 4096 / z; /* bytes of pattern at the start of each page */
    if (optind >= argc || argc - optind > 2) return usage();
    unsigned long mib = strtoul(argv[optind], NULL, 0);
    uint64_t seed = argc - optind == 2 ? strtoull(argv[optind + 1], NULL, 0)
                                       : (uint64_t)now() * 1000003 ^ (uint64_t)getpid();
    size_t len = mib * MIB;
    if (!mib) return usage();
    setvbuf(stdout, NULL, _IOLBF, 0);

    uint64_t *p;
    if (file) {
        int fd = open(file, O_RDWR);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) < 0) {
            printf("hog: FAIL %s: %s\n", file, strerror(errno));
            return 1;
        }
        if ((size_t)st.st_size < len) {
            printf("hog: FAIL %s holds only %lld bytes\n", file, (long long)st.st_size);
            return 1;
        }
        p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    } else {
        /* MAP_NORESERVE: skip the overcommit heuristic, which would refuse
         * more than RAM + swap up front; without swap we want the OOM killer
         * (proof the guest really is short of RAM), not ENOMEM. */
        p = mmap(NULL, len, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    }
    if (p == MAP_FAILED) {
        printf("hog: FAIL mmap %lu MiB: %s\n", mib, strerror(errno));
        return 1;
    }
    printf("hog: %lu MiB at %p%s%s, seed %#" PRIx64 ", %zu pattern bytes a page\n", mib,
           (void *)p, file ? " of " : "", file ? file : "", seed, keep);

    size_t words = len / 8, per_step = STEP / 8;
    double t0 = now();
    for (size_t i = 0; i < words; i++) {
        p[i] = (i * 8) % 4096 < keep ? pattern((uintptr_t)&p[i], seed) : 0;
        if ((i + 1) % per_step == 0 || i + 1 == words)
            printf("hog: wrote %zu/%lu MiB\n", (i + 1) * 8 / MIB, mib);
    }
    if (go) {
        printf("hog: written, waiting for %s\n", go);
        while (access(go, F_OK) != 0)
            usleep(100 * 1000);
    }
    double t1 = now();

    size_t bad = 0, first = 0;
    uint64_t got = 0, want = 0;
    for (size_t i = 0; i < words; i++) {
        uint64_t w = (i * 8) % 4096 < keep ? pattern((uintptr_t)&p[i], seed) : 0;
        if (p[i] != w && bad++ == 0) {
            first = i;
            got = p[i];
            want = w;
        }
        if ((i + 1) % per_step == 0 || i + 1 == words)
            printf("hog: verified %zu/%lu MiB\n", (i + 1) * 8 / MIB, mib);
    }
    double t2 = now();
    printf("hog: write %.1f s, verify %.1f s\n", t1 - t0, t2 - t1);

    if (bad) {
        printf("hog: FAIL %zu of %zu words wrong, first at +%#zx: got %#" PRIx64
               " want %#" PRIx64 "\n", bad, words, first * 8, got, want);
        return 1;
    }
    printf("hog: PASS %lu MiB verified\n", mib);
    return 0;
}
