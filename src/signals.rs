//! Signals as events: `main` blocks the ones the program takes before
//! anything else runs, so that every thread inherits the mask, and one
//! thread takes them with `sigtimedwait`; no handler ever runs in the
//! middle of the serve loop.
//!
//! Blocking them later is not enough: `cuInit` starts the driver's own
//! threads, and a process-directed SIGTERM goes to any thread that does
//! not block it, where its default action ends the whole process with
//! every swapped page still in VRAM.

use std::time::Duration;

pub const STOP: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];
/// Wakes the thread that takes signals: sent by a slice whose state
/// changed or whose thread ends, and by `resize` with a request.
pub const WAKE: libc::c_int = libc::SIGUSR1;

#[derive(Clone, Copy)]
pub struct Signals {
    set: libc::sigset_t,
}

impl Signals {
    /// Blocks `STOP` and `WAKE` in this thread and the threads it starts:
    /// the first thing `main` does, before any library is loaded.
    pub fn block() -> Signals {
        Signals::taken().blocked()
    }

    /// Blocks `WAKE` alone, in a command that serves nothing: `resize`
    /// wakes the pid a daemon's status file names, and should a daemon
    /// have died and its pid gone to this process since, the signal's
    /// default action would end it. The stop signals keep theirs.
    pub fn block_wake() {
        Signals::of(&[WAKE]).blocked();
    }

    /// The signals `block` blocked, to wait for; changes no mask.
    pub fn taken() -> Signals {
        Signals::of(&[STOP[0], STOP[1], STOP[2], WAKE])
    }

    fn of(sigs: &[libc::c_int]) -> Signals {
        // SAFETY: sigset_t is plain data that sigemptyset initialises.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a live sigset_t; the signal numbers are valid, so
        // these calls cannot fail.
        unsafe {
            libc::sigemptyset(&mut set);
            for sig in sigs {
                libc::sigaddset(&mut set, *sig);
            }
        }
        Signals { set }
    }

    fn blocked(self) -> Signals {
        // SAFETY: `set` is a live, initialised sigset_t; no old mask wanted.
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &self.set, std::ptr::null_mut()) };
        self
    }

    /// The next blocked signal, or `None` after `timeout`.
    pub fn wait(&self, timeout: Duration) -> Option<libc::c_int> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `set` and `ts` are live for the call; no siginfo wanted.
        let sig = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &ts) };
        (sig > 0).then_some(sig)
    }

    /// Job control must not stop the swap daemon: a stop wakes the thread
    /// in NBD_DO_IT, whose wait the kernel then takes for interrupted, and
    /// it ends the device under swap (drivers/block/nbd.c). So the
    /// terminal's stop signals are ignored; SIGSTOP, a debugger attaching
    /// and a cgroup freeze do the same and cannot be refused.
    pub fn ignore_job_control() {
        for sig in [libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU] {
            // SAFETY: sets a catchable signal to be ignored; no handler is
            // installed, so nothing runs in any thread because of it.
            unsafe { libc::signal(sig, libc::SIG_IGN) };
        }
    }

    /// The swap daemon waits for its swapoff children, whose end tells
    /// whether RAM took the pages back (`swap::child`): a SIGCHLD ignored
    /// by whoever started it, which exec keeps, would have the kernel
    /// reap them unseen.
    pub fn wait_for_children() {
        // SAFETY: sets SIGCHLD to its default action, which ignores it
        // without reaping; no handler is installed.
        unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
    }

    /// Sends `sig` to this process, for the thread that waits to take.
    pub fn raise(sig: libc::c_int) {
        // SAFETY: kill on our own pid with a valid signal number.
        unsafe { libc::kill(libc::getpid(), sig) };
    }

    /// Ends the process at once, skipping exit handlers: another thread
    /// may be inside libcuda, whose handlers would tear it down under it.
    pub fn exit_now(code: i32) -> ! {
        crate::log::flush();
        // SAFETY: _exit only ends the process; nothing is left to unwind.
        unsafe { libc::_exit(code) }
    }
}
