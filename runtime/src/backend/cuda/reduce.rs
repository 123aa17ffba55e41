//! Column sums and the full sum on the device (`kernels/cuda/reduce.cu`). Both are deterministic:
//! the split of the work depends only on the shape. f32/bf16/f16 accumulate in f32 (sum_rows) or
//! f64 (sum_all); f64 in f64.

use super::elementwise::{cuda_of, float_check, record, wrap};
use super::parity::Parity;
use super::{launch, Arg, CudaStorage};
use crate::backend::BackendStorage;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use cudarc::driver::LaunchConfig;

const M: &str = "reduce";

/// Column sums of a `[rows, cols]` matrix → `[cols]` (the dtype of `x`): a chunked two-pass
/// reduction (f32 partial sums per chunk of rows, then the chunks in order).
pub fn sum_rows(x: &CudaStorage, rows: usize, cols: usize) -> Result<CudaStorage> {
    sum_rows_impl(x, rows, cols, false)
}

/// [`sum_rows`] through the reference kernel (one thread per column, rows in order).
pub fn sum_rows_reference(x: &CudaStorage, rows: usize, cols: usize) -> Result<CudaStorage> {
    sum_rows_impl(x, rows, cols, true)
}

/// Row chunks of the fast sum_rows: enough blocks to fill the GPU (about 2048 with the column
/// blocks), at least 64 rows a chunk. A function of the shape only, so results are reproducible.
fn chunks_for(rows: usize, cols: usize) -> (usize, usize) {
    let col_blocks = cols.div_ceil(32);
    let chunks = rows.div_ceil(64).min(2048usize.div_ceil(col_blocks)).clamp(1, 65535);
    let per = rows.div_ceil(chunks);
    (rows.div_ceil(per), per)
}

fn sum_rows_impl(x: &CudaStorage, rows: usize, cols: usize, reference: bool) -> Result<CudaStorage> {
    float_check("sum_rows", x, &[])?;
    if rows * cols > x.len() {
        return Err(Error::shape(
            "sum_rows",
            format!("[{rows}, {cols}] needs {} elements, the storage has {}", rows * cols, x.len()),
        ));
    }
    if cols == 0 || rows == 0 {
        return CudaStorage::zeros_on(&x.dev, x.dtype(), cols);
    }
    let out = CudaStorage::alloc_out(&x.dev, x.dtype(), cols)?;
    let col_grid = LaunchConfig {
        grid_dim: (cols.div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    if reference {
        // extern "C" sum_rows_ref_<dtype>(const T* x, T* y, u64 rows, u64 cols)
        launch(
            &x.dev,
            M,
            &format!("sum_rows_ref_{}", x.sfx()),
            col_grid,
            &[x.arg(), out.arg(), Arg::U64(rows as u64), Arg::U64(cols as u64)],
        )?;
        return Ok(out);
    }
    let (chunks, per) = chunks_for(rows, cols);
    let acc = if x.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    let part = CudaStorage::alloc_out(&x.dev, acc, chunks * cols)?;
    let cfg = LaunchConfig {
        grid_dim: (cols.div_ceil(32) as u32, chunks as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    // extern "C" sum_rows_part_<dtype>(const T* x, A* part, u64 rows, u64 cols, u64 rows_per_chunk)
    launch(
        &x.dev,
        M,
        &format!("sum_rows_part_{}", x.sfx()),
        cfg,
        &[
            x.arg(),
            part.arg(),
            Arg::U64(rows as u64),
            Arg::U64(cols as u64),
            Arg::U64(per as u64),
        ],
    )?;
    // extern "C" sum_rows_final_<dtype>(const A* part, T* y, u64 chunks, u64 cols)
    launch(
        &x.dev,
        M,
        &format!("sum_rows_final_{}", x.sfx()),
        col_grid,
        &[part.arg(), out.arg(), Arg::U64(chunks as u64), Arg::U64(cols as u64)],
    )?;
    Ok(out)
}

/// The sum of all elements as f64 (accumulated in f64; waits for the device).
pub fn sum_all(x: &CudaStorage) -> Result<f64> {
    sum_all_impl(x, false)
}

/// [`sum_all`] through the reference kernel (one thread, index order).
pub fn sum_all_reference(x: &CudaStorage) -> Result<f64> {
    sum_all_impl(x, true)
}

fn sum_all_impl(x: &CudaStorage, reference: bool) -> Result<f64> {
    float_check("sum_all", x, &[])?;
    let n = x.len();
    if n == 0 {
        return Ok(0.0);
    }
    let out = CudaStorage::alloc_out(&x.dev, DType::F64, 1)?;
    if reference {
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        // extern "C" sum_all_ref_<dtype>(const T* x, double* out, u64 n)
        launch(
            &x.dev,
            M,
            &format!("sum_all_ref_{}", x.sfx()),
            one,
            &[x.arg(), out.arg(), Arg::U64(n as u64)],
        )?;
    } else {
        let blocks = n.div_ceil(256 * 16).clamp(1, 1024);
        let part = CudaStorage::alloc_out(&x.dev, DType::F64, blocks)?;
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // extern "C" sum_all_part_<dtype>(const T* x, double* part, u64 n)
        launch(
            &x.dev,
            M,
            &format!("sum_all_part_{}", x.sfx()),
            cfg,
            &[x.arg(), part.arg(), Arg::U64(n as u64)],
        )?;
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // extern "C" sum_all_final(const double* part, double* out, u64 parts)
        launch(&x.dev, M, "sum_all_final", one, &[part.arg(), out.arg(), Arg::U64(blocks as u64)])?;
    }
    match out.to_cpu()? {
        crate::backend::CpuStorage::F64(v) => Ok(v[0]),
        o => Err(Error::dtype("sum_all", format!("expected an F64 result, got {}", o.dtype()))),
    }
}

/// Parity: sum_rows on odd shapes up to 40000 rows (several chunks), sum_all on lengths 1 .. 10⁶
/// (aligned and tail paths, many blocks), through the op layer (sum, the mul_row backward) and
/// each kernel directly, fast and reference; f32 and bf16.
pub fn parity(p: &mut Parity) -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        for (rows, cols) in [(1usize, 1usize), (7, 3), (1023, 7), (64, 4099), (40000, 33), (5000, 256), (3, 1)] {
            let x = p.randn(&[rows, cols], dtype, 1.0)?;
            let x32 = x.to_dtype(DType::F32)?;
            let cpu = Tensor::from_storage(x32.contiguous_storage()?.sum_rows(rows, cols)?, &[cols])?;
            let case = format!("[{rows},{cols}]");
            let g = cuda_of(&p.gpu(&x)?)?;
            // f32 sums of up to 40000 rows: the chunked order differs from the sequential one by
            // rounding ~ √rows·ε relative to Σ|x|, below 1e-4 of max|sum| for these sizes.
            record(
                p,
                "reduce/sum_rows",
                &case,
                dtype,
                &cpu,
                sum_rows(&g, rows, cols).and_then(|s| wrap(s, &[cols])),
                None,
            );
            record(
                p,
                "reduce/sum_rows_ref",
                &case,
                dtype,
                &cpu,
                sum_rows_reference(&g, rows, cols).and_then(|s| wrap(s, &[cols])),
                None,
            );
        }
        // The op layer: the row operand's gradient of mul_row is a column sum.
        let (rows, cols) = (129usize, 65usize);
        let x = p.randn(&[rows, cols], dtype, 1.0)?;
        let v = p.randn(&[cols], dtype, 1.0)?;
        let grad = |x: &Tensor, v: &Tensor| -> Result<Tensor> {
            let v = v.requires_grad();
            let loss = crate::ops::sum(&crate::ops::mul_row(x, &v)?)?;
            let g = loss.backward()?;
            g.get(&v).cloned().ok_or_else(|| Error::Input("no gradient for v".into()))
        };
        let cpu = grad(&x.to_dtype(DType::F32)?, &v.to_dtype(DType::F32)?)?;
        let g = (|| grad(&p.gpu(&x)?, &p.gpu(&v)?))();
        record(
            p,
            "reduce/sum_rows (mul_row backward)",
            &format!("[{rows},{cols}]"),
            dtype,
            &cpu,
            g,
            None,
        );

        for n in [1usize, 7, 1023, 4099, 65536 + 5, 1_000_003] {
            let x = p.randn(&[n], dtype, 1.0)?;
            let x32 = x.to_dtype(DType::F32)?;
            let want = x32.contiguous_storage()?.sum_all()?;
            let cpu = Tensor::from_vec(vec![want], &[1], crate::Device::Cpu)?;
            let case = format!("n={n}");
            let g = cuda_of(&p.gpu(&x)?)?;
            for (k, r) in [("reduce/sum_all", sum_all(&g)), ("reduce/sum_all_ref", sum_all_reference(&g))] {
                let t = r.and_then(|v| Tensor::from_vec(vec![v], &[1], crate::Device::Cpu));
                // Both sum the same (bf16-rounded) values in f64: 1e-4 relative for every dtype.
                record(p, k, &case, dtype, &cpu, t, Some(1e-4));
            }
            // Through the op layer on a strided view (copy, sum_all, then the scalar's affine).
            if n > 1 {
                let v = crate::ops::narrow(&p.gpu(&x)?, 0, 1, n - 1)?;
                let cpu = Tensor::from_vec(vec![x32.to_f64_vec()?[1..].iter().sum::<f64>()], &[], crate::Device::Cpu)?;
                let t = crate::ops::sum(&v);
                record(p, "reduce/sum_all (ops::sum of a view)", &case, dtype, &cpu, t, None);
            }
        }
    }
    Ok(())
}
