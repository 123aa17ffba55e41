//! Attention on the GPU (kernels/cuda/attention.cu): flash-style forward (bf16 tensor cores for
//! head_dim 64 and 128, a tiled f32-math SIMT kernel for every other case up to head_dim 256), a
//! split-KV decode path for short query blocks (partials merged by their log-sum-exp), a flash-style
//! backward (one CTA per K/V tile, dQ through f32 atomics; bf16 tensor cores for head_dim 64 and 128,
//! SIMT up to 128, the reference kernel up to 256) and simple one-warp-per-query reference kernels.
//! head_dim > 256 is refused (Unsupported). Semantics and layouts are those of `backend::cpu::attention`; `lse` is F32 for every
//! input dtype (the op layer only hands it back to the backward).

use super::{device::grid_1d, launch, Arg, CudaStorage};
use crate::backend::{AttnMasks, AttnShape, BackendStorage, Storage};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use cudarc::driver::LaunchConfig;

const MODULE: &str = "attention";
/// Rows (and keys) per tile of the SIMT kernels.
const SB: usize = 32;
/// Longest query block that takes the split-KV decode path.
const DECODE_MAX_Q: usize = 8;
/// CTAs the decode path aims for (about four per SM of an H100's 132: each is small).
const DECODE_TARGET_CTAS: usize = 528;

fn err(msg: String) -> Error {
    Error::Input(format!("attention: {msg}"))
}

fn validate(q: &CudaStorage, k: &CudaStorage, v: &CudaStorage, s: &AttnShape, m: &AttnMasks<'_, CudaStorage>) -> Result<()> {
    q.float_op("attention", &[k, v])?;
    if s.n_kv_heads == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) {
        return Err(err(format!("{} heads are not a multiple of {} kv heads", s.n_heads, s.n_kv_heads)));
    }
    if s.head_dim == 0 || s.kv_len > s.kv_cap {
        return Err(err(format!("head_dim {} / kv_len {} > kv_cap {}", s.head_dim, s.kv_len, s.kv_cap)));
    }
    if q.len() != s.q_elems() || k.len() != s.kv_elems() || v.len() != s.kv_elems() {
        return Err(err(format!("lengths q {} k {} v {} do not match {s:?}", q.len(), k.len(), v.len())));
    }
    for (name, mk, dt) in [("key_mask", m.key_mask, DType::U8), ("segment_ids", m.segment_ids, DType::U32)] {
        if let Some(x) = mk {
            if x.dtype() != dt || x.len() != s.batch * s.kv_cap {
                return Err(err(format!(
                    "{name} is {} of {} elements, expected {dt} of {}",
                    x.dtype(),
                    x.len(),
                    s.batch * s.kv_cap
                )));
            }
            q.same_device(x, "attention")?;
        }
    }
    if m.segment_ids.is_some() && m.q_offset + s.q_len > s.kv_cap {
        return Err(err("segment ids need query positions inside kv_cap".into()));
    }
    let big = [
        s.batch,
        s.q_len,
        s.kv_cap,
        s.n_heads,
        s.head_dim,
        m.q_offset + s.q_len,
        s.n_heads * s.q_len,
    ];
    if big.iter().any(|&x| x > i32::MAX as usize / 2) || s.batch > 65535 || s.n_heads > 65535 {
        return Err(err(format!("sizes too large for the CUDA kernels: {s:?}")));
    }
    Ok(())
}

/// The trailing kernel arguments shared by every attention kernel (`ATTN_PARAMS` in the .cu file):
/// batch, q_len, kv_len, kv_cap, nh, nkv, D (int), key_mask, segment_ids (pointers, 0 = none),
/// causal, q_offset (int), window (long long, -1 = none), scale (float).
fn common(s: &AttnShape, m: &AttnMasks<'_, CudaStorage>, scale: f64) -> Vec<Arg> {
    vec![
        Arg::I32(s.batch as i32),
        Arg::I32(s.q_len as i32),
        Arg::I32(s.kv_len as i32),
        Arg::I32(s.kv_cap as i32),
        Arg::I32(s.n_heads as i32),
        Arg::I32(s.n_kv_heads as i32),
        Arg::I32(s.head_dim as i32),
        Arg::P(m.key_mask.map_or(0, |x| x.ptr())),
        Arg::P(m.segment_ids.map_or(0, |x| x.ptr())),
        Arg::I32(m.causal as i32),
        Arg::I32(m.q_offset as i32),
        Arg::I64(m.window.map_or(-1, |w| w.min(i64::MAX as usize) as i64)),
        Arg::F32(scale as f32),
    ]
}

fn cfg(grid: (usize, usize, usize), block: u32, smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

fn with(mut head: Vec<Arg>, tail: Vec<Arg>) -> Vec<Arg> {
    head.extend(tail);
    head
}

/// Column chunks of 32 the SIMT kernels are instantiated for (head_dim ≤ 32·DC).
fn simt_dc(d: usize, max: usize) -> Option<usize> {
    [2usize, 4, 8].into_iter().find(|&dc| dc <= max && d <= 32 * dc)
}

/// Shared memory of `attention_fwd_simt<DC>`: Qs[32][D], Ks[32][D+1], Vs[32][32·DC], Ps[32][32], 2·32 + 2 ints.
fn simt_fwd_smem(d: usize, dc: usize) -> usize {
    4 * (SB * d + SB * (d + 1) + SB * 32 * dc + SB * SB + 2 * SB + 2)
}

/// Shared memory of `attention_fwd_mma<D>`: Q, K, V tiles of 64 × (D + 8) bf16, 64 flags, 64 ids, 2 ints.
fn mma_smem(d: usize) -> usize {
    3 * 64 * (d + 8) * 2 + 64 + 64 * 4 + 8
}

/// Shared memory of `attention_bwd_simt<DC>`: Qs, dOs [32][D+1], Ks, Vs [32][D], Ps, dSs [32][32], 2·32 floats, 4·32 ints.
fn simt_bwd_smem(d: usize) -> usize {
    4 * (2 * SB * (d + 1) + 2 * SB * d + 2 * SB * SB + 2 * SB + 4 * SB)
}

/// Shared memory of `attention_bwd_mma<D>` (row tile BR = 64 for D = 64, 32 for D = 128): K, V tiles of
/// 64 × (D + 8) bf16, Q, dO tiles of BR × (D + 8), dS of BR × 72 bf16, 4·BR + 2·64 words.
fn mma_bwd_smem(d: usize) -> usize {
    let br = if d == 64 { 64 } else { 32 };
    2 * 64 * (d + 8) * 2 + 2 * br * (d + 8) * 2 + br * 72 * 2 + 4 * br * 4 + 2 * 64 * 4
}

/// `(out, lse)`: out like Q in Q's dtype, lse F32 `[batch, n_heads, q_len]`.
pub fn forward(
    q: &CudaStorage,
    k: &CudaStorage,
    v: &CudaStorage,
    s: &AttnShape,
    m: &AttnMasks<'_, CudaStorage>,
    scale: f64,
) -> Result<(CudaStorage, CudaStorage)> {
    validate(q, k, v, s, m)?;
    let dev = &q.dev;
    let d = s.head_dim;
    let Some(dc) = simt_dc(d, 8) else {
        // head_dim > 256: only the reference kernel handles it (its limit is 256 too).
        return Err(Error::Unsupported(format!("CUDA attention: head_dim {d} > 256")));
    };
    let out = CudaStorage::alloc_out(dev, q.dtype(), s.q_elems())?;
    let lse = CudaStorage::alloc_out(dev, DType::F32, s.lse_elems())?;
    if s.q_elems() == 0 {
        return Ok((out, lse));
    }
    let sfx = q.sfx();
    let rows = s.n_heads / s.n_kv_heads * s.q_len;
    let tiles = rows.div_ceil(SB);
    // Decode: few queries against many keys; split the keys so the GPU fills up.
    let nsplit = if s.q_len <= DECODE_MAX_Q {
        DECODE_TARGET_CTAS
            .div_ceil(s.batch * s.n_kv_heads * tiles)
            .clamp(1, s.kv_len.div_ceil(64).max(1))
    } else {
        1
    };
    let tail = common(s, m, scale);
    if nsplit > 1 {
        let parts = s.batch * s.n_kv_heads * rows * nsplit;
        let po = CudaStorage::alloc_out(dev, DType::F32, parts * d)?;
        let plse = CudaStorage::alloc_out(dev, DType::F32, parts)?;
        // attention_fwd_simt<DC>_<T>(q, k, v, out, lse, po, plse, int nsplit, ATTN_PARAMS)
        launch(
            dev,
            MODULE,
            &format!("attention_fwd_simt{dc}_{sfx}"),
            cfg((tiles * nsplit, s.n_kv_heads, s.batch), 128, simt_fwd_smem(d, dc)),
            &with(
                vec![
                    q.arg(),
                    k.arg(),
                    v.arg(),
                    out.arg(),
                    lse.arg(),
                    po.arg(),
                    plse.arg(),
                    Arg::I32(nsplit as i32),
                ],
                tail.clone(),
            ),
        )?;
        // attention_combine_<T>(po, plse, out, lse, int nsplit, ATTN_PARAMS)
        launch(
            dev,
            MODULE,
            &format!("attention_combine_{sfx}"),
            cfg((s.batch * s.n_kv_heads * rows, 1, 1), 64, 0),
            &with(vec![po.arg(), plse.arg(), out.arg(), lse.arg(), Arg::I32(nsplit as i32)], tail),
        )?;
        return Ok((out, lse));
    }
    let aligned = [q.ptr(), k.ptr(), v.ptr(), out.ptr()].iter().all(|p| p % 16 == 0);
    if q.dtype() == DType::BF16 && (d == 64 || d == 128) && aligned {
        // attention_fwd_mma<D>_bf16(q, k, v, out, lse, ATTN_PARAMS)
        launch(
            dev,
            MODULE,
            &format!("attention_fwd_mma{d}_bf16"),
            cfg((s.q_len.div_ceil(64), s.n_heads, s.batch), 128, mma_smem(d)),
            &with(vec![q.arg(), k.arg(), v.arg(), out.arg(), lse.arg()], tail),
        )?;
    } else {
        launch(
            dev,
            MODULE,
            &format!("attention_fwd_simt{dc}_{sfx}"),
            cfg((tiles, s.n_kv_heads, s.batch), 128, simt_fwd_smem(d, dc)),
            &with(
                vec![q.arg(), k.arg(), v.arg(), out.arg(), lse.arg(), Arg::P(0), Arg::P(0), Arg::I32(1)],
                tail,
            ),
        )?;
    }
    Ok((out, lse))
}

/// The reference forward (one warp per query, two passes over the keys; head_dim ≤ 256).
pub fn forward_reference(
    q: &CudaStorage,
    k: &CudaStorage,
    v: &CudaStorage,
    s: &AttnShape,
    m: &AttnMasks<'_, CudaStorage>,
    scale: f64,
) -> Result<(CudaStorage, CudaStorage)> {
    validate(q, k, v, s, m)?;
    if s.head_dim > 256 {
        return Err(Error::Unsupported(format!(
            "CUDA attention reference: head_dim {} > 256",
            s.head_dim
        )));
    }
    let dev = &q.dev;
    let out = CudaStorage::alloc_out(dev, q.dtype(), s.q_elems())?;
    let lse = CudaStorage::alloc_out(dev, DType::F32, s.lse_elems())?;
    if s.q_elems() == 0 {
        return Ok((out, lse));
    }
    let rows = s.batch * s.q_len * s.n_heads;
    // attention_ref_fwd_<T>(q, k, v, out, lse, ATTN_PARAMS)
    launch(
        dev,
        MODULE,
        &format!("attention_ref_fwd_{}", q.sfx()),
        cfg((rows.div_ceil(4), 1, 1), 128, 0),
        &with(vec![q.arg(), k.arg(), v.arg(), out.arg(), lse.arg()], common(s, m, scale)),
    )?;
    Ok((out, lse))
}

/// Checks the backward's extra operands and returns the lse as F32 (converted when it is not).
fn backward_inputs(
    q: &CudaStorage,
    out: &CudaStorage,
    lse: &CudaStorage,
    d_out: &CudaStorage,
    s: &AttnShape,
) -> Result<Option<CudaStorage>> {
    q.float_op("attention backward", &[out, d_out])?;
    q.same_device(lse, "attention backward")?;
    if out.len() != s.q_elems() || d_out.len() != s.q_elems() || lse.len() != s.lse_elems() {
        return Err(err(format!(
            "backward lengths out {} d_out {} lse {} do not match {s:?}",
            out.len(),
            d_out.len(),
            lse.len()
        )));
    }
    if lse.dtype() == DType::F32 {
        Ok(None)
    } else {
        Ok(Some(lse.to_dtype(DType::F32)?))
    }
}

/// `F32` scratch to `dtype` (the scratch itself when `dtype` is F32).
fn from_f32(x: CudaStorage, dtype: DType) -> Result<CudaStorage> {
    if dtype == DType::F32 {
        return Ok(x);
    }
    let n = x.len();
    let y = CudaStorage::alloc_out(&x.dev, dtype, n)?;
    if n > 0 {
        let mut c = grid_1d(n, 256);
        c.grid_dim.0 = c.grid_dim.0.min(65535 * 8);
        // attention_cast_<T>(const float* src, T* dst, u64 n)
        launch(
            &x.dev,
            MODULE,
            &format!("attention_cast_{}", super::sfx(dtype)),
            c,
            &[x.arg(), y.arg(), Arg::U64(n as u64)],
        )?;
    }
    Ok(y)
}

/// `(dq, dk, dv)`; dk/dv rows at positions ≥ kv_len are zero.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &CudaStorage,
    k: &CudaStorage,
    v: &CudaStorage,
    out: &CudaStorage,
    lse: &CudaStorage,
    d_out: &CudaStorage,
    s: &AttnShape,
    m: &AttnMasks<'_, CudaStorage>,
    scale: f64,
) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    validate(q, k, v, s, m)?;
    let lse_conv = backward_inputs(q, out, lse, d_out, s)?;
    let lse = lse_conv.as_ref().unwrap_or(lse);
    let d = s.head_dim;
    let Some(dc) = simt_dc(d, 4) else {
        // head_dim > 128: the reference backward (up to 256).
        return backward_reference(q, k, v, out, lse, d_out, s, m, scale);
    };
    let dev = &q.dev;
    let dt = q.dtype();
    let dk = CudaStorage::zeros_on(dev, dt, s.kv_elems())?;
    let dv = CudaStorage::zeros_on(dev, dt, s.kv_elems())?;
    if s.q_elems() == 0 || s.kv_len == 0 {
        return Ok((CudaStorage::zeros_on(dev, dt, s.q_elems())?, dk, dv));
    }
    let sfx = q.sfx();
    let dvec = CudaStorage::alloc_out(dev, DType::F32, s.lse_elems())?;
    let qrows = s.batch * s.q_len * s.n_heads;
    // attention_bwd_dot_<T>(o, dout, dvec, int batch, int q_len, int nh, int D)
    launch(
        dev,
        MODULE,
        &format!("attention_bwd_dot_{sfx}"),
        cfg((qrows.div_ceil(4), 1, 1), 128, 0),
        &[
            out.arg(),
            d_out.arg(),
            dvec.arg(),
            Arg::I32(s.batch as i32),
            Arg::I32(s.q_len as i32),
            Arg::I32(s.n_heads as i32),
            Arg::I32(d as i32),
        ],
    )?;
    let dq32 = CudaStorage::zeros_on(dev, DType::F32, s.q_elems())?;
    let args = with(
        vec![
            q.arg(),
            k.arg(),
            v.arg(),
            d_out.arg(),
            lse.arg(),
            dvec.arg(),
            dq32.arg(),
            dk.arg(),
            dv.arg(),
        ],
        common(s, m, scale),
    );
    let aligned = [q.ptr(), k.ptr(), v.ptr(), d_out.ptr(), dk.ptr(), dv.ptr()]
        .iter()
        .all(|p| p % 16 == 0);
    if dt == DType::BF16 && (d == 64 || d == 128) && aligned {
        // attention_bwd_mma<D>_bf16(q, k, v, dout, lse, dvec, dq32, dk, dv, ATTN_PARAMS)
        launch(
            dev,
            MODULE,
            &format!("attention_bwd_mma{d}_bf16"),
            cfg((s.kv_len.div_ceil(64), s.n_kv_heads, s.batch), 128, mma_bwd_smem(d)),
            &args,
        )?;
    } else {
        // attention_bwd_simt<DC>_<T>(q, k, v, dout, lse, dvec, dq32, dk, dv, ATTN_PARAMS)
        launch(
            dev,
            MODULE,
            &format!("attention_bwd_simt{dc}_{sfx}"),
            cfg((s.kv_len.div_ceil(SB), s.n_kv_heads, s.batch), 128, simt_bwd_smem(d)),
            &args,
        )?;
    }
    Ok((from_f32(dq32, dt)?, dk, dv))
}

/// The reference backward (one warp per query, dK/dV through f32 atomics; head_dim ≤ 256).
#[allow(clippy::too_many_arguments)]
pub fn backward_reference(
    q: &CudaStorage,
    k: &CudaStorage,
    v: &CudaStorage,
    out: &CudaStorage,
    lse: &CudaStorage,
    d_out: &CudaStorage,
    s: &AttnShape,
    m: &AttnMasks<'_, CudaStorage>,
    scale: f64,
) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    validate(q, k, v, s, m)?;
    let lse_conv = backward_inputs(q, out, lse, d_out, s)?;
    let lse = lse_conv.as_ref().unwrap_or(lse);
    if s.head_dim > 256 {
        return Err(Error::Unsupported(format!(
            "CUDA attention backward: head_dim {} > 256",
            s.head_dim
        )));
    }
    let dev = &q.dev;
    let dt = q.dtype();
    let dq = CudaStorage::alloc_out(dev, dt, s.q_elems())?;
    let dk32 = CudaStorage::zeros_on(dev, DType::F32, s.kv_elems())?;
    let dv32 = CudaStorage::zeros_on(dev, DType::F32, s.kv_elems())?;
    let rows = s.batch * s.q_len * s.n_heads;
    if rows > 0 {
        // attention_ref_bwd_<T>(q, k, v, o, lse, dout, dq, dk32, dv32, ATTN_PARAMS)
        launch(
            dev,
            MODULE,
            &format!("attention_ref_bwd_{}", q.sfx()),
            cfg((rows.div_ceil(4), 1, 1), 128, 0),
            &with(
                vec![
                    q.arg(),
                    k.arg(),
                    v.arg(),
                    out.arg(),
                    lse.arg(),
                    d_out.arg(),
                    dq.arg(),
                    dk32.arg(),
                    dv32.arg(),
                ],
                common(s, m, scale),
            ),
        )?;
    }
    Ok((dq, from_f32(dk32, dt)?, from_f32(dv32, dt)?))
}

// ------------------------------------------------------------------------------------------------
// Parity.
// ------------------------------------------------------------------------------------------------

/// One parity case: shapes and masks.
struct Case {
    name: String,
    b: usize,
    tq: usize,
    tk: usize,
    cap: usize,
    nh: usize,
    nkv: usize,
    d: usize,
    causal: bool,
    q_off: usize,
    km: Option<Vec<u8>>,
    seg: Option<Vec<u32>>,
    window: Option<usize>,
}

impl Case {
    fn new(name: &str, b: usize, t: usize, nh: usize, nkv: usize, d: usize, causal: bool) -> Case {
        Case {
            name: name.into(),
            b,
            tq: t,
            tk: t,
            cap: t,
            nh,
            nkv,
            d,
            causal,
            q_off: 0,
            km: None,
            seg: None,
            window: None,
        }
    }
    /// Decode: `tq` queries at the end of `tk` keys in a cache of `cap`.
    #[allow(clippy::too_many_arguments)]
    fn decode(name: &str, b: usize, tq: usize, tk: usize, cap: usize, nh: usize, nkv: usize, d: usize) -> Case {
        Case {
            name: name.into(),
            b,
            tq,
            tk,
            cap,
            nh,
            nkv,
            d,
            causal: true,
            q_off: tk - tq,
            km: None,
            seg: None,
            window: None,
        }
    }
    fn shape(&self) -> AttnShape {
        AttnShape {
            batch: self.b,
            q_len: self.tq,
            kv_len: self.tk,
            kv_cap: self.cap,
            n_heads: self.nh,
            n_kv_heads: self.nkv,
            head_dim: self.d,
        }
    }
    /// Whether the op layer can express it (it has no q_offset / kv_cap).
    fn op_layer(&self) -> bool {
        self.q_off == 0 && self.cap == self.tk && (!self.causal || self.tq == self.tk)
    }
    fn label(&self) -> String {
        format!(
            "{} b{} q{} kv{}/{} h{}/{} d{}",
            self.name, self.b, self.tq, self.tk, self.cap, self.nh, self.nkv, self.d
        )
    }
}

fn segments(b: usize, lens: &[usize], cap: usize) -> Vec<u32> {
    let mut seg = Vec::new();
    for bb in 0..b {
        let mut row: Vec<u32> = lens
            .iter()
            .enumerate()
            .flat_map(|(n, &l)| std::iter::repeat_n((n + 10 * bb) as u32, l))
            .collect();
        row.resize(cap, 99);
        seg.extend(row);
    }
    seg
}

fn cases() -> Vec<Case> {
    let mut v = vec![
        Case::new("causal gqa", 2, 77, 8, 2, 64, true),
        Case::new("causal", 1, 200, 4, 2, 128, true),
        Case::new("full", 2, 77, 4, 4, 128, false),
        Case::new("causal odd-dim", 2, 77, 8, 2, 96, true),
        // Long enough for full 64×64 tiles (no per-element mask) in both tensor-core head dims.
        Case::new("causal long gqa", 1, 256, 8, 2, 64, true),
        Case::new("full long", 2, 192, 4, 2, 128, false),
    ];
    // Key padding: right padding, left padding with a hole, a fully padded row.
    for (causal, d) in [(false, 64), (true, 128)] {
        let (t, b) = (77, 3);
        let mut km = vec![1u8; b * t];
        km[t - 10..t].fill(0);
        km[t..t + 7].fill(0);
        km[t + 30] = 0;
        km[2 * t..3 * t].fill(0);
        let mut c = Case::new("padding", b, t, 4, 1, d, causal);
        c.km = Some(km);
        v.push(c);
    }
    let mut c = Case::new("segments", 2, 150, 8, 2, 128, true);
    c.seg = Some(segments(2, &[40, 70, 40], 150));
    v.push(c);
    let mut c = Case::new("segments full", 1, 100, 4, 2, 64, false);
    c.seg = Some(segments(1, &[33, 67], 100));
    v.push(c);
    let mut c = Case::new("window 24", 2, 200, 4, 2, 64, true);
    c.window = Some(24);
    v.push(c);
    // A window wide enough that some tiles inside it are full and others straddle its edge.
    let mut c = Case::new("window 150 long", 1, 320, 4, 2, 64, true);
    c.window = Some(150);
    v.push(c);
    let mut c = Case::new("window 7 full", 1, 45, 2, 2, 80, false);
    c.window = Some(7);
    v.push(c);
    // Everything at once.
    let (t, b) = (100, 2);
    let mut c = Case::new("combined", b, t, 8, 2, 64, true);
    c.seg = Some(segments(b, &[30, 50, 20], t));
    let mut km = vec![1u8; b * t];
    km[..4].fill(0);
    km[t + t - 6..2 * t].fill(0);
    c.km = Some(km);
    c.window = Some(24);
    v.push(c);
    // Queries shorter than keys, no causality (cross attention).
    let mut c = Case::new("q<kv full", 2, 50, 8, 2, 64, false);
    c.tk = 130;
    c.cap = 130;
    v.push(c);
    // Decode against a cache with kv_cap > kv_len.
    v.push(Case::decode("decode", 2, 1, 300, 512, 8, 2, 128));
    v.push(Case::decode("decode", 2, 4, 300, 512, 8, 2, 64));
    let mut c = Case::decode("decode window pad", 2, 4, 300, 512, 8, 2, 128);
    c.window = Some(100);
    let mut km = vec![1u8; 2 * 512];
    km[..20].fill(0);
    km[512 + 150..512 + 160].fill(0);
    c.km = Some(km);
    v.push(c);
    let mut c = Case::decode("decode segments", 1, 3, 77, 96, 4, 1, 64);
    c.seg = Some(segments(1, &[40, 37], 96));
    v.push(c);
    // Chunked prefill: many queries at an offset (tiles, not the split path).
    v.push(Case::decode("chunked prefill", 1, 40, 200, 256, 4, 2, 64));
    v
}

fn cuda_of(s: &Storage) -> Result<&CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        Storage::Cpu(_) => Err(Error::Input("attention parity: expected a device storage".into())),
    }
}

fn tensor(s: Storage, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_storage(s, shape)
}

/// Runs one case in one dtype: CPU reference (backend call in F32 on the rounded inputs), the fast
/// kernels and the reference kernels through the backend, and (where expressible) the op layer with
/// autograd.
fn run_case(p: &mut super::parity::Parity, c: &Case, dtype: DType) -> Result<()> {
    use crate::Device;
    let s = c.shape();
    let (qs, ks) = ([c.b, c.tq, c.nh, c.d], [c.b, c.cap, c.nkv, c.d]);
    let lse_shape = [c.b, c.nh, c.tq];
    let q = p.randn(&qs, dtype, 1.0)?;
    let k = p.randn(&ks, dtype, 1.0)?;
    let v = p.randn(&ks, dtype, 1.0)?;
    let g = p.randn(&qs, dtype, 1.0)?;
    let scale = 1.0 / (c.d as f64).sqrt();
    let km = c.km.clone().map(|x| Tensor::from_vec(x, &[c.b, c.cap], Device::Cpu)).transpose()?;
    let seg = c.seg.clone().map(|x| Tensor::from_vec(x, &[c.b, c.cap], Device::Cpu)).transpose()?;
    let case = c.label();
    let tol = super::parity::tolerance(dtype);

    // CPU reference.
    let f32s = |t: &Tensor| t.to_dtype(DType::F32);
    let (qc, kc, vc, gc) = (f32s(&q)?, f32s(&k)?, f32s(&v)?, f32s(&g)?);
    let (kmc, segc) = (
        km.as_ref().map(|t| t.contiguous_storage()).transpose()?,
        seg.as_ref().map(|t| t.contiguous_storage()).transpose()?,
    );
    let mc = AttnMasks {
        causal: c.causal,
        q_offset: c.q_off,
        key_mask: kmc.as_deref(),
        segment_ids: segc.as_deref(),
        window: c.window,
    };
    let (qcs, kcs, vcs, gcs) = (
        qc.contiguous_storage()?,
        kc.contiguous_storage()?,
        vc.contiguous_storage()?,
        gc.contiguous_storage()?,
    );
    let (o_ref, l_ref) = Storage::attention(&qcs, &kcs, &vcs, &s, &mc, scale)?;
    let (dq_ref, dk_ref, dv_ref) = Storage::attention_backward(&qcs, &kcs, &vcs, &o_ref, &l_ref, &gcs, &s, &mc, scale)?;
    let o_ref = tensor(o_ref, &qs)?;
    let l_ref = tensor(l_ref, &lse_shape)?;
    let (dq_ref, dk_ref, dv_ref) = (tensor(dq_ref, &qs)?, tensor(dk_ref, &ks)?, tensor(dv_ref, &ks)?);

    // Device inputs.
    let (qg, kg, vg, gg) = (p.gpu(&q)?, p.gpu(&k)?, p.gpu(&v)?, p.gpu(&g)?);
    let kmg = km.as_ref().map(|t| p.gpu(t)).transpose()?;
    let segg = seg.as_ref().map(|t| p.gpu(t)).transpose()?;
    let (kmgs, seggs) = (
        kmg.as_ref().map(|t| t.contiguous_storage()).transpose()?,
        segg.as_ref().map(|t| t.contiguous_storage()).transpose()?,
    );
    let mg = AttnMasks {
        causal: c.causal,
        q_offset: c.q_off,
        key_mask: kmgs.as_deref().map(cuda_of).transpose()?,
        segment_ids: seggs.as_deref().map(cuda_of).transpose()?,
        window: c.window,
    };
    let (qgs, kgs, vgs, ggs) = (
        qg.contiguous_storage()?,
        kg.contiguous_storage()?,
        vg.contiguous_storage()?,
        gg.contiguous_storage()?,
    );
    let (qd, kd, vd, gd) = (cuda_of(&qgs)?, cuda_of(&kgs)?, cuda_of(&vgs)?, cuda_of(&ggs)?);

    type Fwd =
        fn(&CudaStorage, &CudaStorage, &CudaStorage, &AttnShape, &AttnMasks<'_, CudaStorage>, f64) -> Result<(CudaStorage, CudaStorage)>;
    type Bwd = fn(
        &CudaStorage,
        &CudaStorage,
        &CudaStorage,
        &CudaStorage,
        &CudaStorage,
        &CudaStorage,
        &AttnShape,
        &AttnMasks<'_, CudaStorage>,
        f64,
    ) -> Result<(CudaStorage, CudaStorage, CudaStorage)>;
    let variants: [(&str, Fwd, Bwd); 2] = [
        ("attention", forward, backward),
        ("attention/ref", forward_reference, backward_reference),
    ];
    for (kname, fwd, bwd) in variants {
        match fwd(qd, kd, vd, &s, &mg, scale) {
            Ok((o, l)) => {
                let o_t = tensor(Storage::Cuda(o.try_clone()?), &qs)?;
                p.check(&format!("{kname}/forward out"), &case, &o_ref, &o_t);
                p.check_tol(
                    &format!("{kname}/forward lse"),
                    &case,
                    &l_ref,
                    &tensor(Storage::Cuda(l.try_clone()?), &lse_shape)?,
                    tol,
                );
                match bwd(qd, kd, vd, &o, &l, gd, &s, &mg, scale) {
                    Ok((dq, dk, dv)) => {
                        p.check(&format!("{kname}/backward dq"), &case, &dq_ref, &tensor(Storage::Cuda(dq), &qs)?);
                        p.check(&format!("{kname}/backward dk"), &case, &dk_ref, &tensor(Storage::Cuda(dk), &ks)?);
                        p.check(&format!("{kname}/backward dv"), &case, &dv_ref, &tensor(Storage::Cuda(dv), &ks)?);
                    }
                    Err(e) => p.fail(&format!("{kname}/backward"), &case, dtype, &e),
                }
            }
            Err(e) => p.fail(&format!("{kname}/forward"), &case, dtype, &e),
        }
    }

    // The op layer with autograd (training shapes only).
    if c.op_layer() {
        let mask = crate::ops::AttentionMask {
            causal: c.causal,
            key_mask: kmg.clone(),
            segment_ids: segg.clone(),
            window: c.window,
        };
        let (qr, kr, vr) = (qg.requires_grad(), kg.requires_grad(), vg.requires_grad());
        let res = (|| -> Result<_> {
            let o = crate::ops::attention(&qr, &kr, &vr, &mask, scale)?;
            let grads = crate::ops::sum(&crate::ops::mul(&o, &gg)?)?.backward()?;
            let get = |t: &Tensor| {
                grads
                    .get(t)
                    .cloned()
                    .ok_or_else(|| Error::Input("attention parity: missing gradient".into()))
            };
            Ok((o.detach(), get(&qr)?, get(&kr)?, get(&vr)?))
        })();
        match res {
            Ok((o, dq, dk, dv)) => {
                p.check("attention/op out", &case, &o_ref, &o);
                p.check("attention/op dq", &case, &dq_ref, &dq);
                p.check("attention/op dk", &case, &dk_ref, &dk);
                p.check("attention/op dv", &case, &dv_ref, &dv);
            }
            Err(e) => p.fail("attention/op", &case, dtype, &e),
        }
    }
    Ok(())
}

/// Parity: f32 and bf16; head_dim 64, 128 (tensor-core forward for bf16) and 80/96 (SIMT); GQA; causal;
/// key padding (with a fully padded batch row); packed segments; sliding windows; cross attention;
/// split-KV decode (q_len 1, 3 and 4 in a cache with kv_cap > kv_len) and chunked prefill; fast and
/// reference kernels; out, lse and all three gradients, through the backend and the op layer.
pub fn parity(p: &mut super::parity::Parity) -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        for c in cases() {
            if let Err(e) = run_case(p, &c, dtype) {
                p.fail("attention", &c.label(), dtype, &e);
            }
        }
    }
    Ok(())
}
