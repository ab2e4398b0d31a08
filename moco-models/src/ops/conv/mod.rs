//! The 2-D convolution (dilation 1, any stride, padding and groups; NCHW), device-neutral:
//! [`conv2d`] chooses, once, between
//!
//! - `cpu.rs`: moco-rs's CPU kernels (float32 CPU tensors with [`Kernels::Fused`]): im2col +
//!   GEMM on the `gemm` crate or oneDNN's primitives (`onednn.rs`, [`ConvEngine`]), each pass
//!   parallel over the batch;
//! - `cudnn.rs`: cuDNN's three convolutions (float32 CUDA tensors, builds with `cudnn`);
//! - `generic.rs`: candle's `conv2d` with a backward pass of convolutions and matrix products
//!   (any other device or dtype).
//!
//! Builds without `onednn` or `cudnn` compile a stand-in for that file (`*_absent.rs`).
//!
//! [`Kernels::Fused`]: moco_core::Kernels::Fused

mod cpu;
#[cfg_attr(not(feature = "cudnn"), path = "cudnn_absent.rs")]
mod cudnn;
mod generic;
mod geometry;
#[cfg_attr(not(moco_onednn), path = "onednn_absent.rs")]
mod onednn;

use candle_core::{Result, Tensor};

pub use cpu::conv2d_backward;
use generic::Engine;

use crate::ops::settings::{ConvEngine, Settings};

/// `conv2d(x, w)` with dilation 1 on the implementation `settings` and the operands choose.
/// The same result on each, within float32 rounding.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    groups: usize,
    settings: &Settings,
) -> Result<Tensor> {
    moco_core::profile::timed("convolution forward", x.device(), || {
        if settings.fused(&[x, w]) {
            return cpu::conv2d(x, w, padding, stride, groups, settings.conv_engine);
        }
        let engine = if cudnn::applies(x, w, groups) {
            Engine::Cudnn
        } else {
            Engine::Candle
        };
        generic::conv2d(x, w, padding, stride, groups, engine)
    })
}

/// The CPU kernels on `engine` whatever the settings (float32 CPU tensors): for benchmarks
/// and tests of one engine against another.
pub fn conv2d_on(
    engine: ConvEngine,
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    groups: usize,
) -> Result<Tensor> {
    if !engine.is_available() {
        candle_core::bail!("conv2d: the {} engine is not in this build", engine.name())
    }
    cpu::conv2d(x, w, padding, stride, groups, engine)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::{DType, Device, Var};
    use moco_core::init::seeded_randn;
    use moco_testing::max_rel;

    #[test]
    fn a_frozen_input_gets_no_gradient_and_other_devices_fall_back() {
        let dev = Device::Cpu;
        let s = Settings::default();
        let x = seeded_randn(0.0, 1.0, (2, 3, 6, 6), 2, &dev).unwrap();
        let w = Var::from_tensor(&seeded_randn(0.0, 1.0, (4, 3, 3, 3), 9, &dev).unwrap()).unwrap();
        let g = conv2d(&x, w.as_tensor(), 1, 1, 1, &s)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&x).is_none() && g.get(w.as_tensor()).is_some());
        // float64 takes candle's path and agrees.
        let (x64, w64) = (
            x.to_dtype(DType::F64).unwrap(),
            w.as_tensor().to_dtype(DType::F64).unwrap(),
        );
        let a = conv2d(&x64, &w64, 1, 1, 1, &s)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let b = conv2d(&x, w.as_tensor(), 1, 1, 1, &s).unwrap();
        assert!(max_rel(&a, &b) < 1e-5);
    }

    /// An engine this build lacks is an error (the settings refuse it too).
    #[cfg(not(moco_onednn))]
    #[test]
    fn an_engine_not_built_is_an_error() {
        let x = Tensor::zeros((1, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(conv2d_on(ConvEngine::OneDnn, &x, &x, 1, 1, 1).is_err());
    }
}
