//! The `moco` binary, driven as a user would.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use assert_cmd::Command;

#[test]
fn config_prints_the_resolved_preset() {
    let out = Command::cargo_bin("moco")
        .unwrap()
        .args(["config", "--preset", "cifar"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["queue_size"], 4096);
    assert_eq!(v["momentum"], 0.99);
    assert_eq!(v["preset"], "cifar");
}

#[test]
fn an_unknown_preset_is_a_clear_error() {
    let out = Command::cargo_bin("moco")
        .unwrap()
        .args(["config", "--preset", "v9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--preset") && err.contains("v9"), "{err}");
}

#[test]
fn tf32_off_cuda_is_refused_by_every_command_that_takes_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();
    for args in [
        vec!["pretrain", "--tf32", "--out", out],
        vec!["knn", "--tf32", "--weights", out],
        vec!["linear-eval", "--tf32", "--weights", out, "--out", out],
        vec![
            "extract",
            "--tf32",
            "--weights",
            out,
            "--input",
            out,
            "--out",
            out,
        ],
        vec!["bench", "step", "--tf32", "--steps", "1"],
    ] {
        let res = Command::cargo_bin("moco")
            .unwrap()
            .args(&args)
            .output()
            .unwrap();
        assert!(!res.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(
            err.contains("--tf32 applies to --device cuda only, not --device cpu"),
            "{args:?}: {err}"
        );
    }
    assert!(!dir.path().join("run").exists(), "nothing written");
}

#[test]
fn a_bad_or_unbuilt_cudnn_batch_norm_switch_is_an_error_naming_it() {
    for (value, want) in [
        ("2", "MOCO_CUDNN_BN=2: expected 0 or 1"),
        ("1", "MOCO_CUDNN_BN=1: this build has no cuDNN"),
    ] {
        let res = Command::cargo_bin("moco")
            .unwrap()
            .env("MOCO_CUDNN_BN", value)
            .args(["config"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(
            !res.status.success() && err.contains(want),
            "{value}: {err}"
        );
    }
    let res = Command::cargo_bin("moco")
        .unwrap()
        .env("MOCO_CUDNN_BN", "0")
        .args(["config"])
        .output()
        .unwrap();
    assert!(res.status.success());
}
