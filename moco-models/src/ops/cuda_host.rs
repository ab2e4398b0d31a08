//! The CUDA kernels' arithmetic on the CPU: `kernels/host_check.cpp` runs each kernel of
//! `kernels/batch_norm.cu` and `kernels/max_pool.cu` over the same grid with the same
//! `__host__ __device__` header functions, compiled as host C++ by `build.rs` in every build.
//! The tests below drive those kernels in the order `ops/batch_norm/cuda.rs` and
//! `ops/pool_cuda.rs` launch them and compare the results with the CPU kernels and the float64
//! generic path, so that the GPU arithmetic (the per-thread shares, the tree reductions, how the
//! parts merge, the per-element formulas) is checked where no GPU is. [`bn_parts`] is the grid
//! size both sides use.

use std::ffi::c_int;

/// A running (count, mean, sum of squared deviations), `moco::Welford` of the headers.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Welford {
    n: f32,
    mean: f32,
    m2: f32,
}

/// Two sums, `moco::Sum2` of the headers.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sum2 {
    a: f32,
    b: f32,
}

/// Floats per [`Welford`] and per [`Sum2`], as the CUDA launches allocate them.
pub(crate) const WELFORD_FLOATS: usize = 3;
pub(crate) const SUM2_FLOATS: usize = 2;
const _: () = assert!(std::mem::size_of::<Welford>() == WELFORD_FLOATS * 4);
const _: () = assert!(std::mem::size_of::<Sum2>() == SUM2_FLOATS * 4);

extern "C" {
    fn moco_bn_parts(groups_channels: u32, count: u32) -> u32;
}

// The kernels' host emulations, for the tests.
#[cfg(test)]
extern "C" {
    fn moco_host_bn_stats(
        x: *const f32,
        n: u32,
        c: u32,
        l: u32,
        splits: u32,
        parts: u32,
        partials: *mut Welford,
    );
    fn moco_host_bn_finalize(
        partials: *const Welford,
        n: u32,
        c: u32,
        l: u32,
        splits: u32,
        parts: u32,
        eps: f32,
        momentum: f32,
        weight: *const f32,
        bias: *const f32,
        stats: *mut f32,
        running: *mut f32,
    );
    fn moco_host_bn_apply(
        x: *const f32,
        n: u32,
        c: u32,
        l: u32,
        splits: u32,
        scale: *const f32,
        shift: *const f32,
        end: c_int,
        other: *const f32,
        scale2: *const f32,
        shift2: *const f32,
        y: *mut f32,
    );
    fn moco_host_bn_backward_reduce(
        x: *const f32,
        grad: *const f32,
        out: *const f32,
        n: u32,
        c: u32,
        l: u32,
        splits: u32,
        parts: u32,
        stats: *const f32,
        partials: *mut Sum2,
    );
    fn moco_host_bn_backward_finalize(
        partials: *const Sum2,
        n: u32,
        c: u32,
        l: u32,
        splits: u32,
        parts: u32,
        weight: *const f32,
        stats: *const f32,
        coef: *mut f32,
        dwb: *mut f32,
    );
    fn moco_host_bn_backward_input(
        x: *const f32,
        grad: *const f32,
        out: *const f32,
        n: u32,
        c: u32,
        l: u32,
        splits: u32,
        stats: *const f32,
        coef: *const f32,
        second: c_int,
        z: *const f32,
        stats2: *const f32,
        coef2: *const f32,
        dx: *mut f32,
        d2: *mut f32,
    );
    fn moco_host_max_pool_forward(
        x: *const f32,
        planes: u32,
        h: u32,
        w: u32,
        ho: u32,
        wo: u32,
        kernel: u32,
        stride: u32,
        padding: u32,
        y: *mut f32,
    );
    fn moco_host_max_pool_backward(
        x: *const f32,
        gy: *const f32,
        planes: u32,
        h: u32,
        w: u32,
        ho: u32,
        wo: u32,
        kernel: u32,
        stride: u32,
        padding: u32,
        gx: *mut f32,
    );
}

/// Blocks per (group, channel) of the BatchNorm reductions over `count` values each
/// (`bn_parts` of `kernels/batch_norm.cuh`). Inputs are checked to fit `u32` by the callers.
pub(crate) fn bn_parts(groups_channels: u32, count: u32) -> u32 {
    // SAFETY: a pure function of two integers.
    unsafe { moco_bn_parts(groups_channels, count) }
}

/// `BnEnd` of the headers: what follows the normalisation.
pub(crate) const END_NONE: c_int = 0;
pub(crate) const END_RELU: c_int = 1;
pub(crate) const END_ADD_RELU: c_int = 2;
pub(crate) const END_PAIR_ADD_RELU: c_int = 3;
/// `BnSecond` of the headers: what the backward's elementwise pass writes besides dx.
pub(crate) const SECOND_NONE: c_int = 0;
pub(crate) const SECOND_RESIDUAL: c_int = 1;
pub(crate) const SECOND_PAIR: c_int = 2;

/// An (N, C, L) input in `splits` groups, as the BatchNorm kernels take it (the launches in
/// `ops/batch_norm/cuda.rs` and the host emulation here).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BnGeometry {
    pub(crate) n: u32,
    pub(crate) c: u32,
    pub(crate) l: u32,
    pub(crate) splits: u32,
}

impl BnGeometry {
    /// (group, channel) pairs.
    pub(crate) fn groups_channels(&self) -> usize {
        (self.splits * self.c) as usize
    }
    /// Values per (group, channel).
    pub(crate) fn count(&self) -> u32 {
        self.n / self.splits * self.l
    }
    /// Blocks per (group, channel) of the reductions.
    pub(crate) fn parts(&self) -> u32 {
        bn_parts(self.splits * self.c, self.count())
    }
    /// Values of the input.
    pub(crate) fn len(&self) -> usize {
        self.n as usize * self.c as usize * self.l as usize
    }
}

#[cfg(test)]
fn ptr_or_null(v: Option<&[f32]>) -> *const f32 {
    v.map_or(std::ptr::null(), <[f32]>::as_ptr)
}

/// One BatchNorm's training forward up to the elementwise pass, as `cuda.rs` launches it
/// (stats, finalize): `[mean, invstd, scale, shift]` per (group, channel), and `running`
/// ([mean, var], 2C) moved.
#[cfg(test)]
fn bn_statistics(
    x: &[f32],
    g: BnGeometry,
    wb: Option<(&[f32], &[f32])>,
    eps: f32,
    momentum: f32,
    running: &mut [f32],
) -> Vec<f32> {
    let parts = g.parts();
    let mut partials = vec![Welford::default(); g.groups_channels() * parts as usize];
    let mut stats = vec![0f32; 4 * g.groups_channels()];
    assert_eq!(x.len(), g.len());
    assert_eq!(running.len(), 2 * g.c as usize);
    // SAFETY: buffers of the sizes the kernels index (checked above and allocated here).
    unsafe {
        moco_host_bn_stats(
            x.as_ptr(),
            g.n,
            g.c,
            g.l,
            g.splits,
            parts,
            partials.as_mut_ptr(),
        );
        moco_host_bn_finalize(
            partials.as_ptr(),
            g.n,
            g.c,
            g.l,
            g.splits,
            parts,
            eps,
            momentum,
            ptr_or_null(wb.map(|w| w.0)),
            ptr_or_null(wb.map(|w| w.1)),
            stats.as_mut_ptr(),
            running.as_mut_ptr(),
        );
    }
    stats
}

/// The elementwise pass: `end(x * scale + shift, other, scale2, shift2)`.
#[cfg(test)]
fn bn_apply(
    x: &[f32],
    g: BnGeometry,
    scale_shift: (&[f32], &[f32]),
    end: c_int,
    other: Option<&[f32]>,
    second: Option<(&[f32], &[f32])>,
) -> Vec<f32> {
    let mut y = vec![0f32; g.len()];
    assert!(other.is_none_or(|o| o.len() == g.len()));
    // SAFETY: as above; null pointers only where `end` does not read them.
    unsafe {
        moco_host_bn_apply(
            x.as_ptr(),
            g.n,
            g.c,
            g.l,
            g.splits,
            scale_shift.0.as_ptr(),
            scale_shift.1.as_ptr(),
            end,
            ptr_or_null(other),
            ptr_or_null(second.map(|s| s.0)),
            ptr_or_null(second.map(|s| s.1)),
            y.as_mut_ptr(),
        );
    }
    y
}

/// One BatchNorm's backward reductions (reduce, finalize): `[k, mean(dy), mean(dy * xhat)]`
/// per (group, channel) and `[dweight, dbias]` (2C).
#[cfg(test)]
fn bn_backward_coefficients(
    x: &[f32],
    grad: &[f32],
    out: Option<&[f32]>,
    g: BnGeometry,
    weight: Option<&[f32]>,
    stats: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let parts = g.parts();
    let mut partials = vec![Sum2::default(); g.groups_channels() * parts as usize];
    let mut coef = vec![0f32; 3 * g.groups_channels()];
    let mut dwb = vec![0f32; 2 * g.c as usize];
    // SAFETY: as above.
    unsafe {
        moco_host_bn_backward_reduce(
            x.as_ptr(),
            grad.as_ptr(),
            ptr_or_null(out),
            g.n,
            g.c,
            g.l,
            g.splits,
            parts,
            stats.as_ptr(),
            partials.as_mut_ptr(),
        );
        moco_host_bn_backward_finalize(
            partials.as_ptr(),
            g.n,
            g.c,
            g.l,
            g.splits,
            parts,
            ptr_or_null(weight),
            stats.as_ptr(),
            coef.as_mut_ptr(),
            dwb.as_mut_ptr(),
        );
    }
    (coef, dwb)
}

/// The backward's elementwise pass: dx, and the second operand's gradient as `second` says.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
fn bn_backward_input(
    x: &[f32],
    grad: &[f32],
    out: Option<&[f32]>,
    g: BnGeometry,
    stats: &[f32],
    coef: &[f32],
    second: c_int,
    pair: Option<(&[f32], &[f32], &[f32])>,
) -> (Vec<f32>, Vec<f32>) {
    let mut dx = vec![0f32; g.len()];
    let mut d2 = vec![0f32; g.len()];
    // SAFETY: as above.
    unsafe {
        moco_host_bn_backward_input(
            x.as_ptr(),
            grad.as_ptr(),
            ptr_or_null(out),
            g.n,
            g.c,
            g.l,
            g.splits,
            stats.as_ptr(),
            coef.as_ptr(),
            second,
            ptr_or_null(pair.map(|p| p.0)),
            ptr_or_null(pair.map(|p| p.1)),
            ptr_or_null(pair.map(|p| p.2)),
            dx.as_mut_ptr(),
            d2.as_mut_ptr(),
        );
    }
    (dx, d2)
}

/// Max pooling forward and backward on the host, `(planes, h, w)` pooled with `(kernel,
/// stride, padding)`.
#[cfg(test)]
fn max_pool(
    x: &[f32],
    gy: &[f32],
    (planes, h, w): (u32, u32, u32),
    (k, s, p): (u32, u32, u32),
) -> (Vec<f32>, Vec<f32>) {
    let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
    let mut y = vec![0f32; (planes * ho * wo) as usize];
    let mut gx = vec![0f32; x.len()];
    assert_eq!(x.len(), (planes * h * w) as usize);
    assert_eq!(gy.len(), y.len());
    // SAFETY: buffers of the sizes the kernels index (checked above).
    unsafe {
        moco_host_max_pool_forward(x.as_ptr(), planes, h, w, ho, wo, k, s, p, y.as_mut_ptr());
        moco_host_max_pool_backward(
            x.as_ptr(),
            gy.as_ptr(),
            planes,
            h,
            w,
            ho,
            wo,
            k,
            s,
            p,
            gx.as_mut_ptr(),
        );
    }
    (y, gx)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ops::batch_norm::{forward, End, Params};
    use crate::ops::pool::max_pool2d;
    use crate::ops::Settings;
    use candle_core::{DType, Device, Tensor, Var};
    use moco_core::init::seeded_randn;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Which BatchNorm ending a case runs.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Case {
        None,
        Relu,
        AddRelu,
        Pair,
    }

    /// One layer's tensors: input, affine parameters and running statistics.
    struct Layer {
        x: Var,
        w: Var,
        b: Var,
        rm: Var,
        rv: Var,
    }

    impl Layer {
        fn new(dims: (usize, usize, usize, usize), seed: u64, dtype: DType) -> Self {
            let dev = Device::Cpu;
            let c = dims.1;
            let r = |shape: &[usize], s: u64, mean: f64| {
                let t =
                    (seeded_randn(0.0, 1.0, shape, seed * 10 + s, &dev).unwrap() + mean).unwrap();
                Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
            };
            Self {
                // An offset mean, so that the running statistics and the centring matter.
                x: r(&[dims.0, dims.1, dims.2, dims.3], 1, 0.7),
                w: r(&[c], 2, 1.0),
                b: r(&[c], 3, 0.0),
                rm: r(&[c], 4, 0.0),
                rv: Var::from_tensor(&(r(&[c], 5, 0.0).abs().unwrap() + 0.5).unwrap()).unwrap(),
            }
        }

        fn params(&self, splits: usize) -> Params<'_> {
            Params {
                weight_bias: Some((self.w.as_tensor(), self.b.as_tensor())),
                running_mean: &self.rm,
                running_var: &self.rv,
                eps: 1e-5,
                momentum: 0.1,
                splits,
                channels: self.w.dim(0).unwrap(),
            }
        }

        fn to_dtype(&self, dtype: DType) -> Self {
            let v = |t: &Var| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap();
            Self {
                x: v(&self.x),
                w: v(&self.w),
                b: v(&self.b),
                rm: v(&self.rm),
                rv: v(&self.rv),
            }
        }
    }

    /// What a reference implementation gives for one case: output, running statistics
    /// (both layers'), and every gradient (x, w, b, then r or the second layer's z, w, b).
    struct Outcome {
        y: Vec<f32>,
        running: Vec<Vec<f32>>,
        grads: Vec<Vec<f32>>,
    }

    /// The case on candle tensors through `batch_norm::forward` (the CPU kernels with
    /// `Settings::default()`, candle's ops with `Settings::generic()` in float64).
    fn reference(
        case: Case,
        a: &Layer,
        second: &Layer,
        gy: &Tensor,
        splits: usize,
        settings: &Settings,
    ) -> Outcome {
        let (pa, pb) = (a.params(splits), second.params(splits));
        let end = match case {
            Case::None => End::None,
            Case::Relu => End::Relu,
            Case::AddRelu => End::AddRelu(second.x.as_tensor()),
            Case::Pair => End::PairAddRelu(&pb, second.x.as_tensor()),
        };
        let y = forward(&pa, a.x.as_tensor(), end, true, settings).unwrap();
        let loss = (&y * gy.to_dtype(y.dtype()).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let g = |v: &Var| values(grads.get(v.as_tensor()).unwrap());
        let mut all = vec![g(&a.x), g(&a.w), g(&a.b)];
        let mut running = vec![values(a.rm.as_tensor()), values(a.rv.as_tensor())];
        match case {
            Case::AddRelu => all.push(g(&second.x)),
            Case::Pair => {
                all.extend([g(&second.x), g(&second.w), g(&second.b)]);
                running.extend([values(second.rm.as_tensor()), values(second.rv.as_tensor())]);
            }
            _ => {}
        }
        Outcome {
            y: values(&y),
            running,
            grads: all,
        }
    }

    /// The case on the host-compiled kernels, in `cuda.rs`'s launch order.
    fn kernels(case: Case, a: &Layer, second: &Layer, gy: &[f32], splits: u32) -> Outcome {
        let dims = a.x.dims4().unwrap();
        let g = BnGeometry {
            n: dims.0 as u32,
            c: dims.1 as u32,
            l: (dims.2 * dims.3) as u32,
            splits,
        };
        let gcs = g.groups_channels();
        let (x, w, b) = (values(&a.x), values(&a.w), values(&a.b));
        let mut running = [values(&a.rm), values(&a.rv)].concat();
        let stats = bn_statistics(&x, g, Some((&w, &b)), 1e-5, 0.1, &mut running);
        let scale_shift = (&stats[2 * gcs..3 * gcs], &stats[3 * gcs..]);
        let z = values(&second.x);
        let (w2, b2) = (values(&second.w), values(&second.b));
        let mut running2 = [values(&second.rm), values(&second.rv)].concat();
        let stats2 = match case {
            Case::Pair => bn_statistics(&z, g, Some((&w2, &b2)), 1e-5, 0.1, &mut running2),
            _ => vec![],
        };
        let y = match case {
            Case::None => bn_apply(&x, g, scale_shift, END_NONE, None, None),
            Case::Relu => bn_apply(&x, g, scale_shift, END_RELU, None, None),
            Case::AddRelu => bn_apply(&x, g, scale_shift, END_ADD_RELU, Some(&z), None),
            Case::Pair => bn_apply(
                &x,
                g,
                scale_shift,
                END_PAIR_ADD_RELU,
                Some(&z),
                Some((&stats2[2 * gcs..3 * gcs], &stats2[3 * gcs..])),
            ),
        };
        let out = (case != Case::None).then_some(&y[..]);
        let (coef, dwb) = bn_backward_coefficients(&x, gy, out, g, Some(&w), &stats);
        let c = g.c as usize;
        let mut grads = vec![];
        let mut runs = vec![running[..c].to_vec(), running[c..].to_vec()];
        match case {
            Case::Pair => {
                let (coef2, dwb2) = bn_backward_coefficients(&z, gy, out, g, Some(&w2), &stats2);
                let (dx, dz) = bn_backward_input(
                    &x,
                    gy,
                    out,
                    g,
                    &stats,
                    &coef,
                    SECOND_PAIR,
                    Some((&z, &stats2, &coef2)),
                );
                grads.extend([dx, dwb[..c].to_vec(), dwb[c..].to_vec()]);
                grads.extend([dz, dwb2[..c].to_vec(), dwb2[c..].to_vec()]);
                runs.extend([running2[..c].to_vec(), running2[c..].to_vec()]);
            }
            _ => {
                let second = if case == Case::AddRelu {
                    SECOND_RESIDUAL
                } else {
                    SECOND_NONE
                };
                let (dx, dr) = bn_backward_input(&x, gy, out, g, &stats, &coef, second, None);
                grads.extend([dx, dwb[..c].to_vec(), dwb[c..].to_vec()]);
                if case == Case::AddRelu {
                    grads.push(dr);
                }
            }
        }
        Outcome {
            y,
            running: runs,
            grads,
        }
    }

    fn compare(what: &str, got: &Outcome, want: &Outcome, tol: f32) {
        let scale = |v: &[f32]| v.iter().fold(1f32, |m, x| m.max(x.abs()));
        let check = |name: String, a: &[f32], b: &[f32]| {
            let d = max_diff(a, b) / scale(b);
            assert!(
                d <= tol,
                "{what}: {name} differs by {d:e} (relative to its largest value)"
            );
        };
        check("output".into(), &got.y, &want.y);
        for (i, (a, b)) in got.running.iter().zip(&want.running).enumerate() {
            check(format!("running statistic {i}"), a, b);
        }
        assert_eq!(got.grads.len(), want.grads.len());
        for (i, (a, b)) in got.grads.iter().zip(&want.grads).enumerate() {
            check(format!("gradient {i}"), a, b);
        }
    }

    /// Every ending, with one and two groups and with sizes that split into several parts
    /// (partials merged) or leave a ragged last part: the kernels' forward (output, running
    /// statistics) and backward (every gradient) against the CPU kernels (float32, statistics
    /// in float64 blocks) and the generic path in float64.
    #[test]
    fn batch_norm_kernels_match_the_cpu_kernels_and_float64() {
        let cases = [Case::None, Case::Relu, Case::AddRelu, Case::Pair];
        let geometries = [((6, 5, 7, 7), 1), ((8, 3, 32, 32), 2), ((4, 2, 33, 31), 1)];
        for (gi, &(dims, splits)) in geometries.iter().enumerate() {
            let count = (dims.0 / splits * dims.2 * dims.3) as u32;
            let parts = bn_parts((splits * dims.1) as u32, count);
            if gi > 0 {
                assert!(parts > 1, "{dims:?}: the case should exercise the merges");
            }
            for case in cases {
                let seed = 10 * gi as u64;
                let gy = seeded_randn(
                    0.0,
                    1.0,
                    &[dims.0, dims.1, dims.2, dims.3],
                    seed + 9,
                    &Device::Cpu,
                )
                .unwrap();
                let fresh = || {
                    (
                        Layer::new(dims, seed + 1, DType::F32),
                        Layer::new(dims, seed + 2, DType::F32),
                    )
                };
                let (a, b) = fresh();
                let got = kernels(case, &a, &b, &values(&gy), splits as u32);
                let (a, b) = fresh();
                let cpu = reference(case, &a, &b, &gy, splits, &Settings::default());
                let what = format!("{case:?} {dims:?} splits {splits} ({parts} parts)");
                compare(&format!("{what} vs CPU kernels"), &got, &cpu, 5e-6);
                let (a, b) = fresh();
                let (a, b) = (a.to_dtype(DType::F64), b.to_dtype(DType::F64));
                let exact = reference(case, &a, &b, &gy, splits, &Settings::generic());
                compare(&format!("{what} vs float64"), &got, &exact, 5e-6);
            }
        }
    }

    /// The elementwise pass with evaluation-mode scale and shift is the CPU's inference pass.
    #[test]
    fn batch_norm_evaluation_pass_matches_the_cpu() {
        let dims = (3, 4, 5, 6);
        let a = Layer::new(dims, 3, DType::F32);
        let p = a.params(1);
        let x = a.x.as_tensor().detach();
        let want = values(&forward(&p, &x, End::Relu, false, &Settings::default()).unwrap());
        let (scale, shift) = p.eval_scale_shift_f32().unwrap();
        let g = BnGeometry {
            n: 3,
            c: 4,
            l: 30,
            splits: 1,
        };
        let got = bn_apply(&values(&x), g, (&scale, &shift), END_RELU, None, None);
        assert_eq!(got, want);
    }

    /// Forward and backward exactly as the CPU kernel (which follows torch.nn.MaxPool2d), with
    /// ties (values on a coarse grid), negative values (padding never wins) and a NaN.
    #[test]
    fn max_pool_kernels_match_the_cpu_kernel_exactly() {
        let dev = Device::Cpu;
        for (dims, k, s, p) in [
            ((2, 3, 9, 8), 3, 2, 1),
            ((1, 2, 112, 112), 3, 2, 1),
            ((1, 2, 7, 7), 3, 1, 1),
            ((2, 1, 6, 10), 2, 2, 0),
            ((1, 2, 11, 5), 5, 3, 2),
        ] {
            let shape = [dims.0, dims.1, dims.2, dims.3];
            let x = (seeded_randn(0.0, 1.0, &shape, 4, &dev).unwrap() * 2.0)
                .unwrap()
                .round()
                .unwrap();
            let mut xv = values(&(x - 3.0).unwrap());
            xv[5] = f32::NAN;
            let x = Var::from_tensor(&Tensor::from_slice(&xv, &shape, &dev).unwrap()).unwrap();
            let y = max_pool2d(x.as_tensor(), k, s, p).unwrap();
            let gy = seeded_randn(0.0, 1.0, y.shape(), 5, &dev).unwrap();
            let grads = (&y * &gy).unwrap().sum_all().unwrap().backward().unwrap();
            let geometry = ((dims.0 * dims.1) as u32, dims.2 as u32, dims.3 as u32);
            let (hy, hgx) = max_pool(&xv, &values(&gy), geometry, (k as u32, s as u32, p as u32));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&hy), bits(&values(&y)), "{dims:?} k{k} s{s} p{p}");
            let want = values(grads.get(x.as_tensor()).unwrap());
            assert_eq!(bits(&hgx), bits(&want), "{dims:?} k{k} s{s} p{p}: gradient");
        }
    }
}
