//! KL regularisation toward a frozen reference policy, on the trained positions:
//!
//! kl = mean over positions t with a label of KL(π_θ(·|x<t) ‖ π_ref(·|x<t)), over the full vocabulary.

use super::{Loss, StepCx, Term, TermLog};
use crate::adapters::{Adapter, Switchable};
use crate::error::{Error, Result};
use crate::models::Llama;
use crate::ops;
use crate::tensor::Tensor;
use std::sync::Arc;

/// KL from the base model with its adapters switched off (no second copy of the weights).
/// Logged as `kl`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Kl;

/// KL toward the model's own base (adapters off): `ce() + 0.1 * kl()`.
pub fn kl() -> Loss<Kl> {
    Loss(Kl)
}

/// KL toward an explicit frozen reference model (full fine-tuning). Logged as `kl`.
#[derive(Clone)]
pub struct KlTo {
    pub reference: Arc<Llama>,
}

/// KL toward `reference`, which is kept frozen.
pub fn kl_to(reference: Llama) -> Loss<KlTo> {
    Loss(KlTo { reference: Arc::new(reference) })
}

/// Mean token KL over positions whose shifted target is not −100.
fn masked_mean_kl<A: Adapter>(cx: &StepCx<'_, A>, reference: &Tensor) -> Result<Tensor> {
    let logits = cx.logits()?;
    let (b, t, v) = (logits.shape()[0], logits.shape()[1], logits.shape()[2]);
    let kl = ops::token_kl(&ops::reshape(logits, &[b * t, v])?, &ops::reshape(reference, &[b * t, v])?)?;
    let mask: Vec<f64> = cx.shifted_targets()?.to_vec::<i64>()?.iter().map(|&y| if y == ops::IGNORE_INDEX { 0.0 } else { 1.0 }).collect();
    let n = mask.iter().sum::<f64>();
    if n == 0.0 {
        return Err(Error::Input("kl: every label is -100, so no position is regularised".into()));
    }
    let mask = Tensor::from_vec(mask, &[b * t], kl.device())?.to_dtype(kl.dtype())?;
    ops::scale(&ops::sum(&ops::mul(&kl, &mask)?)?, 1.0 / n)
}

impl<A: Switchable> Term<StepCx<'_, A>> for Kl {
    fn eval(&self, cx: &StepCx<'_, A>, log: &mut TermLog) -> Result<Tensor> {
        let l = masked_mean_kl(cx, cx.reference_logits()?)?;
        log.push(("kl", l.to_scalar()?));
        Ok(l)
    }
}

impl<A: Adapter> Term<StepCx<'_, A>> for KlTo {
    fn eval(&self, cx: &StepCx<'_, A>, log: &mut TermLog) -> Result<Tensor> {
        let r = self.reference.reference_forward(cx.input)?;
        let l = masked_mean_kl(cx, &r)?;
        log.push(("kl", l.to_scalar()?));
        Ok(l)
    }
}
