//! qemu-io (QEMU's own NBD client) writes patterns and verifies them, at
//! aligned and unaligned offsets, from 512 B to the 32 MiB request maximum;
//! write-zeroes, discard (which zeroes here), FUA and flush.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{run, Server, KIB, MIB};

/// `common::qemu_io` on this server, which must survive it.
fn qemu_io(server: &mut Server, cmds: &[String]) -> String {
    let text = common::qemu_io(&server.uri(), cmds);
    server.assert_alive();
    text
}

/// (offset, length, pattern byte): every size at an aligned and an
/// unaligned offset, none touching another, the last one ending at the end.
fn regions(size: u64) -> Vec<(u64, u64, u8)> {
    let mut v = vec![
        (0, 512, 0x11),
        (1000, 512, 0x12),
        (8 * KIB, 4 * KIB, 0x21),
        (16 * KIB + 4095, 4 * KIB, 0x22),
        (64 * KIB, 64 * KIB, 0x31),
        (192 * KIB + 1, 64 * KIB, 0x32),
        (MIB, MIB, 0x41),
        (3 * MIB - 7, MIB, 0x42),
        (8 * MIB, 32 * MIB, 0x51),
        (40 * MIB + 4095, 32 * MIB, 0x52),
        (size - 512, 512, 0x61),
    ];
    v.sort();
    for w in v.windows(2) {
        assert!(w[0].0 + w[0].1 < w[1].0, "regions {w:?} must leave a gap");
    }
    v
}

#[test]
fn patterns_of_every_size_read_back_at_any_alignment() {
    let mut server = Server::start(80 * MIB);
    let regions = regions(server.size);
    let write: Vec<String> = regions.iter().map(|(o, l, p)| format!("write -P {p:#x} {o} {l}")).collect();
    let mut read: Vec<String> = regions.iter().map(|(o, l, p)| format!("read -P {p:#x} {o} {l}")).collect();
    // Nothing spilled: the byte before and after each region is still zero.
    for (o, l, _) in &regions {
        if *o > 0 {
            read.push(format!("read -P 0 {} 1", o - 1));
        }
        if o + l < server.size {
            read.push(format!("read -P 0 {} 1", o + l));
        }
    }
    qemu_io(&mut server, &[write.clone(), read.clone()].concat());
    // And on a new connection.
    qemu_io(&mut server, &read);
}

#[test]
fn aio_requests_in_flight_together() {
    let mut server = Server::start(8 * MIB);
    let mut cmds: Vec<String> = (0..16u64).map(|i| format!("aio_write -P {} {} {}", i + 1, i * 100 * KIB + i, 100 * KIB)).collect();
    cmds.push("aio_flush".into());
    cmds.extend((0..16u64).map(|i| format!("aio_read -P {} {} {}", i + 1, i * 100 * KIB + i, 100 * KIB)));
    cmds.push("aio_flush".into());
    qemu_io(&mut server, &cmds);
}

#[test]
fn write_zeroes_discard_fua_and_flush() {
    let mut server = Server::start(8 * MIB);
    let cmds = [
        "write -P 0xcc 0 2M",
        // write-zeroes, unaligned, with and without "may unmap"
        "write -z 1000 3000",
        "write -z -u 100000 70000",
        // discard zeroes in this store
        "discard 1M 64k",
        "write -f -P 0x5a 1500000 5000",
        "flush",
        "read -P 0xcc 0 1000",
        "read -P 0 1000 3000",
        "read -P 0xcc 4000 96000",
        "read -P 0 100000 70000",
        "read -P 0xcc 170000 878576",
        "read -P 0 1M 64k",
        "read -P 0xcc 1114112 385888",
        "read -P 0x5a 1500000 5000",
        "read -P 0xcc 1505000 592152",
        "read -P 0 2M 6M",
    ]
    .map(String::from);
    qemu_io(&mut server, &cmds);
}

/// The checks above can fail: a wrong pattern is caught.
#[test]
fn a_wrong_pattern_is_detected() {
    let server = Server::start(MIB);
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &server.uri(), "-c", "write -P 0x11 0 4k", "-c", "read -P 0x12 0 4k"]);
    let out = run(&mut cmd, Duration::from_secs(60));
    assert!(out.stdout.contains("Pattern verification failed"), "{}", out.stdout);
}
