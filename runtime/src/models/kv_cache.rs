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

    /// Keeps cache rows `rows` (in that order, repeats allowed): the samples of one prompt share
    /// its prefilled rows, and finished rows leave the batch.
    pub(crate) fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        ensure_shape!(rows.iter().all(|&r| r < self.batch), "kv_cache", "row index out of range for batch {}", self.batch);
        let device = self.key_mask.device();
        let ids = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<u32>>(), &[rows.len()], device)?;
        let ids = ids.storage();
        let row = self.capacity * self.kv_heads * self.head_dim;
        for s in self.k.iter_mut().chain(self.v.iter_mut()) {
            *s = s.embedding(&ids, row)?;
        }
        let mask = Tensor::from_storage(self.key_mask.clone(), &[self.batch * self.capacity])?.to_vec::<u8>()?;
        let kept: Vec<u8> = rows.iter().flat_map(|&r| mask[r * self.capacity..(r + 1) * self.capacity].to_vec()).collect();
        self.key_mask = Tensor::from_vec(kept, &[rows.len() * self.capacity], device)?.storage().clone();
        self.batch = rows.len();
        Ok(())
    }
}
