//! moco-core against PyTorch. The golden values come from `tests/reference/moco_step.py`
//! (torch only), committed as `tests/reference/moco_step.safetensors`.
//!
//! Tolerance: max |rust - torch| / (1 + |torch|) <= 1e-5 for every tensor (fp32; the two sides
//! differ only in summation order, fused multiply-adds and the exponential's last bits), except
//! the logits after the first SGD step: 2e-5. There the logits (divided by T = 0.07) amplify
//! the rounding of the update, and torch's own float32 is 5.6e-6 away from the same steps in
//! float64 (the script prints this), so two float32 implementations can be twice that apart.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Tensor, Var};
use candle_nn::{
    batch_norm, linear, BatchNorm, BatchNormConfig, Linear, ModuleT, VarBuilder, VarMap,
};
use moco_core::optim::{Sgd, SgdConfig};
use moco_core::{
    in_batch_info_nce, Kernels, LossKind, LrDecay, LrSchedule, Moco, MocoConfig, Queue, StepOutput,
};
use moco_testing::{golden, to_f64};

const TOL: f64 = 1e-5;
/// For the logits of steps 1 and 2 (see the top of the file).
const TOL_LOGITS_AFTER_UPDATE: f64 = 2e-5;

fn g<'a>(gold: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    gold.get(key)
        .unwrap_or_else(|| panic!("golden tensor `{key}` missing"))
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor) {
    assert_within(what, a, b, TOL)
}

fn assert_within(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let err = to_f64(a)
        .iter()
        .zip(&to_f64(b))
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f64::max);
    assert!(err <= tol, "{what}: max relative error {err:e} > {tol:e}");
}

/// torch: nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
struct Tiny {
    l0: Linear,
    bn: BatchNorm,
    l3: Linear,
}

impl ModuleT for Tiny {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        x.apply(&self.l0)?
            .apply_t(&self.bn, train)?
            .relu()?
            .apply(&self.l3)
    }
}

fn tiny(vb: VarBuilder) -> candle_core::Result<Tiny> {
    Ok(Tiny {
        l0: linear(12, 8, vb.pp("0"))?,
        bn: batch_norm(8, BatchNormConfig::default(), vb.pp("1"))?,
        l3: linear(8, 4, vb.pp("3"))?,
    })
}

fn config() -> MocoConfig {
    MocoConfig {
        dim: 4,
        queue_size: 16,
        batch_size: 6,
        momentum: 0.99,
        temperature: 0.07,
        lr: 0.1,
        sgd_momentum: 0.9,
        weight_decay: 1e-4,
        lr_schedule: LrSchedule {
            decay: LrDecay::Constant,
            warmup_epochs: 0.0,
        },
        // Shuffle-BN is on: with full-batch BatchNorm it may only change rounding.
        shuffle_bn: true,
        ..MocoConfig::v1()
    }
}

fn model(gold: &HashMap<String, Tensor>, loss: LossKind) -> Moco<Tiny> {
    let vars = VarMap::new();
    {
        let mut data = vars.data().lock().unwrap();
        for (k, t) in gold
            .iter()
            .filter(|(k, _)| k.starts_with("init.") && *k != "init.queue")
        {
            data.insert(k["init.".len()..].to_string(), Var::from_tensor(t).unwrap());
        }
    }
    let cfg = MocoConfig { loss, ..config() };
    let mut moco = Moco::from_varmap(cfg, &Device::Cpu, vars, tiny).unwrap();
    let queue = Queue::from_parts(g(gold, "init.queue").clone(), 0, None).unwrap();
    moco.set_queue(queue).unwrap();
    moco
}

fn view(gold: &HashMap<String, Tensor>, name: &str, step: usize) -> Tensor {
    g(gold, name).get(step).unwrap()
}

#[test]
fn three_moco_steps_match_pytorch() {
    let gold = golden("moco_step.safetensors");
    let mut moco = model(&gold, LossKind::Queue);
    for step in 0..3 {
        let at = |what: &str| format!("step{step}.{what}");
        let (x1, x2) = (view(&gold, "views.x1", step), view(&gold, "views.x2", step));
        // forward + loss
        let fwd = moco.forward_loss(&x1, &x2).unwrap();
        let tol = if step == 0 {
            TOL
        } else {
            TOL_LOGITS_AFTER_UPDATE
        };
        let logits = fwd.output.logits().unwrap();
        assert_within(&at("logits"), &logits, g(&gold, &at("logits")), tol);
        let loss = fwd.output.loss.reshape(1).unwrap();
        assert_close(&at("loss"), &loss, g(&gold, &at("loss")));
        // backward: gradients of every query parameter
        let grads = fwd.output.loss.backward().unwrap();
        let params = moco.encoders().query_parameters();
        assert_eq!(params.len(), 6, "4 linear + 2 BatchNorm affine parameters");
        for (name, var) in &params {
            let grad = grads
                .get(var)
                .unwrap_or_else(|| panic!("no gradient for `{name}`"));
            let key = at(&format!("grad.{name}"));
            assert_close(&key, grad, g(&gold, &key));
        }
        // SGD, momentum update, enqueue
        moco.update(&grads, &fwd.keys, 0.1, 0.99).unwrap();
        for (name, t) in moco.encoders().query_tensors() {
            let key = at(&format!("query.{name}"));
            assert_close(&key, &t, g(&gold, &key));
        }
        let key_vars = moco.encoders().key_tensors();
        assert_eq!(key_vars.len(), 8, "6 parameters + 2 running statistics");
        for (name, t) in key_vars {
            let key = at(&format!("key.{name}"));
            assert_close(&key, &t, g(&gold, &key));
        }
        let queue = moco.queue().unwrap();
        assert_close(&at("queue"), queue.keys(), g(&gold, &at("queue")));
        let ptr = g(&gold, &at("queue_ptr")).to_vec1::<i64>().unwrap()[0];
        assert_eq!(queue.ptr() as i64, ptr, "{}", at("queue_ptr"));
    }
}

#[test]
fn train_step_equals_the_pieces() {
    // `train_step` runs the same sequence as the test above: compare its final state with torch.
    let gold = golden("moco_step.safetensors");
    let mut moco = model(&gold, LossKind::Queue);
    let mut outs: Vec<StepOutput> = vec![];
    for step in 0..3 {
        let (x1, x2) = (view(&gold, "views.x1", step), view(&gold, "views.x2", step));
        outs.push(moco.train_step(&x1, &x2, 0.1, 0.99).unwrap());
    }
    assert_eq!(moco.step(), 3);
    for (step, o) in outs.iter().enumerate() {
        let want = g(&gold, &format!("step{step}.loss"))
            .to_vec1::<f32>()
            .unwrap()[0];
        assert!(
            (o.loss - want).abs() <= 1e-5 * (1.0 + want.abs()),
            "step {step}: {} vs {want}",
            o.loss
        );
    }
    for (name, t) in moco.encoders().key_tensors() {
        let key = format!("step2.key.{name}");
        assert_close(&key, &t, g(&gold, &key));
    }
    assert_close(
        "step2.queue",
        moco.queue().unwrap().keys(),
        g(&gold, "step2.queue"),
    );
}

#[test]
fn symmetric_loss_matches_pytorch() {
    let gold = golden("moco_step.safetensors");
    let mut moco = model(&gold, LossKind::SymmetricQueue);
    let (x1, x2) = (view(&gold, "views.x1", 0), view(&gold, "views.x2", 0));
    let fwd = moco.forward_loss(&x1, &x2).unwrap();
    let loss = fwd.output.loss.reshape(1).unwrap();
    assert_close("symmetric.loss", &loss, g(&gold, "symmetric.loss"));
    // Both views' keys are enqueued, after both losses: 2N = 12 slots.
    assert_eq!(fwd.keys.dims(), [12, 4]);
    let grads = fwd.output.loss.backward().unwrap();
    moco.update(&grads, &fwd.keys, 0.1, 0.99).unwrap();
    let queue = moco.queue().unwrap();
    assert_close(
        "symmetric.queue_after",
        queue.keys(),
        g(&gold, "symmetric.queue_after"),
    );
    assert_eq!(queue.ptr(), 12);
}

#[test]
fn in_batch_loss_and_gradient_match_pytorch() {
    let gold = golden("moco_step.safetensors");
    let q = Var::from_tensor(g(&gold, "inbatch.q")).unwrap();
    let out = in_batch_info_nce(
        q.as_tensor(),
        g(&gold, "inbatch.k"),
        0.2,
        0.4,
        Kernels::Fused,
    )
    .unwrap();
    let loss = out.loss.reshape(1).unwrap();
    assert_close("inbatch.loss", &loss, g(&gold, "inbatch.loss"));
    let grads = out.loss.backward().unwrap();
    assert_close(
        "inbatch.grad_q",
        grads.get(&q).unwrap(),
        g(&gold, "inbatch.grad_q"),
    );
}

fn sgd_trajectory(gold: &HashMap<String, Tensor>, cfg: SgdConfig) -> Tensor {
    let p = Var::from_tensor(g(gold, "sgd.p0")).unwrap();
    let mut opt = Sgd::new_named(vec![("p".into(), p.clone())], cfg).unwrap();
    let grads = g(gold, "sgd.grads");
    let mut traj = vec![];
    for i in 0..5 {
        // loss = sum(p * g): its gradient wrt p is exactly g.
        let loss = (p.as_tensor() * grads.get(i).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        opt.step_grads(&loss.backward().unwrap()).unwrap();
        traj.push(p.as_tensor().copy().unwrap());
    }
    Tensor::stack(&traj, 0).unwrap()
}

#[test]
fn sgd_matches_torch_optim_sgd() {
    let gold = golden("moco_step.safetensors");
    let base = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        dampening: 0.0,
        weight_decay: 1e-4,
        nesterov: false,
        lars: None,
    };
    let plain = sgd_trajectory(&gold, base);
    assert_close("sgd.plain", &plain, g(&gold, "sgd.plain"));
    let nesterov = sgd_trajectory(
        &gold,
        SgdConfig {
            nesterov: true,
            ..base
        },
    );
    assert_close("sgd.nesterov", &nesterov, g(&gold, "sgd.nesterov"));
    let damp = sgd_trajectory(
        &gold,
        SgdConfig {
            dampening: 0.1,
            ..base
        },
    );
    assert_close("sgd.dampening", &damp, g(&gold, "sgd.dampening"));
}

#[test]
fn lars_matches_moco_v3_definition() {
    let gold = golden("moco_step.safetensors");
    let names = ["w", "b", "z"];
    let vars: Vec<(String, Var)> = names
        .iter()
        .map(|n| {
            let v = Var::from_tensor(g(&gold, &format!("lars.{n}0"))).unwrap();
            (n.to_string(), v)
        })
        .collect();
    let cfg = SgdConfig {
        lr: 0.5,
        momentum: 0.9,
        dampening: 0.0,
        weight_decay: 1e-2,
        nesterov: false,
        lars: Some(0.001),
    };
    let mut opt = Sgd::new_named(vars.clone(), cfg).unwrap();
    let mut traj: Vec<Vec<Tensor>> = vec![vec![]; 3];
    for i in 0..5 {
        let mut loss = Tensor::new(0f32, &Device::Cpu).unwrap();
        for (n, v) in &vars {
            let gi = g(&gold, &format!("lars.{n}_grads")).get(i).unwrap();
            loss = (loss + (v.as_tensor() * gi).unwrap().sum_all().unwrap()).unwrap();
        }
        opt.step_grads(&loss.backward().unwrap()).unwrap();
        for (t, (_, v)) in traj.iter_mut().zip(&vars) {
            t.push(v.as_tensor().copy().unwrap());
        }
    }
    for (n, t) in names.iter().zip(traj) {
        let name = format!("lars.{n}");
        assert_close(&name, &Tensor::stack(&t, 0).unwrap(), g(&gold, &name));
    }
    // The bias moved by plain momentum SGD with no decay: p0 - lr * g0 after one step.
    let b1 =
        (g(&gold, "lars.b0") - (g(&gold, "lars.b_grads").get(0).unwrap() * 0.5).unwrap()).unwrap();
    assert_close("lars.b step 1", &b1, &g(&gold, "lars.b").get(0).unwrap());
    // Nesterov or dampening with LARS is refused, naming the setting.
    let bad = Sgd::new_named(
        vec![],
        SgdConfig {
            nesterov: true,
            ..cfg
        },
    )
    .unwrap_err();
    assert!(bad.to_string().contains("lars"), "{bad}");
}

#[test]
fn schedules_match_torch_schedulers() {
    let gold = golden("moco_step.safetensors");
    let check = |name: &str, s: LrSchedule, ipe: usize| {
        let want = g(&gold, name).to_vec1::<f64>().unwrap();
        assert_eq!(want.len(), 10 * ipe);
        for (i, w) in want.iter().enumerate() {
            let got = s.lr(0.03, i / ipe, i % ipe, ipe, 10);
            assert!((got - w).abs() < 1e-12, "{name}[{i}]: {got} vs {w}");
        }
    };
    check("sched.step", LrSchedule::step(vec![6, 8]), 1);
    check("sched.cosine_epoch", LrSchedule::cosine(), 1);
    let v3 = LrSchedule {
        decay: LrDecay::Cosine {
            per_iteration: true,
        },
        warmup_epochs: 2.0,
    };
    check("sched.warmup_cosine_iter", v3, 4);
}

#[test]
fn checkpoint_resume_equals_uninterrupted_training() {
    let gold = golden("moco_step.safetensors");
    let views: Vec<(Tensor, Tensor)> = (0..3)
        .map(|s| (view(&gold, "views.x1", s), view(&gold, "views.x2", s)))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("checkpoint.safetensors");

    let mut a = model(&gold, LossKind::Queue);
    a.train_step(&views[0].0, &views[0].1, 0.1, 0.99).unwrap();
    a.save_checkpoint(&ckpt, HashMap::new()).unwrap();
    for (x1, x2) in &views[1..] {
        a.train_step(x1, x2, 0.1, 0.99).unwrap();
    }

    // A fresh model with other initial weights and queue, restored from the checkpoint.
    let mut b = Moco::new(config(), &Device::Cpu, tiny).unwrap();
    let meta = b.load_checkpoint(&ckpt).unwrap();
    assert_eq!(meta.get("step").map(String::as_str), Some("1"));
    assert_eq!(b.step(), 1);
    for (x1, x2) in &views[1..] {
        b.train_step(x1, x2, 0.1, 0.99).unwrap();
    }
    let (sa, sb): (BTreeMap<_, _>, BTreeMap<_, _>) =
        (a.state_tensors().unwrap(), b.state_tensors().unwrap());
    assert_eq!(sa.keys().collect::<Vec<_>>(), sb.keys().collect::<Vec<_>>());
    for (k, ta) in &sa {
        assert_eq!(to_f64(ta), to_f64(&sb[k]), "`{k}` differs after resume");
    }
}

#[test]
fn non_finite_weights_are_refused_before_a_checkpoint() {
    let gold = golden("moco_step.safetensors");
    let moco = model(&gold, LossKind::Queue);
    moco.check_finite().unwrap();
    let (name, var) = moco
        .encoders()
        .query_parameters()
        .into_iter()
        .next()
        .unwrap();
    let poisoned = var.as_tensor().affine(0.0, f64::NAN).unwrap();
    var.set(&poisoned).unwrap();
    let err = moco.check_finite().unwrap_err().to_string();
    assert!(err.contains(&name), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    assert!(moco.save_checkpoint(&path, HashMap::new()).is_err());
    assert!(!path.exists(), "nothing is written");
}
