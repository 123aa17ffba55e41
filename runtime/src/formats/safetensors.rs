//! safetensors checkpoints: a single `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped; and atomic writing.

use crate::backend::{CpuStorage, Storage};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// One or more memory-mapped safetensors files and which file holds each tensor.
pub struct SafetensorsFiles {
    files: Vec<(PathBuf, Mmap)>,
    index: BTreeMap<String, usize>,
}

fn read_header_names(path: &Path, mmap: &Mmap) -> Result<Vec<String>> {
    let st = SafeTensors::deserialize(mmap).map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
    Ok(st.names().into_iter().map(|s| s.to_string()).collect())
}

fn map_file(path: &Path) -> Result<Mmap> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the file is opened read-only; like every mmap reader we assume nobody truncates it meanwhile.
    unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))
}

impl SafetensorsFiles {
    /// Opens the checkpoint of a Hugging Face model folder (sharded or not).
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            Self::open_index(&index)
        } else if single.exists() {
            Self::open_files(&[single])
        } else {
            Err(Error::format(dir, "no model.safetensors or model.safetensors.index.json in this folder"))
        }
    }

    /// Opens the shards listed in an index file.
    pub fn open_index(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(index, format!("invalid JSON: {e}")))?;
        let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::Config {
            path: index.into(),
            key: "weight_map".into(),
            msg: "missing or not an object".into(),
        })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shard_ids: BTreeMap<String, usize> = BTreeMap::new();
        let mut files = Vec::new();
        let mut idx = BTreeMap::new();
        for (name, shard) in map {
            let shard = shard.as_str().ok_or_else(|| Error::Config {
                path: index.into(),
                key: format!("weight_map.{name}"),
                msg: "shard file name must be a string".into(),
            })?;
            let id = match shard_ids.get(shard) {
                Some(&i) => i,
                None => {
                    let p = dir.join(shard);
                    let m = map_file(&p)?;
                    read_header_names(&p, &m)?;
                    files.push((p, m));
                    shard_ids.insert(shard.to_string(), files.len() - 1);
                    files.len() - 1
                }
            };
            idx.insert(name.clone(), id);
        }
        let s = SafetensorsFiles { files, index: idx };
        // Every tensor the index promises must be in its shard.
        for (name, &i) in &s.index {
            let (p, m) = &s.files[i];
            if !read_header_names(p, m)?.iter().any(|n| n == name) {
                return Err(Error::MissingTensor { path: p.clone(), name: name.clone() });
            }
        }
        Ok(s)
    }

    /// Opens plain safetensors files (tensor names must be unique across them).
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for p in paths {
            let m = map_file(p)?;
            for n in read_header_names(p, &m)? {
                index.insert(n, files.len());
            }
            files.push((p.clone(), m));
        }
        Ok(SafetensorsFiles { files, index })
    }

    /// All tensor names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|s| s.as_str())
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The file holding `name` (or the first file, for messages about missing tensors).
    pub fn path_of(&self, name: &str) -> &Path {
        let i = self.index.get(name).copied().unwrap_or(0);
        self.files.get(i).map(|(p, _)| p.as_path()).unwrap_or(Path::new("<no file>"))
    }

    /// Shape and dtype of a tensor without reading its data.
    pub fn info(&self, name: &str) -> Result<(Vec<usize>, DType)> {
        let (p, view) = self.view(name)?;
        Ok((view.shape().to_vec(), dtype_of(&p, name, view.dtype())?))
    }

    fn view(&self, name: &str) -> Result<(PathBuf, TensorView<'_>)> {
        let &i = self.index.get(name).ok_or_else(|| Error::MissingTensor { path: self.path_of(name).into(), name: name.into() })?;
        let (p, m) = &self.files[i];
        let st = SafeTensors::deserialize(m).map_err(|e| Error::format(p, format!("not a valid safetensors file: {e}")))?;
        let v = st.tensor(name).map_err(|e| Error::format(p, format!("tensor `{name}`: {e}")))?;
        Ok((p.clone(), v))
    }

    /// Loads a tensor as stored (its own dtype) on the CPU.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        let (p, v) = self.view(name)?;
        let dt = dtype_of(&p, name, v.dtype())?;
        let bytes = v.data();
        let cpu = match dt {
            DType::F32 => CpuStorage::F32(bytemuck::pod_collect_to_vec(bytes)),
            DType::F64 => CpuStorage::F64(bytemuck::pod_collect_to_vec(bytes)),
            DType::BF16 => CpuStorage::BF16(bytemuck::pod_collect_to_vec(bytes)),
            DType::F16 => CpuStorage::F16(bytemuck::pod_collect_to_vec(bytes)),
            DType::I64 => CpuStorage::I64(bytemuck::pod_collect_to_vec(bytes)),
            DType::U32 => CpuStorage::U32(bytemuck::pod_collect_to_vec(bytes)),
            DType::U8 => CpuStorage::U8(bytes.to_vec()),
        };
        Tensor::from_storage(Storage::Cpu(cpu), v.shape())
    }

    /// Loads a tensor, checks its shape and converts it to `dtype`.
    pub fn load_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let t = self.load(name)?;
        if t.shape() != shape {
            return Err(Error::BadTensor {
                name: name.into(),
                msg: format!("in {}: shape {:?}, expected {:?}", self.path_of(name).display(), t.shape(), shape),
            });
        }
        if !t.dtype().is_float() {
            return Err(Error::BadTensor { name: name.into(), msg: format!("in {}: dtype {} is not a float type", self.path_of(name).display(), t.dtype()) });
        }
        t.to_dtype(dtype)
    }
}

fn dtype_of(path: &Path, name: &str, d: StDtype) -> Result<DType> {
    Ok(match d {
        StDtype::F32 => DType::F32,
        StDtype::F64 => DType::F64,
        StDtype::BF16 => DType::BF16,
        StDtype::F16 => DType::F16,
        StDtype::I64 => DType::I64,
        StDtype::U32 => DType::U32,
        StDtype::U8 => DType::U8,
        other => return Err(Error::format(path, format!("tensor `{name}` has unsupported dtype {other:?}"))),
    })
}

fn st_dtype(d: DType) -> StDtype {
    match d {
        DType::F32 => StDtype::F32,
        DType::F64 => StDtype::F64,
        DType::BF16 => StDtype::BF16,
        DType::F16 => StDtype::F16,
        DType::I64 => StDtype::I64,
        DType::U32 => StDtype::U32,
        DType::U8 => StDtype::U8,
    }
}

/// Writes `tensors` to `path` atomically (a temporary file in the same folder, then a rename), so a
/// crash never leaves a half-written checkpoint where a good one was.
pub fn save(path: &Path, tensors: &[(String, Tensor)], metadata: Option<std::collections::HashMap<String, String>>) -> Result<()> {
    let mut bufs = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let s = t.contiguous_storage()?;
        let host = s.to_cpu()?;
        let bytes: Vec<u8> = match &*host {
            CpuStorage::F32(v) => bytemuck::cast_slice(v).to_vec(),
            CpuStorage::F64(v) => bytemuck::cast_slice(v).to_vec(),
            CpuStorage::BF16(v) => bytemuck::cast_slice(v).to_vec(),
            CpuStorage::F16(v) => bytemuck::cast_slice(v).to_vec(),
            CpuStorage::I64(v) => bytemuck::cast_slice(v).to_vec(),
            CpuStorage::U32(v) => bytemuck::cast_slice(v).to_vec(),
            CpuStorage::U8(v) => v.clone(),
        };
        bufs.push((name.clone(), t.dtype(), t.shape().to_vec(), bytes));
    }
    let views = bufs
        .iter()
        .map(|(n, d, s, b)| {
            TensorView::new(st_dtype(*d), s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::BadTensor { name: n.clone(), msg: e.to_string() })
        })
        .collect::<Result<Vec<_>>>()?;
    let data = safetensors::serialize(views, metadata).map_err(|e| Error::format(path, e.to_string()))?;
    write_atomic(path, &data)
}

/// Writes bytes to `path` through a temporary sibling and a rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(data).and_then(|_| f.sync_all()).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
