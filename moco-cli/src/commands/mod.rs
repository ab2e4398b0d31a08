//! The commands of the `moco` binary, one file each, each owning its flags
//! (`#[derive(clap::Args)]`); the helpers they share: `device` (`--device`, `--tf32`),
//! `weights` (`--weights`), `progress` (the progress bars), `hub` (Hugging Face references),
//! `outputs` (where `--out` may write), [`positive`] (the parser of counts and sizes that must
//! be at least 1).

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
pub mod outputs;
pub mod plot;
pub mod pretrain;
pub mod progress;
pub mod weights;

/// Parses a count or size that must be at least 1 (`value_parser = positive`): a 0 is refused
/// by the argument parser, which names the flag, before any work.
pub fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}
