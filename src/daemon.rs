//! The swap daemon's life: allocate → attach → swapon → serve → swapoff →
//! detach → free.
//!
//! Three threads. This one serves the kernel's socket (and owns the store,
//! so every CUDA call stays on it); a second sits in `NBD_DO_IT` for as
//! long as the device runs; a third does everything that waits on the
//! kernel or on signals: swapon, swapoff (which needs the serve loop to
//! read every page back) and disconnect. The store is freed only after
//! `NBD_DO_IT` has returned: the kernel can no longer read it.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::cli::SwapOpts;
use crate::fail::{Code, Failure};
use crate::nbd::kernel::{self, NbdDevice, OpenError};
use crate::nbd::proto::Export;
use crate::nbd::transmit::{self, Buffers};
use crate::signals::{Signals, STOP, WAKE};
use crate::stats::Stats;
use crate::status::{self, Instance};
use crate::store::{Store, UseStore};
use crate::swap::Outcome;
use crate::tuning::Tuning;
use crate::{error, info, notify, pressure, swap, warn};

/// How often a refused swapoff is tried again.
const SWAPOFF_RETRY: Duration = Duration::from_secs(10);
/// Helper threads do little: small, locked stacks.
const STACK: usize = 256 * 1024;

pub struct Daemon<'a>(pub &'a SwapOpts, pub &'a Tuning);

impl UseStore for Daemon<'_> {
    fn run<S: Store>(self, store: &mut S) -> Result<(), Failure> {
        run(self.0, self.1, store)
    }
}

fn run<S: Store>(opts: &SwapOpts, tuning: &Tuning, store: &mut S) -> Result<(), Failure> {
    let signals = Signals::taken();
    let export = Export::new(store.size());
    if opts.swap {
        // Written straight into the store: no block I/O, no page cache.
        let header = swap::header(store.size()).map_err(|e| Failure::new(Code::Usage, format!("--size: {e}")))?;
        store.write(0, &header).and_then(|()| store.sync()).map_err(|e| Failure::os("writing the swap header", e))?;
    }
    let mut bufs = Buffers::new(store, tuning).map_err(|e| Failure::os("allocating staging buffers", e))?;
    let (ours, theirs) = UnixStream::pair().map_err(|e| Failure::os("socketpair", e))?;
    let theirs = OwnedFd::from(theirs);
    let dev = attach(opts, &export, &theirs)?;
    let path = dev.path().to_path_buf();
    pressure::prepare(true)?;
    info!("{} attached: {} MiB", path.display(), export.size >> 20);

    let stats = Stats::default();
    let instance = Instance {
        name: path.file_name().map_or("nbd".into(), |n| n.to_string_lossy().into_owned()),
        target: path.display().to_string(),
        store: opts.store.describe(),
        size: export.size,
        priority: opts.swap.then_some(opts.priority),
    };
    let link_down = AtomicBool::new(false);
    let outcome = thread::scope(|s| {
        let kernel = spawn(s, "nbd-do-it", || run_device(&dev, &ours));
        let control = spawn(s, "nbd-control", || control(&dev, opts, &signals, &link_down));
        let status = spawn(s, "nbd-status", || {
            status::publish(&instance, &stats, || {
                thread::sleep(Duration::from_secs(1));
                !link_down.load(Ordering::SeqCst)
            });
            Ok(())
        });
        let mut conn = &ours;
        pressure::realtime();
        let served = transmit::run(store, &mut bufs, &export, &stats, &mut conn);
        // The kernel sees end of stream only when every descriptor of our
        // end is shut, the kernel thread's copy included.
        let _ = ours.shutdown(std::net::Shutdown::Both);
        link_down.store(true, Ordering::SeqCst);
        Signals::raise(WAKE);
        let kernel = join(kernel, "NBD_DO_IT");
        let control = join(control, "control");
        let _ = join(status, "status");
        match served {
            Ok(end) => info!("kernel link closed ({end:?})"),
            Err(e) => error!("kernel link broke: {e}"),
        }
        control.and(kernel)
    });
    if let Err(e) = dev.clear_sock() {
        warn!("{}: NBD_CLEAR_SOCK: {e}", path.display());
    }
    drop(theirs);
    info!("{} detached; freeing the store", path.display());
    outcome
}

fn spawn<'s, 'e, F>(s: &'s thread::Scope<'s, 'e>, name: &str, f: F) -> io::Result<thread::ScopedJoinHandle<'s, Result<(), Failure>>>
where
    F: FnOnce() -> Result<(), Failure> + Send + 's,
{
    thread::Builder::new().name(name.into()).stack_size(STACK).spawn_scoped(s, f)
}

fn join(h: io::Result<thread::ScopedJoinHandle<'_, Result<(), Failure>>>, what: &str) -> Result<(), Failure> {
    match h {
        Ok(h) => h.join().unwrap_or_else(|_| Err(Failure::new(Code::Other, format!("{what} thread panicked")))),
        Err(e) => Err(Failure::os(format!("starting the {what} thread"), e)),
    }
}

/// Opens, sizes and hands the kernel its socket. With `--device auto`, a
/// device that turns out taken (another instance starting at the same
/// moment claimed it first: `NBD_SET_SOCK` says EBUSY) or still swap is
/// passed over for the next one.
fn attach(opts: &SwapOpts, export: &Export, theirs: &OwnedFd) -> Result<NbdDevice, Failure> {
    let auto = opts.device.is_none();
    let mut skip = Vec::new();
    loop {
        let dev = open_device(opts, &skip)?;
        let path = dev.path().to_path_buf();
        if let Some(stale) = swap::active(&path) {
            if auto {
                skip.push(path);
                continue;
            }
            return Err(Failure::new(
                Code::Busy,
                format!(
                    "{} is still swap ({} KiB used), left by a daemon that died: those pages are lost. \
                     Run `swapoff {}` (it may fail if they are needed; then reboot) before starting again",
                    path.display(), stale.used_kib, path.display()
                ),
            ));
        }
        dev.configure(export.size, export.flags, opts.timeout).map_err(|e| Failure::os(format!("{}: configuring (NBD_SET_BLKSIZE/SIZE_BLOCKS/FLAGS/TIMEOUT)", path.display()), e))?;
        match dev.set_sock(theirs) {
            Ok(()) => return Ok(dev),
            Err(e) if auto && e.raw_os_error() == Some(libc::EBUSY) => skip.push(path),
            Err(e) => return Err(Failure::os(format!("{}: NBD_SET_SOCK", path.display()), e)),
        }
    }
}

fn open_device(opts: &SwapOpts, skip: &[PathBuf]) -> Result<NbdDevice, Failure> {
    let opened = match &opts.device {
        Some(path) => NbdDevice::open(path).or_else(|e| match e {
            OpenError::NoModule(_) if modprobe_nbd() => NbdDevice::open(path),
            e => Err(e),
        }),
        None => NbdDevice::open_first_free(skip).or_else(|e| match e {
            OpenError::NoModule(_) if modprobe_nbd() => NbdDevice::open_first_free(skip),
            e => Err(e),
        }),
    };
    opened.map_err(|e| match e {
        OpenError::NoModule(p) => Failure::new(
            Code::NoNbd,
            format!("{}: no such device: nbd kernel module not loaded: run `modprobe nbd`", p.display()),
        ),
        OpenError::Busy { path, pid, comm } => Failure::new(
            Code::Busy,
            format!("{} is busy: served by pid {pid} ({comm}); pick another with --device, or --device auto", path.display()),
        ),
        OpenError::NoneFree => Failure::new(
            Code::Busy,
            "every /dev/nbdN is in use: load more with `modprobe nbd nbds_max=N` (after unloading it)",
        ),
        OpenError::Os(p, e) => Failure::os(p.display(), e),
    })
}

/// Tries `modprobe nbd` once, quietly; true if it ran and succeeded.
fn modprobe_nbd() -> bool {
    info!("no /dev/nbd*: trying `modprobe nbd`");
    let ran = std::process::Command::new("modprobe").arg("nbd").status();
    let ok = ran.is_ok_and(|s| s.success());
    if ok {
        // udev creates the nodes shortly after the module loads.
        wait_for(Duration::from_secs(5), || Path::new("/dev/nbd0").exists());
    }
    ok
}

/// The `NBD_DO_IT` thread; the device runs while it blocks.
fn run_device(dev: &NbdDevice, ours: &UnixStream) -> Result<(), Failure> {
    let done = dev.do_it();
    // Whatever ended the device, the serve loop must not wait on for it.
    let _ = ours.shutdown(std::net::Shutdown::Both);
    done.map_err(|e| Failure::os(format!("{}: NBD_DO_IT", dev.path().display()), e))
}

/// swapon, wait for a stop signal, swapoff, disconnect.
fn control(dev: &NbdDevice, opts: &SwapOpts, signals: &Signals, link_down: &AtomicBool) -> Result<(), Failure> {
    let path = dev.path();
    // Made now, while /proc resolves: after a switch_root it may not.
    let off = swap::Swapoff::new(path, dev.as_fd());
    let started = wait_for(Duration::from_secs(10), || {
        // The kernel publishes the pid before it sizes the disk: swapon
        // in between finds no swap signature.
        link_down.load(Ordering::SeqCst) || (kernel::server_of(path).is_some() && kernel::sectors(path) > 0)
    });
    if !started || link_down.load(Ordering::SeqCst) {
        let _ = dev.disconnect();
        return Err(Failure::new(Code::Other, format!("{}: the kernel did not start the device", path.display())));
    }
    if opts.swap {
        if let Err(e) = swap::swapon(path, opts.priority, opts.discard) {
            let _ = dev.disconnect();
            return Err(swapon_failure(path, e));
        }
        info!("swap on {} with priority {}", path.display(), opts.priority);
    }
    notify::ready(&format!("swap on {}", path.display()));
    loop {
        let Some(sig) = signals.wait(Duration::from_secs(3600)) else { continue };
        if sig == WAKE && link_down.load(Ordering::SeqCst) {
            error!("{}: the kernel link ended by itself; swapped pages may be lost", path.display());
            if opts.swap {
                off.run();
            }
            return Err(Failure::new(Code::Other, format!("{}: kernel link lost", path.display())));
        }
        if STOP.contains(&sig) {
            info!("stopping on signal {sig}");
            break;
        }
    }
    notify::stopping();
    if opts.swap {
        swapoff_until_done(&off, signals, link_down);
    }
    dev.disconnect().map_err(|e| Failure::os(format!("{}: NBD_DISCONNECT", path.display()), e))
}

/// Never gives up: while swap holds pages, the VRAM must stay served.
fn swapoff_until_done(off: &swap::Swapoff, signals: &Signals, link_down: &AtomicBool) {
    let path = off.path();
    loop {
        let t = Instant::now();
        match off.run() {
            Outcome::Off => return info!("swapoff {} done in {:.1} s", path.display(), t.elapsed().as_secs_f64()),
            Outcome::Failed(e) if link_down.load(Ordering::SeqCst) => {
                return error!("swapoff {}: {e}, and the link is gone", path.display())
            }
            // systemd's own dev-nbdN.swap unit may have swapped it off first.
            Outcome::NotSwap => return info!("{} is no longer swap", path.display()),
            Outcome::Failed(e) if e.raw_os_error() == Some(libc::ENOMEM) => error!(
                "swapoff {}: {e}: RAM cannot take the swapped pages back yet; still serving them, retrying in {} s",
                path.display(),
                SWAPOFF_RETRY.as_secs()
            ),
            Outcome::Failed(e) => error!(
                "swapoff {}: {e}; still serving it, retrying in {} s",
                path.display(),
                SWAPOFF_RETRY.as_secs()
            ),
        }
        signals.wait(SWAPOFF_RETRY);
    }
}

fn swapon_failure(path: &Path, e: io::Error) -> Failure {
    let hint = match e.raw_os_error() {
        Some(libc::EBUSY) => " (already swap, or in use)",
        Some(libc::EPERM) => " (needs root or CAP_SYS_ADMIN; or too many swap areas)",
        Some(libc::EINVAL) => " (the kernel rejected the swap header)",
        _ => "",
    };
    let code = if e.raw_os_error() == Some(libc::EBUSY) { Code::Busy } else { Code::Swap };
    Failure::new(code, format!("swapon {}: {e}{hint}", path.display()))
}

/// Polls `done` until true or `limit` passes.
fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    done()
}
