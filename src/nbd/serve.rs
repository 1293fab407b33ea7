//! The one transmission loop, shared by serve mode (a listening socket) and
//! the kernel's socketpair.
//!
//! Blocking and single-threaded, and batched: it takes every request that is
//! already waiting on the socket (up to `MAX_BATCH`, or until the staging
//! buffer is full), queues all their store operations, waits for the store
//! once, then answers the whole batch with one `writev`. All memory is
//! allocated before the first request, so a swap device served here never
//! needs a free page to make progress.

use std::io::{self, IoSlice, Read, Write};
use std::ops::Range;
use std::os::fd::AsFd;
use std::time::Instant;

use super::bindings as sys;
use super::proto::{self, Export, Request, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, MAX_PAYLOAD, REPLY_LEN, REQUEST_LEN};
use crate::sock::recv_nowait;
use crate::stats::Stats;
use crate::store::Store;

/// Requests answered per `writev`; the kernel's queue depth is 128 at most.
pub const MAX_BATCH: usize = 64;
/// iovecs the kernel copies without allocating (`UIO_FASTIOV`, uio.h).
const UIO_FASTIOV: usize = 8;
/// Socket reads land here first; a batch of small requests fits at once.
const INPUT_LEN: usize = 256 * 1024;

const EINVAL: u32 = libc::EINVAL as u32;
const ENOSPC: u32 = libc::ENOSPC as u32;
const EIO: u32 = libc::EIO as u32;

/// Why a connection ended without an error.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed its end between requests.
    Closed,
}

/// One answered request of a batch.
#[derive(Clone)]
struct Slot {
    reply: [u8; REPLY_LEN],
    /// Bytes of staging holding read data to send after the header.
    data: Range<usize>,
    /// Queued in the store: fails with the batch if the store's sync fails.
    queued: bool,
}

/// Everything the loop needs, allocated once and reused by every connection.
pub struct Buffers<B> {
    staging: B,
    input: Box<[u8]>,
    start: usize,
    end: usize,
    slots: Box<[Slot]>,
    /// The batch's reply headers, end to end.
    heads: Box<[u8]>,
}

impl<B: std::ops::DerefMut<Target = [u8]>> Buffers<B> {
    pub fn new<S: Store<Buf = B>>(store: &mut S) -> io::Result<Buffers<B>> {
        let empty = Slot { reply: [0; REPLY_LEN], data: 0..0, queued: false };
        Ok(Buffers {
            staging: store.staging(MAX_PAYLOAD as usize)?,
            input: vec![0u8; INPUT_LEN].into_boxed_slice(),
            start: 0,
            end: 0,
            slots: vec![empty; MAX_BATCH].into_boxed_slice(),
            heads: vec![0u8; REPLY_LEN * MAX_BATCH].into_boxed_slice(),
        })
    }
}

enum Got {
    Data,
    Nothing,
    Eof,
}

/// Serves one negotiated connection until the client disconnects.
/// `Err` means a broken stream (bad magic, truncated request, socket error):
/// the caller drops the connection, the store is intact and synced.
pub fn transmit<S, T>(store: &mut S, bufs: &mut Buffers<S::Buf>, export: &Export, stats: &Stats, conn: &mut T) -> io::Result<End>
where
    S: Store,
    T: Read + Write + AsFd,
{
    bufs.start = 0;
    bufs.end = 0;
    let mut link = Link { store, bufs, export, stats, conn };
    loop {
        let (n, end) = link.gather();
        let started = Instant::now();
        let sync_failed = link.store.sync().is_err();
        if sync_failed {
            crate::error!("store failed to complete a batch of {n} requests: answering EIO");
        }
        let mut answered = Ok(());
        if n > 0 {
            answered = link.answer(n, sync_failed);
            link.stats.record_batch(started.elapsed().as_nanos() as u64);
        }
        match end {
            Some(Ok(end)) => return Ok(end),
            Some(Err(e)) => return Err(e),
            None => answered?,
        }
    }
}

struct Link<'a, S: Store, T> {
    store: &'a mut S,
    bufs: &'a mut Buffers<S::Buf>,
    export: &'a Export,
    stats: &'a Stats,
    conn: &'a mut T,
}

impl<S: Store, T: Read + Write + AsFd> Link<'_, S, T> {
    /// Queues a batch; returns its size and, if the connection must end
    /// after answering it, how.
    fn gather(&mut self) -> (usize, Option<io::Result<End>>) {
        let mut n = 0;
        let mut used = 0;
        while n < MAX_BATCH {
            if self.available() < REQUEST_LEN {
                match self.fill(n == 0) {
                    Ok(Got::Data) => continue,
                    Ok(Got::Nothing) => break,
                    Ok(Got::Eof) if self.available() == 0 => return (n, Some(Ok(End::Closed))),
                    Ok(Got::Eof) => return (n, Some(Err(broken("truncated request")))),
                    Err(e) => return (n, Some(Err(e))),
                }
            }
            let head: &[u8; REQUEST_LEN] = match self.bufs.input[self.bufs.start..][..REQUEST_LEN].try_into() {
                Ok(head) => head,
                Err(_) => unreachable!("available() checked"),
            };
            let Some(req) = Request::parse(head) else {
                return (n, Some(Err(broken("bad request magic"))));
            };
            let staged = staged_len(&req);
            if n > 0 && used + staged > self.bufs.staging.len() {
                break; // the next batch starts with it
            }
            self.bufs.start += REQUEST_LEN;
            if req.command == sys::NBD_CMD_DISC {
                return (n, Some(Ok(End::Disconnect)));
            }
            let slot = match self.execute(&req, used..used + staged) {
                Ok(slot) => slot,
                Err(e) => return (n, Some(Err(e))),
            };
            self.bufs.slots[n] = slot;
            used += staged;
            n += 1;
        }
        (n, None)
    }

    /// Runs (or queues) one request. `Err` only for a broken stream.
    fn execute(&mut self, req: &Request, stage: Range<usize>) -> io::Result<Slot> {
        let mut slot = Slot { reply: [0; REPLY_LEN], data: 0..0, queued: false };
        let mut error = self.check(req);
        if req.command == sys::NBD_CMD_WRITE {
            // The payload follows the header whatever we answer.
            if stage.is_empty() {
                self.discard(u64::from(req.len))?;
            } else {
                self.payload(stage.clone())?;
            }
        }
        if error == 0 {
            let len = u64::from(req.len);
            let done = match req.command {
                sys::NBD_CMD_READ => {
                    slot.data = stage.clone();
                    self.store.read(req.offset, &mut self.bufs.staging[stage])
                }
                sys::NBD_CMD_WRITE => self.store.write(req.offset, &self.bufs.staging[stage]),
                sys::NBD_CMD_FLUSH => self.store.flush(),
                sys::NBD_CMD_TRIM => self.store.trim(req.offset, len),
                _ => self.store.zero(req.offset, len), // check() let only WRITE_ZEROES through
            };
            slot.queued = true;
            if let Err(e) = done {
                crate::error!("{} at offset {} length {len} failed: {e}", name(req.command), req.offset);
                error = EIO;
            }
        }
        self.stats.record(req.command, req.len, error);
        slot.reply = proto::reply(error, req.cookie);
        Ok(slot)
    }

    /// The NBD error a request earns before touching the store ("Error values").
    fn check(&self, req: &Request) -> u32 {
        let mut allowed = CMD_FLAG_FUA;
        if req.command == sys::NBD_VRAM_CMD_WRITE_ZEROES {
            allowed |= CMD_FLAG_NO_HOLE;
        }
        if req.flags & !allowed != 0 {
            return EINVAL;
        }
        let writes = match req.command {
            sys::NBD_CMD_FLUSH => return if req.offset == 0 && req.len == 0 { 0 } else { EINVAL },
            sys::NBD_CMD_READ | sys::NBD_CMD_TRIM => false,
            sys::NBD_CMD_WRITE | sys::NBD_VRAM_CMD_WRITE_ZEROES => true,
            _ => return EINVAL,
        };
        let staged = matches!(req.command, sys::NBD_CMD_READ | sys::NBD_CMD_WRITE);
        if req.len == 0 || (staged && req.len > MAX_PAYLOAD) {
            return EINVAL;
        }
        match req.offset.checked_add(u64::from(req.len)) {
            Some(end) if end <= self.export.size => 0,
            _ if writes => ENOSPC,
            _ => EINVAL,
        }
    }

    /// Sends the replies of slots `0..n`, with read data. Headers are laid
    /// end to end, so a batch of writes is one iovec; each `writev` takes at
    /// most `UIO_FASTIOV` iovecs, which the kernel keeps on its stack: a
    /// longer vector is kmalloc'ed, and under memory pressure that
    /// allocation (no I/O allowed, no OOM kill for it) waits for ever while
    /// the kernel waits for this very reply.
    fn answer(&mut self, n: usize, sync_failed: bool) -> io::Result<()> {
        let b = &mut *self.bufs;
        for (slot, head) in b.slots[..n].iter_mut().zip(b.heads.chunks_exact_mut(REPLY_LEN)) {
            if sync_failed && slot.queued {
                slot.reply[4..8].copy_from_slice(&EIO.to_be_bytes());
            }
            head.copy_from_slice(&slot.reply);
        }
        let mut iov = [IoSlice::new(&[]); 2 * MAX_BATCH + 1];
        let mut count = 0;
        let mut run = 0; // first header not yet in an iovec
        for (i, slot) in b.slots[..n].iter().enumerate() {
            if slot.reply[4..8] == [0; 4] && !slot.data.is_empty() {
                iov[count] = IoSlice::new(&b.heads[run * REPLY_LEN..(i + 1) * REPLY_LEN]);
                iov[count + 1] = IoSlice::new(&b.staging[slot.data.clone()]);
                count += 2;
                run = i + 1;
            }
        }
        if run < n {
            iov[count] = IoSlice::new(&b.heads[run * REPLY_LEN..n * REPLY_LEN]);
            count += 1;
        }
        let mut iov = &mut iov[..count];
        while !iov.is_empty() {
            let take = iov.len().min(UIO_FASTIOV);
            match self.conn.write_vectored(&iov[..take]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(sent) => IoSlice::advance_slices(&mut iov, sent),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn available(&self) -> usize {
        self.bufs.end - self.bufs.start
    }

    /// Reads more input, waiting only if `wait`.
    fn fill(&mut self, wait: bool) -> io::Result<Got> {
        let b = &mut *self.bufs;
        if b.start == b.end {
            (b.start, b.end) = (0, 0);
        } else if b.end == b.input.len() || !wait {
            b.input.copy_within(b.start..b.end, 0);
            (b.start, b.end) = (0, b.end - b.start);
        }
        let space = &mut b.input[b.end..];
        let got = if wait {
            loop {
                match self.conn.read(space) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r.map(Some),
                }
            }
        } else {
            recv_nowait(self.conn.as_fd(), space)
        };
        Ok(match got? {
            None => Got::Nothing,
            Some(0) => Got::Eof,
            Some(n) => {
                b.end += n;
                Got::Data
            }
        })
    }

    /// Moves a write payload into staging: first what input already holds.
    fn payload(&mut self, stage: Range<usize>) -> io::Result<()> {
        let b = &mut *self.bufs;
        let have = (b.end - b.start).min(stage.len());
        let (dst, rest) = b.staging[stage].split_at_mut(have);
        dst.copy_from_slice(&b.input[b.start..b.start + have]);
        b.start += have;
        self.conn.read_exact(rest).map_err(truncated)
    }

    /// Skips the payload of a refused write, so the stream stays in sync.
    fn discard(&mut self, mut len: u64) -> io::Result<()> {
        while len > 0 {
            if self.available() == 0 {
                let b = &mut *self.bufs;
                (b.start, b.end) = (0, 0);
                let n = self.conn.read(&mut b.input).map_err(truncated)?;
                if n == 0 {
                    return Err(broken("truncated write payload"));
                }
                b.end = n;
            }
            let take = (self.available() as u64).min(len);
            self.bufs.start += take as usize;
            len -= take;
        }
        Ok(())
    }
}

/// Staging a request occupies: its payload, if it has a valid-sized one.
fn staged_len(req: &Request) -> usize {
    match req.command {
        sys::NBD_CMD_READ | sys::NBD_CMD_WRITE if req.len <= MAX_PAYLOAD => req.len as usize,
        _ => 0,
    }
}

fn name(command: u32) -> &'static str {
    match command {
        sys::NBD_CMD_READ => "read",
        sys::NBD_CMD_WRITE => "write",
        sys::NBD_CMD_FLUSH => "flush",
        sys::NBD_CMD_TRIM => "trim",
        _ => "write-zeroes",
    }
}

fn broken(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn truncated(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        broken("truncated write payload")
    } else {
        e
    }
}
