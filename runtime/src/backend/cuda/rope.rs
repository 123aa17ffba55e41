//! Rotary position embedding on the GPU (`kernels/cuda/rope.cu`), rotate-half layout.
//!
//! x [tokens, heads, head_dim] is rotated pairwise (i, i + head_dim/2) by the tables cos/sin
//! [tokens, head_dim/2] (which already carry any linear/llama3 frequency scaling, see
//! `ops::rope::RopeTable`); `inverse` rotates by −θ, which is the backward.

use super::{device::grid_1d, launch, Arg, CudaStorage};
use crate::backend::BackendStorage;
use crate::error::{Error, Result};

fn run(
    x: &CudaStorage,
    cos: &CudaStorage,
    sin: &CudaStorage,
    heads: usize,
    head_dim: usize,
    inverse: bool,
    reference: bool,
) -> Result<CudaStorage> {
    x.float_op("rope", &[cos, sin])?;
    if heads == 0 || head_dim == 0 || !head_dim.is_multiple_of(2) || !x.len().is_multiple_of(heads * head_dim) {
        return Err(Error::Input(format!("rope: {} elements do not split into {heads} heads of an even head_dim {head_dim}", x.len())));
    }
    if heads > i32::MAX as usize || head_dim > i32::MAX as usize {
        return Err(Error::Input(format!("rope: {heads} heads of {head_dim} are too large for the CUDA kernel")));
    }
    let half = head_dim / 2;
    let tokens = x.len() / (heads * head_dim);
    if cos.len() != tokens * half || sin.len() != tokens * half {
        return Err(Error::Input(format!("rope: tables of {} and {} elements for {tokens} tokens × {half} pairs", cos.len(), sin.len())));
    }
    let dev = &x.dev;
    let y = CudaStorage::alloc_out(dev, x.dtype(), x.len())?;
    if tokens == 0 {
        return Ok(y);
    }
    let pairs = tokens * heads * half;
    let base = [
        x.arg(),
        cos.arg(),
        sin.arg(),
        y.arg(),
        Arg::U64(tokens as u64),
        Arg::I32(heads as i32),
        Arg::I32(half as i32),
        Arg::I32(inverse as i32),
    ];
    if reference {
        // (const T* x, const T* cos, const T* sin, T* y, u64 tokens, int heads, int half, int inverse)
        launch(dev, "rope", &format!("rope_ref_{}", x.sfx()), grid_1d(pairs, 256), &base)?;
    } else {
        let pack = 16 / x.dtype().size_in_bytes();
        let vec = half.is_multiple_of(pack) && [x.ptr(), cos.ptr(), sin.ptr(), y.ptr()].iter().all(|p| p % 16 == 0);
        let threads = if vec { pairs / pack } else { pairs };
        let mut args = base.to_vec();
        args.push(Arg::I32(vec as i32));
        // (const T* x, const T* cos, const T* sin, T* y, u64 tokens, int heads, int half, int inverse, int vec)
        launch(dev, "rope", &format!("rope_{}", x.sfx()), grid_1d(threads, 256), &args)?;
    }
    Ok(y)
}

/// Rotates `x` [tokens, heads, head_dim] by the tables (same dtype as x); `inverse` for the backward.
pub fn apply(x: &CudaStorage, cos: &CudaStorage, sin: &CudaStorage, heads: usize, head_dim: usize, inverse: bool) -> Result<CudaStorage> {
    run(x, cos, sin, heads, head_dim, inverse, false)
}

/// [`apply`] through the simple reference kernel (one thread per pair), for parity checks.
pub fn apply_reference(
    x: &CudaStorage,
    cos: &CudaStorage,
    sin: &CudaStorage,
    heads: usize,
    head_dim: usize,
    inverse: bool,
) -> Result<CudaStorage> {
    run(x, cos, sin, heads, head_dim, inverse, true)
}

/// Parity cases: forward through `ops::rope` and the backward through its GradFn, plus the reference
/// kernel both ways; f32 and bf16; head sizes whose half is and is not a multiple of the pack width
/// (bf16 8, f32 4); plain and llama3-scaled tables at random positions.
pub fn parity(p: &mut super::parity::Parity) -> Result<()> {
    // The op layer records the GradFns the backward cases call.
    crate::autograd::with_grad_enabled(true, || cases(p))
}

fn cases(p: &mut super::parity::Parity) -> Result<()> {
    use crate::backend::Storage;
    use crate::ops::{rope_inv_freq, RopeScaling, RopeTable};
    use crate::tensor::{DType, Tensor};
    use crate::Device;

    use super::parity::cuda_of;

    let llama3 = RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192.0 };
    for dtype in [DType::F32, DType::BF16] {
        for (b, s, heads, hd, scaled) in [
            (2usize, 37usize, 3usize, 128usize, true),
            (1, 50, 4, 64, false),
            (3, 11, 2, 6, false),
            (1, 9, 5, 20, true),
            (2, 5, 3, 24, false),
            (1, 33, 2, 16, true),
        ] {
            let case = format!("{b}x{s}x{heads}x{hd}{}", if scaled { " llama3" } else { "" });
            let inv = rope_inv_freq(hd, 500000.0, if scaled { &llama3 } else { &RopeScaling::Default });
            let positions: Vec<i64> = (0..b * s).map(|_| p.rng.below(16384) as i64).collect();
            let table = RopeTable::new(&inv, &positions, dtype, Device::Cpu)?;
            let table32 = RopeTable { cos: table.cos.to_dtype(DType::F32)?, sin: table.sin.to_dtype(DType::F32)?, head_dim: hd };
            let gtable = RopeTable { cos: p.gpu(&table.cos)?, sin: p.gpu(&table.sin)?, head_dim: hd };
            let x = p.randn(&[b, s, heads, hd], dtype, 1.0)?;
            let dy = p.randn(&[b, s, heads, hd], dtype, 1.0)?;
            let (x32, dy32) = (x.to_dtype(DType::F32)?, dy.to_dtype(DType::F32)?);

            let y_cpu = crate::ops::rope(&x32.requires_grad(), &table32)?;
            let dx_cpu = match y_cpu.grad_fn() {
                Some(f) => f.backward(&dy32)?.remove(0),
                None => None,
            };
            let Some(dx_cpu) = dx_cpu else {
                return Err(Error::Input("rope parity: no CPU gradient".into()));
            };

            let (xg, dyg) = (p.gpu(&x)?.requires_grad(), p.gpu(&dy)?);
            match crate::ops::rope(&xg, &gtable) {
                Ok(y) => {
                    p.check("rope/forward", &case, &y_cpu, &y);
                    match y.grad_fn().map(|f| f.backward(&dyg)) {
                        Some(Ok(mut g)) => match g.remove(0) {
                            Some(dx) => p.check("rope/backward", &case, &dx_cpu, &dx),
                            None => p.fail("rope/backward", &case, dtype, &Error::Input("no dx".into())),
                        },
                        Some(Err(e)) => p.fail("rope/backward", &case, dtype, &e),
                        None => p.fail("rope/backward", &case, dtype, &Error::Input("no grad fn recorded".into())),
                    }
                }
                Err(e) => p.fail("rope/forward", &case, dtype, &e),
            }

            let (xs, dys, cs, sn) = (cuda_of(&xg)?, cuda_of(&dyg)?, cuda_of(&gtable.cos)?, cuda_of(&gtable.sin)?);
            let shape = [b, s, heads, hd];
            match apply_reference(&xs, &cs, &sn, heads, hd, false) {
                Ok(y) => p.check("rope/forward_ref", &case, &y_cpu, &Tensor::from_storage(Storage::Cuda(y), &shape)?),
                Err(e) => p.fail("rope/forward_ref", &case, dtype, &e),
            }
            match apply_reference(&dys, &cs, &sn, heads, hd, true) {
                Ok(dx) => p.check("rope/backward_ref", &case, &dx_cpu, &Tensor::from_storage(Storage::Cuda(dx), &shape)?),
                Err(e) => p.fail("rope/backward_ref", &case, dtype, &e),
            }
        }
    }
    Ok(())
}
