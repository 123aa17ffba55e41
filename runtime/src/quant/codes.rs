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

/// The 15 decision thresholds between neighbouring NF4 values, ascending: the f32 midpoints
/// `(NF4[i] + NF4[i+1]) / 2`, which bitsandbytes' reference (CPU) backend bucketizes on. Its CUDA
/// decision tree (`dQuantizeNF4`) uses f64-derived literals that differ from these by one ulp at
/// thresholds 0, 8, 12 and 14, so only an input lying exactly on one of those four can get a
/// different code there (a unit test pins which).
pub const NF4_MIDPOINTS: [f32; 15] = sorted_midpoints(&NF4);

const fn sorted_midpoints(sorted: &[f32; 16]) -> [f32; 15] {
    let mut m = [0.0f32; 15];
    let mut i = 0;
    while i < 15 {
        m[i] = (sorted[i] + sorted[i + 1]) / 2.0;
        i += 1;
    }
    m
}

/// NF4 code of `x`: the number of midpoints `x` is strictly above. So `x` exactly on a midpoint goes
/// to the lower code, and NaN (above nothing) gets code 0.
#[inline]
pub fn quantize_nf4(x: f32) -> u8 {
    NF4_MIDPOINTS.partition_point(|&m| x > m) as u8
}

/// FP4 values: bit 3 is the sign, bits 0..2 index the magnitudes `[0, 0.0625, 8, 12, 4, 6, 2, 3] / 12`
/// (subnormal 0 and 0.0625, then exponents with a bias of 3, normalised so the largest is 1). Not
/// sorted. Code 8 ("−0") holds +0.0 in bitsandbytes' table, so both zero codes dequantise to +0.
pub const FP4: [f32; 16] = fp4_table();

const FP4_MAGNITUDES_X12: [f32; 8] = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0];

const fn fp4_table() -> [f32; 16] {
    let mut t = [0.0f32; 16];
    let mut i = 1;
    while i < 8 {
        t[i] = FP4_MAGNITUDES_X12[i] / 12.0;
        t[i + 8] = -(FP4_MAGNITUDES_X12[i] / 12.0);
        i += 1;
    }
    t
}

/// FP4 codes in ascending order of value, as bitsandbytes' reference backend sorts its table
/// (`argsort`): the two zeros are ordered code 0, then code 8.
const FP4_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

const fn fp4_sorted() -> [f32; 16] {
    let mut s = [0.0f32; 16];
    let mut i = 0;
    while i < 16 {
        s[i] = FP4[FP4_ORDER[i] as usize];
        i += 1;
    }
    s
}

/// Midpoints of the sorted FP4 values (the one between the two zeros is 0).
const FP4_MIDPOINTS: [f32; 15] = sorted_midpoints(&fp4_sorted());

/// FP4 code of `x`: bucketise on the midpoints of the sorted table (ties go low), then map the
/// sorted position back to its code. This is bitsandbytes' reference backend exactly, including its
/// zero handling: `x ≤ 0` just above −1/384 gets code 0 and `0 < x ≤ 1/384` gets code 8 (both are 0).
/// Its CUDA tree (`dQuantizeFP4`) instead sets the sign bit for any `x < 0` and compares against
/// rounded decimal thresholds, so near-zero and on-threshold inputs can differ there.
#[inline]
pub fn quantize_fp4(x: f32) -> u8 {
    FP4_ORDER[FP4_MIDPOINTS.partition_point(|&m| x > m)]
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
        let scale = [1e-6f64, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0][e as usize] as f32;
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

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU: a f32 step; the first half is
/// `start + step·i`, the second half `end − step·(n−1−i)`, each as one fused multiply-add (torch's
/// vectorised kernel uses FMA; plain multiply-then-add differs in the last bit for n ≥ 9).
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n).map(|i| if i < half { step.mul_add(i as f32, start) } else { (-step).mul_add((n - 1 - i) as f32, end) }).collect()
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

    /// The thresholds in bitsandbytes' CUDA `dQuantizeNF4` tree, in ascending order.
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

    fn next_up(x: f32) -> f32 {
        if x >= 0.0 { f32::from_bits(x.to_bits() + 1) } else { f32::from_bits(x.to_bits() - 1) }
    }

    #[test]
    fn cuda_thresholds_differ_from_the_f32_midpoints_by_one_ulp_at_four_places() {
        assert!(NF4_MIDPOINTS.windows(2).all(|w| w[0] < w[1]), "sorted");
        let off: Vec<usize> = (0..15).filter(|&i| NF4_KERNEL_THRESHOLDS[i] != NF4_MIDPOINTS[i]).collect();
        assert_eq!(off, vec![0, 8, 12, 14], "thresholds that differ from the f32 midpoint");
        for i in off {
            let d = NF4_KERNEL_THRESHOLDS[i].to_bits() as i64 - NF4_MIDPOINTS[i].to_bits() as i64;
            assert_eq!(d.abs(), 1, "threshold {i}: one ulp");
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
        assert_eq!(FP4[8].to_bits(), 0, "code 8 is +0.0 in bitsandbytes' table");
        for (i, &v) in FP4.iter().enumerate() {
            // Both zeros land on code 0 (x = 0 is on the midpoint between them: ties go low).
            let want = if i == 8 { 0 } else { i as u8 };
            assert_eq!(quantize_fp4(v), want, "fp4 code {i} ({v})");
        }
        assert_eq!(quantize_fp4(0.001), 0b1000, "tiny positive: the second zero");
        assert_eq!(quantize_fp4(-0.001), 0b0000, "tiny negative: the first zero");
        assert_eq!(quantize_fp4(-0.9), 0b1011);
        assert_eq!(quantize_fp4(FP4_MIDPOINTS[13]), 0b101, "between 0.5 and 2/3: the smaller magnitude");
        assert_eq!(quantize_fp4(next_up(FP4_MIDPOINTS[13])), 0b010);
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
