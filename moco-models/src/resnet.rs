//! ResNet-18/34/50/101/152 as torchvision builds them (v1.5: the stride of a bottleneck sits on
//! its 3x3 convolution), with torchvision's parameter names, plus the small-image variant of the
//! official MoCo CIFAR demo (3x3 stride-1 stem, no max-pool), any number of input channels and a
//! width multiplier.

use candle_core::{Result, Tensor};
use candle_nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use candle_nn::{Init, ModuleT, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::batch_norm::{batch_norm, BatchNorm, BatchNormConfig};
use crate::ops::{self, Settings};

/// Depth of a ResNet: the block type and the number of blocks per stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Depth {
    /// BasicBlock x [2, 2, 2, 2]
    R18,
    /// BasicBlock x [3, 4, 6, 3]
    R34,
    /// Bottleneck x [3, 4, 6, 3]
    R50,
    /// Bottleneck x [3, 4, 23, 3]
    R101,
    /// Bottleneck x [3, 8, 36, 3]
    R152,
}

impl Depth {
    pub(crate) fn blocks(self) -> [usize; 4] {
        match self {
            Depth::R18 => [2, 2, 2, 2],
            Depth::R34 | Depth::R50 => [3, 4, 6, 3],
            Depth::R101 => [3, 4, 23, 3],
            Depth::R152 => [3, 8, 36, 3],
        }
    }

    fn bottleneck(self) -> bool {
        matches!(self, Depth::R50 | Depth::R101 | Depth::R152)
    }

    fn number(self) -> usize {
        match self {
            Depth::R18 => 18,
            Depth::R34 => 34,
            Depth::R50 => 50,
            Depth::R101 => 101,
            Depth::R152 => 152,
        }
    }
}

/// Everything that shapes a ResNet.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    /// Depth (and block type).
    pub depth: Depth,
    /// Small-image stem: 3x3 stride-1 `conv1`, no max-pool (for 32x32 and 28x28 inputs).
    pub small: bool,
    /// Input channels (3 for RGB, 1 for Fashion-MNIST).
    pub in_channels: usize,
    /// Width of the first stage (64 in torchvision); the stages are W, 2W, 4W, 8W.
    pub width: usize,
    /// Initialise the last BatchNorm of every residual block to zero (torchvision's option).
    pub zero_init_residual: bool,
    /// BatchNorm groups in training (1 = plain BatchNorm; the CIFAR demo uses 8).
    pub bn_splits: usize,
}

impl ResNetConfig {
    /// A configuration from an architecture name: `resnet18` ... `resnet152` (ImageNet stem) or
    /// `resnet18-small`, `resnet34-small`, `resnet50-small` (small-image stem); 3 input
    /// channels, width 64.
    pub fn from_arch(name: &str) -> crate::Result<Self> {
        let (base, small) = match name.strip_suffix("-small") {
            Some(b) => (b, true),
            None => (name, false),
        };
        let depth = match base {
            "resnet18" => Depth::R18,
            "resnet34" => Depth::R34,
            "resnet50" => Depth::R50,
            "resnet101" if !small => Depth::R101,
            "resnet152" if !small => Depth::R152,
            _ => return Err(crate::zoo::unknown_arch(name)),
        };
        Ok(Self {
            depth,
            small,
            in_channels: 3,
            width: 64,
            zero_init_residual: false,
            bn_splits: 1,
        })
    }

    /// The architecture name (`resnet50`, `resnet18-small`, ...).
    pub fn arch(&self) -> String {
        let suffix = if self.small { "-small" } else { "" };
        format!("resnet{}{suffix}", self.depth.number())
    }

    fn expansion(&self) -> usize {
        if self.depth.bottleneck() {
            4
        } else {
            1
        }
    }

    /// Dimension of the pooled features: 8 W x expansion (512 for resnet18, 2048 for resnet50).
    pub fn feature_dim(&self) -> usize {
        8 * self.width * self.expansion()
    }
}

/// A bias-free convolution initialised as torchvision does (Kaiming normal, fan-out, ReLU gain).
#[derive(Debug, Clone)]
struct Conv {
    weight: Tensor,
    stride: usize,
    padding: usize,
    settings: Settings,
}

fn conv(
    (cin, cout, k): (usize, usize, usize),
    stride: usize,
    padding: usize,
    settings: Settings,
    vb: VarBuilder,
) -> Result<Conv> {
    let init = Init::Kaiming {
        dist: NormalOrUniform::Normal,
        fan: FanInOut::FanOut,
        non_linearity: NonLinearity::ReLU,
    };
    Ok(Conv {
        weight: vb.get_with_hints((cout, cin, k, k), "weight", init)?,
        stride,
        padding,
        settings,
    })
}

impl Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::conv::conv2d(
            x,
            &self.weight,
            self.padding,
            self.stride,
            1,
            &self.settings,
        )
    }
}

fn bn(
    c: usize,
    splits: usize,
    zero: bool,
    settings: Settings,
    vb: VarBuilder,
) -> Result<BatchNorm> {
    let config = BatchNormConfig {
        splits,
        weight_init: if zero { 0.0 } else { 1.0 },
        ..Default::default()
    };
    batch_norm(c, config, settings, vb)
}

/// A residual block: BasicBlock (two 3x3 convs) or Bottleneck (1x1, 3x3 with the stride, 1x1).
#[derive(Debug, Clone)]
struct Block {
    convs: Vec<(Conv, BatchNorm)>,
    downsample: Option<(Conv, BatchNorm)>,
}

impl Block {
    fn new(
        cfg: &ResNetConfig,
        cin: usize,
        planes: usize,
        stride: usize,
        settings: Settings,
        vb: VarBuilder,
    ) -> Result<Self> {
        let s = cfg.bn_splits;
        let st = settings;
        let z = cfg.zero_init_residual;
        let exp = cfg.expansion();
        let convs = if cfg.depth.bottleneck() {
            vec![
                (
                    conv((cin, planes, 1), 1, 0, st, vb.pp("conv1"))?,
                    bn(planes, s, false, st, vb.pp("bn1"))?,
                ),
                (
                    conv((planes, planes, 3), stride, 1, st, vb.pp("conv2"))?,
                    bn(planes, s, false, st, vb.pp("bn2"))?,
                ),
                (
                    conv((planes, planes * exp, 1), 1, 0, st, vb.pp("conv3"))?,
                    bn(planes * exp, s, z, st, vb.pp("bn3"))?,
                ),
            ]
        } else {
            vec![
                (
                    conv((cin, planes, 3), stride, 1, st, vb.pp("conv1"))?,
                    bn(planes, s, false, st, vb.pp("bn1"))?,
                ),
                (
                    conv((planes, planes, 3), 1, 1, st, vb.pp("conv2"))?,
                    bn(planes, s, z, st, vb.pp("bn2"))?,
                ),
            ]
        };
        let downsample = if stride != 1 || cin != planes * exp {
            let d = vb.pp("downsample");
            Some((
                conv((cin, planes * exp, 1), stride, 0, st, d.pp("0"))?,
                bn(planes * exp, s, false, st, d.pp("1"))?,
            ))
        } else {
            None
        };
        Ok(Self { convs, downsample })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let Some((last, inner)) = self.convs.split_last() else {
            candle_core::bail!("a residual block without convolutions")
        };
        let mut y = x.clone();
        for (c, b) in inner {
            y = b.forward_relu_t(&c.forward(&y)?, train)?;
        }
        // The last BatchNorm (and the downsampling branch's), the residual add and the ReLU
        // in one op.
        let (c, b) = last;
        match &self.downsample {
            Some((dc, db)) => {
                b.forward_pair_add_relu_t(&c.forward(&y)?, db, &dc.forward(x)?, train)
            }
            None => b.forward_add_relu_t(&c.forward(&y)?, x, train),
        }
    }
}

/// A ResNet up to global average pooling (torchvision's `fc` is the head's business).
#[derive(Debug, Clone)]
pub struct ResNet {
    config: ResNetConfig,
    conv1: Conv,
    bn1: BatchNorm,
    stages: Vec<Vec<Block>>,
    settings: Settings,
}

/// Builds a ResNet; variables get torchvision's names under `vb`; its layers compute on the
/// ops `settings` choose.
pub fn resnet(config: ResNetConfig, settings: Settings, vb: VarBuilder) -> Result<ResNet> {
    if config.width == 0 || config.in_channels == 0 {
        candle_core::bail!("resnet width and input channels must be positive")
    }
    let w = config.width;
    let conv1 = if config.small {
        conv((config.in_channels, w, 3), 1, 1, settings, vb.pp("conv1"))?
    } else {
        conv((config.in_channels, w, 7), 2, 3, settings, vb.pp("conv1"))?
    };
    let bn1 = bn(w, config.bn_splits, false, settings, vb.pp("bn1"))?;
    let mut cin = w;
    let mut stages = vec![];
    for (i, n) in config.depth.blocks().into_iter().enumerate() {
        let planes = w << i;
        let stride = if i == 0 { 1 } else { 2 };
        let svb = vb.pp(format!("layer{}", i + 1));
        let mut blocks = vec![];
        for b in 0..n {
            blocks.push(Block::new(
                &config,
                cin,
                planes,
                if b == 0 { stride } else { 1 },
                settings,
                svb.pp(b),
            )?);
            cin = planes * config.expansion();
        }
        stages.push(blocks);
    }
    Ok(ResNet {
        config,
        conv1,
        bn1,
        stages,
        settings,
    })
}

impl ResNet {
    /// The configuration it was built from.
    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }

    /// Pooled features: (N, C_in, H, W) -> (N, feature_dim).
    pub fn features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let cin = self.config.in_channels;
        if x.rank() != 4 || x.dim(1)? != cin {
            candle_core::bail!(
                "{} expects images of shape (N, {cin}, H, W), got {:?}",
                self.config.arch(),
                x.dims()
            )
        }
        let mut y = self.bn1.forward_relu_t(&self.conv1.forward(x)?, train)?;
        if !self.config.small {
            y = ops::pool::stem_max_pool(&y, &self.settings)?;
        }
        for stage in &self.stages {
            for block in stage {
                y = block.forward_t(&y, train)?;
            }
        }
        // Global average pooling: (N, C, H, W) -> (N, C)
        y.mean((2, 3))
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.features(x, train)
    }
}
