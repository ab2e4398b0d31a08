//! `moco knn` and `moco linear-eval`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use moco_data::augment;
use moco_data::datasets::{Dataset, Split};
use moco_eval::features::{self, FeatureSet};
use moco_eval::knn::{self, KnnConfig};
use moco_eval::linear::{self, LinearConfig, LinearState};
use moco_models::Encoder;

use crate::data::{self, Data};
use crate::progress::bar;

/// What `knn` and `linear-eval` share.
pub struct Common<'a> {
    pub weights: &'a str,
    pub dataset: &'a str,
    pub data_dir: Option<&'a Path>,
    pub image_size: Option<usize>,
    pub batch_size: usize,
    pub workers: usize,
    pub device: Device,
    pub settings: moco_models::Settings,
    pub json: bool,
}

fn check_channels(enc: &Encoder, d: &Data, dataset: &str) -> Result<()> {
    let (m, c) = (enc.spec().backbone.in_channels(), d.channels());
    if m != c {
        bail!("--dataset {dataset} has {c}-channel images but the model takes {m} channel(s)");
    }
    Ok(())
}

/// The training and test splits of `--dataset`, checked against the model's input channels.
fn open_splits(enc: &Encoder, c: &Common) -> Result<(Arc<Data>, Arc<Data>)> {
    let train = Arc::new(data::open(c.dataset, c.data_dir, Split::Train, false)?);
    let test = Arc::new(data::open(c.dataset, c.data_dir, Split::Test, false)?);
    check_channels(enc, &train, c.dataset)?;
    Ok((train, test))
}

/// Features of one split (`name`: train or test) with the evaluation transform.
fn split_features(
    enc: &Encoder,
    c: &Common,
    d: &Arc<Data>,
    name: &str,
    native: Option<usize>,
) -> Result<FeatureSet> {
    let size = c
        .image_size
        .or(if native.is_none() { Some(224) } else { None });
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
        &c.device,
        |done, _| pb.set_position(done as u64),
    )?;
    pb.finish_and_clear();
    Ok(f)
}

/// `moco knn`.
pub fn knn(c: Common, k: usize, t: f64) -> Result<()> {
    let w = crate::weights::Weights::read(c.weights)?;
    let enc = w.frozen(&c.device, c.settings)?;
    let (train_data, test_data) = open_splits(&enc, &c)?;
    let native = train_data.native_size;
    let train = split_features(&enc, &c, &train_data, "train", native)?;
    let test = split_features(&enc, &c, &test_data, "test", native)?;
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

/// `moco linear-eval`: checkpointed after every epoch into `OUT/checkpoint-last.safetensors`;
/// `resume` continues a killed run from it.
pub fn linear_eval(
    c: Common,
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
        let run = Path::new(c.weights);
        if run.is_dir() {
            run.join("linear-eval")
        } else {
            PathBuf::from("linear-eval")
        }
    });
    let ckpt = out_dir.join("checkpoint-last.safetensors");
    let w = crate::weights::Weights::read(c.weights)?;
    // The weights by content: a resumed evaluation must train on the backbone it started with,
    // wherever its file is now (and not on a run's later checkpoint-last).
    let context = BTreeMap::from([
        ("weights_sha256".to_string(), w.fingerprint()?),
        ("dataset".to_string(), c.dataset.to_string()),
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

    let enc = w.frozen(&c.device, c.settings)?;
    let (train_data, test_data) = open_splits(&enc, &c)?;
    let native = train_data.native_size;
    let classes = train_data.classes().to_vec();
    let test = split_features(&enc, &c, &test_data, "test", native)?;
    let pb = bar(cfg.epochs as u64, "linear", c.json);
    let on_epoch = |s: &LinearState| -> moco_eval::Result<()> {
        s.save(&ckpt, &cfg, &context)?;
        if let Some(r) = s.history.last() {
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
        let train = split_features(&enc, &c, &train_data, "train", native)?;
        linear::train_cached(
            &train,
            &test,
            classes.len(),
            &cfg,
            &c.device,
            state,
            on_epoch,
        )?
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
            &c.device,
            state,
            on_epoch,
        )?
    };
    pb.finish_and_clear();
    // The protocol's sanity check: the frozen backbone is bit-identical to the weights file.
    let reread = crate::weights::Weights::read(c.weights)?;
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
