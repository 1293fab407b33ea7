//! How batches of copies go to the GPU (the batch API, the copy kernel, one
//! call each), in request order, and every bench pattern reading back what
//! it wrote.

mod common;
mod fake_cuda_env;

use std::process::Command;
use std::time::Duration;

use common::raw::{Nbd, Req};
use common::run;
use fake_cuda_env::*;

/// Batches go out as copy kernel launches where every piece is small and
/// 16-byte aligned, else as cuMemcpyBatchAsync_v2 calls; `NBD_VRAM_KERNEL=0`
/// leaves only the second. The fake runs both last to first, as CUDA may.
const COPY_PATHS: [(&str, &str); 2] = [("1", "copies: small ones by the copy kernel, others batched"), ("0", "copies: batched")];

/// Kernel launches the fake logged that succeeded.
fn launches(server: &VramServer) -> usize {
    server.cuda_log().lines().filter(|l| l.starts_with("launch nbd_vram_copy") && l.ends_with("-> ok")).count()
}

/// Runs `body` against a server that batches copies, once with the copy
/// kernel and once without: each logs its path, and launches happen
/// exactly when the kernel is on.
fn on_each_copy_path(serve: impl Fn() -> Serve, body: impl Fn(&mut VramServer)) {
    for (kernel, says) in COPY_PATHS {
        let mut server = serve().env("NBD_VRAM_BATCH", "1").env("NBD_VRAM_KERNEL", kernel).start();
        assert!(server.logged(says), "{}", server.log());
        body(&mut server);
        assert_eq!(launches(&server) > 0, kernel == "1", "kernel launches with NBD_VRAM_KERNEL={kernel}");
    }
}

/// Batched copies, by kernel and by batched call, mixed on one stream:
/// the python-libnbd soak, with pipelined reads and writes over chunk
/// boundaries, must match its model.
#[test]
fn batched_copies_keep_request_order() {
    on_each_copy_path(
        || Serve::new(32).env("FAKE_CUDA_MAX_ALLOC_MIB", "8"),
        |server| {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/soak.py");
            let out = run(Command::new(common::PYTHON).args([script, &server.uri(), "20251125", "3000"]), Duration::from_secs(120));
            out.assert_success("soak.py");
            assert!(out.stdout.contains("soak: ok"), "{}", out.stdout);
            server.assert_alive();
        },
    );
}

/// A driver that cannot compile the kernel (no PTX JIT) is told in the
/// log, and copies go through the copy engine.
#[test]
fn without_the_copy_kernel_copies_still_batch() {
    let mut server = Serve::new(8).env("NBD_VRAM_BATCH", "1").env("FAKE_CUDA_NO_JIT", "1").start();
    let log = server.log();
    assert!(log.contains("the copy kernel did not load (cuModuleLoadData: CUDA_ERROR_JIT_COMPILER_NOT_FOUND"), "{log}");
    assert!(log.contains("copies: batched (cuMemcpyBatchAsync_v2)"), "{log}");
    let cmds = ["aio_write -P 0x3c 0 4k", "aio_write -P 0x3d 8k 4k", "aio_flush", "read -P 0x3c 0 4k", "read -P 0x3d 8k 4k"];
    qemu_io(&mut server, &cmds.map(String::from));
    assert_eq!(launches(&server), 0);
}

/// Eight writes, eight reads of the same blocks, then again with other
/// data, sent in one piece so that they land in one batch: every read must
/// see the write before it, although the fake runs a batched call's copies
/// last to first, by kernel or batched call (the latter from 8 copies).
/// The blocks lie 8 KiB apart, so that no two go as one copy.
#[test]
fn batched_copies_read_what_was_just_written() {
    on_each_copy_path(|| Serve::new(8), read_what_was_just_written);
}

fn read_what_was_just_written(server: &mut VramServer) {
    let mut nbd = Nbd::connect(&server.sock);
    // Blocks 8 KiB apart, each a copy of its own: eight writes, then eight
    // reads of them, twice, with other bytes the second time.
    let fills = [0x11u8, 0x22];
    let blocks: Vec<Vec<[u8; 4096]>> = fills.iter().map(|&fill| (0..8).map(|b| [fill + b; 4096]).collect()).collect();
    let at = |block: usize| block as u64 * 8192;
    let mut reqs = Vec::new();
    for round in &blocks {
        reqs.extend(round.iter().enumerate().map(|(block, data)| Req::Write(at(block), data)));
        reqs.extend((0..8).map(|block| Req::Read(at(block), 4096)));
    }
    nbd.queue(0, &reqs);
    let mut cookie = 0;
    for round in &blocks {
        for _ in 0..8 {
            assert_eq!(nbd.reply(), (0, cookie), "reply to a write");
            cookie += 1;
        }
        for (block, want) in round.iter().enumerate() {
            assert_eq!(nbd.reply(), (0, cookie), "reply to a read");
            cookie += 1;
            let got = nbd.data(4096);
            assert!(got == want, "block {block} read {:#x}, not {:#x}", got[0], want[0]);
        }
    }
    server.assert_alive();
}

/// Every bench pattern on the fake with batches on: the bench checks each
/// block a read returns, so a reply from the wrong staging, or staging
/// reused while a held batch still needs it, fails it. Deep queues hold
/// each full batch while the next is queued, and 16 MiB of 4 KiB requests
/// go round the 32 MiB staging ring many times a second.
#[test]
fn bench_patterns_read_back_what_they_wrote() {
    let server = Serve::new(16).env("NBD_VRAM_BATCH", "1").start();
    let connect = format!("unix:{}", server.sock.display());
    let out = run(&mut fake_cuda_env::nbd_vram(&["bench", "--connect", &connect, "--seconds", "1"], &[]), Duration::from_secs(60));
    out.assert_success("bench");
    assert_eq!(out.stdout.lines().filter(|l| l.starts_with("bench: pattern=")).count(), 8, "{}", out.stdout);
}

/// Sixteen 2 MiB reads fill the 32 MiB staging ring: that batch is held
/// while the next is gathered, which must wait for it to be answered
/// rather than start the ring again over its data.
#[test]
fn a_held_batch_keeps_its_staging() {
    const LEN: u32 = 2 << 20;
    let server = Serve::new(64).env("NBD_VRAM_BATCH", "1").start();
    let mut nbd = Nbd::connect(&server.sock);
    for i in 0..32u64 {
        assert_eq!(nbd.write(i * u64::from(LEN), &vec![i as u8 + 1; LEN as usize]), 0, "a 2 MiB write");
    }
    nbd.queue(100, &(0..32u64).map(|i| Req::Read(i * u64::from(LEN), LEN)).collect::<Vec<_>>());
    for _ in 0..32 {
        let (error, cookie) = nbd.reply();
        assert_eq!(error, 0, "a 2 MiB read");
        let data = nbd.data(LEN as usize);
        let want = (cookie - 100) as u8 + 1;
        let wrong = data.iter().position(|&b| b != want);
        assert!(wrong.is_none(), "read {cookie}: byte {wrong:?} is not {want}");
    }
}

/// `bench --verify`, the GPU script's correctness check, on the fake: the
/// whole store in 4 MiB requests, then lone 4 KiB reads (most by the
/// mailbox kernel), some right after a write to their block.
#[test]
fn bench_verify_passes_with_the_mailbox_kernel() {
    let server = Serve::new(32).env("NBD_VRAM_BATCH", "1").env("NBD_VRAM_SPIN", SPIN_US).env("FAKE_CUDA_MAX_ALLOC_MIB", "8").start();
    let connect = format!("unix:{}", server.sock.display());
    // About 2 s alone on a 2-core machine, and more than 10 s when two
    // test suites shared it: a slow run is no failure.
    let out = run(&mut fake_cuda_env::nbd_vram(&["bench", "--connect", &connect, "--verify"], &[]), Duration::from_secs(60));
    out.assert_success("bench --verify");
    assert!(out.stdout.contains("verify: 8192 lone 4 KiB reads"), "{}", out.stdout);
    assert!(out.stdout.contains("verify: PASS, 32 MiB"), "{}", out.stdout);
    let [reads, writes, ..] = mailbox_counts(&server);
    assert!(!polls() || reads > 4096 && writes > 1024, "{reads} lone reads and {writes} writes by the mailbox kernel");
}
