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

/// A scratch directory with a serve-mode child in it; both go on drop.
struct Server {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl Server {
    fn start(name: &str) -> Server {
        let dir = std::env::temp_dir().join(format!("nbd-vram-bench-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a scratch directory");
        let sock = dir.join("s.sock");
        let child = Command::new(BIN)
            .args(["serve", "--store", "host", "--size", "64", "--listen"])
            .arg(format!("unix:{}", sock.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nbd-vram serve");
        let server = Server { child, dir, sock };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.sock.exists() {
            assert!(Instant::now() < deadline, "the server did not create its socket in 10 s");
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
