#!/bin/bash
# A/B of one build under several settings on the device machine: each
# VARIANT is "NAME|ENV ASSIGNMENTS|SERVE FLAGS"; every pass runs them all,
# pinned (server on CPU $PIN_S, client on $PIN_C: 2 and 4 unless set), in an order that rotates, and
# prints MB/s, p50 and the server's own account of each pattern (and the
# server's log lines that match SHOW, a regex, if set).
#   tests/gpu/env-ab.sh PASSES SIZE_MIB VARIANT...
#   e.g. tests/gpu/env-ab.sh 3 4096 'base||' 'host||--store host'
set -u
B=${B:-target/release/nbd-vram}
PASSES=$1 SIZE=$2; shift 2
T=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$T"' EXIT
date -u +%Y-%m-%dT%H:%MZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc

one() {   # PASS "NAME|ENV|FLAGS"
	local name env flags
	IFS='|' read -r name env flags <<<"$2"
	rm -f "$T/s.sock"
	# shellcheck disable=SC2086 # ENV and FLAGS are word lists by design
	env $env taskset -c "${PIN_S:-2}" "$B" serve --listen "unix:$T/s.sock" --size "$SIZE" $flags 2>"$T/log" &
	local pid=$!
	for _ in $(seq 600); do [ -S "$T/s.sock" ] && break; sleep 0.1; done
	echo "== pass $1 $name ($env $flags)"
	taskset -c "${PIN_C:-4}" "$B" bench --connect "unix:$T/s.sock" --seconds "${SECONDS_PER:-2}" >"$T/out"
	kill "$pid"; wait "$pid" 2>/dev/null
	paste -d' ' <(grep '^bench:' "$T/out" | sed 's/.*pattern=\([^ ]*\) mbps=\([^ ]*\).*p50_us=\([^ ]*\).*/\1 \2 MB\/s p50 \3 us/') \
		<(grep 'client done' "$T/log" | tail -n +2 | sed 's/.*client done ([A-Za-z]*): //')
	grep -q "client done" "$T/log" || cat "$T/log"
	if [ -n "${SHOW:-}" ]; then grep -E "$SHOW" "$T/log" | sort -u; fi
}
for p in $(seq "$PASSES"); do
	n=$#
	for i in $(seq 0 $((n - 1))); do
		k=$(( (i + p - 1) % n + 1 ))
		one "$p" "${!k}"
	done
done
