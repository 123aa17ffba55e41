//! The CLI's exact forms and what it does with bad input: each mistake gets a clear error naming the
//! file, tensor or key, a failing exit code, and never a panic.

mod common;

use common::{copy_model, fixture, scratch_dir, temper};
use std::path::Path;
use temper::formats::safetensors::{self as st, SafetensorsFiles};
use temper::{Device, Tensor};

fn assert_clean_error(r: (bool, String, String), must_mention: &[&str]) {
    let (ok, _, err) = r;
    assert!(!ok, "expected failure");
    assert!(!err.contains("panicked"), "panicked: {err}");
    for m in must_mention {
        assert!(err.contains(m), "error should mention {m:?}: {err}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn forward_writes_logits_loss_and_requested_gradients_matching_transformers() {
    let model = fixture("models/llama_gqa_llama3rope");
    let refs = model.join("reference.safetensors");
    let out = scratch_dir("cli-forward").join("out.safetensors");
    let names = "model.layers.1.mlp.down_proj.weight,model.norm.weight";
    let (ok, _, err) = temper(&["forward", "--model", s(&model), "--inputs", s(&refs), "--out", s(&out), "--grads", names]);
    assert!(ok, "{err}");
    let got = SafetensorsFiles::open_files(&[out]).unwrap();
    let want = SafetensorsFiles::open_files(&[refs]).unwrap();
    assert_eq!(got.load("logits").unwrap().shape(), &[2, 12, 128]);
    let loss = got.load("loss").unwrap().to_scalar().unwrap();
    assert!((loss - want.load("loss").unwrap().to_scalar().unwrap()).abs() < 1e-5);
    for n in names.split(',') {
        let g = got.load(&format!("grad.{n}")).unwrap().to_f64_vec().unwrap();
        let w = want.load(&format!("grad.{n}")).unwrap().to_f64_vec().unwrap();
        let err = common::relative_error(&g, &w);
        assert!(err < 1e-3, "{n}: {err}");
    }
    let names: Vec<String> = got.names().map(String::from).collect();
    assert_eq!(names.len(), 4, "logits, loss and two gradients: {names:?}");
}

#[test]
fn generate_prompt_ids_json_and_inspect() {
    let model = fixture("models/qwen2_bias");
    let (ok, out, err) = temper(&["generate", "--model", s(&model), "--prompt-ids", "1,5,9,3", "--max-new-tokens", "5", "--greedy", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let n = v["token_ids"].as_array().unwrap().len();
    assert!((1..=5).contains(&n), "{v}");
    let (ok, out, err) = temper(&["inspect", s(&model), "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["architecture"], "Qwen2ForCausalLM");
    // Tied: embed 128×32 + 2 layers + norm; the count must equal the checkpoint's elements.
    let files = SafetensorsFiles::open_dir(&model).unwrap();
    let total: usize = files.names().map(|n| files.info(n).unwrap().0.iter().product::<usize>()).sum();
    assert_eq!(v["parameters"].as_u64().unwrap() as usize, total);
}

#[test]
fn missing_model_folder_is_named() {
    assert_clean_error(temper(&["inspect", "/nonexistent/model"]), &["/nonexistent/model"]);
    assert_clean_error(
        temper(&["generate", "--model", "/nonexistent/model", "--prompt-ids", "1", "--max-new-tokens", "1"]),
        &["/nonexistent/model"],
    );
}

#[test]
fn corrupt_checkpoint_names_the_file() {
    let d = copy_model("llama_gqa_llama3rope", "corrupt");
    std::fs::write(d.join("model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    assert_clean_error(temper(&["generate", "--model", s(&d), "--prompt-ids", "1", "--max-new-tokens", "1"]), &["model.safetensors"]);
    std::fs::write(d.join("model.safetensors"), b"").unwrap();
    assert_clean_error(temper(&["generate", "--model", s(&d), "--prompt-ids", "1", "--max-new-tokens", "1"]), &["model.safetensors"]);
}

#[test]
fn missing_and_wrongly_shaped_tensors_are_named() {
    let d = copy_model("llama_gqa_llama3rope", "missing");
    let f = SafetensorsFiles::open_dir(&d).unwrap();
    let keep: Vec<(String, Tensor)> =
        f.names().filter(|n| *n != "model.layers.1.mlp.up_proj.weight").map(|n| (n.to_string(), f.load(n).unwrap())).collect();
    drop(f);
    st::save(&d.join("model.safetensors"), &keep, None).unwrap();
    assert_clean_error(temper(&["generate", "--model", s(&d), "--prompt-ids", "1", "--max-new-tokens", "1"]), &["model.layers.1.mlp.up_proj.weight", "model.safetensors"]);

    let d = copy_model("llama_gqa_llama3rope", "wrongshape");
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap().replace("\"intermediate_size\": 64", "\"intermediate_size\": 65");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    assert_clean_error(temper(&["generate", "--model", s(&d), "--prompt-ids", "1", "--max-new-tokens", "1"]), &["gate_proj.weight", "[64, 32]"]);
}

#[test]
fn unknown_architecture_and_bad_config_name_the_key() {
    let d = copy_model("llama_gqa_llama3rope", "arch");
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap().replace("LlamaForCausalLM", "GPTNeoXForCausalLM");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    assert_clean_error(temper(&["inspect", s(&d)]), &["config.json", "architectures", "GPTNeoXForCausalLM"]);
    std::fs::write(d.join("config.json"), "{").unwrap();
    assert_clean_error(temper(&["inspect", s(&d)]), &["config.json", "invalid JSON"]);
}

fn write_inputs(dir: &Path, tensors: Vec<(&str, Tensor)>) -> std::path::PathBuf {
    let p = dir.join("in.safetensors");
    st::save(&p, &tensors.into_iter().map(|(n, t)| (n.to_string(), t)).collect::<Vec<_>>(), None).unwrap();
    p
}

#[test]
fn bad_forward_inputs_are_named() {
    let model = fixture("models/llama_gqa_llama3rope");
    let d = scratch_dir("bad-inputs");
    let out = d.join("out.safetensors");
    let run = |inp: &Path| temper(&["forward", "--model", s(&model), "--inputs", s(inp), "--out", s(&out)]);

    let inp = write_inputs(&d, vec![("input_ids", Tensor::from_vec(vec![1i64, 500], &[1, 2], Device::Cpu).unwrap())]);
    assert_clean_error(run(&inp), &["token id 500", "vocabulary size 128"]);

    let inp = write_inputs(&d, vec![("input_ids", Tensor::from_vec(vec![1.0f32, 2.0], &[1, 2], Device::Cpu).unwrap())]);
    assert_clean_error(run(&inp), &["input_ids", "I64"]);

    let inp = write_inputs(&d, vec![("input_ids", Tensor::from_vec(Vec::<i64>::new(), &[1, 0], Device::Cpu).unwrap())]);
    assert_clean_error(run(&inp), &["empty"]);

    let inp = write_inputs(&d, vec![("labels", Tensor::from_vec(vec![1i64, 2], &[1, 2], Device::Cpu).unwrap())]);
    assert_clean_error(run(&inp), &["input_ids", "in.safetensors"]);

    let inp = write_inputs(
        &d,
        vec![
            ("input_ids", Tensor::from_vec(vec![1i64, 2, 3], &[1, 3], Device::Cpu).unwrap()),
            ("attention_mask", Tensor::from_vec(vec![1i64, 1], &[1, 2], Device::Cpu).unwrap()),
        ],
    );
    assert_clean_error(run(&inp), &["attention_mask", "[1, 2]"]);

    let inp = write_inputs(
        &d,
        vec![
            ("input_ids", Tensor::from_vec(vec![1i64, 2, 3], &[1, 3], Device::Cpu).unwrap()),
            ("labels", Tensor::from_vec(vec![-100i64, 2, 700], &[1, 3], Device::Cpu).unwrap()),
        ],
    );
    assert_clean_error(run(&inp), &["label 700"]);

    let inp = write_inputs(&d, vec![("input_ids", Tensor::from_vec(vec![1i64, 2], &[1, 2], Device::Cpu).unwrap())]);
    assert_clean_error(
        temper(&["forward", "--model", s(&model), "--inputs", s(&inp), "--out", s(&out), "--grads", "model.norm.weight"]),
        &["--grads needs `labels`"],
    );
    assert!(!out.exists(), "no output is written when the command fails");
}

#[test]
fn truncated_gguf_is_named() {
    let Some(path) = common::smollm2() else { return };
    let d = scratch_dir("truncated-gguf");
    let bytes = std::fs::read(&path).unwrap();
    let t = d.join("cut.gguf");
    std::fs::write(&t, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_error(temper(&["generate", "--model", s(&t), "--prompt-ids", "1", "--max-new-tokens", "1"]), &["cut.gguf"]);
    std::fs::write(&t, &bytes[..100]).unwrap();
    assert_clean_error(temper(&["inspect", s(&t)]), &["cut.gguf"]);
}
