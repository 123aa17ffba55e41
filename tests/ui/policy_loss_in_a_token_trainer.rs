use temper::loss::{grpo, ref_kl};
use temper::prelude::*;

fn main() -> Result<()> {
    // GRPO is computed from sampled completions and their advantages, not from a batch of tokens: Trainer::rl.
    let model = Llama::load("model".as_ref(), DType::F32)?.with_adapter("default", &Lora::config(8, 16.0))?;
    let _trainer = Trainer::new(model, grpo() + 0.04 * ref_kl(), AdamW::lr(1e-4));
    Ok(())
}
