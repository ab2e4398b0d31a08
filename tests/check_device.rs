//! `moco check-device`: one MoCo step on a device next to the same step on the CPU. Here (no
//! GPU) the CPU is compared with itself: the two runs must agree bit for bit, which is also the
//! determinism a resumed run relies on (the convolution's weight gradient sums over samples in a
//! fixed order).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use moco_tests::{moco, run_ok};

#[test]
fn the_same_step_twice_on_the_cpu_is_bit_identical() {
    let o = run_ok(moco().args([
        "check-device",
        "--device",
        "cpu",
        "--width",
        "8",
        "--image-size",
        "16",
        "--batch-size",
        "16",
        "--tolerance",
        "0",
    ]));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("largest relative difference 0.00e0"), "{out}");
    // A backend not compiled in is an error naming the feature.
    let o = moco()
        .args(["check-device", "--device", "metal"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--features metal"));
}

#[test]
fn a_one_process_group_leaves_the_step_unchanged() {
    // The single-GPU NCCL check (`--dist nccl`), here with the TCP backend on the CPU: the step
    // through every collective equals the plain step bit for bit.
    let o = run_ok(
        moco()
            .args(["check-device", "--device", "cpu", "--dist", "tcp"])
            .args(["--width", "4", "--image-size", "16", "--batch-size", "8"])
            .args(["--tolerance", "0"]),
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("tcp: all_reduce, all_gather and broadcast"),
        "{out}"
    );
    assert!(out.contains("largest relative difference 0.00e0"), "{out}");
    // NCCL not compiled in: an error naming the feature.
    let o = moco()
        .args(["check-device", "--device", "cpu", "--dist", "nccl"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--features nccl"), "{err}");
}

#[test]
fn sync_bn_over_two_ranks_matches_one_process() {
    // The GPU check of SyncBN (`--sync-bn`: two ranks sharing the device over TCP, against one
    // CPU process on the whole batch), here with the CPU as the device: the fused kernels'
    // synchronised path against the plain one.
    let o = run_ok(
        moco()
            .args(["check-device", "--device", "cpu", "--sync-bn"])
            .args(["--width", "4", "--image-size", "16", "--batch-size", "8"]),
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("one MoCo v3 step with SyncBN over 2 ranks"),
        "{out}"
    );
    // An odd batch does not split into the two ranks.
    let o = moco()
        .args([
            "check-device",
            "--device",
            "cpu",
            "--sync-bn",
            "--batch-size",
            "7",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--batch-size 7"));
}

/// `--generic`: the device side runs on the CPU through candle's generic ops, the ops a CUDA or
/// Metal step runs (BatchNorm, pooling, residual ends, convolution, attention, LayerNorm, GELU,
/// the loss: every fused CPU kernel switched off), against moco-rs's CPU kernels. This is the
/// GPU's computation tested on a machine without one: for the ResNet (v2 head, shuffle-BN,
/// max pool), the ViT, and SyncBN over two ranks with the ResNet and the conv-stem ViT.
/// Tolerance 2e-4 relative: the two sides differ only in rounding (measured over seeds 0-4 at
/// these sizes: 1.1e-6 to 4.4e-5); an error of 1e-3 in one generic op (GELU scaled by 1.001)
/// fails it at 1.5e-3.
#[test]
fn generic_ops_match_the_cpu_kernels() {
    for args in [
        &["--width", "8", "--image-size", "16"][..],
        &["--arch", "resnet18", "--width", "8", "--image-size", "32"],
        &["--arch", "vit-32x2h4", "--image-size", "16"],
        &["--sync-bn", "--width", "8", "--image-size", "16"],
        &[
            "--sync-bn",
            "--arch",
            "vit-conv-32x2h4",
            "--image-size",
            "16",
        ],
    ] {
        let o = run_ok(
            moco()
                .args(["check-device", "--device", "cpu", "--generic"])
                .args(["--batch-size", "8", "--tolerance", "2e-4"])
                .args(args),
        );
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("on the CPU's generic ops vs the CPU"), "{out}");
    }
    // The switch, for any command: MOCO_CPU_KERNELS.
    let o = moco()
        .env("MOCO_CPU_KERNELS", "gpu")
        .args(["check-device", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("MOCO_CPU_KERNELS") && err.contains("`generic`"),
        "{err}"
    );
}
