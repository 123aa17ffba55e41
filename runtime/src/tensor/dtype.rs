//! Element types a tensor can hold.

use half::{bf16, f16};

/// The element type of a tensor's storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float: the CPU backend's working type.
    F32,
    /// 64-bit float: used by gradient checks and references.
    F64,
    /// bfloat16 (storage; converted for compute on CPU).
    BF16,
    /// IEEE half (storage; converted for compute on CPU).
    F16,
    /// Signed 64-bit integers: token ids, labels, masks as HF writes them.
    I64,
    /// Unsigned 32-bit integers: token ids, segment ids.
    U32,
    /// Bytes: packed quantised data.
    U8,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::U32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::U8 => 1,
        }
    }
    /// Whether the type is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::BF16 | DType::F16)
    }
    /// The name used in messages and in safetensors headers.
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::I64 => "I64",
            DType::U32 => "U32",
            DType::U8 => "U8",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Rust type that can be a tensor element on the host.
pub trait HostType: Copy + Send + Sync + 'static + bytemuck::Pod {
    /// Its dtype.
    const DTYPE: DType;
}

macro_rules! host_type {
    ($t:ty, $d:ident) => {
        impl HostType for $t {
            const DTYPE: DType = DType::$d;
        }
    };
}
host_type!(f32, F32);
host_type!(f64, F64);
host_type!(bf16, BF16);
host_type!(f16, F16);
host_type!(i64, I64);
host_type!(u32, U32);
host_type!(u8, U8);
