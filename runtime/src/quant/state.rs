//! The per-layer state of a bitsandbytes 4-bit weight as Hugging Face checkpoints store it
//! (`Linear4bit` state dict with `QuantState.as_dict(packed=True)`), for a layer prefix `P`:
//!
//! | key | contents |
//! |---|---|
//! | `P.weight` | packed codes, u8 `[(n+1)/2, 1]` (or the same bytes viewed as bf16/f16/f32: `quant_storage`) |
//! | `P.weight.absmax` | f32 `[nblocks]`, or u8 codes when double-quantised |
//! | `P.weight.quant_map` | f32 `[16]`, the 4-bit table |
//! | `P.weight.nested_absmax` | f32 `[ceil(nblocks/256)]` (double quantisation only) |
//! | `P.weight.nested_quant_map` | f32 `[256]`, the 8-bit map (double quantisation only) |
//! | `P.weight.quant_state.bitsandbytes__nf4` (or `__fp4`) | u8 bytes of a JSON object |
//!
//! The JSON holds `quant_type`, `blocksize`, `dtype` (the original weight dtype), `shape`, and when
//! nested `nested_blocksize`, `nested_dtype`, `nested_offset`.

use super::blockwise::{check_blocksize, dequantize_4bit, double_dequantize, double_quantize, quantize_4bit, NESTED_BLOCKSIZE};
use super::codes::{dynamic_map_signed_8bit, QuantType};
use crate::error::{Error, Result};
use crate::formats::safetensors::SafetensorsFiles;
use crate::tensor::{DType, Tensor};
use crate::Device;

/// The per-block scales of a 4-bit weight.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    /// One f32 absmax per block.
    Plain(Vec<f32>),
    /// Double-quantised: one byte per block, decoded as `nested_map[c] · nested_absmax[b / nested_blocksize] + offset`.
    Nested { codes: Vec<u8>, nested_absmax: Vec<f32>, nested_map: Vec<f32>, offset: f32, nested_blocksize: usize },
}

impl Absmax {
    /// Number of blocks.
    pub fn len(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len(),
            Absmax::Nested { codes, .. } => codes.len(),
        }
    }

    /// Whether there are no blocks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The f32 scale of every block.
    pub fn values(&self) -> Result<Vec<f32>> {
        match self {
            Absmax::Plain(v) => Ok(v.clone()),
            Absmax::Nested { codes, nested_absmax, nested_map, offset, nested_blocksize } => {
                double_dequantize(codes, nested_absmax, nested_map, *offset, *nested_blocksize)
            }
        }
    }
}

/// Everything besides the packed codes needed to dequantise a 4-bit weight.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantState {
    pub quant_type: QuantType,
    pub blocksize: usize,
    /// The original weight's dtype as torch names it (`"bfloat16"`, `"float16"`, `"float32"`).
    pub dtype: String,
    pub shape: Vec<usize>,
    pub absmax: Absmax,
    /// The 16-entry 4-bit table (read from the file when loading).
    pub quant_map: Vec<f32>,
}

impl QuantState {
    /// Number of weight elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A 4-bit weight (NF4 or FP4) in bitsandbytes' layout: the packed codes and their state.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Weight {
    /// Two codes per byte, element 2j in the high nibble; `ceil(n/2)` bytes.
    pub packed: Vec<u8>,
    pub state: QuantState,
}

fn bad(name: &str, msg: impl Into<String>) -> Error {
    Error::BadTensor { name: name.into(), msg: msg.into() }
}

/// The raw bytes of a tensor (a `quant_storage` view is the same bytes in another dtype).
fn tensor_bytes(t: &Tensor, name: &str) -> Result<Vec<u8>> {
    Ok(match t.dtype() {
        DType::U8 => t.to_vec::<u8>()?,
        DType::BF16 => bytemuck::cast_slice(&t.to_vec::<half::bf16>()?).to_vec(),
        DType::F16 => bytemuck::cast_slice(&t.to_vec::<half::f16>()?).to_vec(),
        DType::F32 => bytemuck::cast_slice(&t.to_vec::<f32>()?).to_vec(),
        other => return Err(bad(name, format!("packed 4-bit weight stored as {other}; expected U8 or a BF16/F16/F32 quant_storage view"))),
    })
}

fn load_f32(files: &SafetensorsFiles, name: &str) -> Result<Vec<f32>> {
    let t = files.load(name)?;
    if t.dtype() != DType::F32 {
        return Err(bad(name, format!("dtype {}, expected F32", t.dtype())));
    }
    t.to_vec::<f32>()
}

fn json_usize(v: &serde_json::Value, key: &str, name: &str) -> Result<usize> {
    v.get(key)
        .and_then(|x| x.as_u64())
        .map(|x| x as usize)
        .ok_or_else(|| bad(name, format!("quant-state JSON: `{key}` is missing or not a non-negative integer")))
}

impl Nf4Weight {
    /// Quantises `weight` (row-major, `shape`) the way bitsandbytes' `quantize_4bit` does, with
    /// double quantisation of the scales when `double_quant` (`compress_statistics`). `dtype` is
    /// recorded as `"float32"`; set `state.dtype` to record another original dtype.
    pub fn quantize(weight: &[f32], shape: &[usize], quant_type: QuantType, blocksize: usize, double_quant: bool) -> Result<Nf4Weight> {
        let n: usize = shape.iter().product();
        if n != weight.len() {
            return Err(Error::Input(format!("4-bit quantisation: {} values for shape {shape:?} ({n} elements)", weight.len())));
        }
        let (packed, absmax) = quantize_4bit(weight, blocksize, quant_type)?;
        let absmax = if double_quant {
            let (codes, nested_absmax, offset) = double_quantize(&absmax)?;
            Absmax::Nested { codes, nested_absmax, nested_map: dynamic_map_signed_8bit(), offset, nested_blocksize: NESTED_BLOCKSIZE }
        } else {
            Absmax::Plain(absmax)
        };
        let state = QuantState { quant_type, blocksize, dtype: "float32".into(), shape: shape.to_vec(), absmax, quant_map: quant_type.table().to_vec() };
        Ok(Nf4Weight { packed, state })
    }

    /// The dequantised weight, row-major, f32: `quant_map[q] · absmax[block]`.
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        let s = &self.state;
        let absmax = s.absmax.values()?;
        let n = s.numel();
        // Use the file's table (identical to ours for real checkpoints) so loading is exact.
        let table: [f32; 16] = s.quant_map.as_slice().try_into().map_err(|_| Error::Input(format!("quant_map has {} entries (expected 16)", s.quant_map.len())))?;
        let mut out = dequantize_4bit(&self.packed, &absmax, n, s.blocksize, s.quant_type)?;
        if &table != s.quant_type.table() {
            for (i, v) in out.iter_mut().enumerate() {
                let byte = self.packed[i / 2];
                let q = if i % 2 == 0 { byte >> 4 } else { byte & 0x0F };
                *v = table[q as usize] * absmax[i / s.blocksize];
            }
        }
        Ok(out)
    }

    /// Reads the 4-bit weight of layer `prefix` (e.g. `model.layers.0.self_attn.q_proj`).
    pub fn from_safetensors(files: &SafetensorsFiles, prefix: &str) -> Result<Nf4Weight> {
        let w = format!("{prefix}.weight");
        let key_nf4 = format!("{w}.quant_state.bitsandbytes__nf4");
        let key_fp4 = format!("{w}.quant_state.bitsandbytes__fp4");
        let state_key = if files.contains(&key_nf4) {
            key_nf4
        } else if files.contains(&key_fp4) {
            key_fp4
        } else {
            return Err(Error::MissingTensor { path: files.path_of(&w).into(), name: key_nf4 });
        };

        // The JSON blob.
        let t = files.load(&state_key)?;
        if t.dtype() != DType::U8 {
            return Err(bad(&state_key, format!("dtype {}, expected U8 bytes of JSON", t.dtype())));
        }
        let text = String::from_utf8(t.to_vec::<u8>()?).map_err(|e| bad(&state_key, format!("not UTF-8: {e}")))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(&state_key, format!("quant-state JSON does not parse: {e}")))?;
        let qt_name = json.get("quant_type").and_then(|v| v.as_str()).ok_or_else(|| bad(&state_key, "quant-state JSON: `quant_type` is missing or not a string"))?;
        let quant_type = QuantType::parse(qt_name).map_err(|e| bad(&state_key, e.to_string()))?;
        if !state_key.ends_with(quant_type.as_str()) {
            return Err(bad(&state_key, format!("key says {} but JSON quant_type is {qt_name}", &state_key[state_key.len() - 3..])));
        }
        let blocksize = json_usize(&json, "blocksize", &state_key)?;
        check_blocksize(blocksize).map_err(|e| bad(&state_key, e.to_string()))?;
        let dtype = json.get("dtype").and_then(|v| v.as_str()).unwrap_or("float32").to_string();
        let shape: Vec<usize> = json
            .get("shape")
            .and_then(|v| v.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| bad(&state_key, "quant-state JSON: `shape` is missing or not a list of non-negative integers"))?;
        let n: usize = shape.iter().product();
        let nblocks = n.div_ceil(blocksize);

        // Packed codes.
        let wt = files.load(&w)?;
        let mut packed = tensor_bytes(&wt, &w)?;
        let need = n.div_ceil(2);
        let itemsize = wt.dtype().size_in_bytes();
        if packed.len() < need || packed.len() >= need + itemsize {
            return Err(bad(&w, format!("{} bytes of packed codes ({} {:?}) for shape {shape:?} ({n} values need {need} bytes)", packed.len(), wt.dtype(), wt.shape())));
        }
        packed.truncate(need);

        // The 4-bit table.
        let qm_key = format!("{w}.quant_map");
        let quant_map = load_f32(files, &qm_key)?;
        if quant_map.len() != 16 {
            return Err(bad(&qm_key, format!("{} entries, expected 16", quant_map.len())));
        }

        // Scales, plain or double-quantised.
        let am_key = format!("{w}.absmax");
        let am = files.load(&am_key)?;
        let nested = json.get("nested_offset").is_some() || files.contains(&format!("{w}.nested_absmax"));
        let absmax = if nested {
            if am.dtype() != DType::U8 {
                return Err(bad(&am_key, format!("dtype {} but the state is double-quantised (expected U8 codes)", am.dtype())));
            }
            let codes = am.to_vec::<u8>()?;
            let nb_key = format!("{w}.nested_absmax");
            let nested_absmax = load_f32(files, &nb_key)?;
            let nm_key = format!("{w}.nested_quant_map");
            let nested_map = load_f32(files, &nm_key)?;
            if nested_map.len() != 256 {
                return Err(bad(&nm_key, format!("{} entries, expected 256", nested_map.len())));
            }
            let offset = json.get("nested_offset").and_then(|v| v.as_f64()).ok_or_else(|| bad(&state_key, "quant-state JSON: `nested_offset` is missing or not a number"))? as f32;
            let nested_blocksize = match json.get("nested_blocksize") {
                None => NESTED_BLOCKSIZE,
                Some(_) => json_usize(&json, "nested_blocksize", &state_key)?,
            };
            check_blocksize(nested_blocksize).map_err(|e| bad(&state_key, format!("nested_blocksize: {e}")))?;
            if codes.len() != nblocks {
                return Err(bad(&am_key, format!("{} absmax codes for shape {shape:?} in blocks of {blocksize} (expected {nblocks})", codes.len())));
            }
            if nested_absmax.len() != nblocks.div_ceil(nested_blocksize) {
                return Err(bad(&nb_key, format!("{} values for {nblocks} absmax codes in blocks of {nested_blocksize} (expected {})", nested_absmax.len(), nblocks.div_ceil(nested_blocksize))));
            }
            Absmax::Nested { codes, nested_absmax, nested_map, offset, nested_blocksize }
        } else {
            if am.dtype() != DType::F32 {
                return Err(bad(&am_key, format!("dtype {}, expected F32", am.dtype())));
            }
            let v = am.to_vec::<f32>()?;
            if v.len() != nblocks {
                return Err(bad(&am_key, format!("{} absmax values for shape {shape:?} in blocks of {blocksize} (expected {nblocks})", v.len())));
            }
            Absmax::Plain(v)
        };
        Ok(Nf4Weight { packed, state: QuantState { quant_type, blocksize, dtype, shape, absmax, quant_map } })
    }

    /// The quant-state JSON, laid out as Python's `json.dumps` writes it.
    pub fn state_json(&self) -> String {
        let s = &self.state;
        let shape = s.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ");
        let mut j = format!("{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{shape}]", s.quant_type.as_str(), s.blocksize, s.dtype);
        if let Absmax::Nested { offset, nested_blocksize, .. } = &s.absmax {
            // The f32 offset widened to f64, printed shortest-round-trip as Python's float repr does.
            j += &format!(", \"nested_blocksize\": {nested_blocksize}, \"nested_dtype\": \"float32\", \"nested_offset\": {}", serde_json::Value::from(*offset as f64));
        }
        j.push('}');
        j
    }

    /// The checkpoint entries for layer `prefix`, keyed as bitsandbytes writes them (packed as U8).
    pub fn to_safetensors_entries(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        let w = format!("{prefix}.weight");
        let s = &self.state;
        let cpu = Device::Cpu;
        let mut out = vec![(w.clone(), Tensor::from_vec(self.packed.clone(), &[self.packed.len(), 1], cpu)?)];
        match &s.absmax {
            Absmax::Plain(v) => out.push((format!("{w}.absmax"), Tensor::from_vec(v.clone(), &[v.len()], cpu)?)),
            Absmax::Nested { codes, nested_absmax, nested_map, .. } => {
                out.push((format!("{w}.absmax"), Tensor::from_vec(codes.clone(), &[codes.len()], cpu)?));
                out.push((format!("{w}.nested_absmax"), Tensor::from_vec(nested_absmax.clone(), &[nested_absmax.len()], cpu)?));
                out.push((format!("{w}.nested_quant_map"), Tensor::from_vec(nested_map.clone(), &[nested_map.len()], cpu)?));
            }
        }
        out.push((format!("{w}.quant_map"), Tensor::from_vec(s.quant_map.clone(), &[s.quant_map.len()], cpu)?));
        let json = self.state_json().into_bytes();
        let n = json.len();
        out.push((format!("{w}.quant_state.bitsandbytes__{}", s.quant_type.as_str()), Tensor::from_vec(json, &[n], cpu)?));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::safetensors::save;
    use std::path::PathBuf;

    const P: &str = "model.layers.0.self_attn.q_proj";

    fn weights(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect()
    }

    fn write(name: &str, entries: &[(String, Tensor)]) -> SafetensorsFiles {
        let dir = std::env::temp_dir().join(format!("temper-quant-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p: PathBuf = dir.join("m.safetensors");
        save(&p, entries, None).unwrap();
        SafetensorsFiles::open_files(&[p]).unwrap()
    }

    #[test]
    fn save_then_load_round_trips_plain_and_nested() {
        for (double, qt) in [(false, QuantType::Nf4), (true, QuantType::Nf4), (true, QuantType::Fp4)] {
            let w = Nf4Weight::quantize(&weights(5 * 67), &[5, 67], qt, 64, double).unwrap();
            let f = write(&format!("rt-{double}-{}", qt.as_str()), &w.to_safetensors_entries(P).unwrap());
            let back = Nf4Weight::from_safetensors(&f, P).unwrap();
            assert_eq!(back.packed, w.packed);
            assert_eq!(back.state, w.state);
            assert_eq!(back.dequantize().unwrap(), w.dequantize().unwrap());
        }
    }

    #[test]
    fn quant_storage_views_load_as_the_same_bytes() {
        let w = Nf4Weight::quantize(&weights(8 * 64), &[8, 64], QuantType::Nf4, 64, false).unwrap();
        let mut entries = w.to_safetensors_entries(P).unwrap();
        let halves: Vec<half::bf16> = bytemuck::pod_collect_to_vec(&w.packed);
        entries[0].1 = Tensor::from_vec(halves.clone(), &[halves.len(), 1], Device::Cpu).unwrap();
        let back = Nf4Weight::from_safetensors(&write("bf16view", &entries), P).unwrap();
        assert_eq!(back.packed, w.packed);
    }

    fn expect_err(name: &str, entries: Vec<(String, Tensor)>, needle: &str) {
        let e = Nf4Weight::from_safetensors(&write(name, &entries), P).unwrap_err().to_string();
        assert!(e.contains(needle), "{name}: `{e}` should mention `{needle}`");
    }

    fn with(mut entries: Vec<(String, Tensor)>, key: &str, t: Option<Tensor>) -> Vec<(String, Tensor)> {
        let i = entries.iter().position(|(k, _)| k == key).unwrap();
        match t {
            Some(t) => entries[i].1 = t,
            None => {
                entries.remove(i);
            }
        }
        entries
    }

    #[test]
    fn bad_checkpoints_give_errors_naming_the_key() {
        let w = Nf4Weight::quantize(&weights(4 * 64), &[4, 64], QuantType::Nf4, 64, true).unwrap();
        let e = w.to_safetensors_entries(P).unwrap();
        let sk = format!("{P}.weight.quant_state.bitsandbytes__nf4");
        let bytes = |s: &str| Tensor::from_vec(s.as_bytes().to_vec(), &[s.len()], Device::Cpu).unwrap();
        expect_err("missing-state", with(e.clone(), &sk, None), &sk);
        expect_err("missing-nested", with(e.clone(), &format!("{P}.weight.nested_quant_map"), None), "nested_quant_map");
        expect_err("bad-json", with(e.clone(), &sk, Some(bytes("{not json"))), &sk);
        let j = w.state_json().replace("\"blocksize\": 64", "\"blocksize\": 48");
        expect_err("bad-blocksize", with(e.clone(), &sk, Some(bytes(&j))), "blocksize 48");
        let j = w.state_json().replace("[4, 64]", "[4, 80]");
        expect_err("bad-shape", with(e.clone(), &sk, Some(bytes(&j))), &format!("{P}.weight"));
        let j = w.state_json().replace("[4, 64]", "[4, 40]");
        let short = Tensor::from_vec(w.packed[..80].to_vec(), &[80, 1], Device::Cpu).unwrap();
        expect_err("bad-absmax-count", with(with(e.clone(), &sk, Some(bytes(&j))), &format!("{P}.weight"), Some(short)), "absmax");
    }

    #[test]
    fn state_json_matches_python_json_dumps_layout() {
        let w = Nf4Weight::quantize(&weights(2 * 64), &[2, 64], QuantType::Nf4, 64, false).unwrap();
        assert_eq!(w.state_json(), r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [2, 64]}"#);
    }
}
