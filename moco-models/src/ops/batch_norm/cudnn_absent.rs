//! The stand-in for `cudnn.rs` in builds without the `cudnn` feature: cuDNN applies to no
//! BatchNorm, so the generic path runs; its passes are never called.

use candle_core::{Result, Tensor};

/// Never: this build has no cuDNN.
pub(super) fn applies(_x: &Tensor, _splits: usize, _eps: f64) -> bool {
    false
}

fn absent() -> candle_core::Error {
    candle_core::Error::Msg(
        "batch-norm-cudnn: this build has no cuDNN (cargo feature `cudnn`)".into(),
    )
}

/// An error: this build has no cuDNN.
pub(super) fn forward(
    _x: &Tensor,
    _w: &Tensor,
    _b: &Tensor,
    _eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    Err(absent())
}

/// An error: this build has no cuDNN.
pub(super) fn backward(
    _x: &Tensor,
    _dy: &Tensor,
    _w: &Tensor,
    _mean: &Tensor,
    _invstd: &Tensor,
    _eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    Err(absent())
}
