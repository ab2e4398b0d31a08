//! [`RunConfig`]: everything that defines a pretraining run, the `config.json` of its run folder
//! (and the `--config FILE.toml` of `moco pretrain`).

use std::path::PathBuf;

use moco_core::MocoConfig;
use moco_models::{BackboneConfig, EncoderSpec, HeadKind, ResNetConfig, VitConfig};
use serde::{Deserialize, Serialize};

use crate::error::{Context, Result};

/// Everything that defines a pretraining run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// MoCo's settings (queue, momentum, loss, optimizer, schedule, augmentation, seed).
    pub moco: MocoConfig,
    /// Architecture (`resnet18-small`, `resnet50`, ...).
    pub arch: String,
    /// Width of the first stage (ResNets).
    pub width: usize,
    /// Start the last BatchNorm of every residual block at zero (torchvision's
    /// `zero_init_residual`, which MoCo v3's ResNets use; ResNets only).
    pub zero_init_residual: bool,
    /// Patch size (ViTs; default: the architecture's, 16).
    pub patch_size: Option<usize>,
    /// Freeze the ViT's patch projection at its initialisation (MoCo v3's `--stop-grad-conv1`).
    pub stop_grad_conv1: bool,
    /// Dataset name.
    pub dataset: String,
    /// Dataset folder.
    pub data_dir: Option<PathBuf>,
    /// Crop size of the augmentations (default: the dataset's native size, 224 for folders).
    pub image_size: Option<usize>,
    /// Train on this many images only (a seeded random subset).
    pub subset: Option<usize>,
    /// Data worker threads.
    pub workers: usize,
    /// kNN monitor every N epochs (0: only at the end). Unset: every epoch, except on `folder`
    /// datasets (ImageNet-sized: the first process would extract the whole training set's
    /// features every epoch while the others wait), only at the end.
    pub knn_every: Option<usize>,
    /// kNN neighbours.
    pub knn_k: usize,
    /// kNN temperature.
    pub knn_t: f64,
    /// Metrics line every N steps.
    pub log_every: usize,
    /// Checkpoint every N steps (besides every epoch end; 0: epoch ends only).
    pub checkpoint_every: usize,
    /// Also keep the checkpoint of every N-th epoch as `checkpoint-epoch-NNNN.safetensors`
    /// (0: only `checkpoint-last`; the official `main_moco.py` keeps every epoch's).
    pub keep_every: usize,
    /// Stop after this many steps in total (a budget shorter than the epochs; 0: no training,
    /// the initialised network is checkpointed and evaluated).
    pub max_steps: Option<u64>,
}

impl Default for RunConfig {
    /// The first-run default: a small ResNet-18 (width 8) on the embedded Fashion-MNIST subset,
    /// the CIFAR demo's recipe (K 2048 for the smaller batch) with MoCo v1's crops (scale 0.2-1;
    /// the demo's 0.08 is too small at 28x28), about 15 seconds on two CPU cores.
    fn default() -> Self {
        Self {
            moco: MocoConfig {
                preset: "default".into(),
                queue_size: 2048,
                batch_size: 64,
                epochs: 3,
                lr: 0.06,
                augmentation: moco_core::AugmentationPreset::V1,
                bn_splits: 4,
                ..MocoConfig::cifar()
            },
            arch: "resnet18-small".into(),
            width: 8,
            zero_init_residual: false,
            patch_size: None,
            stop_grad_conv1: false,
            dataset: "default".into(),
            data_dir: None,
            image_size: None,
            subset: None,
            workers: 2,
            knn_every: None,
            knn_k: 200,
            knn_t: 0.1,
            log_every: 10,
            checkpoint_every: 50,
            keep_every: 0,
            max_steps: None,
        }
    }
}

impl RunConfig {
    /// Checks every setting before any work; the error names the first one out of range (as
    /// the key of a config file, with its flag).
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| Err(crate::error::Error::run(format!("{key}: {msg}")));
        self.moco
            .validate()
            .map_err(|e| crate::error::Error::run(e.to_string()))?;
        // `default` is the first-run default's name; the others are MocoConfig's presets.
        let preset = self.moco.preset.as_str();
        if preset != "default" && !MocoConfig::PRESETS.contains(&preset) {
            return bad(
                "moco.preset",
                format!(
                    "unknown preset `{preset}` (expected one of: default, {})",
                    MocoConfig::PRESETS.join(", ")
                ),
            );
        }
        if self.knn_k == 0 {
            return bad("knn_k", "the kNN monitor needs at least 1 neighbour".into());
        }
        if !(self.knn_t.is_finite() && self.knn_t > 0.0) {
            return bad("knn_t", format!("must be positive, got {}", self.knn_t));
        }
        for (key, v) in [
            ("width (--width)", self.width),
            ("log_every (--log-every)", self.log_every),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        for (key, v) in [
            ("image_size (--image-size)", self.image_size),
            ("subset (--subset)", self.subset),
            ("patch_size (--patch-size)", self.patch_size),
        ] {
            if v == Some(0) {
                return bad(key, "must be at least 1".into());
            }
        }
        if self.dataset == "default" && self.data_dir.is_some() {
            return bad(
                "data_dir (--data-dir)",
                "the default dataset is embedded in the binary and reads no folder: drop --data-dir, or name its dataset with --dataset".into(),
            );
        }
        Ok(())
    }

    /// The encoder this run trains, for `channels`-channel crops of `crop` x `crop` pixels.
    pub fn spec(&self, channels: usize, crop: usize) -> Result<EncoderSpec> {
        let backbone =
            BackboneConfig::for_input(&self.arch, self.width, channels, crop, self.patch_size)
                .context("--arch / --patch-size / --image-size")?;
        let backbone = match backbone {
            BackboneConfig::ResNet(r) => BackboneConfig::ResNet(ResNetConfig {
                bn_splits: self.moco.bn_splits,
                zero_init_residual: self.zero_init_residual,
                ..r
            }),
            BackboneConfig::Vit(v) => BackboneConfig::Vit(VitConfig {
                stop_grad_patch_embed: self.stop_grad_conv1,
                ..v
            }),
        };
        let head = if let Some(hidden) = self.moco.mlp_dim {
            HeadKind::V3 {
                hidden,
                dim: self.moco.dim,
            }
        } else if self.moco.mlp {
            HeadKind::Mlp { dim: self.moco.dim }
        } else {
            HeadKind::Linear { dim: self.moco.dim }
        };
        Ok(EncoderSpec { backbone, head })
    }
}

/// The name of an augmentation preset, as `TwoCrop::preset` takes it.
pub fn augmentation_name(a: moco_core::AugmentationPreset) -> &'static str {
    match a {
        moco_core::AugmentationPreset::V1 => "v1",
        moco_core::AugmentationPreset::V2 => "v2",
        moco_core::AugmentationPreset::Cifar => "cifar",
        moco_core::AugmentationPreset::V3 => "v3",
    }
}
