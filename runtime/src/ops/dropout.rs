//! Inverted dropout: `y = x ∘ m / (1 − p)` with `m ~ Bernoulli(1 − p)` per element.
//!
//! The mask is a constant of the graph, so the backward is `dx = g ∘ m / (1 − p)` through [`mul`].
//! Masks come from a seeded stream per thread ([`set_dropout_seed`]) so runs are reproducible.

use super::elementwise::mul;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::Tensor;
use std::cell::Cell;

thread_local! {
    static STREAM: Cell<u64> = const { Cell::new(0x5eed) };
}

/// Restarts this thread's dropout mask stream from `seed`.
pub fn set_dropout_seed(seed: u64) {
    STREAM.with(|s| s.set(seed));
}

/// This thread's dropout stream position (saved in checkpoints so a resumed run draws the same masks).
pub fn dropout_state() -> u64 {
    STREAM.with(|s| s.get())
}

/// Drops each element of `x` with probability `p` and rescales the rest by `1/(1 − p)`.
/// `p = 0` returns `x` itself.
pub fn dropout(x: &Tensor, p: f64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::Input(format!("dropout probability {p} is outside [0, 1)")));
    }
    if p == 0.0 {
        return Ok(x.clone());
    }
    let mut rng = Rng::new(STREAM.with(|s| s.replace(s.get().wrapping_add(0x9E37_79B9_7F4A_7C15))));
    let keep = 1.0 / (1.0 - p);
    let m: Vec<f64> = (0..x.elem_count()).map(|_| if rng.uniform() < p { 0.0 } else { keep }).collect();
    let m = Tensor::from_vec(m, x.shape(), x.device())?.to_dtype(x.dtype())?;
    mul(x, &m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::gradcheck::{max_gradient_error, test_values};

    #[test]
    fn dropout_gradient_matches_finite_differences_for_a_fixed_mask() {
        let err = max_gradient_error(
            |t| {
                set_dropout_seed(42); // the same mask on every evaluation
                let y = dropout(&t[0], 0.3)?;
                super::super::sum(&super::super::mul(&y, &y)?)
            },
            &[(test_values(40, 5), vec![5, 8])],
            1e-6,
        )
        .unwrap();
        assert!(err < 1e-8, "max error {err}");
    }

    #[test]
    fn dropout_keeps_expectation_and_its_gradient_is_the_mask() {
        let n = 20000;
        let x = Tensor::from_vec(vec![1.0f64; n], &[n], crate::Device::Cpu).unwrap().requires_grad();
        let y = dropout(&x, 0.25).unwrap();
        let v = y.to_vec::<f64>().unwrap();
        let zeros = v.iter().filter(|&&a| a == 0.0).count() as f64 / n as f64;
        assert!((zeros - 0.25).abs() < 0.02, "dropped fraction {zeros}");
        assert!(v.iter().all(|&a| a == 0.0 || (a - 4.0 / 3.0).abs() < 1e-12));
        // y is linear in x, so its gradient equals y / x elementwise.
        let g = super::super::sum(&y).unwrap().backward().unwrap();
        assert_eq!(g.get(&x).unwrap().to_vec::<f64>().unwrap(), v);
        let t = Tensor::from_vec(test_values(4, 1), &[4], crate::Device::Cpu).unwrap();
        assert!(dropout(&t, 0.0).unwrap().same_storage(&t));
        assert!(dropout(&t, 1.0).is_err());
    }
}
