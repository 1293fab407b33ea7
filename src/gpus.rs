//! `nbd-vram gpus`: what each GPU has, as a store would see it.

use std::path::Path;

use crate::fail::Failure;
use crate::store::gpu::{cuda_failure, init};
use crate::store::MIB;
use crate::tuning::Tuning;

/// `nbd-vram gpus`: index, name, total and free memory.
pub fn list(libcuda: Option<&Path>, tuning: &Tuning) -> Result<(), Failure> {
    let cuda = init(libcuda, tuning)?;
    let count = cuda.device_count().map_err(cuda_failure)?;
    let version = cuda.driver_version().map_err(cuda_failure)?;
    println!("CUDA driver {}.{}, {count} GPU(s)", version / 1000, version % 1000 / 10);
    println!("{:>3}  {:<40} {:>10} {:>10}", "GPU", "NAME", "TOTAL MiB", "FREE MiB");
    for i in 0..count as u32 {
        let device = cuda.device(i).map_err(cuda_failure)?;
        let ctx = device.context().map_err(cuda_failure)?;
        let (free, _) = ctx.mem_info().map_err(cuda_failure)?;
        let total = device.total_mem().map_err(cuda_failure)?;
        let name = device.name().map_err(cuda_failure)?;
        println!("{i:>3}  {name:<40} {:>10} {:>10}", total / MIB, free / MIB);
    }
    Ok(())
}
