//! moco-core's AdamW against `torch.optim.AdamW`. Golden values: `tests/reference/adamw_golden.py`
//! (torch only, float32), committed as `tests/reference/adamw_golden.safetensors`.
//!
//! Tolerance: max |rust - torch| / (1 + |torch|) <= 1e-6 on every parameter after every step
//! (both sides in float32; they differ in the order of a few roundings per step).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::{BTreeMap, HashMap};

use candle_core::{Tensor, Var};
use moco_core::optim::{AdamW, AdamWConfig};
use moco_testing::{golden, to_f64};

const TOL: f64 = 1e-6;
const NAMES: [&str; 3] = ["w", "b", "late"];

fn assert_close(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let err = to_f64(a)
        .iter()
        .zip(&to_f64(b))
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f64::max);
    assert!(err <= TOL, "{what}: max relative error {err:e} > {TOL:e}");
}

struct Run {
    gold: HashMap<String, Tensor>,
    params: Vec<(String, Var)>,
    lr: Vec<f64>,
}

impl Run {
    fn new() -> Self {
        let gold = golden("adamw_golden.safetensors");
        let params = NAMES
            .iter()
            .map(|n| {
                let p0 = gold[&format!("{n}.p0")].copy().unwrap();
                (n.to_string(), Var::from_tensor(&p0).unwrap())
            })
            .collect();
        let lr = gold["lr"].to_vec1::<f64>().unwrap();
        Self { gold, params, lr }
    }

    fn optimizer(&self) -> AdamW {
        let config = AdamWConfig {
            lr: self.lr[0],
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        AdamW::new_named(self.params.clone(), config).unwrap()
    }

    /// Step `t` as the script runs it: `late` gets no gradient before step 2.
    fn step(&self, opt: &mut AdamW, t: usize) {
        let mut loss: Option<Tensor> = None;
        for (n, p) in &self.params {
            if *n == "late" && t < 2 {
                continue;
            }
            let g = self.gold[&format!("{n}.grads")].get(t).unwrap();
            let term = (p.as_tensor() * g).unwrap().sum_all().unwrap();
            loss = Some(match loss {
                None => term,
                Some(l) => (l + term).unwrap(),
            });
        }
        let grads = loss.unwrap().backward().unwrap();
        candle_nn::Optimizer::set_learning_rate(opt, self.lr[t]);
        opt.step_grads(&grads).unwrap();
    }

    fn check(&self, t: usize) {
        for (n, p) in &self.params {
            let want = self.gold[&format!("{n}.traj")].get(t).unwrap();
            assert_close(&format!("{n} after step {t}"), p.as_tensor(), &want);
        }
    }
}

#[test]
fn adamw_matches_torch_with_a_changing_lr_and_a_late_parameter() {
    let run = Run::new();
    let mut opt = run.optimizer();
    for t in 0..run.lr.len() {
        run.step(&mut opt, t);
        run.check(t);
    }
}

#[test]
fn adamw_state_round_trips_mid_run() {
    let run = Run::new();
    let mut opt = run.optimizer();
    for t in 0..3 {
        run.step(&mut opt, t);
    }
    let state: BTreeMap<String, Tensor> = opt.state_tensors("").unwrap();
    // torch's state names; `late` has taken one step, the others three.
    let step = |n: &str| state[&format!("step.{n}")].to_scalar::<f64>().unwrap();
    assert_eq!((step("w"), step("b"), step("late")), (3.0, 3.0, 1.0));
    assert!(state.contains_key("exp_avg.w") && state.contains_key("exp_avg_sq.late"));
    // A fresh optimizer with the saved state continues exactly where this one would.
    let mut resumed = run.optimizer();
    resumed.load_state(&state).unwrap();
    for t in 3..run.lr.len() {
        run.step(&mut resumed, t);
        run.check(t);
    }
    // An incomplete state is an error naming the parameter.
    let mut partial = state.clone();
    partial.remove("exp_avg_sq.b");
    let err = run
        .optimizer()
        .load_state(&partial)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`b`"), "{err}");
}
