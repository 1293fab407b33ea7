//! Whether another process computes on our GPU. Without MPS the GPU
//! time-slices between processes' kernels, so our copy and mailbox kernels
//! starve its work: measured on an H200, a co-tenant kept 3 % of its
//! throughput while the mailbox kernel ran and 13 % during copy-kernel
//! batches, and nothing changed while only the copy engine ran
//! (BENCHMARKS.md, "Twelfth run"). The driver API does not say whether
//! other contexts exist; memory does: a process that computes on the GPU
//! holds some of it. So when free memory falls below what was free once
//! the store was set up, copies stay on the copy engine until it is back.

use std::time::{Duration, Instant};

use crate::cuda::Context;
use crate::info;

/// How often the driver is asked: a context takes hundreds of MiB to set
/// up, so a second's delay is in proportion.
const RECHECK: Duration = Duration::from_secs(1);
/// Less free memory than this below the mark is not a neighbour: room for
/// the driver's own growth in our context.
const SLACK: u64 = 256 << 20;

pub struct Neighbours {
    /// The most memory seen free since the store was set up: someone who
    /// was there before and has left is not counted when they come back.
    mark: u64,
    asked: Instant,
    present: bool,
    /// `NBD_VRAM_SHARED=0`: the GPU is ours alone, whatever memory says.
    ignored: bool,
}

impl Neighbours {
    /// Takes what is free now as the mark; call once the store holds all
    /// its memory.
    pub fn new(ctx: &Context) -> Neighbours {
        let ignored = std::env::var("NBD_VRAM_SHARED").is_ok_and(|v| v == "0");
        let mark = ctx.mem_info().map_or(0, |(free, _)| free);
        Neighbours { mark, asked: Instant::now(), present: false, ignored }
    }

    /// Whether another process has taken GPU memory since the mark; asks
    /// the driver at most once per `RECHECK`, and says when that changes.
    pub fn present(&mut self, ctx: &Context) -> bool {
        if self.ignored || self.asked.elapsed() < RECHECK {
            return self.present;
        }
        self.asked = Instant::now();
        let Ok((free, _)) = ctx.mem_info() else { return self.present };
        self.mark = self.mark.max(free);
        let present = free + SLACK < self.mark;
        if present != self.present {
            let taken = (self.mark - free) >> 20;
            match present {
                true => info!(
                    "another process took {taken} MiB of this GPU's memory: copies stay on the copy engine while it is \
                     there, as our kernels would take turns with its own (NBD_VRAM_SHARED=0 ignores it)"
                ),
                false => info!("the GPU's memory is free again: copies by our kernels again"),
            }
        }
        self.present = present;
        present
    }
}
