//! The error type of `moco-eval`.

/// Everything that can go wrong evaluating a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// From moco-core.
    #[error(transparent)]
    Core(#[from] moco_core::Error),
    /// From moco-models.
    #[error(transparent)]
    Models(#[from] moco_models::Error),
    /// From moco-data.
    #[error(transparent)]
    Data(#[from] moco_data::Error),
    /// A setting out of range or inputs that do not fit together.
    #[error("invalid setting `{key}`: {msg}")]
    Config {
        /// The setting.
        key: String,
        /// What is wrong with it.
        msg: String,
    },
    /// An error of the caller's per-epoch callback (`on_epoch` of the linear protocol), as its
    /// message.
    #[error("{0}")]
    Callback(String),
    /// The linear protocol's sanity check: a backbone weight changed during training.
    #[error("sanity check failed: backbone tensor `{name}` changed during linear evaluation (max difference {diff:e}); the backbone must stay frozen")]
    BackboneChanged {
        /// The tensor.
        name: String,
        /// Its largest change.
        diff: f32,
    },
}

impl Error {
    pub(crate) fn config(key: &str, msg: impl Into<String>) -> Self {
        Error::Config {
            key: key.into(),
            msg: msg.into(),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
