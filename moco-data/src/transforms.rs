//! Transforms from images to normalised tensors.

use candle_core::{Device, Tensor};

use crate::image::{center_crop, resize_shorter, Image};
use crate::Result;

/// ImageNet mean (RGB), as in the official MoCo scripts.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet standard deviation (RGB).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The evaluation transform of `main_lincls.py`, scaled to any size: `Resize(size * 256 / 224)`
/// (shorter side, PIL bilinear with antialiasing), `CenterCrop(size)`, `ToTensor`, `Normalize`.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalTransform {
    /// Output side length (224 for ImageNet).
    pub size: usize,
    /// Shorter side after resizing (`size * 256 / 224`, 256 for 224).
    pub resize: usize,
    /// Per-channel mean.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation.
    pub std: Vec<f32>,
}

impl EvalTransform {
    /// The transform for `size` with ImageNet statistics.
    pub fn imagenet(size: usize) -> Self {
        Self {
            size,
            resize: size * 256 / 224,
            mean: IMAGENET_MEAN.to_vec(),
            std: IMAGENET_STD.to_vec(),
        }
    }

    /// The image after resize and crop (still 8-bit).
    pub fn apply_image(&self, img: &Image) -> Image {
        center_crop(&resize_shorter(img, self.resize), self.size, self.size)
    }

    /// Applies the transform to each image and stacks them: (N, C, size, size) f32.
    pub fn batch(&self, images: &[Image], device: &Device) -> Result<Tensor> {
        let c = images.first().map(|i| i.channels).unwrap_or(3);
        let mut buf = Vec::with_capacity(images.len() * c * self.size * self.size);
        for img in images {
            self.apply_image(img)
                .to_chw_normalized(&self.mean, &self.std, &mut buf);
        }
        Ok(Tensor::from_vec(
            buf,
            (images.len(), c, self.size, self.size),
            device,
        )?)
    }
}
