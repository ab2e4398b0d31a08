//! A MoCo training step over any encoder: forward, loss, backward, optimizer step, momentum
//! update, enqueue, in that order and each visible.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::rc::Rc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::config::{LossKind, MocoConfig};
use crate::dist::{Collective, SingleProcess};
use crate::init::seeded_var_builder;
use crate::loss::{
    in_batch_info_nce_gathered, info_nce, l2_normalize, symmetric_info_nce, ContrastiveOutput,
};
use crate::momentum::{set_checked, MomentumEncoder};
use crate::optim::Optimizer;
use crate::queue::Queue;
use crate::shuffle::BatchShuffle;
use crate::{io, Error, Result};

/// What a forward pass of both encoders produced: the loss and the keys to enqueue.
#[derive(Debug, Clone)]
pub struct Forward {
    /// Loss, logits and accuracies.
    pub output: ContrastiveOutput,
    /// The L2-normalised keys (detached) that go into the queue after the update: N x C, or
    /// 2N x C (`cat([k1, k2])`) for the symmetric loss.
    pub keys: Tensor,
}

/// Scalars logged after each step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutput {
    /// The step's loss.
    pub loss: f32,
    /// (K+1)-way (or N-way for in-batch) top-1 accuracy of the positive, percent.
    pub acc1: f32,
    /// Top-5 accuracy, percent.
    pub acc5: f32,
    /// Learning rate used.
    pub lr: f64,
    /// Key-encoder momentum used.
    pub momentum: f64,
}

/// Query encoder, momentum key encoder, queue and optimizer: MoCo around any encoder `E`
/// (any `candle_nn::ModuleT` mapping a batch of images to N x C embeddings; the projection head is
/// part of the encoder).
///
/// Both encoders come from the same constructor: the query one over a fresh `VarMap`, the key one
/// over [`MomentumEncoder::key_var_builder`], so the key starts equal to the query and the two
/// are paired by variable name.
pub struct Moco<E: ModuleT> {
    config: MocoConfig,
    device: Device,
    query: E,
    key: E,
    predictor: Option<Box<dyn ModuleT>>,
    encoders: MomentumEncoder,
    queue: Option<Queue>,
    optimizer: Optimizer,
    step: u64,
    comm: Rc<dyn Collective>,
}

impl<E: ModuleT> std::fmt::Debug for Moco<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Moco")
            .field("config", &self.config)
            .field("step", &self.step)
            .finish()
    }
}

impl<E: ModuleT> Moco<E> {
    /// Builds both encoders with `build`, the queue and the optimizer, after validating `config`.
    /// Initial weights are drawn from `config.seed` (see [`crate::init`]): same seed, same run.
    pub fn new(
        config: MocoConfig,
        device: &Device,
        build: impl Fn(VarBuilder) -> candle_core::Result<E>,
    ) -> Result<Self> {
        Self::from_varmap(config, device, VarMap::new(), build)
    }

    /// Like [`new`](Self::new), with the query variables in `vars`: variables already there keep
    /// their values (pretrained or imported weights), missing ones are drawn from `config.seed`.
    pub fn from_varmap(
        config: MocoConfig,
        device: &Device,
        vars: VarMap,
        build: impl Fn(VarBuilder) -> candle_core::Result<E>,
    ) -> Result<Self> {
        config.validate()?;
        let query = build(seeded_var_builder(&vars, config.seed, DType::F32, device))?;
        let encoders = MomentumEncoder::new(&vars);
        let key = build(encoders.key_var_builder(DType::F32, device))?;
        let queue = match config.loss {
            LossKind::InBatch => None,
            _ => {
                let mut rng = StdRng::seed_from_u64(config.seed ^ 0x0051_7565_7565); // "Queue"
                Some(Queue::new(config.dim, config.queue_size, &mut rng, device)?)
            }
        };
        let optimizer = Optimizer::from_config(encoders.query_parameters(), &config)?;
        Ok(Self {
            config,
            device: device.clone(),
            query,
            key,
            predictor: None,
            encoders,
            queue,
            optimizer,
            step: 0,
            comm: Rc::new(SingleProcess),
        })
    }

    /// Adds a predictor after the query encoder only (MoCo v3, BYOL), its variables under
    /// `predictor.` in the query `VarMap` and given to the optimizer.
    pub fn with_predictor<P: ModuleT + 'static>(
        mut self,
        build: impl FnOnce(VarBuilder) -> candle_core::Result<P>,
    ) -> Result<Self> {
        let vb = seeded_var_builder(
            self.encoders.query_varmap(),
            self.config.seed,
            DType::F32,
            &self.device,
        );
        self.predictor = Some(Box::new(build(vb.pp("predictor"))?));
        self.optimizer = self.optimizer.rebuild(self.encoders.query_parameters())?;
        Ok(self)
    }

    /// Makes this model one rank of a data-parallel run (see [`crate::dist`]), as the official
    /// code's `DistributedDataParallel`: every rank takes its share of each global batch; the
    /// query encoder's gradients are averaged over the ranks before each update; shuffle-BN
    /// shuffles the keys' images across all ranks (gather, one permutation, each rank encodes
    /// its slice, gather, unshuffle); the keys of all ranks are enqueued (every rank keeps the
    /// same queue), and MoCo v3's in-batch loss takes all ranks' keys as negatives.
    /// BatchNorm statistics are per rank, as in the official MoCo v1/v2, unless
    /// [`MocoConfig::sync_bn`] (MoCo v3's SyncBN: the layers of `moco_models` then normalise
    /// with the global batch's statistics, see [`crate::sync`]; `bn_splits` must then be 1).
    ///
    /// Rank 0's weights, key encoder and queue are broadcast to the others here, so every rank
    /// starts from the same state (a resumed run: load the checkpoint first, on every rank).
    pub fn with_collective(mut self, comm: Box<dyn Collective>) -> Result<Self> {
        if self.config.sync_bn && self.config.bn_splits > 1 && comm.world_size() > 1 {
            return Err(Error::config(
                "bn_splits",
                format!(
                    "{} splits emulate several devices' BatchNorm on one; with sync_bn a data-parallel run normalises over all ranks instead: use one or the other",
                    self.config.bn_splits
                ),
            ));
        }
        if comm.backend() != "single" {
            // By name: every rank must broadcast the variables in the same order.
            let vars: BTreeMap<String, candle_core::Var> = self
                .encoders
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
            let mut key = self.encoders.key_tensors();
            for t in key.values_mut() {
                *t = comm.broadcast(t, 0)?;
            }
            self.encoders.load_key(&key)?;
            if let Some(q) = &self.queue {
                let keys = comm.broadcast(q.keys(), 0)?;
                let labels = q.labels().cloned();
                self.queue = Some(Queue::from_parts(keys, q.ptr(), labels)?);
            }
        }
        self.comm = Rc::from(comm);
        Ok(self)
    }

    /// The process group (world size 1 unless [`with_collective`](Self::with_collective)).
    pub fn collective(&self) -> &dyn Collective {
        &*self.comm
    }

    /// Whether the steps go through a process group's collectives: any group but
    /// [`SingleProcess`], a group of one process included (whose collectives must then change
    /// nothing: how the NCCL path is checked on one GPU).
    fn distributed(&self) -> bool {
        self.comm.backend() != "single"
    }

    /// Checks that every rank holds the same query weights (compares per-parameter sums
    /// across ranks); an error names the first parameter that differs. A no-op on one process.
    pub fn check_in_sync(&self) -> Result<()> {
        let world = self.comm.world_size();
        if !self.distributed() {
            return Ok(());
        }
        let params = self.encoders.query_parameters();
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
                        "ranks 0 and {r} hold different values of `{}` after step {} (sums {} and {})",
                        params[i].0, self.step, all[0][i], row[i]
                    ),
                });
            }
        }
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &MocoConfig {
        &self.config
    }
    /// The query encoder (the one kept after pretraining).
    pub fn query(&self) -> &E {
        &self.query
    }
    /// The momentum key encoder.
    pub fn key(&self) -> &E {
        &self.key
    }
    /// The paired variables of both encoders.
    pub fn encoders(&self) -> &MomentumEncoder {
        &self.encoders
    }
    /// The queue (absent for the in-batch loss).
    pub fn queue(&self) -> Option<&Queue> {
        self.queue.as_ref()
    }
    /// The optimizer.
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }
    /// Completed training steps.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The learning rate and momentum the schedules give at iteration `iter` of `epoch`.
    pub fn schedule(&self, epoch: usize, iter: usize, iters_per_epoch: usize) -> (f64, f64) {
        let c = &self.config;
        let lr = c
            .lr_schedule
            .lr(c.effective_lr(), epoch, iter, iters_per_epoch, c.epochs);
        let m = c
            .momentum_schedule
            .momentum(c.momentum, epoch, iter, iters_per_epoch, c.epochs);
        (lr, m)
    }

    /// q = normalize(predictor(f_q(x))): N x C, tracked for backprop.
    ///
    /// With [`MocoConfig::sync_bn`] in a data-parallel run, a backward pass through `q` must
    /// run inside [`crate::sync::scope`] with this model's group (as [`train_step`](Self::train_step) does).
    pub fn encode_query(&self, x: &Tensor) -> Result<Tensor> {
        self.synced(|| {
            let mut q = self.query.forward_t(x, true)?;
            if let Some(p) = &self.predictor {
                q = p.forward_t(&q, true)?;
            }
            l2_normalize(&q, 1)
        })
    }

    /// Runs `f` with this model's process group installed for synchronised BatchNorm when the
    /// configuration asks for it ([`MocoConfig::sync_bn`]).
    fn synced<T>(&self, f: impl FnOnce() -> T) -> T {
        if self.config.sync_bn && self.distributed() {
            crate::sync::scope(self.comm.clone(), f)
        } else {
            f()
        }
    }

    /// k = normalize(f_k(x)): N x C, detached. With shuffle-BN the batch is permuted before the
    /// key encoder and restored after it. `shuffle_seed` picks the permutation. In a
    /// data-parallel run the permutation runs over the images of all ranks (the same one on
    /// every rank): each rank encodes its slice of the shuffled global batch.
    pub fn encode_key(&self, x: &Tensor, shuffle_seed: u64) -> Result<Tensor> {
        self.synced(|| self.encode_key_inner(x, shuffle_seed))
    }

    fn encode_key_inner(&self, x: &Tensor, shuffle_seed: u64) -> Result<Tensor> {
        let (world, rank) = (self.comm.world_size(), self.comm.rank());
        let k = if self.config.shuffle_bn && self.distributed() {
            let n = x.dim(0)?;
            let all = self.comm.all_gather(x)?; // world*N x ...
            let mut rng = StdRng::seed_from_u64(shuffle_seed);
            let perm = BatchShuffle::new(world * n, &mut rng, x.device())?;
            let mine = perm.shuffle(&all)?.narrow(0, rank * n, n)?;
            let k = l2_normalize(&self.key.forward_t(&mine, true)?, 1)?.detach();
            let k_all = self.comm.all_gather(&k)?; // in shuffled order
            perm.unshuffle(&k_all)?.narrow(0, rank * n, n)?
        } else if self.config.shuffle_bn {
            let mut rng = StdRng::seed_from_u64(shuffle_seed);
            let perm = BatchShuffle::new(x.dim(0)?, &mut rng, x.device())?;
            // x: N x ... shuffled; k: N x C in shuffled order, then restored.
            let k = self.key.forward_t(&perm.shuffle(x)?, true)?;
            perm.unshuffle(&l2_normalize(&k, 1)?)?
        } else {
            l2_normalize(&self.key.forward_t(x, true)?, 1)?
        };
        Ok(k.detach())
    }

    fn shuffle_seed(&self, view: u64) -> u64 {
        // Derived from (seed, step, view): a resumed run draws the same permutations.
        self.config
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(self.step.wrapping_mul(0xBF58_476D_1CE4_E5B9))
            .wrapping_add(view)
    }

    /// Forward pass of both encoders and the configured loss on views `x1` (query) and `x2` (key).
    /// Changes no state except BatchNorm running statistics. (With [`MocoConfig::sync_bn`] in a
    /// data-parallel run, the backward pass must run inside [`crate::sync::scope`].)
    pub fn forward_loss(&self, x1: &Tensor, x2: &Tensor) -> Result<Forward> {
        self.synced(|| self.forward_loss_inner(x1, x2))
    }

    fn forward_loss_inner(&self, x1: &Tensor, x2: &Tensor) -> Result<Forward> {
        let t = self.config.temperature;
        match self.config.loss {
            LossKind::Queue => {
                let queue = self.queue_ref()?;
                let q = self.encode_query(x1)?; // N x C
                let k = self.encode_key(x2, self.shuffle_seed(2))?; // N x C
                let output = info_nce(&q, &k, queue.keys(), t)?;
                let keys = self.comm.all_gather(&k)?;
                Ok(Forward { output, keys })
            }
            LossKind::SymmetricQueue => {
                let queue = self.queue_ref()?;
                let q1 = self.encode_query(x1)?;
                let q2 = self.encode_query(x2)?;
                let k1 = self.encode_key(x1, self.shuffle_seed(1))?;
                let k2 = self.encode_key(x2, self.shuffle_seed(2))?;
                let output = symmetric_info_nce(&q1, &k2, &q2, &k1, queue.keys(), t)?;
                // keys: 2N x C (all ranks' k1, then all ranks' k2), enqueued after both losses.
                let keys =
                    Tensor::cat(&[self.comm.all_gather(&k1)?, self.comm.all_gather(&k2)?], 0)?;
                Ok(Forward { output, keys })
            }
            LossKind::InBatch => {
                let q1 = self.encode_query(x1)?;
                let q2 = self.encode_query(x2)?;
                let k1 = self.encode_key(x1, self.shuffle_seed(1))?;
                let k2 = self.encode_key(x2, self.shuffle_seed(2))?;
                // Negatives: the keys of every rank; this rank's positives start at rank * N.
                let offset = self.comm.rank() * q1.dim(0)?;
                let (k1, k2) = (self.comm.all_gather(&k1)?, self.comm.all_gather(&k2)?);
                let a = in_batch_info_nce_gathered(&q1, &k2, offset, t, 2.0 * t)?;
                let b = in_batch_info_nce_gathered(&q2, &k1, offset, t, 2.0 * t)?;
                let output = a.plus(b)?;
                Ok(Forward { output, keys: k2 })
            }
        }
    }

    fn queue_ref(&self) -> Result<&Queue> {
        self.queue
            .as_ref()
            .ok_or_else(|| Error::config("loss", "this loss needs a queue, but the model has none"))
    }

    /// One training step at the given learning rate and momentum:
    /// forward, loss, backward, SGD step on the query encoder, momentum update of the key
    /// encoder, enqueue of the new keys.
    pub fn train_step(
        &mut self,
        x1: &Tensor,
        x2: &Tensor,
        lr: f64,
        momentum: f64,
    ) -> Result<StepOutput> {
        // 1-3. forward, loss, backward (gradients averaged over the ranks); SyncBN's
        // collectives run in both passes.
        let (fwd, (loss, acc1, acc5), grads) = self.synced(|| -> Result<_> {
            let fwd = self.forward_loss_inner(x1, x2)?;
            let metrics = self.mean_over_ranks(&fwd.output)?;
            if !metrics.0.is_finite() {
                return Err(Error::NonFiniteLoss {
                    step: self.step,
                    value: metrics.0,
                });
            }
            let mut grads = fwd.output.loss.backward()?;
            self.average_gradients(&mut grads)?;
            Ok((fwd, metrics, grads))
        })?;
        // 4-6. SGD step, momentum update, enqueue
        self.update(&grads, &fwd.keys, lr, momentum)?;
        self.step += 1;
        Ok(StepOutput {
            loss,
            acc1,
            acc5,
            lr,
            momentum,
        })
    }

    /// Loss and accuracies averaged over the ranks (the same on every rank, so that a
    /// non-finite loss stops every rank at the same step).
    fn mean_over_ranks(&self, o: &ContrastiveOutput) -> Result<(f32, f32, f32)> {
        let loss = o.loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let world = self.comm.world_size();
        if !self.distributed() {
            return Ok((loss, o.acc1, o.acc5));
        }
        let v = Tensor::new(&[loss, o.acc1, o.acc5], &self.device)?;
        let v = (self.comm.all_reduce_sum(&v)? / world as f64)?.to_vec1::<f32>()?;
        Ok((v[0], v[1], v[2]))
    }

    /// Replaces every query gradient by its mean over the ranks: one all-reduce over all
    /// gradients flattened into one buffer (DDP's bucket, here a single one).
    pub fn average_gradients(&self, grads: &mut GradStore) -> Result<()> {
        let world = self.comm.world_size();
        if !self.distributed() {
            return Ok(());
        }
        let mut flat = vec![];
        let mut vars = vec![];
        for (_, var) in self.optimizer.params() {
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

    /// The second half of a step, after the backward pass: SGD step on the query encoder's
    /// parameters at `lr`, momentum update of the key encoder with `momentum`, enqueue of `keys`.
    /// In a data-parallel run `grads` must be averaged first ([`average_gradients`](Self::average_gradients)).
    /// Does not advance the step counter ([`train_step`](Self::train_step) does).
    pub fn update(
        &mut self,
        grads: &GradStore,
        keys: &Tensor,
        lr: f64,
        momentum: f64,
    ) -> Result<()> {
        // 4. optimizer step (query parameters only)
        self.optimizer.set_lr(lr);
        self.optimizer.step_grads(grads)?;
        // 5. momentum update of the key encoder
        self.encoders.update(momentum)?;
        // 6. enqueue the keys of this step
        if let Some(queue) = &mut self.queue {
            queue.enqueue(keys)?;
        }
        Ok(())
    }

    /// Replaces the queue (e.g. with an imported one); its C must match the configured dim.
    pub fn set_queue(&mut self, queue: Queue) -> Result<()> {
        if self.queue.is_none() {
            return Err(Error::config("loss", "the in-batch loss uses no queue"));
        }
        if queue.dim() != self.config.dim {
            return Err(Error::BadTensor {
                what: "queue".into(),
                expected: format!("{} x K", self.config.dim),
                got: format!("{} x {}", queue.dim(), queue.size()),
            });
        }
        self.queue = Some(queue);
        Ok(())
    }

    /// Every piece of training state as named tensors: `encoder_q.*` and `encoder_k.*` (the
    /// official checkpoint's names, without `module.`), `queue`, `queue_ptr`, and the
    /// optimizer's state (`optimizer.momentum_buffer.*` for SGD and LARS;
    /// `optimizer.exp_avg.*`, `optimizer.exp_avg_sq.*`, `optimizer.step.*` for AdamW).
    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (n, t) in self.encoders.query_tensors() {
            out.insert(format!("encoder_q.{n}"), t.copy()?);
        }
        for (n, t) in self.encoders.key_tensors() {
            out.insert(format!("encoder_k.{n}"), t.copy()?);
        }
        if let Some(q) = &self.queue {
            out.extend(q.tensors("")?);
        }
        out.extend(self.optimizer.state_tensors("optimizer.")?);
        Ok(out)
    }

    /// An error naming the first query parameter holding a NaN or an infinity (a run that
    /// diverged). Checked before every checkpoint, so a saved checkpoint is always finite.
    pub fn check_finite(&self) -> Result<()> {
        for (name, var) in self.encoders.query_parameters() {
            let s = var
                .as_detached_tensor()
                .sum_all()?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?;
            if !s.is_finite() {
                return Err(Error::NonFiniteWeights {
                    step: self.step,
                    name,
                });
            }
        }
        Ok(())
    }

    /// Writes [`state_tensors`](Self::state_tensors) atomically to `path`, with the step counter
    /// and resolved configuration in the metadata, plus `extra` metadata.
    /// Refuses (see [`check_finite`](Self::check_finite)) when the weights are not finite.
    pub fn save_checkpoint(&self, path: &Path, extra: HashMap<String, String>) -> Result<()> {
        self.check_finite()?;
        let mut meta = extra;
        meta.insert("step".into(), self.step.to_string());
        meta.insert(
            "moco_config".into(),
            serde_json::to_string(&self.config).map_err(|e| Error::file(path, e.to_string()))?,
        );
        io::save_atomic(path, &self.state_tensors()?, Some(meta))
    }

    /// Restores the state saved by [`save_checkpoint`](Self::save_checkpoint) into this model
    /// (built with the same architecture). Returns the file's metadata.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<HashMap<String, String>> {
        let mut file = io::load(path, &self.device)?;
        let at = |e: Error| Error::file(path, e.to_string());
        let mut take_prefix = |prefix: &str| -> BTreeMap<String, Tensor> {
            let keys: Vec<String> = file
                .tensors
                .keys()
                .filter(|k| k.starts_with(prefix))
                .cloned()
                .collect();
            keys.into_iter()
                .filter_map(|k| {
                    file.tensors
                        .remove(&k)
                        .map(|t| (k[prefix.len()..].to_string(), t))
                })
                .collect()
        };
        let q = take_prefix("encoder_q.");
        let k = take_prefix("encoder_k.");
        let opt = take_prefix("optimizer.");
        for (name, var) in self
            .encoders
            .query_varmap()
            .data()
            .lock()
            .map_err(|_| Error::config("checkpoint", "poisoned lock"))?
            .iter()
        {
            let t = q.get(name).ok_or_else(|| {
                Error::file(
                    path,
                    format!("no tensor named `encoder_q.{name}` in this file"),
                )
            })?;
            set_checked(name, var, t).map_err(at)?;
        }
        self.encoders.load_key(&k).map_err(at)?;
        self.optimizer.load_state(&opt).map_err(at)?;
        if self.queue.is_some() {
            self.queue = Some(Queue::from_file(&mut file, "")?);
        }
        self.step = file
            .meta("step")?
            .parse()
            .map_err(|_| Error::file(path, "metadata `step` is not a number"))?;
        Ok(file.metadata)
    }
}
