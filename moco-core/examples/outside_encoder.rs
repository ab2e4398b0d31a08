//! MoCo around an encoder of your own, as a crate outside this workspace would write it (it is
//! also built as one, against crates.io's candle, by the test `outside_crate`): any
//! `candle_nn::ModuleT` from images to embeddings; `Moco` normalises its output, keeps the key
//! encoder, the queue and the optimizer, and runs the step in order. Float64 here, to show the
//! dtype a model is built in is the one it trains in (float32: `Moco::new`).
//!
//! `cargo run --release -p moco-core --example outside_encoder`

use std::collections::BTreeMap;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{linear, Linear, Module, ModuleT, VarBuilder, VarMap};
use moco_core::{Moco, MocoConfig};

/// Your encoder: 8x8 single-channel images -> 16-d embeddings.
struct Mlp(Linear, Linear);

impl ModuleT for Mlp {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        let h = self.0.forward(&x.flatten_from(1)?)?.relu()?;
        self.1.forward(&h)
    }
}

fn mlp(vb: VarBuilder) -> Result<Mlp> {
    Ok(Mlp(
        linear(64, 32, vb.pp("fc1"))?,
        linear(32, 16, vb.pp("fc2"))?,
    ))
}

fn main() -> moco_core::Result<()> {
    let device = Device::Cpu;
    let config = MocoConfig {
        dim: 16,
        queue_size: 256,
        batch_size: 32,
        ..MocoConfig::v2()
    };
    let mut moco = Moco::new_with_dtype(config, &device, DType::F64, VarMap::new(), mlp)?;
    // Start from weights of your own (here: a copy of the initial ones, scaled).
    let start: BTreeMap<String, Tensor> = moco
        .encoders()
        .query_tensors()
        .into_iter()
        .map(|(k, t)| Ok((k, (t * 0.5)?)))
        .collect::<Result<_>>()?;
    moco.load_weights(&start)?;
    for step in 0..20 {
        let x = Tensor::randn(0f64, 1., (32, 1, 8, 8), &device)?;
        // Two views: the images with independent noise.
        let view = || &x + Tensor::randn(0f64, 0.1, x.shape(), &device)?;
        let (lr, m) = moco.schedule(0, step, 20);
        let out = moco.train_step(&view()?, &view()?, lr, m)?;
        println!("step {step:2}: loss {:.4} acc1 {:5.1}%", out.loss, out.acc1);
    }
    Ok(())
}
