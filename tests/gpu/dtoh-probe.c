// Latency probe, not part of nbd-vram: five ways to bring one 4 KiB piece
// of VRAM into pinned host memory, timed from the request to the data
// being visible to the CPU; then what handing over one 4 KiB write costs.
// Plain C against a dlopen'd libcuda, so it builds here without a CUDA toolkit and runs on the device machine:
//   mkdir -p target/probe && gcc -O2 -o target/probe/dtoh-probe tests/gpu/dtoh-probe.c -ldl -lpthread
//   (carry target/probe)  taskset -c 2 target/probe/dtoh-probe [GAP_US]
// P (resident mailbox kernel) was added later: docs/performance.md, "The mailbox kernel".
// GAP_US (default 20) is the idle time before each request, as between
// QD1 requests. Results: docs/performance.md, "Copy engine and copy kernel".
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
typedef int R; typedef uint64_t DP; typedef void *H;
static R (*cuInit)(unsigned); static R (*cuDeviceGet)(int*,int); static R (*cuDevicePrimaryCtxRetain)(H*,int);
static R (*cuCtxSetCurrent)(H); static R (*cuMemAlloc_v2)(DP*,size_t); static R (*cuMemHostAlloc)(void**,size_t,unsigned);
static R (*cuMemHostGetDevicePointer_v2)(DP*,void*,unsigned); static R (*cuStreamCreate)(H*,unsigned);
static R (*cuMemcpyDtoHAsync_v2)(void*,DP,size_t,H); static R (*cuStreamSynchronize)(H);
static R (*cuModuleLoadData)(H*,const void*); static R (*cuModuleGetFunction)(H*,H,const char*);
static R (*cuLaunchKernel)(H,unsigned,unsigned,unsigned,unsigned,unsigned,unsigned,unsigned,H,void**,void**);
static R (*cuStreamWaitValue32_v2)(H,DP,uint32_t,unsigned); static R (*cuStreamWriteValue32_v2)(H,DP,uint32_t,unsigned);
static R (*cuMemsetD8_v2)(DP,unsigned char,size_t);
static R (*cuMemcpyHtoDAsync_v2)(DP,const void*,size_t,H); static R (*cuMemcpyHtoD_v2)(DP,const void*,size_t);
#define L(f) do { *(void**)&f = dlsym(lib, #f); if (!f) { printf("no %s\n", #f); exit(1);} } while (0)
#define C(x) do { R r_ = (x); if (r_) { printf("%s = %d (line %d)\n", #x, r_, __LINE__); exit(1);} } while (0)
static const char *PTX =
".version 7.0\n.target sm_75\n.address_size 64\n"
".visible .entry probe_copy(.param .u64 pb)\n{\n"
" .reg .pred %p<3>; .reg .b32 %r<12>; .reg .b64 %rd<8>;\n"
" ld.param.u64 %rd1, [pb];\n"
" ld.volatile.global.u64 %rd2, [%rd1];\n ld.volatile.global.u64 %rd3, [%rd1+8];\n"
" ld.volatile.global.u32 %r1, [%rd1+16];\n ld.volatile.global.u32 %r2, [%rd1+20];\n"
" mov.u32 %r3, %tid.x;\n mul.lo.u32 %r4, %r3, 16;\n mov.u32 %r5, %ntid.x;\n mul.lo.u32 %r6, %r5, 16;\n"
"LOOP:\n setp.ge.u32 %p1, %r4, %r1;\n @%p1 bra END;\n cvt.u64.u32 %rd4, %r4;\n add.u64 %rd5, %rd2, %rd4;\n"
" ld.global.v4.u32 {%r7,%r8,%r9,%r10}, [%rd5];\n add.u64 %rd6, %rd3, %rd4;\n st.global.v4.u32 [%rd6], {%r7,%r8,%r9,%r10};\n"
" add.u32 %r4, %r4, %r6;\n bra LOOP;\nEND:\n membar.sys;\n bar.sync 0;\n setp.ne.u32 %p2, %r3, 0;\n @%p2 bra DONE;\n"
" st.volatile.global.u32 [%rd1+24], %r2;\nDONE:\n ret;\n}\n"
// P: one resident block; thread 0 polls a 16-byte job (source u64 at 64,
// sequence u32 at 72, length u32 at 76) in mapped pinned memory, the block
// copies it to dst and thread 0 writes the sequence to the done flag at 24.
// Sequence 0xffffffff ends it.
".visible .entry probe_mailbox(.param .u64 pb, .param .u64 dst, .param .u32 nap)\n{\n"
" .reg .pred %p<4>; .reg .b32 %r<16>; .reg .b64 %rd<12>;\n .shared .align 16 .b8 job[16];\n"
" ld.param.u64 %rd1, [pb];\n ld.param.u64 %rd2, [dst];\n ld.param.u32 %r12, [nap];\n mov.u32 %r3, %tid.x;\n mov.u32 %r11, 0;\n"
"WAIT:\n setp.ne.u32 %p1, %r3, 0;\n @%p1 bra SYNC1;\n"
"POLL:\n ld.volatile.global.v2.u64 {%rd3, %rd4}, [%rd1+64];\n cvt.u32.u64 %r1, %rd4;\n setp.eq.u32 %p2, %r1, %r11;\n @%p2 nanosleep.u32 %r12;\n @%p2 bra POLL;\n"
" st.shared.v2.u64 [job], {%rd3, %rd4};\n"
"SYNC1:\n bar.sync 0;\n ld.shared.v2.u64 {%rd3, %rd4}, [job];\n cvt.u32.u64 %r1, %rd4;\n shr.u64 %rd5, %rd4, 32;\n cvt.u32.u64 %r2, %rd5;\n"
" mov.u32 %r11, %r1;\n setp.eq.u32 %p3, %r1, -1;\n @%p3 bra EXIT;\n mul.lo.u32 %r4, %r3, 16;\n"
"CLOOP:\n setp.ge.u32 %p1, %r4, %r2;\n @%p1 bra CEND;\n cvt.u64.u32 %rd6, %r4;\n add.u64 %rd7, %rd3, %rd6;\n"
" ld.global.cg.v4.u32 {%r5,%r6,%r7,%r8}, [%rd7];\n add.u64 %rd8, %rd2, %rd6;\n st.global.v4.u32 [%rd8], {%r5,%r6,%r7,%r8};\n"
" add.u32 %r4, %r4, 4096;\n bra CLOOP;\n"
"CEND:\n membar.sys;\n bar.sync 0;\n setp.ne.u32 %p1, %r3, 0;\n @%p1 bra WAIT;\n st.volatile.global.u32 [%rd1+24], %r1;\n bra WAIT;\n"
"EXIT:\n ret;\n}\n";
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec / 1e3; }
static int cmp(const void *a, const void *b) { double x = *(double*)a, y = *(double*)b; return x < y ? -1 : x > y; }
#define N 3000
static double lat[N];
static void report(const char *name, double *extra) {
	qsort(lat, N, sizeof lat[0], cmp);
	printf("%-44s p10 %6.2f  p50 %6.2f  p90 %6.2f  p99 %6.2f us", name, lat[N/10], lat[N/2], lat[N*9/10], lat[N*99/100]);
	if (extra) { qsort(extra, N, sizeof extra[0], cmp); printf("   (arm p50 %.2f us)", extra[N/2]); }
	printf("\n");
}
#define WAITFLAG(s) do { double d_ = now(); while (pb[6] != (s)) if (now() - d_ > 1e6) { printf("timeout line %d\n", __LINE__); exit(2); } } while (0)
static void spin_us(double us) { double t = now(); while (now() - t < us) ; }
// "side" mode (argv[2]): what a resident mailbox kernel does to a QD1
// exchange over a socketpair between two CPUs (server thread on 2, client
// on 4): 16-byte requests, 4 KiB replies; the server spins on the socket as
// nbd-vram does. Per variant the client's round trip. Server work per
// request: none, a copy-engine read, or a mailbox job; the kernel absent,
// or resident with a nanosleep of 0, 200 or 1000 ns between polls.
#include <pthread.h>
#include <sched.h>
#include <sys/socket.h>
static int sp[2]; static volatile int side_stop; static int side_work; static H side_st, side_ctx; static DP side_vram;
static volatile uint32_t *side_pb; static unsigned char *side_stage; static uint32_t side_seq;
static void pin(int cpu) { cpu_set_t c; CPU_ZERO(&c); CPU_SET(cpu, &c); sched_setaffinity(0, sizeof c, &c); }
static void *side_server(void *arg) {
	(void)arg; pin(2); C(cuCtxSetCurrent(side_ctx));
	static unsigned char buf[4112]; unsigned char req[16];
	while (!side_stop) {
		if (recv(sp[0], req, 16, MSG_DONTWAIT) != 16) continue;
		uint64_t off = (uint64_t)(rand() % 262144) * 4096;
		if (side_work == 1) { C(cuMemcpyDtoHAsync_v2(side_stage, side_vram + off, 4096, side_st)); C(cuStreamSynchronize(side_st)); }
		if (side_work == 2) { uint32_t s = ++side_seq; ((volatile uint64_t*)side_pb)[8] = side_vram + off; side_pb[19] = 4096;
			__atomic_store_n(&side_pb[18], s, __ATOMIC_RELEASE); double d_ = now(); while (side_pb[6] != s) if (now() - d_ > 1e6) { printf("side timeout\n"); exit(2); } }
		if (send(sp[0], buf, sizeof buf, 0) != (ssize_t)sizeof buf) { perror("send"); exit(1); }
	}
	return 0;
}
static void side_run(const char *name) {
	pthread_t t; side_stop = 0; pthread_create(&t, 0, side_server, 0);
	pin(4); unsigned char req[16] = {0}; static unsigned char buf[4112];
	for (int i = 0; i < N; i++) { double t0 = now();
		if (send(sp[1], req, 16, 0) != 16 || recv(sp[1], buf, sizeof buf, MSG_WAITALL) != (ssize_t)sizeof buf) { perror("client"); exit(1); }
		lat[i] = now() - t0; }
	side_stop = 1; send(sp[1], req, 16, 0); pthread_join(t, 0); recv(sp[1], buf, sizeof buf, MSG_DONTWAIT); report(name, 0);
}
int main(int argc, char **argv) {
	double gap = argc > 1 ? atof(argv[1]) : 20;
	int side = argc > 2 && !strcmp(argv[2], "side");
	void *lib = dlopen("libcuda.so.1", RTLD_NOW); if (!lib) { printf("%s\n", dlerror()); return 1; }
	L(cuInit); L(cuDeviceGet); L(cuDevicePrimaryCtxRetain); L(cuCtxSetCurrent); L(cuMemAlloc_v2); L(cuMemHostAlloc);
	L(cuMemHostGetDevicePointer_v2); L(cuStreamCreate); L(cuMemcpyDtoHAsync_v2); L(cuStreamSynchronize);
	L(cuModuleLoadData); L(cuModuleGetFunction); L(cuLaunchKernel); L(cuStreamWaitValue32_v2); L(cuStreamWriteValue32_v2); L(cuMemsetD8_v2);
	L(cuMemcpyHtoDAsync_v2); L(cuMemcpyHtoD_v2);
	int dev; H ctx, st, mod, fn; DP vram, dpb, dstage;
	C(cuInit(0)); C(cuDeviceGet(&dev, 0)); C(cuDevicePrimaryCtxRetain(&ctx, dev)); C(cuCtxSetCurrent(ctx));
	size_t vlen = 1ul << 30; C(cuMemAlloc_v2(&vram, vlen)); C(cuMemsetD8_v2(vram, 0x5a, vlen));
	// One mapped pinned page holds the job and the flags: source u64 at 0,
	// destination u64 at 8, length at 16, sequence at 20, done flag at 24
	// (the device writes it), trigger at 32 (the CPU writes it).
	volatile uint32_t *pb; unsigned char *stage;
	C(cuMemHostAlloc((void**)&pb, 4096, 2)); C(cuMemHostAlloc((void**)&stage, 1 << 20, 2));
	C(cuMemHostGetDevicePointer_v2(&dpb, (void*)pb, 0)); C(cuMemHostGetDevicePointer_v2(&dstage, stage, 0));
	printf("uva: pb %s, stage %s; gap %.0f us\n", dpb == (DP)(uintptr_t)pb ? "same" : "differs", dstage == (DP)(uintptr_t)stage ? "same" : "differs", gap);
	memset((void*)pb, 0, 4096);
	C(cuStreamCreate(&st, 1)); C(cuModuleLoadData(&mod, PTX)); C(cuModuleGetFunction(&fn, mod, "probe_copy"));
	H mfn; C(cuModuleGetFunction(&mfn, mod, "probe_mailbox"));
	if (side) {
		if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp)) { perror("socketpair"); return 1; }
		side_st = st; side_vram = vram; side_pb = pb; side_stage = stage; side_ctx = ctx;
		for (int rep = 0; rep < 2; rep++) {
			side_work = 0; side_run("S0 no kernel, no work");
			side_work = 1; side_run("S1 no kernel, copy-engine read");
			for (unsigned nap = 0; nap <= 1000; nap += nap ? 800 : 200) {
				H mst; C(cuStreamCreate(&mst, 1)); uint64_t dst = dstage + 65536; void *margs[] = { &dpb, &dst, &nap };
				pb[18] = 0; side_seq = 0; C(cuLaunchKernel(mfn, 1, 1, 1, 256, 1, 1, 0, mst, margs, 0));
				char n1[64], n2[64], n3[64];
				snprintf(n1, 64, "S2 kernel nap %u ns, no work", nap); snprintf(n2, 64, "S3 kernel nap %u ns, copy-engine read", nap);
				snprintf(n3, 64, "S4 kernel nap %u ns, mailbox read", nap);
				side_work = 0; side_run(n1); side_work = 1; side_run(n2); side_work = 2; side_run(n3);
				__atomic_store_n(&pb[18], 0xffffffffu, __ATOMIC_RELEASE); C(cuStreamSynchronize(mst));
			}
		}
		return 0;
	}
	void *args[] = { &dpb };
	volatile uint64_t *p64 = (volatile uint64_t*)pb;
	#define OFF() ((uint64_t)(rand() % (vlen / 4096)) * 4096)
	static double arm[N];
	for (int rep = 0; rep < 2; rep++) {
	// A: async copy + stream sync (what nbd-vram does now)
	for (int i = 0; i < N; i++) { spin_us(gap); double t = now(); C(cuMemcpyDtoHAsync_v2(stage, vram + OFF(), 4096, st)); C(cuStreamSynchronize(st)); lat[i] = now() - t; }
	report("A copy engine + cuStreamSynchronize", 0);
	// E: async copy + device writes a flag; CPU spins on it
	for (int i = 0; i < N; i++) { uint32_t s = 1000000 + i; spin_us(gap); double t = now();
		C(cuMemcpyDtoHAsync_v2(stage, vram + OFF(), 4096, st)); C(cuStreamWriteValue32_v2(st, dpb + 24, s, 0));
		WAITFLAG(s);
		lat[i] = now() - t; }
	C(cuStreamSynchronize(st)); report("E copy engine + write-value flag, CPU spins", 0);
	// D: kernel launch, CPU spins on the kernel's flag
	for (int i = 0; i < N; i++) { uint32_t s = 2000000 + i; spin_us(gap); double t = now();
		p64[0] = vram + OFF(); p64[1] = dstage; pb[4] = 4096; pb[5] = s;
		C(cuLaunchKernel(fn, 1, 1, 1, 256, 1, 1, 0, st, args, 0));
		WAITFLAG(s);
		lat[i] = now() - t; }
	C(cuStreamSynchronize(st)); report("D kernel launch, CPU spins on its flag", 0);
	// F: pre-armed wait-value + copy engine (fixed source) + flag
	for (int i = 0; i < N; i++) { uint32_t s = 3000000 + i; double a = now();
		C(cuStreamWaitValue32_v2(st, dpb + 32, s, 0)); C(cuMemcpyDtoHAsync_v2(stage, vram + OFF(), 4096, st)); C(cuStreamWriteValue32_v2(st, dpb + 24, s, 0));
		arm[i] = now() - a; spin_us(gap); double t = now(); __atomic_store_n(&pb[8], s, __ATOMIC_RELEASE);
		WAITFLAG(s);
		lat[i] = now() - t; }
	C(cuStreamSynchronize(st)); report("F armed wait-value + copy engine + flag", arm);
	// C: pre-armed wait-value + kernel reading its job from host memory
	for (int i = 0; i < N; i++) { uint32_t s = 4000000 + i; double a = now();
		C(cuStreamWaitValue32_v2(st, dpb + 32, s, 0)); C(cuLaunchKernel(fn, 1, 1, 1, 256, 1, 1, 0, st, args, 0));
		arm[i] = now() - a; spin_us(gap); double t = now();
		p64[0] = vram + OFF(); p64[1] = dstage; pb[4] = 4096; pb[5] = s; __atomic_store_n(&pb[8], s, __ATOMIC_RELEASE);
		WAITFLAG(s);
		lat[i] = now() - t; }
	C(cuStreamSynchronize(st)); report("C armed wait-value + kernel, CPU spins", arm);
	// P: resident mailbox kernel on its own stream; W1 alongside it shows
	// whether the spinning block slows the copy engine.
	{ unsigned char pat[4096]; for (int k = 0; k < 4096; k++) pat[k] = (unsigned char)(k * 7 + 1);
	uint64_t mark = 4096 * 77; C(cuMemcpyHtoD_v2(vram + mark, pat, 4096));
	H mst; C(cuStreamCreate(&mst, 1)); uint64_t dst = dstage + 65536; unsigned nap = 0; void *margs[] = { &dpb, &dst, &nap };
	pb[18] = 0; C(cuLaunchKernel(mfn, 1, 1, 1, 256, 1, 1, 0, mst, margs, 0));
	for (int i = 0; i <= N; i++) { uint32_t s = 5000000 + rep * 10000 + i; spin_us(gap); double t = now();
		p64[8] = vram + (i == N ? mark : OFF()); pb[19] = 4096; __atomic_store_n(&pb[18], s, __ATOMIC_RELEASE);
		WAITFLAG(s);
		if (i < N) lat[i] = now() - t; }
	report("P resident mailbox kernel, CPU spins", 0);
	if (memcmp(stage + 65536, pat, 4096)) { printf("P: BAD data\n"); return 1; }
	for (int i = 0; i < N; i++) { spin_us(gap); double t = now(); C(cuMemcpyHtoDAsync_v2(vram + OFF(), stage, 4096, st)); lat[i] = now() - t; C(cuStreamSynchronize(st)); }
	report("W1 with the mailbox kernel resident", 0);
	for (int i = 0; i < N; i++) { spin_us(gap); double t = now(); C(cuMemcpyDtoHAsync_v2(stage, vram + OFF(), 4096, st)); C(cuStreamSynchronize(st)); lat[i] = now() - t; }
	report("A with the mailbox kernel resident", 0);
	__atomic_store_n(&pb[18], 0xffffffffu, __ATOMIC_RELEASE); C(cuStreamSynchronize(mst)); }
	}
	// Writes: what the call itself costs the CPU (the loop answers a write
	// once its copy is handed over), then, untimed, a wait for the copy.
	unsigned char *pageable = aligned_alloc(4096, 1 << 20);
	memset(pageable, 0x5a, 1 << 20); memset(stage, 0x5a, 1 << 20);
	for (int rep = 0; rep < 2; rep++) {
	for (int i = 0; i < N; i++) { spin_us(gap); double t = now(); C(cuMemcpyHtoDAsync_v2(vram + OFF(), stage, 4096, st)); lat[i] = now() - t; C(cuStreamSynchronize(st)); }
	report("W1 cuMemcpyHtoDAsync from pinned: the call", 0);
	for (int i = 0; i < N; i++) { spin_us(gap); double t = now(); C(cuMemcpyHtoDAsync_v2(vram + OFF(), pageable, 4096, st)); lat[i] = now() - t; C(cuStreamSynchronize(st)); }
	report("W2 cuMemcpyHtoDAsync from pageable: the call", 0);
	for (int i = 0; i < N; i++) { spin_us(gap); double t = now(); C(cuMemcpyHtoD_v2(vram + OFF(), pageable, 4096)); lat[i] = now() - t; C(cuStreamSynchronize(st)); }
	report("W3 cuMemcpyHtoD from pageable: the call", 0);
	for (int i = 0; i < N; i++) { spin_us(gap); double t = now(); C(cuMemcpyHtoD_v2(vram + OFF(), stage, 4096)); lat[i] = now() - t; }
	report("W4 cuMemcpyHtoD from pinned: the call", 0);
	for (int i = 0; i < N; i++) { spin_us(gap); double t = now(); C(cuMemcpyHtoDAsync_v2(vram + OFF(), stage, 4096, st)); C(cuStreamSynchronize(st)); lat[i] = now() - t; }
	report("W5 cuMemcpyHtoDAsync from pinned + sync", 0);
	}
	// check data of the last copy
	for (int k = 0; k < 4096; k++) if (stage[k] != 0x5a) { printf("BAD data at %d\n", k); return 1; }
	printf("data ok\n");
	return 0;
}
