//! Elementwise ops on the device (`kernels/cuda/elementwise.cu`): dtype conversion, the strided
//! gather behind `contiguous`, binary ops, affine, in-place accumulation, row broadcasts and the
//! KV-cache block copy. Semantics are the CPU backend's (`backend/cpu/mod.rs`); the float kernels
//! take F32, BF16, F16 and F64 (the CPU backend only F32/F64), compute in f32 (f64 for F64) and
//! round once. Each op has a `*_reference` twin running the simple one-thread-per-element kernel.

use super::device::cuda_err;
use super::parity::{Parity, ParityRow};
use super::{launch, sfx, Arg, CudaStorage};
use crate::backend::{BackendStorage, BinaryOp, Storage};
use crate::error::{Error, Result};
use crate::tensor::{DType, Layout, Tensor};
use cudarc::driver::LaunchConfig;

const M: &str = "elementwise";
const BLOCK: u32 = 256;
/// Grid-stride kernels never launch more blocks than this (enough to fill any current GPU).
const MAX_BLOCKS: usize = 16384;

/// A grid-stride launch for `threads` threads of work.
fn strided_grid(threads: usize) -> LaunchConfig {
    let blocks = threads.div_ceil(BLOCK as usize).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One thread per element (the reference kernels, which do not grid-stride).
fn full_grid(n: usize) -> Result<LaunchConfig> {
    let blocks = n.div_ceil(BLOCK as usize).max(1);
    if blocks > i32::MAX as usize {
        return Err(Error::Unsupported(format!(
            "CUDA reference kernel: {n} elements is too many for a 1-D grid"
        )));
    }
    Ok(LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// A grid-stride launch of a 128-bit kernel over `n` elements of `dtype`.
fn vec_grid(n: usize, dtype: DType) -> LaunchConfig {
    strided_grid(n.div_ceil(16 / dtype.size_in_bytes()))
}

/// The kernel `<op>_<dtype>` with its 128-bit grid, or the reference `<op>_ref_<dtype>` with one thread per element.
fn variant(op: &str, x: &CudaStorage, n: usize, reference: bool) -> Result<(String, LaunchConfig)> {
    Ok(if reference { (format!("{op}_ref_{}", x.sfx()), full_grid(n)?) } else { (format!("{op}_{}", x.sfx()), vec_grid(n, x.dtype())) })
}

/// Errors unless `x` is a float dtype the kernels instantiate and every other operand matches it.
pub(crate) fn float_check(op: &'static str, x: &CudaStorage, others: &[&CudaStorage]) -> Result<()> {
    if !matches!(x.dtype(), DType::F32 | DType::F64 | DType::BF16 | DType::F16) {
        return Err(Error::dtype(
            op,
            format!("expected a float dtype (F32, F64, BF16, F16), got {}", x.dtype()),
        ));
    }
    for o in others {
        if o.dtype() != x.dtype() {
            return Err(Error::dtype(op, format!("operands disagree: {} and {}", x.dtype(), o.dtype())));
        }
        x.same_device(o, op)?;
    }
    Ok(())
}

/// Copies `bytes` bytes between device addresses on `x`'s stream.
fn memcpy(x: &CudaStorage, dst: u64, src: u64, bytes: usize) -> Result<()> {
    if bytes > 0 {
        // SAFETY: the callers checked both ranges lie inside live buffers of this device.
        unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, x.dev.stream.cu_stream()) }
            .map_err(cuda_err("copying on the device"))?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------ to_dtype

/// Converts to `dtype`: every float↔float pair (F32, F64, BF16, F16; round to nearest even) and
/// the CPU backend's integer conversions U32→I64, I64→F32/F64, I64→U8 (x ≠ 0) and I64→U32, whose
/// range is checked on the device (an out-of-range value is the CPU's error; this one conversion
/// waits for the device to read the flag back).
pub fn to_dtype(x: &CudaStorage, dtype: DType) -> Result<CudaStorage> {
    use DType::*;
    let src = x.dtype();
    if src == dtype {
        return x.try_clone();
    }
    let float = |d: DType| matches!(d, F32 | F64 | BF16 | F16);
    let ok = (float(src) && float(dtype)) || matches!((src, dtype), (U32, I64) | (I64, F32) | (I64, F64) | (I64, U8) | (I64, U32));
    if !ok {
        return Err(Error::dtype("to_dtype", format!("no conversion from {src} to {dtype}")));
    }
    let n = x.len();
    let out = CudaStorage::alloc_out(&x.dev, dtype, n)?;
    if n == 0 {
        return Ok(out);
    }
    let name = format!("cast_{}_{}", sfx(src), sfx(dtype));
    if (src, dtype) == (I64, U32) {
        // extern "C" cast_i64_u32(const i64* x, u32* y, u64 n, u64* bad)
        let bad = CudaStorage::zeros_on(&x.dev, I64, 1)?;
        launch(
            &x.dev,
            M,
            &name,
            strided_grid(n),
            &[x.arg(), out.arg(), Arg::U64(n as u64), bad.arg()],
        )?;
        let b = first_u64(&bad)?;
        if b != 0 {
            let i = n - b as usize;
            let v = match x.to_cpu()? {
                crate::backend::CpuStorage::I64(v) => v[i],
                _ => unreachable!("the source is I64"),
            };
            return Err(Error::Input(format!("value {v} does not fit U32")));
        }
    } else {
        // extern "C" cast_<src>_<dst>(const S* x, D* y, u64 n)
        launch(&x.dev, M, &name, strided_grid(n), &[x.arg(), out.arg(), Arg::U64(n as u64)])?;
    }
    Ok(out)
}

/// Element 0 of an I64 device buffer, as u64 (waits for the device).
pub(crate) fn first_u64(s: &CudaStorage) -> Result<u64> {
    match s.to_cpu()? {
        crate::backend::CpuStorage::I64(v) => Ok(v[0] as u64),
        o => Err(Error::dtype("flag", format!("expected I64, got {}", o.dtype()))),
    }
}

// ------------------------------------------------------------------------------------------ copy_strided

/// A contiguous copy of the elements `l` views (any dtype). Contiguous layouts are one device
/// memcpy from the offset; others run the gather kernel on the layout with mergeable dimensions
/// merged (at most 8 remaining), in the widest unit (up to 16 bytes) that every offset allows.
pub fn copy_strided(x: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    copy_strided_impl(x, l, false)
}

/// [`copy_strided`] through the reference kernel (one thread per element, the layout as given).
pub fn copy_strided_reference(x: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    copy_strided_impl(x, l, true)
}

/// (size, stride) pairs, outer to inner, with size-1 dimensions dropped and dimensions merged
/// where the outer one steps exactly over the inner one.
fn merged_dims(l: &Layout) -> Vec<(usize, usize)> {
    let mut dims: Vec<(usize, usize)> = Vec::new();
    for (&d, &s) in l.shape().iter().zip(l.strides()) {
        if d == 1 {
            continue;
        }
        match dims.last_mut() {
            Some(last) if last.1 == s * d => *last = (last.0 * d, s),
            _ => dims.push((d, s)),
        }
    }
    dims
}

/// The gather's dimensions (size, stride) outer → inner, offset and unit (bytes) for a layout of
/// elements of `es` bytes: merged and widened for the fast kernel, as given for the reference.
fn gather_plan(l: &Layout, es: usize, reference: bool) -> Result<(Vec<(usize, usize)>, usize, usize)> {
    // Dimensions outer → inner, then widened to units of `unit` bytes.
    let mut dims: Vec<(usize, usize)> = if reference {
        l.shape().iter().copied().zip(l.strides().iter().copied()).collect()
    } else {
        merged_dims(l)
    };
    if dims.len() > 8 {
        return Err(Error::Unsupported(format!(
            "CUDA copy_strided: {} non-mergeable dimensions (at most 8)",
            dims.len()
        )));
    }
    let mut off = l.offset();
    let mut unit = es;
    if !reference {
        if let Some(&(inner, 1)) = dims.last() {
            for u in [16usize, 8, 4, 2] {
                if u <= es {
                    break;
                }
                let k = u / es;
                if inner.is_multiple_of(k) && off.is_multiple_of(k) && dims[..dims.len() - 1].iter().all(|&(_, s)| s.is_multiple_of(k)) {
                    unit = u;
                    break;
                }
            }
        }
        let k = unit / es;
        if k > 1 {
            let nd = dims.len();
            dims[nd - 1].0 /= k;
            for d in &mut dims[..nd - 1] {
                d.1 /= k;
            }
            off /= k;
        }
    }
    Ok((dims, off, unit))
}

fn copy_strided_impl(x: &CudaStorage, l: &Layout, reference: bool) -> Result<CudaStorage> {
    let n = l.elem_count();
    let es = x.dtype().size_in_bytes();
    let out = CudaStorage::alloc_out(&x.dev, x.dtype(), n)?;
    if n == 0 {
        return Ok(out);
    }
    let last = l.offset() + l.shape().iter().zip(l.strides()).map(|(&d, &s)| (d - 1) * s).sum::<usize>();
    if last >= x.len() {
        return Err(Error::shape(
            "copy_strided",
            format!(
                "layout {:?} (strides {:?}, offset {}) reaches element {last} of {}",
                l.shape(),
                l.strides(),
                l.offset(),
                x.len()
            ),
        ));
    }
    if !reference && l.is_contiguous() {
        memcpy(x, out.ptr(), x.ptr() + (l.offset() * es) as u64, n * es)?;
        return Ok(out);
    }
    let (dims, off, unit) = gather_plan(l, es, reference)?;
    let n_units = dims.iter().map(|d| d.0).product::<usize>();
    let max_index = off + dims.iter().map(|&(d, s)| (d - 1) * s).sum::<usize>();
    let name = if reference {
        format!("gather_ref_b{unit}")
    } else {
        let narrow = n_units <= u32::MAX as usize && max_index <= u32::MAX as usize;
        format!("gather_b{unit}_{}", if narrow { "i32" } else { "i64" })
    };
    // extern "C" gather_*(const W* x, W* y, u64 n, int nd, u64 off, u64 sz0..sz7, u64 st0..st7),
    // dimension 0 = innermost.
    let mut args = vec![
        x.arg(),
        out.arg(),
        Arg::U64(n_units as u64),
        Arg::I32(dims.len() as i32),
        Arg::U64(off as u64),
    ];
    let rev: Vec<(usize, usize)> = dims.iter().rev().copied().collect();
    for d in 0..8 {
        args.push(Arg::U64(rev.get(d).map_or(1, |x| x.0) as u64));
    }
    for d in 0..8 {
        args.push(Arg::U64(rev.get(d).map_or(0, |x| x.1) as u64));
    }
    let cfg = if reference { full_grid(n_units)? } else { strided_grid(n_units) };
    launch(&x.dev, M, &name, cfg, &args)?;
    Ok(out)
}

// ------------------------------------------------------------------------------------------ binary

/// Elementwise `a op b` (128-bit loads with a scalar tail).
pub fn binary(a: &CudaStorage, b: &CudaStorage, op: BinaryOp) -> Result<CudaStorage> {
    binary_impl(a, b, op, false)
}

/// [`binary`] through the reference kernel.
pub fn binary_reference(a: &CudaStorage, b: &CudaStorage, op: BinaryOp) -> Result<CudaStorage> {
    binary_impl(a, b, op, true)
}

fn binary_impl(a: &CudaStorage, b: &CudaStorage, op: BinaryOp, reference: bool) -> Result<CudaStorage> {
    float_check("binary", a, &[b])?;
    let n = a.len();
    if b.len() != n {
        return Err(Error::shape("binary", format!("operands have {n} and {} elements", b.len())));
    }
    let out = CudaStorage::alloc_out(&a.dev, a.dtype(), n)?;
    if n == 0 {
        return Ok(out);
    }
    let op = match op {
        BinaryOp::Add => "add",
        BinaryOp::Sub => "sub",
        BinaryOp::Mul => "mul",
    };
    let (name, cfg) = variant(op, a, n, reference)?;
    // extern "C" <op>[_ref]_<dtype>(const T* a, const T* b, T* y, u64 n)
    launch(&a.dev, M, &name, cfg, &[a.arg(), b.arg(), out.arg(), Arg::U64(n as u64)])?;
    Ok(out)
}

// ------------------------------------------------------------------------------------------ affine

/// `x·mul + add` (mul and add rounded to the compute type first, as the CPU does).
pub fn affine(x: &CudaStorage, mul: f64, add: f64) -> Result<CudaStorage> {
    affine_impl(x, mul, add, false)
}

/// [`affine`] through the reference kernel.
pub fn affine_reference(x: &CudaStorage, mul: f64, add: f64) -> Result<CudaStorage> {
    affine_impl(x, mul, add, true)
}

fn affine_impl(x: &CudaStorage, mul: f64, add: f64, reference: bool) -> Result<CudaStorage> {
    float_check("affine", x, &[])?;
    let n = x.len();
    let out = CudaStorage::alloc_out(&x.dev, x.dtype(), n)?;
    if n == 0 {
        return Ok(out);
    }
    let (name, cfg) = variant("affine", x, n, reference)?;
    // extern "C" affine[_ref]_<dtype>(const T* x, T* y, u64 n, double mul, double add)
    launch(
        &x.dev,
        M,
        &name,
        cfg,
        &[x.arg(), out.arg(), Arg::U64(n as u64), Arg::F64(mul), Arg::F64(add)],
    )?;
    Ok(out)
}

// ------------------------------------------------------------------------------------------ add_assign

/// In-place `a += b` (gradient accumulation; 128-bit loads and stores).
pub fn add_assign(a: &mut CudaStorage, b: &CudaStorage) -> Result<()> {
    add_assign_impl(a, b, false)
}

/// [`add_assign`] through the reference kernel.
pub fn add_assign_reference(a: &mut CudaStorage, b: &CudaStorage) -> Result<()> {
    add_assign_impl(a, b, true)
}

fn add_assign_impl(a: &mut CudaStorage, b: &CudaStorage, reference: bool) -> Result<()> {
    float_check("add_assign", a, &[b])?;
    let n = a.len();
    if b.len() != n {
        return Err(Error::shape("add_assign", format!("{n} += {} elements", b.len())));
    }
    if n == 0 {
        return Ok(());
    }
    let (name, cfg) = variant("add_assign", a, n, reference)?;
    // extern "C" add_assign[_ref]_<dtype>(T* a, const T* b, u64 n)
    launch(&a.dev, M, &name, cfg, &[a.arg(), b.arg(), Arg::U64(n as u64)])
}

// ------------------------------------------------------------------------------------------ add_row, mul_row

/// `a[r, :] + row` over `[rows, cols]`.
pub fn add_row(a: &CudaStorage, row: &CudaStorage, cols: usize) -> Result<CudaStorage> {
    row_impl(a, row, cols, "add_row", false)
}

/// `a[r, :] ∘ row` over `[rows, cols]`.
pub fn mul_row(a: &CudaStorage, row: &CudaStorage, cols: usize) -> Result<CudaStorage> {
    row_impl(a, row, cols, "mul_row", false)
}

/// [`add_row`] through the reference kernel.
pub fn add_row_reference(a: &CudaStorage, row: &CudaStorage, cols: usize) -> Result<CudaStorage> {
    row_impl(a, row, cols, "add_row", true)
}

/// [`mul_row`] through the reference kernel.
pub fn mul_row_reference(a: &CudaStorage, row: &CudaStorage, cols: usize) -> Result<CudaStorage> {
    row_impl(a, row, cols, "mul_row", true)
}

fn row_impl(a: &CudaStorage, row: &CudaStorage, cols: usize, op: &'static str, reference: bool) -> Result<CudaStorage> {
    float_check(op, a, &[row])?;
    let n = a.len();
    if cols == 0 || !n.is_multiple_of(cols) || row.len() != cols {
        return Err(Error::shape(
            op,
            format!("{n} elements in rows of {cols} with a row of {}", row.len()),
        ));
    }
    let out = CudaStorage::alloc_out(&a.dev, a.dtype(), n)?;
    if n == 0 {
        return Ok(out);
    }
    let (name, cfg) = variant(op, a, n, reference)?;
    // extern "C" <op>[_ref]_<dtype>(const T* a, const T* row, T* y, u64 n, u64 cols)
    launch(
        &a.dev,
        M,
        &name,
        cfg,
        &[a.arg(), row.arg(), out.arg(), Arg::U64(n as u64), Arg::U64(cols as u64)],
    )?;
    Ok(out)
}

// ------------------------------------------------------------------------------------------ write_blocks

/// For `o < outer`: `dst[o·dst_stride + dst_offset ..][..len] = src[o·len ..][..len]` (any dtype,
/// both the same), in the widest unit up to 16 bytes that the lengths and offsets allow.
pub fn write_blocks(
    dst: &mut CudaStorage,
    src: &CudaStorage,
    outer: usize,
    len: usize,
    dst_stride: usize,
    dst_offset: usize,
) -> Result<()> {
    write_blocks_impl(dst, src, outer, len, dst_stride, dst_offset, false)
}

/// [`write_blocks`] through the reference kernel (one thread per element).
pub fn write_blocks_reference(
    dst: &mut CudaStorage,
    src: &CudaStorage,
    outer: usize,
    len: usize,
    dst_stride: usize,
    dst_offset: usize,
) -> Result<()> {
    write_blocks_impl(dst, src, outer, len, dst_stride, dst_offset, true)
}

fn write_blocks_impl(
    dst: &mut CudaStorage,
    src: &CudaStorage,
    outer: usize,
    len: usize,
    stride: usize,
    off: usize,
    reference: bool,
) -> Result<()> {
    if dst.dtype() != src.dtype() {
        return Err(Error::dtype("write_blocks", format!("{} into {}", src.dtype(), dst.dtype())));
    }
    dst.same_device(src, "write_blocks")?;
    if outer > 0 && ((outer - 1) * stride + off + len > dst.len() || outer * len > src.len()) {
        return Err(Error::shape(
            "write_blocks",
            format!(
                "{outer} blocks of {len} at offset {off} (stride {stride}) do not fit {} elements",
                dst.len()
            ),
        ));
    }
    if outer == 0 || len == 0 {
        return Ok(());
    }
    let es = dst.dtype().size_in_bytes();
    let unit = if reference {
        es
    } else {
        [16usize, 8, 4, 2, 1]
            .into_iter()
            .find(|&u| u >= es && (len * es).is_multiple_of(u) && (stride * es).is_multiple_of(u) && (off * es).is_multiple_of(u))
            .unwrap_or(es)
    };
    let k = unit / es;
    let (len_u, stride_u, off_u) = ((len / k) as u64, (stride / k) as u64, (off / k) as u64);
    let cfg = if reference {
        full_grid(outer * len)?
    } else {
        let bx = (len / k).div_ceil(BLOCK as usize).clamp(1, 1024) as u32;
        LaunchConfig {
            grid_dim: (bx, outer.min(65535) as u32, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    };
    let name = if reference {
        format!("write_blocks_ref_b{unit}")
    } else {
        format!("write_blocks_b{unit}")
    };
    // extern "C" write_blocks[_ref]_b<unit>(W* dst, const W* src, u64 outer, u64 len, u64 dst_stride, u64 dst_offset)
    launch(
        &dst.dev,
        M,
        &name,
        cfg,
        &[
            dst.arg(),
            src.arg(),
            Arg::U64(outer as u64),
            Arg::U64(len_u),
            Arg::U64(stride_u),
            Arg::U64(off_u),
        ],
    )
}

// ------------------------------------------------------------------------------------------ parity


pub(crate) use super::parity::{cuda_of, wrap};

/// Checks `gpu` against `cpu` (or records the error); `tol` overrides the dtype's tolerance.
pub(crate) fn record(p: &mut Parity, kernel: &str, case: &str, dtype: DType, cpu: &Tensor, gpu: Result<Tensor>, tol: Option<f64>) {
    match gpu {
        Ok(g) => match tol {
            Some(t) => p.check_tol(kernel, case, cpu, &g, t),
            None => p.check(kernel, case, cpu, &g),
        },
        Err(e) => p.fail(kernel, case, dtype, &e),
    }
}

/// Records an expected error as a passing row (and an unexpected success as a failure).
pub(crate) fn expect_err<T>(p: &mut Parity, kernel: &str, case: &str, dtype: DType, r: Result<T>, must_contain: &str) {
    let (passed, note) = match r {
        Ok(_) => (false, "expected an error, got Ok".to_string()),
        Err(e) => {
            let s = e.to_string();
            (
                s.contains(must_contain),
                if s.contains(must_contain) {
                    String::new()
                } else {
                    format!("unexpected error: {s}")
                },
            )
        }
    };
    p.rows.push(ParityRow {
        kernel: kernel.into(),
        case: case.into(),
        dtype,
        max_abs: 0.0,
        rel: 0.0,
        tol: 0.0,
        passed,
        note,
    });
}

fn host<T: crate::tensor::HostType>(v: Vec<T>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape, crate::Device::Cpu)
}

/// Parity: conversions (every float pair, the integer pairs, the U32 range error), strided copies
/// (transposes, narrows, 4-D permutes, all dtypes, fast and reference), binary/affine/add_assign/
/// add_row/mul_row on lengths 1, 7, 1023, 4099 (fast and reference), and write_blocks.
pub fn parity(p: &mut Parity) -> Result<()> {
    use crate::ops;
    use DType::*;
    let sizes = [1usize, 7, 1023, 4099];

    // --- to_dtype: floats (the CPU reference converts through F32, which is exact for bf16/f16).
    for (s, d) in [
        (F32, F64),
        (F32, BF16),
        (F32, F16),
        (F64, F32),
        (F64, BF16),
        (F64, F16),
        (BF16, F32),
        (BF16, F64),
        (BF16, F16),
        (F16, F32),
        (F16, F64),
        (F16, BF16),
    ] {
        for &n in &[7usize, 4099] {
            let x = p.randn(&[n], s, 3.0)?;
            let cpu = match (s, d) {
                (BF16, F16) | (F16, BF16) => x.to_dtype(F32)?.to_dtype(d)?,
                _ => x.to_dtype(d)?,
            };
            let case = format!("{s}->{d} n={n}");
            let g = p.gpu(&x).and_then(|g| g.to_dtype(d));
            record(
                p,
                "elementwise/cast",
                &case,
                d,
                &cpu,
                g,
                Some(if d == F32 || d == F64 { 1e-7 } else { 1e-2 }),
            );
        }
    }
    // --- to_dtype: integers (exact).
    let n = 1023;
    let vals: Vec<i64> = (0..n)
        .map(|i| if i % 5 == 0 { 0 } else { (p.rng.below(1 << 40) as i64) - (1 << 39) })
        .collect();
    let x = host(vals.clone(), &[n])?;
    for d in [F32, F64, U8] {
        let cpu = x.to_dtype(d)?;
        let g = p.gpu(&x).and_then(|g| g.to_dtype(d));
        record(
            p,
            "elementwise/cast",
            &format!("I64->{d} n={n}"),
            d,
            &cpu,
            g,
            Some(if d == F32 { 1e-7 } else { 0.0 }),
        );
    }
    let ids: Vec<i64> = (0..n).map(|_| p.rng.below(1 << 32) as i64).collect();
    let xi = host(ids, &[n])?;
    let cpu = xi.to_dtype(U32)?;
    let g = p.gpu(&xi).and_then(|g| g.to_dtype(U32));
    record(p, "elementwise/cast", &format!("I64->U32 n={n}"), U32, &cpu, g, Some(0.0));
    let back = p.gpu(&cpu).and_then(|g| g.to_dtype(I64));
    record(p, "elementwise/cast", &format!("U32->I64 n={n}"), I64, &xi, back, Some(0.0));
    let mut bad = vec![3i64; 77];
    bad[41] = 1 << 33;
    bad[60] = -1;
    let r = p.gpu(&host(bad, &[77])?).and_then(|g| g.to_dtype(U32));
    expect_err(
        p,
        "elementwise/cast",
        "I64->U32 out of range (error)",
        U32,
        r,
        "value 8589934592 does not fit U32",
    );
    let r = p.gpu(&host(vec![1u8; 3], &[3])?).and_then(|g| g.to_dtype(F32));
    expect_err(p, "elementwise/cast", "U8->F32 refused (error)", U8, r, "no conversion");

    // --- copy_strided: views of float and integer tensors, through Tensor::contiguous and the reference kernel.
    type View = fn(&Tensor) -> Result<Tensor>;
    let views: Vec<(&str, Vec<usize>, View)> = vec![
        ("[37,53]ᵀ", vec![37, 53], |t| ops::transpose(t, 0, 1)),
        ("[4,6,5,7] transpose(1,2)", vec![4, 6, 5, 7], |t| ops::transpose(t, 1, 2)),
        ("[3,5,64] transpose(0,2)", vec![3, 5, 64], |t| ops::transpose(t, 0, 2)),
        ("[6,9,128] narrow(2,64,64)", vec![6, 9, 128], |t| ops::narrow(t, 2, 64, 64)),
        ("[6,9,130] narrow(2,1,127)", vec![6, 9, 130], |t| ops::narrow(t, 2, 1, 127)),
        ("[11,13] narrow(0,3,5) (contiguous, offset)", vec![11, 13], |t| {
            ops::narrow(t, 0, 3, 5)
        }),
        ("[2,3,4,5,6] narrow(1,1,2)ᵀ(0,4)", vec![2, 3, 4, 5, 6], |t| {
            ops::transpose(&ops::narrow(t, 1, 1, 2)?, 0, 4)
        }),
        ("[1,7,1,9]ᵀ(1,3)", vec![1, 7, 1, 9], |t| ops::transpose(t, 1, 3)),
    ];
    for (name, shape, view) in &views {
        let numel: usize = shape.iter().product();
        for dtype in [F32, BF16, F16, F64, I64, U32, U8] {
            let x = match dtype {
                I64 => host((0..numel as i64).map(|i| i * 7 - 1000).collect::<Vec<i64>>(), shape)?,
                U32 => host((0..numel as u32).map(|i| i.wrapping_mul(2654435761)).collect::<Vec<u32>>(), shape)?,
                U8 => host((0..numel).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>(), shape)?,
                d => p.randn(shape, d, 1.0)?,
            };
            let cpu = view(&x)?.contiguous()?;
            let case = format!("{name} {dtype}");
            let g = p.gpu(&x).and_then(|g| view(&g)?.contiguous());
            record(p, "elementwise/copy_strided", &case, dtype, &cpu, g, Some(0.0));
            if matches!(dtype, F32 | BF16 | I64 | U8) {
                let g = p.gpu(&x).and_then(|g| {
                    let v = view(&g)?;
                    let st = v.storage();
                    let Storage::Cuda(c) = &*st else {
                        return Err(Error::Input("not on the device".into()));
                    };
                    wrap(copy_strided_reference(c, v.layout())?, v.shape())
                });
                record(p, "elementwise/copy_strided_ref", &case, dtype, &cpu, g, Some(0.0));
            }
        }
    }

    // --- binary, affine, add_assign, add_row, mul_row.
    for dtype in [F32, BF16] {
        for &n in &sizes {
            let a = p.randn(&[n], dtype, 1.0)?;
            let b = p.randn(&[n], dtype, 1.0)?;
            let (a32, b32) = (a.to_dtype(F32)?, b.to_dtype(F32)?);
            let (ga, gb) = (cuda_of(&p.gpu(&a)?)?, cuda_of(&p.gpu(&b)?)?);
            for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul] {
                let cpu = Tensor::from_storage(a32.contiguous_storage()?.binary(&*b32.contiguous_storage()?, op)?, &[n])?;
                let case = format!("{op:?} n={n}");
                record(
                    p,
                    "elementwise/binary",
                    &case,
                    dtype,
                    &cpu,
                    binary(&ga, &gb, op).and_then(|s| wrap(s, &[n])),
                    None,
                );
                record(
                    p,
                    "elementwise/binary_ref",
                    &case,
                    dtype,
                    &cpu,
                    binary_reference(&ga, &gb, op).and_then(|s| wrap(s, &[n])),
                    None,
                );
            }
            // Through the op layer (the residual add).
            let cpu = ops::add(&a32, &b32)?;
            let g = (|| ops::add(&p.gpu(&a)?, &p.gpu(&b)?))();
            record(p, "elementwise/binary (ops::add)", &format!("n={n}"), dtype, &cpu, g, None);

            let cpu = Tensor::from_storage(a32.contiguous_storage()?.affine(-1.75, 0.3)?, &[n])?;
            let case = format!("x·-1.75+0.3 n={n}");
            record(
                p,
                "elementwise/affine",
                &case,
                dtype,
                &cpu,
                affine(&ga, -1.75, 0.3).and_then(|s| wrap(s, &[n])),
                None,
            );
            record(
                p,
                "elementwise/affine_ref",
                &case,
                dtype,
                &cpu,
                affine_reference(&ga, -1.75, 0.3).and_then(|s| wrap(s, &[n])),
                None,
            );

            let cpu = ops::add(&a32, &b32)?;
            let case = format!("n={n}");
            let run = |reference: bool| -> Result<Tensor> {
                let mut acc = ga.try_clone()?;
                if reference {
                    add_assign_reference(&mut acc, &gb)?
                } else {
                    add_assign(&mut acc, &gb)?
                }
                wrap(acc, &[n])
            };
            record(p, "elementwise/add_assign", &case, dtype, &cpu, run(false), None);
            record(p, "elementwise/add_assign_ref", &case, dtype, &cpu, run(true), None);
        }
        for (rows, cols) in [(1usize, 1usize), (3, 7), (5, 1023), (2, 4099), (33, 64), (17, 8)] {
            let a = p.randn(&[rows, cols], dtype, 1.0)?;
            let r = p.randn(&[cols], dtype, 1.0)?;
            let (a32, r32) = (a.to_dtype(F32)?, r.to_dtype(F32)?);
            let (ga, gr) = (cuda_of(&p.gpu(&a)?)?, cuda_of(&p.gpu(&r)?)?);
            let case = format!("[{rows},{cols}]");
            let cpu = Tensor::from_storage(a32.contiguous_storage()?.add_row(&*r32.contiguous_storage()?, cols)?, &[rows, cols])?;
            record(
                p,
                "elementwise/add_row",
                &case,
                dtype,
                &cpu,
                add_row(&ga, &gr, cols).and_then(|s| wrap(s, &[rows, cols])),
                None,
            );
            record(
                p,
                "elementwise/add_row_ref",
                &case,
                dtype,
                &cpu,
                add_row_reference(&ga, &gr, cols).and_then(|s| wrap(s, &[rows, cols])),
                None,
            );
            let cpu = ops::mul_row(&a32, &r32)?;
            let g = (|| ops::mul_row(&p.gpu(&a)?, &p.gpu(&r)?))();
            record(p, "elementwise/mul_row", &case, dtype, &cpu, g, None);
            record(
                p,
                "elementwise/mul_row_ref",
                &case,
                dtype,
                &cpu,
                mul_row_reference(&ga, &gr, cols).and_then(|s| wrap(s, &[rows, cols])),
                None,
            );
        }
    }

    // --- write_blocks: a KV-cache append into a [batch, cap, row] buffer, and odd lengths.
    for dtype in [F32, BF16, U8] {
        for (outer, len, stride, off) in [
            (3usize, 8usize, 40usize, 16usize),
            (2, 7, 23, 5),
            (4, 1, 9, 8),
            (1, 4099, 5000, 3),
            (2, 128, 512, 256),
        ] {
            let dst_n = (outer - 1) * stride + off + len + 3;
            let mk = |p: &mut Parity, n: usize| -> Result<Tensor> {
                if dtype == U8 {
                    host((0..n).map(|_| p.rng.below(256) as u8).collect::<Vec<u8>>(), &[n])
                } else {
                    p.randn(&[n], dtype, 1.0)
                }
            };
            let dst = mk(p, dst_n)?;
            let src = mk(p, outer * len)?;
            // The expected result on the host.
            let mut want = dst.to_f64_vec()?;
            let sv = src.to_f64_vec()?;
            for o in 0..outer {
                want[o * stride + off..o * stride + off + len].copy_from_slice(&sv[o * len..(o + 1) * len]);
            }
            let cpu = Tensor::from_vec(want, &[dst_n], crate::Device::Cpu)?;
            let case = format!("outer={outer} len={len} stride={stride} off={off}");
            for reference in [false, true] {
                let g = (|| {
                    let mut d = cuda_of(&p.gpu(&dst)?)?;
                    let s = cuda_of(&p.gpu(&src)?)?;
                    if reference {
                        write_blocks_reference(&mut d, &s, outer, len, stride, off)?
                    } else {
                        write_blocks(&mut d, &s, outer, len, stride, off)?
                    }
                    wrap(d, &[dst_n])
                })();
                let k = if reference {
                    "elementwise/write_blocks_ref"
                } else {
                    "elementwise/write_blocks"
                };
                record(p, k, &case, dtype, &cpu, g, Some(0.0));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the gather plan the way the kernel does (innermost dimension first, units of `unit`
    /// bytes) on a host byte buffer and compares with the layout's own element order.
    fn simulate(l: &Layout, es: usize, reference: bool) {
        let (dims, off, unit) = gather_plan(l, es, reference).unwrap();
        let n_units: usize = dims.iter().map(|d| d.0).product();
        assert_eq!(n_units * unit, l.elem_count() * es, "{l:?}");
        let storage_len = l.offset() + l.shape().iter().zip(l.strides()).map(|(&d, &s)| (d - 1) * s).sum::<usize>() + 1;
        let src: Vec<u8> = (0..storage_len * es).map(|i| (i * 7 % 251) as u8).collect();
        let mut want = Vec::new();
        l.for_each_index(|i| want.extend_from_slice(&src[i * es..(i + 1) * es]));
        let rev: Vec<(usize, usize)> = dims.iter().rev().copied().collect();
        let mut got = Vec::new();
        for i in 0..n_units {
            let (mut rem, mut s) = (i, off);
            for &(sz, st) in &rev {
                s += (rem % sz) * st;
                rem /= sz;
            }
            got.extend_from_slice(&src[s * unit..(s + 1) * unit]);
        }
        assert_eq!(got, want, "{l:?} es={es} reference={reference} plan={dims:?} off={off} unit={unit}");
    }

    #[test]
    fn gather_plans_visit_the_layouts_elements_in_order() {
        let views: Vec<Layout> = vec![
            Layout::contiguous(&[37, 53]).transpose(0, 1).unwrap(),
            Layout::contiguous(&[4, 6, 5, 7]).transpose(1, 2).unwrap(),
            Layout::contiguous(&[3, 5, 64]).transpose(0, 2).unwrap(),
            Layout::contiguous(&[6, 9, 128]).narrow(2, 64, 64).unwrap(),
            Layout::contiguous(&[6, 9, 130]).narrow(2, 1, 127).unwrap(),
            Layout::contiguous(&[2, 3, 4, 5, 6]).narrow(1, 1, 2).unwrap().transpose(0, 4).unwrap(),
            Layout::contiguous(&[1, 7, 1, 9]).transpose(1, 3).unwrap(),
            Layout::contiguous(&[2, 8, 4, 16]).narrow(3, 8, 8).unwrap().narrow(1, 2, 4).unwrap(),
            Layout::contiguous(&[5, 3, 32]).transpose(0, 1).unwrap(),
        ];
        for l in &views {
            for es in [1, 2, 4, 8] {
                simulate(l, es, false);
                simulate(l, es, true);
            }
        }
        // Widening happens where the offsets allow it.
        let l = Layout::contiguous(&[6, 9, 128]).narrow(2, 64, 64).unwrap();
        assert_eq!(gather_plan(&l, 2, false).unwrap(), (vec![(54, 16), (8, 1)], 8, 16));
        assert_eq!(gather_plan(&Layout::contiguous(&[6, 9, 130]).narrow(2, 1, 127).unwrap(), 4, false).unwrap().2, 4);
    }
}
