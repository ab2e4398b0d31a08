//! Loading and launching moco-rs's CUDA kernels (feature `cuda`): the PTX that `build.rs`
//! compiles from `kernels/*.cu`, the launch shapes, and the tensors' device buffers as the
//! kernels take them (contiguous float32 views in, fresh buffers out, wrapped back into
//! tensors). The ops' `cuda.rs` files launch through these.

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, CudaView, LaunchConfig};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{Device, Result, Shape, Storage, StorageRef, Tensor};

/// Threads per block of every kernel (`kBlock` of `kernels/common.cuh`).
pub(crate) const BLOCK: u32 = 256;
/// Blocks a grid-stride kernel is launched with at most: 16 per SM of an H100/H200.
const MAX_GRID: u32 = 132 * 16;

/// One kernel source's PTX and the name its module is cached under.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Module {
    name: &'static str,
    ptx: &'static str,
}

/// `kernels/batch_norm.cu`.
pub(crate) const BATCH_NORM: Module = Module {
    name: "moco_batch_norm",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/batch_norm.ptx")),
};

/// `kernels/max_pool.cu`.
pub(crate) const MAX_POOL: Module = Module {
    name: "moco_max_pool",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/max_pool.ptx")),
};

/// The kernel `name` of `module` on `dev` (the module loaded once per device), launched with
/// `dev.cuda_stream().launch_builder(&function)`.
pub(crate) fn function(dev: &CudaDevice, module: Module, name: &str) -> Result<CudaFunction> {
    Ok(dev
        .get_or_load_custom_func(name, module.name, module.ptx)?
        .into_cuda_function())
}

/// A grid of `blocks` blocks of [`BLOCK`] threads.
pub(crate) fn blocks(blocks: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One thread per item for `items` items (the per-channel kernels).
pub(crate) fn per_item(items: usize) -> LaunchConfig {
    blocks(items.div_ceil(BLOCK as usize) as u32)
}

/// A grid-stride kernel over `total` values.
pub(crate) fn grid_stride(total: usize) -> LaunchConfig {
    blocks(total.div_ceil(BLOCK as usize).min(MAX_GRID as usize) as u32)
}

/// The CUDA device of a tensor.
pub(crate) fn device_of(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        d => candle_core::bail!("moco CUDA kernels: expected a CUDA tensor, got one on {d:?}"),
    }
}

/// A contiguous float32 CUDA tensor's storage, held for reading while a kernel is queued.
pub(crate) struct Read<'a> {
    guard: StorageRef<'a>,
    start: usize,
    len: usize,
}

impl Read<'_> {
    /// The tensor's values as a device view.
    pub(crate) fn view(&self) -> Result<CudaView<'_, f32>> {
        match &*self.guard {
            Storage::Cuda(s) => Ok(s
                .as_cuda_slice::<f32>()?
                .slice(self.start..self.start + self.len)),
            _ => candle_core::bail!("moco CUDA kernels: expected a CUDA tensor"),
        }
    }
}

/// `t`'s storage for reading; `t` must be contiguous (callers make it so).
pub(crate) fn read(t: &Tensor) -> Result<Read<'_>> {
    let (guard, layout) = t.storage_and_layout();
    if !layout.is_contiguous() {
        candle_core::bail!(
            "moco CUDA kernels: expected a contiguous tensor, got strides {:?}",
            layout.stride()
        )
    }
    Ok(Read {
        guard,
        start: layout.start_offset(),
        len: layout.shape().elem_count(),
    })
}

/// A fresh buffer of `len` floats, written by a kernel before it is read.
pub(crate) fn output(dev: &CudaDevice, len: usize) -> Result<CudaSlice<f32>> {
    // SAFETY: every caller launches a kernel that writes all `len` values before any read.
    unsafe { dev.alloc::<f32>(len) }
}

/// A buffer as a tensor of `shape` (no gradient recorded).
pub(crate) fn tensor(dev: &CudaDevice, buf: CudaSlice<f32>, shape: impl Into<Shape>) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(buf, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// A size as the kernels' `unsigned`, or an error naming `what`.
pub(crate) fn u32_of(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| {
        candle_core::Error::Msg(format!(
            "moco CUDA kernels: {what} ({n}) does not fit 32 bits"
        ))
    })
}
