//! `moco extract`: pooled backbone features of every image in a folder.

use std::collections::{BTreeMap, HashMap};

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use moco_data::{image_files, EvalTransform, Image};
use moco_models::{Backbone, BackboneConfig, Settings};
use rayon::prelude::*;

use super::device::DeviceArgs;
use super::weights::Weights;

/// Pooled backbone features of every image in a folder (sorted by file name).
#[derive(Debug, clap::Args)]
pub struct ExtractArgs {
    /// Encoder weights: safetensors (moco convert / export / a run), a run folder, an official
    /// .pth.tar, or hf://OWNER/NAME[@REV].
    #[arg(long)]
    pub weights: String,
    /// Architecture, when the weights file does not record it (resnet50, resnet18-small, ...).
    #[arg(long)]
    pub arch: Option<String>,
    /// Folder of images.
    #[arg(long)]
    pub input: PathBuf,
    /// Output safetensors: `features` (N x feature_dim) and the file names in metadata `files`.
    #[arg(long)]
    pub out: PathBuf,
    /// Crop size of the evaluation transform (the shorter side is first resized to size*256/224).
    #[arg(long, default_value_t = 224, value_parser = super::positive)]
    pub image_size: usize,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl ExtractArgs {
    /// Loads the encoder, runs the evaluation transform and the frozen backbone over the images.
    pub fn run(&self, settings: Settings) -> Result<()> {
        let o = self;
        let device = o.device.open()?;
        // The same weights sources as every other command (safetensors, run folder, .pth.tar,
        // hf://); the architecture comes from the metadata or the tensors.
        let w = Weights::read(&o.weights)?;
        super::outputs::check_file(
            "--out",
            &o.out,
            &[("--weights", &w.source), ("--input", &o.input)],
        )?;
        if let Some(arch) = o.arch.as_deref() {
            let want = moco_models::BackboneConfig::from_arch(arch).context("--arch")?;
            let same = match (want, w.spec.backbone) {
                (BackboneConfig::ResNet(a), BackboneConfig::ResNet(b)) => {
                    (a.depth, a.small) == (b.depth, b.small)
                }
                (BackboneConfig::Vit(a), BackboneConfig::Vit(b)) => {
                    (a.embed_dim, a.depth, a.num_heads) == (b.embed_dim, b.depth, b.num_heads)
                }
                _ => false,
            };
            if !same {
                bail!(
                    "--arch {arch}, but {} holds a {}",
                    w.source.display(),
                    w.spec.backbone.arch()
                );
            }
        }
        let spec = w.spec;
        if spec.backbone.in_channels() != 3 {
            bail!(
                "{}: the model takes {} input channel(s); `moco extract` feeds RGB images",
                w.source.display(),
                spec.backbone.in_channels()
            );
        }
        if let BackboneConfig::Vit(v) = spec.backbone {
            if v.image_size != o.image_size {
                bail!(
                    "--image-size {}: {} takes {}x{} images",
                    o.image_size,
                    w.source.display(),
                    v.image_size,
                    v.image_size
                );
            }
        }
        if o.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        moco_cli::MemoryNeed::encoding(&spec, o.image_size, 3, o.batch_size)
            .check(&device, "--image-size/--batch-size")?;
        let enc = w.frozen(&device, settings)?;
        let files = image_files(&o.input).context("--input")?;
        if files.is_empty() {
            bail!(
                "--input {}: no image files (jpg, png, bmp, gif, webp, tif) in this folder",
                o.input.display()
            );
        }
        let transform = EvalTransform::imagenet(o.image_size);
        let mut feats = vec![];
        for chunk in files.chunks(o.batch_size) {
            let images: Vec<Image> = chunk
                .par_iter()
                .map(|p| Image::open_rgb(p))
                .collect::<moco_data::Result<_>>()?;
            let x = transform.batch(&images, &device)?;
            // features: B x feature_dim, eval mode (BatchNorm uses running statistics)
            feats.push(enc.features(&x, false)?.detach().to_device(&Device::Cpu)?);
        }
        let features = Tensor::cat(&feats, 0)?;
        let names: Vec<String> = files
            .iter()
            .map(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        if let Some(bad) = names.iter().find(|n| n.contains(',')) {
            bail!("--input: file name `{bad}` contains a comma, which the `files` metadata list cannot hold");
        }
        let mut meta = HashMap::new();
        meta.insert("files".to_string(), names.join(","));
        meta.insert("arch".to_string(), spec.backbone.arch());
        meta.insert("image_size".to_string(), o.image_size.to_string());
        let mut out = BTreeMap::new();
        out.insert("features".to_string(), features.clone());
        moco_core::io::save_atomic(&o.out, &out, Some(meta)).context("--out")?;
        println!(
            "{} images -> {} ({:?})",
            names.len(),
            o.out.display(),
            features.dims()
        );
        Ok(())
    }
}
