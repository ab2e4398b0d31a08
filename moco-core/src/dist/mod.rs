//! Data-parallel training over several processes (one per GPU, or several CPU processes).
//!
//! A [`Collective`] is a process group: each process knows its rank and the world size, and the
//! three collectives MoCo needs: the sum of a tensor over all ranks (gradient averaging), the
//! concatenation of every rank's tensor in rank order (shuffle-BN across GPUs, keys gathered
//! before the enqueue, in-batch negatives for MoCo v3) and a broadcast (the same start on every
//! rank). [`crate::Moco::with_collective`] uses them the way the official code uses
//! `DistributedDataParallel` and `concat_all_gather`.
//!
//! Backends:
//! - [`SingleProcess`]: world size 1, every collective is the identity;
//! - [`TcpGroup`]: CPU tensors between processes over TCP, through rank 0 (which sums in rank
//!   order, so every rank gets bit-identical results and reruns are reproducible);
//! - `NcclGroup` (cargo feature `nccl`): CUDA tensors with NCCL, one process per GPU, on one
//!   machine or several.
//!
//! Every backend meets through a rendezvous file ([`DistConfig::init_file`], [`rendezvous`]): rank 0 writes how
//! to reach it (TCP: its address; NCCL: its unique id), the others wait for the file and read
//! it. On several machines the file lives on a shared file system; nothing else changes.
//! Rank 0 deletes the file once every rank has joined; a new run needs a path that does not
//! hold an old file (`moco launch` makes a fresh one each time).
//!
//! Files: [`collective`] (the trait), [`rendezvous`] (joining), [`tcp`], `nccl` (cargo feature
//! `nccl`; a stand-in without it says how to get it), [`sync_bn`] (BatchNorm statistics over the
//! ranks).

pub mod collective;
#[cfg_attr(not(feature = "nccl"), path = "nccl_absent.rs")]
pub mod nccl;
pub mod rendezvous;
pub mod sync_bn;
pub mod tcp;

use candle_core::Device;

pub use collective::{Collective, SingleProcess};
pub use rendezvous::{check_rank, fresh_init_file, Backend, DistConfig};
pub use tcp::{on_threads, TcpGroup};

use crate::Result;

/// Joins the group described by `config`; `device` is where this rank's tensors live (NCCL
/// needs this rank's CUDA device). A group of one process is a real group of its backend (its
/// collectives run, and must change nothing: a check of the backend); use [`SingleProcess`]
/// for plain single-process training.
pub fn init(config: &DistConfig, device: &Device) -> Result<Box<dyn Collective>> {
    config.check()?;
    match config.backend {
        Backend::Tcp => Ok(Box::new(TcpGroup::join(config)?)),
        Backend::Nccl => Ok(Box::new(nccl::NcclGroup::join(config, device)?)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_missing_rank_is_a_timeout_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = DistConfig::new(3, 0, dir.path().join("init"));
        c.timeout = Duration::from_millis(300);
        let e = TcpGroup::join(&c).unwrap_err().to_string();
        assert!(e.contains("ranks 1, 2 did not join"), "{e}");
        let mut c = DistConfig::new(2, 1, dir.path().join("never"));
        c.timeout = Duration::from_millis(100);
        let e = TcpGroup::join(&c).unwrap_err().to_string();
        assert!(e.contains("never") && e.contains("did not write"), "{e}");
        let e = init(&DistConfig::new(2, 2, dir.path().join("x")), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 2 is outside 0..2"), "{e}");
    }
}
