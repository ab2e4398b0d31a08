//! The stand-in for `cuda.rs` in builds without the `cuda` feature (`Settings::cuda` is never
//! true there, so this is never called).

use candle_core::{Result, Tensor};

/// An error: this build has no CUDA.
pub(super) fn max_pool2d(_x: &Tensor, _k: usize, _s: usize, _p: usize) -> Result<Tensor> {
    candle_core::bail!("max_pool2d (cuda): this build has no CUDA kernels (cargo feature `cuda`)")
}
