//! # moco-eval
//!
//! How MoCo representations are judged, following the published protocols:
//!
//! - [`features`]: frozen-backbone feature extraction (eval mode, running BatchNorm statistics),
//!   batched on any device, optionally L2-normalised, cacheable to safetensors;
//! - [`knn`]: the weighted kNN classifier of InstDisc and the official MoCo CIFAR demo
//!   (cosine similarity to the whole bank, chunked; top-k votes weighted by exp(s / t));
//! - [`linear`]: the linear classification protocol of `main_lincls.py` (frozen backbone in eval
//!   mode, fresh `fc` N(0, 0.01), SGD lr 30, momentum 0.9, steps at 60 and 80 of 100 epochs),
//!   with its backbone sanity check, the test accuracy after every epoch (and the best), a
//!   checkpointable state to resume from ([`linear::LinearState`]), and a fast mode on cached
//!   features;
//! - [`metrics`]: top-1/top-5, per-class accuracy and the confusion matrix.

#![warn(missing_docs)]

pub mod features;
pub mod knn;
pub mod linear;
pub mod metrics;

mod error;
pub use error::{Error, Result};
