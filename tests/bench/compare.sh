#!/bin/sh
# nbd-vram against other NBD servers on this machine, all in RAM and all on
# unix sockets: `nbd-vram serve --store host`, nbdkit's memory plugin and
# qemu-nbd over a file in /dev/shm, each 1 GiB.
#
# 1. `nbd-vram bench` (the kernel's access patterns) against each: one table
#    with MB/s, IOPS, p50 and p99 per pattern per server, and the ratio of
#    nbd-vram's MB/s to the best peer's.
# 2. nbdcopy, an independent client, once per server: 512 MiB from a file
#    in /dev/shm into the export, then the whole export (1 GiB) out to null:,
#    one connection (-C 1) each, as the kernel uses one.
# 3. `nbd-vram bench --sweep` against all three: sequential MB/s against
#    request size, plotted to target/bench/throughput.svg.
#
# Usage: sh tests/bench/compare.sh [BINARY]   (make bench)
# Environment: SECONDS_PER_PATTERN (default 2), ROUNDS (default 3: the
# table shows each figure's median over the rounds and the MB/s range),
# PIN (default 1 where there are 2+ CPUs: every server on the last CPU, the
# bench client on the first, so that each server gets one core and the
# scheduler's placement does not pick the winner; 0: no pinning),
# SECONDS_PER_POINT (sweep, default 2), OUT (default target/bench).
# Runs in about 6 minutes.
set -eu

BIN=${1:-target/release/nbd-vram}
SECS=${SECONDS_PER_PATTERN:-2}
ROUNDS=${ROUNDS:-3}
last=$(($(nproc) - 1))
PIN=${PIN:-$([ "$last" -gt 0 ] && echo 1 || echo 0)}
# on_server runs in the background: it execs, so that $! is the server
# itself and cleanup's kill reaches it (killing the subshell would not).
if [ "$PIN" = 1 ]; then
    on_server() { exec taskset -c "$last" "$@"; }
    on_client() { taskset -c 0 "$@"; }
else
    on_server() { exec "$@"; }
    on_client() { "$@"; }
fi
PSECS=${SECONDS_PER_POINT:-2}
OUT=${OUT:-target/bench}
for tool in nbdkit qemu-nbd nbdcopy; do
    command -v $tool >/dev/null || { echo "compare.sh: $tool is missing (make deps)" >&2; exit 1; }
done
[ -x "$BIN" ] || { echo "compare.sh: no $BIN (make)" >&2; exit 1; }
mkdir -p "$OUT"

dir=$(mktemp -d /tmp/nbd-vram-bench.XXXXXX)
img=/dev/shm/nbd-vram-bench-$$.img
src=/dev/shm/nbd-vram-bench-$$.src
pids=""
cleanup() {
    for p in $pids; do kill "$p" 2>/dev/null || true; done
    for p in $pids; do wait "$p" 2>/dev/null || true; done
    rm -rf "$dir" "$img" "$src"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

truncate -s 1G "$img"
# nbd-vram logs its time by phase per connection (one per pattern).
on_server "$BIN" serve --store host --size 1G --listen "unix:$dir/nbd-vram.sock" 2>"$OUT/nbd-vram.log" & pids="$pids $!"
on_server nbdkit -f --unix "$dir/nbdkit.sock" memory 1G & pids="$pids $!"
on_server qemu-nbd -f raw -k "$dir/qemu-nbd.sock" --persistent "$img" & pids="$pids $!"
SERVERS="nbd-vram nbdkit qemu-nbd"
for s in $SERVERS; do
    i=0
    while [ ! -S "$dir/$s.sock" ]; do
        i=$((i + 1))
        [ $i -le 100 ] || { echo "compare.sh: $s did not start" >&2; exit 1; }
        sleep 0.1
    done
done

echo "compare.sh: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, $(uname -sr); nbd-vram $("$BIN" --version | cut -d' ' -f2)," \
    "$(nbdkit --version), $(qemu-nbd --version | head -1), ${SECS} s per pattern, $ROUNDS rounds," \
    "$([ "$PIN" = 1 ] && echo "servers on CPU $last, client on CPU 0" || echo "not pinned")"

# 1. The kernel's patterns, the servers taking turns in each round.
for r in $(seq "$ROUNDS"); do
    for s in $SERVERS; do
        echo "compare.sh: round $r of $ROUNDS: nbd-vram bench against $s ..." >&2
        on_client timeout 120 "$BIN" bench -q --connect "unix:$dir/$s.sock" --seconds "$SECS" >"$dir/$s.$r.out"
    done
done
echo
for r in $(seq "$ROUNDS"); do
    for s in $SERVERS; do grep '^bench: ' "$dir/$s.$r.out" | sed "s/^bench: /server=$s /"; done
done | awk '
function v(k,   i, kv) { for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == k) return kv[2] } return "" }
# The median of the n values in a[k, 1..n] (insertion sort: n is small).
function median(a, k, n,   i, j, t, x) {
    for (i = 1; i <= n; i++) x[i] = a[k, i] + 0
    for (i = 2; i <= n; i++) { t = x[i]; for (j = i - 1; j >= 1 && x[j] > t; j--) x[j + 1] = x[j]; x[j + 1] = t }
    return n % 2 ? x[(n + 1) / 2] : (x[n / 2] + x[n / 2 + 1]) / 2
}
function lo(a, k, n,   i, m) { m = a[k, 1] + 0; for (i = 2; i <= n; i++) if (a[k, i] + 0 < m) m = a[k, i] + 0; return m }
function hi(a, k, n,   i, m) { m = a[k, 1] + 0; for (i = 2; i <= n; i++) if (a[k, i] + 0 > m) m = a[k, i] + 0; return m }
{
    s = v("server"); p = v("pattern"); k = p SUBSEP s; n = ++count[k]
    if (!(p in seen)) { seen[p] = 1; order[++np] = p }
    if (!(s in sseen)) { sseen[s] = 1; servers[++ns] = s }
    mbps[k, n] = v("mbps"); iops[k, n] = v("iops"); p50[k, n] = v("p50_us"); p99[k, n] = v("p99_us")
}
END {
    printf "%-20s %-9s %9s %15s %9s %9s %9s   %s\n", "pattern", "server", "MB/s", "(range)", "IOPS", "p50 us", "p99 us", "nbd-vram / best peer (MB/s)"
    for (i = 1; i <= np; i++) {
        p = order[i]; best = 0; bs = ""
        for (j = 1; j <= ns; j++) {
            k = p SUBSEP servers[j]; m[k] = median(mbps, k, count[k])
            if (servers[j] != "nbd-vram" && m[k] > best) { best = m[k]; bs = servers[j] }
        }
        for (j = 1; j <= ns; j++) {
            s = servers[j]; k = p SUBSEP s; r = ""; n = count[k]
            if (s == "nbd-vram" && best > 0) r = sprintf("%.2fx (vs %s)", m[k] / best, bs)
            printf "%-20s %-9s %9.1f %15s %9.0f %9.1f %9.1f   %s\n", (j == 1 ? p : ""), s, m[k],
                sprintf("%.0f-%.0f", lo(mbps, k, n), hi(mbps, k, n)), median(iops, k, n), median(p50, k, n), median(p99, k, n), r
        }
    }
}'

# Where nbd-vram spent its time in round 1: its log has one line per
# connection, the bench's fill first, then one per pattern.
echo
echo "nbd-vram's own account of round 1 (waiting = for the client):"
grep '^bench: ' "$dir/nbd-vram.1.out" | sed 's/.*pattern=\([^ ]*\).*/\1/' >"$dir/patterns"
grep 'client done' "$OUT/nbd-vram.log" | sed 's/.*client done ([A-Za-z]*): //' | sed -n "2,$(($(wc -l <"$dir/patterns") + 1))p" >"$dir/phases"
paste -d' ' "$dir/patterns" "$dir/phases"

# 2. nbdcopy as an independent client.
echo
head -c 512M /dev/urandom >"$src"
printf '%-9s %22s %22s\n' "nbdcopy" "512 MiB file -> export" "1 GiB export -> null:"
for s in $SERVERS; do
    uri="nbd+unix:///?socket=$dir/$s.sock"
    t0=$(date +%s.%N)
    on_client timeout 60 nbdcopy -C 1 "$src" "$uri"
    t1=$(date +%s.%N)
    on_client timeout 60 nbdcopy -C 1 "$uri" null:
    t2=$(date +%s.%N)
    echo "$s $t0 $t1 $t2" | awk '{ printf "%-9s %15.0f MB/s %15.0f MB/s\n", $1, 512 * 1048576 / ($3 - $2) / 1e6, 1024 * 1048576 / ($4 - $3) / 1e6 }'
done

# 3. The request-size sweep, plotted.
echo
echo "compare.sh: nbd-vram bench --sweep against all three, ${PSECS} s per point ..." >&2
set --
for s in $SERVERS; do set -- "$@" --connect "unix:$dir/$s.sock" --label "$s"; done
on_client timeout 150 "$BIN" bench -q --sweep --seconds "$PSECS" --svg "$OUT/throughput.svg" "$@" >"$OUT/sweep.txt"
echo "sweep, sequential at QD8, MB/s (${PSECS} s per point):"
grep '^bench: ' "$OUT/sweep.txt" | awk '
function v(k,   i, kv) { for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == k) return kv[2] } return "" }
{
    s = v("server"); p = v("pattern"); sub(/^sweep-/, "", p)
    if (!(p in seen)) { seen[p] = 1; order[++np] = p }
    if (!(s in sseen)) { sseen[s] = 1; servers[++ns] = s }
    m[p, s] = v("mbps")
}
END {
    printf "%-12s", ""; for (j = 1; j <= ns; j++) printf " %9s", servers[j]; printf "\n"
    for (i = 1; i <= np; i++) { printf "%-12s", order[i]; for (j = 1; j <= ns; j++) printf " %9s", m[order[i], servers[j]]; printf "\n" }
}'
echo "compare.sh: plot in $OUT/throughput.svg, raw sweep in $OUT/sweep.txt"
