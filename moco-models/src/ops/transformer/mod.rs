//! The transformer ops of the ViTs, device-neutral: LayerNorm over the last dimension,
//! multi-head self-attention from a fused qkv projection, and the exact (erf) GELU. Each checks
//! its shapes here and runs, chosen here once, either
//!
//! - `cpu.rs`: one fused kernel each way for float32 CPU tensors ([`Kernels::Fused`]), or
//! - `generic.rs`: candle's ops on detached tensors, attached to the graph by one op that
//!   keeps the input and the output (candle's own `gelu_erf` for the GELU).
//!
//! The linear layers are [`crate::ops::linear`].
//!
//! [`Kernels::Fused`]: moco_core::Kernels::Fused

mod cpu;
mod generic;

use candle_core::{Result, Tensor, D};

use crate::ops::Settings;

/// `torch.nn.LayerNorm` over the last dimension (`weight`, `bias`: its size), biased variance.
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    settings: &Settings,
) -> Result<Tensor> {
    moco_core::profile::timed("layer norm forward", x.device(), || {
        let d = x.dim(D::Minus1)?;
        if weight.elem_count() != d || bias.elem_count() != d {
            candle_core::bail!(
                "layer_norm: input rows of {d}, weight {:?}, bias {:?}",
                weight.dims(),
                bias.dims()
            )
        }
        if settings.fused(&[x, weight, bias]) {
            return cpu::layer_norm(x, weight, bias, eps);
        }
        generic::layer_norm(x, weight, bias, eps)
    })
}

/// Multi-head self-attention from the qkv projection's output (N x T x 3D, channels (q|k|v,
/// head, j) as timm reshapes them) to the heads' outputs side by side (N x T x D):
/// `softmax(q k^T / sqrt(hd)) v` per head.
pub fn attention(qkv: &Tensor, heads: usize, settings: &Settings) -> Result<Tensor> {
    moco_core::profile::timed("attention forward", qkv.device(), || {
        let (_, _, c) = qkv.dims3()?;
        if heads == 0 || c % (3 * heads) != 0 {
            candle_core::bail!("attention: {c} channels are not 3 x {heads} heads")
        }
        let scale = ((c / (3 * heads)) as f64).powf(-0.5);
        if settings.fused(&[qkv]) {
            return cpu::attention(qkv, heads, scale);
        }
        generic::attention(qkv, heads, scale)
    })
}

/// The exact GELU, `x Phi(x)` (`torch.nn.GELU()`).
pub fn gelu_erf(x: &Tensor, settings: &Settings) -> Result<Tensor> {
    moco_core::profile::timed("gelu forward", x.device(), || {
        if settings.fused(&[x]) {
            cpu::gelu_erf(x)
        } else {
            x.gelu_erf()
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::DType;
    use candle_core::{Device, Var};
    use moco_core::init::seeded_randn;
    use moco_testing::max_rel;

    const S: Settings = Settings {
        kernels: moco_core::Kernels::Fused,
        conv_engine: crate::ops::ConvEngine::Gemm,
        cudnn_batch_norm: false,
        cuda_kernels: false,
    };

    /// Forward values and the gradients of sum(f(..) * mix) against candle's generic ops.
    fn check(
        name: &str,
        inputs: &[&Var],
        ours: impl Fn(&[Tensor]) -> Tensor,
        theirs: impl Fn(&[Tensor]) -> Tensor,
        tol: f32,
    ) {
        let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (ours(&ts), theirs(&ts));
        assert!(
            max_rel(&a, &b) <= tol,
            "{name}: forward {}",
            max_rel(&a, &b)
        );
        let mix = seeded_randn(0.0, 1.0, a.shape(), 1, &Device::Cpu).unwrap();
        let ga = (&a * &mix).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &mix).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in inputs.iter().enumerate() {
            let (x, y) = (ga.get(v).unwrap(), gb.get(v).unwrap());
            assert!(
                max_rel(x, y) <= tol,
                "{name}: gradient {i}: {}",
                max_rel(x, y)
            );
        }
    }

    #[test]
    fn fused_ops_match_candle_ops_forward_and_backward() {
        let dev = Device::Cpu;
        // Odd sizes: rows that do not fill a chunk, lanes left over.
        for (rows, d) in [(3, 5), (37, 48), (300, 129)] {
            let x = Var::from_tensor(&seeded_randn(0.5, 2.0, (rows, d), 2, &dev).unwrap()).unwrap();
            let w = Var::from_tensor(&seeded_randn(1.0, 0.3, d, 3, &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&seeded_randn(0.0, 0.3, d, 4, &dev).unwrap()).unwrap();
            check(
                "layer_norm",
                &[&x, &w, &b],
                |t| layer_norm(&t[0], &t[1], &t[2], 1e-6, &S).unwrap(),
                |t| {
                    let mean = t[0].mean_keepdim(candle_core::D::Minus1).unwrap();
                    let xc = t[0].broadcast_sub(&mean).unwrap();
                    let var = xc
                        .sqr()
                        .unwrap()
                        .mean_keepdim(candle_core::D::Minus1)
                        .unwrap();
                    xc.broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap())
                        .unwrap()
                        .broadcast_mul(&t[1])
                        .unwrap()
                        .broadcast_add(&t[2])
                        .unwrap()
                },
                2e-5,
            );
            let s =
                Var::from_tensor(&seeded_randn(0.0, 3.0, (2, rows, d), 5, &dev).unwrap()).unwrap();
            let y = Var::from_tensor(&seeded_randn(0.0, 1.0, (rows, d), 6, &dev).unwrap()).unwrap();
            check(
                "add_bias",
                &[&y, &b],
                |t| crate::ops::linear::add_bias(&t[0], &t[1], &S).unwrap(),
                |t| t[0].broadcast_add(&t[1]).unwrap(),
                1e-6,
            );
            check(
                "gelu",
                &[&s],
                |t| gelu_erf(&t[0], &S).unwrap(),
                |t| t[0].gelu_erf().unwrap(),
                2e-6,
            );
        }
    }

    #[test]
    fn fused_attention_matches_candle_ops_forward_and_backward() {
        let dev = Device::Cpu;
        // (samples, tokens, heads, head width): odd sizes, one head, tokens beyond a lane block.
        for (n, t, h, hd) in [(2, 5, 1, 3), (3, 17, 4, 8), (2, 65, 3, 16)] {
            let qkv =
                Var::from_tensor(&seeded_randn(0.0, 1.0, (n, t, 3 * h * hd), 7, &dev).unwrap())
                    .unwrap();
            check(
                "attention",
                &[&qkv],
                |x| attention(&x[0], h, &S).unwrap(),
                |x| {
                    // The generic path (taken for a float64 input), in float64.
                    attention(&x[0].to_dtype(DType::F64).unwrap(), h, &S)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                },
                2e-5,
            );
        }
        let qkv = Tensor::zeros((2, 3, 10), DType::F32, &dev).unwrap();
        assert!(attention(&qkv, 3, &S)
            .unwrap_err()
            .to_string()
            .contains("3 x 3 heads"));
    }

    #[test]
    fn layer_norm_names_bad_shapes() {
        let y = [[1000f32, 0.0, -1000.0], [-1e30, -1e30, -1e30]];
        let x = Tensor::new(&y, &Device::Cpu).unwrap();
        let w = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        let err = layer_norm(&x, &w, &w, 1e-6, &S).unwrap_err().to_string();
        assert!(err.contains("rows of 3"), "{err}");
    }
}
