//! The data pipeline: chat templates rendered, tokenized and masked as transformers does
//! (fixtures from tools/gen_chat_fixtures.py; the token-level checks use the SmolLM2 tokenizer
//! and skip when assets/ is absent), every format, the errors with their `file:line`, the
//! over-long policies, and packing that leaves loss and gradients unchanged.

mod common;

use std::path::{Path, PathBuf};

use serde_json::Value;
use temper::chat_template::{render_chat, ChatMessage};
use temper::data::chat::{prepare_template, render_trained};
use temper::data::format::Turn;
use temper::data::{self, DatasetSpec, Example, Format, TokenizeOptions, TooLong, TrainOn};
use temper::formats::gguf::GgufFile;
use temper::models::Llama;
use temper::tokenizer::Tokenizer;
use temper::{DType, ModuleExt};

/// A word-level tokenizer with ChatML's special tokens, written into a scratch folder.
fn tiny_tokenizer(name: &str) -> Tokenizer {
    let words = ["[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "hi", "hello", "there", "a", "b", "c", "d", "e"];
    let vocab: serde_json::Map<String, Value> = words.iter().enumerate().map(|(i, w)| (w.to_string(), Value::from(i))).collect();
    let tj = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            {"id": 1, "content": "<|im_start|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "<|im_end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    let chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let tc = serde_json::json!({"eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "chat_template": chatml});
    let dir = common::scratch_dir(name);
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
    Tokenizer::from_hf_dir(&dir).unwrap()
}

fn write(name: &str, file: &str, text: &str) -> PathBuf {
    let p = common::scratch_dir(name).join(file);
    std::fs::write(&p, text).unwrap();
    p
}

fn load(path: &Path, format: Format, tok: &Tokenizer, opts: &TokenizeOptions) -> temper::Result<(Vec<Example>, data::DataReport)> {
    data::load(&DatasetSpec::new(path, format), tok, opts)
}

fn smollm2_tokenizer() -> Option<Tokenizer> {
    let p = common::smollm2()?;
    Some(Tokenizer::from_gguf(&GgufFile::open(&p).unwrap()).unwrap())
}

fn cases() -> Value {
    serde_json::from_str(&std::fs::read_to_string(common::fixture("chat/cases.json")).unwrap()).unwrap()
}

fn template(name: &str) -> String {
    std::fs::read_to_string(common::fixture(&format!("chat/templates/{name}.jinja"))).unwrap()
}

fn messages(v: &Value) -> Vec<ChatMessage> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn templates_render_the_text_transformers_renders_and_train_the_same_spans() {
    let all = cases();
    let (bos, eos) = (all["bos_token"].as_str(), all["eos_token"].as_str());
    for c in all["cases"].as_array().unwrap() {
        let what = format!("{} / {}", c["template"], c["conversation"]);
        let tpl = prepare_template(&template(c["template"].as_str().unwrap()));
        let msgs = messages(&c["messages"]);
        assert_eq!(render_chat(&tpl, &msgs, false, bos, eos).unwrap(), c["text"].as_str().unwrap(), "{what}: training text");
        let prompt = &msgs[..msgs.len() - 1];
        assert_eq!(render_chat(&tpl, prompt, true, bos, eos).unwrap(), c["prompt_text"].as_str().unwrap(), "{what}: prompt text");
        let turns: Vec<Turn> = msgs.iter().map(|m| Turn { message: m.clone(), train: None }).collect();
        let r = render_trained(&tpl, &turns, TrainOn::Assistant, bos, eos).unwrap();
        let pieces: Vec<&str> = r.trained.iter().map(|s| &r.text[s.clone()]).collect();
        let want: Vec<&str> = c["trained_text"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
        assert_eq!(pieces, want, "{what}: trained text");
    }
}

/// Cases where temper's SmolLM2 tokenizer (runtime/src/tokenizer.rs, built from the GGUF) splits
/// the rendered text differently from transformers' GGUF tokenizer: `>\n\n` followed by a digit
/// gives `\n\n` (1116) here and `\n`,`\n` (198, 198) there. A tokenizer matter, not the data
/// pipeline's: every case must give exactly the tokenizer's ids, and only these may differ from
/// transformers'. When the tokenizer is fixed this test fails until the list is emptied.
const KNOWN_TOKENIZER_DIVERGENCE: [&str; 2] = ["qwen3 / single", "llama3.1 / single"];

#[test]
fn chat_ids_and_assistant_masks_match_transformers_with_the_smollm2_tokenizer() {
    let Some(tok) = smollm2_tokenizer() else { return };
    let mut diverging = Vec::new();
    for c in cases()["cases"].as_array().unwrap() {
        let what = format!("{} / {}", c["template"].as_str().unwrap(), c["conversation"].as_str().unwrap());
        let line = serde_json::json!({"messages": c["messages"]}).to_string();
        let path = write("chat-ids", "c.jsonl", &line);
        let opts = TokenizeOptions { chat_template: Some(template(c["template"].as_str().unwrap())), ..TokenizeOptions::new(4096) };
        let (ex, rep) = load(&path, Format::Chat, &tok, &opts).unwrap();
        assert_eq!(rep.kept, 1, "{what}");
        for (&l, &i) in ex[0].labels.iter().zip(&ex[0].input_ids) {
            assert!(l == -100 || l == i as i64);
        }
        let ids: Vec<u32> = serde_json::from_value(c["input_ids"].clone()).unwrap();
        assert_eq!(ex[0].input_ids, tok.encode(c["text"].as_str().unwrap(), false).unwrap(), "{what}: ids are the tokenizer's");
        if ex[0].input_ids != ids {
            diverging.push(what);
            continue;
        }
        assert_eq!(ex[0].input_ids, ids, "{what}: ids");
        let mut mask: Vec<u8> = serde_json::from_value(c["assistant_mask"].clone()).unwrap();
        mask[0] = 0; // the first label is never predicted
        let got: Vec<u8> = ex[0].labels.iter().map(|&l| (l != -100) as u8).collect();
        assert_eq!(got, mask, "{what}: mask ({})", c["mask_source"]);
        let prompt_ids: Vec<u32> = serde_json::from_value(c["prompt_ids"].clone()).unwrap();
        assert_eq!(tok.encode(c["prompt_text"].as_str().unwrap(), false).unwrap(), prompt_ids, "{what}: prompt ids");
    }
    assert_eq!(diverging, KNOWN_TOKENIZER_DIVERGENCE, "cases where temper's tokenizer and transformers' disagree");
}

#[test]
fn train_on_selects_all_last_turn_or_flagged_messages() {
    let tok = tiny_tokenizer("train-on");
    let rec = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c", "train": true}, {"role": "assistant", "content": "d", "train": false}]}"#;
    let path = write("train-on", "d.jsonl", rec);
    let trained = |on: TrainOn| {
        let spec = DatasetSpec { train_on: on, ..DatasetSpec::new(&path, Format::Chat) };
        let (ex, _) = data::load(&spec, &tok, &TokenizeOptions::new(64)).unwrap();
        ex[0].labels.iter().filter(|&&l| l != -100).map(|&l| tok.id_to_token(l as u32).unwrap()).collect::<Vec<_>>().join(" ")
    };
    assert_eq!(trained(TrainOn::Assistant), "b <|im_end|> d <|im_end|>");
    assert_eq!(trained(TrainOn::LastTurn), "d <|im_end|>");
    assert_eq!(trained(TrainOn::PerMessage), "b <|im_end|> c <|im_end|>");
    // All: every token but the first, which nothing predicts.
    assert_eq!(trained(TrainOn::All).split(' ').count(), 15);
}

#[test]
fn every_format_reads_from_jsonl_and_json_arrays() {
    let tok = tiny_tokenizer("formats");
    let opts = TokenizeOptions::new(64);
    let one = |format: Format, file: &str, text: &str| {
        let (ex, rep) = load(&write("formats", file, text), format, &tok, &opts).unwrap();
        assert_eq!(rep.kept, 1, "{format:?}");
        ex.into_iter().next().unwrap()
    };
    let e = one(Format::ShareGpt, "s.json", r#"[{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]"#);
    assert_eq!(e.source.rsplit('/').next().unwrap(), "s.json:1");
    assert_eq!(e.target_tokens(), 2); // hello <|im_end|>
    let e = one(Format::Alpaca, "a.jsonl", r#"{"instruction": "hi", "input": "there", "output": "hello"}"#);
    assert_eq!(tok.decode(&e.input_ids, false).unwrap(), "<|im_start|> user hi there <|im_end|> <|im_start|> assistant hello <|im_end|>");
    let e = one(Format::Completion, "t.jsonl", r#"{"text": "a b c"}"#);
    assert_eq!((e.input_ids.clone(), e.labels.clone()), (vec![9, 10, 11, 2], vec![-100, 10, 11, 2]));
    let e = one(Format::InputOutput, "io.jsonl", r#"{"segments": [{"text": "a b", "label": false}, {"text": "c", "label": true}]}"#);
    assert_eq!((e.input_ids.clone(), e.labels.clone()), (vec![9, 10, 11, 2], vec![-100, -100, 11, 2]));
    let e = one(Format::Tokenized, "k.jsonl", r#"{"input_ids": [3, 4, 5], "labels": [-100, -100, 5]}"#);
    assert_eq!(e.labels, [-100, -100, 5]);
}

#[test]
fn parquet_rows_are_records() {
    let tok = tiny_tokenizer("parquet");
    let (ex, rep) = load(&common::fixture("chat/sharegpt.parquet"), Format::ShareGpt, &tok, &TokenizeOptions::new(64)).unwrap();
    assert_eq!((rep.read, rep.kept), (2, 2));
    assert!(ex[1].source.ends_with("sharegpt.parquet:2"));
    assert_eq!(tok.decode(&ex[1].input_ids, false).unwrap(), "<|im_start|> user a <|im_end|> <|im_start|> assistant b <|im_end|>");
}

#[test]
fn bad_records_are_errors_naming_file_line_and_key() {
    let tok = tiny_tokenizer("errors");
    let opts = TokenizeOptions::new(64);
    let ok = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;
    let fail = |text: String, format: Format, opts: &TokenizeOptions| {
        let path = write("errors", "e.jsonl", &text);
        let e = load(&path, format, &tok, opts).unwrap_err().to_string();
        let prefix = format!("{}:2: ", path.display());
        assert!(e.starts_with(&prefix), "{e}");
        e[prefix.len()..].to_string()
    };
    assert!(fail(format!("{ok}\n{{\"messages\": [\n"), Format::Chat, &opts).starts_with("malformed JSON line"));
    assert_eq!(
        fail(format!("{ok}\n{}", ok.replace("\"user\"", "\"human\"")), Format::Chat, &opts),
        "message 0: unknown role `human` in field `role` (known: system, user, assistant, tool)"
    );
    assert_eq!(fail(format!("{ok}\n{{\"msgs\": []}}"), Format::Chat, &opts), "missing field `messages` (the list of messages)");
    assert_eq!(fail(format!("{ok}\n{}", ok.replace("\"hello\"", "\"\"")), Format::Chat, &opts), "message 1: empty assistant turn");
    let bad = TokenizeOptions { chat_template: Some("{{ raise_exception('no system role') }}".into()), ..opts.clone() };
    let path = write("errors", "t.jsonl", ok);
    let e = load(&path, Format::Chat, &tok, &bad).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}:1: chat template failed", path.display())) && e.contains("no system role"), "{e}");
}

#[test]
fn over_long_examples_are_truncated_or_dropped_and_untrained_ones_reported() {
    let tok = tiny_tokenizer("too-long");
    let path = write("too-long", "t.jsonl", "{\"text\": \"a b c d e\"}\n{\"text\": \"a b\"}\n{\"text\": \"a\"}\n");
    let opts = TokenizeOptions { add_eos: false, ..TokenizeOptions::new(3) };
    let (ex, rep) = load(&path, Format::Completion, &tok, &opts).unwrap();
    assert_eq!((rep.read, rep.kept, rep.dropped_too_long, rep.truncated, rep.target_tokens), (3, 1, 1, 0, 1));
    assert_eq!(rep.dropped_no_target, [format!("{}:3", path.display())]);
    assert_eq!(ex[0].input_ids, [9, 10]);
    let (ex, rep) = load(&path, Format::Completion, &tok, &TokenizeOptions { too_long: TooLong::Truncate, ..opts }).unwrap();
    assert_eq!((rep.kept, rep.dropped_too_long, rep.truncated), (2, 0, 1));
    assert_eq!(ex[0].input_ids, [9, 10, 11]);
}

#[test]
fn preview_brackets_masked_text_or_prints_json_lines() {
    let tok = tiny_tokenizer("preview");
    let ex = Example { input_ids: vec![3, 6, 4, 7], labels: vec![-100, -100, -100, 7], source: "d.jsonl:1".into() };
    let text = data::preview(std::slice::from_ref(&ex), &tok, 5, false).unwrap();
    assert_eq!(text, ["== d.jsonl:1 (4 tokens, 1 trained) ==\n⟦user hi assistant⟧hello"]);
    let json: Value = serde_json::from_str(&data::preview(&[ex], &tok, 5, true).unwrap()[0]).unwrap();
    assert_eq!(json["labels"], serde_json::json!([-100, -100, -100, 7]));
}

/// Mean cross-entropy over target tokens and the gradient of the final norm's weight.
fn loss_and_grad(model: &Llama, batch: &temper::train::Batch) -> (f32, Vec<f32>) {
    let logits = model.forward(&batch.input).unwrap();
    let loss = Llama::loss(&logits, &batch.labels).unwrap();
    let grads = loss.backward().unwrap();
    let w = model.named_parameters().into_iter().find(|(n, _)| n == "model.norm.weight").unwrap().1;
    (loss.to_vec::<f32>().unwrap()[0], grads.get(&w).unwrap().to_vec::<f32>().unwrap())
}

#[test]
fn packed_loss_and_gradients_equal_unpacked() {
    let mut model = Llama::load(Path::new("tests/fixtures/models/llama_gqa_llama3rope"), DType::F32).unwrap();
    model.unfreeze("model.norm.weight").unwrap();
    let mut rng = temper::rng::Rng::new(3);
    let examples: Vec<Example> = [5usize, 9, 3, 7, 6, 4]
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            let input_ids: Vec<u32> = (0..n).map(|_| 1 + rng.below(127) as u32).collect();
            // A prompt of two tokens, then targets.
            let labels = input_ids.iter().enumerate().map(|(t, &i)| if t < 2 { -100 } else { i as i64 }).collect();
            Example { input_ids, labels, source: format!("x:{k}") }
        })
        .collect();
    let unpacked = data::batches(&examples, examples.len(), 0).unwrap();
    let rows = data::pack(&examples, 12).unwrap();
    assert!(rows.len() < examples.len());
    let packed = data::packed_batches(&rows, rows.len(), 0).unwrap();
    let (lu, gu) = loss_and_grad(&model, &unpacked[0]);
    let (lp, gp) = loss_and_grad(&model, &packed[0]);
    assert!((lu - lp).abs() < 1e-5, "loss unpacked {lu} packed {lp}");
    let scale = gu.iter().fold(0f32, |m, x| m.max(x.abs()));
    for (i, (a, b)) in gu.iter().zip(&gp).enumerate() {
        assert!((a - b).abs() <= 1e-5 * scale.max(1.0), "grad[{i}]: unpacked {a} packed {b}");
    }
}
