//! BatchNorm with PyTorch's semantics, honouring `train`, optionally split into groups
//! (the official MoCo CIFAR demo's `SplitBatchNorm`, emulating several GPUs on one device).
//! The layer holds the parameters; [`crate::ops::batch_norm`] computes.

use candle_core::{Result, Tensor, Var};
use candle_nn::{Init, ModuleT, VarBuilder};

use crate::ops::batch_norm::{self as op, End, Params};
use crate::ops::Settings;

/// BatchNorm over dimension 1 of an (N, C, ...) input: `BatchNorm1d` on (N, C), `BatchNorm2d` on
/// (N, C, H, W). Variables: `weight`, `bias` (when affine), `running_mean`, `running_var`.
///
/// In training mode with `splits = s > 1`, the batch is normalised in s groups as the official
/// `SplitBatchNorm` does with `input.view(-1, C * s, H, W)`: group j holds the samples
/// j, j + s, j + 2s, ...; the running statistics move towards the mean over groups of the group
/// statistics. In evaluation mode the running statistics are used, whatever `splits`.
///
/// In training mode inside a data-parallel [`moco_core::dist::sync_bn::scope`] (a MoCo run with
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
    settings: Settings,
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

/// Builds a [`BatchNorm`] over `channels` from `vb`, computing on the ops `settings` choose.
pub fn batch_norm(
    channels: usize,
    config: BatchNormConfig,
    settings: Settings,
    vb: VarBuilder,
) -> Result<BatchNorm> {
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
        settings,
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

    fn params(&self) -> Params<'_> {
        Params {
            weight_bias: self.weight_bias.as_ref().map(|(w, b)| (w, b)),
            running_mean: &self.running_mean,
            running_var: &self.running_var,
            eps: self.eps,
            momentum: self.momentum,
            splits: self.splits,
            channels: self.channels,
        }
    }

    /// `relu(forward_t(x, train))`, one pass on the fused kernels.
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        op::forward(&self.params(), x, End::Relu, train, &self.settings)
    }

    /// `relu(forward_t(x, train) + residual)`, the end of a ResNet block, one pass on the
    /// fused kernels (the BatchNorm's own output is then never kept for the backward pass).
    pub fn forward_add_relu_t(&self, x: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        let end = End::AddRelu(residual);
        op::forward(&self.params(), x, end, train, &self.settings)
    }

    /// `relu(forward_t(x, train) + other.forward_t(z, train))`, the end of a downsampling
    /// ResNet block (`other`: the downsampling branch's BatchNorm), one pass on the fused
    /// kernels (neither BatchNorm's output is kept for the backward pass).
    pub fn forward_pair_add_relu_t(
        &self,
        x: &Tensor,
        other: &BatchNorm,
        z: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let second = other.params();
        let end = End::PairAddRelu(&second, z);
        op::forward(&self.params(), x, end, train, &self.settings)
    }
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        op::forward(&self.params(), x, End::None, train, &self.settings)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;
    use moco_core::init::seeded_randn;
    use moco_testing::max_rel;

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
                let bn = batch_norm(c, cfg, Settings::default(), vb).unwrap();
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
            batch_norm(bn.channels, cfg, Settings::default(), vb).unwrap()
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
        let bn = batch_norm(c, cfg, Settings::default(), vb).unwrap();
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
            let add_relu = |a: &Tensor, b: &Tensor| {
                crate::ops::elementwise::add_relu(a, b, &Settings::default())
            };
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
