//! Import of official MoCo checkpoints written by `tests/reference/official_checkpoint.py`
//! (torch.save in the zip and the legacy serializations, main_moco.py's layout).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use candle_core::{DType, Device};
use candle_nn::ModuleT;
use moco_models::weights::official::{import_official, import_official_as};
use moco_models::{encoder_from_tensors, Backbone, Depth, HeadKind, Settings};
use moco_testing::{max_abs_diff, reference};

fn check_features(tag: &str, file: &str) {
    let gold = moco_core::io::load(&reference("checkpoint_features.safetensors"), &Device::Cpu)
        .unwrap()
        .tensors;
    let ckpt = import_official(&reference(file)).unwrap();
    let (enc, _, unused) = encoder_from_tensors(
        ckpt.spec,
        &ckpt.encoder_q,
        Settings::default(),
        &Device::Cpu,
        &reference(file),
    )
    .unwrap();
    assert!(unused.is_empty(), "{unused:?}");
    let x = &gold[&format!("{tag}.x")];
    let feats = enc.features(x, false).unwrap();
    let embed = enc.forward_t(x, false).unwrap();
    assert!(
        max_abs_diff(&feats, &gold[&format!("{tag}.features")]) < 1e-5,
        "{file}: features"
    );
    assert!(
        max_abs_diff(&embed, &gold[&format!("{tag}.embed")]) < 1e-5,
        "{file}: head output"
    );
    // The key encoder loads into the same architecture; the queue and its pointer come along.
    encoder_from_tensors(
        ckpt.spec,
        &ckpt.encoder_k,
        Settings::default(),
        &Device::Cpu,
        &reference(file),
    )
    .unwrap();
    assert_eq!(ckpt.queue_ptr, Some(24));
}

#[test]
fn zip_checkpoint_of_a_small_resnet18_with_mlp_head() {
    let ckpt = import_official(&reference("checkpoint_small_zip.pth.tar")).unwrap();
    let r = *ckpt.spec.backbone.resnet().unwrap();
    assert_eq!(
        (r.depth, r.small, r.in_channels, r.width),
        (Depth::R18, true, 1, 4)
    );
    assert_eq!(ckpt.spec.head, HeadKind::Mlp { dim: 16 });
    assert_eq!(ckpt.queue.as_ref().unwrap().dims(), [16, 64]);
    check_features("small", "checkpoint_small_zip.pth.tar");
}

#[test]
fn legacy_checkpoint_reads_the_same_tensors_as_zip() {
    check_features("small", "checkpoint_small_legacy.pth.tar");
    let a = import_official(&reference("checkpoint_small_zip.pth.tar")).unwrap();
    let b = import_official(&reference("checkpoint_small_legacy.pth.tar")).unwrap();
    assert_eq!(a.spec, b.spec);
    assert_eq!(a.encoder_q.len(), b.encoder_q.len());
    for (k, t) in &a.encoder_q {
        let u = &b.encoder_q[k];
        assert_eq!(
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            u.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            "{k}"
        );
    }
    assert_eq!(
        max_abs_diff(a.queue.as_ref().unwrap(), b.queue.as_ref().unwrap()),
        0.0
    );
}

#[test]
fn zip_checkpoint_of_a_resnet50_with_linear_head() {
    let ckpt = import_official(&reference("checkpoint_r50_zip.pth.tar")).unwrap();
    let r = *ckpt.spec.backbone.resnet().unwrap();
    assert_eq!(
        (r.depth, r.small, r.in_channels, r.width),
        (Depth::R50, false, 3, 2)
    );
    assert_eq!(ckpt.spec.head, HeadKind::Linear { dim: 8 });
    check_features("r50", "checkpoint_r50_zip.pth.tar");
}

#[test]
fn corrupt_and_foreign_files_give_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // A truncated legacy checkpoint.
    let bytes = std::fs::read(reference("checkpoint_small_legacy.pth.tar")).unwrap();
    let cut = dir.path().join("cut.pth.tar");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = import_official(&cut).unwrap_err().to_string();
    assert!(
        err.contains("cut.pth.tar") && err.contains("truncated"),
        "{err}"
    );
    // Not a checkpoint at all.
    let junk = dir.path().join("junk.pth.tar");
    std::fs::write(&junk, b"hello, this is not a checkpoint").unwrap();
    let err = import_official(&junk).unwrap_err().to_string();
    assert!(
        err.contains("junk.pth.tar") && err.contains("not a PyTorch checkpoint"),
        "{err}"
    );
    // An empty file (an interrupted download).
    let empty = dir.path().join("empty.pth.tar");
    std::fs::write(&empty, b"").unwrap();
    let err = import_official(&empty).unwrap_err().to_string();
    assert!(
        err.contains("empty.pth.tar") && err.contains("0 bytes"),
        "{err}"
    );
    // A missing file.
    let err = import_official(&dir.path().join("missing.pth.tar"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.pth.tar"), "{err}");
}

/// `official_v3_checkpoint.py`: moco-v3's layout (`base_encoder`, `momentum_encoder`,
/// `predictor`), features of the base encoder within 1e-5 of torch's.
fn check_v3(
    tag: &str,
    file: &str,
    arch: Option<&str>,
) -> moco_models::weights::official::OfficialCheckpoint {
    let gold = moco_core::io::load(
        &reference("checkpoint_v3_features.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
    .tensors;
    let ckpt = import_official_as(&reference(file), arch).unwrap();
    let (enc, _, unused) = encoder_from_tensors(
        ckpt.spec,
        &ckpt.encoder_q,
        Settings::default(),
        &Device::Cpu,
        &reference(file),
    )
    .unwrap();
    assert!(unused.is_empty(), "{unused:?}");
    let x = &gold[&format!("{tag}.x")];
    assert!(
        max_abs_diff(
            &enc.features(x, false).unwrap(),
            &gold[&format!("{tag}.features")]
        ) < 1e-5,
        "{file}: features"
    );
    assert!(
        max_abs_diff(
            &enc.forward_t(x, false).unwrap(),
            &gold[&format!("{tag}.embed")]
        ) < 1e-5,
        "{file}: projector output"
    );
    encoder_from_tensors(
        ckpt.spec,
        &ckpt.encoder_k,
        Settings::default(),
        &Device::Cpu,
        &reference(file),
    )
    .unwrap();
    assert!(ckpt.queue.is_none() && ckpt.predictor.contains_key("0.weight"));
    ckpt
}

#[test]
fn moco_v3_vit_checkpoint_imports_with_its_projector_and_predictor() {
    // Width 32 is not a standard ViT: the number of heads comes from the name.
    let err = import_official(&reference("checkpoint_v3_vit.pth.tar"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("heads") && err.contains("vit-32x2hH"), "{err}");
    let err = import_official_as(&reference("checkpoint_v3_vit.pth.tar"), Some("vit-64x2h2"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a vit-64x2h2"), "{err}");
    let ckpt = check_v3("vit", "checkpoint_v3_vit.pth.tar", Some("vit-32x2h2"));
    assert_eq!(ckpt.spec.backbone.arch(), "vit-32x2h2");
    let moco_models::BackboneConfig::Vit(v) = ckpt.spec.backbone else {
        panic!("not a ViT: {:?}", ckpt.spec)
    };
    assert_eq!(
        (
            v.image_size,
            v.patch_size,
            v.in_channels,
            v.embed_dim,
            v.depth,
            v.mlp_ratio
        ),
        (16, 4, 3, 32, 2, 4)
    );
    assert_eq!(
        ckpt.spec.head,
        HeadKind::V3 {
            hidden: 48,
            dim: 16
        }
    );
    // The predictor ends in a BatchNorm on a ViT.
    assert!(ckpt.predictor.contains_key("4.running_var"));
}

#[test]
fn moco_v3_resnet_checkpoint_imports_with_its_projector() {
    let ckpt = check_v3("r18", "checkpoint_v3_r18.pth.tar", None);
    let r = *ckpt.spec.backbone.resnet().unwrap();
    assert_eq!(
        (r.depth, r.small, r.in_channels, r.width),
        (Depth::R18, true, 1, 4)
    );
    assert_eq!(ckpt.spec.head, HeadKind::V3 { hidden: 24, dim: 8 });
}
