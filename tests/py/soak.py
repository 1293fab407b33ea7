# Random reads, writes (some FUA), write-zeroes, trims and flushes through
# libnbd, checked against an in-memory model of the export; some rounds keep
# several async requests in flight at once, and some bursts of aligned
# ones, as swap sends them. Reconnects half-way, and reads
# the whole export back at the end. The seed is printed: pass it back to
# reproduce a failure.
#
# Usage: /usr/bin/python3 soak.py URI SEED OPS
import random
import sys
import time

import nbd

uri, seed, ops = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
print(f"soak: seed {seed}, {ops} operations on {uri}", flush=True)
rng = random.Random(seed)


def connect():
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


h = connect()
size = h.get_size()
model = bytearray(size)
counts = {}


def span():
    """An (offset, length): mostly small, often unaligned, sometimes large."""
    r = rng.random()
    if r < 0.45:
        n = rng.randint(1, 4096)
    elif r < 0.75:
        n = rng.randint(1, 64 << 10)
    elif r < 0.9:
        n = rng.choice([512, 4096, 8192, 65536])
    else:
        n = rng.randint(1, 1 << 20)
    off = rng.randint(0, size - n)
    if rng.random() < 0.3:
        off -= off % 4096
    return off, n


def check(op, off, n, got):
    if got != model[off:off + n]:
        bad = next(i for i in range(n) if got[i] != model[off + i])
        sys.exit(f"op {op}: read of {n} at {off} differs from the model at byte {off + bad}: "
                 f"got {got[bad]:#x}, expected {model[off + bad]:#x} (seed {seed})")


def aligned_span():
    """A 4 KiB-aligned (offset, length) of whole 512-byte sectors."""
    n = rng.choice([512, 4096, 4096, 8192, 65536])
    return rng.randrange(0, size - n + 1, 4096), n


def disjoint(k, make=span):
    """k non-overlapping spans."""
    spans = []
    while len(spans) < k:
        off, n = make()
        if all(off + n <= o or o + m <= off for o, m in spans):
            spans.append((off, n))
    return spans


def async_round(op):
    """Writes and reads of other ranges, all in flight together."""
    spans = disjoint(rng.randint(4, 12))
    writes, reads = [], []
    for off, n in spans:
        if rng.random() < 0.5:
            data = rng.randbytes(n)
            writes.append((off, data, h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off)))
        else:
            buf = nbd.Buffer(n)
            reads.append((off, n, buf, h.aio_pread(buf, off)))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for off, n, buf, cookie in reads:
        assert h.aio_command_completed(cookie)
        check(op, off, n, buf.to_bytearray())
    for off, data, cookie in writes:
        assert h.aio_command_completed(cookie)
        model[off:off + len(data)] = data


def burst(op):
    """Many aligned writes in flight together, then reads of them and of
    other ranges, so that each direction fills a batch."""
    spans = disjoint(rng.randint(8, 40), aligned_span)
    cookies = []
    for off, n in spans:
        data = rng.randbytes(n)
        cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off))
        model[off:off + n] = data
    while h.aio_in_flight() > 0:
        h.poll(-1)
    assert all(h.aio_command_completed(c) for c in cookies)
    reads = [(off, n, nbd.Buffer(n)) for off, n in spans + disjoint(rng.randint(0, 16), aligned_span)]
    cookies = [h.aio_pread(buf, off) for off, n, buf in reads]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for (off, n, buf), cookie in zip(reads, cookies):
        assert h.aio_command_completed(cookie)
        check(op, off, n, buf.to_bytearray())


start = time.monotonic()
for op in range(ops):
    if op == ops // 2:
        h.shutdown()
        h = connect()
    kind = rng.choices(["read", "write", "fua", "zero", "trim", "flush", "async", "burst"],
                       [30, 30, 5, 10, 10, 2, 5, 3])[0]
    counts[kind] = counts.get(kind, 0) + 1
    if kind == "async":
        async_round(op)
        continue
    if kind == "burst":
        burst(op)
        continue
    if kind == "flush":
        h.flush()
        continue
    off, n = span()
    if kind == "read":
        check(op, off, n, h.pread(n, off))
    elif kind in ("write", "fua"):
        data = rng.randbytes(n)
        h.pwrite(data, off, nbd.CMD_FLAG_FUA if kind == "fua" else 0)
        model[off:off + n] = data
    else:
        # This store zeroes on trim, as on write-zeroes.
        (h.zero if kind == "zero" else h.trim)(n, off)
        model[off:off + n] = bytes(n)

for off in range(0, size, 8 << 20):
    n = min(8 << 20, size - off)
    check("final", off, n, h.pread(n, off))
h.shutdown()
print(f"soak: ok in {time.monotonic() - start:.1f}s: {sorted(counts.items())}")
