//! LoRA (Hu et al., 2021) as PEFT defines it, written with `#[adapter]`:
//!
//! delta(x) = s · B·A·dropout(x),  A `[r, in]` Kaiming-uniform, B `[out, r]` zero,  s = α/r (rsLoRA: α/√r).
//!
//! LoRA+ (Hayou et al., 2024): `loraplus_lr_ratio` makes `lora_B` learn that many times faster.
//! OLoRA (Büyükakyüz, 2024): `init_lora_weights = Olora` starts A, B from the QR of W.

use super::config::AdapterConfig;
use super::peft::{self, LoraInit, LoraSettings};
use super::{AdapterFormat, BaseLayer};
use crate::error::{ensure_shape, Result};
use crate::tensor::Tensor;
use crate::{adapter, linalg, ops};
use serde_json::Value;
use std::path::Path;

/// A LoRA adapter on one linear layer.
#[adapter(format = custom, merge = custom, after_init = init_from_base)]
pub struct Lora {
    #[param(key = "lora_A.weight", shape = [r, in_features], init = kaiming_uniform)]
    pub lora_a: Tensor,
    #[param(key = "lora_B.weight", shape = [out_features, r], init = zeros, lr_scale = loraplus_lr_ratio)]
    pub lora_b: Tensor,
    /// Rank.
    #[hyper]
    pub r: usize,
    /// Scaling numerator α.
    #[hyper]
    pub lora_alpha: f64,
    /// Dropout on the adapter's input while training.
    #[hyper(default = 0.0)]
    pub lora_dropout: f64,
    /// Scale by α/√r instead of α/r (Kalajdzievski, 2023).
    #[hyper(default = false)]
    pub use_rslora: bool,
    /// LoRA+: learning-rate multiplier of `lora_B` (PEFT's `loraplus_lr_ratio`; 1 = plain LoRA).
    #[hyper(default = 1.0)]
    pub loraplus_lr_ratio: f64,
    /// How A and B start.
    #[hyper(default = LoraInit::Default)]
    pub init_lora_weights: LoraInit,
}

impl Lora {
    /// The PEFT-named settings of this layer.
    pub fn settings(&self) -> LoraSettings {
        LoraSettings { r: self.r, lora_alpha: self.lora_alpha, lora_dropout: self.lora_dropout, use_rslora: self.use_rslora, init_lora_weights: self.init_lora_weights }
    }

    fn delta(&self, x: &Tensor, base: BaseLayer<'_>) -> Result<Tensor> {
        let x = if base.training { ops::dropout(x, self.lora_dropout)? } else { x.clone() };
        // s·(x·Aᵀ)·Bᵀ as one op (on the CPU exactly scale(linear(linear(x, A), B)); on CUDA two
        // GEMMs with the scale folded into the second). The base output is added by `Linear`.
        ops::lora_linear(&x, ops::LoraBase::None, None, &self.lora_a, &self.lora_b, self.settings().scale())
    }

    /// `s·B·A` `[out, in]` in the base weight's dtype.
    fn delta_weight(&self, base: BaseLayer<'_>) -> Result<Tensor> {
        crate::autograd::no_grad(|| ops::scale(&ops::matmul(&self.lora_b, &self.lora_a, false, false)?, self.settings().scale())?.to_dtype(base.weight.dtype()))
    }

    fn merge_weight(&mut self, base: BaseLayer<'_>) -> Result<Tensor> {
        crate::autograd::no_grad(|| ops::add(&base.weight.dense()?, &self.delta_weight(base)?))
    }

    fn unmerge_weight(&mut self, base: BaseLayer<'_>) -> Result<Tensor> {
        crate::autograd::no_grad(|| ops::sub(&base.weight.dense()?, &self.delta_weight(base)?))
    }

    fn init_from_base(&mut self, weight: &mut Tensor) -> Result<()> {
        if self.init_lora_weights == LoraInit::Olora {
            (self.lora_a, self.lora_b) = olora(weight, self.r, self.settings().scale(), self.lora_a.dtype())?;
        }
        Ok(())
    }
}

/// OLoRA: `W = Q·R`, `B = Q[:, :r]`, `A = R[:r, :]`, and the base keeps `W − s·B·A`.
pub(crate) fn olora(weight: &mut Tensor, r: usize, scale: f64, dtype: crate::DType) -> Result<(Tensor, Tensor)> {
    let (o, i) = (weight.shape()[0], weight.shape()[1]);
    ensure_shape!(r <= o.min(i), "olora", "rank {r} exceeds min(out, in) = {} of a [{o}, {i}] weight", o.min(i));
    let w = weight.to_f64_vec()?;
    let (q, rr) = linalg::qr(&w, o, i);
    let k = o.min(i);
    let b: Vec<f64> = (0..o).flat_map(|row| q[row * k..row * k + r].to_vec()).collect();
    let a: Vec<f64> = rr[..r * i].to_vec();
    let mut res = w;
    for row in 0..o {
        for col in 0..i {
            res[row * i + col] -= scale * (0..r).map(|t| b[row * r + t] * a[t * i + col]).sum::<f64>();
        }
    }
    let trainable = weight.requires_grad_flag();
    // Results live where the weight lives.
    let device = weight.device();
    let new_w = Tensor::from_vec(res, &[o, i], device)?.to_dtype(weight.dtype())?;
    *weight = if trainable { new_w.requires_grad() } else { new_w };
    let a = Tensor::from_vec(a, &[r, i], device)?.to_dtype(dtype)?.requires_grad();
    let b = Tensor::from_vec(b, &[o, r], device)?.to_dtype(dtype)?.requires_grad();
    Ok((a, b))
}

impl From<LoraSettings> for LoraConfig {
    fn from(s: LoraSettings) -> Self {
        LoraConfig { r: s.r, lora_alpha: s.lora_alpha, lora_dropout: s.lora_dropout, use_rslora: s.use_rslora, loraplus_lr_ratio: 1.0, init_lora_weights: s.init_lora_weights }
    }
}

impl LoraConfig {
    pub fn settings(&self) -> LoraSettings {
        LoraSettings { r: self.r, lora_alpha: self.lora_alpha, lora_dropout: self.lora_dropout, use_rslora: self.use_rslora, init_lora_weights: self.init_lora_weights }
    }
}

/// PEFT's own `adapter_config.json` (`peft_type: "LORA"`).
impl AdapterFormat for Lora {
    fn write_config(layers: &[(String, LoraConfig)], model_linears: &[String], base_model: Option<&str>) -> Result<Value> {
        let s: Vec<_> = layers.iter().map(|(m, c)| (m.clone(), c.settings())).collect();
        peft::write_lora_config(&s, model_linears, false, base_model)
    }
    fn read_config(v: &Value, path: &Path, model_linears: &[String]) -> Result<AdapterConfig<Lora>> {
        let (base, per) = peft::read_lora_config(v, path, model_linears, false)?;
        let mut cfg = AdapterConfig::new(LoraConfig::from(base));
        cfg.patterns = per.into_iter().map(|(m, s)| (m, LoraConfig::from(s))).collect();
        Ok(cfg)
    }
}
