//! temper against Hugging Face transformers on tiny random models (fixtures written by
//! `tools/gen_fixtures.py`, read here without Python): logits, loss, every parameter's gradient,
//! and greedy generation with left padding.

mod common;

use common::relative_error;
use std::path::{Path, PathBuf};
use temper::formats::safetensors::SafetensorsFiles;
use temper::generate::{generate, GenerationConfig};
use temper::models::{ForwardInput, Llama};
use temper::ModuleExt;
use temper::{DType, Tensor};

const MODELS: [&str; 6] = ["llama_gqa_llama3rope", "llama_tied_linear", "mistral_window", "qwen2_bias", "qwen3_qknorm", "llama_bf16_sharded"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(name)
}

struct Reference {
    files: SafetensorsFiles,
}

impl Reference {
    fn open(name: &str) -> Reference {
        Reference { files: SafetensorsFiles::open_files(&[fixture(name).join("reference.safetensors")]).expect("reference.safetensors") }
    }
    fn get(&self, name: &str) -> Tensor {
        self.files.load(name).unwrap_or_else(|e| panic!("{e}"))
    }
}

fn input(r: &Reference) -> ForwardInput {
    ForwardInput { input_ids: r.get("input_ids"), attention_mask: Some(r.get("attention_mask")), position_ids: None, segment_ids: None }
}

#[test]
fn logits_and_loss_match_transformers() {
    for name in MODELS {
        let model = Llama::load(&fixture(name), DType::F32).unwrap_or_else(|e| panic!("{name}: {e}"));
        let r = Reference::open(name);
        let inp = input(&r);
        let logits = model.forward(&inp).unwrap().to_f64_vec().unwrap();
        let want = r.get("logits").to_f64_vec().unwrap();
        let mask = r.get("attention_mask").to_vec::<i64>().unwrap();
        let vocab = model.config.vocab_size;
        let mut worst: f64 = 0.0;
        for (pos, &m) in mask.iter().enumerate() {
            if m == 1 {
                for v in 0..vocab {
                    worst = worst.max((logits[pos * vocab + v] - want[pos * vocab + v]).abs());
                }
            }
        }
        assert!(worst <= 1e-4, "{name}: logits max abs error {worst:e}");
        let logits_t = model.forward(&inp).unwrap();
        let loss = Llama::loss(&logits_t, &r.get("labels")).unwrap().to_scalar().unwrap();
        let want_loss = r.get("loss").to_scalar().unwrap();
        assert!((loss - want_loss).abs() <= 1e-5, "{name}: loss {loss} vs {want_loss}");
        eprintln!("{name}: logits max abs error {worst:.2e}, loss error {:.2e}", (loss - want_loss).abs());
    }
}


fn check_gradients(name: &str, checkpointing: bool) {
    let mut model = Llama::load(&fixture(name), DType::F32).unwrap();
    model.gradient_checkpointing = checkpointing;
    model.unfreeze(".").unwrap();
    let r = Reference::open(name);
    let loss = Llama::loss(&model.forward(&input(&r)).unwrap(), &r.get("labels")).unwrap();
    let grads = loss.backward().unwrap();
    let params = model.named_parameters();
    assert!(params.len() > 10);
    for (pname, p) in params {
        let g = grads.get(&p).unwrap_or_else(|| panic!("{name}: no gradient for {pname}")).to_f64_vec().unwrap();
        let want = r.get(&format!("grad.{pname}")).to_f64_vec().unwrap();
        let err = relative_error(&g, &want);
        assert!(err <= 1e-3, "{name} (checkpointing {checkpointing}): gradient of {pname}: relative error {err:e}");
    }
}

#[test]
fn gradients_of_every_parameter_match_transformers() {
    for name in MODELS {
        check_gradients(name, false);
    }
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    for name in ["llama_gqa_llama3rope", "qwen3_qknorm"] {
        check_gradients(name, true);
    }
}

#[test]
fn greedy_generation_with_left_padding_matches_transformers() {
    for name in MODELS {
        let model = Llama::load(&fixture(name), DType::F32).unwrap();
        let r = Reference::open(name);
        let ids = r.get("gen.input_ids").to_vec::<i64>().unwrap();
        let mask = r.get("gen.attention_mask").to_vec::<i64>().unwrap();
        let want = r.get("gen.output_ids").to_vec::<i64>().unwrap();
        let p = r.get("gen.input_ids").shape()[1];
        let n = r.get("gen.output_ids").shape()[1];
        let prompts: Vec<Vec<u32>> = (0..2)
            .map(|b| (0..p).filter(|&t| mask[b * p + t] == 1).map(|t| ids[b * p + t] as u32).collect())
            .collect();
        let cfg = GenerationConfig { max_new_tokens: n, eos_token_ids: vec![2], ..Default::default() };
        let out = generate(&model, &prompts, &cfg, None).unwrap();
        for b in 0..2 {
            let expected: Vec<u32> = want[b * n..(b + 1) * n].iter().map(|&t| t as u32).collect();
            let stop = expected.iter().position(|&t| t == 2).map(|i| i + 1).unwrap_or(n);
            assert_eq!(out.tokens[b], expected[..stop].to_vec(), "{name} row {b}");
        }
    }
}

#[test]
fn f16_weights_load_and_stay_close_to_the_f32_reference() {
    // Rewrite a fixture's checkpoint in F16 with our own writer, load it back, and compare with
    // transformers' logits at the tolerance F16 rounding of the weights allows.
    let src = fixture("qwen3_qknorm");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("f16-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let f = SafetensorsFiles::open_dir(&src).unwrap();
    let tensors: Vec<(String, Tensor)> = f.names().map(|n| (n.to_string(), f.load(n).unwrap().to_dtype(DType::F16).unwrap())).collect();
    temper::formats::safetensors::save(&dir.join("model.safetensors"), &tensors, None).unwrap();
    let (_, dt) = SafetensorsFiles::open_dir(&dir).unwrap().info("model.norm.weight").unwrap();
    assert_eq!(dt, DType::F16);
    let model = Llama::load(&dir, DType::F32).unwrap();
    let r = Reference::open("qwen3_qknorm");
    let logits = model.forward(&input(&r)).unwrap().to_f64_vec().unwrap();
    let want = r.get("logits").to_f64_vec().unwrap();
    let worst = logits.iter().zip(&want).take(12 * 128).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(worst < 2e-2 && worst > 0.0, "F16 weights: logits max abs error {worst}");
}
