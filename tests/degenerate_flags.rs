//! No panic from the command line: each subcommand run with degenerate values (0, NaN, a
//! queue smaller than the batch) exits with an error (status 1 or 2, not a panic's 101) whose
//! message names the flag or setting at fault, before any training; and no output written over
//! a command's own input or a run folder's files.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use moco_tests::{moco, run_ok, TINY_FOLDER_RUN, TINY_RUN};

/// Runs `cmd` with a time limit (a hang is a failure too).
fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            child.kill().unwrap();
            panic!("{cmd:?} ran past {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A finished two-step run in `run`: a real run folder and checkpoint for the commands to read.
fn two_step_run(run: &std::path::Path) {
    run_ok(
        moco()
            .args(["pretrain", "--epochs", "1", "--max-steps", "2"])
            .args(TINY_RUN)
            .args(["--out", run.to_str().unwrap()]),
    );
}

#[test]
fn degenerate_values_are_errors_naming_the_flag_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    // A real run folder, for the commands that load weights before checking their flags.
    let run = dir.path().join("run");
    two_step_run(&run);
    let w = run.to_str().unwrap().to_string();
    let out = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let p = [
        "pretrain",
        "--quiet",
        "--knn-every",
        "0",
        "--max-steps",
        "2",
    ];
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--image-size", "0"], "--image-size"),
        (vec!["--batch-size", "0"], "`batch_size`"),
        (vec!["--epochs", "0"], "`epochs`"),
        (vec!["--lr", "nan"], "`lr`"),
        (vec!["--temperature", "0"], "`temperature`"),
        (vec!["--temperature", "nan"], "`temperature`"),
        (vec!["--queue-size", "0"], "queue size"),
        (vec!["--width", "0"], "--width"),
        (vec!["--subset", "0"], "--subset"),
        (vec!["--subset", "100000000"], "--subset"),
        (vec!["--log-every", "0"], "log_every"),
        // Flags the configuration would ignore.
        (
            vec!["--preset", "v3", "--queue-size", "1024"],
            "--queue-size",
        ),
        (vec!["--preset", "v3", "--mlp"], "--mlp"),
        (vec!["--arch", "vit-64x4h4", "--width", "8"], "--width"),
        (vec!["--bn-splits", "2", "--sync-bn", "true"], "--bn-splits"),
        (vec!["--data-dir", "/nonexistent"], "--data-dir"),
        // A process group that cannot exist.
        (vec!["--rank", "1"], "--rank"),
        (vec!["--world-size", "0"], "--world-size"),
        // Settings that cannot fit in memory are refused before anything is allocated.
        (vec!["--queue-size", "1000000000"], "memory"),
        (vec!["--width", "100000"], "memory"),
        (vec!["--image-size", "100000"], "memory"),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (extra, name))| {
        let mut a: Vec<String> = p.iter().map(|s| s.to_string()).collect();
        a.extend(["--out".to_string(), out(&format!("p{i}"))]);
        a.extend(extra.into_iter().map(String::from));
        (a, name)
    })
    .chain(
        [
            (vec!["bench", "step", "--steps", "0"], "--steps"),
            (vec!["bench", "step", "--image-size", "0"], "--image-size"),
            (vec!["bench", "step", "--batch-size", "0"], "`batch_size`"),
            (vec!["bench", "step", "--queue-size", "0"], "queue size"),
            (vec!["bench", "step", "--width", "0"], "width"),
            (
                vec!["knn", "--weights", &w, "--image-size", "0"],
                "--image-size",
            ),
            (vec!["knn", "--weights", &w, "--k", "0"], "`k`"),
            (vec!["knn", "--weights", &w, "--k", "100000"], "--k 100000"),
            (
                vec!["export", "--run", &out("nope"), "--out", &out("ex")],
                "--run",
            ),
            (vec!["knn", "--weights", &w, "--t", "0"], "`t`"),
            (vec!["knn", "--weights", &w, "--t", "nan"], "`t`"),
            (
                vec!["knn", "--weights", &w, "--image-size", "100000"],
                "memory",
            ),
            (
                vec!["knn", "--weights", &w, "--batch-size", "0"],
                "batch_size",
            ),
            (
                vec!["linear-eval", "--weights", &w, "--epochs", "0"],
                "--epochs",
            ),
            (
                vec!["linear-eval", "--weights", &w, "--image-size", "0"],
                "--image-size",
            ),
            (
                vec!["linear-eval", "--weights", &w, "--batch-size", "0"],
                "batch_size",
            ),
            (
                vec![
                    "extract",
                    "--weights",
                    &w,
                    "--input",
                    &w,
                    "--out",
                    &out("f.safetensors"),
                    "--image-size",
                    "0",
                ],
                "--image-size",
            ),
        ]
        .into_iter()
        .map(|(a, name)| (a.into_iter().map(String::from).collect(), name)),
    )
    .collect();
    for (i, (args, name)) in cases.iter().enumerate() {
        let o = output_within(moco().args(args), Duration::from_secs(120));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            matches!(o.status.code(), Some(1 | 2)),
            "moco {}: exit {:?}\n{err}",
            args.join(" "),
            o.status.code()
        );
        assert!(!err.contains("panicked"), "moco {}: {err}", args.join(" "));
        assert!(
            err.contains(name),
            "moco {}: the message does not name `{name}`:\n{err}",
            args.join(" ")
        );
        // Refused before any work: not even the run folder was made.
        assert!(
            !std::path::Path::new(&out(&format!("p{i}"))).exists(),
            "moco {}: made its run folder",
            args.join(" ")
        );
    }
}

/// `--out` over an input or a run folder's own files is refused before anything is written,
/// and the run folder is left exactly as it was.
#[test]
fn outputs_never_overwrite_inputs_or_run_files() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    two_step_run(&run);
    // Every file under the folder (tb/ included), by relative path, with its bytes.
    fn files_under(d: &std::path::Path, v: &mut Vec<(String, Vec<u8>)>, prefix: &str) {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let name = format!("{prefix}{}", e.file_name().to_string_lossy());
            if e.path().is_dir() {
                files_under(&e.path(), v, &format!("{name}/"));
            } else {
                v.push((name, std::fs::read(e.path()).unwrap()));
            }
        }
    }
    let files = |d: &std::path::Path| {
        let mut v = vec![];
        files_under(d, &mut v, "");
        v.sort();
        v
    };
    let before = files(&run);
    let r = run.to_str().unwrap();
    let ck = run.join("checkpoint-last.safetensors");
    let ck = ck.to_str().unwrap();
    let cfg = run.join("config.json");
    let cfg = cfg.to_str().unwrap();
    for (args, name) in [
        (vec!["export", "--run", r, "--out", r], "same path as --run"),
        (vec!["export", "--weights", ck, "--out", r], "run folder"),
        (
            vec!["extract", "--weights", r, "--input", r, "--out", ck],
            "same path as --weights",
        ),
        (
            vec!["extract", "--weights", ck, "--input", r, "--out", cfg],
            "run folder",
        ),
        (
            vec!["convert", "--input", ck, "--out", ck],
            "same path as --input",
        ),
    ] {
        let o = output_within(moco().args(&args), Duration::from_secs(120));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "moco {}: {err}", args.join(" "));
        assert!(err.contains(name), "moco {}: {err}", args.join(" "));
    }
    assert!(files(&run) == before, "the run folder changed");
}

/// Weights holding a NaN (a diverged run's) are refused by the evaluation commands, naming
/// the tensor, instead of giving chance-level features without a word.
#[test]
fn non_finite_weights_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    two_step_run(&run);
    let f = moco_core::io::load(
        &run.join("checkpoint-last.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let name = "encoder_q.layer1.0.bn1.running_var";
    let mut tensors: std::collections::BTreeMap<String, candle_core::Tensor> =
        f.tensors.into_iter().collect();
    let t = tensors[name].affine(0.0, f64::NAN).unwrap();
    tensors.insert(name.to_string(), t);
    let bad = dir.path().join("diverged.safetensors");
    moco_core::io::save_atomic(&bad, &tensors, Some(f.metadata)).unwrap();
    let b = bad.to_str().unwrap();
    for args in [
        vec!["knn", "--weights", b],
        vec!["linear-eval", "--weights", b, "--epochs", "1"],
        vec![
            "export",
            "--weights",
            b,
            "--out",
            &dir.path().join("e").to_string_lossy(),
        ],
    ] {
        let o = output_within(moco().args(&args), Duration::from_secs(120));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "moco {}: {err}", args.join(" "));
        assert!(
            err.contains("layer1.0.bn1.running_var") && err.contains("not finite"),
            "moco {}: {err}",
            args.join(" ")
        );
    }
}

/// A config file with a misspelt nested key or an impossible value, and image folders laid out
/// wrongly (a capitalised split, different classes in train and val, an unreadable val image,
/// val without train) are refused with the key or path at fault, before any run folder is made.
#[test]
fn bad_config_files_and_image_folders_are_errors_naming_the_key_or_path() {
    let dir = tempfile::tempdir().unwrap();
    let base = run_ok(moco().arg("config-run")).stdout;
    let base = String::from_utf8(base).unwrap();
    let edit = |from: &str, to: &str| {
        assert!(base.contains(from), "`moco config-run` has no `{from}`");
        base.replacen(from, to, 1)
    };
    let configs = [
        (
            edit("per_iteration = false", "per_iteration = false\nfoo = 1"),
            "foo",
        ),
        (
            edit("kind = \"constant\"", "kind = \"constant\"\nfoo = 1"),
            "foo",
        ),
        (
            edit("preset = \"default\"", "preset = \"v9\""),
            "moco.preset",
        ),
        (edit("knn_k = 200", "knn_k = 0"), "knn_k"),
        (edit("knn_t = 0.1", "knn_t = -1.0"), "knn_t"),
    ];
    let mut refused: Vec<(Vec<String>, String, std::path::PathBuf)> = Vec::new();
    for (i, (text, name)) in configs.into_iter().enumerate() {
        let file = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&file, text).unwrap();
        let out = dir.path().join(format!("c{i}"));
        let args = ["pretrain", "--quiet", "--config", file.to_str().unwrap()];
        refused.push((
            args.iter().map(|s| s.to_string()).collect(),
            name.to_string(),
            out,
        ));
    }

    // Image folders: two classes of two photos in each split, then one thing wrong.
    let folder =
        |name: &str, splits: &[&str]| moco_tests::photo_folder(&dir.path().join(name), splits);
    let capital = folder("capital", &["Train", "val"]);
    let classes = folder("classes", &["train", "val"]);
    std::fs::rename(classes.join("val/b"), classes.join("val/c")).unwrap();
    let broken = folder("broken", &["train", "val"]);
    std::fs::write(broken.join("val/a/coffee.png"), b"not a png").unwrap();
    let no_train = folder("no_train", &["val"]);
    for (i, (root, name)) in [
        (&capital, "lower case".to_string()),
        (&classes, "only in the test split: c".to_string()),
        (
            &broken,
            broken.join("val/a/coffee.png").display().to_string(),
        ),
        (&no_train, "no `train/`".to_string()),
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.path().join(format!("f{i}"));
        let args = [
            &["pretrain", "--quiet", "--data-dir", root.to_str().unwrap()],
            TINY_FOLDER_RUN,
        ]
        .concat();
        refused.push((args.iter().map(|s| s.to_string()).collect(), name, out));
    }

    for (args, name, out) in &refused {
        let o = output_within(
            moco().args(args).arg("--out").arg(out),
            Duration::from_secs(120),
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "moco {}: {err}", args.join(" "));
        assert!(
            err.contains(name.as_str()),
            "moco {}: the message does not name `{name}`:\n{err}",
            args.join(" ")
        );
        assert!(
            !out.exists(),
            "moco {}: made its run folder",
            args.join(" ")
        );
    }
}
