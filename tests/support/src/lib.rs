//! Test support for the moco-rs workspace, a dev-dependency of every crate's tests: where the
//! committed reference files are ([`reference`], [`golden`]), and the tensor comparisons the
//! tests share ([`max_rel`], [`max_abs_diff`], [`to_f64`]). Seeded random inputs come from the
//! library itself (`moco_core::init::seeded_randn`).

#![allow(clippy::unwrap_used)] // test support: a panic is the failure report
#![warn(missing_docs)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// `tests/reference/<name>`: the golden files and the scripts that generated them.
pub fn reference(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../reference")
        .join(name)
}

/// The tensors of `tests/reference/<name>` (a safetensors file), on the CPU.
pub fn golden(name: &str) -> HashMap<String, Tensor> {
    let path = reference(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The values of `t`, flattened, as float64.
pub fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// `max |a - b|`, in float32; the shapes must agree.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `max |a - b| / max |b|` (the scale at least 1e-6), in float32.
pub fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
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
