#!/bin/bash
# A/B of the copy kernel on the device machine: the same build served with
# the kernel loaded and with NBD_VRAM_KERNEL=0, alternating, each pass with
# its thread count and CPU affinity, unpinned and then with server and
# client pinned to their own CPUs (PIN="2 4"), so that placement can be told
# from the module's cost.   tests/gpu/kernel-ab.sh [PASSES] [SIZE_MIB]
set -u
B=${B:-target/release/nbd-vram}
PASSES=${1:-2}
SIZE=${2:-4096}
T=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$T"' EXIT
date -u +%Y-%m-%dT%H:%MZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc

one() {   # NAME KERNEL(0|1) [CPU_SERVER CPU_CLIENT]
	local name=$1 k=$2 s=${3:-} c=${4:-}
	local run_s=() run_c=()
	[ -n "$s" ] && run_s=(taskset -c "$s") && run_c=(taskset -c "$c")
	rm -f "$T/s.sock"
	NBD_VRAM_KERNEL=$k "${run_s[@]}" "$B" serve --listen "unix:$T/s.sock" --size "$SIZE" 2>"$T/$name.log" &
	local pid=$!
	for _ in $(seq 600); do [ -S "$T/s.sock" ] && break; sleep 0.1; done
	echo "== $name kernel=$k pin=${s:-none}/${c:-none} threads=$(grep Threads /proc/$pid/status | cut -f2) cpus=$(grep Cpus_allowed_list /proc/$pid/status | cut -f2)"
	"${run_c[@]}" "$B" bench --connect "unix:$T/s.sock" --seconds 2 | grep '^bench:' | sed 's/.*pattern=\([^ ]*\) mbps=\([^ ]*\).*p50_us=\([^ ]*\).*/\1 \2 MB\/s p50 \3 us/'
	echo "threads after: $(grep Threads /proc/$pid/status | cut -f2)"
	kill "$pid"; wait "$pid" 2>/dev/null
}
for p in $(seq "$PASSES"); do
	if [ $((p % 2)) = 1 ]; then order="1 0"; else order="0 1"; fi
	for k in $order; do one "free-$p-$k" "$k"; done
	for k in $order; do one "pinned-$p-$k" "$k" 2 4; done
done
