//! GRPO in Rust with a reward function written as a closure: the policy is taught to answer
//! with short completions that contain the digit its prompt asks for. Rollouts run on the
//! weights being trained (LoRA unmerged); the KL term's reference is the base with the adapter
//! off. `cargo run --release --example grpo`
use std::sync::Arc;
use temper::data::preference::Prompt;
use temper::generate::{GenerationConfig, Sampling};
use temper::loss::{grpo, ref_kl};
use temper::prelude::*;
use temper::rl::{reward_fn, Rewards};
use temper::train::rl::{RlConfig, RlSetup};

pub fn main() -> Result<()> {
    let tok = Tokenizer::from_hf_dir("tests/fixtures/tokenizers/tiny_chat".as_ref())?;
    let base = Llama::load("tests/fixtures/models/llama_gqa_llama3rope".as_ref(), DType::F32)?;
    let model = base.with_adapter("default", &Lora::config(8, 16.0).targets(Targets::AllLinear))?;
    // Prompts "digit k" with the wanted digit as a field, as a `format = "prompt"` record's `answer` would be.
    let prompts: Vec<Prompt> = (0..8)
        .map(|k| {
            let mut fields = serde_json::Map::new();
            fields.insert("digit".into(), serde_json::json!(k.to_string()));
            Ok(Prompt { tokens: tok.encode(&format!("digit {k}:"), true)?, fields, source: format!("prompt {k}") })
        })
        .collect::<Result<_>>()?;
    // A custom reward: 1 when the completion names the digit, minus a little per token.
    let has_digit = reward_fn("has_digit", |c| {
        let want = c.field("digit").unwrap_or_default();
        f64::from(u8::from(c.text.contains(want.as_str())))
    });
    let brevity = reward_fn("brevity", |c| -(c.tokens.len() as f64) / 16.0);
    let rewards = Rewards::new().with(has_digit, 1.0).with(brevity, 0.2);
    let gen = GenerationConfig {
        max_new_tokens: 8,
        sampling: Sampling::Sample { temperature: 1.0, top_k: None, top_p: None, seed: 1 },
        eos_token_ids: tok.eos_token_ids.clone(),
        stop_strings: vec![],
        pad_token_id: tok.pad_token_id.unwrap_or(0),
    };
    let mut cfg = RlConfig::grpo(gen);
    cfg.num_generations = 8;
    cfg.micro_batch_size = 32;
    let setup = RlSetup::new(cfg, rewards, Some(Arc::new(tok)))?;
    // GRPO's clipped surrogate with DAPO's clip-higher, plus β·KL to the adapter-off base.
    let mut trainer = Trainer::rl(model, grpo().epsilon(0.2).epsilon_high(0.28) + 0.04 * ref_kl(), AdamW::lr(3e-3));
    for step in 1..=10 {
        let batch = &prompts[(step % 2) * 4..(step % 2) * 4 + 4];
        let log = trainer.grpo_step(batch, &setup, None, Some(1.0))?;
        let get = |k: &str| log.terms.iter().find(|(n, _)| *n == k).map_or(f64::NAN, |(_, v)| *v);
        println!("step {step:>2}  reward {:+.3}  has_digit {:.2}  length {:.1}  kl {:.4}", get("reward"), get("rewards/has_digit/mean"), get("completions/mean_length"), get("kl"));
    }
    trainer.save_adapter("default", "target/grpo-example".as_ref())
}
