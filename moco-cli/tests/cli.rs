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
