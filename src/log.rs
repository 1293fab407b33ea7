//! One line per event on stderr. Under systemd (`JOURNAL_STREAM` set) each
//! line starts with a `<N>` syslog priority, which the journal parses.
//! The log itself never allocates (what a caller formats may).
//!
//! Where something is served (`start_relay`), no thread but one writes to
//! stderr: whatever reads it (the journal, a pipe, a file on tmpfs) may
//! wait for a page swapped out to the very device being served, and a
//! stop must not wait for it either. Lines go, in order, through a ring of
//! fixed slots to a relay thread, which does the writing and may wait.
//! When the ring is full, a serving thread's line is dropped at once; any
//! other thread's waits a moment for room first. Dropped lines are counted.

use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

pub const ERR: u8 = 3;
pub const WARNING: u8 = 4;
pub const INFO: u8 = 6;
pub const DEBUG: u8 = 7;

static LEVEL: AtomicU8 = AtomicU8::new(INFO);
static JOURNAL: AtomicBool = AtomicBool::new(false);
static RELAY: Relay = Relay::new();
/// The relay thread runs: relayed lines reach stderr.
static RELAYING: AtomicBool = AtomicBool::new(false);

thread_local! {
    static RELAYED: Cell<bool> = const { Cell::new(false) };
}

/// Reads the environment once, before any thread starts.
pub fn init(level: u8) {
    LEVEL.store(level, Ordering::Relaxed);
    JOURNAL.store(std::env::var_os("JOURNAL_STREAM").is_some_and(|v| stderr_is(&v)), Ordering::Relaxed);
}

/// Whether stderr is the file `JOURNAL_STREAM` names ("DEVICE:INODE",
/// systemd.exec(5)): a process that inherited the variable but writes
/// elsewhere (a script's log file) is not talking to the journal.
fn stderr_is(stream: &std::ffi::OsStr) -> bool {
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes one stat into `st`, which is live and large enough.
    if unsafe { libc::fstat(libc::STDERR_FILENO, st.as_mut_ptr()) } < 0 {
        return false;
    }
    // SAFETY: fstat succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    st.st_dev == dev && st.st_ino == ino
}

/// Starts the relay thread, which inherits the caller's signal mask. If
/// it cannot start, every thread writes its own lines.
pub fn start_relay() {
    let spawned = std::thread::Builder::new().name("nbd-log".into()).stack_size(64 * 1024).spawn(|| loop {
        RELAY.wait();
        RELAY.drain(&mut io::stderr());
    });
    match spawned {
        Ok(_) => {
            RELAYING.store(true, Ordering::Relaxed);
            // panic = "abort": the lines that led to a panic are written
            // first, if stderr takes them.
            let report = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                flush();
                report(info);
            }));
        }
        Err(e) => write(WARNING, format_args!("cannot start the log thread ({e}): serving threads write their own lines")),
    }
}

/// The calling thread serves a device from now on: its lines never wait
/// for room in the ring.
pub fn relay_here() {
    RELAYED.with(|r| r.set(true));
}

/// Writes what the relay still holds, before the process ends, unless
/// the relay is stuck writing for longer than `FLUSH_PATIENCE`.
pub fn flush() {
    let deadline = Instant::now() + FLUSH_PATIENCE;
    loop {
        let _order = match RELAY.out.try_lock() {
            Ok(order) => order,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(TryLockError::WouldBlock) => return,
        };
        return RELAY.drain_locked(&mut io::stderr());
    }
}

/// How long a line of a thread that does not serve waits for room in a
/// full ring, and how long the last lines wait for stderr at exit.
const ROOM_PATIENCE: Duration = Duration::from_millis(100);
const FLUSH_PATIENCE: Duration = Duration::from_millis(500);

pub fn write(priority: u8, args: fmt::Arguments) {
    if priority > LEVEL.load(Ordering::Relaxed) {
        return;
    }
    if RELAYING.load(Ordering::Relaxed) {
        let patience = if RELAYED.with(Cell::get) { Duration::ZERO } else { ROOM_PATIENCE };
        RELAY.push(priority, args, patience);
        return;
    }
    // Nothing sensible is left to do if stderr itself fails.
    let _ = writeln!(io::stderr().lock(), "{}{args}", Prefix(priority));
}

/// `<N>` for the journal, else the program's name.
struct Prefix(u8);

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if JOURNAL.load(Ordering::Relaxed) {
            write!(f, "<{}>", self.0)
        } else {
            f.write_str("nbd-vram: ")
        }
    }
}

/// Lines in the ring at most, and the longest kept whole.
const SLOTS: usize = 128;
const LINE: usize = 512;

/// A line as it goes out, prefix and newline included, formatted where
/// it was logged; a longer one is cut.
#[derive(Clone, Copy)]
struct Line {
    len: usize,
    text: [u8; LINE],
}

impl Line {
    const EMPTY: Line = Line { len: 0, text: [0; LINE] };
}

impl fmt::Write for Line {
    /// Leaves room for the newline.
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut n = s.len().min(LINE - 1 - self.len);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.text[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

struct Ring {
    lines: [Line; SLOTS],
    first: usize,
    len: usize,
    dropped: u64,
}

struct Relay {
    ring: Mutex<Ring>,
    /// A line came in; a line went out.
    ready: Condvar,
    room: Condvar,
    /// Held while a line goes to stderr, so that lines keep their order.
    out: Mutex<()>,
}

impl Relay {
    const fn new() -> Relay {
        Relay {
            ring: Mutex::new(Ring { lines: [Line::EMPTY; SLOTS], first: 0, len: 0, dropped: 0 }),
            ready: Condvar::new(),
            room: Condvar::new(),
            out: Mutex::new(()),
        }
    }

    fn ring(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn writing(&self) -> MutexGuard<'_, ()> {
        self.out.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a line, waiting at most `patience` for room (and for
    /// another thread's copy into or out of the ring), never for a write.
    fn push(&self, priority: u8, args: fmt::Arguments, patience: Duration) {
        let mut line = Line::EMPTY;
        let _ = write!(line, "{}{args}", Prefix(priority));
        line.text[line.len] = b'\n';
        line.len += 1;
        let mut ring = self.ring();
        if ring.len == SLOTS && !patience.is_zero() {
            ring = self.room.wait_timeout_while(ring, patience, |r| r.len == SLOTS).unwrap_or_else(PoisonError::into_inner).0;
        }
        if ring.len == SLOTS {
            ring.dropped += 1;
        } else {
            let at = (ring.first + ring.len) % SLOTS;
            ring.lines[at] = line;
            ring.len += 1;
        }
        drop(ring);
        self.ready.notify_one();
    }

    /// Until there is something to write.
    fn wait(&self) {
        let mut ring = self.ring();
        while ring.len == 0 && ring.dropped == 0 {
            ring = self.ready.wait(ring).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn drain(&self, out: &mut impl Write) {
        let _order = self.writing();
        self.drain_locked(out);
    }

    /// Writes the queued lines, taking each out of the ring before the
    /// write, so that pushes go on meanwhile; the caller holds `out`.
    fn drain_locked(&self, out: &mut impl Write) {
        loop {
            let mut ring = self.ring();
            let line = (ring.len > 0).then(|| {
                let line = ring.lines[ring.first];
                ring.first = (ring.first + 1) % SLOTS;
                ring.len -= 1;
                line
            });
            // Said after the lines that came before the drops.
            let dropped = if line.is_none() { std::mem::take(&mut ring.dropped) } else { 0 };
            drop(ring);
            self.room.notify_all();
            if dropped > 0 {
                let _ = writeln!(out, "{}{dropped} log line(s) dropped: stderr took no more", Prefix(WARNING));
            }
            let Some(line) = line else { return };
            let _ = out.write_all(&line.text[..line.len]);
        }
    }
}

/// An `io::Error` as its `Display` says it, but an OS error's text is
/// looked up into a buffer on the stack, where std's own `Display`
/// allocates it: for a serving thread's lines.
pub struct ErrorText<'a>(pub &'a io::Error);

impl fmt::Display for ErrorText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let Some(code) = self.0.raw_os_error() else {
            return self.0.fmt(f);
        };
        let mut buf = [0u8; 128];
        // SAFETY: `buf` is writable for its whole length, which is passed;
        // the XSI strerror_r (which the libc crate binds) writes at most
        // that much, NUL-terminated, an unknown code's message included
        // (std's own text comes from the same call).
        unsafe { libc::strerror_r(code, buf.as_mut_ptr().cast(), buf.len()) };
        let text = std::ffi::CStr::from_bytes_until_nul(&buf).ok().and_then(|s| s.to_str().ok()).filter(|s| !s.is_empty());
        write!(f, "{} (os error {code})", text.unwrap_or("Unknown error"))
    }
}

#[macro_export]
macro_rules! error {
    ($($t:tt)*) => { $crate::log::write($crate::log::ERR, format_args!($($t)*)) };
}
#[macro_export]
macro_rules! warn {
    ($($t:tt)*) => { $crate::log::write($crate::log::WARNING, format_args!($($t)*)) };
}
#[macro_export]
macro_rules! info {
    ($($t:tt)*) => { $crate::log::write($crate::log::INFO, format_args!($($t)*)) };
}
#[macro_export]
macro_rules! debug {
    ($($t:tt)*) => { $crate::log::write($crate::log::DEBUG, format_args!($($t)*)) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_reads_as_std_says_it() {
        for e in [io::Error::from_raw_os_error(libc::EIO), io::Error::from_raw_os_error(libc::ENOSPC), io::Error::from_raw_os_error(99999), io::Error::other("a custom one")] {
            assert_eq!(ErrorText(&e).to_string(), e.to_string());
        }
    }

    /// A writer that is stuck (`out` held) never holds up a push; what
    /// does not fit is counted, and written once the writer goes on.
    #[test]
    fn a_stuck_writer_never_holds_up_a_push() {
        static RELAY: Relay = Relay::new();
        let relay = &RELAY;
        let stuck = relay.writing();
        let (done, pushed) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            (0..SLOTS + 10).for_each(|i| relay.push(INFO, format_args!("line {i}"), Duration::ZERO));
            let _ = done.send(());
        });
        let waited = pushed.recv_timeout(std::time::Duration::from_secs(10));
        assert!(waited.is_ok(), "a push waited for the writer");
        drop(stuck);
        let mut out = Vec::new();
        relay.drain(&mut out);
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("10 log line(s) dropped"), "{out}");
        assert!(out.contains("nbd-vram: line 0\n") && out.contains(&format!("line {}\n", SLOTS - 1)), "{out}");
        assert!(!out.contains(&format!("line {}\n", SLOTS)), "{out}");
    }

    /// Another thread's line waits for room, and gets it as the writer
    /// goes on.
    #[test]
    fn a_line_of_a_thread_that_does_not_serve_waits_for_room() {
        let relay = Relay::new();
        (0..SLOTS).for_each(|i| relay.push(INFO, format_args!("line {i}"), Duration::ZERO));
        let mut out = std::thread::scope(|s| {
            let writer = s.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                let mut out = Vec::new();
                relay.drain(&mut out);
                out
            });
            relay.push(INFO, format_args!("the last"), Duration::from_secs(10));
            writer.join().unwrap()
        });
        relay.drain(&mut out);
        let out = String::from_utf8(out).unwrap();
        assert!(out.ends_with("nbd-vram: the last\n") && !out.contains("dropped"), "{out}");
    }

    #[test]
    fn a_long_line_is_cut_not_spilled() {
        let relay = Relay::new();
        relay.push(ERR, format_args!("{}", "x".repeat(2 * LINE)), Duration::ZERO);
        let mut out = Vec::new();
        relay.drain(&mut out);
        assert_eq!(out.len(), LINE, "cut to one slot, its newline included");
        assert!(out.starts_with(b"nbd-vram: xx") && out.ends_with(b"x\n"));
    }
}
