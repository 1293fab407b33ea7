//! `serve --store vram` on the fake CUDA driver (tests/fake_cuda, built by
//! the test itself): data through NBD clients across the boundaries of a
//! chunked allocation, the `--step`/`--min-size` fallback line by line,
//! every start-up failure's message and exit code, a failing CUDA copy
//! answered `EIO` for that one request while serving goes on, and more than
//! one GPU.

mod common;
mod fake_cuda_env;

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::raw::{Nbd, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES};
use common::{pattern, run, sha256, KIB, MIB};
use fake_cuda_env::{checker, libcuda, run_nbd_vram, Serve, VramServer};

/// Linux's EIO, as NBD replies carry it.
const EIO: u32 = 5;

/// `common::qemu_io` on this server, which must survive it.
fn qemu_io(server: &mut VramServer, cmds: &[String]) -> String {
    let text = common::qemu_io(&server.uri(), cmds);
    server.assert_alive();
    text
}

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
    assert!(server.log().contains("allocated 64 MiB of VRAM in 4 chunk(s)"), "{}", server.log());
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
    assert!(server.log().contains("allocated 40 MiB of VRAM in 3 chunk(s)"), "{}", server.log());
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
            vec!["cuMemsetD8_v2", "CUDA_ERROR_ILLEGAL_ADDRESS"],
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

/// Reads `want.len()` bytes at `offset` and asserts they are `want`,
/// saying where they differ rather than printing them.
fn read_ok(nbd: &mut Nbd, offset: u64, want: &[u8], what: &str) {
    match nbd.read(offset, want.len() as u32) {
        Ok(got) => {
            let diff = got.iter().zip(want).position(|(a, b)| a != b);
            assert!(diff.is_none(), "{what}: read at {offset} differs from what was written, first at byte {diff:?}");
        }
        Err(e) => panic!("{what}: read at {offset} failed with error {e}"),
    }
}

/// Asserts that a read at `offset` fails with `EIO` (and sends no data).
fn read_eio(nbd: &mut Nbd, offset: u64, len: u32, what: &str) {
    match nbd.read(offset, len) {
        Ok(_) => panic!("{what}: read at {offset} succeeded; EIO expected"),
        Err(e) => assert_eq!(e, EIO, "{what}: read at {offset}: error {e}, EIO expected"),
    }
}

/// Reads at `offset` and returns the data, or `None` if the server sent
/// the reply header and then ended the connection instead of the data: a
/// lone read's header goes out while its copy runs, so a copy that then
/// fails can only cut the reply short.
fn read_or_cut(nbd: &mut Nbd, offset: u64, len: u32, what: &str) -> Option<Vec<u8>> {
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
/// CUDA_ERROR_ILLEGAL_ADDRESS, and that it said which request failed.
fn assert_one_copy_error(server: &VramServer, call: &str, request: &str) {
    let log = server.log();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("CUDA_ERROR_")).collect();
    assert_eq!(errors.len(), 1, "one CUDA error expected:\n{log}");
    assert!(errors[0].contains(&format!("{call}: CUDA_ERROR_ILLEGAL_ADDRESS")), "{log}");
    assert!(log.contains(request), "{request:?} missing from:\n{log}");
}

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
        let mut data = vec![0u8; a.len()];
        nbd.s.read_exact(&mut data).expect("read data");
        assert!(data == a, "read {} of those in flight returned other data", i + 1);
    }
    nbd.disconnect();
    server.assert_alive();
    assert_one_copy_error(&server, "cuMemcpyDtoHAsync_v2", "read at offset 0 length 65536 failed");

    // A write over a chunk boundary, in 2 MiB chunks: copies 1-4 zero the
    // four chunks, 5 is a write, 6 and 7 the two halves of the next one:
    // its second half fails.
    let mut server = Serve::new(8).env("FAKE_CUDA_MAX_ALLOC_MIB", "2").env("FAKE_CUDA_FAIL_COPY", "7").start();
    assert!(server.log().contains("in 4 chunk(s)"), "{}", server.log());
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
    let mut wire = Vec::new();
    for (i, data) in [&a, &b].into_iter().enumerate() {
        wire.extend(common::raw::header(0, CMD_WRITE, i as u64, i as u64 * MIB, data.len() as u32));
        wire.extend(data);
    }
    wire.extend(common::raw::header(0, CMD_FLUSH, 2, 0, 0));
    std::io::Write::write_all(&mut nbd.s, &wire).unwrap();
    assert_eq!(nbd.reply(), (EIO, 0), "the first write of the failed batch");
    assert_eq!(nbd.reply(), (EIO, 1), "the second");
    assert_eq!(nbd.reply(), (0, 2), "the flush after them");
    assert_eq!(nbd.write(0, &a), 0, "the write again");
    read_ok(&mut nbd, 0, &a, "read back");
    nbd.disconnect();
    server.assert_alive();
    assert!(!server.log().contains("may be lost"), "{}", server.log());

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
            assert!(server.log().contains("its data cannot follow"), "{what}:\n{}", server.log());
            nbd = Nbd::connect(&server.sock);
        } else {
            read_eio(&mut nbd, 0, 4096, "the read whose wait fails");
        }
        assert_lost(&mut server, nbd, "CUDA_ERROR_ILLEGAL_ADDRESS", &what);
    }
}

/// With groups of eight, a batch of nine reads is two groups, eight and
/// one: when the first group's wait fails, the lone read after it answers
/// EIO like the rest, its header not sent ahead of a failure already known.
#[test]
fn a_lone_read_after_a_failed_group_answers_eio() {
    use std::io::Write;
    let mut server = Serve::new(8).env("FAKE_CUDA_FAIL_SYNC", "1").env("NBD_VRAM_GROUP", "8").start();
    let mut nbd = Nbd::connect(&server.sock);
    let wire: Vec<u8> = (0..9).flat_map(|i| common::raw::header(0, CMD_READ, i, i * 4096, 4096)).collect();
    nbd.s.write_all(&wire).unwrap();
    let mut cookies: Vec<u64> = (0..9).map(|_| nbd.reply()).inspect(|&(e, c)| assert_eq!(e, EIO, "read {c}")).map(|(_, c)| c).collect();
    cookies.sort();
    assert_eq!(cookies, (0..9).collect::<Vec<u64>>());
    assert_lost(&mut server, nbd, "CUDA_ERROR_ILLEGAL_ADDRESS", "nine reads, FAIL_SYNC=1");
}

/// After a device failure: every request answers EIO, on a new connection
/// too, the server lives on, and it said once that data may be lost, with
/// CUDA's `error`.
fn assert_lost(server: &mut VramServer, mut nbd: Nbd, error: &str, what: &str) {
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
    assert!(server.log().contains("allocated 16 MiB of VRAM"), "{}", server.log());
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
    assert!(server.log().contains("allocated 16 MiB of VRAM in 4 chunk(s)"), "{}", server.log());
    qemu_io(&mut server, &[format!("read -P 0 0 {}", 16 * MIB)]);
}

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
        assert!(server.log().contains(says), "{}", server.log());
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
#[test]
fn batched_copies_read_what_was_just_written() {
    on_each_copy_path(|| Serve::new(8), read_what_was_just_written);
}

fn read_what_was_just_written(server: &mut VramServer) {
    use std::io::Write;
    let mut nbd = Nbd::connect(&server.sock);
    let mut wire = Vec::new();
    let mut cookie = 0;
    for fill in [0x11u8, 0x22] {
        for block in 0..8u64 {
            wire.extend(common::raw::header(0, CMD_WRITE, cookie, block * 4096, 4096));
            wire.extend([fill + block as u8; 4096]);
            cookie += 1;
        }
        for block in 0..8u64 {
            wire.extend(common::raw::header(0, CMD_READ, cookie, block * 4096, 4096));
            cookie += 1;
        }
    }
    nbd.s.write_all(&wire).unwrap();
    let mut cookie = 0;
    for fill in [0x11u8, 0x22] {
        for _ in 0..8 {
            assert_eq!(nbd.reply(), (0, cookie), "reply to a write");
            cookie += 1;
        }
        for block in 0..8u8 {
            assert_eq!(nbd.reply(), (0, cookie), "reply to a read");
            cookie += 1;
            let mut got = vec![0u8; 4096];
            nbd.s.read_exact(&mut got).unwrap();
            assert!(got.iter().all(|&b| b == fill + block), "block {block} read {:#x}, not {:#x}", got[0], fill + block);
        }
    }
    server.assert_alive();
}

/// The mailbox kernel's lists the fake ran.
fn mailbox_lists(server: &VramServer) -> usize {
    server.cuda_log().lines().filter(|l| l.starts_with("nbd_vram_mailbox job ") && l.contains(" list ") && l.ends_with(" -> ok")).count()
}

/// The mailbox kernel's lone 4 KiB reads and writes the fake ran, and its
/// launches and ends.
fn mailbox_counts(server: &VramServer) -> [usize; 4] {
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
fn polls() -> bool {
    std::thread::available_parallelism().is_ok_and(|n| n.get() > 1)
}
const SPIN_US: &str = "100000";

/// An 8 MiB server whose mailbox kernel can run (batches on, polling as
/// above), with `env` added; `None` on one CPU.
fn mailbox_server(env: &[(&str, &str)]) -> Option<VramServer> {
    if !polls() {
        eprintln!("one CPU: the loop never polls, so the mailbox kernel never starts");
        return None;
    }
    let serve = Serve::new(8).env("NBD_VRAM_BATCH", "1").env("NBD_VRAM_SPIN", SPIN_US);
    Some(env.iter().fold(serve, |serve, &(k, v)| serve.env(k, v)).start())
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
        assert!(server.log().contains("small copies back to back: by the mailbox kernel, lone ones and batches"), "{}", server.log());
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
        assert!(server.log().contains("its data cannot follow"), "{}", server.log());
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
    use std::io::Write;
    const LEN: u32 = 2 << 20;
    let server = Serve::new(64).env("NBD_VRAM_BATCH", "1").start();
    let mut nbd = Nbd::connect(&server.sock);
    for i in 0..32u64 {
        assert_eq!(nbd.write(i * u64::from(LEN), &vec![i as u8 + 1; LEN as usize]), 0, "a 2 MiB write");
    }
    let reads: Vec<u8> = (0..32u64).flat_map(|i| common::raw::header(0, CMD_READ, 100 + i, i * u64::from(LEN), LEN)).collect();
    nbd.s.write_all(&reads).unwrap();
    let mut data = vec![0u8; LEN as usize];
    for _ in 0..32 {
        let (error, cookie) = nbd.reply();
        assert_eq!(error, 0, "a 2 MiB read");
        nbd.s.read_exact(&mut data).unwrap();
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

/// Lone reads and writes, eight writes together and eight reads of them
/// together, and a write of zeroes, each checked; `round` picks the data.
fn mixed_traffic(nbd: &mut Nbd, round: u8) {
    use std::io::Write;
    for block in 0..4u64 {
        assert_eq!(nbd.write(block * 4096, &[round; 4096]), 0, "a lone write");
        read_ok(nbd, block * 4096, &[round; 4096], "a lone read");
    }
    let data = |i: u64| [round ^ (i as u8 + 1); 4096];
    let mut writes = Vec::new();
    for i in 0..8 {
        writes.extend(common::raw::header(0, CMD_WRITE, 1000 + i, (8 + i) * 4096, 4096));
        writes.extend(data(i));
    }
    nbd.s.write_all(&writes).unwrap();
    (0..8).for_each(|i| assert_eq!(nbd.reply(), (0, 1000 + i), "one of eight writes"));
    let reads: Vec<u8> = (0..8).flat_map(|i| common::raw::header(0, CMD_READ, 2000 + i, (8 + i) * 4096, 4096)).collect();
    nbd.s.write_all(&reads).unwrap();
    for i in 0..8 {
        assert_eq!(nbd.reply(), (0, 2000 + i), "one of eight reads");
        let mut got = [0u8; 4096];
        nbd.s.read_exact(&mut got).unwrap();
        assert_eq!(got, data(i), "one of eight reads");
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
    for round in 0..50 {
        mixed_traffic(nbd, round);
        let (now, _) = engines(server);
        if now.iter().zip(than).all(|(n, t)| *n > t) {
            return now;
        }
    }
    panic!("not every way served traffic since {than:?}:\n{}", server.cuda_log());
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
    assert!(server.log().contains("ours alone again"), "{}", server.log());
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
    assert!(server.log().contains("NVML: "), "{}", server.log());
    let mut nbd = Nbd::connect(&server.sock);
    let before = until_compute_serves(&mut nbd, &server, [0; 3]);

    fs::write(&others, "1024").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_copy_engines_only(&mut nbd, &server, before);
    assert!(server.log().contains("another process took 1024 MiB"), "{}", server.log());
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
        assert!(server.log().contains("1 other process(es) use this GPU (NVML)"), "{}", server.log());
        let mut nbd = Nbd::connect(&server.sock);
        assert_copy_engines_only(&mut nbd, &server, [0; 3]);
        our_kernels_return_once_it_leaves(nbd, &mut server, &others, [0; 3]);
    }
}

/// Sends two 4 KiB reads in one write, at `at` and `at + 8192`, and
/// returns their errors, checking the data of those that succeed against
/// `data` (what the store holds from 0).
fn read_pair(nbd: &mut Nbd, at: u64, data: &[u8]) -> [u32; 2] {
    use std::io::Write;
    let pair = [common::raw::header(0, CMD_READ, 1, at, 4096), common::raw::header(0, CMD_READ, 2, at + 8192, 4096)].concat();
    nbd.s.write_all(&pair).unwrap();
    [(1, at as usize), (2, at as usize + 8192)].map(|(cookie, at)| {
        let (error, got) = nbd.reply();
        assert_eq!(got, cookie, "replies in order");
        if error == 0 {
            let mut read = [0u8; 4096];
            nbd.s.read_exact(&mut read).unwrap();
            assert!(read[..] == data[at..at + 4096], "read {cookie} of a pair at {at}");
        }
        error
    })
}

/// Runs `attempt` on up to five fresh mailbox servers until it returns
/// true: each runs its requests back to back, which a loaded machine can
/// delay past the loop's poll (the kernel then parks, and counts move).
fn on_a_quiet_try(env: &[(&str, &str)], attempt: impl Fn(&mut VramServer, Nbd) -> bool) {
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
        assert_eq!(mailbox_counts(server)[2], 1, "launched again after missing a deadline:\n{cuda}");
        assert!(cuda.contains("nbd_vram_mailbox ended after"), "the abandoned kernel never ended:\n{cuda}");
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
    assert!(server.log().contains("may use 1 SM: no mailbox kernel"), "{}", server.log());
    assert_eq!(mailbox_counts(&server)[2], 0, "{}", server.cuda_log());
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
