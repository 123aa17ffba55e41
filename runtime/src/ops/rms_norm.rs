//! RMSNorm over the last dimension (Llama's norm; Qwen3's per-head q/k norm).
//!
//! y = x / sqrt(mean(x²) + eps) ∘ w;  the backward lives in `backend::cpu::rms_norm`.

use super::output;
use crate::autograd::GradFn;
use crate::backend::BackendStorage;
use crate::error::{ensure_shape, Result};
use crate::tensor::Tensor;
use std::sync::Arc;

struct RmsNormBackward {
    x: Tensor,
    w: Tensor,
    rstd: Tensor,
}

impl GradFn for RmsNormBackward {
    fn name(&self) -> &'static str {
        "rms_norm"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.x.clone(), self.w.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let dim = self.w.elem_count();
        let (dx, dw) = self.x.contiguous_storage()?.rms_norm_backward(
            &*self.w.contiguous_storage()?,
            &*self.rstd.contiguous_storage()?,
            &*g.contiguous_storage()?,
            dim,
        )?;
        Ok(vec![
            self.x.requires_grad_flag().then(|| Tensor::from_storage(dx, self.x.shape())).transpose()?,
            self.w.requires_grad_flag().then(|| Tensor::from_storage(dw, self.w.shape())).transpose()?,
        ])
    }
}

/// Normalises each vector along the last dimension by its root mean square and scales by `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dim = w.elem_count();
    ensure_shape!(
        w.rank() == 1 && x.shape().last() == Some(&dim),
        "rms_norm",
        "weight {:?} does not match the last dimension of input {:?}",
        w.shape(),
        x.shape()
    );
    let (y, rstd) = x.contiguous_storage()?.rms_norm(&*w.contiguous_storage()?, dim, eps)?;
    let rows = x.elem_count() / dim.max(1);
    let rstd = Tensor::from_storage(rstd, &[rows])?;
    Ok(output(y, x.shape(), &[x, w], || Arc::new(RmsNormBackward { x: x.clone(), w: w.clone(), rstd })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::gradcheck::{max_gradient_error, test_values};
    use crate::ops::{mul, sum};
    use crate::Device;

    #[test]
    fn rms_norm_gradients_match_finite_differences() {
        let r = Tensor::from_vec(test_values(15, 3), &[3, 5], Device::Cpu).unwrap();
        let err = max_gradient_error(
            |t| sum(&mul(&rms_norm(&t[0], &t[1], 1e-5)?, &r)?),
            &[(test_values(15, 1), vec![3, 5]), (test_values(5, 2), vec![5])],
            1e-6,
        )
        .unwrap();
        assert!(err < 1e-7, "max error {err}");
    }

    #[test]
    fn rms_norm_matches_definition() {
        let x = Tensor::from_vec(vec![1.0f64, 2.0, 3.0, 4.0], &[1, 4], Device::Cpu).unwrap();
        let w = Tensor::from_vec(vec![1.0f64, 0.5, 2.0, 1.0], &[4], Device::Cpu).unwrap();
        let y = rms_norm(&x, &w, 0.0).unwrap().to_vec::<f64>().unwrap();
        let r = (30.0f64 / 4.0).sqrt();
        let want = [1.0 / r, 2.0 * 0.5 / r, 3.0 * 2.0 / r, 4.0 / r];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-12);
        }
    }
}
