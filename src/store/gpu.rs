//! Opening a GPU store: which libcuda, which device, the allocation with
//! its fallback, and start-up failures turned into messages that say what
//! to do.

use std::path::Path;

use crate::cuda::{self, Context, Cuda, InitError, LoadError};
use crate::fail::{Code, Failure};
use super::neighbours::Seen;
use super::{AllocError, StoreOpts, VramBacking, MIB};
use crate::tuning::Tuning;

/// Loads `--libcuda`, else `NBD_VRAM_LIBCUDA`, else the default names.
pub fn init(libcuda: Option<&Path>, tuning: &Tuning) -> Result<Cuda, Failure> {
    let library = libcuda.map(|p| p.display().to_string()).or_else(|| tuning.libcuda.clone());
    Cuda::init(library.as_deref()).map_err(init_failure)
}

fn init_failure(e: InitError) -> Failure {
    let msg = match e {
        InitError::Load(tried, LoadError::NotFound(why)) => format!(
            "cannot load the CUDA driver library ({tried}): {why}. Is the NVIDIA driver installed? \
             `nvidia-smi` should work; if libcuda.so.1 lives elsewhere, give --libcuda PATH or NBD_VRAM_LIBCUDA"
        ),
        InitError::Load(_, LoadError::MissingSymbol { path, symbol }) => format!(
            "{path} has no {symbol}: this is not libcuda, or a driver too old for nbd-vram; update the NVIDIA driver"
        ),
        InitError::Init(e) if e.code == cuda::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH => format!(
            "{e}: the CUDA driver library does not match the loaded NVIDIA kernel module, usually after a driver \
             update without a reboot. Reboot (or reload the nvidia modules); `nvidia-smi` shows the same mismatch, \
             compare with /proc/driver/nvidia/version"
        ),
        InitError::Init(e) if e.code == cuda::CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE => format!(
            "{e}: a CUDA forward-compatibility libcuda is in use on a GPU that does not support it; \
             point --libcuda at the driver's own libcuda.so.1"
        ),
        InitError::Init(e) if e.code == cuda::CUDA_ERROR_NO_DEVICE => format!(
            "{e}: no NVIDIA GPU is visible. Check `nvidia-smi` and that /dev/nvidia* exist \
             (in a container, pass the GPU in)"
        ),
        InitError::Init(e) => format!("{e}: CUDA did not start; check `nvidia-smi` and the kernel log (dmesg)"),
    };
    Failure::new(Code::Cuda, msg)
}

pub fn cuda_failure(e: cuda::Error) -> Failure {
    Failure::new(Code::Cuda, e.to_string())
}

/// The device's primary context, made current on this thread.
pub fn open(cuda: &Cuda, gpu: u32) -> Result<Context, Failure> {
    let count = cuda.device_count().map_err(cuda_failure)?;
    if gpu as usize >= count {
        return Err(Failure::new(
            Code::Cuda,
            format!("--gpu {gpu}: this machine has {count} GPU(s), numbered from 0; `nbd-vram gpus` lists them"),
        ));
    }
    let device = cuda.device(gpu).map_err(cuda_failure)?;
    device.context().map_err(cuda_failure)
}

/// Allocates the store with the fallback of `--step` and `--min-size`,
/// for `connections` at once.
pub fn allocate<'c>(ctx: &'c Context, seen: &'c Seen, opts: &StoreOpts, connections: usize, tuning: &Tuning) -> Result<VramBacking<'c>, Failure> {
    VramBacking::allocate(ctx, seen, opts.size, opts.step, opts.min_size, connections, tuning).map_err(|e| match e {
        AllocError::Cuda(e) => cuda_failure(e),
        AllocError::NoVram(n) => Failure::new(
            Code::NoVram,
            format!(
                "could not allocate {} MiB of VRAM on GPU {}, nor any size down to --min-size {} MiB: \
                 {} MiB free of {} MiB. Free GPU memory (`nvidia-smi` shows who holds it) or lower --size/--min-size",
                n.wanted / MIB, opts.gpu, n.min / MIB, n.free / MIB, n.total / MIB
            ),
        ),
    })
}
