//! The MoCo encoder `f_q` / `f_k`: a backbone ([`BackboneConfig`]: a ResNet or a ViT) with its
//! projection head, described by an [`EncoderSpec`] (what weight files record) and built by
//! [`encoder`].

use std::collections::HashMap;

use candle_core::Tensor;
use candle_nn::{ModuleT, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::head::{self, Head, HeadKind};
use crate::ops::Settings;
use crate::resnet::{self, ResNet, ResNetConfig};
use crate::vit::{self, Vit, VitConfig};
use crate::Result;

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
/// [`BackboneConfig::head_prefix`]; its layers compute on the ops `settings` choose
/// ([`Settings::default`]: the fused CPU kernels).
pub fn encoder(
    spec: EncoderSpec,
    settings: Settings,
    vb: VarBuilder,
) -> candle_core::Result<Encoder> {
    let backbone = match spec.backbone {
        BackboneConfig::ResNet(r) => Net::ResNet(resnet::resnet(r, settings, vb.clone())?),
        BackboneConfig::Vit(v) => Net::Vit(vit::vit(v, settings, vb.clone())?),
    };
    let head = match (spec.backbone, spec.head) {
        // MoCo v3's ViT projector has three layers (`MoCo_ViT`), its ResNet one two.
        (BackboneConfig::Vit(v), HeadKind::V3 { hidden, dim }) => head::v3_mlp(
            3,
            v.feature_dim(),
            hidden,
            dim,
            true,
            settings,
            vb.pp("head"),
        )?,
        (b, kind) => head::head(kind, b.feature_dim(), settings, vb.pp(b.head_prefix()))?,
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::zoo::ARCH_NAMES;

    #[test]
    fn every_arch_name_parses_and_prints_back() {
        for name in ARCH_NAMES {
            assert_eq!(BackboneConfig::from_arch(name).unwrap().arch(), name);
        }
        let err = crate::ResNetConfig::from_arch("resnet101-small")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("resnet101-small") && err.contains("resnet50-small"),
            "{err}"
        );
    }
}
