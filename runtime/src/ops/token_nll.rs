//! Token-level negative log-likelihood from logits (log-softmax fused in), and the two losses built
//! on it: mean cross-entropy over counted tokens and per-token log-probs.
//!
//! nll[t] = logsumexp(z[t]) − z[t, y[t]] (0 where y[t] = −100);  dz[t] = g[t]·(softmax(z[t]) − onehot(y[t]))
//! cross_entropy = Σ nll / #counted;  token_logprobs = −nll

use super::output;
use crate::autograd::GradFn;
use crate::backend::BackendStorage;
use crate::error::{ensure_shape, Error, Result};
use crate::tensor::{DType, Tensor};
use std::sync::Arc;

pub use crate::backend::cpu::token_nll::IGNORE_INDEX;

struct TokenNllBackward {
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
}

impl GradFn for TokenNllBackward {
    fn name(&self) -> &'static str {
        "token_nll"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.logits.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let vocab = *self.logits.shape().last().unwrap_or(&1);
        let dz = self.logits.contiguous_storage()?.token_nll_backward(
            &*self.targets.contiguous_storage()?,
            &*self.lse.contiguous_storage()?,
            &*g.contiguous_storage()?,
            vocab,
        )?;
        Ok(vec![Some(Tensor::from_storage(dz, self.logits.shape())?)])
    }
}

/// Per-token negative log-likelihood: `logits` `[..., vocab]`, `targets` I64 with the leading shape
/// (−100 = ignored, giving 0). Targets outside the vocabulary are an error naming the position.
pub fn token_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let vocab = *logits.shape().last().unwrap_or(&0);
    ensure_shape!(
        logits.rank() >= 1 && &logits.shape()[..logits.rank() - 1] == targets.shape(),
        "token_nll",
        "logits {:?} and targets {:?} disagree",
        logits.shape(),
        targets.shape()
    );
    let targets = if targets.dtype() == DType::I64 { targets.clone() } else { targets.to_dtype(DType::I64)? };
    let host = targets.to_vec::<i64>()?;
    if let Some((pos, y)) = host.iter().enumerate().find(|(_, &y)| y != IGNORE_INDEX && (y < 0 || y as usize >= vocab)) {
        return Err(Error::Input(format!("label {y} at position {pos} is outside the vocabulary (size {vocab}) and is not -100")));
    }
    let (nll, lse) = logits.contiguous_storage()?.token_nll(&*targets.contiguous_storage()?, vocab)?;
    let lse = Tensor::from_storage(lse, targets.shape())?;
    Ok(output(nll, targets.shape(), &[logits], || Arc::new(TokenNllBackward { logits: logits.clone(), targets: targets.clone(), lse })))
}

/// Mean cross-entropy over the tokens whose target is not −100 (Hugging Face's `loss`).
/// Errors when every target is ignored: there is nothing to learn from and the mean is undefined.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let count = targets.to_f64_vec()?.iter().filter(|&&y| y as i64 != IGNORE_INDEX).count();
    if count == 0 {
        return Err(Error::Input("cross_entropy: every label is -100, so no token is trained".into()));
    }
    super::scale(&super::sum(&token_nll(logits, targets)?)?, 1.0 / count as f64)
}

/// log p(target) for every token (0 where the target is −100).
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    super::scale(&token_nll(logits, targets)?, -1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::gradcheck::{max_gradient_error, test_values};
    use crate::ops::{mul, sum};
    use crate::Device;

    fn targets() -> Tensor {
        Tensor::from_vec(vec![2i64, -100, 0, 4], &[2, 2], Device::Cpu).unwrap()
    }

    #[test]
    fn cross_entropy_gradient_matches_finite_differences() {
        let z: Vec<f64> = test_values(20, 1).iter().map(|v| v * 3.0).collect();
        let err = max_gradient_error(|t| cross_entropy(&t[0], &targets()), &[(z, vec![2, 2, 5])], 1e-6).unwrap();
        assert!(err < 1e-8, "max error {err}");
    }

    #[test]
    fn token_logprobs_gradient_matches_finite_differences() {
        let w = Tensor::from_vec(test_values(4, 7), &[2, 2], Device::Cpu).unwrap();
        let err = max_gradient_error(|t| sum(&mul(&token_logprobs(&t[0], &targets())?, &w)?), &[(test_values(20, 2), vec![2, 2, 5])], 1e-6)
            .unwrap();
        assert!(err < 1e-8, "max error {err}");
    }

    #[test]
    fn cross_entropy_value_matches_definition_and_ignores_minus_100() {
        let z = Tensor::from_vec(vec![1.0f64, 2.0, 3.0, 0.0, 0.0, 0.0], &[2, 3], Device::Cpu).unwrap();
        let y = Tensor::from_vec(vec![2i64, -100], &[2], Device::Cpu).unwrap();
        let l = cross_entropy(&z, &y).unwrap().to_scalar().unwrap();
        let want = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln() - 3.0;
        assert!((l - want).abs() < 1e-12);
    }

    #[test]
    fn all_ignored_and_out_of_vocab_labels_are_errors() {
        let z = Tensor::from_vec(vec![0.0f32; 6], &[2, 3], Device::Cpu).unwrap();
        assert!(cross_entropy(&z, &Tensor::from_vec(vec![-100i64, -100], &[2], Device::Cpu).unwrap()).is_err());
        let e = token_nll(&z, &Tensor::from_vec(vec![0i64, 3], &[2], Device::Cpu).unwrap()).unwrap_err().to_string();
        assert!(e.contains("label 3") && e.contains("position 1"), "{e}");
    }
}
