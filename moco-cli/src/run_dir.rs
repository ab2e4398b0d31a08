//! [`RunDir`]: the folder of a pretraining run and the files in it:
//!
//! - `config.json`: the fully resolved [`RunConfig`];
//! - `metrics.jsonl`: one JSON object per logging step and per kNN evaluation
//!   ([`MetricsLog`]; a resumed run drops the lines a killed run wrote past its checkpoint);
//! - `checkpoint-last.safetensors`: everything a resume needs (the query and key encoders, the
//!   queue, the optimizer's state, the step counter and configuration in the metadata), written
//!   atomically (temporary file + rename), so a kill at any moment leaves the previous complete
//!   checkpoint;
//! - `checkpoint-epoch-NNNN.safetensors`: a copy kept every `keep_every` epochs;
//! - `tb/`: the records' numbers as TensorBoard scalars ([`crate::tensorboard`]; trimmed on a
//!   resume as `metrics.jsonl` is).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Context, Error, Result};
use crate::run_config::RunConfig;
use crate::tensorboard::EventLog;

/// A run folder.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// The run folder at `root` (nothing is created or read yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// `config.json`.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.json")
    }

    /// `checkpoint-last.safetensors`.
    pub fn checkpoint_path(&self) -> PathBuf {
        self.root.join("checkpoint-last.safetensors")
    }

    /// `metrics.jsonl`.
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    /// The copy of the checkpoint kept after epoch `epoch` (1-based):
    /// `checkpoint-epoch-NNNN.safetensors`.
    pub fn kept_checkpoint_path(&self, epoch: usize) -> PathBuf {
        self.root
            .join(format!("checkpoint-epoch-{epoch:04}.safetensors"))
    }

    /// Whether a run has written its checkpoint here.
    pub fn has_checkpoint(&self) -> bool {
        self.checkpoint_path().exists()
    }

    /// Creates the folder (and its parents).
    pub fn create(&self) -> Result<()> {
        std::fs::create_dir_all(&self.root)
            .map_err(|e| Error::io(&self.root, e))
            .context(format!("--out {}", self.root.display()))
    }

    /// The configuration saved in `config.json`. When that file is gone but the checkpoint is
    /// there, the configuration is read from the checkpoint's metadata (every checkpoint holds
    /// it) and `config.json` is written again.
    pub fn read_config(&self) -> Result<RunConfig> {
        let path = self.config_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.has_checkpoint() => {
                let ckpt = self.checkpoint_path();
                let meta = moco_core::io::read_metadata(&ckpt)
                    .map_err(Error::from)
                    .context(format!("--resume: {} is missing, and its checkpoint", path.display()))?;
                let text = meta.get("run_config").ok_or_else(|| Error::File {
                    path: ckpt.clone(),
                    msg: format!(
                        "holds no run configuration (`run_config` metadata), and {} is missing: not a checkpoint of `moco pretrain`?",
                        path.display()
                    ),
                })?;
                let config: RunConfig = serde_json::from_str(text).map_err(|e| Error::File {
                    path: ckpt.clone(),
                    msg: format!("its `run_config` metadata: {e}"),
                })?;
                self.write_config(&config)?;
                return Ok(config);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::run(format!(
                    "--resume: no run to resume in {}: neither config.json nor checkpoint-last.safetensors is there",
                    self.root.display()
                )))
            }
            Err(e) => return Err(Error::io(&path, e)).context("--resume".to_string()),
        };
        serde_json::from_str(&text).map_err(|e| Error::File {
            path,
            msg: e.to_string(),
        })
    }

    /// Removes the temporary files that processes killed while writing left in the folder
    /// (`.NAME.tmp-PID`, see [`moco_core::io::write_atomic`]); returns them. Only for the
    /// holder of the run's lock, which no other process writes under.
    pub fn remove_stale_temp_files(&self) -> Result<Vec<PathBuf>> {
        let listing = match std::fs::read_dir(&self.root) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(Error::io(&self.root, e)),
        };
        let mut removed = vec![];
        for entry in listing.filter_map(|e| e.ok()) {
            let name = entry.file_name();
            if moco_core::io::is_temp_file_name(&name.to_string_lossy()) && entry.path().is_file() {
                let p = entry.path();
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
                removed.push(p);
            }
        }
        removed.sort();
        Ok(removed)
    }

    /// Writes `config` to `config.json`, atomically.
    pub fn write_config(&self, config: &RunConfig) -> Result<()> {
        let text = serde_json::to_string_pretty(config).map_err(|e| Error::run(e.to_string()))?;
        Ok(moco_core::io::write_atomic(
            &self.config_path(),
            text.as_bytes(),
        )?)
    }

    /// Copies `checkpoint-last` to the kept checkpoint of epoch `epoch`, atomically.
    pub fn keep_checkpoint(&self, epoch: usize) -> Result<()> {
        let from = self.checkpoint_path();
        let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
        Ok(moco_core::io::write_atomic(
            &self.kept_checkpoint_path(epoch),
            &bytes,
        )?)
    }

    /// Opens `metrics.jsonl` for appending, first dropping the lines of steps past `step` (left
    /// by a killed run after its last checkpoint), and `tb/` likewise.
    pub fn open_metrics(&self, step: u64) -> Result<MetricsLog> {
        let path = self.metrics_path();
        let kept: Vec<String> = match std::fs::read_to_string(&path) {
            Ok(text) => text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= step)
                })
                .map(String::from)
                .collect(),
            Err(_) => vec![],
        };
        let mut body = kept.join("\n");
        if !body.is_empty() {
            body.push('\n');
        }
        moco_core::io::write_atomic(&path, body.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let tensorboard = EventLog::open(&self.tensorboard_path(), step)?;
        Ok(MetricsLog {
            file,
            path,
            tensorboard,
        })
    }

    /// `tb/`: the TensorBoard event files of the run (`tensorboard --logdir` this folder, or
    /// a folder of runs).
    pub fn tensorboard_path(&self) -> PathBuf {
        self.root.join("tb")
    }
}

/// `metrics.jsonl`, open for appending, and its scalars in TensorBoard's `tb/`.
#[derive(Debug)]
pub struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
    tensorboard: EventLog,
}

impl MetricsLog {
    /// Appends `record` as one line, and its numbers as TensorBoard scalars at its step.
    pub fn write(&mut self, record: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{record}").map_err(|e| Error::io(&self.path, e))?;
        self.tensorboard.record(record)
    }
}
