//! `Copier`: moves bytes between staging and a `VramMemory` with async
//! copies on one stream, so a batch of requests costs one synchronisation.
//! It owns how each copy goes (batched, by the copy kernel, by the mailbox
//! kernel as `Resident` decides, one by one) and the care for another
//! process on the GPU; what its fences cover and how far its work is done
//! is `Fences`'; its order with the other connections' copiers, `Lane`'s;
//! the memory it copies to and from is borrowed per call.

use std::io;
use std::ops::Range;
use std::time::Instant;

use super::memory::VramMemory;
use super::fences::Fences;
use super::lanes::{Lane, Span};
use super::resident::Resident;
use crate::cuda::{Context, CopyBatch, DeviceMem, Error, Mailbox, Mover, Pinned, Stream};
use crate::store::neighbours::Seen;
use crate::store::Unfenced;
use crate::tuning::{MailboxUse, Tuning};
use crate::{error, info, warn};

pub struct Copier<'c> {
    ctx: &'c Context,
    stream: Stream<'c>,
    /// Copies waiting for one batched driver call, all in one direction.
    batch: Option<Batch>,
    /// The copy kernel, for batches of small pieces.
    mover: Option<Mover<'c>>,
    /// The mailbox kernel, for small copies while requests come back to
    /// back: a lone one, or a batch as a list.
    resident: Resident<'c>,
    fences: Fences<'c>,
    /// With several connections: this one's place among them, the blocks
    /// its work queued since it last followed the others touches, and
    /// those its changes since it last published do.
    lane: Option<Lane<'c>>,
    /// Write payloads may reach staging around the caches (`uncached`).
    uncached: bool,
    touched: Span,
    changed: Span,
    /// Another process computing on the GPU keeps copies off our kernels
    /// and off the compute engine.
    /// Whether another process uses the GPU, as last seen.
    seen: &'c Seen,
    /// Zeroes by copy while another process computes: a memset runs on
    /// the compute engine, taking turns with its kernels (as small copies
    /// do, see `as_rows`).
    zeros: Pinned<'c>,
}

/// The zero source's length: copies this long go on a copy engine.
const ZEROS: usize = 64 * 1024;

/// Connections writing at once from which a write payload of `len` bytes
/// reaches staging around the CPU caches. Landing so costs the loop a
/// second copy and saves the contention of the GPU reading staging that
/// the cores' caches hold. On an H200 (2026-12-04, docs/performance.md,
/// "Several connections"), against landing through the caches, at 1 / 2 /
/// 4 / 8 connections: 128 KiB writes 0.90–0.99 / 1.12 / 1.39–1.43 /
/// 1.49–1.84×, 1 MiB writes 0.78–0.89 / 0.98 / 0.93–1.02 / 1.10–1.18×.
fn uncached_from(len: usize) -> usize {
    if len <= 256 * 1024 {
        2
    } else {
        8
    }
}

/// Pieces a batch holds before it is issued: a full batch of 4 KiB
/// requests, each split at most once at a chunk boundary.
const BATCH_PIECES: usize = 256;

struct Batch {
    copies: CopyBatch,
    writes: bool,
    /// A batched call failed: the requests fenced next answer EIO.
    failed: bool,
}

impl<'c> Copier<'c> {
    /// Sets up the stream, the copy paths `tuning` allows, the fence events
    /// and the zero source; call once `memory` holds all it will. One
    /// copier of a store `tells` (logs) what it chose, for all.
    pub fn new(ctx: &'c Context, seen: &'c Seen, memory: &VramMemory<'c>, lane: Option<Lane<'c>>, tuning: &Tuning, tells: bool) -> Result<Copier<'c>, Error> {
        let stream = ctx.stream()?;
        let CopyPath { batched, mover, mailbox, lists } = copy_path(ctx, &stream, memory.chunks(), tuning, tells);
        let batch = batched.then(|| Batch {
            copies: CopyBatch::with_capacity(BATCH_PIECES),
            writes: false,
            failed: false,
        });
        let mut copier = Copier {
            ctx,
            stream,
            batch,
            mover,
            resident: Resident::new(mailbox, lists),
            fences: Fences::new(ctx)?,
            lane,
            uncached: tuning.uncached,
            touched: Span::EMPTY,
            changed: Span::EMPTY,
            seen,
            zeros: ctx.pinned(ZEROS)?,
        };
        copier.zeros.fill(0);
        Ok(copier)
    }

    pub fn staging(&mut self, len: usize) -> io::Result<Pinned<'c>> {
        let mut buf = self.ctx.pinned(len).map_err(|e| io::Error::other(e.to_string()))?;
        buf.fill(0); // fault every page in now, never while serving
        Ok(buf)
    }

    /// Issues the waiting batch, if any; a failure shows at `fence`.
    fn flush(&mut self) {
        // Every request passes here (fences, memsets and syncs too).
        self.resident.yield_to_waiting_call(&mut self.fences);
        if self.batch.as_ref().is_none_or(|b| b.copies.is_empty()) {
            return;
        }
        let shared = self.seen.present();
        // Another connection's published changes come first: the stream
        // waits for them, and the mailbox kernel would not.
        let news = self.lane.as_ref().is_some_and(|lane| lane.news(self.touched));
        if shared {
            self.resident.park(&mut self.fences);
        } else if let Some(b) = self.batch.as_mut().filter(|_| !news) {
            if self.resident.post(&mut b.copies, b.writes, &mut self.fences, &self.stream) {
                self.touched = Span::EMPTY;
                return;
            }
        }
        let handed = self.hand_over();
        if let Some(b) = &mut self.batch {
            if let Err(e) = handed.and_then(|()| copy_batch(&self.stream, &mut b.copies, b.writes, self.mover.as_ref(), shared)) {
                error!("{e}");
                b.failed = true;
                // Never issued later: its requests are answered EIO, and
                // their copies must not land after newer acknowledged ones.
                b.copies.clear();
            }
        }
    }

    /// Counts one more hand-over of work to the stream (`Fences`), which
    /// comes after the mailbox kernel's and after the changes other
    /// connections published. The waits for those go after the event of
    /// the fence before (so its reads never wait for another connection's
    /// writes), and are counted with the work that follows them.
    fn hand_over(&mut self) -> Result<(), Error> {
        self.resident.finish(&mut self.fences)?;
        self.resident.forget_abandoned()?;
        self.fences.hand_over(&self.stream)?;
        let touched = std::mem::replace(&mut self.touched, Span::EMPTY);
        match &mut self.lane {
            Some(lane) => lane.follow(&self.stream, touched),
            None => Ok(()),
        }
    }

    /// Makes room in the batch for copies in direction `writes`.
    fn batch_for(&mut self, writes: bool) -> bool {
        let Some(b) = &self.batch else { return false };
        if b.writes != writes || b.copies.is_full() {
            self.flush();
        }
        if let Some(b) = &mut self.batch {
            b.writes = writes;
        }
        true
    }

    /// Adds the pieces of a request to the batch, `add` getting each
    /// chunk, offset in it, and range of the request's buffer. False when
    /// copies are not batched.
    fn queue(&mut self, memory: &VramMemory, offset: u64, len: u64, writes: bool, mut add: impl FnMut(&mut CopyBatch, &DeviceMem, u64, Range<usize>)) -> bool {
        if !self.batch_for(writes) {
            return false;
        }
        let mut at = 0;
        for (index, inner, n) in memory.piece_list(offset, len) {
            if self.batch.as_ref().is_some_and(|b| b.copies.is_full()) {
                self.flush();
            }
            if let Some(b) = &mut self.batch {
                add(&mut b.copies, &memory.chunks()[index], inner, at..at + n as usize);
            }
            at += n as usize;
        }
        true
    }

    /// The caller has checked the range (`VramMemory::check`).
    ///
    /// # Safety
    /// As for `Store::read`: `buf` is the device's until a wait or sync
    /// covers this read.
    pub unsafe fn read(&mut self, memory: &VramMemory, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len() as u64;
        self.touched.add(offset, len);
        // SAFETY: the caller's promise, which lasts until this copier's
        // stream or mailbox kernel has done the copies.
        if self.queue(memory, offset, len, false, |b, chunk, inner, r| unsafe { b.read(chunk, inner, &mut buf[r]) }) {
            return Ok(());
        }
        self.hand_over().map_err(eio)?;
        let mut rest = buf;
        for (chunk, inner, n) in memory.pieces(offset, rest.len() as u64) {
            let (now, later) = rest.split_at_mut(n as usize);
            // SAFETY: as above.
            unsafe { self.stream.read(chunk, inner, now) }.map_err(eio)?;
            rest = later;
        }
        Ok(())
    }

    /// # Safety
    /// As for `Store::write`: `buf` stays unchanged until a fence after
    /// this write is waited for, or a sync.
    pub unsafe fn write(&mut self, memory: &VramMemory, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.touched.add(offset, buf.len() as u64);
        self.changed.add(offset, buf.len() as u64);
        // SAFETY: the caller's promise, as in `read`.
        if self.queue(memory, offset, buf.len() as u64, true, |b, chunk, inner, r| unsafe { b.write(chunk, inner, &buf[r]) }) {
            return Ok(());
        }
        self.hand_over().map_err(eio)?;
        let shared = self.seen.present();
        let mut rest = buf;
        for (chunk, inner, n) in memory.pieces(offset, rest.len() as u64) {
            let (now, later) = rest.split_at(n as usize);
            // SAFETY: as above.
            unsafe { self.stream.write(chunk, inner, now, as_rows(shared, now.len())) }.map_err(eio)?;
            rest = later;
        }
        Ok(())
    }

    pub fn zero(&mut self, memory: &VramMemory, offset: u64, len: u64) -> io::Result<()> {
        self.touched.add(offset, len);
        self.changed.add(offset, len);
        self.flush(); // the memset is ordered after queued copies only once they are issued
        self.hand_over().map_err(eio)?;
        let shared = self.seen.present();
        for (chunk, inner, n) in memory.pieces(offset, len) {
            if !shared {
                self.stream.zero(chunk, inner, n as usize).map_err(eio)?;
                continue;
            }
            for at in (0..n).step_by(ZEROS) {
                let piece = &self.zeros[..(n - at).min(ZEROS as u64) as usize];
                // SAFETY: the zero source is never written after `new`, and
                // `Drop` syncs the stream before it is freed.
                unsafe { self.stream.write(chunk, inner + at, piece, as_rows(true, piece.len())) }.map_err(eio)?;
            }
        }
        Ok(())
    }

    /// With several connections, also lets the changes before it be
    /// answered (`Lane::publish`); a change the mailbox kernel has is
    /// waited for here instead, as no stream covers it.
    pub fn fence(&mut self) -> Result<usize, Unfenced> {
        self.flush();
        let failed = self.batch.as_mut().is_some_and(|b| std::mem::take(&mut b.failed));
        let token = self.fences.fence();
        if let Some(lane) = &mut self.lane {
            // A write the kernel did not finish in time may still land,
            // after writes answered on other connections that no stream
            // orders it with; found here or by an earlier wait for it.
            if let Err(e) = self.resident.finish_writes(&mut self.fences) {
                error!("{e}");
            }
            if self.resident.take_missed_write() {
                return Err(Unfenced::Lost);
            }
            // Whatever was handed over, also when a batch after it could
            // not start: its copies run all the same.
            let changed = std::mem::replace(&mut self.changed, Span::EMPTY);
            if !changed.is_empty() {
                if let Err(e) = lane.publish(&self.stream, changed, self.fences.all_done()) {
                    error!("{e}");
                    // Done, then: nothing to publish.
                    self.stream.sync().map_err(|_| Unfenced::Lost)?;
                    self.fences.mark_all_done();
                }
            }
        }
        match failed {
            true => Err(Unfenced::NotStarted),
            false => Ok(token),
        }
    }

    pub fn wait(&mut self, token: usize) -> io::Result<()> {
        if self.resident.before(&self.fences, token) {
            self.resident.finished(&mut self.fences)?;
        }
        self.fences.wait(&self.stream, token)
    }

    /// Waits for this copier's own work, so that its staging is free
    /// again. Also reports a batch that failed to start since the last
    /// fence: a caller that writes and syncs (the swap header) must hear
    /// of it.
    pub fn sync(&mut self) -> io::Result<()> {
        self.flush();
        let failed = self.batch.as_mut().is_some_and(|b| std::mem::take(&mut b.failed));
        let finished = self.resident.finished(&mut self.fences);
        self.fences.sync(&self.stream)?;
        if failed {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        finished
    }

    /// `sync`, covering also the changes answered on every other
    /// connection (an NBD flush, with several).
    pub fn sync_all(&mut self) -> io::Result<()> {
        self.flush();
        if self.lane.as_ref().is_some_and(|lane| lane.news(Span::ALL)) {
            self.touched = Span::ALL;
            self.hand_over().map_err(eio)?;
        }
        self.sync()
    }

    /// Whether a write payload of `len` bytes should reach staging around
    /// the CPU caches: while as many connections write at once, as of
    /// `now()` (not asked on one connection), as `uncached_from` asks for
    /// its size.
    pub fn uncached(&mut self, len: usize, now: impl FnOnce() -> Instant) -> bool {
        let Some(lane) = self.lane.as_mut().filter(|_| self.uncached) else {
            return false;
        };
        1 + lane.others_writing(now()) >= uncached_from(len)
    }

    /// Requests are apart: the mailbox kernel waits for batches in a row
    /// again before it starts.
    pub fn idle(&mut self) {
        self.resident.idle(&mut self.fences);
    }

    #[cfg(test)]
    pub fn kernel_serves(&mut self) -> bool {
        self.resident.serves()
    }
}

/// How long a wait for the mailbox kernel spins before it sleeps, when
/// every CPU has a serving thread (`pressure::cpu_to_spare`).
const SPIN_WITHOUT_SPARE_CPU: std::time::Duration = std::time::Duration::from_micros(50);

/// Fewer copies than this go one call each (see `copy_batch`).
const BATCH_MIN: usize = 8;
/// Host → device copies below this size went through the compute engine
/// (H200, 2026-12-02: 24 KiB did, 32 KiB did not; see `as_rows`).
const INLINE_MAX: usize = 32 * 1024;

/// Queues every copy of `batch` (all host → device if `writes`, else
/// all device → host), and empties it: by `mover` if given and every
/// piece is small, else as one batched call. Both cost more than a few
/// single copies (H100, 2026-11-25: a lone 4 KiB read took 11.5 µs by
/// kernel, 7.9 µs by copy engine; docs/performance.md, "Copy engine and copy kernel"), so below `BATCH_MIN` copies they
/// go one by one; so do small writes while `shared` (see `as_rows`: a batch
/// of them went through the compute engine too), and `mover`, a kernel,
/// is not used then.
fn copy_batch(stream: &Stream, batch: &mut CopyBatch, writes: bool, mover: Option<&Mover>, shared: bool) -> Result<(), Error> {
    let many = batch.len() >= BATCH_MIN && !(shared && writes && batch.sizes().iter().any(|&n| n < INLINE_MAX));
    let done = if let Some(mover) = mover.filter(|_| many && batch.is_small() && !shared) {
        stream.launch(mover, batch)
    } else if let Some(done) = many.then(|| stream.copy_batch_api(batch)).flatten() {
        done
    } else {
        stream.copy_each(batch, writes, |len| as_rows(shared, len))
    };
    batch.clear();
    done
}

/// Whether a host → device copy of `len` bytes asks to go as two rows
/// (`Stream::write`), which the driver carries on a copy engine: on an
/// H200 (docs/performance.md, "Sharing the GPU with another process") lone 4 KiB writes cost a
/// co-tenant's kernels 87 % of their throughput and took 306 µs each,
/// against nothing and 7.5 µs as two rows. So while `shared`, small
/// copies of an even length go as two rows (alone they took 7.5 µs
/// against 6.9 µs, so only then); the driver layer keeps an odd length
/// as one copy.
fn as_rows(shared: bool, len: usize) -> bool {
    shared && len < INLINE_MAX
}

/// A failed copy is logged with CUDA's words and answered `EIO`.
pub(super) fn eio(e: Error) -> io::Error {
    error!("{e}");
    io::Error::from_raw_os_error(libc::EIO)
}

/// How copies are issued: batches of small pieces by the copy kernel
/// (unless `NBD_VRAM_KERNEL=0`), other batches by cuMemcpyBatchAsync_v2
/// where the driver has it, small copies in a row by the mailbox kernel
/// (lone ones only with `NBD_VRAM_MAILBOX=lone`, none with `0`);
/// `NBD_VRAM_BATCH=0` turns all of them off, one driver call per copy.
/// The switches compare the paths on one machine.
struct CopyPath<'c> {
    batched: bool,
    mover: Option<Mover<'c>>,
    mailbox: Option<Mailbox<'c>>,
    lists: bool,
}

fn copy_path<'c>(ctx: &'c Context, stream: &Stream, chunks: &[DeviceMem], tuning: &Tuning, tells: bool) -> CopyPath<'c> {
    let wanted = tuning.batch;
    let mover = match (wanted && tuning.copy_kernel).then(|| ctx.mover()).flatten() {
        Some(Ok(mover)) => Some(mover),
        Some(Err(e)) => {
            warn!("the copy kernel did not load ({e}): small copies go through the copy engine");
            None
        }
        None => None,
    };
    let api = wanted && stream.can_batch();
    let rest = if api { "batched (cuMemcpyBatchAsync_v2)" } else { "one driver call each" };
    match mover {
        Some(_) if tells => info!("copies: small ones by the copy kernel, others {rest}"),
        None if tells => info!("copies: {rest}"),
        _ => {}
    }
    let batched = api || mover.is_some();
    let lists = tuning.mailbox == MailboxUse::Lists;
    let mailbox = match (batched && tuning.mailbox != MailboxUse::Off).then(|| ctx.mailbox(chunks, crate::pressure::loops())).flatten() {
        Some(Ok(mut mailbox)) => {
            if !crate::pressure::cpu_to_spare() {
                // Spinning for a slow job would keep every CPU busy.
                mailbox.spin_for(SPIN_WITHOUT_SPARE_CPU);
            }
            let what = if lists { "lone ones and batches" } else { "lone ones" };
            if tells {
                info!("small copies back to back: by the mailbox kernel, {what}");
            }
            Some(mailbox)
        }
        Some(Err(e)) => {
            warn!("the mailbox kernel did not load ({e}): small copies go the other ways");
            None
        }
        None => None,
    };
    CopyPath { batched, mover, mailbox, lists }
}

impl Drop for Copier<'_> {
    /// Nothing queued may outlive the memory, module or staging it uses;
    /// the mailbox kernel goes first, as freeing memory may wait for every
    /// kernel to end. The memory is freed after this (a `VramStore` only
    /// borrows it).
    fn drop(&mut self) {
        self.resident.end(&mut self.fences);
        if let Err(e) = self.stream.sync() {
            error!("{e}");
        }
    }
}
