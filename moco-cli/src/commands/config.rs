//! `moco config` and `moco config-run`: the configurations a run starts from, printed.

use anyhow::{Context, Result};
use moco_cli::RunConfig;
use moco_core::MocoConfig;

/// Print a preset's fully resolved configuration as JSON (a starting point for a config file).
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// The preset: v1, v2, cifar, v3 or v3-vit.
    #[arg(long, default_value = "v2")]
    pub preset: String,
}

impl ConfigArgs {
    /// Prints the preset as JSON.
    pub fn run(&self) -> Result<()> {
        let config = MocoConfig::preset(&self.preset).context("--preset")?;
        println!("{}", serde_json::to_string_pretty(&config)?);
        Ok(())
    }
}

/// `moco config-run`: the default pretraining configuration as TOML.
pub fn print_run_config() -> Result<()> {
    print!("{}", toml::to_string_pretty(&RunConfig::default())?);
    Ok(())
}
