//! One slice of the swap tier: its own backing, /dev/nbdN and swap area,
//! through attach → swapon → serve → swapoff → detach. The daemon
//! (`daemon.rs`) allocates and frees the backing and gives orders through
//! the slice's `Board`; a daemon with one slice is one of these.
//!
//! The thread that runs a slice serves the kernel's first connection, and
//! a thread each serves the others (`--connections`), each with its own
//! store, whose CUDA calls stay on it (`workers`). One more thread sits in
//! `NBD_DO_IT` for as long as the device runs; another (`control`) does
//! everything that waits on the kernel: swapon, swapoff (which needs the
//! serve loops to read every page back) and disconnect. The backing goes
//! back to the daemon only after `NBD_DO_IT` has returned: the kernel can
//! no longer read it.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::cli::SwapOpts;
use crate::elastic::State;
use crate::fail::{Code, Failure};
use crate::nbd::kernel::{self, NbdDevice, OpenError};
use crate::nbd::proto::Export;
use crate::nbd::transmit::{self, Buffers, End, Shared};
use crate::signals::{Signals, WAKE};
use crate::stats::Stats;
use crate::store::{Backing, Store};
use crate::tuning::Tuning;
use crate::workers::{self, Conn};
use crate::{error, info, pressure, swap, warn};

mod control;

/// Helper threads do little: small, locked stacks.
const STACK: usize = 256 * 1024;
const NO_DEVICE: u32 = u32::MAX;

/// What the daemon wants of a slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Serve,
    /// Give the memory back: one swapoff; if refused, serve on.
    Drain,
    /// The daemon stops: swapoff until it is done, however long.
    Stop,
}

/// Why a drain did not give its slice back; the slice serves on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// swapoff said ENOMEM: RAM cannot take the pages back now.
    Ram = 1,
    /// Another swapoff of it is still moving its pages back.
    Elsewhere,
    /// Something else holds the device: a swapon or a mount after its
    /// swapoff.
    Taken,
    /// Whatever else went wrong; the slice's log line has it.
    Other,
}

impl Refusal {
    const ALL: [Refusal; 4] = [Refusal::Ram, Refusal::Elsewhere, Refusal::Taken, Refusal::Other];

    pub fn why(self) -> &'static str {
        match self {
            Refusal::Ram => "its swapoff was refused: RAM cannot take its pages back now",
            Refusal::Elsewhere => "another swapoff of it is still under way",
            Refusal::Taken => "something else holds the device (a swapon or a mount after its swapoff)",
            Refusal::Other => "see the log",
        }
    }
}

/// What a slice and the daemon tell each other. The daemon gives orders;
/// the slice says where it is, and raises `WAKE` when that changes.
pub struct Board {
    state: AtomicU8,
    /// N of its /dev/nbdN, or `NO_DEVICE`.
    device: AtomicU32,
    /// Pages the kernel keeps in it, as the daemon last read /proc/swaps.
    pub used_pages: AtomicU64,
    /// Bytes of memory it was last started on.
    pub size: AtomicU64,
    /// Why a drain did not give the slice back, since the daemon last
    /// looked (`Refusal`); 0: none.
    refused: AtomicU8,
    /// The last drain's swapoff: pages it moved out, and milliseconds.
    pub moved: (AtomicU64, AtomicU64),
    /// Its thread is returning: the daemon joins it at once.
    ending: AtomicBool,
    orders: Mutex<Orders>,
    changed: Condvar,
    /// Each connection's counters, for `status`.
    pub stats: Box<[Stats]>,
}

struct Orders {
    want: Want,
    /// Every link of the device has ended.
    link_down: bool,
}

impl Board {
    pub fn new(connections: usize) -> Board {
        Board {
            state: AtomicU8::new(State::Released as u8),
            device: AtomicU32::new(NO_DEVICE),
            used_pages: AtomicU64::new(0),
            size: AtomicU64::new(0),
            refused: AtomicU8::new(0),
            moved: (AtomicU64::new(0), AtomicU64::new(0)),
            ending: AtomicBool::new(false),
            orders: Mutex::new(Orders { want: Want::Serve, link_down: false }),
            changed: Condvar::new(),
            stats: (0..connections).map(|_| Stats::default()).collect(),
        }
    }

    pub fn state(&self) -> State {
        match self.state.load(Ordering::SeqCst) {
            s if s == State::Starting as u8 => State::Starting,
            s if s == State::Serving as u8 => State::Serving,
            s if s == State::Draining as u8 => State::Draining,
            _ => State::Released,
        }
    }

    fn set_state(&self, state: State) {
        self.state.store(state as u8, Ordering::SeqCst);
        Signals::raise(WAKE);
    }

    /// Before its thread starts: a fresh slice, told to serve.
    pub fn starting(&self) {
        *self.lock() = Orders { want: Want::Serve, link_down: false };
        self.refused.store(0, Ordering::SeqCst);
        self.ending.store(false, Ordering::SeqCst);
        self.state.store(State::Starting as u8, Ordering::SeqCst);
    }

    /// Its thread's last act: a freed slice's memory goes back now, not
    /// at the daemon's next look.
    pub fn mark_ending(&self) {
        self.ending.store(true, Ordering::SeqCst);
        Signals::raise(WAKE);
    }

    /// Whether its thread has returned, or is about to.
    pub fn has_ended(&self) -> bool {
        self.ending.load(Ordering::SeqCst)
    }

    /// After its thread has ended and its memory is freed.
    pub fn mark_released(&self) {
        self.device.store(NO_DEVICE, Ordering::SeqCst);
        self.used_pages.store(0, Ordering::SeqCst);
        self.state.store(State::Released as u8, Ordering::SeqCst);
    }

    /// /dev/nbdN while attached.
    pub fn device(&self) -> Option<PathBuf> {
        match self.device.load(Ordering::SeqCst) {
            NO_DEVICE => None,
            n => Some(PathBuf::from(format!("/dev/nbd{n}"))),
        }
    }

    /// Draining from now on, before the slice's thread wakes, so that the
    /// daemon never orders a second drain meanwhile.
    pub fn drain(&self) {
        self.state.store(State::Draining as u8, Ordering::SeqCst);
        self.order(Want::Drain);
    }

    pub fn stop(&self) {
        self.order(Want::Stop);
    }

    /// Why a drain did not give the slice back, if one did not since the
    /// last call.
    pub fn take_refusal(&self) -> Option<Refusal> {
        let why = self.refused.swap(0, Ordering::SeqCst);
        Refusal::ALL.into_iter().find(|&r| r as u8 == why)
    }

    fn refuse(&self, why: Refusal) {
        self.refused.store(why as u8, Ordering::SeqCst);
    }

    fn order(&self, want: Want) {
        let mut orders = self.lock();
        // A stop is never taken back by a drain.
        if orders.want != Want::Stop {
            orders.want = want;
        }
        self.changed.notify_all();
    }

    /// A drain that was refused is over: the daemon orders the next.
    fn serve_on(&self) {
        let mut orders = self.lock();
        if orders.want == Want::Drain {
            orders.want = Want::Serve;
        }
    }

    fn link_ended(&self) {
        self.lock().link_down = true;
        self.changed.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Orders> {
        self.orders.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits up to `limit`, or until the link ends.
    fn wait_link(&self, limit: Duration) {
        let orders = self.lock();
        let _ = self.changed.wait_timeout_while(orders, limit, |o| !o.link_down).unwrap_or_else(PoisonError::into_inner);
    }

    /// Waits up to `limit` for an order other than serving, or the link's end.
    fn wait(&self, limit: Duration) -> (Want, bool) {
        let orders = self.lock();
        let (orders, _) = self
            .changed
            .wait_timeout_while(orders, limit, |o| o.want == Want::Serve && !o.link_down)
            .unwrap_or_else(PoisonError::into_inner);
        (orders.want, orders.link_down)
    }
}

/// How a slice's life ended.
#[derive(Debug)]
pub enum Ended {
    /// Stopped or drained: swapped off, detached.
    Off,
    /// It never served: attaching or swapon failed. Nothing was swapped.
    NotStarted(Failure),
    /// Its link ended by itself, or swapoff gave up with the link gone:
    /// pages may be lost.
    Lost(Failure),
}

/// What every slice of a daemon shares.
pub struct Setup<'a> {
    pub opts: &'a SwapOpts,
    pub tuning: &'a Tuning,
    /// Staging per connection; below the largest NBD request, the kernel
    /// is told to split what is longer.
    pub staging: usize,
    /// The device to take: `--device` for the first slice, else the first free.
    pub device: Option<&'a Path>,
}

/// Runs one slice on `backing` until it is drained or stopped.
pub fn run<B: Backing>(setup: &Setup, backing: &B, board: &Board) -> Ended {
    let (opts, tuning) = (setup.opts, setup.tuning);
    let n = opts.connections;
    let shared = Shared::new(Export::new(backing.size()), n);
    let export = &shared.export;
    // Made before the store that copies it, so that it outlives any copy
    // of it a failed sync left queued.
    let header = match opts.swap.then(|| swap::header(export.size)).transpose() {
        Ok(header) => header,
        Err(e) => return Ended::NotStarted(Failure::new(Code::Usage, format!("--size: {e}"))),
    };
    // This thread serves the first connection; its store writes the header.
    let mut first = match workers::open(backing, tuning, setup.staging) {
        Ok(first) => first,
        Err(f) => return Ended::NotStarted(f),
    };
    if let Some(h) = &header {
        // Written straight into the store: no block I/O, no page cache.
        let store = &mut first.store;
        // SAFETY: nothing changes `h`, which outlives the store (declared
        // before `first`, whose store waits for its work when dropped).
        if let Err(e) = unsafe { store.write(0, h) }.and_then(|_| store.sync()) {
            return Ended::NotStarted(Failure::os("writing the swap header", e));
        }
    }
    let pairs = match (0..n).map(|_| UnixStream::pair()).collect::<io::Result<Vec<_>>>() {
        Ok(pairs) => pairs,
        Err(e) => return Ended::NotStarted(Failure::os("socketpair", e)),
    };
    let (ours, theirs): (Vec<UnixStream>, Vec<OwnedFd>) = pairs.into_iter().map(|(o, t)| (o, OwnedFd::from(t))).unzip();
    let dev = match attach(setup, export, &theirs) {
        Ok(dev) => dev,
        Err(f) => return Ended::NotStarted(f),
    };
    let path = dev.path().to_path_buf();
    let number = path.to_string_lossy().trim_start_matches("/dev/nbd").parse().unwrap_or(NO_DEVICE);
    board.device.store(number, Ordering::SeqCst);
    let ended = serve(setup, backing, board, &dev, &shared, first, &ours);
    if let Err(e) = dev.clear_sock() {
        warn!("{}: NBD_CLEAR_SOCK: {e}", path.display());
    }
    drop(theirs);
    info!("{} detached", path.display());
    ended
}

/// The attached device's life, all its threads in one scope.
fn serve<'b, B: Backing>(
    setup: &Setup,
    backing: &'b B,
    board: &Board,
    dev: &NbdDevice,
    shared: &Shared,
    mut first: Conn<'b, B>,
    ours: &[UnixStream],
) -> Ended {
    let n = setup.opts.connections;
    let stats = &board.stats;
    let path = dev.path();
    let link = |i: usize| if n > 1 { format!("{} link {i}", path.display()) } else { format!("{} link", path.display()) };
    let serve_other = |i: usize, mut conn: Conn<B>| {
        crate::log::relay_here();
        pressure::realtime();
        serve_link(&mut conn.store, &mut conn.bufs, shared, &stats[i], &ours[i], &|| link(i))
    };
    // Before this slice's other threads start, so that every one inherits
    // it; after attaching, so that an instance that finds the device busy
    // exits before it locks all its memory.
    if let Err(f) = pressure::prepare(true) {
        return Ended::NotStarted(f);
    }
    thread::scope(|s| {
        // The other connections' loops, each on a thread of its own with
        // its own store and buffers, all made before the device starts.
        let others = match workers::spawn(s, backing, setup.tuning, setup.staging, "nbd-conn", 1..n, &serve_other) {
            Ok(others) => others,
            Err(f) => return Ended::NotStarted(f),
        };
        info!("{} attached: {} MiB{}", path.display(), shared.export.size >> 20, match n {
            1 => String::new(),
            n => format!(", {n} connections"),
        });
        let kernel = spawn(s, "nbd-do-it", || run_device(dev, ours));
        let control = spawn(s, "nbd-control", || control::run(dev, setup.opts, board, ours));
        let controlled = control.is_ok();
        if !controlled {
            // Nothing would swap on, nor ever end the device: end it now.
            end_device(dev, ours);
        }
        crate::log::relay_here();
        pressure::realtime();
        // Until every link has ended: the kernel sends the requests of one
        // that broke down the others, and ends them all at disconnect.
        let mut served = vec![serve_link(&mut first.store, &mut first.bufs, shared, &stats[0], &ours[0], &|| link(0))];
        // Freed now, as the other links free theirs: they may serve on for long.
        drop(first);
        let ended = |i: usize, h: thread::ScopedJoinHandle<'_, Option<io::Result<End>>>| {
            h.join().ok().flatten().unwrap_or_else(|| {
                error!("{} broke: its thread failed", link(i));
                Err(io::Error::other("its thread failed"))
            })
        };
        served.extend(others.into_iter().enumerate().map(|(k, h)| ended(k + 1, h)));
        board.link_ended();
        let kernel = join(kernel, "NBD_DO_IT");
        let control = join(control, "control");
        let broke = served.iter().any(Result::is_err);
        // What broke was said when it did.
        for (i, end) in served.iter().enumerate() {
            if let Ok(end) = end {
                info!("{} closed ({end:?})", link(i));
            }
        }
        match (control, kernel) {
            (Err(f), _) if !controlled => Ended::NotStarted(f),
            // Its requests then failed, or went down another link; then a
            // write held up on it may have landed late, over newer ones,
            // which a clean swapoff since cannot tell.
            (Ok(Ended::Off), Ok(())) if broke => Ended::Lost(Failure::new(Code::Other, format!("{}: a link broke while serving: data sent to it may be lost", path.display()))),
            (Ok(Ended::Off), Ok(())) => Ended::Off,
            (Ok(Ended::NotStarted(f)), _) => Ended::NotStarted(f),
            (Ok(Ended::Lost(f)) | Err(f), _) | (Ok(Ended::Off), Err(f)) => Ended::Lost(f),
        }
    })
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
/// the kernel thread's copy included. A link that broke is said at once:
/// the others may serve on for long.
fn serve_link<S: Store>(store: &mut S, bufs: &mut Buffers<S::Buf>, shared: &Shared, stats: &Stats, ours: &UnixStream, link: &dyn Fn() -> String) -> io::Result<End> {
    let mut conn = ours;
    let served = transmit::run(store, bufs, shared, stats, &mut conn);
    let _ = ours.shutdown(std::net::Shutdown::Both);
    if let Err(e) = &served {
        error!("{} broke: {e}", link());
    }
    served
}

/// Ends the device, which is not swap: by NBD_DISCONNECT, or where the
/// kernel refuses that, by ending our side of its links, lest the serving
/// threads, and a stop that waits for them, wait for ever.
fn end_device(dev: &NbdDevice, ours: &[UnixStream]) {
    if let Err(e) = dev.disconnect() {
        warn!("{}: NBD_DISCONNECT: {e}; ending its links instead", dev.path().display());
        shut_all(ours);
    }
}

/// Ends every link: the device is gone.
fn shut_all(ours: &[UnixStream]) {
    for sock in ours {
        let _ = sock.shutdown(std::net::Shutdown::Both);
    }
}

fn spawn<'s, 'e, T, F>(s: &'s thread::Scope<'s, 'e>, name: &str, f: F) -> io::Result<thread::ScopedJoinHandle<'s, Result<T, Failure>>>
where
    F: FnOnce() -> Result<T, Failure> + Send + 's,
    T: Send + 's,
{
    thread::Builder::new().name(name.into()).stack_size(STACK).spawn_scoped(s, f)
}

fn join<T>(h: io::Result<thread::ScopedJoinHandle<'_, Result<T, Failure>>>, what: &str) -> Result<T, Failure> {
    match h {
        Ok(h) => h.join().unwrap_or_else(|_| Err(Failure::new(Code::Other, format!("{what} thread panicked")))),
        Err(e) => Err(Failure::os(format!("starting the {what} thread"), e)),
    }
}

/// Opens, claims and sizes a device. The first `NBD_SET_SOCK` claims it
/// for this thread (another instance's, or another slice's, at the same
/// moment says EBUSY), so the device is sized only
/// after: before that, a loser's size and flags would replace the
/// winner's. With no device named, one taken or still swap is passed
/// over for the next one.
fn attach(setup: &Setup, export: &Export, theirs: &[OwnedFd]) -> Result<NbdDevice, Failure> {
    let opts = setup.opts;
    let auto = setup.device.is_none();
    let mut skip = Vec::new();
    loop {
        let dev = open_device(setup.device, &skip)?;
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
        let mut given = 0;
        match theirs.iter().try_for_each(|sock| dev.set_sock(sock).map(|()| given += 1)) {
            Ok(()) => {}
            Err(e) if given == 0 && auto && e.raw_os_error() == Some(libc::EBUSY) => {
                skip.push(path);
                continue;
            }
            Err(e) => {
                // Only sockets of ours: NBD_CLEAR_SOCK would also take
                // those of whoever claimed the device.
                if given > 0 {
                    let _ = dev.clear_sock();
                }
                return Err(Failure::os(format!("{}: NBD_SET_SOCK", path.display()), e));
            }
        }
        let configured = dev
            .configure(export.size, export.flags, request_timeout(opts))
            .map_err(|e| Failure::os(format!("{}: configuring (NBD_SET_BLKSIZE/SIZE_BLOCKS/FLAGS/TIMEOUT)", path.display()), e))
            .and_then(|()| match setup.staging < crate::nbd::proto::MAX_PAYLOAD as usize {
                true => dev.limit_requests(setup.staging).map_err(|e| Failure::os(format!("{}: queue/max_sectors_kb", path.display()), e)),
                false => Ok(()),
            });
        if let Err(f) = configured {
            let _ = dev.clear_sock();
            return Err(f);
        }
        return Ok(dev);
    }
}

/// Refuses `path` if a server has it, as `attach` would, for a start that
/// has allocated nothing yet (`daemon::run`). What is no NBD device at
/// all is left to `attach` to say.
pub fn refuse_if_served(path: &Path) -> Result<(), Failure> {
    match kernel::server_of(path).filter(|_| kernel::not_nbd(path).is_none()) {
        Some((pid, comm)) => Err(busy(path, pid, &comm)),
        None => Ok(()),
    }
}

fn busy(path: &Path, pid: u32, comm: &str) -> Failure {
    Failure::new(Code::Busy, format!("{} is busy: served by pid {pid} ({comm}); pick another with --device, or --device auto", path.display()))
}

fn open_device(device: Option<&Path>, skip: &[PathBuf]) -> Result<NbdDevice, Failure> {
    let opened = match device {
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
        OpenError::Busy { path, pid, comm } => busy(&path, pid, &comm),
        OpenError::NoneFree => Failure::new(
            Code::Busy,
            "every /dev/nbdN is in use: load more with `modprobe nbd nbds_max=N` (after unloading it)",
        ),
        OpenError::Os(p, e) => Failure::os(p.display(), e),
        OpenError::NotNbd(why) => Failure::new(Code::Usage, format!("--device {why}")),
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

    #[test]
    fn a_stop_is_never_taken_back_by_a_drain() {
        let board = Board::new(1);
        board.starting();
        board.stop();
        board.drain();
        board.serve_on();
        assert_eq!(board.wait(Duration::ZERO), (Want::Stop, false));
    }

    /// A refused drain is not tried again until the daemon says so.
    #[test]
    fn a_refused_drain_waits_for_the_next_order() {
        let board = Board::new(1);
        board.starting();
        board.drain();
        assert_eq!(board.wait(Duration::ZERO), (Want::Drain, false));
        board.serve_on();
        assert_eq!(board.wait(Duration::ZERO), (Want::Serve, false));
    }
}
