//! A scalar function applied to every element of a short vector: the per-pair and per-sequence
//! nonlinearities of preference and reward losses (log σ, σ, relu, square, …).
//!
//! y = f(x);  dx = g ∘ f′(x).
//!
//! The vectors are one value per pair or sequence (tens of elements), so the op runs on the host:
//! it reads `x`, applies `f` in f64 and writes `y` back to `x`'s device. Saved for backward: `x`.

use super::output;
use crate::autograd::GradFn;
use crate::error::Result;
use crate::tensor::Tensor;
use std::sync::Arc;

/// Which function.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pointwise {
    /// log σ(x) = −softplus(−x), computed without overflow.
    LogSigmoid,
    /// σ(x).
    Sigmoid,
    /// max(x, 0) (derivative 0 at 0, as PyTorch).
    Relu,
    /// x².
    Square,
    /// eˣ.
    Exp,
    /// log(1 − eˣ) for x < 0 (ORPO's log odds of a mean log-probability).
    Log1mExp,
}

fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

impl Pointwise {
    /// f(x).
    pub fn value(self, x: f64) -> f64 {
        match self {
            Pointwise::LogSigmoid => log_sigmoid(x),
            Pointwise::Sigmoid => sigmoid(x),
            Pointwise::Relu => x.max(0.0),
            Pointwise::Square => x * x,
            Pointwise::Exp => x.exp(),
            // log(1 − eˣ): via log(−expm1(x)) near 0, log1p(−eˣ) far from it.
            Pointwise::Log1mExp => {
                if x > -std::f64::consts::LN_2 {
                    (-x.exp_m1()).ln()
                } else {
                    (-x.exp()).ln_1p()
                }
            }
        }
    }

    /// f′(x).
    pub fn derivative(self, x: f64) -> f64 {
        match self {
            Pointwise::LogSigmoid => sigmoid(-x),
            Pointwise::Sigmoid => sigmoid(x) * sigmoid(-x),
            Pointwise::Relu => f64::from(u8::from(x > 0.0)),
            Pointwise::Square => 2.0 * x,
            Pointwise::Exp => x.exp(),
            // d/dx log(1 − eˣ) = −eˣ / (1 − eˣ) = −1 / (e^{−x} − 1).
            Pointwise::Log1mExp => -1.0 / (-x).exp_m1(),
        }
    }
}

struct PointwiseBackward {
    x: Tensor,
    f: Pointwise,
}

impl GradFn for PointwiseBackward {
    fn name(&self) -> &'static str {
        "pointwise"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.x.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (x, g_host) = (self.x.to_f64_vec()?, g.to_f64_vec()?);
        let dx: Vec<f64> = x.iter().zip(&g_host).map(|(&x, &g)| g * self.f.derivative(x)).collect();
        Ok(vec![Some(host_like(dx, &self.x)?)])
    }
}

/// `values` as a tensor of `like`'s shape, dtype and device (the host-side ops' results).
pub(super) fn host_like(values: Vec<f64>, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(values, like.shape(), crate::Device::Cpu)?.to_dtype(like.dtype())?.to_device(like.device())
}

/// `f` applied to every element of `x` (any shape; meant for short vectors).
pub fn pointwise(x: &Tensor, f: Pointwise) -> Result<Tensor> {
    let y: Vec<f64> = x.to_f64_vec()?.into_iter().map(|v| f.value(v)).collect();
    let y = host_like(y, x)?;
    let s = (*y.contiguous_storage()?).clone();
    Ok(output(s, x.shape(), &[x], || Arc::new(PointwiseBackward { x: x.clone(), f })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::gradcheck::max_gradient_error;

    #[test]
    fn pointwise_gradients_match_finite_differences() {
        let x = vec![-3.1, -0.9, -0.2, 0.4, 1.7, 6.0];
        let neg: Vec<f64> = x.iter().map(|v: &f64| -v.abs() - 0.05).collect();
        for f in [Pointwise::LogSigmoid, Pointwise::Sigmoid, Pointwise::Relu, Pointwise::Square, Pointwise::Exp, Pointwise::Log1mExp] {
            let input = if f == Pointwise::Log1mExp { neg.clone() } else { x.clone() };
            // The input goes through an op first: a leaf hides a backward that loses its input's graph.
            let err = max_gradient_error(|t| super::super::sum(&pointwise(&super::super::scale(&t[0], 1.0)?, f)?), &[(input, vec![6])], 1e-6).unwrap();
            assert!(err < 1e-7, "{f:?}: max error {err}");
        }
    }

    #[test]
    fn values_are_stable_far_from_zero() {
        assert_eq!(Pointwise::LogSigmoid.value(-800.0), -800.0);
        assert!(Pointwise::LogSigmoid.value(800.0).abs() < 1e-300);
        assert!((Pointwise::Log1mExp.value(-1e-12) - (1e-12f64).ln()).abs() < 1e-6);
        assert!((Pointwise::Log1mExp.value(-50.0) + (-50.0f64).exp()).abs() < 1e-30);
    }
}
