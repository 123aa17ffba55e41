//! PEFT LoRA adapter folders: `adapter_config.json` + `adapter_model.safetensors`, with PEFT's keys
//! (`base_model.model.<module>.lora_A.weight`, `…lora_B.weight`) and scaling (alpha/r, rsLoRA
//! alpha/√r, per-module `rank_pattern` / `alpha_pattern`).

use super::LoraDelta;
use crate::error::{Error, Result};
use crate::formats::safetensors::SafetensorsFiles;
use crate::tensor::{DType, Tensor};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The fields of `adapter_config.json` temper reads.
#[derive(Clone, Debug, PartialEq)]
pub struct PeftLoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    /// Module-name suffix (or regex-free pattern) → rank.
    pub rank_pattern: BTreeMap<String, usize>,
    /// Module-name suffix → alpha.
    pub alpha_pattern: BTreeMap<String, f64>,
    pub base_model_name_or_path: Option<String>,
}

/// A loaded PEFT LoRA adapter: one delta per adapted module, keyed by module path
/// (`model.layers.0.self_attn.q_proj`).
#[derive(Clone, Debug)]
pub struct PeftLoraAdapter {
    pub dir: PathBuf,
    pub config: PeftLoraConfig,
    pub deltas: BTreeMap<String, LoraDelta>,
}

const PREFIX: &str = "base_model.model.";

/// PEFT's key of a LoRA tensor (`which` is `lora_A` or `lora_B`).
pub fn peft_key(module: &str, which: &str) -> String {
    format!("{PREFIX}{module}.{which}.weight")
}

/// The pattern entry that applies to `module`: PEFT matches a key when the module name is the key or
/// ends with `.key`.
fn pattern_value<'a, T>(patterns: &'a BTreeMap<String, T>, module: &str) -> Option<&'a T> {
    patterns.iter().find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}"))).map(|(_, v)| v)
}

impl PeftLoraConfig {
    fn from_file(path: &Path) -> Result<PeftLoraConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
        let err = |key: &str, msg: String| Error::Config { path: path.into(), key: key.into(), msg };
        let peft_type = v.get("peft_type").and_then(|x| x.as_str()).unwrap_or("LORA");
        if peft_type != "LORA" {
            return Err(err("peft_type", format!("`{peft_type}` adapters are not supported (only LORA)")));
        }
        for (key, why) in [("use_dora", "DoRA arrives with the adapter issue"), ("fan_in_fan_out", "Llama-family linears are not Conv1D")] {
            if v.get(key).and_then(|x| x.as_bool()) == Some(true) {
                return Err(err(key, format!("true is not supported: {why}")));
            }
        }
        if let Some(b) = v.get("bias").and_then(|x| x.as_str()).filter(|b| *b != "none") {
            return Err(err("bias", format!("`{b}` is not supported (only \"none\")")));
        }
        if v.get("modules_to_save").is_some_and(|m| !m.is_null() && m.as_array().is_none_or(|a| !a.is_empty())) {
            return Err(err("modules_to_save", "fully saved modules are not supported yet".into()));
        }
        let r = v.get("r").and_then(|x| x.as_u64()).ok_or_else(|| err("r", "required positive integer".into()))? as usize;
        let lora_alpha = v.get("lora_alpha").and_then(|x| x.as_f64()).ok_or_else(|| err("lora_alpha", "required number".into()))?;
        let map = |key: &str| -> Result<BTreeMap<String, f64>> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(BTreeMap::new()),
                Some(Value::Object(o)) => o
                    .iter()
                    .map(|(k, x)| x.as_f64().map(|f| (k.clone(), f)).ok_or_else(|| err(&format!("{key}.{k}"), "expected a number".into())))
                    .collect(),
                Some(other) => Err(err(key, format!("expected an object, got {other}"))),
            }
        };
        Ok(PeftLoraConfig {
            r,
            lora_alpha,
            use_rslora: v.get("use_rslora").and_then(|x| x.as_bool()).unwrap_or(false),
            rank_pattern: map("rank_pattern")?.into_iter().map(|(k, f)| (k, f as usize)).collect(),
            alpha_pattern: map("alpha_pattern")?,
            base_model_name_or_path: v.get("base_model_name_or_path").and_then(|x| x.as_str()).map(String::from),
        })
    }

    /// Rank and scale PEFT uses for `module`.
    pub fn rank_and_scale(&self, module: &str) -> (usize, f64) {
        let r = pattern_value(&self.rank_pattern, module).copied().unwrap_or(self.r);
        let alpha = pattern_value(&self.alpha_pattern, module).copied().unwrap_or(self.lora_alpha);
        let scale = if self.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        (r, scale)
    }
}

impl PeftLoraAdapter {
    /// Loads a PEFT LoRA folder, converting weights to `dtype`.
    pub fn load(dir: &Path, dtype: DType) -> Result<PeftLoraAdapter> {
        let config = PeftLoraConfig::from_file(&dir.join("adapter_config.json"))?;
        let file = dir.join("adapter_model.safetensors");
        if !file.exists() {
            return Err(Error::format(dir, "no adapter_model.safetensors in this adapter folder"));
        }
        let files = SafetensorsFiles::open_files(std::slice::from_ref(&file))?;
        let mut deltas = BTreeMap::new();
        for name in files.names() {
            let module = name
                .strip_prefix(PREFIX)
                .and_then(|n| n.strip_suffix(".lora_A.weight"))
                .map(String::from);
            let Some(module) = module else {
                if name.ends_with(".lora_B.weight") && name.starts_with(PREFIX) {
                    continue;
                }
                return Err(Error::BadTensor { name: name.into(), msg: format!("in {}: not a PEFT LoRA key (base_model.model.<module>.lora_A/lora_B.weight)", file.display()) });
            };
            let b_name = peft_key(&module, "lora_B");
            if !files.contains(&b_name) {
                return Err(Error::MissingTensor { path: file.clone(), name: b_name });
            }
            let a = files.load(name)?;
            let b = files.load(&b_name)?;
            let (r, scale) = config.rank_and_scale(&module);
            let bad = |n: &str, t: &Tensor, want: String| Error::BadTensor { name: n.into(), msg: format!("in {}: shape {:?}, expected {want}", file.display(), t.shape()) };
            if a.rank() != 2 || a.shape()[0] != r {
                return Err(bad(name, &a, format!("[{r}, in_features] (r = {r} from adapter_config.json)")));
            }
            if b.rank() != 2 || b.shape()[1] != r {
                return Err(bad(&b_name, &b, format!("[out_features, {r}]")));
            }
            deltas.insert(module, LoraDelta { lora_a: a.to_dtype(dtype)?, lora_b: b.to_dtype(dtype)?, scale });
        }
        if deltas.is_empty() {
            return Err(Error::format(&file, "the adapter holds no LoRA tensors"));
        }
        Ok(PeftLoraAdapter { dir: dir.into(), config, deltas })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_follows_rslora_and_patterns() {
        let mut c = PeftLoraConfig {
            r: 8,
            lora_alpha: 16.0,
            use_rslora: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            base_model_name_or_path: None,
        };
        assert_eq!(c.rank_and_scale("model.layers.0.self_attn.q_proj"), (8, 2.0));
        c.use_rslora = true;
        assert!((c.rank_and_scale("model.layers.0.self_attn.q_proj").1 - 16.0 / 8f64.sqrt()).abs() < 1e-12);
        c.use_rslora = false;
        c.rank_pattern.insert("q_proj".into(), 4);
        c.alpha_pattern.insert("model.layers.1.mlp.down_proj".into(), 2.0);
        assert_eq!(c.rank_and_scale("model.layers.0.self_attn.q_proj"), (4, 4.0));
        assert_eq!(c.rank_and_scale("model.layers.1.mlp.down_proj"), (8, 0.25));
        assert_eq!(c.rank_and_scale("model.layers.1.mlp.xdown_proj"), (8, 2.0));
    }
}
