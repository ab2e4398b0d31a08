//! `moco`: Momentum Contrast on Candle from the command line.

mod bench;
mod convert;
mod data;
mod device;
mod evaluate;
mod export;
mod extract;
mod hub;
mod launch;
mod plot;
mod pretrain;
mod progress;
mod weights;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use moco_core::MocoConfig;

// Candle allocates fresh buffers for every op; with the system allocator a large share of the
// time goes to the kernel zeroing new pages. mimalloc reuses them (measured +12% on a training
// step, see the README's benchmark section).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` (position 15 of `mi_option_e` in mimalloc v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory instead of returning it to the OS after 10 ms: a training step frees and
/// reallocates the same large buffers, and each return costs a round of page faults and
/// kernel page zeroing (measured: 4000 -> 650 faults, +8% images/s on a training step).
fn keep_freed_memory() {
    // SAFETY: sets a plain integer option of the allocator; called first thing in `main`.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Momentum Contrast (MoCo) self-supervised pretraining on Candle.
#[derive(Debug, Parser)]
#[command(name = "moco", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a preset's fully resolved configuration as JSON (a starting point for a config file).
    Config {
        /// The preset: v1, v2, cifar, v3 or v3-vit.
        #[arg(long, default_value = "v2")]
        preset: String,
    },
    /// Print the default pretraining configuration as TOML (a starting point for --config).
    ConfigRun,
    /// One MoCo step on --device next to the same step on the CPU (same weights, queue, input):
    /// loss and every updated tensor must agree within the tolerance.
    CheckDevice {
        /// cuda, cuda:N or metal (cpu compares the CPU with itself).
        #[arg(long, default_value = "cuda")]
        device: String,
        #[arg(long, default_value = "resnet18-small")]
        arch: String,
        #[arg(long, default_value_t = 16)]
        width: usize,
        #[arg(long, default_value_t = 32)]
        image_size: usize,
        #[arg(long, default_value_t = 3)]
        channels: usize,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// Largest relative difference allowed.
        #[arg(long, default_value_t = 1e-3)]
        tolerance: f64,
        /// Also check a data-parallel backend (nccl or tcp): the device step runs in a group of
        /// one process of it, whose collectives must change nothing.
        #[arg(long)]
        dist: Option<String>,
        /// Check SyncBN instead: one MoCo v3 step (SyncBN in the backbone and the heads) as two
        /// ranks sharing --device (threads joined over TCP, each with half the batch) against
        /// one CPU process on the whole batch.
        #[arg(long, conflicts_with = "dist")]
        sync_bn: bool,
        /// With --device cpu: run the device side on candle's generic ops (the ops CUDA and
        /// Metal run) instead of moco-rs's CPU kernels, and compare it with the kernels.
        #[arg(long)]
        generic: bool,
        /// Seed of the initial weights, the queue and the input batch.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Draw a run's training curves (loss, acc1, lr per step; kNN top-1 per epoch) into PNG files.
    Plot {
        /// The run directory (holding metrics.jsonl).
        run: PathBuf,
        /// Where to write the PNG files (default: the run directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Convert an official MoCo checkpoint (checkpoint_*.pth.tar of v1, v2 or v3, zip or legacy
    /// torch.save) into a safetensors encoder with torchvision (ResNet) or timm (ViT) names.
    Convert {
        /// The checkpoint written by main_moco.py of facebookresearch/moco (v1, v2) or
        /// facebookresearch/moco-v3 (ResNets and ViTs).
        #[arg(long)]
        input: PathBuf,
        /// The safetensors file to write (query encoder: backbone and head).
        #[arg(long)]
        out: PathBuf,
        /// The architecture, checked against the weights; needed for a ViT of a non-standard
        /// width (vit-DxNhH: the weights do not record the number of heads).
        #[arg(long)]
        arch: Option<String>,
    },
    /// Pooled backbone features of every image in a folder (sorted by file name).
    Extract {
        /// Encoder weights: safetensors (moco convert / export / a run), a run folder, an official
        /// .pth.tar, or hf://OWNER/NAME[@REV].
        #[arg(long)]
        weights: String,
        /// Architecture, when the weights file does not record it (resnet50, resnet18-small, ...).
        #[arg(long)]
        arch: Option<String>,
        /// Folder of images.
        #[arg(long)]
        input: PathBuf,
        /// Output safetensors: `features` (N x feature_dim) and the file names in metadata `files`.
        #[arg(long)]
        out: PathBuf,
        /// Crop size of the evaluation transform (the shorter side is first resized to size*256/224).
        #[arg(long, default_value_t = 224)]
        image_size: usize,
        /// Images per forward pass.
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// MoCo pretraining. With no flags: a small ResNet on the embedded Fashion-MNIST subset for a
    /// short budget, then its kNN accuracy. Flags override the preset, which overrides --config.
    Pretrain(Box<PretrainArgs>),
    /// Weighted kNN accuracy (k=200, t=0.1, as the official CIFAR demo) of frozen features.
    Knn {
        #[command(flatten)]
        common: EvalArgs,
        /// Neighbours.
        #[arg(long, default_value_t = 200)]
        k: usize,
        /// Temperature of the vote weights.
        #[arg(long, default_value_t = 0.1)]
        t: f64,
    },
    /// The linear classification protocol of main_lincls.py (frozen backbone, fresh fc).
    LinearEval {
        #[command(flatten)]
        common: EvalArgs,
        /// The protocol: v1 (MoCo v1/v2's main_lincls.py: lr 30, 100 epochs, lr x0.1 at 60% and
        /// 80% of them) or v3 (MoCo v3's: lr 0.1 x batch/256, 90 epochs, per-epoch cosine).
        #[arg(long, default_value = "v1")]
        protocol: String,
        /// Epochs (default: the protocol's).
        #[arg(long)]
        epochs: Option<usize>,
        /// Learning rate (default: the protocol's; v3 scales 0.1 by batch/256, a given value is
        /// used as it is).
        #[arg(long)]
        lr: Option<f64>,
        /// Train on features extracted once (no augmentation; fast on CPU, reported as such).
        #[arg(long)]
        cached_features: bool,
        /// Folder for results.json and checkpoint-last.safetensors (the classifier and its SGD
        /// state after the last epoch; default: linear-eval/ in the run directory when --weights
        /// is one, else in the current directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Continue the evaluation in --out from its last checkpoint (written after every
        /// epoch; the same settings are required).
        #[arg(long)]
        resume: bool,
    },
    /// A Hugging Face model folder: model.safetensors (backbone, torchvision or timm names), config.json,
    /// README.md model card.
    Export {
        /// A pretraining run directory.
        #[arg(long)]
        run: Option<PathBuf>,
        /// Or a weights file (safetensors, .pth.tar, hf://...).
        #[arg(long)]
        weights: Option<String>,
        /// The folder to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Upload a folder written by `moco export` to the Hugging Face Hub (token: HF_TOKEN or the
    /// standard token file).
    Push {
        /// The exported folder.
        dir: PathBuf,
        /// OWNER/NAME.
        #[arg(long)]
        repo: String,
        /// Create the repository private.
        #[arg(long)]
        private: bool,
        /// Branch to commit to.
        #[arg(long)]
        revision: Option<String>,
    },
    /// Throughput benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Data-parallel pretraining: starts one `moco pretrain` process per GPU (or CPU process)
    /// on this machine with its rank, and stops them all if one fails.
    /// Example: `moco launch --nproc-per-node 8 -- --preset v2 --device cuda --out runs/v2`.
    Launch {
        /// Processes on this machine (one per GPU).
        #[arg(long, default_value_t = 1)]
        nproc_per_node: usize,
        /// Machines taking part (run `moco launch` on each).
        #[arg(long, default_value_t = 1)]
        nnodes: usize,
        /// This machine's index, 0..nnodes (its processes get ranks node_rank * nproc_per_node + i).
        #[arg(long, default_value_t = 0)]
        node_rank: usize,
        /// Rendezvous file (default: a fresh one in --out; several machines: a path on a shared
        /// file system, new for each run).
        #[arg(long)]
        dist_init: Option<PathBuf>,
        /// The `moco pretrain` flags, after `--` (--out required; --dist-backend and
        /// --dist-addr pass through).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        args: Vec<String>,
    },
}

/// Arguments of `moco pretrain`.
#[derive(Debug, clap::Args)]
struct PretrainArgs {
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
    #[arg(long)]
    image_size: Option<usize>,
    /// Pretrain on a random subset of this many training images.
    #[arg(long)]
    subset: Option<usize>,
    /// Stop after this many steps in total.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Checkpoint every N steps (and at every epoch end).
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
    dist: pretrain::DistArgs,
}

/// `--device` and `--tf32`, for the commands that run a model.
#[derive(Debug, clap::Args)]
struct DeviceArgs {
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// On CUDA, TF32 tensor cores for float32 matrix products and (cudnn builds) convolutions,
    /// as PyTorch runs its cuDNN convolutions by default (without it: full float32).
    #[arg(long)]
    tf32: bool,
}

impl DeviceArgs {
    /// The device, `spec` standing for `--device` (see [`device::parse_with_tf32`]).
    fn open_as(&self, spec: &str) -> Result<candle_core::Device> {
        device::parse_with_tf32(spec, self.tf32)
    }

    fn open(&self) -> Result<candle_core::Device> {
        self.open_as(&self.device)
    }
}

/// Arguments of the evaluation commands.
#[derive(Debug, clap::Args)]
struct EvalArgs {
    /// Encoder weights: safetensors (moco convert / export / a run's checkpoint), a run folder,
    /// an official .pth.tar, or hf://OWNER/NAME[@REV].
    #[arg(long)]
    weights: String,
    /// fashion-mnist, mnist, cifar10, cifar100, stl10, folder or default (the embedded set).
    #[arg(long, default_value = "default")]
    dataset: String,
    /// The dataset's folder (`folder`: DIR/train and DIR/val).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Evaluation size: shorter side to S*256/224, center crop S (default: native size).
    #[arg(long)]
    image_size: Option<usize>,
    /// Batch size.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Data worker threads.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    #[command(flatten)]
    device: DeviceArgs,
    /// Print a last line with the results as JSON.
    #[arg(long)]
    json: bool,
}

impl EvalArgs {
    fn common(&self, settings: moco_models::Settings) -> Result<evaluate::Common<'_>> {
        Ok(evaluate::Common {
            weights: &self.weights,
            dataset: &self.dataset,
            data_dir: self.data_dir.as_deref(),
            image_size: self.image_size,
            batch_size: self.batch_size,
            workers: self.workers,
            device: self.device.open()?,
            settings,
            json: self.json,
        })
    }
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Images/s and peak memory of full MoCo training steps on random input.
    Step {
        /// Architecture (a ResNet, or a ViT: vit_tiny, vit_small, vit_base, vit-DxNhH).
        #[arg(long, default_value = "resnet18-small")]
        arch: String,
        /// ViT patch size (default 16).
        #[arg(long)]
        patch_size: Option<usize>,
        /// Width of the first stage.
        #[arg(long, default_value_t = 64)]
        width: usize,
        #[arg(long, default_value_t = 32)]
        image_size: usize,
        #[arg(long, default_value_t = 3)]
        channels: usize,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// Queue size K.
        #[arg(long, default_value_t = 4096)]
        queue_size: usize,
        /// MoCo v2's step: MLP head and T 0.2 (default: v1's linear head, T 0.07).
        #[arg(long)]
        mlp: bool,
        /// Timed steps (after 2 warm-up steps).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[command(flatten)]
        device: DeviceArgs,
        /// Print a last line {"images_per_s": ..., "peak_rss_mb": ...}.
        #[arg(long)]
        json: bool,
        /// Time the frozen backbone's eval-mode forward instead (pooled features, no autograd:
        /// what `moco knn`, `linear-eval` and `extract` run per batch).
        #[arg(long)]
        extract: bool,
        /// Also time the query encoder's training-mode forward pass, and forward + backward
        /// (of the sum of its outputs), on their own: where a step's time goes.
        #[arg(long)]
        phases: bool,
    },
    /// Images/s of the data pipeline: decode, two augmented crops, batching.
    Data {
        /// fashion-mnist, mnist, cifar10, cifar100, stl10, folder or default.
        #[arg(long, default_value = "default")]
        dataset: String,
        /// The dataset's folder (for `folder`: DIR/train/CLASS/* or DIR/CLASS/*).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Augmentation preset: v1, v2, cifar or v3; or eval, the evaluation transform (Resize,
        /// CenterCrop; one view per image, unshuffled: what feature extraction loads).
        #[arg(long, default_value = "v2")]
        preset: String,
        /// Crop size (default: the dataset's native size, 224 for folders).
        #[arg(long)]
        image_size: Option<usize>,
        /// Worker threads.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Images to time (at most the dataset's size).
        #[arg(long, default_value_t = 1024)]
        images: usize,
        /// Print a last line {"images_per_s": ...}.
        #[arg(long)]
        json: bool,
    },
}

/// Candle's CPU thread pool spins 25000 times before parking a waiting worker; on a machine
/// with few cores those spins take the core from the rayon threads running the convolutions
/// (measured: +5-9% images/s at 100 on 2 cores). `CANDLE_BARRIER_POOL_SPIN_LIMIT` set by the
/// user is kept.
fn shorter_candle_spins() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // Before any thread is started.
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "100");
    }
}

fn main() -> Result<()> {
    keep_freed_memory();
    shorter_candle_spins();
    let cli = Cli::parse();
    // A bad MOCO_CPU_CONV, MOCO_CPU_KERNELS or MOCO_CUDNN_BN is an error before any work.
    let settings = moco_models::Settings::from_env()?;
    match cli.command {
        Command::Config { preset } => {
            let config = MocoConfig::preset(&preset).context("--preset")?;
            println!("{}", serde_json::to_string_pretty(&config)?);
        }
        Command::ConfigRun => {
            print!(
                "{}",
                toml::to_string_pretty(&pretrain::RunConfig::default())?
            );
        }
        Command::CheckDevice {
            device,
            arch,
            width,
            image_size,
            channels,
            batch_size,
            tolerance,
            dist,
            sync_bn,
            generic,
            seed,
        } => bench::check_device(bench::CheckOptions {
            arch,
            width,
            image_size,
            channels,
            batch_size,
            device: device::parse(&device)?,
            tolerance,
            dist,
            sync_bn,
            generic,
            seed,
            settings,
        })?,
        Command::Plot { run, out } => {
            for f in plot::run(&run, out.as_deref())? {
                println!("{}", f.display());
            }
        }
        Command::Convert { input, out, arch } => convert::run(&input, &out, arch.as_deref())?,
        Command::Extract {
            weights,
            arch,
            input,
            out,
            image_size,
            batch_size,
            device,
        } => extract::run(extract::Options {
            weights: &weights,
            arch: arch.as_deref(),
            input: &input,
            out: &out,
            image_size,
            batch_size,
            device: device.open()?,
            settings,
        })?,
        Command::Pretrain(a) => {
            let o = pretrain::Overrides {
                preset: a.preset.clone(),
                dataset: a.dataset.clone(),
                data_dir: a.data_dir.clone(),
                arch: a.arch.clone(),
                width: a.width,
                epochs: a.epochs,
                batch_size: a.batch_size,
                lr: a.lr,
                queue_size: a.queue_size,
                moco_dim: a.moco_dim,
                moco_m: a.moco_m,
                temperature: a.temperature,
                mlp: a.mlp,
                aug_plus: a.aug_plus,
                cos: a.cos,
                symmetric: a.symmetric,
                moco_mlp_dim: a.moco_mlp_dim,
                warmup_epochs: a.warmup_epochs,
                optimizer: a.optimizer.clone(),
                bn_splits: a.bn_splits,
                sync_bn: a.sync_bn,
                zero_init_residual: a.zero_init_residual,
                workers: a.workers,
                seed: a.seed,
                knn_every: a.knn_every,
                image_size: a.image_size,
                subset: a.subset,
                max_steps: a.max_steps,
                checkpoint_every: a.checkpoint_every,
                keep_every: a.keep_every,
                log_every: a.log_every,
                patch_size: a.patch_size,
                stop_grad_conv1: a.stop_grad_conv1,
            };
            let device = a.device.open_as(&a.dist.device(&a.device.device))?;
            if a.resume && a.out.is_none() {
                anyhow::bail!("--resume needs --out RUN_DIR");
            }
            if a.dist.world_size > 1 && a.out.is_none() {
                anyhow::bail!(
                    "--world-size {}: every process needs the same --out RUN_DIR",
                    a.dist.world_size
                );
            }
            let comm = a.dist.join(&device)?;
            let config = pretrain::resolve(a.config.as_deref(), &o)?;
            let out = a.out.clone().unwrap_or_else(|| {
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                PathBuf::from("runs").join(format!("{}-{}-{secs}", config.dataset, config.arch))
            });
            pretrain::run(config, &out, a.resume, &device, settings, a.quiet, comm)?
        }
        Command::Launch {
            nproc_per_node,
            nnodes,
            node_rank,
            dist_init,
            args,
        } => launch::run(&launch::Launch {
            nproc_per_node,
            nnodes,
            node_rank,
            dist_init,
            args,
        })?,
        Command::Export { run, weights, out } => {
            let (src, is_run) = export::source(run, weights)?;
            export::run(&src, is_run, &out)?
        }
        Command::Push {
            dir,
            repo,
            private,
            revision,
        } => hub::push(&dir, &repo, private, revision)?,
        Command::Knn { common, k, t } => evaluate::knn(common.common(settings)?, k, t)?,
        Command::LinearEval {
            common,
            protocol,
            epochs,
            lr,
            cached_features,
            out,
            seed,
            resume,
        } => {
            use moco_eval::linear::LinearConfig;
            let base = match protocol.as_str() {
                "v1" => LinearConfig {
                    batch_size: common.batch_size,
                    ..LinearConfig::default()
                },
                "v3" => LinearConfig::v3(common.batch_size),
                other => anyhow::bail!("--protocol {other}: expected v1 or v3"),
            };
            let epochs = epochs.unwrap_or(base.epochs);
            let schedule = match protocol.as_str() {
                // The milestones at 60% and 80% of the run, as 60 and 80 of 100.
                "v1" => moco_core::LrSchedule::step(vec![epochs * 60 / 100, epochs * 80 / 100]),
                _ => base.schedule.clone(),
            };
            let cfg = LinearConfig {
                epochs,
                lr: lr.unwrap_or(base.lr),
                schedule,
                seed,
                ..base
            };
            evaluate::linear_eval(common.common(settings)?, cfg, cached_features, out, resume)?
        }
        Command::Bench(BenchCommand::Step {
            arch,
            patch_size,
            width,
            image_size,
            channels,
            batch_size,
            queue_size,
            mlp,
            steps,
            device,
            json,
            extract,
            phases,
        }) => bench::step(bench::StepOptions {
            arch,
            patch_size,
            width,
            image_size,
            channels,
            batch_size,
            queue_size,
            mlp,
            steps,
            tf32: device.tf32,
            device: device.open()?,
            json,
            extract,
            phases,
            settings,
        })?,
        Command::Bench(BenchCommand::Data {
            dataset,
            data_dir,
            preset,
            image_size,
            workers,
            images,
            json,
        }) => bench::data(
            &dataset,
            data_dir.as_deref(),
            &preset,
            image_size,
            workers,
            images,
            json,
        )?,
    }
    Ok(())
}
