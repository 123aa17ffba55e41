//! Load a model (HF folder or GGUF), chat with it once, print the answer.
//!
//!     cargo run --release --example generate -- assets/SmolLM2-135M-Instruct.Q4_1.gguf "Name a prime number."

use temper::chat_template::{render_chat, ChatMessage};
use temper::formats::gguf::GgufFile;
use temper::prelude::*;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or_else(|| Error::Input("usage: generate MODEL [PROMPT]".into()))?;
    let prompt = args.next().unwrap_or_else(|| "What is the capital of France?".into());
    let path = std::path::Path::new(&path);
    let model = Llama::load(path, DType::F32)?;
    let tokenizer = if path.is_dir() { Tokenizer::from_hf_dir(path)? } else { Tokenizer::from_gguf(&GgufFile::open(path)?)? };
    let template = tokenizer.chat_template.clone().ok_or_else(|| Error::Input("the model has no chat template".into()))?;
    let text = render_chat(&template, &[ChatMessage::new("user", &prompt)], true, tokenizer.bos_token.as_deref(), tokenizer.eos_token.as_deref())?;
    let ids = tokenizer.encode(&text, false)?;
    let cfg = GenerationConfig { max_new_tokens: 64, eos_token_ids: tokenizer.eos_token_ids.clone(), ..Default::default() };
    let out = generate(&model, &[ids], &cfg, Some(&tokenizer))?;
    println!("{}", tokenizer.decode(&out.tokens[0], true)?);
    Ok(())
}
