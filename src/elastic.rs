//! When the swap daemon gives a slice of its tier back to GPU jobs and
//! when it takes one again (`--reserve`, `--hold-off`, `nbd-vram resize`).
//! Pure: it sees free memory, the slices and the clock, and names at most
//! one change at a time; `daemon.rs` carries it out.

use std::time::{Duration, Instant};

/// How long after a refused swapoff, or a slice that could not be taken,
/// before the next try.
pub const RETRY: Duration = Duration::from_secs(10);
/// Free memory beyond the reserve and a slice that a slice taken again
/// needs: what the driver adds for it (its kernels, rounding), so that
/// taking it never leaves less than the reserve and drains it at once.
pub const MARGIN: u64 = 64 << 20;

/// Whether `free` bytes leave room for a slice of `slice` above `reserve`.
pub fn room(free: u64, reserve: u64, slice: u64) -> bool {
    free >= reserve.saturating_add(slice).saturating_add(MARGIN)
}

/// Where a slice is in its life, as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Being allocated, attached and swapped on.
    Starting,
    /// Swap the kernel may use.
    Serving,
    /// Being swapped off, detached and freed.
    Draining,
    /// No memory, no device.
    Released,
}

impl State {
    /// As `status` shows it.
    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Serving => "serving",
            State::Draining => "draining",
            State::Released => "released",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Slice {
    pub state: State,
    /// Pages the kernel keeps in it (/proc/swaps).
    pub used_pages: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Swap this slice off, detach it and free its memory.
    Drain(usize),
    /// Allocate this slice again, attach it and swap it on.
    Grow(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Free device memory fell below `--reserve`.
    Reserve,
    /// Free memory stayed above the reserve and a slice for the hold-off.
    Room,
    /// `nbd-vram resize`.
    Asked,
}

pub struct Policy {
    /// Device memory kept free for others; 0: never give back on our own.
    reserve: u64,
    slice: u64,
    hold_off: Duration,
    /// Slices wanted at most: all of `--size`, or what `resize` asked.
    target: usize,
    /// `resize` asked for more: grow without waiting for the hold-off.
    asked: bool,
    /// Since when free memory has had room for one more slice.
    room_since: Option<Instant>,
    /// No new change of this kind before then (after a refusal).
    drain_after: Option<Instant>,
    grow_after: Option<Instant>,
}

impl Policy {
    pub fn new(reserve: u64, slice: u64, hold_off: Duration, target: usize) -> Policy {
        Policy { reserve, slice, hold_off, target, asked: false, room_since: None, drain_after: None, grow_after: None }
    }

    pub fn target(&self) -> usize {
        self.target
    }

    /// `resize`: from now on at most `slices`; a shrink or a grow by hand
    /// needs no hold-off, and is not put off by an earlier refusal.
    pub fn set_target(&mut self, slices: usize) {
        self.asked = true;
        self.target = slices;
        (self.drain_after, self.grow_after) = (None, None);
    }

    /// A drain did not give its slice back (RAM cannot take the pages
    /// back, another swapoff is under way, ...): no drain
    /// before `RETRY`.
    pub fn refused(&mut self, now: Instant) {
        self.drain_after = Some(now + RETRY);
    }

    /// A slice could not be taken again (no VRAM after all, no free
    /// /dev/nbdN): no grow before `RETRY`.
    pub fn grow_failed(&mut self, now: Instant) {
        self.grow_after = Some(now + RETRY);
        self.asked = false;
    }

    /// The one change to make now, if any. `free`: device memory free now
    /// (`None`: unknown, as for a host store: then only `resize` counts).
    pub fn decide(&mut self, now: Instant, free: Option<u64>, slices: &[Slice]) -> Option<(Change, Why)> {
        let serving = slices.iter().filter(|s| matches!(s.state, State::Serving | State::Starting)).count();
        let room = free.is_some_and(|f| room(f, self.reserve, self.slice));
        self.room_since = if room { self.room_since.or(Some(now)) } else { None };
        if slices.iter().any(|s| matches!(s.state, State::Starting | State::Draining)) {
            return None; // one change at a time
        }
        let short = self.reserve > 0 && free.is_some_and(|f| f < self.reserve);
        let drain_why = if serving > self.target {
            Some(Why::Asked)
        } else if short {
            Some(Why::Reserve)
        } else {
            None
        };
        if let Some(why) = drain_why {
            if self.drain_after.is_some_and(|t| now < t) {
                return None;
            }
            // The slice with the fewest pages: the least for swapoff to move.
            let fewest = slices.iter().enumerate().filter(|(_, s)| s.state == State::Serving).min_by_key(|(_, s)| s.used_pages);
            let (i, _) = fewest?;
            if why == Why::Reserve {
                // Others need the memory the ask was for: what comes back
                // waits its hold-off again, lest a job whose use dips and
                // returns make the tier grow and give back at every dip.
                self.asked = false;
            }
            return Some((Change::Drain(i), why));
        }
        if serving >= self.target {
            self.asked = false;
            return None;
        }
        if self.grow_after.is_some_and(|t| now < t) {
            return None;
        }
        let waited = self.room_since.is_some_and(|t| now.duration_since(t) >= self.hold_off);
        let why = match (free, self.asked) {
            // A host store has no device memory to share.
            (None, _) => Why::Asked,
            (Some(_), true) if room || self.reserve == 0 => Why::Asked,
            (Some(_), _) if room && waited => Why::Room,
            _ => return None,
        };
        let released = slices.iter().position(|s| s.state == State::Released)?;
        self.room_since = None; // the next one waits its own hold-off
        Some((Change::Grow(released), why))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::MIB;
    const HOLD: Duration = Duration::from_secs(30);

    fn slices(states: &[(State, u64)]) -> Vec<Slice> {
        states.iter().map(|&(state, used_pages)| Slice { state, used_pages }).collect()
    }

    use State::*;

    #[test]
    fn below_the_reserve_the_slice_with_the_fewest_pages_goes_first() {
        let mut p = Policy::new(1024 * MIB, 512 * MIB, HOLD, 4);
        let t = Instant::now();
        let s = slices(&[(Serving, 900), (Serving, 12), (Serving, 400), (Released, 0)]);
        assert_eq!(p.decide(t, Some(2048 * MIB), &s), None, "above the reserve");
        assert_eq!(p.decide(t, Some(1000 * MIB), &s), Some((Change::Drain(1), Why::Reserve)));
    }

    #[test]
    fn never_two_changes_at_once() {
        let mut p = Policy::new(1024 * MIB, 512 * MIB, HOLD, 4);
        let t = Instant::now();
        let s = slices(&[(Serving, 900), (Draining, 12), (Serving, 400), (Serving, 0)]);
        assert_eq!(p.decide(t, Some(0), &s), None, "a drain is under way");
        let s = slices(&[(Serving, 900), (Starting, 0), (Released, 0), (Released, 0)]);
        assert_eq!(p.decide(t + HOLD * 9, Some(64 << 30), &s), None, "a grow is under way");
    }

    #[test]
    fn a_refused_swapoff_is_tried_again_after_the_retry_time() {
        let mut p = Policy::new(1024 * MIB, 512 * MIB, HOLD, 2);
        let t = Instant::now();
        let s = slices(&[(Serving, 900), (Serving, 400)]);
        assert_eq!(p.decide(t, Some(0), &s), Some((Change::Drain(1), Why::Reserve)));
        p.refused(t);
        assert_eq!(p.decide(t + RETRY / 2, Some(0), &s), None, "too soon");
        assert_eq!(p.decide(t + RETRY, Some(0), &s), Some((Change::Drain(1), Why::Reserve)));
    }

    #[test]
    fn growing_back_waits_for_room_held_for_the_hold_off() {
        let mut p = Policy::new(1024 * MIB, 512 * MIB, HOLD, 2);
        let t = Instant::now();
        let s = slices(&[(Serving, 900), (Released, 0)]);
        let room = Some(1536 * MIB + MARGIN); // the reserve, one slice and the margin, exactly
        assert_eq!(p.decide(t, room, &s), None, "room only just appeared");
        assert_eq!(p.decide(t + HOLD / 2, Some(1536 * MIB), &s), None, "room gone again: the wait starts over");
        assert_eq!(p.decide(t + HOLD, room, &s), None);
        assert_eq!(p.decide(t + HOLD + HOLD / 2, room, &s), None);
        assert_eq!(p.decide(t + HOLD * 2, room, &s), Some((Change::Grow(1), Why::Room)));
    }

    #[test]
    fn hysteresis_a_grown_slice_leaves_the_reserve_free() {
        // Growing needs the reserve, a slice and the margin free, so right
        // after it the reserve is still free and nothing drains.
        let mut p = Policy::new(1024 * MIB, 512 * MIB, HOLD, 2);
        let t = Instant::now();
        let before = slices(&[(Serving, 0), (Released, 0)]);
        p.decide(t, Some(1536 * MIB + MARGIN), &before);
        assert_eq!(p.decide(t + HOLD, Some(1536 * MIB + MARGIN), &before), Some((Change::Grow(1), Why::Room)));
        let after = slices(&[(Serving, 0), (Serving, 0)]);
        assert_eq!(p.decide(t + HOLD, Some(1024 * MIB), &after), None);
    }

    #[test]
    fn resize_shrinks_at_once_and_grows_without_the_hold_off() {
        let mut p = Policy::new(0, 512 * MIB, HOLD, 4);
        let t = Instant::now();
        let s = slices(&[(Serving, 5), (Serving, 1), (Serving, 7), (Serving, 0)]);
        p.set_target(2);
        assert_eq!(p.decide(t, Some(0), &s), Some((Change::Drain(3), Why::Asked)));
        let s = slices(&[(Serving, 5), (Released, 0), (Serving, 7), (Released, 0)]);
        assert_eq!(p.decide(t, Some(0), &s), None, "at the target");
        p.set_target(3);
        assert_eq!(p.decide(t, Some(0), &s), Some((Change::Grow(1), Why::Asked)), "no reserve: no room needed");
    }

    #[test]
    fn a_grow_asked_for_still_keeps_the_reserve() {
        let mut p = Policy::new(1024 * MIB, 512 * MIB, HOLD, 1);
        let t = Instant::now();
        let s = slices(&[(Serving, 5), (Released, 0)]);
        p.set_target(2);
        assert_eq!(p.decide(t, Some(1200 * MIB), &s), None, "no room for a slice above the reserve");
        assert_eq!(p.decide(t, Some(1600 * MIB), &s), Some((Change::Grow(1), Why::Asked)));
    }

    /// A grow asked for after the reserve took slices does not wait for
    /// the hold-off either, though the target did not change.
    #[test]
    fn resize_to_the_same_target_grows_at_once() {
        let mut p = Policy::new(1024 * MIB, 512 * MIB, HOLD, 2);
        let t = Instant::now();
        let s = slices(&[(Serving, 5), (Released, 0)]);
        assert_eq!(p.decide(t, Some(4096 * MIB), &s), None, "the hold-off runs");
        p.set_target(2);
        assert_eq!(p.decide(t, Some(4096 * MIB), &s), Some((Change::Grow(1), Why::Asked)));
    }

    #[test]
    fn a_failed_grow_waits_and_without_a_reserve_nothing_is_given_back() {
        let mut p = Policy::new(0, 512 * MIB, HOLD, 2);
        let t = Instant::now();
        let s = slices(&[(Serving, 5), (Released, 0)]);
        assert_eq!(p.decide(t, Some(0), &s), None, "no reserve: free memory means nothing");
        p.set_target(2);
        p.set_target(3);
        let s3 = slices(&[(Serving, 5), (Released, 0), (Released, 0)]);
        assert_eq!(p.decide(t, Some(0), &s3), Some((Change::Grow(1), Why::Asked)));
        p.grow_failed(t);
        assert_eq!(p.decide(t + RETRY / 2, Some(64 << 30), &s3), None, "too soon after a failure");
    }

    /// A grow asked for with no room is made once there is room, at once;
    /// after the reserve took that slice back, the next waits its hold-off.
    #[test]
    fn an_ask_ends_when_the_reserve_takes_its_slice_back() {
        let mut p = Policy::new(1024 * MIB, 512 * MIB, HOLD, 2);
        let t = Instant::now();
        let room = Some(1536 * MIB + MARGIN);
        p.set_target(3);
        let s = slices(&[(Serving, 5), (Released, 0), (Released, 0)]);
        assert_eq!(p.decide(t, Some(1200 * MIB), &s), None, "no room yet");
        let later = t + HOLD * 100;
        assert_eq!(p.decide(later, room, &s), Some((Change::Grow(1), Why::Asked)), "room: at once, as asked");
        let grown = slices(&[(Serving, 5), (Serving, 0), (Released, 0)]);
        assert_eq!(p.decide(later, Some(900 * MIB), &grown), Some((Change::Drain(1), Why::Reserve)));
        assert_eq!(p.decide(later + Duration::from_secs(1), room, &s), None, "the ask ended with the drain");
        assert_eq!(p.decide(later + HOLD + Duration::from_secs(1), room, &s), Some((Change::Grow(1), Why::Room)));
    }

    #[test]
    fn a_host_store_changes_only_when_asked() {
        let mut p = Policy::new(0, 512 * MIB, HOLD, 2);
        let t = Instant::now();
        let s = slices(&[(Serving, 5), (Serving, 0)]);
        assert_eq!(p.decide(t, None, &s), None);
        p.set_target(1);
        assert_eq!(p.decide(t, None, &s), Some((Change::Drain(1), Why::Asked)));
        let s = slices(&[(Serving, 5), (Released, 0)]);
        p.set_target(2);
        assert_eq!(p.decide(t, None, &s), Some((Change::Grow(1), Why::Asked)));
    }
}
