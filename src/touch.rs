//! Memory touched before serving: a swap server must never fault in a
//! fresh page while it serves, which under memory pressure waits for
//! reclaim, and after `pressure`'s `MCL_ONFAULT` fallback is locked only
//! once touched. Allocating is not touching: `vec![0; n]` gets zeroes from
//! calloc, which takes fresh pages from mmap and leaves them alone.

use std::io;

/// `len` zero bytes, every page touched now; ENOMEM where they cannot be
/// had.
pub fn zeroed(len: usize) -> io::Result<Box<[u8]>> {
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(len).map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
    bytes.resize(len, 0);
    // Writes the compiler cannot turn into a zeroed allocation: one in
    // every page (4096 apart, and the last byte).
    for at in (0..len).step_by(4096).chain(len.checked_sub(1)) {
        // SAFETY: `at < len`: a valid, initialised byte of `bytes`.
        unsafe { std::ptr::write_volatile(bytes.as_mut_ptr().add(at), 0) };
    }
    Ok(bytes.into_boxed_slice())
}

/// Touches every page of `v`'s spare capacity now, as `zeroed` does its
/// bytes: what a vector made with capacity takes while serving.
pub fn spare<T>(v: &mut Vec<T>) {
    if std::mem::size_of::<T>() == 0 {
        return; // no memory behind it
    }
    let spare = v.spare_capacity_mut();
    let step = (4096 / std::mem::size_of::<T>()).max(1);
    for at in (0..spare.len()).step_by(step).chain(spare.len().checked_sub(1)) {
        // SAFETY: `at` lies in the spare capacity, which may be written
        // with anything a `MaybeUninit<T>` holds.
        unsafe { std::ptr::write_volatile(spare.as_mut_ptr().add(at), std::mem::MaybeUninit::zeroed()) };
    }
}

/// Stack a serving thread may use below the frame that calls `stack`.
pub const STACK: usize = 256 * 1024;

/// Touches `STACK` bytes of the calling thread's stack below this call,
/// so that the calls made while serving find their pages there. Call
/// before serving, on a thread whose stack has room for it.
#[inline(never)]
pub fn stack() {
    let mut below = std::mem::MaybeUninit::<[u8; STACK]>::uninit();
    let at = below.as_mut_ptr().cast::<u8>();
    for page in (0..STACK).step_by(4096) {
        // SAFETY: `page < STACK`: inside `below`, which may be written.
        unsafe { std::ptr::write_volatile(at.add(page), 0) };
    }
    std::hint::black_box(&below);
}

/// Whether every whole page of the `len` bytes at `at` is in RAM now
/// (mincore(2)); they need not be initialised.
#[cfg(test)]
pub fn resident<T>(at: *const T, len: usize) -> bool {
    let start = (at as usize).next_multiple_of(4096);
    let end = (at as usize + len) & !4095;
    let mut pages = vec![1u8; end.saturating_sub(start) / 4096];
    // SAFETY: mincore only asks the kernel about [start, end), page-aligned,
    // and writes one byte per page of it into `pages`, which has as many.
    let r = unsafe { libc::mincore(start as *mut libc::c_void, end.saturating_sub(start), pages.as_mut_ptr()) };
    r == 0 && pages.iter().all(|p| p & 1 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touched_bytes_are_in_ram_at_once() {
        let bytes = zeroed(1 << 20).unwrap();
        assert!(bytes.iter().all(|&b| b == 0));
        assert!(resident(bytes.as_ptr(), bytes.len()), "untouched pages");
        // SAFETY: a fresh private mapping, unmapped below, never touched.
        let fresh = unsafe { libc::mmap(std::ptr::null_mut(), 1 << 20, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        assert_ne!(fresh, libc::MAP_FAILED);
        assert!(!resident(fresh.cast::<u8>(), 1 << 20), "fresh pages counted as touched: this test proves nothing");
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(fresh, 1 << 20) };
        assert!(zeroed(usize::MAX / 2).is_err());
        let mut v: Vec<u64> = Vec::with_capacity(1 << 17);
        spare(&mut v);
        assert!(resident(v.as_ptr(), v.capacity() * 8), "untouched capacity");
    }

    #[test]
    fn the_stack_a_serving_thread_uses_is_in_ram_at_once() {
        let below = |touch: bool| {
            std::thread::Builder::new()
                .stack_size(4 * STACK)
                .spawn(move || {
                    let here = 0u8;
                    let top = std::hint::black_box(&here) as *const u8 as usize;
                    if touch {
                        stack();
                    }
                    // Past this frame and `stack`'s own, well inside its array.
                    resident((top - STACK + 16384) as *const u8, STACK - 32768)
                })
                .unwrap()
                .join()
                .unwrap()
        };
        assert!(!below(false), "a fresh stack counted as touched: this test proves nothing");
        assert!(below(true), "untouched stack");
    }
}
