//! DPO in Rust: preference pairs through the chat template, a LoRA adapter, and the loss composed
//! in code — DPO plus an NLL term on the chosen replies (RPO). The reference policy is the same
//! model with the adapter switched off, so there is no second copy.
//! `cargo run --release --example dpo`
use temper::data::preference::{load_pairs, PreferencePair};
use temper::data::{DatasetSpec, Format, TokenizeOptions};
use temper::loss::{ce_on_chosen, dpo};
use temper::prelude::*;
use temper::train::preference::pair_batches;

pub fn main() -> Result<()> {
    // A task with a known answer: asked for a number, say it ("3 ok"), don't refuse ("no").
    let data = std::env::temp_dir().join("temper-dpo-example.jsonl");
    let lines: Vec<String> = (0..32)
        .map(|i| {
            let k = i % 7;
            format!(r#"{{"prompt": [{{"role": "user", "content": "say {k}"}}], "chosen": [{{"role": "assistant", "content": "{k} ok"}}], "rejected": [{{"role": "assistant", "content": "no"}}]}}"#)
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).map_err(|e| Error::io(&data, e))?;
    let tok = Tokenizer::from_hf_dir("tests/fixtures/tokenizers/tiny_chat".as_ref())?;
    let (pairs, report): (Vec<PreferencePair>, _) = load_pairs(&DatasetSpec::new(&data, Format::Preference), &tok, &TokenizeOptions::new(64))?;
    println!("{report}");

    let base = Llama::load("tests/fixtures/models/llama_gqa_llama3rope".as_ref(), DType::F32)?;
    let model = base.with_adapter("default", &Lora::config(4, 8.0).targets(Targets::AllLinear))?;
    // The loss is a type: Loss<Sum<Dpo, Scaled<CeOnChosen>>>. Giving it to Trainer::new (token
    // batches) would not compile: a pair loss needs Trainer::preference.
    let mut trainer = Trainer::preference(model, dpo(0.5) + 0.2 * ce_on_chosen(), AdamW::lr(1e-2));
    let batches = pair_batches(&pairs, 8, tok.pad_token_id.unwrap_or(0), true)?;
    for (i, b) in batches.iter().cycle().take(12).enumerate() {
        let log = trainer.step_pairs(std::slice::from_ref(b), None, Some(1.0))?;
        let get = |k: &str| log.terms.iter().find(|(n, _)| *n == k).map_or(f64::NAN, |(_, v)| *v);
        println!("step {:>2}  loss {:.4}  rewards/margins {:+.3}  rewards/accuracies {:.2}", i + 1, log.loss, get("rewards/margins"), get("rewards/accuracies"));
    }
    trainer.save_adapter("default", "target/dpo-example".as_ref())
}
