//! Backends own storage and implement the op list. Model and trainer code only sees [`crate::Tensor`];
//! a tensor's [`Device`] picks the backend at run time. The CPU backend is always compiled; the CUDA
//! backend slots in behind the `cuda` cargo feature as another [`Storage`] variant implementing
//! [`BackendStorage`], so nothing above this module changes.

pub mod cpu;
pub mod cuda;

use crate::error::Result;
use crate::tensor::{DType, Layout};
pub use cpu::adamw::AdamWStep;
pub use cpu::attention::AttnShape;
pub use cpu::CpuStorage;
pub use cuda::CudaStorage;
use std::borrow::Cow;

/// Where a tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// Host memory, computed by the CPU backend.
    #[default]
    Cpu,
    /// The CUDA device with this ordinal, computed by the CUDA backend.
    Cuda(usize),
}

impl Device {
    /// Parses `cpu`, `cuda` (device 0) or `cuda:N`. A CUDA device is checked to exist, so a
    /// machine without a GPU gets a clear error here rather than at the first op.
    pub fn parse(s: &str) -> Result<Device> {
        let d = match s {
            "cpu" => return Ok(Device::Cpu),
            "cuda" | "gpu" => Device::Cuda(0),
            s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Device::Cuda(i),
                _ => return Err(crate::Error::Input(format!("unknown device `{s}` (expected `cpu`, `cuda` or `cuda:N`)"))),
            },
        };
        d.check()?;
        Ok(d)
    }

    /// Errors unless the device can be used on this machine (always true for the CPU).
    pub fn check(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(i) => cuda::CudaDevice::get(i).map(|_| ()),
        }
    }

    /// Whether this is a CUDA device.
    pub fn is_cuda(self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// Waits until all work queued on this device has finished (a no-op on the CPU, whose ops
    /// return when done). Timings of GPU work read the clock after this.
    pub fn synchronize(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(i) => cuda::CudaDevice::get(i)?.synchronize(),
        }
    }

    /// The device memory the backend's allocations hold and their high-water marks; `None` on the
    /// CPU (whose measure is the process's peak resident set).
    pub fn memory(self) -> Result<Option<cuda::MemStats>> {
        match self {
            Device::Cpu => Ok(None),
            Device::Cuda(i) => cuda::CudaDevice::get(i)?.mem_stats().map(Some),
        }
    }

    /// Restarts [`Device::memory`]'s high-water marks from the current use (no-op on the CPU).
    pub fn reset_peak_memory(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(i) => cuda::CudaDevice::get(i)?.reset_peak(),
        }
    }
}

/// Elementwise binary operations on same-shaped operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
}

/// A batched matrix multiply `C[b] = op(A[b]) · op(B[b])`; `b_batched = false` broadcasts one B.
#[derive(Clone, Copy, Debug)]
pub struct MatmulParams {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub b_batched: bool,
}

/// Masks of an attention call (see [`cpu::attention::AttnMask`] for the semantics).
pub struct AttnMasks<'a, S> {
    pub causal: bool,
    pub q_offset: usize,
    /// U8 [batch, kv_cap], 1 = real key.
    pub key_mask: Option<&'a S>,
    /// U32 [batch, kv_cap] segment ids of packed sequences.
    pub segment_ids: Option<&'a S>,
    pub window: Option<usize>,
}

/// The op list a backend implements. Inputs are contiguous storages of matching dtype; shapes were
/// checked by the op layer (`crate::ops`), which also owns the autograd wiring.
pub trait BackendStorage: Sized + Send + Sync {
    fn device(&self) -> Device;
    fn dtype(&self) -> DType;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A zero-filled storage of `n` elements.
    fn zeros(device: Device, dtype: DType, n: usize) -> Result<Self>;
    /// A contiguous copy of the elements `layout` views.
    fn copy_strided(&self, layout: &Layout) -> Result<Self>;
    /// Converts a contiguous storage to another dtype.
    fn to_dtype(&self, dtype: DType) -> Result<Self>;
    /// Elementwise `self op rhs`.
    fn binary(&self, rhs: &Self, op: BinaryOp) -> Result<Self>;
    /// `self · mul + add`.
    fn affine(&self, mul: f64, add: f64) -> Result<Self>;
    /// In-place `self += rhs` (gradient accumulation).
    fn add_assign(&mut self, rhs: &Self) -> Result<()>;
    /// Adds a [cols] row to every row of a [rows, cols] matrix (bias add).
    fn add_row(&self, row: &Self, cols: usize) -> Result<Self>;
    /// Multiplies every row of a [rows, cols] matrix by a [cols] row, elementwise.
    fn mul_row(&self, row: &Self, cols: usize) -> Result<Self>;
    /// For each of `outer` blocks, copies `len` elements of `src` (block stride `len`) into `self`
    /// at `o·dst_stride + dst_offset` (appending to a KV cache).
    fn write_blocks(&mut self, src: &Self, outer: usize, len: usize, dst_stride: usize, dst_offset: usize) -> Result<()>;
    /// Column sums of a [rows, cols] matrix.
    fn sum_rows(&self, rows: usize, cols: usize) -> Result<Self>;
    /// Sum of all elements as f64.
    fn sum_all(&self) -> Result<f64>;
    fn matmul(&self, rhs: &Self, p: &MatmulParams) -> Result<Self>;
    /// Gathers rows of a [vocab, dim] table for U32 ids.
    fn embedding(&self, ids: &Self, dim: usize) -> Result<Self>;
    fn embedding_backward(dy: &Self, ids: &Self, vocab: usize, dim: usize) -> Result<Self>;
    /// Returns (y, rstd).
    fn rms_norm(&self, w: &Self, dim: usize, eps: f64) -> Result<(Self, Self)>;
    /// Returns (dx, dw).
    fn rms_norm_backward(&self, w: &Self, rstd: &Self, dy: &Self, dim: usize) -> Result<(Self, Self)>;
    /// Rotates [tokens, heads, head_dim] by tables [tokens, head_dim/2]; `inverse` for backward.
    fn rope(&self, cos: &Self, sin: &Self, heads: usize, head_dim: usize, inverse: bool) -> Result<Self>;
    /// Returns (out, lse).
    fn attention(q: &Self, k: &Self, v: &Self, s: &AttnShape, m: &AttnMasks<'_, Self>, scale: f64) -> Result<(Self, Self)>;
    /// Returns (dq, dk, dv).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        q: &Self,
        k: &Self,
        v: &Self,
        out: &Self,
        lse: &Self,
        d_out: &Self,
        s: &AttnShape,
        m: &AttnMasks<'_, Self>,
        scale: f64,
    ) -> Result<(Self, Self, Self)>;
    fn swiglu(gate: &Self, up: &Self) -> Result<Self>;
    /// Returns (dgate, dup).
    fn swiglu_backward(gate: &Self, up: &Self, dy: &Self) -> Result<(Self, Self)>;
    /// Per-row (nll, lse) of [rows, vocab] logits against I64 targets (-100 ignored).
    fn token_nll(&self, targets: &Self, vocab: usize) -> Result<(Self, Self)>;
    fn token_nll_backward(&self, targets: &Self, lse: &Self, g: &Self, vocab: usize) -> Result<Self>;
    /// Per-row KL(softmax(self) ‖ softmax(reference)) of [rows, vocab] logits.
    fn kl_rows(&self, reference: &Self, vocab: usize) -> Result<Self>;
    /// d kl_rows / d self for upstream gradients `g` per row.
    fn kl_rows_backward(&self, reference: &Self, g: &Self, vocab: usize) -> Result<Self>;
    /// One AdamW update of an F32 parameter with F32 state.
    fn adamw_step(&mut self, grad: &Self, m: &mut Self, v: &mut Self, h: &AdamWStep) -> Result<()>;
}

/// A tensor's storage on whichever device it lives.
#[derive(Debug, Clone)]
pub enum Storage {
    Cpu(CpuStorage),
    Cuda(CudaStorage),
}

impl Storage {
    /// The elements in host memory: borrowed for CPU storage, copied from the device otherwise.
    pub fn to_cpu(&self) -> Result<Cow<'_, CpuStorage>> {
        match self {
            Storage::Cpu(s) => Ok(Cow::Borrowed(s)),
            Storage::Cuda(s) => Ok(Cow::Owned(s.to_cpu()?)),
        }
    }

    /// This storage on `device` (a copy unless it already lives there).
    pub fn to_device(&self, device: Device) -> Result<Storage> {
        match (self, device) {
            (Storage::Cpu(s), Device::Cpu) => Ok(Storage::Cpu(s.clone())),
            (Storage::Cpu(s), Device::Cuda(i)) => Ok(Storage::Cuda(CudaStorage::from_cpu(s, &cuda::CudaDevice::get(i)?)?)),
            (Storage::Cuda(s), Device::Cpu) => Ok(Storage::Cpu(s.to_cpu()?)),
            (Storage::Cuda(s), Device::Cuda(i)) if s.dev.ordinal == i => Ok(Storage::Cuda(s.try_clone()?)),
            (Storage::Cuda(s), Device::Cuda(i)) => {
                Ok(Storage::Cuda(CudaStorage::from_cpu(&s.to_cpu()?, &cuda::CudaDevice::get(i)?)?))
            }
        }
    }
}

/// The error for operands on different devices.
fn mixed(devices: &[Device]) -> crate::Error {
    crate::Error::Input(format!("operands live on different devices: {devices:?} (move them with Tensor::to_device)"))
}

/// Unwraps same-device operands into the backend's own storage type; `wrap` in `$body` is the
/// `Storage` variant of that backend. Operands on different devices are an error.
macro_rules! dispatch {
    ($w:ident; $a:ident => $body:expr) => {
        match $a {
            Storage::Cpu($a) => {
                let $w = Storage::Cpu;
                let _ = $w;
                $body
            }
            Storage::Cuda($a) => {
                let $w = Storage::Cuda;
                let _ = $w;
                $body
            }
        }
    };
    ($w:ident; $($a:ident),+ => $body:expr) => {{
        let devices = [$($a.device()),+];
        match ($($a,)+) {
            ($(Storage::Cpu($a),)+) => {
                let $w = Storage::Cpu;
                let _ = $w;
                $body
            }
            ($(Storage::Cuda($a),)+) => {
                let $w = Storage::Cuda;
                let _ = $w;
                $body
            }
            _ => Err(mixed(&devices)),
        }
    }};
}

/// The masks with their storages unwrapped for the backend of `like` (an error when a mask lives
/// on another device).
fn masks_for<'a, S: 'a>(m: &AttnMasks<'a, Storage>, pick: impl Fn(&'a Storage) -> Option<&'a S>) -> Result<AttnMasks<'a, S>> {
    let conv = |x: Option<&'a Storage>| -> Result<Option<&'a S>> {
        match x {
            None => Ok(None),
            Some(s) => pick(s).map(Some).ok_or_else(|| crate::Error::Input("attention: a mask lives on another device than Q/K/V".into())),
        }
    };
    Ok(AttnMasks { causal: m.causal, q_offset: m.q_offset, key_mask: conv(m.key_mask)?, segment_ids: conv(m.segment_ids)?, window: m.window })
}
fn pick_cpu(s: &Storage) -> Option<&CpuStorage> {
    if let Storage::Cpu(c) = s { Some(c) } else { None }
}
fn pick_cuda(s: &Storage) -> Option<&CudaStorage> {
    if let Storage::Cuda(c) = s { Some(c) } else { None }
}

impl BackendStorage for Storage {
    fn device(&self) -> Device {
        let s = self;
        dispatch!(wrap; s => s.device())
    }
    fn dtype(&self) -> DType {
        let s = self;
        dispatch!(wrap; s => s.dtype())
    }
    fn len(&self) -> usize {
        let s = self;
        dispatch!(wrap; s => s.len())
    }
    fn zeros(device: Device, dtype: DType, n: usize) -> Result<Self> {
        match device {
            Device::Cpu => Ok(Storage::Cpu(CpuStorage::zeros(device, dtype, n)?)),
            Device::Cuda(_) => Ok(Storage::Cuda(CudaStorage::zeros(device, dtype, n)?)),
        }
    }
    fn copy_strided(&self, layout: &Layout) -> Result<Self> {
        let s = self;
        dispatch!(wrap; s => s.copy_strided(layout).map(wrap))
    }
    fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let s = self;
        dispatch!(wrap; s => s.to_dtype(dtype).map(wrap))
    }
    fn binary(&self, rhs: &Self, op: BinaryOp) -> Result<Self> {
        let a = self;
        dispatch!(wrap; a, rhs => a.binary(rhs, op).map(wrap))
    }
    fn affine(&self, mul: f64, add: f64) -> Result<Self> {
        let s = self;
        dispatch!(wrap; s => s.affine(mul, add).map(wrap))
    }
    fn add_assign(&mut self, rhs: &Self) -> Result<()> {
        let a = self;
        dispatch!(wrap; a, rhs => a.add_assign(rhs))
    }
    fn add_row(&self, row: &Self, cols: usize) -> Result<Self> {
        let a = self;
        dispatch!(wrap; a, row => a.add_row(row, cols).map(wrap))
    }
    fn mul_row(&self, row: &Self, cols: usize) -> Result<Self> {
        let a = self;
        dispatch!(wrap; a, row => a.mul_row(row, cols).map(wrap))
    }
    fn write_blocks(&mut self, src: &Self, outer: usize, len: usize, dst_stride: usize, dst_offset: usize) -> Result<()> {
        let a = self;
        dispatch!(wrap; a, src => a.write_blocks(src, outer, len, dst_stride, dst_offset))
    }
    fn sum_rows(&self, rows: usize, cols: usize) -> Result<Self> {
        let s = self;
        dispatch!(wrap; s => s.sum_rows(rows, cols).map(wrap))
    }
    fn sum_all(&self) -> Result<f64> {
        let s = self;
        dispatch!(wrap; s => s.sum_all())
    }
    fn matmul(&self, rhs: &Self, p: &MatmulParams) -> Result<Self> {
        let a = self;
        dispatch!(wrap; a, rhs => a.matmul(rhs, p).map(wrap))
    }
    fn embedding(&self, ids: &Self, dim: usize) -> Result<Self> {
        let t = self;
        dispatch!(wrap; t, ids => t.embedding(ids, dim).map(wrap))
    }
    fn embedding_backward(dy: &Self, ids: &Self, vocab: usize, dim: usize) -> Result<Self> {
        dispatch!(wrap; dy, ids => BackendStorage::embedding_backward(dy, ids, vocab, dim).map(wrap))
    }
    fn rms_norm(&self, w: &Self, dim: usize, eps: f64) -> Result<(Self, Self)> {
        let x = self;
        dispatch!(wrap; x, w => x.rms_norm(w, dim, eps).map(|(a, b)| (wrap(a), wrap(b))))
    }
    fn rms_norm_backward(&self, w: &Self, rstd: &Self, dy: &Self, dim: usize) -> Result<(Self, Self)> {
        let x = self;
        dispatch!(wrap; x, w, rstd, dy => x.rms_norm_backward(w, rstd, dy, dim).map(|(a, b)| (wrap(a), wrap(b))))
    }
    fn rope(&self, cos: &Self, sin: &Self, heads: usize, head_dim: usize, inverse: bool) -> Result<Self> {
        let x = self;
        dispatch!(wrap; x, cos, sin => x.rope(cos, sin, heads, head_dim, inverse).map(wrap))
    }
    fn attention(q: &Self, k: &Self, v: &Self, s: &AttnShape, m: &AttnMasks<'_, Self>, scale: f64) -> Result<(Self, Self)> {
        match (q, k, v) {
            (Storage::Cpu(q), Storage::Cpu(k), Storage::Cpu(v)) => {
                let m = masks_for(m, pick_cpu)?;
                BackendStorage::attention(q, k, v, s, &m, scale).map(|(a, b)| (Storage::Cpu(a), Storage::Cpu(b)))
            }
            (Storage::Cuda(q), Storage::Cuda(k), Storage::Cuda(v)) => {
                let m = masks_for(m, pick_cuda)?;
                BackendStorage::attention(q, k, v, s, &m, scale).map(|(a, b)| (Storage::Cuda(a), Storage::Cuda(b)))
            }
            _ => Err(mixed(&[q.device(), k.device(), v.device()])),
        }
    }
    fn attention_backward(
        q: &Self,
        k: &Self,
        v: &Self,
        out: &Self,
        lse: &Self,
        d_out: &Self,
        s: &AttnShape,
        m: &AttnMasks<'_, Self>,
        scale: f64,
    ) -> Result<(Self, Self, Self)> {
        match (q, k, v, out, lse, d_out) {
            (Storage::Cpu(q), Storage::Cpu(k), Storage::Cpu(v), Storage::Cpu(o), Storage::Cpu(l), Storage::Cpu(d)) => {
                let m = masks_for(m, pick_cpu)?;
                BackendStorage::attention_backward(q, k, v, o, l, d, s, &m, scale).map(|(a, b, c)| (Storage::Cpu(a), Storage::Cpu(b), Storage::Cpu(c)))
            }
            (Storage::Cuda(q), Storage::Cuda(k), Storage::Cuda(v), Storage::Cuda(o), Storage::Cuda(l), Storage::Cuda(d)) => {
                let m = masks_for(m, pick_cuda)?;
                BackendStorage::attention_backward(q, k, v, o, l, d, s, &m, scale).map(|(a, b, c)| (Storage::Cuda(a), Storage::Cuda(b), Storage::Cuda(c)))
            }
            _ => Err(mixed(&[q.device(), k.device(), v.device(), out.device(), lse.device(), d_out.device()])),
        }
    }
    fn swiglu(gate: &Self, up: &Self) -> Result<Self> {
        dispatch!(wrap; gate, up => BackendStorage::swiglu(gate, up).map(wrap))
    }
    fn swiglu_backward(gate: &Self, up: &Self, dy: &Self) -> Result<(Self, Self)> {
        dispatch!(wrap; gate, up, dy => BackendStorage::swiglu_backward(gate, up, dy).map(|(a, b)| (wrap(a), wrap(b))))
    }
    fn token_nll(&self, targets: &Self, vocab: usize) -> Result<(Self, Self)> {
        let z = self;
        dispatch!(wrap; z, targets => z.token_nll(targets, vocab).map(|(a, b)| (wrap(a), wrap(b))))
    }
    fn token_nll_backward(&self, targets: &Self, lse: &Self, g: &Self, vocab: usize) -> Result<Self> {
        let z = self;
        dispatch!(wrap; z, targets, lse, g => z.token_nll_backward(targets, lse, g, vocab).map(wrap))
    }
    fn kl_rows(&self, reference: &Self, vocab: usize) -> Result<Self> {
        let z = self;
        dispatch!(wrap; z, reference => z.kl_rows(reference, vocab).map(wrap))
    }
    fn kl_rows_backward(&self, reference: &Self, g: &Self, vocab: usize) -> Result<Self> {
        let z = self;
        dispatch!(wrap; z, reference, g => z.kl_rows_backward(reference, g, vocab).map(wrap))
    }
    fn adamw_step(&mut self, grad: &Self, m: &mut Self, v: &mut Self, h: &AdamWStep) -> Result<()> {
        let p = self;
        dispatch!(wrap; p, grad, m, v => p.adamw_step(grad, m, v, h))
    }
}
