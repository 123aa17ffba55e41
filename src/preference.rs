//! `temper train` with `rl = "dpo" | "ipo" | "kto" | "orpo" | "simpo" | "reward"`: preference
//! datasets, the loss the keys describe, the reference policy, and the same monitored loop as SFT.

use crate::config::TrainConfig;
use crate::sft::{dataset_spec, tokenize_options, place, prepare, with_adapter, Prepared, WithModel};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use temper_runtime::adapters::{Adapter, AdapterFormat};
use temper_runtime::data::preference::{load_kto, load_pairs, KtoItem, PreferencePair, Sequence};
use temper_runtime::data;
use temper_runtime::loss::{bradley_terry, kto, Dpo, DpoLoss, Orpo, PairTerm, Simpo, Weighted};
use temper_runtime::models::Llama;
use temper_runtime::monitor::Progress;
use temper_runtime::optim::AdamW;
use temper_runtime::tokenizer::Tokenizer;
use temper_runtime::train::preference::{kl_sequences, kto_batches, pair_batches, precompute_kto_reference, precompute_pair_reference, KtoBatch, PairBatch, Reference, RewardBatch, Steps};
use temper_runtime::train::sft::{self, Samples, SftSummary};
use temper_runtime::train::Trainer;
use temper_runtime::{Error, ModuleExt, Result};

/// The pair loss the config describes: `loss_type` (with `loss_weights`) for DPO/IPO, SimPO,
/// ORPO; `rpo_alpha` / `cpo_alpha` add an NLL term on the chosen replies.
pub fn pair_loss(cfg: &TrainConfig) -> Result<Weighted<PairTerm>> {
    let rl = cfg.rl.as_deref().unwrap_or("dpo");
    let beta = cfg.beta.unwrap_or(0.1);
    let mut terms: Vec<(f64, PairTerm)> = Vec::new();
    match rl {
        "dpo" | "ipo" => {
            let types = cfg.loss_type.as_ref().map(|t| t.to_vec()).unwrap_or_else(|| vec![if rl == "ipo" { "ipo".into() } else { "sigmoid".into() }]);
            let weights = cfg.loss_weights.clone().unwrap_or_else(|| vec![1.0; types.len()]);
            for (t, w) in types.iter().zip(weights) {
                let term = match t.as_str() {
                    "sft" => PairTerm::CeOnChosen,
                    other => {
                        let kind = DpoLoss::parse(other).ok_or_else(|| Error::Input(format!("loss_type `{other}` is not known")))?;
                        PairTerm::Dpo(Dpo { beta, kind, label_smoothing: cfg.label_smoothing })
                    }
                };
                terms.push((w, term));
            }
            if let Some(a) = cfg.rpo_alpha.filter(|&a| a != 0.0) {
                terms.push((a, PairTerm::CeOnChosen));
            }
        }
        "simpo" => {
            terms.push((1.0, PairTerm::Simpo(Simpo { beta, gamma: cfg.simpo_gamma, label_smoothing: cfg.label_smoothing })));
            if cfg.cpo_alpha != 0.0 {
                terms.push((cfg.cpo_alpha, PairTerm::CeOnChosen));
            }
        }
        "orpo" => terms.push((1.0, PairTerm::Orpo(Orpo { lambda: beta }))),
        other => return Err(Error::Input(format!("rl = \"{other}\" has no pair loss"))),
    }
    Ok(Weighted(terms))
}

/// Whether the loss needs reference log-probs (SimPO, ORPO and reward models do not).
fn needs_reference(rl: &str) -> bool {
    matches!(rl, "dpo" | "ipo" | "kto")
}

/// The datasets of the config as pairs or KTO items, with what happened to the records printed.
enum Data {
    Pairs(Vec<PreferencePair>),
    Kto(Vec<KtoItem>),
}

fn load(cfg: &TrainConfig, cfg_path: &Path, tok: &Tokenizer, sets: &[crate::config::DatasetSection]) -> Result<Data> {
    let opts = tokenize_options(cfg, cfg_path)?;
    let kto = cfg.rl.as_deref() == Some("kto");
    let (mut pairs, mut items) = (Vec::new(), Vec::new());
    for d in sets {
        let spec = dataset_spec(cfg_path, d)?;
        let report = if kto {
            let (v, r) = load_kto(&spec, tok, &opts)?;
            items.extend(v);
            r
        } else {
            let (v, r) = load_pairs(&spec, tok, &opts)?;
            pairs.extend(v);
            r
        };
        eprintln!("{}: {report}", d.path.display());
    }
    if pairs.is_empty() && items.is_empty() {
        return Err(Error::Input(format!("{}: no usable records in the datasets", cfg_path.display())));
    }
    Ok(if kto { Data::Kto(items) } else { Data::Pairs(pairs) })
}

/// `temper data preview` of preference or KTO data: each record's prompt (inside `⟦ ⟧`, not
/// scored) and completions as the model sees them, or one JSON object per record with the ids.
pub(crate) fn preview(cfg: &TrainConfig, cfg_path: &Path, tok: &Tokenizer, n: usize, json: bool) -> Result<Vec<String>> {
    let show = |s: &temper_runtime::data::preference::Sequence| -> Result<String> { Ok(format!("⟦{}⟧{}", tok.decode(&s.prompt, false)?, tok.decode(&s.completion, false)?)) };
    let mut out = Vec::new();
    match load(cfg, cfg_path, tok, &cfg.datasets)? {
        Data::Pairs(pairs) => {
            for p in pairs.iter().take(n) {
                out.push(if json {
                    serde_json::json!({"source": p.source, "prompt_ids": p.chosen.prompt, "chosen_ids": p.chosen.completion, "rejected_ids": p.rejected.completion, "margin": p.margin}).to_string()
                } else {
                    format!("== {} ({} prompt tokens; chosen {}, rejected {} scored) ==\n{}\n-- rejected --\n{}", p.source, p.chosen.prompt.len(), p.chosen.scored_tokens(), p.rejected.scored_tokens(), show(&p.chosen)?, show(&p.rejected)?)
                });
            }
        }
        Data::Kto(items) => {
            for it in items.iter().take(n) {
                out.push(if json {
                    serde_json::json!({"source": it.source, "prompt_ids": it.seq.prompt, "completion_ids": it.seq.completion, "label": it.label}).to_string()
                } else {
                    format!("== {} ({}) ==\n{}", it.source, if it.label { "desirable" } else { "undesirable" }, show(&it.seq)?)
                });
            }
        }
    }
    Ok(out)
}

/// `temper train` for a config with `rl`.
pub(crate) fn train(cfg: &TrainConfig, cfg_path: &Path, tok: &Tokenizer, base: Llama, resume: bool, progress: Progress) -> Result<SftSummary> {
    let rl = cfg.rl.clone().unwrap_or_default();
    let (train, eval) = match (load(cfg, cfg_path, tok, &cfg.datasets)?, cfg.test_datasets.is_empty()) {
        (Data::Pairs(p), true) => {
            let (t, e) = data::shuffle_split(p, cfg.seed, cfg.val_set_size);
            (Data::Pairs(t), Data::Pairs(e))
        }
        (Data::Kto(p), true) => {
            let (t, e) = data::shuffle_split(p, cfg.seed, cfg.val_set_size);
            (Data::Kto(t), Data::Kto(e))
        }
        (train, false) => (train, load(cfg, cfg_path, tok, &cfg.test_datasets)?),
    };
    let full = cfg.adapter.kind == "none";
    // Full fine-tuning's reference: a frozen copy loaded again (the trained weights change in place),
    // unless the reference log-probs are precomputed.
    let reference = if cfg.precompute_ref_log_probs {
        Reference::Precomputed
    } else if full && needs_reference(&rl) {
        frozen_reference(cfg, " (precompute_ref_log_probs = true avoids it)")?
    } else {
        Reference::AdapterOff
    };
    let mut base = base;
    if rl == "reward" {
        base = base.into_sequence_classifier(1, cfg.seed)?;
        base.config.pad_token_id = base.config.pad_token_id.or(tok.pad_token_id).or(tok.eos_token_ids.first().copied());
    }
    let run = PrefRun { cfg, cfg_path, tok, train, eval, reference, resume, progress };
    with_adapter(cfg, base, run)
}

/// Full fine-tuning's reference policy: a frozen copy of the base loaded again (the trained weights
/// change in place), on the run's device.
pub(crate) fn frozen_reference(cfg: &TrainConfig, hint: &str) -> Result<Reference> {
    eprintln!("loading a frozen copy of {} as the reference policy{hint}", cfg.base_model.display());
    let mut r = Llama::load_with(&cfg.base_model, &cfg.load_options())?;
    place(cfg, &mut r)?;
    Ok(Reference::Model(Arc::new(r)))
}

struct PrefRun<'a> {
    cfg: &'a TrainConfig,
    cfg_path: &'a Path,
    tok: &'a Tokenizer,
    train: Data,
    eval: Data,
    reference: Reference,
    resume: bool,
    progress: Progress,
}

impl WithModel for PrefRun<'_> {
    type Out = SftSummary;
    fn go<A: AdapterFormat + Adapter>(self, mut model: Llama<A>, adapter: Option<&str>) -> Result<SftSummary> {
        let cfg = self.cfg;
        let rl = cfg.rl.clone().unwrap_or_default();
        if rl == "reward" {
            // The head is trained in full, as PEFT's modules_to_save = ["score"].
            model.unfreeze("^score\\.weight$")?;
        }
        place(cfg, &mut model)?;
        let pad = self.tok.pad_token_id.or(self.tok.eos_token_ids.first().copied()).unwrap_or(0);
        let mbs = cfg.micro_batch_size;
        let optimizer = AdamW::lr(cfg.learning_rate).weight_decay(cfg.weight_decay);
        let beta = cfg.beta.unwrap_or(0.1);
        let precompute = matches!(self.reference, Reference::Precomputed) && needs_reference(&rl);
        match (&self.train, &self.eval) {
            (Data::Pairs(train), Data::Pairs(eval)) => {
                let mut eval_b = pair_batches(eval, mbs, pad, true)?;
                let refs = if precompute {
                    precompute_pair_reference(&model, &mut eval_b)?;
                    let sources: Vec<&str> = train.iter().map(|p| p.source.as_str()).collect();
                    Some(reference_cache(cfg, "pairs", &sources, || {
                        let mut b = pair_batches(train, mbs, pad, true)?;
                        precompute_pair_reference(&model, &mut b)?;
                        Ok(per_record(b.into_iter().map(|b| b.ref_logps)))
                    })?)
                } else {
                    None
                };
                let epoch = |e: u64| -> Result<Vec<PairBatch>> {
                    let idx = shuffled(train.len(), cfg.seed, e);
                    let pairs: Vec<PreferencePair> = idx.iter().map(|&i| train[i].clone()).collect();
                    let mut b = pair_batches(&pairs, mbs, pad, true)?;
                    if let Some(r) = &refs {
                        for (k, batch) in b.iter_mut().enumerate() {
                            batch.ref_logps = Some(lookup(r, &idx[k * mbs..k * mbs + batch.pairs()]));
                        }
                    }
                    Ok(b)
                };
                if rl == "reward" {
                    let center = cfg.center_rewards_coefficient.unwrap_or(0.0);
                    let trainer = Trainer::reward_model(model, bradley_terry().center_rewards(center), optimizer);
                    let epoch = |e: u64| -> Result<Vec<RewardBatch>> { Ok(epoch(e)?.into_iter().map(RewardBatch).collect()) };
                    let eval_b: Vec<RewardBatch> = eval_b.into_iter().map(RewardBatch).collect();
                    let (summary, trainer) = self.fit(trainer, &epoch, &eval_b, adapter, train.len(), eval.len())?;
                    save_reward_model(cfg, self.tok, trainer.into_model(), adapter)?;
                    Ok(summary)
                } else {
                    let trainer = Trainer::preference(model, pair_loss(cfg)?, optimizer).with_reference(self.reference.clone());
                    Ok(self.fit(trainer, &epoch, &eval_b, adapter, train.len(), eval.len())?.0)
                }
            }
            (Data::Kto(train), Data::Kto(eval)) => {
                // Each item's mismatched completion is fixed for the run (TRL's rotation within
                // groups of a micro-batch, in dataset order), so its reference can be precomputed.
                let (train_kl, eval_kl) = (kl_sequences(train, mbs), kl_sequences(eval, mbs));
                let mut eval_b = kto_batches(eval, &eval_kl, mbs, pad, true)?;
                let refs = if precompute {
                    precompute_kto_reference(&model, &mut eval_b)?;
                    let sources: Vec<&str> = train.iter().map(|p| p.source.as_str()).collect();
                    Some(reference_cache(cfg, "kto", &sources, || {
                        let mut b = kto_batches(train, &train_kl, mbs, pad, true)?;
                        precompute_kto_reference(&model, &mut b)?;
                        Ok(per_record(b.into_iter().map(|b| b.ref_logps)))
                    })?)
                } else {
                    None
                };
                let loss = kto(beta).weights(cfg.desirable_weight, cfg.undesirable_weight);
                let trainer = Trainer::kto(model, loss, optimizer).with_reference(self.reference.clone());
                let epoch = |e: u64| -> Result<Vec<KtoBatch>> {
                    let idx = shuffled(train.len(), cfg.seed, e);
                    let items: Vec<KtoItem> = idx.iter().map(|&i| train[i].clone()).collect();
                    let kl: Vec<Sequence> = idx.iter().map(|&i| train_kl[i].clone()).collect();
                    let mut b = kto_batches(&items, &kl, mbs, pad, true)?;
                    if let Some(r) = &refs {
                        for (k, batch) in b.iter_mut().enumerate() {
                            batch.ref_logps = Some(lookup(r, &idx[k * mbs..k * mbs + batch.labels.len()]));
                        }
                    }
                    Ok(b)
                };
                Ok(self.fit(trainer, &epoch, &eval_b, adapter, train.len(), eval.len())?.0)
            }
            _ => Err(Error::Input("internal: train and eval data of different kinds".into())),
        }
    }
}

/// Epoch `e`'s order of `n` items: shuffled by (seed, e) as SFT shuffles.
pub(crate) fn shuffled(n: usize, seed: u64, e: u64) -> Vec<usize> {
    data::shuffle_split((0..n).collect::<Vec<usize>>(), seed.wrapping_add(e.wrapping_mul(0x9E37_79B9)), 0.0).0
}

/// Batches' (first, second) reference logps as one (first, second) per record, in order.
fn per_record(batches: impl Iterator<Item = Option<(Vec<f64>, Vec<f64>)>>) -> Vec<(f64, f64)> {
    batches.flat_map(|r| {
        let (a, b) = r.unwrap_or_default();
        a.into_iter().zip(b)
    })
    .collect()
}

/// The cached reference logps of records `ids`, as a batch carries them.
fn lookup(cache: &[(f64, f64)], ids: &[usize]) -> (Vec<f64>, Vec<f64>) {
    ids.iter().map(|&i| cache[i]).unzip()
}

/// Reference logps per training record (chosen and rejected of a pair; a KTO item and its KL
/// sequence), computed once by `compute` with the initial model and cached in
/// `output_dir/reference_logps.json`, reused when its kind and record sources match.
fn reference_cache(cfg: &TrainConfig, kind: &str, sources: &[&str], compute: impl FnOnce() -> Result<Vec<(f64, f64)>>) -> Result<Vec<(f64, f64)>> {
    let path = cfg.output_dir.join("reference_logps.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            let same = v["kind"] == kind && v["sources"].as_array().is_some_and(|s| s.iter().map(|x| x.as_str().unwrap_or("")).eq(sources.iter().copied()));
            let get = |k: &str| v[k].as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect::<Vec<f64>>());
            if let (true, Some(a), Some(b)) = (same, get("first"), get("second")) {
                if a.len() == sources.len() && b.len() == sources.len() {
                    eprintln!("reference log-probs: reusing {}", path.display());
                    return Ok(a.into_iter().zip(b).collect());
                }
            }
        }
    }
    eprintln!("reference log-probs: computing them once for {} records", sources.len());
    let out = compute()?;
    if out.len() != sources.len() {
        return Err(Error::Input(format!("reference log-probs: {} values for {} records", out.len(), sources.len())));
    }
    std::fs::create_dir_all(&cfg.output_dir).map_err(|e| Error::io(&cfg.output_dir, e))?;
    let json = serde_json::json!({
        "kind": kind,
        "sources": sources,
        "first": out.iter().map(|p| p.0).collect::<Vec<f64>>(),
        "second": out.iter().map(|p| p.1).collect::<Vec<f64>>(),
    });
    temper_runtime::formats::safetensors::write_atomic(&path, json.to_string().as_bytes())?;
    Ok(out)
}

impl PrefRun<'_> {
    fn fit<A, L, B>(&self, trainer: Trainer<A, L, AdamW>, epoch: &dyn Fn(u64) -> Result<Vec<B>>, eval: &[B], adapter: Option<&str>, n_train: usize, n_eval: usize) -> Result<(SftSummary, Trainer<A, L, AdamW>)>
    where
        A: AdapterFormat + Adapter,
        B: Clone,
        Trainer<A, L, AdamW>: Steps<B>,
    {
        let run = Fit { cfg: self.cfg, cfg_path: self.cfg_path, tok: self.tok, resume: self.resume, progress: self.progress };
        run.fit(trainer, epoch, eval, adapter, n_train, n_eval)
    }
}

/// What the monitored loop of a preference or RL run needs from the command line.
pub(crate) struct Fit<'a> {
    pub cfg: &'a TrainConfig,
    pub cfg_path: &'a Path,
    pub tok: &'a Tokenizer,
    pub resume: bool,
    pub progress: Progress,
}

impl Fit<'_> {
    /// The monitored loop over `epoch`'s batches.
    pub(crate) fn fit<A, L, B>(&self, mut trainer: Trainer<A, L, AdamW>, epoch: &dyn Fn(u64) -> Result<Vec<B>>, eval: &[B], adapter: Option<&str>, n_train: usize, n_eval: usize) -> Result<(SftSummary, Trainer<A, L, AdamW>)>
    where
        A: AdapterFormat + Adapter,
        B: Clone,
        Trainer<A, L, AdamW>: Steps<B>,
    {
        let cfg = self.cfg;
        let micro_per_epoch = epoch(0)?.len();
        let Prepared { opts, mut monitor, prompts } = prepare(cfg, self.cfg_path, self.tok, adapter, micro_per_epoch, self.resume, self.progress)?;
        let samples = (!prompts.is_empty()).then(|| Samples { prompts, tokenizer: self.tok, max_new_tokens: cfg.sample_max_new_tokens });
        eprintln!(
            "{}: {n_train} records ({n_eval} eval) for {} steps of {} × {} micro-batches; {}",
            cfg.rl.as_deref().unwrap_or(""),
            opts.total_steps,
            cfg.gradient_accumulation_steps,
            cfg.micro_batch_size,
            trainer.model.parameter_counts()
        );
        let summary = sft::run(&mut trainer, epoch, eval, samples.as_ref(), &opts, &mut monitor);
        let png = monitor.finish();
        let summary = summary?;
        eprintln!("wrote {} ({}), plot {}", cfg.output_dir.display(), if adapter.is_some() { "PEFT adapter" } else { "full model" }, png?.display());
        Ok((summary, trainer))
    }
}

/// A reward model transformers loads as `…ForSequenceClassification`: the adapter merged, in
/// `output_dir/reward_model` with the tokenizer files (full fine-tuning: `output_dir` itself is one).
fn save_reward_model<A: Adapter>(cfg: &TrainConfig, tok: &Tokenizer, model: Llama<A>, adapter: Option<&str>) -> Result<PathBuf> {
    let dir = if adapter.is_some() { cfg.output_dir.join("reward_model") } else { cfg.output_dir.clone() };
    let mut merged = model.merge_and_unload()?;
    merged.dequantize_linears()?;
    merged.to_device(temper_runtime::Device::Cpu)?;
    merged.save_pretrained(&dir)?;
    let tj = dir.join("tokenizer.json");
    tok.inner().save(&tj, false).map_err(|e| Error::Input(format!("{}: cannot write the tokenizer: {e}", tj.display())))?;
    let mut tc = serde_json::json!({ "model_max_length": cfg.sequence_len, "tokenizer_class": "PreTrainedTokenizerFast" });
    for (k, v) in [("bos_token", &tok.bos_token), ("eos_token", &tok.eos_token)] {
        if let Some(t) = v {
            tc[k] = serde_json::json!(t);
        }
    }
    if let Some(id) = merged.config.pad_token_id {
        if let Some(t) = tok.inner().id_to_token(id) {
            tc["pad_token"] = serde_json::json!(t);
        }
    }
    if let Some(t) = &tok.chat_template {
        tc["chat_template"] = serde_json::json!(t);
    }
    temper_runtime::formats::safetensors::write_atomic(&dir.join("tokenizer_config.json"), tc.to_string().as_bytes())?;
    eprintln!("wrote the reward model (LlamaForSequenceClassification) to {}", dir.display());
    Ok(dir)
}
