//! PEFT's `adapter_config.json` for the LoRA family (`peft_type: "LORA"`, DoRA as `use_dora`),
//! read and written so PEFT, transformers and vLLM load what temper saves and the other way round.
//! Tensor keys are `base_model.model.<module>.lora_A.weight` `[r, in]`, `….lora_B.weight`
//! `[out, r]`, DoRA's `….lora_magnitude_vector` `[out]` (see [`super::host::peft_key`]).

use super::config::pattern_matches;
use super::format::common_value;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;
use std::path::Path;

/// How LoRA's matrices start, PEFT's `init_lora_weights`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "Value", try_from = "Value")]
pub enum LoraInit {
    /// `true`: A Kaiming-uniform, B zero — the adapter starts as the identity.
    #[default]
    Default,
    /// `"olora"`: A, B from the QR decomposition of W (B = Q[:, :r], A = R[:r]); the base keeps
    /// the residual W − s·B·A, so the model is unchanged at start.
    Olora,
}

impl From<LoraInit> for Value {
    fn from(i: LoraInit) -> Value {
        match i {
            LoraInit::Default => Value::Bool(true),
            LoraInit::Olora => Value::String("olora".into()),
        }
    }
}

impl TryFrom<Value> for LoraInit {
    type Error = String;
    /// `false` and `"gaussian"` only change how PEFT drew the starting values, which a saved
    /// adapter's tensors replace; they load as `Default`.
    fn try_from(v: Value) -> std::result::Result<LoraInit, String> {
        match &v {
            Value::Bool(_) => Ok(LoraInit::Default),
            Value::String(s) if s == "gaussian" => Ok(LoraInit::Default),
            Value::String(s) if s == "olora" => Ok(LoraInit::Olora),
            other => Err(format!("init_lora_weights {other} is not supported (true, false, \"gaussian\" or \"olora\")")),
        }
    }
}

/// The hyper-parameters LoRA and DoRA share, under PEFT's names.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSettings {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub use_rslora: bool,
    pub init_lora_weights: LoraInit,
}

impl LoraSettings {
    /// `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

fn last(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

/// `target_modules` as PEFT writes it: the layer names (`q_proj`) when they select exactly the
/// adapted layers, otherwise the full module paths.
fn target_modules(adapted: &[String], model_linears: &[String]) -> Vec<String> {
    let names: BTreeSet<&str> = adapted.iter().map(|m| last(m)).collect();
    let selected = model_linears.iter().filter(|m| names.contains(last(m))).count();
    if selected == adapted.len() {
        names.into_iter().map(String::from).collect()
    } else {
        let mut v = adapted.to_vec();
        v.sort();
        v
    }
}

/// PEFT's `adapter_config.json` for LoRA (or DoRA) on `layers`.
pub fn write_lora_config(layers: &[(String, LoraSettings)], model_linears: &[String], use_dora: bool, base_model: Option<&str>) -> Result<Value> {
    let ranks: Vec<(String, usize)> = layers.iter().map(|(m, s)| (m.clone(), s.r)).collect();
    let alphas: Vec<(String, u64)> = layers.iter().map(|(m, s)| (m.clone(), s.lora_alpha.to_bits())).collect();
    let (Some((r, r_differ)), Some((alpha_bits, a_differ))) = (common_value(&ranks), common_value(&alphas)) else {
        return Err(Error::Input("the adapter is on no layer".into()));
    };
    let first = &layers[0].1;
    for (m, s) in layers {
        if s.lora_dropout != first.lora_dropout || s.use_rslora != first.use_rslora || s.init_lora_weights != first.init_lora_weights {
            return Err(Error::Input(format!("`{m}` differs from `{}` in lora_dropout, use_rslora or init_lora_weights, which PEFT's config cannot express per layer", layers[0].0)));
        }
    }
    let rank_pattern: Map<String, Value> = r_differ.into_iter().map(|(m, r)| (m, json!(r))).collect();
    let alpha_pattern: Map<String, Value> = a_differ.into_iter().map(|(m, a)| (m, json!(f64::from_bits(a)))).collect();
    let adapted: Vec<String> = layers.iter().map(|(m, _)| m.clone()).collect();
    let alpha = f64::from_bits(alpha_bits);
    Ok(json!({
        "alpha_pattern": alpha_pattern,
        "auto_mapping": null,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": Value::from(first.init_lora_weights),
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": if alpha.fract() == 0.0 { json!(alpha as i64) } else { json!(alpha) },
        "lora_dropout": first.lora_dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": rank_pattern,
        "revision": null,
        "target_modules": target_modules(&adapted, model_linears),
        "task_type": "CAUSAL_LM",
        "use_dora": use_dora,
        "use_rslora": first.use_rslora,
    }))
}

/// The per-layer settings in a PEFT LoRA config: the default, and an exact entry for every layer of
/// `model_linears` whose rank or alpha a pattern changes.
pub fn read_lora_config(v: &Value, path: &Path, model_linears: &[String], want_dora: bool) -> Result<(LoraSettings, Vec<(String, LoraSettings)>)> {
    let err = |key: &str, msg: String| Error::Config { path: path.into(), key: key.into(), msg };
    let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(err("peft_type", format!("`{peft_type}` adapters are not supported (only LORA, with or without use_dora)")));
    }
    let dora = v.get("use_dora").and_then(Value::as_bool).unwrap_or(false);
    if dora != want_dora {
        let (is, load) = if dora { ("a DoRA", "Dora") } else { ("a plain LoRA", "Lora") };
        return Err(err("use_dora", format!("this is {is} adapter; load it as `{load}`")));
    }
    if v.get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
        return Err(err("fan_in_fan_out", "true is not supported: Llama-family linears are not Conv1D".into()));
    }
    if let Some(b) = v.get("bias").and_then(Value::as_str).filter(|b| *b != "none") {
        return Err(err("bias", format!("`{b}` is not supported (only \"none\")")));
    }
    if v.get("modules_to_save").is_some_and(|m| !m.is_null() && m.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(err("modules_to_save", "fully saved modules are not supported".into()));
    }
    let r = v.get("r").and_then(Value::as_u64).filter(|&r| r > 0).ok_or_else(|| err("r", "required positive integer".into()))? as usize;
    let lora_alpha = v.get("lora_alpha").and_then(Value::as_f64).ok_or_else(|| err("lora_alpha", "required number".into()))?;
    let init_lora_weights = match v.get("init_lora_weights") {
        None | Some(Value::Null) => LoraInit::Default,
        Some(x) => LoraInit::try_from(x.clone()).map_err(|m| err("init_lora_weights", m))?,
    };
    let base = LoraSettings {
        r,
        lora_alpha,
        lora_dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        use_rslora: v.get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
        init_lora_weights,
    };
    let map = |key: &str| -> Result<Vec<(String, f64)>> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Object(o)) => o
                .iter()
                .map(|(k, x)| x.as_f64().map(|f| (k.clone(), f)).ok_or_else(|| err(&format!("{key}.{k}"), "expected a number".into())))
                .collect(),
            Some(other) => Err(err(key, format!("expected an object, got {other}"))),
        }
    };
    let (ranks, alphas) = (map("rank_pattern")?, map("alpha_pattern")?);
    let mut per_layer = Vec::new();
    for m in model_linears {
        let mut s = base.clone();
        for (k, r) in &ranks {
            if pattern_matches(k, m).map_err(|e| err("rank_pattern", e.to_string()))? {
                s.r = *r as usize;
                break;
            }
        }
        for (k, a) in &alphas {
            if pattern_matches(k, m).map_err(|e| err("alpha_pattern", e.to_string()))? {
                s.lora_alpha = *a;
                break;
            }
        }
        if s != base {
            per_layer.push((regex::escape(m), s));
        }
    }
    Ok((base, per_layer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linears() -> Vec<String> {
        (0..2).flat_map(|l| ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"].map(|p| format!("model.layers.{l}.{p}"))).collect()
    }

    #[test]
    fn patterns_resolve_per_layer_like_peft() {
        let v = json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": false,
            "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"model.layers.1.mlp.down_proj": 2}});
        let (base, per) = read_lora_config(&v, Path::new("a.json"), &linears(), false).unwrap();
        assert_eq!((base.r, base.scale()), (8, 2.0));
        let get = |m: &str| per.iter().find(|(p, _)| *p == regex::escape(m)).map(|(_, s)| s.clone()).unwrap_or(base.clone());
        assert_eq!(get("model.layers.0.self_attn.q_proj").r, 4);
        assert_eq!(get("model.layers.1.mlp.down_proj").scale(), 0.25);
        assert_eq!(get("model.layers.0.mlp.down_proj").scale(), 2.0);
        let rs = LoraSettings { use_rslora: true, ..base };
        assert!((rs.scale() - 16.0 / 8f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn written_config_reads_back_with_the_same_layers() {
        let s = |r, a| LoraSettings { r, lora_alpha: a, lora_dropout: 0.05, use_rslora: false, init_lora_weights: LoraInit::Default };
        let layers: Vec<(String, LoraSettings)> = linears().into_iter().enumerate().map(|(i, m)| (m, if i == 1 { s(2, 4.0) } else { s(8, 16.0) })).collect();
        let v = write_lora_config(&layers, &linears(), false, Some("base")).unwrap();
        assert_eq!(v["target_modules"], json!(["down_proj", "q_proj", "v_proj"]));
        assert_eq!(v["r"], json!(8));
        let (base, per) = read_lora_config(&v, Path::new("a.json"), &linears(), false).unwrap();
        assert_eq!(base, s(8, 16.0));
        assert_eq!(per, vec![(regex::escape("model.layers.0.self_attn.v_proj"), s(2, 4.0))]);
        assert!(read_lora_config(&v, Path::new("a.json"), &linears(), true).unwrap_err().to_string().contains("load it as `Lora`"));
    }
}
