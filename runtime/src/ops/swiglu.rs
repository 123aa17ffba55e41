//! SwiGLU, the gate of the Llama MLP: down_proj(silu(gate_proj x) ∘ up_proj x).
//!
//! y = silu(g) ∘ u;  the backward (dg, du) lives in `backend::cpu::swiglu`.

use super::output;
use crate::autograd::GradFn;
use crate::backend::{BackendStorage, Storage};
use crate::error::{ensure_shape, Result};
use crate::tensor::Tensor;
use std::sync::Arc;

struct SwigluBackward {
    gate: Tensor,
    up: Tensor,
}

impl GradFn for SwigluBackward {
    fn name(&self) -> &'static str {
        "swiglu"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.gate.clone(), self.up.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (dg, du) = Storage::swiglu_backward(&*self.gate.contiguous_storage()?, &*self.up.contiguous_storage()?, &*g.contiguous_storage()?)?;
        Ok(vec![Some(Tensor::from_storage(dg, self.gate.shape())?), Some(Tensor::from_storage(du, self.up.shape())?)])
    }
}

/// `silu(gate) ∘ up` (same shapes).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    ensure_shape!(gate.shape() == up.shape(), "swiglu", "gate {:?} and up {:?} differ", gate.shape(), up.shape());
    let y = Storage::swiglu(&*gate.contiguous_storage()?, &*up.contiguous_storage()?)?;
    Ok(output(y, gate.shape(), &[gate, up], || Arc::new(SwigluBackward { gate: gate.clone(), up: up.clone() })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::gradcheck::{max_gradient_error, test_values};
    use crate::ops::{mul, sum};
    use crate::Device;

    #[test]
    fn swiglu_gradients_match_finite_differences() {
        let r = Tensor::from_vec(test_values(12, 3), &[3, 4], Device::Cpu).unwrap();
        let g: Vec<f64> = test_values(12, 1).iter().map(|v| v * 4.0).collect();
        let err = max_gradient_error(|t| sum(&mul(&swiglu(&t[0], &t[1])?, &r)?), &[(g, vec![3, 4]), (test_values(12, 2), vec![3, 4])], 1e-6)
            .unwrap();
        assert!(err < 1e-8, "max error {err}");
    }
}
