//! `moco knn` and `moco linear-eval`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use moco_cli::tensorboard::EventLog;
use moco_cli::MemoryNeed;
use moco_data::augment;
use moco_data::datasets::Dataset;
use moco_data::image_folder::BadFiles;
use moco_data::named::{self, NamedDataset};
use moco_eval::features::{self, FeatureSet};
use moco_eval::knn::{self, KnnConfig};
use moco_eval::linear::{self, LinearConfig, LinearState};
use moco_models::{Encoder, Settings};

use super::device::DeviceArgs;
use super::progress::bar;
use super::weights::Weights;

/// Arguments of the evaluation commands.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Encoder weights: safetensors (moco convert / export / a run's checkpoint), a run folder,
    /// an official .pth.tar, or hf://OWNER/NAME[@REV].
    #[arg(long)]
    pub weights: String,
    /// fashion-mnist, mnist, cifar10, cifar100, stl10, folder or default (the embedded set).
    #[arg(long, default_value = "default")]
    pub dataset: String,
    /// The dataset's folder (`folder`: DIR/train and DIR/val).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Evaluation size: shorter side to S*256/224, center crop S (default: native size).
    #[arg(long, value_parser = super::positive)]
    pub image_size: Option<usize>,
    /// Batch size.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Data worker threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Print a last line with the results as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `moco knn`: the flags.
#[derive(Debug, clap::Args)]
pub struct KnnArgs {
    #[command(flatten)]
    common: EvalArgs,
    /// Neighbours.
    #[arg(long, default_value_t = 200)]
    k: usize,
    /// Temperature of the vote weights.
    #[arg(long, default_value_t = 0.1)]
    t: f64,
}

/// `moco linear-eval`: the flags.
#[derive(Debug, clap::Args)]
pub struct LinearEvalArgs {
    #[command(flatten)]
    common: EvalArgs,
    /// The protocol: v1 (MoCo v1/v2's main_lincls.py: lr 30, 100 epochs, lr x0.1 at 60% and
    /// 80% of them) or v3 (MoCo v3's: lr 0.1 x batch/256, 90 epochs, per-epoch cosine).
    #[arg(long, default_value = "v1")]
    protocol: String,
    /// Epochs (default: the protocol's).
    #[arg(long)]
    epochs: Option<usize>,
    /// Learning rate (default: the protocol's; v3 scales 0.1 by batch/256, a given value is
    /// used as it is).
    #[arg(long)]
    lr: Option<f64>,
    /// Train on features extracted once (no augmentation; fast on CPU, reported as such).
    #[arg(long)]
    cached_features: bool,
    /// Folder for results.json and checkpoint-last.safetensors (the classifier and its SGD
    /// state after the last epoch; default: linear-eval/ in the run directory when --weights
    /// is one, else in the current directory).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue the evaluation in --out from its last checkpoint (written after every
    /// epoch; the same settings are required).
    #[arg(long)]
    resume: bool,
}

fn check_channels(enc: &Encoder, d: &NamedDataset, dataset: &str) -> Result<()> {
    let (m, c) = (enc.spec().backbone.in_channels(), d.channels());
    if m != c {
        bail!("--dataset {dataset} has {c}-channel images but the model takes {m} channel(s)");
    }
    Ok(())
}

/// The training and test splits of `--dataset`, checked against the model's input channels.
fn open_splits(enc: &Encoder, c: &EvalArgs) -> Result<(Arc<NamedDataset>, Arc<NamedDataset>)> {
    let (train, test) = named::open_splits(&c.dataset, c.data_dir.as_deref(), BadFiles::Fail)?;
    let (train, test) = (Arc::new(train), Arc::new(test));
    check_channels(enc, &train, &c.dataset)?;
    Ok((train, test))
}

/// Features of one split (`name`: train or test) with the evaluation transform.
fn split_features(
    enc: &Encoder,
    c: &EvalArgs,
    device: &Device,
    d: &Arc<NamedDataset>,
    name: &str,
    native: Option<usize>,
) -> Result<FeatureSet> {
    let size = c
        .image_size
        .or(if native.is_none() { Some(224) } else { None });
    let crop = size.unwrap_or(native.unwrap_or(224));
    MemoryNeed::encoding(enc.spec(), crop, d.channels(), c.batch_size)
        .check(device, "--image-size/--batch-size")?;
    let pipeline = augment::eval(size, native.unwrap_or(224), d.normalize.clone());
    let pb = bar(d.len() as u64, name, c.json);
    let f = features::extract(
        enc,
        d.clone(),
        pipeline,
        features::ExtractConfig {
            batch_size: c.batch_size,
            workers: c.workers,
            l2: false,
        },
        device,
        |done, _| pb.set_position(done as u64),
    )?;
    pb.finish_and_clear();
    Ok(f)
}

impl KnnArgs {
    /// `moco knn`.
    pub fn run(&self, settings: Settings) -> Result<()> {
        let (c, k, t) = (&self.common, self.k, self.t);
        let device = c.device.open()?;
        let w = Weights::read(&c.weights)?;
        let enc = w.frozen(&device, settings)?;
        let (train_data, test_data) = open_splits(&enc, c)?;
        if k > train_data.len() {
            bail!(
                "--k {k}: the kNN bank (the training split, {}) has only {} images",
                train_data.describe(),
                train_data.len()
            );
        }
        let native = train_data.native_size;
        let train = split_features(&enc, c, &device, &train_data, "train", native)?;
        let test = split_features(&enc, c, &device, &test_data, "test", native)?;
        let classes = train_data.classes().len();
        let cfg = KnnConfig {
            k,
            t,
            ..Default::default()
        };
        let r = knn::evaluate(&train, &test, classes, &cfg)?;
        println!(
        "kNN (k={k}, t={t}) on {} with {}: top-1 {:.2}%  top-5 {:.2}%  ({} test images, bank of {})",
        c.dataset, w.source.display(), r.top1, r.top5, r.samples, train.len()
    );
        if c.json {
            println!(
                "{}",
                serde_json::json!({"protocol": "knn", "top1": r.top1, "top5": r.top5, "k": k, "t": t, "samples": r.samples, "per_class": r.per_class})
            );
        }
        Ok(())
    }
}

/// The first setting in which `saved` and `asked` differ, as `key: saved vs asked`.
fn first_difference<T: serde::Serialize>(saved: &T, asked: &T) -> Result<Option<String>> {
    let (a, b) = (serde_json::to_value(saved)?, serde_json::to_value(asked)?);
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return Ok((a != b).then(|| format!("{a} vs {b}")));
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    Ok(keys.into_iter().find_map(|k| {
        let (x, y) = (a.get(k), b.get(k));
        (x != y).then(|| {
            let show = |v: Option<&serde_json::Value>| v.map_or("(none)".into(), |v| v.to_string());
            format!(
                "`{k}` is {} in the checkpoint, {} in this command",
                show(x),
                show(y)
            )
        })
    }))
}

impl LinearEvalArgs {
    /// The protocol's settings, as `--protocol` and the flags give them.
    fn config(&self) -> Result<LinearConfig> {
        let base = match self.protocol.as_str() {
            "v1" => LinearConfig {
                batch_size: self.common.batch_size,
                ..LinearConfig::default()
            },
            "v3" => LinearConfig::v3(self.common.batch_size),
            other => bail!("--protocol {other}: expected v1 or v3"),
        };
        let epochs = self.epochs.unwrap_or(base.epochs);
        let schedule = match self.protocol.as_str() {
            // The milestones at 60% and 80% of the run, as 60 and 80 of 100.
            "v1" => moco_core::LrSchedule::step(vec![epochs * 60 / 100, epochs * 80 / 100]),
            _ => base.schedule.clone(),
        };
        Ok(LinearConfig {
            epochs,
            lr: self.lr.unwrap_or(base.lr),
            schedule,
            seed: self.seed,
            ..base
        })
    }

    /// `moco linear-eval`.
    pub fn run(&self, settings: Settings) -> Result<()> {
        let device = self.common.device.open()?;
        let cfg = self.config()?;
        linear_eval(
            &self.common,
            &device,
            settings,
            cfg,
            self.cached_features,
            self.out.clone(),
            self.resume,
        )
    }
}

/// `moco linear-eval`: checkpointed after every epoch into `OUT/checkpoint-last.safetensors`;
/// `resume` continues a killed run from it.
fn linear_eval(
    c: &EvalArgs,
    device: &Device,
    settings: Settings,
    cfg: LinearConfig,
    cached: bool,
    out: Option<PathBuf>,
    resume: bool,
) -> Result<()> {
    if cfg.epochs == 0 {
        bail!("--epochs 0: the linear evaluation needs at least one epoch");
    }
    // By default beside the weights when they are a run directory, else in the current one.
    let out_dir = out.unwrap_or_else(|| {
        let run = Path::new(&c.weights);
        if run.is_dir() {
            run.join("linear-eval")
        } else {
            PathBuf::from("linear-eval")
        }
    });
    let ckpt = out_dir.join("checkpoint-last.safetensors");
    let w = Weights::read(&c.weights)?;
    // The weights by content: a resumed evaluation must train on the backbone it started with,
    // wherever its file is now (and not on a run's later checkpoint-last).
    let context = BTreeMap::from([
        ("weights_sha256".to_string(), w.fingerprint()?),
        ("dataset".to_string(), c.dataset.clone()),
        (
            "mode".to_string(),
            if cached {
                "cached features"
            } else {
                "augmented"
            }
            .to_string(),
        ),
        (
            "image_size".to_string(),
            c.image_size.map_or("native".into(), |s| s.to_string()),
        ),
    ]);
    let resumed = if resume {
        if !ckpt.exists() {
            bail!(
                "--resume: no linear evaluation to resume in {} (it has no checkpoint-last.safetensors)",
                out_dir.display()
            );
        }
        let saved = LinearState::load(&ckpt, &Device::Cpu)?;
        let differs = match first_difference(&saved.context, &context)? {
            Some(d) => Some(d),
            None => first_difference(&saved.config, &cfg)?,
        };
        if let Some(d) = differs {
            let hint = match d.starts_with("`weights_sha256`") {
                true => " (--weights now holds other weights than the evaluation started from)",
                false => "",
            };
            bail!(
                "--resume from {}: {d}{hint}; resume with the same settings, or pass another --out",
                ckpt.display()
            );
        }
        eprintln!(
            "resuming the linear evaluation in {} after epoch {} of {}",
            out_dir.display(),
            saved.state.epochs_done(),
            cfg.epochs
        );
        Some(saved.state)
    } else {
        if ckpt.exists() {
            let saved = LinearState::load(&ckpt, &Device::Cpu)?;
            if saved.state.epochs_done() < saved.config.epochs {
                bail!(
                    "--out {}: an unfinished linear evaluation is there ({} of {} epochs); pass --resume to continue it, or another --out (or delete {})",
                    out_dir.display(),
                    saved.state.epochs_done(),
                    saved.config.epochs,
                    ckpt.display()
                );
            }
        }
        None
    };
    std::fs::create_dir_all(&out_dir).with_context(|| format!("--out {}", out_dir.display()))?;

    let enc = w.frozen(device, settings)?;
    let (train_data, test_data) = open_splits(&enc, c)?;
    let native = train_data.native_size;
    let classes = train_data.classes().to_vec();
    let test = split_features(&enc, c, device, &test_data, "test", native)?;
    let pb = bar(cfg.epochs as u64, "linear", c.json);
    // TensorBoard curves per epoch in --out/tb (past the resumed epoch dropped, as a fresh
    // evaluation drops all).
    let done = resumed.as_ref().map_or(0, |s| s.epochs_done());
    let mut tensorboard = EventLog::open(&out_dir.join("tb"), done as u64)?;
    let on_epoch = |s: &LinearState| -> moco_eval::Result<()> {
        s.save(&ckpt, &cfg, &context)?;
        if let Some(r) = s.history.last() {
            let curves = [
                ("lr", r.lr),
                ("train_loss", r.train_loss as f64),
                ("test_top1", r.test_top1),
                ("test_top5", r.test_top5),
            ];
            tensorboard
                .scalars(r.epoch as u64, &curves)
                .map_err(|e| moco_eval::Error::Callback(e.to_string()))?;
            pb.set_position(r.epoch as u64);
            pb.set_message(format!(
                "loss {:.4} test top-1 {:.2}%",
                r.train_loss, r.test_top1
            ));
            // Without a terminal (a log file, a pipe), one JSON line per epoch instead.
            if pb.is_hidden() {
                println!("{}", serde_json::json!(r));
            }
        }
        Ok(())
    };
    let state = resumed.as_ref();
    let result = if cached {
        let train = split_features(&enc, c, device, &train_data, "train", native)?;
        linear::train_cached(&train, &test, classes.len(), &cfg, device, state, on_epoch)?
    } else {
        let size = c.image_size.or(native).unwrap_or(224);
        let pipeline = augment::linear_train(size, train_data.normalize.clone());
        linear::train_augmented(
            &enc,
            train_data,
            pipeline,
            &test,
            classes.len(),
            &cfg,
            c.workers,
            device,
            state,
            on_epoch,
        )?
    };
    pb.finish_and_clear();
    // The protocol's sanity check: the frozen backbone is bit-identical to the weights file.
    let reread = Weights::read(&c.weights)?;
    linear::sanity_check(&w.tensors, &reread.tensors)?;
    let results = serde_json::json!({
        "protocol": result.protocol, "weights": w.source.display().to_string(), "dataset": c.dataset,
        "top1": result.test.top1, "top5": result.test.top5, "best_top1": result.best_top1,
        "best_epoch": result.best_epoch, "per_class": result.test.per_class, "classes": classes,
        "confusion": result.test.confusion, "train_loss": result.train_loss,
        "history": result.history, "config": result.config,
        "checkpoint": ckpt.display().to_string(),
    });
    let path = out_dir.join("results.json");
    moco_core::io::write_atomic(&path, serde_json::to_string_pretty(&results)?.as_bytes())?;
    println!(
        "{} on {} with {}: top-1 {:.2}%  top-5 {:.2}% after {} epoch{} (best top-1 {:.2}% after epoch {}; sanity check passed; {})",
        result.protocol,
        c.dataset,
        w.source.display(),
        result.test.top1,
        result.test.top5,
        result.history.len(),
        if result.history.len() == 1 { "" } else { "s" },
        result.best_top1,
        result.best_epoch,
        path.display()
    );
    if c.json {
        println!(
            "{}",
            serde_json::json!({"protocol": result.protocol, "top1": result.test.top1, "top5": result.test.top5, "best_top1": result.best_top1, "best_epoch": result.best_epoch, "results": path.display().to_string()})
        );
    }
    Ok(())
}
