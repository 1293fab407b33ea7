//! Serving threads: one per connection of a device, each with its own
//! store (for VRAM: stream, kernels, pinned staging) and buffers, made on
//! that thread and kept there. Only the store's memory and the CUDA
//! context are shared.

use std::ops::Range;
use std::sync::{mpsc, Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, Scope, ScopedJoinHandle};

use crate::fail::{Code, Failure};
use crate::nbd::transmit::Buffers;
use crate::store::{Backing, Store};
use crate::tuning::Tuning;

/// A serving thread's stack: the loop keeps its buffers on the heap.
const STACK: usize = 1024 * 1024;

/// One connection's store and buffers, dropped in that order: the store
/// waits for the copies it still has to or from staging, and ends its
/// mailbox kernel, before the staging is freed (freeing waits until every
/// kernel has been told to end, `cuda::gate`, this one too).
pub struct Conn<'b, B: Backing + 'b> {
    pub store: B::Store<'b>,
    pub bufs: Buffers<<B::Store<'b> as Store>::Buf>,
}

/// Opens a connection's store and allocates its buffers, with `staging`
/// bytes of staging, on this thread.
pub fn open<'b, B: Backing>(backing: &'b B, tuning: &Tuning, staging: usize) -> Result<Conn<'b, B>, Failure> {
    let mut store = backing.open().map_err(|e| Failure::os("opening the store", e))?;
    let bufs = Buffers::with_staging(&mut store, tuning, staging).map_err(|e| Failure::os("allocating staging buffers", e))?;
    Ok(Conn { store, bufs })
}

/// Starts a thread per index of `ids`, named `name-INDEX`, that opens its
/// connection and then runs `work` on it; returns once every one has
/// opened its own, so that nothing is served before all memory is taken.
/// If one cannot, none serves: all end, and the first failure is returned.
/// A thread that served returns `Some` of what `work` returned.
pub fn spawn<'s, 'b, B, R, F>(
    s: &'s Scope<'s, '_>,
    backing: &'b B,
    tuning: &'b Tuning,
    staging: usize,
    name: &str,
    ids: Range<usize>,
    work: &'s F,
) -> Result<Vec<ScopedJoinHandle<'s, Option<R>>>, Failure>
where
    'b: 's,
    B: Backing,
    F: Fn(usize, Conn<'b, B>) -> R + Sync,
    R: Send + 's,
{
    let decision = Arc::new((Mutex::new(None::<bool>), Condvar::new()));
    let (tell, told) = mpsc::channel();
    let mut handles = Vec::with_capacity(ids.len());
    let mut failure = None;
    for i in ids {
        let (tell, decision) = (tell.clone(), Arc::clone(&decision));
        let spawned = thread::Builder::new().name(format!("{name}-{i}")).stack_size(STACK).spawn_scoped(s, move || {
            let (conn, opened) = match open(backing, tuning, staging) {
                Ok(conn) => (Some(conn), Ok(())),
                Err(f) => (None, Err(f)),
            };
            let _ = tell.send(opened);
            drop(tell); // so that a thread that dies cannot leave the count waiting
            let (go, decided) = &*decision;
            let mut go = go.lock().unwrap_or_else(PoisonError::into_inner);
            while go.is_none() {
                go = decided.wait(go).unwrap_or_else(PoisonError::into_inner);
            }
            let serve = *go == Some(true);
            drop(go);
            conn.filter(|_| serve).map(|conn| work(i, conn))
        });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                failure = Some(Failure::os("starting a serving thread", e));
                break;
            }
        }
    }
    drop(tell);
    let mut heard = 0;
    for opened in told.iter() {
        heard += 1;
        if let (Err(f), None) = (opened, &failure) {
            failure = Some(f);
        }
    }
    if heard < handles.len() && failure.is_none() {
        failure = Some(Failure::new(Code::Other, "a serving thread ended before it had opened its store"));
    }
    let (go, decided) = &*decision;
    *go.lock().unwrap_or_else(PoisonError::into_inner) = Some(failure.is_none());
    decided.notify_all();
    match failure {
        None => Ok(handles),
        Some(f) => {
            handles.into_iter().for_each(|h| drop(h.join()));
            Err(f)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{HostBacking, HostStore};
    use std::io;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Host memory whose `fail`-th open (from 1) fails.
    struct Flaky {
        inner: HostBacking,
        opens: AtomicUsize,
        fail: usize,
    }

    impl Backing for Flaky {
        type Store<'a> = HostStore<'a>;

        fn size(&self) -> u64 {
            self.inner.size()
        }

        fn open(&self) -> io::Result<HostStore<'_>> {
            match self.opens.fetch_add(1, Ordering::SeqCst) + 1 {
                n if n == self.fail => Err(io::Error::from_raw_os_error(libc::ENOMEM)),
                _ => self.inner.open(),
            }
        }
    }

    fn start(fail: usize) -> (Result<Vec<usize>, String>, usize) {
        let backing = Flaky { inner: HostBacking::new(1 << 20).unwrap(), opens: AtomicUsize::new(0), fail };
        let served = AtomicUsize::new(0);
        let work = |i: usize, _conn: Conn<Flaky>| {
            served.fetch_add(1, Ordering::SeqCst);
            i
        };
        let tuning = Tuning::default();
        let got = thread::scope(|s| {
            spawn(s, &backing, &tuning, 1 << 20, "test", 0..4, &work)
                .map(|handles| handles.into_iter().filter_map(|h| h.join().unwrap()).collect())
                .map_err(|f| f.to_string())
        });
        (got, served.load(Ordering::SeqCst))
    }

    #[test]
    fn every_thread_serves_once_all_have_opened_their_store() {
        let (got, served) = start(0);
        assert_eq!(got, Ok(vec![0, 1, 2, 3]));
        assert_eq!(served, 4);
    }

    #[test]
    fn if_one_thread_cannot_open_its_store_none_serves() {
        let (got, served) = start(3);
        assert!(got.as_ref().is_err_and(|e| e.contains("opening the store")), "{got:?}");
        assert_eq!(served, 0, "a thread served although another could not open its store");
    }
}
