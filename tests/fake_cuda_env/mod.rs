//! The fake CUDA driver (tests/fake_cuda) for integration tests: built once
//! per test process, and an `nbd-vram` child (serve or any other command)
//! that loads it, with the `FAKE_CUDA_*` knobs it is given and none that
//! the environment of `cargo test` happens to hold.
//!
//! Uses `common` (`mod common;` in the test file) for scratch directories
//! and running commands with a time limit.
#![allow(dead_code)]

mod compile;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use std::io::Read;

use crate::common::raw::{Nbd, CMD_FLUSH, CMD_READ};
use crate::common::{self, run, Output, Server, TempDir, BIN, MIB};

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

/// An `LD_PRELOAD` shim whose first `accept4` fails with the errno in
/// `SHIM_ACCEPT_ERRNO` (`accept_fails.c`).
pub fn accept_shim() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| build("accept-shim", "accept_fails.c", "accept_fails.so", &["-shared", "-fPIC", "-O2", "-Wall", "-Wextra"]))
}

/// The fake's own self-test program (`check.c`), compiled like `libcuda()`.
pub fn checker() -> &'static Path {
    static CHECK: OnceLock<PathBuf> = OnceLock::new();
    CHECK.get_or_init(|| build("fake-cuda", "check.c", "check", &["-O2", "-Wall", "-Wextra", "-Werror", "-pthread"]))
}

/// Compiles `source` into `target/tmp/DIR/output` (see `compile`).
fn build(dir: &str, source: &str, output: &str, flags: &[&str]) -> PathBuf {
    compile::compile(&Path::new(env!("CARGO_TARGET_TMPDIR")).join(dir), source, output, flags)
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
    size_mib: u64,
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
            size_mib,
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
        let (size, sock) = (self.size_mib << 20, self.dir.path("sock"));
        let cmd = self.command();
        Server::spawn(cmd, self.dir, sock, size)
    }
}

/// A running `nbd-vram serve --store vram` on the fake driver, killed
/// (SIGKILL) on drop.
pub type VramServer = Server;

// What several of the VRAM tests share.

/// Linux's EIO, as NBD replies carry it.
pub const EIO: u32 = 5;

/// `common::qemu_io` on this server, which must survive it.
pub fn qemu_io(server: &mut VramServer, cmds: &[String]) -> String {
    let text = common::qemu_io(&server.uri(), cmds);
    server.assert_alive();
    text
}

/// Reads `want.len()` bytes at `offset` and asserts they are `want`,
/// saying where they differ rather than printing them.
pub fn read_ok(nbd: &mut Nbd, offset: u64, want: &[u8], what: &str) {
    match nbd.read(offset, want.len() as u32) {
        Ok(got) => {
            let diff = got.iter().zip(want).position(|(a, b)| a != b);
            assert!(diff.is_none(), "{what}: read at {offset} differs from what was written, first at byte {diff:?}");
        }
        Err(e) => panic!("{what}: read at {offset} failed with error {e}"),
    }
}

/// Asserts that a read at `offset` fails with `EIO` (and sends no data).
pub fn read_eio(nbd: &mut Nbd, offset: u64, len: u32, what: &str) {
    match nbd.read(offset, len) {
        Ok(_) => panic!("{what}: read at {offset} succeeded; EIO expected"),
        Err(e) => assert_eq!(e, EIO, "{what}: read at {offset}: error {e}, EIO expected"),
    }
}

/// Reads at `offset` and returns the data, or `None` if the server sent
/// the reply header and then ended the connection instead of the data: a
/// lone read's header goes out while its copy runs, so a copy that then
/// fails can only cut the reply short.
pub fn read_or_cut(nbd: &mut Nbd, offset: u64, len: u32, what: &str) -> Option<Vec<u8>> {
    let cookie = nbd.send(0, CMD_READ, offset, len, &[]);
    assert_eq!(nbd.reply(), (0, cookie), "{what}: the header of a lone read goes out before its copy is done");
    let mut data = vec![0u8; len as usize];
    match nbd.s.read(&mut data) {
        Ok(0) => return None,
        Ok(n) => nbd.s.read_exact(&mut data[n..]).unwrap_or_else(|e| panic!("{what}: {n} bytes of data, then {e}")),
        Err(e) => panic!("{what}: reading the data: {e}"),
    }
    Some(data)
}

/// Asserts the server logged exactly one CUDA failure, `call` failing with
/// CUDA_ERROR_OUT_OF_MEMORY (`FAKE_CUDA_FAIL_COPY`), and that it said which
/// request failed.
pub fn assert_one_copy_error(server: &VramServer, call: &str, request: &str) {
    let log = server.log();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("CUDA_ERROR_")).collect();
    assert_eq!(errors.len(), 1, "one CUDA error expected:\n{log}");
    assert!(errors[0].contains(&format!("{call}: CUDA_ERROR_OUT_OF_MEMORY")), "{log}");
    assert!(log.contains(request), "{request:?} missing from:\n{log}");
}

/// After a device failure: every request answers EIO, on a new connection
/// too, the server lives on, and it said once that data may be lost, with
/// CUDA's `error`.
pub fn assert_lost(server: &mut VramServer, mut nbd: Nbd, error: &str, what: &str) {
    read_eio(&mut nbd, 0, 4096, "after the failure");
    assert_eq!(nbd.write(MIB, &[1; 4096]), EIO, "a write after the failure");
    assert_eq!(nbd.command(0, CMD_FLUSH, 0, 0), EIO, "a flush after the failure");
    nbd.disconnect();
    let mut nbd = Nbd::connect(&server.sock);
    read_eio(&mut nbd, MIB, 4096, "a new connection");
    nbd.disconnect();
    server.assert_alive();
    let log = server.log();
    assert_eq!(log.matches("their data may be lost").count(), 1, "{what}:\n{log}");
    assert!(log.contains(error), "{what}:\n{log}");
    // `status` says so, within the second it takes to publish.
    let target = format!("unix:{}", server.sock.display());
    let health = || {
        let out = run(Command::new(BIN).args(["status", "--json"]), Duration::from_secs(30));
        out.stdout.split("},").find(|e| e.contains(&target)).map(|e| e.contains("\"health\":\"failed\""))
    };
    let failed = (0..30).any(|_| health() == Some(true) || { std::thread::sleep(Duration::from_millis(100)); false });
    assert!(failed, "{what}: nbd-vram status does not show the failed store");
}

/// The mailbox kernel's lone 4 KiB reads and writes the fake ran, and its
/// launches and ends.
pub fn mailbox_counts(server: &VramServer) -> [usize; 4] {
    let log = server.cuda_log();
    let count = |p: &str, q: &str| log.lines().filter(|l| l.starts_with(p) && l.ends_with(q)).count();
    [
        count("nbd_vram_mailbox job ", " read 4096 -> ok"),
        count("nbd_vram_mailbox job ", " write 4096 -> ok"),
        count("launch nbd_vram_mailbox -> ok", ""),
        count("nbd_vram_mailbox ended", " jobs"),
    ]
}

/// The serve loop polls (so requests come back to back, and the mailbox
/// kernel runs) only with a second CPU. These tests make it poll 100 ms, so
/// that a busy machine does not make it sleep between their requests.
pub fn polls() -> bool {
    std::thread::available_parallelism().is_ok_and(|n| n.get() > 1)
}

pub const SPIN_US: &str = "100000";

/// An 8 MiB server whose mailbox kernel can run (batches on, polling as
/// above), with `env` added; `None` on one CPU.
pub fn mailbox_server(env: &[(&str, &str)]) -> Option<VramServer> {
    if !polls() {
        eprintln!("one CPU: the loop never polls, so the mailbox kernel never starts");
        return None;
    }
    let serve = Serve::new(8).env("NBD_VRAM_BATCH", "1").env("NBD_VRAM_SPIN", SPIN_US);
    Some(env.iter().fold(serve, |serve, &(k, v)| serve.env(k, v)).start())
}

/// Runs `attempt` on up to five fresh mailbox servers until it returns
/// true: each runs its requests back to back, which a loaded machine can
/// delay past the loop's poll (the kernel then parks, and counts move).
pub fn on_a_quiet_try(env: &[(&str, &str)], attempt: impl Fn(&mut VramServer, Nbd) -> bool) {
    for _ in 0..5 {
        let Some(mut server) = mailbox_server(env) else { return };
        let nbd = Nbd::connect(&server.sock);
        if attempt(&mut server, nbd) {
            return;
        }
        eprintln!("a try was not back to back:\n{}", server.cuda_log());
    }
    panic!("five tries, none back to back ({env:?})");
}

/// The mailbox kernel's lists the fake ran.
pub fn mailbox_lists(server: &VramServer) -> usize {
    server.cuda_log().lines().filter(|l| l.starts_with("nbd_vram_mailbox job ") && l.contains(" list ") && l.ends_with(" -> ok")).count()
}
