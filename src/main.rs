//! The `temper` command line: run, inspect and benchmark models without writing Rust.

use clap::{Args, Parser, Subcommand};

// mimalloc keeps freed pages for reuse; with glibc malloc the large per-step activation buffers were
// returned to the kernel and faulted back in every step (10% of a training step in perf). Counted, so
// `temper bench` can report the heap's live-bytes peak (`temper::heap`).
#[global_allocator]
static GLOBAL: temper::heap::Counting<mimalloc::MiMalloc> = temper::heap::Counting(mimalloc::MiMalloc);
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;
use temper::formats::safetensors::{self as st, SafetensorsFiles};
use temper::generate::{generate, GenerationConfig, Sampling};
use temper::adapters::{Adapter, AdapterHost, Dora, Lora};
use temper::models::{ForwardInput, Llama, LoadOptions};
use temper::quant::{Bnb4bitConfig, QuantType};
use temper::ModuleExt;
use temper::module::{Module, ParamRole};
use temper::tokenizer::Tokenizer;
use temper::{DType, Device, Error, Result, Tensor};

#[derive(Parser)]
#[command(name = "temper", version, about = "LLM post-training in Rust")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a forward (and optionally backward) pass on inputs from a safetensors file.
    Forward(ForwardArgs),
    /// Generate text or token ids from a prompt.
    Generate(GenerateArgs),
    /// Merge a PEFT adapter into its base model and save a full Hugging Face model folder.
    Merge(MergeArgs),
    /// Quantise a model's linear layers to bitsandbytes 4-bit and save a folder transformers loads.
    Quantize(QuantizeArgs),
    /// Supervised fine-tuning from a TOML config (see docs/config.md).
    Train(TrainArgs),
    /// Score completions or preference pairs with a reward model (a `…ForSequenceClassification`
    /// folder, e.g. what `temper train` with rl = "reward" writes).
    Reward(RewardArgs),
    /// Draw a run folder's loss.png (and rewards.png) again from its metrics.jsonl
    Plot(PlotArgs),
    /// Inspect training data as the model will see it.
    #[command(subcommand)]
    Data(DataCommand),
    /// Print a model's architecture, parameter count, dtypes and memory estimate.
    Inspect(InspectArgs),
    /// Measure tokens/s and peak memory of a training step or of generation (JSON).
    Bench(BenchArgs),
    /// Check the CUDA backend on this machine: the device, every kernel compiled for it, and each
    /// kernel's parity against the CPU backend on fresh random inputs (needs a GPU).
    GpuCheck(GpuCheckArgs),
}

#[derive(Args)]
struct GpuCheckArgs {
    /// Only the suites whose name contains this (gemm, elementwise, attention, nf4, ...).
    #[arg(long)]
    filter: Option<String>,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
}

#[derive(Args)]
struct ForwardArgs {
    /// A Hugging Face model folder or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors), applied unmerged.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[command(flatten)]
    quant: QuantFlags,
    /// safetensors with input_ids (I64 [B,T]), optional attention_mask and labels.
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write logits, loss and gradients (safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Comma-separated parameter names whose gradients to write as grad.NAME (needs labels).
    #[arg(long, value_delimiter = ',')]
    grads: Vec<String>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct GenerateArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[command(flatten)]
    quant: QuantFlags,
    /// Prompt text.
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Greedy decoding (the default unless a temperature is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
    greedy: bool,
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop once the continuation contains this string (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Print {"token_ids": [...], "text": "..."}.
    #[arg(long)]
    json: bool,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn plot(a: PlotArgs) -> Result<()> {
    for p in temper_runtime::monitor::Monitor::replot(&a.output_dir)? {
        println!("wrote {}", p.display());
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
struct PlotArgs {
    /// A run's output_dir (holding metrics.jsonl)
    output_dir: PathBuf,
}

#[derive(Args)]
struct RewardArgs {
    /// The reward model: a Hugging Face folder with a `score` head (LlamaForSequenceClassification).
    model: PathBuf,
    /// JSONL/JSON/Parquet of preference pairs (`prompt`, `chosen`, `rejected`) or of completions
    /// (`prompt`, `completion`), strings or conversations.
    #[arg(long)]
    dataset: PathBuf,
    /// Tokenizer folder (default: the model's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// One JSON object per record, then a summary object.
    #[arg(long)]
    json: bool,
    /// Sequences per forward.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 2048)]
    max_length: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct InspectArgs {
    model: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// train (full fine-tune step, CPU, f32, the tools/bench_torch.py comparison), lora-sft (LoRA
    /// training steps), dpo (LoRA DPO steps; --batch pairs, the tools/bench_dpo_compare.sh comparison), qlora-sft (the same over a quantised base), full-sft (every weight trained;
    /// --device, --bf16), weight-bytes (bytes of the weights in one --quant format), generate
    /// (greedy; --batch rows), attention (causal forward + backward at --batch × --seq with the
    /// shape's heads), gemm (a square bf16/f32 matmul of side --seq: the GEMM ceiling), max-seq (the
    /// longest batch-1 sequence a LoRA step fits in device memory, up to --limit) or model (the
    /// FLOP/byte model of one step of the shape on a card: no device needed).
    #[arg(long, default_value = "train")]
    workload: String,
    /// tiny, small (hidden 256, 4 layers, batch 4 × 256), smollm2 (SmolLM2-135M's shape) or
    /// llama-1b (hidden 2048, 16 layers, 32/8 heads, vocabulary 32000: 0.85 B parameters).
    #[arg(long, default_value = "small")]
    shape: String,
    #[arg(long, default_value_t = 3)]
    steps: usize,
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// grpo: completions per prompt.
    #[arg(long, default_value_t = 4)]
    num_generations: usize,
    /// Micro-batch size (lora-sft, qlora-sft, full-sft, attention), or prompts (generate, grpo).
    #[arg(long)]
    batch: Option<usize>,
    /// Sequence length (lora-sft, qlora-sft, full-sft, attention, model; default per shape), the
    /// first probe (max-seq) or the matrix side (gemm, default 8192).
    #[arg(long)]
    seq: Option<usize>,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// lora-sft, qlora-sft, weight-bytes: how the base's linear layers are held: f32, bf16, nf4,
    /// nf4-dq, fp4, fp4-dq (bitsandbytes, blocks of 64, -dq: double quant) or gguf (a GGUF file's
    /// own blocks). Default: f32 for lora-sft, nf4-dq otherwise.
    #[arg(long)]
    quant: Option<String>,
    /// lora-sft, qlora-sft, weight-bytes: a model (Hugging Face folder or .gguf) instead of the
    /// shape's random-init one; --shape then only sets the default batch and length.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where to run: cpu, cuda or cuda:N (train and weight-bytes are CPU only).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weights, adapters and activations in bf16 (AdamW keeps f32 masters); needs --device cuda.
    #[arg(long)]
    bf16: bool,
    /// Replace the shape's number of decoder layers (a layer's cost is the difference of two runs).
    #[arg(long)]
    layers: Option<usize>,
    /// Training workloads: gradient checkpointing (recompute each layer in the backward).
    #[arg(long)]
    checkpoint: bool,
    /// attention, gemm: timed repetitions.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// max-seq: the longest sequence to try.
    #[arg(long, default_value_t = 65536)]
    limit: usize,
    /// model: the card's dense bf16 peak in TFLOP/s (default: H100 SXM's 989; give the measured
    /// `gemm` ceiling to predict against what the card really reaches).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// model: the card's memory bandwidth in GB/s (default: H100 SXM's 3350).
    #[arg(long)]
    bandwidth_gbs: Option<f64>,
}

/// mimalloc's `mi_option_purge_delay`: position 15 of `mi_option_e` in both bundled headers (v2, v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[derive(clap::Args)]
struct TrainArgs {
    /// The config file.
    config: PathBuf,
    /// Continue from the last checkpoint in output_dir.
    #[arg(long)]
    resume: bool,
    /// Progress display: auto (a bar on a terminal, lines otherwise), bar, lines, off.
    #[arg(long, default_value = "auto")]
    progress: String,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Print examples as the model sees them, masked (untrained) tokens marked.
    Preview {
        config: PathBuf,
        /// How many examples.
        #[arg(long, default_value_t = 3)]
        n: usize,
        /// One JSON object per line: {"text", "input_ids", "labels"} (-100 where masked).
        #[arg(long)]
        json: bool,
    },
}

fn train(a: TrainArgs) -> Result<()> {
    use temper::monitor::Progress;
    let progress = match a.progress.as_str() {
        "auto" => Progress::Auto,
        "bar" => Progress::Bar,
        "lines" => Progress::Lines,
        "off" => Progress::Off,
        other => return Err(Error::Input(format!("--progress `{other}`: expected auto, bar, lines or off"))),
    };
    let s = temper::sft::train(&a.config, a.resume, progress)?;
    let last = s.losses.last().copied().unwrap_or(f64::NAN);
    match s.last_eval {
        Some(m) => {
            let shown: Vec<String> = m.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
            eprintln!("done: {} steps, last loss {last:.4}; eval: {}", s.steps, shown.join(", "))
        }
        None => eprintln!("done: {} steps, last loss {last:.4}", s.steps),
    }
    Ok(())
}

/// bitsandbytes 4-bit parameters (defaults as QLoRA recipes use them).
#[derive(Args, Clone, Debug)]
struct BnbFlags {
    /// 4-bit code table: nf4 or fp4.
    #[arg(long, default_value = "nf4")]
    quant_type: String,
    /// Values per absmax block (32, 64, 128, … 4096).
    #[arg(long, default_value_t = 64)]
    blocksize: usize,
    /// Keep the block scales in f32 instead of double-quantising them.
    #[arg(long)]
    no_double_quant: bool,
}

impl BnbFlags {
    fn config(&self) -> Result<Bnb4bitConfig> {
        temper::quant::blockwise::check_blocksize(self.blocksize)?;
        Ok(Bnb4bitConfig { quant_type: QuantType::parse(&self.quant_type)?, blocksize: self.blocksize, double_quant: !self.no_double_quant })
    }
}

/// How the base model's linear layers are held (QLoRA's frozen quantised base).
#[derive(Args, Clone, Debug)]
struct QuantFlags {
    /// Quantise the decoder's linear layers to bitsandbytes 4-bit as the model loads.
    #[arg(long)]
    load_in_4bit: bool,
    #[command(flatten)]
    bnb: BnbFlags,
    /// Keep a GGUF model's Q4_0/Q4_1/Q8_0 linear weights as their blocks.
    #[arg(long)]
    gguf_keep_quantized: bool,
}

impl QuantFlags {
    fn options(&self) -> Result<LoadOptions> {
        Ok(LoadOptions { dtype: DType::F32, quantize: if self.load_in_4bit { Some(self.bnb.config()?) } else { None }, keep_gguf_quantized: self.gguf_keep_quantized })
    }
}

#[derive(Args)]
struct QuantizeArgs {
    /// A Hugging Face model folder (or a .gguf file).
    model: PathBuf,
    /// Output folder: config.json with quantization_config, model.safetensors, tokenizer files.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    bnb: BnbFlags,
}

#[derive(Args)]
struct MergeArgs {
    /// Base model: a Hugging Face folder or a .gguf file.
    #[arg(required_unless_present = "model_flag")]
    base: Option<PathBuf>,
    /// The adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(required_unless_present = "adapter_flag")]
    adapter_dir: Option<PathBuf>,
    /// The base model, as a flag.
    #[arg(long = "model", id = "model_flag", conflicts_with = "base")]
    model: Option<PathBuf>,
    /// The adapter folder, as a flag.
    #[arg(long = "adapter", id = "adapter_flag", conflicts_with = "adapter_dir")]
    adapter: Option<PathBuf>,
    /// Output folder: config.json, model.safetensors, and the base folder's tokenizer files.
    #[arg(long)]
    out: PathBuf,
    /// The unquantised base, when BASE is a pre-quantised checkpoint: the merge then reports how far
    /// merging into dequant(W4) lands from merging into these weights.
    #[arg(long)]
    original: Option<PathBuf>,
    #[command(flatten)]
    quant: QuantFlags,
}

/// Merges the adapter at `adapter` into the base loaded with `opts`; a quantised base gives a dense
/// model of its dequantised weights (adapted or not). Also returns how many layers were quantised.
fn merged(model: &Path, adapter: &Path, opts: &LoadOptions) -> Result<(Llama, usize)> {
    let (m, quantised) = match load_model(model, &Some(adapter.to_path_buf()), opts)? {
        Loaded::Base(_) => return Err(Error::format(adapter, "not an adapter folder")),
        Loaded::Lora(m) => {
            let q = quantised_layers(&m);
            (m.merge_and_unload()?, q)
        }
        Loaded::Dora(m) => {
            let q = quantised_layers(&m);
            (m.merge_and_unload()?, q)
        }
    };
    // Layers without the adapter are written as dequant(W4) too: the whole model as trained.
    let mut m = m;
    m.dequantize_linears()?;
    Ok((m, quantised))
}

fn quantised_layers<A: Adapter>(m: &Llama<A>) -> usize {
    let mut n = 0;
    temper::adapters::host::each_linear_ref::<A, _>(m, |_, l| n += l.weight.as_quantized().is_some() as usize).ok();
    n
}

/// How the base was quantised during training (`temper train` writes this beside the adapter).
fn training_quantization(adapter: &Path) -> Result<Option<LoadOptions>> {
    let p = adapter.join(temper::sft::QUANT_SIDECAR);
    if !p.exists() {
        return Ok(None);
    }
    temper::sft::read_quant_sidecar(&p).map(Some)
}

fn merge(a: MergeArgs) -> Result<()> {
    let missing = || Error::Input("give the base model and the adapter folder: temper merge BASE ADAPTER --out DIR".into());
    let model = a.base.clone().or(a.model.clone()).ok_or_else(missing)?;
    let adapter = a.adapter_dir.clone().or(a.adapter.clone()).ok_or_else(missing)?;
    let mut opts = a.quant.options()?;
    if opts.quantize.is_none() && !opts.keep_gguf_quantized {
        // A QLoRA adapter merges into the quantised base it was trained against.
        if let Some(t) = training_quantization(&adapter)? {
            opts = t;
        }
    }
    let (m, quantised) = merged(&model, &adapter, &opts)?;
    if quantised > 0 {
        eprintln!("merged into dequant(W4) of {quantised} quantised layers: the weights the adapter was trained against");
        // Against merging into the unquantised weights: the base itself when it was quantised on load.
        let original = a.original.clone().or_else(|| opts.quantize.is_some().then(|| model.clone()));
        if let Some(orig) = original {
            let (o, _) = merged(&orig, &adapter, &LoadOptions::dense(DType::F32))?;
            let r = temper::quant::compare_weights(&m.base_parameters(), &o.base_parameters())?;
            eprintln!(
                "vs merging into the original weights ({}): max |Δw| {:.3e}, relative ‖Δw‖ {:.3e} over {} tensors ({} differ)",
                orig.display(),
                r.max_abs,
                r.relative_norm,
                r.tensors,
                r.differing
            );
        }
    }
    m.save_pretrained(&a.out)?;
    copy_tokenizer_files(&model, &a.out)?;
    eprintln!("merged {} into {} and wrote {}", adapter.display(), model.display(), a.out.display());
    Ok(())
}

/// The merged or quantised folder should be usable on its own: bring the tokenizer and generation settings.
fn copy_tokenizer_files(model: &Path, out: &Path) -> Result<()> {
    if model.is_dir() {
        for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja"] {
            let src = model.join(f);
            if src.exists() {
                std::fs::copy(&src, out.join(f)).map_err(|e| Error::io(&src, e))?;
            }
        }
    }
    Ok(())
}

fn quantize(a: QuantizeArgs) -> Result<()> {
    let cfg = a.bnb.config()?;
    let m = Llama::load_with(&a.model, &LoadOptions { quantize: Some(cfg), ..LoadOptions::dense(DType::F32) })?;
    let (mut dense, mut packed, mut layers) = (0usize, 0usize, 0usize);
    temper::adapters::host::each_linear_ref::<temper::adapters::NoAdapter, _>(&m, |_, l| {
        if let Some(q) = l.weight.as_quantized() {
            layers += 1;
            dense += q.shape()[0] * q.shape()[1] * 4;
            packed += q.bytes();
        }
    })?;
    m.save_pretrained(&a.out)?;
    copy_tokenizer_files(&a.model, &a.out)?;
    eprintln!(
        "quantised {layers} linear layers to {} (blocksize {}{}): {:.1} MiB of f32 weights → {:.1} MiB; wrote {}",
        cfg.quant_type.as_str(),
        cfg.blocksize,
        if cfg.double_quant { ", double quant" } else { "" },
        dense as f64 / (1 << 20) as f64,
        packed as f64 / (1 << 20) as f64,
        a.out.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    // Never hand freed pages back to the kernel: a training step frees and reallocates the same
    // activation-sized buffers every step, and each purge made the kernel clear them again.
    // SAFETY: plain option setter of the allocator, called before any threads start.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n).build_global() {
            eprintln!("error: could not set {n} threads: {e}");
            return ExitCode::from(2);
        }
    }
    let r = match cli.command {
        Command::Forward(a) => forward(a),
        Command::Generate(a) => run_generate(a),
        Command::Merge(a) => merge(a),
        Command::Quantize(a) => quantize(a),
        Command::Train(a) => train(a),
        Command::Reward(a) => reward(a),
        Command::Plot(a) => plot(a),
        Command::Data(DataCommand::Preview { config, n, json }) => temper::sft::preview(&config, n, json).map(|lines| {
            for l in lines {
                println!("{l}");
            }
        }),
        Command::Inspect(a) => inspect(a),
        Command::Bench(a) => bench(a, cli.threads.unwrap_or_else(rayon::current_num_threads)),
        Command::GpuCheck(a) => gpu_check(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The model, with the adapter folder's type when one is given (PEFT LoRA or DoRA, unmerged).
enum Loaded {
    Base(Llama),
    Lora(Llama<Lora>),
    Dora(Llama<Dora>),
}

/// Runs `$body` with `$m` bound to whichever model was loaded (each arm is monomorphised).
macro_rules! with_loaded {
    ($loaded:expr, $m:ident => $body:expr) => {
        match $loaded {
            Loaded::Base($m) => $body,
            Loaded::Lora($m) => $body,
            Loaded::Dora($m) => $body,
        }
    };
}

fn load_model(model: &Path, adapter: &Option<PathBuf>, opts: &LoadOptions) -> Result<Loaded> {
    let m = Llama::load_with(model, opts)?;
    let Some(dir) = adapter else {
        return Ok(Loaded::Base(m));
    };
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::format(&cfg_path, format!("invalid JSON: {e}")))?;
    if v.get("peft_type").and_then(|t| t.as_str()) == Some("TEMPER") {
        let name = v.get("temper_adapter").and_then(|t| t.as_str()).unwrap_or("?");
        return Err(Error::Config { path: cfg_path, key: "temper_adapter".into(), msg: format!("`{name}` is a user-defined adapter: load it from the program that defines it") });
    }
    if v.get("use_dora").and_then(|t| t.as_bool()) == Some(true) {
        let mut m = m.into_adapter_type::<Dora>()?;
        m.load_adapter::<Dora>(dir, "default")?;
        Ok(Loaded::Dora(m))
    } else {
        let mut m = m.into_adapter_type::<Lora>()?;
        m.load_adapter::<Lora>(dir, "default")?;
        Ok(Loaded::Lora(m))
    }
}

fn forward(a: ForwardArgs) -> Result<()> {
    let device = Device::parse(&a.device)?;
    with_loaded!(load_model(&a.model, &a.adapter, &a.quant.options()?)?, m => {
        let mut m = m;
        m.to_device(device)?;
        forward_with(m, &a)
    })
}

/// The name `--grads` uses for a parameter: its PEFT key for adapter tensors, its HF name otherwise.
fn grad_name(name: &str, role: ParamRole<'_>) -> String {
    match role {
        ParamRole::Base | ParamRole::Quantized { .. } => name.to_string(),
        ParamRole::Adapter { module, key, .. } => temper::adapters::host::peft_key(module, key),
    }
}

fn forward_with<A: Adapter>(mut model: Llama<A>, a: &ForwardArgs) -> Result<()> {
    let files = SafetensorsFiles::open_files(std::slice::from_ref(&a.inputs))?;
    let load_i64 = |name: &str| -> Result<Option<Tensor>> {
        if !files.contains(name) {
            return Ok(None);
        }
        let t = files.load(name)?;
        if t.dtype() != DType::I64 || t.rank() != 2 {
            return Err(Error::BadTensor { name: name.into(), msg: format!("in {}: expected I64 [batch, seq], got {} {:?}", a.inputs.display(), t.dtype(), t.shape()) });
        }
        Ok(Some(t))
    };
    let input_ids = load_i64("input_ids")?.ok_or_else(|| Error::MissingTensor { path: a.inputs.clone(), name: "input_ids".into() })?;
    let attention_mask = load_i64("attention_mask")?;
    let labels = load_i64("labels")?;
    for (name, t) in [("attention_mask", &attention_mask), ("labels", &labels)] {
        if let Some(t) = t {
            if t.shape() != input_ids.shape() {
                return Err(Error::BadTensor { name: name.into(), msg: format!("in {}: shape {:?} differs from input_ids {:?}", a.inputs.display(), t.shape(), input_ids.shape()) });
            }
        }
    }
    if !a.grads.is_empty() {
        if labels.is_none() {
            return Err(Error::Input(format!("--grads needs `labels` in {}", a.inputs.display())));
        }
        // With an adapter, gradients are of the adapter's tensors (named by their PEFT keys).
        let mut known = Vec::new();
        model.visit("", &mut |n, _, role| {
            if a.adapter.is_none() || role != ParamRole::Base {
                known.push(grad_name(n, role))
            }
        });
        let where_ = if a.adapter.is_some() { "adapter" } else { "model" };
        for g in &a.grads {
            if !known.contains(g) {
                return Err(Error::Input(format!("--grads: the {where_} has no parameter `{g}` (e.g. {})", known.first().map(String::as_str).unwrap_or("?"))));
            }
        }
        model.visit_mut("", &mut |n, t, role| {
            *t = if a.grads.contains(&grad_name(n, role)) { t.detach().requires_grad() } else { t.detach() };
            Ok(())
        })?;
    }
    let input = ForwardInput { input_ids, attention_mask, position_ids: None, segment_ids: None };
    let logits = model.forward(&input)?;
    let mut out = vec![("logits".to_string(), logits.detach())];
    if let Some(labels) = &labels {
        let loss = Llama::loss(&logits, labels)?;
        out.push(("loss".to_string(), loss.detach()));
        if !a.grads.is_empty() {
            let grads = loss.backward()?;
            let mut trainable = Vec::new();
            model.visit("", &mut |n, t, role| {
                if t.requires_grad_flag() {
                    trainable.push((grad_name(n, role), t.clone()))
                }
            });
            for (name, p) in trainable {
                let g = grads.get(&p).ok_or_else(|| Error::Input(format!("parameter `{name}` received no gradient")))?;
                out.push((format!("grad.{name}"), g.clone()));
            }
        }
    }
    st::save(&a.out, &out, None)?;
    eprintln!("wrote {} tensors to {}", out.len(), a.out.display());
    Ok(())
}

fn load_tokenizer(model: &Path) -> Result<Tokenizer> {
    if model.is_dir() {
        Tokenizer::from_hf_dir(model)
    } else {
        Tokenizer::from_gguf(&temper::formats::gguf::GgufFile::open(model)?)
    }
}

fn reward(a: RewardArgs) -> Result<()> {
    use temper::data::preference::{load_completions, load_pairs};
    use temper::data::{DatasetSpec, Format, TokenizeOptions, TooLong};
    let device = Device::parse(&a.device)?;
    let mut model = Llama::load(&a.model, DType::F32)?;
    if model.score.is_none() {
        return Err(Error::Input(format!("{}: not a reward model (config.json's architectures is not …ForSequenceClassification, no score.weight)", a.model.display())));
    }
    model.to_device(device)?;
    let tok = Tokenizer::from_hf_dir(a.tokenizer.as_deref().unwrap_or(&a.model))?;
    let mut opts = TokenizeOptions::new(a.max_length);
    opts.too_long = TooLong::Truncate;
    let pad = model.config.pad_token_id.or(tok.pad_token_id).unwrap_or(0);
    let paired = temper::data::preference::is_pair_file(&a.dataset)?;
    let scores = |seqs: &[&temper::data::preference::Sequence]| -> Result<Vec<f64>> {
        let mut out = Vec::with_capacity(seqs.len());
        for chunk in seqs.chunks(a.batch.max(1)) {
            let sb = temper::data::preference::seq_batch(chunk, pad, true)?;
            let r = temper::autograd::no_grad(|| temper::train::preference::sequence_rewards(&model, &sb, temper::models::Mode { adapters: true, training: false }))?;
            out.extend(r.to_f64_vec()?);
        }
        Ok(out)
    };
    if paired {
        let (pairs, report) = load_pairs(&DatasetSpec::new(&a.dataset, Format::Preference), &tok, &opts)?;
        eprintln!("{}: {report}", a.dataset.display());
        let seqs: Vec<_> = pairs.iter().flat_map(|p| [&p.chosen, &p.rejected]).collect();
        let r = scores(&seqs)?;
        let (mut correct, mut margin) = (0usize, 0.0);
        for (i, p) in pairs.iter().enumerate() {
            let (c, rj) = (r[2 * i], r[2 * i + 1]);
            correct += usize::from(c > rj);
            margin += c - rj;
            if a.json {
                println!("{}", serde_json::json!({"source": p.source, "chosen": c, "rejected": rj, "margin": c - rj, "correct": c > rj}));
            }
        }
        let n = pairs.len().max(1) as f64;
        let summary = serde_json::json!({"pairs": pairs.len(), "accuracy": correct as f64 / n, "mean_margin": margin / n});
        if a.json {
            println!("{summary}");
        } else {
            println!("{} pairs: accuracy {:.4} (chosen scored above rejected), mean margin {:.4}", pairs.len(), correct as f64 / n, margin / n);
        }
    } else {
        let (items, report) = load_completions(&DatasetSpec::new(&a.dataset, Format::Kto), &tok, &opts)?;
        eprintln!("{}: {report}", a.dataset.display());
        let r = scores(&items.iter().map(|(_, s)| s).collect::<Vec<_>>())?;
        for ((src, _), v) in items.iter().zip(&r) {
            if a.json {
                println!("{}", serde_json::json!({"source": src, "reward": v}));
            } else {
                println!("{src}\t{v:.6}");
            }
        }
        let mean = r.iter().sum::<f64>() / r.len().max(1) as f64;
        if a.json {
            println!("{}", serde_json::json!({"completions": r.len(), "mean_reward": mean}));
        } else {
            println!("{} completions: mean reward {mean:.4}", r.len());
        }
    }
    Ok(())
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    let device = Device::parse(&a.device)?;
    with_loaded!(load_model(&a.model, &a.adapter, &a.quant.options()?)?, m => {
        let mut m = m;
        m.to_device(device)?;
        generate_with(&m, &a)
    })
}

fn generate_with<A: Adapter>(model: &Llama<A>, a: &GenerateArgs) -> Result<()> {
    // Prompt ids alone need no tokenizer; text output and stop strings do when one exists.
    let tokenizer = match load_tokenizer(&a.model) {
        Ok(t) => Some(t),
        Err(e) if a.prompt.is_some() || !a.stop.is_empty() => return Err(e),
        Err(_) => None,
    };
    let tk = || tokenizer.as_ref().ok_or_else(|| Error::Input(format!("{}: no tokenizer found (tokenizer.json or GGUF vocabulary)", a.model.display())));
    let prompt_ids: Vec<u32> = match (&a.prompt, &a.prompt_ids) {
        (Some(text), None) => {
            let t = tk()?;
            if a.chat {
                let template = t.chat_template.as_deref().ok_or_else(|| Error::Input(format!("{}: --chat but the model has no chat template", a.model.display())))?;
                let msgs = [temper::chat_template::ChatMessage { role: "user".into(), content: text.clone() }];
                let rendered = temper::chat_template::render_chat(template, &msgs, true, t.bos_token.as_deref(), t.eos_token.as_deref())?;
                t.encode(&rendered, false)?
            } else {
                t.encode(text, true)?
            }
        }
        (None, Some(ids)) => {
            if a.chat {
                return Err(Error::Input("--chat needs --prompt text, not --prompt-ids".into()));
            }
            ids.clone()
        }
        _ => return Err(Error::Input("give exactly one of --prompt or --prompt-ids".into())),
    };
    let mut eos = model.config.eos_token_ids.clone();
    if let Some(t) = &tokenizer {
        eos.extend(t.eos_token_ids.iter().copied());
    }
    let sampling = match (a.greedy, a.temperature) {
        (false, Some(temperature)) => Sampling::Sample { temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed },
        (_, None) if a.top_k.is_some() || a.top_p.is_some() => Sampling::Sample { temperature: 1.0, top_k: a.top_k, top_p: a.top_p, seed: a.seed },
        _ => Sampling::Greedy,
    };
    let cfg = GenerationConfig {
        max_new_tokens: a.max_new_tokens,
        sampling,
        eos_token_ids: eos,
        stop_strings: a.stop.clone(),
        pad_token_id: model.config.pad_token_id.unwrap_or(0),
    };
    let start = Instant::now();
    let out = generate(model, &[prompt_ids], &cfg, tokenizer.as_ref())?;
    let secs = start.elapsed().as_secs_f64();
    let ids = &out.tokens[0];
    let text = match &tokenizer {
        Some(t) => t.decode(ids, true)?,
        None => String::new(),
    };
    if a.json {
        println!("{}", serde_json::json!({ "token_ids": ids, "text": text }));
    } else {
        println!("{text}");
        eprintln!("[{} prompt + {} new tokens in {secs:.2}s, {:.1} tokens/s, stop: {:?}]", out.prompt_tokens, ids.len(), ids.len() as f64 / secs, out.finish[0]);
    }
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    let (config, dtypes) = if a.model.is_dir() {
        let config = temper::formats::hf_config::ModelConfig::from_file(&a.model.join("config.json"))?;
        let files = SafetensorsFiles::open_dir(&a.model)?;
        let mut dtypes = std::collections::BTreeMap::new();
        for n in files.names() {
            *dtypes.entry(files.info(n)?.1.to_string()).or_insert(0usize) += 1;
        }
        (config, dtypes)
    } else {
        let g = temper::formats::gguf::GgufFile::open(&a.model)?;
        let config = temper::models::llama::gguf_config(&g)?;
        let mut dtypes = std::collections::BTreeMap::new();
        for t in g.tensors() {
            *dtypes.entry(t.ggml_type.name()).or_insert(0usize) += 1;
        }
        (config, dtypes)
    };
    let n = config.parameter_count() as f64;
    let gib = |bytes: f64| bytes / (1u64 << 30) as f64;
    // Full fine-tune with AdamW: f32 weights + f32 grads + two f32 moments = 16 bytes/parameter.
    let est = serde_json::json!({
        "architecture": config.architecture.class_name(),
        "parameters": config.parameter_count(),
        "hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads, "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size,
        "tied_embeddings": config.tie_word_embeddings,
        "stored_dtypes": dtypes,
        "memory_gib": { "weights_f32": gib(4.0 * n), "weights_bf16": gib(2.0 * n), "full_finetune_adamw_f32": gib(16.0 * n) },
    });
    if a.json {
        println!("{est}");
    } else {
        println!("{}: {}", a.model.display(), config.architecture.class_name());
        println!("  parameters      {:.1} M", n / 1e6);
        println!("  layers          {} × (hidden {}, heads {}/{} kv, head_dim {}, intermediate {})", config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.intermediate_size);
        println!("  vocabulary      {}{}", config.vocab_size, if config.tie_word_embeddings { " (tied embeddings)" } else { "" });
        println!("  stored dtypes   {}", dtypes.iter().map(|(k, v)| format!("{k}×{v}")).collect::<Vec<_>>().join(", "));
        println!("  memory          weights f32 {:.2} GiB, bf16 {:.2} GiB; full fine-tune with AdamW ≈ {:.2} GiB + activations", gib(4.0 * n), gib(2.0 * n), gib(16.0 * n));
    }
    Ok(())
}

fn bench(a: BenchArgs, threads: usize) -> Result<()> {
    use temper::bench::{self as b, BaseFormat};
    let shape = b::shape_with_layers(&a.shape, a.layers)?;
    let model = a.model.as_deref();
    let model_name = model.map(|p| p.display().to_string());
    let base = |default: &str| BaseFormat::parse(a.quant.as_deref().unwrap_or(default));
    let rss_mb = || b::peak_rss_bytes() as f64 / (1024.0 * 1024.0);
    let device = Device::parse(&a.device)?;
    let place = b::Placement { device, bf16: a.bf16, checkpoint: a.checkpoint };
    place.check()?;
    if device.is_cuda() && matches!(a.workload.as_str(), "train" | "weight-bytes") {
        return Err(Error::Input(format!("--workload {} runs on the CPU only; full-sft is the training step on a GPU", a.workload)));
    }
    let json = match a.workload.as_str() {
        "lora-sft" | "qlora-sft" => {
            let format = base(if a.workload == "qlora-sft" { "nf4-dq" } else { "f32" })?;
            if a.workload == "qlora-sft" && !format.is_quantized() {
                return Err(Error::Input(format!("qlora-sft needs a quantised base (--quant nf4, nf4-dq, fp4, fp4-dq or gguf), not {}; lora-sft trains over a dense one", format.name())));
            }
            let (batch, seq) = (a.batch.unwrap_or(shape.batch), a.seq.unwrap_or(shape.seq));
            let t = b::lora_sft(b::base_model(&shape, model, format)?, place, a.steps, batch, seq, a.rank)?;
            let mut j = timing_json(&a, &shape, &format.name(), threads, batch, seq, &t);
            j["model"] = serde_json::json!(model_name);
            // The CPU comparison (tools/bench_sft_compare.sh) reads these two.
            j["cpu_ms_per_step"] = serde_json::json!(t.cpu_ms);
            j["peak_rss_mb"] = serde_json::json!(rss_mb());
            j
        }
        "weight-bytes" => {
            let format = base("nf4-dq")?;
            let start = Instant::now();
            let m = b::base_model(&shape, model, format)?;
            let build_s = start.elapsed().as_secs_f64();
            let w = b::weight_bytes(&m)?;
            serde_json::json!({
                "impl": "temper", "workload": "weight-bytes", "shape": shape.name, "model": model_name, "base": format.name(),
                "linears": w.linears, "linear_values": w.linear_values, "linear_stored_bytes": w.linear_stored,
                "linear_resident_bytes": w.linear_resident, "other_bytes": w.other, "total_stored_bytes": w.total_stored(),
                "total_resident_bytes": w.total_resident(), "linear_bits_per_value": 8.0 * w.linear_stored as f64 / w.linear_values.max(1) as f64,
                "build_s": build_s, "peak_rss_mb": rss_mb(),
            })
        }
        "train" | "generate" | "full-sft" | "attention" | "gemm" if a.quant.is_some() || model.is_some() => {
            return Err(Error::Input(format!("--quant and --model apply to lora-sft, qlora-sft, max-seq and weight-bytes, not {}", a.workload)));
        }
        "train" => {
            let tps = b::train(&shape, a.steps)?;
            serde_json::json!({
                "impl": "temper", "workload": a.workload, "shape": shape.name, "threads": threads,
                "tokens_per_s": tps, "peak_rss_bytes": b::peak_rss_bytes(), "steps": a.steps,
            })
        }
        "generate" => {
            let batch = a.batch.unwrap_or(1);
            let tps = b::generation(&shape, place, batch, a.new_tokens)?;
            serde_json::json!({
                "impl": "temper", "workload": a.workload, "shape": shape.name, "threads": threads, "device": a.device, "bf16": a.bf16,
                "batch": batch, "new_tokens": a.new_tokens, "tokens_per_s": tps, "peak_rss_bytes": b::peak_rss_bytes(),
                "peak_allocated_bytes": b::peak(device)?.allocated, "steps": a.new_tokens,
            })
        }
        "dpo" => {
            let (batch, seq) = (a.batch.unwrap_or((shape.batch / 2).max(1)), a.seq.unwrap_or(shape.seq));
            let t = b::dpo(b::base_model(&shape, model, base("f32")?)?, place, a.steps, batch, seq, a.rank)?;
            let mut j = timing_json(&a, &shape, "f32", threads, batch, seq, &t);
            // tools/bench_dpo_compare.sh reads these two; batch is pairs, tokens/s counts both sides.
            j["cpu_ms_per_step"] = serde_json::json!(t.cpu_ms);
            j["peak_rss_mb"] = serde_json::json!(rss_mb());
            j
        }
        "grpo" => {
            let (batch, seq) = (a.batch.unwrap_or(4), a.seq.unwrap_or(32));
            let t = b::grpo(b::base_model(&shape, model, base("f32")?)?, place, a.steps, batch, seq, a.num_generations, a.new_tokens, a.rank)?;
            // tools/bench_grpo_compare.sh reads these.
            serde_json::json!({
                "impl": "temper", "workload": "grpo", "shape": shape.name, "device": a.device, "threads": threads,
                "batch": batch, "seq": seq, "num_generations": a.num_generations, "new_tokens": a.new_tokens, "rank": a.rank, "steps": a.steps,
                "step_ms": t.step_ms, "rollout_ms": t.rollout_ms, "update_ms": t.step_ms - t.rollout_ms,
                "rollout_tokens_per_s": t.rollout_tokens_per_s, "tokens_per_s": t.tokens_per_s,
                "peak_rss_bytes": b::peak_rss_bytes(), "peak_rss_mb": rss_mb(), "final_loss": t.final_loss,
            })
        }
        "full-sft" => {
            let (batch, seq) = (a.batch.unwrap_or(shape.batch), a.seq.unwrap_or(shape.seq));
            let t = b::full_sft(&shape, place, a.steps, batch, seq)?;
            timing_json(&a, &shape, "full", threads, batch, seq, &t)
        }
        "attention" => {
            let c = &shape.config;
            let seq = a.seq.unwrap_or(shape.seq);
            let batch = a.batch.unwrap_or((8192 / seq).max(1));
            let t = b::attention(place, batch, seq, c.num_attention_heads, c.num_key_value_heads, c.head_dim, a.iters)?;
            serde_json::json!({
                "impl": "temper", "workload": "attention", "shape": shape.name, "device": a.device, "bf16": a.bf16,
                "batch": batch, "seq": seq, "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads, "head_dim": c.head_dim,
                "causal": true, "fwd_ms": t.fwd_ms, "bwd_ms": t.bwd_ms, "fwd_tflops": t.fwd_tflops, "fwd_bwd_tflops": t.fwd_bwd_tflops,
            })
        }
        "gemm" => {
            let n = a.seq.unwrap_or(8192);
            let tflops = b::gemm_tflops(place, n, a.iters)?;
            serde_json::json!({ "impl": "temper", "workload": "gemm", "device": a.device, "bf16": a.bf16, "n": n, "tflops": tflops })
        }
        "max-seq" => {
            let format = base(if a.bf16 { "bf16" } else { "f32" })?;
            let start = a.seq.unwrap_or(shape.seq);
            let (fits, fails) = b::max_seq(b::base_model(&shape, model, format)?, place, a.rank, start, a.limit, 256)?;
            serde_json::json!({
                "impl": "temper", "workload": "max-seq", "shape": shape.name, "base": format.name(), "device": a.device, "bf16": a.bf16,
                "rank": a.rank, "limit": a.limit, "max_seq": fits, "first_failed_seq": fails,
            })
        }
        "model" => {
            let seq = a.seq.unwrap_or(shape.seq);
            let batch = a.batch.unwrap_or(shape.batch);
            let h100 = temper::perf_model::Card::H100_SXM;
            let card = temper::perf_model::Card { peak_tflops: a.peak_tflops.unwrap_or(h100.peak_tflops), bandwidth_gbs: a.bandwidth_gbs.unwrap_or(h100.bandwidth_gbs) };
            let m = temper::perf_model::StepModel::new(&shape.config, batch, seq, a.rank);
            print!("{}", m.report(&card));
            return Ok(());
        }
        other => return Err(Error::Input(format!("unknown workload `{other}` (expected train, lora-sft, qlora-sft, full-sft, weight-bytes, generate, attention, gemm, max-seq or model)"))),
    };
    println!("{json}");
    Ok(())
}

/// The JSON line of a training benchmark on a device.
fn timing_json(a: &BenchArgs, shape: &temper::bench::Shape, base: &str, threads: usize, batch: usize, seq: usize, t: &temper::bench::TrainTiming) -> serde_json::Value {
    serde_json::json!({
        "impl": "temper", "workload": a.workload, "shape": shape.name, "base": base, "device": a.device, "bf16": a.bf16,
        "gradient_checkpointing": a.checkpoint, "threads": threads, "batch": batch, "seq": seq, "rank": a.rank, "steps": a.steps,
        "tokens_per_s": t.tokens_per_s, "step_ms": t.step_ms, "peak_allocated_bytes": t.peak.allocated,
        "peak_reserved_bytes": t.peak.reserved, "step_extra_bytes": t.step_extra, "launches_per_step": t.launches_per_step, "final_loss": t.final_loss,
    })
}

fn gpu_check(a: GpuCheckArgs) -> Result<()> {
    use temper_runtime::backend::cuda;
    let dev = cuda::CudaDevice::get(a.device)?;
    let (maj, min) = temper_kernels::nvrtc_version().map_err(Error::Unsupported)?;
    println!("device cuda:{} {} ({}), NVRTC {maj}.{min}", dev.ordinal, dev.name, dev.arch);
    println!("{:<14} {:>9} {:>8} {:>6}", "kernel file", "compile", "kernels", "max-regs");
    for src in temper_kernels::SOURCES {
        let t = std::time::Instant::now();
        let c = temper_kernels::compile(src, &dev.arch).map_err(Error::Unsupported)?;
        let res = c.resources();
        let spills: Vec<_> = res.iter().filter(|r| r.spill_stores + r.spill_loads > 0).map(|r| r.kernel.clone()).collect();
        println!(
            "{:<14} {:>7.0}ms {:>8} {:>6}{}",
            src.name,
            t.elapsed().as_secs_f64() * 1e3,
            res.len(),
            res.iter().map(|r| r.registers).max().unwrap_or(0),
            if res.is_empty() {
                "  (no ptxas report: NVRTC served this compile from its cache)".to_string()
            } else if spills.is_empty() {
                String::new()
            } else {
                format!("  SPILLS: {}", spills.join(", "))
            }
        );
    }
    let rows = cuda::parity::run_all(a.device, a.filter.as_deref(), a.seed)?;
    print!("{}", cuda::parity::table(&rows));
    let failed = rows.iter().filter(|r| !r.passed).count();
    if failed > 0 || rows.is_empty() {
        return Err(Error::Input(format!("{failed} of {} parity checks failed", rows.len())));
    }
    Ok(())
}
