//! Blockwise quantisation in bitsandbytes' layout.
//!
//! 4-bit: the tensor is flattened row-major and cut into consecutive blocks of `blocksize` values
//! (blocks ignore row boundaries; the last may be partial). Per block `absmax = max|x|` (f32) and
//! `q = code(x · (1/absmax))` — multiplying by the f32 reciprocal, as bitsandbytes does, so values
//! on a threshold land where bitsandbytes puts them (its reference backend divides, `x / absmax`, in
//! a partial last block; so do we). Codes are packed two per byte, element 2j in
//! the high nibble; an odd count is padded with 0.0. Dequantising is `table[q] · absmax` in f32.
//!
//! 8-bit (double quantisation of the 4-bit scales): `offset = mean(absmax)`, then `absmax − offset`
//! is quantised blockwise (blocks of 256) against a 256-entry sorted map, one byte per scale, each
//! 256-block with its own f32 absmax. Inverse: `map[c] · nested_absmax[b / 256] + offset`.

use super::codes::{midpoints, nearest, QuantType};
use crate::error::{Error, Result};

/// Block sizes bitsandbytes' `quantize_4bit` accepts.
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// The block size double quantisation uses for the 4-bit scales.
pub const NESTED_BLOCKSIZE: usize = 256;

/// Fails unless `blocksize` is one bitsandbytes allows.
pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if BLOCKSIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::Input(format!("blocksize {blocksize} is not supported (bitsandbytes allows {BLOCKSIZES:?})")))
    }
}

/// `x[i]` scaled into [-1, 1] by its block's absmax, as bitsandbytes' reference backend does it:
/// multiply by the f32 reciprocal `1/absmax.clamp(min=1e-38)` in full blocks, divide in a partial last
/// block, clamp. The clamp at 1e-38 makes an all-zero block scale to 0 (NF4 code 7, FP4 code 0)
/// instead of the CUDA kernel's 0·∞ = NaN.
#[inline]
fn scaled(x: &[f32], i: usize, absmax: &[f32], blocksize: usize) -> f32 {
    let am = absmax[i / blocksize].max(1e-38f32);
    let full = x.len() - x.len() % blocksize;
    let s = if i < full { x[i] * (1.0f32 / am) } else { x[i] / am };
    s.clamp(-1.0, 1.0)
}

fn block_absmax(block: &[f32]) -> f32 {
    block.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Quantises `x` to 4 bits: `(packed, absmax)` with `ceil(n/2)` bytes and `ceil(n/blocksize)` scales.
///
/// ```
/// use temper_runtime::quant::{quantize_4bit, dequantize_4bit, QuantType};
/// let x = [0.5f32, -1.0, 0.0];
/// let (packed, absmax) = quantize_4bit(&x, 64, QuantType::Nf4)?;
/// // 0.5 → code 12, −1 → code 0 (high nibble first); 0.0 and the odd-count pad → code 7.
/// assert_eq!((packed.clone(), absmax.clone()), (vec![0xC0, 0x77], vec![1.0]));
/// assert_eq!(dequantize_4bit(&packed, &absmax, 3, 64, QuantType::Nf4)?, vec![0.44070982933044434, -1.0, 0.0]);
/// # Ok::<(), temper_runtime::Error>(())
/// ```
pub fn quantize_4bit(x: &[f32], blocksize: usize, quant_type: QuantType) -> Result<(Vec<u8>, Vec<f32>)> {
    check_blocksize(blocksize)?;
    let n = x.len();
    let absmax: Vec<f32> = x.chunks(blocksize).map(block_absmax).collect();
    // The odd-count pad is 0.0.
    let mut packed = vec![0u8; n.div_ceil(2)];
    let code_at = |i: usize| -> u8 { quant_type.quantize(if i < n { scaled(x, i, &absmax, blocksize) } else { 0.0 }) };
    for (j, byte) in packed.iter_mut().enumerate() {
        *byte = (code_at(2 * j) << 4) | code_at(2 * j + 1);
    }
    Ok((packed, absmax))
}

/// The `n` values of a 4-bit tensor: `table[q] · absmax[block]` in f32.
pub fn dequantize_4bit(packed: &[u8], absmax: &[f32], n: usize, blocksize: usize, quant_type: QuantType) -> Result<Vec<f32>> {
    check_blocksize(blocksize)?;
    if packed.len() != n.div_ceil(2) {
        return Err(Error::Input(format!("4-bit data: {} packed bytes for {n} values (expected {})", packed.len(), n.div_ceil(2))));
    }
    if absmax.len() != n.div_ceil(blocksize) {
        return Err(Error::Input(format!(
            "4-bit data: {} absmax values for {n} values in blocks of {blocksize} (expected {})",
            absmax.len(),
            n.div_ceil(blocksize)
        )));
    }
    let table = quant_type.table();
    Ok((0..n)
        .map(|i| {
            let byte = packed[i / 2];
            let q = if i % 2 == 0 { byte >> 4 } else { byte & 0x0F };
            table[q as usize] * absmax[i / blocksize]
        })
        .collect())
}

/// Quantises `x` to one byte per value against the sorted 256-entry `code`, in blocks of
/// `blocksize`: `(codes, absmax per block)`. Nearest code by f32 midpoints, ties to the lower code.
pub fn quantize_blockwise_8bit(x: &[f32], code: &[f32], blocksize: usize) -> Result<(Vec<u8>, Vec<f32>)> {
    check_blocksize(blocksize)?;
    if code.len() != 256 {
        return Err(Error::Input(format!("8-bit quantisation map has {} entries (expected 256)", code.len())));
    }
    let mid = midpoints(code, "8-bit quantisation map")?;
    let absmax: Vec<f32> = x.chunks(blocksize).map(block_absmax).collect();
    let codes = (0..x.len()).map(|i| nearest(&mid, scaled(x, i, &absmax, blocksize))).collect();
    Ok((codes, absmax))
}

/// The inverse of [`quantize_blockwise_8bit`]: `code[c] · absmax[block]`.
pub fn dequantize_blockwise_8bit(codes: &[u8], absmax: &[f32], code: &[f32], blocksize: usize) -> Result<Vec<f32>> {
    check_blocksize(blocksize)?;
    if code.len() != 256 {
        return Err(Error::Input(format!("8-bit quantisation map has {} entries (expected 256)", code.len())));
    }
    if absmax.len() != codes.len().div_ceil(blocksize) {
        return Err(Error::Input(format!(
            "8-bit data: {} absmax values for {} codes in blocks of {blocksize} (expected {})",
            absmax.len(),
            codes.len(),
            codes.len().div_ceil(blocksize)
        )));
    }
    Ok(codes.iter().enumerate().map(|(i, &c)| code[c as usize] * absmax[i / blocksize]).collect())
}

/// `mean(absmax)` in f32. Summed in f64 and rounded once, so it is the correctly rounded mean;
/// torch's f32 reduction can differ from it in the last bit (see [`double_quantize_with`]).
pub fn mean_f32(v: &[f32]) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    (v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64) as f32
}

/// Double quantisation of 4-bit scales with the signed dynamic map: `(codes, nested_absmax, offset)`.
pub fn double_quantize(absmax: &[f32]) -> Result<(Vec<u8>, Vec<f32>, f32)> {
    let offset = mean_f32(absmax);
    let (codes, nested) = double_quantize_with(absmax, offset, &super::codes::dynamic_map_signed_8bit())?;
    Ok((codes, nested, offset))
}

/// Double quantisation given the `offset` and the 256-entry `map` (for example those read from a
/// checkpoint): `(codes, nested_absmax)` of `absmax − offset` in blocks of 256.
pub fn double_quantize_with(absmax: &[f32], offset: f32, map: &[f32]) -> Result<(Vec<u8>, Vec<f32>)> {
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    quantize_blockwise_8bit(&centred, map, NESTED_BLOCKSIZE)
}

/// The 4-bit scales back from double quantisation: `map[c] · nested_absmax[b / nested_blocksize] + offset`.
pub fn double_dequantize(codes: &[u8], nested_absmax: &[f32], map: &[f32], offset: f32, nested_blocksize: usize) -> Result<Vec<f32>> {
    let mut v = dequantize_blockwise_8bit(codes, nested_absmax, map, nested_blocksize)?;
    for a in &mut v {
        *a += offset;
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::codes::{dynamic_map_signed_8bit, NF4};

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn round_trip_error_is_within_half_the_largest_nf4_gap() {
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            for bs in BLOCKSIZES {
                let x = lcg(1000, bs as u64);
                let (p, a) = quantize_4bit(&x, bs, qt).unwrap();
                assert_eq!((p.len(), a.len()), (500, 1000usize.div_ceil(bs)));
                let y = dequantize_4bit(&p, &a, x.len(), bs, qt).unwrap();
                for (i, (u, v)) in x.iter().zip(&y).enumerate() {
                    // The widest gap between neighbouring codes is 1/3 (FP4 2/3..1) of absmax.
                    assert!((u - v).abs() <= a[i / bs] * 0.17 + 1e-7, "{qt:?} bs {bs} elt {i}: {u} vs {v}");
                }
                // Re-quantising the dequantised values gives the same codes.
                let (p2, _) = quantize_4bit(&y, bs, qt).unwrap();
                if qt == QuantType::Nf4 {
                    assert_eq!(p, p2, "nf4 bs {bs}");
                }
            }
        }
    }

    #[test]
    fn block_maximum_gets_the_extreme_code_and_is_exact() {
        let x = [0.25f32, -4.0, 1.0, 2.0];
        let (p, a) = quantize_4bit(&x, 32, QuantType::Nf4).unwrap();
        assert_eq!(a, vec![4.0]);
        assert_eq!(p[0] & 0x0F, 0, "−absmax is code 0");
        let y = dequantize_4bit(&p, &a, 4, 32, QuantType::Nf4).unwrap();
        assert_eq!(y[1], -4.0);
    }

    #[test]
    fn odd_count_pads_the_low_nibble_with_the_code_for_zero() {
        let x = [1.0f32, -1.0, 1.0];
        let (p, a) = quantize_4bit(&x, 64, QuantType::Nf4).unwrap();
        assert_eq!(p, vec![0xF0, 0xF7]);
        assert_eq!(a, vec![1.0]);
        assert_eq!(dequantize_4bit(&p, &a, 3, 64, QuantType::Nf4).unwrap(), vec![1.0, -1.0, 1.0]);
        let (p, _) = quantize_4bit(&x, 64, QuantType::Fp4).unwrap();
        assert_eq!(p, vec![0x3B, 0x30]);
    }

    #[test]
    fn partial_last_block_has_its_own_absmax() {
        let mut x = vec![0.5f32; 64];
        x.extend([0.0, 3.0, -2.0]);
        let (p, a) = quantize_4bit(&x, 64, QuantType::Nf4).unwrap();
        assert_eq!(a, vec![0.5, 3.0]);
        assert_eq!(p.len(), 34);
        let y = dequantize_4bit(&p, &a, x.len(), 64, QuantType::Nf4).unwrap();
        assert_eq!(y[64..], [0.0, 3.0, NF4[quant_nf4(-2.0 / 3.0) as usize] * 3.0]);
    }

    fn quant_nf4(x: f32) -> u8 {
        crate::quant::codes::quantize_nf4(x)
    }

    #[test]
    fn all_zero_block_quantises_to_the_zero_code() {
        let x = vec![0.0f32; 70];
        let (p, a) = quantize_4bit(&x, 64, QuantType::Nf4).unwrap();
        assert!(p.iter().all(|&b| b == 0x77));
        assert_eq!(a, vec![0.0, 0.0]);
        assert!(dequantize_4bit(&p, &a, 70, 64, QuantType::Nf4).unwrap().iter().all(|&v| v == 0.0));
        let (p, _) = quantize_4bit(&x, 64, QuantType::Fp4).unwrap();
        assert!(p.iter().all(|&b| b == 0));
    }

    #[test]
    fn disallowed_blocksize_is_an_error_naming_it() {
        for bs in [0, 16, 48, 8192] {
            let e = quantize_4bit(&[1.0], bs, QuantType::Nf4).unwrap_err().to_string();
            assert!(e.contains(&format!("blocksize {bs}")), "{e}");
        }
        assert!(dequantize_4bit(&[0], &[1.0], 1, 100, QuantType::Nf4).is_err());
    }

    #[test]
    fn dequantize_rejects_lengths_that_disagree_with_n() {
        assert!(dequantize_4bit(&[0, 0], &[1.0], 5, 64, QuantType::Nf4).is_err());
        assert!(dequantize_4bit(&[0; 40], &[1.0], 80, 64, QuantType::Nf4).is_err());
    }

    #[test]
    fn double_quantisation_round_trip() {
        let absmax: Vec<f32> = lcg(600, 7).iter().map(|v| v.abs() * 0.1 + 0.01).collect();
        let (codes, nested, offset) = double_quantize(&absmax).unwrap();
        assert_eq!((codes.len(), nested.len()), (600, 3));
        let map = dynamic_map_signed_8bit();
        let back = double_dequantize(&codes, &nested, &map, offset, 256).unwrap();
        for (a, b) in absmax.iter().zip(&back) {
            // The coarsest step of the dynamic map near 1 is 1/64 of the block's absmax.
            assert!((a - b).abs() <= 0.05 * 0.01 + 1e-6, "{a} vs {b}");
        }
        assert!(double_dequantize(&codes, &nested[..2], &map, offset, 256).is_err());
    }
}
