//! Helpers shared by the unit tests.
#![allow(clippy::unwrap_used)]

use candle_core::{DType, Tensor};

/// max |a - b| / max |b| (with a floor of 1e-6 on the scale), in float32.
pub(crate) fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (
        a.to_dtype(DType::F32).unwrap(),
        b.to_dtype(DType::F32).unwrap(),
    );
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-6);
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / scale
}
