//! Shared by the integration tests: a scratch directory, an `nbd-vram serve`
//! child on a unique unix socket (killed on drop), running client tools
//! with a time limit, and a raw NBD client (`raw`).
//!
//! Each test binary uses only some of these.
#![allow(dead_code)]

pub mod raw;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_nbd-vram");

/// Python with the libnbd bindings (python3-libnbd installs for this one).
pub const PYTHON: &str = "/usr/bin/python3";

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

/// A fresh, empty directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("nbd-vram-test-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("creating a scratch directory");
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A running `nbd-vram serve` (`--store host`, or VRAM on the fake CUDA
/// driver through `fake_cuda_env::Serve`); its stderr goes to `server.log`.
pub struct Server {
    pub child: Child,
    pub sock: PathBuf,
    /// The export size in bytes.
    pub size: u64,
    /// Last field: removed only after the child is dead.
    pub dir: TempDir,
}

impl Server {
    /// Serves `size` bytes on `DIR/sock`.
    pub fn start(size: u64) -> Server {
        let dir = TempDir::new();
        let sock = dir.path("sock");
        let listen = format!("unix:{}", sock.display());
        Server::start_listen(dir, sock, &listen, size)
    }

    /// Serves on any `--listen` address; `sock` is only remembered.
    pub fn start_listen(dir: TempDir, sock: PathBuf, listen: &str, size: u64) -> Server {
        Server::start_with(dir, sock, listen, size, &[])
    }

    /// As `start_listen`, with more serve flags.
    pub fn start_with(dir: TempDir, sock: PathBuf, listen: &str, size: u64, flags: &[&str]) -> Server {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--listen", listen, "--store", "host", "--size", &format!("{}K", size / KIB)]).args(flags);
        Server::spawn(cmd, dir, sock, size)
    }

    /// Starts `cmd`, an `nbd-vram serve` of `size` bytes, with its stderr in
    /// `DIR/server.log`, and waits (up to 30 s) until it listens.
    pub fn spawn(mut cmd: Command, dir: TempDir, sock: PathBuf, size: u64) -> Server {
        let log = fs::File::create(dir.path("server.log")).expect("creating server.log");
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn().expect("starting nbd-vram serve");
        let mut server = Server { child, sock, size, dir };
        // "nbd-vram: serving N MiB on ADDR" is logged once the socket
        // listens (not the "...: serving anyway" warnings before it).
        let deadline = Instant::now() + Duration::from_secs(30);
        while !server.log_now().lines().any(|l| l.starts_with("nbd-vram: serving ") && l.contains(" MiB on ")) {
            if let Some(status) = server.child.try_wait().expect("try_wait") {
                panic!("nbd-vram serve exited early ({status}):\n{}", server.log());
            }
            assert!(Instant::now() < deadline, "nbd-vram serve did not start in 30 s:\n{}", server.log());
            thread::sleep(Duration::from_millis(10));
        }
        server
    }

    /// The NBD URI of the export, for qemu and libnbd.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    /// The server's log as it is.
    pub fn log_now(&self) -> String {
        fs::read_to_string(self.dir.path("server.log")).unwrap_or_default()
    }

    /// The server's log once `line` is in it (at most 10 s): all logged
    /// before it, in order, is there too, as one thread writes the log.
    pub fn log_through(&self, line: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log_now();
            if log.contains(line) || Instant::now() > deadline {
                return log;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether `line` is in the server's log, or comes within 10 s.
    pub fn logged(&self, line: &str) -> bool {
        self.log_through(line).contains(line)
    }

    /// The server's log once it has settled: its lines reach it through a
    /// log thread, a moment after what they report.
    pub fn log(&self) -> String {
        let mut log = self.log_now();
        for _ in 0..40 {
            thread::sleep(Duration::from_millis(50));
            let now = self.log_now();
            if now == log {
                break;
            }
            log = now;
        }
        log
    }

    /// What the fake CUDA driver logged (`FAKE_CUDA_LOG=DIR/cuda.log`), if
    /// it serves VRAM from it.
    pub fn cuda_log(&self) -> String {
        fs::read_to_string(self.dir.path("cuda.log")).unwrap_or_default()
    }

    /// Panics (with the server's log) unless the process is still running.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!("nbd-vram serve died ({status}); its log:\n{}", self.log());
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- server log ({}) ---\n{}", self.sock.display(), self.log());
        }
    }
}

/// What a finished command printed.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Panics, showing everything, unless the command exited 0.
    pub fn assert_success(&self, what: &str) {
        assert!(self.status.success(), "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}", self.status, self.stdout, self.stderr);
    }
}

/// Runs `cmd` to completion, killing it (and failing) after `limit`.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after {limit:?}: killed");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let stdout = out.join().expect("stdout reader");
    let stderr = err.join().expect("stderr reader");
    Output { status, stdout, stderr }
}

/// Deterministic bytes (xorshift), so that failures reproduce.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// `sha256sum FILE`, the hex digest.
pub fn sha256(file: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(file), Duration::from_secs(60));
    out.assert_success("sha256sum");
    out.stdout.split_whitespace().next().expect("a digest").to_string()
}

/// One qemu-io session (one NBD connection) of `cmds` against `uri`.
/// qemu-io can exit 0 after a failed command, so the output must also show
/// no failure and one "read/wrote/discard N/N bytes" line per I/O command.
pub fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = run(&mut cmd, Duration::from_secs(60));
    let text = format!("{}{}", out.stdout, out.stderr);
    out.assert_success("qemu-io");
    let lower = text.to_lowercase();
    assert!(!lower.contains("fail") && !lower.contains("error"), "qemu-io reported a failure:\n{text}");
    let io = cmds.iter().filter(|c| !c.starts_with("flush") && !c.starts_with("aio_flush")).count();
    let done = text.lines().filter(|l| l.starts_with("read ") || l.starts_with("wrote ") || l.starts_with("discard ")).count();
    assert_eq!(done, io, "expected {io} completed I/O commands:\n{text}");
    text
}
