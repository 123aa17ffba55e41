//! One CUDA device: its context, stream, BLAS handles and the kernel modules loaded on it.
//!
//! cudarc loads `libcuda` lazily and *panics* when it is missing, so every entry point goes
//! through [`CudaDevice::get`], which first probes the libraries with `dlopen` and asks the driver
//! for a device count, turning every absence into an [`Error::Unsupported`] that says what is
//! missing.

use crate::error::{Error, Result};
use cudarc::cublas::CudaBlas;
use cudarc::cublaslt::CudaBlasLT;
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchConfig};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// A device in use.
pub struct CudaDevice {
    pub ordinal: usize,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// `sm_XY` of the device (CUBINs are compiled for exactly this).
    pub arch: String,
    pub name: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Kernel handles by file and name, with the dynamic shared memory each was raised to: a launch
    /// looks its kernel up here instead of asking the driver (`cuModuleGetFunction`) every time.
    functions: Mutex<HashMap<&'static str, KernelTable>>,
    /// cuBLASLt plans (descriptors + the heuristic's algorithm) by GEMM shape, see `gemm.rs`.
    pub(crate) gemm_plans: Mutex<HashMap<super::gemm::PlanKey, Arc<super::gemm::Plan>>>,
    blas: OnceLock<std::result::Result<CudaBlas, String>>,
    blaslt: OnceLock<std::result::Result<CudaBlasLT, String>>,
    workspace: OnceLock<std::result::Result<CudaSlice<u8>, String>>,
}

/// One kernel file's loaded kernels by name, with the dynamic shared memory each was raised to.
type KernelTable = HashMap<String, (CudaFunction, u32)>;

/// cuBLASLt workspace bytes (32 MiB, what Hopper's kernels want).
pub const LT_WORKSPACE: usize = 32 << 20;

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cuda:{} ({}, {})", self.ordinal, self.name, self.arch)
    }
}

/// Turns a cudarc error into ours, naming what was being done.
pub(crate) fn cuda_err<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> Error + '_ {
    move |e| Error::Unsupported(format!("CUDA: {what}: {e:?}"))
}

static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
static POISON: AtomicBool = AtomicBool::new(false);
static LAUNCHES: AtomicU64 = AtomicU64::new(0);

/// Kernel launches and cuBLASLt GEMMs queued so far by this process on every device: benchmarks
/// read it before and after a step to report launches per step.
pub fn launches() -> u64 {
    LAUNCHES.load(Ordering::Relaxed)
}

pub(crate) fn count_launch() {
    LAUNCHES.fetch_add(1, Ordering::Relaxed);
}

/// Device memory of the stream-ordered pool this backend allocates from, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemStats {
    /// Bytes held by live buffers now.
    pub used: u64,
    /// The most `used` has been since the device was opened or [`CudaDevice::reset_peak`].
    pub used_high: u64,
    /// Bytes the pool holds from the driver now (used + cached free blocks).
    pub reserved: u64,
    /// The most `reserved` has been.
    pub reserved_high: u64,
}

/// Whether the CUDA driver can be loaded and reports at least one device. Never panics.
pub fn available() -> bool {
    device_count().map(|n| n > 0).unwrap_or(false)
}

/// The number of CUDA devices, or why there are none.
pub fn device_count() -> Result<usize> {
    // SAFETY: probes the driver library with dlopen only.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::Unsupported("no CUDA driver on this machine (libcuda.so could not be loaded)".into()));
    }
    let n = CudaContext::device_count().map_err(cuda_err("counting devices"))?;
    Ok(n.max(0) as usize)
}

/// Whether `TEMPER_CUDA_SYNC` is set: synchronise after every launch so a faulting kernel is
/// named (read once; launches are a hot path).
pub fn sync_each_launch() -> bool {
    static SYNC: OnceLock<bool> = OnceLock::new();
    *SYNC.get_or_init(|| std::env::var_os("TEMPER_CUDA_SYNC").is_some())
}

/// When set, every kernel output is filled with 0xFF bytes (NaN for floats) before the kernel
/// runs, so parity checks catch elements a kernel forgot to write.
pub fn set_poison_outputs(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

impl CudaDevice {
    /// The device `ordinal`, created on first use.
    pub fn get(ordinal: usize) -> Result<Arc<CudaDevice>> {
        let map = DEVICES.get_or_init(|| Mutex::new(HashMap::new()));
        let mut map = map.lock().map_err(|_| Error::Unsupported("CUDA device table poisoned by an earlier panic".into()))?;
        if let Some(d) = map.get(&ordinal) {
            return Ok(d.clone());
        }
        let n = device_count()?;
        if ordinal >= n {
            return Err(Error::Input(format!("device cuda:{ordinal} does not exist: this machine has {n} CUDA device(s)")));
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("creating the context"))?;
        // One stream per device and no cross-stream use: per-slice events would only cost time.
        // SAFETY: all work of this backend is ordered on `stream`.
        unsafe { ctx.disable_event_tracking() };
        let (maj, min) = ctx.compute_capability().map_err(cuda_err("reading the compute capability"))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let stream = ctx.default_stream();
        let dev = Arc::new(CudaDevice {
            ordinal,
            ctx,
            stream,
            arch: format!("sm_{maj}{min}"),
            name,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            gemm_plans: Mutex::new(HashMap::new()),
            blas: OnceLock::new(),
            blaslt: OnceLock::new(),
            workspace: OnceLock::new(),
        });
        // Freed blocks stay in the pool instead of going back to the driver at every synchronise:
        // from the second training step on, allocations are served from memory the pool already
        // holds (no cuMemMap/unmap inside the step), as PyTorch's caching allocator does.
        let _ = dev.set_pool_attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX);
        map.insert(ordinal, dev.clone());
        Ok(dev)
    }

    /// The kernel `name` of the file `module` (compiled for this device on first use).
    pub fn func(&self, module: &'static str, name: &str) -> Result<CudaFunction> {
        let m = {
            let mut mods = self.modules.lock().map_err(|_| Error::Unsupported("CUDA module table poisoned".into()))?;
            match mods.get(module) {
                Some(m) => m.clone(),
                None => {
                    let src = temper_kernels::source(module).ok_or_else(|| Error::Unsupported(format!("no kernel file `{module}.cu`")))?;
                    let cubin = temper_kernels::cubin(src, &self.arch).map_err(Error::Unsupported)?;
                    let m = self.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin)).map_err(cuda_err("loading a kernel module"))?;
                    mods.insert(module, m.clone());
                    m
                }
            }
        };
        m.load_function(name).map_err(|e| Error::Unsupported(format!("CUDA: kernel `{name}` in {module}.cu: {e:?}")))
    }

    /// A kernel and the dynamic shared memory it may use, raising the kernel's limit the first
    /// time a launch asks for more than the default 48 KiB.
    pub fn kernel(&self, module: &'static str, name: &str, smem: u32) -> Result<CudaFunction> {
        let mut fns = self.functions.lock().map_err(|_| Error::Unsupported("CUDA function table poisoned".into()))?;
        let per_file = fns.entry(module).or_default();
        if let Some((f, raised)) = per_file.get_mut(name) {
            if smem <= (*raised).max(48 * 1024) {
                return Ok(f.clone());
            }
        }
        let f = self.func(module, name)?;
        if smem > 48 * 1024 {
            f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32).map_err(cuda_err("raising the shared-memory limit"))?;
        }
        let raised = per_file.get(name).map_or(smem, |(_, r)| (*r).max(smem));
        per_file.insert(name.to_string(), (f.clone(), raised));
        Ok(f)
    }

    fn mem_pool(&self) -> Result<sys::CUmemoryPool> {
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: writes one pool handle for a valid device.
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, self.ctx.cu_device()) }.result().map_err(cuda_err("reading the memory pool"))?;
        Ok(pool)
    }

    fn set_pool_attribute(&self, attr: sys::CUmemPool_attribute, value: u64) -> Result<()> {
        let pool = self.mem_pool()?;
        let mut v = value;
        // SAFETY: the attributes set here (release threshold, high-water resets) take a u64 (cuuint64_t).
        unsafe { sys::cuMemPoolSetAttribute(pool, attr, &mut v as *mut u64 as *mut std::ffi::c_void) }.result().map_err(cuda_err("setting a memory-pool attribute"))
    }

    /// What the stream-ordered pool holds (see [`MemStats`]). The cuBLASLt workspace counts; the
    /// CUDA context and loaded modules do not (as in PyTorch's `max_memory_allocated`).
    pub fn mem_stats(&self) -> Result<MemStats> {
        self.synchronize()?;
        let pool = self.mem_pool()?;
        let get = |attr| -> Result<u64> {
            let mut v = 0u64;
            // SAFETY: the four counters read here are u64 (cuuint64_t) attributes.
            unsafe { sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut std::ffi::c_void) }.result().map_err(cuda_err("reading a memory-pool counter"))?;
            Ok(v)
        };
        use sys::CUmemPool_attribute as A;
        Ok(MemStats {
            used: get(A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
            used_high: get(A::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            reserved: get(A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
            reserved_high: get(A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
        })
    }

    /// Starts the high-water marks of [`CudaDevice::mem_stats`] again from the current use.
    pub fn reset_peak(&self) -> Result<()> {
        self.synchronize()?;
        use sys::CUmemPool_attribute as A;
        // The driver only accepts 0, which resets the mark to the current value.
        self.set_pool_attribute(A::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0)?;
        self.set_pool_attribute(A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, 0)
    }

    /// cuBLAS (f32/f64 GEMMs in full precision).
    pub fn blas(&self) -> Result<&CudaBlas> {
        self.blas
            .get_or_init(|| {
                // SAFETY: dlopen probe only.
                if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                    return Err("cuBLAS (libcublas.so.13) cannot be loaded: put the CUDA toolkit's lib64 on LD_LIBRARY_PATH".into());
                }
                CudaBlas::new(self.stream.clone()).map_err(|e| format!("cublasCreate: {e:?}"))
            })
            .as_ref()
            .map_err(|e| Error::Unsupported(e.clone()))
    }

    /// cuBLASLt (bf16/f16 GEMMs with f32 accumulation).
    pub fn blaslt(&self) -> Result<&CudaBlasLT> {
        self.blaslt
            .get_or_init(|| {
                // SAFETY: dlopen probe only.
                if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
                    return Err("cuBLASLt (libcublasLt.so.13) cannot be loaded: put the CUDA toolkit's lib64 on LD_LIBRARY_PATH".into());
                }
                CudaBlasLT::new(self.stream.clone()).map_err(|e| format!("cublasLtCreate: {e:?}"))
            })
            .as_ref()
            .map_err(|e| Error::Unsupported(e.clone()))
    }

    /// The device address of the cuBLASLt workspace ([`LT_WORKSPACE`] bytes).
    pub fn lt_workspace(&self) -> Result<u64> {
        let ws = self
            .workspace
            .get_or_init(|| self.stream.alloc_zeros::<u8>(LT_WORKSPACE).map_err(|e| format!("allocating the cuBLASLt workspace: {e:?}")))
            .as_ref()
            .map_err(|e| Error::Unsupported(e.clone()))?;
        Ok(cudarc::driver::DevicePtr::device_ptr(ws, &self.stream).0)
    }

    /// An output buffer of `n` elements whose contents the kernel will overwrite (poisoned with
    /// 0xFF bytes in parity runs, see [`set_poison_outputs`]).
    pub fn alloc_out<T: DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: the caller's kernel writes every element; in parity runs they are poisoned first.
        let s = unsafe { self.stream.alloc::<T>(n.max(1)) }.map_err(cuda_err("allocating device memory"))?;
        if POISON.load(Ordering::Relaxed) {
            let bytes = n.max(1) * std::mem::size_of::<T>();
            let (p, _g) = cudarc::driver::DevicePtr::device_ptr(&s, &self.stream);
            // SAFETY: `p` points at `bytes` bytes owned by `s`, on this stream.
            unsafe { cudarc::driver::result::memset_d8_async(p, 0xFF, bytes, self.stream.cu_stream()) }.map_err(cuda_err("poisoning an output"))?;
        }
        Ok(s)
    }

    /// A zero-filled buffer.
    pub fn alloc_zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(n.max(1)).map_err(cuda_err("allocating device memory"))
    }

    /// Waits for all queued work (and surfaces asynchronous kernel errors).
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err("synchronizing"))
    }
}

/// A 1-D launch of `n` threads in blocks of `block`.
pub fn grid_1d(n: usize, block: u32) -> LaunchConfig {
    let blocks = n.div_ceil(block as usize).max(1) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}
