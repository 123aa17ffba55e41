//! Gradient checkpointing: run a block without keeping its activations, and recompute them in the
//! backward pass. Trades one extra forward of the block for its activation memory.
//!
//! forward: y = f(x) with recording off;  backward: y' = f(x') recorded, then backprop g through y'
//! to x' and to the block's parameters.

use crate::autograd::{self, GradFn};
use crate::error::{ensure_shape, Result};
use crate::tensor::Tensor;
use std::sync::Arc;

/// The function a checkpoint recomputes.
pub type BlockFn = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

struct CheckpointBackward {
    x: Tensor,
    params: Vec<Tensor>,
    f: BlockFn,
}

impl GradFn for CheckpointBackward {
    fn name(&self) -> &'static str {
        "checkpoint"
    }
    fn inputs(&self) -> Vec<Tensor> {
        let mut v = vec![self.x.clone()];
        v.extend(self.params.iter().cloned());
        v
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let x = self.x.detach().requires_grad();
        let grads = autograd::with_grad_enabled(true, || -> Result<_> {
            let y = (self.f)(&x)?;
            ensure_shape!(y.shape() == g.shape(), "checkpoint", "recomputed output {:?} vs gradient {:?}", y.shape(), g.shape());
            // Backprop g through y: the scalar Σ y∘g has gradient g with respect to y.
            let s = crate::ops::sum(&crate::ops::mul(&y, &g.detach())?)?;
            s.backward()
        })?;
        let mut out = vec![grads.get(&x).cloned()];
        out.extend(self.params.iter().map(|p| grads.get(p).cloned()));
        Ok(out)
    }
}

/// Runs `f(x)` and recomputes it during backward instead of storing its activations. `params` are the
/// trainable tensors `f` uses (their gradients are returned through the checkpoint).
pub fn checkpoint(x: &Tensor, params: &[Tensor], f: BlockFn) -> Result<Tensor> {
    let needs = autograd::is_grad_enabled() && (x.requires_grad_flag() || params.iter().any(|p| p.requires_grad_flag()));
    if !needs {
        return f(x);
    }
    let y = autograd::no_grad(|| f(x))?;
    let params = params.iter().filter(|p| p.requires_grad_flag()).cloned().collect();
    Ok(y.with_grad_fn(Arc::new(CheckpointBackward { x: x.clone(), params, f })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::gradcheck::test_values;
    use crate::ops::{linear, mul, rms_norm, sum};
    use crate::Device;

    #[test]
    fn checkpointed_block_gives_the_same_gradients() {
        let x = Tensor::from_vec(test_values(12, 1), &[3, 4], Device::Cpu).unwrap().requires_grad();
        let w = Tensor::from_vec(test_values(20, 2), &[5, 4], Device::Cpu).unwrap().requires_grad();
        let n = Tensor::from_vec(test_values(4, 3), &[4], Device::Cpu).unwrap().requires_grad();
        let (w2, n2) = (w.clone(), n.clone());
        let f: BlockFn = Arc::new(move |h: &Tensor| linear(&rms_norm(h, &n2, 1e-6)?, &w2, None));
        let plain = f(&x).unwrap();
        let plain = sum(&mul(&plain, &plain).unwrap()).unwrap().backward().unwrap();
        let ck = checkpoint(&x, &[w.clone(), n.clone()], f).unwrap();
        let ck = sum(&mul(&ck, &ck).unwrap()).unwrap().backward().unwrap();
        for t in [&x, &w, &n] {
            let a = plain.get(t).unwrap().to_f64_vec().unwrap();
            let b = ck.get(t).unwrap().to_f64_vec().unwrap();
            assert_eq!(a.len(), b.len());
            for (u, v) in a.iter().zip(&b) {
                assert!((u - v).abs() < 1e-12, "{u} vs {v}");
            }
        }
    }
}
