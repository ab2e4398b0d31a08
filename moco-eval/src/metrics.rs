//! Classification metrics: top-1, top-5, per-class accuracy, confusion matrix.

use serde::{Deserialize, Serialize};

/// Accumulates predictions (each a ranking of classes, best first) against labels.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Classification {
    classes: usize,
    total: usize,
    top1: usize,
    top5: usize,
    /// `confusion[true][predicted]`.
    confusion: Vec<Vec<u64>>,
}

/// The summary written to results files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Top-1 accuracy, percent.
    pub top1: f64,
    /// Top-5 accuracy, percent.
    pub top5: f64,
    /// Number of evaluated samples.
    pub samples: usize,
    /// Accuracy of each class, percent (`null` for a class with no sample).
    pub per_class: Vec<Option<f64>>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<u64>>,
}

impl Classification {
    /// An empty accumulator for `classes` classes.
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            confusion: vec![vec![0; classes]; classes],
            ..Default::default()
        }
    }

    /// Records one sample: `ranking` is the list of classes, best first (at least one).
    pub fn update(&mut self, ranking: &[usize], label: usize) {
        self.total += 1;
        if ranking.first() == Some(&label) {
            self.top1 += 1;
        }
        if ranking.iter().take(5).any(|&c| c == label) {
            self.top5 += 1;
        }
        if let (Some(&p), true) = (ranking.first(), label < self.classes) {
            if p < self.classes {
                self.confusion[label][p] += 1;
            }
        }
    }

    /// Records a batch of class scores (rows) against labels: ranking by descending score.
    pub fn update_scores(&mut self, scores: &[Vec<f32>], labels: &[u32]) {
        for (row, &l) in scores.iter().zip(labels) {
            let mut idx: Vec<usize> = (0..row.len()).collect();
            // Stable sort: equal scores keep the lower class first.
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            self.update(&idx, l as usize);
        }
    }

    /// The summary.
    pub fn report(&self) -> Report {
        let pct = |a: usize| {
            if self.total == 0 {
                0.0
            } else {
                100.0 * a as f64 / self.total as f64
            }
        };
        let per_class = self
            .confusion
            .iter()
            .enumerate()
            .map(|(c, row)| {
                let n: u64 = row.iter().sum();
                (n > 0).then(|| 100.0 * row[c] as f64 / n as f64)
            })
            .collect();
        Report {
            top1: pct(self.top1),
            top5: pct(self.top5),
            samples: self.total,
            per_class,
            confusion: self.confusion.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_top1_top5_and_the_confusion_matrix() {
        let mut m = Classification::new(6);
        m.update(&[0, 1, 2, 3, 4, 5], 0); // top-1
        m.update(&[1, 2, 3, 4, 0, 5], 0); // top-5 only
        m.update(&[1, 2, 3, 4, 5, 0], 0); // neither
        m.update(&[2, 1], 2);
        let r = m.report();
        assert_eq!((r.top1, r.top5, r.samples), (50.0, 75.0, 4));
        assert_eq!(r.confusion[0], [1, 2, 0, 0, 0, 0]);
        assert_eq!(r.per_class[0], Some(100.0 / 3.0));
        assert_eq!(r.per_class[2], Some(100.0));
        assert_eq!(r.per_class[3], None);
    }
}
