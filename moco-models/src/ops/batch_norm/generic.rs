//! BatchNorm on candle's generic ops (CUDA, Metal, float64 input, or the CPU with the generic
//! kernels chosen), keeping for the backward pass only what PyTorch's autograd keeps: the
//! input and the output.
//!
//! Written as a chain of candle ops, the normalisation kept every intermediate for the backward
//! pass (the centred input, its square, the scaled output, the output before the residual add
//! and the ReLU: 3.4x PyTorch's bytes for a ResNet). Here the forward pass ([`normalize`]) runs
//! the same ops on detached tensors, so that the intermediates are freed as it goes; the op
//! module attaches its result to the graph as one op, whose backward ([`backward`]) computes
//! the gradients with candle's ops from the input, the output and the per-channel statistics,
//! as PyTorch's BatchNorm backward does:
//!
//! `dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))`, `dw = sum(dy * xhat)`,
//! `db = sum(dy)`, with `dy` the output's gradient through the ReLU (where the output is
//! positive) and the means over the normalised group (a split, or with SyncBN the global
//! batch: the two sums are all-reduced over the ranks; the parameters' gradients stay local).

use candle_core::{DType, Result, Tensor};
use moco_core::Collective;

/// One BatchNorm's output and the state its backward pass needs.
#[derive(Debug, Clone)]
pub(super) struct Normalized {
    /// The output, `(x - mean) * invstd * w + b`, detached, in the input's shape and dtype.
    pub y: Tensor,
    /// The weight and the bias (ones and zeros without affine parameters) stacked (2, C), as
    /// recorded in the graph: the op's operand that receives their gradients.
    pub weight_bias: Tensor,
    pub state: NormState,
}

/// What the backward pass needs of one BatchNorm's forward pass (no full-size tensor).
#[derive(Debug, Clone)]
pub(super) struct NormState {
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
    /// cuDNN too.
    pub cudnn_eps: Option<f64>,
}

/// [`normalize`]'s result: the output and state, and the biased variance (1, s, C, 1) for the
/// running statistics.
pub(super) struct NormalizeOut {
    pub normalized: Normalized,
    pub stats_var: Tensor,
}

/// The dtype the generic ops compute in: float64 for float64 input, else float32.
fn compute_dtype(x: &Tensor) -> DType {
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

/// The batch statistics of `x` (per split of `splits`, or the global batch's over `group`:
/// SyncBN) and the normalised output, all on detached tensors with candle's ops in the compute
/// dtype (float32, or float64 for float64 input; on a GPU their reductions are tree sums,
/// accurate in float32 as PyTorch's GPU kernels are). `w_var` and `b_var` (C) are the weight
/// and bias as the graph records them; `count` the values per normalised group.
pub(super) fn normalize(
    x: &Tensor,
    w_var: &Tensor,
    b_var: &Tensor,
    eps: f64,
    splits: usize,
    count: usize,
    group: Option<&dyn Collective>,
) -> Result<NormalizeOut> {
    let dims = x.dims().to_vec();
    let (n, c) = (dims[0], dims[1]);
    let l: usize = dims[2..].iter().product();
    let s = splits;
    let ct = compute_dtype(x);
    // (N/s, s, C, L): sample i*s + j is element [i, j] (group j).
    let xs = x.detach().to_dtype(ct)?.reshape((n / s, s, c, l))?;
    let (mean, var) = match group {
        Some(group) => {
            // Per-channel sums over this rank's values, then over the ranks; two passes.
            let all_sum = |t: &Tensor| -> Result<Tensor> {
                group
                    .all_reduce_sum(&t.sum_keepdim((0, 3))?)
                    .map_err(|e| candle_core::Error::Msg(format!("SyncBatchNorm: {e}")))
            };
            let mean = (all_sum(&xs)? / count as f64)?;
            let var = (all_sum(&xs.broadcast_sub(&mean)?.sqr()?)? / count as f64)?;
            (mean, var)
        }
        None => {
            let mean = xs.mean_keepdim((0, 3))?; // (1, s, C, 1)
            let var = xs.broadcast_sub(&mean)?.sqr()?.mean_keepdim((0, 3))?; // biased
            (mean, var)
        }
    };
    let invstd = (&var + eps)?.sqrt()?.recip()?;
    let (w, b) = (w_var.detach().to_dtype(ct)?, b_var.detach().to_dtype(ct)?);
    let y = xs
        .broadcast_sub(&mean)?
        .broadcast_mul(&invstd.broadcast_mul(&w.reshape((1, 1, c, 1))?)?)?
        .broadcast_add(&b.reshape((1, 1, c, 1))?)?
        .reshape(dims)?
        .to_dtype(x.dtype())?;
    Ok(NormalizeOut {
        normalized: Normalized {
            y,
            weight_bias: Tensor::stack(&[w_var, b_var], 0)?,
            state: NormState {
                mean,
                invstd,
                weight: w,
                splits: s,
                count: count as f64,
                synced: group.is_some(),
                cudnn_eps: None,
            },
        },
        stats_var: var,
    })
}

/// Gradients of one BatchNorm from its input `x` and its output's gradient `dy` (compute
/// dtype, input's shape): the input's, and the weight's and bias's stacked as (2, C).
pub(super) fn backward(side: &NormState, x: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
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
        let Some(group) = moco_core::dist::sync_bn::group() else {
            candle_core::bail!(
                "SyncBatchNorm backward outside the data-parallel scope of its forward pass (moco_core::dist::sync_bn::scope)"
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

/// Evaluation mode, `y = x * scale + shift` per channel (dimension 1), with candle's ops in the
/// compute dtype; differentiable (the graph is recorded).
pub(super) fn eval(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    let mut shape = vec![1usize; x.rank()];
    shape[1] = x.dim(1)?;
    let ct = compute_dtype(x);
    x.to_dtype(ct)?
        .broadcast_mul(&scale.to_dtype(ct)?.reshape(shape.as_slice())?)?
        .broadcast_add(&shift.to_dtype(ct)?.reshape(shape.as_slice())?)?
        .to_dtype(x.dtype())
}
