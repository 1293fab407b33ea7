//! `serve --store vram` on the fake CUDA driver, starting up: the fake's
//! own checks, data across the boundaries of a chunked allocation, the
//! `--step`/`--min-size` fallback line by line, every start-up failure's
//! message and exit code, the driver library's name, more than one GPU,
//! fresh memory read as zeroes, and the swap daemon's header.

mod common;
mod fake_cuda_env;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{pattern, run, sha256, KIB, MIB};
use fake_cuda_env::*;

/// `read -P BYTE OFF LEN` commands that check every byte of `model`, one
/// per run of equal bytes (split at the 32 MiB request maximum).
fn verify_all(model: &[u8]) -> Vec<String> {
    let mut cmds = Vec::new();
    let mut start = 0;
    while start < model.len() {
        let byte = model[start];
        let run_len = model[start..].iter().take_while(|&&b| b == byte).count().min(32 * MIB as usize);
        cmds.push(format!("read -P {byte:#x} {start} {run_len}"));
        start += run_len;
    }
    cmds
}

/// Byte sizes from the server's fallback lines: (refused, obtained).
fn fallback(log: &str) -> (Vec<u64>, Option<u64>) {
    let mib = |s: &str| -> u64 { s.split_once(" MiB").and_then(|(n, _)| n.parse().ok()).unwrap_or_else(|| panic!("no size in {s:?}")) };
    let refused = log.lines().filter_map(|l| l.strip_prefix("nbd-vram: cannot allocate ")).map(mib).collect();
    let obtained = log.lines().find_map(|l| l.strip_prefix("nbd-vram: allocated ")).map(mib);
    (refused, obtained)
}

/// The sizes of the fake's successful `cuMemAlloc` calls, in order.
fn ok_allocs(cuda_log: &str) -> Vec<u64> {
    cuda_log
        .lines()
        .filter_map(|l| l.strip_prefix("alloc ")?.strip_suffix(" -> ok")?.parse().ok())
        .collect()
}

#[test]
fn fake_libcuda_passes_its_own_checks() {
    let out = run(Command::new(checker()).arg(libcuda()), Duration::from_secs(30));
    out.assert_success("tests/fake_cuda/check");
    assert!(out.stdout.contains("all passed"), "check did not finish:\n{}", out.stdout);
}

/// 64 MiB in 16 MiB chunks (the fake refuses larger single allocations):
/// patterns, write-zeroes and discards across the chunk boundaries, each
/// byte of the device checked with qemu-io on two connections, then 48 MiB
/// of random data through nbdcopy in and out.
#[test]
fn data_survives_chunk_boundaries() {
    let mut server = Serve::new(64).env("FAKE_CUDA_MAX_ALLOC_MIB", "16").start();
    assert!(server.logged("allocated 64 MiB of VRAM in 4 chunk(s)"), "{}", server.log());
    assert_eq!(ok_allocs(&server.cuda_log()), vec![16 * MIB; 4], "fake's log:\n{}", server.cuda_log());

    enum Op {
        Pattern(u8, u64, u64),
        Zero(u64, u64),
        Discard(u64, u64),
    }
    use Op::*;
    let ops = [
        Pattern(0x99, 8 * MIB + 4095, 32 * MIB), // one request over three chunks
        Pattern(0x5a, 16 * MIB - 512 * KIB, MIB), // straddles 16 MiB
        Pattern(0x44, 30 * MIB, 4 * MIB),
        Zero(31 * MIB, 2 * MIB),             // across 32 MiB
        Pattern(0xc3, 32 * MIB - 1, 2),      // one byte each side of 32 MiB
        Pattern(0x77, 40 * MIB, 24 * MIB),   // across 48 MiB, to the end
        Discard(47 * MIB, 2 * MIB),          // across 48 MiB: reads back zeroes
        Pattern(0x11, 0, 4 * KIB),
        Pattern(0x12, 64 * MIB - 4 * KIB, 4 * KIB),
        Pattern(0x13, 48 * MIB - 100, 100),  // ends exactly at a boundary
        Pattern(0x14, 48 * MIB, 100),        // starts exactly at one
    ];
    let mut model = vec![0u8; 64 * MIB as usize];
    let mut writes = Vec::new();
    for op in &ops {
        let (byte, off, len, cmd) = match *op {
            Pattern(b, o, l) => (b, o, l, format!("write -P {b:#x} {o} {l}")),
            Zero(o, l) => (0, o, l, format!("write -z {o} {l}")),
            Discard(o, l) => (0, o, l, format!("discard {o} {l}")),
        };
        model[off as usize..(off + len) as usize].fill(byte);
        writes.push(cmd);
    }
    let reads = verify_all(&model);
    assert!(reads.len() > 15, "the model should have many runs: {reads:?}");
    qemu_io(&mut server, &[writes, reads.clone()].concat());
    qemu_io(&mut server, &reads); // and on a new connection

    let input = server.dir.path("in.bin");
    let output = server.dir.path("out.bin");
    let head = server.dir.path("out-48m.bin");
    let random = pattern(0x7612, 48 * MIB as usize);
    fs::write(&input, &random).unwrap();
    let limit = Duration::from_secs(60);
    let uri = server.uri();
    run(Command::new("nbdcopy").args([input.to_str().unwrap(), &uri]), limit).assert_success("nbdcopy in");
    run(Command::new("nbdcopy").args([&uri, output.to_str().unwrap()]), limit).assert_success("nbdcopy out");
    let out = fs::read(&output).unwrap();
    assert_eq!(out.len(), model.len(), "nbdcopy out size");
    fs::write(&head, &out[..random.len()]).unwrap();
    assert_eq!(sha256(&head), sha256(&input), "the 48 MiB copied in and out differ");
    model[..random.len()].copy_from_slice(&random);
    let first_diff = out.iter().zip(&model).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "the device differs from what was written (first differing byte)");
    server.assert_alive();
}

/// The headline case: 7168 MiB asked, 3000 MiB free of 16384: each 512 MiB
/// step is logged, down to the 2560 MiB that fit, which is what clients see.
#[test]
fn fallback_steps_down_to_what_is_free() {
    let mut server = Serve::new(7168).env("FAKE_CUDA_FREE_MIB", "3000").env("FAKE_CUDA_TOTAL_MIB", "16384").start();
    let log = server.log();
    let (refused, obtained) = fallback(&log);
    let expected: Vec<u64> = (0..9).map(|i| 7168 - 512 * i).collect();
    assert_eq!(refused, expected, "refused sizes; log:\n{log}");
    assert_eq!(obtained, Some(2560), "log:\n{log}");
    for size in &refused {
        let line = format!("cannot allocate {size} MiB of VRAM (3000 MiB free of 16384 MiB); trying {} MiB", size - 512);
        assert!(log.contains(&line), "missing {line:?} in:\n{log}");
    }
    assert!(log.contains("allocated 2560 MiB of VRAM in 1 chunk(s); 3000 MiB of 16384 MiB were free"), "{log}");

    // The fake saw one allocation that worked, of exactly that size, and
    // no free (the server is still serving it).
    let cuda_log = server.cuda_log();
    assert_eq!(cuda_log.lines().next(), Some("init -> ok"), "{cuda_log}");
    assert_eq!(ok_allocs(&cuda_log), vec![2560 * MIB], "{cuda_log}");
    assert_eq!(cuda_log.lines().rfind(|l| l.starts_with("alloc ")), Some("alloc 2684354560 -> ok"));
    assert!(!cuda_log.contains("free "), "{cuda_log}");

    let info = run(Command::new("nbdinfo").args(["--size", &server.uri()]), Duration::from_secs(20));
    info.assert_success("nbdinfo --size");
    assert_eq!(info.stdout.trim(), (2560 * MIB).to_string());
    // The last MiB is there, and was zeroed.
    let last = 2559 * MIB;
    qemu_io(&mut server, &[format!("read -P 0 {last} {MIB}"), format!("write -P 0xee {last} {MIB}"), format!("read -P 0xee {last} {MIB}")]);
}

/// `--step` and `--min-size` as given, in MiB and with a suffix.
#[test]
fn fallback_with_a_custom_step_and_floor() {
    let mut server = Serve::new(96).arg("--step").arg("16M").arg("--min-size").arg("32").env("FAKE_CUDA_FREE_MIB", "40").start();
    let (refused, obtained) = fallback(&server.log());
    assert_eq!(refused, vec![96, 80, 64, 48], "{}", server.log());
    assert_eq!(obtained, Some(32), "{}", server.log());
    qemu_io(&mut server, &[format!("write -P 0x3c {} {}", 31 * MIB, MIB), format!("read -P 0x3c {} {}", 31 * MIB, MIB)]);

    // Below that floor: exit 4, naming the floor actually given.
    let (out, dir) = Serve::new(96).arg("--step").arg("16").arg("--min-size").arg("48").env("FAKE_CUDA_FREE_MIB", "40").run_to_exit();
    assert_eq!(out.status.code(), Some(4), "{}", out.stderr);
    assert_eq!(fallback(&out.stderr), (vec![96, 80, 64, 48], None), "{}", out.stderr);
    assert!(out.stderr.contains("--min-size 48 MiB") && out.stderr.contains("40 MiB free"), "{}", out.stderr);
    assert!(!dir.path("sock").exists(), "a server that failed to start left a socket");
}

#[test]
fn below_the_floor_exits_4_and_says_why() {
    let (out, dir) = Serve::new(2048).env("FAKE_CUDA_FREE_MIB", "300").run_to_exit();
    assert_eq!(out.status.code(), Some(4), "stderr:\n{}", out.stderr);
    assert_eq!(fallback(&out.stderr), (vec![2048, 1536, 1024, 512], None), "{}", out.stderr);
    let last = out.stderr.lines().next_back().unwrap_or_default();
    for want in ["could not allocate 2048 MiB", "300 MiB free", "--min-size", "nvidia-smi"] {
        assert!(last.contains(want), "{want:?} missing from the final message:\n{}", out.stderr);
    }
    assert!(!dir.path("sock").exists(), "a server that failed to start left a socket");
    assert!(!out.stderr.contains("serving"), "{}", out.stderr);
}

/// A size that is no power of two, where single allocations stop at
/// 16 MiB: two whole chunks and a short last one, all usable to the end.
#[test]
fn odd_size_ends_in_a_short_chunk() {
    let mut server = Serve::new(40).env("FAKE_CUDA_MAX_ALLOC_MIB", "16").start();
    assert!(server.logged("allocated 40 MiB of VRAM in 3 chunk(s)"), "{}", server.log());
    assert_eq!(ok_allocs(&server.cuda_log()), vec![16 * MIB, 16 * MIB, 8 * MIB], "{}", server.cuda_log());
    let (at, len) = (32 * MIB - 3 * KIB, 8 * MIB + 3 * KIB);
    qemu_io(&mut server, &[format!("write -P 0x6d {at} {len}"), format!("read -P 0x6d {at} {len}"), format!("read -P 0 0 {at}")]);
}

/// Plenty free, but no piece of 2 MiB or more can be had (the fake caps
/// single allocations at 1 MiB): every halving is tried, then exit 4, with
/// nothing left allocated.
#[test]
fn no_chunk_fits_exits_4() {
    let (out, dir) = Serve::new(64).env("FAKE_CUDA_MAX_ALLOC_MIB", "1").run_to_exit();
    assert_eq!(out.status.code(), Some(4), "{}", out.stderr);
    let cuda_log = fs::read_to_string(dir.path("cuda.log")).unwrap_or_default();
    let tried: Vec<String> = cuda_log.lines().filter(|l| l.starts_with("alloc ")).map(String::from).collect();
    let expected: Vec<String> = [64, 32, 16, 8, 4, 2].iter().map(|m| format!("alloc {} -> OUT_OF_MEMORY", m * MIB)).collect();
    assert_eq!(tried, expected, "fake's log:\n{cuda_log}");
    assert_eq!(cuda_log.lines().last(), Some("release 0 -> ok refs=0"), "the context is released, nothing leaked:\n{cuda_log}");
    assert!(out.stderr.contains("could not allocate 64 MiB"), "{}", out.stderr);
}

/// Each way CUDA can be missing at start: exit 3, and a message that says
/// what to do.
#[test]
fn startup_failures_exit_3_with_advice() {
    let missing = Path::new("/nonexistent/libcuda.so.1");
    let libm = ["/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6", "/lib64/libm.so.6"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .expect("a libm.so.6 to stand in for a library that is not libcuda");
    let cases: Vec<(&str, Serve, Vec<&str>)> = vec![
        ("no library", Serve::new(64).libcuda_flag(Some(missing)), vec!["/nonexistent/libcuda.so.1", "nvidia-smi", "--libcuda"]),
        (
            "no library, from NBD_VRAM_LIBCUDA",
            Serve::new(64).libcuda_flag(None).libcuda_env(Some(missing)),
            vec!["/nonexistent/libcuda.so.1", "nvidia-smi", "NBD_VRAM_LIBCUDA"],
        ),
        (
            "driver/module mismatch",
            Serve::new(64).env("FAKE_CUDA_INIT_ERROR", "803"),
            vec!["CUDA_ERROR_SYSTEM_DRIVER_MISMATCH", "reboot", "nvidia-smi"],
        ),
        (
            "driver/module mismatch, library from NBD_VRAM_LIBCUDA",
            Serve::new(64).libcuda_flag(None).libcuda_env(Some(libcuda())).env("FAKE_CUDA_INIT_ERROR", "803"),
            vec!["CUDA_ERROR_SYSTEM_DRIVER_MISMATCH", "reboot"],
        ),
        (
            "forward-compatibility libcuda",
            Serve::new(64).env("FAKE_CUDA_INIT_ERROR", "804"),
            vec!["CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE", "--libcuda"],
        ),
        ("no device", Serve::new(64).env("FAKE_CUDA_DEVICES", "0"), vec!["CUDA_ERROR_NO_DEVICE", "nvidia-smi"]),
        ("no such GPU", Serve::new(64).arg("--gpu").arg("1"), vec!["--gpu 1", "1 GPU", "nbd-vram gpus"]),
        (
            "no such GPU of two",
            Serve::new(64).arg("--gpu").arg("2").env("FAKE_CUDA_DEVICES", "2"),
            vec!["--gpu 2", "2 GPU", "nbd-vram gpus"],
        ),
        ("not libcuda", Serve::new(64).libcuda_flag(Some(libm)), vec!["libm.so.6", "cuInit", "not libcuda", "too old"]),
        (
            "zeroing the new VRAM fails",
            Serve::new(64).env("FAKE_CUDA_FAIL_COPY", "1"),
            vec!["cuMemsetD8_v2", "CUDA_ERROR_OUT_OF_MEMORY"],
        ),
    ];
    for (what, serve, wants) in cases {
        let (out, dir) = serve.run_to_exit();
        assert_eq!(out.status.code(), Some(3), "{what}: exit status; stderr:\n{}", out.stderr);
        // The last line is the message, whatever info came before it.
        let last = out.stderr.lines().next_back().unwrap_or_default();
        assert!(last.starts_with("nbd-vram: "), "{what}: no final message:\n{}", out.stderr);
        for want in wants {
            assert!(last.to_lowercase().contains(&want.to_lowercase()), "{what}: {want:?} missing from:\n{}", out.stderr);
        }
        assert!(!dir.path("sock").exists(), "{what}: a server that failed to start left a socket");
    }

    // `nbd-vram gpus` says the same.
    let out = run_nbd_vram(&["gpus", "--libcuda", missing.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(3), "{}", out.stderr);
    assert!(out.stderr.contains("nvidia-smi"), "{}", out.stderr);
    let lib = libcuda().to_str().unwrap();
    let out = run_nbd_vram(&["gpus", "--libcuda", lib], &[("FAKE_CUDA_DEVICES", "0")]);
    assert_eq!(out.status.code(), Some(3), "{}", out.stderr);
    assert!(out.stderr.contains("CUDA_ERROR_NO_DEVICE"), "{}", out.stderr);
}

/// `NBD_VRAM_LIBCUDA` finds the library as `--libcuda` does, and the flag
/// wins over the variable.
#[test]
fn libcuda_from_the_environment() {
    let lib = libcuda().to_str().unwrap();
    let out = run_nbd_vram(&["gpus"], &[("NBD_VRAM_LIBCUDA", lib)]);
    out.assert_success("nbd-vram gpus with NBD_VRAM_LIBCUDA");
    assert!(out.stdout.contains("Fake GPU 0"), "{}", out.stdout);

    let mut server = Serve::new(8).libcuda_flag(None).libcuda_env(Some(libcuda())).start();
    qemu_io(&mut server, &["write -P 0x42 4096 4096".into(), "read -P 0x42 4096 4096".into()]);
    drop(server);

    let mut server = Serve::new(8).libcuda_env(Some(Path::new("/nonexistent/libcuda.so.1"))).start();
    qemu_io(&mut server, &["write -P 0x43 0 512".into(), "read -P 0x43 0 512".into()]);
}

/// `nbd-vram gpus` lists each fake device with its memory; `--gpu 1` serves.
#[test]
fn gpus_lists_two_devices_and_gpu_1_serves() {
    let lib = libcuda().to_str().unwrap();
    let env = [("FAKE_CUDA_DEVICES", "2"), ("FAKE_CUDA_TOTAL_MIB", "4096"), ("FAKE_CUDA_FREE_MIB", "3000")];
    let out = run_nbd_vram(&["gpus", "--libcuda", lib], &env);
    out.assert_success("nbd-vram gpus");
    assert!(out.stdout.contains("2 GPU(s)"), "{}", out.stdout);
    let rows: Vec<Vec<&str>> =
        out.stdout.lines().filter(|l| l.contains("Fake GPU")).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 2, "{}", out.stdout);
    for (i, row) in rows.iter().enumerate() {
        let gpu = i.to_string();
        assert_eq!(row[0], gpu, "index: {}", out.stdout);
        assert_eq!(row[1..4], ["Fake", "GPU", gpu.as_str()], "name: {}", out.stdout);
        assert_eq!(row[row.len() - 2..], ["4096", "3000"], "total and free MiB: {}", out.stdout);
    }

    let mut server = Serve::new(16).arg("--gpu").arg("1").env("FAKE_CUDA_DEVICES", "2").start();
    assert!(server.logged("allocated 16 MiB of VRAM"), "{}", server.log());
    qemu_io(&mut server, &[format!("write -P 0x61 {} {}", 15 * MIB, MIB), format!("read -P 0x61 {} {}", 15 * MIB, MIB), format!("read -P 0 0 {}", 15 * MIB)]);
}

/// Two servers at once, one per fake GPU, each with its own data.
#[test]
fn two_servers_on_two_gpus() {
    let mut gpu0 = Serve::new(16).arg("--gpu").arg("0").env("FAKE_CUDA_DEVICES", "2").start();
    let mut gpu1 = Serve::new(16).arg("--gpu").arg("1").env("FAKE_CUDA_DEVICES", "2").start();
    qemu_io(&mut gpu0, &[format!("write -P 0xa0 {MIB} {MIB}")]);
    qemu_io(&mut gpu1, &[format!("write -P 0xb1 {MIB} {MIB}")]);
    qemu_io(&mut gpu0, &[format!("read -P 0xa0 {MIB} {MIB}"), "read -P 0 0 1048576".into()]);
    qemu_io(&mut gpu1, &[format!("read -P 0xb1 {MIB} {MIB}"), "read -P 0 0 1048576".into()]);
    gpu0.assert_alive();
    gpu1.assert_alive();
}

/// VRAM fresh from the allocator holds what its last user left there: the
/// fake's backing file plays that user, and none of it may be exported.
#[test]
fn fresh_vram_reads_as_zeroes() {
    let dir = common::TempDir::new();
    let backing = dir.path("vram");
    fs::write(&backing, vec![0xa5u8; 24 * MIB as usize]).unwrap();
    let backing = backing.to_str().unwrap();
    // In 4 MiB chunks, so that every chunk must be cleared.
    let mut server = Serve::new(16).env("FAKE_CUDA_BACKING", backing).env("FAKE_CUDA_MAX_ALLOC_MIB", "4").start();
    assert!(server.logged("allocated 16 MiB of VRAM in 4 chunk(s)"), "{}", server.log());
    qemu_io(&mut server, &[format!("read -P 0 0 {}", 16 * MIB)]);
}

/// The swap daemon writes its swap header straight into the store and
/// syncs: a copy that fails to start there is an error (not a header
/// reported written with nothing written), before any device is touched.
#[test]
fn a_swap_header_that_was_not_written_stops_the_daemon() {
    let lib = libcuda().to_str().expect("a UTF-8 path");
    let env = [("NBD_VRAM_BATCH", "1"), ("NBD_VRAM_MAILBOX", "0"), ("FAKE_CUDA_FAIL_COPY", "2")];
    let out = run_nbd_vram(&["--size", "16", "--device", "/dev/nbd-vram-test-none", "--libcuda", lib], &env);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("writing the swap header: Input/output error"), "{}", out.stderr);
    assert!(!out.stderr.contains("/dev/nbd-vram-test-none"), "went on to the device:\n{}", out.stderr);
}
