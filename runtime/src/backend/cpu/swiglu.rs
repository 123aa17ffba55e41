//! SwiGLU gate of the Llama MLP, forward and backward.
//!
//! y = silu(g) ∘ u,   silu(g) = g·σ(g)
//! dg = dy ∘ u ∘ σ(g)·(1 + g·(1−σ(g))),   du = dy ∘ silu(g)

use super::float::Float;
use rayon::prelude::*;

const CHUNK: usize = 8192;

#[inline(always)]
fn sigmoid<T: Float>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

/// y = silu(gate) ∘ up.
pub fn forward<T: Float>(gate: &[T], up: &[T], y: &mut [T]) {
    y.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK)).zip(up.par_chunks(CHUNK)).for_each(|((y, g), u)| {
        for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
            *y = g * sigmoid(g) * u;
        }
    });
}

/// Gradients with respect to gate and up.
pub fn backward<T: Float>(gate: &[T], up: &[T], dy: &[T], dgate: &mut [T], dup: &mut [T]) {
    dgate
        .par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(((dg, du), g), (u, dy))| {
            for i in 0..g.len() {
                let s = sigmoid(g[i]);
                du[i] = dy[i] * g[i] * s;
                dg[i] = dy[i] * u[i] * s * (T::one() + g[i] * (T::one() - s));
            }
        });
}
