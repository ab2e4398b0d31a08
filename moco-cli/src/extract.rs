//! `moco extract`: pooled backbone features of every image in a folder.

use std::collections::{BTreeMap, HashMap};

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use moco_data::{image_files, EvalTransform, Image};
use moco_models::{Backbone, BackboneConfig};
use rayon::prelude::*;

/// Options of `moco extract`.
#[derive(Debug)]
pub struct Options<'a> {
    pub weights: &'a str,
    pub arch: Option<&'a str>,
    pub input: &'a Path,
    pub out: &'a Path,
    pub image_size: usize,
    pub batch_size: usize,
    pub device: Device,
    pub settings: moco_models::Settings,
}

/// Loads the encoder, runs the evaluation transform and the frozen backbone over the images.
pub fn run(o: Options) -> Result<()> {
    // The same weights sources as every other command (safetensors, run folder, .pth.tar,
    // hf://); the architecture comes from the metadata or the tensors.
    let w = crate::weights::Weights::read(o.weights)?;
    if let Some(arch) = o.arch {
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
    let enc = w.frozen(&o.device, o.settings)?;
    let files = image_files(o.input).context("--input")?;
    if files.is_empty() {
        bail!(
            "--input {}: no image files (jpg, png, bmp, gif, webp, tif) in this folder",
            o.input.display()
        );
    }
    if o.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let transform = EvalTransform::imagenet(o.image_size);
    let mut feats = vec![];
    for chunk in files.chunks(o.batch_size) {
        let images: Vec<Image> = chunk
            .par_iter()
            .map(|p| Image::open_rgb(p))
            .collect::<moco_data::Result<_>>()?;
        let x = transform.batch(&images, &o.device)?;
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
    moco_core::io::save_atomic(o.out, &out, Some(meta)).context("--out")?;
    println!(
        "{} images -> {} ({:?})",
        names.len(),
        o.out.display(),
        features.dims()
    );
    Ok(())
}
