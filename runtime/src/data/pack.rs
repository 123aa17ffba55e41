//! Shuffling, the eval split, packing and batches.
//!
//! Packing puts several examples in one row. Each keeps its own positions (restarting at 0)
//! and a segment id (1, 2, … within the row; 0 = padding), so attention stays inside an
//! example, and the first label of each is −100: with unshifted labels the logits at the last
//! token of one example would otherwise be trained to predict the first token of the next.
//! The loss over a packed batch is then the loss over the same examples unpacked.

use super::Example;
use crate::error::{Error, Result};
use crate::models::ForwardInput;
use crate::ops::IGNORE_INDEX;
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::train::Batch;
use crate::Device;

/// `examples` shuffled by `seed` (Fisher–Yates on SplitMix64, the same order on every machine)
/// and split: the first `round(len · eval_fraction)` go to eval. Returns `(train, eval)`.
pub fn shuffle_split<T>(mut examples: Vec<T>, seed: u64, eval_fraction: f64) -> (Vec<T>, Vec<T>) {
    let mut rng = Rng::new(seed);
    for i in (1..examples.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        examples.swap(i, j);
    }
    let n_eval = ((examples.len() as f64) * eval_fraction.clamp(0.0, 1.0)).round() as usize;
    let train = examples.split_off(n_eval);
    (train, examples)
}

/// Several examples in one row of at most `sequence_len` tokens (unpadded; [`packed_batches`] pads).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackedRow {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// Restart at 0 for each example.
    pub position_ids: Vec<i64>,
    /// 1, 2, … per example in the row; 0 marks padding.
    pub segment_ids: Vec<u32>,
}

/// Packs `examples` greedily, first fit in order: each goes to the first row with room, else a
/// new row. An example longer than `sequence_len` is an error naming its source.
pub fn pack(examples: &[Example], sequence_len: usize) -> Result<Vec<PackedRow>> {
    let mut rows: Vec<PackedRow> = Vec::new();
    for ex in examples {
        let n = ex.input_ids.len();
        if n > sequence_len {
            return Err(Error::Input(format!("{}: example of {n} tokens does not fit sequence_len {sequence_len}", ex.source)));
        }
        if n == 0 {
            continue;
        }
        let row = match rows.iter().position(|r| r.input_ids.len() + n <= sequence_len) {
            Some(i) => &mut rows[i],
            None => {
                rows.push(PackedRow::default());
                rows.last_mut().expect("just pushed")
            }
        };
        let seg = row.segment_ids.last().map_or(1, |s| s + 1);
        row.input_ids.extend_from_slice(&ex.input_ids);
        row.labels.push(IGNORE_INDEX);
        row.labels.extend_from_slice(&ex.labels[1..]);
        row.position_ids.extend(0..n as i64);
        row.segment_ids.extend(std::iter::repeat_n(seg, n));
    }
    Ok(rows)
}

fn tensor_i64(v: Vec<i64>, b: usize, t: usize) -> Result<Tensor> {
    Tensor::from_vec(v, &[b, t], Device::Cpu)
}

/// Unpacked batches of `micro_batch_size` examples (the last may be smaller), right-padded with
/// `pad_id` to the longest in the batch: `attention_mask` 0 and labels −100 on padding.
pub fn batches(examples: &[Example], micro_batch_size: usize, pad_id: u32) -> Result<Vec<Batch>> {
    check_mbs(micro_batch_size)?;
    examples
        .chunks(micro_batch_size)
        .map(|chunk| {
            let t = chunk.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
            let b = chunk.len();
            let (mut ids, mut mask, mut labels) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t), Vec::with_capacity(b * t));
            for e in chunk {
                let pad = t - e.input_ids.len();
                ids.extend(e.input_ids.iter().map(|&i| i as i64).chain(std::iter::repeat_n(pad_id as i64, pad)));
                mask.extend(std::iter::repeat_n(1i64, e.input_ids.len()).chain(std::iter::repeat_n(0, pad)));
                labels.extend(e.labels.iter().copied().chain(std::iter::repeat_n(IGNORE_INDEX, pad)));
            }
            Ok(Batch {
                input: ForwardInput { input_ids: tensor_i64(ids, b, t)?, attention_mask: Some(tensor_i64(mask, b, t)?), position_ids: None, segment_ids: None },
                labels: tensor_i64(labels, b, t)?,
            })
        })
        .collect()
}

/// Batches of `micro_batch_size` packed rows, right-padded with `pad_id` to the longest row in
/// the batch: position ids, segment ids (0 on padding), `attention_mask` 0 and labels −100 on padding.
pub fn packed_batches(rows: &[PackedRow], micro_batch_size: usize, pad_id: u32) -> Result<Vec<Batch>> {
    check_mbs(micro_batch_size)?;
    rows.chunks(micro_batch_size)
        .map(|chunk| {
            let t = chunk.iter().map(|r| r.input_ids.len()).max().unwrap_or(0);
            let b = chunk.len();
            let (mut ids, mut mask, mut labels, mut pos, mut seg) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for r in chunk {
                let (n, pad) = (r.input_ids.len(), t - r.input_ids.len());
                ids.extend(r.input_ids.iter().map(|&i| i as i64).chain(std::iter::repeat_n(pad_id as i64, pad)));
                mask.extend(std::iter::repeat_n(1i64, n).chain(std::iter::repeat_n(0, pad)));
                labels.extend(r.labels.iter().copied().chain(std::iter::repeat_n(IGNORE_INDEX, pad)));
                pos.extend(r.position_ids.iter().copied().chain(std::iter::repeat_n(0, pad)));
                seg.extend(r.segment_ids.iter().copied().chain(std::iter::repeat_n(0u32, pad)));
            }
            Ok(Batch {
                input: ForwardInput {
                    input_ids: tensor_i64(ids, b, t)?,
                    attention_mask: Some(tensor_i64(mask, b, t)?),
                    position_ids: Some(pos),
                    segment_ids: Some(Tensor::from_vec(seg, &[b, t], Device::Cpu)?),
                },
                labels: tensor_i64(labels, b, t)?,
            })
        })
        .collect()
}

fn check_mbs(m: usize) -> Result<()> {
    if m == 0 {
        return Err(Error::Input("data: micro_batch_size must be at least 1".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(n: usize, src: &str) -> Example {
        Example { input_ids: (1..=n as u32).collect(), labels: (1..=n as i64).collect(), source: src.into() }
    }

    #[test]
    fn first_fit_restarts_positions_and_masks_each_examples_first_label() {
        let rows = pack(&[ex(3, "a"), ex(4, "b"), ex(2, "c"), ex(1, "d")], 6).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].input_ids, [1, 2, 3, 1, 2, 1]);
        assert_eq!(rows[0].segment_ids, [1, 1, 1, 2, 2, 3]);
        assert_eq!(rows[0].position_ids, [0, 1, 2, 0, 1, 0]);
        assert_eq!(rows[0].labels, [-100, 2, 3, -100, 2, -100]);
        assert_eq!(rows[1].input_ids, [1, 2, 3, 4]);
        assert!(pack(&[ex(7, "x.jsonl:3")], 6).unwrap_err().to_string().starts_with("x.jsonl:3:"));
    }

    #[test]
    fn shuffle_is_fixed_by_the_seed_and_split_by_fraction() {
        let all: Vec<Example> = (1..=10).map(|n| ex(n, &n.to_string())).collect();
        let (a, ae) = shuffle_split(all.clone(), 7, 0.2);
        let (b, be) = shuffle_split(all.clone(), 7, 0.2);
        assert_eq!((a.clone(), ae.clone()), (b, be));
        assert_eq!((a.len(), ae.len()), (8, 2));
        let (c, _) = shuffle_split(all, 8, 0.2);
        assert_ne!(a, c);
    }
}
