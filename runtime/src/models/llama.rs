//! The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3), with Hugging Face parameter names.
//!
//! h = embed(ids);  per layer: h += o_proj(attn(rope(qk_norm(q_proj(n))), rope(qk_norm(k_proj(n))), v_proj(n)))
//! with n = rmsnorm(h); h += down_proj(silu(gate_proj(m)) ∘ up_proj(m)) with m = rmsnorm(h);
//! logits = lm_head(rmsnorm(h)) (lm_head = embed_tokens when tied).

use super::kv_cache::KvCache;
use super::linear::{Linear, LinearWeight, Mode};
use crate::adapters::{Adapter, AdapterConfig, AdapterHost, NoAdapter};
use crate::{Module, ModuleExt};
use crate::backend::{AttnMasks, AttnShape, BackendStorage, Storage};
use crate::error::{ensure_shape, Error, Result};
use crate::formats::gguf::{self, GgufFile};
use crate::formats::hf_config::{Architecture, ModelConfig};
use crate::formats::safetensors::SafetensorsFiles;
use crate::ops::{self, AttentionMask, RopeScaling, RopeTable};
use crate::quant::{Bnb4bitConfig, Nf4Weight, QuantizedWeight};
use crate::tensor::{DType, Tensor};
use crate::Device;
use std::path::Path;
use std::sync::Arc;

/// Self-attention projections of one layer.
#[derive(Clone, Debug, Module)]
pub struct SelfAttention<A: Adapter = NoAdapter> {
    pub q_proj: Linear<A>,
    pub k_proj: Linear<A>,
    pub v_proj: Linear<A>,
    pub o_proj: Linear<A>,
    /// Qwen3: RMSNorm weights over head_dim for queries and keys.
    #[module(rename = "q_norm.weight")]
    pub q_norm: Option<Tensor>,
    #[module(rename = "k_norm.weight")]
    pub k_norm: Option<Tensor>,
}

/// The gated MLP of one layer.
#[derive(Clone, Debug, Module)]
pub struct Mlp<A: Adapter = NoAdapter> {
    pub gate_proj: Linear<A>,
    pub up_proj: Linear<A>,
    pub down_proj: Linear<A>,
}

/// One decoder layer.
#[derive(Clone, Debug, Module)]
pub struct DecoderLayer<A: Adapter = NoAdapter> {
    #[module(rename = "input_layernorm.weight")]
    pub input_layernorm: Tensor,
    pub self_attn: SelfAttention<A>,
    #[module(rename = "post_attention_layernorm.weight")]
    pub post_attention_layernorm: Tensor,
    pub mlp: Mlp<A>,
    /// Sliding-window size of this layer (Mistral, some Qwen layers).
    #[module(skip)]
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
    mode: Mode,
}

impl<A: Adapter> SelfAttention<A> {
    /// Queries and keys after projection, q/k norm and rotation; values after projection. `[B,T,heads,D]`.
    fn qkv(&self, x: &Tensor, c: &LayerCtx) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t) = (x.shape()[0], x.shape()[1]);
        let mut q = ops::reshape(&self.q_proj.forward_mode(x, c.mode)?, &[b, t, c.heads, c.head_dim])?;
        let mut k = ops::reshape(&self.k_proj.forward_mode(x, c.mode)?, &[b, t, c.kv_heads, c.head_dim])?;
        let v = ops::reshape(&self.v_proj.forward_mode(x, c.mode)?, &[b, t, c.kv_heads, c.head_dim])?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = ops::rms_norm(&q, qn, c.eps)?;
            k = ops::rms_norm(&k, kn, c.eps)?;
        }
        Ok((ops::rope(&q, &c.rope)?, ops::rope(&k, &c.rope)?, v))
    }
}

impl<A: Adapter> DecoderLayer<A> {
    fn forward(&self, h: &Tensor, c: &LayerCtx) -> Result<Tensor> {
        let (b, t) = (h.shape()[0], h.shape()[1]);
        let n = ops::rms_norm(h, &self.input_layernorm, c.eps)?;
        let (q, k, v) = self.self_attn.qkv(&n, c)?;
        let mask = AttentionMask { window: self.window, ..c.mask.clone() };
        let a = ops::attention(&q, &k, &v, &mask, 1.0 / (c.head_dim as f64).sqrt())?;
        let a = self.self_attn.o_proj.forward_mode(&ops::reshape(&a, &[b, t, c.heads * c.head_dim])?, c.mode)?;
        let h = ops::add(h, &a)?;
        let m = ops::rms_norm(&h, &self.post_attention_layernorm, c.eps)?;
        self.mlp_residual(&h, &m, c.mode)
    }

    /// `h + down_proj(silu(gate_proj m) ∘ up_proj m)`.
    fn mlp_residual(&self, h: &Tensor, m: &Tensor, mode: Mode) -> Result<Tensor> {
        let p = &self.mlp;
        let g = ops::swiglu(&p.gate_proj.forward_mode(m, mode)?, &p.up_proj.forward_mode(m, mode)?)?;
        ops::add(h, &p.down_proj.forward_mode(&g, mode)?)
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

/// A Llama-family causal language model whose linear layers carry adapters of type `A`.
///
/// Hugging Face key names come from the field attributes: `model.embed_tokens.weight`,
/// `model.layers.{i}.self_attn.q_proj.weight`, …, `lm_head.weight`.
#[derive(Clone, Module)]
pub struct Llama<A: Adapter = NoAdapter> {
    #[module(skip)]
    pub config: ModelConfig,
    #[module(rename = "model.embed_tokens.weight")]
    pub embed_tokens: Tensor,
    #[module(rename = "model.layers.{i}")]
    pub layers: Vec<DecoderLayer<A>>,
    #[module(rename = "model.norm.weight")]
    pub norm: Tensor,
    /// None when tied to `embed_tokens`.
    #[module(rename = "lm_head.weight")]
    pub lm_head: Option<Tensor>,
    /// The sequence-classification head `[num_labels, hidden]` of a reward model
    /// (`LlamaForSequenceClassification`'s `score.weight`); None for a causal LM.
    #[module(rename = "score.weight")]
    pub score: Option<Tensor>,
    /// PPO's value head `[1, hidden]` on the final hidden states (TRL's `v_head.summary.weight`);
    /// not part of the causal LM or its adapter, saved beside it by the PPO trainer.
    #[module(rename = "v_head.summary.weight")]
    pub v_head: Option<Tensor>,
    /// Recompute each decoder layer in backward instead of storing its activations.
    #[module(skip)]
    pub gradient_checkpointing: bool,
    /// Training mode: adapter dropout is active.
    #[module(skip)]
    pub training: bool,
    #[module(skip)]
    inv_freq: Vec<f64>,
}

/// Where a model's weights come from: named tensors (HF names and shapes) and the weights of linear
/// layers, which a source may hand over quantised.
pub trait WeightSource {
    /// The tensor `name` with shape `shape`.
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// The weight of linear layer `module` (`model.layers.0.self_attn.q_proj`), `[out, in]`.
    /// Default: the dense tensor `{module}.weight`.
    fn linear(&mut self, module: &str, shape: [usize; 2]) -> Result<LinearWeight> {
        Ok(LinearWeight::Dense(self.tensor(&format!("{module}.weight"), &shape)?))
    }
}

/// Another source whose dense linear weights are quantised to bitsandbytes 4-bit as they are drawn
/// (one layer in full precision at a time); weights the inner source hands over quantised (a
/// pre-quantised checkpoint, GGUF blocks) pass through.
struct QuantizeLinears<'a> {
    inner: &'a mut dyn WeightSource,
    cfg: Bnb4bitConfig,
}

impl WeightSource for QuantizeLinears<'_> {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.inner.tensor(name, shape)
    }
    fn linear(&mut self, module: &str, shape: [usize; 2]) -> Result<LinearWeight> {
        Ok(match self.inner.linear(module, shape)? {
            LinearWeight::Dense(w) => LinearWeight::Quantized(Arc::new(QuantizedWeight::quantize_bnb(&w, self.cfg)?)),
            quantized => quantized,
        })
    }
}

/// The weights of [`Llama::random`]: N(0, std²) drawn in call order from one generator, norms 1.
struct RandomSource {
    rng: crate::rng::Rng,
    std: f64,
    dtype: DType,
}

impl WeightSource for RandomSource {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else {
            // The same values a sequential fill draws (each normal takes two draws), in parallel
            // chunks: a 1B-parameter benchmark model is drawn in seconds, not a minute.
            use rayon::prelude::*;
            const CHUNK: usize = 1 << 16;
            let (start, std) = (self.rng.clone(), self.std);
            self.rng = start.jumped(2 * n as u64);
            let mut data = vec![0f32; n];
            data.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
                let mut rng = start.jumped(2 * (c * CHUNK) as u64);
                out.iter_mut().for_each(|x| *x = (std * rng.normal()) as f32);
            });
            data
        };
        Tensor::from_vec(data, shape, Device::Cpu)?.to_dtype(self.dtype)
    }
}

/// A closure as a [`WeightSource`] of dense tensors.
struct FnSource<'a>(&'a mut dyn FnMut(&str, &[usize]) -> Result<Tensor>);

impl WeightSource for FnSource<'_> {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        (self.0)(name, shape)
    }
}

/// A GGUF file as a [`WeightSource`]: tensors dequantised to `dtype` with llama.cpp's q/k row
/// permutation undone; with `keep_quantized`, Q4_0/Q4_1/Q8_0 linear weights stay as their blocks.
struct GgufSource<'a> {
    g: &'a GgufFile,
    path: &'a Path,
    by_hf: std::collections::HashMap<String, String>,
    /// Query and key/value head counts (for the q/k row permutation).
    heads: (usize, usize),
    dtype: DType,
    keep_quantized: bool,
}

impl GgufSource<'_> {
    fn gguf_name(&self, name: &str) -> Result<&String> {
        self.by_hf.get(name).ok_or_else(|| Error::MissingTensor { path: self.path.into(), name: name.into() })
    }
    fn qk_heads(&self, name: &str) -> Option<usize> {
        if name.ends_with("self_attn.q_proj.weight") {
            Some(self.heads.0)
        } else if name.ends_with("self_attn.k_proj.weight") {
            Some(self.heads.1)
        } else {
            None
        }
    }
}

impl WeightSource for GgufSource<'_> {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let gname = self.gguf_name(name)?;
        let (gshape, mut data) = self.g.tensor_f32(gname)?;
        if gshape != shape {
            return Err(Error::BadTensor { name: gname.clone(), msg: format!("in {}: shape {:?}, expected {:?}", self.path.display(), gshape, shape) });
        }
        if let Some(h) = self.qk_heads(name) {
            data = gguf::unpermute_qk(&data, shape[0], shape[1], h);
        }
        Tensor::from_vec(data, shape, Device::Cpu)?.to_dtype(self.dtype)
    }
    fn linear(&mut self, module: &str, shape: [usize; 2]) -> Result<LinearWeight> {
        let name = format!("{module}.weight");
        let gname = self.gguf_name(&name)?.clone();
        let info = self.g.tensor_info(&gname).ok_or_else(|| Error::MissingTensor { path: self.path.into(), name: gname.clone() })?;
        let ty = info.ggml_type;
        if !self.keep_quantized || !matches!(ty, gguf::GgmlType::Q4_0 | gguf::GgmlType::Q4_1 | gguf::GgmlType::Q8_0) {
            return Ok(LinearWeight::Dense(self.tensor(&name, &shape)?));
        }
        if info.shape() != shape {
            return Err(Error::BadTensor { name: gname, msg: format!("in {}: shape {:?}, expected {:?}", self.path.display(), info.shape(), shape) });
        }
        let perm = match self.qk_heads(&name) {
            None => None,
            Some(h) => Some(gguf::qk_row_perm(shape[0], h).ok_or_else(|| Error::BadTensor { name: gname.clone(), msg: format!("{} rows do not split into {h} heads of even size", shape[0]) })?),
        };
        let data = self.g.tensor_bytes(&gname)?.to_vec();
        Ok(LinearWeight::Quantized(Arc::new(QuantizedWeight::from_ggml(ty, data, shape, perm, &gname)?)))
    }
}

/// Another model's weights as a [`WeightSource`]: its tensors by name and its linear weights as
/// they are (a quantised weight is shared, not copied or dequantised).
struct ModelSource {
    params: std::collections::HashMap<String, Tensor>,
    linears: std::collections::HashMap<String, LinearWeight>,
}

impl ModelSource {
    /// The parameters of `m` (detached when `detach`: a merged model is a new frozen base).
    fn of<A: Adapter>(m: &Llama<A>, detach: bool) -> Result<ModelSource> {
        let keep = |t: &Tensor| if detach { t.detach() } else { t.clone() };
        let params = m.named_parameters().into_iter().map(|(n, t)| (n, keep(&t))).collect();
        let mut linears = std::collections::HashMap::new();
        crate::adapters::host::each_linear_ref::<A, _>(m, |name, l| {
            let w = match &l.weight {
                LinearWeight::Dense(t) => LinearWeight::Dense(keep(t)),
                q => q.clone(),
            };
            linears.insert(name.to_string(), w);
        })?;
        Ok(ModelSource { params, linears })
    }
}

impl WeightSource for ModelSource {
    fn tensor(&mut self, name: &str, _shape: &[usize]) -> Result<Tensor> {
        self.params.get(name).cloned().ok_or_else(|| Error::Input(format!("internal: no parameter `{name}`")))
    }
    fn linear(&mut self, module: &str, shape: [usize; 2]) -> Result<LinearWeight> {
        match self.linears.get(module) {
            Some(w) => Ok(w.clone()),
            None => Ok(LinearWeight::Dense(self.tensor(&format!("{module}.weight"), &shape)?)),
        }
    }
}

/// How [`Llama::load_with`] treats the weights.
///
/// ```no_run
/// use temper_runtime::models::{Llama, LoadOptions};
/// use temper_runtime::quant::Bnb4bitConfig;
/// use temper_runtime::DType;
/// // QLoRA's base: every decoder linear NF4 with blocks of 64 and double-quantised scales.
/// let opts = LoadOptions { quantize: Some(Bnb4bitConfig::default()), ..LoadOptions::dense(DType::F32) };
/// let base = Llama::load_with("path/to/hf-model".as_ref(), &opts)?;
/// # Ok::<(), temper_runtime::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LoadOptions {
    /// The dtype of the dense weights.
    pub dtype: DType,
    /// Quantise every decoder linear layer on load (bitsandbytes' `load_in_4bit`); `lm_head` and the
    /// embeddings stay dense, as in transformers. A pre-quantised bitsandbytes checkpoint loads
    /// quantised whatever this says.
    pub quantize: Option<Bnb4bitConfig>,
    /// Keep GGUF Q4_0/Q4_1/Q8_0 linear weights as their blocks (a true 4/8-bit frozen base) instead of
    /// dequantising them.
    pub keep_gguf_quantized: bool,
}

impl LoadOptions {
    /// Dense weights of `dtype`, nothing quantised.
    pub fn dense(dtype: DType) -> Self {
        LoadOptions { dtype, quantize: None, keep_gguf_quantized: false }
    }
}

fn linear_from<A: Adapter>(src: &mut dyn WeightSource, name: &str, out_f: usize, in_f: usize, bias: bool) -> Result<Linear<A>> {
    let weight = src.linear(name, [out_f, in_f])?;
    if weight.shape() != [out_f, in_f] {
        return Err(Error::BadTensor { name: format!("{name}.weight"), msg: format!("shape {:?}, expected {:?}", weight.shape(), [out_f, in_f]) });
    }
    let bias = if bias { Some(src.tensor(&format!("{name}.bias"), &[out_f])?) } else { None };
    Ok(Linear::with_weight(weight, bias))
}

/// Safetensors files as a [`WeightSource`]: bitsandbytes 4-bit layers load quantised.
struct HfSource<'a> {
    files: &'a SafetensorsFiles,
    dtype: DType,
}

impl WeightSource for HfSource<'_> {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.files.load_as(name, shape, self.dtype)
    }
    fn linear(&mut self, module: &str, shape: [usize; 2]) -> Result<LinearWeight> {
        let w = format!("{module}.weight");
        // Any of bitsandbytes' state tensors marks a 4-bit layer; a missing one is then an error
        // naming it (not a confusing shape error on the packed codes).
        let bnb = ["quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4", "absmax", "quant_map"].iter().any(|k| self.files.contains(&format!("{w}.{k}")));
        if bnb {
            let state_key = if self.files.contains(&format!("{w}.quant_state.bitsandbytes__fp4")) { "fp4" } else { "nf4" };
            let key = format!("{w}.quant_state.bitsandbytes__{state_key}");
            let q = QuantizedWeight::from_bnb(Nf4Weight::from_safetensors(self.files, module)?, &key)?;
            return Ok(LinearWeight::Quantized(Arc::new(q)));
        }
        Ok(LinearWeight::Dense(self.files.load_as(&w, &shape, self.dtype)?))
    }
}

impl<A: Adapter> Llama<A> {
    /// Builds the model from a configuration and a source of named tensors (HF names and shapes).
    pub fn from_source(config: ModelConfig, get: &mut dyn FnMut(&str, &[usize]) -> Result<Tensor>) -> Result<Llama<A>> {
        Self::from_weights(config, &mut FnSource(get))
    }

    /// [`Llama::from_weights`], quantising the dense linear weights `src` hands over when `quantize`.
    fn from_weights_quantized(config: ModelConfig, src: &mut dyn WeightSource, quantize: Option<Bnb4bitConfig>) -> Result<Llama<A>> {
        match quantize {
            Some(cfg) => Self::from_weights(config, &mut QuantizeLinears { inner: src, cfg }),
            None => Self::from_weights(config, src),
        }
    }

    /// Builds the model from a configuration and a [`WeightSource`] (which may quantise linears).
    pub fn from_weights(config: ModelConfig, src: &mut dyn WeightSource) -> Result<Llama<A>> {
        let get = src;
        let c = &config;
        let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (q, kv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            let m = format!("{p}.mlp");
            layers.push(DecoderLayer {
                input_layernorm: get.tensor(&format!("{p}.input_layernorm.weight"), &[h])?,
                self_attn: SelfAttention {
                    q_proj: linear_from(get, &format!("{a}.q_proj"), q, h, c.qkv_bias)?,
                    k_proj: linear_from(get, &format!("{a}.k_proj"), kv, h, c.qkv_bias)?,
                    v_proj: linear_from(get, &format!("{a}.v_proj"), kv, h, c.qkv_bias)?,
                    o_proj: linear_from(get, &format!("{a}.o_proj"), h, q, c.o_bias)?,
                    q_norm: if c.qk_norm { Some(get.tensor(&format!("{a}.q_norm.weight"), &[c.head_dim])?) } else { None },
                    k_norm: if c.qk_norm { Some(get.tensor(&format!("{a}.k_norm.weight"), &[c.head_dim])?) } else { None },
                },
                post_attention_layernorm: get.tensor(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                mlp: Mlp {
                    gate_proj: linear_from(get, &format!("{m}.gate_proj"), i, h, c.mlp_bias)?,
                    up_proj: linear_from(get, &format!("{m}.up_proj"), i, h, c.mlp_bias)?,
                    down_proj: linear_from(get, &format!("{m}.down_proj"), h, i, c.mlp_bias)?,
                },
                window: c.layer_windows.get(l).copied().flatten(),
            });
        }
        let embed_tokens = get.tensor("model.embed_tokens.weight", &[v, h])?;
        let norm = get.tensor("model.norm.weight", &[h])?;
        // A sequence classifier has a `score` head and no `lm_head` (its logits would be unused).
        let (lm_head, score) = match c.num_labels {
            Some(n) => (None, Some(get.tensor("score.weight", &[n, h])?)),
            None if c.tie_word_embeddings => (None, None),
            None => (Some(get.tensor("lm_head.weight", &[v, h])?), None),
        };
        let inv_freq = ops::rope_inv_freq(c.head_dim, c.rope_theta, &c.rope_scaling);
        Ok(Llama { config, embed_tokens, layers, norm, lm_head, score, v_head: None, gradient_checkpointing: false, training: false, inv_freq })
    }

    /// Attaches adapter `name` to the layers `cfg` targets (see [`AdapterHost::add_adapter`]).
    pub fn add_adapter(&mut self, name: &str, cfg: &AdapterConfig<A>) -> Result<Vec<String>> {
        AdapterHost::add_adapter(self, name, cfg)
    }

    /// Switches adapter `name` on or off.
    pub fn set_adapter_enabled(&mut self, name: &str, enabled: bool) -> Result<()> {
        AdapterHost::set_adapter_enabled::<A>(self, name, enabled)
    }

    /// Folds adapter `name` into the base weights.
    pub fn merge_adapter(&mut self, name: &str) -> Result<()> {
        AdapterHost::merge_adapter::<A>(self, name)
    }

    /// Takes adapter `name` back out of the base weights.
    pub fn unmerge_adapter(&mut self, name: &str) -> Result<()> {
        AdapterHost::unmerge_adapter::<A>(self, name)
    }

    /// Removes adapter `name`.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        AdapterHost::delete_adapter::<A>(self, name)
    }

    /// Merges every adapter into the weights and returns the plain model (PEFT's `merge_and_unload`).
    pub fn merge_and_unload(mut self) -> Result<Llama> {
        for name in self.adapter_names() {
            self.merge_adapter(&name)?;
        }
        let mut src = ModelSource::of(&self, true)?;
        Llama::from_weights(self.config.clone(), &mut src)
    }

    /// Writes a Hugging Face model folder (`config.json` + `model.safetensors`, both atomic) that
    /// transformers and vLLM load. Adapters must be merged first ([`Llama::merge_and_unload`] or
    /// [`Llama::merge_adapter`]): an active unmerged adapter is an error rather than a silent drop.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        let mut active = None;
        crate::adapters::host::each_linear_ref::<A, _>(self, |m, l| {
            if let Some(s) = l.adapters.iter().find(|s| s.enabled && !s.merged) {
                active.get_or_insert(format!("adapter `{}` on `{m}`", s.name));
            }
        })?;
        if let Some(what) = active {
            return Err(Error::Input(format!("{what} is not merged: merge it (merge_and_unload) before saving a full model, or save the adapter alone")));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let dtype = match self.dtype() {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            other => return Err(Error::dtype("save_pretrained", format!("weights of dtype {other}"))),
        };
        let mut json = self.config.to_hf_json(dtype);
        if let Some(q) = self.quantization_config(dtype)? {
            json["quantization_config"] = q;
        }
        let cfg = serde_json::to_string_pretty(&json).map_err(|e| Error::Input(format!("config.json: {e}")))?;
        crate::formats::safetensors::write_atomic(&dir.join("config.json"), cfg.as_bytes())?;
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        crate::formats::safetensors::save(&dir.join("model.safetensors"), &self.base_parameters(), Some(meta))
    }

    /// Replaces every quantised linear weight by its dequantised values (dense, frozen): the exact
    /// model a QLoRA adapter was trained against, as an ordinary checkpoint. Returns how many layers
    /// were quantised.
    pub fn dequantize_linears(&mut self) -> Result<usize> {
        let mut n = 0;
        crate::adapters::host::each_linear::<A, _>(self, |_, l| {
            if let LinearWeight::Quantized(q) = &l.weight {
                l.weight = LinearWeight::Dense(q.dequantize()?);
                n += 1;
            }
            Ok(())
        })?;
        Ok(n)
    }

    /// The `quantization_config` transformers reads for a bitsandbytes 4-bit model (None when no
    /// layer is quantised). All quantised layers must share one configuration; GGUF blocks have no
    /// Hugging Face form and are an error (dequantise or merge first).
    fn quantization_config(&self, compute_dtype: &str) -> Result<Option<serde_json::Value>> {
        let mut found: Option<Bnb4bitConfig> = None;
        let mut problem = None;
        crate::adapters::host::each_linear_ref::<A, _>(self, |m, l| {
            let Some(q) = l.weight.as_quantized() else {
                return;
            };
            match q.bnb_config() {
                None => {
                    problem.get_or_insert(format!("`{m}` holds {} GGUF blocks, which have no Hugging Face form: load the model dequantised (or merge) before saving", q.describe()));
                }
                Some(c) if found.is_some_and(|f| f != c) => {
                    problem.get_or_insert(format!("`{m}` is quantised as {} but other layers differ; transformers needs one configuration", q.describe()));
                }
                Some(c) => found = Some(c),
            }
        })?;
        if let Some(p) = problem {
            return Err(Error::Input(p));
        }
        Ok(found.map(|c| {
            serde_json::json!({
                "quant_method": "bitsandbytes",
                "_load_in_4bit": true,
                "_load_in_8bit": false,
                "load_in_4bit": true,
                "load_in_8bit": false,
                "bnb_4bit_quant_type": c.quant_type.as_str(),
                "bnb_4bit_use_double_quant": c.double_quant,
                "bnb_4bit_compute_dtype": compute_dtype,
                "bnb_4bit_quant_storage": "uint8",
                "llm_int8_enable_fp32_cpu_offload": false,
                "llm_int8_has_fp16_weight": false,
                "llm_int8_skip_modules": null,
                "llm_int8_threshold": 6.0,
            })
        }))
    }

    /// Trainable parameters with their learning-rate multipliers (LoRA+ trains `lora_B` faster).
    pub fn trainable_with_lr_scale(&self) -> Vec<(String, Tensor, f64)> {
        let mut scale = std::collections::HashMap::new();
        crate::adapters::host::each_linear_ref::<A, _>(self, |_, l| {
            for s in &l.adapters {
                s.adapter.visit_params(&mut |key, t| {
                    scale.insert(t.id(), s.adapter.lr_scale(key));
                });
            }
        })
        .ok();
        self.trainable_parameters().into_iter().map(|(n, t)| {
            let k = scale.get(&t.id()).copied().unwrap_or(1.0);
            (n, t, k)
        }).collect()
    }

    /// Weight dtype.
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.embed_tokens.device()
    }

    /// The output projection (`lm_head`, or the embedding when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    fn ctx(&self, positions: &[i64], mask: AttentionMask, mode: Mode) -> Result<LayerCtx> {
        let c = &self.config;
        Ok(LayerCtx {
            rope: RopeTable::new(&self.inv_freq, positions, self.dtype(), self.device())?,
            mask,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            eps: c.rms_norm_eps,
            mode,
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
        self.hidden_states_mode(input, Mode { adapters: true, training: self.training })
    }

    /// [`Llama::hidden_states`] with adapters applied or not.
    pub fn hidden_states_mode(&self, input: &ForwardInput, mode: Mode) -> Result<Tensor> {
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
                Some(m.to_dtype(DType::U8)?.to_device(self.device())?)
            }
        };
        // Batches are built on the host; ids and masks follow the weights to their device.
        let segment_ids = input.segment_ids.as_ref().map(|s| s.to_device(self.device())).transpose()?;
        let mask = AttentionMask { causal: true, key_mask, segment_ids, window: None };
        let ctx = self.ctx(&positions, mask, mode)?;
        let mut h = ops::embedding(&self.embed_tokens, &input.input_ids.to_device(self.device())?)?;
        for layer in &self.layers {
            h = if self.gradient_checkpointing {
                let (layer2, ctx2) = (layer.clone(), ctx.clone());
                let params: Vec<Tensor> = layer.named_parameters().into_iter().map(|(_, t)| t).collect();
                ops::checkpoint(&h, &params, Arc::new(move |x: &Tensor| layer2.forward(x, &ctx2)))?
            } else {
                layer.forward(&h, &ctx)?
            };
        }
        ops::rms_norm(&h, &self.norm, self.config.rms_norm_eps)
    }

    /// This model as a reward model (transformers' `…ForSequenceClassification` with `num_labels`):
    /// a trainable `score` head `[num_labels, hidden]` drawn from N(0, 0.02²) as transformers
    /// initialises it, and no `lm_head`. A model that already has a head keeps it (it is made trainable).
    pub fn into_sequence_classifier(mut self, num_labels: usize, seed: u64) -> Result<Self> {
        if num_labels == 0 {
            return Err(Error::Input("a sequence classifier needs at least one label".into()));
        }
        let h = self.config.hidden_size;
        let score = match self.score.take() {
            Some(s) if s.shape() == [num_labels, h] => s.detach(),
            Some(s) => return Err(Error::Input(format!("the model's score head is {:?}, not [{num_labels}, {h}]", s.shape()))),
            None => {
                let mut rng = crate::rng::Rng::new(seed ^ 0x5C0E_5C0E);
                let w: Vec<f32> = (0..num_labels * h).map(|_| (0.02 * rng.normal()) as f32).collect();
                Tensor::from_vec(w, &[num_labels, h], crate::Device::Cpu)?.to_dtype(self.dtype())?.to_device(self.device())?
            }
        };
        self.score = Some(score.requires_grad());
        self.lm_head = None;
        self.config.num_labels = Some(num_labels);
        Ok(self)
    }

    /// The classification head's outputs `[n, num_labels]` at the flat positions `last`
    /// (`row · seq + t`, each sequence's last real token) of the final hidden states.
    pub fn score_at(&self, hidden: &Tensor, last: &[usize]) -> Result<Tensor> {
        let score = self.score.as_ref().ok_or_else(|| Error::Input("this model has no score head: it is not a sequence classifier (reward model)".into()))?;
        ensure_shape!(hidden.rank() == 3, "score", "hidden states must be [batch, seq, hidden], got {:?}", hidden.shape());
        let (b, t, d) = (hidden.shape()[0], hidden.shape()[1], hidden.shape()[2]);
        let idx: Vec<u32> = last.iter().map(|&i| i as u32).collect();
        if let Some(bad) = idx.iter().find(|&&i| i as usize >= b * t) {
            return Err(Error::Input(format!("score: position {bad} is outside the {b}×{t} batch")));
        }
        let n = idx.len();
        let rows = ops::embedding(&ops::reshape(hidden, &[b * t, d])?, &Tensor::from_vec(idx, &[n], crate::Device::Cpu)?.to_device(hidden.device())?)?;
        ops::linear(&rows, score, None)
    }

    /// Logits `[batch, seq, vocab]`.
    pub fn forward(&self, input: &ForwardInput) -> Result<Tensor> {
        let h = self.hidden_states(input)?;
        ops::linear(&h, self.lm_head_weight(), None)
    }

    /// Logits of the base model with every adapter switched off, without gradients: the frozen
    /// reference policy of KL, preference and RL losses, at no extra memory.
    pub fn reference_forward(&self, input: &ForwardInput) -> Result<Tensor> {
        crate::autograd::no_grad(|| {
            let h = self.hidden_states_mode(input, Mode { adapters: false, training: false })?;
            ops::linear(&h, self.lm_head_weight(), None)
        })
    }

    /// Incremental forward for generation: appends `ids` (`[batch, t]`, real tokens marked by
    /// `mask`) at `positions` to the cache and returns the logits of the last new position `[batch, vocab]`.
    pub fn forward_cached(&self, ids: &[u32], mask: &[u8], positions: &[i64], cache: &mut KvCache) -> Result<Tensor> {
        let c = &self.config;
        let b = cache.batch;
        let t = ids.len() / b.max(1);
        ensure_shape!(t > 0 && ids.len() == b * t && mask.len() == ids.len() && positions.len() == ids.len(), "forward_cached", "{} ids, {} mask values, {} positions for batch {b}", ids.len(), mask.len(), positions.len());
        let ids_t = Tensor::from_vec(ids.to_vec(), &[b, t], self.device())?;
        cache.append_mask(mask)?;
        let ctx = self.ctx(positions, AttentionMask::default(), Mode::default())?;
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
                h = layer.mlp_residual(&h, &m, Mode::default())?;
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
        KvCache::new(c.num_hidden_layers, batch, capacity, c.num_key_value_heads, c.head_dim, self.dtype(), self.device())
    }
}

/// Loading the base model: a `Llama` without adapters, which [`Llama::with_adapter`] turns into one
/// that carries them.
impl Llama {
    /// A randomly initialised model (weights ~ N(0, std²), norms 1) for benchmarks and tests.
    pub fn random(config: ModelConfig, std: f64, seed: u64, dtype: DType) -> Result<Llama> {
        Self::random_with(config, std, seed, &LoadOptions::dense(dtype))
    }

    /// [`Llama::random`] with the weights of [`Llama::load_with`]'s options: with `quantize`, each
    /// linear weight is quantised as soon as it is drawn, so the dense model never exists at once.
    pub fn random_with(config: ModelConfig, std: f64, seed: u64, opts: &LoadOptions) -> Result<Llama> {
        Self::from_weights_quantized(config, &mut RandomSource { rng: crate::rng::Rng::new(seed), std, dtype: opts.dtype }, opts.quantize)
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

    /// [`Llama::load`] with options: quantise on load, keep GGUF blocks quantised.
    pub fn load_with(path: &Path, opts: &LoadOptions) -> Result<Llama> {
        if path.is_dir() {
            let config = ModelConfig::from_file(&path.join("config.json"))?;
            let files = SafetensorsFiles::open_dir(path)?;
            Self::from_weights_quantized(config, &mut HfSource { files: &files, dtype: opts.dtype }, opts.quantize)
        } else if path.extension().is_some_and(|e| e == "gguf") {
            if opts.quantize.is_some() && opts.keep_gguf_quantized {
                return Err(Error::Input(format!("{}: choose one quantised base, the GGUF's own blocks or bitsandbytes 4-bit", path.display())));
            }
            Self::gguf_with(path, opts.dtype, opts.keep_gguf_quantized, opts.quantize)
        } else {
            Self::load(path, opts.dtype)
        }
    }

    /// Loads `config.json` and the safetensors weights of a folder (bitsandbytes 4-bit layers of a
    /// pre-quantised checkpoint stay quantised).
    pub fn from_hf_dir(dir: &Path, dtype: DType) -> Result<Llama> {
        Self::load_with(dir, &LoadOptions::dense(dtype))
    }

    /// Loads a llama-architecture GGUF: dequantises to `dtype` and undoes llama.cpp's q/k row permutation.
    pub fn from_gguf(path: &Path, dtype: DType) -> Result<Llama> {
        Self::gguf_with(path, dtype, false, None)
    }

    fn gguf_with(path: &Path, dtype: DType, keep_quantized: bool, quantize: Option<Bnb4bitConfig>) -> Result<Llama> {
        let g = GgufFile::open(path)?;
        let config = gguf_config(&g)?;
        let mut by_hf = std::collections::HashMap::new();
        for t in g.tensors() {
            if let Some(hf) = gguf::hf_tensor_name(&t.name) {
                by_hf.insert(hf, t.name.clone());
            }
        }
        let heads = (config.num_attention_heads, config.num_key_value_heads);
        Self::from_weights_quantized(config, &mut GgufSource { g: &g, path, by_hf, heads, dtype, keep_quantized }, quantize)
    }
    /// Hugging Face's causal-LM loss: logits at t predict labels at t+1 (−100 ignored), mean over counted tokens.
    pub fn loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        ensure_shape!(logits.rank() == 3, "loss", "logits must be [batch, seq, vocab], got {:?}", logits.shape());
        let (b, t, v) = (logits.shape()[0], logits.shape()[1], logits.shape()[2]);
        ensure_shape!(labels.shape() == [b, t], "loss", "labels {:?} do not match logits [{b}, {t}, {v}]", labels.shape());
        let targets = crate::loss::shifted_targets(labels)?.to_device(logits.device())?;
        ops::cross_entropy(&ops::reshape(logits, &[b * t, v])?, &targets)
    }

    /// This model, ready to carry adapters of type `B`, with adapter `name` attached per `cfg`.
    /// The base weights are frozen and the adapter's are trainable, as PEFT's `get_peft_model` does.
    pub fn with_adapter<B: Adapter>(self, name: &str, cfg: &AdapterConfig<B>) -> Result<Llama<B>> {
        let mut m = self.into_adapter_type::<B>()?;
        m.freeze_all()?;
        m.add_adapter(name, cfg)?;
        Ok(m)
    }

    /// This model with linear layers able to carry adapters of type `B` (none attached yet).
    pub fn into_adapter_type<B: Adapter>(self) -> Result<Llama<B>> {
        let mut src = ModelSource::of(&self, false)?;
        let mut m = Llama::from_weights(self.config, &mut src)?;
        m.gradient_checkpointing = self.gradient_checkpointing;
        Ok(m)
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
        num_labels: None,
    })
}
