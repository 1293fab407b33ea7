//! swapoff(2) run by a process of its own. For as long as swapoff moves
//! pages back, the kernel makes the process that called it the OOM
//! killer's first choice, ahead of any `oom_score_adj`
//! (`set_current_oom_origin` in mm/swapfile.c). Called by the daemon, a
//! stop or a give-back that RAM cannot quite take would get the daemon
//! killed, and with it every page still in VRAM. Called by a child, it
//! gets the child killed: swapoff then ends early, the kernel makes the
//! area swap again, and the daemon serves on and tries later.
//!
//! The child is this program run again, through `/proc/PID/exe`, so that
//! it has an address space of its own: the OOM killer kills every process
//! that shares the victim's, and a forked copy would share the daemon's
//! pages copy-on-write, so that its serving threads would fault in fresh
//! pages on their next writes.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use crate::uapi;

/// The argument that makes the program the child: `nbd-vram ARG FD`.
const ARG: &str = "--swapoff-child";

/// Runs swapoff of `dev`, a descriptor of this process, in a child whose
/// working directory is `fds` (this process's /proc/PID/fd): `Err` if no
/// child could be started, else what its swapoff returned. A child killed
/// by a signal (the OOM killer) counts as out of memory; one that could
/// not be waited for, as a failure: it ran, and may have been killed.
pub fn swapoff(dev: BorrowedFd, fds: &OwnedFd) -> io::Result<io::Result<()>> {
    let fd = CString::new(dev.as_raw_fd().to_string()).map_err(io::Error::other)?;
    let (argv, env) = command(&fd);
    let mut argv: Vec<*mut libc::c_char> = argv.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv.push(std::ptr::null_mut());
    let mut envp: Vec<*mut libc::c_char> = env.iter().map(|e| e.as_ptr().cast_mut()).collect();
    envp.push(std::ptr::null_mut());
    let pid = spawn(fds, &argv, &envp)?;
    let status = match reap(pid) {
        Ok(status) => status,
        Err(e) => return Ok(Err(io::Error::new(e.kind(), format!("waiting for its process: {e}")))),
    };
    Ok(match (libc::WIFEXITED(status), libc::WEXITSTATUS(status), libc::WTERMSIG(status)) {
        (true, 0, _) => Ok(()),
        (true, errno, _) => Err(io::Error::from_raw_os_error(errno)),
        (false, _, signal) => Err(io::Error::new(
            io::ErrorKind::OutOfMemory,
            format!("its process was killed by signal {signal}, by the OOM killer most likely"),
        )),
    })
}

/// The child's arguments and environment: this program, or under test the
/// test binary running `tests::child`.
fn command(fd: &CStr) -> (Vec<CString>, Vec<CString>) {
    #[cfg(test)]
    return tests::command(fd);
    #[cfg(not(test))]
    (vec![CString::from(c"nbd-vram"), CString::new(ARG).expect("no NUL inside"), fd.to_owned()], Vec::new())
}

/// posix_spawn of `../exe` from `fds`, which names this program whatever
/// root the daemon has now.
fn spawn(fds: &OwnedFd, argv: &[*mut libc::c_char], envp: &[*mut libc::c_char]) -> io::Result<libc::pid_t> {
    let mut actions = std::mem::MaybeUninit::<libc::posix_spawn_file_actions_t>::uninit();
    // SAFETY: init writes the whole structure, and a 0 return says it did.
    let r = unsafe { libc::posix_spawn_file_actions_init(actions.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    // SAFETY: initialised just above; destroyed below on every path.
    let actions = unsafe { actions.assume_init_mut() };
    // SAFETY: `actions` is initialised and `fds` an open directory for as
    // long as the child needs it (the spawn returns after its exec).
    let mut r = unsafe { libc::posix_spawn_file_actions_addfchdir_np(actions, fds.as_raw_fd()) };
    if cfg!(test) && r == 0 {
        // The test harness run as the child would print its own report.
        // SAFETY: as above; the path is NUL-terminated and static.
        r = unsafe { libc::posix_spawn_file_actions_addopen(actions, 1, c"/dev/null".as_ptr(), libc::O_WRONLY, 0) };
    }
    let mut pid = 0;
    if r == 0 {
        // SAFETY: the path is NUL-terminated, `argv` and `envp` are
        // NULL-terminated arrays of NUL-terminated strings that outlive the
        // call; the child keeps the calling thread's signal mask, so the
        // stop signals stay blocked in it too.
        r = unsafe { libc::posix_spawn(&mut pid, c"../exe".as_ptr(), actions, std::ptr::null(), argv.as_ptr(), envp.as_ptr()) };
    }
    // SAFETY: `actions` was initialised and is not used again.
    unsafe { libc::posix_spawn_file_actions_destroy(actions) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(pid)
}

/// Waits for the child `pid` to end: its wait status.
fn reap(pid: libc::pid_t) -> io::Result<libc::c_int> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes one int, `status`.
        if unsafe { libc::waitpid(pid, &mut status, 0) } == pid {
            return Ok(status);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The child's whole life, if this process was started as one: the exit
/// status to end with (0, or swapoff's errno).
pub fn run_if_asked() -> Option<u8> {
    let mut args = std::env::args_os().skip(1);
    if args.next()? != ARG {
        return None;
    }
    Some(run(&args.next()?))
}

fn run(fd: &std::ffi::OsStr) -> u8 {
    // Named for the kernel's log, which would say "exe" after the path.
    // SAFETY: prctl reads the NUL-terminated name, which is static.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"nbd-vram-off".as_ptr(), 0, 0, 0) };
    // Inherited from the daemon's thread: without it, this process's own
    // allocations may call the OOM killer on it, as they should.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(uapi::PR_SET_IO_FLUSHER as libc::c_int, 0, 0, 0, 0) };
    // The working directory is the daemon's /proc/PID/fd.
    match super::swapoff(std::path::Path::new(fd)) {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().and_then(|n| u8::try_from(n).ok()).unwrap_or(libc::EIO as u8),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::cell::Cell;
    use std::ffi::{CStr, CString};

    thread_local! {
        /// This thread's swapoff children are killed before they swap off.
        pub static KILLED: Cell<bool> = const { Cell::new(false) };
    }

    /// Where the test binary, run as the child, finds the descriptor, and
    /// whether it is to be killed before its swapoff, as by the OOM killer.
    const FD: &str = "NBD_VRAM_SWAPOFF_FD";
    const KILL: &str = "NBD_VRAM_SWAPOFF_KILLED";

    pub fn command(fd: &CStr) -> (Vec<CString>, Vec<CString>) {
        let arg = |s: &str| CString::new(s).unwrap();
        let args = ["nbd-vram-test", "swap::child::tests::child", "--exact", "--ignored"].map(arg).to_vec();
        let mut env = vec![arg(&format!("{FD}={}", fd.to_str().unwrap()))];
        if KILLED.get() {
            env.push(arg(&format!("{KILL}=1")));
        }
        (args, env)
    }

    /// The test binary as the child (`command`): exits with what `run`
    /// returns, whatever the test harness would say.
    #[test]
    #[ignore = "run by swapoff in a child"]
    fn child() {
        let Some(fd) = std::env::var_os(FD) else {
            return;
        };
        if std::env::var_os(KILL).is_some() {
            // SAFETY: a signal to this very process.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        std::process::exit(super::run(&fd).into());
    }
}
