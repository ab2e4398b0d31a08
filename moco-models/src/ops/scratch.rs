//! Memory for the CPU kernels: per-thread scratch buffers kept between calls, and output
//! vectors written once without being zeroed first. (A training step frees and reallocates the
//! same large buffers; zeroing them took 15% of a step on the 16-wide ResNet.)

use std::cell::RefCell;
use std::mem::MaybeUninit;

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// Elements per parallel chunk of the element-wise and row-wise kernels.
pub(crate) const CHUNK: usize = 4096;

/// Rows of `d` per parallel chunk: about [`CHUNK`] elements, whole rows.
pub(crate) fn row_chunk(d: usize) -> usize {
    d * (CHUNK / d.max(1)).max(1)
}

thread_local! {
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` with two scratch slices of `a` and `b` floats owned by the calling thread. Their
/// contents are whatever an earlier call left: `f` must write before it reads. Not re-entrant
/// (`f` must not call it again on the same thread).
pub(crate) fn with_scratch<R>(
    a: usize,
    b: usize,
    f: impl FnOnce(&mut [f32], &mut [f32]) -> R,
) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let (x, y) = &mut *s;
        if x.len() < a {
            x.resize(a, 0.0);
        }
        if y.len() < b {
            y.resize(b, 0.0);
        }
        f(&mut x[..a], &mut y[..b])
    })
}

/// A vector of `len` floats produced by `fill`, called in parallel on consecutive chunks of
/// `chunk` elements with the chunk's index.
///
/// # Safety
/// `fill` must write every element of the chunk it is given.
pub(crate) unsafe fn filled(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, c)| fill(i, c));
    // SAFETY: the capacity is `len` and the caller's `fill` wrote every element.
    unsafe { v.set_len(len) };
    v
}

/// Writes `src` into `dst` (same length).
pub(crate) fn write(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(s);
    }
}

/// The float32 values of a contiguous CPU storage as a slice; an error naming the op and operand
/// otherwise (`what`: e.g. "conv2d (weight)").
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        (CpuStorage::F32(_), None) => candle_core::bail!("{what}: the tensor must be contiguous"),
        _ => candle_core::bail!("{what}: only float32 is supported"),
    }
}

/// Runs `f` on the float32 values of the contiguous CPU tensor `t` (in a custom op's backward,
/// where the operands are tensors); an error naming `what` otherwise.
pub(crate) fn with_f32<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match (&*s, l.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(f(&v[a..b])),
        _ => candle_core::bail!("{what}: expected a contiguous float32 CPU tensor"),
    }
}
