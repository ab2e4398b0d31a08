//! The linear classification protocol of the official `main_lincls.py`: the backbone frozen and
//! in eval mode, a fresh `fc` initialised N(0, 0.01) with zero bias, SGD (lr 30, momentum 0.9,
//! weight decay 0), 100 epochs with lr x0.1 at 60 and 80, batch 256; then the sanity check that
//! every backbone tensor is bit-identical to the pretrained one. MoCo v3's `main_lincls.py`
//! differs in the schedule only ([`LinearConfig::v3`]: 90 epochs of a per-epoch cosine from
//! 0.1 x batch / 256).
//!
//! Two modes: [`train_augmented`] (the protocol itself: RandomResizedCrop + flip every epoch) and
//! [`train_cached`] (features extracted once with the evaluation transform, no augmentation:
//! much faster on CPU, reported as such).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Init, Linear, Module, VarMap};
use moco_core::{LrSchedule, Sgd, SgdConfig};
use moco_data::augment::Pipeline;
use moco_data::datasets::Dataset;
use moco_data::loader::{Loader, LoaderConfig, Views};
use moco_models::Backbone;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::features::FeatureSet;
use crate::metrics::{Classification, Report};
use crate::{Error, Result};

/// Settings of the protocol (defaults: the official ones).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearConfig {
    /// Epochs.
    pub epochs: usize,
    /// Base learning rate.
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Learning-rate schedule over the epochs (updated once per epoch).
    pub schedule: LrSchedule,
    /// Batch size.
    pub batch_size: usize,
    /// Seed of the initialisation, shuffles and augmentations.
    pub seed: u64,
}

impl Default for LinearConfig {
    fn default() -> Self {
        Self {
            epochs: 100,
            lr: 30.0,
            momentum: 0.9,
            weight_decay: 0.0,
            schedule: LrSchedule::step(vec![60, 80]),
            batch_size: 256,
            seed: 0,
        }
    }
}

impl LinearConfig {
    /// MoCo v3's protocol (its `main_lincls.py`): SGD at `0.1 x batch_size / 256`, momentum
    /// 0.9, no weight decay, 90 epochs of the per-epoch cosine `lr * (1 + cos(pi e / E)) / 2`.
    pub fn v3(batch_size: usize) -> Self {
        Self {
            epochs: 90,
            lr: 0.1 * batch_size as f64 / 256.0,
            schedule: LrSchedule::cosine(),
            batch_size,
            ..Self::default()
        }
    }
}

/// What a run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinearResult {
    /// Which protocol ran: `linear (augmented)` or `linear (cached features, no augmentation)`.
    pub protocol: String,
    /// Test-set metrics.
    pub test: Report,
    /// Mean training loss of each epoch.
    pub train_loss: Vec<f32>,
    /// The settings.
    pub config: LinearConfig,
}

/// The classifier `fc`: Linear(D, classes), weight N(0, 0.01), bias 0, trained by SGD.
struct Classifier {
    fc: Linear,
    opt: Sgd,
    schedule: LrSchedule,
}

impl Classifier {
    fn new(dim: usize, classes: usize, cfg: &LinearConfig, device: &Device) -> Result<Self> {
        let vars = VarMap::new();
        let vb = moco_core::init::seeded_var_builder(&vars, cfg.seed, DType::F32, device);
        let w = vb.get_with_hints(
            (classes, dim),
            "fc.weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.01,
            },
        )?;
        let b = vb.get_with_hints(classes, "fc.bias", Init::Const(0.0))?;
        let params = moco_core::MomentumEncoder::new(&vars).query_parameters();
        let sgd = SgdConfig {
            lr: cfg.lr,
            momentum: cfg.momentum,
            dampening: 0.0,
            weight_decay: cfg.weight_decay,
            nesterov: false,
            lars: None,
        };
        Ok(Self {
            fc: Linear::new(w, Some(b)),
            opt: Sgd::new_named(params, sgd)?,
            schedule: cfg.schedule.clone(),
        })
    }

    /// One SGD step on a batch of features (B x D) with labels; returns the loss.
    fn step(&mut self, x: &Tensor, y: &Tensor) -> Result<f32> {
        let logits = self.fc.forward(x)?;
        let loss = candle_nn::loss::cross_entropy(&logits, y)?;
        let grads = loss.backward()?;
        self.opt.step_grads(&grads)?;
        Ok(loss.to_scalar::<f32>()?)
    }

    fn set_epoch(&mut self, epoch: usize, cfg: &LinearConfig) {
        let lr = self.schedule.lr(cfg.lr, epoch, 0, 1, cfg.epochs);
        candle_nn::Optimizer::set_learning_rate(&mut self.opt, lr);
    }

    fn scores(&self, x: &Tensor) -> Result<Vec<Vec<f32>>> {
        Ok(self
            .fc
            .forward(&x.detach())?
            .detach()
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?)
    }

    fn evaluate(&self, test: &FeatureSet, classes: usize, device: &Device) -> Result<Report> {
        let mut m = Classification::new(classes);
        let n = test.len();
        for s in (0..n).step_by(1024) {
            let len = 1024.min(n - s);
            let x = test.features.narrow(0, s, len)?.to_device(device)?;
            m.update_scores(&self.scores(&x)?, &test.labels[s..s + len]);
        }
        Ok(m.report())
    }
}

fn check(cfg: &LinearConfig, classes: usize) -> Result<()> {
    if cfg.epochs == 0 || cfg.batch_size == 0 || classes < 2 {
        return Err(Error::config(
            "linear",
            format!(
                "need epochs >= 1, batch >= 1 and >= 2 classes (got {}, {}, {classes})",
                cfg.epochs, cfg.batch_size
            ),
        ));
    }
    Ok(())
}

/// The fast mode: a linear classifier on features extracted once (no augmentation).
pub fn train_cached(
    train: &FeatureSet,
    test: &FeatureSet,
    classes: usize,
    cfg: &LinearConfig,
    device: &Device,
    mut progress: impl FnMut(usize, f32),
) -> Result<LinearResult> {
    check(cfg, classes)?;
    let dim = train.features.dim(1)?;
    let mut clf = Classifier::new(dim, classes, cfg, device)?;
    let x_all = train.features.to_device(device)?;
    let y_all = Tensor::new(train.labels.as_slice(), device)?;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut losses = vec![];
    for epoch in 0..cfg.epochs {
        clf.set_epoch(epoch, cfg);
        let mut order: Vec<u32> = (0..train.len() as u32).collect();
        order.shuffle(&mut rng);
        let (mut sum, mut count) = (0f32, 0);
        for chunk in order.chunks(cfg.batch_size) {
            let idx = Tensor::new(chunk, device)?;
            let (x, y) = (x_all.index_select(&idx, 0)?, y_all.index_select(&idx, 0)?);
            sum += clf.step(&x, &y)?;
            count += 1;
        }
        losses.push(sum / count as f32);
        progress(epoch, sum / count as f32);
    }
    Ok(LinearResult {
        protocol: "linear (cached features, no augmentation)".into(),
        test: clf.evaluate(test, classes, device)?,
        train_loss: losses,
        config: cfg.clone(),
    })
}

/// The protocol itself: every epoch, the training images go through `train_pipeline`
/// (RandomResizedCrop + flip) and the frozen backbone in eval mode; the test set is evaluated
/// once at the end on `test` features (the evaluation transform).
#[allow(clippy::too_many_arguments)]
pub fn train_augmented<B: Backbone + ?Sized, DS: Dataset + 'static>(
    backbone: &B,
    train: Arc<DS>,
    train_pipeline: Pipeline,
    test: &FeatureSet,
    classes: usize,
    cfg: &LinearConfig,
    workers: usize,
    device: &Device,
    mut progress: impl FnMut(usize, f32),
) -> Result<LinearResult> {
    check(cfg, classes)?;
    let dim = backbone.feature_dim();
    let mut clf = Classifier::new(dim, classes, cfg, device)?;
    let lc = LoaderConfig {
        batch_size: cfg.batch_size,
        shuffle: true,
        drop_last: false,
        workers,
        prefetch: 2,
        seed: cfg.seed,
    };
    let loader = Loader::new(train, Views::One(train_pipeline), lc)?;
    let mut losses = vec![];
    for epoch in 0..cfg.epochs {
        clf.set_epoch(epoch, cfg);
        let (mut sum, mut count) = (0f32, 0);
        for batch in loader.epoch(epoch, 0) {
            let batch = batch?;
            // The backbone is frozen and in eval mode (as main_lincls.py's model.eval()).
            let f = backbone
                .features(&batch.views[0].to_device(device)?, false)?
                .detach();
            let y = Tensor::new(batch.labels.as_slice(), device)?;
            sum += clf.step(&f, &y)?;
            count += 1;
        }
        losses.push(sum / count.max(1) as f32);
        progress(epoch, sum / count.max(1) as f32);
    }
    Ok(LinearResult {
        protocol: "linear (augmented)".into(),
        test: clf.evaluate(test, classes, device)?,
        train_loss: losses,
        config: cfg.clone(),
    })
}

/// The sanity check of `main_lincls.py`: every backbone tensor of `now` equals the pretrained
/// one bit for bit (the head `fc.*` aside). Errors name the first tensor that differs.
pub fn sanity_check(
    now: &HashMap<String, Tensor>,
    pretrained: &HashMap<String, Tensor>,
) -> Result<()> {
    let mut names: Vec<&String> = pretrained
        .keys()
        .filter(|k| !k.starts_with("fc."))
        .collect();
    names.sort();
    for name in names {
        let a = now.get(name).ok_or_else(|| {
            Error::config(
                "sanity check",
                format!("backbone tensor `{name}` missing after training"),
            )
        })?;
        let b = &pretrained[name];
        if a.shape() != b.shape() {
            return Err(Error::BackboneChanged {
                name: name.clone(),
                diff: f32::INFINITY,
            });
        }
        let diff = (a.to_dtype(DType::F32)?.to_device(&Device::Cpu)?
            - b.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)?
        .abs()?
        .flatten_all()?
        .max(D::Minus1)?
        .to_scalar::<f32>()?;
        if diff != 0.0 {
            return Err(Error::BackboneChanged {
                name: name.clone(),
                diff,
            });
        }
    }
    Ok(())
}
