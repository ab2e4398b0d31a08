//! `moco`: Momentum Contrast on Candle from the command line.

mod bench;
mod convert;
mod data;
mod device;
mod extract;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use moco_core::MocoConfig;

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
        /// The preset: v1, v2 or cifar.
        #[arg(long, default_value = "v2")]
        preset: String,
    },
    /// Convert an official MoCo checkpoint (checkpoint_*.pth.tar, zip or legacy torch.save) into a
    /// safetensors encoder with torchvision names.
    Convert {
        /// The checkpoint written by facebookresearch/moco's main_moco.py.
        #[arg(long)]
        input: PathBuf,
        /// The safetensors file to write (query encoder: backbone and head).
        #[arg(long)]
        out: PathBuf,
    },
    /// Pooled backbone features of every image in a folder (sorted by file name).
    Extract {
        /// Encoder weights (safetensors from `moco convert` or a pretraining run).
        #[arg(long)]
        weights: PathBuf,
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
        /// cpu, cuda, cuda:N or metal.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Throughput benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Images/s of the data pipeline: decode, two augmented crops, batching.
    Data {
        /// fashion-mnist, mnist, cifar10, cifar100, stl10, folder or default.
        #[arg(long, default_value = "default")]
        dataset: String,
        /// The dataset's folder (for `folder`: DIR/train/CLASS/* or DIR/CLASS/*).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Augmentation preset: v1, v2, cifar or v3.
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

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Config { preset } => {
            let config = MocoConfig::preset(&preset).context("--preset")?;
            println!("{}", serde_json::to_string_pretty(&config)?);
        }
        Command::Convert { input, out } => convert::run(&input, &out)?,
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
            device: device::parse(&device)?,
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
