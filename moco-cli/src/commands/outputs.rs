//! Where a command may write (`--out`), checked before it writes anything: never over one of
//! its own inputs, never over a run folder's own files (its configuration, metrics and
//! checkpoints, which a resume needs), and, for a folder that `moco export` fills, never over
//! files that an export did not write.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// The files a pretraining run folder owns: `config.json`, `metrics.jsonl`, `.moco.lock` and
/// its `checkpoint-*.safetensors`.
fn is_run_file(name: &str) -> bool {
    matches!(name, "config.json" | "metrics.jsonl" | ".moco.lock")
        || (name.starts_with("checkpoint-") && name.ends_with(".safetensors"))
}

/// Whether `dir` is a pretraining run folder (its configuration with a checkpoint or a lock).
pub fn is_run_folder(dir: &Path) -> bool {
    dir.join("config.json").is_file()
        && (dir.join("checkpoint-last.safetensors").is_file() || dir.join(".moco.lock").is_file())
}

/// `p` with its folder resolved (symbolic links, `..`), for comparing paths that may not exist
/// yet.
fn resolved(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match (parent.canonicalize(), p.file_name()) {
        (Ok(d), Some(name)) => d.join(name),
        _ => p.to_path_buf(),
    }
}

/// `out` resolved, or an error naming `flag` and the input when `out` is one of `inputs`.
fn not_an_input(flag: &str, out: &Path, inputs: &[(&str, &Path)]) -> Result<PathBuf> {
    let target = resolved(out);
    for (input_flag, input) in inputs {
        if resolved(input) == target {
            bail!(
                "{flag} {}: the same path as {input_flag}; write the output elsewhere",
                out.display()
            );
        }
    }
    Ok(target)
}

/// Checks the output file `out` of `flag` against the command's `inputs` (`(flag, path)`):
/// an error naming both when `out` is one of them, or one of a run folder's own files.
pub fn check_file(flag: &str, out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let target = not_an_input(flag, out, inputs)?;
    if let (Some(dir), Some(name)) = (target.parent(), target.file_name()) {
        if is_run_folder(dir) && is_run_file(&name.to_string_lossy()) {
            bail!(
                "{flag} {}: a file of the run folder {} (a resume needs it); write the output elsewhere",
                out.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// Checks the output folder `out` of `flag`, which will receive `writes` (file names): an
/// error when it is one of `inputs`, a run folder, or when it holds one of `writes` already
/// and `written_by_us(out)` says an earlier run of the command did not fill it.
pub fn check_folder(
    flag: &str,
    out: &Path,
    inputs: &[(&str, &Path)],
    writes: &[&str],
    written_by_us: impl Fn(&Path) -> bool,
) -> Result<()> {
    let target = not_an_input(flag, out, inputs)?;
    if is_run_folder(&target) {
        bail!(
            "{flag} {}: a pretraining run folder (its config.json is what a resume reads); choose another folder",
            out.display()
        );
    }
    let present: Vec<&str> = writes
        .iter()
        .copied()
        .filter(|f| target.join(f).exists())
        .collect();
    if !present.is_empty() && !written_by_us(&target) {
        bail!(
            "{flag} {}: holds {} that this command did not write; choose an empty or new folder",
            out.display(),
            present.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn inputs_and_run_files_are_refused_and_other_paths_pass() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::write(run.join("config.json"), "{}").unwrap();
        std::fs::write(run.join("checkpoint-last.safetensors"), "x").unwrap();
        let ck = run.join("checkpoint-last.safetensors");
        // The input itself, also through another spelling of the same path.
        let again = run
            .join("..")
            .join("run")
            .join("checkpoint-last.safetensors");
        let e = check_file("--out", &again, &[("--input", &ck)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("same path as --input"), "{e}");
        // A run folder's own files, even when they are no input.
        let e = check_file("--out", &run.join("config.json"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("run folder"), "{e}");
        // Anything else, also a new file inside the run folder.
        check_file(
            "--out",
            &run.join("features.safetensors"),
            &[("--input", &ck)],
        )
        .unwrap();
        check_file("--out", &dir.path().join("new.safetensors"), &[]).unwrap();

        // Folders: a run folder, an input, a folder of someone else's files; a new or
        // earlier-exported folder passes.
        let writes = ["model.safetensors", "config.json", "README.md"];
        let never = |_: &Path| false;
        let e = check_folder("--out", &run, &[], &writes, never)
            .unwrap_err()
            .to_string();
        assert!(e.contains("run folder"), "{e}");
        let theirs = dir.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::fs::write(theirs.join("README.md"), "mine").unwrap();
        let e = check_folder("--out", &theirs, &[], &writes, never)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("README.md") && e.contains("did not write"),
            "{e}"
        );
        check_folder("--out", &theirs, &[], &writes, |_: &Path| true).unwrap();
        check_folder("--out", &dir.path().join("new"), &[], &writes, never).unwrap();
        let e = check_folder("--out", &theirs, &[("--run", &theirs)], &writes, never)
            .unwrap_err()
            .to_string();
        assert!(e.contains("same path as --run"), "{e}");
    }
}
