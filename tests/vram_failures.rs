//! A failing CUDA copy answered `EIO` for its request alone while serving
//! goes on; a device failure after work was handed over failing every
//! request after it.

mod common;
mod fake_cuda_env;

use std::process::Command;
use std::time::Duration;

use common::raw::{Nbd, Req, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE_ZEROES};
use common::{pattern, run, BIN, KIB, MIB};
use fake_cuda_env::*;

/// FAKE_CUDA_FAIL_COPY=N fails the Nth copy or memset of the process. The
/// server's own zeroing at start is one `cuMemsetD8_v2` per chunk; then
/// each request makes one call per chunk it touches.
#[test]
fn a_failed_copy_fails_that_request_only() {
    // A read: copy 1 zeroes the one chunk, 2 is the write, 3 the first
    // read, 4 the second.
    let mut server = Serve::new(8).env("FAKE_CUDA_FAIL_COPY", "4").start();
    let a = pattern(1, 64 * KIB as usize);
    let b = pattern(2, 64 * KIB as usize);
    let mut nbd = Nbd::connect(&server.sock);
    assert_eq!(nbd.write(0, &a), 0);
    read_ok(&mut nbd, 0, &a, "read back");
    read_eio(&mut nbd, 0, a.len() as u32, "the 4th copy");
    read_ok(&mut nbd, 0, &a, "the same connection goes on");
    assert_eq!(nbd.write(MIB, &b), 0);
    read_ok(&mut nbd, MIB, &b, "read back");
    nbd.disconnect();
    let mut nbd = Nbd::connect(&server.sock);
    read_ok(&mut nbd, 0, &a, "a new connection reads the data");
    read_ok(&mut nbd, MIB, &b, "read back");
    nbd.disconnect();
    server.assert_alive();
    assert_one_copy_error(&server, "cuMemcpyDtoHAsync_v2", "read at offset 0 length 65536 failed");

    // Requests in flight together (one batch, if they arrive together):
    // only the one whose copy fails gets EIO, the others their data.
    let mut server = Serve::new(8).env("FAKE_CUDA_FAIL_COPY", "5").start();
    let mut nbd = Nbd::connect(&server.sock);
    assert_eq!(nbd.write(0, &a), 0);
    let len = a.len() as u32;
    let cookies: Vec<u64> = (0..4).map(|_| nbd.send(0, CMD_READ, 0, len, &[])).collect();
    for _ in &cookies {
        let (error, cookie) = nbd.reply();
        let i = cookies.iter().position(|&c| c == cookie).expect("a reply to a request sent");
        if i == 2 {
            assert_eq!(error, EIO, "the 3rd read in flight (the 5th copy) must fail");
            continue;
        }
        assert_eq!(error, 0, "read {} of those in flight", i + 1);
        assert!(nbd.data(a.len()) == a, "read {} of those in flight returned other data", i + 1);
    }
    nbd.disconnect();
    server.assert_alive();
    assert_one_copy_error(&server, "cuMemcpyDtoHAsync_v2", "read at offset 0 length 65536 failed");

    // A write over a chunk boundary, in 2 MiB chunks: copies 1-4 zero the
    // four chunks, 5 is a write, 6 and 7 the two halves of the next one:
    // its second half fails.
    let mut server = Serve::new(8).env("FAKE_CUDA_MAX_ALLOC_MIB", "2").env("FAKE_CUDA_FAIL_COPY", "7").start();
    assert!(server.logged("in 4 chunk(s)"), "{}", server.log());
    let mut nbd = Nbd::connect(&server.sock);
    let at = 2 * MIB - 32 * KIB;
    assert_eq!(nbd.write(0, &a), 0);
    assert_eq!(nbd.write(at, &b), EIO, "the 7th copy must fail");
    read_ok(&mut nbd, 0, &a, "the same connection goes on");
    assert_eq!(nbd.write(at, &b), 0, "the write again");
    read_ok(&mut nbd, at, &b, "read back");
    nbd.disconnect();
    let mut nbd = Nbd::connect(&server.sock);
    read_ok(&mut nbd, at, &b, "a new connection reads the data");
    assert_eq!(nbd.write(4 * MIB, &a), 0);
    read_ok(&mut nbd, 4 * MIB, &a, "read back");
    nbd.disconnect();
    server.assert_alive();
    assert_one_copy_error(&server, "cuMemcpyHtoDAsync_v2", &format!("write at offset {at} length 65536 failed"));

    // Two writes that arrive with a flush, queued together (copies 2 and
    // 3): the 3rd fails, and with it their batch. The writes fail; the
    // flush after them succeeds, and the store is trusted still.
    let mut server = Serve::new(8).env("NBD_VRAM_BATCH", "1").env("FAKE_CUDA_FAIL_COPY", "3").start();
    let mut nbd = Nbd::connect(&server.sock);
    nbd.queue(0, &[Req::Write(0, &a), Req::Write(MIB, &b), Req::Flush]);
    assert_eq!(nbd.reply(), (EIO, 0), "the first write of the failed batch");
    assert_eq!(nbd.reply(), (EIO, 1), "the second");
    assert_eq!(nbd.reply(), (0, 2), "the flush after them");
    assert_eq!(nbd.write(0, &a), 0, "the write again");
    read_ok(&mut nbd, 0, &a, "read back");
    nbd.disconnect();
    server.assert_alive();
    // The connection's last line comes after any it logged before.
    let log = server.log_through("client done");
    assert!(log.contains("client done") && !log.contains("may be lost"), "{log}");

    // Write-zeroes, then trim (both memsets): copy 2 is the write, 3 the
    // write-zeroes, 4 the trim.
    for (cmd, name) in [(CMD_WRITE_ZEROES, "write-zeroes"), (CMD_TRIM, "trim")] {
        let fail = if cmd == CMD_TRIM { "4" } else { "3" };
        let mut server = Serve::new(8).env("FAKE_CUDA_FAIL_COPY", fail).start();
        let mut nbd = Nbd::connect(&server.sock);
        assert_eq!(nbd.write(0, &a), 0);
        if cmd == CMD_TRIM {
            assert_eq!(nbd.command(0, CMD_WRITE_ZEROES, MIB, 4096), 0);
        }
        assert_eq!(nbd.command(0, cmd, 0, 4096), EIO, "{name} must fail");
        assert_eq!(nbd.command(0, cmd, 0, 4096), 0, "{name} again");
        read_ok(&mut nbd, 0, &[&[0u8; 4096][..], &a[4096..8192]].concat(), name);
        nbd.disconnect();
        let mut nbd = Nbd::connect(&server.sock);
        read_ok(&mut nbd, 4096, &a[4096..8192], "a new connection");
        nbd.disconnect();
        server.assert_alive();
        assert_one_copy_error(&server, "cuMemsetD8Async", &format!("{name} at offset 0 length 4096 failed"));
    }
}

/// FAKE_CUDA_FAIL_SYNC=N fails the Nth stream or event synchronisation,
/// and every CUDA call after it, as CUDA's errors on queued work do. A
/// write is acknowledged once its data is handed to the stream, and the
/// loop waits for it only when something needs it: the next read (sync 1),
/// or a flush. Whichever wait fails, acknowledged data may be gone: from
/// then on every request is answered EIO, on any connection, and the
/// server says so once. A later read's wait failing (sync 2) does the same.
/// A lone read's header has gone out by then, so its connection ends
/// instead; with `NBD_VRAM_EARLY_HEADER=0` the read answers EIO.
#[test]
fn a_device_failure_after_handing_over_fails_every_request() {
    let a = pattern(3, 64 * KIB as usize);
    for (fail, good_reads, flush_fails, early) in [("1", 0, false, "1"), ("1", 0, false, "0"), ("2", 1, false, "1"), ("1", 0, true, "1")] {
        let what = format!("FAIL_SYNC={fail} NBD_VRAM_EARLY_HEADER={early}");
        let mut server = Serve::new(8).env("FAKE_CUDA_FAIL_SYNC", fail).env("NBD_VRAM_EARLY_HEADER", early).start();
        let mut nbd = Nbd::connect(&server.sock);
        assert_eq!(nbd.write(0, &a), 0, "the write is acknowledged before any sync");
        for _ in 0..good_reads {
            read_ok(&mut nbd, 0, &a[..4096], "a read before the failure");
        }
        if flush_fails {
            assert_eq!(nbd.command(0, CMD_FLUSH, 0, 0), EIO, "the flush whose sync fails");
        } else if early == "1" {
            assert_eq!(read_or_cut(&mut nbd, 0, 4096, &what), None, "{what}: the read whose wait fails");
            assert!(server.logged("its data cannot follow"), "{what}:\n{}", server.log());
            nbd = Nbd::connect(&server.sock);
        } else {
            read_eio(&mut nbd, 0, 4096, "the read whose wait fails");
        }
        assert_lost(&mut server, nbd, "CUDA_ERROR_ILLEGAL_ADDRESS", &what);
    }
}

/// `status` counts a request by its answer: a read answered EIO because
/// its wait failed, or cut after its header went out early, is an error,
/// not bytes read; the write acknowledged before the failure counts as
/// written.
#[test]
fn status_counts_what_was_answered() {
    for early in ["0", "1"] {
        let server = Serve::new(8).env("FAKE_CUDA_FAIL_SYNC", "1").env("NBD_VRAM_EARLY_HEADER", early).start();
        let mut nbd = Nbd::connect(&server.sock);
        assert_eq!(nbd.write(0, &pattern(3, 4 * KIB as usize)), 0, "the write is acknowledged before any sync");
        if early == "1" {
            assert_eq!(read_or_cut(&mut nbd, 0, 4096, "early header"), None, "the read whose wait fails");
        } else {
            read_eio(&mut nbd, 0, 4096, "the read whose wait fails");
        }
        let target = format!("unix:{}", server.sock.display());
        let counters = || {
            let out = run(Command::new(BIN).args(["status", "--json"]), Duration::from_secs(30));
            let entry = out.stdout.split("},").find(|e| e.contains(&target))?.to_string();
            let num = |key: &str| entry.split(&format!("\"{key}\":")).nth(1)?.split([',', '}']).next()?.parse::<u64>().ok();
            Some([num("requests")?, num("read_bytes")?, num("written_bytes")?, num("errors")?])
        };
        // Published once a second.
        let mut seen = None;
        for _ in 0..40 {
            seen = counters();
            if seen.is_some_and(|c| c[0] == 2) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(seen, Some([2, 0, 4096, 1]), "NBD_VRAM_EARLY_HEADER={early}: requests, read, written, errors");
    }
}

/// With groups of eight, a batch of nine reads is two groups, eight and
/// one: when the first group's wait fails, the lone read after it answers
/// EIO like the rest, its header not sent ahead of a failure already known.
#[test]
fn a_lone_read_after_a_failed_group_answers_eio() {
    let mut server = Serve::new(8).env("FAKE_CUDA_FAIL_SYNC", "1").env("NBD_VRAM_GROUP", "8").start();
    let mut nbd = Nbd::connect(&server.sock);
    nbd.queue(0, &(0..9).map(|i| Req::Read(i * 4096, 4096)).collect::<Vec<_>>());
    let mut cookies: Vec<u64> = (0..9).map(|_| nbd.reply()).inspect(|&(e, c)| assert_eq!(e, EIO, "read {c}")).map(|(_, c)| c).collect();
    cookies.sort();
    assert_eq!(cookies, (0..9).collect::<Vec<u64>>());
    assert_lost(&mut server, nbd, "CUDA_ERROR_ILLEGAL_ADDRESS", "nine reads, FAIL_SYNC=1");
}

/// Where `FAKE_CUDA_FAIL_RECORD` is placed: each of the first eight
/// events, with copies one driver call each (`NBD_VRAM_BATCH=0`) and
/// batched.
/// A flush is answered for itself: a write after it in the same batch
/// whose batched copy could not start is answered EIO, the flush, done
/// before that write was even queued, success.
#[test]
fn a_write_that_could_not_start_after_a_flush_fails_alone() {
    // Copy 1 zeroes the store; copy 2 is the write after the flush.
    let mut server = Serve::new(8).env("FAKE_CUDA_FAIL_COPY", "2").env("NBD_VRAM_MAILBOX", "0").env("NBD_VRAM_BATCH", "1").start();
    let mut nbd = Nbd::connect(&server.sock);
    // One send, so that both are one batch.
    nbd.queue(1, &[Req::Flush, Req::Write(0, &pattern(1, 4096))]);
    let (flush, write) = (nbd.reply(), nbd.reply());
    assert_eq!(write, (EIO, 2), "the write whose copy could not start");
    assert_eq!(flush, (0, 1), "the flush, done before the write was queued");
    server.assert_alive();
}

fn record_failures() -> impl Iterator<Item = (&'static str, u32)> {
    ["0", "1"].into_iter().flat_map(|batch| (1..=8).map(move |n| (batch, n)))
}

/// An event that could not be recorded, where the stream sync tried in its
/// place failed too (neither error sticky), leaves the fence before it
/// unmarked: that group's reads must still wait for their copies, never be
/// answered from staging the device has not filled yet. The failure is
/// placed at every event of a batch of 16 reads in groups of 4: each read
/// gets its own data or EIO, and serving goes on.
#[test]
fn a_fence_whose_event_was_not_recorded_still_waits() {
    let data = pattern(10, MIB as usize);
    let part = |i: usize| &data[i * 64 * KIB as usize..][..64 * KIB as usize];
    let mut failed = Vec::new();
    for (batch, n) in record_failures() {
        let what = format!("NBD_VRAM_BATCH={batch} FAIL_RECORD={n}");
        let mut server = Serve::new(8)
            .env("FAKE_CUDA_FAIL_RECORD", &n.to_string())
            .env("NBD_VRAM_BATCH", batch)
            .env("NBD_VRAM_GROUP", "4")
            .env("NBD_VRAM_MAILBOX", "0")
            .start();
        let mut nbd = Nbd::connect(&server.sock);
        while nbd.write(0, &data) != 0 {} // the failure may meet the write
        nbd.queue(0, &(0..16).map(|i| Req::Read(i * 64 * KIB, 64 * KIB as u32)).collect::<Vec<_>>());
        for _ in 0..16 {
            let (error, cookie) = nbd.reply();
            if error == EIO {
                failed.push((batch, n, cookie));
                continue;
            }
            assert_eq!(error, 0, "{what}: read {cookie}");
            assert!(nbd.data(64 * KIB as usize) == part(cookie as usize), "{what}: read {cookie} answered before its copy ran");
        }
        // The failure may meet these reads instead, once.
        let mut again = nbd.read(0, MIB as u32);
        if again == Err(EIO) {
            failed.push((batch, n, 16));
            again = nbd.read(0, MIB as u32);
        }
        assert!(again.as_deref() == Ok(&data[..]), "{what}: serving goes on: {:?}", again.err());
        nbd.disconnect();
        server.assert_alive();
    }
    eprintln!("reads answered EIO (NBD_VRAM_BATCH, FAIL_RECORD, cookie): {failed:?}");
    for batch in ["0", "1"] {
        let later = failed.iter().any(|&(b, _, c)| b == batch && c > 0);
        assert!(later, "NBD_VRAM_BATCH={batch}: no failure met a group after the first: this test proves nothing");
    }
}

/// A write whose batch could not be handed over (an event not recorded,
/// and the sync tried in its place failing, neither error sticky) is
/// answered EIO and never issued later: once another connection has
/// written the same range since, and been answered, its bytes are the ones
/// read back. The failure is placed at each event in turn; where it meets
/// a publication to the other connection instead, the store is lost, and
/// says so.
#[test]
fn a_write_that_could_not_start_never_lands_later() {
    let len = 64 * KIB as usize;
    let (before, lost, after) = (pattern(20, len), pattern(21, len), pattern(22, len));
    let mut failed = Vec::new();
    for (batch, n) in record_failures() {
        let what = format!("NBD_VRAM_BATCH={batch} FAIL_RECORD={n}");
        let mut server = Serve::new(8)
            .arg("--connections")
            .arg("2")
            .env("FAKE_CUDA_FAIL_RECORD", &n.to_string())
            .env("NBD_VRAM_BATCH", batch)
            .env("NBD_VRAM_MAILBOX", "0")
            .start();
        let (mut a, mut b) = (Nbd::connect(&server.sock), Nbd::connect(&server.sock));
        // The failure is met once: a request that meets it is asked again.
        let twice = |nbd: &mut Nbd, offset: u64, data: &[u8]| nbd.write(offset, data) == 0 || nbd.write(offset, data) == 0;
        let written = twice(&mut a, MIB, &before) // a fence, whose event the next hand-over records
            && match a.write(0, &lost) {
                EIO => {
                    failed.push((batch, n));
                    true
                }
                e => e == 0,
            }
            && twice(&mut b, 0, &after);
        if !written {
            assert!(server.logged("their data may be lost"), "{what}: a write failed twice:\n{}", server.log());
            continue;
        }
        // The next request on the first connection issues whatever it
        // still holds.
        for nbd in [&mut a, &mut b] {
            let mut got = nbd.read(0, len as u32);
            if got == Err(EIO) {
                got = nbd.read(0, len as u32);
            }
            assert!(got.as_deref() == Ok(&after[..]), "{what}: a write answered EIO landed after a later one: {:?}", got.err());
        }
        a.disconnect();
        b.disconnect();
        server.assert_alive();
    }
    eprintln!("writes answered EIO at (NBD_VRAM_BATCH, FAIL_RECORD) = {failed:?}");
    for batch in ["0", "1"] {
        assert!(failed.iter().any(|&(b, _)| b == batch), "NBD_VRAM_BATCH={batch}: no write met the failure: this test proves nothing");
    }
}
