//! DoRA (Liu et al., 2024) as PEFT computes it, written with `#[adapter]`: the weight is split into
//! a magnitude `m` (one per output row) and a direction, and LoRA adapts the direction:
//!
//! W' = (m / ‖W + s·B·A‖) ∘ (W + s·B·A)   (norm over each output row, treated as a constant)
//! delta(x) = (c − 1) ∘ (x·Wᵀ) + c ∘ s·B·A·dropout(x),  c = m / ‖W + s·B·A‖

use super::config::AdapterConfig;
use super::peft::{self, LoraInit, LoraSettings};
use super::{AdapterFormat, BaseLayer};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::{adapter, autograd, ops};
use serde_json::Value;
use std::path::Path;

/// A DoRA adapter on one linear layer.
#[adapter(format = custom, merge = custom)]
pub struct Dora {
    #[param(key = "lora_A.weight", shape = [r, in_features], init = kaiming_uniform)]
    pub lora_a: Tensor,
    #[param(key = "lora_B.weight", shape = [out_features, r], init = zeros, lr_scale = loraplus_lr_ratio)]
    pub lora_b: Tensor,
    /// `m`: starts at ‖W‖ of each output row, so the model is unchanged at start.
    #[param(key = "lora_magnitude_vector", shape = [out_features], init = weight_norm, lr_scale = loraplus_lr_ratio)]
    pub magnitude: Tensor,
    #[hyper]
    pub r: usize,
    #[hyper]
    pub lora_alpha: f64,
    #[hyper(default = 0.0)]
    pub lora_dropout: f64,
    #[hyper(default = false)]
    pub use_rslora: bool,
    #[hyper(default = 1.0)]
    pub loraplus_lr_ratio: f64,
    /// ‖W + s·B·A‖ at merge time, to unmerge exactly.
    #[state]
    pub merged_norm: Option<Tensor>,
}

impl Dora {
    pub fn settings(&self) -> LoraSettings {
        LoraSettings { r: self.r, lora_alpha: self.lora_alpha, lora_dropout: self.lora_dropout, use_rslora: self.use_rslora, init_lora_weights: LoraInit::Default }
    }

    /// `W + s·B·A` `[out, in]` and its row norms `[out]`, as constants.
    fn combined(&self, w: &Tensor) -> Result<(Tensor, Tensor)> {
        autograd::no_grad(|| {
            let ba = ops::matmul(&self.lora_b, &self.lora_a, false, false)?;
            let wc = ops::add(&w.to_dtype(ba.dtype())?, &ops::scale(&ba, self.settings().scale())?)?;
            let (o, i) = (wc.shape()[0], wc.shape()[1]);
            let v = wc.to_f64_vec()?;
            let norms: Vec<f64> = (0..o).map(|r| v[r * i..(r + 1) * i].iter().map(|x| x * x).sum::<f64>().sqrt()).collect();
            Ok((wc, Tensor::from_vec(norms, &[o], ba.device())?.to_dtype(ba.dtype())?))
        })
    }

    /// `c = m / norm` (gradient flows to `m` only).
    fn magnitude_scale(&self, norm: &Tensor) -> Result<Tensor> {
        let inv: Vec<f64> = norm.to_f64_vec()?.iter().map(|n| 1.0 / n).collect();
        ops::mul(&self.magnitude, &Tensor::from_vec(inv, norm.shape(), norm.device())?.to_dtype(norm.dtype())?)
    }

    fn delta(&self, x: &Tensor, base: BaseLayer<'_>) -> Result<Tensor> {
        let xd = if base.training { ops::dropout(x, self.lora_dropout)? } else { x.clone() };
        let lora = ops::scale(&ops::linear(&ops::linear(&xd, &self.lora_a, None)?, &self.lora_b, None)?, self.settings().scale())?;
        let (_, norm) = self.combined(&base.weight.dense()?)?;
        let c = self.magnitude_scale(&norm)?;
        // The base output without bias, on the same (dropped-out) input the adapter saw.
        let base_out = match base.out {
            Some(y) if xd.same_storage(x) && base.bias.is_none() => y.clone(),
            _ => base.weight.linear(&xd, None)?,
        };
        ops::sub(&ops::mul_row(&ops::add(&base_out, &lora)?, &c)?, &base_out)
    }

    fn merge_weight(&mut self, base: BaseLayer<'_>) -> Result<Tensor> {
        let (wc, norm) = self.combined(&base.weight.dense()?)?;
        let c: Vec<f64> = self.magnitude.to_f64_vec()?.iter().zip(norm.to_f64_vec()?).map(|(m, n)| m / n).collect();
        self.merged_norm = Some(norm);
        scale_rows(&wc, &c)?.to_dtype(base.weight.dtype())
    }

    fn unmerge_weight(&mut self, base: BaseLayer<'_>) -> Result<Tensor> {
        let norm = self.merged_norm.take().ok_or_else(|| Error::Input(format!("DoRA on `{}` is not merged", base.module)))?;
        let inv: Vec<f64> = self.magnitude.to_f64_vec()?.iter().zip(norm.to_f64_vec()?).map(|(m, n)| n / m).collect();
        autograd::no_grad(|| {
            let wc = scale_rows(&base.weight.dense()?.to_dtype(norm.dtype())?, &inv)?;
            let ba = ops::scale(&ops::matmul(&self.lora_b, &self.lora_a, false, false)?, self.settings().scale())?;
            ops::sub(&wc, &ba)?.to_dtype(base.weight.dtype())
        })
    }
}

/// Row `o` of `w` `[out, in]` times `c[o]` (host arithmetic: merging runs once).
fn scale_rows(w: &Tensor, c: &[f64]) -> Result<Tensor> {
    let i = w.shape()[1];
    let v: Vec<f64> = w.to_f64_vec()?.iter().enumerate().map(|(k, x)| x * c[k / i]).collect();
    Tensor::from_vec(v, w.shape(), w.device())?.to_dtype(w.dtype())
}

impl From<LoraSettings> for DoraConfig {
    fn from(s: LoraSettings) -> Self {
        DoraConfig { r: s.r, lora_alpha: s.lora_alpha, lora_dropout: s.lora_dropout, use_rslora: s.use_rslora, loraplus_lr_ratio: 1.0 }
    }
}

/// PEFT's own `adapter_config.json` (`peft_type: "LORA"`, `use_dora: true`).
impl AdapterFormat for Dora {
    fn write_config(layers: &[(String, DoraConfig)], model_linears: &[String], base_model: Option<&str>) -> Result<Value> {
        let s: Vec<_> = layers
            .iter()
            .map(|(m, c)| (m.clone(), LoraSettings { r: c.r, lora_alpha: c.lora_alpha, lora_dropout: c.lora_dropout, use_rslora: c.use_rslora, init_lora_weights: LoraInit::Default }))
            .collect();
        peft::write_lora_config(&s, model_linears, true, base_model)
    }
    fn read_config(v: &Value, path: &Path, model_linears: &[String]) -> Result<AdapterConfig<Dora>> {
        let (base, per) = peft::read_lora_config(v, path, model_linears, true)?;
        if base.init_lora_weights != LoraInit::Default {
            return Err(Error::Config { path: path.into(), key: "init_lora_weights".into(), msg: "DoRA with OLoRA initialisation is not supported".into() });
        }
        let mut cfg = AdapterConfig::new(DoraConfig::from(base));
        cfg.patterns = per.into_iter().map(|(m, s)| (m, DoraConfig::from(s))).collect();
        Ok(cfg)
    }
}
