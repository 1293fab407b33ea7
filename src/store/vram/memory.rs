//! `VramMemory`: the store's bytes, in one or more device allocations. It
//! is set up once and never changes after, so that copiers can share it;
//! what moves bytes in and out is the `Copier`'s.

use std::io;

use super::MIB;
use crate::cuda::{Context, DeviceMem, Error, CUDA_ERROR_OUT_OF_MEMORY};

/// The smallest chunk tried when the whole size will not come as one
/// allocation (fragmentation, or a per-allocation limit): CUDA's own
/// allocation granularity.
const MIN_CHUNK: u64 = 2 * MIB;

pub struct VramMemory<'c> {
    /// Every chunk but the last is `chunk_len` long.
    chunks: Vec<DeviceMem<'c>>,
    chunk_len: u64,
    size: u64,
}

impl<'c> VramMemory<'c> {
    /// `size` bytes in as few chunks as will come; `None` when the size
    /// does not fit in any chunking; other errors are real.
    pub fn allocate(ctx: &'c Context, size: u64) -> Result<Option<VramMemory<'c>>, Error> {
        Ok(allocate_chunks(ctx, size)?.map(|(chunks, chunk_len)| VramMemory { chunks, chunk_len, size }))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunks(&self) -> &[DeviceMem<'c>] {
        &self.chunks
    }

    /// Fresh VRAM holds whatever its last user left: never export that.
    pub fn clear(&self) -> Result<(), Error> {
        self.chunks.iter().try_for_each(DeviceMem::clear)
    }

    /// The (chunk index, offset in chunk, length) pieces of a byte range.
    pub fn piece_list(&self, offset: u64, len: u64) -> impl Iterator<Item = (usize, u64, u64)> {
        let chunk_len = self.chunk_len;
        let mut at = offset;
        let end = offset + len;
        let last = self.chunks.len() - 1;
        let tail = self.size - last as u64 * chunk_len;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let index = (at / chunk_len) as usize;
            let inner = at % chunk_len;
            let this_len = if index == last { tail } else { chunk_len };
            let n = (end - at).min(this_len - inner);
            at += n;
            Some((index, inner, n))
        })
    }

    /// `piece_list` with the chunks themselves.
    pub fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (&DeviceMem<'c>, u64, u64)> + '_ {
        self.piece_list(offset, len).map(|(index, inner, n)| (&self.chunks[index], inner, n))
    }

    pub fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
}

/// `None` when the size does not fit in any chunking; other errors are real.
fn allocate_chunks(ctx: &Context, size: u64) -> Result<Option<(Vec<DeviceMem<'_>>, u64)>, Error> {
    // The whole size, then powers of two below it, halving.
    let below = size.checked_next_power_of_two().map_or(1 << 63, |p| p / 2);
    let halves = std::iter::successors(Some(below), |c| Some(c / 2)).take_while(|&c| c >= MIN_CHUNK);
    let sizes = std::iter::once(size).chain(halves.filter(move |&c| c < size));
    'sizes: for chunk_len in sizes {
        let count = size.div_ceil(chunk_len);
        let mut chunks = Vec::with_capacity(count as usize);
        for i in 0..count {
            match ctx.alloc(chunk_len.min(size - i * chunk_len)) {
                Ok(mem) => chunks.push(mem),
                Err(e) if e.code == CUDA_ERROR_OUT_OF_MEMORY => continue 'sizes, // frees `chunks`
                Err(e) => return Err(e),
            }
        }
        return Ok(Some((chunks, chunk_len)));
    }
    Ok(None)
}
