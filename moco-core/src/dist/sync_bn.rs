//! Statistics shared by the ranks of a data-parallel run: the collective side of SyncBatchNorm.
//!
//! MoCo v3's official code converts every BatchNorm of the model to `SyncBatchNorm` in a
//! data-parallel run: the batch statistics are those of the global batch, and the backward pass
//! sums the statistics' gradients over the ranks. MoCo v1/v2 keep per-rank statistics (shuffle-BN
//! needs them). A layer cannot be handed the process group when it is built (the encoders exist
//! before [`crate::Moco::with_collective`]), so the group is installed for the duration of a
//! training step with [`scope`]: [`group`] tells a layer whether to synchronise, and
//! [`all_reduce_sum`] is the differentiable sum it synchronises with.
//!
//! The group lives in a thread-local slot, like PyTorch's default process group: the forward
//! and the backward pass of a step must run on the thread that opened the scope, inside it
//! (candle runs both on the calling thread).

use std::cell::RefCell;
use std::rc::Rc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::collective::Collective;

thread_local! {
    static GROUPS: RefCell<Vec<Rc<dyn Collective>>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with `comm` as the group that synchronised layers reduce over ([`group`]); the
/// previous group (if any) is back when `f` returns or unwinds. Scopes nest.
pub fn scope<T>(comm: Rc<dyn Collective>, f: impl FnOnce() -> T) -> T {
    struct Pop;
    impl Drop for Pop {
        fn drop(&mut self) {
            GROUPS.with(|g| g.borrow_mut().pop());
        }
    }
    GROUPS.with(|g| g.borrow_mut().push(comm));
    let _pop = Pop;
    f()
}

/// The group of the innermost [`scope`] on this thread, when it has more than one rank: a
/// layer in training mode synchronises over it.
pub fn group() -> Option<Rc<dyn Collective>> {
    GROUPS
        .with(|g| g.borrow().last().cloned())
        .filter(|c| c.world_size() > 1)
}

/// Forward: the element-wise sum of `t` over the ranks of the current [`group`]. Backward: the
/// gradient is summed over the ranks too, so that each rank receives the gradient of the sum
/// of all ranks' losses with respect to its own `t` (what a data-parallel run of a
/// synchronised layer needs; gradients are averaged over ranks afterwards as usual).
///
/// Outside a group (or in a group of one) it returns `t`. The backward pass must run inside
/// a scope with the same group. CPU and CUDA tensors.
pub fn all_reduce_sum(t: &Tensor) -> candle_core::Result<Tensor> {
    let Some(comm) = group() else {
        return Ok(t.clone());
    };
    let summed = comm
        .all_reduce_sum(&t.detach())
        .map_err(|e| candle_core::Error::Msg(format!("SyncBatchNorm: {e}")))?
        .contiguous()?;
    t.apply_op2_arc(
        &summed,
        std::sync::Arc::new(Box::new(SummedOverRanks) as Box<dyn CustomOp2 + Send + Sync>),
    )
}

/// `(t, sum of t over the ranks)` -> the sum, with the gradient of `t` summed over the ranks.
struct SummedOverRanks;

/// The second operand, which [`all_reduce_sum`] makes contiguous from offset 0.
fn second<S: BackendStorage>(s: &S, l: &Layout) -> candle_core::Result<(S, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("sync all-reduce: the summed tensor must be contiguous from offset 0")
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

impl CustomOp2 for SummedOverRanks {
    fn name(&self) -> &'static str {
        "sync-all-reduce-sum"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        second(s2, l2)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        second(s2, l2)
    }

    fn bwd(
        &self,
        _arg1: &Tensor,
        _arg2: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(comm) = group() else {
            candle_core::bail!(
                "SyncBatchNorm backward outside the data-parallel scope of its forward pass (moco_core::dist::sync_bn::scope)"
            )
        };
        let g = comm
            .all_reduce_sum(grad_res)
            .map_err(|e| candle_core::Error::Msg(format!("SyncBatchNorm backward: {e}")))?;
        Ok((Some(g), None))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::dist::collective::SingleProcess;
    use crate::dist::tcp::on_threads;
    use candle_core::{Device, Var};

    #[test]
    fn outside_a_group_it_is_the_identity() {
        let t = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        assert!(group().is_none());
        let single: Rc<dyn Collective> = Rc::new(SingleProcess);
        scope(single, || {
            // A group of one does not synchronise.
            assert!(group().is_none());
            let y = all_reduce_sum(&t).unwrap();
            assert_eq!(y.to_vec1::<f32>().unwrap(), [1.0, 2.0]);
        });
    }

    #[test]
    fn forward_and_backward_sum_over_the_ranks() {
        // Rank r holds x_r = (r + 1) * [1, 2, 3]; y = sum_r x_r on every rank; each rank's loss
        // is w_r . y with w_r = [1, 10, 100] * (r + 1). The gradient of the summed losses with
        // respect to x_r is sum_r w_r = [3, 30, 300] on both ranks.
        let got = on_threads(2, |comm| {
            let r = comm.rank() as f32;
            let comm: Rc<dyn Collective> = Rc::from(comm);
            let x = Var::new(&[r + 1.0, 2.0 * (r + 1.0), 3.0 * (r + 1.0)], &Device::Cpu).unwrap();
            let w = Tensor::new(
                &[r + 1.0, 10.0 * (r + 1.0), 100.0 * (r + 1.0)],
                &Device::Cpu,
            )
            .unwrap();
            scope(comm, || {
                let y = all_reduce_sum(x.as_tensor()).unwrap();
                let loss = (&y * &w).unwrap().sum_all().unwrap();
                let grads = loss.backward().unwrap();
                (
                    y.to_vec1::<f32>().unwrap(),
                    grads.get(&x).unwrap().to_vec1::<f32>().unwrap(),
                )
            })
        })
        .unwrap();
        for (y, g) in got {
            assert_eq!(y, [3.0, 6.0, 9.0]);
            assert_eq!(g, [3.0, 30.0, 300.0]);
        }
    }

    #[test]
    fn scopes_nest_and_unwind() {
        let single: Rc<dyn Collective> = Rc::new(SingleProcess);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            scope(single, || panic!("inside"));
        }));
        assert!(r.is_err());
        GROUPS.with(|g| assert!(g.borrow().is_empty()));
    }
}
