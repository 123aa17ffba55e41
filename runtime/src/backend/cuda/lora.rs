//! The fused LoRA linear on the GPU (`kernels/cuda/lora.cu` + cuBLASLt + `nf4.cu`):
//! `y = x·Wᵀ (+ b) + s·(x·Aᵀ)·Bᵀ` with the base `W` dense, bitsandbytes-quantised or absent, and its
//! backward (`dxa = s·dy·B`, `dB = s·dyᵀ·xa`, `dA = dxaᵀ·x`, `dx = dy·W + dxa·A`, `dW = dyᵀ·x`).
//!
//! Forward: the base GEMM writes `y`, the bias is added in place, `xa = x·Aᵀ` (`[rows, r]`, kept for
//! the backward), then `y += s·xa·Bᵀ` is one GEMM with β = 1 into the same output. Backward: the
//! LoRA term of `dx` is accumulated onto the base term by one GEMM with β = 1.
//! With `reference = true` every GEMM is `lora_ref_gemm` (one thread per output) and a quantised
//! base takes nf4's reference kernels: the simple path parity checks the fast one against.

use super::device::grid_1d;
use super::gemm::{gemm_raw, Gemm};
use super::nf4::{self, Path};
use super::{launch, Arg, CudaStorage};
use crate::backend::BackendStorage;
use crate::error::{Error, Result};
use crate::quant::QuantizedWeight;
use crate::tensor::{DType, Tensor};
use std::sync::Arc;

/// The base layer of a LoRA linear on the device.
#[derive(Clone, Copy)]
pub enum GpuBase<'a> {
    None,
    Dense(&'a CudaStorage),
    Quantized(&'a QuantizedWeight),
}

/// Sizes of one LoRA linear.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub rows: usize,
    pub in_f: usize,
    pub out_f: usize,
    pub r: usize,
}

/// `y[m, n] += b[n]` in place.
pub fn bias_add(y: &CudaStorage, b: &CudaStorage, rows: usize, cols: usize) -> Result<()> {
    y.float_op("lora_linear bias", &[b])?;
    if b.len() != cols || y.len() != rows * cols {
        return Err(Error::Input(format!(
            "lora_linear bias: {} values for {cols} columns / {} outputs for {rows}x{cols}",
            b.len(),
            y.len()
        )));
    }
    // lora_bias_add_<T>(T* y, const T* b, long long rows, long long cols)
    launch(
        &y.dev,
        "lora",
        &format!("lora_bias_add_{}", y.sfx()),
        grid_1d(rows * cols, 256),
        &[y.arg(), b.arg(), Arg::I64(rows as i64), Arg::I64(cols as i64)],
    )
}

/// The reference GEMM: `g` on contiguous row-major operands (`lda`/`ldb` as in [`Gemm`], `ldc = n`,
/// one batch), one thread per output. β = 0 never reads C.
pub fn ref_gemm(c_store: &CudaStorage, dtype: DType, a: u64, b: u64, c: u64, g: &Gemm) -> Result<()> {
    let (sam, sak) = if g.trans_a { (1, g.lda) } else { (g.lda, 1) };
    let (sbk, sbn) = if g.trans_b { (1, g.ldb) } else { (g.ldb, 1) };
    // lora_ref_gemm_<T>(const T* a, long long sam, long long sak, const T* b, long long sbk, long long sbn, T* c,
    //                   long long M, long long N, long long K, float alpha, float beta)
    launch(
        &c_store.dev,
        "lora",
        &format!("lora_ref_gemm_{}", super::sfx(dtype)),
        grid_1d(g.m * g.n, 256),
        &[
            Arg::P(a),
            Arg::I64(sam as i64),
            Arg::I64(sak as i64),
            Arg::P(b),
            Arg::I64(sbk as i64),
            Arg::I64(sbn as i64),
            Arg::P(c),
            Arg::I64(g.m as i64),
            Arg::I64(g.n as i64),
            Arg::I64(g.k as i64),
            Arg::F32(g.alpha),
            Arg::F32(g.beta),
        ],
    )
}

/// `c = α·op(a)·op(b) + β·c` through cuBLASLt, or the reference kernel.
fn mm(reference: bool, a: &CudaStorage, b: &CudaStorage, c: &CudaStorage, g: Gemm) -> Result<()> {
    if reference {
        ref_gemm(c, c.dtype(), a.ptr(), b.ptr(), c.ptr(), &g)
    } else {
        gemm_raw(&c.dev, c.dtype(), a.ptr(), b.ptr(), c.ptr(), &g)
    }
}

fn with(mut g: Gemm, alpha: f32, beta: f32) -> Gemm {
    g.alpha = alpha;
    g.beta = beta;
    g
}

fn check(x: &CudaStorage, base: GpuBase<'_>, a: &CudaStorage, b: &CudaStorage, d: Dims) -> Result<()> {
    x.float_op("lora_linear", &[a, b])?;
    let bad =
        |what: &str, got: usize, want: usize| Error::Input(format!("lora_linear: {what} has {got} elements, expected {want} ({d:?})"));
    if x.len() != d.rows * d.in_f {
        return Err(bad("x", x.len(), d.rows * d.in_f));
    }
    if a.len() != d.r * d.in_f {
        return Err(bad("A", a.len(), d.r * d.in_f));
    }
    if b.len() != d.out_f * d.r {
        return Err(bad("B", b.len(), d.out_f * d.r));
    }
    match base {
        GpuBase::Dense(w) => {
            x.float_op("lora_linear", &[w])?;
            if w.len() != d.out_f * d.in_f {
                return Err(bad("W", w.len(), d.out_f * d.in_f));
            }
        }
        GpuBase::Quantized(q) if q.shape() != [d.out_f, d.in_f] => {
            return Err(Error::Input(format!("lora_linear: quantised base {:?} for {d:?}", q.shape())))
        }
        _ => {}
    }
    Ok(())
}

/// The forward: `(y, xa)`.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    x: &CudaStorage,
    base: GpuBase<'_>,
    bias: Option<&CudaStorage>,
    a: &CudaStorage,
    b: &CudaStorage,
    d: Dims,
    scale: f32,
    reference: bool,
) -> Result<(CudaStorage, CudaStorage)> {
    check(x, base, a, b, d)?;
    let (dev, dtype) = (&x.dev, x.dtype());
    let y = match base {
        GpuBase::None => CudaStorage::alloc_out(dev, dtype, d.rows * d.out_f)?,
        GpuBase::Dense(w) => {
            let y = CudaStorage::alloc_out(dev, dtype, d.rows * d.out_f)?;
            mm(reference, x, w, &y, Gemm::new(d.rows, d.out_f, d.in_f, false, true))?;
            y
        }
        GpuBase::Quantized(q) => nf4::forward(x, q, d.rows, if reference { Path::Reference } else { Path::Auto })?,
    };
    let has_base = !matches!(base, GpuBase::None);
    if let Some(bias) = bias {
        if !has_base {
            return Err(Error::Input("lora_linear: a bias needs a base weight".into()));
        }
        bias_add(&y, bias, d.rows, d.out_f)?;
    }
    let xa = CudaStorage::alloc_out(dev, dtype, d.rows * d.r)?;
    mm(reference, x, a, &xa, Gemm::new(d.rows, d.r, d.in_f, false, true))?;
    mm(reference, &xa, b, &y, with(Gemm::new(d.rows, d.out_f, d.r, false, true), scale, if has_base { 1.0 } else { 0.0 }))?;
    Ok((y, xa))
}

/// Which gradients to compute.
#[derive(Clone, Copy, Debug)]
pub struct Needs {
    pub x: bool,
    pub a: bool,
    pub b: bool,
    /// The dense base weight's gradient.
    pub w: bool,
}

/// Gradients (None where not asked for).
pub struct Grads {
    pub dx: Option<CudaStorage>,
    pub da: Option<CudaStorage>,
    pub db: Option<CudaStorage>,
    pub dw: Option<CudaStorage>,
}

/// The backward given `dy` `[rows, out]` and the forward's `xa`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dy: &CudaStorage,
    x: &CudaStorage,
    xa: &CudaStorage,
    base: GpuBase<'_>,
    a: &CudaStorage,
    b: &CudaStorage,
    d: Dims,
    scale: f32,
    need: Needs,
    reference: bool,
) -> Result<Grads> {
    check(x, base, a, b, d)?;
    dy.float_op("lora_linear backward", &[x, xa])?;
    if dy.len() != d.rows * d.out_f || xa.len() != d.rows * d.r {
        return Err(Error::Input(format!("lora_linear backward: dy {} / xa {} elements for {d:?}", dy.len(), xa.len())));
    }
    let (dev, dtype) = (&x.dev, x.dtype());
    let dxa = if need.a || need.x {
        let t = CudaStorage::alloc_out(dev, dtype, d.rows * d.r)?;
        mm(reference, dy, b, &t, with(Gemm::new(d.rows, d.r, d.out_f, false, false), scale, 0.0))?;
        Some(t)
    } else {
        None
    };
    let db = if need.b {
        let t = CudaStorage::alloc_out(dev, dtype, d.out_f * d.r)?;
        mm(reference, dy, xa, &t, with(Gemm::new(d.out_f, d.r, d.rows, true, false), scale, 0.0))?;
        Some(t)
    } else {
        None
    };
    let da = match (&dxa, need.a) {
        (Some(dxa), true) => {
            let t = CudaStorage::alloc_out(dev, dtype, d.r * d.in_f)?;
            mm(reference, dxa, x, &t, Gemm::new(d.r, d.in_f, d.rows, true, false))?;
            Some(t)
        }
        _ => None,
    };
    let dx = match (&dxa, need.x) {
        (Some(dxa), true) => {
            let (t, has_base) = match base {
                GpuBase::None => (CudaStorage::alloc_out(dev, dtype, d.rows * d.in_f)?, false),
                GpuBase::Dense(w) => {
                    let t = CudaStorage::alloc_out(dev, dtype, d.rows * d.in_f)?;
                    mm(reference, dy, w, &t, Gemm::new(d.rows, d.in_f, d.out_f, false, false))?;
                    (t, true)
                }
                GpuBase::Quantized(q) => (nf4::input_grad(dy, q, d.rows, if reference { Path::Reference } else { Path::Auto })?, true),
            };
            mm(reference, dxa, a, &t, with(Gemm::new(d.rows, d.in_f, d.r, false, false), 1.0, if has_base { 1.0 } else { 0.0 }))?;
            Some(t)
        }
        _ => None,
    };
    let dw = match base {
        GpuBase::Dense(_) if need.w => {
            let t = CudaStorage::alloc_out(dev, dtype, d.out_f * d.in_f)?;
            mm(reference, dy, x, &t, Gemm::new(d.out_f, d.in_f, d.rows, true, false))?;
            Some(t)
        }
        _ => None,
    };
    Ok(Grads { dx, da, db, dw })
}

use super::parity::{cuda_of as cuda, wrap as on};


/// Parity: base none / dense / NF4 (double quant) / FP4 (plain), with and without bias, odd shapes,
/// rows 1/7/300, f32 and bf16: the op (`ops::lora_linear`) forward and dx, dA, dB (and dW of a
/// trainable dense base) through its recorded backward against the CPU op's autograd, then the
/// reference kernels' forward and backward against the same CPU values.
pub fn parity(p: &mut super::parity::Parity) -> Result<()> {
    use crate::ops::{self, LoraBase};
    use crate::quant::{Bnb4bitConfig, QuantType};
    let f32_ = DType::F32;
    for dtype in [DType::F32, DType::BF16] {
        for (out_f, in_f, r) in [(576usize, 1536usize, 16usize), (100, 72, 8), (1, 64, 4), (33, 7, 3)] {
            let wd = p.randn(&[out_f, in_f], dtype, 0.5)?;
            let q_nf4 = Arc::new(QuantizedWeight::quantize_bnb(
                &wd.to_dtype(f32_)?,
                Bnb4bitConfig { quant_type: QuantType::Nf4, blocksize: 64, double_quant: true },
            )?);
            let q_fp4 = Arc::new(QuantizedWeight::quantize_bnb(
                &wd.to_dtype(f32_)?,
                Bnb4bitConfig { quant_type: QuantType::Fp4, blocksize: 128, double_quant: false },
            )?);
            let a = p.randn(&[r, in_f], dtype, 0.3)?;
            let b = p.randn(&[out_f, r], dtype, 0.3)?;
            let bias = p.randn(&[out_f], dtype, 1.0)?;
            let scale = 2.0;
            for rows in [1usize, 7, 300] {
                let x = p.randn(&[rows, in_f], dtype, 1.0)?;
                let dy = p.randn(&[rows, out_f], dtype, 1.0)?;
                for kind in ["none", "dense", "nf4/bs64/dq", "fp4/bs128"] {
                    for with_bias in [false, true] {
                        if kind == "none" && with_bias {
                            continue;
                        }
                        let case = format!("{kind}{} {out_f}x{in_f} r={r} rows={rows}", if with_bias { "+bias" } else { "" });
                        let dense_trains = kind == "dense";
                        // CPU reference on the (rounded) f32 values, gradients by autograd of Σ y∘dy.
                        let (x32, a32, b32, w32, bias32, dy32) = (
                            x.to_dtype(f32_)?.requires_grad(),
                            a.to_dtype(f32_)?.requires_grad(),
                            b.to_dtype(f32_)?.requires_grad(),
                            wd.to_dtype(f32_)?.requires_grad(),
                            bias.to_dtype(f32_)?,
                            dy.to_dtype(f32_)?,
                        );
                        // In bf16 the kernels compute with Ŵ rounded to bf16 (as bitsandbytes does), so the
                        // reference uses that dense Ŵ; in f32 it is the quantised op itself.
                        let round = |q: &QuantizedWeight| -> Result<Tensor> { q.dequantize()?.to_dtype(f32_)?.to_dtype(dtype)?.to_dtype(f32_) };
                        let (r_nf4, r_fp4) = (round(&q_nf4)?, round(&q_fp4)?);
                        let cpu_base = match kind {
                            "none" => LoraBase::None,
                            "dense" => LoraBase::Dense(&w32),
                            "nf4/bs64/dq" if dtype == f32_ => LoraBase::Quantized(&q_nf4),
                            "nf4/bs64/dq" => LoraBase::Dense(&r_nf4),
                            _ if dtype == f32_ => LoraBase::Quantized(&q_fp4),
                            _ => LoraBase::Dense(&r_fp4),
                        };
                        let y_ref = ops::lora_linear(&x32, cpu_base, with_bias.then_some(&bias32), &a32, &b32, scale)?;
                        let grads = ops::sum(&ops::mul(&y_ref, &dy32)?)?.backward()?;
                        // The forward in bf16 rounds where any bf16 LoRA does (PEFT included): the base
                        // product, the bias add, and x·Aᵀ are each stored in bf16 before the next step. With
                        // few outputs (1×64) cancellation makes those roundings visible, so the bf16 forward is
                        // compared with a reference that rounds at the same points.
                        // The fast path dequantises Ŵ to bf16 (as bitsandbytes does); the reference kernels
                        // dequantise in f32, so each is compared with the reference of its own Ŵ.
                        let (u_nf4, u_fp4) = (q_nf4.dequantize()?.to_dtype(f32_)?, q_fp4.dequantize()?.to_dtype(f32_)?);
                        let emulate = |round_w: bool| -> Result<Tensor> {
                            if dtype == f32_ {
                                return Ok(y_ref.clone());
                            }
                            crate::autograd::no_grad(|| -> Result<Tensor> {
                                let rb = |t: &Tensor| -> Result<Tensor> { t.to_dtype(dtype)?.to_dtype(f32_) };
                                let wref = match (kind, round_w) {
                                    ("none", _) => None,
                                    ("dense", _) => Some(&w32),
                                    ("nf4/bs64/dq", true) => Some(&r_nf4),
                                    ("nf4/bs64/dq", false) => Some(&u_nf4),
                                    (_, true) => Some(&r_fp4),
                                    (_, false) => Some(&u_fp4),
                                };
                                let mut base = match wref {
                                    Some(w) => rb(&ops::linear(&x32, w, None)?)?.to_vec::<f32>()?,
                                    None => vec![0f32; rows * out_f],
                                };
                                if with_bias {
                                    let bv = bias32.to_vec::<f32>()?;
                                    base = base.iter().enumerate().map(|(i, y)| y + bv[i % out_f]).collect();
                                }
                                let base = rb(&Tensor::from_vec(base, &[rows, out_f], crate::Device::Cpu)?)?;
                                let xa = rb(&ops::linear(&x32, &a32, None)?)?;
                                ops::add(&base, &ops::scale(&ops::linear(&xa, &b32, None)?, scale)?)
                            })
                        };
                        let (y_fwd_ref, y_fwd_ref_kernel) = (emulate(true)?, emulate(false)?);
                        let g = |t: &Tensor| grads.get(t).cloned().ok_or_else(|| Error::Input("CPU reference has no gradient".into()));
                        let (dx_ref, da_ref, db_ref) = (g(&x32)?, g(&a32)?, g(&b32)?);
                        let dw_ref = if dense_trains { Some(g(&w32)?) } else { None };

                        // The op on the device.
                        let (xg, ag, bg, wg, biasg, dyg) = (
                            p.gpu(&x)?.requires_grad(),
                            p.gpu(&a)?.requires_grad(),
                            p.gpu(&b)?.requires_grad(),
                            p.gpu(&wd)?.requires_grad(),
                            p.gpu(&bias)?,
                            p.gpu(&dy)?,
                        );
                        let gpu_base = match kind {
                            "none" => LoraBase::None,
                            "dense" => LoraBase::Dense(&wg),
                            "nf4/bs64/dq" => LoraBase::Quantized(&q_nf4),
                            _ => LoraBase::Quantized(&q_fp4),
                        };
                        let run = || -> Result<(Tensor, Vec<Option<Tensor>>)> {
                            let y = ops::lora_linear(&xg, gpu_base, with_bias.then_some(&biasg), &ag, &bg, scale)?;
                            let gf = y.grad_fn().cloned().ok_or_else(|| Error::Input("lora_linear recorded no backward".into()))?;
                            let gs = gf.backward(&dyg)?;
                            Ok((y, gs))
                        };
                        match run() {
                            Ok((y, gs)) => {
                                // Inputs: x, A, B, then W when dense (then the bias).
                                p.check("lora/op forward", &case, &y_fwd_ref, &y);
                                let names = ["lora/op dx", "lora/op dA", "lora/op dB"];
                                for ((name, refv), got) in names.iter().zip([&dx_ref, &da_ref, &db_ref]).zip(gs.iter()) {
                                    match got {
                                        Some(t) => p.check(name, &case, refv, t),
                                        None => p.fail(name, &case, dtype, &Error::Input("no gradient".into())),
                                    }
                                }
                                if let (Some(dw_ref), Some(Some(dw))) = (&dw_ref, gs.get(3)) {
                                    p.check("lora/op dW (dense base)", &case, dw_ref, dw);
                                }
                            }
                            Err(e) => p.fail("lora/op", &case, dtype, &e),
                        }

                        // The reference kernels.
                        let refk = || -> Result<Vec<Tensor>> {
                            let (xs, as_, bs_, ws, bis, dys) = (cuda(&xg)?, cuda(&ag)?, cuda(&bg)?, cuda(&wg)?, cuda(&biasg)?, cuda(&dyg)?);
                            let base = match kind {
                                "none" => GpuBase::None,
                                "dense" => GpuBase::Dense(&ws),
                                "nf4/bs64/dq" => GpuBase::Quantized(&q_nf4),
                                _ => GpuBase::Quantized(&q_fp4),
                            };
                            let d = Dims { rows, in_f, out_f, r };
                            let (y, xa) = forward(&xs, base, with_bias.then_some(&bis), &as_, &bs_, d, scale as f32, true)?;
                            let gr = backward(
                                &dys,
                                &xs,
                                &xa,
                                base,
                                &as_,
                                &bs_,
                                d,
                                scale as f32,
                                Needs { x: true, a: true, b: true, w: false },
                                true,
                            )?;
                            let miss = || Error::Input("reference backward returned no gradient".into());
                            Ok(vec![
                                on(y, &[rows, out_f])?,
                                on(gr.dx.ok_or_else(miss)?, &[rows, in_f])?,
                                on(gr.da.ok_or_else(miss)?, &[r, in_f])?,
                                on(gr.db.ok_or_else(miss)?, &[out_f, r])?,
                            ])
                        };
                        match refk() {
                            Ok(v) => {
                                for ((name, refv), got) in ["lora/ref forward", "lora/ref dx", "lora/ref dA", "lora/ref dB"]
                                    .iter()
                                    .zip([&y_fwd_ref_kernel, &dx_ref, &da_ref, &db_ref])
                                    .zip(&v)
                                {
                                    p.check(name, &case, refv, got);
                                }
                            }
                            Err(e) => p.fail("lora/ref", &case, dtype, &e),
                        }
                    }
                }
            }
        }
    }
    // The whole autograd path on the device once per dtype (needs the elementwise and reduce ops too).
    for dtype in [DType::F32, DType::BF16] {
        let (rows, in_f, out_f, r) = (7, 72, 100, 8);
        let x = p.randn(&[rows, in_f], dtype, 1.0)?;
        let a = p.randn(&[r, in_f], dtype, 0.3)?;
        let b = p.randn(&[out_f, r], dtype, 0.3)?;
        let (x32, a32, b32) = (x.to_dtype(f32_)?.requires_grad(), a.to_dtype(f32_)?.requires_grad(), b.to_dtype(f32_)?.requires_grad());
        let y = ops::lora_linear(&x32, LoraBase::None, None, &a32, &b32, 0.5)?;
        let gr = ops::sum(&ops::mul(&y, &y)?)?.backward()?;
        let (xg, ag, bg) = (p.gpu(&x)?.requires_grad(), p.gpu(&a)?.requires_grad(), p.gpu(&b)?.requires_grad());
        let run = || -> Result<Vec<Tensor>> {
            let yg = ops::lora_linear(&xg, LoraBase::None, None, &ag, &bg, 0.5)?;
            let g = ops::sum(&ops::mul(&yg, &yg)?)?.backward()?;
            let get = |t: &Tensor| g.get(t).cloned().ok_or_else(|| Error::Input("no gradient".into()));
            Ok(vec![get(&xg)?, get(&ag)?, get(&bg)?])
        };
        match run() {
            Ok(v) => {
                for ((name, t), got) in ["dx", "dA", "dB"].iter().zip([&x32, &a32, &b32]).zip(&v) {
                    match gr.get(t) {
                        Some(refv) => p.check(&format!("lora/autograd Σy² {name}"), "7x72 → 100, r=8", refv, got),
                        None => p.fail("lora/autograd", name, dtype, &Error::Input("CPU has no gradient".into())),
                    }
                }
            }
            Err(e) => p.fail("lora/autograd Σy²", "7x72 → 100, r=8", dtype, &e),
        }
    }
    Ok(())
}
