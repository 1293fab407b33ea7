//! Drives one access pattern over a negotiated connection the way the
//! kernel's NBD driver does: up to `depth` requests in flight on one
//! socket, each timed from send to reply.
//!
//! Single-threaded, over a non-blocking socket and poll(2): requests are
//! written as far as the socket takes them and replies are read whenever
//! they come, so we never sit blocked writing while the server sits
//! blocked writing replies to us. Every buffer is allocated once, in
//! `Bufs::new`; the loop itself allocates nothing.
//!
//! Data is checked cheaply: every 4 KiB block written starts with a stamp
//! derived from its block number, and every block read must start with
//! the stamp of the block it was read from.

use std::io::{self, IoSlice, Read, Write};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use crate::uapi as sys;
use crate::nbd::proto::{Request, REPLY_LEN, REQUEST_LEN};

/// The unit of placement and of data checks.
pub const BLOCK: u64 = 4096;
/// Stamp of block 0; block `n` carries `STAMP ^ n` ("nbd-vram" in ASCII).
const STAMP: u64 = 0x6e62_642d_7672_616d;
/// The structured reply magic: a server sending it broke the negotiation.
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Socket reads land here; payload is checked and dropped as it arrives.
const INPUT_LEN: usize = 256 * 1024;
/// A server silent this long with requests outstanding is wedged.
const STALL: Duration = Duration::from_secs(30);

/// One pattern: what to send, how big, how many at once, where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    pub write: bool,
    pub len: u32,
    pub depth: usize,
    /// Random 4 KiB-aligned offsets in the region; otherwise sequential
    /// from its start, wrapping.
    pub random: bool,
    pub seed: u64,
}

/// When to stop issuing.
#[derive(Clone, Copy, Debug)]
pub enum Stop {
    /// After this many requests (all counted).
    Count(u64),
    /// Run `warmup` unmeasured, then count what completes in `measure`.
    Timed { warmup: Duration, measure: Duration },
}

/// What one run measured. Latency samples are left in `Bufs::samples`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally {
    pub ios: u64,
    pub bytes: u64,
    pub secs: f64,
}

#[derive(Clone, Copy)]
struct Slot {
    busy: bool,
    offset: u64,
    sent: Instant,
    header: [u8; REQUEST_LEN],
}

/// Everything a run needs, allocated once for the largest pattern.
pub struct Bufs {
    /// `depth` write payloads of `len` bytes, one per tag.
    wdata: Box<[u8]>,
    input: Box<[u8]>,
    slots: Box<[Slot]>,
    free: Vec<usize>,
    done: Vec<usize>,
    /// Latencies in nanoseconds: a uniform sample once capacity is reached.
    pub samples: Vec<u64>,
}

impl Bufs {
    /// Room for `depth` requests in flight, `payload` bytes of write data
    /// in all, and `samples` latencies per run.
    pub fn new(depth: usize, payload: usize, samples: usize) -> Bufs {
        // Not zeroes (a server may treat those specially), not one byte.
        let wdata = (0..payload).map(|i| (i.wrapping_mul(131) >> 3) as u8 | 1).collect();
        let now = Instant::now();
        let slot = Slot { busy: false, offset: 0, sent: now, header: [0; REQUEST_LEN] };
        Bufs {
            wdata,
            input: vec![0u8; INPUT_LEN].into_boxed_slice(),
            slots: vec![slot; depth].into_boxed_slice(),
            free: Vec::with_capacity(depth),
            done: Vec::with_capacity(depth),
            samples: Vec::with_capacity(samples),
        }
    }
}

/// xorshift64*: a fixed seed gives the same offsets every run.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(if seed == 0 { STAMP } else { seed })
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (multiply-shift; `n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

pub fn stamp_of(block: u64) -> u64 {
    STAMP ^ block
}

/// Stamps each 4 KiB block of a write payload bound for `offset`.
pub fn stamp(buf: &mut [u8], offset: u64) {
    for (i, block) in buf.chunks_exact_mut(BLOCK as usize).enumerate() {
        block[..8].copy_from_slice(&stamp_of(offset / BLOCK + i as u64).to_le_bytes());
    }
}

/// The request header for `tag`: the cookie is the tag.
pub fn request(write: bool, tag: usize, offset: u64, len: u32) -> [u8; REQUEST_LEN] {
    let command = if write { sys::NBD_CMD_WRITE } else { sys::NBD_CMD_READ };
    Request { flags: 0, command, cookie: (tag as u64).to_be_bytes(), offset, len }.encode()
}

/// Runs `spec` over `conn`, a non-blocking socket in the transmission
/// phase, against the bytes `region` of the export (4 KiB-aligned, its
/// length a multiple of `spec.len`). The error says what went wrong,
/// without context.
pub fn drive<T: Read + Write + AsFd>(
    conn: &mut T,
    region: Range<u64>,
    spec: &Spec,
    stop: Stop,
    b: &mut Bufs,
) -> Result<Tally, String> {
    let len = spec.len as usize;
    let (base, region) = (region.start, region.end.saturating_sub(region.start));
    if spec.depth == 0
        || spec.depth > b.slots.len()
        || spec.depth * len > b.wdata.len()
        || region < u64::from(spec.len)
        || base % BLOCK != 0
    {
        return Err(format!("bench buffers do not fit {spec:?} over {region} bytes at {base}"));
    }
    let start = Instant::now();
    let (t0, t_end, limit) = match stop {
        Stop::Count(n) => (start, None, Some(n)),
        Stop::Timed { warmup, measure } => (start + warmup, Some(start + warmup + measure), None),
    };
    let mut rng = XorShift::new(spec.seed);
    let mut keep = XorShift::new(spec.seed.rotate_left(32) ^ 1);
    let blocks = region / BLOCK;
    let mut seq = 0u64;

    b.free.clear();
    b.free.extend((0..spec.depth).rev());
    b.samples.clear();
    // A run that failed mid-parse leaves its finished tags here.
    b.done.clear();
    for slot in b.slots.iter_mut() {
        slot.busy = false;
    }
    let mut tally = Tally::default();
    let mut seen = 0u64; // latencies offered to the sample
    let (mut issued, mut inflight, mut issuing) = (0u64, 0usize, true);
    // The request being written, and how many of its bytes have gone.
    let mut out: Option<(usize, usize)> = None;
    let mut rx = Rx::default();
    let (mut readable, mut writable) = (false, true);
    let mut last_end = start;

    loop {
        if issuing {
            issuing = match (limit, t_end) {
                (Some(n), _) => issued < n,
                (_, Some(end)) => Instant::now() < end,
                _ => false,
            };
        }
        if !issuing && inflight == 0 {
            break;
        }
        let mut progress = false;

        while writable {
            let (tag, pos) = match out {
                Some(o) => o,
                None if issuing && (limit.is_none() || limit > Some(issued)) => {
                    let Some(tag) = b.free.pop() else { break };
                    let offset = base
                        + if spec.random {
                            rng.below(blocks) * BLOCK
                        } else {
                            let o = seq;
                            seq = (seq + u64::from(spec.len)) % region;
                            o
                        };
                    if spec.write {
                        stamp(&mut b.wdata[tag * len..][..len], offset);
                    }
                    let slot = &mut b.slots[tag];
                    slot.busy = true;
                    slot.offset = offset;
                    slot.header = request(spec.write, tag, offset, spec.len);
                    slot.sent = Instant::now();
                    issued += 1;
                    inflight += 1;
                    (tag, 0)
                }
                None => break,
            };
            let header = &b.slots[tag].header;
            let data: &[u8] = if spec.write { &b.wdata[tag * len..][..len] } else { &[] };
            let iov = if pos < REQUEST_LEN {
                [IoSlice::new(&header[pos..]), IoSlice::new(data)]
            } else {
                [IoSlice::new(&data[pos - REQUEST_LEN..]), IoSlice::new(&[])]
            };
            out = Some((tag, pos));
            match conn.write_vectored(&iov) {
                Ok(0) => return Err("the server closed the connection".into()),
                Ok(n) => {
                    progress = true;
                    out = if pos + n == REQUEST_LEN + data.len() { None } else { Some((tag, pos + n)) };
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("sending a request: {}", gone(e))),
            }
        }

        if readable {
            let space = &mut b.input[rx.end..];
            match conn.read(space) {
                Ok(0) => return Err("the server closed the connection".into()),
                Ok(n) => {
                    // A short read most likely emptied the socket: poll next.
                    readable = n == space.len();
                    rx.end += n;
                    progress = true;
                    let now = Instant::now();
                    rx.parse(&mut b.input, &mut b.slots, spec, &mut b.done)?;
                    for &tag in &b.done {
                        b.slots[tag].busy = false;
                        b.free.push(tag);
                        inflight -= 1;
                        if now < t0 || t_end.is_some_and(|end| now >= end) {
                            continue;
                        }
                        tally.ios += 1;
                        tally.bytes += u64::from(spec.len);
                        last_end = now;
                        let ns = u64::try_from((now - b.slots[tag].sent).as_nanos()).unwrap_or(u64::MAX);
                        seen += 1;
                        if b.samples.len() < b.samples.capacity() {
                            b.samples.push(ns);
                        } else if let Some(s) = b.samples.get_mut(keep.below(seen) as usize) {
                            *s = ns;
                        }
                    }
                    b.done.clear();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("reading replies: {}", gone(e))),
            }
        }

        if !progress {
            let mut events = 0;
            if inflight > 0 {
                events |= libc::POLLIN;
            }
            if out.is_some() && !writable {
                events |= libc::POLLOUT;
            }
            if events == 0 {
                return Err("bench stalled with nothing to wait for".into());
            }
            let revents = wait(conn.as_fd(), events, STALL)?;
            if revents & libc::POLLNVAL != 0 {
                return Err("the socket closed under us".into());
            }
            readable |= revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0;
            writable |= revents & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0;
        }
    }
    tally.secs = match t_end {
        Some(end) => (end - t0).as_secs_f64(),
        None => (last_end - start).as_secs_f64(),
    };
    Ok(tally)
}

/// Waits for `events` on `fd`; returns the events that came.
fn wait(fd: BorrowedFd, events: libc::c_short, limit: Duration) -> Result<libc::c_short, String> {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 };
    let ms = libc::c_int::try_from(limit.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: `p` is one valid, initialised pollfd that outlives the
        // call, and the count passed says exactly one; `fd` is borrowed, so
        // it stays open for the call.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        match n {
            0 => return Err(format!("the server did not answer for {} s", limit.as_secs())),
            n if n > 0 => return Ok(p.revents),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(format!("poll: {e}"));
                }
            }
        }
    }
}

fn gone(e: io::Error) -> String {
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => "the server closed the connection".into(),
        _ => e.to_string(),
    }
}

/// Reply parsing state: unparsed input is `input[start..end]`; `cur` is
/// the read whose payload is arriving, and how much of it has.
#[derive(Default)]
struct Rx {
    start: usize,
    end: usize,
    cur: Option<(usize, usize)>,
}

impl Rx {
    /// Consumes every whole reply header and whatever read payload has
    /// arrived, checking magic, cookie, error and stamps; pushes the tags
    /// of finished requests to `done`. Leaves a partial header (or stamp)
    /// at the front of `input`.
    fn parse(
        &mut self,
        input: &mut [u8],
        slots: &mut [Slot],
        spec: &Spec,
        done: &mut Vec<usize>,
    ) -> Result<(), String> {
        let len = spec.len as usize;
        loop {
            let avail = self.end - self.start;
            match self.cur {
                None => {
                    if avail < REPLY_LEN {
                        break;
                    }
                    let h = &input[self.start..self.start + REPLY_LEN];
                    let magic = be32(&h[0..4]);
                    if magic != sys::NBD_REPLY_MAGIC {
                        return Err(if magic == STRUCTURED_REPLY_MAGIC {
                            "the server sent a structured reply, which was never negotiated".into()
                        } else {
                            format!("bad reply magic {magic:#010x}: the stream lost its framing")
                        });
                    }
                    let error = be32(&h[4..8]);
                    let mut cookie = [0u8; 8];
                    cookie.copy_from_slice(&h[8..16]);
                    let cookie = u64::from_be_bytes(cookie);
                    let tag = usize::try_from(cookie)
                        .ok()
                        .filter(|&t| t < slots.len() && slots[t].busy && !done.contains(&t))
                        .ok_or_else(|| format!("reply with cookie {cookie:#x} matches no request in flight"))?;
                    if error != 0 {
                        let what = if spec.write { "write" } else { "read" };
                        let at = slots[tag].offset;
                        return Err(format!(
                            "the server answered {} to a {len}-byte {what} at offset {at}",
                            errno(error)
                        ));
                    }
                    self.start += REPLY_LEN;
                    if spec.write {
                        done.push(tag);
                    } else {
                        self.cur = Some((tag, 0));
                    }
                }
                Some((tag, pos)) => {
                    if avail == 0 {
                        break;
                    }
                    let in_block = pos % BLOCK as usize;
                    if in_block == 0 {
                        if avail < 8 {
                            break;
                        }
                        let mut got = [0u8; 8];
                        got.copy_from_slice(&input[self.start..self.start + 8]);
                        let got = u64::from_le_bytes(got);
                        let block = (slots[tag].offset + pos as u64) / BLOCK;
                        if got != stamp_of(block) {
                            return Err(format!(
                                "data mismatch: block {block} (offset {}) starts {got:#018x}, not the {:#018x} written there",
                                block * BLOCK,
                                stamp_of(block)
                            ));
                        }
                    }
                    let n = avail.min(len - pos).min(BLOCK as usize - in_block);
                    self.start += n;
                    if pos + n == len {
                        self.cur = None;
                        done.push(tag);
                    } else {
                        self.cur = Some((tag, pos + n));
                    }
                }
            }
        }
        input.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        Ok(())
    }
}

/// An NBD error value in words ("Error values").
fn errno(e: u32) -> String {
    let name = match e {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "an unknown error",
    };
    format!("{name} ({e})")
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::thread;

    #[test]
    fn random_offsets_are_aligned_in_range_and_repeatable() {
        let region = 64 << 20;
        let mut r = XorShift::new(42);
        let (mut low, mut high) = (0, 0);
        for _ in 0..100_000 {
            let off = r.below(region / BLOCK) * BLOCK;
            assert!(off + BLOCK <= region);
            assert_eq!(off % BLOCK, 0);
            if off < region / 2 {
                low += 1
            } else {
                high += 1
            }
        }
        assert!(low > 45_000 && high > 45_000, "{low} {high}");
        let (mut a, mut b) = (XorShift::new(7), XorShift::new(7));
        assert!((0..100).all(|_| a.next() == b.next()));
        assert_ne!(XorShift::new(0).next(), 0);
        assert_eq!(XorShift::new(1).below(1), 0);
    }

    #[test]
    fn requests_encode_per_the_spec() {
        let h = request(true, 5, 1 << 33, 4096);
        assert_eq!(&h[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&h[4..8], &[0, 0, 0, 1], "no flags, NBD_CMD_WRITE");
        assert_eq!(&h[8..16], &5u64.to_be_bytes());
        assert_eq!(&h[16..24], &(1u64 << 33).to_be_bytes());
        assert_eq!(&h[24..28], &4096u32.to_be_bytes());
        assert_eq!(&request(false, 0, 0, 1)[4..8], &[0, 0, 0, 0], "NBD_CMD_READ");
        let parsed = Request::parse(&h).unwrap();
        assert_eq!((parsed.command, parsed.offset, parsed.len), (sys::NBD_CMD_WRITE, 1 << 33, 4096));
    }

    fn reply(error: u32, cookie: u64) -> Vec<u8> {
        crate::nbd::proto::reply(error, cookie.to_be_bytes()).to_vec()
    }

    fn busy(offsets: &[u64]) -> Vec<Slot> {
        let now = Instant::now();
        offsets.iter().map(|&offset| Slot { busy: true, offset, sent: now, header: [0; REQUEST_LEN] }).collect()
    }

    /// Feeds `stream` to a parser in pieces of `chunk` bytes.
    fn feed(stream: &[u8], chunk: usize, slots: &mut [Slot], spec: &Spec) -> Result<Vec<usize>, String> {
        let mut input = vec![0u8; INPUT_LEN];
        let (mut rx, mut done, mut all) = (Rx::default(), Vec::new(), Vec::new());
        for piece in stream.chunks(chunk) {
            input[rx.end..rx.end + piece.len()].copy_from_slice(piece);
            rx.end += piece.len();
            rx.parse(&mut input, slots, spec, &mut done)?;
            for &t in &done {
                slots[t].busy = false;
            }
            all.append(&mut done);
        }
        assert_eq!((rx.end, rx.cur), (0, None), "nothing left over");
        Ok(all)
    }

    fn read_spec(len: u32) -> Spec {
        Spec { write: false, len, depth: 4, random: false, seed: 1 }
    }

    #[test]
    fn read_replies_are_checked_in_any_framing_and_order() {
        let len = 3 * BLOCK as usize;
        let mut stream = Vec::new();
        for (cookie, offset) in [(2u64, 40 * BLOCK), (0, 0), (1, 7 * BLOCK)] {
            stream.extend(reply(0, cookie));
            let mut data = vec![0xeeu8; len];
            stamp(&mut data, offset);
            stream.extend(data);
        }
        for chunk in [1, 5, 8, 16, 4095, 4096, 100_000] {
            let mut slots = busy(&[0, 7 * BLOCK, 40 * BLOCK]);
            assert_eq!(feed(&stream, chunk, &mut slots, &read_spec(len as u32)).unwrap(), [2, 0, 1], "chunk {chunk}");
        }
    }

    #[test]
    fn wrong_data_cookie_error_and_magic_are_caught() {
        let spec = read_spec(2 * BLOCK as u32);
        let mut data = vec![0u8; 2 * BLOCK as usize];
        stamp(&mut data, 4 * BLOCK); // but the request was for offset 0
        let mut stream = reply(0, 0);
        stream.extend(&data);
        let e = feed(&stream, 9000, &mut busy(&[0]), &spec).unwrap_err();
        assert!(e.contains("data mismatch: block 0"), "{e}");

        let e = feed(&reply(0, 3), 16, &mut busy(&[0]), &spec).unwrap_err();
        assert!(e.contains("cookie 0x3 matches no request"), "{e}");
        let mut slots = busy(&[0]);
        slots[0].busy = false;
        assert!(feed(&reply(0, 0), 16, &mut slots, &spec).is_err(), "a cookie answered twice");

        let w = Spec { write: true, ..spec };
        let e = feed(&reply(5, 0), 16, &mut busy(&[8192]), &w).unwrap_err();
        assert_eq!(e, "the server answered EIO (5) to a 8192-byte write at offset 8192");

        let mut bad = reply(0, 0);
        bad[0] ^= 0xff;
        assert!(feed(&bad, 16, &mut busy(&[0]), &w).unwrap_err().contains("lost its framing"));
        let mut structured = reply(0, 0);
        structured[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert!(feed(&structured, 16, &mut busy(&[0]), &w).unwrap_err().contains("structured"));
    }

    /// A deliberately naive blocking server holding `size` bytes: it answers
    /// each request before reading the next, so a client that writes a whole
    /// queue before reading anything deadlocks against it.
    fn naive_server(mut s: UnixStream, size: usize) -> thread::JoinHandle<Vec<u8>> {
        thread::spawn(move || {
            let mut store = vec![0u8; size];
            let mut head = [0u8; REQUEST_LEN];
            while s.read_exact(&mut head).is_ok() {
                let Some(r) = Request::parse(&head) else { break };
                let range = r.offset as usize..r.offset as usize + r.len as usize;
                let ok = range.end <= size;
                if r.command == sys::NBD_CMD_WRITE && ok {
                    s.read_exact(&mut store[range.clone()]).unwrap();
                } else if r.command == sys::NBD_CMD_WRITE {
                    s.read_exact(&mut vec![0u8; r.len as usize]).unwrap();
                }
                let mut out = crate::nbd::proto::reply(if ok { 0 } else { 22 }, r.cookie).to_vec();
                if r.command == sys::NBD_CMD_READ && ok {
                    out.extend(&store[range]);
                }
                if s.write_all(&out).is_err() {
                    break;
                }
            }
            store
        })
    }

    #[test]
    fn pipelines_big_writes_and_reads_without_deadlock() {
        let (mut c, s) = UnixStream::pair().unwrap();
        c.set_nonblocking(true).unwrap();
        let region = 8 << 20;
        let server = naive_server(s, region as usize);
        let mut b = Bufs::new(32, 8 << 20, 1000);
        let seq = Spec { write: true, len: 1 << 20, depth: 8, random: false, seed: 1 };
        let t = drive(&mut c, 0..region, &seq, Stop::Count(8), &mut b).unwrap();
        assert_eq!((t.ios, t.bytes), (8, 8 << 20));
        let timed = Stop::Timed { warmup: Duration::from_millis(20), measure: Duration::from_millis(100) };
        for spec in [
            Spec { write: false, ..seq },
            Spec { len: 4096, depth: 32, random: true, ..seq },
            Spec { write: false, len: 4096, depth: 1, random: true, seed: 9 },
        ] {
            let t = drive(&mut c, 0..region, &spec, timed, &mut b).unwrap();
            assert!(t.ios > 0 && t.bytes == t.ios * u64::from(spec.len), "{spec:?}: {t:?}");
            assert!((t.secs - 0.1).abs() < 1e-6);
            assert_eq!(b.samples.len() as u64, t.ios.min(1000));
            assert!(b.samples.iter().all(|&ns| ns > 0));
        }
        drop(c);
        let store = server.join().unwrap();
        assert_eq!(&store[4096..4104], &stamp_of(1).to_le_bytes());
    }

    /// A region that starts past 0 (one connection's part of several) is
    /// where every request goes, and its stamps are checked there.
    #[test]
    fn requests_stay_in_a_region_away_from_zero() {
        let (mut c, s) = UnixStream::pair().unwrap();
        c.set_nonblocking(true).unwrap();
        let server = naive_server(s, 4 << 20);
        let mut b = Bufs::new(32, 8 << 20, 1000);
        let part = (1 << 20)..(3 << 20);
        let seq = Spec { write: true, len: 1 << 20, depth: 8, random: false, seed: 1 };
        assert_eq!(drive(&mut c, part.clone(), &seq, Stop::Count(4), &mut b).unwrap().ios, 4);
        let rand = Spec { len: 4096, depth: 32, random: true, ..seq };
        assert_eq!(drive(&mut c, part.clone(), &rand, Stop::Count(2000), &mut b).unwrap().ios, 2000);
        // Reads outside the part would find no stamp and fail.
        let read = Spec { write: false, ..rand };
        assert_eq!(drive(&mut c, part.clone(), &read, Stop::Count(2000), &mut b).unwrap().ios, 2000);
        let e = drive(&mut c, 4096..(1 << 20), &read, Stop::Count(10), &mut b).unwrap_err();
        assert!(e.contains("data mismatch"), "{e}");
        drop(c);
        let store = server.join().unwrap();
        let stamped = |block: u64| store[block as usize * 4096..][..8] == stamp_of(block).to_le_bytes();
        assert!((256..768).all(stamped), "every block of the part written");
        assert!(!(0..256).chain(768..1024).any(stamped), "nothing outside it");
        assert!(drive(&mut UnixStream::pair().unwrap().0, 100..(1 << 20), &read, Stop::Count(1), &mut b).is_err());
    }

    #[test]
    fn server_errors_and_hangups_fail_the_run() {
        let (mut c, s) = UnixStream::pair().unwrap();
        c.set_nonblocking(true).unwrap();
        let server = naive_server(s, 1 << 20);
        let mut b = Bufs::new(8, 8 << 20, 10);
        let spec = Spec { write: true, len: 4096, depth: 8, random: false, seed: 1 };
        // The region claims more than the server holds: writes past 1 MiB fail.
        let e = drive(&mut c, 0..2 << 20, &spec, Stop::Count(1000), &mut b).unwrap_err();
        assert!(e.contains("EINVAL (22) to a 4096-byte write at offset 1048576"), "{e}");
        drop(c);
        server.join().unwrap();

        // Unwritten blocks hold no stamp.
        let (mut c, s) = UnixStream::pair().unwrap();
        c.set_nonblocking(true).unwrap();
        let server = naive_server(s, 1 << 20);
        let read = Spec { write: false, random: true, ..spec };
        let e = drive(&mut c, 0..1 << 20, &read, Stop::Count(10), &mut b).unwrap_err();
        assert!(e.contains("data mismatch"), "{e}");
        drop(c);
        server.join().unwrap();

        let (mut c, s) = UnixStream::pair().unwrap();
        c.set_nonblocking(true).unwrap();
        drop(s);
        let e = drive(&mut c, 0..1 << 20, &spec, Stop::Count(10), &mut b).unwrap_err();
        assert!(e.contains("closed the connection"), "{e}");
    }
}
