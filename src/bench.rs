//! `temper bench`: throughput and peak memory of a full fine-tune step and of greedy generation on a
//! fixed shape, printed as JSON in the same schema as `tools/bench_torch.py` so the two compare
//! side by side (`tools/bench_compare.sh`); LoRA against QLoRA and the weight bytes of each base
//! format (`tools/bench_qlora.sh`).

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
    }
}

/// The shapes `tools/bench_torch.py` knows: `small` and `smollm2`.
pub fn shape(name: &str) -> Result<Shape> {
    Ok(match name {
        "small" => Shape { name: "small", config: config(1000, 256, 688, 4, 8, 4, 10000.0, false), batch: 4, seq: 256 },
        "tiny" => Shape { name: "tiny", config: ModelConfig { head_dim: 16, ..config(512, 64, 128, 2, 4, 2, 10000.0, false) }, batch: 8, seq: 128 },
        "smollm2" => Shape { name: "smollm2", config: config(49152, 576, 1536, 30, 9, 3, 100000.0, true), batch: 1, seq: 256 },
        other => return Err(Error::Input(format!("unknown bench shape `{other}` (expected tiny, small or smollm2)"))),
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

/// LoRA SFT steps as `tools/bench_sft_torch.py` times them: rank `r`, alpha 2r, all seven
/// projections, AdamW over the adapter, CE over every token, two warm-up steps.
/// Returns (tokens per second, milliseconds per step).
pub fn lora_sft(shape: &Shape, steps: usize, batch: usize, seq: usize, r: usize) -> Result<(f64, f64)> {
    let t = lora_sft_on(base_model(shape, None, BaseFormat::Dense(DType::F32))?, steps, batch, seq, r)?;
    Ok((t.tokens_per_s, t.step_ms))
}

/// What [`lora_sft_on`] measured over the timed steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SftTiming {
    pub tokens_per_s: f64,
    /// Wall-clock milliseconds per step.
    pub step_ms: f64,
    /// CPU milliseconds per step (user + system, all threads): less sensitive than wall time to
    /// a shared VM's stolen time, though it counts worker threads' spinning too.
    pub cpu_ms: f64,
}

/// [`lora_sft`] on a given base model: LoRA over a dense base, QLoRA over a quantised one (the
/// same adapter, optimiser and data; only the frozen base layers differ).
pub fn lora_sft_on(base: Llama, steps: usize, batch: usize, seq: usize, r: usize) -> Result<SftTiming> {
    use temper_runtime::adapters::{Lora, Targets};
    if batch == 0 || seq < 2 {
        return Err(Error::Input(format!("lora-sft needs batch ≥ 1 and seq ≥ 2 (got batch {batch}, seq {seq})")));
    }
    let vocab = base.config.vocab_size;
    let model = base.with_adapter("default", &Lora::config(r, 2.0 * r as f64).targets(Targets::AllLinear))?;
    let mut trainer = temper_runtime::train::Trainer::new(model, temper_runtime::loss::ce(), AdamW::lr(1e-4));
    let ids = token_ids(batch * seq, vocab, 42);
    let b = temper_runtime::train::Batch {
        input: ForwardInput::ids(Tensor::from_vec(ids.clone(), &[batch, seq], Device::Cpu)?),
        labels: Tensor::from_vec(ids, &[batch, seq], Device::Cpu)?,
    };
    for _ in 0..2 {
        trainer.step(&b)?;
    }
    let (start, cpu0) = (Instant::now(), cpu_time_ms());
    for _ in 0..steps {
        trainer.step(&b)?;
    }
    let secs = start.elapsed().as_secs_f64();
    let n = steps.max(1) as f64;
    Ok(SftTiming { tokens_per_s: (batch * seq * steps) as f64 / secs, step_ms: 1000.0 * secs / n, cpu_ms: (cpu_time_ms() - cpu0) / n })
}

/// Greedy generation, batch 1, a 16-token prompt, `new_tokens` new tokens, after one warm-up.
pub fn generation(shape: &Shape, new_tokens: usize) -> Result<f64> {
    let model = Llama::random(shape.config.clone(), 0.02, 0, DType::F32)?;
    let prompt: Vec<u32> = token_ids(16, shape.config.vocab_size, 7).into_iter().map(|x| x as u32).collect();
    let cfg = GenerationConfig { max_new_tokens: new_tokens, ..Default::default() };
    generate(&model, std::slice::from_ref(&prompt), &cfg, None)?;
    let start = Instant::now();
    let out = generate(&model, &[prompt], &cfg, None)?;
    Ok(out.tokens[0].len() as f64 / start.elapsed().as_secs_f64())
}
