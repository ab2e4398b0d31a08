//! `--device cpu|cuda|cuda:N|metal`.

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
            Device::new_cuda(index).with_context(|| format!("--device {spec}"))
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
