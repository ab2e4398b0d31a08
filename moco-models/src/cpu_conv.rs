//! A fast 2-D convolution for the CPU: forward, gradient wrt the input and gradient wrt the weight,
//! each an im2col + GEMM on the `gemm` crate (AVX-512 when the CPU has it), parallel over the
//! batch with rayon, as candle custom ops with their own backward.
//!
//! Candle's own CPU convolution runs its gradient wrt the input through a direct
//! `conv_transpose2d` loop with no GEMM and its gradient wrt the weight as a convolution over
//! transposed tensors; these three kernels replace them for float32 tensors on the CPU (NCHW,
//! any stride, padding and groups, dilation 1). [`conv2d`] falls back to candle's kernel on
//! other devices and dtypes, so CUDA and Metal keep theirs.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Geometry of one convolution: input (N, C, H, W), weight (O, C/groups, KH, KW).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    groups: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    fn new(x: &[usize], w: &[usize], stride: usize, padding: usize, groups: usize) -> Result<Self> {
        let (&[n, c, h, wd], &[o, cg, kh, kw]) = (x, w) else {
            candle_core::bail!("conv2d: expected 4-D input and weight, got {x:?} and {w:?}")
        };
        if groups == 0 || c % groups != 0 || o % groups != 0 || cg * groups != c {
            candle_core::bail!("conv2d: input {x:?}, weight {w:?} and groups {groups} disagree")
        }
        if stride == 0 || h + 2 * padding < kh || wd + 2 * padding < kw {
            candle_core::bail!("conv2d: kernel {kh}x{kw} larger than the padded input {h}x{wd}")
        }
        Ok(Self {
            n,
            c,
            h,
            w: wd,
            o,
            kh,
            kw,
            stride,
            padding,
            groups,
            ho: (h + 2 * padding - kh) / stride + 1,
            wo: (wd + 2 * padding - kw) / stride + 1,
        })
    }
    /// Input channels per group.
    fn cg(&self) -> usize {
        self.c / self.groups
    }
    /// Output channels per group.
    fn og(&self) -> usize {
        self.o / self.groups
    }
    /// Rows of the im2col matrix: C/groups x KH x KW.
    fn k(&self) -> usize {
        self.cg() * self.kh * self.kw
    }
    fn in_plane(&self) -> usize {
        self.h * self.w
    }
    fn out_plane(&self) -> usize {
        self.ho * self.wo
    }
    /// A 1x1 convolution with stride 1 and no padding reads the input as its im2col matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }
}

/// `im2col` of one group of one sample: `x` is (C/groups, H, W), `col` is (C/groups x KH x KW,
/// HO x WO), zero where the window leaves the padded input.
fn im2col(g: &Geometry, x: &[f32], col: &mut [f32]) {
    let (ho, wo, s, p) = (g.ho, g.wo, g.stride, g.padding);
    let mut row = 0;
    for c in 0..g.cg() {
        let plane = &x[c * g.in_plane()..(c + 1) * g.in_plane()];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let dst = &mut col[row * ho * wo..(row + 1) * ho * wo];
                row += 1;
                // Output columns whose input column is inside: ow*s + kj - p in [0, W).
                let ow_lo = p.saturating_sub(kj).div_ceil(s).min(wo);
                let ow_hi = if g.w + p > kj {
                    ((g.w + p - kj - 1) / s + 1).min(wo)
                } else {
                    0
                }
                .max(ow_lo);
                for oh in 0..ho {
                    let d = &mut dst[oh * wo..(oh + 1) * wo];
                    let ih = (oh * s + ki) as isize - p as isize;
                    if ih < 0 || ih >= g.h as isize {
                        d.fill(0.0);
                        continue;
                    }
                    let src = &plane[ih as usize * g.w..(ih as usize + 1) * g.w];
                    d[..ow_lo].fill(0.0);
                    d[ow_hi..].fill(0.0);
                    if ow_hi == ow_lo {
                        continue;
                    }
                    if s == 1 {
                        let iw0 = ow_lo + kj - p;
                        d[ow_lo..ow_hi].copy_from_slice(&src[iw0..iw0 + (ow_hi - ow_lo)]);
                    } else {
                        for (ow, v) in d[ow_lo..ow_hi].iter_mut().enumerate() {
                            *v = src[(ow + ow_lo) * s + kj - p];
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds `col` (C/groups x KH x KW, HO x WO) into `x` (C/groups, H, W).
fn col2im(g: &Geometry, col: &[f32], x: &mut [f32]) {
    let (ho, wo, s, p) = (g.ho, g.wo, g.stride, g.padding);
    let mut row = 0;
    for c in 0..g.cg() {
        let plane = &mut x[c * g.in_plane()..(c + 1) * g.in_plane()];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let src = &col[row * ho * wo..(row + 1) * ho * wo];
                row += 1;
                let ow_lo = p.saturating_sub(kj).div_ceil(s).min(wo);
                let ow_hi = if g.w + p > kj {
                    ((g.w + p - kj - 1) / s + 1).min(wo)
                } else {
                    0
                }
                .max(ow_lo);
                for oh in 0..ho {
                    let ih = (oh * s + ki) as isize - p as isize;
                    if ih < 0 || ih >= g.h as isize || ow_hi == ow_lo {
                        continue;
                    }
                    let dst = &mut plane[ih as usize * g.w..(ih as usize + 1) * g.w];
                    let sr = &src[oh * wo..(oh + 1) * wo];
                    if s == 1 {
                        let iw0 = ow_lo + kj - p;
                        for (d, v) in dst[iw0..iw0 + (ow_hi - ow_lo)]
                            .iter_mut()
                            .zip(&sr[ow_lo..ow_hi])
                        {
                            *d += v;
                        }
                    } else {
                        for ow in ow_lo..ow_hi {
                            dst[ow * s + kj - p] += sr[ow];
                        }
                    }
                }
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

/// `dst (m x n, row-major) = [dst +] a (m x k) * b (k x n)`, single-threaded (the callers are
/// parallel over samples).
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

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("conv2d ({what}): only float32 is supported")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("conv2d ({what}): the tensor must be contiguous"),
    }
}

fn forward(g: &Geometry, x: &[f32], w: &[f32]) -> Vec<f32> {
    let (k, og, cg) = (g.k(), g.og(), g.cg());
    let (ip, op) = (g.in_plane(), g.out_plane());
    let mut y = vec![0f32; g.n * g.o * op];
    y.par_chunks_mut(g.o * op)
        .zip(x.par_chunks(g.c * ip))
        .for_each_init(
            || vec![0f32; if g.pointwise() { 0 } else { k * op }],
            |col, (y, x)| {
                for gi in 0..g.groups {
                    let xg = &x[gi * cg * ip..(gi + 1) * cg * ip];
                    let wg = &w[gi * og * k..(gi + 1) * og * k];
                    let rhs: &[f32] = if g.pointwise() {
                        xg
                    } else {
                        im2col(g, xg, col.as_mut_slice());
                        col.as_slice()
                    };
                    let yg = &mut y[gi * og * op..(gi + 1) * og * op];
                    matmul(yg, og, op, k, View::rows(wg, k), View::rows(rhs, op), false);
                }
            },
        );
    y
}

fn grad_input(g: &Geometry, gy: &[f32], w: &[f32]) -> Vec<f32> {
    let (k, og, cg) = (g.k(), g.og(), g.cg());
    let (ip, op) = (g.in_plane(), g.out_plane());
    let mut gx = vec![0f32; g.n * g.c * ip];
    gx.par_chunks_mut(g.c * ip)
        .zip(gy.par_chunks(g.o * op))
        .for_each_init(
            || vec![0f32; if g.pointwise() { 0 } else { k * op }],
            |col, (gx, gy)| {
                for gi in 0..g.groups {
                    let gyg = &gy[gi * og * op..(gi + 1) * og * op];
                    // W_g^T (K x O/groups) times gy_g (O/groups x HO*WO).
                    let wt = View::transposed(&w[gi * og * k..(gi + 1) * og * k], k);
                    let gxg = &mut gx[gi * cg * ip..(gi + 1) * cg * ip];
                    if g.pointwise() {
                        matmul(gxg, k, op, og, wt, View::rows(gyg, op), false);
                    } else {
                        matmul(col, k, op, og, wt, View::rows(gyg, op), false);
                        col2im(g, col, gxg);
                    }
                }
            },
        );
    gx
}

fn grad_weight(g: &Geometry, x: &[f32], gy: &[f32]) -> Vec<f32> {
    let (k, og, cg) = (g.k(), g.og(), g.cg());
    let (ip, op) = (g.in_plane(), g.out_plane());
    let len = g.o * k;
    (0..g.n)
        .into_par_iter()
        .fold(
            || {
                let col = vec![0f32; if g.pointwise() { 0 } else { k * op }];
                (vec![0f32; len], col)
            },
            |(mut gw, mut col), i| {
                let (x, gy) = (&x[i * g.c * ip..], &gy[i * g.o * op..]);
                for gi in 0..g.groups {
                    let xg = &x[gi * cg * ip..(gi + 1) * cg * ip];
                    let rhs = if g.pointwise() {
                        xg
                    } else {
                        im2col(g, xg, &mut col);
                        &col[..]
                    };
                    // gy_g (O/groups x HO*WO) times col^T (HO*WO x K).
                    matmul(
                        &mut gw[gi * og * k..(gi + 1) * og * k],
                        og,
                        k,
                        op,
                        View::rows(&gy[gi * og * op..(gi + 1) * og * op], op),
                        View::transposed(rhs, op),
                        true,
                    );
                }
                (gw, col)
            },
        )
        .map(|(gw, _)| gw)
        .reduce(
            || vec![0f32; len],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        )
}

/// y = conv2d(x, w).
struct Conv2d {
    stride: usize,
    padding: usize,
    groups: usize,
}

/// gx = d conv2d(x, w) / dx applied to gy; the input's dims are carried along.
struct Conv2dGradInput {
    stride: usize,
    padding: usize,
    groups: usize,
    x_dims: [usize; 4],
}

/// gw = d conv2d(x, w) / dw applied to gy; the weight's dims are carried along.
struct Conv2dGradWeight {
    stride: usize,
    padding: usize,
    groups: usize,
    w_dims: [usize; 4],
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
        let y = forward(&g, slice(s1, l1, "input")?, slice(s2, l2, "weight")?);
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.o, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let gy = gy.contiguous()?;
        let dims4 = |t: &Tensor| -> Result<[usize; 4]> {
            let (a, b, c, d) = t.dims4()?;
            Ok([a, b, c, d])
        };
        // No gradient for an input that nothing upstream needs (the images).
        let gx = if x.track_op() {
            let op = Conv2dGradInput {
                stride: self.stride,
                padding: self.padding,
                groups: self.groups,
                x_dims: dims4(x)?,
            };
            Some(gy.apply_op2_no_bwd(w, &op)?)
        } else {
            None
        };
        let gw = if w.track_op() {
            let op = Conv2dGradWeight {
                stride: self.stride,
                padding: self.padding,
                groups: self.groups,
                w_dims: dims4(w)?,
            };
            Some(x.apply_op2_no_bwd(&gy, &op)?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

impl CustomOp2 for Conv2dGradInput {
    fn name(&self) -> &'static str {
        "moco-conv2d-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(
            &self.x_dims,
            l2.dims(),
            self.stride,
            self.padding,
            self.groups,
        )?;
        if l1.dims() != [g.n, g.o, g.ho, g.wo] {
            candle_core::bail!("conv2d grad-input: gradient shape {:?}", l1.dims())
        }
        let gx = grad_input(
            &g,
            slice(s1, l1, "output gradient")?,
            slice(s2, l2, "weight")?,
        );
        Ok((CpuStorage::F32(gx), Shape::from(self.x_dims.to_vec())))
    }
}

impl CustomOp2 for Conv2dGradWeight {
    fn name(&self) -> &'static str {
        "moco-conv2d-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(
            l1.dims(),
            &self.w_dims,
            self.stride,
            self.padding,
            self.groups,
        )?;
        if l2.dims() != [g.n, g.o, g.ho, g.wo] {
            candle_core::bail!("conv2d grad-weight: gradient shape {:?}", l2.dims())
        }
        let gw = grad_weight(
            &g,
            slice(s1, l1, "input")?,
            slice(s2, l2, "output gradient")?,
        );
        Ok((CpuStorage::F32(gw), Shape::from(self.w_dims.to_vec())))
    }
}

/// `conv2d(x, w)` with dilation 1: the kernels of this module for float32 on the CPU, candle's
/// own `Tensor::conv2d` anywhere else. Same result either way, within float32 rounding.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    groups: usize,
) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return x.conv2d(w, padding, stride, 1, groups);
    }
    let op = Conv2d {
        stride,
        padding,
        groups,
    };
    x.contiguous()?.apply_op2(&w.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::{Device, Var};

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1e-6);
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap() / scale
    }

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

    /// Forward against candle's kernel and a direct f64 loop; both gradients, through a loss
    /// that weighs every output differently, against the direct loop (candle's own backward
    /// returns a wrongly shaped input gradient when the stride leaves input columns unused)
    /// and, where candle's shapes agree, against candle's backward too.
    #[allow(clippy::too_many_arguments)]
    fn check(
        n: usize,
        c: usize,
        h: usize,
        w: usize,
        o: usize,
        k: (usize, usize),
        s: usize,
        p: usize,
        groups: usize,
    ) {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
        let wt = Var::randn(0f32, 1.0, (o, c / groups, k.0, k.1), &dev).unwrap();
        let ours = conv2d(x.as_tensor(), wt.as_tensor(), p, s, groups).unwrap();
        let theirs = x
            .as_tensor()
            .conv2d(wt.as_tensor(), p, s, 1, groups)
            .unwrap();
        let what = format!("n{n} c{c} {h}x{w} o{o} k{k:?} s{s} p{p} g{groups}");
        assert_eq!(ours.dims(), theirs.dims(), "{what}");
        assert!(max_rel(&ours, &theirs) < 1e-5, "{what}: forward");
        let mix = Tensor::randn(0f32, 1.0, ours.shape(), &dev).unwrap();
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
        check(2, 3, 9, 9, 4, (3, 3), 1, 1, 1);
        check(3, 4, 8, 7, 6, (3, 3), 2, 1, 1);
        check(2, 8, 10, 10, 8, (1, 1), 1, 0, 1);
        check(2, 8, 10, 10, 4, (1, 1), 2, 0, 1);
        check(1, 3, 15, 13, 5, (7, 7), 2, 3, 1);
        check(2, 6, 7, 9, 4, (3, 2), 1, 0, 2);
        check(2, 6, 8, 8, 6, (3, 3), 2, 2, 3);
        check(4, 16, 6, 6, 16, (3, 3), 1, 1, 16);
        check(1, 2, 5, 5, 3, (5, 5), 3, 2, 1);
    }

    #[test]
    fn a_frozen_input_gets_no_gradient_and_other_devices_fall_back() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 6, 6), &dev).unwrap();
        let w = Var::randn(0f32, 1.0, (4, 3, 3, 3), &dev).unwrap();
        let g = conv2d(&x, w.as_tensor(), 1, 1, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&x).is_none() && g.get(w.as_tensor()).is_some());
        // float64 takes candle's path and agrees.
        let (x64, w64) = (
            x.to_dtype(DType::F64).unwrap(),
            w.as_tensor().to_dtype(DType::F64).unwrap(),
        );
        let a = conv2d(&x64, &w64, 1, 1, 1)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let b = conv2d(&x, w.as_tensor(), 1, 1, 1).unwrap();
        assert!(max_rel(&a, &b) < 1e-5);
    }
}
