#!/bin/sh
# What polling costs when requests come one at a time and apart: the host
# store served with polling on (the default) and off (NBD_VRAM_SPIN=0),
# server on CPU 0, client on CPU 1, 4 KiB reads GAP µs apart for each GAP.
#   sh tests/bench/poll-cost.sh [SECONDS_PER_GAP]     (python3-libnbd)
set -eu
cd "$(dirname "$0")/../.."
B=target/release/nbd-vram
S=${TMPDIR:-/tmp}/nbd-vram-poll-cost.$$
date -u +%Y-%m-%dT%H:%MZ; nproc; git log --oneline -1 | cut -c1-60
for spin in 50 0; do
	rm -f "$S"
	NBD_VRAM_SPIN=$spin taskset -c 0 $B serve --store host --size 64M --listen "unix:$S" 2>/dev/null &
	pid=$!
	while [ ! -S "$S" ]; do sleep 0.1; done
	echo "== NBD_VRAM_SPIN=$spin"
	for gap in 0 20 50 100 200 1000; do
		taskset -c 1 /usr/bin/python3 tests/bench/poll-cost.py "$S" $pid $gap "${1:-3}"
	done
	kill $pid
	wait $pid || true
done
rm -f "$S"
