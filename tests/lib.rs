//! Helpers for the end-to-end tests in this folder (`cargo test -p moco-tests`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// A `Command` for the `moco` binary, built in release mode on first use (a no-op when it is up
/// to date).
pub fn moco() -> Command {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    let path = BIN.get_or_init(|| {
        escargot::CargoBuild::new()
            .package("moco-cli")
            .bin("moco")
            .release()
            .run()
            .unwrap_or_else(|e| panic!("building the moco binary failed: {e}"))
            .path()
            .to_path_buf()
    });
    Command::new(path)
}

/// The `moco pretrain` flags of a tiny, fast run on the embedded data (a width-4 network, 256
/// images, batches of 16, K 64, no kNN monitor before the end, no progress bar).
pub const TINY_RUN: &[&str] = &[
    "--batch-size",
    "16",
    "--bn-splits",
    "2",
    "--subset",
    "256",
    "--knn-every",
    "0",
    "--quiet",
    // Not in TINY_V3_RUN from here on.
    "--width",
    "4",
    "--queue-size",
    "64",
];

/// [`TINY_RUN`] for MoCo v3's in-batch loss, which has no queue (and refuses `--queue-size`),
/// without `--width` (which ViTs refuse): add `--width 4` for a ResNet.
pub const TINY_V3_RUN: &[&str] = TINY_RUN.split_at(9).0;

/// The `moco pretrain` flags of a tiny run on a [`photo_folder`] (pass `--data-dir` too): 32x32
/// crops, a width-4 network, batches of 4, K 8.
pub const TINY_FOLDER_RUN: &[&str] = &[
    "--dataset",
    "folder",
    "--image-size",
    "32",
    "--width",
    "4",
    "--batch-size",
    "4",
    "--queue-size",
    "8",
    "--bn-splits",
    "2",
];

/// A tiny ImageFolder under `root`: the split folders `splits` (e.g. `["train", "val"]`), each
/// with the same two classes of two reference photos, `a` (coffee.png, rocket.jpg) and `b`
/// (chelsea_gray.png, astronaut_rgba.png). Returns `root`.
pub fn photo_folder(root: &Path, splits: &[&str]) -> PathBuf {
    let photos = reference("images");
    for (class, files) in [
        ("a", ["coffee.png", "rocket.jpg"]),
        ("b", ["chelsea_gray.png", "astronaut_rgba.png"]),
    ] {
        for split in splits {
            let d = root.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
            for f in files {
                std::fs::copy(photos.join(f), d.join(f))
                    .unwrap_or_else(|e| panic!("{}: {e}", d.join(f).display()));
            }
        }
    }
    root.to_path_buf()
}

/// MoCo v3 heads sized for [`TINY_RUN`]-like runs (projector and predictor hidden 32, output
/// 16) and half an epoch of warm-up, for `--preset v3` / `v3-vit` runs of a few steps.
pub const SMALL_V3_HEADS: &[&str] = &[
    "--moco-mlp-dim",
    "32",
    "--moco-dim",
    "16",
    "--warmup-epochs",
    "0.5",
];

pub use moco_testing::reference;

/// Runs `cmd`, panicking with its standard error when it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Every tensor of a safetensors file as float32 values, sorted by name.
pub fn file_tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let f = moco_core::io::load(path, &candle_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut v: Vec<(String, Vec<f32>)> = f
        .tensors
        .into_iter()
        .map(|(k, t)| {
            let flat = t
                .to_dtype(candle_core::DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .unwrap_or_else(|e| panic!("`{k}`: {e}"));
            (k, flat)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
