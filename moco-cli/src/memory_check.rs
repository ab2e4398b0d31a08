//! [`MemoryNeed`]: a lower bound on the memory a run or an evaluation needs, checked against
//! what the machine has before anything is allocated, so that `--width 100000` or
//! `--queue-size 1000000000` is an error that says how much is needed instead of a process
//! the kernel kills (or a machine that swaps to a halt).
//!
//! On the CPU the bound is compared with Linux's `MemAvailable` plus free swap. On a GPU the
//! tensors live in device memory, which this check does not query: there an allocation that
//! does not fit fails with CUDA's out-of-memory error.

use candle_core::Device;
use moco_models::{EncoderSpec, Footprint};

use crate::error::{Error, Result};

const F32: f64 = 4.0;

/// The parts of a lower bound on the memory a job needs, in bytes.
#[derive(Debug, Clone, Default)]
pub struct MemoryNeed {
    parts: Vec<(&'static str, f64)>,
}

impl MemoryNeed {
    /// Training MoCo: the query and key encoders and the query's gradients (the optimizer's
    /// state comes on top), the activations the query branch keeps for the backward, the
    /// batch of two views, and the queue of `queue_size` keys of `dim` values.
    pub fn pretraining(
        spec: &EncoderSpec,
        crop: usize,
        channels: usize,
        batch: usize,
        queue_size: usize,
        dim: usize,
    ) -> Self {
        let f = Footprint::of(spec, crop);
        let b = batch as f64;
        Self {
            parts: vec![
                (
                    "parameters (query, key, gradients)",
                    3.0 * F32 * f.parameters,
                ),
                ("activations", F32 * b * f.activations_per_image),
                (
                    "input views",
                    2.0 * F32 * b * (channels * crop) as f64 * crop as f64,
                ),
                ("queue", F32 * queue_size as f64 * dim as f64),
            ],
        }
    }

    /// Encoding images for an evaluation: the encoder and a batch of inputs.
    pub fn encoding(spec: &EncoderSpec, size: usize, channels: usize, batch: usize) -> Self {
        let f = Footprint::of(spec, size);
        Self {
            parts: vec![
                ("parameters", F32 * f.parameters),
                (
                    "input batch",
                    F32 * batch as f64 * (channels * size) as f64 * size as f64,
                ),
            ],
        }
    }

    /// The total, in bytes.
    pub fn total(&self) -> f64 {
        self.parts.iter().map(|(_, b)| b).sum()
    }

    /// An error naming the need and its largest parts when it exceeds `available` bytes.
    pub fn check_against(&self, available: f64, what: &str) -> Result<()> {
        let need = self.total();
        if need.is_finite() && need <= available {
            return Ok(());
        }
        let mut parts = self.parts.clone();
        parts.sort_by(|a, b| b.1.total_cmp(&a.1));
        let detail: Vec<String> = parts
            .iter()
            .filter(|(_, b)| *b > 0.0)
            .map(|(name, b)| format!("{name} {}", gib(*b)))
            .collect();
        Err(Error::run(format!(
            "{what}: needs at least {} of memory ({}), and this machine has {} available; choose smaller settings",
            gib(need),
            detail.join(", "),
            gib(available)
        )))
    }

    /// [`check_against`](Self::check_against) the memory `device` has, where it is known (the
    /// CPU on Linux); elsewhere nothing is checked.
    pub fn check(&self, device: &Device, what: &str) -> Result<()> {
        match (device, available_cpu_memory()) {
            (Device::Cpu, Some(available)) => self.check_against(available, what),
            _ => Ok(()),
        }
    }
}

fn gib(bytes: f64) -> String {
    format!("{:.1} GiB", bytes / (1u64 << 30) as f64)
}

/// `MemAvailable` plus `SwapFree` of `/proc/meminfo`, in bytes (None where it cannot be read).
pub fn available_cpu_memory() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some((kib("MemAvailable:")? + kib("SwapFree:").unwrap_or(0.0)) * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use moco_models::HeadKind;

    #[test]
    fn absurd_settings_are_refused_naming_their_largest_part() {
        let spec = EncoderSpec::new("resnet18-small", HeadKind::Linear { dim: 128 }).unwrap();
        let small = MemoryNeed::pretraining(&spec, 32, 3, 64, 4096, 128);
        // ResNet-18 at width 64: 11M parameters x 12 bytes, 64 images' activations.
        assert!(
            small.total() > 1e8 && small.total() < 1e10,
            "{}",
            small.total()
        );
        small.check_against(16e9, "pretrain").unwrap();
        let queue = MemoryNeed::pretraining(&spec, 32, 3, 64, 1_000_000_000, 128);
        let e = queue
            .check_against(16e9, "--queue-size")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--queue-size") && e.contains("(queue 476.8 GiB"),
            "{e}"
        );
        let big = MemoryNeed::encoding(&spec, 100_000, 3, 256);
        let e = big.check_against(16e9, "knn").unwrap_err().to_string();
        assert!(e.contains("(input batch"), "{e}");
    }
}
