//! `moco check-device`: one MoCo step on a device next to the same step on the CPU.

use anyhow::{bail, Result};
use moco_models::Settings;

/// One MoCo step on --device next to the same step on the CPU (same weights, queue, input):
/// loss and every updated tensor must agree within the tolerance.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// cuda, cuda:N or metal (cpu compares the CPU with itself).
    #[arg(long, default_value = "cuda")]
    pub device: String,
    #[arg(long, default_value = "resnet18-small")]
    pub arch: String,
    #[arg(long, default_value_t = 16)]
    pub width: usize,
    #[arg(long, default_value_t = 32)]
    pub image_size: usize,
    #[arg(long, default_value_t = 3)]
    pub channels: usize,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Largest relative difference allowed.
    #[arg(long, default_value_t = 1e-3)]
    pub tolerance: f64,
    /// Also check a data-parallel backend (nccl or tcp): the device step runs in a group of
    /// one process of it, whose collectives must change nothing.
    #[arg(long)]
    pub dist: Option<String>,
    /// Check SyncBN instead: one MoCo v3 step (SyncBN in the backbone and the heads) as two
    /// ranks sharing --device (threads joined over TCP, each with half the batch) against
    /// one CPU process on the whole batch.
    #[arg(long, conflicts_with = "dist")]
    pub sync_bn: bool,
    /// With --device cpu: run the device side on candle's generic ops (the ops CUDA and
    /// Metal run) instead of moco-rs's CPU kernels, and compare it with the kernels.
    #[arg(long)]
    pub generic: bool,
    /// Seed of the initial weights, the queue and the input batch.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl CheckArgs {
    /// Runs the check; `settings` are the CPU side's kernels (the device side's too, but with
    /// `--generic`).
    pub fn run(&self, settings: Settings) -> Result<()> {
        check_device(Check {
            a: self,
            device: super::device::parse(&self.device)?,
            settings,
        })
    }
}

/// The flags with the device opened and the kernel settings.
struct Check<'a> {
    a: &'a CheckArgs,
    device: candle_core::Device,
    settings: Settings,
}

impl Check<'_> {
    /// The device side's name in messages.
    fn side(&self) -> String {
        if self.a.generic {
            "the CPU's generic ops".into()
        } else {
            format!("{:?}", self.device)
        }
    }

    /// The device side's kernel settings: with `generic`, candle's generic ops; an error when
    /// `generic` is asked for off the CPU.
    fn device_settings(&self) -> Result<moco_models::Settings> {
        if !self.a.generic {
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
fn check_device(o: Check) -> Result<()> {
    use candle_core::{Device, Tensor};
    if o.a.sync_bn {
        return check_sync_bn(&o);
    }
    let group = |device: &Device| -> Result<Option<Box<dyn moco_core::Collective>>> {
        let Some(name) = &o.a.dist else {
            return Ok(None);
        };
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
            &o.a.arch,
            o.a.width,
            o.a.channels,
            o.a.image_size,
            None,
        )?,
        head: moco_models::HeadKind::Mlp { dim: 128 },
    };
    let config = moco_core::MocoConfig {
        queue_size: 4 * o.a.batch_size,
        batch_size: o.a.batch_size,
        seed: o.a.seed,
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
    print_settings(device_settings, o.settings);
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

/// Two standard normal CPU batches of the checked shape, drawn from `o.a.seed`: the same views on
/// every run, so that a check's figures repeat.
fn seeded_views(o: &Check) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
    use rand::SeedableRng;
    let shape =
        candle_core::Shape::from((o.a.batch_size, o.a.channels, o.a.image_size, o.a.image_size));
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.a.seed ^ 0x7669_6577); // "view"
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
    o: &Check,
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
        o.side(), o.a.arch, o.a.image_size, o.a.image_size, o.a.channels, o.a.batch_size,
        cpu_state.len(), worst.1, worst.0, o.a.tolerance
    );
    if worst.1.is_nan() || worst.1 > o.a.tolerance {
        bail!(
            "`{}` differs by {:.2e} (relative) between {} and the CPU, above the tolerance {:.0e}",
            worst.0,
            worst.1,
            o.side(),
            o.a.tolerance
        );
    }
    Ok(())
}

/// `moco check-device --sync-bn`: one MoCo v3 step (in-batch loss, v3 projector and predictor,
/// SyncBN) as two ranks on `--device` (threads joined by a TCP group, each with half of the
/// batch; on a GPU both share it) against one CPU process on the whole batch, from the same
/// seeded weights. With SyncBN the two are the same computation: every BatchNorm of the
/// backbone, projector and predictor normalises with the whole batch's statistics.
fn check_sync_bn(o: &Check) -> Result<()> {
    use candle_core::{Device, Tensor};
    const RANKS: usize = 2;
    if o.a.batch_size % RANKS != 0 {
        bail!(
            "--batch-size {} does not split into {RANKS} ranks",
            o.a.batch_size
        );
    }
    let backbone = moco_models::BackboneConfig::for_input(
        &o.a.arch,
        o.a.width,
        o.a.channels,
        o.a.image_size,
        None,
    )?;
    let (dim, hidden) = (16, 64);
    let spec = moco_models::EncoderSpec {
        backbone,
        head: moco_models::HeadKind::V3 { hidden, dim },
    };
    let last_bn = matches!(backbone, moco_models::BackboneConfig::Vit(_));
    let config = moco_core::MocoConfig {
        batch_size: o.a.batch_size,
        dim,
        mlp_dim: Some(hidden),
        sync_bn: true,
        seed: o.a.seed,
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
    let per_rank = o.a.batch_size / RANKS;
    let device = o.device.clone();
    let (a, b) = (x1.clone(), x2.clone());
    let on_rank = step.clone();
    let device_settings = o.device_settings()?;
    print_settings(device_settings, o.settings);
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

/// The kernels of both sides, once when they are the same.
fn print_settings(device: Settings, cpu: Settings) {
    if device == cpu {
        println!("kernels: {cpu}");
    } else {
        println!("kernels: device side {device}; CPU side {cpu}");
    }
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-6)
}
