//! `Fences`: the copier's tokens for "everything handed over so far", and
//! how far that work is known done, so that a wait asks the driver only
//! when it must.

use std::io;

use super::copier::eio;
use crate::cuda::{Context, Error, Event, Stream};
use crate::store::FENCES;

pub struct Fences<'c> {
    /// One per token, created before serving.
    events: Vec<Event<'c>>,
    next: usize,
    /// The last fence, while no work has followed it: its event is
    /// recorded only when work does, since until then waiting for the
    /// whole stream is the same and costs one driver call less.
    unrecorded: Option<usize>,
    /// Hand-overs so far (to the stream, or to the mailbox kernel); what
    /// each fence covers; how many are known complete. When all are,
    /// `sync` need not ask the driver.
    issued: u64,
    fenced: [u64; FENCES],
    done: u64,
}

impl<'c> Fences<'c> {
    pub fn new(ctx: &'c Context) -> Result<Fences<'c>, Error> {
        let events = (0..FENCES).map(|_| ctx.event()).collect::<Result<_, _>>()?;
        Ok(Fences { events, next: 0, unrecorded: None, issued: 0, fenced: [0; FENCES], done: 0 })
    }

    /// Counts one more hand-over of work to `stream`, recording first the
    /// event of a fence that it follows. Should recording fail, the stream
    /// is drained instead, which completes that fence too.
    pub fn hand_over(&mut self, stream: &Stream) -> Result<(), Error> {
        if let Some(token) = self.unrecorded.take() {
            if let Err(e) = stream.record(&self.events[token]) {
                crate::error!("{e}");
                if let Err(e) = stream.sync() {
                    // Its event holds nothing, or an older point: a wait
                    // for this fence must still ask the stream.
                    self.unrecorded = Some(token);
                    return Err(e);
                }
                self.done = self.issued;
            }
        }
        self.issued += 1;
        Ok(())
    }

    /// Counts a hand-over that no event follows (a mailbox job, which
    /// starts only once all before it is complete); returns its number,
    /// for `done_up_to`.
    pub fn hand_over_untracked(&mut self) -> u64 {
        self.unrecorded = None; // every fence so far is complete
        self.issued += 1;
        self.issued
    }

    /// Whether every hand-over is known complete.
    pub fn all_done(&self) -> bool {
        self.done == self.issued
    }

    /// Every hand-over so far is complete (the caller saw the stream idle).
    pub fn mark_all_done(&mut self) {
        self.done = self.issued;
    }

    /// Hand-over `index` and all before it are complete.
    pub fn done_up_to(&mut self, index: u64) {
        self.done = self.done.max(index);
    }

    /// A token for everything handed over so far. A fence with no work
    /// since the last one is the same point.
    pub fn fence(&mut self) -> usize {
        if let Some(last) = self.unrecorded {
            return last;
        }
        let token = self.next % FENCES;
        self.next += 1;
        self.fenced[token] = self.issued;
        self.unrecorded = Some(token);
        token
    }

    /// Whether `token` covers hand-over `index`.
    pub fn covers(&self, token: usize, index: u64) -> bool {
        index <= self.fenced[token]
    }

    /// Waits for the work `token` covers on `stream`.
    pub fn wait(&mut self, stream: &Stream, token: usize) -> io::Result<()> {
        if self.fenced[token] <= self.done {
            return Ok(());
        }
        if self.unrecorded == Some(token) {
            stream.sync().map_err(eio)?;
            self.done = self.issued;
        } else {
            self.events[token].wait().map_err(eio)?;
            self.done = self.fenced[token];
        }
        Ok(())
    }

    /// Waits for everything handed over to `stream`; every token is
    /// spent.
    pub fn sync(&mut self, stream: &Stream) -> io::Result<()> {
        if self.issued > self.done {
            stream.sync().map_err(eio)?;
            self.done = self.issued;
        }
        // Only once synced: after a failed sync, a fence whose event was
        // never recorded must still be waited for on the stream.
        self.next = 0;
        self.unrecorded = None;
        Ok(())
    }
}
