//! Next-token cross-entropy: Hugging Face's causal-LM loss, mean over labels that are not −100.

use super::{Loss, StepCx, Term, TermLog};
use crate::adapters::Adapter;
use crate::error::Result;
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
        // Fused with the output projection when the step carries hidden states (no [tokens, vocab] logits).
        let l = cx.causal_lm_loss()?;
        log.push(("ce", l.to_scalar()?));
        Ok(l)
    }
}
