//! RMSNorm over the last dimension, forward and backward.
//!
//! y = x · r · w with r = 1/sqrt(mean(x²) + eps)            (per row of `dim` elements)
//! dx = r · (dy∘w) − x · r³/dim · Σ(dy∘w∘x),   dw = Σ_rows dy ∘ x · r

use super::float::Float;
use rayon::prelude::*;

/// Rows per rayon task: big enough to amortise scheduling.
fn chunk_rows(dim: usize) -> usize {
    (16384 / dim.max(1)).max(1)
}

/// Writes y and the per-row reciprocal RMS `rstd` (saved for backward).
pub fn forward<T: Float>(x: &[T], w: &[T], dim: usize, eps: f64, y: &mut [T], rstd: &mut [T]) {
    let cr = chunk_rows(dim);
    y.par_chunks_mut(cr * dim)
        .zip(rstd.par_chunks_mut(cr))
        .zip(x.par_chunks(cr * dim))
        .for_each(|((y, r), x)| {
            for ((y, r), x) in y.chunks_mut(dim).zip(r.iter_mut()).zip(x.chunks(dim)) {
                let ms: T = x.iter().map(|&v| v * v).sum::<T>() / T::of(dim as f64);
                let rs = T::one() / (ms + T::of(eps)).sqrt();
                *r = rs;
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * rs * w;
                }
            }
        });
}

/// Returns dx (written into `dx`) and accumulates dw over all rows.
pub fn backward<T: Float>(x: &[T], w: &[T], rstd: &[T], dy: &[T], dim: usize, dx: &mut [T], dw: &mut [T]) {
    let cr = chunk_rows(dim);
    let partial: Vec<Vec<T>> = dx
        .par_chunks_mut(cr * dim)
        .zip(x.par_chunks(cr * dim))
        .zip(dy.par_chunks(cr * dim))
        .zip(rstd.par_chunks(cr))
        .map(|(((dx, x), dy), r)| {
            let mut dw = vec![T::zero(); dim];
            for (((dx, x), dy), &r) in dx.chunks_mut(dim).zip(x.chunks(dim)).zip(dy.chunks(dim)).zip(r) {
                let mut dot = T::zero();
                for i in 0..dim {
                    dot += dy[i] * w[i] * x[i];
                    dw[i] += dy[i] * x[i] * r;
                }
                let c = dot * r * r * r / T::of(dim as f64);
                for i in 0..dim {
                    dx[i] = r * dy[i] * w[i] - x[i] * c;
                }
            }
            dw
        })
        .collect();
    dw.iter_mut().for_each(|v| *v = T::zero());
    for p in partial {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
}
