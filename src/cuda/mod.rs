//! Safe owners over the CUDA driver API: every handle is freed by `Drop`,
//! every `CUresult` becomes an `Error` naming the call and CUDA's own words.

#[cfg(test)]
pub mod fake_tests;
pub(crate) mod gate;
mod kernel;
mod mailbox;
mod sys;

use std::ffi::{c_char, c_uint, c_void, CStr};
use std::fmt;
use std::ops::{Deref, DerefMut, Range};
use std::sync::atomic::{AtomicU64, Ordering};

use sys::{Api, CUcontext, CUdevice, CUdeviceptr, CUevent, CUresult, CUstream};

pub use kernel::Mover;
pub use mailbox::Mailbox;
pub use sys::{LoadError, CUDA_ERROR_NO_DEVICE, CUDA_ERROR_OUT_OF_MEMORY};
pub use sys::{CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE, CUDA_ERROR_SYSTEM_DRIVER_MISMATCH};

/// A failed driver call. Copy and allocation-free, so that the serve loop
/// can report one under memory pressure.
#[derive(Clone, Copy, Debug)]
pub struct Error {
    pub call: &'static str,
    pub code: CUresult,
    name: &'static str,
    text: &'static str,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}: {} ({}, code {})", self.call, self.name, self.text, self.code)
    }
}

impl std::error::Error for Error {}

/// The loaded driver. Cheap to copy: the table lives for the process.
#[derive(Clone, Copy)]
pub struct Cuda {
    api: &'static Api,
}

/// The library names tried when no path is given, most specific first.
pub const DEFAULT_LIBS: [&str; 2] = ["libcuda.so.1", "libcuda.so"];

impl Cuda {
    /// Loads libcuda (`path`, else `DEFAULT_LIBS`) and runs `cuInit`.
    pub fn init(path: Option<&str>) -> Result<Cuda, InitError> {
        let tried: Vec<&str> = path.map_or_else(|| DEFAULT_LIBS.to_vec(), |p| vec![p]);
        let api = sys::load(&tried).map_err(|e| InitError::Load(tried.join(", then "), e))?;
        let cuda = Cuda { api };
        // SAFETY: cuInit takes flags by value; 0 is the only valid value.
        cuda.check("cuInit", unsafe { (api.cuInit)(0) }).map_err(InitError::Init)?;
        Ok(cuda)
    }

    fn check(&self, call: &'static str, code: CUresult) -> Result<(), Error> {
        if code == sys::CUDA_SUCCESS {
            return Ok(());
        }
        Err(self.error(call, code))
    }

    /// `code` as an `Error` of `call`, in CUDA's words.
    fn error(&self, call: &'static str, code: CUresult) -> Error {
        let (mut name, mut text): (*const c_char, *const c_char) = (std::ptr::null(), std::ptr::null());
        // SAFETY: both calls write a pointer to a static string (or fail and
        // leave the null we passed); the library is never unloaded.
        let (name, text) = unsafe {
            (self.api.cuGetErrorName)(code, &mut name);
            (self.api.cuGetErrorString)(code, &mut text);
            (static_str(name), static_str(text))
        };
        Error { call, code, name: name.unwrap_or("CUDA_ERROR_UNKNOWN"), text: text.unwrap_or("unknown error") }
    }

    pub fn driver_version(&self) -> Result<i32, Error> {
        let mut v = 0;
        // SAFETY: writes one int to a live local.
        self.check("cuDriverGetVersion", unsafe { (self.api.cuDriverGetVersion)(&mut v) })?;
        Ok(v)
    }

    pub fn device_count(&self) -> Result<usize, Error> {
        let mut n = 0;
        // SAFETY: writes one int to a live local.
        self.check("cuDeviceGetCount", unsafe { (self.api.cuDeviceGetCount)(&mut n) })?;
        Ok(n.max(0) as usize)
    }

    pub fn device(&self, ordinal: u32) -> Result<Device, Error> {
        let mut handle = 0;
        let ordinal_c = i32::try_from(ordinal).unwrap_or(i32::MAX);
        // SAFETY: writes one CUdevice to a live local.
        self.check("cuDeviceGet", unsafe { (self.api.cuDeviceGet)(&mut handle, ordinal_c) })?;
        Ok(Device { cuda: *self, handle })
    }
}

/// Why CUDA could not start, kept apart so that the message can say what
/// to do about each cause.
#[derive(Debug)]
pub enum InitError {
    Load(String, LoadError),
    Init(Error),
}

/// # Safety
/// `p` is null or points to a NUL-terminated string that lives as long as
/// the process.
unsafe fn static_str(p: *const c_char) -> Option<&'static str> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null, and static by the caller's promise.
    unsafe { CStr::from_ptr(p) }.to_str().ok()
}

#[derive(Clone, Copy)]
pub struct Device {
    cuda: Cuda,
    handle: CUdevice,
}

impl Device {
    pub fn name(&self) -> Result<String, Error> {
        let mut buf = [0 as c_char; 256];
        // SAFETY: the driver writes at most `len` bytes, NUL included.
        let r = unsafe { (self.cuda.api.cuDeviceGetName)(buf.as_mut_ptr(), buf.len() as i32, self.handle) };
        self.cuda.check("cuDeviceGetName", r)?;
        // SAFETY: the driver NUL-terminated it within the buffer.
        Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
    }

    pub fn total_mem(&self) -> Result<u64, Error> {
        let mut n = 0usize;
        // SAFETY: writes one size_t to a live local.
        self.cuda.check("cuDeviceTotalMem_v2", unsafe { (self.cuda.api.cuDeviceTotalMem_v2)(&mut n, self.handle) })?;
        Ok(n as u64)
    }

    /// Retains the device's primary context (the one the runtime API
    /// shares) and makes it current on this thread.
    pub fn context(&self) -> Result<Context, Error> {
        let mut ctx: CUcontext = std::ptr::null_mut();
        // SAFETY: writes one context handle to a live local.
        let r = unsafe { (self.cuda.api.cuDevicePrimaryCtxRetain)(&mut ctx, self.handle) };
        self.cuda.check("cuDevicePrimaryCtxRetain", r)?;
        let context = Context { cuda: self.cuda, device: self.handle, ctx };
        context.make_current()?;
        Ok(context)
    }
}

/// A retained primary context. Every allocation, copy and stream below
/// borrows it, so none outlives it; CUDA calls need it current on the
/// calling thread, which `make_current` does.
pub struct Context {
    cuda: Cuda,
    device: CUdevice,
    ctx: CUcontext,
}

// SAFETY: the driver API is thread-safe, and a primary context may be
// current on several threads at once; every thread that uses one makes it
// current first (`make_current`), and each stream, kernel and pinned
// buffer made in it stays with the thread that made it (none of those
// types is Send), so threads share only the context, the device memory,
// which the driver lets any thread of the context reach, and events (see
// `Event`).
unsafe impl Sync for Context {}
// SAFETY: as above; releasing the retained context from another thread is
// allowed.
unsafe impl Send for Context {}

impl Context {
    pub fn make_current(&self) -> Result<(), Error> {
        // SAFETY: `ctx` is a live retained context.
        self.cuda.check("cuCtxSetCurrent", unsafe { (self.cuda.api.cuCtxSetCurrent)(self.ctx) })
    }

    /// (free, total) bytes of device memory.
    pub fn mem_info(&self) -> Result<(u64, u64), Error> {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: writes two size_t to live locals.
        let r = unsafe { (self.cuda.api.cuMemGetInfo_v2)(&mut free, &mut total) };
        self.cuda.check("cuMemGetInfo_v2", r)?;
        Ok((free as u64, total as u64))
    }

    /// The GPU's PCI address ("0000:3b:00.0"), as NVML finds it; `None`
    /// where the driver cannot say.
    pub fn pci_bus_id(&self) -> Option<String> {
        let get = self.cuda.api.cuDeviceGetPCIBusId?;
        let mut buf = [0 as c_char; 32];
        // SAFETY: the driver writes at most `len` bytes, NUL included.
        let r = unsafe { get(buf.as_mut_ptr(), buf.len() as i32, self.device) };
        self.cuda.check("cuDeviceGetPCIBusId", r).ok()?;
        // SAFETY: the driver NUL-terminated it within the buffer.
        Some(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
    }

    pub fn alloc(&self, len: u64) -> Result<DeviceMem<'_>, Error> {
        let mut ptr: CUdeviceptr = 0;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        // SAFETY: writes one device pointer to a live local.
        self.cuda.check("cuMemAlloc_v2", unsafe { (self.cuda.api.cuMemAlloc_v2)(&mut ptr, len) })?;
        HELD.fetch_add(len as u64, Ordering::Relaxed);
        Ok(DeviceMem { ctx: self, ptr, len: len as u64 })
    }

    /// Page-locked host memory, which async copies need to be async, and
    /// mapped, so that the copy kernel reaches it at the same address.
    pub fn pinned(&self, len: usize) -> Result<Pinned<'_>, Error> {
        let mut ptr: *mut c_void = std::ptr::null_mut();
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP;
        // SAFETY: writes one host pointer to a live local.
        self.cuda.check("cuMemHostAlloc", unsafe { (self.cuda.api.cuMemHostAlloc)(&mut ptr, len, flags) })?;
        Ok(Pinned { ctx: self, ptr: ptr.cast(), len })
    }

    pub fn stream(&self) -> Result<Stream<'_>, Error> {
        self.stream_with(0)
    }

    fn stream_with(&self, flags: c_uint) -> Result<Stream<'_>, Error> {
        let mut stream: CUstream = std::ptr::null_mut();
        // SAFETY: writes one stream handle to a live local; the flags are
        // 0 (default) or CU_STREAM_NON_BLOCKING.
        self.cuda.check("cuStreamCreate", unsafe { (self.cuda.api.cuStreamCreate)(&mut stream, flags) })?;
        Ok(Stream { ctx: self, stream })
    }

    pub fn event(&self) -> Result<Event<'_>, Error> {
        let mut event: CUevent = std::ptr::null_mut();
        // SAFETY: writes one event handle to a live local.
        let r = unsafe { (self.cuda.api.cuEventCreate)(&mut event, sys::CU_EVENT_DISABLE_TIMING) };
        self.cuda.check("cuEventCreate", r)?;
        Ok(Event { ctx: self, event })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: releases the reference `Device::context` retained.
        let r = unsafe { (self.cuda.api.cuDevicePrimaryCtxRelease_v2)(self.device) };
        if let Err(e) = self.cuda.check("cuDevicePrimaryCtxRelease_v2", r) {
            crate::warn!("{e}");
        }
    }
}

/// One device allocation, freed on drop.
pub struct DeviceMem<'c> {
    ctx: &'c Context,
    ptr: CUdeviceptr,
    len: u64,
}

impl DeviceMem<'_> {
    /// Zeroes the whole allocation on the legacy stream. It may still run
    /// when this returns (a memset of device memory does not wait for the
    /// device), but every blocking stream (`Context::stream`, the
    /// copiers') runs its later work after it, and a mailbox kernel takes
    /// a job only once its copier's stream is idle: nothing reads or
    /// writes the memory before it is zeroed.
    pub fn clear(&self) -> Result<(), Error> {
        // SAFETY: the range is exactly the allocation; no host memory involved.
        let r = unsafe { (self.ctx.cuda.api.cuMemsetD8_v2)(self.ptr, 0, self.len as usize) };
        self.ctx.cuda.check("cuMemsetD8_v2", r)
    }

    fn at(&self, offset: u64, len: usize) -> CUdeviceptr {
        debug_assert!(offset + len as u64 <= self.len, "callers split I/O at chunk bounds");
        self.ptr + offset
    }
}

/// Device memory this process holds, counted after an allocation
/// returns and before a free is made, so that free memory plus this never
/// reads above what it would be without us: another process's share is
/// what it falls below its highest.
static HELD: AtomicU64 = AtomicU64::new(0);

/// Device memory this process holds, as `HELD` counts it.
pub fn held() -> u64 {
    HELD.load(Ordering::Relaxed)
}

impl Drop for DeviceMem<'_> {
    fn drop(&mut self) {
        let r = gate::alone(|| {
            HELD.fetch_sub(self.len, Ordering::Relaxed);
            // SAFETY: `ptr` came from cuMemAlloc_v2 and is freed only here.
            unsafe { (self.ctx.cuda.api.cuMemFree_v2)(self.ptr) }
        });
        if let Err(e) = self.ctx.cuda.check("cuMemFree_v2", r) {
            // Still ours: not counted as another process's.
            HELD.fetch_add(self.len, Ordering::Relaxed);
            crate::error!("{e}");
        }
    }
}

/// Pinned host memory, freed on drop.
pub struct Pinned<'c> {
    ctx: &'c Context,
    ptr: *mut u8,
    len: usize,
}

impl Pinned<'_> {
    pub fn size(&self) -> usize {
        self.len
    }

    /// Bytes `range`, with no reference made to the rest, which the device
    /// may be copying to or from meanwhile (`Deref` makes one).
    pub fn part(&self, range: Range<usize>) -> &[u8] {
        assert!(range.start <= range.end && range.end <= self.len, "{range:?} of {} pinned bytes", self.len);
        // SAFETY: inside the `len` bytes that `self` owns.
        unsafe { std::slice::from_raw_parts(self.ptr.add(range.start), range.len()) }
    }

    pub fn part_mut(&mut self, range: Range<usize>) -> &mut [u8] {
        assert!(range.start <= range.end && range.end <= self.len, "{range:?} of {} pinned bytes", self.len);
        // SAFETY: as in `part`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }
}

impl Deref for Pinned<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` bytes that `self` owns.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl DerefMut for Pinned<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from cuMemHostAlloc and is freed only here.
        let r = gate::alone(|| unsafe { (self.ctx.cuda.api.cuMemFreeHost)(self.ptr.cast()) });
        if let Err(e) = self.ctx.cuda.check("cuMemFreeHost", r) {
            crate::error!("{e}");
        }
    }
}

/// A stream: copies queued on it run in order; `sync` waits for them.
pub struct Stream<'c> {
    ctx: &'c Context,
    stream: CUstream,
}

impl Stream<'_> {
    fn api(&self) -> &'static Api {
        self.ctx.cuda.api
    }

    /// Queues device → host.
    ///
    /// # Safety
    /// The device writes `dst` after this returns: the caller keeps it
    /// allocated, and neither reads nor writes it, until the stream has
    /// done this copy (`sync`, or an event recorded after it).
    pub unsafe fn read(&self, src: &DeviceMem, offset: u64, dst: &mut [u8]) -> Result<(), Error> {
        let from = src.at(offset, dst.len());
        // SAFETY: `dst` is valid for `dst.len()` bytes and, by the caller's
        // promise, stays so until the copy is done; the device range is
        // inside `src`.
        let r = unsafe { (self.api().cuMemcpyDtoHAsync_v2)(dst.as_mut_ptr().cast(), from, dst.len(), self.stream) };
        self.ctx.cuda.check("cuMemcpyDtoHAsync_v2", r)
    }

    /// Queues host → device. `rows`: as two rows where the driver can
    /// (see `htod`).
    ///
    /// # Safety
    /// The device reads `src` after this returns: the caller keeps it
    /// allocated and unchanged until the stream has done this copy.
    pub unsafe fn write(&self, dst: &DeviceMem, offset: u64, src: &[u8], rows: bool) -> Result<(), Error> {
        let to = dst.at(offset, src.len());
        // SAFETY: the caller's promise covers `src` until the copy is done;
        // the device range is inside `dst`.
        unsafe { self.htod(to, src.as_ptr().cast(), src.len(), rows) }
    }

    /// Queues a copy of `len` bytes from host `src` to device `dst`.
    /// The driver carries a small one in the compute engine's command
    /// stream, which takes turns with other processes' kernels, and a
    /// 2D copy of two rows or more on a copy engine, which does not. With
    /// `rows`, a copy of an even length goes as two rows of half of it
    /// where the driver has 2D copies; when to ask is the caller's policy.
    ///
    /// # Safety
    /// `src` is valid for `len` bytes until the stream has done this copy,
    /// and `dst..dst + len` lies in a live allocation.
    unsafe fn htod(&self, dst: CUdeviceptr, src: *const c_void, len: usize, rows: bool) -> Result<(), Error> {
        let rows = self.api().cuMemcpy2DAsync_v2.filter(|_| rows && len % 2 == 0);
        let Some(copy) = rows else {
            // SAFETY: the caller's promise.
            let r = unsafe { (self.api().cuMemcpyHtoDAsync_v2)(dst, src, len, self.stream) };
            return self.ctx.cuda.check("cuMemcpyHtoDAsync_v2", r);
        };
        let half = len / 2;
        let rows = sys::CUDA_MEMCPY2D {
            src_x_in_bytes: 0,
            src_y: 0,
            src_memory_type: sys::CU_MEMORYTYPE_HOST,
            src_host: src,
            src_device: 0,
            src_array: std::ptr::null_mut(),
            src_pitch: half,
            dst_x_in_bytes: 0,
            dst_y: 0,
            dst_memory_type: sys::CU_MEMORYTYPE_DEVICE,
            dst_host: std::ptr::null_mut(),
            dst_device: dst,
            dst_array: std::ptr::null_mut(),
            dst_pitch: half,
            width_in_bytes: half,
            height: 2,
        };
        // SAFETY: two rows of `half` bytes, `half` apart, are the same
        // `len` bytes on each side: the caller's promise covers them.
        let r = unsafe { copy(&rows, self.stream) };
        self.ctx.cuda.check("cuMemcpy2DAsync_v2", r)
    }

    pub fn zero(&self, dst: &DeviceMem, offset: u64, len: usize) -> Result<(), Error> {
        let to = dst.at(offset, len);
        // SAFETY: the device range is inside `dst`; no host memory involved.
        let r = unsafe { (self.api().cuMemsetD8Async)(to, 0, len, self.stream) };
        self.ctx.cuda.check("cuMemsetD8Async", r)
    }

    /// Whether everything queued so far is done, without waiting; false
    /// where the driver cannot say.
    pub fn is_done(&self) -> Result<bool, Error> {
        let Some(query) = self.api().cuStreamQuery else { return Ok(false) };
        // SAFETY: `stream` is live.
        match unsafe { query(self.stream) } {
            sys::CUDA_ERROR_NOT_READY => Ok(false),
            r => self.ctx.cuda.check("cuStreamQuery", r).map(|()| true),
        }
    }

    pub fn sync(&self) -> Result<(), Error> {
        // SAFETY: `stream` is live.
        self.ctx.cuda.check("cuStreamSynchronize", unsafe { (self.api().cuStreamSynchronize)(self.stream) })
    }

    /// Marks the point `event` stands for: the work queued so far.
    pub fn record(&self, event: &Event) -> Result<(), Error> {
        // SAFETY: both handles are live and belong to the same context.
        self.ctx.cuda.check("cuEventRecord", unsafe { (self.api().cuEventRecord)(event.event, self.stream) })
    }

    /// Makes the work queued after this wait for the point `event` was
    /// last recorded at, perhaps on another thread's stream; the calling
    /// thread does not wait.
    pub fn wait_for(&self, event: &Event) -> Result<(), Error> {
        // SAFETY: both handles are live and belong to the same context;
        // flags 0 is the only value the call takes.
        self.ctx.cuda.check("cuStreamWaitEvent", unsafe { (self.api().cuStreamWaitEvent)(self.stream, event.event, 0) })
    }
}

/// A point in a stream's work: waiting on it waits for what was queued
/// before `Stream::record`, not for what came after.
pub struct Event<'c> {
    ctx: &'c Context,
    event: CUevent,
}

// SAFETY: the driver API is thread-safe, and an event of a context may be
// recorded on one thread's stream and waited for on another's, in that
// context (current on both); the handle is destroyed only by `Drop`, when
// no other thread can hold a reference to it.
unsafe impl Sync for Event<'_> {}
// SAFETY: as above; the context it borrows is Sync. `Drop` needs the
// context current on the dropping thread: shared events (a store's lanes)
// are dropped with their backing, on the thread that made them.
unsafe impl Send for Event<'_> {}

impl Event<'_> {
    pub fn wait(&self) -> Result<(), Error> {
        // SAFETY: `event` is live.
        self.ctx.cuda.check("cuEventSynchronize", unsafe { (self.ctx.cuda.api.cuEventSynchronize)(self.event) })
    }
}

impl Drop for Event<'_> {
    fn drop(&mut self) {
        // SAFETY: `event` came from cuEventCreate and is destroyed only here.
        let r = unsafe { (self.ctx.cuda.api.cuEventDestroy_v2)(self.event) };
        if let Err(e) = self.ctx.cuda.check("cuEventDestroy_v2", r) {
            crate::warn!("{e}");
        }
    }
}

/// Copies gathered for one `cuMemcpyBatchAsync`: one driver call for a
/// whole batch of small requests instead of one each. The driver may run
/// them in any order, so a batch never holds copies that depend on each
/// other (the store flushes when the direction changes). A piece that
/// continues the last one on both sides, in the same allocation, extends
/// it: sequential requests, end to end in staging and in VRAM, go as one
/// copy.
pub struct CopyBatch {
    dsts: Vec<CUdeviceptr>,
    srcs: Vec<CUdeviceptr>,
    sizes: Vec<usize>,
    /// The device allocation of the last piece: a copy never spans two.
    last_mem: CUdeviceptr,
    /// Every piece is one the copy kernel takes.
    small: bool,
}

impl CopyBatch {
    pub fn with_capacity(n: usize) -> CopyBatch {
        let mut b = CopyBatch { dsts: Vec::with_capacity(n), srcs: Vec::with_capacity(n), sizes: Vec::with_capacity(n), last_mem: 0, small: true };
        crate::touch::spare(&mut b.dsts);
        crate::touch::spare(&mut b.srcs);
        crate::touch::spare(&mut b.sizes);
        b
    }

    pub fn is_empty(&self) -> bool {
        self.sizes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.sizes.len()
    }

    /// Each copy's length.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// Whether the copy kernel takes every piece (`Stream::launch`).
    pub fn is_small(&self) -> bool {
        self.small
    }

    pub fn is_full(&self) -> bool {
        self.sizes.len() == self.sizes.capacity()
    }

    /// (destination, source, length) when the batch holds one copy.
    pub fn lone(&self) -> Option<(u64, u64, usize)> {
        match self.sizes[..] {
            [len] => Some((self.dsts[0], self.srcs[0], len)),
            _ => None,
        }
    }

    /// Device → host. Host sides end to end are taken for one range: the
    /// store's come from one staging allocation (a range over two would
    /// still copy right, at the driver's pace for memory it does not know
    /// pinned).
    ///
    /// # Safety
    /// As for `Stream::read`, until the batch is cleared and every run of
    /// it (by a stream, or the mailbox kernel) is done: the batch keeps
    /// only the address, and every way of running it relies on this
    /// promise.
    pub unsafe fn read(&mut self, src: &DeviceMem, offset: u64, dst: &mut [u8]) {
        self.push(dst.as_mut_ptr() as CUdeviceptr, src.at(offset, dst.len()), dst.len(), src.ptr);
    }

    /// Host → device, as `read` takes host sides.
    ///
    /// # Safety
    /// As for `Stream::write`, for as long as `read` says.
    pub unsafe fn write(&mut self, dst: &DeviceMem, offset: u64, src: &[u8]) {
        self.push(dst.at(offset, src.len()), src.as_ptr() as CUdeviceptr, src.len(), dst.ptr);
    }

    /// Keeps the host side as a bare address: whoever runs the batch relies
    /// on the promise made to `read` or `write` (or, in this module's
    /// tests, on the test's own buffers).
    fn push(&mut self, dst: CUdeviceptr, src: CUdeviceptr, len: usize, mem: CUdeviceptr) {
        if let (Some(&d), Some(&s), Some(n)) = (self.dsts.last(), self.srcs.last(), self.sizes.last_mut()) {
            if mem == self.last_mem && d + *n as u64 == dst && s + *n as u64 == src {
                *n += len;
                self.small &= kernel::takes(d, s, *n);
                return;
            }
        }
        debug_assert!(!self.is_full(), "callers flush a full batch first");
        self.last_mem = mem;
        self.dsts.push(dst);
        self.srcs.push(src);
        self.sizes.push(len);
        self.small &= kernel::takes(dst, src, len);
    }

    pub fn clear(&mut self) {
        self.dsts.clear();
        self.srcs.clear();
        self.sizes.clear();
        self.small = true;
    }
}

impl Stream<'_> {
    /// Whether this driver has `cuMemcpyBatchAsync_v2` (CUDA 13).
    pub fn can_batch(&self) -> bool {
        self.api().cuMemcpyBatchAsync_v2.is_some()
    }

    /// Queues every copy of `batch` as one `cuMemcpyBatchAsync_v2` call;
    /// `None` where this driver lacks it.
    pub fn copy_batch_api(&self, batch: &mut CopyBatch) -> Option<Result<(), Error>> {
        let copy = self.api().cuMemcpyBatchAsync_v2?;
        let mut attrs = sys::CUmemcpyAttributes {
            src_access_order: sys::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
            src_loc_hint: [0; 2],
            dst_loc_hint: [0; 2],
            flags: 0,
        };
        let mut first = 0usize;
        // SAFETY: the three arrays hold `len` entries each; every range lies
        // inside a live allocation, or a host buffer kept until the copies
        // are done (the promise of `CopyBatch::read` and `write`); one
        // attribute entry applies to all copies from index 0.
        let r = unsafe {
            copy(
                batch.dsts.as_mut_ptr(),
                batch.srcs.as_mut_ptr(),
                batch.sizes.as_mut_ptr(),
                batch.sizes.len(),
                &mut attrs,
                &mut first,
                1,
                self.stream,
            )
        };
        Some(self.ctx.cuda.check("cuMemcpyBatchAsync_v2", r))
    }

    /// Queues every copy of `batch` one driver call each (all host →
    /// device if `writes`, else all device → host); a write of `len` bytes
    /// goes as two rows if `rows(len)` (see `htod`).
    pub fn copy_each(&self, batch: &CopyBatch, writes: bool, rows: impl Fn(usize) -> bool) -> Result<(), Error> {
        for ((&dst, &src), &len) in batch.dsts.iter().zip(&batch.srcs).zip(&batch.sizes) {
            // SAFETY: as in `copy_batch_api`: each device range was checked
            // when queued, and its host side was promised until the copy is
            // done.
            unsafe {
                if writes {
                    self.htod(dst, src as *const c_void, len, rows(len))?;
                } else {
                    let r = (self.api().cuMemcpyDtoHAsync_v2)(dst as *mut c_void, src, len, self.stream);
                    self.ctx.cuda.check("cuMemcpyDtoHAsync_v2", r)?;
                }
            }
        }
        Ok(())
    }
}

impl Drop for Stream<'_> {
    fn drop(&mut self) {
        // SAFETY: `stream` came from cuStreamCreate and is destroyed only here.
        let r = unsafe { (self.api().cuStreamDestroy_v2)(self.stream) };
        if let Err(e) = self.ctx.cuda.check("cuStreamDestroy_v2", r) {
            crate::warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::CopyBatch;

    #[test]
    fn pieces_end_to_end_in_one_allocation_go_as_one_copy() {
        let mut b = CopyBatch::with_capacity(8);
        let (vram, other, host) = (1 << 40, 2 << 40, 1 << 20);
        b.push(vram, host, 4096, vram);
        b.push(vram + 4096, host + 4096, 4096, vram);
        assert_eq!((b.len(), b.sizes()), (1, &[8192][..]));
        assert!(b.is_small());
        b.push(vram + 8192, host + 8192, 128 << 10, vram);
        assert_eq!(b.sizes(), &[8192 + (128 << 10)], "a long piece extends it too");
        assert!(!b.is_small(), "the copy kernel takes pieces of 64 KiB at most");
        let end = vram + 8192 + (128 << 10);
        b.push(end, host, 4096, vram);
        b.push(end + 8192, host + 4096, 4096, vram);
        b.push(end + 12288, host + 4096 + 4096, 4096, other);
        assert_eq!(b.sizes().len(), 4, "not end to end on the host side, on the device side, or in another allocation");
        b.clear();
        b.push(end + 16384, host + 12288, 4096, other);
        assert_eq!(b.len(), 1);
    }

    /// A batch's lists are in RAM before serving, as the input buffer is
    /// (nbd/input.rs): alone, with glibc's mmap threshold fixed, so that
    /// lists this long come fresh from mmap.
    #[test]
    fn a_batch_is_in_ram_before_serving() {
        super::fake_tests::alone("cuda::tests::batch_in_ram", &[("MALLOC_MMAP_THRESHOLD_", "131072")]);
    }

    #[test]
    #[ignore = "run by a_batch_is_in_ram_before_serving"]
    fn batch_in_ram() {
        use crate::touch::resident;
        if !super::fake_tests::knob_given("MALLOC_MMAP_THRESHOLD_") {
            return;
        }
        const N: usize = 1 << 15; // 256 KiB a list
        let plain: Vec<u64> = Vec::with_capacity(N);
        assert!(!resident(plain.as_ptr(), N * 8), "fresh capacity counted as touched: this test proves nothing");
        let b = CopyBatch::with_capacity(N);
        assert!(resident(b.dsts.as_ptr(), N * 8) && resident(b.srcs.as_ptr(), N * 8) && resident(b.sizes.as_ptr(), N * 8));
    }
}

