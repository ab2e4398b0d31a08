//! # moco-models
//!
//! Trainable backbones for MoCo on Candle, with torchvision's (ResNets) and timm's (ViTs)
//! parameter names so that weights move between moco-rs and PyTorch without renaming:
//!
//! - [`resnet`]: ResNet-18/34/50/101/152 (torchvision v1.5) and small-image variants
//!   (`resnet18-small`, ...: 3x3 stride-1 stem, no max-pool), any input channels, any width;
//! - [`vit`]: MoCo v3's Vision Transformers (`vit_tiny`, `vit_small`, `vit_base`; timm names),
//!   any image, patch and channel count;
//! - [`batch_norm`]: BatchNorm honouring `train`, with the official demo's split mode;
//! - [`head`]: v1 linear, v2 MLP and v3 projector/predictor heads;
//! - [`Encoder`]: a backbone with its head, built from an [`EncoderSpec`], saved to and loaded
//!   from safetensors with the architecture in the metadata;
//! - [`checkpoint`]: import of official MoCo (v1, v2, v3) `checkpoint_*.pth.tar` files;
//! - [`cpu_conv`], [`cpu_batch_norm`], [`cpu_elementwise`], [`cpu_pool`], [`cpu_transformer`]: the fused CPU
//!   kernels the backbones run on (other devices run candle's ops, the convolution with its own
//!   backward pass, on cuDNN for float32 CUDA tensors with the `cudnn` feature).

mod attached;
pub mod batch_norm;
pub mod checkpoint;
pub mod cpu_batch_norm;
pub mod cpu_conv;
pub mod cpu_elementwise;
pub mod cpu_pool;
pub mod cpu_transformer;
#[cfg(feature = "cudnn")]
mod cudnn_conv;
#[cfg(feature = "cudnn")]
mod cudnn_norm;
mod error;
mod generic_conv;
mod generic_norm;
mod generic_transformer;
pub mod head;
#[cfg(feature = "onednn")]
mod onednn;
pub mod resnet;
mod scratch;
#[cfg(test)]
mod test_util;
pub mod vit;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::Shape;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, ModuleT, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

pub use error::{Error, Result};
pub use head::{Head, HeadKind};
pub use resnet::{Depth, ResNet, ResNetConfig};
pub use vit::{Vit, VitConfig};

/// Every architecture name `--arch` accepts.
pub const ARCH_NAMES: [&str; 13] = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet18-small",
    "resnet34-small",
    "resnet50-small",
    "vit_tiny",
    "vit_small",
    "vit_base",
    "vit_conv_small",
    "vit_conv_base",
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

/// The backbone of an [`Encoder`]: its configuration. Serialised (in weight files' `spec`) as
/// `{"resnet": {...}}` or `{"vit": {...}}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum BackboneConfig {
    /// A ResNet.
    #[serde(rename = "resnet")]
    ResNet(ResNetConfig),
    /// A Vision Transformer.
    #[serde(rename = "vit")]
    Vit(VitConfig),
}

impl BackboneConfig {
    /// The standard configuration of an architecture name (see [`ARCH_NAMES`]).
    pub fn from_arch(name: &str) -> Result<Self> {
        if name.starts_with("vit") {
            Ok(Self::Vit(VitConfig::from_arch(name)?))
        } else {
            Ok(Self::ResNet(ResNetConfig::from_arch(name)?))
        }
    }

    /// `arch` sized for an input: `width` is a ResNet's first-stage width, `image_size` and
    /// `patch_size` (default: the architecture's, 16) a ViT's; `in_channels` either's. The error
    /// names the setting that does not fit.
    pub fn for_input(
        arch: &str,
        width: usize,
        in_channels: usize,
        image_size: usize,
        patch_size: Option<usize>,
    ) -> Result<Self> {
        Ok(match Self::from_arch(arch)? {
            Self::ResNet(r) => Self::ResNet(ResNetConfig {
                width,
                in_channels,
                ..r
            }),
            Self::Vit(v) => {
                let v = VitConfig {
                    image_size,
                    in_channels,
                    patch_size: patch_size.unwrap_or(v.patch_size),
                    ..v
                };
                v.validate()?;
                Self::Vit(v)
            }
        })
    }

    /// The architecture name.
    pub fn arch(&self) -> String {
        match self {
            Self::ResNet(r) => r.arch(),
            Self::Vit(v) => v.arch(),
        }
    }

    /// Dimension of the pooled features.
    pub fn feature_dim(&self) -> usize {
        match self {
            Self::ResNet(r) => r.feature_dim(),
            Self::Vit(v) => v.feature_dim(),
        }
    }

    /// Input channels.
    pub fn in_channels(&self) -> usize {
        match self {
            Self::ResNet(r) => r.in_channels,
            Self::Vit(v) => v.in_channels,
        }
    }

    /// The ResNet configuration, when it is one.
    pub fn resnet(&self) -> Option<&ResNetConfig> {
        match self {
            Self::ResNet(r) => Some(r),
            Self::Vit(_) => None,
        }
    }

    /// Where the head's variables live: `fc` on a ResNet (torchvision), `head` on a ViT (timm).
    pub fn head_prefix(&self) -> &'static str {
        match self {
            Self::ResNet(_) => "fc",
            Self::Vit(_) => "head",
        }
    }
}

/// What an [`Encoder`] is made of.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EncoderSpec {
    /// The backbone.
    #[serde(flatten)]
    pub backbone: BackboneConfig,
    /// The head.
    pub head: HeadKind,
}

impl EncoderSpec {
    /// A spec from an architecture name and a head (3 input channels; width 64 for a ResNet,
    /// 224x224 input for a ViT).
    pub fn new(arch: &str, head: HeadKind) -> Result<Self> {
        Ok(Self {
            backbone: BackboneConfig::from_arch(arch)?,
            head,
        })
    }

    /// A ResNet spec.
    pub fn resnet(resnet: ResNetConfig, head: HeadKind) -> Self {
        Self {
            backbone: BackboneConfig::ResNet(resnet),
            head,
        }
    }

    /// Metadata recorded in weight files: `arch`, `head`, `dim`, `in_channels`, `feature_dim`,
    /// `width` (ResNets) or `image_size` and `patch_size` (ViTs), and `spec` (this spec as JSON).
    pub fn metadata(&self) -> HashMap<String, String> {
        let b = &self.backbone;
        let mut m = HashMap::new();
        m.insert("arch".into(), b.arch());
        m.insert("head".into(), self.head.name().into());
        m.insert("dim".into(), self.head.out_dim(b.feature_dim()).to_string());
        m.insert("feature_dim".into(), b.feature_dim().to_string());
        m.insert("in_channels".into(), b.in_channels().to_string());
        match b {
            BackboneConfig::ResNet(r) => {
                m.insert("width".into(), r.width.to_string());
            }
            BackboneConfig::Vit(v) => {
                m.insert("image_size".into(), v.image_size.to_string());
                m.insert("patch_size".into(), v.patch_size.to_string());
            }
        }
        m.insert(
            "spec".into(),
            serde_json::to_string(self).unwrap_or_default(),
        );
        m
    }
}

/// A built backbone.
#[derive(Debug, Clone)]
pub enum Net {
    /// A ResNet.
    ResNet(ResNet),
    /// A Vision Transformer.
    Vit(Vit),
}

impl Net {
    /// Pooled features, N x feature dimension.
    pub fn features(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match self {
            Net::ResNet(r) => r.features(x, train),
            Net::Vit(v) => v.features(x, train),
        }
    }
}

/// A backbone with a projection head (`fc` on a ResNet, `head` on a ViT): the MoCo encoder
/// `f_q` / `f_k`.
#[derive(Debug, Clone)]
pub struct Encoder {
    spec: EncoderSpec,
    backbone: Net,
    head: Head,
}

/// Builds an encoder from `spec`: backbone variables at the root of `vb`, head under
/// [`BackboneConfig::head_prefix`].
pub fn encoder(spec: EncoderSpec, vb: VarBuilder) -> candle_core::Result<Encoder> {
    let backbone = match spec.backbone {
        BackboneConfig::ResNet(r) => Net::ResNet(resnet::resnet(r, vb.clone())?),
        BackboneConfig::Vit(v) => Net::Vit(vit::vit(v, vb.clone())?),
    };
    let head = match (spec.backbone, spec.head) {
        // MoCo v3's ViT projector has three layers (`MoCo_ViT`), its ResNet one two.
        (BackboneConfig::Vit(v), HeadKind::V3 { hidden, dim }) => {
            head::v3_mlp(3, v.feature_dim(), hidden, dim, true, vb.pp("head"))?
        }
        (b, kind) => head::head(kind, b.feature_dim(), vb.pp(b.head_prefix()))?,
    };
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
    pub fn backbone(&self) -> &Net {
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
        self.spec.backbone.feature_dim()
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

/// A [`VarMap`] backend that records the names a builder asks for.
struct Recording {
    vars: VarMap,
    used: Arc<Mutex<HashSet<String>>>,
}

impl SimpleBackend for Recording {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Ok(mut used) = self.used.lock() {
            used.insert(name.to_string());
        }
        self.vars.get(s, name, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        SimpleBackend::get_unchecked(&self.vars, name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        SimpleBackend::contains_tensor(&self.vars, name)
    }
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
    // ones: build, recording the names asked for, then check that nothing was created.
    let used = Arc::new(Mutex::new(HashSet::new()));
    let recording = Recording {
        vars: vars.clone(),
        used: used.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(recording), DType::F32, device.clone());
    let enc = encoder(spec, vb).map_err(|e| {
        Error::file(
            origin,
            format!(
                "does not fit {} with head `{}`: {e}",
                spec.backbone.arch(),
                spec.head.name()
            ),
        )
    })?;
    let used = used
        .lock()
        .map_err(|_| Error::config("weights", "poisoned lock"))?
        .clone();
    let mut data = vars
        .data()
        .lock()
        .map_err(|_| Error::config("weights", "poisoned lock"))?;
    let mut missing: Vec<String> = data
        .keys()
        .filter(|k| !tensors.contains_key(*k))
        .cloned()
        .collect();
    missing.sort();
    if let Some(first) = missing.first() {
        return Err(Error::file(
            origin,
            format!(
                "missing tensor `{first}` ({} missing in all) for {} with head `{}`",
                missing.len(),
                spec.backbone.arch(),
                spec.head.name()
            ),
        ));
    }
    let mut unused: Vec<String> = tensors
        .keys()
        .filter(|k| !used.contains(*k))
        .cloned()
        .collect();
    unused.sort();
    // What the encoder does not use stays out of its variables (and of any optimizer or export).
    for k in &unused {
        data.remove(k);
    }
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
    use moco_core::init::{seeded_randn, seeded_var_builder};

    /// The variables' current values by name.
    fn values(vars: &VarMap) -> HashMap<String, Tensor> {
        vars.data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
            .collect()
    }

    fn build(spec: EncoderSpec) -> (Encoder, VarMap) {
        let vars = VarMap::new();
        let enc = encoder(spec, seeded_var_builder(&vars, 1, DType::F32, &Device::Cpu)).unwrap();
        (enc, vars)
    }

    #[test]
    fn every_arch_name_parses_and_prints_back() {
        for name in ARCH_NAMES {
            assert_eq!(BackboneConfig::from_arch(name).unwrap().arch(), name);
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
            backbone: BackboneConfig::ResNet(ResNetConfig {
                width: 8,
                in_channels: 1,
                ..ResNetConfig::from_arch("resnet50-small").unwrap()
            }),
            head: HeadKind::Mlp { dim: 5 },
        };
        let (enc, vars) = build(spec);
        assert_eq!(enc.feature_dim(), 8 * 8 * 4);
        let x = seeded_randn(0.0, 1., (2, 1, 28, 28), 1, &Device::Cpu).unwrap();
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
            backbone: BackboneConfig::ResNet(ResNetConfig {
                width: 4,
                ..ResNetConfig::from_arch("resnet18-small").unwrap()
            }),
            head: HeadKind::Linear { dim: 3 },
        };
        let (enc, vars) = build(spec);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let tensors: BTreeMap<String, Tensor> = values(&vars).into_iter().collect();
        save_weights(&path, &spec, &tensors).unwrap();
        let (back, _) = load_encoder(&path, None, &Device::Cpu).unwrap();
        assert_eq!(back.spec(), &spec);
        let x = seeded_randn(0.0, 1., (2, 3, 32, 32), 2, &Device::Cpu).unwrap();
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
    fn head_detection_reads_the_v3_projector_and_rejects_unknown_layouts() {
        let spec = EncoderSpec {
            backbone: BackboneConfig::ResNet(ResNetConfig {
                width: 4,
                ..ResNetConfig::from_arch("resnet18-small").unwrap()
            }),
            head: HeadKind::V3 { hidden: 8, dim: 4 },
        };
        let (_, vars) = build(spec);
        let mut t = values(&vars);
        assert_eq!(checkpoint::detect_spec(&t).unwrap(), spec);
        t.remove("fc.4.running_mean");
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
            backbone: BackboneConfig::ResNet(base),
            head: HeadKind::None,
        });
        let split_spec = EncoderSpec {
            backbone: BackboneConfig::ResNet(ResNetConfig {
                bn_splits: 2,
                ..base
            }),
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
        let x = seeded_randn(0.0, 1., (4, 3, 16, 16), 3, &Device::Cpu).unwrap();
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

    #[test]
    fn specs_written_before_vits_still_read_and_vit_specs_round_trip() {
        // The `spec` metadata of weight files written before the ViTs.
        let old = r#"{"resnet":{"depth":"R18","small":true,"in_channels":1,"width":8,"zero_init_residual":false,"bn_splits":4},"head":{"kind":"linear","dim":128}}"#;
        let spec: EncoderSpec = serde_json::from_str(old).unwrap();
        assert_eq!(spec.backbone.arch(), "resnet18-small");
        assert_eq!(serde_json::to_string(&spec).unwrap(), old);
        let vit = EncoderSpec {
            backbone: BackboneConfig::for_input("vit-32x2h2", 0, 1, 28, Some(7)).unwrap(),
            head: HeadKind::V3 { hidden: 8, dim: 4 },
        };
        let json = serde_json::to_string(&vit).unwrap();
        assert!(
            json.starts_with(r#"{"vit":{"image_size":28,"patch_size":7"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<EncoderSpec>(&json).unwrap(), vit);
        let meta = vit.metadata();
        assert_eq!(meta["arch"], "vit-32x2h2");
        assert_eq!(
            (meta["patch_size"].as_str(), meta["dim"].as_str()),
            ("7", "4")
        );
        let e = BackboneConfig::for_input("vit-32x2h2", 0, 1, 28, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("patch_size") && e.contains("28"), "{e}");
    }

    #[test]
    fn tensors_the_encoder_does_not_use_are_reported_and_left_out() {
        let spec = EncoderSpec {
            backbone: BackboneConfig::ResNet(ResNetConfig {
                width: 4,
                ..ResNetConfig::from_arch("resnet18-small").unwrap()
            }),
            head: HeadKind::Linear { dim: 3 },
        };
        let (_, vars) = build(spec);
        let mut t = values(&vars);
        t.insert(
            "predictor.0.weight".into(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        );
        let (_, loaded, unused) =
            encoder_from_tensors(spec, &t, &Device::Cpu, Path::new("mem")).unwrap();
        assert_eq!(unused, ["predictor.0.weight"]);
        assert!(!loaded
            .data()
            .lock()
            .unwrap()
            .contains_key("predictor.0.weight"));
    }
}
