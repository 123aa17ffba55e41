use temper::loss::dpo;
use temper::prelude::*;

fn main() -> Result<()> {
    // DPO is computed from preference pairs, not from a batch of tokens: Trainer::preference.
    let model = Llama::load("model".as_ref(), DType::F32)?.with_adapter("default", &Lora::config(8, 16.0))?;
    let _trainer = Trainer::new(model, dpo(0.1), AdamW::lr(1e-4));
    Ok(())
}
