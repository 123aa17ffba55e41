//! Token NLL, per-row KL and the fused linear cross-entropy on CUDA (`kernels/cuda/cross_entropy.cu`).
//!
//! Outputs follow the CPU backend (`backend/cpu/token_nll.rs`, `kl_div.rs`): nll, kl and the
//! gradients have the logits' dtype. The saved `lse` is F32 for every logits dtype: it only travels
//! from the forward to the backward through the op layer (`ops/token_nll.rs`), and rounding it to
//! bf16 would put an error of up to ~6% into each softmax of the backward.
//!
//! The fused linear cross-entropy ([`linear_ce_forward`], [`linear_ce_backward`]) computes
//! `nll = CE(h·Wᵀ, y)` one vocabulary chunk at a time, so the `[rows, vocab]` logits never exist:
//! per chunk a cuBLASLt GEMM writes `[rows, chunk]` logits (in the operands' dtype, as the unfused
//! `linear` would), a row kernel merges them into a running (max, Σexp) and picks the target logit;
//! the backward recomputes each chunk, turns it into `dz = g·(softmax − onehot)` in place and
//! accumulates `dh += dz·W_c` (in f32 for bf16/f16) and writes `dW_c = dzᵀ·h`.

use super::gemm::{gemm_raw, Gemm};
use super::{launch, Arg, CudaStorage};
use crate::backend::BackendStorage;
use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::driver::LaunchConfig;

const M: &str = "cross_entropy";
/// Threads per row block of the row kernels.
const ROW_THREADS: u32 = 512;

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 }
}

fn check_rows(op: &'static str, rows: usize) -> Result<()> {
    if rows > i32::MAX as usize {
        return Err(Error::Input(format!("{op}: {rows} rows exceed one CUDA grid")));
    }
    Ok(())
}

/// Checks logits [rows, vocab] against I64 targets [rows]; returns rows.
fn check_nll(op: &'static str, z: &CudaStorage, targets: &CudaStorage, vocab: usize) -> Result<usize> {
    z.float_op(op, &[])?;
    z.same_device(targets, op)?;
    if targets.dtype() != DType::I64 {
        return Err(Error::dtype(op, format!("targets must be I64, got {}", targets.dtype())));
    }
    let rows = targets.len();
    if z.len() != rows * vocab {
        return Err(Error::Input(format!("{op}: {} logits for {rows} rows of vocabulary {vocab}", z.len())));
    }
    check_rows(op, rows)?;
    Ok(rows)
}

/// `lse` as F32 (it is F32 when it came from [`token_nll`]).
fn lse_f32<'a>(lse: &'a CudaStorage, rows: usize, op: &'static str) -> Result<std::borrow::Cow<'a, CudaStorage>> {
    if lse.len() != rows {
        return Err(Error::Input(format!("{op}: {} lse values for {rows} rows", lse.len())));
    }
    Ok(if lse.dtype() == DType::F32 { std::borrow::Cow::Borrowed(lse) } else { std::borrow::Cow::Owned(lse.to_dtype(DType::F32)?) })
}

fn nll_forward(z: &CudaStorage, targets: &CudaStorage, vocab: usize, reference: bool) -> Result<(CudaStorage, CudaStorage)> {
    let rows = check_nll("token_nll", z, targets, vocab)?;
    let nll = CudaStorage::alloc_out(&z.dev, z.dtype(), rows)?;
    let lse = CudaStorage::alloc_out(&z.dev, DType::F32, rows)?;
    if rows == 0 {
        return Ok((nll, lse));
    }
    if reference {
        // token_nll_fwd_ref_T(const T* z, const i64* y, T* nll, float* lse, u64 rows, u64 vocab)
        let args = [z.arg(), targets.arg(), nll.arg(), lse.arg(), Arg::U64(rows as u64), Arg::U64(vocab as u64)];
        launch(&z.dev, M, &format!("token_nll_fwd_ref_{}", z.sfx()), super::device::grid_1d(rows, 128), &args)?;
    } else {
        // token_nll_fwd_T(const T* z, const i64* y, T* nll, float* lse, u64 vocab)
        let args = [z.arg(), targets.arg(), nll.arg(), lse.arg(), Arg::U64(vocab as u64)];
        launch(&z.dev, M, &format!("token_nll_fwd_{}", z.sfx()), rows_cfg(rows), &args)?;
    }
    Ok((nll, lse))
}

/// Per-row (nll, lse) of [rows, vocab] logits against I64 targets (−100 ignored): nll in the logits'
/// dtype, lse in F32.
pub fn token_nll(z: &CudaStorage, targets: &CudaStorage, vocab: usize) -> Result<(CudaStorage, CudaStorage)> {
    nll_forward(z, targets, vocab, false)
}

/// [`token_nll`] by the reference kernel (one thread per row).
pub fn token_nll_reference(z: &CudaStorage, targets: &CudaStorage, vocab: usize) -> Result<(CudaStorage, CudaStorage)> {
    nll_forward(z, targets, vocab, true)
}

fn nll_backward(
    z: &CudaStorage,
    targets: &CudaStorage,
    lse: &CudaStorage,
    g: &CudaStorage,
    vocab: usize,
    reference: bool,
) -> Result<CudaStorage> {
    let rows = check_nll("token_nll backward", z, targets, vocab)?;
    z.float_op("token_nll backward", &[g])?;
    if g.len() != rows {
        return Err(Error::Input(format!("token_nll backward: {} upstream gradients for {rows} rows", g.len())));
    }
    z.same_device(lse, "token_nll backward")?;
    let lse = lse_f32(lse, rows, "token_nll backward")?;
    let dz = CudaStorage::alloc_out(&z.dev, z.dtype(), rows * vocab)?;
    if rows == 0 || vocab == 0 {
        return Ok(dz);
    }
    if reference {
        // token_nll_bwd_ref_T(const T* z, const i64* y, const float* lse, const T* g, T* dz, u64 rows, u64 cols, i64 c0)
        let args = [z.arg(), targets.arg(), lse.arg(), g.arg(), dz.arg(), Arg::U64(rows as u64), Arg::U64(vocab as u64), Arg::I64(0)];
        launch(&z.dev, M, &format!("token_nll_bwd_ref_{}", z.sfx()), super::device::grid_1d(rows * vocab, 256), &args)?;
    } else {
        // token_nll_bwd_T(const T* z, const i64* y, const float* lse, const T* g, T* dz, u64 cols, i64 c0)
        let args = [z.arg(), targets.arg(), lse.arg(), g.arg(), dz.arg(), Arg::U64(vocab as u64), Arg::I64(0)];
        launch(&z.dev, M, &format!("token_nll_bwd_{}", z.sfx()), rows_cfg(rows), &args)?;
    }
    Ok(dz)
}

/// dlogits = g·(softmax(z) − onehot(y)) per row (0 for ignored rows).
pub fn token_nll_backward(z: &CudaStorage, targets: &CudaStorage, lse: &CudaStorage, g: &CudaStorage, vocab: usize) -> Result<CudaStorage> {
    nll_backward(z, targets, lse, g, vocab, false)
}

/// [`token_nll_backward`] by the reference kernel (one thread per element).
pub fn token_nll_backward_reference(
    z: &CudaStorage,
    targets: &CudaStorage,
    lse: &CudaStorage,
    g: &CudaStorage,
    vocab: usize,
) -> Result<CudaStorage> {
    nll_backward(z, targets, lse, g, vocab, true)
}

fn check_kl(op: &'static str, z: &CudaStorage, r: &CudaStorage, vocab: usize) -> Result<usize> {
    z.float_op(op, &[r])?;
    if z.len() != r.len() || vocab == 0 || z.len() % vocab != 0 {
        return Err(Error::Input(format!("{op}: {} logits and {} reference logits for vocabulary {vocab}", z.len(), r.len())));
    }
    let rows = z.len() / vocab;
    check_rows(op, rows)?;
    Ok(rows)
}

fn kl_forward(z: &CudaStorage, r: &CudaStorage, vocab: usize, reference: bool) -> Result<CudaStorage> {
    let rows = if z.is_empty() { 0 } else { check_kl("kl_rows", z, r, vocab)? };
    let kl = CudaStorage::alloc_out(&z.dev, z.dtype(), rows)?;
    if rows == 0 {
        return Ok(kl);
    }
    if reference {
        // kl_fwd_ref_T(const T* z, const T* r, T* kl, u64 rows, u64 vocab)
        let args = [z.arg(), r.arg(), kl.arg(), Arg::U64(rows as u64), Arg::U64(vocab as u64)];
        launch(&z.dev, M, &format!("kl_fwd_ref_{}", z.sfx()), super::device::grid_1d(rows, 64), &args)?;
    } else {
        // kl_fwd_T(const T* z, const T* r, T* kl, u64 vocab)
        let args = [z.arg(), r.arg(), kl.arg(), Arg::U64(vocab as u64)];
        launch(&z.dev, M, &format!("kl_fwd_{}", z.sfx()), rows_cfg(rows), &args)?;
    }
    Ok(kl)
}

/// Per-row KL(softmax(z) ‖ softmax(r)) of [rows, vocab] logits, in z's dtype.
pub fn kl_rows(z: &CudaStorage, r: &CudaStorage, vocab: usize) -> Result<CudaStorage> {
    kl_forward(z, r, vocab, false)
}

/// [`kl_rows`] by the reference kernel (one thread per row).
pub fn kl_rows_reference(z: &CudaStorage, r: &CudaStorage, vocab: usize) -> Result<CudaStorage> {
    kl_forward(z, r, vocab, true)
}

fn kl_backward(z: &CudaStorage, r: &CudaStorage, g: &CudaStorage, vocab: usize, reference: bool) -> Result<CudaStorage> {
    let rows = if z.is_empty() { 0 } else { check_kl("kl_rows backward", z, r, vocab)? };
    z.float_op("kl_rows backward", &[g])?;
    if g.len() != rows {
        return Err(Error::Input(format!("kl_rows backward: {} upstream gradients for {rows} rows", g.len())));
    }
    let dz = CudaStorage::alloc_out(&z.dev, z.dtype(), z.len())?;
    if rows == 0 {
        return Ok(dz);
    }
    if reference {
        // kl_bwd_ref_T(const T* z, const T* r, const T* g, T* dz, u64 rows, u64 vocab)
        let args = [z.arg(), r.arg(), g.arg(), dz.arg(), Arg::U64(rows as u64), Arg::U64(vocab as u64)];
        launch(&z.dev, M, &format!("kl_bwd_ref_{}", z.sfx()), super::device::grid_1d(rows, 64), &args)?;
    } else {
        // kl_bwd_T(const T* z, const T* r, const T* g, T* dz, u64 vocab)
        let args = [z.arg(), r.arg(), g.arg(), dz.arg(), Arg::U64(vocab as u64)];
        launch(&z.dev, M, &format!("kl_bwd_{}", z.sfx()), rows_cfg(rows), &args)?;
    }
    Ok(dz)
}

/// dz of [`kl_rows`] for upstream gradients `g` per row.
pub fn kl_rows_backward(z: &CudaStorage, r: &CudaStorage, g: &CudaStorage, vocab: usize) -> Result<CudaStorage> {
    kl_backward(z, r, g, vocab, false)
}

/// [`kl_rows_backward`] by the reference kernel (one thread per row).
pub fn kl_rows_backward_reference(z: &CudaStorage, r: &CudaStorage, g: &CudaStorage, vocab: usize) -> Result<CudaStorage> {
    kl_backward(z, r, g, vocab, true)
}

// ------------------------------------------------------------------ fused linear cross-entropy

/// Checks h [rows, d], W [vocab, d], I64 targets [rows]; returns rows.
fn check_lce(h: &CudaStorage, w: &CudaStorage, targets: &CudaStorage, d: usize, vocab: usize) -> Result<usize> {
    let op = "linear_cross_entropy";
    h.float_op(op, &[w])?;
    h.same_device(targets, op)?;
    if targets.dtype() != DType::I64 {
        return Err(Error::dtype(op, format!("targets must be I64, got {}", targets.dtype())));
    }
    let rows = targets.len();
    if h.len() != rows * d || w.len() != vocab * d {
        return Err(Error::Input(format!("{op}: hidden has {} values for {rows}×{d}, weight {} for {vocab}×{d}", h.len(), w.len())));
    }
    check_rows(op, rows)?;
    Ok(rows)
}

fn elem_offset(s: &CudaStorage, elems: usize) -> u64 {
    s.ptr() + (elems * s.dtype().size_in_bytes()) as u64
}

/// The chunk's logits `buf[rows, cols] = h · W[c0..c0+cols]ᵀ`.
fn chunk_logits(h: &CudaStorage, w: &CudaStorage, buf: &CudaStorage, rows: usize, d: usize, c0: usize, cols: usize) -> Result<()> {
    let g = Gemm::new(rows, cols, d, false, true);
    gemm_raw(&h.dev, h.dtype(), h.ptr(), elem_offset(w, c0 * d), buf.ptr(), &g)
}

/// Fused `nll[r] = CE(h[r]·Wᵀ, y[r])` over vocabulary chunks of `chunk` columns: returns nll (h's
/// dtype) and lse (F32) per row. The logits of each chunk are rounded to h's dtype, as the unfused
/// `linear` + `token_nll` would round them.
pub fn linear_ce_forward(
    h: &CudaStorage,
    w: &CudaStorage,
    targets: &CudaStorage,
    d: usize,
    vocab: usize,
    chunk: usize,
) -> Result<(CudaStorage, CudaStorage)> {
    let rows = check_lce(h, w, targets, d, vocab)?;
    let dev = &h.dev;
    let nll = CudaStorage::alloc_out(dev, h.dtype(), rows)?;
    let lse = CudaStorage::alloc_out(dev, DType::F32, rows)?;
    if rows == 0 {
        return Ok((nll, lse));
    }
    if vocab == 0 {
        return Err(Error::Input("linear_cross_entropy: empty vocabulary".into()));
    }
    let chunk = chunk.clamp(1, vocab);
    // Running max, Σexp and target logit per row.
    let state = CudaStorage::zeros_on(dev, DType::F32, 3 * rows)?;
    let buf = CudaStorage::alloc_out(dev, h.dtype(), rows * chunk)?;
    let kernel = format!("lce_chunk_fwd_{}", h.sfx());
    for c0 in (0..vocab).step_by(chunk) {
        let cols = chunk.min(vocab - c0);
        chunk_logits(h, w, &buf, rows, d, c0, cols)?;
        // lce_chunk_fwd_T(const T* logits, const i64* y, float* state, u64 rows, u64 cols, i64 c0, int first)
        let args = [
            buf.arg(),
            targets.arg(),
            state.arg(),
            Arg::U64(rows as u64),
            Arg::U64(cols as u64),
            Arg::I64(c0 as i64),
            Arg::I32((c0 == 0) as i32),
        ];
        launch(dev, M, &kernel, rows_cfg(rows), &args)?;
    }
    // lce_finish_T(const float* state, const i64* y, T* nll, float* lse, u64 rows)
    let args = [state.arg(), targets.arg(), nll.arg(), lse.arg(), Arg::U64(rows as u64)];
    launch(dev, M, &format!("lce_finish_{}", h.sfx()), super::device::grid_1d(rows, 256), &args)?;
    Ok((nll, lse))
}

/// Gradients of [`linear_ce_forward`] for upstream `g` per row (h's dtype): `(dh, dW)`, each only
/// when asked for.
#[allow(clippy::too_many_arguments)]
pub fn linear_ce_backward(
    h: &CudaStorage,
    w: &CudaStorage,
    targets: &CudaStorage,
    lse: &CudaStorage,
    g: &CudaStorage,
    d: usize,
    vocab: usize,
    chunk: usize,
    need_dh: bool,
    need_dw: bool,
) -> Result<(Option<CudaStorage>, Option<CudaStorage>)> {
    let op = "linear_cross_entropy backward";
    let rows = check_lce(h, w, targets, d, vocab)?;
    h.float_op(op, &[g])?;
    if g.len() != rows {
        return Err(Error::Input(format!("{op}: {} upstream gradients for {rows} rows", g.len())));
    }
    h.same_device(lse, op)?;
    let lse = lse_f32(lse, rows, op)?;
    let dev = &h.dev;
    let dt = h.dtype();
    if rows == 0 || vocab == 0 || d == 0 {
        let dh = if need_dh { Some(CudaStorage::zeros_on(dev, dt, rows * d)?) } else { None };
        let dw = if need_dw { Some(CudaStorage::zeros_on(dev, dt, vocab * d)?) } else { None };
        return Ok((dh, dw));
    }
    let chunk = chunk.clamp(1, vocab);
    let buf = CudaStorage::alloc_out(dev, dt, rows * chunk)?;
    // d hidden: accumulated straight into the F32 output, or through an F32 accumulator for bf16/f16.
    let (dh, acc, tmp) = match (need_dh, dt) {
        (false, _) => (None, None, None),
        (true, DType::F32) => (Some(CudaStorage::alloc_out(dev, dt, rows * d)?), None, None),
        (true, _) => (None, Some(CudaStorage::alloc_out(dev, DType::F32, rows * d)?), Some(CudaStorage::alloc_out(dev, dt, rows * d)?)),
    };
    let dw = if need_dw { Some(CudaStorage::alloc_out(dev, dt, vocab * d)?) } else { None };
    let bwd = format!("token_nll_bwd_{}", h.sfx());
    let accum = format!("lce_accum_{}", h.sfx());
    for c0 in (0..vocab).step_by(chunk) {
        let cols = chunk.min(vocab - c0);
        let first = c0 == 0;
        chunk_logits(h, w, &buf, rows, d, c0, cols)?;
        // In place: buf = g·(softmax − onehot) over columns [c0, c0+cols).
        // token_nll_bwd_T(const T* z, const i64* y, const float* lse, const T* g, T* dz, u64 cols, i64 c0)
        let args = [buf.arg(), targets.arg(), lse.arg(), g.arg(), buf.arg(), Arg::U64(cols as u64), Arg::I64(c0 as i64)];
        launch(dev, M, &bwd, rows_cfg(rows), &args)?;
        // dh (+)= dz[rows, cols] · W_c[cols, d]
        let mut gd = Gemm::new(rows, d, cols, false, false);
        if let Some(dh) = &dh {
            gd.beta = if first { 0.0 } else { 1.0 };
            gemm_raw(dev, dt, buf.ptr(), elem_offset(w, c0 * d), dh.ptr(), &gd)?;
        } else if let (Some(acc), Some(tmp)) = (&acc, &tmp) {
            gemm_raw(dev, dt, buf.ptr(), elem_offset(w, c0 * d), tmp.ptr(), &gd)?;
            // lce_accum_T(float* acc, const T* x, u64 n, int first)
            let n = rows * d;
            let args = [acc.arg(), tmp.arg(), Arg::U64(n as u64), Arg::I32(first as i32)];
            launch(dev, M, &accum, super::device::grid_1d(n.min(1 << 22), 256), &args)?;
        }
        // dW[c0..c0+cols] = dzᵀ[cols, rows] · h[rows, d]
        if let Some(dw) = &dw {
            let gw = Gemm::new(cols, d, rows, true, false);
            gemm_raw(dev, dt, buf.ptr(), h.ptr(), elem_offset(dw, c0 * d), &gw)?;
        }
    }
    let dh = match (dh, acc) {
        (Some(dh), _) => Some(dh),
        (None, Some(acc)) => {
            let n = rows * d;
            let out = CudaStorage::alloc_out(dev, dt, n)?;
            // lce_store_T(T* out, const float* acc, u64 n)
            let args = [out.arg(), acc.arg(), Arg::U64(n as u64)];
            launch(dev, M, &format!("lce_store_{}", h.sfx()), super::device::grid_1d(n.min(1 << 22), 256), &args)?;
            Some(out)
        }
        (None, None) => None,
    };
    Ok((dh, dw))
}

// ------------------------------------------------------------------ parity

/// Parity: token_nll forward/backward and kl_rows forward/backward (fast and reference kernels)
/// against the CPU backend for f32 and bf16 logits, vocabularies 49152, 1000 and 32001 (rows not
/// 16-byte aligned), 1..300 rows with some ignored targets; the fused linear cross-entropy forward
/// and both gradients against the unfused CPU `linear` + `token_nll`, with several chunks and a
/// ragged last chunk.
pub fn parity(p: &mut super::parity::Parity) -> Result<()> {
    use crate::ops;
    use crate::tensor::Tensor;
    use crate::Device;

    use super::parity::{cuda_of as cuda, wrap};
    // Targets in 0..vocab with every 7th (and the first when rows > 1) ignored.
    fn targets(p: &mut super::parity::Parity, rows: usize, vocab: usize) -> Result<Tensor> {
        let ids = p.ids(&[rows], vocab as u64)?.to_vec::<u32>()?;
        let v: Vec<i64> =
            ids.iter().enumerate().map(|(i, &y)| if (i % 7 == 3) || (i == 0 && rows > 1) { -100 } else { y as i64 }).collect();
        Tensor::from_vec(v, &[rows], Device::Cpu)
    }

    for dtype in [DType::F32, DType::BF16] {
        for (rows, vocab) in [(1usize, 49152usize), (37, 49152), (300, 1000), (5, 32001), (64, 32001), (3, 7)] {
            let case = format!("{rows}x{vocab}");
            let z = p.randn(&[rows, vocab], dtype, 3.0)?;
            // The CPU reference in f64: its running f32 sums drift by ~5e-5 in lse over 49k terms.
            let zc = z.to_dtype(DType::F64)?;
            let y = targets(p, rows, vocab)?;
            let g = p.randn(&[rows], dtype, 1.0)?;
            let gc = g.to_dtype(DType::F64)?;
            // CPU reference through the op layer (forward and backward).
            let zl = zc.requires_grad();
            let nll_cpu = ops::token_nll(&zl, &y)?;
            let dz_cpu = ops::sum(&ops::mul(&nll_cpu, &gc)?)?.backward()?.get(&zl).cloned().ok_or_else(|| Error::Input("no dz".into()))?;
            let lse_cpu = {
                let (_, l) = zc.contiguous_storage()?.token_nll(&*y.contiguous_storage()?, vocab)?;
                Tensor::from_storage(l, &[rows])?
            };
            // The op layer on the device (fast kernels); the backward directly on the backend (and
            // once through autograd, below, for the whole path).
            let yg = p.gpu(&y)?;
            let (zs, ys, gs) = (cuda(&p.gpu(&z)?)?, cuda(&yg)?, cuda(&p.gpu(&g)?)?);
            match ops::token_nll(&p.gpu(&z)?, &yg) {
                Ok(n) => p.check("cross_entropy/token_nll fwd", &case, &nll_cpu, &n),
                Err(e) => p.fail("cross_entropy/token_nll fwd", &case, dtype, &e),
            }
            match token_nll(&zs, &ys, vocab) {
                Ok((_, l)) => {
                    p.check_tol("cross_entropy/token_nll lse", &case, &lse_cpu, &wrap(l.try_clone()?, &[rows])?, 2e-5);
                    match token_nll_backward(&zs, &ys, &l, &gs, vocab) {
                        Ok(d) => p.check("cross_entropy/token_nll bwd", &case, &dz_cpu, &wrap(d, &[rows, vocab])?),
                        Err(e) => p.fail("cross_entropy/token_nll bwd", &case, dtype, &e),
                    }
                }
                Err(e) => p.fail("cross_entropy/token_nll lse", &case, dtype, &e),
            }
            if rows == 37 {
                let zg = p.gpu(&z)?.requires_grad();
                let r = ops::token_nll(&zg, &yg).and_then(|n| ops::sum(&ops::mul(&n, &p.gpu(&g)?)?)).and_then(|l| l.backward());
                match r.map(|gr| gr.get(&zg).cloned()) {
                    Ok(Some(d)) => p.check("cross_entropy/token_nll autograd", &case, &dz_cpu, &d),
                    Ok(None) => p.fail("cross_entropy/token_nll autograd", &case, dtype, &Error::Input("no gradient".into())),
                    Err(e) => p.fail("cross_entropy/token_nll autograd", &case, dtype, &e),
                }
            }
            // The reference kernels.
            match token_nll_reference(&zs, &ys, vocab) {
                Ok((n, l)) => {
                    p.check("cross_entropy/token_nll fwd ref", &case, &nll_cpu, &wrap(n, &[rows])?);
                    p.check_tol("cross_entropy/token_nll lse ref", &case, &lse_cpu, &wrap(l.try_clone()?, &[rows])?, 2e-5);
                    match token_nll_backward_reference(&zs, &ys, &l, &gs, vocab) {
                        Ok(d) => p.check("cross_entropy/token_nll bwd ref", &case, &dz_cpu, &wrap(d, &[rows, vocab])?),
                        Err(e) => p.fail("cross_entropy/token_nll bwd ref", &case, dtype, &e),
                    }
                }
                Err(e) => p.fail("cross_entropy/token_nll fwd ref", &case, dtype, &e),
            }

            // KL against a reference row set.
            let r = p.randn(&[rows, vocab], dtype, 2.0)?;
            let rc = r.to_dtype(DType::F64)?;
            let zl = zc.requires_grad();
            let kl_cpu = ops::token_kl(&zl, &rc)?;
            let dkl_cpu = ops::sum(&ops::mul(&kl_cpu, &gc)?)?.backward()?.get(&zl).cloned().ok_or_else(|| Error::Input("no dz".into()))?;
            let rs = cuda(&p.gpu(&r)?)?;
            match ops::token_kl(&p.gpu(&z)?, &p.gpu(&r)?) {
                Ok(k) => p.check("cross_entropy/kl fwd", &case, &kl_cpu, &k),
                Err(e) => p.fail("cross_entropy/kl fwd", &case, dtype, &e),
            }
            match kl_rows_backward(&zs, &rs, &gs, vocab) {
                Ok(d) => p.check("cross_entropy/kl bwd", &case, &dkl_cpu, &wrap(d, &[rows, vocab])?),
                Err(e) => p.fail("cross_entropy/kl bwd", &case, dtype, &e),
            }
            match kl_rows_reference(&zs, &rs, vocab) {
                Ok(k) => p.check("cross_entropy/kl fwd ref", &case, &kl_cpu, &wrap(k, &[rows])?),
                Err(e) => p.fail("cross_entropy/kl fwd ref", &case, dtype, &e),
            }
            match kl_rows_backward_reference(&zs, &rs, &gs, vocab) {
                Ok(d) => p.check("cross_entropy/kl bwd ref", &case, &dkl_cpu, &wrap(d, &[rows, vocab])?),
                Err(e) => p.fail("cross_entropy/kl bwd ref", &case, dtype, &e),
            }
        }

        // Fused linear cross-entropy vs the unfused CPU linear + token_nll (f64 on the rounded inputs).
        for (rows, d, vocab, chunk) in
            [(37usize, 64usize, 1000usize, 256usize), (130, 96, 32001, 4096), (300, 64, 49152, 8192), (1, 40, 515, 515), (16, 128, 5000, 7)]
        {
            let case = format!("{rows}x{d}, V={vocab}, chunk {chunk}");
            let h = p.randn(&[rows, d], dtype, 1.0)?;
            let w = p.randn(&[vocab, d], dtype, 0.3)?;
            let y = targets(p, rows, vocab)?;
            let g = p.randn(&[rows], dtype, 1.0)?;
            let (hc, wc, gc) = (h.to_dtype(DType::F64)?.requires_grad(), w.to_dtype(DType::F64)?.requires_grad(), g.to_dtype(DType::F64)?);
            let nll_cpu = ops::token_nll(&ops::linear(&hc, &wc, None)?, &y)?;
            let gr = ops::sum(&ops::mul(&nll_cpu, &gc)?)?.backward()?;
            let (dh_cpu, dw_cpu) = (gr.get(&hc).cloned(), gr.get(&wc).cloned());
            let tol = super::parity::tolerance(dtype);
            let (hs, ws, ys, gs) = (cuda(&p.gpu(&h)?)?, cuda(&p.gpu(&w)?)?, cuda(&p.gpu(&y)?)?, cuda(&p.gpu(&g)?)?);
            match ops::linear_cross_entropy_chunked(&p.gpu(&h)?, &p.gpu(&w)?, &p.gpu(&y)?, chunk) {
                Ok(n) => p.check_tol("cross_entropy/linear_ce fwd", &case, &nll_cpu, &n, tol),
                Err(e) => p.fail("cross_entropy/linear_ce fwd", &case, dtype, &e),
            }
            let r = linear_ce_forward(&hs, &ws, &ys, d, vocab, chunk)
                .and_then(|(_, l)| linear_ce_backward(&hs, &ws, &ys, &l, &gs, d, vocab, chunk, true, true));
            match r {
                Ok((Some(dh), Some(dw))) => {
                    for (name, cpu, gpu, shape) in [("dh", &dh_cpu, dh, [rows, d]), ("dW", &dw_cpu, dw, [vocab, d])] {
                        let k = format!("cross_entropy/linear_ce bwd {name}");
                        match cpu {
                            Some(c) => p.check_tol(&k, &case, c, &wrap(gpu, &shape)?, tol),
                            None => p.fail(&k, &case, dtype, &Error::Input("no CPU gradient".into())),
                        }
                    }
                }
                Ok(_) => p.fail("cross_entropy/linear_ce bwd", &case, dtype, &Error::Input("missing gradient".into())),
                Err(e) => p.fail("cross_entropy/linear_ce bwd", &case, dtype, &e),
            }
            // Once per dtype through autograd (the whole path), with a frozen weight: d hidden only.
            if rows == 37 {
                let hg = p.gpu(&h)?.requires_grad();
                let r = ops::linear_cross_entropy_chunked(&hg, &p.gpu(&w)?, &p.gpu(&y)?, chunk)
                    .and_then(|n| ops::sum(&ops::mul(&n, &p.gpu(&g)?)?))
                    .and_then(|l| l.backward());
                match (r.map(|gr| gr.get(&hg).cloned()), &dh_cpu) {
                    (Ok(Some(dh)), Some(c)) => p.check_tol("cross_entropy/linear_ce autograd dh", &case, c, &dh, tol),
                    (Err(e), _) => p.fail("cross_entropy/linear_ce autograd dh", &case, dtype, &e),
                    _ => p.fail("cross_entropy/linear_ce autograd dh", &case, dtype, &Error::Input("missing gradient".into())),
                }
            }
        }
    }
    Ok(())
}
