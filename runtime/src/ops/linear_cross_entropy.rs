//! Fused output projection + per-token negative log-likelihood: the language-model loss without the
//! `[tokens, vocab]` logits. The vocabulary is walked in chunks of `C` rows of the weight:
//!
//! forward : for each chunk c: L_c = h·W_cᵀ ([T, C]); merge (max, Σexp) of L_c into a running state
//!           per token and pick the target logit when y lies in the chunk;
//!           nll[t] = lse[t] − z[t, y[t]]  (0 where y[t] = −100)
//! backward: for each chunk c: recompute L_c, dz_c = g·(softmax − onehot) = g·(exp(L_c − lse) − onehot);
//!           dh += dz_c·W_c;  dW_c = dz_cᵀ·h
//!
//! Peak extra memory is one `[T, C]` chunk (plus an f32 `[T, d]` accumulator for bf16/f16 on CUDA)
//! instead of `[T, V]` logits and their gradient. The chunk logits are rounded to the operands'
//! dtype exactly as the unfused `linear` would round them, so the result equals
//! `token_nll(linear(h, W), y)` up to summation order. CUDA runs it with cuBLASLt GEMMs and the row
//! kernels of `kernels/cuda/cross_entropy.cu`; the CPU with the CPU GEMM and plain loops.

use super::output;
use crate::autograd::GradFn;
use crate::backend::{cuda, BackendStorage, CpuStorage, Storage};
use crate::error::{ensure_shape, Error, Result};
use crate::tensor::{DType, Tensor};
use std::sync::Arc;

use super::IGNORE_INDEX;

/// Logit elements per chunk the default chunk size aims at (`T·C`; 64 Mi elements = 128 MiB in
/// bf16), with `C` kept in 2048..=32768 columns.
const CHUNK_BUDGET: usize = 1 << 26;

/// The default vocabulary chunk for `rows` tokens.
pub fn default_chunk(rows: usize, vocab: usize) -> usize {
    let c = (CHUNK_BUDGET / rows.max(1)).clamp(2048, 32768) / 256 * 256;
    c.min(vocab).max(1)
}

struct LinearCeBackward {
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    lse: Tensor,
    chunk: usize,
}

impl GradFn for LinearCeBackward {
    fn name(&self) -> &'static str {
        "linear_cross_entropy"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.hidden.clone(), self.weight.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (vocab, d) = (self.weight.shape()[0], self.weight.shape()[1]);
        let (need_dh, need_dw) = (self.hidden.requires_grad_flag(), self.weight.requires_grad_flag());
        let hs = self.hidden.contiguous_storage()?;
        let ws = self.weight.contiguous_storage()?;
        let ys = self.targets.contiguous_storage()?;
        let ls = self.lse.contiguous_storage()?;
        let gs = g.contiguous_storage()?;
        let (dh, dw) = match (&*hs, &*ws, &*ys, &*ls, &*gs) {
            (Storage::Cpu(h), Storage::Cpu(w), Storage::Cpu(y), Storage::Cpu(l), Storage::Cpu(g)) => {
                let (dh, dw) = cpu_backward(h, w, y, l, g, d, vocab, self.chunk, need_dh, need_dw)?;
                (dh.map(Storage::Cpu), dw.map(Storage::Cpu))
            }
            (Storage::Cuda(h), Storage::Cuda(w), Storage::Cuda(y), Storage::Cuda(l), Storage::Cuda(g)) => {
                let (dh, dw) = cuda::cross_entropy::linear_ce_backward(h, w, y, l, g, d, vocab, self.chunk, need_dh, need_dw)?;
                (dh.map(Storage::Cuda), dw.map(Storage::Cuda))
            }
            _ => return Err(Error::Input("linear_cross_entropy backward: operands live on different devices".into())),
        };
        let dh = dh.map(|s| Tensor::from_storage(s, self.hidden.shape())).transpose()?;
        let dw = dw.map(|s| Tensor::from_storage(s, self.weight.shape())).transpose()?;
        Ok(vec![dh, dw])
    }
}

/// Per-token negative log-likelihood of `targets` under `hidden · weightᵀ`, without forming the
/// logits: `hidden` `[..., d]`, `weight` `[vocab, d]` (the `lm_head` layout), `targets` with
/// `hidden`'s leading shape (any integer dtype; −100 = ignored, giving 0). Returns `[...]` in
/// `hidden`'s dtype; gradients flow to `hidden` and to `weight` when they require them.
/// Equals `token_nll(&linear(hidden, weight, None)?, targets)`.
///
/// `targets` may live anywhere; they are range-checked on the host and uploaded to `hidden`'s
/// device. Pass them on the host: targets already on a GPU are downloaded to be checked, which
/// waits for all queued work (a synchronisation in the middle of a training step).
pub fn linear_cross_entropy(hidden: &Tensor, weight: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let rows = hidden.elem_count() / hidden.shape().last().copied().unwrap_or(1).max(1);
    let vocab = weight.shape().first().copied().unwrap_or(0);
    linear_cross_entropy_chunked(hidden, weight, targets, default_chunk(rows, vocab))
}

/// log p(target) per token from hidden states (`−linear_cross_entropy`): what preference and RL
/// losses need, without the logits.
pub fn linear_token_logprobs(hidden: &Tensor, weight: &Tensor, targets: &Tensor) -> Result<Tensor> {
    super::scale(&linear_cross_entropy(hidden, weight, targets)?, -1.0)
}

/// [`linear_cross_entropy`] with an explicit vocabulary chunk (columns of logits per step).
pub fn linear_cross_entropy_chunked(hidden: &Tensor, weight: &Tensor, targets: &Tensor, chunk: usize) -> Result<Tensor> {
    let op = "linear_cross_entropy";
    super::expect_rank(op, "weight", weight, 2)?;
    let (vocab, d) = (weight.shape()[0], weight.shape()[1]);
    ensure_shape!(
        hidden.rank() >= 1 && hidden.shape()[hidden.rank() - 1] == d && &hidden.shape()[..hidden.rank() - 1] == targets.shape(),
        op,
        "hidden {:?}, weight {:?} and targets {:?} disagree (expected hidden [..., {d}] and targets [...])",
        hidden.shape(),
        weight.shape(),
        targets.shape()
    );
    ensure_shape!(vocab > 0, op, "the weight has no rows");
    if hidden.dtype() != weight.dtype() {
        return Err(Error::dtype(op, format!("hidden is {} and the weight {}", hidden.dtype(), weight.dtype())));
    }
    let device = hidden.device();
    let host = targets.to_dtype(DType::I64)?.to_vec::<i64>()?;
    if let Some((pos, y)) = host.iter().enumerate().find(|(_, &y)| y != IGNORE_INDEX && (y < 0 || y as usize >= vocab)) {
        return Err(Error::Input(format!("label {y} at position {pos} is outside the vocabulary (size {vocab}) and is not -100")));
    }
    let targets = Tensor::from_vec(host, targets.shape(), device)?;
    let chunk = chunk.clamp(1, vocab);
    let (nll, lse) = {
        let hs = hidden.contiguous_storage()?;
        let ws = weight.contiguous_storage()?;
        let ys = targets.contiguous_storage()?;
        match (&*hs, &*ws, &*ys) {
            (Storage::Cpu(h), Storage::Cpu(w), Storage::Cpu(y)) => {
                let (n, l) = cpu_forward(h, w, y, d, vocab, chunk)?;
                (Storage::Cpu(n), Storage::Cpu(l))
            }
            (Storage::Cuda(h), Storage::Cuda(w), Storage::Cuda(y)) => {
                let (n, l) = cuda::cross_entropy::linear_ce_forward(h, w, y, d, vocab, chunk)?;
                (Storage::Cuda(n), Storage::Cuda(l))
            }
            _ => return Err(Error::Input(format!("{op}: hidden lives on {:?} and the weight on {:?}", hidden.device(), weight.device()))),
        }
    };
    let shape = targets.shape().to_vec();
    let lse = Tensor::from_storage(lse, &shape)?;
    Ok(output(nll, &shape, &[hidden, weight], || {
        Arc::new(LinearCeBackward { hidden: hidden.clone(), weight: weight.clone(), targets: targets.clone(), lse, chunk })
    }))
}

// ------------------------------------------------------------------ CPU path

use crate::backend::cpu::gemm::{self, Mat};
use crate::backend::cpu::FloatVec as Elem;

fn i64s(s: &CpuStorage) -> Result<&[i64]> {
    if let CpuStorage::I64(v) = s {
        Ok(v)
    } else {
        Err(Error::dtype("linear_cross_entropy", format!("targets must be I64, got {}", s.dtype())))
    }
}

/// `h[rows, d] · W[c0..c0+cols]ᵀ` as a `[rows, cols]` host vector, reading the weight rows in
/// place (a copy of the chunk would be a second lm_head when the chunk is the whole vocabulary).
fn chunk_logits<T: Elem>(h: &[T], w: &[T], rows: usize, d: usize, c0: usize, cols: usize) -> Vec<T> {
    let (a, b) = (Mat { data: h, ld: d, trans: false }, Mat { data: &w[c0 * d..(c0 + cols) * d], ld: d, trans: true });
    gemm::matmul_new(rows, cols, d, a, b)
}

fn cpu_forward(h: &CpuStorage, w: &CpuStorage, y: &CpuStorage, d: usize, vocab: usize, chunk: usize) -> Result<(CpuStorage, CpuStorage)> {
    match (h, w) {
        (CpuStorage::F32(h), CpuStorage::F32(w)) => cpu_forward_t::<f32>(h, w, i64s(y)?, d, vocab, chunk),
        (CpuStorage::F64(h), CpuStorage::F64(w)) => cpu_forward_t::<f64>(h, w, i64s(y)?, d, vocab, chunk),
        _ => Err(Error::dtype("linear_cross_entropy", format!("the CPU computes F32 or F64, got {} and {}", h.dtype(), w.dtype()))),
    }
}

fn cpu_forward_t<T: Elem>(h: &[T], w: &[T], y: &[i64], d: usize, vocab: usize, chunk: usize) -> Result<(CpuStorage, CpuStorage)> {
    let rows = y.len();
    let (mut m, mut s, mut zt) = (vec![T::neg_infinity(); rows], vec![T::zero(); rows], vec![T::zero(); rows]);
    for c0 in (0..vocab).step_by(chunk) {
        let cols = chunk.min(vocab - c0);
        let l = chunk_logits(h, w, rows, d, c0, cols);
        for r in 0..rows {
            let row = &l[r * cols..(r + 1) * cols];
            let cm = row.iter().fold(T::neg_infinity(), |a, &v| if v > a { v } else { a });
            let nm = if cm > m[r] { cm } else { m[r] };
            if nm > T::neg_infinity() {
                let cs: T = row.iter().map(|&v| (v - nm).exp()).sum();
                let old = if m[r] == T::neg_infinity() { T::zero() } else { s[r] * (m[r] - nm).exp() };
                s[r] = old + cs;
                m[r] = nm;
            }
            let t = y[r];
            if t != IGNORE_INDEX && (t as usize) >= c0 && (t as usize) < c0 + cols {
                zt[r] = row[t as usize - c0];
            }
        }
    }
    let lse: Vec<T> = m.iter().zip(&s).map(|(&m, &s)| m + s.ln()).collect();
    let nll: Vec<T> = (0..rows).map(|r| if y[r] == IGNORE_INDEX { T::zero() } else { lse[r] - zt[r] }).collect();
    Ok((T::wrap(nll), T::wrap(lse)))
}

#[allow(clippy::too_many_arguments)]
fn cpu_backward(
    h: &CpuStorage,
    w: &CpuStorage,
    y: &CpuStorage,
    lse: &CpuStorage,
    g: &CpuStorage,
    d: usize,
    vocab: usize,
    chunk: usize,
    need_dh: bool,
    need_dw: bool,
) -> Result<(Option<CpuStorage>, Option<CpuStorage>)> {
    macro_rules! go {
        ($t:ty) => {{
            let err = || Error::dtype("linear_cross_entropy backward", "operands disagree in dtype");
            let (h, w) = (<$t>::slice(h).ok_or_else(err)?, <$t>::slice(w).ok_or_else(err)?);
            let (l, g) = (<$t>::slice(lse).ok_or_else(err)?, <$t>::slice(g).ok_or_else(err)?);
            cpu_backward_t::<$t>(h, w, i64s(y)?, l, g, d, vocab, chunk, need_dh, need_dw)
        }};
    }
    match h {
        CpuStorage::F32(_) => go!(f32),
        CpuStorage::F64(_) => go!(f64),
        _ => Err(Error::dtype("linear_cross_entropy backward", format!("the CPU computes F32 or F64, got {}", h.dtype()))),
    }
}

#[allow(clippy::too_many_arguments)]
fn cpu_backward_t<T: Elem>(
    h: &[T],
    w: &[T],
    y: &[i64],
    lse: &[T],
    g: &[T],
    d: usize,
    vocab: usize,
    chunk: usize,
    need_dh: bool,
    need_dw: bool,
) -> Result<(Option<CpuStorage>, Option<CpuStorage>)> {
    let rows = y.len();
    let mut dh = if need_dh { Some(vec![T::zero(); rows * d]) } else { None };
    let mut dw = if need_dw { Some(vec![T::zero(); vocab * d]) } else { None };
    for c0 in (0..vocab).step_by(chunk) {
        let cols = chunk.min(vocab - c0);
        let mut dz = chunk_logits(h, w, rows, d, c0, cols);
        for r in 0..rows {
            let row = &mut dz[r * cols..(r + 1) * cols];
            let t = y[r];
            if t == IGNORE_INDEX {
                row.iter_mut().for_each(|v| *v = T::zero());
                continue;
            }
            for v in row.iter_mut() {
                *v = g[r] * (*v - lse[r]).exp();
            }
            if (t as usize) >= c0 && (t as usize) < c0 + cols {
                row[t as usize - c0] -= g[r];
            }
        }
        // dh += dz·W_c (accumulated in place) and dW_c = dzᵀ·h (written into its rows), both
        // straight from and into the host buffers.
        let dz = Mat { data: &dz[..], ld: cols, trans: false };
        if let Some(dh) = &mut dh {
            gemm::matmul(rows, d, cols, dz, Mat { data: &w[c0 * d..(c0 + cols) * d], ld: d, trans: false }, dh, d, true);
        }
        if let Some(dw) = &mut dw {
            let dz_t = Mat { trans: true, ..dz };
            gemm::matmul(cols, d, rows, dz_t, Mat { data: h, ld: d, trans: false }, &mut dw[c0 * d..(c0 + cols) * d], d, false);
        }
    }
    Ok((dh.map(T::wrap), dw.map(T::wrap)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::gradcheck::{max_gradient_error, test_values};
    use crate::ops::{linear, mul, sum, token_nll};
    use crate::Device;

    fn targets(rows: usize, vocab: usize) -> Tensor {
        let v: Vec<i64> = (0..rows).map(|i| if i % 4 == 1 { -100 } else { ((i * 7 + 3) % vocab) as i64 }).collect();
        Tensor::from_vec(v, &[rows], Device::Cpu).unwrap()
    }

    /// Forward and both gradients equal the unfused linear + token_nll, for chunkings that divide
    /// the vocabulary, leave a ragged last chunk, and cover it in one.
    #[test]
    fn matches_unfused_linear_and_token_nll() {
        let (rows, d, vocab) = (6, 5, 11);
        let y = targets(rows, vocab);
        let wv = test_values(rows, 4);
        let h = Tensor::from_vec(test_values(rows * d, 1), &[rows, d], Device::Cpu).unwrap().requires_grad();
        let w = Tensor::from_vec(test_values(vocab * d, 2).iter().map(|v| v * 2.0).collect::<Vec<f64>>(), &[vocab, d], Device::Cpu)
            .unwrap()
            .requires_grad();
        let g = Tensor::from_vec(wv, &[rows], Device::Cpu).unwrap();
        let want = token_nll(&linear(&h, &w, None).unwrap(), &y).unwrap();
        let gw = sum(&mul(&want, &g).unwrap()).unwrap().backward().unwrap();
        for chunk in [1, 3, 4, 11, 100] {
            let got = linear_cross_entropy_chunked(&h, &w, &y, chunk).unwrap();
            for (a, b) in got.to_f64_vec().unwrap().iter().zip(want.to_f64_vec().unwrap()) {
                assert!((a - b).abs() < 1e-12, "chunk {chunk}: {a} vs {b}");
            }
            let gg = sum(&mul(&got, &g).unwrap()).unwrap().backward().unwrap();
            for t in [&h, &w] {
                let (a, b) = (gg.get(t).unwrap().to_f64_vec().unwrap(), gw.get(t).unwrap().to_f64_vec().unwrap());
                for (x, z) in a.iter().zip(&b) {
                    assert!((x - z).abs() < 1e-12, "chunk {chunk}: {x} vs {z}");
                }
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (rows, d, vocab) = (5, 4, 9);
        let y = targets(rows, vocab);
        let g = Tensor::from_vec(test_values(rows, 5), &[rows], Device::Cpu).unwrap();
        let err = max_gradient_error(
            |t| sum(&mul(&linear_cross_entropy_chunked(&t[0], &t[1], &y, 4)?, &g)?),
            &[(test_values(rows * d, 6), vec![rows, d]), (test_values(vocab * d, 7).iter().map(|v| v * 3.0).collect(), vec![vocab, d])],
            1e-6,
        )
        .unwrap();
        assert!(err < 1e-8, "max error {err}");
    }

    #[test]
    fn frozen_weight_gets_no_gradient_and_logprobs_are_minus_nll() {
        let (rows, d, vocab) = (3, 4, 6);
        let y = targets(rows, vocab);
        let h = Tensor::from_vec(test_values(rows * d, 8), &[rows, d], Device::Cpu).unwrap().requires_grad();
        let w = Tensor::from_vec(test_values(vocab * d, 9), &[vocab, d], Device::Cpu).unwrap();
        let nll = linear_cross_entropy(&h, &w, &y).unwrap();
        let lp = linear_token_logprobs(&h, &w, &y).unwrap();
        for (a, b) in nll.to_f64_vec().unwrap().iter().zip(lp.to_f64_vec().unwrap()) {
            assert_eq!(*a, -b);
        }
        let gr = sum(&nll).unwrap().backward().unwrap();
        assert!(gr.get(&h).is_some() && gr.get(&w).is_none());
    }

    #[test]
    fn out_of_vocab_labels_and_shape_mismatches_are_errors() {
        let h = Tensor::from_vec(vec![0.0f32; 8], &[2, 4], Device::Cpu).unwrap();
        let w = Tensor::from_vec(vec![0.0f32; 12], &[3, 4], Device::Cpu).unwrap();
        let e = linear_cross_entropy(&h, &w, &Tensor::from_vec(vec![0i64, 3], &[2], Device::Cpu).unwrap()).unwrap_err().to_string();
        assert!(e.contains("label 3") && e.contains("position 1"), "{e}");
        assert!(linear_cross_entropy(&h, &w, &Tensor::from_vec(vec![0i64], &[1], Device::Cpu).unwrap()).is_err());
    }
}
