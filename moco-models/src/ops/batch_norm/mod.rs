//! BatchNorm as an op, device-neutral: [`forward`] normalises an (N, C, ...) input with the
//! batch statistics (training mode, the running statistics moved) or the running ones
//! (evaluation mode), and applies what follows it in a ResNet ([`End`]: a ReLU, the residual
//! add, the downsampling branch's BatchNorm) in the same pass. Dispatch happens here, once:
//!
//! - [`cpu`]: the fused kernels, for float32 CPU tensors (one pass each way, statistics in
//!   f64 blocks; the inference pass for frozen weights);
//! - [`cuda`]: moco-rs's fused CUDA kernels for float32 CUDA tensors, training and evaluation
//!   modes (`Settings::cuda_kernels`, off by default until run on a GPU);
//! - [`cudnn`]: training mode on cuDNN (float32 CUDA tensors in one group, no SyncBN,
//!   `Settings::cudnn_batch_norm`);
//! - [`generic`]: candle's ops on any device and dtype, attached to the graph by one op that
//!   keeps the input and the output only ([`crate::ops::attached`]).
//!
//! In training mode inside a data-parallel [`moco_core::dist::sync_bn::scope`] (a MoCo run with
//! `sync_bn`) the statistics are the global batch's (`torch.nn.SyncBatchNorm`); with
//! `splits = s > 1` the batch is normalised in s groups (the official CIFAR demo's
//! `SplitBatchNorm`: sample i belongs to group i % s).

mod cpu;
#[cfg_attr(not(feature = "cuda"), path = "cuda_absent.rs")]
mod cuda;
#[cfg_attr(not(feature = "cudnn"), path = "cudnn_absent.rs")]
mod cudnn;
mod generic;
mod params;

use candle_core::{Result, Tensor};

use crate::ops::attached::{attach3, Backward3};
use crate::ops::elementwise::add_relu;
use crate::ops::Settings;
use cpu::{Epilogue, InferenceEnd, NormInput};
use generic::{NormState, Normalized};
pub use params::{End, Params};

/// The BatchNorm of `p` on `x` followed by `end`, in training (`train`) or evaluation mode,
/// on the implementation `settings` and the tensors choose.
pub fn forward(
    p: &Params,
    x: &Tensor,
    end: End,
    train: bool,
    settings: &Settings,
) -> Result<Tensor> {
    moco_core::profile::timed("batch norm forward", x.device(), || {
        if settings.cuda_kernels && cuda::applies(p, x, &end, train)? {
            return cuda::forward(p, x, end, train);
        }
        match end {
            End::None => {
                p.check(x)?;
                if train {
                    if p.fusable(x, true, settings)? {
                        return fused(p, x, Epilogue::None);
                    }
                    return generic_train(p, x, Kind::None, None, settings);
                }
                eval(p, x, settings)
            }
            End::Relu => {
                if p.fusable(x, train, settings)? {
                    return fused(p, x, Epilogue::Relu);
                }
                if train {
                    p.check(x)?;
                    return generic_train(p, x, Kind::Relu, None, settings);
                }
                if p.inference_fusable(x, &[], settings)? {
                    return inference(p, x, InferenceEnd::Relu);
                }
                forward(p, x, End::None, train, settings)?.relu()
            }
            End::AddRelu(residual) => {
                let same = residual.dims() == x.dims() && residual.dtype() == x.dtype();
                if p.fusable(x, train, settings)? && same {
                    return fused(p, x, Epilogue::AddRelu(residual));
                }
                if train && same {
                    return generic_train(p, x, Kind::AddRelu, Some((residual, None)), settings);
                }
                if !train && same && p.inference_fusable(x, &[residual], settings)? {
                    return inference(p, x, InferenceEnd::AddRelu(residual));
                }
                add_relu(
                    &forward(p, x, End::None, train, settings)?,
                    residual,
                    settings,
                )
            }
            End::PairAddRelu(other, z) => {
                let same = x.dims() == z.dims() && x.dtype() == z.dtype();
                if p.fusable(x, train, settings)? && other.fusable(z, train, settings)? && same {
                    let (x, z) = (x.contiguous()?, z.contiguous()?);
                    return cpu::normalize_pair_add_relu(
                        prepare_cpu(p, &x)?,
                        prepare_cpu(other, &z)?,
                    );
                }
                if train && same {
                    p.check(x)?;
                    other.check(z)?;
                    return generic_train(
                        p,
                        x,
                        Kind::PairAddRelu,
                        Some((z, Some(other))),
                        settings,
                    );
                }
                if !train
                    && x.dims() == z.dims()
                    && p.inference_fusable(x, &[z], settings)?
                    && other.inference_fusable(z, &[x], settings)?
                {
                    let (a2, d2) = other.eval_scale_shift_f32()?;
                    return inference(p, x, InferenceEnd::PairAddRelu(z, &a2, &d2));
                }
                let zn = forward(other, z, End::None, train, settings)?;
                forward(p, x, End::AddRelu(&zn), train, settings)
            }
        }
    })
}

/// Training mode on the fused CPU kernels, `epilogue` in the same pass.
fn fused(p: &Params, x: &Tensor, epilogue: Epilogue<'_>) -> Result<Tensor> {
    let x = x.contiguous()?;
    cpu::normalize(prepare_cpu(p, &x)?, epilogue)
}

/// Training mode on a contiguous float32 CPU tensor, up to the normalisation: the batch
/// statistics (the global batch's inside a [`moco_core::dist::sync_bn::scope`], SyncBN), the running
/// statistics moved, and what the fused kernels need (the same arithmetic as the generic path).
fn prepare_cpu<'a>(p: &Params, x: &'a Tensor) -> Result<NormInput<'a>> {
    let c = p.channels;
    let dev = x.device();
    let group = moco_core::dist::sync_bn::group();
    let (st, splits) = match &group {
        Some(group) => {
            p.check_sync(x, group.world_size())?;
            (cpu::stats_synced(x, &**group)?, 1)
        }
        None => (cpu::stats(x, p.splits)?, p.splits),
    };
    p.update_running(
        &Tensor::from_slice(&st.mean, (splits, c), dev)?,
        &Tensor::from_slice(&st.var, (splits, c), dev)?,
        st.count as f64,
    )?;
    let (weight, bias) = p.weight_bias_or_identity(dev)?;
    Ok(NormInput {
        x,
        weight,
        bias,
        stats: st,
        eps: p.eps,
        splits,
        synced: group.is_some(),
    })
}

/// Evaluation mode on the fused CPU pass (where `inference_fusable`).
fn inference(p: &Params, x: &Tensor, end: InferenceEnd<'_>) -> Result<Tensor> {
    let (a, d) = p.eval_scale_shift_f32()?;
    cpu::inference(x, &a, &d, end)
}

/// Evaluation mode: the fused pass for frozen float32 CPU tensors, else candle's ops
/// (`y = x * scale + shift`), which record the graph.
fn eval(p: &Params, x: &Tensor, settings: &Settings) -> Result<Tensor> {
    if p.inference_fusable(x, &[], settings)? {
        return inference(p, x, InferenceEnd::None);
    }
    let (scale, shift) = p.eval_scale_shift()?;
    generic::eval(x, &scale, &shift)
}

/// The batch statistics and normalised output of `x` in training mode with candle's ops or,
/// where it applies, cuDNN's; the running statistics moved.
fn normalized(p: &Params, x: &Tensor, settings: &Settings) -> Result<Normalized> {
    let dims = x.dims();
    let (n, l) = (dims[0], dims[2..].iter().product::<usize>());
    let group = moco_core::dist::sync_bn::group();
    let (s, count) = match &group {
        Some(group) => {
            p.check_sync(x, group.world_size())?;
            (1, n * l * group.world_size())
        }
        None => {
            let s = p.splits;
            if n % s != 0 {
                candle_core::bail!("batch of {n} cannot be split into {s} batch-norm groups")
            }
            if (n / s) * l < 2 {
                candle_core::bail!(
                    "batch norm in training mode needs more than one value per channel, got input {dims:?} in {s} group(s)"
                )
            }
            (s, (n / s) * l)
        }
    };
    let (w_var, b_var) = p.weight_bias_or_identity(x.device())?;
    let c = p.channels;
    if settings.cudnn_batch_norm && group.is_none() && cudnn::applies(x, s, p.eps) {
        let w = w_var.detach();
        let (y, mean, invstd) = cudnn::forward(&x.detach(), &w, &b_var.detach(), p.eps)?;
        // cuDNN returns 1 / sqrt(var + eps) (biased variance); the running variance needs var.
        let var = (invstd.sqr()?.recip()? - p.eps)?;
        p.update_running(&mean.reshape((1, c))?, &var.reshape((1, c))?, count as f64)?;
        return Ok(Normalized {
            y,
            weight_bias: Tensor::stack(&[&w_var, &b_var], 0)?,
            state: NormState {
                mean: mean.reshape((1, 1, c, 1))?,
                invstd: invstd.reshape((1, 1, c, 1))?,
                weight: w,
                splits: 1,
                count: count as f64,
                synced: false,
                cudnn_eps: Some(p.eps),
            },
        });
    }
    let out = generic::normalize(x, &w_var, &b_var, p.eps, s, count, group.as_deref())?;
    let (mean, var) = (&out.normalized.state.mean, &out.stats_var);
    p.update_running(&mean.reshape((s, c))?, &var.reshape((s, c))?, count as f64)?;
    Ok(out.normalized)
}

/// What follows the normalisation inside the attached op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    None,
    Relu,
    /// `relu(y + r)`, `r` the op's third operand.
    AddRelu,
    /// `relu(y + y2)`, `y2` the second BatchNorm's output on the op's second operand.
    PairAddRelu,
}

/// Training mode on candle's ops (or cuDNN's), followed by `kind` (`other`: the residual, or
/// the second BatchNorm and its input), attached to the graph as one op keeping the inputs and
/// the output.
fn generic_train(
    p: &Params,
    x: &Tensor,
    kind: Kind,
    other: Option<(&Tensor, Option<&Params>)>,
    settings: &Settings,
) -> Result<Tensor> {
    let first = normalized(p, x, settings)?;
    let mut wb = first.weight_bias.clone();
    let other = match other {
        Some((z, Some(bn))) => {
            let second = normalized(bn, z, settings)?;
            wb = Tensor::cat(&[&wb, &second.weight_bias], 0)?;
            Some((z, Some(second)))
        }
        Some((r, None)) => Some((r, None)),
        None => None,
    };
    attach(kind, x, &wb, first, other)
}

/// `kind` applied to `first.y` (and `r` or `second.y`), attached to the graph with
/// [`NormGrad`]. `x`: the first BatchNorm's input; `wb`: its weight and bias stacked (2, C)
/// (then both BatchNorms', (4, C), for a pair); `other`: `r` for [`Kind::AddRelu`], the second
/// BatchNorm's input for a pair.
fn attach(
    kind: Kind,
    x: &Tensor,
    wb: &Tensor,
    first: Normalized,
    other: Option<(&Tensor, Option<Normalized>)>,
) -> Result<Tensor> {
    let ct = first.state.mean.dtype();
    let out = match (kind, &other) {
        (Kind::None, _) => first.y.clone(),
        (Kind::Relu, _) => first.y.relu()?,
        (Kind::AddRelu, Some((r, _))) => {
            // In the compute dtype, rounded once, as the separate ops would.
            (first.y.to_dtype(ct)? + r.detach().to_dtype(ct)?)?
                .relu()?
                .to_dtype(x.dtype())?
        }
        (Kind::PairAddRelu, Some((_, Some(second)))) => (first.y.to_dtype(ct)?
            + second.y.to_dtype(ct)?)?
        .relu()?
        .to_dtype(x.dtype())?,
        _ => candle_core::bail!("batch-norm-generic: {kind:?} without its operand"),
    };
    // The op keeps the statistics, not the outputs before the end.
    let (a2, a3, second) = match (kind, other) {
        (Kind::AddRelu, Some((r, _))) => (wb.clone(), r.clone(), None),
        (Kind::PairAddRelu, Some((z, second))) => (z.clone(), wb.clone(), second.map(|n| n.state)),
        _ => (wb.clone(), x.clone(), None),
    };
    let op = NormGrad {
        kind,
        first: first.state,
        second,
    };
    attach3(&out, [x, &a2, &a3], op)
}

/// The backward pass of [`attach`]'s op: the gradient through the ReLU (where the output is
/// positive), then each BatchNorm's gradients on the implementation its forward ran on.
struct NormGrad {
    kind: Kind,
    first: NormState,
    second: Option<NormState>,
}

impl NormGrad {
    /// Gradients of one BatchNorm from its input `x` and its output's gradient `dy`: the
    /// input's, and the weight's and bias's stacked as (2, C).
    fn side(state: &NormState, x: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        if let Some(eps) = state.cudnn_eps {
            let (dx, dw, db) = cudnn::backward(
                &x.detach(),
                dy,
                &state.weight,
                &state.mean,
                &state.invstd,
                eps,
            )?;
            return Ok((dx, Tensor::stack(&[&dw, &db], 0)?));
        }
        generic::backward(state, x, dy)
    }
}

impl Backward3 for NormGrad {
    fn name(&self) -> &'static str {
        "batch-norm-generic"
    }

    fn class(&self) -> &'static str {
        "batch norm backward"
    }

    /// Operands: `(x, (2, C) or (4, C) stacked weights and biases, r)` for [`Kind::None`],
    /// [`Kind::Relu`] (where `r` is `x` again and gets no gradient) and [`Kind::AddRelu`];
    /// `(x, z, (4, C))` for [`Kind::PairAddRelu`].
    fn backward(
        &self,
        [a1, a2, a3]: [&Tensor; 3],
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let ct = self.first.mean.dtype();
        let grad = grad.to_dtype(ct)?;
        let dy = match self.kind {
            Kind::None => grad,
            _ => (grad * res.detach().gt(0.0)?.to_dtype(ct)?)?,
        };
        let (dx, dwb) = Self::side(&self.first, a1, &dy)?;
        match (self.kind, &self.second) {
            (Kind::PairAddRelu, Some(second)) => {
                let (dz, dwb2) = Self::side(second, a2, &dy)?;
                let dwb = Tensor::cat(&[&dwb, &dwb2], 0)?.to_dtype(a3.dtype())?;
                Ok((Some(dx), Some(dz), Some(dwb)))
            }
            (Kind::PairAddRelu, None) => {
                candle_core::bail!("batch-norm-generic: a pair without its second BatchNorm")
            }
            (kind, _) => {
                let dr = match kind {
                    Kind::AddRelu => Some(dy.to_dtype(a3.dtype())?),
                    _ => None,
                };
                Ok((Some(dx), Some(dwb.to_dtype(a2.dtype())?), dr))
            }
        }
    }
}
