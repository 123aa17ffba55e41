//! Backends own storage and implement the op list. Model and trainer code only sees [`crate::Tensor`];
//! a tensor's [`Device`] picks the backend at run time. The CPU backend is always compiled; the CUDA
//! backend slots in behind the `cuda` cargo feature as another [`Storage`] variant implementing
//! [`BackendStorage`], so nothing above this module changes.

pub mod cpu;

use crate::error::Result;
use crate::tensor::{DType, Layout};
pub use cpu::adamw::AdamWStep;
pub use cpu::attention::AttnShape;
pub use cpu::CpuStorage;

/// Where a tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// Host memory, computed by the CPU backend.
    #[default]
    Cpu,
}

impl Device {
    /// Parses `cpu` (and, in builds with CUDA, `cuda` / `cuda:N`).
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            s if s.starts_with("cuda") => Err(crate::Error::Unsupported(format!(
                "device `{s}`: this build has no CUDA backend (the CUDA issue adds it behind the `cuda` feature)"
            ))),
            s => Err(crate::Error::Input(format!("unknown device `{s}` (expected `cpu`)"))),
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
}

impl Storage {
    /// The host storage; every storage is host storage in a build without CUDA.
    pub fn as_cpu(&self) -> &CpuStorage {
        match self {
            Storage::Cpu(s) => s,
        }
    }
}

/// Unwraps same-device operands into the backend's own storage type.
macro_rules! dispatch {
    ($($a:ident),+ => $body:expr) => {
        match ($($a,)+) {
            ($(Storage::Cpu($a),)+) => $body,
        }
    };
}

fn masks_cpu<'a>(m: &AttnMasks<'a, Storage>) -> AttnMasks<'a, CpuStorage> {
    AttnMasks {
        causal: m.causal,
        q_offset: m.q_offset,
        key_mask: m.key_mask.map(Storage::as_cpu),
        segment_ids: m.segment_ids.map(Storage::as_cpu),
        window: m.window,
    }
}

impl BackendStorage for Storage {
    fn device(&self) -> Device {
        let s = self;
        dispatch!(s => s.device())
    }
    fn dtype(&self) -> DType {
        let s = self;
        dispatch!(s => s.dtype())
    }
    fn len(&self) -> usize {
        let s = self;
        dispatch!(s => s.len())
    }
    fn zeros(device: Device, dtype: DType, n: usize) -> Result<Self> {
        match device {
            Device::Cpu => Ok(Storage::Cpu(CpuStorage::zeros(device, dtype, n)?)),
        }
    }
    fn copy_strided(&self, layout: &Layout) -> Result<Self> {
        let s = self;
        dispatch!(s => s.copy_strided(layout).map(Storage::Cpu))
    }
    fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let s = self;
        dispatch!(s => s.to_dtype(dtype).map(Storage::Cpu))
    }
    fn binary(&self, rhs: &Self, op: BinaryOp) -> Result<Self> {
        let a = self;
        dispatch!(a, rhs => a.binary(rhs, op).map(Storage::Cpu))
    }
    fn affine(&self, mul: f64, add: f64) -> Result<Self> {
        let s = self;
        dispatch!(s => s.affine(mul, add).map(Storage::Cpu))
    }
    fn add_assign(&mut self, rhs: &Self) -> Result<()> {
        let a = self;
        dispatch!(a, rhs => a.add_assign(rhs))
    }
    fn add_row(&self, row: &Self, cols: usize) -> Result<Self> {
        let a = self;
        dispatch!(a, row => a.add_row(row, cols).map(Storage::Cpu))
    }
    fn mul_row(&self, row: &Self, cols: usize) -> Result<Self> {
        let a = self;
        dispatch!(a, row => a.mul_row(row, cols).map(Storage::Cpu))
    }
    fn write_blocks(&mut self, src: &Self, outer: usize, len: usize, dst_stride: usize, dst_offset: usize) -> Result<()> {
        let a = self;
        dispatch!(a, src => a.write_blocks(src, outer, len, dst_stride, dst_offset))
    }
    fn sum_rows(&self, rows: usize, cols: usize) -> Result<Self> {
        let s = self;
        dispatch!(s => s.sum_rows(rows, cols).map(Storage::Cpu))
    }
    fn sum_all(&self) -> Result<f64> {
        let s = self;
        dispatch!(s => s.sum_all())
    }
    fn matmul(&self, rhs: &Self, p: &MatmulParams) -> Result<Self> {
        let a = self;
        dispatch!(a, rhs => a.matmul(rhs, p).map(Storage::Cpu))
    }
    fn embedding(&self, ids: &Self, dim: usize) -> Result<Self> {
        let t = self;
        dispatch!(t, ids => t.embedding(ids, dim).map(Storage::Cpu))
    }
    fn embedding_backward(dy: &Self, ids: &Self, vocab: usize, dim: usize) -> Result<Self> {
        dispatch!(dy, ids => CpuStorage::embedding_backward(dy, ids, vocab, dim).map(Storage::Cpu))
    }
    fn rms_norm(&self, w: &Self, dim: usize, eps: f64) -> Result<(Self, Self)> {
        let x = self;
        dispatch!(x, w => x.rms_norm(w, dim, eps).map(|(a, b)| (Storage::Cpu(a), Storage::Cpu(b))))
    }
    fn rms_norm_backward(&self, w: &Self, rstd: &Self, dy: &Self, dim: usize) -> Result<(Self, Self)> {
        let x = self;
        dispatch!(x, w, rstd, dy => x.rms_norm_backward(w, rstd, dy, dim).map(|(a, b)| (Storage::Cpu(a), Storage::Cpu(b))))
    }
    fn rope(&self, cos: &Self, sin: &Self, heads: usize, head_dim: usize, inverse: bool) -> Result<Self> {
        let x = self;
        dispatch!(x, cos, sin => x.rope(cos, sin, heads, head_dim, inverse).map(Storage::Cpu))
    }
    fn attention(q: &Self, k: &Self, v: &Self, s: &AttnShape, m: &AttnMasks<'_, Self>, scale: f64) -> Result<(Self, Self)> {
        let m = masks_cpu(m);
        dispatch!(q, k, v => CpuStorage::attention(q, k, v, s, &m, scale).map(|(a, b)| (Storage::Cpu(a), Storage::Cpu(b))))
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
        let m = masks_cpu(m);
        dispatch!(q, k, v, out, lse, d_out => CpuStorage::attention_backward(q, k, v, out, lse, d_out, s, &m, scale)
            .map(|(a, b, c)| (Storage::Cpu(a), Storage::Cpu(b), Storage::Cpu(c))))
    }
    fn swiglu(gate: &Self, up: &Self) -> Result<Self> {
        dispatch!(gate, up => CpuStorage::swiglu(gate, up).map(Storage::Cpu))
    }
    fn swiglu_backward(gate: &Self, up: &Self, dy: &Self) -> Result<(Self, Self)> {
        dispatch!(gate, up, dy => CpuStorage::swiglu_backward(gate, up, dy).map(|(a, b)| (Storage::Cpu(a), Storage::Cpu(b))))
    }
    fn token_nll(&self, targets: &Self, vocab: usize) -> Result<(Self, Self)> {
        let z = self;
        dispatch!(z, targets => z.token_nll(targets, vocab).map(|(a, b)| (Storage::Cpu(a), Storage::Cpu(b))))
    }
    fn token_nll_backward(&self, targets: &Self, lse: &Self, g: &Self, vocab: usize) -> Result<Self> {
        let z = self;
        dispatch!(z, targets, lse, g => z.token_nll_backward(targets, lse, g, vocab).map(Storage::Cpu))
    }
    fn kl_rows(&self, reference: &Self, vocab: usize) -> Result<Self> {
        let z = self;
        dispatch!(z, reference => z.kl_rows(reference, vocab).map(Storage::Cpu))
    }
    fn kl_rows_backward(&self, reference: &Self, g: &Self, vocab: usize) -> Result<Self> {
        let z = self;
        dispatch!(z, reference, g => z.kl_rows_backward(reference, g, vocab).map(Storage::Cpu))
    }
    fn adamw_step(&mut self, grad: &Self, m: &mut Self, v: &mut Self, h: &AdamWStep) -> Result<()> {
        let p = self;
        dispatch!(p, grad, m, v => p.adamw_step(grad, m, v, h))
    }
}
