//! The convolution on candle's generic ops (CUDA, Metal, and the CPU with the fused kernels
//! switched off), with a backward pass made of convolutions and matrix products.
//!
//! Candle's own backward of `conv2d` computes the gradient wrt the input with
//! `conv_transpose2d`, which on CUDA is a direct loop per output element with no matrix
//! product, and computes it also for an input that needs none (the images under the stem).
//! Here the forward pass is candle's `conv2d` (im2col and one matrix product); the backward:
//! - wrt the input, only when the input records a graph: the gradient, zero-dilated by the
//!   stride and padded, convolved with the weight flipped and transposed, `conv2d(dilate(g),
//!   flip(W)^T)`: im2col and one matrix product, as the forward;
//! - wrt the weight: `conv2d(x^T, g^T)` with the stride as the dilation (candle's own
//!   formulation, one matrix product over all images and positions).
//!
//! Groups other than 1 take candle's `conv2d` with its own backward. With the `cudnn` feature,
//! float32 CUDA tensors take cuDNN's three convolutions instead (`cudnn.rs`, [`Engine::Cudnn`],
//! chosen by the op's `mod.rs`), attached to the graph the same way.

use candle_core::{Result, Tensor};

use super::cudnn;
use crate::ops::attached::{attach3, Backward3};

/// Who computes the three convolutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Engine {
    /// Candle's `conv2d` and this module's backward.
    Candle,
    /// cuDNN (`cudnn.rs`: float32 CUDA tensors, no groups, builds with the `cudnn` feature).
    Cudnn,
}

/// `conv2d(x, w, padding, stride, groups)` (dilation 1) on candle's ops or cuDNN's (`engine`),
/// with this module's backward pass for `groups == 1`.
pub(super) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    groups: usize,
    engine: Engine,
) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    let tracked = x.track_op() || w.track_op();
    if engine == Engine::Candle && (groups != 1 || padding >= kh || padding >= kw || !tracked) {
        return x.conv2d(w, padding, stride, 1, groups);
    }
    let y = match engine {
        Engine::Candle => x.detach().conv2d(&w.detach(), padding, stride, 1, 1)?,
        Engine::Cudnn => cudnn::forward(&x.detach(), &w.detach(), padding, stride)?,
    };
    if !tracked {
        return Ok(y);
    }
    let op = ConvGrad {
        padding,
        stride,
        engine,
    };
    // attach3 takes three operands: the weight stands in as the third, with no gradient.
    attach3(&y, [x, w, w], op)
}

struct ConvGrad {
    padding: usize,
    stride: usize,
    engine: Engine,
}

impl Backward3 for ConvGrad {
    fn name(&self) -> &'static str {
        "conv2d-attached"
    }

    fn class(&self) -> &'static str {
        "convolution backward"
    }

    fn backward(
        &self,
        [x, w, _]: [&Tensor; 3],
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (track_x, track_w) = (x.track_op(), w.track_op());
        let (x, w) = (x.detach(), w.detach());
        let (p, s) = (self.padding, self.stride);
        let gx = match (track_x, self.engine) {
            (false, _) => None,
            (true, Engine::Candle) => Some(input_grad(&x, &w, grad, p, s)?),
            (true, Engine::Cudnn) => Some(cudnn::input_grad(&x, &w, grad, p, s)?),
        };
        let gw = match (track_w, self.engine) {
            (false, _) => None,
            (true, Engine::Candle) => Some(weight_grad(&x, &w, grad, p, s)?),
            (true, Engine::Cudnn) => Some(cudnn::weight_grad(&x, &w, grad, p, s)?),
        };
        Ok((gx, gw, None))
    }
}

/// The gradient of `conv2d(x, w, padding, stride)` wrt `x`, given the output's gradient `g`.
fn input_grad(x: &Tensor, w: &Tensor, g: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (_, _, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    let (n, o, ho, wo) = g.dims4()?;
    // Zero-dilated by the stride: (ho - 1) * stride + 1 rows, g's values every stride-th.
    let g = match stride {
        1 => g.clone(),
        s => g
            .reshape((n, o, ho, 1, wo, 1))?
            .pad_with_zeros(3, 0, s - 1)?
            .pad_with_zeros(5, 0, s - 1)?
            .reshape((n, o, ho * s, wo * s))?
            .narrow(2, 0, (ho - 1) * s + 1)?
            .narrow(3, 0, (wo - 1) * s + 1)?,
    };
    // A full convolution of it with the flipped kernel, k - 1 - padding on each side, plus the
    // rows and columns the forward's stride left out at the end.
    let (top, left) = (kh - 1 - padding, kw - 1 - padding);
    let bottom = top + h - ((ho - 1) * stride + kh - 2 * padding);
    let right = left + wd - ((wo - 1) * stride + kw - 2 * padding);
    // flip (index_select) needs a contiguous input and returns a fresh contiguous tensor.
    let wt = w.transpose(0, 1)?.contiguous()?.flip(&[2, 3])?;
    if top == bottom && left == right && top == left {
        return g.conv2d(&wt, top, 1, 1, 1);
    }
    g.pad_with_zeros(2, top, bottom)?
        .pad_with_zeros(3, left, right)?
        .conv2d(&wt, 0, 1, 1, 1)
}

/// The gradient of `conv2d(x, w, padding, stride)` wrt `w`, given the output's gradient `g`.
fn weight_grad(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    let gw = x
        .transpose(0, 1)?
        .conv2d(&g.transpose(0, 1)?, padding, 1, stride, 1)?
        .transpose(0, 1)?;
    let (_, _, gh, gwd) = gw.dims4()?;
    match gh != kh || gwd != kw {
        true => gw.narrow(2, 0, kh)?.narrow(3, 0, kw)?.contiguous(),
        false => gw.contiguous(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ops::settings::ConvEngine;
    use candle_core::{DType, Device, Var};
    use moco_core::init::seeded_randn;
    use moco_testing::max_rel;

    /// Against the fused CPU kernels (`cpu.rs`, checked against a direct loop in float64),
    /// over the strides, paddings and kernels of the ResNets and odd sizes, non-square ones too
    /// (which candle's own backward gets wrong: it takes the output padding of the height for
    /// the width).
    #[test]
    fn gradients_match_the_fused_kernels() {
        let dev = Device::Cpu;
        let cases = [
            // (n, c, h, w, o, k, stride, padding)
            (2, 3, 9, 9, 4, 3, 1, 1),
            (2, 3, 9, 8, 4, 3, 2, 1),
            (2, 3, 10, 10, 4, 3, 2, 1),
            (2, 4, 11, 11, 5, 7, 2, 3),
            (2, 4, 12, 12, 5, 7, 2, 3),
            (3, 6, 8, 8, 5, 1, 1, 0),
            (3, 6, 8, 8, 5, 1, 2, 0),
            (3, 6, 7, 7, 5, 1, 2, 0),
            (1, 2, 7, 7, 3, 3, 3, 0),
            (2, 2, 6, 6, 3, 2, 2, 0),
            (2, 2, 5, 5, 3, 3, 1, 0),
            (2, 3, 8, 11, 4, 3, 2, 1),
            (16, 8, 16, 16, 8, 3, 2, 1),
            (16, 8, 8, 8, 8, 1, 2, 0),
            (16, 8, 8, 8, 8, 3, 1, 1),
            (16, 32, 16, 16, 64, 1, 2, 0),
            (16, 64, 8, 8, 128, 3, 2, 1),
            (32, 64, 8, 8, 128, 3, 2, 1),
        ];
        for (n, c, h, wd, o, k, s, p) in cases {
            let x =
                Var::from_tensor(&seeded_randn(0.0, 1., (n, c, h, wd), 1, &dev).unwrap()).unwrap();
            let w =
                Var::from_tensor(&seeded_randn(0.0, 1., (o, c, k, k), 2, &dev).unwrap()).unwrap();
            let y0 = crate::ops::conv::cpu::conv2d(&x, &w, p, s, 1, ConvEngine::default()).unwrap();
            let mix = seeded_randn(0.0, 1., y0.dims(), 3, &dev).unwrap();
            let g0 = (&y0 * &mix).unwrap().sum_all().unwrap().backward().unwrap();
            let y = conv2d(&x, &w, p, s, 1, Engine::Candle).unwrap();
            let g = (&y * &mix).unwrap().sum_all().unwrap().backward().unwrap();
            let what = format!("n{n} c{c} {h}x{wd} o{o} k{k} s{s} p{p}");
            assert!(max_rel(&y, &y0) < 1e-5, "{what}: forward");
            let gx = max_rel(g.get(&x).unwrap(), g0.get(&x).unwrap());
            let gw = max_rel(g.get(&w).unwrap(), g0.get(&w).unwrap());
            assert!(gx < 1e-5 && gw < 1e-5, "{what}: {gx:.1e} {gw:.1e}");
        }
    }

    /// An input that records no graph (the images under the stem) gets no gradient, and costs
    /// none.
    #[test]
    fn no_gradient_for_a_constant_input() {
        let dev = Device::Cpu;
        let x = seeded_randn(0.0, 1., (2, 3, 8, 8), 4, &dev).unwrap();
        let w = Var::from_tensor(&seeded_randn(0.0, 1., (4, 3, 3, 3), 5, &dev).unwrap()).unwrap();
        let g = conv2d(&x, &w, 1, 2, 1, Engine::Candle)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&x).is_none());
        assert_eq!(g.get(&w).unwrap().dims(), [4, 3, 3, 3]);
        assert_eq!(g.get(&w).unwrap().dtype(), DType::F32);
    }
}
