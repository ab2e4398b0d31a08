//! The CUDA memory pool's release threshold (feature `cuda`; `cuda_memory_absent.rs` stands in
//! without it). Candle allocates every tensor with `cuMemAllocAsync` from the device's default
//! pool, whose release threshold is 0: at every synchronisation the pool hands its free memory
//! back to the driver, and the next step allocates it again. PyTorch's caching allocator keeps
//! what it freed; [`retain_freed_memory`] makes the default pool do the same.

use std::ffi::c_void;

use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::{Device, Result};

/// Raises the release threshold of `device`'s default memory pool to the maximum, so that
/// freed memory stays in the pool for the next allocations (nothing happens for other
/// devices). Called once, when the device is created.
pub fn retain_freed_memory(device: &Device) -> Result<()> {
    let Device::Cuda(dev) = device else {
        return Ok(());
    };
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().map_err(candle_core::Error::wrap)?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: the context is bound to this thread; `pool` receives the device's default pool,
    // and the attribute takes a pointer to a u64 that lives across the call.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(candle_core::Error::wrap)?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut c_void,
        )
        .result()
        .map_err(candle_core::Error::wrap)?;
    }
    Ok(())
}
