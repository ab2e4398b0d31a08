//! [`RunDir`]: the folder of a pretraining run and the files in it:
//!
//! - `config.json`: the fully resolved [`RunConfig`];
//! - `metrics.jsonl`: one JSON object per logging step and per kNN evaluation
//!   ([`MetricsLog`]; a resumed run drops the lines a killed run wrote past its checkpoint);
//! - `checkpoint-last.safetensors`: everything a resume needs (the query and key encoders, the
//!   queue, the optimizer's state, the step counter and configuration in the metadata), written
//!   atomically (temporary file + rename), so a kill at any moment leaves the previous complete
//!   checkpoint;
//! - `checkpoint-epoch-NNNN.safetensors`: a copy kept every `keep_every` epochs.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Context, Error, Result};
use crate::run_config::RunConfig;

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

    /// The configuration saved in `config.json`.
    pub fn read_config(&self) -> Result<RunConfig> {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(&path, e))
            .context(format!(
                "--resume: no run to resume in {}",
                self.root.display()
            ))?;
        serde_json::from_str(&text).map_err(|e| Error::File {
            path,
            msg: e.to_string(),
        })
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
    /// by a killed run after its last checkpoint).
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
        Ok(MetricsLog { file, path })
    }
}

/// `metrics.jsonl`, open for appending.
#[derive(Debug)]
pub struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    /// Appends `record` as one line.
    pub fn write(&mut self, record: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{record}").map_err(|e| Error::io(&self.path, e))
    }
}
