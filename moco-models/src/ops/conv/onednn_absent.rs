//! The stand-in for `onednn.rs` in builds without the `onednn` feature: oneDNN has no kernel
//! for any geometry, so the CPU convolution runs on gemm. (`Settings` refuses the oneDNN engines
//! in such a build, so this is only reached through `cpu.rs`'s fallback logic.)

use std::mem::MaybeUninit;

use candle_core::Result;

use super::geometry::Pass;

/// oneDNN's convolution algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Algorithm {
    /// Direct convolution.
    Direct,
    /// Winograd F(4x4, 3x3).
    Winograd,
}

/// Never runs: `Ok(false)`, no kernel (`out` untouched).
pub(crate) fn run(
    _pass: Pass,
    _geometry: [usize; 10],
    _algorithm: Algorithm,
    _a: &[f32],
    _b: &[f32],
    _out: &mut [MaybeUninit<f32>],
    _lens: [usize; 3],
) -> Result<bool> {
    Ok(false)
}
