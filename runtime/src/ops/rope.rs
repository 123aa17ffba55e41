//! Rotary position embedding (RoPE), rotate-half layout as Hugging Face applies it to q and k.
//!
//! inv_freq[i] = θ^(−2i/D), adjusted by the scaling type (linear: ÷factor; llama3: per band);
//! for a token at position p, pair (i, i+D/2) is rotated by angle p·inv_freq[i].
//! Backward: the rotation by −angle (the map is orthogonal).

use super::output;
use crate::autograd::GradFn;
use crate::backend::BackendStorage;
use crate::error::{ensure_shape, Error, Result};
use crate::tensor::{DType, Tensor};
use crate::Device;
use std::sync::Arc;

/// How rotary frequencies are scaled for longer contexts (the `rope_scaling` / `rope_parameters` entry).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor` (position interpolation).
    Linear { factor: f64 },
    /// Llama 3.1's frequency-band scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

/// Inverse frequencies for a head of size `head_dim` with base `theta`.
pub fn rope_inv_freq(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f64> {
    let base: Vec<f64> = (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64)).collect();
    match *scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// Cosines and sines for a batch of token positions, shared by every layer of one forward pass.
#[derive(Clone, Debug)]
pub struct RopeTable {
    /// `[tokens, head_dim/2]`
    pub cos: Tensor,
    /// `[tokens, head_dim/2]`
    pub sin: Tensor,
    pub head_dim: usize,
}

impl RopeTable {
    /// Tables for `positions` (one per token, row-major over the batch).
    pub fn new(inv_freq: &[f64], positions: &[i64], dtype: DType, device: Device) -> Result<RopeTable> {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            if p < 0 {
                return Err(Error::Input(format!("negative position id {p}")));
            }
            for &f in inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let n = positions.len();
        Ok(RopeTable {
            cos: Tensor::from_vec(cos, &[n, half], device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, &[n, half], device)?.to_dtype(dtype)?,
            head_dim: 2 * half,
        })
    }
}

struct RopeBackward {
    x: Tensor,
    table: RopeTable,
}

impl GradFn for RopeBackward {
    fn name(&self) -> &'static str {
        "rope"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.x.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let s = self.x.shape();
        let d = g.contiguous_storage()?.rope(&*self.table.cos.contiguous_storage()?, &*self.table.sin.contiguous_storage()?, s[2], s[3], true)?;
        Ok(vec![Some(Tensor::from_storage(d, s)?)])
    }
}

/// Rotates `x` (`[batch, seq, heads, head_dim]`) by the angles of `table` (one row per batch·seq token).
pub fn rope(x: &Tensor, table: &RopeTable) -> Result<Tensor> {
    super::expect_rank("rope", "input", x, 4)?;
    let s = x.shape();
    ensure_shape!(s[3] == table.head_dim, "rope", "head_dim {} but the table was built for {}", s[3], table.head_dim);
    ensure_shape!(table.cos.shape()[0] == s[0] * s[1], "rope", "{} table rows for {} tokens", table.cos.shape()[0], s[0] * s[1]);
    let y = x.contiguous_storage()?.rope(&*table.cos.contiguous_storage()?, &*table.sin.contiguous_storage()?, s[2], s[3], false)?;
    Ok(output(y, s, &[x], || Arc::new(RopeBackward { x: x.edge(), table: table.clone() })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::gradcheck::{max_gradient_error, test_values};
    use crate::ops::{mul, sum};

    #[test]
    fn rope_gradients_match_finite_differences() {
        let inv = rope_inv_freq(4, 10000.0, &RopeScaling::Default);
        let table = RopeTable::new(&inv, &[0, 1, 5, 2, 3, 4], DType::F64, Device::Cpu).unwrap();
        let r = Tensor::from_vec(test_values(48, 3), &[2, 3, 2, 4], Device::Cpu).unwrap();
        let err = max_gradient_error(|t| sum(&mul(&rope(&t[0], &table)?, &r)?), &[(test_values(48, 1), vec![2, 3, 2, 4])], 1e-6).unwrap();
        assert!(err < 1e-9, "max error {err}");
    }

    #[test]
    fn position_zero_is_identity_and_rotation_keeps_norm() {
        let inv = rope_inv_freq(4, 10000.0, &RopeScaling::Default);
        let table = RopeTable::new(&inv, &[0, 7], DType::F64, Device::Cpu).unwrap();
        let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0], &[1, 2, 1, 4], Device::Cpu).unwrap();
        let y = rope(&x, &table).unwrap().to_vec::<f64>().unwrap();
        assert_eq!(&y[..4], &[1.0, 2.0, 3.0, 4.0]);
        let n: f64 = y[4..].iter().map(|v| v * v).sum();
        assert!((n - 30.0).abs() < 1e-12);
        // pair (0, 2) at angle 7·1: y0 = x0 cos − x2 sin
        assert!((y[4] - (7f64.cos() - 3.0 * 7f64.sin())).abs() < 1e-12);
    }

    #[test]
    fn llama3_scaling_keeps_high_divides_low_and_smooths_middle() {
        let s = RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 64.0 };
        let base = rope_inv_freq(8, 10000.0, &RopeScaling::Default);
        let scaled = rope_inv_freq(8, 10000.0, &s);
        assert_eq!(scaled[0], base[0]); // wavelength 6.3 < 16: kept
        assert!((scaled[2] - base[2] / 8.0).abs() < 1e-15); // wavelength 628 > 64: divided
        assert!(scaled[1] < base[1] && scaled[1] > base[1] / 8.0); // wavelength 63: in between
    }
}
