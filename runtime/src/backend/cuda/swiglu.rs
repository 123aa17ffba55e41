//! SwiGLU on the GPU (`kernels/cuda/swiglu.cu`), elementwise.
//!
//! y = silu(g)∘u;  dg = dy∘u∘σ(g)·(1 + g·(1−σ(g))),  du = dy∘silu(g).

use super::{device::grid_1d, launch, Arg, CudaStorage};
use crate::backend::BackendStorage;
use crate::error::{Error, Result};

/// Threads of the fast kernels: one per 128-bit pack of elements.
fn pack_threads(s: &CudaStorage) -> usize {
    s.len().div_ceil(16 / s.dtype().size_in_bytes())
}

fn check(gate: &CudaStorage, others: &[&CudaStorage], op: &'static str) -> Result<()> {
    gate.float_op(op, others)?;
    if let Some(o) = others.iter().find(|o| o.len() != gate.len()) {
        return Err(Error::Input(format!("{op}: {} and {} elements", gate.len(), o.len())));
    }
    Ok(())
}

fn run_forward(gate: &CudaStorage, up: &CudaStorage, reference: bool) -> Result<CudaStorage> {
    check(gate, &[up], "swiglu")?;
    let n = gate.len();
    let y = CudaStorage::alloc_out(&gate.dev, gate.dtype(), n)?;
    if n == 0 {
        return Ok(y);
    }
    // (const T* g, const T* u, T* y, u64 n)
    let args = [gate.arg(), up.arg(), y.arg(), Arg::U64(n as u64)];
    if reference {
        launch(&gate.dev, "swiglu", &format!("swiglu_fwd_ref_{}", gate.sfx()), grid_1d(n, 256), &args)?;
    } else {
        launch(&gate.dev, "swiglu", &format!("swiglu_fwd_{}", gate.sfx()), grid_1d(pack_threads(gate), 256), &args)?;
    }
    Ok(y)
}

fn run_backward(gate: &CudaStorage, up: &CudaStorage, dy: &CudaStorage, reference: bool) -> Result<(CudaStorage, CudaStorage)> {
    check(gate, &[up, dy], "swiglu backward")?;
    let n = gate.len();
    let dg = CudaStorage::alloc_out(&gate.dev, gate.dtype(), n)?;
    let du = CudaStorage::alloc_out(&gate.dev, gate.dtype(), n)?;
    if n == 0 {
        return Ok((dg, du));
    }
    // (const T* g, const T* u, const T* dy, T* dg, T* du, u64 n)
    let args = [gate.arg(), up.arg(), dy.arg(), dg.arg(), du.arg(), Arg::U64(n as u64)];
    if reference {
        launch(&gate.dev, "swiglu", &format!("swiglu_bwd_ref_{}", gate.sfx()), grid_1d(n, 256), &args)?;
    } else {
        launch(&gate.dev, "swiglu", &format!("swiglu_bwd_{}", gate.sfx()), grid_1d(pack_threads(gate), 256), &args)?;
    }
    Ok((dg, du))
}

/// y = silu(gate)∘up (same dtype and length).
pub fn forward(gate: &CudaStorage, up: &CudaStorage) -> Result<CudaStorage> {
    run_forward(gate, up, false)
}

/// [`forward`] through the one-thread-per-element reference kernel, for parity checks.
pub fn forward_reference(gate: &CudaStorage, up: &CudaStorage) -> Result<CudaStorage> {
    run_forward(gate, up, true)
}

/// Returns (dgate, dup).
pub fn backward(gate: &CudaStorage, up: &CudaStorage, dy: &CudaStorage) -> Result<(CudaStorage, CudaStorage)> {
    run_backward(gate, up, dy, false)
}

/// [`backward`] through the one-thread-per-element reference kernel, for parity checks.
pub fn backward_reference(gate: &CudaStorage, up: &CudaStorage, dy: &CudaStorage) -> Result<(CudaStorage, CudaStorage)> {
    run_backward(gate, up, dy, true)
}

/// Parity cases: forward through `ops::swiglu` and its GradFn's backward, plus the reference kernels;
/// f32 and bf16; lengths with and without a partial 128-bit tail; large |gate| (saturated σ).
pub fn parity(p: &mut super::parity::Parity) -> Result<()> {
    // The op layer records the GradFns the backward cases call.
    crate::autograd::with_grad_enabled(true, || cases(p))
}

fn cases(p: &mut super::parity::Parity) -> Result<()> {
    use crate::tensor::DType;

    use super::parity::{cuda_of, wrap as on_gpu};

    for dtype in [DType::F32, DType::BF16] {
        for (shape, scale) in [
            (vec![1usize], 3.0),
            (vec![7, 33], 3.0),
            (vec![3, 577], 3.0),
            (vec![64, 4096], 3.0),
            (vec![5, 1001], 30.0),
            (vec![2, 3, 576], 1.0),
        ] {
            let case = format!("{shape:?} σ={scale}");
            let g = p.randn(&shape, dtype, scale)?;
            let u = p.randn(&shape, dtype, 1.0)?;
            let dy = p.randn(&shape, dtype, 1.0)?;
            let (g32, u32_, dy32) = (g.to_dtype(DType::F32)?, u.to_dtype(DType::F32)?, dy.to_dtype(DType::F32)?);

            let y_cpu = crate::ops::swiglu(&g32.requires_grad(), &u32_.requires_grad())?;
            let grads = match y_cpu.grad_fn() {
                Some(f) => f.backward(&dy32)?,
                None => return Err(Error::Input("swiglu parity: no CPU grad fn".into())),
            };
            let (Some(dg_cpu), Some(du_cpu)) = (grads[0].clone(), grads[1].clone()) else {
                return Err(Error::Input("swiglu parity: missing CPU gradients".into()));
            };

            let (gg, ug, dyg) = (p.gpu(&g)?.requires_grad(), p.gpu(&u)?.requires_grad(), p.gpu(&dy)?);
            match crate::ops::swiglu(&gg, &ug) {
                Ok(y) => {
                    p.check("swiglu/forward", &case, &y_cpu, &y);
                    match y.grad_fn().map(|f| f.backward(&dyg)) {
                        Some(Ok(gr)) => match (&gr[0], &gr[1]) {
                            (Some(dg), Some(du)) => {
                                p.check("swiglu/backward dgate", &case, &dg_cpu, dg);
                                p.check("swiglu/backward dup", &case, &du_cpu, du);
                            }
                            _ => p.fail("swiglu/backward", &case, dtype, &Error::Input("missing gradients".into())),
                        },
                        Some(Err(e)) => p.fail("swiglu/backward", &case, dtype, &e),
                        None => p.fail("swiglu/backward", &case, dtype, &Error::Input("no grad fn recorded".into())),
                    }
                }
                Err(e) => p.fail("swiglu/forward", &case, dtype, &e),
            }

            let (gs, us, dys) = (cuda_of(&gg)?, cuda_of(&ug)?, cuda_of(&dyg)?);
            match forward_reference(&gs, &us) {
                Ok(y) => p.check("swiglu/forward_ref", &case, &y_cpu, &on_gpu(y, &shape)?),
                Err(e) => p.fail("swiglu/forward_ref", &case, dtype, &e),
            }
            match backward_reference(&gs, &us, &dys) {
                Ok((dg, du)) => {
                    p.check("swiglu/backward_ref dgate", &case, &dg_cpu, &on_gpu(dg, &shape)?);
                    p.check("swiglu/backward_ref dup", &case, &du_cpu, &on_gpu(du, &shape)?);
                }
                Err(e) => p.fail("swiglu/backward_ref", &case, dtype, &e),
            }
        }
    }
    Ok(())
}
