//! [`NcclGroup`] (cargo feature `nccl`): CUDA tensors with NCCL, one process per GPU, on one
//! machine or several.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CustomOp1, Device, Layout, Shape, Tensor};

use super::collective::Collective;
use super::rendezvous::{publish, retire, wait_for_payload, DistConfig};
use crate::{Error, Result};

/// A process group over NCCL. Rank 0 creates the unique id and writes it (hex) to the
/// rendezvous file.
pub struct NcclGroup {
    comm: Comm,
    rank: usize,
    world_size: usize,
}

impl std::fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclGroup")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish()
    }
}

impl NcclGroup {
    /// Joins the group; `device` must be this rank's CUDA device.
    pub fn join(config: &DistConfig, device: &Device) -> Result<Self> {
        let err = |msg: String| Error::Dist {
            rank: config.rank,
            msg,
        };
        let Device::Cuda(dev) = device else {
            return Err(Error::config(
                "dist-backend",
                "nccl needs a CUDA device (--device cuda)",
            ));
        };
        let id = if config.rank == 0 {
            let id = Id::new().map_err(|e| err(format!("ncclGetUniqueId: {e:?}")))?;
            let hex: String = id
                .internal()
                .iter()
                .map(|&c| format!("{:02x}", c as u8))
                .collect();
            publish(config, &hex)?;
            id
        } else {
            let hex = wait_for_payload(config)?;
            let bytes: Vec<u8> = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| Error::file(&config.init_file, "not an NCCL id"))?;
            let mut internal = [0 as std::ffi::c_char; 128];
            if bytes.len() != internal.len() {
                return Err(Error::file(&config.init_file, "not an NCCL id"));
            }
            for (d, s) in internal.iter_mut().zip(bytes) {
                *d = s as std::ffi::c_char;
            }
            Id::uninit(internal)
        };
        let comm = Comm::from_rank(dev.cuda_stream(), config.rank, config.world_size, id)
            .map_err(|e| err(format!("ncclCommInitRank: {e:?}")))?;
        retire(config);
        Ok(Self {
            comm,
            rank: config.rank,
            world_size: config.world_size,
        })
    }
}

enum Op {
    AllReduce,
    AllGather,
    Broadcast(usize),
}

struct NcclOp<'a> {
    comm: &'a Comm,
    op: Op,
    world: usize,
}

impl CustomOp1 for NcclOp<'_> {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn cpu_fwd(
        &self,
        _s: &candle_core::CpuStorage,
        _l: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives need CUDA tensors")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("NCCL collectives need contiguous tensors")
        };
        let src = s.as_cuda_slice::<f32>()?.slice(start..end);
        let n = end - start;
        let (out_len, shape) = match self.op {
            Op::AllGather => {
                let mut dims = l.dims().to_vec();
                dims[0] *= self.world;
                (n * self.world, Shape::from(dims))
            }
            _ => (n, l.shape().clone()),
        };
        // SAFETY: every element is written by the collective before it is read.
        let mut dst = unsafe { dev.alloc::<f32>(out_len)? };
        match self.op {
            Op::AllReduce => self
                .comm
                .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                .map(|_| ()),
            Op::AllGather => self.comm.all_gather(&src, &mut dst).map(|_| ()),
            Op::Broadcast(root) => self
                .comm
                .broadcast(Some(&src), &mut dst, root as i32)
                .map(|_| ()),
        }
        .map_err(|e| candle_core::Error::Msg(format!("NCCL: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), shape))
    }
}

impl NcclGroup {
    fn apply(&self, t: &Tensor, op: Op) -> Result<Tensor> {
        let dtype = t.dtype();
        let x = t.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let y = x.apply_op1_no_bwd(&NcclOp {
            comm: &self.comm,
            op,
            world: self.world_size,
        })?;
        Ok(y.to_dtype(dtype)?)
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.apply(t, Op::AllReduce)
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        if t.rank() == 0 {
            return Err(Error::config(
                "all_gather",
                "needs tensors of at least one dimension",
            ));
        }
        self.apply(t, Op::AllGather)
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        self.apply(t, Op::Broadcast(root))
    }
}
