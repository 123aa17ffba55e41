//! Parameter initialisers named in `#[param(init = …)]`.
//!
//! `zeros`, `ones`, `kaiming_uniform` (PyTorch's `nn.Linear` default, a = √5: U(−1/√fan_in, 1/√fan_in),
//! which PEFT uses for `lora_A`), `normal(std)`, and `weight_norm` (‖W‖ of each output row, DoRA's
//! magnitude at start).

use super::adapter::InitCx;
use crate::error::{ensure_shape, Result};
use crate::tensor::Tensor;
use crate::Device;

fn filled(cx: &InitCx<'_>, data: Vec<f32>) -> Result<Tensor> {
    Tensor::from_vec(data, cx.shape, Device::Cpu)?.to_dtype(cx.dtype)
}

/// All zeros (`lora_B`: the adapter starts as the identity).
pub fn zeros(cx: &mut InitCx<'_>) -> Result<Tensor> {
    filled(cx, vec![0.0; cx.shape.iter().product()])
}

/// All ones (gates, scales).
pub fn ones(cx: &mut InitCx<'_>) -> Result<Tensor> {
    filled(cx, vec![1.0; cx.shape.iter().product()])
}

/// U(−b, b) with b = 1/√fan_in, fan_in = the last dimension (`kaiming_uniform_(a=√5)`).
pub fn kaiming_uniform(cx: &mut InitCx<'_>) -> Result<Tensor> {
    let fan_in = *cx.shape.last().unwrap_or(&1) as f64;
    let b = 1.0 / fan_in.max(1.0).sqrt();
    let n: usize = cx.shape.iter().product();
    let data = (0..n).map(|_| ((cx.rng.uniform() * 2.0 - 1.0) * b) as f32).collect();
    filled(cx, data)
}

/// N(0, std²).
pub fn normal(cx: &mut InitCx<'_>, std: f64) -> Result<Tensor> {
    let n: usize = cx.shape.iter().product();
    let data = (0..n).map(|_| (cx.rng.normal() * std) as f32).collect();
    filled(cx, data)
}

/// ‖W[o, :]‖₂ for each output row `o` of the base weight: shape `[out_features]`.
pub fn weight_norm(cx: &mut InitCx<'_>) -> Result<Tensor> {
    let (o, i) = (cx.base.out_features(), cx.base.in_features());
    ensure_shape!(cx.shape == [o], "weight_norm", "`{}` must have shape [out_features] = [{o}], declared {:?}", cx.key, cx.shape);
    let w = cx.base.weight.dense()?.to_f64_vec()?;
    let data = (0..o).map(|r| w[r * i..(r + 1) * i].iter().map(|v| v * v).sum::<f64>().sqrt() as f32).collect();
    filled(cx, data)
}
