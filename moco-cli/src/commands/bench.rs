//! `moco bench`: throughput measurements.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Subcommand;
use moco_data::augment::TwoCrop;
use moco_data::datasets::{Dataset, Split, Subset};
use moco_data::image_folder::BadFiles;
use moco_data::loader::{Loader, LoaderConfig, Views};
use moco_data::named;
use moco_models::Settings;

use super::device::DeviceArgs;

/// Throughput benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Images/s and peak memory of full MoCo training steps on random input.
    Step(StepArgs),
    /// Images/s of the data pipeline: decode, two augmented crops, batching.
    Data(DataArgs),
}

impl BenchCommand {
    /// Runs the benchmark.
    pub fn run(&self, settings: Settings) -> Result<()> {
        match self {
            Self::Step(a) => step(a, settings),
            Self::Data(a) => data(a),
        }
    }
}

/// Images/s and peak memory of full MoCo training steps on random input.
#[derive(Debug, clap::Args)]
pub struct StepArgs {
    /// Architecture (a ResNet, or a ViT: vit_tiny, vit_small, vit_base, vit-DxNhH).
    #[arg(long, default_value = "resnet18-small")]
    pub arch: String,
    /// ViT patch size (default 16).
    #[arg(long)]
    pub patch_size: Option<usize>,
    /// Width of the first stage.
    #[arg(long, default_value_t = 64)]
    pub width: usize,
    #[arg(long, default_value_t = 32, value_parser = super::positive)]
    pub image_size: usize,
    #[arg(long, default_value_t = 3)]
    pub channels: usize,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Queue size K.
    #[arg(long, default_value_t = 4096)]
    pub queue_size: usize,
    /// MoCo v2's step: MLP head and T 0.2 (default: v1's linear head, T 0.07).
    #[arg(long)]
    pub mlp: bool,
    /// Timed steps (after 2 warm-up steps).
    #[arg(long, default_value_t = 5, value_parser = super::positive)]
    pub steps: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Print a last line {"images_per_s": ..., "peak_rss_mb": ...}.
    #[arg(long)]
    pub json: bool,
    /// Time the frozen backbone's eval-mode forward instead (pooled features, no autograd:
    /// what `moco knn`, `linear-eval` and `extract` run per batch).
    #[arg(long)]
    pub extract: bool,
    /// Also time the query encoder's training-mode forward pass, and forward + backward
    /// (of the sum of its outputs), on their own: where a step's time goes.
    #[arg(long)]
    pub phases: bool,
    /// Also run `--steps` steps under a profile (`moco_core::profile`) and print each op
    /// class's exclusive time per step: convolutions, BatchNorm, pool, add + ReLU and linear
    /// layers forward and backward, the encoders' other work, the loss, the backward pass's
    /// other work, the optimizer, the momentum update, the enqueue. Each timed region
    /// synchronises the device, so the profiled steps are slower than the timed ones.
    #[arg(long)]
    pub profile: bool,
}

/// Images/s of the data pipeline: decode, two augmented crops, batching.
#[derive(Debug, clap::Args)]
pub struct DataArgs {
    /// fashion-mnist, mnist, cifar10, cifar100, stl10, folder or default.
    #[arg(long, default_value = "default")]
    pub dataset: String,
    /// The dataset's folder (for `folder`: DIR/train/CLASS/* or DIR/CLASS/*).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Augmentation preset: v1, v2, cifar or v3; or eval, the evaluation transform (Resize,
    /// CenterCrop; one view per image, unshuffled: what feature extraction loads).
    #[arg(long, default_value = "v2")]
    pub preset: String,
    /// Crop size (default: the dataset's native size, 224 for folders).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Images to time (at most the dataset's size).
    #[arg(long, default_value_t = 1024)]
    pub images: usize,
    /// Print a last line {"images_per_s": ...}.
    #[arg(long)]
    pub json: bool,
}

/// `moco bench data`: images/s of the two-crop pipeline (decode, augment twice, batch), or with
/// preset `eval` of the evaluation transform (decode, resize, center crop, batch).
fn data(a: &DataArgs) -> Result<()> {
    let (preset, image_size, workers, images, json) =
        (a.preset.as_str(), a.image_size, a.workers, a.images, a.json);
    let data = named::open(
        &a.dataset,
        a.data_dir.as_deref(),
        Split::Train,
        BadFiles::Fail,
    )?;
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
    // `eval`: the evaluation transform, one view per image, in order (feature extraction).
    let eval = preset == "eval";
    let views = match eval {
        true => Views::One(moco_data::augment::eval(Some(size), size, norm)),
        false => Views::Two(TwoCrop::preset(preset, size, norm)?),
    };
    let cfg = LoaderConfig {
        batch_size: batch,
        workers,
        shuffle: !eval,
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
    let crops = if eval { "1 view" } else { "2 crops" };
    println!("{describe}: preset {preset}, {size}x{size}, {workers} worker(s), {count} images x {crops} in {secs:.2} s: {ips:.1} images/s");
    if json {
        println!(
            "{}",
            serde_json::json!({"images_per_s": ips, "images": count, "seconds": secs, "workers": workers, "preset": preset, "image_size": size})
        );
    }
    Ok(())
}

/// Peak resident memory of this process in MiB (Linux `VmHWM`), if known.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// `moco bench step`: full MoCo training steps (query forward+backward, key forward with
/// shuffle-BN, SGD, momentum update, enqueue) on random input, through `Moco::train_step`, the
/// code path of `moco pretrain`.
fn step(o: &StepArgs, settings: Settings) -> Result<()> {
    let device = o.device.open()?;
    use candle_core::Tensor;
    let backbone = moco_models::BackboneConfig::for_input(
        &o.arch,
        o.width,
        o.channels,
        o.image_size,
        o.patch_size,
    )?;
    let spec = moco_models::EncoderSpec {
        backbone,
        head: if o.mlp {
            moco_models::HeadKind::Mlp { dim: 128 }
        } else {
            moco_models::HeadKind::Linear { dim: 128 }
        },
    };
    let config = moco_core::MocoConfig {
        queue_size: o.queue_size,
        batch_size: o.batch_size,
        ..if o.mlp {
            moco_core::MocoConfig::v2()
        } else {
            moco_core::MocoConfig::v1()
        }
    };
    config.validate()?;
    moco_cli::MemoryNeed::pretraining(
        &spec,
        o.image_size,
        o.channels,
        o.batch_size,
        o.queue_size,
        128,
    )
    .check(
        &device,
        "--arch/--width/--image-size/--batch-size/--queue-size",
    )?;
    let mut moco = moco_core::Moco::new(config, &device, |vb| {
        moco_models::encoder(spec, settings, vb)
    })?
    .with_kernels(settings.kernels);
    let shape = (o.batch_size, o.channels, o.image_size, o.image_size);
    let x1 = Tensor::randn(0f32, 1., shape, &device)?;
    let x2 = Tensor::randn(0f32, 1., shape, &device)?;
    // Feature extraction: the query encoder's weights as plain tensors (no autograd), as
    // `moco knn`, `linear-eval` and `extract` load them, pooled features in eval mode.
    let frozen = match o.extract {
        true => {
            let tensors = moco.encoders().query_tensors().into_iter().collect();
            let vb = candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, &device);
            Some(moco_models::encoder(spec, settings, vb)?)
        }
        false => None,
    };
    let warmup = 2;
    // The median of `o.steps` timed runs of `f` after the warm-up ones.
    let median_of = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let mut times = vec![];
        for i in 0..warmup + o.steps {
            let t0 = Instant::now();
            f()?;
            device.synchronize()?;
            if i >= warmup {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        times.sort_by(|a, b| a.total_cmp(b));
        Ok(times[times.len() / 2])
    };
    if o.phases {
        use candle_nn::ModuleT;
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &device);
        let enc = moco_models::encoder(spec, settings, vb)?;
        let fwd = median_of(&mut || {
            enc.forward_t(&x1, true)?;
            Ok(())
        })?;
        let fwd_bwd = median_of(&mut || {
            enc.forward_t(&x1, true)?.sum_all()?.backward()?;
            Ok(())
        })?;
        println!(
            "phases: the query encoder's training-mode forward {fwd:.3} s, forward + backward {fwd_bwd:.3} s (medians of {})",
            o.steps
        );
    }
    // One timed unit: the frozen backbone's forward, or a training step.
    let mut run_once = || -> Result<()> {
        match &frozen {
            Some(enc) => {
                use moco_models::Backbone;
                enc.features(&x1, false)?;
            }
            None => {
                moco.train_step(&x1, &x2, 0.03, 0.999)?;
            }
        }
        Ok(())
    };
    let median = median_of(&mut run_once)?;
    let profile = match o.profile {
        false => None,
        true => {
            let ((), p) = moco_core::profile::scope(&device, || -> Result<()> {
                for _ in 0..o.steps {
                    run_once()?;
                }
                Ok(())
            })?;
            print_profile(&p, o.steps);
            Some(p)
        }
    };
    let ips = o.batch_size as f64 / median;
    let rss = peak_rss_mb();
    // The CPU convolution engine (gemm or onednn); "device" on other devices.
    let conv = if device.is_cpu() {
        settings.conv_engine.name()
    } else {
        "device"
    };
    let what = match o.extract {
        true => "feature extraction (eval mode)".to_string(),
        false => format!("MoCo {} step", if o.mlp { "v2" } else { "v1" }),
    } + if o.device.tf32 { " (TF32)" } else { "" };
    println!(
        "{what} {} width {} {}x{}x{} batch {} K {}: {:.1} images/s (median of {} steps, {:.3} s/step), peak RSS {}, convolutions: {conv}",
        o.arch, o.width, o.image_size, o.image_size, o.channels, o.batch_size, o.queue_size, ips, o.steps, median,
        rss.map_or("unknown".into(), |r| format!("{r:.0} MB"))
    );
    println!("kernels: {settings}");
    if o.json {
        println!(
            "{}",
            serde_json::json!({"images_per_s": ips, "peak_rss_mb": rss, "seconds_per_step": median, "steps": o.steps, "conv_engine": conv,
                "profile_ms_per_step": profile.as_ref().map(|p| profile_json(p, o.steps))})
        );
    }
    Ok(())
}

/// The profile as a table: each class's exclusive milliseconds per step, share of the profiled
/// step and timed regions per step, largest first.
fn print_profile(p: &moco_core::profile::Profile, steps: usize) {
    let per = |s: f64| 1e3 * s / steps as f64;
    let mut classes = p.classes.clone();
    classes.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    println!(
        "profile ({steps} steps, {:.1} ms per profiled step; each region synchronised):",
        per(p.total)
    );
    println!(
        "  {:<32} {:>10} {:>7} {:>10}",
        "class", "ms/step", "share", "calls/step"
    );
    let share = |s: f64| 100.0 * s / p.total.max(f64::MIN_POSITIVE);
    for c in &classes {
        println!(
            "  {:<32} {:>10.2} {:>6.1}% {:>10.1}",
            c.class,
            per(c.seconds),
            share(c.seconds),
            c.calls as f64 / steps as f64
        );
    }
    println!(
        "  {:<32} {:>10.2} {:>6.1}%",
        "untimed",
        per(p.untimed()),
        share(p.untimed())
    );
}

/// The profile as `{class: ms per step}`, with `untimed` and `total`.
fn profile_json(p: &moco_core::profile::Profile, steps: usize) -> serde_json::Value {
    let per = |s: f64| 1e3 * s / steps as f64;
    let mut m = serde_json::Map::new();
    for c in &p.classes {
        m.insert(c.class.to_string(), per(c.seconds).into());
    }
    m.insert("untimed".into(), per(p.untimed()).into());
    m.insert("total".into(), per(p.total).into());
    serde_json::Value::Object(m)
}
