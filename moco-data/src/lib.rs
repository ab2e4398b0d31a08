//! # moco-data
//!
//! Images and the transforms MoCo's evaluation and training use, with torchvision's semantics
//! on PIL images:
//!
//! - [`image`]: an 8-bit [`Image`] type, decoding as `Image.convert("RGB")`, Pillow's bilinear
//!   (antialiased) resampling bit for bit, crop, flip;
//! - [`transforms`]: the evaluation transform (`Resize`, `CenterCrop`, `ToTensor`, `Normalize`);
//! - [`augment`]: MoCo's training augmentations and presets (`v1`, `v2`, `cifar`, `v3`), matching
//!   torchvision + PIL down to Pillow's integer arithmetic;
//! - [`datasets`]: idx (MNIST, Fashion-MNIST), CIFAR-10/100, STL-10, subsets, and a
//!   Fashion-MNIST subset embedded in the library;
//! - [`image_folder`]: folders of class folders of images (the ImageNet layout);
//! - [`named`]: the datasets by name, with their native size and normalisation;
//! - [`loader`]: multi-threaded batches with prefetching, deterministic for a seed.

#![warn(missing_docs)]

pub mod augment;
pub mod datasets;
mod error;
pub mod image;
pub mod image_folder;
#[cfg_attr(not(moco_libjpeg), path = "jpeg_absent.rs")]
mod jpeg;
pub mod loader;
pub mod named;
pub mod transforms;

pub use error::{Error, Result};
pub use image::Image;
pub use transforms::EvalTransform;

use std::path::{Path, PathBuf};

/// The image files of a folder (not recursive), sorted by file name. Files are recognised by
/// extension: jpg, jpeg, png, bmp, gif, webp, tif, tiff (case-insensitive).
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::file(dir, format!("cannot list folder: {e}")))?;
    let mut files = vec![];
    for entry in entries {
        let path = entry.map_err(|e| Error::file(dir, e.to_string()))?.path();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        if path.is_file()
            && matches!(
                ext.as_deref(),
                Some("jpg" | "jpeg" | "png" | "bmp" | "gif" | "webp" | "tif" | "tiff")
            )
        {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// Whether a path has an image extension we decode.
pub fn is_image_file(path: &Path) -> bool {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    matches!(
        ext.as_deref(),
        Some("jpg" | "jpeg" | "png" | "bmp" | "gif" | "webp" | "tif" | "tiff")
    )
}

/// Why libjpeg is missing from a build that asked for it (feature `libjpeg`, but its headers
/// were not found: build.rs went on without it and JPEGs are decoded by the `image` crate),
/// for the binary to say at start; `None` when libjpeg is built in or was not asked for.
pub const LIBJPEG_MISSING: Option<&str> = option_env!("MOCO_LIBJPEG_MISSING");
