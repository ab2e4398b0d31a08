//! moco-models against torchvision. Golden values: `tests/reference/resnet_golden.py`
//! (torch + torchvision), committed as `tests/reference/resnet_golden.safetensors`.
//! Weights are not stored: both sides fill them with the same formula (`fill` below).
//!
//! Tolerance: max |rust - torch| <= tol * max |torch| for every compared tensor, with tol = 1e-4,
//! except ResNet-50 in train mode (1e-3): there torch's own float32 result is ~5e-4 away from its
//! float64 one (see the script's docstring).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use moco_models::{encoder, BackboneConfig, EncoderSpec, HeadKind, ResNetConfig, Settings};
use moco_testing::{golden, to_f64};

/// `resnet_golden.py::uniform`: n values in [-1, 1) from splitmix64 of (index + seed).
fn uniform(n: usize, seed: u64) -> impl Iterator<Item = f64> {
    (0..n as u64).map(move |i| {
        let mut z = (i.wrapping_add(seed)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z ^= z >> 30;
        z = z.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z ^= z >> 27;
        z = z.wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 * 2f64.powi(-53) * 2.0 - 1.0
    })
}

/// `resnet_golden.py::fill`: the same weights from the same names.
pub fn fill(vars: &VarMap) {
    for (name, var) in vars.data().lock().unwrap().iter() {
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let seed = name.bytes().map(|b| b as u64).sum::<u64>() * 1000003;
        let base = uniform(n, seed);
        let leaf = name.rsplit('.').next().unwrap();
        let v: Vec<f32> = if leaf == "weight" && dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            let c = (6.0 / fan_in as f64).sqrt();
            base.map(|b| (b * c) as f32).collect()
        } else if leaf == "weight" {
            base.map(|b| (1.0 + 0.2 * b) as f32).collect()
        } else if leaf == "running_var" {
            base.map(|b| (1.0 + 0.3 * b.abs()) as f32).collect()
        } else {
            base.map(|b| (0.1 * b) as f32).collect()
        };
        let t = Tensor::from_vec(v, dims, &Device::Cpu).unwrap();
        var.set(&t.to_dtype(var.dtype()).unwrap()).unwrap();
    }
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let (a, b) = (to_f64(a), to_f64(b));
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
    let err = a
        .iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        err <= tol * scale,
        "{what}: max abs error {err:e} vs scale {scale:e} (tolerance {tol:e})"
    );
}

fn is_stat(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

/// The network `spec` with `fill`'s weights against the reference's recorded outputs,
/// running statistics and gradients. In float32 on the CPU the network runs on moco-rs's CPU
/// kernels; in float64 on candle's generic ops, the path of CUDA and Metal.
fn check(tag: &str, spec: EncoderSpec, train_tol: f64, dtype: DType) {
    let gold = golden("resnet_golden.safetensors");
    let g = |k: &str| {
        gold.get(&format!("{tag}.{k}"))
            .unwrap_or_else(|| panic!("missing {tag}.{k}"))
            .to_dtype(dtype)
            .unwrap()
    };
    let name = tag;
    let tag = &format!("{tag} {dtype:?}");
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, dtype, &Device::Cpu);
    let enc = encoder(spec, Settings::default(), vb).unwrap();
    fill(&vars);
    // Every torchvision running statistic has a variable of that name.
    let prefix = format!("{name}.stats.");
    let mut want: Vec<String> = gold
        .keys()
        .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
        .collect();
    let mut have: Vec<String> = vars
        .data()
        .lock()
        .unwrap()
        .keys()
        .filter(|k| is_stat(k))
        .cloned()
        .collect();
    want.sort();
    have.sort();
    assert_eq!(have, want, "{tag}: running statistics names");

    let x = g("x");
    let feats = moco_models::Backbone::features(&enc, &x, false).unwrap();
    assert_close(
        &format!("{tag}.features_eval"),
        &feats,
        &g("features_eval"),
        1e-4,
    );
    let eval = enc.forward_t(&x, false).unwrap();
    assert_close(&format!("{tag}.eval"), &eval, &g("eval"), 1e-4);

    // One train forward (it moves the running statistics once, as the reference's did).
    let xv = Var::from_tensor(&x).unwrap();
    let y = enc.forward_t(xv.as_tensor(), true).unwrap();
    let grads = (&y * g("r"))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in vars.data().lock().unwrap().iter() {
        if is_stat(name) {
            let key = format!("stats.{name}");
            assert_close(
                &format!("{tag}.{key}"),
                var.as_tensor(),
                &g(&key),
                train_tol,
            );
        }
    }
    // Train-mode features: a second forward (train mode ignores the running statistics).
    let ft = moco_models::Backbone::features(&enc, &x, true).unwrap();
    assert_close(
        &format!("{tag}.features_train"),
        &ft,
        &g("features_train"),
        train_tol,
    );
    assert_close(&format!("{tag}.train"), &y, &g("train"), train_tol);
    // Gradients the reference recorded: `grad.x` (input) and `grad.<parameter>`.
    let prefix = format!("{name}.grad.");
    let recorded: Vec<String> = gold
        .keys()
        .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
        .collect();
    assert!(!recorded.is_empty());
    for name in recorded {
        let grad = if name == "x" {
            grads.get(xv.as_tensor()).unwrap().clone()
        } else {
            let var = vars.data().lock().unwrap()[&name].clone();
            grads.get(var.as_tensor()).unwrap().clone()
        };
        let key = format!("grad.{name}");
        assert_close(&format!("{tag}.{key}"), &grad, &g(&key), train_tol);
    }
}

#[test]
fn resnet18_matches_torchvision() {
    let spec = EncoderSpec::new("resnet18", HeadKind::Linear { dim: 16 }).unwrap();
    for dtype in [DType::F32, DType::F64] {
        check("r18", spec, 1e-4, dtype);
    }
}

#[test]
fn small_resnet18_with_split_bn_and_mlp_head_matches_the_official_demo() {
    let resnet = ResNetConfig {
        in_channels: 1,
        width: 16,
        bn_splits: 2,
        ..ResNetConfig::from_arch("resnet18-small").unwrap()
    };
    let spec = EncoderSpec {
        backbone: BackboneConfig::ResNet(resnet),
        head: HeadKind::Mlp { dim: 16 },
    };
    for dtype in [DType::F32, DType::F64] {
        check("small", spec, 1e-4, dtype);
    }
}

#[test]
fn resnet50_with_v3_projector_matches_torchvision() {
    let head = HeadKind::V3 {
        hidden: 64,
        dim: 16,
    };
    for dtype in [DType::F32, DType::F64] {
        check(
            "r50",
            EncoderSpec::new("resnet50", head).unwrap(),
            1e-3,
            dtype,
        );
    }
}
