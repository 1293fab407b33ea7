//! The connections of one run (`--connections N`, default 1): each its
//! own socket, handshake and thread, pipelined at the pattern's depth over
//! its own part of the region, as fio's nbd engine runs one job per
//! connection with the job's iodepth. The parts are disjoint, so every
//! block's stamp is written and checked by one connection alone.
//!
//! All N are negotiated, within one deadline, before any of them sends a
//! request, and then start together (released at once by one lock). A server that serves one client at a
//! time accepts the second connection but never greets it while the first
//! is open: that ends at the deadline with an error that says so, instead
//! of a hang.

use std::io::Write;
use std::ops::Range;
use std::sync::{PoisonError, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use super::client::{self, Conn, Shown};
use crate::sock::Deadline;
use super::engine::{self, Bufs, Spec, Stop, Tally};
use super::{check_export, MIB};
use crate::cli::Addr;
use crate::fail::{Code, Failure};
use crate::info;
use crate::uapi as sys;

/// The negotiations of all the connections of one run end by then.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Parts are whole MiB, so that requests of any pattern (at most 1 MiB,
/// each size dividing 1 MiB) tile them and sequential runs wrap exactly.
const PART_ALIGN: u64 = MIB as u64;
/// Threads that only wait on their socket need little stack.
const STACK: usize = 256 * 1024;

/// Negotiated connections to one server, non-blocking, ready to drive.
pub struct Conns {
    conns: Vec<Conn>,
    /// The bytes of the export the patterns use, split among the
    /// connections (see `check_export` and `part`).
    region: u64,
}

impl Conns {
    /// Connects `n` times to `connect` and negotiates each, all within
    /// `HANDSHAKE_TIMEOUT`; `tell` logs what the export offers.
    pub fn open(connect: &Addr, n: usize, tell: bool) -> Result<Conns, Failure> {
        let at = Shown(connect);
        let by = Instant::now() + HANDSHAKE_TIMEOUT;
        let mut conns = Conns { conns: Vec::with_capacity(n), region: 0 };
        for i in 0..n {
            let (conn, region) = match open_one(connect, by, tell && i == 0) {
                Ok(c) => c,
                Err(f) if i == 0 => return Err(f),
                Err(f) => {
                    conns.close();
                    return Err(Failure::new(
                        f.code,
                        format!(
                            "{}; connection {} of {n} failed with {i} open already: does the server serve one \
                             client at a time? --connections 1 measures it",
                            f.message,
                            i + 1
                        ),
                    ));
                }
            };
            conns.conns.push(conn);
            // Every connection sees the same export; a server that says
            // otherwise gets the least.
            conns.region = if i == 0 { region } else { conns.region.min(region) };
        }
        if part(conns.region, n, 0).is_empty() {
            let mib = conns.region >> 20;
            conns.close();
            return Err(Failure::new(
                Code::Other,
                format!(
                    "{at}: bench uses {mib} MiB of the export, too little for {n} connections of 1 MiB or more \
                     each: give --connections {mib} or fewer"
                ),
            ));
        }
        Ok(conns)
    }

    /// The bytes each connection uses.
    pub fn part(&self) -> u64 {
        part(self.region, self.conns.len(), 0).end
    }

    /// Runs `spec` on every connection at once, each on its own part of the
    /// region and with its own seed, on `bufs[i]` (one per connection),
    /// then says goodbye on each. Returns each connection's result, in
    /// order; its latencies are left in its `Bufs::samples`.
    pub fn drive(self, spec: &Spec, stop: Stop, bufs: &mut [Bufs]) -> Vec<Result<Tally, String>> {
        let n = self.conns.len();
        // Held while the threads start; then says whether they all did.
        let gate = RwLock::new(false);
        let mut all_started = gate.write().unwrap_or_else(PoisonError::into_inner);
        let region = self.region;
        thread::scope(|s| {
            let gate = &gate;
            let running: Vec<_> = self
                .conns
                .into_iter()
                .zip(bufs.iter_mut())
                .enumerate()
                .map(|(i, (mut conn, b))| {
                    let spec = Spec { seed: seed(spec.seed, i), ..*spec };
                    let run = move || {
                        let go = *gate.read().unwrap_or_else(PoisonError::into_inner);
                        let t = if go {
                            engine::drive(&mut conn, part(region, n, i), &spec, stop, b)
                        } else {
                            Err("another connection's thread did not start".into())
                        };
                        goodbye(conn);
                        t
                    };
                    thread::Builder::new().name(format!("bench-conn-{i}")).stack_size(STACK).spawn_scoped(s, run)
                })
                .collect();
            *all_started = running.iter().all(Result::is_ok);
            drop(all_started);
            running
                .into_iter()
                .map(|r| match r {
                    Ok(h) => h.join().unwrap_or_else(|_| Err("its thread panicked".into())),
                    Err(e) => Err(format!("starting its thread: {e}")),
                })
                .collect()
        })
    }

    /// Says goodbye on every connection, unused.
    fn close(self) {
        self.conns.into_iter().for_each(goodbye);
    }
}

/// Connects, negotiates by `by`, and returns the connection, non-blocking,
/// with the region to use; `tell` logs what the export offers.
fn open_one(connect: &Addr, by: Instant, tell: bool) -> Result<(Conn, u64), Failure> {
    let at = Shown(connect);
    let fail = |what: String| Failure::new(Code::Other, format!("{at}: {what}"));
    let mut conn = Conn::connect(connect)?;
    let export = client::handshake(&mut Deadline { conn: &mut conn, at: by }).map_err(|e| {
        let late = if e.ends_with("in time") { format!(" ({} s)", HANDSHAKE_TIMEOUT.as_secs()) } else { String::new() };
        fail(format!("handshake: {e}{late}"))
    })?;
    let region = check_export(&export).map_err(fail)?;
    if tell {
        info!(
            "{at}: export of {} bytes ({} MiB), flags {:#06x}, requests of {}..{} bytes; benchmarking the first {} MiB",
            export.size,
            export.size >> 20,
            export.flags,
            export.min_block,
            export.max_block,
            region >> 20
        );
    }
    conn.set_nonblocking(true).map_err(|e| Failure::os(format!("{at}: setting non-blocking"), e))?;
    Ok((conn, region))
}

/// Part `i` of `region` split among `n` connections: equal, whole MiB,
/// disjoint; empty where `region` has less than 1 MiB for each. With one
/// connection, all of `region` (itself whole MiB).
pub fn part(region: u64, n: usize, i: usize) -> Range<u64> {
    let len = region / n as u64 / PART_ALIGN * PART_ALIGN;
    i as u64 * len..(i as u64 + 1) * len
}

/// Connection `i`'s seed: the pattern's for the first, so that one
/// connection sends what bench always sent; others spread apart.
fn seed(pattern: u64, i: usize) -> u64 {
    pattern.wrapping_add((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Sends `NBD_CMD_DISC`, so the server sees a clean end; failing that is
/// harmless, as the socket closes anyway.
fn goodbye(mut conn: Conn) {
    if conn.set_nonblocking(false).is_ok() && conn.set_timeouts(Duration::from_secs(1)).is_ok() {
        let _ = conn.write_all(&disconnect());
    }
}

fn disconnect() -> [u8; crate::nbd::proto::REQUEST_LEN] {
    crate::nbd::proto::Request { flags: 0, command: sys::NBD_CMD_DISC, cookie: [0; 8], offset: 0, len: 0 }.encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_equal_whole_mib_and_disjoint() {
        let mib = u64::from(MIB);
        assert_eq!(part(64 * mib, 1, 0), 0..64 * mib);
        assert_eq!(part(64 * mib, 2, 1), 32 * mib..64 * mib);
        // 10 MiB in 3: 3 MiB each, the last MiB unused.
        let parts: Vec<_> = (0..3).map(|i| part(10 * mib, 3, i)).collect();
        assert_eq!(parts, [0..3 * mib, 3 * mib..6 * mib, 6 * mib..9 * mib]);
        assert_eq!(part(64 * mib, 64, 63), 63 * mib..64 * mib);
        assert!(part(64 * mib, 65, 0).is_empty());
        for n in 1..=64 {
            let parts: Vec<_> = (0..n).map(|i| part(4 << 30, n, i)).collect();
            assert!(parts.iter().all(|p| p.start % PART_ALIGN == 0 && p.end - p.start == parts[0].end));
            assert!(parts.windows(2).all(|w| w[0].end == w[1].start));
        }
    }

    #[test]
    fn the_first_connection_keeps_the_pattern_seed() {
        assert_eq!(seed(77, 0), 77);
        let seeds: Vec<u64> = (0..64).map(|i| seed(77, i)).collect();
        assert!(seeds.iter().enumerate().all(|(i, s)| !seeds[..i].contains(s)));
    }

    #[test]
    fn disconnect_is_a_bare_disc_request() {
        let d = disconnect();
        assert_eq!(&d[4..8], &[0, 0, 0, 2]);
        assert!(d[8..].iter().all(|&b| b == 0));
    }
}
