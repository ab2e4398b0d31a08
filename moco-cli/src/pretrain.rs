//! `moco pretrain`: MoCo pretraining with resumable run directories.
//!
//! A run directory holds `config.json` (the fully resolved configuration), `metrics.jsonl`
//! (one JSON object per logging step and per kNN evaluation) and `checkpoint-last.safetensors`:
//! the query and key encoders (`encoder_q.*`, `encoder_k.*`), the queue (`queue`, `queue_ptr`),
//! the optimizer's momentum buffers (`optimizer.momentum_buffer.*`) and, in the metadata, the step
//! counter and configuration. Everything a resume needs is in that one file, written atomically
//! (temporary file + rename), so a kill at any moment leaves the previous complete checkpoint.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use moco_core::dist::{Backend, Collective, DistConfig};
use moco_core::{LossKind, Moco, MocoConfig};
use moco_data::augment::{self, TwoCrop};
use moco_data::datasets::{Dataset, Split};
use moco_data::loader::{Loader, LoaderConfig, Views};
use moco_eval::features;
use moco_eval::knn::{self, KnnConfig};
use moco_models::{BackboneConfig, Encoder, EncoderSpec, HeadKind, ResNetConfig, VitConfig};
use serde::{Deserialize, Serialize};

use crate::data;
use crate::progress::bar;

/// Everything that defines a pretraining run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// MoCo's settings (queue, momentum, loss, optimizer, schedule, augmentation, seed).
    pub moco: MocoConfig,
    /// Architecture (`resnet18-small`, `resnet50`, ...).
    pub arch: String,
    /// Width of the first stage (ResNets).
    pub width: usize,
    /// Start the last BatchNorm of every residual block at zero (torchvision's
    /// `zero_init_residual`, which MoCo v3's ResNets use; ResNets only).
    pub zero_init_residual: bool,
    /// Patch size (ViTs; default: the architecture's, 16).
    pub patch_size: Option<usize>,
    /// Freeze the ViT's patch projection at its initialisation (MoCo v3's `--stop-grad-conv1`).
    pub stop_grad_conv1: bool,
    /// Dataset name.
    pub dataset: String,
    /// Dataset folder.
    pub data_dir: Option<PathBuf>,
    /// Crop size of the augmentations (default: the dataset's native size, 224 for folders).
    pub image_size: Option<usize>,
    /// Train on this many images only (a seeded random subset).
    pub subset: Option<usize>,
    /// Data worker threads.
    pub workers: usize,
    /// kNN monitor every N epochs (0: only at the end). Unset: every epoch, except on `folder`
    /// datasets (ImageNet-sized: the first process would extract the whole training set's
    /// features every epoch while the others wait), only at the end.
    pub knn_every: Option<usize>,
    /// kNN neighbours.
    pub knn_k: usize,
    /// kNN temperature.
    pub knn_t: f64,
    /// Metrics line every N steps.
    pub log_every: usize,
    /// Checkpoint every N steps (besides every epoch end; 0: epoch ends only).
    pub checkpoint_every: usize,
    /// Also keep the checkpoint of every N-th epoch as `checkpoint-epoch-NNNN.safetensors`
    /// (0: only `checkpoint-last`; the official `main_moco.py` keeps every epoch's).
    pub keep_every: usize,
    /// Stop after this many steps in total (a budget shorter than the epochs).
    pub max_steps: Option<u64>,
}

impl Default for RunConfig {
    /// The first-run default: a small ResNet-18 (width 8) on the embedded Fashion-MNIST subset,
    /// the CIFAR demo's recipe (K 2048 for the smaller batch) with MoCo v1's crops (scale 0.2-1;
    /// the demo's 0.08 is too small at 28x28), about 15 seconds on two CPU cores.
    fn default() -> Self {
        Self {
            moco: MocoConfig {
                preset: "default".into(),
                queue_size: 2048,
                batch_size: 64,
                epochs: 3,
                lr: 0.06,
                augmentation: moco_core::AugmentationPreset::V1,
                bn_splits: 4,
                ..MocoConfig::cifar()
            },
            arch: "resnet18-small".into(),
            width: 8,
            zero_init_residual: false,
            patch_size: None,
            stop_grad_conv1: false,
            dataset: "default".into(),
            data_dir: None,
            image_size: None,
            subset: None,
            workers: 2,
            knn_every: None,
            knn_k: 200,
            knn_t: 0.1,
            log_every: 10,
            checkpoint_every: 50,
            keep_every: 0,
            max_steps: None,
        }
    }
}

impl RunConfig {
    /// The encoder this run trains, for `channels`-channel crops of `crop` x `crop` pixels.
    pub fn spec(&self, channels: usize, crop: usize) -> Result<EncoderSpec> {
        let backbone =
            BackboneConfig::for_input(&self.arch, self.width, channels, crop, self.patch_size)
                .context("--arch / --patch-size / --image-size")?;
        let backbone = match backbone {
            BackboneConfig::ResNet(r) => BackboneConfig::ResNet(ResNetConfig {
                bn_splits: self.moco.bn_splits,
                zero_init_residual: self.zero_init_residual,
                ..r
            }),
            BackboneConfig::Vit(v) => BackboneConfig::Vit(VitConfig {
                stop_grad_patch_embed: self.stop_grad_conv1,
                ..v
            }),
        };
        let head = if let Some(hidden) = self.moco.mlp_dim {
            HeadKind::V3 {
                hidden,
                dim: self.moco.dim,
            }
        } else if self.moco.mlp {
            HeadKind::Mlp { dim: self.moco.dim }
        } else {
            HeadKind::Linear { dim: self.moco.dim }
        };
        Ok(EncoderSpec { backbone, head })
    }
}

/// Data-parallel flags of `moco pretrain` (and what `moco launch` sets for each process).
#[derive(Debug, Clone, clap::Args)]
pub struct DistArgs {
    /// Processes of a data-parallel run (one per GPU); --batch-size is the global batch, split
    /// equally between them.
    #[arg(long, default_value_t = 1)]
    pub world_size: usize,
    /// This process's rank, 0..world-size (rank 0 writes the run folder).
    #[arg(long, default_value_t = 0)]
    pub rank: usize,
    /// This process's GPU on its machine (--device cuda becomes cuda:LOCAL_RANK; default: rank).
    #[arg(long)]
    pub local_rank: Option<usize>,
    /// Rendezvous file: rank 0 writes how to reach it, the others wait for it (on a shared file
    /// system when the processes are on several machines). Must not exist before the run.
    #[arg(long)]
    pub dist_init: Option<PathBuf>,
    /// nccl (GPUs; the default with --device cuda) or tcp (CPU processes).
    #[arg(long)]
    pub dist_backend: Option<String>,
    /// tcp: the address rank 0 listens on; for several machines, one of rank 0's addresses that
    /// the others reach (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub dist_addr: String,
}

impl DistArgs {
    /// The device string for this process: `cuda` becomes `cuda:LOCAL_RANK` in a multi-process run.
    pub fn device(&self, device: &str) -> String {
        if self.world_size > 1 && device == "cuda" {
            format!("cuda:{}", self.local_rank.unwrap_or(self.rank))
        } else {
            device.to_string()
        }
    }

    /// Joins the process group. World size 1 without --dist-backend: plain single-process
    /// training; with it, a group of one (which checks the backend: the run must not change).
    pub fn join(&self, device: &Device) -> Result<Box<dyn Collective>> {
        if self.world_size == 1 && self.dist_backend.is_none() {
            return Ok(Box::new(moco_core::SingleProcess));
        }
        let backend = match self.dist_backend.as_deref() {
            Some(b) => Backend::parse(b).map_err(|e| anyhow::anyhow!("--dist-backend {e}"))?,
            None if device.is_cuda() => Backend::Nccl,
            None => Backend::Tcp,
        };
        if backend == Backend::Nccl && !device.is_cuda() {
            bail!("--dist-backend nccl needs --device cuda (use tcp for CPU processes)");
        }
        let init_file = match &self.dist_init {
            Some(f) => f.clone(),
            None if self.world_size > 1 => {
                bail!(
                    "--world-size {}: give --dist-init FILE (or start the run with `moco launch`)",
                    self.world_size
                )
            }
            None => moco_core::dist::fresh_init_file(&std::env::temp_dir()),
        };
        let config = DistConfig {
            backend,
            listen: self.dist_addr.clone(),
            ..DistConfig::new(self.world_size, self.rank, init_file)
        };
        moco_core::dist::init(&config, device)
            .map_err(|e| anyhow::anyhow!("--world-size/--rank/--dist-init: {e}"))
    }
}

/// Command-line overrides (each `None` leaves the value from the preset / config file).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub preset: Option<String>,
    pub dataset: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub arch: Option<String>,
    pub width: Option<usize>,
    pub epochs: Option<usize>,
    pub batch_size: Option<usize>,
    pub lr: Option<f64>,
    pub queue_size: Option<usize>,
    pub moco_dim: Option<usize>,
    pub moco_m: Option<f64>,
    pub temperature: Option<f64>,
    pub mlp: bool,
    pub aug_plus: bool,
    pub cos: bool,
    pub symmetric: bool,
    pub moco_mlp_dim: Option<usize>,
    pub warmup_epochs: Option<f64>,
    pub optimizer: Option<String>,
    pub bn_splits: Option<usize>,
    pub sync_bn: Option<bool>,
    pub zero_init_residual: Option<bool>,
    pub workers: Option<usize>,
    pub seed: Option<u64>,
    pub knn_every: Option<usize>,
    pub image_size: Option<usize>,
    pub subset: Option<usize>,
    pub max_steps: Option<u64>,
    pub checkpoint_every: Option<usize>,
    pub keep_every: Option<usize>,
    pub log_every: Option<usize>,
    pub patch_size: Option<usize>,
    pub stop_grad_conv1: bool,
}

/// Defaults, then the config file, then the preset, then the flags.
pub fn resolve(config_file: Option<&Path>, o: &Overrides) -> Result<RunConfig> {
    let mut c = match config_file {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("--config {}", p.display()))?;
            toml::from_str::<RunConfig>(&text)
                .with_context(|| format!("--config {}", p.display()))?
        }
        None => RunConfig::default(),
    };
    if let Some(p) = &o.preset {
        c.moco = MocoConfig {
            seed: c.moco.seed,
            ..MocoConfig::preset(p).context("--preset")?
        };
    }
    let m = &mut c.moco;
    macro_rules! set {
        ($dst:expr, $src:expr) => {
            if let Some(v) = $src.clone() {
                $dst = v;
            }
        };
    }
    set!(m.epochs, o.epochs);
    set!(m.batch_size, o.batch_size);
    set!(m.lr, o.lr);
    set!(m.queue_size, o.queue_size);
    set!(m.dim, o.moco_dim);
    set!(m.momentum, o.moco_m);
    set!(m.temperature, o.temperature);
    set!(m.bn_splits, o.bn_splits);
    set!(m.sync_bn, o.sync_bn);
    set!(m.seed, o.seed);
    if o.mlp {
        m.mlp = true;
    }
    if o.aug_plus {
        m.augmentation = moco_core::AugmentationPreset::V2;
    }
    if o.cos {
        m.lr_schedule = moco_core::LrSchedule::cosine();
    }
    if o.symmetric {
        if m.loss == LossKind::InBatch {
            bail!("--symmetric: the in-batch loss of this configuration (MoCo v3) is symmetric already and has no queue");
        }
        m.loss = LossKind::SymmetricQueue;
    }
    if o.moco_mlp_dim.is_some() {
        m.mlp_dim = o.moco_mlp_dim;
    }
    set!(m.lr_schedule.warmup_epochs, o.warmup_epochs);
    match o.optimizer.as_deref() {
        None => {}
        Some("sgd") => {
            m.optimizer = moco_core::OptimizerKind::Sgd;
            m.lars = None;
        }
        Some("lars") => {
            m.optimizer = moco_core::OptimizerKind::Sgd;
            m.lars = Some(m.lars.unwrap_or(0.001));
        }
        Some("adamw") => {
            m.optimizer = moco_core::OptimizerKind::AdamW;
            m.lars = None;
        }
        Some(other) => bail!("--optimizer {other}: expected `sgd`, `lars` or `adamw`"),
    }
    if o.dataset.is_some() && o.data_dir.is_none() && o.dataset.as_deref() != Some("default") {
        c.data_dir = None;
    }
    set!(c.dataset, o.dataset);
    if o.data_dir.is_some() {
        c.data_dir = o.data_dir.clone();
    }
    set!(c.arch, o.arch);
    set!(c.width, o.width);
    set!(c.workers, o.workers);
    if o.knn_every.is_some() {
        c.knn_every = o.knn_every;
    }
    set!(c.log_every, o.log_every);
    set!(c.checkpoint_every, o.checkpoint_every);
    set!(c.keep_every, o.keep_every);
    if o.image_size.is_some() {
        c.image_size = o.image_size;
    }
    if o.subset.is_some() {
        c.subset = o.subset;
    }
    if o.max_steps.is_some() {
        c.max_steps = o.max_steps;
    }
    c.moco.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let (is_vit, conv_stem) = match BackboneConfig::from_arch(&c.arch).context("--arch")? {
        BackboneConfig::Vit(v) => (true, v.conv_stem),
        BackboneConfig::ResNet(_) => (false, false),
    };
    if o.patch_size.is_some() {
        c.patch_size = o.patch_size;
    }
    if o.stop_grad_conv1 {
        c.stop_grad_conv1 = true;
    }
    if is_vit && !conv_stem && o.preset.as_deref() == Some("v3-vit") {
        // MoCo v3's ViT recipe freezes the linear patch projection (`--stop-grad-conv1`); the
        // convolutional stem of `vit_conv_*` trains (the official flag has no effect on it).
        c.stop_grad_conv1 = true;
    }
    if !is_vit && o.preset.as_deref() == Some("v3") {
        // MoCo v3 builds its ResNets with `zero_init_residual=True`.
        c.zero_init_residual = true;
    }
    set!(c.zero_init_residual, o.zero_init_residual);
    if is_vit && c.zero_init_residual {
        bail!("--zero-init-residual applies to ResNets, not {}", c.arch);
    }
    if !is_vit && (c.patch_size.is_some() || c.stop_grad_conv1) {
        bail!(
            "--patch-size and --stop-grad-conv1 apply to ViTs (vit_tiny, vit_small, vit_base, vit_conv_*), not {}",
            c.arch
        );
    }
    if conv_stem && c.stop_grad_conv1 {
        bail!(
            "--stop-grad-conv1 freezes a ViT's linear patch projection; {} embeds patches with a convolutional stem, which trains",
            c.arch
        );
    }
    if c.width == 0 || c.log_every == 0 {
        bail!("--width and the logging interval must be positive");
    }
    Ok(c)
}

fn aug_name(a: moco_core::AugmentationPreset) -> &'static str {
    match a {
        moco_core::AugmentationPreset::V1 => "v1",
        moco_core::AugmentationPreset::V2 => "v2",
        moco_core::AugmentationPreset::Cifar => "cifar",
        moco_core::AugmentationPreset::V3 => "v3",
    }
}

struct Metrics {
    file: std::fs::File,
}

impl Metrics {
    /// Opens `metrics.jsonl`, dropping lines past `step` (left by a killed run).
    fn open(path: &Path, step: u64) -> Result<Self> {
        let kept: Vec<String> = match std::fs::read_to_string(path) {
            Ok(text) => text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= step)
                })
                .map(String::from)
                .collect(),
            Err(_) => vec![],
        };
        let mut body = kept.join("\n");
        if !body.is_empty() {
            body.push('\n');
        }
        moco_core::io::write_atomic(path, body.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("{}", path.display()))?;
        Ok(Self { file })
    }

    fn write(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}")?;
        Ok(())
    }
}

/// The kNN monitor on the query encoder's current weights.
fn knn_top1(
    moco: &Moco<Encoder>,
    train: &Arc<data::Data>,
    test: &Arc<data::Data>,
    size: Option<usize>,
    native: usize,
    c: &RunConfig,
    device: &Device,
    settings: moco_models::Settings,
) -> Result<(f64, f64)> {
    // The weights as plain tensors (sharing the variables' storage): the eval-mode forward then
    // records no autograd graph, as `moco knn` on a saved checkpoint.
    let tensors = moco.encoders().query_tensors().into_iter().collect();
    let vb = candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, device);
    let enc = moco_models::encoder(*moco.query().spec(), settings, vb)?;
    let f = |d: &Arc<data::Data>| {
        features::extract(
            &enc,
            d.clone(),
            augment::eval(size, native, d.normalize.clone()),
            features::ExtractConfig {
                batch_size: 256,
                workers: c.workers,
                l2: false,
            },
            device,
            |_, _| {},
        )
    };
    let (ftr, fte) = (f(train)?, f(test)?);
    let r = knn::evaluate(
        &ftr,
        &fte,
        train.classes().len(),
        &KnnConfig {
            k: c.knn_k,
            t: c.knn_t,
            ..Default::default()
        },
    )?;
    Ok((r.top1, r.top5))
}

/// Runs (or resumes) a pretraining run in `out`: one process, or one rank of a data-parallel
/// run (`comm`), where rank 0 alone writes the run folder and evaluates.
pub fn run(
    c: RunConfig,
    out: &Path,
    resume: bool,
    device: &Device,
    settings: moco_models::Settings,
    quiet: bool,
    comm: Box<dyn Collective>,
) -> Result<()> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let lead = rank == 0;
    let quiet = quiet || !lead;
    let ckpt = out.join("checkpoint-last.safetensors");
    let config_path = out.join("config.json");
    let c = if resume {
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("--resume: no run to resume in {}", out.display()))?;
        let saved: RunConfig =
            serde_json::from_str(&text).with_context(|| format!("{}", config_path.display()))?;
        // A resumed run keeps its saved configuration; only the step budget may change.
        let mut asked = c.clone();
        asked.max_steps = saved.max_steps;
        if asked != saved && !quiet {
            eprintln!("note: --resume continues with the configuration saved in {} (other flags are ignored)", config_path.display());
        }
        RunConfig {
            max_steps: c.max_steps,
            ..saved
        }
    } else {
        if ckpt.exists() {
            bail!(
                "--out {}: a run is already there; pass --resume to continue it, or another --out",
                out.display()
            );
        }
        c
    };
    std::fs::create_dir_all(out).with_context(|| format!("--out {}", out.display()))?;

    let train = Arc::new(data::open(
        &c.dataset,
        c.data_dir.as_deref(),
        Split::Train,
        false,
    )?);
    let test = Arc::new(data::open(
        &c.dataset,
        c.data_dir.as_deref(),
        Split::Test,
        false,
    )?);
    let native = train.native_size.unwrap_or(224);
    let size = c.image_size.or(if train.native_size.is_none() {
        Some(224)
    } else {
        None
    });
    let crop = size.unwrap_or(native);
    let spec = c.spec(train.channels(), crop)?;
    let pretrain_set: Arc<dyn Dataset> = match c.subset {
        Some(n) => Arc::new(moco_data::datasets::Subset::random(
            train.clone(),
            n,
            c.moco.seed,
        )?),
        None => train.clone(),
    };
    let views = Views::Two(TwoCrop::preset(
        aug_name(c.moco.augmentation),
        crop,
        train.normalize.clone(),
    )?);
    let lc = LoaderConfig {
        batch_size: c.moco.batch_size,
        shuffle: true,
        drop_last: true,
        workers: c.workers,
        prefetch: 2,
        seed: c.moco.seed,
    };
    let loader = Loader::new(Arc::new(pretrain_set), views, lc)?
        .shard(rank, world)
        .context("--batch-size / --world-size")?;
    let ipe = loader.batches_per_epoch();
    let local_batch = c.moco.batch_size / world;
    if world > 1 && c.moco.sync_bn && c.moco.bn_splits > 1 {
        bail!(
            "--bn-splits {}: BatchNorm splits emulate several devices on one, and this data-parallel run synchronises BatchNorm over its processes (--sync-bn, on in the v3 presets): drop --bn-splits or pass --sync-bn false",
            c.moco.bn_splits
        );
    }
    if local_batch % c.moco.bn_splits.max(1) != 0 {
        bail!(
            "--bn-splits {}: each process's batch ({local_batch}) must be a multiple of it",
            c.moco.bn_splits
        );
    }

    let mut moco = Moco::new(c.moco.clone(), device, |vb| {
        moco_models::encoder(spec, settings, vb)
    })?
    .with_kernels(settings.kernels);
    if let Some(hidden) = c.moco.mlp_dim {
        // MoCo v3: a predictor after the query encoder, trained with it, never averaged. Its
        // last layer has a BatchNorm on a ViT (`MoCo_ViT`), none on a ResNet (`MoCo_ResNet`).
        let dim = c.moco.dim;
        let last_bn = matches!(spec.backbone, BackboneConfig::Vit(_));
        moco = moco.with_predictor(|vb| {
            moco_models::head::v3_mlp(2, dim, hidden, dim, last_bn, settings, vb)
        })?;
    }
    if resume {
        moco.load_checkpoint(&ckpt)
            .with_context(|| format!("--resume from {}", ckpt.display()))?;
    } else if lead {
        moco_core::io::write_atomic(&config_path, serde_json::to_string_pretty(&c)?.as_bytes())?;
    }
    let moco = moco.with_collective(comm)?;
    let mut moco = moco;
    let total = (c.moco.epochs * ipe) as u64;
    let budget = c.max_steps.map_or(total, |m| m.min(total));
    let mut metrics = match lead {
        true => Some(Metrics::open(&out.join("metrics.jsonl"), moco.step())?),
        false => None,
    };
    let mut log = |line: serde_json::Value| -> Result<()> {
        match &mut metrics {
            Some(m) => m.write(line),
            None => Ok(()),
        }
    };
    let mut meta = spec.metadata();
    meta.insert("run_config".into(), serde_json::to_string(&c)?);
    let save = |moco: &Moco<Encoder>, epoch: usize| -> Result<()> {
        // Every rank must hold the same weights; rank 0 writes them.
        moco.check_in_sync()?;
        if !lead {
            return Ok(());
        }
        let mut m = meta.clone();
        m.insert("epoch".into(), epoch.to_string());
        match moco.save_checkpoint(&ckpt, m) {
            Err(e @ moco_core::Error::NonFiniteWeights { .. }) => {
                bail!("{e}; the last good checkpoint is {}", ckpt.display())
            }
            r => r.with_context(|| format!("writing {}", ckpt.display())),
        }
    };
    if !quiet {
        let shape = match spec.backbone {
            BackboneConfig::ResNet(r) => format!("width {}", r.width),
            BackboneConfig::Vit(v) => format!(
                "{}x{} patches{}{}",
                v.patch_size,
                v.patch_size,
                if v.conv_stem {
                    " by a convolutional stem"
                } else {
                    ""
                },
                if v.stop_grad_patch_embed {
                    ", frozen patch projection"
                } else {
                    ""
                }
            ),
        };
        eprintln!(
            "pretraining {} ({}, {} head) on {}: {} epochs x {ipe} steps of {}, {}x{} crops, preset {}, run in {}",
            spec.backbone.arch(), shape, spec.head.name(), train.describe(), c.moco.epochs, c.moco.batch_size, crop, crop, c.moco.preset, out.display()
        );
        if c.knn_every.is_none() && c.dataset == "folder" {
            eprintln!(
                "kNN monitor: at the end only on a folder dataset (--knn-every N: every N epochs)"
            );
        }
        if world > 1 {
            eprintln!(
                "data-parallel over {world} processes ({} backend): {local_batch} images per process and step",
                moco.collective().backend()
            );
        }
    }
    let pb = bar(budget, "pretrain", quiet);
    pb.set_position(moco.step());
    let start_step = moco.step();
    let mut epoch = (moco.step() / ipe as u64) as usize;
    let mut skip = (moco.step() % ipe as u64) as usize;
    let mut window = (Instant::now(), 0usize);
    let mut last_knn: Option<(u64, f64, f64)> = None;
    while moco.step() < budget && epoch < c.moco.epochs {
        for (i, batch) in loader.epoch(epoch, skip).enumerate() {
            if moco.step() >= budget {
                break;
            }
            let batch = batch?;
            let iter = skip + i;
            let (lr, m) = moco.schedule(epoch, iter, ipe);
            let (x1, x2) = (
                batch.views[0].to_device(device)?,
                batch.views[1].to_device(device)?,
            );
            let o = match moco.train_step(&x1, &x2, lr, m) {
                Ok(o) => o,
                Err(e @ moco_core::Error::NonFiniteLoss { .. }) => {
                    pb.abandon();
                    bail!("{e}; the last good checkpoint is {}", ckpt.display());
                }
                Err(e) => return Err(e.into()),
            };
            window.1 += batch.indices.len() * world;
            let step = moco.step();
            pb.set_position(step);
            if step % c.log_every as u64 == 0 || step == budget {
                let ips = window.1 as f64 / window.0.elapsed().as_secs_f64();
                window = (Instant::now(), 0);
                pb.set_message(format!(
                    "epoch {epoch} loss {:.3} acc1 {:.1}% {:.0} img/s",
                    o.loss, o.acc1, ips
                ));
                let line = serde_json::json!({"epoch": epoch, "step": step, "loss": o.loss, "acc1": o.acc1, "acc5": o.acc5, "lr": o.lr, "momentum": o.momentum, "images_per_s": ips});
                if lead && (quiet || pb.is_hidden()) {
                    println!("{line}");
                }
                log(line)?;
            }
            if c.checkpoint_every > 0 && step % c.checkpoint_every as u64 == 0 {
                save(&moco, epoch)?;
            }
        }
        let finished_epoch = moco.step() % ipe as u64 == 0;
        save(&moco, epoch)?;
        if finished_epoch {
            let done = epoch + 1;
            if lead && c.keep_every > 0 && done % c.keep_every == 0 {
                let kept = out.join(format!("checkpoint-epoch-{done:04}.safetensors"));
                let bytes = std::fs::read(&ckpt).with_context(|| format!("{}", ckpt.display()))?;
                moco_core::io::write_atomic(&kept, &bytes)?;
            }
            let last = done == c.moco.epochs || moco.step() >= budget;
            let every = c
                .knn_every
                .unwrap_or(if c.dataset == "folder" { 0 } else { 1 });
            if lead && ((every > 0 && done % every == 0) || last) {
                let (top1, top5) =
                    knn_top1(&moco, &train, &test, size, native, &c, device, settings)?;
                last_knn = Some((moco.step(), top1, top5));
                let line = serde_json::json!({"epoch": epoch, "step": moco.step(), "knn_top1": top1, "knn_top5": top5});
                if lead && (quiet || pb.is_hidden()) {
                    println!("{line}");
                }
                pb.println(format!("epoch {epoch}: kNN top-1 {top1:.2}%"));
                log(line)?;
            }
        }
        epoch += 1;
        skip = 0;
    }
    pb.finish_and_clear();
    if moco.step() == start_step {
        if !quiet {
            eprintln!(
                "nothing to do: the run already reached step {} of {budget}",
                moco.step()
            );
        }
        if !ckpt.exists() {
            save(&moco, epoch)?;
        }
    }
    if !lead {
        return Ok(());
    }
    // Final kNN of the query encoder, unless the last epoch just measured it.
    let (top1, top5) = match last_knn {
        Some(r) if r.0 == moco.step() => (r.1, r.2),
        _ => {
            let (top1, top5) = knn_top1(&moco, &train, &test, size, native, &c, device, settings)?;
            let epoch = (moco.step() as usize).div_ceil(ipe).saturating_sub(1);
            log(
                serde_json::json!({"epoch": epoch, "step": moco.step(), "knn_top1": top1, "knn_top5": top5}),
            )?;
            (top1, top5)
        }
    };
    println!(
        "finished at step {} (epoch {}): kNN top-1 {top1:.2}%  top-5 {top5:.2}%  ({})",
        moco.step(),
        (moco.step() as usize).div_ceil(ipe),
        ckpt.display()
    );
    Ok(())
}
