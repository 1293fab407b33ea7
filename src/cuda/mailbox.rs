//! The mailbox kernel: one resident block that polls a job slot in mapped
//! pinned memory and copies between the VRAM it names and a landing buffer
//! there, or runs a list of small copies between VRAM and pinned memory.
//! A lone 4 KiB read then costs no launch and no copy-engine hand-over:
//! 3.4 µs against 7.0–8.0 µs for `cuMemcpyDtoHAsync` and
//! `cuStreamSynchronize` (H200, 2026-12-02, tests/gpu/dtoh-probe.c,
//! docs/performance.md, "The mailbox kernel"); a lone write is handed over with a memcpy
//! and a store, where `cuMemcpyHtoDAsync` costs the CPU 2.1–2.6 µs. A list
//! spares a batch the copy kernel's launch, event and wait.
//!
//! While it runs it holds one SM and keeps the GPU clocked up, and a
//! kernel that never ends shares the GPU badly with other processes'
//! work; so the store starts it only for copies in a row, and `park`
//! ends it whenever the serve loop sleeps, a client leaves, a batch comes
//! that it does not take, or a call that waits for every kernel is due
//! (`gate`).

use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::gate::{self, Admission};
use super::kernel::LaunchKernel;
use super::sys::{self, CUfunction, CUmodule};
use super::{Context, CopyBatch, DeviceMem, Error, Pinned, Stream};

/// A job is one 64-bit word in mapped pinned memory, so that the kernel
/// reads all of it in one single-copy-atomic access: the sequence (bits
/// 0-7), write (8), list (9), the length in 16-byte units or a list's
/// count (10-22) and the VRAM address's offset from `base` in 16-byte
/// units (23-63). The host writes it with release and thread 0 polls it
/// with a system-scope acquire, which orders every later read (a write's
/// data in the landing buffer, a list's rows) after it; the job's parts
/// in separate words would cost one more dependent read over PCIe (a 4
/// KiB read at queue depth 1 went 13-16 % slower that way on an H200),
/// and a vector load of them has no single-copy atomicity in the PTX
/// memory model, so it could pair a new sequence with an old address. The
/// block copies 16 bytes per thread per step between VRAM and the landing
/// buffer, bypassing L1, which copies by other kernels and the copy engine
/// do not keep coherent, and reading the landing buffer afresh each time;
/// then `bar.sync`, after which thread 0 alone writes the sequence to
/// `done` with a system-scope release, which orders every thread's copy
/// before it (one fence per job, not one per thread). Length 0 ends the
/// kernel. At start it writes `last`, the sequence it takes as done, to
/// `alive`. A list's pieces lie at byte 1024 of the slot page, 32 bytes
/// each (destination u64, source u64, length u32): each warp takes a
/// piece, or several warps share one when pieces are fewer than warps,
/// and moves 2 KiB of it per step, four 16-byte loads in flight per
/// thread, with the same cache rules. Inside the block the job travels in
/// the older form: address, then sequence and length with bit 31 for a
/// write and bit 30 for a list.
const PTX: &str = "\
.version 7.0
.target sm_75
.address_size 64

.visible .entry nbd_vram_mailbox(.param .u64 slot, .param .u64 landing, .param .u32 last, .param .u64 base)
.maxntid 1024, 1, 1
{
	.reg .pred %p<13>;
	.reg .b32 %r<44>;
	.reg .b64 %rd<16>;
	.shared .align 16 .b8 job[16];

	ld.param.u64 %rd1, [slot];
	ld.param.u64 %rd2, [landing];
	ld.param.u32 %r1, [last];
	ld.param.u64 %rd9, [base];
	mov.u32 %r2, %tid.x;
	mov.u32 %r10, %ntid.x;
	mul.lo.u32 %r10, %r10, 16;
	setp.ne.u32 %p1, %r2, 0;
	@%p1 bra TAKE;
	st.volatile.global.u32 [%rd1+128], %r1;
POLL:
	ld.acquire.sys.global.u64 %rd4, [%rd1];
	cvt.u32.u64 %r3, %rd4;
	and.b32 %r3, %r3, 0xff;
	setp.eq.u32 %p2, %r3, %r1;
	@%p2 bra POLL;
	shr.u64 %rd3, %rd4, 23;
	shl.b64 %rd3, %rd3, 4;
	add.u64 %rd3, %rd3, %rd9;
	shr.u64 %rd5, %rd4, 8;
	cvt.u32.u64 %r41, %rd5;
	shr.u32 %r11, %r41, 2;
	and.b32 %r11, %r11, 0x1fff;
	and.b32 %r42, %r41, 2;
	setp.eq.u32 %p12, %r42, 0;
	@%p12 shl.b32 %r11, %r11, 4;
	shl.b32 %r42, %r42, 29;
	and.b32 %r43, %r41, 1;
	shl.b32 %r43, %r43, 31;
	or.b32 %r11, %r11, %r42;
	or.b32 %r11, %r11, %r43;
	mov.b64 %rd4, {%r3, %r11};
	st.shared.v2.u64 [job], {%rd3, %rd4};
TAKE:
	bar.sync 0;
	ld.shared.v2.u64 {%rd3, %rd4}, [job];
	cvt.u32.u64 %r1, %rd4;
	shr.u64 %rd5, %rd4, 32;
	cvt.u32.u64 %r4, %rd5;
	setp.ge.u32 %p4, %r4, 0x80000000;
	and.b32 %r4, %r4, 0x7fffffff;
	setp.ge.u32 %p5, %r4, 0x40000000;
	@%p5 bra LIST;
	mul.lo.u32 %r5, %r2, 16;
COPY:
	setp.ge.u32 %p3, %r5, %r4;
	@%p3 bra COPIED;
	cvt.u64.u32 %rd6, %r5;
	add.u64 %rd7, %rd3, %rd6;
	add.u64 %rd8, %rd2, %rd6;
	@%p4 bra WRITE;
	ld.global.cg.v4.u32 {%r6, %r7, %r8, %r9}, [%rd7];
	st.global.v4.u32 [%rd8], {%r6, %r7, %r8, %r9};
	bra STEP;
WRITE:
	ld.global.cv.v4.u32 {%r6, %r7, %r8, %r9}, [%rd8];
	st.global.cg.v4.u32 [%rd7], {%r6, %r7, %r8, %r9};
STEP:
	add.u32 %r5, %r5, %r10;
	bra COPY;
LIST:
	and.b32 %r12, %r4, 0xffff;
	shr.u32 %r13, %r2, 5;
	and.b32 %r14, %r2, 31;
	shr.u32 %r15, %r10, 9;
	div.u32 %r16, %r15, %r12;
	max.u32 %r16, %r16, 1;
	div.u32 %r17, %r15, %r16;
	mul.lo.u32 %r20, %r17, %r16;
	setp.ge.u32 %p6, %r13, %r20;
	@%p6 bra COPIED;
	div.u32 %r18, %r13, %r16;
	rem.u32 %r19, %r13, %r16;
	mul.lo.u32 %r21, %r19, 2048;
	mul.lo.u32 %r23, %r14, 16;
	add.u32 %r21, %r21, %r23;
	mul.lo.u32 %r22, %r16, 2048;
PIECE:
	setp.ge.u32 %p7, %r18, %r12;
	@%p7 bra COPIED;
	mul.wide.u32 %rd10, %r18, 32;
	add.u64 %rd10, %rd1, %rd10;
	ld.global.cv.v2.u64 {%rd11, %rd12}, [%rd10+1024];
	ld.global.cv.u32 %r24, [%rd10+1040];
	mov.u32 %r25, %r21;
PART:
	setp.ge.u32 %p8, %r25, %r24;
	@%p8 bra NEXTPIECE;
	add.u32 %r26, %r25, 512;
	add.u32 %r27, %r25, 1024;
	add.u32 %r28, %r25, 1536;
	setp.lt.u32 %p9, %r26, %r24;
	setp.lt.u32 %p10, %r27, %r24;
	setp.lt.u32 %p11, %r28, %r24;
	cvt.u64.u32 %rd13, %r25;
	add.u64 %rd14, %rd12, %rd13;
	add.u64 %rd15, %rd11, %rd13;
	@%p4 bra LWRITE;
	ld.global.cg.v4.u32 {%r6, %r7, %r8, %r9}, [%rd14];
	@%p9 ld.global.cg.v4.u32 {%r29, %r30, %r31, %r32}, [%rd14+512];
	@%p10 ld.global.cg.v4.u32 {%r33, %r34, %r35, %r36}, [%rd14+1024];
	@%p11 ld.global.cg.v4.u32 {%r37, %r38, %r39, %r40}, [%rd14+1536];
	st.global.v4.u32 [%rd15], {%r6, %r7, %r8, %r9};
	@%p9 st.global.v4.u32 [%rd15+512], {%r29, %r30, %r31, %r32};
	@%p10 st.global.v4.u32 [%rd15+1024], {%r33, %r34, %r35, %r36};
	@%p11 st.global.v4.u32 [%rd15+1536], {%r37, %r38, %r39, %r40};
	bra LSTEP;
LWRITE:
	ld.global.cv.v4.u32 {%r6, %r7, %r8, %r9}, [%rd14];
	@%p9 ld.global.cv.v4.u32 {%r29, %r30, %r31, %r32}, [%rd14+512];
	@%p10 ld.global.cv.v4.u32 {%r33, %r34, %r35, %r36}, [%rd14+1024];
	@%p11 ld.global.cv.v4.u32 {%r37, %r38, %r39, %r40}, [%rd14+1536];
	st.global.cg.v4.u32 [%rd15], {%r6, %r7, %r8, %r9};
	@%p9 st.global.cg.v4.u32 [%rd15+512], {%r29, %r30, %r31, %r32};
	@%p10 st.global.cg.v4.u32 [%rd15+1024], {%r33, %r34, %r35, %r36};
	@%p11 st.global.cg.v4.u32 [%rd15+1536], {%r37, %r38, %r39, %r40};
LSTEP:
	add.u32 %r25, %r25, %r22;
	bra PART;
NEXTPIECE:
	add.u32 %r18, %r18, %r17;
	bra PIECE;
COPIED:
	bar.sync 0;
	@%p1 bra NEXT;
	st.release.sys.global.u32 [%rd1+64], %r1;
NEXT:
	setp.eq.u32 %p3, %r4, 0;
	@%p3 bra END;
	@%p1 bra TAKE;
	bra POLL;
END:
	ret;
}
\0";

/// Threads of the block: 32 warps, so that a batch of 16 4 KiB pieces is
/// one step of two warps each.
const THREADS: c_uint = 1024;
/// The largest job, the landing buffer's size: above it the copy engine's
/// bandwidth wins over one block's.
const LANDING: usize = 64 * 1024;
/// Byte offsets in the slot page: the job word, then flags the device
/// writes, each in its own cache line.
const JOB: usize = 0;
const DONE: usize = 64;
const ALIVE: usize = 128;
const LIST: usize = 1024;
const LIST_ROW: usize = 32;
/// Pieces a list holds: four times a full batch of 4 KiB requests, and
/// twice one whose every request is split at a chunk boundary.
const LIST_MAX: usize = 64;
const SLOT: usize = 4096;
const _: () = assert!(LIST + LIST_MAX * LIST_ROW <= SLOT);
/// The job word's fields (see `PTX`).
const SEQ_MASK: u32 = 0xff;
const WRITE: u64 = 1 << 8;
const LISTED: u64 = 1 << 9;
const LEN_SHIFT: u32 = 10;
const OFFSET_SHIFT: u32 = 23;
/// How often a wait asks the driver whether the kernel still runs.
const CHECK: Duration = Duration::from_micros(100);
/// How long a wait spins before it sleeps between looks, unless told
/// otherwise (`spin_for`): a job takes microseconds, so one still pending
/// by then waits for a time slice.
const SPIN: Duration = Duration::from_millis(1);
/// How long a job may take before it counts as failed: far beyond any
/// time slice another context gets, so only a kernel that is not being
/// scheduled at all (an MPS share too small, a stalled GPU) reaches it.
/// `wait`'s error names it in words: change both together.
const PATIENCE: Duration = Duration::from_secs(1);

enum State {
    Parked,
    /// Launched; running once `alive` reads this sequence.
    Starting(u32),
    Running,
    /// A job missed its deadline: told to end, never launched again.
    Abandoned,
}

/// The loaded kernel with its slot, landing buffer and stream. `Drop` ends
/// the kernel and waits for it before anything it uses is freed.
pub struct Mailbox<'c> {
    ctx: &'c Context,
    module: CUmodule,
    function: CUfunction,
    launch: LaunchKernel,
    stream: Stream<'c>,
    slot: Pinned<'c>,
    landing: Pinned<'c>,
    /// The last sequence posted.
    seq: u32,
    /// The lowest VRAM address the store has: jobs name offsets from it.
    base: u64,
    state: State,
    /// Held from the launch until the kernel is told to end (`gate`).
    admission: Option<Admission>,
    /// How long `wait` spins before it sleeps between looks.
    spin: Duration,
}

impl Context {
    /// Loads the mailbox kernel for copies to and from `memory`; `None` if
    /// this driver lacks an entry point for it, the GPU kills long kernels
    /// or the context may use no more SMs than `resident`, the mailbox
    /// kernels that may run at once (one per serving thread): they would
    /// hold every SM, and a job waiting for one would miss its deadline.
    pub fn mailbox(&self, memory: &[DeviceMem], resident: usize) -> Option<Result<Mailbox<'_>, Error>> {
        let api = self.cuda.api;
        let (load, get, launch) = (api.cuModuleLoadData?, api.cuModuleGetFunction?, api.cuLaunchKernel?);
        let attribute = api.cuDeviceGetAttribute?;
        api.cuModuleUnload?;
        api.cuStreamQuery?; // for `wait`, through `Stream::is_done`
        let mut limited: c_int = 0;
        // SAFETY: writes one int to a live local; the device is this context's.
        let r = unsafe { attribute(&mut limited, sys::CU_DEVICE_ATTRIBUTE_KERNEL_EXEC_TIMEOUT, self.device) };
        if let Err(e) = self.cuda.check("cuDeviceGetAttribute", r) {
            return Some(Err(e));
        }
        if limited != 0 {
            crate::info!("this GPU has a run time limit for kernels (it drives a display): no mailbox kernel");
            return None;
        }
        match self.sm_count() {
            Ok(sms) if (sms as usize) < resident + 1 => {
                let sm = if sms == 1 { "SM" } else { "SMs" };
                crate::info!("this context may use {sms} {sm}: no mailbox kernel, as {resident} of them would hold all");
                return None;
            }
            Ok(_) => {}
            Err(e) => return Some(Err(e)),
        }
        let stream = match self.stream_with(sys::CU_STREAM_NON_BLOCKING) {
            Ok(stream) => stream,
            Err(e) => return Some(Err(e)),
        };
        let (slot, landing) = match (self.pinned(SLOT), self.pinned(LANDING)) {
            (Ok(slot), Ok(landing)) => (slot, landing),
            (Err(e), _) | (_, Err(e)) => return Some(Err(e)),
        };
        let mut module: CUmodule = std::ptr::null_mut();
        // SAFETY: `PTX` is a NUL-terminated PTX text, as the call expects;
        // it writes one module handle to a live local.
        if let Err(e) = self.cuda.check("cuModuleLoadData", gate::alone(|| unsafe { load(&mut module, PTX.as_ptr().cast()) })) {
            return Some(Err(e));
        }
        // Owned from here, so that a failure below unloads it.
        let mut mailbox = Mailbox {
            ctx: self,
            module,
            function: std::ptr::null_mut(),
            launch,
            stream,
            slot,
            landing,
            seq: 0,
            base: memory.iter().map(|m| m.ptr).min().unwrap_or(0),
            state: State::Parked,
            admission: None,
            spin: SPIN,
        };
        mailbox.slot.fill(0);
        mailbox.landing.fill(0); // fault the pages in now, never while serving
        mailbox.u32_at(ALIVE).store(u32::MAX, Ordering::Relaxed); // no sequence posted
        // SAFETY: the module is live; the name is NUL-terminated; writes one
        // function handle into `mailbox`.
        let r = unsafe { get(&mut mailbox.function, module, c"nbd_vram_mailbox".as_ptr()) };
        Some(self.cuda.check("cuModuleGetFunction", r).map(|()| mailbox))
    }
}

impl Context {
    /// The SMs this context's kernels may use: its MPS share where the
    /// driver says one, else the device's.
    fn sm_count(&self) -> Result<u32, Error> {
        let api = self.cuda.api;
        if let Some(affinity) = api.cuCtxGetExecAffinity {
            let mut param = sys::CUexecAffinityParam { kind: sys::CU_EXEC_AFFINITY_TYPE_SM_COUNT, sm_count: 0 };
            // SAFETY: writes one CUexecAffinityParam to a live local; this
            // context is current on the calling thread.
            if unsafe { affinity(&mut param, sys::CU_EXEC_AFFINITY_TYPE_SM_COUNT) } == sys::CUDA_SUCCESS && param.sm_count > 0 {
                return Ok(param.sm_count);
            }
        }
        let Some(attribute) = api.cuDeviceGetAttribute else { return Ok(u32::MAX) };
        let mut sms: c_int = 0;
        // SAFETY: writes one int to a live local; the device is this context's.
        let r = unsafe { attribute(&mut sms, sys::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, self.device) };
        self.cuda.check("cuDeviceGetAttribute", r)?;
        Ok(sms.max(0) as u32)
    }
}

impl Mailbox<'_> {
    /// Whether a copy of `len` bytes is longer than any job.
    pub fn too_long(len: usize) -> bool {
        len > LANDING
    }

    /// Whether a job of `len` bytes at device address `vram` fits.
    pub fn takes(&self, vram: u64, len: usize) -> bool {
        let offset = vram.wrapping_sub(self.base);
        len > 0 && len <= LANDING && (vram | len as u64) % 16 == 0 && vram >= self.base && offset >> (64 - OFFSET_SHIFT + 4) == 0
    }

    fn u32_at(&self, at: usize) -> &AtomicU32 {
        // SAFETY: `at` is a 4-aligned offset inside the slot page, which
        // lives as long as `self`; the device writes it only as whole
        // aligned u32s, so atomic access is sound.
        unsafe { &*self.slot.ptr.add(at).cast::<AtomicU32>() }
    }

    fn job(&self) -> &AtomicU64 {
        // SAFETY: as in `u32_at`, 8-aligned; the device only reads it.
        unsafe { &*self.slot.ptr.add(JOB).cast::<AtomicU64>() }
    }

    /// Spins at most `spin` in `wait` before it sleeps between looks (a
    /// caller whose spinning would keep others off every CPU asks for less).
    pub fn spin_for(&mut self, spin: Duration) {
        self.spin = spin;
    }

    /// Whether jobs can be posted now.
    pub fn ready(&mut self) -> bool {
        if let State::Starting(seq) = self.state {
            if self.u32_at(ALIVE).load(Ordering::Acquire) == seq {
                self.state = State::Running;
            }
        }
        matches!(self.state, State::Running)
    }

    /// Launches the kernel if it is parked; it is ready some microseconds
    /// later. Queued behind the parked one, which has its order to end.
    /// Does nothing while a call that waits for every kernel is due.
    pub fn start(&mut self) -> Result<(), Error> {
        if !matches!(self.state, State::Parked) {
            return Ok(());
        }
        let Some(admission) = gate::admit() else { return Ok(()) };
        // The kernel before this one said it was alive with its sequence,
        // which this one's equals after a multiple of 256 jobs between them.
        self.u32_at(ALIVE).store(u32::MAX, Ordering::Relaxed);
        let (mut slot, mut landing, mut last, mut base) = (self.slot.ptr as u64, self.landing.ptr as u64, self.seq, self.base);
        let mut params: [*mut c_void; 4] = [(&raw mut slot).cast(), (&raw mut landing).cast(), (&raw mut last).cast(), (&raw mut base).cast()];
        // SAFETY: `params` points at the kernel's four parameters, laid out
        // as the PTX declares them (u64, u64, u32, u64); the driver copies
        // them at the call. The slot and landing buffer are mapped pinned memory
        // (one address space with unified addressing) that `Drop` frees only
        // after the kernel has ended.
        let r = unsafe { (self.launch)(self.function, 1, 1, 1, THREADS, 1, 1, 0, self.stream.stream, params.as_mut_ptr(), std::ptr::null_mut()) };
        self.ctx.cuda.check("cuLaunchKernel", r)?;
        self.state = State::Starting(self.seq);
        self.admission = Some(admission);
        Ok(())
    }

    /// Posts a read of `len` bytes at `src`, into the landing buffer; the
    /// caller has waited for the job before. Returns its sequence, for `wait`.
    pub fn post_read(&mut self, src: u64, len: usize) -> u32 {
        debug_assert!(self.takes(src, len));
        self.post(self.lone(src, len))
    }

    /// Posts a write of `data` to `dst`, through the landing buffer; the
    /// caller has waited for the job before. Returns its sequence.
    pub fn post_write(&mut self, dst: u64, data: &[u8]) -> u32 {
        debug_assert!(self.takes(dst, data.len()));
        self.landing[..data.len()].copy_from_slice(data);
        self.post(self.lone(dst, data.len()) | WRITE)
    }

    /// The job word of a lone copy, less its sequence.
    fn lone(&self, vram: u64, len: usize) -> u64 {
        (vram - self.base) >> 4 << OFFSET_SHIFT | (len as u64 >> 4) << LEN_SHIFT
    }

    /// Whether `batch` can go as a list: two pieces or more, each one the
    /// copy kernel takes (so 16-byte aligned and at most 64 KiB).
    pub fn takes_list(batch: &CopyBatch) -> bool {
        batch.small && (2..=LIST_MAX).contains(&batch.sizes.len())
    }

    /// Posts every copy of `batch` (to VRAM if `writes`) as one list.
    /// Returns its sequence.
    ///
    /// # Safety
    /// The job posted before is done (waited for): the rows rewritten here
    /// under a kernel still reading them could pair one piece's host
    /// address with another's length. The host sides are as
    /// `CopyBatch::read` and `write` promised them.
    pub unsafe fn post_list(&mut self, batch: &CopyBatch, writes: bool) -> u32 {
        debug_assert!(Mailbox::takes_list(batch));
        // Only the rows: the kernel may write its words before them meanwhile.
        let rows = self.slot.part_mut(LIST..self.slot.size()).chunks_exact_mut(LIST_ROW);
        for (row, ((&dst, &src), &len)) in rows.zip(batch.dsts.iter().zip(&batch.srcs).zip(&batch.sizes)) {
            row[..8].copy_from_slice(&dst.to_ne_bytes());
            row[8..16].copy_from_slice(&src.to_ne_bytes());
            row[16..20].copy_from_slice(&(len as u32).to_ne_bytes());
        }
        let write = if writes { WRITE } else { 0 };
        self.post((batch.sizes.len() as u64) << LEN_SHIFT | LISTED | write)
    }

    /// Posts the job `word` (its sequence added): one store, with release,
    /// as the kernel acquires it before reading a write's data or a list's
    /// rows. The sequence only has to differ from the one before, as the
    /// kernel takes a job when it differs from the last it took.
    fn post(&mut self, word: u64) -> u32 {
        self.seq = (self.seq + 1) & SEQ_MASK;
        self.job().store(u64::from(self.seq) | word, Ordering::Release);
        self.seq
    }

    /// Spins until job `seq` is done, then sleeps between looks. An error:
    /// the kernel failed, ended without doing it, or did not do it within
    /// `PATIENCE`, and the landing buffer holds nothing of it. In the last
    /// case the kernel is abandoned (see `abandon`).
    pub fn wait(&mut self, seq: u32) -> Result<(), Error> {
        let start = Instant::now();
        let mut asked = start;
        while self.u32_at(DONE).load(Ordering::Acquire) != seq {
            let waited = asked.elapsed();
            if waited < CHECK {
                std::hint::spin_loop();
                continue;
            }
            let ended = self.stream.is_done();
            if self.u32_at(DONE).load(Ordering::Acquire) == seq {
                break;
            }
            // An error: the kernel may still hold the job, so it is
            // never given another (the landing buffer or list it reads).
            match ended.inspect_err(|_| self.abandon())? {
                // Finished without an error, yet the job is not done.
                true => return Err(self.ctx.cuda.error("nbd_vram_mailbox ended early", sys::CUDA_ERROR_UNKNOWN)),
                false if start.elapsed() > PATIENCE => {
                    self.abandon();
                    return Err(self.ctx.cuda.error("nbd_vram_mailbox gave no answer within 1 s", sys::CUDA_ERROR_NOT_READY));
                }
                false if start.elapsed() > self.spin => std::thread::sleep(CHECK),
                false => {}
            }
            asked = Instant::now();
        }
        Ok(())
    }

    /// Tells a kernel that missed its deadline to end, for good. It may
    /// still do that job late (if it read the job before this), so the
    /// caller hands no work over until `may_run_late` says it has ended.
    fn abandon(&mut self) {
        self.post(0);
        self.state = State::Abandoned;
        self.admission = None;
    }

    /// Whether a wait missed its deadline: the kernel is never used again.
    pub fn abandoned(&self) -> bool {
        matches!(self.state, State::Abandoned)
    }

    /// An error while an abandoned kernel's stream still runs: it may yet
    /// do the job it missed the deadline of.
    pub fn may_run_late(&self) -> Result<(), Error> {
        match self.stream.is_done() {
            Ok(false) => Err(self.ctx.cuda.error("nbd_vram_mailbox may still do a job that missed its deadline", sys::CUDA_ERROR_NOT_READY)),
            // An error is a fault in the context, which ends every kernel
            // in it (tests/gpu/fault-probe.c).
            _ => Ok(()),
        }
    }

    /// Asks the driver whether the kernel's stream is done (the fake
    /// starts a kernel launched with `FAKE_CUDA_LATE_START` then).
    #[cfg(test)]
    pub fn stream_is_done(&self) -> Result<bool, Error> {
        self.stream.is_done()
    }

    /// The bytes of the last read done.
    pub fn landed(&self, len: usize) -> &[u8] {
        &self.landing[..len]
    }

    /// Tells a started kernel to end, without waiting for it; the caller
    /// has waited for its last job.
    pub fn park(&mut self) {
        if matches!(self.state, State::Starting(_) | State::Running) {
            self.post(0);
            self.state = State::Parked;
            self.admission = None;
        }
    }

    /// Whether the kernel runs and a call that waits for every kernel is
    /// due: the caller parks it now.
    pub fn holds_up_others(&self) -> bool {
        self.admission.is_some() && gate::wanted()
    }
}

impl Drop for Mailbox<'_> {
    fn drop(&mut self) {
        self.park();
        if let Err(e) = self.stream.sync() {
            crate::error!("{e}");
        }
        if let Some(unload) = self.ctx.cuda.api.cuModuleUnload {
            // SAFETY: the module came from cuModuleLoadData and is unloaded
            // only here, after the kernel has ended.
            if let Err(e) = self.ctx.cuda.check("cuModuleUnload", gate::alone(|| unsafe { unload(self.module) })) {
                crate::warn!("{e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{LANDING, LEN_SHIFT, LISTED, OFFSET_SHIFT, PTX, SEQ_MASK, WRITE};

    fn lines(pattern: &str) -> Vec<&'static str> {
        PTX.lines().map(str::trim).filter(|l| l.contains(pattern)).collect()
    }

    /// The poll reads the whole job in one load, a system-scope acquire of
    /// an aligned 64-bit word: single-copy atomic, and ordered before every
    /// later read of the job's data. No other read of the slot there.
    #[test]
    fn the_poll_acquires_the_whole_job_in_one_load() {
        let poll = PTX.split("POLL:").nth(1).and_then(|rest| rest.split("TAKE:").next()).unwrap_or_default();
        let loads: Vec<&str> = poll.lines().map(str::trim).filter(|l| l.contains("ld.")).collect();
        assert_eq!(loads, ["ld.acquire.sys.global.u64 %rd4, [%rd1];"]);
        assert!(lines("ld.volatile").is_empty() && lines("ld.relaxed").is_empty(), "{:?}", lines("ld."));
    }

    /// The job word's fields as the kernel unpacks them.
    #[test]
    fn the_job_word_packs_what_the_kernel_unpacks() {
        for (shift, mask) in [("shr.u64 %rd3, %rd4, 23;", ""), ("shr.u64 %rd5, %rd4, 8;", "and.b32 %r11, %r11, 0x1fff;")] {
            assert_eq!(lines(shift).len(), 1, "{shift}");
            assert!(mask.is_empty() || lines(mask).len() == 1, "{mask}");
        }
        assert_eq!((OFFSET_SHIFT, LEN_SHIFT, WRITE, LISTED, SEQ_MASK), (23, 10, 1 << 8, 1 << 9, 0xff));
        // The longest job, 64 KiB, is 4096 units of 16 bytes: 13 bits.
        assert!((LANDING as u64 >> 4) < 1 << (OFFSET_SHIFT - LEN_SHIFT));
    }

    /// `done` is published once per job, by one release at system scope
    /// after the block's barrier: no per-thread fence, no plain store.
    #[test]
    fn done_is_published_by_one_release_after_the_barrier() {
        assert_eq!(lines("st.release.sys.global.u32 [%rd1+64]"), ["st.release.sys.global.u32 [%rd1+64], %r1;"]);
        assert_eq!(lines("st.release").len(), 1);
        assert!(lines("membar").is_empty() && lines("fence.").is_empty(), "no other fence");
        let copied = PTX.split("COPIED:").nth(1).unwrap_or_default();
        let barrier = copied.find("bar.sync 0;").expect("a barrier after the copy");
        let thread0 = copied.find("@%p1 bra NEXT;").expect("threads but 0 skip the release");
        let release = copied.find("st.release.sys").expect("the release");
        assert!(barrier < thread0 && thread0 < release);
    }

    /// Host memory (the landing buffer, a list's rows and the staging a
    /// list writes from) is read past L1, which the host's writes do not
    /// reach, and afresh each time.
    #[test]
    fn host_memory_is_read_past_l1() {
        let section = |from: &str, to: &str| PTX.split(from).nth(1).and_then(|r| r.split(to).next()).unwrap_or_default();
        let host_reads = [section("\nWRITE:", "STEP:"), section("LWRITE:", "LSTEP:"), section("PIECE:", "PART:")];
        let loads: Vec<&str> = host_reads.iter().flat_map(|s| s.lines()).map(str::trim).filter(|l| l.contains("ld.")).collect();
        assert_eq!(loads.len(), 7, "{loads:?}");
        assert!(loads.iter().all(|l| l.contains("ld.global.cv.")), "{loads:?}");
    }
}
