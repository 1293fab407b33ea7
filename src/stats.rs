//! Counters the serve loop bumps per request; `status` reads them.
//! Plain atomics: counting never allocates or blocks.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use crate::uapi as sys;

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
    /// Where the serve loop's time goes: all of it, blocked waiting for a
    /// request, in the store (copies, their issue and the waits for them),
    /// and sending replies. The rest is reading and parsing requests.
    pub wall_ns: AtomicU64,
    pub idle_ns: AtomicU64,
    pub store_ns: AtomicU64,
    pub send_ns: AtomicU64,
    /// Socket reads for requests that did not wait: each a syscall of the
    /// reading phase, so their count per batch says what that phase is.
    pub quick_reads: AtomicU64,
    /// This connection found its store failed: every request to the
    /// device is answered EIO from then on.
    pub failed: AtomicBool,
}

/// Whether the store failed, as any of its connections found.
pub fn any_failed(stats: &[&Stats]) -> bool {
    stats.iter().any(|c| c.failed.load(Relaxed))
}

/// The serve loop's time for one batch, by phase (see `Stats`).
#[derive(Clone, Copy, Default)]
pub struct Phases {
    pub wall: u64,
    pub idle: u64,
    pub store: u64,
    pub send: u64,
    pub quick_reads: u64,
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

    pub fn record_phases(&self, p: &Phases) {
        self.wall_ns.fetch_add(p.wall, Relaxed);
        self.idle_ns.fetch_add(p.idle, Relaxed);
        self.store_ns.fetch_add(p.store, Relaxed);
        self.send_ns.fetch_add(p.send, Relaxed);
        self.quick_reads.fetch_add(p.quick_reads, Relaxed);
    }

    /// The counters that `since` compares.
    pub fn snapshot(&self) -> [u64; 7] {
        [&self.requests, &self.batches, &self.wall_ns, &self.idle_ns, &self.store_ns, &self.send_ns, &self.quick_reads]
            .map(|c| c.load(Relaxed))
    }

    /// What the loop did since `then`, for the log when a client leaves:
    /// the share of its time in each phase names the bottleneck. Formatted
    /// where it is written, into the log's own slot: a serving thread's
    /// line allocates nothing.
    pub fn since(&self, then: &[u64; 7]) -> Account {
        let now = self.snapshot();
        Account(std::array::from_fn(|i| now[i] - then[i]))
    }
}

/// `Stats::since`'s counters, as a log line says them.
pub struct Account([u64; 7]);

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let [requests, batches, wall, idle, store, send, quick] = self.0;
        let pct = |x: u64| 100.0 * x as f64 / wall.max(1) as f64;
        let recv = wall.saturating_sub(idle + store + send);
        write!(
            f,
            "{requests} requests in {batches} batches ({:.1} per batch) over {:.2} s: waiting for requests {:.0} %, \
             reading them {:.0} % ({:.1} socket reads per batch), store {:.0} %, replies {:.0} %",
            requests as f64 / batches.max(1) as f64,
            wall as f64 / 1e9,
            pct(idle),
            pct(recv),
            quick as f64 / batches.max(1) as f64,
            pct(store),
            pct(send)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_account_shares_time_by_phase_and_counts_quick_reads() {
        let stats = Stats::default();
        let then = stats.snapshot();
        for quick_reads in [5, 0] {
            stats.record_batch(0);
            stats.record_phases(&Phases { wall: 1000, idle: 100, store: 200, send: 400, quick_reads });
        }
        let said = stats.since(&then).to_string();
        assert!(said.contains("waiting for requests 10 %, reading them 30 % (2.5 socket reads per batch), store 20 %, replies 40 %"), "{said}");
    }
}
