//! [`KnnMonitor`]: the weighted kNN accuracy of the query encoder during pretraining (the
//! official CIFAR demo's monitor): the whole training set's features against the test set's,
//! after every `knn_every` epochs and at the end of the run.

use std::sync::Arc;

use candle_core::{DType, Device};
use moco_core::Moco;
use moco_data::augment;
use moco_data::datasets::Dataset;
use moco_data::named::NamedDataset;
use moco_eval::features::{self, ExtractConfig};
use moco_eval::knn::{self, KnnConfig};
use moco_models::{Encoder, Settings};
use serde_json::Value;

use crate::error::Result;
use crate::pretrainer::{Hook, Pretrainer, Progress};

/// The kNN monitor, a [`Hook`] of a [`Pretrainer`] (on its first rank).
pub struct KnnMonitor {
    train: Arc<NamedDataset>,
    test: Arc<NamedDataset>,
    eval_size: (Option<usize>, usize),
    workers: usize,
    config: KnnConfig,
    every: usize,
    device: Device,
    settings: Settings,
    last: Option<(u64, f64, f64)>,
}

impl std::fmt::Debug for KnnMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KnnMonitor")
            .field("every", &self.every)
            .field("last", &self.last)
            .finish()
    }
}

impl KnnMonitor {
    /// The monitor of `run`'s configuration: `knn_k` neighbours at temperature `knn_t`, every
    /// `knn_every` epochs (unset: every epoch, but only at the end on a `folder` dataset).
    pub fn new(run: &Pretrainer) -> Self {
        let c = run.config();
        Self {
            train: run.train_set().clone(),
            test: run.test_set().clone(),
            eval_size: run.eval_size(),
            workers: c.workers,
            config: KnnConfig {
                k: c.knn_k,
                t: c.knn_t,
                ..Default::default()
            },
            every: c
                .knn_every
                .unwrap_or(if c.dataset == "folder" { 0 } else { 1 }),
            device: run.device().clone(),
            settings: run.settings(),
            last: None,
        }
    }

    /// The last evaluation: (step, top-1, top-5), percent.
    pub fn last(&self) -> Option<(u64, f64, f64)> {
        self.last
    }

    /// Top-1 and top-5 of the query encoder's current weights.
    pub fn evaluate(&self, moco: &Moco<Encoder>) -> Result<(f64, f64)> {
        // The weights as plain tensors (sharing the variables' storage): the eval-mode forward
        // then records no autograd graph, as `moco knn` on a saved checkpoint.
        let tensors = moco.encoders().query_tensors().into_iter().collect();
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &self.device);
        let enc = moco_models::encoder(*moco.query().spec(), self.settings, vb)?;
        let (size, native) = self.eval_size;
        let f = |d: &Arc<NamedDataset>| {
            features::extract(
                &enc,
                d.clone(),
                augment::eval(size, native, d.normalize.clone()),
                ExtractConfig {
                    batch_size: 256,
                    workers: self.workers,
                    l2: false,
                },
                &self.device,
                |_, _| {},
            )
        };
        let (ftr, fte) = (f(&self.train)?, f(&self.test)?);
        let r = knn::evaluate(&ftr, &fte, self.train.classes().len(), &self.config)?;
        Ok((r.top1, r.top5))
    }

    fn measure(&mut self, epoch: usize, moco: &Moco<Encoder>) -> Result<Value> {
        let (top1, top5) = self.evaluate(moco)?;
        self.last = Some((moco.step(), top1, top5));
        Ok(
            serde_json::json!({"epoch": epoch, "step": moco.step(), "knn_top1": top1, "knn_top5": top5}),
        )
    }
}

impl Hook for KnnMonitor {
    fn on_epoch_end(
        &mut self,
        at: &Progress,
        last: bool,
        moco: &Moco<Encoder>,
    ) -> Result<Option<Value>> {
        let done = at.epoch + 1;
        if (self.every > 0 && done % self.every == 0) || last {
            return self.measure(at.epoch, moco).map(Some);
        }
        Ok(None)
    }

    /// The final evaluation, unless the last epoch just made it.
    fn on_finish(&mut self, at: &Progress, moco: &Moco<Encoder>) -> Result<Option<Value>> {
        if matches!(self.last, Some((step, _, _)) if step == moco.step()) {
            return Ok(None);
        }
        let epoch = (moco.step() as usize)
            .div_ceil(at.steps_per_epoch)
            .saturating_sub(1);
        self.measure(epoch, moco).map(Some)
    }
}
