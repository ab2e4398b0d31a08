//! [`Settings`]: which implementation every op of the backbones runs, one value that the layers
//! receive when they are built (no process-wide switch).
//!
//! The library never reads the environment: [`Settings::default`] is the fast path (the fused
//! CPU kernels, oneDNN's convolutions when compiled in, candle's generic ops elsewhere). The
//! `moco` binary reads `MOCO_CPU_KERNELS`, `MOCO_CPU_CONV` and `MOCO_CUDNN_BN` once, at start
//! ([`Settings::from_env`]), and passes the result to every model it builds.

use std::fmt;

use candle_core::{DType, Tensor};
use moco_core::Kernels;

use crate::{Error, Result};

/// Why the oneDNN engine is missing from a build that asked for it (feature `onednn`, but
/// oneDNN's headers were not found: build.rs went on without them), for the binary to say at
/// start; `None` when oneDNN is built in or was not asked for.
pub const ONEDNN_MISSING: Option<&str> = option_env!("MOCO_ONEDNN_MISSING");

/// The kernels behind the fused CPU convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvEngine {
    /// im2col + GEMM on the `gemm` crate (always available).
    Gemm,
    /// oneDNN's convolutions (feature `onednn`): its Winograd F(4x4, 3x3) kernels for the 3x3,
    /// stride-1 layers with at least 32 input and output channels, multiples of 16 (about twice
    /// as fast there; results within ~3e-6 of the exact values instead of ~4e-7), where oneDNN
    /// has them (AVX-512), its direct kernels elsewhere; geometries with no kernel use `Gemm`.
    OneDnn,
    /// oneDNN's direct kernels only, the ones PyTorch's CPU convolutions run (feature `onednn`).
    OneDnnDirect,
}

impl ConvEngine {
    /// Every engine, in declaration order.
    pub const ALL: [Self; 3] = [Self::Gemm, Self::OneDnn, Self::OneDnnDirect];

    /// The name `MOCO_CPU_CONV` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Gemm => "gemm",
            Self::OneDnn => "onednn",
            Self::OneDnnDirect => "onednn-direct",
        }
    }

    /// The engine of a name ([`name`](Self::name)).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.name() == s)
    }

    /// Whether this build has the engine.
    pub fn is_available(self) -> bool {
        match self {
            Self::Gemm => true,
            Self::OneDnn | Self::OneDnnDirect => cfg!(moco_onednn),
        }
    }
}

impl Default for ConvEngine {
    /// oneDNN when compiled in, else gemm.
    fn default() -> Self {
        if Self::OneDnn.is_available() {
            Self::OneDnn
        } else {
            Self::Gemm
        }
    }
}

/// Which implementation each op runs. Copied into every layer when it is built
/// (`resnet(config, settings, vb)`, [`crate::encoder`]); two models built with different
/// settings run side by side in one process (`moco check-device --generic` compares them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settings {
    /// Float32 CPU tensors: moco-rs's fused kernels ([`Kernels::Fused`]) or candle's generic ops
    /// ([`Kernels::Generic`]), the ones CUDA and Metal run. Other devices and dtypes always run
    /// the generic ops.
    pub kernels: Kernels,
    /// The engine of the fused CPU convolution.
    pub conv_engine: ConvEngine,
    /// BatchNorm's training mode on cuDNN where it applies (float32 CUDA tensors in one group,
    /// no SyncBN, builds with the `cudnn` feature). Off by default: not yet run on a GPU.
    pub cudnn_batch_norm: bool,
    /// moco-rs's fused CUDA kernels (feature `cuda`) for float32 CUDA tensors: BatchNorm's
    /// training and evaluation passes with their ReLU, residual add and downsampling pair, and
    /// the stem's max pool (`kernels/*.cu`). Off by default: their arithmetic is tested on the
    /// CPU (`ops/cuda_host.rs`) and they compile for sm_90, but they have not yet run on a GPU
    /// (`moco check-device --device cuda` with `MOCO_CUDA_KERNELS=1` is the check).
    pub cuda_kernels: bool,
}

impl Settings {
    /// Candle's generic ops for every tensor: what a GPU runs, on the CPU.
    pub fn generic() -> Self {
        Self {
            kernels: Kernels::Generic,
            ..Self::default()
        }
    }

    /// These settings with CPU convolutions on `engine`; an error when this build does not have
    /// it.
    pub fn with_conv_engine(self, engine: ConvEngine) -> Result<Self> {
        if !engine.is_available() {
            return Err(Error::config(
                "conv_engine",
                format!(
                    "the {} convolution engine is not in this build ({})",
                    engine.name(),
                    match ONEDNN_MISSING {
                        Some(why) => format!("oneDNN was not found when it was built: {why}"),
                        None => "cargo feature `onednn`".into(),
                    }
                ),
            ));
        }
        Ok(Self {
            conv_engine: engine,
            ..self
        })
    }

    /// The settings the environment asks for, for a binary to read once at start:
    /// `MOCO_CPU_KERNELS` (`fused`, the default, or `generic`), `MOCO_CPU_CONV` (`gemm`,
    /// `onednn` or `onednn-direct`; default [`ConvEngine::default`]), `MOCO_CUDNN_BN` and
    /// `MOCO_CUDA_KERNELS` (`0`, the default, or `1`). A value that is not one of these, or an
    /// engine, cuDNN or CUDA this build lacks, is an error naming the variable.
    pub fn from_env() -> Result<Self> {
        let var = |name: &str| std::env::var(name).ok();
        let kernels = Kernels::parse_env(var("MOCO_CPU_KERNELS").as_deref())?;
        let conv_engine = match var("MOCO_CPU_CONV") {
            None => ConvEngine::default(),
            Some(v) => match ConvEngine::parse(v.trim()) {
                Some(e) if e.is_available() => e,
                Some(e) => {
                    return Err(Error::Env(format!(
                        "MOCO_CPU_CONV={v}: this build has no {} engine (cargo feature `onednn`)",
                        e.name()
                    )))
                }
                None => {
                    let names: Vec<String> = ConvEngine::ALL
                        .iter()
                        .map(|e| format!("`{}`", e.name()))
                        .collect();
                    return Err(Error::Env(format!(
                        "MOCO_CPU_CONV={v}: expected one of {}",
                        names.join(", ")
                    )));
                }
            },
        };
        let switch = |name: &str, built: bool, what: &str| match var(name).as_deref() {
            None | Some("0") => Ok(false),
            Some("1") if built => Ok(true),
            Some("1") => Err(Error::Env(format!("{name}=1: this build has no {what}"))),
            Some(v) => Err(Error::Env(format!("{name}={v}: expected 0 or 1"))),
        };
        Ok(Self {
            kernels,
            conv_engine,
            cudnn_batch_norm: switch(
                "MOCO_CUDNN_BN",
                cfg!(feature = "cudnn"),
                "cuDNN (cargo feature `cudnn`)",
            )?,
            cuda_kernels: switch(
                "MOCO_CUDA_KERNELS",
                cfg!(feature = "cuda"),
                "CUDA (cargo feature `cuda`)",
            )?,
        })
    }

    /// Whether the fused CPU kernels take these tensors: all float32 on the CPU, and
    /// [`Kernels::Fused`].
    pub fn fused(&self, ts: &[&Tensor]) -> bool {
        self.kernels.fused(ts)
    }

    /// Whether moco-rs's CUDA kernels take these tensors: all contiguous-able float32 CUDA
    /// tensors, and [`cuda_kernels`](Self::cuda_kernels) on.
    pub fn cuda(&self, ts: &[&Tensor]) -> bool {
        self.cuda_kernels
            && ts
                .iter()
                .all(|t| t.device().is_cuda() && t.dtype() == DType::F32)
    }

    /// Whether the fused CPU kernels take a tensor of this dtype on the CPU.
    pub fn fused_dtype(&self, dtype: DType) -> bool {
        self.kernels == Kernels::Fused && dtype == DType::F32
    }
}

impl fmt::Display for Settings {
    /// One line, as `moco bench step` and `moco check-device` print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CPU kernels {} (MOCO_CPU_KERNELS), CPU convolutions {} (MOCO_CPU_CONV), cuDNN BatchNorm {} (MOCO_CUDNN_BN), CUDA kernels {} (MOCO_CUDA_KERNELS)",
            self.kernels.name(),
            self.conv_engine.name(),
            on_off(self.cudnn_batch_norm),
            on_off(self.cuda_kernels)
        )
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// `ConvEngine::ALL` lists the engines in declaration order and every name parses back.
    #[test]
    fn engine_list_matches_the_declaration_order() {
        for (i, e) in ConvEngine::ALL.into_iter().enumerate() {
            assert_eq!(e as usize, i, "{e:?}");
            assert_eq!(ConvEngine::parse(e.name()), Some(e));
        }
    }

    /// An engine this build lacks is an error naming the feature, and the default is gemm.
    #[cfg(not(moco_onednn))]
    #[test]
    fn an_engine_not_built_is_an_error() {
        let e = Settings::default()
            .with_conv_engine(ConvEngine::OneDnn)
            .unwrap_err()
            .to_string();
        assert!(e.contains("onednn"), "{e}");
        assert_eq!(Settings::default().conv_engine, ConvEngine::Gemm);
    }

    #[test]
    fn settings_print_every_choice_and_its_variable() {
        let s = Settings::generic().to_string();
        for want in [
            "generic",
            "MOCO_CPU_KERNELS",
            "MOCO_CPU_CONV",
            "cuDNN BatchNorm off",
            "CUDA kernels off",
        ] {
            assert!(s.contains(want), "{s}");
        }
    }
}
