//! The ops the backbones are made of, one folder or file per op, each with a device-neutral
//! entry point that chooses the implementation once, from the tensors and the [`Settings`]
//! the layer was built with:
//!
//! - [`conv`]: 2-D convolution (CPU kernels on gemm or oneDNN, cuDNN, candle's ops);
//! - [`batch_norm`]: BatchNorm's training and evaluation modes with the ReLU, residual add and
//!   downsampling pair fused in (CPU kernels, CUDA kernels, cuDNN, candle's ops);
//! - [`transformer`]: LayerNorm, attention, GELU (CPU kernels, candle's ops);
//! - [`linear`]: a linear layer (candle's matrix products, a fused bias on the CPU);
//! - [`pool`]: the ResNet stem's max pool (CPU and CUDA kernels, candle's ops);
//! - [`elementwise`]: the residual add + ReLU;
//! - [`retain_freed_memory`]: the CUDA memory pool kept between steps;
//!
//! and what they share: [`settings`] (the one kernel setting), `attached` (ops attached to the
//! graph by their backward pass alone, keeping only their inputs and output), `scratch` (CPU
//! buffers), `cudnn_handles` (the cuDNN handles, feature `cudnn`), `cuda_launch` (loading
//! and launching moco-rs's CUDA kernels, feature `cuda`) and `cuda_host` (those kernels'
//! arithmetic compiled for the CPU, for the tests and the grid sizes).

pub(crate) mod attached;
pub mod batch_norm;
pub mod conv;
#[cfg(any(test, feature = "cuda"))]
pub(crate) mod cuda_host;
#[cfg(feature = "cuda")]
pub(crate) mod cuda_launch;
#[cfg_attr(not(feature = "cuda"), path = "cuda_memory_absent.rs")]
mod cuda_memory;
#[cfg(feature = "cudnn")]
mod cudnn_handles;
pub mod elementwise;
pub mod linear;
pub mod pool;
pub(crate) mod scratch;
pub mod settings;
pub mod transformer;

pub use cuda_memory::retain_freed_memory;
pub use settings::{ConvEngine, Settings, ONEDNN_MISSING};
