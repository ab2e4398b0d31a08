//! The error type of `moco-core`.

use std::path::PathBuf;

/// Everything that can go wrong in `moco-core`.
///
/// Variants name the file, tensor key or setting at fault so that a CLI can print them as they are.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// The queue cannot hold one batch of keys.
    #[error(
        "queue size K={queue_size} is smaller than the {batch} keys enqueued at once; \
         K must be at least the batch size (each key would overwrite another key of the same batch)"
    )]
    QueueTooSmall {
        /// K.
        queue_size: usize,
        /// Keys enqueued at once.
        batch: usize,
    },

    /// A tensor handed to a function has the wrong shape, dtype or device.
    #[error("{what}: expected {expected}, got {got}")]
    BadTensor {
        /// The tensor (or argument) at fault.
        what: String,
        /// What it should have been.
        expected: String,
        /// What it was.
        got: String,
    },

    /// The key encoder asked for a variable that the query encoder does not have.
    #[error(
        "the key encoder asks for variable `{name}`, which the query encoder does not have \
         (build the query encoder first, with the same architecture)"
    )]
    UnknownKeyVariable {
        /// The variable's name.
        name: String,
    },

    /// A configuration value is out of its range.
    #[error("invalid setting `{key}`: {msg}")]
    Config {
        /// The setting (key, flag or environment variable).
        key: String,
        /// What is wrong with it.
        msg: String,
    },

    /// The loss became NaN or infinite; training stops there.
    #[error("the loss is {value} at step {step}: training stopped (lower the learning rate, check the data)")]
    NonFiniteLoss {
        /// The step that produced it.
        step: u64,
        /// The loss.
        value: f32,
    },

    /// A tensor of the training state (a weight, a running statistic, the queue, an optimizer
    /// buffer) became NaN or infinite; training stops there.
    #[error(
        "`{name}` is not finite after step {step}: training diverged (lower the learning rate)"
    )]
    NonFiniteWeights {
        /// The step after which it was found.
        step: u64,
        /// The tensor, by its checkpoint name.
        name: String,
    },

    /// A collective operation between the processes of a distributed run failed.
    #[error("distributed run, rank {rank}: {msg}")]
    Dist {
        /// This process's rank.
        rank: usize,
        /// What failed.
        msg: String,
    },

    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// A safetensors file is malformed or lacks a tensor.
    #[error("{}: {msg}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
}

impl Error {
    pub(crate) fn config(key: &str, msg: impl Into<String>) -> Self {
        Error::Config {
            key: key.to_string(),
            msg: msg.into(),
        }
    }

    pub(crate) fn file(path: &std::path::Path, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
}

/// A [`Error::BadTensor`] for `got`, which should have been `expected`.
pub(crate) fn bad(what: &str, expected: &str, got: &candle_core::Tensor) -> Error {
    Error::BadTensor {
        what: what.to_string(),
        expected: expected.to_string(),
        got: format!("{:?} {:?}", got.dims(), got.dtype()),
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
