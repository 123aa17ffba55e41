//! KTO (TRL 1.16's `KTOTrainer`, `loss_type = "kto"`): unpaired completions labelled desirable or
//! not, each judged against a reference point z₀, the batch's KL estimate:
//!
//! ```text
//! z₀ = max(0, mean over the batch of (logπ(y'|x) − logπ_ref(y'|x)))    y' = a mismatched completion, no gradient
//! desirable:    λ_D · (1 − σ(β (logπ(y|x) − logπ_ref(y|x) − z₀)))
//! undesirable:  λ_U · (1 − σ(β (z₀ − logπ(y|x) + logπ_ref(y|x))))
//! ```
//!
//! averaged over the batch's items. Logged: `kl`, `rewards/chosen`, `rewards/rejected` (β·log-ratio
//! means over desirable / undesirable items), `rewards/margins`, `logps/chosen`, `logps/rejected`.

use super::preference::{constant, mean};
use super::{Loss, Term, TermLog};
use crate::error::{Error, Result};
use crate::ops::{self, Pointwise};
use crate::tensor::Tensor;
use std::cell::OnceCell;

/// Reference logps of the items and of their mismatched (KL) completions, and the policy's logps
/// of the KL completions (no gradient): computed on first use.
pub type KtoReferenceFn<'a> = dyn Fn() -> Result<KtoReference> + 'a;

/// What the reference point needs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KtoReference {
    /// log π_ref of each item's completion.
    pub ref_logps: Vec<f64>,
    /// log π_ref of each item's KL completion.
    pub ref_kl_logps: Vec<f64>,
    /// log π of each item's KL completion (policy, no gradient).
    pub policy_kl_logps: Vec<f64>,
}

/// What a KTO step computed.
pub struct KtoCx<'a> {
    /// Σ log π over each item's completion `[items]`, with gradients.
    pub logps: Tensor,
    /// True: desirable.
    pub labels: Vec<bool>,
    reference: Box<KtoReferenceFn<'a>>,
    cached: OnceCell<KtoReference>,
}

impl<'a> KtoCx<'a> {
    pub fn new(logps: Tensor, labels: Vec<bool>, reference: Box<KtoReferenceFn<'a>>) -> Self {
        KtoCx { logps, labels, reference, cached: OnceCell::new() }
    }
    pub fn reference(&self) -> Result<&KtoReference> {
        if let Some(r) = self.cached.get() {
            return Ok(r);
        }
        let r = (self.reference)()?;
        let n = self.labels.len();
        if r.ref_logps.len() != n || r.ref_kl_logps.len() != n || r.policy_kl_logps.len() != n {
            return Err(Error::Input(format!("kto: reference log-probs for {} items, {n} expected", r.ref_logps.len())));
        }
        Ok(self.cached.get_or_init(|| r))
    }
}

/// The KTO term.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Kto {
    pub beta: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

/// KTO with β (TRL's default 0.1) and unit weights.
pub fn kto(beta: f64) -> Loss<Kto> {
    Loss(Kto { beta, desirable_weight: 1.0, undesirable_weight: 1.0 })
}

impl Loss<Kto> {
    /// λ_D and λ_U (TRL's `desirable_weight`, `undesirable_weight`): balance unequal counts.
    pub fn weights(mut self, desirable: f64, undesirable: f64) -> Self {
        self.0.desirable_weight = desirable;
        self.0.undesirable_weight = undesirable;
        self
    }
}

fn mean_where(v: &[f64], labels: &[bool], want: bool) -> f64 {
    let sel: Vec<f64> = v.iter().zip(labels).filter(|(_, &l)| l == want).map(|(x, _)| *x).collect();
    if sel.is_empty() {
        0.0
    } else {
        sel.iter().sum::<f64>() / sel.len() as f64
    }
}

impl Term<KtoCx<'_>> for Kto {
    fn eval(&self, cx: &KtoCx<'_>, log: &mut TermLog) -> Result<Tensor> {
        let b = self.beta;
        let r = cx.reference()?;
        let n = cx.labels.len().max(1) as f64;
        let z0 = (r.policy_kl_logps.iter().zip(&r.ref_kl_logps).map(|(p, q)| p - q).sum::<f64>() / n).max(0.0);
        let ratio = ops::sub(&cx.logps, &constant(r.ref_logps.clone(), &cx.logps)?)?;
        // x = β·s·(ratio − z₀) with s = +1 desirable, −1 undesirable; loss = w·(1 − σ(x)).
        let sign: Vec<f64> = cx.labels.iter().map(|&l| if l { b } else { -b }).collect();
        let x = ops::mul(&ops::add_scalar(&ratio, -z0)?, &constant(sign, &cx.logps)?)?;
        let w: Vec<f64> = cx.labels.iter().map(|&l| if l { self.desirable_weight } else { self.undesirable_weight }).collect();
        let per_item = ops::mul(&ops::add_scalar(&ops::scale(&ops::pointwise(&x, Pointwise::Sigmoid)?, -1.0)?, 1.0)?, &constant(w, &cx.logps)?)?;
        let loss = mean(&per_item)?;
        let rewards: Vec<f64> = ratio.to_f64_vec()?.iter().map(|v| b * v).collect();
        let logps = cx.logps.to_f64_vec()?;
        let (rc, rr) = (mean_where(&rewards, &cx.labels, true), mean_where(&rewards, &cx.labels, false));
        log.push(("loss/kto", loss.to_scalar()?));
        log.push(("kl", z0));
        log.push(("rewards/chosen", rc));
        log.push(("rewards/rejected", rr));
        log.push(("rewards/margins", rc - rr));
        log.push(("logps/chosen", mean_where(&logps, &cx.labels, true)));
        log.push(("logps/rejected", mean_where(&logps, &cx.labels, false)));
        Ok(loss)
    }
}
