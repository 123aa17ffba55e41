//! `temper train` and `temper data preview` end to end on the tiny fixture model with a
//! character-level ChatML tokenizer: the output layout, metrics, resume, and bad input.

mod common;

use common::{fixture, scratch_dir, temper};
use std::path::{Path, PathBuf};

/// A chat dataset of `n` short conversations (the assistant echoes a number, a learnable task).
fn write_data(dir: &Path, n: usize) -> PathBuf {
    common::write_jsonl(dir, "chat.jsonl", (0..n).map(|i| serde_json::json!({"messages": [{"role": "user", "content": format!("say {}", i % 7)}, {"role": "assistant", "content": format!("{} ok", i % 7)}]})))
}

fn write_config(dir: &Path, data: &Path, extra: &str) -> PathBuf {
    let cfg = format!(
        r#"base_model = "{base}"
tokenizer = "{tok}"
sequence_len = 48
micro_batch_size = 4
gradient_accumulation_steps = 2
max_steps = 6
learning_rate = 5e-3
warmup_steps = 1
val_set_size = 0.1
eval_steps = 3
save_steps = 3
output_dir = "{out}"
seed = 3
sample_prompts = ["say 3"]
sample_max_new_tokens = 4
{extra}
[adapter]
kind = "lora"
r = 4
alpha = 8
target_modules = ["q_proj", "v_proj", "down_proj"]

[[datasets]]
path = "{data}"
type = "chat"
"#,
        base = fixture("models/llama_gqa_llama3rope").display(),
        tok = fixture("tokenizers/tiny_chat").display(),
        out = dir.join("out").display(),
        data = data.display(),
    );
    let p = dir.join("train.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

#[test]
fn train_writes_checkpoints_metrics_events_plot_and_the_final_adapter() {
    let dir = scratch_dir("cli-train");
    let cfg = write_config(&dir, &write_data(&dir, 60), "");
    let (ok, _, err) = temper(&["train", cfg.to_str().unwrap(), "--progress", "lines"]);
    assert!(ok, "{err}");
    let out = dir.join("out");
    for f in ["adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png", "checkpoint-3/optimizer.safetensors", "checkpoint-6/trainer_state.json", "checkpoint-6/adapter_model.safetensors"] {
        assert!(out.join(f).exists(), "{f} missing; stderr:\n{err}");
    }
    assert!(std::fs::read_dir(&out).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with("events.out.tfevents.")));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let train: Vec<&serde_json::Value> = rows.iter().filter(|r| r.get("loss").is_some()).collect();
    assert_eq!(train.len(), 6, "{rows:?}");
    assert!(train.iter().all(|r| r["lr"].as_f64().is_some() && r["tokens_per_s"].as_f64().unwrap() > 0.0));
    assert_eq!(rows.iter().filter(|r| r.get("eval_loss").is_some()).count(), 2);
    assert!(err.contains("step 6/6"), "progress lines: {err}");
    // The saved adapter is a PEFT folder temper reads back.
    let (ok, _, e) = temper(&["generate", "--model", fixture("models/llama_gqa_llama3rope").to_str().unwrap(), "--adapter", out.to_str().unwrap(), "--prompt-ids", "1,5,6", "--max-new-tokens", "3", "--greedy"]);
    assert!(ok, "{e}");
    // Resuming a finished run does nothing more and reproduces its last loss row.
    let (ok, _, err2) = temper(&["train", cfg.to_str().unwrap(), "--resume", "--progress", "off"]);
    assert!(ok, "{err2}");
}

#[test]
fn data_preview_shows_masks() {
    let dir = scratch_dir("cli-preview");
    let cfg = write_config(&dir, &write_data(&dir, 5), "");
    let (ok, out, err) = temper(&["data", "preview", cfg.to_str().unwrap(), "--n", "2", "--json"]);
    assert!(ok, "{err}");
    let rows: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    let (ids, labels) = (rows[0]["input_ids"].as_array().unwrap(), rows[0]["labels"].as_array().unwrap());
    assert_eq!(ids.len(), labels.len());
    // The user turn is masked, the assistant reply and its <|im_end|> (id 2) are trained.
    assert_eq!(labels[0], -100);
    let trained: Vec<i64> = labels.iter().filter_map(|v| v.as_i64()).filter(|&v| v != -100).collect();
    assert_eq!(*trained.last().unwrap(), 2, "{rows:?}");
    assert!(rows[0]["text"].as_str().unwrap().contains("say 0"));
}

#[test]
fn bad_configs_name_the_key() {
    let dir = scratch_dir("cli-bad-config");
    let data = write_data(&dir, 10);
    let run = |extra: &str| {
        let cfg = write_config(&dir, &data, extra);
        let (ok, _, err) = temper(&["train", cfg.to_str().unwrap(), "--progress", "off"]);
        assert!(!ok);
        err
    };
    let e = run("learning_rat = 1.0");
    assert!(e.contains("learning_rat") && e.contains("train.toml"), "{e}");
    let e = run("num_epochs = 2");
    assert!(e.contains("max_steps") && e.contains("num_epochs"), "{e}");
    if !temper::backend::cuda::available() {
        let e = run("device = \"cuda\"");
        assert!(e.contains("`device`") && e.contains("no CUDA driver"), "{e}");
    }
    let e = run("device = \"tpu\"");
    assert!(e.contains("`device`") && e.contains("tpu"), "{e}");
    let e = run("bf16 = true");
    assert!(e.contains("`bf16`"), "{e}");
    let e = run("lr_scheduler = \"exp\"");
    assert!(e.contains("lr_scheduler") && e.contains("exp"), "{e}");
    let e = run("load_in_4bit = true\nbnb_4bit_blocksize = 48");
    assert!(e.contains("bnb_4bit_blocksize") && e.contains("48"), "{e}");
    let e = run("load_in_4bit = true\nbnb_4bit_quant_type = \"int4\"");
    assert!(e.contains("bnb_4bit_quant_type") && e.contains("int4"), "{e}");
    let e = run("bnb_4bit_compute_dtype = \"bfloat16\"");
    assert!(e.contains("bnb_4bit_compute_dtype"), "{e}");
    let cfg = std::fs::read_to_string(write_config(&dir, &data, "load_in_4bit = true")).unwrap().replace("kind = \"lora\"", "kind = \"none\"");
    std::fs::write(dir.join("q.toml"), cfg).unwrap();
    let (ok, _, e) = temper(&["train", dir.join("q.toml").to_str().unwrap()]);
    assert!(!ok && e.contains("load_in_4bit") && e.contains("frozen"), "{e}");
}

/// QLoRA end to end: `adapter.kind = "qlora"` trains LoRA on an NF4 base quantised on load, the
/// loss falls, the adapter records its base's quantisation, and `temper merge` merges into
/// dequant(W4), reporting the distance from merging into the original weights.
#[test]
fn qlora_trains_on_a_4bit_base_and_merges_into_it() {
    let dir = scratch_dir("cli-qlora");
    let cfg = write_config(&dir, &write_data(&dir, 60), "bnb_4bit_blocksize = 32");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("kind = \"lora\"", "kind = \"qlora\"").replace("max_steps = 6", "max_steps = 12");
    std::fs::write(&cfg, text).unwrap();
    let (ok, _, err) = temper(&["train", cfg.to_str().unwrap(), "--progress", "off"]);
    assert!(ok, "{err}");
    let out = dir.join("out");
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let losses: Vec<f64> = rows.iter().filter_map(|r| r.get("loss").and_then(|l| l.as_f64())).collect();
    assert_eq!(losses.len(), 12);
    let (first, last) = (losses[..3].iter().sum::<f64>() / 3.0, losses[9..].iter().sum::<f64>() / 3.0);
    assert!(last < 0.9 * first, "QLoRA loss did not fall: {losses:?}");
    let side: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("temper_quantization.json")).unwrap()).unwrap();
    assert_eq!(side, serde_json::json!({"load_in_4bit": true, "bnb_4bit_quant_type": "nf4", "bnb_4bit_blocksize": 32, "bnb_4bit_use_double_quant": true}));

    let base = fixture("models/llama_gqa_llama3rope");
    let merged = dir.join("merged");
    let (ok, _, err) = temper(&["merge", base.to_str().unwrap(), out.to_str().unwrap(), "--out", merged.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(err.contains("merged into dequant(W4) of 14 quantised layers"), "{err}");
    let report = err.lines().find(|l| l.contains("vs merging into the original weights")).unwrap_or_else(|| panic!("no report: {err}"));
    let num = |key: &str| -> f64 { report.split(key).nth(1).unwrap().split_whitespace().next().unwrap().trim_end_matches(',').parse().unwrap() };
    let (max_abs, rel) = (num("max |Δw| "), num("relative ‖Δw‖ "));
    // NF4 rounding: nonzero, and a few percent of the weights' norm (each value moves at most
    // 0.139 × its block's absmax, half the widest gap of the NF4 table).
    assert!(max_abs > 0.0 && rel > 0.005 && rel < 0.2, "{report}");
    // The merged model is dense and gives the 4-bit model-plus-adapter's outputs.
    let ids = "1,5,6,7";
    let (ok, a, e1) = temper(&["generate", "--model", merged.to_str().unwrap(), "--prompt-ids", ids, "--max-new-tokens", "4", "--greedy"]);
    let (ok2, b, e2) = temper(&["generate", "--model", base.to_str().unwrap(), "--load-in-4bit", "--blocksize", "32", "--adapter", out.to_str().unwrap(), "--prompt-ids", ids, "--max-new-tokens", "4", "--greedy"]);
    assert!(ok && ok2, "{e1}\n{e2}");
    assert_eq!(a, b, "merged model vs 4-bit base + adapter");
}

#[test]
fn bad_data_and_environment_are_reported_with_the_place() {
    let dir = scratch_dir("cli-bad-data");
    let data = write_data(&dir, 10);
    let mut text = std::fs::read_to_string(&data).unwrap();
    text.push_str("{\"messages\": [oops\n");
    std::fs::write(&data, text).unwrap();
    let cfg = write_config(&dir, &data, "");
    let (ok, _, e) = temper(&["train", cfg.to_str().unwrap(), "--progress", "off"]);
    assert!(!ok && e.contains("chat.jsonl:11"), "{e}");
    // A tokenizer whose vocabulary does not fit the model.
    let big = dir.join("bigtok");
    std::fs::create_dir_all(&big).unwrap();
    let mut t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("tokenizers/tiny_chat/tokenizer.json")).unwrap()).unwrap();
    for i in 0..200 {
        t["model"]["vocab"][format!("extra{i}")] = serde_json::json!(100 + i);
    }
    std::fs::write(big.join("tokenizer.json"), t.to_string()).unwrap();
    std::fs::copy(fixture("tokenizers/tiny_chat/tokenizer_config.json"), big.join("tokenizer_config.json")).unwrap();
    let good = write_data(&dir, 10);
    let cfg = std::fs::read_to_string(write_config(&dir, &good, "")).unwrap().replace(&fixture("tokenizers/tiny_chat").display().to_string(), &big.display().to_string());
    std::fs::write(dir.join("big.toml"), cfg).unwrap();
    let (ok, _, e) = temper(&["train", dir.join("big.toml").to_str().unwrap(), "--progress", "off"]);
    assert!(!ok && e.contains("vocabulary"), "{e}");
    // An output folder that cannot be created.
    let blocker = dir.join("file");
    std::fs::write(&blocker, "x").unwrap();
    let cfg = std::fs::read_to_string(write_config(&dir, &good, "")).unwrap().replace(&dir.join("out").display().to_string(), &blocker.join("out").display().to_string());
    std::fs::write(dir.join("blocked.toml"), cfg).unwrap();
    let (ok, _, e) = temper(&["train", dir.join("blocked.toml").to_str().unwrap(), "--progress", "off"]);
    assert!(!ok && e.contains(&blocker.display().to_string()), "{e}");
}

#[test]
fn full_fine_tuning_writes_a_hugging_face_model_and_builtin_templates_render() {
    let dir = scratch_dir("cli-full");
    let cfg = write_config(&dir, &write_data(&dir, 20), "chat_template = \"chatml\"");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("kind = \"lora\"", "kind = \"none\"").replace("max_steps = 6", "max_steps = 2").replace("eval_steps = 3", "eval_steps = 2").replace("save_steps = 3", "save_steps = 2");
    std::fs::write(&cfg, text).unwrap();
    let (ok, _, err) = temper(&["train", cfg.to_str().unwrap(), "--progress", "off"]);
    assert!(ok, "{err}");
    let out = dir.join("out");
    assert!(out.join("config.json").exists() && out.join("model.safetensors").exists() && out.join("checkpoint-2/model.safetensors").exists());
    // The fine-tuned model loads as a plain Hugging Face folder and differs from the base.
    let tuned = temper::models::Llama::load(&out, temper::DType::F32).unwrap();
    let base = temper::models::Llama::load(&fixture("models/llama_gqa_llama3rope"), temper::DType::F32).unwrap();
    let ids = temper::Tensor::from_vec(vec![1i64, 5, 9], &[1, 3], temper::Device::Cpu).unwrap();
    let f = |m: &temper::models::Llama| m.forward(&temper::models::ForwardInput::ids(ids.clone())).unwrap().to_vec::<f32>().unwrap();
    assert_ne!(f(&tuned), f(&base));
    // The built-in ChatML template renders as the ChatML the tiny tokenizer ships.
    let msgs = [temper::chat_template::ChatMessage::new("user", "Hi"), temper::chat_template::ChatMessage::new("assistant", "Yo")];
    let builtin = temper::chat_template::builtin_template("chatml").unwrap();
    let shipped = temper::tokenizer::Tokenizer::from_hf_dir(&fixture("tokenizers/tiny_chat")).unwrap().chat_template.unwrap();
    for gen in [false, true] {
        assert_eq!(
            temper::chat_template::render_chat(builtin, &msgs, gen, None, None).unwrap(),
            temper::chat_template::render_chat(&shipped, &msgs, gen, None, None).unwrap()
        );
    }
    assert_eq!(
        temper::chat_template::render_chat(temper::chat_template::builtin_template("llama3").unwrap(), &msgs[..1], true, Some("<|begin_of_text|>"), None).unwrap(),
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let e = temper::chat_template::render_chat(temper::chat_template::builtin_template("mistral").unwrap(), &[temper::chat_template::ChatMessage::new("tool", "x")], false, Some("<s>"), Some("</s>")).unwrap_err();
    assert!(e.to_string().contains("unknown role tool"), "{e}");
}
