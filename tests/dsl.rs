//! The DSL end to end: a module declared with `#[derive(Module)]`, an adapter declared with
//! `#[adapter]`, injection by target patterns, losses composed in code, and a specialised trainer.

mod common;

use common::{fixture, scratch_dir};
use temper::adapters::{AdapterHost, Lora, Targets};
use temper::loss::{ce, kl};
use temper::module::ModuleExt;
use temper::prelude::*;

#[derive(Module)]
struct Block {
    #[module(rename = "norm.weight")]
    norm: Tensor,
    proj: temper::models::Linear,
    #[module(rename = "experts.{i}")]
    experts: Vec<temper::models::Linear>,
    head: Option<Tensor>,
    #[module(skip)]
    _eps: f64,
}

fn t(shape: &[usize], v: f32) -> Tensor {
    Tensor::from_vec(vec![v; shape.iter().product()], shape, Device::Cpu).unwrap()
}

#[test]
fn derived_modules_name_save_load_freeze_and_count() {
    let lin = |o, i| temper::models::Linear::new(t(&[o, i], 0.5), None);
    let mut b = Block { norm: t(&[4], 1.0), proj: lin(3, 4), experts: vec![lin(2, 3), lin(2, 3)], head: None, _eps: 1e-6 };
    let names: Vec<String> = b.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["norm.weight", "proj.weight", "experts.0.weight", "experts.1.weight"]);
    assert_eq!(b.linear_names(), ["proj", "experts.0", "experts.1"]);
    assert_eq!(b.unfreeze("^experts\\.").unwrap(), 2);
    let c = b.parameter_counts();
    assert_eq!((c.trainable, c.total), (12, 4 + 12 + 12));
    assert_eq!(c.to_string(), "trainable params: 12 || all params: 28 || trainable%: 42.8571");
    assert!(b.freeze("nothing_like_this").unwrap_err().to_string().contains("norm.weight"));
    let path = scratch_dir("derive-save").join("block.safetensors");
    b.save_safetensors(&path).unwrap();
    let mut other = Block { norm: t(&[4], 0.0), proj: lin(3, 4), experts: vec![lin(2, 3), lin(2, 3)], head: None, _eps: 0.0 };
    other.map_parameters(&mut |_, x| Ok(t(x.shape(), 0.0))).unwrap();
    other.load_safetensors(&temper::formats::safetensors::SafetensorsFiles::open_files(&[path]).unwrap()).unwrap();
    assert_eq!(other.norm.to_vec::<f32>().unwrap(), vec![1.0; 4]);
    assert_eq!(other.experts[1].weight.dense().unwrap().to_vec::<f32>().unwrap(), vec![0.5; 6]);
}

#[test]
fn llama_parameter_tree_is_the_hugging_face_checkpoint() {
    let dir = fixture("models/llama_gqa_llama3rope");
    let m = Llama::load(&dir, DType::F32).unwrap();
    let files = temper::formats::safetensors::SafetensorsFiles::open_dir(&dir).unwrap();
    let mut ours: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    let mut theirs: Vec<String> = files.names().map(String::from).collect();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);
}

#[test]
fn targets_patterns_and_errors_follow_peft() {
    let base = || Llama::load(&fixture("models/llama_gqa_llama3rope"), DType::F32).unwrap();
    let cfg = Lora::config(4, 8.0).targets(Targets::AllLinear).exclude(Targets::names(["down_proj"])).pattern("q_proj", |h| h.r = 2);
    let m = base().with_adapter("default", &cfg).unwrap();
    let keys: Vec<(String, Vec<usize>)> = m.adapter_parameters("default").into_iter().map(|(k, t)| (k, t.shape().to_vec())).collect();
    assert_eq!(keys.len(), 2 * 2 * 6, "6 of 7 linears per layer, 2 layers, A and B");
    assert!(keys.iter().all(|(k, _)| !k.contains("down_proj")));
    assert!(keys.contains(&("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight".into(), vec![2, 32])));
    assert!(keys.contains(&("base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight".into(), vec![4, 32])));
    // Only the adapter trains, like PEFT's get_peft_model; B starts at zero so the model is unchanged.
    assert!(m.base_parameters().iter().all(|(_, t)| !t.requires_grad_flag()));
    assert!(m.adapter_parameters("default").iter().all(|(_, t)| t.requires_grad_flag()));
    let e = base().with_adapter("default", &Lora::config(4, 8.0).targets(Targets::Regex(".*qproj".into()))).err().unwrap().to_string();
    assert!(e.contains("match no linear layer") && e.contains("model.layers.0.self_attn.q_proj"), "{e}");
}

#[test]
fn composed_loss_trains_logs_each_term_and_saves() {
    let base = Llama::load(&fixture("models/llama_gqa_llama3rope"), DType::F32).unwrap();
    let cfg = Lora::config(4, 8.0).with(|h| h.loraplus_lr_ratio = 4.0).seed(3);
    let model = base.with_adapter("default", &cfg).unwrap();
    let ids = Tensor::from_vec((0..24).map(|i| (i * 13 % 100) as i64).collect::<Vec<_>>(), &[2, 12], Device::Cpu).unwrap();
    let batch = Batch { input: ForwardInput::ids(ids.clone()), labels: ids };
    let mut trainer = Trainer::new(model, ce() + 0.5 * kl(), AdamW::lr(5e-3).weight_decay(0.0));
    let first = trainer.step(&batch).unwrap();
    assert_eq!(first.terms.iter().map(|(n, _)| *n).collect::<Vec<_>>(), ["ce", "kl"]);
    assert!(first.terms[1].1.abs() < 1e-9, "the adapter starts as the identity, so KL to the base is 0");
    let mut last = first.clone();
    for _ in 0..15 {
        last = trainer.step(&batch).unwrap();
    }
    assert!(last.terms[0].1 < first.terms[0].1 - 0.05, "ce fell: {:?} → {:?}", first.terms, last.terms);
    assert!(last.terms[1].1 > 0.0, "the adapter moved away from the base");
    assert!((last.loss - (last.terms[0].1 + 0.5 * last.terms[1].1)).abs() < 1e-5);
    let dir = scratch_dir("trained-lora");
    trainer.save_adapter("default", &dir).unwrap();
    let mut again = Llama::load(&fixture("models/llama_gqa_llama3rope"), DType::F32).unwrap().into_adapter_type::<Lora>().unwrap();
    again.load_adapter::<Lora>(&dir, "default").unwrap();
    let a = trainer.into_model().forward(&batch.input).unwrap().to_vec::<f32>().unwrap();
    assert_eq!(again.forward(&batch.input).unwrap().to_vec::<f32>().unwrap(), a);
}

#[test]
fn named_adapters_switch_independently_and_the_base_is_the_reference() {
    let base = Llama::load(&fixture("models/llama_gqa_llama3rope"), DType::F32).unwrap();
    let ids = Tensor::from_vec((0..12).map(|i| (i * 5 % 100) as i64).collect::<Vec<_>>(), &[1, 12], Device::Cpu).unwrap();
    let input = ForwardInput::ids(ids);
    let plain = base.forward(&input).unwrap().to_vec::<f32>().unwrap();
    let mut m = base.with_adapter("a", &Lora::config(2, 4.0).seed(1)).unwrap();
    m.add_adapter("b", &Lora::config(2, 4.0).targets(Targets::names(["o_proj"])).seed(2)).unwrap();
    assert_eq!(m.adapter_names(), ["a", "b"]);
    // Give both adapters non-zero B so each changes the output.
    m.visit_mut("", &mut |n, t, _| {
        if n.contains("lora_B") {
            let v: Vec<f32> = (0..t.elem_count()).map(|i| ((i % 7) as f32 - 3.0) * 0.05).collect();
            *t = Tensor::from_vec(v, t.shape(), Device::Cpu)?.requires_grad();
        }
        Ok(())
    })
    .unwrap();
    let out = |m: &Llama<Lora>| m.forward(&input).unwrap().to_vec::<f32>().unwrap();
    let both = out(&m);
    m.set_adapter_enabled("b", false).unwrap();
    let only_a = out(&m);
    m.set_adapter_enabled("a", false).unwrap();
    assert_eq!(out(&m), plain, "with every adapter off the model is the base");
    m.set_adapter_enabled("b", true).unwrap();
    let only_b = out(&m);
    assert!(both != only_a && both != only_b && only_a != only_b && only_a != plain && only_b != plain);
    m.set_adapter_enabled("a", true).unwrap();
    assert_eq!(m.reference_forward(&input).unwrap().to_vec::<f32>().unwrap(), plain);
    assert!(m.set_adapter_enabled("c", true).unwrap_err().to_string().contains("[\"a\", \"b\"]"));
    m.delete_adapter("b").unwrap();
    assert_eq!(out(&m), only_a);
}

#[test]
fn lora_dropout_acts_in_training_only_and_loraplus_scales_lora_b() {
    let base = Llama::load(&fixture("models/llama_gqa_llama3rope"), DType::F32).unwrap();
    let cfg = Lora::config(2, 4.0).with(|h| {
        h.lora_dropout = 0.5;
        h.loraplus_lr_ratio = 16.0;
    });
    let mut m = base.with_adapter("default", &cfg).unwrap();
    m.visit_mut("", &mut |n, t, _| {
        if n.contains("lora_B") {
            *t = Tensor::from_vec(vec![0.3f32; t.elem_count()], t.shape(), Device::Cpu)?.requires_grad();
        }
        Ok(())
    })
    .unwrap();
    let input = ForwardInput::ids(Tensor::from_vec(vec![1i64, 5, 9, 13, 17, 21], &[1, 6], Device::Cpu).unwrap());
    let eval1 = m.forward(&input).unwrap().to_vec::<f32>().unwrap();
    assert_eq!(eval1, m.forward(&input).unwrap().to_vec::<f32>().unwrap(), "no dropout in inference");
    m.training = true;
    let t1 = m.forward(&input).unwrap().to_vec::<f32>().unwrap();
    let t2 = m.forward(&input).unwrap().to_vec::<f32>().unwrap();
    assert!(t1 != eval1 && t1 != t2, "dropout draws a new mask in each training forward");
    let scales: Vec<(String, f64)> = m.trainable_with_lr_scale().into_iter().map(|(n, _, s)| (n, s)).collect();
    assert!(scales.iter().all(|(n, s)| (*s == 16.0) == n.contains("lora_B")), "{scales:?}");
}

#[path = "../examples/custom_adapter.rs"]
mod custom_adapter;

#[test]
fn custom_adapter_example_trains_and_saves() {
    let dir = std::path::Path::new("target/gated-lora");
    let _ = std::fs::remove_dir_all(dir);
    custom_adapter::main().unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["temper_adapter"], "GatedLora");
    assert_eq!(cfg["config"], serde_json::json!({"r": 4, "alpha": 8.0}));
    let files = temper::formats::safetensors::SafetensorsFiles::open_files(&[dir.join("adapter_model.safetensors")]).unwrap();
    assert!(files.contains("base_model.model.model.layers.1.self_attn.v_proj.gate"));
    // Trained: B moved away from its zero start.
    let b = files.load("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight").unwrap().to_f64_vec().unwrap();
    assert!(b.iter().any(|v| v.abs() > 1e-4));
    // And the folder loads back into a model with the user's type.
    let mut m = Llama::load(&fixture("models/llama_gqa_llama3rope"), DType::F32).unwrap().into_adapter_type::<custom_adapter::GatedLora>().unwrap();
    assert_eq!(m.load_adapter::<custom_adapter::GatedLora>(dir, "default").unwrap().len(), 4);
    // The default merge reads ΔW off the user's delta: merged and unmerged models agree.
    let input = ForwardInput::ids(Tensor::from_vec(vec![3i64, 14, 15, 92, 65, 35], &[1, 6], Device::Cpu).unwrap());
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4);
    let adapted = m.forward(&input).unwrap().to_vec::<f32>().unwrap();
    assert_ne!(adapted, Llama::load(&fixture("models/llama_gqa_llama3rope"), DType::F32).unwrap().forward(&input).unwrap().to_vec::<f32>().unwrap());
    m.merge_adapter("default").unwrap();
    assert!(close(&m.forward(&input).unwrap().to_vec::<f32>().unwrap(), &adapted));
    m.unmerge_adapter("default").unwrap();
    assert!(close(&m.forward(&input).unwrap().to_vec::<f32>().unwrap(), &adapted));
}
