//! Embedding gather and its backward (scatter-add).
//!
//! y[t] = W[id[t]],   dW[v] = Σ_{t: id[t]=v} dy[t]

use super::float::Float;
use rayon::prelude::*;

/// Gathers rows of `table` ([vocab, dim]); ids were checked to be < vocab by the caller.
pub fn forward<T: Float>(table: &[T], ids: &[u32], dim: usize, y: &mut [T]) {
    y.par_chunks_mut(dim).zip(ids.par_iter()).for_each(|(y, &id)| {
        let id = id as usize;
        y.copy_from_slice(&table[id * dim..(id + 1) * dim]);
    });
}

/// Scatter-adds `dy` rows into `dtable` (zeroed by the caller).
pub fn backward<T: Float>(dy: &[T], ids: &[u32], dim: usize, dtable: &mut [T]) {
    for (g, &id) in dy.chunks(dim).zip(ids) {
        let id = id as usize;
        for (a, &b) in dtable[id * dim..(id + 1) * dim].iter_mut().zip(g) {
            *a += b;
        }
    }
}
