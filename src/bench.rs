//! `temper bench`: throughput and peak memory of training steps (full, LoRA, QLoRA), attention,
//! the dense GEMM ceiling, the longest sequence that fits and greedy generation on a fixed shape,
//! on the CPU or a GPU, printed as JSON in the schema of the PyTorch baselines so they compare side
//! by side: `tools/bench_compare.sh` and `tools/bench_sft_compare.sh` (CPU), `tools/bench_qlora.sh`
//! (LoRA against QLoRA, weight bytes of each base format), `scripts/gpu-bench.sh` (GPU, against
//! PyTorch + PEFT in `tools/bench_gpu_torch.py`).

use std::path::Path;
use std::time::Instant;
use temper_runtime::adapters::host::each_linear_ref;
use temper_runtime::adapters::NoAdapter;
use temper_runtime::formats::hf_config::{Architecture, ModelConfig};
use temper_runtime::generate::{generate, GenerationConfig};
use temper_runtime::models::{ForwardInput, LinearWeight, Llama, LoadOptions};
use temper_runtime::module::ParamRole;
use temper_runtime::quant::{Bnb4bitConfig, QuantType};
use temper_runtime::{Module, ModuleExt};
use temper_runtime::ops::RopeScaling;
use temper_runtime::optim::AdamW;
use temper_runtime::{DType, Device, Error, Result, Tensor};

/// A named benchmark shape.
pub struct Shape {
    pub name: &'static str,
    pub config: ModelConfig,
    pub batch: usize,
    pub seq: usize,
}

#[allow(clippy::too_many_arguments)]
fn config(vocab: usize, hidden: usize, inter: usize, layers: usize, heads: usize, kv: usize, theta: f64, tied: bool) -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: hidden / heads,
        rms_norm_eps: 1e-5,
        rope_theta: theta,
        rope_scaling: RopeScaling::Default,
        max_position_embeddings: 8192,
        tie_word_embeddings: tied,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        qk_norm: false,
        layer_windows: vec![None; layers],
        bos_token_id: Some(1),
        eos_token_ids: vec![],
        pad_token_id: None,
        dtype: None,
        num_labels: None,
    }
}

/// [`shape`] with its layer count replaced (per-layer costs are the difference of two counts).
pub fn shape_with_layers(name: &str, layers: Option<usize>) -> Result<Shape> {
    let mut s = shape(name)?;
    if let Some(n) = layers {
        if n == 0 {
            return Err(Error::Input("--layers must be at least 1".into()));
        }
        s.config.num_hidden_layers = n;
        s.config.layer_windows = vec![None; n];
    }
    Ok(s)
}

/// The benchmark shapes: `tiny`, `small`, `smollm2` (SmolLM2-135M) and `llama-1b` (a ~1B Llama);
/// `tools/bench_torch.py` and `tools/bench_gpu_torch.py` know the same ones.
pub fn shape(name: &str) -> Result<Shape> {
    Ok(match name {
        "small" => Shape { name: "small", config: config(1000, 256, 688, 4, 8, 4, 10000.0, false), batch: 4, seq: 256 },
        "tiny" => Shape { name: "tiny", config: ModelConfig { head_dim: 16, ..config(512, 64, 128, 2, 4, 2, 10000.0, false) }, batch: 8, seq: 128 },
        "smollm2" => Shape { name: "smollm2", config: config(49152, 576, 1536, 30, 9, 3, 100000.0, true), batch: 1, seq: 256 },
        // A ~1B Llama (0.85 B parameters: hidden 2048, 16 layers, 32 heads, 8 KV heads): the GPU
        // benchmarks' model (scripts/gpu-bench.sh).
        "llama-1b" => Shape { name: "llama-1b", config: config(32000, 2048, 5632, 16, 32, 8, 10000.0, false), batch: 1, seq: 2048 },
        other => return Err(Error::Input(format!("unknown bench shape `{other}` (expected tiny, small, smollm2 or llama-1b)"))),
    })
}

/// How a benchmark holds the base model's decoder linear weights (`--quant`). Embeddings, norms
/// and an untied `lm_head` stay dense in every format, as in transformers' `load_in_4bit`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BaseFormat {
    /// Dense weights of this dtype (`f32`, `bf16`).
    Dense(DType),
    /// bitsandbytes 4-bit (`nf4`, `nf4-dq`, `fp4`, `fp4-dq`; blocks of 64, `-dq`: double quant).
    Bnb(Bnb4bitConfig),
    /// A GGUF file's own Q4_0/Q4_1/Q8_0 blocks (`gguf`; needs `--model FILE.gguf`).
    Gguf,
}

impl BaseFormat {
    /// Parses a `--quant` name.
    pub fn parse(name: &str) -> Result<BaseFormat> {
        let bnb = |quant_type, double_quant| BaseFormat::Bnb(Bnb4bitConfig { quant_type, blocksize: 64, double_quant });
        Ok(match name {
            "f32" | "none" => BaseFormat::Dense(DType::F32),
            "bf16" => BaseFormat::Dense(DType::BF16),
            "nf4" => bnb(QuantType::Nf4, false),
            "nf4-dq" => bnb(QuantType::Nf4, true),
            "fp4" => bnb(QuantType::Fp4, false),
            "fp4-dq" => bnb(QuantType::Fp4, true),
            "gguf" => BaseFormat::Gguf,
            other => return Err(Error::Input(format!("unknown --quant `{other}` (expected f32, bf16, nf4, nf4-dq, fp4, fp4-dq or gguf)"))),
        })
    }

    /// The `--quant` name of this format.
    pub fn name(&self) -> String {
        match self {
            BaseFormat::Dense(DType::F32) => "f32".into(),
            BaseFormat::Dense(DType::BF16) => "bf16".into(),
            BaseFormat::Dense(d) => d.to_string().to_lowercase(),
            BaseFormat::Bnb(c) => format!("{}{}", c.quant_type.as_str(), if c.double_quant { "-dq" } else { "" }),
            BaseFormat::Gguf => "gguf".into(),
        }
    }

    /// Whether the linear weights are quantised.
    pub fn is_quantized(&self) -> bool {
        !matches!(self, BaseFormat::Dense(_))
    }

    /// The options that load a model file in this format (compute stays f32 for quantised bases).
    fn load_options(&self) -> LoadOptions {
        match *self {
            BaseFormat::Dense(dtype) => LoadOptions { dtype, quantize: None, keep_gguf_quantized: false },
            BaseFormat::Bnb(cfg) => LoadOptions { dtype: DType::F32, quantize: Some(cfg), keep_gguf_quantized: false },
            BaseFormat::Gguf => LoadOptions { dtype: DType::F32, quantize: None, keep_gguf_quantized: true },
        }
    }
}

/// The base model of a benchmark: `model` (a Hugging Face folder or `.gguf`) loaded in `format`,
/// or, without one, the shape's random-init model (seed 0, std 0.02) in `format`.
pub fn base_model(shape: &Shape, model: Option<&Path>, format: BaseFormat) -> Result<Llama> {
    if let Some(path) = model {
        return Llama::load_with(path, &format.load_options());
    }
    if format == BaseFormat::Gguf {
        return Err(Error::Input("--quant gguf keeps a GGUF file's own blocks: give --model FILE.gguf".into()));
    }
    // Each linear is quantised as it is drawn: a quantised model never holds its dense weights at once.
    Llama::random_with(shape.config.clone(), 0.02, 0, &format.load_options())
}

/// Bytes a model's weights occupy, split into the decoder's linear layers and everything else.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WeightBytes {
    /// Linear layers.
    pub linears: usize,
    /// Weight values those layers stand for (out × in, summed).
    pub linear_values: usize,
    /// The linear layers' bytes as a checkpoint stores them (packed codes + scales + quant state,
    /// or GGUF blocks; dense: values × dtype size), biases included.
    pub linear_stored: usize,
    /// What the linear layers hold in memory: the stored bytes plus, for double-quantised
    /// bitsandbytes weights, the block scales decoded to f32 at load (4 bytes per block).
    pub linear_resident: usize,
    /// Every other weight (embeddings, norms, an untied `lm_head`), all dense.
    pub other: usize,
}

impl WeightBytes {
    /// Stored bytes of the whole model.
    pub fn total_stored(&self) -> usize {
        self.linear_stored + self.other
    }

    /// Resident bytes of the whole model.
    pub fn total_resident(&self) -> usize {
        self.linear_resident + self.other
    }
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// Counts the weight bytes of `model` (see [`WeightBytes`]).
pub fn weight_bytes(model: &Llama) -> Result<WeightBytes> {
    let mut wb = WeightBytes::default();
    let mut linear_names = std::collections::HashSet::new();
    each_linear_ref::<NoAdapter, _>(model, |name, l| {
        let [out, inp] = l.weight.shape();
        let bias = l.bias.as_ref().map_or(0, tensor_bytes);
        let (stored, resident) = match &l.weight {
            LinearWeight::Dense(t) => (tensor_bytes(t), tensor_bytes(t)),
            LinearWeight::Quantized(q) => (q.bytes(), q.resident_bytes()),
        };
        wb.linears += 1;
        wb.linear_values += out * inp;
        wb.linear_stored += stored + bias;
        wb.linear_resident += resident + bias;
        linear_names.insert(name.to_string());
    })?;
    model.visit("", &mut |name, t, role| {
        let in_linear = name.rsplit_once('.').is_some_and(|(m, _)| linear_names.contains(m));
        if matches!(role, ParamRole::Base) && !in_linear {
            wb.other += tensor_bytes(t);
        }
    });
    Ok(wb)
}

/// Peak resident set size of this process (VmHWM), in bytes.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// CPU time this process has used so far (user + system, all threads), in milliseconds; 0 where
/// `/proc/self/stat` is unreadable. Linux reports it in USER_HZ ticks (100 per second), so
/// differences are good to 10 ms.
pub fn cpu_time_ms() -> f64 {
    let ticks = std::fs::read_to_string("/proc/self/stat").ok().and_then(|s| {
        // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
        let rest = s.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    });
    ticks.unwrap_or(0) as f64 * 10.0
}

fn token_ids(n: usize, vocab: usize, seed: u64) -> Vec<i64> {
    let mut rng = temper_runtime::rng::Rng::new(seed);
    (0..n).map(|_| rng.below(vocab as u64) as i64).collect()
}

/// One full fine-tune step (forward, loss, backward, AdamW), `steps` times after one warm-up.
/// Returns tokens per second.
pub fn train(shape: &Shape, steps: usize) -> Result<f64> {
    let mut model = Llama::random(shape.config.clone(), 0.02, 0, DType::F32)?;
    model.unfreeze(".")?;
    let params: Vec<Tensor> = model.named_parameters().into_iter().map(|(_, t)| t).collect();
    let mut opt = AdamW::new(params, 1e-4);
    let (b, t) = (shape.batch, shape.seq);
    let ids = token_ids(b * t, shape.config.vocab_size, 42);
    let input = ForwardInput::ids(Tensor::from_vec(ids.clone(), &[b, t], Device::Cpu)?);
    let labels = Tensor::from_vec(ids, &[b, t], Device::Cpu)?;
    let mut step = || -> Result<()> {
        let loss = Llama::loss(&model.forward(&input)?, &labels)?;
        let grads = loss.backward()?;
        opt.step(&grads)
    };
    step()?;
    let start = Instant::now();
    for _ in 0..steps {
        step()?;
    }
    Ok((b * t * steps) as f64 / start.elapsed().as_secs_f64())
}

/// Where and in what precision a benchmark runs (`--device`, `--bf16`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Placement {
    pub device: Device,
    /// Dense weights, adapters and activations in bf16 (AdamW keeps f32 masters); CUDA only.
    pub bf16: bool,
    /// Gradient checkpointing: each decoder layer's activations are recomputed in the backward
    /// instead of kept (training workloads).
    pub checkpoint: bool,
}

impl Placement {
    /// The CPU in f32: what every CPU benchmark uses.
    pub const CPU: Placement = Placement { device: Device::Cpu, bf16: false, checkpoint: false };

    /// Errors on bf16 off the GPU (the CPU backend computes in f32).
    pub fn check(&self) -> Result<()> {
        if self.bf16 && !self.device.is_cuda() {
            return Err(Error::Input("--bf16 needs --device cuda: the CPU backend computes in f32".into()));
        }
        Ok(())
    }

    /// Casts `model` to this precision and moves it to this device.
    fn place<A: temper_runtime::adapters::Adapter>(&self, model: &mut Llama<A>) -> Result<()> {
        model.gradient_checkpointing = self.checkpoint;
        if self.bf16 {
            model.to_dtype(DType::BF16)?;
        }
        if self.device.is_cuda() {
            model.to_device(self.device)?;
        }
        Ok(())
    }

    fn dtype(&self) -> DType {
        if self.bf16 {
            DType::BF16
        } else {
            DType::F32
        }
    }
}

/// Peak memory of a benchmark: device pool bytes on a GPU, the counted heap (else the resident set)
/// on the CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Peak {
    /// The most bytes live buffers held (PyTorch's `max_memory_allocated`); on the CPU, the heap's.
    pub allocated: u64,
    /// The most bytes the allocator held from the driver (PyTorch's `max_memory_reserved`).
    pub reserved: u64,
}

/// [`Peak`] of `device` since it was opened or last reset. On the CPU `allocated` is the heap's
/// live-bytes peak where the binary counts it ([`crate::heap`]), else the peak RSS.
pub fn peak(device: Device) -> Result<Peak> {
    Ok(match device.memory()? {
        Some(m) => Peak { allocated: m.used_high, reserved: m.reserved_high },
        None => {
            let (heap, rss) = (crate::heap::peak() as u64, peak_rss_bytes());
            Peak { allocated: if heap > 0 { heap } else { rss }, reserved: rss }
        }
    })
}

/// Bytes live now on `device` (the pool's used bytes, or the counted heap on the CPU).
fn live_bytes(device: Device) -> Result<u64> {
    Ok(match device.memory()? {
        Some(m) => m.used,
        None => crate::heap::current() as u64,
    })
}

/// Restarts the peak of `device` (and of the CPU heap) from what is live now.
fn reset_peaks(device: Device) -> Result<()> {
    crate::heap::reset_peak();
    device.reset_peak_memory()
}

/// Kernel launches (and cuBLASLt GEMMs) queued by this process so far; 0 on a machine without CUDA.
pub fn launches() -> u64 {
    temper_runtime::backend::cuda::launches()
}

/// What a training benchmark measured over its timed steps.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TrainTiming {
    pub tokens_per_s: f64,
    pub step_ms: f64,
    pub peak: Peak,
    /// The most bytes a timed step added on top of what was live before it (weights, adapters,
    /// optimiser state): the step's activations, gradients and workspaces.
    pub step_extra: u64,
    /// CPU milliseconds per step (user + system, all threads): less sensitive than wall time to a
    /// shared VM's stolen time, though it counts worker threads' spinning too.
    pub cpu_ms: f64,
    /// Kernel launches + GEMMs per step (0 on the CPU).
    pub launches_per_step: f64,
    pub final_loss: f64,
}

fn random_batch(vocab: usize, batch: usize, seq: usize) -> Result<temper_runtime::train::Batch> {
    let ids = token_ids(batch * seq, vocab, 42);
    Ok(temper_runtime::train::Batch { input: ForwardInput::ids(Tensor::from_vec(ids.clone(), &[batch, seq], Device::Cpu)?), labels: Tensor::from_vec(ids, &[batch, seq], Device::Cpu)? })
}

/// Times `steps` steps of `trainer` on one random batch after two warm-up steps (which also
/// allocate the optimiser state), synchronising the device before reading the clock.
fn time_steps(step: &mut dyn FnMut(&temper_runtime::train::Batch) -> Result<f64>, device: Device, vocab: usize, steps: usize, batch: usize, seq: usize) -> Result<TrainTiming> {
    let b = random_batch(vocab, batch, seq)?;
    for _ in 0..2 {
        step(&b)?;
    }
    device.synchronize()?;
    let (overall, base) = (peak(device)?, live_bytes(device)?);
    reset_peaks(device)?;
    let (start, l0, cpu0) = (Instant::now(), launches(), cpu_time_ms());
    let mut loss = f64::NAN;
    for _ in 0..steps {
        loss = step(&b)?;
    }
    device.synchronize()?;
    let secs = start.elapsed().as_secs_f64();
    let n = steps.max(1) as f64;
    let during = peak(device)?;
    Ok(TrainTiming {
        tokens_per_s: (batch * seq * steps) as f64 / secs,
        step_ms: 1000.0 * secs / n,
        peak: Peak { allocated: overall.allocated.max(during.allocated), reserved: overall.reserved.max(during.reserved) },
        step_extra: during.allocated.saturating_sub(base),
        cpu_ms: (cpu_time_ms() - cpu0) / n,
        launches_per_step: (launches() - l0) as f64 / n,
        final_loss: loss,
    })
}

type LoraTrainer = temper_runtime::train::Trainer<temper_runtime::adapters::Lora, temper_runtime::loss::Loss<temper_runtime::loss::Ce>, AdamW>;

/// A LoRA trainer over `base` on `place`: rank `r`, alpha 2r on all seven projections, AdamW over
/// the adapter, CE over every token (what the PyTorch + PEFT baselines run).
fn lora_trainer(base: Llama, place: Placement, r: usize) -> Result<LoraTrainer> {
    use temper_runtime::adapters::{Lora, Targets};
    place.check()?;
    let mut model = base.with_adapter("default", &Lora::config(r, 2.0 * r as f64).targets(Targets::AllLinear))?;
    place.place(&mut model)?;
    Ok(temper_runtime::train::Trainer::new(model, temper_runtime::loss::ce(), AdamW::lr(1e-4)))
}

/// LoRA (QLoRA over a quantised base) SFT steps on `place` (see `lora_trainer`), two warm-up
/// steps; the workload `tools/bench_sft_torch.py` (CPU) and `tools/bench_gpu_torch.py` (GPU) time
/// on PyTorch + PEFT.
pub fn lora_sft(base: Llama, place: Placement, steps: usize, batch: usize, seq: usize, r: usize) -> Result<TrainTiming> {
    if batch == 0 || seq < 2 {
        return Err(Error::Input(format!("lora-sft needs batch ≥ 1 and seq ≥ 2 (got batch {batch}, seq {seq})")));
    }
    let vocab = base.config.vocab_size;
    let mut trainer = lora_trainer(base, place, r)?;
    time_steps(&mut |b| Ok(trainer.step(b)?.loss), place.device, vocab, steps, batch, seq)
}

/// DPO steps (sigmoid, β 0.1) with LoRA rank `r` on all projections, the reference being the base
/// with the adapter off: `batch` pairs, each a prompt of seq/2 random ids and a chosen and a rejected
/// completion of seq − seq/2 ids, so 2·batch sequences of `seq` tokens per step (packed, here
/// without padding). What `tools/bench_dpo_torch.py` times on TRL's DPOTrainer.
pub fn dpo(base: Llama, place: Placement, steps: usize, batch: usize, seq: usize, r: usize) -> Result<TrainTiming> {
    use temper_runtime::adapters::{Lora, Targets};
    use temper_runtime::data::preference::{PreferencePair, Sequence};
    if batch == 0 || seq < 4 {
        return Err(Error::Input(format!("dpo needs batch ≥ 1 and seq ≥ 4 (got batch {batch}, seq {seq})")));
    }
    place.check()?;
    let vocab = base.config.vocab_size;
    let mut model = base.with_adapter("default", &Lora::config(r, 2.0 * r as f64).targets(Targets::AllLinear))?;
    place.place(&mut model)?;
    let mut trainer = temper_runtime::train::Trainer::preference(model, temper_runtime::loss::dpo(0.1), AdamW::lr(1e-4));
    let (p, c) = (seq / 2, seq - seq / 2);
    let ids: Vec<u32> = token_ids(batch * (p + 2 * c), vocab, 7).into_iter().map(|x| x as u32).collect();
    let pairs: Vec<PreferencePair> = ids
        .chunks(p + 2 * c)
        .enumerate()
        .map(|(i, x)| PreferencePair {
            chosen: Sequence::new(x[..p].to_vec(), x[p..p + c].to_vec()),
            rejected: Sequence::new(x[..p].to_vec(), x[p + c..].to_vec()),
            margin: 0.0,
            source: format!("random pair {i}"),
        })
        .collect();
    let b = temper_runtime::train::preference::pair_batches(&pairs, batch, 0, true)?;
    time_steps(&mut |_| Ok(trainer.step_pairs(&b, None, None)?.loss), place.device, vocab, steps, 2 * batch, seq)
}

/// What a GRPO benchmark measured (means over the timed steps).
#[derive(Clone, Debug)]
pub struct GrpoTiming {
    pub step_ms: f64,
    pub rollout_ms: f64,
    pub rollout_tokens_per_s: f64,
    pub tokens_per_s: f64,
    pub final_loss: f64,
}

/// GRPO steps with LoRA r (alpha 2r, all linears) on the shape's random model: `prompts` prompts of
/// `seq` random ids, `g` completions each of exactly `new_tokens` tokens (no EOS), a reward from
/// the completion's ids, β = 0, TRL's default loss (dapo), every group trained. One untimed
/// warm-up step. What `tools/bench_grpo_torch.py` times on TRL's GRPOTrainer.
#[allow(clippy::too_many_arguments)]
pub fn grpo(base: Llama, place: Placement, steps: usize, prompts: usize, seq: usize, g: usize, new_tokens: usize, r: usize) -> Result<GrpoTiming> {
    use temper_runtime::adapters::{Lora, Targets};
    use temper_runtime::generate::{GenerationConfig, Sampling};
    use temper_runtime::rl::{reward_fn, Rewards};
    use temper_runtime::train::rl::{RlConfig, RlSetup};
    if prompts == 0 || seq == 0 || g < 2 || new_tokens == 0 {
        return Err(Error::Input(format!("grpo needs prompts ≥ 1, seq ≥ 1, num_generations ≥ 2, new tokens ≥ 1 (got {prompts}, {seq}, {g}, {new_tokens})")));
    }
    place.check()?;
    let vocab = base.config.vocab_size;
    let mut model = base.with_adapter("default", &Lora::config(r, 2.0 * r as f64).targets(Targets::AllLinear))?;
    place.place(&mut model)?;
    let mut trainer = temper_runtime::train::Trainer::rl(model, temper_runtime::loss::grpo(), AdamW::lr(1e-4));
    let gen = GenerationConfig { max_new_tokens: new_tokens, sampling: Sampling::Sample { temperature: 1.0, top_k: None, top_p: None, seed: 7 }, eos_token_ids: vec![], stop_strings: vec![], pad_token_id: 0 };
    let mut cfg = RlConfig::grpo(gen);
    cfg.num_generations = g;
    cfg.micro_batch_size = prompts * g;
    cfg.skip_zero_advantage = false;
    let rewards = Rewards::new().with(reward_fn("ids", |c| (c.tokens.iter().map(|&t| t as u64).sum::<u64>() % 7) as f64), 1.0);
    let setup = RlSetup::new(cfg, rewards, None)?;
    let ids: Vec<u32> = token_ids(prompts * seq, vocab, 7).into_iter().map(|x| x as u32).collect();
    let ps: Vec<temper_runtime::data::preference::Prompt> =
        ids.chunks(seq).enumerate().map(|(i, c)| temper_runtime::data::preference::Prompt { tokens: c.to_vec(), fields: Default::default(), source: format!("random prompt {i}") }).collect();
    trainer.grpo_step(&ps, &setup, None, None)?;
    let (mut step_s, mut rollout_s, mut new, mut loss) = (0.0, 0.0, 0usize, f64::NAN);
    for _ in 0..steps.max(1) {
        let t0 = std::time::Instant::now();
        let log = trainer.grpo_step(&ps, &setup, None, None)?;
        step_s += t0.elapsed().as_secs_f64();
        rollout_s += log.terms.iter().find(|(k, _)| *k == "time/rollout_s").map_or(0.0, |(_, v)| *v);
        new += prompts * g * new_tokens;
        loss = log.loss;
    }
    let n = steps.max(1) as f64;
    Ok(GrpoTiming {
        step_ms: 1e3 * step_s / n,
        rollout_ms: 1e3 * rollout_s / n,
        rollout_tokens_per_s: new as f64 / rollout_s.max(1e-9),
        tokens_per_s: (prompts * g * (seq + new_tokens)) as f64 * n / step_s.max(1e-9),
        final_loss: loss,
    })
}

/// Full fine-tune steps (every weight trained, AdamW, fused CE) of the shape's random model.
pub fn full_sft(shape: &Shape, place: Placement, steps: usize, batch: usize, seq: usize) -> Result<TrainTiming> {
    place.check()?;
    let mut model = Llama::random(shape.config.clone(), 0.02, 0, place.dtype())?;
    model.unfreeze(".")?;
    place.place(&mut model)?;
    let mut trainer = temper_runtime::train::Trainer::new(model, temper_runtime::loss::ce(), AdamW::lr(1e-5));
    time_steps(&mut |b| Ok(trainer.step(b)?.loss), place.device, shape.config.vocab_size, steps, batch, seq)
}

/// The longest sequence (batch 1, a multiple of `step`) for which one LoRA step of `base` fits
/// in device memory, probing up from `start` by doubling to at most `limit`, then bisecting.
/// Returns (longest that fit, shortest that did not, if any probe failed).
pub fn max_seq(base: Llama, place: Placement, r: usize, start: usize, limit: usize, step: usize) -> Result<(usize, Option<usize>)> {
    let vocab = base.config.vocab_size;
    let mut trainer = lora_trainer(base, place, r)?;
    let mut fits = |seq: usize| -> Result<bool> {
        let r = random_batch(vocab, 1, seq).and_then(|b| trainer.step(&b).map(|_| ()));
        let r = r.and_then(|_| place.device.synchronize());
        match r {
            Ok(()) => Ok(true),
            Err(e) if is_out_of_memory(&e) => Ok(false),
            Err(e) => Err(e),
        }
    };
    let (mut lo, mut hi) = (0usize, None);
    let mut s = start.max(step);
    while s <= limit {
        if fits(s)? {
            lo = s;
            s *= 2;
        } else {
            hi = Some(s);
            break;
        }
    }
    if lo == 0 {
        return Ok((0, hi));
    }
    let top = hi.unwrap_or(limit + step).min(limit + step);
    let (mut a, mut b) = (lo, top);
    while b - a > step {
        let mid = (a + b) / 2 / step * step;
        if mid <= a {
            break;
        }
        if fits(mid)? {
            a = mid;
        } else {
            b = mid;
            hi = Some(mid);
        }
    }
    Ok((a, hi))
}

/// Whether `e` is the driver (or host allocator) running out of memory.
pub fn is_out_of_memory(e: &Error) -> bool {
    let s = e.to_string();
    s.contains("OUT_OF_MEMORY") || s.contains("out of memory")
}

/// A `shape` tensor of standard normal values (drawn on the host from `rng`) in `place`'s dtype, on its device.
fn randn(rng: &mut temper_runtime::rng::Rng, shape: &[usize], place: Placement) -> Result<Tensor> {
    let v: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| rng.normal() as f32).collect();
    Tensor::from_vec(v, shape, Device::Cpu)?.to_dtype(place.dtype())?.to_device(place.device)
}

/// Milliseconds per call of `f` over `iters` calls, the device synchronised before and after.
fn time_ms(device: Device, iters: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    device.synchronize()?;
    let t = Instant::now();
    for _ in 0..iters.max(1) {
        f()?;
    }
    device.synchronize()?;
    Ok(1e3 * t.elapsed().as_secs_f64() / iters.max(1) as f64)
}

/// Timings of one attention shape: forward, backward, and FLOP rates by the usual convention
/// (forward 4·b·h·s²·d, halved when causal; backward 2.5× the forward).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AttentionTiming {
    pub fwd_ms: f64,
    pub bwd_ms: f64,
    pub fwd_tflops: f64,
    pub fwd_bwd_tflops: f64,
}

/// Causal attention forward and backward at `[batch, seq, heads, head_dim]` (K/V with `kv_heads`)
/// in `place`'s precision, `iters` timed repetitions after one warm-up; calls the backend directly,
/// as `scaled_dot_product_attention` is timed on the PyTorch side.
pub fn attention(place: Placement, batch: usize, seq: usize, heads: usize, kv_heads: usize, head_dim: usize, iters: usize) -> Result<AttentionTiming> {
    use temper_runtime::backend::{AttnMasks, AttnShape, BackendStorage, Storage};
    place.check()?;
    let mut rng = temper_runtime::rng::Rng::new(3);
    let (qs, ks) = ([batch, seq, heads, head_dim], [batch, seq, kv_heads, head_dim]);
    let (qt, kt, vt, dt) = (randn(&mut rng, &qs, place)?, randn(&mut rng, &ks, place)?, randn(&mut rng, &ks, place)?, randn(&mut rng, &qs, place)?);
    let (q, k, v, d_out) = (qt.contiguous_storage()?, kt.contiguous_storage()?, vt.contiguous_storage()?, dt.contiguous_storage()?);
    let (q, k, v, d_out): (&Storage, &Storage, &Storage, &Storage) = (&q, &k, &v, &d_out);
    let shape = AttnShape { batch, q_len: seq, kv_len: seq, kv_cap: seq, n_heads: heads, n_kv_heads: kv_heads, head_dim };
    let masks = AttnMasks { causal: true, q_offset: 0, key_mask: None, segment_ids: None, window: None };
    let scale = 1.0 / (head_dim as f64).sqrt();
    let (out, lse) = Storage::attention(q, k, v, &shape, &masks, scale)?;
    Storage::attention_backward(q, k, v, &out, &lse, d_out, &shape, &masks, scale)?;
    let fwd_ms = time_ms(place.device, iters, &mut || Storage::attention(q, k, v, &shape, &masks, scale).map(|_| ()))?;
    let bwd_ms = time_ms(place.device, iters, &mut || Storage::attention_backward(q, k, v, &out, &lse, d_out, &shape, &masks, scale).map(|_| ()))?;
    let fwd_flops = 4.0 * (batch * heads * seq * seq * head_dim) as f64 / 2.0;
    Ok(AttentionTiming { fwd_ms, bwd_ms, fwd_tflops: fwd_flops / (fwd_ms * 1e-3) / 1e12, fwd_bwd_tflops: 3.5 * fwd_flops / ((fwd_ms + bwd_ms) * 1e-3) / 1e12 })
}

/// TFLOP/s of a square `[n, n] · [n, n]` matmul in `place`'s precision (the dense GEMM ceiling
/// that model FLOP utilisation is measured against), `iters` timed repetitions after one warm-up.
pub fn gemm_tflops(place: Placement, n: usize, iters: usize) -> Result<f64> {
    place.check()?;
    let mut rng = temper_runtime::rng::Rng::new(5);
    let (a, b) = (randn(&mut rng, &[n, n], place)?, randn(&mut rng, &[n, n], place)?);
    temper_runtime::ops::matmul(&a, &b, false, false)?;
    let ms = time_ms(place.device, iters, &mut || temper_runtime::ops::matmul(&a, &b, false, false).map(|_| ()))?;
    Ok(2.0 * (n * n * n) as f64 / (ms * 1e-3) / 1e12)
}

/// Greedy generation of `new_tokens` tokens for `batch` random 16-token prompts on `place`, after
/// one warm-up run. Returns generated tokens per second (all rows together).
pub fn generation(shape: &Shape, place: Placement, batch: usize, new_tokens: usize) -> Result<f64> {
    place.check()?;
    let mut model = Llama::random(shape.config.clone(), 0.02, 0, place.dtype())?;
    place.place(&mut model)?;
    let prompts: Vec<Vec<u32>> = (0..batch.max(1)).map(|r| token_ids(16, shape.config.vocab_size, 7 + r as u64).into_iter().map(|x| x as u32).collect()).collect();
    let cfg = GenerationConfig { max_new_tokens: new_tokens, ..Default::default() };
    generate(&model, &prompts[..1], &GenerationConfig { max_new_tokens: 4, ..Default::default() }, None)?;
    place.device.synchronize()?;
    let start = Instant::now();
    let out = generate(&model, &prompts, &cfg, None)?;
    place.device.synchronize()?;
    let n: usize = out.tokens.iter().map(|t| t.len()).sum();
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_ids_are_the_ones_the_pytorch_side_draws() {
        // tools/bench_gpu_torch.py reimplements this generator (SplitMix64, id = next % vocab);
        // these are its first five ids for seed 42 and vocabulary 512.
        assert_eq!(super::token_ids(5, 512, 42), vec![149, 259, 338, 404, 498]);
    }
}
