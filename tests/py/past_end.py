# Out-of-range requests through libnbd, with its client-side checks off
# (strict mode 0) so that they reach the server: each must fail with the
# right errno, and the same connection must still serve good requests.
#
# Usage: /usr/bin/python3 past_end.py URI SIZE
import errno
import sys

import nbd

uri, size = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(uri)
assert h.get_size() == size, f"size {h.get_size()}, expected {size}"

tail = bytes(range(256)) * 16
h.pwrite(tail, size - 4096)


def expect(err, what, f, *args):
    try:
        f(*args)
    except nbd.Error as e:
        if e.errnum != err:
            sys.exit(f"{what}: errno {e.errnum} ({e}), expected {errno.errorcode[err]}")
        return
    sys.exit(f"{what}: succeeded, expected {errno.errorcode[err]}")


expect(errno.EINVAL, "read straddling the end", h.pread, 4096, size - 1000)
expect(errno.EINVAL, "read just past the end", h.pread, 1, size)
expect(errno.EINVAL, "read far past the end", h.pread, 512, 1 << 50)
expect(errno.ENOSPC, "write straddling the end", h.pwrite, b"x" * 4096, size - 1000)
expect(errno.ENOSPC, "write-zeroes past the end", h.zero, 8192, size - 4096)
expect(errno.EINVAL, "trim past the end", h.trim, 8192, size - 4096)

# The connection goes on, and nothing past-the-end touched the data.
assert h.pread(4096, size - 4096) == tail, "tail changed"
h.pwrite(b"y" * 100, 0)
assert h.pread(100, 0) == b"y" * 100
h.shutdown()
print("ok")
