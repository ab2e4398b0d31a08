//! moco-eval: kNN against a brute-force reference and the official demo's `knn_predict`
//! (`tests/reference/knn_golden.py`), the linear probe on separable data, the sanity check.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use moco_eval::features::FeatureSet;
use moco_eval::knn::{self, KnnConfig};
use moco_eval::linear::{sanity_check, train_cached, LinearConfig};

fn golden() -> HashMap<String, Tensor> {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/knn_golden.safetensors");
    moco_core::io::load(&p, &Device::Cpu).unwrap().tensors
}

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
    let bank = Tensor::randn(0f32, 1., (257, 8), &dev).unwrap();
    let q = Tensor::randn(0f32, 1., (41, 8), &dev).unwrap();
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
    let g = golden();
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

#[test]
fn linear_probe_separates_separable_features_perfectly() {
    let dev = Device::Cpu;
    // 4 classes, each a cluster around a different axis of a 12-d space (linearly separable).
    let make = |n: usize, seed: f32| {
        let mut f = vec![];
        let mut l = vec![];
        for i in 0..n {
            let c = i % 4;
            for d in 0..12 {
                let noise = ((i * 12 + d) as f32 * 0.618 + seed).sin() * 0.3;
                f.push(if d == c * 3 { 2.0 } else { 0.0 } + noise);
            }
            l.push(c as u32);
        }
        FeatureSet {
            features: Tensor::from_vec(f, (n, 12), &dev).unwrap(),
            labels: l,
        }
    };
    let (train, test) = (make(400, 0.0), make(100, 1.7));
    let cfg = LinearConfig {
        epochs: 10,
        schedule: moco_core::LrSchedule::step(vec![6, 8]),
        batch_size: 64,
        ..Default::default()
    };
    let r = train_cached(&train, &test, 4, &cfg, &dev, |_, _| {}).unwrap();
    assert_eq!(r.test.top1, 100.0, "{:?}", r.test);
    assert!(r.protocol.contains("cached features"));
    assert!(r.train_loss.last().unwrap() < r.train_loss.first().unwrap());
    assert_eq!(r.test.confusion[2], [0, 0, 25, 0]);
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
        features: Tensor::randn(0f32, 1., (5, 3), &Device::Cpu).unwrap(),
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
