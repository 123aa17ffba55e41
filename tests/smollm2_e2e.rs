//! SmolLM2-135M-Instruct end to end: our GGUF loading, tokenizer, chat template and greedy decoding
//! against references computed once with transformers loading the same GGUF
//! (`tools/smollm2_reference.py` → `tests/fixtures/smollm2_*.json`). Skips when the asset is absent;
//! CI fetches it with scripts/fetch-assets.sh.

mod common;

use serde_json::Value;
use temper::chat_template::{render_chat, ChatMessage};
use temper::formats::gguf::GgufFile;
use temper::generate::{generate, GenerationConfig};
use temper::models::{ForwardInput, Llama};
use temper::ModuleExt;
use temper::tokenizer::Tokenizer;
use temper::{DType, Device, Tensor};

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(common::fixture(name)).expect("fixture")).expect("json")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

#[test]
fn chat_prompt_renders_and_tokenizes_like_transformers_and_greedy_output_matches() {
    let Some(path) = common::smollm2() else { return };
    let r = json("smollm2_greedy.json");
    let tk = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let msgs = [ChatMessage { role: "user".into(), content: r["messages"][0]["content"].as_str().unwrap().into() }];
    let text = render_chat(tk.chat_template.as_deref().unwrap(), &msgs, true, tk.bos_token.as_deref(), tk.eos_token.as_deref()).unwrap();
    assert_eq!(text, r["prompt_text"].as_str().unwrap());
    let prompt = tk.encode(&text, false).unwrap();
    assert_eq!(prompt, ids(&r["prompt_ids"]));

    let model = Llama::load(&path, DType::F32).unwrap();
    let cfg = GenerationConfig { max_new_tokens: r["max_new_tokens"].as_u64().unwrap() as usize, eos_token_ids: vec![2], ..Default::default() };
    let out = generate(&model, &[prompt], &cfg, None).unwrap();
    assert_eq!(out.tokens[0], ids(&r["output_ids"]));
    assert_eq!(tk.decode(&out.tokens[0], true).unwrap(), r["output_text"].as_str().unwrap());

    let raw = generate(&model, &[ids(&r["raw_prompt_ids"])], &GenerationConfig { max_new_tokens: 20, ..cfg }, None).unwrap();
    assert_eq!(raw.tokens[0], ids(&r["raw_output_ids"]));
}

#[test]
fn dequantised_weights_tokenizer_and_logits_match_transformers() {
    let Some(path) = common::smollm2() else { return };
    let c = json("smollm2_checks.json");
    let tk = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    for case in c["tokenizer_encodings"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tk.encode(text, false).unwrap(), ids(&case["ids"]), "encoding of {text:?}");
    }
    let model = Llama::load(&path, DType::F32).unwrap();
    let params: std::collections::HashMap<String, Tensor> = model.named_parameters().into_iter().collect();
    for (name, w) in c["weights"].as_object().unwrap() {
        let t = params[name].to_vec::<f32>().unwrap();
        let cols = params[name].shape()[1];
        for (r, row) in w["rows_0_2_cols_0_7"].as_array().unwrap().iter().enumerate() {
            for (j, v) in row.as_array().unwrap().iter().enumerate() {
                assert_eq!(t[r * cols + j], v.as_f64().unwrap() as f32, "{name}[{r}, {j}]");
            }
        }
    }
    let r = json("smollm2_greedy.json");
    let prompt: Vec<i64> = ids(&r["prompt_ids"]).into_iter().map(i64::from).collect();
    let n = prompt.len();
    let logits = model.forward(&ForwardInput::ids(Tensor::from_vec(prompt, &[1, n], Device::Cpu).unwrap())).unwrap().to_vec::<f32>().unwrap();
    let vocab = model.config.vocab_size;
    for (j, v) in c["chat_prompt_last_position_logits_0_7"].as_array().unwrap().iter().enumerate() {
        let got = logits[(n - 1) * vocab + j] as f64;
        assert!((got - v.as_f64().unwrap()).abs() < 1e-3, "logit {j}: {got} vs {v}");
    }
}

#[test]
fn cli_chat_generation_prints_the_reference_answer_as_json() {
    let Some(path) = common::smollm2() else { return };
    let r = json("smollm2_greedy.json");
    let (ok, stdout, stderr) = common::temper(&[
        "generate", "--model", path.to_str().unwrap(), "--prompt", r["messages"][0]["content"].as_str().unwrap(),
        "--chat", "--max-new-tokens", "40", "--greedy", "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(ids(&v["token_ids"]), ids(&r["output_ids"]));
    assert_eq!(v["text"], r["output_text"]);
}

#[test]
fn stop_strings_and_seeded_sampling() {
    let Some(path) = common::smollm2() else { return };
    let r = json("smollm2_greedy.json");
    let model = Llama::load(&path, DType::F32).unwrap();
    let tk = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let prompt = ids(&r["prompt_ids"]);
    let cfg = GenerationConfig { max_new_tokens: 40, eos_token_ids: vec![2], stop_strings: vec!["France".into()], ..Default::default() };
    let out = generate(&model, std::slice::from_ref(&prompt), &cfg, Some(&tk)).unwrap();
    assert_eq!(out.finish[0], temper::generate::FinishReason::StopString);
    assert_eq!(tk.decode(&out.tokens[0], true).unwrap(), "The capital of France");

    let sampled = |seed| {
        let s = temper::generate::Sampling::Sample { temperature: 0.9, top_k: Some(50), top_p: Some(0.95), seed };
        generate(&model, &[prompt.clone(), prompt.clone()], &GenerationConfig { max_new_tokens: 12, sampling: s, eos_token_ids: vec![2], ..Default::default() }, None)
            .unwrap()
            .tokens
    };
    assert_eq!(sampled(7), sampled(7), "the same seed gives the same samples");
}

/// SmolLM2 as a true 4-bit base: its Q4_1 linear weights stay as GGUF blocks (read tile by tile,
/// q/k rows through llama.cpp's permutation), give the logits of the dequantised model, and LoRA
/// trains on top.
#[test]
fn gguf_blocks_stay_quantised_as_a_frozen_base_and_lora_trains_on_it() {
    use temper::adapters::{host::each_linear_ref, Lora, NoAdapter, Targets};
    use temper::models::LoadOptions;
    let Some(path) = common::smollm2() else { return };
    let dense = Llama::load(&path, DType::F32).unwrap();
    let opts = LoadOptions { keep_gguf_quantized: true, ..LoadOptions::dense(DType::F32) };
    let q = Llama::load_with(&path, &opts).unwrap();
    let (mut n, mut bytes, mut f32_bytes) = (0, 0, 0);
    each_linear_ref::<NoAdapter, _>(&q, |_, l| {
        if let Some(w) = l.weight.as_quantized() {
            n += 1;
            bytes += w.bytes();
            f32_bytes += 4 * w.shape()[0] * w.shape()[1];
        }
    })
    .unwrap();
    assert_eq!(n, 30 * 7, "every decoder linear stays quantised");
    eprintln!("SmolLM2 Q4_1 linears kept quantised: {bytes} bytes vs {f32_bytes} as f32 ({:.3}×)", bytes as f64 / f32_bytes as f64);
    assert!(bytes * 5 < f32_bytes, "Q4_1 is 5 bits per weight");
    assert_eq!(q.parameter_counts().total, dense.parameter_counts().total, "a quantised weight counts its values");
    let e = q.save_pretrained(&common::scratch_dir("gguf-blocks-save")).unwrap_err().to_string();
    assert!(e.contains("GGUF blocks") && e.contains("q_proj"), "{e}");
    let ids: Vec<i64> = vec![1, 504, 3458, 28, 549, 314, 253, 1789];
    let input = ForwardInput::ids(Tensor::from_vec(ids.clone(), &[1, 8], Device::Cpu).unwrap());
    let (a, b) = (dense.forward(&input).unwrap().to_vec::<f32>().unwrap(), q.forward(&input).unwrap().to_vec::<f32>().unwrap());
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    eprintln!("SmolLM2 logits, GGUF blocks kept vs dequantised on load: max |Δ| {d:e}");
    assert!(d < 1e-3, "max |Δlogit| {d}");

    let model = q.with_adapter("default", &Lora::config(4, 8.0).targets(Targets::names(["q_proj", "v_proj"]))).unwrap();
    let mut t = temper::train::Trainer::new(model, temper::loss::ce(), temper::optim::AdamW::lr(1e-3));
    let batch = temper::train::Batch { input, labels: Tensor::from_vec(ids, &[1, 8], Device::Cpu).unwrap() };
    let first = t.step(&batch).unwrap().loss;
    let mut last = first;
    for _ in 0..5 {
        last = t.step(&batch).unwrap().loss;
    }
    eprintln!("LoRA on the Q4_1 base: loss {first:.4} → {last:.4} in 6 steps");
    assert!(last < first, "loss {first} → {last}");
}
