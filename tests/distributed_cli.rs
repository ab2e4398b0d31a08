//! `moco launch`: a data-parallel run of two CPU processes (TCP backend) on the embedded data,
//! killed (stopped by its step budget) and resumed, equal bit for bit to the uninterrupted run;
//! rank 0 alone writes the run folder. The data-parallel arithmetic itself (two ranks = one
//! process on the global batch) is checked in moco-core's `tests/dist.rs`.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;

use moco_tests::{file_tensors, moco, run_ok, SMALL_V3_HEADS, TINY_RUN, TINY_V3_RUN};

/// [`TINY_RUN`] with one data worker and a metrics line every step.
const TINY: &[&str] = &["--workers", "1", "--log-every", "1"];

fn launch(out: &Path, extra: &[&str]) -> std::process::Output {
    run_ok(
        moco()
            .args(["launch", "--nproc-per-node", "2", "--"])
            .args(TINY)
            .args(TINY_RUN)
            .args(["--out", out.to_str().unwrap()])
            .args(extra),
    )
}

fn checkpoint(run: &Path) -> Vec<(String, Vec<f32>)> {
    file_tensors(&run.join("checkpoint-last.safetensors"))
}

#[test]
fn two_processes_resumed_equal_two_processes_uninterrupted() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let o = launch(&a, &["--max-steps", "6"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    // One process reports: rank 0.
    assert_eq!(stdout.matches("finished at step 6").count(), 1, "{stdout}");
    assert_eq!(stdout.matches("\"step\":3}").count(), 1, "{stdout}");

    launch(&b, &["--max-steps", "3"]);
    launch(&b, &["--max-steps", "6", "--resume"]);
    let (ca, cb) = (checkpoint(&a), checkpoint(&b));
    assert_eq!(ca.len(), cb.len());
    for ((na, va), (nb, vb)) in ca.iter().zip(&cb) {
        assert_eq!(na, nb);
        assert!(
            va == vb,
            "`{na}` differs between the resumed and the uninterrupted run"
        );
    }
    let steps: Vec<u64> = std::fs::read_to_string(b.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["loss"].as_f64().map(|_| v["step"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
    // The rendezvous files are gone.
    for run in [&a, &b] {
        let left: Vec<String> = std::fs::read_dir(run)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".moco-dist"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}

#[test]
fn bad_launches_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    // 16 images do not split into 3 processes.
    let o = moco()
        .args(["launch", "--nproc-per-node", "3", "--"])
        .args(TINY)
        .args(TINY_RUN)
        .args(["--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("multiple of the world size"), "{err}");
    assert!(err.contains("failed") && err.contains("stopped"), "{err}");
    // SyncBN (v3's default) and BatchNorm splits exclude each other in a data-parallel run.
    let o = moco()
        .args(["launch", "--nproc-per-node", "2", "--"])
        .args(TINY)
        .args(TINY_V3_RUN)
        .args(["--preset", "v3", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--bn-splits 2") && err.contains("--sync-bn false"),
        "{err}"
    );
    // NCCL needs CUDA.
    let o = moco()
        .args(["pretrain", "--world-size", "2", "--dist-backend", "nccl"])
        .args(["--dist-init", out.join("init").to_str().unwrap()])
        .args(["--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--dist-backend nccl needs --device cuda"),
        "{err}"
    );
}

/// MoCo v3 on two processes equals MoCo v3 on one with the same global batch, because its
/// BatchNorm layers are synchronised (SyncBN, the v3 presets' default, as the official code):
/// every tensor of the checkpoint (weights, key encoder, running statistics, LARS buffers)
/// within 1e-3 of its magnitude. With `--sync-bn false` each process normalises its own half,
/// another computation, which the same comparison tells apart.
#[test]
fn moco_v3_on_two_processes_equals_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let v3 = [
        &["--preset", "v3"],
        SMALL_V3_HEADS,
        &[
            "--width",
            "4",
            "--batch-size",
            "16",
            "--subset",
            "256",
            "--knn-every",
            "0",
            "--quiet",
            "--max-steps",
            "3",
        ],
    ]
    .concat();
    let one = dir.path().join("one");
    run_ok(
        moco()
            .arg("pretrain")
            .args(TINY)
            .args(&v3)
            .args(["--out", one.to_str().unwrap()]),
    );
    let want = checkpoint(&one);
    let worst = |run: &Path| {
        let got = checkpoint(run);
        assert_eq!(got.len(), want.len());
        let mut worst = (0f32, String::new());
        for ((name, a), (nb, b)) in got.iter().zip(&want) {
            assert_eq!(name, nb);
            let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            let d = a
                .iter()
                .zip(b)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale));
            if d > worst.0 {
                worst = (d, name.clone());
            }
        }
        worst
    };
    let synced = dir.path().join("synced");
    run_ok(
        moco()
            .args(["launch", "--nproc-per-node", "2", "--"])
            .args(TINY)
            .args(&v3)
            .args(["--out", synced.to_str().unwrap()]),
    );
    let (d, name) = worst(&synced);
    eprintln!("SyncBN: worst relative difference {d:e} (`{name}`)");
    assert!(d < 1e-3, "`{name}` differs by {d} of its magnitude");
    let per_rank = dir.path().join("per-rank");
    run_ok(
        moco()
            .args(["launch", "--nproc-per-node", "2", "--"])
            .args(TINY)
            .args(&v3)
            .args(["--sync-bn", "false", "--out", per_rank.to_str().unwrap()]),
    );
    let (d, name) = worst(&per_rank);
    eprintln!("per-rank BatchNorm: worst relative difference {d:e} (`{name}`)");
    assert!(d > 1e-1, "per-rank BatchNorm matched ({d}, `{name}`)");
}
