//! BatchNorm's training mode on candle's generic ops (CUDA, Metal, float64 input, or the CPU
//! with its fused kernels switched off), keeping for the backward pass only what PyTorch's
//! autograd keeps: the input and the output.
//!
//! Written as a chain of candle ops, the normalisation kept every intermediate for the backward
//! pass (the centred input, its square, the scaled output, the output before the residual add
//! and the ReLU: 3.4x PyTorch's bytes for a ResNet). Here the forward pass runs the same ops on
//! detached tensors, so that the intermediates are freed as it goes, and its result is attached
//! to the graph as the output of one op ([`crate::attached`]) whose backward computes the
//! gradients with candle's ops from the input, the output and the per-channel statistics, as PyTorch's BatchNorm backward does:
//!
//! `dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))`, `dw = sum(dy * xhat)`,
//! `db = sum(dy)`, with `dy` the output's gradient through the ReLU (where the output is
//! positive) and the means over the normalised group (a split, or with SyncBN the global
//! batch: the two sums are all-reduced over the ranks; the parameters' gradients stay local).

use candle_core::{DType, Result, Tensor};

use crate::attached::{attach3, Backward3};

/// What follows the normalisation inside the op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The normalised output itself.
    None,
    /// `relu(y)`.
    Relu,
    /// `relu(y + r)`, `r` the op's third operand.
    AddRelu,
    /// `relu(y + y2)`, `y2` the second BatchNorm's output on the op's second operand.
    PairAddRelu,
}

/// One BatchNorm's output and the state its backward pass needs.
#[derive(Debug, Clone)]
pub(crate) struct Normalized {
    /// The output, `(x - mean) * invstd * w + b`, detached, in the input's shape and dtype.
    pub y: Tensor,
    /// The weight and the bias (ones and zeros without affine parameters) stacked (2, C), as
    /// recorded in the graph: the op's operand that receives their gradients.
    pub weight_bias: Tensor,
    pub state: NormState,
}

/// What the backward pass needs of one BatchNorm's forward pass (no full-size tensor).
#[derive(Debug, Clone)]
pub(crate) struct NormState {
    /// Statistics (1, s, C, 1) in the compute dtype, detached.
    pub mean: Tensor,
    pub invstd: Tensor,
    /// The weight (C) in the compute dtype, detached (ones without affine parameters).
    pub weight: Tensor,
    /// Number of splits s (1 with SyncBN).
    pub splits: usize,
    /// Values per normalised group: per split, or the global batch's with SyncBN.
    pub count: f64,
    /// Whether the statistics are the global batch's (SyncBN).
    pub synced: bool,
    /// cuDNN's forward pass computed the statistics with this `eps`: the backward pass runs on
    /// cuDNN too ([`crate::cudnn_norm`]).
    #[cfg(feature = "cudnn")]
    pub cudnn_eps: Option<f64>,
}

/// The dtype the generic ops compute in: float64 for float64 input, else float32.
pub(crate) fn compute_dtype(x: &Tensor) -> DType {
    if x.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `t` (N, C, ...) as (N / s, s, C, L) in the compute dtype: sample i * s + j is [i, j].
fn grouped(t: &Tensor, splits: usize, ct: DType) -> Result<Tensor> {
    let dims = t.dims();
    let (n, c) = (dims[0], dims[1]);
    let l: usize = dims[2..].iter().product();
    t.to_dtype(ct)?.reshape((n / splits, splits, c, l))
}

/// The op's backward pass (its forward is computed by the caller, see the module).
struct NormGrad {
    end: End,
    first: NormState,
    second: Option<NormState>,
}

impl NormGrad {
    /// Gradients of one BatchNorm from its input `x` and its output's gradient `dy` (compute
    /// dtype, input's shape): the input's, and the weight's and bias's stacked as (2, C).
    fn side(side: &NormState, x: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cudnn")]
        if let Some(eps) = side.cudnn_eps {
            let (dx, dw, db) = crate::cudnn_norm::backward(
                &x.detach(),
                dy,
                &side.weight,
                &side.mean,
                &side.invstd,
                eps,
            )?;
            return Ok((dx, Tensor::stack(&[&dw, &db], 0)?));
        }
        let ct = side.mean.dtype();
        let c = side.weight.dim(0)?;
        let xs = grouped(&x.detach(), side.splits, ct)?;
        let xhat = xs.broadcast_sub(&side.mean)?.broadcast_mul(&side.invstd)?;
        drop(xs);
        let dys = grouped(dy, side.splits, ct)?;
        let mut sum_dy = dys.sum_keepdim((0, 3))?; // (1, s, C, 1)
        let mut sum_dy_xhat = (&dys * &xhat)?.sum_keepdim((0, 3))?;
        // The parameters' gradients: this rank's sums.
        let dw = sum_dy_xhat.sum((0, 1, 3))?;
        let db = sum_dy.sum((0, 1, 3))?;
        if side.synced {
            let Some(group) = moco_core::sync::group() else {
                candle_core::bail!(
                    "SyncBatchNorm backward outside the data-parallel scope of its forward pass (moco_core::sync::scope)"
                )
            };
            let both = Tensor::cat(&[&sum_dy, &sum_dy_xhat], 0)?;
            let both = group
                .all_reduce_sum(&both)
                .map_err(|e| candle_core::Error::Msg(format!("SyncBatchNorm backward: {e}")))?;
            sum_dy = both.narrow(0, 0, 1)?;
            sum_dy_xhat = both.narrow(0, 1, 1)?;
        }
        let inv_count = 1.0 / side.count;
        let scale = side
            .invstd
            .broadcast_mul(&side.weight.reshape((1, 1, c, 1))?)?;
        let dx = dys
            .broadcast_sub(&(sum_dy * inv_count)?)?
            .sub(&xhat.broadcast_mul(&(sum_dy_xhat * inv_count)?)?)?
            .broadcast_mul(&scale)?
            .reshape(x.dims())?
            .to_dtype(x.dtype())?;
        Ok((dx, Tensor::stack(&[&dw, &db], 0)?))
    }
}

impl Backward3 for NormGrad {
    fn name(&self) -> &'static str {
        "batch-norm-generic"
    }

    /// Operands: `(x, (2, C) or (4, C) stacked weights and biases, r)` for [`End::None`],
    /// [`End::Relu`] (where `r` is `x` again and gets no gradient) and [`End::AddRelu`];
    /// `(x, z, (4, C))` for [`End::PairAddRelu`].
    fn backward(
        &self,
        [a1, a2, a3]: [&Tensor; 3],
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let ct = self.first.mean.dtype();
        let grad = grad.to_dtype(ct)?;
        let dy = match self.end {
            End::None => grad,
            _ => (grad * res.detach().gt(0.0)?.to_dtype(ct)?)?,
        };
        let (dx, dwb) = Self::side(&self.first, a1, &dy)?;
        match (self.end, &self.second) {
            (End::PairAddRelu, Some(second)) => {
                let (dz, dwb2) = Self::side(second, a2, &dy)?;
                let dwb = Tensor::cat(&[&dwb, &dwb2], 0)?.to_dtype(a3.dtype())?;
                Ok((Some(dx), Some(dz), Some(dwb)))
            }
            (End::PairAddRelu, None) => {
                candle_core::bail!("batch-norm-generic: a pair without its second BatchNorm")
            }
            (end, _) => {
                let dr = match end {
                    End::AddRelu => Some(dy.to_dtype(a3.dtype())?),
                    _ => None,
                };
                Ok((Some(dx), Some(dwb.to_dtype(a2.dtype())?), dr))
            }
        }
    }
}

/// `end` applied to `first.y` (and `r` or `second.y`), attached to the graph with the backward
/// pass of this module. `x`: the first BatchNorm's input; `wb`: its weight and bias stacked
/// (2, C) (then both BatchNorms', (4, C), for a pair); `other`: `r` for [`End::AddRelu`], the
/// second BatchNorm's input for a pair.
pub(crate) fn attach(
    end: End,
    x: &Tensor,
    wb: &Tensor,
    first: Normalized,
    other: Option<(&Tensor, Option<Normalized>)>,
) -> Result<Tensor> {
    let ct = first.state.mean.dtype();
    let out = match (end, &other) {
        (End::None, _) => first.y.clone(),
        (End::Relu, _) => first.y.relu()?,
        (End::AddRelu, Some((r, _))) => {
            // In the compute dtype, rounded once, as the separate ops would.
            (first.y.to_dtype(ct)? + r.detach().to_dtype(ct)?)?
                .relu()?
                .to_dtype(x.dtype())?
        }
        (End::PairAddRelu, Some((_, Some(second)))) => (first.y.to_dtype(ct)?
            + second.y.to_dtype(ct)?)?
        .relu()?
        .to_dtype(x.dtype())?,
        _ => candle_core::bail!("batch-norm-generic: {end:?} without its operand"),
    };
    // The op keeps the statistics, not the outputs before the end.
    let (a2, a3, second) = match (end, other) {
        (End::AddRelu, Some((r, _))) => (wb.clone(), r.clone(), None),
        (End::PairAddRelu, Some((z, second))) => (z.clone(), wb.clone(), second.map(|n| n.state)),
        _ => (wb.clone(), x.clone(), None),
    };
    let op = NormGrad {
        end,
        first: first.state,
        second,
    };
    attach3(&out, [x, &a2, &a3], op)
}
