//! The CPU backend: storage in host vectors, kernels generic over f32 (work) and f64 (checks),
//! GEMM through the `gemm` crate and threads through rayon.

pub mod adamw;
pub mod attention;
pub mod embedding;
pub mod float;
pub mod gemm;
pub mod kl_div;
pub mod quant_linear;
pub mod rms_norm;
pub mod rope;
pub mod swiglu;
pub mod token_nll;

use super::{AttnMasks, BackendStorage, BinaryOp, Device, MatmulParams};
use crate::error::{Error, Result};
use crate::tensor::{DType, Layout};
use attention::{AttnMask, AttnShape};
use float::Float;
use half::{bf16, f16};
use rayon::prelude::*;

/// Host storage: one vector per dtype.
#[derive(Clone, Debug)]
pub enum CpuStorage {
    F32(Vec<f32>),
    F64(Vec<f64>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    I64(Vec<i64>),
    U32(Vec<u32>),
    U8(Vec<u8>),
}

/// Runs `$body` with `$v` bound to the float vector of `$s` (F32 or F64), else a dtype error.
macro_rules! with_float {
    ($op:expr, $s:expr, |$v:ident| $body:expr) => {
        match $s {
            CpuStorage::F32($v) => $body,
            CpuStorage::F64($v) => $body,
            other => return Err(Error::dtype($op, format!("expected F32 or F64, got {}", other.dtype()))),
        }
    };
}

/// Borrows the float vector of the same element type as a reference float slice.
pub(crate) trait FloatVec: Float {
    fn get(s: &CpuStorage) -> Option<&Vec<Self>>;
    fn wrap(v: Vec<Self>) -> CpuStorage;
    /// The elements as a slice when `s` holds this type.
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        Self::get(s).map(|v| v.as_slice())
    }
}
impl FloatVec for f32 {
    fn get(s: &CpuStorage) -> Option<&Vec<f32>> {
        if let CpuStorage::F32(v) = s { Some(v) } else { None }
    }
    fn wrap(v: Vec<f32>) -> CpuStorage {
        CpuStorage::F32(v)
    }
}
impl FloatVec for f64 {
    fn get(s: &CpuStorage) -> Option<&Vec<f64>> {
        if let CpuStorage::F64(v) = s { Some(v) } else { None }
    }
    fn wrap(v: Vec<f64>) -> CpuStorage {
        CpuStorage::F64(v)
    }
}

/// The float slice of `s` with the element type of `like`, or a dtype error.
fn same<'a, T: FloatVec>(op: &'static str, _like: &[T], s: &'a CpuStorage) -> Result<&'a [T]> {
    T::get(s).map(|v| v.as_slice()).ok_or_else(|| {
        Error::dtype(op, format!("operands disagree: expected {}, got {}", if std::mem::size_of::<T>() == 4 { "F32" } else { "F64" }, s.dtype()))
    })
}

/// `v` in the element type of `_like`.
fn like<T: Float>(_like: &[T], v: f64) -> T {
    T::of(v)
}

fn ids_u32<'a>(op: &'static str, s: &'a CpuStorage) -> Result<&'a [u32]> {
    match s {
        CpuStorage::U32(v) => Ok(v),
        o => Err(Error::dtype(op, format!("ids must be U32, got {}", o.dtype()))),
    }
}

impl CpuStorage {
    /// Elements as f64 (any dtype), for checks and host-side reads.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self {
            CpuStorage::F32(v) => v.iter().map(|&x| x as f64).collect(),
            CpuStorage::F64(v) => v.clone(),
            CpuStorage::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
            CpuStorage::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            CpuStorage::I64(v) => v.iter().map(|&x| x as f64).collect(),
            CpuStorage::U32(v) => v.iter().map(|&x| x as f64).collect(),
            CpuStorage::U8(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }

    fn attention_mask<'a>(m: &AttnMasks<'a, CpuStorage>) -> Result<AttnMask<'a>> {
        let key_mask = match m.key_mask {
            None => None,
            Some(CpuStorage::U8(v)) => Some(v.as_slice()),
            Some(o) => return Err(Error::dtype("attention", format!("key mask must be U8, got {}", o.dtype()))),
        };
        let segment_ids = match m.segment_ids {
            None => None,
            Some(s) => Some(ids_u32("attention", s)?),
        };
        Ok(AttnMask { causal: m.causal, q_offset: m.q_offset, key_mask, segment_ids, window: m.window })
    }
}

fn gather<T: Copy + Send + Sync>(v: &[T], l: &Layout) -> Vec<T> {
    if l.is_contiguous() {
        return v[l.offset()..l.offset() + l.elem_count()].to_vec();
    }
    let mut out = Vec::with_capacity(l.elem_count());
    l.for_each_index(|i| out.push(v[i]));
    out
}

fn convert<T: Copy + Sync, U: Send>(v: &[T], f: impl Fn(T) -> U + Sync + Send) -> Vec<U> {
    v.par_iter().map(|&x| f(x)).collect()
}

impl BackendStorage for CpuStorage {
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F64(_) => DType::F64,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::I64(_) => DType::I64,
            CpuStorage::U32(_) => DType::U32,
            CpuStorage::U8(_) => DType::U8,
        }
    }

    fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::F64(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::I64(v) => v.len(),
            CpuStorage::U32(v) => v.len(),
            CpuStorage::U8(v) => v.len(),
        }
    }

    fn zeros(_device: Device, dtype: DType, n: usize) -> Result<Self> {
        Ok(match dtype {
            DType::F32 => CpuStorage::F32(vec![0.0; n]),
            DType::F64 => CpuStorage::F64(vec![0.0; n]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::ZERO; n]),
            DType::F16 => CpuStorage::F16(vec![f16::ZERO; n]),
            DType::I64 => CpuStorage::I64(vec![0; n]),
            DType::U32 => CpuStorage::U32(vec![0; n]),
            DType::U8 => CpuStorage::U8(vec![0; n]),
        })
    }

    fn copy_strided(&self, l: &Layout) -> Result<Self> {
        Ok(match self {
            CpuStorage::F32(v) => CpuStorage::F32(gather(v, l)),
            CpuStorage::F64(v) => CpuStorage::F64(gather(v, l)),
            CpuStorage::BF16(v) => CpuStorage::BF16(gather(v, l)),
            CpuStorage::F16(v) => CpuStorage::F16(gather(v, l)),
            CpuStorage::I64(v) => CpuStorage::I64(gather(v, l)),
            CpuStorage::U32(v) => CpuStorage::U32(gather(v, l)),
            CpuStorage::U8(v) => CpuStorage::U8(gather(v, l)),
        })
    }

    fn to_dtype(&self, dtype: DType) -> Result<Self> {
        use CpuStorage as S;
        if self.dtype() == dtype {
            return Ok(self.clone());
        }
        Ok(match (self, dtype) {
            (S::F32(v), DType::F64) => S::F64(convert(v, |x| x as f64)),
            (S::F32(v), DType::BF16) => S::BF16(convert(v, bf16::from_f32)),
            (S::F32(v), DType::F16) => S::F16(convert(v, f16::from_f32)),
            (S::F64(v), DType::F32) => S::F32(convert(v, |x| x as f32)),
            (S::F64(v), DType::BF16) => S::BF16(convert(v, bf16::from_f64)),
            (S::F64(v), DType::F16) => S::F16(convert(v, f16::from_f64)),
            (S::BF16(v), DType::F32) => S::F32(convert(v, |x| x.to_f32())),
            (S::BF16(v), DType::F64) => S::F64(convert(v, |x| x.to_f64())),
            (S::F16(v), DType::F32) => S::F32(convert(v, |x| x.to_f32())),
            (S::F16(v), DType::F64) => S::F64(convert(v, |x| x.to_f64())),
            (S::I64(v), DType::U32) => {
                let mut out = Vec::with_capacity(v.len());
                for &x in v {
                    out.push(u32::try_from(x).map_err(|_| Error::Input(format!("value {x} does not fit U32")))?);
                }
                S::U32(out)
            }
            (S::U32(v), DType::I64) => S::I64(v.iter().map(|&x| x as i64).collect()),
            (S::I64(v), DType::F32) => S::F32(v.iter().map(|&x| x as f32).collect()),
            (S::I64(v), DType::F64) => S::F64(v.iter().map(|&x| x as f64).collect()),
            (S::I64(v), DType::U8) => S::U8(v.iter().map(|&x| (x != 0) as u8).collect()),
            (s, d) => return Err(Error::dtype("to_dtype", format!("no conversion from {} to {d}", s.dtype()))),
        })
    }

    fn binary(&self, rhs: &Self, op: BinaryOp) -> Result<Self> {
        with_float!("binary", self, |a| {
            let b = same("binary", a, rhs)?;
            let mut out = a.clone();
            out.par_chunks_mut(8192).zip(b.par_chunks(8192)).for_each(|(o, b)| match op {
                BinaryOp::Add => o.iter_mut().zip(b).for_each(|(o, &b)| *o += b),
                BinaryOp::Sub => o.iter_mut().zip(b).for_each(|(o, &b)| *o -= b),
                BinaryOp::Mul => o.iter_mut().zip(b).for_each(|(o, &b)| *o *= b),
            });
            Ok(FloatVec::wrap(out))
        })
    }

    fn affine(&self, mul: f64, add: f64) -> Result<Self> {
        with_float!("affine", self, |a| {
            let (m, c) = (like(a, mul), like(a, add));
            let out = a.par_iter().map(|&x| x * m + c).collect::<Vec<_>>();
            Ok(FloatVec::wrap(out))
        })
    }

    fn add_assign(&mut self, rhs: &Self) -> Result<()> {
        match (self, rhs) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => a.par_iter_mut().zip(b.par_iter()).for_each(|(a, &b)| *a += b),
            (CpuStorage::F64(a), CpuStorage::F64(b)) => a.par_iter_mut().zip(b.par_iter()).for_each(|(a, &b)| *a += b),
            (a, b) => return Err(Error::dtype("add_assign", format!("{} += {}", a.dtype(), b.dtype()))),
        }
        Ok(())
    }

    fn add_row(&self, row: &Self, cols: usize) -> Result<Self> {
        with_float!("add_row", self, |a| {
            let r = same("add_row", a, row)?;
            let mut out = a.clone();
            out.par_chunks_mut(cols).for_each(|o| o.iter_mut().zip(r).for_each(|(o, &b)| *o += b));
            Ok(FloatVec::wrap(out))
        })
    }

    fn mul_row(&self, row: &Self, cols: usize) -> Result<Self> {
        with_float!("mul_row", self, |a| {
            let r = same("mul_row", a, row)?;
            let mut out = a.clone();
            out.par_chunks_mut(cols).for_each(|o| o.iter_mut().zip(r).for_each(|(o, &b)| *o *= b));
            Ok(FloatVec::wrap(out))
        })
    }

    fn write_blocks(&mut self, src: &Self, outer: usize, len: usize, dst_stride: usize, dst_offset: usize) -> Result<()> {
        fn copy<T: Copy>(d: &mut [T], s: &[T], outer: usize, len: usize, stride: usize, off: usize) -> Result<()> {
            if outer > 0 && ((outer - 1) * stride + off + len > d.len() || outer * len > s.len()) {
                return Err(Error::shape("write_blocks", format!("{outer} blocks of {len} at offset {off} (stride {stride}) do not fit {} elements", d.len())));
            }
            for o in 0..outer {
                d[o * stride + off..o * stride + off + len].copy_from_slice(&s[o * len..(o + 1) * len]);
            }
            Ok(())
        }
        match (self, src) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => copy(d, s, outer, len, dst_stride, dst_offset),
            (CpuStorage::F64(d), CpuStorage::F64(s)) => copy(d, s, outer, len, dst_stride, dst_offset),
            (CpuStorage::U8(d), CpuStorage::U8(s)) => copy(d, s, outer, len, dst_stride, dst_offset),
            (d, s) => Err(Error::dtype("write_blocks", format!("{} into {}", s.dtype(), d.dtype()))),
        }
    }

    fn sum_rows(&self, rows: usize, cols: usize) -> Result<Self> {
        with_float!("sum_rows", self, |a| {
            let mut out = vec![like(a, 0.0); cols];
            for r in a.chunks(cols).take(rows) {
                out.iter_mut().zip(r).for_each(|(o, &x)| *o += x);
            }
            Ok(FloatVec::wrap(out))
        })
    }

    fn sum_all(&self) -> Result<f64> {
        with_float!("sum_all", self, |a| Ok(a.iter().map(|&x| x.f64()).sum()))
    }

    fn matmul(&self, rhs: &Self, p: &MatmulParams) -> Result<Self> {
        with_float!("matmul", self, |a| {
            let b = same("matmul", a, rhs)?;
            let (sa, sb) = (p.m * p.k, if p.b_batched { p.k * p.n } else { 0 });
            let lda = if p.trans_a { p.m } else { p.k };
            let ldb = if p.trans_b { p.k } else { p.n };
            let product = |i: usize| {
                gemm::matmul_new(
                    p.m,
                    p.n,
                    p.k,
                    gemm::Mat { data: &a[i * sa..(i + 1) * sa], ld: lda, trans: p.trans_a },
                    gemm::Mat { data: &b[i * sb..i * sb + p.k * p.n], ld: ldb, trans: p.trans_b },
                )
            };
            let c = if p.batch == 1 { product(0) } else { (0..p.batch).flat_map(product).collect() };
            Ok(FloatVec::wrap(c))
        })
    }

    fn embedding(&self, ids: &Self, dim: usize) -> Result<Self> {
        let ids = ids_u32("embedding", ids)?;
        with_float!("embedding", self, |t| {
            let mut y = vec![<_ as Float>::of(0.0); ids.len() * dim];
            embedding::forward(t, ids, dim, &mut y);
            Ok(FloatVec::wrap(y))
        })
    }

    fn embedding_backward(dy: &Self, ids: &Self, vocab: usize, dim: usize) -> Result<Self> {
        let ids = ids_u32("embedding", ids)?;
        with_float!("embedding", dy, |g| {
            let mut d = vec![<_ as Float>::of(0.0); vocab * dim];
            embedding::backward(g, ids, dim, &mut d);
            Ok(FloatVec::wrap(d))
        })
    }

    fn rms_norm(&self, w: &Self, dim: usize, eps: f64) -> Result<(Self, Self)> {
        with_float!("rms_norm", self, |x| {
            let w = same("rms_norm", x, w)?;
            let mut y = vec![<_ as Float>::of(0.0); x.len()];
            let mut r = vec![<_ as Float>::of(0.0); x.len() / dim];
            rms_norm::forward(x, w, dim, eps, &mut y, &mut r);
            Ok((FloatVec::wrap(y), FloatVec::wrap(r)))
        })
    }

    fn rms_norm_backward(&self, w: &Self, rstd: &Self, dy: &Self, dim: usize) -> Result<(Self, Self)> {
        with_float!("rms_norm", self, |x| {
            let (w, r, g) = (same("rms_norm", x, w)?, same("rms_norm", x, rstd)?, same("rms_norm", x, dy)?);
            let mut dx = vec![<_ as Float>::of(0.0); x.len()];
            let mut dw = vec![<_ as Float>::of(0.0); dim];
            rms_norm::backward(x, w, r, g, dim, &mut dx, &mut dw);
            Ok((FloatVec::wrap(dx), FloatVec::wrap(dw)))
        })
    }

    fn rope(&self, cos: &Self, sin: &Self, heads: usize, head_dim: usize, inverse: bool) -> Result<Self> {
        with_float!("rope", self, |x| {
            let (c, s) = (same("rope", x, cos)?, same("rope", x, sin)?);
            let mut y = vec![<_ as Float>::of(0.0); x.len()];
            rope::apply(x, c, s, heads, head_dim, inverse, &mut y);
            Ok(FloatVec::wrap(y))
        })
    }

    fn attention(q: &Self, k: &Self, v: &Self, s: &AttnShape, m: &AttnMasks<'_, Self>, scale: f64) -> Result<(Self, Self)> {
        let mask = Self::attention_mask(m)?;
        with_float!("attention", q, |q| {
            let (k, v) = (same("attention", q, k)?, same("attention", q, v)?);
            let mut out = vec![<_ as Float>::of(0.0); q.len()];
            let mut lse = vec![<_ as Float>::of(0.0); s.batch * s.n_heads * s.q_len];
            attention::attention_forward(s, &mask, <_ as Float>::of(scale), q, k, v, &mut out, &mut lse);
            Ok((FloatVec::wrap(out), FloatVec::wrap(lse)))
        })
    }

    fn attention_backward(
        q: &Self,
        k: &Self,
        v: &Self,
        out: &Self,
        lse: &Self,
        d_out: &Self,
        s: &AttnShape,
        m: &AttnMasks<'_, Self>,
        scale: f64,
    ) -> Result<(Self, Self, Self)> {
        let mask = Self::attention_mask(m)?;
        with_float!("attention", q, |q| {
            let (k, v) = (same("attention", q, k)?, same("attention", q, v)?);
            let (o, l, d) = (same("attention", q, out)?, same("attention", q, lse)?, same("attention", q, d_out)?);
            let mut dq = vec![<_ as Float>::of(0.0); q.len()];
            let mut dk = vec![<_ as Float>::of(0.0); k.len()];
            let mut dv = vec![<_ as Float>::of(0.0); v.len()];
            attention::attention_backward(s, &mask, <_ as Float>::of(scale), q, k, v, o, l, d, &mut dq, &mut dk, &mut dv);
            Ok((FloatVec::wrap(dq), FloatVec::wrap(dk), FloatVec::wrap(dv)))
        })
    }

    fn swiglu(gate: &Self, up: &Self) -> Result<Self> {
        with_float!("swiglu", gate, |g| {
            let u = same("swiglu", g, up)?;
            let mut y = vec![<_ as Float>::of(0.0); g.len()];
            swiglu::forward(g, u, &mut y);
            Ok(FloatVec::wrap(y))
        })
    }

    fn swiglu_backward(gate: &Self, up: &Self, dy: &Self) -> Result<(Self, Self)> {
        with_float!("swiglu", gate, |g| {
            let (u, d) = (same("swiglu", g, up)?, same("swiglu", g, dy)?);
            let mut dg = vec![<_ as Float>::of(0.0); g.len()];
            let mut du = vec![<_ as Float>::of(0.0); g.len()];
            swiglu::backward(g, u, d, &mut dg, &mut du);
            Ok((FloatVec::wrap(dg), FloatVec::wrap(du)))
        })
    }

    fn token_nll(&self, targets: &Self, vocab: usize) -> Result<(Self, Self)> {
        let CpuStorage::I64(t) = targets else {
            return Err(Error::dtype("token_nll", format!("targets must be I64, got {}", targets.dtype())));
        };
        with_float!("token_nll", self, |z| {
            let mut nll = vec![<_ as Float>::of(0.0); t.len()];
            let mut lse = vec![<_ as Float>::of(0.0); t.len()];
            token_nll::forward(z, t, vocab, &mut nll, &mut lse);
            Ok((FloatVec::wrap(nll), FloatVec::wrap(lse)))
        })
    }

    fn token_nll_backward(&self, targets: &Self, lse: &Self, g: &Self, vocab: usize) -> Result<Self> {
        let CpuStorage::I64(t) = targets else {
            return Err(Error::dtype("token_nll", format!("targets must be I64, got {}", targets.dtype())));
        };
        with_float!("token_nll", self, |z| {
            let (l, g) = (same("token_nll", z, lse)?, same("token_nll", z, g)?);
            let mut dz = vec![<_ as Float>::of(0.0); z.len()];
            token_nll::backward(z, t, l, g, vocab, &mut dz);
            Ok(FloatVec::wrap(dz))
        })
    }

    fn kl_rows(&self, reference: &Self, vocab: usize) -> Result<Self> {
        with_float!("kl_rows", self, |z| {
            let r = same("kl_rows", z, reference)?;
            let mut kl = vec![<_ as Float>::of(0.0); z.len() / vocab.max(1)];
            kl_div::forward(z, r, vocab, &mut kl);
            Ok(FloatVec::wrap(kl))
        })
    }

    fn kl_rows_backward(&self, reference: &Self, g: &Self, vocab: usize) -> Result<Self> {
        with_float!("kl_rows", self, |z| {
            let (r, g) = (same("kl_rows", z, reference)?, same("kl_rows", z, g)?);
            let mut dz = vec![<_ as Float>::of(0.0); z.len()];
            kl_div::backward(z, r, g, vocab, &mut dz);
            Ok(FloatVec::wrap(dz))
        })
    }

    fn adamw_step(&mut self, grad: &Self, m: &mut Self, v: &mut Self, h: &adamw::AdamWStep) -> Result<()> {
        match (self, grad, m, v) {
            (CpuStorage::F32(p), CpuStorage::F32(g), CpuStorage::F32(m), CpuStorage::F32(v)) => {
                adamw::step(p, g, m, v, h);
                Ok(())
            }
            (p, ..) => Err(Error::dtype("adamw", format!("parameters and state must be F32, got {}", p.dtype()))),
        }
    }
}

