//! What lets a swap server make progress when the machine has no free
//! page: every measure the serve loop relies on, taken once, at start.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::fail::Failure;
use crate::uapi;
use crate::{info, warn};

/// Call after every buffer is allocated and before serving; threads
/// started afterwards by the calling thread inherit the I/O-flusher mark,
/// which each thread that starts serving threads (one per slice of a
/// swap tier) takes for itself; the memory lock is the process's, taken
/// once. The swap daemon requires all of it; serve mode (`strict` false)
/// only warns, so that it runs unprivileged too.
pub fn prepare(strict: bool) -> Result<(), Failure> {
    match prepare_all() {
        Err(f) if !strict => warn!("{f}: serving anyway"),
        other => other?,
    }
    Ok(())
}

/// The memory lock and the OOM score, once per process.
static LOCKED: AtomicBool = AtomicBool::new(false);

fn prepare_all() -> Result<(), Failure> {
    if !LOCKED.load(Ordering::SeqCst) {
        let t = std::time::Instant::now();
        lock_memory()?;
        info!("memory locked in {:.0} ms: {}", t.elapsed().as_secs_f64() * 1e3, locked());
        // The OOM killer must never choose the process that holds swapped pages.
        if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
            warn!("cannot set oom_score_adj to -1000: {e}; the OOM killer may pick nbd-vram");
        }
        LOCKED.store(true, Ordering::SeqCst);
    }
    // Reclaim triggered by our own allocations (there should be none)
    // must not issue I/O to the device we serve, and our writes are not
    // throttled as dirty-page producers: PF_MEMALLOC_NOIO|PF_LOCAL_THROTTLE.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(uapi::PR_SET_IO_FLUSHER as libc::c_int, 1, 0, 0, 0) } < 0 {
        return Err(Failure::os("prctl(PR_SET_IO_FLUSHER) (needs CAP_SYS_RESOURCE)", io::Error::last_os_error()));
    }
    Ok(())
}

/// Locks every page we have and will map, so that serving a swap-in
/// never waits for a swap-in of our own code, stack or buffers.
fn lock_memory() -> Result<(), Failure> {
    // SAFETY: mlockall takes flags only.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } == 0 {
        return Ok(());
    }
    let first = io::Error::last_os_error();
    // libcuda reserves large address ranges; if populating them all is too
    // much, lock pages as they are touched: ours are already touched, so
    // they are locked at once.
    // SAFETY: as above.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) } == 0 {
        warn!("mlockall: {first}; locked with MCL_ONFAULT instead (pages lock when first touched)");
        return Ok(());
    }
    Err(Failure::os(
        "mlockall (raise the memlock limit: LimitMEMLOCK=infinity, or run as root)",
        io::Error::last_os_error(),
    ))
}

/// What /proc/self/status says is locked and resident, for the log.
fn locked() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| status.lines().find(|l| l.starts_with(k)).map_or("?", |l| l[k.len()..].trim());
    format!("VmLck {}, VmRSS {}", field("VmLck:"), field("VmRSS:"))
}

/// Makes the calling thread (the serve loop) SCHED_FIFO. Besides keeping
/// it ahead of the processes that fill memory, this is the one way a user
/// thread reaches the page allocator's reserve below the min watermark
/// (`ALLOC_HARDER` for rt tasks in mm/page_alloc.c of 6.1, `ALLOC_MIN_RESERVE`
/// from 6.3): the reply to a swap-out
/// write needs a socket buffer exactly when memory is exhausted, and with
/// I/O-less reclaim and no OOM kill for such an allocation, waiting for it
/// would wait for ever. Call after starting the other threads: they would
/// inherit the policy.
pub fn realtime() {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: pid 0 is this thread; `param` is live for the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } < 0 {
        warn!("SCHED_FIFO: {}; under memory pressure replies may stall", io::Error::last_os_error());
    }
}

/// Serving threads of this process that may poll (`--connections`).
static LOOPS: AtomicUsize = AtomicUsize::new(1);

/// Says how many serving threads there are, before any store is opened.
pub fn set_loops(n: usize) {
    LOOPS.store(n.max(1), Ordering::Relaxed);
}

/// Serving threads of this process.
pub fn loops() -> usize {
    LOOPS.load(Ordering::Relaxed)
}

/// Whether a CPU is left over when every serving thread polls at once. A
/// SCHED_FIFO thread that polls keeps everything else off its CPU: the
/// kernel threads that send it requests, and where a GPU is emulated by
/// CPU threads, the GPU. Without a spare CPU, serving threads only poll
/// briefly before they sleep.
pub fn cpu_to_spare() -> bool {
    cpus_online() > loops()
}

/// CPUs online. With one, a loop that polls instead of sleeping keeps its
/// own peer off the CPU (and as SCHED_FIFO, see `realtime`, for as long
/// as it polls).
pub fn cpus_online() -> usize {
    // SAFETY: sysconf takes an integer and touches no memory of ours.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1)
}
