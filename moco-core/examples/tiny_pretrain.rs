//! A complete MoCo pretraining run small enough for any laptop: a two-layer MLP encoder on a
//! synthetic dataset, evaluated with a weighted kNN before and after training.
//!
//! The data: 10 classes, each a centre in 8 "content" dimensions, plus 24 "nuisance" dimensions
//! of large noise. An augmentation keeps the content (with a little jitter) and redraws the
//! nuisance, so two views of one image agree only on content. Raw-pixel kNN is poor (the
//! nuisance dominates distances); MoCo has to learn to ignore it.
//!
//! `cargo run --release -p moco-core --example tiny_pretrain`

use candle_core::{Device, Result, Tensor};
use candle_nn::{batch_norm, linear, BatchNorm, Linear, ModuleT, VarBuilder};
use moco_core::{l2_normalize, LrSchedule, Moco, MocoConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

pub const CONTENT: usize = 8;
pub const NUISANCE: usize = 24;
pub const CLASSES: usize = 10;

/// Linear -> BatchNorm -> ReLU -> Linear, mapping 32 inputs to `dim` embeddings.
pub struct Mlp {
    l1: Linear,
    bn: BatchNorm,
    l2: Linear,
}

impl ModuleT for Mlp {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        x.apply(&self.l1)?
            .apply_t(&self.bn, train)?
            .relu()?
            .apply(&self.l2)
    }
}

pub fn mlp(dim: usize, vb: VarBuilder) -> Result<Mlp> {
    Ok(Mlp {
        l1: linear(CONTENT + NUISANCE, 64, vb.pp("fc1"))?,
        bn: batch_norm(64, 1e-5, vb.pp("bn"))?,
        l2: linear(64, dim, vb.pp("fc2"))?,
    })
}

/// The dataset: per-image content vectors and labels.
pub struct Synthetic {
    pub content: Vec<[f32; CONTENT]>,
    pub labels: Vec<u32>,
}

impl Synthetic {
    pub fn new(n: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let centres: Vec<[f32; CONTENT]> = (0..CLASSES)
            .map(|_| std::array::from_fn(|_| rng.sample::<f32, _>(StandardNormal)))
            .collect();
        // Same centres for every split (same seed), other images (the size enters the seed).
        let mut data = StdRng::seed_from_u64(seed ^ rng.random::<u64>() ^ n as u64);
        let labels: Vec<u32> = (0..n).map(|i| (i % CLASSES) as u32).collect();
        let content = labels
            .iter()
            .map(|&c| {
                std::array::from_fn(|j| {
                    centres[c as usize][j] + 0.3 * data.sample::<f32, _>(StandardNormal)
                })
            })
            .collect();
        Self { content, labels }
    }

    /// One augmented view of images `idx`: content + jitter, fresh nuisance noise.
    pub fn view(&self, idx: &[usize], rng: &mut StdRng, dev: &Device) -> Result<Tensor> {
        let mut v = Vec::with_capacity(idx.len() * (CONTENT + NUISANCE));
        for &i in idx {
            v.extend(
                self.content[i]
                    .iter()
                    .map(|c| c + 0.1 * rng.sample::<f32, _>(StandardNormal)),
            );
            v.extend((0..NUISANCE).map(|_| 3.0 * rng.sample::<f32, _>(StandardNormal)));
        }
        Tensor::from_vec(v, (idx.len(), CONTENT + NUISANCE), dev)
    }
}

/// Weighted kNN (k=20, t=0.1, InstDisc voting) of `test` features against `train` features.
pub fn knn_top1(train: &Tensor, train_y: &[u32], test: &Tensor, test_y: &[u32]) -> Result<f32> {
    let sim = l2_normalize(test, 1)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?
        .matmul(
            &l2_normalize(train, 1)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?
                .t()?,
        )?;
    let sim = sim.to_vec2::<f32>()?;
    let mut correct = 0;
    for (row, &y) in sim.iter().zip(test_y) {
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let mut votes = [0f32; CLASSES];
        for &j in &idx[..20] {
            votes[train_y[j] as usize] += (row[j] / 0.1).exp();
        }
        let pred = (0..CLASSES)
            .max_by(|&a, &b| votes[a].total_cmp(&votes[b]))
            .unwrap_or(0);
        correct += (pred as u32 == y) as usize;
    }
    Ok(100.0 * correct as f32 / test_y.len() as f32)
}

/// Features of a dataset (one fixed view each; eval mode).
pub fn features(model: &Mlp, data: &Synthetic, seed: u64, dev: &Device) -> Result<Tensor> {
    let idx: Vec<usize> = (0..data.labels.len()).collect();
    let x = data.view(&idx, &mut StdRng::seed_from_u64(seed), dev)?;
    model.forward_t(&x, false)
}

/// Pretrains for `epochs` and returns (kNN top-1 at init, after training, on raw inputs).
pub fn run(epochs: usize, verbose: bool) -> moco_core::Result<(f32, f32, f32)> {
    let dev = Device::Cpu;
    let (train, test) = (Synthetic::new(2000, 1), Synthetic::new(500, 1));
    let config = MocoConfig {
        dim: 16,
        queue_size: 1024,
        batch_size: 100,
        momentum: 0.99,
        temperature: 0.2,
        lr: 0.06,
        weight_decay: 5e-4,
        epochs,
        lr_schedule: LrSchedule::cosine(),
        seed: 7,
        ..MocoConfig::v1()
    };
    let mut moco = Moco::new(config.clone(), &dev, |vb| mlp(16, vb))?;
    let knn = |m: &Mlp| -> moco_core::Result<f32> {
        let (ftr, fte) = (
            features(m, &train, 11, &dev)?,
            features(m, &test, 12, &dev)?,
        );
        Ok(knn_top1(&ftr, &train.labels, &fte, &test.labels)?)
    };
    let init = knn(moco.query())?;
    let mut rng = StdRng::seed_from_u64(config.seed);
    let ipe = train.labels.len() / config.batch_size;
    for epoch in 0..epochs {
        let mut order: Vec<usize> = (0..train.labels.len()).collect();
        rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rng);
        let mut last = None;
        for (it, batch) in order.chunks_exact(config.batch_size).enumerate() {
            let (x1, x2) = (
                train.view(batch, &mut rng, &dev)?,
                train.view(batch, &mut rng, &dev)?,
            );
            let (lr, m) = moco.schedule(epoch, it, ipe);
            last = Some(moco.train_step(&x1, &x2, lr, m)?);
        }
        if let (true, Some(o)) = (verbose, last) {
            println!(
                "epoch {epoch:2}  loss {:.3}  acc1 {:5.1}%  lr {:.4}",
                o.loss, o.acc1, o.lr
            );
        }
    }
    let trained = knn(moco.query())?;
    let raw_train = train.view(
        &(0..2000).collect::<Vec<_>>(),
        &mut StdRng::seed_from_u64(11),
        &dev,
    )?;
    let raw_test = test.view(
        &(0..500).collect::<Vec<_>>(),
        &mut StdRng::seed_from_u64(12),
        &dev,
    )?;
    let raw = knn_top1(&raw_train, &train.labels, &raw_test, &test.labels)?;
    Ok((init, trained, raw))
}

#[allow(dead_code)]
fn main() -> moco_core::Result<()> {
    let (init, trained, raw) = run(20, true)?;
    println!("kNN top-1: raw inputs {raw:.1}%, random init {init:.1}%, after MoCo {trained:.1}%");
    Ok(())
}
