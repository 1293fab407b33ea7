//! `nbd-vram bench` against `nbd-vram serve --store host`: every pattern
//! runs and prints a machine-readable line with positive figures.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_nbd-vram");

const PATTERNS: [&str; 8] = [
    "seq-write-1m",
    "seq-read-1m",
    "seq-write-128k",
    "seq-read-128k",
    "rand-read-4k-qd1",
    "rand-write-4k-qd1",
    "rand-read-4k-qd32",
    "rand-write-4k-qd32",
];

/// A server child with its unix socket in a scratch directory; both go on
/// drop.
struct Server {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl Server {
    /// `nbd-vram serve --store host`, one client at a time.
    fn start(name: &str) -> Server {
        Server::spawn(name, "nbd-vram serve", |sock| {
            let mut cmd = Command::new(BIN);
            cmd.args(["serve", "--store", "host", "--size", "64", "--listen"]).arg(format!("unix:{}", sock.display()));
            cmd
        })
    }

    /// `nbdkit ARGS`, which serves many connections at once.
    fn nbdkit(name: &str, args: &[&str]) -> Server {
        Server::spawn(name, "nbdkit (tests/deps.sh installs it)", |sock| {
            let mut cmd = Command::new("nbdkit");
            cmd.args(["-f", "-U"]).arg(sock).args(args);
            cmd
        })
    }

    /// Runs the command `serving` makes for a socket path, and waits (up to
    /// 10 s) until the socket exists.
    fn spawn(name: &str, what: &str, serving: impl FnOnce(&Path) -> Command) -> Server {
        let dir = std::env::temp_dir().join(format!("nbd-vram-bench-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a scratch directory");
        let sock = dir.join("s.sock");
        let child = serving(&sock).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap_or_else(|e| panic!("starting {what}: {e}"));
        let server = Server { child, dir, sock };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.sock.exists() {
            assert!(Instant::now() < deadline, "{what} did not create its socket in 10 s");
            thread::sleep(Duration::from_millis(20));
        }
        server
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn bench(sock: &Path, seconds: &str) -> Output {
    bench_labelled(&[(sock, None)], seconds)
}

/// `nbd-vram bench` against each socket, with its `--label` if given.
fn bench_labelled(servers: &[(&Path, Option<&str>)], seconds: &str) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["bench", "--seconds", seconds]);
    for (sock, label) in servers {
        cmd.arg("--connect").arg(format!("unix:{}", sock.display()));
        if let Some(label) = label {
            cmd.args(["--label", label]);
        }
    }
    cmd.output().expect("running nbd-vram bench")
}

/// The number after `prefix` on the line of `stdout` that starts with it.
fn figure(stdout: &str, prefix: &str) -> f64 {
    let line = stdout.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix}:\n{stdout}"));
    line[prefix.len()..].split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn every_pattern_reports_positive_figures() {
    let server = Server::start("ok");
    let out = bench(&server.sock, "1");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {:?}\n{stdout}\n{stderr}", out.status);
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("bench: ")).collect();
    assert_eq!(lines.len(), 8, "{stdout}");
    for (line, name) in lines.iter().zip(PATTERNS) {
        let mut fields = line["bench: ".len()..].split(' ').map(|kv| kv.split_once('=').unwrap_or((kv, "")));
        assert_eq!(fields.next(), Some(("pattern", name)), "{line}");
        let keys: Vec<&str> = fields
            .map(|(k, v)| {
                let n: f64 = v.parse().unwrap_or_else(|_| panic!("{k}={v} is not a number in: {line}"));
                assert!(n > 0.0, "{k} is not positive in: {line}");
                k
            })
            .collect();
        assert_eq!(keys, ["mbps", "iops", "p50_us", "p99_us"], "{line}");
    }
    // The table comes first, one row per pattern.
    for name in PATTERNS {
        assert!(stdout.lines().any(|l| l.starts_with(name)), "no table row for {name}:\n{stdout}");
    }
}

/// Two servers take turns within each pattern: a table row for each, a
/// `bench: server=` line per server and pattern, and the second's ratio to
/// the first, which is what those lines' MB/s say.
#[test]
fn two_servers_are_compared_pattern_by_pattern() {
    let (a, b) = (Server::start("a"), Server::start("b"));
    let out = bench_labelled(&[(&a.sock, Some("first")), (&b.sock, Some("second"))], "1");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench failed: {:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let mbps = |server: &str, name: &str| figure(&stdout, &format!("bench: server={server} pattern={name} mbps="));
    for name in PATTERNS {
        for server in ["first", "second"] {
            assert!(mbps(server, name) > 0.0, "{server} {name}");
            assert!(stdout.lines().any(|l| l.starts_with(server) && l.contains(name)), "no table row for {server} {name}:\n{stdout}");
        }
        let ratio = figure(&stdout, &format!("bench: ratio=second/first pattern={name} mbps="));
        let want = mbps("second", name) / mbps("first", name);
        assert!((ratio - want).abs() < 0.002 + want * 0.002, "{name}: ratio {ratio}, MB/s say {want}");
    }
}

#[test]
fn no_server_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("nbd-vram-bench-{}-none.sock", std::process::id()));
    let out = bench(&dir, "1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no such socket: is the server running?"), "{stderr}");
}

/// A plot that cannot be written fails before the sweep, which takes
/// half a minute a server or more, not after it.
#[test]
fn an_unwritable_plot_fails_first() {
    let sock = std::env::temp_dir().join(format!("nbd-vram-bench-{}-plot.sock", std::process::id()));
    let connect = format!("unix:{}", sock.display());
    let out = Command::new(BIN).args(["bench", "--sweep", "--svg", "/dev/null/plot.svg", "--connect", &connect]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/dev/null/plot.svg"), "{stderr}");
}

/// The number after `key=` in a `bench:` line.
fn value(line: &str, key: &str) -> f64 {
    let v = line.split(' ').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='));
    v.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no number {key}= in: {line}"))
}

fn bench_connections(sock: &Path, connections: &str) -> Output {
    Command::new(BIN)
        .args(["bench", "--seconds", "1", "--connections", connections, "--connect"])
        .arg(format!("unix:{}", sock.display()))
        .output()
        .expect("running nbd-vram bench")
}

/// `--verify` against a server that takes only whole 4 KiB blocks (nbdkit's
/// blocksize-policy filter, which fails any other request) sends it none
/// other, and passes.
#[test]
fn verify_keeps_to_the_servers_minimum_block() {
    let server = Server::nbdkit(
        "blocks",
        &["--filter=blocksize-policy", "memory", "64M", "blocksize-minimum=4096", "blocksize-preferred=4096", "blocksize-error-policy=error"],
    );
    let out = Command::new(BIN).args(["bench", "--verify", "--connect"]).arg(format!("unix:{}", server.sock.display())).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("verify: PASS"), "{stdout}");
}

/// Two connections at once: each pattern's line gives the sum, with
/// `conns=2`, and a `conn=0` and a `conn=1` line follow it, whose MB/s and
/// IOPS add up to the sum's within rounding.
#[test]
fn two_connections_report_the_sum_and_each() {
    let server = Server::nbdkit("conns", &["memory", "256M"]);
    let out = bench_connections(&server.sock, "2");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench failed: {:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.lines().filter(|l| l.starts_with("bench: ")).count(), 3 * 8, "{stdout}");
    let line = |start: String| {
        stdout.lines().find(|l| l.starts_with(&start)).unwrap_or_else(|| panic!("no {start}:\n{stdout}"))
    };
    for name in PATTERNS {
        let sum = line(format!("bench: pattern={name} mbps="));
        assert!(sum.ends_with(" conns=2") && sum.contains(" p50_us=") && sum.contains(" p99_us="), "{sum}");
        let each = [0, 1].map(|i| line(format!("bench: conn={i} pattern={name} mbps=")));
        // Each figure is rounded to 0.1 MB/s or to 1 IOPS.
        for (key, slack) in [("mbps", 0.15), ("iops", 1.5)] {
            let parts = each.map(|l| value(l, key));
            assert!(parts.iter().all(|&v| v > 0.0), "{name} {key}: {parts:?}");
            let total = value(sum, key);
            assert!((total - parts.iter().sum::<f64>()).abs() <= slack + 1e-9, "{name} {key}: {total} vs {parts:?}");
        }
    }
    assert!(stdout.lines().any(|l| l.starts_with("  conn 1 ")), "a table row per connection:\n{stdout}");
}

/// A server that takes one client at a time (ours) leaves the second
/// connection without a greeting: bench says so by its handshake deadline
/// (30 s) instead of hanging; one that turns it away (nbdkit's limit
/// filter) is named at once.
#[test]
fn one_client_at_a_time_is_a_clear_error_not_a_hang() {
    let ours = Server::start("one-at-a-time");
    let start = Instant::now();
    let out = bench_connections(&ours.sock, "2");
    let (took, stderr) = (start.elapsed(), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("reading the greeting: the server did not answer in time"), "{stderr}");
    assert!(stderr.contains("connection 2 of 2 failed") && stderr.contains("--connections 1"), "{stderr}");
    assert!(took < Duration::from_secs(45), "took {took:?}");

    let limited = Server::nbdkit("limit", &["--filter=limit", "memory", "64M", "limit=1"]);
    let out = bench_connections(&limited.sock, "3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the server closed the connection; connection 2 of 3 failed"), "{stderr}");
}
