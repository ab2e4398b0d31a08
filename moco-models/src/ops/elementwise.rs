//! Element-wise ops: [`add_relu`] (the residual connection of a ResNet block), a fused kernel
//! for float32 CPU tensors as a candle custom op with its own backward (one parallel pass each
//! way where candle's generic ops take several and allocate a zero gradient to accumulate into
//! for each input), candle's ops elsewhere; and the ReLU mask of a gradient, which the fused
//! BatchNorm shares.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use std::mem::MaybeUninit;

use crate::ops::scratch::{f32_slice, filled, CHUNK};
use crate::ops::Settings;

/// `relu(a + b)`: the residual connection of a ResNet block.
struct AddRelu;

/// `out = g where y > 0, else 0`.
struct ReluGrad;

/// `f(a[i], b[i])` for every i, in parallel chunks, into a fresh vector (`b` at least as long
/// as `a`).
pub(crate) fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    assert!(b.len() >= a.len(), "zip_map: second operand too short");
    let fill = |i: usize, out: &mut [MaybeUninit<f32>]| {
        let (a, b) = (&a[i * CHUNK..], &b[i * CHUNK..]);
        for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
            o.write(f(a, b));
        }
    };
    // SAFETY: chunk i of the output has the length of a[i * CHUNK..] (or CHUNK), and `a` and
    // `b` are at least that long from there, so every element of it is written.
    unsafe { filled(a.len(), CHUNK, fill) }
}

/// The gradient through a ReLU: `g` where its output `y` is positive, else 0.
pub(crate) fn relu_grad(g: &[f32], y: &[f32]) -> Vec<f32> {
    zip_map(g, y, |g, y| if y > 0.0 { g } else { 0.0 })
}

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
        let y = zip_map(
            f32_slice(s1, l1, "add_relu")?,
            f32_slice(s2, l2, "add_relu")?,
            |a, b| (a + b).max(0.0),
        );
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        y: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        moco_core::profile::timed("add + relu backward", gy.device(), || {
            let g = gy.contiguous()?.apply_op2_no_bwd(y, &ReluGrad)?;
            let ga = a.track_op().then(|| g.clone());
            let gb = b.track_op().then_some(g);
            Ok((ga, gb))
        })
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
        let out = relu_grad(
            f32_slice(s1, l1, "relu_grad")?,
            f32_slice(s2, l2, "relu_grad")?,
        );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `relu(a + b)` for tensors of the same shape: fused on float32 CPU tensors (as `settings`
/// allow), candle's ops elsewhere. Its gradient reaches both inputs where the output is
/// positive, as autograd's.
pub fn add_relu(a: &Tensor, b: &Tensor, settings: &Settings) -> Result<Tensor> {
    moco_core::profile::timed("add + relu forward", a.device(), || {
        if !settings.fused(&[a, b]) {
            return (a + b)?.relu();
        }
        if a.dims() != b.dims() {
            candle_core::bail!("add_relu: shapes {:?} and {:?} differ", a.dims(), b.dims())
        }
        a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::{Device, Var};
    use moco_core::init::seeded_randn;
    use moco_testing::max_rel;

    #[test]
    fn add_relu_matches_candle_ops_forward_and_backward() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&seeded_randn(0.0, 1.0, (3, 4, 5, 7), 3, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&seeded_randn(0.0, 1.0, (3, 4, 5, 7), 4, &dev).unwrap()).unwrap();
        let mix = seeded_randn(0.0, 1.0, (3, 4, 5, 7), 1, &dev).unwrap();
        let ours = add_relu(a.as_tensor(), b.as_tensor(), &Settings::default()).unwrap();
        let theirs = (a.as_tensor() + b.as_tensor()).unwrap().relu().unwrap();
        assert_eq!(max_rel(&ours, &theirs), 0.0);
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
            assert_eq!(max_rel(ga.get(v).unwrap(), gb.get(v).unwrap()), 0.0);
        }
        // A frozen input gets no gradient.
        let c = seeded_randn(0.0, 1.0, (3, 4, 5, 7), 2, &dev).unwrap();
        let g = add_relu(a.as_tensor(), &c, &Settings::default())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&c).is_none() && g.get(a.as_tensor()).is_some());
    }
}
