//! What a user of `nbd-vram serve` sees: the socket's mode, a second server
//! on a live socket, a stale socket, TCP, bad flags, `--help`.

mod common;

use std::net::TcpListener;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::process::Command;
use std::time::Duration;

use common::raw::Nbd;
use common::{run, Output, Server, TempDir, BIN, MIB};

fn nbd_vram(args: &[&str]) -> Output {
    run(Command::new(BIN).args(args), Duration::from_secs(30))
}

/// Exit status `code`, and stderr mentioning each of `says`.
fn assert_fails(out: &Output, code: i32, says: &[&str]) {
    assert_eq!(out.status.code(), Some(code), "stderr:\n{}", out.stderr);
    for s in says {
        assert!(out.stderr.contains(s), "stderr should mention {s:?}:\n{}", out.stderr);
    }
}

#[test]
fn unix_socket_is_mode_0600() {
    let server = Server::start(MIB);
    let meta = std::fs::metadata(&server.sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
}

#[test]
fn second_server_on_a_live_socket_fails_and_leaves_the_first_serving() {
    let mut first = Server::start(MIB);
    let mut c = Nbd::connect(&first.sock);
    assert_eq!(c.write(0, b"first"), 0);
    c.disconnect();
    let listen = format!("unix:{}", first.sock.display());
    let out = nbd_vram(&["serve", "--listen", &listen, "--store", "host", "--size", "1"]);
    assert!(!out.status.success());
    assert_fails(&out, 6, &[first.sock.to_str().unwrap(), "another server is listening"]);
    // The first server still owns the path, with its data.
    let mut c = Nbd::connect(&first.sock);
    assert_eq!(c.size, MIB);
    assert_eq!(c.read(0, 5), Ok(b"first".to_vec()));
    c.disconnect();
    first.assert_alive();
}

#[test]
fn stale_socket_is_replaced() {
    let dir = TempDir::new();
    let sock = dir.path("sock");
    drop(UnixListener::bind(&sock).unwrap()); // leaves the file, with nobody listening
    let listen = format!("unix:{}", sock.display());
    let mut server = Server::start_listen(dir, sock, &listen, MIB);
    let c = Nbd::connect(&server.sock);
    assert_eq!(c.size, MIB);
    c.disconnect();
    server.assert_alive();
}

/// Only a stale socket may be replaced: as root, `--listen unix:/etc/passwd`
/// must not delete /etc/passwd.
#[test]
fn an_existing_regular_file_is_left_alone() {
    let dir = TempDir::new();
    let path = dir.path("notes.txt");
    std::fs::write(&path, "precious").unwrap();
    let listen = format!("unix:{}", path.display());
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", &listen, "--store", "host", "--size", "1"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let status = loop {
        match child.try_wait().unwrap() {
            Some(status) => break Some(status),
            None if std::time::Instant::now() > deadline => break None,
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(std::fs::read_to_string(&path).ok().as_deref(), Some("precious"), "the file was replaced");
    assert!(status.is_some_and(|s| !s.success()), "serve should refuse the path, got {status:?}");
}

#[test]
fn serves_over_tcp() {
    // A port that was free a moment ago.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = TempDir::new();
    let listen = format!("tcp:127.0.0.1:{port}");
    let mut server = Server::start_listen(dir, Default::default(), &listen, 2 * MIB);
    let uri = format!("nbd://127.0.0.1:{port}");
    let out = run(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "write -P 0x7e 4095 70000", "-c", "read -P 0x7e 4095 70000"]), Duration::from_secs(30));
    out.assert_success("qemu-io over tcp");
    assert!(out.stdout.contains("read 70000/70000") && !out.stdout.contains("fail"), "{}", out.stdout);
    let info = run(Command::new("nbdinfo").args(["--size", &uri]), Duration::from_secs(30));
    assert_eq!(info.stdout.trim(), (2 * MIB).to_string());
    server.assert_alive();
}

/// A port in use is "busy" (exit 6), as a unix socket another server
/// listens on is.
#[test]
fn a_tcp_port_in_use_is_busy() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = format!("tcp:{}", taken.local_addr().unwrap());
    let out = nbd_vram(&["serve", "--listen", &listen, "--store", "host", "--size", "1"]);
    assert_fails(&out, 6, &[&listen, "another server is listening there"]);
}

/// A name or port 0 is served where it bound, and the log says where.
#[test]
fn the_log_names_the_tcp_address_bound() {
    let mut server = Server::start_listen(TempDir::new(), Default::default(), "tcp:localhost:0", MIB);
    let log = server.log();
    let bound = log.lines().find_map(|l| l.strip_prefix("nbd-vram: serving 1 MiB on tcp:")).unwrap_or_else(|| panic!("no address bound in the log:\n{log}"));
    assert!(!bound.ends_with(":0"), "port 0 logged, not the port bound: {bound}");
    let info = run(Command::new("nbdinfo").args(["--size", &format!("nbd://{bound}")]), Duration::from_secs(30));
    assert_eq!(info.stdout.trim(), MIB.to_string(), "{}", info.stderr);
    server.assert_alive();
}

/// `stop` and `--device` take NBD devices only: another block device,
/// a file or a name that is not there is the caller's mistake (exit 2),
/// not a daemon that died nor a module to load.
#[test]
fn stop_and_device_refuse_what_is_no_nbd_device() {
    assert_fails(&nbd_vram(&["stop", "/dev/null"]), 2, &["/dev/null", "not an NBD device"]);
    assert_fails(&nbd_vram(&["stop", "/tmp"]), 2, &["/tmp", "not an NBD device"]);
    assert_fails(&nbd_vram(&["stop", "/dev/nbd-vram-no-such-device"]), 2, &["no such device"]);
    assert_fails(&nbd_vram(&["--store", "host", "--size", "1M", "--device", "/dev/null"]), 2, &["--device /dev/null", "not an NBD device"]);
}

/// NBD has no authentication: listening where other hosts reach it must be
/// asked for by name, and is then warned about.
#[test]
fn tcp_beyond_loopback_is_refused_without_allow_remote() {
    for host in ["0.0.0.0", "[::]"] {
        let listen = format!("tcp:{host}:10809");
        let out = nbd_vram(&["serve", "--listen", &listen, "--store", "host", "--size", "1"]);
        assert_fails(&out, 2, &[&listen, "no authentication", "--allow-remote", "tunnel"]);
    }
}

#[test]
fn allow_remote_serves_on_every_interface_and_warns() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("tcp:0.0.0.0:{port}");
    let mut server = Server::start_with(TempDir::new(), Default::default(), &listen, MIB, &["--allow-remote"]);
    let info = run(Command::new("nbdinfo").args(["--size", &format!("nbd://127.0.0.1:{port}")]), Duration::from_secs(30));
    assert_eq!(info.stdout.trim(), MIB.to_string(), "{}", info.stderr);
    let log = server.log();
    assert!(log.contains(&listen) && log.contains("no authentication") && log.contains("--allow-remote"), "{log}");
    server.assert_alive();
}

#[test]
fn bad_size_exits_2_and_says_why() {
    let dir = TempDir::new();
    let listen = format!("unix:{}", dir.path("sock").display());
    let out = nbd_vram(&["serve", "--listen", &listen, "--store", "host", "--size", "6K"]);
    assert_fails(&out, 2, &["--size 6K", "multiple of 4 KiB"]);
    let out = nbd_vram(&["serve", "--listen", &listen, "--store", "host", "--size", "0"]);
    assert_fails(&out, 2, &["--size 0", "positive"]);
    let out = nbd_vram(&["serve", "--listen", &listen, "--store", "host", "--size", "1.5"]);
    assert_fails(&out, 2, &["--size 1.5", "not a size"]);
    assert!(!dir.path("sock").exists(), "no socket for a refused command line");
}

#[test]
fn unknown_flag_and_missing_listen_exit_2() {
    let out = nbd_vram(&["serve", "--bogus"]);
    assert_fails(&out, 2, &["unknown argument '--bogus'", "--help"]);
    let out = nbd_vram(&["serve", "--store", "host", "--size", "1"]);
    assert_fails(&out, 2, &["--listen"]);
    let out = nbd_vram(&["serve", "--listen", "nowhere"]);
    assert_fails(&out, 2, &["nowhere", "unix:PATH"]);
    let out = nbd_vram(&["serve", "--listen", "unix:/x", "--priority", "3"]);
    assert_fails(&out, 2, &["--priority", "does not apply to serve"]);
}

#[test]
fn help_exits_0_and_documents_listen() {
    for flag in ["--help", "-h"] {
        let out = nbd_vram(&[flag]);
        out.assert_success(flag);
        assert!(out.stdout.contains("--listen") && out.stdout.contains("serve"), "{}", out.stdout);
        assert!(out.stdout.contains("--allow-remote") && out.stdout.contains("no authentication"), "{}", out.stdout);
        assert!(out.stdout.contains("EXIT CODES"), "{}", out.stdout);
    }
}

/// `nbd-vram status` lists a running serve instance with the traffic it
/// served, as a table and as JSON; a killed one stops being listed.
#[test]
fn status_shows_a_running_server_and_its_traffic() {
    let mut server = Server::start(4 * MIB);
    let mut c = Nbd::connect(&server.sock);
    assert_eq!(c.write(0, &[7u8; 8192]), 0);
    assert_eq!(c.read(0, 4096).unwrap(), vec![7u8; 4096]);
    c.disconnect();
    std::thread::sleep(Duration::from_millis(1500)); // published once a second
    let target = format!("unix:{}", server.sock.display());
    let table = nbd_vram(&["status"]);
    let line = table.stdout.lines().find(|l| l.contains(&target)).unwrap_or_else(|| panic!("{target} not in:\n{}", table.stdout));
    assert!(line.ends_with(" ok"), "not healthy: {line}");
    let json = nbd_vram(&["status", "--json"]);
    let entry = json.stdout.split("},").find(|e| e.contains(&target)).expect("instance in --json");
    assert!(entry.contains("\"written_bytes\":8192") && entry.contains("\"read_bytes\":4096"), "{entry}");
    assert!(entry.contains("\"health\":\"ok\""), "{entry}");
    let _ = server.child.kill();
    let _ = server.child.wait();
    let after = nbd_vram(&["status"]);
    assert!(!after.stdout.contains(&target), "a dead instance is still listed:\n{}", after.stdout);
}

/// Under systemd (JOURNAL_STREAM naming stderr) each log line carries its
/// syslog priority instead of the program name; with the variable
/// inherited but stderr elsewhere, lines stay plain.
#[test]
fn journal_lines_carry_priorities() {
    use std::os::unix::fs::MetadataExt;
    let dir = TempDir::new();
    for journal in [true, false] {
        let path = dir.path(&format!("stderr-{journal}"));
        let err = std::fs::File::create(&path).unwrap();
        let meta = err.metadata().unwrap();
        let stream = if journal { format!("{}:{}", meta.dev(), meta.ino()) } else { "8:1".into() };
        let status = Command::new(BIN)
            .args(["serve", "--listen", "unix:/nonexistent-dir/s", "--store", "host", "--size", "1"])
            .env("JOURNAL_STREAM", &stream)
            .stderr(err)
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(1));
        let text = std::fs::read_to_string(&path).unwrap();
        let last = text.lines().last().unwrap_or_default();
        assert!(last.contains("/nonexistent-dir/s"), "{text}");
        match journal {
            true => assert!(last.starts_with("<3>") && !text.contains("nbd-vram: "), "JOURNAL_STREAM={stream}:\n{text}"),
            false => assert!(last.starts_with("nbd-vram: ") && !text.contains("<3>"), "JOURNAL_STREAM={stream}:\n{text}"),
        }
    }
}

/// Environment knobs are checked before anything starts: a bad value
/// exits 2 naming it, where it once fell back to a default unsaid; good
/// ones are logged once with `--verbose`.
#[test]
fn a_bad_environment_knob_exits_2_and_verbose_logs_the_settings() {
    let dir = TempDir::new();
    let listen = format!("unix:{}", dir.path("sock").display());
    let args = ["serve", "--listen", &listen, "--store", "host", "--size", "1"];
    for (knob, value, says) in [("NBD_VRAM_GROUP", "eight", "give a whole number from 0 to 16"), ("NBD_VRAM_AHEAD", "no", "give 0 or 1")] {
        let out = run(Command::new(BIN).args(args).env(knob, value), Duration::from_secs(30));
        assert_fails(&out, 2, &[&format!("{knob}={value}: {says}")]);
        assert!(!dir.path("sock").exists(), "it listened before checking {knob}");
    }
    // `status` and `stop` must work whatever the environment says.
    let out = run(Command::new(BIN).args(["status"]).env("NBD_VRAM_GROUP", "eight"), Duration::from_secs(30));
    assert_ne!(out.status.code(), Some(2), "{}", out.stderr);
    let out = run(Command::new(BIN).args(["gpus", "-v", "--libcuda", "/nonexistent/libcuda.so.1"]).env("NBD_VRAM_GROUP", "4"), Duration::from_secs(30));
    assert!(out.stderr.contains("settings: Tuning {") && out.stderr.contains("group: 4"), "{}", out.stderr);
}

/// The host store holds its size in memory and little more (staging,
/// buffers, code): all of it is locked, so waste is RAM taken from the
/// machine.
#[test]
fn a_host_store_takes_its_size_in_memory_not_more() {
    let mut server = Server::start(256 * MIB);
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let rss_kib: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches(" kB").parse().ok()).unwrap();
    assert!(rss_kib < (256 + 128) * 1024, "a 256 MiB store took {rss_kib} KiB");
    assert!(rss_kib >= 256 * 1024, "a 256 MiB store is not all touched: {rss_kib} KiB");
    server.assert_alive();
}

/// A serving thread never writes to stderr itself: stderr may wait on a
/// page swapped out to the device being served. Here it is a pipe that
/// nobody reads: after it fills (64 KiB, some 300 "client done" lines),
/// clients are still served, and what did not fit is dropped.
#[test]
fn a_stderr_nobody_reads_never_holds_up_serving() {
    use std::process::Stdio;
    let dir = TempDir::new();
    let sock = dir.path("sock");
    let mut server = Command::new(BIN)
        .args(["serve", "--store", "host", "--size", "16", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..600 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..1000 {
        // A server stuck on its log would leave the greeting unsent: the
        // read times out and fails the test.
        Nbd::go(common::raw::greet(&sock)).disconnect();
    }
    // Nor does the log hold up a stop.
    // SAFETY: signals a child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(server.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = server.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = server.kill();
            panic!("still running 10 s after SIGTERM, its stderr full");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}
