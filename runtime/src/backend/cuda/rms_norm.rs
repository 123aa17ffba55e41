//! RMSNorm on the GPU (`kernels/cuda/rms_norm.cu`), forward and backward.
//!
//! y = x · r · w with r = 1/sqrt(mean(x²) + eps) per row of `dim`; dx = r·(dy∘w) − x·r³/dim·Σ(dy∘w∘x),
//! dw = Σ_rows dy∘x·r. The saved statistic `rstd` is F32 on the GPU for every input dtype: the op
//! layer (`ops::rms_norm`) only hands it back to [`backward`], so full precision costs nothing.
//! dw is reduced over rows deterministically (per-chunk partial sums in F32 scratch, then a fixed-order
//! sum over chunks): no float atomics, the same bits on every run.

use super::{launch, Arg, CudaStorage};
use crate::backend::BackendStorage;
use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::driver::LaunchConfig;

/// Rows (warps) per block of the warp-per-row kernels (`RMS_WARPS` in the .cu).
const WARPS: usize = 4;
/// Threads per block of `rms_norm_bwd_dw_partial` (`DW_THREADS` in the .cu).
const DW_THREADS: usize = 256;
/// At most this many row chunks in the dw reduction (grid.y and the scratch's rows).
const MAX_CHUNKS: usize = 1024;

fn cfg(blocks: usize, threads: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks.max(1) as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 }
}

/// Shape checks shared by both directions; returns the number of rows.
fn rows_of(x: &CudaStorage, w: &CudaStorage, dim: usize) -> Result<usize> {
    x.float_op("rms_norm", &[w])?;
    if dim == 0 || w.len() != dim || !x.len().is_multiple_of(dim) {
        return Err(Error::Input(format!("rms_norm: {} input elements, weight of {} for dim {dim}", x.len(), w.len())));
    }
    if dim > i32::MAX as usize / 2 {
        return Err(Error::Input(format!("rms_norm: dim {dim} is too large for the CUDA kernels")));
    }
    Ok(x.len() / dim)
}

fn run_forward(x: &CudaStorage, w: &CudaStorage, dim: usize, eps: f64, reference: bool) -> Result<(CudaStorage, CudaStorage)> {
    let rows = rows_of(x, w, dim)?;
    let dev = &x.dev;
    let y = CudaStorage::alloc_out(dev, x.dtype(), x.len())?;
    let rstd = CudaStorage::alloc_out(dev, DType::F32, rows)?;
    if rows == 0 {
        return Ok((y, rstd));
    }
    // (const T* x, const T* w, T* y, float* rstd, u64 rows, int dim, float eps)
    let args = [x.arg(), w.arg(), y.arg(), rstd.arg(), Arg::U64(rows as u64), Arg::I32(dim as i32), Arg::F32(eps as f32)];
    if reference {
        launch(dev, "rms_norm", &format!("rms_norm_fwd_ref_{}", x.sfx()), cfg(rows.div_ceil(128), 128), &args)?;
    } else {
        launch(dev, "rms_norm", &format!("rms_norm_fwd_{}", x.sfx()), cfg(rows.div_ceil(WARPS), 32 * WARPS), &args)?;
    }
    Ok((y, rstd))
}

/// Returns (y, rstd): y in x's dtype, rstd [rows] in F32.
pub fn forward(x: &CudaStorage, w: &CudaStorage, dim: usize, eps: f64) -> Result<(CudaStorage, CudaStorage)> {
    run_forward(x, w, dim, eps, false)
}

/// [`forward`] through the simple reference kernel (one thread per row), for parity checks.
pub fn forward_reference(x: &CudaStorage, w: &CudaStorage, dim: usize, eps: f64) -> Result<(CudaStorage, CudaStorage)> {
    run_forward(x, w, dim, eps, true)
}

/// How the dw reduction splits the rows: (rows per chunk, chunks). Depends only on the shape and
/// dtype, so dw is reproducible.
fn dw_chunks(rows: usize, dim: usize, dtype: DType) -> (usize, usize) {
    let pack = 16 / dtype.size_in_bytes();
    let threads_per_row = dim.div_ceil(pack);
    // Aim for ~128K threads in flight, at most MAX_CHUNKS chunks, never an empty chunk.
    let want = (131_072usize.div_ceil(threads_per_row)).clamp(1, MAX_CHUNKS).min(rows.max(1));
    let per = rows.div_ceil(want).max(1);
    (per, rows.div_ceil(per).max(1))
}

fn run_backward(
    x: &CudaStorage,
    w: &CudaStorage,
    rstd: &CudaStorage,
    dy: &CudaStorage,
    dim: usize,
    reference: bool,
) -> Result<(CudaStorage, CudaStorage)> {
    let rows = rows_of(x, w, dim)?;
    x.float_op("rms_norm backward", &[dy])?;
    x.same_device(rstd, "rms_norm backward")?;
    if dy.len() != x.len() || rstd.len() != rows {
        return Err(Error::Input(format!(
            "rms_norm backward: x has {} elements ({rows} rows), dy {}, rstd {}",
            x.len(),
            dy.len(),
            rstd.len()
        )));
    }
    // The forward stores rstd in F32; accept another float dtype by converting it.
    let rstd_f32;
    let rstd = if rstd.dtype() == DType::F32 {
        rstd
    } else {
        rstd_f32 = rstd.to_dtype(DType::F32)?;
        &rstd_f32
    };
    let dev = &x.dev;
    let dx = CudaStorage::alloc_out(dev, x.dtype(), x.len())?;
    if rows == 0 {
        return Ok((dx, CudaStorage::zeros_on(dev, x.dtype(), dim)?));
    }
    let dw = CudaStorage::alloc_out(dev, x.dtype(), dim)?;
    let s = x.sfx();
    // dx: (const T* x, const T* w, const float* rstd, const T* dy, T* dx, u64 rows, int dim)
    let dx_args = [x.arg(), w.arg(), rstd.arg(), dy.arg(), dx.arg(), Arg::U64(rows as u64), Arg::I32(dim as i32)];
    if reference {
        launch(dev, "rms_norm", &format!("rms_norm_bwd_dx_ref_{s}"), cfg(rows.div_ceil(128), 128), &dx_args)?;
        // (const T* x, const float* rstd, const T* dy, T* dw, u64 rows, int dim)
        let dw_args = [x.arg(), rstd.arg(), dy.arg(), dw.arg(), Arg::U64(rows as u64), Arg::I32(dim as i32)];
        launch(dev, "rms_norm", &format!("rms_norm_bwd_dw_ref_{s}"), cfg(dim.div_ceil(128), 128), &dw_args)?;
        return Ok((dx, dw));
    }
    launch(dev, "rms_norm", &format!("rms_norm_bwd_dx_{s}"), cfg(rows.div_ceil(WARPS), 32 * WARPS), &dx_args)?;

    let (per, chunks) = dw_chunks(rows, dim, x.dtype());
    let pack = 16 / x.dtype().size_in_bytes();
    let part = CudaStorage::alloc_out(dev, DType::F32, chunks * dim)?;
    let grid = LaunchConfig {
        grid_dim: (dim.div_ceil(DW_THREADS * pack) as u32, chunks as u32, 1),
        block_dim: (DW_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // (const T* x, const float* rstd, const T* dy, float* part, u64 rows, int dim, u64 rows_per_chunk)
    let part_args = [x.arg(), rstd.arg(), dy.arg(), part.arg(), Arg::U64(rows as u64), Arg::I32(dim as i32), Arg::U64(per as u64)];
    launch(dev, "rms_norm", &format!("rms_norm_bwd_dw_partial_{s}"), grid, &part_args)?;
    let fin = LaunchConfig { grid_dim: (dim.div_ceil(32) as u32, 1, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
    // (const float* part, T* dw, int chunks, int dim)
    launch(
        dev,
        "rms_norm",
        &format!("rms_norm_bwd_dw_finish_{s}"),
        fin,
        &[part.arg(), dw.arg(), Arg::I32(chunks as i32), Arg::I32(dim as i32)],
    )?;
    // `part` is freed on drop; the free is stream-ordered after the kernels above.
    Ok((dx, dw))
}

/// Returns (dx, dw) in x's dtype; `rstd` is the forward's (F32).
pub fn backward(x: &CudaStorage, w: &CudaStorage, rstd: &CudaStorage, dy: &CudaStorage, dim: usize) -> Result<(CudaStorage, CudaStorage)> {
    run_backward(x, w, rstd, dy, dim, false)
}

/// [`backward`] through the simple reference kernels (one thread per row for dx, per column for dw).
pub fn backward_reference(
    x: &CudaStorage,
    w: &CudaStorage,
    rstd: &CudaStorage,
    dy: &CudaStorage,
    dim: usize,
) -> Result<(CudaStorage, CudaStorage)> {
    run_backward(x, w, rstd, dy, dim, true)
}

/// Parity cases: fast and reference kernels, forward and backward, f32 and bf16, dims that are
/// and are not multiples of the pack width (bf16 8, f32 4), row counts not multiples of the block.
pub fn parity(p: &mut super::parity::Parity) -> Result<()> {
    // The op layer records the GradFns the backward cases call.
    crate::autograd::with_grad_enabled(true, || cases(p))
}

fn cases(p: &mut super::parity::Parity) -> Result<()> {
    use crate::tensor::Tensor;

    use super::parity::{cuda_of, wrap as tensor};

    let eps = 1e-5;
    for dtype in [DType::F32, DType::BF16] {
        for (rows, dim) in [(1001usize, 33usize), (513, 576), (257, 577), (300, 100), (64, 4096), (4099, 128), (1, 4096), (3, 7)] {
            let case = format!("{rows}x{dim}");
            let x = p.randn(&[rows, dim], dtype, 1.0)?;
            let w = p.randn(&[dim], dtype, 1.0)?;
            let dy = p.randn(&[rows, dim], dtype, 1.0)?;
            let (x32, w32, dy32) = (x.to_dtype(DType::F32)?, w.to_dtype(DType::F32)?, dy.to_dtype(DType::F32)?);
            // CPU reference through the op layer and its GradFn (f32 on the rounded inputs).
            let xr = x32.requires_grad();
            let wr = w32.requires_grad();
            let y_cpu = crate::ops::rms_norm(&xr, &wr, eps)?;
            let g_cpu = match y_cpu.grad_fn() {
                Some(f) => f.backward(&dy32)?,
                None => return Err(Error::Input("rms_norm parity: no grad fn recorded on the CPU".into())),
            };
            let (dx_cpu, dw_cpu) = (g_cpu[0].clone(), g_cpu[1].clone());

            // Fast kernels through the op layer: forward, then its GradFn's backward.
            let (xg, wg, dyg) = (p.gpu(&x)?.requires_grad(), p.gpu(&w)?.requires_grad(), p.gpu(&dy)?);
            match crate::ops::rms_norm(&xg, &wg, eps) {
                Ok(y) => {
                    p.check("rms_norm/forward", &case, &y_cpu, &y);
                    match y.grad_fn().map(|f| f.backward(&dyg)) {
                        Some(Ok(g)) => {
                            match (&g[0], &dx_cpu) {
                                (Some(a), Some(b)) => p.check("rms_norm/backward dx", &case, b, a),
                                _ => p.fail("rms_norm/backward dx", &case, dtype, &Error::Input("no dx".into())),
                            }
                            match (&g[1], &dw_cpu) {
                                (Some(a), Some(b)) => p.check("rms_norm/backward dw", &case, b, a),
                                _ => p.fail("rms_norm/backward dw", &case, dtype, &Error::Input("no dw".into())),
                            }
                        }
                        Some(Err(e)) => p.fail("rms_norm/backward", &case, dtype, &e),
                        None => p.fail("rms_norm/backward", &case, dtype, &Error::Input("no grad fn recorded".into())),
                    }
                }
                Err(e) => p.fail("rms_norm/forward", &case, dtype, &e),
            }

            // Reference kernels on the raw storages (and the fast rstd against the CPU's).
            let (xs, ws, dys) = (cuda_of(&xg)?, cuda_of(&wg)?, cuda_of(&dyg)?);
            let (_, cpu_rstd) = x32.storage().rms_norm(&*w32.storage(), dim, eps)?;
            let cpu_rstd = Tensor::from_storage(cpu_rstd, &[rows])?;
            match forward(&xs, &ws, dim, eps) {
                Ok((_, r)) => p.check("rms_norm/forward rstd", &case, &cpu_rstd, &tensor(r, &[rows])?),
                Err(e) => p.fail("rms_norm/forward rstd", &case, dtype, &e),
            }
            match forward_reference(&xs, &ws, dim, eps) {
                Ok((y, r)) => {
                    p.check("rms_norm/forward_ref", &case, &y_cpu, &tensor(y, &[rows, dim])?);
                    match backward_reference(&xs, &ws, &r, &dys, dim) {
                        Ok((dx, dw)) => {
                            if let Some(b) = &dx_cpu {
                                p.check("rms_norm/backward_ref dx", &case, b, &tensor(dx, &[rows, dim])?);
                            }
                            if let Some(b) = &dw_cpu {
                                p.check("rms_norm/backward_ref dw", &case, b, &tensor(dw, &[dim])?);
                            }
                        }
                        Err(e) => p.fail("rms_norm/backward_ref", &case, dtype, &e),
                    }
                }
                Err(e) => p.fail("rms_norm/forward_ref", &case, dtype, &e),
            }
        }
    }

    // dw must be bitwise reproducible (no atomics): run the backward twice on one input.
    let (rows, dim) = (2049, 576);
    let (x, w, dy) = (p.randn(&[rows, dim], DType::F32, 1.0)?, p.randn(&[dim], DType::F32, 1.0)?, p.randn(&[rows, dim], DType::F32, 1.0)?);
    let (x, w, dy) = (p.gpu(&x)?, p.gpu(&w)?, p.gpu(&dy)?);
    let (xs, ws, dys) = (cuda_of(&x)?, cuda_of(&w)?, cuda_of(&dy)?);
    let (_, r) = forward(&xs, &ws, dim, eps)?;
    let (_, dw1) = backward(&xs, &ws, &r, &dys, dim)?;
    let (_, dw2) = backward(&xs, &ws, &r, &dys, dim)?;
    let (a, b) = (tensor(dw1, &[dim])?, tensor(dw2, &[dim])?);
    let same = a.to_f64_vec()? == b.to_f64_vec()?;
    if same {
        p.check_tol("rms_norm/backward dw", "2049x576 run twice: identical bits", &a, &b, 0.0);
    } else {
        p.fail(
            "rms_norm/backward dw",
            "2049x576 run twice: identical bits",
            DType::F32,
            &Error::Input("dw differs between two runs".into()),
        );
    }
    Ok(())
}
