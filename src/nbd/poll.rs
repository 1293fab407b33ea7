//! Whether the serve loop polls its socket before it sleeps, and how long.

use std::io;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use crate::sock::{recv_wait, recv_within};

/// How long a read polls the socket before it sleeps, unless
/// `NBD_VRAM_SPIN` (µs; 0: never) says otherwise, and only with a second
/// CPU for the peer (with one, the SCHED_FIFO loop would keep the peer
/// off it while polling): as in the kernel's busy polling of network sockets
/// (`net.core.busy_read`, 50 µs suggested). Each sleep costs a cross-CPU
/// wake-up when the peer sends. Mid-payload, one per socket buffer it
/// sends: this loop sat idle a third of the time at 1 MiB writes (2-vCPU
/// VM, 2026-12-02, perf stat), and polling there gave +20–30 % per round,
/// 10 to 100 µs alike. Between requests, one per batch: polling for the
/// next request gave 4 KiB QD1 3.0–3.4× per round and 4 KiB QD8 1.6–2.3×
/// (docs/performance.md, "The host store and the serve loop"). The cost: up to this much CPU per wait that outlasts
/// it, which the pause below bounds: 3.5–5.3 µs more per request with
/// requests 50 µs to 1 ms apart (tests/bench/poll-cost.sh).
pub const SPIN: Duration = Duration::from_micros(50);
/// Polls in a row that find nothing before polling pauses, and how many
/// reads then sleep straight away. Where the peer takes longer than
/// `SPIN` (requests far apart, or a sender that needs the CPU time we
/// poll with, as in a qemu TCG guest, whose swap test took 44 % longer
/// polling every time) polling only spends CPU.
const MISSES: u32 = 8;
const PAUSE: u32 = 64;

pub struct Poll {
    spin: Duration,
    misses: u32,
    paused: u32,
}

impl Poll {
    pub fn new(spin: Duration) -> Poll {
        Poll { spin, misses: 0, paused: 0 }
    }

    /// Polls for `spin` (`NBD_VRAM_SPIN`), else `SPIN`; never without a
    /// CPU to spare (`pressure::cpu_to_spare`).
    pub fn with(spin: Option<Duration>) -> Poll {
        Poll::new(match spin {
            _ if !crate::pressure::cpu_to_spare() => Duration::ZERO,
            Some(spin) => spin,
            None => SPIN,
        })
    }

    /// Reads from the socket, polling first while polling pays; calls
    /// `sleeping` before it blocks.
    pub fn recv(&mut self, fd: BorrowedFd, buf: &mut [u8], sleeping: impl FnOnce()) -> io::Result<usize> {
        if self.polls() {
            let got = recv_within(fd, buf, self.spin)?;
            self.found(got.is_some());
            if let Some(n) = got {
                return Ok(n);
            }
        }
        sleeping();
        recv_wait(fd, buf)
    }

    fn polls(&mut self) -> bool {
        if self.paused > 0 {
            self.paused -= 1;
            return false;
        }
        !self.spin.is_zero()
    }

    fn found(&mut self, hit: bool) {
        self.misses = if hit { 0 } else { self.misses + 1 };
        if self.misses == MISSES {
            (self.misses, self.paused) = (0, PAUSE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polling_pauses_after_misses_in_a_row_and_comes_back() {
        let mut p = Poll::new(SPIN);
        for _ in 0..MISSES - 1 {
            assert!(p.polls());
            p.found(false);
        }
        p.found(true); // a hit starts the count again
        for _ in 0..MISSES {
            assert!(p.polls());
            p.found(false);
        }
        for _ in 0..PAUSE {
            assert!(!p.polls(), "paused");
        }
        assert!(p.polls(), "polls again after the pause");
        assert!(!Poll::new(Duration::ZERO).polls(), "0 never polls");
    }
}
