//! Datasets: MNIST-style idx files (raw or gzipped), CIFAR-10/100 and STL-10 binaries, the
//! embedded Fashion-MNIST default, and subsets of any of them (folders of images:
//! [`crate::image_folder`]).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::image::Image;
use crate::{Error, Result};

/// A labelled image dataset. `get` is cheap for in-memory datasets and decodes a file for
/// an image folder; it is called from several threads at once by the loader.
pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether the dataset is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sample `i` and its label (`u32::MAX` for unlabelled data such as STL-10's unlabeled split).
    fn get(&self, i: usize) -> Result<(Image, u32)>;
    /// The label of sample `i` without decoding it.
    fn label(&self, i: usize) -> u32;
    /// Class names, indexed by label.
    fn classes(&self) -> &[String];
    /// Channels of the images (1 or 3).
    fn channels(&self) -> usize;
    /// A short description for logs and results (`fashion-mnist train (60000 images)`).
    fn describe(&self) -> String;
}

impl<D: Dataset + ?Sized> Dataset for Arc<D> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn get(&self, i: usize) -> Result<(Image, u32)> {
        (**self).get(i)
    }
    fn label(&self, i: usize) -> u32 {
        (**self).label(i)
    }
    fn classes(&self) -> &[String] {
        (**self).classes()
    }
    fn channels(&self) -> usize {
        (**self).channels()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// Images of one size held in memory as u8, HWC per image.
#[derive(Debug, Clone)]
pub struct InMemory {
    name: String,
    width: usize,
    height: usize,
    channels: usize,
    pixels: Arc<Vec<u8>>,
    labels: Arc<Vec<u32>>,
    classes: Vec<String>,
}

impl InMemory {
    /// A dataset from raw HWC pixels (`labels.len()` images of `height x width x channels`).
    /// Every label is below `classes.len()` or `u32::MAX` (unlabeled), or it is an error.
    pub fn new(
        name: impl Into<String>,
        (height, width, channels): (usize, usize, usize),
        pixels: Vec<u8>,
        labels: Vec<u32>,
        classes: Vec<String>,
    ) -> Result<Self> {
        if pixels.len() != labels.len() * height * width * channels {
            return Err(Error::config(
                "dataset",
                format!(
                    "{} labels need {} bytes of pixels, got {}",
                    labels.len(),
                    labels.len() * height * width * channels,
                    pixels.len()
                ),
            ));
        }
        let name = name.into();
        if let Some(i) = labels
            .iter()
            .position(|&l| l != u32::MAX && l as usize >= classes.len())
        {
            return Err(Error::config(
                "dataset",
                format!(
                    "{name}: image {i} has label {}, outside 0..{} ({} classes)",
                    labels[i],
                    classes.len().saturating_sub(1),
                    classes.len()
                ),
            ));
        }
        Ok(Self {
            name,
            width,
            height,
            channels,
            pixels: Arc::new(pixels),
            labels: Arc::new(labels),
            classes,
        })
    }

    /// Image side lengths (height, width).
    pub fn size(&self) -> (usize, usize) {
        (self.height, self.width)
    }

    /// All labels.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }
}

impl Dataset for InMemory {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn get(&self, i: usize) -> Result<(Image, u32)> {
        let n = self.width * self.height * self.channels;
        let data = self
            .pixels
            .get(i * n..(i + 1) * n)
            .ok_or_else(|| Error::config("index", format!("{i} out of range ({})", self.len())))?;
        Ok((
            Image::new(self.width, self.height, self.channels, data.to_vec())?,
            self.labels[i],
        ))
    }
    fn label(&self, i: usize) -> u32 {
        self.labels[i]
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn channels(&self) -> usize {
        self.channels
    }
    fn describe(&self) -> String {
        format!(
            "{} ({} images, {}x{}x{})",
            self.name,
            self.len(),
            self.height,
            self.width,
            self.channels
        )
    }
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = vec![];
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::file(path, format!("corrupt gzip data: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an idx file: `(dims, payload)`. Only unsigned-byte data (type 0x08) is supported.
fn parse_idx(bytes: &[u8], path: &Path, want_rank: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(Error::file(path, "not an idx file (bad magic number)"));
    }
    if bytes[2] != 0x08 {
        return Err(Error::file(
            path,
            format!(
                "idx data type 0x{:02x} is not unsigned bytes (0x08)",
                bytes[2]
            ),
        ));
    }
    let rank = bytes[3] as usize;
    if rank != want_rank {
        return Err(Error::file(
            path,
            format!(
                "idx file of rank {rank}, expected {want_rank} (magic 0x{:08x})",
                0x800 + want_rank
            ),
        ));
    }
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err(Error::file(path, "truncated idx header"));
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| {
            u32::from_be_bytes([
                bytes[4 + 4 * i],
                bytes[5 + 4 * i],
                bytes[6 + 4 * i],
                bytes[7 + 4 * i],
            ]) as usize
        })
        .collect();
    let n: usize = dims.iter().product();
    if bytes.len() - header != n {
        return Err(Error::file(
            path,
            format!(
                "idx payload of {} bytes, expected {n} for dims {dims:?} (truncated or corrupt)",
                bytes.len() - header
            ),
        ));
    }
    Ok((dims, bytes[header..].to_vec()))
}

/// Which part of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Training images.
    Train,
    /// Test (or validation) images.
    Test,
    /// STL-10's 100,000 unlabeled images.
    Unlabeled,
}

impl Split {
    fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
            Split::Unlabeled => "unlabeled",
        }
    }
}

/// Fashion-MNIST's class names.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// An MNIST-style dataset from a folder holding `{train,t10k}-{images-idx3,labels-idx1}-ubyte`
/// (optionally `.gz`): MNIST, Fashion-MNIST, KMNIST. `classes` names the labels (digits when
/// `None`).
pub fn idx(dir: &Path, split: Split, name: &str, classes: Option<&[&str]>) -> Result<InMemory> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
        Split::Unlabeled => {
            return Err(Error::config(
                "split",
                format!("{name} has no unlabeled split"),
            ))
        }
    };
    let find = |stem: &str| -> Result<PathBuf> {
        for cand in [format!("{stem}.gz"), stem.to_string()] {
            let p = dir.join(&cand);
            if p.is_file() {
                return Ok(p);
            }
        }
        Err(Error::file(dir, format!("missing {stem} (or {stem}.gz)")))
    };
    let ip = find(&format!("{prefix}-images-idx3-ubyte"))?;
    let lp = find(&format!("{prefix}-labels-idx1-ubyte"))?;
    let (idims, pixels) = parse_idx(&read_maybe_gz(&ip)?, &ip, 3)?;
    let (ldims, labels) = parse_idx(&read_maybe_gz(&lp)?, &lp, 1)?;
    if idims[0] != ldims[0] {
        return Err(Error::file(
            &lp,
            format!(
                "{} labels for {} images in {}",
                ldims[0],
                idims[0],
                ip.display()
            ),
        ));
    }
    let classes: Vec<String> = match classes {
        Some(c) => c.iter().map(|s| s.to_string()).collect(),
        None => (0..10).map(|d| d.to_string()).collect(),
    };
    let labels: Vec<u32> = labels.into_iter().map(u32::from).collect();
    if let Some(bad) = labels.iter().find(|&&l| l as usize >= classes.len()) {
        return Err(Error::file(
            &lp,
            format!("label {bad} out of range for {} classes", classes.len()),
        ));
    }
    InMemory::new(
        format!("{name} {}", split.name()),
        (idims[1], idims[2], 1),
        pixels,
        labels,
        classes,
    )
}

fn read_lines(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// CIFAR-10 (`cifar-10-batches-bin/`: `data_batch_1..5.bin`, `test_batch.bin`,
/// `batches.meta.txt`) or CIFAR-100 (`cifar-100-binary/`: `train.bin`, `test.bin`,
/// `fine_label_names.txt`; fine labels). `dir` may be the folder itself or its parent.
pub fn cifar(dir: &Path, split: Split, hundred: bool) -> Result<InMemory> {
    let sub = if hundred {
        "cifar-100-binary"
    } else {
        "cifar-10-batches-bin"
    };
    let dir = if dir.join(sub).is_dir() {
        dir.join(sub)
    } else {
        dir.to_path_buf()
    };
    let files: Vec<String> = match (hundred, split) {
        (false, Split::Train) => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
        (false, Split::Test) => vec!["test_batch.bin".into()],
        (true, Split::Train) => vec!["train.bin".into()],
        (true, Split::Test) => vec!["test.bin".into()],
        (_, Split::Unlabeled) => {
            return Err(Error::config("split", "CIFAR has no unlabeled split"))
        }
    };
    let label_bytes = if hundred { 2 } else { 1 };
    let rec = label_bytes + 3072;
    let (mut pixels, mut labels) = (vec![], vec![]);
    for f in files {
        let path = dir.join(&f);
        let bytes =
            std::fs::read(&path).map_err(|e| Error::file(&path, format!("cannot read: {e}")))?;
        if bytes.is_empty() || bytes.len() % rec != 0 {
            return Err(Error::file(&path, format!("size {} is not a multiple of the {rec}-byte CIFAR record (truncated or not a CIFAR binary)", bytes.len())));
        }
        let classes = if hundred { 100 } else { 10 };
        for (i, r) in bytes.chunks_exact(rec).enumerate() {
            let label = r[label_bytes - 1] as u32; // CIFAR-100: [coarse, fine]
            if label >= classes {
                return Err(Error::file(
                    &path,
                    format!("record {i} has label {label}, outside 0..{} (not a CIFAR-{classes} binary?)", classes - 1),
                ));
            }
            labels.push(label);
            let planes = &r[label_bytes..];
            // CHW planes -> HWC
            for p in 0..1024 {
                pixels.extend_from_slice(&[planes[p], planes[1024 + p], planes[2048 + p]]);
            }
        }
    }
    let meta = if hundred {
        "fine_label_names.txt"
    } else {
        "batches.meta.txt"
    };
    let classes = read_lines(&dir.join(meta)).unwrap_or_else(|_| {
        (0..if hundred { 100 } else { 10 })
            .map(|i| i.to_string())
            .collect()
    });
    let name = if hundred { "cifar100" } else { "cifar10" };
    InMemory::new(
        format!("{name} {}", split.name()),
        (32, 32, 3),
        pixels,
        labels,
        classes,
    )
}

/// STL-10 binary (`stl10_binary/`: `{train,test}_X.bin`, `{train,test}_y.bin`,
/// `unlabeled_X.bin`, `class_names.txt`); images are stored column-major and are transposed
/// here. Labels in the files run 1..10 and become 0..9; unlabeled images get `u32::MAX`.
pub fn stl10(dir: &Path, split: Split) -> Result<InMemory> {
    let dir = if dir.join("stl10_binary").is_dir() {
        dir.join("stl10_binary")
    } else {
        dir.to_path_buf()
    };
    let xp = dir.join(format!("{}_X.bin", split.name()));
    let bytes = std::fs::read(&xp).map_err(|e| Error::file(&xp, format!("cannot read: {e}")))?;
    const IMG: usize = 3 * 96 * 96;
    if bytes.is_empty() || bytes.len() % IMG != 0 {
        return Err(Error::file(
            &xp,
            format!(
                "size {} is not a multiple of {IMG} (truncated?)",
                bytes.len()
            ),
        ));
    }
    let n = bytes.len() / IMG;
    let mut pixels = vec![0u8; bytes.len()];
    for (i, img) in bytes.chunks_exact(IMG).enumerate() {
        let out = &mut pixels[i * IMG..(i + 1) * IMG];
        // file: [c][x][y] (column-major per channel) -> HWC [y][x][c]
        for c in 0..3 {
            for x in 0..96 {
                for y in 0..96 {
                    out[(y * 96 + x) * 3 + c] = img[c * 9216 + x * 96 + y];
                }
            }
        }
    }
    let labels = if split == Split::Unlabeled {
        vec![u32::MAX; n]
    } else {
        let yp = dir.join(format!("{}_y.bin", split.name()));
        let y = std::fs::read(&yp).map_err(|e| Error::file(&yp, format!("cannot read: {e}")))?;
        if y.len() != n {
            return Err(Error::file(
                &yp,
                format!("{} labels for {n} images", y.len()),
            ));
        }
        y.iter()
            .map(|&l| {
                if (1..=10).contains(&l) {
                    Ok(l as u32 - 1)
                } else {
                    Err(Error::file(&yp, format!("label {l} outside 1..10")))
                }
            })
            .collect::<Result<_>>()?
    };
    let classes = read_lines(&dir.join("class_names.txt"))
        .unwrap_or_else(|_| (0..10).map(|i| i.to_string()).collect());
    InMemory::new(
        format!("stl10 {}", split.name()),
        (96, 96, 3),
        pixels,
        labels,
        classes,
    )
}

/// A view of some samples of another dataset.
#[derive(Clone)]
pub struct Subset<D> {
    inner: D,
    indices: Vec<usize>,
}

impl<D: Dataset> Subset<D> {
    /// The samples at `indices` (each must be in range).
    pub fn new(inner: D, indices: Vec<usize>) -> Result<Self> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= inner.len()) {
            return Err(Error::config(
                "subset",
                format!("index {bad} out of range for {}", inner.describe()),
            ));
        }
        Ok(Self { inner, indices })
    }

    /// `n` samples drawn without replacement with `seed` (all of them, reordered, when n >= len).
    pub fn random(inner: D, n: usize, seed: u64) -> Result<Self> {
        let mut idx: Vec<usize> = (0..inner.len()).collect();
        idx.shuffle(&mut StdRng::seed_from_u64(seed));
        idx.truncate(n);
        idx.sort_unstable();
        Self::new(inner, idx)
    }
}

impl<D: Dataset> Dataset for Subset<D> {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn get(&self, i: usize) -> Result<(Image, u32)> {
        self.inner.get(self.indices[i])
    }
    fn label(&self, i: usize) -> u32 {
        self.inner.label(self.indices[i])
    }
    fn classes(&self) -> &[String] {
        self.inner.classes()
    }
    fn channels(&self) -> usize {
        self.inner.channels()
    }
    fn describe(&self) -> String {
        format!("{} of {}", self.len(), self.inner.describe())
    }
}

// The embedded default: `embedded/fashion-mnist-{train,test}-*.gz`, idx files of a class-balanced
// subset of Fashion-MNIST (see embedded/README.md for how they were made).
static EMBEDDED_TRAIN_IMAGES: &[u8] =
    include_bytes!("../embedded/fashion-mnist-train-images-idx3-ubyte.gz");
static EMBEDDED_TRAIN_LABELS: &[u8] =
    include_bytes!("../embedded/fashion-mnist-train-labels-idx1-ubyte.gz");
static EMBEDDED_TEST_IMAGES: &[u8] =
    include_bytes!("../embedded/fashion-mnist-test-images-idx3-ubyte.gz");
static EMBEDDED_TEST_LABELS: &[u8] =
    include_bytes!("../embedded/fashion-mnist-test-labels-idx1-ubyte.gz");

/// The Fashion-MNIST subset built into the library, so that a first run needs no data:
/// 4000 training and 1000 test images, class-balanced, 28x28 grayscale.
pub fn embedded_fashion_mnist(split: Split) -> Result<InMemory> {
    let (ib, lb, n) = match split {
        Split::Train => (EMBEDDED_TRAIN_IMAGES, EMBEDDED_TRAIN_LABELS, "train"),
        Split::Test => (EMBEDDED_TEST_IMAGES, EMBEDDED_TEST_LABELS, "test"),
        Split::Unlabeled => {
            return Err(Error::config(
                "split",
                "the embedded set has no unlabeled split",
            ))
        }
    };
    let gunzip = |b: &[u8]| -> Result<Vec<u8>> {
        let mut out = vec![];
        flate2::read::GzDecoder::new(b)
            .read_to_end(&mut out)
            .map_err(|e| Error::config("embedded", e.to_string()))?;
        Ok(out)
    };
    let tag = Path::new("<embedded fashion-mnist>");
    let (idims, pixels) = parse_idx(&gunzip(ib)?, tag, 3)?;
    let (_, labels) = parse_idx(&gunzip(lb)?, tag, 1)?;
    let classes = FASHION_MNIST_CLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    InMemory::new(
        format!("embedded fashion-mnist {n}"),
        (idims[1], idims[2], 1),
        pixels,
        labels.into_iter().map(u32::from).collect(),
        classes,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_idx(path: &Path, dims: &[u32], payload: &[u8], gz: bool) {
        let mut bytes = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            bytes.extend_from_slice(&d.to_be_bytes());
        }
        bytes.extend_from_slice(payload);
        if gz {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&bytes).unwrap();
            bytes = e.finish().unwrap();
        }
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn idx_raw_and_gzipped_and_their_errors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_idx(
            &d.join("train-images-idx3-ubyte.gz"),
            &[3, 2, 2],
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
            true,
        );
        write_idx(&d.join("train-labels-idx1-ubyte"), &[3], &[0, 9, 4], false);
        let ds = idx(d, Split::Train, "mnist", None).unwrap();
        assert_eq!(ds.len(), 3);
        let (im, l) = ds.get(1).unwrap();
        assert_eq!((im.width, im.height, im.channels, l), (2, 2, 1, 9));
        assert_eq!(im.data, [5, 6, 7, 8]);

        // Wrong magic number (a labels file where images are expected).
        write_idx(&d.join("t10k-images-idx3-ubyte"), &[3], &[0, 1, 2], false);
        write_idx(&d.join("t10k-labels-idx1-ubyte"), &[3], &[0, 1, 2], false);
        let err = idx(d, Split::Test, "mnist", None).unwrap_err().to_string();
        assert!(
            err.contains("t10k-images-idx3-ubyte") && err.contains("rank 1"),
            "{err}"
        );
        // Truncated payload.
        write_idx(
            &d.join("t10k-images-idx3-ubyte"),
            &[3, 2, 2],
            &[1, 2, 3],
            false,
        );
        let err = idx(d, Split::Test, "mnist", None).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        // Not idx at all; a missing folder.
        std::fs::write(d.join("t10k-images-idx3-ubyte"), b"\x89PNG....").unwrap();
        assert!(idx(d, Split::Test, "mnist", None)
            .unwrap_err()
            .to_string()
            .contains("bad magic"));
        let err = idx(&d.join("nope"), Split::Train, "mnist", None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nope") && err.contains("missing train-images-idx3-ubyte"),
            "{err}"
        );
    }

    #[test]
    fn cifar10_records_become_hwc_images() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = vec![7u8];
        rec.extend((0..3072).map(|i| (i / 1024) as u8 * 100)); // R plane 0, G 100, B 200
        std::fs::write(dir.path().join("test_batch.bin"), &rec).unwrap();
        let ds = cifar(dir.path(), Split::Test, false).unwrap();
        let (im, l) = ds.get(0).unwrap();
        assert_eq!((l, &im.data[..3]), (7, &[0u8, 100, 200][..]));
        std::fs::write(dir.path().join("test_batch.bin"), &rec[..100]).unwrap();
        let err = cifar(dir.path(), Split::Test, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("test_batch.bin") && err.contains("3073"),
            "{err}"
        );
        // An out-of-range label is found when the file is opened, not at the first step.
        let mut two = rec.clone();
        two.push(10);
        two.extend_from_slice(&rec[1..]);
        std::fs::write(dir.path().join("test_batch.bin"), &two).unwrap();
        let err = cifar(dir.path(), Split::Test, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("test_batch.bin") && err.contains("record 1 has label 10"),
            "{err}"
        );
        let err = InMemory::new(
            "x",
            (1, 1, 1),
            vec![0, 0],
            vec![0, 2],
            vec!["a".into(), "b".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("image 1 has label 2"), "{err}");
    }

    #[test]
    fn stl10_is_transposed_from_column_major_and_labels_start_at_zero() {
        let dir = tempfile::tempdir().unwrap();
        let mut x = vec![0u8; 3 * 96 * 96];
        x[5 * 96 + 2] = 200; // channel 0, column x=5, row y=2
        std::fs::write(dir.path().join("test_X.bin"), &x).unwrap();
        std::fs::write(dir.path().join("test_y.bin"), [10u8]).unwrap();
        let ds = stl10(dir.path(), Split::Test).unwrap();
        let (im, l) = ds.get(0).unwrap();
        assert_eq!(l, 9);
        assert_eq!(im.data[(2 * 96 + 5) * 3], 200);
    }

    #[test]
    fn embedded_set_is_balanced_and_subsets_are_seeded() {
        let train = embedded_fashion_mnist(Split::Train).unwrap();
        assert_eq!(
            (train.len(), train.size(), train.classes().len()),
            (4000, (28, 28), 10)
        );
        for c in 0..10 {
            assert_eq!(train.labels().iter().filter(|&&l| l == c).count(), 400);
        }
        assert_eq!(embedded_fashion_mnist(Split::Test).unwrap().len(), 1000);
        let a = Subset::random(train.clone(), 100, 1).unwrap();
        let b = Subset::random(train.clone(), 100, 1).unwrap();
        assert_eq!(
            (0..100).map(|i| a.label(i)).collect::<Vec<_>>(),
            (0..100).map(|i| b.label(i)).collect::<Vec<_>>()
        );
        assert!(Subset::new(train, vec![4000]).is_err());
    }
}
