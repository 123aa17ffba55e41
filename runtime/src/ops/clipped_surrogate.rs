//! The clipped policy-gradient surrogate of PPO and GRPO, per token.
//!
//! r = exp(logp − old);  ℓ = −min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A).
//! dℓ/dlogp = −A·r where the unclipped term is the minimum (always when r is inside the range),
//! else 0: a token whose ratio already moved past the range in the direction its advantage
//! pushes gets no gradient.
//!
//! One value per completion token (thousands), so the op runs on the host in f64 and writes the
//! result back to `logp`'s device. Saved for backward: `logp` (old log-probs and advantages are
//! constants).

use super::output;
use super::pointwise::host_like;
use crate::autograd::GradFn;
use crate::error::{ensure_shape, Result};
use crate::tensor::Tensor;
use std::sync::Arc;

struct ClippedSurrogateBackward {
    logp: Tensor,
    old: Arc<Vec<f64>>,
    adv: Arc<Vec<f64>>,
    range: (f64, f64),
}

fn grad_one(logp: f64, old: f64, a: f64, (lo, hi): (f64, f64)) -> f64 {
    let r = (logp - old).exp();
    let clipped = r.clamp(1.0 - lo, 1.0 + hi);
    if r * a <= clipped * a || (r - clipped).abs() == 0.0 {
        -a * r
    } else {
        0.0
    }
}

impl GradFn for ClippedSurrogateBackward {
    fn name(&self) -> &'static str {
        "clipped_surrogate"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.logp.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (x, g) = (self.logp.to_f64_vec()?, g.to_f64_vec()?);
        let dx: Vec<f64> = x.iter().enumerate().map(|(i, &lp)| g[i] * grad_one(lp, self.old[i], self.adv[i], self.range)).collect();
        Ok(vec![Some(host_like(dx, &self.logp)?)])
    }
}

/// Per-token clipped surrogate loss `[m]` of log-probs `logp` `[m]` against the sampling
/// policy's `old` log-probs and per-token advantages `adv`, with the ratio clipped to
/// `[1 − eps_low, 1 + eps_high]`.
pub fn clipped_surrogate(logp: &Tensor, old: &[f64], adv: &[f64], eps_low: f64, eps_high: f64) -> Result<Tensor> {
    let m = logp.elem_count();
    ensure_shape!(old.len() == m && adv.len() == m, "clipped_surrogate", "{m} log-probs, {} old log-probs, {} advantages", old.len(), adv.len());
    let x = logp.to_f64_vec()?;
    let y: Vec<f64> = (0..m)
        .map(|i| {
            let r = (x[i] - old[i]).exp();
            -(r * adv[i]).min(r.clamp(1.0 - eps_low, 1.0 + eps_high) * adv[i])
        })
        .collect();
    let y = host_like(y, logp)?;
    let s = (*y.contiguous_storage()?).clone();
    let (old, adv) = (Arc::new(old.to_vec()), Arc::new(adv.to_vec()));
    Ok(output(s, logp.shape(), &[logp], || Arc::new(ClippedSurrogateBackward { logp: logp.clone(), old, adv, range: (eps_low, eps_high) })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::gradcheck::max_gradient_error;

    #[test]
    fn gradient_matches_finite_differences_on_both_sides_of_the_range() {
        // Ratios e^(x − old) of about 0.5, 0.95, 1.0, 1.1, 1.6 with positive and negative advantages.
        let x = vec![-1.0, -0.3, 0.2, 0.5, -2.0, 0.1, -0.7, 0.9];
        let old = vec![-0.3069, -0.2487, 0.2, 0.4047, -2.47, 0.4, -0.0069, 0.5];
        let adv = vec![1.0, -1.5, 0.7, 2.0, -0.5, 1.2, -2.0, -0.8];
        let err = max_gradient_error(
            |t| super::super::sum(&clipped_surrogate(&super::super::scale(&t[0], 1.0)?, &old, &adv, 0.2, 0.28)?),
            &[(x, vec![8])],
            1e-7,
        )
        .unwrap();
        assert!(err < 1e-6, "max error {err}");
    }

    #[test]
    fn clipped_tokens_get_no_gradient() {
        // r = e^0.5 ≈ 1.65 > 1.28 with A > 0: the clipped term is the minimum, so no gradient.
        let lp = Tensor::from_vec(vec![0.5f64, -0.5], &[2], crate::Device::Cpu).unwrap().requires_grad();
        let y = clipped_surrogate(&lp, &[0.0, 0.0], &[1.0, 1.0], 0.2, 0.28).unwrap();
        let v = y.to_f64_vec().unwrap();
        assert!((v[0] + 1.28).abs() < 1e-12 && (v[1] + (-0.5f64).exp()).abs() < 1e-12, "{v:?}");
        let g = super::super::sum(&y).unwrap().backward().unwrap();
        let g = g.get(&lp).unwrap().to_f64_vec().unwrap();
        assert_eq!(g[0], 0.0);
        assert!((g[1] + (-0.5f64).exp()).abs() < 1e-12, "r < 1 − ε with A > 0 is not clipped from below: {g:?}");
    }
}
