//! Learning-rate and momentum schedules, with the formulas of the official MoCo code
//! (`adjust_learning_rate` in `main_moco.py` for v1/v2 and the CIFAR demo, and MoCo v3's
//! per-iteration cosine with linear warm-up).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How the learning rate decays from its base value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", from = "LrDecayFields")]
pub enum LrDecay {
    /// The base rate throughout.
    Constant,
    /// `lr * gamma^(number of milestones <= epoch)` (MoCo v1: milestones 120, 160, gamma 0.1).
    Step {
        /// The epochs at which the rate drops.
        milestones: Vec<usize>,
        /// The factor of each drop.
        gamma: f64,
    },
    /// `lr * 0.5 * (1 + cos(pi * t / T))` (MoCo v2 `--cos`); `t` is the epoch, or with
    /// `per_iteration` the fractional epoch `epoch + iter / iters_per_epoch`.
    Cosine {
        /// Decay every iteration (MoCo v3) instead of every epoch (MoCo v2).
        per_iteration: bool,
    },
}

/// [`LrDecay`] as read from a file. serde ignores extra keys beside the tag of a unit variant
/// even with `deny_unknown_fields`, so `Constant` is read as an empty struct variant here: a
/// misspelt key next to `kind = "constant"` is an error like anywhere else in the config.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum LrDecayFields {
    Constant {},
    Step { milestones: Vec<usize>, gamma: f64 },
    Cosine { per_iteration: bool },
}

impl From<LrDecayFields> for LrDecay {
    fn from(f: LrDecayFields) -> Self {
        match f {
            LrDecayFields::Constant {} => LrDecay::Constant,
            LrDecayFields::Step { milestones, gamma } => LrDecay::Step { milestones, gamma },
            LrDecayFields::Cosine { per_iteration } => LrDecay::Cosine { per_iteration },
        }
    }
}

/// A learning-rate schedule: optional linear warm-up, then a decay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrSchedule {
    /// The decay after warm-up.
    pub decay: LrDecay,
    /// Warm-up length in epochs (0 for none). During warm-up `lr = base * t / warmup` with `t` the
    /// fractional epoch (MoCo v3); the decay then runs over the remaining `epochs - warmup`.
    #[serde(default)]
    pub warmup_epochs: f64,
}

impl LrSchedule {
    /// The official v1 steps: x0.1 at each milestone.
    pub fn step(milestones: Vec<usize>) -> Self {
        Self {
            decay: LrDecay::Step {
                milestones,
                gamma: 0.1,
            },
            warmup_epochs: 0.0,
        }
    }

    /// The official v2 cosine, updated once per epoch.
    pub fn cosine() -> Self {
        Self {
            decay: LrDecay::Cosine {
                per_iteration: false,
            },
            warmup_epochs: 0.0,
        }
    }

    /// Checks the settings against the run length.
    pub fn validate(&self, epochs: usize) -> Result<()> {
        let w = self.warmup_epochs;
        if !(w == 0.0 || (w > 0.0 && w < epochs as f64)) {
            return Err(Error::config(
                "warmup_epochs",
                format!(
                    "must be in [0, {epochs}) epochs, got {}",
                    self.warmup_epochs
                ),
            ));
        }
        if let LrDecay::Step { gamma, .. } = &self.decay {
            if !(gamma.is_finite() && *gamma > 0.0) {
                return Err(Error::config(
                    "gamma",
                    format!("must be positive, got {gamma}"),
                ));
            }
        }
        Ok(())
    }

    /// The learning rate at iteration `iter` (0-based) of epoch `epoch` (0-based), for a run of
    /// `epochs` epochs of `iters_per_epoch` iterations starting from `base_lr`.
    pub fn lr(
        &self,
        base_lr: f64,
        epoch: usize,
        iter: usize,
        iters_per_epoch: usize,
        epochs: usize,
    ) -> f64 {
        let frac = epoch as f64 + iter as f64 / iters_per_epoch.max(1) as f64;
        let w = self.warmup_epochs;
        if w > 0.0 && frac < w {
            return base_lr * frac / w;
        }
        match &self.decay {
            LrDecay::Constant => base_lr,
            LrDecay::Step { milestones, gamma } => {
                let passed = milestones.iter().filter(|&&m| epoch >= m).count();
                base_lr * gamma.powi(passed as i32)
            }
            LrDecay::Cosine { per_iteration } => {
                let t = if *per_iteration { frac } else { epoch as f64 };
                let span = (epochs as f64 - w).max(f64::MIN_POSITIVE);
                base_lr * 0.5 * (1.0 + (std::f64::consts::PI * (t - w) / span).cos())
            }
        }
    }
}

/// How the key encoder's momentum evolves.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "snake_case",
    from = "MomentumScheduleFields"
)]
pub enum MomentumSchedule {
    /// The same `m` throughout (MoCo v1/v2).
    Constant,
    /// From `m` to 1 along a half cosine over the run, per iteration (MoCo v3, BYOL).
    Cosine,
}

/// [`MomentumSchedule`] as read from a file, with empty struct variants so that an extra key
/// beside `kind` is an error (as [`LrDecayFields`]).
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum MomentumScheduleFields {
    Constant {},
    Cosine {},
}

impl From<MomentumScheduleFields> for MomentumSchedule {
    fn from(f: MomentumScheduleFields) -> Self {
        match f {
            MomentumScheduleFields::Constant {} => MomentumSchedule::Constant,
            MomentumScheduleFields::Cosine {} => MomentumSchedule::Cosine,
        }
    }
}

impl MomentumSchedule {
    /// The momentum at the given point of training, for base momentum `m`.
    pub fn momentum(
        &self,
        m: f64,
        epoch: usize,
        iter: usize,
        iters_per_epoch: usize,
        epochs: usize,
    ) -> f64 {
        match self {
            MomentumSchedule::Constant => m,
            MomentumSchedule::Cosine => {
                let frac = epoch as f64 + iter as f64 / iters_per_epoch.max(1) as f64;
                crate::momentum::cosine_momentum(m, frac / epochs.max(1) as f64)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_momentum_goes_from_m0_to_one() {
        let s = MomentumSchedule::Cosine;
        assert!((s.momentum(0.99, 0, 0, 10, 100) - 0.99).abs() < 1e-12);
        assert!((s.momentum(0.99, 50, 0, 10, 100) - 0.995).abs() < 1e-12);
        assert!((s.momentum(0.99, 100, 0, 10, 100) - 1.0).abs() < 1e-12);
        assert_eq!(
            MomentumSchedule::Constant.momentum(0.999, 7, 3, 10, 100),
            0.999
        );
    }

    #[test]
    fn an_unknown_key_beside_the_kind_is_an_error_naming_it() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)] // read only through Debug
        struct Both {
            momentum_schedule: MomentumSchedule,
            lr_schedule: LrSchedule,
        }
        let read = |m: &str, d: &str| {
            serde_json::from_str::<Both>(&format!(
                r#"{{"momentum_schedule": {m}, "lr_schedule": {{"decay": {d}}}}}"#
            ))
        };
        let ok = read(r#"{"kind": "cosine"}"#, r#"{"kind": "constant"}"#).unwrap();
        assert_eq!(ok.momentum_schedule, MomentumSchedule::Cosine);
        assert_eq!(ok.lr_schedule.decay, LrDecay::Constant);
        let ok = read(
            r#"{"kind": "constant"}"#,
            r#"{"kind": "step", "milestones": [3], "gamma": 0.5}"#,
        )
        .unwrap();
        assert_eq!(
            ok.lr_schedule.decay,
            LrDecay::Step {
                milestones: vec![3],
                gamma: 0.5
            }
        );
        for (m, d) in [
            (
                r#"{"kind": "constant", "foo": 1}"#,
                r#"{"kind": "constant"}"#,
            ),
            (r#"{"kind": "cosine", "foo": 1}"#, r#"{"kind": "constant"}"#),
            (
                r#"{"kind": "constant"}"#,
                r#"{"kind": "constant", "foo": 1}"#,
            ),
            (
                r#"{"kind": "constant"}"#,
                r#"{"kind": "cosine", "per_iteration": true, "foo": 1}"#,
            ),
        ] {
            let e = read(m, d).unwrap_err().to_string();
            assert!(e.contains("foo"), "{m} {d}: {e}");
        }
        let e = read(r#"{"kind": "linear"}"#, r#"{"kind": "constant"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("linear"), "{e}");
    }

    #[test]
    fn warmup_must_fit_the_run() {
        let s = LrSchedule {
            decay: LrDecay::Constant,
            warmup_epochs: 10.0,
        };
        assert!(s.validate(10).is_err());
        assert!(s.validate(11).is_ok());
    }
}
