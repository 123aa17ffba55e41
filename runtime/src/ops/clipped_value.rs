//! PPO's clipped value loss, per token.
//!
//! v_c = v_old + clip(v − v_old, −c, c);  ℓ = max((v − R)², (v_c − R)²).
//! dℓ/dv = 2(v − R) where the unclipped error is the larger, else 2(v_c − R)·[|v − v_old| < c].
//!
//! Host-side like [`super::clipped_surrogate`]; saved for backward: `v`.

use super::output;
use super::pointwise::host_like;
use crate::autograd::GradFn;
use crate::error::{ensure_shape, Result};
use crate::tensor::Tensor;
use std::sync::Arc;

struct ClippedValueBackward {
    v: Tensor,
    old: Arc<Vec<f64>>,
    ret: Arc<Vec<f64>>,
    c: f64,
}

fn value_and_grad(v: f64, old: f64, ret: f64, c: f64) -> (f64, f64) {
    let d = v - old;
    let vc = old + d.clamp(-c, c);
    let (a, b) = ((v - ret).powi(2), (vc - ret).powi(2));
    if a >= b {
        (a, 2.0 * (v - ret))
    } else {
        (b, if d.abs() < c { 2.0 * (vc - ret) } else { 0.0 })
    }
}

impl GradFn for ClippedValueBackward {
    fn name(&self) -> &'static str {
        "clipped_value"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.v.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (x, g) = (self.v.to_f64_vec()?, g.to_f64_vec()?);
        let dx: Vec<f64> = x.iter().enumerate().map(|(i, &v)| g[i] * value_and_grad(v, self.old[i], self.ret[i], self.c).1).collect();
        Ok(vec![Some(host_like(dx, &self.v)?)])
    }
}

/// Per-token clipped squared value error `[m]` of predictions `v` `[m]` against the rollout's
/// values `old` and returns `ret`, with the update clipped to `±clip`.
pub fn clipped_value(v: &Tensor, old: &[f64], ret: &[f64], clip: f64) -> Result<Tensor> {
    let m = v.elem_count();
    ensure_shape!(old.len() == m && ret.len() == m, "clipped_value", "{m} values, {} old values, {} returns", old.len(), ret.len());
    let x = v.to_f64_vec()?;
    let y: Vec<f64> = (0..m).map(|i| value_and_grad(x[i], old[i], ret[i], clip).0).collect();
    let y = host_like(y, v)?;
    let s = (*y.contiguous_storage()?).clone();
    let (old, ret) = (Arc::new(old.to_vec()), Arc::new(ret.to_vec()));
    Ok(output(s, v.shape(), &[v], || Arc::new(ClippedValueBackward { v: v.clone(), old, ret, c: clip })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::gradcheck::max_gradient_error;

    #[test]
    fn gradient_matches_finite_differences_inside_and_outside_the_clip() {
        let v = vec![0.5, -0.1, 1.4, 0.05, -0.9, 0.3];
        let old = vec![0.4, 0.3, 1.0, 0.0, -0.2, 0.31];
        let ret = vec![1.0, -1.0, 0.2, 0.6, 0.5, -0.4];
        let err = max_gradient_error(|t| super::super::sum(&clipped_value(&super::super::scale(&t[0], 1.0)?, &old, &ret, 0.2)?), &[(v, vec![6])], 1e-7).unwrap();
        assert!(err < 1e-6, "max error {err}");
    }
}
