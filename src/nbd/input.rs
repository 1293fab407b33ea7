//! What the client sent that the transmission loop has not taken yet, and
//! how a write's payload gets from the socket to where it lands: staging,
//! the store's own bytes, or staging around the CPU caches.

use std::io;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use super::poll::Poll;
use super::proto::{broken, Request, REQUEST_LEN};
use crate::sock::{recv_nowait, recv_wait};
use crate::uapi as sys;
use crate::uncached;

/// Socket reads land here first; a batch of small requests fits at once.
const INPUT_LEN: usize = 256 * 1024;
/// After a write this large, input reads stop at the next header, so that
/// the next payload goes straight from the socket into staging (or the
/// store): copying it out of input would cost more than the extra read.
const DIRECT_WRITE: u32 = 16 * 1024;
/// Bytes saved at a time for a payload that lands in the store: socket
/// reads go no further than what is saved, so this is also the least a
/// read may take.
const SAVE_CHUNK: usize = 64 * 1024;

/// What a read for more input found.
pub(super) enum Got {
    Data,
    Nothing,
    Eof,
}

/// The client's bytes not taken yet, `buf[start..end]`, and how the loop
/// waits for more.
pub(super) struct Input {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The last request was a write of `DIRECT_WRITE` or more.
    direct: bool,
    pub(super) poll: Poll,
}

impl Input {
    /// Polls the socket for up to `spin` before it sleeps (`Poll::with`).
    pub fn new(spin: Option<Duration>) -> io::Result<Input> {
        Ok(Input { buf: crate::touch::zeroed(INPUT_LEN)?, start: 0, end: 0, direct: false, poll: Poll::with(spin) })
    }

    pub fn available(&self) -> usize {
        self.end - self.start
    }

    pub fn clear(&mut self) {
        (self.start, self.end) = (0, 0);
    }

    /// The next request's header, if all of it is here.
    pub fn header(&self) -> Option<&[u8; REQUEST_LEN]> {
        self.buf[self.start..self.end].first_chunk()
    }

    /// Takes `req`'s header, which `header` returned.
    pub fn take_header(&mut self, req: &Request) {
        self.start += REQUEST_LEN;
        self.direct = req.command == sys::NBD_CMD_WRITE && req.len >= DIRECT_WRITE;
    }

    /// Reads more from `conn`: waits for it through the poll if `wait`
    /// (calling `sleeping` before it blocks), else takes only what is
    /// queued. After a large write, reads stop at the next header, so
    /// that its payload, if it has one, can go straight where it lands.
    pub fn fill(&mut self, conn: BorrowedFd, wait: bool, sleeping: impl FnOnce()) -> io::Result<Got> {
        debug_assert!(self.header().is_none(), "asked for more with a header on hand");
        if self.start == self.end {
            self.clear();
        } else if self.end == self.buf.len() || !wait {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        // With less than a header here, `want` is past `end`.
        let want = if self.direct { (self.start + REQUEST_LEN).min(self.buf.len()) } else { self.buf.len() };
        let space = &mut self.buf[self.end..want];
        let got = if wait { self.poll.recv(conn, space, sleeping).map(Some) } else { recv_nowait(conn, space) };
        Ok(match got? {
            None => Got::Nothing,
            Some(0) => Got::Eof,
            Some(n) => {
                self.end += n;
                Got::Data
            }
        })
    }

    /// Fills `dst` with a write payload: first what is here, the rest from
    /// `conn`, calling `sleeping` before it blocks. With an `undo` as long
    /// as `dst`, each byte of `dst` is saved there before it is
    /// overwritten, and put back if the payload is cut short.
    pub fn take_payload(&mut self, conn: BorrowedFd, dst: &mut [u8], undo: &mut [u8], sleeping: &mut dyn FnMut()) -> io::Result<()> {
        let saved = if undo.is_empty() { dst.len() } else { 0 };
        let mut landing = Landing { dst, undo, saved };
        let got = landing.receive(self, conn, sleeping);
        if got.is_err() && !landing.undo.is_empty() {
            let saved = landing.saved;
            landing.dst[..saved].copy_from_slice(&landing.undo[..saved]);
        }
        got
    }

    /// Fills `dst` with a write payload as `take_payload` does, through
    /// this buffer, which stays in cache, and from here around the caches
    /// (`uncached::fill`): what the store asks for while other connections
    /// write too.
    pub fn take_payload_uncached(&mut self, conn: BorrowedFd, dst: &mut [u8], sleeping: &mut dyn FnMut()) -> io::Result<()> {
        let len = dst.len();
        uncached::fill(dst, |out| {
            let mut at = self.available().min(len);
            out.put(&self.buf[self.start..][..at]);
            self.start += at;
            if at < len {
                self.clear(); // all taken: the buffer carries the rest
            }
            while at < len {
                let buf = &mut self.buf[..(len - at).min(INPUT_LEN)];
                let got = match recv_nowait(conn, buf)? {
                    Some(n) => n,
                    None => self.poll.recv(conn, buf, &mut *sleeping)?,
                };
                out.put(&self.buf[..more(got)?]);
                at += got;
            }
            Ok(())
        })
    }

    /// Skips the payload of a refused write, so the stream stays in sync.
    pub fn discard(&mut self, conn: BorrowedFd, mut len: u64) -> io::Result<()> {
        while len > 0 {
            if self.available() == 0 {
                self.clear();
                self.end = more(recv_wait(conn, &mut self.buf)?)?;
            }
            let take = (self.available() as u64).min(len);
            self.start += take as usize;
            len -= take;
        }
        Ok(())
    }
}

/// A write payload on its way into `dst`; `dst[..saved]` is in `undo`.
struct Landing<'a> {
    dst: &'a mut [u8],
    undo: &'a mut [u8],
    saved: usize,
}

impl Landing<'_> {
    /// `take_payload`'s loop. The saving runs ahead while the socket is
    /// empty, so that it takes the time a wait for the peer would:
    /// sequential 1 MiB writes +15–24 % per round against saving all
    /// first, the rest level (docs/performance.md, "The host store and the serve loop").
    fn receive(&mut self, input: &mut Input, conn: BorrowedFd, sleeping: &mut dyn FnMut()) -> io::Result<()> {
        let len = self.dst.len();
        let mut at = input.available().min(len);
        while self.saved < at {
            self.save_chunk();
        }
        self.dst[..at].copy_from_slice(&input.buf[input.start..][..at]);
        input.start += at;
        while at < len {
            if self.saved == at {
                self.save_chunk();
            }
            let got = match recv_nowait(conn, &mut self.dst[at..self.saved])? {
                Some(n) => n,
                None if self.saved < len => {
                    self.save_chunk();
                    continue;
                }
                None => input.poll.recv(conn, &mut self.dst[at..self.saved], &mut *sleeping)?,
            };
            at += more(got)?;
        }
        Ok(())
    }

    /// Saves the next `SAVE_CHUNK` bytes after `saved`.
    fn save_chunk(&mut self) {
        let end = (self.saved + SAVE_CHUNK).min(self.dst.len());
        self.undo[self.saved..end].copy_from_slice(&self.dst[self.saved..end]);
        self.saved = end;
    }
}

/// A read of `got` bytes mid-payload: none means the peer hung up.
fn more(got: usize) -> io::Result<usize> {
    if got == 0 {
        return Err(broken("truncated write payload"));
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::nbd::poll::SPIN;

    /// `Input` holding `bytes`, as after a read from the socket.
    fn holding(bytes: &[u8], spin: Duration) -> Input {
        let mut input = Input::new(Some(spin)).unwrap();
        input.poll = Poll::new(spin);
        input.buf[..bytes.len()].copy_from_slice(bytes);
        input.end = bytes.len();
        input
    }

    /// The most a burst of swap-outs fills is already in RAM: a fresh page
    /// then would wait for reclaim, which may wait for this very loop.
    /// Alone, with glibc's mmap threshold fixed: in a process that has
    /// freed a block this large, calloc may hand out one already touched,
    /// and a buffer left to it would pass.
    #[test]
    fn the_buffer_is_in_ram_before_serving() {
        crate::cuda::fake_tests::alone("nbd::input::tests::buffer_in_ram", &[("MALLOC_MMAP_THRESHOLD_", "131072")]);
    }

    #[test]
    #[ignore = "run by the_buffer_is_in_ram_before_serving"]
    fn buffer_in_ram() {
        if !crate::cuda::fake_tests::knob_given("MALLOC_MMAP_THRESHOLD_") {
            return;
        }
        let calloc = vec![0u8; INPUT_LEN];
        assert!(!crate::touch::resident(calloc.as_ptr(), calloc.len()), "calloc touched its pages: this test proves nothing");
        let input = Input::new(None).unwrap();
        assert!(crate::touch::resident(input.buf.as_ptr(), input.buf.len()));
    }

    /// A payload cut short puts back every byte it overwrote, however far
    /// the socket let it run ahead of what was saved; one that arrives
    /// whole lands whole. The first bytes come from input, as after a
    /// header.
    #[test]
    fn a_cut_payload_puts_back_what_it_overwrote() {
        const LEN: usize = 150 * 1024; // all of it fits in the socket's queue
        let old: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
        let new: Vec<u8> = (0..LEN).map(|i| (i % 253) as u8 ^ 0x5a).collect();
        for (sent, spin) in [(LEN - 100, Duration::ZERO), (LEN - 100, SPIN), (LEN, Duration::ZERO)] {
            let (ours, mut theirs) = UnixStream::pair().unwrap();
            let mut input = holding(&new[..1000], spin);
            theirs.write_all(&new[1000..sent]).unwrap();
            drop(theirs);
            let (mut dst, mut undo) = (old.clone(), vec![0u8; LEN]);
            let got = input.take_payload(ours.as_fd(), &mut dst, &mut undo, &mut || {});
            if sent < LEN {
                assert!(got.is_err(), "a cut payload fails");
                assert!(dst == old, "a cut payload changed the store");
            } else {
                assert!(got.is_ok() && dst == new, "a whole payload lands whole");
            }
            assert_eq!(input.available(), 0, "input is consumed either way");
        }
    }

    /// Around the caches, a payload longer than the buffer lands whole,
    /// and what followed it, on the socket or in input, stays there for
    /// the next header; one cut short is an error.
    #[test]
    fn a_payload_around_the_caches_lands_whole_and_takes_no_more() {
        const LEN: usize = INPUT_LEN * 2 + 12_345;
        let new: Vec<u8> = (0..LEN).map(|i| (i % 253) as u8 ^ 0x5a).collect();
        for sent in [LEN + 7, LEN - 1] {
            let (ours, mut theirs) = UnixStream::pair().unwrap();
            let mut input = holding(&new[..100], Duration::ZERO);
            let writer = std::thread::spawn({
                let rest = [&new[100..], &[7u8; 7]].concat();
                move || theirs.write_all(&rest[..sent - 100]).unwrap()
            });
            let mut dst = vec![0u8; LEN];
            let got = input.take_payload_uncached(ours.as_fd(), &mut dst, &mut || {});
            if sent < LEN {
                assert!(got.is_err(), "a cut payload fails");
                continue;
            }
            if let Err(e) = got {
                drop(ours); // so that a writer still blocked fails, not hangs
                let _ = writer.join();
                panic!("a whole payload failed: {e}");
            }
            writer.join().unwrap();
            assert!(dst == new, "the payload lands whole");
            assert_eq!(input.available(), 0, "input is consumed");
            let mut next = [0u8; 8];
            assert_eq!(recv_nowait(ours.as_fd(), &mut next).unwrap(), Some(7), "the next bytes are still queued");
        }
        // A payload all in input already leaves what follows it there.
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let mut input = holding(&new[..5000], Duration::ZERO);
        let mut dst = vec![0u8; 4000];
        input.take_payload_uncached(ours.as_fd(), &mut dst, &mut || {}).unwrap();
        assert!(dst == new[..4000], "the payload lands whole");
        assert_eq!(input.available(), 1000, "the next request's bytes stay in input");
    }
}
