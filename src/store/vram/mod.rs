//! `VramStore`: the bytes live in GPU memory (`VramMemory`), reached with
//! async copies on one stream (`Copier`), so a batch of requests costs one
//! synchronisation.

mod copier;
mod memory;

use std::io;

use self::copier::Copier;
use self::memory::VramMemory;
use super::Store;
use crate::cuda::{Context, Error, Pinned};
use crate::info;
use crate::tuning::Tuning;

const MIB: u64 = 1 << 20;

pub struct VramStore<'c> {
    /// Declared before `memory`, so dropped first: the copier's `Drop`
    /// ends the mailbox kernel and waits for the stream, and only then is
    /// the memory their copies reach freed.
    copier: Copier<'c>,
    memory: VramMemory<'c>,
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

impl<'c> VramStore<'c> {
    /// Allocates `want` bytes, or `step` less each time it cannot, down to
    /// `min`; logs each step and the size obtained.
    pub fn allocate(ctx: &'c Context, want: u64, step: u64, min: u64, tuning: &Tuning) -> Result<VramStore<'c>, AllocError> {
        let mut size = want;
        loop {
            let (free, total) = ctx.mem_info()?;
            if size <= free {
                if let Some(memory) = VramMemory::allocate(ctx, size)? {
                    info!("allocated {} MiB of VRAM in {} chunk(s); {} MiB of {} MiB were free", size / MIB, memory.chunks().len(), free / MIB, total / MIB);
                    let copier = Copier::new(ctx, &memory, tuning)?;
                    let store = VramStore { copier, memory };
                    store.memory.clear(store.copier.stream())?;
                    return Ok(store);
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

impl<'c> Store for VramStore<'c> {
    type Buf = Pinned<'c>;

    fn size(&self) -> u64 {
        self.memory.size()
    }

    fn staging(&mut self, len: usize) -> io::Result<Pinned<'c>> {
        self.copier.staging(len)
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.memory.check(offset, buf.len() as u64)?;
        self.copier.read(&self.memory, offset, buf)
    }

    fn write(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.memory.check(offset, buf.len() as u64)?;
        self.copier.write(&self.memory, offset, buf)
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.memory.check(offset, len)?;
        self.copier.zero(&self.memory, offset, len)
    }

    fn fence(&mut self) -> io::Result<usize> {
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

    /// Requests are apart: the mailbox kernel waits for batches in a row
    /// again before it starts.
    fn idle(&mut self) {
        self.copier.idle();
    }
}
