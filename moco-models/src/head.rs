//! Projection heads with the names of the official checkpoints: v1 linear `fc`, v2 MLP
//! (`fc.0`, ReLU, `fc.2`), and MoCo v3's projector and predictor MLPs (BatchNorm inside, the last
//! BatchNorm of the projector without affine parameters).

use candle_core::{Result, Tensor};
use candle_nn::{Init, Linear, ModuleT, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::batch_norm::{batch_norm, BatchNorm, BatchNormConfig};
use crate::ops::Settings;

/// Which head sits on the backbone's pooled features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HeadKind {
    /// No head: the encoder outputs the pooled features.
    None,
    /// MoCo v1: `fc` = Linear(features, dim).
    Linear {
        /// Output dimension.
        dim: usize,
    },
    /// MoCo v2: `fc` = Linear(features, features), ReLU, Linear(features, dim).
    Mlp {
        /// Output dimension.
        dim: usize,
    },
    /// MoCo v3 ResNet projector: `fc.0` Linear (no bias), `fc.1` BN, ReLU, `fc.3` Linear (no
    /// bias), `fc.4` BN without affine.
    V3 {
        /// Hidden width of the MLPs.
        hidden: usize,
        /// Output dimension.
        dim: usize,
    },
}

impl HeadKind {
    /// Output dimension, given the backbone's feature dimension.
    pub fn out_dim(&self, feature_dim: usize) -> usize {
        match *self {
            HeadKind::None => feature_dim,
            HeadKind::Linear { dim } | HeadKind::Mlp { dim } | HeadKind::V3 { dim, .. } => dim,
        }
    }

    /// Short name recorded in weight files: `none`, `linear`, `mlp`, `v3`.
    pub fn name(&self) -> &'static str {
        match self {
            HeadKind::None => "none",
            HeadKind::Linear { .. } => "linear",
            HeadKind::Mlp { .. } => "mlp",
            HeadKind::V3 { .. } => "v3",
        }
    }
}

/// PyTorch's default initialisation of a linear or convolution layer's weight and bias
/// (`kaiming_uniform_(a=sqrt(5))` and its bias rule): uniform in +-1/sqrt(fan_in).
pub fn torch_default_init(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// A linear layer initialised as `torch.nn.Linear`: weight and bias uniform in
/// +-1/sqrt(fan_in).
pub fn torch_linear(cin: usize, cout: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let init = torch_default_init(cin);
    let w = vb.get_with_hints((cout, cin), "weight", init)?;
    let b = if bias {
        Some(vb.get_with_hints(cout, "bias", init)?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

#[derive(Debug, Clone)]
enum Layer {
    Linear(Linear),
    Bn(BatchNorm),
    Relu,
}

/// A sequential head; layer indices follow `nn.Sequential`'s numbering (ReLUs count).
#[derive(Debug, Clone)]
pub struct Head {
    layers: Vec<Layer>,
}

impl ModuleT for Head {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = x.clone();
        for l in &self.layers {
            y = match l {
                Layer::Linear(lin) => candle_nn::Module::forward(lin, &y)?,
                Layer::Bn(b) => b.forward_t(&y, train)?,
                Layer::Relu => y.relu()?,
            };
        }
        Ok(y)
    }
}

/// MoCo v3's `_build_mlp`: `num_layers` linear layers without bias, each but the last followed by
/// BatchNorm1d and ReLU; after the last, a BatchNorm1d without affine when `last_bn`.
pub fn v3_mlp(
    num_layers: usize,
    input: usize,
    hidden: usize,
    output: usize,
    last_bn: bool,
    settings: Settings,
    vb: VarBuilder,
) -> Result<Head> {
    let mut layers = vec![];
    for l in 0..num_layers {
        let d1 = if l == 0 { input } else { hidden };
        let d2 = if l + 1 == num_layers { output } else { hidden };
        layers.push(Layer::Linear(torch_linear(
            d1,
            d2,
            false,
            vb.pp(layers.len()),
        )?));
        if l + 1 < num_layers {
            layers.push(Layer::Bn(batch_norm(
                d2,
                BatchNormConfig::default(),
                settings,
                vb.pp(layers.len()),
            )?));
            layers.push(Layer::Relu);
        } else if last_bn {
            let cfg = BatchNormConfig {
                affine: false,
                ..Default::default()
            };
            layers.push(Layer::Bn(batch_norm(
                d2,
                cfg,
                settings,
                vb.pp(layers.len()),
            )?));
        }
    }
    Ok(Head { layers })
}

/// Builds the head of `kind` on `feature_dim` features; `vb` is the head's prefix (`fc`); its
/// BatchNorms compute on the ops `settings` choose.
pub fn head(
    kind: HeadKind,
    feature_dim: usize,
    settings: Settings,
    vb: VarBuilder,
) -> Result<Head> {
    let layers = match kind {
        HeadKind::None => vec![],
        HeadKind::Linear { dim } => vec![Layer::Linear(torch_linear(feature_dim, dim, true, vb)?)],
        HeadKind::Mlp { dim } => vec![
            Layer::Linear(torch_linear(feature_dim, feature_dim, true, vb.pp("0"))?),
            Layer::Relu,
            Layer::Linear(torch_linear(feature_dim, dim, true, vb.pp("2"))?),
        ],
        HeadKind::V3 { hidden, dim } => {
            return v3_mlp(2, feature_dim, hidden, dim, true, settings, vb)
        }
    };
    Ok(Head { layers })
}
