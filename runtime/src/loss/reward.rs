//! The Bradley–Terry loss of reward models (TRL 1.16's `RewardTrainer`):
//!
//! ```text
//! loss = mean over pairs of −log σ(r_c − r_r − m)  +  c · mean((r_c + r_r)²)
//! ```
//!
//! with m the pair's margin (0 without one) and c `center_rewards_coefficient` (0: off), which
//! keeps the rewards centred on zero. Logged as TRL does: `accuracy` (share of pairs with
//! r_c > r_r), `margin` (mean r_c − r_r), `min_reward`, `mean_reward`, `max_reward`.

use super::preference::{constant, mean};
use super::{Loss, Term, TermLog};
use crate::error::Result;
use crate::ops::{self, Pointwise};
use crate::tensor::Tensor;

/// What a reward-model step computed for its pairs.
pub struct RewardCx {
    /// The reward of each chosen sequence `[pairs]`, with gradients.
    pub chosen: Tensor,
    pub rejected: Tensor,
    /// Each pair's margin (0 where the data gives none).
    pub margins: Vec<f64>,
}

/// The Bradley–Terry term.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BradleyTerry {
    pub center_rewards_coefficient: f64,
}

/// −log σ(r_c − r_r − margin), averaged over pairs.
pub fn bradley_terry() -> Loss<BradleyTerry> {
    Loss(BradleyTerry::default())
}

impl Loss<BradleyTerry> {
    /// Adds `c · mean((r_c + r_r)²)`, centring the rewards (TRL's `center_rewards_coefficient`).
    pub fn center_rewards(mut self, c: f64) -> Self {
        self.0.center_rewards_coefficient = c;
        self
    }
}

impl Term<RewardCx> for BradleyTerry {
    fn eval(&self, cx: &RewardCx, log: &mut TermLog) -> Result<Tensor> {
        let d = ops::sub(&ops::sub(&cx.chosen, &cx.rejected)?, &constant(cx.margins.clone(), &cx.chosen)?)?;
        let mut loss = ops::scale(&mean(&ops::pointwise(&d, Pointwise::LogSigmoid)?)?, -1.0)?;
        if self.center_rewards_coefficient != 0.0 {
            let s = ops::add(&cx.chosen, &cx.rejected)?;
            loss = ops::add(&loss, &ops::scale(&mean(&ops::mul(&s, &s)?)?, self.center_rewards_coefficient)?)?;
        }
        let (c, r) = (cx.chosen.to_f64_vec()?, cx.rejected.to_f64_vec()?);
        let n = c.len().max(1) as f64;
        let all: Vec<f64> = c.iter().chain(&r).copied().collect();
        log.push(("loss/bradley_terry", loss.to_scalar()?));
        log.push(("accuracy", c.iter().zip(&r).filter(|(a, b)| a > b).count() as f64 / n));
        log.push(("margin", c.iter().zip(&r).map(|(a, b)| a - b).sum::<f64>() / n));
        log.push(("min_reward", all.iter().copied().fold(f64::INFINITY, f64::min)));
        log.push(("mean_reward", all.iter().sum::<f64>() / all.len().max(1) as f64));
        log.push(("max_reward", all.iter().copied().fold(f64::NEG_INFINITY, f64::max)));
        Ok(loss)
    }
}
