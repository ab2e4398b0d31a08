//! # moco-models
//!
//! Trainable backbones for MoCo on Candle, with torchvision's parameter names so that weights
//! move between moco-rs and PyTorch without renaming:
//!
//! - [`resnet`]: ResNet-18/34/50/101/152 (torchvision v1.5) and small-image variants
//!   (`resnet18-small`, ...: 3x3 stride-1 stem, no max-pool), any input channels, any width;
//! - [`batch_norm`]: BatchNorm honouring `train`, with the official demo's split mode;
//! - [`head`]: v1 linear, v2 MLP and v3 projector/predictor heads;
//! - [`Encoder`]: a backbone with its head, built from an [`EncoderSpec`], saved to and loaded
//!   from safetensors with the architecture in the metadata;
//! - [`checkpoint`]: import of official MoCo `checkpoint_*.pth.tar` files.

pub mod batch_norm;
pub mod checkpoint;
pub mod cpu_batch_norm;
pub mod cpu_conv;
pub mod cpu_elementwise;
mod error;
pub mod head;
#[cfg(feature = "onednn")]
mod onednn;
pub mod resnet;
mod scratch;
#[cfg(test)]
mod test_util;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

pub use error::{Error, Result};
pub use head::{Head, HeadKind};
pub use resnet::{Depth, ResNet, ResNetConfig};

/// Every architecture name `--arch` accepts.
pub const ARCH_NAMES: [&str; 8] = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet18-small",
    "resnet34-small",
    "resnet50-small",
];

/// A network that maps images to pooled features, and (through its head) to embeddings.
pub trait Backbone: ModuleT {
    /// Dimension of the pooled features (before the head).
    fn feature_dim(&self) -> usize;
    /// Pooled backbone features, N x `feature_dim()`.
    fn features(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor>;
    /// Features through the head (what `forward_t` returns).
    fn embed(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward_t(x, train)
    }
}

/// What an [`Encoder`] is made of.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EncoderSpec {
    /// The backbone.
    pub resnet: ResNetConfig,
    /// The head.
    pub head: HeadKind,
}

impl EncoderSpec {
    /// A spec from an architecture name and a head (3 input channels, width 64).
    pub fn new(arch: &str, head: HeadKind) -> Result<Self> {
        Ok(Self {
            resnet: ResNetConfig::from_arch(arch)?,
            head,
        })
    }

    /// Metadata recorded in weight files: `arch`, `head`, `dim`, `in_channels`, `width`,
    /// `feature_dim`, and `spec` (this spec as JSON).
    pub fn metadata(&self) -> HashMap<String, String> {
        let r = &self.resnet;
        let mut m = HashMap::new();
        m.insert("arch".into(), r.arch());
        m.insert("head".into(), self.head.name().into());
        m.insert("dim".into(), self.head.out_dim(r.feature_dim()).to_string());
        m.insert("feature_dim".into(), r.feature_dim().to_string());
        m.insert("in_channels".into(), r.in_channels.to_string());
        m.insert("width".into(), r.width.to_string());
        m.insert(
            "spec".into(),
            serde_json::to_string(self).unwrap_or_default(),
        );
        m
    }
}

/// A ResNet backbone with a projection head (`fc`): the MoCo encoder `f_q` / `f_k`.
#[derive(Debug, Clone)]
pub struct Encoder {
    spec: EncoderSpec,
    backbone: ResNet,
    head: Head,
}

/// Builds an encoder from `spec`: backbone variables at the root of `vb`, head under `fc`.
pub fn encoder(spec: EncoderSpec, vb: VarBuilder) -> candle_core::Result<Encoder> {
    let backbone = resnet::resnet(spec.resnet, vb.clone())?;
    let head = head::head(spec.head, spec.resnet.feature_dim(), vb.pp("fc"))?;
    Ok(Encoder {
        spec,
        backbone,
        head,
    })
}

impl Encoder {
    /// The spec it was built from.
    pub fn spec(&self) -> &EncoderSpec {
        &self.spec
    }
    /// The backbone alone.
    pub fn backbone(&self) -> &ResNet {
        &self.backbone
    }
}

impl ModuleT for Encoder {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.head
            .forward_t(&self.backbone.features(x, train)?, train)
    }
}

impl Backbone for Encoder {
    fn feature_dim(&self) -> usize {
        self.spec.resnet.feature_dim()
    }
    fn features(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.backbone.features(x, train)
    }
}

/// Saves `vars` (named as the encoder built them) with `spec` in the metadata, atomically.
pub fn save_weights(
    path: &Path,
    spec: &EncoderSpec,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<()> {
    Ok(moco_core::io::save_atomic(
        path,
        tensors,
        Some(spec.metadata()),
    )?)
}

/// Reads the [`EncoderSpec`] recorded in a weight file's metadata.
pub fn spec_from_metadata(path: &Path, meta: &HashMap<String, String>) -> Result<EncoderSpec> {
    let json = meta.get("spec").ok_or_else(|| {
        Error::file(
            path,
            "no `spec` in the metadata: pass the architecture explicitly",
        )
    })?;
    serde_json::from_str(json)
        .map_err(|e| Error::file(path, format!("metadata `spec` is not valid: {e}")))
}

/// Builds an encoder of `spec` whose variables come from `tensors`: every variable the encoder
/// needs must be there with its shape (the error names the first that is not); tensors the
/// encoder does not use are returned by name.
pub fn encoder_from_tensors(
    spec: EncoderSpec,
    tensors: &HashMap<String, Tensor>,
    device: &Device,
    origin: &Path,
) -> Result<(Encoder, VarMap, Vec<String>)> {
    let vars = VarMap::new();
    {
        let mut data = vars
            .data()
            .lock()
            .map_err(|_| Error::config("weights", "poisoned lock"))?;
        for (k, t) in tensors {
            data.insert(
                k.clone(),
                Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(device)?)?,
            );
        }
    }
    // A VarBuilder over a pre-filled map returns existing variables and would create missing
    // ones: build, then check that nothing was created.
    let before: Vec<String> = tensors.keys().cloned().collect();
    let enc = encoder(spec, VarBuilder::from_varmap(&vars, DType::F32, device)).map_err(|e| {
        Error::file(
            origin,
            format!(
                "does not fit {} with head `{}`: {e}",
                spec.resnet.arch(),
                spec.head.name()
            ),
        )
    })?;
    let data = vars
        .data()
        .lock()
        .map_err(|_| Error::config("weights", "poisoned lock"))?;
    let mut missing: Vec<&String> = data.keys().filter(|k| !tensors.contains_key(*k)).collect();
    missing.sort();
    if let Some(first) = missing.first() {
        return Err(Error::file(
            origin,
            format!(
                "missing tensor `{first}` ({} missing in all) for {} with head `{}`",
                missing.len(),
                spec.resnet.arch(),
                spec.head.name()
            ),
        ));
    }
    let mut unused: Vec<String> = before
        .into_iter()
        .filter(|k| !data.contains_key(k))
        .collect();
    unused.sort();
    drop(data);
    Ok((enc, vars, unused))
}

/// Loads an encoder saved by [`save_weights`] (or `moco convert`); `spec` overrides the metadata.
pub fn load_encoder(
    path: &Path,
    spec: Option<EncoderSpec>,
    device: &Device,
) -> Result<(Encoder, VarMap)> {
    let file = moco_core::io::load(path, device)?;
    let spec = match spec {
        Some(s) => s,
        None => spec_from_metadata(path, &file.metadata)?,
    };
    let (enc, vars, _) = encoder_from_tensors(spec, &file.tensors, device, path)?;
    Ok((enc, vars))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(spec: EncoderSpec) -> (Encoder, VarMap) {
        let vars = VarMap::new();
        let enc = encoder(
            spec,
            VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
        )
        .unwrap();
        (enc, vars)
    }

    #[test]
    fn every_arch_name_parses_and_prints_back() {
        for name in ARCH_NAMES {
            assert_eq!(ResNetConfig::from_arch(name).unwrap().arch(), name);
        }
        let err = ResNetConfig::from_arch("resnet101-small")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("resnet101-small") && err.contains("resnet50-small"),
            "{err}"
        );
    }

    #[test]
    fn feature_dims_and_output_shapes() {
        let spec = EncoderSpec {
            resnet: ResNetConfig {
                width: 8,
                in_channels: 1,
                ..ResNetConfig::from_arch("resnet50-small").unwrap()
            },
            head: HeadKind::Mlp { dim: 5 },
        };
        let (enc, vars) = build(spec);
        assert_eq!(enc.feature_dim(), 8 * 8 * 4);
        let x = Tensor::randn(0f32, 1., (2, 1, 28, 28), &Device::Cpu).unwrap();
        assert_eq!(enc.features(&x, false).unwrap().dims(), [2, 256]);
        assert_eq!(enc.forward_t(&x, false).unwrap().dims(), [2, 5]);
        let names: Vec<String> = vars.data().lock().unwrap().keys().cloned().collect();
        for n in [
            "conv1.weight",
            "layer1.0.conv3.weight",
            "layer4.0.downsample.1.running_var",
            "fc.0.weight",
            "fc.2.bias",
        ] {
            assert!(names.iter().any(|k| k == n), "missing {n}");
        }
        // A wrong channel count is an error naming the expected shape.
        let bad = Tensor::zeros((2, 3, 28, 28), DType::F32, &Device::Cpu).unwrap();
        let err = enc.forward_t(&bad, false).unwrap_err().to_string();
        assert!(err.contains("(N, 1, H, W)"), "{err}");
    }

    #[test]
    fn weights_round_trip_through_safetensors() {
        let spec = EncoderSpec {
            resnet: ResNetConfig {
                width: 4,
                ..ResNetConfig::from_arch("resnet18-small").unwrap()
            },
            head: HeadKind::Linear { dim: 3 },
        };
        let (enc, vars) = build(spec);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let tensors: BTreeMap<String, Tensor> = vars
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
            .collect();
        save_weights(&path, &spec, &tensors).unwrap();
        let (back, _) = load_encoder(&path, None, &Device::Cpu).unwrap();
        assert_eq!(back.spec(), &spec);
        let x = Tensor::randn(0f32, 1., (2, 3, 32, 32), &Device::Cpu).unwrap();
        let (a, b) = (
            enc.forward_t(&x, false).unwrap(),
            back.forward_t(&x, false).unwrap(),
        );
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
        // Loading into another architecture names the first missing tensor.
        let other = EncoderSpec {
            head: HeadKind::Mlp { dim: 3 },
            ..spec
        };
        let err = match load_encoder(&path, Some(other), &Device::Cpu) {
            Ok(_) => panic!("loading into another head must fail"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("w.safetensors") && err.contains("missing tensor `fc.0.bias`"),
            "{err}"
        );
    }

    #[test]
    fn head_detection_rejects_unknown_layouts() {
        let (_, vars) = build(EncoderSpec {
            resnet: ResNetConfig {
                width: 4,
                ..ResNetConfig::from_arch("resnet18-small").unwrap()
            },
            head: HeadKind::V3 { hidden: 8, dim: 4 },
        });
        let t: HashMap<String, Tensor> = vars
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
            .collect();
        let err = checkpoint::detect_spec(&t).unwrap_err();
        assert!(err.contains("unrecognised head"), "{err}");
        let mut no_stem = t.clone();
        no_stem.remove("conv1.weight");
        assert!(checkpoint::detect_spec(&no_stem)
            .unwrap_err()
            .contains("conv1.weight"));
    }

    #[test]
    fn split_batch_norm_equals_plain_batch_norm_in_eval_and_differs_in_train() {
        let base = ResNetConfig {
            width: 4,
            ..ResNetConfig::from_arch("resnet18-small").unwrap()
        };
        let (plain, pv) = build(EncoderSpec {
            resnet: base,
            head: HeadKind::None,
        });
        let split_spec = EncoderSpec {
            resnet: ResNetConfig {
                bn_splits: 2,
                ..base
            },
            head: HeadKind::None,
        };
        let tensors: HashMap<String, Tensor> = pv
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_detached_tensor().copy().unwrap()))
            .collect();
        let (split, _, _) =
            encoder_from_tensors(split_spec, &tensors, &Device::Cpu, Path::new("mem")).unwrap();
        let x = Tensor::randn(0f32, 1., (4, 3, 16, 16), &Device::Cpu).unwrap();
        let (a, b) = (
            plain.features(&x, false).unwrap(),
            split.features(&x, false).unwrap(),
        );
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
        let (a, b) = (
            plain.features(&x, true).unwrap(),
            split.features(&x, true).unwrap(),
        );
        assert_ne!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    }
}
