//! Trainers specialised at compile time from (model, adapter, loss, optimizer).
//!
//! [`Trainer`] is generic over all four, so a step is one monomorphised function: the loss's terms
//! are inlined, there is no dynamic dispatch inside it, and it holds no state the loss does not
//! need (a reference forward runs only when a term asks for it).

use crate::adapters::{Adapter, AdapterFormat, AdapterHost};
use crate::error::Result;
use crate::loss::{StepCx, Term, TermLog};
use crate::models::{ForwardInput, Llama};
use crate::optim::{Optimizer, OptimizerConfig};
use crate::tensor::Tensor;
use std::path::Path;

/// One batch of language-model training: inputs and labels (−100 = not trained).
#[derive(Clone, Debug)]
pub struct Batch {
    pub input: ForwardInput,
    pub labels: Tensor,
}

/// What one step reports.
#[derive(Clone, Debug)]
pub struct StepLog {
    pub step: u64,
    /// The total loss.
    pub loss: f64,
    /// Each named term, unscaled.
    pub terms: TermLog,
    /// Tokens that carried a label.
    pub trained_tokens: usize,
}

/// A trainer for `Llama<A>` with loss `L` and optimizer `O`.
pub struct Trainer<A: Adapter, L, O: Optimizer> {
    pub model: Llama<A>,
    pub loss: L,
    pub optimizer: O,
    step: u64,
}

impl<A: Adapter, L, O: Optimizer> Trainer<A, L, O>
where
    L: for<'a> Term<StepCx<'a, A>>,
{
    /// Builds the optimizer over the model's trainable parameters (with their learning-rate
    /// multipliers, e.g. LoRA+) and puts the model in training mode.
    pub fn new<C: OptimizerConfig<Optimizer = O>>(mut model: Llama<A>, loss: L, optimizer: C) -> Trainer<A, L, O> {
        let params = model.trainable_with_lr_scale().into_iter().map(|(_, t, s)| (t, s)).collect();
        model.training = true;
        Trainer { model, loss, optimizer: optimizer.build(params), step: 0 }
    }

    /// Forward, loss, backward, update.
    pub fn step(&mut self, batch: &Batch) -> Result<StepLog> {
        let logits = self.model.forward(&batch.input)?;
        let cx = StepCx::new(&self.model, &batch.input, &batch.labels, logits);
        let mut terms = TermLog::new();
        let loss = self.loss.eval(&cx, &mut terms)?;
        let trained_tokens = cx.shifted_targets()?.to_vec::<i64>()?.iter().filter(|&&y| y != crate::ops::IGNORE_INDEX).count();
        let grads = loss.backward()?;
        drop(cx);
        self.optimizer.step(&grads)?;
        self.step += 1;
        Ok(StepLog { step: self.step, loss: loss.to_scalar()?, terms, trained_tokens })
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The trained model, back in inference mode.
    pub fn into_model(mut self) -> Llama<A> {
        self.model.training = false;
        self.model
    }
}

impl<A: AdapterFormat, L, O: Optimizer> Trainer<A, L, O> {
    /// Saves adapter `name` as a PEFT-style folder.
    pub fn save_adapter(&self, name: &str, dir: &Path) -> Result<()> {
        AdapterHost::save_adapter::<A>(&self.model, name, dir, None)
    }
}
