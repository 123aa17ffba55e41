//! The supervised fine-tuning loop: epochs of micro-batches, gradient accumulation, the
//! learning-rate schedule, clipping, evaluation, sample generations, checkpoints and resume.
//!
//! The data arrives as a function from an epoch number to that epoch's micro-batches (already
//! shuffled by seed), so the position in the data is just (epoch, index) and a resumed run picks
//! up exactly where the checkpoint was taken.

use super::checkpoint::{self, TrainerState};
use super::preference::Steps;
use super::{Schedule, StepLog, Trainer};
use crate::adapters::AdapterFormat;
use crate::error::{Error, Result};
use crate::optim::Optimizer;
use std::path::PathBuf;
use std::time::Instant;

/// Where a run reports to (the terminal, metrics.jsonl, TensorBoard — see `monitor`).
pub trait Logger {
    fn train(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()>;
    fn eval(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()>;
    fn text(&mut self, step: u64, tag: &str, text: &str) -> Result<()>;
}

impl Logger for crate::monitor::Monitor {
    fn train(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        self.log_train(step, scalars)
    }
    fn eval(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        self.log_eval(step, scalars)
    }
    fn text(&mut self, step: u64, tag: &str, text: &str) -> Result<()> {
        self.log_text(step, tag, text)
    }
}

/// A logger that keeps everything in memory (tests, library use without files).
#[derive(Default, Debug, Clone)]
pub struct MemoryLogger {
    pub train: Vec<(u64, Vec<(String, f64)>)>,
    pub eval: Vec<(u64, Vec<(String, f64)>)>,
    pub text: Vec<(u64, String, String)>,
}

impl Logger for MemoryLogger {
    fn train(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        self.train.push((step, scalars.iter().map(|(k, v)| (k.to_string(), *v)).collect()));
        Ok(())
    }
    fn eval(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        self.eval.push((step, scalars.iter().map(|(k, v)| (k.to_string(), *v)).collect()));
        Ok(())
    }
    fn text(&mut self, step: u64, tag: &str, text: &str) -> Result<()> {
        self.text.push((step, tag.into(), text.into()));
        Ok(())
    }
}

/// How the loop runs.
#[derive(Clone, Debug)]
pub struct SftOptions {
    pub output_dir: PathBuf,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Optimizer steps in the run (derive it from epochs with [`steps_for_epochs`]).
    pub total_steps: u64,
    pub schedule: Schedule,
    pub max_grad_norm: Option<f64>,
    /// Log every N steps (1 = every step).
    pub logging_steps: u64,
    pub eval_steps: Option<u64>,
    pub save_steps: Option<u64>,
    /// Checkpoints kept (0 = all).
    pub save_total_limit: usize,
    /// The adapter trained (None: full fine-tuning).
    pub adapter: Option<String>,
    /// Written into saved adapter configs.
    pub base_model: Option<String>,
    pub seed: u64,
    /// Continue from the last checkpoint in `output_dir` when there is one.
    pub resume: bool,
    /// Evaluate once before the first step (TRL's `eval_on_start`), so curves start from the base.
    pub eval_on_start: bool,
}

/// Optimizer steps for `epochs` passes over `micro_batches_per_epoch`.
pub fn steps_for_epochs(epochs: f64, micro_batches_per_epoch: usize, accumulation: usize) -> u64 {
    ((epochs * micro_batches_per_epoch as f64) / accumulation.max(1) as f64).ceil().max(1.0) as u64
}

/// Sample generations at each evaluation.
pub struct Samples<'a> {
    pub prompts: Vec<Vec<u32>>,
    pub tokenizer: &'a crate::tokenizer::Tokenizer,
    pub max_new_tokens: usize,
}

/// Greedy generations for the sample prompts, logged as text (`sample/i`).
fn log_samples<A: AdapterFormat, L, O: Optimizer>(trainer: &mut Trainer<A, L, O>, sm: &Samples<'_>, step: u64, log: &mut dyn Logger) -> Result<()> {
    let cfg = crate::generate::GenerationConfig {
        max_new_tokens: sm.max_new_tokens,
        eos_token_ids: sm.tokenizer.eos_token_ids.clone(),
        pad_token_id: sm.tokenizer.pad_token_id.unwrap_or(0),
        ..Default::default()
    };
    let was = std::mem::replace(&mut trainer.model.training, false);
    let out = crate::generate::generate(&trainer.model, &sm.prompts, &cfg, Some(sm.tokenizer));
    trainer.model.training = was;
    for (i, ids) in out?.tokens.iter().enumerate() {
        log.text(step, &format!("sample/{i}"), &decode_lenient(sm.tokenizer, ids)?)?;
    }
    Ok(())
}

/// Text of generated ids; ids past the tokenizer's vocabulary (models often pad their embedding
/// table) show as `<id:N>` instead of failing the run.
pub(crate) fn decode_lenient(tok: &crate::tokenizer::Tokenizer, ids: &[u32]) -> Result<String> {
    let n = tok.vocab_size() as u32;
    let mut out = String::new();
    for chunk in ids.split_inclusive(|&id| id >= n) {
        let (last, body) = match chunk.split_last() {
            Some((&l, b)) if l >= n => (Some(l), b),
            _ => (None, chunk),
        };
        out.push_str(&tok.decode(body, true)?);
        if let Some(l) = last {
            out.push_str(&format!("<id:{l}>"));
        }
    }
    Ok(out)
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct SftSummary {
    pub steps: u64,
    pub losses: Vec<f64>,
    /// The last evaluation's named values (`loss` first; SFT adds `ppl`, preference losses their metrics).
    pub last_eval: Option<Vec<(&'static str, f64)>>,
    pub resumed_from: Option<u64>,
    pub final_dir: PathBuf,
}

/// Runs supervised fine-tuning. `epoch_batches(e)` gives epoch `e`'s micro-batches; `eval` the
/// evaluation batches. On a non-finite loss the run stops with an error naming the last good
/// checkpoint, which is left intact.
pub fn run<A, L, O, B>(
    trainer: &mut Trainer<A, L, O>,
    epoch_batches: &dyn Fn(u64) -> Result<Vec<B>>,
    eval: &[B],
    samples: Option<&Samples<'_>>,
    opts: &SftOptions,
    log: &mut dyn Logger,
) -> Result<SftSummary>
where
    A: AdapterFormat,
    O: Optimizer,
    B: Clone,
    Trainer<A, L, O>: Steps<B>,
{
    std::fs::create_dir_all(&opts.output_dir).map_err(|e| Error::io(&opts.output_dir, e))?;
    let adapter = opts.adapter.as_deref();
    let (mut epoch, mut index) = (0u64, 0usize);
    let mut resumed_from = None;
    if opts.resume {
        if let Some((n, dir)) = checkpoint::list(&opts.output_dir)?.pop() {
            let st = checkpoint::load(&dir, &mut trainer.model, adapter, &mut trainer.optimizer)?;
            trainer.set_steps(st.step);
            (epoch, index) = (st.epoch, st.batch_index);
            crate::ops::set_dropout_seed(st.dropout_state);
            resumed_from = Some(n);
        }
    }
    if resumed_from.is_none() {
        crate::ops::set_dropout_seed(opts.seed);
    }
    let mut batches = epoch_batches(epoch)?;
    if batches.is_empty() {
        return Err(Error::Input("the training set gives no batches".into()));
    }
    let mut last_good: Option<PathBuf> = checkpoint::list(&opts.output_dir)?.pop().map(|(_, d)| d);
    let mut losses = Vec::new();
    let mut last_eval = None;
    let started = Instant::now();
    let mut window = (Instant::now(), 0usize);
    if let (Some(sm), None) = (samples, resumed_from) {
        log_samples(trainer, sm, 0, log)?; // what the model says before training, to compare
    }
    if opts.eval_on_start && resumed_from.is_none() && !eval.is_empty() {
        let m = trainer.eval_metrics(eval)?;
        log.eval(0, &m)?;
    }
    while trainer.steps() < opts.total_steps {
        let mut micro = Vec::with_capacity(opts.gradient_accumulation_steps);
        while micro.len() < opts.gradient_accumulation_steps.max(1) {
            if index >= batches.len() {
                epoch += 1;
                index = 0;
                batches = epoch_batches(epoch)?;
            }
            micro.push(batches[index].clone());
            index += 1;
        }
        let step = trainer.steps();
        let lr = opts.schedule.lr_at(step);
        let s: StepLog = trainer.train_step(&micro, Some(lr), opts.max_grad_norm).map_err(|e| {
            let keep = match &last_good {
                Some(d) => format!("the last good checkpoint is {}", d.display()),
                None => "no checkpoint was written yet".to_string(),
            };
            Error::Input(format!("{e}; {keep}"))
        })?;
        losses.push(s.loss);
        window.1 += s.input_tokens;
        if s.step % opts.logging_steps.max(1) == 0 || s.step == opts.total_steps {
            let secs = window.0.elapsed().as_secs_f64().max(1e-9);
            let mut scalars: Vec<(&str, f64)> = vec![("loss", s.loss), ("lr", lr), ("tokens_per_s", window.1 as f64 / secs), ("grad_norm", s.grad_norm), ("epoch", epoch as f64 + index as f64 / batches.len() as f64)];
            if s.terms.len() > 1 {
                scalars.extend(s.terms.iter().map(|(k, v)| (*k, *v)));
            }
            log.train(s.step, &scalars)?;
            window = (Instant::now(), 0);
        }
        let last = s.step == opts.total_steps;
        if opts.eval_steps.is_some_and(|n| n > 0 && s.step % n == 0) || last {
            if !eval.is_empty() {
                let m = trainer.eval_metrics(eval)?;
                log.eval(s.step, &m)?;
                last_eval = Some(m);
            }
            if let Some(sm) = samples {
                log_samples(trainer, sm, s.step, log)?;
            }
        }
        if opts.save_steps.is_some_and(|n| n > 0 && s.step % n == 0) {
            let state = TrainerState { step: s.step, epoch, batch_index: index, dropout_state: crate::ops::dropout_state(), total_steps: opts.total_steps, seed: opts.seed };
            last_good = Some(checkpoint::save(&opts.output_dir, &trainer.model, adapter, &trainer.optimizer, &state, opts.save_total_limit, opts.base_model.as_deref())?);
        }
    }
    let _ = started;
    checkpoint::save_weights(&trainer.model, adapter, &opts.output_dir, opts.base_model.as_deref())?;
    Ok(SftSummary { steps: trainer.steps(), losses, last_eval, resumed_from, final_dir: opts.output_dir.clone() })
}
