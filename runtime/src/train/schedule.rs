//! Learning-rate schedules as transformers' `get_scheduler` defines them (step counted from 0,
//! the rate used for the update that makes step `s + 1`):
//!
//! warmup (s < w): lr·s/w;  then constant: lr;  linear: lr·(T − s)/(T − w);
//! cosine: lr·½(1 + cos(π·(s − w)/(T − w))).  Both decays reach 0 at s = T.

use serde::{Deserialize, Serialize};

/// The schedule's shape after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    Linear,
    #[default]
    Cosine,
}

/// A learning-rate schedule over `total_steps` optimizer steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// The learning rate of the update made at step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        let (s, w, t) = (step as f64, self.warmup_steps as f64, self.total_steps.max(1) as f64);
        if step < self.warmup_steps {
            return self.peak_lr * s / w.max(1.0);
        }
        let progress = ((s - w) / (t - w).max(1.0)).clamp(0.0, 1.0);
        match self.kind {
            ScheduleKind::Constant => self.peak_lr,
            ScheduleKind::Linear => self.peak_lr * (1.0 - progress),
            ScheduleKind::Cosine => self.peak_lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values printed by transformers 5.24 `get_scheduler(name, AdamW(lr=1.0), num_warmup_steps=2,
    /// num_training_steps=10)`: the lr after each `scheduler.step()`, starting from step 0.
    #[test]
    fn schedules_match_transformers() {
        let s = |kind| Schedule { kind, peak_lr: 1.0, warmup_steps: 2, total_steps: 10 };
        let lin: Vec<f64> = (0..10).map(|i| s(ScheduleKind::Linear).lr_at(i)).collect();
        assert_eq!(lin, [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]);
        let cos: Vec<f64> = (0..10).map(|i| s(ScheduleKind::Cosine).lr_at(i)).collect();
        let want = [0.0, 0.5, 1.0, 0.9619397662556434, 0.8535533905932737, 0.6913417161825449, 0.5, 0.3086582838174551, 0.14644660940672627, 0.03806023374435663];
        for (a, b) in cos.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{cos:?}");
        }
        assert_eq!(s(ScheduleKind::Constant).lr_at(7), 1.0);
        assert_eq!(s(ScheduleKind::Constant).lr_at(1), 0.5);
    }
}
