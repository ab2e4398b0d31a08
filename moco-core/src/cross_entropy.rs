//! Softmax cross-entropy over contrastive logits, fused for float32 tensors on the CPU.
//!
//! InfoNCE against a queue takes a cross-entropy over N x (1+K) logits (K = 65536 in the
//! paper). Candle's generic ops concatenate `[l_pos, l_neg]`, divide by the temperature, take
//! the log-softmax, gather and average: each a pass over a fresh N x (1+K) copy, and as many
//! again backward. Here the forward is two passes over the unscaled dot products (row maximum
//! with the rank of the positive, then the sum of exponentials) and the backward one pass that
//! writes the gradient of the dot products; no N x (1+K) matrix is formed.
//!
//! The logits are `v * (1/t)` in float32, exactly what candle's `tensor / t` computes, so the
//! ranks (top-1/top-5 accuracy) are those of the materialised logits. Sums over a row run in 16
//! fixed lanes, so the result does not depend on the CPU's vector width or the thread count.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Where the positive logit of each row is.
#[derive(Debug, Clone, Copy)]
enum Positive {
    /// In a separate N x 1 tensor, column 0 of the logits (the queue loss's `q . k+`).
    Prefix,
    /// Column `offset + i` of row i (the in-batch loss).
    Column { offset: usize },
}

/// What the forward leaves for the backward (each row's largest logit and the log of its sum of
/// shifted exponentials, kept apart as log-softmax keeps them: their sum would round away
/// what a near-certain row's loss is made of) and the caller (the number of logits above each
/// row's positive).
#[derive(Debug, Default)]
struct RowStats {
    max: Vec<f32>,
    log_sum: Vec<f32>,
    above: Vec<u32>,
}

/// `scale * mean_i(logsumexp(z_i) - z_i[positive])` with `z = v * mul`.
struct SoftmaxCrossEntropy {
    mul: f32,
    scale: f32,
    positive: Positive,
    stats: Arc<Mutex<RowStats>>,
}

/// The loss (a scalar tensor with its backward) and, per row, how many logits are strictly
/// above the positive one (0 = ranked first; ties favour the positive).
pub(crate) struct Fused {
    pub loss: Tensor,
    pub above: Vec<u32>,
}

const LANES: usize = 16;

use crate::math::exp;
/// Sums the 16 lanes in a fixed order.
#[inline(always)]
fn lanes_sum(acc: [f32; LANES]) -> f32 {
    let mut half = [0f32; LANES / 2];
    for l in 0..LANES / 2 {
        half[l] = acc[l] + acc[l + LANES / 2];
    }
    let mut s = 0f32;
    for h in half {
        s += h;
    }
    s
}

/// The row's largest logit and how many logits are strictly above `z_pos`.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512dq+avx512bw",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn row_max_above(row: &[f32], mul: f32, z_pos: f32) -> (f32, u32) {
    let mut max = [f32::NEG_INFINITY; LANES];
    let mut above = [0u32; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            let z = c[l] * mul;
            max[l] = max[l].max(z);
            above[l] += u32::from(z > z_pos);
        }
    }
    let (mut m, mut a) = (f32::NEG_INFINITY, 0u32);
    for l in 0..LANES {
        m = m.max(max[l]);
        a += above[l];
    }
    for &v in rest {
        let z = v * mul;
        m = m.max(z);
        a += u32::from(z > z_pos);
    }
    (m, a)
}

/// `sum_j exp(row[j] * mul - max)`.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512dq+avx512bw",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn row_sum_exp(row: &[f32], mul: f32, max: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += exp(c[l] * mul - max);
        }
    }
    let mut s = lanes_sum(acc);
    for &v in rest {
        s += exp(v * mul - max);
    }
    s
}

/// `out[j] = exp((row[j] * mul - max) - log_sum) * c`: the softmax times the incoming gradient.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512dq+avx512bw",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn row_softmax_times(out: &mut [f32], row: &[f32], mul: f32, max: f32, log_sum: f32, c: f32) {
    for (o, &v) in out.iter_mut().zip(row) {
        *o = exp((v * mul - max) - log_sum) * c;
    }
}

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        bail!("softmax cross-entropy: {what} must be float32")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("softmax cross-entropy: {what} must be contiguous"),
    }
}

impl SoftmaxCrossEntropy {
    /// The loss over the rows of `neg` (N x K), each with its positive logit from `pos`
    /// (Prefix: `pos[i]`, an extra column) or from the row itself (Column).
    fn forward(&self, pos: Option<&[f32]>, neg: &[f32], n: usize) -> CpuStorage {
        let k = neg.len().checked_div(n).unwrap_or(0);
        let mul = self.mul;
        let rows: Vec<(f32, f32, u32, f64)> = (0..n)
            .into_par_iter()
            .map(|i| {
                let row = &neg[i * k..(i + 1) * k];
                let (v_pos, extra) = match (self.positive, pos) {
                    (Positive::Prefix, Some(p)) => (p[i], true),
                    (Positive::Column { offset }, _) => (row[offset + i], false),
                    (Positive::Prefix, None) => unreachable!("prefix loss without its column"),
                };
                let z_pos = v_pos * mul;
                let (row_max, above) = row_max_above(row, mul, z_pos);
                let m = if extra { row_max.max(z_pos) } else { row_max };
                let mut s = row_sum_exp(row, mul, m);
                if extra {
                    s += exp(z_pos - m);
                }
                let log_sum = s.ln();
                // -log_softmax(z)[positive]
                (m, log_sum, above, f64::from(log_sum - (z_pos - m)))
            })
            .collect();
        let mut stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        stats.max = rows.iter().map(|r| r.0).collect();
        stats.log_sum = rows.iter().map(|r| r.1).collect();
        stats.above = rows.iter().map(|r| r.2).collect();
        let total: f64 = rows.iter().map(|r| r.3).sum();
        let loss = if n == 0 {
            f32::NAN // as candle's mean over no rows
        } else {
            (total / n as f64) as f32 * self.scale
        };
        CpuStorage::F32(vec![loss])
    }

    /// Gradient wrt the unscaled values: `(softmax - onehot(positive)) * g * scale / N * mul`.
    /// Returns the gradient of `neg` and, for Prefix, of `pos`.
    fn backward(
        &self,
        pos: Option<&Tensor>,
        neg: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Tensor)> {
        let g = grad
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .first()
            .copied()
            .unwrap_or(0.0);
        let n = neg.dim(0)?;
        let (max, log_sum) = {
            let stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
            (stats.max.clone(), stats.log_sum.clone())
        };
        if max.len() != n {
            bail!("softmax cross-entropy: backward before forward");
        }
        let grad_op = SoftmaxGrad {
            mul: self.mul,
            c: g * self.scale / n as f32 * self.mul,
            positive: self.positive,
            max,
            log_sum,
        };
        let g_pos = match pos {
            Some(p) => {
                let v = p.flatten_all()?.to_vec1::<f32>()?;
                let g: Vec<f32> = (0..n).map(|i| grad_op.positive_grad(v[i], i)).collect();
                Some(Tensor::from_vec(g, p.shape(), p.device())?)
            }
            None => None,
        };
        let g_neg = neg.contiguous()?.apply_op1_no_bwd(&grad_op)?;
        Ok((g_pos, g_neg))
    }
}

/// The backward pass as an op over the rows (reads them in place).
struct SoftmaxGrad {
    mul: f32,
    /// The incoming gradient times scale / N times mul.
    c: f32,
    positive: Positive,
    max: Vec<f32>,
    log_sum: Vec<f32>,
}

impl SoftmaxGrad {
    /// `(softmax - 1) * c` for the positive logit `v` of row `i`.
    fn positive_grad(&self, v: f32, i: usize) -> f32 {
        (exp((v * self.mul - self.max[i]) - self.log_sum[i]) - 1.0) * self.c
    }
}

impl CustomOp1 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "moco-softmax-cross-entropy-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = contiguous(s, l, "logits")?;
        let (n, k) = l.shape().dims2()?;
        let mut out = vec![0f32; n * k];
        out.par_chunks_mut(k.max(1))
            .zip(data.par_chunks(k.max(1)))
            .enumerate()
            .for_each(|(i, (out, row))| {
                row_softmax_times(out, row, self.mul, self.max[i], self.log_sum[i], self.c);
                if let Positive::Column { offset } = self.positive {
                    let j = offset + i;
                    out[j] = self.positive_grad(row[j], i);
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

impl CustomOp2 for SoftmaxCrossEntropy {
    fn name(&self) -> &'static str {
        "moco-softmax-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let pos = contiguous(s1, l1, "l_pos")?;
        let neg = contiguous(s2, l2, "l_neg")?;
        let (n, _) = l2.shape().dims2()?;
        if pos.len() != n {
            bail!(
                "softmax cross-entropy: l_pos has {} rows, l_neg {n}",
                pos.len()
            )
        }
        Ok((self.forward(Some(pos), neg, n), Shape::from(())))
    }

    fn bwd(
        &self,
        pos: &Tensor,
        neg: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (g_pos, g_neg) = self.backward(Some(pos), neg, grad)?;
        Ok((g_pos, Some(g_neg)))
    }
}

impl CustomOp1 for SoftmaxCrossEntropy {
    fn name(&self) -> &'static str {
        "moco-softmax-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = contiguous(s, l, "logits")?;
        let (n, _) = l.shape().dims2()?;
        Ok((self.forward(None, data, n), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.backward(None, logits, grad)?.1))
    }
}

fn check_cpu_f32(ts: &[&Tensor]) -> candle_core::Result<()> {
    for t in ts {
        if !t.device().is_cpu() || t.dtype() != DType::F32 || t.rank() != 2 {
            bail!(
                "softmax cross-entropy: expected 2-d float32 CPU tensors, got {:?} {:?} on {:?}",
                t.dims(),
                t.dtype(),
                t.device()
            )
        }
    }
    Ok(())
}

/// Runs `apply` with a fresh op and collects the ranks it left.
fn run(
    mul: f32,
    scale: f32,
    positive: Positive,
    apply: impl FnOnce(SoftmaxCrossEntropy) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Fused> {
    let stats = Arc::new(Mutex::new(RowStats::default()));
    let loss = apply(SoftmaxCrossEntropy {
        mul,
        scale,
        positive,
        stats: stats.clone(),
    })?;
    let above = std::mem::take(&mut stats.lock().unwrap_or_else(PoisonError::into_inner).above);
    Ok(Fused { loss, above })
}

/// Cross-entropy over the logits `[l_pos, l_neg] * mul` (N x (1+K)) with the positive in
/// column 0, averaged over the rows: `cross_entropy(cat([l_pos, l_neg], 1) / t, 0)` with
/// `mul = 1/t`. `l_pos`: N x 1, `l_neg`: N x K, float32 on the CPU.
pub(crate) fn queue_cross_entropy(
    l_pos: &Tensor,
    l_neg: &Tensor,
    mul: f32,
) -> candle_core::Result<Fused> {
    check_cpu_f32(&[l_pos, l_neg])?;
    run(mul, 1.0, Positive::Prefix, |op| {
        l_pos.contiguous()?.apply_op2(&l_neg.contiguous()?, op)
    })
}

/// `scale * cross_entropy(raw * mul, offset + arange(N))` for N x M float32 CPU `raw`
/// (M >= offset + N): row i's positive is column `offset + i`.
pub(crate) fn column_cross_entropy(
    raw: &Tensor,
    offset: usize,
    mul: f32,
    scale: f32,
) -> candle_core::Result<Fused> {
    check_cpu_f32(&[raw])?;
    let (n, m) = raw.dims2()?;
    if m < offset + n {
        bail!(
            "softmax cross-entropy: {n} x {m} logits have no column {}",
            offset + n - 1
        )
    }
    run(mul, scale, Positive::Column { offset }, |op| {
        raw.contiguous()?.apply_op1(op)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::init::seeded_randn;
    use candle_core::{Device, Var};

    /// The same loss through candle's generic ops, as `loss.rs` computes it on other devices.
    fn generic(pos: Option<&Tensor>, raw: &Tensor, t: f64, labels: &Tensor) -> Tensor {
        let logits = match pos {
            Some(p) => Tensor::cat(&[p, raw], 1).unwrap(),
            None => raw.clone(),
        };
        candle_nn::loss::cross_entropy(&(logits / t).unwrap(), labels).unwrap()
    }

    /// max |a - b| over max(max |b|, `floor`): a gradient whose every entry is close to 0
    /// (a row decided with certainty) is compared against the gradient's scale `floor`.
    fn rel(a: &Tensor, b: &Tensor, floor: f32) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let s = b.abs().unwrap().max_all().unwrap();
        (d.to_scalar::<f32>().unwrap()) / s.to_scalar::<f32>().unwrap().max(floor)
    }

    #[test]
    fn queue_loss_and_gradients_equal_candles_ops() {
        let dev = Device::Cpu;
        // K not a multiple of the 16 lanes; large logits (t = 0.05) to exercise the shift.
        for (n, k, t) in [(5, 37, 0.05), (3, 16, 1.0), (8, 1000, 0.2), (1, 1, 0.07)] {
            let pos = Var::from_tensor(&seeded_randn(0.0, 1.0, (n, 1), 1, &dev).unwrap()).unwrap();
            let neg = Var::from_tensor(&seeded_randn(0.0, 1.0, (n, k), 2, &dev).unwrap()).unwrap();
            let fused =
                queue_cross_entropy(pos.as_tensor(), neg.as_tensor(), (1.0 / t) as f32).unwrap();
            let labels = Tensor::zeros(n, DType::U32, &dev).unwrap();
            let want = generic(Some(pos.as_tensor()), neg.as_tensor(), t, &labels);
            assert!(rel(&fused.loss, &want, 1e-3) < 1e-6, "loss n={n} k={k}");
            // A non-unit incoming gradient reaches both inputs.
            let gf = (&fused.loss * 3.0).unwrap().backward().unwrap();
            let gw = (&want * 3.0).unwrap().backward().unwrap();
            // d loss / d logit is (softmax - onehot) * 3 / (N t).
            let floor = (3.0 / (n as f64 * t)) as f32;
            for v in [&pos, &neg] {
                let e = rel(gf.get(v).unwrap(), gw.get(v).unwrap(), floor);
                assert!(e < 1e-5, "grad n={n} k={k}: {e}");
            }
            // Ranks: the materialised logits' count above column 0.
            let logits = (Tensor::cat(&[pos.as_tensor(), neg.as_tensor()], 1).unwrap() / t)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let above: Vec<u32> = logits
                .iter()
                .map(|r| r.iter().filter(|&&z| z > r[0]).count() as u32)
                .collect();
            assert_eq!(fused.above, above);
        }
    }

    #[test]
    fn column_loss_and_gradient_equal_candles_ops() {
        let dev = Device::Cpu;
        for (n, m, offset, t, scale) in [
            (4, 4, 0, 0.2, 0.4),
            (3, 9, 3, 1.0, 1.0),
            (6, 40, 17, 0.1, 2.0),
        ] {
            let raw = Var::from_tensor(&seeded_randn(0.0, 2.0, (n, m), 3, &dev).unwrap()).unwrap();
            let fused =
                column_cross_entropy(raw.as_tensor(), offset, (1.0 / t) as f32, scale).unwrap();
            let labels = Tensor::arange(offset as u32, (offset + n) as u32, &dev).unwrap();
            let want = (generic(None, raw.as_tensor(), t, &labels) * f64::from(scale)).unwrap();
            assert!(rel(&fused.loss, &want, 1e-3) < 1e-6, "loss {n}x{m}");
            let gf = fused.loss.backward().unwrap();
            let gw = want.backward().unwrap();
            let floor = (f64::from(scale) / (n as f64 * t)) as f32;
            let e = rel(gf.get(&raw).unwrap(), gw.get(&raw).unwrap(), floor);
            assert!(e < 1e-5, "grad {n}x{m}: {e}");
        }
    }

    #[test]
    fn nan_and_infinite_logits_give_a_nan_loss() {
        let dev = Device::Cpu;
        let pos = Tensor::new(&[[0.5f32], [0.1]], &dev).unwrap();
        for bad in [f32::NAN, f32::INFINITY] {
            let neg = Tensor::new(&[[0.1f32, bad, 0.2], [0.3, 0.1, 0.0]], &dev).unwrap();
            let loss = queue_cross_entropy(&pos, &neg, 10.0).unwrap().loss;
            assert!(loss.to_scalar::<f32>().unwrap().is_nan(), "{bad}");
        }
    }

    #[test]
    fn wrong_devices_dtypes_and_shapes_are_errors() {
        let dev = Device::Cpu;
        let pos = Tensor::zeros((2, 1), DType::F64, &dev).unwrap();
        let neg = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        assert!(queue_cross_entropy(&pos, &neg, 1.0).is_err());
        let pos = Tensor::zeros((3, 1), DType::F32, &dev).unwrap();
        assert!(queue_cross_entropy(&pos, &neg, 1.0).is_err());
        assert!(column_cross_entropy(&neg, 2, 1.0, 1.0).is_err());
    }
}
