//! Hugging Face `config.json` for the Llama family (LlamaForCausalLM, MistralForCausalLM,
//! Qwen2ForCausalLM, Qwen3ForCausalLM), in both rope layouts people have: top-level
//! `rope_theta`/`rope_scaling` (transformers 4, most hub checkpoints) and `rope_parameters`
//! (transformers 5).

use crate::error::{Error, Result};
use crate::ops::RopeScaling;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Which member of the Llama family a checkpoint is. They share one decoder; the differences are
/// biases, q/k norms and sliding windows, all carried by [`ModelConfig`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Architecture {
    /// The transformers class name.
    pub fn class_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// Everything the decoder needs to know about a model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on o_proj.
    pub o_bias: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
    /// Qwen3's RMSNorm of each query and key head.
    pub qk_norm: bool,
    /// Sliding-window size per layer (None = full attention).
    pub layer_windows: Vec<Option<usize>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// `torch_dtype` / `dtype` as written, for information.
    pub dtype: Option<String>,
    /// A sequence classifier (`LlamaForSequenceClassification`, …: a reward model with one label)
    /// has a `score` head `[num_labels, hidden]` read at the last non-pad token; None: a causal LM.
    pub num_labels: Option<usize>,
}

struct Reader<'a> {
    path: &'a Path,
    v: &'a Value,
}

impl<'a> Reader<'a> {
    fn err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::Config { path: PathBuf::from(self.path), key: key.into(), msg: msg.into() }
    }
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.err(key, "required, missing"))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| self.err(key, format!("expected a non-negative integer, got {v}"))),
        }
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err(key, format!("expected a number, got {v}"))),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(key, format!("expected true or false, got {v}"))),
        }
    }
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.get(key) {
            None => Ok(vec![]),
            Some(Value::Array(a)) => a.iter().map(|x| x.as_u64().map(|x| x as u32).ok_or_else(|| self.err(key, "expected integers"))).collect(),
            Some(v) => v.as_u64().map(|x| vec![x as u32]).ok_or_else(|| self.err(key, format!("expected an integer or a list, got {v}"))),
        }
    }
}

/// Parses the rope entry: `rope_parameters` (v5) or `rope_theta` + `rope_scaling` (v4).
fn parse_rope(r: &Reader) -> Result<(f64, RopeScaling)> {
    let (obj, key, theta) = if let Some(p) = r.get("rope_parameters") {
        let sub = Reader { path: r.path, v: p };
        (Some(p), "rope_parameters", sub.f64_or("rope_theta", r.f64_or("rope_theta", 10000.0)?)?)
    } else {
        (r.get("rope_scaling"), "rope_scaling", r.f64_or("rope_theta", 10000.0)?)
    };
    let Some(obj) = obj else { return Ok((theta, RopeScaling::Default)) };
    let s = Reader { path: r.path, v: obj };
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
    let factor = || -> Result<f64> {
        s.get("factor").and_then(|v| v.as_f64()).ok_or_else(|| r.err(&format!("{key}.factor"), "required for this rope_type"))
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "llama3" => RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: s.f64_or("low_freq_factor", 1.0)?,
            high_freq_factor: s.f64_or("high_freq_factor", 4.0)?,
            original_max_position_embeddings: s
                .get("original_max_position_embeddings")
                .and_then(|v| v.as_f64())
                .ok_or_else(|| r.err(&format!("{key}.original_max_position_embeddings"), "required for llama3 rope scaling"))?,
        },
        other => return Err(r.err(&format!("{key}.rope_type"), format!("rope type `{other}` is not supported (supported: default, linear, llama3)"))),
    };
    Ok((theta, scaling))
}

impl ModelConfig {
    /// Reads `config.json`.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(path, &text)
    }

    /// Parses config JSON; `path` is only used in messages.
    pub fn from_json(path: &Path, text: &str) -> Result<ModelConfig> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
        let r = Reader { path, v: &v };
        let arch_names: Vec<&str> = r.get("architectures").and_then(|a| a.as_array()).map(|a| a.iter().filter_map(|x| x.as_str()).collect()).unwrap_or_default();
        let model_type = r.get("model_type").and_then(|x| x.as_str()).unwrap_or("");
        // `XForSequenceClassification` is the same decoder with a `score` head instead of `lm_head`.
        let classifier = arch_names.first().and_then(|a| a.strip_suffix("ForSequenceClassification"));
        let num_labels = match classifier {
            None => None,
            Some(_) => Some(match r.opt_usize("num_labels")? {
                Some(n) => n,
                // transformers' default is 2 unless id2label says otherwise.
                None => r.get("id2label").and_then(|m| m.as_object()).map_or(2, |m| m.len()),
            }),
        };
        let causal = classifier.map(|c| format!("{c}ForCausalLM"));
        let architecture = match (causal.as_deref().or(arch_names.first().copied()), model_type) {
            (Some("LlamaForCausalLM"), _) | (None, "llama") => Architecture::Llama,
            (Some("MistralForCausalLM"), _) | (None, "mistral") => Architecture::Mistral,
            (Some("Qwen2ForCausalLM"), _) | (None, "qwen2") => Architecture::Qwen2,
            (Some("Qwen3ForCausalLM"), _) | (None, "qwen3") => Architecture::Qwen3,
            (Some(other), _) => {
                return Err(r.err("architectures", format!("`{other}` is not supported (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, and their ForSequenceClassification forms)")))
            }
            (None, other) => return Err(r.err("model_type", format!("no `architectures` and model_type `{other}` is not one of llama, mistral, qwen2, qwen3"))),
        };
        let hidden_size = r.usize("hidden_size")?;
        let heads = r.usize("num_attention_heads")?;
        if heads == 0 {
            return Err(r.err("num_attention_heads", "must be positive"));
        }
        let kv_heads = r.opt_usize("num_key_value_heads")?.unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(r.err("num_key_value_heads", format!("{kv_heads} does not divide num_attention_heads {heads}")));
        }
        let head_dim = r.opt_usize("head_dim")?.unwrap_or(hidden_size / heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(r.err("head_dim", format!("{head_dim} must be even and positive for rotary embeddings")));
        }
        let layers = r.usize("num_hidden_layers")?;
        let (rope_theta, rope_scaling) = parse_rope(&r)?;
        let window = r.opt_usize("sliding_window")?;
        let layer_windows = match architecture {
            Architecture::Mistral => vec![window; layers],
            Architecture::Qwen2 | Architecture::Qwen3 if r.bool_or("use_sliding_window", false)? => {
                let from = r.opt_usize("max_window_layers")?.unwrap_or(layers);
                (0..layers).map(|i| if i >= from { window } else { None }).collect()
            }
            _ => vec![None; layers],
        };
        let attention_bias = r.bool_or("attention_bias", false)?;
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            Architecture::Mistral => (false, false),
            Architecture::Llama | Architecture::Qwen3 => (attention_bias, attention_bias),
        };
        Ok(ModelConfig {
            architecture,
            vocab_size: r.usize("vocab_size")?,
            hidden_size,
            intermediate_size: r.usize("intermediate_size")?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: r.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            max_position_embeddings: r.opt_usize("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: r.bool_or("tie_word_embeddings", false)?,
            qkv_bias,
            o_bias,
            mlp_bias: r.bool_or("mlp_bias", false)?,
            qk_norm: architecture == Architecture::Qwen3,
            layer_windows,
            bos_token_id: r.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: r.token_ids("eos_token_id")?,
            pad_token_id: r.token_ids("pad_token_id")?.first().copied(),
            dtype: r.get("torch_dtype").or_else(|| r.get("dtype")).and_then(|v| v.as_str()).map(String::from),
            num_labels,
        })
    }

    /// `config.json` as transformers writes it for this architecture, with `torch_dtype` set to
    /// the weights' dtype. [`ModelConfig::from_json`] of the result gives `self` back.
    pub fn to_hf_json(&self, dtype: &str) -> Value {
        let rope_scaling = match &self.rope_scaling {
            RopeScaling::Default => Value::Null,
            RopeScaling::Linear { factor } => serde_json::json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => serde_json::json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                // transformers insists on an integer here.
                "original_max_position_embeddings": *original_max_position_embeddings as u64,
            }),
        };
        let model_type = match self.architecture {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        };
        let first_window = self.layer_windows.iter().position(|w| w.is_some());
        let window = first_window.and_then(|i| self.layer_windows[i]);
        let class = match self.num_labels {
            Some(_) => self.architecture.class_name().replace("ForCausalLM", "ForSequenceClassification"),
            None => self.architecture.class_name().to_string(),
        };
        let mut v = serde_json::json!({
            "architectures": [class],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.qkv_bias && self.architecture != Architecture::Qwen2,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() { [one] => serde_json::json!(one), many => serde_json::json!(many) },
            "pad_token_id": self.pad_token_id,
            "torch_dtype": dtype,
            "sliding_window": window,
        });
        if matches!(self.architecture, Architecture::Qwen2 | Architecture::Qwen3) {
            v["use_sliding_window"] = Value::Bool(window.is_some());
            v["max_window_layers"] = serde_json::json!(first_window.unwrap_or(self.num_hidden_layers));
        }
        if let Some(n) = self.num_labels {
            let id2label: serde_json::Map<String, Value> = (0..n).map(|i| (i.to_string(), Value::String(format!("LABEL_{i}")))).collect();
            let label2id: serde_json::Map<String, Value> = (0..n).map(|i| (format!("LABEL_{i}"), serde_json::json!(i))).collect();
            v["num_labels"] = serde_json::json!(n);
            v["id2label"] = Value::Object(id2label);
            v["label2id"] = Value::Object(label2id);
        }
        v
    }

    /// Number of parameters the decoder has with this configuration.
    pub fn parameter_count(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv) = (self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim);
        let mut layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h;
        if self.qkv_bias {
            layer += q + 2 * kv;
        }
        if self.o_bias {
            layer += h;
        }
        if self.mlp_bias {
            layer += 2 * i + h;
        }
        if self.qk_norm {
            layer += 2 * self.head_dim;
        }
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers * layer + h + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ModelConfig> {
        ModelConfig::from_json(Path::new("config.json"), s)
    }

    const BASE: &str = r#""hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100"#;

    #[test]
    fn both_rope_layouts_parse_to_the_same_scaling() {
        let legacy = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rope_theta": 500000.0,
               "rope_scaling": {{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        ))
        .unwrap();
        let v5 = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE},
               "rope_parameters": {{"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        ))
        .unwrap();
        assert_eq!(legacy, v5);
        assert_eq!(v5.rope_theta, 500000.0);
        assert!(matches!(v5.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn unknown_architecture_and_missing_keys_name_the_key() {
        let e = parse(&format!(r#"{{"architectures": ["GPT2LMHeadModel"], {BASE}}}"#)).unwrap_err().to_string();
        assert!(e.contains("architectures") && e.contains("GPT2LMHeadModel"), "{e}");
        let e = parse(r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 8}"#).unwrap_err().to_string();
        assert!(e.contains("num_attention_heads"), "{e}");
        let e = parse(&format!(r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rope_scaling": {{"rope_type": "yarn", "factor": 4.0}}}}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("yarn"), "{e}");
        let e = parse(&format!(r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "num_key_value_heads": 3}}"#)).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        assert!(parse("{not json").unwrap_err().to_string().contains("config.json"));
    }

    #[test]
    fn qwen2_has_qkv_bias_and_qwen3_has_qk_norm() {
        let q2 = parse(&format!(r#"{{"architectures": ["Qwen2ForCausalLM"], {BASE}, "tie_word_embeddings": true}}"#)).unwrap();
        assert!(q2.qkv_bias && !q2.o_bias && !q2.qk_norm && q2.tie_word_embeddings);
        let q3 = parse(&format!(r#"{{"architectures": ["Qwen3ForCausalLM"], {BASE}, "head_dim": 32}}"#)).unwrap();
        assert!(q3.qk_norm && !q3.qkv_bias && q3.head_dim == 32);
        let m = parse(&format!(r#"{{"architectures": ["MistralForCausalLM"], {BASE}, "sliding_window": 4096}}"#)).unwrap();
        assert_eq!(m.layer_windows, vec![Some(4096); 2]);
    }
}
