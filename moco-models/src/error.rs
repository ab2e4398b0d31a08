//! The error type of `moco-models`.

use std::path::PathBuf;

/// Everything that can go wrong building, saving or loading a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// An error from moco-core (safetensors I/O).
    #[error(transparent)]
    Core(#[from] moco_core::Error),

    /// An architecture name that is not in the zoo.
    #[error("unknown architecture `{name}` (expected one of: {known}, or vit-DxNhH for a width-D, N-block, H-head ViT, vit-conv-DxNhH with MoCo v3's convolutional stem)")]
    UnknownArch {
        /// The name asked for.
        name: String,
        /// The zoo's names.
        known: String,
    },

    /// A setting out of range.
    #[error("invalid setting `{key}`: {msg}")]
    Config {
        /// The setting.
        key: String,
        /// What is wrong with it.
        msg: String,
    },

    /// An environment variable with a value this build cannot take; the message names it.
    #[error("{0}")]
    Env(String),

    /// A weights or checkpoint file that cannot be used, with the reason.
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
            key: key.into(),
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

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
