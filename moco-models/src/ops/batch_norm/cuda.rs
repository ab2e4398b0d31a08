//! BatchNorm on moco-rs's CUDA kernels (`kernels/batch_norm.cu`, feature `cuda`; `cuda_absent.rs`
//! stands in without it) for float32 CUDA tensors, switched on with `Settings::cuda_kernels`
//! (`MOCO_CUDA_KERNELS=1` for the binary).
//!
//! Training mode, forward: per (group, channel) Welford statistics in parallel parts, the
//! statistics and the running-statistics update per channel on the device, and one elementwise
//! pass with the ReLU, the residual add or the downsampling branch's BatchNorm folded in: two
//! passes over the input (three launches) where candle's generic ops make about seven. Backward:
//! the sums of dy and dy * xhat with the ReLU mask folded in, the per-channel coefficients, and
//! one elementwise pass for dx (and the residual's or the downsampling input's gradient): two
//! passes (three launches) where the generic path makes about nine. Evaluation mode (frozen
//! weights, feature extraction): one elementwise pass with the running statistics' scale and
//! shift. The op keeps the input, the output and 4 floats per channel for the backward pass.
//!
//! The arithmetic is the headers' (`kernels/*.cuh`), run on the CPU by `ops/cuda_host.rs`'s
//! tests over the same grid; this file has compiled for sm_90 but has not yet run on a GPU.
//! What it does not take (SyncBN scopes, splits that do not divide the batch, other dtypes,
//! tracked inputs in evaluation mode) goes to the generic path.

use candle_core::{DType, Result, Tensor};

use super::params::{End, Params};
use crate::ops::attached::{attach3, Backward3};
use crate::ops::cuda_host::{
    BnGeometry as Geometry, END_ADD_RELU, END_NONE, END_PAIR_ADD_RELU, END_RELU, SECOND_NONE,
    SECOND_PAIR, SECOND_RESIDUAL, SUM2_FLOATS, WELFORD_FLOATS,
};
use crate::ops::cuda_launch::{
    blocks, device_of, function, grid_stride, output, per_item, read, tensor, u32_of, BATCH_NORM,
};
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::CudaDevice;

/// The kernels' geometry of `x` (N, C, ...) in `splits` groups.
fn geometry(x: &Tensor, splits: usize) -> Result<Geometry> {
    let dims = x.dims();
    let l: usize = dims[2..].iter().product();
    Ok(Geometry {
        n: u32_of(dims[0], "batch size")?,
        c: u32_of(dims[1], "channels")?,
        l: u32_of(l, "values per plane")?,
        splits: u32_of(splits, "splits")?,
    })
}

/// Whether the kernels take this call: float32 CUDA tensors (the input, the end's operand, the
/// affine parameters and running statistics), no SyncBN scope, and in training mode splits
/// that divide the batch with two values or more per group; in evaluation mode nothing to
/// differentiate (the CPU's inference pass has the same condition).
pub(super) fn applies(p: &Params, x: &Tensor, end: &End, train: bool) -> Result<bool> {
    p.check(x)?;
    let mut ts: Vec<&Tensor> = vec![x, p.running_mean.as_tensor(), p.running_var.as_tensor()];
    let mut params = vec![p];
    match end {
        End::None | End::Relu => {}
        End::AddRelu(r) => ts.push(r),
        End::PairAddRelu(bn, z) => {
            bn.check(z)?;
            ts.extend([*z, bn.running_mean.as_tensor(), bn.running_var.as_tensor()]);
            params.push(bn);
        }
    }
    for q in &params {
        if let Some((w, b)) = q.weight_bias {
            ts.extend([w, b]);
        }
    }
    let f32_cuda = ts
        .iter()
        .all(|t| t.device().is_cuda() && t.dtype() == DType::F32);
    let same_shape = match end {
        End::AddRelu(o) | End::PairAddRelu(_, o) => o.dims() == x.dims(),
        _ => true,
    };
    if !f32_cuda || !same_shape || moco_core::dist::sync_bn::group().is_some() {
        return Ok(false);
    }
    if !train {
        let frozen = ts.iter().all(|t| !t.track_op());
        return Ok(frozen);
    }
    let n = x.dim(0)?;
    let l: usize = x.dims()[2..].iter().product();
    Ok(params
        .iter()
        .all(|q| n % q.splits == 0 && (n / q.splits) * l >= 2 && q.splits == p.splits))
}

/// `end` after the BatchNorm of `p` on `x`, in training or evaluation mode (where
/// [`applies`]).
pub(super) fn forward(p: &Params, x: &Tensor, end: End, train: bool) -> Result<Tensor> {
    if train {
        train_forward(p, x, end)
    } else {
        eval_forward(p, x, end)
    }
}

/// The kernels' `end` code and the end's operand (contiguous).
fn end_operand(end: &End) -> Result<(i32, Option<Tensor>)> {
    Ok(match end {
        End::None => (END_NONE, None),
        End::Relu => (END_RELU, None),
        End::AddRelu(r) => (END_ADD_RELU, Some(r.contiguous()?)),
        End::PairAddRelu(_, z) => (END_PAIR_ADD_RELU, Some(z.contiguous()?)),
    })
}

/// The elementwise pass: `end(x * scale + shift, other, scale2, shift2)`.
fn apply(
    dev: &CudaDevice,
    x: &Tensor,
    g: Geometry,
    (scale, shift): (&Tensor, &Tensor),
    end: i32,
    other: Option<&Tensor>,
    second: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    let func = function(dev, BATCH_NORM, "moco_bn_apply")?;
    let (xr, ar, dr) = (read(x)?, read(scale)?, read(shift)?);
    let (xv, av, dv) = (xr.view()?, ar.view()?, dr.view()?);
    let or = other.map(read).transpose()?;
    let ov = or.as_ref().map(|r| r.view()).transpose()?;
    let sr = match second {
        Some((a, d)) => Some((read(a)?, read(d)?)),
        None => None,
    };
    let sv = match &sr {
        Some((a, d)) => Some((a.view()?, d.view()?)),
        None => None,
    };
    let mut y = output(dev, g.len())?;
    let null = 0u64;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&xv).arg(&g.n).arg(&g.c).arg(&g.l).arg(&g.splits);
    b.arg(&av).arg(&dv).arg(&end);
    match &ov {
        Some(v) => b.arg(v),
        None => b.arg(&null),
    };
    match &sv {
        Some((a, d)) => b.arg(a).arg(d),
        None => b.arg(&null).arg(&null),
    };
    b.arg(&mut y);
    // SAFETY: the arguments match moco_bn_apply's parameters; the views hold g.len() values
    // (x, other) or splits * c (the scales and shifts), y g.len().
    unsafe { b.launch(grid_stride(g.len())) }.map_err(candle_core::Error::wrap)?;
    drop(b);
    Ok(tensor(dev, y, x.shape()))
}

/// One BatchNorm's statistics in training mode (two launches): `[mean, invstd, scale, shift]`
/// (each splits * C, indexed group * C + channel), and the running statistics moved.
fn statistics(dev: &CudaDevice, p: &Params, x: &Tensor, g: Geometry) -> Result<Tensor> {
    let parts = g.parts();
    let gcs = g.groups_channels();
    let c = g.c as usize;
    let stream = dev.cuda_stream();
    let mut partials = output(dev, gcs * parts as usize * WELFORD_FLOATS)?;
    {
        let func = function(dev, BATCH_NORM, "moco_bn_stats")?;
        let xr = read(x)?;
        let xv = xr.view()?;
        let mut b = stream.launch_builder(&func);
        b.arg(&xv).arg(&g.n).arg(&g.c).arg(&g.l).arg(&g.splits);
        b.arg(&parts).arg(&mut partials);
        // SAFETY: moco_bn_stats's parameters; one block per (group, channel, part), each
        // writing its own partial.
        unsafe { b.launch(blocks(u32_of(gcs * parts as usize, "blocks")?)) }
            .map_err(candle_core::Error::wrap)?;
    }
    let mut stats = output(dev, 4 * gcs)?;
    // The running statistics, copied, then moved in place by the kernel.
    let mut running = output(dev, 2 * c)?;
    {
        let (mr, vr) = (
            read(p.running_mean.as_tensor())?,
            read(p.running_var.as_tensor())?,
        );
        dev.memcpy_dtod(&mr.view()?, &mut running.slice_mut(0..c))?;
        dev.memcpy_dtod(&vr.view()?, &mut running.slice_mut(c..2 * c))?;
    }
    {
        let func = function(dev, BATCH_NORM, "moco_bn_finalize")?;
        let wb = match p.weight_bias {
            Some((w, b)) => Some((w.contiguous()?, b.contiguous()?)),
            None => None,
        };
        let wbr = match &wb {
            Some((w, b)) => Some((read(w)?, read(b)?)),
            None => None,
        };
        let wbv = match &wbr {
            Some((w, b)) => Some((w.view()?, b.view()?)),
            None => None,
        };
        let (eps, momentum) = (p.eps as f32, p.momentum as f32);
        let null = 0u64;
        let mut b = stream.launch_builder(&func);
        b.arg(&partials)
            .arg(&g.n)
            .arg(&g.c)
            .arg(&g.l)
            .arg(&g.splits);
        b.arg(&parts).arg(&eps).arg(&momentum);
        match &wbv {
            Some((w, bias)) => b.arg(w).arg(bias),
            None => b.arg(&null).arg(&null),
        };
        b.arg(&mut stats).arg(&mut running);
        // SAFETY: moco_bn_finalize's parameters; one thread per channel.
        unsafe { b.launch(per_item(c)) }.map_err(candle_core::Error::wrap)?;
    }
    let running = tensor(dev, running, 2 * c);
    p.running_mean.set(&running.narrow(0, 0, c)?)?;
    p.running_var.set(&running.narrow(0, c, c)?)?;
    Ok(tensor(dev, stats, 4 * gcs))
}

/// The scale and shift (`stats[2 gcs..3 gcs]`, `stats[3 gcs..]`) of a statistics tensor.
fn scale_shift(stats: &Tensor, gcs: usize) -> Result<(Tensor, Tensor)> {
    Ok((
        stats.narrow(0, 2 * gcs, gcs)?,
        stats.narrow(0, 3 * gcs, gcs)?,
    ))
}

fn train_forward(p: &Params, x: &Tensor, end: End) -> Result<Tensor> {
    let dev = device_of(x)?;
    let x = x.contiguous()?;
    let g = geometry(&x, p.splits)?;
    let gcs = g.groups_channels();
    let (code, other) = end_operand(&end)?;
    let first = statistics(&dev, p, &x, g)?;
    let second = match (&end, &other) {
        (End::PairAddRelu(bn, _), Some(z)) => Some((*bn, statistics(&dev, bn, z, g)?)),
        _ => None,
    };
    let (a, d) = scale_shift(&first, gcs)?;
    let second_ss = match &second {
        Some((_, s)) => Some(scale_shift(s, gcs)?),
        None => None,
    };
    let y = apply(
        &dev,
        &x,
        g,
        (&a, &d),
        code,
        other.as_ref(),
        second_ss.as_ref().map(|(a, d)| (a, d)),
    )?;
    let weight = |q: &Params| q.weight_bias.map(|(w, _)| w.detach());
    let (w1, b1) = p.weight_bias_or_identity(x.device())?;
    let wb = Tensor::stack(&[&w1, &b1], 0)?;
    let op = CudaNormGrad {
        g,
        relu: code != END_NONE,
        first: Side {
            stats: first,
            weight: weight(p),
        },
        second: None,
        residual: code == END_ADD_RELU,
    };
    match (end, other, second) {
        (End::PairAddRelu(..), Some(z), Some((bn, stats2))) => {
            let (w2, b2) = bn.weight_bias_or_identity(x.device())?;
            let wb = Tensor::cat(&[wb, Tensor::stack(&[&w2, &b2], 0)?], 0)?;
            let op = CudaNormGrad {
                second: Some((
                    Side {
                        stats: stats2,
                        weight: weight(bn),
                    },
                    z.clone(),
                )),
                ..op
            };
            attach3(&y, [&x, &z, &wb], op)
        }
        (End::AddRelu(_), Some(r), _) => attach3(&y, [&x, &wb, &r], op),
        _ => attach3(&y, [&x, &wb, &x], op),
    }
}

fn eval_forward(p: &Params, x: &Tensor, end: End) -> Result<Tensor> {
    let dev = device_of(x)?;
    let x = x.contiguous()?;
    let g = geometry(&x, 1)?;
    let (code, other) = end_operand(&end)?;
    let (a, d) = p.eval_scale_shift()?;
    let (a, d) = (a.contiguous()?, d.contiguous()?);
    let second = match &end {
        End::PairAddRelu(bn, _) => {
            let (a2, d2) = bn.eval_scale_shift()?;
            Some((a2.contiguous()?, d2.contiguous()?))
        }
        _ => None,
    };
    apply(
        &dev,
        &x,
        g,
        (&a, &d),
        code,
        other.as_ref(),
        second.as_ref().map(|(a, d)| (a, d)),
    )
}

/// One BatchNorm's state for the backward pass: its statistics and weight (none: 1).
struct Side {
    stats: Tensor,
    weight: Option<Tensor>,
}

/// The backward pass of [`train_forward`]'s op: operands `(x, (2, C) weight and bias, x or
/// the residual)`, or `(x, z, (4, C))` for a downsampling pair, as the generic op's.
struct CudaNormGrad {
    g: Geometry,
    /// A ReLU ends the op: the gradient passes where the output is positive.
    relu: bool,
    first: Side,
    /// The downsampling BatchNorm and its input.
    second: Option<(Side, Tensor)>,
    /// The op's third operand is a residual, whose gradient is dy.
    residual: bool,
}

impl CudaNormGrad {
    /// One BatchNorm's backward reductions (two launches): `[k, mean(dy), mean(dy * xhat)]`
    /// per (group, channel), and `[dweight, dbias]` as (2, C).
    fn coefficients(
        &self,
        dev: &CudaDevice,
        side: &Side,
        x: &Tensor,
        grad: &Tensor,
        out: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let g = self.g;
        let (parts, gcs, c) = (g.parts(), g.groups_channels(), g.c as usize);
        let stream = dev.cuda_stream();
        let null = 0u64;
        let mut partials = output(dev, gcs * parts as usize * SUM2_FLOATS)?;
        let sr = read(&side.stats)?;
        let sv = sr.view()?;
        {
            let func = function(dev, BATCH_NORM, "moco_bn_backward_reduce")?;
            let (xr, gr) = (read(x)?, read(grad)?);
            let (xv, gv) = (xr.view()?, gr.view()?);
            let or = out.map(read).transpose()?;
            let ov = or.as_ref().map(|r| r.view()).transpose()?;
            let mut b = stream.launch_builder(&func);
            b.arg(&xv).arg(&gv);
            match &ov {
                Some(v) => b.arg(v),
                None => b.arg(&null),
            };
            b.arg(&g.n).arg(&g.c).arg(&g.l).arg(&g.splits).arg(&parts);
            b.arg(&sv).arg(&mut partials);
            // SAFETY: moco_bn_backward_reduce's parameters; one block per (group, channel,
            // part), each writing its own partial.
            unsafe { b.launch(blocks(u32_of(gcs * parts as usize, "blocks")?)) }
                .map_err(candle_core::Error::wrap)?;
        }
        let mut coef = output(dev, 3 * gcs)?;
        let mut dwb = output(dev, 2 * c)?;
        {
            let func = function(dev, BATCH_NORM, "moco_bn_backward_finalize")?;
            let w = side.weight.as_ref().map(|w| w.contiguous()).transpose()?;
            let wr = w.as_ref().map(read).transpose()?;
            let wv = wr.as_ref().map(|r| r.view()).transpose()?;
            let mut b = stream.launch_builder(&func);
            b.arg(&partials)
                .arg(&g.n)
                .arg(&g.c)
                .arg(&g.l)
                .arg(&g.splits)
                .arg(&parts);
            match &wv {
                Some(v) => b.arg(v),
                None => b.arg(&null),
            };
            b.arg(&sv).arg(&mut coef).arg(&mut dwb);
            // SAFETY: moco_bn_backward_finalize's parameters; one thread per channel.
            unsafe { b.launch(per_item(c)) }.map_err(candle_core::Error::wrap)?;
        }
        Ok((tensor(dev, coef, 3 * gcs), tensor(dev, dwb, (2, c))))
    }

    /// The elementwise pass (one launch): dx, and the second operand's gradient.
    #[allow(clippy::too_many_arguments)]
    fn input_gradient(
        &self,
        dev: &CudaDevice,
        x: &Tensor,
        grad: &Tensor,
        out: Option<&Tensor>,
        coef: &Tensor,
        second: i32,
        pair: Option<(&Tensor, &Tensor, &Tensor)>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let g = self.g;
        let stream = dev.cuda_stream();
        let null = 0u64;
        let func = function(dev, BATCH_NORM, "moco_bn_backward_input")?;
        let (xr, gr, sr, cr) = (read(x)?, read(grad)?, read(&self.first.stats)?, read(coef)?);
        let (xv, gv, sv, cv) = (xr.view()?, gr.view()?, sr.view()?, cr.view()?);
        let or = out.map(read).transpose()?;
        let ov = or.as_ref().map(|r| r.view()).transpose()?;
        let pr = match pair {
            Some((z, s2, c2)) => Some((read(z)?, read(s2)?, read(c2)?)),
            None => None,
        };
        let pv = match &pr {
            Some((z, s2, c2)) => Some((z.view()?, s2.view()?, c2.view()?)),
            None => None,
        };
        let mut dx = output(dev, g.len())?;
        let mut d2 = match second {
            SECOND_NONE => None,
            _ => Some(output(dev, g.len())?),
        };
        let mut b = stream.launch_builder(&func);
        b.arg(&xv).arg(&gv);
        match &ov {
            Some(v) => b.arg(v),
            None => b.arg(&null),
        };
        b.arg(&g.n).arg(&g.c).arg(&g.l).arg(&g.splits);
        b.arg(&sv).arg(&cv).arg(&second);
        match &pv {
            Some((z, s2, c2)) => b.arg(z).arg(s2).arg(c2),
            None => b.arg(&null).arg(&null).arg(&null),
        };
        b.arg(&mut dx);
        match &mut d2 {
            Some(d) => b.arg(d),
            None => b.arg(&null),
        };
        // SAFETY: moco_bn_backward_input's parameters; d2 is written only when `second` says.
        unsafe { b.launch(grid_stride(g.len())) }.map_err(candle_core::Error::wrap)?;
        drop(b);
        Ok((
            tensor(dev, dx, x.shape()),
            d2.map(|d| tensor(dev, d, x.shape())),
        ))
    }
}

impl Backward3 for CudaNormGrad {
    fn name(&self) -> &'static str {
        "batch-norm-cuda"
    }

    fn class(&self) -> &'static str {
        "batch norm backward"
    }

    fn backward(
        &self,
        [x, _, _]: [&Tensor; 3],
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dev = device_of(x)?;
        let grad = grad.contiguous()?;
        let res = res.contiguous()?;
        let out = self.relu.then_some(&res);
        let (coef, dwb) = self.coefficients(&dev, &self.first, x, &grad, out)?;
        match &self.second {
            Some((side, z)) => {
                let (coef2, dwb2) = self.coefficients(&dev, side, z, &grad, out)?;
                let (dx, dz) = self.input_gradient(
                    &dev,
                    x,
                    &grad,
                    out,
                    &coef,
                    SECOND_PAIR,
                    Some((z, &side.stats, &coef2)),
                )?;
                Ok((Some(dx), dz, Some(Tensor::cat(&[dwb, dwb2], 0)?)))
            }
            None => {
                let second = if self.residual {
                    SECOND_RESIDUAL
                } else {
                    SECOND_NONE
                };
                let (dx, dr) = self.input_gradient(&dev, x, &grad, out, &coef, second, None)?;
                Ok((Some(dx), Some(dwb), dr))
            }
        }
    }
}
