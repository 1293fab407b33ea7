//! Keeps driver calls that wait for every kernel apart from mailbox
//! kernels that nobody has told to end.
//!
//! `cuMemFree`, `cuMemFreeHost`, `cuModuleLoadData` and `cuModuleUnload`
//! return only once every kernel of the context has ended, and while the
//! first three wait, other threads' driver calls wait with them (H200,
//! driver 580, tests/gpu/blocking-probe.c). A mailbox kernel ends only when its own
//! serving thread tells it to; if that thread made a driver call first, it
//! would wait behind the call that waits for its kernel, for ever. Freeing
//! one slice while another slice's kernel runs is such a case.
//!
//! So a kernel is launched only with an `Admission`, held until it is told
//! to end, and those calls go through `alone`, which waits until no
//! admission is held and admits none meanwhile. Serving does not wait
//! here: a launch without an admission is skipped (the copies go the other
//! ways), and a serving thread parks its kernel at its next request once
//! it sees `wanted` (and before it sleeps anyway). A thread waits in
//! `alone` only to drop a kernel or a store, never while it holds an
//! admission itself: it would wait for itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

struct Gate {
    state: Mutex<State>,
    changed: Condvar,
    /// A call waits in `alone`: read by serving threads at every request.
    wanted: AtomicBool,
}

struct State {
    /// Kernels launched and not yet told to end.
    running: usize,
    /// A call is waiting in `alone`, or being made.
    closed: bool,
}

static GATE: Gate = Gate { state: Mutex::new(State { running: 0, closed: false }), changed: Condvar::new(), wanted: AtomicBool::new(false) };

fn state() -> MutexGuard<'static, State> {
    GATE.state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Leave to launch a kernel that runs until told to end; given back on
/// drop, once it has been told.
pub struct Admission(());

impl Drop for Admission {
    fn drop(&mut self) {
        state().running -= 1;
        GATE.changed.notify_all();
    }
}

/// An admission, unless a call that waits for every kernel is waiting or
/// being made (then the caller copies without the kernel for now).
pub fn admit() -> Option<Admission> {
    let mut s = state();
    if s.closed {
        return None;
    }
    s.running += 1;
    Some(Admission(()))
}

/// Whether a serving thread should tell its kernel to end now.
pub fn wanted() -> bool {
    GATE.wanted.load(Ordering::Relaxed)
}

/// Runs `call`, a driver call that waits for every kernel, once every
/// admitted kernel has been told to end, admitting none until it returns.
/// The caller must hold no admission.
pub fn alone<R>(call: impl FnOnce() -> R) -> R {
    let mut s = state();
    while s.closed {
        s = GATE.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
    }
    s.closed = true;
    GATE.wanted.store(true, Ordering::Relaxed);
    while s.running > 0 {
        s = GATE.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
    }
    drop(s);
    let r = call();
    let mut s = state();
    s.closed = false;
    GATE.wanted.store(false, Ordering::Relaxed);
    drop(s);
    GATE.changed.notify_all();
    r
}

/// The gate is the process's: tests that use it take turns.
#[cfg(test)]
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::thread;
    use std::time::Duration;

    /// A call waits for the admitted kernel to be told to end, and admits
    /// none meanwhile.
    #[test]
    fn a_call_waits_for_admitted_kernels_and_admits_none_meanwhile() {
        let _turn = serial();
        let kernel = admit().expect("an open gate admits");
        assert!(!wanted());
        let step = AtomicUsize::new(0);
        thread::scope(|s| {
            s.spawn(|| {
                alone(|| {
                    assert_eq!(step.load(Ordering::SeqCst), 1, "made while a kernel was admitted");
                    assert!(admit().is_none(), "admitted a kernel while a call was being made");
                    step.store(2, Ordering::SeqCst);
                })
            });
            while !wanted() {
                thread::sleep(Duration::from_millis(1));
            }
            assert!(admit().is_none(), "admitted a kernel while a call waited");
            thread::sleep(Duration::from_millis(50));
            assert_eq!(step.load(Ordering::SeqCst), 0);
            step.store(1, Ordering::SeqCst);
            drop(kernel);
        });
        assert_eq!(step.load(Ordering::SeqCst), 2);
        assert!(!wanted());
        assert!(admit().is_some());
    }
}
