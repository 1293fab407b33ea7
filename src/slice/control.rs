//! A slice's control thread: everything that waits on the kernel. It makes
//! the device swap (or serves another's swapon of it as its own), waits for
//! the daemon's order, and swaps off and claims the device before the link
//! is cut, retrying while RAM cannot take the pages back: a device is let
//! go only once nothing on it can be lost.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{end_device, wait_for, Board, Ended, Refusal, Want};
use crate::cli::SwapOpts;
use crate::elastic::State;
use crate::fail::{Code, Failure};
use crate::nbd::kernel::{self, NbdDevice};
use crate::swap::{self, Claim, Outcome};
use crate::{error, info, warn};

/// How often a refused swapoff is tried again when stopping.
const SWAPOFF_RETRY: Duration = Duration::from_secs(10);

/// swapon, wait for an order, swapoff, disconnect.
pub(super) fn run(dev: &NbdDevice, opts: &SwapOpts, board: &Board, ours: &[UnixStream]) -> Result<Ended, Failure> {
    let path = dev.path();
    // Made now, while /proc resolves: after a switch_root it may not.
    let off = swap::Swapoff::new(path, dev.as_fd());
    let started = wait_for(Duration::from_secs(10), || {
        // The kernel publishes the pid before it sizes the disk: swapon
        // in between finds no swap signature.
        board.lock().link_down || (kernel::server_of(path).is_some() && kernel::sectors(path) > 0)
    });
    if !started || board.lock().link_down {
        end_device(dev, ours);
        return Ok(Ended::NotStarted(Failure::new(Code::Other, format!("{}: the kernel did not start the device", path.display()))));
    }
    if opts.swap {
        if let Some(ended) = swap_on(dev, opts, board, ours, &off)? {
            return Ok(ended);
        }
    }
    board.set_state(State::Serving);
    // Kept until the link is cut: nothing can take the device meanwhile.
    let claim = loop {
        match board.wait(Duration::from_secs(3600)) {
            (_, true) => {
                error!("{}: the kernel link ended by itself; swapped pages may be lost", path.display());
                if opts.swap {
                    off.run();
                }
                return Err(Failure::new(Code::Other, format!("{}: kernel link lost", path.display())));
            }
            (Want::Serve, false) => continue,
            (Want::Drain, false) if opts.swap => {
                board.set_state(State::Draining);
                if let Some(claim) = give_back(&off, board, opts) {
                    break claim;
                }
                board.serve_on();
                board.set_state(State::Serving);
            }
            (Want::Drain | Want::Stop, false) => {
                board.set_state(State::Draining);
                match release(&off, board, opts.swap) {
                    Some(claim) => break claim,
                    None if opts.swap => return Err(Failure::new(Code::Other, format!("{}: kernel link lost while swapping off", path.display()))),
                    None => return Err(Failure::new(Code::Other, format!("{}: kernel link lost while the device was in use", path.display()))),
                }
            }
        }
    };
    // Swapped off and claimed: nothing is left to lose.
    end_device(dev, ours);
    drop(claim);
    Ok(Ended::Off)
}

/// Our swapon, with what a refusal as busy needs (`beaten_to_swapon`);
/// `Some` if the device was detached instead.
fn swap_on(dev: &NbdDevice, opts: &SwapOpts, board: &Board, ours: &[UnixStream], off: &swap::Swapoff) -> Result<Option<Ended>, Failure> {
    let path = dev.path();
    let mut tries = 0;
    loop {
        tries += 1;
        match swap::swapon(path, opts.priority, opts.discard) {
            Ok(()) => {
                info!("swap on {} with priority {}", path.display(), opts.priority);
                return Ok(None);
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => match beaten_to_swapon(off, board) {
                Beaten::Adopted => return Ok(None),
                // Held only for a while (a tool probing the new device): ours again.
                Beaten::Released(claim) if tries < SWAPON_TRIES => drop(claim),
                Beaten::Released(claim) => {
                    end_device(dev, ours);
                    drop(claim);
                    return Ok(Some(Ended::NotStarted(swapon_failure(path, e))));
                }
                Beaten::Lost => return Err(Failure::new(Code::Other, format!("{}: kernel link lost while the device was in use", path.display()))),
            },
            Err(e) => {
                end_device(dev, ours);
                return Ok(Some(Ended::NotStarted(swapon_failure(path, e))));
            }
        }
    }
}

/// Our swapons refused as busy, each time by something that let go of the
/// device later, before the daemon detaches it and gives up.
const SWAPON_TRIES: u32 = 3;

enum Beaten {
    /// Made swap by another swapon: served as our own.
    Adopted,
    /// Nothing held it a moment ago (or, without /proc, nobody can tell).
    Released(Claim),
    /// The link ended first: what was kept there is lost.
    Lost,
}

/// After our swapon was refused as busy: something else holds the device,
/// most likely a swapon by our label (an fstab entry, a udev rule) that
/// came first, and cutting the link now would lose what it keeps there.
/// So the device is served until it is swap, which is then served as ours
/// (swapped off at a stop like our own), or until nothing holds it. A stop
/// meanwhile waits for that too.
fn beaten_to_swapon(off: &swap::Swapoff, board: &Board) -> Beaten {
    let path = off.path();
    let mut told = false;
    loop {
        if let Some(area) = swap::active(path) {
            warn!(
                "{}: made swap by another swapon first (a swap entry naming its label?), with priority {}: serving it as ours",
                path.display(),
                area.priority
            );
            return Beaten::Adopted;
        }
        if board.lock().link_down {
            error!("{}: the link ended while something else held the device; what it kept there is lost", path.display());
            return Beaten::Lost;
        }
        // Taken by a swapon not yet listed, or by anything else: look again.
        match off.claim() {
            Ok(claim @ (Claim::Ours { .. } | Claim::Unknown)) => return Beaten::Released(claim),
            Ok(Claim::Taken) if !told => info!("{}: in use by something else, not swap yet: serving it until it is swap or let go", path.display()),
            Err(e) if !told => info!("{}: cannot tell whether it is in use ({e}): serving it until it is swap or let go", path.display()),
            Ok(Claim::Taken) | Err(_) => {}
        }
        told = true;
        board.wait_link(Duration::from_millis(200));
    }
}

/// One swapoff to give the slice back; `None` if the kernel refused it, or
/// something took the device right after (the daemon tries again later,
/// or another slice).
fn give_back(off: &swap::Swapoff, board: &Board, opts: &SwapOpts) -> Option<Claim> {
    let path = off.path();
    let pages = board.used_pages.load(Ordering::SeqCst);
    info!("giving back {}: swapoff of its {pages} page(s)", path.display());
    let t = Instant::now();
    let outcome = off.run();
    let ours = matches!(outcome, Outcome::Off);
    let why = match outcome {
        Outcome::Off | Outcome::NotSwap => match off.claim() {
            Ok(Claim::Taken) => Refusal::Taken,
            // What the kernel could not read back, it gave up on.
            Ok(_) if board.lock().link_down => {
                error!("swapoff {}: the link ended while it ran; pages it could not read back are lost", path.display());
                return None;
            }
            Ok(claim) => {
                info!("swapoff {} done: {pages} page(s) moved out in {:.1} s", path.display(), t.elapsed().as_secs_f64());
                board.moved.0.store(pages, Ordering::SeqCst);
                board.moved.1.store((t.elapsed().as_millis() as u64).max(1), Ordering::SeqCst);
                return Some(claim);
            }
            Err(e) => {
                warn!("{}: cannot claim it after its swapoff: {e}", path.display());
                Refusal::Other
            }
        },
        Outcome::Failed(e) if board.lock().link_down => {
            error!("swapoff {}: {e}, and the link is gone", path.display());
            return None;
        }
        Outcome::Elsewhere => Refusal::Elsewhere,
        Outcome::Failed(e) if e.kind() == io::ErrorKind::OutOfMemory => Refusal::Ram,
        Outcome::Failed(e) => {
            warn!("swapoff {}: {e}", path.display());
            Refusal::Other
        }
    };
    warn!("{} not given back: {}; it is served on, and tried again later", path.display(), why.why());
    if ours && !board.lock().link_down && swap::active(path).is_none() {
        // Our swapoff, but no claim after it: swap again, as the daemon
        // counts the slice.
        match swap::swapon(path, opts.priority, opts.discard) {
            Ok(()) => info!("swap on {} again with priority {}", path.display(), opts.priority),
            Err(e) => warn!("{}", swapon_failure(path, e)),
        }
    }
    // Also held off a while: the state's change wakes the daemon at once.
    board.refuse(why);
    None
}

/// Serves the device until nothing else holds it, then claims it, so that
/// nothing (a swapon by udev or an administrator, a mount) takes it in the
/// moment before the link is cut. Our swap (`swap`) is swapped off first,
/// and again if someone makes it swap again; a `--no-swap` device may carry
/// a mounted file system, or swap of an administrator's own, which are
/// waited for. Never gives up: while anything may keep data there, the VRAM
/// stays served. `None` if the link ended first: what was left there is
/// lost.
fn release(off: &swap::Swapoff, board: &Board, swap: bool) -> Option<Claim> {
    let path = off.path();
    let (mut elsewhere, mut told) = (false, false);
    loop {
        let mut off_now = false;
        if swap {
            let t = Instant::now();
            match off.run() {
                Outcome::Off => {
                    info!("swapoff {} done in {:.1} s", path.display(), t.elapsed().as_secs_f64());
                    off_now = true;
                }
                // systemd's own dev-nbdN.swap unit may have swapped it off first.
                Outcome::NotSwap if !told => info!("{} is no longer swap", path.display()),
                Outcome::NotSwap => {}
                Outcome::Failed(e) if board.lock().link_down => {
                    error!("swapoff {}: {e}, and the link is gone", path.display());
                    return None;
                }
                // Or be at it still: its pages are served until it ends.
                Outcome::Elsewhere if board.lock().link_down => {
                    error!("{}: the link is gone while another swapoff of it was under way", path.display());
                    return None;
                }
                Outcome::Elsewhere => {
                    if !elsewhere {
                        info!("{}: another swapoff of it is still moving its pages back; serving them until it ends", path.display());
                    }
                    elsewhere = true;
                    board.wait_link(Duration::from_secs(1));
                    continue;
                }
                Outcome::Failed(e) => {
                    match e.kind() {
                        io::ErrorKind::OutOfMemory => error!(
                            "swapoff {}: {e}: RAM cannot take the swapped pages back yet; still serving them, retrying in {} s",
                            path.display(),
                            SWAPOFF_RETRY.as_secs()
                        ),
                        _ => error!("swapoff {}: {e}; still serving it, retrying in {} s", path.display(), SWAPOFF_RETRY.as_secs()),
                    }
                    board.wait_link(SWAPOFF_RETRY);
                    continue;
                }
            }
        }
        match off.claim() {
            Ok(Claim::Taken) if off_now => {
                info!("{}: made swap again, or mounted, right after its swapoff", path.display());
                continue;
            }
            Ok(Claim::Ours { .. } | Claim::Unknown) if board.lock().link_down => {
                error!("{}: the link ended before its swapoff did; pages it could not read back are lost", path.display());
                return None;
            }
            Ok(claim @ (Claim::Ours { .. } | Claim::Unknown)) => return Some(claim),
            // The device itself is gone: nothing to keep it for.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENXIO | libc::ENODEV | libc::ENOENT)) => {
                warn!("{}: {e}; detaching it", path.display());
                return Some(Claim::Unknown);
            }
            Err(_) | Ok(Claim::Taken) if board.lock().link_down => {
                error!("{}: the link is gone while the device may be in use", path.display());
                return None;
            }
            // A shortage (EMFILE, ENOMEM) passes: ask again.
            Err(e) => warn!("{}: cannot tell whether it is in use ({e}); asking again in 1 s", path.display()),
            Ok(Claim::Taken) => {
                if !told {
                    info!("{}: in use (a mounted file system, or swap): serving it until it is released, then detaching", path.display());
                    told = true;
                }
            }
        }
        board.wait_link(Duration::from_secs(1));
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
