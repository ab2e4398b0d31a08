//! The commands of the `moco` binary, one file each, each owning its flags
//! (`#[derive(clap::Args)]`); the helpers they share: `device` (`--device`, `--tf32`),
//! `weights` (`--weights`), `progress` (the progress bars), `hub` (Hugging Face references).

pub mod bench;
pub mod check;
pub mod config;
pub mod convert;
pub mod device;
pub mod evaluate;
pub mod export;
pub mod extract;
pub mod hub;
pub mod launch;
pub mod plot;
pub mod pretrain;
pub mod progress;
pub mod weights;
