//! Following init into its new root. A daemon started from the initramfs
//! outlives switch_root, which moves /dev, /proc, /sys and /run into the
//! new root and makes that init's root, but leaves every other process in
//! the old one, emptied. Serving, status and stopping go by descriptor and
//! need none of those names; taking a slice again (`--reserve`, `resize`)
//! finds devices, /proc/swaps and requests by name. So the daemon moves
//! its root where init's went.

use std::ffi::CStr;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::dirfd::openat;
use crate::{info, uapi, warn};

/// Init's root, watched through /proc opened at start (a descriptor
/// follows the mount where switch_root moves it).
pub struct InitRoot {
    proc: OwnedFd,
    /// Init's root as last seen: device and inode.
    seen: (u64, u64),
}

impl InitRoot {
    /// Only for a process that shares init's root, and where that root is
    /// the initramfs (ramfs or tmpfs): a daemon started in a chroot or a
    /// container stays where it was put, and one started from the real
    /// root has nothing to follow.
    pub fn watch() -> Option<InitRoot> {
        let proc = openat(None, c"/proc", libc::O_PATH | libc::O_DIRECTORY).ok()?;
        let init = identity(&proc, c"1/root").ok()?;
        let ours = identity(&proc, c"self/root").ok()?;
        (init == ours && initramfs().unwrap_or(false)).then_some(InitRoot { proc, seen: init })
    }

    /// Moves this process's root (that of every thread sharing it) to
    /// init's, if init's moved since the last look. Once a second from the
    /// daemon's own thread; never from a serving one.
    pub fn follow(&mut self) {
        let Ok(now) = identity(&self.proc, c"1/root") else { return };
        if now == self.seen {
            return;
        }
        self.seen = now;
        match enter(&self.proc) {
            Ok(()) => info!("init's root changed (switch_root): following it, so that devices, /proc/swaps and resize requests are found"),
            Err(e) => warn!("init's root changed (switch_root), and following it failed: {e}; --reserve and resize no longer take slices"),
        }
    }
}

/// Where the initramfs scripts note the PID of the daemon they started,
/// which keeps the systemd units from starting another.
const MARKER: &str = "/run/nbd-vram/initramfs";

/// Removes the note of this daemon as it ends, so that the units can
/// start one again; after switch_root it is found where init's root went.
pub fn forget_marker() {
    forget_marker_at(std::path::Path::new(MARKER));
}

fn forget_marker_at(path: &std::path::Path) {
    let ours = std::fs::read_to_string(path).is_ok_and(|pid| pid.trim() == std::process::id().to_string());
    if ours {
        if let Err(e) = std::fs::remove_file(path) {
            warn!("{}: {e}; the systemd units skip themselves while it exists", path.display());
        }
    }
}

/// The device and inode `name` (under `proc`) leads to.
fn identity(proc: &OwnedFd, name: &CStr) -> io::Result<(u64, u64)> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `name` is NUL-terminated, `proc` an open directory and `st`
    // room for one stat, which fstatat fills when it returns 0.
    if unsafe { libc::fstatat(proc.as_raw_fd(), name.as_ptr(), st.as_mut_ptr(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: filled by the successful call above.
    let st = unsafe { st.assume_init() };
    Ok((st.st_dev, st.st_ino))
}

/// Whether this process's root is an initramfs: ramfs or tmpfs.
fn initramfs() -> io::Result<bool> {
    let mut fs = MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: the path is NUL-terminated and `fs` room for one statfs.
    if unsafe { libc::statfs(c"/".as_ptr(), fs.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: filled by the successful call above.
    let kind = unsafe { fs.assume_init() }.f_type;
    Ok(kind == libc::c_long::from(uapi::RAMFS_MAGIC) || kind == libc::TMPFS_MAGIC)
}

/// chroot to init's root, with the working directory there first, as
/// switch_root itself leaves it.
fn enter(proc: &OwnedFd) -> io::Result<()> {
    let root = openat(Some(proc), c"1/root", libc::O_PATH | libc::O_DIRECTORY)?;
    // SAFETY: fchdir and chroot take a live directory descriptor and a
    // NUL-terminated path; neither touches our memory.
    let moved = unsafe { libc::fchdir(root.as_raw_fd()) == 0 && libc::chroot(c".".as_ptr()) == 0 };
    if !moved {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_whose_root_is_no_initramfs_watches_nothing() {
        // The build machine's root is a disk or an overlay, never ramfs.
        if initramfs().unwrap() {
            return;
        }
        assert!(InitRoot::watch().is_none());
    }

    /// Only this daemon's own note goes: another daemon may have started
    /// from the initramfs, and its note keeps the units off still.
    #[test]
    fn only_this_daemons_note_is_forgotten() {
        let path = std::env::temp_dir().join(format!("nbd-vram-marker-{}", std::process::id()));
        std::fs::write(&path, format!("{}\n", std::process::id() + 1)).unwrap();
        forget_marker_at(&path);
        assert!(path.exists(), "another daemon's note was removed");
        std::fs::write(&path, format!("{}\n", std::process::id())).unwrap();
        forget_marker_at(&path);
        assert!(!path.exists(), "this daemon's note was kept");
    }

    #[test]
    fn init_and_this_process_are_seen_through_proc() {
        let proc = openat(None, c"/proc", libc::O_PATH | libc::O_DIRECTORY).unwrap();
        let ours = identity(&proc, c"self/root").unwrap();
        let root = std::fs::metadata("/").unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(ours, (root.dev(), root.ino()));
    }
}
