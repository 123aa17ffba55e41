//! Matrix products: the linear layer (x·Wᵀ + b, HF's `nn.Linear` layout) and a general batched
//! matmul with transposes.
//!
//! linear: y = x Wᵀ + b;  dx = dy W;  dW = dyᵀ x;  db = Σ_rows dy
//! matmul: C = op(A) op(B); dA and dB follow from C's gradient with the transposes swapped.

use super::output;
use crate::autograd::GradFn;
use crate::backend::{BackendStorage, MatmulParams};
use crate::error::{ensure_shape, Result};
use crate::tensor::Tensor;
use std::sync::Arc;

struct LinearBackward {
    x: Tensor,
    w: Tensor,
    b: Option<Tensor>,
}

impl GradFn for LinearBackward {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn inputs(&self) -> Vec<Tensor> {
        let mut v = vec![self.x.clone(), self.w.clone()];
        v.extend(self.b.clone());
        v
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (out_f, in_f) = (self.w.shape()[0], self.w.shape()[1]);
        let rows = self.x.elem_count() / in_f;
        let gs = g.contiguous_storage()?;
        let dx = if self.x.requires_grad_flag() {
            let ws = self.w.contiguous_storage()?;
            let p = MatmulParams { batch: 1, m: rows, n: in_f, k: out_f, trans_a: false, trans_b: false, b_batched: false };
            Some(Tensor::from_storage(gs.matmul(&ws, &p)?, self.x.shape())?)
        } else {
            None
        };
        let dw = if self.w.requires_grad_flag() {
            let xs = self.x.contiguous_storage()?;
            let p = MatmulParams { batch: 1, m: out_f, n: in_f, k: rows, trans_a: true, trans_b: false, b_batched: false };
            Some(Tensor::from_storage(gs.matmul(&xs, &p)?, self.w.shape())?)
        } else {
            None
        };
        let mut out = vec![dx, dw];
        if let Some(b) = &self.b {
            out.push(if b.requires_grad_flag() { Some(Tensor::from_storage(gs.sum_rows(rows, out_f)?, b.shape())?) } else { None });
        }
        Ok(out)
    }
}

/// `x · Wᵀ (+ b)` over the last dimension of `x`; `w` is `[out_features, in_features]` as HF stores it.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    super::expect_rank("linear", "weight", w, 2)?;
    let (out_f, in_f) = (w.shape()[0], w.shape()[1]);
    let last = x.shape().last().copied().unwrap_or(0);
    ensure_shape!(last == in_f, "linear", "input {:?} does not end in in_features {in_f} of weight {:?}", x.shape(), w.shape());
    if let Some(b) = b {
        ensure_shape!(b.shape() == [out_f], "linear", "bias {:?} for weight {:?}", b.shape(), w.shape());
    }
    let rows = x.elem_count() / in_f.max(1);
    let p = MatmulParams { batch: 1, m: rows, n: out_f, k: in_f, trans_a: false, trans_b: true, b_batched: false };
    let mut y = x.contiguous_storage()?.matmul(&*w.contiguous_storage()?, &p)?;
    if let Some(b) = b {
        y = y.add_row(&*b.contiguous_storage()?, out_f)?;
    }
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap_or(&mut 0) = out_f;
    let mut ins = vec![x, w];
    ins.extend(b);
    Ok(output(y, &shape, &ins, || Arc::new(LinearBackward { x: x.clone(), w: w.clone(), b: b.cloned() })))
}

struct MatmulBackward {
    a: Tensor,
    b: Tensor,
    p: MatmulParams,
}

impl GradFn for MatmulBackward {
    fn name(&self) -> &'static str {
        "matmul"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.a.clone(), self.b.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let p = self.p;
        let gs = g.contiguous_storage()?;
        // C = op(A)·op(B). With G = dC: d op(A) = G·op(B)ᵀ, d op(B) = op(A)ᵀ·G; undo the op by transposing.
        let da = if self.a.requires_grad_flag() {
            // T = G·op(B)ᵀ is d op(A) ([batch, m, k]); A itself is T, or Tᵀ when A was transposed.
            let bs = self.b.contiguous_storage()?;
            let q = MatmulParams { batch: p.batch, m: p.m, n: p.k, k: p.n, trans_a: false, trans_b: !p.trans_b, b_batched: p.b_batched };
            let t = Tensor::from_storage(gs.matmul(&bs, &q)?, &[p.batch, p.m, p.k])?;
            let t = if p.trans_a { crate::ops::transpose(&t, 1, 2)?.contiguous()? } else { t };
            Some(crate::ops::reshape(&t, self.a.shape())?)
        } else {
            None
        };
        let db = if self.b.requires_grad_flag() {
            let a_s = self.a.contiguous_storage()?;
            let s = if p.b_batched {
                let q = if !p.trans_b {
                    MatmulParams { batch: p.batch, m: p.k, n: p.n, k: p.m, trans_a: !p.trans_a, trans_b: false, b_batched: true }
                } else {
                    MatmulParams { batch: p.batch, m: p.n, n: p.k, k: p.m, trans_a: true, trans_b: p.trans_a, b_batched: true }
                };
                if !p.trans_b { a_s.matmul(&gs, &q)? } else { gs.matmul(&a_s, &q)? }
            } else {
                // B is shared across the batch: stack op(A)'s batches into rows of one [batch·m, k] matrix.
                let a_eff = if p.trans_a {
                    let a3 = crate::ops::reshape(&self.a.detach(), &[p.batch, p.k, p.m])?;
                    crate::ops::transpose(&a3, 1, 2)?.contiguous()?
                } else {
                    self.a.detach()
                };
                let a_s = a_eff.contiguous_storage()?;
                let rows = p.batch * p.m;
                if !p.trans_b {
                    let q = MatmulParams { batch: 1, m: p.k, n: p.n, k: rows, trans_a: true, trans_b: false, b_batched: false };
                    a_s.matmul(&gs, &q)?
                } else {
                    let q = MatmulParams { batch: 1, m: p.n, n: p.k, k: rows, trans_a: true, trans_b: false, b_batched: false };
                    gs.matmul(&a_s, &q)?
                }
            };
            Some(Tensor::from_storage(s, self.b.shape())?)
        } else {
            None
        };
        Ok(vec![da, db])
    }
}

/// Batched `op(a) · op(b)`: `a` is `[..., m, k]` (`[..., k, m]` when `trans_a`), `b` is `[..., k, n]`
/// with the same leading dims, or a plain matrix shared by the whole batch.
pub fn matmul(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
    ensure_shape!(a.rank() >= 2 && b.rank() >= 2, "matmul", "operands need rank ≥ 2, got {:?} and {:?}", a.shape(), b.shape());
    let (ra, rb) = (a.rank(), b.rank());
    let (m, ka) = if trans_a { (a.shape()[ra - 1], a.shape()[ra - 2]) } else { (a.shape()[ra - 2], a.shape()[ra - 1]) };
    let (kb, n) = if trans_b { (b.shape()[rb - 1], b.shape()[rb - 2]) } else { (b.shape()[rb - 2], b.shape()[rb - 1]) };
    ensure_shape!(ka == kb, "matmul", "inner dimensions differ: {:?} × {:?} (trans_a={trans_a}, trans_b={trans_b})", a.shape(), b.shape());
    let batch: usize = a.shape()[..ra - 2].iter().product();
    let b_batched = rb > 2;
    if b_batched {
        ensure_shape!(a.shape()[..ra - 2] == b.shape()[..rb - 2], "matmul", "batch dims differ: {:?} vs {:?}", a.shape(), b.shape());
    }
    let p = MatmulParams { batch, m, n, k: ka, trans_a, trans_b, b_batched };
    let c = a.contiguous_storage()?.matmul(&*b.contiguous_storage()?, &p)?;
    let mut shape = a.shape()[..ra - 2].to_vec();
    shape.extend([m, n]);
    Ok(output(c, &shape, &[a, b], || Arc::new(MatmulBackward { a: a.clone(), b: b.clone(), p })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::gradcheck::{max_gradient_error, test_values};
    use crate::ops::{mul, sum};

    #[test]
    fn linear_gradients_match_finite_differences() {
        let err = max_gradient_error(
            |t| {
                let y = linear(&t[0], &t[1], Some(&t[2]))?;
                sum(&mul(&y, &y)?)
            },
            &[(test_values(2 * 3 * 4, 1), vec![2, 3, 4]), (test_values(5 * 4, 2), vec![5, 4]), (test_values(5, 3), vec![5])],
            1e-6,
        )
        .unwrap();
        assert!(err < 1e-8, "max error {err}");
    }

    #[test]
    fn matmul_gradients_match_finite_differences_for_all_transposes() {
        for ta in [false, true] {
            for tb in [false, true] {
                for b_batched in [true, false] {
                    let a_shape = if ta { vec![2, 4, 3] } else { vec![2, 3, 4] };
                    let b_shape = match (tb, b_batched) {
                        (false, true) => vec![2, 4, 5],
                        (true, true) => vec![2, 5, 4],
                        (false, false) => vec![4, 5],
                        (true, false) => vec![5, 4],
                    };
                    let na: usize = a_shape.iter().product();
                    let nb: usize = b_shape.iter().product();
                    let err = max_gradient_error(
                        |t| {
                            let y = matmul(&t[0], &t[1], ta, tb)?;
                            assert_eq!(y.shape(), &[2, 3, 5]);
                            sum(&mul(&y, &y)?)
                        },
                        &[(test_values(na, 5), a_shape.clone()), (test_values(nb, 6), b_shape.clone())],
                        1e-6,
                    )
                    .unwrap();
                    assert!(err < 1e-8, "ta={ta} tb={tb} batched={b_batched}: max error {err}");
                }
            }
        }
    }
}
