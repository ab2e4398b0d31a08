//! # moco-core
//!
//! Momentum Contrast (He et al., 2020) building blocks on [Candle](https://github.com/huggingface/candle),
//! usable with any encoder that implements [`candle_nn::ModuleT`]:
//!
//! - [`Queue`]: the C x K dictionary of keys with a write pointer (wraps around for any K >= batch);
//! - [`MomentumEncoder`]: the key encoder as an exponential moving average of the query encoder,
//!   variables paired by name, with no autograd graph on the key side;
//! - [`loss`]: InfoNCE against the queue, its symmetric form, and in-batch InfoNCE (MoCo v3),
//!   their cross-entropy fused into one op on float32 CPU tensors;
//! - [`BatchShuffle`]: shuffle-BN on one device;
//! - [`dist`]: data-parallel training over several processes (TCP on CPUs, NCCL on GPUs);
//! - [`dist::sync_bn`]: BatchNorm statistics over all ranks (SyncBN, as MoCo v3's official runs);
//! - [`Kernels`]: whether float32 CPU tensors take the fused kernels or candle's generic ops;
//! - [`Sgd`]: `torch.optim.SGD` with momentum, Nesterov and weight decay;
//! - [`schedule`]: step, cosine and warm-up learning rates, cosine momentum;
//! - [`MocoConfig`]: every setting, with the official presets;
//! - [`CollapseWatch`]: notices a loss pinned where every logit is equal (collapsed features);
//! - [`Moco`]: the training step, in order: forward, loss, backward, SGD step, momentum update,
//!   enqueue ([`trainer`]; its data-parallel side and checkpoint format in files of their own).
//!
//! ```no_run
//! use candle_core::{Device, Tensor};
//! use moco_core::{Moco, MocoConfig};
//!
//! # fn main() -> moco_core::Result<()> {
//! let device = Device::Cpu;
//! let config = MocoConfig { queue_size: 1024, batch_size: 32, dim: 16, ..MocoConfig::v2() };
//! // Any encoder: here a linear map from flattened 8x8 images to 16-d embeddings.
//! let mut moco = Moco::new(config, &device, |vb| {
//!     let lin = candle_nn::linear(64, 16, vb.pp("fc"))?;
//!     Ok(candle_nn::func_t(move |x, _train| x.flatten_from(1)?.apply(&lin)))
//! })?;
//! let (x1, x2) = (Tensor::randn(0f32, 1., (32, 1, 8, 8), &device)?, Tensor::randn(0f32, 1., (32, 1, 8, 8), &device)?);
//! let (lr, m) = moco.schedule(0, 0, 100);
//! let out = moco.train_step(&x1, &x2, lr, m)?;
//! println!("loss {:.3} acc1 {:.1}%", out.loss, out.acc1);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod collapse;
pub mod config;
mod cross_entropy;
pub mod dist;
mod error;
pub mod init;
pub mod io;
pub mod kernels;
pub mod loss;
pub mod math;
pub mod momentum;
pub mod optim;
pub mod profile;
pub mod queue;
pub mod schedule;
pub mod shuffle;
pub mod trainer;

pub use collapse::CollapseWatch;
pub use config::{AugmentationPreset, LossKind, MocoConfig, OptimizerKind};
pub use dist::{Collective, DistConfig, SingleProcess, TcpGroup};
pub use error::{Error, Result};
pub use kernels::Kernels;
pub use loss::{in_batch_info_nce, info_nce, l2_normalize, symmetric_info_nce, ContrastiveOutput};
pub use momentum::{is_batch_norm_buffer, MomentumEncoder};
pub use optim::{AdamW, AdamWConfig, Optimizer, Sgd, SgdConfig};
pub use queue::Queue;
pub use schedule::{LrDecay, LrSchedule, MomentumSchedule};
pub use shuffle::BatchShuffle;
pub use trainer::{Forward, Moco, StepOutput};
