//! Bench mode: measures an NBD server (ours or any other) the way the
//! kernel drives it, with many requests pipelined on one connection (or on
//! each of `--connections N` at once, see `conns`), and prints one table
//! row per access pattern plus a `bench: key=value` line per row for
//! scripts.
//!
//! The export is written once first (up to `MAX_REGION`), so every read
//! hits data this run wrote, and every block read is checked for the stamp
//! its write left (see `engine`).

mod client;
mod conns;
mod engine;
mod plot;
mod verify;

pub use verify::run as verify;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crate::cli::Addr;
use crate::fail::{Code, Failure};
use crate::info;
use crate::uapi as sys;
use client::Shown;
use conns::Conns;
use engine::{Bufs, Spec, Stop, Tally, BLOCK};

const KIB: u32 = 1024;
const MIB: u32 = 1024 * KIB;
/// Patterns touch at most this much of the export, so that writing it
/// first stays quick on a large one.
const MAX_REGION: u64 = 4 << 30;
/// Latency samples kept per pattern (a uniform sample beyond that), split
/// evenly among the connections.
const SAMPLES: usize = 1 << 20;

/// One access pattern.
#[derive(Clone, Copy, Debug)]
pub struct Pattern {
    pub name: &'static str,
    pub write: bool,
    pub len: u32,
    pub depth: usize,
    pub random: bool,
}

const fn pattern(name: &'static str, write: bool, len: u32, depth: usize, random: bool) -> Pattern {
    Pattern { name, write, len, depth, random }
}

/// Sequential patterns run at depth 8, like the kernel's readahead and
/// writeback; random 4 KiB ones at depth 1 (latency) and 32 (throughput).
pub const PATTERNS: [Pattern; 8] = [
    pattern("seq-write-1m", true, MIB, 8, false),
    pattern("seq-read-1m", false, MIB, 8, false),
    pattern("seq-write-128k", true, 128 * KIB, 8, false),
    pattern("seq-read-128k", false, 128 * KIB, 8, false),
    pattern("rand-read-4k-qd1", false, 4 * KIB, 1, true),
    pattern("rand-write-4k-qd1", true, 4 * KIB, 1, true),
    pattern("rand-read-4k-qd32", false, 4 * KIB, 32, true),
    pattern("rand-write-4k-qd32", true, 4 * KIB, 32, true),
];

/// The request-size sweep: sequential reads and writes at depth 8.
pub const SWEEP: [Pattern; 12] = [
    pattern("sweep-read-4k", false, 4 * KIB, 8, false),
    pattern("sweep-write-4k", true, 4 * KIB, 8, false),
    pattern("sweep-read-16k", false, 16 * KIB, 8, false),
    pattern("sweep-write-16k", true, 16 * KIB, 8, false),
    pattern("sweep-read-64k", false, 64 * KIB, 8, false),
    pattern("sweep-write-64k", true, 64 * KIB, 8, false),
    pattern("sweep-read-128k", false, 128 * KIB, 8, false),
    pattern("sweep-write-128k", true, 128 * KIB, 8, false),
    pattern("sweep-read-512k", false, 512 * KIB, 8, false),
    pattern("sweep-write-512k", true, 512 * KIB, 8, false),
    pattern("sweep-read-1m", false, MIB, 8, false),
    pattern("sweep-write-1m", true, MIB, 8, false),
];

/// The figures for one pattern.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Row {
    pub pattern: &'static str,
    pub len: u32,
    pub depth: usize,
    /// Requests completed in the measured time.
    pub ios: u64,
    /// 10^6 bytes per second.
    pub mbps: f64,
    pub iops: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

impl Row {
    /// The figures of connections that ran `p` at once, measured `each`:
    /// requests, MB/s and IOPS summed over them; latencies, of them all,
    /// are `sorted`.
    fn new(p: &Pattern, each: &[Tally], sorted: &[u64]) -> Row {
        Row {
            pattern: p.name,
            len: p.len,
            depth: p.depth,
            ios: each.iter().map(|t| t.ios).sum(),
            mbps: each.iter().map(|t| t.bytes as f64 / t.secs / 1e6).sum(),
            iops: each.iter().map(|t| t.ios as f64 / t.secs).sum(),
            p50_us: percentile(sorted, 50.0) as f64 / 1e3,
            p99_us: percentile(sorted, 99.0) as f64 / 1e3,
        }
    }

    /// The machine-readable line.
    pub fn line(&self) -> String {
        format!(
            "bench: pattern={} mbps={:.1} iops={:.0} p50_us={:.1} p99_us={:.1}",
            self.pattern, self.mbps, self.iops, self.p50_us, self.p99_us
        )
    }

    fn table_row(&self) -> String {
        format!(
            "{:<20} {:>6} {:>3} {:>9.1} {:>9.0} {:>9.1} {:>9.1}",
            self.pattern,
            size(self.len),
            self.depth,
            self.mbps,
            self.iops,
            self.p50_us,
            self.p99_us
        )
    }
}

fn table_head() -> String {
    format!("{:<20} {:>6} {:>3} {:>9} {:>9} {:>9} {:>9}", "pattern", "size", "qd", "MB/s", "IOPS", "p50 µs", "p99 µs")
}

/// A pattern's figures: `row` for all its connections together, and with
/// several, each one's MB/s and IOPS.
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    pub row: Row,
    pub conns: Vec<(f64, f64)>,
}

impl Measured {
    fn new(p: &Pattern, each: &[Tally], sorted: &[u64]) -> Measured {
        let conns = if each.len() > 1 {
            each.iter().map(|t| (t.bytes as f64 / t.secs / 1e6, t.ios as f64 / t.secs)).collect()
        } else {
            Vec::new()
        };
        Measured { row: Row::new(p, each, sorted), conns }
    }

    /// The `bench:` lines, `keys` (such as `server=NAME `) after `bench: `:
    /// with one connection, `Row::line`; with several, it with `conns=N`,
    /// then a `conn=I` line for each.
    fn lines(&self, keys: &str) -> Vec<String> {
        let row = &self.row;
        let mut line = format!("bench: {keys}{}", row.line().trim_start_matches("bench: "));
        if !self.conns.is_empty() {
            line += &format!(" conns={}", self.conns.len());
        }
        let each = self.conns.iter().enumerate().map(|(i, (mbps, iops))| {
            format!("bench: {keys}conn={i} pattern={} mbps={mbps:.1} iops={iops:.0}", row.pattern)
        });
        std::iter::once(line).chain(each).collect()
    }

    /// The table rows, each after `lead`: the pattern's, then with several
    /// connections, an indented one for each with its MB/s and IOPS.
    fn table_rows(&self, lead: &str) -> Vec<String> {
        let each = self.conns.iter().enumerate().map(|(i, (mbps, iops))| {
            format!("{lead}{:<20} {:>6} {:>3} {mbps:>9.1} {iops:>9.0}", format!("  conn {i}"), "", "")
        });
        std::iter::once(format!("{lead}{}", self.row.table_row())).chain(each).collect()
    }
}

/// What one measurement runs on: every `--connect` (with its label), and
/// how many connections to each at once.
pub struct Servers<'a> {
    pub list: &'a [(Addr, String)],
    pub connections: usize,
}

impl Servers<'_> {
    /// ", N connections" and `tail` in a title, where there are several.
    fn several(&self, tail: &str) -> String {
        if self.connections > 1 {
            format!(", {} connections{tail}", self.connections)
        } else {
            String::new()
        }
    }
}

fn say_all(lines: Vec<String>) {
    for line in lines {
        say(&line);
    }
}

/// `nbd-vram bench`: runs every pattern for `seconds` and prints the table,
/// then the `bench:` lines.
pub fn run(servers: &Servers, seconds: u32) -> Result<(), Failure> {
    let connect = &servers.list[0].0;
    say(&format!("nbd-vram bench: {}{}, {seconds} s per pattern", Shown(connect), servers.several("")));
    say(&table_head());
    let rows = run_list(connect, servers.connections, seconds, &PATTERNS, |m| say_all(m.table_rows("")))?;
    for m in &rows {
        say_all(m.lines(""));
    }
    Ok(())
}

/// `nbd-vram bench --sweep`: runs `SWEEP` against each server in turn,
/// printing a table and `bench: server=LABEL ...` lines for each, then,
/// with `svg`, plots MB/s against request size for them all.
pub fn sweep(servers: &Servers, seconds: u32, svg: Option<&Path>) -> Result<(), Failure> {
    // Opened first: a path that cannot be written fails now, not after
    // the whole sweep.
    let mut plot = match svg {
        Some(path) => Some((path, std::fs::File::create(path).map_err(|e| Failure::os(format!("writing {}", path.display()), e))?)),
        None => None,
    };
    let mut series = Vec::new();
    for (i, (connect, label)) in servers.list.iter().enumerate() {
        say(&format!("nbd-vram bench --sweep: {label} ({}{}), {seconds} s per point", Shown(connect), servers.several("")));
        say(&table_head());
        let rows = run_list(connect, servers.connections, seconds, &SWEEP, |m| say_all(m.table_rows("")))?;
        for m in &rows {
            say_all(m.lines(&format!("server={label} ")));
        }
        for (dir, write) in [("read", false), ("write", true)] {
            let points = rows
                .iter()
                .zip(SWEEP.iter())
                .filter(|(_, p)| p.write == write)
                .map(|(m, _)| (u64::from(m.row.len), m.row.mbps))
                .collect();
            series.push(plot::Series { name: format!("{label} {dir}"), color: i, dashed: write, points });
        }
    }
    if let Some((path, file)) = &mut plot {
        let title = format!("Sequential throughput at queue depth 8, {seconds} s per point{}", servers.several(" each"));
        let doc = plot::svg(&title, "request size (bytes, log2 scale)", "MB/s (10^6 bytes/s)", &series);
        std::io::Write::write_all(file, doc.as_bytes()).map_err(|e| Failure::os(format!("writing {}", path.display()), e))?;
        info!("wrote {}", path.display());
    }
    Ok(())
}

/// Connects, writes the region once, then runs every pattern of
/// `patterns` on `n` connections at once for `seconds` each after a short
/// warm-up, calling `each` as a pattern is done. Each pattern runs on
/// connections of its own, after the region is written on first ones, so
/// that a server's per-connection log describes one pattern.
fn run_list(
    connect: &Addr,
    n: usize,
    seconds: u32,
    patterns: &[Pattern],
    mut each: impl FnMut(&Measured),
) -> Result<Vec<Measured>, Failure> {
    let mut bufs = bufs_for(patterns, n);
    fill(connect, &mut bufs)?;
    let measure = Duration::from_secs(u64::from(seconds));
    let mut rows = Vec::with_capacity(patterns.len());
    let mut sorted = Vec::new();
    for (i, p) in patterns.iter().enumerate() {
        let t = measure_one(connect, p, i, measure, &mut bufs)?;
        sorted.clear();
        bufs.iter().for_each(|b| sorted.extend_from_slice(&b.samples));
        sorted.sort_unstable();
        let m = Measured::new(p, &t, &sorted);
        each(&m);
        rows.push(m);
    }
    Ok(rows)
}

/// Several servers compared: every pattern's time is cut into 1 s slices,
/// which the servers take in turn, reversing the order each round (A B B
/// A ...), so that a machine whose speed drifts during the run (other
/// tenants, clocks) moves every server alike, and the ratio of each to the
/// first compares like with like. With several connections, a server's
/// turn drives them all at once. Prints a table row per server and
/// pattern, then the `bench: server=LABEL ...` lines and the ratios.
pub fn compare(servers: &Servers, seconds: u32) -> Result<(), Failure> {
    let list = servers.list;
    let names: Vec<&str> = list.iter().map(|(_, label)| label.as_str()).collect();
    say(&format!(
        "nbd-vram bench: {} in turns{}, {seconds} slice(s) of 1 s per pattern each",
        names.join(", "),
        servers.several(" each")
    ));
    say(&format!("{:<10} {}", "server", table_head()));
    let mut bufs = bufs_for(&PATTERNS, servers.connections);
    for (connect, _) in list {
        fill(connect, &mut bufs)?;
    }
    let mut rows: Vec<Vec<Measured>> = vec![Vec::with_capacity(PATTERNS.len()); list.len()];
    for (i, p) in PATTERNS.iter().enumerate() {
        let mut tallies = vec![vec![Tally::default(); servers.connections]; list.len()];
        let mut samples = vec![Vec::new(); list.len()];
        for round in 0..seconds as usize {
            for k in 0..list.len() {
                let k = if round % 2 == 0 { k } else { list.len() - 1 - k };
                let each = measure_one(&list[k].0, p, i, Duration::from_secs(1), &mut bufs)?;
                for ((sum, t), b) in tallies[k].iter_mut().zip(each).zip(&bufs) {
                    (sum.ios, sum.bytes, sum.secs) = (sum.ios + t.ios, sum.bytes + t.bytes, sum.secs + t.secs);
                    samples[k].extend_from_slice(&b.samples);
                }
            }
        }
        for (k, sample) in samples.iter_mut().enumerate() {
            sample.sort_unstable();
            let m = Measured::new(p, &tallies[k], sample);
            say_all(m.table_rows(&format!("{:<10} ", names[k])));
            rows[k].push(m);
        }
    }
    for (name, own) in names.iter().zip(&rows) {
        for m in own {
            say_all(m.lines(&format!("server={name} ")));
        }
    }
    for (name, own) in names.iter().zip(&rows).skip(1) {
        for (m, base) in own.iter().zip(&rows[0]) {
            let (row, base) = (&m.row, &base.row);
            say(&format!("bench: ratio={name}/{} pattern={} mbps={:.3}", names[0], row.pattern, row.mbps / base.mbps));
        }
    }
    Ok(())
}

/// Buffers for the deepest and largest of `patterns`, one set for each of
/// `n` connections.
fn bufs_for(patterns: &[Pattern], n: usize) -> Vec<Bufs> {
    let depth = patterns.iter().map(|p| p.depth).max().unwrap_or(1);
    let payload = patterns.iter().map(|p| p.depth * p.len as usize).max().unwrap_or(0);
    (0..n).map(|_| Bufs::new(depth.max(8), payload.max(8 * MIB as usize), SAMPLES / n)).collect()
}

/// Writes the server's region once, so that reads find data: each of the
/// connections (one per `bufs`, of their own) writes its own part.
fn fill(connect: &Addr, bufs: &mut [Bufs]) -> Result<(), Failure> {
    let at = Shown(connect);
    let conns = Conns::open(connect, bufs.len(), true)?;
    let (part, n) = (conns.part(), bufs.len() as u64);
    let fill = Spec { write: true, len: MIB, depth: 8, random: false, seed: 1 };
    info!("{at}: writing {} MiB once, so that reads find data", (part * n) >> 20);
    let results = conns.drive(&fill, Stop::Count(part / u64::from(MIB)), bufs);
    let t = all_or_first_error(results).map_err(|e| Failure::new(Code::Other, format!("{at}: writing the export: {e}")))?;
    let secs = t.iter().map(|t| t.secs).fold(0.0, f64::max);
    info!("{at}: written in {secs:.2} s ({:.0} MB/s)", (part * n) as f64 / secs.max(1e-9) / 1e6);
    Ok(())
}

/// Runs pattern `p`, number `i` of its list (its seed), on connections of
/// its own (one per `bufs`) for `measure`, after a short warm-up; returns
/// each one's tally and leaves its latencies in its `Bufs::samples`. A
/// connection on which no request completed is an error.
fn measure_one(connect: &Addr, p: &Pattern, i: usize, measure: Duration, bufs: &mut [Bufs]) -> Result<Vec<Tally>, Failure> {
    let fail = |what: String| Failure::new(Code::Other, format!("{}: {}: {what}", Shown(connect), p.name));
    let warmup = (measure / 5).min(Duration::from_millis(500));
    let conns = Conns::open(connect, bufs.len(), false)?;
    let spec = Spec { write: p.write, len: p.len, depth: p.depth, random: p.random, seed: 0x9e37_79b9 + i as u64 };
    let each = all_or_first_error(conns.drive(&spec, Stop::Timed { warmup, measure }, bufs)).map_err(fail)?;
    if let Some(k) = each.iter().position(|t| t.ios == 0) {
        let on = if each.len() > 1 { format!(" on connection {} of {}", k + 1, each.len()) } else { String::new() };
        return Err(fail(format!("no request completed{on} in {} s", measure.as_secs())));
    }
    Ok(each)
}

/// Every connection's tally, or the first error, naming its connection
/// where there were several.
fn all_or_first_error(results: Vec<Result<Tally, String>>) -> Result<Vec<Tally>, String> {
    let n = results.len();
    results
        .into_iter()
        .enumerate()
        .map(|(k, r)| r.map_err(|e| if n > 1 { format!("connection {} of {n}: {e}", k + 1) } else { e }))
        .collect()
}

/// The bytes the patterns use: whole MiB, at most `MAX_REGION`. Refuses
/// exports the patterns cannot run on.
fn check_export(e: &client::Export) -> Result<u64, String> {
    if u32::from(e.flags) & sys::NBD_FLAG_READ_ONLY != 0 {
        return Err("the export is read-only, and bench writes".into());
    }
    let region = e.size.min(MAX_REGION) / u64::from(MIB) * u64::from(MIB);
    if region == 0 {
        return Err(format!("the export has {} bytes; bench needs at least 1 MiB", e.size));
    }
    if BLOCK % u64::from(e.min_block) != 0 {
        return Err(format!("the server needs requests in multiples of {} bytes; bench sends 4 KiB ones", e.min_block));
    }
    if e.max_block < MIB {
        return Err(format!("the server takes requests of at most {} bytes; bench sends 1 MiB ones", e.max_block));
    }
    Ok(region)
}

/// Nearest-rank percentile of ascending `sorted`; 0 when empty.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn size(len: u32) -> String {
    if len % MIB == 0 {
        format!("{}M", len / MIB)
    } else {
        format!("{}K", len / KIB)
    }
}

/// A line on stdout; a closed stdout (`| head`) is not worth failing over.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[7], 50.0), 7);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[1, 2], 50.0), 1);
        assert_eq!(percentile(&[1, 2], 99.0), 2);
        assert_eq!(percentile(&[], 50.0), 0);
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 99.0), 990);
    }

    #[test]
    fn rows_print_for_people_and_scripts() {
        let row = Row {
            pattern: "rand-read-4k-qd32",
            len: 4096,
            depth: 32,
            ios: 9,
            mbps: 123.456,
            iops: 30140.2,
            p50_us: 51.25,
            p99_us: 250.0,
        };
        assert_eq!(row.line(), "bench: pattern=rand-read-4k-qd32 mbps=123.5 iops=30140 p50_us=51.2 p99_us=250.0");
        let t = row.table_row();
        assert!(t.starts_with("rand-read-4k-qd32        4K  32     123.5     30140"), "{t}");
        assert_eq!(t.chars().count(), table_head().chars().count());
        assert_eq!(size(1 << 20), "1M");
        assert_eq!(size(128 << 10), "128K");
    }

    #[test]
    fn several_connections_add_up_and_print_each() {
        let p = &PATTERNS[6];
        let t = |ios: u64| Tally { ios, bytes: ios * 4096, secs: 2.0 };
        let one = Measured::new(p, &[t(100)], &[5000, 7000]);
        assert!(one.conns.is_empty());
        assert_eq!(one.lines(""), [one.row.line()], "one connection prints as ever");
        assert_eq!(one.table_rows(""), [one.row.table_row()]);

        let m = Measured::new(p, &[t(100), t(300)], &[1000, 2000, 3000, 4000]);
        assert_eq!((m.row.ios, m.row.iops, m.row.p50_us, m.row.p99_us), (400, 200.0, 2.0, 4.0));
        assert!((m.row.mbps - 0.8192).abs() < 1e-9);
        assert_eq!(
            m.lines("server=a "),
            [
                "bench: server=a pattern=rand-read-4k-qd32 mbps=0.8 iops=200 p50_us=2.0 p99_us=4.0 conns=2",
                "bench: server=a conn=0 pattern=rand-read-4k-qd32 mbps=0.2 iops=50",
                "bench: server=a conn=1 pattern=rand-read-4k-qd32 mbps=0.6 iops=150",
            ]
        );
        let rows = m.table_rows("");
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[2], "  conn 1                              0.6       150");
        // MB/s and IOPS stand under their columns.
        let head = table_head();
        assert_eq!(rows[2].find("0.6").map(|i| i + 3), head.find("MB/s").map(|i| i + 4));
        assert_eq!(rows[2].len(), head.find("IOPS").unwrap() + 4);
    }

    #[test]
    fn patterns_are_the_documented_eight() {
        let names: Vec<&str> = PATTERNS.iter().map(|p| p.name).collect();
        assert_eq!(names.len(), 8);
        assert!(PATTERNS.iter().all(|p| p.len % BLOCK as u32 == 0 && (p.depth == 8) != p.random));
        assert!(PATTERNS.iter().filter(|p| p.random).all(|p| p.len == 4096 && [1, 32].contains(&p.depth)));
        let sizes: Vec<u32> = SWEEP.iter().filter(|p| p.write).map(|p| p.len / KIB).collect();
        assert_eq!(sizes, [4, 16, 64, 128, 512, 1024]);
        assert!(SWEEP.chunks(2).all(|c| !c[0].write && c[1].write && c[0].len == c[1].len));
        assert!(SWEEP.iter().all(|p| p.depth == 8 && !p.random && p.name.starts_with("sweep-")));
    }

    #[test]
    fn exports_bench_cannot_use_are_refused() {
        let ok = client::Export { size: 5 << 30, flags: 1, min_block: 512, max_block: 32 << 20 };
        assert_eq!(check_export(&ok), Ok(MAX_REGION));
        assert_eq!(check_export(&client::Export { size: (64 << 20) + 4096, ..ok }), Ok(64 << 20));
        assert!(check_export(&client::Export { flags: 3, ..ok }).unwrap_err().contains("read-only"));
        assert!(check_export(&client::Export { size: 4096, ..ok }).unwrap_err().contains("at least 1 MiB"));
        assert!(check_export(&client::Export { min_block: 8192, ..ok }).unwrap_err().contains("multiples"));
        assert!(check_export(&client::Export { max_block: 65536, ..ok }).unwrap_err().contains("at most 65536"));
    }
}
