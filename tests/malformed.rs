//! Malformed and hostile input on a raw socket. Each test writes known data,
//! misbehaves on a connection of its own, then checks that a fresh
//! connection reads the known data back intact and the server still runs;
//! the host store, and for requests drawn at random the VRAM store too, on
//! the fake driver.

mod common;
mod fake_cuda_env;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use common::raw::*;
use common::{pattern, Server, MIB};
use fake_cuda_env::Serve;

const SIZE: u64 = 4 * MIB;
/// Known data: 64 KiB at an unaligned offset, and the store's last 4 KiB.
const AT: u64 = 4096 + 100;
const LEN: u32 = 64 * 1024;
const TAIL: u64 = SIZE - 4096;

fn setup() -> Server {
    with_known_data(Server::start(SIZE))
}

fn with_known_data(server: Server) -> Server {
    let mut c = Nbd::connect(&server.sock);
    assert_eq!(c.size, SIZE);
    assert_eq!(c.write(AT, &pattern(1, LEN as usize)), 0);
    assert_eq!(c.write(TAIL, &pattern(2, 4096)), 0);
    c.disconnect();
    server
}

/// Checks the known data on `c`, which must still be usable.
fn assert_known(c: &mut Nbd) {
    assert!(c.read(AT, LEN) == Ok(pattern(1, LEN as usize)), "known data changed");
    assert!(c.read(TAIL, 4096) == Ok(pattern(2, 4096)), "known tail changed");
}

/// A fresh connection sees the known data, and the server lives.
fn assert_intact(server: &mut Server) {
    let mut c = Nbd::connect(&server.sock);
    assert_known(&mut c);
    c.disconnect();
    server.assert_alive();
}

#[test]
fn garbage_instead_of_a_request_closes_the_connection() {
    let mut server = setup();
    let mut c = Nbd::connect(&server.sock);
    c.s.write_all(&pattern(3, 100)).unwrap();
    c.expect_closed();
    assert_intact(&mut server);
}

#[test]
fn bad_request_magic_closes_the_connection() {
    let mut server = setup();
    let mut c = Nbd::connect(&server.sock);
    let mut h = header(0, CMD_READ, 1, 0, 512);
    h[0] ^= 0x80;
    c.s.write_all(&h).unwrap();
    c.expect_closed();
    assert_intact(&mut server);
}

#[test]
fn truncated_request_closes_the_connection() {
    let mut server = setup();
    let mut c = Nbd::connect(&server.sock);
    c.s.write_all(&header(0, CMD_READ, 1, AT, 512)[..14]).unwrap();
    c.s.shutdown(Shutdown::Write).unwrap();
    c.expect_closed();
    assert_intact(&mut server);
}

#[test]
fn truncated_write_payload_is_not_applied() {
    let mut server = setup();
    let mut c = Nbd::connect(&server.sock);
    c.s.write_all(&header(0, CMD_WRITE, 1, AT, LEN)).unwrap();
    c.s.write_all(&[0xee; 1000]).unwrap();
    c.s.shutdown(Shutdown::Write).unwrap();
    c.expect_closed();
    assert_intact(&mut server);
}

/// A 1 MiB write over the known data, cut at several points (the last one
/// inside the tail's bytes), sent in pieces with pauses, so that the
/// server finds the socket empty mid-payload: nothing of it is applied.
#[test]
fn long_write_payload_cut_anywhere_is_not_applied() {
    let mut server = setup();
    for offset in [0, SIZE - MIB] {
        for cut in [1000, 300 * 1024, MIB as usize - 100] {
            let mut c = Nbd::connect(&server.sock);
            c.s.write_all(&header(0, CMD_WRITE, 1, offset, MIB as u32)).unwrap();
            for piece in pattern(4, cut).chunks(48 * 1024) {
                c.s.write_all(piece).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            c.s.shutdown(Shutdown::Write).unwrap();
            c.expect_closed();
            assert_intact(&mut server);
        }
    }
}

#[test]
fn unknown_command_gets_einval_and_the_connection_goes_on() {
    let mut server = setup();
    let mut c = Nbd::connect(&server.sock);
    for cmd in [5, 7, 99, 0xffff] {
        assert_eq!(c.command(0, cmd, 0, 4096), EINVAL, "command {cmd}");
    }
    assert_known(&mut c);
    c.disconnect();
    assert_intact(&mut server);
}

#[test]
fn zero_length_io_gets_einval() {
    let mut server = setup();
    let mut c = Nbd::connect(&server.sock);
    assert_eq!(c.read(AT, 0), Err(EINVAL));
    assert_eq!(c.write(AT, &[]), EINVAL);
    assert_eq!(c.command(0, CMD_TRIM, AT, 0), EINVAL);
    assert_eq!(c.command(0, CMD_WRITE_ZEROES, AT, 0), EINVAL);
    assert_known(&mut c);
    c.disconnect();
    assert_intact(&mut server);
}

#[test]
fn read_and_trim_past_the_end_get_einval() {
    let mut server = setup();
    let mut c = Nbd::connect(&server.sock);
    assert_eq!(c.read(SIZE - 512, 1024), Err(EINVAL), "straddling the end");
    assert_eq!(c.read(SIZE, 1), Err(EINVAL), "just past the end");
    assert_eq!(c.read(u64::MAX - 10, 512), Err(EINVAL), "offset + length overflows");
    assert_eq!(c.read(0, 33 * MIB as u32), Err(EINVAL), "over the 32 MiB maximum");
    assert_eq!(c.command(0, CMD_TRIM, TAIL, 8192), EINVAL, "trim past the end");
    assert_eq!(c.command(0, CMD_FLUSH, 0, 4096), EINVAL, "flush with a length");
    assert!(c.read(SIZE - 1, 1).is_ok(), "the last byte reads");
    assert_known(&mut c);
    c.disconnect();
    assert_intact(&mut server);
}

#[test]
fn write_past_the_end_gets_enospc_and_its_payload_is_consumed() {
    let mut server = setup();
    let mut c = Nbd::connect(&server.sock);
    // The payloads look like requests: unconsumed, they would be parsed.
    let fake = header(0, CMD_WRITE_ZEROES, 77, AT, LEN).repeat(200);
    assert_eq!(c.write(SIZE - 4096, &fake), ENOSPC, "straddling the end");
    assert_eq!(c.write(SIZE, &fake[..28]), ENOSPC, "just past the end");
    assert_eq!(c.write(u64::MAX - 10, &fake[..28]), ENOSPC, "offset + length overflows");
    assert_eq!(c.command(0, CMD_WRITE_ZEROES, TAIL, 8192), ENOSPC, "write-zeroes past the end");
    assert_known(&mut c);
    c.disconnect();
    assert_intact(&mut server);
}

#[test]
fn oversized_write_gets_einval_and_its_payload_is_consumed() {
    let mut server = setup();
    let mut c = Nbd::connect(&server.sock);
    let len = 32 * MIB as usize + 4096;
    let fake = header(0, CMD_WRITE_ZEROES, 77, AT, LEN).repeat(len / 28 + 1);
    assert_eq!(c.write(0, &fake[..len]), EINVAL);
    assert_known(&mut c);
    c.disconnect();
    assert_intact(&mut server);
}

#[test]
fn unknown_command_flag_gets_einval_and_the_payload_is_not_written() {
    let mut server = setup();
    let mut c = Nbd::connect(&server.sock);
    let junk = header(0, CMD_WRITE_ZEROES, 77, AT, LEN).repeat(100);
    assert_eq!(c.write_flags(1 << 15, AT, &junk), EINVAL);
    assert_eq!(c.write_flags(FLAG_FUA | 1 << 2, AT, &junk), EINVAL, "DF is for reads only");
    assert_eq!(c.command(1 << 9, CMD_FLUSH, 0, 0), EINVAL);
    assert_known(&mut c);
    // Known flags still work: FUA on a write, then put the data back.
    assert_eq!(c.write_flags(FLAG_FUA, AT, &[9; 10]), 0);
    assert_eq!(c.read(AT, 10), Ok(vec![9; 10]));
    assert_eq!(c.write(AT, &pattern(1, 10)), 0);
    c.disconnect();
    assert_intact(&mut server);
}

#[test]
fn unknown_option_gets_err_unsup_then_go_works() {
    let mut server = setup();
    let mut s = greet(&server.sock);
    for opt in [OPT_STRUCTURED_REPLY, 5, 0x1234_5678] {
        send_option(&mut s, opt, b"some data");
        let (o, kind, data) = option_reply(&mut s);
        assert_eq!((o, kind), (opt, REP_ERR_UNSUP), "option {opt:#x}");
        let _ = data; // an optional message
    }
    let mut c = Nbd::go(s);
    assert_eq!(c.size, SIZE);
    assert_known(&mut c);
    c.disconnect();
    assert_intact(&mut server);
}

#[test]
fn client_vanishing_mid_read_reply_does_not_hurt_the_server() {
    let mut server = setup();
    // A read of the whole store, far more than a socket buffer holds, of
    // which only the reply header is taken before closing.
    let mut c = Nbd::connect(&server.sock);
    c.send(0, CMD_READ, 0, SIZE as u32, &[]);
    assert_eq!(c.reply().0, 0);
    drop(c);
    // Pipelined reads, none of whose replies is read.
    let mut c = Nbd::connect(&server.sock);
    for _ in 0..8 {
        c.send(0, CMD_READ, 0, SIZE as u32, &[]);
    }
    drop(c);
    assert_intact(&mut server);
}

#[test]
fn pipelined_requests_are_all_answered() {
    let mut server = setup();
    let mut c = Nbd::connect(&server.sock);
    // 100 writes in flight at once, then 100 reads of them. Replies may come
    // in any order: the cookie says which request each answers.
    let at = |i: u64| MIB + i * 1000;
    let mut writes = std::collections::HashSet::new();
    for i in 0..100 {
        writes.insert(c.send(0, CMD_WRITE, at(i), 1000, &pattern(10 + i, 1000)));
    }
    while !writes.is_empty() {
        let (error, cookie) = c.reply();
        assert_eq!(error, 0, "write {cookie}");
        assert!(writes.remove(&cookie), "unknown or repeated cookie {cookie}");
    }
    let mut reads = std::collections::HashMap::new();
    for i in 0..100 {
        reads.insert(c.send(0, CMD_READ, at(i), 1000, &[]), i);
    }
    while !reads.is_empty() {
        let (error, cookie) = c.reply();
        assert_eq!(error, 0, "read {cookie}");
        let i = reads.remove(&cookie).expect("a known cookie, once");
        let mut data = vec![0u8; 1000];
        std::io::Read::read_exact(&mut c.s, &mut data).unwrap();
        assert!(data == pattern(10 + i, 1000), "read {i}: wrong data");
    }
    c.disconnect();
    assert_intact(&mut server);
}

/// Requests drawn at random, each round on a connection of its own:
/// commands and flags known and unknown, offsets in the free part of the
/// store, across its end and far past it, lengths from 0 to 4 GiB, write
/// payloads whole, cut short or never sent, and now and then a last word
/// of garbage. A round ends with our end of the connection shut, once the
/// server has closed its own. Every reply must answer a request sent, once,
/// with the error `expected` says, and in a round whose requests all came
/// whole, every request gets one; the server must live on, and the known
/// data survive every round.
/// Seeded, so a failure comes back the same; it names its round.
fn random_rounds(server: &mut Server, rounds: u32) {
    let mut state: [libc::c_ushort; 3] = [0x5eed, 0x5eed, 0x5eed];
    // SAFETY: nrand48 only reads and writes the three words it is given.
    let mut next = |n: u64| unsafe { libc::nrand48(state.as_mut_ptr()) } as u64 % n;
    // Offsets and lengths in the store never reach the known data: it
    // lies below FREE and from TAIL on, and a request that would cover it
    // reaches past the end too, which the server must refuse whole.
    const FREE: u64 = 256 * 1024;
    for round in 0..rounds {
        let mut s = Nbd::connect(&server.sock).s;
        let (mut wire, mut sent, mut whole) = (Vec::new(), Vec::new(), true);
        for cookie in 0..1 + next(12) {
            // Mostly what a client sends, else anything.
            let cmd = match next(10) {
                0..=3 => CMD_READ,
                4..=6 => CMD_WRITE,
                7 => [CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES][next(3) as usize],
                _ => [CMD_DISC, 5, 7, 8, next(1 << 16) as u16][next(5) as usize],
            };
            let flags = match next(6) {
                0 => [1 << 1, 1 << 2, 1 << 3, 1 << 4, next(1 << 16) as u16][next(5) as usize],
                _ => [0, FLAG_FUA][next(2) as usize],
            };
            let mut len = match next(4) {
                0 => [0, 1, 32 * MIB, 32 * MIB + 1, u32::MAX as u64, next(1 << 31)][next(6) as usize],
                _ => [512, 4096, 1 + next(65536), 65536, MIB][next(5) as usize],
            };
            let offset = match next(8) {
                _ if cmd == CMD_FLUSH && next(4) != 0 => {
                    len = 0;
                    0
                }
                0 => SIZE - 100,
                1 => SIZE + next(2) * 4096,
                2 => [1 << 63, u64::MAX - 4095][next(2) as usize],
                _ => FREE + next(3 * MIB),
            };
            if offset < SIZE && offset + len > TAIL {
                len = len.max(SIZE - offset + 512);
            }
            wire.extend(header(flags, cmd, cookie, offset, len as u32));
            sent.push((cmd, flags, offset, len as u32));
            if cmd == CMD_WRITE && len <= 65536 {
                let given = if next(4) == 0 { next(len + 1) } else { len };
                wire.extend(pattern(u64::from(round), given as usize));
                whole &= given == len;
            }
            // A payload never sent, or a disconnect: what follows is not answered.
            whole &= !(cmd == CMD_WRITE && len > 65536) && cmd != CMD_DISC;
        }
        if next(8) == 0 {
            wire.extend(pattern(u64::from(round) + 1, 1 + next(40) as usize));
            whole = false;
        }
        // Replies are taken while requests go out: the server may stop
        // reading until its replies are.
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut theirs = s.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut replies = Vec::new();
            let read = theirs.read_to_end(&mut replies);
            (replies, read)
        });
        // Unless it closed the connection on something invalid.
        if let Err(e) = s.write_all(&wire) {
            assert!(matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset), "round {round}: sending: {e}");
        }
        let _ = s.shutdown(Shutdown::Write);
        let (replies, read) = reader.join().unwrap();
        if let Err(e) = read {
            assert!(e.kind() == std::io::ErrorKind::ConnectionReset, "round {round}: the server did not close the connection: {e}");
        }
        let (mut at, mut answered) = (0, std::collections::HashSet::new());
        while let Some(Ok(reply)) = replies.get(at..at + 16).map(<&[u8; 16]>::try_from) {
            let (magic, error, cookie) = reply_header(reply);
            assert_eq!(magic, SIMPLE_REPLY_MAGIC, "round {round}: a reply without its magic");
            let &(cmd, flags, offset, len) = sent.get(cookie as usize).unwrap_or_else(|| panic!("round {round}: a reply to no request: {cookie}"));
            assert!(answered.insert(cookie), "round {round}: request {cookie} answered twice");
            let what = format!("round {round}: command {cmd}, flags {flags:#x}, offset {offset}, length {len}");
            assert_eq!(error, expected(cmd, flags, offset, len), "{what}");
            at += 16 + if cmd == CMD_READ && error == 0 { len as usize } else { 0 };
        }
        assert_eq!(at, replies.len(), "round {round}: a reply cut short");
        if whole {
            assert_eq!(answered.len(), sent.len(), "round {round}: requests sent whole went unanswered");
        }
        if round % 25 == 24 {
            assert_intact(server);
        }
    }
    assert_intact(server);
}

/// The error the server must answer a request with (the protocol's rules,
/// with the largest payload the server takes): ENOSPC for a write that
/// reaches past the end and is otherwise sound, EINVAL for anything else
/// wrong, 0 where it must do it.
fn expected(cmd: u16, flags: u16, offset: u64, len: u32) -> u32 {
    let allowed = if cmd == CMD_WRITE_ZEROES { FLAG_FUA | 1 << 1 } else { FLAG_FUA };
    let fits = |most: u64| len > 0 && u64::from(len) <= most;
    let sound = flags & !allowed == 0
        && match cmd {
            CMD_FLUSH => offset == 0 && len == 0,
            CMD_READ | CMD_WRITE => fits(32 * MIB),
            CMD_TRIM | CMD_WRITE_ZEROES => fits(u64::MAX),
            _ => false,
        };
    let in_store = offset.checked_add(u64::from(len)).is_some_and(|end| end <= SIZE);
    match cmd {
        _ if !sound => EINVAL,
        _ if in_store => 0,
        CMD_WRITE | CMD_WRITE_ZEROES => ENOSPC,
        _ => EINVAL,
    }
}

#[test]
fn random_requests_hurt_neither_the_host_store_nor_its_data() {
    random_rounds(&mut setup(), 1000);
}

#[test]
fn random_requests_hurt_neither_the_vram_store_nor_its_data() {
    let server = Serve::new(SIZE / MIB).env("NBD_VRAM_BATCH", "1").start();
    random_rounds(&mut with_known_data(server), 1000);
}
