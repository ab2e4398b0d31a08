//! A fast 2-D convolution for the CPU: forward, gradient wrt the input and gradient wrt the weight,
//! each an im2col + GEMM on the `gemm` crate (AVX-512 when the CPU has it) or, with the `onednn`
//! feature, a oneDNN primitive (direct, or Winograd for the wide 3x3 layers: [`ConvEngine`]),
//! parallel over the batch with rayon, as candle custom ops with their own backward.
//!
//! Candle's own CPU convolution runs its gradient wrt the input through a direct
//! `conv_transpose2d` loop with no GEMM and its gradient wrt the weight as a convolution over
//! transposed tensors; these three kernels replace them for float32 tensors on the CPU (NCHW,
//! any stride, padding and groups, dilation 1); other devices and dtypes run the generic
//! convolution (`generic.rs`; the op's `mod.rs` chooses).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::geometry::{Geometry, Pass};
use super::onednn;
use crate::ops::scratch::{self, with_scratch};
use crate::ops::settings::ConvEngine;

/// One pass on `engine` (oneDNN where it has a kernel for the geometry, else gemm).
fn run_pass(
    pass: Pass,
    g: &Geometry,
    a: &[f32],
    b: &[f32],
    engine: ConvEngine,
) -> Result<Vec<f32>> {
    if matches!(engine, ConvEngine::OneDnn | ConvEngine::OneDnnDirect) {
        let algorithm = if engine == ConvEngine::OneDnn && g.winograd_pays() {
            onednn::Algorithm::Winograd
        } else {
            onednn::Algorithm::Direct
        };
        if let Some(v) = run_onednn(pass, g, algorithm, a, b)? {
            return Ok(v);
        }
    }
    run_gemm(pass, g, a, b)
}

/// One pass on oneDNN, the batch split into one near-equal run of samples per rayon thread,
/// each a single-threaded oneDNN call; the weight gradient's per-run partial sums are added in
/// run order. `None` when oneDNN has no kernel for this geometry (or is not in this build).
fn run_onednn(
    pass: Pass,
    g: &Geometry,
    algorithm: onednn::Algorithm,
    a: &[f32],
    b: &[f32],
) -> Result<Option<Vec<f32>>> {
    let out_len = g.check_operands(pass, a, b)?;
    if g.n == 0 {
        return Ok(None);
    }
    let parts = rayon::current_num_threads().clamp(1, g.n);
    let runs: Vec<Geometry> = (0..parts)
        .map(|p| Geometry {
            n: (p + 1) * g.n / parts - p * g.n / parts,
            ..*g
        })
        .collect();
    let (x_per, y_per) = (g.c * g.in_plane(), g.o * g.out_plane());
    // Per-sample floats of a, of b (0: shared) and of the result (0: one full result per run).
    let (a_per, b_per, out_per) = match pass {
        Pass::Forward => (x_per, 0, y_per),
        Pass::GradInput => (y_per, 0, x_per),
        Pass::GradWeight => (x_per, y_per, 0),
    };
    let total = if out_per == 0 {
        out_len * parts
    } else {
        out_len
    };
    let mut out: Vec<f32> = Vec::with_capacity(total);
    let mut rest = &mut out.spare_capacity_mut()[..total];
    let mut pieces = Vec::with_capacity(parts);
    let mut start = 0;
    for r in &runs {
        let len = if out_per == 0 { out_len } else { r.n * out_per };
        let (piece, tail) = std::mem::take(&mut rest).split_at_mut(len);
        pieces.push((*r, start, piece));
        rest = tail;
        start += r.n;
    }
    let written = pieces
        .into_par_iter()
        .map(|(r, s0, piece)| {
            let a = &a[s0 * a_per..(s0 + r.n) * a_per];
            let b = if b_per == 0 {
                b
            } else {
                &b[s0 * b_per..(s0 + r.n) * b_per]
            };
            onednn::run(pass, r.as_array(), algorithm, a, b, piece, r.lens(pass))
        })
        .collect::<Result<Vec<bool>>>()?;
    if !written.iter().all(|&w| w) {
        return Ok(None);
    }
    // SAFETY: every piece of the capacity was written in full by its oneDNN call.
    unsafe { out.set_len(total) };
    if out_per == 0 {
        let (first, others) = out.split_at_mut(out_len);
        for part in others.chunks_exact(out_len) {
            first.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        out.truncate(out_len);
    }
    Ok(Some(out))
}

/// One pass on the gemm kernels.
fn run_gemm(pass: Pass, g: &Geometry, a: &[f32], b: &[f32]) -> Result<Vec<f32>> {
    g.check_operands(pass, a, b)?;
    Ok(match pass {
        Pass::Forward => forward(g, a, b),
        Pass::GradInput => grad_input(g, a, b),
        Pass::GradWeight => grad_weight(g, a, b),
    })
}

/// The output columns `ow` whose input column `ow * s + kj - p` lies inside `[0, W)`.
fn valid_cols(g: &Geometry, kj: usize) -> (usize, usize) {
    let (s, p) = (g.stride, g.padding);
    let lo = p.saturating_sub(kj).div_ceil(s).min(g.wo);
    let hi = if g.w + p > kj {
        ((g.w + p - kj - 1) / s + 1).min(g.wo)
    } else {
        0
    };
    (lo, hi.max(lo))
}

/// Row `(c, ki, kj)` of the im2col matrix of one sample: `plane` is input channel `c`
/// (H x W), `dst` the HO x WO values `x[c, oh * s + ki - p, ow * s + kj - p]` (0 outside).
fn im2col_row(g: &Geometry, plane: &[f32], ki: usize, kj: usize, dst: &mut [f32]) {
    let (wo, s, p) = (g.wo, g.stride, g.padding);
    let (lo, hi) = valid_cols(g, kj);
    if s == 1 && g.ho == g.h && wo == g.w {
        // A "same" convolution: the row is the plane shifted by (ki - p) rows and (kj - p)
        // columns. One copy, then zeros where the shift leaves the plane or wraps a row.
        let n = g.h * g.w;
        let shift = (ki as isize - p as isize) * g.w as isize + kj as isize - p as isize;
        let from = (-shift).clamp(0, n as isize) as usize;
        let to = (n as isize - shift).clamp(0, n as isize) as usize;
        dst[..from].fill(0.0);
        dst[to.max(from)..].fill(0.0);
        if to > from {
            let a = (from as isize + shift) as usize;
            dst[from..to].copy_from_slice(&plane[a..a + (to - from)]);
        }
        if lo > 0 || hi < wo {
            for d in dst.chunks_exact_mut(wo) {
                d[..lo].fill(0.0);
                d[hi..].fill(0.0);
            }
        }
        return;
    }
    for (oh, d) in dst.chunks_exact_mut(wo).enumerate() {
        let ih = (oh * s + ki) as isize - p as isize;
        if ih < 0 || ih >= g.h as isize || hi == lo {
            d.fill(0.0);
            continue;
        }
        let src = &plane[ih as usize * g.w..][..g.w];
        d[..lo].fill(0.0);
        d[hi..].fill(0.0);
        if s == 1 {
            let i0 = lo + kj - p;
            for (d, &v) in d[lo..hi].iter_mut().zip(&src[i0..]) {
                *d = v;
            }
        } else {
            for (ow, d) in (lo..hi).zip(&mut d[lo..hi]) {
                *d = src[ow * s + kj - p];
            }
        }
    }
}

/// The adjoint of [`im2col_row`]: adds `src` (HO x WO) into `plane` (H x W).
fn col2im_row(g: &Geometry, src: &[f32], ki: usize, kj: usize, plane: &mut [f32]) {
    let (wo, s, p) = (g.wo, g.stride, g.padding);
    let (lo, hi) = valid_cols(g, kj);
    if hi == lo {
        return;
    }
    for (oh, sr) in src.chunks_exact(wo).enumerate() {
        let ih = (oh * s + ki) as isize - p as isize;
        if ih < 0 || ih >= g.h as isize {
            continue;
        }
        let dst = &mut plane[ih as usize * g.w..][..g.w];
        if s == 1 {
            let i0 = lo + kj - p;
            for (d, &v) in dst[i0..i0 + (hi - lo)].iter_mut().zip(&sr[lo..hi]) {
                *d += v;
            }
        } else {
            for ow in lo..hi {
                dst[ow * s + kj - p] += sr[ow];
            }
        }
    }
}

/// A row-major matrix view for [`matmul`]: element (i, j) at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

impl View {
    fn rows(s: &[f32], cols: usize) -> Self {
        Self {
            ptr: s.as_ptr(),
            rs: cols as isize,
            cs: 1,
        }
    }
    /// The transpose of a row-major (rows x `cols`) matrix stored in `s`.
    fn transposed(s: &[f32], cols: usize) -> Self {
        Self {
            ptr: s.as_ptr(),
            rs: 1,
            cs: cols as isize,
        }
    }
}

/// `dst (m x n, row-major) = [dst +] a (m x k) * b (k x n)`, on the calling thread (the
/// callers run one per chunk of samples, in parallel).
fn matmul(dst: &mut [f32], m: usize, n: usize, k: usize, a: View, b: View, accumulate: bool) {
    assert!(dst.len() >= m * n, "matmul: destination too small");
    // SAFETY: `dst` holds m x n elements (checked above); `a` and `b` come from slices that
    // the callers size as m x k and k x n matrices with the strides given.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// Samples per GEMM. Several samples share one GEMM so that the weight is packed once per
/// chunk instead of once per sample (it dominates in the deep layers, where a sample has few
/// output positions), while a chunk's im2col matrix stays cache-sized (256 K floats) and there
/// are at least two chunks per thread to balance the load. The chunks come in a multiple of the
/// thread count, of near-equal sizes: a 128-channel 4x4 layer of 64 samples made 5 chunks of
/// 14, 14, 14, 14 and 8 samples, one thread idle for a fifth of the time (balanced: forward
/// 2.1 -> 1.9 ms, 64 channels at 7x7 1.6 -> 1.5 ms, `examples/conv_layers.rs`).
fn chunk_len(g: &Geometry) -> usize {
    const BUDGET: usize = 256 << 10;
    let threads = rayon::current_num_threads().max(1);
    let per_thread = g.n.div_ceil(2 * threads).max(1);
    let chunk = (BUDGET / (g.k() * g.out_plane()).max(1)).clamp(1, per_thread);
    let n_chunks = g.n.div_ceil(chunk).div_ceil(threads) * threads;
    g.n.div_ceil(n_chunks).max(1)
}

/// The row stride of a matrix with `ld` columns: `ld`, padded when it is a multiple of 256
/// floats. Rows a power of two apart map to the same cache sets, and the GEMM's packing walks
/// down columns: a 16-channel 32x32 layer's gradient wrt the weight took 2.5x longer unpadded.
fn padded(ld: usize) -> usize {
    if ld % 256 == 0 {
        ld + 16
    } else {
        ld
    }
}

/// The im2col matrix of group `gi` of samples `xs` (each C x H x W) into `col`
/// (K x B * HO * WO: sample b in columns b * HO * WO ..; rows [`padded`] apart).
fn im2col_chunk(g: &Geometry, xs: &[f32], gi: usize, col: &mut [f32]) {
    let (ip, op, cg) = (g.in_plane(), g.out_plane(), g.cg());
    let b = xs.len() / (g.c * ip);
    let ldp = padded(b * op);
    for (r, row) in col[..g.k() * ldp].chunks_exact_mut(ldp).enumerate() {
        let (c, kk) = (r / (g.kh * g.kw), r % (g.kh * g.kw));
        let (ki, kj) = (kk / g.kw, kk % g.kw);
        for (i, dst) in row[..b * op].chunks_exact_mut(op).enumerate() {
            im2col_row(g, &xs[(i * g.c + gi * cg + c) * ip..][..ip], ki, kj, dst);
        }
    }
}

/// Rows `gi * O/groups ..` of the samples `ts` (each O x HO*WO) as an (O/groups) x
/// (B * HO*WO) matrix, rows [`padded`] apart.
fn gather_rows(g: &Geometry, ts: &[f32], gi: usize, out: &mut [f32]) {
    let (op, og) = (g.out_plane(), g.og());
    let b = ts.len() / (g.o * op);
    let ldp = padded(b * op);
    for (o, row) in out[..og * ldp].chunks_exact_mut(ldp).enumerate() {
        for (i, dst) in row[..b * op].chunks_exact_mut(op).enumerate() {
            dst.copy_from_slice(&ts[(i * g.o + gi * og + o) * op..][..op]);
        }
    }
}

fn forward(g: &Geometry, x: &[f32], w: &[f32]) -> Vec<f32> {
    let (k, og, ip, op) = (g.k(), g.og(), g.in_plane(), g.out_plane());
    let chunk = chunk_len(g);
    let fill = |ci: usize, y: &mut [MaybeUninit<f32>]| {
        let x = &x[ci * chunk * g.c * ip..][..y.len() / (g.o * op) * g.c * ip];
        let b = x.len() / (g.c * ip);
        let (ld, ldp) = (b * op, padded(b * op));
        with_scratch(k * ldp, og * ld, |col, yc| {
            for gi in 0..g.groups {
                im2col_chunk(g, x, gi, col);
                let wg = &w[gi * og * k..(gi + 1) * og * k];
                matmul(
                    yc,
                    og,
                    ld,
                    k,
                    View::rows(wg, k),
                    View::rows(col, ldp),
                    false,
                );
                // Scatter the (O/groups) x (b * HO*WO) result into NCHW.
                for o in 0..og {
                    for i in 0..b {
                        let dst = &mut y[(i * g.o + gi * og + o) * op..][..op];
                        scratch::write(dst, &yc[o * ld + i * op..][..op]);
                    }
                }
            }
        })
    };
    // SAFETY: every (sample, output channel) plane of each chunk is written by the scatter.
    unsafe { scratch::filled(g.n * g.o * op, chunk * g.o * op, fill) }
}

fn grad_input(g: &Geometry, gy: &[f32], w: &[f32]) -> Vec<f32> {
    let (k, og, cg, ip, op) = (g.k(), g.og(), g.cg(), g.in_plane(), g.out_plane());
    let chunk = chunk_len(g);
    let mut gx = vec![0f32; g.n * g.c * ip];
    gx.par_chunks_mut(chunk * g.c * ip)
        .zip(gy.par_chunks(chunk * g.o * op))
        .for_each(|(gx, gy)| {
            let b = gy.len() / (g.o * op);
            let (ld, ldp) = (b * op, padded(b * op));
            with_scratch(k * ld, og * ldp, |dcol, gyc| {
                for gi in 0..g.groups {
                    gather_rows(g, gy, gi, gyc);
                    // W_g^T (K x O/groups) times gy_g (O/groups x b * HO*WO).
                    let wt = View::transposed(&w[gi * og * k..(gi + 1) * og * k], k);
                    matmul(dcol, k, ld, og, wt, View::rows(gyc, ldp), false);
                    for i in 0..b {
                        for c in 0..cg {
                            let plane = &mut gx[(i * g.c + gi * cg + c) * ip..][..ip];
                            for ki in 0..g.kh {
                                for kj in 0..g.kw {
                                    let r = (c * g.kh + ki) * g.kw + kj;
                                    col2im_row(g, &dcol[r * ld + i * op..][..op], ki, kj, plane);
                                }
                            }
                        }
                    }
                }
            })
        });
    gx
}

fn grad_weight(g: &Geometry, x: &[f32], gy: &[f32]) -> Vec<f32> {
    let (k, og, ip, op) = (g.k(), g.og(), g.in_plane(), g.out_plane());
    // Each chunk adds into the whole O x K gradient: at least 512 columns per GEMM, so the deep
    // layers (a large weight, few output positions) do not re-read it for every few samples.
    let threads = rayon::current_num_threads().max(1);
    let chunk = chunk_len(g).max(512usize.div_ceil(op).min(g.n.div_ceil(threads)));
    let len = g.o * k;
    // A fixed split of the chunks into one run per thread, each summing its chunks in order,
    // the runs then added in order: the same bits on every call (rayon's fold/reduce would
    // associate the sums differently from call to call).
    let n_chunks = g.n.div_ceil(chunk);
    let parts = threads.min(n_chunks).max(1);
    let partials: Vec<Vec<f32>> = (0..parts)
        .into_par_iter()
        .map(|p| {
            let mut gw = vec![0f32; len];
            for ci in p * n_chunks / parts..(p + 1) * n_chunks / parts {
                let (s0, s1) = (ci * chunk, ((ci + 1) * chunk).min(g.n));
                let x = &x[s0 * g.c * ip..s1 * g.c * ip];
                let gy = &gy[s0 * g.o * op..s1 * g.o * op];
                let b = s1 - s0;
                let (ld, ldp) = (b * op, padded(b * op));
                with_scratch(k * ldp, og * ldp, |col, gyc| {
                    for gi in 0..g.groups {
                        im2col_chunk(g, x, gi, col);
                        gather_rows(g, gy, gi, gyc);
                        // gy_g (O/groups x b * HO*WO) times col^T (b * HO*WO x K).
                        matmul(
                            &mut gw[gi * og * k..(gi + 1) * og * k],
                            og,
                            k,
                            ld,
                            View::rows(gyc, ldp),
                            View::transposed(col, ldp),
                            true,
                        );
                    }
                });
            }
            gw
        })
        .collect();
    let mut parts = partials.into_iter();
    let mut gw = parts.next().unwrap_or_else(|| vec![0f32; len]);
    for p in parts {
        gw.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
    }
    gw
}

/// y = conv2d(x, w).
struct Conv2d {
    stride: usize,
    padding: usize,
    groups: usize,
    engine: ConvEngine,
}

/// Which gradient a [`Conv2dGrad`] computes, with the dims of that operand.
#[derive(Clone, Copy)]
enum Wrt {
    /// `gx` from `(gy, w)`.
    Input([usize; 4]),
    /// `gw` from `(x, gy)`.
    Weight([usize; 4]),
}

/// A gradient of conv2d(x, w) applied to the output gradient gy.
struct Conv2dGrad {
    stride: usize,
    padding: usize,
    groups: usize,
    engine: ConvEngine,
    wrt: Wrt,
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "moco-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(l1.dims(), l2.dims(), self.stride, self.padding, self.groups)?;
        let y = run_pass(
            Pass::Forward,
            &g,
            scratch::f32_slice(s1, l1, "conv2d (input)")?,
            scratch::f32_slice(s2, l2, "conv2d (weight)")?,
            self.engine,
        )?;
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.o, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        moco_core::profile::timed("convolution backward", gy.device(), || {
            let gy = gy.contiguous()?;
            let dims4 = |t: &Tensor| -> Result<[usize; 4]> {
                let (a, b, c, d) = t.dims4()?;
                Ok([a, b, c, d])
            };
            // No gradient for an input that nothing upstream needs (the images).
            let gx = if x.track_op() {
                let op = Conv2dGrad {
                    stride: self.stride,
                    padding: self.padding,
                    groups: self.groups,
                    engine: self.engine,
                    wrt: Wrt::Input(dims4(x)?),
                };
                Some(gy.apply_op2_no_bwd(w, &op)?)
            } else {
                None
            };
            let gw = if w.track_op() {
                let op = Conv2dGrad {
                    stride: self.stride,
                    padding: self.padding,
                    groups: self.groups,
                    engine: self.engine,
                    wrt: Wrt::Weight(dims4(w)?),
                };
                Some(x.apply_op2_no_bwd(&gy, &op)?)
            } else {
                None
            };
            Ok((gx, gw))
        })
    }
}

impl CustomOp2 for Conv2dGrad {
    fn name(&self) -> &'static str {
        match self.wrt {
            Wrt::Input(_) => "moco-conv2d-grad-input",
            Wrt::Weight(_) => "moco-conv2d-grad-weight",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // (x dims, w dims, the output gradient's layout)
        let (xd, wd, gl) = match self.wrt {
            Wrt::Input(x) => (x.to_vec(), l2.dims().to_vec(), l1),
            Wrt::Weight(w) => (l1.dims().to_vec(), w.to_vec(), l2),
        };
        let g = Geometry::new(&xd, &wd, self.stride, self.padding, self.groups)?;
        if gl.dims() != [g.n, g.o, g.ho, g.wo] {
            candle_core::bail!("{}: output gradient of shape {:?}", self.name(), gl.dims())
        }
        // The pass, the names of its operands (for errors) and the shape of its result.
        let (pass, names, dims) = match self.wrt {
            Wrt::Input(x) => (
                Pass::GradInput,
                ["conv2d (output gradient)", "conv2d (weight)"],
                x,
            ),
            Wrt::Weight(w) => (
                Pass::GradWeight,
                ["conv2d (input)", "conv2d (output gradient)"],
                w,
            ),
        };
        let out = run_pass(
            pass,
            &g,
            scratch::f32_slice(s1, l1, names[0])?,
            scratch::f32_slice(s2, l2, names[1])?,
            self.engine,
        )?;
        Ok((CpuStorage::F32(out), Shape::from(dims.to_vec())))
    }
}

/// The gradients of `conv2d(x, w, padding, stride, groups)` wrt `x` and `w` given the gradient
/// `gy` of its output, with this module's kernels on `engine` (float32, contiguous on the CPU):
/// what the backward pass of [`conv2d`] runs, callable directly (benchmarks, custom autograd).
pub fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    gy: &Tensor,
    padding: usize,
    stride: usize,
    groups: usize,
    engine: ConvEngine,
) -> Result<(Tensor, Tensor)> {
    let (x, w, gy) = (x.contiguous()?, w.contiguous()?, gy.contiguous()?);
    let (a, b, c, d) = x.dims4()?;
    let gx = gy.apply_op2_no_bwd(
        &w,
        &Conv2dGrad {
            stride,
            padding,
            groups,
            engine,
            wrt: Wrt::Input([a, b, c, d]),
        },
    )?;
    let (a, b, c, d) = w.dims4()?;
    let gw = x.apply_op2_no_bwd(
        &gy,
        &Conv2dGrad {
            stride,
            padding,
            groups,
            engine,
            wrt: Wrt::Weight([a, b, c, d]),
        },
    )?;
    Ok((gx, gw))
}

/// `conv2d(x, w)` with dilation 1 on float32 CPU tensors, on `engine`, forward and backward.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    groups: usize,
    engine: ConvEngine,
) -> Result<Tensor> {
    let op = Conv2d {
        stride,
        padding,
        groups,
        engine,
    };
    x.contiguous()?.apply_op2(&w.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ops::settings::ConvEngine;
    use candle_core::DType;
    use candle_core::{Device, Var};
    use moco_core::init::seeded_randn;
    use moco_testing::max_rel;

    /// Direct-loop reference in f64: y, and the gradients of sum(y * mix) wrt x and w.
    #[allow(clippy::type_complexity)]
    fn naive(
        x: &Tensor,
        w: &Tensor,
        mix: &Tensor,
        s: usize,
        p: usize,
        groups: usize,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (n, c, h, wd) = x.dims4().unwrap();
        let (o, cg, kh, kw) = w.dims4().unwrap();
        let (ho, wo) = ((h + 2 * p - kh) / s + 1, (wd + 2 * p - kw) / s + 1);
        let v = |t: &Tensor| -> Vec<f64> {
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (xv, wv, mv) = (v(x), v(w), v(mix));
        let (mut y, mut gx, mut gw) = (
            vec![0.0; n * o * ho * wo],
            vec![0.0; xv.len()],
            vec![0.0; wv.len()],
        );
        let og = o / groups;
        for b in 0..n {
            for oc in 0..o {
                let gi = oc / og;
                for oh in 0..ho {
                    for ow in 0..wo {
                        let yi = ((b * o + oc) * ho + oh) * wo + ow;
                        for ci in 0..cg {
                            let ic = gi * cg + ci;
                            for ki in 0..kh {
                                for kj in 0..kw {
                                    let ih = (oh * s + ki) as isize - p as isize;
                                    let iw = (ow * s + kj) as isize - p as isize;
                                    if ih < 0 || iw < 0 || ih >= h as isize || iw >= wd as isize {
                                        continue;
                                    }
                                    let xi = ((b * c + ic) * h + ih as usize) * wd + iw as usize;
                                    let wi = ((oc * cg + ci) * kh + ki) * kw + kj;
                                    y[yi] += xv[xi] * wv[wi];
                                    gx[xi] += mv[yi] * wv[wi];
                                    gw[wi] += mv[yi] * xv[xi];
                                }
                            }
                        }
                    }
                }
            }
        }
        let _ = c;
        (y, gx, gw)
    }

    fn max_rel64(a: &Tensor, b: &[f64]) -> f64 {
        let a: Vec<f64> = a
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
        a.iter()
            .zip(b)
            .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()))
            / scale
    }

    /// n, c, h, w, o, (kh, kw), stride, padding, groups.
    type Case = (
        usize,
        usize,
        usize,
        usize,
        usize,
        (usize, usize),
        usize,
        usize,
        usize,
    );

    /// On `engine`: forward against candle's kernel and a direct f64 loop; both gradients,
    /// through a loss that weighs every output differently, against the direct loop (candle's
    /// own backward returns a wrongly shaped input gradient when the stride leaves input
    /// columns unused) and, where candle's shapes agree, against candle's backward too.
    fn check(engine: ConvEngine, (n, c, h, w, o, k, s, p, groups): Case) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&seeded_randn(0.0, 1.0, (n, c, h, w), 7, &dev).unwrap()).unwrap();
        let wt =
            Var::from_tensor(&seeded_randn(0.0, 1.0, (o, c / groups, k.0, k.1), 8, &dev).unwrap())
                .unwrap();
        let ours = conv2d(x.as_tensor(), wt.as_tensor(), p, s, groups, engine).unwrap();
        let theirs = x
            .as_tensor()
            .conv2d(wt.as_tensor(), p, s, 1, groups)
            .unwrap();
        let what = format!("{engine:?}: n{n} c{c} {h}x{w} o{o} k{k:?} s{s} p{p} g{groups}");
        assert_eq!(ours.dims(), theirs.dims(), "{what}");
        assert!(max_rel(&ours, &theirs) < 1e-5, "{what}: forward");
        let mix = seeded_randn(0.0, 1.0, ours.shape(), 1, &dev).unwrap();
        let (y, gx, gw) = naive(x.as_tensor(), wt.as_tensor(), &mix, s, p, groups);
        assert!(
            max_rel64(&ours, &y) < 1e-5,
            "{what}: forward vs direct loop"
        );
        let ga = (&ours * &mix)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a_x, a_w) = (ga.get(&x).unwrap(), ga.get(&wt).unwrap());
        assert!(
            max_rel64(a_x, &gx) < 1e-5,
            "{what}: grad input vs direct loop"
        );
        assert!(
            max_rel64(a_w, &gw) < 1e-5,
            "{what}: grad weight vs direct loop"
        );
        if let Ok(gb) = (theirs * &mix).unwrap().sum_all().unwrap().backward() {
            for (name, v) in [("input", &x), ("weight", &wt)] {
                let (a, b) = (ga.get(v).unwrap(), gb.get(v).unwrap());
                if a.dims() == b.dims() {
                    assert!(
                        max_rel(a, b) < 1e-5,
                        "{what}: grad {name} vs candle {}",
                        max_rel(a, b)
                    );
                }
            }
        }
    }

    #[test]
    fn matches_candle_on_random_shapes_strides_paddings_and_groups() {
        // n, c, h, w, o, (kh, kw), stride, padding, groups; the last three: "same"
        // convolutions (the shifted-plane im2col), odd and even kernels.
        let cases: [Case; 12] = [
            (2, 3, 9, 9, 4, (3, 3), 1, 1, 1),
            (3, 4, 8, 7, 6, (3, 3), 2, 1, 1),
            (2, 8, 10, 10, 8, (1, 1), 1, 0, 1),
            (2, 8, 10, 10, 4, (1, 1), 2, 0, 1),
            (1, 3, 15, 13, 5, (7, 7), 2, 3, 1),
            (2, 6, 7, 9, 4, (3, 2), 1, 0, 2),
            (2, 6, 8, 8, 6, (3, 3), 2, 2, 3),
            (4, 16, 6, 6, 16, (3, 3), 1, 1, 16),
            (1, 2, 5, 5, 3, (5, 5), 3, 2, 1),
            (2, 5, 7, 6, 4, (5, 5), 1, 2, 1),
            (2, 3, 4, 9, 2, (1, 1), 1, 0, 1),
            (1, 2, 2, 2, 3, (3, 3), 1, 1, 1),
        ];
        for engine in [ConvEngine::Gemm, ConvEngine::OneDnn] {
            if engine.is_available() {
                cases.into_iter().for_each(|case| check(engine, case));
            }
        }
    }

    /// The `onednn` engine on the layers it runs with Winograd kernels: each pass within 1e-5
    /// (of the largest value) of the float64 direct loop, on signed inputs and on the
    /// non-negative ones a ReLU feeds (Winograd's error grows with the inputs' mean), batches
    /// split over threads or not; and the kernels really are Winograd's where the CPU has
    /// AVX-512 and oneDNN is 2.x (the builds known to have them; others may not and then run
    /// direct), direct ones for the layers the rule leaves out.
    #[cfg(moco_onednn)]
    #[test]
    fn winograd_layers_match_the_direct_loop() {
        use onednn::{plan_algorithm, Algorithm};
        let expect_winograd = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && onednn::major_version() == 2;
        let dev = Device::Cpu;
        // n, c, h, w, o
        for (n, c, h, w, o) in [
            (2, 32, 8, 8, 32),
            (3, 48, 7, 5, 64),
            (1, 64, 4, 4, 32),
            (2, 32, 14, 14, 48),
            (4, 128, 2, 3, 128),
        ] {
            let g = Geometry::new(&[n, c, h, w], &[o, c, 3, 3], 1, 1, 1).unwrap();
            assert!(g.winograd_pays());
            for pass in [Pass::Forward, Pass::GradInput, Pass::GradWeight] {
                let algo = plan_algorithm(pass, g.as_array(), Algorithm::Winograd).unwrap();
                if expect_winograd {
                    assert_eq!(algo, Some(Algorithm::Winograd), "{pass:?} {g:?}");
                }
            }
            for relu in [false, true] {
                let x = seeded_randn(0.0, 1.0, (n, c, h, w), 3, &dev).unwrap();
                let x = Var::from_tensor(&if relu { x.relu().unwrap() } else { x }).unwrap();
                let wt = Var::from_tensor(&seeded_randn(0.0, 0.1, (o, c, 3, 3), 10, &dev).unwrap())
                    .unwrap();
                let y = conv2d(x.as_tensor(), wt.as_tensor(), 1, 1, 1, ConvEngine::OneDnn).unwrap();
                let mix = seeded_randn(0.0, 1.0, y.shape(), 4, &dev).unwrap();
                let (y64, gx, gw) = naive(x.as_tensor(), wt.as_tensor(), &mix, 1, 1, 1);
                let grads = (&y * &mix).unwrap().sum_all().unwrap().backward().unwrap();
                let what = format!("n{n} c{c} {h}x{w} o{o} relu {relu}");
                let errs = [
                    max_rel64(&y, &y64),
                    max_rel64(grads.get(&x).unwrap(), &gx),
                    max_rel64(grads.get(&wt).unwrap(), &gw),
                ];
                assert!(errs.iter().all(|&e| e < 1e-5), "{what}: {errs:?}");
                // The engine took the Winograd kernels: its rounding differs from direct's.
                let direct = conv2d(
                    x.as_tensor(),
                    wt.as_tensor(),
                    1,
                    1,
                    1,
                    ConvEngine::OneDnnDirect,
                )
                .unwrap();
                let same = y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                    == direct.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                if expect_winograd {
                    assert!(!same, "{what}: Winograd's results equal direct's");
                }
            }
        }
        // Left to the direct kernels: fewer than 32 channels, not multiples of 16, strided.
        for (c, o, s) in [(16, 32, 1), (40, 40, 1), (32, 32, 2), (1, 64, 1)] {
            let g = Geometry::new(&[2, c, 8, 8], &[o, c, 3, 3], s, 1, 1).unwrap();
            assert!(!g.winograd_pays(), "c{c} o{o} s{s}");
        }
    }

    /// The oneDNN engine runs each call on one OpenMP thread whatever OpenMP's default: with
    /// OMP_NUM_THREADS=16 the process gains no threads beyond rayon's. (oneDNN sizes a
    /// primitive for the thread count of its creation: plans made before the calling thread's
    /// count was set ran 16-thread teams inside each rayon thread.) Runs itself again in a
    /// child process, since OpenMP reads the variable when it loads.
    #[cfg(all(moco_onednn, target_os = "linux"))]
    #[test]
    fn onednn_calls_run_on_one_openmp_thread() {
        const CHILD: &str = "MOCO_TEST_OPENMP_CHILD";
        // libtest's name of this test: its module path without the crate.
        let path = module_path!().split_once("::").map_or("", |p| p.1);
        let name = format!("{path}::onednn_calls_run_on_one_openmp_thread");
        if std::env::var_os(CHILD).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([name.as_str(), "--exact", "--test-threads=1", "--nocapture"])
                .env(CHILD, "1")
                .env("OMP_NUM_THREADS", "16")
                .env("RAYON_NUM_THREADS", "2")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "child run failed:\n{text}");
            assert!(text.contains("1 passed"), "the child ran no test:\n{text}");
            return;
        }
        let threads = || std::fs::read_dir("/proc/self/task").unwrap().count();
        let dev = Device::Cpu;
        // First calls of each pass on both rayon threads, Winograd's layers and direct ones.
        for (c, o) in [(16, 16), (32, 32)] {
            let x = Var::from_tensor(&seeded_randn(0.0, 1.0, (4, c, 16, 16), 11, &dev).unwrap())
                .unwrap();
            let w =
                Var::from_tensor(&seeded_randn(0.0, 0.1, (o, c, 3, 3), 12, &dev).unwrap()).unwrap();
            let y = conv2d(x.as_tensor(), w.as_tensor(), 1, 1, 1, ConvEngine::OneDnn).unwrap();
            y.sum_all().unwrap().backward().unwrap();
        }
        // The main thread, libtest's (if any), rayon's 2.
        let n = threads();
        assert!(n <= 4, "{n} threads after the oneDNN calls");
    }

    /// Both engines on the same operands, every pass, the shapes of the `check` test and the
    /// small ResNet's layers: within float32 rounding of each other. oneDNN must have a kernel
    /// for all of them except the ones whose last stride stops short of the padded edge (it
    /// may fall back there; `check` covers those through `conv2d`).
    #[cfg(moco_onednn)]
    #[test]
    fn onednn_and_gemm_engines_agree() {
        let dev = Device::Cpu;
        let seed = std::cell::Cell::new(100);
        let random = |len: usize| -> Vec<f32> {
            seed.set(seed.get() + 1);
            seeded_randn(0.0, 1.0, len, seed.get(), &dev)
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        #[rustfmt::skip]
        let shapes = [
            // n, c, h, w, o, kh, kw, s, p, groups
            (2, 3, 9, 9, 4, 3, 3, 1, 1, 1),
            (3, 4, 8, 7, 6, 3, 3, 2, 1, 1),
            (2, 8, 10, 10, 8, 1, 1, 1, 0, 1),
            (2, 8, 10, 10, 4, 1, 1, 2, 0, 1),
            (1, 3, 15, 13, 5, 7, 7, 2, 3, 1),
            (2, 6, 7, 9, 4, 3, 2, 1, 0, 2),
            (2, 6, 8, 8, 6, 3, 3, 2, 2, 3),
            (4, 16, 6, 6, 16, 3, 3, 1, 1, 16),
            (1, 2, 5, 5, 3, 5, 5, 3, 2, 1),
            (2, 5, 7, 6, 4, 5, 5, 1, 2, 1),
            (8, 16, 28, 28, 16, 3, 3, 1, 1, 1),
            (8, 16, 28, 28, 32, 3, 3, 2, 1, 1),
            (8, 64, 7, 7, 128, 3, 3, 2, 1, 1),
            (8, 64, 7, 7, 128, 1, 1, 2, 0, 1),
            (8, 128, 4, 4, 128, 3, 3, 1, 1, 1),
        ];
        let mut fell_back = Vec::new();
        for (n, c, h, w, o, kh, kw, s, p, groups) in shapes {
            let g = Geometry::new(&[n, c, h, w], &[o, c / groups, kh, kw], s, p, groups).unwrap();
            let edge_short = (h + 2 * p - kh) % s != 0 || (w + 2 * p - kw) % s != 0;
            for pass in [Pass::Forward, Pass::GradInput, Pass::GradWeight] {
                let [al, bl, _] = g.lens(pass);
                let (a, b) = (random(al), random(bl));
                let what = format!("{pass:?} {g:?}");
                let Some(whole) = onednn_alone(pass, &g, &a, &b).unwrap() else {
                    assert!(edge_short, "{what}: oneDNN has no kernel");
                    fell_back.push(what);
                    continue;
                };
                let split = run_onednn(pass, &g, onednn::Algorithm::Direct, &a, &b)
                    .unwrap()
                    .unwrap();
                let gemm = run_gemm(pass, &g, &a, &b).unwrap();
                for (name, ours) in [("whole batch", whole), ("batch split", split)] {
                    assert_eq!(ours.len(), gemm.len(), "{what}");
                    let scale = gemm.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
                    let diff = ours
                        .iter()
                        .zip(&gemm)
                        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(diff / scale < 1e-5, "{what} {name}: {diff} of {scale}");
                }
            }
        }
        eprintln!("gemm fallback for: {fell_back:?}");
    }

    /// One oneDNN call over the whole batch (no split over threads).
    #[cfg(moco_onednn)]
    fn onednn_alone(pass: Pass, g: &Geometry, a: &[f32], b: &[f32]) -> Result<Option<Vec<f32>>> {
        let len = g.lens(pass)[2];
        let mut out = Vec::with_capacity(len);
        let done = onednn::run(
            pass,
            g.as_array(),
            onednn::Algorithm::Direct,
            a,
            b,
            &mut out.spare_capacity_mut()[..len],
            g.lens(pass),
        )?;
        // SAFETY: a successful call wrote all `len` elements.
        Ok(done.then(|| {
            unsafe { out.set_len(len) };
            out
        }))
    }

    /// Several threads running the same oneDNN plans at once get what one thread gets.
    #[cfg(moco_onednn)]
    #[test]
    fn onednn_engine_is_safe_to_call_from_several_threads() {
        let g = Geometry::new(&[4, 8, 9, 9], &[8, 8, 3, 3], 1, 1, 1).unwrap();
        let dev = Device::Cpu;
        let inputs: Vec<(Vec<f32>, Vec<f32>)> = (0..4)
            .map(|i| {
                let [al, bl, _] = g.lens(Pass::GradWeight);
                let r = |len, seed: u64| {
                    seeded_randn(0.0, 1.0, len, 200 + 2 * i + seed, &dev)
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                };
                (r(al, 0), r(bl, 1))
            })
            .collect();
        let alone = |(a, b): &(Vec<f32>, Vec<f32>)| {
            onednn_alone(Pass::GradWeight, &g, a, b).unwrap().unwrap()
        };
        let expected: Vec<Vec<f32>> = inputs.iter().map(alone).collect();
        for _ in 0..5 {
            let got: Vec<Vec<f32>> = std::thread::scope(|s| {
                let handles: Vec<_> = inputs.iter().map(|i| s.spawn(move || alone(i))).collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(got, expected);
        }
    }
}
