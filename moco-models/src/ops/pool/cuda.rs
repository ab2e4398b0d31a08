//! Max pooling on moco-rs's CUDA kernels (`kernels/max_pool.cu`, feature `cuda`; `cuda_absent.rs`
//! stands in without it) for float32 CUDA tensors, with `torch.nn.MaxPool2d`'s semantics as the
//! CPU kernel: one thread per output forward, and a backward that gathers, per input value,
//! the gradients of the windows whose first maximum it is (no atomics, deterministic, the CPU
//! kernel's order of additions). The op keeps only its input.
//!
//! The arithmetic is the header's (`kernels/max_pool.cuh`), run on the CPU by
//! `ops/cuda_host.rs`'s tests; this file has compiled for sm_90 but has not yet run on a GPU.

use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{DType, Result, Tensor};

use crate::ops::attached::{attach1, Backward1};
use crate::ops::cuda_launch::{
    device_of, function, grid_stride, output, read, tensor, u32_of, MAX_POOL,
};

/// One pooling geometry as the kernels take it.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    planes: u32,
    h: u32,
    w: u32,
    ho: u32,
    wo: u32,
    kernel: u32,
    stride: u32,
    padding: u32,
}

impl Geometry {
    fn of(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Self> {
        let (n, c, h, w) = x.dims4()?;
        let out = |e: usize| (e + 2 * padding - kernel) / stride + 1;
        Ok(Self {
            planes: u32_of(n * c, "planes")?,
            h: u32_of(h, "height")?,
            w: u32_of(w, "width")?,
            ho: u32_of(out(h), "output height")?,
            wo: u32_of(out(w), "output width")?,
            kernel: u32_of(kernel, "kernel")?,
            stride: u32_of(stride, "stride")?,
            padding: u32_of(padding, "padding")?,
        })
    }
    fn output_len(&self) -> usize {
        self.planes as usize * self.ho as usize * self.wo as usize
    }
    fn input_len(&self) -> usize {
        self.planes as usize * self.h as usize * self.w as usize
    }
}

/// `torch.nn.functional.max_pool2d(x, kernel, stride, padding)` on a float32 CUDA tensor
/// (N, C, H, W), differentiable.
pub(super) fn max_pool2d(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    if !x.device().is_cuda() || x.dtype() != DType::F32 {
        candle_core::bail!("max_pool2d (cuda): expected a float32 CUDA tensor")
    }
    super::window::check_window(x, kernel, stride, padding, "max_pool2d (cuda)")?;
    let x = x.contiguous()?;
    let g = Geometry::of(&x, kernel, stride, padding)?;
    let dev = device_of(&x)?;
    let func = function(&dev, MAX_POOL, "moco_max_pool_forward")?;
    let mut y = output(&dev, g.output_len())?;
    {
        let xr = read(&x)?;
        let xv = xr.view()?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&xv)
            .arg(&g.planes)
            .arg(&g.h)
            .arg(&g.w)
            .arg(&g.ho)
            .arg(&g.wo);
        b.arg(&g.kernel).arg(&g.stride).arg(&g.padding).arg(&mut y);
        // SAFETY: moco_max_pool_forward's parameters; x holds planes * h * w values, y
        // planes * ho * wo.
        unsafe { b.launch(grid_stride(g.output_len())) }.map_err(candle_core::Error::wrap)?;
    }
    let (n, c, _, _) = x.dims4()?;
    let y = tensor(&dev, y, (n, c, g.ho as usize, g.wo as usize));
    attach1(&y, &x, MaxPoolGrad(g))
}

/// The backward pass: the input's gradient from the input and the output's gradient.
struct MaxPoolGrad(Geometry);

impl Backward1 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "moco-max-pool2d-cuda"
    }

    fn class(&self) -> &'static str {
        "max pool backward"
    }

    fn backward(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = self.0;
        let dev = device_of(x)?;
        let grad = grad.contiguous()?;
        let func = function(&dev, MAX_POOL, "moco_max_pool_backward")?;
        let mut gx = output(&dev, g.input_len())?;
        {
            let (xr, gr) = (read(x)?, read(&grad)?);
            let (xv, gv) = (xr.view()?, gr.view()?);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&xv)
                .arg(&gv)
                .arg(&g.planes)
                .arg(&g.h)
                .arg(&g.w)
                .arg(&g.ho)
                .arg(&g.wo);
            b.arg(&g.kernel).arg(&g.stride).arg(&g.padding).arg(&mut gx);
            // SAFETY: moco_max_pool_backward's parameters; gx holds planes * h * w values.
            unsafe { b.launch(grid_stride(g.input_len())) }.map_err(candle_core::Error::wrap)?;
        }
        Ok(Some(tensor(&dev, gx, x.shape())))
    }
}
