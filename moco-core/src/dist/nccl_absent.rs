//! The stand-in for `nccl.rs` in builds without the `nccl` feature: joining an NCCL group is an
//! error that says how to get one.

use candle_core::{Device, Tensor};

use super::collective::Collective;
use super::rendezvous::DistConfig;
use crate::{Error, Result};

/// No NCCL in this build: no value of this type exists.
#[derive(Debug)]
pub enum NcclGroup {}

impl NcclGroup {
    /// Always an error naming the cargo feature.
    pub fn join(_config: &DistConfig, _device: &Device) -> Result<Self> {
        Err(Error::config(
            "dist-backend",
            "nccl: this build has no NCCL; rebuild with `--features nccl` (scripts/build-cuda.sh)",
        ))
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        match *self {}
    }
    fn world_size(&self) -> usize {
        match *self {}
    }
    fn backend(&self) -> &'static str {
        match *self {}
    }
    fn all_reduce_sum(&self, _: &Tensor) -> Result<Tensor> {
        match *self {}
    }
    fn all_gather(&self, _: &Tensor) -> Result<Tensor> {
        match *self {}
    }
    fn broadcast(&self, _: &Tensor, _: usize) -> Result<Tensor> {
        match *self {}
    }
}
