//! Per-token negative log-likelihood from logits, fused with log-softmax, forward and backward.
//! The base of cross-entropy (mean of nll over counted tokens) and of per-token log-probs (−nll).
//!
//! nll[t] = lse(z[t]) − z[t, y[t]]   (0 where y[t] is ignored)
//! dz[t]  = g[t] · (softmax(z[t]) − onehot(y[t]))

use super::float::Float;
use rayon::prelude::*;

/// Target value meaning "no loss at this token" (Hugging Face's -100).
pub const IGNORE_INDEX: i64 = -100;

/// Writes nll and lse per row of `logits` ([rows, vocab]). Targets were checked to be < vocab or ignored.
pub fn forward<T: Float>(logits: &[T], targets: &[i64], vocab: usize, nll: &mut [T], lse: &mut [T]) {
    nll.par_iter_mut()
        .zip(lse.par_iter_mut())
        .zip(logits.par_chunks(vocab))
        .zip(targets.par_iter())
        .for_each(|(((nll, lse), z), &y)| {
            let max = z.iter().fold(T::neg_infinity(), |m, &v| if v > m { v } else { m });
            let sum: T = z.iter().map(|&v| (v - max).exp()).sum();
            let l = max + sum.ln();
            *lse = l;
            *nll = if y == IGNORE_INDEX { T::zero() } else { l - z[y as usize] };
        });
}

/// dlogits for upstream gradients `g` per row (ignored rows get zero).
pub fn backward<T: Float>(logits: &[T], targets: &[i64], lse: &[T], g: &[T], vocab: usize, dz: &mut [T]) {
    dz.par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .zip(targets.par_iter().zip(lse.par_iter().zip(g.par_iter())))
        .for_each(|((dz, z), (&y, (&l, &g)))| {
            if y == IGNORE_INDEX {
                dz.iter_mut().for_each(|v| *v = T::zero());
                return;
            }
            for (d, &v) in dz.iter_mut().zip(z) {
                *d = g * (v - l).exp();
            }
            dz[y as usize] -= g;
        });
}
