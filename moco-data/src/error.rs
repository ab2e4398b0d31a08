//! The error type of `moco-data`.

use std::path::PathBuf;

/// Everything that can go wrong reading data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A file that cannot be read or decoded, with the reason.
    #[error("{}: {msg}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },

    /// A setting out of range.
    #[error("invalid setting `{key}`: {msg}")]
    Config {
        /// The setting.
        key: String,
        /// What is wrong with it.
        msg: String,
    },
}

impl Error {
    pub(crate) fn file(path: &std::path::Path, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }

    pub(crate) fn config(key: &str, msg: impl Into<String>) -> Self {
        Error::Config {
            key: key.into(),
            msg: msg.into(),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
