//! The loop against a model, over a real socket, with input cut anywhere.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;

use super::*;
use crate::nbd::poll::{Poll, SPIN};
use crate::nbd::proto::REQUEST_LEN;
use std::time::Duration;
use crate::store::{Backing, HostBacking, HostStore};

const SIZE: u64 = 8 << 20;
/// Payload sizes on both sides of 16 KiB (`DIRECT_WRITE` in input.rs), and
/// one of its buffer's length (256 KiB).
const LENS: [u32; 7] = [4096, 12288, 16384, 20480, 65536, 131072, 262144];

/// A tiny xorshift: the same stream on every run, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Writes of many sizes with reads among them, the stream sent in pieces
/// that end inside half the headers: every reply is a success and every
/// read returns what the model says the writes before it left. Payloads
/// are read by sleeping, by polling for the default time, and by polling
/// only.
#[test]
fn mixed_requests_cut_anywhere_match_the_model() {
    let spins = [Duration::ZERO, SPIN, Duration::from_secs(1)];
    for (seed, spin) in [1u64, 0x5eed, 0xdead_beef].into_iter().zip(spins) {
        let mut rng = Rng(seed);
        let mut model = vec![0u8; SIZE as usize];
        let mut wire = Vec::new();
        let mut cuts = Vec::new(); // where the sender pauses: inside many headers
        let mut expect: Vec<Option<Vec<u8>>> = Vec::new(); // per cookie: read data
        for cookie in 0..600u64 {
            let len = LENS[rng.below(LENS.len() as u64) as usize];
            let offset = rng.below((SIZE - u64::from(len)) / 4096) * 4096;
            let read = rng.below(3) == 0;
            let command = if read { sys::NBD_CMD_READ } else { sys::NBD_CMD_WRITE };
            let req = Request { flags: 0, command, cookie: cookie.to_be_bytes(), offset, len };
            if rng.below(2) == 0 {
                cuts.push(wire.len() + 1 + rng.below(REQUEST_LEN as u64 - 1) as usize);
            }
            wire.extend(req.encode());
            let range = offset as usize..(offset + u64::from(len)) as usize;
            if read {
                expect.push(Some(model[range].to_vec()));
            } else {
                let fill = (rng.next() as u8) | 1;
                let data: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i as u8)).collect();
                wire.extend(&data);
                model[range].copy_from_slice(&data);
                expect.push(None);
            }
        }
        wire.extend(Request { flags: 0, command: sys::NBD_CMD_DISC, cookie: [0; 8], offset: 0, len: 0 }.encode());

        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let mut sender = theirs.try_clone().unwrap();
        cuts.push(wire.len());
        // A pause at each cut lets the server read up to it, and find half
        // a header at the end of its input.
        let send = thread::spawn(move || {
            let mut at = 0;
            for cut in cuts {
                sender.write_all(&wire[at..cut]).unwrap();
                at = cut;
                thread::sleep(std::time::Duration::from_micros(20));
            }
        });
        let receive = thread::spawn(move || {
            let mut theirs = theirs;
            for (cookie, want) in expect.iter().enumerate() {
                let mut head = [0u8; REPLY_LEN];
                theirs.read_exact(&mut head).unwrap();
                assert_eq!(&head[4..8], &[0; 4], "request {cookie} failed");
                assert_eq!(&head[8..16], &(cookie as u64).to_be_bytes(), "replies come in order here");
                if let Some(want) = want {
                    let mut got = vec![0u8; want.len()];
                    theirs.read_exact(&mut got).unwrap();
                    assert!(&got == want, "read {cookie} differs from the model");
                }
            }
        });
        // A wrong read ends the receiver: the server must then fail, not hang.
        ours.set_write_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let backing = HostBacking::new(SIZE).unwrap();
        let mut store = backing.open().unwrap();
        let mut bufs = Buffers::new(&mut store, &crate::tuning::Tuning::default()).unwrap();
        bufs.input.poll = Poll::new(spin);
        let stats = Stats::default();
        let end = run(&mut store, &mut bufs, &Shared::new(Export::new(SIZE), 1), &stats, &mut ours).unwrap();
        assert_eq!(end, End::Disconnect);
        send.join().unwrap();
        receive.join().unwrap();
        assert_eq!(stats.requests.load(std::sync::atomic::Ordering::Relaxed), 600);
    }
}

/// Reads of a store in memory are sent from the store itself when the
/// batch is answered: a write or trim of the same bytes later in the same
/// batch must not reach them first.
#[test]
fn a_read_gets_the_bytes_before_a_later_change_in_its_batch() {
    let req = |command, cookie: u8, len| Request { flags: 0, command, cookie: [cookie; 8], offset: 4096, len };
    let mut wire = Vec::new();
    for (cookie, fill) in [(0u8, 0x11u8), (2, 0x22)] {
        wire.extend(req(sys::NBD_CMD_WRITE, cookie, 4096).encode());
        wire.extend([fill; 4096]);
        wire.extend(req(sys::NBD_CMD_READ, cookie + 1, 8192).encode());
    }
    wire.extend(req(sys::NBD_CMD_TRIM, 4, 4096).encode());
    wire.extend(req(sys::NBD_CMD_READ, 5, 8192).encode());
    wire.extend(req(sys::NBD_CMD_DISC, 6, 0).encode());
    let (mut ours, mut theirs) = UnixStream::pair().unwrap();
    theirs.write_all(&wire).unwrap(); // all queued: one batch, if nothing splits it

    let backing = HostBacking::new(SIZE).unwrap();
    let mut store = backing.open().unwrap();
    let mut bufs = Buffers::new(&mut store, &crate::tuning::Tuning::default()).unwrap();
    let end = run(&mut store, &mut bufs, &Shared::new(Export::new(SIZE), 1), &Stats::default(), &mut ours).unwrap();
    assert_eq!(end, End::Disconnect);
    let mut expect = |cookie: u8, data: Option<u8>| {
        let mut head = [0u8; REPLY_LEN];
        theirs.read_exact(&mut head).unwrap();
        assert_eq!((&head[4..8], &head[8..16]), (&[0u8; 4][..], &[cookie; 8][..]));
        if let Some(fill) = data {
            let mut got = vec![0u8; 8192];
            theirs.read_exact(&mut got).unwrap();
            let (written, after) = got.split_at(4096);
            assert!(written.iter().all(|&b| b == fill), "read {cookie}: not the data written before it");
            assert!(after.iter().all(|&b| b == 0), "read {cookie}: bytes nobody wrote");
        }
    };
    for (cookie, data) in [(0, None), (1, Some(0x11)), (2, None), (3, Some(0x22)), (4, None), (5, Some(0))] {
        expect(cookie, data);
    }
}

/// With less staging than NBD allows (a sliced swap tier), a longer read
/// or write is refused with EINVAL, its payload skipped, and the
/// connection goes on: the store never sees it, and nothing panics.
#[test]
fn a_request_longer_than_staging_is_refused_and_the_connection_goes_on() {
    const STAGING: usize = 64 * 1024;
    let req = |command, cookie: u8, len| Request { flags: 0, command, cookie: [cookie; 8], offset: 0, len };
    let mut wire = Vec::new();
    wire.extend(req(sys::NBD_CMD_WRITE, 1, STAGING as u32 + 4096).encode());
    wire.extend(vec![0x33u8; STAGING + 4096]);
    wire.extend(req(sys::NBD_CMD_READ, 2, STAGING as u32 + 4096).encode());
    wire.extend(req(sys::NBD_CMD_WRITE, 3, STAGING as u32).encode());
    wire.extend(vec![0x44u8; STAGING]);
    wire.extend(req(sys::NBD_CMD_READ, 4, 4096).encode());
    wire.extend(req(sys::NBD_CMD_DISC, 5, 0).encode());
    let (mut ours, mut theirs) = UnixStream::pair().unwrap();
    let writer = thread::spawn(move || {
        theirs.write_all(&wire).unwrap();
        theirs
    });
    // Staging through a store that does not lend, as a GPU store's.
    let backing = HostBacking::new(SIZE).unwrap();
    let mut store = Failing { inner: backing.open().unwrap(), fail: false };
    let mut bufs = Buffers::with_staging(&mut store, &crate::tuning::Tuning::default(), STAGING).unwrap();
    let end = run(&mut store, &mut bufs, &Shared::new(Export::new(SIZE), 1), &Stats::default(), &mut ours).unwrap();
    assert_eq!(end, End::Disconnect);
    let mut theirs = writer.join().unwrap();
    for (cookie, error, data) in [(1u8, EINVAL, 0), (2, EINVAL, 0), (3, 0, 0), (4, 0, 4096)] {
        let mut head = [0u8; REPLY_LEN];
        theirs.read_exact(&mut head).unwrap();
        assert_eq!(u32::from_be_bytes(head[4..8].try_into().unwrap()), error, "request {cookie}");
        assert_eq!(head[8..16], [cookie; 8]);
        let mut got = vec![0u8; data];
        theirs.read_exact(&mut got).unwrap();
        assert!(got.iter().all(|&b| b == 0x44), "request {cookie}: the write that fit is what reads back");
    }
}

/// Every thread that serves finds the stack its requests use in RAM: the
/// loop touches it before the first request, whichever thread runs it.
/// Thread stacks of an odd size no other test asks for, so that glibc
/// cannot hand this one a stack another thread touched.
#[test]
fn the_loop_serves_on_a_stack_already_in_ram() {
    use crate::touch::{resident, STACK};
    let serve = |served: bool| {
        thread::Builder::new()
            .stack_size(20 * STACK + 12288)
            .spawn(move || {
                let here = 0u8;
                let top = std::hint::black_box(&here) as *const u8 as usize;
                if served {
                    let (mut ours, theirs) = UnixStream::pair().unwrap();
                    drop(theirs); // the client is gone before its first request
                    let backing = HostBacking::new(SIZE).unwrap();
                    let mut store = backing.open().unwrap();
                    let mut bufs = Buffers::new(&mut store, &crate::tuning::Tuning::default()).unwrap();
                    let _ = run(&mut store, &mut bufs, &Shared::new(Export::new(SIZE), 1), &Stats::default(), &mut ours);
                }
                // Well below what the frames down to the loop's use.
                resident((top - STACK + 32768) as *const u8, STACK - 65536)
            })
            .unwrap()
            .join()
            .unwrap()
    };
    assert!(!serve(false), "a fresh stack counted as touched: this test proves nothing");
    assert!(serve(true), "the loop served on a stack not yet in RAM");
}

/// A connection's store that fails every sync once told to, as a device
/// that failed after taking work; its neighbour's store still works (the
/// failure is not sticky, as a missed mailbox deadline is not).
struct Failing<'a> {
    inner: HostStore<'a>,
    fail: bool,
}

impl Store for Failing<'_> {
    type Buf = Box<[u8]>;

    fn staging(&mut self, len: usize) -> io::Result<Box<[u8]>> {
        self.inner.staging(len)
    }
    unsafe fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<Done> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.inner.read(offset, buf) }
    }
    unsafe fn write(&mut self, offset: u64, buf: &[u8]) -> io::Result<Done> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.inner.write(offset, buf) }
    }
    fn zero(&mut self, offset: u64, len: u64) -> io::Result<Done> {
        self.inner.zero(offset, len)
    }
    fn bytes(&self, offset: u64, len: usize) -> Option<&[u8]> {
        self.inner.bytes(offset, len)
    }
    fn sync(&mut self) -> io::Result<()> {
        match self.fail {
            true => Err(io::Error::from_raw_os_error(libc::EIO)),
            false => Ok(()),
        }
    }
}

/// A store lost on one connection is lost on all: the other connection's
/// requests answer EIO from then on, though its own store still works.
#[test]
fn a_store_lost_on_one_connection_answers_eio_on_every_one() {
    let backing = HostBacking::new(SIZE).unwrap();
    let shared = Shared::new(Export::new(SIZE), 2);
    let request = |command, cookie: u8, len| Request { flags: 0, command, cookie: [cookie; 8], offset: 0, len }.encode();
    let error = |s: &mut UnixStream| {
        let mut head = [0u8; REPLY_LEN];
        s.read_exact(&mut head).unwrap();
        u32::from_be_bytes(head[4..8].try_into().unwrap())
    };
    thread::scope(|scope| {
        let mut clients = Vec::new();
        for fail in [true, false] {
            let (mut ours, theirs) = UnixStream::pair().unwrap();
            theirs.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            clients.push(theirs);
            let (backing, shared) = (&backing, &shared);
            scope.spawn(move || {
                let mut store = Failing { inner: backing.open().unwrap(), fail };
                let mut bufs = Buffers::new(&mut store, &crate::tuning::Tuning::default()).unwrap();
                run(&mut store, &mut bufs, shared, &Stats::default(), &mut ours).unwrap()
            });
        }
        let [a, b] = &mut clients[..] else { unreachable!() };
        b.write_all(&request(sys::NBD_CMD_READ, 1, 4096)).unwrap();
        assert_eq!(error(b), 0, "a read before the failure");
        b.read_exact(&mut [0u8; 4096]).unwrap();
        a.write_all(&request(sys::NBD_CMD_FLUSH, 2, 0)).unwrap();
        assert_eq!(error(a), EIO, "the flush whose sync fails");
        b.write_all(&request(sys::NBD_CMD_READ, 3, 4096)).unwrap();
        assert_eq!(error(b), EIO, "a read on the other connection after the failure");
        b.write_all(&request(sys::NBD_CMD_WRITE, 4, 4096)).unwrap();
        b.write_all(&[1; 4096]).unwrap();
        assert_eq!(error(b), EIO, "a write on the other connection after the failure");
        for s in [a, b] {
            s.write_all(&request(sys::NBD_CMD_DISC, 5, 0)).unwrap();
        }
    });
}

/// A store whose queued reads finish, while another connection loses the
/// store during the wait (its `lose`).
struct LostDuringWait<'a> {
    inner: HostStore<'a>,
    shared: &'a Shared,
}

impl Store for LostDuringWait<'_> {
    type Buf = Box<[u8]>;
    fn staging(&mut self, len: usize) -> io::Result<Box<[u8]>> {
        self.inner.staging(len)
    }
    unsafe fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<Done> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.inner.read(offset, buf) }?;
        Ok(Done::Queued)
    }
    unsafe fn write(&mut self, offset: u64, buf: &[u8]) -> io::Result<Done> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.inner.write(offset, buf) }
    }
    fn zero(&mut self, offset: u64, len: u64) -> io::Result<Done> {
        self.inner.zero(offset, len)
    }
    fn wait(&mut self, _token: usize) -> io::Result<()> {
        self.shared.lost.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A lone read's success header goes out before its copy is done; if the
/// store is lost meanwhile on another connection, its data, copied, still
/// follows: the stream stays in frame, and what comes after is EIO.
#[test]
fn a_store_lost_after_an_early_header_still_sends_the_data() {
    let backing = HostBacking::new(SIZE).unwrap();
    let shared = Shared::new(Export::new(SIZE), 2);
    let (mut ours, mut theirs) = UnixStream::pair().unwrap();
    theirs.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let read = Request { flags: 0, command: sys::NBD_CMD_READ, cookie: [1; 8], offset: 0, len: 4096 };
    theirs.write_all(&read.encode()).unwrap();
    let error = |s: &mut UnixStream, cookie: u8| {
        let mut head = [0u8; REPLY_LEN];
        s.read_exact(&mut head).unwrap();
        assert_eq!(head[8..16], [cookie; 8], "replies in order");
        u32::from_be_bytes(head[4..8].try_into().unwrap())
    };
    thread::scope(|scope| {
        let (backing, shared) = (&backing, &shared);
        let server = scope.spawn(move || {
            let mut store = LostDuringWait { inner: backing.open().unwrap(), shared };
            let mut bufs = Buffers::new(&mut store, &crate::tuning::Tuning::default()).unwrap();
            run(&mut store, &mut bufs, shared, &Stats::default(), &mut ours)
        });
        assert_eq!(error(&mut theirs, 1), 0, "the header went out early");
        let mut data = [1u8; 4096];
        if let Err(e) = theirs.read_exact(&mut data) {
            let _ = theirs.shutdown(std::net::Shutdown::Both); // so that the server ends
            panic!("the read's data did not follow its header: {e}");
        }
        assert!(data.iter().all(|&b| b == 0), "the read's data, as copied");
        let flush = Request { flags: 0, command: sys::NBD_CMD_FLUSH, cookie: [2; 8], offset: 0, len: 0 };
        theirs.write_all(&flush.encode()).unwrap();
        assert_eq!(error(&mut theirs, 2), EIO, "the next request, once the store is lost");
        let disc = Request { flags: 0, command: sys::NBD_CMD_DISC, cookie: [3; 8], offset: 0, len: 0 };
        theirs.write_all(&disc.encode()).unwrap();
        let _ = theirs.shutdown(std::net::Shutdown::Write);
        server.join().unwrap().unwrap();
    });
}

/// With a receive and send timeout on the socket (as `serve` sets one), a
/// client idle between requests for longer is waited for; one that stops
/// in the middle of a request, or leaves its replies untaken, ends its
/// connection at the timeout, so that its thread can serve another.
#[test]
fn a_client_may_idle_between_requests_but_not_stop_within_one() {
    const LIMIT: Duration = Duration::from_millis(100);
    let write = |cookie: u8, len: u32| Request { flags: 0, command: sys::NBD_CMD_WRITE, cookie: [cookie; 8], offset: 0, len }.encode();
    let read = |cookie: u8| Request { flags: 0, command: sys::NBD_CMD_READ, cookie: [cookie; 8], offset: 0, len: 1 << 20 }.encode();
    // What the client sends after idling for longer than the limit and
    // having its first write answered: it then stops within a header,
    // within a payload, or sends reads whose replies it never takes.
    let stops: [Vec<u8>; 3] = [write(2, 4096)[..10].to_vec(), [&write(2, 65536)[..], &[7u8; 1000]].concat(), (0..16).flat_map(read).collect()];
    for stop in stops {
        let (mut ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(LIMIT)).unwrap();
        ours.set_write_timeout(Some(LIMIT)).unwrap();
        let client = thread::spawn(move || {
            thread::sleep(LIMIT * 4);
            theirs.write_all(&[&write(1, 4096)[..], &[1u8; 4096]].concat()).unwrap();
            let mut head = [0u8; REPLY_LEN];
            theirs.read_exact(&mut head).unwrap();
            assert_eq!((&head[4..8], &head[8..16]), (&[0u8; 4][..], &[1u8; 8][..]), "the write after the idle time");
            theirs.write_all(&stop).unwrap();
            thread::sleep(LIMIT * 20);
        });
        let backing = HostBacking::new(SIZE).unwrap();
        let mut store = backing.open().unwrap();
        let mut bufs = Buffers::new(&mut store, &crate::tuning::Tuning::default()).unwrap();
        let started = std::time::Instant::now();
        let ended = run(&mut store, &mut bufs, &Shared::new(Export::new(SIZE), 1), &Stats::default(), &mut ours);
        let e = ended.expect_err("a client that stopped within a request kept its connection");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
        assert!(started.elapsed() < LIMIT * 15, "ended only when the client left: {:?}", started.elapsed());
        drop(ours); // a client still waiting for its first reply must not wait for ever
        client.join().expect("the client's first write was not answered");
    }
}
