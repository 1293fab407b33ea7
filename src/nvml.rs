//! NVML (libnvidia-ml.so.1, which the driver ships beside libcuda), by
//! hand and only for one question: which processes use a GPU. The CUDA
//! driver API cannot say; NVML lists every process with a context on it,
//! including those that were there before us. Optional: a system without
//! it (a trimmed initramfs) falls back to watching free memory.

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr, CString};

use libloading::Library;

type NvmlReturn = c_int;
type NvmlDevice = *mut c_void;

const NVML_SUCCESS: NvmlReturn = 0;
/// The list did not fit: more processes than we asked room for.
const NVML_ERROR_INSUFFICIENT_SIZE: NvmlReturn = 7;

/// `nvmlProcessInfo_t` as the `_v3` process lists fill it.
#[repr(C)]
#[derive(Clone, Copy)]
struct ProcessInfo {
    pid: c_uint,
    used_gpu_memory: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

type ProcessList = unsafe extern "C" fn(NvmlDevice, *mut c_uint, *mut ProcessInfo) -> NvmlReturn;

/// Room in each list; more processes than this count as this many.
const ROOM: usize = 32;

pub struct Nvml {
    shutdown: unsafe extern "C" fn() -> NvmlReturn,
    error_string: unsafe extern "C" fn(NvmlReturn) -> *const c_char,
    compute: ProcessList,
    graphics: ProcessList,
    device: NvmlDevice,
}

// SAFETY: NVML is thread-safe (its reference: "NVML is thread-safe so it
// is safe to make simultaneous NVML calls from multiple threads"), and the
// device handle is an opaque token any thread may pass; one thread at a
// time owns an `Nvml` (the GPU watcher in store/neighbours.rs).
unsafe impl Send for Nvml {}

/// The entry point `name` of `lib`.
///
/// # Safety
/// `T` is its C signature in nvml.h, and `lib` is never unloaded.
unsafe fn entry<T: Copy>(lib: &Library, name: &str) -> Result<T, String> {
    // SAFETY: the caller's promise.
    unsafe { lib.get::<T>(name.as_bytes()) }.map(|f| *f).map_err(|e| e.to_string())
}

impl Nvml {
    /// Opens NVML and finds the GPU at `pci_bus_id` (as cuDeviceGetPCIBusId
    /// gives it). The library stays loaded for the process's life, as
    /// libcuda does: NVML registers its own exit handling.
    pub fn open(pci_bus_id: &str) -> Result<Nvml, String> {
        // SAFETY: loading libnvidia-ml runs its initialisers, which only set
        // up its own state; no other thread calls dlopen with us.
        let lib = unsafe { Library::new("libnvidia-ml.so.1") }.map_err(|e| e.to_string())?;
        // SAFETY: each type is the entry point's signature in nvml.h, and
        // `lib` is forgotten, so never unloaded.
        let (init, by_bus, nvml) = unsafe {
            let init: unsafe extern "C" fn() -> NvmlReturn = entry(&lib, "nvmlInit_v2\0")?;
            let by_bus: unsafe extern "C" fn(*const c_char, *mut NvmlDevice) -> NvmlReturn =
                entry(&lib, "nvmlDeviceGetHandleByPciBusId_v2\0")?;
            let nvml = Nvml {
                shutdown: entry(&lib, "nvmlShutdown\0")?,
                error_string: entry(&lib, "nvmlErrorString\0")?,
                compute: entry(&lib, "nvmlDeviceGetComputeRunningProcesses_v3\0")?,
                graphics: entry(&lib, "nvmlDeviceGetGraphicsRunningProcesses_v3\0")?,
                device: std::ptr::null_mut(),
            };
            std::mem::forget(lib);
            (init, by_bus, nvml)
        };
        // SAFETY: takes no arguments; balanced by `drop`'s nvmlShutdown.
        let r = unsafe { init() };
        if r != NVML_SUCCESS {
            let e = nvml.describe("nvmlInit_v2", r);
            std::mem::forget(nvml); // nothing to shut down
            return Err(e);
        }
        let mut nvml = nvml;
        let bus = CString::new(pci_bus_id).map_err(|e| e.to_string())?;
        // SAFETY: `bus` is NUL-terminated; writes one handle to `device`.
        let r = unsafe { by_bus(bus.as_ptr(), &mut nvml.device) };
        if r != NVML_SUCCESS {
            return Err(nvml.describe(&format!("nvmlDeviceGetHandleByPciBusId_v2({pci_bus_id})"), r));
        }
        Ok(nvml)
    }

    fn describe(&self, call: &str, r: NvmlReturn) -> String {
        // SAFETY: nvmlErrorString returns a static string for any code.
        let text = unsafe { CStr::from_ptr((self.error_string)(r)) };
        format!("{call}: {} ({r})", text.to_string_lossy())
    }

    /// Processes other than this one with a compute or graphics context on
    /// the GPU. NVML gives host process IDs, which differ from ours in a
    /// container: when ours is not in the compute list, one entry of it is
    /// taken to be us.
    pub fn others(&self) -> Result<usize, String> {
        let (compute, ours) = self.list("compute", self.compute)?;
        let (graphics, _) = self.list("graphics", self.graphics)?;
        Ok(compute.saturating_sub(usize::from(!ours)) + graphics)
    }

    /// The processes in one of the GPU's lists other than this one (`ROOM`
    /// when it did not fit), and whether this one was there.
    fn list(&self, kind: &str, list: ProcessList) -> Result<(usize, bool), String> {
        let mut procs = [ProcessInfo { pid: 0, used_gpu_memory: 0, gpu_instance_id: 0, compute_instance_id: 0 }; ROOM];
        let mut n = ROOM as c_uint;
        // SAFETY: `procs` has room for `n` entries; NVML writes at most that
        // many, and their count to `n`; `device` is live.
        let r = unsafe { list(self.device, &mut n, procs.as_mut_ptr()) };
        let n = match r {
            NVML_SUCCESS => (n as usize).min(ROOM),
            NVML_ERROR_INSUFFICIENT_SIZE => return Ok((ROOM, false)),
            r => return Err(self.describe(&format!("listing the GPU's {kind} processes"), r)),
        };
        let me = std::process::id();
        let others = procs[..n].iter().filter(|p| p.pid != me).count();
        Ok((others, others < n))
    }
}

impl Drop for Nvml {
    fn drop(&mut self) {
        // SAFETY: balances the nvmlInit_v2 that `open` made.
        let r = unsafe { (self.shutdown)() };
        if r != NVML_SUCCESS {
            crate::warn!("{}", self.describe("nvmlShutdown", r));
        }
    }
}
