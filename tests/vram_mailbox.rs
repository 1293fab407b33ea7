//! The resident mailbox kernel on the fake driver's SM threads: when it
//! starts, parks and stays out, lone copies and lists, its faults, a job it
//! does not take in time, and a context with one SM.

mod common;
mod fake_cuda_env;

use std::io::Read;
use std::time::Duration;

use common::raw::{Nbd, Req};
use common::pattern;
use fake_cuda_env::*;


/// Sends two 4 KiB reads in one write, at `at` and `at + 8192`, and
/// returns their errors, checking the data of those that succeed against
/// `data` (what the store holds from 0).
fn read_pair(nbd: &mut Nbd, at: u64, data: &[u8]) -> [u32; 2] {
    nbd.queue(1, &[Req::Read(at, 4096), Req::Read(at + 8192, 4096)]);
    [(1, at as usize), (2, at as usize + 8192)].map(|(cookie, at)| {
        let (error, got) = nbd.reply();
        assert_eq!(got, cookie, "replies in order");
        if error == 0 {
            assert!(nbd.data(4096) == data[at..at + 4096], "read {cookie} of a pair at {at}");
        }
        error
    })
}

/// Lone 4 KiB reads and writes, back to back, go to the mailbox kernel
/// once it runs, and each read sees the write just before it, by the
/// kernel or by the copy engine (an unaligned read). A pause parks the
/// kernel (the loop sleeps); the read that wakes it goes to the copy
/// engine, the next starts the kernel again (by the copy engine too), the
/// rest are its.
#[test]
fn lone_copies_go_through_the_mailbox_kernel() {
    // A loaded machine can keep the kernel's start or the client late
    // enough that fewer copies reach it: up to three tries, data checked
    // on every one.
    for _ in 0..3 {
        let serve = Serve::new(16).env("NBD_VRAM_BATCH", "1").env("FAKE_CUDA_MAX_ALLOC_MIB", "8");
        let mut server = serve.env("NBD_VRAM_SPIN", SPIN_US).start();
        assert!(server.logged("small copies back to back: by the mailbox kernel, lone ones and batches"), "{}", server.log());
        let mut nbd = Nbd::connect(&server.sock);
        let blocks: Vec<u64> = (0..24).map(|i| (i * 683 % 4096) * 4096).collect();
        let mut model: Vec<Vec<u8>> = blocks.iter().map(|_| vec![0u8; 4096]).collect();
        for round in 0..3u64 {
            for (i, &at) in blocks.iter().enumerate() {
                read_ok(&mut nbd, at, &model[i], "a lone read");
                if (i as u64 + round) % 3 == 0 {
                    model[i] = pattern(round * 100 + i as u64, 4096);
                    assert_eq!(nbd.write(at, &model[i]), 0);
                    read_ok(&mut nbd, at, &model[i], "a read just after its write");
                }
                // Not 16-byte aligned: the copy engine's.
                read_ok(&mut nbd, at + 8, &model[i][8..4000], "an unaligned read");
            }
            std::thread::sleep(Duration::from_millis(300)); // the loop sleeps: the kernel parks
        }
        nbd.disconnect();
        server.assert_alive();
        let [jobs, writes, launched, ended] = mailbox_counts(&server);
        if !polls() {
            eprintln!("one CPU: the loop never polls, so the mailbox kernel never starts");
            return;
        }
        // A start per round at least, each ending the one before; the last
        // ends as the client leaves, or just after we look.
        assert!(launched >= 3 && (launched - 1..=launched).contains(&ended), "launched {launched} times, ended {ended} times");
        // Two reads per start go to the copy engine (90 of 96 for the
        // kernel), and a busy machine may delay the client past the poll.
        let aligned = 3 * 32;
        if jobs >= aligned / 2 && writes >= 24 / 2 {
            return;
        }
        eprintln!("{jobs} of {aligned} lone aligned reads, {writes} of 24 lone writes by the mailbox kernel:\n{}", server.cuda_log());
    }
    panic!("three tries, and the mailbox kernel never took half the lone copies");
}

/// `NBD_VRAM_MAILBOX=0` leaves it out; so does a GPU that limits how long
/// a kernel runs, which says why.
#[test]
fn the_mailbox_kernel_stays_out_when_told_or_limited() {
    for (var, value, says) in [("NBD_VRAM_MAILBOX", "0", None), ("FAKE_CUDA_EXEC_TIMEOUT", "1", Some("run time limit for kernels"))] {
        let mut server = Serve::new(8).env("NBD_VRAM_BATCH", "1").env("NBD_VRAM_SPIN", SPIN_US).env(var, value).start();
        let mut nbd = Nbd::connect(&server.sock);
        for _ in 0..50 {
            read_ok(&mut nbd, 4096, &[0; 4096], "a lone read");
        }
        nbd.disconnect();
        server.assert_alive();
        let log = server.log();
        assert!(!log.contains("by the mailbox kernel"), "{var}={value}:\n{log}");
        assert!(says.is_none_or(|s| log.contains(s)), "{var}={value}:\n{log}");
        assert_eq!(mailbox_counts(&server), [0; 4], "{var}={value}");
    }
}

/// A fault in the mailbox kernel is a device failure after hand-over: the
/// read it had ends its connection (its header is out), and every request
/// after it answers EIO.
#[test]
fn a_mailbox_fault_fails_every_request_after_it() {
    on_a_quiet_try(&[("FAKE_CUDA_FAIL_MAILBOX", "3")], |server, mut nbd| {
        let mut good = 0;
        while let Some(data) = read_or_cut(&mut nbd, 8192, 4096, "FAIL_MAILBOX=3") {
            assert_eq!(data, [0; 4096]);
            good += 1;
            if good == 100 {
                return false; // the kernel never got three jobs in a row
            }
        }
        assert!(server.cuda_log().contains("nbd_vram_mailbox job 3 read -> ILLEGAL_ADDRESS"), "{}", server.cuda_log());
        assert!(server.logged("its data cannot follow"), "{}", server.log());
        let nbd = Nbd::connect(&server.sock);
        assert_lost(server, nbd, "cuStreamQuery: CUDA_ERROR_ILLEGAL_ADDRESS", "FAIL_MAILBOX=3");
        true
    });
}

/// A fault in a list job is the same device failure: both reads of the
/// pair it carried answer EIO (no header went early for them), and so does
/// every request after.
#[test]
fn a_fault_in_a_list_fails_its_batch_and_every_request_after() {
    on_a_quiet_try(&[("FAKE_CUDA_FAIL_MAILBOX", "3")], |server, mut nbd| {
        // The first two start the kernel; the next two are its jobs 1 and 2.
        (0..4).for_each(|_| read_ok(&mut nbd, 4096, &[0; 4096], "a lone read"));
        if read_pair(&mut nbd, 0, &[0; 16384]) != [EIO, EIO] {
            return false;
        }
        assert!(server.cuda_log().contains("nbd_vram_mailbox job 3 list read -> ILLEGAL_ADDRESS"), "{}", server.cuda_log());
        assert_lost(server, nbd, "CUDA_ERROR_ILLEGAL_ADDRESS", "a list's fault");
        true
    });
}

/// Two aligned reads in one batch go to the running mailbox kernel as a
/// list; two that are not 16-byte aligned (a list would fault on them)
/// park it, as does any batch with `NBD_VRAM_MAILBOX=lone`; lone reads in
/// a row start it again. Every read sees what a lone 16 KiB write put
/// there, on every try.
#[test]
fn batches_it_cannot_take_park_the_mailbox_kernel() {
    let data = pattern(9, 16384);
    let lone = |nbd: &mut Nbd| (0..4).for_each(|_| read_ok(nbd, 4096, &data[4096..8192], "a lone read"));
    for (mode, lists) in [("1", 1), ("lone", 0)] {
        on_a_quiet_try(&[("NBD_VRAM_MAILBOX", mode)], |server, mut nbd| {
            assert_eq!(nbd.write(0, &data), 0);
            lone(&mut nbd);
            assert_eq!(read_pair(&mut nbd, 0, &data), [0, 0]);
            let listed = mailbox_lists(server);
            assert_eq!(read_pair(&mut nbd, 8, &data), [0, 0]);
            lone(&mut nbd);
            nbd.disconnect();
            server.assert_alive();
            assert!(mailbox_lists(server) <= lists, "NBD_VRAM_MAILBOX={mode}:\n{}", server.cuda_log());
            // After the write, reads by the kernel once it runs (it starts a
            // moment after its launch, as on a GPU); the second one ends as
            // the client leaves, or just after we look.
            let [reads, _, launched, ended] = mailbox_counts(server);
            (listed, launched) == (lists, 2) && reads >= 2 && (1..=2).contains(&ended)
        });
    }
}

/// Two 64 KiB reads end to end in one batch go as one 128 KiB copy, too
/// long for a job: like a batch the kernel cannot take, it parks the
/// kernel, which lone reads in a row start again.
#[test]
fn requests_end_to_end_too_long_together_park_the_mailbox_kernel() {
    let data = pattern(11, 128 << 10);
    let lone = |nbd: &mut Nbd| (0..4).for_each(|_| read_ok(nbd, 4096, &data[4096..8192], "a lone read"));
    on_a_quiet_try(&[], |server, mut nbd| {
        assert_eq!(nbd.write(0, &data), 0);
        lone(&mut nbd);
        nbd.queue(1, &[Req::Read(0, 64 << 10), Req::Read(64 << 10, 64 << 10)]);
        for (cookie, at) in [(1, 0), (2, 64 << 10)] {
            assert_eq!(nbd.reply(), (0, cookie));
            assert!(nbd.data(64 << 10) == data[at..at + (64 << 10)], "the read at {at}");
        }
        lone(&mut nbd);
        nbd.disconnect();
        server.assert_alive();
        let [reads, _, launched, ended] = mailbox_counts(server);
        launched == 2 && reads >= 2 && (1..=2).contains(&ended)
    });
}

/// A mailbox kernel that has not started yet (`alive` unwritten) is left
/// alone: lone copies go to the copy engine meanwhile, it is launched once,
/// and it is told to end all the same.
#[test]
fn lone_copies_wait_for_no_kernel_that_has_not_started() {
    let data = pattern(7, 4096);
    on_a_quiet_try(&[("FAKE_CUDA_LATE_START", "1")], |server, mut nbd| {
        for _ in 0..8 {
            assert_eq!(nbd.write(4096, &data), 0);
            read_ok(&mut nbd, 4096, &data, "a lone read while the kernel has not started");
        }
        nbd.disconnect();
        server.assert_alive();
        let [reads, writes, launched, ended] = mailbox_counts(server);
        assert_eq!((reads, writes), (0, 0), "no jobs for a kernel that has not started:\n{}", server.cuda_log());
        // A sleep of the loop parks it, and the next copies launch it again.
        (launched, ended) == (1, 0)
    });
}

/// A job the mailbox kernel does not take within its deadline (1 s; the
/// fake's SM stops for 3 s, as a GPU that no longer schedules it) fails
/// instead of hanging the loop. A lone write is answered before its copy
/// is done, so the store counts as failed: from the next wait for the
/// device on, every request answers EIO. The kernel is told to end and never launched again, and no work
/// goes to the GPU while it may still do that job late (the fake reports
/// such a race as a fault).
#[test]
fn a_job_the_kernel_does_not_take_in_time_fails_the_store_without_a_hang() {
    on_a_quiet_try(&[("FAKE_CUDA_MAILBOX_STALL", "3")], |server, mut nbd| {
        let started = std::time::Instant::now();
        if !(0..40).any(|i| nbd.write(0, &pattern(i, 4096)) == EIO) {
            return false;
        }
        assert!(started.elapsed() >= Duration::from_secs(1), "EIO before the deadline");
        std::thread::sleep(Duration::from_secs(3)); // the SM comes back, does the late job, ends
        // A read waits for the device, so it hears of the failure first
        // (its header went early, so its connection ends).
        assert_eq!(read_or_cut(&mut nbd, 8192, 4096, "a read after the deadline"), None);
        assert_lost(server, Nbd::connect(&server.sock), "gave no answer within 1 s", "a missed deadline");
        let (log, cuda) = (server.log(), server.cuda_log());
        assert!(!log.contains("fake libcuda"), "the late job raced with other work:\n{log}");
        // Launches before the stall are the loop's own (a loaded machine
        // may park and start it again); none may follow the abandoned one.
        let (_, after_the_end) = cuda.rsplit_once("nbd_vram_mailbox ended after").expect("the abandoned kernel ended");
        assert!(!after_the_end.contains("launch nbd_vram_mailbox"), "launched again after missing a deadline:\n{cuda}");
        true
    });
}

/// A context that may use one SM (an MPS share, a small GPU) gets no
/// resident kernel, which would hold it.
#[test]
fn one_sm_gets_no_mailbox_kernel() {
    let Some(mut server) = mailbox_server(&[("FAKE_CUDA_SMS", "1")]) else { return };
    let mut nbd = Nbd::connect(&server.sock);
    (0..16).for_each(|_| read_ok(&mut nbd, 4096, &[0; 4096], "a lone read"));
    nbd.disconnect();
    server.assert_alive();
    assert!(server.logged("may use 1 SM: no mailbox kernel"), "{}", server.log());
    assert_eq!(mailbox_counts(&server)[2], 0, "{}", server.cuda_log());
}

/// Each serving thread has a mailbox kernel of its own: a context that
/// may use no more SMs than there are threads gets none, as they would
/// hold every SM.
#[test]
fn as_many_sms_as_serving_threads_get_no_mailbox_kernel() {
    let Some(server) = mailbox_server(&[("FAKE_CUDA_SMS", "3")]) else { return };
    assert!(!server.log().contains("no mailbox kernel"), "3 SMs and one thread: {}", server.log());
    let server = Serve::new(8).arg("--connections").arg("3").env("NBD_VRAM_BATCH", "1").env("FAKE_CUDA_SMS", "3").start();
    assert!(server.logged("may use 3 SMs: no mailbox kernel, as 3 of them would hold all"), "{}", server.log());
    assert_eq!(mailbox_counts(&server)[2], 0, "{}", server.cuda_log());
}

/// A serve client that stops reading its replies holds no mailbox kernel
/// on the GPU while the loop waits for it: the kernel parks before a send
/// that would wait, and the connection costs nothing beyond itself.
#[test]
fn a_client_that_stops_reading_holds_no_mailbox_kernel() {
    let Some(mut server) = mailbox_server(&[]) else { return };
    let mut nbd = Nbd::connect(&server.sock);
    // 4 MiB of replies, more than the socket takes.
    let burst: Vec<Req> = (0..1024u64).map(|i| Req::Read((i % 2048) * 4096, 4096)).collect();
    nbd.queue(0, &burst);
    let mut counts = mailbox_counts(&server);
    for _ in 0..50 {
        if counts[2] > 0 && counts[2] == counts[3] {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        counts = mailbox_counts(&server);
    }
    let [_, _, launched, ended] = counts;
    assert!(launched > 0, "the burst never started the kernel: this test proves nothing\n{}", server.cuda_log());
    assert_eq!(launched, ended, "the mailbox kernel runs on for a client that reads nothing\n{}", server.cuda_log());
    // It reads them all in the end, and serving goes on.
    let mut rest = vec![0u8; 1024 * (16 + 4096)];
    nbd.s.read_exact(&mut rest).unwrap();
    assert_eq!(nbd.read(0, 4096).map(|d| d.len()), Ok(4096));
    server.assert_alive();
}
