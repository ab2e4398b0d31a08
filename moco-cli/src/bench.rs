//! `moco bench`: throughput measurements.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use moco_data::augment::TwoCrop;
use moco_data::datasets::{Dataset, Split, Subset};
use moco_data::loader::{Loader, LoaderConfig, Views};

/// `moco bench data`: images/s of the two-crop pipeline (decode, augment twice, batch).
pub fn data(
    dataset: &str,
    dir: Option<&Path>,
    preset: &str,
    image_size: Option<usize>,
    workers: usize,
    images: usize,
    json: bool,
) -> Result<()> {
    let data = crate::data::open(dataset, dir, Split::Train, false)?;
    let size = match (image_size, data.native_size) {
        (Some(s), _) => s,
        (None, Some(s)) => s,
        (None, None) => 224,
    };
    let batch = 64usize;
    if images < 2 * batch {
        bail!("--images must be at least twice the batch size ({batch}): the first batch is not timed");
    }
    let n = images.min(data.len());
    let describe = data.describe();
    let norm = data.normalize.clone();
    let subset = Arc::new(Subset::new(data, (0..n).collect())?);
    let views = Views::Two(TwoCrop::preset(preset, size, norm)?);
    let cfg = LoaderConfig {
        batch_size: batch,
        workers,
        shuffle: true,
        drop_last: true,
        prefetch: 4,
        seed: 0,
    };
    let loader = Loader::new(subset, views, cfg)?;
    // The clock starts when the first batch arrives (as in the torchvision script): worker
    // start-up is left out on both sides.
    let mut batches = loader.epoch(0, 0);
    batches.next().transpose()?;
    let t0 = Instant::now();
    let mut count = 0;
    for b in batches {
        count += b?.indices.len();
    }
    let secs = t0.elapsed().as_secs_f64();
    let ips = count as f64 / secs;
    println!("{describe}: preset {preset}, {size}x{size}, {workers} worker(s), {count} images x 2 crops in {secs:.2} s: {ips:.1} images/s");
    if json {
        println!(
            "{}",
            serde_json::json!({"images_per_s": ips, "images": count, "seconds": secs, "workers": workers, "preset": preset, "image_size": size})
        );
    }
    Ok(())
}
