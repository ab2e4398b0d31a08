//! Which ops run float32 CPU tensors: moco-rs's fused kernels (the default) or candle's generic
//! ops, the ones CUDA and Metal run.
//!
//! The fused kernels (this crate's cross-entropy, moco-models' convolution, BatchNorm, pooling
//! and transformer kernels) compute what the generic ops compute, faster and keeping less for
//! the backward. Switching them off runs a CPU step through the same ops as a GPU step, which
//! `moco check-device --generic` uses to test, on a machine without a GPU, the path a GPU takes;
//! a user who suspects a fused kernel can compare a run with them off
//! (`MOCO_CPU_KERNELS=generic`).
//!
//! The switch is process-wide: flip it between steps, not while another thread runs one.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Tensor};

static GENERIC: AtomicBool = AtomicBool::new(false);

/// Runs float32 CPU tensors through candle's generic ops (`true`) or the fused kernels.
pub fn set_generic_cpu(generic: bool) {
    GENERIC.store(generic, Ordering::Relaxed);
}

/// Whether the fused CPU kernels are switched off ([`set_generic_cpu`]).
pub fn generic_cpu() -> bool {
    GENERIC.load(Ordering::Relaxed)
}

/// Whether the fused CPU kernels take these tensors: all float32 on the CPU, and the kernels
/// switched on.
pub fn fused_cpu(ts: &[&Tensor]) -> bool {
    !generic_cpu()
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Reads `MOCO_CPU_KERNELS` (`fused`, the default, or `generic`) and sets the switch; an
/// unknown value is an error naming the variable.
pub fn init_from_env() -> crate::Result<()> {
    match std::env::var("MOCO_CPU_KERNELS") {
        Err(_) => Ok(()),
        Ok(v) => match v.as_str() {
            "fused" | "" => {
                set_generic_cpu(false);
                Ok(())
            }
            "generic" => {
                set_generic_cpu(true);
                Ok(())
            }
            _ => Err(crate::Error::config(
                "MOCO_CPU_KERNELS",
                format!("`{v}`: expected `fused` or `generic`"),
            )),
        },
    }
}
