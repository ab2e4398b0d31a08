//! moco-eval: kNN against a brute-force reference and the official demo's `knn_predict`
//! (`tests/reference/knn_golden.py`), the linear protocol against torch
//! (`tests/reference/linear_golden.py`) and on separable data, its resume, the sanity check.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use moco_core::init::seeded_randn;
use moco_eval::features::FeatureSet;
use moco_eval::knn::{self, KnnConfig};
use moco_eval::linear::{sanity_check, train_cached, LinearConfig, LinearState};
use moco_testing::golden;

fn labels(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|l| l as u32)
        .collect()
}

/// The definition, written out plainly: full sort of every similarity.
fn brute_force(
    q: &[Vec<f32>],
    bank: &[Vec<f32>],
    bl: &[u32],
    classes: usize,
    k: usize,
    t: f64,
) -> Vec<Vec<usize>> {
    let norm = |v: &Vec<f32>| {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect::<Vec<f32>>()
    };
    let bank: Vec<Vec<f32>> = bank.iter().map(norm).collect();
    q.iter()
        .map(|qv| {
            let qv = norm(qv);
            let mut sims: Vec<(f32, usize)> = bank
                .iter()
                .enumerate()
                .map(|(j, b)| (qv.iter().zip(b).map(|(x, y)| x * y).sum(), j))
                .collect();
            sims.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let mut scores = vec![0f64; classes];
            for (s, j) in sims.iter().take(k) {
                scores[bl[*j] as usize] += (*s as f64 / t).exp();
            }
            let mut idx: Vec<usize> = (0..classes).collect();
            idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
            idx
        })
        .collect()
}

#[test]
fn knn_equals_brute_force_with_any_chunking() {
    let dev = Device::Cpu;
    let bank = seeded_randn(0.0, 1., (257, 8), 1, &dev).unwrap();
    let q = seeded_randn(0.0, 1., (41, 8), 2, &dev).unwrap();
    let bl: Vec<u32> = (0..257).map(|i| (i * 7 % 6) as u32).collect();
    for (k, qc, bc) in [(1, 5, 10), (17, 41, 257), (200, 7, 31), (300, 64, 64)] {
        let cfg = KnnConfig {
            k,
            t: 0.1,
            query_chunk: qc,
            bank_chunk: bc,
        };
        let got = knn::predict(&q, &bank, &bl, 6, &cfg).unwrap();
        let want = brute_force(
            &q.to_vec2().unwrap(),
            &bank.to_vec2().unwrap(),
            &bl,
            6,
            k.min(257),
            0.1,
        );
        assert_eq!(got, want, "k={k} chunks ({qc}, {bc})");
    }
}

#[test]
fn knn_matches_the_official_knn_predict() {
    let g = golden("knn_golden.safetensors");
    let bank = FeatureSet {
        features: g["bank"].clone(),
        labels: labels(&g["bank_labels"]),
    };
    let test = FeatureSet {
        features: g["queries"].clone(),
        labels: labels(&g["query_labels"]),
    };
    for (k, t) in [(20usize, 0.1), (200, 0.07)] {
        let cfg = KnnConfig {
            k,
            t,
            query_chunk: 16,
            bank_chunk: 100,
        };
        let got = knn::predict(&test.features, &bank.features, &bank.labels, 5, &cfg).unwrap();
        let want = g[&format!("rank.k{k}")].to_vec2::<i64>().unwrap();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            let b: Vec<usize> = b.iter().map(|&x| x as usize).collect();
            assert_eq!(&a[..5], &b[..], "query {i}, k={k}");
        }
        let r = knn::evaluate(&bank, &test, 5, &cfg).unwrap();
        let acc = g[&format!("acc.k{k}")].to_vec1::<f64>().unwrap();
        assert!(
            (r.top1 - acc[0]).abs() < 1e-9 && (r.top5 - acc[1]).abs() < 1e-9,
            "{r:?} vs {acc:?}"
        );
    }
}

/// 4 classes, each a cluster around a different axis of a 12-d space (linearly separable when
/// `spread` is small), `n` samples.
fn clusters(n: usize, seed: f32, spread: f32) -> FeatureSet {
    let mut f = vec![];
    let mut l = vec![];
    for i in 0..n {
        let c = i % 4;
        for d in 0..12 {
            let noise = ((i * 12 + d) as f32 * 0.618 + seed).sin() * spread;
            f.push(if d == c * 3 { 2.0 } else { 0.0 } + noise);
        }
        l.push(c as u32);
    }
    FeatureSet {
        features: Tensor::from_vec(f, (n, 12), &Device::Cpu).unwrap(),
        labels: l,
    }
}

#[test]
fn linear_probe_separates_separable_features_perfectly() {
    let dev = Device::Cpu;
    let (train, test) = (clusters(400, 0.0, 0.3), clusters(100, 1.7, 0.3));
    let cfg = LinearConfig {
        epochs: 10,
        schedule: moco_core::LrSchedule::step(vec![6, 8]),
        batch_size: 64,
        ..Default::default()
    };
    let r = train_cached(&train, &test, 4, &cfg, &dev, None, |_| Ok(())).unwrap();
    assert_eq!(r.test.top1, 100.0, "{:?}", r.test);
    assert!(r.protocol.contains("cached features"));
    assert!(r.train_loss.last().unwrap() < r.train_loss.first().unwrap());
    assert_eq!(r.test.confusion[2], [0, 0, 25, 0]);
    assert_eq!(r.history.len(), 10);
    assert_eq!(r.history[9].test_top1, r.test.top1);
    assert_eq!(r.history[6].lr, 3.0); // x0.1 from epoch 6 (0-based) on
}

/// The classifier's training against torch (`tests/reference/linear_golden.py`): the same
/// initial weights (passed as a state of 0 epochs), one full batch per epoch, main_lincls.py's
/// step schedule with and without weight decay and MoCo v3's cosine; the final weights, each
/// epoch's loss, learning rate and test accuracy.
#[test]
fn linear_protocol_matches_torch() {
    let dev = Device::Cpu;
    let g = golden("linear_golden.safetensors");
    let set = |split: &str| FeatureSet {
        features: g[&format!("{split}.x")].clone(),
        labels: labels(&g[&format!("{split}.y")]),
    };
    let (train, test) = (set("train"), set("test"));
    let init = g["init.weight"].clone();
    let start = LinearState {
        tensors: [
            ("fc.weight".to_string(), init.clone()),
            (
                "fc.bias".to_string(),
                init.zeros_like().unwrap().sum(1).unwrap(),
            ),
        ]
        .into(),
        history: vec![],
    };
    let rel = |a: &Tensor, b: &Tensor| {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let m = b.abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap()
    };
    let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
    for (name, lr, weight_decay, schedule) in [
        ("v1", 1.0, 0.0, moco_core::LrSchedule::step(vec![3, 5])),
        ("v1_wd", 1.0, 0.05, moco_core::LrSchedule::step(vec![3, 5])),
        ("v3", 0.5, 0.0, moco_core::LrSchedule::cosine()),
    ] {
        let cfg = LinearConfig {
            epochs: 6,
            lr,
            weight_decay,
            schedule,
            batch_size: train.len(),
            ..Default::default()
        };
        let mut last = None;
        let r = train_cached(&train, &test, 5, &cfg, &dev, Some(&start), |s| {
            last = Some(s.clone());
            Ok(())
        })
        .unwrap();
        let state = last.unwrap();
        for p in ["weight", "bias"] {
            let (ours, theirs) = (
                &state.tensors[&format!("fc.{p}")],
                &g[&format!("{name}.{p}")],
            );
            let e = rel(ours, theirs);
            eprintln!("{name} fc.{p}: relative difference {e:e}");
            assert!(e < 1e-5, "{name} fc.{p}: relative difference {e:e}");
        }
        let (loss, lrs, top1) = (
            f64s(&g[&format!("{name}.loss")]),
            f64s(&g[&format!("{name}.lr")]),
            f64s(&g[&format!("{name}.test_top1")]),
        );
        for (e, rec) in r.history.iter().enumerate() {
            let what = format!("{name} epoch {}", e + 1);
            assert!(
                ((rec.train_loss as f64) - loss[e]).abs() <= 1e-5 * loss[e].abs(),
                "{what}: loss {} vs {}",
                rec.train_loss,
                loss[e]
            );
            assert!(
                (rec.lr - lrs[e]).abs() <= 1e-12 * lrs[e].abs().max(1.0),
                "{what}: lr {} vs {}",
                rec.lr,
                lrs[e]
            );
            // One of the 64 test samples is 1.5625 points.
            assert!(
                (rec.test_top1 - top1[e]).abs() < 1.6,
                "{what}: top-1 {} vs {}",
                rec.test_top1,
                top1[e]
            );
        }
    }
}

#[test]
fn a_resumed_linear_run_equals_an_uninterrupted_one_and_reports_the_best_epoch() {
    let dev = Device::Cpu;
    // Overlapping clusters and a large lr: the test accuracy moves from epoch to epoch.
    let (train, test) = (clusters(300, 0.0, 2.5), clusters(200, 1.7, 2.5));
    let cfg = LinearConfig {
        epochs: 7,
        lr: 3.0,
        schedule: moco_core::LrSchedule::step(vec![4, 6]),
        batch_size: 32,
        seed: 3,
        ..Default::default()
    };
    let mut states = vec![];
    let full = train_cached(&train, &test, 4, &cfg, &dev, None, |s| {
        states.push(s.clone());
        Ok(())
    })
    .unwrap();
    assert_eq!(states.len(), 7);
    let tops: Vec<f64> = full.history.iter().map(|r| r.test_top1).collect();
    let max = tops.iter().cloned().fold(f64::MIN, f64::max);
    assert!(
        tops.iter().any(|&t| t != max),
        "the test needs a varying accuracy: {tops:?}"
    );
    assert_eq!(full.best_top1, max);
    assert_eq!(
        full.best_epoch,
        tops.iter().position(|&t| t == max).unwrap() + 1
    );

    // A run stopped after epoch 3 (its checkpoint written, then an error, as a kill would
    // leave it), read back from the file and resumed.
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("checkpoint-last.safetensors");
    let context = [("dataset".to_string(), "clusters".to_string())].into();
    let stopped = train_cached(&train, &test, 4, &cfg, &dev, None, |s| {
        s.save(&ckpt, &cfg, &context)?;
        match s.epochs_done() {
            3 => Err(moco_eval::Error::Config {
                key: "test".into(),
                msg: "stopped".into(),
            }),
            _ => Ok(()),
        }
    });
    assert!(stopped.is_err());
    let saved = LinearState::load(&ckpt, &dev).unwrap();
    assert_eq!(saved.config, cfg);
    assert_eq!(saved.context, context);
    assert_eq!(saved.state.history, full.history[..3]);
    let mut last = None;
    let resumed = train_cached(&train, &test, 4, &cfg, &dev, Some(&saved.state), |s| {
        last = Some(s.clone());
        Ok(())
    })
    .unwrap();
    assert_eq!(resumed.history, full.history);
    assert_eq!(resumed.test, full.test);
    let (a, b) = (&states[6].tensors, &last.unwrap().tensors);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert_eq!(a.len(), 4, "{:?}", a.keys()); // fc.weight, fc.bias, their momentum buffers
    for (k, t) in a {
        let (x, y) = (t.flatten_all().unwrap(), b[k].flatten_all().unwrap());
        assert!(
            x.to_vec1::<f32>().unwrap() == y.to_vec1::<f32>().unwrap(),
            "`{k}` differs between the uninterrupted and the resumed run"
        );
    }
    // The states handed out are copies: the first one is not the last.
    assert_ne!(
        states[0].tensors["fc.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        states[6].tensors["fc.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );

    // A checkpoint with more epochs than the run, or of another shape, is refused.
    let short = LinearConfig {
        epochs: 2,
        ..cfg.clone()
    };
    let e = train_cached(&train, &test, 4, &short, &dev, Some(&saved.state), |_| {
        Ok(())
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("3 epochs done"), "{e}");
    let e = train_cached(&train, &test, 5, &cfg, &dev, Some(&saved.state), |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`fc.bias`") || e.contains("`fc.weight`"), "{e}");
    // A safetensors file that is no linear-evaluation checkpoint names the file.
    let other = dir.path().join("weights.safetensors");
    moco_core::io::save_atomic(&other, &saved.state.tensors, None).unwrap();
    let e = LinearState::load(&other, &dev).unwrap_err().to_string();
    assert!(
        e.contains("weights.safetensors") && e.contains("not a linear-evaluation checkpoint"),
        "{e}"
    );
}

#[test]
fn sanity_check_fails_loudly_when_a_backbone_weight_changes() {
    let dev = Device::Cpu;
    let mut pre = HashMap::new();
    pre.insert(
        "layer1.0.conv1.weight".to_string(),
        Tensor::ones((2, 2), DType::F32, &dev).unwrap(),
    );
    pre.insert(
        "fc.weight".to_string(),
        Tensor::ones((2, 2), DType::F32, &dev).unwrap(),
    );
    let mut now = pre.clone();
    now.insert(
        "fc.weight".to_string(),
        Tensor::zeros((2, 2), DType::F32, &dev).unwrap(),
    );
    sanity_check(&now, &pre).unwrap(); // the head may change
    now.insert(
        "layer1.0.conv1.weight".to_string(),
        Tensor::new(&[[1f32, 1.0], [1.0, 1.0 + 1e-6]], &dev).unwrap(),
    );
    let err = sanity_check(&now, &pre).unwrap_err().to_string();
    assert!(
        err.contains("layer1.0.conv1.weight") && err.contains("sanity check failed"),
        "{err}"
    );
}

#[test]
fn feature_sets_round_trip_through_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.safetensors");
    let fs = FeatureSet {
        features: seeded_randn(0.0, 1., (5, 3), 3, &Device::Cpu).unwrap(),
        labels: vec![4, 3, 2, 1, 0],
    };
    fs.save(
        &p,
        HashMap::from([("weights".to_string(), "w.safetensors".to_string())]),
    )
    .unwrap();
    let (back, meta) = FeatureSet::load(&p).unwrap();
    assert_eq!(back.labels, fs.labels);
    assert_eq!(
        back.features.to_vec2::<f32>().unwrap(),
        fs.features.to_vec2::<f32>().unwrap()
    );
    assert_eq!(meta["weights"], "w.safetensors");
}
