//! Counters the serve loop bumps per request; `status` reads them.
//! Plain atomics: counting never allocates or blocks.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::nbd::bindings as sys;

#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub read_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
    pub errors: AtomicU64,
    /// Batches answered, and the time from a batch's last request read to
    /// its replies sent: what the store and the reply cost.
    pub batches: AtomicU64,
    pub busy_ns: AtomicU64,
    pub max_batch_ns: AtomicU64,
}

impl Stats {
    pub fn record(&self, command: u32, len: u32, error: u32) {
        self.requests.fetch_add(1, Relaxed);
        if error != 0 {
            self.errors.fetch_add(1, Relaxed);
            return;
        }
        match command {
            sys::NBD_CMD_READ => self.read_bytes.fetch_add(u64::from(len), Relaxed),
            sys::NBD_CMD_WRITE => self.written_bytes.fetch_add(u64::from(len), Relaxed),
            _ => 0,
        };
    }
}

impl Stats {
    pub fn record_batch(&self, nanos: u64) {
        self.batches.fetch_add(1, Relaxed);
        self.busy_ns.fetch_add(nanos, Relaxed);
        self.max_batch_ns.fetch_max(nanos, Relaxed);
    }
}
