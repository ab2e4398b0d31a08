//! The convolution on cuDNN (feature `cudnn`, float32 CUDA tensors; `cudnn_absent.rs` stands in
//! without it): forward, gradient wrt the
//! input and gradient wrt the weight, each one cuDNN call with the algorithm its heuristics
//! rank first, as PyTorch runs them with `torch.backends.cudnn.benchmark = False`. The
//! algorithm is asked for once per shape (pass, operand dims, padding, stride, precision,
//! device) and cached for the thread; the timed search of `cudnn.benchmark = True`
//! (`cudnnFind*`) is not done.
//!
//! Candle's `cudnn` feature gives its forward convolution only; its backward stays on
//! `conv_transpose2d` and a convolution with the output's size as its kernel. Precision follows
//! candle's TF32 switch for float32 matrix products
//! (`candle_core::cuda::set_gemm_reduced_precision_f32`, `moco ... --tf32`): off, cuDNN runs
//! in full float32 (`CUDNN_FMA_MATH`, as PyTorch with `torch.backends.cudnn.allow_tf32 =
//! False`); on, it may use TF32 tensor cores (`CUDNN_DEFAULT_MATH`, PyTorch's default).

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::cuda_backend::cudarc::cudnn::sys::{
    cudnnConvolutionBwdDataAlgo_t, cudnnConvolutionBwdFilterAlgo_t, cudnnConvolutionFwdAlgo_t,
    cudnnConvolutionMode_t, cudnnMathType_t, cudnnTensorFormat_t,
};
use candle_core::cuda_backend::cudarc::cudnn::{ConvBackwardData, ConvBackwardFilter, ConvForward};
use candle_core::cuda_backend::{CudaStorage, DeviceId};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// Whether `conv2d(x, w)` runs here: float32 CUDA tensors, no groups.
pub(super) fn applies(x: &Tensor, w: &Tensor, groups: usize) -> bool {
    groups == 1
        && x.device().is_cuda()
        && x.dtype() == candle_core::DType::F32
        && w.dtype() == candle_core::DType::F32
}

/// `conv2d(x, w, padding, stride)` (dilation 1, no groups) on cuDNN; no gradient is recorded
/// (`generic.rs` attaches the backward pass, [`input_grad`] and [`weight_grad`]).
pub(super) fn forward(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let op = Conv::new(padding, stride, Pass::Forward);
    x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &op)
}

/// The gradient of `conv2d(x, w, padding, stride)` wrt `x` given the output's gradient `g`.
pub(super) fn input_grad(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let op = Conv::new(padding, stride, Pass::Data(x.dims4()?));
    g.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &op)
}

/// The gradient of `conv2d(x, w, padding, stride)` wrt `w` given the output's gradient `g`.
pub(super) fn weight_grad(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let op = Conv::new(padding, stride, Pass::Filter(w.dims4()?));
    x.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &op)
}

/// Which of the three convolutions, with the shape of its result where the operands do not
/// determine it.
#[derive(Clone, Copy)]
enum Pass {
    /// (x, w) -> y.
    Forward,
    /// (gy, w) -> gx of these dims.
    Data((usize, usize, usize, usize)),
    /// (x, gy) -> gw of these dims.
    Filter((usize, usize, usize, usize)),
}

struct Conv {
    padding: usize,
    stride: usize,
    pass: Pass,
}

impl Conv {
    fn new(padding: usize, stride: usize, pass: Pass) -> Self {
        Self {
            padding,
            stride,
            pass,
        }
    }
}

/// One convolution call's shape: what its algorithm depends on.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    device: DeviceId,
    /// 0 forward, 1 input gradient, 2 weight gradient.
    pass: u8,
    operands: [[usize; 4]; 2],
    padding: usize,
    stride: usize,
    tf32: bool,
}

/// The algorithm chosen for one shape.
#[derive(Clone, Copy)]
enum Algo {
    Forward(cudnnConvolutionFwdAlgo_t),
    Data(cudnnConvolutionBwdDataAlgo_t),
    Filter(cudnnConvolutionBwdFilterAlgo_t),
}

thread_local! {
    /// The algorithms chosen so far on this thread, per shape.
    static PLANS: RefCell<HashMap<PlanKey, Algo>> = RefCell::new(HashMap::new());
}

/// The algorithm of `key`: the cached one, or `pick`'s (then cached).
fn planned<A: Copy>(
    key: PlanKey,
    pick: impl FnOnce() -> Result<A>,
    wrap: fn(A) -> Algo,
    unwrap: fn(Algo) -> Option<A>,
) -> Result<A> {
    if let Some(a) = PLANS
        .with(|p| p.borrow().get(&key).copied())
        .and_then(unwrap)
    {
        return Ok(a);
    }
    let a = pick()?;
    PLANS.with(|p| p.borrow_mut().insert(key, wrap(a)));
    Ok(a)
}

fn dims4(l: &Layout) -> Result<[usize; 4]> {
    match l.dims() {
        &[a, b, c, d] => Ok([a, b, c, d]),
        d => candle_core::bail!("conv2d-cudnn: expected a 4-D tensor, got {d:?}"),
    }
}

fn c_int(d: [usize; 4]) -> [std::ffi::c_int; 4] {
    d.map(|v| v as std::ffi::c_int)
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "conv2d-cudnn"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("conv2d-cudnn: cuDNN convolutions take CUDA tensors")
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        if !l1.is_contiguous() || !l2.is_contiguous() {
            candle_core::bail!("conv2d-cudnn: operands must be contiguous")
        }
        let dev = s1.device.clone();
        let a = s1.as_cuda_slice::<f32>()?.slice(l1.start_offset()..);
        let b = s2.as_cuda_slice::<f32>()?.slice(l2.start_offset()..);
        let (d1, d2) = (dims4(l1)?, dims4(l2)?);
        let cudnn = crate::ops::cudnn_handles::cudnn(&dev)?;
        let (p, s) = (
            self.padding as std::ffi::c_int,
            self.stride as std::ffi::c_int,
        );
        let mut conv = cudnn.create_conv2d::<f32>(
            [p, p],
            [s, s],
            [1, 1],
            cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )?;
        let tf32 = candle_core::cuda::gemm_reduced_precision_f32();
        conv.set_math_type(match tf32 {
            true => cudnnMathType_t::CUDNN_DEFAULT_MATH,
            false => cudnnMathType_t::CUDNN_FMA_MATH,
        })?;
        let key = |pass: u8| PlanKey {
            device: dev.id(),
            pass,
            operands: [d1, d2],
            padding: self.padding,
            stride: self.stride,
            tf32,
        };
        let nchw = cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let tensor = |d: [usize; 4]| cudnn.create_4d_tensor::<f32>(nchw, c_int(d));
        let filter = |d: [usize; 4]| cudnn.create_4d_filter::<f32>(nchw, c_int(d));
        let workspace = |bytes: usize| -> Result<Option<_>> {
            match bytes {
                0 => Ok(None),
                n => Ok(Some(unsafe { dev.alloc::<u8>(n)? })),
            }
        };
        let out_dims = match self.pass {
            Pass::Forward => {
                let [n, _, h, w] = d1;
                let [o, _, kh, kw] = d2;
                let (p, s) = (self.padding, self.stride);
                if h + 2 * p < kh || w + 2 * p < kw {
                    candle_core::bail!(
                        "conv2d-cudnn: kernel {kh}x{kw} larger than the padded input {h}x{w}"
                    )
                }
                [n, o, (h + 2 * p - kh) / s + 1, (w + 2 * p - kw) / s + 1]
            }
            Pass::Data((a, b, c, d)) | Pass::Filter((a, b, c, d)) => [a, b, c, d],
        };
        let mut out = unsafe { dev.alloc::<f32>(out_dims.iter().product())? };
        match self.pass {
            Pass::Forward => {
                let (x, w, y) = (tensor(d1)?, filter(d2)?, tensor(out_dims)?);
                let op = ConvForward {
                    conv: &conv,
                    x: &x,
                    w: &w,
                    y: &y,
                };
                let algo = planned(
                    key(0),
                    || Ok(op.pick_algorithm()?),
                    Algo::Forward,
                    |a| match a {
                        Algo::Forward(a) => Some(a),
                        _ => None,
                    },
                )?;
                let mut ws = workspace(op.get_workspace_size(algo)?)?;
                unsafe { op.launch(algo, ws.as_mut(), (1f32, 0f32), &a, &b, &mut out)? };
            }
            Pass::Data(_) => {
                let (dy, w, dx) = (tensor(d1)?, filter(d2)?, tensor(out_dims)?);
                let op = ConvBackwardData {
                    conv: &conv,
                    dx: &dx,
                    w: &w,
                    dy: &dy,
                };
                let algo = planned(
                    key(1),
                    || Ok(op.pick_algorithm()?),
                    Algo::Data,
                    |a| match a {
                        Algo::Data(a) => Some(a),
                        _ => None,
                    },
                )?;
                let mut ws = workspace(op.get_workspace_size(algo)?)?;
                unsafe { op.launch(algo, ws.as_mut(), (1f32, 0f32), &mut out, &b, &a)? };
            }
            Pass::Filter(_) => {
                let (x, dy, dw) = (tensor(d1)?, tensor(d2)?, filter(out_dims)?);
                let op = ConvBackwardFilter {
                    conv: &conv,
                    x: &x,
                    dw: &dw,
                    dy: &dy,
                };
                let algo = planned(
                    key(2),
                    || Ok(op.pick_algorithm()?),
                    Algo::Filter,
                    |a| match a {
                        Algo::Filter(a) => Some(a),
                        _ => None,
                    },
                )?;
                let mut ws = workspace(op.get_workspace_size(algo)?)?;
                unsafe { op.launch(algo, ws.as_mut(), (1f32, 0f32), &a, &mut out, &b)? };
            }
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from(out_dims.to_vec()),
        ))
    }
}
