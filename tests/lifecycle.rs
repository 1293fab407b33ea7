//! Stopping a VRAM server by signal, on the fake CUDA driver, which starts
//! threads in `cuInit` as the real one does: every thread of the process
//! blocks the signals nbd-vram takes, so a stop is always its own clean
//! exit and never the signal's default action, idle or under traffic.

mod common;
mod fake_cuda_env;

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::pattern;
use common::raw::Nbd;
use fake_cuda_env::{Serve, VramServer};

/// SIGHUP, SIGINT, SIGUSR1 (the daemon's wake-up) and SIGTERM, as bits of
/// /proc's `SigBlk` mask (bit N-1 for signal N).
const TAKEN: u64 = 1 << (libc::SIGHUP - 1) | 1 << (libc::SIGINT - 1) | 1 << (libc::SIGUSR1 - 1) | 1 << (libc::SIGTERM - 1);

/// Each task's name, `SigBlk` mask and whether it sits in
/// `rt_sigtimedwait`, which unblocks the signals it waits for meanwhile.
fn masks(pid: u32) -> Vec<(String, u64, bool)> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).expect("the server's /proc/PID/task");
    tasks
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let status = fs::read_to_string(dir.join("status")).ok()?;
            let waits = fs::read_to_string(dir.join("syscall")).is_ok_and(|s| s.split_whitespace().next() == Some("128"));
            Some((status, waits))
        })
        .map(|(status, waits)| {
            let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).unwrap_or("").trim().to_string();
            (field("Name:"), u64::from_str_radix(&field("SigBlk:"), 16).unwrap_or(0), waits)
        })
        .collect()
}

/// Every thread blocks the signals taken, the fake driver's too (the SM
/// threads it starts in `cuInit`, so at least four beside ours), but the
/// one thread waiting to take them.
fn assert_all_threads_block(server: &VramServer) {
    let masks = masks(server.child.id());
    assert!(masks.len() >= 5, "the fake driver's threads are missing: {masks:?}");
    let takers = masks.iter().filter(|(_, mask, waits)| mask & TAKEN != TAKEN && *waits).count();
    assert!(takers <= 1, "{masks:?}");
    for (name, mask, waits) in &masks {
        assert!(mask & TAKEN == TAKEN || *waits, "thread {name} does not block SIGHUP, SIGINT, SIGUSR1 and SIGTERM: {mask:#x}");
    }
}

/// Sends `sig` and waits up to 10 s: the exit must be a clean 0 with the
/// stop logged, never death by the signal.
fn stop_with(mut server: VramServer, sig: libc::c_int, what: &str) {
    // SAFETY: kill with our child's pid and a valid signal number.
    assert_eq!(unsafe { libc::kill(server.child.id() as libc::pid_t, sig) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = server.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "{what}: still running 10 s after signal {sig}:\n{}", server.log());
        thread::sleep(Duration::from_millis(5));
    };
    assert!(status.success(), "{what}: signal {sig} ended the server with {status}, not exit 0:\n{}", server.log());
    assert!(server.log().lines().any(|l| l == "nbd-vram: stopped"), "{what}: no stop logged:\n{}", server.log());
}

fn mailbox_server() -> VramServer {
    Serve::new(16).env("NBD_VRAM_BATCH", "1").start()
}

#[test]
fn every_thread_blocks_the_stop_signals_and_an_idle_server_stops_cleanly() {
    for round in 0..3 {
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            let server = mailbox_server();
            assert_all_threads_block(&server);
            stop_with(server, sig, &format!("idle, round {round}"));
        }
    }
}

/// Clients write and read back (lone requests, so the mailbox kernel runs
/// too) while the stop comes: one client, and three on as many serving
/// threads (`--connections 3`).
#[test]
fn a_server_under_traffic_stops_cleanly() {
    for (sig, clients) in [(libc::SIGTERM, 1), (libc::SIGINT, 1), (libc::SIGHUP, 1), (libc::SIGTERM, 3)] {
        let server = Serve::new(16).env("NBD_VRAM_BATCH", "1").arg("--connections").arg(&clients.to_string()).start();
        let (go, done) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicU64::new(0)));
        // Their requests fail (a panic in the client) once the server is gone.
        let workers: Vec<_> = (0..clients)
            .map(|i| {
                let (sock, go, done) = (server.sock.clone(), go.clone(), done.clone());
                thread::spawn(move || {
                    let mut nbd = Nbd::connect(&sock);
                    let data = pattern(3 + i, 4096);
                    let mut n = 0u64;
                    while go.load(Ordering::Relaxed) {
                        let at = (i * 1024 + n % 1024) * 4096;
                        assert_eq!(nbd.write(at, &data), 0);
                        assert_eq!(nbd.read(at, 4096).as_deref(), Ok(&data[..]));
                        done.fetch_add(1, Ordering::Relaxed);
                        n += 1;
                    }
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(300));
        assert_all_threads_block(&server);
        stop_with(server, sig, &format!("under traffic from {clients} client(s)"));
        go.store(false, Ordering::Relaxed);
        workers.into_iter().for_each(|w| drop(w.join()));
        assert!(done.load(Ordering::Relaxed) > 0, "no request was served before the stop");
    }
}

/// `resize` wakes a daemon by the pid its status file names; should that
/// daemon have died and the pid gone to another nbd-vram since (here a
/// bench, as long-lived as any), the wake-up must not end that process.
#[test]
fn a_wake_up_meant_for_a_daemon_does_not_end_another_command() {
    let server = common::Server::start(64 << 20);
    let mut bench = std::process::Command::new(common::BIN)
        .args(["bench", "--seconds", "1", "--connect"])
        .arg(format!("unix:{}", server.sock.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("running nbd-vram bench");
    // Its first figures: well past the start, so the signal meets the
    // command itself, not the moments before its mask is set.
    let mut stdout = BufReader::new(bench.stdout.take().expect("bench's stdout"));
    let mut text = String::new();
    while !text.contains("bench: pattern=") && stdout.read_line(&mut text).is_ok_and(|n| n > 0) {}
    // SAFETY: kill with our child's pid, not yet waited for, and a valid
    // signal number.
    assert_eq!(unsafe { libc::kill(bench.id() as libc::pid_t, libc::SIGUSR1) }, 0);
    stdout.read_to_string(&mut text).expect("reading bench's output");
    let status = bench.wait().expect("waiting for nbd-vram bench");
    assert!(status.success(), "SIGUSR1 ended nbd-vram bench with {status}:\n{text}");
    assert_eq!(text.lines().filter(|l| l.starts_with("bench: pattern=")).count(), 8, "{text}");
}
