//! The stand-in for `cuda_memory.rs` in builds without the `cuda` feature: no CUDA device
//! exists, so there is nothing to set.

use candle_core::{Device, Result};

/// Nothing to do: this build has no CUDA devices.
pub fn retain_freed_memory(_device: &Device) -> Result<()> {
    Ok(())
}
