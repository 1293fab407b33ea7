//! Whether another process uses our GPU. Without MPS the GPU time-slices
//! between processes' work on its compute engine, so our copy and mailbox
//! kernels, memsets and small host → device copies starve another
//! process's kernels: measured on an H200, a co-tenant kept 3 % of its
//! throughput while the mailbox kernel ran and 13 % during lone 4 KiB
//! writes, and nothing changed while only the copy engines ran
//! (docs/performance.md, "Sharing the GPU with another process"). NVML lists the
//! processes on a GPU, those there before us included; without NVML, free
//! memory tells of those that come later: a process that computes on the
//! GPU holds some of it.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

use crate::cuda::Context;
use crate::nvml::Nvml;
use crate::{info, warn};

/// What the watcher last saw, for the serving threads, which only read it:
/// NVML and `cuMemGetInfo` are no calls for a thread that must never wait
/// on an allocation.
#[derive(Default)]
pub struct Seen {
    present: AtomicBool,
}

impl Seen {
    /// Whether another process uses the GPU, as of the last look.
    pub fn present(&self) -> bool {
        self.present.load(Relaxed)
    }
}

/// Runs `run` with what the GPU shows of other processes: looked at once
/// now, so that one already there counts from the first request, then
/// every `RECHECK` on a thread of its own until `run` returns. `watch`
/// false (`NBD_VRAM_SHARED=0`): the GPU is ours alone.
pub fn watching<R>(ctx: &Context, watch: bool, run: impl FnOnce(&Seen) -> R) -> R {
    let seen = Seen::default();
    if !watch {
        return run(&seen);
    }
    let mut neighbours = Neighbours::new(ctx);
    seen.present.store(neighbours.present, Relaxed);
    let done = (Mutex::new(false), Condvar::new());
    std::thread::scope(|s| {
        let watcher = std::thread::Builder::new().name("nbd-gpu-watch".into()).spawn_scoped(s, || {
            if let Err(e) = ctx.make_current() {
                warn!("watching the GPU for other processes: {e}");
                return;
            }
            let (stop, told) = &done;
            let mut stop = stop.lock().unwrap_or_else(PoisonError::into_inner);
            while !*stop {
                stop = told.wait_timeout(stop, RECHECK).unwrap_or_else(PoisonError::into_inner).0;
                if !*stop {
                    neighbours.look(ctx);
                    seen.present.store(neighbours.present, Relaxed);
                }
            }
        });
        if let Err(e) = &watcher {
            warn!("no thread to watch the GPU for other processes ({e}): what it showed at start stands");
        }
        let _stop = Stop(&done); // however `run` ends: the scope waits for the watcher
        run(&seen)
    })
}

/// Tells the watcher to end, when dropped.
struct Stop<'a>(&'a (Mutex<bool>, Condvar));

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        *self.0 .0.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.0 .1.notify_all();
    }
}

/// How often to look: NVML's answer took 6–430 µs (H200, 2026-12-02), and
/// looking once a second cost nothing measurable (docs/performance.md,
/// "Sharing the GPU with another process"); a newcomer meets our kernels
/// for a second at most.
const RECHECK: Duration = Duration::from_secs(1);
/// Less free memory than this below the mark is not a neighbour: room for
/// the driver's own growth in our context.
const SLACK: u64 = 256 << 20;

struct Neighbours {
    watch: Watch,
    present: bool,
}

enum Watch {
    Listed(Nvml),
    /// The most memory seen free since the store was set up, counting
    /// what this process holds as free: someone who was there before and
    /// has left is not counted when they come back.
    Memory { mark: u64 },
}

/// What one look found: other processes, or MiB of memory taken.
enum Found {
    Listed(usize),
    Taken(u64),
}

impl Neighbours {
    /// Looks once now; call while the context is current.
    fn new(ctx: &Context) -> Neighbours {
        let bus = ctx.pci_bus_id().ok_or_else(|| "the CUDA driver gave no PCI address for the GPU".to_string());
        let watch = match bus.and_then(|bus| Nvml::open(&bus)) {
            Ok(nvml) => Watch::Listed(nvml),
            Err(e) => {
                info!("NVML: {e}: another process on this GPU is seen only by the memory it takes after us");
                Watch::Memory { mark: free(ctx).unwrap_or(0) }
            }
        };
        let mut neighbours = Neighbours { watch, present: false };
        neighbours.look(ctx);
        neighbours
    }

    /// Looks, and says when the answer changes.
    fn look(&mut self, ctx: &Context) {
        let found = match &mut self.watch {
            Watch::Listed(nvml) => match nvml.others() {
                Ok(n) => Found::Listed(n),
                Err(e) => {
                    warn!("NVML: {e}: watching the GPU's free memory instead");
                    self.watch = Watch::Memory { mark: free(ctx).unwrap_or(0) };
                    return;
                }
            },
            Watch::Memory { mark } => {
                let Some(free) = free(ctx) else { return };
                *mark = (*mark).max(free);
                Found::Taken((*mark - free) >> 20)
            }
        };
        let present = match found {
            Found::Listed(n) => n > 0,
            Found::Taken(mib) => mib << 20 > SLACK,
        };
        if present != self.present {
            match (present, found) {
                (true, Found::Listed(n)) => info!(
                    "{n} other process(es) use this GPU (NVML): copies stay on the copy engines while they are there, \
                     as work on the compute engine would take turns with theirs (NBD_VRAM_SHARED=0 ignores them)"
                ),
                (true, Found::Taken(mib)) => info!(
                    "another process took {mib} MiB of this GPU's memory: copies stay on the copy engines while it is \
                     there, as work on the compute engine would take turns with its own (NBD_VRAM_SHARED=0 ignores it)"
                ),
                (false, _) => info!("the GPU is ours alone again: copies by our kernels again"),
            }
        }
        self.present = present;
    }
}

/// Free memory as it would be without this process's allocations: the
/// slices given back and taken again are not another process.
fn free(ctx: &Context) -> Option<u64> {
    ctx.mem_info().ok().map(|(free, _)| free + crate::cuda::held())
}
