//! A frozen quantised linear weight `[out, in]`: the base layer of QLoRA.
//!
//! Two storage formats, both kept exactly as their files hold them:
//! - bitsandbytes 4-bit (NF4/FP4, optionally double-quantised scales): the checkpoint tensors
//!   (`weight`, `weight.absmax`, `weight.quant_map`, …), so saving writes them back byte for byte;
//!   the block scales are decoded to f32 once (4 bytes per block of 64).
//! - GGUF blocks (Q4_0, Q4_1, Q8_0): the raw block bytes of each row; llama.cpp's q/k row
//!   permutation is undone by reading rows through a permutation, never by rewriting data.
//!
//! Compute only ever asks for a tile of rows ([`QuantizedWeight::dequantize_rows`]); the whole f32
//! weight exists only when something asks for it ([`QuantizedWeight::dequantize`]: merging, DoRA).

use super::codes::QuantType;
use super::state::{Absmax, Nf4Weight};
use crate::backend::{CpuStorage, Storage};
use crate::error::{Error, Result};
use crate::formats::gguf::{self, GgmlType};
use crate::tensor::{DType, Tensor};
use crate::Device;
use rayon::prelude::*;
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How a [`QuantizedWeight`] stores its values.
#[derive(Clone, Debug)]
enum Format {
    /// bitsandbytes: `tensors[0]` is the packed `weight` (U8, `[(n+1)/2, 1]`), `tensors[1]` the
    /// `weight.absmax` (f32 scales, read in place; or 8-bit codes, then `decoded` holds the f32
    /// scales, decoded once).
    /// `nested` is `(offset, nested_blocksize)` of double-quantised scales (what a device decodes them with).
    Bnb { quant_type: QuantType, blocksize: usize, code: [f32; 16], decoded: Option<Vec<f32>>, nested: Option<(f32, usize)>, tensors: Vec<(String, Tensor)> },
    /// GGUF blocks, `row_bytes` per row; row `r` of the weight is stored row `perm[r]`.
    /// `blocks[0]` is the raw bytes as a U8 tensor named `weight` (visited for counting; GGUF
    /// blocks have no Hugging Face form, so saving a model with them is refused).
    Ggml { ty: GgmlType, row_bytes: usize, perm: Option<Vec<u32>>, blocks: Vec<(String, Tensor)> },
}

/// A frozen quantised weight `[out_features, in_features]` (see the module docs).
#[derive(Clone, Debug)]
pub struct QuantizedWeight {
    shape: [usize; 2],
    /// The dtype the weight had before quantisation (and dequantises to).
    dtype: DType,
    format: Format,
    /// Device copies (packed codes and decoded scales uploaded once per device ordinal), built by
    /// the GPU backend on first use and shared by clones; see [`QuantizedWeight::device_cached`].
    device_copies: Arc<Mutex<HashMap<usize, Arc<dyn Any + Send + Sync>>>>,
}

/// The host pieces of a bitsandbytes 4-bit weight, copied out for an upload to a device.
#[derive(Clone, Debug)]
pub struct BnbParts {
    pub quant_type: QuantType,
    pub blocksize: usize,
    /// The 16-entry 4-bit table.
    pub code: [f32; 16],
    /// Two codes per byte, element 2j in the high nibble; `ceil(n/2)` bytes.
    pub packed: Vec<u8>,
    /// The scales as stored: plain f32, or the double-quantised codes with their nested state.
    pub absmax: Absmax,
}

/// How `temper` quantises weights on load or in `temper quantize` (bitsandbytes' parameters).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bnb4bitConfig {
    pub quant_type: QuantType,
    pub blocksize: usize,
    /// Quantise the block scales too (`bnb_4bit_use_double_quant`).
    pub double_quant: bool,
}

impl Default for Bnb4bitConfig {
    /// QLoRA's recipe: NF4, blocks of 64, double quantisation.
    fn default() -> Self {
        Bnb4bitConfig { quant_type: QuantType::Nf4, blocksize: 64, double_quant: true }
    }
}

fn torch_dtype_name(d: DType) -> Result<&'static str> {
    Ok(match d {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        other => return Err(Error::dtype("quantize", format!("a {other} weight (bitsandbytes records float32, bfloat16 or float16)"))),
    })
}

fn dtype_from_torch(name: &str, key: &str) -> Result<DType> {
    Ok(match name {
        "float32" => DType::F32,
        "bfloat16" => DType::BF16,
        "float16" => DType::F16,
        other => return Err(Error::BadTensor { name: key.into(), msg: format!("quant-state dtype `{other}` (expected float32, bfloat16 or float16)") }),
    })
}

fn f32_slice(s: &Storage) -> &[f32] {
    match s {
        Storage::Cpu(CpuStorage::F32(v)) => v,
        // Plain absmax is checked to be F32 when the weight is read.
        _ => &[],
    }
}

fn u8_slice(s: &Storage) -> &[u8] {
    match s {
        Storage::Cpu(CpuStorage::U8(v)) => v,
        // The packed tensor is built here as U8 and never replaced.
        _ => &[],
    }
}

/// What dequantised values can be written as: f32 (work) and f64 (gradient checks).
pub trait DequantOut: Copy + Send + Sync + 'static {
    fn from_f32(v: f32) -> Self;
    /// The slice itself when it already is f32 (so GGUF kernels write into it directly).
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]>;
}

impl DequantOut for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> f32 {
        v
    }
    fn as_f32_mut(s: &mut [f32]) -> Option<&mut [f32]> {
        Some(s)
    }
}

impl DequantOut for f64 {
    #[inline(always)]
    fn from_f32(v: f32) -> f64 {
        v as f64
    }
    fn as_f32_mut(_: &mut [f64]) -> Option<&mut [f32]> {
        None
    }
}

impl QuantizedWeight {
    /// A bitsandbytes 4-bit weight read from a checkpoint (see [`Nf4Weight::from_safetensors`]).
    pub fn from_bnb(w: Nf4Weight, state_key: &str) -> Result<QuantizedWeight> {
        let s = &w.state;
        let [out, inp] = match s.shape[..] {
            [o, i] => [o, i],
            _ => return Err(Error::BadTensor { name: state_key.into(), msg: format!("shape {:?} is not a 2-D linear weight", s.shape) }),
        };
        let code: [f32; 16] = s.quant_map.as_slice().try_into().map_err(|_| Error::BadTensor { name: state_key.into(), msg: "quant_map must have 16 entries".into() })?;
        let dtype = dtype_from_torch(&s.dtype, state_key)?;
        let decoded = match &s.absmax {
            Absmax::Plain(_) => None,
            nested => Some(nested.values()?),
        };
        let nested = match &s.absmax {
            Absmax::Plain(_) => None,
            Absmax::Nested { offset, nested_blocksize, .. } => Some((*offset, *nested_blocksize)),
        };
        let tensors = w.to_safetensors_entries("")?.into_iter().map(|(k, t)| (k.trim_start_matches('.').to_string(), t)).collect();
        Ok(QuantizedWeight {
            shape: [out, inp],
            dtype,
            format: Format::Bnb { quant_type: s.quant_type, blocksize: s.blocksize, code, decoded, nested, tensors },
            device_copies: Default::default(),
        })
    }

    /// Quantises a dense `[out, in]` weight the way bitsandbytes does (byte-identical codes and
    /// scales); the original dtype is recorded so the weight dequantises back to it.
    pub fn quantize_bnb(weight: &Tensor, cfg: Bnb4bitConfig) -> Result<QuantizedWeight> {
        let shape = weight.shape().to_vec();
        if shape.len() != 2 {
            return Err(Error::Input(format!("4-bit quantisation needs a 2-D weight, got {shape:?}")));
        }
        let dtype = weight.dtype();
        let mut w = Nf4Weight::quantize(&weight.to_dtype(DType::F32)?.to_vec::<f32>()?, &shape, cfg.quant_type, cfg.blocksize, cfg.double_quant)?;
        w.state.dtype = torch_dtype_name(dtype)?.into();
        Self::from_bnb(w, "quantize")
    }

    /// A GGUF-quantised weight kept as its blocks: `data` is `out × in` values of `ty` in row-major
    /// blocks; `perm[r]` is the stored row that holds row `r` (llama.cpp permutes q/k rows).
    pub fn from_ggml(ty: GgmlType, data: Vec<u8>, shape: [usize; 2], perm: Option<Vec<u32>>, name: &str) -> Result<QuantizedWeight> {
        let bad = |msg: String| Error::BadTensor { name: name.into(), msg };
        if !matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0) {
            return Err(bad(format!("type {ty} cannot stay quantised (Q4_0, Q4_1 and Q8_0 can)")));
        }
        let (block, block_bytes) = ty.block_layout().map(|(a, b)| (a as usize, b as usize)).ok_or_else(|| bad(format!("unknown block layout of {ty}")))?;
        if shape[1] % block != 0 {
            return Err(bad(format!("rows of {} values do not split into blocks of {block}", shape[1])));
        }
        let row_bytes = shape[1] / block * block_bytes;
        if data.len() != row_bytes * shape[0] {
            return Err(bad(format!("{} bytes of {ty} data for shape {shape:?} (expected {})", data.len(), row_bytes * shape[0])));
        }
        if let Some(p) = &perm {
            if p.len() != shape[0] || p.iter().any(|&r| r as usize >= shape[0]) {
                return Err(bad("row permutation does not fit the weight".into()));
            }
        }
        let n = data.len();
        let blocks = vec![("weight".to_string(), Tensor::from_vec(data, &[n], Device::Cpu)?)];
        Ok(QuantizedWeight { shape, dtype: DType::F32, format: Format::Ggml { ty, row_bytes, perm, blocks }, device_copies: Default::default() })
    }

    /// `[out_features, in_features]`.
    pub fn shape(&self) -> [usize; 2] {
        self.shape
    }

    /// The dtype the weight dequantises to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Short description: `nf4 (blocksize 64, double quant)`, `Q4_0`.
    pub fn describe(&self) -> String {
        match &self.format {
            Format::Bnb { quant_type, blocksize, decoded, .. } => {
                format!("{} (blocksize {blocksize}{})", quant_type.as_str(), if decoded.is_some() { ", double quant" } else { "" })
            }
            Format::Ggml { ty, .. } => ty.to_string(),
        }
    }

    /// The bitsandbytes parameters, for a bitsandbytes weight.
    pub fn bnb_config(&self) -> Option<Bnb4bitConfig> {
        match &self.format {
            Format::Bnb { quant_type, blocksize, decoded, .. } => Some(Bnb4bitConfig { quant_type: *quant_type, blocksize: *blocksize, double_quant: decoded.is_some() }),
            Format::Ggml { .. } => None,
        }
    }

    /// Bytes the stored weight occupies: what a checkpoint holds (packed codes and scales, or GGUF blocks).
    pub fn bytes(&self) -> usize {
        match &self.format {
            Format::Bnb { tensors, .. } => tensors.iter().map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes()).sum(),
            Format::Ggml { blocks, .. } => blocks[0].1.elem_count(),
        }
    }

    /// Bytes the weight holds in memory: [`QuantizedWeight::bytes`] plus, for double-quantised
    /// scales, their f32 values decoded at load (4 bytes per block).
    pub fn resident_bytes(&self) -> usize {
        match &self.format {
            Format::Bnb { decoded, .. } => self.bytes() + decoded.as_ref().map_or(0, |d| 4 * d.len()),
            Format::Ggml { .. } => self.bytes(),
        }
    }

    /// The stored tensors relative to the layer: bitsandbytes' checkpoint tensors (`weight`,
    /// `weight.absmax`, …), or the GGUF blocks as one U8 `weight` (which has no Hugging Face form).
    pub fn entries(&self) -> &[(String, Tensor)] {
        match &self.format {
            Format::Bnb { tensors, .. } => tensors,
            Format::Ggml { blocks, .. } => blocks,
        }
    }

    /// The host pieces of a bitsandbytes weight (copied), for uploading to a device; `None` for GGUF blocks.
    pub fn bnb_parts(&self) -> Result<Option<BnbParts>> {
        let Format::Bnb { quant_type, blocksize, code, nested, tensors, .. } = &self.format else {
            return Ok(None);
        };
        let get = |name: &str| tensors.iter().find(|(k, _)| k == name).map(|(_, t)| t).ok_or_else(|| Error::MissingTensor { path: "quantised weight".into(), name: name.into() });
        let packed = get("weight")?.to_vec::<u8>()?;
        let absmax = match nested {
            None => Absmax::Plain(get("weight.absmax")?.to_vec::<f32>()?),
            Some((offset, nested_blocksize)) => Absmax::Nested {
                codes: get("weight.absmax")?.to_vec::<u8>()?,
                nested_absmax: get("weight.nested_absmax")?.to_vec::<f32>()?,
                nested_map: get("weight.nested_quant_map")?.to_vec::<f32>()?,
                offset: *offset,
                nested_blocksize: *nested_blocksize,
            },
        };
        Ok(Some(BnbParts { quant_type: *quant_type, blocksize: *blocksize, code: *code, packed, absmax }))
    }

    /// The device copy kept under `key` (a device ordinal), made by `make` on first use and shared
    /// by every clone of this weight afterwards.
    pub fn device_cached<T: Any + Send + Sync>(&self, key: usize, make: impl FnOnce() -> Result<T>) -> Result<Arc<T>> {
        let mut map = self.device_copies.lock().map_err(|_| Error::Unsupported("quantised weight's device cache poisoned by an earlier panic".into()))?;
        if let Some(v) = map.get(&key) {
            if let Ok(t) = v.clone().downcast::<T>() {
                return Ok(t);
            }
        }
        let t = Arc::new(make()?);
        map.insert(key, t.clone());
        Ok(t)
    }

    /// Writes rows `r0..r1` of the dequantised weight (row-major) into `out`, as f32 or f64.
    pub fn dequantize_rows_into<T: DequantOut>(&self, r0: usize, r1: usize, out: &mut [T]) {
        let cols = self.shape[1];
        debug_assert_eq!(out.len(), (r1 - r0) * cols);
        match &self.format {
            Format::Bnb { code, decoded, blocksize, tensors, .. } => {
                let guard = tensors[0].1.storage();
                let packed = u8_slice(&guard);
                let scales_guard = tensors[1].1.storage();
                let absmax: &[f32] = match decoded {
                    Some(v) => v,
                    None => f32_slice(&scales_guard),
                };
                let (base, bs) = (r0 * cols, *blocksize);
                // An odd start is the low nibble of a byte; everything after starts on a byte.
                let first = (base % 2).min(out.len());
                let (head, rest) = out.split_at_mut(first);
                for (k, o) in head.iter_mut().enumerate() {
                    let i = base + k;
                    *o = T::from_f32(code[(packed[i / 2] & 0x0F) as usize] * absmax[i / bs]);
                }
                let start = base + first;
                rest.par_chunks_mut(4096).enumerate().for_each(|(c, chunk)| {
                    // Block by block: one scale per block, two values per byte (blocksizes are even,
                    // so a block starts on a byte).
                    let (mut i, end, mut o) = (start + c * 4096, start + c * 4096 + chunk.len(), 0);
                    while i < end {
                        let b = i / bs;
                        let stop = ((b + 1) * bs).min(end);
                        let s = absmax[b];
                        for (pair, &byte) in chunk[o..o + (stop - i)].chunks_mut(2).zip(&packed[i / 2..]) {
                            pair[0] = T::from_f32(code[(byte >> 4) as usize] * s);
                            if let Some(p) = pair.get_mut(1) {
                                *p = T::from_f32(code[(byte & 0x0F) as usize] * s);
                            }
                        }
                        o += stop - i;
                        i = stop;
                    }
                });
            }
            Format::Ggml { ty, row_bytes, perm, blocks } => {
                let Some(kernel) = gguf::block_kernel(*ty) else { return };
                let guard = blocks[0].1.storage();
                let data = u8_slice(&guard);
                out.par_chunks_mut(cols).enumerate().for_each_init(Vec::new, |tmp, (k, row)| {
                    let r = r0 + k;
                    let src = &data[perm.as_ref().map_or(r, |p| p[r] as usize) * row_bytes..][..*row_bytes];
                    match T::as_f32_mut(row) {
                        Some(row) => kernel(src, row),
                        None => {
                            tmp.resize(cols, 0f32);
                            kernel(src, tmp);
                            row.iter_mut().zip(tmp.iter()).for_each(|(o, &v)| *o = T::from_f32(v));
                        }
                    }
                });
            }
        }
    }

    /// Rows `r0..r1`, f32.
    pub fn dequantize_rows(&self, r0: usize, r1: usize) -> Vec<f32> {
        let mut v = vec![0f32; (r1 - r0) * self.shape[1]];
        self.dequantize_rows_into(r0, r1, &mut v);
        v
    }

    /// The whole dequantised weight as a tensor of [`QuantizedWeight::dtype`] (merging, DoRA's norm).
    pub fn dequantize(&self) -> Result<Tensor> {
        Tensor::from_vec(self.dequantize_rows(0, self.shape[0]), &self.shape, Device::Cpu)?.to_dtype(self.dtype)
    }
}

/// How far two sets of named weights are apart (a QLoRA merge into dequant(W4) against the merge
/// into the original weights).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WeightDiff {
    /// Largest |a − b| over every value.
    pub max_abs: f64,
    /// ‖a − b‖ / ‖b‖ over all values together.
    pub relative_norm: f64,
    /// Tensors compared, and how many of them differ at all.
    pub tensors: usize,
    pub differing: usize,
}

/// Compares `a` with `b` by name; a name missing from `b` or a shape mismatch is an error naming it.
pub fn compare_weights(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> Result<WeightDiff> {
    let by_name: std::collections::HashMap<&str, &Tensor> = b.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let (mut max_abs, mut diff2, mut norm2, mut differing) = (0f64, 0f64, 0f64, 0usize);
    for (name, ta) in a {
        let tb = by_name.get(name.as_str()).ok_or_else(|| Error::MissingTensor { path: "the original model".into(), name: name.clone() })?;
        if ta.shape() != tb.shape() {
            return Err(Error::BadTensor { name: name.clone(), msg: format!("shape {:?} vs {:?} in the original model", ta.shape(), tb.shape()) });
        }
        let (va, vb) = (ta.to_f64_vec()?, tb.to_f64_vec()?);
        let mut any = false;
        for (x, y) in va.iter().zip(&vb) {
            let d = (x - y).abs();
            any |= d > 0.0;
            max_abs = max_abs.max(d);
            diff2 += d * d;
            norm2 += y * y;
        }
        differing += any as usize;
    }
    Ok(WeightDiff { max_abs, relative_norm: if norm2 > 0.0 { (diff2 / norm2).sqrt() } else { diff2.sqrt() }, tensors: a.len(), differing })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantType;

    fn dense(out: usize, inp: usize) -> Tensor {
        let v: Vec<f32> = (0..out * inp).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        Tensor::from_vec(v, &[out, inp], Device::Cpu).unwrap()
    }

    #[test]
    fn any_row_range_dequantises_like_the_whole_weight_in_f32_and_f64() {
        // 7 columns: row starts alternate between the high and the low nibble of a byte.
        let w = QuantizedWeight::quantize_bnb(&dense(9, 7), Bnb4bitConfig { quant_type: QuantType::Fp4, blocksize: 32, double_quant: false }).unwrap();
        let all = w.dequantize_rows(0, 9);
        for (r0, r1) in [(0, 9), (1, 4), (3, 8), (8, 9)] {
            assert_eq!(w.dequantize_rows(r0, r1), all[r0 * 7..r1 * 7], "rows {r0}..{r1}");
            let mut wide = vec![0f64; (r1 - r0) * 7];
            w.dequantize_rows_into(r0, r1, &mut wide);
            assert!(wide.iter().zip(&all[r0 * 7..r1 * 7]).all(|(a, b)| *a == *b as f64));
        }
        assert_eq!(w.describe(), "fp4 (blocksize 32)");
        assert_eq!(w.dtype(), DType::F32);
    }

    /// Q8_0 rows read through a permutation are the stored rows in that order.
    #[test]
    fn ggml_rows_follow_the_permutation() {
        let (out, inp) = (4, 32);
        let mut data = Vec::new();
        for r in 0..out {
            data.extend_from_slice(&half::f16::from_f32(0.5).to_bits().to_le_bytes());
            data.extend((0..inp).map(|j| (r as i8 * 10 + j as i8) as u8));
        }
        let perm = vec![2u32, 0, 3, 1];
        let w = QuantizedWeight::from_ggml(GgmlType::Q8_0, data.clone(), [out, inp], Some(perm.clone()), "blk.0.attn_q.weight").unwrap();
        let plain = QuantizedWeight::from_ggml(GgmlType::Q8_0, data, [out, inp], None, "x").unwrap().dequantize_rows(0, out);
        let got = w.dequantize_rows(0, out);
        for (r, &p) in perm.iter().enumerate() {
            assert_eq!(got[r * inp..(r + 1) * inp], plain[p as usize * inp..(p as usize + 1) * inp]);
        }
        assert_eq!(plain[inp + 3], 0.5 * 13.0);
        assert_eq!(w.bytes(), 4 * 34);
        assert_eq!(w.entries().len(), 1, "the blocks, as one U8 tensor");
        let e = QuantizedWeight::from_ggml(GgmlType::Q8_0, vec![0; 10], [out, inp], None, "blk.1.ffn_up.weight").unwrap_err().to_string();
        assert!(e.contains("blk.1.ffn_up.weight") && e.contains("10 bytes"), "{e}");
    }

    #[test]
    fn weights_compare_by_name_and_report_the_distance() {
        let a = vec![("w".to_string(), Tensor::from_vec(vec![1.0f32, 2.0], &[2], Device::Cpu).unwrap())];
        let b = vec![("w".to_string(), Tensor::from_vec(vec![1.0f32, 2.5], &[2], Device::Cpu).unwrap())];
        let d = compare_weights(&a, &b).unwrap();
        assert_eq!((d.max_abs, d.tensors, d.differing), (0.5, 1, 1));
        assert!((d.relative_norm - 0.5 / (1.0f64 + 6.25).sqrt()).abs() < 1e-12);
        let e = compare_weights(&a, &[("v".to_string(), a[0].1.clone())]).unwrap_err().to_string();
        assert!(e.contains("`w`") || e.contains("w"), "{e}");
    }
}
