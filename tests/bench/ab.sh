#!/bin/sh
# Two builds of nbd-vram (host store) and nbdkit's memory plugin, taking
# turns pattern set by pattern set, pinned as in compare.sh: whether a change
# is faster, measured in one run on one machine, with nbdkit as the yardstick
# that says how noisy the run was; and nbdkit with one thread per
# connection (-t 1), a peer that, like nbd-vram, cannot copy one request
# while it receives the next.
#
# Usage: sh tests/bench/ab.sh OLD_BINARY NEW_BINARY [ROUNDS] [SECONDS]
# Prints the raw key=value lines, then per pattern the MB/s of each round.
set -eu
A=$1 B=$2 R=${3:-3} S=${4:-3}
d=$(mktemp -d /tmp/nbd-vram-ab.XXXXXX)
pids=""
trap 'kill $pids 2>/dev/null || true; rm -rf "$d"' EXIT
taskset -c 1 "$A" serve --store host --size 1G --listen "unix:$d/old.sock" 2>/dev/null & pids="$pids $!"
taskset -c 1 "$B" serve --store host --size 1G --listen "unix:$d/new.sock" 2>/dev/null & pids="$pids $!"
taskset -c 1 nbdkit -f --unix "$d/nbdkit.sock" memory 1G & pids="$pids $!"
taskset -c 1 nbdkit -f -t 1 --unix "$d/nbdkit-t1.sock" memory 1G & pids="$pids $!"
for s in old new nbdkit nbdkit-t1; do
    i=0
    until [ -S "$d/$s.sock" ]; do i=$((i + 1)); [ $i -le 100 ] || exit 1; sleep 0.1; done
done
echo "ab.sh: $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -sr), old=$A new=$B, $R rounds of $S s"
for r in $(seq "$R"); do
    for s in old new nbdkit nbdkit-t1; do
        taskset -c 0 "$B" bench -q --connect "unix:$d/$s.sock" --seconds "$S" | sed -n "s/^bench: /server=$s round=$r /p"
    done
done | tee "$d/lines"
awk '{ for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
       k = v["pattern"] " " v["server"]; if (!(k in m)) order[++n] = k; m[k] = m[k] " " v["mbps"] }
     END { for (i = 1; i <= n; i++) printf "%-20s %-7s %s\n", substr(order[i], 1, index(order[i], " ") - 1),
           substr(order[i], index(order[i], " ") + 1), m[order[i]] }' "$d/lines" | sort -s -k1,1
