//! PEFT LoRA adapters applied by temper against PEFT itself (fixtures written by
//! `tools/gen_peft_fixture.py`): logits, loss and the gradient of every LoRA tensor, for plain LoRA and
//! rsLoRA on all linear layers; and through the CLI's `--adapter`.

mod common;

use common::{fixture, relative_error, scratch_dir, temper};
use temper::adapters::PeftLoraAdapter;
use temper::formats::safetensors::SafetensorsFiles;
use temper::models::{ForwardInput, Llama};
use temper::DType;

const ADAPTERS: [&str; 2] = ["llama_lora", "llama_rslora"];


#[test]
fn lora_logits_loss_and_gradients_match_peft() {
    for name in ADAPTERS {
        let dir = fixture(&format!("adapters/{name}"));
        let r = SafetensorsFiles::open_files(&[dir.join("reference.safetensors")]).unwrap();
        let mut model = Llama::load(&fixture("models/llama_gqa_llama3rope"), DType::F32).unwrap();
        let adapter = PeftLoraAdapter::load(&dir, DType::F32).unwrap();
        model.attach_lora(&adapter).unwrap();
        model.set_trainable(&|_| false).unwrap();
        model.set_adapter_trainable(&|_| true);
        let input = ForwardInput {
            input_ids: r.load("input_ids").unwrap(),
            attention_mask: Some(r.load("attention_mask").unwrap()),
            position_ids: None,
            segment_ids: None,
        };
        let logits = model.forward(&input).unwrap();
        let got = logits.to_f64_vec().unwrap();
        let want = r.load("logits").unwrap().to_f64_vec().unwrap();
        let mask = r.load("attention_mask").unwrap().to_vec::<i64>().unwrap();
        let worst = (0..mask.len()).filter(|&p| mask[p] == 1).flat_map(|p| (0..128).map(move |v| p * 128 + v)).map(|i| (got[i] - want[i]).abs()).fold(0.0, f64::max);
        assert!(worst <= 1e-4, "{name}: logits max abs error {worst:e}");
        let loss = Llama::loss(&logits, &r.load("labels").unwrap()).unwrap();
        let want_loss = r.load("loss").unwrap().to_scalar().unwrap();
        assert!((loss.to_scalar().unwrap() - want_loss).abs() <= 1e-5, "{name}: loss");
        let grads = loss.backward().unwrap();
        let params = model.adapter_parameters();
        assert_eq!(params.len(), 2 * adapter.deltas.len());
        for (key, p) in params {
            let g = grads.get(&p).unwrap_or_else(|| panic!("{name}: no gradient for {key}")).to_f64_vec().unwrap();
            let want = r.load(&format!("grad.{key}")).unwrap().to_f64_vec().unwrap();
            let err = relative_error(&g, &want);
            assert!(err <= 1e-3, "{name}: gradient of {key}: relative error {err:e}");
        }
        // The base stays frozen: no base parameter received a gradient.
        assert!(model.named_parameters().iter().all(|(_, t)| grads.get(t).is_none()));
    }
}

#[test]
fn cli_forward_with_adapter_writes_peft_named_gradients() {
    let dir = fixture("adapters/llama_lora");
    let refs = dir.join("reference.safetensors");
    let out = scratch_dir("cli-adapter").join("out.safetensors");
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    let (ok, _, err) = temper(&[
        "forward", "--model", fixture("models/llama_gqa_llama3rope").to_str().unwrap(), "--adapter", dir.to_str().unwrap(),
        "--inputs", refs.to_str().unwrap(), "--out", out.to_str().unwrap(), "--grads", key,
    ]);
    assert!(ok, "{err}");
    let got = SafetensorsFiles::open_files(&[out]).unwrap();
    let want = SafetensorsFiles::open_files(&[refs]).unwrap();
    let g = got.load(&format!("grad.{key}")).unwrap().to_f64_vec().unwrap();
    let w = want.load(&format!("grad.{key}")).unwrap().to_f64_vec().unwrap();
    assert!(relative_error(&g, &w) < 1e-3);
    let (ok, _, err) = temper(&[
        "forward", "--model", fixture("models/llama_gqa_llama3rope").to_str().unwrap(), "--adapter", dir.to_str().unwrap(),
        "--inputs", fixture("adapters/llama_lora/reference.safetensors").to_str().unwrap(), "--out", "/tmp/never.safetensors",
        "--grads", "model.norm.weight",
    ]);
    assert!(!ok && err.contains("the adapter has no parameter `model.norm.weight`"), "{err}");
}

#[test]
fn adapter_that_does_not_fit_the_model_is_named() {
    // The rsLoRA adapter targets every linear of a hidden-32 model; a model with another width must be refused.
    let dir = fixture("adapters/llama_rslora");
    let adapter = PeftLoraAdapter::load(&dir, DType::F32).unwrap();
    let mut other = Llama::load(&fixture("models/qwen3_qknorm"), DType::F32).unwrap();
    let e = other.attach_lora(&adapter).unwrap_err().to_string();
    assert!(e.contains("lora_A") && e.contains("adapter_model.safetensors") && e.contains("do not fit"), "{e}");
    let bad = scratch_dir("bad-adapter");
    std::fs::copy(dir.join("adapter_model.safetensors"), bad.join("adapter_model.safetensors")).unwrap();
    std::fs::write(bad.join("adapter_config.json"), r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": true}"#).unwrap();
    let e = PeftLoraAdapter::load(&bad, DType::F32).unwrap_err().to_string();
    assert!(e.contains("adapter_config.json") && e.contains("use_dora"), "{e}");
}

#[test]
fn generation_with_an_adapter_uses_it() {
    let model = fixture("models/llama_gqa_llama3rope");
    let dir = fixture("adapters/llama_rslora");
    let args = |adapter: bool| {
        let mut a = vec!["generate", "--model", model.to_str().unwrap(), "--prompt-ids", "1,7,9,30,4", "--max-new-tokens", "6", "--greedy", "--json"];
        if adapter {
            a.extend(["--adapter", dir.to_str().unwrap()]);
        }
        let (ok, out, err) = temper(&a);
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["token_ids"].clone()
    };
    // Greedy continuation with the adapter equals the library path with the adapter attached.
    let mut m = Llama::load(&model, DType::F32).unwrap();
    m.attach_lora(&PeftLoraAdapter::load(&dir, DType::F32).unwrap()).unwrap();
    let cfg = temper::generate::GenerationConfig { max_new_tokens: 6, eos_token_ids: vec![2], ..Default::default() };
    let lib = temper::generate::generate(&m, &[vec![1, 7, 9, 30, 4]], &cfg, None).unwrap();
    let with = args(true);
    assert_eq!(with, serde_json::json!(lib.tokens[0]));
    assert_ne!(with, args(false), "the adapter changes the continuation");
}
