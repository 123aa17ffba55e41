//! The CUDA backend: storage in device buffers, ops as hand-written kernels (`kernels/cuda/*.cu`,
//! compiled by NVRTC for the device's architecture at first use) and GEMMs through cuBLAS(Lt).
//!
//! Compiled into every build: cudarc loads the CUDA libraries at run time, so a machine without
//! CUDA builds and runs the CPU backend, and asking it for `cuda` gives a clear error
//! ([`device::CudaDevice::get`]). Each op lives in its own file beside its kernel's name; every
//! kernel has a parity check against the CPU backend in [`parity`].

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod device;
pub mod elementwise;
pub mod embedding;
pub mod gemm;
pub mod lora;
pub mod nf4;
pub mod parity;
pub mod reduce;
pub mod rms_norm;
pub mod rope;
pub mod swiglu;

use super::{AttnMasks, AttnShape, BackendStorage, BinaryOp, CpuStorage, Device, MatmulParams};
use crate::error::{Error, Result};
use crate::tensor::{DType, Layout};
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
pub use device::{available, device_count, launches, set_poison_outputs, CudaDevice, MemStats};
use half::{bf16, f16};
use std::sync::Arc;

/// A device buffer of one dtype.
pub enum CudaData {
    F32(CudaSlice<f32>),
    F64(CudaSlice<f64>),
    BF16(CudaSlice<bf16>),
    F16(CudaSlice<f16>),
    I64(CudaSlice<i64>),
    U32(CudaSlice<u32>),
    U8(CudaSlice<u8>),
}

/// Device storage: a buffer, its logical length (buffers are never empty on the device) and the
/// device it lives on.
pub struct CudaStorage {
    pub data: CudaData,
    len: usize,
    pub dev: Arc<CudaDevice>,
}

macro_rules! each {
    ($d:expr, |$s:ident| $body:expr) => {
        match $d {
            CudaData::F32($s) => $body,
            CudaData::F64($s) => $body,
            CudaData::BF16($s) => $body,
            CudaData::F16($s) => $body,
            CudaData::I64($s) => $body,
            CudaData::U32($s) => $body,
            CudaData::U8($s) => $body,
        }
    };
}

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaStorage({:?}, {}, {})", self.dev, self.dtype(), self.len)
    }
}

impl Clone for CudaStorage {
    /// A device-to-device copy. Allocation failure here (out of device memory) cannot be
    /// returned through `Clone`, so it aborts with the driver's message; prefer [`CudaStorage::try_clone`].
    fn clone(&self) -> Self {
        match self.try_clone() {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }
}

/// A kernel argument.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// A device pointer.
    P(u64),
    U64(u64),
    I64(i64),
    U32(u32),
    I32(i32),
    F32(f32),
    F64(f64),
}

/// Launches `module.cu`'s kernel `name` on `dev`'s stream. Shared memory above the 48 KiB default
/// is opted into automatically.
pub fn launch(dev: &CudaDevice, module: &'static str, name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
    let f = dev.kernel(module, name, cfg.shared_mem_bytes)?;
    device::count_launch();
    let mut b = dev.stream.launch_builder(&f);
    for a in args {
        match a {
            Arg::P(v) | Arg::U64(v) => b.arg(v),
            Arg::I64(v) => b.arg(v),
            Arg::U32(v) => b.arg(v),
            Arg::I32(v) => b.arg(v),
            Arg::F32(v) => b.arg(v),
            Arg::F64(v) => b.arg(v),
        };
    }
    // SAFETY: the argument list matches the kernel's signature (each op file states it beside the
    // launch) and every pointer is a live buffer of this device sized by the op's shape checks.
    unsafe { b.launch(cfg) }.map_err(|e| Error::Unsupported(format!("CUDA: launching {module}.cu:{name}: {e:?}")))?;
    if device::sync_each_launch() {
        dev.synchronize().map_err(|e| Error::Unsupported(format!("{e} (after {module}.cu:{name})")))?;
    }
    Ok(())
}

/// The kernel-name suffix of a dtype (`rms_norm_fwd_` + `f32`).
pub fn sfx(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::I64 => "i64",
        DType::U32 => "u32",
        DType::U8 => "u8",
    }
}

impl CudaStorage {
    /// Wraps a buffer holding `len` logical elements.
    pub fn new(data: CudaData, len: usize, dev: Arc<CudaDevice>) -> CudaStorage {
        CudaStorage { data, len, dev }
    }

    /// An output buffer the next kernel fills (poisoned in parity runs).
    pub fn alloc_out(dev: &Arc<CudaDevice>, dtype: DType, n: usize) -> Result<CudaStorage> {
        let data = match dtype {
            DType::F32 => CudaData::F32(dev.alloc_out(n)?),
            DType::F64 => CudaData::F64(dev.alloc_out(n)?),
            DType::BF16 => CudaData::BF16(dev.alloc_out(n)?),
            DType::F16 => CudaData::F16(dev.alloc_out(n)?),
            DType::I64 => CudaData::I64(dev.alloc_out(n)?),
            DType::U32 => CudaData::U32(dev.alloc_out(n)?),
            DType::U8 => CudaData::U8(dev.alloc_out(n)?),
        };
        Ok(CudaStorage { data, len: n, dev: dev.clone() })
    }

    /// A zero-filled buffer.
    pub fn zeros_on(dev: &Arc<CudaDevice>, dtype: DType, n: usize) -> Result<CudaStorage> {
        let data = match dtype {
            DType::F32 => CudaData::F32(dev.alloc_zeros(n)?),
            DType::F64 => CudaData::F64(dev.alloc_zeros(n)?),
            DType::BF16 => CudaData::BF16(dev.alloc_zeros(n)?),
            DType::F16 => CudaData::F16(dev.alloc_zeros(n)?),
            DType::I64 => CudaData::I64(dev.alloc_zeros(n)?),
            DType::U32 => CudaData::U32(dev.alloc_zeros(n)?),
            DType::U8 => CudaData::U8(dev.alloc_zeros(n)?),
        };
        Ok(CudaStorage { data, len: n, dev: dev.clone() })
    }

    /// Copies host storage to the device.
    pub fn from_cpu(s: &CpuStorage, dev: &Arc<CudaDevice>) -> Result<CudaStorage> {
        let st = &dev.stream;
        let err = device::cuda_err("copying to the device");
        let n = s.len();
        macro_rules! up {
            ($v:expr, $var:ident, $zero:expr) => {{
                let data = if $v.is_empty() { st.clone_htod(&[$zero]) } else { st.clone_htod($v.as_slice()) };
                CudaData::$var(data.map_err(err)?)
            }};
        }
        let data = match s {
            CpuStorage::F32(v) => up!(v, F32, 0f32),
            CpuStorage::F64(v) => up!(v, F64, 0f64),
            CpuStorage::BF16(v) => up!(v, BF16, bf16::ZERO),
            CpuStorage::F16(v) => up!(v, F16, f16::ZERO),
            CpuStorage::I64(v) => up!(v, I64, 0i64),
            CpuStorage::U32(v) => up!(v, U32, 0u32),
            CpuStorage::U8(v) => up!(v, U8, 0u8),
        };
        Ok(CudaStorage { data, len: n, dev: dev.clone() })
    }

    /// Copies the storage to the host (waits for the queued kernels).
    pub fn to_cpu(&self) -> Result<CpuStorage> {
        let st = &self.dev.stream;
        let err = device::cuda_err("copying to the host");
        let n = self.len;
        Ok(match &self.data {
            CudaData::F32(s) => CpuStorage::F32(st.clone_dtoh(&s.slice(0..n)).map_err(err)?),
            CudaData::F64(s) => CpuStorage::F64(st.clone_dtoh(&s.slice(0..n)).map_err(err)?),
            CudaData::BF16(s) => CpuStorage::BF16(st.clone_dtoh(&s.slice(0..n)).map_err(err)?),
            CudaData::F16(s) => CpuStorage::F16(st.clone_dtoh(&s.slice(0..n)).map_err(err)?),
            CudaData::I64(s) => CpuStorage::I64(st.clone_dtoh(&s.slice(0..n)).map_err(err)?),
            CudaData::U32(s) => CpuStorage::U32(st.clone_dtoh(&s.slice(0..n)).map_err(err)?),
            CudaData::U8(s) => CpuStorage::U8(st.clone_dtoh(&s.slice(0..n)).map_err(err)?),
        })
    }

    /// A device-to-device copy.
    pub fn try_clone(&self) -> Result<CudaStorage> {
        let out = CudaStorage::alloc_out(&self.dev, self.dtype(), self.len)?;
        let bytes = self.len * self.dtype().size_in_bytes();
        if bytes > 0 {
            // SAFETY: both buffers hold at least `bytes` bytes on this device's stream.
            unsafe { cudarc::driver::result::memcpy_dtod_async(out.ptr(), self.ptr(), bytes, self.dev.stream.cu_stream()) }
                .map_err(device::cuda_err("copying on the device"))?;
        }
        Ok(out)
    }

    /// The raw device address (valid while `self` lives; all work is on the device's one stream).
    pub fn ptr(&self) -> u64 {
        each!(&self.data, |s| s.device_ptr(&self.dev.stream).0)
    }

    /// The pointer as a kernel argument.
    pub fn arg(&self) -> Arg {
        Arg::P(self.ptr())
    }

    /// The kernel-name suffix of this storage's dtype.
    pub fn sfx(&self) -> &'static str {
        sfx(self.dtype())
    }

    /// Errors unless `other` lives on the same device.
    pub fn same_device(&self, other: &CudaStorage, op: &'static str) -> Result<()> {
        if self.dev.ordinal != other.dev.ordinal {
            return Err(Error::Input(format!("{op}: operands on cuda:{} and cuda:{}", self.dev.ordinal, other.dev.ordinal)));
        }
        Ok(())
    }

    /// Errors unless every operand has `self`'s dtype and the dtype is a float type the kernels
    /// instantiate (F32, BF16, F16).
    pub fn float_op(&self, op: &'static str, others: &[&CudaStorage]) -> Result<()> {
        if !matches!(self.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::dtype(op, format!("the CUDA kernels take F32, BF16 or F16, got {}", self.dtype())));
        }
        for o in others {
            if o.dtype() != self.dtype() {
                return Err(Error::dtype(op, format!("operands disagree: {} and {}", self.dtype(), o.dtype())));
            }
            self.same_device(o, op)?;
        }
        Ok(())
    }
}

impl BackendStorage for CudaStorage {
    fn device(&self) -> Device {
        Device::Cuda(self.dev.ordinal)
    }
    fn dtype(&self) -> DType {
        match &self.data {
            CudaData::F32(_) => DType::F32,
            CudaData::F64(_) => DType::F64,
            CudaData::BF16(_) => DType::BF16,
            CudaData::F16(_) => DType::F16,
            CudaData::I64(_) => DType::I64,
            CudaData::U32(_) => DType::U32,
            CudaData::U8(_) => DType::U8,
        }
    }
    fn len(&self) -> usize {
        self.len
    }
    fn zeros(device: Device, dtype: DType, n: usize) -> Result<Self> {
        match device {
            Device::Cuda(i) => CudaStorage::zeros_on(&CudaDevice::get(i)?, dtype, n),
            Device::Cpu => Err(Error::Input("CudaStorage::zeros on the CPU".into())),
        }
    }
    fn copy_strided(&self, layout: &Layout) -> Result<Self> {
        elementwise::copy_strided(self, layout)
    }
    fn to_dtype(&self, dtype: DType) -> Result<Self> {
        if dtype == self.dtype() {
            return self.try_clone();
        }
        elementwise::to_dtype(self, dtype)
    }
    fn binary(&self, rhs: &Self, op: BinaryOp) -> Result<Self> {
        elementwise::binary(self, rhs, op)
    }
    fn affine(&self, mul: f64, add: f64) -> Result<Self> {
        elementwise::affine(self, mul, add)
    }
    fn add_assign(&mut self, rhs: &Self) -> Result<()> {
        elementwise::add_assign(self, rhs)
    }
    fn add_row(&self, row: &Self, cols: usize) -> Result<Self> {
        elementwise::add_row(self, row, cols)
    }
    fn mul_row(&self, row: &Self, cols: usize) -> Result<Self> {
        elementwise::mul_row(self, row, cols)
    }
    fn write_blocks(&mut self, src: &Self, outer: usize, len: usize, dst_stride: usize, dst_offset: usize) -> Result<()> {
        elementwise::write_blocks(self, src, outer, len, dst_stride, dst_offset)
    }
    fn sum_rows(&self, rows: usize, cols: usize) -> Result<Self> {
        reduce::sum_rows(self, rows, cols)
    }
    fn sum_all(&self) -> Result<f64> {
        reduce::sum_all(self)
    }
    fn matmul(&self, rhs: &Self, p: &MatmulParams) -> Result<Self> {
        gemm::matmul(self, rhs, p)
    }
    fn embedding(&self, ids: &Self, dim: usize) -> Result<Self> {
        embedding::forward(self, ids, dim)
    }
    fn embedding_backward(dy: &Self, ids: &Self, vocab: usize, dim: usize) -> Result<Self> {
        embedding::backward(dy, ids, vocab, dim)
    }
    fn rms_norm(&self, w: &Self, dim: usize, eps: f64) -> Result<(Self, Self)> {
        rms_norm::forward(self, w, dim, eps)
    }
    fn rms_norm_backward(&self, w: &Self, rstd: &Self, dy: &Self, dim: usize) -> Result<(Self, Self)> {
        rms_norm::backward(self, w, rstd, dy, dim)
    }
    fn rope(&self, cos: &Self, sin: &Self, heads: usize, head_dim: usize, inverse: bool) -> Result<Self> {
        rope::apply(self, cos, sin, heads, head_dim, inverse)
    }
    fn attention(q: &Self, k: &Self, v: &Self, s: &AttnShape, m: &AttnMasks<'_, Self>, scale: f64) -> Result<(Self, Self)> {
        attention::forward(q, k, v, s, m, scale)
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
        attention::backward(q, k, v, out, lse, d_out, s, m, scale)
    }
    fn swiglu(gate: &Self, up: &Self) -> Result<Self> {
        swiglu::forward(gate, up)
    }
    fn swiglu_backward(gate: &Self, up: &Self, dy: &Self) -> Result<(Self, Self)> {
        swiglu::backward(gate, up, dy)
    }
    fn token_nll(&self, targets: &Self, vocab: usize) -> Result<(Self, Self)> {
        cross_entropy::token_nll(self, targets, vocab)
    }
    fn token_nll_backward(&self, targets: &Self, lse: &Self, g: &Self, vocab: usize) -> Result<Self> {
        cross_entropy::token_nll_backward(self, targets, lse, g, vocab)
    }
    fn kl_rows(&self, reference: &Self, vocab: usize) -> Result<Self> {
        cross_entropy::kl_rows(self, reference, vocab)
    }
    fn kl_rows_backward(&self, reference: &Self, g: &Self, vocab: usize) -> Result<Self> {
        cross_entropy::kl_rows_backward(self, reference, g, vocab)
    }
    fn adamw_step(&mut self, grad: &Self, m: &mut Self, v: &mut Self, h: &super::AdamWStep) -> Result<()> {
        adamw::step(self, grad, m, v, h)
    }
}
