//! `nbd-vram stop DEVICE`: for an administrator. Asks the daemon serving
//! DEVICE to swapoff and detach, and waits until it has exited, so that no
//! one frees VRAM the kernel may still read.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use crate::fail::{Code, Failure};
use crate::nbd::kernel;
use crate::{info, status, swap};

/// swapoff of many GiB can take minutes; systemd's stop timeout bounds us too.
const PATIENCE: Duration = Duration::from_secs(600);

pub fn stop(dev: &Path) -> Result<(), Failure> {
    let dev = &kernel::resolve(dev);
    if let Some(why) = kernel::not_nbd(dev) {
        return Err(Failure::new(Code::Usage, why));
    }
    let Some((pid, comm)) = kernel::server_of(dev) else {
        if swap::active(dev).is_some() {
            return Err(Failure::new(
                Code::Swap,
                format!("{} is swap but no daemon serves it (it died; its pages are lost): run `swapoff {}`", dev.display(), dev.display()),
            ));
        }
        // The device a daemon is known by is the one it started on, which
        // `--reserve` or `resize` may have given back.
        if let Some((pid, name)) = status::started_on(dev) {
            info!("{} was given back by {name} (pid {pid}), which started on it and serves on: stopping it", dev.display());
            return terminate(pid, dev);
        }
        info!("{} is not attached: nothing to stop", dev.display());
        return Ok(());
    };
    if comm != "nbd-vram" {
        return Err(Failure::new(Code::Busy, format!("{} is served by pid {pid} ({comm}), not by nbd-vram", dev.display())));
    }
    terminate(pid, dev)
}

/// SIGTERM to the daemon `pid`, then waits until it has exited.
fn terminate(pid: u32, dev: &Path) -> Result<(), Failure> {
    let files = status::files_of(pid);
    // SAFETY: kill with the pid of an nbd-vram (the kernel's server of
    // the device, or a live instance's status) and a valid signal.
    if unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) } < 0 {
        return Err(Failure::os(format!("signalling pid {pid}"), std::io::Error::last_os_error()));
    }
    info!("asked pid {pid} to stop {}; waiting for swapoff and detach", dev.display());
    let start = Instant::now();
    // Its exit status is its parent's to see: what its status file says
    // meanwhile is ours.
    let mut failed = false;
    while running(pid) {
        failed |= status::failed(&files);
        if start.elapsed() > PATIENCE {
            return Err(Failure::new(
                Code::Swap,
                format!("pid {pid} still runs after {} s (swapoff waits for free RAM); see its log", PATIENCE.as_secs()),
            ));
        }
        thread::sleep(Duration::from_millis(100));
    }
    // A failure in its last second is in the file it leaves behind.
    failed |= status::failed(&files);
    if failed {
        return Err(Failure::new(Code::Other, format!("{} stopped, but its store had failed: pages swapped to it may be lost (see the daemon's log)", dev.display())));
    }
    info!("{} stopped", dev.display());
    Ok(())
}

/// Alive and not a zombie: a parent that has not reaped it yet (a shell in
/// an initramfs, say) must not make us wait for ever.
fn running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the command name, which is in parentheses.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    state != Some("Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon whose store fails in its last moment, after the last look
    /// at its status file while it ran, is still reported failed: the
    /// file it leaves behind is read once it has exited.
    #[test]
    fn a_failure_published_as_the_daemon_exits_is_seen() {
        std::fs::create_dir_all(status::DIR).unwrap();
        let dir = std::env::temp_dir().join(format!("nbd-vram-stop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A shell named nbd-vram, as the kernel names a process after the
        // file it runs, that publishes a healthy file and, on SIGTERM, a
        // failed one, and exits at once.
        std::os::unix::fs::symlink("/bin/sh", dir.join("nbd-vram")).unwrap();
        let ready = dir.join("ready");
        let file = |state: u8| format!("printf \"pid=%s\\nupdated=%s\\nfailed={state}\\n\" $$ $(date +%s) > {}/test-stop-$$.status", status::DIR);
        let script = format!("trap '{}; exit 0' TERM; {}; : > {}; while :; do sleep 0.02; done", file(1), file(0), ready.display());
        let mut daemon = std::process::Command::new(dir.join("nbd-vram")).args(["-c", &script]).spawn().unwrap();
        let started = Instant::now();
        while !ready.exists() {
            assert!(started.elapsed() < Duration::from_secs(10), "the stand-in daemon never got ready");
            thread::sleep(Duration::from_millis(10));
        }
        let stopped = terminate(daemon.id(), Path::new("/dev/nbd-test"));
        let _ = daemon.wait();
        let _ = std::fs::remove_file(format!("{}/test-stop-{}.status", status::DIR, daemon.id()));
        let _ = std::fs::remove_dir_all(&dir);
        let e = stopped.expect_err("a store that failed was reported stopped cleanly");
        assert!(e.to_string().contains("its store had failed"), "{e}");
    }
}
