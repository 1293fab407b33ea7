//! `nbd-vram resize SIZE`: asks a running swap daemon to shrink or grow
//! its tier to SIZE, in whole slices, and waits for the outcome. The ask
//! is a file beside the daemon's status file, `NAME.resize`, and `WAKE`;
//! the answer comes back in the status file (`resize=ID OUTCOME`).

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::fail::{Code, Failure};
use crate::signals::WAKE;
use crate::status::DIR;

/// Swapping a slice off moves its pages; systemd's timeouts bound us too.
const PATIENCE: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub size: u64,
    /// The asking process, so that it knows its answer.
    pub id: u32,
}

/// The daemon's side: a request for the instance `name` addressed to this
/// process, taken (removed) so that it is acted on once. A request left
/// for an earlier daemon of the same name is removed unheard.
pub fn take(name: &str) -> Option<Request> {
    let path = PathBuf::from(DIR).join(format!("{name}.resize"));
    let text = fs::read_to_string(&path).ok()?;
    let _ = fs::remove_file(&path);
    let request = parse(&text, std::process::id());
    if request.is_none() {
        crate::warn!("{}: not a resize request for this daemon: {text:?}", path.display());
    }
    request
}

/// `SIZE ID PID`: a request from process ID for daemon PID.
fn parse(text: &str, pid: u32) -> Option<Request> {
    let mut words = text.split_whitespace().map(str::parse::<u64>);
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some(Ok(size)), Some(Ok(id)), Some(Ok(to)), None) if to == u64::from(pid) => Some(Request { size, id: u32::try_from(id).ok()? }),
        _ => None,
    }
}

/// `nbd-vram resize SIZE [DEVICE]`.
pub fn resize(size: u64, device: Option<&Path>) -> Result<(), Failure> {
    // SAFETY: geteuid only returns a number.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Failure::new(Code::Permission, "resize changes swap: run it as root"));
    }
    let (name, pid) = daemon(device)?;
    let id = std::process::id();
    let path = PathBuf::from(DIR).join(format!("{name}.resize"));
    let tmp = path.with_extension(format!("resize.{id}"));
    fs::write(&tmp, format!("{size} {id} {pid}\n")).and_then(|()| place(&tmp, &path, QUEUED)).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => Failure::new(Code::Other, format!("{name} has not taken an earlier resize request in {} s", QUEUED.as_secs())),
        _ => Failure::os(path.display(), e),
    })?;
    // SAFETY: kill with a positive pid of a live nbd-vram (`daemon`) and a
    // valid signal, which that process blocks and takes.
    if unsafe { libc::kill(pid as libc::pid_t, WAKE) } < 0 {
        withdraw(&path, id);
        return Err(Failure::os(format!("signalling pid {pid}"), std::io::Error::last_os_error()));
    }
    crate::info!("asked pid {pid} ({name}) to resize to {} MiB; waiting", size >> 20);
    let status = PathBuf::from(DIR).join(format!("{name}.status"));
    let start = Instant::now();
    while start.elapsed() < PATIENCE {
        thread::sleep(Duration::from_millis(200));
        let Ok(text) = fs::read_to_string(&status) else {
            withdraw(&path, id);
            return Err(Failure::new(Code::Other, format!("{name} stopped before it answered")));
        };
        let answer = text.lines().find_map(|l| l.strip_prefix("resize=")?.strip_prefix(&format!("{id} ")));
        match answer {
            Some(a) if a.starts_with("done") => {
                println!("{name}: {a}");
                return Ok(());
            }
            Some(a) if a.starts_with("failed") => return Err(Failure::new(Code::Swap, format!("{name}: resize {a}"))),
            _ => {}
        }
    }
    withdraw(&path, id);
    Err(Failure::new(Code::Swap, format!("{name} has not finished resizing after {} s; see its log", PATIENCE.as_secs())))
}

/// Removes our request if the daemon has not taken it: by now the file
/// may hold a later client's, which stays.
fn withdraw(path: &Path, id: u32) {
    let ours = fs::read_to_string(path).is_ok_and(|t| t.split_whitespace().nth(1) == Some(&*id.to_string()));
    if ours {
        let _ = fs::remove_file(path);
    }
}

/// How long a request waits for an earlier one to be taken.
const QUEUED: Duration = Duration::from_secs(10);

/// Moves the request `tmp` to `path` once no earlier one waits there: a
/// rename would replace that one unheard, and leave its client waiting.
/// The daemon takes a request within a second of its signal.
fn place(tmp: &Path, path: &Path, patience: Duration) -> std::io::Result<()> {
    let start = Instant::now();
    let placed = loop {
        match fs::hard_link(tmp, path) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && start.elapsed() < patience => {
                thread::sleep(Duration::from_millis(50));
            }
            other => break other,
        }
    };
    let _ = fs::remove_file(tmp);
    placed
}

/// The swap daemon to ask: the one serving `device` as a slice, or the
/// only one running.
fn daemon(device: Option<&Path>) -> Result<(String, u32), Failure> {
    let device = device.map(crate::nbd::kernel::resolve);
    daemon_among(crate::status::files(), device.as_deref())
}

/// `daemon` among the status `files` given.
fn daemon_among(files: impl Iterator<Item = (PathBuf, String)>, device: Option<&Path>) -> Result<(String, u32), Failure> {
    let mut found = Vec::new();
    // `--no-swap` daemons, by device and pid: named if none is found.
    let mut no_swap = Vec::new();
    for (path, text) in files {
        // A file a dead daemon left, or whose pid now names another
        // process, is not asked: the signal would end that process.
        let pid = u32::try_from(crate::status::num(&text, "pid")).unwrap_or(0);
        if !crate::status::is_nbd_vram(pid.into()) {
            continue;
        }
        let target = crate::status::field(&text, "target");
        if crate::status::no_swap_daemon(&text) && device.is_none_or(|d| Path::new(target) == d) {
            no_swap.push(format!("{target} is served by a --no-swap daemon (pid {pid}), whose device is never resized"));
        }
        if !crate::status::swap_daemon(&text) {
            continue; // serve mode, or --no-swap
        }
        let serves = |d: &Path| crate::status::slices(&text).iter().any(|(slice, _, _)| Path::new(slice) == d);
        if device.is_some_and(|d| !serves(d)) {
            continue;
        }
        let name = path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        found.push((name, pid));
    }
    match (found.len(), device) {
        (1, _) => Ok(found.remove(0)),
        (0, _) if !no_swap.is_empty() => Err(Failure::new(Code::Other, format!("no swap daemon to resize: {}", no_swap.join("; ")))),
        (0, Some(d)) => Err(Failure::new(Code::Other, format!("no running swap daemon serves {}", d.display()))),
        (0, None) => Err(Failure::new(Code::Other, "no swap daemon is running")),
        _ => Err(Failure::new(Code::Usage, "several swap daemons run: name one by a device it serves, e.g. nbd-vram resize 8G /dev/nbd0")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request waits until the one before it is taken, and replaces none.
    #[test]
    fn a_request_waits_for_the_one_before_it_to_be_taken() {
        let dir = std::env::temp_dir().join(format!("nbd-vram-resize-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (path, tmp) = (dir.join("nbd0.resize"), dir.join("nbd0.resize.2"));
        fs::write(&path, "1 1 1\n").unwrap();
        fs::write(&tmp, "2 2 1\n").unwrap();
        let err = place(&tmp, &path, Duration::from_millis(200)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read_to_string(&path).unwrap(), "1 1 1\n", "the earlier request was replaced");
        fs::write(&tmp, "2 2 1\n").unwrap();
        thread::scope(|s| {
            s.spawn(|| {
                thread::sleep(Duration::from_millis(300));
                assert_eq!(fs::read_to_string(&path).unwrap(), "1 1 1\n");
                fs::remove_file(&path).unwrap(); // taken
            });
            place(&tmp, &path, Duration::from_secs(5)).unwrap();
        });
        assert_eq!(fs::read_to_string(&path).unwrap(), "2 2 1\n");
        assert!(!tmp.exists());
        withdraw(&path, 1);
        assert!(path.exists(), "another client's request was withdrawn");
        withdraw(&path, 2);
        assert!(!path.exists(), "our own request stayed");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The daemon asked is a live swap daemon: the only one, or the one
    /// serving the device named. A `--no-swap` daemon is never asked, and
    /// is named when no swap daemon is found, rather than said not to run.
    #[test]
    fn a_live_swap_daemon_is_asked_and_a_no_swap_one_named() {
        let (dir, mut other) = crate::status::tests::with_a_daemon("no-swap");
        let pid = other.id();
        let file = |name: &str, text: String| (PathBuf::from(format!("{name}.status")), text);
        let no_swap = file("nbd5", format!("pid={pid}\ntarget=/dev/nbd5\npriority=-\nslices=1\nslice.0=/dev/nbd5 serving 0\n"));
        let serve = file("serve-1", format!("pid={pid}\ntarget=unix:/tmp/s\npriority=-\n"));
        let swap = file("nbd0", format!("pid={pid}\ntarget=/dev/nbd0\npriority=100\nslices=1\nslice.0=/dev/nbd0 serving 0\n"));
        let ask = |files: &[&(PathBuf, String)], device: Option<&str>| {
            daemon_among(files.iter().map(|&f| f.clone()), device.map(Path::new)).map_err(|e| e.to_string())
        };
        let named = format!("no swap daemon to resize: /dev/nbd5 is served by a --no-swap daemon (pid {pid}), whose device is never resized");
        assert_eq!(ask(&[&no_swap, &serve], None), Err(named.clone()));
        assert_eq!(ask(&[&no_swap], Some("/dev/nbd5")), Err(named));
        assert_eq!(ask(&[&no_swap], Some("/dev/nbd1")), Err("no running swap daemon serves /dev/nbd1".into()));
        assert_eq!(ask(&[&serve], None), Err("no swap daemon is running".into()), "serve mode is no daemon");
        assert_eq!(ask(&[&no_swap, &swap, &serve], None), Ok(("nbd0".into(), pid)));
        assert_eq!(ask(&[&no_swap, &swap], Some("/dev/nbd0")), Ok(("nbd0".into(), pid)));
        let dead = file("nbd6", "pid=1\ntarget=/dev/nbd6\npriority=-\nslices=1\n".into());
        let dead_swap = file("nbd7", "pid=1\ntarget=/dev/nbd7\npriority=100\nslices=1\nslice.0=/dev/nbd7 serving 0\n".into());
        assert_eq!(ask(&[&dead, &dead_swap], None), Err("no swap daemon is running".into()), "pid 1 is no nbd-vram");
        let second = file("nbd8", format!("pid={pid}\ntarget=/dev/nbd8\npriority=5\nslices=1\nslice.0=/dev/nbd8 serving 0\n"));
        assert!(ask(&[&swap, &second], None).is_err_and(|e| e.starts_with("several swap daemons run")));
        assert_eq!(ask(&[&swap, &second], Some("/dev/nbd8")), Ok(("nbd8".into(), pid)));
        other.kill().unwrap();
        other.wait().unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_request_is_heard_only_by_the_daemon_it_names() {
        assert_eq!(parse("402653184 77 1234\n", 1234), Some(Request { size: 384 << 20, id: 77 }));
        assert_eq!(parse("402653184 77 1234", 99), None, "left for an earlier daemon");
        for bad in ["", "8G 77 1234", "1 2", "1 2 1234 5", "1 -2 1234", "1 99999999999 1234"] {
            assert_eq!(parse(bad, 1234), None, "{bad:?}");
        }
    }
}
