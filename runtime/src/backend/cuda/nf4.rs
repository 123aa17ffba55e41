//! The quantised linear layer on the GPU (`kernels/cuda/nf4.cu`): bitsandbytes NF4/FP4 weights,
//! with plain or double-quantised scales. `y = x·Ŵᵀ` and `dx = dy·Ŵ`, no weight gradient.
//!
//! The packed codes, the 16-entry table and the f32 scales are uploaded once per device and kept in
//! the weight's device cache ([`QuantizedWeight::device_cached`]); double-quantised scales are
//! decoded on the device by `nf4_absmax_decode` at that upload.
//!
//! GGUF blocks (Q4_0/Q4_1/Q8_0) are not implemented on the GPU: asking for one is an
//! [`Error::Unsupported`] naming the format.
//!
//! Paths ([`Path`]):
//! - `Fused`: tiles of Ŵ dequantised into shared memory inside the GEMM (f32: SIMT FMA tiles;
//!   bf16: mma.sync m16n8k16 tensor cores); F16 has no fused kernel and takes `Scratch`.
//! - `Scratch`: the whole Ŵ dequantised into a dense `[out, in]` scratch buffer of the compute
//!   dtype, then one cuBLASLt GEMM.
//! - `Reference`: one thread per output, dequantising on the fly (parity only).
//!
//! `Auto` picks by shape: every fused block of 64 rows dequantises its whole column strip of Ŵ again,
//! so the dequantisation work grows with `rows / 64`, while the scratch path dequantises once (2–4
//! bytes per weight of extra traffic) and then runs cuBLASLt at full speed. Small row counts
//! (decode steps, small batches: rows ≤ [`SCRATCH_MIN_ROWS`]) are bandwidth-bound on the 4-bit
//! weight and the fused kernel reads only that; above it the scratch path wins.

use super::device::grid_1d;
use super::gemm::{gemm_raw, Gemm};
use super::{launch, Arg, CudaDevice, CudaStorage};
use crate::backend::{BackendStorage, CpuStorage, Storage};
use crate::error::{Error, Result};
use crate::quant::{Absmax, QuantizedWeight};
use crate::tensor::{DType, Tensor};
use cudarc::driver::LaunchConfig;
use std::sync::Arc;

/// Rows above which `Auto` dequantises into a scratch buffer and calls cuBLASLt.
pub const SCRATCH_MIN_ROWS: usize = 512;

/// Which kernel computes the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Auto,
    Fused,
    Scratch,
    Reference,
}

/// A bitsandbytes weight on one device.
pub struct GpuNf4 {
    pub out_features: usize,
    pub in_features: usize,
    pub blocksize: usize,
    /// U8, `ceil(out·in / 2)` bytes.
    pub packed: CudaStorage,
    /// F32, one scale per block (decoded on the device when double-quantised).
    pub absmax: CudaStorage,
    /// F32 `[16]`.
    pub code: CudaStorage,
}

fn up_f32(v: Vec<f32>, dev: &Arc<CudaDevice>) -> Result<CudaStorage> {
    CudaStorage::from_cpu(&CpuStorage::F32(v), dev)
}

/// `absmax[b] = map[codes[b]] · nested_absmax[b / nested_bs] + offset` (f32, as the CPU decodes).
pub fn decode_absmax(
    codes: &CudaStorage,
    nested_absmax: &CudaStorage,
    map: &CudaStorage,
    offset: f32,
    nested_bs: usize,
) -> Result<CudaStorage> {
    let n = codes.len();
    if codes.dtype() != DType::U8 || nested_absmax.dtype() != DType::F32 || map.dtype() != DType::F32 || map.len() != 256 {
        return Err(Error::dtype("nf4 absmax decode", "expected U8 codes, F32 nested absmax and a 256-entry F32 map".to_string()));
    }
    if nested_bs == 0 || nested_absmax.len() < n.div_ceil(nested_bs) {
        return Err(Error::Input(format!(
            "nf4 absmax decode: {} nested scales for {n} codes in blocks of {nested_bs}",
            nested_absmax.len()
        )));
    }
    let out = CudaStorage::alloc_out(&codes.dev, DType::F32, n)?;
    // nf4_absmax_decode(const u8* codes, const float* nested, const float* map, float offset, int nested_bs, long long n, float* out)
    launch(
        &codes.dev,
        "nf4",
        "nf4_absmax_decode",
        grid_1d(n, 256),
        &[codes.arg(), nested_absmax.arg(), map.arg(), Arg::F32(offset), Arg::I32(nested_bs as i32), Arg::I64(n as i64), out.arg()],
    )?;
    Ok(out)
}

fn build(w: &QuantizedWeight, dev: &Arc<CudaDevice>) -> Result<GpuNf4> {
    let parts = w.bnb_parts()?.ok_or_else(|| {
        Error::Unsupported(format!(
            "CUDA: the quantised linear runs bitsandbytes NF4/FP4 weights on the GPU; GGUF {} blocks are not implemented there (run on the CPU or dequantise the weight)",
            w.describe()
        ))
    })?;
    let [out_f, in_f] = w.shape();
    let n = out_f * in_f;
    if parts.packed.len() != n.div_ceil(2) || parts.absmax.len() != n.div_ceil(parts.blocksize) || parts.blocksize % 2 != 0 {
        return Err(Error::Input(format!(
            "nf4: {} packed bytes / {} scales do not fit a {out_f}x{in_f} weight in blocks of {}",
            parts.packed.len(),
            parts.absmax.len(),
            parts.blocksize
        )));
    }
    let packed = CudaStorage::from_cpu(&CpuStorage::U8(parts.packed), dev)?;
    let code = up_f32(parts.code.to_vec(), dev)?;
    let absmax = match parts.absmax {
        Absmax::Plain(v) => up_f32(v, dev)?,
        Absmax::Nested { codes, nested_absmax, nested_map, offset, nested_blocksize } => {
            let codes = CudaStorage::from_cpu(&CpuStorage::U8(codes), dev)?;
            decode_absmax(&codes, &up_f32(nested_absmax, dev)?, &up_f32(nested_map, dev)?, offset, nested_blocksize)?
        }
    };
    Ok(GpuNf4 { out_features: out_f, in_features: in_f, blocksize: parts.blocksize, packed, absmax, code })
}

/// The weight's copy on `dev` (uploaded, and its scales decoded, on first use).
pub fn upload(w: &QuantizedWeight, dev: &Arc<CudaDevice>) -> Result<Arc<GpuNf4>> {
    w.device_cached(dev.ordinal, || build(w, dev))
}

/// The dense `[out, in]` Ŵ in `dtype` (F32, BF16 or F16).
pub fn dequantize(g: &GpuNf4, dtype: DType) -> Result<CudaStorage> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(Error::dtype("nf4 dequantize", format!("the CUDA kernels write F32, BF16 or F16, not {dtype}")));
    }
    let n = g.out_features * g.in_features;
    let out = CudaStorage::alloc_out(&g.packed.dev, dtype, n)?;
    // nf4_dequant_<T>(const u8* packed, const float* absmax, const float* code, long long n, int bs, T* out)
    launch(
        &g.packed.dev,
        "nf4",
        &format!("nf4_dequant_{}", super::sfx(dtype)),
        grid_1d(n.div_ceil(2), 256),
        &[g.packed.arg(), g.absmax.arg(), g.code.arg(), Arg::I64(n as i64), Arg::I32(g.blocksize as i32), out.arg()],
    )?;
    Ok(out)
}

/// The dense dequantised weight as a device tensor of `dtype` (compared with the CPU's
/// [`QuantizedWeight::dequantize`] in parity).
pub fn dequantize_tensor(w: &QuantizedWeight, dev: &Arc<CudaDevice>, dtype: DType) -> Result<Tensor> {
    let g = upload(w, dev)?;
    Tensor::from_storage(Storage::Cuda(dequantize(&g, dtype)?), &w.shape())
}

/// `trans = false`: `y = a·Ŵᵀ` (`a` = x `[rows, in]`); `trans = true`: `dx = a·Ŵ` (`a` = dy `[rows, out]`).
fn product(a: &CudaStorage, w: &QuantizedWeight, rows: usize, trans: bool, path: Path) -> Result<CudaStorage> {
    let op = if trans { "linear_quantized backward" } else { "linear_quantized" };
    a.float_op(op, &[])?;
    let dtype = a.dtype();
    let [out_f, in_f] = w.shape();
    let (n, k) = if trans { (in_f, out_f) } else { (out_f, in_f) };
    if a.len() != rows * k {
        return Err(Error::Input(format!("{op}: {} input elements for {rows} rows of {k}", a.len())));
    }
    let g = upload(w, &a.dev)?;
    let path = match path {
        Path::Auto if dtype == DType::F16 || rows > SCRATCH_MIN_ROWS => Path::Scratch,
        Path::Auto => Path::Fused,
        Path::Fused if dtype == DType::F16 => Path::Scratch,
        p => p,
    };
    let args = |c: &CudaStorage| {
        [
            a.arg(),
            g.packed.arg(),
            g.absmax.arg(),
            g.code.arg(),
            c.arg(),
            Arg::I64(rows as i64),
            Arg::I64(n as i64),
            Arg::I64(k as i64),
            Arg::I64(in_f as i64),
            Arg::I32(g.blocksize as i32),
        ]
    };
    let dir = if trans { "dx" } else { "fwd" };
    match path {
        Path::Scratch => {
            let dense = dequantize(&g, dtype)?;
            let c = CudaStorage::alloc_out(&a.dev, dtype, rows * n)?;
            // Forward: [rows, in]·[out, in]ᵀ; dx: [rows, out]·[out, in].
            let gm = if trans { Gemm::new(rows, in_f, out_f, false, false) } else { Gemm::new(rows, out_f, in_f, false, true) };
            gemm_raw(&a.dev, dtype, a.ptr(), dense.ptr(), c.ptr(), &gm)?;
            Ok(c)
        }
        Path::Fused => {
            let c = CudaStorage::alloc_out(&a.dev, dtype, rows * n)?;
            // Both kernels tile 64 (rows) x 64 (n).
            let grid = (n.div_ceil(64).max(1) as u32, rows.div_ceil(64).max(1) as u32, 1);
            let (name, threads) = match dtype {
                DType::F32 => (format!("nf4_gemm_simt_{dir}_f32"), 256),
                _ => (format!("nf4_gemm_mma_{dir}_bf16"), 128),
            };
            // nf4_gemm_*(const T* a, const u8* packed, const float* absmax, const float* code, T* c,
            //            long long M, long long N, long long K, long long ldw, int bs)
            launch(&a.dev, "nf4", &name, LaunchConfig { grid_dim: grid, block_dim: (threads, 1, 1), shared_mem_bytes: 0 }, &args(&c))?;
            Ok(c)
        }
        _ => {
            let c = CudaStorage::alloc_out(&a.dev, dtype, rows * n)?;
            // nf4_ref_{fwd,dx}_<T>: same signature as the fused kernels.
            launch(&a.dev, "nf4", &format!("nf4_ref_{dir}_{}", a.sfx()), grid_1d(rows * n, 256), &args(&c))?;
            Ok(c)
        }
    }
}

/// `y = x·Ŵᵀ`: `x` `[rows, in]` → `[rows, out]` in `x`'s dtype.
pub fn forward(x: &CudaStorage, w: &QuantizedWeight, rows: usize, path: Path) -> Result<CudaStorage> {
    product(x, w, rows, false, path)
}

/// `dx = dy·Ŵ`: `dy` `[rows, out]` → `[rows, in]`.
pub fn input_grad(dy: &CudaStorage, w: &QuantizedWeight, rows: usize, path: Path) -> Result<CudaStorage> {
    product(dy, w, rows, true, path)
}

use super::parity::cuda_of as cuda;

/// Parity: NF4 and FP4, blocksize 64 and 128, plain and double-quantised scales, odd shapes, rows
/// 1/7/300, f32 and bf16: the standalone dequantisation against the CPU's, the op (forward with a
/// bias, dx through its backward) and every path (fused, scratch, reference) for forward and dx.
pub fn parity(p: &mut super::parity::Parity) -> Result<()> {
    use crate::quant::{Bnb4bitConfig, QuantType};
    let ordinal = match p.dev {
        crate::Device::Cuda(i) => i,
        crate::Device::Cpu => return Err(Error::Input("nf4 parity needs a CUDA device".into())),
    };
    let dev = CudaDevice::get(ordinal)?;
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        for bs in [64usize, 128] {
            for dq in [false, true] {
                for (out_f, in_f) in [(576usize, 1536usize), (100, 72), (1, 64), (33, 7)] {
                    let cfg = Bnb4bitConfig { quant_type: qt, blocksize: bs, double_quant: dq };
                    let tag = format!("{}/bs{bs}{} {out_f}x{in_f}", qt.as_str(), if dq { "/dq" } else { "" });
                    let wd = p.randn(&[out_f, in_f], DType::F32, 0.5)?;
                    let w = Arc::new(QuantizedWeight::quantize_bnb(&wd, cfg)?);
                    let dense = w.dequantize()?.to_dtype(DType::F32)?;
                    for dtype in [DType::F32, DType::BF16] {
                        let ref_dense =
                            if dtype == DType::F32 { dense.clone() } else { dense.to_dtype(DType::BF16)?.to_dtype(DType::F32)? };
                        match dequantize_tensor(&w, &dev, dtype) {
                            Ok(g) => p.check_tol("nf4/dequant", &tag, &ref_dense, &g, if dtype == DType::F32 { 0.0 } else { 1e-2 }),
                            Err(e) => p.fail("nf4/dequant", &tag, dtype, &e),
                        }
                        for rows in [1usize, 7, 300] {
                            let case = format!("{tag} rows={rows}");
                            let x = p.randn(&[rows, in_f], dtype, 1.0)?;
                            let dy = p.randn(&[rows, out_f], dtype, 1.0)?;
                            let bias = p.randn(&[out_f], dtype, 1.0)?;
                            let (x32, dy32, b32) = (x.to_dtype(DType::F32)?, dy.to_dtype(DType::F32)?, bias.to_dtype(DType::F32)?);
                            // The kernels compute with Ŵ in the compute dtype (as bitsandbytes does), so the
                            // bf16 reference uses Ŵ rounded to bf16, and the bias is added to the bf16 product.
                            let y_nob = crate::ops::linear(&x32, &ref_dense, None)?;
                            let y_ref = if dtype == DType::F32 {
                                crate::ops::linear(&x32, &dense, Some(&b32))?
                            } else {
                                let (yv, bv) = (y_nob.to_dtype(dtype)?.to_dtype(DType::F32)?.to_vec::<f32>()?, b32.to_vec::<f32>()?);
                                let yb: Vec<f32> = yv.iter().enumerate().map(|(i, y)| y + bv[i % out_f]).collect();
                                Tensor::from_vec(yb, &[rows, out_f], crate::Device::Cpu)?
                            };
                            let dx_ref = crate::ops::matmul(&dy32, &ref_dense, false, false)?;
                            // The op: forward with bias, dx through its recorded backward.
                            let run_op = |p: &mut super::parity::Parity| -> Result<(Tensor, Tensor)> {
                                let xg = p.gpu(&x)?.requires_grad();
                                let y = crate::ops::linear_quantized(&xg, &w, Some(&p.gpu(&bias)?))?;
                                let gf =
                                    y.grad_fn().cloned().ok_or_else(|| Error::Input("linear_quantized recorded no backward".into()))?;
                                let dx =
                                    gf.backward(&p.gpu(&dy)?)?.into_iter().next().flatten().ok_or_else(|| Error::Input("no dx".into()))?;
                                Ok((y, dx))
                            };
                            match run_op(p) {
                                Ok((y, dx)) => {
                                    p.check("nf4/op forward+bias", &case, &y_ref, &y);
                                    p.check("nf4/op dx (backward)", &case, &dx_ref, &dx);
                                }
                                Err(e) => p.fail("nf4/op", &case, dtype, &e),
                            }
                            let (xs, dys) = (cuda(&p.gpu(&x)?)?, cuda(&p.gpu(&dy)?)?);
                            for (path, name) in [(Path::Fused, "fused"), (Path::Scratch, "scratch"), (Path::Reference, "ref")] {
                                let r = forward(&xs, &w, rows, path).and_then(|s| Tensor::from_storage(Storage::Cuda(s), &[rows, out_f]));
                                match r {
                                    Ok(y) => p.check(&format!("nf4/{name} forward"), &case, &y_nob, &y),
                                    Err(e) => p.fail(&format!("nf4/{name} forward"), &case, dtype, &e),
                                }
                                let r =
                                    input_grad(&dys, &w, rows, path).and_then(|s| Tensor::from_storage(Storage::Cuda(s), &[rows, in_f]));
                                match r {
                                    Ok(dx) => p.check(&format!("nf4/{name} dx"), &case, &dx_ref, &dx),
                                    Err(e) => p.fail(&format!("nf4/{name} dx"), &case, dtype, &e),
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    // A GGUF weight is refused with a clear error (not a wrong answer).
    let q8 = QuantizedWeight::from_ggml(crate::formats::gguf::GgmlType::Q8_0, vec![0u8; 34], [1, 32], None, "q8")?;
    let x = p.randn(&[1, 32], DType::F32, 1.0)?;
    let x = p.gpu(&x)?;
    let refused = matches!(forward(&cuda(&x)?, &q8, 1, Path::Auto), Err(Error::Unsupported(m)) if m.contains("GGUF"));
    let zero = Tensor::from_vec(vec![0f32], &[1], crate::Device::Cpu)?;
    let flag = Tensor::from_vec(vec![if refused { 0f32 } else { 1.0 }], &[1], crate::Device::Cpu)?;
    p.check_tol("nf4/GGUF refused on CUDA", "Q8_0 1x32 (0 = refused)", &zero, &flag, 0.0);
    Ok(())
}
