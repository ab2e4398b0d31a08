//! Weight files: an encoder's variables in safetensors with its [`EncoderSpec`] in the
//! metadata ([`save_weights`], [`load_encoder`]), building an encoder from named tensors with
//! every name checked ([`encoder_from_tensors`]), and the official MoCo checkpoints
//! ([`official`]).

pub mod official;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use crate::encoder::{encoder, Encoder, EncoderSpec};
use crate::ops::Settings;
use crate::{Error, Result};

/// Saves `vars` (named as the encoder built them) with `spec` in the metadata, atomically.
pub fn save_weights(
    path: &Path,
    spec: &EncoderSpec,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<()> {
    Ok(moco_core::io::save_atomic(
        path,
        tensors,
        Some(spec.metadata()),
    )?)
}

/// Reads the [`EncoderSpec`] recorded in a weight file's metadata.
pub fn spec_from_metadata(path: &Path, meta: &HashMap<String, String>) -> Result<EncoderSpec> {
    let json = meta.get("spec").ok_or_else(|| {
        Error::file(
            path,
            "no `spec` in the metadata: pass the architecture explicitly",
        )
    })?;
    serde_json::from_str(json)
        .map_err(|e| Error::file(path, format!("metadata `spec` is not valid: {e}")))
}

/// A [`VarMap`] backend that records the names a builder asks for.
struct Recording {
    vars: VarMap,
    used: Arc<Mutex<HashSet<String>>>,
}

impl SimpleBackend for Recording {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Ok(mut used) = self.used.lock() {
            used.insert(name.to_string());
        }
        self.vars.get(s, name, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        SimpleBackend::get_unchecked(&self.vars, name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        SimpleBackend::contains_tensor(&self.vars, name)
    }
}

/// Builds an encoder of `spec` whose variables come from `tensors`: every variable the encoder
/// needs must be there with its shape (the error names the first that is not); tensors the
/// encoder does not use are returned by name.
pub fn encoder_from_tensors(
    spec: EncoderSpec,
    tensors: &HashMap<String, Tensor>,
    settings: Settings,
    device: &Device,
    origin: &Path,
) -> Result<(Encoder, VarMap, Vec<String>)> {
    let vars = VarMap::new();
    {
        let mut data = vars
            .data()
            .lock()
            .map_err(|_| Error::config("weights", "poisoned lock"))?;
        for (k, t) in tensors {
            data.insert(
                k.clone(),
                Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(device)?)?,
            );
        }
    }
    // A VarBuilder over a pre-filled map returns existing variables and would create missing
    // ones: build, recording the names asked for, then check that nothing was created.
    let used = Arc::new(Mutex::new(HashSet::new()));
    let recording = Recording {
        vars: vars.clone(),
        used: used.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(recording), DType::F32, device.clone());
    let enc = encoder(spec, settings, vb).map_err(|e| {
        Error::file(
            origin,
            format!(
                "does not fit {} with head `{}`: {e}",
                spec.backbone.arch(),
                spec.head.name()
            ),
        )
    })?;
    let used = used
        .lock()
        .map_err(|_| Error::config("weights", "poisoned lock"))?
        .clone();
    let mut data = vars
        .data()
        .lock()
        .map_err(|_| Error::config("weights", "poisoned lock"))?;
    let mut missing: Vec<String> = data
        .keys()
        .filter(|k| !tensors.contains_key(*k))
        .cloned()
        .collect();
    missing.sort();
    if let Some(first) = missing.first() {
        return Err(Error::file(
            origin,
            format!(
                "missing tensor `{first}` ({} missing in all) for {} with head `{}`",
                missing.len(),
                spec.backbone.arch(),
                spec.head.name()
            ),
        ));
    }
    let mut unused: Vec<String> = tensors
        .keys()
        .filter(|k| !used.contains(*k))
        .cloned()
        .collect();
    unused.sort();
    // What the encoder does not use stays out of its variables (and of any optimizer or export).
    for k in &unused {
        data.remove(k);
    }
    drop(data);
    Ok((enc, vars, unused))
}

/// Loads an encoder saved by [`save_weights`] (or `moco convert`); `spec` overrides the
/// metadata; the layers compute on the ops `settings` choose.
pub fn load_encoder(
    path: &Path,
    spec: Option<EncoderSpec>,
    settings: Settings,
    device: &Device,
) -> Result<(Encoder, VarMap)> {
    let file = moco_core::io::load(path, device)?;
    let spec = match spec {
        Some(s) => s,
        None => spec_from_metadata(path, &file.metadata)?,
    };
    let (enc, vars, _) = encoder_from_tensors(spec, &file.tensors, settings, device, path)?;
    Ok((enc, vars))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoder::{Backbone, BackboneConfig};
    use crate::{HeadKind, ResNetConfig};
    use candle_nn::ModuleT;
    use moco_core::init::{seeded_randn, seeded_var_builder};

    /// The variables' current values by name.
    fn values(vars: &VarMap) -> HashMap<String, Tensor> {
        vars.data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
            .collect()
    }

    fn build(spec: EncoderSpec) -> (Encoder, VarMap) {
        let vars = VarMap::new();
        let enc = encoder(
            spec,
            Settings::default(),
            seeded_var_builder(&vars, 1, DType::F32, &Device::Cpu),
        )
        .unwrap();
        (enc, vars)
    }

    #[test]
    fn feature_dims_and_output_shapes() {
        let spec = EncoderSpec {
            backbone: BackboneConfig::ResNet(ResNetConfig {
                width: 8,
                in_channels: 1,
                ..ResNetConfig::from_arch("resnet50-small").unwrap()
            }),
            head: HeadKind::Mlp { dim: 5 },
        };
        let (enc, vars) = build(spec);
        assert_eq!(enc.feature_dim(), 8 * 8 * 4);
        let x = seeded_randn(0.0, 1., (2, 1, 28, 28), 1, &Device::Cpu).unwrap();
        assert_eq!(enc.features(&x, false).unwrap().dims(), [2, 256]);
        assert_eq!(enc.forward_t(&x, false).unwrap().dims(), [2, 5]);
        let names: Vec<String> = vars.data().lock().unwrap().keys().cloned().collect();
        for n in [
            "conv1.weight",
            "layer1.0.conv3.weight",
            "layer4.0.downsample.1.running_var",
            "fc.0.weight",
            "fc.2.bias",
        ] {
            assert!(names.iter().any(|k| k == n), "missing {n}");
        }
        // A wrong channel count is an error naming the expected shape.
        let bad = Tensor::zeros((2, 3, 28, 28), DType::F32, &Device::Cpu).unwrap();
        let err = enc.forward_t(&bad, false).unwrap_err().to_string();
        assert!(err.contains("(N, 1, H, W)"), "{err}");
    }

    #[test]
    fn weights_round_trip_through_safetensors() {
        let spec = EncoderSpec {
            backbone: BackboneConfig::ResNet(ResNetConfig {
                width: 4,
                ..ResNetConfig::from_arch("resnet18-small").unwrap()
            }),
            head: HeadKind::Linear { dim: 3 },
        };
        let (enc, vars) = build(spec);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let tensors: BTreeMap<String, Tensor> = values(&vars).into_iter().collect();
        save_weights(&path, &spec, &tensors).unwrap();
        let (back, _) = load_encoder(&path, None, Settings::default(), &Device::Cpu).unwrap();
        assert_eq!(back.spec(), &spec);
        let x = seeded_randn(0.0, 1., (2, 3, 32, 32), 2, &Device::Cpu).unwrap();
        let (a, b) = (
            enc.forward_t(&x, false).unwrap(),
            back.forward_t(&x, false).unwrap(),
        );
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
        // Loading into another architecture names the first missing tensor.
        let other = EncoderSpec {
            head: HeadKind::Mlp { dim: 3 },
            ..spec
        };
        let err = match load_encoder(&path, Some(other), Settings::default(), &Device::Cpu) {
            Ok(_) => panic!("loading into another head must fail"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("w.safetensors") && err.contains("missing tensor `fc.0.bias`"),
            "{err}"
        );
    }

    #[test]
    fn head_detection_reads_the_v3_projector_and_rejects_unknown_layouts() {
        let spec = EncoderSpec {
            backbone: BackboneConfig::ResNet(ResNetConfig {
                width: 4,
                ..ResNetConfig::from_arch("resnet18-small").unwrap()
            }),
            head: HeadKind::V3 { hidden: 8, dim: 4 },
        };
        let (_, vars) = build(spec);
        let mut t = values(&vars);
        assert_eq!(official::detect_spec(&t).unwrap(), spec);
        t.remove("fc.4.running_mean");
        let err = official::detect_spec(&t).unwrap_err();
        assert!(err.contains("unrecognised head"), "{err}");
        let mut no_stem = t.clone();
        no_stem.remove("conv1.weight");
        assert!(official::detect_spec(&no_stem)
            .unwrap_err()
            .contains("conv1.weight"));
    }

    #[test]
    fn split_batch_norm_equals_plain_batch_norm_in_eval_and_differs_in_train() {
        let base = ResNetConfig {
            width: 4,
            ..ResNetConfig::from_arch("resnet18-small").unwrap()
        };
        let (plain, pv) = build(EncoderSpec {
            backbone: BackboneConfig::ResNet(base),
            head: HeadKind::None,
        });
        let split_spec = EncoderSpec {
            backbone: BackboneConfig::ResNet(ResNetConfig {
                bn_splits: 2,
                ..base
            }),
            head: HeadKind::None,
        };
        let tensors: HashMap<String, Tensor> = pv
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_detached_tensor().copy().unwrap()))
            .collect();
        let (split, _, _) = encoder_from_tensors(
            split_spec,
            &tensors,
            Settings::default(),
            &Device::Cpu,
            Path::new("mem"),
        )
        .unwrap();
        let x = seeded_randn(0.0, 1., (4, 3, 16, 16), 3, &Device::Cpu).unwrap();
        let (a, b) = (
            plain.features(&x, false).unwrap(),
            split.features(&x, false).unwrap(),
        );
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
        let (a, b) = (
            plain.features(&x, true).unwrap(),
            split.features(&x, true).unwrap(),
        );
        assert_ne!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn specs_written_before_vits_still_read_and_vit_specs_round_trip() {
        // The `spec` metadata of weight files written before the ViTs.
        let old = r#"{"resnet":{"depth":"R18","small":true,"in_channels":1,"width":8,"zero_init_residual":false,"bn_splits":4},"head":{"kind":"linear","dim":128}}"#;
        let spec: EncoderSpec = serde_json::from_str(old).unwrap();
        assert_eq!(spec.backbone.arch(), "resnet18-small");
        assert_eq!(serde_json::to_string(&spec).unwrap(), old);
        let vit = EncoderSpec {
            backbone: BackboneConfig::for_input("vit-32x2h2", 0, 1, 28, Some(7)).unwrap(),
            head: HeadKind::V3 { hidden: 8, dim: 4 },
        };
        let json = serde_json::to_string(&vit).unwrap();
        assert!(
            json.starts_with(r#"{"vit":{"image_size":28,"patch_size":7"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<EncoderSpec>(&json).unwrap(), vit);
        let meta = vit.metadata();
        assert_eq!(meta["arch"], "vit-32x2h2");
        assert_eq!(
            (meta["patch_size"].as_str(), meta["dim"].as_str()),
            ("7", "4")
        );
        let e = BackboneConfig::for_input("vit-32x2h2", 0, 1, 28, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("patch_size") && e.contains("28"), "{e}");
    }

    #[test]
    fn tensors_the_encoder_does_not_use_are_reported_and_left_out() {
        let spec = EncoderSpec {
            backbone: BackboneConfig::ResNet(ResNetConfig {
                width: 4,
                ..ResNetConfig::from_arch("resnet18-small").unwrap()
            }),
            head: HeadKind::Linear { dim: 3 },
        };
        let (_, vars) = build(spec);
        let mut t = values(&vars);
        t.insert(
            "predictor.0.weight".into(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        );
        let (_, loaded, unused) = encoder_from_tensors(
            spec,
            &t,
            Settings::default(),
            &Device::Cpu,
            Path::new("mem"),
        )
        .unwrap();
        assert_eq!(unused, ["predictor.0.weight"]);
        assert!(!loaded
            .data()
            .lock()
            .unwrap()
            .contains_key("predictor.0.weight"));
    }
}
