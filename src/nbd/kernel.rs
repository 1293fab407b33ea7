//! The kernel side: raw ioctls on /dev/nbdN, one method each, on a type
//! that owns the open device.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::uapi as sys;

/// An open /dev/nbdN. Ioctls take `&self`: `do_it` blocks in one thread
/// while another calls `disconnect`, as the kernel intends.
pub struct NbdDevice {
    file: File,
    path: PathBuf,
}

/// Why a device cannot be used.
#[derive(Debug)]
pub enum OpenError {
    /// No /dev/nbdN: the nbd module is not loaded.
    NoModule(PathBuf),
    /// Another server (this pid, this program) has it.
    Busy { path: PathBuf, pid: u32, comm: String },
    Os(PathBuf, io::Error),
    /// `auto` found every device in use.
    NoneFree,
    /// No such device, or one that is no NBD device: why.
    NotNbd(String),
}

impl NbdDevice {
    /// Opens `path` if no server is attached to it. A device in use is an
    /// error, never taken over.
    pub fn open(path: &Path) -> Result<NbdDevice, OpenError> {
        if !path.exists() && !Path::new("/sys/module/nbd").exists() {
            return Err(OpenError::NoModule(path.to_path_buf()));
        }
        if let Some(why) = not_nbd(path) {
            return Err(OpenError::NotNbd(why));
        }
        if let Some((pid, comm)) = server_of(path) {
            return Err(OpenError::Busy { path: path.to_path_buf(), pid, comm });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| OpenError::Os(path.to_path_buf(), e))?;
        Ok(NbdDevice { file, path: path.to_path_buf() })
    }

    /// The first /dev/nbdN with no server, in numeric order, passing over
    /// `skip` (devices another starter took between our look and our claim).
    pub fn open_first_free(skip: &[PathBuf]) -> Result<NbdDevice, OpenError> {
        let mut numbers: Vec<u32> = fs::read_dir("/sys/block")
            .map_err(|e| OpenError::Os("/sys/block".into(), e))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("nbd")?.parse().ok())
            .collect();
        if numbers.is_empty() {
            return Err(OpenError::NoModule("/dev/nbd0".into()));
        }
        numbers.sort_unstable();
        for n in numbers {
            let path = PathBuf::from(format!("/dev/nbd{n}"));
            if skip.contains(&path) {
                continue;
            }
            match NbdDevice::open(&path) {
                Err(OpenError::Busy { .. }) => continue,
                other => return other,
            }
        }
        Err(OpenError::NoneFree)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn ioctl(&self, name: &str, request: u32, arg: libc::c_ulong) -> io::Result<()> {
        // SAFETY: every NBD ioctl takes its argument by value (a number or a
        // descriptor), never a pointer, so no memory is lent to the kernel.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::c_ulong::from(request), arg) };
        if r < 0 {
            // The raw errno stays, so that callers can tell EBUSY from EPERM.
            let e = io::Error::last_os_error();
            crate::debug!("{}: {name}: {e}", self.path.display());
            return Err(e);
        }
        Ok(())
    }

    /// Sizes the device in 4 KiB blocks (the page size swap uses), says
    /// which commands the server takes, and how long the kernel waits for a
    /// reply (0: the kernel default, which only warns and waits on).
    pub fn configure(&self, size: u64, flags: u16, timeout: u32) -> io::Result<()> {
        self.ioctl("NBD_SET_BLKSIZE", sys::NBD_VRAM_SET_BLKSIZE, 4096)?;
        self.ioctl("NBD_SET_SIZE_BLOCKS", sys::NBD_VRAM_SET_SIZE_BLOCKS, (size / 4096) as libc::c_ulong)?;
        self.ioctl("NBD_SET_FLAGS", sys::NBD_VRAM_SET_FLAGS, libc::c_ulong::from(flags))?;
        if timeout > 0 {
            self.ioctl("NBD_SET_TIMEOUT", sys::NBD_VRAM_SET_TIMEOUT, libc::c_ulong::from(timeout))?;
        }
        Ok(())
    }

    /// Hands the kernel its end of the socketpair.
    pub fn set_sock(&self, sock: &OwnedFd) -> io::Result<()> {
        self.ioctl("NBD_SET_SOCK", sys::NBD_VRAM_SET_SOCK, sock.as_raw_fd() as libc::c_ulong)
    }

    /// Runs the device: blocks until it is disconnected.
    pub fn do_it(&self) -> io::Result<()> {
        self.ioctl("NBD_DO_IT", sys::NBD_VRAM_DO_IT, 0)
    }

    /// Asks the kernel to send `NBD_CMD_DISC` and end `do_it`.
    pub fn disconnect(&self) -> io::Result<()> {
        self.ioctl("NBD_DISCONNECT", sys::NBD_VRAM_DISCONNECT, 0)
    }

    /// Has the block layer split every read and write into requests of
    /// `bytes` at most (`max_sectors_kb`), and checks that it took:
    /// the serve loop refuses a longer one, which for swap would lose a page.
    pub fn limit_requests(&self, bytes: usize) -> io::Result<()> {
        let file = sysfs_dir(&self.path).join("queue/max_sectors_kb");
        let kib = bytes / 1024;
        fs::write(&file, kib.to_string())?;
        let now: usize = fs::read_to_string(&file)?.trim().parse().map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        if now > kib {
            return Err(io::Error::other(format!("max_sectors_kb stayed at {now}")));
        }
        Ok(())
    }

    /// Forgets the socket, so the device can be attached again.
    pub fn clear_sock(&self) -> io::Result<()> {
        self.ioctl("NBD_CLEAR_SOCK", sys::NBD_VRAM_CLEAR_SOCK, 0)
    }
}

/// For swapoff by descriptor (`swap::Swapoff`).
impl AsFd for NbdDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// The device `path` names: a link to it (a udev alias) is followed, as
/// the kernel's sysfs and /proc/swaps know it only as /dev/nbdN.
pub fn resolve(path: &Path) -> PathBuf {
    fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The nbd driver's block major (include/uapi/linux/major.h).
const NBD_MAJOR: u32 = 43;

/// Why `path` is no NBD device (not there, a disk, zram, a file), if it
/// is none: a swap area there is someone else's.
pub fn not_nbd(path: &Path) -> Option<String> {
    let Ok(meta) = fs::metadata(path) else { return Some(format!("{}: no such device", path.display())) };
    match meta.file_type().is_block_device() && libc::major(meta.rdev()) == NBD_MAJOR {
        true => None,
        false => Some(format!("{}: not an NBD device (/dev/nbdN)", path.display())),
    }
}

/// /sys/block/nbdN for /dev/nbdN.
pub fn sysfs_dir(dev: &Path) -> PathBuf {
    let name = dev.file_name().map_or_else(Default::default, |n| n.to_owned());
    Path::new("/sys/block").join(name)
}

/// The process serving `dev`, if any: the kernel publishes the pid of the
/// `NBD_DO_IT` caller (a thread id) while the device runs.
pub fn server_of(dev: &Path) -> Option<(u32, String)> {
    let tid: u32 = fs::read_to_string(sysfs_dir(dev).join("pid")).ok()?.trim().parse().ok()?;
    let status = fs::read_to_string(format!("/proc/{tid}/status")).unwrap_or_default();
    let field = |key: &str| status.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_string());
    let pid = field("Tgid:").and_then(|v| v.parse().ok()).unwrap_or(tid);
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).map(|c| c.trim().to_string());
    Some((pid, comm.unwrap_or_else(|_| "exited".into())))
}

/// The device's size in 512-byte sectors as the block layer sees it.
pub fn sectors(dev: &Path) -> u64 {
    fs::read_to_string(sysfs_dir(dev).join("size")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}
