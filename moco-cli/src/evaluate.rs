//! `moco knn` and `moco linear-eval`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use moco_data::augment;
use moco_data::datasets::{Dataset, Split};
use moco_eval::features::{self, FeatureSet};
use moco_eval::knn::{self, KnnConfig};
use moco_eval::linear::{self, LinearConfig};
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
    pub json: bool,
}

fn check_channels(enc: &Encoder, d: &Data, dataset: &str) -> Result<()> {
    let (m, c) = (enc.spec().backbone.in_channels(), d.channels());
    if m != c {
        bail!("--dataset {dataset} has {c}-channel images but the model takes {m} channel(s)");
    }
    Ok(())
}

/// Features of both splits with the evaluation transform; also returns the class names and the
/// training split (for the augmented linear protocol).
pub fn both_features(
    enc: &Encoder,
    c: &Common,
    quiet: bool,
) -> Result<(FeatureSet, FeatureSet, Vec<String>, Arc<Data>)> {
    let train = Arc::new(data::open(c.dataset, c.data_dir, Split::Train, false)?);
    let test = Arc::new(data::open(c.dataset, c.data_dir, Split::Test, false)?);
    check_channels(enc, &train, c.dataset)?;
    let native = train.native_size.unwrap_or(224);
    let size = c.image_size.or(if train.native_size.is_none() {
        Some(224)
    } else {
        None
    });
    let classes = train.classes().to_vec();
    let mut out = vec![];
    for (name, d) in [("train", &train), ("test", &test)] {
        let pipeline = augment::eval(size, native, d.normalize.clone());
        let pb = bar(d.len() as u64, name, quiet || c.json);
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
        out.push(f);
    }
    let test_f = out.pop().context("test features")?;
    let train_f = out.pop().context("train features")?;
    Ok((train_f, test_f, classes, train))
}

/// `moco knn`.
pub fn knn(c: Common, k: usize, t: f64) -> Result<()> {
    let w = crate::weights::Weights::read(c.weights)?;
    let enc = w.frozen(&c.device)?;
    let (train, test, classes, _) = both_features(&enc, &c, false)?;
    let cfg = KnnConfig {
        k,
        t,
        ..Default::default()
    };
    let r = knn::evaluate(&train, &test, classes.len(), &cfg)?;
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

/// `moco linear-eval`.
pub fn linear_eval(c: Common, cfg: LinearConfig, cached: bool, out: Option<PathBuf>) -> Result<()> {
    let w = crate::weights::Weights::read(c.weights)?;
    let enc = w.frozen(&c.device)?;
    let (train, test, classes, train_data) = both_features(&enc, &c, false)?;
    let pb = bar(cfg.epochs as u64, "linear", c.json);
    let progress = |e: usize, loss: f32| {
        pb.set_position(e as u64 + 1);
        pb.set_message(format!("loss {loss:.4}"));
    };
    let result = if cached {
        linear::train_cached(&train, &test, classes.len(), &cfg, &c.device, progress)?
    } else {
        let size = c.image_size.or(train_data.native_size).unwrap_or(224);
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
            progress,
        )?
    };
    pb.finish_and_clear();
    // The protocol's sanity check: the frozen backbone is bit-identical to the weights file.
    let reread = crate::weights::Weights::read(c.weights)?;
    linear::sanity_check(&w.tensors, &reread.tensors)?;
    // By default beside the weights when they are a run directory, else in the current one.
    let out_dir = out.unwrap_or_else(|| {
        let run = Path::new(c.weights);
        if run.is_dir() {
            run.join("linear-eval")
        } else {
            PathBuf::from("linear-eval")
        }
    });
    std::fs::create_dir_all(&out_dir).with_context(|| format!("--out {}", out_dir.display()))?;
    let results = serde_json::json!({
        "protocol": result.protocol, "weights": w.source.display().to_string(), "dataset": c.dataset,
        "top1": result.test.top1, "top5": result.test.top5, "per_class": result.test.per_class,
        "classes": classes, "confusion": result.test.confusion, "train_loss": result.train_loss, "config": result.config,
    });
    let path = out_dir.join("results.json");
    moco_core::io::write_atomic(&path, serde_json::to_string_pretty(&results)?.as_bytes())?;
    println!(
        "{} on {} with {}: top-1 {:.2}%  top-5 {:.2}%  (sanity check passed; {})",
        result.protocol,
        c.dataset,
        w.source.display(),
        result.test.top1,
        result.test.top5,
        path.display()
    );
    if c.json {
        println!(
            "{}",
            serde_json::json!({"protocol": result.protocol, "top1": result.test.top1, "top5": result.test.top5, "results": path.display().to_string()})
        );
    }
    Ok(())
}
