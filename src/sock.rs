//! The few socket calls std lacks, behind safe signatures.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

/// Reads what is already queued on a socket, without blocking: `Ok(None)`
/// when nothing is, `Ok(Some(0))` at end of stream.
pub fn recv_nowait(fd: BorrowedFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    recv(fd, buf, libc::MSG_DONTWAIT)
}

/// Reads from a socket, asking it again for up to `spin` while it has
/// nothing: `Ok(None)` if it has nothing still.
pub fn recv_within(fd: BorrowedFd, buf: &mut [u8], spin: Duration) -> io::Result<Option<usize>> {
    let start = Instant::now();
    loop {
        match recv_nowait(fd, buf)? {
            None if start.elapsed() < spin => std::hint::spin_loop(),
            got => return Ok(got),
        }
    }
}

/// Reads from a socket, sleeping until it has something; `Ok(0)` at end
/// of stream.
pub fn recv_wait(fd: BorrowedFd, buf: &mut [u8]) -> io::Result<usize> {
    // `None` only from a receive timeout (SO_RCVTIMEO), an error here.
    recv(fd, buf, 0)?.ok_or_else(|| io::ErrorKind::WouldBlock.into())
}

fn recv(fd: BorrowedFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<Option<usize>> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the
    // whole call, and `fd` is a live descriptor borrowed for it.
    retried(|| unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) })
}

/// Sends what a socket has room for now, without blocking: `Ok(None)`
/// when it has none.
pub fn send_nowait(fd: BorrowedFd, iov: &[io::IoSlice]) -> io::Result<Option<usize>> {
    // SAFETY: an all-zero msghdr is valid: no name, no control data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // `IoSlice` is an iovec (std documents it ABI-compatible on Unix);
    // sendmsg only reads through the pointer.
    msg.msg_iov = iov.as_ptr().cast_mut().cast();
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: `msg` points at `iov`, valid for reads for the whole call,
    // and `fd` is a live descriptor borrowed for it.
    retried(|| unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) })
}

/// A transfer `call` (recv or send, -1 and errno on failure), made again
/// when a signal cut it short: `Ok(None)` when the socket would block.
fn retried(mut call: impl FnMut() -> isize) -> io::Result<Option<usize>> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::WouldBlock => return Ok(None),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(err),
        }
    }
}

/// Bounds how long a blocking read waits (`None`: for ever).
pub fn set_recv_timeout(fd: BorrowedFd, timeout: Option<Duration>) -> io::Result<()> {
    set_timeout(fd, libc::SO_RCVTIMEO, timeout)
}

/// Bounds how long a blocking write waits for room (`None`: for ever).
pub fn set_send_timeout(fd: BorrowedFd, timeout: Option<Duration>) -> io::Result<()> {
    set_timeout(fd, libc::SO_SNDTIMEO, timeout)
}

/// Has TCP probe a peer after `idle` without traffic, every 10 s, and end
/// the connection after 3 probes unanswered: a client host that vanished
/// without a word (powered off, cable pulled) then costs its serving
/// thread a minute or two, not for ever. Probes go out only while nothing
/// is in flight, so a reply that has waited as long for the peer to take
/// it (unacknowledged, or the peer's window shut) ends the connection too
/// (`TCP_USER_TIMEOUT`), where TCP alone would retry for a quarter of an
/// hour, or for ever on a peer that stopped reading.
pub fn set_keepalive(fd: BorrowedFd, idle: Duration) -> io::Result<()> {
    const INTERVAL: libc::c_int = 10;
    const PROBES: libc::c_int = 3;
    let idle = idle.as_secs().clamp(1, 3600) as libc::c_int;
    set_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle)?;
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, INTERVAL)?;
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, PROBES)?;
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, (idle + PROBES * INTERVAL) * 1000)
}

fn set_int(fd: BorrowedFd, level: libc::c_int, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    set_option(fd, level, option, &value)
}

/// A zero timeval means no limit to the kernel, as `None` does here; a
/// positive timeout shorter than 1 µs is rounded up to it, not to zero.
fn set_timeout(fd: BorrowedFd, option: libc::c_int, timeout: Option<Duration>) -> io::Result<()> {
    let t = timeout.map_or(Duration::ZERO, |t| t.max(Duration::from_micros(1)));
    let tv = libc::timeval { tv_sec: t.as_secs() as libc::time_t, tv_usec: t.subsec_micros() as libc::suseconds_t };
    set_option(fd, libc::SOL_SOCKET, option, &tv)
}

/// setsockopt(2) with `value`, a C value of the type `option` takes.
fn set_option<T>(fd: BorrowedFd, level: libc::c_int, option: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is live for the call and the length passed is its
    // size; the kernel only reads it.
    let r = unsafe { libc::setsockopt(fd.as_raw_fd(), level, option, (value as *const T).cast(), std::mem::size_of::<T>() as libc::socklen_t) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes queued on a socket, ready to read without waiting (`SIOCINQ`).
pub fn queued(fd: BorrowedFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD stores one c_int through the pointer, which points
    // at a live local for the whole call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n as *mut libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// A connection whose reads and writes all end by `at`: before each, the
/// socket's timeouts are set to the time left, since SO_RCVTIMEO and
/// SO_SNDTIMEO bound one call each, not a conversation. Past `at` a call
/// fails with `TimedOut`; one that runs out of the time left, with
/// `WouldBlock` (the socket's EAGAIN).
pub struct Deadline<'a, T> {
    pub conn: &'a mut T,
    pub at: Instant,
}

impl<T: AsFd> Deadline<'_, T> {
    fn left(&self) -> io::Result<Duration> {
        match self.at.saturating_duration_since(Instant::now()) {
            Duration::ZERO => Err(io::ErrorKind::TimedOut.into()),
            left => Ok(left),
        }
    }
}

impl<T: io::Read + AsFd> io::Read for Deadline<'_, T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        set_recv_timeout(self.conn.as_fd(), Some(self.left()?))?;
        self.conn.read(buf)
    }
}

impl<T: io::Write + AsFd> io::Write for Deadline<'_, T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        set_send_timeout(self.conn.as_fd(), Some(self.left()?))?;
        self.conn.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.conn.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get_int(fd: BorrowedFd, level: libc::c_int, option: libc::c_int) -> libc::c_int {
        let mut value: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` are live and `len` is `value`'s size.
        let r = unsafe { libc::getsockopt(fd.as_raw_fd(), level, option, (&mut value as *mut libc::c_int).cast(), &mut len) };
        assert_eq!(r, 0, "getsockopt: {}", io::Error::last_os_error());
        value
    }

    #[test]
    fn keepalive_probes_after_the_idle_time_given() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let fd = client.as_fd();
        assert_eq!(get_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 0, "off by default");
        set_keepalive(fd, Duration::from_secs(30)).unwrap();
        assert_ne!(get_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 0);
        assert_eq!(get_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 30);
        assert_eq!(get_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 10);
        assert_eq!(get_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 3);
        assert_eq!(get_int(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT), 60_000, "ms: as long as keepalive takes");
    }
}
