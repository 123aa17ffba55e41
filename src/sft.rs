//! `temper train` and `temper data preview`: a [`TrainConfig`] turned into data, a model with its
//! adapter, a specialised trainer and a monitored run.

use crate::config::{TargetModules, TrainConfig};
use std::path::{Path, PathBuf};
use temper_runtime::adapters::{AdapterConfig, AdapterFormat, Dora, Lora, NoAdapter, Targets};
use temper_runtime::data::{self, DatasetSpec, Example, TokenizeOptions};
use temper_runtime::loss::ce;
use temper_runtime::models::Llama;
use temper_runtime::monitor::{Monitor, MonitorOptions, Progress};
use temper_runtime::optim::AdamW;
use temper_runtime::tokenizer::Tokenizer;
use temper_runtime::train::sft::{self, Samples, SftOptions, SftSummary};
use temper_runtime::train::{checkpoint, Batch, Schedule, ScheduleKind, Trainer};
use temper_runtime::{Error, ModuleExt, Result};

/// A tokenizer from a Hugging Face folder or a GGUF file.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if path.is_dir() {
        Tokenizer::from_hf_dir(path)
    } else {
        Tokenizer::from_gguf(&temper_runtime::formats::gguf::GgufFile::open(path)?)
    }
}

/// The chat template the config asks for (None: the tokenizer's own).
pub(crate) fn chat_template(cfg: &TrainConfig, path: &Path) -> Result<Option<String>> {
    match cfg.chat_template.as_deref() {
        None | Some("tokenizer") => Ok(None),
        Some(name) => {
            if let Some(t) = temper_runtime::chat_template::builtin_template(name) {
                return Ok(Some(t.to_string()));
            }
            let p = Path::new(name);
            if p.extension().is_some_and(|e| e == "jinja") {
                return std::fs::read_to_string(p).map(Some).map_err(|e| Error::io(p, e));
            }
            Err(Error::Config { path: path.into(), key: "chat_template".into(), msg: format!("`{name}` is neither \"tokenizer\", a built-in (chatml, llama3, mistral) nor a .jinja file") })
        }
    }
}

pub(crate) fn dataset_spec(cfg_path: &Path, d: &crate::config::DatasetSection) -> Result<DatasetSpec> {
    let bad = |key: &str, msg: String| Error::Config { path: cfg_path.into(), key: format!("datasets.{key}"), msg };
    let format: data::Format = serde_json::from_value(serde_json::Value::String(d.format.clone()))
        .map_err(|_| bad("type", format!("`{}` is not one of chat, sharegpt, alpaca, completion, input_output, tokenized, preference, kto", d.format)))?;
    let mut spec = DatasetSpec::new(d.path.clone(), format);
    if let Some(t) = &d.train_on {
        spec.train_on = serde_json::from_value(serde_json::Value::String(t.clone()))
            .map_err(|_| bad("train_on", format!("`{t}` is not one of assistant, all, last_turn, per_message")))?;
    }
    if !d.fields.is_empty() {
        let v = serde_json::to_value(&d.fields).map_err(|e| bad("fields", e.to_string()))?;
        spec.fields = serde_json::from_value(v).map_err(|e| bad("fields", e.to_string()))?;
    }
    Ok(spec)
}

/// How the config's records become token ids: `sequence_len`, the chat template, `too_long`.
pub(crate) fn tokenize_options(cfg: &TrainConfig, cfg_path: &Path) -> Result<TokenizeOptions> {
    let mut opts = TokenizeOptions::new(cfg.sequence_len);
    opts.chat_template = chat_template(cfg, cfg_path)?;
    if cfg.too_long.as_deref() == Some("truncate") {
        opts.too_long = data::TooLong::Truncate;
    }
    Ok(opts)
}

/// Every dataset of the config, tokenized, with what happened to the records printed.
pub fn load_examples(cfg: &TrainConfig, cfg_path: &Path, tok: &Tokenizer, quiet: bool) -> Result<Vec<Example>> {
    let opts = tokenize_options(cfg, cfg_path)?;
    let mut all = Vec::new();
    for d in &cfg.datasets {
        let (ex, report) = data::load(&dataset_spec(cfg_path, d)?, tok, &opts)?;
        if !quiet {
            eprintln!("{}: {report}", d.path.display());
            if !report.dropped_no_target.is_empty() {
                let first: Vec<&str> = report.dropped_no_target.iter().take(5).map(String::as_str).collect();
                eprintln!("  not trained (no target token after masking): {}{}", first.join(", "), if report.dropped_no_target.len() > 5 { ", …" } else { "" });
            }
        }
        all.extend(ex);
    }
    if all.is_empty() {
        return Err(Error::Input(format!("{}: no usable examples in the datasets", cfg_path.display())));
    }
    Ok(all)
}

/// `temper data preview`: the first `n` examples as the model sees them.
pub fn preview(cfg_path: &Path, n: usize, json: bool) -> Result<Vec<String>> {
    let cfg = TrainConfig::from_file(cfg_path)?;
    // Fail before loading anything when the device is missing.
    cfg.device().map_err(|e| Error::Input(format!("{}: key `device`: {e}", cfg_path.display())))?;
    let tok = load_tokenizer(cfg.tokenizer.as_ref().unwrap_or(&cfg.base_model))?;
    if matches!(cfg.rl.as_deref(), Some("grpo" | "ppo")) {
        return crate::rl_run::preview(&cfg, cfg_path, &tok, n, json);
    }
    if cfg.rl.is_some() {
        return crate::preference::preview(&cfg, cfg_path, &tok, n, json);
    }
    let ex = load_examples(&cfg, cfg_path, &tok, json)?;
    data::preview(&ex, &tok, n, json)
}

/// `temper train`: runs the config and returns the run's summary.
pub fn train(cfg_path: &Path, resume: bool, progress: Progress) -> Result<SftSummary> {
    let cfg = TrainConfig::from_file(cfg_path)?;
    // Fail before loading anything when the device is missing.
    cfg.device().map_err(|e| Error::Input(format!("{}: key `device`: {e}", cfg_path.display())))?;
    let tok = load_tokenizer(cfg.tokenizer.as_ref().unwrap_or(&cfg.base_model))?;
    let mut base = Llama::load_with(&cfg.base_model, &cfg.load_options())?;
    if tok.vocab_size() > base.config.vocab_size {
        return Err(Error::Input(format!(
            "the tokenizer has {} tokens but {} has a vocabulary of {}: they do not belong together",
            tok.vocab_size(),
            cfg.base_model.display(),
            base.config.vocab_size
        )));
    }
    base.gradient_checkpointing = cfg.gradient_checkpointing;
    if matches!(cfg.rl.as_deref(), Some("grpo" | "ppo")) {
        return crate::rl_run::train(&cfg, cfg_path, &tok, base, resume || cfg.resume, progress);
    }
    if cfg.rl.is_some() {
        return crate::preference::train(&cfg, cfg_path, &tok, base, resume || cfg.resume, progress);
    }
    let examples = load_examples(&cfg, cfg_path, &tok, false)?;
    let (train_ex, mut eval_ex) = data::shuffle_split(examples, cfg.seed, cfg.val_set_size);
    if !cfg.test_datasets.is_empty() {
        let held_out = TrainConfig { datasets: cfg.test_datasets.clone(), ..cfg.clone() };
        eval_ex = load_examples(&held_out, cfg_path, &tok, false)?;
    }
    if train_ex.is_empty() {
        return Err(Error::Input(format!("{}: val_set_size {} leaves no training examples", cfg_path.display(), cfg.val_set_size)));
    }
    let run = Run { cfg: &cfg, cfg_path, tok: &tok, train: &train_ex, eval: &eval_ex, resume: resume || cfg.resume, progress };
    with_adapter(&cfg, base, run)
}

/// What to do with the model once its adapter is attached (generic over the adapter type).
pub(crate) trait WithModel {
    type Out;
    fn go<A: AdapterFormat + temper_runtime::adapters::Adapter>(self, model: Llama<A>, adapter: Option<&str>) -> Result<Self::Out>;
}

/// Attaches the config's adapter to `base` (or unfreezes it for full fine-tuning) and hands the
/// model to `then`.
pub(crate) fn with_adapter<W: WithModel>(cfg: &TrainConfig, mut base: Llama, then: W) -> Result<W::Out> {
    let a = &cfg.adapter;
    let targets = match &a.target_modules {
        None => Targets::AllLinear,
        Some(TargetModules::One(s)) if s == "all-linear" => Targets::AllLinear,
        Some(TargetModules::One(s)) => Targets::Regex(s.clone()),
        Some(TargetModules::List(v)) => Targets::names(v.clone()),
    };
    let alpha = a.alpha.unwrap_or(2.0 * a.r as f64);
    match a.kind.as_str() {
        // QLoRA is LoRA on the 4-bit base `load_options` gave.
        "lora" | "qlora" => {
            let c = Lora::config(a.r, alpha).targets(targets).seed(cfg.seed).with(|h| {
                h.lora_dropout = a.dropout;
                h.use_rslora = a.use_rslora;
                h.loraplus_lr_ratio = a.loraplus_lr_ratio.unwrap_or(1.0);
            });
            then.go(base.with_adapter("default", &c)?, Some("default"))
        }
        "dora" => {
            let c: AdapterConfig<Dora> = Dora::config(a.r, alpha).targets(targets).seed(cfg.seed).with(|h| {
                h.lora_dropout = a.dropout;
                h.use_rslora = a.use_rslora;
                h.loraplus_lr_ratio = a.loraplus_lr_ratio.unwrap_or(1.0);
            });
            then.go(base.with_adapter("default", &c)?, Some("default"))
        }
        _ => {
            base.unfreeze(".")?;
            then.go::<NoAdapter>(base, None)
        }
    }
}

struct Run<'a> {
    cfg: &'a TrainConfig,
    cfg_path: &'a Path,
    tok: &'a Tokenizer,
    train: &'a [Example],
    eval: &'a [Example],
    resume: bool,
    progress: Progress,
}

impl WithModel for Run<'_> {
    type Out = SftSummary;
    fn go<A: AdapterFormat + temper_runtime::adapters::Adapter>(self, model: Llama<A>, adapter: Option<&str>) -> Result<SftSummary> {
        self.run(model, adapter)
    }
}

impl Run<'_> {
    /// Epoch `e`'s micro-batches: the training examples shuffled by (seed, e), packed or padded.
    fn epoch(&self, e: u64) -> Result<Vec<Batch>> {
        let (shuffled, _) = data::shuffle_split(self.train.to_vec(), self.cfg.seed.wrapping_add(e.wrapping_mul(0x9E37_79B9)), 0.0);
        let pad = self.tok.pad_token_id.or(self.tok.eos_token_ids.first().copied()).unwrap_or(0);
        if self.cfg.sample_packing {
            data::packed_batches(&data::pack(&shuffled, self.cfg.sequence_len)?, self.cfg.micro_batch_size, pad)
        } else {
            data::batches(&shuffled, self.cfg.micro_batch_size, pad)
        }
    }

    fn run<A: AdapterFormat + temper_runtime::adapters::Adapter>(&self, mut model: Llama<A>, adapter: Option<&str>) -> Result<SftSummary> {
        let cfg = self.cfg;
        place(cfg, &mut model)?;
        let micro_per_epoch = self.epoch(0)?.len();
        let pad = self.tok.pad_token_id.or(self.tok.eos_token_ids.first().copied()).unwrap_or(0);
        let eval = data::batches(self.eval, cfg.micro_batch_size, pad)?;
        let Prepared { opts, mut monitor, prompts } = prepare(cfg, self.cfg_path, self.tok, adapter, micro_per_epoch, self.resume, self.progress)?;
        let total_steps = opts.total_steps;
        let samples = (!prompts.is_empty()).then(|| Samples { prompts, tokenizer: self.tok, max_new_tokens: cfg.sample_max_new_tokens });
        eprintln!(
            "training {} examples ({} eval) for {total_steps} steps of {} × {} micro-batches; {}",
            self.train.len(),
            self.eval.len(),
            cfg.gradient_accumulation_steps,
            cfg.micro_batch_size,
            model.parameter_counts()
        );
        let mut trainer = Trainer::new(model, ce(), AdamW::lr(cfg.learning_rate).weight_decay(cfg.weight_decay));
        let epoch = |e: u64| self.epoch(e);
        let summary = sft::run(&mut trainer, &epoch, &eval, samples.as_ref(), &opts, &mut monitor);
        let png = monitor.finish();
        let summary = summary?;
        eprintln!("wrote {} ({}), plot {}", cfg.output_dir.display(), if adapter.is_some() { "PEFT adapter" } else { "full model" }, png?.display());
        let _ = self.cfg_path;
        Ok(summary)
    }

}

/// Casts the model to bf16 and moves it to the configured device.
pub(crate) fn place<A: temper_runtime::adapters::Adapter>(cfg: &TrainConfig, model: &mut Llama<A>) -> Result<()> {
    let device = cfg.device()?;
    if cfg.bf16 {
        // The base was loaded in bf16; adapters are drawn in f32 (the same draws as an f32 run) and
        // stored in bf16 too. AdamW keeps f32 master copies of whatever it trains.
        model.to_dtype(temper_runtime::DType::BF16)?;
    }
    if device.is_cuda() {
        // Adapters are initialised on the host (the same draws as on the CPU), then everything moves.
        model.to_device(device)?;
    }
    Ok(())
}

/// The loop's options, the monitor and the sample prompts of a run.
pub(crate) struct Prepared {
    pub opts: SftOptions,
    pub monitor: Monitor,
    pub prompts: Vec<Vec<u32>>,
}

/// Steps from epochs or max_steps, the schedule, the monitor (resuming its logs) and the options.
pub(crate) fn prepare(cfg: &TrainConfig, cfg_path: &Path, tok: &Tokenizer, adapter: Option<&str>, micro_per_epoch: usize, resume: bool, progress: Progress) -> Result<Prepared> {
    let total_steps = match cfg.max_steps {
        Some(n) => n,
        None => sft::steps_for_epochs(cfg.num_epochs.unwrap_or(1.0), micro_per_epoch, cfg.gradient_accumulation_steps),
    };
    let kind = match cfg.lr_scheduler.as_deref() {
        Some("linear") => ScheduleKind::Linear,
        Some("constant") => ScheduleKind::Constant,
        _ => ScheduleKind::Cosine,
    };
    let resume_from = if resume { checkpoint::list(&cfg.output_dir)?.pop().map(|(n, _)| n) } else { None };
    let monitor = Monitor::new(&cfg.output_dir, total_steps, MonitorOptions { progress, resume_from_step: resume_from })?;
    if adapter.is_some() {
        write_quant_sidecar(&cfg.output_dir, &cfg.load_options())?;
    }
    let prompts = sample_prompts(cfg, cfg_path, tok)?;
    let opts = SftOptions {
        output_dir: cfg.output_dir.clone(),
        gradient_accumulation_steps: cfg.gradient_accumulation_steps,
        total_steps,
        schedule: Schedule { kind, peak_lr: cfg.learning_rate, warmup_steps: cfg.warmup_steps, total_steps },
        max_grad_norm: Some(cfg.max_grad_norm).filter(|&m| m > 0.0),
        logging_steps: cfg.logging_steps,
        eval_steps: cfg.eval_steps,
        save_steps: cfg.save_steps,
        save_total_limit: cfg.save_total_limit,
        adapter: adapter.map(String::from),
        base_model: Some(cfg.base_model.display().to_string()),
        seed: cfg.seed,
        resume,
        eval_on_start: cfg.eval_on_start,
    };
    Ok(Prepared { opts, monitor, prompts })
}

/// The config's sample prompts rendered as a user turn with the generation prompt.
pub(crate) fn sample_prompts(cfg: &TrainConfig, cfg_path: &Path, tok: &Tokenizer) -> Result<Vec<Vec<u32>>> {
    let template = chat_template(cfg, cfg_path)?.or_else(|| tok.chat_template.clone());
    cfg.sample_prompts
        .iter()
        .map(|p| match &template {
            Some(t) => {
                let msgs = [temper_runtime::chat_template::ChatMessage::new("user", p.clone())];
                let text = temper_runtime::chat_template::render_chat(t, &msgs, true, tok.bos_token.as_deref(), tok.eos_token.as_deref())?;
                tok.encode(&text, false)
            }
            None => tok.encode(p, true),
        })
        .collect()
}

/// Where `temper train` puts its outputs (for messages).
/// The file beside a trained adapter that says how its base was quantised during training, so that
/// `temper merge` merges into the same dequant(W4) (PEFT's adapter_config.json has no such field).
pub const QUANT_SIDECAR: &str = "temper_quantization.json";

/// Writes [`QUANT_SIDECAR`] into `dir` when the base is quantised (removes a stale one otherwise).
pub(crate) fn write_quant_sidecar(dir: &Path, opts: &temper_runtime::models::LoadOptions) -> Result<()> {
    let p = dir.join(QUANT_SIDECAR);
    let json = match (opts.quantize, opts.keep_gguf_quantized) {
        (Some(c), _) => serde_json::json!({
            "load_in_4bit": true,
            "bnb_4bit_quant_type": c.quant_type.as_str(),
            "bnb_4bit_blocksize": c.blocksize,
            "bnb_4bit_use_double_quant": c.double_quant,
        }),
        (None, true) => serde_json::json!({ "gguf_keep_quantized": true }),
        (None, false) => {
            if p.exists() {
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
            return Ok(());
        }
    };
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::Input(e.to_string()))?;
    temper_runtime::formats::safetensors::write_atomic(&p, text.as_bytes())
}

/// Reads [`QUANT_SIDECAR`]: the load options that reproduce the training base.
pub fn read_quant_sidecar(p: &Path) -> Result<temper_runtime::models::LoadOptions> {
    use temper_runtime::quant::{Bnb4bitConfig, QuantType};
    let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::format(p, format!("invalid JSON: {e}")))?;
    let key_err = |key: &str, msg: &str| Error::Config { path: p.into(), key: key.into(), msg: msg.into() };
    let mut opts = temper_runtime::models::LoadOptions::dense(temper_runtime::DType::F32);
    opts.keep_gguf_quantized = v.get("gguf_keep_quantized").and_then(|b| b.as_bool()).unwrap_or(false);
    if v.get("load_in_4bit").and_then(|b| b.as_bool()).unwrap_or(false) {
        let qt = v.get("bnb_4bit_quant_type").and_then(|t| t.as_str()).ok_or_else(|| key_err("bnb_4bit_quant_type", "missing or not a string"))?;
        let blocksize = v.get("bnb_4bit_blocksize").and_then(|b| b.as_u64()).ok_or_else(|| key_err("bnb_4bit_blocksize", "missing or not an integer"))? as usize;
        temper_runtime::quant::blockwise::check_blocksize(blocksize).map_err(|e| key_err("bnb_4bit_blocksize", &e.to_string()))?;
        opts.quantize = Some(Bnb4bitConfig {
            quant_type: QuantType::parse(qt).map_err(|e| key_err("bnb_4bit_quant_type", &e.to_string()))?,
            blocksize,
            double_quant: v.get("bnb_4bit_use_double_quant").and_then(|b| b.as_bool()).unwrap_or(true),
        });
    }
    Ok(opts)
}

pub fn output_dir(cfg_path: &Path) -> Result<PathBuf> {
    Ok(TrainConfig::from_file(cfg_path)?.output_dir)
}
