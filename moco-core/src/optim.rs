//! SGD with momentum, dampening, Nesterov and weight decay: exactly `torch.optim.SGD`'s update,
//! and MoCo v3's LARS (layer-wise adaptive rate scaling) as an option of the same optimizer.
//! (candle-nn's `SGD` has no momentum or weight decay.)

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Hyperparameters of [`Sgd`], with `torch.optim.SGD`'s meaning.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0 for plain SGD).
    pub momentum: f64,
    /// Dampening of the momentum (MoCo uses 0).
    pub dampening: f64,
    /// L2 penalty added to the gradient.
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// LARS with this trust coefficient (MoCo v3 uses 0.001); `None` for plain SGD.
    #[serde(default)]
    pub lars: Option<f64>,
}

impl Default for SgdConfig {
    /// MoCo's optimizer: lr 0.03, momentum 0.9, weight decay 1e-4.
    fn default() -> Self {
        Self {
            lr: 0.03,
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 1e-4,
            nesterov: false,
            lars: None,
        }
    }
}

/// Stochastic gradient descent with momentum, following `torch.optim.SGD`:
///
/// ```text
/// g = grad + weight_decay * p
/// buf = g                                      (first step)
/// buf = momentum * buf + (1 - dampening) * g   (later steps)
/// g = g + momentum * buf  if nesterov  else  buf
/// p = p - lr * g
/// ```
/// Parameters without a gradient in a step are skipped, their buffers untouched.
///
/// With `lars: Some(eta)` it is MoCo v3's LARS: parameters of two or more dimensions (weights)
/// get the weight decay, then their update is scaled by `eta * |p| / |g|` (by 1 when either
/// norm is 0); parameters of one dimension (biases, BatchNorm) get neither weight decay nor
/// scaling. The momentum step is then the one above with zero dampening.
#[derive(Debug)]
pub struct Sgd {
    params: Vec<(String, Var)>,
    buffers: Vec<Option<Tensor>>,
    config: SgdConfig,
}

impl Sgd {
    /// An optimizer over named parameters (names are used to save and load its state).
    pub fn new_named(params: Vec<(String, Var)>, config: SgdConfig) -> Result<Self> {
        if config.nesterov && (config.momentum <= 0.0 || config.dampening != 0.0) {
            return Err(Error::config(
                "nesterov",
                "Nesterov momentum requires a momentum and zero dampening",
            ));
        }
        if config.lars.is_some() && (config.nesterov || config.dampening != 0.0) {
            return Err(Error::config(
                "lars",
                "LARS takes neither Nesterov momentum nor dampening",
            ));
        }
        if let Some(eta) = config.lars {
            if !(eta.is_finite() && eta > 0.0) {
                return Err(Error::config(
                    "lars",
                    format!("the trust coefficient must be positive, got {eta}"),
                ));
            }
        }
        for (key, v) in [
            ("lr", config.lr),
            ("momentum", config.momentum),
            ("weight_decay", config.weight_decay),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::config(key, format!("must be >= 0, got {v}")));
            }
        }
        let buffers = vec![None; params.len()];
        Ok(Self {
            params,
            buffers,
            config,
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }

    /// The optimized parameters, by name.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Momentum buffers by parameter name (those created so far), for checkpoints.
    pub fn state_tensors(&self, prefix: &str) -> BTreeMap<String, Tensor> {
        self.params
            .iter()
            .zip(&self.buffers)
            .filter_map(|((n, _), b)| b.as_ref().map(|b| (format!("{prefix}{n}"), b.clone())))
            .collect()
    }

    /// Restores momentum buffers saved by [`state_tensors`](Self::state_tensors). Parameters with
    /// no saved buffer start over as on a first step.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, prefix: &str) -> Result<()> {
        for ((name, p), buf) in self.params.iter().zip(self.buffers.iter_mut()) {
            *buf = match tensors.get(&format!("{prefix}{name}")) {
                None => None,
                Some(t) if t.shape() == p.shape() => {
                    Some(t.to_device(p.device())?.to_dtype(p.dtype())?)
                }
                Some(t) => {
                    return Err(Error::BadTensor {
                        what: format!("momentum buffer of `{name}`"),
                        expected: format!("{:?}", p.dims()),
                        got: format!("{:?}", t.dims()),
                    })
                }
            };
        }
        Ok(())
    }

    /// One update from the gradients in `grads`.
    pub fn step_grads(&mut self, grads: &GradStore) -> Result<()> {
        let c = self.config;
        for ((_, p), buf) in self.params.iter().zip(self.buffers.iter_mut()) {
            let Some(grad) = grads.get(p) else { continue };
            let pt = p.as_detached_tensor();
            let mut g = grad.detach();
            // LARS leaves one-dimensional parameters (biases, BatchNorm) alone.
            let lars = c.lars.filter(|_| pt.rank() > 1);
            if c.weight_decay != 0.0 && (c.lars.is_none() || lars.is_some()) {
                g = (g + (&pt * c.weight_decay)?)?;
            }
            if let Some(eta) = lars {
                let norm = |t: &Tensor| -> Result<f32> {
                    Ok(t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?)
                };
                let (pn, gn) = (norm(&pt)?, norm(&g)?);
                if pn > 0.0 && gn > 0.0 {
                    // float32 like torch: eta * |p| / |g|.
                    g = (g * f64::from(eta as f32 * pn / gn))?;
                }
            }
            if c.momentum != 0.0 {
                let b = match buf.take() {
                    None => g.copy()?,
                    Some(b) if c.dampening == 0.0 => ((b * c.momentum)? + &g)?,
                    Some(b) => ((b * c.momentum)? + (&g * (1.0 - c.dampening))?)?,
                };
                g = if c.nesterov {
                    (g + (&b * c.momentum)?)?
                } else {
                    b.clone()
                };
                *buf = Some(b);
            }
            p.set(&(pt - (g * c.lr)?)?)?;
        }
        Ok(())
    }
}

impl candle_nn::Optimizer for Sgd {
    type Config = SgdConfig;

    fn new(vars: Vec<Var>, config: SgdConfig) -> candle_core::Result<Self> {
        let named = vars
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("param.{i}"), v))
            .collect();
        Sgd::new_named(named, config).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step_grads(grads)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }
}
