//! A multi-threaded loader: per-epoch shuffling, decoding and augmentation on a pool of worker
//! threads, a bounded queue of ready batches, (B, C, H, W) tensors out.
//!
//! Every sample's random stream is seeded from (seed, epoch, dataset index, view), so a batch is
//! the same whatever the number of workers.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;

use crate::augment::{Pipeline, TwoCrop};
use crate::datasets::Dataset;
use crate::{Error, Result};

/// What the loader turns each image into.
#[derive(Debug, Clone)]
pub enum Views {
    /// One augmented view (linear-probe training, evaluation).
    One(Pipeline),
    /// MoCo's query and key views.
    Two(TwoCrop),
}

/// One batch.
#[derive(Debug)]
pub struct Batch {
    /// One tensor per view, each (B, C, H, W) f32 on the CPU.
    pub views: Vec<Tensor>,
    /// Labels (u32::MAX where unlabelled).
    pub labels: Vec<u32>,
    /// Dataset indices of the samples.
    pub indices: Vec<usize>,
}

/// Loader settings.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Samples per batch.
    pub batch_size: usize,
    /// Reshuffle every epoch (else dataset order).
    pub shuffle: bool,
    /// Drop the last incomplete batch.
    pub drop_last: bool,
    /// Worker threads (0 = one per core).
    pub workers: usize,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
    /// Seed of the shuffles and augmentations.
    pub seed: u64,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            shuffle: true,
            drop_last: true,
            workers: 0,
            prefetch: 2,
            seed: 0,
        }
    }
}

/// splitmix64: decorrelates nearby seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The random stream of one sample's view.
pub fn sample_rng(seed: u64, epoch: usize, index: usize, view: usize) -> StdRng {
    StdRng::seed_from_u64(mix(mix(mix(seed) ^ epoch as u64) ^ index as u64) ^ view as u64)
}

/// The sample order of an epoch.
pub fn epoch_order(len: usize, seed: u64, epoch: usize, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    if shuffle {
        order.shuffle(&mut StdRng::seed_from_u64(
            mix(seed ^ 0x5348_5546) ^ epoch as u64,
        ));
    }
    order
}

/// Builds one batch: decodes and augments `indices` on the current rayon pool.
pub fn make_batch<D: Dataset + ?Sized>(
    dataset: &D,
    views: &Views,
    indices: &[usize],
    seed: u64,
    epoch: usize,
) -> Result<Batch> {
    let pipes: Vec<&Pipeline> = match views {
        Views::One(p) => vec![p],
        Views::Two(t) => vec![&t.query, &t.key],
    };
    let b = indices.len();
    let c = dataset.channels();
    // Each sample writes its views straight into the batch buffers (no per-sample copies).
    let mut bufs: Vec<Vec<f32>> = pipes
        .iter()
        .map(|p| vec![0f32; b * c * p.size * p.size])
        .collect();
    let mut slots: Vec<Vec<&mut [f32]>> = vec![];
    for (buf, p) in bufs.iter_mut().zip(&pipes) {
        slots.push(buf.chunks_exact_mut(c * p.size * p.size).collect());
    }
    // slots[v][k]: view v of sample k -> per sample: [view 0, view 1, ...]
    let mut per_sample: Vec<Vec<&mut [f32]>> =
        (0..b).map(|_| Vec::with_capacity(pipes.len())).collect();
    for view in slots {
        for (k, slot) in view.into_iter().enumerate() {
            per_sample[k].push(slot);
        }
    }
    let labels: Vec<u32> = per_sample
        .into_par_iter()
        .zip(indices.par_iter())
        .map(|(mut outs, &i)| {
            let (img, label) = dataset.get(i)?;
            if img.channels != c {
                return Err(Error::config(
                    "dataset",
                    format!(
                        "sample {i} has {} channel(s), the dataset {c}",
                        img.channels
                    ),
                ));
            }
            for (v, (p, out)) in pipes.iter().zip(outs.iter_mut()).enumerate() {
                p.apply_into(&img, &mut sample_rng(seed, epoch, i, v), out);
            }
            Ok(label)
        })
        .collect::<Result<_>>()?;
    let mut tensors = vec![];
    for (buf, p) in bufs.into_iter().zip(&pipes) {
        tensors.push(Tensor::from_vec(buf, (b, c, p.size, p.size), &Device::Cpu)?);
    }
    Ok(Batch {
        views: tensors,
        labels,
        indices: indices.to_vec(),
    })
}

/// Batches of a dataset, prepared on worker threads.
pub struct Loader<D: Dataset + 'static> {
    dataset: Arc<D>,
    views: Arc<Views>,
    config: LoaderConfig,
    pool: Arc<rayon::ThreadPool>,
    shard: (usize, usize),
}

impl<D: Dataset + 'static> std::fmt::Debug for Loader<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("dataset", &self.dataset.describe())
            .field("config", &self.config)
            .finish()
    }
}

impl<D: Dataset + 'static> Loader<D> {
    /// A loader over `dataset` producing `views`.
    pub fn new(dataset: Arc<D>, views: Views, config: LoaderConfig) -> Result<Self> {
        if config.batch_size == 0 {
            return Err(Error::config("batch_size", "must be at least 1"));
        }
        if config.drop_last && dataset.len() < config.batch_size {
            return Err(Error::config(
                "batch_size",
                format!(
                    "{} is larger than the dataset ({}), and the last incomplete batch is dropped",
                    config.batch_size,
                    dataset.describe()
                ),
            ));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.workers)
            .thread_name(|i| format!("moco-data-{i}"))
            .build()
            .map_err(|e| Error::config("workers", e.to_string()))?;
        Ok(Self {
            dataset,
            views: Arc::new(views),
            config,
            pool: Arc::new(pool),
            shard: (0, 1),
        })
    }

    /// This process's share of every batch in a data-parallel run of `world_size` processes:
    /// each global batch of `batch_size` samples (same order, same augmentations as in one
    /// process) is cut into `world_size` equal slices and rank `rank` gets slice `rank`. Needs
    /// `drop_last` and a batch size divisible by the world size.
    pub fn shard(mut self, rank: usize, world_size: usize) -> Result<Self> {
        if rank >= world_size {
            return Err(Error::config(
                "rank",
                format!("{rank} is outside 0..{world_size}"),
            ));
        }
        if self.config.batch_size % world_size != 0 || !self.config.drop_last {
            return Err(Error::config(
                "batch_size",
                format!(
                    "the global batch of {} does not split into {world_size} equal shares (it must be a multiple of the world size, with drop_last)",
                    self.config.batch_size
                ),
            ));
        }
        self.shard = (rank, world_size);
        Ok(self)
    }

    /// Batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.dataset.len(), self.config.batch_size);
        if self.config.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The dataset.
    pub fn dataset(&self) -> &D {
        &self.dataset
    }

    /// The batches of `epoch`, starting at batch `skip` (to resume mid-epoch), prepared ahead on
    /// the worker threads.
    pub fn epoch(&self, epoch: usize, skip: usize) -> EpochIter {
        let order = epoch_order(
            self.dataset.len(),
            self.config.seed,
            epoch,
            self.config.shuffle,
        );
        let b = self.config.batch_size;
        let mut chunks: Vec<Vec<usize>> = order.chunks(b).map(<[usize]>::to_vec).collect();
        if self.config.drop_last && chunks.last().is_some_and(|c| c.len() < b) {
            chunks.pop();
        }
        let (rank, world) = self.shard;
        let part = b / world;
        let chunks: Vec<Vec<usize>> = chunks
            .into_iter()
            .skip(skip)
            .map(|c| match world {
                1 => c,
                _ => c[rank * part..(rank + 1) * part].to_vec(),
            })
            .collect();
        let (tx, rx) = sync_channel(self.config.prefetch.max(1));
        let (dataset, views, pool, seed) = (
            self.dataset.clone(),
            self.views.clone(),
            self.pool.clone(),
            self.config.seed,
        );
        let handle = std::thread::spawn(move || {
            for idx in chunks {
                let batch = pool.install(|| make_batch(&*dataset, &views, &idx, seed, epoch));
                let failed = batch.is_err();
                if tx.send(batch).is_err() || failed {
                    break; // consumer gone, or the error was delivered
                }
            }
        });
        EpochIter {
            rx,
            handle: Some(handle),
        }
    }
}

/// The batches of one epoch, in order.
pub struct EpochIter {
    rx: Receiver<Result<Batch>>,
    handle: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for EpochIter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EpochIter")
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        match self.rx.recv() {
            Ok(b) => Some(b),
            Err(_) => {
                if let Some(h) = self.handle.take() {
                    let _ = h.join();
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::{Normalize, TwoCrop};
    use crate::datasets::InMemory;

    fn data(n: usize) -> Arc<InMemory> {
        let pixels = (0..n * 28 * 28).map(|i| (i % 253) as u8).collect();
        Arc::new(
            InMemory::new(
                "t",
                (28, 28, 1),
                pixels,
                (0..n as u32).map(|i| i % 10).collect(),
                (0..10).map(|c| c.to_string()).collect(),
            )
            .unwrap(),
        )
    }

    fn run(workers: usize, epoch: usize) -> Vec<(Vec<f32>, Vec<usize>)> {
        let views = Views::Two(TwoCrop::preset("v2", 20, Normalize::fashion_mnist()).unwrap());
        let cfg = LoaderConfig {
            batch_size: 16,
            workers,
            seed: 9,
            ..Default::default()
        };
        let loader = Loader::new(data(70), views, cfg).unwrap();
        assert_eq!(loader.batches_per_epoch(), 4);
        loader
            .epoch(epoch, 0)
            .map(|b| {
                let b = b.unwrap();
                assert_eq!(b.views.len(), 2);
                assert_eq!(b.views[0].dims(), [16, 1, 20, 20]);
                let v = b.views[1].flatten_all().unwrap().to_vec1::<f32>().unwrap();
                (v, b.indices)
            })
            .collect()
    }

    #[test]
    fn same_seed_same_batches_whatever_the_worker_count() {
        let a = run(1, 0);
        let b = run(3, 0);
        assert_eq!(a, b);
        let c = run(2, 1);
        assert_ne!(a[0].1, c[0].1, "each epoch reshuffles");
        // Every index appears at most once per epoch; 70 - 70 % 16 = 64 are used.
        let mut all: Vec<usize> = a.iter().flat_map(|x| x.1.clone()).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 64);
    }

    #[test]
    fn resuming_mid_epoch_skips_the_done_batches() {
        let views = Views::One(crate::augment::cifar(12, Normalize::fashion_mnist()));
        let cfg = LoaderConfig {
            batch_size: 10,
            seed: 3,
            ..Default::default()
        };
        let loader = Loader::new(data(50), views, cfg).unwrap();
        let full: Vec<Vec<usize>> = loader.epoch(2, 0).map(|b| b.unwrap().indices).collect();
        let tail: Vec<Vec<usize>> = loader.epoch(2, 3).map(|b| b.unwrap().indices).collect();
        assert_eq!(&full[3..], &tail[..]);
    }

    #[test]
    fn shards_put_together_are_the_global_batches() {
        let make = || {
            let views = Views::Two(TwoCrop::preset("v2", 20, Normalize::fashion_mnist()).unwrap());
            let cfg = LoaderConfig {
                batch_size: 12,
                workers: 2,
                seed: 4,
                ..Default::default()
            };
            Loader::new(data(40), views, cfg).unwrap()
        };
        let whole: Vec<Batch> = make().epoch(1, 1).map(Result::unwrap).collect();
        let shards: Vec<Vec<Batch>> = (0..3)
            .map(|r| {
                make()
                    .shard(r, 3)
                    .unwrap()
                    .epoch(1, 1)
                    .map(Result::unwrap)
                    .collect()
            })
            .collect();
        assert_eq!(whole.len(), 2);
        for (i, w) in whole.iter().enumerate() {
            let parts: Vec<&Batch> = shards.iter().map(|s| &s[i]).collect();
            let idx: Vec<usize> = parts.iter().flat_map(|p| p.indices.clone()).collect();
            assert_eq!(idx, w.indices);
            for v in 0..2 {
                let cat =
                    Tensor::cat(&parts.iter().map(|p| &p.views[v]).collect::<Vec<_>>(), 0).unwrap();
                let d = (cat - &w.views[v])
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap();
                assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "batch {i} view {v}");
            }
        }
        let e = make().shard(0, 5).unwrap_err().to_string();
        assert!(e.contains("multiple of the world size"), "{e}");
    }

    #[test]
    fn batch_larger_than_the_dataset_is_an_error() {
        let views = Views::One(crate::augment::cifar(12, Normalize::fashion_mnist()));
        let cfg = LoaderConfig {
            batch_size: 100,
            ..Default::default()
        };
        let err = Loader::new(data(50), views, cfg).unwrap_err().to_string();
        assert!(err.contains("batch_size"), "{err}");
    }
}
