//! `nbd-vram status`: each running instance publishes a small file under
//! /run/nbd-vram/ once a second (from its own thread, never from the serve
//! loop); `status` reads them back.

use std::ffi::{CStr, CString};
use std::fmt::{self, Write as _};
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::fail::{Code, Failure};
use crate::stats::{any_failed, Stats};
use crate::swap;

pub const DIR: &str = "/run/nbd-vram";
/// A file older than this means its daemon no longer publishes.
const STALE: u64 = 5;

/// What an instance is, fixed at start.
pub struct Instance {
    /// `nbd0` for the swap daemon, `serve-PID` for serve mode.
    pub name: String,
    /// /dev/nbdN or the listening address.
    pub target: String,
    pub store: String,
    pub size: u64,
    pub priority: Option<i32>,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `name`, or `name-PID` (this process's) while a live instance of that
/// name publishes: a daemon that gave its first device back keeps its
/// name, and one that took the device since must not share its files.
pub fn free_name(name: &str) -> String {
    free_name_in(Path::new(DIR), name)
}

fn free_name_in(dir: &std::path::Path, name: &str) -> String {
    let text = fs::read_to_string(dir.join(format!("{name}.status"))).unwrap_or_default();
    let (pid, ours) = (num(&text, "pid"), u64::from(std::process::id()));
    if pid != ours && publishing(&text) {
        format!("{name}-{ours}")
    } else {
        name.to_string()
    }
}

/// Whether `pid` is a running nbd-vram: a file whose pid now names
/// another process was left by a dead instance.
pub fn is_nbd_vram(pid: u64) -> bool {
    pid != 0 && fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "nbd-vram")
}

/// Whether a status file is a swap daemon's (which lists its slices, and
/// has a priority), not serve mode's or a `--no-swap` daemon's, whose one
/// device is never given back or resized.
pub fn swap_daemon(text: &str) -> bool {
    has_slices(text) && !matches!(field(text, "priority"), "-" | "")
}

/// Whether a status file is a `--no-swap` daemon's: slices, no priority.
pub fn no_swap_daemon(text: &str) -> bool {
    has_slices(text) && matches!(field(text, "priority"), "-" | "")
}

fn has_slices(text: &str) -> bool {
    text.lines().any(|l| l.starts_with("slices="))
}

/// Whether a status file's instance still publishes: its pid is an
/// nbd-vram, and it wrote within `STALE` (a dead instance's pid may have
/// gone to another nbd-vram since).
fn publishing(text: &str) -> bool {
    is_nbd_vram(num(text, "pid")) && now().saturating_sub(num(text, "updated")) <= STALE
}

/// The running swap daemon that started on `dev` (its status file's
/// `target`), as pid and name; none if no such one, or several.
pub fn started_on(dev: &std::path::Path) -> Option<(u32, String)> {
    started_on_in(Path::new(DIR), dev)
}

/// The instances' status files, each with its text as read now.
pub fn files() -> impl Iterator<Item = (PathBuf, String)> {
    files_in(Path::new(DIR))
}

fn files_in(dir: &std::path::Path) -> impl Iterator<Item = (PathBuf, String)> {
    let paths = fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path());
    paths.filter(|p| p.extension().is_some_and(|x| x == "status")).filter_map(|p| {
        let text = fs::read_to_string(&p).ok()?;
        Some((p, text))
    })
}

fn started_on_in(dir: &std::path::Path, dev: &std::path::Path) -> Option<(u32, String)> {
    let mut found = files_in(dir).filter_map(|(path, text)| {
        if !(swap_daemon(&text) && std::path::Path::new(field(&text, "target")) == dev && publishing(&text)) {
            return None;
        }
        Some((u32::try_from(num(&text, "pid")).ok()?, path.file_stem()?.to_string_lossy().into_owned()))
    });
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// The status files of the running instance `pid`, for `failed` to read
/// as it ends: taken while it publishes, as a file left by a daemon whose
/// store failed outlives it, and its pid may go to another process.
pub fn files_of(pid: u32) -> Vec<PathBuf> {
    files_of_in(Path::new(DIR), pid)
}

fn files_of_in(dir: &std::path::Path, pid: u32) -> Vec<PathBuf> {
    files_in(dir).filter(|(_, text)| num(text, "pid") == u64::from(pid) && publishing(text)).map(|(path, _)| path).collect()
}

/// Whether any of `files` says its store failed, as last published.
pub fn failed(files: &[PathBuf]) -> bool {
    files.iter().any(|path| fs::read_to_string(path).is_ok_and(|t| num(&t, "failed") != 0))
}

/// Publishes after each `tick` (which waits about a second) until it
/// returns false, then once more, and removes the file, unless the store
/// failed: then it is left for `stop`, which reads it once the daemon has
/// exited (a store that fails during the last swapoff fails within the
/// last second), and for `status` to clear. `more` adds lines of its own
/// (the swap daemon's slices). Besides what `more` does, after the first
/// round it allocates nothing: one open file rewritten in place from one
/// reused buffer, since under memory pressure even this thread should not
/// wait in reclaim.
/// Without a file to publish in, it only waits for the ticks to end: the
/// caller's end comes after it all the same.
pub fn publish(inst: &Instance, stats: &[&Stats], more: &dyn Fn(&mut String), tick: impl FnMut() -> bool) {
    publish_in(Path::new(DIR), inst, stats, more, tick)
}

fn publish_in(at: &Path, inst: &Instance, stats: &[&Stats], more: &dyn Fn(&mut String), mut tick: impl FnMut() -> bool) {
    let name = format!("{}.status", inst.name);
    let path = at.join(&name);
    // The directory by descriptor too: a daemon started from the initramfs
    // sees /run move away at switch_root, and must still remove its file.
    let opened = fs::create_dir_all(at).and_then(|()| Ok((fs::File::open(at)?, fs::File::create(&path)?)));
    let (dir, file) = match opened {
        Ok(both) => both,
        Err(e) => {
            crate::warn!("{}: {e}; `nbd-vram status` will not see this instance", path.display());
            while tick() {}
            return;
        }
    };
    let started = now();
    let mut text = String::with_capacity(4096);
    let mut last = false;
    loop {
        text.clear();
        render(&mut text, inst, stats, started);
        more(&mut text);
        let written = file.write_all_at(text.as_bytes(), 0).and_then(|()| file.set_len(text.len() as u64));
        if let Err(e) = written {
            crate::debug!("{}: {e}", path.display());
        }
        if last {
            break;
        }
        last = !tick();
    }
    if any_failed(stats) {
        return;
    }
    match CString::new(name) {
        Ok(name) => unlink_in(&dir, &name),
        Err(_) => {
            let _ = fs::remove_file(&path);
        }
    }
}

/// Removes `name` from the directory open as `dir`, wherever it is mounted now.
fn unlink_in(dir: &fs::File, name: &CStr) {
    // SAFETY: `dir` is an open directory and `name` a NUL-terminated
    // relative name, both live for the call; unlinkat only reads them.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } < 0 {
        crate::debug!("{}: {}", name.to_string_lossy(), std::io::Error::last_os_error());
    }
}

/// One `key=value` a line: trivially written and read, no JSON parser.
/// Counters are the device's, summed over its connections; then each
/// connection's own, as `conn.I=requests read_bytes written_bytes errors`.
fn render(s: &mut String, inst: &Instance, stats: &[&Stats], started: u64) {
    let mut kv = |k: &str, v: &dyn std::fmt::Display| {
        let _ = writeln!(s, "{k}={v}");
    };
    let sum = |f: fn(&Stats) -> &AtomicU64| stats.iter().map(|c| f(c).load(Relaxed)).sum::<u64>();
    // Read once: the totals are these lines' sums, however the loops count on.
    let conns: Vec<[u64; 4]> = stats.iter().map(|c| [&c.requests, &c.read_bytes, &c.written_bytes, &c.errors].map(|n| n.load(Relaxed))).collect();
    let total = |k: usize| conns.iter().map(|c| c[k]).sum::<u64>();
    kv("pid", &std::process::id());
    kv("target", &inst.target);
    kv("store", &inst.store);
    kv("size_bytes", &inst.size);
    match inst.priority {
        Some(p) => kv("priority", &p),
        None => kv("priority", &"-"),
    }
    kv("started", &started);
    kv("updated", &now());
    kv("connections", &stats.len());
    kv("requests", &total(0));
    kv("read_bytes", &total(1));
    kv("written_bytes", &total(2));
    kv("errors", &total(3));
    kv("batches", &sum(|c| &c.batches));
    kv("busy_ns", &sum(|c| &c.busy_ns));
    kv("max_batch_ns", &stats.iter().map(|c| c.max_batch_ns.load(Relaxed)).max().unwrap_or(0));
    kv("wall_ns", &sum(|c| &c.wall_ns));
    kv("idle_ns", &sum(|c| &c.idle_ns));
    kv("store_ns", &sum(|c| &c.store_ns));
    kv("send_ns", &sum(|c| &c.send_ns));
    kv("failed", &u8::from(any_failed(stats)));
    for (i, [r, rb, wb, e]) in conns.iter().enumerate() {
        let _ = writeln!(s, "conn.{i}={r} {rb} {wb} {e}");
    }
}

/// A status file's slices, `slice.I=DEVICE STATE USED_PAGES` each: device
/// ("-" while given back), state, pages in swap.
pub fn slices(text: &str) -> Vec<(String, String, u64)> {
    (0..num(text, "slices").min(64))
        .map(|i| {
            let mut words = field(text, &format!("slice.{i}")).split(' ');
            let mut word = || words.next().unwrap_or("-").to_string();
            (word(), word(), word().parse().unwrap_or(0))
        })
        .collect()
}

/// The value of `key=` in a status file's text, "" if none.
pub fn field<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('=')).unwrap_or("")
}

pub fn num(text: &str, key: &str) -> u64 {
    field(text, key).parse().unwrap_or(0)
}

pub fn show(json: bool) -> Result<(), Failure> {
    let mut files: Vec<PathBuf> = match fs::read_dir(DIR) {
        Ok(d) => d.filter_map(|e| Some(e.ok()?.path())).filter(|p| p.extension().is_some_and(|x| x == "status")).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Failure::os(DIR, e)),
    };
    files.sort();
    let table = swap::table();
    let mut rows: Vec<Row> = files
        .iter()
        .filter_map(|p| {
            let row = Row::read(p, &table);
            if row.is_none() && stillborn(p) {
                let _ = fs::remove_file(p);
            }
            row
        })
        .collect();
    disown(&mut rows, &table);
    // A dead instance matters only while the kernel still swaps to its
    // device; otherwise its file is litter from a kill -9.
    rows.retain(|r| {
        let keep = r.health() != "dead" || r.swap.is_some();
        if !keep {
            let _ = fs::remove_file(PathBuf::from(DIR).join(format!("{}.status", r.name)));
        }
        keep
    });
    if json {
        let items: Vec<String> = rows.iter().map(Row::json).collect();
        println!("[{}]", items.join(",\n "));
    } else if rows.is_empty() {
        println!("no nbd-vram instance is running");
    } else {
        println!("{:<10} {:<22} {:>7} {:>9} {:>5} {:>11} {:>10} {:>9} {:>9} {:>6} {:>8}  HEALTH",
            "NAME", "TARGET", "PID", "SIZE MiB", "PRIO", "SWAP USED", "REQUESTS", "READ MiB", "WROTE MiB", "ERRORS", "LAT µs");
        for r in &rows {
            println!("{:<10} {:<22} {:>7} {:>9} {:>5} {:>11} {:>10} {:>9} {:>9} {:>6} {:>8}  {}",
                r.name, r.target, r.pid, r.size >> 20, r.priority(), r.swap_used(), r.requests,
                r.read >> 20, r.written >> 20, r.errors, r.latency_us(), r.health());
            if r.conns.len() > 1 {
                for (i, [requests, read, written, errors]) in r.conns.iter().enumerate() {
                    println!("  connection {i}: {requests} requests, {} MiB read, {} MiB written, {errors} errors", read >> 20, written >> 20);
                }
            }
            if r.slices.len() > 1 || !r.change.is_empty() {
                for (i, (device, state, used)) in r.slices.iter().enumerate() {
                    println!("  slice {i}: {device} {state}, {used} pages in swap");
                }
            }
            if !r.change.is_empty() {
                println!("  last change: {}", r.change);
            }
        }
    }
    if rows.iter().any(|r| r.health() != "ok") {
        return Err(Failure::new(Code::Other, "an instance is unhealthy (see HEALTH)"));
    }
    Ok(())
}

#[derive(Default)]
struct Row {
    name: String,
    target: String,
    store: String,
    pid: u64,
    size: u64,
    priority: String,
    updated: u64,
    /// Its store failed: every request is answered EIO.
    failed: bool,
    requests: u64,
    read: u64,
    written: u64,
    errors: u64,
    batches: u64,
    busy_ns: u64,
    /// Each connection's requests, bytes read, bytes written, errors.
    conns: Vec<[u64; 4]>,
    /// Its devices in /proc/swaps, summed: a dead instance's file is kept
    /// while any of them is still swap.
    swap: Option<swap::Active>,
    /// A swap daemon's slices: device (or `-`), state, pages in swap.
    slices: Vec<(String, String, u64)>,
    /// Its last change, and why.
    change: String,
}

/// A status file with no pid long after it was made: its instance died
/// before it first wrote there (each writes within a second of making it).
fn stillborn(path: &std::path::Path) -> bool {
    let old = fs::metadata(path).and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STILLBORN));
    old && fs::read_to_string(path).is_ok_and(|t| num(&t, "pid") == 0)
}

/// The devices an instance's file names: its slices' (those serving
/// now), or for serve mode and older files its `target`.
fn devices<'a>(target: &'a str, slices: &'a [(String, String, u64)]) -> Vec<&'a str> {
    match slices.is_empty() {
        true => vec![target],
        false => slices.iter().map(|(d, _, _)| d.as_str()).filter(|&d| d != "-").collect(),
    }
}

/// What the kernel swaps to `devices`, summed; `None` if none is swap.
/// The priority is the first one's.
fn swapped(table: &str, devices: &[&str]) -> Option<swap::Active> {
    devices.iter().filter_map(|d| swap::entry(table, std::path::Path::new(d))).reduce(|a, b| swap::Active {
        size_kib: a.size_kib + b.size_kib,
        used_kib: a.used_kib + b.used_kib,
        priority: a.priority,
    })
}

/// A dead instance's last slice list may name a device that a live one
/// has taken and made swap since: that swap is the live one's, and keeps
/// no dead file.
fn disown(rows: &mut [Row], table: &str) {
    let live: Vec<String> =
        rows.iter().filter(|r| r.health() != "dead").flat_map(|r| devices(&r.target, &r.slices)).map(String::from).collect();
    for r in rows.iter_mut().filter(|r| r.health() == "dead") {
        let own: Vec<&str> = devices(&r.target, &r.slices).into_iter().filter(|d| !live.iter().any(|l| l == d)).collect();
        r.swap = swapped(table, &own);
    }
}

/// See `stillborn`.
const STILLBORN: std::time::Duration = std::time::Duration::from_secs(10);

impl Row {
    /// `None` also for a file its instance has created but not written
    /// yet: with no pid, it would pass for a dead one's, and be removed.
    /// `table`: /proc/swaps, read once for every file.
    fn read(path: &std::path::Path, table: &str) -> Option<Row> {
        let t = fs::read_to_string(path).ok()?;
        if num(&t, "pid") == 0 {
            return None;
        }
        let target = field(&t, "target").to_string();
        let slices = slices(&t);
        Some(Row {
            name: path.file_stem()?.to_string_lossy().into_owned(),
            swap: swapped(table, &devices(&target, &slices)),
            target,
            store: field(&t, "store").to_string(),
            pid: num(&t, "pid"),
            size: num(&t, "size_bytes"),
            priority: field(&t, "priority").to_string(),
            updated: num(&t, "updated"),
            failed: num(&t, "failed") != 0,
            requests: num(&t, "requests"),
            read: num(&t, "read_bytes"),
            written: num(&t, "written_bytes"),
            errors: num(&t, "errors"),
            batches: num(&t, "batches"),
            busy_ns: num(&t, "busy_ns"),
            conns: (0..num(&t, "connections").min(64))
                .map(|i| {
                    let mut n = field(&t, &format!("conn.{i}")).split(' ').map(|v| v.parse().unwrap_or(0));
                    std::array::from_fn(|_| n.next().unwrap_or(0))
                })
                .collect(),
            slices,
            change: field(&t, "change").to_string(),
        })
    }

    fn health(&self) -> &'static str {
        // Its pid may have gone to another process since it died.
        if !is_nbd_vram(self.pid) {
            "dead"
        } else if self.failed {
            "failed"
        } else if now().saturating_sub(self.updated) > STALE {
            "stalled"
        } else {
            "ok"
        }
    }

    /// The kernel's while it swaps there: a swap area the daemon took as
    /// its own (`slice::control::beaten_to_swapon`) keeps the priority it came with.
    fn priority(&self) -> String {
        self.swap.as_ref().map_or_else(|| self.priority.clone(), |a| a.priority.to_string())
    }

    fn swap_used(&self) -> String {
        self.swap.as_ref().map_or_else(|| "-".into(), |a| format!("{} MiB", a.used_kib >> 10))
    }

    /// Mean service time of a batch, the kernel's wait beyond the socket.
    fn latency_us(&self) -> u64 {
        self.busy_ns / self.batches.max(1) / 1000
    }

    fn json(&self) -> String {
        let swap = self.swap.as_ref().map_or_else(|| "null".into(), |a| {
            format!("{{\"size_kib\":{},\"used_kib\":{},\"priority\":{}}}", a.size_kib, a.used_kib, a.priority)
        });
        let slices: Vec<String> = self
            .slices
            .iter()
            .map(|(d, s, u)| format!("{{\"device\":{},\"state\":{},\"used_pages\":{u}}}", Json(d), Json(s)))
            .collect();
        let conns: Vec<String> = self
            .conns
            .iter()
            .map(|[r, rb, wb, e]| format!("{{\"requests\":{r},\"read_bytes\":{rb},\"written_bytes\":{wb},\"errors\":{e}}}"))
            .collect();
        format!(
            "{{\"name\":{},\"target\":{},\"store\":{},\"pid\":{},\"size_bytes\":{},\"swap\":{swap},\"requests\":{},\
             \"read_bytes\":{},\"written_bytes\":{},\"errors\":{},\"mean_batch_us\":{},\"health\":{},\"connections\":[{}],\"slices\":[{}],\"change\":{}}}",
            Json(&self.name), Json(&self.target), Json(&self.store), self.pid, self.size, self.requests,
            self.read, self.written, self.errors, self.latency_us(), Json(self.health()), conns.join(","), slices.join(","), Json(&self.change)
        )
    }
}

/// A JSON string: what a socket path or a message may hold (quotes,
/// backslashes, control characters) escaped as JSON has it.
struct Json<'a>(&'a str);

impl fmt::Display for Json<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_char('"')?;
        for c in self.0.chars() {
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                c if u32::from(c) < 0x20 => write!(f, "\\u{:04x}", u32::from(c))?,
                c => f.write_char(c)?,
            }
        }
        f.write_char('"')
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The totals are the sums of the connection lines of the same file,
    /// however fast the loops count meanwhile.
    #[test]
    fn totals_agree_with_the_connections_under_traffic() {
        let stats: Vec<Stats> = (0..2).map(|_| Stats::default()).collect();
        let inst = Instance { name: "nbd7".into(), target: "/dev/nbd7".into(), store: "host".into(), size: 1 << 20, priority: None };
        let done = std::sync::atomic::AtomicBool::new(false);
        // Ends the counting thread however this one leaves the scope.
        struct Done<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(true, Relaxed);
            }
        }
        std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(Relaxed) {
                    for c in &stats {
                        c.record(crate::uapi::NBD_CMD_READ, 4096, 0);
                        c.record(crate::uapi::NBD_CMD_WRITE, 4096, 5);
                    }
                }
            });
            let _done = Done(&done);
            let counted = || stats[0].requests.load(Relaxed);
            while counted() < 1000 {
                std::thread::yield_now();
            }
            let (mut disagreed, from) = (0, counted());
            // Renders while at least 100000 more requests are counted.
            while counted() < from + 100_000 {
                let mut text = String::new();
                render(&mut text, &inst, &stats.iter().collect::<Vec<_>>(), 0);
                let lines: Vec<u64> = (0..2).map(|i| field(&text, &format!("conn.{i}")).split(' ').next().unwrap().parse().unwrap()).collect();
                disagreed += usize::from(lines.iter().sum::<u64>() != num(&text, "requests"));
            }
            assert_eq!(disagreed, 0, "renders whose total differs from its connections' sum");
        });
    }

    /// Without a place for its file (a user not allowed to write /run), the
    /// publisher still waits for the end, as the serve loop's stop hangs
    /// on it: it stopped serving at once.
    #[test]
    fn without_a_file_the_publisher_waits_for_the_end() {
        let inst = Instance { name: "nbd7".into(), target: "/dev/nbd7".into(), store: "host".into(), size: 1 << 20, priority: None };
        let ticks = std::cell::Cell::new(0);
        publish_in(Path::new("/dev/null/nbd-vram"), &inst, &[], &|_| {}, || {
            ticks.set(ticks.get() + 1);
            ticks.get() < 3
        });
        assert_eq!(ticks.get(), 3, "the publisher returned before its ticks ended");
    }

    /// A store that fails in the daemon's last second, as one may in the
    /// last swapoff of a stop, is published, and its file outlives the
    /// daemon for `stop` to read; a clean end leaves no file.
    #[test]
    fn a_failure_in_the_last_second_outlives_the_daemon() {
        let path = |name: &str| PathBuf::from(DIR).join(format!("{name}.status"));
        for fails in [true, false] {
            let stats = Stats::default();
            let name = format!("test-last-second-{}-{fails}", std::process::id());
            let inst = Instance { name: name.clone(), target: "/dev/nbd9".into(), store: "host".into(), size: 1 << 20, priority: Some(1) };
            publish(&inst, &[&stats], &|_: &mut String| {}, || {
                stats.failed.store(fails, Relaxed);
                false
            });
            assert_eq!(path(&name).exists(), fails, "a file left behind: {fails} expected");
            if fails {
                let text = fs::read_to_string(path(&name)).unwrap();
                fs::remove_file(path(&name)).unwrap();
                assert_eq!(num(&text, "failed"), 1, "{text}");
                assert_eq!(num(&text, "pid"), u64::from(std::process::id()), "{text}");
            }
        }
    }

    /// `--json` escapes what a socket path may hold as JSON does (Rust's
    /// own escapes, `\u{1}`, are no JSON).
    #[test]
    fn json_strings_are_escaped_as_json_has_it() {
        let inst = Instance { name: "serve-1".into(), target: "unix:/tmp/a\"b\\c\u{1}d".into(), store: "host".into(), size: 1 << 20, priority: None };
        let mut text = String::new();
        render(&mut text, &inst, &[&Stats::default()], 0);
        let path = std::env::temp_dir().join(format!("nbd-vram-json-test-{}.status", std::process::id()));
        fs::write(&path, &text).unwrap();
        let row = Row::read(&path, "").unwrap();
        fs::remove_file(&path).unwrap();
        assert!(row.json().contains(r#""target":"unix:/tmp/a\"b\\c\u0001d""#), "{}", row.json());
    }

    /// The file sums the connections' counters and lists each one, and
    /// `status` reads each back.
    #[test]
    fn each_connection_is_published_and_read_back() {
        let stats: Vec<Stats> = (0..3).map(|_| Stats::default()).collect();
        stats[0].record(crate::uapi::NBD_CMD_READ, 4096, 0);
        stats[2].record(crate::uapi::NBD_CMD_WRITE, 8192, 0);
        stats[2].record(crate::uapi::NBD_CMD_WRITE, 8192, 5);
        let inst = Instance { name: "nbd7".into(), target: "/dev/nbd7".into(), store: "host".into(), size: 1 << 20, priority: Some(5) };
        let mut text = String::new();
        render(&mut text, &inst, &stats.iter().collect::<Vec<_>>(), 0);
        text.push_str("slices=2\nslice.0=/dev/nbd7 serving 12\nslice.1=- released 0\nchange=giving back slice 1\n");
        assert_eq!((num(&text, "connections"), num(&text, "requests"), num(&text, "errors")), (3, 3, 1), "{text}");
        let path = std::env::temp_dir().join(format!("nbd-vram-status-test-{}.status", std::process::id()));
        fs::write(&path, &text).unwrap();
        let row = Row::read(&path, "").unwrap();
        // As just created by `publish`, before its first write.
        fs::write(&path, "").unwrap();
        assert!(Row::read(&path, "").is_none(), "a file not written yet was read as an instance's");
        assert!(!stillborn(&path), "a file just made was taken for a dead instance's");
        let long_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        fs::File::options().write(true).open(&path).unwrap().set_modified(long_ago).unwrap();
        assert!(stillborn(&path), "a file never written in a minute was kept");
        fs::write(&path, &text).unwrap();
        fs::File::options().write(true).open(&path).unwrap().set_modified(long_ago).unwrap();
        assert!(!stillborn(&path), "an instance's file was taken for a stillborn one");
        fs::remove_file(&path).unwrap();
        assert_eq!(row.conns, vec![[1, 4096, 0, 0], [0, 0, 0, 0], [2, 0, 8192, 1]]);
        assert!(row.json().contains(r#""connections":[{"requests":1,"read_bytes":4096,"written_bytes":0,"errors":0},"#), "{}", row.json());
        assert_eq!(row.slices, vec![("/dev/nbd7".into(), "serving".into(), 12), ("-".into(), "released".into(), 0)]);
        assert!(row.json().contains(r#""slices":[{"device":"/dev/nbd7","state":"serving","used_pages":12},"#), "{}", row.json());
        assert!(row.json().contains(r#""change":"giving back slice 1""#), "{}", row.json());
    }

    /// A directory for status files, and a process in it whose command
    /// name is nbd-vram, as the kernel takes it from the path executed.
    pub(crate) fn with_a_daemon(what: &str) -> (std::path::PathBuf, std::process::Child) {
        let dir = std::env::temp_dir().join(format!("nbd-vram-{what}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink("/bin/sleep", dir.join("nbd-vram")).unwrap();
        let other = std::process::Command::new(dir.join("nbd-vram")).arg("30").spawn().unwrap();
        // spawn may return before exec has named the process.
        let named = std::time::Instant::now();
        while !is_nbd_vram(other.id().into()) {
            assert!(named.elapsed().as_secs() < 5, "the child never took the name nbd-vram");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        (dir, other)
    }

    /// A daemon that gave its first device back and one that took that
    /// device since would share one name: the later one takes another.
    #[test]
    fn a_name_a_live_instance_publishes_under_is_not_taken_again() {
        let (dir, mut other) = with_a_daemon("names");
        let ours = std::process::id();
        fs::write(dir.join("nbd0.status"), format!("pid={}\nupdated={}\n", other.id(), now())).unwrap();
        fs::write(dir.join("nbd1.status"), format!("pid={ours}\nupdated={}\n", now())).unwrap();
        fs::write(dir.join("nbd2.status"), format!("pid={}\nupdated={}\n", other.id(), now() - 60)).unwrap();
        assert_eq!(free_name_in(&dir, "nbd0"), format!("nbd0-{ours}"));
        assert_eq!(free_name_in(&dir, "nbd1"), "nbd1", "this process's own file");
        assert_eq!(free_name_in(&dir, "nbd2"), "nbd2", "a file not written for a minute");
        assert_eq!(free_name_in(&dir, "nbd3"), "nbd3", "no file");
        other.kill().unwrap();
        other.wait().unwrap();
        assert_eq!(free_name_in(&dir, "nbd0"), "nbd0", "a dead instance's file");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// `stop` on the device a swap daemon started on and gave back finds
    /// that daemon: only one that publishes, only a swap daemon, only one.
    #[test]
    fn the_daemon_that_started_on_a_device_is_found_by_it() {
        let (dir, mut other) = with_a_daemon("started");
        let pid = other.id();
        let file = |name: &str, text: String| fs::write(dir.join(format!("{name}.status")), text).unwrap();
        let t = now();
        file("nbd0", format!("pid={pid}\nupdated={t}\ntarget=/dev/nbd0\npriority=100\nslices=2\nslice.0=- released 0\nslice.1=/dev/nbd1 serving 0\n"));
        file("serve-1", format!("pid={pid}\nupdated={t}\ntarget=/dev/nbd2\npriority=-\n"));
        file("nbd3", format!("pid=1\nupdated={t}\ntarget=/dev/nbd3\npriority=100\nslices=1\n"));
        file("nbd4", format!("pid={pid}\nupdated={}\ntarget=/dev/nbd4\npriority=100\nslices=1\n", t - 60));
        file("nbd5", format!("pid={pid}\nupdated={t}\ntarget=/dev/nbd5\npriority=-\nslices=1\n"));
        let found = |d: &str| started_on_in(&dir, std::path::Path::new(d));
        assert_eq!(found("/dev/nbd0"), Some((pid, "nbd0".into())));
        assert_eq!(found("/dev/nbd2"), None, "serve mode has no slices to give back");
        assert_eq!(found("/dev/nbd3"), None, "pid 1 is no nbd-vram");
        assert_eq!(found("/dev/nbd1"), None, "not the device it started on");
        assert_eq!(found("/dev/nbd4"), None, "a file not written for a minute: its pid may be another's now");
        assert_eq!(found("/dev/nbd5"), None, "a --no-swap daemon gives nothing back");
        file("nbd0-7", format!("pid={pid}\nupdated={t}\ntarget=/dev/nbd0\npriority=5\nslices=1\n"));
        assert_eq!(found("/dev/nbd0"), None, "two daemons started on it: neither is guessed");
        other.kill().unwrap();
        other.wait().unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    /// `stop` learns of a failed store from the daemon's own file only,
    /// never from one a dead daemon of the same pid left behind.
    #[test]
    fn a_failed_store_is_read_from_its_daemons_file() {
        let (dir, mut daemon) = with_a_daemon("failed");
        let pid = daemon.id();
        fs::write(dir.join("a.status"), format!("pid={pid}\nupdated={}\nfailed=0\n", now())).unwrap();
        fs::write(dir.join("b.status"), format!("pid={pid}\nupdated={}\nfailed=1\n", now() - 3600)).unwrap();
        fs::write(dir.join("c.status"), format!("pid={}\nupdated={}\nfailed=1\n", pid + 1, now())).unwrap();
        let files = files_of_in(&dir, pid);
        assert_eq!(files, vec![dir.join("a.status")], "only the live instance's own file");
        assert!(!failed(&files));
        fs::write(dir.join("a.status"), format!("pid={pid}\nupdated={}\nfailed=1\n", now())).unwrap();
        assert!(failed(&files), "its store failed since");
        assert!(!failed(&files_of_in(&dir, pid + 2)), "no file, nothing known");
        daemon.kill().unwrap();
        daemon.wait().unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_priority_shown_is_the_kernels_while_it_swaps_there() {
        let mut row = Row { priority: "100".into(), ..Row::default() };
        assert_eq!(row.priority(), "100");
        row.swap = Some(swap::Active { size_kib: 1000, used_kib: 0, priority: -2 });
        assert_eq!(row.priority(), "-2");
    }

    /// A dead daemon's file stays while any of its slices is swap, not
    /// only the device it started on; SWAP USED sums them.
    #[test]
    fn every_slice_counts_for_swap() {
        let table = "Filename Type Size Used Priority\n/dev/nbd1 partition 1000 40 100\n/dev/nbd2 partition 1000 2 100\n";
        let slices = |d: [&str; 3]| d.map(|d| (d.to_string(), "serving".to_string(), 0)).to_vec();
        let a = swapped(table, &devices("/dev/nbd0", &slices(["-", "/dev/nbd1", "/dev/nbd2"]))).unwrap();
        assert_eq!((a.size_kib, a.used_kib, a.priority), (2000, 42, 100));
        assert!(swapped(table, &devices("/dev/nbd1", &slices(["/dev/nbd0", "-", "/dev/nbd3"]))).is_none());
        assert_eq!(swapped(table, &devices("/dev/nbd2", &[])).unwrap().used_kib, 2, "serve mode: its target");
        // A dead daemon whose slice 1 a live one has taken since.
        let row = |pid: u64, slices: Vec<(String, String, u64)>| Row { pid, updated: now(), slices, ..Row::default() };
        let dead = 1 << 23; // above any pid_max
        let (dir, mut live) = with_a_daemon("slices");
        let mut rows = [row(dead, slices(["-", "/dev/nbd1", "/dev/nbd2"])), row(live.id().into(), slices(["/dev/nbd1", "-", "-"]))];
        disown(&mut rows, table);
        assert_eq!(rows[0].health(), "dead");
        assert_eq!(rows[0].swap.as_ref().map(|a| a.used_kib), Some(2), "only /dev/nbd2 is still the dead one's");
        rows[0].slices = slices(["-", "/dev/nbd1", "-"]);
        disown(&mut rows, table);
        assert!(rows[0].swap.is_none(), "a device another serves kept a dead file");
        assert!(rows[1].swap.is_none(), "a live row is left as read");
        live.kill().unwrap();
        live.wait().unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
