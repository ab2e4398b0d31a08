//! `moco convert`: an official MoCo (v1, v2 or v3) checkpoint to a safetensors encoder with
//! torchvision (ResNet) or timm (ViT) names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use moco_models::weights::official::import_official_as;
use moco_models::Settings;

/// Converts `input` (`checkpoint_*.pth.tar`) into `out`: the query encoder (backbone and head;
/// v3's base encoder with its projector), with `arch`, `head`, `dim` (and the full spec) in the
/// metadata. `arch` names the architecture when the weights cannot (a ViT of a non-standard
/// width: `vit-DxNhH`) and is checked against them.
pub fn run(input: &Path, out: &Path, arch: Option<&str>) -> Result<()> {
    super::outputs::check_file("--out", out, &[("--input", input)])?;
    let ckpt = import_official_as(input, arch).context("--input / --arch")?;
    // Build the encoder from the tensors: every variable must be there with its shape.
    let (_, vars, unused) = moco_models::encoder_from_tensors(
        ckpt.spec,
        &ckpt.encoder_q,
        Settings::default(),
        &Device::Cpu,
        input,
    )?;
    if let Some(first) = unused.first() {
        anyhow::bail!(
            "{}: tensor `encoder_q.{first}` is not part of {} ({} unused)",
            input.display(),
            ckpt.spec.backbone.arch(),
            unused.len()
        );
    }
    let tensors: BTreeMap<_, _> = vars
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned lock"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
        .collect();
    moco_models::save_weights(out, &ckpt.spec, &tensors).context("--out")?;
    let meta = ckpt.spec.metadata();
    println!(
        "{} -> {}: {} with {} head (dim {}), {} tensors",
        input.display(),
        out.display(),
        meta["arch"],
        meta["head"],
        meta["dim"],
        tensors.len()
    );
    Ok(())
}

/// Convert an official MoCo checkpoint (checkpoint_*.pth.tar of v1, v2 or v3, zip or legacy
/// torch.save) into a safetensors encoder with torchvision (ResNet) or timm (ViT) names.
#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// The checkpoint written by main_moco.py of facebookresearch/moco (v1, v2) or
    /// facebookresearch/moco-v3 (ResNets and ViTs).
    #[arg(long)]
    pub input: PathBuf,
    /// The safetensors file to write (query encoder: backbone and head).
    #[arg(long)]
    pub out: PathBuf,
    /// The architecture, checked against the weights; needed for a ViT of a non-standard
    /// width (vit-DxNhH: the weights do not record the number of heads).
    #[arg(long)]
    pub arch: Option<String>,
}

impl ConvertArgs {
    /// Converts the checkpoint.
    pub fn run(&self) -> Result<()> {
        run(&self.input, &self.out, self.arch.as_deref())
    }
}
