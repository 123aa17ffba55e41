//! Policy-gradient losses of RL from rewards (GRPO, PPO), as terms that compose like the others:
//! `grpo().epsilon_high(0.28) + 0.04 * ref_kl()`, `ppo_clip(0.2) + 0.1 * value_loss(0.2)`.
//!
//! A step's completion tokens (m of them, every sequence of the micro-batch) carry, per token:
//! the policy's log-prob logp (with gradients), the sampling policy's `old` log-prob, the
//! advantage A, and an aggregation weight w (the loss type's normalisation, [`token_weights`]).
//! Every term is Σᵢ wᵢ·ℓᵢ:
//! - [`grpo`] / [`ppo_clip`]: ℓ = −min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A), r = exp(logp − old)
//!   ([`crate::ops::clipped_surrogate`]);
//! - [`ref_kl`]: ℓ = r·(e^{ref − logp} − (ref − logp) − 1), the k3 estimator of KL(π‖π_ref) with
//!   TRL's bias correction r (on by default; `.bias_correction(false)` drops it);
//! - [`value_loss`]: ℓ = ½·max((V − R)², (V_old + clip(V − V_old, ±c) − R)²) (PPO's critic).
//!
//! The reference log-probs and the values are computed on first use, so β = 0 (no `ref_kl`)
//! runs no reference forward.

use super::{Loss, Term, TermLog};
use crate::error::{Error, Result};
use crate::ops::{self, Pointwise};
use crate::tensor::Tensor;
use std::cell::OnceCell;

/// How the per-token losses of a micro-batch are normalised (TRL's `loss_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Each sequence's token mean, averaged over sequences (DeepSeekMath's GRPO; favours short
    /// sequences).
    Grpo,
    /// Token sum over (sequences × max_completion_length) (Dr. GRPO: no length bias).
    DrGrpo,
    /// Token mean over the whole generation batch (DAPO; TRL's default).
    #[default]
    Dapo,
    /// Token mean over the micro-batch.
    Bnpo,
}

impl LossType {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "grpo" => Ok(LossType::Grpo),
            "dr_grpo" => Ok(LossType::DrGrpo),
            "dapo" => Ok(LossType::Dapo),
            "bnpo" => Ok(LossType::Bnpo),
            other => Err(Error::Input(format!("loss_type = \"{other}\" for GRPO: expected \"grpo\", \"dr_grpo\", \"dapo\" or \"bnpo\""))),
        }
    }
}

/// Per-token weights of one micro-batch whose rows have `lens` trained tokens (0 for a masked
/// row): the loss is Σ wᵢ·ℓᵢ. `rows` counts every row, masked ones included (as TRL's mean does);
/// `dapo_tokens` is DAPO's normaliser (the generation batch's completion tokens; the trainer
/// passes the micro-batch's own and weights micro-batches by their tokens, which is the same).
pub fn token_weights(loss_type: LossType, lens: &[usize], rows: usize, max_completion_length: usize, dapo_tokens: usize) -> Vec<f64> {
    let total: usize = lens.iter().sum();
    let rows = rows.max(1) as f64;
    lens.iter()
        .flat_map(|&n| {
            let w = match loss_type {
                LossType::Grpo => 1.0 / (n.max(1) as f64 * rows),
                LossType::Bnpo => 1.0 / total.max(1) as f64,
                LossType::Dapo => 1.0 / dapo_tokens.max(1) as f64,
                LossType::DrGrpo => 1.0 / (rows * max_completion_length.max(1) as f64),
            };
            std::iter::repeat_n(w, n)
        })
        .collect()
}

/// What a policy-gradient step has computed for its completion tokens, shared by its terms.
pub struct PolicyCx<'a> {
    /// log π(token) of every completion token `[m]`, with gradients.
    pub logps: Tensor,
    /// The sampling policy's log-probs `[m]` (recorded during the rollout).
    pub old: &'a [f64],
    /// Per-token advantages `[m]`.
    pub advantages: &'a [f64],
    /// Aggregation weights `[m]` ([`token_weights`]).
    pub weights: &'a [f64],
    /// PPO: the rollout's values and the returns `[m]` (empty for GRPO).
    pub old_values: &'a [f64],
    pub returns: &'a [f64],
    reference: &'a dyn Fn() -> Result<Vec<f64>>,
    values: &'a dyn Fn() -> Result<Tensor>,
    reference_cache: OnceCell<Vec<f64>>,
    values_cache: OnceCell<Tensor>,
    weights_t: OnceCell<Tensor>,
}

impl<'a> PolicyCx<'a> {
    /// A context; `reference` gives the reference log-probs and `values` the critic's predictions
    /// `[m]` (with gradients), each called at most once and only if a term asks.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        logps: Tensor,
        old: &'a [f64],
        advantages: &'a [f64],
        weights: &'a [f64],
        old_values: &'a [f64],
        returns: &'a [f64],
        reference: &'a dyn Fn() -> Result<Vec<f64>>,
        values: &'a dyn Fn() -> Result<Tensor>,
    ) -> Result<Self> {
        let m = logps.elem_count();
        if old.len() != m || advantages.len() != m || weights.len() != m {
            return Err(Error::Input(format!("policy loss: {m} log-probs, {} old log-probs, {} advantages, {} weights", old.len(), advantages.len(), weights.len())));
        }
        Ok(PolicyCx { logps, old, advantages, weights, old_values, returns, reference, values, reference_cache: OnceCell::new(), values_cache: OnceCell::new(), weights_t: OnceCell::new() })
    }

    /// The reference policy's log-probs `[m]`, computed on first use.
    pub fn reference(&self) -> Result<&[f64]> {
        if let Some(r) = self.reference_cache.get() {
            return Ok(r);
        }
        let r = (self.reference)()?;
        if r.len() != self.old.len() {
            return Err(Error::Input(format!("policy loss: {} reference log-probs for {} tokens", r.len(), self.old.len())));
        }
        Ok(self.reference_cache.get_or_init(|| r))
    }

    /// The critic's values `[m]`, computed on first use.
    pub fn values(&self) -> Result<&Tensor> {
        if let Some(v) = self.values_cache.get() {
            return Ok(v);
        }
        let v = (self.values)()?;
        Ok(self.values_cache.get_or_init(|| v))
    }

    /// Σ wᵢ·xᵢ.
    pub fn aggregate(&self, per_token: &Tensor) -> Result<Tensor> {
        let w = match self.weights_t.get() {
            Some(w) => w,
            None => {
                let w = Tensor::from_vec(self.weights.to_vec(), &[self.weights.len()], crate::Device::Cpu)?.to_dtype(per_token.dtype())?.to_device(per_token.device())?;
                self.weights_t.get_or_init(|| w)
            }
        };
        ops::sum(&ops::mul(per_token, w)?)
    }

    /// A constant `[m]` tensor like the log-probs.
    fn constant(&self, v: &[f64]) -> Result<Tensor> {
        Tensor::from_vec(v.to_vec(), &[v.len()], crate::Device::Cpu)?.to_dtype(self.logps.dtype())?.to_device(self.logps.device())
    }

    /// Mean over the tokens of a 0/1 flag.
    fn token_mean(&self, flag: impl Fn(usize) -> bool) -> f64 {
        let m = self.old.len();
        (0..m).filter(|&i| flag(i)).count() as f64 / m.max(1) as f64
    }
}

/// The clipped surrogate of GRPO (ε_low = ε_high = 0.2 unless set) and PPO.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClippedPolicy {
    pub epsilon: f64,
    pub epsilon_high: f64,
}

/// GRPO's policy term: the clipped surrogate with ε = 0.2 (`.epsilon`, `.epsilon_high` for DAPO's
/// clip-higher).
///
/// ```
/// use temper_runtime::loss::{grpo, ref_kl};
/// let loss = grpo().epsilon(0.2).epsilon_high(0.28) + 0.04 * ref_kl();
/// ```
pub fn grpo() -> Loss<ClippedPolicy> {
    Loss(ClippedPolicy { epsilon: 0.2, epsilon_high: 0.2 })
}

/// PPO's policy term with `cliprange` on both sides.
pub fn ppo_clip(cliprange: f64) -> Loss<ClippedPolicy> {
    Loss(ClippedPolicy { epsilon: cliprange, epsilon_high: cliprange })
}

impl Loss<ClippedPolicy> {
    /// ε_low (and ε_high, unless set after).
    pub fn epsilon(self, e: f64) -> Self {
        Loss(ClippedPolicy { epsilon: e, epsilon_high: e })
    }
    /// ε_high (DAPO's clip-higher).
    pub fn epsilon_high(self, e: f64) -> Self {
        Loss(ClippedPolicy { epsilon_high: e, ..self.0 })
    }
}

impl Term<PolicyCx<'_>> for ClippedPolicy {
    fn eval(&self, cx: &PolicyCx<'_>, log: &mut TermLog) -> Result<Tensor> {
        let per = ops::clipped_surrogate(&cx.logps, cx.old, cx.advantages, self.epsilon, self.epsilon_high)?;
        let lp = cx.logps.to_f64_vec()?;
        let r = |i: usize| (lp[i] - cx.old[i]).exp();
        let low = |i: usize| r(i) < 1.0 - self.epsilon && cx.advantages[i] < 0.0;
        let high = |i: usize| r(i) > 1.0 + self.epsilon_high && cx.advantages[i] > 0.0;
        log.push(("clip_ratio/low_mean", cx.token_mean(low)));
        log.push(("clip_ratio/high_mean", cx.token_mean(high)));
        log.push(("clip_ratio/region_mean", cx.token_mean(|i| low(i) || high(i))));
        let loss = cx.aggregate(&per)?;
        log.push(("loss/policy", loss.to_scalar()?));
        Ok(loss)
    }
}

/// KL(π‖π_ref) per token by the k3 estimator, times the ratio r (TRL's `use_bias_correction_kl`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RefKl {
    pub bias_correction: bool,
}

/// The KL penalty to the reference policy (the base with adapters off, or a reference model):
/// weight it by β, `grpo() + 0.04 * ref_kl()`.
pub fn ref_kl() -> Loss<RefKl> {
    Loss(RefKl { bias_correction: true })
}

impl Loss<RefKl> {
    /// Whether the k3 estimate is multiplied by the importance ratio (TRL's default: yes).
    pub fn bias_correction(self, on: bool) -> Self {
        Loss(RefKl { bias_correction: on })
    }
}

impl Term<PolicyCx<'_>> for RefKl {
    fn eval(&self, cx: &PolicyCx<'_>, log: &mut TermLog) -> Result<Tensor> {
        let reference = cx.constant(cx.reference()?)?;
        // d = ref − logp;  k3 = e^d − d − 1.
        let d = ops::sub(&reference, &cx.logps)?;
        let mut k3 = ops::add_scalar(&ops::sub(&ops::pointwise(&d, Pointwise::Exp)?, &d)?, -1.0)?;
        if self.bias_correction {
            let r = ops::pointwise(&ops::sub(&cx.logps, &cx.constant(cx.old)?)?, Pointwise::Exp)?;
            k3 = ops::mul(&k3, &r)?;
        }
        let v = k3.to_f64_vec()?;
        log.push(("kl", v.iter().sum::<f64>() / v.len().max(1) as f64));
        cx.aggregate(&k3)
    }
}

/// PPO's clipped value loss, ½·max((V − R)², (V_old + clip(V − V_old, ±c) − R)²).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ValueLoss {
    pub cliprange_value: f64,
}

/// The critic's loss with the value update clipped to `±cliprange_value`: `ppo_clip(0.2) + 0.1 * value_loss(0.2)`.
pub fn value_loss(cliprange_value: f64) -> Loss<ValueLoss> {
    Loss(ValueLoss { cliprange_value })
}

impl Term<PolicyCx<'_>> for ValueLoss {
    fn eval(&self, cx: &PolicyCx<'_>, log: &mut TermLog) -> Result<Tensor> {
        let v = cx.values()?;
        let m = cx.old.len();
        if cx.old_values.len() != m || cx.returns.len() != m {
            return Err(Error::Input(format!("value loss: {m} tokens, {} rollout values, {} returns (the trainer has no critic)", cx.old_values.len(), cx.returns.len())));
        }
        let per = ops::clipped_value(v, cx.old_values, cx.returns, self.cliprange_value)?;
        let vh = v.to_f64_vec()?;
        log.push(("val/clipfrac", cx.token_mean(|i| (vh[i] - cx.old_values[i]).abs() > self.cliprange_value)));
        let loss = ops::scale(&cx.aggregate(&per)?, 0.5)?;
        log.push(("loss/value", loss.to_scalar()?));
        Ok(loss)
    }
}
