//! The stand-in for `cudnn.rs` in builds without the `cudnn` feature: cuDNN applies to no
//! convolution, so the generic path runs; its passes are never called.

use candle_core::{Result, Tensor};

/// Never: this build has no cuDNN.
pub(super) fn applies(_x: &Tensor, _w: &Tensor, _groups: usize) -> bool {
    false
}

fn absent() -> candle_core::Error {
    candle_core::Error::Msg("conv2d-cudnn: this build has no cuDNN (cargo feature `cudnn`)".into())
}

/// An error: this build has no cuDNN.
pub(super) fn forward(_x: &Tensor, _w: &Tensor, _padding: usize, _stride: usize) -> Result<Tensor> {
    Err(absent())
}

/// An error: this build has no cuDNN.
pub(super) fn input_grad(
    _x: &Tensor,
    _w: &Tensor,
    _g: &Tensor,
    _padding: usize,
    _stride: usize,
) -> Result<Tensor> {
    Err(absent())
}

/// An error: this build has no cuDNN.
pub(super) fn weight_grad(
    _x: &Tensor,
    _w: &Tensor,
    _g: &Tensor,
    _padding: usize,
    _stride: usize,
) -> Result<Tensor> {
    Err(absent())
}
