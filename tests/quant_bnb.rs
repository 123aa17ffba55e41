//! temper's bitsandbytes 4-bit quantisation against bitsandbytes itself: fixtures in
//! `tests/fixtures/quant/` (`cases.safetensors` + `cases.json`) and a tiny pre-quantised model in
//! `tests/fixtures/models/llama_bnb4bit/`. Packed codes, absmax and dequantised values must be
//! bit-identical; double-quantised absmax codes may differ only on exact ties.

mod common;

use common::fixture;
use temper::formats::safetensors::SafetensorsFiles;
use temper::quant::blockwise::double_quantize_with;
use temper::quant::codes::{dynamic_map_signed_8bit, FP4, NF4};
use temper::quant::{dequantize_4bit, double_dequantize, quantize_4bit, Nf4Weight, QuantType};

/// The fixture files if all exist, else None after saying which is missing.
fn present(paths: &[std::path::PathBuf]) -> bool {
    for p in paths {
        if !p.exists() {
            eprintln!("SKIPPED: {} is absent (bitsandbytes fixtures not generated yet)", p.display());
            return false;
        }
    }
    true
}

struct Case {
    name: String,
    quant_type: QuantType,
    blocksize: usize,
}

/// Reads cases.json: a list of objects, an object with a `cases` list, or an object keyed by case name.
fn cases(json: &serde_json::Value) -> Vec<Case> {
    let one = |name: Option<&str>, v: &serde_json::Value| -> Case {
        let name = name.map(str::to_string).or_else(|| v.get("name").and_then(|n| n.as_str()).map(str::to_string)).expect("case without a name");
        let qt = v.get("quant_type").and_then(|q| q.as_str()).unwrap_or("nf4");
        let blocksize = v.get("blocksize").and_then(|b| b.as_u64()).unwrap_or(64) as usize;
        Case { name, quant_type: QuantType::parse(qt).unwrap(), blocksize }
    };
    let list = json.get("cases").unwrap_or(json);
    match list {
        serde_json::Value::Array(a) => a.iter().map(|v| one(None, v)).collect(),
        serde_json::Value::Object(m) => m.iter().map(|(k, v)| one(Some(k), v)).collect(),
        _ => panic!("cases.json: expected a list or an object of cases"),
    }
}

fn f32s(f: &SafetensorsFiles, k: &str) -> Vec<f32> {
    f.load(k).unwrap_or_else(|e| panic!("{e}")).to_dtype(temper::DType::F32).unwrap().to_vec::<f32>().unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn code_tables_equal_bitsandbytes() {
    let (st, js) = (fixture("quant/cases.safetensors"), fixture("quant/cases.json"));
    if !present(&[st.clone(), js]) {
        return;
    }
    let f = SafetensorsFiles::open_files(&[st]).unwrap();
    assert_eq!(bits(&f32s(&f, "quant_map.nf4")), bits(&NF4), "nf4 table");
    assert_eq!(bits(&f32s(&f, "quant_map.fp4")), bits(&FP4), "fp4 table");
}

#[test]
fn every_case_matches_bitsandbytes_bit_for_bit() {
    let (st, js) = (fixture("quant/cases.safetensors"), fixture("quant/cases.json"));
    if !present(&[st.clone(), js.clone()]) {
        return;
    }
    let f = SafetensorsFiles::open_files(&[st]).unwrap();
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&js).unwrap()).unwrap();
    let mut ties_total = 0;
    for c in cases(&json) {
        let n = &c.name;
        let x = f32s(&f, &format!("{n}.input"));
        let want_packed = f.load(&format!("{n}.packed")).unwrap().to_vec::<u8>().unwrap();
        let (packed, absmax) = quantize_4bit(&x, c.blocksize, c.quant_type).unwrap();
        let diff = packed.iter().zip(&want_packed).filter(|(a, b)| a != b).count();
        assert_eq!(packed.len(), want_packed.len(), "{n}: packed length");
        assert_eq!(diff, 0, "{n}: {diff} of {} packed bytes differ (first at {:?})", packed.len(), packed.iter().zip(&want_packed).position(|(a, b)| a != b));

        let dq_key = format!("{n}.dequant");
        let nested_key = format!("{n}.nested_absmax");
        if f.contains(&nested_key) {
            let want_codes = f.load(&format!("{n}.absmax")).unwrap().to_vec::<u8>().unwrap();
            let nested = f32s(&f, &nested_key);
            let map = f32s(&f, &format!("{n}.nested_quant_map"));
            let offset = f32s(&f, &format!("{n}.offset"))[0];
            assert_eq!(bits(&map), bits(&dynamic_map_signed_8bit()), "{n}: our dynamic map differs from the file's");
            let mean = temper::quant::blockwise::mean_f32(&absmax);
            if mean.to_bits() != offset.to_bits() {
                eprintln!("{n}: offset {offset:e} (bitsandbytes) vs {mean:e} (ours, correctly rounded mean)");
            }
            let (codes, our_nested) = double_quantize_with(&absmax, offset, &map).unwrap();
            assert_eq!(bits(&our_nested), bits(&nested), "{n}: nested absmax");
            // A code may differ only where its value is exactly halfway between two map entries.
            let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
            let mut ties = 0;
            for (i, (a, b)) in codes.iter().zip(&want_codes).enumerate() {
                if a != b {
                    let s = centred[i] * (1.0 / nested[i / 256]);
                    let (lo, hi) = (map[*a.min(b) as usize], map[*a.max(b) as usize]);
                    assert!((s - lo).abs() == (hi - s).abs() || (lo + hi) / 2.0 == s, "{n}: absmax code {i}: ours {a}, bnb {b}, not a tie (scaled {s})");
                    ties += 1;
                }
            }
            ties_total += ties;
            eprintln!("{n}: {} absmax codes, {ties} differ on exact ties", codes.len());
            let back = double_dequantize(&want_codes, &nested, &map, offset, 256).unwrap();
            let dq = dequantize_4bit(&want_packed, &back, x.len(), c.blocksize, c.quant_type).unwrap();
            assert_eq!(bits(&dq), bits(&f32s(&f, &dq_key)), "{n}: dequantised (nested)");
        } else {
            let want_absmax = f32s(&f, &format!("{n}.absmax"));
            assert_eq!(bits(&absmax), bits(&want_absmax), "{n}: absmax");
            let dq = dequantize_4bit(&packed, &absmax, x.len(), c.blocksize, c.quant_type).unwrap();
            assert_eq!(bits(&dq), bits(&f32s(&f, &dq_key)), "{n}: dequantised");
        }
        eprintln!("{n}: {} values, {:?} blocksize {}: bit-identical", x.len(), c.quant_type, c.blocksize);
    }
    eprintln!("nested absmax codes differing on exact ties: {ties_total}");
}

#[test]
fn prequantised_model_layers_load_and_round_trip() {
    let dir = fixture("models/llama_bnb4bit");
    let st = dir.join("model.safetensors");
    if !present(&[st]) {
        return;
    }
    let f = SafetensorsFiles::open_dir(&dir).unwrap();
    let prefixes: Vec<String> = f
        .names()
        .filter_map(|k| k.split_once(".weight.quant_state.bitsandbytes__").map(|(p, _)| p.to_string()))
        .collect();
    assert!(!prefixes.is_empty(), "no bnb 4-bit layers in {}", dir.display());
    for p in &prefixes {
        let w = Nf4Weight::from_safetensors(&f, p).unwrap_or_else(|e| panic!("{e}"));
        let dq = w.dequantize().unwrap();
        assert_eq!(dq.len(), w.state.numel(), "{p}");
        // Writing the state back gives the same tensors.
        for (k, t) in w.to_safetensors_entries(p).unwrap() {
            if k.contains(".quant_state.") {
                let ours: serde_json::Value = serde_json::from_slice(&t.to_vec::<u8>().unwrap()).unwrap();
                let theirs: serde_json::Value = serde_json::from_slice(&f.load(&k).unwrap().to_vec::<u8>().unwrap()).unwrap();
                assert_eq!(ours, theirs, "{k}");
            } else if t.dtype() == temper::DType::U8 && f.info(&k).unwrap().1 == temper::DType::U8 {
                assert_eq!(t.to_vec::<u8>().unwrap(), f.load(&k).unwrap().to_vec::<u8>().unwrap(), "{k}");
            } else if t.dtype() == temper::DType::F32 {
                assert_eq!(bits(&t.to_vec::<f32>().unwrap()), bits(&f32s(&f, &k)), "{k}");
            }
        }
    }
    eprintln!("{} bnb 4-bit layers loaded", prefixes.len());
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The tiny Llama saved by transformers in bnb-4bit form (NF4, double quant) loads quantised and
/// gives transformers' logits; its dequantised weights are bitsandbytes' bit for bit.
#[test]
fn prequantised_model_gives_the_logits_of_transformers() {
    let dir = fixture("models/llama_bnb4bit");
    if !present(&[dir.join("model.safetensors"), dir.join("reference.safetensors")]) {
        return;
    }
    let model = temper::models::Llama::load(&dir, temper::DType::F32).unwrap_or_else(|e| panic!("{e}"));
    let reference = SafetensorsFiles::open_files(&[dir.join("reference.safetensors")]).unwrap();
    let mut quantised = 0;
    temper::adapters::host::each_linear_ref::<temper::adapters::NoAdapter, _>(&model, |m, l| {
        if let Some(q) = l.weight.as_quantized() {
            quantised += 1;
            let want = f32s(&reference, &format!("dequant.{m}.weight"));
            assert_eq!(bits(&q.dequantize().unwrap().to_vec::<f32>().unwrap()), bits(&want), "{m}: dequantised weight");
        }
    })
    .unwrap();
    assert_eq!(quantised, 14, "every decoder linear layer stays 4-bit");
    let input = temper::models::ForwardInput {
        input_ids: reference.load("input_ids").unwrap(),
        attention_mask: Some(reference.load("attention_mask").unwrap()),
        position_ids: None,
        segment_ids: None,
    };
    let logits = model.forward(&input).unwrap().to_vec::<f32>().unwrap();
    let want = f32s(&reference, "logits");
    let d = max_abs_diff(&logits, &want);
    eprintln!("bnb-4bit tiny Llama: max |Δlogit| vs transformers {d:e}");
    assert!(d < 1e-4, "max |Δlogit| {d}");
}

/// Saving the loaded 4-bit model writes bitsandbytes' tensors back byte for byte, with the
/// quantization_config transformers needs to load it.
#[test]
fn prequantised_model_saves_back_the_same_tensors() {
    let dir = fixture("models/llama_bnb4bit");
    if !present(&[dir.join("model.safetensors")]) {
        return;
    }
    let model = temper::models::Llama::load(&dir, temper::DType::F32).unwrap();
    let out = std::env::temp_dir().join(format!("temper-bnb-resave-{}", std::process::id()));
    model.save_pretrained(&out).unwrap_or_else(|e| panic!("{e}"));
    let ours = SafetensorsFiles::open_dir(&out).unwrap();
    let theirs = SafetensorsFiles::open_dir(&dir).unwrap();
    let mut names: Vec<String> = theirs.names().map(String::from).collect();
    names.sort();
    let mut mine: Vec<String> = ours.names().map(String::from).collect();
    mine.sort();
    assert_eq!(mine, names, "same keys");
    for k in &names {
        let (a, b) = (ours.load(k).unwrap(), theirs.load(k).unwrap());
        assert_eq!((a.dtype(), a.shape()), (b.dtype(), b.shape()), "{k}");
        if k.contains(".quant_state.") {
            let ja: serde_json::Value = serde_json::from_slice(&a.to_vec::<u8>().unwrap()).unwrap();
            let jb: serde_json::Value = serde_json::from_slice(&b.to_vec::<u8>().unwrap()).unwrap();
            assert_eq!(ja, jb, "{k}");
        } else if a.dtype() == temper::DType::U8 {
            assert_eq!(a.to_vec::<u8>().unwrap(), b.to_vec::<u8>().unwrap(), "{k}");
        } else {
            assert_eq!(bits(&a.to_vec::<f32>().unwrap()), bits(&b.to_vec::<f32>().unwrap()), "{k}");
        }
    }
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let theirs_cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let q = &cfg["quantization_config"];
    for key in ["quant_method", "load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant"] {
        assert_eq!(q[key], theirs_cfg["quantization_config"][key], "quantization_config.{key}");
    }
    std::fs::remove_dir_all(&out).ok();
}

/// `temper quantize` of the float fixture writes what transformers + bitsandbytes wrote for the same
/// model: identical packed codes and absmax codes; the double-quant offset is the correctly rounded
/// mean (torch's SIMD reduction may land one ulp away), so the nested absmax may differ slightly.
/// tools/check_temper_quantized.py loads temper's output in transformers (result committed).
#[test]
fn temper_quantize_writes_the_bytes_bitsandbytes_writes() {
    let dir = common::scratch_dir("quantize-cli");
    let out = dir.join("q");
    let (ok, _, err) = common::temper(&["quantize", fixture("models/llama_gqa_llama3rope").to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(err.contains("quantised 14 linear layers to nf4 (blocksize 64, double quant)"), "{err}");
    let ours = SafetensorsFiles::open_dir(&out).unwrap();
    let theirs = SafetensorsFiles::open_dir(&fixture("models/llama_bnb4bit")).unwrap();
    let mut keys: Vec<String> = theirs.names().map(String::from).collect();
    keys.sort();
    let mut mine: Vec<String> = ours.names().map(String::from).collect();
    mine.sort();
    assert_eq!(mine, keys);
    for k in keys.iter().filter(|k| k.ends_with(".weight") || k.ends_with(".weight.absmax")) {
        let (a, b) = (ours.load(k).unwrap(), theirs.load(k).unwrap());
        assert_eq!(a.dtype(), b.dtype(), "{k}");
        if a.dtype() == temper::DType::U8 {
            assert_eq!(a.to_vec::<u8>().unwrap(), b.to_vec::<u8>().unwrap(), "{k}");
        } else {
            assert_eq!(bits(&a.to_vec::<f32>().unwrap()), bits(&b.to_vec::<f32>().unwrap()), "{k}");
        }
    }
    for k in keys.iter().filter(|k| k.contains(".quant_state.")) {
        let ja: serde_json::Value = serde_json::from_slice(&ours.load(k).unwrap().to_vec::<u8>().unwrap()).unwrap();
        let jb: serde_json::Value = serde_json::from_slice(&theirs.load(k).unwrap().to_vec::<u8>().unwrap()).unwrap();
        let (oa, ob) = (ja["nested_offset"].as_f64().unwrap() as f32, jb["nested_offset"].as_f64().unwrap() as f32);
        assert!((oa.to_bits() as i64 - ob.to_bits() as i64).abs() <= 1, "{k}: offset {oa} vs {ob}");
        for field in ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype"] {
            assert_eq!(ja[field], jb[field], "{k}: {field}");
        }
    }
    let check: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("quant/temper_quantized_check.json")).unwrap()).unwrap();
    assert_eq!(check["passed"], true, "transformers did not load temper's quantised model: {check}");
}

/// Broken pre-quantised checkpoints are errors naming the tensor, through the CLI.
#[test]
fn broken_prequantised_checkpoints_name_the_tensor() {
    use std::collections::HashMap;
    let src = fixture("models/llama_bnb4bit");
    let files = SafetensorsFiles::open_dir(&src).unwrap();
    let all: Vec<(String, temper::Tensor)> = files.names().map(|k| (k.to_string(), files.load(k).unwrap())).collect();
    let p = "model.layers.1.mlp.down_proj.weight";
    let state = format!("{p}.quant_state.bitsandbytes__nf4");
    let blob = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut j: serde_json::Value = serde_json::from_slice(&files.load(&state).unwrap().to_vec::<u8>().unwrap()).unwrap();
        f(&mut j);
        let b = j.to_string().into_bytes();
        let n = b.len();
        temper::Tensor::from_vec(b, &[n], temper::Device::Cpu).unwrap()
    };
    let cases: Vec<(&str, HashMap<String, Option<temper::Tensor>>, Vec<String>)> = vec![
        ("missing-state", HashMap::from([(state.clone(), None)]), vec![state.clone()]),
        ("bad-json", HashMap::from([(state.clone(), Some(temper::Tensor::from_vec(b"{\"quant_type\": ".to_vec(), &[15], temper::Device::Cpu).unwrap()))]), vec![state.clone(), "does not parse".into()]),
        ("bad-blocksize", HashMap::from([(state.clone(), Some(blob(&|j| j["blocksize"] = 48.into())))]), vec![state.clone(), "blocksize 48".into()]),
        ("bad-shape", HashMap::from([(state.clone(), Some(blob(&|j| j["shape"] = serde_json::json!([32, 130]))))]), vec![format!("{p}")]),
        ("missing-absmax", HashMap::from([(format!("{p}.absmax"), None)]), vec![format!("{p}.absmax")]),
    ];
    for (name, change, want) in cases {
        let d = common::scratch_dir(&format!("bnb-broken-{name}"));
        for f in ["config.json", "generation_config.json"] {
            std::fs::copy(src.join(f), d.join(f)).unwrap();
        }
        let tensors: Vec<(String, temper::Tensor)> = all
            .iter()
            .filter_map(|(k, t)| match change.get(k) {
                None => Some((k.clone(), t.clone())),
                Some(None) => None,
                Some(Some(r)) => Some((k.clone(), r.clone())),
            })
            .collect();
        temper::formats::safetensors::save(&d.join("model.safetensors"), &tensors, None).unwrap();
        let (ok, _, err) = common::temper(&["generate", "--model", d.to_str().unwrap(), "--prompt-ids", "1,2", "--max-new-tokens", "1"]);
        assert!(!ok, "{name}: loaded");
        assert!(!err.contains("panicked"), "{name}: {err}");
        for w in &want {
            assert!(err.contains(w.as_str()), "{name}: error does not mention `{w}`:\n{err}");
        }
    }
    // A block size bitsandbytes does not allow, asked for on the command line.
    let (ok, _, err) = common::temper(&["quantize", fixture("models/llama_gqa_llama3rope").to_str().unwrap(), "--out", "/tmp/never", "--blocksize", "48"]);
    assert!(!ok && err.contains("blocksize 48"), "{err}");
}
