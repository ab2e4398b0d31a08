//! The stand-in for `cuda.rs` in builds without the `cuda` feature: the CUDA kernels apply to
//! no BatchNorm, so another path runs; their forward pass is never called.

use candle_core::{Result, Tensor};

use super::params::{End, Params};

/// Never: this build has no CUDA.
pub(super) fn applies(_p: &Params, _x: &Tensor, _end: &End, _train: bool) -> Result<bool> {
    Ok(false)
}

/// An error: this build has no CUDA.
pub(super) fn forward(_p: &Params, _x: &Tensor, _end: End, _train: bool) -> Result<Tensor> {
    candle_core::bail!("batch-norm-cuda: this build has no CUDA kernels (cargo feature `cuda`)")
}
