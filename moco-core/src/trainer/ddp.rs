//! The data-parallel side of a MoCo step, as the official code's `DistributedDataParallel` and
//! `concat_all_gather` provide it: the same start on every rank, gradients averaged over the
//! ranks, the logged loss and accuracies averaged, SyncBN's scope, and a check that the ranks
//! still agree. With [`SingleProcess`] every one of these is a no-op.

use std::collections::BTreeMap;
use std::rc::Rc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use crate::dist::{sync_bn, Collective, SingleProcess};
use crate::momentum::MomentumEncoder;
use crate::queue::Queue;
use crate::{Error, Result};

/// A MoCo model's process group and whether its BatchNorms synchronise over it.
#[derive(Clone)]
pub(crate) struct DataParallel {
    comm: Rc<dyn Collective>,
    sync_bn: bool,
}

impl DataParallel {
    /// One process, no collectives.
    pub fn single() -> Self {
        Self {
            comm: Rc::new(SingleProcess),
            sync_bn: false,
        }
    }

    /// A rank of `comm`; `sync_bn`: BatchNorm statistics over all ranks (MoCo v3).
    pub fn new(comm: Box<dyn Collective>, sync_bn: bool) -> Self {
        Self {
            comm: Rc::from(comm),
            sync_bn,
        }
    }

    /// The process group.
    pub fn comm(&self) -> &dyn Collective {
        &*self.comm
    }

    /// Whether the steps go through a process group's collectives: any group but
    /// [`SingleProcess`], a group of one process included (whose collectives must then change
    /// nothing: how the NCCL path is checked on one GPU).
    pub fn is_distributed(&self) -> bool {
        self.comm.backend() != "single"
    }

    /// Runs `f` with the process group installed for synchronised BatchNorm when the model
    /// asks for it ([`sync_bn::scope`]).
    pub fn synced<T>(&self, f: impl FnOnce() -> T) -> T {
        if self.sync_bn && self.is_distributed() {
            sync_bn::scope(self.comm.clone(), f)
        } else {
            f()
        }
    }

    /// Rank 0's query variables (by name: every rank broadcasts them in the same order), key
    /// encoder and queue on every rank; the queue rebuilt from the broadcast keys.
    pub fn broadcast_start(
        &self,
        encoders: &MomentumEncoder,
        queue: Option<&Queue>,
    ) -> Result<Option<Queue>> {
        let comm = &self.comm;
        let vars: BTreeMap<String, Var> = encoders
            .query_varmap()
            .data()
            .lock()
            .map_err(|_| Error::config("vars", "poisoned lock"))?
            .clone()
            .into_iter()
            .collect();
        for var in vars.values() {
            var.set(&comm.broadcast(var.as_tensor(), 0)?)?;
        }
        let mut key = encoders.key_tensors();
        for t in key.values_mut() {
            *t = comm.broadcast(t, 0)?;
        }
        encoders.load_key(&key)?;
        queue
            .map(|q| {
                let keys = comm.broadcast(q.keys(), 0)?;
                Queue::from_parts(keys, q.ptr(), q.labels().cloned())
            })
            .transpose()
    }

    /// Checks that every rank holds the same parameters (compares per-parameter sums across
    /// ranks); an error names the first parameter that differs after `step`. A no-op on one
    /// process.
    pub fn check_in_sync(&self, params: &[(String, Var)], step: u64) -> Result<()> {
        let world = self.comm.world_size();
        if !self.is_distributed() {
            return Ok(());
        }
        let sums = params
            .iter()
            .map(|(_, v)| v.as_tensor().to_dtype(DType::F64)?.sum_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let all = self
            .comm
            .all_gather(&Tensor::stack(&sums, 0)?.to_dtype(DType::F32)?)?
            .reshape((world, params.len()))?
            .to_vec2::<f32>()?;
        for (r, row) in all.iter().enumerate().skip(1) {
            if let Some(i) = (0..params.len()).find(|&i| row[i].to_bits() != all[0][i].to_bits()) {
                return Err(Error::Dist {
                    rank: self.comm.rank(),
                    msg: format!(
                        "ranks 0 and {r} hold different values of `{}` after step {step} (sums {} and {})",
                        params[i].0, all[0][i], row[i]
                    ),
                });
            }
        }
        Ok(())
    }

    /// The loss and accuracies averaged over the ranks (the same on every rank, so that a
    /// non-finite loss stops every rank at the same step).
    pub fn mean_over_ranks(
        &self,
        loss: f32,
        acc1: f32,
        acc5: f32,
        device: &Device,
    ) -> Result<(f32, f32, f32)> {
        if !self.is_distributed() {
            return Ok((loss, acc1, acc5));
        }
        let world = self.comm.world_size();
        let v = Tensor::new(&[loss, acc1, acc5], device)?;
        let v = (self.comm.all_reduce_sum(&v)? / world as f64)?.to_vec1::<f32>()?;
        Ok((v[0], v[1], v[2]))
    }

    /// Replaces the gradient of every parameter in `params` by its mean over the ranks: one
    /// all-reduce over all gradients flattened into one float32 buffer (DDP's bucket, here a
    /// single one; the collectives carry float32), each converted back to its variable's dtype.
    pub fn average_gradients(&self, grads: &mut GradStore, params: &[(String, Var)]) -> Result<()> {
        let world = self.comm.world_size();
        if !self.is_distributed() {
            return Ok(());
        }
        let mut flat = vec![];
        let mut vars = vec![];
        for (_, var) in params {
            if let Some(g) = grads.get(var) {
                flat.push(g.flatten_all()?.to_dtype(DType::F32)?);
                vars.push(var);
            }
        }
        if flat.is_empty() {
            return Ok(());
        }
        let mean = (self.comm.all_reduce_sum(&Tensor::cat(&flat, 0)?)? / world as f64)?;
        let mut at = 0;
        for var in vars {
            let n = var.elem_count();
            let g = mean
                .narrow(0, at, n)?
                .reshape(var.shape())?
                .to_dtype(var.dtype())?;
            grads.insert(var, g);
            at += n;
        }
        Ok(())
    }
}
