//! BatchNorm's training mode on cuDNN (feature `cudnn`, float32 CUDA tensors, one normalised
//! group: no splits, no SyncBN; `cudnn_absent.rs` stands in without the feature), switched on with
//! `Settings::cudnn_batch_norm` (`MOCO_CUDNN_BN=1` for the binary): the batch statistics and
//! the normalised output in one cuDNN call (`cudnnBatchNormalizationForwardTraining`, spatial
//! mode), the gradients of the input, the weight and the bias in another
//! (`cudnnBatchNormalizationBackward`), where the generic path (`generic.rs`) runs
//! about seven full passes over the activations forward and nine backward, one CUDA kernel each.
//! PyTorch's `cudnn_batch_norm` makes the same two calls (whether PyTorch picks it over its own
//! CUDA kernels depends on its version and the input).
//!
//! The running statistics stay with the op's `mod.rs` (candle ops on C values): cuDNN is
//! asked for the batch mean and inverse standard deviation only (its running-average pointers
//! are null), and the variance is recovered as `1 / invstd^2 - eps`.
//!
//! Off by default: this path has compiled and been read, but not yet run on a GPU (`moco
//! check-device --device cuda` with `MOCO_CUDNN_BN=1` is the check, `scripts/gpu-check.sh` runs
//! it). Anything it does not cover (other dtypes, splits, SyncBN, `eps` below cuDNN's minimum
//! of 1e-5) takes the generic path.

use std::ffi::{c_int, c_void};

use candle_core::cuda_backend::cudarc::cudnn::{result, sys};
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// cuDNN's `CUDNN_BN_MIN_EPSILON`.
const MIN_EPS: f64 = 1e-5;

/// Whether the training-mode BatchNorm of `x` in `splits` groups with `eps` can run here
/// (outside a SyncBN scope, which the caller checks, as it checks the setting).
pub(super) fn applies(x: &Tensor, splits: usize, eps: f64) -> bool {
    x.device().is_cuda()
        && x.dtype() == DType::F32
        && x.rank() >= 2
        && splits == 1
        && eps >= MIN_EPS
}

/// The normalised output of `x` (N, C, ...) in `x`'s shape, and the batch mean and inverse
/// standard deviation `1 / sqrt(var + eps)` (biased variance), each (C); `w` and `b` (C).
/// No gradient is recorded (the op's `mod.rs` attaches the backward pass).
pub(super) fn forward(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = Norm::new(x.dims(), eps, Pass::Forward)?;
    let out = x
        .contiguous()?
        .apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &op)?;
    split(&out, x.dims(), op.nchw[1])
}

/// The gradients of the input, the weight and the bias given the output's gradient `dy` (the
/// input's shape), from the input `x`, the weight `w` and the statistics of [`forward`].
pub(super) fn backward(
    x: &Tensor,
    dy: &Tensor,
    w: &Tensor,
    mean: &Tensor,
    invstd: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = Norm::new(x.dims(), eps, Pass::Backward)?;
    let params = Tensor::cat(
        &[w.flatten_all()?, mean.flatten_all()?, invstd.flatten_all()?],
        0,
    )?;
    let out = x
        .contiguous()?
        .apply_op3_no_bwd(&dy.contiguous()?, &params, &op)?;
    split(&out, x.dims(), op.nchw[1])
}

/// An op's output `[values of the input's size, c, c]` as the first part in `dims` and the two
/// per-channel parts copied out (they outlive the first).
fn split(out: &Tensor, dims: &[usize], c: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let m = dims.iter().product();
    Ok((
        out.narrow(0, 0, m)?.reshape(dims)?,
        out.narrow(0, m, c)?.copy()?,
        out.narrow(0, m + c, c)?.copy()?,
    ))
}

#[derive(Clone, Copy, Debug)]
enum Pass {
    /// (x, w, b) -> [y, mean, invstd].
    Forward,
    /// (x, dy, [w, mean, invstd]) -> [dx, dw, db].
    Backward,
}

struct Norm {
    /// The input as cuDNN sees it: (N, C, L, 1), L the product of the spatial sizes.
    nchw: [usize; 4],
    eps: f64,
    pass: Pass,
}

impl Norm {
    fn new(dims: &[usize], eps: f64, pass: Pass) -> Result<Self> {
        if dims.len() < 2 {
            candle_core::bail!("batch-norm-cudnn: expected (N, C, ...), got {dims:?}")
        }
        let l = dims[2..].iter().product();
        Ok(Self {
            nchw: [dims[0], dims[1], l, 1],
            eps,
            pass,
        })
    }
}

/// A float32 NCHW tensor descriptor, destroyed on drop.
struct Desc(sys::cudnnTensorDescriptor_t);

impl Desc {
    fn new(dims: [usize; 4]) -> Result<Self> {
        let desc = Desc(result::create_tensor_descriptor()?);
        // SAFETY: a descriptor just created and not yet destroyed.
        unsafe {
            result::set_tensor4d_descriptor(
                desc.0,
                sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                dims.map(|d| d as c_int),
            )?
        };
        Ok(desc)
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { result::destroy_tensor_descriptor(self.0) };
    }
}

impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        "batch-norm-cudnn"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("batch-norm-cudnn: cuDNN takes CUDA tensors")
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let [n, c, h, w] = self.nchw;
        let m = n * c * h * w;
        let per_channel = match self.pass {
            Pass::Forward => [c, c],
            Pass::Backward => [m, 3 * c],
        };
        for (l, want) in [(l1, m), (l2, per_channel[0]), (l3, per_channel[1])] {
            if !l.is_contiguous() || l.shape().elem_count() != want {
                candle_core::bail!(
                    "batch-norm-cudnn ({:?}): expected contiguous operands of {m}, {:?} values, got {:?}",
                    self.pass,
                    per_channel,
                    l.dims()
                )
            }
        }
        let dev = s1.device.clone();
        let stream = dev.cuda_stream();
        let a = s1.as_cuda_slice::<f32>()?.slice(l1.start_offset()..);
        let b = s2.as_cuda_slice::<f32>()?.slice(l2.start_offset()..);
        let p = s3.as_cuda_slice::<f32>()?.slice(l3.start_offset()..);
        // [y or dx (m), mean or dw (c), invstd or db (c)].
        let mut out = unsafe { dev.alloc::<f32>(m + 2 * c)? };
        let data = Desc::new(self.nchw)?;
        let param = Desc::new([1, c, 1, 1])?;
        let (one, zero) = (1f32, 0f32);
        let one = &one as *const f32 as *const c_void;
        let zero = &zero as *const f32 as *const c_void;
        let mode = sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL;
        let float = std::mem::size_of::<f32>() as u64;
        crate::ops::cudnn_handles::with_raw(&dev, |handle| {
            let (pa, _ga) = a.device_ptr(&stream);
            let (pb, _gb) = b.device_ptr(&stream);
            let (pp, _gp) = p.device_ptr(&stream);
            let (po, _go) = out.device_ptr_mut(&stream);
            let at = |base: u64, i: usize| (base + i as u64 * float) as *mut c_void;
            // SAFETY: the pointers address live buffers of the sizes checked above, on the
            // handle's stream; the descriptors describe them.
            let status = unsafe {
                match self.pass {
                    Pass::Forward => sys::cudnnBatchNormalizationForwardTraining(
                        handle,
                        mode,
                        one,
                        zero,
                        data.0,
                        at(pa, 0),
                        data.0,
                        at(po, 0),
                        param.0,
                        at(pb, 0),
                        at(pp, 0),
                        0.0,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        self.eps,
                        at(po, m),
                        at(po, m + c),
                    ),
                    // (x, dy, [w, mean, invstd]).
                    Pass::Backward => sys::cudnnBatchNormalizationBackward(
                        handle,
                        mode,
                        one,
                        zero,
                        one,
                        zero,
                        data.0,
                        at(pa, 0),
                        data.0,
                        at(pb, 0),
                        data.0,
                        at(po, 0),
                        param.0,
                        at(pp, 0),
                        at(po, m),
                        at(po, m + c),
                        self.eps,
                        at(pp, c),
                        at(pp, 2 * c),
                    ),
                }
            };
            status.result()?;
            Ok(())
        })?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from(m + 2 * c),
        ))
    }
}
