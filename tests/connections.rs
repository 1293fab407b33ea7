//! Several connections to one store at once (`--connections N`), each
//! served by its own thread with its own copier: data stays intact under
//! concurrent writers, a change answered on one connection is seen by a
//! read or a flush on another, and a device failure on one fails all.

mod common;
mod fake_cuda_env;

use std::sync::Barrier;
use std::time::Duration;

use common::raw::{greet, header, Nbd, Req, CMD_FLUSH, CMD_WRITE, CMD_WRITE_ZEROES};
use common::{pattern, Server, TempDir, KIB, MIB};
use fake_cuda_env::*;

/// NBD_FLAG_CAN_MULTI_CONN ("Transmission flags").
const CAN_MULTI_CONN: u16 = 1 << 8;

fn connect(sock: &std::path::Path) -> Nbd {
    let s = greet(sock);
    // A server that took one client at a time would leave the others
    // hanging: fail instead.
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    Nbd::go(s)
}

/// `n` clients connected at once, each writing and reading back its own
/// quarter-megabyte ranges in sizes that take every copy path (lone 4 KiB
/// by the mailbox kernel, batches, 1 MiB by the copy engine), then each
/// reading another's ranges.
fn concurrent_writers(server: &Server, n: usize) {
    let barrier = Barrier::new(n);
    let sizes = [4 * KIB as usize, 64 * KIB as usize, 12 * KIB as usize, MIB as usize];
    let region = 2 * MIB; // per client
    let data = |i: usize, round: usize, len: usize| pattern((i * 1000 + round) as u64, len);
    std::thread::scope(|s| {
        for i in 0..n {
            let (barrier, sock) = (&barrier, &server.sock);
            s.spawn(move || {
                let mut nbd = connect(sock);
                let multi = nbd.flags & CAN_MULTI_CONN != 0;
                assert_eq!(multi, n > 1, "CAN_MULTI_CONN with {n} connections");
                barrier.wait(); // all in transmission at once
                let base = i as u64 * region;
                for round in 0..24 {
                    let len = sizes[round % sizes.len()];
                    let at = base + (round as u64 * 96 * KIB) % (region - len as u64);
                    let want = data(i, round, len);
                    assert_eq!(nbd.write(at, &want), 0, "client {i} write {round}");
                    read_ok(&mut nbd, at, &want, &format!("client {i} round {round}"));
                }
                // The last write of each client, read back by the next one.
                barrier.wait();
                let j = (i + 1) % n;
                let round = 23;
                let len = sizes[round % sizes.len()];
                let at = j as u64 * region + (round as u64 * 96 * KIB) % (region - len as u64);
                read_ok(&mut nbd, at, &data(j, round, len), &format!("client {i} reads client {j}'s"));
                nbd.disconnect();
            });
        }
    });
}

#[test]
fn several_clients_at_once_keep_their_data_apart() {
    for n in [1, 2, 4] {
        let mut server = Serve::new(16).arg("--connections").arg(&n.to_string()).start();
        concurrent_writers(&server, n);
        server.assert_alive();
        if n > 1 {
            assert!(server.logged(&format!("{n} clients at once")), "{}", server.log());
        }
    }
}

#[test]
fn the_host_store_takes_several_clients_too() {
    let dir = TempDir::new();
    let sock = dir.path("sock");
    let listen = format!("unix:{}", sock.display());
    let mut server = Server::start_with(dir, sock, &listen, 16 * MIB, &["--connections", "3"]);
    concurrent_writers(&server, 3);
    server.assert_alive();
}

/// The host store lands a write's payload in its own bytes and, while
/// the rest has not arrived, saves the bytes it replaces, to put them back
/// if the peer vanishes mid-payload. With one connection that changes
/// nothing; with several, putting them back would undo another
/// connection's write answered meanwhile, so there a payload not yet all
/// here waits in staging instead.
#[test]
fn a_write_cut_short_on_one_connection_undoes_nothing_answered_on_another() {
    let host = |n: usize| {
        let dir = TempDir::new();
        let sock = dir.path("sock");
        let listen = format!("unix:{}", sock.display());
        Server::start_with(dir, sock, &listen, 8 * MIB, &["--connections", &n.to_string()])
    };
    let old = [b'A'; MIB as usize];
    // Sends half a 1 MiB write of Bs to offset 0, waits until the server
    // is inside it, and is gone.
    let cut_short = |mut nbd: Nbd| {
        nbd.send(0, CMD_WRITE, 0, MIB as u32, &[b'B'; 600 * KIB as usize]);
        std::thread::sleep(Duration::from_millis(300));
    };

    let mut alone = host(1);
    let mut a = connect(&alone.sock);
    assert_eq!(a.write(0, &old), 0);
    a.disconnect();
    cut_short(connect(&alone.sock));
    std::thread::sleep(Duration::from_millis(300)); // the server sees the peer gone
    read_ok(&mut connect(&alone.sock), 0, &old, "one connection: the bytes a write cut short replaced are back");
    alone.assert_alive();

    let mut two = host(2);
    let (mut a, b) = (connect(&two.sock), connect(&two.sock));
    assert_eq!(a.write(0, &old), 0);
    std::thread::scope(|s| {
        s.spawn(|| cut_short(b));
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(a.write(0, &[b'C'; 4096]), 0);
    });
    std::thread::sleep(Duration::from_millis(300));
    read_ok(&mut a, 0, &[b'C'; 4096], "a write answered while another connection's write there was cut short");
    a.disconnect();
    two.assert_alive();
}

/// Swap writes a page on one connection and may read it back on another
/// as soon as the write is answered, with no flush between; NBD's
/// multi-connection promise covers a flush. Both must see the write, on
/// every copy path. The fake driver runs each stream's copies as late as
/// it may and never one stream's for another's sync, so an answer given
/// before the copy reached VRAM shows here as old data.
#[test]
fn a_change_answered_on_one_connection_is_seen_on_another() {
    let mut server = Serve::new(8).arg("--connections").arg("2").start();
    let mut a = connect(&server.sock);
    let mut b = connect(&server.sock);
    for (round, len) in [4 * KIB, 4 * KIB, 64 * KIB, 12 * KIB, MIB, 4 * KIB].into_iter().cycle().take(60).enumerate() {
        let (writer, reader) = if round % 2 == 0 { (&mut a, &mut b) } else { (&mut b, &mut a) };
        let at = (round as u64 * 128 * KIB) % (6 * MIB);
        let want = pattern(round as u64 + 7, len as usize);
        assert_eq!(writer.write(at, &want), 0, "write {round}");
        if round % 3 == 0 {
            assert_eq!(reader.command(0, CMD_FLUSH, 0, 0), 0, "flush {round} on the other connection");
        }
        read_ok(reader, at, &want, &format!("round {round}: {len} bytes written on one connection, read on the other"));
        assert_eq!(writer.command(0, CMD_WRITE_ZEROES, at, 4096), 0, "zeroes {round}");
        read_ok(reader, at, &[0; 4096], &format!("round {round}: zeroes on one connection, read on the other"));
    }
    a.disconnect();
    b.disconnect();
    server.assert_alive();
}

/// The same on the kernels' paths, which take only small copies that
/// come without a pause on their connection: two clients at once, each
/// sending its requests in groups, writes of 4 KiB blocks apart (a batch,
/// for the copy kernel or as a list for the mailbox kernel) and writes
/// and reads in turn (lone copies in a row, the mailbox kernel's), and
/// reading the other's blocks back the same two ways as soon as they are
/// answered, with no flush between.
#[test]
fn what_kernels_wrote_for_one_connection_another_reads() {
    const GROUP: u64 = 16;
    // Every other block, so that no two requests merge into one copy.
    let block = |i: usize, k: u64| (i as u64 * 1024 + 2 * k) * 4096;
    let data = |i: usize, round: u64, k: u64| pattern(i as u64 * 1_000_000 + round * 1000 + k, 4096);
    // A loaded machine can keep one connection's requests apart, so that
    // no kernel starts: up to three tries, data checked on every one.
    for _ in 0..3 {
        let mut server = Serve::new(8).arg("--connections").arg("2").env("NBD_VRAM_BATCH", "1").env("NBD_VRAM_SPIN", SPIN_US).start();
        let mut clients = [connect(&server.sock), connect(&server.sock)];
        let scratch = vec![0x5a; 4096];
        for round in 0..4 {
            // Both write at once, then both read the other's at once: a
            // scope each, so that a failure ends the test, not a wait.
            std::thread::scope(|s| {
                for (i, nbd) in clients.iter_mut().enumerate() {
                    s.spawn(move || {
                        let mine: Vec<Vec<u8>> = (0..2 * GROUP).map(|k| data(i, round, k)).collect();
                        let what = format!("client {i} round {round}");
                        let in_turn: Vec<Op> = (GROUP..2 * GROUP).flat_map(|k| [Op::Write(block(i, k), &mine[k as usize]), Op::Read(block(i, k), &mine[k as usize])]).collect();
                        together(nbd, &in_turn, &what);
                        // Last, so that the other reads them while they
                        // may still be queued: writes are answered then.
                        let batch: Vec<Op> = (0..GROUP).map(|k| Op::Write(block(i, k), &mine[k as usize])).collect();
                        together(nbd, &batch, &what);
                    });
                }
            });
            std::thread::scope(|s| {
                for (i, nbd) in clients.iter_mut().enumerate() {
                    let scratch = &scratch;
                    s.spawn(move || {
                        let j = 1 - i;
                        let theirs: Vec<Vec<u8>> = (0..2 * GROUP).map(|k| data(j, round, k)).collect();
                        let what = format!("client {i} round {round}, client {j}'s blocks");
                        let batch: Vec<Op> = (0..GROUP).map(|k| Op::Read(block(j, k), &theirs[k as usize])).collect();
                        together(nbd, &batch, &what);
                        let in_turn: Vec<Op> = (GROUP..2 * GROUP).flat_map(|k| [Op::Read(block(j, k), &theirs[k as usize]), Op::Write(block(i, 2 * GROUP + k), scratch)]).collect();
                        together(nbd, &in_turn, &what);
                    });
                }
            });
        }
        clients.into_iter().for_each(Nbd::disconnect);
        server.assert_alive();
        if !polls() {
            eprintln!("one CPU: requests are never back to back, so the mailbox kernel never starts");
            return;
        }
        let [reads, writes, ..] = mailbox_counts(&server);
        let (lists, launches) = (mailbox_lists(&server), server.cuda_log().matches("launch nbd_vram_copy").count());
        if reads > 0 && writes > 0 && lists + launches > 0 {
            return;
        }
        eprintln!("by the mailbox kernel {reads} lone reads, {writes} lone writes, {lists} lists; {launches} copy kernel launches:\n{}", server.cuda_log());
    }
    panic!("three tries, and the kernels never took both lone copies and batches");
}

/// A lone write the mailbox kernel has is answered only once it is done,
/// as no stream of the other connection waits for it: there a read comes
/// as soon as the answer is in, while the fake runs every job up to 400 µs
/// late (`FAKE_CUDA_LATE_JOBS=1`), as a GPU whose time slice another
/// context has may.
#[test]
fn a_lone_write_by_the_mailbox_kernel_is_done_once_answered() {
    if !polls() {
        eprintln!("one CPU: requests are never back to back, so the mailbox kernel never starts");
        return;
    }
    // Trials whose last write the kernel took, of at most `TRIALS`: a
    // loaded machine can keep requests apart, and the kernel parked.
    const COVERED: usize = 16;
    const TRIALS: u64 = 256;
    let serve = Serve::new(8).arg("--connections").arg("2").env("NBD_VRAM_BATCH", "1").env("NBD_VRAM_SPIN", SPIN_US);
    // A reply group ends at each read, so that no read's wait covers the
    // write after it.
    let mut server = serve.env("NBD_VRAM_GROUP", "1").env("FAKE_CUDA_LATE_JOBS", "1").start();
    let [mut a, mut b] = [connect(&server.sock), connect(&server.sock)];
    let block = |k: usize| k as u64 * 16 * KIB; // apart: no two merge
    // The last write alone is 8 KiB, so that the fake's log tells its job.
    let last_writes = |server: &VramServer| server.cuda_log().lines().filter(|l| l.starts_with("nbd_vram_mailbox job ") && l.ends_with(" write 8192 -> ok")).count();
    let mut covered = 0;
    for trial in 0..TRIALS {
        let (writer, reader) = if trial % 2 == 0 { (&mut a, &mut b) } else { (&mut b, &mut a) };
        let data: Vec<Vec<u8>> = (0..5).map(|k| pattern(trial * 10 + k, if k == 4 { 8192 } else { 4096 })).collect();
        // Writes and reads in turn, the kernel's lone copies; a write last.
        let ops: Vec<Op> = (0..4).flat_map(|k| [Op::Write(block(k), &data[k]), Op::Read(block(k), &data[k])]).chain([Op::Write(block(4), &data[4])]).collect();
        let before = last_writes(&server);
        together(writer, &ops, &format!("trial {trial}"));
        read_ok(reader, block(4), &data[4], &format!("trial {trial}: the last write, read on the other connection once answered"));
        covered += usize::from(last_writes(&server) > before);
        if covered == COVERED {
            break;
        }
    }
    a.disconnect();
    b.disconnect();
    server.assert_alive();
    assert_eq!(covered, COVERED, "the mailbox kernel took the last write of {covered} trials of {TRIALS}:\n{}", server.cuda_log());
}

/// A request of `together`: a write of the data, or a read that must
/// find it.
enum Op<'a> {
    Write(u64, &'a [u8]),
    Read(u64, &'a [u8]),
}

/// Sends `ops` in one go (as one client would queue them), then takes
/// their answers and checks what the reads found.
fn together(nbd: &mut Nbd, ops: &[Op], what: &str) {
    let reqs: Vec<Req> = ops
        .iter()
        .map(|op| match *op {
            Op::Write(at, data) => Req::Write(at, data),
            Op::Read(at, want) => Req::Read(at, want.len() as u32),
        })
        .collect();
    nbd.queue(1, &reqs);
    for (cookie, op) in (1..).zip(ops) {
        assert_eq!(nbd.reply(), (0, cookie), "{what}: a request sent together with others");
        if let Op::Read(at, want) = *op {
            assert!(nbd.data(want.len()) == want, "{what}: the block at {at}");
        }
    }
}

/// FAKE_CUDA_FAIL_SYNC=1: the first wait for handed-over work fails, on
/// one connection; acknowledged data may be gone, so every request on
/// every connection, the other one and new ones, answers EIO from then on.
#[test]
fn a_device_failure_on_one_connection_fails_them_all() {
    let mut server = Serve::new(8).arg("--connections").arg("2").env("FAKE_CUDA_FAIL_SYNC", "1").env("NBD_VRAM_EARLY_HEADER", "0").start();
    let mut a = connect(&server.sock);
    let mut b = connect(&server.sock);
    let data = pattern(5, 4096);
    // Answered once its copy is queued. A flush on the other connection
    // covers it, so its wait (sync 1, which fails) includes that copy.
    assert_eq!(a.write(0, &data), 0, "the write, answered before its copy ran");
    assert_eq!(b.command(0, CMD_FLUSH, 0, 0), EIO, "a flush on the other connection, after the write");
    read_eio(&mut b, 0, 4096, "a read on the other connection");
    assert_eq!(b.write(MIB, &data), EIO, "a write on the other connection");
    assert_eq!(a.command(0, CMD_FLUSH, 0, 0), EIO, "a flush on the first connection");
    b.disconnect();
    assert_lost(&mut server, a, "CUDA_ERROR_ILLEGAL_ADDRESS", "FAIL_SYNC=1 on one of two connections");
}

/// A client beyond `--connections` is turned away after a grace of 1 s,
/// told why in the handshake, with a line in the log: the export says
/// CAN_MULTI_CONN, and a client told so may open more connections than the
/// server serves and would wait for ever on the last. One that comes while
/// a connection is closing is served.
#[test]
fn a_client_beyond_the_limit_is_turned_away() {
    use common::raw::{send_option, option_reply, OPT_ABORT, OPT_GO, REP_ACK, REP_ERR_POLICY};
    let server = Serve::new(8).arg("--connections").arg("2").start();
    let (first, second) = (connect(&server.sock), connect(&server.sock));
    let started = std::time::Instant::now();
    let mut third = greet(&server.sock);
    assert!(started.elapsed() >= Duration::from_millis(900), "turned away before the grace: {:?}", started.elapsed());
    send_option(&mut third, OPT_GO, &[0, 0, 0, 0, 0, 0]);
    let (option, kind, why) = option_reply(&mut third);
    let why = String::from_utf8_lossy(&why);
    assert_eq!((option, kind), (OPT_GO, REP_ERR_POLICY), "a third client was not turned away: {why}");
    assert_eq!(why, "nbd-vram: every one of the 2 connections is in use; open 2 at most");
    send_option(&mut third, OPT_ABORT, &[]);
    assert_eq!(option_reply(&mut third).1, REP_ACK);
    let mut byte = [0u8; 1];
    assert_eq!(std::io::Read::read(&mut third, &mut byte).ok(), Some(0), "the turned-away client was not closed");
    assert!(server.logged("a client was turned away: every one of the 2 connections is in use"), "{}", server.log());
    first.disconnect();
    let mut third = connect(&server.sock);
    read_ok(&mut third, 0, &[0; 4096], "a client once the first left");
    third.disconnect();
    second.disconnect();
}

/// Clients beyond `--connections` wait out their grace side by side: each
/// hears the greeting (here, the refusal) about a second after it came,
/// however many came before it, where one at a time the fourth heard it
/// after 5.5 s. They say nothing, as a stalled client would.
#[test]
fn clients_beyond_the_limit_wait_side_by_side() {
    use std::io::Read;
    let mut server = Serve::new(8).arg("--connections").arg("2").start();
    let (first, second) = (connect(&server.sock), connect(&server.sock));
    let started = std::time::Instant::now();
    let mut silent: Vec<_> = (0..4).map(|_| std::os::unix::net::UnixStream::connect(&server.sock).unwrap()).collect();
    for (i, client) in silent.iter_mut().enumerate() {
        client.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut hello = [0u8; 18];
        client.read_exact(&mut hello).unwrap_or_else(|e| panic!("silent client {i}: no greeting: {e}"));
        let at = started.elapsed();
        assert!(at >= Duration::from_millis(900), "silent client {i} turned away before the grace: {at:?}");
        assert!(at < Duration::from_millis(3500), "silent client {i} heard the greeting after {at:?}: it waited for the clients before it");
    }
    first.disconnect();
    let mut third = connect(&server.sock);
    read_ok(&mut third, 0, &[0; 4096], "a client once the first left");
    third.disconnect();
    second.disconnect();
    server.assert_alive();
}

/// `bench --verify --connections N`, the GPU script's check that a write
/// answered on one connection is seen on another at once: the whole store
/// in 4 MiB requests and, every other chunk, 128 KiB ones (which land in
/// staging around the caches, as other connections write too), and lone
/// 4 KiB reads after writes, every read on another connection than its
/// write.
#[test]
fn bench_verify_reads_each_write_on_another_connection() {
    for n in ["2", "4"] {
        let server = Serve::new(16).arg("--connections").arg(n).env("FAKE_CUDA_MAX_ALLOC_MIB", "8").start();
        let connect = format!("unix:{}", server.sock.display());
        let out = common::run(&mut nbd_vram(&["bench", "--connect", &connect, "--verify", "--connections", n], &[]), Duration::from_secs(120));
        out.assert_success("bench --verify --connections");
        assert!(out.stdout.contains(&format!("verify: PASS, 16 MiB written and read back intact over {n} connections")), "{}", out.stdout);
    }
}

/// nbdcopy, a client nobody here wrote, with 4 threads on 4 connections
/// (it splits a copy into 128 MiB parts, one thread each, and opens as
/// many connections when the server says `CAN_MULTI_CONN`), in 128 KiB
/// requests: the payloads land in staging around the caches, as other
/// connections write too. Copied out again, the data must match.
#[test]
fn nbdcopy_over_four_connections_reads_back_what_it_wrote() {
    let mut server = Serve::new(512).arg("--connections").arg("4").start();
    let (input, output) = (server.dir.path("in.bin"), server.dir.path("out.bin"));
    std::fs::write(&input, pattern(42, 512 * MIB as usize)).expect("writing the input");
    let uri = server.uri();
    let copy = |from: &str, to: &str, what: &str| {
        let args = ["--connections=4", "--threads=4", "--request-size=131072", from, to];
        common::run(std::process::Command::new("nbdcopy").args(args), Duration::from_secs(120)).assert_success(what);
    };
    copy(input.to_str().unwrap(), &uri, "nbdcopy in");
    copy(&uri, output.to_str().unwrap(), "nbdcopy out");
    assert!(std::fs::read(&input).unwrap() == std::fs::read(&output).unwrap(), "data copied out differs from data copied in");
    let served = server.log().matches("client done").count();
    assert!(served >= 8, "nbdcopy did not use 4 connections each way:\n{}", server.log());
    server.assert_alive();
}

/// Accepting that fails for want of memory or descriptors (ENOBUFS here,
/// from an `LD_PRELOAD` shim) ends no server: it says so, and the client,
/// waiting in the listen backlog meanwhile, is served.
#[test]
fn an_accept_out_of_memory_is_waited_out() {
    let dir = TempDir::new();
    let sock = dir.path("sock");
    let mut cmd = std::process::Command::new(common::BIN);
    cmd.args(["serve", "--listen", &format!("unix:{}", sock.display()), "--store", "host", "--size", "1M", "--connections", "2"])
        .env("LD_PRELOAD", accept_shim())
        .env("SHIM_ACCEPT_ERRNO", libc::ENOBUFS.to_string());
    let mut server = Server::spawn(cmd, dir, sock, MIB);
    let mut nbd = connect(&server.sock);
    assert_eq!(nbd.write(0, &[7; 4096]), 0, "a write once accepting works again");
    nbd.disconnect();
    server.assert_alive();
    let log = server.log();
    assert!(log.contains("accept: No buffer space available"), "{log}");
}

/// A client that stops half-way through a write's payload, and one that
/// sends reads and never takes their replies, are each dropped once the
/// stall has lasted the minute a client may take (`serve.rs`, `STALL`),
/// with a message that says so. A third client is served all the while,
/// and the cut write changed nothing.
#[test]
fn stalled_clients_cost_only_their_own_connection() {
    use std::io::{Read, Write};
    use std::time::Instant;
    const STALL: Duration = Duration::from_secs(60);
    const DROPPED: &str = "connection dropped: the client stopped for 60 s in the middle of a request or reply";
    let mut server = Serve::new(8).arg("--connections").arg("3").start();
    let mut cut = connect(&server.sock);
    let stalled = Instant::now();
    cut.s.write_all(&header(0, CMD_WRITE, 1, 0, 4096)).unwrap();
    cut.s.write_all(&[0xAA; 100]).unwrap();
    let mut deaf = connect(&server.sock);
    let reads: Vec<Req> = (0..64).map(|i| Req::Read(i * 64 * KIB, 64 * KIB as u32)).collect();
    deaf.queue(1, &reads); // 4 MiB of replies: far more than a socket holds
    let mut other = connect(&server.sock);
    let mut rounds = 0;
    while server.log_now().matches(DROPPED).count() < 2 {
        assert!(stalled.elapsed() < 2 * STALL, "the stalled clients were not dropped within {:?}:\n{}", 2 * STALL, server.log_now());
        let (at, want) = (MIB + rounds % 64 * 4 * KIB, pattern(rounds, 4 * KIB as usize));
        assert_eq!(other.write(at, &want), 0, "the other client's write {rounds}");
        read_ok(&mut other, at, &want, &format!("the other client's round {rounds}"));
        rounds += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    let after = stalled.elapsed();
    assert!(after >= STALL, "stalled clients dropped after {after:?}, before the minute a stall may last");
    assert!(rounds as f64 >= after.as_secs_f64(), "the other client was served only {rounds} times in {after:?}");
    cut.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    cut.expect_closed();
    // What the server had sent before it stopped sending, then the end (a
    // reset, where it had not read every request).
    deaf.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (mut taken, mut buf) = (0, vec![0u8; 64 * KIB as usize]);
    loop {
        match deaf.s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => taken += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the client that took no replies, after {taken} bytes: {e}, not the end of the connection"),
        }
    }
    assert!(taken < 4 * MIB as usize, "every reply was sent to a client that took none");
    read_ok(&mut other, 0, &[0; 4096], "the block the cut write was for");
    other.disconnect();
    server.assert_alive();
}
