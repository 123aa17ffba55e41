//! A reader for GGUF files (format versions 2 and 3, little endian), the single-file checkpoint
//! format of llama.cpp.
//!
//! A GGUF file is a header (magic `GGUF`, version, tensor count, metadata count), a list of typed
//! metadata key/value pairs, a list of tensor descriptions (name, dimensions, ggml type, offset),
//! padding up to `general.alignment` (32 when absent), and then the tensor data. Offsets in the
//! tensor descriptions are relative to the start of that data section.
//!
//! [`GgufFile::open`] memory-maps the file, parses and checks the header and every tensor
//! description; [`GgufFile::tensor_f32`] dequantises one tensor to `f32` in row-major order.
//! [`GgufFile::llama_params`] reads the `llama.*` hyper-parameters, [`hf_tensor_name`] maps
//! llama.cpp tensor names to Hugging Face ones and [`unpermute_qk`] undoes the row permutation
//! llama.cpp's converter applies to the query and key projections.
//!
//! Nothing read from the file is trusted: every count, length, offset and size is checked against
//! the file size before use, and every failure is an [`Error`] that names the file and the key or
//! tensor involved.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;

use crate::error::{Error, Result};

/// The four bytes every GGUF file starts with.
const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// Data alignment when the file has no `general.alignment` key.
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most this many dimensions (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays inside arrays that we accept (real files use 1).
const MAX_ARRAY_DEPTH: usize = 8;
/// Elements per dequantisation task handed to rayon.
const PAR_CHUNK: usize = 1 << 15;

// ---------------------------------------------------------------------------------------------
// Metadata values
// ---------------------------------------------------------------------------------------------

/// One metadata value. The variants are the GGUF value types (`GGUFValueType` 0..=12).
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 6.
    F32(f32),
    /// Type 12.
    F64(f64),
    /// Type 7 (one byte, 0 or 1).
    Bool(bool),
    /// Type 8 (u64 byte length + UTF-8 bytes). Invalid UTF-8 inside a value is replaced by U+FFFD.
    Str(String),
    /// Type 9 (element type, u64 count, elements).
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as a `u64` when it is an integer that is not negative (bools are not integers).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as an `f64` when it is a float or an integer.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            GgufValue::U8(v) => Some(v as f64),
            GgufValue::U16(v) => Some(v as f64),
            GgufValue::U32(v) => Some(v as f64),
            GgufValue::U64(v) => Some(v as f64),
            GgufValue::I8(v) => Some(v as f64),
            GgufValue::I16(v) => Some(v as f64),
            GgufValue::I32(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The value as a string slice when it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The elements when the value is an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The value as a `bool` when it is a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// A short name of the value's type, for error messages (`"u32"`, `"string"`, `"array"`...).
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F32(_) => "f32",
            GgufValue::F64(_) => "f64",
            GgufValue::Bool(_) => "bool",
            GgufValue::Str(_) => "string",
            GgufValue::Array(_) => "array",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor types
// ---------------------------------------------------------------------------------------------

/// The storage type of a tensor (`ggml_type`). The ones this reader can dequantise have their own
/// variant; every other type id is kept as `Other(id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    /// `GGML_TYPE_F32` (0).
    F32,
    /// `GGML_TYPE_F16` (1).
    F16,
    /// `GGML_TYPE_BF16` (30).
    BF16,
    /// `GGML_TYPE_Q4_0` (2): blocks of 32, an f16 scale and 16 bytes of nibbles.
    Q4_0,
    /// `GGML_TYPE_Q4_1` (3): blocks of 32, an f16 scale, an f16 minimum and 16 bytes of nibbles.
    Q4_1,
    /// `GGML_TYPE_Q8_0` (8): blocks of 32, an f16 scale and 32 signed bytes.
    Q8_0,
    /// Any other ggml type id.
    Other(u32),
}

impl GgmlType {
    /// The type for a ggml type id.
    pub fn from_raw(id: u32) -> Self {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            other => GgmlType::Other(other),
        }
    }

    /// The ggml type id.
    pub fn raw(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
            GgmlType::Other(id) => id,
        }
    }

    /// ggml's name for the type (`"q4_0"`...), or `"type N"` for ids this reader does not know.
    pub fn name(self) -> String {
        let known = match self.raw() {
            0 => "f32",
            1 => "f16",
            2 => "q4_0",
            3 => "q4_1",
            6 => "q5_0",
            7 => "q5_1",
            8 => "q8_0",
            9 => "q8_1",
            10 => "q2_K",
            11 => "q3_K",
            12 => "q4_K",
            13 => "q5_K",
            14 => "q6_K",
            15 => "q8_K",
            16 => "iq2_xxs",
            17 => "iq2_xs",
            18 => "iq3_xxs",
            19 => "iq1_s",
            20 => "iq4_nl",
            21 => "iq3_s",
            22 => "iq2_s",
            23 => "iq4_xs",
            24 => "i8",
            25 => "i16",
            26 => "i32",
            27 => "i64",
            28 => "f64",
            29 => "iq1_m",
            30 => "bf16",
            34 => "tq1_0",
            35 => "tq2_0",
            39 => "mxfp4",
            id => return format!("type {id}"),
        };
        known.to_string()
    }

    /// `(elements per block, bytes per block)` for the types whose layout is known (the table of
    /// `GGML_QUANT_SIZES` in gguf-py), so that tensor extents can be checked even for types this
    /// reader cannot dequantise.
    pub fn block_layout(self) -> Option<(u64, u64)> {
        const QK_K: u64 = 256;
        Some(match self.raw() {
            0 => (1, 4),
            1 => (1, 2),
            2 => (32, 2 + 16),
            3 => (32, 2 + 2 + 16),
            6 => (32, 2 + 4 + 16),
            7 => (32, 2 + 2 + 4 + 16),
            8 => (32, 2 + 32),
            9 => (32, 4 + 4 + 32),
            10 => (QK_K, 2 + 2 + QK_K / 16 + QK_K / 4),
            11 => (QK_K, 2 + QK_K / 4 + QK_K / 8 + 12),
            12 => (QK_K, 2 + 2 + QK_K / 2 + 12),
            13 => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12),
            14 => (QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16),
            15 => (QK_K, 4 + QK_K + QK_K / 8),
            16 => (QK_K, 2 + QK_K / 4),
            17 => (QK_K, 2 + QK_K / 4 + QK_K / 32),
            18 => (QK_K, 2 + QK_K / 4 + QK_K / 8),
            19 => (QK_K, 2 + QK_K / 8 + QK_K / 16),
            20 => (32, 2 + 16),
            21 => (QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4),
            22 => (QK_K, 2 + QK_K / 4 + QK_K / 16),
            23 => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 64),
            24 => (1, 1),
            25 => (1, 2),
            26 => (1, 4),
            27 => (1, 8),
            28 => (1, 8),
            29 => (QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
            30 => (1, 2),
            34 => (QK_K, 2 + 4 * 13),
            35 => (QK_K, 2 + 64),
            39 => (32, 1 + 16),
            _ => return None,
        })
    }

    /// Whether [`GgufFile::tensor_f32`] can dequantise this type.
    pub fn is_supported(self) -> bool {
        !matches!(self, GgmlType::Other(_))
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// The description of one tensor in a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// The tensor's name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// The dimensions as stored: ggml order, fastest-varying first (`ne[0]` is the row length).
    pub dims: Vec<u64>,
    /// The storage type.
    pub ggml_type: GgmlType,
    /// Byte offset of the data relative to the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// The shape in row-major (PyTorch / Hugging Face) order: the stored dims reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// The number of elements (1 for a tensor with no dimensions).
    pub fn n_elements(&self) -> usize {
        // Saturating: a description read by `GgufFile::open` never overflows (checked there).
        self.dims.iter().fold(1usize, |acc, &d| acc.saturating_mul(d as usize))
    }

    /// The size of the tensor's data in bytes, when its type's block layout is known and the size
    /// does not overflow.
    pub fn n_bytes(&self) -> Option<u64> {
        let (block, bytes) = self.ggml_type.block_layout()?;
        let n = self.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
        (n / block).checked_mul(bytes)
    }
}

// ---------------------------------------------------------------------------------------------
// The file
// ---------------------------------------------------------------------------------------------

/// An open GGUF file: its metadata, its tensor descriptions and a memory map of its data.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    index: BTreeMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

/// A bounds-checked little-endian cursor over the header bytes.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Error::format(
                self.path,
                format!(
                    "GGUF file is truncated: {what} needs {n} bytes at byte {} but the file has {}",
                    self.pos,
                    self.buf.len()
                ),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length or count, checked so that `count * min_size` bytes could still follow.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let fits = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(min_size.max(1)))
            .is_some_and(|bytes| bytes <= self.remaining());
        if !fits {
            return Err(Error::format(
                self.path,
                format!(
                    "GGUF header is truncated or corrupt: {what} is {n}, more than the {} bytes left \
                     in the file can hold (at byte {})",
                    self.remaining(),
                    self.pos - 8
                ),
            ));
        }
        Ok(n as usize)
    }

    /// A GGUF string: u64 length then bytes.
    fn raw_string(&mut self, what: &str) -> Result<&'a [u8]> {
        let n = self.count(1, what)?;
        self.take(n, what)
    }

    /// A string that must be valid UTF-8 (keys, tensor names).
    fn strict_string(&mut self, what: &str) -> Result<String> {
        let start = self.pos;
        let bytes = self.raw_string(what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| {
            Error::format(self.path, format!("{what} at byte {start} is not valid UTF-8"))
        })
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue> {
        let what = |t: &str| format!("value of key `{key}` ({t})");
        Ok(match ty {
            0 => GgufValue::U8(self.u8(&what("u8"))?),
            1 => GgufValue::I8(self.u8(&what("i8"))? as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(&what("u16"))?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(&what("i16"))?)),
            4 => GgufValue::U32(self.u32(&what("u32"))?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(&what("i32"))?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(&what("f32"))?)),
            7 => {
                let b = self.u8(&what("bool"))?;
                if b > 1 {
                    return Err(Error::Config {
                        path: self.path.to_path_buf(),
                        key: key.to_string(),
                        msg: format!("bool value is {b}, not 0 or 1 (byte {})", self.pos - 1),
                    });
                }
                GgufValue::Bool(b == 1)
            }
            8 => {
                let bytes = self.raw_string(&what("string"))?;
                GgufValue::Str(String::from_utf8_lossy(bytes).into_owned())
            }
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(Error::Config {
                        path: self.path.to_path_buf(),
                        key: key.to_string(),
                        msg: format!("arrays nested more than {MAX_ARRAY_DEPTH} deep"),
                    });
                }
                let elem_ty = self.u32(&what("array element type"))?;
                let min = value_min_size(elem_ty).ok_or_else(|| Error::Config {
                    path: self.path.to_path_buf(),
                    key: key.to_string(),
                    msg: format!("unknown array element type {elem_ty} (byte {})", self.pos - 4),
                })?;
                let n = self.count(min, &what("array length"))?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(&what("u64"))?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(&what("i64"))?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(&what("f64"))?)),
            other => {
                return Err(Error::Config {
                    path: self.path.to_path_buf(),
                    key: key.to_string(),
                    msg: format!("unknown value type {other} (byte {})", self.pos - 4),
                })
            }
        })
    }
}

/// The fewest bytes a value of GGUF type `ty` can take, or `None` for an unknown type.
fn value_min_size(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,
        9 => 12,
        10..=12 => 8,
        _ => return None,
    })
}

impl GgufFile {
    /// Opens and memory-maps `path`, parses the header, the metadata and the tensor descriptions,
    /// and checks that every tensor of a known type lies inside the data section.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only; like every mmap-based model loader we rely on the file
        // not being truncated or rewritten by another process while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        Self::parse(path, mmap)
    }

    fn parse(path: PathBuf, mmap: Mmap) -> Result<GgufFile> {
        let mut r = Reader { buf: &mmap[..], pos: 0, path: &path };
        if r.buf.len() < 4 || &r.buf[..4] != GGUF_MAGIC {
            let got = &r.buf[..r.buf.len().min(4)];
            return Err(Error::format(
                &path,
                format!("not a GGUF file: magic is {got:02x?}, expected \"GGUF\""),
            ));
        }
        r.pos = 4;
        let version = r.u32("version")?;
        if version != 2 && version != 3 {
            return Err(Error::format(
                &path,
                format!("GGUF version {version} is not supported (only 2 and 3 are)"),
            ));
        }
        // A tensor description takes at least 8 (name) + 4 + 4 + 8 bytes, a key/value pair at
        // least 8 (key) + 4 (type) + 1.
        let n_tensors = r.count(24, "tensor count")?;
        let n_kv = r.count(13, "metadata key/value count")?;

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.strict_string(&format!("key of metadata entry {i}"))?;
            let ty = r.u32(&format!("type of key `{key}`"))?;
            let value = r.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(Error::Config { path: path.clone(), key, msg: "key appears twice".into() });
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(Error::Config {
                        path: path.clone(),
                        key: "general.alignment".into(),
                        msg: format!("must be a power of two, found {v:?}"),
                    })
                }
            },
        };

        let mut tensors = Vec::with_capacity(n_tensors);
        let mut index = BTreeMap::new();
        for i in 0..n_tensors {
            let name = r.strict_string(&format!("name of tensor {i}"))?;
            let n_dims = r.u32(&format!("dimension count of tensor `{name}`"))?;
            if n_dims > MAX_DIMS {
                return Err(Error::format(
                    &path,
                    format!("tensor `{name}` has {n_dims} dimensions, ggml allows at most {MAX_DIMS}"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(r.u64(&format!("dimension {d} of tensor `{name}`"))?);
            }
            let ggml_type = GgmlType::from_raw(r.u32(&format!("type of tensor `{name}`"))?);
            let offset = r.u64(&format!("offset of tensor `{name}`"))?;
            let n = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            if n.is_none_or(|n| usize::try_from(n).is_err()) {
                return Err(Error::format(
                    &path,
                    format!("tensor `{name}` has dimensions {dims:?} whose product overflows"),
                ));
            }
            if index.insert(name.clone(), i).is_some() {
                return Err(Error::format(&path, format!("tensor `{name}` appears twice")));
            }
            tensors.push(GgufTensorInfo { name, dims, ggml_type, offset });
        }

        let header_end = r.pos as u64;
        let data_offset = header_end.div_ceil(alignment) * alignment;
        let file_len = mmap.len() as u64;
        if data_offset > file_len && n_tensors > 0 {
            return Err(Error::format(
                &path,
                format!(
                    "GGUF file is truncated: the data section should start at byte {data_offset} \
                     but the file has {file_len} bytes"
                ),
            ));
        }
        let data_len = file_len.saturating_sub(data_offset);
        for t in &tensors {
            check_extent(&path, t, data_len)?;
        }

        Ok(GgufFile { path, mmap, version, metadata, tensors, index, alignment, data_offset })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The data alignment (`general.alignment`, 32 when absent).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// The absolute byte offset of the data section in the file.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// The tensor descriptions, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The description of the tensor called `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    fn missing(&self, key: &str) -> Error {
        Error::Config { path: self.path.clone(), key: key.into(), msg: "missing".into() }
    }

    fn wrong_type(&self, key: &str, want: &str, v: &GgufValue) -> Error {
        let shown = match v {
            GgufValue::Array(a) => format!("an array of {} elements", a.len()),
            GgufValue::Str(s) if s.len() > 60 => format!("a string of {} bytes", s.len()),
            other => format!("{other:?}"),
        };
        Error::Config {
            path: self.path.clone(),
            key: key.into(),
            msg: format!("expected {want}, found {} {shown}", v.type_name()),
        }
    }

    /// The value of `key`, which must be a non-negative integer.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.metadata.get(key).ok_or_else(|| self.missing(key))?;
        v.as_u64().ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
    }

    /// The value of `key`, which must be a number.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.metadata.get(key).ok_or_else(|| self.missing(key))?;
        v.as_f64().ok_or_else(|| self.wrong_type(key, "a number", v))
    }

    /// The value of `key`, which must be a string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.metadata.get(key).ok_or_else(|| self.missing(key))?;
        v.as_str().ok_or_else(|| self.wrong_type(key, "a string", v))
    }

    /// The value of `key` if present and a non-negative integer.
    pub fn opt_u64(&self, key: &str) -> Option<u64> {
        self.metadata.get(key).and_then(GgufValue::as_u64)
    }

    /// The value of `key` if present and a number.
    pub fn opt_f64(&self, key: &str) -> Option<f64> {
        self.metadata.get(key).and_then(GgufValue::as_f64)
    }

    /// The value of `key` if present and a string.
    pub fn opt_str(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(GgufValue::as_str)
    }

    /// The value of `key` if present and a bool.
    pub fn opt_bool(&self, key: &str) -> Option<bool> {
        self.metadata.get(key).and_then(GgufValue::as_bool)
    }

    /// The value of `key` if present, with an error when it is present with another type.
    fn try_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v)),
        }
    }

    fn try_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.wrong_type(key, "a number", v)),
        }
    }

    fn try_str(&self, key: &str) -> Result<Option<&str>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.wrong_type(key, "a string", v)),
        }
    }

    /// The raw bytes of a tensor's data.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.tensor_info(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })?;
        let n_bytes = info.n_bytes().ok_or_else(|| {
            Error::format(
                &self.path,
                format!("tensor `{name}` has ggml type {}, whose size is unknown", info.ggml_type),
            )
        })?;
        let data = &self.mmap[self.data_offset.min(self.mmap.len() as u64) as usize..];
        // `check_extent` ran in `open`, but check again rather than index blindly.
        let start = usize::try_from(info.offset).ok();
        let end = start.and_then(|s| s.checked_add(usize::try_from(n_bytes).ok()?));
        match (start, end) {
            (Some(s), Some(e)) if e <= data.len() => Ok(&data[s..e]),
            _ => Err(Error::format(
                &self.path,
                format!("tensor `{name}`: data lies outside the file's data section"),
            )),
        }
    }

    /// The tensor dequantised to `f32` in row-major order, with its row-major shape
    /// (see [`GgufTensorInfo::shape`]). Supports F32, F16, BF16, Q4_0, Q4_1 and Q8_0.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.tensor_info(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })?;
        if !info.ggml_type.is_supported() {
            return Err(Error::format(
                &self.path,
                format!(
                    "tensor `{name}` has ggml type {} ({}), which cannot be dequantised \
                     (supported: f32, f16, bf16, q4_0, q4_1, q8_0)",
                    info.ggml_type,
                    info.ggml_type.raw()
                ),
            ));
        }
        let bytes = self.tensor_bytes(name)?;
        let n = info.n_elements();
        let values = dequantize(info.ggml_type, bytes, n).ok_or_else(|| {
            Error::format(
                &self.path,
                format!(
                    "tensor `{name}`: {} bytes of {} do not hold {n} elements",
                    bytes.len(),
                    info.ggml_type
                ),
            )
        })?;
        Ok((info.shape(), values))
    }

    /// The hyper-parameters of a `llama`-architecture file.
    pub fn llama_params(&self) -> Result<GgufLlamaParams> {
        let arch = self.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(Error::Config {
                path: self.path.clone(),
                key: "general.architecture".into(),
                msg: format!("architecture `{arch}` is not supported (expected `llama`)"),
            });
        }
        let usize_key = |key: &str| -> Result<usize> {
            let v = self.get_u64(key)?;
            usize::try_from(v).map_err(|_| Error::Config {
                path: self.path.clone(),
                key: key.into(),
                msg: format!("{v} is too large"),
            })
        };
        let positive = |key: &str, v: usize| -> Result<usize> {
            if v == 0 {
                Err(Error::Config { path: self.path.clone(), key: key.into(), msg: "is 0".into() })
            } else {
                Ok(v)
            }
        };

        let hidden_size = positive("llama.embedding_length", usize_key("llama.embedding_length")?)?;
        let n_layers = positive("llama.block_count", usize_key("llama.block_count")?)?;
        let n_heads =
            positive("llama.attention.head_count", usize_key("llama.attention.head_count")?)?;
        let n_kv_heads = match self.try_u64("llama.attention.head_count_kv")? {
            Some(v) => positive("llama.attention.head_count_kv", v as usize)?,
            None => n_heads,
        };
        if n_heads % n_kv_heads != 0 {
            return Err(Error::Config {
                path: self.path.clone(),
                key: "llama.attention.head_count_kv".into(),
                msg: format!("{n_kv_heads} does not divide the head count {n_heads}"),
            });
        }
        let intermediate_size =
            positive("llama.feed_forward_length", usize_key("llama.feed_forward_length")?)?;
        let head_dim = match self.try_u64("llama.attention.key_length")? {
            Some(v) => positive("llama.attention.key_length", v as usize)?,
            None => {
                if hidden_size % n_heads != 0 {
                    return Err(Error::Config {
                        path: self.path.clone(),
                        key: "llama.attention.head_count".into(),
                        msg: format!(
                            "{n_heads} does not divide llama.embedding_length {hidden_size} and \
                             llama.attention.key_length is absent"
                        ),
                    });
                }
                hidden_size / n_heads
            }
        };
        if head_dim % 2 == 1 {
            return Err(Error::Config {
                path: self.path.clone(),
                key: "llama.attention.key_length".into(),
                msg: format!("head dimension {head_dim} is odd; rotary embeddings need it even"),
            });
        }
        let rope_theta = self.try_f64("llama.rope.freq_base")?.unwrap_or(10_000.0);
        let rms_norm_eps = self.get_f64("llama.attention.layer_norm_rms_epsilon")?;
        let context_length = usize_key("llama.context_length")?;

        let rope_scaling = match self.try_str("llama.rope.scaling.type")? {
            Some("none") => None,
            Some(kind) => {
                let factor = self.try_f64("llama.rope.scaling.factor")?.ok_or_else(|| {
                    Error::Config {
                        path: self.path.clone(),
                        key: "llama.rope.scaling.factor".into(),
                        msg: format!("missing although llama.rope.scaling.type is `{kind}`"),
                    }
                })?;
                Some((kind.to_string(), factor))
            }
            None => match self.try_f64("llama.rope.scale_linear")? {
                Some(f) if f != 1.0 => Some(("linear".to_string(), f)),
                _ => None,
            },
        };

        let vocab_size = match self.metadata.get("tokenizer.ggml.tokens") {
            Some(GgufValue::Array(tokens)) => tokens.len(),
            Some(other) => return Err(self.wrong_type("tokenizer.ggml.tokens", "an array", other)),
            None => match self.try_u64("llama.vocab_size")? {
                Some(v) => v as usize,
                None => match self.tensor_info("token_embd.weight") {
                    Some(t) if t.dims.len() == 2 => t.dims[1] as usize,
                    _ => return Err(self.missing("tokenizer.ggml.tokens")),
                },
            },
        };
        let token_id = |key: &str| -> Result<Option<u32>> {
            match self.try_u64(key)? {
                None => Ok(None),
                Some(v) if (v as usize) < vocab_size => Ok(Some(v as u32)),
                Some(v) => Err(Error::Config {
                    path: self.path.clone(),
                    key: key.into(),
                    msg: format!("token id {v} is outside the vocabulary of {vocab_size}"),
                }),
            }
        };

        Ok(GgufLlamaParams {
            arch: arch.to_string(),
            vocab_size,
            hidden_size,
            n_layers,
            n_heads,
            n_kv_heads,
            intermediate_size,
            head_dim,
            rope_theta,
            rms_norm_eps,
            context_length,
            rope_scaling,
            bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: token_id("tokenizer.ggml.eos_token_id")?,
            pad_token_id: token_id("tokenizer.ggml.padding_token_id")?,
            chat_template: self.try_str("tokenizer.chat_template")?.map(str::to_string),
            tied_embeddings: self.tensor_info("output.weight").is_none(),
        })
    }
}

/// Checks that a tensor of known size lies inside a data section of `data_len` bytes, and that a
/// quantised tensor's rows are whole blocks.
fn check_extent(path: &Path, t: &GgufTensorInfo, data_len: u64) -> Result<()> {
    let Some((block, block_bytes)) = t.ggml_type.block_layout() else {
        return Ok(()); // unknown type: its size cannot be checked until someone reads it
    };
    let row = t.dims.first().copied().unwrap_or(1);
    let ragged = row % block;
    if ragged != 0 {
        return Err(Error::format(
            path,
            format!(
                "tensor `{}` of type {} has rows of {row} elements, not a multiple of its block \
                 size {block}",
                t.name, t.ggml_type
            ),
        ));
    }
    let n: u64 = t.dims.iter().product(); // no overflow: checked while parsing
    let n_bytes = (n / block).checked_mul(block_bytes);
    let end = n_bytes.and_then(|b| t.offset.checked_add(b));
    match end {
        Some(end) if end <= data_len => Ok(()),
        _ => Err(Error::format(
            path,
            format!(
                "tensor `{}` ({} {:?}) at data offset {} needs {} bytes but the data section \
                 has {data_len}: the file is truncated or the offset is corrupt",
                t.name,
                t.ggml_type,
                t.dims,
                t.offset,
                n_bytes.map_or_else(|| "too many".to_string(), |b| b.to_string()),
            ),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantisation
// ---------------------------------------------------------------------------------------------

/// Dequantises `n` elements of type `ty` from `bytes`. `None` when the sizes disagree.
fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Option<Vec<f32>> {
    let (block, block_bytes) = ty.block_layout()?;
    let (block, block_bytes) = (block as usize, block_bytes as usize);
    let ragged = n % block;
    if ragged != 0 || bytes.len() != (n / block).checked_mul(block_bytes)? {
        return None;
    }
    let mut out = vec![0f32; n];
    let kernel = block_kernel(ty)?;
    // PAR_CHUNK is a multiple of every supported block size (1 or 32).
    let chunk_bytes = PAR_CHUNK / block * block_bytes;
    if n <= PAR_CHUNK {
        kernel(bytes, &mut out);
    } else {
        out.par_chunks_mut(PAR_CHUNK)
            .zip(bytes.par_chunks(chunk_bytes))
            .for_each(|(o, b)| kernel(b, o));
    }
    Some(out)
}

/// The function that dequantises whole blocks of `ty` (`src` holds `dst.len() / block` blocks), or
/// None for a type this reader does not decode. A quantised frozen base (QLoRA on a GGUF model)
/// calls it one weight row at a time.
pub fn block_kernel(ty: GgmlType) -> Option<fn(&[u8], &mut [f32])> {
    Some(match ty {
        GgmlType::F32 => dequant_f32 as fn(&[u8], &mut [f32]),
        GgmlType::F16 => dequant_f16,
        GgmlType::BF16 => dequant_bf16,
        GgmlType::Q4_0 => dequant_q4_0,
        GgmlType::Q4_1 => dequant_q4_1,
        GgmlType::Q8_0 => dequant_q8_0,
        GgmlType::Other(_) => return None,
    })
}

fn dequant_f32(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    }
}

fn dequant_f16(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = f16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
    }
}

fn dequant_bf16(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = bf16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
    }
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Q8_0 block (34 bytes): f16 `d`, 32 × i8 `q`; `x = d * q`.
fn dequant_q8_0(src: &[u8], dst: &mut [f32]) {
    for (blk, out) in src.chunks_exact(34).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(blk, 0);
        for (o, &q) in out.iter_mut().zip(&blk[2..34]) {
            *o = (q as i8) as f32 * d;
        }
    }
}

/// Q4_0 block (18 bytes): f16 `d`, 16 bytes; element `j < 16` is the low nibble of byte `j`,
/// element `j + 16` its high nibble; `x = d * (q - 8)`.
fn dequant_q4_0(src: &[u8], dst: &mut [f32]) {
    for (blk, out) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(blk, 0);
        let (lo, hi) = out.split_at_mut(16);
        for (j, &b) in blk[2..18].iter().enumerate() {
            lo[j] = ((b & 0x0f) as i32 - 8) as f32 * d;
            hi[j] = ((b >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Q4_1 block (20 bytes): f16 `d`, f16 `m`, 16 bytes in Q4_0's nibble order; `x = d * q + m`.
fn dequant_q4_1(src: &[u8], dst: &mut [f32]) {
    for (blk, out) in src.chunks_exact(20).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(blk, 0);
        let m = f16_at(blk, 2);
        let (lo, hi) = out.split_at_mut(16);
        for (j, &b) in blk[4..20].iter().enumerate() {
            lo[j] = (b & 0x0f) as f32 * d + m;
            hi[j] = (b >> 4) as f32 * d + m;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Llama hyper-parameters and names
// ---------------------------------------------------------------------------------------------

/// The hyper-parameters of a `llama`-architecture GGUF file, read from its `llama.*` and
/// `tokenizer.*` keys by [`GgufFile::llama_params`].
#[derive(Debug, Clone, PartialEq)]
pub struct GgufLlamaParams {
    /// `general.architecture` (always `"llama"`).
    pub arch: String,
    /// Length of `tokenizer.ggml.tokens`, else `llama.vocab_size`, else `token_embd.weight`'s rows.
    pub vocab_size: usize,
    /// `llama.embedding_length`.
    pub hidden_size: usize,
    /// `llama.block_count`.
    pub n_layers: usize,
    /// `llama.attention.head_count`.
    pub n_heads: usize,
    /// `llama.attention.head_count_kv` (defaults to `n_heads`).
    pub n_kv_heads: usize,
    /// `llama.feed_forward_length`.
    pub intermediate_size: usize,
    /// `llama.attention.key_length`, else `hidden_size / n_heads`.
    pub head_dim: usize,
    /// `llama.rope.freq_base` (defaults to 10000).
    pub rope_theta: f64,
    /// `llama.attention.layer_norm_rms_epsilon`.
    pub rms_norm_eps: f64,
    /// `llama.context_length`.
    pub context_length: usize,
    /// `(llama.rope.scaling.type, llama.rope.scaling.factor)`, or `("linear", llama.rope.scale_linear)`
    /// in older files; `None` when absent or `"none"`. Llama-3 style frequency scaling is not
    /// described by keys: llama.cpp stores it as a `rope_freqs.weight` tensor.
    pub rope_scaling: Option<(String, f64)>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_token_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad_token_id: Option<u32>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
    /// True when the file has no `output.weight` tensor (the LM head reuses the embedding).
    pub tied_embeddings: bool,
}

/// The Hugging Face (transformers Llama) name for a llama.cpp tensor name, or `None` for names
/// with no counterpart (e.g. `rope_freqs.weight`).
///
/// `token_embd` → `model.embed_tokens`, `output_norm` → `model.norm`, `output` → `lm_head`,
/// `blk.N.attn_{q,k,v,output}` → `model.layers.N.self_attn.{q,k,v,o}_proj`, `blk.N.attn_norm` →
/// `model.layers.N.input_layernorm`, `blk.N.ffn_norm` → `model.layers.N.post_attention_layernorm`,
/// `blk.N.ffn_{gate,up,down}` → `model.layers.N.mlp.{gate,up,down}_proj`. The `.weight` or
/// `.bias` suffix is kept.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    let (stem, suffix) = if let Some(s) = gguf_name.strip_suffix(".weight") {
        (s, "weight")
    } else if let Some(s) = gguf_name.strip_suffix(".bias") {
        (s, "bias")
    } else {
        return None;
    };
    let global = match stem {
        "token_embd" => Some("model.embed_tokens"),
        "output_norm" => Some("model.norm"),
        "output" => Some("lm_head"),
        _ => None,
    };
    if let Some(g) = global {
        return Some(format!("{g}.{suffix}"));
    }
    let rest = stem.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undoes llama.cpp's convert-time permutation of `q_proj` / `k_proj` rows.
///
/// llama.cpp's converter stores, within each head, the rows of Hugging Face's rotate-half layout
/// (first half of the head's rotary pairs, then the second half) interleaved as pairs: stored
/// row `2*i + j` of a head is HF row `j * head_dim/2 + i`. `w` is row-major `[rows, cols]` with
/// `rows = n_head * head_dim`; pass the query head count for `attn_q` and the key/value head
/// count for `attn_k`. Returns the HF layout.
///
/// # Panics
/// If `w.len() != rows * cols` or `rows` is not a multiple of `2 * n_head`; callers must check
/// shapes that come from a file first.
pub fn unpermute_qk(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    permute_rows(w, rows, cols, n_head, false)
}

/// The inverse of [`unpermute_qk`]: turns HF `q_proj` / `k_proj` rows into llama.cpp's layout.
///
/// # Panics
/// Under the same conditions as [`unpermute_qk`].
pub fn permute_qk(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    permute_rows(w, rows, cols, n_head, true)
}

/// For each Hugging Face row `r` of `q_proj`/`k_proj`, the GGUF row that stores it (the row map
/// [`unpermute_qk`] applies), so a weight kept quantised can read rows through it. `None` when
/// `rows` does not split into `n_head` heads of even size.
pub fn qk_row_perm(rows: usize, n_head: usize) -> Option<Vec<u32>> {
    if n_head == 0 || rows % (2 * n_head) != 0 {
        return None;
    }
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut perm = vec![0u32; rows];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                perm[h * head_dim + j * half + i] = (h * head_dim + 2 * i + j) as u32;
            }
        }
    }
    Some(perm)
}

fn permute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize, to_gguf: bool) -> Vec<f32> {
    assert_eq!(w.len(), rows * cols, "q/k permutation: weight has {} values, not {rows}x{cols}", w.len());
    let ragged = if n_head > 0 { rows % (2 * n_head) } else { 1 };
    assert!(
        ragged == 0,
        "q/k permutation: {rows} rows do not split into {n_head} heads of even size"
    );
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let hf_row = h * head_dim + j * half + i;
                let gguf_row = h * head_dim + 2 * i + j;
                let (src, dst) = if to_gguf { (hf_row, gguf_row) } else { (gguf_row, hf_row) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qk_row_perm_is_the_row_map_of_unpermute() {
        let (rows, cols, heads) = (12, 3, 3);
        let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let hf = unpermute_qk(&w, rows, cols, heads);
        let perm = qk_row_perm(rows, heads).unwrap();
        for r in 0..rows {
            let p = perm[r] as usize;
            assert_eq!(hf[r * cols..(r + 1) * cols], w[p * cols..(p + 1) * cols], "row {r}");
        }
        assert!(qk_row_perm(10, 3).is_none());
    }
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A tiny GGUF writer for synthetic test files.
    struct Writer {
        version: u32,
        kv: Vec<(String, GgufValue)>,
        tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
        alignment: u64,
    }

    fn value_type(v: &GgufValue) -> u32 {
        match v {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::Str(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
        match v {
            GgufValue::U8(x) => out.push(*x),
            GgufValue::I8(x) => out.push(*x as u8),
            GgufValue::U16(x) => out.extend(x.to_le_bytes()),
            GgufValue::I16(x) => out.extend(x.to_le_bytes()),
            GgufValue::U32(x) => out.extend(x.to_le_bytes()),
            GgufValue::I32(x) => out.extend(x.to_le_bytes()),
            GgufValue::U64(x) => out.extend(x.to_le_bytes()),
            GgufValue::I64(x) => out.extend(x.to_le_bytes()),
            GgufValue::F32(x) => out.extend(x.to_le_bytes()),
            GgufValue::F64(x) => out.extend(x.to_le_bytes()),
            GgufValue::Bool(x) => out.push(*x as u8),
            GgufValue::Str(s) => put_str(out, s),
            GgufValue::Array(a) => {
                let et = a.first().map_or(4, value_type);
                out.extend(et.to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                for e in a {
                    put_value(out, e);
                }
            }
        }
    }

    impl Writer {
        fn new() -> Self {
            Writer { version: 3, kv: Vec::new(), tensors: Vec::new(), alignment: 32 }
        }
        fn kv(mut self, k: &str, v: GgufValue) -> Self {
            if k == "general.alignment" {
                self.alignment = v.as_u64().unwrap();
            }
            self.kv.push((k.into(), v));
            self
        }
        fn tensor(mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> Self {
            self.tensors.push((name.into(), dims.to_vec(), ty, data));
            self
        }
        /// Returns the bytes and the offset of the data section.
        fn build(&self) -> (Vec<u8>, usize) {
            let mut out = Vec::new();
            out.extend(b"GGUF");
            out.extend(self.version.to_le_bytes());
            out.extend((self.tensors.len() as u64).to_le_bytes());
            out.extend((self.kv.len() as u64).to_le_bytes());
            for (k, v) in &self.kv {
                put_str(&mut out, k);
                out.extend(value_type(v).to_le_bytes());
                put_value(&mut out, v);
            }
            let a = self.alignment as usize;
            let mut offset = 0usize;
            let mut offsets = Vec::new();
            for (name, dims, ty, data) in &self.tensors {
                put_str(&mut out, name);
                out.extend((dims.len() as u32).to_le_bytes());
                for d in dims {
                    out.extend(d.to_le_bytes());
                }
                out.extend(ty.to_le_bytes());
                out.extend((offset as u64).to_le_bytes());
                offsets.push(offset);
                offset = (offset + data.len()).div_ceil(a) * a;
            }
            while out.len() % a != 0 {
                out.push(0);
            }
            let data_start = out.len();
            for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
                out.resize(data_start + off, 0);
                out.extend(data);
            }
            (out, data_start)
        }
    }

    fn tmp_path(tag: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!("temper-gguf-{}-{n}-{tag}.gguf", std::process::id()))
    }

    fn write_tmp(tag: &str, bytes: &[u8]) -> PathBuf {
        let p = tmp_path(tag);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn open_bytes(tag: &str, bytes: &[u8]) -> (PathBuf, Result<GgufFile>) {
        let p = write_tmp(tag, bytes);
        let r = GgufFile::open(&p);
        (p, r)
    }

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_bits().to_le_bytes()
    }

    fn q8_block(d: f32, q: &[i8; 32]) -> Vec<u8> {
        let mut b = h(d).to_vec();
        b.extend(q.iter().map(|&x| x as u8));
        b
    }

    fn q4_0_block(d: f32, q: &[u8; 32]) -> Vec<u8> {
        let mut b = h(d).to_vec();
        for j in 0..16 {
            b.push(q[j] | (q[j + 16] << 4));
        }
        b
    }

    fn q4_1_block(d: f32, m: f32, q: &[u8; 32]) -> Vec<u8> {
        let mut b = h(d).to_vec();
        b.extend(h(m));
        for j in 0..16 {
            b.push(q[j] | (q[j + 16] << 4));
        }
        b
    }

    fn all_values() -> Vec<(&'static str, GgufValue)> {
        vec![
            ("t.u8", GgufValue::U8(200)),
            ("t.i8", GgufValue::I8(-100)),
            ("t.u16", GgufValue::U16(60000)),
            ("t.i16", GgufValue::I16(-30000)),
            ("t.u32", GgufValue::U32(4_000_000_000)),
            ("t.i32", GgufValue::I32(-2_000_000_000)),
            ("t.u64", GgufValue::U64(u64::MAX)),
            ("t.i64", GgufValue::I64(i64::MIN)),
            ("t.f32", GgufValue::F32(1.5)),
            ("t.f64", GgufValue::F64(-2.25e300)),
            ("t.bool", GgufValue::Bool(true)),
            ("t.str", GgufValue::Str("héllo ✓".into())),
            (
                "t.arr",
                GgufValue::Array(vec![GgufValue::I32(1), GgufValue::I32(-2), GgufValue::I32(3)]),
            ),
            (
                "t.strs",
                GgufValue::Array(vec![GgufValue::Str("a".into()), GgufValue::Str("".into())]),
            ),
            (
                "t.nested",
                GgufValue::Array(vec![
                    GgufValue::Array(vec![GgufValue::U8(1)]),
                    GgufValue::Array(vec![GgufValue::U8(2), GgufValue::U8(3)]),
                ]),
            ),
            ("t.empty", GgufValue::Array(vec![])),
        ]
    }

    #[test]
    fn metadata_all_value_types_round_trip() {
        for version in [2u32, 3] {
            let mut w = Writer::new();
            w.version = version;
            for (k, v) in all_values() {
                w = w.kv(k, v);
            }
            let (bytes, _) = w.build();
            let (p, g) = open_bytes("values", &bytes);
            let g = g.unwrap();
            assert_eq!(g.version(), version);
            for (k, v) in all_values() {
                assert_eq!(g.metadata().get(k), Some(&v), "{k}");
            }
            assert_eq!(g.get_u64("t.u8").unwrap(), 200);
            assert_eq!(g.get_u64("t.u64").unwrap(), u64::MAX);
            assert_eq!(g.opt_u64("t.i8"), None);
            assert_eq!(g.get_f64("t.f32").unwrap(), 1.5);
            assert_eq!(g.get_f64("t.i32").unwrap(), -2e9);
            assert_eq!(g.get_str("t.str").unwrap(), "héllo ✓");
            assert_eq!(g.opt_str("t.u8"), None);
            assert_eq!(g.opt_bool("t.bool"), Some(true));
            assert_eq!(g.metadata()["t.arr"].as_array().unwrap().len(), 3);
            assert!(g.tensors().is_empty());

            let e = g.get_u64("nope").unwrap_err().to_string();
            assert!(e.contains(&*p.to_string_lossy()) && e.contains("nope"), "{e}");
            let e = g.get_str("t.u32").unwrap_err().to_string();
            assert!(e.contains(&*p.to_string_lossy()) && e.contains("t.u32"), "{e}");
            assert!(e.contains("expected a string"), "{e}");
            let e = g.get_u64("t.i64").unwrap_err().to_string();
            assert!(e.contains("t.i64") && e.contains("non-negative"), "{e}");
            let e = g.get_f64("t.str").unwrap_err().to_string();
            assert!(e.contains("t.str"), "{e}");
            std::fs::remove_file(p).ok();
        }
    }

    /// Builds a file holding one tensor of every supported type, with hand-computed expectations.
    /// A tensor name, its row-major shape and its expected values.
    type Expected = Vec<(&'static str, Vec<usize>, Vec<f32>)>;
    /// A tensor name, the f64 sum of its values and some `(index, value)` pairs.
    type RefTensor = (&'static str, f64, [(usize, f64); 6]);

    fn typed_file(alignment: Option<u32>) -> (Writer, Expected) {
        let mut w = Writer::new();
        if let Some(a) = alignment {
            w = w.kv("general.alignment", GgufValue::U32(a));
        }
        let mut expect = Vec::new();

        // F32 [2 rows, 3 cols] (ggml dims [3, 2]).
        let f: Vec<f32> = vec![1.0, -2.5, 3.25, 0.0, 1e-3, -7.0];
        w = w.tensor("f32", &[3, 2], 0, f.iter().flat_map(|x| x.to_le_bytes()).collect());
        expect.push(("f32", vec![2, 3], f));

        // F16 values exactly representable.
        let f: Vec<f32> = vec![0.5, -1.0, 65504.0, 2.0f32.powi(-24)];
        w = w.tensor("f16", &[4], 1, f.iter().flat_map(|&x| h(x)).collect());
        expect.push(("f16", vec![4], f));

        // BF16: the top 16 bits of f32.
        let f: Vec<f32> = vec![1.0, -3.0, 0.15625, 1.0e30_f32];
        let bf: Vec<u8> =
            f.iter().flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes()).collect();
        let f_exp: Vec<f32> = f.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        w = w.tensor("bf16", &[2, 2], 30, bf);
        expect.push(("bf16", vec![2, 2], f_exp));

        // Q8_0: two blocks, dims [32, 2] -> shape [2, 32].
        let mut q1 = [0i8; 32];
        let mut q2 = [0i8; 32];
        for j in 0..32 {
            q1[j] = j as i8 - 16;
            q2[j] = if j % 2 == 0 { 127 } else { -128 };
        }
        let mut data = q8_block(0.5, &q1);
        data.extend(q8_block(-0.25, &q2));
        let mut e = Vec::new();
        e.extend(q1.iter().map(|&q| 0.5 * q as f32));
        e.extend(q2.iter().map(|&q| -0.25 * q as f32));
        w = w.tensor("q8_0", &[32, 2], 8, data);
        expect.push(("q8_0", vec![2, 32], e));

        // Q4_0: element j -> low nibble of byte j, element j+16 -> high nibble.
        let mut q = [0u8; 32];
        for (j, v) in q.iter_mut().enumerate() {
            *v = ((j * 7 + 3) % 16) as u8;
        }
        let data = q4_0_block(2.0, &q);
        let e: Vec<f32> = q.iter().map(|&v| 2.0 * (v as f32 - 8.0)).collect();
        w = w.tensor("q4_0", &[32], 2, data);
        expect.push(("q4_0", vec![32], e));

        // Q4_1: x = d*q + m.
        let mut q = [0u8; 32];
        for (j, v) in q.iter_mut().enumerate() {
            *v = ((j * 5 + 1) % 16) as u8;
        }
        let data = q4_1_block(0.125, -1.0, &q);
        let e: Vec<f32> = q.iter().map(|&v| 0.125 * v as f32 - 1.0).collect();
        w = w.tensor("q4_1", &[32], 3, data);
        expect.push(("q4_1", vec![32], e));

        (w, expect)
    }

    #[test]
    fn dequantizes_every_type_exactly() {
        for align in [None, Some(64), Some(1), Some(256)] {
            let (w, expect) = typed_file(align);
            let (bytes, data_start) = w.build();
            let (p, g) = open_bytes("types", &bytes);
            let g = g.unwrap();
            assert_eq!(g.alignment(), align.map_or(32, u64::from));
            assert_eq!(g.data_offset() as usize, data_start);
            assert_eq!(g.data_offset() % g.alignment(), 0);
            for (name, shape, values) in &expect {
                let (s, v) = g.tensor_f32(name).unwrap();
                assert_eq!(&s, shape, "{name}");
                assert_eq!(v.len(), values.len(), "{name}");
                for (i, (a, b)) in v.iter().zip(values).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "{name}[{i}]: {a} vs {b}");
                }
            }
            let info = g.tensor_info("q8_0").unwrap();
            assert_eq!(info.ggml_type, GgmlType::Q8_0);
            assert_eq!(info.dims, vec![32, 2]);
            assert_eq!(info.shape(), vec![2, 32]);
            assert_eq!(info.n_elements(), 64);
            assert_eq!(info.n_bytes(), Some(68));
            std::fs::remove_file(p).ok();
        }
    }

    #[test]
    fn large_tensor_parallel_path_matches_serial() {
        // 3 chunks worth of Q8_0 blocks plus a partial chunk.
        let n_blocks = (3 * PAR_CHUNK + 4 * 32) / 32;
        let mut data = Vec::new();
        let mut expect = Vec::new();
        for b in 0..n_blocks {
            let d = ((b % 13) as f32 - 6.0) * 0.0625;
            let mut q = [0i8; 32];
            for (j, v) in q.iter_mut().enumerate() {
                *v = ((b * 31 + j * 17) % 256) as u8 as i8;
            }
            data.extend(q8_block(d, &q));
            expect.extend(q.iter().map(|&x| x as f32 * f16::from_f32(d).to_f32()));
        }
        let w = Writer::new().tensor("big", &[64, n_blocks as u64 / 2], 8, data);
        let (bytes, _) = w.build();
        let (p, g) = open_bytes("big", &bytes);
        let (shape, v) = g.unwrap().tensor_f32("big").unwrap();
        assert_eq!(shape, vec![n_blocks / 2, 64]);
        assert_eq!(v, expect);
        std::fs::remove_file(p).ok();
    }

    fn err_of(tag: &str, bytes: &[u8]) -> String {
        let (p, r) = open_bytes(tag, bytes);
        let e = r.expect_err("expected an error").to_string();
        assert!(e.contains(&*p.to_string_lossy()), "error does not name the file: {e}");
        std::fs::remove_file(p).ok();
        e
    }

    #[test]
    fn bad_magic_and_version() {
        let e = err_of("magic", b"GGML\x03\0\0\0");
        assert!(e.contains("not a GGUF file"), "{e}");
        let e = err_of("empty", b"");
        assert!(e.contains("not a GGUF file"), "{e}");
        let mut w = Writer::new();
        w.version = 1;
        let e = err_of("v1", &w.build().0);
        assert!(e.contains("version 1"), "{e}");
        let mut w = Writer::new();
        w.version = 99;
        let e = err_of("v99", &w.build().0);
        assert!(e.contains("version 99"), "{e}");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let (w, _) = typed_file(None);
        let mut w = w;
        for (k, v) in all_values() {
            w = w.kv(k, v);
        }
        let (bytes, _) = w.build();
        let p = tmp_path("trunc");
        // Every prefix of the file must fail cleanly (header) or fail on the tensor extents.
        let step = 1;
        let mut n = 0;
        for len in (0..bytes.len()).step_by(step) {
            std::fs::write(&p, &bytes[..len]).unwrap();
            match GgufFile::open(&p) {
                Ok(_) => panic!("a file truncated to {len} of {} bytes opened", bytes.len()),
                Err(e) => {
                    let s = e.to_string();
                    assert!(s.contains(&*p.to_string_lossy()), "{s}");
                    n += 1;
                }
            }
        }
        assert!(n > 100);
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn corrupt_headers_are_errors() {
        // Huge tensor count.
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(u64::MAX.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        let e = err_of("count", &b);
        assert!(e.contains("tensor count"), "{e}");

        // Huge string length in a key.
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend((1u64 << 60).to_le_bytes());
        b.extend([0u8; 16]);
        let e = err_of("keylen", &b);
        assert!(e.contains("key of metadata entry 0"), "{e}");

        // Unknown value type names the key.
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        put_str(&mut b, "my.key");
        b.extend(77u32.to_le_bytes());
        b.extend([0u8; 16]);
        let e = err_of("vtype", &b);
        assert!(e.contains("my.key") && e.contains("77"), "{e}");

        // Array with a huge length names the key.
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        put_str(&mut b, "arr.key");
        b.extend(9u32.to_le_bytes());
        b.extend(4u32.to_le_bytes());
        b.extend((1u64 << 40).to_le_bytes());
        b.extend([0u8; 16]);
        let e = err_of("arrlen", &b);
        assert!(e.contains("arr.key"), "{e}");

        // Bad bool.
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        put_str(&mut b, "flag");
        b.extend(7u32.to_le_bytes());
        b.push(5);
        let e = err_of("bool", &b);
        assert!(e.contains("flag"), "{e}");

        // Bad alignment.
        let w = Writer::new().kv("general.alignment", GgufValue::U32(24));
        let mut bytes = Vec::new();
        bytes.extend(b"GGUF");
        bytes.extend(3u32.to_le_bytes());
        bytes.extend(0u64.to_le_bytes());
        bytes.extend(1u64.to_le_bytes());
        put_str(&mut bytes, "general.alignment");
        bytes.extend(4u32.to_le_bytes());
        bytes.extend(24u32.to_le_bytes());
        drop(w);
        let e = err_of("align", &bytes);
        assert!(e.contains("general.alignment"), "{e}");

        // Duplicate tensor name.
        let w = Writer::new()
            .tensor("a", &[1], 0, vec![0; 4])
            .tensor("a", &[1], 0, vec![0; 4]);
        let e = err_of("dup", &w.build().0);
        assert!(e.contains("`a`") && e.contains("twice"), "{e}");

        // Too many dimensions.
        let w = Writer::new().tensor("five", &[1, 1, 1, 1, 1], 0, vec![0; 4]);
        let e = err_of("dims", &w.build().0);
        assert!(e.contains("five"), "{e}");

        // Dimension product overflow.
        let w = Writer::new().tensor("huge", &[u64::MAX, 3], 0, vec![0; 4]);
        let e = err_of("ovf", &w.build().0);
        assert!(e.contains("huge"), "{e}");

        // Quantised row not a multiple of the block size.
        let w = Writer::new().tensor("ragged", &[16, 2], 8, vec![0; 34]);
        let e = err_of("ragged", &w.build().0);
        assert!(e.contains("ragged") && e.contains("block"), "{e}");
    }

    #[test]
    fn tensor_data_out_of_range_is_an_error() {
        // Declare a tensor bigger than the data written.
        let w = Writer::new().tensor("w", &[8, 8], 0, vec![0; 16]);
        let (mut bytes, _) = w.build();
        let e = err_of("oor", &bytes);
        assert!(e.contains("`w`") && e.contains("data section"), "{e}");

        // Corrupt the offset of a correct tensor.
        let w = Writer::new().tensor("v", &[4], 0, vec![0; 16]);
        let (good, start) = w.build();
        let (p, r) = open_bytes("good", &good);
        r.unwrap();
        std::fs::remove_file(p).ok();
        bytes = good.clone();
        // The offset is the last u64 before the padding that precedes the data.
        let hdr_end = 4 + 4 + 8 + 8 + (8 + 1) + 4 + 8 + 4 + 8;
        assert!(hdr_end <= start);
        bytes[hdr_end - 8..hdr_end].copy_from_slice(&(1u64 << 62).to_le_bytes());
        let e = err_of("offset", &bytes);
        assert!(e.contains("`v`"), "{e}");
    }

    #[test]
    fn unsupported_type_is_an_error_naming_tensor() {
        // Q6_K (14) has a known layout (210 bytes per 256), so opening works, dequantising fails.
        let w = Writer::new().tensor("blk.0.q6", &[256], 14, vec![0; 210]);
        let (bytes, _) = w.build();
        let (p, g) = open_bytes("q6k", &bytes);
        let g = g.unwrap();
        assert_eq!(g.tensor_info("blk.0.q6").unwrap().ggml_type, GgmlType::Other(14));
        let e = g.tensor_f32("blk.0.q6").unwrap_err().to_string();
        assert!(e.contains("blk.0.q6") && e.contains("q6_K") && e.contains(&*p.to_string_lossy()));
        // A type id nobody knows opens (its size cannot be checked) but cannot be read.
        let w = Writer::new().tensor("mystery", &[4], 1000, vec![0; 4]);
        let (bytes, _) = w.build();
        let (p2, g) = open_bytes("mystery", &bytes);
        let e = g.unwrap().tensor_f32("mystery").unwrap_err().to_string();
        assert!(e.contains("mystery") && e.contains("1000"), "{e}");
        let e = GgufFile::open(&p2).unwrap().tensor_f32("absent").unwrap_err().to_string();
        assert!(e.contains("absent") && e.contains(&*p2.to_string_lossy()), "{e}");
        std::fs::remove_file(p).ok();
        std::fs::remove_file(p2).ok();
    }

    #[test]
    fn hf_names() {
        let cases = [
            ("token_embd.weight", Some("model.embed_tokens.weight")),
            ("output_norm.weight", Some("model.norm.weight")),
            ("output.weight", Some("lm_head.weight")),
            ("blk.0.attn_q.weight", Some("model.layers.0.self_attn.q_proj.weight")),
            ("blk.12.attn_k.bias", Some("model.layers.12.self_attn.k_proj.bias")),
            ("blk.3.attn_v.weight", Some("model.layers.3.self_attn.v_proj.weight")),
            ("blk.3.attn_output.weight", Some("model.layers.3.self_attn.o_proj.weight")),
            ("blk.29.attn_norm.weight", Some("model.layers.29.input_layernorm.weight")),
            ("blk.29.ffn_norm.weight", Some("model.layers.29.post_attention_layernorm.weight")),
            ("blk.1.ffn_gate.weight", Some("model.layers.1.mlp.gate_proj.weight")),
            ("blk.1.ffn_up.weight", Some("model.layers.1.mlp.up_proj.weight")),
            ("blk.1.ffn_down.weight", Some("model.layers.1.mlp.down_proj.weight")),
            ("rope_freqs.weight", None),
            ("blk.x.attn_q.weight", None),
            ("blk.1.attn_q", None),
            ("blk.1.unknown.weight", None),
        ];
        for (g, want) in cases {
            assert_eq!(hf_tensor_name(g).as_deref(), want, "{g}");
        }
    }

    #[test]
    fn qk_permutation_round_trips_and_matches_definition() {
        // 2 heads of head_dim 4, 3 columns; rows labelled by value.
        let (n_head, hd, cols) = (2, 4, 3);
        let rows = n_head * hd;
        let hf: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let g = permute_qk(&hf, rows, cols, n_head);
        // llama.cpp: reshape(n_head, 2, hd/2, cols).swapaxes(1, 2): gguf row (h, i, j) = hf (h, j, i).
        for h in 0..n_head {
            for i in 0..hd / 2 {
                for j in 0..2 {
                    let gr = h * hd + i * 2 + j;
                    let hr = h * hd + j * (hd / 2) + i;
                    assert_eq!(&g[gr * cols..gr * cols + cols], &hf[hr * cols..hr * cols + cols]);
                }
            }
        }
        assert_eq!(unpermute_qk(&g, rows, cols, n_head), hf);
        // head 0 in gguf order: hf rows 0, 2, 1, 3.
        let first_col: Vec<f32> = (0..4).map(|r| g[r * cols] / cols as f32).collect();
        assert_eq!(first_col, vec![0.0, 2.0, 1.0, 3.0]);
    }

    fn llama_writer() -> Writer {
        Writer::new()
            .kv("general.architecture", GgufValue::Str("llama".into()))
            .kv("llama.block_count", GgufValue::U32(2))
            .kv("llama.context_length", GgufValue::U32(2048))
            .kv("llama.embedding_length", GgufValue::U32(64))
            .kv("llama.feed_forward_length", GgufValue::U32(128))
            .kv("llama.attention.head_count", GgufValue::U32(4))
            .kv("llama.attention.head_count_kv", GgufValue::U32(2))
            .kv("llama.rope.freq_base", GgufValue::F32(500000.0))
            .kv("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(1e-5))
            .kv(
                "tokenizer.ggml.tokens",
                GgufValue::Array((0..10).map(|i| GgufValue::Str(format!("t{i}"))).collect()),
            )
            .kv("tokenizer.ggml.bos_token_id", GgufValue::U32(1))
            .kv("tokenizer.ggml.eos_token_id", GgufValue::U32(2))
            .kv("tokenizer.chat_template", GgufValue::Str("{{ x }}".into()))
    }

    #[test]
    fn llama_params_from_synthetic_file() {
        let w = llama_writer()
            .kv("llama.rope.scaling.type", GgufValue::Str("linear".into()))
            .kv("llama.rope.scaling.factor", GgufValue::F32(4.0))
            .tensor("output.weight", &[64, 10], 0, vec![0; 64 * 10 * 4]);
        let (bytes, _) = w.build();
        let (p, g) = open_bytes("llama", &bytes);
        let prm = g.unwrap().llama_params().unwrap();
        assert_eq!(
            prm,
            GgufLlamaParams {
                arch: "llama".into(),
                vocab_size: 10,
                hidden_size: 64,
                n_layers: 2,
                n_heads: 4,
                n_kv_heads: 2,
                intermediate_size: 128,
                head_dim: 16,
                rope_theta: 500000.0,
                rms_norm_eps: 1e-5f32 as f64,
                context_length: 2048,
                rope_scaling: Some(("linear".into(), 4.0)),
                bos_token_id: Some(1),
                eos_token_id: Some(2),
                pad_token_id: None,
                chat_template: Some("{{ x }}".into()),
                tied_embeddings: false,
            }
        );
        std::fs::remove_file(p).ok();

        // Wrong architecture, missing key, bad token id.
        let w = llama_writer().kv("general.architecture", GgufValue::Str("qwen2".into()));
        let mut w2 = w;
        w2.kv.retain(|(k, v)| k != "general.architecture" || v.as_str() == Some("qwen2"));
        let (p, g) = open_bytes("arch", &w2.build().0);
        let e = g.unwrap().llama_params().unwrap_err().to_string();
        assert!(e.contains("qwen2") && e.contains("general.architecture"), "{e}");
        assert!(e.contains(&*p.to_string_lossy()));
        std::fs::remove_file(p).ok();

        let mut w = llama_writer();
        w.kv.retain(|(k, _)| k != "llama.feed_forward_length");
        let (p, g) = open_bytes("missing", &w.build().0);
        let e = g.unwrap().llama_params().unwrap_err().to_string();
        assert!(e.contains("llama.feed_forward_length") && e.contains("missing"), "{e}");
        std::fs::remove_file(p).ok();

        let w = llama_writer().kv("tokenizer.ggml.padding_token_id", GgufValue::U32(99));
        let (p, g) = open_bytes("pad", &w.build().0);
        let e = g.unwrap().llama_params().unwrap_err().to_string();
        assert!(e.contains("tokenizer.ggml.padding_token_id") && e.contains("99"), "{e}");
        std::fs::remove_file(p).ok();

        let w = llama_writer().kv("llama.attention.head_count_kv", GgufValue::U32(3));
        let mut w2 = w;
        // keep only the second head_count_kv (3)
        let first = w2.kv.iter().position(|(k, _)| k == "llama.attention.head_count_kv").unwrap();
        w2.kv.remove(first);
        let (p, g) = open_bytes("kv", &w2.build().0);
        let e = g.unwrap().llama_params().unwrap_err().to_string();
        assert!(e.contains("head_count_kv"), "{e}");
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn duplicate_key_is_an_error() {
        let w = Writer::new().kv("a.b", GgufValue::U8(1)).kv("a.b", GgufValue::U8(2));
        let e = err_of("dupkey", &w.build().0);
        assert!(e.contains("a.b") && e.contains("twice"), "{e}");
    }

    /// `TEMPER_ASSETS` if set, else `<workspace>/assets`.
    pub(crate) fn assets_dir() -> PathBuf {
        match std::env::var_os("TEMPER_ASSETS") {
            Some(d) => PathBuf::from(d),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("assets"),
        }
    }

    #[test]
    fn smollm2_asset() {
        let p = assets_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
        if !p.exists() {
            println!("skipping: {} is absent", p.display());
            return;
        }
        let g = GgufFile::open(&p).unwrap();
        assert_eq!(g.version(), 3);
        assert_eq!(g.tensors().len(), 272);
        let prm = g.llama_params().unwrap();
        assert_eq!(prm.vocab_size, 49152);
        assert_eq!(prm.hidden_size, 576);
        assert_eq!(prm.n_layers, 30);
        assert_eq!(prm.n_heads, 9);
        assert_eq!(prm.n_kv_heads, 3);
        assert_eq!(prm.intermediate_size, 1536);
        assert_eq!(prm.head_dim, 64);
        assert_eq!(prm.rope_theta, 100000.0);
        assert_eq!(prm.context_length, 8192);
        assert_eq!(prm.rope_scaling, None);
        assert_eq!((prm.bos_token_id, prm.eos_token_id, prm.pad_token_id), (Some(1), Some(2), Some(2)));
        assert!(prm.tied_embeddings);
        assert!(prm.chat_template.as_deref().unwrap().contains("<|im_start|>"));

        let t0 = std::time::Instant::now();
        let (shape, emb) = g.tensor_f32("token_embd.weight").unwrap();
        let dt = t0.elapsed();
        println!("token_embd.weight (q8_0 49152x576) dequantised in {dt:?}");
        assert_eq!(shape, vec![49152, 576]);
        assert!(emb.iter().all(|x| x.is_finite()));
        let (shape, q) = g.tensor_f32("blk.0.attn_q.weight").unwrap();
        assert_eq!(shape, vec![576, 576]);
        assert!(q.iter().any(|&x| x != 0.0));
        let (shape, k) = g.tensor_f32("blk.0.attn_k.weight").unwrap();
        assert_eq!(shape, vec![192, 576]);
        assert_eq!(unpermute_qk(&k, 192, 576, 3).len(), k.len());
        let (shape, _) = g.tensor_f32("blk.0.attn_norm.weight").unwrap();
        assert_eq!(shape, vec![576]);
        for t in g.tensors() {
            assert!(hf_tensor_name(&t.name).is_some(), "{}", t.name);
        }

        // Reference values from gguf-py 0.x (`gguf.quants.dequantize(t.data, t.tensor_type)`, the
        // sum taken in float64 over the flattened row-major array) on this very file.
        let refs: [RefTensor; 3] = [
            (
                "token_embd.weight",
                -15353.04449415207,
                [
                    (0, -0.10654449462890625),
                    (1, 0.032978057861328125),
                    (31, -0.20040512084960938),
                    (32, -0.09348678588867188),
                    (1000, 0.007411956787109375),
                    (28311551, -0.0417022705078125),
                ],
            ),
            (
                "blk.0.attn_q.weight",
                59.22322082519531,
                [
                    (0, -0.0963134765625),
                    (1, 0.1573486328125),
                    (31, -0.0963134765625),
                    (32, -0.34619140625),
                    (1000, -0.138427734375),
                    (331775, -0.255859375),
                ],
            ),
            (
                "blk.29.ffn_down.weight",
                49.83570861816406,
                [
                    (0, -0.2733154296875),
                    (1, 0.186279296875),
                    (31, -0.2733154296875),
                    (32, 0.026611328125),
                    (1000, 0.08392333984375),
                    (884735, 0.056640625),
                ],
            ),
        ];
        for (name, sum, elems) in refs {
            let (_, v) = g.tensor_f32(name).unwrap();
            let s: f64 = v.iter().map(|&x| x as f64).sum();
            assert!((s - sum).abs() <= 1e-6 * sum.abs().max(1.0), "{name}: {s} vs {sum}");
            for (i, x) in elems {
                assert_eq!(v[i] as f64, x, "{name}[{i}]");
            }
        }
    }

    /// Random byte corruption of a file with every value kind, every tensor type and a tokenizer
    /// must give errors or values, never a panic.
    #[test]
    fn corrupted_files_never_panic() {
        let (mut w, _) = typed_file(None);
        for (k, v) in all_values() {
            w = w.kv(k, v);
        }
        let strs = |v: &[&str]| GgufValue::Array(v.iter().map(|s| GgufValue::Str(s.to_string())).collect());
        w = w
            .kv("general.architecture", GgufValue::Str("llama".into()))
            .kv("tokenizer.ggml.model", GgufValue::Str("gpt2".into()))
            .kv("tokenizer.ggml.pre", GgufValue::Str("smollm".into()))
            .kv("tokenizer.ggml.tokens", strs(&["a", "b", "ab", "<|x|>"]))
            .kv(
                "tokenizer.ggml.token_type",
                GgufValue::Array([1, 1, 1, 3].map(GgufValue::I32).to_vec()),
            )
            .kv("tokenizer.ggml.merges", strs(&["a b"]))
            .kv("tokenizer.ggml.eos_token_id", GgufValue::U32(3));
        let (bytes, _) = w.build();
        let p = tmp_path("fuzz");
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (mut opened, mut failed) = (0, 0);
        for _ in 0..1500 {
            let mut b = bytes.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() % b.len() as u64) as usize;
                b[i] = match next() % 4 {
                    0 => 0xff,
                    1 => 0,
                    _ => next() as u8,
                };
            }
            std::fs::write(&p, &b).unwrap();
            match GgufFile::open(&p) {
                Ok(g) => {
                    opened += 1;
                    for t in g.tensors() {
                        let _ = g.tensor_f32(&t.name);
                    }
                    let _ = g.llama_params();
                    if let Ok(t) = crate::tokenizer::Tokenizer::from_gguf(&g) {
                        let _ = t.encode("ab ab<|x|>", true);
                    }
                }
                Err(e) => {
                    assert!(e.to_string().contains(&*p.to_string_lossy()), "{e}");
                    failed += 1;
                }
            }
        }
        assert!(opened > 0 && failed > 0, "{opened} opened, {failed} failed");
        std::fs::remove_file(p).ok();
    }

    fn fixtures_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
    }

    fn json_f32s(v: &serde_json::Value) -> Vec<f32> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    }

    /// Compares with `tests/fixtures/gguf/tiny_types.{gguf,json}`, written by
    /// tools/gen_gguf_fixture.py with gguf-py (metadata of every kind; F32/F16/BF16/Q8_0/Q4_0/Q4_1
    /// tensors whose `values` are `gguf.quants.dequantize` output, row-major).
    #[test]
    fn gguf_py_fixture() {
        let dir = fixtures_dir().join("gguf");
        let (gp, jp) = (dir.join("tiny_types.gguf"), dir.join("tiny_types.json"));
        if !gp.exists() || !jp.exists() {
            println!("skipping: {} or its .json is absent", gp.display());
            return;
        }
        let g = GgufFile::open(&gp).unwrap();
        let spec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&jp).unwrap()).unwrap();
        assert_eq!(u64::from(g.version()), spec["gguf_version"].as_u64().unwrap());
        assert_eq!(g.alignment(), spec["alignment"].as_u64().unwrap());

        fn check(v: &GgufValue, ty: &str, want: &serde_json::Value, key: &str) {
            let ok = match (ty, v) {
                ("STRING", GgufValue::Str(s)) => want.as_str() == Some(s.as_str()),
                ("BOOL", GgufValue::Bool(b)) => want.as_bool() == Some(*b),
                ("UINT8", GgufValue::U8(_))
                | ("UINT16", GgufValue::U16(_))
                | ("UINT32", GgufValue::U32(_))
                | ("UINT64", GgufValue::U64(_)) => want.as_u64() == v.as_u64(),
                ("INT8", GgufValue::I8(_))
                | ("INT16", GgufValue::I16(_))
                | ("INT32", GgufValue::I32(_))
                | ("INT64", GgufValue::I64(_)) => want.as_f64() == v.as_f64(),
                // FLOAT32 values are written as the exact f32 in decimal.
                ("FLOAT32", GgufValue::F32(x)) => want.as_f64().map(|w| w as f32) == Some(*x),
                ("FLOAT64", GgufValue::F64(x)) => want.as_f64() == Some(*x),
                _ => false,
            };
            assert!(ok, "{key}: {v:?} is not {ty} {want}");
        }
        let meta = spec["metadata"].as_array().unwrap();
        for m in meta {
            let key = m["key"].as_str().unwrap();
            let ty = m["type"].as_str().unwrap();
            let v = g.metadata().get(key).unwrap_or_else(|| panic!("key {key} missing"));
            if ty == "ARRAY" {
                let items = v.as_array().unwrap_or_else(|| panic!("{key} is not an array"));
                let want = m["value"].as_array().unwrap();
                assert_eq!(items.len(), want.len(), "{key}");
                let item_ty = m["item_type"].as_str().unwrap();
                for (x, w) in items.iter().zip(want) {
                    check(x, item_ty, w, key);
                }
            } else {
                check(v, ty, &m["value"], key);
            }
        }
        assert_eq!(g.metadata().len(), meta.len());

        let tensors = spec["tensors"].as_array().unwrap();
        assert_eq!(g.tensors().len(), tensors.len());
        for (info, t) in g.tensors().iter().zip(tensors) {
            let name = t["name"].as_str().unwrap();
            assert_eq!(info.name, name);
            assert_eq!(info.ggml_type.name().to_uppercase(), t["type"].as_str().unwrap(), "{name}");
            let ne: Vec<u64> = t["gguf_ne"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
            assert_eq!(info.dims, ne, "{name}");
            assert_eq!(info.n_bytes(), t["nbytes"].as_u64(), "{name}");
            let (shape, values) = g.tensor_f32(name).unwrap();
            let want_shape: Vec<usize> =
                t["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            assert_eq!(shape, want_shape, "{name}");
            let want = json_f32s(&t["values"]);
            assert_eq!(values.len(), want.len(), "{name}");
            for (i, (a, b)) in values.iter().zip(&want).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{name}[{i}]: {a} vs {b}");
            }
        }
    }

    /// Compares with `tests/fixtures/smollm2_checks.json` (transformers 5.24's dequantised,
    /// HF-layout weights of the SmolLM2 GGUF): the first rows of the embedding and of layer 0's
    /// q/k projections, after undoing llama.cpp's q/k row permutation.
    #[test]
    fn smollm2_weights_match_transformers() {
        let jp = fixtures_dir().join("smollm2_checks.json");
        let gp = assets_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
        if !jp.exists() || !gp.exists() {
            println!("skipping: {} or {} is absent", jp.display(), gp.display());
            return;
        }
        let spec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&jp).unwrap()).unwrap();
        let g = GgufFile::open(&gp).unwrap();
        let prm = g.llama_params().unwrap();
        let weights = spec["weights"].as_object().unwrap();
        assert!(weights.len() >= 3);
        for (hf_name, w) in weights {
            let gguf_name = w["gguf_tensor"].as_str().unwrap();
            assert_eq!(hf_tensor_name(gguf_name).as_deref(), Some(hf_name.as_str()));
            let (shape, mut v) = g.tensor_f32(gguf_name).unwrap();
            let torch_shape: Vec<usize> =
                w["torch_shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            assert_eq!(shape, torch_shape, "{hf_name}");
            let cols = shape[1];
            // Before unpermuting, the values sit in the GGUF rows named by the fixture.
            for r in w["gguf_rows"].as_array().unwrap() {
                let row = r["gguf_row"].as_u64().unwrap() as usize;
                let want = json_f32s(&r["values"]);
                assert_eq!(&v[row * cols..row * cols + want.len()], &want[..], "{hf_name} gguf row {row}");
            }
            if gguf_name.contains("attn_q") {
                v = unpermute_qk(&v, shape[0], cols, prm.n_heads);
            } else if gguf_name.contains("attn_k") {
                v = unpermute_qk(&v, shape[0], cols, prm.n_kv_heads);
            }
            for (row, want) in w["rows_0_2_cols_0_7"].as_array().unwrap().iter().enumerate() {
                let want = json_f32s(want);
                assert_eq!(&v[row * cols..row * cols + want.len()], &want[..], "{hf_name} row {row}");
            }
        }
        let h = &spec["hand_decoded_q4_1"];
        let (_, q) = g.tensor_f32(h["tensor"].as_str().unwrap()).unwrap();
        let (row, col) = (h["gguf_row"].as_u64().unwrap() as usize, h["col"].as_u64().unwrap() as usize);
        assert_eq!(q[row * 576 + col], h["value"].as_f64().unwrap() as f32);
    }
}
