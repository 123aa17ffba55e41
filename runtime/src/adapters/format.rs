//! How an adapter's settings are written to and read from `adapter_config.json`.
//!
//! The built-in LoRA family writes PEFT's own config (so PEFT, vLLM and transformers load it);
//! a user's adapter gets temper's generic form by default:
//! `{"peft_type": "TEMPER", "temper_adapter": <name>, "config": {…}, "layers": {<module>: {…}},
//! "target_modules": [...], "base_model_name_or_path": …}` where `layers` lists only the modules
//! whose hyper-parameters differ from `config`.

use super::adapter::Adapter;
use super::config::{AdapterConfig, Targets};
use crate::error::{Error, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

/// The value most layers share (ties: the first), with the layers that differ from it.
pub fn common_value<T: Clone + PartialEq>(layers: &[(String, T)]) -> Option<(T, Vec<(String, T)>)> {
    let mut best: Option<(&T, usize)> = None;
    for (_, v) in layers {
        let n = layers.iter().filter(|(_, w)| w == v).count();
        if best.is_none_or(|(_, m)| n > m) {
            best = Some((v, n));
        }
    }
    let (v, _) = best?;
    Some((v.clone(), layers.iter().filter(|(_, w)| w != v).cloned().collect()))
}

/// Reading and writing `adapter_config.json`. `#[adapter]` implements it with the generic form
/// unless the adapter says `#[adapter(format = custom)]` and implements it by hand.
pub trait AdapterFormat: Adapter {
    /// The config file for this adapter on `layers` (module path, hyper-parameters) of a model
    /// whose linear layers are `model_linears`.
    fn write_config(layers: &[(String, Self::Config)], model_linears: &[String], base_model: Option<&str>) -> Result<Value> {
        let _ = model_linears;
        let to_json = |c: &Self::Config| serde_json::to_value(c).map_err(|e| Error::Input(format!("cannot serialise {} config: {e}", Self::NAME)));
        let Some((common, differ)) = common_value(layers) else {
            return Err(Error::Input(format!("adapter {} is on no layer", Self::NAME)));
        };
        let mut per = Map::new();
        for (m, c) in &differ {
            per.insert(m.clone(), to_json(c)?);
        }
        Ok(json!({
            "peft_type": "TEMPER",
            "temper_adapter": Self::NAME,
            "config": to_json(&common)?,
            "layers": per,
            "target_modules": layers.iter().map(|(m, _)| m.clone()).collect::<Vec<_>>(),
            "base_model_name_or_path": base_model,
        }))
    }

    /// The settings stored in a config file written by [`AdapterFormat::write_config`], for a
    /// model whose linear layers are `model_linears`.
    fn read_config(v: &Value, path: &Path, model_linears: &[String]) -> Result<AdapterConfig<Self>> {
        let _ = model_linears;
        let err = |key: &str, msg: String| Error::Config { path: path.into(), key: key.into(), msg };
        let kind = v.get("temper_adapter").and_then(Value::as_str).unwrap_or("");
        if kind != Self::NAME {
            let peft = v.get("peft_type").and_then(Value::as_str).unwrap_or("?");
            return Err(err("temper_adapter", format!("this folder holds a `{kind}` adapter (peft_type {peft}), not {}", Self::NAME)));
        }
        let parse = |key: &str, x: &Value| serde_json::from_value::<Self::Config>(x.clone()).map_err(|e| err(key, format!("{e}")));
        let hyper = parse("config", v.get("config").ok_or_else(|| err("config", "missing".into()))?)?;
        let mut cfg = AdapterConfig::new(hyper);
        if let Some(Value::Object(layers)) = v.get("layers") {
            for (m, x) in layers {
                cfg.patterns.push((regex::escape(m), parse(&format!("layers.{m}"), x)?));
            }
        }
        if let Some(Value::Array(t)) = v.get("target_modules") {
            cfg.targets = Targets::Names(t.iter().filter_map(|s| s.as_str().map(String::from)).collect());
        }
        Ok(cfg)
    }
}
