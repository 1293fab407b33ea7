//! The newstyle handshake from a raw socket: every supported option,
//! and the ways a client can get it wrong. After each, a fresh connection
//! must still be served.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::raw::*;
use common::{Server, MIB};

/// HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES, not READ_ONLY.
const TRANSMISSION_FLAGS: u16 = 1 | 4 | 8 | 32 | 64;

/// `NBD_OPT_INFO`/`GO` data: name, then info requests.
fn info_data(name: &[u8], requests: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend(name);
    d.extend((requests.len() as u16).to_be_bytes());
    requests.iter().for_each(|r| d.extend(r.to_be_bytes()));
    d
}

/// A fresh connection does I/O, and the server still runs.
fn still_serves(server: &mut Server) {
    let mut c = Nbd::connect(&server.sock);
    assert_eq!(c.write(4095, b"still here"), 0);
    assert_eq!(c.read(4095, 10), Ok(b"still here".to_vec()));
    c.disconnect();
    server.assert_alive();
}

#[test]
fn info_reports_size_flags_and_block_sizes_then_go_with_any_name() {
    let mut server = Server::start(MIB);
    let mut s = greet(&server.sock);
    send_option(&mut s, OPT_INFO, &info_data(b"", &[INFO_BLOCK_SIZE]));
    let (mut export, mut sizes) = (None, None);
    loop {
        let (opt, kind, d) = option_reply(&mut s);
        assert_eq!(opt, OPT_INFO);
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_INFO);
        match u16::from_be_bytes([d[0], d[1]]) {
            INFO_EXPORT => export = Some(d),
            INFO_BLOCK_SIZE => sizes = Some(d),
            other => panic!("unrequested info {other}"),
        }
    }
    let export = export.expect("NBD_INFO_EXPORT");
    assert_eq!(export.len(), 12);
    assert_eq!(u64::from_be_bytes(export[2..10].try_into().unwrap()), MIB);
    assert_eq!(u16::from_be_bytes([export[10], export[11]]), TRANSMISSION_FLAGS);
    let sizes = sizes.expect("NBD_INFO_BLOCK_SIZE, as requested");
    let word = |i: usize| u32::from_be_bytes(sizes[i..i + 4].try_into().unwrap());
    assert_eq!((sizes.len(), word(2), word(6), word(10)), (14, 1, 4096, 32 << 20));
    // INFO leaves the handshake going: GO, for a name the server ignores.
    let mut c = Nbd::go_named(s, b"whatever");
    assert_eq!((c.size, c.flags), (MIB, TRANSMISSION_FLAGS));
    assert_eq!(c.write(0, b"hello"), 0);
    assert_eq!(c.read(0, 5), Ok(b"hello".to_vec()));
    c.disconnect();
    still_serves(&mut server);
}

#[test]
fn list_names_the_one_default_export() {
    let mut server = Server::start(MIB);
    let mut s = greet(&server.sock);
    send_option(&mut s, OPT_LIST, &[]);
    assert_eq!(option_reply(&mut s), (OPT_LIST, REP_SERVER, vec![0, 0, 0, 0]));
    assert_eq!(option_reply(&mut s), (OPT_LIST, REP_ACK, vec![]));
    send_option(&mut s, OPT_LIST, b"data is not allowed");
    assert_eq!(option_reply(&mut s).1, REP_ERR_INVALID);
    // Malformed GO data: an error, and negotiation goes on.
    send_option(&mut s, OPT_GO, &[0, 0, 0, 9, 1]);
    assert_eq!(option_reply(&mut s).1, REP_ERR_INVALID);
    Nbd::go(s).disconnect();
    still_serves(&mut server);
}

#[test]
fn export_name_enters_transmission_with_and_without_zeroes() {
    let mut server = Server::start(MIB);
    for (flags, padding) in [(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 0), (FLAG_FIXED_NEWSTYLE, 124)] {
        let mut s = greet_with(&server.sock, flags);
        send_option(&mut s, OPT_EXPORT_NAME, b"");
        let mut reply = vec![0u8; 10 + padding];
        s.read_exact(&mut reply).unwrap();
        assert_eq!(u64::from_be_bytes(reply[0..8].try_into().unwrap()), MIB);
        assert_eq!(u16::from_be_bytes([reply[8], reply[9]]), TRANSMISSION_FLAGS);
        assert!(reply[10..].iter().all(|&b| b == 0), "the padding is zeroes");
        // Exactly that much: the next bytes are the reply to a read.
        let mut c = Nbd::transmission(s, MIB, TRANSMISSION_FLAGS);
        assert_eq!(c.read(0, 4), Ok(vec![0; 4]));
        c.disconnect();
    }
    still_serves(&mut server);
}

#[test]
fn abort_is_acknowledged_then_closed() {
    let mut server = Server::start(MIB);
    let mut s = greet(&server.sock);
    send_option(&mut s, OPT_ABORT, &[]);
    assert_eq!(option_reply(&mut s), (OPT_ABORT, REP_ACK, vec![]));
    expect_closed(&mut s);
    still_serves(&mut server);
}

/// Plain newstyle (no FIXED_NEWSTYLE flag), as nbd-server, nbdkit and
/// qemu-nbd serve it: EXPORT_NAME, then I/O.
#[test]
fn client_without_fixed_newstyle_is_served_through_export_name() {
    let mut server = Server::start(MIB);
    for (flags, padding) in [(0, 124), (FLAG_NO_ZEROES, 0)] {
        let mut s = greet_with(&server.sock, flags);
        send_option(&mut s, OPT_EXPORT_NAME, b"");
        let mut reply = vec![0u8; 10 + padding];
        s.read_exact(&mut reply).unwrap();
        assert_eq!(u64::from_be_bytes(reply[0..8].try_into().unwrap()), MIB);
        let mut c = Nbd::transmission(s, MIB, TRANSMISSION_FLAGS);
        assert_eq!(c.write(512, b"plain"), 0);
        assert_eq!(c.read(512, 5), Ok(b"plain".to_vec()));
        c.disconnect();
    }
    still_serves(&mut server);
}

#[test]
fn bad_client_flags_close_the_connection() {
    let mut server = Server::start(MIB);
    // GO from a plain newstyle client (which reads no option replies), and
    // an unknown flag.
    for flags in [0, FLAG_FIXED_NEWSTYLE | 1 << 7] {
        let mut s = greet_with(&server.sock, flags);
        // The server may have closed already: this write may fail.
        let _ = s.write_all(&[option_head(OPT_GO, 6), vec![0; 6]].concat());
        expect_closed(&mut s);
    }
    still_serves(&mut server);
}

#[test]
fn bad_option_magic_closes_the_connection() {
    let mut server = Server::start(MIB);
    let mut s = greet(&server.sock);
    let mut m = b"IHAVEOPX".to_vec();
    m.extend(OPT_GO.to_be_bytes());
    m.extend(6u32.to_be_bytes());
    m.extend([0; 6]);
    s.write_all(&m).unwrap();
    expect_closed(&mut s);
    still_serves(&mut server);
}

/// EXPORT_NAME has no option replies: a client reads whatever follows as
/// the export size, so an over-long name gets a close and nothing else.
#[test]
fn over_long_export_name_is_closed_without_a_reply() {
    let mut server = Server::start(MIB);
    for flags in [FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, FLAG_NO_ZEROES] {
        let mut s = greet_with(&server.sock, flags);
        s.write_all(&option_head(OPT_EXPORT_NAME, 16 << 20)).unwrap();
        expect_closed(&mut s);
    }
    still_serves(&mut server);
}

/// Other options are read past and refused, and haggling goes on.
#[test]
fn over_long_go_is_refused_and_a_valid_go_still_works() {
    let mut server = Server::start(MIB);
    let mut s = greet(&server.sock);
    send_option(&mut s, OPT_GO, &vec![0xa5; 1 << 20]);
    assert_eq!(option_reply(&mut s), (OPT_GO, REP_ERR_TOO_BIG, vec![]));
    send_option(&mut s, OPT_LIST, &[]);
    assert_eq!(option_reply(&mut s).1, REP_SERVER);
    assert_eq!(option_reply(&mut s).1, REP_ACK);
    let mut c = Nbd::go(s);
    assert_eq!(c.write(0, b"in sync"), 0);
    assert_eq!(c.read(0, 7), Ok(b"in sync".to_vec()));
    c.disconnect();
    still_serves(&mut server);
}

/// How long after connecting a stuck client may hold the server: the 10 s
/// negotiation deadline, and some slack for a loaded machine.
const CUT_OFF: Duration = Duration::from_secs(13);

/// Connects while another client holds the server; returns how long after
/// `since` the greeting came.
fn queued_greeting(sock: &Path, since: Instant) -> Duration {
    let mut s = UnixStream::connect(sock).expect("connecting");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("a greeting once the first client is cut off");
    assert_eq!(&hello[0..8], NBDMAGIC);
    since.elapsed()
}

/// The 10 s are for the whole negotiation, not for each read: a client
/// sending one byte every 1.5 s is cut off, and the next one is greeted.
#[test]
fn trickling_client_is_cut_off_and_the_next_is_greeted() {
    let mut server = Server::start(MIB);
    let start = Instant::now();
    let mut slow = greet(&server.sock);
    let trickle = thread::spawn(move || {
        let m = option_head(OPT_GO, 16000);
        slow.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
        // Each wait for an answer is the pause between bytes.
        for b in m.into_iter().chain(std::iter::repeat(0)) {
            if start.elapsed() > CUT_OFF + Duration::from_secs(2) || slow.write_all(&[b]).is_err() {
                break;
            }
            match slow.read(&mut [0u8; 64]) {
                Ok(0) => break,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                other => panic!("expected silence, then a close: {other:?}"),
            }
        }
        start.elapsed()
    });
    thread::sleep(Duration::from_millis(500));
    let greeted = queued_greeting(&server.sock, start);
    let cut = trickle.join().unwrap();
    assert!(cut < CUT_OFF, "the trickling client held the server for {cut:?}");
    assert!(greeted < CUT_OFF, "the next client was greeted after {greeted:?}");
    still_serves(&mut server);
}

/// Replies that are never read fill the socket: the server's writes are
/// bounded by the same deadline.
#[test]
fn client_that_never_reads_is_cut_off_and_the_next_is_greeted() {
    let mut server = Server::start(MIB);
    let start = Instant::now();
    let mut deaf = greet(&server.sock);
    let m = option_head(OPT_LIST, 0).repeat(20_000);
    deaf.set_write_timeout(Some(CUT_OFF + Duration::from_secs(2))).unwrap();
    // Blocks once both sides' buffers are full, and fails once the server
    // closes; the socket stays open a while longer, so only the server can
    // end the connection.
    thread::spawn(move || {
        let _ = deaf.write_all(&m);
        thread::sleep(CUT_OFF);
    });
    thread::sleep(Duration::from_millis(500));
    let greeted = queued_greeting(&server.sock, start);
    assert!(greeted < CUT_OFF, "the next client was greeted after {greeted:?}");
    still_serves(&mut server);
}

#[test]
fn client_leaving_mid_handshake_does_not_stop_the_server() {
    let mut server = Server::start(MIB);
    drop(greet(&server.sock));
    let mut s = greet(&server.sock);
    s.write_all(&IHAVEOPT[..5]).unwrap();
    drop(s);
    still_serves(&mut server);
}
