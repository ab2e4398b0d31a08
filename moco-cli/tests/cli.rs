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

#[test]
fn version_names_the_commit_and_the_features() {
    let out = Command::cargo_bin("moco")
        .unwrap()
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(
        v.starts_with(&format!("moco {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{v}"
    );
    // The features of this build (the tests build the default ones).
    for (on, name) in [
        (cfg!(feature = "onednn"), "onednn"),
        (cfg!(feature = "libjpeg"), "libjpeg"),
        (cfg!(feature = "cuda"), "cuda"),
    ] {
        assert_eq!(v.contains(name), on, "{name}: {v}");
    }
}

#[test]
fn completions_are_scripts_that_know_the_subcommands_and_flags() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = Command::cargo_bin("moco")
            .unwrap()
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        for word in ["pretrain", "linear-eval", "queue-size"] {
            assert!(script.contains(word), "{shell}: no `{word}`");
        }
        // bash itself parses its script, where bash is installed.
        if shell == "bash"
            && std::process::Command::new("bash")
                .arg("--version")
                .output()
                .is_ok()
        {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("moco.bash");
            std::fs::write(&file, script.as_bytes()).unwrap();
            let check = std::process::Command::new("bash")
                .arg("-n")
                .arg(&file)
                .output()
                .unwrap();
            assert!(
                check.status.success(),
                "{}",
                String::from_utf8_lossy(&check.stderr)
            );
        }
    }
    let out = Command::cargo_bin("moco")
        .unwrap()
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tcsh"));
}
