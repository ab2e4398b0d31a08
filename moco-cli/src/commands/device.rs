//! `--device cpu|cuda|cuda:N|metal`, and `--tf32`.

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// Parses `--device`; a backend not compiled in gives an error naming the cargo feature.
pub fn parse(spec: &str) -> Result<Device> {
    let (kind, index) = match spec.split_once(':') {
        Some((k, i)) => (
            k,
            i.parse::<usize>()
                .with_context(|| format!("--device {spec}: `{i}` is not a device index"))?,
        ),
        None => (spec, 0),
    };
    match kind {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {spec}: this `moco` was built without CUDA; rebuild with `cargo build --release --features cuda` (or `cudnn`)")
            }
            let device = Device::new_cuda(index).with_context(|| format!("--device {spec}"))?;
            // Freed memory stays in the pool between steps, as PyTorch's caching allocator.
            moco_models::ops::retain_freed_memory(&device)
                .with_context(|| format!("--device {spec}: setting the memory pool"))?;
            Ok(device)
        }
        "metal" => {
            if !candle_core::utils::metal_is_available() {
                bail!("--device {spec}: this `moco` was built without Metal; rebuild with `cargo build --release --features metal`")
            }
            Device::new_metal(index).with_context(|| format!("--device {spec}"))
        }
        other => {
            bail!("--device {spec}: unknown device `{other}` (expected cpu, cuda, cuda:N or metal)")
        }
    }
}

/// Parses `--device` and applies `--tf32`: TF32 tensor cores for float32 matrix products and
/// (cudnn builds) convolutions, as PyTorch runs its cuDNN convolutions by default. Only CUDA has
/// them; asking for them on another device is an error.
pub fn parse_with_tf32(spec: &str, tf32: bool) -> Result<Device> {
    let device = parse(spec)?;
    if tf32 {
        if !device.is_cuda() {
            bail!("--tf32 applies to --device cuda only, not --device {spec}");
        }
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
    }
    Ok(device)
}

/// `--device` and `--tf32`, for the commands that run a model.
#[derive(Debug, clap::Args)]
pub struct DeviceArgs {
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// On CUDA, TF32 tensor cores for float32 matrix products and (cudnn builds) convolutions,
    /// as PyTorch runs its cuDNN convolutions by default (without it: full float32).
    #[arg(long)]
    pub tf32: bool,
}

impl DeviceArgs {
    /// The device, `spec` standing for `--device` (see [`device::parse_with_tf32`]).
    pub fn open_as(&self, spec: &str) -> Result<candle_core::Device> {
        parse_with_tf32(spec, self.tf32)
    }

    /// The device of `--device`, `--tf32` applied.
    pub fn open(&self) -> Result<candle_core::Device> {
        self.open_as(&self.device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf32_is_refused_off_cuda_and_names_its_flags() {
        let err = parse_with_tf32("cpu", true).unwrap_err().to_string();
        assert!(
            err.contains("--tf32") && err.contains("--device cpu"),
            "{err}"
        );
        assert!(parse_with_tf32("cpu", false).unwrap().is_cpu());
    }
}
