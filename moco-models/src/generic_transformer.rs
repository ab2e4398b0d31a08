//! The ViT's LayerNorm and attention on candle's generic ops (CUDA, Metal, float64 input, or the
//! CPU with its fused kernels switched off), and its linear layers on every device, keeping for
//! the backward pass only what PyTorch keeps (their input, and the LayerNorm's and attention's
//! output), as [`crate::generic_norm`] does for BatchNorm: the forward pass runs candle's ops on
//! detached tensors and its result is attached to the graph as one op ([`crate::attached`])
//! whose backward computes the gradients with candle's ops.
//!
//! Written as chains of graph-recorded ops, a LayerNorm kept four intermediates of its input's
//! size, the attention its copies of q, k and v and three tokens x tokens matrices per head
//! (the scores, the scaled scores and the probabilities), and a linear layer its product
//! before the bias; here the attention keeps none of them and recomputes the probabilities in
//! the backward pass, as the CPU kernel does.

use candle_core::{Result, Tensor, D};

use crate::attached::{attach1, attach3, Backward1, Backward3};

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
pub(crate) fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
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
pub(crate) fn attention(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
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

// ---------------------------------------------------------------------------------------------
// Linear

/// A linear layer's backward pass: `dx = g W`, `dW = g^T x`, `db` = the column sums of `g`.
struct LinearGrad;

impl Backward3 for LinearGrad {
    fn name(&self) -> &'static str {
        "linear-attached"
    }

    fn backward(
        &self,
        [x, w, b]: [&Tensor; 3],
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, k) = w.dims2()?;
        let g = grad.reshape((grad.elem_count() / out, out))?;
        let dx = match x.track_op() {
            true => Some(g.matmul(&w.detach())?.reshape(x.dims())?),
            false => None,
        };
        let dw = match w.track_op() {
            true => Some(g.t()?.matmul(&x.detach().reshape(((), k))?)?),
            false => None,
        };
        let db = match b.track_op() {
            true => Some(crate::cpu_transformer::column_sums(&g)?),
            false => None,
        };
        Ok((dx, dw, db))
    }
}

/// `x W^T + b` over the last dimension of `x` (any rank; one matrix product over the rows),
/// keeping `x` and the parameters for the backward pass but not the product before the bias.
/// Candle's matrix products on every device; the bias through
/// [`crate::cpu_transformer::add_bias`] (fused on float32 CPU tensors).
pub(crate) fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (out, k) = w.dims2()?;
    if dims.last() != Some(&k) || b.dims() != [out] {
        candle_core::bail!(
            "linear: input {dims:?}, weight {:?}, bias {:?}",
            w.dims(),
            b.dims()
        )
    }
    let y = x.detach().reshape(((), k))?.matmul(&w.detach().t()?)?;
    let y = crate::cpu_transformer::add_bias(&y, &b.detach())?;
    let mut shape = dims;
    let last = shape.len() - 1;
    shape[last] = out;
    attach3(&y.reshape(shape)?, [x, w, b], LinearGrad)
}

/// The residual add's backward pass: the gradient reaches both summands unchanged.
struct SumGrad;

impl Backward3 for SumGrad {
    fn name(&self) -> &'static str {
        "residual-add-attached"
    }

    fn backward(
        &self,
        [a, r, _]: [&Tensor; 3],
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let pass = |t: &Tensor| t.track_op().then(|| grad.clone());
        Ok((pass(a), pass(r), None))
    }
}

/// `r + (x W^T + b)`, a ViT block's residual add after a linear layer, keeping no more than
/// [`linear`] does: the sum is computed once, detached, and recorded twice over the same
/// storage, as the linear layer's result (whose backward reaches `x`, `W` and `b`) and as the
/// sum of that result and `r` (whose backward passes the gradient to both). Neither the linear
/// output before the add nor anything else of the sum's size is kept besides the sum itself.
pub(crate) fn linear_add(x: &Tensor, w: &Tensor, b: &Tensor, r: &Tensor) -> Result<Tensor> {
    let y = linear(&x.detach(), &w.detach(), &b.detach())?;
    if y.dims() != r.dims() {
        candle_core::bail!(
            "residual add: linear output {:?}, residual {:?}",
            y.dims(),
            r.dims()
        )
    }
    let sum = (y + r.detach())?;
    let product = attach3(&sum, [x, w, b], LinearGrad)?;
    attach3(&sum, [&product, r, r], SumGrad)
}
