//! Dense GEMMs through cuBLASLt: `C = α·op(A)·op(B) + β·C` on row-major operands, f32 inputs with
//! f32 compute (no TF32, so f32 results match the CPU backend to rounding), bf16/f16 inputs with f32
//! accumulation, f64 with f64 compute.
//!
//! cuBLASLt is column-major; a row-major `C[m,n]` is the column-major `Cᵀ[n,m] = op(B)ᵀ·op(A)ᵀ`, so
//! the operands are swapped and each stored matrix is described by its column-major shape.

use super::{device::cuda_err, CudaDevice, CudaStorage};
use crate::backend::{BackendStorage, MatmulParams};
use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::cublaslt::{result as lt, sys, MatmulShared};
use std::ffi::c_void;

/// One (batched, strided) row-major GEMM on raw device pointers.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// A is stored `[k, m]` (and used transposed) instead of `[m, k]`.
    pub trans_a: bool,
    /// B is stored `[n, k]` instead of `[k, n]`.
    pub trans_b: bool,
    /// Row strides (elements) of the stored A, B and C.
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub batch: usize,
    /// Element strides between batch entries (`stride_b = 0` broadcasts one B).
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    pub alpha: f32,
    /// `1.0` accumulates into C.
    pub beta: f32,
}

impl Gemm {
    /// A single contiguous `C[m,n] = op(A)·op(B)`.
    pub fn new(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Gemm {
        Gemm {
            m,
            n,
            k,
            trans_a,
            trans_b,
            lda: if trans_a { m } else { k },
            ldb: if trans_b { k } else { n },
            ldc: n,
            batch: 1,
            stride_a: m * k,
            stride_b: k * n,
            stride_c: m * n,
            alpha: 1.0,
            beta: 0.0,
        }
    }
}

/// What a cuBLASLt plan depends on: everything in [`Gemm`] but the scalars, and whether C is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PlanKey {
    dtype: DType,
    shape: [usize; 10],
    trans: (bool, bool),
    accumulate: bool,
}

impl PlanKey {
    fn of(dtype: DType, g: &Gemm) -> PlanKey {
        PlanKey { dtype, shape: [g.m, g.n, g.k, g.lda, g.ldb, g.ldc, g.batch, g.stride_a, g.stride_b, g.stride_c], trans: (g.trans_a, g.trans_b), accumulate: g.beta != 0.0 }
    }
}

/// A GEMM shape's cuBLASLt descriptors and the algorithm the heuristic chose for them. Built on a
/// shape's first call and kept by the device: a training step repeats the same few dozen shapes,
/// and building the descriptors plus asking the heuristic costs more host time than a small GEMM.
pub(crate) struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    pref: sys::cublasLtMatmulPreference_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

// SAFETY: the descriptors are never modified after `Plan::new`; cuBLASLt only reads them, and
// every matmul using them is issued on the device's one stream.
unsafe impl Send for Plan {}
unsafe impl Sync for Plan {}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created in `Plan::new` and is destroyed exactly once.
        unsafe {
            for l in self.layouts {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
            if !self.desc.is_null() {
                let _ = lt::destroy_matmul_desc(self.desc);
            }
            if !self.pref.is_null() {
                let _ = lt::destroy_matmul_pref(self.pref);
            }
        }
    }
}

fn types(dtype: DType) -> Result<(sys::cudaDataType_t, sys::cublasComputeType_t, sys::cudaDataType_t)> {
    use sys::cublasComputeType_t::*;
    use sys::cudaDataType_t::*;
    Ok(match dtype {
        DType::F32 => (CUDA_R_32F, CUBLAS_COMPUTE_32F, CUDA_R_32F),
        DType::BF16 => (CUDA_R_16BF, CUBLAS_COMPUTE_32F, CUDA_R_32F),
        DType::F16 => (CUDA_R_16F, CUBLAS_COMPUTE_32F, CUDA_R_32F),
        DType::F64 => (CUDA_R_64F, CUBLAS_COMPUTE_64F, CUDA_R_64F),
        d => return Err(Error::dtype("matmul", format!("CUDA GEMMs take float tensors, got {d}"))),
    })
}

fn lt_err(what: &'static str) -> impl FnOnce(cudarc::cublaslt::result::CublasError) -> Error {
    move |e| Error::Unsupported(format!("cuBLASLt {what}: {e:?}"))
}

impl Plan {
    fn new(dev: &CudaDevice, dtype: DType, g: &Gemm) -> Result<Plan> {
        let (data_ty, compute, scale_ty) = types(dtype)?;
        let err = lt_err;
        // Column-major description of the stored operands (see the module comment).
        let (a_rows, a_cols) = if g.trans_b { (g.k, g.n) } else { (g.n, g.k) };
        let (b_rows, b_cols) = if g.trans_a { (g.m, g.k) } else { (g.k, g.m) };
        // SAFETY (zeroed algo): a plain array of integers, overwritten by the heuristic's choice below.
        let mut h = Plan { desc: std::ptr::null_mut(), layouts: [std::ptr::null_mut(); 3], pref: std::ptr::null_mut(), algo: unsafe { std::mem::zeroed() } };
        h.layouts[0] = lt::create_matrix_layout(data_ty, a_rows as u64, a_cols as u64, g.ldb as i64).map_err(err("layout"))?;
        h.layouts[1] = lt::create_matrix_layout(data_ty, b_rows as u64, b_cols as u64, g.lda as i64).map_err(err("layout"))?;
        h.layouts[2] = lt::create_matrix_layout(data_ty, g.n as u64, g.m as u64, g.ldc as i64).map_err(err("layout"))?;
        if g.batch > 1 {
            let count = g.batch as i32;
            for (l, stride) in h.layouts.iter().zip([g.stride_b, g.stride_a, g.stride_c]) {
                let stride = stride as i64;
                // SAFETY: attribute buffers are plain values of the documented types (i32, i64).
                unsafe {
                    lt::set_matrix_layout_attribute(*l, sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count as *const i32 as *const c_void, 4)
                        .map_err(err("batch count"))?;
                    lt::set_matrix_layout_attribute(*l, sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride as *const i64 as *const c_void, 8)
                        .map_err(err("batch stride"))?;
                }
            }
        }
        h.desc = lt::create_matmul_desc(compute, scale_ty).map_err(err("descriptor"))?;
        // cublasOperation_t: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1.
        let op = |t: bool| -> i32 {
            if t {
                1
            } else {
                0
            }
        };
        let (op_a, op_b) = (op(g.trans_b), op(g.trans_a));
        // SAFETY: as above.
        unsafe {
            lt::set_matmul_desc_attribute(h.desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &op_a as *const _ as *const c_void, std::mem::size_of_val(&op_a))
                .map_err(err("transa"))?;
            lt::set_matmul_desc_attribute(h.desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &op_b as *const _ as *const c_void, std::mem::size_of_val(&op_b))
                .map_err(err("transb"))?;
        }
        h.pref = lt::create_matmul_pref().map_err(err("preference"))?;
        let ws_size = super::device::LT_WORKSPACE as u64;
        // SAFETY: as above.
        unsafe {
            lt::set_matmul_pref_attribute(h.pref, sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_size as *const u64 as *const c_void, 8)
                .map_err(err("workspace"))?;
        }
        let handle = *dev.blaslt()?.handle();
        // SAFETY: all descriptors are valid.
        let heur = unsafe { lt::get_matmul_algo_heuristic(handle, h.desc, h.layouts[0], h.layouts[1], h.layouts[2], h.layouts[2], h.pref) }.map_err(err("no algorithm"))?;
        h.algo = heur.algo;
        Ok(h)
    }
}

/// The device's plan for `g` on `dtype`, built on first use.
fn plan(dev: &CudaDevice, dtype: DType, g: &Gemm) -> Result<std::sync::Arc<Plan>> {
    let key = PlanKey::of(dtype, g);
    let mut plans = dev.gemm_plans.lock().map_err(|_| Error::Unsupported("cuBLASLt plan table poisoned".into()))?;
    if let Some(p) = plans.get(&key) {
        return Ok(p.clone());
    }
    let p = std::sync::Arc::new(Plan::new(dev, dtype, g)?);
    plans.insert(key, p.clone());
    Ok(p)
}

/// Runs `g` on pointers into buffers of `dtype` on `dev`. The caller guarantees the buffers cover
/// every element the strides address.
pub fn gemm_raw(dev: &CudaDevice, dtype: DType, a: u64, b: u64, c: u64, g: &Gemm) -> Result<()> {
    if g.m == 0 || g.n == 0 || g.batch == 0 {
        return Ok(());
    }
    types(dtype)?;
    if g.k == 0 {
        // C = β·C: nothing to multiply.
        if g.beta == 0.0 {
            let bytes = g.batch.max(1) * g.stride_c.max(g.m * g.ldc) * dtype.size_in_bytes();
            // SAFETY: C covers these bytes by the caller's contract.
            unsafe { cudarc::driver::result::memset_d8_async(c, 0, bytes, dev.stream.cu_stream()) }.map_err(cuda_err("zeroing a GEMM output"))?;
        }
        return Ok(());
    }
    let h = plan(dev, dtype, g)?;
    let ws = dev.lt_workspace()?;
    let handle = *dev.blaslt()?.handle();
    super::device::count_launch();
    let (alpha64, beta64) = (g.alpha as f64, g.beta as f64);
    let (pa, pb): (*const c_void, *const c_void) = if dtype == DType::F64 {
        (&alpha64 as *const f64 as *const c_void, &beta64 as *const f64 as *const c_void)
    } else {
        (&g.alpha as *const f32 as *const c_void, &g.beta as *const f32 as *const c_void)
    };
    // SAFETY: the plan's descriptors are valid; pointers cover the described matrices (caller's contract).
    unsafe {
        lt::matmul(
            handle,
            h.desc,
            pa,
            pb,
            b as *const c_void,
            h.layouts[0],
            a as *const c_void,
            h.layouts[1],
            c as *const c_void,
            h.layouts[2],
            c as *mut c_void,
            h.layouts[2],
            &h.algo,
            ws as *mut c_void,
            super::device::LT_WORKSPACE,
            dev.stream.cu_stream() as *mut _,
        )
        .map_err(lt_err("matmul"))?;
    }
    Ok(())
}

/// The backend's `matmul`: `C[b] = op(A[b])·op(B[b])` with B broadcast unless `b_batched`.
pub fn matmul(a: &CudaStorage, b: &CudaStorage, p: &MatmulParams) -> Result<CudaStorage> {
    if a.dtype() != b.dtype() {
        return Err(Error::dtype("matmul", format!("operands disagree: {} and {}", a.dtype(), b.dtype())));
    }
    a.same_device(b, "matmul")?;
    let out = CudaStorage::alloc_out(&a.dev, a.dtype(), p.batch * p.m * p.n)?;
    let mut g = Gemm::new(p.m, p.n, p.k, p.trans_a, p.trans_b);
    if !p.b_batched && !p.trans_a {
        // One B for every batch entry and A rows contiguous: a single [batch·m, k] GEMM.
        g.m = p.batch * p.m;
        g.stride_c = g.m * p.n;
    } else {
        g.batch = p.batch;
        if !p.b_batched {
            g.stride_b = 0;
        }
    }
    gemm_raw(&a.dev, a.dtype(), a.ptr(), b.ptr(), out.ptr(), &g)?;
    Ok(out)
}

/// Parity: every transpose combination, a broadcast B, a batched B, odd sizes; f32 and bf16.
pub fn parity(p: &mut super::parity::Parity) -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        for (m, n, k, ta, tb) in [(37, 53, 61, false, false), (64, 48, 96, true, false), (33, 70, 29, false, true), (128, 96, 160, true, true)] {
            let a = p.randn(&if ta { [k, m] } else { [m, k] }, dtype, 1.0)?;
            let b = p.randn(&if tb { [n, k] } else { [k, n] }, dtype, 1.0)?;
            let cpu = crate::ops::matmul(&a.to_dtype(DType::F32)?, &b.to_dtype(DType::F32)?, ta, tb)?;
            let case = format!("{m}x{n}x{k} ta={ta} tb={tb}");
            match crate::ops::matmul(&p.gpu(&a)?, &p.gpu(&b)?, ta, tb) {
                Ok(g) => p.check("gemm/matmul", &case, &cpu, &g),
                Err(e) => p.fail("gemm/matmul", &case, dtype, &e),
            }
        }
        // Batched A against one B (a linear layer over [batch, seq, in]) and batched B.
        let a = p.randn(&[3, 17, 40], dtype, 1.0)?;
        let b = p.randn(&[40, 24], dtype, 1.0)?;
        let cpu = crate::ops::matmul(&a.to_dtype(DType::F32)?, &b.to_dtype(DType::F32)?, false, false)?;
        match crate::ops::matmul(&p.gpu(&a)?, &p.gpu(&b)?, false, false) {
            Ok(g) => p.check("gemm/matmul", "3x17x40 · 40x24 (broadcast B)", &cpu, &g),
            Err(e) => p.fail("gemm/matmul", "broadcast B", dtype, &e),
        }
        let b3 = p.randn(&[3, 24, 40], dtype, 1.0)?;
        let cpu = crate::ops::matmul(&a.to_dtype(DType::F32)?, &b3.to_dtype(DType::F32)?, false, true)?;
        match crate::ops::matmul(&p.gpu(&a)?, &p.gpu(&b3)?, false, true) {
            Ok(g) => p.check("gemm/matmul", "3x17x40 · 3x(24x40)ᵀ (batched B)", &cpu, &g),
            Err(e) => p.fail("gemm/matmul", "batched B", dtype, &e),
        }
    }
    Ok(())
}
