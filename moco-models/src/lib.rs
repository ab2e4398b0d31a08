//! # moco-models
//!
//! Trainable backbones for MoCo on Candle, with torchvision's (ResNets) and timm's (ViTs)
//! parameter names so that weights move between moco-rs and PyTorch without renaming:
//!
//! - [`resnet`]: ResNet-18/34/50/101/152 (torchvision v1.5) and small-image variants
//!   (`resnet18-small`, ...: 3x3 stride-1 stem, no max-pool), any input channels, any width;
//! - [`vit`]: MoCo v3's Vision Transformers (`vit_tiny`, `vit_small`, `vit_base`; timm names),
//!   any image, patch and channel count;
//! - [`batch_norm`]: BatchNorm honouring `train`, with the official demo's split mode;
//! - [`head`]: v1 linear, v2 MLP and v3 projector/predictor heads;
//! - [`encoder`]: a backbone with its head ([`Encoder`]), built from an [`EncoderSpec`];
//! - [`footprint`]: an encoder's parameters and activations from its spec, before building it;
//! - [`weights`]: safetensors weight files with the architecture in the metadata, and the
//!   official MoCo (v1, v2, v3) checkpoints ([`weights::official`]);
//! - [`ops`]: the ops the layers compute with, one folder per op (convolution, BatchNorm,
//!   transformer, linear, pooling, element-wise), each choosing between moco-rs's fused CPU
//!   kernels, cuDNN and candle's generic ops; [`ops::Settings`] is the one kernel setting,
//!   given to the layers when they are built.

#![warn(missing_docs)]

pub mod batch_norm;
pub mod encoder;
mod error;
pub mod footprint;
pub mod head;
pub mod ops;
pub mod resnet;
pub mod vit;
pub mod weights;
pub mod zoo;

pub use encoder::{encoder, Backbone, BackboneConfig, Encoder, EncoderSpec, Net};
pub use error::{Error, Result};
pub use footprint::Footprint;
pub use head::{Head, HeadKind};
pub use ops::Settings;
pub use resnet::{Depth, ResNet, ResNetConfig};
pub use vit::{Vit, VitConfig};
pub use weights::{encoder_from_tensors, load_encoder, save_weights, spec_from_metadata};
pub use zoo::ARCH_NAMES;
