//! Datasets by name (`--dataset NAME --data-dir DIR`), with what the transforms need to know
//! about each: its native image size and its normalisation.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::augment::Normalize;
use crate::datasets::{self, Dataset, Split, FASHION_MNIST_CLASSES};
use crate::image_folder::{BadFiles, ImageFolder};
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
/// neither `train/` nor `val/` (see [`folder_split`]). `bad` says what an undecodable image in
/// a folder does. Most callers want both splits checked against each other: [`open_splits`].
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
            let ds = folder_split(need_dir()?, split, bad)?;
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

/// The folder of split `split` under `root`: `root/train` and `root/val`, or `root` itself for
/// training when it has neither (a single folder of class folders). Split folders named in
/// another case (`Train/`, `VAL/`) are an error rather than class folders, as is a `val/`
/// without a `train/`. The evaluation split's files have their headers checked here (with
/// [`BadFiles::Fail`]), so that a broken one stops the run before training, not after.
pub fn folder_split(root: &Path, split: Split, bad: BadFiles) -> Result<ImageFolder> {
    if split == Split::Unlabeled {
        return Err(Error::config(
            "dataset",
            "--dataset folder has no unlabeled split",
        ));
    }
    if !root.is_dir() {
        return Err(Error::file(root, "not a folder (--data-dir)"));
    }
    let listing = std::fs::read_dir(root)
        .map_err(|e| Error::file(root, format!("cannot list folder: {e}")))?;
    for entry in listing.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let lower = name.to_ascii_lowercase();
        if (lower == "train" || lower == "val") && name != lower && entry.path().is_dir() {
            return Err(Error::file(
                &entry.path(),
                format!("split folders are named `{lower}` (lower case, as torchvision's ImageNet layout); rename `{name}`"),
            ));
        }
    }
    let (train, val) = (root.join("train"), root.join("val"));
    let path = match (split, train.is_dir(), val.is_dir()) {
        (Split::Train, true, _) => train,
        (Split::Train, false, true) => {
            return Err(Error::file(
                root,
                "has `val/` but no `train/`: put the training images in DIR/train/CLASS/ (DIR itself is read as the training set only when it has neither)",
            ))
        }
        (Split::Train, false, false) => root.to_path_buf(),
        (_, _, true) => val,
        (_, _, false) => {
            return Err(Error::file(
                root,
                "no `val` folder (expected DIR/train and DIR/val)",
            ))
        }
    };
    let ds = ImageFolder::new(&path, bad)?;
    if split == Split::Test && bad == BadFiles::Fail {
        ds.check_headers()?;
    }
    Ok(ds)
}

/// The training and test splits of dataset `name` (see [`open`]), checked against each other:
/// the same class names in the same order (labels are compared by index), and the same number
/// of channels. A difference is an error naming the classes found in one split only.
pub fn open_splits(
    name: &str,
    dir: Option<&Path>,
    bad: BadFiles,
) -> Result<(NamedDataset, NamedDataset)> {
    let train = open(name, dir, Split::Train, bad)?;
    let test = open(name, dir, Split::Test, bad)?;
    let (a, b) = (train.classes(), test.classes());
    if a != b {
        let only = |x: &[String], y: &[String]| -> String {
            let v: Vec<&str> = x
                .iter()
                .filter(|c| !y.contains(c))
                .map(String::as_str)
                .collect();
            match v.len() {
                0 => "none".into(),
                n if n > 8 => format!("{} ... ({n} in all)", v[..8].join(", ")),
                _ => v.join(", "),
            }
        };
        let detail = if a.len() == b.len() && only(a, b) == "none" {
            "the same names in another order".to_string()
        } else {
            format!(
                "only in the training split: {}; only in the test split: {}",
                only(a, b),
                only(b, a)
            )
        };
        return Err(Error::config(
            "dataset",
            format!(
                "--dataset {name}: the training split ({}) and the test split ({}) have different classes ({detail}); labels are compared by index, so both need the same class folders",
                train.describe(),
                test.describe()
            ),
        ));
    }
    if train.channels() != test.channels() {
        return Err(Error::config(
            "dataset",
            format!(
                "--dataset {name}: {}-channel training images but {}-channel test images",
                train.channels(),
                test.channels()
            ),
        ));
    }
    Ok((train, test))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(dir: &Path, name: &str) {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        image::RgbImage::from_pixel(3, 3, image::Rgb([9, 9, 9]))
            .save(dir.join(name).join("0.png"))
            .unwrap();
    }

    fn err(dir: &Path) -> String {
        open_splits("folder", Some(dir), BadFiles::Fail)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn folder_layout_and_class_lists_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        class(&root.join("Train"), "cat");
        class(&root.join("val"), "cat");
        let e = err(root);
        assert!(e.contains("Train") && e.contains("lower case"), "{e}");
        std::fs::rename(root.join("Train"), root.join("elsewhere")).unwrap();
        let e = err(root);
        assert!(e.contains("no `train/`"), "{e}");
        class(&root.join("train"), "cat");
        class(&root.join("train"), "dog");
        class(&root.join("val"), "cow");
        let e = err(root);
        assert!(
            e.contains("only in the training split: dog")
                && e.contains("only in the test split: cow"),
            "{e}"
        );
        std::fs::rename(root.join("val/cow"), root.join("val/dog")).unwrap();
        let (train, test) = open_splits("folder", Some(root), BadFiles::Fail).unwrap();
        assert_eq!((train.len(), test.len()), (2, 2));
        // A broken evaluation image is found when the split is opened.
        std::fs::write(root.join("val/dog/1.png"), b"\x89PNG broken").unwrap();
        let e = err(root);
        assert!(e.contains("1.png"), "{e}");
        // A single folder of class folders is the training set.
        let single = tempfile::tempdir().unwrap();
        class(single.path(), "a");
        let train = open("folder", Some(single.path()), Split::Train, BadFiles::Fail).unwrap();
        assert_eq!(train.len(), 1);
    }
}
