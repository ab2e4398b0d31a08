//! `moco`: Momentum Contrast on Candle from the command line.

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
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Config { preset } => {
            let config = MocoConfig::preset(&preset).context("--preset")?;
            println!("{}", serde_json::to_string_pretty(&config)?);
        }
    }
    Ok(())
}
