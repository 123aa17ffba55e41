//! The key/value cache of incremental decoding: per layer, K and V laid out
//! `[batch, capacity, kv_heads, head_dim]`, plus the key padding mask `[batch, capacity]`.

use crate::backend::{BackendStorage, Storage};
use crate::error::{ensure_shape, Result};
use crate::tensor::{DType, Tensor};
use crate::Device;

/// Cached keys and values of the tokens seen so far.
pub struct KvCache {
    pub(crate) k: Vec<Storage>,
    pub(crate) v: Vec<Storage>,
    /// U8 [batch, capacity]: 1 where a real token was written.
    pub(crate) key_mask: Storage,
    pub batch: usize,
    pub capacity: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Positions filled so far.
    pub len: usize,
}

impl KvCache {
    /// An empty cache for `layers` layers holding up to `capacity` tokens per row.
    pub fn new(layers: usize, batch: usize, capacity: usize, kv_heads: usize, head_dim: usize, dtype: DType, device: Device) -> Result<Self> {
        let n = batch * capacity * kv_heads * head_dim;
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(Storage::zeros(device, dtype, n)?);
            v.push(Storage::zeros(device, dtype, n)?);
        }
        Ok(KvCache { k, v, key_mask: Storage::zeros(device, DType::U8, batch * capacity)?, batch, capacity, kv_heads, head_dim, len: 0 })
    }

    /// Records which of the next `mask.len()/batch` positions hold real tokens (row-major [batch, t]).
    pub(crate) fn append_mask(&mut self, mask: &[u8]) -> Result<()> {
        let t = mask.len() / self.batch.max(1);
        ensure_shape!(self.len + t <= self.capacity, "kv_cache", "{} + {t} tokens exceed the cache capacity {}", self.len, self.capacity);
        let src = Tensor::from_vec(mask.to_vec(), &[mask.len()], self.key_mask.device())?;
        let src = src.storage();
        self.key_mask.write_blocks(&src, self.batch, t, self.capacity, self.len)
    }

    /// Writes `t` new positions of layer `layer` (k, v are [batch, t, kv_heads, head_dim]) after `len`.
    pub(crate) fn write(&mut self, layer: usize, k: &Storage, v: &Storage, t: usize) -> Result<()> {
        let row = self.kv_heads * self.head_dim;
        self.k[layer].write_blocks(k, self.batch, t * row, self.capacity * row, self.len * row)?;
        self.v[layer].write_blocks(v, self.batch, t * row, self.capacity * row, self.len * row)
    }
}
