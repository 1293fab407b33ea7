#!/bin/bash
# What nbd-vram's traffic, and its resident mailbox kernel in particular,
# costs another process's GPU work on the same GPU, and what that work
# costs nbd-vram. On the device machine, after building here:
#   mkdir -p target/probe && for p in cotenant htod-probe nvml-probe; do
#     gcc -O2 -o target/probe/$p tests/gpu/$p.c -ldl; done
#   (carry target/release/nbd-vram and target/probe)  tests/gpu/cotenant.sh [PARTS]
# PARTS (default all): alone none after shared before verify copies line rows rows-alone. Each bench variant
# runs the bench against nbd-vram with the co-tenant (cotenant.c) started
# after nbd-vram has set up (so its memory shows: nbd-vram should keep
# copies off its kernels), the same with NBD_VRAM_SHARED=0 (the harm it
# avoids), or started before nbd-vram (which free memory cannot show).
# 'verify' runs bench --verify (whole store, then lone reads, a quarter
# right after a 4 KiB write: the 2D copies) with the co-tenant there first.
# 'copies', 'line' and 'rows' run htod-probe.c's lists beside the
# co-tenant; 'rows-alone' runs the 'rows' list without it. The end of the bench's
# fill and each co-tenant second are stamped with the wall clock, so the
# co-tenant's figures can be read per bench pattern.
set -u
B=${B:-target/release/nbd-vram}
P=${P:-target/probe}
SIZE=${SIZE:-4096}
S=${SECONDS_PER:-3}
PARTS=${*:-alone none after shared before verify copies line rows rows-alone}
T=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$T"' EXIT
date -u +%Y-%m-%dT%H:%MZ
nvidia-smi --query-gpu=name,driver_version,compute_mode --format=csv,noheader
stamp() { while IFS= read -r l; do printf '%s %s\n' "$(date +%s.%3N)" "$l"; done; }
cotenant() { taskset -c 8 "$P/cotenant" "$1" >"$T/co" & cot=$!; }
cotenant_done() { kill "$cot" 2>/dev/null; wait "$cot" 2>/dev/null; cat "$T/co"; }

# VARIANT: NAME WHEN(none|after|before) [ENV...]
variant() {
	local name=$1 when=$2; shift 2
	echo "== $name"
	rm -f "$T/s.sock"
	cot=
	[ "$when" = before ] && { cotenant $((8 * S + 10)); sleep 2; "$P/nvml-probe" 20; }
	env "$@" taskset -c 2 "$B" serve --listen "unix:$T/s.sock" --size "$SIZE" 2>"$T/log" &
	local pid=$!
	for _ in $(seq 600); do [ -S "$T/s.sock" ] && break; sleep 0.1; done
	[ "$when" = after ] && cotenant $((8 * S + 6))
	# The bench prints its table at the end; its patterns run S seconds each
	# after the fill, in the order of the table (QD1 are the 5th and 6th).
	taskset -c 4 "$B" bench --connect "unix:$T/s.sock" --seconds "$S" 2>&1 | grep --line-buffered -E '^bench:|written in' | stamp
	[ "$when" != none ] && "$P/nvml-probe" 20
	kill "$pid"; wait "$pid" 2>/dev/null
	[ -n "$cot" ] && cotenant_done
	grep -E "client done|rror|mailbox|other process|ours alone|NVML" "$T/log" | tail -n +2
}
for part in $PARTS; do
	case $part in
	alone) echo "== co-tenant alone"; "$P/nvml-probe" 200; taskset -c 8 "$P/cotenant" 4 ;;
	none) variant "nbd-vram alone" none ;;
	after) variant "co-tenant started after nbd-vram's set-up" after ;;
	shared) variant "co-tenant started after set-up, NBD_VRAM_SHARED=0" after NBD_VRAM_SHARED=0 ;;
	before) variant "co-tenant started before nbd-vram" before ;;
	verify)
		echo "== bench --verify, co-tenant there first"
		rm -f "$T/s.sock"; cotenant 60; sleep 2
		taskset -c 2 "$B" serve --listen "unix:$T/s.sock" --size "$SIZE" 2>"$T/log" &
		local_pid=$!
		for _ in $(seq 600); do [ -S "$T/s.sock" ] && break; sleep 0.1; done
		taskset -c 4 "$B" bench --connect "unix:$T/s.sock" --verify
		kill "$local_pid"; wait "$local_pid" 2>/dev/null
		cotenant_done | tail -3
		grep -E "rror|other process|NVML" "$T/log" ;;
	copies|line|rows)
		echo "== lone copies beside the co-tenant (htod-probe.c $part)"
		cotenant $((16 * (S + 1) + 6)); sleep 1
		taskset -c 2 "$P/htod-probe" "$S" "$part"
		cotenant_done ;;
	rows-alone) echo "== lone copies, GPU otherwise idle (htod-probe.c rows)"; taskset -c 2 "$P/htod-probe" "$S" rows ;;
	esac
done
