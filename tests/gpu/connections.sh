#!/bin/bash
# The connections curve, for the device machine: nbd-vram's VRAM store,
# the same with NBD_VRAM_UNCACHED=0 (write payloads through the CPU
# caches), its host store and nbdkit's memory plugin, each serving up to
# 8 clients at once in one process, driven by `nbd-vram bench
# --connections N` for N = 1, 2, 4, 8, the servers taking turns within
# each pattern (so a machine that drifts moves them all alike). At N = 1
# an older build, if carried as BEFORE (default
# target/gpu/nbd-vram-before), takes its turns too: one connection against
# the build before several existed.
#   tests/gpu/connections.sh [SIZE_MIB]      default 8192 per server
# Carry target/release/nbd-vram, and target/peers: nbdkit, its memory
# plugin (plugins/) and the libraries they need (lib/), copied from the
# build machine, as the device machine has no package registry. Prints
# every figure, then each server's account of where its loops' time went.
# If target/probe/socket-probe is there (tests/gpu/socket-probe.c), it
# runs before and after the curve: how far the socket copies alone scale
# on this machine, the yardstick for the servers' sequential writes.
set -u
B=${B:-target/release/nbd-vram}
BEFORE=${BEFORE:-target/gpu/nbd-vram-before}
SIZE=${1:-8192}
SECONDS_PER=${SECONDS_PER:-2}
T=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$T"' EXIT
listening() { for _ in $(seq 600); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "no server on $1"; exit 1; }

date -u +%Y-%m-%dT%H:%MZ
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
nproc
NBD_VRAM_SHARED=0 "$B" serve --listen "unix:$T/vram.sock" --size "$SIZE" --connections 8 2>"$T/vram.log" &
NBD_VRAM_SHARED=0 NBD_VRAM_UNCACHED=0 "$B" serve --listen "unix:$T/cached.sock" --size "$SIZE" --connections 8 2>"$T/cached.log" &
"$B" serve --listen "unix:$T/host.sock" --store host --size "$SIZE" --connections 8 2>"$T/host.log" &
LD_LIBRARY_PATH=target/peers/lib target/peers/nbdkit -f -U "$T/nbdkit.sock" \
	target/peers/plugins/nbdkit-memory-plugin.so "size=${SIZE}M" 2>"$T/nbdkit.log" &
before=()
if [ -x "$BEFORE" ]; then
	# Two VRAM servers would each see the other as a process sharing the
	# GPU: told not to look, each serves as it does alone.
	NBD_VRAM_SHARED=0 "$BEFORE" serve --listen "unix:$T/before.sock" --size "$SIZE" 2>"$T/before.log" &
	listening "$T/before.sock"
	before=(--connect "unix:$T/before.sock" --label vram-before)
fi
for s in vram cached host nbdkit; do listening "$T/$s.sock"; done
socket_probe() {
	[ -x target/probe/socket-probe ] || return 0
	echo; echo "== the socket copies alone, $1 the curve (1 MiB messages into a 32 MiB ring)"
	target/probe/socket-probe "$SECONDS_PER" 32
}
socket_probe before
for n in 1 2 4 8; do
	echo; echo "== $n connection(s) each"
	extra=()
	[ "$n" = 1 ] && extra=("${before[@]}")
	"$B" bench --seconds "$SECONDS_PER" --connections "$n" \
		--connect "unix:$T/vram.sock" --label vram "${extra[@]}" \
		--connect "unix:$T/cached.sock" --label cached \
		--connect "unix:$T/host.sock" --label host \
		--connect "unix:$T/nbdkit.sock" --label nbdkit | tee "$T/bench-$n.txt" | grep -v '^bench: conn='
done
socket_probe after
echo; echo "== where each VRAM client's loop spent its time (one line per client, in order)"
grep 'client done' "$T/vram.log"
echo; echo "== host store"
grep 'client done' "$T/host.log"
