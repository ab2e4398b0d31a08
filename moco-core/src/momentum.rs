//! The momentum (EMA) key encoder: `theta_k = m * theta_k + (1 - m) * theta_q`.
//!
//! The query encoder's variables live in a [`VarMap`]. The key encoder is built from the
//! [`VarBuilder`] that [`MomentumEncoder::key_var_builder`] returns: each variable the key encoder
//! asks for is copied from the query variable **of the same name** on first use, so the two
//! encoders are paired by name, never by the order of `VarMap::all_vars()` (a hash map).
//!
//! Candle has no no-grad mode: any op on a `Var` records the autograd graph. The key encoder
//! therefore receives *detached* views of its parameters (same storage, not tracked), so its
//! forward builds no graph, while the momentum update still writes them in place.
//! BatchNorm running statistics (buffers) are handed out as the variables themselves so the key
//! encoder's own forward passes update them, as in the official code; they are not averaged and
//! never reach an optimizer.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use crate::{Error, Result};

/// Whether a variable name is a BatchNorm buffer rather than a trained parameter
/// (`running_mean`, `running_var`, `num_batches_tracked`, as torchvision names them).
pub fn is_batch_norm_buffer(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    matches!(last, "running_mean" | "running_var" | "num_batches_tracked")
}

type VarTable = Arc<Mutex<BTreeMap<String, Var>>>;

/// The pair (query variables, key variables) and the momentum update between them.
#[derive(Clone)]
pub struct MomentumEncoder {
    query: VarMap,
    key: VarTable,
    is_buffer: fn(&str) -> bool,
}

impl std::fmt::Debug for MomentumEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MomentumEncoder")
            .field("key_variables", &lock(&self.key).len())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked mid-update; the table itself is valid.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MomentumEncoder {
    /// Pairs a key encoder with the query encoder whose variables are in `query`.
    /// BatchNorm buffers are recognised by [`is_batch_norm_buffer`].
    pub fn new(query: &VarMap) -> Self {
        Self::with_buffer_rule(query, is_batch_norm_buffer)
    }

    /// Like [`new`](Self::new) with another rule telling buffers from parameters.
    pub fn with_buffer_rule(query: &VarMap, is_buffer: fn(&str) -> bool) -> Self {
        Self {
            query: query.clone(),
            key: Arc::new(Mutex::new(BTreeMap::new())),
            is_buffer,
        }
    }

    /// The `VarBuilder` to construct the key encoder with (same constructor as the query one).
    pub fn key_var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend = KeyBackend {
            query: self.query.clone(),
            key: self.key.clone(),
            is_buffer: self.is_buffer,
        };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }

    /// The query encoder's variables.
    pub fn query_varmap(&self) -> &VarMap {
        &self.query
    }

    /// The query encoder's trainable parameters (buffers left out), sorted by name: what goes to
    /// the optimizer.
    pub fn query_parameters(&self) -> Vec<(String, Var)> {
        let data = lock(self.query.data());
        let mut out: Vec<_> = data
            .iter()
            .filter(|(n, _)| !(self.is_buffer)(n))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Every query variable (parameters and buffers), sorted by name.
    ///
    /// The tensors share storage with the variables, which the optimizer, the momentum update
    /// and the BatchNorm buffers change in place: they show the current values at every step.
    /// `Tensor::copy` keeps a snapshot.
    pub fn query_tensors(&self) -> BTreeMap<String, Tensor> {
        lock(self.query.data())
            .iter()
            .map(|(n, v)| (n.clone(), v.as_detached_tensor()))
            .collect()
    }

    /// Every key variable (parameters and buffers), sorted by name.
    ///
    /// As [`query_tensors`](Self::query_tensors), they share storage with the variables that
    /// [`update`](Self::update) writes in place; `Tensor::copy` keeps a snapshot.
    pub fn key_tensors(&self) -> BTreeMap<String, Tensor> {
        lock(&self.key)
            .iter()
            .map(|(n, v)| (n.clone(), v.as_detached_tensor()))
            .collect()
    }

    /// Names of the key encoder's variables (those its constructor asked for).
    pub fn key_names(&self) -> Vec<String> {
        lock(&self.key).keys().cloned().collect()
    }

    /// `theta_k = m * theta_k + (1 - m) * theta_q` for every key parameter, in place.
    /// Buffers are left alone: the key encoder's forward passes maintain them.
    pub fn update(&self, m: f64) -> Result<()> {
        if !(0.0..=1.0).contains(&m) {
            return Err(Error::config(
                "momentum",
                format!("must be in [0, 1], got {m}"),
            ));
        }
        let key = lock(&self.key);
        let query = lock(self.query.data());
        for (name, k) in key.iter() {
            if (self.is_buffer)(name) {
                continue;
            }
            let q = query
                .get(name)
                .ok_or_else(|| Error::UnknownKeyVariable { name: name.clone() })?;
            // Detached operands: the average must not join any autograd graph.
            let updated = ((k.as_detached_tensor() * m)? + (q.as_detached_tensor() * (1.0 - m))?)?;
            k.set(&updated)?;
        }
        Ok(())
    }

    /// Copies the named tensors into the key variables (resuming from a checkpoint). Every key
    /// variable must be present in `tensors`, with its shape.
    pub fn load_key(&self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        let key = lock(&self.key);
        for (name, var) in key.iter() {
            let t = tensors.get(name).ok_or_else(|| Error::BadTensor {
                what: format!("key encoder variable `{name}`"),
                expected: "present in the checkpoint".into(),
                got: "missing".into(),
            })?;
            set_checked(name, var, t)?;
        }
        Ok(())
    }
}

impl MomentumEncoder {
    /// Copies the named tensors into the query variables of the same names (pretrained or
    /// imported weights), then the key encoder's variables from the query's, so that the two
    /// start equal as at construction. A tensor that names no query variable, or has another
    /// shape, is an error naming it; query variables `tensors` does not name keep their values
    /// and are returned, sorted.
    pub fn load_query(&self, tensors: &BTreeMap<String, Tensor>) -> Result<Vec<String>> {
        {
            let query = lock(self.query.data());
            for (name, t) in tensors {
                let var = query.get(name).ok_or_else(|| Error::BadTensor {
                    what: format!("tensor `{name}`"),
                    expected: "the name of a variable of the query encoder".into(),
                    got: "no such variable (check the names: torchvision's, without `module.` or `encoder_q.`)".into(),
                })?;
                set_checked(name, var, t)?;
            }
        }
        let mut untouched: Vec<String> = lock(self.query.data())
            .keys()
            .filter(|k| !tensors.contains_key(*k))
            .cloned()
            .collect();
        untouched.sort();
        self.load_key(&self.query_tensors())?;
        Ok(untouched)
    }
}

/// `var.set(t)` with an error naming the variable when shapes differ.
pub(crate) fn set_checked(name: &str, var: &Var, t: &Tensor) -> Result<()> {
    if var.shape() != t.shape() {
        return Err(Error::BadTensor {
            what: format!("variable `{name}`"),
            expected: format!("{:?}", var.dims()),
            got: format!("{:?}", t.dims()),
        });
    }
    var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    Ok(())
}

struct KeyBackend {
    query: VarMap,
    key: VarTable,
    is_buffer: fn(&str) -> bool,
}

impl KeyBackend {
    fn var(&self, name: &str) -> candle_core::Result<Var> {
        let mut key = lock(&self.key);
        if let Some(v) = key.get(name) {
            return Ok(v.clone());
        }
        let query = lock(self.query.data());
        let q = query.get(name).ok_or_else(|| {
            candle_core::Error::Msg(
                Error::UnknownKeyVariable {
                    name: name.to_string(),
                }
                .to_string(),
            )
        })?;
        // theta_k <- theta_q (a copy: the two must not share storage).
        let v = Var::from_tensor(&q.as_detached_tensor().copy()?)?;
        key.insert(name.to_string(), v.clone());
        Ok(v)
    }

    fn hand_out(
        &self,
        name: &str,
        v: &Var,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if v.dtype() != dtype || !v.device().same_device(dev) {
            candle_core::bail!(
                "key encoder variable `{name}` is {:?} on {:?}, but was asked for as {dtype:?} on {dev:?}; \
                 build both encoders with the same dtype and device",
                v.dtype(),
                v.device().location()
            )
        }
        Ok(if (self.is_buffer)(name) {
            v.as_tensor().clone()
        } else {
            v.as_detached_tensor()
        })
    }
}

impl SimpleBackend for KeyBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let v = self.var(name)?;
        if v.shape() != &s {
            candle_core::bail!(
                "key encoder variable `{name}` has shape {:?} in the query encoder, but the key encoder asks for {s:?}",
                v.dims()
            )
        }
        self.hand_out(name, &v, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let v = self.var(name)?;
        self.hand_out(name, &v, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        lock(&self.key).contains_key(name) || lock(self.query.data()).contains_key(name)
    }
}

/// MoCo v3 / BYOL momentum schedule: from `m0` at the start to 1 at the end of training,
/// `m = 1 - (1 - m0) * (1 + cos(pi * progress)) / 2` with `progress` in [0, 1].
pub fn cosine_momentum(m0: f64, progress: f64) -> f64 {
    1.0 - (1.0 - m0) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::{seeded_randn, seeded_var_builder};
    use candle_nn::{batch_norm, linear, BatchNorm, Linear, Module};

    struct Net {
        fc: Linear,
        bn: BatchNorm,
    }

    impl candle_nn::ModuleT for Net {
        fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
            self.fc.forward(x)?.apply_t(&self.bn, train)
        }
    }

    fn net(vb: VarBuilder) -> candle_core::Result<Net> {
        Ok(Net {
            fc: linear(3, 4, vb.pp("fc"))?,
            bn: batch_norm(4, 1e-5, vb.pp("bn"))?,
        })
    }

    fn setup() -> (VarMap, MomentumEncoder, Net, Net) {
        let vars = VarMap::new();
        let q = net(seeded_var_builder(&vars, 1, DType::F32, &Device::Cpu)).unwrap();
        let enc = MomentumEncoder::new(&vars);
        let k = net(enc.key_var_builder(DType::F32, &Device::Cpu)).unwrap();
        (vars, enc, q, k)
    }

    fn values(t: &BTreeMap<String, Tensor>) -> BTreeMap<String, Vec<f32>> {
        t.iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                )
            })
            .collect()
    }

    fn perturb_query(vars: &VarMap) {
        for (name, v) in vars.data().lock().unwrap().iter() {
            if !is_batch_norm_buffer(name) {
                v.set(&(v.as_tensor() + 0.5).unwrap()).unwrap();
            }
        }
    }

    fn params(t: BTreeMap<String, Tensor>) -> BTreeMap<String, Vec<f32>> {
        values(
            &t.into_iter()
                .filter(|(n, _)| !is_batch_norm_buffer(n))
                .collect(),
        )
    }

    #[test]
    fn key_starts_equal_to_query_paired_by_name() {
        let (_, enc, _, _) = setup();
        assert_eq!(values(&enc.key_tensors()), values(&enc.query_tensors()));
        assert_eq!(
            enc.key_names(),
            [
                "bn.bias",
                "bn.running_mean",
                "bn.running_var",
                "bn.weight",
                "fc.bias",
                "fc.weight"
            ]
        );
    }

    #[test]
    fn m_zero_copies_the_query_and_m_one_changes_nothing() {
        let (vars, enc, _, _) = setup();
        let before = params(enc.key_tensors());
        perturb_query(&vars);
        enc.update(1.0).unwrap();
        assert_eq!(
            params(enc.key_tensors()),
            before,
            "m = 1 leaves the key encoder unchanged"
        );
        enc.update(0.0).unwrap();
        assert_eq!(
            params(enc.key_tensors()),
            params(enc.query_tensors()),
            "m = 0 makes key == query"
        );
        assert!(enc.update(1.5).is_err());
    }

    #[test]
    fn key_forward_builds_no_graph_and_keeps_its_own_running_stats() {
        let (_, enc, q, k) = setup();
        let x = seeded_randn(0.0, 1., (8, 3), 1, &Device::Cpu).unwrap();
        let yq = candle_nn::ModuleT::forward_t(&q, &x, true).unwrap();
        let yk = candle_nn::ModuleT::forward_t(&k, &x, true).unwrap();
        assert!(yq.track_op(), "the query forward is tracked for backprop");
        assert!(
            !yk.track_op(),
            "the key forward must not record an autograd graph"
        );
        // The key's forward updated the key's running statistics, not the query's (and vice versa,
        // each saw the batch once: equal values, separate storage).
        let kt = enc.key_tensors();
        let qt = enc.query_tensors();
        assert_ne!(
            kt["bn.running_mean"].to_vec1::<f32>().unwrap(),
            vec![0f32; 4]
        );
        assert_eq!(
            kt["bn.running_mean"].to_vec1::<f32>().unwrap(),
            qt["bn.running_mean"].to_vec1::<f32>().unwrap()
        );
        candle_nn::ModuleT::forward_t(&k, &x, true).unwrap();
        assert_ne!(
            enc.key_tensors()["bn.running_mean"]
                .to_vec1::<f32>()
                .unwrap(),
            enc.query_tensors()["bn.running_mean"]
                .to_vec1::<f32>()
                .unwrap()
        );
    }

    #[test]
    fn buffers_stay_out_of_the_optimizer_and_the_average() {
        let (vars, enc, _, _) = setup();
        let names: Vec<_> = enc.query_parameters().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["bn.bias", "bn.weight", "fc.bias", "fc.weight"]);
        // Change the query's running mean: m = 0 copies parameters but not buffers.
        let rm = vars.data().lock().unwrap()["bn.running_mean"].clone();
        rm.set(&Tensor::ones(4, DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        enc.update(0.0).unwrap();
        assert_eq!(
            enc.key_tensors()["bn.running_mean"]
                .to_vec1::<f32>()
                .unwrap(),
            vec![0f32; 4]
        );
    }

    #[test]
    fn a_key_variable_the_query_lacks_is_an_error() {
        let vars = VarMap::new();
        let _q = linear(
            3,
            4,
            seeded_var_builder(&vars, 2, DType::F32, &Device::Cpu).pp("fc"),
        )
        .unwrap();
        let enc = MomentumEncoder::new(&vars);
        let err = linear(
            3,
            4,
            enc.key_var_builder(DType::F32, &Device::Cpu).pp("head"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("head.weight"), "{err}");
    }
}
