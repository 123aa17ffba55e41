//! The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3), with Hugging Face parameter names.
//!
//! h = embed(ids);  per layer: h += o_proj(attn(rope(qk_norm(q_proj(n))), rope(qk_norm(k_proj(n))), v_proj(n)))
//! with n = rmsnorm(h); h += down_proj(silu(gate_proj(m)) ∘ up_proj(m)) with m = rmsnorm(h);
//! logits = lm_head(rmsnorm(h)) (lm_head = embed_tokens when tied).

use super::kv_cache::KvCache;
use crate::adapters::{peft, LoraDelta, PeftLoraAdapter};
use crate::backend::{AttnMasks, AttnShape, BackendStorage, Storage};
use crate::error::{ensure_shape, Error, Result};
use crate::formats::gguf::{self, GgufFile};
use crate::formats::hf_config::{Architecture, ModelConfig};
use crate::formats::safetensors::SafetensorsFiles;
use crate::ops::{self, AttentionMask, RopeScaling, RopeTable};
use crate::tensor::{DType, Tensor};
use crate::Device;
use std::path::Path;
use std::sync::Arc;

/// A linear layer in HF layout: weight `[out, in]`, optional bias `[out]`, optional LoRA delta.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// A low-rank update applied unmerged (the base weight stays untouched).
    pub lora: Option<LoraDelta>,
}

impl Linear {
    /// `x·Wᵀ + b (+ the LoRA delta)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = ops::linear(x, &self.weight, self.bias.as_ref())?;
        match &self.lora {
            None => Ok(y),
            Some(d) => ops::add(&y, &d.forward(x)?),
        }
    }
}

/// Self-attention projections of one layer.
#[derive(Clone, Debug)]
pub struct SelfAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// Qwen3: RMSNorm weights over head_dim for queries and keys.
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
}

/// The gated MLP of one layer.
#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

/// One decoder layer.
#[derive(Clone, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: Tensor,
    pub self_attn: SelfAttention,
    pub post_attention_layernorm: Tensor,
    pub mlp: Mlp,
    /// Sliding-window size of this layer (Mistral, some Qwen layers).
    pub window: Option<usize>,
}

/// Per-forward data shared by every layer.
#[derive(Clone)]
struct LayerCtx {
    rope: RopeTable,
    mask: AttentionMask,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
}

impl SelfAttention {
    /// Queries and keys after projection, q/k norm and rotation; values after projection. `[B,T,heads,D]`.
    fn qkv(&self, x: &Tensor, c: &LayerCtx) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t) = (x.shape()[0], x.shape()[1]);
        let mut q = ops::reshape(&self.q_proj.forward(x)?, &[b, t, c.heads, c.head_dim])?;
        let mut k = ops::reshape(&self.k_proj.forward(x)?, &[b, t, c.kv_heads, c.head_dim])?;
        let v = ops::reshape(&self.v_proj.forward(x)?, &[b, t, c.kv_heads, c.head_dim])?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = ops::rms_norm(&q, qn, c.eps)?;
            k = ops::rms_norm(&k, kn, c.eps)?;
        }
        Ok((ops::rope(&q, &c.rope)?, ops::rope(&k, &c.rope)?, v))
    }
}

impl DecoderLayer {
    fn forward(&self, h: &Tensor, c: &LayerCtx) -> Result<Tensor> {
        let (b, t) = (h.shape()[0], h.shape()[1]);
        let n = ops::rms_norm(h, &self.input_layernorm, c.eps)?;
        let (q, k, v) = self.self_attn.qkv(&n, c)?;
        let mask = AttentionMask { window: self.window, ..c.mask.clone() };
        let a = ops::attention(&q, &k, &v, &mask, 1.0 / (c.head_dim as f64).sqrt())?;
        let a = self.self_attn.o_proj.forward(&ops::reshape(&a, &[b, t, c.heads * c.head_dim])?)?;
        let h = ops::add(h, &a)?;
        let m = ops::rms_norm(&h, &self.post_attention_layernorm, c.eps)?;
        let g = ops::swiglu(&self.mlp.gate_proj.forward(&m)?, &self.mlp.up_proj.forward(&m)?)?;
        ops::add(&h, &self.mlp.down_proj.forward(&g)?)
    }

    fn parameters(&self) -> Vec<Tensor> {
        let mut v = vec![self.input_layernorm.clone(), self.post_attention_layernorm.clone()];
        let a = &self.self_attn;
        for l in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &self.mlp.gate_proj, &self.mlp.up_proj, &self.mlp.down_proj] {
            v.push(l.weight.clone());
            v.extend(l.bias.clone());
            if let Some(d) = &l.lora {
                v.extend([d.lora_a.clone(), d.lora_b.clone()]);
            }
        }
        v.extend(a.q_norm.clone());
        v.extend(a.k_norm.clone());
        v
    }
}

/// What one forward pass reads.
#[derive(Clone, Debug)]
pub struct ForwardInput {
    /// I64 or U32 `[batch, seq]`.
    pub input_ids: Tensor,
    /// I64 `[batch, seq]`, 1 = real token (padding keys are masked).
    pub attention_mask: Option<Tensor>,
    /// One position per token, row-major; default `0..seq` in every row (what transformers uses
    /// when it is given no position ids).
    pub position_ids: Option<Vec<i64>>,
    /// U32 `[batch, seq]` segment ids of packed examples.
    pub segment_ids: Option<Tensor>,
}

impl ForwardInput {
    /// Just token ids.
    pub fn ids(input_ids: Tensor) -> Self {
        ForwardInput { input_ids, attention_mask: None, position_ids: None, segment_ids: None }
    }
}

/// A Llama-family causal language model.
pub struct Llama {
    pub config: ModelConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: Tensor,
    /// None when tied to `embed_tokens`.
    pub lm_head: Option<Tensor>,
    /// Recompute each decoder layer in backward instead of storing its activations.
    pub gradient_checkpointing: bool,
    inv_freq: Vec<f64>,
}

fn linear_from(get: &mut dyn FnMut(&str, &[usize]) -> Result<Tensor>, name: &str, out_f: usize, in_f: usize, bias: bool) -> Result<Linear> {
    Ok(Linear {
        weight: get(&format!("{name}.weight"), &[out_f, in_f])?,
        bias: if bias { Some(get(&format!("{name}.bias"), &[out_f])?) } else { None },
        lora: None,
    })
}

impl Llama {
    /// Builds the model from a configuration and a source of named tensors (HF names and shapes).
    pub fn from_source(config: ModelConfig, get: &mut dyn FnMut(&str, &[usize]) -> Result<Tensor>) -> Result<Llama> {
        let c = &config;
        let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (q, kv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            let m = format!("{p}.mlp");
            layers.push(DecoderLayer {
                input_layernorm: get(&format!("{p}.input_layernorm.weight"), &[h])?,
                self_attn: SelfAttention {
                    q_proj: linear_from(get, &format!("{a}.q_proj"), q, h, c.qkv_bias)?,
                    k_proj: linear_from(get, &format!("{a}.k_proj"), kv, h, c.qkv_bias)?,
                    v_proj: linear_from(get, &format!("{a}.v_proj"), kv, h, c.qkv_bias)?,
                    o_proj: linear_from(get, &format!("{a}.o_proj"), h, q, c.o_bias)?,
                    q_norm: if c.qk_norm { Some(get(&format!("{a}.q_norm.weight"), &[c.head_dim])?) } else { None },
                    k_norm: if c.qk_norm { Some(get(&format!("{a}.k_norm.weight"), &[c.head_dim])?) } else { None },
                },
                post_attention_layernorm: get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                mlp: Mlp {
                    gate_proj: linear_from(get, &format!("{m}.gate_proj"), i, h, c.mlp_bias)?,
                    up_proj: linear_from(get, &format!("{m}.up_proj"), i, h, c.mlp_bias)?,
                    down_proj: linear_from(get, &format!("{m}.down_proj"), h, i, c.mlp_bias)?,
                },
                window: c.layer_windows.get(l).copied().flatten(),
            });
        }
        let embed_tokens = get("model.embed_tokens.weight", &[v, h])?;
        let norm = get("model.norm.weight", &[h])?;
        let lm_head = if c.tie_word_embeddings { None } else { Some(get("lm_head.weight", &[v, h])?) };
        let inv_freq = ops::rope_inv_freq(c.head_dim, c.rope_theta, &c.rope_scaling);
        Ok(Llama { config, embed_tokens, layers, norm, lm_head, gradient_checkpointing: false, inv_freq })
    }

    /// A randomly initialised model (weights ~ N(0, std²), norms 1) for benchmarks and tests.
    pub fn random(config: ModelConfig, std: f64, seed: u64, dtype: DType) -> Result<Llama> {
        let mut rng = crate::rng::Rng::new(seed);
        Self::from_source(config, &mut |name, shape| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else {
                (0..n).map(|_| (std * rng.normal()) as f32).collect()
            };
            Tensor::from_vec(data, shape, Device::Cpu)?.to_dtype(dtype)
        })
    }

    /// Loads a Hugging Face model folder (config.json + safetensors, sharded or not) or a `.gguf` file,
    /// converting weights to `dtype`.
    pub fn load(path: &Path, dtype: DType) -> Result<Llama> {
        if path.is_dir() {
            Self::from_hf_dir(path, dtype)
        } else if path.extension().is_some_and(|e| e == "gguf") {
            Self::from_gguf(path, dtype)
        } else if !path.exists() {
            Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder")))
        } else {
            Err(Error::format(path, "expected a Hugging Face model folder or a .gguf file"))
        }
    }

    /// Loads `config.json` and the safetensors weights of a folder.
    pub fn from_hf_dir(dir: &Path, dtype: DType) -> Result<Llama> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let files = SafetensorsFiles::open_dir(dir)?;
        Self::from_source(config, &mut |name, shape| files.load_as(name, shape, dtype))
    }

    /// Loads a llama-architecture GGUF: dequantises to `dtype` and undoes llama.cpp's q/k row permutation.
    pub fn from_gguf(path: &Path, dtype: DType) -> Result<Llama> {
        let g = GgufFile::open(path)?;
        let config = gguf_config(&g)?;
        let mut by_hf = std::collections::HashMap::new();
        for t in g.tensors() {
            if let Some(hf) = gguf::hf_tensor_name(&t.name) {
                by_hf.insert(hf, t.name.clone());
            }
        }
        let (heads, kv_heads) = (config.num_attention_heads, config.num_key_value_heads);
        Self::from_source(config, &mut |name, shape| {
            let gname = by_hf.get(name).ok_or_else(|| Error::MissingTensor { path: path.into(), name: name.into() })?;
            let (gshape, mut data) = g.tensor_f32(gname)?;
            if gshape != shape {
                return Err(Error::BadTensor { name: gname.clone(), msg: format!("in {}: shape {:?}, expected {:?}", path.display(), gshape, shape) });
            }
            if name.ends_with("self_attn.q_proj.weight") {
                data = gguf::unpermute_qk(&data, shape[0], shape[1], heads);
            } else if name.ends_with("self_attn.k_proj.weight") {
                data = gguf::unpermute_qk(&data, shape[0], shape[1], kv_heads);
            }
            Tensor::from_vec(data, shape, Device::Cpu)?.to_dtype(dtype)
        })
    }

    /// Every parameter with its Hugging Face name, in checkpoint order.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed_tokens.clone())];
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            let a = &layer.self_attn;
            out.push((format!("{p}.input_layernorm.weight"), layer.input_layernorm.clone()));
            for (n, lin) in [("q_proj", &a.q_proj), ("k_proj", &a.k_proj), ("v_proj", &a.v_proj), ("o_proj", &a.o_proj)] {
                out.push((format!("{p}.self_attn.{n}.weight"), lin.weight.clone()));
                if let Some(b) = &lin.bias {
                    out.push((format!("{p}.self_attn.{n}.bias"), b.clone()));
                }
            }
            if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
                out.push((format!("{p}.self_attn.q_norm.weight"), qn.clone()));
                out.push((format!("{p}.self_attn.k_norm.weight"), kn.clone()));
            }
            out.push((format!("{p}.post_attention_layernorm.weight"), layer.post_attention_layernorm.clone()));
            for (n, lin) in [("gate_proj", &layer.mlp.gate_proj), ("up_proj", &layer.mlp.up_proj), ("down_proj", &layer.mlp.down_proj)] {
                out.push((format!("{p}.mlp.{n}.weight"), lin.weight.clone()));
                if let Some(b) = &lin.bias {
                    out.push((format!("{p}.mlp.{n}.bias"), b.clone()));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if let Some(w) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), w.clone()));
        }
        out
    }

    /// Applies `f` to every parameter (with its HF name), replacing it by the result.
    pub fn map_parameters(&mut self, f: &mut dyn FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<()> {
        let mut visit = |name: String, t: &mut Tensor| -> Result<()> {
            *t = f(&name, t)?;
            Ok(())
        };
        visit("model.embed_tokens.weight".into(), &mut self.embed_tokens)?;
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{l}");
            visit(format!("{p}.input_layernorm.weight"), &mut layer.input_layernorm)?;
            visit(format!("{p}.post_attention_layernorm.weight"), &mut layer.post_attention_layernorm)?;
            let a = &mut layer.self_attn;
            for (n, lin) in [("q_proj", &mut a.q_proj), ("k_proj", &mut a.k_proj), ("v_proj", &mut a.v_proj), ("o_proj", &mut a.o_proj)] {
                visit(format!("{p}.self_attn.{n}.weight"), &mut lin.weight)?;
                if let Some(b) = &mut lin.bias {
                    visit(format!("{p}.self_attn.{n}.bias"), b)?;
                }
            }
            if let Some(t) = &mut a.q_norm {
                visit(format!("{p}.self_attn.q_norm.weight"), t)?;
            }
            if let Some(t) = &mut a.k_norm {
                visit(format!("{p}.self_attn.k_norm.weight"), t)?;
            }
            let m = &mut layer.mlp;
            for (n, lin) in [("gate_proj", &mut m.gate_proj), ("up_proj", &mut m.up_proj), ("down_proj", &mut m.down_proj)] {
                visit(format!("{p}.mlp.{n}.weight"), &mut lin.weight)?;
                if let Some(b) = &mut lin.bias {
                    visit(format!("{p}.mlp.{n}.bias"), b)?;
                }
            }
        }
        visit("model.norm.weight".into(), &mut self.norm)?;
        if let Some(w) = &mut self.lm_head {
            visit("lm_head.weight".into(), w)?;
        }
        Ok(())
    }

    /// Every linear layer with its module path (`model.layers.0.self_attn.q_proj`).
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let (a, m) = (&layer.self_attn, &layer.mlp);
            for (n, lin) in [("self_attn.q_proj", &a.q_proj), ("self_attn.k_proj", &a.k_proj), ("self_attn.v_proj", &a.v_proj), ("self_attn.o_proj", &a.o_proj)]
                .into_iter()
                .chain([("mlp.gate_proj", &m.gate_proj), ("mlp.up_proj", &m.up_proj), ("mlp.down_proj", &m.down_proj)])
            {
                out.push((format!("model.layers.{l}.{n}"), lin));
            }
        }
        out
    }

    /// [`Llama::linears`], mutably.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let a = &mut layer.self_attn;
            for (n, lin) in [("q_proj", &mut a.q_proj), ("k_proj", &mut a.k_proj), ("v_proj", &mut a.v_proj), ("o_proj", &mut a.o_proj)] {
                out.push((format!("model.layers.{l}.self_attn.{n}"), lin));
            }
            let m = &mut layer.mlp;
            for (n, lin) in [("gate_proj", &mut m.gate_proj), ("up_proj", &mut m.up_proj), ("down_proj", &mut m.down_proj)] {
                out.push((format!("model.layers.{l}.mlp.{n}"), lin));
            }
        }
        out
    }

    /// Applies a PEFT LoRA adapter (unmerged). Errors name the adapter key whose module the model
    /// lacks or whose shape does not fit.
    pub fn attach_lora(&mut self, adapter: &PeftLoraAdapter) -> Result<()> {
        let file = adapter.dir.join("adapter_model.safetensors");
        let mut linears: std::collections::HashMap<String, &mut Linear> = self.linears_mut().into_iter().collect();
        for (module, delta) in &adapter.deltas {
            let lin = linears.get_mut(module).ok_or_else(|| Error::BadTensor {
                name: peft::peft_key(module, "lora_A"),
                msg: format!("in {}: the model has no linear layer `{module}`", file.display()),
            })?;
            let (out_f, in_f) = (lin.weight.shape()[0], lin.weight.shape()[1]);
            if delta.lora_a.shape()[1] != in_f || delta.lora_b.shape()[0] != out_f {
                return Err(Error::BadTensor {
                    name: peft::peft_key(module, "lora_A"),
                    msg: format!(
                        "in {}: lora_A {:?} / lora_B {:?} do not fit `{module}` with weight [{out_f}, {in_f}]",
                        file.display(),
                        delta.lora_a.shape(),
                        delta.lora_b.shape()
                    ),
                });
            }
            lin.lora = Some(delta.clone());
        }
        Ok(())
    }

    /// The attached LoRA tensors with their PEFT keys.
    pub fn adapter_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (module, lin) in self.linears() {
            if let Some(d) = &lin.lora {
                out.push((peft::peft_key(&module, "lora_A"), d.lora_a.clone()));
                out.push((peft::peft_key(&module, "lora_B"), d.lora_b.clone()));
            }
        }
        out
    }

    /// Marks the attached LoRA tensors whose PEFT keys satisfy `pred` as trainable (others frozen).
    pub fn set_adapter_trainable(&mut self, pred: &dyn Fn(&str) -> bool) {
        for (module, lin) in self.linears_mut() {
            if let Some(d) = &mut lin.lora {
                let a = peft::peft_key(&module, "lora_A");
                let b = peft::peft_key(&module, "lora_B");
                d.lora_a = if pred(&a) { d.lora_a.requires_grad() } else { d.lora_a.detach() };
                d.lora_b = if pred(&b) { d.lora_b.requires_grad() } else { d.lora_b.detach() };
            }
        }
    }

    /// Marks the parameters whose names satisfy `pred` as trainable (and the others as frozen).
    pub fn set_trainable(&mut self, pred: &dyn Fn(&str) -> bool) -> Result<()> {
        self.map_parameters(&mut |name, t| Ok(if pred(name) { t.requires_grad() } else { t.detach() }))
    }

    /// The parameters currently marked trainable, with names.
    pub fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        self.named_parameters().into_iter().filter(|(_, t)| t.requires_grad_flag()).collect()
    }

    /// Weight dtype.
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// The output projection (`lm_head`, or the embedding when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    fn ctx(&self, positions: &[i64], mask: AttentionMask) -> Result<LayerCtx> {
        let c = &self.config;
        Ok(LayerCtx {
            rope: RopeTable::new(&self.inv_freq, positions, self.dtype(), Device::Cpu)?,
            mask,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            eps: c.rms_norm_eps,
        })
    }

    fn check_ids(&self, ids: &Tensor) -> Result<(usize, usize)> {
        ensure_shape!(ids.rank() == 2, "forward", "input_ids must be [batch, seq], got {:?}", ids.shape());
        let (b, t) = (ids.shape()[0], ids.shape()[1]);
        if b == 0 || t == 0 {
            return Err(Error::Input(format!("input_ids is empty (shape {:?})", ids.shape())));
        }
        Ok((b, t))
    }

    /// Final hidden states `[batch, seq, hidden]` (after the last norm).
    pub fn hidden_states(&self, input: &ForwardInput) -> Result<Tensor> {
        let (b, t) = self.check_ids(&input.input_ids)?;
        let positions = match &input.position_ids {
            Some(p) => {
                ensure_shape!(p.len() == b * t, "forward", "{} position ids for {b}×{t} tokens", p.len());
                p.clone()
            }
            None => (0..b).flat_map(|_| 0..t as i64).collect(),
        };
        let key_mask = match &input.attention_mask {
            None => None,
            Some(m) => {
                ensure_shape!(m.shape() == [b, t], "forward", "attention_mask {:?} does not match input_ids [{b}, {t}]", m.shape());
                Some(m.to_dtype(DType::U8)?)
            }
        };
        let mask = AttentionMask { causal: true, key_mask, segment_ids: input.segment_ids.clone(), window: None };
        let ctx = self.ctx(&positions, mask)?;
        let mut h = ops::embedding(&self.embed_tokens, &input.input_ids)?;
        for layer in &self.layers {
            h = if self.gradient_checkpointing {
                let (layer2, ctx2) = (layer.clone(), ctx.clone());
                ops::checkpoint(&h, &layer.parameters(), Arc::new(move |x: &Tensor| layer2.forward(x, &ctx2)))?
            } else {
                layer.forward(&h, &ctx)?
            };
        }
        ops::rms_norm(&h, &self.norm, self.config.rms_norm_eps)
    }

    /// Logits `[batch, seq, vocab]`.
    pub fn forward(&self, input: &ForwardInput) -> Result<Tensor> {
        let h = self.hidden_states(input)?;
        ops::linear(&h, self.lm_head_weight(), None)
    }

    /// Hugging Face's causal-LM loss: logits at t predict labels at t+1 (−100 ignored), mean over counted tokens.
    pub fn loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        ensure_shape!(logits.rank() == 3, "loss", "logits must be [batch, seq, vocab], got {:?}", logits.shape());
        let (b, t, v) = (logits.shape()[0], logits.shape()[1], logits.shape()[2]);
        ensure_shape!(labels.shape() == [b, t], "loss", "labels {:?} do not match logits [{b}, {t}, {v}]", labels.shape());
        let l = labels.to_dtype(DType::I64)?.to_vec::<i64>()?;
        let mut shifted = vec![ops::IGNORE_INDEX; b * t];
        for r in 0..b {
            shifted[r * t..r * t + t - 1].copy_from_slice(&l[r * t + 1..r * t + t]);
        }
        let targets = Tensor::from_vec(shifted, &[b * t], Device::Cpu)?;
        ops::cross_entropy(&ops::reshape(logits, &[b * t, v])?, &targets)
    }

    /// Incremental forward for generation: appends `ids` (`[batch, t]`, real tokens marked by
    /// `mask`) at `positions` to the cache and returns the logits of the last new position `[batch, vocab]`.
    pub fn forward_cached(&self, ids: &[u32], mask: &[u8], positions: &[i64], cache: &mut KvCache) -> Result<Tensor> {
        let c = &self.config;
        let b = cache.batch;
        let t = ids.len() / b.max(1);
        ensure_shape!(t > 0 && ids.len() == b * t && mask.len() == ids.len() && positions.len() == ids.len(), "forward_cached", "{} ids, {} mask values, {} positions for batch {b}", ids.len(), mask.len(), positions.len());
        let ids_t = Tensor::from_vec(ids.to_vec(), &[b, t], Device::Cpu)?;
        cache.append_mask(mask)?;
        let ctx = self.ctx(positions, AttentionMask::default())?;
        let (d, hq, hk) = (c.head_dim, c.num_attention_heads, c.num_key_value_heads);
        crate::autograd::no_grad(|| {
            let mut h = ops::embedding(&self.embed_tokens, &ids_t)?;
            for (li, layer) in self.layers.iter().enumerate() {
                let n = ops::rms_norm(&h, &layer.input_layernorm, c.rms_norm_eps)?;
                let (q, k, v) = layer.self_attn.qkv(&n, &ctx)?;
                cache.write(li, &*k.contiguous_storage()?, &*v.contiguous_storage()?, t)?;
                let shape = AttnShape { batch: b, q_len: t, kv_len: cache.len + t, kv_cap: cache.capacity, n_heads: hq, n_kv_heads: hk, head_dim: d };
                let masks = AttnMasks { causal: true, q_offset: cache.len, key_mask: Some(&cache.key_mask), segment_ids: None, window: layer.window };
                let (o, _) = Storage::attention(&*q.contiguous_storage()?, &cache.k[li], &cache.v[li], &shape, &masks, 1.0 / (d as f64).sqrt())?;
                let a = Tensor::from_storage(o, &[b, t, hq * d])?;
                h = ops::add(&h, &layer.self_attn.o_proj.forward(&a)?)?;
                let m = ops::rms_norm(&h, &layer.post_attention_layernorm, c.rms_norm_eps)?;
                let g = ops::swiglu(&layer.mlp.gate_proj.forward(&m)?, &layer.mlp.up_proj.forward(&m)?)?;
                h = ops::add(&h, &layer.mlp.down_proj.forward(&g)?)?;
            }
            cache.len += t;
            let last = ops::narrow(&h, 1, t - 1, 1)?.contiguous()?;
            let last = ops::reshape(&last, &[b, c.hidden_size])?;
            let last = ops::rms_norm(&last, &self.norm, c.rms_norm_eps)?;
            ops::linear(&last, self.lm_head_weight(), None)
        })
    }

    /// An empty KV cache sized for this model.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        let c = &self.config;
        KvCache::new(c.num_hidden_layers, batch, capacity, c.num_key_value_heads, c.head_dim, self.dtype(), Device::Cpu)
    }
}

/// A [`ModelConfig`] from GGUF `llama.*` metadata.
pub fn gguf_config(g: &GgufFile) -> Result<ModelConfig> {
    let p = g.llama_params()?;
    let rope_scaling = match &p.rope_scaling {
        None => RopeScaling::Default,
        Some((kind, factor)) if kind == "linear" => RopeScaling::Linear { factor: *factor },
        Some((kind, _)) if kind == "none" => RopeScaling::Default,
        Some((kind, _)) => return Err(Error::Config { path: g.path().into(), key: "llama.rope.scaling.type".into(), msg: format!("`{kind}` is not supported") }),
    };
    Ok(ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: p.vocab_size,
        hidden_size: p.hidden_size,
        intermediate_size: p.intermediate_size,
        num_hidden_layers: p.n_layers,
        num_attention_heads: p.n_heads,
        num_key_value_heads: p.n_kv_heads,
        head_dim: p.head_dim,
        rms_norm_eps: p.rms_norm_eps,
        rope_theta: p.rope_theta,
        rope_scaling,
        max_position_embeddings: p.context_length,
        tie_word_embeddings: p.tied_embeddings,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        qk_norm: false,
        layer_windows: vec![None; p.n_layers],
        bos_token_id: p.bos_token_id,
        eos_token_ids: p.eos_token_id.into_iter().collect(),
        pad_token_id: p.pad_token_id,
        dtype: None,
    })
}
