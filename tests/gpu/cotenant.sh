#!/bin/bash
# What nbd-vram's traffic, and its resident mailbox kernel in particular,
# costs another process's GPU work on the same GPU, and what that work
# costs nbd-vram. On the device machine, after building here:
#   mkdir -p target/probe && gcc -O2 -o target/probe/cotenant tests/gpu/cotenant.c -ldl
#   (carry target/release/nbd-vram and target/probe)  tests/gpu/cotenant.sh
# Runs the co-tenant alone, then the bench against nbd-vram alone, with the
# co-tenant, and with the co-tenant and NBD_VRAM_MAILBOX=0. The end of the
# bench's fill and each co-tenant second are stamped with the wall clock,
# so the co-tenant's figures can be read per bench pattern.
set -u
B=${B:-target/release/nbd-vram}
P=${P:-target/probe/cotenant}
SIZE=${SIZE:-4096}
S=${SECONDS_PER:-3}
T=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$T"' EXIT
date -u +%Y-%m-%dT%H:%MZ
nvidia-smi --query-gpu=name,driver_version,compute_mode --format=csv,noheader
stamp() { while IFS= read -r l; do printf '%s %s\n' "$(date +%s.%3N)" "$l"; done; }

echo "== co-tenant alone"
taskset -c 8 "$P" 4

# VARIANT: NAME COTENANT(0|1) [ENV...]
variant() {
	local name=$1 co=$2; shift 2
	echo "== $name"
	rm -f "$T/s.sock"
	env "$@" taskset -c 2 "$B" serve --listen "unix:$T/s.sock" --size "$SIZE" 2>"$T/log" &
	local pid=$! cot=
	for _ in $(seq 600); do [ -S "$T/s.sock" ] && break; sleep 0.1; done
	if [ "$co" = 1 ]; then
		taskset -c 8 "$P" $((8 * S + 6)) >"$T/co" &
		cot=$!
	fi
	# The bench prints its table at the end; its patterns run S seconds each
	# after the fill, in the order of the table (QD1 are the 5th and 6th).
	taskset -c 4 "$B" bench --connect "unix:$T/s.sock" --seconds "$S" 2>&1 | grep --line-buffered -E '^bench:|written in' | stamp
	kill "$pid"; wait "$pid" 2>/dev/null
	[ -n "$cot" ] && { kill "$cot" 2>/dev/null; wait "$cot" 2>/dev/null; cat "$T/co"; }
	grep -E "client done|rror|mailbox" "$T/log" | tail -n +2
}
variant "nbd-vram alone" 0
variant "nbd-vram with the co-tenant" 1
variant "nbd-vram with the co-tenant, NBD_VRAM_MAILBOX=0" 1 NBD_VRAM_MAILBOX=0
