//! Token-level KL divergence of a policy from a frozen reference, from both logits.
//!
//! kl[t] = Σᵢ p_t,ᵢ (log p_t,ᵢ − log q_t,ᵢ) with p = softmax(z[t]), q = softmax(r[t]);
//! dz[t] = g[t] · p_t ∘ (log p_t − log q_t − kl[t]). The reference gets no gradient.

use super::output;
use crate::autograd::GradFn;
use crate::backend::BackendStorage;
use crate::error::{ensure_shape, Result};
use crate::tensor::Tensor;
use std::sync::Arc;

struct KlBackward {
    logits: Tensor,
    reference: Tensor,
}

impl GradFn for KlBackward {
    fn name(&self) -> &'static str {
        "token_kl"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.logits.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let vocab = *self.logits.shape().last().unwrap_or(&1);
        let dz = self.logits.contiguous_storage()?.kl_rows_backward(&*self.reference.contiguous_storage()?, &*g.contiguous_storage()?, vocab)?;
        Ok(vec![Some(Tensor::from_storage(dz, self.logits.shape())?)])
    }
}

/// KL(softmax(logits) ‖ softmax(reference)) per position: `[..., vocab]` → `[...]`.
pub fn token_kl(logits: &Tensor, reference: &Tensor) -> Result<Tensor> {
    ensure_shape!(logits.shape() == reference.shape() && logits.rank() >= 1, "token_kl", "logits {:?} and reference logits {:?} differ", logits.shape(), reference.shape());
    let vocab = logits.shape()[logits.rank() - 1];
    let reference = reference.detach();
    let kl = logits.contiguous_storage()?.kl_rows(&*reference.contiguous_storage()?, vocab)?;
    let rows = &logits.shape()[..logits.rank() - 1];
    Ok(output(kl, rows, &[logits], || Arc::new(KlBackward { logits: logits.clone(), reference })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::gradcheck::{max_gradient_error, test_values};

    #[test]
    fn token_kl_gradient_matches_finite_differences() {
        let r = Tensor::from_vec(test_values(15, 9), &[3, 5], crate::Device::Cpu).unwrap();
        let w = Tensor::from_vec(test_values(3, 10), &[3], crate::Device::Cpu).unwrap();
        let err = max_gradient_error(|t| super::super::sum(&super::super::mul(&token_kl(&t[0], &r)?, &w)?), &[(test_values(15, 8), vec![3, 5])], 1e-6).unwrap();
        assert!(err < 1e-8, "max error {err}");
    }

    #[test]
    fn token_kl_is_zero_for_equal_and_matches_the_definition() {
        let z = Tensor::from_vec(vec![0.5f64, -1.0, 2.0], &[1, 3], crate::Device::Cpu).unwrap();
        let r = Tensor::from_vec(vec![0.0f64, 0.0, 0.0], &[1, 3], crate::Device::Cpu).unwrap();
        assert!(token_kl(&z, &z).unwrap().to_scalar().unwrap().abs() < 1e-15);
        let lse = (0.5f64.exp() + (-1.0f64).exp() + 2.0f64.exp()).ln();
        let want: f64 = [0.5, -1.0, 2.0].iter().map(|&v: &f64| (v - lse).exp() * (v - lse + 3f64.ln())).sum();
        assert!((token_kl(&z, &r).unwrap().to_scalar().unwrap() - want).abs() < 1e-14);
    }
}
