//! `HostStore`: the bytes live in ordinary RAM (serve mode, tests, baseline).

use std::io;
use std::ops::Range;

use super::Store;

pub struct HostStore {
    bytes: Vec<u8>,
}

impl HostStore {
    /// Allocates and touches every page now, so that serving never faults
    /// in fresh memory (and an impossible size fails here, not mid-I/O).
    pub fn new(size: u64) -> io::Result<HostStore> {
        let len = usize::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
        let mut bytes = Vec::new();
        bytes
            .try_reserve_exact(len)
            .map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
        bytes.resize(len, 0);
        Ok(HostStore { bytes })
    }

    fn span(&self, offset: u64, len: usize) -> Option<Range<usize>> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len).filter(|&e| e <= self.bytes.len())?;
        Some(start..end)
    }

    fn range(&mut self, offset: u64, len: usize) -> io::Result<&mut [u8]> {
        self.bytes_mut(offset, len).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
    }
}

impl Store for HostStore {
    type Buf = Box<[u8]>;
    const IN_MEMORY: bool = true;

    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn staging(&mut self, len: usize) -> io::Result<Box<[u8]>> {
        let mut buf = Vec::new();
        buf.try_reserve_exact(len)
            .map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
        buf.resize(len, 0);
        Ok(buf.into_boxed_slice())
    }

    fn bytes(&self, offset: u64, len: usize) -> Option<&[u8]> {
        Some(&self.bytes[self.span(offset, len)?])
    }

    fn bytes_mut(&mut self, offset: u64, len: usize) -> Option<&mut [u8]> {
        let span = self.span(offset, len)?;
        Some(&mut self.bytes[span])
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.copy_from_slice(self.range(offset, buf.len())?);
        Ok(())
    }

    fn write(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.range(offset, buf.len())?.copy_from_slice(buf);
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        self.range(offset, len)?.fill(0);
        Ok(())
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
        let mut s = HostStore::new(8192).unwrap();
        s.write(4090, &[7; 10]).unwrap();
        let mut buf = [0u8; 12];
        s.read(4089, &mut buf).unwrap();
        assert_eq!(buf, [0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 0]);
        s.trim(4092, 4).unwrap();
        s.read(4089, &mut buf).unwrap();
        assert_eq!(buf, [0, 7, 7, 0, 0, 0, 0, 7, 7, 7, 7, 0]);
    }

    #[test]
    fn out_of_range_is_einval_not_a_panic() {
        let mut s = HostStore::new(4096).unwrap();
        let err = s.write(4095, &[1, 2]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        assert!(s.zero(u64::MAX, 2).is_err());
        assert!(s.bytes(4095, 2).is_none() && s.bytes_mut(u64::MAX, 1).is_none());
        assert_eq!(s.bytes(4095, 1), Some(&[0u8][..]));
    }
}
