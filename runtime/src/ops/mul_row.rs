//! Scaling the features of every row: `y[.., j] = x[.., j] · v[j]` (DoRA's magnitude, gates).
//!
//! dx = g ∘ v (broadcast);  dv[j] = Σ_rows g[.., j] · x[.., j].

use super::{elementwise::mul, output};
use crate::autograd::GradFn;
use crate::backend::{BackendStorage, Storage};
use crate::error::{ensure_shape, Result};
use crate::tensor::Tensor;
use std::sync::Arc;

struct MulRowBackward {
    x: Tensor,
    v: Tensor,
}

impl GradFn for MulRowBackward {
    fn name(&self) -> &'static str {
        "mul_row"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.x.clone(), self.v.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let n = self.v.elem_count();
        let dx = self.x.requires_grad_flag().then(|| mul_row(g, &self.v)).transpose()?;
        let dv = if self.v.requires_grad_flag() {
            let gx = mul(g, &self.x)?;
            let s = gx.contiguous_storage()?.sum_rows(gx.elem_count() / n.max(1), n)?;
            Some(Tensor::from_storage(s, self.v.shape())?)
        } else {
            None
        };
        Ok(vec![dx, dv])
    }
}

/// `x ∘ v` with `v` `[n]` broadcast over the leading dimensions of `x` `[.., n]`.
pub fn mul_row(x: &Tensor, v: &Tensor) -> Result<Tensor> {
    let n = *x.shape().last().unwrap_or(&0);
    ensure_shape!(v.rank() == 1 && v.shape()[0] == n && n > 0, "mul_row", "v {:?} must be [{n}] to scale x {:?}", v.shape(), x.shape());
    let s: Storage = x.contiguous_storage()?.mul_row(&*v.contiguous_storage()?, n)?;
    Ok(output(s, x.shape(), &[x, v], || Arc::new(MulRowBackward { x: x.clone(), v: v.clone() })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::gradcheck::{max_gradient_error, test_values};

    #[test]
    fn mul_row_gradients_match_finite_differences() {
        let err = max_gradient_error(
            |t| {
                let y = mul_row(&t[0], &t[1])?;
                super::super::sum(&mul(&y, &y)?)
            },
            &[(test_values(12, 3), vec![2, 2, 3]), (test_values(3, 4), vec![3])],
            1e-6,
        )
        .unwrap();
        assert!(err < 1e-8, "max error {err}");
    }

    #[test]
    fn mul_row_scales_each_feature() {
        let x = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], &[2, 2], crate::Device::Cpu).unwrap();
        let v = Tensor::from_vec(vec![10.0f32, -1.0], &[2], crate::Device::Cpu).unwrap();
        assert_eq!(mul_row(&x, &v).unwrap().to_vec::<f32>().unwrap(), vec![10.0, -2.0, 30.0, -4.0]);
        assert!(mul_row(&x, &Tensor::from_vec(vec![1.0f32; 3], &[3], crate::Device::Cpu).unwrap()).is_err());
    }
}
