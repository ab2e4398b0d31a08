//! [`Pretrainer`]: a MoCo pretraining run, resumable, on one process or as one rank of a
//! data-parallel run: the epoch loop over the data, the MoCo step, checkpoints and
//! `metrics.jsonl` in its [`RunDir`], and [`Hook`]s for what else happens after a step or an
//! epoch (the kNN monitor is one, [`crate::KnnMonitor`]; the `moco` binary adds its progress
//! bar).
//!
//! ```no_run
//! use moco_cli::{KnnMonitor, Pretrainer, RunConfig, RunDir};
//!
//! # fn main() -> moco_cli::Result<()> {
//! let device = candle_core::Device::Cpu;
//! let config = RunConfig::default(); // the embedded Fashion-MNIST subset, 3 epochs
//! let mut run = Pretrainer::new(
//!     config,
//!     RunDir::new("runs/example"),
//!     false,
//!     &device,
//!     moco_models::Settings::default(),
//!     Box::new(moco_core::SingleProcess),
//! )?;
//! let mut knn = KnnMonitor::new(&run);
//! let summary = run.run(&mut [&mut knn])?;
//! println!("step {}: kNN top-1 {:?}", summary.step, knn.last());
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use moco_core::{CollapseWatch, Collective, Moco, StepOutput};
use moco_data::augment::TwoCrop;
use moco_data::datasets::{Dataset, Subset};
use moco_data::image_folder::BadFiles;
use moco_data::loader::{Loader, LoaderConfig, Views};
use moco_data::named::{self, NamedDataset};
use moco_models::{BackboneConfig, Encoder, EncoderSpec, Settings};
use serde_json::Value;

use crate::error::{Context, Error, Result};
use crate::memory_check::MemoryNeed;
use crate::run_config::{augmentation_name, RunConfig};
use crate::run_dir::{MetricsLog, RunDir};
use crate::run_lock::RunLock;

/// Where a run stands, as the hooks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The current epoch (0-based).
    pub epoch: usize,
    /// Steps done.
    pub step: u64,
    /// The step the run stops at (the epochs' or `max_steps`).
    pub budget: u64,
    /// Steps per epoch.
    pub steps_per_epoch: usize,
}

/// Something that happens after a step or an epoch of a [`Pretrainer`]'s loop. Every method
/// has a default that does nothing.
pub trait Hook {
    /// After every training step, with its loss, accuracies, learning rate and momentum.
    fn on_step(&mut self, _at: &Progress, _out: &StepOutput) -> Result<()> {
        Ok(())
    }

    /// After each finished epoch and its checkpoint; `last`: the run's last epoch (or the step
    /// budget reached). A hook that evaluates the model returns the record to log.
    fn on_epoch_end(
        &mut self,
        _at: &Progress,
        _last: bool,
        _moco: &Moco<Encoder>,
    ) -> Result<Option<Value>> {
        Ok(None)
    }

    /// Once the loop is over (on the first rank): a last record to log, such as a final
    /// evaluation the last epoch did not make. Logged to `metrics.jsonl` only.
    fn on_finish(&mut self, _at: &Progress, _moco: &Moco<Encoder>) -> Result<Option<Value>> {
        Ok(None)
    }

    /// Every record the loop logs: a step line every `log_every` steps (epoch, step, loss,
    /// acc1, acc5, lr, momentum, images_per_s) and the records hooks return at epoch ends.
    fn on_record(&mut self, _record: &Value) -> Result<()> {
        Ok(())
    }
}

/// How a [`Pretrainer::run`] ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The step it ended at.
    pub step: u64,
    /// The step it started from (0, or the resumed checkpoint's).
    pub start_step: u64,
    /// Epochs begun, counting a partial last one.
    pub epochs: usize,
}

/// A pretraining run, ready to start or resume.
pub struct Pretrainer {
    config: RunConfig,
    dir: RunDir,
    /// The run folder's lock, held by rank 0 for the run's life.
    _lock: Option<RunLock>,
    device: Device,
    settings: Settings,
    moco: Moco<Encoder>,
    spec: EncoderSpec,
    train: Arc<NamedDataset>,
    test: Arc<NamedDataset>,
    loader: Loader<Arc<dyn Dataset>>,
    crop: usize,
    eval_size: Option<usize>,
    native: usize,
    steps_per_epoch: usize,
    budget: u64,
    world: usize,
    lead: bool,
    metrics: Option<MetricsLog>,
    meta: HashMap<String, String>,
    other_flags_ignored: bool,
    /// Temporary files of killed writes removed from the run folder at start.
    removed_temp_files: Vec<PathBuf>,
    /// Watches the logged losses for a collapse (reported as an `event` record).
    collapse: CollapseWatch,
}

impl std::fmt::Debug for Pretrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pretrainer")
            .field("dir", &self.dir)
            .field("step", &self.moco.step())
            .field("budget", &self.budget)
            .finish()
    }
}

impl Pretrainer {
    /// Prepares the run of `config` in `dir` on `device` with the kernel `settings`, as one
    /// rank of `comm` (rank 0 alone writes the folder and logs). With `resume`, the run
    /// continues from the checkpoint in `dir` with the configuration saved there (only the step
    /// budget, `max_steps`, may change); without it, a folder that holds a run is refused.
    pub fn new(
        config: RunConfig,
        dir: RunDir,
        resume: bool,
        device: &Device,
        settings: Settings,
        comm: Box<dyn Collective>,
    ) -> Result<Self> {
        let (rank, world) = (comm.rank(), comm.world_size());
        let lead = rank == 0;
        let ckpt = dir.checkpoint_path();
        let mut other_flags_ignored = false;
        let c = if resume {
            let saved = dir.read_config()?;
            // A resumed run keeps its saved configuration; only the step budget may change.
            let mut asked = config.clone();
            asked.max_steps = saved.max_steps;
            other_flags_ignored = asked != saved;
            RunConfig {
                max_steps: config.max_steps,
                ..saved
            }
        } else {
            if dir.has_checkpoint() {
                return Err(Error::run(format!(
                    "--out {}: a run is already there; pass --resume to continue it, or another --out",
                    dir.path().display()
                )));
            }
            config
        };
        c.validate()?;
        let (train, test) = named::open_splits(&c.dataset, c.data_dir.as_deref(), BadFiles::Fail)?;
        if let Some(n) = c.subset.filter(|&n| n > train.len()) {
            return Err(Error::run(format!(
                "subset (--subset): {n} images asked, and the training split ({}) has {}",
                train.describe(),
                train.len()
            )));
        }
        let (train, test) = (Arc::new(train), Arc::new(test));
        let native = train.native_size.unwrap_or(224);
        let eval_size = c.image_size.or(if train.native_size.is_none() {
            Some(224)
        } else {
            None
        });
        let crop = eval_size.unwrap_or(native);
        let spec = c.spec(train.channels(), crop)?;
        let queue = match c.moco.loss {
            moco_core::LossKind::InBatch => 0,
            _ => c.moco.queue_size,
        };
        MemoryNeed::pretraining(
            &spec,
            crop,
            train.channels(),
            c.moco.batch_size / world.max(1),
            queue,
            c.moco.dim,
        )
        .check(
            device,
            "--arch/--width/--image-size/--batch-size/--queue-size",
        )?;
        dir.create()?;
        // One process per run folder (rank 0 of a data-parallel run holds it for all).
        let lock = match lead {
            true => Some(RunLock::acquire(dir.path())?),
            false => None,
        };
        // Under the lock no other process writes here: temporary files are a killed run's.
        let removed_temp_files = match lead {
            true => dir.remove_stale_temp_files()?,
            false => vec![],
        };

        let pretrain_set: Arc<dyn Dataset> = match c.subset {
            Some(n) => Arc::new(Subset::random(train.clone(), n, c.moco.seed)?),
            None => train.clone(),
        };
        let views = Views::Two(TwoCrop::preset(
            augmentation_name(c.moco.augmentation),
            crop,
            train.normalize.clone(),
        )?);
        let lc = LoaderConfig {
            batch_size: c.moco.batch_size,
            shuffle: true,
            drop_last: true,
            workers: c.workers,
            prefetch: 2,
            seed: c.moco.seed,
        };
        let loader = Loader::new(Arc::new(pretrain_set), views, lc)?
            .shard(rank, world)
            .context("--batch-size / --world-size")?;
        let steps_per_epoch = loader.batches_per_epoch();
        let local_batch = c.moco.batch_size / world;
        if world > 1 && c.moco.sync_bn && c.moco.bn_splits > 1 {
            return Err(Error::run(format!(
                "--bn-splits {}: BatchNorm splits emulate several devices on one, and this data-parallel run synchronises BatchNorm over its processes (--sync-bn, on in the v3 presets): drop --bn-splits or pass --sync-bn false",
                c.moco.bn_splits
            )));
        }
        if local_batch % c.moco.bn_splits.max(1) != 0 {
            return Err(Error::run(format!(
                "--bn-splits {}: each process's batch ({local_batch}) must be a multiple of it",
                c.moco.bn_splits
            )));
        }

        let mut moco = Moco::new(c.moco.clone(), device, |vb| {
            moco_models::encoder(spec, settings, vb)
        })?
        .with_kernels(settings.kernels);
        if let Some(hidden) = c.moco.mlp_dim {
            // MoCo v3: a predictor after the query encoder, trained with it, never averaged. Its
            // last layer has a BatchNorm on a ViT (`MoCo_ViT`), none on a ResNet (`MoCo_ResNet`).
            let dim = c.moco.dim;
            let last_bn = matches!(spec.backbone, BackboneConfig::Vit(_));
            moco = moco.with_predictor(|vb| {
                moco_models::head::v3_mlp(2, dim, hidden, dim, last_bn, settings, vb)
            })?;
        }
        if resume {
            moco.load_checkpoint(&ckpt)
                .context(format!("--resume from {}", ckpt.display()))?;
        } else if lead {
            dir.write_config(&c)?;
        }
        let moco = moco.with_collective(comm)?;
        let total = (c.moco.epochs * steps_per_epoch) as u64;
        let budget = c.max_steps.map_or(total, |m| m.min(total));
        let metrics = match lead {
            true => Some(dir.open_metrics(moco.step())?),
            false => None,
        };
        let mut meta = spec.metadata();
        meta.insert(
            "run_config".into(),
            serde_json::to_string(&c).map_err(|e| Error::run(e.to_string()))?,
        );
        let collapse = CollapseWatch::new(&c.moco);
        Ok(Self {
            config: c,
            dir,
            device: device.clone(),
            settings,
            moco,
            spec,
            train,
            test,
            loader,
            crop,
            eval_size,
            native,
            steps_per_epoch,
            budget,
            world,
            lead,
            metrics,
            meta,
            other_flags_ignored,
            removed_temp_files,
            collapse,
            _lock: lock,
        })
    }

    /// The run's configuration (the saved one when resumed).
    pub fn config(&self) -> &RunConfig {
        &self.config
    }
    /// The run folder.
    pub fn dir(&self) -> &RunDir {
        &self.dir
    }
    /// The model.
    pub fn moco(&self) -> &Moco<Encoder> {
        &self.moco
    }
    /// The encoder being trained.
    pub fn spec(&self) -> &EncoderSpec {
        &self.spec
    }
    /// The training set (all of it; `subset` pretrains on part).
    pub fn train_set(&self) -> &Arc<NamedDataset> {
        &self.train
    }
    /// The test set.
    pub fn test_set(&self) -> &Arc<NamedDataset> {
        &self.test
    }
    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// The kernel settings.
    pub fn settings(&self) -> Settings {
        self.settings
    }
    /// The crop size of the augmentations.
    pub fn crop(&self) -> usize {
        self.crop
    }
    /// The evaluation transform's size (`None`: the dataset's native size) and the native size.
    pub fn eval_size(&self) -> (Option<usize>, usize) {
        (self.eval_size, self.native)
    }
    /// Steps per epoch.
    pub fn steps_per_epoch(&self) -> usize {
        self.steps_per_epoch
    }
    /// The step the run stops at.
    pub fn budget(&self) -> u64 {
        self.budget
    }
    /// Whether this process is the first rank (which writes the folder and evaluates).
    pub fn is_lead(&self) -> bool {
        self.lead
    }
    /// Processes in the run.
    pub fn world_size(&self) -> usize {
        self.world
    }
    /// Whether a resumed run was asked for other settings than its saved ones (which it keeps).
    pub fn other_flags_ignored(&self) -> bool {
        self.other_flags_ignored
    }

    /// The temporary files (of writes interrupted by a kill) removed from the run folder when
    /// the run started.
    pub fn removed_temp_files(&self) -> &[PathBuf] {
        &self.removed_temp_files
    }

    /// One line on what the run trains, on what, for how long, and where.
    pub fn describe(&self) -> String {
        let (c, spec) = (&self.config, &self.spec);
        let shape = match spec.backbone {
            BackboneConfig::ResNet(r) => format!("width {}", r.width),
            BackboneConfig::Vit(v) => format!(
                "{}x{} patches{}{}",
                v.patch_size,
                v.patch_size,
                if v.conv_stem {
                    " by a convolutional stem"
                } else {
                    ""
                },
                if v.stop_grad_patch_embed {
                    ", frozen patch projection"
                } else {
                    ""
                }
            ),
        };
        format!(
            "pretraining {} ({}, {} head) on {}: {} epochs x {} steps of {}, {}x{} crops, preset {}, run in {}",
            spec.backbone.arch(),
            shape,
            spec.head.name(),
            self.train.describe(),
            c.moco.epochs,
            self.steps_per_epoch,
            c.moco.batch_size,
            self.crop,
            self.crop,
            c.moco.preset,
            self.dir.path().display()
        )
    }

    /// Where a stopped run can be taken up again: its checkpoint, when one was written (every
    /// checkpoint is finite), else that there is none.
    fn last_good(&self) -> String {
        let ckpt = self.dir.checkpoint_path();
        match ckpt.exists() {
            true => format!("the last good checkpoint is {}", ckpt.display()),
            false => "no checkpoint was written before it".into(),
        }
    }

    /// Writes the checkpoint (rank 0; every rank first checks that all hold the same weights);
    /// a diverged run is an error naming the last good checkpoint.
    fn save(&self, epoch: usize) -> Result<()> {
        self.moco.check_in_sync()?;
        if !self.lead {
            return Ok(());
        }
        let ckpt = self.dir.checkpoint_path();
        let mut m = self.meta.clone();
        m.insert("epoch".into(), epoch.to_string());
        match self.moco.save_checkpoint(&ckpt, m) {
            Err(e @ moco_core::Error::NonFiniteWeights { .. }) => {
                Err(Error::run(format!("{e}; {}", self.last_good())))
            }
            r => r.context(format!("writing {}", ckpt.display())),
        }
    }

    /// Logs `record` (rank 0) and hands it to every hook.
    fn record(&mut self, record: Value, hooks: &mut [&mut dyn Hook]) -> Result<()> {
        for h in hooks.iter_mut() {
            h.on_record(&record)?;
        }
        if let Some(m) = &mut self.metrics {
            m.write(&record)?;
        }
        Ok(())
    }

    /// Runs the loop from where the run stands to its budget: for each batch the MoCo step, a
    /// record every `log_every` steps, a checkpoint every `checkpoint_every` steps; at each
    /// epoch's end a checkpoint, the kept copy every `keep_every` epochs, and the hooks.
    pub fn run(&mut self, hooks: &mut [&mut dyn Hook]) -> Result<Summary> {
        let ipe = self.steps_per_epoch;
        let (budget, world) = (self.budget, self.world);
        let progress = |moco: &Moco<Encoder>, epoch| Progress {
            epoch,
            step: moco.step(),
            budget,
            steps_per_epoch: ipe,
        };
        let start_step = self.moco.step();
        let mut epoch = (start_step / ipe as u64) as usize;
        let mut skip = (start_step % ipe as u64) as usize;
        let mut window = (Instant::now(), 0usize);
        let (log_every, checkpoint_every) = (
            self.config.log_every as u64,
            self.config.checkpoint_every as u64,
        );
        while self.moco.step() < budget && epoch < self.config.moco.epochs {
            for (i, batch) in self.loader.epoch(epoch, skip).enumerate() {
                if self.moco.step() >= budget {
                    break;
                }
                let batch = batch?;
                let iter = skip + i;
                let (lr, m) = self.moco.schedule(epoch, iter, ipe);
                let (x1, x2) = (
                    batch.views[0].to_device(&self.device)?,
                    batch.views[1].to_device(&self.device)?,
                );
                let o = match self.moco.train_step(&x1, &x2, lr, m) {
                    Ok(o) => o,
                    Err(e @ moco_core::Error::NonFiniteLoss { .. }) => {
                        return Err(Error::run(format!("{e}; {}", self.last_good())))
                    }
                    Err(e) => return Err(e.into()),
                };
                window.1 += batch.indices.len() * world;
                let at = progress(&self.moco, epoch);
                for h in hooks.iter_mut() {
                    h.on_step(&at, &o)?;
                }
                let step = at.step;
                if step % log_every == 0 || step == budget {
                    let ips = window.1 as f64 / window.0.elapsed().as_secs_f64();
                    window = (Instant::now(), 0);
                    let line = serde_json::json!({"epoch": epoch, "step": step, "loss": o.loss, "acc1": o.acc1, "acc5": o.acc5, "lr": o.lr, "momentum": o.momentum, "images_per_s": ips});
                    self.record(line, hooks)?;
                    if let Some(c) = self.collapse.observe(o.loss as f64) {
                        let line = serde_json::json!({"epoch": epoch, "step": step, "event": "collapse", "uniform_logits_loss": c.uniform_loss, "records_in_a_row": c.observations});
                        self.record(line, hooks)?;
                    }
                }
                if checkpoint_every > 0 && step % checkpoint_every == 0 {
                    self.save(epoch)?;
                }
            }
            let finished_epoch = self.moco.step() % ipe as u64 == 0;
            self.save(epoch)?;
            if finished_epoch {
                let done = epoch + 1;
                let keep = self.config.keep_every;
                if self.lead && keep > 0 && done % keep == 0 {
                    self.dir.keep_checkpoint(done)?;
                }
                let last = done == self.config.moco.epochs || self.moco.step() >= budget;
                let at = progress(&self.moco, epoch);
                let mut records = vec![];
                for h in hooks.iter_mut() {
                    if let Some(r) = h.on_epoch_end(&at, last, &self.moco)? {
                        records.push(r);
                    }
                }
                for r in records {
                    self.record(r, hooks)?;
                }
            }
            epoch += 1;
            skip = 0;
        }
        if self.moco.step() == start_step && !self.dir.has_checkpoint() {
            self.save(epoch)?;
        }
        if self.lead {
            let at = progress(&self.moco, epoch);
            for h in hooks.iter_mut() {
                if let Some(r) = h.on_finish(&at, &self.moco)? {
                    if let Some(m) = &mut self.metrics {
                        m.write(&r)?;
                    }
                }
            }
        }
        Ok(Summary {
            step: self.moco.step(),
            start_step,
            epochs: (self.moco.step() as usize).div_ceil(ipe),
        })
    }
}
