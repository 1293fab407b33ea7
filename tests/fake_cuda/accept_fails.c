/* An LD_PRELOAD shim for serve mode's listener: the first accept4(2)
 * fails with the errno in SHIM_ACCEPT_ERRNO, as the kernel's does when the
 * process or the system is out of descriptors or memory; the client stays
 * in the listen backlog, and later calls go through. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/socket.h>

typedef int accept4_fn(int, struct sockaddr *, socklen_t *, int);

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    static int failed;
    const char *e = getenv("SHIM_ACCEPT_ERRNO");
    if (e && !__atomic_exchange_n(&failed, 1, __ATOMIC_SEQ_CST)) {
        errno = atoi(e);
        return -1;
    }
    accept4_fn *real = (accept4_fn *)dlsym(RTLD_NEXT, "accept4");
    return real ? real(fd, addr, len, flags) : (errno = ENOSYS, -1);
}
