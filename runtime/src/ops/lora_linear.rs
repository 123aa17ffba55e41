//! The LoRA linear as one op: `y = base(x) + s·(x·Aᵀ)·Bᵀ`, with `A` `[r, in]`, `B` `[out, r]`, and the
//! base `x·Wᵀ (+ b)` over a dense or quantised `W` `[out, in]`, or absent (the adapter's delta alone).
//!
//! backward: `dxa = s·dy·B`, `dB = s·dyᵀ·xa` (`xa = x·Aᵀ` saved by the forward), `dA = dxaᵀ·x`,
//! `dx = dy·W + dxa·A`, `dW = dyᵀ·x` (a dense base that trains), `db = Σ_rows dy`.
//!
//! On the CPU the op is the composition of the existing ops (`linear`/`linear_quantized`, then
//! `linear(linear(x, A), B)`, `scale`, `add`), so its numerics are exactly those of LoRA before this
//! op existed. On CUDA it is `backend::cuda::lora`: the base GEMM writes `y`, the LoRA product is
//! accumulated into the same output (β = 1), and the backward runs as the few GEMMs above with the
//! LoRA term of `dx` accumulated onto the base term.

use super::output;
use crate::autograd::GradFn;
use crate::backend::cuda::lora as cuda_lora;
use crate::backend::cuda::CudaStorage;
use crate::backend::{BackendStorage, Storage};
use crate::error::{ensure_shape, Error, Result};
use crate::quant::QuantizedWeight;
use crate::tensor::Tensor;
use std::sync::Arc;

/// The base layer under a LoRA adapter.
#[derive(Clone, Copy, Debug)]
pub enum LoraBase<'a> {
    /// No base: the op is the adapter's delta `s·(x·Aᵀ)·Bᵀ`.
    None,
    Dense(&'a Tensor),
    Quantized(&'a Arc<QuantizedWeight>),
}

#[derive(Clone)]
enum OwnedBase {
    None,
    Dense(Tensor),
    Quantized(Arc<QuantizedWeight>),
}

struct LoraLinearBackward {
    x: Tensor,
    a: Tensor,
    b: Tensor,
    base: OwnedBase,
    bias: Option<Tensor>,
    /// `x·Aᵀ` from the forward (a constant).
    xa: Tensor,
    scale: f64,
}

fn dev_storage<'a>(s: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        Storage::Cpu(_) => Err(Error::Input(format!("lora_linear: {what} is on the CPU while the input is on a CUDA device"))),
    }
}

impl GradFn for LoraLinearBackward {
    fn name(&self) -> &'static str {
        "lora_linear"
    }
    fn inputs(&self) -> Vec<Tensor> {
        let mut v = vec![self.x.clone(), self.a.clone(), self.b.clone()];
        if let OwnedBase::Dense(w) = &self.base {
            v.push(w.clone());
        }
        v.extend(self.bias.clone());
        v
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (r, in_f) = (self.a.shape()[0], self.a.shape()[1]);
        let out_f = self.b.shape()[0];
        let rows = self.x.elem_count() / in_f.max(1);
        let (gs, xs, xas, as_, bs) = (
            g.contiguous_storage()?,
            self.x.contiguous_storage()?,
            self.xa.contiguous_storage()?,
            self.a.contiguous_storage()?,
            self.b.contiguous_storage()?,
        );
        let w_store = match &self.base {
            OwnedBase::Dense(w) => Some(w.contiguous_storage()?),
            _ => None,
        };
        let base = match (&self.base, &w_store) {
            (OwnedBase::Dense(_), Some(ws)) => cuda_lora::GpuBase::Dense(dev_storage(ws, "the base weight")?),
            (OwnedBase::Quantized(q), _) => cuda_lora::GpuBase::Quantized(q),
            _ => cuda_lora::GpuBase::None,
        };
        let w_trains = matches!(&self.base, OwnedBase::Dense(w) if w.requires_grad_flag());
        let need = cuda_lora::Needs {
            x: self.x.requires_grad_flag(),
            a: self.a.requires_grad_flag(),
            b: self.b.requires_grad_flag(),
            w: w_trains,
        };
        let d = cuda_lora::Dims { rows, in_f, out_f, r };
        let dy = dev_storage(&gs, "the output gradient")?;
        let gr = cuda_lora::backward(
            dy,
            dev_storage(&xs, "x")?,
            dev_storage(&xas, "x·Aᵀ")?,
            base,
            dev_storage(&as_, "lora A")?,
            dev_storage(&bs, "lora B")?,
            d,
            self.scale as f32,
            need,
            false,
        )?;
        let t = |s: Option<CudaStorage>, shape: &[usize]| s.map(|s| Tensor::from_storage(Storage::Cuda(s), shape)).transpose();
        let mut v = vec![t(gr.dx, self.x.shape())?, t(gr.da, self.a.shape())?, t(gr.db, self.b.shape())?];
        if let OwnedBase::Dense(w) = &self.base {
            v.push(t(gr.dw, w.shape())?);
        }
        if let Some(bias) = &self.bias {
            v.push(if bias.requires_grad_flag() { Some(Tensor::from_storage(gs.sum_rows(rows, out_f)?, bias.shape())?) } else { None });
        }
        Ok(v)
    }
}

/// `base(x) (+ bias) + scale·(x·Aᵀ)·Bᵀ` over the last dimension of `x`; `a` is `[r, in]`, `b` `[out, r]`.
/// A bias needs a base.
pub fn lora_linear(x: &Tensor, base: LoraBase<'_>, bias: Option<&Tensor>, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    super::expect_rank("lora_linear", "lora A", a, 2)?;
    super::expect_rank("lora_linear", "lora B", b, 2)?;
    let (r, in_f, out_f) = (a.shape()[0], a.shape()[1], b.shape()[0]);
    ensure_shape!(b.shape()[1] == r, "lora_linear", "lora B {:?} does not match rank {r} of lora A {:?}", b.shape(), a.shape());
    ensure_shape!(
        x.shape().last() == Some(&in_f),
        "lora_linear",
        "input {:?} does not end in in_features {in_f} of lora A {:?}",
        x.shape(),
        a.shape()
    );
    let base_shape = match base {
        LoraBase::None => None,
        LoraBase::Dense(w) => Some(w.shape().to_vec()),
        LoraBase::Quantized(q) => Some(q.shape().to_vec()),
    };
    if let Some(s) = &base_shape {
        ensure_shape!(s[..] == [out_f, in_f], "lora_linear", "base weight {s:?} for lora A {:?} and B {:?}", a.shape(), b.shape());
    }
    ensure_shape!(bias.is_none() || base_shape.is_some(), "lora_linear", "a bias needs a base weight");
    if !matches!(x.device(), crate::Device::Cuda(_)) {
        // The composition of the existing ops: exactly LoRA's numerics (`Linear` adds the delta to
        // the base output; the adapter computes s·linear(linear(x, A), B)).
        let delta = super::scale(&super::linear(&super::linear(x, a, None)?, b, None)?, scale)?;
        return match base {
            LoraBase::None => Ok(delta),
            LoraBase::Dense(w) => super::add(&super::linear(x, w, bias)?, &delta),
            LoraBase::Quantized(q) => super::add(&super::linear_quantized(x, q, bias)?, &delta),
        };
    }
    let rows = x.elem_count() / in_f.max(1);
    let (xs, as_, bs) = (x.contiguous_storage()?, a.contiguous_storage()?, b.contiguous_storage()?);
    let w_store = match base {
        LoraBase::Dense(w) => Some(w.contiguous_storage()?),
        _ => None,
    };
    let bias_store = bias.map(|t| t.contiguous_storage()).transpose()?;
    let gbase = match (base, &w_store) {
        (LoraBase::Dense(_), Some(ws)) => cuda_lora::GpuBase::Dense(dev_storage(ws, "the base weight")?),
        (LoraBase::Quantized(q), _) => cuda_lora::GpuBase::Quantized(q),
        _ => cuda_lora::GpuBase::None,
    };
    let gbias = match &bias_store {
        Some(s) => Some(dev_storage(s, "the bias")?),
        None => None,
    };
    let d = cuda_lora::Dims { rows, in_f, out_f, r };
    let (y, xa) = cuda_lora::forward(
        dev_storage(&xs, "x")?,
        gbase,
        gbias,
        dev_storage(&as_, "lora A")?,
        dev_storage(&bs, "lora B")?,
        d,
        scale as f32,
        false,
    )?;
    drop((xs, as_, bs, w_store, bias_store));
    let mut shape = x.shape().to_vec();
    if let Some(l) = shape.last_mut() {
        *l = out_f;
    }
    let mut ins = vec![x, a, b];
    if let LoraBase::Dense(w) = base {
        ins.push(w);
    }
    ins.extend(bias);
    let owned = match base {
        LoraBase::None => OwnedBase::None,
        LoraBase::Dense(w) => OwnedBase::Dense(w.clone()),
        LoraBase::Quantized(q) => OwnedBase::Quantized(q.clone()),
    };
    let xa = Tensor::from_storage(Storage::Cuda(xa), &[rows, r])?;
    Ok(output(Storage::Cuda(y), &shape, &ins, || {
        Arc::new(LoraLinearBackward { x: x.clone(), a: a.clone(), b: b.clone(), base: owned, bias: bias.cloned(), xa, scale })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::gradcheck::test_values;
    use crate::Device;

    fn t(n: usize, shape: &[usize], seed: u64) -> Tensor {
        Tensor::from_vec(test_values(n, seed).iter().map(|v| *v as f32).collect(), shape, Device::default()).unwrap()
    }

    /// On the CPU the op is bit-identical to the composition LoRA used before it.
    #[test]
    fn lora_linear_on_the_cpu_equals_the_composed_ops_bit_for_bit() {
        let (x, a, b, w, bias) =
            (t(2 * 3 * 6, &[2, 3, 6], 1), t(4 * 6, &[4, 6], 2), t(5 * 4, &[5, 4], 3), t(5 * 6, &[5, 6], 4), t(5, &[5], 5));
        let delta = crate::ops::scale(&crate::ops::linear(&crate::ops::linear(&x, &a, None).unwrap(), &b, None).unwrap(), 0.75).unwrap();
        let y0 = lora_linear(&x, LoraBase::None, None, &a, &b, 0.75).unwrap();
        assert_eq!(y0.to_vec::<f32>().unwrap(), delta.to_vec::<f32>().unwrap());
        let y1 = lora_linear(&x, LoraBase::Dense(&w), Some(&bias), &a, &b, 0.75).unwrap();
        let want = crate::ops::add(&crate::ops::linear(&x, &w, Some(&bias)).unwrap(), &delta).unwrap();
        assert_eq!(y1.to_vec::<f32>().unwrap(), want.to_vec::<f32>().unwrap());
        assert_eq!(y1.shape(), &[2, 3, 5]);
        let e = lora_linear(&x, LoraBase::None, Some(&bias), &a, &b, 1.0).unwrap_err().to_string();
        assert!(e.contains("bias"), "{e}");
    }
}
