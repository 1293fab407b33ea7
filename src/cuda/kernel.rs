//! The copy kernel: one launch moves a whole batch of small pieces, where
//! the copy engine spends about 2 µs on each (1.8 µs per 4 KiB write at
//! QD32, H200, 2026-12-02: docs/performance.md, "Copy engine and copy kernel"). It is PTX, which the driver compiles when it is loaded,
//! so building nbd-vram still needs no CUDA toolkit.

use std::ffi::{c_uint, c_void};

use super::sys::{CUfunction, CUmodule, CUresult, CUstream};
use super::{Context, CopyBatch, Error, Stream};

/// Block `b` copies piece `b`; each thread moves 16 bytes at a time, so a
/// piece's addresses and length are multiples of 16. Addresses are VRAM or
/// mapped pinned memory, which unified addressing puts in one space.
const PTX: &str = "\
.version 7.0
.target sm_75
.address_size 64

.visible .entry nbd_vram_copy(.param .u32 count, .param .align 8 .b8 pieces[3072])
{
	.reg .pred %p<3>;
	.reg .b32 %r<9>;
	.reg .b64 %rd<11>;

	mov.u32 %r1, %ctaid.x;
	ld.param.u32 %r2, [count];
	setp.ge.u32 %p1, %r1, %r2;
	@%p1 bra DONE;
	mov.u64 %rd1, pieces;
	mul.wide.u32 %rd2, %r1, 24;
	add.u64 %rd3, %rd1, %rd2;
	ld.param.u64 %rd4, [%rd3];
	ld.param.u64 %rd5, [%rd3+8];
	ld.param.u64 %rd6, [%rd3+16];
	mov.u32 %r3, %tid.x;
	mul.wide.u32 %rd7, %r3, 16;
	mov.u32 %r4, %ntid.x;
	mul.wide.u32 %rd8, %r4, 16;
LOOP:
	setp.ge.u64 %p2, %rd7, %rd6;
	@%p2 bra DONE;
	add.u64 %rd9, %rd5, %rd7;
	ld.global.v4.u32 {%r5, %r6, %r7, %r8}, [%rd9];
	add.u64 %rd10, %rd4, %rd7;
	st.global.v4.u32 [%rd10], {%r5, %r6, %r7, %r8};
	add.u64 %rd7, %rd7, %rd8;
	bra LOOP;
DONE:
	ret;
}
\0";

/// Pieces per launch: the size of the kernel's `pieces` parameter.
const PIECES: usize = 128;
/// A 4 KiB piece is one 16-byte move per thread.
const THREADS: u32 = 256;
/// Above this a piece goes to the copy engine, whose bandwidth is higher
/// than one block's.
const PIECE_MAX: usize = 64 * 1024;

/// Whether the kernel can move this piece.
pub(super) fn takes(dst: u64, src: u64, len: usize) -> bool {
    len <= PIECE_MAX && (dst | src | len as u64) % 16 == 0
}

/// The loaded kernel, unloaded on drop.
pub struct Mover<'c> {
    ctx: &'c Context,
    module: CUmodule,
    function: CUfunction,
    launch: LaunchKernel,
}

pub(super) type LaunchKernel = unsafe extern "C" fn(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, *mut *mut c_void, *mut *mut c_void) -> CUresult;

impl Context {
    /// Compiles and loads the copy kernel; `None` if this driver lacks the
    /// entry points for it.
    pub fn mover(&self) -> Option<Result<Mover<'_>, Error>> {
        let api = self.cuda.api;
        let (load, get, _, launch) = (api.cuModuleLoadData?, api.cuModuleGetFunction?, api.cuModuleUnload?, api.cuLaunchKernel?);
        let mut module: CUmodule = std::ptr::null_mut();
        // SAFETY: `PTX` is a NUL-terminated PTX text, as the call expects;
        // it writes one module handle to a live local.
        if let Err(e) = self.cuda.check("cuModuleLoadData", super::gate::alone(|| unsafe { load(&mut module, PTX.as_ptr().cast()) })) {
            return Some(Err(e));
        }
        // Owned from here, so that a failure below unloads it.
        let mut mover = Mover { ctx: self, module, function: std::ptr::null_mut(), launch };
        // SAFETY: the module is live; the name is NUL-terminated; writes one
        // function handle into `mover`.
        let r = unsafe { get(&mut mover.function, module, c"nbd_vram_copy".as_ptr()) };
        Some(self.cuda.check("cuModuleGetFunction", r).map(|()| mover))
    }
}

impl Drop for Mover<'_> {
    fn drop(&mut self) {
        if let Some(unload) = self.ctx.cuda.api.cuModuleUnload {
            // SAFETY: the module came from cuModuleLoadData and is unloaded
            // only here, after the store has synced the stream that ran it.
            let r = super::gate::alone(|| unsafe { unload(self.module) });
            if let Err(e) = self.ctx.cuda.check("cuModuleUnload", r) {
                crate::warn!("{e}");
            }
        }
    }
}

impl Stream<'_> {
    /// Queues the copy kernel over every piece of `batch`, `PIECES` a launch.
    pub fn launch(&self, mover: &Mover, batch: &CopyBatch) -> Result<(), Error> {
        let mut table = [[0u64; 3]; PIECES];
        for start in (0..batch.sizes.len()).step_by(PIECES) {
            let end = (start + PIECES).min(batch.sizes.len());
            let pieces = batch.dsts[start..end].iter().zip(&batch.srcs[start..end]).zip(&batch.sizes[start..end]);
            for (row, ((&dst, &src), &len)) in table.iter_mut().zip(pieces) {
                *row = [dst, src, len as u64];
            }
            let mut count = (end - start) as c_uint;
            let mut params: [*mut c_void; 2] = [(&raw mut count).cast(), table.as_mut_ptr().cast()];
            // SAFETY: `params` points at the kernel's two parameters, laid
            // out as the PTX declares them (u32, then 128 × {u64, u64, u64});
            // the driver copies them at the call. Every piece lies inside a
            // live allocation, or a pinned buffer kept until the kernel is
            // done (the promise of `CopyBatch::read` and `write`).
            let r = unsafe { (mover.launch)(mover.function, count, 1, 1, THREADS, 1, 1, 0, self.stream, params.as_mut_ptr(), std::ptr::null_mut()) };
            self.ctx.cuda.check("cuLaunchKernel", r)?;
        }
        Ok(())
    }
}
