//! The linear layer `y = x·Wᵀ + b`, in Hugging Face layout, carrying named adapters.
//!
//! Each adapter adds its delta to the base output: `y' = y + Σ_enabled delta_k(x)`. Merged adapters
//! live in `W` instead and are skipped; a forward with adapters switched off (the frozen reference
//! of preference and RL training) sees the base model.

use crate::adapters::{Adapter, BaseLayer, NoAdapter};
use crate::error::{Error, Result};
use crate::module::{join, Module, ParamRole, Visit, VisitLinear, VisitLinearRef, VisitMut};
use crate::ops;
use crate::quant::QuantizedWeight;
use crate::tensor::{DType, Tensor};
use std::sync::Arc;

/// One adapter instance on one layer.
#[derive(Clone, Debug)]
pub struct AdapterSlot<A> {
    /// The adapter's name (`default`, or what the user chose).
    pub name: String,
    pub adapter: A,
    /// Disabled adapters are kept but skipped.
    pub enabled: bool,
    /// Folded into the base weight.
    pub merged: bool,
}

/// How a forward pass treats adapters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mode {
    /// Apply enabled adapters (false: the base model alone).
    pub adapters: bool,
    /// Training: dropout is active.
    pub training: bool,
}

impl Default for Mode {
    fn default() -> Self {
        Mode { adapters: true, training: false }
    }
}

/// The weight `[out, in]` of a linear layer: a dense tensor, or a frozen quantised weight
/// (bitsandbytes NF4/FP4, GGUF Q4_0/Q4_1/Q8_0) that is dequantised a tile at a time in the matmul.
#[derive(Clone, Debug)]
pub enum LinearWeight {
    Dense(Tensor),
    Quantized(Arc<QuantizedWeight>),
}

impl LinearWeight {
    /// `[out_features, in_features]`.
    pub fn shape(&self) -> [usize; 2] {
        match self {
            LinearWeight::Dense(t) => [t.shape()[0], t.shape().get(1).copied().unwrap_or(0)],
            LinearWeight::Quantized(q) => q.shape(),
        }
    }

    /// The dtype of the values (a quantised weight: the dtype it dequantises to).
    pub fn dtype(&self) -> DType {
        match self {
            LinearWeight::Dense(t) => t.dtype(),
            LinearWeight::Quantized(q) => q.dtype(),
        }
    }

    /// The dense tensor, when the weight is not quantised.
    pub fn as_dense(&self) -> Option<&Tensor> {
        match self {
            LinearWeight::Dense(t) => Some(t),
            LinearWeight::Quantized(_) => None,
        }
    }

    /// The quantised weight, when it is one.
    pub fn as_quantized(&self) -> Option<&Arc<QuantizedWeight>> {
        match self {
            LinearWeight::Dense(_) => None,
            LinearWeight::Quantized(q) => Some(q),
        }
    }

    /// The weight as a dense tensor: itself, or the whole dequantised weight (merging, DoRA's
    /// column norm — QLoRA's `dequant(W4)`, which is what an adapter on it was trained against).
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            LinearWeight::Dense(t) => Ok(t.clone()),
            LinearWeight::Quantized(q) => q.dequantize(),
        }
    }

    /// `x·Wᵀ + b`.
    pub fn linear(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        match self {
            LinearWeight::Dense(w) => ops::linear(x, w, bias),
            LinearWeight::Quantized(q) => ops::linear_quantized(x, q, bias),
        }
    }
}

/// A linear layer: weight `[out, in]`, optional bias `[out]`, adapters of type `A`.
#[derive(Clone, Debug)]
pub struct Linear<A: Adapter = NoAdapter> {
    pub weight: LinearWeight,
    pub bias: Option<Tensor>,
    pub adapters: Vec<AdapterSlot<A>>,
}

impl<A: Adapter> Linear<A> {
    /// A layer with a dense weight and no adapters.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight: LinearWeight::Dense(weight), bias, adapters: Vec::new() }
    }

    /// A layer with any weight and no adapters.
    pub fn with_weight(weight: LinearWeight, bias: Option<Tensor>) -> Self {
        Linear { weight, bias, adapters: Vec::new() }
    }

    pub fn in_features(&self) -> usize {
        self.weight.shape()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.shape()[0]
    }

    /// What an adapter of this layer sees.
    pub fn base<'a>(&'a self, module: &'a str, out: Option<&'a Tensor>, training: bool) -> BaseLayer<'a> {
        BaseLayer { module, weight: &self.weight, bias: self.bias.as_ref(), out, training }
    }

    /// `x·Wᵀ + b` plus every enabled, unmerged adapter (inference mode).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_mode(x, Mode::default())
    }

    /// [`Linear::forward`] under `mode`. Switching adapters off while one is merged is an error:
    /// the base weight no longer exists separately.
    pub fn forward_mode(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        if let Some(y) = self.fused_lora(x, mode) {
            return y;
        }
        let y = self.weight.linear(x, self.bias.as_ref())?;
        if !mode.adapters {
            if let Some(s) = self.adapters.iter().find(|s| s.merged) {
                return Err(Error::Input(format!("adapter `{}` is merged into the weights; unmerge it before running the base model", s.name)));
            }
            return Ok(y);
        }
        let mut out = y.clone();
        for s in self.adapters.iter().filter(|s| s.enabled && !s.merged) {
            let d = s.adapter.forward(x, self.base("", Some(&y), mode.training))?;
            out = ops::add(&out, &d)?;
        }
        Ok(out)
    }
}

impl<A: Adapter> Linear<A> {
    /// On CUDA, one live LoRA adapter without active dropout runs as the fused LoRA linear
    /// (`ops::lora_linear`: the low-rank product accumulated into the base GEMM's output, one
    /// backward for dx, dA, dB). The CPU keeps the composition, whose numerics the PEFT parity
    /// tests pin.
    fn fused_lora(&self, x: &Tensor, mode: Mode) -> Option<Result<Tensor>> {
        if !x.device().is_cuda() || !mode.adapters {
            return None;
        }
        let mut live = self.adapters.iter().filter(|s| s.enabled && !s.merged);
        let (s, None) = (live.next()?, live.next()) else { return None };
        let l = (&s.adapter as &dyn std::any::Any).downcast_ref::<crate::adapters::Lora>()?;
        if mode.training && l.lora_dropout > 0.0 {
            return None;
        }
        let base = match &self.weight {
            LinearWeight::Dense(w) => ops::LoraBase::Dense(w),
            LinearWeight::Quantized(q) => ops::LoraBase::Quantized(q),
        };
        Some(ops::lora_linear(x, base, self.bias.as_ref(), &l.lora_a, &l.lora_b, l.settings().scale()))
    }
}

/// The name of an adapter parameter inside the model: PEFT's in-memory form, the adapter name
/// before the last component (`lora_A.weight` of `default` → `lora_A.default.weight`).
pub fn adapter_param_name(module: &str, key: &str, adapter: &str) -> String {
    let named = match key.rsplit_once('.') {
        Some((head, last)) => format!("{head}.{adapter}.{last}"),
        None => format!("{key}.{adapter}"),
    };
    join(module, &named)
}

impl<A: Adapter> Module for Linear<A> {
    fn visit(&self, prefix: &str, f: &mut Visit<'_>) {
        match &self.weight {
            LinearWeight::Dense(w) => f(&join(prefix, "weight"), w, ParamRole::Base),
            LinearWeight::Quantized(q) => {
                for (k, t) in q.entries() {
                    let numel = if k == "weight" { q.shape()[0] * q.shape()[1] } else { 0 };
                    f(&join(prefix, k), t, ParamRole::Quantized { numel });
                }
            }
        }
        if let Some(b) = &self.bias {
            f(&join(prefix, "bias"), b, ParamRole::Base);
        }
        for s in &self.adapters {
            s.adapter.visit_params(&mut |key, t| {
                f(&adapter_param_name(prefix, key, &s.name), t, ParamRole::Adapter { adapter: &s.name, module: prefix, key })
            });
        }
    }

    fn visit_mut(&mut self, prefix: &str, f: &mut VisitMut<'_>) -> Result<()> {
        // A quantised weight is frozen data: never replaced, converted or trained.
        if let LinearWeight::Dense(w) = &mut self.weight {
            f(&join(prefix, "weight"), w, ParamRole::Base)?;
        }
        if let Some(b) = &mut self.bias {
            f(&join(prefix, "bias"), b, ParamRole::Base)?;
        }
        for s in &mut self.adapters {
            let name = s.name.clone();
            s.adapter.visit_params_mut(&mut |key, t| {
                f(&adapter_param_name(prefix, key, &name), t, ParamRole::Adapter { adapter: &name, module: prefix, key })
            })?;
        }
        Ok(())
    }

    fn visit_linears(&self, prefix: &str, f: &mut VisitLinearRef<'_>) {
        f(prefix, self)
    }

    fn visit_linears_mut(&mut self, prefix: &str, f: &mut VisitLinear<'_>) -> Result<()> {
        f(prefix, self)
    }
}
