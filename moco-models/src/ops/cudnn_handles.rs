//! The cuDNN handles of the ops (feature `cudnn`), one cache for all of them. Handles are
//! neither Send nor Sync: one per thread and device, bound to the device's stream, as candle
//! keeps its own. Two kinds: cudarc's safe `Cudnn` (whose descriptor builders the convolutions
//! use) and a raw `cudnnHandle_t` for the calls cudarc does not wrap (BatchNorm): its safe
//! handle does not expose the raw one.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::cudnn::{result, sys, Cudnn};
use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::Result;

/// A raw cuDNN handle bound to the device's stream, destroyed with its thread.
struct RawHandle(sys::cudnnHandle_t);

impl Drop for RawHandle {
    fn drop(&mut self) {
        // SAFETY: created by `create_handle` in `with_raw` and dropped once, with its thread.
        let _ = unsafe { result::destroy_handle(self.0) };
    }
}

thread_local! {
    static SAFE: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    static RAW: RefCell<HashMap<DeviceId, RawHandle>> = RefCell::new(HashMap::new());
}

/// This thread's cudarc `Cudnn` for `dev`.
pub(crate) fn cudnn(dev: &CudaDevice) -> Result<Arc<Cudnn>> {
    SAFE.with(|h| {
        if let Some(c) = h.borrow().get(&dev.id()) {
            return Ok(c.clone());
        }
        let c = Cudnn::new(dev.cuda_stream())?;
        h.borrow_mut().insert(dev.id(), c.clone());
        Ok(c)
    })
}

/// Runs `f` with this thread's raw cuDNN handle for `dev`.
pub(crate) fn with_raw<R>(
    dev: &CudaDevice,
    f: impl FnOnce(sys::cudnnHandle_t) -> Result<R>,
) -> Result<R> {
    let raw = RAW.with(|h| -> Result<sys::cudnnHandle_t> {
        if let Some(handle) = h.borrow().get(&dev.id()) {
            return Ok(handle.0);
        }
        let raw = result::create_handle()?;
        let handle = RawHandle(raw);
        // SAFETY: a fresh handle and the device's live stream.
        unsafe { result::set_stream(raw, dev.cuda_stream().cu_stream() as sys::cudaStream_t)? };
        h.borrow_mut().insert(dev.id(), handle);
        Ok(raw)
    })?;
    f(raw)
}
