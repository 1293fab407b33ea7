//! The swap daemon's life: allocate → attach → swapon → serve → swapoff →
//! detach → free.
//!
//! This thread serves the kernel's first connection, and a thread each
//! serves the others (`--connections`), each with its own store, whose
//! CUDA calls stay on it (`workers`). One more thread sits in `NBD_DO_IT`
//! for as long as the device runs; another does everything that waits on
//! the kernel or on signals: swapon, swapoff (which needs the serve loops
//! to read every page back) and disconnect. The store is freed only after
//! `NBD_DO_IT` has returned: the kernel can no longer read it.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::cli::SwapOpts;
use crate::fail::{Code, Failure};
use crate::nbd::kernel::{self, NbdDevice, OpenError};
use crate::nbd::proto::Export;
use crate::nbd::transmit::{self, Buffers, End, Shared};
use crate::signals::{Signals, STOP, WAKE};
use crate::stats::Stats;
use crate::status::{self, Instance};
use crate::store::{Backing, Store, UseStore};
use crate::workers::{self, Conn};
use crate::swap::Outcome;
use crate::tuning::Tuning;
use crate::{error, info, notify, pressure, swap, warn};

/// How often a refused swapoff is tried again.
const SWAPOFF_RETRY: Duration = Duration::from_secs(10);
/// Helper threads do little: small, locked stacks.
const STACK: usize = 256 * 1024;

pub struct Daemon<'a>(pub &'a SwapOpts, pub &'a Tuning);

impl UseStore for Daemon<'_> {
    fn run<B: Backing>(self, backing: &B) -> Result<(), Failure> {
        run(self.0, self.1, backing)
    }
}

fn run<B: Backing>(opts: &SwapOpts, tuning: &Tuning, backing: &B) -> Result<(), Failure> {
    let signals = Signals::taken();
    let n = opts.connections;
    pressure::set_loops(n);
    let shared = Shared::new(Export::new(backing.size()), n);
    let export = &shared.export;
    // This thread serves the first connection; its store writes the header.
    let mut first = workers::open(backing, tuning)?;
    if opts.swap {
        // Written straight into the store: no block I/O, no page cache.
        let header = swap::header(export.size).map_err(|e| Failure::new(Code::Usage, format!("--size: {e}")))?;
        let store = &mut first.store;
        store.write(0, &header).and_then(|_| store.sync()).map_err(|e| Failure::os("writing the swap header", e))?;
    }
    let pairs = (0..n).map(|_| UnixStream::pair()).collect::<io::Result<Vec<_>>>().map_err(|e| Failure::os("socketpair", e))?;
    let (ours, theirs): (Vec<UnixStream>, Vec<OwnedFd>) = pairs.into_iter().map(|(o, t)| (o, OwnedFd::from(t))).unzip();
    let stats: Vec<Stats> = (0..n).map(|_| Stats::default()).collect();
    let link_down = AtomicBool::new(false);
    let (mut attached, mut described) = (None, None);
    // Links still served. A store is dropped only once every link has
    // ended: freeing its pinned memory may wait for every kernel on the
    // GPU, and the other links' mailbox kernels end only when they do.
    let live = AtomicUsize::new(n);
    let all_ended = || {
        live.fetch_sub(1, Ordering::SeqCst);
        while live.load(Ordering::SeqCst) > 0 {
            thread::sleep(Duration::from_millis(20));
        }
    };
    let serve_other = |i: usize, mut conn: Conn<B>| {
        pressure::realtime();
        let served = serve_link(&mut conn.store, &mut conn.bufs, &shared, &stats[i], &ours[i]);
        all_ended();
        served
    };
    let outcome = thread::scope(|s| {
        let dev = &*attached.insert(attach(opts, export, &theirs)?);
        // Before any other thread starts, so that every one inherits it;
        // after attaching, so that an instance that finds the device busy
        // exits before it locks all its memory.
        pressure::prepare(true)?;
        // The other connections' loops, each on a thread of its own with
        // its own store and buffers, all made before the device starts.
        let others = workers::spawn(s, backing, tuning, "nbd-conn", 1..n, &serve_other)?;
        let path = dev.path();
        info!("{} attached: {} MiB{}", path.display(), export.size >> 20, match n {
            1 => String::new(),
            n => format!(", {n} connections"),
        });
        let instance = &*described.insert(Instance {
            name: path.file_name().map_or("nbd".into(), |n| n.to_string_lossy().into_owned()),
            target: path.display().to_string(),
            store: opts.store.describe(),
            size: export.size,
            priority: opts.swap.then_some(opts.priority),
        });
        let kernel = spawn(s, "nbd-do-it", || run_device(dev, &ours));
        let control = spawn(s, "nbd-control", || control(dev, opts, &signals, &link_down));
        let status = spawn(s, "nbd-status", || {
            status::publish(instance, &stats, || {
                thread::sleep(Duration::from_secs(1));
                !link_down.load(Ordering::SeqCst)
            });
            Ok(())
        });
        pressure::realtime();
        // Until every link has ended: the kernel sends the requests of one
        // that broke down the others, and ends them all at disconnect.
        let mut served = vec![serve_link(&mut first.store, &mut first.bufs, &shared, &stats[0], &ours[0])];
        all_ended();
        let ended = |h: thread::ScopedJoinHandle<'_, Option<io::Result<End>>>| h.join().ok().flatten().unwrap_or_else(|| Err(io::Error::other("its thread failed")));
        served.extend(others.into_iter().map(ended));
        link_down.store(true, Ordering::SeqCst);
        Signals::raise(WAKE);
        let kernel = join(kernel, "NBD_DO_IT");
        let control = join(control, "control");
        let _ = join(status, "status");
        for (i, served) in served.into_iter().enumerate() {
            let which = if n > 1 { format!("kernel link {i}") } else { "kernel link".into() };
            match served {
                Ok(end) => info!("{which} closed ({end:?})"),
                Err(e) => error!("{which} broke: {e}"),
            }
        }
        control.and(kernel)
    });
    if let Some(dev) = &attached {
        if let Err(e) = dev.clear_sock() {
            warn!("{}: NBD_CLEAR_SOCK: {e}", dev.path().display());
        }
        drop(theirs);
        info!("{} detached; freeing the store", dev.path().display());
    }
    outcome
}

/// The timeout the kernel gets. Without one it only warns of a request
/// that takes long (`nbd_xmit_timeout` in drivers/block/nbd.c), but with
/// several connections it shuts the connection of a request older than
/// the block layer's default 30 s and sends it down another: a GPU that
/// stalls for half a minute must not cost a connection. So with several,
/// no `--timeout` means one that never comes in practice.
fn request_timeout(opts: &SwapOpts) -> u32 {
    match (opts.timeout, opts.connections) {
        (0, n) if n > 1 => PATIENT_TIMEOUT,
        (t, _) => t,
    }
}

/// Seconds: a week, which in jiffies fits the block layer's 32-bit
/// timeout at any HZ up to 1000 with room to spare.
const PATIENT_TIMEOUT: u32 = 7 * 24 * 3600;

/// Serves one kernel connection until it closes, then shuts our end: the
/// kernel sees end of stream only when every descriptor of it is shut,
/// the kernel thread's copy included.
fn serve_link<S: Store>(store: &mut S, bufs: &mut Buffers<S::Buf>, shared: &Shared, stats: &Stats, ours: &UnixStream) -> io::Result<End> {
    let mut conn = ours;
    let served = transmit::run(store, bufs, shared, stats, &mut conn);
    let _ = ours.shutdown(std::net::Shutdown::Both);
    served
}

/// Ends every link: the device is gone.
fn shut_all(ours: &[UnixStream]) {
    for sock in ours {
        let _ = sock.shutdown(std::net::Shutdown::Both);
    }
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
fn attach(opts: &SwapOpts, export: &Export, theirs: &[OwnedFd]) -> Result<NbdDevice, Failure> {
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
        dev.configure(export.size, export.flags, request_timeout(opts)).map_err(|e| Failure::os(format!("{}: configuring (NBD_SET_BLKSIZE/SIZE_BLOCKS/FLAGS/TIMEOUT)", path.display()), e))?;
        match theirs.iter().try_for_each(|sock| dev.set_sock(sock)) {
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
fn run_device(dev: &NbdDevice, ours: &[UnixStream]) -> Result<(), Failure> {
    let done = dev.do_it();
    // Whatever ended the device, the serve loops must not wait on for it.
    shut_all(ours);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_connections_get_a_timeout_that_never_comes_unless_given_one() {
        let opts = |timeout, connections| {
            let Ok(crate::cli::Parsed { command: crate::cli::Command::Swap(mut o), .. }) = crate::cli::parse(Vec::<String>::new()) else { panic!() };
            (o.timeout, o.connections) = (timeout, connections);
            o
        };
        assert_eq!(request_timeout(&opts(0, 1)), 0, "one connection: the kernel only warns");
        assert_eq!(request_timeout(&opts(0, 2)), PATIENT_TIMEOUT);
        assert_eq!(request_timeout(&opts(30, 4)), 30, "the user's own");
        assert!(u64::from(PATIENT_TIMEOUT) * 1000 < u64::from(u32::MAX), "fits 32-bit jiffies at HZ=1000");
    }
}
