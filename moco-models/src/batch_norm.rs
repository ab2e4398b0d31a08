//! BatchNorm with PyTorch's semantics, honouring `train`, optionally split into groups
//! (the official MoCo CIFAR demo's `SplitBatchNorm`, emulating several GPUs on one device).

use candle_core::{DType, Result, Tensor, Var};
use candle_nn::{Init, ModuleT, VarBuilder};

/// BatchNorm over dimension 1 of an (N, C, ...) input: `BatchNorm1d` on (N, C), `BatchNorm2d` on
/// (N, C, H, W). Variables: `weight`, `bias` (when affine), `running_mean`, `running_var`.
///
/// In training mode with `splits = s > 1`, the batch is normalised in s groups as the official
/// `SplitBatchNorm` does with `input.view(-1, C * s, H, W)`: group j holds the samples
/// j, j + s, j + 2s, ...; the running statistics move towards the mean over groups of the group
/// statistics. In evaluation mode the running statistics are used, whatever `splits`.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight_bias: Option<(Tensor, Tensor)>,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
    splits: usize,
    channels: usize,
}

/// Settings of a [`BatchNorm`].
#[derive(Debug, Clone, Copy)]
pub struct BatchNormConfig {
    /// Added to the variance (PyTorch: 1e-5).
    pub eps: f64,
    /// Weight of the batch statistics in the running ones (PyTorch: 0.1).
    pub momentum: f64,
    /// Learnable scale and shift.
    pub affine: bool,
    /// Initial scale (0 for `zero_init_residual`'s last BN of a block).
    pub weight_init: f64,
    /// Number of groups the batch is normalised in during training (1 = plain BatchNorm).
    pub splits: usize,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        Self {
            eps: 1e-5,
            momentum: 0.1,
            affine: true,
            weight_init: 1.0,
            splits: 1,
        }
    }
}

/// Builds a [`BatchNorm`] over `channels` from `vb`.
pub fn batch_norm(channels: usize, config: BatchNormConfig, vb: VarBuilder) -> Result<BatchNorm> {
    if config.splits == 0 {
        candle_core::bail!("batch norm splits must be at least 1")
    }
    let weight_bias = if config.affine {
        Some((
            vb.get_with_hints(channels, "weight", Init::Const(config.weight_init))?,
            vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
        ))
    } else {
        None
    };
    let running_mean =
        Var::from_tensor(&vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?)?;
    let running_var =
        Var::from_tensor(&vb.get_with_hints(channels, "running_var", Init::Const(1.0))?)?;
    Ok(BatchNorm {
        weight_bias,
        running_mean,
        running_var,
        eps: config.eps,
        momentum: config.momentum,
        splits: config.splits,
        channels,
    })
}

impl BatchNorm {
    /// The running mean (C).
    pub fn running_mean(&self) -> &Var {
        &self.running_mean
    }

    /// The running variance (C).
    pub fn running_var(&self) -> &Var {
        &self.running_var
    }

    fn check(&self, x: &Tensor) -> Result<()> {
        if x.rank() < 2 || x.dim(1)? != self.channels {
            candle_core::bail!(
                "batch norm over {} channels got an input of shape {:?}",
                self.channels,
                x.dims()
            )
        }
        Ok(())
    }

    fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (n, c) = (dims[0], dims[1]);
        let s = self.splits;
        if n % s != 0 {
            candle_core::bail!("batch of {n} cannot be split into {s} batch-norm groups")
        }
        let l: usize = dims[2..].iter().product();
        let count = (n / s) * l;
        if count < 2 {
            candle_core::bail!(
                "batch norm in training mode needs more than one value per channel, got input {dims:?} in {s} group(s)"
            )
        }
        // x: (N/s, s, C, L): sample i*s + j is element [i, j] (group j).
        let xs = x.to_dtype(DType::F32)?.reshape((n / s, s, c, l))?;
        // Statistics are reduced in f64, as PyTorch's CPU kernel accumulates them in double:
        // an f32 sum over N*H*W values loses digits that deep networks amplify.
        let mean = xs
            .to_dtype(DType::F64)?
            .mean_keepdim((0, 3))?
            .to_dtype(DType::F32)?; // (1, s, C, 1)
        let centered = xs.broadcast_sub(&mean)?;
        let var = centered
            .to_dtype(DType::F64)?
            .sqr()?
            .mean_keepdim((0, 3))?
            .to_dtype(DType::F32)?; // biased
        let mut y = centered.broadcast_div(&(&var + self.eps)?.sqrt()?)?;
        if let Some((w, b)) = &self.weight_bias {
            y = y
                .broadcast_mul(&w.reshape((1, 1, c, 1))?)?
                .broadcast_add(&b.reshape((1, 1, c, 1))?)?;
        }
        // Running statistics: the mean over groups of each group's update (unbiased variance).
        let m = self.momentum;
        let batch_mean = mean.detach().reshape((s, c))?.mean(0)?;
        let batch_var =
            (var.detach().reshape((s, c))? * (count as f64 / (count as f64 - 1.0)))?.mean(0)?;
        let rm = ((self.running_mean.as_detached_tensor() * (1.0 - m))? + (batch_mean * m)?)?;
        let rv = ((self.running_var.as_detached_tensor() * (1.0 - m))? + (batch_var * m)?)?;
        self.running_mean.set(&rm)?;
        self.running_var.set(&rv)?;
        y.reshape(dims)?.to_dtype(x.dtype())
    }

    fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        let c = self.channels;
        let mut shape = vec![1usize; x.rank()];
        shape[1] = c;
        // y = x * scale + shift with scale = w / sqrt(rv + eps), shift = b - rm * scale.
        let inv_std = (self.running_var.as_detached_tensor() + self.eps)?
            .sqrt()?
            .recip()?;
        let (scale, shift) = match &self.weight_bias {
            Some((w, b)) => {
                let scale = (w * &inv_std)?;
                let shift = (b - (self.running_mean.as_detached_tensor() * &scale)?)?;
                (scale, shift)
            }
            None => {
                let shift = (self.running_mean.as_detached_tensor() * &inv_std)?.neg()?;
                (inv_std, shift)
            }
        };
        let x32 = x.to_dtype(DType::F32)?;
        x32.broadcast_mul(&scale.reshape(shape.as_slice())?)?
            .broadcast_add(&shift.reshape(shape.as_slice())?)?
            .to_dtype(x.dtype())
    }
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.check(x)?;
        if train {
            self.forward_train(x)
        } else {
            self.forward_eval(x)
        }
    }
}
