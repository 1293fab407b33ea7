//! `Resident`: when the copier's small copies go to the mailbox kernel
//! (src/cuda/mailbox.rs), the job it has, and what a failed or late job
//! means for the work after it.

use std::io;

use super::copier::eio;
use super::fences::Fences;
use crate::cuda::{CopyBatch, Error, Mailbox, Stream};
use crate::{error, warn};

pub struct Resident<'c> {
    /// The kernel, until it fails to start or ends after a missed deadline.
    mailbox: Option<Mailbox<'c>>,
    /// Whether it takes batches as lists, or lone copies only.
    lists: bool,
    /// The job it has, until `finish`.
    posted: Option<Posted>,
    /// Batches it could take in a row since the serve loop last slept or it
    /// was parked.
    run: u32,
    /// A job failed: the next `wait` or `sync` reports it.
    failed: bool,
    /// A job that writes VRAM failed, whichever call found it: the kernel
    /// may still do it late, over writes answered on other connections.
    missed_write: bool,
}

/// Batches in a row that the mailbox kernel could take before it starts:
/// the first after a sleep says nothing of the next request; the second,
/// that they come back to back. The second still goes the other way, as
/// the kernel starts.
const START_AFTER: u32 = 2;

/// A job the mailbox kernel has: its sequence, the staging a lone read goes
/// to from the landing buffer (`None` for a write or a list, which moves
/// staging itself), its hand-over number, and whether it writes VRAM.
struct Posted {
    seq: u32,
    read_into: Option<(u64, usize)>,
    index: u64,
    writes: bool,
}

impl<'c> Resident<'c> {
    pub fn new(mailbox: Option<Mailbox<'c>>, lists: bool) -> Resident<'c> {
        Resident { mailbox, lists, posted: None, run: 0, failed: false, missed_write: false }
    }

    /// Gives `copies` (all to VRAM if `writes`) to the mailbox kernel, and
    /// empties it, when the kernel takes them (one small copy, or a list of
    /// them) and `stream` has nothing left to do (so the job comes after
    /// every copy before it; an error asking is left for the next wait to
    /// report). Starts the kernel if such batches came back to back; the
    /// one that does it, or finds it not ready yet, goes to the stream.
    pub fn post(&mut self, copies: &mut CopyBatch, writes: bool, fences: &mut Fences, stream: &Stream) -> bool {
        let lone = copies.lone();
        let takes = match lone {
            Some((dst, src, len)) => self.mailbox.as_ref().is_some_and(|m| m.takes(if writes { dst } else { src }, len)),
            None => self.lists && Mailbox::takes_list(copies),
        };
        if !takes {
            if lone.is_none_or(|(_, _, len)| Mailbox::too_long(len)) {
                // Batches the kernel cannot take, and copies too long for
                // it (requests end to end, merged), go to the stream, and
                // it would only hold the GPU meanwhile.
                self.run = 0;
                self.park(fences);
            }
            return false;
        }
        if self.mailbox.is_none() {
            return false;
        }
        if let Err(e) = self.finish(fences) {
            error!("{e}"); // and the next wait or sync reports it
            return false;
        }
        self.run += 1;
        if !fences.all_done() && !stream.is_done().unwrap_or(false) {
            return false;
        }
        fences.mark_all_done();
        let Some(mailbox) = &mut self.mailbox else { return false };
        if !mailbox.ready() {
            if self.run >= START_AFTER {
                if let Err(e) = mailbox.start() {
                    warn!("the mailbox kernel did not start ({e}): small copies go the other ways");
                    self.mailbox = None;
                }
            }
            return false;
        }
        let (seq, read_into) = match lone {
            // SAFETY: `finish` above returned `Ok`: the job before is done,
            // or there was none; the host sides are the promise made to
            // `CopyBatch`.
            None => (unsafe { mailbox.post_list(copies, writes) }, None),
            Some((dst, src, len)) if writes => {
                // SAFETY: `len` bytes at `src` were queued by
                // `CopyBatch::write`, whose caller keeps them allocated and
                // unchanged until the copy is done (not yet: it starts here).
                let data = unsafe { std::slice::from_raw_parts(src as *const u8, len) };
                (mailbox.post_write(dst, data), None)
            }
            Some((dst, src, len)) => (mailbox.post_read(src, len), Some((dst, len))),
        };
        copies.clear();
        let index = fences.hand_over_untracked();
        self.posted = Some(Posted { seq, read_into, index, writes });
        true
    }

    /// A mailbox kernel that missed a deadline may still do that job late,
    /// over newer writes: until it has ended, no work is handed over (its
    /// requests fail). Once it has, serving goes on without it.
    pub fn forget_abandoned(&mut self) -> Result<(), Error> {
        let Some(mailbox) = self.mailbox.as_ref().filter(|m| m.abandoned()) else { return Ok(()) };
        mailbox.may_run_late()?;
        warn!("the mailbox kernel has ended after missing its deadline: small copies go the other ways from now on");
        self.mailbox = None;
        Ok(())
    }

    /// Waits for the kernel's job and moves a read's bytes into staging.
    pub fn finish(&mut self, fences: &mut Fences) -> Result<(), Error> {
        let (Some(p), Some(mailbox)) = (self.posted.take(), &mut self.mailbox) else { return Ok(()) };
        if let Err(e) = mailbox.wait(p.seq) {
            self.failed = true;
            self.missed_write |= p.writes;
            return Err(e);
        }
        if let Some((dst, len)) = p.read_into {
            // SAFETY: `dst` was queued by `CopyBatch::read`, whose caller
            // leaves it alone until the copy is done: this is where it is
            // done (whichever call waits for the job, a drop's included).
            let dst = unsafe { std::slice::from_raw_parts_mut(dst as *mut u8, len) };
            dst.copy_from_slice(mailbox.landed(len));
        }
        fences.done_up_to(p.index);
        Ok(())
    }

    /// Whether a job that writes VRAM failed since the last call.
    pub fn take_missed_write(&mut self) -> bool {
        std::mem::take(&mut self.missed_write)
    }

    /// `finish`, if the job writes VRAM.
    pub fn finish_writes(&mut self, fences: &mut Fences) -> Result<(), Error> {
        match &self.posted {
            Some(p) if p.writes => self.finish(fences),
            _ => Ok(()),
        }
    }

    /// Whether the kernel runs and takes jobs.
    #[cfg(test)]
    pub fn serves(&mut self) -> bool {
        self.mailbox.as_mut().is_some_and(Mailbox::ready)
    }

    /// Ends the kernel once its job is done: a GPU shared with other work
    /// gets its SM back, and its clocks may drop. A failure is left for
    /// the next wait or sync to report.
    pub fn park(&mut self, fences: &mut Fences) {
        if let Err(e) = self.finish(fences) {
            error!("{e}");
        }
        if let Some(mailbox) = &mut self.mailbox {
            mailbox.park();
        }
    }

    /// Parks the kernel if a call that waits for every kernel is due
    /// (`cuda::gate`).
    pub fn yield_to_waiting_call(&mut self, fences: &mut Fences) {
        if self.mailbox.as_ref().is_some_and(Mailbox::holds_up_others) {
            self.park(fences);
        }
    }

    /// Requests are apart: the kernel waits for batches in a row again
    /// before it starts.
    pub fn idle(&mut self, fences: &mut Fences) {
        self.run = 0;
        self.park(fences);
    }

    /// `finish`, and a failure of an earlier job, as the store reports them.
    pub fn finished(&mut self, fences: &mut Fences) -> io::Result<()> {
        let finished = self.finish(fences);
        if std::mem::take(&mut self.failed) {
            return Err(finished.err().map_or_else(|| io::Error::from_raw_os_error(libc::EIO), eio));
        }
        Ok(())
    }

    /// Whether a wait for `token` must first finish the kernel's job, or
    /// report a failed one.
    pub fn before(&self, fences: &Fences, token: usize) -> bool {
        self.failed || self.posted.as_ref().is_some_and(|p| fences.covers(token, p.index))
    }

    /// Finishes the job and ends the kernel, waiting for it: before
    /// anything it uses is freed.
    pub fn end(&mut self, fences: &mut Fences) {
        if let Err(e) = self.finish(fences) {
            error!("{e}");
        }
        self.mailbox = None;
    }
}
