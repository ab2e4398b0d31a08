//! A linear layer, `x W^T + b` over the last dimension, on every device: candle's matrix
//! products, the bias added by [`add_bias`] (a fused kernel for float32 CPU tensors, whose
//! gradient is a parallel column sum), and the whole attached to the graph as one op that keeps
//! `x` and the parameters but not the product before the bias ([`crate::ops::attached`]).
//! [`linear_add`] folds a residual add into it (a ViT block's `x + proj(..)`).

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::ops::attached::{attach3, Backward3};
use crate::ops::scratch::{f32_slice, filled, row_chunk};
use crate::ops::Settings;

/// A linear layer's backward pass: `dx = g W`, `dW = g^T x`, `db` = the column sums of `g`.
struct LinearGrad {
    settings: Settings,
}

impl Backward3 for LinearGrad {
    fn name(&self) -> &'static str {
        "linear-attached"
    }

    fn class(&self) -> &'static str {
        "linear backward"
    }

    fn backward(
        &self,
        [x, w, b]: [&Tensor; 3],
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, k) = w.dims2()?;
        let g = grad.reshape((grad.elem_count() / out, out))?;
        let dx = match x.track_op() {
            true => Some(g.matmul(&w.detach())?.reshape(x.dims())?),
            false => None,
        };
        let dw = match w.track_op() {
            true => Some(g.t()?.matmul(&x.detach().reshape(((), k))?)?),
            false => None,
        };
        let db = match b.track_op() {
            true => Some(column_sums(&g, &self.settings)?),
            false => None,
        };
        Ok((dx, dw, db))
    }
}

/// `x W^T + b` over the last dimension of `x` (any rank; one matrix product over the rows),
/// keeping `x` and the parameters for the backward pass but not the product before the bias.
/// Candle's matrix products on every device; the bias through [`add_bias`] (fused on float32 CPU
/// tensors, as `settings` allow).
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor, settings: &Settings) -> Result<Tensor> {
    moco_core::profile::timed("linear forward", x.device(), || {
        let dims = x.dims().to_vec();
        let (out, k) = w.dims2()?;
        if dims.last() != Some(&k) || b.dims() != [out] {
            candle_core::bail!(
                "linear: input {dims:?}, weight {:?}, bias {:?}",
                w.dims(),
                b.dims()
            )
        }
        let y = x.detach().reshape(((), k))?.matmul(&w.detach().t()?)?;
        let y = add_bias(&y, &b.detach(), settings)?;
        let mut shape = dims;
        let last = shape.len() - 1;
        shape[last] = out;
        let op = LinearGrad {
            settings: *settings,
        };
        attach3(&y.reshape(shape)?, [x, w, b], op)
    })
}

/// The residual add's backward pass: the gradient reaches both summands unchanged.
struct SumGrad;

impl Backward3 for SumGrad {
    fn name(&self) -> &'static str {
        "residual-add-attached"
    }

    fn class(&self) -> &'static str {
        "linear backward"
    }

    fn backward(
        &self,
        [a, r, _]: [&Tensor; 3],
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let pass = |t: &Tensor| t.track_op().then(|| grad.clone());
        Ok((pass(a), pass(r), None))
    }
}

/// `r + (x W^T + b)`, a ViT block's residual add after a linear layer, keeping no more than
/// [`linear`] does: the sum is computed once, detached, and recorded twice over the same
/// storage, as the linear layer's result (whose backward reaches `x`, `W` and `b`) and as the
/// sum of that result and `r` (whose backward passes the gradient to both). Neither the linear
/// output before the add nor anything else of the sum's size is kept besides the sum itself.
pub fn linear_add(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    r: &Tensor,
    settings: &Settings,
) -> Result<Tensor> {
    moco_core::profile::timed("linear forward", x.device(), || {
        let y = linear(&x.detach(), &w.detach(), &b.detach(), settings)?;
        if y.dims() != r.dims() {
            candle_core::bail!(
                "residual add: linear output {:?}, residual {:?}",
                y.dims(),
                r.dims()
            )
        }
        let sum = (y + r.detach())?;
        let op = LinearGrad {
            settings: *settings,
        };
        let product = attach3(&sum, [x, w, b], op)?;
        attach3(&sum, [&product, r, r], SumGrad)
    })
}

/// `y + b` with `b` broadcast over the rows of `y` (the bias of a linear layer).
struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "moco-add-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_slice(s1, l1, "add_bias (input)")?;
        let b = f32_slice(s2, l2, "add_bias (bias)")?;
        let d = b.len();
        let fill = |i: usize, out: &mut [MaybeUninit<f32>]| {
            let start = i * row_chunk(d);
            for (r, o) in out.chunks_mut(d).enumerate() {
                let row = &y[start + r * d..start + (r + 1) * d];
                for ((o, &v), &b) in o.iter_mut().zip(row).zip(b) {
                    o.write(v + b);
                }
            }
        };
        // SAFETY: every chunk holds whole rows, each written in full.
        let out = unsafe { filled(y.len(), row_chunk(d), fill) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        moco_core::profile::timed("linear backward", g.device(), || {
            let gb = if b.track_op() {
                Some(
                    g.contiguous()?
                        .apply_op1_no_bwd(&ColumnSums { d: b.elem_count() })?,
                )
            } else {
                None
            };
            Ok((y.track_op().then(|| g.clone()), gb))
        })
    }
}

/// The sums of the `d` columns of a row-major matrix, in parallel over row chunks.
struct ColumnSums {
    d: usize,
}

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "moco-column-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s, l, "bias gradient")?;
        let d = self.d;
        let partial: Vec<Vec<f32>> = g
            .par_chunks(row_chunk(d))
            .map(|c| {
                let mut acc = vec![0f32; d];
                for row in c.chunks_exact(d) {
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a += v;
                    }
                }
                acc
            })
            .collect();
        let mut out = vec![0f32; d];
        for acc in partial {
            for (o, a) in out.iter_mut().zip(acc) {
                *o += a;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(d)))
    }
}

/// The column sums of a 2-D tensor (a bias's gradient): in parallel over row chunks on float32
/// CPU tensors (as `settings` allow), candle's `sum(0)` elsewhere.
fn column_sums(g: &Tensor, settings: &Settings) -> Result<Tensor> {
    let (_, d) = g.dims2()?;
    if settings.fused(&[g]) {
        g.contiguous()?.apply_op1_no_bwd(&ColumnSums { d })
    } else {
        g.sum(0)
    }
}

/// `y + b` for a 2-D `y` and a bias `b` of its row length: fused on float32 CPU tensors (as
/// `settings` allow; the bias gradient a parallel column sum), candle's `broadcast_add`
/// elsewhere.
pub fn add_bias(y: &Tensor, b: &Tensor, settings: &Settings) -> Result<Tensor> {
    let (_, d) = y.dims2()?;
    if b.dims() != [d] {
        candle_core::bail!("add_bias: rows of {d}, bias {:?}", b.dims())
    }
    if settings.fused(&[y, b]) {
        y.contiguous()?.apply_op2(&b.contiguous()?, AddBias)
    } else {
        y.broadcast_add(b)
    }
}
