//! The linear layer over a frozen 4-bit weight (QLoRA's base): `y = x·Ŵᵀ + b` with
//! `Ŵ = code[q]·absmax[block]` dequantised a tile of output rows at a time, so the whole f32
//! weight never exists; backward gives the input gradient `dx = dy·Ŵ` the same way (the base is
//! frozen: no weight gradient).

use super::output;
use crate::autograd::GradFn;
use crate::backend::BackendStorage;
use crate::error::{ensure_shape, Error, Result};
use crate::tensor::{DType, Tensor};
use crate::Device;
use rayon::prelude::*;
use std::sync::Arc;

/// Output rows dequantised per tile (a `TILE × in_features` f32 buffer).
const TILE: usize = 256;

/// A 4-bit weight `[out, in]` in bitsandbytes' layout: row-major flat blocks of `blocksize`
/// values, two codes per byte (element 2j in the high nibble), one f32 absmax per block.
#[derive(Clone, Debug, PartialEq)]
pub struct Packed4 {
    pub packed: Arc<Vec<u8>>,
    pub absmax: Arc<Vec<f32>>,
    /// The 16 code values (NF4 or FP4).
    pub code: [f32; 16],
    pub blocksize: usize,
    /// `[out_features, in_features]`.
    pub shape: [usize; 2],
}

impl Packed4 {
    /// Checks that the buffers fit the shape and block size.
    pub fn new(packed: Vec<u8>, absmax: Vec<f32>, code: [f32; 16], blocksize: usize, shape: [usize; 2]) -> Result<Packed4> {
        let n = shape[0] * shape[1];
        if blocksize == 0 {
            return Err(Error::Input("4-bit weight: blocksize 0".into()));
        }
        ensure_shape!(packed.len() == n.div_ceil(2), "linear_4bit", "{} packed bytes for a {:?} weight (expected {})", packed.len(), shape, n.div_ceil(2));
        ensure_shape!(absmax.len() == n.div_ceil(blocksize), "linear_4bit", "{} absmax values for {n} elements in blocks of {blocksize}", absmax.len());
        Ok(Packed4 { packed: Arc::new(packed), absmax: Arc::new(absmax), code, blocksize, shape })
    }

    /// Rows `r0..r1` of the dequantised weight, row-major.
    pub fn dequantize_rows(&self, r0: usize, r1: usize) -> Vec<f32> {
        let cols = self.shape[1];
        (r0 * cols..r1 * cols)
            .into_par_iter()
            .map(|i| {
                let byte = self.packed[i / 2];
                let q = if i % 2 == 0 { byte >> 4 } else { byte & 0x0F };
                self.code[q as usize] * self.absmax[i / self.blocksize]
            })
            .collect()
    }

    /// The whole dequantised weight (merging, tests).
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_rows(0, self.shape[0])
    }

    /// Bytes this weight occupies (packed codes + absmax).
    pub fn bytes(&self) -> usize {
        self.packed.len() + 4 * self.absmax.len()
    }
}

/// Output-row tiles `(r0, r1)`.
fn tiles(out: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..out.div_ceil(TILE)).map(move |t| (t * TILE, ((t + 1) * TILE).min(out)))
}

/// `x` `[rows, in]` times the tile's rows transposed, as `[rows, r1 − r0]` in x's dtype.
fn tile_tensor(w: &Packed4, r0: usize, r1: usize, dtype: DType) -> Result<Tensor> {
    Tensor::from_vec(w.dequantize_rows(r0, r1), &[r1 - r0, w.shape[1]], Device::Cpu)?.to_dtype(dtype)
}

struct Linear4Backward {
    x: Tensor,
    w: Arc<Packed4>,
    b: Option<Tensor>,
}

impl GradFn for Linear4Backward {
    fn name(&self) -> &'static str {
        "linear_4bit"
    }
    fn inputs(&self) -> Vec<Tensor> {
        let mut v = vec![self.x.clone()];
        v.extend(self.b.clone());
        v
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let [out_f, in_f] = self.w.shape;
        let rows = self.x.elem_count() / in_f;
        let g2 = super::reshape(&g.contiguous()?, &[rows, out_f])?;
        let dx = if self.x.requires_grad_flag() {
            // dx = Σ_tiles dy[:, tile] · Ŵ[tile, :]
            let mut acc: Option<Tensor> = None;
            for (r0, r1) in tiles(out_f) {
                let gt = super::narrow(&g2, 1, r0, r1 - r0)?.contiguous()?;
                let wt = tile_tensor(&self.w, r0, r1, g.dtype())?;
                let part = super::matmul(&gt, &wt, false, false)?;
                acc = Some(match acc {
                    None => part,
                    Some(a) => super::add(&a, &part)?,
                });
            }
            let dx = acc.ok_or_else(|| Error::Input("linear_4bit: a weight with no output rows".into()))?;
            Some(super::reshape(&dx, self.x.shape())?)
        } else {
            None
        };
        let mut v = vec![dx];
        if let Some(b) = &self.b {
            let db = if b.requires_grad_flag() {
                let ones = Tensor::from_vec(vec![1.0f64; rows], &[1, rows], Device::Cpu)?.to_dtype(g.dtype())?;
                Some(super::reshape(&super::matmul(&ones, &g2, false, false)?, b.shape())?)
            } else {
                None
            };
            v.push(db);
        }
        Ok(v)
    }
}

/// `x · Ŵᵀ (+ b)` with a frozen 4-bit `w` (`[out, in]`), over the last dimension of `x`.
pub fn linear_4bit(x: &Tensor, w: &Arc<Packed4>, bias: Option<&Tensor>) -> Result<Tensor> {
    let [out_f, in_f] = w.shape;
    ensure_shape!(x.shape().last() == Some(&in_f), "linear_4bit", "input {:?} does not end in in_features {in_f} of the 4-bit weight {:?}", x.shape(), w.shape);
    let rows = x.elem_count() / in_f.max(1);
    let x2 = super::reshape(&x.contiguous()?.detach(), &[rows, in_f])?;
    // y[:, tile] = x · Ŵ[tile]ᵀ, gathered into [rows, out] on the host.
    let mut y = vec![0f64; rows * out_f];
    crate::autograd::no_grad(|| -> Result<()> {
        for (r0, r1) in tiles(out_f) {
            let wt = tile_tensor(w, r0, r1, x.dtype())?;
            let part = super::linear(&x2, &wt, None)?.to_f64_vec()?;
            let n = r1 - r0;
            for r in 0..rows {
                y[r * out_f + r0..r * out_f + r1].copy_from_slice(&part[r * n..(r + 1) * n]);
            }
        }
        Ok(())
    })?;
    let yt = Tensor::from_vec(y, &[rows, out_f], Device::Cpu)?.to_dtype(x.dtype())?;
    let mut storage = yt.contiguous_storage()?.clone();
    if let Some(b) = bias {
        ensure_shape!(b.shape() == [out_f], "linear_4bit", "bias {:?} for a 4-bit weight {:?}", b.shape(), w.shape);
        storage = storage.add_row(&*b.contiguous_storage()?, out_f)?;
    }
    let mut shape = x.shape().to_vec();
    if let Some(l) = shape.last_mut() {
        *l = out_f;
    }
    let mut ins = vec![x];
    ins.extend(bias);
    Ok(output(storage, &shape, &ins, || Arc::new(Linear4Backward { x: x.clone(), w: w.clone(), b: bias.cloned() })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::gradcheck::{max_gradient_error, test_values};

    const NF4: [f32; 16] = [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ];

    /// A [out, in] weight of random codes and absmax, with an odd element count and a partial block.
    fn weight(out: usize, inp: usize, seed: u64) -> Arc<Packed4> {
        let n = out * inp;
        let mut r = crate::rng::Rng::new(seed);
        let packed = (0..n.div_ceil(2)).map(|_| r.below(256) as u8).collect();
        let absmax = (0..n.div_ceil(64)).map(|_| 0.5 + r.uniform() as f32).collect();
        Arc::new(Packed4::new(packed, absmax, NF4, 64, [out, inp]).unwrap())
    }

    #[test]
    fn forward_and_input_gradient_equal_the_dense_layer_on_the_dequantised_weight() {
        let w = weight(300, 7, 1); // 2 tiles (256 + 44 rows), 2100 elements, 33 blocks (last partial)
        let dense = Tensor::from_vec(w.dequantize(), &[300, 7], Device::Cpu).unwrap();
        let b = Tensor::from_vec(test_values(300, 3).iter().map(|v| *v as f32).collect(), &[300], Device::Cpu).unwrap();
        let x = Tensor::from_vec(test_values(2 * 3 * 7, 2).iter().map(|v| *v as f32).collect(), &[2, 3, 7], Device::Cpu).unwrap().requires_grad();
        let y4 = linear_4bit(&x, &w, Some(&b)).unwrap();
        let yd = super::super::linear(&x, &dense, Some(&b)).unwrap();
        let (a, d) = (y4.to_vec::<f32>().unwrap(), yd.to_vec::<f32>().unwrap());
        assert!(a.iter().zip(&d).all(|(p, q)| (p - q).abs() < 1e-5), "forward");
        let g4 = super::super::sum(&super::super::mul(&y4, &y4).unwrap()).unwrap().backward().unwrap();
        let gd = super::super::sum(&super::super::mul(&yd, &yd).unwrap()).unwrap().backward().unwrap();
        let (a, d) = (g4.get(&x).unwrap().to_vec::<f32>().unwrap(), gd.get(&x).unwrap().to_vec::<f32>().unwrap());
        let scale = d.iter().map(|v| v.abs()).fold(0.0, f32::max);
        assert!(a.iter().zip(&d).all(|(p, q)| (p - q).abs() < 1e-5 * scale), "input gradient");
    }

    #[test]
    fn linear_4bit_gradient_matches_finite_differences() {
        let w = weight(5, 6, 4);
        let err = max_gradient_error(|t| super::super::sum(&super::super::mul(&linear_4bit(&t[0], &w, Some(&t[1]))?, &linear_4bit(&t[0], &w, Some(&t[1]))?)?), &[(test_values(12, 5), vec![2, 6]), (test_values(5, 6), vec![5])], 1e-6).unwrap();
        assert!(err < 1e-8, "max error {err}");
    }

    #[test]
    fn buffers_that_do_not_fit_the_shape_are_refused() {
        assert!(Packed4::new(vec![0; 10], vec![1.0; 1], NF4, 64, [4, 6]).unwrap_err().to_string().contains("12"));
        assert!(Packed4::new(vec![0; 12], vec![1.0; 2], NF4, 64, [4, 6]).is_err());
    }
}
