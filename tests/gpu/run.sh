#!/bin/bash
# The real-GPU check, for the device machine (no Rust there: build here with
# `make`, carry target/release/nbd-vram). Uses the driver's own libcuda.so.1.
#   tests/gpu/run.sh [SIZE_MIB]          default 16384 (a 16 GiB store)
# Prints every figure; tee it into BENCHMARKS.md's raw log.
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

step "bench: VRAM store"
"$B" bench --connect "unix:$T/vram.sock" --seconds "$SECONDS_PER" | tee "$T/vram.txt"
kill %1; wait %1 2>/dev/null

step "bench: VRAM store, one driver call per copy (NBD_VRAM_BATCH=0)"
NBD_VRAM_BATCH=0 serve "$T/single.sock" --size "$SIZE" || fail=1
"$B" bench --connect "unix:$T/single.sock" --seconds "$SECONDS_PER" | tee "$T/single.txt"
kill %1; wait %1 2>/dev/null

step "bench: host store, same run"
serve "$T/host.sock" --store host --size "$SIZE" || fail=1
"$B" bench --connect "unix:$T/host.sock" --seconds "$SECONDS_PER" | tee "$T/host.txt"
kill %1; wait %1 2>/dev/null

step "VRAM (batched, single) / host per pattern"
mbps() { grep '^bench:' "$1" | sed 's/.*pattern=\([^ ]*\) mbps=\([^ ]*\).*/\1 \2/' | sort; }
join <(mbps "$T/vram.txt") <(mbps "$T/single.txt") | join - <(mbps "$T/host.txt") |
	awk '{printf "%-18s batched %8.1f  single %8.1f  host %8.1f MB/s  batched/host %5.1f%%  single/host %5.1f%%\n", $1, $2, $3, $4, 100*$2/$4, 100*$3/$4}'

step "server log"
cat "$T/serve.log"
echo
[ "$fail" = 0 ] && echo "GPU-TEST: PASS" || echo "GPU-TEST: FAIL"
exit "$fail"
