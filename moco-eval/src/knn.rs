//! The weighted kNN classifier of InstDisc (Wu et al. 2018) and the official MoCo CIFAR demo's
//! monitor: cosine similarity of each query to every feature of the bank, the k most similar,
//! votes weighted by exp(similarity / t), classes ranked by total vote.
//!
//! The bank is processed in chunks with a running top-k per query, so memory stays bounded for
//! ImageNet-sized banks.

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::features::FeatureSet;
use crate::metrics::{Classification, Report};
use crate::{Error, Result};

/// kNN settings (defaults: k = 200, t = 0.1, as the demo).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KnnConfig {
    /// Neighbours.
    pub k: usize,
    /// Temperature of the vote weights.
    pub t: f64,
    /// Queries per similarity block.
    pub query_chunk: usize,
    /// Bank rows per similarity block.
    pub bank_chunk: usize,
}

impl Default for KnnConfig {
    fn default() -> Self {
        Self {
            k: 200,
            t: 0.1,
            query_chunk: 256,
            bank_chunk: 16384,
        }
    }
}

// Keeps the k largest (similarity, index) pairs of a row; ties broken by the lower index.
fn push_topk(best: &mut Vec<(f32, u32)>, row: &[f32], offset: usize, k: usize) {
    for (j, &s) in row.iter().enumerate() {
        best.push((s, (offset + j) as u32));
    }
    if best.len() > 2 * k.max(64) {
        trim(best, k);
    }
}

fn trim(best: &mut Vec<(f32, u32)>, k: usize) {
    let cmp = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if best.len() > k {
        best.select_nth_unstable_by(k - 1, cmp);
        best.truncate(k);
    }
    best.sort_by(cmp);
}

/// Class rankings (best first) of each query. `queries` (Q x D) and `bank` (N x D) are
/// L2-normalised here; `bank_labels` has N entries in `0..classes`.
pub fn predict(
    queries: &Tensor,
    bank: &Tensor,
    bank_labels: &[u32],
    classes: usize,
    cfg: &KnnConfig,
) -> Result<Vec<Vec<usize>>> {
    let (n, d) = bank.dims2()?;
    let (q, qd) = queries.dims2()?;
    if qd != d {
        return Err(Error::config(
            "features",
            format!("queries have dimension {qd}, the bank {d}"),
        ));
    }
    if n != bank_labels.len() || n == 0 {
        return Err(Error::config(
            "bank",
            format!("{n} bank features for {} labels", bank_labels.len()),
        ));
    }
    if let Some(&bad) = bank_labels.iter().find(|&&l| l as usize >= classes) {
        return Err(Error::config(
            "labels",
            format!("bank label {bad} outside 0..{classes}"),
        ));
    }
    if cfg.k == 0 {
        return Err(Error::config("k", "need at least 1 neighbour, got 0"));
    }
    if !(cfg.t.is_finite() && cfg.t > 0.0) {
        return Err(Error::config(
            "t",
            format!("the temperature must be positive and finite, got {}", cfg.t),
        ));
    }
    let k = cfg.k.min(n);
    let bank = moco_core::l2_normalize(bank, 1)?;
    let queries = moco_core::l2_normalize(queries, 1)?;
    let mut out = Vec::with_capacity(q);
    for q0 in (0..q).step_by(cfg.query_chunk.max(1)) {
        let qn = cfg.query_chunk.max(1).min(q - q0);
        let qc = queries.narrow(0, q0, qn)?;
        let mut best: Vec<Vec<(f32, u32)>> = vec![Vec::with_capacity(3 * k); qn];
        for b0 in (0..n).step_by(cfg.bank_chunk.max(1)) {
            let bn = cfg.bank_chunk.max(1).min(n - b0);
            // sim: qn x bn cosine similarities
            let sim = qc
                .matmul(&bank.narrow(0, b0, bn)?.t()?)?
                .to_device(&Device::Cpu)?
                .to_vec2::<f32>()?;
            best.par_iter_mut()
                .zip(sim.par_iter())
                .for_each(|(b, row)| push_topk(b, row, b0, k));
        }
        let ranked: Vec<Vec<usize>> = best
            .into_par_iter()
            .map(|mut b| {
                trim(&mut b, k);
                let mut scores = vec![0f64; classes];
                for (s, j) in &b {
                    scores[bank_labels[*j as usize] as usize] += (*s as f64 / cfg.t).exp();
                }
                let mut idx: Vec<usize> = (0..classes).collect();
                idx.sort_by(|&a, &c| scores[c].total_cmp(&scores[a]));
                idx
            })
            .collect();
        out.extend(ranked);
    }
    Ok(out)
}

/// kNN accuracy of `test` against the bank `train`.
pub fn evaluate(
    train: &FeatureSet,
    test: &FeatureSet,
    classes: usize,
    cfg: &KnnConfig,
) -> Result<Report> {
    let ranks = predict(&test.features, &train.features, &train.labels, classes, cfg)?;
    let mut m = Classification::new(classes);
    for (r, &l) in ranks.iter().zip(&test.labels) {
        m.update(r, l as usize);
    }
    Ok(m.report())
}
