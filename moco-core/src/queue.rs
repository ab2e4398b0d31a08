//! The dictionary of keys: a FIFO queue of the K most recent keys, stored C x K on the device.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::Rng;
use rand_distr::StandardNormal;

use crate::error::bad;
use crate::{io, Error, Result};

/// A queue of `size` (K) keys of dimension `dim` (C), stored as one C x K tensor as in the
/// official `MoCo.queue` buffer, with a write pointer.
///
/// Unlike the official code (which asserts `K % batch == 0`), any `K >= batch` works: a batch that
/// reaches the end of the buffer wraps around to its start. Each slot can also carry an integer
/// label (class or dataset index; -1 for a slot that holds no real key yet), which the kNN monitor
/// and memory-bank methods need.
///
/// `enqueue` writes into the buffer in place, as the official code does: call it after the
/// backward pass of the step whose logits used the queue.
#[derive(Debug)]
pub struct Queue {
    keys: Tensor,           // C x K, a float dtype, contiguous
    labels: Option<Tensor>, // K, i64
    ptr: usize,
}

impl Queue {
    /// A queue initialised like the official code: `randn(C, K)` L2-normalised over C, in
    /// float32.
    pub fn new(dim: usize, size: usize, rng: &mut impl Rng, device: &Device) -> Result<Self> {
        Self::new_with_dtype(dim, size, DType::F32, rng, device)
    }

    /// [`new`](Self::new) in `dtype` (a float type): the same float32 draws, normalised in
    /// `dtype`.
    pub fn new_with_dtype(
        dim: usize,
        size: usize,
        dtype: DType,
        rng: &mut impl Rng,
        device: &Device,
    ) -> Result<Self> {
        if !dtype.is_float() {
            return Err(Error::config(
                "queue",
                format!("{dtype:?} is not a float type: use F32, F64, BF16 or F16"),
            ));
        }
        if dim == 0 || size == 0 {
            return Err(Error::config(
                "queue_size",
                format!("queue must have positive dim and size, got C={dim}, K={size}"),
            ));
        }
        let data: Vec<f32> = (0..dim * size)
            .map(|_| rng.sample(StandardNormal))
            .collect();
        let keys = Tensor::from_vec(data, (dim, size), device)?.to_dtype(dtype)?;
        let keys = crate::loss::l2_normalize(&keys, 0)?.contiguous()?;
        Ok(Self {
            keys,
            labels: None,
            ptr: 0,
        })
    }

    /// Adds a label per slot (all -1 at first); `enqueue_with_labels` then fills them.
    pub fn with_labels(mut self) -> Result<Self> {
        let k = self.size();
        self.labels = Some(Tensor::full(-1i64, k, self.keys.device())?);
        Ok(self)
    }

    /// Builds a queue from a C x K tensor (of a float dtype, which the queue keeps) and a
    /// pointer (e.g. an imported checkpoint).
    pub fn from_parts(keys: Tensor, ptr: usize, labels: Option<Tensor>) -> Result<Self> {
        let (_, k) = keys
            .dims2()
            .map_err(|_| bad("queue keys", "a C x K matrix", &keys))?;
        if !keys.dtype().is_float() {
            return Err(bad("queue keys", "a matrix of a float dtype", &keys));
        }
        if ptr >= k {
            return Err(Error::config(
                "queue_ptr",
                format!("pointer {ptr} is outside a queue of size {k}"),
            ));
        }
        if let Some(l) = &labels {
            if l.dims() != [k] {
                return Err(bad("queue labels", &format!("[{k}]"), l));
            }
        }
        let keys = keys.contiguous()?;
        let labels = labels.map(|l| l.to_dtype(DType::I64)).transpose()?;
        // `contiguous` returns the same storage when already contiguous; own the buffer that
        // `enqueue` will write into.
        Ok(Self {
            keys: keys.copy()?,
            labels: labels.map(|l| l.copy()).transpose()?,
            ptr,
        })
    }

    /// The queue with its keys in `dtype` (itself when it is already), pointer and labels kept.
    pub fn to_dtype(self, dtype: DType) -> Result<Self> {
        if self.keys.dtype() == dtype {
            return Ok(self);
        }
        let keys = self.keys.to_dtype(dtype)?;
        Self::from_parts(keys, self.ptr, self.labels)
    }

    /// The dtype of the keys; enqueued keys must have it.
    pub fn dtype(&self) -> DType {
        self.keys.dtype()
    }

    /// The C x K key buffer. It changes in place on `enqueue`.
    pub fn keys(&self) -> &Tensor {
        &self.keys
    }

    /// The K labels, when the queue carries them.
    pub fn labels(&self) -> Option<&Tensor> {
        self.labels.as_ref()
    }

    /// The slot the next key is written to.
    pub fn ptr(&self) -> usize {
        self.ptr
    }

    /// Key dimension C.
    pub fn dim(&self) -> usize {
        self.keys.dims()[0]
    }

    /// Number of keys K.
    pub fn size(&self) -> usize {
        self.keys.dims()[1]
    }

    /// Writes the N x C `keys` at the pointer (wrapping around) and advances it by N.
    pub fn enqueue(&mut self, keys: &Tensor) -> Result<()> {
        self.enqueue_impl(keys, None)
    }

    /// Like [`enqueue`](Self::enqueue), also recording one label per key (N values).
    pub fn enqueue_with_labels(&mut self, keys: &Tensor, labels: &Tensor) -> Result<()> {
        if self.labels.is_none() {
            return Err(Error::config(
                "queue labels",
                "this queue carries no labels (build it with `with_labels`)",
            ));
        }
        self.enqueue_impl(keys, Some(labels))
    }

    fn enqueue_impl(&mut self, keys: &Tensor, labels: Option<&Tensor>) -> Result<()> {
        let (c, k) = (self.dim(), self.size());
        let (n, kc) = keys
            .dims2()
            .map_err(|_| bad("enqueued keys", &format!("N x {c}"), keys))?;
        if kc != c {
            return Err(bad("enqueued keys", &format!("N x {c}"), keys));
        }
        if keys.dtype() != self.dtype() {
            return Err(bad(
                "enqueued keys",
                &format!(
                    "{:?}, the queue's dtype (build the queue, or the Moco model, in the encoder's dtype)",
                    self.dtype()
                ),
                keys,
            ));
        }
        if n > k {
            return Err(Error::QueueTooSmall {
                queue_size: k,
                batch: n,
            });
        }
        if let Some(l) = labels {
            if l.dims() != [n] {
                return Err(bad("enqueued labels", &format!("[{n}]"), l));
            }
        }
        // keys: N x C -> C x N, the layout of the buffer's columns.
        let cols = keys.detach().t()?.contiguous()?;
        let labels = labels
            .map(|l| l.detach().to_dtype(DType::I64)?.contiguous())
            .transpose()?;
        let first = n.min(k - self.ptr);
        self.write(&cols, labels.as_ref(), 0, first, self.ptr)?;
        if first < n {
            self.write(&cols, labels.as_ref(), first, n - first, 0)?;
        }
        self.ptr = (self.ptr + n) % k;
        Ok(())
    }

    // Copies columns [from, from+len) of `cols` into slots [at, at+len).
    fn write(
        &mut self,
        cols: &Tensor,
        labels: Option<&Tensor>,
        from: usize,
        len: usize,
        at: usize,
    ) -> Result<()> {
        let part = if len == cols.dims()[1] {
            cols.clone()
        } else {
            cols.narrow(1, from, len)?.contiguous()?
        };
        self.keys.slice_set(&part, 1, at)?;
        if let (Some(dst), Some(src)) = (&self.labels, labels) {
            dst.slice_set(&src.narrow(0, from, len)?.contiguous()?, 0, at)?;
        }
        Ok(())
    }

    /// The queue as named tensors: `queue` (C x K), `queue_ptr` (i64, shape `[1]`, as the official
    /// buffer) and, when present, `queue_labels` (i64, K). `prefix` is prepended to each name.
    pub fn tensors(&self, prefix: &str) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        out.insert(format!("{prefix}queue"), self.keys.copy()?);
        out.insert(
            format!("{prefix}queue_ptr"),
            Tensor::new(&[self.ptr as i64], self.keys.device())?,
        );
        if let Some(l) = &self.labels {
            out.insert(format!("{prefix}queue_labels"), l.copy()?);
        }
        Ok(out)
    }

    /// Rebuilds a queue from [`tensors`](Self::tensors)' output (taken out of `file`).
    pub fn from_file(file: &mut io::TensorFile, prefix: &str) -> Result<Self> {
        let keys = file.take(&format!("{prefix}queue"))?;
        let ptr_t = file.take(&format!("{prefix}queue_ptr"))?;
        let ptr = ptr_t
            .flatten_all()?
            .to_dtype(DType::I64)?
            .to_vec1::<i64>()?
            .first()
            .copied()
            .ok_or_else(|| Error::file(&file.path, format!("`{prefix}queue_ptr` is empty")))?;
        let labels = file.tensors.remove(&format!("{prefix}queue_labels"));
        if ptr < 0 {
            return Err(Error::file(
                &file.path,
                format!("`{prefix}queue_ptr` is negative ({ptr})"),
            ));
        }
        Self::from_parts(keys, ptr as usize, labels)
            .map_err(|e| Error::file(&file.path, e.to_string()))
    }

    /// Saves the queue to a safetensors file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        io::save_atomic(path, &self.tensors("")?, None)
    }

    /// Loads a queue saved by [`save`](Self::save).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let mut f = io::load(path, device)?;
        Self::from_file(&mut f, "")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn queue(c: usize, k: usize) -> Queue {
        Queue::new(c, k, &mut StdRng::seed_from_u64(0), &Device::Cpu).unwrap()
    }

    // Keys with recognisable values: row i is [base + i; C].
    fn batch(n: usize, c: usize, base: f32) -> Tensor {
        let v: Vec<f32> = (0..n).flat_map(|i| vec![base + i as f32; c]).collect();
        Tensor::from_vec(v, (n, c), &Device::Cpu).unwrap()
    }

    fn column_ids(q: &Queue) -> Vec<f32> {
        // The first row of the C x K buffer identifies each slot's key.
        q.keys().get(0).unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn initial_keys_are_unit_columns() {
        let q = queue(8, 32);
        let norms = q
            .keys()
            .sqr()
            .unwrap()
            .sum(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5), "{norms:?}");
        assert_eq!((q.dim(), q.size(), q.ptr()), (8, 32, 0));
    }

    #[test]
    fn k_smaller_than_batch_is_an_error() {
        let b = 4;
        let mut q = queue(2, b - 1);
        let err = q.enqueue(&batch(b, 2, 0.0)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::QueueTooSmall {
                    queue_size: 3,
                    batch: 4
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("K=3"), "{err}");
        assert_eq!(q.ptr(), 0, "a failed enqueue leaves the pointer alone");
    }

    #[test]
    fn k_equal_to_batch_replaces_the_whole_queue() {
        let mut q = queue(2, 4);
        q.enqueue(&batch(4, 2, 10.0)).unwrap();
        assert_eq!(column_ids(&q), [10.0, 11.0, 12.0, 13.0]);
        assert_eq!(q.ptr(), 0);
        q.enqueue(&batch(4, 2, 20.0)).unwrap();
        assert_eq!(column_ids(&q), [20.0, 21.0, 22.0, 23.0]);
    }

    #[test]
    fn k_batch_plus_one_wraps_around() {
        let mut q = queue(2, 5);
        q.enqueue(&batch(4, 2, 10.0)).unwrap();
        assert_eq!(q.ptr(), 4);
        q.enqueue(&batch(4, 2, 20.0)).unwrap();
        // slot 4 gets the first key, slots 0..3 the rest; slot 3 still holds 13.
        assert_eq!(column_ids(&q), [21.0, 22.0, 23.0, 13.0, 20.0]);
        assert_eq!(q.ptr(), 3);
    }

    #[test]
    fn k_three_batches_is_fifo() {
        let mut q = queue(2, 12);
        for (i, base) in [10.0, 20.0, 30.0, 40.0].into_iter().enumerate() {
            q.enqueue(&batch(4, 2, base)).unwrap();
            assert_eq!(q.ptr(), ((i + 1) * 4) % 12);
        }
        let ids = column_ids(&q);
        assert_eq!(
            &ids[0..4],
            [40.0, 41.0, 42.0, 43.0],
            "oldest batch replaced"
        );
        assert_eq!(
            &ids[4..12],
            [20.0, 21.0, 22.0, 23.0, 30.0, 31.0, 32.0, 33.0]
        );
    }

    #[test]
    fn wrong_key_dim_is_an_error() {
        let mut q = queue(3, 8);
        let err = q.enqueue(&batch(2, 4, 0.0)).unwrap_err();
        assert!(err.to_string().contains("N x 3"), "{err}");
    }

    #[test]
    fn labels_follow_their_keys_and_survive_save_load() {
        let mut q = queue(2, 5).with_labels().unwrap();
        let labels = Tensor::new(&[7i64, 8, 9], &Device::Cpu).unwrap();
        q.enqueue_with_labels(&batch(3, 2, 1.0), &labels).unwrap();
        q.enqueue_with_labels(&batch(3, 2, 5.0), &labels).unwrap();
        // Slots 0-2 get 7, 8, 9; then slots 3, 4 and (wrapping) 0 get 7, 8, 9.
        let want = [9i64, 8, 9, 7, 8];
        assert_eq!(q.labels().unwrap().to_vec1::<i64>().unwrap(), want);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.safetensors");
        q.save(&path).unwrap();
        let r = Queue::load(&path, &Device::Cpu).unwrap();
        assert_eq!(r.ptr(), 1);
        assert_eq!(r.labels().unwrap().to_vec1::<i64>().unwrap(), want);
        assert_eq!(
            r.keys().to_vec2::<f32>().unwrap(),
            q.keys().to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn load_names_the_file_and_the_missing_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        let mut t = BTreeMap::new();
        t.insert(
            "queue".to_string(),
            Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap(),
        );
        io::save_atomic(&path, &t, None).unwrap();
        let err = Queue::load(&path, &Device::Cpu).unwrap_err().to_string();
        assert!(
            err.contains("bad.safetensors") && err.contains("queue_ptr"),
            "{err}"
        );

        std::fs::write(&path, b"not safetensors").unwrap();
        let err = Queue::load(&path, &Device::Cpu).unwrap_err().to_string();
        assert!(
            err.contains("bad.safetensors") && err.contains("not a valid"),
            "{err}"
        );
    }
}
