//! Training-mode BatchNorm for float32 tensors on the CPU as one candle custom op with its own
//! backward: statistics in parallel per channel (blocks summed in f64, like PyTorch's CPU kernel
//! accumulates in double), normalisation and affine in one pass, and the closed-form gradient in two, where
//! candle's generic ops take a dozen passes and allocations each way.
//!
//! Split BatchNorm (the official demo's `SplitBatchNorm`) is supported: with `s` splits, sample
//! `n` belongs to group `n % s`, and every (group, channel) pair has its own statistics.
//!
//! So is SyncBN ([`stats_synced`], `normalize(.., synced = true)`): the per-channel sums of the
//! forward statistics and of the backward's reductions are summed over the ranks of the current
//! [`moco_core::dist::sync_bn`] group, so that the statistics and the input gradient are those of the
//! global batch.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor};
use moco_core::Collective;
use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::ops::elementwise::relu_grad;
use crate::ops::scratch::{self, f32_slice, filled};

/// Per (group, channel) batch statistics of an (N, C, L) input: mean and biased variance,
/// indexed `group * C + channel`.
#[derive(Debug, Clone)]
pub struct Stats {
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
    /// Values per (group, channel): N / s * L.
    pub count: usize,
}

fn dims3(dims: &[usize]) -> (usize, usize, usize) {
    (dims[0], dims[1], dims[2..].iter().product())
}

fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    scratch::with_f32(t, "batch norm (cpu)", f)
}

/// The sum of `f(a[i], b[i])`: 16 float32 lanes (vectorised) within blocks of 1024 values, the
/// blocks added in f64. Close to an f64 sum throughout: a lane adds at most 64 values.
fn plane_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f64 {
    let mut total = 0f64;
    for (ca, cb) in a.chunks(1024).zip(b.chunks(1024)) {
        let mut acc = [0f32; 16];
        let (mut ia, mut ib) = (ca.chunks_exact(16), cb.chunks_exact(16));
        for (xa, xb) in (&mut ia).zip(&mut ib) {
            for j in 0..16 {
                acc[j] += f(xa[j], xb[j]);
            }
        }
        let mut t: f64 = acc.iter().map(|&v| f64::from(v)).sum();
        for (&x, &y) in ia.remainder().iter().zip(ib.remainder()) {
            t += f64::from(f(x, y));
        }
        total += t;
    }
    total
}

/// Mean and biased variance of each (group, channel) of the contiguous (N, C, ...) tensor `x`:
/// the mean summed in f64, the variance from the values centred on the float32 mean, squared and
/// summed in f64 (the same arithmetic as the generic path).
pub fn stats(x: &Tensor, splits: usize) -> Result<Stats> {
    let (n, c, l) = dims3(x.dims());
    let s = splits;
    let count = n / s * l;
    let per_channel: Vec<(Vec<f32>, Vec<f32>)> = with_f32(x, |x| {
        (0..c)
            .into_par_iter()
            .map(|ch| {
                let mut mean = vec![0f32; s];
                let mut var = vec![0f32; s];
                for g in 0..s {
                    let planes = (g..n).step_by(s).map(|i| &x[(i * c + ch) * l..][..l]);
                    let sum: f64 = planes.clone().map(|p| plane_sum(p, p, |v, _| v)).sum();
                    let m = (sum / count as f64) as f32;
                    let sq: f64 = planes
                        .map(|p| {
                            plane_sum(p, p, |v, _| {
                                let d = v - m;
                                d * d
                            })
                        })
                        .sum();
                    mean[g] = m;
                    var[g] = (sq / count as f64) as f32;
                }
                (mean, var)
            })
            .collect()
    })?;
    let mut mean = vec![0f32; s * c];
    let mut var = vec![0f32; s * c];
    for (ch, (m, v)) in per_channel.into_iter().enumerate() {
        for g in 0..s {
            mean[g * c + ch] = m[g];
            var[g * c + ch] = v[g];
        }
    }
    Ok(Stats { mean, var, count })
}

/// The element-wise sum of `v` over the ranks of `comm` (float32 on the wire, as every
/// collective here).
fn all_reduce(comm: &dyn Collective, v: Vec<f32>) -> Result<Vec<f32>> {
    let n = v.len();
    let t = Tensor::from_vec(v, n, &Device::Cpu)?;
    comm.all_reduce_sum(&t)
        .map_err(|e| candle_core::Error::Msg(format!("SyncBatchNorm: {e}")))?
        .to_vec1::<f32>()
}

/// The statistics of the global batch of a data-parallel run, from this rank's contiguous
/// (N, C, ...) share `x` (every rank holds as many values): each rank's mean and biased
/// variance ([`stats`]) gathered from all ranks in one collective and combined in f64 (the
/// mean of the means; the mean of the variances plus the variance of the means), as
/// `torch.nn.SyncBatchNorm` combines its ranks' statistics. `count` is the global count.
pub fn stats_synced(x: &Tensor, comm: &dyn Collective) -> Result<Stats> {
    let local = stats(x, 1)?;
    let c = local.mean.len();
    let world = comm.world_size();
    let mine = Tensor::from_vec([local.mean, local.var].concat(), (1, 2 * c), &Device::Cpu)?;
    let all = comm
        .all_gather(&mine)
        .map_err(|e| candle_core::Error::Msg(format!("SyncBatchNorm: {e}")))?
        .to_vec2::<f32>()?;
    let (mut mean, mut var) = (vec![0f32; c], vec![0f32; c]);
    for ch in 0..c {
        let means = all.iter().map(|r| f64::from(r[ch]));
        let m = means.clone().sum::<f64>() / world as f64;
        let spread: f64 = means.map(|v| (v - m) * (v - m)).sum();
        let within: f64 = all.iter().map(|r| f64::from(r[c + ch])).sum();
        mean[ch] = m as f32;
        var[ch] = ((within + spread) / world as f64) as f32;
    }
    Ok(Stats {
        mean,
        var,
        count: local.count * world,
    })
}

/// What follows the normalisation in the same pass.
#[derive(Debug, Clone, Copy)]
pub enum Epilogue<'a> {
    /// Nothing: BatchNorm alone.
    None,
    /// A ReLU (the gradient masked by the output in the backward).
    Relu,
    /// The residual connection of a ResNet block, `relu(bn(x) + residual)`: the BatchNorm's
    /// output is never a tensor of its own, so the autograd graph does not keep it alive
    /// until the backward pass (as the separate add would, one block output per block).
    AddRelu(&'a Tensor),
}

/// BatchNorm's normalisation with the batch statistics of its input, shared by the ops below.
struct Norm {
    stats: Arc<Stats>,
    inv_std: Arc<Vec<f32>>,
    splits: usize,
    /// The statistics are the global batch's ([`stats_synced`]): the backward's per-channel
    /// sums are summed over the ranks of the current sync group before they enter the input
    /// gradient.
    synced: bool,
}

/// The gradients of [`Norm::backward`]: input (a tensor), weight and bias (C values each).
type NormGrads = (Option<Tensor>, Option<Vec<f32>>, Option<Vec<f32>>);

impl Norm {
    /// Per (group, channel): `a = weight * inv_std` and `d = bias - mean * a`, so that the
    /// output is `x * a + d`.
    fn scale_shift(&self, w: &[f32], b: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let c = w.len();
        (0..self.splits * c)
            .map(|gc| {
                let ch = gc % c;
                let a = self.inv_std[gc] * w[ch];
                (a, b[ch] - self.stats.mean[gc] * a)
            })
            .unzip()
    }

    /// The (group, channel) index of plane `plane` (sample, channel) of a C-channel input.
    fn group_channel(&self, plane: usize, c: usize) -> usize {
        (plane / c % self.splits) * c + plane % c
    }

    /// `x * a + d` for every value of the contiguous (N, C, L) `x`, with `a = weight * inv_std`
    /// and `d = bias - mean * a` per (group, channel), and a ReLU after it if `relu`.
    fn forward(&self, x: &[f32], w: &[f32], b: &[f32], dims: &[usize], relu: bool) -> Vec<f32> {
        let (_, c, l) = dims3(dims);
        let (a, d) = self.scale_shift(w, b);
        let fill = |plane: usize, y: &mut [MaybeUninit<f32>]| {
            let x = &x[plane * l..][..l];
            let gc = self.group_channel(plane, c);
            let (a, d) = (a[gc], d[gc]);
            if relu {
                for (y, &x) in y.iter_mut().zip(x) {
                    y.write((x * a + d).max(0.0));
                }
            } else {
                for (y, &x) in y.iter_mut().zip(x) {
                    y.write(x * a + d);
                }
            }
        };
        // SAFETY: every plane of y is written element by element.
        unsafe { filled(x.len(), l, fill) }
    }

    /// BatchNorm's backward from the gradient `gy` of its output (the statistics depending on
    /// `x`): the input gradient if `want_x`, the weight and bias gradients if `want_wb`.
    fn backward(
        &self,
        x: &Tensor,
        wv: &[f32],
        gy: &Tensor,
        want_x: bool,
        want_wb: bool,
    ) -> Result<NormGrads> {
        let (n, c, l) = dims3(x.dims());
        let s = self.splits;
        let m = self.stats.count as f64;
        // Per (group, channel): sum(gy) and sum(gy * xhat), in f64.
        let sums: Vec<(Vec<f64>, Vec<f64>)> = with_f32(x, |xv| {
            with_f32(gy, |gv| {
                (0..c)
                    .into_par_iter()
                    .map(|ch| {
                        let mut sg = vec![0f64; s];
                        let mut sgx = vec![0f64; s];
                        for i in 0..n {
                            let g = i % s;
                            let gc = g * c + ch;
                            let (mean, inv) = (self.stats.mean[gc], self.inv_std[gc]);
                            let o = (i * c + ch) * l;
                            let (xp, gp) = (&xv[o..o + l], &gv[o..o + l]);
                            sg[g] += plane_sum(gp, gp, |g, _| g);
                            sgx[g] += plane_sum(xp, gp, |x, g| g * ((x - mean) * inv));
                        }
                        (sg, sgx)
                    })
                    .collect()
            })
        })??;
        // The input gradient takes the global batch's sums under SyncBN; the weight and bias
        // gradients stay this rank's (they are averaged over the ranks with the others).
        let reduced: Vec<(Vec<f64>, Vec<f64>)>;
        let global = if self.synced {
            let Some(comm) = moco_core::dist::sync_bn::group() else {
                candle_core::bail!(
                    "SyncBatchNorm backward outside the data-parallel scope of its forward pass (moco_core::dist::sync_bn::scope)"
                )
            };
            let flat = sums
                .iter()
                .flat_map(|(sg, sgx)| [sg[0] as f32, sgx[0] as f32])
                .collect();
            let all = all_reduce(&*comm, flat)?;
            reduced = all
                .chunks_exact(2)
                .map(|p| (vec![f64::from(p[0])], vec![f64::from(p[1])]))
                .collect();
            &reduced
        } else {
            &sums
        };
        let gx = if want_x {
            let out = with_f32(x, |xv| {
                with_f32(gy, |gv| {
                    let fill = |plane: usize, o: &mut [MaybeUninit<f32>]| {
                        let (i, ch) = (plane / c, plane % c);
                        let g = i % s;
                        let gc = g * c + ch;
                        let (mean, inv) = (self.stats.mean[gc], self.inv_std[gc]);
                        let k = wv[ch] * inv;
                        let mg = (global[ch].0[g] / m) as f32;
                        let mgx = (global[ch].1[g] / m) as f32;
                        let off = plane * l;
                        for ((o, &xv), &gv) in
                            o.iter_mut().zip(&xv[off..off + l]).zip(&gv[off..off + l])
                        {
                            let xhat = (xv - mean) * inv;
                            o.write(k * (gv - mg - xhat * mgx));
                        }
                    };
                    // SAFETY: every plane is written element by element.
                    unsafe { filled(n * c * l, l, fill) }
                })
            })??;
            Some(Tensor::from_vec(out, x.shape(), x.device())?)
        } else {
            None
        };
        let (gw, gb) = if want_wb {
            let total = |v: &[f64]| v.iter().sum::<f64>() as f32;
            (
                Some(sums.iter().map(|(_, sgx)| total(sgx)).collect()),
                Some(sums.iter().map(|(sg, _)| total(sg)).collect()),
            )
        } else {
            (None, None)
        };
        Ok((gx, gw, gb))
    }
}

/// `gy` masked where the ReLU output `y` is not positive, as a tensor.
fn masked_by_relu(gy: &Tensor, y: &Tensor) -> Result<Tensor> {
    let masked = with_f32(y, |yv| with_f32(&gy.contiguous()?, |gv| relu_grad(gv, yv)))??;
    Tensor::from_vec(masked, y.shape(), y.device())
}

/// `y = (x - mean) / sqrt(var + eps) * weight + bias` with the batch statistics `stats`,
/// optionally followed by a ReLU; its backward is BatchNorm's, the statistics depending on `x`.
struct Normalize {
    norm: Norm,
    relu: bool,
}

impl CustomOp3 for Normalize {
    fn name(&self) -> &'static str {
        "moco-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let what = "batch norm (cpu)";
        let x = f32_slice(s1, l1, what)?;
        let (w, b) = (f32_slice(s2, l2, what)?, f32_slice(s3, l3, what)?);
        let y = self.norm.forward(x, w, b, l1.dims(), self.relu);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        moco_core::profile::timed("batch norm backward", gy.device(), || {
            // Through the fused ReLU first: the gradient passes where the output is positive.
            let gy = if self.relu {
                masked_by_relu(gy, y)?
            } else {
                gy.contiguous()?
            };
            let wv = with_f32(w, <[f32]>::to_vec)?;
            let want_wb = w.track_op() || b.track_op();
            let (gx, gw, gb) = self.norm.backward(x, &wv, &gy, x.track_op(), want_wb)?;
            let c = wv.len();
            let gw = match gw {
                Some(v) if w.track_op() => Some(Tensor::from_vec(v, c, w.device())?),
                _ => None,
            };
            let gb = match gb {
                Some(v) if b.track_op() => Some(Tensor::from_vec(v, c, b.device())?),
                _ => None,
            };
            Ok((gx, gw, gb))
        })
    }
}

/// The end of a ResNet block as one op: `relu(bn(x) + r)`, or with the downsampling branch's
/// BatchNorm `relu(bn(x) + bn2(r))`, on (x, parameters, r) with the parameters
/// `[weight; bias]` or `[weight; bias; weight2; bias2]`. No BatchNorm output is a tensor of its
/// own, so the graph does not keep one alive until the backward pass (PyTorch's add keeps
/// none either). Each BatchNorm output is rounded before the add, as in separate passes.
struct NormalizeAddRelu {
    norm: Norm,
    /// The residual's BatchNorm, if it has one.
    residual_norm: Option<Norm>,
}

impl CustomOp3 for NormalizeAddRelu {
    fn name(&self) -> &'static str {
        "moco-batch-norm-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let what = "batch norm + residual (cpu)";
        let x = f32_slice(s1, l1, what)?;
        let p = f32_slice(s2, l2, what)?;
        let r = f32_slice(s3, l3, what)?;
        if r.len() != x.len() {
            candle_core::bail!("{what}: residual of {} values for {}", r.len(), x.len())
        }
        let (_, c, l) = dims3(l1.dims());
        let (a, d) = self.norm.scale_shift(&p[..c], &p[c..2 * c]);
        let second = self
            .residual_norm
            .as_ref()
            .map(|n| (n, n.scale_shift(&p[2 * c..3 * c], &p[3 * c..4 * c])));
        let fill = |plane: usize, y: &mut [MaybeUninit<f32>]| {
            let gc = self.norm.group_channel(plane, c);
            let (a, d) = (a[gc], d[gc]);
            let (x, r) = (&x[plane * l..][..l], &r[plane * l..][..l]);
            let out = y.iter_mut().zip(x).zip(r);
            match &second {
                None => {
                    for ((y, &x), &r) in out {
                        y.write(((x * a + d) + r).max(0.0));
                    }
                }
                Some((n, (a2, d2))) => {
                    let gc2 = n.group_channel(plane, c);
                    let (a2, d2) = (a2[gc2], d2[gc2]);
                    for ((y, &x), &r) in out {
                        y.write(((x * a + d) + (r * a2 + d2)).max(0.0));
                    }
                }
            }
        };
        // SAFETY: every plane of y is written element by element.
        let y = unsafe { filled(x.len(), l, fill) };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        r: &Tensor,
        y: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        moco_core::profile::timed("batch norm backward", gy.device(), || {
            let g = masked_by_relu(gy, y)?;
            let c = x.dim(1)?;
            let pv = with_f32(p, <[f32]>::to_vec)?;
            let want_p = p.track_op();
            let (gx, gw, gb) = self.norm.backward(x, &pv[..c], &g, x.track_op(), want_p)?;
            // The parameters' gradient: [gw; gb] (; gw2; gb2), all present when asked for.
            let mut parts = vec![gw, gb];
            let gr = match &self.residual_norm {
                None => r.track_op().then_some(g),
                Some(n) => {
                    let (gr, gw2, gb2) =
                        n.backward(r, &pv[2 * c..3 * c], &g, r.track_op(), want_p)?;
                    parts.extend([gw2, gb2]);
                    gr
                }
            };
            let gp = match parts.into_iter().collect::<Option<Vec<_>>>() {
                Some(parts) => Some(Tensor::from_vec(parts.concat(), pv.len(), p.device())?),
                None => None,
            };
            Ok((gx, gp, gr))
        })
    }
}

/// A BatchNorm in training mode ready to normalise: its contiguous float32 CPU input
/// (N, C, ...), affine parameters (C each), the batch statistics of that input (from
/// [`stats`] or [`stats_synced`]), epsilon, splits, and whether the statistics are the global
/// batch's (SyncBN: one split; the backward pass must then run in the same
/// [`moco_core::dist::sync_bn::scope`]).
#[derive(Debug, Clone)]
pub struct NormInput<'a> {
    pub x: &'a Tensor,
    pub weight: Tensor,
    pub bias: Tensor,
    pub stats: Stats,
    pub eps: f64,
    pub splits: usize,
    pub synced: bool,
}

impl NormInput<'_> {
    fn norm(self) -> Result<Norm> {
        if self.synced && self.splits != 1 {
            candle_core::bail!("batch norm (cpu): SyncBN with {} splits", self.splits)
        }
        let eps = self.eps as f32;
        let inv_std = self
            .stats
            .var
            .iter()
            .map(|&v| 1.0 / (v + eps).sqrt())
            .collect();
        Ok(Norm {
            stats: Arc::new(self.stats),
            inv_std: Arc::new(inv_std),
            splits: self.splits,
            synced: self.synced,
        })
    }
}

/// `relu(bn1(x1) + bn2(x2))` for two BatchNorms over inputs of the same shape, in one pass,
/// differentiable wrt both inputs and both sets of parameters; each output rounded as
/// [`normalize`] rounds it.
pub fn normalize_pair_add_relu(first: NormInput<'_>, second: NormInput<'_>) -> Result<Tensor> {
    if first.x.dims() != second.x.dims() {
        candle_core::bail!(
            "batch norm pair + residual (cpu): inputs of shapes {:?} and {:?}",
            first.x.dims(),
            second.x.dims()
        )
    }
    let params = Tensor::cat(
        &[&first.weight, &first.bias, &second.weight, &second.bias],
        0,
    )?;
    let (x1, x2) = (first.x.contiguous()?, second.x.contiguous()?);
    let op = NormalizeAddRelu {
        norm: first.norm()?,
        residual_norm: Some(second.norm()?),
    };
    x1.apply_op3(&params, &x2, op)
}

/// Normalises `input.x` with its batch statistics, scales and shifts it, then applies
/// `epilogue` in the same pass. Differentiable wrt all inputs (the residual's too), with the
/// statistics' dependence on `x` included.
pub fn normalize(input: NormInput<'_>, epilogue: Epilogue<'_>) -> Result<Tensor> {
    let x = input.x.contiguous()?;
    let (w, b) = (input.weight.contiguous()?, input.bias.contiguous()?);
    let norm = input.norm()?;
    match epilogue {
        Epilogue::None | Epilogue::Relu => {
            let relu = matches!(epilogue, Epilogue::Relu);
            x.apply_op3(&w, &b, Normalize { norm, relu })
        }
        Epilogue::AddRelu(r) => {
            if r.dims() != x.dims() {
                candle_core::bail!(
                    "batch norm + residual (cpu): residual of shape {:?} for an input of shape {:?}",
                    r.dims(),
                    x.dims()
                )
            }
            let wb = Tensor::cat(&[&w, &b], 0)?;
            let op = NormalizeAddRelu {
                norm,
                residual_norm: None,
            };
            x.apply_op3(&wb, &r.contiguous()?, op)
        }
    }
}

/// What follows an evaluation-mode BatchNorm in [`inference`]'s pass.
#[derive(Debug, Clone, Copy)]
pub enum InferenceEnd<'a> {
    /// Nothing.
    None,
    /// A ReLU.
    Relu,
    /// `relu(y + residual)`.
    AddRelu(&'a Tensor),
    /// `relu(y + z * scale + shift)`: a second evaluation-mode BatchNorm (the downsampling
    /// branch's) on `z`, with its per-channel scale and shift.
    PairAddRelu(&'a Tensor, &'a [f32], &'a [f32]),
}

/// Evaluation-mode BatchNorm with no gradient to track (feature extraction) on a float32 CPU
/// tensor (N, C, ...): `y = x * scale[c] + shift[c]` and `end` in one pass, parallel over the
/// (sample, channel) planes, no intermediate tensor. The arithmetic is the generic path's (a
/// product, then a sum, each rounded to float32); the result records no autograd op.
pub fn inference(
    x: &Tensor,
    scale: &[f32],
    shift: &[f32],
    end: InferenceEnd<'_>,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || dims[1] != scale.len() || dims[1] != shift.len() {
        candle_core::bail!(
            "batch norm inference (cpu): input of shape {dims:?} for {} channels",
            scale.len()
        )
    }
    let other = match end {
        InferenceEnd::AddRelu(r) | InferenceEnd::PairAddRelu(r, _, _) => {
            if r.dims() != dims {
                candle_core::bail!(
                    "batch norm inference (cpu): second input of shape {:?} for an input of shape {dims:?}",
                    r.dims()
                )
            }
            Some(r.contiguous()?)
        }
        InferenceEnd::None | InferenceEnd::Relu => None,
    };
    let (_, c, l) = dims3(dims);
    let x = x.contiguous()?;
    let out = with_f32(&x, |xv| -> Result<Vec<f32>> {
        let run = |rv: Option<&[f32]>| {
            let fill = |plane: usize, y: &mut [MaybeUninit<f32>]| {
                let ch = plane % c;
                let (a, d) = (scale[ch], shift[ch]);
                let xs = &xv[plane * l..][..l];
                match (end, rv) {
                    (InferenceEnd::None, _) => {
                        for (y, &x) in y.iter_mut().zip(xs) {
                            y.write(x * a + d);
                        }
                    }
                    (InferenceEnd::Relu, _) => {
                        for (y, &x) in y.iter_mut().zip(xs) {
                            y.write((x * a + d).max(0.0));
                        }
                    }
                    (InferenceEnd::AddRelu(_), Some(rv)) => {
                        let rs = &rv[plane * l..][..l];
                        for ((y, &x), &r) in y.iter_mut().zip(xs).zip(rs) {
                            y.write((x * a + d + r).max(0.0));
                        }
                    }
                    (InferenceEnd::PairAddRelu(_, a2, d2), Some(zv)) => {
                        let zs = &zv[plane * l..][..l];
                        let (a2, d2) = (a2[ch], d2[ch]);
                        for ((y, &x), &z) in y.iter_mut().zip(xs).zip(zs) {
                            y.write((x * a + d + (z * a2 + d2)).max(0.0));
                        }
                    }
                    // `other` is set exactly for the two ends with a second input.
                    (InferenceEnd::AddRelu(_) | InferenceEnd::PairAddRelu(..), None) => {
                        y.fill(MaybeUninit::new(f32::NAN))
                    }
                }
            };
            // SAFETY: every plane is written element by element.
            unsafe { filled(xv.len(), l, fill) }
        };
        match &other {
            Some(r) => with_f32(r, |rv| run(Some(rv))),
            None => Ok(run(None)),
        }
    })??;
    Tensor::from_vec(out, dims, x.device())
}
