//! A MoCo training step over any encoder: forward, loss, backward, optimizer step, momentum
//! update, enqueue, in that order and each visible: the analogue of the official `builder.py`.
//! Its data-parallel side is in [`ddp`], the checkpoint format in [`checkpoint`].

mod checkpoint;
mod ddp;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::config::{LossKind, MocoConfig};
use crate::dist::Collective;
use crate::init::seeded_var_builder;
use crate::loss::{
    in_batch_info_nce_gathered, info_nce, l2_normalize, symmetric_info_nce, ContrastiveOutput,
};
use crate::momentum::MomentumEncoder;
use crate::optim::Optimizer;
use crate::profile;
use crate::queue::Queue;
use crate::shuffle::BatchShuffle;
use crate::{Error, Kernels, Result};
use ddp::DataParallel;

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
///
/// The encoder's output is L2-normalised here ([`encode_query`](Self::encode_query),
/// [`encode_key`](Self::encode_key)), as in the official code: the encoder itself should not
/// normalise. Every tensor of the model (variables, queue) has the dtype given at construction
/// (float32 by [`new`](Self::new); float64 for checking against a reference, with
/// [`new_with_dtype`](Self::new_with_dtype)).
///
/// One difference from the official code in what a checkpoint holds: `builder.py` updates the
/// key encoder at the start of a step's forward pass, moco-rs after the optimizer step (step 5
/// of [`train_step`](Self::train_step)). The forward passes see the same key encoder; a
/// checkpoint written after step t holds a key encoder one momentum update ahead of the
/// official checkpoint of step t (the update that the official code makes at the start of
/// step t + 1).
pub struct Moco<E: ModuleT> {
    config: MocoConfig,
    device: Device,
    dtype: DType,
    kernels: Kernels,
    query: E,
    key: E,
    predictor: Option<Box<dyn ModuleT>>,
    encoders: MomentumEncoder,
    queue: Option<Queue>,
    optimizer: Optimizer,
    step: u64,
    ddp: DataParallel,
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
    /// Builds both encoders with `build`, the queue and the optimizer, after validating `config`,
    /// in float32. Initial weights are drawn from `config.seed` (see [`crate::init`]): same
    /// seed, same run. [`load_weights`](Self::load_weights) then replaces them with pretrained
    /// ones.
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
        Self::new_with_dtype(config, device, DType::F32, vars, build)
    }

    /// The general constructor: as [`from_varmap`](Self::from_varmap), with every variable and
    /// the queue in `dtype` (a float type; float64 to check an encoder against a reference).
    /// A variable already in `vars` with another dtype is an error naming it.
    pub fn new_with_dtype(
        config: MocoConfig,
        device: &Device,
        dtype: DType,
        vars: VarMap,
        build: impl Fn(VarBuilder) -> candle_core::Result<E>,
    ) -> Result<Self> {
        config.validate()?;
        if !dtype.is_float() {
            return Err(Error::config(
                "dtype",
                format!("{dtype:?} is not a float type: use F32, F64, BF16 or F16"),
            ));
        }
        let query = build(seeded_var_builder(&vars, config.seed, dtype, device))?;
        let encoders = MomentumEncoder::new(&vars);
        if let Some((name, t)) = encoders
            .query_tensors()
            .into_iter()
            .find(|(_, t)| t.dtype() != dtype)
        {
            return Err(Error::config(
                "dtype",
                format!(
                    "variable `{name}` is {:?} but the model is built in {dtype:?}: convert the weights first, or build the model in {:?}",
                    t.dtype(),
                    t.dtype()
                ),
            ));
        }
        let key = build(encoders.key_var_builder(dtype, device))?;
        let queue = match config.loss {
            LossKind::InBatch => None,
            _ => {
                let mut rng = StdRng::seed_from_u64(config.seed ^ 0x0051_7565_7565); // "Queue"
                Some(Queue::new_with_dtype(
                    config.dim,
                    config.queue_size,
                    dtype,
                    &mut rng,
                    device,
                )?)
            }
        };
        let optimizer = config.optimizer(encoders.query_parameters())?;
        Ok(Self {
            config,
            device: device.clone(),
            dtype,
            kernels: Kernels::Fused,
            query,
            key,
            predictor: None,
            encoders,
            queue,
            optimizer,
            step: 0,
            ddp: DataParallel::single(),
        })
    }

    /// The losses on `kernels` ([`Kernels::Fused`] by default: the fused cross-entropy on
    /// float32 CPU tensors; [`Kernels::Generic`]: candle's ops, as on a GPU).
    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        self.kernels = kernels;
        self
    }

    /// Copies pretrained or imported weights into the query encoder (by variable name, shapes
    /// checked), and the key encoder from it, so that both start from them; the optimizer's
    /// state is left as it is (fresh, before the first step). A tensor that names no variable is
    /// an error naming it; the variables `tensors` leaves out keep their values and are
    /// returned by name.
    pub fn load_weights(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<Vec<String>> {
        let converted = tensors
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.to_dtype(self.dtype)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        self.encoders.load_query(&converted)
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
            self.dtype,
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
    /// with the global batch's statistics, see [`crate::dist::sync_bn`]; `bn_splits` must then be 1).
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
        let ddp = DataParallel::new(comm, self.config.sync_bn);
        if ddp.is_distributed() {
            if let Some(queue) = ddp.broadcast_start(&self.encoders, self.queue.as_ref())? {
                self.queue = Some(queue);
            }
        }
        self.ddp = ddp;
        Ok(self)
    }

    /// The process group (world size 1 unless [`with_collective`](Self::with_collective)).
    pub fn collective(&self) -> &dyn Collective {
        self.ddp.comm()
    }

    /// Checks that every rank holds the same query weights (compares per-parameter sums
    /// across ranks); an error names the first parameter that differs. A no-op on one process.
    pub fn check_in_sync(&self) -> Result<()> {
        self.ddp
            .check_in_sync(&self.encoders.query_parameters(), self.step)
    }

    /// The configuration.
    pub fn config(&self) -> &MocoConfig {
        &self.config
    }
    /// The dtype of every variable and of the queue.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// What the losses run on ([`with_kernels`](Self::with_kernels)).
    pub fn kernels(&self) -> Kernels {
        self.kernels
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
    /// run inside [`crate::dist::sync_bn::scope`] with this model's group (as [`train_step`](Self::train_step) does).
    pub fn encode_query(&self, x: &Tensor) -> Result<Tensor> {
        profile::timed("query encoder forward (rest)", &self.device, || {
            self.synced(|| {
                let mut q = self.query.forward_t(x, true)?;
                if let Some(p) = &self.predictor {
                    q = p.forward_t(&q, true)?;
                }
                l2_normalize(&q, 1)
            })
        })
    }

    /// Runs `f` with this model's process group installed for synchronised BatchNorm when the
    /// configuration asks for it ([`MocoConfig::sync_bn`]).
    fn synced<T>(&self, f: impl FnOnce() -> T) -> T {
        self.ddp.synced(f)
    }

    /// k = normalize(f_k(x)): N x C, detached. With shuffle-BN the batch is permuted before the
    /// key encoder and restored after it. `shuffle_seed` picks the permutation. In a
    /// data-parallel run the permutation runs over the images of all ranks (the same one on
    /// every rank): each rank encodes its slice of the shuffled global batch.
    pub fn encode_key(&self, x: &Tensor, shuffle_seed: u64) -> Result<Tensor> {
        profile::timed("key encoder forward (rest)", &self.device, || {
            self.synced(|| self.encode_key_inner(x, shuffle_seed))
        })
    }

    fn encode_key_inner(&self, x: &Tensor, shuffle_seed: u64) -> Result<Tensor> {
        let comm = self.ddp.comm();
        let (world, rank) = (comm.world_size(), comm.rank());
        let k = if self.config.shuffle_bn && self.ddp.is_distributed() {
            let n = x.dim(0)?;
            let all = comm.all_gather(x)?; // world*N x ...
            let mut rng = StdRng::seed_from_u64(shuffle_seed);
            let perm = BatchShuffle::new(world * n, &mut rng, x.device())?;
            let mine = perm.shuffle(&all)?.narrow(0, rank * n, n)?;
            let k = l2_normalize(&self.key.forward_t(&mine, true)?, 1)?.detach();
            let k_all = comm.all_gather(&k)?; // in shuffled order
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
    /// data-parallel run, the backward pass must run inside [`crate::dist::sync_bn::scope`].)
    pub fn forward_loss(&self, x1: &Tensor, x2: &Tensor) -> Result<Forward> {
        self.synced(|| self.forward_loss_inner(x1, x2))
    }

    fn forward_loss_inner(&self, x1: &Tensor, x2: &Tensor) -> Result<Forward> {
        let (t, kernels) = (self.config.temperature, self.kernels);
        let comm = self.ddp.comm();
        match self.config.loss {
            LossKind::Queue => {
                let queue = self.queue_ref()?;
                let q = self.encode_query(x1)?; // N x C
                let k = self.encode_key(x2, self.shuffle_seed(2))?; // N x C
                let output = info_nce(&q, &k, queue.keys(), t, kernels)?;
                let keys = comm.all_gather(&k)?;
                Ok(Forward { output, keys })
            }
            LossKind::SymmetricQueue => {
                let queue = self.queue_ref()?;
                let q1 = self.encode_query(x1)?;
                let q2 = self.encode_query(x2)?;
                let k1 = self.encode_key(x1, self.shuffle_seed(1))?;
                let k2 = self.encode_key(x2, self.shuffle_seed(2))?;
                let output = symmetric_info_nce(&q1, &k2, &q2, &k1, queue.keys(), t, kernels)?;
                // keys: 2N x C (all ranks' k1, then all ranks' k2), enqueued after both losses.
                let keys = Tensor::cat(&[comm.all_gather(&k1)?, comm.all_gather(&k2)?], 0)?;
                Ok(Forward { output, keys })
            }
            LossKind::InBatch => {
                let q1 = self.encode_query(x1)?;
                let q2 = self.encode_query(x2)?;
                let k1 = self.encode_key(x1, self.shuffle_seed(1))?;
                let k2 = self.encode_key(x2, self.shuffle_seed(2))?;
                // Negatives: the keys of every rank; this rank's positives start at rank * N.
                let offset = comm.rank() * q1.dim(0)?;
                let (k1, k2) = (comm.all_gather(&k1)?, comm.all_gather(&k2)?);
                let a = in_batch_info_nce_gathered(&q1, &k2, offset, t, 2.0 * t, kernels)?;
                let b = in_batch_info_nce_gathered(&q2, &k1, offset, t, 2.0 * t, kernels)?;
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
        // collectives run in both passes. Nothing is read back from the device before the
        // backward pass is queued: the loss and the accuracies are read after it (waiting for
        // the backward to finish, while it runs), and before the update, so that a non-finite
        // loss leaves the model as it was.
        let dev = &self.device;
        let (fwd, grads) = self.synced(|| -> Result<_> {
            let fwd = profile::timed("loss", dev, || self.forward_loss_inner(x1, x2))?;
            let mut grads = profile::timed("backward (rest)", dev, || fwd.output.loss.backward())?;
            profile::timed("gradient all-reduce", dev, || {
                self.average_gradients(&mut grads)
            })?;
            Ok((fwd, grads))
        })?;
        let o = &fwd.output;
        let (loss, acc1, acc5) = profile::timed("loss and accuracy read-back", dev, || {
            let loss = o.loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            let (acc1, acc5) = o.accuracy()?;
            self.ddp.mean_over_ranks(loss, acc1, acc5, dev)
        })?;
        if !loss.is_finite() {
            return Err(Error::NonFiniteLoss {
                step: self.step,
                value: loss,
            });
        }
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

    /// Replaces every query gradient by its mean over the ranks: one all-reduce over all
    /// gradients flattened into one buffer (DDP's bucket, here a single one).
    pub fn average_gradients(&self, grads: &mut GradStore) -> Result<()> {
        self.ddp.average_gradients(grads, self.optimizer.params())
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
        let dev = &self.device;
        let optimizer = &mut self.optimizer;
        profile::timed("optimizer", dev, || optimizer.step_grads(grads))?;
        // 5. momentum update of the key encoder
        let encoders = &self.encoders;
        profile::timed("momentum update", dev, || encoders.update(momentum))?;
        // 6. enqueue the keys of this step
        if let Some(queue) = &mut self.queue {
            profile::timed("enqueue", dev, || queue.enqueue(keys))?;
        }
        Ok(())
    }

    /// Replaces the queue (e.g. with an imported one); its C must match the configured dim
    /// and its dtype the model's.
    pub fn set_queue(&mut self, queue: Queue) -> Result<()> {
        if self.queue.is_none() {
            return Err(Error::config("loss", "the in-batch loss uses no queue"));
        }
        if queue.dtype() != self.dtype {
            return Err(Error::config(
                "queue",
                format!(
                    "the queue is {:?} but the model is {:?}: convert it with Queue::to_dtype",
                    queue.dtype(),
                    self.dtype
                ),
            ));
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
    /// `optimizer.exp_avg.*`, `optimizer.exp_avg_sq.*`, `optimizer.step.*` for AdamW). Copies:
    /// they keep their values when the model trains on.
    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        checkpoint::state_tensors(&self.encoders, self.queue.as_ref(), &self.optimizer)
    }

    /// An error naming the first tensor of the training state ([`state_tensors`](Self::state_tensors):
    /// both encoders with their BatchNorm running statistics, the queue, the optimizer's state)
    /// holding a NaN or an infinity (a run that diverged). Checked before every checkpoint, so
    /// a saved checkpoint is always finite.
    pub fn check_finite(&self) -> Result<()> {
        checkpoint::check_finite(&self.state_tensors()?, self.step)
    }

    /// Writes [`state_tensors`](Self::state_tensors) atomically to `path`, with the step counter
    /// and resolved configuration in the metadata, plus `extra` metadata.
    /// Refuses, writing nothing (see [`check_finite`](Self::check_finite)), when any of them is
    /// not finite.
    pub fn save_checkpoint(&self, path: &Path, extra: HashMap<String, String>) -> Result<()> {
        let tensors = self.state_tensors()?;
        checkpoint::check_finite(&tensors, self.step)?;
        checkpoint::save(path, &tensors, self.step, &self.config, extra)
    }

    /// Restores the state saved by [`save_checkpoint`](Self::save_checkpoint) into this model
    /// (built with the same architecture). Returns the file's metadata.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<HashMap<String, String>> {
        let state = checkpoint::State {
            encoders: &self.encoders,
            optimizer: &mut self.optimizer,
            queue: &mut self.queue,
            dtype: self.dtype,
        };
        let (step, metadata) = checkpoint::restore(path, &self.device, state)?;
        self.step = step;
        Ok(metadata)
    }
}
