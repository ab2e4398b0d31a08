//! `--dataset NAME --data-dir DIR`: the datasets the commands read, with their native size and
//! normalisation.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use moco_data::augment::Normalize;
use moco_data::datasets::{self, BadFiles, Dataset, Split, FASHION_MNIST_CLASSES};

/// Dataset names `--dataset` accepts.
pub const NAMES: &str = "fashion-mnist, mnist, cifar10, cifar100, stl10, folder, default";

/// A dataset behind a trait object, with what the transforms need to know about it.
pub struct Data {
    pub dataset: Arc<dyn Dataset>,
    /// Native side length (None for folders of arbitrary images).
    pub native_size: Option<usize>,
    pub normalize: Normalize,
}

impl Dataset for Data {
    fn len(&self) -> usize {
        self.dataset.len()
    }
    fn get(&self, i: usize) -> moco_data::Result<(moco_data::Image, u32)> {
        self.dataset.get(i)
    }
    fn label(&self, i: usize) -> u32 {
        self.dataset.label(i)
    }
    fn classes(&self) -> &[String] {
        self.dataset.classes()
    }
    fn channels(&self) -> usize {
        self.dataset.channels()
    }
    fn describe(&self) -> String {
        self.dataset.describe()
    }
}

/// Opens split `split` of `name` under `dir`. `folder` reads `DIR/train` (or `DIR/val` for
/// the test split), falling back to `DIR` itself for training when there is no `train/`.
pub fn open(name: &str, dir: Option<&Path>, split: Split, skip_bad: bool) -> Result<Data> {
    let need_dir = || dir.with_context(|| format!("--dataset {name} needs --data-dir"));
    let d = |ds: datasets::InMemory, size: usize, normalize: Normalize| Data {
        dataset: Arc::new(ds),
        native_size: Some(size),
        normalize,
    };
    Ok(match name {
        "default" => d(
            datasets::embedded_fashion_mnist(split)?,
            28,
            Normalize::fashion_mnist(),
        ),
        "fashion-mnist" => d(
            datasets::idx(
                need_dir()?,
                split,
                "fashion-mnist",
                Some(&FASHION_MNIST_CLASSES),
            )?,
            28,
            Normalize::fashion_mnist(),
        ),
        "mnist" => d(
            datasets::idx(need_dir()?, split, "mnist", None)?,
            28,
            Normalize::mnist(),
        ),
        "cifar10" => d(
            datasets::cifar(need_dir()?, split, false)?,
            32,
            Normalize::cifar(),
        ),
        "cifar100" => d(
            datasets::cifar(need_dir()?, split, true)?,
            32,
            Normalize::cifar(),
        ),
        "stl10" => d(
            datasets::stl10(need_dir()?, split)?,
            96,
            Normalize::imagenet(),
        ),
        "folder" => {
            let root = need_dir()?;
            let sub = match split {
                Split::Train => "train",
                Split::Test => "val",
                Split::Unlabeled => bail!("--dataset folder has no unlabeled split"),
            };
            let path = if root.join(sub).is_dir() {
                root.join(sub)
            } else if split == Split::Train {
                root.to_path_buf()
            } else {
                bail!(
                    "--data-dir {}: no `val` folder (expected DIR/train and DIR/val)",
                    root.display()
                )
            };
            let bad = if skip_bad {
                BadFiles::Skip
            } else {
                BadFiles::Fail
            };
            let ds = datasets::ImageFolder::new(&path, bad)?;
            if !ds.skipped.is_empty() {
                eprintln!(
                    "warning: skipped {} undecodable image(s) under {}, e.g. {}",
                    ds.skipped.len(),
                    path.display(),
                    ds.skipped[0].display()
                );
            }
            Data {
                dataset: Arc::new(ds),
                native_size: None,
                normalize: Normalize::imagenet(),
            }
        }
        other => bail!("--dataset {other}: unknown dataset (expected one of: {NAMES})"),
    })
}
