//! `moco pretrain` end to end: the run directory, a killed-and-resumed run equal to an
//! uninterrupted one, clear errors before any training, evaluation of a run (and a killed
//! linear evaluation resumed).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::Device;
use moco_core::init::seeded_randn;
use moco_tests::{
    file_tensors, moco, run_ok, SMALL_V3_HEADS, TINY_FOLDER_RUN, TINY_RUN, TINY_V3_RUN,
};

/// A tiny, fast configuration on the embedded data: `moco pretrain` with [`TINY_RUN`], 2
/// epochs, 2 data workers.
const TINY: &[&str] = &["pretrain", "--epochs", "2", "--workers", "2"];

fn pretrain(out: &Path, extra: &[&str]) -> std::process::Output {
    pretrain_on(TINY_RUN, out, extra)
}

/// [`pretrain`] with `base` in place of [`TINY_RUN`] (e.g. [`TINY_V3_RUN`]).
fn pretrain_on(base: &[&str], out: &Path, extra: &[&str]) -> std::process::Output {
    run_ok(
        moco()
            .args(TINY)
            .args(base)
            .args(["--out", out.to_str().unwrap()])
            .args(extra),
    )
}

/// Starts `cmd`, kills it (SIGKILL) as soon as `file` exists (within 2 minutes), and asserts
/// that the file was written.
fn kill_once_written(cmd: &mut std::process::Command, file: &Path) {
    let mut child = cmd.spawn().unwrap();
    let t0 = Instant::now();
    while !file.exists() && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(file.exists(), "{} was not written", file.display());
}

/// Asserts that two checkpoints hold the same tensors, bit for bit.
fn assert_same_tensors(ta: &[(String, Vec<f32>)], tb: &[(String, Vec<f32>)]) {
    assert_eq!(ta.len(), tb.len());
    for ((ka, va), (kb, vb)) in ta.iter().zip(tb) {
        assert_eq!(ka, kb);
        assert!(
            va == vb,
            "`{ka}` differs between the uninterrupted and the resumed run"
        );
    }
}

/// Trains run `a` ([`pretrain_on`] `base` with `flags`) for `steps` steps and run `b` for half
/// as many, then resumes `b` to `steps`; asserts that both end with the same checkpoint and
/// returns its tensors.
fn resumed_equals_uninterrupted(
    a: &Path,
    b: &Path,
    base: &[&str],
    flags: &[&str],
    steps: u32,
) -> Vec<(String, Vec<f32>)> {
    let (all, half) = (steps.to_string(), (steps / 2).to_string());
    pretrain_on(base, a, &[flags, &["--max-steps", &all]].concat());
    pretrain_on(base, b, &[flags, &["--max-steps", &half]].concat());
    pretrain_on(base, b, &["--resume", "--max-steps", &all]);
    let ta = file_tensors(&a.join("checkpoint-last.safetensors"));
    assert_same_tensors(&ta, &file_tensors(&b.join("checkpoint-last.safetensors")));
    ta
}

#[test]
fn a_run_directory_holds_config_metrics_and_an_atomic_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = pretrain(&run, &["--max-steps", "12", "--log-every", "4"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("finished at step 12") && stdout.contains("kNN top-1"),
        "{stdout}"
    );

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["width"], 4);
    assert_eq!(config["moco"]["queue_size"], 64);
    assert_eq!(config["dataset"], "default");

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<u64> = lines
        .iter()
        .filter_map(|l| l["loss"].as_f64().map(|_| l["step"].as_u64().unwrap()))
        .collect();
    assert_eq!(steps, [4, 8, 12]);
    for key in ["loss", "acc1", "acc5", "lr", "images_per_s", "epoch"] {
        assert!(
            lines[0].get(key).is_some(),
            "metrics line lacks {key}: {}",
            lines[0]
        );
    }

    let f = moco_core::io::load(&run.join("checkpoint-last.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(f.metadata["step"], "12");
    assert_eq!(f.metadata["arch"], "resnet18-small");
    for key in [
        "encoder_q.conv1.weight",
        "encoder_k.conv1.weight",
        "encoder_q.fc.weight",
        "queue",
        "queue_ptr",
        "optimizer.momentum_buffer.conv1.weight",
    ] {
        assert!(f.tensors.contains_key(key), "checkpoint lacks {key}");
    }
    assert!(!f.tensors.contains_key("encoder_k.fc.bias.nope"));
    // No temporary file is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty());

    // Without --resume, the same --out is refused; with it, a finished budget is a no-op.
    let o = moco()
        .args(TINY)
        .args(TINY_RUN)
        .args(["--out", run.to_str().unwrap(), "--max-steps", "12"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
}

#[test]
fn keep_every_keeps_epoch_checkpoints_that_evaluate() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // 256 images in batches of 16: 16 steps per epoch, 2 epochs.
    pretrain(&run, &["--keep-every", "1"]);
    let first = run.join("checkpoint-epoch-0001.safetensors");
    let meta = moco_core::io::load(&first, &Device::Cpu).unwrap().metadata;
    assert_eq!(meta["step"], "16");
    assert_same_tensors(
        &file_tensors(&run.join("checkpoint-epoch-0002.safetensors")),
        &file_tensors(&run.join("checkpoint-last.safetensors")),
    );
    assert!(!run.join("checkpoint-epoch-0003.safetensors").exists());
    run_ok(moco().args(["knn", "--weights", first.to_str().unwrap(), "--k", "20"]));
    // Without the flag, only checkpoint-last.
    let plain = dir.path().join("plain");
    pretrain(&plain, &[]);
    assert!(!plain.join("checkpoint-epoch-0001.safetensors").exists());
}

#[test]
fn the_knn_monitor_runs_every_epoch_except_on_folders_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    // A tiny ImageFolder: the reference photos, two classes, the same files in train and val.
    let data = moco_tests::photo_folder(&dir.path().join("data"), &["train", "val"]);
    let knn_lines = |run: &Path| {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("knn_top1"))
            .count()
    };
    let folder = |run: &Path, extra: &[&str]| {
        run_ok(
            moco()
                .args(["pretrain", "--data-dir", data.to_str().unwrap()])
                .args(TINY_FOLDER_RUN)
                .args(["--epochs", "2", "--workers", "1"])
                .args(["--out", run.to_str().unwrap()])
                .args(extra),
        )
    };
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    folder(&a, &[]);
    assert_eq!(
        knn_lines(&a),
        1,
        "a folder dataset: the monitor at the end only"
    );
    folder(&b, &["--knn-every", "1"]);
    assert_eq!(knn_lines(&b), 2);
    // Elsewhere every epoch by default.
    let c = dir.path().join("c");
    run_ok(
        moco()
            .args([
                "pretrain",
                "--epochs",
                "2",
                "--subset",
                "128",
                "--batch-size",
                "64",
            ])
            .args([
                "--width",
                "4",
                "--queue-size",
                "128",
                "--out",
                c.to_str().unwrap(),
            ]),
    );
    assert_eq!(knn_lines(&c), 2);
}

#[test]
fn a_killed_and_resumed_run_equals_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let budget = ["--max-steps", "10", "--checkpoint-every", "1"];
    pretrain(&a, &budget);

    // Run b is killed (SIGKILL) once it has written a checkpoint, then resumed.
    let ckpt = b.join("checkpoint-last.safetensors");
    kill_once_written(
        moco()
            .args(TINY)
            .args(TINY_RUN)
            .args(["--out", b.to_str().unwrap()])
            .args(budget),
        &ckpt,
    );
    let killed_at = moco_core::io::load(&ckpt, &Device::Cpu).unwrap().metadata["step"].clone();
    eprintln!("killed after step {killed_at}");
    // What else a kill can leave: a half-written temporary file; and a lost config.json (the
    // checkpoint holds the configuration too).
    let json = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let config = json(&b.join("config.json"));
    std::fs::remove_file(b.join("config.json")).unwrap();
    let stale = b.join(".checkpoint-last.safetensors.tmp-999999");
    std::fs::write(&stale, b"half a checkpoint").unwrap();
    pretrain(&b, &["--resume", "--max-steps", "10"]);

    assert_same_tensors(
        &file_tensors(&a.join("checkpoint-last.safetensors")),
        &file_tensors(&ckpt),
    );
    assert!(!stale.exists(), "the stale temporary file is still there");
    assert_eq!(json(&b.join("config.json")), config, "config.json restored");
    // TensorBoard's files hold the same curves as metrics.jsonl, each step once, although the
    // killed process had logged steps past its checkpoint.
    assert_tensorboard_matches_metrics(&b);
}

/// `run/tb` holds exactly the numbers of `run/metrics.jsonl` (but `epoch`, `step` and `event`
/// records), each at its step, once, as float32.
fn assert_tensorboard_matches_metrics(run: &Path) {
    use moco_cli::tensorboard::{event_files, read_events};
    let mut want: Vec<(String, i64, f32)> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("event").is_none())
        .flat_map(|r| {
            let step = r["step"].as_i64().unwrap();
            r.as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "epoch" | "step"))
                .filter_map(|(k, v)| Some((k.clone(), step, v.as_f64()? as f32)))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut got = vec![];
    for f in event_files(&run.join("tb")).unwrap() {
        let bytes = std::fs::read(&f).unwrap();
        for e in read_events(&f, &bytes).unwrap().0 {
            for v in e.summary.iter().flat_map(|s| &s.value) {
                got.push((v.tag.clone(), e.step, v.simple_value.unwrap()));
            }
        }
    }
    let key = |x: &(String, i64, f32)| (x.0.clone(), x.1);
    want.sort_by_key(key);
    got.sort_by_key(key);
    assert!(!want.is_empty());
    assert_eq!(got, want, "tb/ and metrics.jsonl differ");
}

#[test]
fn moco_v3_trains_with_lars_and_a_predictor_resumes_exactly_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let v3 = [&["--preset", "v3", "--width", "4"], SMALL_V3_HEADS].concat();
    let ta = resumed_equals_uninterrupted(&a, &b, TINY_V3_RUN, &v3, 6);
    let names: Vec<&str> = ta.iter().map(|(k, _)| k.as_str()).collect();
    // The predictor trains with the query encoder (and has LARS buffers); the key has none.
    assert!(names.contains(&"encoder_q.predictor.0.weight"), "{names:?}");
    assert!(names.contains(&"optimizer.momentum_buffer.predictor.0.weight"));
    assert!(!names.iter().any(|n| n.starts_with("encoder_k.predictor")));
    assert!(!names.contains(&"queue"), "v3 has no queue");
    assert!(
        names.contains(&"encoder_q.fc.4.running_mean"),
        "v3 projector, last BN"
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["moco"]["loss"], "in_batch");
    assert_eq!(config["moco"]["lars"], 0.001);
    assert_eq!(config["moco"]["sync_bn"], true);
    assert_eq!(config["zero_init_residual"], true);
    // As the official v3 code, the ResNet starts with the last BatchNorm of each block at zero.
    let z = dir.path().join("z");
    pretrain_on(TINY_V3_RUN, &z, &[&v3[..], &["--max-steps", "0"]].concat());
    let start = file_tensors(&z.join("checkpoint-last.safetensors"));
    let get = |name: &str| &start.iter().find(|(k, _)| k == name).unwrap().1;
    assert!(get("encoder_q.layer1.0.bn2.weight")
        .iter()
        .all(|&v| v == 0.0));
    assert!(get("encoder_q.layer4.1.bn2.weight")
        .iter()
        .all(|&v| v == 0.0));
    assert!(get("encoder_q.layer1.0.bn1.weight")
        .iter()
        .all(|&v| v == 1.0));
    assert!(get("encoder_k.layer2.0.bn2.weight")
        .iter()
        .all(|&v| v == 0.0));
    // lr 0.6 per 256 images at batch 16, warming up over half an epoch.
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(a.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let lr = first["lr"].as_f64().unwrap();
    assert!(lr > 0.0 && lr < 0.6 * 16.0 / 256.0, "{first}");
    // The backbone evaluates from the run folder; the predictor is left out of the encoder.
    let o = moco()
        .args(["knn", "--weights", a.to_str().unwrap(), "--workers", "2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_vit_trains_with_adamw_and_a_frozen_patch_projection_resumes_exactly_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    // MoCo v3's ViT recipe on 28x28 crops cut into 7x7 patches (16 tokens + the class token).
    let vit = [
        &[
            "--preset",
            "v3-vit",
            "--arch",
            "vit-32x2h2",
            "--patch-size",
            "7",
        ],
        SMALL_V3_HEADS,
    ]
    .concat();
    let ta = resumed_equals_uninterrupted(&a, &b, TINY_V3_RUN, &vit, 4);
    let names: Vec<&str> = ta.iter().map(|(k, _)| k.as_str()).collect();
    for name in [
        "encoder_q.blocks.1.attn.qkv.weight",
        // MoCo_ViT: a 3-layer projector under `head`, a predictor ending in a BatchNorm.
        "encoder_q.head.7.running_var",
        "encoder_q.predictor.4.running_var",
        // AdamW's state, torch's names.
        "optimizer.exp_avg.blocks.0.attn.qkv.weight",
        "optimizer.exp_avg_sq.head.0.weight",
        "optimizer.step.predictor.0.weight",
    ] {
        assert!(names.contains(&name), "no {name} in {names:?}");
    }
    // The frozen patch projection gets no gradient, so AdamW holds no state for it.
    assert!(!names
        .iter()
        .any(|n| n.starts_with("optimizer.") && n.contains("patch_embed")));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["moco"]["optimizer"], "adamw");
    assert_eq!(config["stop_grad_conv1"], true);

    // Export: timm names with the fixed position embedding; the folder loads back.
    let out = dir.path().join("export");
    let (a, out_arg) = (a.to_str().unwrap(), out.to_str().unwrap());
    run_ok(moco().args(["export", "--run", a, "--out", out_arg]));
    let model = moco_core::io::load(&out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(model.tensors.contains_key("pos_embed"));
    assert!(model.tensors.keys().all(|k| !k.starts_with("head.")));
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("VisionTransformer(img_size=28, patch_size=7"),
        "{card}"
    );
    run_ok(moco().args(["knn", "--weights", out_arg, "--workers", "2"]));
}

#[test]
fn a_vit_with_the_convolutional_stem_trains_it_resumes_exactly_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    // MoCo v3's convolutional stem for 4x4 patches of 28x28 crops: two stride-2 3x3 layers.
    let vit = [
        &[
            "--preset",
            "v3-vit",
            "--arch",
            "vit-conv-32x2h2",
            "--patch-size",
            "4",
        ],
        SMALL_V3_HEADS,
    ]
    .concat();
    let ta = resumed_equals_uninterrupted(&a, &b, TINY_V3_RUN, &vit, 4);
    let names: Vec<&str> = ta.iter().map(|(k, _)| k.as_str()).collect();
    for name in [
        "encoder_q.patch_embed.proj.0.weight",
        "encoder_q.patch_embed.proj.4.running_var",
        "encoder_k.patch_embed.proj.1.running_mean",
        "encoder_q.patch_embed.proj.6.bias",
        // The stem trains (the v3-vit recipe's frozen projection is the linear one's).
        "optimizer.exp_avg.patch_embed.proj.0.weight",
    ] {
        assert!(names.contains(&name), "no {name} in {names:?}");
    }
    assert!(!names.contains(&"encoder_q.patch_embed.proj.weight"));

    let out = dir.path().join("export");
    let (a, out_arg) = (a.to_str().unwrap(), out.to_str().unwrap());
    run_ok(moco().args(["export", "--run", a, "--out", out_arg]));
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("class ConvStem") && card.contains("embed_layer=ConvStem"),
        "{card}"
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["conv_stem"], true);
    run_ok(moco().args(["knn", "--weights", out_arg, "--workers", "2"]));

    // The stem trains: freezing "the patch projection" is refused.
    let o = moco()
        .arg("pretrain")
        .args(vit)
        .args([
            "--stop-grad-conv1",
            "--out",
            dir.path().join("c").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--stop-grad-conv1") && err.contains("stem"),
        "{err}"
    );
}

#[test]
fn bad_settings_fail_before_any_training() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    let run = |args: &[&str]| {
        let o = moco()
            .arg("pretrain")
            .args(args)
            .args(["--out", out.to_str().unwrap(), "--quiet"])
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(!out.join("checkpoint-last.safetensors").exists());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    assert!(run(&["--preset", "v9"]).contains("v9"));
    // v3 warms up for 10 epochs: a shorter run must say so.
    let e = run(&["--preset", "v3", "--epochs", "3"]);
    assert!(e.contains("warmup_epochs"), "{e}");
    let e = run(&["--preset", "v3", "--symmetric"]);
    assert!(e.contains("--symmetric"), "{e}");
    // A patch that does not divide the 28x28 crops; ViT flags on a ResNet.
    let e = run(&["--arch", "vit_tiny"]);
    assert!(e.contains("patch_size") && e.contains("28"), "{e}");
    let e = run(&["--patch-size", "4"]);
    assert!(e.contains("--patch-size"), "{e}");
    let e = run(&["--optimizer", "adam"]);
    assert!(e.contains("adamw"), "{e}");
    assert!(run(&["--optimizer", "adam"]).contains("--optimizer adam"));
    assert!(run(&["--arch", "resnet19"]).contains("resnet19"));
    let e = run(&["--queue-size", "32", "--batch-size", "64"]);
    assert!(e.contains("K=32") && e.contains("64"), "{e}");
    assert!(run(&["--dataset", "cifar10"]).contains("--data-dir"));
    let e = run(&["--dataset", "mnist", "--data-dir", "/nonexistent"]);
    assert!(e.contains("/nonexistent"), "{e}");
    // A corrupt checkpoint on resume.
    std::fs::create_dir_all(&out).unwrap();
    pretrain(&out, &["--max-steps", "1"]);
    std::fs::write(out.join("checkpoint-last.safetensors"), b"garbage").unwrap();
    let o = moco()
        .args([
            "pretrain",
            "--resume",
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("checkpoint-last.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
}

#[test]
fn a_run_evaluates_with_knn_and_linear_eval() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    pretrain(&run, &["--max-steps", "2"]);
    let o = moco()
        .args([
            "knn",
            "--weights",
            run.to_str().unwrap(),
            "--dataset",
            "default",
            "--k",
            "20",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let last: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    let top1 = last["top1"].as_f64().unwrap();
    assert!(
        top1 > 30.0,
        "kNN of a barely trained network should still be far above chance: {top1}"
    );
    let res = dir.path().join("lin");
    let o = moco()
        .args([
            "linear-eval",
            "--weights",
            run.to_str().unwrap(),
            "--dataset",
            "default",
            "--cached-features",
            "--epochs",
            "5",
            "--out",
            res.to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(res.join("results.json")).unwrap()).unwrap();
    assert_eq!(r["protocol"], "linear (cached features, no augmentation)");
    assert_eq!(r["confusion"].as_array().unwrap().len(), 10);
    // Not on a terminal: a JSON line per epoch before the results.
    let epochs = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.starts_with("{\"epoch\"") && l.contains("test_top1"))
        .count();
    assert_eq!(epochs, 5);
    assert!(r["top1"].as_f64().unwrap() > 30.0);
    // Without --out, the results go into the run directory.
    let o = moco()
        .args(["linear-eval", "--weights", run.to_str().unwrap()])
        .args(["--dataset", "default", "--cached-features", "--epochs", "1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(run.join("linear-eval/results.json").is_file());
    // MoCo v3's protocol: lr 0.1 x batch/256 on a per-epoch cosine.
    let v3 = dir.path().join("lin-v3");
    run_ok(
        moco()
            .args(["linear-eval", "--weights", run.to_str().unwrap()])
            .args([
                "--dataset",
                "default",
                "--cached-features",
                "--protocol",
                "v3",
            ])
            .args([
                "--epochs",
                "2",
                "--batch-size",
                "128",
                "--out",
                v3.to_str().unwrap(),
            ]),
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(v3.join("results.json")).unwrap()).unwrap();
    assert_eq!(r["config"]["lr"], 0.05);
    assert_eq!(r["config"]["schedule"]["decay"]["kind"], "cosine");
    let o = moco()
        .args([
            "linear-eval",
            "--weights",
            run.to_str().unwrap(),
            "--protocol",
            "v2",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("--protocol v2"));
    // A 1-channel model on 3-channel data is refused with a clear error.
    let o = moco()
        .args([
            "knn",
            "--weights",
            run.to_str().unwrap(),
            "--dataset",
            "folder",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
}

#[test]
fn a_killed_linear_eval_resumes_exactly_and_keeps_unfinished_work() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    pretrain(&run, &["--max-steps", "2"]);
    // The protocol itself (augmented), 6 epochs: a checkpoint after each.
    let lin_from = |weights: &Path, out: &Path| {
        let mut c = moco();
        c.args(["linear-eval", "--weights", weights.to_str().unwrap()])
            .args([
                "--dataset",
                "default",
                "--epochs",
                "6",
                "--batch-size",
                "128",
            ])
            .args(["--out", out.to_str().unwrap()]);
        c
    };
    let lin = |out: &Path| lin_from(&run, out);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    run_ok(&mut lin(&a));
    let ra: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("results.json")).unwrap()).unwrap();
    let history = ra["history"].as_array().unwrap();
    assert_eq!(history.len(), 6);
    let best = history
        .iter()
        .map(|r| r["test_top1"].as_f64().unwrap())
        .fold(f64::MIN, f64::max);
    assert_eq!(ra["best_top1"].as_f64().unwrap(), best);
    assert_eq!(history[5]["test_top1"], ra["top1"]);

    // Run b is killed (SIGKILL) once it has written a checkpoint.
    let ckpt = b.join("checkpoint-last.safetensors");
    kill_once_written(&mut lin(&b), &ckpt);
    let meta = moco_core::io::load(&ckpt, &Device::Cpu).unwrap().metadata;
    let history: serde_json::Value = serde_json::from_str(&meta["history"]).unwrap();
    let done = history.as_array().unwrap().len();
    eprintln!("killed after epoch {done} of 6");
    if done < 6 {
        // Unfinished work is not overwritten without --resume.
        let o = lin(&b).output().unwrap();
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("unfinished") && e.contains("--resume"), "{e}");
    }
    // Other settings than the checkpoint's are refused, naming the setting.
    let o = lin(&b).args(["--resume", "--lr", "1"]).output().unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("`lr`") && e.contains("--resume"), "{e}");
    run_ok(lin(&b).arg("--resume"));
    assert_same_tensors(
        &file_tensors(&a.join("checkpoint-last.safetensors")),
        &file_tensors(&ckpt),
    );
    let rb: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("results.json")).unwrap()).unwrap();
    for key in [
        "history",
        "top1",
        "top5",
        "best_top1",
        "best_epoch",
        "confusion",
    ] {
        assert_eq!(ra[key], rb[key], "`{key}` differs after the resume");
    }
    // A finished evaluation may be run again into the same folder.
    run_ok(&mut lin(&b));
    // --resume with nothing to resume names the folder.
    let c = dir.path().join("c");
    let o = lin(&c).arg("--resume").output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no linear evaluation to resume"));
    // The weights are matched by content: a copy elsewhere resumes, a run trained further does not.
    let copy = dir.path().join("copy.safetensors");
    std::fs::copy(run.join("checkpoint-last.safetensors"), &copy).unwrap();
    run_ok(lin_from(&copy, &b).arg("--resume"));
    pretrain(&run, &["--resume", "--max-steps", "3"]);
    let o = lin(&b).arg("--resume").output().unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("weights_sha256") && e.contains("other weights"),
        "{e}"
    );
}

#[test]
fn export_writes_a_hub_folder_that_loads_back_with_identical_features_and_hf_urls_resolve_offline()
{
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    pretrain(&run, &["--max-steps", "2"]);
    let out = dir.path().join("export");
    let o = moco()
        .args([
            "export",
            "--run",
            run.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.starts_with("---\nlibrary_name: moco-rs\n"), "{card}");
    for needle in [
        "tags:",
        "datasets:",
        "metrics:",
        "load_state_dict",
        "moco extract",
    ] {
        assert!(card.contains(needle), "model card lacks {needle}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architecture"], "resnet18-small");
    assert_eq!(config["feature_dim"], 32);
    assert!(config["metrics"]["knn_top1"].as_f64().is_some());

    // Backbone only, torchvision names; same features as the run's query encoder.
    let model = moco_core::io::load(&out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(model
        .tensors
        .keys()
        .all(|k| !k.starts_with("fc.") && !k.starts_with("encoder_")));
    assert!(model.tensors.contains_key("layer4.1.bn2.running_var"));
    let x = seeded_randn(0.0, 1., (3, 1, 28, 28), 1, &Device::Cpu).unwrap();
    let feats = |p: &Path| {
        let (enc, _) =
            moco_models::load_encoder(p, None, moco_models::Settings::default(), &Device::Cpu)
                .unwrap();
        moco_models::Backbone::features(&enc, &x, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let exported = feats(&out.join("model.safetensors"));
    // The run's checkpoint, through the same loader the CLI uses for --weights.
    let ck = moco_core::io::load(&run.join("checkpoint-last.safetensors"), &Device::Cpu).unwrap();
    let q: std::collections::HashMap<String, candle_core::Tensor> = ck
        .tensors
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix("encoder_q.").map(|s| (s.to_string(), v)))
        .collect();
    let spec = moco_models::spec_from_metadata(&run, &ck.metadata).unwrap();
    let (enc, _, _) = moco_models::encoder_from_tensors(
        spec,
        &q,
        moco_models::Settings::default(),
        &Device::Cpu,
        &run,
    )
    .unwrap();
    let original = moco_models::Backbone::features(&enc, &x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(exported, original);

    // hf://OWNER/NAME from a cache laid out as the hub's, network off.
    let cache = dir.path().join("hub");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let snap = cache
        .join("models--someone--moco-fmnist/snapshots")
        .join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::copy(
        out.join("model.safetensors"),
        snap.join("model.safetensors"),
    )
    .unwrap();
    std::fs::create_dir_all(cache.join("models--someone--moco-fmnist/refs")).unwrap();
    std::fs::write(cache.join("models--someone--moco-fmnist/refs/main"), rev).unwrap();
    let o = moco()
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1")
        .args([
            "knn",
            "--weights",
            "hf://someone/moco-fmnist",
            "--dataset",
            "default",
            "--k",
            "10",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A repository that is not cached is a clear error offline.
    let o = moco()
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1")
        .args([
            "knn",
            "--weights",
            "hf://someone/absent",
            "--dataset",
            "default",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("hf://someone/absent") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );

    // Pushing without a token fails before anything is uploaded.
    let o = moco()
        .env_remove("HF_TOKEN")
        .env("HF_HOME", dir.path().join("empty-hf-home"))
        .args([
            "push",
            out.to_str().unwrap(),
            "--repo",
            "someone/moco-fmnist",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("no Hugging Face token") && e.contains("nothing was uploaded"),
        "{e}"
    );
}

#[test]
fn a_nan_loss_stops_the_run_with_its_step_and_keeps_the_last_good_checkpoint() {
    // The tiny run at 1e30: the loss is NaN within a few steps. The default network at 1e4:
    // a BatchNorm running variance overflows first (after step 16) while the loss stays
    // finite. Checkpoints after every step.
    for (lr, run_flags) in [
        ("1e30", [TINY, TINY_RUN].concat()),
        ("1e4", vec!["pretrain", "--quiet", "--knn-every", "0"]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let o = moco()
            .args(&run_flags)
            .args([
                "--out",
                run.to_str().unwrap(),
                "--lr",
                lr,
                "--max-steps",
                "30",
                "--checkpoint-every",
                "1",
            ])
            .output()
            .unwrap();
        assert!(!o.status.success(), "--lr {lr}: an exploding run must fail");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            (e.contains("the loss is") && e.contains("at step"))
                || e.contains("is not finite after step"),
            "--lr {lr}: {e}"
        );
        // The message names a checkpoint only when there is one, and then every tensor in it
        // (running statistics, queue and optimizer state included) is finite.
        let ck = run.join("checkpoint-last.safetensors");
        if ck.exists() {
            assert!(e.contains("last good checkpoint"), "--lr {lr}: {e}");
            let f = moco_core::io::load(&ck, &Device::Cpu).unwrap();
            for (name, t) in &f.tensors {
                if !t.dtype().is_float() {
                    continue;
                }
                let v = t
                    .flatten_all()
                    .unwrap()
                    .to_dtype(candle_core::DType::F64)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                assert!(
                    v.iter().all(|x| x.is_finite()),
                    "--lr {lr}: `{name}` is not finite"
                );
            }
        } else {
            assert!(e.contains("no checkpoint was written"), "--lr {lr}: {e}");
        }
    }
}

/// A run whose logits are all equal (here a temperature of 1e6 flattens them; a collapsed
/// encoder does the same) goes on, but says so: one warning on stderr, even with --quiet, and
/// one `collapse` event in metrics.jsonl at the third logged loss in a row at ln(K + 1).
#[test]
fn a_loss_pinned_at_equal_logits_is_reported_as_a_collapse() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = pretrain(
        &run,
        &[
            "--temperature",
            "1e6",
            "--max-steps",
            "5",
            "--log-every",
            "1",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.matches("warning: step 3:").count(), 1, "{err}");
    assert!(err.contains("no logit stands out"), "{err}");
    let events: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r.get("event").is_some())
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["event"], "collapse");
    assert_eq!(events[0]["step"], 3);
    let k_plus_1 = 65f64.ln(); // TINY_RUN's queue of 64 keys, and the positive
    assert!((events[0]["uniform_logits_loss"].as_f64().unwrap() - k_plus_1).abs() < 1e-9);
    // A healthy run has no event.
    let ok = dir.path().join("ok");
    pretrain(&ok, &["--max-steps", "5", "--log-every", "1"]);
    let text = std::fs::read_to_string(ok.join("metrics.jsonl")).unwrap();
    assert!(!text.contains("\"event\""), "{text}");
}

/// Two processes on one run folder: while a run trains, a second `moco pretrain` on its
/// folder (fresh or `--resume`) is refused at once, the resume naming the running process;
/// the first finishes unharmed, and its folder can be taken again afterwards.
#[test]
fn a_second_process_on_a_running_folder_is_refused_and_the_first_finishes_unharmed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    let mut first = moco()
        .args(["pretrain", "--epochs", "12", "--workers", "2"])
        .args(TINY_RUN)
        .args(["--out", out_s])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Once its first checkpoint is there, the run is well under way (12 epochs of 16 steps).
    let ckpt = out.join("checkpoint-last.safetensors");
    let t0 = Instant::now();
    while !ckpt.exists() && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(ckpt.exists(), "the first run wrote no checkpoint");
    let fresh = moco()
        .args(TINY)
        .args(TINY_RUN)
        .args(["--out", out_s])
        .output()
        .unwrap();
    let resume = moco()
        .args(["pretrain", "--resume", "--quiet", "--out", out_s])
        .output()
        .unwrap();
    let still_running = first.try_wait().unwrap().is_none();
    let status = first.wait().unwrap();
    assert!(status.success(), "the first run failed: {status}");
    assert!(
        still_running,
        "the first run ended before the second processes ran: make it longer"
    );
    for (what, o) in [("fresh", &fresh), ("--resume", &resume)] {
        assert_eq!(o.status.code(), Some(1), "{what}: {o:?}");
    }
    let fresh_err = String::from_utf8_lossy(&fresh.stderr);
    assert!(
        fresh_err.contains("a run is already there") || fresh_err.contains("another moco process"),
        "{fresh_err}"
    );
    let resume_err = String::from_utf8_lossy(&resume.stderr);
    let pid = first.id().to_string();
    assert!(
        resume_err.contains("another moco process") && resume_err.contains(&pid),
        "{resume_err}"
    );
    // The first run is whole: all 192 steps logged, its own configuration kept.
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], 192, "{metrics}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["moco"]["epochs"], 12);
    // Released at exit: a resume of the finished run may take the folder.
    run_ok(moco().args(["pretrain", "--resume", "--quiet", "--out", out_s]));
}
