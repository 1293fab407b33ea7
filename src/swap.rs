//! Swap by itself, no util-linux: the swap header, swapon(2), swapoff(2)
//! and what /proc/swaps says.

use std::cell::Cell;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::uapi;

mod child;
pub use child::run_if_asked as run_child_if_asked;

pub const PAGE: usize = 4096;
/// The smallest swap area: mkswap's minimum of 10 pages.
pub const MIN_SIZE: u64 = 10 * PAGE as u64;
const LABEL: &[u8] = b"nbd-vram";

/// The first page of a swap area, as mkswap writes it: `SWAPSPACE2`
/// magic at the page's end, version 1, the last usable page, no bad pages,
/// a random version-4 UUID and a label (`union swap_header` in
/// include/linux/swap.h).
pub fn header(size: u64) -> io::Result<[u8; PAGE]> {
    let pages = size / PAGE as u64;
    if size < MIN_SIZE {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "swap needs at least 10 pages (40 KiB)"));
    }
    let last = u32::try_from(pages - 1)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "swap areas end at 16 TiB"))?;
    let mut page = [0u8; PAGE];
    page[1024..1028].copy_from_slice(&1u32.to_ne_bytes());
    page[1028..1032].copy_from_slice(&last.to_ne_bytes());
    let uuid = &mut page[1036..1052];
    getrandom(uuid)?;
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    page[1052..1052 + LABEL.len()].copy_from_slice(LABEL);
    page[PAGE - 10..].copy_from_slice(b"SWAPSPACE2");
    Ok(page)
}

fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is valid for writes of its length.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            done += n as usize;
        }
    }
    Ok(())
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

pub fn swapon(path: &Path, priority: i32, discard: bool) -> io::Result<()> {
    let mut flags = uapi::SWAP_FLAG_PREFER | (priority as u32 & uapi::SWAP_FLAG_PRIO_MASK);
    if discard {
        flags |= uapi::SWAP_FLAG_DISCARD;
    }
    let path = c_path(path)?;
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    if unsafe { libc::swapon(path.as_ptr(), flags as libc::c_int) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn swapoff(path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    if unsafe { libc::swapoff(path.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// swapoff(2) of a device this process holds open, named by its
/// descriptor. A daemon started from the initramfs keeps the old root after
/// switch_root until it follows init (`reroot`), or for good where that
/// fails: /dev/nbdN and /proc no longer resolve there, but the
/// descriptor still names the device. swapoff takes only a path, so the
/// path is the descriptor's number, looked up with /proc/self/fd as the
/// working directory, a directory opened while /proc could still be
/// reached by name.
pub struct Swapoff<'a> {
    path: &'a Path,
    dev: BorrowedFd<'a>,
    /// /proc/self/fd, and the working directory to return to; `None` if
    /// /proc was not mounted when this was made: then the name is all
    /// there is.
    dirs: Option<(OwnedFd, OwnedFd)>,
    /// Said once that no child could be had: a stop retries for long.
    told_no_child: Cell<bool>,
}

/// What one swapoff found.
pub enum Outcome {
    Off,
    /// The device is not a swap area (any more). Something else may hold
    /// it all the same (a mounted file system): only a `Claim` tells.
    NotSwap,
    /// Another swapoff of it (systemd's `dev-nbdN.swap` unit, an
    /// administrator's) is still moving its pages back: the kernel takes an
    /// area off its list of active ones as a swapoff starts, so this one
    /// was refused as for no swap area, but the device is still held, and
    /// listed in /proc/swaps, and its pages still need serving. If that
    /// swapoff fails, the area is swap again.
    Elsewhere,
    /// Still swap, as far as anyone can tell: ENOMEM while RAM cannot take
    /// the pages back, or whatever else the kernel said.
    Failed(io::Error),
}

impl<'a> Swapoff<'a> {
    pub fn new(path: &'a Path, dev: BorrowedFd<'a>) -> Swapoff<'a> {
        let dir = |p: &CStr| crate::dirfd::openat(None, p, libc::O_PATH | libc::O_DIRECTORY);
        let dirs = dir(c"/proc/self/fd").and_then(|fds| Ok((fds, dir(c".")?))).ok();
        Swapoff { path, dev, dirs, told_no_child: Cell::new(false) }
    }

    /// The device's name, for messages.
    pub fn path(&self) -> &'a Path {
        self.path
    }

    /// Claims the device if nothing else holds it (`Claim`). Without /proc
    /// at start, nobody can tell: `Claim::Unknown`.
    pub fn claim(&self) -> io::Result<Claim> {
        match &self.dirs {
            Some((fds, _)) => Ok(claim_by(self.dev, fds)?.map_or(Claim::Taken, |fd| Claim::Ours { _open: fd })),
            None => Ok(Claim::Unknown),
        }
    }

    /// Moves every page back into RAM first, so it can take long or fail.
    /// Runs in a child process (`child`), which an out-of-memory moment
    /// meanwhile costs its life, not the daemon's; here only where no
    /// child can be had: without /proc at start, or without the program's
    /// loader in a root the daemon could not leave at switch_root.
    pub fn run(&self) -> Outcome {
        let _room = match UnderWay::take(self.path) {
            Ok(room) => room,
            Err(short) => return Outcome::Failed(short),
        };
        let result = match &self.dirs {
            Some((fds, cwd)) => match child::swapoff(self.dev, fds) {
                Ok(done) => done,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOMEM | libc::EAGAIN)) => Err(e),
                Err(e) => {
                    if !self.told_no_child.replace(true) {
                        crate::warn!("{}: no process for its swapoff ({e}): swapping off from the daemon itself", self.path.display());
                    }
                    by_descriptor(self.dev, fds, cwd)
                }
            },
            None => swapoff(self.path),
        };
        self.outcome(result)
    }

    /// What swapoff's `result` means for the device.
    fn outcome(&self, result: io::Result<()>) -> Outcome {
        match result {
            Ok(()) => Outcome::Off,
            // The kernel's answer for a file that is not on its list of
            // swap areas, which is also what a second swapoff gets while
            // another one runs.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => match &self.dirs {
                // By descriptor that file is the device itself. Swap holds
                // a block device exclusively until the last page is back,
                // and /proc/swaps lists it until then; a mount holds it
                // too, unlisted.
                Some((fds, _)) => match claim_by(self.dev, fds) {
                    Ok(Some(_)) => Outcome::NotSwap,
                    Ok(None) if lookup(self.path).is_some_and(|a| a.is_none()) => Outcome::NotSwap,
                    Ok(None) => Outcome::Elsewhere,
                    Err(e) => Outcome::Failed(e),
                },
                // A name may now lead elsewhere, so /proc/swaps must agree.
                None => match lookup(self.path) {
                    Some(None) => Outcome::NotSwap,
                    Some(Some(_)) => Outcome::Elsewhere,
                    None => Outcome::Failed(e),
                },
            },
            Err(e) => Outcome::Failed(e),
        }
    }
}

fn by_descriptor(dev: BorrowedFd, fds: &OwnedFd, cwd: &OwnedFd) -> io::Result<()> {
    let name = dev.as_raw_fd().to_string();
    // SAFETY: unshare(CLONE_FS) touches no memory; from now on this
    // thread's working directory is its own, so that the fchdir below
    // moves no other thread's (two slices swap off at once at a stop).
    if unsafe { libc::unshare(libc::CLONE_FS) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fchdir takes a directory descriptor that `fds` keeps open.
    if unsafe { libc::fchdir(fds.as_raw_fd()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let r = swapoff(Path::new(&name));
    // SAFETY: as above; `cwd` stays open. Should it fail, this thread's
    // working directory stays /proc/self/fd, which it resolves nothing in.
    unsafe { libc::fchdir(cwd.as_raw_fd()) };
    r
}

/// What an exclusive open of the device found (open(2): O_EXCL without
/// O_CREAT on a block device). It fails with EBUSY while anything else
/// holds the device so, as swap does until its swapoff has moved every
/// page back and a mounted file system does; once it succeeds, no swapon
/// and no mount can take the device until it is closed.
pub enum Claim {
    /// Nothing else held it; nothing else can while this is open.
    Ours { _open: OwnedFd },
    /// Something holds it: a swap area, a mounted file system.
    Taken,
    /// Without /proc at start, nobody can tell, or keep it.
    Unknown,
}

/// An exclusive open of the block device `dev`, reopened through
/// /proc/self/fd; `None` if something else holds it.
fn claim_by(dev: BorrowedFd, fds: &OwnedFd) -> io::Result<Option<OwnedFd>> {
    let name = c_path(Path::new(&dev.as_raw_fd().to_string()))?;
    match crate::dirfd::openat(Some(fds), &name, libc::O_RDONLY | libc::O_EXCL) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Refuses a swapoff that RAM cannot take, before it starts, as strict
/// overcommit would: under the default heuristic the kernel starts it all
/// the same, pulls pages in until memory runs out, and the OOM killer
/// takes the process that called swapoff (`child`), which first spends
/// the last reserves, and others may go with it. Room is what
/// /proc/meminfo counts available, less 1/64 of RAM, plus what the other
/// swap areas have free; nothing is refused where /proc cannot tell.
///
/// A stop swaps every slice off at once: what one swapoff under way will
/// read back is no room for another, nor is its area's free space. So
/// each is looked at in turn and, let through, counted here until it ends.
struct UnderWay(u64);

/// This process's swapoffs under way, each with an id of its own.
static UNDER_WAY: Mutex<Vec<(u64, PathBuf)>> = Mutex::new(Vec::new());
static NEXT: AtomicU64 = AtomicU64::new(0);

impl UnderWay {
    /// `path`'s room, counted until the guard drops; `Err` if too little.
    fn take(path: &Path) -> io::Result<UnderWay> {
        let mut under_way = UNDER_WAY.lock().unwrap_or_else(PoisonError::into_inner);
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let going: Vec<&Path> = under_way.iter().map(|(_, p)| p.as_path()).collect();
        if let Some((need, room)) = shortage_in(&table(), &meminfo, path, &going) {
            let others = match going.len() {
                0 => String::new(),
                n => format!(", while {n} other swapoff(s) of this daemon run"),
            };
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("{} MiB to read back, room for {} MiB in RAM and other swap{others}", need >> 10, room >> 10),
            ));
        }
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        under_way.push((id, path.to_path_buf()));
        Ok(UnderWay(id))
    }
}

impl Drop for UnderWay {
    fn drop(&mut self) {
        let mut under_way = UNDER_WAY.lock().unwrap_or_else(PoisonError::into_inner);
        under_way.retain(|(id, _)| *id != self.0);
    }
}

/// The shortage for `path` on copies of /proc/swaps and /proc/meminfo,
/// beside the swapoffs under way of `going`, which will read back what
/// their areas still hold (what they read back so far is in RAM, and
/// counts against what is available): KiB needed and KiB of room, if too
/// little.
fn shortage_in(swaps: &str, meminfo: &str, path: &Path, going: &[&Path]) -> Option<(u64, u64)> {
    let need = entry(swaps, path)?.used_kib;
    let kib = |key: &str| meminfo.lines().find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok());
    let (available, total) = (kib("MemAvailable:")?, kib("MemTotal:")?);
    let (mut elsewhere, mut taken) = (0, 0);
    for (p, area) in areas(swaps) {
        match p {
            p if p == path => {}
            p if going.contains(&p) => taken += area.used_kib,
            _ => elsewhere += area.size_kib.saturating_sub(area.used_kib),
        }
    }
    let room = (available + elsewhere).saturating_sub(total / 64 + taken);
    (need > room).then_some((need, room))
}

/// One line of /proc/swaps.
#[derive(Debug, PartialEq, Eq)]
pub struct Active {
    pub size_kib: u64,
    pub used_kib: u64,
    pub priority: i32,
}

/// `path`'s entry in /proc/swaps, if it is swap now.
pub fn active(path: &Path) -> Option<Active> {
    lookup(path).flatten()
}

/// `path`'s line of /proc/swaps, if any; `None` if it cannot be read.
fn lookup(path: &Path) -> Option<Option<Active>> {
    Some(entry(&std::fs::read_to_string("/proc/swaps").ok()?, path))
}

/// /proc/swaps, for `entry` to look up several devices in one read; empty
/// if it cannot be read.
pub fn table() -> String {
    std::fs::read_to_string("/proc/swaps").unwrap_or_default()
}

/// `path`'s line in `text`, a copy of /proc/swaps.
pub fn entry(text: &str, path: &Path) -> Option<Active> {
    areas(text).find_map(|(p, area)| (p == path).then_some(area))
}

/// Every area of `text`, a copy of /proc/swaps, by path.
fn areas(text: &str) -> impl Iterator<Item = (&Path, Active)> {
    text.lines().skip(1).filter_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 {
            return None;
        }
        Some((Path::new(f[0]), Active { size_kib: f[2].parse().ok()?, used_kib: f[3].parse().ok()?, priority: f[4].parse().ok()? }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn header_matches_mkswap_layout() {
        let h = header(64 << 20).unwrap();
        assert_eq!(&h[PAGE - 10..], b"SWAPSPACE2");
        assert_eq!(u32::from_ne_bytes(h[1024..1028].try_into().unwrap()), 1);
        assert_eq!(u32::from_ne_bytes(h[1028..1032].try_into().unwrap()), 16383);
        assert_eq!(h[1042] >> 4, 4, "UUID version 4");
        assert_eq!(&h[1052..1060], b"nbd-vram");
        assert_ne!(header(64 << 20).unwrap()[1036..1052], h[1036..1052], "UUIDs differ");
        assert!(header(9 * 4096).is_err());
        assert!(header(1 << 45).is_err());
    }

    /// Root (CI) gets real answers; elsewhere swapoff says EPERM (or ENOSYS
    /// on a kernel without swap) before it looks at the path, so those
    /// runs check the working directory only.
    fn judged(outcome: Outcome) -> Option<Outcome> {
        match outcome {
            Outcome::Failed(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOSYS)) => {
                eprintln!("swapoff cannot be judged here: {e}");
                None
            }
            other => Some(other),
        }
    }

    #[test]
    fn swapoff_goes_by_the_descriptor_and_keeps_the_working_directory() {
        let path = std::env::temp_dir().join(format!("nbd-vram-swapoff-test-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let cwd = std::env::current_dir().unwrap();
        // A name that no longer resolves, as after switch_root: the
        // descriptor still finds the file, which is no swap area.
        let gone = Path::new("/nonexistent/nbd0");
        let off = Swapoff::new(gone, file.as_fd());
        assert!(off.dirs.is_some(), "/proc/self/fd opens");
        let by_fd = judged(off.run());
        assert_eq!(std::env::current_dir().unwrap(), cwd);
        assert!(matches!(by_fd, None | Some(Outcome::NotSwap)));
        // By name alone, a name that leads nowhere proves nothing: still
        // swap as far as anyone can tell.
        let by_name = Swapoff { dirs: None, ..off };
        match judged(by_name.run()) {
            None => {}
            Some(Outcome::Failed(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT)),
            Some(_) => panic!("a name that leads nowhere was taken for an answer"),
        }
        // A name that leads to a file /proc/swaps does not list: not swap.
        let named = Swapoff { dirs: None, ..Swapoff::new(&path, file.as_fd()) };
        assert!(matches!(judged(named.run()), None | Some(Outcome::NotSwap)));
        std::fs::remove_file(&path).unwrap();
    }

    /// A swapoff whose process the OOM killer took: still swap, for want
    /// of RAM, and the daemon that asked for it lives on. Without a child
    /// (the swapoff run by the daemon itself) nothing is killed, and the
    /// plain file is found to be no swap area.
    #[test]
    fn a_swapoff_killed_by_the_oom_killer_costs_only_its_own_process() {
        let path = std::env::temp_dir().join(format!("nbd-vram-swapoff-killed-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let off = Swapoff::new(Path::new("/nonexistent/nbd0"), file.as_fd());
        child::tests::KILLED.set(true);
        let outcome = off.run();
        child::tests::KILLED.set(false);
        std::fs::remove_file(&path).unwrap();
        match outcome {
            Outcome::Failed(e) => {
                assert_eq!(e.kind(), io::ErrorKind::OutOfMemory, "{e}");
                assert!(e.to_string().contains("killed by signal 9"), "{e}");
            }
            _ => panic!("a swapoff whose process was killed was taken for an answer: was there a process?"),
        }
    }

    /// Started with SIGCHLD ignored, the daemon still sees what became of
    /// its swapoff child: were it reaped unseen, a swapoff the OOM killer
    /// ended would be run again by the daemon itself, which the OOM killer
    /// then picks first. Run in a process of its own, as the disposition
    /// is the whole process's and other tests wait for children.
    #[test]
    fn an_inherited_ignored_sigchld_does_not_hide_the_swapoff_child() {
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args(["swap::tests::sigchld_ignored_at_start", "--exact", "--ignored", "--test-threads=1"])
            .env(SIGCHLD_IGNORED, "1")
            .output()
            .unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "the test in a process of its own failed ({}):\n{said}", out.status);
        assert!(said.contains("1 passed"), "the test in a process of its own did not run:\n{said}");
    }

    const SIGCHLD_IGNORED: &str = "NBD_VRAM_TEST_SIGCHLD_IGNORED";

    #[test]
    #[ignore = "run in a process of its own by an_inherited_ignored_sigchld_does_not_hide_the_swapoff_child"]
    fn sigchld_ignored_at_start() {
        if std::env::var_os(SIGCHLD_IGNORED).is_none() {
            return;
        }
        // SAFETY: this process runs this test alone.
        unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
        crate::signals::Signals::wait_for_children();
        a_swapoff_killed_by_the_oom_killer_costs_only_its_own_process();
    }

    /// Two slices swap off at once at a stop, from the daemon itself where
    /// no child can be had: each thread's lookup by descriptor must find
    /// its own file, never the other's working directory (ENOENT) or a
    /// file of that name there.
    #[test]
    fn swapoffs_on_two_threads_each_find_their_own_device() {
        let dir = std::env::temp_dir().join(format!("nbd-vram-swapoff-threads-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files: Vec<std::fs::File> = (0..2).map(|i| std::fs::File::create(dir.join(i.to_string())).unwrap()).collect();
        let start = std::sync::Barrier::new(files.len());
        std::thread::scope(|s| {
            for file in &files {
                let start = &start;
                s.spawn(move || {
                    let off = Swapoff::new(Path::new("/nonexistent/nbd0"), file.as_fd());
                    let (fds, cwd) = off.dirs.as_ref().unwrap();
                    start.wait();
                    for _ in 0..20_000 {
                        match judged(off.outcome(by_descriptor(off.dev, fds, cwd))) {
                            None | Some(Outcome::NotSwap) => {}
                            Some(Outcome::Failed(e)) => panic!("a swapoff by descriptor lost its way: {e}"),
                            Some(_) => panic!("a plain file was taken for swap"),
                        }
                    }
                });
            }
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A loop device over a file, detached (and swapped off, should a
    /// test fail with it on) when dropped.
    struct Looped(std::path::PathBuf, std::path::PathBuf);

    impl Drop for Looped {
        fn drop(&mut self) {
            let _ = swapoff(&self.1);
            let _ = std::process::Command::new("losetup").arg("-d").arg(&self.1).status();
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// What a stop keeps from its swapoff until the link is cut, on a real
    /// block device: while claimed, no swapon takes it; while it is swap,
    /// nobody claims it; once swapped off, the claim succeeds again.
    #[test]
    fn a_claimed_device_cannot_be_made_swap() {
        let file = std::env::temp_dir().join(format!("nbd-vram-claim-test-{}", std::process::id()));
        std::fs::write(&file, [header(1 << 20).unwrap().as_slice(), &[0; (1 << 20) - PAGE]].concat()).unwrap();
        let out = std::process::Command::new("losetup").args(["-f", "--show"]).arg(&file).output();
        let Some(out) = out.ok().filter(|o| o.status.success()) else {
            eprintln!("no loop device here (it needs root and losetup): not judged");
            std::fs::remove_file(&file).unwrap();
            return;
        };
        let looped = Looped(file, String::from_utf8(out.stdout).unwrap().trim().into());
        let dev = std::fs::File::open(&looped.1).unwrap();
        let off = Swapoff::new(&looped.1, dev.as_fd());
        let claim = off.claim().unwrap();
        assert!(matches!(claim, Claim::Ours { .. }));
        let refused = swapon(&looped.1, 0, false).expect_err("a swapon took a claimed device");
        assert_eq!(refused.raw_os_error(), Some(libc::EBUSY));
        drop(claim);
        swapon(&looped.1, 0, false).unwrap();
        assert!(matches!(off.claim().unwrap(), Claim::Taken), "a swap area was claimed");
        assert!(matches!(off.run(), Outcome::Off));
        assert!(matches!(off.claim().unwrap(), Claim::Ours { .. }));
        // Held as a mount holds it: no swap area, so no other swapoff to
        // wait for, but not to be taken either.
        use std::os::unix::fs::OpenOptionsExt;
        let holder = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(&looped.1).unwrap();
        assert!(matches!(off.run(), Outcome::NotSwap));
        assert!(matches!(off.claim().unwrap(), Claim::Taken));
        drop(holder);
    }

    /// What RAM can take back, with the room other swap areas have.
    #[test]
    fn a_swapoff_that_ram_cannot_take_is_refused_before_it_starts() {
        let swaps = "Filename\tType\tSize\tUsed\tPriority\n/dev/nbd0 partition 786428 200000 100\n/dev/vda partition 100000 40000 -2\n";
        let meminfo = |avail: u64| format!("MemTotal:         640000 kB\nMemFree:           5000 kB\nMemAvailable:     {avail} kB\n");
        let nbd0 = Path::new("/dev/nbd0");
        // Room: available + 60000 free on /dev/vda - 10000 (1/64 of RAM).
        assert_eq!(shortage_in(swaps, &meminfo(100_000), nbd0, &[]), Some((200_000, 150_000)));
        assert_eq!(shortage_in(swaps, &meminfo(150_000), nbd0, &[]), None, "just enough room");
        assert_eq!(shortage_in(swaps, "MemTotal: 640000 kB\n", nbd0, &[]), None, "nothing refused where /proc cannot tell");
        assert_eq!(shortage_in(swaps, &meminfo(0), Path::new("/dev/nbd1"), &[]), None, "not swap: nothing to read back");
    }

    /// At a stop every slice swaps off at once: a swapoff under way reads
    /// its pages back into the same RAM, and its area takes no more.
    #[test]
    fn a_swapoff_under_way_is_no_room_for_another() {
        let swaps = "Filename\tType\tSize\tUsed\tPriority\n/dev/nbd0 partition 786428 393214 100\n/dev/nbd1 partition 786428 393214 100\n";
        let meminfo = "MemTotal:  640000 kB\nMemAvailable:  500000 kB\n";
        let (nbd0, nbd1) = (Path::new("/dev/nbd0"), Path::new("/dev/nbd1"));
        // Alone, either fits, and would even without the other's free space.
        assert_eq!(shortage_in(swaps, meminfo, nbd0, &[]), None);
        // 500000 - 10000 (1/64 of RAM) - 393214 (the first's): its free
        // space, which would make up for it, is going too.
        assert_eq!(shortage_in(swaps, meminfo, nbd1, &[nbd0]), Some((393_214, 96_786)), "room taken by the first");
        let small = "Filename\tType\tSize\tUsed\tPriority\n/dev/nbd0 partition 786428 1000 100\n/dev/nbd1 partition 786428 1000 100\n";
        assert_eq!(shortage_in(small, meminfo, nbd1, &[nbd0]), None, "room for both");
    }

    #[test]
    fn proc_swaps_lines_parse() {
        let text = "Filename\tType\tSize\tUsed\tPriority\n/dev/nbd0  partition\t786428\t1024\t100\n/dev/zram0 partition 100 0 -2\n";
        let a = entry(text, Path::new("/dev/nbd0")).unwrap();
        assert_eq!(a, Active { size_kib: 786428, used_kib: 1024, priority: 100 });
        assert_eq!(entry(text, Path::new("/dev/zram0")).unwrap().priority, -2);
        assert!(entry(text, Path::new("/dev/nbd1")).is_none());
    }
}
