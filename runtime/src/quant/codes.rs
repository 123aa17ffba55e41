//! The 4-bit code tables bitsandbytes uses (NF4, FP4), the 8-bit signed dynamic map that double
//! quantisation uses for the block scales, and nearest-code quantisers for each.
//!
//! A 4-bit code is an index into a 16-entry table, not a float encoding; dequantising is
//! `table[q] · absmax`. Quantising picks the nearest table value of `x / absmax ∈ [-1, 1]`.

use crate::error::{Error, Result};

/// Which 4-bit table a weight uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// NormalFloat4: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (QLoRA's choice).
    Nf4,
    /// 1 sign bit, 2 exponent bits, 1 mantissa bit (bitsandbytes' and `transformers`' default).
    Fp4,
}

impl QuantType {
    /// The name bitsandbytes writes (`"nf4"`, `"fp4"`).
    pub fn as_str(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// Parses bitsandbytes' name.
    pub fn parse(s: &str) -> Result<QuantType> {
        match s {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            other => Err(Error::Input(format!("unknown 4-bit quant_type `{other}` (expected nf4 or fp4)"))),
        }
    }

    /// The 16 code values, indexed by the 4-bit code.
    pub fn table(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &NF4,
            QuantType::Fp4 => &FP4,
        }
    }

    /// The 4-bit code nearest to `x` (already scaled into [-1, 1]).
    #[inline]
    pub fn quantize(self, x: f32) -> u8 {
        match self {
            QuantType::Nf4 => quantize_nf4(x),
            QuantType::Fp4 => quantize_fp4(x),
        }
    }
}

/// NF4 values as f32, sorted, so code order is value order (bitsandbytes' `get_4bit_type("nf4")`).
pub const NF4: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// The 15 decision thresholds between neighbouring NF4 values, ascending: the f32 literals of
/// bitsandbytes' CUDA decision tree (`dQuantizeNF4`). They are the midpoints of the f64 normal-quantile
/// table before it was rounded to f32, so they equal the f32 midpoints `(NF4[i] + NF4[i+1]) / 2` of
/// the table above except thresholds 0, 8, 12 and 14, which are one ulp away (a unit test pins both
/// facts). We compare against the kernel's, so an f32 input lying exactly between gets the kernel's code.
pub const NF4_MIDPOINTS: [f32; 15] = [
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
];

/// NF4 code of `x`: the number of midpoints `x` is strictly above. So `x` exactly on a midpoint goes
/// to the lower code, and NaN (above nothing) gets code 0, as bitsandbytes' CUDA decision tree does.
#[inline]
pub fn quantize_nf4(x: f32) -> u8 {
    NF4_MIDPOINTS.partition_point(|&m| x > m) as u8
}

/// FP4 values: bit 3 is the sign, bits 0..2 index the magnitudes `[0, 0.0625, 8, 12, 4, 6, 2, 3] / 12`
/// (subnormal 0 and 0.0625, then exponents with a bias of 3, normalised so the largest is 1). Not sorted;
/// has a signed zero (code 8 is −0).
pub const FP4: [f32; 16] = fp4_table();

const FP4_MAGNITUDES_X12: [f32; 8] = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0];

const fn fp4_table() -> [f32; 16] {
    let mut t = [0.0f32; 16];
    let mut i = 0;
    while i < 8 {
        t[i] = FP4_MAGNITUDES_X12[i] / 12.0;
        t[i + 8] = -(FP4_MAGNITUDES_X12[i] / 12.0);
        i += 1;
    }
    t
}

/// FP4 magnitude codes in increasing order of magnitude: 0, 0.0625, 2, 3, 4, 6, 8, 12 (× 1/12).
const FP4_CODES_BY_MAGNITUDE: [u8; 8] = [0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011];

/// The thresholds between neighbouring magnitudes above, as the f32 literals bitsandbytes' kernel
/// compares against (its decision tree uses these rounded decimals, not exact midpoints, so we keep
/// them as written: 1/384, 1.03125/12, 2.5/12, 3.5/12, 5/12, 7/12, 10/12).
const FP4_THRESHOLDS: [f32; 7] = [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333];

/// FP4 code of `x`. Our reading of bitsandbytes' tree (`dQuantizeFP4`): the sign bit is set iff
/// `x < 0` (so −0.0 and NaN are positive), then the magnitude `|x|` goes to the largest magnitude
/// whose lower threshold it is strictly above. A tree of strict `>` tests over sorted thresholds
/// is this count, so a magnitude exactly on a threshold goes to the smaller magnitude, and NaN to 0.
#[inline]
pub fn quantize_fp4(x: f32) -> u8 {
    let sign = if x < 0.0 { 0b1000 } else { 0 };
    let a = x.abs();
    FP4_CODES_BY_MAGNITUDE[FP4_THRESHOLDS.partition_point(|&t| a > t)] | sign
}

/// The 8-bit signed dynamic map double quantisation uses for block scales, computed as bitsandbytes'
/// `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)` does: for each decade
/// `e = 0..7` (values scaled by 10^(e−6)), `2^e` evenly spaced fractions — the midpoints of
/// `linspace(0.1, 1, 2^e + 1)` in f32 — with both signs; plus 0 and 1; sorted. 254 + 2 = 256 entries.
///
/// Loading a checkpoint uses the map stored in the file (`nested_quant_map`), not this one.
pub fn dynamic_map_signed_8bit() -> Vec<f32> {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for e in 0..7i32 {
        let n = (1usize << e) + 1;
        let b = linspace_f32(0.1, 1.0, n);
        let scale = 10f64.powi(e - 6) as f32;
        for k in 0..n - 1 {
            let mean = (b[k] + b[k + 1]) / 2.0;
            data.push(scale * mean);
            data.push(-(scale * mean));
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(|a, b| a.total_cmp(b));
    data
}

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU: a f32 step; the first half counts up
/// from `start`, the second half down from `end`, so both ends are exact.
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n).map(|i| if i < half { start + step * i as f32 } else { end - step * (n - 1 - i) as f32 }).collect()
}

/// Midpoints `(code[i] + code[i+1]) / 2` in f32 of a sorted code; errors if the code is not sorted.
pub fn midpoints(code: &[f32], what: &str) -> Result<Vec<f32>> {
    if code.windows(2).any(|w| !(w[0] <= w[1])) {
        return Err(Error::BadTensor { name: what.into(), msg: "quantisation map is not sorted ascending".into() });
    }
    Ok(code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect())
}

/// Index of the nearest code value, given that code's midpoints: ties go to the lower code.
#[inline]
pub fn nearest(midpoints: &[f32], x: f32) -> u8 {
    midpoints.partition_point(|&m| x > m) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The thresholds in bitsandbytes' `dQuantizeNF4` tree, in ascending order.
    const NF4_KERNEL_THRESHOLDS: [f32; 15] = [
        -0.8480964004993439,
        -0.6106329262256622,
        -0.4599952697753906,
        -0.33967943489551544,
        -0.23460740596055984,
        -0.13791173323988914,
        -0.045525018125772476,
        0.03979014977812767,
        0.1202552504837513,
        0.2035212516784668,
        0.2920137718319893,
        0.3893125355243683,
        0.5016634166240692,
        0.6427869200706482,
        0.8614784181118011,
    ];

    #[test]
    fn nf4_midpoints_equal_the_kernel_thresholds() {
        assert!(NF4_MIDPOINTS.windows(2).all(|w| w[0] < w[1]), "sorted");
        for (i, (m, t)) in NF4_MIDPOINTS.iter().zip(NF4_KERNEL_THRESHOLDS).enumerate() {
            assert_eq!(m.to_bits(), t.to_bits(), "midpoint {i}: {m} vs kernel {t}");
        }
    }

    fn next_up(x: f32) -> f32 {
        if x >= 0.0 { f32::from_bits(x.to_bits() + 1) } else { f32::from_bits(x.to_bits() - 1) }
    }

    #[test]
    fn f32_averaged_midpoints_are_within_one_ulp_of_the_kernel_thresholds() {
        let off: Vec<usize> = (0..15).filter(|&i| (NF4[i] + NF4[i + 1]) / 2.0 != NF4_MIDPOINTS[i]).collect();
        assert_eq!(off, vec![0, 8, 12, 14], "thresholds that differ from the f32 midpoint");
        for i in off {
            let f = (NF4[i] + NF4[i + 1]) / 2.0;
            assert_eq!((f.to_bits() as i64 - NF4_MIDPOINTS[i].to_bits() as i64).abs(), 1, "threshold {i}: one ulp");
        }
    }

    #[test]
    fn nf4_ties_go_low_and_values_map_to_themselves() {
        for (i, &v) in NF4.iter().enumerate() {
            assert_eq!(quantize_nf4(v), i as u8);
        }
        for (i, &m) in NF4_MIDPOINTS.iter().enumerate() {
            assert_eq!(quantize_nf4(m), i as u8, "on midpoint {i}");
            assert_eq!(quantize_nf4(next_up(m)), i as u8 + 1);
        }
        assert_eq!(quantize_nf4(0.0), 7);
        assert_eq!(quantize_nf4(-0.0), 7);
        assert_eq!(quantize_nf4(f32::NAN), 0);
        assert_eq!(quantize_nf4(2.0), 15);
        assert_eq!(quantize_nf4(-2.0), 0);
    }

    #[test]
    fn fp4_table_and_quantiser() {
        assert_eq!(FP4[..8], [0.0, 0.0625 / 12.0, 8.0 / 12.0, 1.0, 4.0 / 12.0, 0.5, 2.0 / 12.0, 0.25]);
        assert!(FP4[8] == 0.0 && FP4[8].is_sign_negative());
        for (i, &v) in FP4.iter().enumerate() {
            // −0 quantises to +0: the sign bit needs x < 0.
            let want = if i == 8 { 0 } else { i as u8 };
            assert_eq!(quantize_fp4(v), want, "fp4 code {i} ({v})");
        }
        assert_eq!(quantize_fp4(0.583333), 0b101, "on a threshold: the smaller magnitude");
        assert_eq!(quantize_fp4(-0.9), 0b1011);
        assert_eq!(quantize_fp4(-0.001), 0b1000);
        assert_eq!(quantize_fp4(f32::NAN), 0);
    }

    #[test]
    fn dynamic_map_has_256_sorted_values_with_zero_and_one() {
        let m = dynamic_map_signed_8bit();
        assert_eq!(m.len(), 256);
        assert!(m.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
        assert_eq!(m[255], 1.0);
        assert_eq!(m[127], 0.0);
        assert!(m[0] < -0.99 && m[0] > -1.0);
        let mid = midpoints(&m, "map").unwrap();
        assert_eq!(nearest(&mid, 1.0), 255);
        assert_eq!(nearest(&mid, 0.0), 127);
        assert_eq!(nearest(&mid, mid[3]), 3, "ties low");
    }

    #[test]
    fn unsorted_map_is_an_error_naming_it() {
        let e = midpoints(&[0.0, 1.0, 0.5], "w.nested_quant_map").unwrap_err().to_string();
        assert!(e.contains("w.nested_quant_map"), "{e}");
    }
}
