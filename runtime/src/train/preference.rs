//! Preference (DPO family, SimPO, ORPO), KTO and reward-model steps.
//!
//! A pair batch forwards its chosen and rejected sequences together, packed several to a row
//! where they fit ([`seq_batch`]), so no compute goes to padding; each sequence's completion
//! log-probs are summed from the fused per-token log-probs. The reference policy's log-probs come
//! from the [`Reference`] the trainer holds: the same weights with the adapters switched off
//! (LoRA: no second copy), a frozen copy, or values computed once before training.

use super::{merge_terms, Batch, StepLog, Trainer};
use crate::adapters::{Adapter, AdapterHost};
use crate::data::preference::{seq_batch, KtoItem, PreferencePair, SeqBatch, Sequence, Span};
use crate::error::{Error, Result};
use crate::loss::{KtoCx, KtoReference, PairCx, RewardCx, Term, TermLog};
use crate::models::{Llama, Mode};
use crate::ops;
use crate::optim::{Optimizer, OptimizerConfig};
use crate::tensor::Tensor;
use std::sync::Arc;

/// Where reference log-probs come from.
#[derive(Clone)]
pub enum Reference {
    /// The policy with its adapters switched off: the base the adapter was attached to, at no
    /// extra memory. Needs an adapter (with full fine-tuning the policy *is* the base).
    AdapterOff,
    /// A frozen copy of the initial model (full fine-tuning).
    Model(Arc<Llama>),
    /// Values computed once before training and carried by each batch
    /// ([`precompute_pair_reference`], [`precompute_kto_reference`]).
    Precomputed,
}

/// Pairs laid out for one step: chosen sequences first, then rejected, in one [`SeqBatch`].
#[derive(Clone, Debug)]
pub struct PairBatch {
    pub seqs: SeqBatch,
    pub chosen_tokens: Vec<usize>,
    pub rejected_tokens: Vec<usize>,
    pub margins: Vec<f64>,
    /// Precomputed reference logps (chosen, rejected).
    pub ref_logps: Option<(Vec<f64>, Vec<f64>)>,
}

impl PairBatch {
    pub fn pairs(&self) -> usize {
        self.chosen_tokens.len()
    }
}

/// Reward-model batches are pair batches scored by the `score` head.
#[derive(Clone, Debug)]
pub struct RewardBatch(pub PairBatch);

/// `pairs` in micro-batches of `micro_batch_size` pairs (the last may be smaller). `pack` puts
/// several sequences in a row where they fit; otherwise each is right-padded to the longest.
pub fn pair_batches(pairs: &[PreferencePair], micro_batch_size: usize, pad_id: u32, pack: bool) -> Result<Vec<PairBatch>> {
    if micro_batch_size == 0 {
        return Err(Error::Input("micro_batch_size must be at least 1".into()));
    }
    pairs
        .chunks(micro_batch_size)
        .map(|chunk| {
            let seqs: Vec<&Sequence> = chunk.iter().map(|p| &p.chosen).chain(chunk.iter().map(|p| &p.rejected)).collect();
            Ok(PairBatch {
                seqs: seq_batch(&seqs, pad_id, pack)?,
                chosen_tokens: chunk.iter().map(|p| p.chosen.scored_tokens()).collect(),
                rejected_tokens: chunk.iter().map(|p| p.rejected.scored_tokens()).collect(),
                margins: chunk.iter().map(|p| p.margin).collect(),
                ref_logps: None,
            })
        })
        .collect()
}

/// Σ log π over each sequence's completion `[sequences]`, in the order of `sb.spans`.
pub fn sequence_logps<A: Adapter>(model: &Llama<A>, sb: &SeqBatch, mode: Mode) -> Result<Tensor> {
    let hidden = model.hidden_states_mode(&sb.input, mode)?;
    span_logps(model, &hidden, sb, Span::completion, sb.spans.len())
}

/// Σ log π of tokens `range(span)` (token indices within each sequence; the first token is never
/// scored) of the first `n` sequences of `sb`, from the final hidden states `[rows, seq, hidden]`.
///
/// Only the scored positions go through the output projection: their hidden rows are gathered
/// (the prompt's are not projected onto the vocabulary at all), the fused per-token log-probs
/// computed, and each sequence's summed by a product with a 0/1 matrix, so the gradient reaches
/// every scored token.
fn span_logps<A: Adapter>(model: &Llama<A>, hidden: &Tensor, sb: &SeqBatch, range: impl Fn(&crate::data::preference::Span) -> std::ops::Range<usize>, n: usize) -> Result<Tensor> {
    let (lp, owner, _) = token_logps(model, hidden, sb, range, n, 1.0)?;
    let m = owner.len();
    let mut ind = vec![0f32; n * m];
    for (j, &i) in owner.iter().enumerate() {
        ind[i * m + j] = 1.0;
    }
    let ind = Tensor::from_vec(ind, &[n, m], crate::Device::Cpu)?.to_dtype(lp.dtype())?.to_device(lp.device())?;
    let y = ops::linear(&ind, &ops::reshape(&lp, &[1, m])?, None)?;
    ops::reshape(&y, &[n])
}

/// The final hidden rows `[m, hidden]` that score every token `range(span)` of the first `n`
/// sequences of `sb` (in sequence order), the tokens they score and the sequence each belongs to.
pub(crate) fn scored_rows(hidden: &Tensor, sb: &SeqBatch, range: impl Fn(&crate::data::preference::Span) -> std::ops::Range<usize>, n: usize) -> Result<(Tensor, Vec<i64>, Vec<usize>)> {
    let (rows, t, d) = (hidden.shape()[0], hidden.shape()[1], hidden.shape()[2]);
    let ids = sb.input.input_ids.to_vec::<i64>()?;
    // The logits at position p score token p + 1: token k of a span is read at start + k − 1.
    let (mut pos, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
    for (i, s) in sb.spans[..n].iter().enumerate() {
        let r = range(s);
        for k in r.start.max(1)..r.end.min(s.len) {
            let p = s.row * t + s.start + k - 1;
            pos.push(p as u32);
            targets.push(ids[p + 1]);
            owner.push(i);
        }
    }
    let m = pos.len();
    if m == 0 {
        return Err(Error::Input("no scored token in the batch (every completion is empty)".into()));
    }
    let flat = ops::reshape(hidden, &[rows * t, d])?;
    let picked = ops::embedding(&flat, &Tensor::from_vec(pos, &[m], crate::Device::Cpu)?.to_device(hidden.device())?)?;
    Ok((picked, targets, owner))
}

/// log π of every token `range(span)` of the first `n` sequences of `sb`, `[m]` in sequence order,
/// under logits / `temperature`, with the sequence each token belongs to. Only these rows
/// ([`scored_rows`]) are projected onto the vocabulary (fused per-token log-probs).
pub(crate) fn token_logps<A: Adapter>(
    model: &Llama<A>,
    hidden: &Tensor,
    sb: &SeqBatch,
    range: impl Fn(&crate::data::preference::Span) -> std::ops::Range<usize>,
    n: usize,
    temperature: f64,
) -> Result<(Tensor, Vec<usize>, Tensor)> {
    let (picked, targets, owner) = scored_rows(hidden, sb, range, n)?;
    let m = owner.len();
    // logits / T = (h / T)·Wᵀ: the temperature scales the gathered rows.
    let scaled = if temperature != 1.0 { ops::scale(&picked, 1.0 / temperature)? } else { picked.clone() };
    // Targets stay on the host: the op checks and uploads them once.
    let lp = ops::linear_token_logprobs(&scaled, model.lm_head_weight(), &Tensor::from_vec(targets, &[m], crate::Device::Cpu)?)?;
    Ok((lp, owner, picked))
}

/// Reference log-probs of `sb`'s sequences (no gradients): adapters off, or the frozen copy.
fn reference_logps<A: Adapter>(model: &Llama<A>, reference: &Reference, sb: &SeqBatch) -> Result<Vec<f64>> {
    let off = Mode { adapters: false, training: false };
    crate::autograd::no_grad(|| match reference {
        Reference::AdapterOff => {
            if model.adapter_names().is_empty() {
                return Err(Error::Input(
                    "the reference policy is the base with its adapters off, but the model has no adapter (full fine-tuning): give a frozen reference model or precompute the reference log-probs".into(),
                ));
            }
            sequence_logps(model, sb, off)?.to_f64_vec()
        }
        Reference::Model(m) => sequence_logps(m.as_ref(), sb, off)?.to_f64_vec(),
        Reference::Precomputed => Err(Error::Input("the reference log-probs were to be precomputed, but this batch has none".into())),
    })
}

fn split(v: Vec<f64>, n: usize) -> (Vec<f64>, Vec<f64>) {
    let (a, b) = v.split_at(n);
    (a.to_vec(), b.to_vec())
}

/// Fills every batch's reference log-probs from `model` as it is now (adapters off when it has
/// any): call before training so the reference is the initial policy. With full fine-tuning this
/// replaces a frozen copy of the weights.
pub fn precompute_pair_reference<A: Adapter>(model: &Llama<A>, batches: &mut [PairBatch]) -> Result<()> {
    for b in batches.iter_mut() {
        let v = crate::autograd::no_grad(|| sequence_logps(model, &b.seqs, Mode { adapters: false, training: false })?.to_f64_vec())?;
        b.ref_logps = Some(split(v, b.pairs()));
    }
    Ok(())
}

/// The loss and every logged value of `f` over `eval`, each batch weighted by its `units` (pairs
/// or items): means over the set. Runs in evaluation mode (no dropout) without gradients.
fn evaluate_by<A: Adapter, L, O: Optimizer, B>(
    tr: &mut Trainer<A, L, O>,
    eval: &[B],
    units: impl Fn(&B) -> usize,
    f: impl Fn(&Trainer<A, L, O>, &B, &mut TermLog) -> Result<Tensor>,
) -> Result<Vec<(&'static str, f64)>> {
    let was = std::mem::replace(&mut tr.model.training, false);
    let total: usize = eval.iter().map(&units).sum();
    let r = crate::autograd::no_grad(|| {
        let (mut acc, mut loss) = (TermLog::new(), 0.0);
        for b in eval {
            let w = units(b) as f64 / total.max(1) as f64;
            let mut t = TermLog::new();
            loss += w * f(tr, b, &mut t)?.to_scalar()?;
            merge_terms(&mut acc, t, w);
        }
        let mut out = vec![("loss", loss)];
        out.extend(acc);
        Ok(out)
    });
    tr.model.training = was;
    r
}

impl<A: Adapter, L, O: Optimizer> Trainer<A, L, O>
where
    L: for<'a> Term<PairCx<'a>>,
{
    /// A preference trainer: `loss` is computed from pairs (DPO family, SimPO, ORPO, …). The
    /// reference is the model with its adapters off unless [`Trainer::with_reference`] says otherwise.
    pub fn preference<C: OptimizerConfig<Optimizer = O>>(model: Llama<A>, loss: L, optimizer: C) -> Self {
        Self::build(model, loss, optimizer)
    }

    /// The pair loss of one batch and its logged values.
    pub fn pair_loss(&self, b: &PairBatch, log: &mut TermLog) -> Result<Tensor> {
        let hidden = self.model.hidden_states_mode(&b.seqs.input, Mode { adapters: true, training: self.model.training })?;
        let all = b.seqs.spans.len();
        let logps = span_logps(&self.model, &hidden, &b.seqs, Span::completion, all)?;
        let n = b.pairs();
        let chosen = ops::narrow(&logps, 0, 0, n)?;
        let rejected = ops::narrow(&logps, 0, n, n)?;
        let reference = move || -> Result<(Vec<f64>, Vec<f64>)> {
            match &b.ref_logps {
                Some(r) => Ok(r.clone()),
                None => Ok(split(reference_logps(&self.model, &self.reference, &b.seqs)?, n)),
            }
        };
        // ORPO's NLL covers the chosen prompts too: their tokens are projected only if it asks.
        let chosen_c = chosen.clone();
        let whole = move || -> Result<Tensor> { ops::add(&chosen_c, &span_logps(&self.model, &hidden, &b.seqs, |s| 1..s.prompt.max(1), n)?) };
        let whole_tokens: Vec<usize> = b.seqs.spans[..n].iter().map(|s| s.len - 1).collect();
        let cx = PairCx::new(chosen, rejected, b.chosen_tokens.clone(), b.rejected_tokens.clone(), Box::new(reference)).with_whole_chosen(Box::new(whole), whole_tokens);
        self.loss.eval(&cx, log)
    }

    /// One optimizer step of a pair loss (DPO family, SimPO, ORPO, …) over `micro`, each
    /// micro-batch weighted by its pairs.
    pub fn step_pairs(&mut self, micro: &[PairBatch], lr: Option<f64>, max_grad_norm: Option<f64>) -> Result<StepLog> {
        let units: Vec<usize> = micro.iter().map(PairBatch::pairs).collect();
        let tokens: Vec<usize> = micro.iter().map(|b| b.seqs.input_tokens()).collect();
        self.update(micro, &units, &tokens, lr, max_grad_norm, |tr, b, log| tr.pair_loss(b, log))
    }

    /// The loss and every logged metric (rewards/accuracies, rewards/margins, …) over `eval`,
    /// averaged over its pairs, without gradients and with adapters on.
    pub fn evaluate_pairs(&mut self, eval: &[PairBatch]) -> Result<Vec<(&'static str, f64)>> {
        evaluate_by(self, eval, |b| b.pairs(), |tr, b, log| tr.pair_loss(b, log))
    }
}

/// KTO items laid out for one step: the items' sequences (trained) and their mismatched KL
/// sequences (each item's prompt with another item's completion, [`kl_sequences`]).
#[derive(Clone, Debug)]
pub struct KtoBatch {
    pub items: SeqBatch,
    pub kl: SeqBatch,
    pub labels: Vec<bool>,
    /// Precomputed reference logps (items, KL sequences).
    pub ref_logps: Option<(Vec<f64>, Vec<f64>)>,
}

/// The mismatched sequence of each item that KTO's KL reference point is estimated from, as TRL
/// pairs them: within each group of `group` consecutive items, item i's prompt with item i−1's
/// completion (the group's first takes its last's). Fixed for a run, so it can be precomputed.
pub fn kl_sequences(items: &[KtoItem], group: usize) -> Vec<Sequence> {
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(group.max(1)) {
        let n = chunk.len();
        out.extend((0..n).map(|i| Sequence::new(chunk[i].seq.prompt.clone(), chunk[(i + n - 1) % n].seq.completion.clone())));
    }
    out
}

/// `items` in micro-batches of `micro_batch_size`, each item with its KL sequence `kl[i]`.
pub fn kto_batches(items: &[KtoItem], kl: &[Sequence], micro_batch_size: usize, pad_id: u32, pack: bool) -> Result<Vec<KtoBatch>> {
    if micro_batch_size == 0 {
        return Err(Error::Input("micro_batch_size must be at least 1".into()));
    }
    if kl.len() != items.len() {
        return Err(Error::Input(format!("kto: {} KL sequences for {} items", kl.len(), items.len())));
    }
    items
        .chunks(micro_batch_size)
        .zip(kl.chunks(micro_batch_size))
        .map(|(chunk, kl)| {
            Ok(KtoBatch {
                items: seq_batch(&chunk.iter().map(|it| &it.seq).collect::<Vec<_>>(), pad_id, pack)?,
                kl: seq_batch(&kl.iter().collect::<Vec<_>>(), pad_id, pack)?,
                labels: chunk.iter().map(|it| it.label).collect(),
                ref_logps: None,
            })
        })
        .collect()
}

/// [`precompute_pair_reference`] for KTO batches.
pub fn precompute_kto_reference<A: Adapter>(model: &Llama<A>, batches: &mut [KtoBatch]) -> Result<()> {
    let off = Mode { adapters: false, training: false };
    for b in batches.iter_mut() {
        let r = crate::autograd::no_grad(|| Ok((sequence_logps(model, &b.items, off)?.to_f64_vec()?, sequence_logps(model, &b.kl, off)?.to_f64_vec()?)))?;
        b.ref_logps = Some(r);
    }
    Ok(())
}

impl<A: Adapter, L, O: Optimizer> Trainer<A, L, O>
where
    L: for<'a> Term<KtoCx<'a>>,
{
    /// A KTO trainer: `loss` is computed from unpaired, labelled completions.
    pub fn kto<C: OptimizerConfig<Optimizer = O>>(model: Llama<A>, loss: L, optimizer: C) -> Self {
        Self::build(model, loss, optimizer)
    }

    /// The KTO loss of one batch and its logged values.
    pub fn kto_loss(&self, b: &KtoBatch, log: &mut TermLog) -> Result<Tensor> {
        let mode = Mode { adapters: true, training: self.model.training };
        let logps = sequence_logps(&self.model, &b.items, mode)?;
        let reference = move || -> Result<KtoReference> {
            let policy_kl_logps = crate::autograd::no_grad(|| sequence_logps(&self.model, &b.kl, mode)?.to_f64_vec())?;
            let (ref_logps, ref_kl_logps) = match &b.ref_logps {
                Some(r) => r.clone(),
                None => (reference_logps(&self.model, &self.reference, &b.items)?, reference_logps(&self.model, &self.reference, &b.kl)?),
            };
            Ok(KtoReference { ref_logps, ref_kl_logps, policy_kl_logps })
        };
        let cx = KtoCx::new(logps, b.labels.clone(), Box::new(reference));
        self.loss.eval(&cx, log)
    }

    /// One optimizer step of a KTO loss over `micro`, each micro-batch weighted by its items.
    pub fn step_kto(&mut self, micro: &[KtoBatch], lr: Option<f64>, max_grad_norm: Option<f64>) -> Result<StepLog> {
        let units: Vec<usize> = micro.iter().map(|b| b.labels.len()).collect();
        let tokens: Vec<usize> = micro.iter().map(|b| b.items.input_tokens() + b.kl.input_tokens()).collect();
        self.update(micro, &units, &tokens, lr, max_grad_norm, |tr, b, log| tr.kto_loss(b, log))
    }

    /// The KTO loss and metrics over `eval`, averaged over its items.
    pub fn evaluate_kto(&mut self, eval: &[KtoBatch]) -> Result<Vec<(&'static str, f64)>> {
        evaluate_by(self, eval, |b| b.labels.len(), |tr, b, log| tr.kto_loss(b, log))
    }
}

/// The reward of each sequence of `sb` `[sequences]`: the score head at its last token (transformers
/// reads it at the last non-pad token, the same position).
pub fn sequence_rewards<A: Adapter>(model: &Llama<A>, sb: &SeqBatch, mode: Mode) -> Result<Tensor> {
    let hidden = model.hidden_states_mode(&sb.input, mode)?;
    let s = model.score_at(&hidden, &sb.last_token_index()?)?;
    if s.shape()[1] != 1 {
        return Err(Error::Input(format!("a reward model has one label, this one has {}", s.shape()[1])));
    }
    ops::reshape(&s, &[sb.spans.len()])
}

impl<A: Adapter, L, O: Optimizer> Trainer<A, L, O>
where
    L: Term<RewardCx>,
{
    /// A reward-model trainer: `loss` is computed from the scores of pairs; the model needs a
    /// score head ([`Llama::into_sequence_classifier`]).
    pub fn reward_model<C: OptimizerConfig<Optimizer = O>>(model: Llama<A>, loss: L, optimizer: C) -> Self {
        Self::build(model, loss, optimizer)
    }

    /// The reward-model loss of one batch and its logged values.
    pub fn reward_loss(&self, b: &PairBatch, log: &mut TermLog) -> Result<Tensor> {
        let r = sequence_rewards(&self.model, &b.seqs, Mode { adapters: true, training: self.model.training })?;
        let n = b.pairs();
        let cx = RewardCx { chosen: ops::narrow(&r, 0, 0, n)?, rejected: ops::narrow(&r, 0, n, n)?, margins: b.margins.clone() };
        self.loss.eval(&cx, log)
    }

    /// One optimizer step of a reward-model loss (Bradley–Terry) over `micro`.
    pub fn step_rewards(&mut self, micro: &[RewardBatch], lr: Option<f64>, max_grad_norm: Option<f64>) -> Result<StepLog> {
        let units: Vec<usize> = micro.iter().map(|b| b.0.pairs()).collect();
        let tokens: Vec<usize> = micro.iter().map(|b| b.0.seqs.input_tokens()).collect();
        self.update(micro, &units, &tokens, lr, max_grad_norm, |tr, b, log| tr.reward_loss(&b.0, log))
    }

    /// The loss, `accuracy` and `margin` over `eval`, averaged over its pairs.
    pub fn evaluate_rewards(&mut self, eval: &[RewardBatch]) -> Result<Vec<(&'static str, f64)>> {
        evaluate_by(self, eval, |b| b.0.pairs(), |tr, b, log| tr.reward_loss(&b.0, log))
    }
}

/// What the training loop needs of a trainer for batches of type `B`: a step and an evaluation.
pub trait Steps<B> {
    fn train_step(&mut self, micro: &[B], lr: Option<f64>, max_grad_norm: Option<f64>) -> Result<StepLog>;
    /// Named evaluation values, `loss` first.
    fn eval_metrics(&mut self, eval: &[B]) -> Result<Vec<(&'static str, f64)>>;
}

impl<A: Adapter, L, O: Optimizer> Steps<Batch> for Trainer<A, L, O>
where
    L: for<'a> Term<crate::loss::StepCx<'a, A>>,
{
    fn train_step(&mut self, micro: &[Batch], lr: Option<f64>, max_grad_norm: Option<f64>) -> Result<StepLog> {
        self.step_accumulated(micro, lr, max_grad_norm)
    }
    fn eval_metrics(&mut self, eval: &[Batch]) -> Result<Vec<(&'static str, f64)>> {
        let (loss, ppl) = self.evaluate(eval)?;
        Ok(vec![("loss", loss), ("ppl", ppl)])
    }
}

impl<A: Adapter, L, O: Optimizer> Steps<PairBatch> for Trainer<A, L, O>
where
    L: for<'a> Term<PairCx<'a>>,
{
    fn train_step(&mut self, micro: &[PairBatch], lr: Option<f64>, max_grad_norm: Option<f64>) -> Result<StepLog> {
        self.step_pairs(micro, lr, max_grad_norm)
    }
    fn eval_metrics(&mut self, eval: &[PairBatch]) -> Result<Vec<(&'static str, f64)>> {
        self.evaluate_pairs(eval)
    }
}

impl<A: Adapter, L, O: Optimizer> Steps<KtoBatch> for Trainer<A, L, O>
where
    L: for<'a> Term<KtoCx<'a>>,
{
    fn train_step(&mut self, micro: &[KtoBatch], lr: Option<f64>, max_grad_norm: Option<f64>) -> Result<StepLog> {
        self.step_kto(micro, lr, max_grad_norm)
    }
    fn eval_metrics(&mut self, eval: &[KtoBatch]) -> Result<Vec<(&'static str, f64)>> {
        self.evaluate_kto(eval)
    }
}

impl<A: Adapter, L, O: Optimizer> Steps<RewardBatch> for Trainer<A, L, O>
where
    L: Term<RewardCx>,
{
    fn train_step(&mut self, micro: &[RewardBatch], lr: Option<f64>, max_grad_norm: Option<f64>) -> Result<StepLog> {
        self.step_rewards(micro, lr, max_grad_norm)
    }
    fn eval_metrics(&mut self, eval: &[RewardBatch]) -> Result<Vec<(&'static str, f64)>> {
        self.evaluate_rewards(eval)
    }
}
