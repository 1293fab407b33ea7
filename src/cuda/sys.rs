//! The CUDA driver API, by hand: the types, and one table of the entry
//! points nbd-vram calls, resolved once from libcuda by their versioned
//! names (the `_v2` names are what `cuda.h` maps the plain ones to).

#![allow(non_snake_case)]

use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::OnceLock;

use libloading::Library;

pub type CUresult = c_int;
pub type CUdevice = c_int;
pub type CUdeviceptr = u64;
pub type CUcontext = *mut c_void;
pub type CUstream = *mut c_void;
pub type CUevent = *mut c_void;
pub type CUmodule = *mut c_void;
pub type CUfunction = *mut c_void;

pub const CUDA_SUCCESS: CUresult = 0;
pub const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;
pub const CUDA_ERROR_NO_DEVICE: CUresult = 100;
pub const CUDA_ERROR_UNKNOWN: CUresult = 999;
/// `cuStreamQuery`: the stream still has work.
pub const CUDA_ERROR_NOT_READY: CUresult = 600;
pub const CUDA_ERROR_SYSTEM_DRIVER_MISMATCH: CUresult = 803;
pub const CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE: CUresult = 804;

macro_rules! api {
    (required { $($name:ident($($arg:ty),*);)* } optional { $($opt:ident($($oarg:ty),*);)* }) => {
        /// Entry points into a libcuda that stays loaded for the process's
        /// life; the optional ones only newer drivers have.
        pub struct Api {
            $(pub $name: unsafe extern "C" fn($($arg),*) -> CUresult,)*
            $(pub $opt: Option<unsafe extern "C" fn($($oarg),*) -> CUresult>,)*
        }

        impl Api {
            fn resolve(lib: &Library) -> Result<Api, String> {
                // SAFETY (every `get` below): the symbol is declared in
                // cuda.h with exactly this signature (checked against the
                // CUDA 13 header by hand), and `lib` is never unloaded (see
                // `load`), so the pointer stays valid.
                Ok(Api {
                    $($name: {
                        let name = concat!(stringify!($name), "\0").as_bytes();
                        // SAFETY: see above.
                        unsafe { *lib.get(name).map_err(|_| stringify!($name).to_string())? }
                    },)*
                    $($opt: {
                        let name = concat!(stringify!($opt), "\0").as_bytes();
                        // SAFETY: see above.
                        unsafe { lib.get(name).ok().map(|f| *f) }
                    },)*
                })
            }
        }
    };
}

/// `CUmemcpyAttributes` (CUDA 12.8+): how a batch of copies reads its sources.
#[repr(C)]
pub struct CUmemcpyAttributes {
    pub src_access_order: u32,
    pub src_loc_hint: [u32; 2],
    pub dst_loc_hint: [u32; 2],
    pub flags: u32,
}

/// `CU_MEMCPY_SRC_ACCESS_ORDER_STREAM`: sources are read in stream order.
pub const CU_MEMCPY_SRC_ACCESS_ORDER_STREAM: u32 = 1;

/// `CUDA_MEMCPY2D`: a copy of `height` rows of `width_in_bytes`, each side
/// `pitch` bytes from one row to the next.
#[repr(C)]
pub struct CUDA_MEMCPY2D {
    pub src_x_in_bytes: usize,
    pub src_y: usize,
    pub src_memory_type: c_uint,
    pub src_host: *const c_void,
    pub src_device: CUdeviceptr,
    pub src_array: *mut c_void,
    pub src_pitch: usize,
    pub dst_x_in_bytes: usize,
    pub dst_y: usize,
    pub dst_memory_type: c_uint,
    pub dst_host: *mut c_void,
    pub dst_device: CUdeviceptr,
    pub dst_array: *mut c_void,
    pub dst_pitch: usize,
    pub width_in_bytes: usize,
    pub height: usize,
}

/// `CUmemorytype`: where a side of a `CUDA_MEMCPY2D` lies.
pub const CU_MEMORYTYPE_HOST: c_uint = 1;
pub const CU_MEMORYTYPE_DEVICE: c_uint = 2;

/// `CU_EVENT_DISABLE_TIMING`: an event only for waiting, the cheapest kind.
pub const CU_EVENT_DISABLE_TIMING: c_uint = 2;

/// `CU_STREAM_NON_BLOCKING`: no implicit waits with the legacy default
/// stream, whose synchronous calls would otherwise wait for a kernel that
/// never ends by itself.
pub const CU_STREAM_NON_BLOCKING: c_uint = 1;

/// `CU_DEVICE_ATTRIBUTE_KERNEL_EXEC_TIMEOUT`: the driver kills kernels that
/// run longer than a few seconds (a GPU that drives a display).
pub const CU_DEVICE_ATTRIBUTE_KERNEL_EXEC_TIMEOUT: c_int = 17;

/// `CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`: the device's SMs.
pub const CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: c_int = 16;

/// `CUexecAffinityParam` with `CU_EXEC_AFFINITY_TYPE_SM_COUNT` (0): the SMs
/// the current context may use, fewer than the device's under MPS.
#[repr(C)]
pub struct CUexecAffinityParam {
    pub kind: c_int,
    pub sm_count: c_uint,
}
pub const CU_EXEC_AFFINITY_TYPE_SM_COUNT: c_int = 0;

/// `CU_MEMHOSTALLOC_DEVICEMAP`: pinned memory that kernels may address.
pub const CU_MEMHOSTALLOC_DEVICEMAP: c_uint = 2;

api! {
    required {
        cuInit(c_uint);
        cuDriverGetVersion(*mut c_int);
        cuDeviceGet(*mut CUdevice, c_int);
        cuDeviceGetCount(*mut c_int);
        cuDeviceGetName(*mut c_char, c_int, CUdevice);
        cuDeviceTotalMem_v2(*mut usize, CUdevice);
        cuDevicePrimaryCtxRetain(*mut CUcontext, CUdevice);
        cuDevicePrimaryCtxRelease_v2(CUdevice);
        cuCtxSetCurrent(CUcontext);
        cuMemGetInfo_v2(*mut usize, *mut usize);
        cuMemAlloc_v2(*mut CUdeviceptr, usize);
        cuMemFree_v2(CUdeviceptr);
        cuMemcpyHtoDAsync_v2(CUdeviceptr, *const c_void, usize, CUstream);
        cuMemcpyDtoHAsync_v2(*mut c_void, CUdeviceptr, usize, CUstream);
        cuMemsetD8_v2(CUdeviceptr, u8, usize);
        cuMemsetD8Async(CUdeviceptr, u8, usize, CUstream);
        cuMemHostAlloc(*mut *mut c_void, usize, c_uint);
        cuMemFreeHost(*mut c_void);
        cuStreamCreate(*mut CUstream, c_uint);
        cuStreamSynchronize(CUstream);
        cuStreamDestroy_v2(CUstream);
        cuEventCreate(*mut CUevent, c_uint);
        cuEventRecord(CUevent, CUstream);
        cuEventSynchronize(CUevent);
        cuStreamWaitEvent(CUstream, CUevent, c_uint);
        cuEventDestroy_v2(CUevent);
        cuGetErrorName(CUresult, *mut *const c_char);
        cuGetErrorString(CUresult, *mut *const c_char);
    }
    optional {
        // CUDA 13's form (12.8's had one more argument, a failure index).
        cuMemcpyBatchAsync_v2(*mut CUdeviceptr, *mut CUdeviceptr, *mut usize, usize,
            *mut CUmemcpyAttributes, *mut usize, usize, CUstream);
        // Small writes while another process computes on the GPU, and the
        // GPU's address for NVML (any driver has them; a fake may not).
        cuMemcpy2DAsync_v2(*const CUDA_MEMCPY2D, CUstream);
        cuDeviceGetPCIBusId(*mut c_char, c_int, CUdevice);
        // The copy kernel's (any driver has them; a stripped-down one may not).
        cuModuleLoadData(*mut CUmodule, *const c_void);
        cuModuleGetFunction(*mut CUfunction, CUmodule, *const c_char);
        cuModuleUnload(CUmodule);
        cuLaunchKernel(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint,
            CUstream, *mut *mut c_void, *mut *mut c_void);
        // The mailbox kernel's, besides the four above.
        cuStreamQuery(CUstream);
        cuDeviceGetAttribute(*mut c_int, c_int, CUdevice);
        // CUDA 11.4+: the SMs an MPS client's context may use.
        cuCtxGetExecAffinity(*mut CUexecAffinityParam, c_int);
    }
}

/// Why the driver library could not be used.
#[derive(Debug)]
pub enum LoadError {
    /// No candidate could be opened: the tried names and the last dlerror.
    NotFound(String),
    /// The library lacks an entry point: too old, or not libcuda.
    MissingSymbol { path: String, symbol: String },
}

static API: OnceLock<Api> = OnceLock::new();

/// Opens libcuda once per process and never closes it: libcuda registers
/// exit handlers and hands out static strings, neither of which survives
/// an unload. Later calls return the same table whatever `candidates` say.
pub fn load(candidates: &[&str]) -> Result<&'static Api, LoadError> {
    if let Some(api) = API.get() {
        return Ok(api);
    }
    let mut last = String::new();
    for &path in candidates {
        // SAFETY: loading libcuda runs its initialisers, which only set up
        // the driver's own state; no other thread calls dlopen with us.
        match unsafe { Library::new(path) } {
            Ok(lib) => {
                let api = Api::resolve(&lib)
                    .map_err(|symbol| LoadError::MissingSymbol { path: path.to_string(), symbol })?;
                std::mem::forget(lib);
                return Ok(API.get_or_init(|| api));
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(LoadError::NotFound(last))
}
