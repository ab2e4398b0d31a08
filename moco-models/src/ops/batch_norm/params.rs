//! [`Params`] (one BatchNorm's parameters and running statistics, as the op reads and updates
//! them) and [`End`] (what follows the normalisation in the same op): what every
//! implementation of the op shares, with the checks and the per-channel arithmetic (running
//! statistics, evaluation scale and shift) they all use.

use candle_core::{DType, Device, Result, Tensor, Var};

use crate::ops::Settings;

/// One BatchNorm's parameters and running statistics, as the op reads and updates them.
#[derive(Debug, Clone, Copy)]
pub struct Params<'a> {
    /// The learnable scale and shift (C each), absent without affine parameters.
    pub weight_bias: Option<(&'a Tensor, &'a Tensor)>,
    /// The running mean (C), moved in training mode.
    pub running_mean: &'a Var,
    /// The running (unbiased) variance (C), moved in training mode.
    pub running_var: &'a Var,
    /// Added to the variance.
    pub eps: f64,
    /// Weight of the batch statistics in the running ones.
    pub momentum: f64,
    /// Groups the batch is normalised in during training (1 = plain BatchNorm).
    pub splits: usize,
    /// Channels C.
    pub channels: usize,
}

/// What follows the normalisation in the same op.
#[derive(Debug, Clone, Copy)]
pub enum End<'a> {
    /// The normalised output itself.
    None,
    /// `relu(y)`.
    Relu,
    /// `relu(y + residual)`, the end of a ResNet block.
    AddRelu(&'a Tensor),
    /// `relu(y + bn2(z))`, the end of a downsampling ResNet block: `bn2` the downsampling
    /// branch's BatchNorm, `z` its input.
    PairAddRelu(&'a Params<'a>, &'a Tensor),
}

impl Params<'_> {
    pub(super) fn check(&self, x: &Tensor) -> Result<()> {
        if x.rank() < 2 || x.dim(1)? != self.channels {
            candle_core::bail!(
                "batch norm over {} channels got an input of shape {:?}",
                self.channels,
                x.dims()
            )
        }
        Ok(())
    }

    /// Whether training mode on `x` runs on the fused CPU kernels: float32 CPU input, and
    /// either a SyncBN scope or splits that divide the batch with two values or more each.
    pub(super) fn fusable(&self, x: &Tensor, train: bool, settings: &Settings) -> Result<bool> {
        self.check(x)?;
        if !(train && settings.fused(&[x])) {
            return Ok(false);
        }
        if moco_core::dist::sync_bn::group().is_some() {
            return Ok(true);
        }
        let n = x.dim(0)?;
        let l: usize = x.dims()[2..].iter().product();
        Ok(n % self.splits == 0 && (n / self.splits) * l >= 2)
    }

    /// Whether evaluation mode on `x` (with `others` in the same pass) runs on the fused CPU
    /// pass: float32 CPU tensors and nothing to differentiate (no variable among the inputs and
    /// the affine parameters: feature extraction with frozen weights). Otherwise candle's ops
    /// run, and record the graph.
    pub(super) fn inference_fusable(
        &self,
        x: &Tensor,
        others: &[&Tensor],
        settings: &Settings,
    ) -> Result<bool> {
        self.check(x)?;
        let params = self
            .weight_bias
            .is_none_or(|(w, b)| !w.track_op() && !b.track_op());
        let inputs = std::iter::once(x).chain(others.iter().copied());
        Ok(params
            && inputs.clone().all(|t| !t.track_op())
            && settings.fused(&inputs.collect::<Vec<_>>()))
    }

    /// The affine parameters, or 1 and 0 without them.
    pub(super) fn weight_bias_or_identity(&self, dev: &Device) -> Result<(Tensor, Tensor)> {
        Ok(match self.weight_bias {
            Some((w, b)) => (w.clone(), b.clone()),
            None => (
                Tensor::ones(self.channels, DType::F32, dev)?,
                Tensor::zeros(self.channels, DType::F32, dev)?,
            ),
        })
    }

    /// SyncBN's preconditions: one split, more than one value per channel in the global batch.
    pub(super) fn check_sync(&self, x: &Tensor, world: usize) -> Result<()> {
        if self.splits != 1 {
            candle_core::bail!(
                "batch norm splits ({}) emulate several devices on one and cannot be combined with SyncBN across ranks",
                self.splits
            )
        }
        let count = x.elem_count() / self.channels * world;
        if count < 2 {
            candle_core::bail!(
                "batch norm in training mode needs more than one value per channel, got input {:?} on each of {world} ranks",
                x.dims()
            )
        }
        Ok(())
    }

    /// Running statistics: the mean over groups of each group's update (unbiased variance).
    /// `mean` and `var` (biased) are (groups, C).
    pub(super) fn update_running(&self, mean: &Tensor, var: &Tensor, count: f64) -> Result<()> {
        let m = self.momentum;
        let dtype = self.running_mean.dtype();
        let batch_mean = mean.detach().to_dtype(dtype)?.mean(0)?;
        let batch_var = (var.detach().to_dtype(dtype)? * (count / (count - 1.0)))?.mean(0)?;
        let rm = ((self.running_mean.as_detached_tensor() * (1.0 - m))? + (batch_mean * m)?)?;
        let rv = ((self.running_var.as_detached_tensor() * (1.0 - m))? + (batch_var * m)?)?;
        self.running_mean.set(&rm)?;
        self.running_var.set(&rv)?;
        Ok(())
    }

    /// Evaluation mode's `y = x * scale + shift`: `scale = w / sqrt(rv + eps)` and
    /// `shift = b - rm * scale` per channel (differentiable wrt `w` and `b`).
    pub(super) fn eval_scale_shift(&self) -> Result<(Tensor, Tensor)> {
        let inv_std = (self.running_var.as_detached_tensor() + self.eps)?
            .sqrt()?
            .recip()?;
        Ok(match self.weight_bias {
            Some((w, b)) => {
                let scale = (w * &inv_std)?;
                let shift = (b - (self.running_mean.as_detached_tensor() * &scale)?)?;
                (scale, shift)
            }
            None => {
                let shift = (self.running_mean.as_detached_tensor() * &inv_std)?.neg()?;
                (inv_std, shift)
            }
        })
    }

    /// [`eval_scale_shift`](Self::eval_scale_shift) as float32 values (the same rounding).
    pub(crate) fn eval_scale_shift_f32(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let (a, d) = self.eval_scale_shift()?;
        let f32s = |t: Tensor| t.detach().to_dtype(DType::F32)?.to_vec1::<f32>();
        Ok((f32s(a)?, f32s(d)?))
    }
}
