//! Next-token cross-entropy: Hugging Face's causal-LM loss, mean over labels that are not −100.

use super::{StepCx, Term, TermLog, Loss};
use crate::adapters::Adapter;
use crate::error::Result;
use crate::models::Llama;
use crate::tensor::Tensor;

/// Cross-entropy of the policy's next-token predictions against the labels. Logged as `ce`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ce;

/// The cross-entropy term.
pub fn ce() -> Loss<Ce> {
    Loss(Ce)
}

impl<A: Adapter> Term<StepCx<'_, A>> for Ce {
    fn eval(&self, cx: &StepCx<'_, A>, log: &mut TermLog) -> Result<Tensor> {
        let l = Llama::loss(&cx.logits, cx.labels)?;
        log.push(("ce", l.to_scalar()?));
        Ok(l)
    }
}
