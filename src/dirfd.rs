//! Opening a file relative to a directory descriptor: what a daemon
//! started from the initramfs needs where names no longer resolve after
//! switch_root (`swap`'s swapoff by descriptor, `reroot`).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `openat(dir or the working directory, name, flags | O_CLOEXEC)`, owned.
pub fn openat(dir: Option<&OwnedFd>, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    let at = dir.map_or(libc::AT_FDCWD, AsRawFd::as_raw_fd);
    // SAFETY: `name` is NUL-terminated and `at` an open directory (or
    // AT_FDCWD), both live for the call; the result is owned at once.
    let fd = unsafe { libc::openat(at, name.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
