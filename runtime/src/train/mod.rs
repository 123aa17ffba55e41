//! Trainers specialised at compile time from (model, adapter, loss, optimizer).
//!
//! [`Trainer`] is generic over all four, so a step is one monomorphised function: the loss's terms
//! are inlined, there is no dynamic dispatch inside it, and it holds no state the loss does not
//! need (a reference forward runs only when a term asks for it).

pub mod checkpoint;
pub mod preference;
pub mod rl;
pub mod schedule;
pub mod sft;

pub use schedule::{Schedule, ScheduleKind};

use crate::adapters::{Adapter, AdapterFormat, AdapterHost};
use crate::autograd::Grads;
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

impl Batch {
    /// Positions whose next-token label is trained (what the loss averages over).
    pub fn target_tokens(&self) -> Result<usize> {
        Ok(crate::loss::shifted_targets(&self.labels)?.to_vec::<i64>()?.iter().filter(|&&y| y != crate::ops::IGNORE_INDEX).count())
    }
    /// Real (unpadded) input tokens.
    pub fn input_tokens(&self) -> Result<usize> {
        Ok(match &self.input.attention_mask {
            Some(m) => m.to_vec::<i64>()?.iter().filter(|&&v| v != 0).count(),
            None => self.input.input_ids.elem_count(),
        })
    }
}

/// What one optimizer step reports.
#[derive(Clone, Debug)]
pub struct StepLog {
    pub step: u64,
    /// The total loss (mean over the step's target tokens).
    pub loss: f64,
    /// Each named term, unscaled, averaged over the micro-batches by their target tokens.
    pub terms: TermLog,
    /// Positions that carried a label.
    pub trained_tokens: usize,
    /// Real input tokens processed.
    pub input_tokens: usize,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used for this update.
    pub lr: f64,
}

/// A trainer for `Llama<A>` with loss `L` and optimizer `O`.
pub struct Trainer<A: Adapter, L, O: Optimizer> {
    pub model: Llama<A>,
    pub loss: L,
    pub optimizer: O,
    /// Where preference and RL losses get reference log-probs (default: the model with its
    /// adapters switched off).
    pub reference: preference::Reference,
    step: u64,
}

impl<A: Adapter, L, O: Optimizer> Trainer<A, L, O> {
    /// Builds the optimizer over the model's trainable parameters (with their learning-rate
    /// multipliers, e.g. LoRA+) and puts the model in training mode. The public constructors
    /// ([`Trainer::new`], [`Trainer::preference`], [`Trainer::kto`], [`Trainer::reward_model`])
    /// say what the loss is computed from, so a loss that cannot be is a compile error there.
    pub(crate) fn build<C: OptimizerConfig<Optimizer = O>>(mut model: Llama<A>, loss: L, optimizer: C) -> Trainer<A, L, O> {
        let params = model.trainable_with_lr_scale().into_iter().map(|(_, t, s)| (t, s)).collect();
        model.training = true;
        Trainer { model, loss, optimizer: optimizer.build(params), reference: preference::Reference::AdapterOff, step: 0 }
    }

    /// The reference policy of preference and RL losses ([`preference::Reference`]).
    pub fn with_reference(mut self, reference: preference::Reference) -> Self {
        self.reference = reference;
        self
    }

    /// Mean cross-entropy over the target tokens of `batches` (no gradients, adapters on,
    /// dropout off), and its perplexity.
    pub fn evaluate(&mut self, batches: &[Batch]) -> Result<(f64, f64)> {
        let was = std::mem::replace(&mut self.model.training, false);
        let r = crate::autograd::no_grad(|| {
            let (mut nll, mut n) = (0.0, 0usize);
            for b in batches {
                let k = b.target_tokens()?;
                if k == 0 {
                    continue;
                }
                nll += crate::loss::causal_lm_loss(&self.model.hidden_states(&b.input)?, self.model.lm_head_weight(), &b.labels)?.to_scalar()? * k as f64;
                n += k;
            }
            if n == 0 {
                return Err(crate::Error::Input("the eval set has no target tokens".into()));
            }
            Ok((nll / n as f64, (nll / n as f64).exp()))
        });
        self.model.training = was;
        r
    }

    /// Sets the step counter (resuming from a checkpoint).
    pub fn set_steps(&mut self, step: u64) {
        self.step = step;
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

    /// One optimizer step over `micro`: `f` gives each micro-batch's loss (a mean over its
    /// `units`: target tokens, pairs, items), which is weighted by its share of the step's units so
    /// the step equals one big batch. `lr` (when given) is set first; gradients are clipped to
    /// `max_grad_norm`. A non-finite loss or gradient norm is an error and the weights are left untouched.
    pub fn update<B>(
        &mut self,
        micro: &[B],
        units: &[usize],
        input_tokens: &[usize],
        lr: Option<f64>,
        max_grad_norm: Option<f64>,
        mut f: impl FnMut(&Self, &B, &mut TermLog) -> Result<Tensor>,
    ) -> Result<StepLog> {
        let total: usize = units.iter().sum();
        if total == 0 {
            return Err(crate::Error::Input(format!("step {}: nothing to train on in {} micro-batches (every label is -100)", self.step + 1, micro.len())));
        }
        let mut grads = Grads::default();
        let (mut loss_sum, mut terms, mut tokens) = (0.0, TermLog::new(), 0);
        for ((batch, &n), &k) in micro.iter().zip(units).zip(input_tokens) {
            if n == 0 {
                continue;
            }
            let w = n as f64 / total as f64;
            let mut t = TermLog::new();
            let loss = crate::ops::scale(&f(&*self, batch, &mut t)?, w)?;
            loss_sum += loss.to_scalar()?;
            merge_terms(&mut terms, t, w);
            grads.accumulate(loss.backward()?)?;
            tokens += k;
        }
        let grad_norm = grads.global_norm()?;
        if !loss_sum.is_finite() || !grad_norm.is_finite() {
            return Err(crate::Error::Input(format!(
                "step {}: the loss is {loss_sum} and the gradient norm {grad_norm}; stopping before the update (lower the learning rate or check the data)",
                self.step + 1
            )));
        }
        if let Some(max) = max_grad_norm.filter(|&m| m > 0.0 && grad_norm > m) {
            grads.scale(max / (grad_norm + 1e-6))?;
        }
        if let Some(lr) = lr {
            self.optimizer.set_lr(lr);
        }
        self.optimizer.step(&grads)?;
        self.step += 1;
        Ok(StepLog { step: self.step, loss: loss_sum, terms, trained_tokens: total, input_tokens: tokens, grad_norm, lr: lr.unwrap_or(f64::NAN) })
    }
}

/// Adds `w ·` each of a micro-batch's named values into `acc`. A name a micro-batch logged twice
/// (the reward metrics of two DPO-family terms) counts once.
pub(crate) fn merge_terms(acc: &mut TermLog, t: TermLog, w: f64) {
    let mut seen: Vec<&'static str> = Vec::new();
    for (name, v) in t {
        if seen.contains(&name) {
            continue;
        }
        seen.push(name);
        match acc.iter_mut().find(|(k, _)| *k == name) {
            Some((_, a)) => *a += w * v,
            None => acc.push((name, w * v)),
        }
    }
}

impl<A: Adapter, L, O: Optimizer> Trainer<A, L, O>
where
    L: for<'a> Term<StepCx<'a, A>>,
{
    /// A language-model trainer (SFT and losses over its logits): the optimizer over the model's
    /// trainable parameters (with their learning-rate multipliers, e.g. LoRA+), the model in
    /// training mode.
    pub fn new<C: OptimizerConfig<Optimizer = O>>(model: Llama<A>, loss: L, optimizer: C) -> Trainer<A, L, O> {
        Self::build(model, loss, optimizer)
    }

    /// Forward, loss, backward, update on one batch at the optimizer's current learning rate.
    pub fn step(&mut self, batch: &Batch) -> Result<StepLog> {
        self.step_accumulated(std::slice::from_ref(batch), None, None)
    }

    /// One optimizer step over several micro-batches. Each micro-batch's loss (a mean over its
    /// target tokens) is weighted by its share of the step's target tokens, so the step equals one
    /// big batch. `lr` (when given) is set first; gradients are clipped to `max_grad_norm`.
    /// A non-finite loss or gradient norm is an error and the weights are left untouched.
    pub fn step_accumulated(&mut self, micro: &[Batch], lr: Option<f64>, max_grad_norm: Option<f64>) -> Result<StepLog> {
        let counts = micro.iter().map(Batch::target_tokens).collect::<Result<Vec<_>>>()?;
        let tokens = micro.iter().map(Batch::input_tokens).collect::<Result<Vec<_>>>()?;
        self.update(micro, &counts, &tokens, lr, max_grad_norm, |tr, batch, log| {
            // Hidden states, not logits: the loss projects them chunk by chunk over the vocabulary
            // (fused linear cross-entropy), so [tokens, vocab] logits are only formed if a term asks.
            let hidden = tr.model.hidden_states(&batch.input)?;
            let cx = StepCx::from_hidden(&tr.model, &batch.input, &batch.labels, hidden);
            tr.loss.eval(&cx, log)
        })
    }

}

impl<A: AdapterFormat, L, O: Optimizer> Trainer<A, L, O> {
    /// Saves adapter `name` as a PEFT-style folder.
    pub fn save_adapter(&self, name: &str, dir: &Path) -> Result<()> {
        AdapterHost::save_adapter::<A>(&self.model, name, dir, None)
    }
}
