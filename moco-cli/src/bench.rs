//! `moco bench`: throughput measurements.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use moco_data::augment::TwoCrop;
use moco_data::datasets::{Dataset, Split, Subset};
use moco_data::loader::{Loader, LoaderConfig, Views};

/// `moco bench data`: images/s of the two-crop pipeline (decode, augment twice, batch), or with
/// preset `eval` of the evaluation transform (decode, resize, center crop, batch).
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

/// Options of `moco bench step`.
#[derive(Debug)]
pub struct StepOptions {
    pub arch: String,
    pub patch_size: Option<usize>,
    pub width: usize,
    pub image_size: usize,
    pub channels: usize,
    pub batch_size: usize,
    pub queue_size: usize,
    pub mlp: bool,
    pub steps: usize,
    pub device: candle_core::Device,
    pub json: bool,
    /// Time the frozen backbone's eval-mode forward (feature extraction) instead of a step.
    pub extract: bool,
    /// TF32 is on (set by `device::parse_with_tf32`); only labels the figures.
    pub tf32: bool,
    /// Also time the encoder's forward, and forward + backward, on their own.
    pub phases: bool,
    /// The kernel settings (printed with the figures).
    pub settings: moco_models::Settings,
}

/// `moco bench step`: full MoCo training steps (query forward+backward, key forward with
/// shuffle-BN, SGD, momentum update, enqueue) on random input, through `Moco::train_step`, the
/// code path of `moco pretrain`.
pub fn step(o: StepOptions) -> Result<()> {
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
    let settings = o.settings;
    let mut moco = moco_core::Moco::new(config, &o.device, |vb| {
        moco_models::encoder(spec, settings, vb)
    })?
    .with_kernels(settings.kernels);
    let shape = (o.batch_size, o.channels, o.image_size, o.image_size);
    let x1 = Tensor::randn(0f32, 1., shape, &o.device)?;
    let x2 = Tensor::randn(0f32, 1., shape, &o.device)?;
    // Feature extraction: the query encoder's weights as plain tensors (no autograd), as
    // `moco knn`, `linear-eval` and `extract` load them, pooled features in eval mode.
    let frozen = match o.extract {
        true => {
            let tensors = moco.encoders().query_tensors().into_iter().collect();
            let vb =
                candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, &o.device);
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
            o.device.synchronize()?;
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
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &o.device);
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
    let median = median_of(&mut || {
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
    })?;
    let ips = o.batch_size as f64 / median;
    let rss = peak_rss_mb();
    // The CPU convolution engine (gemm or onednn); "device" on other devices.
    let conv = if o.device.is_cpu() {
        settings.conv_engine.name()
    } else {
        "device"
    };
    let what = match o.extract {
        true => "feature extraction (eval mode)".to_string(),
        false => format!("MoCo {} step", if o.mlp { "v2" } else { "v1" }),
    } + if o.tf32 { " (TF32)" } else { "" };
    println!(
        "{what} {} width {} {}x{}x{} batch {} K {}: {:.1} images/s (median of {} steps, {:.3} s/step), peak RSS {}, convolutions: {conv}",
        o.arch, o.width, o.image_size, o.image_size, o.channels, o.batch_size, o.queue_size, ips, o.steps, median,
        rss.map_or("unknown".into(), |r| format!("{r:.0} MB"))
    );
    println!("kernels: {settings}");
    if o.json {
        println!(
            "{}",
            serde_json::json!({"images_per_s": ips, "peak_rss_mb": rss, "seconds_per_step": median, "steps": o.steps, "conv_engine": conv})
        );
    }
    Ok(())
}

/// Options of `moco check-device`.
#[derive(Debug)]
pub struct CheckOptions {
    pub arch: String,
    pub width: usize,
    pub image_size: usize,
    pub channels: usize,
    pub batch_size: usize,
    pub device: candle_core::Device,
    pub tolerance: f64,
    pub dist: Option<String>,
    pub sync_bn: bool,
    /// The device side runs on the CPU through candle's generic ops (CUDA's and Metal's path)
    /// instead of moco-rs's CPU kernels.
    pub generic: bool,
    /// Seed of the initial weights, the queue and the two views.
    pub seed: u64,
    /// The kernel settings of the CPU side (the device side's too, but with `generic`).
    pub settings: moco_models::Settings,
}

impl CheckOptions {
    /// The device side's name in messages.
    fn side(&self) -> String {
        if self.generic {
            "the CPU's generic ops".into()
        } else {
            format!("{:?}", self.device)
        }
    }

    /// The device side's kernel settings: with `generic`, candle's generic ops; an error when
    /// `generic` is asked for off the CPU.
    fn device_settings(&self) -> Result<moco_models::Settings> {
        if !self.generic {
            return Ok(self.settings);
        }
        if !self.device.is_cpu() {
            bail!("--generic runs candle's generic ops on the CPU: it needs --device cpu");
        }
        Ok(moco_models::Settings {
            kernels: moco_core::Kernels::Generic,
            ..self.settings
        })
    }
}

/// `moco check-device`: one MoCo step (v2 head, shuffle-BN, SGD, momentum update, enqueue) on
/// `--device` and the same step on the CPU, from the same seeded weights, queue and input;
/// compares the loss and every updated tensor (query and key encoders, queue, optimizer state).
/// Fails when the largest difference, relative to the tensor's scale, exceeds the tolerance.
/// With `dist`, the device side runs in a one-process group of that backend (NCCL on one GPU):
/// its all-reduce, all-gather and broadcast must return their input exactly, and the step must
/// still match the CPU.
pub fn check_device(o: CheckOptions) -> Result<()> {
    use candle_core::{Device, Tensor};
    if o.sync_bn {
        return check_sync_bn(&o);
    }
    let group = |device: &Device| -> Result<Option<Box<dyn moco_core::Collective>>> {
        let Some(name) = &o.dist else { return Ok(None) };
        let backend =
            moco_core::dist::Backend::parse(name).map_err(|e| anyhow::anyhow!("--dist {e}"))?;
        let config = moco_core::DistConfig {
            backend,
            ..moco_core::DistConfig::new(
                1,
                0,
                moco_core::dist::fresh_init_file(&std::env::temp_dir()),
            )
        };
        let comm = moco_core::dist::init(&config, device)
            .map_err(|e| anyhow::anyhow!("--dist {name}: {e}"))?;
        let x = Tensor::randn(0f32, 1., (3, 5), device)?;
        for (op, y) in [
            ("all_reduce", comm.all_reduce_sum(&x)?),
            ("all_gather", comm.all_gather(&x)?),
            ("broadcast", comm.broadcast(&x, 0)?),
        ] {
            let same =
                y.dims() == x.dims() && (&y - &x)?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0;
            if !same {
                bail!("--dist {name}: {op} in a group of one changed its input");
            }
        }
        println!("{name}: all_reduce, all_gather and broadcast in a group of one on {device:?} return their input");
        Ok(Some(comm))
    };
    let spec = moco_models::EncoderSpec {
        backbone: moco_models::BackboneConfig::for_input(
            &o.arch,
            o.width,
            o.channels,
            o.image_size,
            None,
        )?,
        head: moco_models::HeadKind::Mlp { dim: 128 },
    };
    let config = moco_core::MocoConfig {
        queue_size: 4 * o.batch_size,
        batch_size: o.batch_size,
        seed: o.seed,
        ..moco_core::MocoConfig::v2()
    };
    let (x1, x2) = seeded_views(&o)?;
    let run = |device: &Device,
               in_group: bool,
               settings: moco_models::Settings|
     -> Result<(f32, std::collections::BTreeMap<String, Tensor>)> {
        // Same seed: the same initial weights and queue on every device.
        let mut moco = moco_core::Moco::new(config.clone(), device, |vb| {
            moco_models::encoder(spec, settings, vb)
        })?
        .with_kernels(settings.kernels);
        if in_group {
            if let Some(comm) = group(device)? {
                moco = moco.with_collective(comm)?;
            }
        }
        one_step(&mut moco, device, (&x1, &x2), 0.03)
    };
    let device_settings = o.device_settings()?;
    println!("device side: {device_settings}; CPU side: {}", o.settings);
    let (loss_dev, dev_state) = run(&o.device, true, device_settings)?;
    let (loss_cpu, cpu_state) = run(&Device::Cpu, false, o.settings)?;
    compare(
        &o,
        "one MoCo v2 step",
        1e-6,
        (loss_dev, &dev_state),
        (loss_cpu, &cpu_state),
    )
}

/// Two standard normal CPU batches of the checked shape, drawn from `o.seed`: the same views on
/// every run, so that a check's figures repeat.
fn seeded_views(o: &CheckOptions) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
    use rand::SeedableRng;
    let shape = candle_core::Shape::from((o.batch_size, o.channels, o.image_size, o.image_size));
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed ^ 0x7669_6577); // "view"
    let mut draw = || {
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        };
        let v = moco_core::init::sample(init, &shape, &mut rng);
        candle_core::Tensor::from_vec(v, &shape, &candle_core::Device::Cpu)
    };
    Ok((draw()?, draw()?))
}

/// One training step of `moco` on `device` (lr `lr`, momentum 0.99) on CPU views moved there:
/// the loss and every state tensor, back on the CPU in float32.
fn one_step(
    moco: &mut moco_core::Moco<moco_models::Encoder>,
    device: &candle_core::Device,
    (x1, x2): (&candle_core::Tensor, &candle_core::Tensor),
    lr: f64,
) -> Result<(f32, std::collections::BTreeMap<String, candle_core::Tensor>)> {
    use candle_core::{DType, Device};
    let out = moco.train_step(&x1.to_device(device)?, &x2.to_device(device)?, lr, 0.99)?;
    let state = moco
        .state_tensors()?
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    Ok((out.loss, state))
}

/// Compares a step's loss and state on the device with the CPU's: prints the largest
/// difference relative to each tensor's scale (its largest magnitude, at least `floor`) and
/// fails above the tolerance.
fn compare(
    o: &CheckOptions,
    what: &str,
    floor: f32,
    (loss_dev, dev_state): (
        f32,
        &std::collections::BTreeMap<String, candle_core::Tensor>,
    ),
    (loss_cpu, cpu_state): (
        f32,
        &std::collections::BTreeMap<String, candle_core::Tensor>,
    ),
) -> Result<()> {
    let mut worst = (String::from("loss"), rel(loss_dev as f64, loss_cpu as f64));
    for (name, c) in cpu_state {
        let d = dev_state
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("`{name}` missing from the run on {}", o.side()))?;
        let scale = c.abs()?.max_all()?.to_scalar::<f32>()?.max(floor) as f64;
        let diff = (d - c)?.abs()?.max_all()?.to_scalar::<f32>()? as f64 / scale;
        if diff > worst.1 || diff.is_nan() {
            worst = (name.clone(), diff);
        }
    }
    println!(
        "{what} on {} vs the CPU ({} {}x{}x{}, batch {}): loss {loss_dev:.6} vs {loss_cpu:.6}; {} tensors compared, largest relative difference {:.2e} in `{}` (tolerance {:.0e})",
        o.side(), o.arch, o.image_size, o.image_size, o.channels, o.batch_size,
        cpu_state.len(), worst.1, worst.0, o.tolerance
    );
    if worst.1.is_nan() || worst.1 > o.tolerance {
        bail!(
            "`{}` differs by {:.2e} (relative) between {} and the CPU, above the tolerance {:.0e}",
            worst.0,
            worst.1,
            o.side(),
            o.tolerance
        );
    }
    Ok(())
}

/// `moco check-device --sync-bn`: one MoCo v3 step (in-batch loss, v3 projector and predictor,
/// SyncBN) as two ranks on `--device` (threads joined by a TCP group, each with half of the
/// batch; on a GPU both share it) against one CPU process on the whole batch, from the same
/// seeded weights. With SyncBN the two are the same computation: every BatchNorm of the
/// backbone, projector and predictor normalises with the whole batch's statistics.
fn check_sync_bn(o: &CheckOptions) -> Result<()> {
    use candle_core::{Device, Tensor};
    const RANKS: usize = 2;
    if o.batch_size % RANKS != 0 {
        bail!(
            "--batch-size {} does not split into {RANKS} ranks",
            o.batch_size
        );
    }
    let backbone =
        moco_models::BackboneConfig::for_input(&o.arch, o.width, o.channels, o.image_size, None)?;
    let (dim, hidden) = (16, 64);
    let spec = moco_models::EncoderSpec {
        backbone,
        head: moco_models::HeadKind::V3 { hidden, dim },
    };
    let last_bn = matches!(backbone, moco_models::BackboneConfig::Vit(_));
    let config = moco_core::MocoConfig {
        batch_size: o.batch_size,
        dim,
        mlp_dim: Some(hidden),
        sync_bn: true,
        seed: o.seed,
        ..moco_core::MocoConfig::v3()
    };
    let (x1, x2) = seeded_views(o)?;
    type State = std::collections::BTreeMap<String, Tensor>;
    let step = move |device: &Device,
                     settings: moco_models::Settings,
                     comm: Option<Box<dyn moco_core::Collective>>,
                     x1: &Tensor,
                     x2: &Tensor|
          -> Result<(f32, State)> {
        let mut moco = moco_core::Moco::new(config.clone(), device, |vb| {
            moco_models::encoder(spec, settings, vb)
        })?
        .with_kernels(settings.kernels)
        .with_predictor(|vb| {
            moco_models::head::v3_mlp(2, dim, hidden, dim, last_bn, settings, vb)
        })?;
        if let Some(comm) = comm {
            moco = moco.with_collective(comm)?;
        }
        one_step(&mut moco, device, (x1, x2), 0.1)
    };
    let per_rank = o.batch_size / RANKS;
    let device = o.device.clone();
    let (a, b) = (x1.clone(), x2.clone());
    let on_rank = step.clone();
    let device_settings = o.device_settings()?;
    println!("device side: {device_settings}; CPU side: {}", o.settings);
    let mut ranks = moco_core::dist::on_threads(RANKS, move |comm| {
        let r = comm.rank();
        let mine = |x: &Tensor| x.narrow(0, r * per_rank, per_rank);
        (|| on_rank(&device, device_settings, Some(comm), &mine(&a)?, &mine(&b)?))()
            .map_err(|e| format!("rank {r}: {e:#}"))
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?
    .into_iter()
    .collect::<std::result::Result<Vec<_>, String>>()
    .map_err(|e| anyhow::anyhow!(e))?;
    let (loss_dev, dev_state) = ranks.swap_remove(0);
    let (loss_cpu, cpu_state) = step(&Device::Cpu, o.settings, None, &x1, &x2)?;
    compare(
        o,
        "one MoCo v3 step with SyncBN over 2 ranks",
        // Some tensors are zero but for rounding (the predictor's first BatchNorm sees
        // zero-mean inputs: the projector ends in a BatchNorm, the predictor's first layer has
        // no bias): their scale counts as 1e-2.
        1e-2,
        (loss_dev, &dev_state),
        (loss_cpu, &cpu_state),
    )
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-6)
}
