//! `temper train CONFIG.toml`: the run's settings, with Axolotl-like keys (docs/config.md lists
//! them all). Unknown keys and conflicting options are errors that name the key.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use temper_runtime::{Error, Result};

/// The whole config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// A Hugging Face model folder or a llama GGUF file.
    pub base_model: PathBuf,
    /// Tokenizer folder or GGUF (default: the base model's).
    pub tokenizer: Option<PathBuf>,
    /// `"tokenizer"` (the model's own template, default), `"chatml"`, or a path to a `.jinja` file.
    pub chat_template: Option<String>,
    #[serde(default)]
    pub adapter: AdapterSection,
    /// Quantise the decoder's linear layers to bitsandbytes 4-bit as the model loads (QLoRA; implied
    /// by `adapter.kind = "qlora"`). A pre-quantised bitsandbytes checkpoint loads 4-bit anyway.
    #[serde(default)]
    pub load_in_4bit: bool,
    /// `"nf4"` (default) or `"fp4"`.
    #[serde(default = "d_quant_type")]
    pub bnb_4bit_quant_type: String,
    /// Quantise the block scales too (default true, as QLoRA recipes set it).
    #[serde(default = "d_true")]
    pub bnb_4bit_use_double_quant: bool,
    /// Values per absmax block: 32, 64 (default), 128, … 4096.
    #[serde(default = "d_blocksize")]
    pub bnb_4bit_blocksize: usize,
    /// Dtype the 4-bit matmul computes in; the CPU backend computes in `"float32"`.
    pub bnb_4bit_compute_dtype: Option<String>,
    /// A GGUF base keeps its Q4_0/Q4_1/Q8_0 linear weights as they are stored, as the frozen
    /// quantised base (instead of dequantising them, or re-quantising to NF4 with load_in_4bit).
    #[serde(default)]
    pub gguf_keep_quantized: bool,
    pub datasets: Vec<DatasetSection>,
    /// Held-out datasets evaluated instead of a `val_set_size` split of `datasets` (Axolotl's key).
    #[serde(default)]
    pub test_datasets: Vec<DatasetSection>,
    /// Fraction of examples held out for evaluation (0 = none).
    #[serde(default)]
    pub val_set_size: f64,
    #[serde(default = "d_sequence_len")]
    pub sequence_len: usize,
    /// `"drop"` (default) or `"truncate"` examples longer than sequence_len.
    pub too_long: Option<String>,
    #[serde(default)]
    pub sample_packing: bool,
    #[serde(default = "d_one")]
    pub micro_batch_size: usize,
    #[serde(default = "d_one")]
    pub gradient_accumulation_steps: usize,
    pub num_epochs: Option<f64>,
    pub max_steps: Option<u64>,
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    /// `"cosine"` (default), `"linear"` or `"constant"`.
    pub lr_scheduler: Option<String>,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d_grad_norm")]
    pub max_grad_norm: f64,
    #[serde(default = "d_one_u64")]
    pub logging_steps: u64,
    pub eval_steps: Option<u64>,
    pub save_steps: Option<u64>,
    #[serde(default = "d_keep")]
    pub save_total_limit: usize,
    pub output_dir: PathBuf,
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// `"cpu"` (default), `"cuda"` or `"cuda:N"`.
    pub device: Option<String>,
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// bf16 compute with f32 master weights; needs a backend with bf16 kernels.
    #[serde(default)]
    pub bf16: bool,
    /// Continue from the last checkpoint in output_dir.
    #[serde(default)]
    pub resume: bool,
    /// Prompts generated from at each evaluation (logged).
    #[serde(default)]
    pub sample_prompts: Vec<String>,
    #[serde(default = "d_sample_tokens")]
    pub sample_max_new_tokens: usize,
    /// Preference / reward training instead of SFT: `"dpo"`, `"ipo"`, `"kto"`, `"orpo"`,
    /// `"simpo"` or `"reward"` (docs/preference.md). Absent: supervised fine-tuning.
    pub rl: Option<String>,
    /// β: the KL strength of DPO/IPO/KTO, SimPO's temperature, ORPO's λ (default 0.1, as TRL).
    pub beta: Option<f64>,
    /// DPO family: one TRL loss type or a list (`sigmoid`, `robust`, `hinge`, `ipo`,
    /// `sigmoid_norm`, `apo_zero`, and `sft` = NLL on the chosen), combined with `loss_weights`.
    pub loss_type: Option<StringOrList>,
    /// One weight per `loss_type` (default 1 each).
    pub loss_weights: Option<Vec<f64>>,
    /// cDPO's ε with `sigmoid`, the flip rate with `robust`, SimPO's smoothing.
    #[serde(default)]
    pub label_smoothing: f64,
    /// SimPO's target margin γ (TRL's default 0.5).
    #[serde(default = "d_simpo_gamma")]
    pub simpo_gamma: f64,
    /// SimPO: weight of an NLL term on the chosen replies (CPO-SimPO; default 0).
    #[serde(default)]
    pub cpo_alpha: f64,
    /// DPO: weight of an NLL term on the chosen replies (RPO; the same as adding `sft` to loss_type).
    pub rpo_alpha: Option<f64>,
    /// KTO: weights of desirable and undesirable items (default 1).
    #[serde(default = "d_one_f64")]
    pub desirable_weight: f64,
    #[serde(default = "d_one_f64")]
    pub undesirable_weight: f64,
    /// Reward models: adds `c · mean((r_c + r_r)²)` to keep rewards centred.
    pub center_rewards_coefficient: Option<f64>,
    /// Compute the reference log-probs once before training (cached in output_dir) instead of
    /// every step; with full fine-tuning this replaces the frozen copy of the model.
    #[serde(default)]
    pub precompute_ref_log_probs: bool,
    /// RL (`rl = "grpo"` / `"ppo"`, docs/rl.md), TRL's names. Completions per prompt (GRPO; default 8).
    pub num_generations: Option<usize>,
    /// Completions sampled per step (default micro_batch_size × gradient_accumulation_steps);
    /// the step's prompts are this / num_generations.
    pub generation_batch_size: Option<usize>,
    /// New tokens per completion (TRL's `max_completion_length`; default 256).
    #[serde(alias = "max_completion_length")]
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature (GRPO 1.0, PPO 0.7), top-p (1.0 = off), top-k (0 = off).
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    /// Strings that end a completion (kept in it).
    #[serde(default)]
    pub stop_strings: Vec<String>,
    /// GRPO: ε (clip range, default 0.2) and ε_high (DAPO's clip-higher; default ε).
    pub epsilon: Option<f64>,
    pub epsilon_high: Option<f64>,
    /// GRPO: `group` (default), `batch` or `none` (Dr. GRPO).
    pub scale_rewards: Option<String>,
    /// GRPO: optimizer steps per generation batch (μ; default 1).
    pub num_iterations: Option<usize>,
    /// GRPO: completions that hit max_new_tokens are left out of the loss.
    #[serde(default)]
    pub mask_truncated_completions: bool,
    /// GRPO: groups whose completions all scored the same are not forwarded (default true).
    pub skip_zero_advantage: Option<bool>,
    /// PPO: the per-token KL penalty in the reward (default 0.05), `k1` (default) or `k3`.
    pub kl_coef: Option<f64>,
    pub kl_estimator: Option<String>,
    /// PPO: GAE's γ (1.0) and λ (0.95); whitening of the per-token rewards (false).
    pub gamma: Option<f64>,
    pub lam: Option<f64>,
    #[serde(default)]
    pub whiten_rewards: bool,
    /// PPO: passes (4) over mini-batches (1) of each rollout batch; policy and value clip
    /// ranges (0.2, 0.2), value-loss weight (0.1); score subtracted from completions without EOS.
    pub num_ppo_epochs: Option<usize>,
    pub num_mini_batches: Option<usize>,
    pub cliprange: Option<f64>,
    pub cliprange_value: Option<f64>,
    pub vf_coef: Option<f64>,
    pub missing_eos_penalty: Option<f64>,
    /// Evaluate once before training (TRL's `eval_on_start`), so curves start from the base model.
    #[serde(default)]
    pub eval_on_start: bool,
    /// RL rewards: built-in functions by name, or reward models, with weights.
    #[serde(default)]
    pub rewards: Vec<RewardSection>,
}

/// `[[rewards]]`: a built-in reward function (`name`) or a reward model (`model`), weighted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSection {
    /// `exact_answer`, `regex`, `think_format`, `length_penalty` (docs/rl.md).
    pub name: Option<String>,
    /// A reward model folder (`…ForSequenceClassification`, e.g. output_dir/reward_model of rl = "reward").
    pub model: Option<PathBuf>,
    #[serde(default = "d_one_f64")]
    pub weight: f64,
    /// exact_answer: the record field holding the answer (default `answer`).
    pub field: Option<String>,
    /// regex: the pattern, and its name in metrics (default `regex`).
    pub pattern: Option<String>,
    pub label: Option<String>,
    /// length_penalty: DAPO's soft overlong punishment (default max_new_tokens and a quarter of it).
    pub max_length: Option<usize>,
    pub cache: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    List(Vec<String>),
}

impl StringOrList {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            StringOrList::One(s) => vec![s.clone()],
            StringOrList::List(v) => v.clone(),
        }
    }
}

/// `[adapter]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSection {
    /// `"lora"` (default), `"dora"`, `"qlora"` or `"none"` (full fine-tuning).
    #[serde(default = "d_kind")]
    pub kind: String,
    #[serde(default = "d_r")]
    pub r: usize,
    pub alpha: Option<f64>,
    #[serde(default)]
    pub dropout: f64,
    /// A list of layer names, or `"all-linear"` (default).
    pub target_modules: Option<TargetModules>,
    #[serde(default)]
    pub use_rslora: bool,
    pub loraplus_lr_ratio: Option<f64>,
}

impl Default for AdapterSection {
    fn default() -> Self {
        AdapterSection { kind: d_kind(), r: d_r(), alpha: None, dropout: 0.0, target_modules: None, use_rslora: false, loraplus_lr_ratio: None }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    One(String),
    List(Vec<String>),
}

/// `[[datasets]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSection {
    pub path: PathBuf,
    /// `chat`, `sharegpt`, `alpaca`, `completion`, `input_output`, `tokenized`.
    #[serde(rename = "type", alias = "format")]
    pub format: String,
    /// `assistant` (default), `all`, `last_turn`, `per_message`.
    pub train_on: Option<String>,
    /// Field names when they differ from the format's defaults.
    #[serde(default)]
    pub fields: std::collections::BTreeMap<String, toml::Value>,
}

fn d_simpo_gamma() -> f64 {
    0.5
}
fn d_one_f64() -> f64 {
    1.0
}
fn d_sequence_len() -> usize {
    512
}
fn d_one() -> usize {
    1
}
fn d_one_u64() -> u64 {
    1
}
fn d_lr() -> f64 {
    2e-4
}
fn d_grad_norm() -> f64 {
    1.0
}
fn d_keep() -> usize {
    2
}
fn d_seed() -> u64 {
    42
}
fn d_sample_tokens() -> usize {
    48
}
fn d_quant_type() -> String {
    "nf4".into()
}
fn d_true() -> bool {
    true
}
fn d_blocksize() -> usize {
    64
}
fn d_kind() -> String {
    "lora".into()
}
fn d_r() -> usize {
    8
}

impl TrainConfig {
    /// How the base model loads: 4-bit on load for QLoRA (kind `qlora` or `load_in_4bit`), GGUF blocks kept.
    /// The device to train on; a CUDA device is checked to exist on this machine.
    pub fn device(&self) -> temper_runtime::Result<temper_runtime::Device> {
        temper_runtime::Device::parse(self.device.as_deref().unwrap_or("cpu"))
    }

    pub fn load_options(&self) -> temper_runtime::models::LoadOptions {
        use temper_runtime::quant::{Bnb4bitConfig, QuantType};
        let four_bit = (self.load_in_4bit || self.adapter.kind == "qlora") && !self.gguf_keep_quantized;
        temper_runtime::models::LoadOptions {
            dtype: if self.bf16 { temper_runtime::DType::BF16 } else { temper_runtime::DType::F32 },
            quantize: four_bit.then(|| Bnb4bitConfig {
                quant_type: QuantType::parse(&self.bnb_4bit_quant_type).unwrap_or(QuantType::Nf4),
                blocksize: self.bnb_4bit_blocksize,
                double_quant: self.bnb_4bit_use_double_quant,
            }),
            keep_gguf_quantized: self.gguf_keep_quantized,
        }
    }

    /// Reads and checks a config file; relative paths are taken from the current directory.
    pub fn from_file(path: &Path) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: TrainConfig = toml::from_str(&text).map_err(|e| Error::format(path, e.to_string().trim_end().to_string()))?;
        cfg.check(path)?;
        Ok(cfg)
    }

    fn check(&self, path: &Path) -> Result<()> {
        let err = |key: &str, msg: String| Err(Error::Config { path: path.into(), key: key.into(), msg });
        if self.num_epochs.is_some() && self.max_steps.is_some() {
            return err("max_steps", "set either num_epochs or max_steps, not both".into());
        }
        if self.datasets.is_empty() {
            return err("datasets", "at least one [[datasets]] entry is needed".into());
        }
        match self.adapter.kind.as_str() {
            "lora" | "dora" | "qlora" | "none" => {}
            other => return err("adapter.kind", format!("`{other}` is not one of \"lora\", \"dora\", \"qlora\", \"none\"")),
        }
        if self.adapter.kind == "none" && (self.load_in_4bit || self.gguf_keep_quantized) {
            return err("load_in_4bit", "a quantised base is frozen: full fine-tuning (adapter.kind = \"none\") cannot train it; use \"qlora\"".into());
        }
        if self.load_in_4bit && self.gguf_keep_quantized {
            return err("gguf_keep_quantized", "choose one quantised base: the GGUF's own blocks (gguf_keep_quantized) or bitsandbytes 4-bit (load_in_4bit)".into());
        }
        if let Err(e) = temper_runtime::quant::QuantType::parse(&self.bnb_4bit_quant_type) {
            return err("bnb_4bit_quant_type", e.to_string());
        }
        if let Err(e) = temper_runtime::quant::blockwise::check_blocksize(self.bnb_4bit_blocksize) {
            return err("bnb_4bit_blocksize", e.to_string());
        }
        if let Some(d) = self.bnb_4bit_compute_dtype.as_deref().filter(|d| *d != "float32") {
            return err("bnb_4bit_compute_dtype", format!("`{d}`: the CPU backend computes in \"float32\""));
        }
        let device = self.device.as_deref().unwrap_or("cpu");
        let cuda = device == "cuda" || device.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok());
        if device != "cpu" && !cuda {
            return err("device", format!("`{device}`: expected \"cpu\", \"cuda\" or \"cuda:N\""));
        }
        if self.bf16 && !cuda {
            return err("bf16", "the CPU backend computes in f32; bf16 compute needs device = \"cuda\"".into());
        }
        if !(0.0..1.0).contains(&self.val_set_size) {
            return err("val_set_size", format!("{} is not a fraction in [0, 1)", self.val_set_size));
        }
        if self.eval_steps.is_some() && self.val_set_size == 0.0 && self.test_datasets.is_empty() {
            return err("eval_steps", "evaluation needs held-out data: set val_set_size > 0 or give test_datasets".into());
        }
        if self.val_set_size > 0.0 && !self.test_datasets.is_empty() {
            return err("val_set_size", "choose one evaluation set: a val_set_size split or test_datasets".into());
        }
        if self.micro_batch_size == 0 || self.gradient_accumulation_steps == 0 || self.sequence_len < 2 {
            return err("micro_batch_size", "micro_batch_size and gradient_accumulation_steps must be ≥ 1 and sequence_len ≥ 2".into());
        }
        if !(0.0..1.0).contains(&self.adapter.dropout) {
            return err("adapter.dropout", format!("{} is not a probability in [0, 1)", self.adapter.dropout));
        }
        if let Some(s) = self.lr_scheduler.as_deref().filter(|s| !["cosine", "linear", "constant"].contains(s)) {
            return err("lr_scheduler", format!("`{s}` is not one of cosine, linear, constant"));
        }
        if let Some(s) = self.too_long.as_deref().filter(|s| !["drop", "truncate"].contains(s)) {
            return err("too_long", format!("`{s}` is not one of drop, truncate"));
        }
        self.check_rl(path)
    }

    /// The RL keys: rewards given, sampling and clipping values in range, GRPO's and PPO's keys
    /// only where they apply.
    fn check_grpo_ppo(&self, rl: &str, path: &Path) -> Result<()> {
        let err = |key: &str, msg: String| Err(Error::Config { path: path.into(), key: key.into(), msg });
        if let Some(d) = self.datasets.iter().chain(&self.test_datasets).find(|d| d.format != "prompt") {
            return err("datasets.type", format!("rl = \"{rl}\" reads datasets of format \"prompt\", but {} is `{}`", d.path.display(), d.format));
        }
        if self.rewards.is_empty() {
            return err("rewards", "RL needs at least one [[rewards]] table (name = \"exact_answer\", or model = \"DIR\")".into());
        }
        for (i, r) in self.rewards.iter().enumerate() {
            if r.name.is_some() == r.model.is_some() {
                return err(&format!("rewards[{i}]"), "give either `name` (a built-in reward) or `model` (a reward model folder)".into());
            }
            if !r.weight.is_finite() {
                return err(&format!("rewards[{i}].weight"), format!("{} is not a number", r.weight));
            }
        }
        if let Some(t) = self.temperature.filter(|t| !(*t > 0.0 && t.is_finite())) {
            return err("temperature", format!("{t} must be positive (RL samples; greedy decoding has no log-probs to train on)"));
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return err("top_p", format!("{p} is not in (0, 1]"));
        }
        for (key, v) in [("epsilon", self.epsilon), ("epsilon_high", self.epsilon_high), ("cliprange", self.cliprange), ("cliprange_value", self.cliprange_value)] {
            if let Some(e) = v.filter(|e| !(*e > 0.0 && e.is_finite())) {
                return err(key, format!("{e} must be a positive number"));
            }
        }
        if let Some(s) = &self.scale_rewards {
            temper_runtime::rl::ScaleRewards::parse(s).map_err(|e| Error::Config { path: path.into(), key: "scale_rewards".into(), msg: e.to_string() })?;
        }
        if let Some(b) = self.beta.filter(|b| !(*b >= 0.0 && b.is_finite())) {
            return err("beta", format!("{b} must be ≥ 0"));
        }
        if rl == "grpo" {
            if self.num_generations.is_some_and(|g| g < 2) {
                return err("num_generations", "GRPO compares completions of one prompt: it needs at least 2".into());
            }
            if let Some(t) = &self.loss_type {
                match t {
                    StringOrList::One(s) => {
                        temper_runtime::loss::LossType::parse(s).map_err(|e| Error::Config { path: path.into(), key: "loss_type".into(), msg: e.to_string() })?;
                    }
                    StringOrList::List(_) => return err("loss_type", "GRPO takes one loss type (grpo, dr_grpo, dapo, bnpo)".into()),
                }
            }
            for (key, set) in [("kl_coef", self.kl_coef.is_some()), ("kl_estimator", self.kl_estimator.is_some()), ("gamma", self.gamma.is_some()), ("lam", self.lam.is_some()), ("whiten_rewards", self.whiten_rewards), ("num_ppo_epochs", self.num_ppo_epochs.is_some()), ("num_mini_batches", self.num_mini_batches.is_some()), ("cliprange", self.cliprange.is_some()), ("cliprange_value", self.cliprange_value.is_some()), ("vf_coef", self.vf_coef.is_some()), ("missing_eos_penalty", self.missing_eos_penalty.is_some())] {
                if set {
                    return err(key, "is a PPO key, not for rl = \"grpo\"".into());
                }
            }
            let gbs = self.generation_batch_size.unwrap_or(self.micro_batch_size * self.gradient_accumulation_steps);
            let g = self.num_generations.unwrap_or(8);
            if gbs % g != 0 {
                return err("generation_batch_size", format!("{gbs} completions per step do not split into groups of num_generations = {g}"));
            }
        } else {
            for (key, set) in [("num_generations", self.num_generations.is_some()), ("epsilon", self.epsilon.is_some()), ("epsilon_high", self.epsilon_high.is_some()), ("scale_rewards", self.scale_rewards.is_some()), ("num_iterations", self.num_iterations.is_some()), ("loss_type", self.loss_type.is_some()), ("beta", self.beta.is_some())] {
                if set {
                    return err(key, format!("is a GRPO key, not for rl = \"ppo\"{}", if key == "beta" { " (PPO's KL weight is kl_coef)" } else { "" }));
                }
            }
            if let Some(k) = self.kl_estimator.as_deref().filter(|k| *k != "k1" && *k != "k3") {
                return err("kl_estimator", format!("`{k}` is not k1 or k3"));
            }
            if self.adapter.kind == "none" {
                return err("adapter.kind", "PPO here needs an adapter: its reference policy is the base with the adapter off".into());
            }
        }
        Ok(())
    }

    /// The preference keys: a known `rl`, datasets of the matching format, loss types and weights
    /// that agree, and keys set only where they mean something.
    fn check_rl(&self, path: &Path) -> Result<()> {
        let err = |key: &str, msg: String| Err(Error::Config { path: path.into(), key: key.into(), msg });
        let Some(rl) = self.rl.as_deref() else {
            for (key, set) in [("beta", self.beta.is_some()), ("loss_type", self.loss_type.is_some()), ("loss_weights", self.loss_weights.is_some()), ("rpo_alpha", self.rpo_alpha.is_some())] {
                if set {
                    return err(key, "is a preference-training key: set `rl` (dpo, ipo, kto, orpo, simpo, reward) to use it".into());
                }
            }
            for (key, set) in [("rewards", !self.rewards.is_empty()), ("num_generations", self.num_generations.is_some()), ("max_new_tokens", self.max_new_tokens.is_some()), ("epsilon", self.epsilon.is_some()), ("kl_coef", self.kl_coef.is_some())] {
                if set {
                    return err(key, "is an RL key: set rl = \"grpo\" or \"ppo\" to use it".into());
                }
            }
            if let Some(d) = self.datasets.iter().find(|d| d.format == "prompt") {
                return err("rl", format!("{} has format `prompt`: set rl = \"grpo\" or \"ppo\" to train on it", d.path.display()));
            }
            if let Some(d) = self.datasets.iter().find(|d| d.format == "preference" || d.format == "kto") {
                return err("rl", format!("{} has format `{}`: set `rl` to train on it", d.path.display(), d.format));
            }
            return Ok(());
        };
        let want = match rl {
            "dpo" | "ipo" | "orpo" | "simpo" | "reward" => "preference",
            "kto" => "kto",
            "grpo" | "ppo" => "prompt",
            other => return err("rl", format!("`{other}` is not one of \"dpo\", \"ipo\", \"kto\", \"orpo\", \"simpo\", \"reward\", \"grpo\", \"ppo\"")),
        };
        let rl_only: [(&str, bool); 21] = [
            ("num_generations", self.num_generations.is_some()),
            ("generation_batch_size", self.generation_batch_size.is_some()),
            ("max_new_tokens", self.max_new_tokens.is_some()),
            ("temperature", self.temperature.is_some()),
            ("top_p", self.top_p.is_some()),
            ("top_k", self.top_k.is_some()),
            ("stop_strings", !self.stop_strings.is_empty()),
            ("epsilon", self.epsilon.is_some()),
            ("epsilon_high", self.epsilon_high.is_some()),
            ("scale_rewards", self.scale_rewards.is_some()),
            ("num_iterations", self.num_iterations.is_some()),
            ("mask_truncated_completions", self.mask_truncated_completions),
            ("skip_zero_advantage", self.skip_zero_advantage.is_some()),
            ("kl_coef", self.kl_coef.is_some()),
            ("kl_estimator", self.kl_estimator.is_some()),
            ("num_ppo_epochs", self.num_ppo_epochs.is_some()),
            ("num_mini_batches", self.num_mini_batches.is_some()),
            ("cliprange", self.cliprange.is_some()),
            ("cliprange_value", self.cliprange_value.is_some()),
            ("vf_coef", self.vf_coef.is_some()),
            ("rewards", !self.rewards.is_empty()),
        ];
        if want != "prompt" {
            if let Some((key, _)) = rl_only.iter().find(|(_, set)| *set) {
                return err(key, format!("is an RL key (rl = \"grpo\" or \"ppo\"), not for rl = \"{rl}\""));
            }
        } else {
            return self.check_grpo_ppo(rl, path);
        }
        if let Some(d) = self.datasets.iter().chain(&self.test_datasets).find(|d| d.format != want) {
            return err("datasets.type", format!("rl = \"{rl}\" reads datasets of format \"{want}\", but {} is `{}`", d.path.display(), d.format));
        }
        if let Some(b) = self.beta.filter(|b| !(*b > 0.0 && b.is_finite())) {
            return err("beta", format!("{b} must be a positive number"));
        }
        if (self.loss_type.is_some() || self.loss_weights.is_some() || self.rpo_alpha.is_some()) && rl != "dpo" && rl != "ipo" {
            return err(if self.loss_type.is_some() { "loss_type" } else if self.loss_weights.is_some() { "loss_weights" } else { "rpo_alpha" }, format!("applies to rl = \"dpo\", not \"{rl}\""));
        }
        if let Some(types) = &self.loss_type {
            let types = types.to_vec();
            if types.is_empty() {
                return err("loss_type", "needs at least one loss type".into());
            }
            for t in &types {
                if t != "sft" && temper_runtime::loss::DpoLoss::parse(t).is_none() {
                    return err("loss_type", format!("`{t}` is not one of sigmoid, robust, hinge, ipo, sigmoid_norm, apo_zero, sft"));
                }
            }
            if let Some(w) = &self.loss_weights {
                if w.len() != types.len() {
                    return err("loss_weights", format!("{} weights for {} loss types", w.len(), types.len()));
                }
            }
        } else if self.loss_weights.is_some() {
            return err("loss_weights", "needs loss_type as a list".into());
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return err("label_smoothing", format!("{} is not in [0, 1)", self.label_smoothing));
        }
        if self.precompute_ref_log_probs && matches!(rl, "simpo" | "orpo" | "reward") {
            return err("precompute_ref_log_probs", format!("rl = \"{rl}\" uses no reference policy, so there is nothing to precompute"));
        }
        if rl == "kto" && self.micro_batch_size < 2 {
            return err("micro_batch_size", "KTO estimates its KL reference point from mismatched pairs inside a micro-batch: use micro_batch_size ≥ 2".into());
        }
        Ok(())
    }
}
