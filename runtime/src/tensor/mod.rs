//! [`Tensor`]: a shape-aware, reference-counted view of backend storage that records the op that made
//! it, so gradients can flow back through it ([`Tensor::backward`]).

mod dtype;
mod layout;

pub use dtype::{DType, HostType};
pub use layout::{contiguous_strides, Layout};

use crate::autograd::{self, GradFn};
use crate::backend::{BackendStorage, CpuStorage, Device, Storage};
use crate::error::{ensure_shape, Error, Result};
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Unique identity of a tensor handle (views and ops get new ids; clones share it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

struct Inner {
    id: TensorId,
    storage: Arc<RwLock<Storage>>,
    layout: Layout,
    grad_fn: Option<Arc<dyn GradFn>>,
    requires_grad: bool,
}

/// An n-dimensional array on a device, with reverse-mode autograd.
///
/// ```
/// use temper_runtime::{Tensor, Device};
/// let x = Tensor::from_vec(vec![1.0f32, 2.0, 3.0], &[3], Device::Cpu)?.requires_grad();
/// let y = temper_runtime::ops::mul(&x, &x)?;              // y = x²
/// let loss = temper_runtime::ops::sum(&y)?;
/// let grads = loss.backward()?;
/// assert_eq!(grads.get(&x).unwrap().to_vec::<f32>()?, vec![2.0, 4.0, 6.0]);
/// # Ok::<(), temper_runtime::Error>(())
/// ```
#[derive(Clone)]
pub struct Tensor(Arc<Inner>);

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {}, {:?})", self.shape(), self.dtype(), self.device())
    }
}

/// Storage seen as a contiguous buffer of exactly the tensor's elements: borrowed when the tensor
/// already is one, copied otherwise.
pub enum StorageRef<'a> {
    Borrowed(RwLockReadGuard<'a, Storage>),
    Owned(Storage),
}

impl Deref for StorageRef<'_> {
    type Target = Storage;
    fn deref(&self) -> &Storage {
        match self {
            StorageRef::Borrowed(g) => g,
            StorageRef::Owned(s) => s,
        }
    }
}

impl Tensor {
    /// Wraps freshly computed contiguous storage; `grad_fn` is kept only while gradients are recorded.
    pub(crate) fn from_op(storage: Storage, shape: &[usize], grad_fn: Option<Arc<dyn GradFn>>) -> Tensor {
        let grad_fn = grad_fn.filter(|_| autograd::is_grad_enabled());
        Tensor(Arc::new(Inner {
            id: TensorId::new(),
            storage: Arc::new(RwLock::new(storage)),
            layout: Layout::contiguous(shape),
            requires_grad: grad_fn.is_some(),
            grad_fn,
        }))
    }

    /// A constant tensor from storage (checks the element count).
    pub fn from_storage(storage: Storage, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        ensure_shape!(storage.len() == n, "from_storage", "storage has {} elements, shape {:?} needs {n}", storage.len(), shape);
        Ok(Tensor::from_op(storage, shape, None))
    }

    /// A constant tensor from host data.
    pub fn from_vec<T: HostType>(data: Vec<T>, shape: &[usize], device: Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        ensure_shape!(data.len() == n, "from_vec", "{} values for shape {:?} ({n} elements)", data.len(), shape);
        let cpu = host_storage(data);
        let storage = match device {
            Device::Cpu => Storage::Cpu(cpu),
            Device::Cuda(_) => Storage::Cpu(cpu).to_device(device)?,
        };
        Ok(Tensor::from_op(storage, shape, None))
    }

    /// A zero-filled constant tensor.
    pub fn zeros(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        let n = shape.iter().product();
        Ok(Tensor::from_op(Storage::zeros(device, dtype, n)?, shape, None))
    }

    /// A scalar (shape `[]`) of the given float dtype.
    pub fn scalar(v: f64, dtype: DType, device: Device) -> Result<Tensor> {
        let t = Tensor::from_vec(vec![v], &[], device)?;
        if dtype == DType::F64 { Ok(t) } else { t.to_dtype(dtype) }
    }

    /// This tensor's place in the autograd graph without its values: the same identity, shape,
    /// gradient function and trainability, over an empty storage of the same device and dtype.
    /// A backward that needs only its input's shape (add, sub, scale, sum, RoPE, reshape, copies)
    /// keeps this instead of the input, so the forward's intermediate values are freed as soon
    /// as the forward is done with them instead of living until the backward.
    ///
    /// Reading the values of an edge is a bug; its storage holds no elements.
    pub(crate) fn edge(&self) -> Tensor {
        match empty_storage(self.device(), self.dtype()) {
            Some(storage) => Tensor(Arc::new(Inner {
                id: self.0.id,
                storage,
                layout: self.0.layout.clone(),
                grad_fn: self.0.grad_fn.clone(),
                requires_grad: self.0.requires_grad,
            })),
            // No empty storage on this device (it failed to allocate): keep the values.
            None => self.clone(),
        }
    }

    /// This tensor's identity.
    pub fn id(&self) -> TensorId {
        self.0.id
    }
    /// Dimensions.
    pub fn shape(&self) -> &[usize] {
        self.0.layout.shape()
    }
    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape().len()
    }
    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.0.layout.elem_count()
    }
    /// The view of the storage.
    pub fn layout(&self) -> &Layout {
        &self.0.layout
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.storage().dtype()
    }
    /// Device.
    pub fn device(&self) -> Device {
        self.storage().device()
    }
    /// Whether gradients flow to or through this tensor.
    pub fn requires_grad_flag(&self) -> bool {
        self.0.requires_grad
    }
    /// The op that produced it (None for leaves and constants).
    pub fn grad_fn(&self) -> Option<&Arc<dyn GradFn>> {
        self.0.grad_fn.as_ref()
    }
    /// A leaf sharing this storage that collects a gradient in [`Tensor::backward`] (a trainable parameter).
    pub fn requires_grad(&self) -> Tensor {
        self.with_flags(None, true, self.0.layout.clone())
    }
    /// A constant sharing this storage, cut from the graph.
    pub fn detach(&self) -> Tensor {
        self.with_flags(None, false, self.0.layout.clone())
    }

    fn with_flags(&self, grad_fn: Option<Arc<dyn GradFn>>, requires_grad: bool, layout: Layout) -> Tensor {
        Tensor(Arc::new(Inner { id: TensorId::new(), storage: self.0.storage.clone(), layout, grad_fn, requires_grad }))
    }

    /// A view with another layout over the same storage, recorded for autograd with `grad_fn`.
    pub(crate) fn view(&self, layout: Layout, grad_fn: Option<Arc<dyn GradFn>>) -> Tensor {
        let grad_fn = grad_fn.filter(|_| autograd::is_grad_enabled() && self.requires_grad_flag());
        let rg = grad_fn.is_some();
        self.with_flags(grad_fn, rg, layout)
    }

    /// A handle on the same storage whose gradient flows through `grad_fn` (for ops whose backward
    /// keeps their own output through a separate constant handle, avoiding a reference cycle).
    pub(crate) fn with_grad_fn(&self, grad_fn: Arc<dyn GradFn>) -> Tensor {
        let on = autograd::is_grad_enabled();
        self.with_flags(on.then_some(grad_fn), on, self.0.layout.clone())
    }

    /// Read access to the whole underlying storage (ignores the layout).
    pub fn storage(&self) -> RwLockReadGuard<'_, Storage> {
        // A poisoned lock only means another thread panicked mid-write; the data is still usable for reads.
        self.0.storage.read().unwrap_or_else(|e| e.into_inner())
    }
    /// Write access to the underlying storage (in-place updates of parameters).
    pub fn storage_mut(&self) -> RwLockWriteGuard<'_, Storage> {
        self.0.storage.write().unwrap_or_else(|e| e.into_inner())
    }
    /// Whether two handles share storage.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.0.storage, &other.0.storage)
    }

    /// The elements as one contiguous storage, borrowed when possible.
    pub fn contiguous_storage(&self) -> Result<StorageRef<'_>> {
        let s = self.storage();
        let l = &self.0.layout;
        if l.is_contiguous() && l.offset() == 0 && s.len() == l.elem_count() {
            Ok(StorageRef::Borrowed(s))
        } else {
            Ok(StorageRef::Owned(s.copy_strided(l)?))
        }
    }

    /// A contiguous copy when the layout is strided; the same tensor otherwise. Gradients pass through.
    pub fn contiguous(&self) -> Result<Tensor> {
        if self.0.layout.is_contiguous() {
            return Ok(self.clone());
        }
        crate::ops::copy_contiguous(self)
    }

    /// The elements in row-major order as a host vector of `T` (which must be the dtype).
    pub fn to_vec<T: HostType>(&self) -> Result<Vec<T>> {
        ensure_dtype(self, T::DTYPE, "to_vec")?;
        let s = self.contiguous_storage()?;
        let host = s.to_cpu()?;
        Ok(host_slice::<T>(&host).to_vec())
    }

    /// The elements converted to f64 (any dtype).
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        let s = self.contiguous_storage()?;
        Ok(s.to_cpu()?.to_f64_vec())
    }

    /// The value of a one-element tensor as f64.
    pub fn to_scalar(&self) -> Result<f64> {
        ensure_shape!(self.elem_count() == 1, "to_scalar", "tensor has shape {:?}", self.shape());
        Ok(self.to_f64_vec()?[0])
    }

    /// This tensor on `device` (a handle to the same storage when it already lives there).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device() {
            return Ok(self.clone());
        }
        let s = self.contiguous_storage()?;
        Ok(Tensor::from_op(s.to_device(device)?, self.shape(), None))
    }

    /// A copy converted to `dtype` (constant: no gradient flows through a dtype change).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        let s = self.contiguous_storage()?;
        Ok(Tensor::from_op(s.to_dtype(dtype)?, self.shape(), None))
    }

    /// Reverse-mode differentiation from this scalar: gradients of every leaf that requires grad.
    pub fn backward(&self) -> Result<autograd::Grads> {
        autograd::backward(self)
    }
}

/// Errors unless `t` has dtype `d`.
pub(crate) fn ensure_dtype(t: &Tensor, d: DType, op: &'static str) -> Result<()> {
    if t.dtype() != d {
        return Err(Error::dtype(op, format!("expected {d}, got {}", t.dtype())));
    }
    Ok(())
}

fn host_storage<T: HostType>(data: Vec<T>) -> CpuStorage {
    // The dtype tag identifies T exactly, so the casts below are identities.
    fn cast<T: HostType, U: HostType>(v: Vec<T>) -> Vec<U> {
        bytemuck::allocation::try_cast_vec(v).unwrap_or_else(|(_, v)| bytemuck::allocation::pod_collect_to_vec(&v))
    }
    match T::DTYPE {
        DType::F32 => CpuStorage::F32(cast(data)),
        DType::F64 => CpuStorage::F64(cast(data)),
        DType::BF16 => CpuStorage::BF16(cast(data)),
        DType::F16 => CpuStorage::F16(cast(data)),
        DType::I64 => CpuStorage::I64(cast(data)),
        DType::U32 => CpuStorage::U32(cast(data)),
        DType::U8 => CpuStorage::U8(cast(data)),
    }
}

fn host_slice<T: HostType>(s: &CpuStorage) -> &[T] {
    match s {
        CpuStorage::F32(v) => bytemuck::cast_slice(v),
        CpuStorage::F64(v) => bytemuck::cast_slice(v),
        CpuStorage::BF16(v) => bytemuck::cast_slice(v),
        CpuStorage::F16(v) => bytemuck::cast_slice(v),
        CpuStorage::I64(v) => bytemuck::cast_slice(v),
        CpuStorage::U32(v) => bytemuck::cast_slice(v),
        CpuStorage::U8(v) => bytemuck::cast_slice(v),
    }
}

/// One shared zero-length storage per device and dtype: the storage of every [`Tensor::edge`]
/// (on a GPU, an edge then costs no allocation and no launch).
fn empty_storage(device: Device, dtype: DType) -> Option<Arc<RwLock<Storage>>> {
    type Empties = std::sync::Mutex<std::collections::HashMap<(Device, DType), Arc<RwLock<Storage>>>>;
    static EMPTY: std::sync::OnceLock<Empties> = std::sync::OnceLock::new();
    let mut map = EMPTY.get_or_init(Default::default).lock().ok()?;
    if let Some(s) = map.get(&(device, dtype)) {
        return Some(s.clone());
    }
    let s = Arc::new(RwLock::new(Storage::zeros(device, dtype, 0).ok()?));
    map.insert((device, dtype), s.clone());
    Some(s)
}
