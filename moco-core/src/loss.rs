//! Contrastive losses: InfoNCE against a queue (MoCo v1/v2), its symmetric form (the official
//! CIFAR demo), and in-batch InfoNCE with no queue (MoCo v3, the paper's end-to-end mechanism).

use candle_core::{DType, Tensor, D};

use crate::cross_entropy;
use crate::error::bad;
use crate::{Error, Kernels, Result};

/// A contrastive loss and what the official code logs next to it.
#[derive(Debug, Clone)]
pub struct ContrastiveOutput {
    /// Scalar loss (mean over the batch).
    pub loss: Tensor,
    /// Each direction's ranks of the positives (one direction, or two for the symmetric loss).
    ranks: Vec<Ranks>,
    logits: Logits,
}

/// Each row's number of logits strictly above its positive: computed by the fused kernels on
/// the host, or by candle's ops on the loss's device, where it stays until
/// [`ContrastiveOutput::accuracy`] reads it (so that building the loss never waits for the
/// device).
#[derive(Debug, Clone)]
enum Ranks {
    Host(Vec<u32>),
    Device(Tensor),
}

impl Ranks {
    fn read(&self) -> Result<(f32, f32)> {
        Ok(match self {
            Ranks::Host(r) => accuracy_from_ranks(r),
            Ranks::Device(t) => accuracy_from_ranks(&t.to_vec1::<u32>()?),
        })
    }
}

/// The logits, or what they are computed from on demand: on the CPU the loss never forms the
/// N x (1+K) matrix.
#[derive(Debug, Clone)]
enum Logits {
    Ready(Tensor),
    /// `cat([pos, neg], 1) / t`.
    Queue {
        pos: Tensor,
        neg: Tensor,
        t: f64,
    },
    /// `raw / t`.
    Scaled {
        raw: Tensor,
        t: f64,
    },
}

impl ContrastiveOutput {
    /// Top-1 and top-5 accuracy (percent) of picking the positive among the logits (the mean of
    /// the two directions for the symmetric loss). Off the CPU this reads the ranks back from
    /// the device, which waits for the work queued before: a training step reads it after its
    /// backward pass is queued.
    pub fn accuracy(&self) -> Result<(f32, f32)> {
        let mut sum = (0f32, 0f32);
        for r in &self.ranks {
            let (a1, a5) = r.read()?;
            sum = (sum.0 + a1, sum.1 + a5);
        }
        let n = self.ranks.len().max(1) as f32;
        Ok((sum.0 / n, sum.1 / n))
    }

    /// The logits the cross-entropy was taken over, divided by the temperature: N x (1+K) with
    /// the positive in column 0 for the queue losses (the first direction's for the symmetric
    /// loss), N x M with row i's positive in column `offset + i` for the in-batch loss. Formed
    /// on demand (for K = 65536 they are 256 KiB a row); they carry the loss's autograd graph.
    pub fn logits(&self) -> Result<Tensor> {
        Ok(match &self.logits {
            Logits::Ready(l) => l.clone(),
            Logits::Queue { pos, neg, t } => (Tensor::cat(&[pos, neg], 1)? / *t)?,
            Logits::Scaled { raw, t } => (raw / *t)?,
        })
    }

    /// The two directions of a symmetric loss: losses added, accuracies averaged (both
    /// directions' ranks kept), the first direction's logits.
    pub(crate) fn plus(mut self, b: ContrastiveOutput) -> Result<ContrastiveOutput> {
        self.ranks.extend(b.ranks);
        Ok(ContrastiveOutput {
            loss: (&self.loss + &b.loss)?,
            ranks: self.ranks,
            logits: self.logits,
        })
    }

    /// The fused loss, with the ranks of its positives.
    fn from_fused(fused: cross_entropy::Fused, logits: Logits) -> ContrastiveOutput {
        ContrastiveOutput {
            loss: fused.loss,
            ranks: vec![Ranks::Host(fused.above)],
            logits,
        }
    }
}

/// Top-1 and top-5 accuracy (percent) from each row's rank: the number of logits strictly above
/// its positive.
fn accuracy_from_ranks(ranks: &[u32]) -> (f32, f32) {
    let pct = |k: u32| 100.0 * ranks.iter().filter(|&&r| r < k).count() as f32 / ranks.len() as f32;
    (pct(1), pct(5))
}

/// `x / max(||x||_2, 1e-12)` along `dim`, as `torch.nn.functional.normalize`.
pub fn l2_normalize(x: &Tensor, dim: usize) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(dim)?.sqrt()?.maximum(1e-12)?;
    Ok(x.broadcast_div(&norm)?)
}

fn check_temperature(t: f64) -> Result<()> {
    if !(t.is_finite() && t > 0.0) {
        return Err(Error::config(
            "temperature",
            format!("must be a positive number, got {t}"),
        ));
    }
    Ok(())
}

/// InfoNCE with a queue of negatives (Eq. 1 of the MoCo paper).
///
/// - `q`: N x C queries, `k`: N x C positive keys (both L2-normalised; `k` is detached here),
/// - `queue`: C x K negatives,
/// - logits `[q.k+, q.queue] / t`: N x (1+K), the positive in column 0, so the loss is plain
///   cross-entropy with all-zero labels;
/// - `kernels`: [`Kernels::Fused`] takes the fused cross-entropy on float32 CPU tensors (it
///   never forms the N x (1+K) logits), [`Kernels::Generic`] candle's ops everywhere.
pub fn info_nce(
    q: &Tensor,
    k: &Tensor,
    queue: &Tensor,
    temperature: f64,
    kernels: Kernels,
) -> Result<ContrastiveOutput> {
    check_temperature(temperature)?;
    let (n, c) = q.dims2().map_err(|_| bad("queries", "N x C", q))?;
    if k.dims() != [n, c] {
        return Err(bad("keys", &format!("{n} x {c} (as the queries)"), k));
    }
    let (qc, _) = queue
        .dims2()
        .map_err(|_| bad("queue", &format!("{c} x K"), queue))?;
    if qc != c {
        return Err(bad("queue", &format!("{c} x K"), queue));
    }
    let k = k.detach();
    // l_pos: N x 1, the dot product of each query with its own key.
    let l_pos = (q * &k)?.sum_keepdim(1)?;
    // l_neg: N x K, each query against every queued key.
    let l_neg = q.matmul(&queue.detach())?;
    if kernels.fused(&[&l_pos, &l_neg]) {
        let fused = cross_entropy::queue_cross_entropy(&l_pos, &l_neg, (1.0 / temperature) as f32)?;
        let logits = Logits::Queue {
            pos: l_pos,
            neg: l_neg,
            t: temperature,
        };
        return Ok(ContrastiveOutput::from_fused(fused, logits));
    }
    // logits: N x (1+K)
    let logits = (Tensor::cat(&[&l_pos, &l_neg], 1)? / temperature)?;
    let labels = Tensor::zeros(n, DType::U32, q.device())?;
    let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
    Ok(ContrastiveOutput {
        loss,
        ranks: vec![Ranks::Device(positive_ranks(&logits, None)?)],
        logits: Logits::Ready(logits),
    })
}

/// The symmetric loss of the official CIFAR demo: both views serve as queries,
/// `loss = info_nce(q1, k2) + info_nce(q2, k1)`. The caller enqueues `cat([k1, k2])` only after
/// both losses are computed, so no key is its own negative. The reported accuracies are the
/// mean of the two directions; `logits` are those of the first direction.
pub fn symmetric_info_nce(
    q1: &Tensor,
    k2: &Tensor,
    q2: &Tensor,
    k1: &Tensor,
    queue: &Tensor,
    temperature: f64,
    kernels: Kernels,
) -> Result<ContrastiveOutput> {
    let a = info_nce(q1, k2, queue, temperature, kernels)?;
    let b = info_nce(q2, k1, queue, temperature, kernels)?;
    a.plus(b)
}

/// In-batch InfoNCE with no queue (MoCo v3's `contrastive_loss`): logits `q k^T / t` (N x N),
/// the positive of row i in column i, cross-entropy times `scale`. MoCo v3 uses
/// `scale = 2 t`; pass 1.0 for the plain loss.
pub fn in_batch_info_nce(
    q: &Tensor,
    k: &Tensor,
    temperature: f64,
    scale: f64,
    kernels: Kernels,
) -> Result<ContrastiveOutput> {
    in_batch_info_nce_gathered(q, k, 0, temperature, scale, kernels)
}

/// In-batch InfoNCE with the keys of every process of a data-parallel run: `k_all` (M x C) holds
/// all ranks' keys in rank order and this rank's positives are rows `offset..offset + N`
/// (MoCo v3's `concat_all_gather` and `labels = arange(N) + N * rank`). With one process it is
/// [`in_batch_info_nce`].
pub fn in_batch_info_nce_gathered(
    q: &Tensor,
    k_all: &Tensor,
    offset: usize,
    temperature: f64,
    scale: f64,
    kernels: Kernels,
) -> Result<ContrastiveOutput> {
    check_temperature(temperature)?;
    let (n, c) = q.dims2().map_err(|_| bad("queries", "N x C", q))?;
    let m = k_all.dim(0).unwrap_or(0);
    if k_all.rank() != 2 || k_all.dim(1)? != c || m < offset + n {
        return Err(bad(
            "keys",
            &format!("M x {c} with M >= {} (the positives' rows)", offset + n),
            k_all,
        ));
    }
    // logits: N x M
    let raw = q.matmul(&k_all.detach().t()?)?;
    if kernels.fused(&[&raw]) {
        let fused = cross_entropy::column_cross_entropy(
            &raw,
            offset,
            (1.0 / temperature) as f32,
            scale as f32,
        )?;
        let logits = Logits::Scaled {
            raw,
            t: temperature,
        };
        return Ok(ContrastiveOutput::from_fused(fused, logits));
    }
    let logits = (raw / temperature)?;
    let labels = Tensor::arange(offset as u32, (offset + n) as u32, q.device())?;
    let loss = (candle_nn::loss::cross_entropy(&logits, &labels)? * scale)?;
    Ok(ContrastiveOutput {
        loss,
        ranks: vec![Ranks::Device(positive_ranks(&logits, Some(&labels))?)],
        logits: Logits::Ready(logits),
    })
}

/// Top-1 and top-5 accuracy (percent) of the positive logit: column 0 when `labels` is `None`,
/// else column `labels[i]` for row i. A row counts as correct at k when fewer than k logits are
/// strictly greater than its positive (ties favour the positive).
pub fn positive_accuracy(logits: &Tensor, labels: Option<&Tensor>) -> Result<(f32, f32)> {
    Ranks::Device(positive_ranks(logits, labels)?).read()
}

/// Each row's number of logits strictly above its positive (N, u32), on the logits' device.
fn positive_ranks(logits: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
    let logits = logits.detach();
    let pos = match labels {
        None => logits.narrow(1, 0, 1)?,
        Some(l) => logits.gather(&l.unsqueeze(1)?, 1)?,
    };
    Ok(logits
        .broadcast_gt(&pos)?
        .to_dtype(DType::U32)?
        .sum(D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn aligned_embeddings_give_ln_k_plus_one() {
        // Every query, key and queued key is the same unit vector: all 1+K logits are equal,
        // so the softmax is uniform and the loss is ln(K+1) whatever the temperature.
        let dev = Device::Cpu;
        let (n, c, k) = (4, 3, 63);
        let v = l2_normalize(&Tensor::ones((n, c), DType::F32, &dev).unwrap(), 1).unwrap();
        let queue = l2_normalize(&Tensor::ones((c, k), DType::F32, &dev).unwrap(), 0).unwrap();
        for t in [0.07, 0.2, 1.0] {
            let out = info_nce(&v, &v, &queue, t, Kernels::Fused).unwrap();
            let loss = out.loss.to_scalar::<f32>().unwrap();
            assert!((loss - (64f32).ln()).abs() < 1e-5, "T={t}: {loss}");
            assert_eq!(out.logits().unwrap().dims(), [n, 1 + k]);
            // Ties favour the positive.
            assert_eq!(out.accuracy().unwrap(), (100.0, 100.0));
        }
        let out = in_batch_info_nce(&v, &v, 0.5, 1.0, Kernels::Fused).unwrap();
        let loss = out.loss.to_scalar::<f32>().unwrap();
        assert!((loss - (n as f32).ln()).abs() < 1e-5, "{loss}");
    }

    #[test]
    fn accuracy_counts_logits_above_the_positive() {
        let dev = Device::Cpu;
        // Row 0: positive is the max (rank 0). Row 1: 2 above (top-5 only). Row 2: 6 above (neither).
        let logits = Tensor::new(
            &[
                [9f32, 1., 1., 1., 1., 1., 1., 1.],
                [5., 6., 7., 1., 1., 1., 1., 1.],
                [0., 1., 1., 1., 1., 1., 1., -1.],
            ],
            &dev,
        )
        .unwrap();
        let (a1, a5) = positive_accuracy(&logits, None).unwrap();
        assert!((a1 - 100.0 / 3.0).abs() < 1e-4 && (a5 - 200.0 / 3.0).abs() < 1e-4);
    }

    #[test]
    fn bad_temperature_and_shapes_are_errors() {
        let dev = Device::Cpu;
        let q = Tensor::ones((2, 3), DType::F32, &dev).unwrap();
        let queue = Tensor::ones((3, 5), DType::F32, &dev).unwrap();
        assert!(info_nce(&q, &q, &queue, 0.0, Kernels::Fused)
            .unwrap_err()
            .to_string()
            .contains("temperature"));
        let bad_queue = Tensor::ones((4, 5), DType::F32, &dev).unwrap();
        assert!(info_nce(&q, &q, &bad_queue, 0.1, Kernels::Fused)
            .unwrap_err()
            .to_string()
            .contains("queue"));
    }
}
