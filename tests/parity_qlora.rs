//! QLoRA in temper against PEFT + bitsandbytes (fixture written by `tools/gen_qlora_fixture.py`):
//! a PEFT LoRA adapter (r 4, alpha 8, all 7 projections) on the frozen bnb-4bit NF4 base
//! `tests/fixtures/models/llama_bnb4bit`, loaded with its linear layers kept 4-bit. Logits, loss
//! and the gradient of every lora_A / lora_B must be PEFT's, computed by PEFT 0.21.2 over
//! bitsandbytes 0.50.2's `Linear4bit` in float32.

mod common;

use common::{fixture, relative_error};
use temper::adapters::host::each_linear_ref;
use temper::adapters::{AdapterHost, Lora};
use temper::formats::safetensors::SafetensorsFiles;
use temper::models::{ForwardInput, Llama};
use temper::module::ModuleExt;
use temper::{DType, Tensor};

fn reference() -> SafetensorsFiles {
    SafetensorsFiles::open_files(&[fixture("adapters/llama_qlora/reference.safetensors")]).unwrap()
}

fn input(r: &SafetensorsFiles) -> ForwardInput {
    ForwardInput { input_ids: r.load("input_ids").unwrap(), attention_mask: Some(r.load("attention_mask").unwrap()), position_ids: None, segment_ids: None }
}

/// Largest |a − b| over the logits of real (unpadded) positions.
fn worst_logit_error(got: &Tensor, want: &Tensor, r: &SafetensorsFiles) -> f64 {
    let (got, want) = (got.to_f64_vec().unwrap(), want.to_f64_vec().unwrap());
    assert_eq!(got.len(), want.len(), "logits differ in size");
    let mask = r.load("attention_mask").unwrap().to_vec::<i64>().unwrap();
    let v = got.len() / mask.len();
    (0..mask.len()).filter(|&p| mask[p] == 1).flat_map(|p| (0..v).map(move |i| p * v + i)).map(|i| (got[i] - want[i]).abs()).fold(0.0, f64::max)
}

/// (decoder linears kept 4-bit, decoder linears, decoder linears carrying adapter `default`);
/// any other linear (lm_head) must be dense.
fn layer_census(m: &Llama<Lora>) -> (usize, usize, usize) {
    let (mut quantised, mut decoder, mut adapted) = (0, 0, 0);
    each_linear_ref::<Lora, _>(m, |name, l| {
        if name.starts_with("model.layers.") {
            decoder += 1;
            quantised += l.weight.as_quantized().is_some() as usize;
            adapted += l.adapters.iter().any(|s| s.name == "default") as usize;
        } else {
            assert!(l.weight.as_quantized().is_none(), "{name} should stay dense");
        }
    })
    .unwrap();
    (quantised, decoder, adapted)
}

#[test]
fn qlora_logits_loss_and_lora_gradients_match_peft_bitsandbytes() {
    let r = reference();
    let base = Llama::load(&fixture("models/llama_bnb4bit"), DType::F32).unwrap();
    let mut model = base.into_adapter_type::<Lora>().unwrap();
    let adapted = model.load_adapter::<Lora>(&fixture("adapters/llama_qlora"), "default").unwrap();
    assert_eq!(adapted.len(), 14, "adapted modules: {adapted:?}");
    assert_eq!(layer_census(&model), (14, 14, 14), "(4-bit, decoder linears, adapted) after loading the adapter");

    model.unfreeze("\\.default\\.|\\.default$").unwrap();
    let logits = model.forward(&input(&r)).unwrap();
    let worst_logit = worst_logit_error(&logits, &r.load("logits").unwrap(), &r);
    let loss = Llama::loss(&logits, &r.load("labels").unwrap()).unwrap();
    let want_loss = r.load("loss").unwrap().to_scalar().unwrap();
    let loss_err = (loss.to_scalar().unwrap() - want_loss).abs();
    let grads = loss.backward().unwrap();
    let params = model.adapter_parameters("default");
    assert_eq!(params.len(), 28, "lora_A and lora_B of 14 layers");
    let mut worst_grad = (0.0f64, String::new());
    for (key, p) in &params {
        assert!(key.ends_with(".lora_A.weight") || key.ends_with(".lora_B.weight"), "{key}");
        let g = grads.get(p).unwrap_or_else(|| panic!("no gradient for {key}")).to_f64_vec().unwrap();
        let want = r.load(&format!("grad.{key}")).unwrap_or_else(|e| panic!("{key}: {e}")).to_f64_vec().unwrap();
        let err = relative_error(&g, &want);
        if err > worst_grad.0 {
            worst_grad = (err, key.clone());
        }
    }
    eprintln!(
        "QLoRA vs PEFT+bitsandbytes: max |Δlogit| {worst_logit:.2e}, |Δloss| {loss_err:.2e} (loss {want_loss:.6}), \
         max gradient relative error {:.2e} ({}) over {} tensors",
        worst_grad.0,
        worst_grad.1,
        params.len()
    );
    assert!(worst_logit <= 1e-4, "logits max abs error {worst_logit:e}");
    assert!(loss_err <= 1e-5, "loss differs by {loss_err:e}");
    assert!(worst_grad.0 <= 1e-4, "gradient of {}: relative error {:e}", worst_grad.1, worst_grad.0);

    // The base stays frozen and 4-bit: no base parameter (packed weights, embeddings, norms,
    // lm_head) received a gradient, and no layer was dequantised along the way.
    assert!(model.base_parameters().iter().all(|(_, t)| grads.get(t).is_none()), "a base parameter got a gradient");
    assert_eq!(layer_census(&model), (14, 14, 14), "after forward/backward");

    // With the adapter off the model is the 4-bit base: transformers' logits for llama_bnb4bit.
    let base_ref = SafetensorsFiles::open_files(&[fixture("models/llama_bnb4bit/reference.safetensors")]).unwrap();
    let off = worst_logit_error(&model.reference_forward(&input(&r)).unwrap(), &base_ref.load("logits").unwrap(), &r);
    let effect = worst_logit_error(&logits, &base_ref.load("logits").unwrap(), &r);
    eprintln!("adapter off vs the bnb-4bit base's logits: {off:.2e}; the adapter moves the logits by up to {effect:.2}");
    assert!(off <= 1e-4, "logits with the adapter off differ from the 4-bit base's by {off:e}");
    assert!(effect > 1e-1, "the adapter barely changes the logits ({effect:e}): the test would not see it");

    // The 4-bit rounding is visible at this tolerance: the same adapter on the float32 model the
    // base was quantised from does not give PEFT's QLoRA logits.
    let mut dense = Llama::load(&fixture("models/llama_gqa_llama3rope"), DType::F32).unwrap().into_adapter_type::<Lora>().unwrap();
    dense.load_adapter::<Lora>(&fixture("adapters/llama_qlora"), "default").unwrap();
    let dense_gap = worst_logit_error(&dense.forward(&input(&r)).unwrap(), &r.load("logits").unwrap(), &r);
    eprintln!("the same adapter on the unquantised float32 base: max |Δlogit| {dense_gap:.2e} vs PEFT's QLoRA logits");
    assert!(dense_gap > 1e-2, "dense and 4-bit bases are indistinguishable here ({dense_gap:e})");
}
