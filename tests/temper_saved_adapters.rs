//! Adapters saved by temper load in PEFT with identical outputs, and merged models saved by temper
//! load in transformers.
//!
//! `write_temper_saved_fixtures` (ignored; run it with `--ignored`) writes, for a LoRA, an rsLoRA with
//! rank/alpha patterns and a DoRA adapter made by temper, the adapter folder, temper's logits on
//! the fixture input (`temper_outputs.safetensors`) and the merged full model (`merged/`) into
//! `tests/fixtures/adapters/temper_saved/`. `tools/check_temper_adapters.py` then loads each in
//! PEFT / transformers and records the comparison in `peft_check.json`. The normal tests check
//! that temper still writes exactly the committed adapter files, that the committed check passed,
//! and that the merged model reloads in temper with the same outputs.

mod common;

use common::{fixture, scratch_dir};
use temper::adapters::{AdapterConfig, AdapterFormat, AdapterHost, Dora, Lora, Targets};
use temper::formats::safetensors::{self as st, SafetensorsFiles};
use temper::models::{ForwardInput, Llama};
use temper::module::{Module, ParamRole};
use temper::rng::Rng;
use temper::{DType, Device, Tensor};
use std::path::Path;

const BASE: &str = "tests/fixtures/models/llama_gqa_llama3rope";

fn input() -> ForwardInput {
    let r = SafetensorsFiles::open_files(&[fixture("adapters/llama_lora/reference.safetensors")]).unwrap();
    ForwardInput { input_ids: r.load("input_ids").unwrap(), attention_mask: Some(r.load("attention_mask").unwrap()), position_ids: None, segment_ids: None }
}

/// A base model with adapter `default` whose values are as a few training steps would leave them:
/// every adapter tensor moved by seeded noise, so B ≠ 0 and DoRA's magnitude ≠ ‖W‖.
fn adapted<A: AdapterFormat>(cfg: &AdapterConfig<A>, seed: u64) -> Llama<A> {
    let mut m = Llama::load(&fixture("models/llama_gqa_llama3rope"), DType::F32).unwrap().with_adapter("default", cfg).unwrap();
    let mut rng = Rng::new(seed);
    m.visit_mut("", &mut |_, t, role| {
        if matches!(role, ParamRole::Adapter { .. }) {
            let v: Vec<f32> = t.to_vec::<f32>()?.iter().map(|x| x + (0.2 * rng.normal()) as f32).collect();
            *t = Tensor::from_vec(v, t.shape(), Device::Cpu)?.requires_grad();
        }
        Ok(())
    })
    .unwrap();
    m
}

fn write<A: AdapterFormat>(m: Llama<A>, dir: &Path) {
    m.save_adapter::<A>("default", dir, Some(BASE)).unwrap();
    let input = input();
    let logits = m.forward(&input).unwrap();
    let outs = vec![
        ("input_ids".to_string(), input.input_ids.clone()),
        ("attention_mask".to_string(), input.attention_mask.clone().unwrap()),
        ("logits".to_string(), logits.detach()),
    ];
    st::save(&dir.join("temper_outputs.safetensors"), &outs, None).unwrap();
    m.merge_and_unload().unwrap().save_pretrained(&dir.join("merged")).unwrap();
}

fn cases() -> Vec<(&'static str, Box<dyn Fn(&Path)>)> {
    vec![
        ("lora", Box::new(|d: &Path| write(adapted(&Lora::config(4, 8.0).targets(Targets::names(["q_proj", "v_proj", "down_proj"])).seed(1), 11), d))),
        (
            "rslora_patterns",
            Box::new(|d: &Path| {
                let cfg = Lora::config(4, 8.0).with(|h| h.use_rslora = true).pattern("o_proj", |h| h.r = 2).pattern("layers.1.mlp.up_proj", |h| h.lora_alpha = 3.0).seed(2);
                write(adapted(&cfg, 12), d)
            }),
        ),
        ("dora", Box::new(|d: &Path| write(adapted(&Dora::config(4, 8.0).targets(Targets::names(["k_proj", "o_proj", "gate_proj"])).seed(3), 13), d))),
    ]
}

#[test]
#[ignore = "writes the committed fixtures; run with --ignored, then tools/check_temper_adapters.py"]
fn write_temper_saved_fixtures() {
    for (name, make) in cases() {
        let dir = fixture(&format!("adapters/temper_saved/{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        make(&dir);
    }
}

#[test]
fn committed_temper_saved_adapters_are_current_and_peft_loaded_them() {
    for (name, make) in cases() {
        let committed = fixture(&format!("adapters/temper_saved/{name}"));
        let fresh = scratch_dir(&format!("temper-saved-{name}"));
        make(&fresh);
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            let (a, b) = (std::fs::read(committed.join(f)).unwrap(), std::fs::read(fresh.join(f)).unwrap());
            assert!(a == b, "{name}/{f}: temper now writes something else than the committed file PEFT checked; rerun the ignored writer and the checker");
        }
        let check: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(committed.join("peft_check.json")).unwrap()).unwrap();
        assert_eq!(check["passed"], serde_json::json!(true), "{name}: {check}");
        assert!(check["max_abs_diff_logits"].as_f64().unwrap() <= 1e-4 && check["max_abs_diff_merged"].as_f64().unwrap() <= 1e-4, "{name}: {check}");
        // The merged model temper saved reloads in temper with the adapter's outputs.
        let merged = Llama::load(&fresh.join("merged"), DType::F32).unwrap();
        let want = SafetensorsFiles::open_files(&[fresh.join("temper_outputs.safetensors")]).unwrap().load("logits").unwrap().to_f64_vec().unwrap();
        let got = merged.forward(&input()).unwrap().to_f64_vec().unwrap();
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(worst <= 1e-4, "{name}: merged model logits differ by {worst:e}");
    }
}

#[test]
fn saving_a_full_model_with_an_unmerged_adapter_is_refused() {
    let m = adapted(&Lora::config(2, 4.0), 5);
    let e = m.save_pretrained(&scratch_dir("unmerged-save")).unwrap_err().to_string();
    assert!(e.contains("not merged") && e.contains("merge_and_unload"), "{e}");
    let _ = AdapterHost::adapter_names(&m);
}
