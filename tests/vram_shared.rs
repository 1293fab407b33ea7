//! Another process on the GPU: our kernels make way for it (found by the
//! memory it takes, or through NVML when it was there first) and come back
//! once it leaves.

mod common;
mod fake_cuda_env;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::raw::{Nbd, Req, CMD_WRITE_ZEROES};
use fake_cuda_env::*;

/// Lone reads and writes, eight writes together and eight reads of them
/// together (8 KiB apart, so that each is a copy of its own), and a write
/// of zeroes, each checked; `round` picks the data.
fn mixed_traffic(nbd: &mut Nbd, round: u8) {
    for block in 0..4u64 {
        assert_eq!(nbd.write(block * 4096, &[round; 4096]), 0, "a lone write");
        read_ok(nbd, block * 4096, &[round; 4096], "a lone read");
    }
    let data = |i: u64| [round ^ (i as u8 + 1); 4096];
    let blocks: Vec<[u8; 4096]> = (0..8).map(data).collect();
    nbd.queue(1000, &(0..8).map(|i| Req::Write((8 + 2 * i) * 4096, &blocks[i as usize])).collect::<Vec<_>>());
    (0..8).for_each(|i| assert_eq!(nbd.reply(), (0, 1000 + i), "one of eight writes"));
    nbd.queue(2000, &(0..8).map(|i| Req::Read((8 + 2 * i) * 4096, 4096)).collect::<Vec<_>>());
    for i in 0..8 {
        assert_eq!(nbd.reply(), (0, 2000 + i), "one of eight reads");
        assert!(nbd.data(4096) == data(i), "one of eight reads");
    }
    assert_eq!(nbd.command(0, CMD_WRITE_ZEROES, 4096, 8192), 0, "a write of zeroes");
    read_ok(nbd, 0, &[[round; 4096], [0; 4096], [0; 4096], [round; 4096]].concat(), "around the zeroes");
}

/// What went through the compute engine on our behalf (lone copies by the
/// mailbox kernel, batches by it or the copy kernel, memsets) and what as
/// a 2D copy, as the fake logged it.
fn engines(server: &VramServer) -> ([usize; 3], usize) {
    let log = server.cuda_log();
    let count = |p: &str| log.lines().filter(|l| l.starts_with(p)).count();
    let [reads, writes, ..] = mailbox_counts(server);
    let batches = mailbox_lists(server) + count("launch nbd_vram_copy ");
    ([reads + writes, batches, count("memset ")], count("memcpy2d 2 rows of "))
}

/// `mixed_traffic` until each of the compute engine's ways has served some
/// of it since `than` (on a loaded machine the loop may sleep between two
/// requests, which parks the mailbox kernel); returns the counts then.
fn until_compute_serves(nbd: &mut Nbd, server: &VramServer, than: [usize; 3]) -> [usize; 3] {
    // By time, not by rounds: on a loaded machine the store's look at the
    // GPU, once a second, and the kernel's start may come late.
    let start = std::time::Instant::now();
    let mut round = 0;
    while start.elapsed() < Duration::from_secs(20) {
        mixed_traffic(nbd, round);
        let (now, _) = engines(server);
        if now.iter().zip(than).all(|(n, t)| *n > t) {
            return now;
        }
        round = round.wrapping_add(1);
    }
    panic!("not every way served traffic since {than:?} in 20 s:\n{}", server.cuda_log());
}

/// Traffic while another process is there: served right, and all of it
/// by the copy engines (small writes and zeroes as 2D copies).
fn assert_copy_engines_only(nbd: &mut Nbd, server: &VramServer, before: [usize; 3]) {
    let (_, rows) = engines(server);
    mixed_traffic(nbd, 0x5a);
    let (now, rows_now) = engines(server);
    assert_eq!(now, before, "no kernel or memset while another process is there:\n{}", server.cuda_log());
    let wanted = 4 + 8 + 1; // lone writes, eight together, zeroes
    assert!(rows_now >= rows + wanted, "{wanted} writes by 2D copies expected: {rows} then {rows_now}");
}

/// The other process leaves (its file goes; the store looks again within
/// a second): the compute engine serves traffic again, and the server says so.
fn our_kernels_return_once_it_leaves(mut nbd: Nbd, server: &mut VramServer, others: &Path, before: [usize; 3]) {
    fs::remove_file(others).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    until_compute_serves(&mut nbd, server, before);
    assert!(server.logged("ours alone again"), "{}", server.log());
    nbd.disconnect();
    server.assert_alive();
}

/// Another process taking GPU memory (`FAKE_CUDA_OTHERS_FILE`), where NVML
/// is missing, keeps copies off the compute engine (our kernels, memsets,
/// small writes by a plain copy) until it gives the memory back (the store
/// asks at most once a second); the server says both.
#[test]
fn our_kernels_make_way_for_another_process() {
    let dir = common::TempDir::new();
    let others = dir.path("others");
    let Some(mut server) = mailbox_server(&[("FAKE_CUDA_OTHERS_FILE", others.to_str().unwrap())]) else { return };
    assert!(server.logged("NVML: "), "{}", server.log());
    let mut nbd = Nbd::connect(&server.sock);
    let before = until_compute_serves(&mut nbd, &server, [0; 3]);

    fs::write(&others, "1024").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_copy_engines_only(&mut nbd, &server, before);
    assert!(server.logged("another process took 1024 MiB"), "{}", server.log());
    our_kernels_return_once_it_leaves(nbd, &mut server, &others, before);
}

/// With NVML, a process that was on the GPU before us counts from the
/// first request, and our own process never does, also where NVML lists
/// host PIDs (a container); once it leaves, our kernels serve again.
#[test]
fn a_process_there_before_us_keeps_our_kernels_off() {
    let dir = common::TempDir::new();
    let others = dir.path("others");
    let nvml = fake_cuda_env::nvml_dir().to_str().unwrap();
    for host_pids in ["", "1"] {
        fs::write(&others, "1").unwrap();
        let mut env = vec![("LD_LIBRARY_PATH", nvml), ("FAKE_NVML_OTHERS_FILE", others.to_str().unwrap())];
        if !host_pids.is_empty() {
            env.push(("FAKE_NVML_HOST_PIDS", host_pids));
        }
        let Some(mut server) = mailbox_server(&env) else { return };
        assert!(server.logged("1 other process(es) use this GPU (NVML)"), "{}", server.log());
        let mut nbd = Nbd::connect(&server.sock);
        assert_copy_engines_only(&mut nbd, &server, [0; 3]);
        our_kernels_return_once_it_leaves(nbd, &mut server, &others, [0; 3]);
    }
}

/// NVML is asked by a thread of its own, never by a serving thread, which
/// must not wait on whatever the library does (an allocation) while the
/// kernel swaps: the fake logs each caller.
#[test]
fn the_gpu_is_watched_off_the_serving_threads() {
    let dir = common::TempDir::new();
    let log = dir.path("nvml.log");
    let nvml = fake_cuda_env::nvml_dir().to_str().unwrap();
    let mut server = Serve::new(8).env("LD_LIBRARY_PATH", nvml).env("FAKE_NVML_LOG", log.to_str().unwrap()).start();
    let mut nbd = Nbd::connect(&server.sock);
    let start = std::time::Instant::now();
    let mut round = 0;
    while start.elapsed() < Duration::from_millis(2500) {
        mixed_traffic(&mut nbd, round);
        round = round.wrapping_add(1);
    }
    nbd.disconnect();
    server.assert_alive();
    let calls = fs::read_to_string(&log).unwrap_or_default();
    let by = |who: &str| calls.lines().filter(|l| l.starts_with(&format!("list by {who}"))).count();
    assert_eq!(by("nbd-serve"), 0, "a serving thread asked NVML\n{calls}");
    assert!(by("nbd-gpu-watch") >= 2, "NVML was not asked again while serving: this test proves nothing\n{calls}");
}
