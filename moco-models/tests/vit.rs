//! moco-models' ViT against timm. Golden values: `tests/reference/vit_golden.py` (torch + timm
//! 0.4.12, float64), committed as `tests/reference/vit_golden.safetensors` with the weights.
//!
//! Tolerance: max |rust - torch| <= 1e-4 * max |torch| for every compared tensor (float32
//! against float64). Measured: 2.4e-7 on the eval outputs, 1.6e-6 on the train-mode output
//! (the projector's BatchNorms), 1.8e-6 to 4.7e-6 on the gradients.
//!
//! Each network runs twice: in float32, where the CPU runs moco-rs's fused kernels, and in
//! float64, where it runs candle's generic ops, the path of CUDA and Metal (same tolerance).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use moco_models::{
    encoder, encoder_from_tensors, Backbone, BackboneConfig, Encoder, EncoderSpec, HeadKind,
    Settings, VitConfig,
};
use moco_testing::{golden, to_f64};

const TOL: f64 = 1e-4;

fn assert_close(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let (a, b) = (to_f64(a), to_f64(b));
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
    let err = a
        .iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        err <= TOL * scale,
        "{what}: max abs error {err:e} vs scale {scale:e} (tolerance {TOL:e})"
    );
}

/// The network `spec` with `weights`, in `dtype`: float32 through `encoder_from_tensors` (the
/// loading path of the commands; it also checks that every weight is used), float64 through a
/// variable map of float64 weights (candle's generic ops).
fn build(spec: EncoderSpec, weights: &HashMap<String, Tensor>, dtype: DType) -> (Encoder, VarMap) {
    if dtype == DType::F32 {
        let (enc, vars, unused) = encoder_from_tensors(
            spec,
            weights,
            Settings::default(),
            &Device::Cpu,
            Path::new("golden"),
        )
        .unwrap();
        assert!(unused.is_empty(), "{unused:?}");
        return (enc, vars);
    }
    let vars = VarMap::new();
    {
        let mut data = vars.data().lock().unwrap();
        for (k, t) in weights {
            data.insert(
                k.clone(),
                Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap(),
            );
        }
    }
    let count = vars.all_vars().len();
    let enc = encoder(
        spec,
        Settings::default(),
        VarBuilder::from_varmap(&vars, dtype, &Device::Cpu),
    )
    .unwrap();
    assert_eq!(
        vars.all_vars().len(),
        count,
        "the network created a variable"
    );
    (enc, vars)
}

fn spec() -> EncoderSpec {
    EncoderSpec {
        backbone: BackboneConfig::Vit(VitConfig {
            image_size: 16,
            patch_size: 4,
            in_channels: 3,
            embed_dim: 32,
            depth: 2,
            num_heads: 4,
            mlp_ratio: 4,
            stop_grad_patch_embed: false,
            conv_stem: false,
        }),
        head: HeadKind::V3 {
            hidden: 48,
            dim: 16,
        },
    }
}

#[test]
fn vit_with_v3_projector_matches_timm() {
    let gold = golden("vit_golden.safetensors");
    let g = |k: &str| gold.get(k).unwrap_or_else(|| panic!("missing {k}")).clone();
    let weights: HashMap<String, Tensor> = gold
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("w.").map(|n| (n.to_string(), v.clone())))
        .collect();
    // Every timm name is a variable of ours; the fixed position embedding is checked, not used.
    let (enc, _, unused) = encoder_from_tensors(
        spec(),
        &weights,
        Settings::default(),
        &Device::Cpu,
        Path::new("vit_golden"),
    )
    .unwrap();
    assert!(unused.is_empty(), "{unused:?}");
    let moco_models::Net::Vit(vit) = enc.backbone() else {
        panic!("not a ViT")
    };
    assert_close("pos_embed", vit.pos_embed(), &g("w.pos_embed"));
    // A different (learned) position embedding is refused.
    let mut learned = weights.clone();
    learned.insert("pos_embed".into(), (g("w.pos_embed") * 1.01).unwrap());
    let err = match encoder_from_tensors(
        spec(),
        &learned,
        Settings::default(),
        &Device::Cpu,
        Path::new("learned"),
    ) {
        Ok(_) => panic!("a learned position embedding must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("learned") && err.contains("pos_embed"),
        "{err}"
    );

    for dtype in [DType::F32, DType::F64] {
        check_vit(&gold, &weights, dtype);
    }
}

fn check_vit(gold: &HashMap<String, Tensor>, weights: &HashMap<String, Tensor>, dtype: DType) {
    let g = |k: &str| {
        gold.get(k)
            .unwrap_or_else(|| panic!("missing {k}"))
            .to_dtype(dtype)
            .unwrap()
    };
    let (enc, vars) = build(spec(), weights, dtype);
    let x = g("x");
    let check = |what: &str, a: &Tensor, b: &Tensor| {
        assert_eq!(a.dtype(), dtype, "{what} {dtype:?}");
        assert_close(&format!("{what} {dtype:?}"), a, b);
    };
    check(
        "features_eval",
        &enc.features(&x, false).unwrap(),
        &g("features_eval"),
    );
    check(
        "out_eval",
        &enc.forward_t(&x, false).unwrap(),
        &g("out_eval"),
    );

    let xv = Var::from_tensor(&x).unwrap();
    let y = enc.forward_t(xv.as_tensor(), true).unwrap();
    check("out_train", &y, &g("out_train"));
    let grads = (y * g("r")).unwrap().sum_all().unwrap().backward().unwrap();
    check("grad.x", grads.get(xv.as_tensor()).unwrap(), &g("grad.x"));
    let data = vars.data().lock().unwrap();
    for name in [
        "patch_embed.proj.weight",
        "cls_token",
        "blocks.0.attn.qkv.weight",
        "blocks.1.mlp.fc2.weight",
        "head.0.weight",
    ] {
        let grad = grads.get(data[name].as_tensor()).unwrap();
        check(&format!("grad.{name}"), grad, &g(&format!("grad.{name}")));
    }
    // Train mode moved the projector's running statistics as torch's did (momentum 0.1).
    let rv = data["head.7.running_var"].as_tensor().clone();
    assert_ne!(to_f64(&rv), to_f64(&g("w.head.7.running_var")));
}

#[test]
fn wrong_input_size_is_an_error_naming_the_expected_shape() {
    let gold = golden("vit_golden.safetensors");
    let weights: HashMap<String, Tensor> = gold
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("w.").map(|n| (n.to_string(), v.clone())))
        .collect();
    let (enc, _, _) = encoder_from_tensors(
        spec(),
        &weights,
        Settings::default(),
        &Device::Cpu,
        Path::new("vit_golden"),
    )
    .unwrap();
    let x = Tensor::zeros((2, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    let err = enc.forward_t(&x, false).unwrap_err().to_string();
    assert!(err.contains("(N, 3, 16, 16)"), "{err}");
}

/// MoCo v3's convolutional stem (`vit_conv_*`) against timm + the stem of
/// `tests/reference/mocov3.py` (`vit_conv_golden.py`, float64): the official 16x16-patch stem
/// with the v3 projector, and a 4x4-patch stem on one-channel images. The spec read off the
/// weights is the one built; eval features, train-mode output, gradients wrt the input and the
/// stem's first and last convolutions, and the stem's running statistics after the train-mode
/// pass, within the same tolerance.
#[test]
fn vit_with_the_convolutional_stem_matches_timm() {
    let gold = golden("vit_conv_golden.safetensors");
    for dtype in [DType::F32, DType::F64] {
        check_conv_stem(&gold, dtype);
    }
}

fn check_conv_stem(gold: &HashMap<String, Tensor>, dtype: DType) {
    for (prefix, image_size, patch_size, in_channels, head, last) in [
        (
            "p16",
            48,
            16,
            3,
            HeadKind::V3 {
                hidden: 48,
                dim: 16,
            },
            12,
        ),
        ("p4", 16, 4, 1, HeadKind::None, 6),
    ] {
        let g = |k: &str| {
            gold.get(&format!("{prefix}.{k}"))
                .unwrap_or_else(|| panic!("missing {prefix}.{k}"))
                .to_dtype(dtype)
                .unwrap()
        };
        let weights: HashMap<String, Tensor> = gold
            .iter()
            .filter_map(|(k, v)| {
                let n = k.strip_prefix(prefix)?.strip_prefix(".w.")?;
                Some((n.to_string(), v.clone()))
            })
            .collect();
        let spec = EncoderSpec {
            backbone: BackboneConfig::Vit(VitConfig {
                image_size,
                patch_size,
                in_channels,
                embed_dim: 32,
                depth: 2,
                num_heads: 4,
                mlp_ratio: 4,
                stop_grad_patch_embed: false,
                conv_stem: true,
            }),
            head,
        };
        let detected = moco_models::weights::official::detect_vit(&weights, Some(4)).unwrap();
        assert_eq!(detected, spec, "{prefix}: spec read off the weights");
        let (enc, vars) = build(spec, &weights, dtype);
        let tag = format!("{prefix} {dtype:?}");
        let x = g("x");
        assert_close(
            &format!("{tag} features_eval"),
            &enc.features(&x, false).unwrap(),
            &g("features_eval"),
        );
        let xv = Var::from_tensor(&x).unwrap();
        let y = enc.forward_t(xv.as_tensor(), true).unwrap();
        assert_eq!(y.dtype(), dtype, "{tag}: output dtype");
        assert_close(&format!("{tag} out_train"), &y, &g("out_train"));
        let grads = (y * g("r")).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close(
            &format!("{tag} grad.x"),
            grads.get(xv.as_tensor()).unwrap(),
            &g("grad.x"),
        );
        let data = vars.data().lock().unwrap();
        for name in [
            "patch_embed.proj.0.weight".to_string(),
            format!("patch_embed.proj.{last}.weight"),
        ] {
            let grad = grads.get(data[&name].as_tensor()).unwrap();
            assert_close(
                &format!("{tag} grad.{name}"),
                grad,
                &g(&format!("grad.{name}")),
            );
        }
        let mut moved = 0;
        for (k, v) in gold {
            if let Some(name) = k
                .strip_prefix(prefix)
                .and_then(|k| k.strip_prefix(".after."))
            {
                assert_close(&format!("{tag} {name}"), data[name].as_tensor(), v);
                moved += 1;
            }
        }
        assert_eq!(moved, 2 * (last / 3), "{tag}: running statistics compared");
    }
}
