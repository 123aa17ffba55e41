//! TEMPORARY naive attention (replaced by the blockwise kernel).
use super::float::Float;

pub struct AttnShape { pub batch: usize, pub q_len: usize, pub kv_len: usize, pub kv_cap: usize, pub n_heads: usize, pub n_kv_heads: usize, pub head_dim: usize }
pub struct AttnMask<'a> { pub causal: bool, pub q_offset: usize, pub key_mask: Option<&'a [u8]>, pub segment_ids: Option<&'a [u32]>, pub window: Option<usize> }

fn visible(s: &AttnShape, m: &AttnMask, b: usize, i: usize, j: usize) -> bool {
    let p = m.q_offset + i;
    if m.causal && j > p { return false; }
    if let Some(w) = m.window { if p >= j + w { return false; } }
    if let Some(k) = m.key_mask { if k[b * s.kv_cap + j] == 0 { return false; } }
    if let Some(seg) = m.segment_ids { if seg[b * s.kv_cap + j] != seg[b * s.kv_cap + p] { return false; } }
    true
}

#[allow(clippy::too_many_arguments)]
pub fn attention_forward<T: Float>(s: &AttnShape, m: &AttnMask, scale: T, q: &[T], k: &[T], v: &[T], out: &mut [T], lse: &mut [T]) {
    let (h, hk, d) = (s.n_heads, s.n_kv_heads, s.head_dim);
    let g = h / hk;
    for b in 0..s.batch { for hh in 0..h { let kh = hh / g; for i in 0..s.q_len {
        let qi = &q[((b * s.q_len + i) * h + hh) * d..][..d];
        let mut sc = vec![T::neg_infinity(); s.kv_len];
        for j in 0..s.kv_len { if visible(s, m, b, i, j) { let kj = &k[((b * s.kv_cap + j) * hk + kh) * d..][..d];
            sc[j] = qi.iter().zip(kj).map(|(&a, &c)| a * c).sum::<T>() * scale; } }
        let mx = sc.iter().fold(T::neg_infinity(), |a, &c| if c > a { c } else { a });
        let o = &mut out[((b * s.q_len + i) * h + hh) * d..][..d];
        o.iter_mut().for_each(|x| *x = T::zero());
        if mx == T::neg_infinity() { lse[(b * h + hh) * s.q_len + i] = T::neg_infinity(); continue; }
        let sum: T = sc.iter().map(|&c| (c - mx).exp()).sum();
        for j in 0..s.kv_len { let p = (sc[j] - mx).exp() / sum; if p > T::zero() { let vj = &v[((b * s.kv_cap + j) * hk + kh) * d..][..d];
            for t in 0..d { o[t] += p * vj[t]; } } }
        lse[(b * h + hh) * s.q_len + i] = mx + sum.ln();
    } } }
}

#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Float>(s: &AttnShape, m: &AttnMask, scale: T, q: &[T], k: &[T], v: &[T], out: &[T], lse: &[T], d_out: &[T], dq: &mut [T], dk: &mut [T], dv: &mut [T]) {
    let (h, hk, d) = (s.n_heads, s.n_kv_heads, s.head_dim);
    let g = h / hk;
    dq.iter_mut().for_each(|x| *x = T::zero()); dk.iter_mut().for_each(|x| *x = T::zero()); dv.iter_mut().for_each(|x| *x = T::zero());
    for b in 0..s.batch { for hh in 0..h { let kh = hh / g; for i in 0..s.q_len {
        let l = lse[(b * h + hh) * s.q_len + i]; if l == T::neg_infinity() { continue; }
        let qo = ((b * s.q_len + i) * h + hh) * d;
        let dd: T = (0..d).map(|t| d_out[qo + t] * out[qo + t]).sum();
        for j in 0..s.kv_len { if !visible(s, m, b, i, j) { continue; }
            let ko = ((b * s.kv_cap + j) * hk + kh) * d;
            let sc = (0..d).map(|t| q[qo + t] * k[ko + t]).sum::<T>() * scale;
            let p = (sc - l).exp();
            let dp: T = (0..d).map(|t| d_out[qo + t] * v[ko + t]).sum();
            let ds = p * (dp - dd);
            for t in 0..d { dv[ko + t] += p * d_out[qo + t]; dq[qo + t] += scale * ds * k[ko + t]; dk[ko + t] += scale * ds * q[qo + t]; }
        }
    } } }
}
