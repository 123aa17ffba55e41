use temper::loss::{ce, kl};
use temper::prelude::*;

fn main() -> Result<()> {
    // A plain model has no adapter to switch off, so kl() has no reference policy.
    let model = Llama::load("model".as_ref(), DType::F32)?;
    let _trainer = Trainer::new(model, ce() + 0.1 * kl(), AdamW::lr(1e-4));
    Ok(())
}
