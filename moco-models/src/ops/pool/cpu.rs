//! [`max_pool2d`]: max pooling for float32 tensors on the CPU, a candle custom op with its own
//! backward with `torch.nn.MaxPool2d`'s semantics (padding that never wins, the first maximum
//! of a window in row-major order, NaN propagated).
//!
//! The op keeps nothing but its input for the backward pass, which finds each window's maximum
//! again.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use crate::ops::scratch::{f32_slice, filled, with_f32};

/// `MaxPool2d(kernel, stride, padding)` (square, no dilation, floor mode).
#[derive(Debug, Clone, Copy)]
struct MaxPool2d {
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl MaxPool2d {
    /// Output height or width for an input extent `n`.
    fn out(&self, n: usize) -> usize {
        (n + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// Index in `plane` (h x w) of the first maximum of output position (oh, ow)'s window.
    fn argmax(&self, plane: &[f32], w: usize, h: usize, oh: usize, ow: usize) -> usize {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        // The window clipped to the image (padding never wins).
        let (h0, w0) = ((oh * s).saturating_sub(p), (ow * s).saturating_sub(p));
        let (h1, w1) = ((oh * s + k - p).min(h), (ow * s + k - p).min(w));
        let mut best = f32::NEG_INFINITY;
        let mut at = h0 * w + w0;
        for ih in h0..h1 {
            for (iw, &v) in plane[ih * w..][w0..w1].iter().enumerate() {
                if v > best || v.is_nan() {
                    best = v;
                    at = ih * w + w0 + iw;
                }
            }
        }
        at
    }
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "moco-max-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "max_pool2d")?;
        let (n, c, h, w) = l.shape().dims4()?;
        let (ho, wo) = (self.out(h), self.out(w));
        let fill = |plane: usize, y: &mut [MaybeUninit<f32>]| {
            let xp = &x[plane * h * w..][..h * w];
            for (o, y) in y.iter_mut().enumerate() {
                y.write(xp[self.argmax(xp, w, h, o / wo, o % wo)]);
            }
        };
        // SAFETY: every plane of the output is written element by element.
        let y = unsafe { filled(n * c * ho * wo, ho * wo, fill) };
        Ok((CpuStorage::F32(y), Shape::from((n, c, ho, wo))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, gy: &Tensor) -> Result<Option<Tensor>> {
        moco_core::profile::timed("max pool backward", gy.device(), || {
            let (_, _, h, w) = x.dims4()?;
            let (ho, wo) = (self.out(h), self.out(w));
            let gy = gy.contiguous()?;
            // Each output's gradient goes to its window's maximum; windows overlap within a plane
            // only, so planes run in parallel.
            let gx = with_f32(x, "max_pool2d (input)", |xv| {
                with_f32(&gy, "max_pool2d (output gradient)", |gv| {
                    let mut gx = vec![0f32; xv.len()];
                    gx.par_chunks_mut(h * w).enumerate().for_each(|(plane, g)| {
                        let xp = &xv[plane * h * w..][..h * w];
                        let gp = &gv[plane * ho * wo..][..ho * wo];
                        for (o, &d) in gp.iter().enumerate() {
                            g[self.argmax(xp, w, h, o / wo, o % wo)] += d;
                        }
                    });
                    gx
                })
            })??;
            Ok(Some(Tensor::from_vec(gx, x.shape(), x.device())?))
        })
    }
}

/// `torch.nn.functional.max_pool2d(x, kernel, stride, padding)` on a float32 CPU tensor
/// (N, C, H, W), differentiable. `padding` may be at most half the kernel, as in PyTorch.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        candle_core::bail!("max_pool2d (cpu): expected a float32 CPU tensor")
    }
    super::window::check_window(x, kernel, stride, padding, "max_pool2d (cpu)")?;
    x.contiguous()?.apply_op1(MaxPool2d {
        kernel,
        stride,
        padding,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::{Device, Var};
    use moco_core::init::seeded_randn;

    /// PyTorch's CPU kernel written out: -inf start, the first maximum in row-major order.
    fn reference(
        x: &[f32],
        (n, c, h, w): (usize, usize, usize, usize),
        k: usize,
        s: usize,
        p: usize,
    ) -> (Vec<f32>, Vec<usize>) {
        let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let (mut y, mut idx) = (vec![], vec![]);
        for plane in 0..n * c {
            for oh in 0..ho {
                for ow in 0..wo {
                    let (mut best, mut at) = (f32::NEG_INFINITY, None);
                    for kh in 0..k {
                        for kw in 0..k {
                            let (ih, iw) = (
                                (oh * s + kh) as isize - p as isize,
                                (ow * s + kw) as isize - p as isize,
                            );
                            if ih < 0 || iw < 0 || ih >= h as isize || iw >= w as isize {
                                continue;
                            }
                            let i = plane * h * w + ih as usize * w + iw as usize;
                            if at.is_none() || x[i] > best {
                                best = x[i];
                                at = Some(i);
                            }
                        }
                    }
                    y.push(best);
                    idx.push(at.unwrap());
                }
            }
        }
        (y, idx)
    }

    /// Forward and backward against the reference on several geometries, with negative
    /// values (padding must not win) and many ties (values rounded to a coarse grid).
    #[test]
    fn matches_pytorch_semantics_forward_and_backward() {
        let dev = Device::Cpu;
        for (dims, k, s, p) in [
            ((2, 3, 9, 8), 3, 2, 1),
            ((1, 2, 7, 7), 3, 1, 1),
            ((2, 1, 6, 10), 2, 2, 0),
            ((1, 2, 11, 5), 5, 3, 2),
        ] {
            let x = (seeded_randn(0.0, 1.0, dims, 1, &dev).unwrap() * 2.0)
                .unwrap()
                .round()
                .unwrap();
            let x = Var::from_tensor(&(x - 3.0).unwrap()).unwrap();
            let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (want, idx) = reference(&xv, dims, k, s, p);
            let y = max_pool2d(x.as_tensor(), k, s, p).unwrap();
            assert_eq!(
                y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want,
                "{dims:?} k{k} s{s} p{p}"
            );
            let gy = seeded_randn(0.0, 1.0, y.shape(), 2, &dev).unwrap();
            let grads = (&y * &gy).unwrap().sum_all().unwrap().backward().unwrap();
            let mut gx = vec![0f32; xv.len()];
            for (i, g) in idx
                .iter()
                .zip(gy.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            {
                gx[*i] += g;
            }
            let got = grads
                .get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(got, gx, "{dims:?} k{k} s{s} p{p}: gradient");
        }
    }

    #[test]
    fn rejects_a_padding_larger_than_half_the_kernel() {
        let x = Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let e = max_pool2d(&x, 3, 2, 2).unwrap_err().to_string();
        assert!(e.contains("padding 2"), "{e}");
    }
}
