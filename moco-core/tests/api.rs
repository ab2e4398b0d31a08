//! moco-core as a user outside the workspace sees it: the dtype a model is built in is the one
//! it trains in, pretrained weights load by name, and a mismatch is an error that says what to
//! do.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{linear, Linear, Module, ModuleT, VarBuilder, VarMap};
use moco_core::init::seeded_randn;
use moco_core::{Kernels, Moco, MocoConfig, Queue};
use rand::rngs::StdRng;
use rand::SeedableRng;

struct Enc(Linear);

impl ModuleT for Enc {
    fn forward_t(&self, x: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        self.0.forward(&x.flatten_from(1)?)
    }
}

fn enc(vb: VarBuilder) -> candle_core::Result<Enc> {
    Ok(Enc(linear(12, 4, vb.pp("fc"))?))
}

fn config() -> MocoConfig {
    MocoConfig {
        dim: 4,
        queue_size: 16,
        batch_size: 4,
        ..MocoConfig::v1()
    }
}

fn views(dtype: DType) -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let x = |seed| {
        seeded_randn(0.0, 1.0, (4, 12), seed, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    (x(1), x(2))
}

#[test]
fn a_float64_model_trains_in_float64_and_agrees_with_float32() {
    let dev = Device::Cpu;
    let mut m64 = Moco::new_with_dtype(config(), &dev, DType::F64, VarMap::new(), enc).unwrap();
    let mut m32 = Moco::new(config(), &dev, enc).unwrap();
    assert_eq!(m64.dtype(), DType::F64);
    let (a, b) = views(DType::F64);
    let o64 = m64.train_step(&a, &b, 0.1, 0.9).unwrap();
    let (a, b) = views(DType::F32);
    let o32 = m32.train_step(&a, &b, 0.1, 0.9).unwrap();
    let (s64, s32) = (m64.state_tensors().unwrap(), m32.state_tensors().unwrap());
    for (name, t) in &s64 {
        if name == "queue_ptr" {
            continue;
        }
        assert_eq!(t.dtype(), DType::F64, "{name}");
        let d = (t - s32[name].to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-5, "{name}: float64 and float32 differ by {d}");
    }
    assert!((o64.loss - o32.loss).abs() < 1e-5);
    // The generic ops give the float32 step too, within rounding.
    let mut generic = Moco::new(config(), &dev, enc)
        .unwrap()
        .with_kernels(Kernels::Generic);
    let og = generic.train_step(&a, &b, 0.1, 0.9).unwrap();
    assert!((og.loss - o32.loss).abs() < 1e-5);
}

#[test]
fn weights_load_into_both_encoders_by_name_and_unknown_names_are_errors() {
    let dev = Device::Cpu;
    let mut moco = Moco::new(config(), &dev, enc).unwrap();
    let w = seeded_randn(0.0, 1.0, (4, 12), 9, &dev).unwrap();
    let left = moco
        .load_weights(&BTreeMap::from([("fc.weight".to_string(), w.clone())]))
        .unwrap();
    assert_eq!(left, ["fc.bias"]);
    for side in [
        moco.encoders().query_tensors(),
        moco.encoders().key_tensors(),
    ] {
        let d = (&side["fc.weight"] - &w).unwrap().abs().unwrap().max_all();
        assert_eq!(d.unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
    let bad = BTreeMap::from([("module.fc.weight".to_string(), w)]);
    let e = moco.load_weights(&bad).unwrap_err().to_string();
    assert!(
        e.contains("module.fc.weight") && e.contains("no such variable"),
        "{e}"
    );
    let wrong = BTreeMap::from([(
        "fc.bias".to_string(),
        Tensor::zeros(5, DType::F32, &dev).unwrap(),
    )]);
    let e = moco.load_weights(&wrong).unwrap_err().to_string();
    assert!(e.contains("fc.bias") && e.contains("[4]"), "{e}");
}

#[test]
fn dtype_mismatches_are_errors_that_say_what_to_do() {
    let dev = Device::Cpu;
    // Float32 variables handed to a float64 model.
    let vars = VarMap::new();
    vars.data().lock().unwrap().insert(
        "fc.weight".into(),
        Var::from_tensor(&Tensor::zeros((4, 12), DType::F32, &dev).unwrap()).unwrap(),
    );
    let e = Moco::new_with_dtype(config(), &dev, DType::F64, vars, enc)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("fc.weight") && e.contains("F32") && e.contains("F64"),
        "{e}"
    );
    // A queue of another dtype than the model's, and keys of another than the queue's.
    let mut moco = Moco::new(config(), &dev, enc).unwrap();
    let mut rng = StdRng::seed_from_u64(0);
    let q64 = Queue::new_with_dtype(4, 16, DType::F64, &mut rng, &dev).unwrap();
    let e = moco.set_queue(q64).unwrap_err().to_string();
    assert!(e.contains("F64") && e.contains("to_dtype"), "{e}");
    let mut q = Queue::new(4, 16, &mut rng, &dev).unwrap();
    let keys = Tensor::zeros((2, 4), DType::F64, &dev).unwrap();
    let e = q.enqueue(&keys).unwrap_err().to_string();
    assert!(e.contains("F32") && e.contains("dtype"), "{e}");
    let e = Moco::new_with_dtype(config(), &dev, DType::U32, VarMap::new(), enc)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a float type"), "{e}");
}
