//! The oneDNN engine of the CPU convolution (feature `onednn`; `onednn_absent.rs` stands in
//! without it): the three convolution passes on oneDNN's JIT kernels (the direct ones
//! PyTorch's CPU convolutions run, or its Winograd ones where asked for and available), through
//! the C interface of `csrc/onednn_conv.cpp`, one OpenMP thread per call: `cpu.rs` splits the
//! batch over rayon's threads. (OpenMP's
//! own threads spin for ~300k rounds after each parallel region, taking the cores from the rayon
//! threads that run every other op: measured 16% slower on the 2-core training step.)
//! Geometries oneDNN has no kernel for fall back to the gemm kernels.

use std::ffi::{c_char, c_int, CStr};
use std::mem::MaybeUninit;

use candle_core::Result;

use super::geometry::Pass;

extern "C" {
    fn moco_onednn_conv(
        pass: c_int,
        geometry: *const i64,
        algorithm: c_int,
        threads: c_int,
        a: *const f32,
        b: *const f32,
        out: *mut f32,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    #[cfg(test)]
    fn moco_onednn_major_version() -> c_int;
    #[cfg(test)]
    fn moco_onednn_plan_algorithm(
        pass: c_int,
        geometry: *const i64,
        algorithm: c_int,
        threads: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// The message the C side wrote into `err` (NUL-terminated, by snprintf), with the pass and
/// geometry it concerns.
fn c_error(pass: Pass, geometry: &[i64; 10], err: &[c_char; 512]) -> candle_core::Error {
    // SAFETY: `err` holds a NUL-terminated string: the C side's snprintf message, or the zeros
    // it was created with.
    let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
    candle_core::Error::msg(format!(
        "onednn conv {pass:?} on geometry {geometry:?}: {msg}"
    ))
}

/// oneDNN's convolution algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub(crate) enum Algorithm {
    /// Direct convolution, the kernels PyTorch's CPU convolutions run.
    Direct = 0,
    /// Winograd F(4x4, 3x3): 3x3 kernels, stride 1, AVX-512; about half the arithmetic.
    Winograd = 1,
}

/// The major version of the oneDNN this build links.
#[cfg(test)]
pub(crate) fn major_version() -> i32 {
    // SAFETY: reads oneDNN's static version record; no arguments.
    unsafe { moco_onednn_major_version() }
}

#[cfg(test)]
/// The algorithm oneDNN runs `pass` on `geometry` with when `algorithm` is asked for, on one
/// thread as [`run`] does (Winograd falls back to direct where oneDNN has no Winograd kernel);
/// `None` when it has no kernel.
pub(crate) fn plan_algorithm(
    pass: Pass,
    geometry: [usize; 10],
    algorithm: Algorithm,
) -> Result<Option<Algorithm>> {
    let geometry = geometry.map(|v| v as i64);
    let mut err = [0 as c_char; 512];
    // SAFETY: the geometry has the 10 values the C side reads; `err` holds `err.len()` bytes.
    let status = unsafe {
        moco_onednn_plan_algorithm(
            pass as c_int,
            geometry.as_ptr(),
            algorithm as c_int,
            1,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    match status {
        0 => Ok(Some(Algorithm::Direct)),
        1 => Ok(Some(Algorithm::Winograd)),
        -1 => Ok(None),
        _ => Err(c_error(pass, &geometry, &err)),
    }
}

/// Runs one pass on the calling thread with `algorithm` (Winograd: where oneDNN has it for this
/// geometry, else direct): `geometry` is (N, C, H, W, O, KH, KW, stride, padding, groups), `a`,
/// `b` and `out` plain NCHW / (O, C/groups, KH, KW) float32 buffers of the sizes that geometry
/// implies (`lens`, checked). `Ok(false)` when oneDNN has no kernel for it (`out` untouched),
/// `Ok(true)` when `out` is written, every element.
pub(crate) fn run(
    pass: Pass,
    geometry: [usize; 10],
    algorithm: Algorithm,
    a: &[f32],
    b: &[f32],
    out: &mut [MaybeUninit<f32>],
    lens: [usize; 3],
) -> Result<bool> {
    if [a.len(), b.len(), out.len()] != lens {
        candle_core::bail!(
            "onednn conv {pass:?}: buffers of {}, {} and {} floats, expected {lens:?}",
            a.len(),
            b.len(),
            out.len()
        )
    }
    let geometry = geometry.map(|v| v as i64);
    let mut err = [0 as c_char; 512];
    // SAFETY: the geometry has the 10 values the C side reads; `a`, `b` and `out` hold the
    // element counts it reads and writes for this geometry (checked above); `err` is a buffer
    // of `err.len()` bytes. One OpenMP thread: the callers parallelise with rayon.
    let status = unsafe {
        moco_onednn_conv(
            pass as c_int,
            geometry.as_ptr(),
            algorithm as c_int,
            1,
            a.as_ptr(),
            b.as_ptr(),
            out.as_mut_ptr().cast(),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    match status {
        0 => Ok(true),
        1 => Ok(false),
        _ => Err(c_error(pass, &geometry, &err)),
    }
}
