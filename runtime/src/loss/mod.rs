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
pub mod kto;
pub mod policy;
pub mod preference;
pub mod reward;

pub use ce::{ce, Ce};
pub use kl::{kl, kl_to, Kl, KlTo};
pub use kto::{kto, Kto, KtoCx, KtoReference};
pub use policy::{grpo, ppo_clip, ref_kl, token_weights, value_loss, ClippedPolicy, LossType, PolicyCx, RefKl, ValueLoss};
pub use preference::{ce_on_chosen, dpo, dpo_loss, hinge, ipo, orpo, simpo, CeOnChosen, Dpo, DpoLoss, Orpo, PairCx, PairTerm, Simpo, Weighted};
pub use reward::{bradley_terry, BradleyTerry, RewardCx};

use crate::adapters::Adapter;
use crate::error::Result;
use crate::models::{ForwardInput, Llama};
use crate::ops;
use crate::tensor::Tensor;
use std::cell::OnceCell;

/// What a language-model training step has computed, shared by every term of its loss.
///
/// Built from the final hidden states ([`StepCx::from_hidden`], the fused path: cross-entropy then
/// never forms the `[batch, seq, vocab]` logits) or from logits ([`StepCx::new`]). Terms that need
/// the full logits (KL) get them from [`StepCx::logits`], computed once on first use.
pub struct StepCx<'a, A: Adapter> {
    pub model: &'a Llama<A>,
    pub input: &'a ForwardInput,
    /// Labels `[batch, seq]` (−100 = not trained), unshifted as Hugging Face takes them.
    pub labels: &'a Tensor,
    /// Final hidden states `[batch, seq, hidden]` (after the last norm), with gradients.
    hidden: Option<Tensor>,
    /// The policy's logits `[batch, seq, vocab]`, with gradients.
    logits: OnceCell<Tensor>,
    reference_logits: OnceCell<Tensor>,
}

impl<'a, A: Adapter> StepCx<'a, A> {
    /// A step whose logits are already computed.
    pub fn new(model: &'a Llama<A>, input: &'a ForwardInput, labels: &'a Tensor, logits: Tensor) -> Self {
        StepCx { model, input, labels, hidden: None, logits: OnceCell::from(logits), reference_logits: OnceCell::new() }
    }

    /// A step from the final hidden states (`model.hidden_states(input)`): cross-entropy runs fused
    /// with the output projection ([`causal_lm_loss`]) and the logits are only formed when a term asks.
    pub fn from_hidden(model: &'a Llama<A>, input: &'a ForwardInput, labels: &'a Tensor, hidden: Tensor) -> Self {
        StepCx { model, input, labels, hidden: Some(hidden), logits: OnceCell::new(), reference_logits: OnceCell::new() }
    }

    /// The final hidden states, when the step was built from them.
    pub fn hidden(&self) -> Option<&Tensor> {
        self.hidden.as_ref()
    }

    /// The policy's logits `[batch, seq, vocab]` (computed from the hidden states on first use).
    pub fn logits(&self) -> Result<&Tensor> {
        if let Some(t) = self.logits.get() {
            return Ok(t);
        }
        let h = self.hidden.as_ref().ok_or_else(|| crate::Error::Input("StepCx has neither logits nor hidden states".into()))?;
        let t = ops::linear(h, self.model.lm_head_weight(), None)?;
        Ok(self.logits.get_or_init(|| t))
    }

    /// Hugging Face's causal-LM loss of this step: fused from the hidden states when present (unless
    /// the logits were already formed), else from the logits.
    pub fn causal_lm_loss(&self) -> Result<Tensor> {
        match (&self.hidden, self.logits.get()) {
            (Some(h), None) => causal_lm_loss(h, self.model.lm_head_weight(), self.labels),
            _ => Llama::loss(self.logits()?, self.labels),
        }
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

/// Hugging Face's causal-LM loss from the final hidden states `[batch, seq, hidden]` and the output
/// projection `lm_head` `[vocab, hidden]` (`model.lm_head_weight()`), fused so the logits are never
/// formed ([`ops::linear_cross_entropy`]): logits at t predict labels at t+1 (−100 ignored), mean over
/// counted tokens. Equals `Llama::loss(&ops::linear(hidden, lm_head, None)?, labels)`.
pub fn causal_lm_loss(hidden: &Tensor, lm_head: &Tensor, labels: &Tensor) -> Result<Tensor> {
    crate::error::ensure_shape!(hidden.rank() == 3, "loss", "hidden states must be [batch, seq, hidden], got {:?}", hidden.shape());
    let (b, t, d) = (hidden.shape()[0], hidden.shape()[1], hidden.shape()[2]);
    crate::error::ensure_shape!(labels.shape() == [b, t], "loss", "labels {:?} do not match hidden states [{b}, {t}, {d}]", labels.shape());
    let targets = shifted_targets(labels)?;
    let count = targets.to_vec::<i64>()?.iter().filter(|&&y| y != ops::IGNORE_INDEX).count();
    if count == 0 {
        return Err(crate::Error::Input("cross_entropy: every label is -100, so no token is trained".into()));
    }
    // The targets stay on the host: the op checks them there and uploads them once. Uploading them
    // here would make it download them again to check, a device synchronisation in mid-step.
    let nll = ops::linear_cross_entropy(&ops::reshape(hidden, &[b * t, d])?, lm_head, &targets)?;
    ops::scale(&ops::sum(&nll)?, 1.0 / count as f64)
}

/// Per-token log-probabilities of the next-token labels from hidden states, `[batch, seq]`
/// (0 where the shifted label is −100 and at the last position): log π(label[t+1] | x≤t), fused with the
/// output projection. The input preference and RL losses sum per sequence.
pub fn causal_lm_token_logprobs(hidden: &Tensor, lm_head: &Tensor, labels: &Tensor) -> Result<Tensor> {
    crate::error::ensure_shape!(hidden.rank() == 3, "logprobs", "hidden states must be [batch, seq, hidden], got {:?}", hidden.shape());
    let (b, t, d) = (hidden.shape()[0], hidden.shape()[1], hidden.shape()[2]);
    crate::error::ensure_shape!(
        labels.shape() == [b, t],
        "logprobs",
        "labels {:?} do not match hidden states [{b}, {t}, {d}]",
        labels.shape()
    );
    // Host targets: checked on the host and uploaded once by the op (see `causal_lm_loss`).
    let lp = ops::linear_token_logprobs(&ops::reshape(hidden, &[b * t, d])?, lm_head, &shifted_targets(labels)?)?;
    ops::reshape(&lp, &[b, t])
}

/// Labels moved one step left per row so logits at t predict labels at t+1 (−100 at the end).
pub fn shifted_targets(labels: &Tensor) -> Result<Tensor> {
    let (b, t) = (labels.shape()[0], labels.shape()[1]);
    let l = labels.to_dtype(crate::DType::I64)?.to_vec::<i64>()?;
    let mut shifted = vec![ops::IGNORE_INDEX; b * t];
    for r in 0..b {
        shifted[r * t..r * t + t - 1].copy_from_slice(&l[r * t + 1..r * t + t]);
    }
    Tensor::from_vec(shifted, &[b * t], labels.device())
}

/// The value of each named term of one step, unscaled, in the order they appear in the loss.
pub type TermLog = Vec<(&'static str, f64)>;

/// A loss term computable from context `Cx`.
#[diagnostic::on_unimplemented(
    message = "the loss term `{Self}` cannot be computed from `{Cx}`",
    label = "this loss needs something the trainer cannot supply",
    note = "`kl()` needs a reference policy: attach an adapter (the base with adapters off is the reference) or use `kl_to(reference_model)`",
    note = "pair losses (`dpo`, `ipo`, `simpo`, `orpo`, `ce_on_chosen`) train with `Trainer::preference`, `kto` with `Trainer::kto`, `bradley_terry` with `Trainer::reward_model`",
    note = "policy losses (`grpo`, `ppo_clip`, `ref_kl`, `value_loss`) train on sampled completions with `Trainer::rl`"
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::gradcheck::{max_gradient_error, test_values};
    use crate::formats::hf_config::ModelConfig;
    use crate::Device;

    fn labels() -> Tensor {
        Tensor::from_vec(vec![3i64, 1, -100, 7, 0, 2, 9, -100], &[2, 4], Device::Cpu).unwrap()
    }

    /// The fused causal-LM loss equals `Llama::loss` on `linear(hidden, lm_head)` in value and in
    /// both gradients, and its gradients match finite differences (f64).
    #[test]
    fn causal_lm_loss_matches_unfused_and_finite_differences() {
        let (b, t, d, v) = (2, 4, 5, 11);
        let h = Tensor::from_vec(test_values(b * t * d, 11), &[b, t, d], Device::Cpu).unwrap().requires_grad();
        let w = Tensor::from_vec(test_values(v * d, 12).iter().map(|x| x * 2.0).collect::<Vec<f64>>(), &[v, d], Device::Cpu)
            .unwrap()
            .requires_grad();
        let fused = causal_lm_loss(&h, &w, &labels()).unwrap();
        let plain = Llama::loss(&ops::linear(&h, &w, None).unwrap(), &labels()).unwrap();
        assert!((fused.to_scalar().unwrap() - plain.to_scalar().unwrap()).abs() < 1e-12);
        let (gf, gp) = (fused.backward().unwrap(), plain.backward().unwrap());
        for x in [&h, &w] {
            for (a, c) in gf.get(x).unwrap().to_f64_vec().unwrap().iter().zip(gp.get(x).unwrap().to_f64_vec().unwrap()) {
                assert!((a - c).abs() < 1e-12, "{a} vs {c}");
            }
        }
        let err = max_gradient_error(
            |x| causal_lm_loss(&x[0], &x[1], &labels()),
            &[(test_values(b * t * d, 13), vec![b, t, d]), (test_values(v * d, 14), vec![v, d])],
            1e-6,
        )
        .unwrap();
        assert!(err < 1e-8, "max error {err}");
        // Per-token log-probs: −nll at the shifted targets, 0 at ignored and last positions.
        let lp = causal_lm_token_logprobs(&h.detach(), &w.detach(), &labels()).unwrap();
        assert_eq!(lp.shape(), [b, t]);
        let lpv = lp.to_f64_vec().unwrap();
        assert!(lpv[1] == 0.0 && lpv[3] == 0.0 && lpv[7] == 0.0 && lpv[0] < 0.0);
    }

    /// The `ce` term gives the same loss and hidden-state gradient from hidden states (fused) as
    /// from logits.
    #[test]
    fn ce_term_from_hidden_equals_ce_from_logits() {
        let json = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "vocab_size": 40, "tie_word_embeddings": false}"#;
        let cfg = ModelConfig::from_json(std::path::Path::new("config.json"), json).unwrap();
        let model = Llama::random(cfg, 0.5, 3, crate::DType::F32).unwrap();
        let ids = Tensor::from_vec(vec![1u32, 5, 9, 2, 7, 3, 0, 11], &[2, 4], Device::Cpu).unwrap();
        let input = ForwardInput::ids(ids);
        let h = model.hidden_states(&input).unwrap().detach().requires_grad();
        let y = labels();
        let fused = StepCx::from_hidden(&model, &input, &y, h.clone());
        let plain = StepCx::new(&model, &input, &y, ops::linear(&h, model.lm_head_weight(), None).unwrap());
        let (mut l1, mut l2) = (TermLog::new(), TermLog::new());
        let a = ce().eval(&fused, &mut l1).unwrap();
        let b = ce().eval(&plain, &mut l2).unwrap();
        assert!((a.to_scalar().unwrap() - b.to_scalar().unwrap()).abs() < 1e-5, "{l1:?} vs {l2:?}");
        assert!(fused.logits.get().is_none(), "the fused ce formed the logits");
        let (ga, gb) = (a.backward().unwrap(), b.backward().unwrap());
        for (x, z) in ga.get(&h).unwrap().to_f64_vec().unwrap().iter().zip(gb.get(&h).unwrap().to_f64_vec().unwrap()) {
            assert!((x - z).abs() < 1e-6, "{x} vs {z}");
        }
        // Terms that need the logits still get them from the hidden states.
        assert_eq!(fused.logits().unwrap().shape(), [2, 4, 40]);
    }
}
