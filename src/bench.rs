//! `temper bench`: throughput and peak memory of a full fine-tune step and of greedy generation on a
//! fixed shape, printed as JSON in the same schema as `tools/bench_torch.py` so the two compare
//! side by side (`tools/bench_compare.sh`).

use std::time::Instant;
use temper_runtime::formats::hf_config::{Architecture, ModelConfig};
use temper_runtime::generate::{generate, GenerationConfig};
use temper_runtime::models::{ForwardInput, Llama};
use temper_runtime::ModuleExt;
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

/// Peak resident set size of this process (VmHWM), in bytes.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map(|kb| kb * 1024)
        .unwrap_or(0)
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
    use temper_runtime::adapters::{Lora, Targets};
    let base = Llama::random(shape.config.clone(), 0.02, 0, DType::F32)?;
    let model = base.with_adapter("default", &Lora::config(r, 2.0 * r as f64).targets(Targets::AllLinear))?;
    let mut trainer = temper_runtime::train::Trainer::new(model, temper_runtime::loss::ce(), AdamW::lr(1e-4));
    let ids = token_ids(batch * seq, shape.config.vocab_size, 42);
    let b = temper_runtime::train::Batch {
        input: ForwardInput::ids(Tensor::from_vec(ids.clone(), &[batch, seq], Device::Cpu)?),
        labels: Tensor::from_vec(ids, &[batch, seq], Device::Cpu)?,
    };
    for _ in 0..2 {
        trainer.step(&b)?;
    }
    let start = Instant::now();
    for _ in 0..steps {
        trainer.step(&b)?;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(((batch * seq * steps) as f64 / secs, 1000.0 * secs / steps.max(1) as f64))
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
