//! One line per event on stderr. Under systemd (`JOURNAL_STREAM` set) each
//! line starts with a `<N>` syslog priority, which the journal parses.
//! Writing formats straight to stderr, so logging never allocates.

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

pub const ERR: u8 = 3;
pub const WARNING: u8 = 4;
pub const INFO: u8 = 6;
pub const DEBUG: u8 = 7;

static LEVEL: AtomicU8 = AtomicU8::new(INFO);
static JOURNAL: AtomicBool = AtomicBool::new(false);

/// Reads the environment once, before any thread starts.
pub fn init(level: u8) {
    LEVEL.store(level, Ordering::Relaxed);
    JOURNAL.store(std::env::var_os("JOURNAL_STREAM").is_some(), Ordering::Relaxed);
}

pub fn write(priority: u8, args: fmt::Arguments) {
    if priority > LEVEL.load(Ordering::Relaxed) {
        return;
    }
    let mut err = std::io::stderr().lock();
    // Nothing sensible is left to do if stderr itself fails.
    let _ = if JOURNAL.load(Ordering::Relaxed) {
        writeln!(err, "<{priority}>{args}")
    } else {
        writeln!(err, "nbd-vram: {args}")
    };
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
