//! `VramBacking`: the bytes live in GPU memory (`VramMemory`), shared by
//! every connection; each connection's `VramStore` reaches them with async
//! copies on a stream of its own (`Copier`), so a batch of requests costs
//! one synchronisation.

mod copier;
mod fences;
mod lanes;
mod memory;
mod resident;

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use self::copier::Copier;
use self::lanes::Lanes;
use self::memory::VramMemory;
use super::neighbours::Seen;
use super::{Backing, Done, Staging, Store, Unfenced, MIB};
use crate::cuda::{Context, Error, Pinned};
use crate::info;
use crate::tuning::Tuning;

/// The store's VRAM and what each connection needs to open a copier on it.
pub struct VramBacking<'c> {
    ctx: &'c Context,
    /// Whether another process uses the GPU (`neighbours`).
    seen: &'c Seen,
    memory: VramMemory<'c>,
    /// How its connections see each other's answered changes.
    lanes: Arc<Lanes<'c>>,
    tuning: Tuning,
    /// A copier has logged its copy paths: the others need not.
    told: AtomicBool,
}

/// One connection's access: its own copier (stream, staging, kernels) on
/// the shared memory, which outlives it by the borrow, so the copier's
/// `Drop` (which ends its kernels and waits for its stream) always runs
/// before the memory its copies reach is freed.
pub struct VramStore<'a, 'c> {
    copier: Copier<'c>,
    memory: &'a VramMemory<'c>,
}

/// Allocation ended below the floor.
#[derive(Debug)]
pub struct NoVram {
    pub wanted: u64,
    pub min: u64,
    pub free: u64,
    pub total: u64,
}

pub enum AllocError {
    NoVram(NoVram),
    Cuda(Error),
}

impl From<Error> for AllocError {
    fn from(e: Error) -> AllocError {
        AllocError::Cuda(e)
    }
}

impl<'c> VramBacking<'c> {
    /// Allocates `want` bytes, or `step` less each time it cannot, down to
    /// `min`, and clears them, for up to `connections` at once; logs each
    /// step and the size obtained.
    pub fn allocate(ctx: &'c Context, seen: &'c Seen, want: u64, step: u64, min: u64, connections: usize, tuning: &Tuning) -> Result<VramBacking<'c>, AllocError> {
        let lanes = Arc::new(Lanes::new(ctx, connections)?);
        let mut size = want;
        loop {
            let (free, total) = ctx.mem_info()?;
            if size <= free {
                if let Some(memory) = VramMemory::allocate(ctx, size)? {
                    info!("allocated {} MiB of VRAM in {} chunk(s); {} MiB of {} MiB were free", size / MIB, memory.chunks().len(), free / MIB, total / MIB);
                    memory.clear()?;
                    return Ok(VramBacking { ctx, seen, memory, lanes, tuning: tuning.clone(), told: AtomicBool::new(false) });
                }
            }
            let failed = format!("cannot allocate {} MiB of VRAM ({} MiB free of {} MiB)", size / MIB, free / MIB, total / MIB);
            if size <= min || step == 0 {
                info!("{failed}");
                return Err(AllocError::NoVram(NoVram { wanted: want, min, free, total }));
            }
            // The floor itself is always tried, even off the step grid.
            size = size.saturating_sub(step).max(min);
            info!("{failed}; trying {} MiB", size / MIB);
        }
    }
}

impl<'c> Backing for VramBacking<'c> {
    type Store<'a>
        = VramStore<'a, 'c>
    where
        Self: 'a;

    fn size(&self) -> u64 {
        self.memory.size()
    }

    /// Makes the context current on the calling thread, which then owns
    /// the copier's stream, events and kernels. With several connections,
    /// at most as many stores are open at once as it was allocated for.
    fn open(&self) -> io::Result<VramStore<'_, 'c>> {
        let cuda = |e: Error| io::Error::other(e.to_string());
        self.ctx.make_current().map_err(cuda)?;
        let tells = !self.told.swap(true, Ordering::Relaxed);
        let lane = self.lanes.take();
        if lane.is_none() && self.lanes.len() > 0 {
            return Err(io::Error::other(format!("more than {} connections to one store", self.lanes.len())));
        }
        let copier = Copier::new(self.ctx, self.seen, &self.memory, lane, &self.tuning, tells).map_err(cuda)?;
        Ok(VramStore { copier, memory: &self.memory })
    }
}

impl Staging for Pinned<'_> {
    fn size(&self) -> usize {
        Pinned::size(self)
    }

    fn part(&self, range: Range<usize>) -> &[u8] {
        Pinned::part(self, range)
    }

    fn part_mut(&mut self, range: Range<usize>) -> &mut [u8] {
        Pinned::part_mut(self, range)
    }
}

impl<'c> Store for VramStore<'_, 'c> {
    type Buf = Pinned<'c>;

    fn staging(&mut self, len: usize) -> io::Result<Pinned<'c>> {
        self.copier.staging(len)
    }

    unsafe fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<Done> {
        self.memory.check(offset, buf.len() as u64)?;
        // SAFETY: the caller's promise, passed on.
        unsafe { self.copier.read(self.memory, offset, buf) }.map(|()| Done::Queued)
    }

    unsafe fn write(&mut self, offset: u64, buf: &[u8]) -> io::Result<Done> {
        self.memory.check(offset, buf.len() as u64)?;
        // SAFETY: as in `read`.
        unsafe { self.copier.write(self.memory, offset, buf) }.map(|()| Done::Queued)
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<Done> {
        self.memory.check(offset, len)?;
        self.copier.zero(self.memory, offset, len).map(|()| Done::Queued)
    }

    fn fence(&mut self) -> Result<usize, Unfenced> {
        self.copier.fence()
    }

    fn wait(&mut self, token: usize) -> io::Result<()> {
        self.copier.wait(token)
    }

    /// Also reports a batch that failed to start since the last fence: a
    /// caller that writes and syncs (the swap header) must hear of it.
    fn sync(&mut self) -> io::Result<()> {
        self.copier.sync()
    }

    fn flush(&mut self) -> io::Result<()> {
        self.copier.sync_all()
    }

    fn uncached(&mut self, len: usize) -> bool {
        self.copier.uncached(len, std::time::Instant::now)
    }

    /// Requests are apart: the mailbox kernel waits for batches in a row
    /// again before it starts.
    fn idle(&mut self) {
        self.copier.idle();
    }
}

#[cfg(test)]
#[path = "lanes_tests.rs"]
mod lanes_tests;
