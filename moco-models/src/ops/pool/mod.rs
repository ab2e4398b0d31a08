//! Max pooling, device-neutral: [`stem_max_pool`], the ResNet stem's `MaxPool2d(3, 2, 1)`,
//! chooses the implementation once:
//!
//! - [`cpu`]: [`max_pool2d`], float32 CPU tensors (a custom op with its own backward);
//! - [`cuda`]: moco-rs's CUDA kernels for float32 CUDA tensors (`Settings::cuda_kernels`, off
//!   by default until run on a GPU);
//! - [`generic`]: candle's ops, recomputed in the backward pass.
//!
//! All three keep nothing but the input for the backward pass. A max pool built from candle's
//! generic ops (pad, strided slices, `maximum`) keeps every padded copy and intermediate maximum
//! in the autograd graph: on the ImageNet ResNet stem (64 x 112 x 112 per image) about 22 MB per
//! image, 0.7 GB for a batch of 32.

mod cpu;
#[cfg_attr(not(feature = "cuda"), path = "cuda_absent.rs")]
mod cuda;
mod generic;
mod window;

use candle_core::{Result, Tensor};

use crate::ops::attached::recomputed;
use crate::ops::Settings;
pub use cpu::max_pool2d;

/// torchvision's stem pooling, `MaxPool2d(3, stride=2, padding=1)`, on a post-ReLU input
/// (N, C, H, W): [`max_pool2d`] on float32 CPU tensors (as `settings` allow), the CUDA kernels on
/// float32 CUDA tensors (as `settings` allow), else candle's ops recomputed in the backward pass,
/// so that the graph keeps only the input, as the kernels do.
pub fn stem_max_pool(x: &Tensor, settings: &Settings) -> Result<Tensor> {
    moco_core::profile::timed("max pool forward", x.device(), || {
        if settings.fused(&[x]) {
            max_pool2d(x, 3, 2, 1)
        } else if settings.cuda(&[x]) {
            cuda::max_pool2d(x, 3, 2, 1)
        } else {
            recomputed(x, generic::max_pool_3x3_s2_p1, "max pool backward")
        }
    })
}
