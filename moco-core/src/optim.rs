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
                // MoCo v3's trust ratio, on the device (nothing read back):
                // where(|p| > 0, where(|g| > 0, eta * |p| / |g|, 1), 1), in the parameters'
                // dtype (eta rounded to float32 as torch's python float times a float32 tensor).
                let norm = |t: &Tensor| t.sqr()?.sum_all()?.sqrt();
                let (pn, gn) = (norm(&pt)?, norm(&g)?);
                let one = Tensor::ones((), pn.dtype(), pn.device())?;
                let ratio = ((&pn * f64::from(eta as f32))? / &gn)?;
                let ratio = gn.gt(0.0)?.where_cond(&ratio, &one)?;
                let ratio = pn.gt(0.0)?.where_cond(&ratio, &one)?;
                g = g.broadcast_mul(&ratio)?;
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

/// `candle_nn::Optimizer` for an optimizer with `new_named`, `step_grads` and `config.lr`
/// (parameters get the names `param.{i}`).
macro_rules! candle_optimizer {
    ($opt:ident, $config:ident) => {
        impl candle_nn::Optimizer for $opt {
            type Config = $config;

            fn new(vars: Vec<Var>, config: $config) -> candle_core::Result<Self> {
                let named = vars
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| (format!("param.{i}"), v))
                    .collect();
                $opt::new_named(named, config).map_err(|e| candle_core::Error::Msg(e.to_string()))
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
    };
}

candle_optimizer!(Sgd, SgdConfig);

/// Hyperparameters of [`AdamW`], with `torch.optim.AdamW`'s meaning (its defaults: betas
/// (0.9, 0.999), eps 1e-8, weight decay 0.01).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decay rates of the first and second moment estimates.
    pub betas: (f64, f64),
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay: every step first multiplies each parameter by `1 - lr * wd`.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Adam with decoupled weight decay, following `torch.optim.AdamW` (no AMSGrad), per parameter:
///
/// ```text
/// t = t + 1
/// p = p * (1 - lr * weight_decay)
/// m = beta1 * m + (1 - beta1) * g
/// v = beta2 * v + (1 - beta2) * g^2
/// p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
/// ```
/// Parameters without a gradient in a step are skipped (no decay, no step: their `t` stays), as
/// torch skips parameters whose `.grad` is `None`. MoCo v3 trains its ViTs with it.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<(String, Var)>,
    /// Per parameter: step count, first and second moment (none before the first step).
    state: Vec<Option<(u64, Tensor, Tensor)>>,
    config: AdamWConfig,
}

impl AdamW {
    /// An optimizer over named parameters (names are used to save and load its state).
    pub fn new_named(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        for (key, v) in [
            ("lr", config.lr),
            ("weight_decay", config.weight_decay),
            ("eps", config.eps),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::config(key, format!("must be >= 0, got {v}")));
            }
        }
        let (b1, b2) = config.betas;
        if !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2)) {
            return Err(Error::config(
                "betas",
                format!("both must be in [0, 1), got ({b1}, {b2})"),
            ));
        }
        let state = vec![None; params.len()];
        Ok(Self {
            params,
            state,
            config,
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Moment estimates and step counts by parameter name (those created so far), for
    /// checkpoints: `{prefix}exp_avg.NAME`, `{prefix}exp_avg_sq.NAME` and `{prefix}step.NAME` (a
    /// float64 scalar), torch's state names.
    pub fn state_tensors(&self, prefix: &str) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for ((n, p), s) in self.params.iter().zip(&self.state) {
            if let Some((t, m, v)) = s {
                out.insert(format!("{prefix}exp_avg.{n}"), m.clone());
                out.insert(format!("{prefix}exp_avg_sq.{n}"), v.clone());
                out.insert(
                    format!("{prefix}step.{n}"),
                    Tensor::new(*t as f64, p.device())?,
                );
            }
        }
        Ok(out)
    }

    /// Restores the state saved by [`state_tensors`](Self::state_tensors) (with its prefix
    /// removed). Parameters with no saved state start over as on a first step.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        for ((name, p), s) in self.params.iter().zip(self.state.iter_mut()) {
            let get = |what: &str| tensors.get(&format!("{what}.{name}"));
            *s = match (get("step"), get("exp_avg"), get("exp_avg_sq")) {
                (None, None, None) => None,
                (Some(t), Some(m), Some(v)) => {
                    for (what, x) in [("exp_avg", m), ("exp_avg_sq", v)] {
                        if x.shape() != p.shape() {
                            return Err(Error::BadTensor {
                                what: format!("AdamW {what} of `{name}`"),
                                expected: format!("{:?}", p.dims()),
                                got: format!("{:?}", x.dims()),
                            });
                        }
                    }
                    let t = t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                    let on = |x: &Tensor| x.to_device(p.device())?.to_dtype(p.dtype());
                    Some((t as u64, on(m)?, on(v)?))
                }
                _ => {
                    return Err(Error::config(
                        "checkpoint",
                        format!("incomplete AdamW state for `{name}` (step, exp_avg and exp_avg_sq go together)"),
                    ))
                }
            };
        }
        Ok(())
    }

    /// One update from the gradients in `grads`.
    pub fn step_grads(&mut self, grads: &GradStore) -> Result<()> {
        let c = self.config;
        let (b1, b2) = c.betas;
        for ((_, p), s) in self.params.iter().zip(self.state.iter_mut()) {
            let Some(g) = grads.get(p) else { continue };
            let g = g.detach();
            let (t, m, v) = match s.take() {
                None => (1, (&g * (1.0 - b1))?, (g.sqr()? * (1.0 - b2))?),
                Some((t, m, v)) => (
                    t + 1,
                    ((m * b1)? + (&g * (1.0 - b1))?)?,
                    ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?,
                ),
            };
            let bc1 = 1.0 - b1.powi(t as i32);
            let bc2 = 1.0 - b2.powi(t as i32);
            let pt = p.as_detached_tensor();
            let decayed = if c.weight_decay != 0.0 {
                (pt * (1.0 - c.lr * c.weight_decay))?
            } else {
                pt
            };
            let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
            p.set(&(decayed - ((&m / denom)? * (c.lr / bc1))?)?)?;
            *s = Some((t, m, v));
        }
        Ok(())
    }
}

candle_optimizer!(AdamW, AdamWConfig);

/// The optimizer of a MoCo run: SGD (or LARS) or AdamW, built by
/// [`crate::MocoConfig::optimizer`].
#[derive(Debug)]
pub enum Optimizer {
    /// SGD with momentum, or LARS.
    Sgd(Sgd),
    /// AdamW.
    AdamW(AdamW),
}

impl Optimizer {
    /// The optimized parameters, by name.
    pub fn params(&self) -> &[(String, Var)] {
        match self {
            Self::Sgd(o) => o.params(),
            Self::AdamW(o) => &o.params,
        }
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            Self::Sgd(o) => o.config.lr,
            Self::AdamW(o) => o.config.lr,
        }
    }

    /// Sets the learning rate of the next steps.
    pub fn set_lr(&mut self, lr: f64) {
        match self {
            Self::Sgd(o) => o.config.lr = lr,
            Self::AdamW(o) => o.config.lr = lr,
        }
    }

    /// One update from the gradients in `grads`.
    pub fn step_grads(&mut self, grads: &GradStore) -> Result<()> {
        match self {
            Self::Sgd(o) => o.step_grads(grads),
            Self::AdamW(o) => o.step_grads(grads),
        }
    }

    /// The same optimizer over another parameter list, its state dropped.
    pub fn rebuild(&self, params: Vec<(String, Var)>) -> Result<Self> {
        Ok(match self {
            Self::Sgd(o) => Self::Sgd(Sgd::new_named(params, o.config)?),
            Self::AdamW(o) => Self::AdamW(AdamW::new_named(params, o.config)?),
        })
    }

    /// The state for a checkpoint, under `{prefix}`: SGD's `momentum_buffer.NAME`, AdamW's
    /// `exp_avg.NAME`, `exp_avg_sq.NAME`, `step.NAME`.
    pub fn state_tensors(&self, prefix: &str) -> Result<BTreeMap<String, Tensor>> {
        match self {
            Self::Sgd(o) => Ok(o.state_tensors(&format!("{prefix}momentum_buffer."))),
            Self::AdamW(o) => o.state_tensors(prefix),
        }
    }

    /// Restores [`state_tensors`](Self::state_tensors) with `prefix` removed from the names.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        match self {
            Self::Sgd(o) => {
                let buffers: BTreeMap<String, Tensor> = tensors
                    .iter()
                    .filter_map(|(k, t)| {
                        k.strip_prefix("momentum_buffer.")
                            .map(|n| (n.to_string(), t.clone()))
                    })
                    .collect();
                o.load_state(&buffers, "")
            }
            Self::AdamW(o) => o.load_state(tensors),
        }
    }
}
