#!/bin/bash
# The real-GPU check, for the device machine (no Rust there: build here with
# `make`, carry target/release/nbd-vram). Uses the driver's own libcuda.so.1.
#   tests/gpu/run.sh [SIZE_MIB]          default 16384 (a 16 GiB store)
# Prints every figure. Raw logs are not kept in the tree: copy the figures
# you quote, with the command, date and machine, into docs/performance.md.
set -u
B=${B:-target/release/nbd-vram}
SIZE=${1:-16384}
SECONDS_PER=${SECONDS_PER:-3}
T=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$T"' EXIT
fail=0
step() { echo; echo "== $*"; }
check() { if "$@"; then echo "ok: $*"; else echo "FAIL: $*"; fail=1; fi; }

# Starts a server in the background and waits for its socket.
serve() {
	local sock=$1; shift
	"$B" serve --listen "unix:$sock" "$@" 2>>"$T/serve.log" &
	for _ in $(seq 600); do [ -S "$sock" ] && return 0; sleep 0.1; done
	echo "server on $sock did not start"; cat "$T/serve.log"; return 1
}

step "machine"
date -u +%Y-%m-%dT%H:%MZ
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
uname -sr; nproc; ldd "$B"; ls -l "$B"
"$B" --version

step "gpus"
"$B" gpus

# Every call that waits for a running kernel must be one that
# src/cuda/gate.rs keeps apart from mailbox kernels: a driver that made
# another wait would hang a tier of several slices.
step "driver calls that wait for a running kernel"
if [ -x target/probe/blocking-probe ]; then
	target/probe/blocking-probe 300 | tee "$T/blocking.txt"
	check grep -q '^cuMemFree_v2 .* yes' "$T/blocking.txt"
	check sh -c "! grep ' yes' '$T/blocking.txt' | grep -vE '^(cuMemFree_v2|cuMemFreeHost|cuModuleLoadData|cuModuleUnload) '"
else
	echo "target/probe/blocking-probe not carried (gcc -O2 -o target/probe/blocking-probe tests/gpu/blocking-probe.c -ldl -lpthread)"
fi

# A store's first copies come after the zeroing of fresh VRAM only
# because its copier streams are blocking (DeviceMem::clear); the other
# lines are what the fake driver models, printed for comparison.
step "a memset's order with the streams"
if [ -x target/probe/ordering-probe ]; then
	target/probe/ordering-probe 8192 | tee "$T/ordering.txt"
	check grep -q "^a blocking stream's copy waits for it: yes" "$T/ordering.txt"
else
	echo "target/probe/ordering-probe not carried (gcc -O2 -o target/probe/ordering-probe tests/gpu/ordering-probe.c -ldl)"
fi

# A mailbox job that a fault elsewhere in the context ended is never
# done, and the store reports it failed, as the fake driver makes it do:
# that a fault ends such a kernel is what this checks.
step "a fault ends a kernel on another stream"
if [ -x target/probe/fault-probe ]; then
	timeout 60 target/probe/fault-probe | tee "$T/fault.txt"
	check grep -q "^it ends the kernel spinning on another stream, .*: yes" "$T/fault.txt"
else
	echo "target/probe/fault-probe not carried (gcc -O2 -o target/probe/fault-probe tests/gpu/fault-probe.c -ldl)"
fi

step "invalid --gpu"
n=$(nvidia-smi -L | wc -l)
"$B" serve --listen "unix:$T/bad.sock" --gpu "$n" --size 1024; rc=$?
check [ "$rc" = 3 ]

step "fallback: ask for more than the card has"
total=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
ask=$((total + 4096))
serve "$T/fb.sock" --size "$ask" || fail=1
kill %1; wait %1 2>/dev/null
grep -E "cannot allocate|allocated|locked" "$T/serve.log" | sed -n '1,3p;$p'
check grep -q "allocated .* MiB of VRAM" "$T/serve.log"
: >"$T/serve.log"

step "VRAM store of $SIZE MiB: write, read back and verify the whole range"
serve "$T/vram.sock" --size "$SIZE" || fail=1
grep -E "allocated|locked" "$T/serve.log"
check "$B" bench --connect "unix:$T/vram.sock" --verify
nvidia-smi --query-compute-apps=pid,used_memory --format=csv
kill %1; wait %1 2>/dev/null

# A write answered on one connection is only queued: the other
# connections' streams and mailbox kernels must wait for it on the GPU,
# which only the real driver can show racing. Requests one at a time, so
# each loop idles between them and its mailbox kernel serves.
step "4 connections to one VRAM store: every read on another connection than its write"
serve "$T/multi.sock" --size 4096 --connections 4 || fail=1
check "$B" bench --connect "unix:$T/multi.sock" --verify --connections 4
kill %1; wait %1 2>/dev/null
grep -E "mailbox kernel|client done" "$T/serve.log"
: >"$T/serve.log"

# LIFECYCLE (default 20; 0 leaves it out): a VRAM server stopped by
# SIGTERM, by SIGINT and as `nbd-vram stop` does it (SIGTERM, then wait
# until the process is gone), LIFECYCLE times each, every other time under
# bench traffic. Each must exit 0 with "stopped" logged, never die by the
# signal (the driver's threads must block it too), and each new process
# must allocate the same size again. One summary line per case.
# LIFE_CONNS (default 1): the server serves that many connections, and the
# bench traffic uses them all.
LIFECYCLE=${LIFECYCLE:-20}
LIFE_CONNS=${LIFE_CONNS:-1}
lifecycle_one() {   # SIGNAL HOW TRY: exit status, or "no-stop-logged" / "no-alloc"
	local sig=$1 how=$2 try=$3 log="$T/life.log" sock="$T/life.sock" bench=
	rm -f "$sock"; : >"$log"
	"$B" serve --listen "unix:$sock" --size 1024 --connections "$LIFE_CONNS" 2>"$log" &
	local pid=$!
	for _ in $(seq 600); do [ -S "$sock" ] && break; sleep 0.05; done
	grep -q "allocated 1024 MiB of VRAM" "$log" || { kill -9 "$pid"; wait "$pid" 2>/dev/null; echo no-alloc; return; }
	if [ $((try % 2)) = 1 ]; then
		"$B" bench --connect "unix:$sock" --connections "$LIFE_CONNS" --seconds 5 >/dev/null 2>&1 &
		bench=$!
		sleep 1
	fi
	kill -s "$sig" "$pid"
	if [ "$how" = stop ]; then   # what `nbd-vram stop` does: poll until gone
		for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
	fi
	wait "$pid"; local rc=$?
	[ -n "$bench" ] && { kill "$bench" 2>/dev/null; wait "$bench" 2>/dev/null; }
	if [ "$rc" != 0 ]; then echo "$rc"; elif ! grep -q '^nbd-vram: stopped$' "$log"; then echo no-stop-logged; else echo 0; fi
}
if [ "$LIFECYCLE" -gt 0 ]; then
	step "lifecycle: $LIFECYCLE stops each (odd tries under bench traffic), $LIFE_CONNS connection(s)"
	for c in "TERM signal" "INT signal" "TERM stop"; do
		read -r sig how <<<"$c"
		clean=0 bad=""
		for i in $(seq "$LIFECYCLE"); do
			r=$(lifecycle_one "$sig" "$how" "$i")
			if [ "$r" = 0 ]; then clean=$((clean + 1)); else bad="$bad $i:$r"; fi
		done
		echo "lifecycle: case=SIG$sig-$how connections=$LIFE_CONNS clean=$clean/$LIFECYCLE${bad:+ failed=$bad}"
		check [ "$clean" = "$LIFECYCLE" ]
	done
fi

# Benchmarks one server: NAME BINARY [serve options]; the environment
# passes through. Prints the table, then the server's own account of each
# pattern's time (one connection per pattern, after the fill's).
# PIN="S C" runs the server on CPU S and the client on CPU C, so that the
# scheduler's placement does not move the figures between servers. taskset
# runs either way (unpinned: every CPU), and is called directly, not from
# a function: `function &` would make $! a subshell, and killing it would
# leave the server running.
read -r PIN_S PIN_C <<<"${PIN:-}"
ALL_CPUS=0-$(($(nproc) - 1))
bench_one() {
	local name=$1 bin=$2; shift 2
	step "bench: $name ($*${NBD_VRAM_GROUP:+, NBD_VRAM_GROUP=$NBD_VRAM_GROUP}${SERVER_ENV:+, $SERVER_ENV}${PIN:+, server on CPU $PIN_S, client on CPU $PIN_C})"
	rm -f "$T/$name.sock"
	env ${SERVER_ENV:-} taskset -c "${PIN_S:-$ALL_CPUS}" "$bin" serve --listen "unix:$T/$name.sock" "$@" 2>"$T/$name.log" &
	local pid=$!
	for _ in $(seq 600); do [ -S "$T/$name.sock" ] && break; sleep 0.1; done
	taskset -c "${PIN_C:-$ALL_CPUS}" "$B" bench --connect "unix:$T/$name.sock" --seconds "$SECONDS_PER" | tee "$T/$name.txt"
	kill "$pid"; wait "$pid" 2>/dev/null
	grep -q "client done" "$T/$name.log" || { cat "$T/$name.log"; fail=1; }
	paste -d' ' <(grep '^bench:' "$T/$name.txt" | sed 's/.*pattern=\([^ ]*\).*/\1/') \
		<(grep 'client done' "$T/$name.log" | tail -n +2 | sed 's/.*client done ([A-Za-z]*): //')
	cat "$T/$name.log" >>"$T/serve.log"
}

# ROUNDS (default 1) repeats the whole set, so that the spread between
# rounds shows what is noise. target/gpu/nbd-vram-before, if carried, is
# an older build benchmarked alongside; GROUP0=1 adds the VRAM store with
# one fence per batch. vram-ab is the same build with the server
# environment AB (default NBD_VRAM_MAILBOX=0: no mailbox kernel; AB= to
# leave it out; AB=NBD_VRAM_KERNEL=0 measures the copy kernel against the
# copy engine alone, as in docs/performance.md, "Copy engine and copy kernel").
mbps() { grep '^bench:' "$1" | sed 's/.*pattern=\([^ ]*\) mbps=\([^ ]*\).*/\1 \2/' | sort; }
for r in $(seq "${ROUNDS:-1}"); do
	# Which goes first alternates, so that place in the round cannot pass
	# for the difference between them.
	# The host store goes first in even rounds and last in odd ones, for
	# the same reason.
	AB=${AB-NBD_VRAM_MAILBOX=0}
	[ $((r % 2)) = 0 ] && bench_one "host-$r" "$B" --store host --size "$SIZE"
	[ -n "$AB" ] && [ $((r % 2)) = 0 ] && SERVER_ENV=$AB bench_one "vram-ab-$r" "$B" --size "$SIZE"
	bench_one "vram-$r" "$B" --size "$SIZE"
	[ -n "$AB" ] && [ $((r % 2)) = 1 ] && SERVER_ENV=$AB bench_one "vram-ab-$r" "$B" --size "$SIZE"
	[ "${GROUP0:-0}" = 1 ] && NBD_VRAM_GROUP=0 bench_one "vram-group0-$r" "$B" --size "$SIZE"
	[ -x target/gpu/nbd-vram-before ] && bench_one "vram-before-$r" target/gpu/nbd-vram-before --size "$SIZE"
	[ $((r % 2)) = 1 ] && bench_one "host-$r" "$B" --store host --size "$SIZE"

	step "round $r: each VRAM server / host per pattern (MB/s)"
	for name in vram vram-ab vram-group0 vram-before; do
		[ -f "$T/$name-$r.txt" ] || continue
		join <(mbps "$T/$name-$r.txt") <(mbps "$T/host-$r.txt") |
			awk -v n="$name" '{printf "%-12s %-18s %8.1f  host %8.1f MB/s  %5.1f%%\n", n, $1, $2, $3, 100*$2/$3}'
	done
done

# TURNS (default 3; 0 leaves it out): the servers take turns within each
# pattern instead, 1 s at a time, TURNS each, all up at once on the same
# CPUs: the host store, a second host store (its ratio to the first is
# the noise this way of measuring leaves) and the VRAM store. A machine
# whose speed drifts between rounds (above: the host store's own figures
# moved up to 20 % from one round to the next) then moves them all alike.
# One VRAM server, unless BEFORE=1 adds target/gpu/nbd-vram-before (an
# older build) beside it; the two then ignore each other
# (NBD_VRAM_SHARED=0), but their contexts still take turns on the GPU.
TURNS=${TURNS:-3}
if [ "$TURNS" -gt 0 ]; then
	step "in turns: $TURNS s per server and pattern${PIN:+, servers on CPU $PIN_S, client on CPU $PIN_C}"
	args=()
	turn() {   # NAME [serve options]
		local name=$1; shift
		rm -f "$T/$name.sock"
		taskset -c "${PIN_S:-$ALL_CPUS}" "$B" serve --listen "unix:$T/$name.sock" "$@" 2>>"$T/turns.log" &
		for _ in $(seq 600); do [ -S "$T/$name.sock" ] && break; sleep 0.1; done
		args+=(--connect "unix:$T/$name.sock" --label "$name")
	}
	turn host --store host --size "$SIZE"
	turn host2 --store host --size "$SIZE"
	if [ "${BEFORE:-0}" = 1 ] && [ -x target/gpu/nbd-vram-before ]; then
		# Two VRAM servers would each see the other as a process sharing
		# the GPU: told not to look, each serves as it does alone.
		export NBD_VRAM_SHARED=0
		B=target/gpu/nbd-vram-before turn vram-before --size "$SIZE"
	fi
	turn vram --size "$SIZE"
	taskset -c "${PIN_C:-$ALL_CPUS}" "$B" bench --seconds "$TURNS" "${args[@]}" >"$T/turns.txt" || fail=1
	cat "$T/turns.txt"
	kill $(jobs -p) 2>/dev/null; wait 2>/dev/null
	grep '^bench: ratio=' "$T/turns.txt" | sed 's/bench: ratio=\([^ ]*\) pattern=\([^ ]*\) mbps=\(.*\)/\1 \2 \3/' |
		awk '{printf "%-16s %-20s %6.1f%%\n", $1, $2, 100*$3}'
	cat "$T/turns.log" >>"$T/serve.log"
fi

step "server log"
cat "$T/serve.log"
echo
[ "$fail" = 0 ] && echo "GPU-TEST: PASS" || echo "GPU-TEST: FAIL"
exit "$fail"
