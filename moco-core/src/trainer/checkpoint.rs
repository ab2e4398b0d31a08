//! A MoCo model's training state as one safetensors file: `encoder_q.*` and `encoder_k.*` (the
//! official checkpoint's names, without `module.`), `queue`, `queue_ptr`, the optimizer's state
//! under `optimizer.`, and the step counter and configuration in the metadata. Written
//! atomically (temporary file + rename) and only when every tensor is finite.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::MocoConfig;
use crate::momentum::{set_checked, MomentumEncoder};
use crate::optim::Optimizer;
use crate::queue::Queue;
use crate::{io, Error, Result};

/// Every piece of training state as named tensors (copies, not views of the variables).
pub(crate) fn state_tensors(
    encoders: &MomentumEncoder,
    queue: Option<&Queue>,
    optimizer: &Optimizer,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (n, t) in encoders.query_tensors() {
        out.insert(format!("encoder_q.{n}"), t.copy()?);
    }
    for (n, t) in encoders.key_tensors() {
        out.insert(format!("encoder_k.{n}"), t.copy()?);
    }
    if let Some(q) = queue {
        out.extend(q.tensors("")?);
    }
    out.extend(optimizer.state_tensors("optimizer.")?);
    Ok(out)
}

/// An error naming the first floating-point tensor of `tensors` (a training state, as
/// [`state_tensors`] gives it: both encoders with their BatchNorm running statistics, the
/// queue, the optimizer's state) that holds a NaN or an infinity after `step`.
pub(crate) fn check_finite(tensors: &BTreeMap<String, Tensor>, step: u64) -> Result<()> {
    match io::first_non_finite(tensors.iter().map(|(n, t)| (n.as_str(), t)))? {
        Some(name) => Err(Error::NonFiniteWeights { step, name }),
        None => Ok(()),
    }
}

/// Writes `tensors` atomically to `path` with `step` and `config` in the metadata, plus
/// `extra`.
pub(crate) fn save(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    step: u64,
    config: &MocoConfig,
    extra: HashMap<String, String>,
) -> Result<()> {
    let mut meta = extra;
    meta.insert("step".into(), step.to_string());
    meta.insert(
        "moco_config".into(),
        serde_json::to_string(config).map_err(|e| Error::file(path, e.to_string()))?,
    );
    io::save_atomic(path, tensors, Some(meta))
}

/// The parts of a model that [`restore`] writes into.
pub(crate) struct State<'a> {
    pub encoders: &'a MomentumEncoder,
    pub optimizer: &'a mut Optimizer,
    /// `Some` for a model with a queue: replaced by the file's, in `dtype`.
    pub queue: &'a mut Option<Queue>,
    pub dtype: DType,
}

/// Restores the state [`save`]d at `path` into `state` (a model of the same architecture);
/// returns the step counter and the file's metadata.
pub(crate) fn restore(
    path: &Path,
    device: &Device,
    state: State,
) -> Result<(u64, HashMap<String, String>)> {
    let mut file = io::load(path, device)?;
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
    for (name, var) in state
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
    state.encoders.load_key(&k).map_err(at)?;
    state.optimizer.load_state(&opt).map_err(at)?;
    if state.queue.is_some() {
        let queue = Queue::from_file(&mut file, "")?;
        *state.queue = Some(queue.to_dtype(state.dtype).map_err(at)?);
    }
    let step = file
        .meta("step")?
        .parse()
        .map_err(|_| Error::file(path, "metadata `step` is not a number"))?;
    Ok((step, file.metadata))
}
