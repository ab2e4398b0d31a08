//! Seeded variable initialisation. Candle's `VarMap` draws initial weights from an unseeded
//! thread-local generator, so two runs never start from the same weights. The builder here fills
//! a `VarMap` with the same distributions (`candle_nn::Init`), drawn from a generator seeded by
//! `(seed, variable name)`: the weights depend on the seed and the name alone, not on the order in
//! which a model asks for its variables.

use std::hash::{DefaultHasher, Hash, Hasher};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// A `VarBuilder` that creates missing variables in `vars` from `seed` (and returns existing ones
/// unchanged, as `VarBuilder::from_varmap` does).
pub fn seeded_var_builder(
    vars: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let backend = Seeded {
        vars: vars.clone(),
        seed,
    };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}

/// Samples `init` for a tensor of `shape` from `rng`, as f32 values.
pub fn sample(init: Init, shape: &Shape, rng: &mut impl Rng) -> Vec<f32> {
    let n = shape.elem_count();
    let uniform = |rng: &mut dyn rand::RngCore, lo: f64, up: f64| -> Vec<f32> {
        (0..n)
            .map(|_| (lo + (up - lo) * rng.random::<f64>()) as f32)
            .collect()
    };
    let normal = |rng: &mut dyn rand::RngCore, mean: f64, std: f64| -> Vec<f32> {
        (0..n)
            .map(|_| (mean + std * rng.sample::<f64, _>(StandardNormal)) as f32)
            .collect()
    };
    match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Uniform { lo, up } => uniform(rng, lo, up),
        Init::Randn { mean, stdev } => normal(rng, mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(rng, -bound, bound)
                }
                NormalOrUniform::Normal => normal(rng, 0.0, std),
            }
        }
    }
}

/// A float32 tensor of `shape` drawn from N(`mean`, `std`^2) by a generator seeded with `seed`.
/// Candle's `Tensor::randn` draws from an unseeded generator on the CPU; tests that compare two
/// computations on random inputs use this one, so that every run sees the same inputs.
pub fn seeded_randn(
    mean: f64,
    std: f64,
    shape: impl Into<Shape>,
    seed: u64,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let shape = shape.into();
    let init = Init::Randn { mean, stdev: std };
    let data = sample(init, &shape, &mut StdRng::seed_from_u64(seed));
    Tensor::from_vec(data, shape, device)
}

struct Seeded {
    vars: VarMap,
    seed: u64,
}

impl SimpleBackend for Seeded {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self.vars.data().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!(
                    "variable `{name}` exists with shape {:?}, asked for {s:?}",
                    v.dims()
                )
            }
            return Ok(v.as_tensor().clone());
        }
        let mut hasher = DefaultHasher::new();
        (self.seed, name).hash(&mut hasher);
        let mut rng = StdRng::seed_from_u64(hasher.finish());
        let values = sample(h, &s, &mut rng);
        let var = Var::from_tensor(&Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?)?;
        data.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let data = self.vars.data().lock().unwrap_or_else(|e| e.into_inner());
        match data.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!(
                "variable `{name}` does not exist and has no shape to create it with"
            ),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vars
            .data()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(seed: u64, order_ab: bool) -> VarMap {
        let vars = VarMap::new();
        let vb = seeded_var_builder(&vars, seed, DType::F32, &Device::Cpu);
        let names = if order_ab { ["a", "b"] } else { ["b", "a"] };
        for n in names {
            candle_nn::linear(4, 3, vb.pp(n)).unwrap();
        }
        vars
    }

    fn dump(v: &VarMap) -> Vec<(String, Vec<f32>)> {
        let mut out: Vec<_> = v
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn same_seed_same_weights_in_any_order_other_seed_other_weights() {
        assert_eq!(dump(&build(1, true)), dump(&build(1, false)));
        assert_ne!(dump(&build(1, true)), dump(&build(2, true)));
    }

    #[test]
    fn kaiming_uniform_respects_its_bound() {
        // candle's linear weight init: Kaiming uniform, fan_in 400, gain sqrt(2): bound sqrt(6/400).
        let mut rng = StdRng::seed_from_u64(0);
        let v = sample(
            candle_nn::init::DEFAULT_KAIMING_UNIFORM,
            &Shape::from((50, 400)),
            &mut rng,
        );
        let bound = (6.0f32 / 400.0).sqrt();
        assert!(v.iter().all(|x| x.abs() <= bound));
        let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(max > 0.95 * bound, "{max} vs {bound}");
    }
}
