//! `moco`: Momentum Contrast on Candle from the command line.

mod commands;

use anyhow::Result;
use clap::{Parser, Subcommand};
use commands::{
    bench, check, config, convert, evaluate, export, extract, hub, launch, plot, pretrain,
};

// Candle allocates fresh buffers for every op; with the system allocator a large share of the
// time goes to the kernel zeroing new pages. mimalloc reuses them (measured +12% on a training
// step, see docs/benchmarks.md).
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

/// `moco --version`: the crate's version, the git commit it was built from, and the optional
/// features built in (see build.rs); a library a feature asked for but the build did not find
/// is named as such.
fn version() -> &'static str {
    static V: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        let features: Vec<String> = env!("MOCO_FEATURES")
            .split(", ")
            .map(|f| {
                let missing = match f {
                    "onednn" => moco_models::ops::ONEDNN_MISSING.is_some(),
                    "libjpeg" => moco_data::LIBJPEG_MISSING.is_some(),
                    _ => false,
                };
                match missing {
                    true => format!("{f} (not found at build time, left out)"),
                    false => f.to_string(),
                }
            })
            .collect();
        format!(
            "{} (commit {}; features: {})",
            env!("CARGO_PKG_VERSION"),
            env!("MOCO_GIT_COMMIT"),
            features.join(", ")
        )
    })
}

/// Says once, at the start of a command that computes, which engines a library missing at
/// build time left this binary with, and what installing it brings.
fn note_missing_libraries() {
    if let Some(why) = moco_models::ops::ONEDNN_MISSING {
        eprintln!("note: this moco was built without oneDNN ({why}): CPU convolutions run on the gemm crate, about 1.35x fewer training images/s (docs/benchmarks.md); `apt-get install libdnnl-dev` and rebuild for oneDNN");
    }
    if let Some(why) = moco_data::LIBJPEG_MISSING {
        eprintln!("note: this moco was built without libjpeg ({why}): JPEGs are decoded by the `image` crate, within a few levels of PIL rather than bit for bit; `apt-get install libjpeg-dev` and rebuild for libjpeg");
    }
}

/// Momentum Contrast (MoCo) self-supervised pretraining on Candle.
#[derive(Debug, Parser)]
#[command(name = "moco", version = version(), about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a preset's fully resolved configuration as JSON (a starting point for a config file).
    Config(config::ConfigArgs),
    /// Print the default pretraining configuration as TOML (a starting point for --config).
    ConfigRun,
    /// One MoCo step on --device next to the same step on the CPU (same weights, queue, input):
    /// loss and every updated tensor must agree within the tolerance.
    CheckDevice(check::CheckArgs),
    /// Draw a run's training curves (loss, acc1, lr per step; kNN top-1 per epoch) into PNG files.
    Plot(plot::PlotArgs),
    /// Convert an official MoCo checkpoint (checkpoint_*.pth.tar of v1, v2 or v3, zip or legacy
    /// torch.save) into a safetensors encoder with torchvision (ResNet) or timm (ViT) names.
    Convert(convert::ConvertArgs),
    /// Pooled backbone features of every image in a folder (sorted by file name).
    Extract(extract::ExtractArgs),
    /// MoCo pretraining. With no flags: a small ResNet on the embedded Fashion-MNIST subset for a
    /// short budget, then its kNN accuracy. Flags override the preset, which overrides --config.
    Pretrain(Box<pretrain::PretrainArgs>),
    /// Weighted kNN accuracy (k=200, t=0.1, as the official CIFAR demo) of frozen features.
    Knn(evaluate::KnnArgs),
    /// The linear classification protocol of main_lincls.py (frozen backbone, fresh fc).
    LinearEval(evaluate::LinearEvalArgs),
    /// A Hugging Face model folder: model.safetensors (backbone, torchvision or timm names), config.json,
    /// README.md model card.
    Export(export::ExportArgs),
    /// Upload a folder written by `moco export` to the Hugging Face Hub (token: HF_TOKEN or the
    /// standard token file).
    Push(hub::PushArgs),
    /// Throughput benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Data-parallel pretraining: starts one `moco pretrain` process per GPU (or CPU process)
    /// on this machine with its rank, and stops them all if one fails.
    /// Example: `moco launch --nproc-per-node 8 -- --preset v2 --device cuda --out runs/v2`.
    Launch(launch::Launch),
    /// Print a shell completion script: `moco completions bash > ~/.local/share/bash-completion/completions/moco`
    /// (zsh: a file `_moco` on $fpath; fish: ~/.config/fish/completions/moco.fish).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
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
    // The kernel settings, read once: a bad MOCO_CPU_CONV, MOCO_CPU_KERNELS or MOCO_CUDNN_BN is
    // an error before any work.
    let settings = moco_models::Settings::from_env()?;
    if matches!(
        cli.command,
        Command::Pretrain(_)
            | Command::Knn(_)
            | Command::LinearEval(_)
            | Command::Extract(_)
            | Command::Bench(_)
            | Command::CheckDevice(_)
    ) {
        note_missing_libraries();
    }
    match cli.command {
        Command::Config(a) => a.run(),
        Command::ConfigRun => config::print_run_config(),
        Command::CheckDevice(a) => a.run(settings),
        Command::Plot(a) => a.run(),
        Command::Convert(a) => a.run(),
        Command::Extract(a) => a.run(settings),
        Command::Pretrain(a) => a.run(settings),
        Command::Knn(a) => a.run(settings),
        Command::LinearEval(a) => a.run(settings),
        Command::Export(a) => a.run(),
        Command::Push(a) => a.run(),
        Command::Bench(b) => b.run(settings),
        Command::Launch(l) => launch::run(&l),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            use std::io::Write;
            // Generated into memory first: clap_complete panics on a failed write.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "moco", &mut script);
            match std::io::stdout().write_all(&script) {
                // A reader that stopped early (`| head`) is not an error.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                r => Ok(r?),
            }
        }
    }
}
