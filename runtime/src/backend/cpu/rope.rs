//! Rotary position embedding in Hugging Face's rotate-half layout, forward and backward.
//!
//! For a head vector x of size D and pair i < D/2 at angle θ = pos · inv_freq[i]:
//!   y[i]       = x[i]·cos θ − x[i+D/2]·sin θ
//!   y[i+D/2]   = x[i+D/2]·cos θ + x[i]·sin θ
//! The map is a rotation, so the backward is the same map with −θ (sin negated).

use super::float::Float;
use rayon::prelude::*;

/// Applies the rotation to `x` laid out [tokens, heads, head_dim]; `cos`/`sin` are [tokens, head_dim/2].
/// `inverse` rotates by −θ (the backward pass).
pub fn apply<T: Float>(x: &[T], cos: &[T], sin: &[T], heads: usize, head_dim: usize, inverse: bool, y: &mut [T]) {
    let half = head_dim / 2;
    let tok = heads * head_dim;
    y.par_chunks_mut(tok).zip(x.par_chunks(tok)).enumerate().for_each(|(t, (y, x))| {
        let c = &cos[t * half..(t + 1) * half];
        let s = &sin[t * half..(t + 1) * half];
        for (y, x) in y.chunks_mut(head_dim).zip(x.chunks(head_dim)) {
            for i in 0..half {
                let (a, b) = (x[i], x[i + half]);
                let sn = if inverse { -s[i] } else { s[i] };
                y[i] = a * c[i] - b * sn;
                y[i + half] = b * c[i] + a * sn;
            }
        }
    });
}
