//! The fake CUDA driver (tests/fake_cuda) for integration tests: built once
//! per test process, and an `nbd-vram` child (serve or any other command)
//! that loads it, with the `FAKE_CUDA_*` knobs it is given and none that
//! the environment of `cargo test` happens to hold.
//!
//! Uses `common` (`mod common;` in the test file) for scratch directories
//! and running commands with a time limit.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use crate::common::{run, Output, TempDir, BIN};

const SOURCES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fake_cuda");

/// `target/tmp/fake-cuda/libcuda.so.1`, compiled from `libcuda.c` the
/// first time a test of this process asks (and again if the source is newer).
pub fn libcuda() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| build("fake-cuda", "libcuda.c", "libcuda.so.1", &["-shared", "-fPIC", "-O2", "-Wall", "-Wextra"]))
}

/// The directory of the fake NVML (`libnvidia-ml.c`), for `LD_LIBRARY_PATH`:
/// its own, so that only the tests that ask for it load it.
pub fn nvml_dir() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    let lib = LIB.get_or_init(|| build("fake-nvml", "libnvidia-ml.c", "libnvidia-ml.so.1", &["-shared", "-fPIC", "-O2", "-Wall", "-Wextra"]));
    lib.parent().expect("a directory")
}

/// The fake's own self-test program (`check.c`), compiled like `libcuda()`.
pub fn checker() -> &'static Path {
    static CHECK: OnceLock<PathBuf> = OnceLock::new();
    CHECK.get_or_init(|| build("fake-cuda", "check.c", "check", &["-O2", "-Wall", "-Wextra", "-Werror", "-pthread"]))
}

fn modified(p: &Path) -> Option<SystemTime> {
    fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Compiles `source` into `target/tmp/DIR/output` unless an output at
/// least as new as the source is there. Several test binaries may run at
/// once, so each compiles to its own name and renames into place.
fn build(dir: &str, source: &str, output: &str, flags: &[&str]) -> PathBuf {
    let src = Path::new(SOURCES).join(source);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(dir);
    let out = dir.join(output);
    let src_time = modified(&src).unwrap_or_else(|| panic!("{} is missing", src.display()));
    if modified(&out).is_some_and(|t| t >= src_time) {
        return out;
    }
    fs::create_dir_all(&dir).expect("creating a directory in target/tmp");
    let tmp = dir.join(format!(".{output}.{}", std::process::id()));
    let mut cc = Command::new("cc");
    cc.args(flags).arg("-o").arg(&tmp).arg(&src);
    run(&mut cc, Duration::from_secs(120)).assert_success(&format!("cc {source}"));
    fs::rename(&tmp, &out).expect("moving the fake into place");
    out
}

/// A `Command` for the nbd-vram binary with a clean CUDA environment: no
/// inherited `FAKE_CUDA_*` or `NBD_VRAM_LIBCUDA`, and no `JOURNAL_STREAM`
/// (which would turn the `nbd-vram: ` log prefix into a syslog priority).
pub fn nbd_vram(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("FAKE_CUDA_") || k.starts_with("FAKE_NVML_") || k.starts_with("NBD_VRAM_") || k == "JOURNAL_STREAM") {
            cmd.env_remove(k);
        }
    }
    // One driver call per copy unless a test asks for batches: the failing
    // copy tests count calls, and a failed batch fails all its requests.
    cmd.env("NBD_VRAM_BATCH", "0");
    cmd.args(args).envs(env.iter().copied());
    cmd
}

/// Runs `nbd-vram ARGS` to completion (10 s at most) under `env`.
pub fn run_nbd_vram(args: &[&str], env: &[(&str, &str)]) -> Output {
    run(&mut nbd_vram(args, env), Duration::from_secs(10))
}

/// `nbd-vram serve --store vram --listen unix:DIR/sock --size MiB` with
/// `FAKE_CUDA_LOG=DIR/cuda.log`, the fake given as `--libcuda` unless told
/// otherwise, and whatever else is added.
pub struct Serve {
    dir: TempDir,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// `--libcuda PATH`
    flag: Option<PathBuf>,
    /// `NBD_VRAM_LIBCUDA=PATH`
    env_lib: Option<PathBuf>,
}

impl Serve {
    pub fn new(size_mib: u64) -> Serve {
        Serve {
            dir: TempDir::new(),
            args: vec!["--size".into(), size_mib.to_string()],
            env: Vec::new(),
            flag: Some(libcuda().to_path_buf()),
            env_lib: None,
        }
    }

    /// What `--libcuda` says, if given at all.
    pub fn libcuda_flag(mut self, path: Option<&Path>) -> Serve {
        self.flag = path.map(Path::to_path_buf);
        self
    }

    /// What `NBD_VRAM_LIBCUDA` says, if set at all.
    pub fn libcuda_env(mut self, path: Option<&Path>) -> Serve {
        self.env_lib = path.map(Path::to_path_buf);
        self
    }

    pub fn arg(mut self, a: &str) -> Serve {
        self.args.push(a.to_string());
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Serve {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    fn command(&self) -> Command {
        let listen = format!("unix:{}", self.dir.path("sock").display());
        let mut cmd = nbd_vram(&["serve", "--listen", &listen, "--store", "vram"], &[]);
        cmd.args(&self.args);
        cmd.env("FAKE_CUDA_LOG", self.dir.path("cuda.log"));
        if let Some(path) = &self.flag {
            cmd.arg("--libcuda").arg(path);
        }
        if let Some(path) = &self.env_lib {
            cmd.env("NBD_VRAM_LIBCUDA", path);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Runs a server that is expected to exit on its own (a start-up
    /// failure); returns what it printed and its directory.
    pub fn run_to_exit(self) -> (Output, TempDir) {
        let out = run(&mut self.command(), Duration::from_secs(15));
        (out, self.dir)
    }

    /// Starts it and waits (up to 30 s) until it listens.
    pub fn start(self) -> VramServer {
        let log = fs::File::create(self.dir.path("server.log")).expect("creating server.log");
        let child = self
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting nbd-vram serve");
        let mut server = VramServer { child, sock: self.dir.path("sock"), dir: self.dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        // "nbd-vram: serving N MiB on unix:PATH" comes once the socket
        // listens (not the "...: serving anyway" warnings before it).
        while !server.log().lines().any(|l| l.starts_with("nbd-vram: serving ") && l.contains(" on unix:")) {
            if let Some(status) = server.child.try_wait().expect("try_wait") {
                panic!("nbd-vram serve exited early ({status}):\n{}", server.log());
            }
            assert!(Instant::now() < deadline, "nbd-vram serve did not start in 30 s:\n{}", server.log());
            thread::sleep(Duration::from_millis(10));
        }
        server
    }
}

/// A running `nbd-vram serve --store vram`, killed (SIGKILL) on drop.
pub struct VramServer {
    pub child: Child,
    pub sock: PathBuf,
    /// Last field: removed only after the child is dead.
    pub dir: TempDir,
}

impl VramServer {
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    /// Its stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path("server.log")).unwrap_or_default()
    }

    /// What the fake logged (`FAKE_CUDA_LOG`).
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

impl Drop for VramServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- server log ({}) ---\n{}", self.sock.display(), self.log());
        }
    }
}
