//! `--weights`: every source of encoder weights the commands accept.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use moco_models::{Encoder, EncoderSpec, Settings};

/// Encoder weights by torchvision name, with the architecture.
pub struct Weights {
    pub spec: EncoderSpec,
    pub tensors: HashMap<String, Tensor>,
    pub source: PathBuf,
}

impl Weights {
    /// Reads `--weights`: a safetensors file from `moco convert`, `moco export` or a pretraining
    /// run (`checkpoint-last.safetensors`: the query encoder is taken), an official
    /// `checkpoint_*.pth.tar`, a run directory, or `hf://OWNER/NAME[@REV]`.
    pub fn read(arg: &str) -> Result<Self> {
        Self::read_as("--weights", arg)
    }

    /// [`Self::read`] for weights given by another flag (`flag`, e.g. `--run`), which the
    /// errors name.
    pub fn read_as(flag: &str, arg: &str) -> Result<Self> {
        let path = super::hub::resolve_weights(arg)?;
        let path = if path.is_dir() {
            let last = path.join("checkpoint-last.safetensors");
            let export = path.join("model.safetensors");
            if last.is_file() {
                last
            } else if export.is_file() {
                export
            } else {
                anyhow::bail!(
                    "{flag} {}: a folder without checkpoint-last.safetensors or model.safetensors",
                    path.display()
                )
            }
        } else {
            path
        };
        let name = path.to_string_lossy();
        if name.ends_with(".pth") || name.ends_with(".pth.tar") || name.ends_with(".tar") {
            let ck =
                moco_models::weights::official::import_official(&path).context(flag.to_string())?;
            let w = Self {
                spec: ck.spec,
                tensors: ck.encoder_q,
                source: path,
            };
            w.check_finite(flag)?;
            return Ok(w);
        }
        let file = moco_core::io::load(&path, &Device::Cpu).context(flag.to_string())?;
        let mut tensors = file.tensors;
        if tensors.keys().any(|k| k.starts_with("encoder_q.")) {
            tensors = tensors
                .into_iter()
                .filter_map(|(k, v)| k.strip_prefix("encoder_q.").map(|s| (s.to_string(), v)))
                // MoCo v3's predictor follows the query encoder only in training.
                .filter(|(k, _)| !k.starts_with("predictor."))
                .collect();
        }
        let spec = match moco_models::spec_from_metadata(&path, &file.metadata) {
            Ok(s) => s,
            Err(_) => moco_models::weights::official::detect_spec(&tensors).map_err(|m| {
                anyhow!(
                    "{flag} {}: no architecture in the metadata and none detected: {m}",
                    path.display()
                )
            })?,
        };
        let w = Self {
            spec,
            tensors,
            source: path,
        };
        w.check_finite(flag)?;
        Ok(w)
    }

    /// An error naming the first tensor holding a NaN or an infinity (weights of a run that
    /// diverged would give chance-level features without a word).
    fn check_finite(&self, flag: &str) -> Result<()> {
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        let named = names.into_iter().map(|n| (n.as_str(), &self.tensors[n]));
        if let Some(name) = moco_core::io::first_non_finite(named)? {
            anyhow::bail!(
                "{flag} {}: tensor `{name}` is not finite (NaN or infinity): the weights come from a run that diverged",
                self.source.display()
            )
        }
        Ok(())
    }

    /// SHA-256 of the weights (names, shapes and float32 values, in name order), as hex: tells
    /// whether two reads hold the same encoder whatever the file or its path.
    pub fn fingerprint(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        let mut h = Sha256::new();
        for name in names {
            let t = &self.tensors[name];
            h.update(name.as_bytes());
            for d in t.dims() {
                h.update((*d as u64).to_le_bytes());
            }
            let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            h.update(&bytes);
        }
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The encoder, frozen: built from plain tensors, so no forward records an autograd graph.
    pub fn frozen(&self, device: &Device, settings: Settings) -> Result<Encoder> {
        let (_, _, unused) = moco_models::encoder_from_tensors(
            self.spec,
            &self.tensors,
            settings,
            &Device::Cpu,
            &self.source,
        )?;
        if let Some(u) = unused.first() {
            anyhow::bail!(
                "{}: tensor `{u}` is not part of {}",
                self.source.display(),
                self.spec.backbone.arch()
            );
        }
        let on_device: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F32)?.to_device(device)?)))
            .collect::<candle_core::Result<_>>()?;
        Ok(moco_models::encoder(
            self.spec,
            settings,
            VarBuilder::from_tensors(on_device, DType::F32, device),
        )?)
    }
}
