//! [`Kernels`]: which implementation float32 CPU tensors run, moco-rs's fused kernels (the
//! default) or candle's generic ops, the ones CUDA and Metal run.
//!
//! The fused kernels (this crate's cross-entropy, moco-models' convolution, BatchNorm, pooling
//! and transformer kernels) compute what the generic ops compute, faster and keeping less for
//! the backward. The generic ops run a CPU step through the same ops as a GPU step, which
//! `moco check-device --generic` uses to test, on a machine without a GPU, the path a GPU takes;
//! a user who suspects a fused kernel can compare a run with them off
//! (`MOCO_CPU_KERNELS=generic`).
//!
//! A value, not a switch: [`crate::Moco`] takes it with [`crate::Moco::with_kernels`], the
//! losses as an argument, moco-models' layers inside their `ops::Settings`.

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// The implementation float32 CPU tensors run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// moco-rs's fused CPU kernels (the default).
    #[default]
    Fused,
    /// Candle's generic ops, as on CUDA and Metal.
    Generic,
}

impl Kernels {
    /// `fused` or `generic`, as `MOCO_CPU_KERNELS` takes them.
    pub fn name(self) -> &'static str {
        match self {
            Self::Fused => "fused",
            Self::Generic => "generic",
        }
    }

    /// Whether the fused kernels take these tensors: all float32 on the CPU, and `Fused`.
    pub fn fused(self, ts: &[&Tensor]) -> bool {
        self == Self::Fused
            && ts
                .iter()
                .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
    }

    /// The value of the environment variable `MOCO_CPU_KERNELS` (`None`: unset): `fused` (or
    /// empty, or unset) and `generic`; anything else is an error naming the variable.
    pub fn parse_env(value: Option<&str>) -> Result<Self> {
        match value {
            None | Some("fused") | Some("") => Ok(Self::Fused),
            Some("generic") => Ok(Self::Generic),
            Some(v) => Err(Error::config(
                "MOCO_CPU_KERNELS",
                format!("`{v}`: expected `fused` or `generic`"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_parses_and_a_bad_value_names_it() {
        assert_eq!(Kernels::parse_env(None).ok(), Some(Kernels::Fused));
        assert_eq!(
            Kernels::parse_env(Some("generic")).ok(),
            Some(Kernels::Generic)
        );
        let e = Kernels::parse_env(Some("gpu"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("MOCO_CPU_KERNELS") && e.contains("`generic`"),
            "{e}"
        );
    }
}
