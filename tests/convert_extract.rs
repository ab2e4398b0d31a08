//! `moco convert` and `moco extract` on official-layout checkpoints and real photos, against
//! torch/torchvision (`tests/reference/official_checkpoint.py`, `transforms_golden.py`).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use candle_core::Device;
use moco_testing::max_abs_diff;
use moco_tests::{moco, reference};

fn run(args: &[&str]) -> std::process::Output {
    let out = moco().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "moco {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn both_serializations_convert_to_the_same_encoder_with_torchvision_features() {
    let dir = tempfile::tempdir().unwrap();
    let gold = moco_core::io::load(&reference("checkpoint_features.safetensors"), &Device::Cpu)
        .unwrap()
        .tensors;
    let mut outputs = vec![];
    for (i, src) in [
        "checkpoint_small_zip.pth.tar",
        "checkpoint_small_legacy.pth.tar",
    ]
    .iter()
    .enumerate()
    {
        let out = dir.path().join(format!("m{i}.safetensors"));
        let o = run(&[
            "convert",
            "--input",
            reference(src).to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("resnet18-small with mlp head (dim 16)")
        );
        let file = moco_core::io::load(&out, &Device::Cpu).unwrap();
        assert_eq!(file.meta("arch").unwrap(), "resnet18-small");
        assert_eq!(file.meta("head").unwrap(), "mlp");
        assert_eq!(file.meta("dim").unwrap(), "16");
        assert!(
            file.tensors.contains_key("layer1.0.conv1.weight")
                && file.tensors.contains_key("fc.2.weight")
        );
        // Same features as the torchvision model the checkpoint came from.
        let (enc, _) =
            moco_models::load_encoder(&out, None, moco_models::Settings::default(), &Device::Cpu)
                .unwrap();
        let x = &gold["small.x"];
        let f = moco_models::Backbone::features(&enc, x, false).unwrap();
        assert!(max_abs_diff(&f, &gold["small.features"]) < 1e-5);
        outputs.push(f);
    }
    assert_eq!(
        max_abs_diff(&outputs[0], &outputs[1]),
        0.0,
        "zip and legacy give the same encoder"
    );
}

#[test]
fn moco_v3_vit_checkpoint_converts_with_timm_features() {
    let dir = tempfile::tempdir().unwrap();
    let gold = moco_core::io::load(
        &reference("checkpoint_v3_features.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
    .tensors;
    let input = reference("checkpoint_v3_vit.pth.tar");
    let out = dir.path().join("vit.safetensors");
    // The width-32 test ViT is not a standard one: the heads must be named.
    let o = moco()
        .args([
            "convert",
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("vit-32x2hH"));
    let o = run(&[
        "convert",
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--arch",
        "vit-32x2h2",
    ]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("vit-32x2h2 with v3 head (dim 16)"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let (enc, _) =
        moco_models::load_encoder(&out, None, moco_models::Settings::default(), &Device::Cpu)
            .unwrap();
    let f = moco_models::Backbone::features(&enc, &gold["vit.x"], false).unwrap();
    assert!(max_abs_diff(&f, &gold["vit.features"]) < 1e-5);
}

#[test]
fn extract_matches_torchvision_on_real_photos() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("r50.safetensors");
    run(&[
        "convert",
        "--input",
        reference("checkpoint_r50_zip.pth.tar").to_str().unwrap(),
        "--out",
        weights.to_str().unwrap(),
    ]);
    // The reference covers the PNG photos (JPEG decoders differ by a few levels).
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    for name in ["coffee.png", "astronaut_rgba.png", "chelsea_gray.png"] {
        std::fs::copy(reference("images").join(name), images.join(name)).unwrap();
    }
    let feats = dir.path().join("features.safetensors");
    run(&[
        "extract",
        "--weights",
        weights.to_str().unwrap(),
        "--input",
        images.to_str().unwrap(),
        "--out",
        feats.to_str().unwrap(),
        "--image-size",
        "64",
        "--batch-size",
        "2",
    ]);
    let mut file = moco_core::io::load(&feats, &Device::Cpu).unwrap();
    assert_eq!(
        file.meta("files").unwrap(),
        "astronaut_rgba.png,chelsea_gray.png,coffee.png"
    );
    let got = file.take("features").unwrap();
    let gold = moco_testing::golden("transforms_golden.safetensors");
    let want = &gold["extract.features"];
    let scale = max_abs_diff(want, &want.zeros_like().unwrap());
    let err = max_abs_diff(&got, want);
    assert!(
        err <= 1e-4 * scale,
        "features: max error {err} (scale {scale})"
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pth.tar");
    std::fs::write(&junk, b"junk").unwrap();
    let o = moco()
        .args([
            "convert",
            "--input",
            junk.to_str().unwrap(),
            "--out",
            "x.safetensors",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--input") && err.contains("junk.pth.tar"),
        "{err}"
    );

    let o = moco()
        .args([
            "extract",
            "--weights",
            "nope.safetensors",
            "--input",
            ".",
            "--out",
            "f.safetensors",
            "--device",
            "cuda",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--device cuda") && err.contains("--features cuda"),
        "{err}"
    );
}
