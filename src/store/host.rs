//! `HostBacking`: the bytes live in ordinary RAM (serve mode, tests,
//! baseline), shared by every connection's `HostStore`.

use std::io;
use std::ops::Range;

use super::{Backing, Done, Store};
use crate::touch;

pub struct HostBacking {
    /// A leaked `Box<[u8]>`, freed by `Drop`. Held as a raw pointer because
    /// several connections' threads read and write it at once, which no
    /// Rust reference may express.
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the bytes are plain memory that `HostBacking` owns; threads reach
// them only through `HostStore`, each access inside them (`HostStore::span`)
// and inside the range its own request names. Two connections meet on the
// same bytes only when their clients send overlapping requests at once,
// which NBD leaves undefined, as a disk does; the serve loop then hands
// these bytes to the kernel (recv into them, writev from them) or copies
// them whole, and no code of ours reads a value another thread may be
// changing and relies on it.
unsafe impl Sync for HostBacking {}
// SAFETY: as above; ownership of the allocation may move between threads.
unsafe impl Send for HostBacking {}

impl HostBacking {
    /// Allocates and touches every page now, so that serving never faults
    /// in fresh memory (and an impossible size fails here, not mid-I/O).
    pub fn new(size: u64) -> io::Result<HostBacking> {
        let len = usize::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
        let ptr = Box::into_raw(touch::zeroed(len)?).cast::<u8>();
        Ok(HostBacking { ptr, len })
    }
}

impl Drop for HostBacking {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `len` came from `Box::into_raw` in `new`, and
        // every `HostStore` borrowing this has been dropped.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.len)) });
    }
}

impl Backing for HostBacking {
    type Store<'a> = HostStore<'a>;

    fn size(&self) -> u64 {
        self.len as u64
    }

    fn open(&self) -> io::Result<HostStore<'_>> {
        Ok(HostStore { backing: self })
    }
}

/// One connection's access to a `HostBacking`: every operation is done
/// when it returns, and the serve loop reads and writes the bytes in place.
pub struct HostStore<'a> {
    backing: &'a HostBacking,
}

impl HostStore<'_> {
    fn span(&self, offset: u64, len: usize) -> Option<Range<usize>> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len).filter(|&e| e <= self.backing.len)?;
        Some(start..end)
    }

    fn range(&mut self, offset: u64, len: usize) -> io::Result<&mut [u8]> {
        self.landing(offset, len).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
    }
}

impl Store for HostStore<'_> {
    type Buf = Box<[u8]>;

    fn staging(&mut self, len: usize) -> io::Result<Box<[u8]>> {
        touch::zeroed(len)
    }

    fn bytes(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let span = self.span(offset, len)?;
        // SAFETY: `span` lies inside the allocation, which outlives `self`;
        // another connection may write these bytes meanwhile only when its
        // client overlaps this one's request (see `HostBacking`'s Sync).
        Some(unsafe { std::slice::from_raw_parts(self.backing.ptr.add(span.start), span.len()) })
    }

    fn landing(&mut self, offset: u64, len: usize) -> Option<&mut [u8]> {
        let span = self.span(offset, len)?;
        // SAFETY: as in `bytes`; `&mut self` keeps this connection from
        // holding another view of them at once.
        Some(unsafe { std::slice::from_raw_parts_mut(self.backing.ptr.add(span.start), span.len()) })
    }

    /// Copies nothing: the reply is sent from the store's own bytes.
    unsafe fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<Done> {
        self.range(offset, buf.len())?;
        Ok(Done::Lent)
    }

    unsafe fn write(&mut self, offset: u64, buf: &[u8]) -> io::Result<Done> {
        self.range(offset, buf.len())?.copy_from_slice(buf);
        Ok(Done::Finished)
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<Done> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        self.range(offset, len)?.fill(0);
        Ok(Done::Finished)
    }

    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_read_back_and_zero_clears() {
        let backing = HostBacking::new(8192).unwrap();
        let mut s = backing.open().unwrap();
        // SAFETY: the host store copies at once or lends its bytes, and
        // leaves nothing queued (so for every read and write of these tests).
        assert_eq!(unsafe { s.write(4090, &[7; 10]) }.unwrap(), Done::Finished);
        // SAFETY: as above.
        assert_eq!(unsafe { s.read(4089, &mut [0u8; 12]) }.unwrap(), Done::Lent);
        assert_eq!(s.bytes(4089, 12).unwrap(), [0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 0]);
        s.trim(4092, 4).unwrap();
        assert_eq!(s.bytes(4089, 12).unwrap(), [0, 7, 7, 0, 0, 0, 0, 7, 7, 7, 7, 0]);
        s.landing(4096, 2).unwrap().copy_from_slice(&[9, 9]);
        assert_eq!(s.bytes(4095, 4).unwrap(), [0, 9, 9, 7]);
    }

    #[test]
    fn out_of_range_is_einval_not_a_panic() {
        let backing = HostBacking::new(4096).unwrap();
        let mut s = backing.open().unwrap();
        // SAFETY: as in `writes_read_back_and_zero_clears`.
        let err = unsafe { s.write(4095, &[1, 2]) }.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        assert!(s.zero(u64::MAX, 2).is_err());
        // SAFETY: as above.
        assert!(unsafe { s.read(4095, &mut [0; 2]) }.is_err());
        assert!(s.bytes(4095, 2).is_none() && s.landing(u64::MAX, 1).is_none());
        assert_eq!(s.bytes(4095, 1), Some(&[0u8][..]));
    }

    #[test]
    fn connections_share_the_bytes() {
        let backing = HostBacking::new(8192).unwrap();
        std::thread::scope(|s| {
            for i in 0..2u8 {
                let backing = &backing;
                // SAFETY: as in `writes_read_back_and_zero_clears`.
                s.spawn(move || unsafe { backing.open().unwrap().write(u64::from(i) * 4096, &[i + 1; 4096]) }.unwrap());
            }
        });
        let s = backing.open().unwrap();
        let buf = s.bytes(0, 8192).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 1) && buf[4096..].iter().all(|&b| b == 2));
    }
}
