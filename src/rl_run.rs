//! `temper train` with `rl = "grpo"` or `"ppo"`: prompts, rewards and settings from the config
//! (TRL's key names), the run on the same loop as SFT (schedule, eval, samples, checkpoints,
//! metrics.jsonl, plots). docs/rl.md.

use crate::config::TrainConfig;
use crate::preference::{shuffled, Fit};
use crate::sft::{dataset_spec, place, tokenize_options, with_adapter, WithModel};
use std::path::Path;
use std::sync::Arc;
use temper_runtime::adapters::{Adapter, AdapterFormat};
use temper_runtime::data::preference::{load_prompts, Prompt};
use temper_runtime::data;
use temper_runtime::generate::{GenerationConfig, Sampling};
use temper_runtime::loss::{grpo, ppo_clip, ref_kl, value_loss, LossType};
use temper_runtime::models::Llama;
use temper_runtime::monitor::Progress;
use temper_runtime::optim::AdamW;
use temper_runtime::rl::{builtin, RewardModel, Rewards, ScaleRewards};
use temper_runtime::tokenizer::Tokenizer;
use temper_runtime::train::preference::Reference;
use temper_runtime::train::rl::{prompt_batches, Algo, KlEstimator, PromptBatch, RlConfig, RlSetup};
use temper_runtime::train::sft::SftSummary;
use temper_runtime::train::Trainer;
use temper_runtime::{Error, Result};

fn prompts(cfg: &TrainConfig, cfg_path: &Path, tok: &Tokenizer, sets: &[crate::config::DatasetSection]) -> Result<Vec<Prompt>> {
    let opts = tokenize_options(cfg, cfg_path)?;
    let mut all = Vec::new();
    for d in sets {
        let (v, report) = load_prompts(&dataset_spec(cfg_path, d)?, tok, &opts)?;
        eprintln!("{}: {report}", d.path.display());
        all.extend(v);
    }
    if all.is_empty() {
        return Err(Error::Input(format!("{}: no usable prompts in the datasets", cfg_path.display())));
    }
    Ok(all)
}

/// The run's settings from the config, with TRL's defaults.
pub(crate) fn rl_config(cfg: &TrainConfig, tok: &Tokenizer) -> Result<RlConfig> {
    let ppo = cfg.rl.as_deref() == Some("ppo");
    let generation = GenerationConfig {
        max_new_tokens: cfg.max_new_tokens.unwrap_or(256),
        sampling: Sampling::Sample {
            temperature: cfg.temperature.unwrap_or(if ppo { 0.7 } else { 1.0 }),
            top_k: cfg.top_k.filter(|&k| k > 0),
            top_p: cfg.top_p.filter(|&p| p < 1.0),
            seed: cfg.seed,
        },
        eos_token_ids: tok.eos_token_ids.clone(),
        stop_strings: cfg.stop_strings.clone(),
        pad_token_id: tok.pad_token_id.or(tok.eos_token_ids.first().copied()).unwrap_or(0),
    };
    let mut c = if ppo { RlConfig::ppo(generation) } else { RlConfig::grpo(generation) };
    c.micro_batch_size = cfg.micro_batch_size;
    if !ppo {
        c.num_generations = cfg.num_generations.unwrap_or(8);
        c.num_iterations = cfg.num_iterations.unwrap_or(1);
        c.scale_rewards = cfg.scale_rewards.as_deref().map(ScaleRewards::parse).transpose()?.unwrap_or_default();
        c.loss_type = match cfg.loss_type.as_ref().map(|t| t.to_vec()) {
            Some(v) => LossType::parse(&v[0])?,
            None => LossType::Dapo,
        };
        c.mask_truncated_completions = cfg.mask_truncated_completions;
        c.skip_zero_advantage = cfg.skip_zero_advantage.unwrap_or(true);
    } else {
        c.kl_coef = cfg.kl_coef.unwrap_or(0.05);
        c.kl_estimator = if cfg.kl_estimator.as_deref() == Some("k3") { KlEstimator::K3 } else { KlEstimator::K1 };
        c.gamma = cfg.gamma.unwrap_or(1.0);
        c.lam = cfg.lam.unwrap_or(0.95);
        c.whiten_rewards = cfg.whiten_rewards;
        c.num_ppo_epochs = cfg.num_ppo_epochs.unwrap_or(4);
        c.num_mini_batches = cfg.num_mini_batches.unwrap_or(1);
        c.missing_eos_penalty = cfg.missing_eos_penalty;
    }
    Ok(c)
}

/// The `[[rewards]]` tables as functions and reward models (loaded on the run's device).
pub(crate) fn rewards(cfg: &TrainConfig, cfg_path: &Path, pad: u32) -> Result<Rewards> {
    let mut r = Rewards::new();
    for (i, s) in cfg.rewards.iter().enumerate() {
        let f: Box<dyn temper_runtime::rl::RewardFn> = match (&s.name, &s.model) {
            (Some(name), None) => {
                let mut params = serde_json::Map::new();
                for (k, v) in [("field", s.field.clone().map(serde_json::Value::from)), ("pattern", s.pattern.clone().map(serde_json::Value::from)), ("label", s.label.clone().map(serde_json::Value::from)), ("max_length", s.max_length.map(serde_json::Value::from)), ("cache", s.cache.map(serde_json::Value::from))] {
                    if let Some(v) = v {
                        params.insert(k.into(), v);
                    }
                }
                builtin(name, &params, cfg.max_new_tokens.unwrap_or(256)).map_err(|e| Error::Config { path: cfg_path.into(), key: format!("rewards[{i}].name"), msg: e.to_string() })?
            }
            (None, Some(dir)) => {
                let dir = dir.clone();
                let mut m = Llama::load_with(&dir, &cfg.load_options()).map_err(|e| Error::Input(format!("{}: key `rewards[{i}].model`: {e}", cfg_path.display())))?;
                if m.config.num_labels.is_none() {
                    return Err(Error::Config { path: cfg_path.into(), key: format!("rewards[{i}].model"), msg: format!("{} is not a reward model (no …ForSequenceClassification head)", dir.display()) });
                }
                place(cfg, &mut m)?;
                let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "reward_model".into());
                Box::new(RewardModel { name, model: Arc::new(m), pad_id: pad, batch_size: cfg.micro_batch_size.max(1) })
            }
            _ => return Err(Error::Config { path: cfg_path.into(), key: format!("rewards[{i}]"), msg: "give either `name` or `model`".into() }),
        };
        r.fns.push((f, s.weight));
    }
    Ok(r)
}

/// `temper data preview` of RL prompts: each prompt as the model sees it and the record's other fields.
pub(crate) fn preview(cfg: &TrainConfig, cfg_path: &Path, tok: &Tokenizer, n: usize, json: bool) -> Result<Vec<String>> {
    let ps = prompts(cfg, cfg_path, tok, &cfg.datasets)?;
    ps.iter()
        .take(n)
        .map(|p| {
            Ok(if json {
                serde_json::json!({"source": p.source, "prompt_ids": p.tokens, "fields": p.fields}).to_string()
            } else {
                format!("== {} ({} prompt tokens) ==\n{}\n-- fields: {}", p.source, p.tokens.len(), tok.decode(&p.tokens, false)?, serde_json::Value::Object(p.fields.clone()))
            })
        })
        .collect()
}

/// `temper train` for `rl = "grpo" | "ppo"`.
pub(crate) fn train(cfg: &TrainConfig, cfg_path: &Path, tok: &Tokenizer, base: Llama, resume: bool, progress: Progress) -> Result<SftSummary> {
    let all = prompts(cfg, cfg_path, tok, &cfg.datasets)?;
    let (train, eval) = if cfg.test_datasets.is_empty() { data::shuffle_split(all, cfg.seed, cfg.val_set_size) } else { (all, prompts(cfg, cfg_path, tok, &cfg.test_datasets)?) };
    let rc = rl_config(cfg, tok)?;
    let rewards = rewards(cfg, cfg_path, rc.generation.pad_token_id)?;
    let tk = crate::sft::load_tokenizer(cfg.tokenizer.as_ref().unwrap_or(&cfg.base_model))?;
    let setup = RlSetup::new(rc, rewards, Some(Arc::new(tk)))?;
    let full = cfg.adapter.kind == "none";
    let beta = cfg.beta.unwrap_or(0.0);
    let reference = if full && beta > 0.0 {
        crate::preference::frozen_reference(cfg, "")?
    } else {
        Reference::AdapterOff
    };
    with_adapter(cfg, base, RlRun { fit: Fit { cfg, cfg_path, tok, resume, progress }, train, eval, setup, reference })
}

struct RlRun<'a> {
    fit: Fit<'a>,
    train: Vec<Prompt>,
    eval: Vec<Prompt>,
    setup: Arc<RlSetup>,
    reference: Reference,
}

impl WithModel for RlRun<'_> {
    type Out = SftSummary;
    fn go<A: AdapterFormat + Adapter>(self, mut model: Llama<A>, adapter: Option<&str>) -> Result<SftSummary> {
        let cfg = self.fit.cfg;
        place(cfg, &mut model)?;
        let optimizer = AdamW::lr(cfg.learning_rate).weight_decay(cfg.weight_decay);
        // The loop takes gradient_accumulation_steps prompt batches per step; the step samples them together.
        let completions = cfg.generation_batch_size.unwrap_or(cfg.micro_batch_size * cfg.gradient_accumulation_steps);
        let per_step = (completions / self.setup.cfg.num_generations / cfg.gradient_accumulation_steps).max(1);
        let train = &self.train;
        let setup = &self.setup;
        let epoch = |e: u64| -> Result<Vec<PromptBatch>> {
            let order: Vec<Prompt> = shuffled(train.len(), cfg.seed, e).into_iter().map(|i| train[i].clone()).collect();
            // A batch the loop takes as one micro-batch: gradient accumulation happens inside the step.
            Ok(prompt_batches(&order, per_step, setup).into_iter().filter(|b| b.prompts.len() == per_step || train.len() < per_step).collect())
        };
        let eval = prompt_batches(&self.eval, 32, &self.setup);
        let (n_train, n_eval) = (self.train.len(), self.eval.len());
        let e = cfg.epsilon.unwrap_or(0.2);
        match self.setup.cfg.algo {
            Algo::Grpo => {
                let policy = grpo().epsilon(e).epsilon_high(cfg.epsilon_high.unwrap_or(e));
                let beta = cfg.beta.unwrap_or(0.0);
                if beta > 0.0 {
                    let t = Trainer::rl(model, policy + beta * ref_kl(), optimizer).with_reference(self.reference.clone());
                    Ok(self.fit.fit(t, &epoch, &eval, adapter, n_train, n_eval)?.0)
                } else {
                    // β = 0: no KL term, so no reference forward ever runs.
                    let t = Trainer::rl(model, policy, optimizer);
                    Ok(self.fit.fit(t, &epoch, &eval, adapter, n_train, n_eval)?.0)
                }
            }
            Algo::Ppo => {
                let loss = ppo_clip(cfg.cliprange.unwrap_or(0.2)) + cfg.vf_coef.unwrap_or(0.1) * value_loss(cfg.cliprange_value.unwrap_or(0.2));
                let t = Trainer::rl(model, loss, optimizer).with_value_head(optimizer)?;
                Ok(self.fit.fit(t, &epoch, &eval, adapter, n_train, n_eval)?.0)
            }
        }
    }
}
