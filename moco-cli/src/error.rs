//! The error type of the `moco_cli` library.

use std::path::PathBuf;

/// Everything that can go wrong in a pretraining run. The messages name the file, the setting
/// or the flag at fault, so that the `moco` binary prints them as they are.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From moco-core (the step, the checkpoint, the collectives).
    #[error(transparent)]
    Core(#[from] moco_core::Error),
    /// From moco-models (building or loading an encoder).
    #[error(transparent)]
    Models(#[from] moco_models::Error),
    /// From moco-data (opening or reading a dataset).
    #[error(transparent)]
    Data(#[from] moco_data::Error),
    /// From moco-eval (the kNN monitor).
    #[error(transparent)]
    Eval(#[from] moco_eval::Error),
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file of the run could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A file of the run that cannot be used, with the reason.
    #[error("{}: {msg}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// Settings that do not fit together or this run; the message names them.
    #[error("{0}")]
    Run(String),
    /// An error with what was being done when it happened.
    #[error("{context}: {source}")]
    Context {
        /// What was being done (a flag, a file).
        context: String,
        /// The error.
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    /// An [`Error::Run`] with this message.
    pub(crate) fn run(msg: impl Into<String>) -> Self {
        Error::Run(msg.into())
    }

    /// An [`Error::Io`] for `path`.
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Adds what was being done to an error: `result.context("--resume from PATH")`.
pub(crate) trait Context<T> {
    fn context(self, context: impl Into<String>) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: context.into(),
            source: Box::new(e.into()),
        })
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
