//! The ViT's LayerNorm and attention on candle's generic ops (CUDA, Metal, float64 input, or the
//! CPU with the generic kernels chosen), keeping for the backward pass only what PyTorch keeps
//! (the input and the output), as the generic BatchNorm does: the forward pass runs candle's ops
//! on detached tensors and its result is attached to the graph as one op
//! ([`crate::ops::attached`]) whose backward computes the gradients with candle's ops.
//!
//! Written as chains of graph-recorded ops, a LayerNorm kept four intermediates of its input's
//! size, the attention its copies of q, k and v and three tokens x tokens matrices per head
//! (the scores, the scaled scores and the probabilities); here the attention keeps none of them
//! and recomputes the probabilities in the backward pass, as the CPU kernel does.

use candle_core::{Result, Tensor, D};

use crate::ops::attached::{attach1, attach3, Backward1, Backward3};

// ---------------------------------------------------------------------------------------------
// LayerNorm

/// The LayerNorm's backward pass: per row, `xhat = (x - mean) * rstd`,
/// `dx = rstd * (g w - mean(g w) - xhat * mean(g w xhat))`, `dw = sum(g xhat)`, `db = sum(g)`.
struct LayerNormGrad {
    /// Per-row mean and 1 / sqrt(biased variance + eps), (rows, 1), detached.
    mean: Tensor,
    rstd: Tensor,
}

impl Backward3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer-norm-generic"
    }

    fn class(&self) -> &'static str {
        "layer norm backward"
    }

    fn backward(
        &self,
        [x, w, b]: [&Tensor; 3],
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(D::Minus1)?;
        let rows = x.elem_count() / d;
        let x2 = x.detach().reshape((rows, d))?;
        let g = grad.reshape((rows, d))?;
        let xhat = x2.broadcast_sub(&self.mean)?.broadcast_mul(&self.rstd)?;
        drop(x2);
        let dw = (&g * &xhat)?.sum(0)?;
        let db = g.sum(0)?;
        let gw = g.broadcast_mul(&w.detach())?;
        let m1 = gw.mean_keepdim(1)?;
        let m2 = (&gw * &xhat)?.mean_keepdim(1)?;
        let dx = gw
            .broadcast_sub(&m1)?
            .sub(&xhat.broadcast_mul(&m2)?)?
            .broadcast_mul(&self.rstd)?
            .reshape(x.dims())?;
        Ok((
            Some(dx),
            Some(dw.reshape(w.dims())?),
            Some(db.reshape(b.dims())?),
        ))
    }
}

/// `torch.nn.LayerNorm` over the last dimension (biased variance) with candle's ops, keeping
/// the input and the output for the backward pass.
pub(super) fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let rows = x.elem_count() / d;
    let x2 = x.detach().reshape((rows, d))?;
    let mean = x2.mean_keepdim(1)?;
    let xc = x2.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(1)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    let y = xc
        .broadcast_mul(&rstd)?
        .broadcast_mul(&weight.detach())?
        .broadcast_add(&bias.detach())?
        .reshape(x.dims())?;
    drop(xc);
    let op = LayerNormGrad { mean, rstd };
    attach3(&y, [x, weight, bias], op)
}

// ---------------------------------------------------------------------------------------------
// Attention

/// q, k, v (N, heads, T, hd), contiguous, from the qkv projection's output (N, T, 3D) laid out
/// as timm reshapes it (channels (q|k|v, head, j)).
fn split_qkv(qkv: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, t, c) = qkv.dims3()?;
    let hd = c / (3 * heads);
    let qkv = qkv
        .reshape((n, t, 3, heads, hd))?
        .permute((2, 0, 3, 1, 4))?;
    let part = |i: usize| qkv.get(i)?.contiguous();
    Ok((part(0)?, part(1)?, part(2)?))
}

/// The probabilities `softmax(q k^T * scale)` (N, heads, T, T).
fn probabilities(q: &Tensor, k: &Tensor, scale: f64) -> Result<Tensor> {
    candle_nn::ops::softmax(&(q.matmul(&k.t()?)? * scale)?, D::Minus1)
}

/// The attention's backward pass: with `P` recomputed, `dV = P^T dO`, `dP = dO V^T`,
/// `dS = P (dP - rowsum(dP P))`, `dQ = scale dS K`, `dK = scale dS^T Q`.
struct AttentionGrad {
    heads: usize,
    scale: f64,
}

impl Backward1 for AttentionGrad {
    fn name(&self) -> &'static str {
        "attention-generic"
    }

    fn class(&self) -> &'static str {
        "attention backward"
    }

    fn backward(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, t, c) = qkv.dims3()?;
        let (h, hd) = (self.heads, c / (3 * self.heads));
        let (q, k, v) = split_qkv(&qkv.detach(), h)?;
        let p = probabilities(&q, &k, self.scale)?;
        // dO (N, T, D) -> (N, heads, T, hd)
        let d_o = grad.reshape((n, t, h, hd))?.transpose(1, 2)?.contiguous()?;
        let dv = p.t()?.matmul(&d_o)?;
        let dp = d_o.matmul(&v.t()?)?;
        drop(d_o);
        let ds = (&p * dp.broadcast_sub(&(&dp * &p)?.sum_keepdim(D::Minus1)?)?)?;
        drop((p, dp));
        let dq = (ds.matmul(&k)? * self.scale)?;
        let dk = (ds.t()?.matmul(&q)? * self.scale)?;
        // (3, N, heads, T, hd) -> (N, T, 3, heads, hd) -> (N, T, 3D)
        let dqkv = Tensor::stack(&[&dq, &dk, &dv], 0)?
            .permute((1, 3, 0, 2, 4))?
            .contiguous()?
            .reshape((n, t, c))?;
        Ok(Some(dqkv))
    }
}

/// Multi-head self-attention `softmax(q k^T * scale) v` from the qkv projection's output
/// (N, T, 3D) to the heads' outputs side by side (N, T, D), with candle's ops, keeping only
/// the qkv input and the output for the backward pass.
pub(super) fn attention(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (n, t, c) = qkv.dims3()?;
    let (q, k, v) = split_qkv(&qkv.detach(), heads)?;
    let out = probabilities(&q, &k, scale)?
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n, t, c / 3))?;
    let op = AttentionGrad { heads, scale };
    attach1(&out, qkv, op)
}
