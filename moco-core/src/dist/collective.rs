//! [`Collective`]: a process group as MoCo's data-parallel step sees it, and [`SingleProcess`],
//! the group of one.

use candle_core::Tensor;

use crate::Result;

/// A process group: this process's rank, the world size and the collectives.
///
/// Every rank must call the same collectives in the same order with tensors of the same shape;
/// a backend that can detect a mismatch reports it as an error naming both sides.
pub trait Collective: std::fmt::Debug {
    /// This process's rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn world_size(&self) -> usize;
    /// The backend's name (`single`, `tcp`, `nccl`).
    fn backend(&self) -> &'static str;
    /// Element-wise sum of `t` over all ranks; every rank receives the same tensor.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Every rank's `t` (all of one shape) concatenated along dimension 0 in rank order.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor>;
    /// Rank `root`'s `t` on every rank (elsewhere `t` only gives the shape and dtype).
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
}

/// World size 1: every collective returns its input.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn broadcast(&self, t: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(t.clone())
    }
}
