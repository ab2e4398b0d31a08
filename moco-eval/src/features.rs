//! Frozen-backbone feature extraction.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use moco_data::augment::Pipeline;
use moco_data::datasets::Dataset;
use moco_data::loader::{Loader, LoaderConfig, Views};
use moco_models::Backbone;

use crate::{Error, Result};

/// Features of a dataset, in dataset order, on the CPU.
#[derive(Debug, Clone)]
pub struct FeatureSet {
    /// N x D, f32.
    pub features: Tensor,
    /// N labels.
    pub labels: Vec<u32>,
}

impl FeatureSet {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Saves `features` and `labels` (u32 as i64) to a safetensors file, atomically.
    pub fn save(&self, path: &Path, metadata: HashMap<String, String>) -> Result<()> {
        let mut t = BTreeMap::new();
        t.insert("features".to_string(), self.features.clone());
        let labels: Vec<i64> = self.labels.iter().map(|&l| l as i64).collect();
        t.insert(
            "labels".to_string(),
            Tensor::new(labels.as_slice(), &Device::Cpu)?,
        );
        moco_core::io::save_atomic(path, &t, Some(metadata))?;
        Ok(())
    }

    /// Loads a file written by [`save`](Self::save); returns it with its metadata.
    pub fn load(path: &Path) -> Result<(Self, HashMap<String, String>)> {
        let mut f = moco_core::io::load(path, &Device::Cpu)?;
        let features = f.take("features")?.to_dtype(DType::F32)?;
        let labels: Vec<u32> = f
            .take("labels")?
            .to_dtype(DType::I64)?
            .to_vec1::<i64>()?
            .into_iter()
            .map(|l| l as u32)
            .collect();
        if features.dim(0)? != labels.len() {
            return Err(Error::config(
                "features",
                format!(
                    "{}: {} features for {} labels",
                    path.display(),
                    features.dim(0)?,
                    labels.len()
                ),
            ));
        }
        Ok((Self { features, labels }, f.metadata))
    }
}

/// How features are extracted.
#[derive(Debug, Clone, Copy)]
pub struct ExtractConfig {
    /// Images per forward pass.
    pub batch_size: usize,
    /// Data worker threads.
    pub workers: usize,
    /// L2-normalise each feature vector.
    pub l2: bool,
}

impl Default for ExtractConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            workers: 2,
            l2: false,
        }
    }
}

/// Runs `backbone` in eval mode (BatchNorm with running statistics) over `dataset` through the
/// deterministic `pipeline` on `device`: pooled features. `progress` is called with
/// (done, total) after each batch.
pub fn extract<B: Backbone + ?Sized, D: Dataset + 'static>(
    backbone: &B,
    dataset: Arc<D>,
    pipeline: Pipeline,
    cfg: ExtractConfig,
    device: &Device,
    mut progress: impl FnMut(usize, usize),
) -> Result<FeatureSet> {
    let ExtractConfig {
        batch_size,
        workers,
        l2,
    } = cfg;
    let total = dataset.len();
    if total == 0 {
        return Err(Error::config(
            "dataset",
            "no images to extract features from",
        ));
    }
    let cfg = LoaderConfig {
        batch_size,
        shuffle: false,
        drop_last: false,
        workers,
        prefetch: 2,
        seed: 0,
    };
    let loader = Loader::new(dataset, Views::One(pipeline), cfg)?;
    let (mut feats, mut labels) = (vec![], Vec::with_capacity(total));
    for batch in loader.epoch(0, 0) {
        let batch = batch?;
        let x = batch.views[0].to_device(device)?;
        // features: B x D, no autograd graph kept
        let f = backbone.features(&x, false)?.detach();
        let f = if l2 {
            moco_core::l2_normalize(&f, 1)?
        } else {
            f
        };
        feats.push(f.to_device(&Device::Cpu)?);
        labels.extend(batch.labels);
        progress(labels.len(), total);
    }
    Ok(FeatureSet {
        features: Tensor::cat(&feats, 0)?,
        labels,
    })
}
