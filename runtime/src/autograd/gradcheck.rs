//! Finite-difference gradient checks in f64: the proof behind every op's backward.

use crate::error::Result;
use crate::tensor::Tensor;
use crate::Device;

/// Compares the gradients `backward` computes for `f(inputs)` with central differences
/// (f(x+h) − f(x−h)) / 2h on every element of every input. Inputs are f64 host data with shapes;
/// `f` must return a scalar. Returns the largest error, each measured as
/// |analytic − numeric| / max(1, |numeric|).
pub fn max_gradient_error(
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[(Vec<f64>, Vec<usize>)],
    h: f64,
) -> Result<f64> {
    let leaves: Vec<Tensor> = inputs
        .iter()
        .map(|(d, s)| Tensor::from_vec(d.clone(), s, Device::Cpu).map(|t| t.requires_grad()))
        .collect::<Result<_>>()?;
    let grads = f(&leaves)?.backward()?;
    let eval = |data: Vec<Vec<f64>>| -> Result<f64> {
        let ts: Vec<Tensor> =
            data.into_iter().zip(inputs).map(|(d, (_, s))| Tensor::from_vec(d, s, Device::Cpu)).collect::<Result<_>>()?;
        crate::autograd::no_grad(|| f(&ts)?.to_scalar())
    };
    let mut worst: f64 = 0.0;
    for (which, (data, _)) in inputs.iter().enumerate() {
        let analytic = match grads.get(&leaves[which]) {
            Some(g) => g.to_f64_vec()?,
            None => vec![0.0; data.len()],
        };
        for i in 0..data.len() {
            let mut plus: Vec<Vec<f64>> = inputs.iter().map(|(d, _)| d.clone()).collect();
            let mut minus = plus.clone();
            plus[which][i] += h;
            minus[which][i] -= h;
            let numeric = (eval(plus)? - eval(minus)?) / (2.0 * h);
            let err = (analytic[i] - numeric).abs() / numeric.abs().max(1.0);
            worst = worst.max(err);
        }
    }
    Ok(worst)
}

/// Deterministic pseudo-random values in [-1, 1) for tests.
pub fn test_values(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = crate::rng::Rng::new(seed);
    (0..n).map(|_| rng.uniform() * 2.0 - 1.0).collect()
}
