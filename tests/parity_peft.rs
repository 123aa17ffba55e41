//! PEFT adapters in temper against PEFT itself (fixtures written by `tools/gen_peft_fixture.py`):
//! logits, loss and the gradient of every adapter tensor for LoRA, rsLoRA and DoRA; merging;
//! switching adapters off; saving in PEFT's format; and the CLI's `--adapter`.

mod common;

use common::{fixture, relative_error, scratch_dir, temper};
use temper::adapters::{Adapter, AdapterFormat, AdapterHost, Dora, Lora};
use temper::formats::safetensors::SafetensorsFiles;
use temper::models::{ForwardInput, Llama};
use temper::module::ModuleExt;
use temper::{DType, Tensor};

fn base() -> Llama {
    Llama::load(&fixture("models/llama_gqa_llama3rope"), DType::F32).unwrap()
}

fn reference(name: &str) -> SafetensorsFiles {
    SafetensorsFiles::open_files(&[fixture(&format!("adapters/{name}/reference.safetensors"))]).unwrap()
}

fn input(r: &SafetensorsFiles) -> ForwardInput {
    ForwardInput { input_ids: r.load("input_ids").unwrap(), attention_mask: Some(r.load("attention_mask").unwrap()), position_ids: None, segment_ids: None }
}

/// Largest |a − b| over the logits of real (unpadded) positions.
fn worst_logit_error(got: &Tensor, want: &Tensor, r: &SafetensorsFiles) -> f64 {
    let (got, want) = (got.to_f64_vec().unwrap(), want.to_f64_vec().unwrap());
    let mask = r.load("attention_mask").unwrap().to_vec::<i64>().unwrap();
    let v = got.len() / mask.len();
    (0..mask.len()).filter(|&p| mask[p] == 1).flat_map(|p| (0..v).map(move |i| p * v + i)).map(|i| (got[i] - want[i]).abs()).fold(0.0, f64::max)
}

fn loaded<A: AdapterFormat>(name: &str) -> Llama<A> {
    let mut m = base().into_adapter_type::<A>().unwrap();
    m.load_adapter::<A>(&fixture(&format!("adapters/{name}")), "default").unwrap();
    m
}

fn check_against_peft<A: AdapterFormat>(name: &str, tensors_per_layer: usize) {
    let r = reference(name);
    let mut model = loaded::<A>(name);
    model.unfreeze("\\.default\\.|\\.default$").unwrap();
    let logits = model.forward(&input(&r)).unwrap();
    let worst = worst_logit_error(&logits, &r.load("logits").unwrap(), &r);
    assert!(worst <= 1e-4, "{name}: logits max abs error {worst:e}");
    let loss = Llama::loss(&logits, &r.load("labels").unwrap()).unwrap();
    assert!((loss.to_scalar().unwrap() - r.load("loss").unwrap().to_scalar().unwrap()).abs() <= 1e-5, "{name}: loss");
    let grads = loss.backward().unwrap();
    let params = model.adapter_parameters("default");
    assert_eq!(params.len() % tensors_per_layer, 0);
    let mut worst_grad = 0.0f64;
    for (key, p) in &params {
        let g = grads.get(p).unwrap_or_else(|| panic!("{name}: no gradient for {key}")).to_f64_vec().unwrap();
        let want = r.load(&format!("grad.{key}")).unwrap().to_f64_vec().unwrap();
        let err = relative_error(&g, &want);
        assert!(err <= 1e-3, "{name}: gradient of {key}: relative error {err:e}");
        worst_grad = worst_grad.max(err);
    }
    eprintln!("{name}: max |Δlogit| {worst:.2e}, max gradient relative error {worst_grad:.2e} over {} tensors", params.len());
    // The base stays frozen: no base parameter received a gradient.
    assert!(model.base_parameters().iter().all(|(_, t)| grads.get(t).is_none()));
    // Merged into the weights, the model gives PEFT's merged logits; unmerged, the adapter's again.
    model.merge_adapter("default").unwrap();
    let merged = model.forward(&input(&r)).unwrap();
    let worst = worst_logit_error(&merged, &r.load("merged_logits").unwrap(), &r);
    assert!(worst <= 1e-4, "{name}: merged logits max abs error {worst:e}");
    assert!(model.reference_forward(&input(&r)).is_err(), "{name}: a merged adapter cannot be switched off");
    model.unmerge_adapter("default").unwrap();
    let worst = worst_logit_error(&model.forward(&input(&r)).unwrap(), &r.load("logits").unwrap(), &r);
    assert!(worst <= 1e-4, "{name}: unmerged logits max abs error {worst:e}");
    // With the adapter off the model is the base model, from the same weights.
    // (Unmerging rounds W + ΔW − ΔW in f32, hence a tolerance.)
    let base_logits = base().forward(&input(&r)).unwrap();
    let worst = worst_logit_error(&model.reference_forward(&input(&r)).unwrap(), &base_logits, &r);
    assert!(worst <= 1e-5, "{name}: reference logits differ from the base model's by {worst:e}");
    model.set_adapter_enabled("default", false).unwrap();
    let worst = worst_logit_error(&model.forward(&input(&r)).unwrap(), &base_logits, &r);
    assert!(worst <= 1e-5, "{name}: logits with the adapter disabled differ from the base model's by {worst:e}");
}

#[test]
fn lora_logits_loss_gradients_and_merge_match_peft() {
    check_against_peft::<Lora>("llama_lora", 2);
}

#[test]
fn rslora_logits_loss_gradients_and_merge_match_peft() {
    check_against_peft::<Lora>("llama_rslora", 2);
}

#[test]
fn dora_logits_loss_gradients_and_merge_match_peft() {
    check_against_peft::<Dora>("llama_dora", 3);
}

/// Saving writes PEFT's keys, shapes and config; loading it back gives the same model.
fn saved_adapter_round_trips<A: AdapterFormat>(name: &str) {
    let model = loaded::<A>(name);
    let dir = scratch_dir(&format!("saved-{name}"));
    model.save_adapter::<A>("default", &dir, Some("tests/fixtures/models/llama_gqa_llama3rope")).unwrap();
    let ours = SafetensorsFiles::open_files(&[dir.join("adapter_model.safetensors")]).unwrap();
    let peft = SafetensorsFiles::open_files(&[fixture(&format!("adapters/{name}/adapter_model.safetensors"))]).unwrap();
    let mut a: Vec<&str> = ours.names().collect();
    let mut b: Vec<&str> = peft.names().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "{name}: saved keys differ from PEFT's");
    for k in a {
        assert_eq!(ours.info(k).unwrap(), peft.info(k).unwrap(), "{name}: {k}");
        assert_eq!(ours.load(k).unwrap().to_vec::<f32>().unwrap(), peft.load(k).unwrap().to_vec::<f32>().unwrap(), "{name}: {k}");
    }
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    let theirs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture(&format!("adapters/{name}/adapter_config.json"))).unwrap()).unwrap();
    for key in ["peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "bias", "fan_in_fan_out"] {
        assert_eq!(cfg[key], theirs[key], "{name}: adapter_config.json `{key}`");
    }
    let mut again = base().into_adapter_type::<A>().unwrap();
    again.load_adapter::<A>(&dir, "default").unwrap();
    let r = reference(name);
    assert_eq!(again.forward(&input(&r)).unwrap().to_vec::<f32>().unwrap(), model.forward(&input(&r)).unwrap().to_vec::<f32>().unwrap());
}

#[test]
fn saved_adapters_have_peft_keys_and_load_back() {
    saved_adapter_round_trips::<Lora>("llama_lora");
    saved_adapter_round_trips::<Lora>("llama_rslora");
    saved_adapter_round_trips::<Dora>("llama_dora");
}

#[test]
fn cli_forward_with_adapter_writes_peft_named_gradients() {
    for (name, key) in [
        ("llama_lora", "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"),
        ("llama_dora", "base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"),
    ] {
        let dir = fixture(&format!("adapters/{name}"));
        let refs = dir.join("reference.safetensors");
        let out = scratch_dir(&format!("cli-adapter-{name}")).join("out.safetensors");
        let (ok, _, err) = temper(&[
            "forward", "--model", fixture("models/llama_gqa_llama3rope").to_str().unwrap(), "--adapter", dir.to_str().unwrap(),
            "--inputs", refs.to_str().unwrap(), "--out", out.to_str().unwrap(), "--grads", key,
        ]);
        assert!(ok, "{err}");
        let got = SafetensorsFiles::open_files(&[out]).unwrap();
        let want = SafetensorsFiles::open_files(&[refs]).unwrap();
        let g = got.load(&format!("grad.{key}")).unwrap().to_f64_vec().unwrap();
        let w = want.load(&format!("grad.{key}")).unwrap().to_f64_vec().unwrap();
        assert!(relative_error(&g, &w) < 1e-3, "{name}");
    }
    let dir = fixture("adapters/llama_lora");
    let (ok, _, err) = temper(&[
        "forward", "--model", fixture("models/llama_gqa_llama3rope").to_str().unwrap(), "--adapter", dir.to_str().unwrap(),
        "--inputs", dir.join("reference.safetensors").to_str().unwrap(), "--out", "/tmp/never.safetensors",
        "--grads", "model.norm.weight",
    ]);
    assert!(!ok && err.contains("the adapter has no parameter `model.norm.weight`"), "{err}");
}

#[test]
fn adapter_that_does_not_fit_the_model_is_named() {
    // The rsLoRA adapter targets every linear of a hidden-32 model; a model with another width must be refused.
    let dir = fixture("adapters/llama_rslora");
    let mut other = Llama::load(&fixture("models/qwen3_qknorm"), DType::F32).unwrap().into_adapter_type::<Lora>().unwrap();
    let e = other.load_adapter::<Lora>(&dir, "default").unwrap_err().to_string();
    assert!(e.contains("lora_B.weight") && e.contains("adapter_model.safetensors") && e.contains("needs [64, 2]"), "{e}");
    // A DoRA folder is refused by the LoRA loader with the key named, and the other way round.
    let mut m = base().into_adapter_type::<Lora>().unwrap();
    let e = m.load_adapter::<Lora>(&fixture("adapters/llama_dora"), "default").unwrap_err().to_string();
    assert!(e.contains("adapter_config.json") && e.contains("use_dora") && e.contains("`Dora`"), "{e}");
    let mut m = base().into_adapter_type::<Dora>().unwrap();
    let e = m.load_adapter::<Dora>(&fixture("adapters/llama_lora"), "default").unwrap_err().to_string();
    assert!(e.contains("use_dora") && e.contains("`Lora`"), "{e}");
    // A model whose layers carry another adapter type says so.
    let mut plain = base();
    let e = plain.load_adapter::<Lora>(&dir, "default").unwrap_err().to_string();
    assert!(e.contains("does not carry `Lora` adapters"), "{e}");
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
    let m = loaded::<Lora>("llama_rslora");
    let cfg = temper::generate::GenerationConfig { max_new_tokens: 6, eos_token_ids: vec![2], ..Default::default() };
    let lib = temper::generate::generate(&m, &[vec![1, 7, 9, 30, 4]], &cfg, None).unwrap();
    let with = args(true);
    assert_eq!(with, serde_json::json!(lib.tokens[0]));
    assert_ne!(with, args(false), "the adapter changes the continuation");
    let _ = <Lora as Adapter>::NAME;
}

/// OLoRA: temper's QR initialisation leaves PEFT's residual base weight and `s·B·A` (sign-free),
/// and an OLoRA folder PEFT saved loads onto a fresh base with PEFT's logits (the residual is
/// rebuilt on load, as PEFT does).
#[test]
fn olora_initialisation_and_reload_match_peft() {
    let r = reference("llama_olora");
    let cfg = Lora::config(2, 6.0).with(|h| h.init_lora_weights = temper::adapters::LoraInit::Olora).targets(temper::adapters::Targets::names(["q_proj", "down_proj"]));
    let m = base().with_adapter("default", &cfg).unwrap();
    let params: std::collections::HashMap<String, Tensor> = m.named_parameters().into_iter().collect();
    let mut checked = 0;
    for name in r.names().filter(|n| n.starts_with("residual.")) {
        let module = name.trim_start_matches("residual.").trim_end_matches(".weight");
        let got = params[&format!("{module}.weight")].to_f64_vec().unwrap();
        let err = relative_error(&got, &r.load(name).unwrap().to_f64_vec().unwrap());
        assert!(err < 1e-5, "{module}: residual weight differs from PEFT's by {err:e}");
        let a = &params[&format!("{module}.lora_A.default.weight")];
        let b = &params[&format!("{module}.lora_B.default.weight")];
        let ba = temper::ops::scale(&temper::ops::matmul(b, a, false, false).unwrap(), 3.0).unwrap().to_f64_vec().unwrap();
        let err = relative_error(&ba, &r.load(&format!("product.{module}")).unwrap().to_f64_vec().unwrap());
        assert!(err < 1e-5, "{module}: s·B·A differs from PEFT's by {err:e}");
        checked += 1;
    }
    assert_eq!(checked, 4);
    // At start the model is the base model: residual + s·B·A = W.
    let worst = worst_logit_error(&m.forward(&input(&r)).unwrap(), &base().forward(&input(&r)).unwrap(), &r);
    assert!(worst < 1e-4, "OLoRA changed the model at start by {worst:e}");
    let reloaded = loaded::<Lora>("llama_olora");
    let worst = worst_logit_error(&reloaded.forward(&input(&r)).unwrap(), &r.load("logits").unwrap(), &r);
    assert!(worst <= 1e-4, "reloaded OLoRA logits differ from PEFT's by {worst:e}");
}

#[test]
fn cli_merge_writes_a_model_with_peft_merged_outputs() {
    for name in ["llama_lora", "llama_dora"] {
        let out = scratch_dir(&format!("cli-merge-{name}"));
        // The issue's positional form for LoRA, the flag form for DoRA.
        let (base, adapter) = (fixture("models/llama_gqa_llama3rope"), fixture(&format!("adapters/{name}")));
        let (ok, _, err) = if name == "llama_lora" {
            temper(&["merge", base.to_str().unwrap(), adapter.to_str().unwrap(), "--out", out.to_str().unwrap()])
        } else {
            temper(&["merge", "--model", base.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--out", out.to_str().unwrap()])
        };
        assert!(ok, "{err}");
        let r = reference(name);
        let merged = Llama::load(&out, DType::F32).unwrap();
        let worst = worst_logit_error(&merged.forward(&input(&r)).unwrap(), &r.load("merged_logits").unwrap(), &r);
        assert!(worst <= 1e-4, "{name}: merged model logits max abs error {worst:e}");
    }
    let (ok, _, err) = temper(&["merge", "--model", fixture("models/llama_gqa_llama3rope").to_str().unwrap(), "--adapter", "/nonexistent", "--out", "/tmp/x"]);
    assert!(!ok && err.contains("/nonexistent/adapter_config.json"), "{err}");
}
