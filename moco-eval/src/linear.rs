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

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
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

/// One epoch of the protocol and the validation after it (as `main_lincls.py` runs one after
/// every epoch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epochs completed: 1 after the first.
    pub epoch: usize,
    /// The epoch's learning rate.
    pub lr: f64,
    /// Mean training loss over the epoch's batches.
    pub train_loss: f32,
    /// Test top-1 accuracy after the epoch, percent.
    pub test_top1: f64,
    /// Test top-5 accuracy after the epoch, percent.
    pub test_top5: f64,
}

/// A run after a completed epoch: all that a resumed run needs (the classifier, SGD's momentum
/// buffers and the epochs' records). Its tensors are copies, unaffected by later steps.
#[derive(Debug, Clone)]
pub struct LinearState {
    /// `fc.weight`, `fc.bias` and their momentum buffers
    /// (`optimizer.momentum_buffer.fc.weight`, `...bias`).
    pub tensors: BTreeMap<String, Tensor>,
    /// One record per completed epoch.
    pub history: Vec<EpochRecord>,
}

/// A linear-evaluation checkpoint read back by [`LinearState::load`].
#[derive(Debug)]
pub struct SavedLinear {
    /// The run's state.
    pub state: LinearState,
    /// The settings it was trained with.
    pub config: LinearConfig,
    /// What the caller stored beside them (weights, dataset, mode, ...).
    pub context: BTreeMap<String, String>,
}

const MOMENTUM_PREFIX: &str = "optimizer.momentum_buffer.";
const CHECKPOINT_FORMAT: &str = "moco-rs linear-eval checkpoint";

impl LinearState {
    /// Epochs completed.
    pub fn epochs_done(&self) -> usize {
        self.history.len()
    }

    /// The first epoch with the highest test top-1 (`main_lincls.py`'s `best_acc1`).
    pub fn best(&self) -> Option<&EpochRecord> {
        best(&self.history)
    }

    /// Writes the state, the settings and `context` to `path` atomically (temporary file +
    /// rename): a run killed at any moment leaves the previous complete checkpoint.
    pub fn save(
        &self,
        path: &Path,
        config: &LinearConfig,
        context: &BTreeMap<String, String>,
    ) -> Result<()> {
        fn json<T: Serialize>(v: &T) -> Result<String> {
            serde_json::to_string(v).map_err(|e| Error::config("checkpoint", e.to_string()))
        }
        let metadata = HashMap::from([
            ("format".to_string(), CHECKPOINT_FORMAT.to_string()),
            ("linear_config".to_string(), json(config)?),
            ("history".to_string(), json(&self.history)?),
            ("context".to_string(), json(context)?),
        ]);
        moco_core::io::save_atomic(path, &self.tensors, Some(metadata))?;
        Ok(())
    }

    /// Reads a checkpoint written by [`save`](Self::save); errors name the file and the key.
    pub fn load(path: &Path, device: &Device) -> Result<SavedLinear> {
        let file = moco_core::io::load(path, device)?;
        let bad = |msg: String| {
            Error::Core(moco_core::Error::File {
                path: path.to_path_buf(),
                msg,
            })
        };
        if file.metadata.get("format").map(String::as_str) != Some(CHECKPOINT_FORMAT) {
            return Err(bad(format!(
                "not a linear-evaluation checkpoint (metadata `format` is not `{CHECKPOINT_FORMAT}`)"
            )));
        }
        fn parse<T: serde::de::DeserializeOwned>(
            file: &moco_core::io::TensorFile,
            key: &str,
        ) -> std::result::Result<T, String> {
            let text = file.meta(key).map_err(|e| e.to_string())?;
            serde_json::from_str(text).map_err(|e| format!("metadata `{key}`: {e}"))
        }
        let config: LinearConfig = parse(&file, "linear_config").map_err(bad)?;
        let history: Vec<EpochRecord> = parse(&file, "history").map_err(bad)?;
        let context: BTreeMap<String, String> = parse(&file, "context").map_err(bad)?;
        Ok(SavedLinear {
            state: LinearState {
                tensors: file.tensors.into_iter().collect(),
                history,
            },
            config,
            context,
        })
    }
}

/// The first record with the highest test top-1.
fn best(history: &[EpochRecord]) -> Option<&EpochRecord> {
    history
        .iter()
        .fold(None, |best: Option<&EpochRecord>, r| match best {
            Some(b) if b.test_top1 >= r.test_top1 => Some(b),
            _ => Some(r),
        })
}

/// What a run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinearResult {
    /// Which protocol ran: `linear (augmented)` or `linear (cached features, no augmentation)`.
    pub protocol: String,
    /// Test-set metrics after the last epoch.
    pub test: Report,
    /// Mean training loss of each epoch.
    pub train_loss: Vec<f32>,
    /// Each epoch's learning rate, loss and test accuracy.
    pub history: Vec<EpochRecord>,
    /// The best test top-1 over the epochs (`main_lincls.py`'s `best_acc1`) and the epoch
    /// (1-based) that first reached it.
    pub best_top1: f64,
    /// See `best_top1`.
    pub best_epoch: usize,
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
    fn new(
        dim: usize,
        classes: usize,
        cfg: &LinearConfig,
        device: &Device,
        resume: Option<&LinearState>,
    ) -> Result<Self> {
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
        let mut opt = Sgd::new_named(params.clone(), sgd)?;
        if let Some(state) = resume {
            for (name, var) in &params {
                let t = state.tensors.get(name).ok_or_else(|| {
                    Error::config("resume", format!("the checkpoint has no tensor `{name}`"))
                })?;
                if t.dims() != var.dims() {
                    return Err(Error::config(
                        "resume",
                        format!(
                            "`{name}` is {:?} in the checkpoint, {:?} for this model and dataset",
                            t.dims(),
                            var.dims()
                        ),
                    ));
                }
                var.set(&t.to_device(device)?.to_dtype(DType::F32)?)?;
            }
            opt.load_state(&state.tensors, MOMENTUM_PREFIX)?;
        }
        Ok(Self {
            fc: Linear::new(w, Some(b)),
            opt,
            schedule: cfg.schedule.clone(),
        })
    }

    /// Copies of the weights and momentum buffers.
    fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = self.opt.state_tensors(MOMENTUM_PREFIX);
        for (name, var) in self.opt.params() {
            out.insert(name.clone(), var.as_tensor().clone());
        }
        out.into_iter().map(|(k, v)| Ok((k, v.copy()?))).collect()
    }

    /// One SGD step on a batch of features (B x D) with labels; returns the loss.
    fn step(&mut self, x: &Tensor, y: &Tensor) -> Result<f32> {
        let logits = self.fc.forward(x)?;
        let loss = candle_nn::loss::cross_entropy(&logits, y)?;
        let grads = loss.backward()?;
        self.opt.step_grads(&grads)?;
        Ok(loss.to_scalar::<f32>()?)
    }

    /// Sets and returns the learning rate of `epoch` (0-based).
    fn set_epoch(&mut self, epoch: usize, cfg: &LinearConfig) -> f64 {
        let lr = self.schedule.lr(cfg.lr, epoch, 0, 1, cfg.epochs);
        candle_nn::Optimizer::set_learning_rate(&mut self.opt, lr);
        lr
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

fn check(cfg: &LinearConfig, classes: usize, resume: Option<&LinearState>) -> Result<()> {
    if cfg.epochs == 0 || cfg.batch_size == 0 || classes < 2 {
        return Err(Error::config(
            "linear",
            format!(
                "need epochs >= 1, batch >= 1 and >= 2 classes (got {}, {}, {classes})",
                cfg.epochs, cfg.batch_size
            ),
        ));
    }
    if let Some(s) = resume {
        if s.epochs_done() > cfg.epochs {
            return Err(Error::config(
                "resume",
                format!(
                    "the checkpoint has {} epochs done, more than this run's {}",
                    s.epochs_done(),
                    cfg.epochs
                ),
            ));
        }
    }
    Ok(())
}

/// What both modes share: the epochs from the resumed state's (or the first) on, each one's
/// training (`train_epoch`, returning its mean loss), the test evaluation after it, and
/// `on_epoch` with the new state (to checkpoint it; an error stops the run).
#[allow(clippy::too_many_arguments)]
fn run_epochs(
    protocol: &str,
    mut clf: Classifier,
    test: &FeatureSet,
    classes: usize,
    cfg: &LinearConfig,
    device: &Device,
    resume: Option<&LinearState>,
    on_epoch: &mut dyn FnMut(&LinearState) -> Result<()>,
    mut train_epoch: impl FnMut(&mut Classifier, usize) -> Result<f32>,
) -> Result<LinearResult> {
    let mut history = resume.map(|s| s.history.clone()).unwrap_or_default();
    let mut last = None;
    for epoch in history.len()..cfg.epochs {
        let lr = clf.set_epoch(epoch, cfg);
        let train_loss = train_epoch(&mut clf, epoch)?;
        let report = clf.evaluate(test, classes, device)?;
        history.push(EpochRecord {
            epoch: epoch + 1,
            lr,
            train_loss,
            test_top1: report.top1,
            test_top5: report.top5,
        });
        last = Some(report);
        on_epoch(&LinearState {
            tensors: clf.state_tensors()?,
            history: history.clone(),
        })?;
    }
    let test = match last {
        Some(r) => r,
        None => clf.evaluate(test, classes, device)?,
    };
    let best = best(&history).cloned().ok_or_else(|| {
        Error::config("linear", "no epoch was trained (epochs must be at least 1)")
    })?;
    Ok(LinearResult {
        protocol: protocol.into(),
        test,
        train_loss: history.iter().map(|r| r.train_loss).collect(),
        best_top1: best.test_top1,
        best_epoch: best.epoch,
        history,
        config: cfg.clone(),
    })
}

/// The fast mode: a linear classifier on features extracted once (no augmentation). The test
/// set is evaluated after every epoch; `on_epoch` gets the state after each (for checkpoints);
/// `resume` continues from a saved state, ending exactly as an uninterrupted run.
#[allow(clippy::too_many_arguments)]
pub fn train_cached(
    train: &FeatureSet,
    test: &FeatureSet,
    classes: usize,
    cfg: &LinearConfig,
    device: &Device,
    resume: Option<&LinearState>,
    mut on_epoch: impl FnMut(&LinearState) -> Result<()>,
) -> Result<LinearResult> {
    check(cfg, classes, resume)?;
    let dim = train.features.dim(1)?;
    let clf = Classifier::new(dim, classes, cfg, device, resume)?;
    let x_all = train.features.to_device(device)?;
    let y_all = Tensor::new(train.labels.as_slice(), device)?;
    // One generator for all the epochs' shuffles: a resumed run replays the done epochs' draws.
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let order = |rng: &mut StdRng| {
        let mut order: Vec<u32> = (0..train.len() as u32).collect();
        order.shuffle(rng);
        order
    };
    for _ in 0..resume.map_or(0, LinearState::epochs_done) {
        order(&mut rng);
    }
    run_epochs(
        "linear (cached features, no augmentation)",
        clf,
        test,
        classes,
        cfg,
        device,
        resume,
        &mut on_epoch,
        |clf, _| {
            let (mut sum, mut count) = (0f32, 0);
            for chunk in order(&mut rng).chunks(cfg.batch_size) {
                let idx = Tensor::new(chunk, device)?;
                let (x, y) = (x_all.index_select(&idx, 0)?, y_all.index_select(&idx, 0)?);
                sum += clf.step(&x, &y)?;
                count += 1;
            }
            Ok(sum / count as f32)
        },
    )
}

/// The protocol itself: every epoch, the training images go through `train_pipeline`
/// (RandomResizedCrop + flip) and the frozen backbone in eval mode; after every epoch the test
/// set is evaluated on `test` features (the evaluation transform through the same frozen
/// backbone: what `main_lincls.py`'s validation computes). `on_epoch` and `resume` as in
/// [`train_cached`].
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
    resume: Option<&LinearState>,
    mut on_epoch: impl FnMut(&LinearState) -> Result<()>,
) -> Result<LinearResult> {
    check(cfg, classes, resume)?;
    let dim = backbone.feature_dim();
    let clf = Classifier::new(dim, classes, cfg, device, resume)?;
    let lc = LoaderConfig {
        batch_size: cfg.batch_size,
        shuffle: true,
        drop_last: false,
        workers,
        prefetch: 2,
        seed: cfg.seed,
    };
    let loader = Loader::new(train, Views::One(train_pipeline), lc)?;
    run_epochs(
        "linear (augmented)",
        clf,
        test,
        classes,
        cfg,
        device,
        resume,
        &mut on_epoch,
        |clf, epoch| {
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
            Ok(sum / count.max(1) as f32)
        },
    )
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
