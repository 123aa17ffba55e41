//! RL from rewards: GRPO (DeepSeekMath / R1, with DAPO's and Dr. GRPO's variants) and PPO (RLHF).
//!
//! A step samples completions with the weights being trained ([`crate::generate::rollout`]:
//! LoRA unmerged, no copy, no second engine), scores them ([`crate::rl::Rewards`]), turns the
//! scores into per-token advantages, and takes `num_iterations` optimizer steps on them. The
//! log-probs recorded while sampling are the "old" policy's: the training forward computes the
//! same numbers (tested to 1e-5), so no importance-sampling correction is needed.
//!
//! GRPO: `num_generations` completions per prompt, group-normalised advantages; groups whose
//! completions all scored the same carry no policy gradient and are skipped (DAPO's dynamic
//! sampling filter) unless `skip_zero_advantage` is off; truncated completions can be masked.
//! PPO: one completion per prompt; the reward model's score at the last token plus a per-token
//! KL penalty to the reference (k1 or k3), GAE over the critic's values (a value head on the
//! policy's own hidden states), whitened advantages, `num_ppo_epochs` passes over mini-batches.

use super::preference::{scored_rows, token_logps};
use super::preference::{Reference, Steps};
use super::{StepLog, Trainer};
use crate::adapters::{Adapter, AdapterHost};
use crate::data::preference::{seq_batch, Prompt, SeqBatch, Sequence, Span};
use crate::error::{Error, Result};
use crate::generate::{rollout, FinishReason, GenerationConfig, Rollout};
use crate::loss::{token_weights, LossType, PolicyCx, Term, TermLog};
use crate::models::{Llama, Mode};
use crate::ops;
use crate::optim::{Optimizer, OptimizerConfig};
use crate::rl::{gae, group_advantages, masked_whiten, Completion, Rewards, ScaleRewards};
use crate::tensor::Tensor;
use crate::tokenizer::Tokenizer;
use std::sync::Arc;

/// Which algorithm a step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algo {
    Grpo,
    Ppo,
}

/// PPO's per-token KL estimator in the reward (TRL's `kl_estimator`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KlEstimator {
    /// log π − log π_ref.
    K1,
    /// (π_ref/π − 1) − log(π_ref/π): unbiased and never negative.
    K3,
}

/// Settings of an RL run (TRL's names; defaults are TRL's GRPOConfig / PPOConfig ones).
#[derive(Clone, Debug)]
pub struct RlConfig {
    pub algo: Algo,
    /// Completions per prompt (GRPO's G; PPO uses 1).
    pub num_generations: usize,
    /// Sampling: max new tokens, temperature/top-k/top-p and seed, EOS ids, stop strings, pad id.
    pub generation: GenerationConfig,
    /// Sequences per forward/backward (TRL's `per_device_train_batch_size`).
    pub micro_batch_size: usize,
    /// Optimizer steps per generation batch (GRPO's μ).
    pub num_iterations: usize,
    pub loss_type: LossType,
    pub scale_rewards: ScaleRewards,
    pub mask_truncated_completions: bool,
    pub skip_zero_advantage: bool,
    /// PPO: KL coefficient in the reward, estimator, GAE γ and λ, reward whitening, epochs and
    /// mini-batches per rollout batch, the score given to completions that never ended.
    pub kl_coef: f64,
    pub kl_estimator: KlEstimator,
    pub gamma: f64,
    pub lam: f64,
    pub whiten_rewards: bool,
    pub num_ppo_epochs: usize,
    pub num_mini_batches: usize,
    pub missing_eos_penalty: Option<f64>,
}

impl RlConfig {
    /// GRPO with TRL 1.16's defaults (G = 8, ε = 0.2, loss `dapo`, group scaling, temperature 1).
    pub fn grpo(generation: GenerationConfig) -> Self {
        RlConfig {
            algo: Algo::Grpo,
            num_generations: 8,
            generation,
            micro_batch_size: 8,
            num_iterations: 1,
            loss_type: LossType::Dapo,
            scale_rewards: ScaleRewards::Group,
            mask_truncated_completions: false,
            skip_zero_advantage: true,
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K1,
            gamma: 1.0,
            lam: 0.95,
            whiten_rewards: false,
            num_ppo_epochs: 4,
            num_mini_batches: 1,
            missing_eos_penalty: None,
        }
    }
    /// PPO with TRL's defaults (kl_coef 0.05, k1, γ 1, λ 0.95, 4 epochs, 1 mini-batch).
    pub fn ppo(generation: GenerationConfig) -> Self {
        RlConfig { algo: Algo::Ppo, num_generations: 1, loss_type: LossType::Bnpo, ..Self::grpo(generation) }
    }
    fn temperature(&self) -> f64 {
        self.generation.sampling.temperature()
    }
}

/// What an RL run needs besides the model: its settings, rewards and tokenizer.
pub struct RlSetup {
    pub cfg: RlConfig,
    pub rewards: Rewards,
    /// Decodes completions for reward functions and stop strings (None: texts are empty).
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// `rewards/<name>/mean` and `/std` per function (metric names live as long as the run).
    names: Vec<(&'static str, &'static str)>,
}

impl RlSetup {
    pub fn new(cfg: RlConfig, rewards: Rewards, tokenizer: Option<Arc<Tokenizer>>) -> Result<Arc<Self>> {
        if rewards.fns.is_empty() {
            return Err(Error::Input("an RL run needs at least one reward ([[rewards]] in the config)".into()));
        }
        if cfg.algo == Algo::Grpo && cfg.num_generations < 2 {
            return Err(Error::Input(format!("num_generations = {}: GRPO compares completions of one prompt, so it needs at least 2", cfg.num_generations)));
        }
        if cfg.generation.max_new_tokens == 0 {
            return Err(Error::Input("max_new_tokens (max_completion_length) must be at least 1".into()));
        }
        let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
        let names = rewards.fns.iter().map(|(f, _)| (leak(format!("rewards/{}/mean", f.name())), leak(format!("rewards/{}/std", f.name())))).collect();
        Ok(Arc::new(RlSetup { cfg, rewards, tokenizer, names }))
    }
}

/// One generation batch: the prompts of a step.
#[derive(Clone)]
pub struct PromptBatch {
    pub prompts: Vec<Prompt>,
    pub setup: Arc<RlSetup>,
}

/// Prompt batches of `n` prompts in order.
pub fn prompt_batches(prompts: &[Prompt], n: usize, setup: &Arc<RlSetup>) -> Vec<PromptBatch> {
    prompts.chunks(n.max(1)).map(|c| PromptBatch { prompts: c.to_vec(), setup: setup.clone() }).collect()
}

/// A micro-batch of trained sequences with their per-token data.
struct PolicyBatch {
    sb: SeqBatch,
    old: Vec<f64>,
    adv: Vec<f64>,
    weights: Vec<f64>,
    old_values: Vec<f64>,
    returns: Vec<f64>,
    /// Loss units this micro-batch stands for (see `Trainer::update`).
    units: usize,
}

/// The completions of a rollout, decoded, with their prompts.
struct Scored {
    rollout: Rollout,
    per_fn: Vec<Vec<f64>>,
    rewards: Vec<f64>,
    /// Wall time of the sampling.
    rollout_s: f64,
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

impl<A: Adapter, L, O: Optimizer> Trainer<A, L, O>
where
    L: for<'a> Term<PolicyCx<'a>>,
{
    /// An RL trainer (GRPO or PPO, per the [`RlSetup`] of its batches) with a policy loss:
    /// `grpo()`, `grpo() + β * ref_kl()`, `ppo_clip(0.2) + 0.1 * value_loss(0.2)`. PPO's value
    /// head (`[1, hidden]`, on the policy's final hidden states) is added and trained with it.
    pub fn rl<C: OptimizerConfig<Optimizer = O>>(model: Llama<A>, loss: L, optimizer: C) -> Self {
        Self::build(model, loss, optimizer)
    }

    /// Samples, scores and decodes the completions of `prompts` (no gradients, dropout off).
    fn sample(&mut self, prompts: &[Prompt], setup: &RlSetup, n: usize) -> Result<Scored> {
        let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.tokens.clone()).collect();
        let mut gen = setup.cfg.generation.clone();
        if let crate::generate::Sampling::Sample { seed, .. } = &mut gen.sampling {
            *seed = seed.wrapping_add(self.step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
        let was = std::mem::replace(&mut self.model.training, false);
        let started = std::time::Instant::now();
        let r = crate::autograd::no_grad(|| rollout(&self.model, &ids, n, &gen, setup.tokenizer.as_deref()));
        self.model.training = was;
        let rollout = r?;
        let rollout_s = started.elapsed().as_secs_f64();
        let texts = rollout.tokens.iter().map(|t| setup.tokenizer.as_ref().map_or(Ok(String::new()), |tk| super::sft::decode_lenient(tk, t))).collect::<Result<Vec<_>>>()?;
        let cs: Vec<Completion<'_>> = (0..texts.len()).map(|i| Completion { prompt: &prompts[i / n], text: &texts[i], tokens: &rollout.tokens[i], finish: rollout.finish[i] }).collect();
        let per_fn = setup.rewards.score(&cs)?;
        let rewards = setup.rewards.combine(&per_fn);
        Ok(Scored { rollout, per_fn, rewards, rollout_s })
    }

    /// The rollout metrics TRL logs (reward, per-function mean/std, completion lengths, entropy).
    fn rollout_metrics(setup: &RlSetup, s: &Scored, log: &mut TermLog) {
        log.push(("reward", mean(&s.rewards)));
        log.push(("reward_std", crate::rl::advantages::std(&s.rewards)));
        for ((m, sd), r) in setup.names.iter().zip(&s.per_fn) {
            log.push((m, mean(r)));
            log.push((sd, crate::rl::advantages::std(r)));
        }
        let lens: Vec<f64> = s.rollout.tokens.iter().map(|t| t.len() as f64).collect();
        log.push(("completions/mean_length", mean(&lens)));
        log.push(("completions/max_length", lens.iter().copied().fold(0.0, f64::max)));
        let clipped = s.rollout.finish.iter().filter(|f| **f == FinishReason::Length).count();
        log.push(("completions/clipped_ratio", clipped as f64 / lens.len().max(1) as f64));
        let ent: Vec<f64> = s.rollout.entropies.iter().flatten().map(|&e| e as f64).collect();
        log.push(("entropy", mean(&ent)));
        log.push(("time/rollout_s", s.rollout_s));
        let new: usize = s.rollout.tokens.iter().map(Vec::len).sum();
        log.push(("rollout_tokens_per_s", new as f64 / s.rollout_s.max(1e-9)));
    }

    /// Reference log-probs of `b`'s completion tokens (no gradients).
    fn reference_token_logps(&self, sb: &SeqBatch, temperature: f64) -> Result<Vec<f64>> {
        let off = Mode { adapters: false, training: false };
        crate::autograd::no_grad(|| match &self.reference {
            Reference::AdapterOff => {
                if self.model.adapter_names().is_empty() {
                    return Err(Error::Input("the reference policy is the base with its adapters off, but the model has no adapter (full fine-tuning): set beta = 0 or give a reference model".into()));
                }
                let h = self.model.hidden_states_mode(&sb.input, off)?;
                token_logps(&self.model, &h, sb, Span::completion, sb.spans.len(), temperature)?.0.to_f64_vec()
            }
            Reference::Model(m) => {
                let h = m.hidden_states_mode(&sb.input, off)?;
                token_logps(m.as_ref(), &h, sb, Span::completion, sb.spans.len(), temperature)?.0.to_f64_vec()
            }
            Reference::Precomputed => Err(Error::Input("RL cannot precompute reference log-probs (the completions are new every step)".into())),
        })
    }

    /// One update over `batches` with the policy loss.
    fn policy_update(&mut self, batches: &[PolicyBatch], lr: Option<f64>, max_grad_norm: Option<f64>, temperature: f64) -> Result<StepLog> {
        let units: Vec<usize> = batches.iter().map(|b| b.units).collect();
        let tokens: Vec<usize> = batches.iter().map(|b| b.sb.input_tokens()).collect();
        self.update(batches, &units, &tokens, lr, max_grad_norm, |tr, b, log| {
            let hidden = tr.model.hidden_states(&b.sb.input)?;
                let (logps, _, rows) = token_logps(&tr.model, &hidden, &b.sb, Span::completion, b.sb.spans.len(), temperature)?;
            let reference = || tr.reference_token_logps(&b.sb, temperature);
            let values = || {
                let head = tr.model.v_head.as_ref().ok_or_else(|| Error::Input("the value loss needs a value head (PPO adds one: Trainer::with_value_head)".into()))?;
                let m = rows.shape()[0];
                ops::reshape(&ops::linear(&rows, head, None)?, &[m])
            };
            let cx = PolicyCx::new(logps, &b.old, &b.adv, &b.weights, &b.old_values, &b.returns, &reference, &values)?;
            tr.loss.eval(&cx, log)
        })
    }

    /// A step that trains nothing (every group scored the same): counted, logged, no update.
    fn empty_step(&mut self, lr: Option<f64>) -> StepLog {
        self.step += 1;
        StepLog { step: self.step, loss: 0.0, terms: TermLog::new(), trained_tokens: 0, input_tokens: 0, grad_norm: 0.0, lr: lr.unwrap_or(f64::NAN) }
    }

    /// One GRPO generation batch: rollout, rewards, group advantages, `num_iterations` updates.
    pub fn grpo_step(&mut self, prompts: &[Prompt], setup: &RlSetup, lr: Option<f64>, max_grad_norm: Option<f64>) -> Result<StepLog> {
        let cfg = &setup.cfg;
        let g = cfg.num_generations;
        let s = self.sample(prompts, setup, g)?;
        let (adv, stds) = group_advantages(&s.rewards, g, cfg.scale_rewards)?;
        let mut metrics = TermLog::new();
        Self::rollout_metrics(setup, &s, &mut metrics);
        metrics.push(("frac_reward_zero_std", crate::rl::advantages::frac_zero_std(&s.rewards, &stds, cfg.scale_rewards)));
        // Which completions train: not in a group without signal, not masked as truncated, not empty.
        let keep: Vec<usize> = (0..s.rewards.len())
            .filter(|&i| !(cfg.skip_zero_advantage && stds[i / g].abs() <= 1e-8))
            .filter(|&i| !(cfg.mask_truncated_completions && s.rollout.finish[i] == FinishReason::Length))
            .filter(|&i| !s.rollout.tokens[i].is_empty())
            .collect();
        let max_len = cfg.generation.max_new_tokens;
        let seqs: Vec<Sequence> = keep.iter().map(|&i| Sequence::new(prompts[i / g].tokens.clone(), s.rollout.tokens[i].clone())).collect();
        let mut batches = Vec::new();
        for (chunk, idx) in seqs.chunks(cfg.micro_batch_size.max(1)).zip(keep.chunks(cfg.micro_batch_size.max(1))) {
            let refs: Vec<&Sequence> = chunk.iter().collect();
            let sb = seq_batch(&refs, cfg.generation.pad_token_id, true)?;
            let lens: Vec<usize> = idx.iter().map(|&i| s.rollout.tokens[i].len()).collect();
            let m: usize = lens.iter().sum();
            let weights = token_weights(cfg.loss_type, &lens, idx.len(), max_len, m);
            let old = idx.iter().flat_map(|&i| s.rollout.logprobs[i].iter().map(|&x| x as f64)).collect();
            let a = idx.iter().flat_map(|&i| std::iter::repeat_n(adv[i], s.rollout.tokens[i].len())).collect();
            let units = if cfg.loss_type == LossType::Dapo { m } else { 1 };
            batches.push(PolicyBatch { sb, old, adv: a, weights, old_values: vec![], returns: vec![], units });
        }
        let mut last = None;
        for _ in 0..cfg.num_iterations.max(1) {
            last = Some(if batches.is_empty() { self.empty_step(lr) } else { self.policy_update(&batches, lr, max_grad_norm, cfg.temperature())? });
        }
        let mut log = last.expect("at least one iteration");
        metrics.append(&mut log.terms);
        log.terms = metrics;
        Ok(log)
    }

    /// Adds PPO's value head (`[1, hidden]`, zero-initialised, trained with the policy; the
    /// model's `v_head`) and registers it with the optimizer.
    pub fn with_value_head<C: OptimizerConfig<Optimizer = O>>(mut self, optimizer: C) -> Result<Self> {
        let h = self.model.config.hidden_size;
        let head = Tensor::from_vec(vec![0f32; h], &[1, h], crate::Device::Cpu)?.to_dtype(self.model.dtype())?.to_device(self.model.device())?.requires_grad();
        self.model.v_head = Some(head);
        let params = self.model.trainable_with_lr_scale().into_iter().map(|(_, t, s)| (t, s)).collect();
        self.optimizer = optimizer.build(params);
        Ok(self)
    }

    /// One PPO rollout batch: sample one completion per prompt, score it, per-token rewards
    /// (score at the last token minus kl_coef·KL), GAE, whitening, then `num_ppo_epochs` passes
    /// over `num_mini_batches` mini-batches (an optimizer step each).
    pub fn ppo_step(&mut self, prompts: &[Prompt], setup: &RlSetup, lr: Option<f64>, max_grad_norm: Option<f64>) -> Result<StepLog> {
        let cfg = &setup.cfg;
        let s = self.sample(prompts, setup, 1)?;
        let mut metrics = TermLog::new();
        Self::rollout_metrics(setup, &s, &mut metrics);
        let t = cfg.temperature();
        let keep: Vec<usize> = (0..s.rewards.len()).filter(|&i| !s.rollout.tokens[i].is_empty()).collect();
        let seqs: Vec<Sequence> = keep.iter().map(|&i| Sequence::new(prompts[i].tokens.clone(), s.rollout.tokens[i].clone())).collect();
        if seqs.is_empty() {
            return Ok(self.empty_step(lr));
        }
        // The rollout's reference log-probs and values (no gradients, dropout off).
        let (mut refs, mut values) = (Vec::new(), Vec::new());
        let was = std::mem::replace(&mut self.model.training, false);
        let r = (|| -> Result<()> {
            for chunk in seqs.chunks(cfg.micro_batch_size.max(1)) {
                let rs: Vec<&Sequence> = chunk.iter().collect();
                let sb = seq_batch(&rs, cfg.generation.pad_token_id, true)?;
                refs.extend(self.reference_token_logps(&sb, t)?);
                let head = self.model.v_head.clone().ok_or_else(|| Error::Input("PPO needs a value head (Trainer::with_value_head)".into()))?;
                let v = crate::autograd::no_grad(|| {
                    let h = self.model.hidden_states(&sb.input)?;
                    // The values need the hidden rows only, not their log-probs over the vocabulary.
                    let (rows, _, _) = scored_rows(&h, &sb, Span::completion, sb.spans.len())?;
                    ops::linear(&rows, &head, None)?.to_f64_vec()
                })?;
                values.extend(v);
            }
            Ok(())
        })();
        self.model.training = was;
        r?;
        // Per-row token vectors.
        let (mut tok_rewards, mut row_values, mut kls, mut scores) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut off = 0;
        for &i in &keep {
            let n = s.rollout.tokens[i].len();
            let lp: Vec<f64> = s.rollout.logprobs[i].iter().map(|&x| x as f64).collect();
            let kl: Vec<f64> = (0..n)
                .map(|k| {
                    let logr = refs[off + k] - lp[k];
                    match cfg.kl_estimator {
                        KlEstimator::K1 => -logr,
                        KlEstimator::K3 => logr.exp() - 1.0 - logr,
                    }
                })
                .collect();
            let mut score = s.rewards[i];
            if let (Some(p), true) = (cfg.missing_eos_penalty, s.rollout.finish[i] != FinishReason::Eos) {
                score -= p;
            }
            let mut r: Vec<f64> = kl.iter().map(|k| -cfg.kl_coef * k).collect();
            r[n - 1] += score;
            scores.push(score);
            kls.push(kl);
            tok_rewards.push(r);
            row_values.push(values[off..off + n].to_vec());
            off += n;
        }
        if cfg.whiten_rewards {
            masked_whiten(&mut tok_rewards, false);
        }
        let (mut advs, rets) = gae(&tok_rewards, &row_values, cfg.gamma, cfg.lam);
        masked_whiten(&mut advs, true);
        let kl_sum: Vec<f64> = kls.iter().map(|k| k.iter().sum()).collect();
        metrics.push(("objective/kl", mean(&kl_sum)));
        metrics.push(("objective/non_score_reward", -cfg.kl_coef * mean(&kl_sum)));
        metrics.push(("objective/scores", mean(&scores)));
        metrics.push(("objective/rlhf_reward", mean(&scores) - cfg.kl_coef * mean(&kl_sum)));
        // Mini-batches of whole rows; each a list of micro-batches.
        let rows: Vec<usize> = (0..keep.len()).collect();
        let per_mini = keep.len().div_ceil(cfg.num_mini_batches.max(1));
        let mut last = None;
        for _ in 0..cfg.num_ppo_epochs.max(1) {
            for mini in rows.chunks(per_mini.max(1)) {
                let mut batches = Vec::new();
                for micro in mini.chunks(cfg.micro_batch_size.max(1)) {
                    let rs: Vec<&Sequence> = micro.iter().map(|&j| &seqs[j]).collect();
                    let sb = seq_batch(&rs, cfg.generation.pad_token_id, true)?;
                    let m: usize = micro.iter().map(|&j| advs[j].len()).sum();
                    batches.push(PolicyBatch {
                        sb,
                        old: micro.iter().flat_map(|&j| s.rollout.logprobs[keep[j]].iter().map(|&x| x as f64)).collect(),
                        adv: micro.iter().flat_map(|&j| advs[j].clone()).collect(),
                        weights: vec![1.0 / m as f64; m],
                        old_values: micro.iter().flat_map(|&j| row_values[j].clone()).collect(),
                        returns: micro.iter().flat_map(|&j| rets[j].clone()).collect(),
                        units: m,
                    });
                }
                last = Some(self.policy_update(&batches, lr, max_grad_norm, t)?);
            }
        }
        let mut log = last.expect("at least one mini-batch");
        metrics.append(&mut log.terms);
        log.terms = metrics;
        Ok(log)
    }

    /// Greedy completions of `prompts` and each reward function's mean (held-out accuracy with
    /// `exact_answer`), as `reward` and `rewards/<name>/mean`.
    pub fn evaluate_rl(&mut self, batches: &[PromptBatch]) -> Result<Vec<(&'static str, f64)>> {
        let Some(setup) = batches.first().map(|b| b.setup.clone()) else { return Ok(vec![]) };
        let prompts: Vec<Prompt> = batches.iter().flat_map(|b| b.prompts.iter().cloned()).collect();
        let mut greedy = setup.cfg.generation.clone();
        greedy.sampling = crate::generate::Sampling::Greedy;
        let was = std::mem::replace(&mut self.model.training, false);
        let mut all = (Vec::new(), Vec::new());
        let r = (|| -> Result<()> {
            for chunk in prompts.chunks(32) {
                let ids: Vec<Vec<u32>> = chunk.iter().map(|p| p.tokens.clone()).collect();
                let g = crate::autograd::no_grad(|| crate::generate::generate(&self.model, &ids, &greedy, setup.tokenizer.as_deref()))?;
                for (t, f) in g.tokens.into_iter().zip(g.finish) {
                    all.1.push(setup.tokenizer.as_ref().map_or(Ok(String::new()), |tk| super::sft::decode_lenient(tk, &t))?);
                    all.0.push((t, f));
                }
            }
            Ok(())
        })();
        self.model.training = was;
        r?;
        let cs: Vec<Completion<'_>> = (0..prompts.len()).map(|i| Completion { prompt: &prompts[i], text: &all.1[i], tokens: &all.0[i].0, finish: all.0[i].1 }).collect();
        let per_fn = setup.rewards.score(&cs)?;
        let mut out = vec![("reward", mean(&setup.rewards.combine(&per_fn)))];
        for ((m, _), r) in setup.names.iter().zip(&per_fn) {
            out.push((*m, mean(r)));
        }
        let lens: Vec<f64> = all.0.iter().map(|(t, _)| t.len() as f64).collect();
        out.push(("completions/mean_length", mean(&lens)));
        Ok(out)
    }
}

impl<A: Adapter, L, O: Optimizer> Steps<PromptBatch> for Trainer<A, L, O>
where
    L: for<'a> Term<PolicyCx<'a>>,
{
    fn train_step(&mut self, micro: &[PromptBatch], lr: Option<f64>, max_grad_norm: Option<f64>) -> Result<StepLog> {
        let Some(setup) = micro.first().map(|b| b.setup.clone()) else { return Err(Error::Input("an RL step got no prompts".into())) };
        let prompts: Vec<Prompt> = micro.iter().flat_map(|b| b.prompts.iter().cloned()).collect();
        match setup.cfg.algo {
            Algo::Grpo => self.grpo_step(&prompts, &setup, lr, max_grad_norm),
            Algo::Ppo => self.ppo_step(&prompts, &setup, lr, max_grad_norm),
        }
    }
    fn eval_metrics(&mut self, eval: &[PromptBatch]) -> Result<Vec<(&'static str, f64)>> {
        self.evaluate_rl(eval)
    }
}

/// The sampled completions of a rollout and the training forward's log-probs of the same tokens
/// (adapters on, dropout off): the largest absolute difference, which the tests bound by 1e-5.
pub fn rollout_logprob_gap<A: Adapter>(model: &Llama<A>, prompts: &[Vec<u32>], n: usize, gen: &GenerationConfig) -> Result<f64> {
    let r = crate::autograd::no_grad(|| rollout(model, prompts, n, gen, None))?;
    let t = gen.sampling.temperature();
    let keep: Vec<usize> = (0..r.tokens.len()).filter(|&i| !r.tokens[i].is_empty()).collect();
    let seqs: Vec<Sequence> = keep.iter().map(|&i| Sequence::new(prompts[i / n].clone(), r.tokens[i].clone())).collect();
    let refs: Vec<&Sequence> = seqs.iter().collect();
    let sb = seq_batch(&refs, gen.pad_token_id, true)?;
    let lp = crate::autograd::no_grad(|| {
        let h = model.hidden_states_mode(&sb.input, Mode { adapters: true, training: false })?;
        token_logps(model, &h, &sb, Span::completion, sb.spans.len(), t)?.0.to_f64_vec()
    })?;
    let sampled: Vec<f64> = keep.iter().flat_map(|&i| r.logprobs[i].iter().map(|&x| x as f64)).collect();
    Ok(lp.iter().zip(&sampled).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max))
}
