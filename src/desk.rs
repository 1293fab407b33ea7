//! Serve mode's front desk: the thread that accepts clients hands each to
//! a serving thread that is free, or turns it away when none becomes free
//! in time. Allocates nothing after it is made.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

pub struct Desk<C> {
    state: Mutex<State<C>>,
    /// A client was handed to a thread.
    handed: Condvar,
    /// A thread became free.
    freed: Condvar,
}

struct State<C> {
    /// Threads waiting for a client, by index.
    free: Vec<usize>,
    /// A client handed to thread `i`, until it takes it.
    handed: Vec<Option<C>>,
}

impl<C> Desk<C> {
    pub fn new(threads: usize) -> Desk<C> {
        let state = State { free: Vec::with_capacity(threads), handed: (0..threads).map(|_| None).collect() };
        Desk { state: Mutex::new(state), handed: Condvar::new(), freed: Condvar::new() }
    }

    pub fn threads(&self) -> usize {
        self.lock().handed.len()
    }

    fn lock(&self) -> MutexGuard<'_, State<C>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Thread `i` is free: waits until a client is handed to it.
    pub fn next(&self, i: usize) -> C {
        let mut state = self.lock();
        state.free.push(i); // within capacity: each thread is in it at most once
        self.freed.notify_one();
        loop {
            if let Some(client) = state.handed[i].take() {
                return client;
            }
            state = self.handed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Hands `client` to a free thread, waiting up to `grace` for one
    /// (`None`: for ever); gives it back if none became free.
    pub fn hand(&self, client: C, grace: Option<Duration>) -> Result<(), C> {
        let until = grace.map(|g| Instant::now() + g);
        let mut state = self.lock();
        let i = loop {
            if let Some(i) = state.free.pop() {
                break i;
            }
            state = match until.map(|t| t.saturating_duration_since(Instant::now())) {
                None => self.freed.wait(state).unwrap_or_else(PoisonError::into_inner),
                Some(Duration::ZERO) => return Err(client),
                Some(left) => self.freed.wait_timeout(state, left).unwrap_or_else(PoisonError::into_inner).0,
            };
        };
        state.handed[i] = Some(client);
        self.handed.notify_all();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn clients_go_to_free_threads_and_wait_or_are_turned_away() {
        let desk = Desk::new(2);
        thread::scope(|s| {
            let taken: Vec<_> = (0..2).map(|i| s.spawn({ let desk = &desk; move || desk.next(i) })).collect();
            assert_eq!(desk.hand(10, None), Ok(()));
            assert_eq!(desk.hand(11, Some(Duration::from_secs(5))), Ok(()));
            let mut got: Vec<u32> = taken.into_iter().map(|t| t.join().unwrap()).collect();
            got.sort();
            assert_eq!(got, [10, 11]);
            // Both threads busy now: a third client is turned away after the grace.
            let t = Instant::now();
            assert_eq!(desk.hand(12, Some(Duration::from_millis(50))), Err(12));
            assert!(t.elapsed() >= Duration::from_millis(50));
            // A thread that frees up within the grace takes it.
            let late = s.spawn(|| {
                thread::sleep(Duration::from_millis(20));
                desk.next(1)
            });
            assert_eq!(desk.hand(13, Some(Duration::from_secs(5))), Ok(()));
            assert_eq!(late.join().unwrap(), 13);
        });
    }
}
