//! [`CollapseWatch`]: notices a run whose loss is pinned at the value every logit being equal
//! gives, `ln(K + 1)` for InfoNCE against a queue of K keys. There the embeddings carry no
//! information (they collapsed to one point, or to zero), the gradient vanishes, and the run
//! goes on at a loss that looks plausible and a top-1 of 100% (ties go to the positive in
//! column 0), typically just before it diverges.

use crate::config::{LossKind, MocoConfig};

/// The loss of `config` when all logits of a row are equal: `ln(K + 1)` for InfoNCE against
/// the queue, twice that for the symmetric form (two directions summed), and `2 * 2T * ln(N)`
/// for MoCo v3's in-batch loss over the global batch of N (two directions, each scaled by 2T).
pub fn uniform_logits_loss(config: &MocoConfig) -> f64 {
    let queue = (config.queue_size as f64 + 1.0).ln();
    match config.loss {
        LossKind::Queue => queue,
        LossKind::SymmetricQueue => 2.0 * queue,
        LossKind::InBatch => 4.0 * config.temperature * (config.batch_size as f64).ln(),
    }
}

/// A collapse, reported once when the loss has sat at the uniform-logits value for
/// [`CollapseWatch::PATIENCE`] observations in a row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Collapse {
    /// The uniform-logits loss the observed losses sit at.
    pub uniform_loss: f64,
    /// Observations in a row at that value.
    pub observations: usize,
}

/// Watches the logged losses of a run for a collapse.
#[derive(Debug, Clone)]
pub struct CollapseWatch {
    uniform: f64,
    pinned: usize,
}

impl CollapseWatch {
    /// Observations in a row within [`Self::TOLERANCE`] of the uniform-logits loss that make a
    /// collapse. A healthy run starts near that loss, but its logits differ by far more than
    /// the tolerance; only equal logits give the value to float32 precision.
    pub const PATIENCE: usize = 3;
    /// Relative distance to the uniform-logits loss that counts as pinned.
    pub const TOLERANCE: f64 = 1e-5;

    /// A watch for runs of `config`.
    pub fn new(config: &MocoConfig) -> Self {
        Self {
            uniform: uniform_logits_loss(config),
            pinned: 0,
        }
    }

    /// Takes one logged loss; returns the collapse when this observation completes
    /// [`Self::PATIENCE`] in a row at the uniform-logits value (once per stretch: the count
    /// starts again when the loss moves away).
    pub fn observe(&mut self, loss: f64) -> Option<Collapse> {
        if (loss - self.uniform).abs() <= Self::TOLERANCE * self.uniform {
            self.pinned += 1;
        } else {
            self.pinned = 0;
        }
        (self.pinned == Self::PATIENCE).then_some(Collapse {
            uniform_loss: self.uniform,
            observations: self.pinned,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_loss_of_each_objective() {
        let c = MocoConfig {
            queue_size: 2048,
            ..MocoConfig::v2()
        };
        assert!((uniform_logits_loss(&c) - 2049f64.ln()).abs() < 1e-12);
        let s = MocoConfig {
            loss: LossKind::SymmetricQueue,
            ..c.clone()
        };
        assert!((uniform_logits_loss(&s) - 2.0 * 2049f64.ln()).abs() < 1e-12);
        let v3 = MocoConfig::v3();
        let want = 4.0 * v3.temperature * (v3.batch_size as f64).ln();
        assert!((uniform_logits_loss(&v3) - want).abs() < 1e-12);
    }

    #[test]
    fn a_pinned_loss_is_reported_once_per_stretch() {
        let c = MocoConfig {
            queue_size: 2048,
            ..MocoConfig::v2()
        };
        let mut w = CollapseWatch::new(&c);
        let pinned = 2049f32.ln() as f64; // as a float32 loss reads back
                                          // A healthy start near the value does not count.
        for l in [7.70, 7.64, 7.626, 7.60] {
            assert_eq!(w.observe(l), None);
        }
        assert_eq!(w.observe(pinned), None);
        assert_eq!(w.observe(pinned), None);
        let c = w.observe(pinned).unwrap();
        assert_eq!(c.observations, 3);
        assert_eq!(w.observe(pinned), None, "reported once");
        assert_eq!(w.observe(5.0), None);
        for _ in 0..2 {
            assert_eq!(w.observe(pinned), None);
        }
        assert!(
            w.observe(pinned).is_some(),
            "a new stretch is reported again"
        );
    }
}
