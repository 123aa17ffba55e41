//! The linear layer over a frozen quantised weight (QLoRA's base): `y = x·Ŵᵀ + b`, where `Ŵ` is
//! the dequantised weight (`code[q]·absmax[block]` for bitsandbytes NF4/FP4, GGUF Q4_0/Q4_1/Q8_0
//! blocks). `Ŵ` is produced a tile of output rows at a time inside the matmul, so the whole f32
//! weight never exists. Backward: `dx = dy·Ŵ` (tiled the same way) and `db = Σ_rows dy`; the base is
//! frozen, so there is no weight gradient.
//!
//! On CUDA (`x` on a device) the product runs in `kernels/cuda/nf4.cu` (fused dequant-GEMM for small
//! row counts, dequantise-then-cuBLASLt for large ones; see `backend::cuda::nf4`) in `x`'s dtype
//! (F32, BF16, F16), bitsandbytes NF4/FP4 only (GGUF blocks are refused there with an Unsupported
//! error). The bias add and its gradient go through device-agnostic storage ops.

use super::output;
use crate::autograd::GradFn;
use crate::backend::cpu::quant_linear;
use crate::backend::cuda::nf4 as cuda_nf4;
use crate::backend::{BackendStorage, CpuStorage, Storage};
use crate::error::{ensure_shape, Error, Result};
use crate::quant::QuantizedWeight;
use crate::tensor::Tensor;
use std::sync::Arc;

/// Runs the tiled kernel on `x`'s storage (F32 or F64 on the CPU; the CUDA kernel `cudak` on a device).
fn run(
    op: &'static str,
    x: &Tensor,
    f32k: impl Fn(&[f32]) -> Vec<f32>,
    f64k: impl Fn(&[f64]) -> Vec<f64>,
    cudak: impl Fn(&crate::backend::cuda::CudaStorage) -> Result<crate::backend::cuda::CudaStorage>,
) -> Result<Storage> {
    let s = x.contiguous_storage()?;
    Ok(match &*s {
        Storage::Cpu(CpuStorage::F32(v)) => Storage::Cpu(CpuStorage::F32(f32k(v))),
        Storage::Cpu(CpuStorage::F64(v)) => Storage::Cpu(CpuStorage::F64(f64k(v))),
        Storage::Cuda(c) => Storage::Cuda(cudak(c)?),
        other => return Err(Error::dtype(op, format!("input of dtype {} (the quantised linear computes in F32 or F64)", other.dtype()))),
    })
}

struct LinearQuantizedBackward {
    x: Tensor,
    w: Arc<QuantizedWeight>,
    b: Option<Tensor>,
}

impl GradFn for LinearQuantizedBackward {
    fn name(&self) -> &'static str {
        "linear_quantized"
    }
    fn inputs(&self) -> Vec<Tensor> {
        let mut v = vec![self.x.clone()];
        v.extend(self.b.clone());
        v
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let [out_f, in_f] = self.w.shape();
        let rows = self.x.elem_count() / in_f.max(1);
        let dx = if self.x.requires_grad_flag() {
            let w = &self.w;
            let s = run(
                "linear_quantized backward",
                g,
                |dy| quant_linear::input_grad(dy, rows, w),
                |dy| quant_linear::input_grad(dy, rows, w),
                |dy| cuda_nf4::input_grad(dy, w, rows, cuda_nf4::Path::Auto),
            )?;
            Some(Tensor::from_storage(s, self.x.shape())?)
        } else {
            None
        };
        let mut v = vec![dx];
        if let Some(b) = &self.b {
            let db = if b.requires_grad_flag() {
                let g2 = super::reshape(&g.contiguous()?, &[rows, out_f])?;
                // A row of ones on g's device in g's dtype (0·0 + 1 = 1 exactly).
                let ones = Tensor::from_storage(Storage::zeros(g.device(), g.dtype(), rows)?.affine(0.0, 1.0)?, &[1, rows])?;
                Some(super::reshape(&super::matmul(&ones, &g2, false, false)?, b.shape())?)
            } else {
                None
            };
            v.push(db);
        }
        Ok(v)
    }
}

/// `x · Ŵᵀ (+ b)` with a frozen quantised `w` (`[out, in]`), over the last dimension of `x`.
pub fn linear_quantized(x: &Tensor, w: &Arc<QuantizedWeight>, bias: Option<&Tensor>) -> Result<Tensor> {
    let [out_f, in_f] = w.shape();
    ensure_shape!(x.shape().last() == Some(&in_f), "linear_quantized", "input {:?} does not end in in_features {in_f} of the quantised weight {:?}", x.shape(), w.shape());
    let rows = x.elem_count() / in_f.max(1);
    let mut storage =
        run("linear_quantized", x, |v| quant_linear::forward(v, rows, w), |v| quant_linear::forward(v, rows, w), |v| cuda_nf4::forward(v, w, rows, cuda_nf4::Path::Auto))?;
    if let Some(b) = bias {
        ensure_shape!(b.shape() == [out_f], "linear_quantized", "bias {:?} for a quantised weight {:?}", b.shape(), w.shape());
        storage = storage.add_row(&*b.to_dtype(x.dtype())?.contiguous_storage()?, out_f)?;
    }
    let mut shape = x.shape().to_vec();
    if let Some(l) = shape.last_mut() {
        *l = out_f;
    }
    let mut ins = vec![x];
    ins.extend(bias);
    Ok(output(storage, &shape, &ins, || Arc::new(LinearQuantizedBackward { x: x.clone(), w: w.clone(), b: bias.cloned() })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::gradcheck::{max_gradient_error, test_values};
    use crate::quant::{Bnb4bitConfig, QuantType};
    use crate::Device;

    /// A `[out, in]` NF4 weight (odd element count, blocks crossing rows, a partial last block).
    fn weight(out: usize, inp: usize, seed: u64) -> Arc<QuantizedWeight> {
        let w = Tensor::from_vec(test_values(out * inp, seed).iter().map(|v| *v as f32).collect(), &[out, inp], Device::default()).unwrap();
        Arc::new(QuantizedWeight::quantize_bnb(&w, Bnb4bitConfig { quant_type: QuantType::Nf4, blocksize: 64, double_quant: true }).unwrap())
    }

    #[test]
    fn forward_and_input_gradient_equal_the_dense_layer_on_the_dequantised_weight() {
        let w = weight(300, 7, 1); // 3 tiles (128 + 128 + 44 rows), 2100 elements, 33 blocks (last partial)
        let dense = w.dequantize().unwrap();
        let b = Tensor::from_vec(test_values(300, 3).iter().map(|v| *v as f32).collect(), &[300], Device::default()).unwrap();
        let x = Tensor::from_vec(test_values(2 * 3 * 7, 2).iter().map(|v| *v as f32).collect(), &[2, 3, 7], Device::default()).unwrap().requires_grad();
        let y4 = linear_quantized(&x, &w, Some(&b)).unwrap();
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
    fn linear_quantized_gradient_matches_finite_differences() {
        let w = weight(5, 6, 4);
        let f = |t: &[Tensor]| {
            let y = linear_quantized(&t[0], &w, Some(&t[1]))?;
            super::super::sum(&super::super::mul(&y, &y)?)
        };
        let err = max_gradient_error(f, &[(test_values(12, 5), vec![2, 6]), (test_values(5, 6), vec![5])], 1e-6).unwrap();
        assert!(err < 1e-8, "max error {err}");
    }

    #[test]
    fn an_integer_input_is_refused_with_the_op_name() {
        let w = weight(4, 6, 1);
        let x = Tensor::from_vec(vec![1i64; 6], &[1, 6], Device::default()).unwrap();
        let e = linear_quantized(&x, &w, None).unwrap_err().to_string();
        assert!(e.contains("linear_quantized"), "{e}");
    }
}
