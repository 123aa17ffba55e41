//! Per-row KL divergence between the softmaxes of two logit rows, forward and backward in z.
//!
//! p = softmax(z), q = softmax(r):  kl = Σᵢ pᵢ (log pᵢ − log qᵢ)
//! dz_j = g · p_j (log p_j − log q_j − kl)   (r is a constant: the frozen reference)

use super::float::Float;
use rayon::prelude::*;

fn log_softmax<T: Float>(z: &[T], out: &mut [T]) {
    let max = z.iter().fold(T::neg_infinity(), |m, &v| if v > m { v } else { m });
    let lse = max + z.iter().map(|&v| (v - max).exp()).sum::<T>().ln();
    out.iter_mut().zip(z).for_each(|(o, &v)| *o = v - lse);
}

/// Row log-probs of both, and kl per row.
fn row<T: Float>(z: &[T], r: &[T], lp: &mut [T], lq: &mut [T]) -> T {
    log_softmax(z, lp);
    log_softmax(r, lq);
    lp.iter().zip(lq.iter()).map(|(&a, &b)| a.exp() * (a - b)).sum()
}

/// `kl[row]` for [rows, vocab] logits `z` and reference logits `r`.
pub fn forward<T: Float>(z: &[T], r: &[T], vocab: usize, kl: &mut [T]) {
    kl.par_iter_mut().zip(z.par_chunks(vocab).zip(r.par_chunks(vocab))).for_each_init(
        || (vec![T::zero(); vocab], vec![T::zero(); vocab]),
        |(lp, lq), (k, (z, r))| *k = row(z, r, lp, lq),
    );
}

/// dz for upstream gradients `g` per row.
pub fn backward<T: Float>(z: &[T], r: &[T], g: &[T], vocab: usize, dz: &mut [T]) {
    dz.par_chunks_mut(vocab).zip(z.par_chunks(vocab).zip(r.par_chunks(vocab))).zip(g.par_iter()).for_each_init(
        || (vec![T::zero(); vocab], vec![T::zero(); vocab]),
        |(lp, lq), ((dz, (z, r)), &g)| {
            let kl = row(z, r, lp, lq);
            for ((d, &a), &b) in dz.iter_mut().zip(lp.iter()).zip(lq.iter()) {
                *d = g * a.exp() * (a - b - kl);
            }
        },
    );
}
