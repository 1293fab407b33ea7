//! `fill`: bytes written for a device to read next, sent to memory around
//! the CPU caches.
//!
//! A write payload copied into staging the usual way is still in the
//! copying core's cache when the GPU reads it. With several connections
//! writing at once, those reads and the cores' own copies slowed each
//! other: on an H200, 128 KiB writes at 4 and 8 connections went 1.3–1.7×
//! faster landed with streaming stores (docs/performance.md, "Several
//! connections"). Elsewhere than x86-64 the bytes are copied as usual.

/// Memory being filled with streaming stores, front to back, each byte
/// once. Only `fill` makes one, and fences after it.
pub struct Uncached<'a> {
    dst: &'a mut [u8],
    at: usize,
}

impl Uncached<'_> {
    /// Copies `src` after what was put before.
    pub fn put(&mut self, src: &[u8]) {
        stream(&mut self.dst[self.at..self.at + src.len()], src);
        self.at += src.len();
    }
}

/// Runs `put_all` to fill `dst` with streaming stores, then issues the
/// store fence that orders them before whatever the thread does next
/// (reusing `dst`, handing it to the device), on every way out of it.
pub fn fill<R>(dst: &mut [u8], put_all: impl FnOnce(&mut Uncached) -> R) -> R {
    struct Fence;
    impl Drop for Fence {
        fn drop(&mut self) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: SSE is part of every x86-64 CPU; a fence touches no memory.
            unsafe {
                std::arch::x86_64::_mm_sfence();
            }
        }
    }
    let _fence = Fence;
    put_all(&mut Uncached { dst, at: 0 })
}

#[cfg(target_arch = "x86_64")]
fn stream(dst: &mut [u8], src: &[u8]) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
    // Streaming stores go 16 bytes at a time to 16-byte boundaries; the
    // ends around them are copied as usual.
    let head = dst.as_ptr().align_offset(16).min(dst.len());
    let body = (dst.len() - head) & !15;
    let (dst_head, rest) = dst.split_at_mut(head);
    let (dst_body, dst_tail) = rest.split_at_mut(body);
    let (src_head, rest) = src.split_at(head);
    let (src_body, src_tail) = rest.split_at(body);
    dst_head.copy_from_slice(src_head);
    for (d, s) in dst_body.chunks_exact_mut(16).zip(src_body.chunks_exact(16)) {
        // SAFETY: `d` is 16 writable bytes at a 16-byte boundary (the body
        // starts at one and goes in steps of 16), `s` 16 readable ones
        // (an unaligned load); SSE2 is part of every x86-64 CPU.
        unsafe { _mm_stream_si128(d.as_mut_ptr().cast::<__m128i>(), _mm_loadu_si128(s.as_ptr().cast::<__m128i>())) };
    }
    dst_tail.copy_from_slice(src_tail);
}

#[cfg(not(target_arch = "x86_64"))]
fn stream(dst: &mut [u8], src: &[u8]) {
    dst.copy_from_slice(src);
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_byte_lands_whatever_the_alignment_and_length() {
        let src: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        for start in [0, 1, 7, 15, 16, 17, 63] {
            for len in [0, 1, 15, 16, 17, 31, 100, 1000, 4000] {
                let mut dst = vec![0xAAu8; 4200];
                super::fill(&mut dst[start..start + len], |out| {
                    let third = len / 3;
                    out.put(&src[..third]);
                    out.put(&src[third..len]);
                });
                assert_eq!(&dst[start..start + len], &src[..len], "start {start}, length {len}");
                assert!(dst[..start].iter().chain(&dst[start + len..]).all(|&b| b == 0xAA), "start {start}, length {len}: a byte outside");
            }
        }
    }
}
