//! `moco pretrain`: its flags, resolved into a [`RunConfig`] (defaults, then `--config FILE`,
//! then `--preset`, then the flags), and the run: a [`Pretrainer`] with the kNN monitor and a
//! progress bar (JSON lines on stdout without a terminal or with `--quiet`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use indicatif::ProgressBar;
use moco_cli::{Hook, KnnMonitor, Pretrainer, Progress, RunConfig, RunDir};
use moco_core::dist::{Backend, Collective, DistConfig};
use moco_core::{LossKind, MocoConfig, StepOutput};
use moco_models::{BackboneConfig, Settings};

use super::device::DeviceArgs;
use super::progress::bar;

/// Arguments of `moco pretrain`.
#[derive(Debug, clap::Args)]
pub struct PretrainArgs {
    /// A TOML file with a RunConfig (see `moco config`); flags and --preset override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Preset: v1, v2, cifar, v3 (ResNet) or v3-vit (ViT: AdamW, T 0.2, frozen patch
    /// projection; with --arch vit_small, vit_base or vit_tiny). Overrides the config file.
    #[arg(long)]
    preset: Option<String>,
    /// fashion-mnist, mnist, cifar10, cifar100, stl10, folder or default (embedded).
    #[arg(long)]
    dataset: Option<String>,
    /// The dataset's folder.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// resnet18, resnet34, resnet50, resnet101, resnet152, resnet18-small, resnet34-small,
    /// resnet50-small, vit_tiny, vit_small, vit_base (a ViT takes the crop size, --image-size,
    /// as its input size).
    #[arg(long)]
    arch: Option<String>,
    /// ViT patch size (default 16; it must divide the crop size: 4 or 7 for 28x28 images).
    #[arg(long)]
    patch_size: Option<usize>,
    /// Freeze the ViT's patch projection at its random initialisation (MoCo v3; on with
    /// --preset v3-vit).
    #[arg(long)]
    stop_grad_conv1: bool,
    /// ResNet width of the first stage (64 = torchvision; 16 gives the CPU-sized 16-32-64-128
    /// net). A ViT's width is in its name.
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    /// Base learning rate (per 256 images with --preset v3: the run uses lr x batch / 256).
    #[arg(long)]
    lr: Option<f64>,
    /// Queue size K.
    #[arg(long)]
    queue_size: Option<usize>,
    /// Feature dimension C.
    #[arg(long)]
    moco_dim: Option<usize>,
    /// Key encoder momentum m.
    #[arg(long)]
    moco_m: Option<f64>,
    /// Softmax temperature T.
    #[arg(long)]
    temperature: Option<f64>,
    /// MLP head (MoCo v2).
    #[arg(long)]
    mlp: bool,
    /// MoCo v2 augmentation (blur).
    #[arg(long)]
    aug_plus: bool,
    /// Cosine learning-rate schedule.
    #[arg(long)]
    cos: bool,
    /// Symmetric loss (both views as queries).
    #[arg(long)]
    symmetric: bool,
    /// MoCo v3 heads: projector and predictor MLPs with this hidden width.
    #[arg(long)]
    moco_mlp_dim: Option<usize>,
    /// Linear learning-rate warm-up, in epochs.
    #[arg(long)]
    warmup_epochs: Option<f64>,
    /// sgd, lars (MoCo v3's LARS, trust coefficient 0.001) or adamw (MoCo v3's ViT optimizer,
    /// torch's AdamW with betas 0.9, 0.999).
    #[arg(long)]
    optimizer: Option<String>,
    /// BatchNorm splits (shuffle-BN on one device).
    #[arg(long)]
    bn_splits: Option<usize>,
    /// SyncBN in a data-parallel run: BatchNorm statistics of the global batch (true in the v3
    /// presets, as the official code) or of each rank's share (false: v1/v2, shuffle-BN).
    #[arg(long, value_name = "BOOL")]
    sync_bn: Option<bool>,
    /// Start the last BatchNorm of each residual block at zero (torchvision's option; true with
    /// --preset v3 and a ResNet, as the official v3 code).
    #[arg(long, value_name = "BOOL")]
    zero_init_residual: Option<bool>,
    /// Data worker threads.
    #[arg(long)]
    workers: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// kNN monitor every N epochs (0: only at the end; default: every epoch, only at the end
    /// with --dataset folder).
    #[arg(long)]
    knn_every: Option<usize>,
    /// Crop size of the augmentations.
    #[arg(long, value_parser = super::positive)]
    image_size: Option<usize>,
    /// Pretrain on a random subset of this many training images.
    #[arg(long)]
    subset: Option<usize>,
    /// Stop after this many steps in total (0: none; the initialised network is saved and
    /// evaluated, a random-init baseline).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Checkpoint every N steps (and at every epoch end; 0: at epoch ends only).
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Also keep the checkpoint of every N-th epoch, as checkpoint-epoch-NNNN.safetensors (an
    /// evaluation command's --weights takes it; 0: keep only checkpoint-last).
    #[arg(long)]
    keep_every: Option<usize>,
    /// Metrics line every N steps.
    #[arg(long)]
    log_every: Option<usize>,
    #[command(flatten)]
    device: DeviceArgs,
    /// Run directory (default: runs/DATASET-ARCH-TIMESTAMP).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// No progress bar; plain JSON lines.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    dist: DistArgs,
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
        // Checked here too: a world of one below takes no process group, which would check it.
        moco_core::dist::check_rank(self.world_size, self.rank).map_err(|e| {
            anyhow::anyhow!("--world-size {} --rank {}: {e}", self.world_size, self.rank)
        })?;
        if let Some(l) = self.local_rank {
            if self.world_size == 1 && l != 0 {
                bail!("--local-rank {l} with --world-size 1: a single process uses --device cuda:N to pick its GPU");
            }
        }
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

impl PretrainArgs {
    /// The run's configuration: the defaults, then the config file, then the preset, then the
    /// flags.
    fn resolve(&self) -> Result<RunConfig> {
        let o = self;
        let mut c = match o.config.as_deref() {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("--config {}", p.display()))?;
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
            if let Some(d) = m.mlp_dim {
                bail!("--mlp: this configuration has MoCo v3's projection head already (--moco-mlp-dim {d}); the MoCo v2 head would be ignored");
            }
            m.mlp = true;
        }
        if m.loss == LossKind::InBatch && o.queue_size.is_some() {
            bail!("--queue-size: this configuration (--preset {}) trains with MoCo v3's in-batch loss, which has no queue; the negatives are the other images of the batch", m.preset);
        }
        if m.bn_splits > 1 && o.bn_splits.is_some() && o.sync_bn == Some(true) {
            bail!("--bn-splits {} --sync-bn true: split BatchNorm emulates several devices' statistics on one, synchronised BatchNorm shares them over all processes; choose one", m.bn_splits);
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
        if o.dataset.as_deref().is_some_and(|d| d != c.dataset) && o.data_dir.is_none() {
            // The config file's folder belongs to the config file's dataset.
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
        let (is_vit, conv_stem) = match BackboneConfig::from_arch(&c.arch).context("--arch")? {
            BackboneConfig::Vit(v) => (true, v.conv_stem),
            BackboneConfig::ResNet(_) => (false, false),
        };
        if is_vit && o.width.is_some() {
            bail!("--width sets a ResNet's first-stage width; {} is a ViT (its width is in the name: vit-DxNhH, e.g. vit-64x4h4)", c.arch);
        }
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
        c.validate()?;
        Ok(c)
    }
}

impl PretrainArgs {
    /// Runs (or resumes) the run: one process, or one rank of a data-parallel run, where rank 0
    /// alone writes the run folder and evaluates.
    pub fn run(&self, settings: Settings) -> Result<()> {
        let device = self
            .device
            .open_as(&self.dist.device(&self.device.device))?;
        if self.resume && self.out.is_none() {
            bail!("--resume needs --out RUN_DIR");
        }
        if self.dist.world_size > 1 && self.out.is_none() {
            bail!(
                "--world-size {}: every process needs the same --out RUN_DIR",
                self.dist.world_size
            );
        }
        let comm = self.dist.join(&device)?;
        let config = self.resolve()?;
        let out = self.out.clone().unwrap_or_else(|| {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            // The process id too: two runs started in the same second get folders of their own.
            let pid = std::process::id();
            PathBuf::from("runs").join(format!("{}-{}-{secs}-{pid}", config.dataset, config.arch))
        });
        let dir = RunDir::new(&out);
        let mut run = Pretrainer::new(config, dir, self.resume, &device, settings, comm)?;
        let lead = run.is_lead();
        let quiet = self.quiet || !lead;
        if !quiet {
            if run.other_flags_ignored() {
                eprintln!(
                    "note: --resume continues with the configuration saved in {} (other flags are ignored)",
                    run.dir().config_path().display()
                );
            }
            if let Some(first) = run.removed_temp_files().first() {
                eprintln!(
                    "note: removed {} temporary file(s) that a killed run left while writing (e.g. {})",
                    run.removed_temp_files().len(),
                    first.display()
                );
            }
            eprintln!("{}", run.describe());
            let c = run.config();
            if c.knn_every.is_none() && c.dataset == "folder" {
                eprintln!(
                    "kNN monitor: at the end only on a folder dataset (--knn-every N: every N epochs)"
                );
            }
            let world = run.world_size();
            if world > 1 {
                eprintln!(
                    "data-parallel over {world} processes ({} backend): {} images per process and step",
                    run.moco().collective().backend(),
                    c.moco.batch_size / world
                );
            }
        }
        let mut progress = ProgressHook::new(&run, quiet, lead);
        let mut knn = KnnMonitor::new(&run);
        let summary = match lead {
            true => run.run(&mut [&mut progress, &mut knn]),
            false => run.run(&mut [&mut progress]),
        };
        let summary = match summary {
            Ok(s) => s,
            Err(e) => {
                progress.bar.abandon();
                return Err(e.into());
            }
        };
        progress.bar.finish_and_clear();
        if summary.step == summary.start_step && !quiet {
            eprintln!(
                "nothing to do: the run already reached step {} of {}",
                summary.step,
                run.budget()
            );
        }
        if !lead {
            return Ok(());
        }
        let (_, top1, top5) = knn.last().context("the kNN monitor did not run")?;
        println!(
            "finished at step {} (epoch {}): kNN top-1 {top1:.2}%  top-5 {top5:.2}%  ({})",
            summary.step,
            summary.epochs,
            run.dir().checkpoint_path().display()
        );
        Ok(())
    }
}

/// The progress bar of a run, and its records as JSON lines on stdout when the bar is hidden
/// (no terminal) or `--quiet` (first rank only).
struct ProgressHook {
    bar: ProgressBar,
    /// Print the records on stdout.
    lines: bool,
}

impl ProgressHook {
    fn new(run: &Pretrainer, quiet: bool, lead: bool) -> Self {
        let bar = bar(run.budget(), "pretrain", quiet);
        bar.set_position(run.moco().step());
        let lines = lead && (quiet || bar.is_hidden());
        Self { bar, lines }
    }
}

impl Hook for ProgressHook {
    fn on_step(&mut self, at: &Progress, _out: &StepOutput) -> moco_cli::Result<()> {
        self.bar.set_position(at.step);
        Ok(())
    }

    fn on_record(&mut self, r: &serde_json::Value) -> moco_cli::Result<()> {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        if r["event"] == "collapse" {
            // Printed even with --quiet: the run goes on, but it has stopped learning.
            self.bar.suspend(|| {
                eprintln!(
                    "warning: step {}: the loss has sat at {:.4}, the value of equal logits, for {} records in a row: no logit stands out, so nothing is learnt (embeddings collapsed to one point, often from a learning rate too high; or a temperature far too high). The run goes on; see metrics.jsonl",
                    r["step"],
                    f("uniform_logits_loss"),
                    r["records_in_a_row"]
                )
            });
        } else if r.get("knn_top1").is_some() {
            self.bar.println(format!(
                "epoch {}: kNN top-1 {:.2}%",
                r["epoch"],
                f("knn_top1")
            ));
        } else {
            self.bar.set_message(format!(
                "epoch {} loss {:.3} acc1 {:.1}% {:.0} img/s",
                r["epoch"],
                f("loss"),
                f("acc1"),
                f("images_per_s")
            ));
        }
        if self.lines {
            println!("{r}");
        }
        Ok(())
    }
}
