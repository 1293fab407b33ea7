// Probe, not part of nbd-vram: how far the unix socket copies alone let
// sequential writes scale on a machine, with no NBD and no GPU. PAIRS
// pairs of threads (1, 2, 4, 8 in turn, twice), each a socketpair: one
// thread sends 1 MiB messages from an 8 MiB buffer, as a client sends
// write payloads; the other receives them into a ring of RING_MIB, as a
// server lands them in staging (32 MiB, one connection's staging) or in
// its store (512 MiB, past the caches). Prints MB/s moved by all pairs.
//   mkdir -p target/probe && gcc -O2 -pthread -o target/probe/socket-probe tests/gpu/socket-probe.c
//   target/probe/socket-probe [SECONDS] [RING_MIB]      (default 2 and 32)
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MIB ((size_t)1 << 20)
#define SEND_BUF (8 * MIB)

static atomic_int stop;
static size_t ring_len = 32 * MIB;

struct pair {
	int fd[2];
	atomic_ullong got;
};

static void *sender(void *arg)
{
	struct pair *p = arg;
	char *buf = aligned_alloc(4096, SEND_BUF);
	memset(buf, 1, SEND_BUF);
	for (size_t at = 0; !stop; at = (at + MIB) % SEND_BUF)
		for (size_t off = 0; off < MIB;) {
			ssize_t n = send(p->fd[0], buf + at + off, MIB - off, MSG_NOSIGNAL);
			if (n <= 0)
				goto out;
			off += n;
		}
out:
	shutdown(p->fd[0], SHUT_WR);
	free(buf);
	return NULL;
}

static void *receiver(void *arg)
{
	struct pair *p = arg;
	char *ring = aligned_alloc(4096, ring_len);
	memset(ring, 0, ring_len);
	for (size_t at = 0;;) {
		// Whole messages, each where the last ended, as staging is used.
		ssize_t n = recv(p->fd[1], ring + at, MIB - at % MIB, MSG_WAITALL);
		if (n <= 0)
			break;
		p->got += n;
		at = (at + n) % ring_len;
	}
	free(ring);
	return NULL;
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static unsigned long long moved(struct pair *ps, int n)
{
	unsigned long long sum = 0;
	for (int i = 0; i < n; i++)
		sum += ps[i].got;
	return sum;
}

int main(int argc, char **argv)
{
	double seconds = argc > 1 ? atof(argv[1]) : 2;
	if (argc > 2)
		ring_len = (size_t)atoi(argv[2]) * MIB;
	if (seconds <= 0 || ring_len < MIB) {
		printf("SECONDS must be above 0 and RING_MIB at least 1\n");
		return 1;
	}
	for (int round = 1; round <= 2; round++)
		for (int n = 1; n <= 8; n *= 2) {
			struct pair ps[8];
			pthread_t t[16];
			stop = 0;
			for (int i = 0; i < n; i++) {
				if (socketpair(AF_UNIX, SOCK_STREAM, 0, ps[i].fd)) {
					perror("socketpair");
					return 1;
				}
				ps[i].got = 0;
				pthread_create(&t[2 * i], NULL, sender, &ps[i]);
				pthread_create(&t[2 * i + 1], NULL, receiver, &ps[i]);
			}
			usleep(300000); // past the first touches of every buffer
			unsigned long long before = moved(ps, n);
			double start = now();
			usleep((useconds_t)(seconds * 1e6));
			double mbps = (moved(ps, n) - before) / (now() - start) / 1e6;
			stop = 1;
			for (int i = 0; i < 2 * n; i++)
				pthread_join(t[i], NULL);
			for (int i = 0; i < n; i++) {
				close(ps[i].fd[0]);
				close(ps[i].fd[1]);
			}
			printf("socket-probe: ring_mib=%zu round=%d pairs=%d mbps=%.0f\n", ring_len / MIB, round, n, mbps);
			fflush(stdout);
		}
	return 0;
}
