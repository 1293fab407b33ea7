#!/usr/bin/python3
"""The server's CPU cost per request when requests come apart, one at a
time: what polling (src/nbd/poll.rs) spends where it cannot pay.

    /usr/bin/python3 tests/bench/poll-cost.py SOCKET PID GAP_US SECONDS

Reads 4 KiB at random offsets from the NBD server on unix SOCKET, each
GAP_US after the previous reply (a busy wait, so the gap is exact; 0 = back
to back), and prints one line: requests per second, the client's p50
round trip, and the server's CPU time (all threads of PID, from
/proc/PID/task/*/schedstat, in ns) per request and as a share of one CPU.
"""
import glob
import random
import sys
import time

import nbd


def cpu_ns(pid):
    total = 0
    for f in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(f) as s:
                total += int(s.read().split()[0])
        except OSError:
            pass  # a thread that ended
    return total


def main():
    sock, pid, gap_us, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    h = nbd.NBD()
    h.connect_unix(sock)
    blocks = h.get_size() // 4096
    buf = bytearray(4096)
    rtts = []
    gap = gap_us / 1e6
    c0, t0 = cpu_ns(pid), time.monotonic()
    end = t0 + seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        a = time.monotonic()
        h.aio_pread(buf, random.randrange(blocks) * 4096)
        while h.aio_peek_command_completed() == 0:
            h.poll(-1)
        h.aio_command_completed(h.aio_peek_command_completed())
        b = time.monotonic()
        rtts.append(b - a)
        while time.monotonic() - b < gap:
            pass
    t1, c1 = time.monotonic(), cpu_ns(pid)
    h.shutdown()
    n = len(rtts)
    rtts.sort()
    cpu = (c1 - c0) / 1e9
    print(f"gap {gap_us:6.0f} us: {n / (t1 - t0):8.0f} req/s, p50 {rtts[n // 2] * 1e6:6.1f} us, "
          f"server CPU {cpu / (t1 - t0) * 100:5.1f} % of one CPU, {cpu / n * 1e6:6.1f} us per request")


main()
