//! The swap daemon: a tier of one or more slices (`slice.rs`), each its
//! own allocation, /dev/nbdN and swap area, all at the same priority, so
//! that the kernel spreads pages across them. This thread takes signals,
//! allocates and frees the slices' memory, and gives slices back to GPU
//! jobs or takes them again (`elastic.rs`: `--reserve`, `nbd-vram
//! resize`), one change at a time. A slice's memory is freed only after
//! its thread has returned it, swapped off and detached: the kernel can no
//! longer read it.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::thread::{self, Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use crate::cli::SwapOpts;
use crate::elastic::{self, Change, Policy, State, Why};
use crate::fail::{Code, Failure};
use crate::nbd::kernel;
use crate::nbd::proto::MAX_PAYLOAD;
use crate::reroot::InitRoot;
use crate::resize::{self, Request};
use crate::signals::{Signals, STOP};
use crate::slice::{self, Board, Ended, Setup};
use crate::stats::Stats;
use crate::status::{self, Instance};
use crate::store::{Backing, Tier, UseTier, MIB};
use crate::tuning::Tuning;
use crate::{error, info, notify, pressure, swap, warn};

/// How often free memory and the slices are looked at.
const TICK: Duration = Duration::from_secs(1);
/// Staging per connection when the tier has several slices, and so the
/// longest request the kernel is let send: four slices of two
/// connections lock 64 MiB, not 256.
const SLICE_STAGING: usize = 8 << 20;
/// A serving thread's stack (the first connection's loop runs on it).
const STACK: usize = 1024 * 1024;

/// The options, and `--device` resolved once (a link to it followed).
struct Daemon<'a>(&'a SwapOpts, &'a Tuning, Option<&'a Path>);

/// Runs the swap daemon on the tier `opts` names. A device named with
/// `--device` that another server has is refused first, before the GPU or
/// any memory is touched: memory taken and locked first would come from a
/// machine that may be swapping to that very device.
pub fn run(opts: &SwapOpts, tuning: &Tuning) -> Result<(), Failure> {
    let device = opts.device.as_deref().map(kernel::resolve);
    if let Some(path) = &device {
        slice::refuse_if_served(path)?;
    }
    crate::store::with_tier(&opts.store, opts.connections, tuning, Daemon(opts, tuning, device.as_deref()))
}

impl UseTier for Daemon<'_> {
    fn run<T: Tier>(self, tier: &T) -> Result<(), Failure> {
        serve_tier(self.0, self.1, self.2, tier)
    }
}

/// What serving the kernel changes in `tuning`. With several connections
/// the kernel sends a request whose connection ended down another one
/// only at its timeout (`slice::request_timeout`: a week then), so a read
/// whose header went out early and whose copy then failed would hold its
/// task that long: the header waits for the data.
fn for_the_kernel(opts: &SwapOpts, tuning: &Tuning) -> Tuning {
    Tuning { early_header: tuning.early_header && opts.connections == 1, ..tuning.clone() }
}

/// A slice's thread hands its backing back, to be freed on this thread.
type Slot<'s, B> = Option<ScopedJoinHandle<'s, (Ended, B)>>;

/// Allocates, attaches and serves every slice until a stop, then takes
/// them down.
fn serve_tier<T: Tier>(opts: &SwapOpts, tuning: &Tuning, device: Option<&Path>, tier: &T) -> Result<(), Failure> {
    let signals = Signals::taken();
    // Looked at now, while /proc still resolves.
    let root = InitRoot::watch();
    let tuning = &for_the_kernel(opts, tuning);
    let k = opts.slices();
    pressure::set_loops(k * opts.connections);
    let staging = if k > 1 { SLICE_STAGING } else { MAX_PAYLOAD as usize };
    let first = Setup { opts, tuning, staging, device };
    let others = Setup { device: None, ..first };
    let backings = allocate(opts, tier)?;
    let boards: Vec<Board> = (0..k).map(|_| Board::new(opts.connections)).collect();
    let stats: Vec<&Stats> = boards.iter().flat_map(|b| b.stats.iter()).collect();
    let report = Report::new();
    let mut policy = Policy::new(opts.reserve, opts.slice, Duration::from_secs(opts.hold_off.into()), k);
    thread::scope(|s| {
        let mut slots: Vec<Slot<'_, T::Backing<'_>>> = (0..k).map(|_| None).collect();
        let mut outcome = Ok(true);
        // The slices there is memory for, one after the other.
        for (i, backing) in backings.into_iter().enumerate() {
            let Some(backing) = backing else { continue };
            let setup = if i == 0 { &first } else { &others };
            outcome = start(s, setup, backing, &boards[i], i).and_then(|h| {
                slots[i] = Some(h);
                wait_started(&signals, &boards[i], &mut slots[i])
            });
            if !matches!(outcome, Ok(true)) {
                break;
            }
        }
        let started = matches!(outcome, Ok(true));
        let mut outcome = outcome.map(drop);
        let mut status = None;
        let mut root = root;
        if started {
            // The status file is made by name: where init moved on while
            // the slices started, in its new root.
            if let Some(root) = &mut root {
                root.follow();
            }
            let serving: Vec<String> = boards.iter().filter_map(|b| b.device()).map(|d| d.display().to_string()).collect();
            notify::ready(&format!("swap on {}", serving.join(", ")));
            let instance = instance(opts, &boards);
            let (report, boards, stats) = (&report, &boards, &stats);
            let name = instance.name.clone();
            status = thread::Builder::new()
                .name("nbd-status".into())
                .stack_size(256 * 1024)
                .spawn_scoped(s, move || {
                    let extra = |t: &mut String| report.render(t, boards);
                    status::publish(&instance, stats, &extra, || {
                        thread::sleep(TICK);
                        !report.done.load(Ordering::SeqCst)
                    })
                })
                .map_err(|e| warn!("cannot start the status thread ({e}): `nbd-vram status`, `resize` and `stop` by a device given back will not find this instance"))
                .ok();
            let mut steer = Steer { opts, tier, setups: [&first, &others], boards, report, policy: &mut policy, name, chosen: vec![None; k], root };
            outcome = steer.run(s, &signals, &mut slots);
        }
        notify::stopping();
        for (board, slot) in boards.iter().zip(&slots) {
            if slot.is_some() {
                board.stop();
            }
        }
        for (i, slot) in slots.iter_mut().enumerate() {
            if let Some(h) = slot.take() {
                if let Err(f) = reap(&boards[i], h, i) {
                    outcome = outcome.and(Err(f));
                }
            }
        }
        report.done.store(true, Ordering::SeqCst);
        if let Some(h) = status {
            let _ = h.join();
        }
        // Swapoff succeeds over pages it could not read back (the kernel
        // poisons them, and their processes get SIGBUS): after a store
        // failed, no stop is a clean one.
        let failed = crate::stats::any_failed(&stats);
        match outcome {
            Ok(()) if failed => Err(Failure::new(Code::Other, "a store failed while serving: pages swapped to it may be lost")),
            outcome => outcome,
        }
    })
}

/// The tier's memory at start: with one slice, `--size` or the most of it
/// that `--step` and `--min-size` allow; with several, every slice there
/// is room for above `--reserve` (at least `--min-size` in all), the rest
/// taken later.
fn allocate<'t, T: Tier>(opts: &SwapOpts, tier: &'t T) -> Result<Vec<Option<T::Backing<'t>>>, Failure> {
    let store = &opts.store;
    if opts.slices() == 1 {
        return Ok(vec![Some(tier.allocate(store.size, store.step, store.min_size)?)]);
    }
    let mut backings = Vec::new();
    for i in 0..opts.slices() {
        let room = tier.free().is_none_or(|f| elastic::room(f, opts.reserve, opts.slice));
        if !room && opts.reserve > 0 {
            info!("slice {i} of {} MiB would leave less than --reserve free; it is taken when memory allows", opts.slice / MIB);
            backings.push(None);
            continue;
        }
        match tier.allocate(opts.slice, 0, opts.slice) {
            Ok(b) => backings.push(Some(b)),
            Err(f) if f.code == Code::NoVram => {
                info!("slice {i} of {} MiB: {f}; it is taken when memory allows", opts.slice / MIB);
                backings.push(None);
            }
            Err(f) => return Err(f),
        }
    }
    let got = backings.iter().flatten().count() as u64 * opts.slice;
    if got < store.min_size || got == 0 {
        return Err(Failure::new(
            Code::NoVram,
            format!(
                "only {} MiB of VRAM in {}-MiB slices could be had, below --min-size {} MiB: free GPU memory or lower --min-size",
                got / MIB, opts.slice / MIB, store.min_size / MIB
            ),
        ));
    }
    Ok(backings)
}

/// Named after its first device, which `status` and `resize` go by.
fn instance(opts: &SwapOpts, boards: &[Board]) -> Instance {
    let first = boards.iter().find_map(Board::device).unwrap_or_default();
    let name = first.file_name().map_or_else(|| "nbd".into(), |n| n.to_string_lossy().into_owned());
    Instance {
        name: status::free_name(&name),
        target: first.display().to_string(),
        store: opts.store.describe(),
        // One slice is the whole tier, with the fallback it had at start:
        // what it took, not what was asked.
        size: match boards {
            [one] => one.size.load(Ordering::Relaxed),
            _ => opts.store.size,
        },
        priority: opts.swap.then_some(opts.priority),
    }
}

/// Starts slice `i`'s thread on `backing`.
fn start<'s, 'e, B: Backing + Send + 's>(
    s: &'s Scope<'s, 'e>,
    setup: &'s Setup<'s>,
    backing: B,
    board: &'s Board,
    i: usize,
) -> Result<ScopedJoinHandle<'s, (Ended, B)>, Failure> {
    board.starting();
    board.size.store(backing.size(), Ordering::Relaxed);
    let spawned = thread::Builder::new().name(format!("nbd-slice-{i}")).stack_size(STACK).spawn_scoped(s, move || {
        let ended = slice::run(setup, &backing, board);
        board.mark_ending();
        (ended, backing)
    });
    spawned.map_err(|e| {
        board.mark_released();
        Failure::os("starting a slice's thread", e)
    })
}

/// Until a slice serves (true), its thread ends (a failure) or a stop
/// comes (false).
fn wait_started<B>(signals: &Signals, board: &Board, slot: &mut Slot<'_, B>) -> Result<bool, Failure> {
    loop {
        if board.state() == State::Serving {
            return Ok(true);
        }
        if slot.as_ref().is_some_and(|h| h.is_finished()) {
            let joined = slot.take().map(ScopedJoinHandle::join);
            board.mark_released();
            return match joined {
                Some(Ok((Ended::NotStarted(f) | Ended::Lost(f), _))) => Err(f),
                _ => Err(Failure::new(Code::Other, "a slice ended before it served")),
            };
        }
        if let Some(sig) = signals.wait(TICK).filter(|sig| STOP.contains(sig)) {
            info!("stopping on signal {sig} while starting");
            return Ok(false);
        }
    }
}

/// Joins slice `i`'s thread and frees its memory; `Err` if its pages may
/// be lost.
fn reap<B>(board: &Board, h: ScopedJoinHandle<'_, (Ended, B)>, i: usize) -> Result<(), Failure> {
    let device = board.device();
    let joined = h.join();
    board.mark_released();
    let Ok((ended, backing)) = joined else {
        return Err(Failure::new(Code::Other, format!("slice {i}'s thread panicked")));
    };
    drop(backing);
    match ended {
        Ended::Off => {
            if let Some(d) = device {
                info!("slice {i} ({}) detached and its memory freed", d.display());
            }
            Ok(())
        }
        Ended::NotStarted(f) => {
            warn!("slice {i} did not start: {f}");
            Ok(())
        }
        Ended::Lost(f) => Err(f),
    }
}

/// Earlier `resize` answers the status file keeps: more than clients
/// come in the second between two of its writes.
const EARLIER: usize = 8;

/// What the steering tells `status`.
struct Report {
    /// The last change and why.
    change: Mutex<String>,
    /// A `resize` under way or answered, and its outcome.
    resize: Mutex<Option<(Request, String)>>,
    /// Earlier `resize`s with their outcomes, the newest last: a later
    /// request may come before the status file showed one's answer, and
    /// its client waits for it too. One still pending was replaced.
    earlier: Mutex<Vec<(Request, String)>>,
    done: AtomicBool,
}

impl Report {
    fn new() -> Report {
        Report { change: Mutex::new(String::new()), resize: Mutex::new(None), earlier: Mutex::new(Vec::new()), done: AtomicBool::new(false) }
    }

    /// `slices`, one `slice.I=DEVICE STATE USED_PAGES` line each,
    /// `change=...` and `resize=ID OUTCOME`.
    fn render(&self, t: &mut String, boards: &[Board]) {
        let _ = writeln!(t, "slices={}", boards.len());
        for (i, b) in boards.iter().enumerate() {
            let device = b.device().map_or_else(|| "-".into(), |d| d.display().to_string());
            let _ = writeln!(t, "slice.{i}={device} {} {}", b.state().name(), b.used_pages.load(Ordering::Relaxed));
        }
        let _ = writeln!(t, "change={}", self.change.lock().unwrap_or_else(PoisonError::into_inner));
        for (req, outcome) in self.earlier.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            let _ = writeln!(t, "resize={} {outcome}", req.id);
        }
        if let Some((req, outcome)) = &*self.resize.lock().unwrap_or_else(PoisonError::into_inner) {
            let _ = writeln!(t, "resize={} {outcome}", req.id);
        }
    }

    /// Takes `req` with its first outcome; the one before it is kept with
    /// its answer, or answered as replaced if it was still pending.
    fn ask(&self, req: Request, outcome: String) {
        let mut resize = self.resize.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((old, mut answer)) = resize.take() {
            if answer == "pending" {
                answer = format!("failed: replaced by a later resize to {} MiB (pid {})", req.size / MIB, req.id);
            }
            let mut earlier = self.earlier.lock().unwrap_or_else(PoisonError::into_inner);
            if earlier.len() == EARLIER {
                earlier.remove(0);
            }
            earlier.push((old, answer));
        }
        *resize = Some((req, outcome));
    }

    fn tell(&self, change: String) {
        info!("{change}");
        *self.change.lock().unwrap_or_else(PoisonError::into_inner) = change;
    }
}

/// Gives slices back and takes them again, one change at a time.
struct Steer<'a, 't, T: Tier> {
    opts: &'a SwapOpts,
    tier: &'t T,
    /// The first slice's setup (`--device`), and the others'.
    setups: [&'a Setup<'a>; 2],
    boards: &'a [Board],
    report: &'a Report,
    policy: &'a mut Policy,
    /// The instance's name, which `resize` requests go by.
    name: String,
    /// When each slice being given back was chosen.
    chosen: Vec<Option<Instant>>,
    /// Init's root, for a daemon started from the initramfs.
    root: Option<InitRoot>,
}

impl<'a, 't, T: Tier> Steer<'a, 't, T> {
    /// Until a stop signal, or a slice whose pages may be lost.
    fn run<'s>(&mut self, s: &'s Scope<'s, '_>, signals: &Signals, slots: &mut [Slot<'s, T::Backing<'t>>]) -> Result<(), Failure>
    where
        'a: 's,
        't: 's,
    {
        let watch = self.opts.reserve > 0 || self.boards.len() > 1;
        loop {
            if let Some(sig) = signals.wait(TICK) {
                if STOP.contains(&sig) {
                    info!("stopping on signal {sig}");
                    return Ok(());
                }
            }
            if let Some(root) = &mut self.root {
                root.follow();
            }
            let now = Instant::now();
            for (i, slot) in slots.iter_mut().enumerate() {
                if !slot.as_ref().is_some_and(|h| h.is_finished() || self.boards[i].has_ended()) {
                    continue;
                }
                let starting = self.boards[i].state() == State::Starting;
                if let Some(h) = slot.take() {
                    reap(&self.boards[i], h, i)?;
                }
                // A slice whose swapoff was refused and that then ended
                // for another reason was not given back: `reap` said why.
                if let Some(chosen) = self.chosen[i].take().filter(|_| self.boards[i].take_refusal().is_none()) {
                    let board = &self.boards[i];
                    let (pages, ms) = (board.moved.0.swap(0, Ordering::SeqCst), board.moved.1.swap(0, Ordering::SeqCst));
                    self.report.tell(format!(
                        "gave back slice {i}: swapoff moved {pages} page(s) out in {:.1} s; its memory was freed {:.2} s after it was chosen",
                        ms as f64 / 1e3,
                        chosen.elapsed().as_secs_f64()
                    ));
                }
                if starting {
                    self.policy.grow_failed(now);
                    self.answer(format!("failed: slice {i} could not start (see the log)"));
                }
            }
            if let Some(req) = resize::take(&self.name) {
                self.resize(req);
            }
            self.refresh_usage();
            if watch || self.pending() {
                self.step(s, now, slots);
            }
        }
    }

    /// Each slice's pages in swap, for the policy and `status`.
    fn refresh_usage(&self) {
        let swaps = swap::table();
        for board in self.boards {
            if let Some(dev) = board.device() {
                let used = swap::entry(&swaps, &dev).map_or(0, |a| a.used_kib / 4);
                board.used_pages.store(used, Ordering::Relaxed);
            }
        }
    }

    /// Looks at free memory and the slices, and makes the change the
    /// policy names, if any.
    fn step<'s>(&mut self, s: &'s Scope<'s, '_>, now: Instant, slots: &mut [Slot<'s, T::Backing<'t>>])
    where
        'a: 's,
        't: 's,
    {
        // States first, refusals after: a slice stores its refusal before
        // it serves on, so one seen serving here with its refusal not yet
        // taken is held off by it all the same.
        let view: Vec<elastic::Slice> =
            self.boards.iter().map(|b| elastic::Slice { state: b.state(), used_pages: b.used_pages.load(Ordering::Relaxed) }).collect();
        self.take_refusals(now);
        let free = self.tier.free();
        match self.policy.decide(now, free, &view) {
            Some((Change::Drain(i), why)) => {
                let dev = self.boards[i].device().map_or_else(|| "-".into(), |d| d.display().to_string());
                self.report.tell(format!("giving back slice {i} ({dev}, {} pages in swap): {}", view[i].used_pages, reason(why, free, self.opts)));
                self.boards[i].drain();
                self.chosen[i] = Some(now);
            }
            Some((Change::Grow(i), why)) => self.grow(s, i, reason(why, free, self.opts), now, slots),
            None => self.answer_unchanged(&view, free),
        }
    }

    /// Drains that did not give their slice back, since the last look.
    fn take_refusals(&mut self, now: Instant) {
        for (i, board) in self.boards.iter().enumerate() {
            if let Some(refusal) = board.take_refusal() {
                self.chosen[i] = None;
                self.report.tell(format!(
                    "slice {i} not given back: {}; it serves on, and a slice is given back again in {} s",
                    refusal.why(),
                    elastic::RETRY.as_secs()
                ));
                self.policy.refused(now);
                self.answer(format!("failed: slice {i} not given back: {}; the daemon tries again", refusal.why()));
            }
        }
    }

    /// Takes slice `i` again, for `why`.
    fn grow<'s>(&mut self, s: &'s Scope<'s, '_>, i: usize, why: String, now: Instant, slots: &mut [Slot<'s, T::Backing<'t>>])
    where
        'a: 's,
        't: 's,
    {
        // One slice is the whole tier, with the fallback it had at start.
        let store = &self.opts.store;
        let allocated = match self.boards.len() {
            1 => self.tier.allocate(store.size, store.step, store.min_size),
            _ => self.tier.allocate(self.opts.slice, 0, self.opts.slice),
        };
        let backing = match allocated {
            Ok(b) => b,
            Err(f) => {
                warn!("taking slice {i} again: {f}");
                self.policy.grow_failed(now);
                return self.answer(format!("failed: {f}"));
            }
        };
        self.report.tell(format!("taking slice {i} again ({} MiB): {why}", backing.size() / MIB));
        match start(s, self.setup_for(i), backing, &self.boards[i], i) {
            Ok(h) => slots[i] = Some(h),
            Err(f) => {
                error!("{f}");
                self.policy.grow_failed(now);
                self.answer(format!("failed: {f}"));
            }
        }
    }

    /// With no change to make, a pending `resize` is done, or cannot be
    /// done until there is room.
    fn answer_unchanged(&self, view: &[elastic::Slice], free: Option<u64>) {
        let busy = view.iter().any(|v| matches!(v.state, State::Starting | State::Draining));
        let serving = view.iter().filter(|v| v.state == State::Serving).count();
        if !busy && serving == self.policy.target() && self.pending() {
            let size: u64 = self.boards.iter().filter(|b| b.state() == State::Serving).map(|b| b.size.load(Ordering::Relaxed)).sum();
            self.answer(format!("done: {serving} slice(s), {} MiB", size / MIB));
        }
        let (reserve, slice) = (self.opts.reserve, self.opts.slice);
        if let Some(f) = free.filter(|&f| !busy && serving < self.policy.target() && reserve > 0 && !elastic::room(f, reserve, slice)) {
            self.answer(format!(
                "failed: {} MiB of VRAM free, and a slice above --reserve {} MiB needs {} MiB; it is taken once there is room",
                f / MIB,
                reserve / MIB,
                (reserve + slice + elastic::MARGIN) / MIB
            ));
        }
    }

    /// Slice 0 takes `--device` again while that is free; once another
    /// server has taken it (or left it swap), the first free device, as
    /// the others do, so that it is not asked for again and again.
    fn setup_for(&self, i: usize) -> &'a Setup<'a> {
        let free = |d: &std::path::Path| kernel::server_of(d).is_none() && swap::active(d).is_none();
        match self.setups[0].device {
            Some(d) if i == 0 && !free(d) => {
                warn!("slice 0: {} is taken since it was given back; taking the first free device instead", d.display());
                self.setups[1]
            }
            _ => self.setups[usize::from(i > 0)],
        }
    }

    /// `nbd-vram resize`: a new target, in whole slices, at most all of them.
    fn resize(&mut self, req: Request) {
        if !self.opts.swap {
            self.report.ask(req, "failed: a --no-swap device may hold a file system; it is never taken away".into());
            return;
        }
        let slices = ((req.size / self.opts.slice) as usize).min(self.boards.len());
        self.report.tell(format!("resize to {} MiB asked: {slices} slice(s) of {} MiB", req.size / MIB, self.opts.slice / MIB));
        self.policy.set_target(slices);
        self.report.ask(req, "pending".into());
    }

    fn pending(&self) -> bool {
        self.report.resize.lock().unwrap_or_else(PoisonError::into_inner).as_ref().is_some_and(|(_, o)| o == "pending")
    }

    /// Answers a pending `resize`.
    fn answer(&self, outcome: String) {
        if let Some((_, o)) = self.report.resize.lock().unwrap_or_else(PoisonError::into_inner).as_mut().filter(|(_, o)| o == "pending") {
            *o = outcome;
        }
    }
}

fn reason(why: Why, free: Option<u64>, opts: &SwapOpts) -> String {
    let free = free.map_or_else(|| "?".into(), |f| (f / MIB).to_string());
    match why {
        Why::Reserve => format!("{free} MiB of VRAM free, below --reserve {} MiB", opts.reserve / MIB),
        Why::Room => format!("{free} MiB of VRAM free for --hold-off {} s", opts.hold_off),
        Why::Asked => "nbd-vram resize".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{parse, Command};

    /// Each `resize` client finds an answer under its own id: one that a
    /// later request replaced before it was done is told so.
    #[test]
    fn a_resize_replaced_while_pending_is_answered() {
        let report = Report::new();
        let ask = |id, size| report.ask(Request { size, id }, "pending".into());
        let rendered = || {
            let mut t = String::new();
            report.render(&mut t, &[]);
            t
        };
        ask(11, 4 * MIB);
        assert!(rendered().contains("resize=11 pending\n"), "{}", rendered());
        ask(12, 8 * MIB);
        let t = rendered();
        assert!(t.contains("resize=11 failed: replaced by a later resize to 8 MiB (pid 12)\n"), "{t}");
        assert!(t.contains("resize=12 pending\n"), "{t}");
        *report.resize.lock().unwrap() = Some((Request { size: 8 * MIB, id: 12 }, "done: 2 slice(s)".into()));
        ask(13, 4 * MIB);
        let t = rendered();
        assert!(!t.contains("replaced by a later resize to 4 MiB"), "an answered request was taken for replaced");
        assert!(t.contains("resize=12 done: 2 slice(s)\n"), "an answer dropped before the status file showed it: {t}");
        assert!(t.contains("resize=11 failed"), "{t}");
        for id in 14..30 {
            ask(id, 4 * MIB);
        }
        assert_eq!(rendered().matches("resize=").count(), EARLIER + 1, "{}", rendered());
    }

    /// `status` shows a tier of one slice at the size it took, which a
    /// fallback may have made less than `--size`; slices are taken whole.
    #[test]
    fn a_tier_is_shown_at_the_size_it_took() {
        let opts = |args: &str| match parse(args.split_whitespace().map(String::from)).map(|p| p.command) {
            Ok(Command::Swap(opts)) => opts,
            other => panic!("{args}: {other:?}"),
        };
        let one = [Board::new(1)];
        one[0].size.store(6656 * MIB, Ordering::Relaxed);
        assert_eq!(instance(&opts("--size 7168"), &one).size, 6656 * MIB);
        let two = [Board::new(1), Board::new(1)];
        two[0].size.store(512 * MIB, Ordering::Relaxed);
        assert_eq!(instance(&opts("--size 1024 --slice-size 512"), &two).size, 1024 * MIB);
    }

    /// One connection keeps the early header; several leave it out, as a
    /// read that failed after it would wait for the kernel's timeout.
    #[test]
    fn several_kernel_connections_send_a_reads_header_with_its_data() {
        let early = |args: &str| {
            let Ok(Command::Swap(opts)) = parse(args.split_whitespace().map(String::from)).map(|p| p.command) else { panic!("{args}") };
            for_the_kernel(&opts, &Tuning::default()).early_header
        };
        assert!(Tuning::default().early_header);
        assert!(early("--size 256"));
        assert!(!early("--size 256 --connections 2"));
    }
}
