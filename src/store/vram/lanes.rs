//! `Lanes`: how the connections to one VRAM store see each other's
//! changes without waiting for them.
//!
//! A write is answered once its copy is queued, before it reaches VRAM.
//! With several connections the kernel may read the page back, or write it
//! again, on another one as soon as the answer is in (swap does, with no
//! flush between), and that connection's copies run on a stream of its
//! own. So each connection has a lane: when it lets changes be answered
//! (`publish`, at a fence), it records its lane's event behind them and
//! says which blocks they may still be changing; before it hands work to
//! the device, it makes its stream wait for each other lane whose
//! published blocks that work touches (`follow`). The waits run on the
//! GPU: no serving thread waits for another, and connections that work on
//! different blocks never wait for each other at all.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cuda::{Context, Error, Event, Stream};

/// The 4 KiB blocks `lo..hi` of the store, as one word, so that another
/// thread reads both ends of one publication.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    lo: u32,
    hi: u32,
}

impl Span {
    pub const EMPTY: Span = Span { lo: 0, hi: 0 };
    pub const ALL: Span = Span { lo: 0, hi: u32::MAX };

    /// Widens it to take in bytes `offset..offset + len` (a store of up to
    /// 16 TiB; beyond, the last block stands for the rest, never empty).
    pub fn add(&mut self, offset: u64, len: u64) {
        let block = |byte: u64| u32::try_from(byte / 4096).unwrap_or(u32::MAX);
        let lo = block(offset).min(u32::MAX - 1);
        let hi = block(offset.saturating_add(len).saturating_add(4095)).max(lo.saturating_add(1));
        *self = self.union(Span { lo, hi });
    }

    pub fn is_empty(&self) -> bool {
        self.lo >= self.hi
    }

    fn overlaps(&self, other: Span) -> bool {
        !self.is_empty() && !other.is_empty() && self.lo < other.hi && other.lo < self.hi
    }

    fn union(self, other: Span) -> Span {
        match (self.is_empty(), other.is_empty()) {
            (true, _) => other,
            (_, true) => self,
            _ => Span { lo: self.lo.min(other.lo), hi: self.hi.max(other.hi) },
        }
    }

    fn pack(self) -> u64 {
        (u64::from(self.lo) << 32) | u64::from(self.hi)
    }

    fn unpack(word: u64) -> Span {
        Span { lo: (word >> 32) as u32, hi: word as u32 }
    }
}

/// The lanes of one store: one per connection served at once, none for a
/// store served on one connection, whose stream orders its work by itself.
pub struct Lanes<'c> {
    lanes: Box<[Shared<'c>]>,
}

/// A cache line pair of its own: each lane's words change at every batch
/// of writes its connection answers, and the others read them at each of
/// theirs.
#[repr(align(128))]
struct Shared<'c> {
    /// Held by one connection's copier at a time.
    taken: AtomicBool,
    /// Recorded behind the changes its holder let be answered.
    event: Event<'c>,
    /// Times it was so recorded; raised after each record.
    published: AtomicU64,
    /// The blocks those changes may still be changing (a packed `Span`);
    /// empty once its holder saw them all done.
    reach: AtomicU64,
}

impl<'c> Lanes<'c> {
    /// The events are made now: serving never allocates.
    pub fn new(ctx: &'c Context, connections: usize) -> Result<Lanes<'c>, Error> {
        let n = if connections > 1 { connections } else { 0 };
        let lane = || {
            let reach = AtomicU64::new(Span::EMPTY.pack());
            Ok(Shared { taken: AtomicBool::new(false), event: ctx.event()?, published: AtomicU64::new(0), reach })
        };
        Ok(Lanes { lanes: (0..n).map(|_| lane()).collect::<Result<_, Error>>()? })
    }

    pub fn len(&self) -> usize {
        self.lanes.len()
    }

    /// A free lane, for a connection's copier; `None` when the store has
    /// none (one connection) or all are held.
    pub fn take(self: &Arc<Self>) -> Option<Lane<'c>> {
        let me = self.lanes.iter().position(|l| !l.taken.swap(true, Ordering::Acquire))?;
        // Publications before this holder's time are followed too: an
        // earlier connection's answered changes may still be on their way.
        let seen = vec![0; self.lanes.len()].into_boxed_slice();
        let heard = self.lanes.iter().map(|l| (l.published.load(Ordering::Relaxed), None)).collect();
        Some(Lane { lanes: Arc::clone(self), me, seen, heard, looked: None })
    }
}

/// A connection's own lane, and how far it has followed the others.
pub struct Lane<'c> {
    lanes: Arc<Lanes<'c>>,
    me: usize,
    /// Each lane's `published` when this one's stream last waited for it.
    seen: Box<[u64]>,
    /// Each lane's `published` when `others_writing` last looked, and
    /// when it last saw it change; and when it last looked.
    heard: Box<[(u64, Option<Instant>)]>,
    looked: Option<Instant>,
}

/// How long after its last publication another lane still counts as
/// writing: several batches of the largest writes.
const WRITING: Duration = Duration::from_millis(10);

impl Lane<'_> {
    /// Whether work on `blocks` must wait for another lane's published
    /// changes, not yet followed.
    pub fn news(&self, blocks: Span) -> bool {
        (0..self.seen.len()).any(|j| self.due(j, blocks).is_some())
    }

    /// Makes `stream`'s later work wait for the changes other lanes
    /// published on `blocks`. A publication seen here was counted after
    /// its record returned, so the wait covers it (or a later record,
    /// which covers more); a lane whose reach is empty, or elsewhere, is
    /// left alone until work touches it.
    pub fn follow(&mut self, stream: &Stream, blocks: Span) -> Result<(), Error> {
        for j in 0..self.seen.len() {
            if let Some(published) = self.due(j, blocks) {
                stream.wait_for(&self.lanes.lanes[j].event)?;
                self.seen[j] = published;
            }
        }
        Ok(())
    }

    /// Lets the changes queued on `stream` so far, on `blocks`, be
    /// answered: every other lane's work on those blocks handed over after
    /// this returns comes after them. If all this lane's work is `done`
    /// (its copier saw it complete), nothing is left for others to wait
    /// for; until then its reach only grows. Asking the driver here would
    /// cost a call per batch of writes.
    pub fn publish(&self, stream: &Stream, blocks: Span, done: bool) -> Result<(), Error> {
        let lane = &self.lanes.lanes[self.me];
        if done {
            lane.reach.store(Span::EMPTY.pack(), Ordering::Release);
            return Ok(());
        }
        // Wider first: a reader that sees the new count sees this reach.
        // Only this lane's holder stores it, so its own last value needs
        // no ordering.
        let reach = Span::unpack(lane.reach.load(Ordering::Relaxed)).union(blocks);
        lane.reach.store(reach.pack(), Ordering::Release);
        stream.record(&lane.event)?;
        lane.published.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// How many other lanes published within `WRITING` before `now`: the
    /// connections writing at the same time as this one. A publication is
    /// timed when it is first seen, so one seen after a longer gap since
    /// the last look, of unknown age, does not count. Changes done before
    /// they were answered (the mailbox kernel's) are not published, so
    /// their writers are not counted: their copies are small, not those
    /// that slow the others.
    pub fn others_writing(&mut self, now: Instant) -> usize {
        let recent = |at: Instant| now.saturating_duration_since(at) < WRITING;
        let fresh = self.looked.is_some_and(recent);
        self.looked = Some(now);
        let mut n = 0;
        for (j, (heard, at)) in self.heard.iter_mut().enumerate() {
            let published = self.lanes.lanes[j].published.load(Ordering::Relaxed);
            if published != *heard {
                (*heard, *at) = (published, Some(now).filter(|_| fresh));
            }
            n += usize::from(j != self.me && at.is_some_and(recent));
        }
        n
    }

    /// Lane `j`'s count of publications if it is another lane, with one
    /// not yet followed, whose reach meets `blocks`.
    fn due(&self, j: usize, blocks: Span) -> Option<u64> {
        let lane = &self.lanes.lanes[j];
        let published = lane.published.load(Ordering::Acquire);
        let reach = Span::unpack(lane.reach.load(Ordering::Acquire));
        (j != self.me && published != self.seen[j] && reach.overlaps(blocks)).then_some(published)
    }
}

impl Drop for Lane<'_> {
    /// After its copier, which synced its stream: nothing it published is
    /// left to wait for, as when a holder starts with an empty reach.
    fn drop(&mut self) {
        let lane = &self.lanes.lanes[self.me];
        lane.reach.store(Span::EMPTY.pack(), Ordering::Release);
        lane.taken.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::Span;

    #[test]
    fn spans_cover_whole_blocks_and_meet_only_where_they_share_one() {
        let span = |offset, len| {
            let mut s = Span::EMPTY;
            s.add(offset, len);
            s
        };
        assert_eq!(span(4096, 4096), Span { lo: 1, hi: 2 });
        assert_eq!(span(4095, 2), Span { lo: 0, hi: 2 });
        assert!(!span(0, 4096).overlaps(span(4096, 4096)), "neighbours");
        assert!(span(0, 8192).overlaps(span(4096, 1)));
        assert!(!Span::EMPTY.overlaps(Span::ALL));
        assert_eq!(Span::unpack(span(1 << 40, 1 << 20).pack()), span(1 << 40, 1 << 20));
        let far = span(u64::MAX - 10, 5);
        assert!(far.hi == u32::MAX && !far.is_empty(), "beyond 16 TiB: the last block");
        assert_eq!(span(0, 4096).union(Span::EMPTY), span(0, 4096));
    }
}
