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

use std::time::{Duration, Instant};

use crate::cuda::Context;
use crate::nvml::Nvml;
use crate::{info, warn};

/// How often to look: NVML's answer took 6–430 µs (H200, 2026-12-02), and
/// looking once a second cost nothing measurable (docs/performance.md,
/// "Sharing the GPU with another process"); a newcomer meets our kernels for a second at most.
const RECHECK: Duration = Duration::from_secs(1);
/// Less free memory than this below the mark is not a neighbour: room for
/// the driver's own growth in our context.
const SLACK: u64 = 256 << 20;

pub struct Neighbours {
    watch: Watch,
    asked: Instant,
    present: bool,
    /// `NBD_VRAM_SHARED=0`: the GPU is ours alone, whatever it says.
    ignored: bool,
    /// Says what it sees: one copier of a store does, for all.
    tells: bool,
}

enum Watch {
    Listed(Nvml),
    /// The most memory seen free since the store was set up, counting
    /// what this process holds as free: someone who was there before and
    /// has left is not counted when they come back.
    Memory { mark: u64 },
}

/// What one look found: other processes, or MiB of memory taken.
enum Seen {
    Listed(usize),
    Taken(u64),
}

impl Neighbours {
    /// Looks once now, so that a process already there counts from the
    /// first request; call once the store holds all its memory.
    /// `watch` false (`NBD_VRAM_SHARED=0`): the GPU is ours alone.
    pub fn new(ctx: &Context, watch: bool, tells: bool) -> Neighbours {
        let ignored = !watch;
        let bus = ctx.pci_bus_id().ok_or_else(|| "the CUDA driver gave no PCI address for the GPU".to_string());
        let watch = match bus.and_then(|bus| Nvml::open(&bus)) {
            Ok(nvml) => Watch::Listed(nvml),
            Err(e) => {
                if tells {
                    info!("NVML: {e}: another process on this GPU is seen only by the memory it takes after us");
                }
                Watch::Memory { mark: free(ctx).unwrap_or(0) }
            }
        };
        let mut neighbours = Neighbours { watch, asked: Instant::now(), present: false, ignored, tells };
        if !ignored {
            neighbours.look(ctx);
        }
        neighbours
    }

    /// Whether another process uses the GPU; looks at most once per
    /// `RECHECK`, and says when the answer changes.
    pub fn present(&mut self, ctx: &Context) -> bool {
        if !self.ignored && self.asked.elapsed() >= RECHECK {
            self.look(ctx);
        }
        self.present
    }

    fn look(&mut self, ctx: &Context) {
        self.asked = Instant::now();
        let seen = match &mut self.watch {
            Watch::Listed(nvml) => match nvml.others() {
                Ok(n) => Seen::Listed(n),
                Err(e) => {
                    if self.tells {
                        warn!("NVML: {e}: watching the GPU's free memory instead");
                    }
                    self.watch = Watch::Memory { mark: free(ctx).unwrap_or(0) };
                    return;
                }
            },
            Watch::Memory { mark } => {
                let Some(free) = free(ctx) else { return };
                *mark = (*mark).max(free);
                Seen::Taken((*mark - free) >> 20)
            }
        };
        let present = match seen {
            Seen::Listed(n) => n > 0,
            Seen::Taken(mib) => mib << 20 > SLACK,
        };
        if present != self.present && self.tells {
            match (present, seen) {
                (true, Seen::Listed(n)) => info!(
                    "{n} other process(es) use this GPU (NVML): copies stay on the copy engines while they are there, \
                     as work on the compute engine would take turns with theirs (NBD_VRAM_SHARED=0 ignores them)"
                ),
                (true, Seen::Taken(mib)) => info!(
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
