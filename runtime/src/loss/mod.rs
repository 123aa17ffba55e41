//! Losses composed in code: terms are values that add and scale, `ce() + 0.1 * kl()`.
//!
//! Each term implements [`Term`] for the step contexts that can feed it. What a term needs is a
//! trait bound: [`kl`] needs a reference policy, which a model with an adapter has for free (the
//! same weights with the adapter switched off), so `kl()` on a model without one does not
//! compile — use [`kl_to`] with a reference model. A trainer is generic over its loss type, so a
//! composed loss is one monomorphised function with no dynamic dispatch, and work a term does not
//! ask for (the reference forward) is never done.
//!
//! ```
//! use temper_runtime::loss::{ce, kl, Loss, Sum, Scaled, Ce, Kl};
//! let loss = ce() + 0.1 * kl();
//! let _: Loss<Sum<Ce, Scaled<Kl>>> = loss;
//! ```

mod ce;
mod kl;

pub use ce::{ce, Ce};
pub use kl::{kl, kl_to, Kl, KlTo};

use crate::adapters::Adapter;
use crate::error::Result;
use crate::models::{ForwardInput, Llama};
use crate::ops;
use crate::tensor::Tensor;
use std::cell::OnceCell;

/// What a language-model training step has computed, shared by every term of its loss.
pub struct StepCx<'a, A: Adapter> {
    pub model: &'a Llama<A>,
    pub input: &'a ForwardInput,
    /// Labels `[batch, seq]` (−100 = not trained), unshifted as Hugging Face takes them.
    pub labels: &'a Tensor,
    /// The policy's logits `[batch, seq, vocab]`, with gradients.
    pub logits: Tensor,
    reference_logits: OnceCell<Tensor>,
}

impl<'a, A: Adapter> StepCx<'a, A> {
    pub fn new(model: &'a Llama<A>, input: &'a ForwardInput, labels: &'a Tensor, logits: Tensor) -> Self {
        StepCx { model, input, labels, logits, reference_logits: OnceCell::new() }
    }

    /// The reference policy's logits (the model with adapters off), computed once on first use.
    pub fn reference_logits(&self) -> Result<&Tensor> {
        if let Some(t) = self.reference_logits.get() {
            return Ok(t);
        }
        let t = self.model.reference_forward(self.input)?;
        Ok(self.reference_logits.get_or_init(|| t))
    }

    /// Targets shifted for next-token prediction, flattened `[batch·seq]` (−100 at the last position).
    pub fn shifted_targets(&self) -> Result<Tensor> {
        shifted_targets(self.labels)
    }
}

/// Labels moved one step left per row so logits at t predict labels at t+1 (−100 at the end).
pub fn shifted_targets(labels: &Tensor) -> Result<Tensor> {
    let (b, t) = (labels.shape()[0], labels.shape()[1]);
    let l = labels.to_dtype(crate::DType::I64)?.to_vec::<i64>()?;
    let mut shifted = vec![ops::IGNORE_INDEX; b * t];
    for r in 0..b {
        shifted[r * t..r * t + t - 1].copy_from_slice(&l[r * t + 1..r * t + t]);
    }
    Tensor::from_vec(shifted, &[b * t], crate::Device::Cpu)
}

/// The value of each named term of one step, unscaled, in the order they appear in the loss.
pub type TermLog = Vec<(&'static str, f64)>;

/// A loss term computable from context `Cx`.
#[diagnostic::on_unimplemented(
    message = "the loss term `{Self}` cannot be computed from `{Cx}`",
    label = "this loss needs something the trainer cannot supply",
    note = "`kl()` needs a reference policy: attach an adapter (the base with adapters off is the reference) or use `kl_to(reference_model)`"
)]
pub trait Term<Cx> {
    /// The scalar loss; records each named term's value in `log`.
    fn eval(&self, cx: &Cx, log: &mut TermLog) -> Result<Tensor>;
}

/// A loss: a term wrapped so that `+` and scalar `*` compose it.
#[derive(Clone, Copy, Debug)]
pub struct Loss<T>(pub T);

/// `a + b`.
#[derive(Clone, Copy, Debug)]
pub struct Sum<A, B>(pub A, pub B);

/// `c · t`.
#[derive(Clone, Copy, Debug)]
pub struct Scaled<T>(pub f64, pub T);

impl<A, B> std::ops::Add<Loss<B>> for Loss<A> {
    type Output = Loss<Sum<A, B>>;
    fn add(self, rhs: Loss<B>) -> Self::Output {
        Loss(Sum(self.0, rhs.0))
    }
}

impl<T> std::ops::Mul<Loss<T>> for f64 {
    type Output = Loss<Scaled<T>>;
    fn mul(self, rhs: Loss<T>) -> Self::Output {
        Loss(Scaled(self, rhs.0))
    }
}

impl<T> std::ops::Mul<Loss<T>> for f32 {
    type Output = Loss<Scaled<T>>;
    fn mul(self, rhs: Loss<T>) -> Self::Output {
        Loss(Scaled(self as f64, rhs.0))
    }
}

impl<T> std::ops::Mul<f64> for Loss<T> {
    type Output = Loss<Scaled<T>>;
    fn mul(self, c: f64) -> Self::Output {
        Loss(Scaled(c, self.0))
    }
}

impl<Cx, T: Term<Cx>> Term<Cx> for Loss<T> {
    fn eval(&self, cx: &Cx, log: &mut TermLog) -> Result<Tensor> {
        self.0.eval(cx, log)
    }
}

impl<Cx, A: Term<Cx>, B: Term<Cx>> Term<Cx> for Sum<A, B> {
    fn eval(&self, cx: &Cx, log: &mut TermLog) -> Result<Tensor> {
        ops::add(&self.0.eval(cx, log)?, &self.1.eval(cx, log)?)
    }
}

impl<Cx, T: Term<Cx>> Term<Cx> for Scaled<T> {
    fn eval(&self, cx: &Cx, log: &mut TermLog) -> Result<Tensor> {
        ops::scale(&self.1.eval(cx, log)?, self.0)
    }
}
