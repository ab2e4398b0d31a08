//! [`Footprint`]: how large an encoder is, from its configuration alone (nothing is built or
//! allocated): its parameters, and a lower bound on the values its training forward pass keeps
//! for the backward. Used to refuse a run that cannot fit before any work (`--width 100000`,
//! `--image-size 100000`) rather than let the machine run out of memory.

use crate::encoder::{BackboneConfig, EncoderSpec};
use crate::head::HeadKind;
use crate::resnet::ResNetConfig;
use crate::vit::VitConfig;

/// Sizes of an encoder, in values (f32: 4 bytes each). Floating point: absurd configurations
/// overflow integers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Footprint {
    /// Parameters (weights and biases; BatchNorm's affine parameters; the head's). Buffers
    /// (running statistics) are not counted.
    pub parameters: f64,
    /// A lower bound on the activations one image's forward pass in training keeps for the
    /// backward: the output of every convolution or linear layer, once (frameworks keep more:
    /// BatchNorm and ReLU outputs too).
    pub activations_per_image: f64,
}

impl Footprint {
    /// The footprint of `spec` on `crop` x `crop` inputs (a ViT's input size is its own).
    pub fn of(spec: &EncoderSpec, crop: usize) -> Self {
        let (mut f, features) = match &spec.backbone {
            BackboneConfig::ResNet(r) => (resnet(r, crop), r.feature_dim() as f64),
            BackboneConfig::Vit(v) => (vit(v), v.feature_dim() as f64),
        };
        let (head_params, head_acts) = match spec.head {
            HeadKind::None => (0.0, 0.0),
            HeadKind::Linear { dim } => (features * dim as f64 + dim as f64, dim as f64),
            HeadKind::Mlp { dim } => {
                let d = dim as f64;
                (
                    features * features + features + features * d + d,
                    features + d,
                )
            }
            // At least two linear layers (the projector has two or three).
            HeadKind::V3 { hidden, dim } => {
                let (h, d) = (hidden as f64, dim as f64);
                (features * h + h * d, h + d)
            }
        };
        f.parameters += head_params;
        f.activations_per_image += head_acts;
        f
    }
}

/// A side length after a stride-2 layer (padding 1, kernel 3, as torchvision's).
fn halve(side: f64) -> f64 {
    (side / 2.0).ceil()
}

fn resnet(r: &ResNetConfig, crop: usize) -> Footprint {
    let c_in = r.in_channels as f64;
    let w = r.width as f64;
    let mut side = crop as f64;
    let (mut params, mut acts);
    if r.small {
        params = 9.0 * c_in * w + 2.0 * w;
        acts = w * side * side;
    } else {
        side = halve(side);
        params = 49.0 * c_in * w + 2.0 * w;
        acts = w * side * side;
        side = halve(side);
    }
    let blocks = r.depth.blocks();
    let expansion = r.feature_dim() as f64 / (8.0 * w);
    let mut in_planes = w;
    for (stage, &n) in blocks.iter().enumerate() {
        let planes = w * (1u64 << stage) as f64;
        if stage > 0 {
            side = halve(side);
        }
        let area = side * side;
        for b in 0..n {
            let out = planes * expansion;
            if expansion > 1.0 {
                params += in_planes * planes + 9.0 * planes * planes + planes * out;
                params += 2.0 * (planes + planes + out);
                acts += (planes + planes + out) * area;
            } else {
                params += 9.0 * in_planes * planes + 9.0 * planes * planes + 4.0 * planes;
                acts += 2.0 * planes * area;
            }
            if b == 0 && (stage > 0 || in_planes != out) {
                params += in_planes * out + 2.0 * out;
                acts += out * area;
            }
            in_planes = out;
        }
    }
    Footprint {
        parameters: params,
        activations_per_image: acts,
    }
}

fn vit(v: &VitConfig) -> Footprint {
    let d = v.embed_dim as f64;
    let p = v.patch_size as f64;
    let tokens = (v.image_size as f64 / p).powi(2) + 1.0;
    let hidden = v.mlp_ratio as f64 * d;
    // The patch projection (a linear one; the convolutional stem is at least as large), the
    // class token, and per block: qkv and projection, the MLP, two LayerNorms.
    let patch = p * p * v.in_channels as f64 * d + d;
    let block = 4.0 * d * d + 4.0 * d + 2.0 * d * hidden + hidden + d + 4.0 * d;
    let params = patch + d + v.depth as f64 * block + 2.0 * d;
    // Per block: q, k, v, the attention output and projection, the MLP's hidden layer and
    // output; the attention matrix of every head.
    let heads = v.num_heads as f64;
    let acts =
        tokens * d + v.depth as f64 * (tokens * (5.0 * d + hidden + d) + heads * tokens * tokens);
    Footprint {
        parameters: params,
        activations_per_image: acts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::Settings;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;
    use moco_core::init::seeded_var_builder;

    /// The count is a lower bound within 3% of the variables of built encoders (which hold
    /// BatchNorm's running statistics and a ViT's position embedding besides the parameters).
    #[test]
    fn parameter_counts_match_built_encoders() {
        let cases: [(&str, usize, Option<usize>, HeadKind); 4] = [
            ("resnet18-small", 8, None, HeadKind::Linear { dim: 128 }),
            ("resnet50-small", 8, None, HeadKind::Mlp { dim: 128 }),
            (
                "resnet18",
                16,
                None,
                HeadKind::V3 {
                    hidden: 64,
                    dim: 32,
                },
            ),
            ("vit-64x2h4", 8, Some(8), HeadKind::Linear { dim: 32 }),
        ];
        for (arch, width, patch, head) in cases {
            let backbone = BackboneConfig::for_input(arch, width, 3, 32, patch).unwrap();
            let spec = EncoderSpec { backbone, head };
            let vars = VarMap::new();
            let vb = seeded_var_builder(&vars, 1, DType::F32, &Device::Cpu);
            crate::encoder::encoder(spec, Settings::default(), vb).unwrap();
            let built: usize = vars.all_vars().iter().map(|v| v.elem_count()).sum();
            let est = Footprint::of(&spec, 32).parameters;
            let built = built as f64;
            assert!(
                est <= built && est >= built * 0.97,
                "{arch}: estimate {est}, built {built}"
            );
        }
    }

    #[test]
    fn activations_grow_with_the_crop_and_absurd_sizes_do_not_overflow() {
        let spec = EncoderSpec::new("resnet18", HeadKind::Linear { dim: 128 }).unwrap();
        let (a, b) = (Footprint::of(&spec, 32), Footprint::of(&spec, 64));
        assert!(b.activations_per_image > 3.5 * a.activations_per_image);
        let huge = Footprint::of(&spec, 100_000);
        assert!(huge.activations_per_image.is_finite() && huge.activations_per_image > 1e11);
    }
}
