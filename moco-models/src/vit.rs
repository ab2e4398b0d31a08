//! Vision Transformers as MoCo v3 trains them (`vits.py` of the official code: timm's
//! `VisionTransformer` with a fixed 2-D sine-cosine position embedding, MoCo v3's
//! initialisation and the option to stop the gradient after the patch projection), with timm's
//! parameter names: `patch_embed.proj.*`, `cls_token`, `blocks.{i}.{norm1,attn.qkv,attn.proj,
//! norm2,mlp.fc1,mlp.fc2}.*`, `norm.*`. The head sits under `head`.
//!
//! `vit_conv_small` / `vit_conv_base` replace the linear patch projection by the official
//! `ConvStem` (Xiao et al., "Early convolutions help transformers see better"): stride-2 3x3
//! convolutions without bias, each followed by BatchNorm and ReLU, widths D/8, D/4, D/2, D for
//! 16x16 patches, then a 1x1 convolution with bias to D; one transformer block fewer. Its
//! variables are `patch_embed.proj.{0,1,3,4,6,7,9,10,12}.*` (the `nn.Sequential` indices).
//!
//! The pooled feature is the class token after the final LayerNorm. The position embedding is
//! not a parameter here (it is fixed: the official code stores it with `requires_grad=False`);
//! [`sincos_position_embedding`] computes it. Weights that carry it as `pos_embed` (official
//! checkpoints, `moco export`) are checked against it.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Init, Linear, ModuleT, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::batch_norm::{batch_norm, BatchNorm, BatchNormConfig};
use crate::head::torch_default_init;
use crate::ops::{self, Settings};

/// Everything that shapes a Vision Transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VitConfig {
    /// Input height and width (square images; a multiple of `patch_size`).
    pub image_size: usize,
    /// Side of the square patches.
    pub patch_size: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Token width (a multiple of 4 for the sine-cosine embedding, and of `num_heads`).
    pub embed_dim: usize,
    /// Transformer blocks.
    pub depth: usize,
    /// Attention heads per block.
    pub num_heads: usize,
    /// Hidden width of the MLPs, as a multiple of `embed_dim`.
    pub mlp_ratio: usize,
    /// Freeze the patch projection at its random initialisation (MoCo v3's `--stop-grad-conv1`):
    /// no gradient reaches it, so no optimizer changes it.
    #[serde(default)]
    pub stop_grad_patch_embed: bool,
    /// Patches embedded by MoCo v3's convolutional stem (`vit_conv_*`) instead of one linear
    /// projection: log2(patch_size) stride-2 3x3 convolutions with BatchNorm and ReLU, then a
    /// 1x1 convolution. `patch_size` must be a power of two (the official stem: 16).
    #[serde(default)]
    pub conv_stem: bool,
}

/// The ViT architecture names: `vit_tiny` (192 wide, 3 heads), `vit_small` (384, 12 heads),
/// `vit_base` (768, 12 heads); 12 blocks, 16x16 patches, 224x224 RGB input by default; and
/// `vit_conv_small`, `vit_conv_base`: the convolutional stem and 11 blocks.
pub const VIT_NAMES: [&str; 5] = [
    "vit_tiny",
    "vit_small",
    "vit_base",
    "vit_conv_small",
    "vit_conv_base",
];

/// LayerNorm epsilon of MoCo v3's ViTs.
const LN_EPS: f64 = 1e-6;

impl VitConfig {
    /// A configuration from an architecture name: one of [`VIT_NAMES`], or `vit-{D}x{N}h{H}`
    /// for a width-D, N-block, H-head ViT (MLP ratio 4; `vit-64x4h4` is a CPU-sized one), or
    /// `vit-conv-{D}x{N}h{H}` for one with the convolutional stem.
    pub fn from_arch(name: &str) -> crate::Result<Self> {
        let ((embed_dim, depth, num_heads), conv_stem) = match name {
            "vit_tiny" => ((192, 12, 3), false),
            "vit_small" => ((384, 12, 12), false),
            "vit_base" => ((768, 12, 12), false),
            "vit_conv_small" => ((384, 11, 12), true),
            "vit_conv_base" => ((768, 11, 12), true),
            _ => {
                let (rest, conv) = match name.strip_prefix("vit-conv-") {
                    Some(rest) => (Some(rest), true),
                    None => (name.strip_prefix("vit-"), false),
                };
                let dims = rest
                    .and_then(Self::parse_custom)
                    .ok_or_else(|| crate::zoo::unknown_arch(name))?;
                (dims, conv)
            }
        };
        let c = Self {
            image_size: 224,
            patch_size: 16,
            in_channels: 3,
            embed_dim,
            depth,
            num_heads,
            mlp_ratio: 4,
            stop_grad_patch_embed: false,
            conv_stem,
        };
        c.validate()?;
        Ok(c)
    }

    /// `{D}x{N}h{H}` -> (D, N, H).
    fn parse_custom(rest: &str) -> Option<(usize, usize, usize)> {
        let (d, rest) = rest.split_once('x')?;
        let (n, h) = rest.split_once('h')?;
        Some((d.parse().ok()?, n.parse().ok()?, h.parse().ok()?))
    }

    /// The architecture name: `vit_small` and the like for the standard sizes, else
    /// `vit-{D}x{N}h{H}` (with MLP ratio 4; `vit-{D}x{N}h{H}m{R}` otherwise), `vit-conv-...`
    /// with the convolutional stem.
    pub fn arch(&self) -> String {
        let dims = (self.embed_dim, self.num_heads, self.depth, self.mlp_ratio);
        match (self.conv_stem, dims) {
            (false, (192, 3, 12, 4)) => "vit_tiny".into(),
            (false, (384, 12, 12, 4)) => "vit_small".into(),
            (false, (768, 12, 12, 4)) => "vit_base".into(),
            (true, (384, 12, 11, 4)) => "vit_conv_small".into(),
            (true, (768, 12, 11, 4)) => "vit_conv_base".into(),
            (conv, (d, h, n, r)) => {
                let stem = if conv { "conv-" } else { "" };
                let ratio = if r == 4 {
                    String::new()
                } else {
                    format!("m{r}")
                };
                format!("vit-{stem}{d}x{n}h{h}{ratio}")
            }
        }
    }

    /// Dimension of the pooled features (the class token): `embed_dim`.
    pub fn feature_dim(&self) -> usize {
        self.embed_dim
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Checks the shape constraints; the error names the first setting that breaks one.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |key: &str, msg: String| Err(crate::Error::config(key, msg));
        for (key, v) in [
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("embed_dim", self.embed_dim),
            ("depth", self.depth),
            ("num_heads", self.num_heads),
            ("mlp_ratio", self.mlp_ratio),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        if self.image_size % self.patch_size != 0 {
            return bad(
                "patch_size",
                format!(
                    "{} does not divide the image size {}",
                    self.patch_size, self.image_size
                ),
            );
        }
        if self.embed_dim % 4 != 0 {
            return bad(
                "embed_dim",
                format!(
                    "{} is not a multiple of 4 (the 2-D sine-cosine position embedding)",
                    self.embed_dim
                ),
            );
        }
        if self.embed_dim % self.num_heads != 0 {
            return bad(
                "num_heads",
                format!(
                    "{} heads do not divide the width {}",
                    self.num_heads, self.embed_dim
                ),
            );
        }
        if self.conv_stem {
            let p = self.patch_size;
            if p < 2 || !p.is_power_of_two() {
                return bad(
                    "patch_size",
                    format!("{p}: the convolutional stem halves the image per layer, so its patch size is a power of two (16 in MoCo v3)"),
                );
            }
            let narrowest = p / 2; // the first layer's width is embed_dim / (patch / 2)
            if self.embed_dim % narrowest != 0 {
                return bad(
                    "embed_dim",
                    format!(
                        "{} is not a multiple of {narrowest}, the width ratio of the convolutional stem's first and last layers for {p}x{p} patches",
                        self.embed_dim
                    ),
                );
            }
            if self.stop_grad_patch_embed {
                return bad(
                    "stop_grad_patch_embed",
                    "freezes the linear patch projection; the convolutional stem trains (the official code ignores the flag there)".into(),
                );
            }
        }
        Ok(())
    }

    /// The convolutional stem's layers: (input channels, output channels) of each stride-2 3x3
    /// convolution; empty without the stem.
    pub fn stem_widths(&self) -> Vec<(usize, usize)> {
        if !self.conv_stem {
            return vec![];
        }
        let layers = self.patch_size.trailing_zeros() as usize;
        let mut cin = self.in_channels;
        (0..layers)
            .map(|i| {
                let cout = self.embed_dim >> (layers - 1 - i);
                let io = (cin, cout);
                cin = cout;
                io
            })
            .collect()
    }
}

/// MoCo v3's fixed position embedding, 1 x (1 + grid^2) x dim: zeros for the class token, then
/// for patch m (row-major) `[sin(a w), cos(a w), sin(b w), cos(b w)]` with `a = m / grid`,
/// `b = m % grid` (the official code's `meshgrid` order) and `w_d = 10000^(-d / (dim / 4))`,
/// computed in float32 as the official code does.
pub fn sincos_position_embedding(grid: usize, dim: usize, device: &Device) -> Result<Tensor> {
    let q = dim / 4;
    let omega: Vec<f32> = (0..q)
        .map(|d| 1.0 / 10000f32.powf(d as f32 / q as f32))
        .collect();
    let mut out = vec![0f32; (1 + grid * grid) * dim];
    for m in 0..grid * grid {
        let (a, b) = ((m / grid) as f32, (m % grid) as f32);
        let row = &mut out[(1 + m) * dim..(2 + m) * dim];
        for (d, &w) in omega.iter().enumerate() {
            row[d] = (a * w).sin();
            row[q + d] = (a * w).cos();
            row[2 * q + d] = (b * w).sin();
            row[3 * q + d] = (b * w).cos();
        }
    }
    Tensor::from_vec(out, (1, 1 + grid * grid, dim), device)
}

#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

fn layer_norm(dim: usize, vb: VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
        bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
    })
}

impl LayerNorm {
    /// `torch.nn.LayerNorm` over the last dimension (biased variance).
    fn forward(&self, x: &Tensor, s: &Settings) -> Result<Tensor> {
        ops::transformer::layer_norm(x, &self.weight, &self.bias, LN_EPS, s)
    }
}

/// A linear layer on the last dimension of a tensor of any rank (flattened to 2-D for one GEMM),
/// keeping no product before the bias for the backward pass.
fn linear(lin: &Linear, x: &Tensor, s: &Settings) -> Result<Tensor> {
    ops::linear::linear(x, lin.weight(), bias(lin)?, s)
}

/// A ViT linear layer's bias (every one has one).
fn bias(lin: &Linear) -> Result<&Tensor> {
    match lin.bias() {
        Some(b) => Ok(b),
        None => candle_core::bail!("a ViT linear layer without a bias"),
    }
}

/// `r + linear(lin, x)`, keeping no more for the backward pass than the linear layer does.
fn linear_add(lin: &Linear, x: &Tensor, r: &Tensor, s: &Settings) -> Result<Tensor> {
    ops::linear::linear_add(x, lin.weight(), bias(lin)?, r, s)
}

/// A linear layer with MoCo v3's initialisation: weight uniform in +-`bound`, bias zero.
fn vit_linear(cin: usize, cout: usize, bound: f64, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints(
        (cout, cin),
        "weight",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    let b = vb.get_with_hints(cout, "bias", Init::Const(0.0))?;
    Ok(Linear::new(w, Some(b)))
}

/// Xavier-uniform bound for a `cin -> cout` layer.
fn xavier(cin: usize, cout: usize) -> f64 {
    (6.0 / (cin + cout) as f64).sqrt()
}

#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl Block {
    fn new(c: &VitConfig, vb: VarBuilder) -> Result<Self> {
        let d = c.embed_dim;
        let h = d * c.mlp_ratio;
        Ok(Self {
            norm1: layer_norm(d, vb.pp("norm1"))?,
            // The official initialisation treats Q, K and V as three d x d layers.
            qkv: vit_linear(d, 3 * d, xavier(d, d), vb.pp("attn.qkv"))?,
            proj: vit_linear(d, d, xavier(d, d), vb.pp("attn.proj"))?,
            norm2: layer_norm(d, vb.pp("norm2"))?,
            fc1: vit_linear(d, h, xavier(d, h), vb.pp("mlp.fc1"))?,
            fc2: vit_linear(h, d, xavier(h, d), vb.pp("mlp.fc2"))?,
            heads: c.num_heads,
        })
    }

    fn forward(&self, x: &Tensor, s: &Settings) -> Result<Tensor> {
        // Multi-head self-attention: softmax(q k^T / sqrt(hd)) v per head.
        let qkv = linear(&self.qkv, &self.norm1.forward(x, s)?, s)?;
        let heads = ops::transformer::attention(&qkv, self.heads, s)?;
        let x = linear_add(&self.proj, &heads, x, s)?;
        // MLP with the exact (erf) GELU.
        let m = linear(&self.fc1, &self.norm2.forward(&x, s)?, s)?;
        let m = ops::transformer::gelu_erf(&m, s)?;
        linear_add(&self.fc2, &m, &x, s)
    }
}

/// How patches become tokens.
#[derive(Debug, Clone)]
enum PatchEmbed {
    /// One p x p stride-p convolution (`patch_embed.proj`).
    Linear { weight: Tensor, bias: Tensor },
    /// MoCo v3's convolutional stem: stride-2 3x3 convolutions without bias, each followed by
    /// BatchNorm and ReLU, then a 1x1 convolution with bias.
    Conv {
        layers: Vec<(Tensor, BatchNorm)>,
        weight: Tensor,
        bias: Tensor,
    },
}

impl PatchEmbed {
    fn new(config: &VitConfig, settings: Settings, vb: VarBuilder) -> Result<Self> {
        let (d, p, c) = (config.embed_dim, config.patch_size, config.in_channels);
        if !config.conv_stem {
            let bound = xavier(c * p * p, d);
            let weight = vb.get_with_hints(
                (d, c, p, p),
                "weight",
                Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )?;
            let bias = vb.get_with_hints(d, "bias", Init::Const(0.0))?;
            return Ok(Self::Linear { weight, bias });
        }
        let widths = config.stem_widths();
        let layers = widths
            .iter()
            .enumerate()
            .map(|(i, &(cin, cout))| {
                let w = vb.get_with_hints(
                    (cout, cin, 3, 3),
                    &format!("{}.weight", 3 * i),
                    torch_default_init(cin * 9),
                )?;
                let bn = batch_norm(cout, BatchNormConfig::default(), settings, vb.pp(3 * i + 1))?;
                Ok((w, bn))
            })
            .collect::<Result<Vec<_>>>()?;
        let last = vb.pp(3 * widths.len());
        let weight = last.get_with_hints((d, d, 1, 1), "weight", torch_default_init(d))?;
        let bias = last.get_with_hints(d, "bias", torch_default_init(d))?;
        Ok(Self::Conv {
            layers,
            weight,
            bias,
        })
    }

    /// (N, C, H, W) images -> (N, patches, D) tokens, patches in row-major order.
    fn forward(&self, config: &VitConfig, x: &Tensor, train: bool, s: &Settings) -> Result<Tensor> {
        let (n, ch, _, _) = x.dims4()?;
        let (p, g, d) = (config.patch_size, config.grid(), config.embed_dim);
        let weight_dtype = match self {
            Self::Linear { weight, .. } | Self::Conv { weight, .. } => weight.dtype(),
        };
        let x = x.to_dtype(weight_dtype)?;
        // Both end in a linear map over the channels of each patch: rows (N * g * g, K).
        let (rows, weight, bias) = match self {
            Self::Linear { weight, bias } => {
                // The p x p stride-p convolution as one GEMM over the patches.
                let rows = x
                    .reshape((n, ch, g, p, g, p))?
                    .permute((0, 2, 4, 1, 3, 5))?
                    .contiguous()?
                    .reshape((n * g * g, ch * p * p))?;
                if config.stop_grad_patch_embed {
                    (rows, weight.detach(), bias.detach())
                } else {
                    (rows, weight.clone(), bias.clone())
                }
            }
            Self::Conv {
                layers,
                weight,
                bias,
            } => {
                let mut y = x;
                for (w, bn) in layers {
                    y = bn.forward_relu_t(&ops::conv::conv2d(&y, w, 1, 2, 1, s)?, train)?;
                }
                let rows = y
                    .permute((0, 2, 3, 1))?
                    .contiguous()?
                    .reshape((n * g * g, d))?;
                (rows, weight.clone(), bias.clone())
            }
        };
        let k = rows.dim(1)?;
        rows.matmul(&weight.reshape((d, k))?.t()?)?
            .broadcast_add(&bias)?
            .reshape((n, g * g, d))
    }
}

/// A Vision Transformer backbone (see the module documentation).
#[derive(Debug, Clone)]
pub struct Vit {
    config: VitConfig,
    patch: PatchEmbed,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    settings: Settings,
}

/// Builds a ViT with MoCo v3's initialisation (timm's `VisionTransformer` + `vits.py`): Q, K,
/// V weights uniform in +-sqrt(6 / 2d), the other linear weights Xavier-uniform, biases zero,
/// class token N(0, 1e-6^2), patch projection Xavier-uniform over (channels x patch^2, dim),
/// LayerNorms 1 and 0; a convolutional stem keeps PyTorch's defaults (convolutions uniform in
/// +-1/sqrt(fan_in), BatchNorm 1 and 0), as the official code leaves it. Its layers compute on
/// the ops `settings` choose.
pub fn vit(config: VitConfig, settings: Settings, vb: VarBuilder) -> Result<Vit> {
    config
        .validate()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let d = config.embed_dim;
    let patch = PatchEmbed::new(&config, settings, vb.pp("patch_embed.proj"))?;
    let cls_token = vb.get_with_hints(
        (1, 1, d),
        "cls_token",
        Init::Randn {
            mean: 0.0,
            stdev: 1e-6,
        },
    )?;
    let pos_embed =
        sincos_position_embedding(config.grid(), d, vb.device())?.to_dtype(vb.dtype())?;
    // Weights from the official code (or `moco export`) carry the fixed embedding as
    // `pos_embed`: it must be this one (a learned embedding is not supported).
    if vb.contains_tensor("pos_embed") {
        let stored = vb.get((1, 1 + config.grid() * config.grid(), d), "pos_embed")?;
        let diff = (stored.to_dtype(DType::F32)? - pos_embed.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        if diff > 1e-5 {
            candle_core::bail!(
                "`pos_embed` is {diff:e} away from MoCo v3's fixed 2-D sine-cosine embedding; a learned position embedding is not supported"
            )
        }
    }
    let blocks = (0..config.depth)
        .map(|i| Block::new(&config, vb.pp(format!("blocks.{i}"))))
        .collect::<Result<Vec<_>>>()?;
    let norm = layer_norm(d, vb.pp("norm"))?;
    Ok(Vit {
        config,
        patch,
        cls_token,
        pos_embed,
        blocks,
        norm,
        settings,
    })
}

impl Vit {
    /// The configuration.
    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    /// The fixed position embedding this network adds (see [`sincos_position_embedding`]).
    pub fn pos_embed(&self) -> &Tensor {
        &self.pos_embed
    }

    /// The tokens after the final LayerNorm, N x (1 + patches) x dim (class token first);
    /// `train` is the convolutional stem's BatchNorm mode.
    pub fn tokens(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let c = &self.config;
        let (n, ch, h, w) = x.dims4()?;
        if (ch, h, w) != (c.in_channels, c.image_size, c.image_size) {
            candle_core::bail!(
                "{} expects input (N, {}, {}, {}), got {:?}",
                c.arch(),
                c.in_channels,
                c.image_size,
                c.image_size,
                x.dims()
            )
        }
        let d = c.embed_dim;
        let s = &self.settings;
        let tokens = self.patch.forward(c, x, train, s)?;
        let cls = self.cls_token.broadcast_as((n, 1, d))?;
        let mut x = Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&self.pos_embed)?;
        for block in &self.blocks {
            x = block.forward(&x, s)?;
        }
        self.norm.forward(&x, s)
    }

    /// The class token after the final LayerNorm, N x dim.
    pub fn features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        // Contiguous: CUDA's matrix products refuse rows strided by the token count.
        self.tokens(x, train)?
            .narrow(1, 0, 1)?
            .squeeze(1)?
            .contiguous()
    }
}

impl ModuleT for Vit {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.features(x, train)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_nn::VarMap;
    use moco_core::init::{seeded_randn, seeded_var_builder};

    fn tiny() -> VitConfig {
        VitConfig {
            image_size: 8,
            patch_size: 4,
            in_channels: 2,
            embed_dim: 16,
            depth: 2,
            num_heads: 4,
            mlp_ratio: 2,
            stop_grad_patch_embed: false,
            conv_stem: false,
        }
    }

    #[test]
    fn names_parse_and_print_back_and_bad_shapes_are_named() {
        for name in VIT_NAMES
            .into_iter()
            .chain(["vit-64x4h4", "vit-32x2h1", "vit-conv-64x4h4"])
        {
            let c = VitConfig::from_arch(name).unwrap();
            assert_eq!(c.arch(), name);
            assert_eq!(c.conv_stem, name.contains("conv"), "{name}");
        }
        assert_eq!(VitConfig::from_arch("vit-64x4h4").unwrap().num_heads, 4);
        let conv = VitConfig::from_arch("vit_conv_small").unwrap();
        assert_eq!((conv.embed_dim, conv.depth, conv.num_heads), (384, 11, 12));
        // The official stem: 3 -> 48 -> 96 -> 192 -> 384, then the 1x1 projection.
        assert_eq!(
            conv.stem_widths(),
            [(3, 48), (48, 96), (96, 192), (192, 384)]
        );
        for bad in ["vit-64x4", "vit-64x4h", "vit_huge", "vit-axbhc"] {
            let e = VitConfig::from_arch(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("vit-DxNhH"), "{e}");
        }
        // Parsed, but no sine-cosine embedding for a width that 4 does not divide.
        let e = VitConfig::from_arch("vit-30x2h3").unwrap_err().to_string();
        assert!(e.contains("embed_dim"), "{e}");
        for (bad, key) in [
            (
                VitConfig {
                    patch_size: 3,
                    ..tiny()
                },
                "patch_size",
            ),
            (
                VitConfig {
                    embed_dim: 18,
                    num_heads: 3,
                    ..tiny()
                },
                "embed_dim",
            ),
            (
                VitConfig {
                    num_heads: 3,
                    ..tiny()
                },
                "num_heads",
            ),
            (
                VitConfig {
                    image_size: 12,
                    patch_size: 6,
                    conv_stem: true,
                    ..tiny()
                },
                "power of two",
            ),
            (
                VitConfig {
                    image_size: 32,
                    patch_size: 32,
                    embed_dim: 24,
                    conv_stem: true,
                    ..tiny()
                },
                "multiple of 16",
            ),
            (
                VitConfig {
                    stop_grad_patch_embed: true,
                    conv_stem: true,
                    ..tiny()
                },
                "stop_grad_patch_embed",
            ),
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
    }

    /// max |v| over the variable `k`.
    fn largest_magnitude(
        data: &std::collections::HashMap<String, candle_core::Var>,
        k: &str,
    ) -> f64 {
        let m: f32 = data[k]
            .as_tensor()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        f64::from(m)
    }

    #[test]
    fn initialisation_follows_moco_v3() {
        let c = VitConfig {
            embed_dim: 64,
            mlp_ratio: 4,
            ..tiny()
        };
        let vars = VarMap::new();
        vit(
            c,
            Settings::default(),
            seeded_var_builder(&vars, 1, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let data = vars.data().lock().unwrap();
        let max_abs = |k: &str| largest_magnitude(&data, k) as f32;
        // Uniform in +-bound: the largest of thousands of draws is within 2% of the bound. The
        // draws are f32 against the bound rounded to f32, which may round up: compare in f32.
        let near = |k: &str, bound: f64| {
            let (m, bound) = (max_abs(k), bound as f32);
            assert!(m <= bound && m > 0.98 * bound, "{k}: {m} vs {bound}");
        };
        near("blocks.0.attn.qkv.weight", (6.0f64 / 128.0).sqrt());
        near("blocks.1.attn.proj.weight", (6.0f64 / 128.0).sqrt());
        near("blocks.0.mlp.fc1.weight", (6.0f64 / 320.0).sqrt());
        near("patch_embed.proj.weight", (6.0f64 / (32.0 + 64.0)).sqrt());
        for k in [
            "blocks.0.attn.qkv.bias",
            "blocks.1.mlp.fc2.bias",
            "norm.bias",
        ] {
            assert_eq!(max_abs(k), 0.0, "{k}");
        }
        assert!(max_abs("cls_token") < 1e-5 && max_abs("cls_token") > 0.0);
        let ln: Vec<f32> = data["blocks.1.norm2.weight"].as_tensor().to_vec1().unwrap();
        assert!(ln.iter().all(|&v| v == 1.0));
        drop(data);

        // The convolutional stem keeps PyTorch's defaults: +-1/sqrt(fan_in), BatchNorm 1 and 0.
        let vars = VarMap::new();
        let c = VitConfig {
            embed_dim: 64,
            conv_stem: true,
            ..tiny()
        };
        vit(
            c,
            Settings::default(),
            seeded_var_builder(&vars, 2, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let data = vars.data().lock().unwrap();
        let max_abs = |k: &str| largest_magnitude(&data, k);
        // 2 -> 32 -> 64 (3x3), then 64 -> 64 (1x1): fan-ins 18, 288, 64.
        for (k, fan_in, min) in [
            ("patch_embed.proj.0.weight", 18.0, 0.9),
            ("patch_embed.proj.3.weight", 288.0, 0.98),
            ("patch_embed.proj.6.weight", 64.0, 0.98),
            ("patch_embed.proj.6.bias", 64.0, 0.5),
        ] {
            // In f32, as the draws are (see above).
            let bound = (1.0 / f64::sqrt(fan_in)) as f32;
            let m = max_abs(k) as f32;
            assert!(m <= bound && m > min * bound, "{k}: {m} vs {bound}");
        }
        assert_eq!(max_abs("patch_embed.proj.4.bias"), 0.0);
        assert_eq!(max_abs("patch_embed.proj.1.running_mean"), 0.0);
        assert!(!data.contains_key("patch_embed.proj.weight"));
    }

    #[test]
    fn position_embedding_layout() {
        let pe = sincos_position_embedding(3, 8, &Device::Cpu).unwrap();
        assert_eq!(pe.dims(), [1, 10, 8]);
        let pe: Vec<Vec<f32>> = pe.squeeze(0).unwrap().to_vec2().unwrap();
        assert!(pe[0].iter().all(|&v| v == 0.0), "class token");
        // Patch 5 (row 1, column 2): a = 1, b = 2; omega = [1, 0.01].
        let want = [
            1f32.sin(),
            0.01f32.sin(),
            1f32.cos(),
            0.01f32.cos(),
            2f32.sin(),
            0.02f32.sin(),
            2f32.cos(),
            0.02f32.cos(),
        ];
        for (a, b) in pe[6].iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{:?}", pe[6]);
        }
    }

    #[test]
    fn stop_grad_leaves_the_patch_projection_without_gradient() {
        for stop in [false, true] {
            let vars = VarMap::new();
            let c = VitConfig {
                stop_grad_patch_embed: stop,
                ..tiny()
            };
            let net = vit(
                c,
                Settings::default(),
                seeded_var_builder(&vars, 3, DType::F32, &Device::Cpu),
            )
            .unwrap();
            let x = seeded_randn(0.0, 1., (3, 2, 8, 8), 1, &Device::Cpu).unwrap();
            let y = net.forward_t(&x, true).unwrap();
            assert_eq!(y.dims(), [3, 16]);
            let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let data = vars.data().lock().unwrap();
            let has = |k: &str| grads.get(data[k].as_tensor()).is_some();
            assert_eq!(has("patch_embed.proj.weight"), !stop);
            assert_eq!(has("patch_embed.proj.bias"), !stop);
            assert!(has("blocks.0.attn.qkv.weight") && has("cls_token"));
        }
    }
}
