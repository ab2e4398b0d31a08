//! # moco-cli (library)
//!
//! The pretraining run of the `moco` binary, for any program to call: a [`RunConfig`] says
//! what to train, a [`RunDir`] holds the run's files (configuration, metrics, checkpoints) and a
//! [`RunLock`] keeps it to one process, a
//! [`Pretrainer`] runs or resumes the epoch loop with [`Hook`]s after steps and epochs, and
//! [`KnnMonitor`] is the hook that measures the kNN accuracy as the run goes.
//!
//! The binary adds its command line on top (flags, devices, progress bar): `moco pretrain`
//! resolves its flags into a [`RunConfig`] and runs a [`Pretrainer`] with these hooks.

#![warn(missing_docs)]

mod error;
pub mod knn_monitor;
pub mod memory_check;
pub mod pretrainer;
pub mod run_config;
pub mod run_dir;
pub mod run_lock;
pub mod tensorboard;

pub use error::{Error, Result};
pub use knn_monitor::KnnMonitor;
pub use memory_check::MemoryNeed;
pub use pretrainer::{Hook, Pretrainer, Progress, Summary};
pub use run_config::RunConfig;
pub use run_dir::{MetricsLog, RunDir};
pub use run_lock::RunLock;
