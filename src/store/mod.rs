//! The block store behind an export: a fixed number of bytes, addressed by
//! byte offset. The protocol never knows what holds them (host RAM, VRAM).

pub mod gpu;
mod host;
pub mod neighbours;
mod vram;

use std::io;
use std::ops::Range;
use std::path::PathBuf;

use crate::cuda;
use crate::fail::Failure;
use crate::tuning::Tuning;

pub use host::HostBacking;
#[cfg(test)]
pub use host::HostStore;
pub use vram::{AllocError, VramBacking};

/// The unit sizes are given and shown in, on the command line and in every
/// message.
pub const MIB: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Host,
    Vram,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOpts {
    pub kind: StoreKind,
    pub size: u64,
    pub gpu: u32,
    pub step: u64,
    pub min_size: u64,
    pub libcuda: Option<PathBuf>,
}

impl StoreOpts {
    /// For logs and `status`: `vram (GPU 0)` or `host`.
    pub fn describe(&self) -> String {
        match self.kind {
            StoreKind::Vram => format!("vram (GPU {})", self.gpu),
            StoreKind::Host => "host".into(),
        }
    }
}

/// The bytes behind an export, shared by every connection to it: each
/// connection's serve loop opens a `Store` of its own, on its own thread,
/// and only the bytes (and, for VRAM, the CUDA context) are shared.
pub trait Backing: Sync {
    type Store<'a>: Store
    where
        Self: 'a;

    fn size(&self) -> u64;
    /// A connection's way to the bytes, for the calling thread only.
    fn open(&self) -> io::Result<Self::Store<'_>>;
}

/// What an operation had done when it returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// Handed to the device: done once `wait` on a later fence, or `sync`,
    /// returns. Until then the buffer is the device's (`Store::read`).
    Queued,
    /// Done.
    Finished,
    /// Done without a copy, because the bytes are this process's memory:
    /// a read's data are the store's own bytes (`bytes` lends them), and a
    /// write's payload already landed in them (`landing`).
    Lent,
}

/// One connection's access to a fixed-size byte store, in the manner of
/// nbdkit's plugin callbacks. Callers check ranges against the backing's
/// `size()` first.
///
/// Each operation says what it had done on return (`Done`): a GPU store
/// queues its copies and batches them, a store in memory finishes them or
/// lends its bytes. Errors are plain errnos so that reporting them never
/// allocates.
///
/// Errors come in two kinds. One returned by an operation, or
/// `Unfenced::NotStarted` from `fence`, means that work was never started:
/// its requests fail, the store is intact (though a copy of part of it may
/// still run, see `read`). One returned by `wait`, `sync`
/// or `flush`, or `Unfenced::Lost` from `fence`, means queued work failed
/// on the device after it was handed over: what it wrote is unknown.
///
/// A change (write, zero, trim) may be answered once a `fence` after it
/// has returned, done or not: every operation handed to any store of the
/// same backing after that sees it, and a `flush` on any of them covers it. The
/// kernel relies on that with several connections: swap reads a page back
/// on whichever connection its CPU maps to, with no flush between.
pub trait Store {
    /// Staging memory the store copies from and to fastest (pinned for a GPU).
    type Buf: Staging;

    /// Allocates `len` bytes of staging memory, once, before serving.
    /// The loop's buffers for `read` and `write` lie in it, and a GPU store
    /// needs them there whenever requests come several between waits: it
    /// merges copies that run on end to end, and moves batches of small
    /// ones with a kernel, which reaches only pinned memory mapped for the
    /// device (any other address faults, and the fault ends the context
    /// for every store of it). A lone request followed by its wait may use
    /// any memory, as the swap header's write does.
    fn staging(&mut self, len: usize) -> io::Result<Self::Buf>;
    /// Reads into `buf`, or answers `Lent` and leaves `buf` alone.
    ///
    /// # Safety
    /// Unless it answers `Finished` or `Lent`, the device may write `buf`
    /// later (an error too may come after part of it was queued): the
    /// caller keeps it allocated, and neither reads nor writes it, until a
    /// `wait` on a later fence or a `sync` has returned `Ok`, or the store
    /// is dropped (which waits for its work, also where a wait failed).
    unsafe fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<Done>;
    /// Writes `buf`.
    ///
    /// # Safety
    /// Unless it answers `Finished` or `Lent`, the device may read `buf`
    /// later: the caller keeps it allocated and unchanged for as long as
    /// `read` says.
    unsafe fn write(&mut self, offset: u64, buf: &[u8]) -> io::Result<Done>;
    fn zero(&mut self, offset: u64, len: u64) -> io::Result<Done>;
    /// A discarded range reads back as zeroes: swap may trim, and a store
    /// that returned stale bytes there would leak one tenant's pages.
    fn trim(&mut self, offset: u64, len: u64) -> io::Result<Done> {
        self.zero(offset, len)
    }
    /// Starts everything queued so far and returns a token that `wait`
    /// takes. A token stays valid until `FENCES` more fences or a `sync`.
    fn fence(&mut self) -> Result<usize, Unfenced> {
        Ok(0)
    }
    /// Waits for the work queued before `fence` returned `token`.
    fn wait(&mut self, token: usize) -> io::Result<()> {
        let _ = token;
        Ok(())
    }
    /// Waits for every operation queued on this store (its staging is
    /// free again).
    fn sync(&mut self) -> io::Result<()>;
    /// The stored bytes `offset..offset + len`, for the data of a read that
    /// answered `Lent`; `None` out of range, or from a store that never lends.
    fn bytes(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let _ = (offset, len);
        None
    }
    /// Where a write's payload may land directly, with no `write` after
    /// it (the write is then `Lent`); `None` to take it through staging.
    fn landing(&mut self, offset: u64, len: usize) -> Option<&mut [u8]> {
        let _ = (offset, len);
        None
    }
    /// Whether a write payload of `len` bytes should reach staging around
    /// the CPU caches (`uncached::fill`): the loop then copies it twice,
    /// which pays only where the device reading staging and other
    /// connections' copies slow each other.
    fn uncached(&mut self, len: usize) -> bool {
        let _ = len;
        false
    }
    /// The serve loop is about to sleep until the next request: what the
    /// store keeps busy for back-to-back requests can stop.
    fn idle(&mut self) {}
    /// `sync`, and every change answered on another store of the backing
    /// is done too. Memory is volatile either way: a flush only has to
    /// order writes.
    fn flush(&mut self) -> io::Result<()> {
        self.sync()
    }
}

/// Staging, handed out a part at a time: the device may be copying to or
/// from the other parts, so the serve loop makes no reference to the whole.
pub trait Staging {
    fn size(&self) -> usize;
    fn part(&self, range: Range<usize>) -> &[u8];
    fn part_mut(&mut self, range: Range<usize>) -> &mut [u8];
}

/// Host memory, which only the CPU touches.
impl Staging for Box<[u8]> {
    fn size(&self) -> usize {
        self.len()
    }

    fn part(&self, range: Range<usize>) -> &[u8] {
        &self[range]
    }

    fn part_mut(&mut self, range: Range<usize>) -> &mut [u8] {
        &mut self[range]
    }
}

/// Why a `fence` failed; either way its requests fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfenced {
    /// Some work since the last fence could not start; the store is intact.
    NotStarted,
    /// Work already handed over failed on the device: what it wrote is
    /// unknown, and may yet land over later writes.
    Lost,
}

impl std::fmt::Display for Unfenced {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Unfenced::NotStarted => "work could not start",
            Unfenced::Lost => "work already handed over failed",
        })
    }
}

/// Fences a store keeps apart between two `sync`s.
pub const FENCES: usize = 64;

/// What runs on a store, whichever kind the user picked; generic, so the
/// data path is compiled for each store with no dynamic dispatch.
pub trait UseStore {
    fn run<B: Backing>(self, backing: &B) -> Result<(), Failure>;
}

/// Builds the store `opts` describe, for `connections` at once, and hands
/// it to `user`. A VRAM store borrows its CUDA context, which lives exactly
/// as long as this call.
pub fn with_store<U: UseStore>(opts: &StoreOpts, connections: usize, tuning: &Tuning, user: U) -> Result<(), Failure> {
    match opts.kind {
        StoreKind::Host => {
            let backing = HostBacking::new(opts.size)
                .map_err(|e| Failure::os(format!("allocating {} MiB of RAM", opts.size >> 20), e))?;
            user.run(&backing)
        }
        StoreKind::Vram => {
            let cuda = gpu::init(opts.libcuda.as_deref(), tuning)?;
            let ctx = gpu::open(&cuda, opts.gpu)?;
            neighbours::watching(&ctx, tuning.watch_neighbours, |seen| {
                let backing = gpu::allocate(&ctx, seen, opts, connections, tuning)?;
                user.run(&backing)
            })
        }
    }
}

/// Where the swap daemon's slices come from: each `allocate` is a backing
/// of its own (one VRAM allocation, or host RAM), made and dropped on the
/// thread that holds the tier, while other slices serve.
pub trait Tier: Sync {
    type Backing<'t>: Backing + Send
    where
        Self: 't;

    /// `size` bytes, or `step` less each time that cannot be had, down to `min`.
    fn allocate(&self, size: u64, step: u64, min: u64) -> Result<Self::Backing<'_>, Failure>;
    /// Device memory free now, for `--reserve`; `None` for host RAM.
    fn free(&self) -> Option<u64>;
}

/// What runs on a tier of slices (the swap daemon).
pub trait UseTier {
    fn run<T: Tier>(self, tier: &T) -> Result<(), Failure>;
}

/// RAM: each slice its own allocation.
struct HostTier;

impl Tier for HostTier {
    type Backing<'t> = HostBacking;

    fn allocate(&self, size: u64, _: u64, _: u64) -> Result<HostBacking, Failure> {
        HostBacking::new(size).map_err(|e| Failure::os(format!("allocating {} MiB of RAM", size >> 20), e))
    }

    fn free(&self) -> Option<u64> {
        None
    }
}

/// VRAM of one GPU, in one context that lives as long as the tier.
struct VramTier<'c> {
    ctx: &'c cuda::Context,
    seen: &'c neighbours::Seen,
    opts: &'c StoreOpts,
    connections: usize,
    tuning: &'c Tuning,
}

impl Tier for VramTier<'_> {
    type Backing<'t>
        = VramBacking<'t>
    where
        Self: 't;

    fn allocate(&self, size: u64, step: u64, min: u64) -> Result<VramBacking<'_>, Failure> {
        gpu::allocate(self.ctx, self.seen, &StoreOpts { size, step, min_size: min, ..self.opts.clone() }, self.connections, self.tuning)
    }

    fn free(&self) -> Option<u64> {
        self.ctx.mem_info().ok().map(|(free, _)| free)
    }
}

/// Opens the tier `opts` describes and hands it to `user`; slices are
/// allocated by `user`, on this thread, where the CUDA context is current.
pub fn with_tier<U: UseTier>(opts: &StoreOpts, connections: usize, tuning: &Tuning, user: U) -> Result<(), Failure> {
    match opts.kind {
        StoreKind::Host => user.run(&HostTier),
        StoreKind::Vram => {
            let cuda = gpu::init(opts.libcuda.as_deref(), tuning)?;
            let ctx = gpu::open(&cuda, opts.gpu)?;
            neighbours::watching(&ctx, tuning.watch_neighbours, |seen| user.run(&VramTier { ctx: &ctx, seen, opts, connections, tuning }))
        }
    }
}

/// Validates a store size given in bytes: positive and 4 KiB aligned, as
/// swap and the kernel's 4 KiB NBD block size require.
pub fn check_size(bytes: u64) -> Result<u64, String> {
    if bytes == 0 || bytes % 4096 != 0 {
        return Err(format!("size {bytes} bytes is not a positive multiple of 4 KiB"));
    }
    Ok(bytes)
}
