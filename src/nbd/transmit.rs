//! The one transmission loop, shared by serve mode (a listening socket) and
//! the kernel's socketpair.
//!
//! Blocking and single-threaded, and batched: it takes every request that is
//! already waiting on the socket (up to `MAX_BATCH`, or until the staging
//! buffer is full; while the store has queued nothing, `DONE_BATCH` or
//! `DONE_BYTES`) and hands them all to the store. Replies then go
//! out in groups, each as soon as the store has done its part: reads wait
//! for their data, a group of `group` of them at a time, so the first
//! replies are on the wire while the device still copies the rest; writes
//! are acknowledged once their data is handed to the store, and the store
//! finishes them while the loop reads the next batch: staging is used as a
//! ring, so the loop waits for the store's copies out of it only when it
//! comes round to them again (or for a flush or FUA). A full batch whose
//! replies wait for the device is held while the loop queues the batch
//! already waiting behind it, and answered only then, so that the device
//! works meanwhile (`NBD_VRAM_AHEAD=0` answers each batch first). A store
//! that lends its bytes (host RAM, `Done::Lent`) skips staging: read
//! replies are sent from them, and write payloads land in them straight
//! from the socket (a peer that vanishes mid-payload gets the old bytes
//! put back; `input.rs` takes payloads off the socket).
//! Reads poll the socket briefly before they block (`poll.rs`).
//! All memory is allocated before the first request, so a swap device
//! served here never needs a free page to make progress.

use std::io::{self, IoSlice, Write};
use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Instant;

use crate::uapi as sys;
use super::proto::{self, broken, Export, Request, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, MAX_PAYLOAD, REPLY_LEN};
use super::input::{Got, Input};
use crate::sock::{queued, send_nowait};
use crate::stats::{Phases, Stats};
use crate::store::{Done, Staging, Store, Unfenced};
use crate::tuning::Tuning;

/// Requests in a batch at most. Fewer replies per burst keep the client's
/// queue fuller, and 16 still leaves the copy kernel 8 or more copies per
/// launch: on an H200 (2026-12-02, pinned, two runs of two rounds) 4 KiB
/// QD32 writes went 9–38 % faster than with 64, sequential patterns (QD8,
/// never bound by it) within their noise.
pub const MAX_BATCH: usize = 16;
/// A batch's bounds while the store has queued none of it (a store in
/// memory finishes each operation on return): there are no copies to
/// amortise, and answering sooner keeps the client's queue full. Measured with host RAM in alternating runs: 8 requests
/// against 64, 4 KiB QD32 +28–50 %; 64 KiB against no byte bound,
/// sequential 128 KiB +7–29 % (docs/performance.md, "The host store and the serve loop").
const DONE_BATCH: usize = 8;
const DONE_BYTES: usize = 64 * 1024;
/// iovecs the kernel copies without allocating (`UIO_FASTIOV`, uio.h).
const UIO_FASTIOV: usize = 8;

const EINVAL: u32 = libc::EINVAL as u32;
const ENOSPC: u32 = libc::ENOSPC as u32;
const EIO: u32 = libc::EIO as u32;

/// What the connections to one export share, besides the store's bytes.
pub struct Shared {
    pub export: Export,
    /// The store failed after taking work: what it holds is unknown, so
    /// every request on every connection is answered `EIO` from now on.
    lost: AtomicBool,
}

impl Shared {
    pub fn new(export: Export, connections: usize) -> Shared {
        Shared { export: export.with_connections(connections), lost: AtomicBool::new(false) }
    }

    pub fn lost(&self) -> bool {
        self.lost.load(Relaxed)
    }
}

/// Why a connection ended without an error.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed its end between requests.
    Closed,
}


/// One answered request of a batch.
#[derive(Clone)]
struct Slot {
    reply: [u8; REPLY_LEN],
    /// Read data to send after the header: bytes of staging, or of the
    /// store itself if it lent them.
    data: Range<usize>,
    /// What the store had done with it; `None`: the store never saw it.
    done: Option<Done>,
    /// Its reply waits until the store has done the work: a read's data,
    /// or a write with FUA.
    waits: bool,
    /// The request's command and length, counted once its reply is final.
    command: u32,
    len: u32,
}

impl Slot {
    const EMPTY: Slot = Slot { reply: [0; REPLY_LEN], data: 0..0, done: None, waits: false, command: 0, len: 0 };

    fn ok(&self) -> bool {
        self.error() == 0
    }

    fn error(&self) -> u32 {
        u32::from_be_bytes([self.reply[4], self.reply[5], self.reply[6], self.reply[7]])
    }

    fn lent(&self) -> bool {
        self.done == Some(Done::Lent)
    }

    /// Turns the success of a request the store took into `EIO`.
    fn fail(&mut self) {
        if self.done.is_some() && self.ok() {
            self.reply[4..8].copy_from_slice(&EIO.to_be_bytes());
        }
    }
}

/// Everything the loop needs, allocated once and reused by every connection.
pub struct Buffers<B> {
    staging: B,
    /// Where the next request's staging starts; what lies after it may
    /// still be in the store's hands.
    ring: usize,
    input: Input,
    replies: Replies,
}

/// The answers of the batches in hand, and how they go out.
struct Replies {
    /// A held batch's slots (see `held`), then the batch being gathered.
    slots: Box<[Slot]>,
    /// The replies' headers, end to end.
    heads: Box<[u8]>,
    /// Each group of slots: where it ends, and its fence (`None`: the store
    /// could not start its work, which is answered `EIO`).
    groups: Box<[(usize, Option<usize>)]>,
    ngroups: usize,
    group: usize,
    /// A full batch whose copies the device runs while the next batch is
    /// gathered and queued: its slots and groups come first. Answering it
    /// only then hides the device's latency behind that work.
    held: usize,
    held_groups: usize,
    /// `NBD_VRAM_AHEAD=0`: every batch is answered before the next.
    ahead: bool,
    /// Whether a lone read's reply header may go out before its data (see
    /// `tell_early`); `NBD_VRAM_EARLY_HEADER=0` says no.
    early: bool,
}

impl Replies {
    /// Moves the batch gathered after the held one, now answered, to the
    /// front.
    fn forget_held(&mut self) {
        let (held, groups) = (self.held, self.held_groups);
        let end = self.groups[..self.ngroups].last().map_or(held, |g| g.0);
        self.slots[..end].rotate_left(held);
        self.groups.copy_within(groups..self.ngroups, 0);
        self.ngroups -= groups;
        self.groups[..self.ngroups].iter_mut().for_each(|g| g.0 -= held);
        (self.held, self.held_groups) = (0, 0);
    }
}

impl<B: Staging> Buffers<B> {
    /// With staging for the largest request NBD allows.
    #[cfg(test)]
    pub fn new<S: Store<Buf = B>>(store: &mut S, tuning: &Tuning) -> io::Result<Buffers<B>> {
        Self::with_staging(store, tuning, MAX_PAYLOAD as usize)
    }

    /// With `staging` bytes of staging: a read or write longer than that
    /// is refused (`EINVAL`), so the kernel must be told to send none
    /// (`NbdDevice::limit_requests`).
    pub fn with_staging<S: Store<Buf = B>>(store: &mut S, tuning: &Tuning, staging: usize) -> io::Result<Buffers<B>> {
        const { assert!(2 * MAX_BATCH <= crate::store::FENCES, "a fence per slot of two batches at most") };
        const { assert!(MAX_BATCH == crate::tuning::GROUP_MAX, "NBD_VRAM_GROUP goes up to a whole batch") };
        Ok(Buffers {
            staging: store.staging(staging.min(MAX_PAYLOAD as usize))?,
            ring: 0,
            input: Input::new(tuning.spin)?,
            replies: Replies {
                slots: vec![Slot::EMPTY; 2 * MAX_BATCH].into_boxed_slice(),
                heads: crate::touch::zeroed(REPLY_LEN * 2 * MAX_BATCH)?,
                groups: vec![(0, None); 2 * MAX_BATCH].into_boxed_slice(),
                ngroups: 0,
                group: tuning.group,
                held: 0,
                held_groups: 0,
                ahead: tuning.ahead,
                early: tuning.early_header,
            },
        })
    }
}

/// Serves one negotiated connection until the client disconnects.
/// `Err` means a broken stream (bad magic, truncated request, socket error):
/// the caller drops the connection, the store is intact and synced. A store
/// that failed may still have work on `bufs`' staging until it is dropped:
/// callers drop it first (`workers::Conn`).
pub fn run<S, T>(store: &mut S, bufs: &mut Buffers<S::Buf>, shared: &Shared, stats: &Stats, conn: &mut T) -> io::Result<End>
where
    S: Store,
    T: Write + AsFd,
{
    // Here, not where each serving thread starts: whatever thread serves,
    // the stack its requests use is in RAM before the first one.
    crate::touch::stack();
    bufs.input.clear();
    bufs.ring = 0; // the last connection ended with a sync
    (bufs.replies.held, bufs.replies.held_groups) = (0, 0);
    let mut link = Link { store, bufs, shared, stats, conn, phases: Phases::default() };
    loop {
        let begun = Instant::now();
        link.phases = Phases::default();
        let (n, more, end) = link.gather();
        let started = Instant::now();
        let held = link.bufs.replies.held;
        link.close_group(held + n);
        let mut answered = Ok(());
        if held > 0 {
            answered = link.answer(0..link.bufs.replies.held_groups);
            link.bufs.replies.forget_held();
        }
        // Only replies that wait for the device gain from it: writes are
        // answered on hand-over, and what the store finished or lent has
        // nothing to wait for.
        let waits = link.bufs.replies.slots[..n].iter().any(|s| s.waits && s.ok());
        let hold = more && waits && end.is_none() && answered.is_ok() && link.bufs.replies.ahead;
        if hold {
            (link.bufs.replies.held, link.bufs.replies.held_groups) = (n, link.bufs.replies.ngroups);
        } else {
            answered = answered.and_then(|()| link.answer(0..link.bufs.replies.ngroups));
        }
        if end.is_some() || answered.is_err() {
            link.settle(); // the store is left synced, as the caller expects
            link.store.idle(); // and the next client may be long in coming
        }
        if n > 0 {
            link.stats.record_batch(nanos(started));
        }
        link.phases.wall = nanos(begun);
        link.stats.record_phases(&link.phases);
        match end {
            Some(Ok(end)) => return Ok(end),
            Some(Err(e)) => return Err(e),
            None => answered?,
        }
    }
}

struct Link<'a, S: Store, T> {
    store: &'a mut S,
    bufs: &'a mut Buffers<S::Buf>,
    shared: &'a Shared,
    stats: &'a Stats,
    conn: &'a mut T,
    /// This batch's time by phase, so far.
    phases: Phases,
}

fn nanos(since: Instant) -> u64 {
    since.elapsed().as_nanos() as u64
}

impl<S: Store, T: Write + AsFd> Link<'_, S, T> {
    /// Queues a batch after the held one, if any; returns its size,
    /// whether it stopped at its bounds (more may be waiting) and, if the
    /// connection must end after answering it, how. Waits for a first
    /// request only if no batch is held.
    fn gather(&mut self) -> (usize, bool, Option<io::Result<End>>) {
        let base = self.bufs.replies.held;
        let mut n = 0;
        let mut waiting = 0;
        self.bufs.replies.ngroups = self.bufs.replies.held_groups;
        let mut payload = 0;
        let mut queued = false;
        let full = |n: usize, payload: usize, queued: bool| n == MAX_BATCH || (!queued && (n == DONE_BATCH || payload >= DONE_BYTES));
        while !full(n, payload, queued) {
            let Some(head) = self.bufs.input.header() else {
                match self.fill(n == 0 && base == 0) {
                    Ok(Got::Data) => continue,
                    Ok(Got::Nothing) => break,
                    Ok(Got::Eof) if self.bufs.input.available() == 0 => return (n, false, Some(Ok(End::Closed))),
                    Ok(Got::Eof) => return (n, false, Some(Err(broken("truncated request")))),
                    Err(e) => return (n, false, Some(Err(e))),
                }
            };
            let Some(req) = Request::parse(head) else {
                return (n, false, Some(Err(broken("bad request magic"))));
            };
            if self.overwrites_read(&req, base + n) {
                break; // the read's reply goes first, from the store as it is
            }
            let len = self.staged_len(&req);
            if self.bufs.ring + len > self.bufs.staging.size() {
                if n > 0 || base > 0 {
                    break; // the next batch starts with it, once nothing is held
                }
                // Round to the start of the ring, whose copies may be queued still.
                self.settle();
                self.bufs.ring = 0;
            }
            let stage = self.bufs.ring..self.bufs.ring + len;
            self.bufs.input.take_header(&req);
            if req.command == sys::NBD_CMD_DISC {
                return (n, false, Some(Ok(End::Disconnect)));
            }
            if req.command == sys::NBD_CMD_FLUSH {
                // What fails to start before a flush fails its own requests, not the flush.
                self.close_group(base + n);
                waiting = 0;
            }
            let slot = match self.execute(&req, stage.clone()) {
                Ok(slot) => slot,
                Err(e) => return (n, false, Some(Err(e))),
            };
            let waits = slot.waits;
            queued |= slot.done == Some(Done::Queued);
            if !slot.lent() {
                self.bufs.ring = stage.end; // the store may still copy to or from it
            }
            self.bufs.replies.slots[base + n] = slot;
            payload += len;
            n += 1;
            if req.command == sys::NBD_CMD_FLUSH {
                // Nor does what fails after it: the flush is done.
                self.close_group(base + n);
                waiting = 0;
            } else if waits {
                waiting += 1;
                if waiting == self.bufs.replies.group {
                    self.close_group(base + n);
                    waiting = 0;
                }
            }
        }
        (n, full(n, payload, queued), None)
    }

    /// Whether `req` changes bytes that a read among the batch's first `n`
    /// slots sends straight from the store (lent).
    fn overwrites_read(&self, req: &Request, n: usize) -> bool {
        if !matches!(req.command, sys::NBD_CMD_WRITE | sys::NBD_CMD_TRIM | sys::NBD_VRAM_CMD_WRITE_ZEROES) {
            return false;
        }
        let (start, end) = (req.offset, req.offset.saturating_add(u64::from(req.len)));
        let reads = &self.bufs.replies.slots[..n];
        reads.iter().any(|s| s.lent() && (s.data.start as u64) < end && start < s.data.end as u64)
    }

    /// Fences the slots since the last group up to `end`, so that their
    /// work starts now; if it cannot, they are answered `EIO`.
    fn close_group(&mut self, end: usize) {
        let replies = &self.bufs.replies;
        let start = replies.ngroups.checked_sub(1).map_or(0, |g| replies.groups[g].0);
        if end == start {
            return;
        }
        let at = Instant::now();
        let fence = match self.store.fence() {
            Ok(token) => Some(token),
            Err(Unfenced::NotStarted) => None,
            Err(Unfenced::Lost) => {
                self.lose();
                None
            }
        };
        self.phases.store += nanos(at);
        let b = &mut *self.bufs;
        if fence.is_none() {
            b.replies.slots[start..end].iter_mut().for_each(Slot::fail);
        }
        b.replies.groups[b.replies.ngroups] = (end, fence);
        b.replies.ngroups += 1;
    }

    /// Waits for everything the store was given, so that all of staging
    /// is free again.
    fn settle(&mut self) {
        let at = Instant::now();
        if self.store.sync().is_err() {
            self.lose();
        }
        self.phases.store += nanos(at);
    }

    /// The store failed with work already taken: logs it once, and from
    /// now on nothing is trusted to it.
    fn lose(&mut self) {
        self.stats.failed.store(true, Relaxed);
        if !self.shared.lost.swap(true, Relaxed) {
            crate::error!(
                "the store failed after taking writes, some of which may have been acknowledged: \
                 their data may be lost. Every request is answered EIO from now on; restart nbd-vram"
            );
        }
    }

    /// Hands one request to the store. `Err` only for a broken stream.
    fn execute(&mut self, req: &Request, stage: Range<usize>) -> io::Result<Slot> {
        let mut slot = Slot { command: req.command, len: req.len, ..Slot::EMPTY };
        let mut error = self.check(req);
        let mut landed = false;
        if req.command == sys::NBD_CMD_WRITE {
            // The payload follows the header whatever we answer.
            (error, landed) = self.take_write(req, error, stage.clone())?;
        }
        if error != 0 {
            slot.reply = proto::reply(error, req.cookie);
            return Ok(slot);
        }
        let len = u64::from(req.len);
        let at = Instant::now();
        let done = match req.command {
            // SAFETY: `stage` is this request's own part of the ring, which
            // the loop leaves alone until the store has done the copy: a
            // read's reply is sent once its fence is waited for, and the
            // ring comes round only after `settle` syncs the store. Where a
            // wait or sync fails, the store is lost (`lose`) and no request
            // reaches staging again. Staging outlives the store (`run`).
            sys::NBD_CMD_READ => unsafe { self.store.read(req.offset, self.bufs.staging.part_mut(stage.clone())) },
            sys::NBD_CMD_WRITE if landed => Ok(Done::Lent),
            // SAFETY: as for the read.
            sys::NBD_CMD_WRITE => unsafe { self.store.write(req.offset, self.bufs.staging.part(stage.clone())) },
            sys::NBD_CMD_FLUSH => self.store.flush().map(|()| Done::Finished),
            sys::NBD_CMD_TRIM => self.store.trim(req.offset, len),
            _ => self.store.zero(req.offset, len), // check() let only WRITE_ZEROES through
        };
        self.phases.store += nanos(at);
        match done {
            Ok(done) => {
                slot.done = Some(done);
                slot.waits = done == Done::Queued
                    && match req.command {
                        sys::NBD_CMD_READ => true,
                        _ => req.flags & CMD_FLAG_FUA != 0,
                    };
                if req.command == sys::NBD_CMD_READ {
                    let start = req.offset as usize; // `check` put it in range
                    slot.data = if done == Done::Lent { start..start + req.len as usize } else { stage };
                }
            }
            Err(e) => {
                crate::error!("{} at offset {} length {len} failed: {}", name(req.command), req.offset, crate::log::ErrorText(&e));
                error = EIO;
                if req.command == sys::NBD_CMD_FLUSH {
                    self.lose(); // a failed sync: work already taken failed
                }
            }
        }
        slot.reply = proto::reply(error, req.cookie);
        Ok(slot)
    }

    /// The NBD error a request earns before touching the store ("Error values").
    fn check(&self, req: &Request) -> u32 {
        if self.shared.lost() {
            return EIO;
        }
        let mut allowed = CMD_FLAG_FUA;
        if req.command == sys::NBD_VRAM_CMD_WRITE_ZEROES {
            allowed |= CMD_FLAG_NO_HOLE;
        }
        if req.flags & !allowed != 0 {
            return EINVAL;
        }
        let writes = match req.command {
            sys::NBD_CMD_FLUSH => return if req.offset == 0 && req.len == 0 { 0 } else { EINVAL },
            sys::NBD_CMD_READ | sys::NBD_CMD_TRIM => false,
            sys::NBD_CMD_WRITE | sys::NBD_VRAM_CMD_WRITE_ZEROES => true,
            _ => return EINVAL,
        };
        let staged = matches!(req.command, sys::NBD_CMD_READ | sys::NBD_CMD_WRITE);
        if req.len == 0 || (staged && req.len as usize > self.bufs.staging.size()) {
            return EINVAL;
        }
        match req.offset.checked_add(u64::from(req.len)) {
            Some(end) if end <= self.shared.export.size => 0,
            _ if writes => ENOSPC,
            _ => EINVAL,
        }
    }

    /// Sends the replies of `groups`, group by group, each once the store
    /// has done the work its replies wait for.
    fn answer(&mut self, groups: Range<usize>) -> io::Result<()> {
        let mut start = groups.start.checked_sub(1).map_or(0, |g| self.bufs.replies.groups[g].0);
        for g in groups {
            let (end, fence) = self.bufs.replies.groups[g];
            let slots = &self.bufs.replies.slots[start..end];
            let mut told = false;
            if let Some(token) = fence.filter(|_| slots.iter().any(|s| s.waits && s.ok())) {
                told = self.tell_early(start..end)?;
                let at = Instant::now();
                let waited = self.store.wait(token);
                self.phases.store += nanos(at);
                if waited.is_err() {
                    self.lose();
                    if told {
                        let read = &self.bufs.replies.slots[start];
                        self.stats.record(read.command, read.len, EIO);
                        return Err(broken("a read failed after its reply header was sent, and its data cannot follow"));
                    }
                }
            }
            // Lost here or, meanwhile, on another connection: every reply
            // is EIO, but for a read whose success header went out before
            // (it is alone in its group) and whose copy is done: its data
            // follows, as it would have a moment earlier. Ending the
            // connection instead would leave the kernel's request waiting
            // for its timeout.
            if self.shared.lost() && !told {
                self.bufs.replies.slots[start..end].iter_mut().for_each(Slot::fail);
            }
            // Counted as answered: a success turned EIO above, or when its
            // group could not start, is an error in `status`.
            for slot in &self.bufs.replies.slots[start..end] {
                self.stats.record(slot.command, slot.len, slot.error());
            }
            let at = Instant::now();
            let sent = self.send(start..end, told);
            self.phases.send += nanos(at);
            sent?;
            start = end;
        }
        Ok(())
    }

    /// Sends the header of a lone read's reply while the store still copies
    /// its data, so that the client wakes up meanwhile: on an H200 this
    /// took a 4 KiB queue-depth-1 read from 18–20 µs to 13–14 µs
    /// (docs/performance.md, "Early reply header"). The header says the read
    /// succeeded, so if it then fails the connection must end; and none
    /// goes once the store is lost (by an earlier group's wait), as the read
    /// will answer EIO. Returns whether it was sent.
    fn tell_early(&mut self, slots: Range<usize>) -> io::Result<bool> {
        let [slot] = &self.bufs.replies.slots[slots] else { return Ok(false) };
        if !self.bufs.replies.early || self.shared.lost() || slot.lent() || slot.data.is_empty() || !slot.ok() {
            return Ok(false);
        }
        let at = Instant::now();
        // A client not reading gets it with the data instead (`send`).
        let told = match send_nowait(self.conn.as_fd(), &[IoSlice::new(&slot.reply)])? {
            None => false,
            Some(n) => {
                if n < slot.reply.len() {
                    // No room for the rest: waited for with the store
                    // idle, as in `send`.
                    self.store.idle();
                }
                self.conn.write_all(&slot.reply[n..])?;
                true
            }
        };
        self.phases.send += nanos(at);
        Ok(told)
    }

    /// Sends the replies of `slots`, with read data (without the first
    /// header if it was `told` early). Headers are laid end
    /// to end, so a run of writes is one iovec; each `writev` takes at most
    /// `UIO_FASTIOV` iovecs, which the kernel keeps on its stack: a longer
    /// vector is kmalloc'ed, and under memory pressure that allocation (no
    /// I/O allowed, no OOM kill for it) waits for ever while the kernel
    /// waits for this very reply. A client that leaves no room for them
    /// (one that stopped reading) is waited for with the store idle, so
    /// that it holds no mailbox kernel on the GPU meanwhile.
    fn send(&mut self, slots: Range<usize>, told: bool) -> io::Result<()> {
        if let Some(sent) = self.send_from(slots.clone(), told, None)? {
            self.store.idle();
            self.send_from(slots, told, Some(sent))?;
        }
        Ok(())
    }

    /// `send`'s work: all of it without waiting (`skip` none), `Some` of
    /// what it sent if the socket then had no room; or, after `skip`
    /// bytes, the rest, waiting for room.
    fn send_from(&mut self, slots: Range<usize>, told: bool, skip: Option<usize>) -> io::Result<Option<usize>> {
        let b = &mut *self.bufs;
        let store = &*self.store;
        let heads = &mut b.replies.heads[slots.start * REPLY_LEN..slots.end * REPLY_LEN];
        for (slot, head) in b.replies.slots[slots.clone()].iter().zip(heads.chunks_exact_mut(REPLY_LEN)) {
            head.copy_from_slice(&slot.reply);
        }
        let mut iov = [IoSlice::new(&[]); 2 * MAX_BATCH + 1];
        let mut count = 0;
        let mut run = usize::from(told); // first header not yet in an iovec
        for (i, slot) in b.replies.slots[slots.clone()].iter().enumerate() {
            if slot.ok() && !slot.data.is_empty() {
                let data = if slot.lent() {
                    store.bytes(slot.data.start as u64, slot.data.len()).ok_or_else(|| broken("read left the store"))?
                } else {
                    b.staging.part(slot.data.clone())
                };
                iov[count] = IoSlice::new(&heads[run * REPLY_LEN..(i + 1) * REPLY_LEN]);
                iov[count + 1] = IoSlice::new(data);
                count += 2;
                run = i + 1;
            }
        }
        if run < slots.len() {
            iov[count] = IoSlice::new(&heads[run * REPLY_LEN..]);
            count += 1;
        }
        let mut iov = &mut iov[..count];
        IoSlice::advance_slices(&mut iov, skip.unwrap_or(0));
        let mut sent = skip.unwrap_or(0);
        while !iov.is_empty() {
            let take = iov.len().min(UIO_FASTIOV);
            let wrote = match skip {
                None => match send_nowait(self.conn.as_fd(), &iov[..take])? {
                    Some(n) => Ok(n),
                    None => return Ok(Some(sent)),
                },
                Some(_) => self.conn.write_vectored(&iov[..take]),
            };
            match wrote {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    IoSlice::advance_slices(&mut iov, n);
                    sent += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Reads more input, waiting only if `wait` (`Input::fill`).
    fn fill(&mut self, wait: bool) -> io::Result<Got> {
        let (conn, store) = (self.conn.as_fd(), &mut *self.store);
        if !wait {
            self.phases.quick_reads += 1;
            return self.bufs.input.fill(conn, false, || {});
        }
        let at = Instant::now();
        let got = loop {
            match self.bufs.input.fill(conn, true, || store.idle()) {
                // A receive timeout (the serve mode's stall limit) with no
                // part of a request here: the client is only idle, as it
                // may be for hours.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && self.bufs.input.available() == 0 => {}
                got => break got,
            }
        };
        self.phases.idle += nanos(at);
        got
    }

    /// Takes a write's payload off the input: into the store where it
    /// offers a `landing`, else into `stage`; skips it if `error` refuses
    /// the write. Returns the request's error and whether it landed.
    ///
    /// A payload that lands in the store but is not all on hand yet (in
    /// input or queued on the socket) may never arrive whole: the bytes it
    /// replaces are saved in `stage` as it arrives, and go back if the peer
    /// vanishes mid-payload. Against landing the payload in staging and
    /// copying it over: sequential 128 KiB writes +11–25 % per round
    /// (docs/performance.md, "The host store and the serve loop"). With
    /// other connections to the store, putting bytes back could undo their
    /// writes answered meanwhile: there such a payload waits in staging.
    fn take_write(&mut self, req: &Request, error: u32, stage: Range<usize>) -> io::Result<(u32, bool)> {
        if error != 0 || stage.is_empty() {
            self.discard(u64::from(req.len))?;
            return Ok((error, false));
        }
        let len = req.len as usize;
        let alone = self.shared.export.flags & sys::NBD_FLAG_CAN_MULTI_CONN as u16 == 0;
        let (conn, b) = (self.conn.as_fd(), &mut *self.bufs);
        let input = &mut b.input;
        let landed = match self.store.landing(req.offset, len) {
            Some(dst) => {
                let have = input.available().min(len);
                // A socket that cannot say counts as empty.
                let whole = have == len || queued(conn).unwrap_or(0) >= len - have;
                if whole || alone {
                    let undo = b.staging.part_mut(if whole { 0..0 } else { stage });
                    input.take_payload(conn, dst, undo, &mut || {})?;
                    true
                } else {
                    input.take_payload(conn, b.staging.part_mut(stage), &mut [], &mut || {})?;
                    false
                }
            }
            None => {
                let store = &mut *self.store;
                let dst = b.staging.part_mut(stage);
                if store.uncached(len) {
                    input.take_payload_uncached(conn, dst, &mut || store.idle())?;
                } else {
                    input.take_payload(conn, dst, &mut [], &mut || store.idle())?;
                }
                false
            }
        };
        Ok((0, landed))
    }

    /// Staging a request occupies: its payload, if it has one that fits.
    fn staged_len(&self, req: &Request) -> usize {
        match req.command {
            sys::NBD_CMD_READ | sys::NBD_CMD_WRITE if req.len as usize <= self.bufs.staging.size() => req.len as usize,
            _ => 0,
        }
    }

    /// Skips the payload of a refused write, so the stream stays in sync.
    fn discard(&mut self, len: u64) -> io::Result<()> {
        self.store.idle(); // its reads may block
        self.bufs.input.discard(self.conn.as_fd(), len)
    }
}

fn name(command: u32) -> &'static str {
    match command {
        sys::NBD_CMD_READ => "read",
        sys::NBD_CMD_WRITE => "write",
        sys::NBD_CMD_FLUSH => "flush",
        sys::NBD_CMD_TRIM => "trim",
        _ => "write-zeroes",
    }
}

#[cfg(test)]
#[path = "transmit_tests.rs"]
mod tests;
