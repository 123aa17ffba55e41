//! `y = x·Ŵᵀ` and `dx = dy·Ŵ` over a frozen quantised weight, dequantising `TILE` output rows at a
//! time into one reused buffer and multiplying straight into the output, so the whole f32 weight
//! never exists (a tile is `TILE × in_features` floats).

use super::float::Float;
use super::gemm::{matmul, Mat};
use crate::quant::weight::DequantOut;
use crate::quant::QuantizedWeight;

/// Output rows dequantised per tile.
pub const TILE: usize = 128;

/// Tiles `(r0, r1)` over `out` rows.
fn tiles(out: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..out.div_ceil(TILE)).map(move |t| (t * TILE, ((t + 1) * TILE).min(out)))
}

/// The tile's rows, dequantised into the reused buffer `buf`.
fn tile<T: Float + DequantOut>(w: &QuantizedWeight, r0: usize, r1: usize, buf: &mut Vec<T>) {
    buf.resize((r1 - r0) * w.shape()[1], T::zero());
    w.dequantize_rows_into(r0, r1, buf);
}

/// `x` `[rows, in]` → `[rows, out]`.
pub fn forward<T: Float + DequantOut>(x: &[T], rows: usize, w: &QuantizedWeight) -> Vec<T> {
    let [out_f, in_f] = w.shape();
    let mut y = vec![T::zero(); rows * out_f];
    let mut b = Vec::new();
    for (r0, r1) in tiles(out_f) {
        tile(w, r0, r1, &mut b);
        // y[:, r0..r1] = x · tileᵀ
        matmul(rows, r1 - r0, in_f, Mat { data: x, ld: in_f, trans: false }, Mat { data: &b, ld: in_f, trans: true }, &mut y[r0..], out_f, false);
    }
    y
}

/// `dy` `[rows, out]` → `dx` `[rows, in]` = `Σ_tiles dy[:, tile] · Ŵ[tile, :]`.
pub fn input_grad<T: Float + DequantOut>(dy: &[T], rows: usize, w: &QuantizedWeight) -> Vec<T> {
    let [out_f, in_f] = w.shape();
    let mut dx = vec![T::zero(); rows * in_f];
    let mut b = Vec::new();
    for (i, (r0, r1)) in tiles(out_f).enumerate() {
        tile(w, r0, r1, &mut b);
        matmul(rows, in_f, r1 - r0, Mat { data: &dy[r0..], ld: out_f, trans: false }, Mat { data: &b, ld: in_f, trans: false }, &mut dx, in_f, i > 0);
    }
    dx
}
