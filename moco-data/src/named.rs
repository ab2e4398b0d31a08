//! Datasets by name (`--dataset NAME --data-dir DIR`), with what the transforms need to know
//! about each: its native image size and its normalisation.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::augment::Normalize;
use crate::datasets::{self, BadFiles, Dataset, Split, FASHION_MNIST_CLASSES};
use crate::{Error, Image, Result};

/// The names [`open`] takes.
pub const DATASET_NAMES: &str = "fashion-mnist, mnist, cifar10, cifar100, stl10, folder, default";

/// A dataset opened by name.
pub struct NamedDataset {
    /// The images and labels.
    pub dataset: Arc<dyn Dataset>,
    /// Native side length (None for folders of arbitrary images).
    pub native_size: Option<usize>,
    /// The normalisation its transforms use (per dataset, as the official code's).
    pub normalize: Normalize,
    /// Undecodable files left out ([`BadFiles::Skip`] on a `folder` dataset).
    pub skipped: Vec<PathBuf>,
}

impl std::fmt::Debug for NamedDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamedDataset")
            .field("dataset", &self.dataset.describe())
            .field("native_size", &self.native_size)
            .finish()
    }
}

impl Dataset for NamedDataset {
    fn len(&self) -> usize {
        self.dataset.len()
    }
    fn get(&self, i: usize) -> Result<(Image, u32)> {
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

/// Opens split `split` of dataset `name` (one of [`DATASET_NAMES`]) under `dir`: `default` is
/// the embedded Fashion-MNIST subset (no folder); `fashion-mnist` and `mnist` idx files, raw or
/// gzipped; `cifar10`, `cifar100`, `stl10` their binary versions; `folder` reads `DIR/train`
/// (or `DIR/val` for the test split), falling back to `DIR` itself for training when there is
/// no `train/`. `bad` says what an undecodable image in a folder does.
pub fn open(name: &str, dir: Option<&Path>, split: Split, bad: BadFiles) -> Result<NamedDataset> {
    let need_dir = || {
        dir.ok_or_else(|| {
            Error::config(
                "dataset",
                format!("--dataset {name} needs --data-dir (its folder)"),
            )
        })
    };
    let d = |ds: datasets::InMemory, size: usize, normalize: Normalize| NamedDataset {
        dataset: Arc::new(ds),
        native_size: Some(size),
        normalize,
        skipped: vec![],
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
                Split::Unlabeled => {
                    return Err(Error::config(
                        "dataset",
                        "--dataset folder has no unlabeled split",
                    ))
                }
            };
            let path = if root.join(sub).is_dir() {
                root.join(sub)
            } else if split == Split::Train {
                root.to_path_buf()
            } else {
                return Err(Error::file(
                    root,
                    "no `val` folder (expected DIR/train and DIR/val)",
                ));
            };
            let ds = datasets::ImageFolder::new(&path, bad)?;
            let skipped = ds.skipped.clone();
            NamedDataset {
                dataset: Arc::new(ds),
                native_size: None,
                normalize: Normalize::imagenet(),
                skipped,
            }
        }
        other => {
            return Err(Error::config(
                "dataset",
                format!("--dataset {other}: unknown dataset (expected one of: {DATASET_NAMES})"),
            ))
        }
    })
}
