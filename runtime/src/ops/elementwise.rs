//! Elementwise arithmetic: residual add, difference, product, scaling, and the full sum.
//!
//! add: d(a+b) = (g, g);  sub: (g, −g);  mul: (g∘b, g∘a);  scale(a, c): c·g;  add_scalar(a, c): g;
//! sum: g broadcast.

use super::output;
use crate::autograd::GradFn;
use crate::backend::{BackendStorage, BinaryOp, Storage};
use crate::error::{ensure_shape, Result};
use crate::tensor::Tensor;
use std::sync::Arc;

fn binary(a: &Tensor, b: &Tensor, op: BinaryOp, name: &'static str) -> Result<Tensor> {
    ensure_shape!(a.shape() == b.shape(), name, "operands have shapes {:?} and {:?}", a.shape(), b.shape());
    let s = a.contiguous_storage()?.binary(&*b.contiguous_storage()?, op)?;
    Ok(output(s, a.shape(), &[a, b], || {
        let keep = |t: &Tensor| if op == BinaryOp::Mul { t.clone() } else { t.edge() };
        Arc::new(BinaryBackward { a: keep(a), b: keep(b), op })
    }))
}

/// `a` and `b` are [`Tensor::edge`]s for add and sub, whose gradients need no values.
struct BinaryBackward {
    a: Tensor,
    b: Tensor,
    op: BinaryOp,
}

impl GradFn for BinaryBackward {
    fn name(&self) -> &'static str {
        "binary"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.a.clone(), self.b.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(match self.op {
            BinaryOp::Add => vec![Some(g.clone()), Some(g.clone())],
            BinaryOp::Sub => vec![Some(g.clone()), Some(scale(g, -1.0)?)],
            BinaryOp::Mul => vec![
                self.a.requires_grad_flag().then(|| mul(g, &self.b)).transpose()?,
                self.b.requires_grad_flag().then(|| mul(g, &self.a)).transpose()?,
            ],
        })
    }
}

/// `a + b` (same shapes). The residual connection of every decoder block.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Add, "add")
}

/// `a − b` (same shapes).
pub fn sub(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Sub, "sub")
}

/// `a ∘ b` (same shapes).
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Mul, "mul")
}

struct ScaleBackward {
    a: Tensor,
    c: f64,
}

impl GradFn for ScaleBackward {
    fn name(&self) -> &'static str {
        "scale"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.a.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(scale(g, self.c)?)])
    }
}

/// `c · a`.
pub fn scale(a: &Tensor, c: f64) -> Result<Tensor> {
    let s = a.contiguous_storage()?.affine(c, 0.0)?;
    Ok(output(s, a.shape(), &[a], || Arc::new(ScaleBackward { a: a.edge(), c })))
}

/// `a + c` for a scalar `c` (its gradient is `g`: a scale by 1).
pub fn add_scalar(a: &Tensor, c: f64) -> Result<Tensor> {
    let s = a.contiguous_storage()?.affine(1.0, c)?;
    Ok(output(s, a.shape(), &[a], || Arc::new(ScaleBackward { a: a.edge(), c: 1.0 })))
}

struct SumBackward {
    a: Tensor,
}

impl GradFn for SumBackward {
    fn name(&self) -> &'static str {
        "sum"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.a.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let gv = g.to_scalar()?;
        let s = Storage::zeros(self.a.device(), g.dtype(), self.a.elem_count())?.affine(0.0, gv)?;
        Ok(vec![Some(Tensor::from_storage(s, self.a.shape())?)])
    }
}

/// Sum of all elements, as a scalar (shape `[]`).
pub fn sum(a: &Tensor) -> Result<Tensor> {
    let v = a.contiguous_storage()?.sum_all()?;
    let s = Storage::zeros(a.device(), a.dtype(), 1)?.affine(0.0, v)?;
    Ok(output(s, &[], &[a], || Arc::new(SumBackward { a: a.edge() })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::gradcheck::{max_gradient_error, test_values};

    #[test]
    fn elementwise_gradients_match_finite_differences() {
        let a = (test_values(6, 1), vec![2, 3]);
        let b = (test_values(6, 2), vec![2, 3]);
        let err = max_gradient_error(
            |t| {
                let x = add(&t[0], &t[1])?;
                let y = mul(&x, &t[0])?;
                let z = sub(&add_scalar(&y, 0.3)?, &scale(&t[1], 0.5)?)?;
                sum(&mul(&z, &z)?)
            },
            &[a, b],
            1e-6,
        )
        .unwrap();
        assert!(err < 1e-8, "max error {err}");
    }

    #[test]
    fn mismatched_shapes_are_rejected() {
        let a = Tensor::from_vec(vec![1.0f32; 6], &[2, 3], crate::Device::Cpu).unwrap();
        let b = Tensor::from_vec(vec![1.0f32; 6], &[3, 2], crate::Device::Cpu).unwrap();
        let e = add(&a, &b).unwrap_err().to_string();
        assert!(e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
    }
}
