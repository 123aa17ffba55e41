//! Token embedding on the device (`kernels/cuda/embedding.cu`): a warp-per-token row gather and a
//! scatter-add backward with f32 atomics (bf16/f16 accumulate in an f32 scratch table, then one
//! rounding).
//!
//! Out-of-range ids: the op layer (`ops::embedding`) rejects them on the host before the backend
//! runs, like the CPU backend expects. The kernels bound-check every id anyway (a bad row is
//! written as zeros in the forward and skipped in the backward), so the device never reads or
//! writes out of bounds; the `*_checked` entry points (used by parity, and by [`forward`] /
//! [`backward`] when `TEMPER_CUDA_SYNC` is set) also report the first bad id as the op layer's
//! error, which costs one wait for the device.

use super::elementwise::{cuda_of, expect_err, first_u64, float_check, record, wrap};
use super::parity::Parity;
use super::{launch, Arg, CudaStorage};
use crate::backend::{BackendStorage, CpuStorage};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use cudarc::driver::LaunchConfig;

const M: &str = "embedding";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Fast,
    Checked,
    Reference,
}

fn ids_check(op: &'static str, ids: &CudaStorage, other: &CudaStorage) -> Result<()> {
    if ids.dtype() != DType::U32 {
        return Err(Error::dtype(op, format!("ids must be U32, got {}", ids.dtype())));
    }
    other.same_device(ids, op)
}

/// A warp per token, 8 tokens per block, grid-strided.
fn warp_grid(tokens: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (tokens.div_ceil(8).clamp(1, 65535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn full_grid(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The flag buffer of a checked launch (zeroed I64[1]) and its kernel argument (null otherwise).
fn flag(dev: &std::sync::Arc<super::CudaDevice>, mode: Mode) -> Result<(Option<CudaStorage>, Arg)> {
    if mode == Mode::Fast {
        return Ok((None, Arg::P(0)));
    }
    let f = CudaStorage::zeros_on(dev, DType::I64, 1)?;
    let a = f.arg();
    Ok((Some(f), a))
}

/// Reads the flag back and turns a recorded bad position into the op layer's error.
fn check_flag(flag: Option<CudaStorage>, ids: &CudaStorage, vocab: usize) -> Result<()> {
    let Some(f) = flag else { return Ok(()) };
    let b = first_u64(&f)? as usize;
    if b == 0 {
        return Ok(());
    }
    let pos = ids.len() - b;
    let id = match ids.to_cpu()? {
        CpuStorage::U32(v) => v[pos],
        _ => unreachable!("ids are U32"),
    };
    Err(Error::Input(format!(
        "token id {id} at position {pos} is out of range for vocabulary size {vocab}"
    )))
}

/// Rows of `table` (`[vocab, dim]`, vocab = len / dim) for U32 `ids` → `[ids, dim]`.
pub fn forward(table: &CudaStorage, ids: &CudaStorage, dim: usize) -> Result<CudaStorage> {
    forward_impl(table, ids, dim, if super::device::sync_each_launch() { Mode::Checked } else { Mode::Fast })
}

/// [`forward`] that also reports an out-of-range id as an error (waits for the device).
pub fn forward_checked(table: &CudaStorage, ids: &CudaStorage, dim: usize) -> Result<CudaStorage> {
    forward_impl(table, ids, dim, Mode::Checked)
}

/// [`forward_checked`] through the reference kernel (one thread per output element).
pub fn forward_reference(table: &CudaStorage, ids: &CudaStorage, dim: usize) -> Result<CudaStorage> {
    forward_impl(table, ids, dim, Mode::Reference)
}

fn forward_impl(table: &CudaStorage, ids: &CudaStorage, dim: usize, mode: Mode) -> Result<CudaStorage> {
    float_check("embedding", table, &[])?;
    ids_check("embedding", ids, table)?;
    if dim == 0 || !table.len().is_multiple_of(dim) {
        return Err(Error::shape(
            "embedding",
            format!("a table of {} elements is not [vocab, {dim}]", table.len()),
        ));
    }
    let (vocab, tokens) = (table.len() / dim, ids.len());
    let out = CudaStorage::alloc_out(&table.dev, table.dtype(), tokens * dim)?;
    if tokens == 0 {
        return Ok(out);
    }
    let (f, fa) = flag(&table.dev, mode)?;
    let (t, v) = (Arg::U64(tokens as u64), Arg::U64(vocab as u64));
    if mode == Mode::Reference {
        // extern "C" embedding_fwd_ref_<dtype>(const T* table, const u32* ids, T* y, u64 tokens, u64 vocab, u64 dim, u64* bad)
        let name = format!("embedding_fwd_ref_{}", table.sfx());
        launch(
            &table.dev,
            M,
            &name,
            full_grid(tokens * dim),
            &[table.arg(), ids.arg(), out.arg(), t, v, Arg::U64(dim as u64), fa],
        )?;
    } else {
        let row_bytes = dim * table.dtype().size_in_bytes();
        let unit = [16usize, 8, 4, 2].into_iter().find(|&u| row_bytes.is_multiple_of(u)).unwrap_or(2);
        // extern "C" embedding_fwd_b<unit>(const W* table, const u32* ids, W* y, u64 tokens, u64 vocab, u64 row_units, u64* bad)
        let name = format!("embedding_fwd_b{unit}");
        launch(
            &table.dev,
            M,
            &name,
            warp_grid(tokens),
            &[table.arg(), ids.arg(), out.arg(), t, v, Arg::U64((row_bytes / unit) as u64), fa],
        )?;
    }
    check_flag(f, ids, vocab)?;
    Ok(out)
}

/// `dW[v] = Σ_{t: ids[t] = v} dy[t]` → `[vocab, dim]` in the dtype of `dy`.
pub fn backward(dy: &CudaStorage, ids: &CudaStorage, vocab: usize, dim: usize) -> Result<CudaStorage> {
    backward_impl(dy, ids, vocab, dim, if super::device::sync_each_launch() { Mode::Checked } else { Mode::Fast })
}

/// [`backward`] that also reports an out-of-range id as an error (waits for the device).
pub fn backward_checked(dy: &CudaStorage, ids: &CudaStorage, vocab: usize, dim: usize) -> Result<CudaStorage> {
    backward_impl(dy, ids, vocab, dim, Mode::Checked)
}

/// [`backward_checked`] through the reference kernel (one thread per dW element, tokens in order).
pub fn backward_reference(dy: &CudaStorage, ids: &CudaStorage, vocab: usize, dim: usize) -> Result<CudaStorage> {
    backward_impl(dy, ids, vocab, dim, Mode::Reference)
}

fn backward_impl(dy: &CudaStorage, ids: &CudaStorage, vocab: usize, dim: usize, mode: Mode) -> Result<CudaStorage> {
    float_check("embedding", dy, &[])?;
    ids_check("embedding", ids, dy)?;
    let tokens = ids.len();
    if dy.len() != tokens * dim {
        return Err(Error::shape(
            "embedding",
            format!("dy has {} elements, {tokens} ids of dim {dim} need {}", dy.len(), tokens * dim),
        ));
    }
    let dtype = dy.dtype();
    if tokens == 0 || vocab * dim == 0 {
        return CudaStorage::zeros_on(&dy.dev, dtype, vocab * dim);
    }
    let (f, fa) = flag(&dy.dev, mode)?;
    let args = |acc: &CudaStorage| {
        [
            dy.arg(),
            ids.arg(),
            acc.arg(),
            Arg::U64(tokens as u64),
            Arg::U64(vocab as u64),
            Arg::U64(dim as u64),
            fa,
        ]
    };
    let out = if mode == Mode::Reference {
        let out = CudaStorage::alloc_out(&dy.dev, dtype, vocab * dim)?;
        // extern "C" embedding_bwd_ref_<dtype>(const T* dy, const u32* ids, T* dw, u64 tokens, u64 vocab, u64 dim, u64* bad)
        launch(
            &dy.dev,
            M,
            &format!("embedding_bwd_ref_{}", dy.sfx()),
            full_grid((vocab * dim).max(tokens)),
            &args(&out),
        )?;
        out
    } else {
        // extern "C" embedding_bwd_<dtype>(const T* dy, const u32* ids, A* acc, u64 tokens, u64 vocab, u64 dim, u64* bad),
        // A = f32 (f64 for f64); acc zeroed.
        let direct = matches!(dtype, DType::F32 | DType::F64);
        let acc = CudaStorage::zeros_on(&dy.dev, if direct { dtype } else { DType::F32 }, vocab * dim)?;
        launch(&dy.dev, M, &format!("embedding_bwd_{}", dy.sfx()), warp_grid(tokens), &args(&acc))?;
        if direct {
            acc
        } else {
            super::elementwise::to_dtype(&acc, dtype)?
        }
    };
    check_flag(f, ids, vocab)?;
    Ok(out)
}

/// Parity: gathers and scatter-adds with repeated ids, odd dims (1, 7, 1023, 4099 and 128-bit
/// friendly ones), through the op layer (forward and autograd backward) and each kernel directly,
/// fast, checked and reference; f32 and bf16; out-of-range ids reported by the checked kernels.
pub fn parity(p: &mut Parity) -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        for (vocab, dim, tokens) in [
            (5usize, 1usize, 9usize),
            (11, 7, 13),
            (37, 1023, 50),
            (9, 4099, 12),
            (300, 64, 777),
            (1000, 130, 4097),
        ] {
            let table = p.randn(&[vocab, dim], dtype, 1.0)?;
            // Few distinct ids: many repeats in the backward.
            let ids = p.ids(&[tokens], vocab.min(17) as u64)?;
            let t32 = table.to_dtype(DType::F32)?;
            let case = format!("vocab={vocab} dim={dim} tokens={tokens}");

            // Forward through the op layer, and each kernel.
            let cpu = crate::ops::embedding(&t32, &ids)?;
            let g = (|| crate::ops::embedding(&p.gpu(&table)?, &p.gpu(&ids)?))();
            record(p, "embedding/forward", &case, dtype, &cpu, g, None);
            let (gt, gi) = (cuda_of(&p.gpu(&table)?)?, cuda_of(&p.gpu(&ids)?)?);
            record(
                p,
                "embedding/forward_checked",
                &case,
                dtype,
                &cpu,
                forward_checked(&gt, &gi, dim).and_then(|s| wrap(s, &[tokens, dim])),
                None,
            );
            record(
                p,
                "embedding/forward_ref",
                &case,
                dtype,
                &cpu,
                forward_reference(&gt, &gi, dim).and_then(|s| wrap(s, &[tokens, dim])),
                None,
            );

            // Backward through autograd: d/dW Σ (embedding(W) ∘ w).
            let w = p.randn(&[tokens, dim], dtype, 1.0)?;
            let grad = |t: &Tensor, ids: &Tensor, w: &Tensor| -> Result<Tensor> {
                let t = t.requires_grad();
                let loss = crate::ops::sum(&crate::ops::mul(&crate::ops::embedding(&t, ids)?, w)?)?;
                loss.backward()?
                    .get(&t)
                    .cloned()
                    .ok_or_else(|| Error::Input("no gradient for the table".into()))
            };
            let cpu = grad(&t32, &ids, &w.to_dtype(DType::F32)?)?;
            let g = (|| grad(&p.gpu(&table)?, &p.gpu(&ids)?, &p.gpu(&w)?))();
            record(p, "embedding/backward (autograd)", &case, dtype, &cpu, g, None);

            // Backward kernels directly on dy = w.
            let gw = cuda_of(&p.gpu(&w)?)?;
            let cpu = Tensor::from_storage(
                crate::backend::Storage::embedding_backward(
                    &*w.to_dtype(DType::F32)?.contiguous_storage()?,
                    &*ids.contiguous_storage()?,
                    vocab,
                    dim,
                )?,
                &[vocab, dim],
            )?;
            record(
                p,
                "embedding/backward",
                &case,
                dtype,
                &cpu,
                backward(&gw, &gi, vocab, dim).and_then(|s| wrap(s, &[vocab, dim])),
                None,
            );
            record(
                p,
                "embedding/backward_checked",
                &case,
                dtype,
                &cpu,
                backward_checked(&gw, &gi, vocab, dim).and_then(|s| wrap(s, &[vocab, dim])),
                None,
            );
            record(
                p,
                "embedding/backward_ref",
                &case,
                dtype,
                &cpu,
                backward_reference(&gw, &gi, vocab, dim).and_then(|s| wrap(s, &[vocab, dim])),
                None,
            );
        }
        // Out-of-range ids: the op layer's error, and the checked kernels' own report.
        let table = p.randn(&[10, 8], dtype, 1.0)?;
        let ids = Tensor::from_vec(vec![1u32, 9, 10, 3, 12], &[5], crate::Device::Cpu)?;
        let r = (|| crate::ops::embedding(&p.gpu(&table)?, &p.gpu(&ids)?))();
        expect_err(p, "embedding/forward", "id 10 of vocab 10 (op layer error)", dtype, r, "position 2");
        let (gt, gi) = (cuda_of(&p.gpu(&table)?)?, cuda_of(&p.gpu(&ids)?)?);
        expect_err(
            p,
            "embedding/forward_checked",
            "id 10 of vocab 10 (kernel flag)",
            dtype,
            forward_checked(&gt, &gi, 8),
            "token id 10 at position 2",
        );
        expect_err(
            p,
            "embedding/forward_ref",
            "id 10 of vocab 10 (kernel flag)",
            dtype,
            forward_reference(&gt, &gi, 8),
            "token id 10 at position 2",
        );
        let dy = p.randn(&[5, 8], dtype, 1.0)?;
        let gdy = cuda_of(&p.gpu(&dy)?)?;
        expect_err(
            p,
            "embedding/backward_checked",
            "id 10 of vocab 10 (kernel flag)",
            dtype,
            backward_checked(&gdy, &gi, 10, 8),
            "token id 10 at position 2",
        );
        expect_err(
            p,
            "embedding/backward_ref",
            "id 10 of vocab 10 (kernel flag)",
            dtype,
            backward_reference(&gdy, &gi, 10, 8),
            "token id 10 at position 2",
        );
    }
    Ok(())
}
