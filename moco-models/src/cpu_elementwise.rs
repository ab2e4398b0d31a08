//! Fused element-wise kernels for float32 tensors on the CPU, as candle custom ops with their
//! own backward: one parallel pass each way where candle's generic ops take several (and
//! allocate a zero gradient to accumulate into for each input).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use std::mem::MaybeUninit;

use crate::scratch::filled;

const CHUNK: usize = 4096;

/// `relu(a + b)`: the residual connection of a ResNet block.
struct AddRelu;

fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("add_relu (cpu): expected contiguous float32 tensors"),
    }
}

/// `out = g where y > 0, else 0`.
struct ReluGrad;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "moco-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (f32s(s1, l1)?, f32s(s2, l2)?);
        let fill = |i: usize, y: &mut [MaybeUninit<f32>]| {
            let (a, b) = (&a[i * CHUNK..], &b[i * CHUNK..]);
            for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
                y.write((a + b).max(0.0));
            }
        };
        // SAFETY: each chunk of y is written element by element (a and b are as long as y).
        let y = unsafe { filled(a.len(), CHUNK, fill) };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        y: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = gy.contiguous()?.apply_op2_no_bwd(y, &ReluGrad)?;
        let ga = a.track_op().then(|| g.clone());
        let gb = b.track_op().then_some(g);
        Ok((ga, gb))
    }
}

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "moco-relu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, y) = (f32s(s1, l1)?, f32s(s2, l2)?);
        let fill = |i: usize, o: &mut [MaybeUninit<f32>]| {
            let (g, y) = (&g[i * CHUNK..], &y[i * CHUNK..]);
            for ((o, &g), &y) in o.iter_mut().zip(g).zip(y) {
                o.write(if y > 0.0 { g } else { 0.0 });
            }
        };
        // SAFETY: each chunk of the output is written element by element.
        let out = unsafe { filled(g.len(), CHUNK, fill) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `relu(a + b)` for tensors of the same shape: fused on float32 CPU tensors, candle's ops
/// elsewhere. Its gradient reaches both inputs where the output is positive, as autograd's.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !a.device().is_cpu() || a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return (a + b)?.relu();
    }
    if a.dims() != b.dims() {
        candle_core::bail!("add_relu: shapes {:?} and {:?} differ", a.dims(), b.dims())
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn add_relu_matches_candle_ops_forward_and_backward() {
        let dev = Device::Cpu;
        let a = Var::randn(0f32, 1.0, (3, 4, 5, 7), &dev).unwrap();
        let b = Var::randn(0f32, 1.0, (3, 4, 5, 7), &dev).unwrap();
        let mix = Tensor::randn(0f32, 1.0, (3, 4, 5, 7), &dev).unwrap();
        let ours = add_relu(a.as_tensor(), b.as_tensor()).unwrap();
        let theirs = (a.as_tensor() + b.as_tensor()).unwrap().relu().unwrap();
        let diff = |x: &Tensor, y: &Tensor| {
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(diff(&ours, &theirs), 0.0);
        let ga = (&ours * &mix)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = (&theirs * &mix)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&a, &b] {
            assert_eq!(diff(ga.get(v).unwrap(), gb.get(v).unwrap()), 0.0);
        }
        // A frozen input gets no gradient.
        let c = Tensor::randn(0f32, 1.0, (3, 4, 5, 7), &dev).unwrap();
        let g = add_relu(a.as_tensor(), &c)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&c).is_none() && g.get(a.as_tensor()).is_some());
    }
}
