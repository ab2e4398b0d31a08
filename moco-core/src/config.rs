//! The MoCo configuration with the official presets.

use serde::{Deserialize, Serialize};

use candle_core::Var;

use crate::optim::{AdamW, AdamWConfig, Optimizer, Sgd, SgdConfig};
use crate::schedule::{LrSchedule, MomentumSchedule};
use crate::{Error, Result};

/// Which contrastive objective a training step optimizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// InfoNCE against the queue, one direction (MoCo v1/v2).
    Queue,
    /// InfoNCE against the queue, both views as queries (official CIFAR demo `--symmetric`).
    SymmetricQueue,
    /// In-batch InfoNCE with no queue, symmetric, scaled by 2T (MoCo v3).
    InBatch,
}

/// Which optimizer trains the query encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// SGD with momentum (`torch.optim.SGD`), or LARS when [`MocoConfig::lars`] is set.
    #[default]
    Sgd,
    /// AdamW (`torch.optim.AdamW`, betas (0.9, 0.999), eps 1e-8): MoCo v3's ViT optimizer.
    #[serde(rename = "adamw")]
    AdamW,
}

/// The augmentation recipe a preset trains with (built by `moco-data`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AugmentationPreset {
    /// MoCo v1: random resized crop (0.2-1), grayscale 0.2, color jitter 0.4, flip.
    V1,
    /// MoCo v2 (`--aug-plus`): crop, color jitter 0.8 x (0.4, 0.4, 0.4, 0.1), grayscale 0.2, blur 0.5, flip.
    V2,
    /// The official CIFAR demo: 32x32 crop, jitter, grayscale, flip.
    Cifar,
    /// MoCo v3: asymmetric blur and solarize.
    V3,
}

/// Every setting of a MoCo pretraining run. Presets: [`MocoConfig::v1`], [`MocoConfig::v2`],
/// [`MocoConfig::cifar`]; `Default` is v1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MocoConfig {
    /// Preset this configuration started from (informational).
    pub preset: String,
    /// Feature dimension C of the keys and queries.
    pub dim: usize,
    /// MLP projection head (MoCo v2) instead of a linear one.
    pub mlp: bool,
    /// MoCo v3's heads (`--moco-mlp-dim`): a 2-layer projector with BatchNorm and this hidden
    /// width on both encoders, and a 2-layer predictor after the query encoder only. Takes
    /// precedence over `mlp`.
    pub mlp_dim: Option<usize>,
    /// Queue size K (number of negatives).
    pub queue_size: usize,
    /// Key encoder momentum m.
    pub momentum: f64,
    /// How m evolves over the run.
    pub momentum_schedule: MomentumSchedule,
    /// Softmax temperature T.
    pub temperature: f64,
    /// The objective.
    pub loss: LossKind,
    /// Shuffle the key batch around the key encoder (shuffle-BN).
    pub shuffle_bn: bool,
    /// SyncBN: in a data-parallel run, BatchNorm layers (those of `moco_models`) normalise with
    /// the statistics of the global batch, gathered from every rank in the forward pass and
    /// summed over the ranks in the backward pass (`torch.nn.SyncBatchNorm`, which MoCo v3's
    /// official code applies to the whole model). No effect on one process; a data-parallel run
    /// refuses it with `bn_splits` > 1. v1/v2 keep per-rank
    /// statistics (shuffle-BN depends on them).
    pub sync_bn: bool,
    /// BatchNorm splits emulating several GPUs on one device (official demo `--bn-splits`; 1 = off).
    pub bn_splits: usize,
    /// Base learning rate.
    pub lr: f64,
    /// `lr` is given per 256 images and the run uses `lr * batch_size / 256` (MoCo v3).
    pub lr_per_256: bool,
    /// The optimizer (`sgd` or `adamw`; old configurations without it mean `sgd`).
    pub optimizer: OptimizerKind,
    /// LARS trust coefficient (MoCo v3: 0.001); `None` for SGD. With `optimizer = "sgd"` only.
    pub lars: Option<f64>,
    /// SGD momentum.
    pub sgd_momentum: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Learning-rate schedule.
    pub lr_schedule: LrSchedule,
    /// Number of epochs.
    pub epochs: usize,
    /// Images per batch.
    pub batch_size: usize,
    /// Augmentation recipe.
    pub augmentation: AugmentationPreset,
    /// Seed of every random choice (initialisation, queue, shuffles, augmentations).
    pub seed: u64,
}

impl Default for MocoConfig {
    fn default() -> Self {
        Self::v1()
    }
}

impl MocoConfig {
    /// MoCo v1 (`main_moco.py` defaults): C 128, K 65536, m 0.999, T 0.07, lr 0.03, wd 1e-4,
    /// batch 256, 200 epochs, lr x0.1 at 120 and 160.
    pub fn v1() -> Self {
        Self {
            preset: "v1".into(),
            dim: 128,
            mlp: false,
            mlp_dim: None,
            queue_size: 65536,
            momentum: 0.999,
            momentum_schedule: MomentumSchedule::Constant,
            temperature: 0.07,
            loss: LossKind::Queue,
            shuffle_bn: true,
            sync_bn: false,
            bn_splits: 1,
            lr: 0.03,
            lr_per_256: false,
            optimizer: OptimizerKind::Sgd,
            lars: None,
            sgd_momentum: 0.9,
            weight_decay: 1e-4,
            nesterov: false,
            lr_schedule: LrSchedule::step(vec![120, 160]),
            epochs: 200,
            batch_size: 256,
            augmentation: AugmentationPreset::V1,
            seed: 0,
        }
    }

    /// MoCo v2 (`--mlp --moco-t 0.2 --aug-plus --cos`), otherwise as v1.
    pub fn v2() -> Self {
        Self {
            preset: "v2".into(),
            mlp: true,
            temperature: 0.2,
            lr_schedule: LrSchedule::cosine(),
            augmentation: AugmentationPreset::V2,
            ..Self::v1()
        }
    }

    /// The official CIFAR-10 demo: K 4096, m 0.99, T 0.1, lr 0.06, wd 5e-4, batch 512, cosine,
    /// 200 epochs, BatchNorm split in 8, linear head.
    pub fn cifar() -> Self {
        Self {
            preset: "cifar".into(),
            queue_size: 4096,
            momentum: 0.99,
            temperature: 0.1,
            lr: 0.06,
            weight_decay: 5e-4,
            batch_size: 512,
            bn_splits: 8,
            lr_schedule: LrSchedule::cosine(),
            augmentation: AugmentationPreset::Cifar,
            ..Self::v1()
        }
    }

    /// MoCo v3 with a ResNet (the official 100-epoch ResNet-50 recipe): no queue, symmetric
    /// in-batch loss at T 1.0, projector 2048-4096-256 and predictor 256-4096-256, m 0.99 rising
    /// to 1 along a cosine, LARS (trust 0.001, momentum 0.9, wd 1e-6) at lr 0.6 per 256 images,
    /// 10 warm-up epochs then a per-iteration cosine, batch 4096, asymmetric v3 augmentations.
    /// The official code synchronises BatchNorm across GPUs instead of shuffling it (`sync_bn`).
    pub fn v3() -> Self {
        Self {
            preset: "v3".into(),
            dim: 256,
            mlp: false,
            mlp_dim: Some(4096),
            queue_size: 0,
            momentum: 0.99,
            momentum_schedule: MomentumSchedule::Cosine,
            temperature: 1.0,
            loss: LossKind::InBatch,
            shuffle_bn: false,
            sync_bn: true,
            bn_splits: 1,
            lr: 0.6,
            lr_per_256: true,
            optimizer: OptimizerKind::Sgd,
            lars: Some(0.001),
            sgd_momentum: 0.9,
            weight_decay: 1e-6,
            nesterov: false,
            lr_schedule: LrSchedule {
                decay: crate::schedule::LrDecay::Cosine {
                    per_iteration: true,
                },
                warmup_epochs: 10.0,
            },
            epochs: 100,
            batch_size: 4096,
            augmentation: AugmentationPreset::V3,
            seed: 0,
        }
    }

    /// MoCo v3 with a ViT (the official ViT-Small/Base recipe of `CONFIG.md`): as [`v3`](Self::v3)
    /// but T 0.2, AdamW (lr 1.5e-4 per 256 images, weight decay 0.1), 40 warm-up epochs of 300,
    /// batch 1024 (the one-node setup; the published models used 4096). The backbone side of the
    /// recipe (3-layer projector, predictor with a last BatchNorm, frozen patch projection) is
    /// the encoder's: `moco pretrain --preset v3-vit` builds it for a `vit_*` architecture.
    pub fn v3_vit() -> Self {
        Self {
            preset: "v3-vit".into(),
            temperature: 0.2,
            lr: 1.5e-4,
            optimizer: OptimizerKind::AdamW,
            lars: None,
            weight_decay: 0.1,
            lr_schedule: LrSchedule {
                decay: crate::schedule::LrDecay::Cosine {
                    per_iteration: true,
                },
                warmup_epochs: 40.0,
            },
            epochs: 300,
            batch_size: 1024,
            ..Self::v3()
        }
    }

    /// The names [`MocoConfig::preset`] knows.
    pub const PRESETS: [&'static str; 5] = ["v1", "v2", "cifar", "v3", "v3-vit"];

    /// A preset by name: `v1`, `v2`, `cifar`, `v3` or `v3-vit`.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "v1" => Ok(Self::v1()),
            "v2" => Ok(Self::v2()),
            "cifar" => Ok(Self::cifar()),
            "v3" => Ok(Self::v3()),
            "v3-vit" => Ok(Self::v3_vit()),
            other => Err(Error::config(
                "preset",
                format!(
                    "unknown preset `{other}` (expected one of: {})",
                    Self::PRESETS.join(", ")
                ),
            )),
        }
    }

    /// The learning rate the run uses at the top of its schedule: `lr`, times
    /// `batch_size / 256` when `lr_per_256` is set.
    pub fn effective_lr(&self) -> f64 {
        if self.lr_per_256 {
            self.lr * self.batch_size as f64 / 256.0
        } else {
            self.lr
        }
    }

    /// The optimizer settings at the effective learning rate.
    pub fn sgd(&self) -> SgdConfig {
        SgdConfig {
            lr: self.effective_lr(),
            momentum: self.sgd_momentum,
            dampening: 0.0,
            weight_decay: self.weight_decay,
            nesterov: self.nesterov,
            lars: self.lars,
        }
    }

    /// The AdamW settings at the effective learning rate (torch's betas and eps).
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.effective_lr(),
            weight_decay: self.weight_decay,
            ..AdamWConfig::default()
        }
    }

    /// The optimizer this configuration asks for ([`OptimizerKind`]), over named parameters.
    pub fn optimizer(&self, params: Vec<(String, Var)>) -> Result<Optimizer> {
        Ok(match self.optimizer {
            OptimizerKind::Sgd => Optimizer::Sgd(Sgd::new_named(params, self.sgd())?),
            OptimizerKind::AdamW => Optimizer::AdamW(AdamW::new_named(params, self.adamw())?),
        })
    }

    /// Checks every setting; the error names the first one out of range.
    pub fn validate(&self) -> Result<()> {
        let positive = |key: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::config(key, format!("must be positive, got {v}")))
            }
        };
        positive("temperature", self.temperature)?;
        positive("lr", self.lr)?;
        if self.dim == 0 {
            return Err(Error::config("dim", "must be at least 1"));
        }
        if self.mlp_dim == Some(0) {
            return Err(Error::config("mlp_dim", "must be at least 1"));
        }
        if let Some(eta) = self.lars {
            positive("lars", eta)?;
            if self.optimizer == OptimizerKind::AdamW {
                return Err(Error::config(
                    "lars",
                    "LARS is a variant of SGD: set `lars` only with optimizer = \"sgd\"",
                ));
            }
        }
        if self.batch_size == 0 {
            return Err(Error::config("batch_size", "must be at least 1"));
        }
        if self.epochs == 0 {
            return Err(Error::config("epochs", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(Error::config(
                "momentum",
                format!("must be in [0, 1], got {}", self.momentum),
            ));
        }
        if self.bn_splits == 0 || self.batch_size % self.bn_splits != 0 {
            return Err(Error::config(
                "bn_splits",
                format!(
                    "must divide the batch size {} (got {})",
                    self.batch_size, self.bn_splits
                ),
            ));
        }
        // Keys enqueued per step: the batch, or both views' keys for the symmetric loss.
        let per_step = match self.loss {
            LossKind::SymmetricQueue => 2 * self.batch_size,
            _ => self.batch_size,
        };
        if self.loss != LossKind::InBatch && self.queue_size < per_step {
            return Err(Error::QueueTooSmall {
                queue_size: self.queue_size,
                batch: per_step,
            });
        }
        self.lr_schedule.validate(self.epochs)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::LrDecay;

    #[test]
    fn presets_carry_the_official_values() {
        let v1 = MocoConfig::v1();
        assert_eq!(
            (v1.dim, v1.queue_size, v1.batch_size, v1.epochs),
            (128, 65536, 256, 200)
        );
        assert_eq!(
            (v1.momentum, v1.temperature, v1.lr, v1.weight_decay),
            (0.999, 0.07, 0.03, 1e-4)
        );
        assert_eq!(
            v1.lr_schedule.decay,
            LrDecay::Step {
                milestones: vec![120, 160],
                gamma: 0.1
            }
        );
        let v2 = MocoConfig::v2();
        assert!(v2.mlp && v2.temperature == 0.2 && v2.augmentation == AugmentationPreset::V2);
        assert_eq!(
            v2.lr_schedule.decay,
            LrDecay::Cosine {
                per_iteration: false
            }
        );
        let c = MocoConfig::cifar();
        assert_eq!(
            (
                c.queue_size,
                c.momentum,
                c.temperature,
                c.lr,
                c.weight_decay,
                c.batch_size
            ),
            (4096, 0.99, 0.1, 0.06, 5e-4, 512)
        );
        let v3 = MocoConfig::v3();
        assert_eq!(
            (v3.dim, v3.mlp_dim, v3.temperature, v3.lars, v3.weight_decay),
            (256, Some(4096), 1.0, Some(0.001), 1e-6)
        );
        assert_eq!(
            (v3.loss, v3.batch_size, v3.epochs),
            (LossKind::InBatch, 4096, 100)
        );
        // 0.6 per 256 images at batch 4096: 9.6, the official effective rate.
        assert!((v3.effective_lr() - 9.6).abs() < 1e-12);
        assert!((v3.sgd().lr - 9.6).abs() < 1e-12 && v3.sgd().lars == Some(0.001));
        // CONFIG.md's ViT-Small recipe: AdamW lr 1.5e-4 per 256, wd 0.1, 40 of 300 epochs of
        // warm-up, T 0.2, batch 1024 (lr 6e-4), otherwise v3's.
        let vit = MocoConfig::v3_vit();
        assert_eq!(
            (vit.optimizer, vit.lars, vit.weight_decay, vit.temperature),
            (OptimizerKind::AdamW, None, 0.1, 0.2)
        );
        assert_eq!(
            (vit.epochs, vit.lr_schedule.warmup_epochs, vit.batch_size),
            (300, 40.0, 1024)
        );
        assert_eq!(
            (vit.loss, vit.mlp_dim, vit.dim),
            (LossKind::InBatch, Some(4096), 256)
        );
        let a = vit.adamw();
        assert!((a.lr - 6e-4).abs() < 1e-15 && a.weight_decay == 0.1 && a.betas == (0.9, 0.999));
        for p in ["v1", "v2", "cifar", "v3", "v3-vit"] {
            MocoConfig::preset(p).unwrap().validate().unwrap();
        }
        // LARS is an SGD variant: with AdamW it is an error naming the setting.
        let both = MocoConfig {
            lars: Some(0.001),
            ..MocoConfig::v3_vit()
        };
        assert!(both.validate().unwrap_err().to_string().contains("lars"));
        assert!(MocoConfig::preset("v9")
            .unwrap_err()
            .to_string()
            .contains("v9"));
    }

    #[test]
    fn json_round_trip_and_partial_files() {
        let c = MocoConfig::cifar();
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<MocoConfig>(&s).unwrap(), c);
        // Missing fields take the defaults (v1).
        let partial: MocoConfig = serde_json::from_str(r#"{"queue_size": 1024}"#).unwrap();
        assert_eq!(partial.queue_size, 1024);
        assert_eq!(partial.dim, 128);
        // Files written before the optimizer choice existed mean SGD.
        assert_eq!(partial.optimizer, OptimizerKind::Sgd);
        let vit = MocoConfig::v3_vit();
        let s = serde_json::to_string(&vit).unwrap();
        assert!(s.contains(r#""optimizer":"adamw""#), "{s}");
        assert_eq!(serde_json::from_str::<MocoConfig>(&s).unwrap(), vit);
    }

    #[test]
    fn validation_names_the_setting() {
        let small = MocoConfig {
            queue_size: 100,
            ..MocoConfig::v1()
        };
        assert!(matches!(
            small.validate(),
            Err(Error::QueueTooSmall {
                queue_size: 100,
                batch: 256
            })
        ));
        let sym = MocoConfig {
            queue_size: 300,
            loss: LossKind::SymmetricQueue,
            ..MocoConfig::v1()
        };
        assert!(matches!(
            sym.validate(),
            Err(Error::QueueTooSmall { batch: 512, .. })
        ));
        let t = MocoConfig {
            temperature: -1.0,
            ..MocoConfig::v1()
        };
        assert!(t
            .validate()
            .unwrap_err()
            .to_string()
            .contains("`temperature`"));
        let s = MocoConfig {
            bn_splits: 3,
            ..MocoConfig::v1()
        };
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("`bn_splits`"));
    }
}
