//! AdamW on CUDA (`kernels/cuda/adamw.cu`), the semantics of `backend/cpu/adamw.rs`: f32 weights
//! (or f32 master copies of bf16/f16 weights) and f32 moments, decoupled weight decay, bias
//! correction computed on the host in f64.
//!
//! [`step`] updates one tensor (one thread per element; also the reference kernel). [`step_multi`]
//! updates many tensors in one launch: a device array of per-tensor descriptors (pointers, length,
//! gradient dtype, the tensor's own step size and decay for learning-rate multipliers) and a work
//! list of (tensor, chunk) per block.

use super::{launch, Arg, CudaStorage};
use crate::backend::{AdamWStep, BackendStorage, CpuStorage};
use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::driver::LaunchConfig;

const M: &str = "adamw";
/// Elements per block of `adamw_multi` (`ADAMW_CHUNK` in the kernel).
const CHUNK: usize = 8192;

/// The f32 scalars of one update: (b1, b2, eps, bc2_sqrt, step_size, decay), as the CPU computes them.
fn scalars(h: &AdamWStep, lr: f64) -> (f32, f32, f32, f32, f32, f32) {
    let bc1 = 1.0 - h.beta1.powi(h.step as i32);
    let bc2 = 1.0 - h.beta2.powi(h.step as i32);
    (h.beta1 as f32, h.beta2 as f32, h.eps as f32, bc2.sqrt() as f32, (lr / bc1) as f32, (1.0 - lr * h.weight_decay) as f32)
}

fn kind(d: DType, what: &str) -> Result<i64> {
    match d {
        DType::F32 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F16 => Ok(2),
        d => Err(Error::dtype("adamw", format!("{what} of dtype {d}: expected F32, BF16 or F16"))),
    }
}

fn check_state(p: &CudaStorage, g: &CudaStorage, m: &CudaStorage, v: &CudaStorage) -> Result<()> {
    for (s, what) in [(p, "parameter"), (m, "first moment"), (v, "second moment")] {
        if s.dtype() != DType::F32 {
            return Err(Error::dtype("adamw", format!("{what} of dtype {} (AdamW keeps f32 weights and state)", s.dtype())));
        }
    }
    kind(g.dtype(), "gradient")?;
    for s in [g, m, v] {
        p.same_device(s, "adamw")?;
        if s.len() != p.len() {
            return Err(Error::Input(format!("adamw: parameter of {} elements with state or gradient of {}", p.len(), s.len())));
        }
    }
    Ok(())
}

/// One AdamW update of an F32 parameter with F32 state; the gradient may be F32, BF16 or F16.
pub fn step(p: &mut CudaStorage, g: &CudaStorage, m: &mut CudaStorage, v: &mut CudaStorage, h: &AdamWStep) -> Result<()> {
    check_state(p, g, m, v)?;
    let n = p.len();
    if n == 0 {
        return Ok(());
    }
    let (b1, b2, eps, bc2s, ss, decay) = scalars(h, h.lr);
    // adamw_step_G(float* p, const G* g, float* m, float* v, u64 n, float b1, float b2, float eps,
    //              float bc2_sqrt, float step_size, float decay)
    let args = [
        p.arg(),
        g.arg(),
        m.arg(),
        v.arg(),
        Arg::U64(n as u64),
        Arg::F32(b1),
        Arg::F32(b2),
        Arg::F32(eps),
        Arg::F32(bc2s),
        Arg::F32(ss),
        Arg::F32(decay),
    ];
    launch(&p.dev, M, &format!("adamw_step_{}", g.sfx()), super::device::grid_1d(n.min(1 << 24), 256), &args)
}

/// One tensor of a multi-tensor step.
pub struct MultiItem<'a> {
    /// The F32 weights: the parameter itself, or the f32 master copy of a bf16/f16 parameter.
    pub param: &'a mut CudaStorage,
    /// The bf16/f16 parameter the master is rounded into after the update.
    pub half: Option<&'a mut CudaStorage>,
    pub grad: &'a CudaStorage,
    pub m: &'a mut CudaStorage,
    pub v: &'a mut CudaStorage,
    /// This tensor's learning rate (`h.lr` of [`step_multi`] is not used).
    pub lr: f64,
}

/// One AdamW update of every item in a single launch (all on one device). `h` gives the betas,
/// eps, weight decay and step number; each item its own learning rate.
pub fn step_multi(items: &mut [MultiItem<'_>], h: &AdamWStep) -> Result<()> {
    let Some(first) = items.first() else {
        return Ok(());
    };
    let dev = first.param.dev.clone();
    let (mut descs, mut work) = (Vec::<i64>::with_capacity(items.len() * 8), Vec::<i64>::new());
    let mut b1b2 = (0f32, 0f32, 0f32, 0f32);
    for (t, it) in items.iter().enumerate() {
        check_state(it.param, it.grad, it.m, it.v)?;
        first.param.same_device(it.param, "adamw")?;
        let n = it.param.len();
        let (okind, out16) = match &it.half {
            Some(hp) => {
                let k = kind(hp.dtype(), "parameter")?;
                if k == 0 || hp.len() != n {
                    return Err(Error::Input(format!(
                        "adamw: the rounded copy of a {n}-element master must be BF16/F16 of the same length, got {} of {}",
                        hp.dtype(),
                        hp.len()
                    )));
                }
                it.param.same_device(hp, "adamw")?;
                (k, hp.ptr())
            }
            None => (0, 0),
        };
        let (b1, b2, eps, bc2s, ss, decay) = scalars(h, it.lr);
        b1b2 = (b1, b2, eps, bc2s);
        // struct AdamWTensor { u64 p, g, m, v, out16, n; u32 gkind, okind; float step_size, decay; }
        descs.extend_from_slice(&[
            it.param.ptr() as i64,
            it.grad.ptr() as i64,
            it.m.ptr() as i64,
            it.v.ptr() as i64,
            out16 as i64,
            n as i64,
            kind(it.grad.dtype(), "gradient")? | (okind << 32),
            (ss.to_bits() as i64) | ((decay.to_bits() as i64) << 32),
        ]);
        if t > u32::MAX as usize {
            return Err(Error::Input("adamw: too many tensors for one launch".into()));
        }
        for c in 0..n.div_ceil(CHUNK) {
            work.push(((t as i64) << 32) | c as i64);
        }
    }
    if work.is_empty() {
        return Ok(());
    }
    if work.len() > i32::MAX as usize {
        return Err(Error::Input("adamw: too many elements for one launch".into()));
    }
    let descs = CudaStorage::from_cpu(&CpuStorage::I64(descs), &dev)?;
    let work_d = CudaStorage::from_cpu(&CpuStorage::I64(work.clone()), &dev)?;
    let (b1, b2, eps, bc2s) = b1b2;
    let cfg = LaunchConfig { grid_dim: (work.len() as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // adamw_multi(const AdamWTensor* descs, const u64* work, float b1, float b2, float eps, float bc2_sqrt)
    launch(&dev, M, "adamw_multi", cfg, &[descs.arg(), work_d.arg(), Arg::F32(b1), Arg::F32(b2), Arg::F32(eps), Arg::F32(bc2s)])
    // `descs` and `work_d` are freed in stream order, after the kernel.
}

/// Parity: AdamW over tensors of 1, 7, 4097 and 20001 elements (several blocks, ragged tails) for
/// three steps with per-tensor learning rates, f32 and bf16 gradients, bf16 parameters through
/// their f32 master; the multi-tensor kernel, the single-tensor (reference) kernel and the
/// optimizer (`optim::AdamW` on CUDA parameters) against the CPU backend's update.
pub fn parity(p: &mut super::parity::Parity) -> Result<()> {
    use crate::backend::Storage;
    use crate::tensor::Tensor;
    use crate::Device;

    let sizes = [1usize, 7, 4097, 20001];
    let lr_scales = [1.0, 0.5, 2.0, 16.0];
    let base = AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.99, eps: 1e-6, weight_decay: 0.1, step: 0 };
    let up = |v: &[f32], dev: &std::sync::Arc<super::CudaDevice>| CudaStorage::from_cpu(&CpuStorage::F32(v.to_vec()), dev);
    let Device::Cuda(ord) = p.dev else {
        return Err(Error::Input("adamw parity needs a CUDA device".into()));
    };
    let dev = super::CudaDevice::get(ord)?;
    for gdt in [DType::F32, DType::BF16] {
        // Parameters (f32, or bf16-rounded for the half-precision case) and three gradients each.
        let half = gdt == DType::BF16;
        let mut p0 = Vec::new();
        let mut grads = Vec::new();
        for &n in &sizes {
            p0.push(p.randn(&[n], gdt, 1.0)?.to_dtype(DType::F32)?.to_vec::<f32>()?);
            let mut gs = Vec::new();
            for _ in 0..3 {
                gs.push(p.randn(&[n], gdt, 0.5)?);
            }
            grads.push(gs);
        }
        // CPU reference.
        let mut cpu: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = p0.iter().map(|v| (v.clone(), vec![0.0; v.len()], vec![0.0; v.len()])).collect();
        // Device: multi-tensor state, single-tensor state.
        let mut multi = Vec::new();
        let mut single = Vec::new();
        let mut halves = Vec::new();
        for v in &p0 {
            multi.push((
                up(v, &dev)?,
                CudaStorage::zeros_on(&dev, DType::F32, v.len())?,
                CudaStorage::zeros_on(&dev, DType::F32, v.len())?,
            ));
            single.push((
                up(v, &dev)?,
                CudaStorage::zeros_on(&dev, DType::F32, v.len())?,
                CudaStorage::zeros_on(&dev, DType::F32, v.len())?,
            ));
            halves.push(CudaStorage::from_cpu(&CpuStorage::BF16(v.iter().map(|&x| half::bf16::from_f32(x)).collect()), &dev)?);
        }
        for s in 1..=3u64 {
            let h = AdamWStep { step: s, ..base };
            let gd: Vec<CudaStorage> = grads
                .iter()
                .map(|g| match &*g[s as usize - 1].contiguous_storage()? {
                    Storage::Cpu(c) => CudaStorage::from_cpu(c, &dev),
                    Storage::Cuda(c) => c.try_clone(),
                })
                .collect::<Result<_>>()?;
            for (i, (pp, m, v)) in cpu.iter_mut().enumerate() {
                let g = grads[i][s as usize - 1].to_dtype(DType::F32)?.to_vec::<f32>()?;
                crate::backend::cpu::adamw::step(pp, &g, m, v, &AdamWStep { lr: base.lr * lr_scales[i], ..h });
            }
            for (i, (pp, m, v)) in single.iter_mut().enumerate() {
                if let Err(e) = step(pp, &gd[i], m, v, &AdamWStep { lr: base.lr * lr_scales[i], ..h }) {
                    p.fail("adamw/step (single, ref)", &format!("n={}", sizes[i]), gdt, &e);
                }
            }
            let mut items: Vec<MultiItem<'_>> = multi
                .iter_mut()
                .zip(halves.iter_mut())
                .zip(&gd)
                .enumerate()
                .map(|(i, (((pp, m, v), hp), g))| MultiItem {
                    param: pp,
                    half: if half { Some(hp) } else { None },
                    grad: g,
                    m,
                    v,
                    lr: base.lr * lr_scales[i],
                })
                .collect();
            if let Err(e) = step_multi(&mut items, &h) {
                p.fail("adamw/multi", &format!("step {s}"), gdt, &e);
            }
        }
        let t = |v: &[f32]| Tensor::from_vec(v.to_vec(), &[v.len()], Device::Cpu);
        let g32 = |s: &CudaStorage| Tensor::from_storage(Storage::Cuda(s.try_clone()?), &[s.len()]);
        for (i, (pp, m, v)) in cpu.iter().enumerate() {
            let case = format!("n={} lr×{} 3 steps, grad {gdt}", sizes[i], lr_scales[i]);
            let (cp, cm, cv) = (t(pp)?, t(m)?, t(v)?);
            p.check("adamw/multi p", &case, &cp, &g32(&multi[i].0)?);
            p.check("adamw/multi m", &case, &cm, &g32(&multi[i].1)?);
            p.check("adamw/multi v", &case, &cv, &g32(&multi[i].2)?);
            p.check("adamw/step (single, ref) p", &case, &cp, &g32(&single[i].0)?);
            p.check("adamw/step (single, ref) v", &case, &cv, &g32(&single[i].2)?);
            if half {
                let want = cp.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
                p.check("adamw/multi bf16 param", &case, &want, &Tensor::from_storage(Storage::Cuda(halves[i].try_clone()?), &[sizes[i]])?);
            }
        }

        // The optimizer on device parameters (one multi-tensor launch per step), f32 or bf16 weights.
        let params: Vec<Tensor> =
            p0.iter().map(|v| t(v)?.to_dtype(gdt)?.to_device(p.dev).map(|x| x.requires_grad())).collect::<Result<_>>()?;
        let mut opt = crate::optim::AdamW::with_lr_scales(params.iter().cloned().zip(lr_scales).collect(), base.lr);
        (opt.beta2, opt.eps, opt.weight_decay) = (base.beta2, base.eps, base.weight_decay);
        let mut ok = true;
        for s in 0..3 {
            // loss = Σ_i Σ p_i ∘ c_i, so grad p_i = c_i (in the parameter's dtype).
            let cs: Vec<Tensor> = grads.iter().map(|g| p.gpu(&g[s])).collect::<Result<_>>()?;
            let r = (|| -> Result<()> {
                let mut loss: Option<Tensor> = None;
                for (pt, c) in params.iter().zip(&cs) {
                    let term = crate::ops::sum(&crate::ops::mul(pt, c)?)?;
                    loss = Some(match loss {
                        None => term,
                        Some(l) => crate::ops::add(&l, &term)?,
                    });
                }
                let g = loss.ok_or_else(|| Error::Input("no parameters".into()))?.backward()?;
                opt.step(&g)
            })();
            if let Err(e) = r {
                p.fail("adamw/optim step", &format!("step {}", s + 1), gdt, &e);
                ok = false;
                break;
            }
        }
        if ok {
            for (i, (pp, _, _)) in cpu.iter().enumerate() {
                let case = format!("n={} lr×{} 3 steps, {gdt} weights", sizes[i], lr_scales[i]);
                let want = if half { t(pp)?.to_dtype(DType::BF16)?.to_dtype(DType::F32)? } else { t(pp)? };
                p.check("adamw/optim params", &case, &want, &params[i]);
            }
        }
    }
    Ok(())
}
