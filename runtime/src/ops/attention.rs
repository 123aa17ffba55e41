//! Scaled dot-product attention with causal, padding, packed-segment and sliding-window masks, GQA
//! without repeating K/V. The kernel (blockwise, online softmax) lives in `backend::cpu::attention`.
//!
//! O = softmax(scale·QKᵀ + M)V;  backward recomputes P from the saved log-sum-exp:
//! dV = Pᵀ dO;  dP = dO Vᵀ;  dS = P∘(dP − rowsum(dO∘O));  dQ = scale·dS K;  dK = scale·dSᵀ Q

use crate::autograd::GradFn;
use crate::backend::{AttnMasks, AttnShape, BackendStorage, Storage};
use crate::error::{ensure_shape, Result};
use crate::tensor::{DType, Tensor};
use std::sync::Arc;

/// Which keys each query may attend to.
#[derive(Clone, Debug, Default)]
pub struct AttentionMask {
    /// Queries see only keys at or before their own position.
    pub causal: bool,
    /// U8 `[batch, kv_len]`, 1 = real token, 0 = padding.
    pub key_mask: Option<Tensor>,
    /// U32 `[batch, kv_len]`: packed examples; tokens attend only within their own segment.
    pub segment_ids: Option<Tensor>,
    /// Sliding window (Mistral): a query at p sees keys j with p − j < window.
    pub window: Option<usize>,
}

struct AttentionBackward {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: AttentionMask,
    shape: AttnShape,
    scale: f64,
}

fn with_masks<R>(mask: &AttentionMask, f: impl FnOnce(&AttnMasks<'_, Storage>) -> Result<R>) -> Result<R> {
    let km = mask.key_mask.as_ref().map(|t| t.contiguous_storage()).transpose()?;
    let seg = mask.segment_ids.as_ref().map(|t| t.contiguous_storage()).transpose()?;
    let m = AttnMasks { causal: mask.causal, q_offset: 0, key_mask: km.as_deref(), segment_ids: seg.as_deref(), window: mask.window };
    f(&m)
}

impl GradFn for AttentionBackward {
    fn name(&self) -> &'static str {
        "attention"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.q.clone(), self.k.clone(), self.v.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (dq, dk, dv) = with_masks(&self.mask, |m| {
            Storage::attention_backward(
                &*self.q.contiguous_storage()?,
                &*self.k.contiguous_storage()?,
                &*self.v.contiguous_storage()?,
                &*self.out.contiguous_storage()?,
                &*self.lse.contiguous_storage()?,
                &*g.contiguous_storage()?,
                &self.shape,
                m,
                self.scale,
            )
        })?;
        Ok(vec![
            Some(Tensor::from_storage(dq, self.q.shape())?),
            Some(Tensor::from_storage(dk, self.k.shape())?),
            Some(Tensor::from_storage(dv, self.v.shape())?),
        ])
    }
}

/// Attention of `q` `[batch, q_len, heads, head_dim]` over `k`, `v` `[batch, kv_len, kv_heads, head_dim]`
/// (heads a multiple of kv_heads). Returns `[batch, q_len, heads, head_dim]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask, scale: f64) -> Result<Tensor> {
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        super::expect_rank("attention", name, t, 4)?;
    }
    let (qs, ks) = (q.shape(), k.shape());
    ensure_shape!(k.shape() == v.shape(), "attention", "k {:?} and v {:?} differ", k.shape(), v.shape());
    ensure_shape!(qs[0] == ks[0] && qs[3] == ks[3], "attention", "q {:?} and k {:?} disagree on batch or head_dim", qs, ks);
    ensure_shape!(ks[2] > 0 && qs[2] % ks[2] == 0, "attention", "{} query heads are not a multiple of {} kv heads", qs[2], ks[2]);
    if mask.causal {
        ensure_shape!(qs[1] == ks[1], "attention", "causal training attention needs q_len == kv_len, got {} and {}", qs[1], ks[1]);
    }
    for (name, m, dt) in [("key_mask", &mask.key_mask, DType::U8), ("segment_ids", &mask.segment_ids, DType::U32)] {
        if let Some(m) = m {
            ensure_shape!(m.shape() == [ks[0], ks[1]], "attention", "{name} has shape {:?}, expected [{}, {}]", m.shape(), ks[0], ks[1]);
            crate::tensor::ensure_dtype(m, dt, "attention")?;
        }
    }
    let shape = AttnShape { batch: qs[0], q_len: qs[1], kv_len: ks[1], kv_cap: ks[1], n_heads: qs[2], n_kv_heads: ks[2], head_dim: qs[3] };
    let (o, lse) = with_masks(mask, |m| {
        Storage::attention(&*q.contiguous_storage()?, &*k.contiguous_storage()?, &*v.contiguous_storage()?, &shape, m, scale)
    })?;
    let lse = Tensor::from_storage(lse, &[qs[0], qs[2], qs[1]])?;
    let needs = crate::autograd::is_grad_enabled() && [q, k, v].iter().any(|t| t.requires_grad_flag());
    if !needs {
        return Tensor::from_storage(o, qs);
    }
    // The backward needs O itself: keep a constant handle on the same storage as the returned tensor.
    let out_const = Tensor::from_storage(o, qs)?;
    let back = Arc::new(AttentionBackward {
        q: q.clone(),
        k: k.clone(),
        v: v.clone(),
        out: out_const.clone(),
        lse,
        mask: mask.clone(),
        shape,
        scale,
    });
    Ok(out_const.with_grad_fn(back))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::gradcheck::{max_gradient_error, test_values};
    use crate::ops::{mul, sum};
    use crate::Device;

    #[test]
    fn attention_gradients_match_finite_differences_with_all_masks() {
        let (b, t, h, hk, d) = (2, 5, 4, 2, 3);
        let km = Tensor::from_vec(vec![1u8, 1, 1, 1, 1, 1, 1, 1, 0, 0], &[b, t], Device::Cpu).unwrap();
        let seg = Tensor::from_vec(vec![0u32, 0, 1, 1, 1, 0, 0, 0, 0, 0], &[b, t], Device::Cpu).unwrap();
        let r = Tensor::from_vec(test_values(b * t * h * d, 9), &[b, t, h, d], Device::Cpu).unwrap();
        for mask in [
            AttentionMask { causal: true, ..Default::default() },
            AttentionMask { causal: true, key_mask: Some(km.clone()), segment_ids: Some(seg.clone()), window: None },
            AttentionMask { causal: true, key_mask: None, segment_ids: None, window: Some(2) },
            AttentionMask { causal: false, key_mask: Some(km.clone()), ..Default::default() },
        ] {
            let err = max_gradient_error(
                |x| sum(&mul(&attention(&x[0], &x[1], &x[2], &mask, 0.7)?, &r)?),
                &[
                    (test_values(b * t * h * d, 1), vec![b, t, h, d]),
                    (test_values(b * t * hk * d, 2), vec![b, t, hk, d]),
                    (test_values(b * t * hk * d, 3), vec![b, t, hk, d]),
                ],
                1e-6,
            )
            .unwrap();
            assert!(err < 1e-8, "{mask:?}: max error {err}");
        }
    }
}
