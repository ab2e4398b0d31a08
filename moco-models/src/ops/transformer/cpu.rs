//! Fused transformer kernels for float32 tensors on the CPU, as candle custom ops with their own
//! backward: LayerNorm over the last dimension, multi-head self-attention and the exact (erf)
//! GELU. Each is one parallel pass each way where candle's generic ops take five to ten passes
//! and a single-threaded reduction; candle-nn's fused layer norm and softmax have no backward.
//! The op's `mod.rs` checks the shapes and sends other devices and dtypes to `generic.rs`.

use std::mem::MaybeUninit;

use candle_core::Tensor;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape};
use moco_core::math::{erf, exp};
use rayon::prelude::*;

use crate::ops::scratch::{f32_slice, filled, row_chunk, with_scratch, CHUNK};

const LANES: usize = 16;

/// `sum_j f(j)` over `0..n` in 16 independent lanes (so that the loop vectorises; a single
/// float accumulator is a serial chain), the lanes then added in a fixed order.
#[inline(always)]
fn lane_sum(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let full = n / LANES * LANES;
    let mut j = 0;
    while j < full {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(j + l);
        }
        j += LANES;
    }
    let mut s = 0f32;
    for a in acc {
        s += a;
    }
    for j in full..n {
        s += f(j);
    }
    s
}

/// `max_j row[j] * scale`, in lanes as [`lane_sum`].
#[inline(always)]
fn lane_max(row: &[f32], scale: f32) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v * scale);
        }
    }
    let mut m = f32::NEG_INFINITY;
    for a in acc {
        m = m.max(a);
    }
    for &v in rest {
        m = m.max(v * scale);
    }
    m
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

/// Mean and 1 / sqrt(biased variance + eps) of a row (two passes, as torch's CPU kernel).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512dq+avx512bw",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = lane_sum(row.len(), |j| row[j]) / n;
    let var = lane_sum(row.len(), |j| (row[j] - mean) * (row[j] - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "moco-layer-norm"
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
        let x = f32_slice(s1, l1, "layer_norm (input)")?;
        let w = f32_slice(s2, l2, "layer_norm (weight)")?;
        let b = f32_slice(s3, l3, "layer_norm (bias)")?;
        let d = w.len();
        let eps = self.eps;
        let fill = |i: usize, out: &mut [MaybeUninit<f32>]| {
            let start = i * row_chunk(d);
            for (r, o) in out.chunks_mut(d).enumerate() {
                let row = &x[start + r * d..start + (r + 1) * d];
                let (mean, rstd) = row_stats(row, eps);
                for (((o, &v), &w), &b) in o.iter_mut().zip(row).zip(w).zip(b) {
                    o.write((v - mean) * rstd * w + b);
                }
            }
        };
        // SAFETY: every chunk holds whole rows, each written in full.
        let y = unsafe { filled(x.len(), row_chunk(d), fill) };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        moco_core::profile::timed("layer norm backward", gy.device(), || {
            let d = w.elem_count();
            let n = x.elem_count();
            // One packed result: the input's gradient, then the weight's and the bias's.
            let packed =
                x.apply_op3_no_bwd(w, &gy.contiguous()?, &LayerNormGrad { eps: self.eps })?;
            let gx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
            let gw = packed.narrow(0, n, d)?.reshape(w.shape())?;
            let gb = packed.narrow(0, n + d, d)?.reshape(b.shape())?;
            Ok((
                x.track_op().then_some(gx),
                w.track_op().then_some(gw),
                b.track_op().then_some(gb),
            ))
        })
    }
}

/// `(x, w, gy)` -> `[gx, gw, gb]` flattened: with `x^ = (x - mean) rstd` and `g = gy w`,
/// `gx = rstd (g - mean(g) - x^ mean(g x^))`, `gw = sum_rows(gy x^)`, `gb = sum_rows(gy)`.
struct LayerNormGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "moco-layer-norm-grad"
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
        let x = f32_slice(s1, l1, "layer_norm backward (input)")?;
        let w = f32_slice(s2, l2, "layer_norm backward (weight)")?;
        let gy = f32_slice(s3, l3, "layer_norm backward (gradient)")?;
        let (d, n) = (w.len(), x.len());
        let eps = self.eps;
        let mut out = vec![0f32; n + 2 * d];
        let (gx, params) = out.split_at_mut(n);
        // Rows in parallel; each chunk sums its own weight and bias gradients, added up after.
        let partial: Vec<Vec<f32>> = gx
            .par_chunks_mut(row_chunk(d))
            .enumerate()
            .map(|(i, gx)| {
                let start = i * row_chunk(d);
                let mut acc = vec![0f32; 2 * d];
                let mut xhat = vec![0f32; d];
                for (r, gx) in gx.chunks_mut(d).enumerate() {
                    let at = start + r * d;
                    let (row, g_row) = (&x[at..at + d], &gy[at..at + d]);
                    layer_norm_grad_row(gx, &mut acc, &mut xhat, row, g_row, w, eps);
                }
                acc
            })
            .collect();
        for acc in partial {
            for (p, a) in params.iter_mut().zip(acc) {
                *p += a;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * d)))
    }
}

/// One row of [`LayerNormGrad`]: writes `gx`, adds to the weight (`acc[..d]`) and bias
/// (`acc[d..]`) gradients; `xhat` is scratch.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512dq+avx512bw",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn layer_norm_grad_row(
    gx: &mut [f32],
    acc: &mut [f32],
    xhat: &mut [f32],
    row: &[f32],
    g_row: &[f32],
    w: &[f32],
    eps: f32,
) {
    let d = row.len();
    let (mean, rstd) = row_stats(row, eps);
    let (aw, ab) = acc.split_at_mut(d);
    for j in 0..d {
        let xh = (row[j] - mean) * rstd;
        xhat[j] = xh;
        aw[j] += g_row[j] * xh;
        ab[j] += g_row[j];
    }
    let mg = lane_sum(d, |j| g_row[j] * w[j]) / d as f32;
    let mgx = lane_sum(d, |j| g_row[j] * w[j] * xhat[j]) / d as f32;
    for j in 0..d {
        gx[j] = rstd * (g_row[j] * w[j] - mg - xhat[j] * mgx);
    }
}

/// `torch.nn.LayerNorm` over the last dimension (`weight`, `bias`: its size, checked by the
/// caller), biased variance, on float32 CPU tensors.
pub(super) fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNormOp { eps: eps as f32 },
    )
}

// ---------------------------------------------------------------------------------------------
// Attention

/// A raw pointer shared by the parallel tasks of one op, each writing its own disjoint part.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: the tasks that share it write disjoint elements (see the callers).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so that closures capture the whole `Sync` wrapper).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// `dst (m x n) = [dst +] a (m x k) * b (k x n)` on the calling thread, every matrix given by
/// its pointer and (row, column) strides.
///
/// # Safety
/// The pointers must address matrices of those sizes and strides; `dst` must not overlap them.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: (*mut f32, isize, isize),
    a: (*const f32, isize, isize),
    b: (*const f32, isize, isize),
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            dst.2,
            dst.1,
            false,
            a.0,
            a.2,
            a.1,
            b.0,
            b.2,
            b.1,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `row = softmax(scale * row)` in place.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512dq+avx512bw",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn softmax_in_place(row: &mut [f32], scale: f32) {
    let max = lane_max(row, scale);
    for v in row.iter_mut() {
        *v = exp(*v * scale - max);
    }
    let inv = 1.0 / lane_sum(row.len(), |j| row[j]);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// `dp = scale * p * (dp - sum(dp * p))` in place: the softmax's backward for one row.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512dq+avx512bw",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn softmax_grad_in_place(dp: &mut [f32], p: &[f32], scale: f32) {
    let dot = lane_sum(dp.len(), |j| dp[j] * p[j]);
    for (d, &p) in dp.iter_mut().zip(p) {
        *d = scale * p * (*d - dot);
    }
}

/// Shapes of one attention call: N samples of T tokens, H heads of `hd` channels.
#[derive(Clone, Copy)]
struct Heads {
    n: usize,
    t: usize,
    h: usize,
    hd: usize,
}

impl Heads {
    /// The shapes of a qkv tensor (N x T x 3D) of `heads` heads.
    fn of(l: &Layout, heads: usize) -> Result<Self> {
        let (n, t, c) = l.shape().dims3()?;
        if c % (3 * heads) != 0 {
            candle_core::bail!("attention: {c} channels are not 3 x {heads} heads")
        }
        Ok(Self {
            n,
            t,
            h: heads,
            hd: c / (3 * heads),
        })
    }

    fn d(&self) -> usize {
        self.h * self.hd
    }
    /// Offset of head `h`'s part `which` (0: q, 1: k, 2: v) of sample `n` in the qkv tensor
    /// (N x T x 3D, channels ordered (which, head, j) as timm's reshape).
    fn qkv_at(&self, n: usize, which: usize, h: usize) -> usize {
        n * self.t * 3 * self.d() + which * self.d() + h * self.hd
    }
    /// Offset of head `h` of sample `n` in the N x T x D output.
    fn out_at(&self, n: usize, h: usize) -> usize {
        n * self.t * self.d() + h * self.hd
    }
    /// `scores = softmax(scale q k^T)` (T x T) for head `h` of sample `n`.
    fn probabilities(&self, qkv: &[f32], n: usize, h: usize, scores: &mut [f32], scale: f32) {
        let (t, rs) = (self.t, 3 * self.d() as isize);
        let q = qkv[self.qkv_at(n, 0, h)..].as_ptr();
        let k = qkv[self.qkv_at(n, 1, h)..].as_ptr();
        // SAFETY: q and k are T x hd matrices with row stride 3D inside `qkv` (the caller checked
        // its length), `scores` is a separate T x T buffer.
        unsafe {
            gemm_strided(
                t,
                t,
                self.hd,
                (scores.as_mut_ptr(), t as isize, 1),
                (q, rs, 1),
                (k, 1, rs),
            )
        };
        for row in scores.chunks_exact_mut(t) {
            softmax_in_place(row, scale);
        }
    }
}

/// Multi-head self-attention on the output of the qkv projection, as timm's `Attention` between
/// its two linear layers: N x T x 3D -> N x T x D.
struct AttentionOp {
    heads: usize,
    scale: f32,
}

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "moco-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = f32_slice(s, l, "attention")?;
        let hs = Heads::of(l, self.heads)?;
        let (t, d) = (hs.t, hs.d());
        let mut out = vec![0f32; hs.n * t * d];
        let dst = SharedMut(out.as_mut_ptr());
        (0..hs.n * hs.h).into_par_iter().for_each(|task| {
            let (n, h) = (task / hs.h, task % hs.h);
            let v = qkv[hs.qkv_at(n, 2, h)..].as_ptr();
            with_scratch(t * t, 0, |scores, _| {
                hs.probabilities(qkv, n, h, scores, self.scale);
                // SAFETY: task (n, h) writes only the T x hd block of head h of sample n in
                // `out` (row stride D): disjoint from every other task's; v is a T x hd matrix
                // with row stride 3D in `qkv`.
                unsafe {
                    gemm_strided(
                        t,
                        hs.hd,
                        t,
                        (dst.ptr().add(hs.out_at(n, h)), d as isize, 1),
                        (scores.as_ptr(), t as isize, 1),
                        (v, 3 * d as isize, 1),
                    )
                };
            });
        });
        Ok((CpuStorage::F32(out), Shape::from((hs.n, t, d))))
    }

    fn bwd(&self, qkv: &Tensor, _out: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        moco_core::profile::timed("attention backward", g.device(), || {
            let grad = qkv.apply_op2_no_bwd(
                &g.contiguous()?,
                &AttentionGrad {
                    heads: self.heads,
                    scale: self.scale,
                },
            )?;
            Ok(Some(grad))
        })
    }
}

/// `(qkv, dout)` -> dqkv, the probabilities recomputed: with `P = softmax(s q k^T)`,
/// `dv = P^T do`, `dS = s P (dP - rowsum(dP P))` for `dP = do v^T`, `dq = dS k`, `dk = dS^T q`.
struct AttentionGrad {
    heads: usize,
    scale: f32,
}

impl CustomOp2 for AttentionGrad {
    fn name(&self) -> &'static str {
        "moco-attention-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let qkv = f32_slice(s1, l1, "attention backward (qkv)")?;
        let g = f32_slice(s2, l2, "attention backward (gradient)")?;
        let hs = Heads::of(l1, self.heads)?;
        let (t, d, hd) = (hs.t, hs.d(), hs.hd);
        if g.len() != hs.n * t * d {
            candle_core::bail!("attention backward: gradient of {} elements", g.len())
        }
        let mut grad = vec![0f32; qkv.len()];
        let dst = SharedMut(grad.as_mut_ptr());
        let rs = 3 * d as isize;
        (0..hs.n * hs.h).into_par_iter().for_each(|task| {
            let (n, h) = (task / hs.h, task % hs.h);
            let q = qkv[hs.qkv_at(n, 0, h)..].as_ptr();
            let k = qkv[hs.qkv_at(n, 1, h)..].as_ptr();
            let v = qkv[hs.qkv_at(n, 2, h)..].as_ptr();
            let go = g[hs.out_at(n, h)..].as_ptr();
            with_scratch(t * t, t * t, |p, dp| {
                hs.probabilities(qkv, n, h, p, self.scale);
                // SAFETY: task (n, h) writes only head h's q, k and v columns of sample n in
                // `grad` (T x hd blocks, row stride 3D): disjoint from every other task's. The
                // operands are T x hd blocks of `qkv` and `g` or the task's own T x T scratch.
                unsafe {
                    let at = |which| dst.ptr().add(hs.qkv_at(n, which, h));
                    // dv = P^T do
                    gemm_strided(
                        t,
                        hd,
                        t,
                        (at(2), rs, 1),
                        (p.as_ptr(), 1, t as isize),
                        (go, d as isize, 1),
                    );
                    // dP = do v^T
                    gemm_strided(
                        t,
                        t,
                        hd,
                        (dp.as_mut_ptr(), t as isize, 1),
                        (go, d as isize, 1),
                        (v, 1, rs),
                    );
                    for (dp, p) in dp.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                        softmax_grad_in_place(dp, p, self.scale);
                    }
                    // dq = dS k, dk = dS^T q
                    gemm_strided(
                        t,
                        hd,
                        t,
                        (at(0), rs, 1),
                        (dp.as_ptr(), t as isize, 1),
                        (k, rs, 1),
                    );
                    gemm_strided(
                        t,
                        hd,
                        t,
                        (at(1), rs, 1),
                        (dp.as_ptr(), 1, t as isize),
                        (q, rs, 1),
                    );
                }
            });
        });
        Ok((CpuStorage::F32(grad), l1.shape().clone()))
    }
}

/// Multi-head self-attention from the qkv projection's output (N x T x 3D, channels (q|k|v,
/// head, j) as timm reshapes them; shape checked by the caller) to the heads' outputs side by
/// side (N x T x D): `softmax(q k^T * scale) v` per head, on a float32 CPU tensor: one fused
/// op, parallel over samples and heads, that never copies q, k and v out and recomputes the
/// probabilities in the backward.
pub(super) fn attention(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(AttentionOp {
        heads,
        scale: scale as f32,
    })
}

// ---------------------------------------------------------------------------------------------
// GELU

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512dq+avx512bw",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn gelu_chunk(out: &mut [MaybeUninit<f32>], x: &[f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        o.write(0.5 * v * (1.0 + erf(v * FRAC_1_SQRT_2)));
    }
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512dq+avx512bw",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn gelu_grad_chunk(out: &mut [MaybeUninit<f32>], g: &[f32], x: &[f32]) {
    for ((o, &g), &v) in out.iter_mut().zip(g).zip(x) {
        let cdf = 0.5 * (1.0 + erf(v * FRAC_1_SQRT_2));
        let pdf = FRAC_1_SQRT_2PI * exp(-0.5 * v * v);
        o.write(g * (cdf + v * pdf));
    }
}

struct GeluOp;

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "moco-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "gelu")?;
        let fill = |i: usize, out: &mut [MaybeUninit<f32>]| gelu_chunk(out, &x[i * CHUNK..]);
        // SAFETY: chunk i has the length of x[i * CHUNK..] (or CHUNK): all of it is written.
        let y = unsafe { filled(x.len(), CHUNK, fill) };
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, gy: &Tensor) -> Result<Option<Tensor>> {
        moco_core::profile::timed("gelu backward", gy.device(), || {
            Ok(Some(gy.contiguous()?.apply_op2_no_bwd(x, &GeluGrad)?))
        })
    }
}

/// `(gy, x)` -> `gy (Phi(x) + x phi(x))`.
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "moco-gelu-erf-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s1, l1, "gelu backward (gradient)")?;
        let x = f32_slice(s2, l2, "gelu backward (input)")?;
        let fill = |i: usize, out: &mut [MaybeUninit<f32>]| {
            gelu_grad_chunk(out, &g[i * CHUNK..], &x[i * CHUNK..])
        };
        // SAFETY: as in the forward.
        let gx = unsafe { filled(g.len(), CHUNK, fill) };
        Ok((CpuStorage::F32(gx), l1.shape().clone()))
    }
}

/// The exact GELU, `x Phi(x)` (`torch.nn.GELU()`), on a float32 CPU tensor (erf by
/// [`moco_core::math::erf`], within 6e-7).
pub(super) fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(GeluOp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_keeps_extreme_rows_finite() {
        let mut y = [[1000f32, 0.0, -1000.0], [-1e30, -1e30, -1e30]];
        for row in y.iter_mut() {
            softmax_in_place(row, 1.0);
        }
        assert_eq!(y[0], [1.0, 0.0, 0.0]);
        assert!(y[1].iter().all(|v| (v - 1.0 / 3.0).abs() < 1e-6));
    }
}
