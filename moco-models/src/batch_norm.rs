//! BatchNorm with PyTorch's semantics, honouring `train`, optionally split into groups
//! (the official MoCo CIFAR demo's `SplitBatchNorm`, emulating several GPUs on one device).

use candle_core::{DType, Result, Tensor, Var};
use candle_nn::{Init, ModuleT, VarBuilder};

use crate::cpu_batch_norm::{self, Epilogue, InferenceEnd, NormInput};
use crate::generic_norm::{self, End};

/// BatchNorm over dimension 1 of an (N, C, ...) input: `BatchNorm1d` on (N, C), `BatchNorm2d` on
/// (N, C, H, W). Variables: `weight`, `bias` (when affine), `running_mean`, `running_var`.
///
/// In training mode with `splits = s > 1`, the batch is normalised in s groups as the official
/// `SplitBatchNorm` does with `input.view(-1, C * s, H, W)`: group j holds the samples
/// j, j + s, j + 2s, ...; the running statistics move towards the mean over groups of the group
/// statistics. In evaluation mode the running statistics are used, whatever `splits`.
///
/// In training mode inside a data-parallel [`moco_core::sync::scope`] (a MoCo run with
/// `sync_bn`), it is `torch.nn.SyncBatchNorm`: the statistics are the global batch's.
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

/// Whether training-mode BatchNorm runs on cuDNN where it can: float32 CUDA tensors in one
/// group, no SyncBN (environment variable `MOCO_CUDNN_BN=1`, builds with the `cudnn` feature;
/// off by default: not yet run on a GPU). Read once; a value other than `0` or `1`, or `1` in a
/// build without cuDNN, is an error naming the variable.
pub fn cudnn_enabled() -> Result<bool> {
    static ENABLED: std::sync::OnceLock<std::result::Result<bool, String>> =
        std::sync::OnceLock::new();
    let read = || match std::env::var("MOCO_CUDNN_BN").as_deref() {
        Err(_) | Ok("0") => Ok(false),
        Ok("1") if cfg!(feature = "cudnn") => Ok(true),
        Ok("1") => Err("MOCO_CUDNN_BN=1: this build has no cuDNN (cargo feature `cudnn`)".into()),
        Ok(v) => Err(format!("MOCO_CUDNN_BN={v}: expected 0 or 1")),
    };
    ENABLED
        .get_or_init(read)
        .clone()
        .map_err(candle_core::Error::Msg)
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
        if self.fusable(x, true)? {
            return self.forward_fused(x, Epilogue::None);
        }
        self.forward_generic(x, End::None, None)
    }

    /// Training mode on candle's generic ops ([`crate::generic_norm`]: the ops run on detached
    /// tensors, one op in the graph keeping the input and the output), followed by `end`
    /// (`other`: the residual, or the second BatchNorm and its input).
    fn forward_generic(
        &self,
        x: &Tensor,
        end: End,
        other: Option<(&Tensor, Option<&BatchNorm>)>,
    ) -> Result<Tensor> {
        let first = self.normalized(x)?;
        let mut wb = first.weight_bias.clone();
        let other = match other {
            Some((z, Some(bn))) => {
                let second = bn.normalized(z)?;
                wb = Tensor::cat(&[&wb, &second.weight_bias], 0)?;
                Some((z, Some(second)))
            }
            Some((r, None)) => Some((r, None)),
            None => None,
        };
        generic_norm::attach(end, x, &wb, first, other)
    }

    /// The batch statistics of `x` (per split, or the global batch's inside a SyncBN scope),
    /// the running statistics moved, and the normalised output, all on detached tensors with
    /// candle's ops in the compute dtype (float32, or float64 for float64 input; on a GPU their
    /// reductions are tree sums, accurate in float32 as PyTorch's GPU kernels are).
    fn normalized(&self, x: &Tensor) -> Result<generic_norm::Normalized> {
        let dims = x.dims().to_vec();
        let (n, c) = (dims[0], dims[1]);
        let l: usize = dims[2..].iter().product();
        let group = moco_core::sync::group();
        let (s, count) = match &group {
            Some(group) => {
                self.check_sync(x, group.world_size())?;
                (1, n * l * group.world_size())
            }
            None => {
                let s = self.splits;
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
        #[cfg(feature = "cudnn")]
        if group.is_none() && crate::cudnn_norm::applies(x, s, self.eps)? {
            return self.normalized_cudnn(x, count);
        }
        let ct = generic_norm::compute_dtype(x);
        // (N/s, s, C, L): sample i*s + j is element [i, j] (group j).
        let xs = x.detach().to_dtype(ct)?.reshape((n / s, s, c, l))?;
        let (mean, var) = match &group {
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
        let invstd = (&var + self.eps)?.sqrt()?.recip()?;
        let (w_var, b_var) = self.weight_bias_or_identity(x.device())?;
        let (w, b) = (w_var.detach().to_dtype(ct)?, b_var.detach().to_dtype(ct)?);
        let y = xs
            .broadcast_sub(&mean)?
            .broadcast_mul(&invstd.broadcast_mul(&w.reshape((1, 1, c, 1))?)?)?
            .broadcast_add(&b.reshape((1, 1, c, 1))?)?
            .reshape(dims)?
            .to_dtype(x.dtype())?;
        self.update_running(&mean.reshape((s, c))?, &var.reshape((s, c))?, count as f64)?;
        Ok(generic_norm::Normalized {
            y,
            weight_bias: Tensor::stack(&[&w_var, &b_var], 0)?,
            state: generic_norm::NormState {
                mean,
                invstd,
                weight: w,
                splits: s,
                count: count as f64,
                synced: group.is_some(),
                #[cfg(feature = "cudnn")]
                cudnn_eps: None,
            },
        })
    }

    /// [`Self::normalized`] on cuDNN (one group, no SyncBN; see [`crate::cudnn_norm`]).
    #[cfg(feature = "cudnn")]
    fn normalized_cudnn(&self, x: &Tensor, count: usize) -> Result<generic_norm::Normalized> {
        let c = self.channels;
        let (w_var, b_var) = self.weight_bias_or_identity(x.device())?;
        let w = w_var.detach();
        let (y, mean, invstd) =
            crate::cudnn_norm::forward(&x.detach(), &w, &b_var.detach(), self.eps)?;
        // cuDNN returns 1 / sqrt(var + eps) (biased variance); the running variance needs var.
        let var = (invstd.sqr()?.recip()? - self.eps)?;
        self.update_running(&mean.reshape((1, c))?, &var.reshape((1, c))?, count as f64)?;
        Ok(generic_norm::Normalized {
            y,
            weight_bias: Tensor::stack(&[&w_var, &b_var], 0)?,
            state: generic_norm::NormState {
                mean: mean.reshape((1, 1, c, 1))?,
                invstd: invstd.reshape((1, 1, c, 1))?,
                weight: w,
                splits: 1,
                count: count as f64,
                synced: false,
                cudnn_eps: Some(self.eps),
            },
        })
    }

    /// Training mode on a contiguous float32 CPU tensor, up to the normalisation: the batch
    /// statistics (the global batch's inside a [`moco_core::sync::scope`], SyncBN), the
    /// running statistics moved, and what the fused kernels of [`crate::cpu_batch_norm`] need
    /// (the same arithmetic as the generic path).
    fn prepare_cpu<'a>(&self, x: &'a Tensor) -> Result<NormInput<'a>> {
        let c = self.channels;
        let dev = x.device();
        let group = moco_core::sync::group();
        let (st, splits) = match &group {
            Some(group) => {
                self.check_sync(x, group.world_size())?;
                (cpu_batch_norm::stats_synced(x, &**group)?, 1)
            }
            None => (cpu_batch_norm::stats(x, self.splits)?, self.splits),
        };
        self.update_running(
            &Tensor::from_slice(&st.mean, (splits, c), dev)?,
            &Tensor::from_slice(&st.var, (splits, c), dev)?,
            st.count as f64,
        )?;
        let (weight, bias) = self.weight_bias_or_identity(dev)?;
        Ok(NormInput {
            x,
            weight,
            bias,
            stats: st,
            eps: self.eps,
            splits,
            synced: group.is_some(),
        })
    }

    /// SyncBN's preconditions: one split, more than one value per channel in the global batch.
    fn check_sync(&self, x: &Tensor, world: usize) -> Result<()> {
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

    /// The affine parameters, or 1 and 0 without them.
    fn weight_bias_or_identity(&self, dev: &candle_core::Device) -> Result<(Tensor, Tensor)> {
        Ok(match &self.weight_bias {
            Some((w, b)) => (w.clone(), b.clone()),
            None => (
                Tensor::ones(self.channels, DType::F32, dev)?,
                Tensor::zeros(self.channels, DType::F32, dev)?,
            ),
        })
    }

    /// `relu(forward_t(x, train))`, fused into one kernel in training mode on float32 CPU
    /// tensors.
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if self.fusable(x, train)? {
            return self.forward_fused(x, Epilogue::Relu);
        }
        if train {
            self.check(x)?;
            return self.forward_generic(x, End::Relu, None);
        }
        if self.inference_fusable(x, &[])? {
            return self.inference(x, InferenceEnd::Relu);
        }
        self.forward_t(x, train)?.relu()
    }

    /// `relu(forward_t(x, train) + residual)`, the end of a ResNet block: fused into one kernel
    /// in training mode on float32 CPU tensors, where the BatchNorm's own output is then never
    /// kept for the backward pass.
    pub fn forward_add_relu_t(&self, x: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        let same = residual.dims() == x.dims() && residual.dtype() == x.dtype();
        if self.fusable(x, train)? && same {
            return self.forward_fused(x, Epilogue::AddRelu(residual));
        }
        if train && same {
            return self.forward_generic(x, End::AddRelu, Some((residual, None)));
        }
        if !train && same && self.inference_fusable(x, &[residual])? {
            return self.inference(x, InferenceEnd::AddRelu(residual));
        }
        crate::cpu_elementwise::add_relu(&self.forward_t(x, train)?, residual)
    }

    /// `relu(forward_t(x, train) + other.forward_t(z, train))`, the end of a downsampling
    /// ResNet block (`other`: the downsampling branch's BatchNorm): one kernel in training mode
    /// on float32 CPU tensors, where neither BatchNorm's output is kept for the backward pass.
    pub fn forward_pair_add_relu_t(
        &self,
        x: &Tensor,
        other: &BatchNorm,
        z: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        if self.fusable(x, train)?
            && other.fusable(z, train)?
            && x.dims() == z.dims()
            && x.dtype() == z.dtype()
        {
            let (x, z) = (x.contiguous()?, z.contiguous()?);
            return cpu_batch_norm::normalize_pair_add_relu(
                self.prepare_cpu(&x)?,
                other.prepare_cpu(&z)?,
            );
        }
        if train && x.dims() == z.dims() && x.dtype() == z.dtype() {
            self.check(x)?;
            other.check(z)?;
            return self.forward_generic(x, End::PairAddRelu, Some((z, Some(other))));
        }
        if !train
            && x.dims() == z.dims()
            && self.inference_fusable(x, &[z])?
            && other.inference_fusable(z, &[x])?
        {
            let (a2, d2) = other.eval_scale_shift_f32()?;
            return self.inference(x, InferenceEnd::PairAddRelu(z, &a2, &d2));
        }
        self.forward_add_relu_t(x, &other.forward_t(z, train)?, train)
    }

    /// Training mode on the fused CPU kernels, `epilogue` in the same pass (where
    /// [`fusable`](Self::fusable)).
    fn forward_fused(&self, x: &Tensor, epilogue: Epilogue<'_>) -> Result<Tensor> {
        let x = x.contiguous()?;
        cpu_batch_norm::normalize(self.prepare_cpu(&x)?, epilogue)
    }

    /// Whether training mode on `x` runs on the fused CPU kernels: float32 CPU input, and
    /// either a SyncBN scope or splits that divide the batch with two values or more each.
    fn fusable(&self, x: &Tensor, train: bool) -> Result<bool> {
        self.check(x)?;
        if !(train && moco_core::kernels::fused_cpu(&[x])) {
            return Ok(false);
        }
        if moco_core::sync::group().is_some() {
            return Ok(true);
        }
        let n = x.dim(0)?;
        let l: usize = x.dims()[2..].iter().product();
        Ok(n % self.splits == 0 && (n / self.splits) * l >= 2)
    }

    /// Running statistics: the mean over groups of each group's update (unbiased variance).
    /// `mean` and `var` (biased) are (groups, C).
    fn update_running(&self, mean: &Tensor, var: &Tensor, count: f64) -> Result<()> {
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
    fn eval_scale_shift(&self) -> Result<(Tensor, Tensor)> {
        let inv_std = (self.running_var.as_detached_tensor() + self.eps)?
            .sqrt()?
            .recip()?;
        Ok(match &self.weight_bias {
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
    fn eval_scale_shift_f32(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let (a, d) = self.eval_scale_shift()?;
        let f32s = |t: Tensor| t.detach().to_dtype(DType::F32)?.to_vec1::<f32>();
        Ok((f32s(a)?, f32s(d)?))
    }

    /// Whether evaluation mode on `x` (with `others` in the same pass) runs on the fused CPU
    /// pass: float32 CPU tensors and nothing to differentiate (no variable among the inputs and
    /// the affine parameters: feature extraction with frozen weights). Otherwise candle's ops
    /// run, and record the graph.
    fn inference_fusable(&self, x: &Tensor, others: &[&Tensor]) -> Result<bool> {
        self.check(x)?;
        let params = self
            .weight_bias
            .as_ref()
            .is_none_or(|(w, b)| !w.track_op() && !b.track_op());
        let inputs = std::iter::once(x).chain(others.iter().copied());
        Ok(params
            && inputs.clone().all(|t| !t.track_op())
            && moco_core::kernels::fused_cpu(&inputs.collect::<Vec<_>>()))
    }

    /// Evaluation mode on the fused CPU pass (where [`inference_fusable`](Self::inference_fusable)).
    fn inference(&self, x: &Tensor, end: InferenceEnd<'_>) -> Result<Tensor> {
        let (a, d) = self.eval_scale_shift_f32()?;
        cpu_batch_norm::inference(x, &a, &d, end)
    }

    fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        if self.inference_fusable(x, &[])? {
            return self.inference(x, InferenceEnd::None);
        }
        let c = self.channels;
        let mut shape = vec![1usize; x.rank()];
        shape[1] = c;
        // y = x * scale + shift with scale = w / sqrt(rv + eps), shift = b - rm * scale.
        let (scale, shift) = self.eval_scale_shift()?;
        let ct = generic_norm::compute_dtype(x);
        x.to_dtype(ct)?
            .broadcast_mul(&scale.to_dtype(ct)?.reshape(shape.as_slice())?)?
            .broadcast_add(&shift.to_dtype(ct)?.reshape(shape.as_slice())?)?
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::test_util::max_rel;
    use candle_core::Device;
    use candle_nn::VarMap;
    use moco_core::init::seeded_randn;

    /// The fused CPU kernel (float32 input) against the generic candle-op path (the same
    /// values as float64, which takes the generic path): output, running statistics and the
    /// gradients wrt input, weight and bias, plain and split, 4-D and 2-D, affine or not.
    #[test]
    fn fused_cpu_kernel_matches_the_generic_path_through_backprop() {
        let dev = Device::Cpu;
        for (dims, splits, affine) in [
            (vec![8, 5, 3, 4], 1, true),
            (vec![8, 5, 3, 4], 4, true),
            (vec![6, 7], 2, true),
            (vec![6, 7], 1, false),
        ] {
            let c = dims[1];
            let make = || {
                let vars = VarMap::new();
                let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
                let cfg = BatchNormConfig {
                    splits,
                    affine,
                    ..Default::default()
                };
                let bn = batch_norm(c, cfg, vb).unwrap();
                if let Some((w, b)) = &bn.weight_bias {
                    // Non-trivial scale and shift.
                    for (t, v, seed) in [(w, 1.5f64, 1), (b, -0.25, 2)] {
                        let var = vars
                            .data()
                            .lock()
                            .unwrap()
                            .values()
                            .find(|var| var.as_tensor().id() == t.id())
                            .cloned()
                            .unwrap();
                        var.set(
                            &((seeded_randn(0.0, 1.0, c, seed, &dev).unwrap() * 0.1).unwrap() + v)
                                .unwrap(),
                        )
                        .unwrap();
                    }
                }
                (bn, vars)
            };
            let (fast, fv) = make();
            let (slow, sv) = make();
            // Same parameters in both.
            for (k, v) in fv.data().lock().unwrap().iter() {
                sv.data().lock().unwrap()[k].set(v.as_tensor()).unwrap();
            }
            let x = Var::from_tensor(&seeded_randn(0.0, 2.0, dims.as_slice(), 6, &dev).unwrap())
                .unwrap();
            let x = Var::from_tensor(&(x.as_tensor() + 0.5).unwrap()).unwrap();
            let x64 = Var::from_tensor(&x.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
            // The fused ReLU on the 4-D cases, against candle's relu after the generic path.
            let relu = dims.len() == 4;
            let (ya, yb) = if relu {
                (
                    fast.forward_relu_t(x.as_tensor(), true).unwrap(),
                    slow.forward_t(x64.as_tensor(), true)
                        .unwrap()
                        .relu()
                        .unwrap(),
                )
            } else {
                (
                    fast.forward_t(x.as_tensor(), true).unwrap(),
                    slow.forward_t(x64.as_tensor(), true).unwrap(),
                )
            };
            let what = format!("{dims:?} splits {splits} affine {affine} relu {relu}");
            assert!(max_rel(&ya, &yb) < 1e-5, "{what}: output");
            for (a, b) in [
                (fast.running_mean(), slow.running_mean()),
                (fast.running_var(), slow.running_var()),
            ] {
                assert!(
                    max_rel(a.as_tensor(), b.as_tensor()) < 1e-6,
                    "{what}: running stats"
                );
            }
            let mix = seeded_randn(0.0, 1.0, ya.shape(), 60, &dev).unwrap();
            let ga = (&ya * &mix).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (&yb * mix.to_dtype(DType::F64).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gx = ga.get(x.as_tensor()).unwrap();
            assert!(
                max_rel(gx, gb.get(x64.as_tensor()).unwrap()) < 1e-4,
                "{what}: grad input"
            );
            if let (Some((wa, ba)), Some((wb, bb))) = (&fast.weight_bias, &slow.weight_bias) {
                for (a, b, name) in [(wa, wb, "weight"), (ba, bb, "bias")] {
                    let (a, b) = (ga.get(a).unwrap(), gb.get(b).unwrap());
                    assert!(
                        max_rel(a, b) < 1e-5,
                        "{what}: grad {name} {}",
                        max_rel(a, b)
                    );
                }
            }
        }
    }

    /// Evaluation mode with frozen weights (plain tensors: the fused inference pass) equals
    /// the same BatchNorm with variables (candle's ops, recording the graph) to the bit: alone,
    /// with a ReLU, with the residual add, with the downsampling pair; 4-D and 2-D input,
    /// affine or not. The fused result records no op.
    #[test]
    fn inference_pass_equals_candle_ops_in_eval_mode() {
        let dev = Device::Cpu;
        let frozen = |bn: &BatchNorm, affine: bool| {
            let mut t = std::collections::HashMap::new();
            if affine {
                let (w, b) = bn.weight_bias.clone().unwrap();
                t.insert("weight".to_string(), w.detach());
                t.insert("bias".to_string(), b.detach());
            }
            t.insert("running_mean".into(), bn.running_mean.as_detached_tensor());
            t.insert("running_var".into(), bn.running_var.as_detached_tensor());
            let vb = VarBuilder::from_tensors(t, DType::F32, &dev);
            let cfg = BatchNormConfig {
                affine,
                ..Default::default()
            };
            batch_norm(bn.channels, cfg, vb).unwrap()
        };
        for (dims, affine) in [
            (vec![4, 6, 5, 3], true),
            (vec![4, 6, 5, 3], false),
            (vec![7, 6], true),
        ] {
            let (mut bn, _v) = random_bn(6, 1, 40);
            let (mut bn2, _v2) = random_bn(6, 1, 50);
            if !affine {
                (bn.weight_bias, bn2.weight_bias) = (None, None);
            }
            // Running statistics away from 0 and 1: a few training-mode forwards.
            for step in 0..3 {
                let x = (seeded_randn(0.0, 2.0, dims.as_slice(), 30 + step, &dev).unwrap() + 0.7)
                    .unwrap();
                bn.forward_t(&x, true).unwrap();
                bn2.forward_t(&(x * 0.5).unwrap(), true).unwrap();
            }
            let (fb, fb2) = (frozen(&bn, affine), frozen(&bn2, affine));
            let x = Var::from_tensor(&seeded_randn(0.0, 2.0, dims.as_slice(), 7, &dev).unwrap())
                .unwrap();
            let z = Var::from_tensor(&seeded_randn(0.0, 1.0, dims.as_slice(), 8, &dev).unwrap())
                .unwrap();
            let (xt, zt) = (x.as_tensor(), z.as_tensor());
            let (xd, zd) = (xt.detach(), zt.detach());
            let cases: [(&str, Tensor, Tensor); 4] = [
                (
                    "alone",
                    bn.forward_t(xt, false).unwrap(),
                    fb.forward_t(&xd, false).unwrap(),
                ),
                (
                    "relu",
                    bn.forward_relu_t(xt, false).unwrap(),
                    fb.forward_relu_t(&xd, false).unwrap(),
                ),
                (
                    "add relu",
                    bn.forward_add_relu_t(xt, zt, false).unwrap(),
                    fb.forward_add_relu_t(&xd, &zd, false).unwrap(),
                ),
                (
                    "pair add relu",
                    bn.forward_pair_add_relu_t(xt, &bn2, zt, false).unwrap(),
                    fb.forward_pair_add_relu_t(&xd, &fb2, &zd, false).unwrap(),
                ),
            ];
            for (what, ops, fused) in cases {
                let what = format!("{dims:?} affine {affine} {what}");
                assert!(ops.track_op(), "{what}: the reference must be candle's ops");
                assert!(
                    !fused.track_op(),
                    "{what}: the inference pass records no op"
                );
                assert_eq!(max_rel(&ops, &fused), 0.0, "{what}");
            }
        }
    }

    /// A BatchNorm over `c` channels with a random scale around 1.5 and shift around -0.25.
    fn random_bn(c: usize, splits: usize, mut seed: u64) -> (BatchNorm, VarMap) {
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
        let cfg = BatchNormConfig {
            splits,
            ..Default::default()
        };
        let bn = batch_norm(c, cfg, vb).unwrap();
        for var in vars.all_vars() {
            let t = var.as_tensor();
            let center = match &bn.weight_bias {
                Some((w, _)) if w.id() == t.id() => 1.5,
                Some((_, b)) if b.id() == t.id() => -0.25,
                _ => continue,
            };
            let noise = (seeded_randn(0.0, 1.0, c, seed, &dev).unwrap() * 0.3).unwrap();
            seed += 1;
            var.set(&(noise + center).unwrap()).unwrap();
        }
        (bn, vars)
    }

    /// The fused ends of a ResNet block, `relu(bn(x) + r)` and `relu(bn(x) + bn2(z))`, against
    /// the BatchNorms followed by the separate add + ReLU op: equal to the bit, output and
    /// every gradient (inputs, weights, biases), with and without splits.
    #[test]
    fn fused_residual_ends_equal_batch_norm_then_add_relu() {
        let dev = Device::Cpu;
        let dims = (8, 6, 5, 3);
        for splits in [1, 4] {
            let (bn, _v1) = random_bn(6, splits, 10);
            let (bn2, _v2) = random_bn(6, splits, 20);
            let (w, b) = bn.weight_bias.clone().unwrap();
            let (w2, b2) = bn2.weight_bias.clone().unwrap();
            let x = Var::from_tensor(&seeded_randn(0.0, 2.0, dims, 9, &dev).unwrap()).unwrap();
            let z = Var::from_tensor(&seeded_randn(0.0, 1.0, dims, 10, &dev).unwrap()).unwrap();
            let (xt, zt) = (x.as_tensor(), z.as_tensor());
            let mix = seeded_randn(0.0, 1.0, dims, 5, &dev).unwrap();
            let add_relu = crate::cpu_elementwise::add_relu;
            for pair in [false, true] {
                let (fused, separate) = if pair {
                    (
                        bn.forward_pair_add_relu_t(xt, &bn2, zt, true).unwrap(),
                        add_relu(
                            &bn.forward_t(xt, true).unwrap(),
                            &bn2.forward_t(zt, true).unwrap(),
                        )
                        .unwrap(),
                    )
                } else {
                    (
                        bn.forward_add_relu_t(xt, zt, true).unwrap(),
                        add_relu(&bn.forward_t(xt, true).unwrap(), zt).unwrap(),
                    )
                };
                let what = format!("splits {splits} pair {pair}");
                assert_eq!(max_rel(&fused, &separate), 0.0, "{what}: output");
                let grads = |y: &Tensor| (y * &mix).unwrap().sum_all().unwrap().backward().unwrap();
                let (ga, gb) = (grads(&fused), grads(&separate));
                let mut checked = vec![(xt, "x"), (zt, "z"), (&w, "weight"), (&b, "bias")];
                if pair {
                    checked.extend([(&w2, "weight 2"), (&b2, "bias 2")]);
                }
                for (t, name) in checked {
                    let (a, b) = (ga.get(t).unwrap(), gb.get(t).unwrap());
                    assert_eq!(max_rel(a, b), 0.0, "{what}: grad {name}");
                }
            }
        }
    }
}
