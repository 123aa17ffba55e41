//! Blockwise ("flash-style") scaled dot-product attention on CPU: forward, backward and
//! KV-cache decode, with causal / padding / packed-segment / sliding-window masks and GQA.
//!
//! Layouts (all row-major, contiguous):
//! - `q`, `out`, `d_out`, `dq`: `[batch, q_len, n_heads, head_dim]`
//! - `k`, `v`, `dk`, `dv`: `[batch, kv_cap, n_kv_heads, head_dim]`, of which positions `< kv_len` are used
//! - `lse`: `[batch, n_heads, q_len]`
//!
//! Head `h` reads KV head `h / (n_heads / n_kv_heads)`; repeated K/V are never materialised.
//! The score matrix is never materialised either: query positions are processed in blocks of
//! `BQ` (the blocks of all query heads sharing a KV head are stacked, so each K/V block is
//! used once per group, which also turns GQA decoding into small GEMMs instead of GEMVs)
//! against key blocks of `BK` keys, with an online softmax (running max and sum, rescaled
//! accumulator). Key blocks that no query of the block can see (causality, sliding window,
//! padding at either end, segment boundaries) are skipped without being computed. All products
//! go through [`matmul`] with the tensors' own row strides, so head slices are never copied
//! except for the small packed query-side blocks. The backward pass recomputes the
//! probabilities from the saved log-sum-exp: P = exp(S − lse), dV += Pᵀ dO, dP = dO Vᵀ,
//! dS = P ∘ (dP − rowsum(dO ∘ O)), dQ += scale·dS K, dK += scale·dSᵀ Q.
//!
//! Threads (rayon): the forward pass runs one task per (batch, KV head, chunk of query
//! positions, slice of the group's heads), chunks and slices only being cut when there are
//! fewer (batch, KV head) pairs than threads. The backward pass runs one task per (batch,
//! KV head) that owns dK/dV of that head outright; only when there are too few pairs is the
//! group (then the query range) cut further, each piece accumulating dK/dV in a private buffer
//! summed afterwards. Every output element therefore has exactly one writer; tasks write their
//! disjoint rows through `Shared` (the one `unsafe` construct, with the disjointness argument
//! at each use), besides a same-type slice cast for the f32 `exp` fast path.
//!
//! Numerics: the f64 instantiation uses `f64::exp` and matches a naive softmax reference to
//! ~1e-12. The f32 instantiation uses a branch-free polynomial `exp` (a few ulp; AVX2+FMA
//! when the CPU has them, chosen at run time) so the softmax vectorises.
//!
//! Argument checks use `assert!`: these functions are internal kernels, and callers are expected
//! to validate user input first; a failed assert is a bug in the caller.

use super::float::Float;
use super::gemm::{matmul, Mat};
use rayon::prelude::*;
use std::any::TypeId;
use std::collections::HashMap;

/// Query rows per block.
const BQ: usize = 64;
/// Key columns per block.
const BK: usize = 128;

/// Sizes. Q is `[batch, q_len, n_heads, head_dim]`; K and V are `[batch, kv_cap, n_kv_heads, head_dim]`
/// of which the first `kv_len` positions are used (`kv_cap ≥ kv_len` lets a KV cache be
/// preallocated); O like Q.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub kv_cap: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    /// Elements of Q / O / dO / dQ.
    pub fn q_elems(&self) -> usize {
        self.batch * self.q_len * self.n_heads * self.head_dim
    }
    /// Elements of K / V / dK / dV (the whole capacity).
    pub fn kv_elems(&self) -> usize {
        self.batch * self.kv_cap * self.n_kv_heads * self.head_dim
    }
    /// Elements of the log-sum-exp buffer.
    pub fn lse_elems(&self) -> usize {
        self.batch * self.n_heads * self.q_len
    }
}

/// Which keys each query may see. A key `j` is visible from query `i` (at key position
/// `p = q_offset + i`) iff `j < kv_len` and every enabled condition holds:
/// `j <= p` (causal), `key_mask[j] != 0`, `segment_ids[j] == segment_ids[p]`, `p - j < window`.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttnMask<'a> {
    pub causal: bool,
    /// Query i sits at position q_offset + i of the key sequence (0 in training; kv_len - q_len when decoding).
    pub q_offset: usize,
    /// [batch, kv_cap] 1 = real key, 0 = padding; None = all real.
    pub key_mask: Option<&'a [u8]>,
    /// [batch, kv_cap] segment id per position (packed sequences); a query at key position p sees
    /// only keys with `segment_ids[p]`'s id. None = one segment. Requires `q_offset + q_len <= kv_cap`.
    pub segment_ids: Option<&'a [u32]>,
    /// Sliding window: key j visible from query position p only if p - j < window (Mistral's
    /// semantics; without `causal`, keys after p stay visible). None = unlimited.
    pub window: Option<usize>,
}

/// Everything a task needs, shared read-only by all tasks of one call.
struct Ctx<'a, T> {
    s: AttnShape,
    scale: T,
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    key_mask: Option<&'a [u8]>,
    seg: Option<&'a [u32]>,
    /// Per query `(b, i)` (index `b * q_len + i`): every key it can see lies in `[lo, hi)`
    /// (`(0, 0)` when it sees none). Covers kv_len, causality, the window, the span of real keys
    /// and the span of its segment; `key_mask` / `seg` are still checked per key inside it.
    range: Vec<(usize, usize)>,
    /// Per query `(b, i)`: its segment id (empty without segments).
    qseg: Vec<u32>,
    /// Row strides of Q-like and K-like tensors.
    ldq: usize,
    ldk: usize,
}

impl<'a, T: Float> Ctx<'a, T> {
    fn new(s: &AttnShape, m: &AttnMask<'a>, scale: T, q: &'a [T], k: &'a [T], v: &'a [T]) -> Self {
        assert!(s.n_kv_heads > 0 && s.n_heads / s.n_kv_heads * s.n_kv_heads == s.n_heads, "attention: n_heads must be a multiple of n_kv_heads");
        assert!(s.head_dim > 0, "attention: head_dim must be positive");
        assert!(s.kv_len <= s.kv_cap, "attention: kv_len > kv_cap");
        assert_eq!(q.len(), s.q_elems(), "attention: q length");
        assert_eq!(k.len(), s.kv_elems(), "attention: k length");
        assert_eq!(v.len(), s.kv_elems(), "attention: v length");
        if let Some(km) = m.key_mask {
            assert_eq!(km.len(), s.batch * s.kv_cap, "attention: key_mask length");
        }
        if let Some(seg) = m.segment_ids {
            assert_eq!(seg.len(), s.batch * s.kv_cap, "attention: segment_ids length");
            assert!(m.q_offset + s.q_len <= s.kv_cap, "attention: segment ids need query positions inside kv_cap");
        }
        let (tq, cap, kvl) = (s.q_len, s.kv_cap, s.kv_len);
        let mut range = Vec::with_capacity(s.batch * tq);
        let mut qseg = Vec::new();
        let mut hull: HashMap<u32, (usize, usize)> = HashMap::new();
        for b in 0..s.batch {
            // Span of real keys.
            let (klo, khi) = match m.key_mask {
                Some(km) => {
                    let row = &km[b * cap..b * cap + kvl];
                    match (row.iter().position(|&x| x != 0), row.iter().rposition(|&x| x != 0)) {
                        (Some(a), Some(z)) => (a, z + 1),
                        _ => (0, 0),
                    }
                }
                None => (0, kvl),
            };
            // Span of each segment among the keys.
            if let Some(seg) = m.segment_ids {
                hull.clear();
                for (j, &id) in seg[b * cap..b * cap + kvl].iter().enumerate() {
                    let e = hull.entry(id).or_insert((j, j + 1));
                    e.1 = j + 1;
                }
            }
            for i in 0..tq {
                let p = m.q_offset + i;
                let (mut lo, mut hi) = (klo, khi);
                if m.causal {
                    hi = hi.min(p + 1);
                }
                if let Some(w) = m.window {
                    // p - j < w  <=>  j >= p + 1 - w
                    lo = lo.max((p + 1).saturating_sub(w));
                }
                if let Some(seg) = m.segment_ids {
                    let id = seg[b * cap + p];
                    qseg.push(id);
                    match hull.get(&id) {
                        Some(&(a, z)) => {
                            lo = lo.max(a);
                            hi = hi.min(z);
                        }
                        None => hi = 0,
                    }
                }
                range.push(if lo < hi { (lo, hi) } else { (0, 0) });
            }
        }
        Ctx {
            s: *s,
            scale,
            q,
            k,
            v,
            key_mask: m.key_mask,
            seg: m.segment_ids,
            range,
            qseg,
            ldq: s.n_heads * s.head_dim,
            ldk: s.n_kv_heads * s.head_dim,
        }
    }

    /// Offset of element 0 of query row `(b, i, h)` in a Q-like tensor.
    #[inline]
    fn q_off(&self, b: usize, i: usize, h: usize) -> usize {
        (b * self.s.q_len + i) * self.ldq + h * self.s.head_dim
    }

    /// Offset of element 0 of key row `(b, j, g)` in a K-like tensor.
    #[inline]
    fn k_off(&self, b: usize, j: usize, g: usize) -> usize {
        (b * self.s.kv_cap + j) * self.ldk + g * self.s.head_dim
    }

    /// Hull `[lo, hi)` of the keys seen by queries `i0..i1` of batch `b` (empty: `lo >= hi`).
    fn block_range(&self, b: usize, i0: usize, i1: usize) -> (usize, usize) {
        let base = b * self.s.q_len;
        let (mut lo, mut hi) = (usize::MAX, 0);
        for &(a, z) in &self.range[base + i0..base + i1] {
            if a < z {
                lo = lo.min(a);
                hi = hi.max(z);
            }
        }
        (lo, hi)
    }

    /// Whether any query of `i0..i1` may see a key of `j0..j1`.
    fn block_needed(&self, b: usize, i0: usize, i1: usize, j0: usize, j1: usize) -> bool {
        let base = b * self.s.q_len;
        self.range[base + i0..base + i1].iter().any(|&(a, z)| a < z && a < j1 && z > j0)
    }

    /// Turns raw scores `row` (keys `j0..j0 + row.len()` for query `(b, i)`) into scaled, masked
    /// scores: invisible keys become `-inf`.
    #[inline]
    fn mask_row(&self, row: &mut [T], b: usize, i: usize, j0: usize) {
        let ninf = T::neg_infinity();
        let (lo, hi) = self.range[b * self.s.q_len + i];
        let j1 = j0 + row.len();
        let a = lo.clamp(j0, j1) - j0;
        let z = hi.clamp(j0, j1) - j0;
        if a >= z {
            row.fill(ninf);
            return;
        }
        row[..a].fill(ninf);
        row[z..].fill(ninf);
        let mid = &mut row[a..z];
        let scale = self.scale;
        mid.iter_mut().for_each(|x| *x *= scale);
        let base = b * self.s.kv_cap + j0 + a;
        if let Some(km) = self.key_mask {
            for (x, &keep) in mid.iter_mut().zip(&km[base..base + (z - a)]) {
                if keep == 0 {
                    *x = ninf;
                }
            }
        }
        if let Some(seg) = self.seg {
            let id = self.qseg[b * self.s.q_len + i];
            for (x, &sid) in mid.iter_mut().zip(&seg[base..base + (z - a)]) {
                if sid != id {
                    *x = ninf;
                }
            }
        }
    }
}

/// Most query rows (heads × positions) stacked into one block: bounds the score block to
/// `MAX_ROWS × BK`, so it stays in L2 for any GQA group size.
const MAX_ROWS: usize = 256;

/// `matmul` hands products of at least this many multiply-adds to rayon itself (see gemm.rs);
/// blocks stay below it, since the tasks here already fill the threads.
const GEMM_PARALLEL_MIN: usize = 1 << 21;

/// Query positions per block when `heads` query heads are stacked (head_dim `d`): every block
/// product is `rows × BK × d` with `rows = heads × q_step`.
fn q_step(heads: usize, d: usize) -> usize {
    let max_rows = MAX_ROWS.min((GEMM_PARALLEL_MIN - 1) / (BK * d));
    (max_rows / heads.max(1)).clamp(1, BQ)
}

/// Per-task scratch, reused across the blocks of a task. Rows are `(head, position)` pairs
/// stacked head-major: row `hl * nq + r` is head `heads.start + hl` at query `i0 + r`.
struct Scratch<T> {
    /// Packed Q rows `[rows, head_dim]`.
    qp: Vec<T>,
    /// Forward: output accumulator; backward: packed dO.
    acc: Vec<T>,
    /// Backward: packed dQ accumulator.
    dqp: Vec<T>,
    /// Scores / probabilities `[rows, nk]`.
    s: Vec<T>,
    /// Backward: dP, then dS `[rows, nk]`.
    dp: Vec<T>,
    /// Forward: running max; backward: D = rowsum(dO ∘ O).
    m: Vec<T>,
    /// Forward: running sum; backward: saved lse.
    l: Vec<T>,
}

impl<T: Float> Scratch<T> {
    fn new(s: &AttnShape, backward: bool) -> Self {
        // Largest `heads × q_step(heads)` for any slice of a group.
        let rows = MAX_ROWS.max(BQ).max(s.n_heads / s.n_kv_heads);
        let d = s.head_dim;
        let z = |n: usize| vec![T::zero(); n];
        let zb = |n: usize| if backward { z(n) } else { Vec::new() };
        Scratch {
            qp: z(rows * d),
            acc: z(rows * d),
            dqp: zb(rows * d),
            s: z(rows * BK),
            dp: zb(rows * BK),
            m: z(rows),
            l: z(rows),
        }
    }
}

/// An output buffer that parallel tasks write through disjoint ranges.
struct Shared<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: `Shared` is only a pointer to a `&mut [T]` that outlives the parallel section it is
// used in; sending it between threads is sound because every access goes through `slice`,
// whose callers guarantee that no two tasks touch the same elements.
unsafe impl<T: Send> Send for Shared<T> {}
unsafe impl<T: Send> Sync for Shared<T> {}

impl<T> Shared<T> {
    fn new(s: &mut [T]) -> Self {
        Shared { ptr: s.as_mut_ptr(), len: s.len() }
    }

    /// Elements `off..off + n`.
    ///
    /// # Safety
    /// No other live reference (in this or another task) may overlap `off..off + n`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, off: usize, n: usize) -> &mut [T] {
        assert!(off + n <= self.len, "attention: output range out of bounds");
        // SAFETY: in bounds (checked above); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), n) }
    }
}

impl<T: Float> Ctx<'_, T> {
    /// Copies the rows of heads `heads` at positions `i0..i0 + nq` of batch `b` of the Q-like
    /// tensor `src` into `dst` (`[heads.len() * nq, head_dim]`, head-major).
    fn pack(&self, src: &[T], dst: &mut [T], b: usize, heads: std::ops::Range<usize>, i0: usize, nq: usize) {
        let d = self.s.head_dim;
        for (hl, h) in heads.enumerate() {
            for r in 0..nq {
                let o = self.q_off(b, i0 + r, h);
                dst[(hl * nq + r) * d..(hl * nq + r + 1) * d].copy_from_slice(&src[o..o + d]);
            }
        }
    }
}

/// Splits `group` heads into `splits` contiguous slices; slice `sp` as a range of group-local heads.
fn head_slice(group: usize, splits: usize, sp: usize) -> std::ops::Range<usize> {
    sp * group / splits..(sp + 1) * group / splits
}

/// out = softmax(scale · Q Kᵀ + mask) V per (batch, head), head h reading KV head
/// h / (n_heads / n_kv_heads) (GQA, never materialise repeated K/V).
/// lse: [batch, n_heads, q_len] log-sum-exp of the scaled, masked scores per query (saved for
/// backward); a query that sees no key gets out = 0 and lse = -inf.
///
/// Panics (assert) on inconsistent sizes: internal misuse, callers validate user input first.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<T: Float>(
    s: &AttnShape,
    m: &AttnMask,
    scale: T,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
    lse: &mut [T],
) {
    let c = Ctx::new(s, m, scale, q, k, v);
    assert_eq!(out.len(), s.q_elems(), "attention: out length");
    assert_eq!(lse.len(), s.lse_elems(), "attention: lse length");
    if s.batch == 0 || s.q_len == 0 {
        return;
    }
    let (tq, nkv) = (s.q_len, s.n_kv_heads);
    let group = s.n_heads / nkv;
    // A task is (batch, kv head, chunk of query positions, slice of the group's heads); all its
    // heads share each K/V block. Chunks first (they keep that sharing), head slices only when
    // there are still too few tasks (decoding a small batch).
    let units = s.batch * nkv;
    let want = 4 * rayon::current_num_threads();
    let n_blocks = tq.div_ceil(BQ);
    let chunks = want.div_ceil(units).clamp(1, n_blocks);
    let rows_per_chunk = n_blocks.div_ceil(chunks) * BQ;
    let chunks = tq.div_ceil(rows_per_chunk);
    let splits = want.div_ceil(units * chunks).clamp(1, group);
    let mut tasks = Vec::with_capacity(units * chunks * splits);
    for b in 0..s.batch {
        for g in 0..nkv {
            for ch in 0..chunks {
                let rows = ch * rows_per_chunk..((ch + 1) * rows_per_chunk).min(tq);
                for sp in 0..splits {
                    let hl = head_slice(group, splits, sp);
                    tasks.push((b, g, g * group + hl.start..g * group + hl.end, rows.clone()));
                }
            }
        }
    }
    let (out_w, lse_w) = (Shared::new(out), Shared::new(lse));
    tasks.into_par_iter().for_each_init(
        || Scratch::new(s, false),
        |sc, (b, g, heads, rows)| forward_task(&c, b, g, heads, rows, &out_w, &lse_w, sc),
    );
}

/// Forward for batch `b`, query heads `heads` (all reading KV head `g`), query positions `rows`:
/// writes exactly the `out` rows and `lse` entries of those (position, head) pairs.
#[allow(clippy::too_many_arguments)]
fn forward_task<T: Float>(
    c: &Ctx<T>,
    b: usize,
    g: usize,
    heads: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
    out: &Shared<T>,
    lse: &Shared<T>,
    sc: &mut Scratch<T>,
) {
    let s = &c.s;
    let d = s.head_dim;
    let nh_t = heads.len();
    let ninf = T::neg_infinity();
    let step = q_step(nh_t, d);
    for i0 in rows.clone().step_by(step) {
        let i1 = (i0 + step).min(rows.end);
        let nq = i1 - i0;
        let mrows = nh_t * nq;
        let (jlo, jhi) = c.block_range(b, i0, i1);
        let acc = &mut sc.acc[..mrows * d];
        acc.fill(T::zero());
        let (m, l) = (&mut sc.m[..mrows], &mut sc.l[..mrows]);
        m.fill(ninf);
        l.fill(T::zero());
        if jlo < jhi {
            c.pack(c.q, &mut sc.qp, b, heads.clone(), i0, nq);
        }
        let qp = &sc.qp[..mrows * d];
        let mut j0 = jlo;
        while j0 < jhi {
            let j1 = (j0 + BK).min(jhi);
            let nk = j1 - j0;
            if c.block_needed(b, i0, i1, j0, j1) {
                let sblk = &mut sc.s[..mrows * nk];
                matmul(
                    mrows,
                    nk,
                    d,
                    Mat { data: qp, ld: d, trans: false },
                    Mat { data: &c.k[c.k_off(b, j0, g)..], ld: c.ldk, trans: true },
                    sblk,
                    nk,
                    false,
                );
                let mut any = false;
                for (rr, row) in sblk.chunks_exact_mut(nk).enumerate() {
                    c.mask_row(row, b, i0 + rr % nq, j0);
                    let mx = row_max(row);
                    if mx == ninf {
                        row.fill(T::zero());
                        continue;
                    }
                    any = true;
                    let m_new = m[rr].max(mx);
                    let alpha = if m_new == m[rr] { T::one() } else { (m[rr] - m_new).exp() };
                    let sum = exp_shift_sum(row, m_new);
                    l[rr] = l[rr] * alpha + sum;
                    if alpha != T::one() {
                        acc[rr * d..(rr + 1) * d].iter_mut().for_each(|x| *x *= alpha);
                    }
                    m[rr] = m_new;
                }
                if any {
                    matmul(
                        mrows,
                        d,
                        nk,
                        Mat { data: sblk, ld: nk, trans: false },
                        Mat { data: &c.v[c.k_off(b, j0, g)..], ld: c.ldk, trans: false },
                        acc,
                        d,
                        true,
                    );
                }
            }
            j0 = j1;
        }
        for (hl, h) in heads.clone().enumerate() {
            for r in 0..nq {
                let rr = hl * nq + r;
                // SAFETY: tasks partition the (batch, position, head) triples, and this task
                // owns (b, i0 + r, h); each is written once, here.
                let (dst, lse_i) = unsafe { (out.slice(c.q_off(b, i0 + r, h), d), &mut lse.slice((b * s.n_heads + h) * s.q_len + i0 + r, 1)[0]) };
                let src = &acc[rr * d..(rr + 1) * d];
                if l[rr] > T::zero() {
                    let inv = T::one() / l[rr];
                    dst.iter_mut().zip(src).for_each(|(x, &y)| *x = y * inv);
                    *lse_i = m[rr] + l[rr].ln();
                } else {
                    dst.fill(T::zero());
                    *lse_i = ninf;
                }
            }
        }
    }
}

/// Gradients given d_out (like out). dq like q; dk, dv like k/v ([batch, kv_cap, n_kv_heads,
/// head_dim]; positions ≥ kv_len left zero). Overwrites dq/dk/dv (not accumulate).
/// `out` and `lse` must be what [`attention_forward`] returned for the same inputs.
///
/// Panics (assert) on inconsistent sizes: internal misuse, callers validate user input first.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Float>(
    s: &AttnShape,
    m: &AttnMask,
    scale: T,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[T],
    d_out: &[T],
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    let c = Ctx::new(s, m, scale, q, k, v);
    assert_eq!(out.len(), s.q_elems(), "attention: out length");
    assert_eq!(d_out.len(), s.q_elems(), "attention: d_out length");
    assert_eq!(lse.len(), s.lse_elems(), "attention: lse length");
    assert_eq!(dq.len(), s.q_elems(), "attention: dq length");
    assert_eq!(dk.len(), s.kv_elems(), "attention: dk length");
    assert_eq!(dv.len(), s.kv_elems(), "attention: dv length");
    if s.batch == 0 || s.q_len == 0 || s.kv_len == 0 {
        dq.fill(T::zero());
        dk.fill(T::zero());
        dv.fill(T::zero());
        return;
    }
    let (tq, d, nkv, kvl, cap) = (s.q_len, s.head_dim, s.n_kv_heads, s.kv_len, s.kv_cap);
    let group = s.n_heads / nkv;
    // Tasks: (batch, kv head, slice of its query heads, chunk of query positions). Slices, then
    // chunks, only when there are too few (batch, kv head) pairs to keep the threads busy: the
    // `parts` tasks of one KV head then accumulate dK/dV in buffers of their own that are summed
    // afterwards (memory: 2·parts·kv_len·head_dim per pair, hence the modest target).
    let bg = s.batch * nkv;
    let want = 2 * rayon::current_num_threads();
    let splits = want.div_ceil(bg).clamp(1, group);
    let n_blocks = tq.div_ceil(BQ);
    let chunks = want.div_ceil(bg * splits).clamp(1, n_blocks);
    let rows_per_chunk = n_blocks.div_ceil(chunks) * BQ;
    let chunks = tq.div_ceil(rows_per_chunk);
    let parts = splits * chunks;
    let part_len = if parts > 1 { bg * parts * kvl * d } else { 0 };
    let mut dk_part = vec![T::zero(); part_len];
    let mut dv_part = vec![T::zero(); part_len];
    let mut part_iter = dk_part.chunks_mut(kvl * d).zip(dv_part.chunks_mut(kvl * d));
    let mut tasks = Vec::with_capacity(bg * parts);
    for b in 0..s.batch {
        for g in 0..nkv {
            for sp in 0..splits {
                for ch in 0..chunks {
                    let hl = head_slice(group, splits, sp);
                    let rows = ch * rows_per_chunk..((ch + 1) * rows_per_chunk).min(tq);
                    let part = if parts > 1 { Some(part_iter.next().expect("one dK/dV part per task")) } else { None };
                    tasks.push((b, g, g * group + hl.start..g * group + hl.end, rows, part));
                }
            }
        }
    }
    let (dq_w, dk_w, dv_w) = (Shared::new(dq), Shared::new(dk), Shared::new(dv));
    tasks.into_par_iter().for_each_init(
        || {
            let own = if parts == 1 { kvl * d } else { 0 };
            (Scratch::new(s, true), vec![T::zero(); own], vec![T::zero(); own])
        },
        |(sc, dk_own, dv_own), (b, g, heads, rows, part)| match part {
            Some((dk_p, dv_p)) => backward_task(&c, b, g, heads, rows, out, lse, d_out, &dq_w, dk_p, dv_p, sc),
            None => {
                backward_task(&c, b, g, heads, rows, out, lse, d_out, &dq_w, dk_own, dv_own, sc);
                for j in 0..cap {
                    let off = c.k_off(b, j, g);
                    // SAFETY: with one part per pair, (b, g) has exactly one task, this one, which
                    // owns the dK/dV rows (b, j, g) for every j.
                    let (dkr, dvr) = unsafe { (dk_w.slice(off, d), dv_w.slice(off, d)) };
                    if j < kvl {
                        dkr.copy_from_slice(&dk_own[j * d..(j + 1) * d]);
                        dvr.copy_from_slice(&dv_own[j * d..(j + 1) * d]);
                    } else {
                        dkr.fill(T::zero());
                        dvr.fill(T::zero());
                    }
                }
            }
        },
    );
    if parts == 1 {
        return;
    }
    // Sum the slices' parts (the parallel section is over: plain safe access again).
    dk.par_chunks_mut(nkv * d).zip(dv.par_chunks_mut(nkv * d)).enumerate().for_each(|(row, (dkr, dvr))| {
        let (b, j) = (row / cap, row % cap);
        if j >= kvl {
            dkr.fill(T::zero());
            dvr.fill(T::zero());
            return;
        }
        for g in 0..nkv {
            let (dkd, dvd) = (&mut dkr[g * d..(g + 1) * d], &mut dvr[g * d..(g + 1) * d]);
            for sp in 0..parts {
                let src = (((b * nkv + g) * parts + sp) * kvl + j) * d;
                let (ks, vs) = (&dk_part[src..src + d], &dv_part[src..src + d]);
                if sp == 0 {
                    dkd.copy_from_slice(ks);
                    dvd.copy_from_slice(vs);
                } else {
                    dkd.iter_mut().zip(ks).for_each(|(x, &y)| *x += y);
                    dvd.iter_mut().zip(vs).for_each(|(x, &y)| *x += y);
                }
            }
        }
    });
}

/// Backward for batch `b`, query heads `heads` (all reading KV head `g`), query positions `rows`:
/// writes their dQ rows (exactly those (position, head) pairs) through `dq`, and accumulates their
/// contribution to dK/dV of (b, g) into `dk`/`dv` (`[kv_len, head_dim]`, zeroed here first).
#[allow(clippy::too_many_arguments)]
fn backward_task<T: Float>(
    c: &Ctx<T>,
    b: usize,
    g: usize,
    heads: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
    out: &[T],
    lse: &[T],
    d_out: &[T],
    dq: &Shared<T>,
    dk: &mut [T],
    dv: &mut [T],
    sc: &mut Scratch<T>,
) {
    let s = &c.s;
    let (tq, d) = (s.q_len, s.head_dim);
    let nh_t = heads.len();
    let ninf = T::neg_infinity();
    let scale = c.scale;
    dk.fill(T::zero());
    dv.fill(T::zero());
    let step = q_step(nh_t, d);
    for i0 in rows.clone().step_by(step) {
        let i1 = (i0 + step).min(rows.end);
        let nq = i1 - i0;
        let mrows = nh_t * nq;
        let dqp = &mut sc.dqp[..mrows * d];
        dqp.fill(T::zero());
        let (jlo, jhi) = c.block_range(b, i0, i1);
        if jlo < jhi {
            c.pack(c.q, &mut sc.qp, b, heads.clone(), i0, nq);
            c.pack(d_out, &mut sc.acc, b, heads.clone(), i0, nq);
            // Per row: D = rowsum(dO ∘ O) (in sc.m) and the saved lse (in sc.l).
            for (hl, h) in heads.clone().enumerate() {
                for r in 0..nq {
                    let off = c.q_off(b, i0 + r, h);
                    sc.m[hl * nq + r] = d_out[off..off + d].iter().zip(&out[off..off + d]).map(|(&x, &y)| x * y).sum();
                    sc.l[hl * nq + r] = lse[(b * s.n_heads + h) * tq + i0 + r];
                }
            }
        }
        let (qp, dop) = (&sc.qp[..mrows * d], &sc.acc[..mrows * d]);
        let mut j0 = jlo;
        while j0 < jhi {
            let j1 = (j0 + BK).min(jhi);
            let nk = j1 - j0;
            if !c.block_needed(b, i0, i1, j0, j1) {
                j0 = j1;
                continue;
            }
            let ko = c.k_off(b, j0, g);
            let p = &mut sc.s[..mrows * nk];
            // P = exp(scale·Q Kᵀ + mask − lse)
            matmul(mrows, nk, d, Mat { data: qp, ld: d, trans: false }, Mat { data: &c.k[ko..], ld: c.ldk, trans: true }, p, nk, false);
            for (rr, row) in p.chunks_exact_mut(nk).enumerate() {
                let l = sc.l[rr];
                if l == ninf {
                    row.fill(T::zero());
                    continue;
                }
                c.mask_row(row, b, i0 + rr % nq, j0);
                exp_shift_sum(row, l);
            }
            // dV += Pᵀ dO
            matmul(nk, d, mrows, Mat { data: p, ld: nk, trans: true }, Mat { data: dop, ld: d, trans: false }, &mut dv[j0 * d..], d, true);
            // dP = dO Vᵀ
            let dp = &mut sc.dp[..mrows * nk];
            matmul(mrows, nk, d, Mat { data: dop, ld: d, trans: false }, Mat { data: &c.v[ko..], ld: c.ldk, trans: true }, dp, nk, false);
            // dS·scale = scale · P ∘ (dP − D)
            for (rr, (dpr, pr)) in dp.chunks_exact_mut(nk).zip(p.chunks_exact(nk)).enumerate() {
                let dr = sc.m[rr];
                for (x, &pv) in dpr.iter_mut().zip(pr) {
                    *x = scale * pv * (*x - dr);
                }
            }
            // dQ += scale·dS K
            matmul(mrows, d, nk, Mat { data: dp, ld: nk, trans: false }, Mat { data: &c.k[ko..], ld: c.ldk, trans: false }, dqp, d, true);
            // dK += scale·dSᵀ Q
            matmul(nk, d, mrows, Mat { data: dp, ld: nk, trans: true }, Mat { data: qp, ld: d, trans: false }, &mut dk[j0 * d..], d, true);
            j0 = j1;
        }
        for (hl, h) in heads.clone().enumerate() {
            for r in 0..nq {
                // SAFETY: tasks partition the (batch, position, head) triples and this task owns
                // (b, i0 + r, h), so that dQ row is written by this task only, once, here.
                let dst = unsafe { dq.slice(c.q_off(b, i0 + r, h), d) };
                dst.copy_from_slice(&dqp[(hl * nq + r) * d..(hl * nq + r + 1) * d]);
            }
        }
    }
}

/// `row[j] = exp(row[j] − shift)`, returning the sum of the results. `-inf` entries become 0.
#[inline]
fn exp_shift_sum<T: Float>(row: &mut [T], shift: T) -> T {
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        // SAFETY: T is f32 (identical TypeId), so this reinterprets a slice as its own type.
        let r = unsafe { std::slice::from_raw_parts_mut(row.as_mut_ptr() as *mut f32, row.len()) };
        return T::of(exp_shift_sum_f32(r, shift.f64() as f32) as f64);
    }
    let mut sum = T::zero();
    for x in row.iter_mut() {
        *x = (*x - shift).exp();
        sum += *x;
    }
    sum
}

fn exp_shift_sum_f32(row: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { exp_shift_sum_f32_avx2(row, shift) };
        }
    }
    exp_shift_sum_f32_body::<false>(row, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shift_sum_f32_avx2(row: &mut [f32], shift: f32) -> f32 {
    exp_shift_sum_f32_body::<true>(row, shift)
}

/// Branch-free, auto-vectorisable body: 8 lanes of [`exp_f32`] and 8 partial sums.
#[inline(always)]
fn exp_shift_sum_f32_body<const FMA: bool>(row: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for ch in &mut chunks {
        for (x, a) in ch.iter_mut().zip(acc.iter_mut()) {
            *x = exp_f32::<FMA>(*x - shift);
            *a += *x;
        }
    }
    let mut sum = 0f32;
    for x in chunks.into_remainder() {
        *x = exp_f32::<FMA>(*x - shift);
        sum += *x;
    }
    sum + acc.iter().sum::<f32>()
}

/// `a·b + c`, fused where the caller is compiled with FMA (otherwise `mul_add` is a libm call).
#[inline(always)]
fn mad<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// exp(x) for f32 within a few ulp, branch-free so loops over it vectorise; 0 below −87
/// (including −inf), saturating at e^88.
#[inline(always)]
fn exp_f32<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact for |n| ≤ 128.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    // t = ROUND + n exactly, so n sits in the low bits of t's representation.
    let t = mad::<FMA>(xc, LOG2E, ROUND);
    let n = t - ROUND;
    let r = mad::<FMA>(-n, LN2_LO, mad::<FMA>(-n, LN2_HI, xc));
    // e^r on |r| ≤ ln2/2: Taylor to degree 7 (truncation < 1e-8 relative).
    let mut p = 1.0 / 5040.0;
    p = mad::<FMA>(p, r, 1.0 / 720.0);
    p = mad::<FMA>(p, r, 1.0 / 120.0);
    p = mad::<FMA>(p, r, 1.0 / 24.0);
    p = mad::<FMA>(p, r, 1.0 / 6.0);
    p = mad::<FMA>(p, r, 0.5);
    p = mad::<FMA>(p, r, 1.0);
    p = mad::<FMA>(p, r, 1.0);
    // 2ⁿ built from the bits (no float→int conversion, which would not vectorise).
    let two_n = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    let y = p * two_n;
    if x < -87.0 {
        0.0
    } else {
        y
    }
}

/// Maximum of a row (`-inf` for an empty or all `-inf` row), with 8 independent lanes so it
/// vectorises instead of forming one long dependency chain.
#[inline]
fn row_max<T: Float>(row: &[T]) -> T {
    let ninf = T::neg_infinity();
    let mut acc = [ninf; 8];
    let mut chunks = row.chunks_exact(8);
    for ch in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(ch) {
            *a = if x > *a { x } else { *a };
        }
    }
    let mut m = ninf;
    for &x in chunks.remainder().iter().chain(acc.iter()) {
        m = if x > m { x } else { m };
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random numbers in [-1, 1).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        }
        fn vec(&mut self, n: usize) -> Vec<f64> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    /// A test case: shape, masks (owned) and inputs.
    #[derive(Clone)]
    struct Case {
        s: AttnShape,
        causal: bool,
        q_offset: usize,
        key_mask: Option<Vec<u8>>,
        seg: Option<Vec<u32>>,
        window: Option<usize>,
        scale: f64,
    }

    impl Case {
        fn new(batch: usize, q_len: usize, kv_len: usize, n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Self {
            Case {
                s: AttnShape { batch, q_len, kv_len, kv_cap: kv_len, n_heads, n_kv_heads, head_dim },
                causal: false,
                q_offset: 0,
                key_mask: None,
                seg: None,
                window: None,
                scale: 1.0 / (head_dim as f64).sqrt(),
            }
        }
        fn causal(mut self) -> Self {
            self.causal = true;
            self
        }
        fn decode(mut self) -> Self {
            self.causal = true;
            self.q_offset = self.s.kv_len - self.s.q_len;
            self
        }
        fn cap(mut self, cap: usize) -> Self {
            self.s.kv_cap = cap;
            self
        }
        fn window(mut self, w: usize) -> Self {
            self.window = Some(w);
            self
        }
        fn mask(&self) -> AttnMask<'_> {
            AttnMask {
                causal: self.causal,
                q_offset: self.q_offset,
                key_mask: self.key_mask.as_deref(),
                segment_ids: self.seg.as_deref(),
                window: self.window,
            }
        }
    }

    fn visible(c: &Case, b: usize, i: usize, j: usize) -> bool {
        let cap = c.s.kv_cap;
        let p = c.q_offset + i;
        if j >= c.s.kv_len || (c.causal && j > p) {
            return false;
        }
        if let Some(w) = c.window {
            if p as i64 - j as i64 >= w as i64 {
                return false;
            }
        }
        if let Some(km) = &c.key_mask {
            if km[b * cap + j] == 0 {
                return false;
            }
        }
        if let Some(seg) = &c.seg {
            if seg[b * cap + j] != seg[b * cap + p] {
                return false;
            }
        }
        true
    }

    struct Grads {
        out: Vec<f64>,
        lse: Vec<f64>,
        dq: Vec<f64>,
        dk: Vec<f64>,
        dv: Vec<f64>,
    }

    /// Naive reference: full score rows, softmax, K/V read per query head (i.e. repeated).
    fn reference(c: &Case, q: &[f64], k: &[f64], v: &[f64], d_out: &[f64]) -> Grads {
        let s = c.s;
        let (d, nh, nkv) = (s.head_dim, s.n_heads, s.n_kv_heads);
        let qi = |b: usize, i: usize, h: usize| ((b * s.q_len + i) * nh + h) * d;
        let ki = |b: usize, j: usize, g: usize| ((b * s.kv_cap + j) * nkv + g) * d;
        let mut r = Grads {
            out: vec![0.0; q.len()],
            lse: vec![f64::NEG_INFINITY; s.batch * nh * s.q_len],
            dq: vec![0.0; q.len()],
            dk: vec![0.0; k.len()],
            dv: vec![0.0; v.len()],
        };
        for b in 0..s.batch {
            for h in 0..nh {
                let g = h / (nh / nkv);
                for i in 0..s.q_len {
                    let js: Vec<usize> = (0..s.kv_len).filter(|&j| visible(c, b, i, j)).collect();
                    if js.is_empty() {
                        continue;
                    }
                    let sc: Vec<f64> = js
                        .iter()
                        .map(|&j| c.scale * (0..d).map(|e| q[qi(b, i, h) + e] * k[ki(b, j, g) + e]).sum::<f64>())
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                    let p: Vec<f64> = sc.iter().map(|x| (x - mx).exp() / z).collect();
                    r.lse[(b * nh + h) * s.q_len + i] = mx + z.ln();
                    for (t, &j) in js.iter().enumerate() {
                        for e in 0..d {
                            r.out[qi(b, i, h) + e] += p[t] * v[ki(b, j, g) + e];
                        }
                    }
                    // Backward, with the softmax Jacobian written out (D = Σ P dP, not dO·O).
                    let dp: Vec<f64> =
                        js.iter().map(|&j| (0..d).map(|e| d_out[qi(b, i, h) + e] * v[ki(b, j, g) + e]).sum()).collect();
                    let dsum: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                    for (t, &j) in js.iter().enumerate() {
                        let ds = p[t] * (dp[t] - dsum);
                        for e in 0..d {
                            r.dq[qi(b, i, h) + e] += c.scale * ds * k[ki(b, j, g) + e];
                            r.dk[ki(b, j, g) + e] += c.scale * ds * q[qi(b, i, h) + e];
                            r.dv[ki(b, j, g) + e] += p[t] * d_out[qi(b, i, h) + e];
                        }
                    }
                }
            }
        }
        r
    }

    /// Runs the blockwise kernels. dq/dk/dv start as NaN to check they are fully overwritten.
    fn run<T: Float>(c: &Case, q: &[f64], k: &[f64], v: &[f64], d_out: &[f64]) -> Grads {
        let cv = |x: &[f64]| x.iter().map(|&y| T::of(y)).collect::<Vec<T>>();
        let back = |x: Vec<T>| x.into_iter().map(|y| y.f64()).collect::<Vec<f64>>();
        let (q, k, v, d_out) = (cv(q), cv(k), cv(v), cv(d_out));
        let s = c.s;
        let m = c.mask();
        let scale = T::of(c.scale);
        let mut out = vec![T::nan(); s.q_elems()];
        let mut lse = vec![T::nan(); s.lse_elems()];
        attention_forward(&s, &m, scale, &q, &k, &v, &mut out, &mut lse);
        let mut dq = vec![T::nan(); s.q_elems()];
        let mut dk = vec![T::nan(); s.kv_elems()];
        let mut dv = vec![T::nan(); s.kv_elems()];
        attention_backward(&s, &m, scale, &q, &k, &v, &out, &lse, &d_out, &mut dq, &mut dk, &mut dv);
        Grads { out: back(out), lse: back(lse), dq: back(dq), dk: back(dk), dv: back(dv) }
    }

    /// Random inputs; K/V positions ≥ kv_len hold NaN (they must never be read).
    fn inputs(c: &Case, seed: u64) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let s = c.s;
        let mut rng = Rng(seed | 1);
        let q: Vec<f64> = rng.vec(s.q_elems()).iter().map(|x| 2.0 * x).collect();
        let mut k: Vec<f64> = rng.vec(s.kv_elems()).iter().map(|x| 2.0 * x).collect();
        let mut v = rng.vec(s.kv_elems());
        let d_out = rng.vec(s.q_elems());
        let row = s.n_kv_heads * s.head_dim;
        for b in 0..s.batch {
            for j in s.kv_len..s.kv_cap {
                for e in 0..row {
                    k[(b * s.kv_cap + j) * row + e] = f64::NAN;
                    v[(b * s.kv_cap + j) * row + e] = f64::NAN;
                }
            }
        }
        (q, k, v, d_out)
    }

    fn assert_close(what: &str, name: &str, got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "{what}: {name} length");
        for (n, (&x, &y)) in got.iter().zip(want).enumerate() {
            let ok = if y.is_infinite() { x == y } else { (x - y).abs() <= tol * (1.0 + y.abs()) };
            assert!(ok, "{what}: {name}[{n}] = {x}, want {y}");
        }
    }

    fn check(what: &str, c: &Case) {
        let (q, k, v, d_out) = inputs(c, 0x9e37_79b9 ^ (c.s.q_len * 131 + c.s.kv_len * 7 + c.s.n_heads) as u64);
        let want = reference(c, &q, &k, &v, &d_out);
        let got = run::<f64>(c, &q, &k, &v, &d_out);
        assert_close(what, "out", &got.out, &want.out, 1e-12);
        assert_close(what, "lse", &got.lse, &want.lse, 1e-12);
        assert_close(what, "dq", &got.dq, &want.dq, 1e-12);
        assert_close(what, "dk", &got.dk, &want.dk, 1e-12);
        assert_close(what, "dv", &got.dv, &want.dv, 1e-12);
    }

    #[test]
    fn plain_and_causal_match_reference() {
        for &t in &[1, 31, 32, 33, 63, 64, 65, 100, 129] {
            check(&format!("full t={t}"), &Case::new(2, t, t, 2, 2, 8));
            check(&format!("causal t={t}"), &Case::new(2, t, t, 2, 2, 8).causal());
        }
    }

    #[test]
    fn gqa_ratios_match_reference() {
        for &(h, kv) in &[(4, 4), (4, 2), (8, 2), (4, 1), (3, 1)] {
            check(&format!("gqa {h}/{kv}"), &Case::new(2, 37, 37, h, kv, 8));
            check(&format!("gqa causal {h}/{kv}"), &Case::new(2, 70, 70, h, kv, 8).causal());
        }
    }

    #[test]
    fn head_dim_64_matches_reference() {
        check("d64", &Case::new(1, 65, 65, 4, 2, 64).causal());
        check("d64 full", &Case::new(2, 33, 33, 2, 1, 64));
    }

    #[test]
    fn decode_and_offsets_match_reference() {
        check("decode 1", &Case::new(2, 1, 40, 4, 2, 8).decode());
        check("decode 1 long", &Case::new(1, 1, 200, 4, 1, 8).decode());
        check("decode 3", &Case::new(2, 3, 70, 4, 2, 8).decode());
        check("decode 3 cap", &Case::new(2, 3, 70, 4, 2, 8).decode().cap(90));
        check("decode 1 cap window", &Case::new(2, 1, 150, 4, 2, 8).decode().cap(160).window(20));
        check("chunked prefill", &Case::new(1, 40, 100, 2, 1, 8).decode());
        check("q longer than kv", &Case::new(2, 5, 3, 2, 1, 8));
        check("q shorter, offset 0, non-causal", &Case::new(2, 3, 70, 2, 2, 8));
        check("empty kv", &Case::new(2, 3, 0, 2, 1, 8).cap(4));
    }

    #[test]
    fn kv_cap_beyond_kv_len_is_ignored() {
        check("cap", &Case::new(2, 33, 33, 4, 2, 8).cap(50));
        check("cap causal", &Case::new(2, 65, 65, 4, 2, 8).causal().cap(100));
    }

    #[test]
    fn key_padding_matches_reference() {
        let (t, cap) = (45, 48);
        let mut km = vec![1u8; 4 * cap];
        km[t - 5..t].fill(0); // batch 0: right padding
        km[cap..cap + 7].fill(0); // batch 1: left padding
        km[2 * cap..3 * cap].fill(0); // batch 2: fully padded → zeros, lse = -inf
        km[3 * cap + 10] = 0; // batch 3: a hole
        km[3 * cap + 30] = 0;
        for causal in [false, true] {
            let mut c = Case::new(4, t, t, 4, 2, 8).cap(cap);
            c.causal = causal;
            c.key_mask = Some(km.clone());
            check(&format!("padding causal={causal}"), &c);
            let (q, k, v, d_out) = inputs(&c, 5);
            let got = run::<f64>(&c, &q, &k, &v, &d_out);
            let (nh, d) = (c.s.n_heads, c.s.head_dim);
            assert!(got.out[2 * t * nh * d..3 * t * nh * d].iter().all(|&x| x == 0.0));
            assert!(got.dq[2 * t * nh * d..3 * t * nh * d].iter().all(|&x| x == 0.0));
            assert!(got.lse[2 * nh * t..3 * nh * t].iter().all(|&x| x == f64::NEG_INFINITY));
            let row = c.s.n_kv_heads * d;
            assert!(got.dk[2 * cap * row..3 * cap * row].iter().all(|&x| x == 0.0));
            // Padded keys get no gradient.
            assert!(got.dk[(t - 5) * row..cap * row].iter().all(|&x| x == 0.0));
            assert!(got.dv[(cap) * row..(cap + 7) * row].iter().all(|&x| x == 0.0));
        }
    }

    fn three_segments(batch: usize, lens: &[usize], cap: usize) -> Vec<u32> {
        let mut seg = Vec::new();
        for b in 0..batch {
            let mut row: Vec<u32> = lens.iter().enumerate().flat_map(|(n, &l)| std::iter::repeat_n((n + 10 * b) as u32, l)).collect();
            row.resize(cap, 99);
            seg.extend(row);
        }
        seg
    }

    #[test]
    fn segments_match_reference() {
        let lens = [10, 40, 17];
        let t: usize = lens.iter().sum();
        for causal in [false, true] {
            let mut c = Case::new(2, t, t, 4, 2, 8).cap(t + 3);
            c.causal = causal;
            c.seg = Some(three_segments(2, &lens, t + 3));
            check(&format!("segments causal={causal}"), &c);
        }
        // Non-contiguous ids (same id in two runs) still follow the per-key rule.
        let mut c = Case::new(1, 20, 20, 2, 1, 8).causal();
        c.seg = Some((0..20).map(|j| ((j / 5) % 2) as u32).collect());
        check("segments interleaved", &c);
    }

    #[test]
    fn sliding_window_matches_reference() {
        for &w in &[1, 5, 32, 64, 100] {
            check(&format!("window {w} causal"), &Case::new(2, 100, 100, 4, 2, 8).causal().window(w));
        }
        check("window 7 full", &Case::new(2, 50, 50, 2, 2, 8).window(7));
        check("window 0 causal", &Case::new(1, 10, 10, 2, 2, 8).causal().window(0));
    }

    #[test]
    fn everything_combined_matches_reference() {
        let lens = [30, 50, 20];
        let t: usize = lens.iter().sum();
        let cap = t + 5;
        let mut c = Case::new(2, t, t, 8, 2, 8).causal().cap(cap).window(24);
        c.seg = Some(three_segments(2, &lens, cap));
        let mut km = vec![1u8; 2 * cap];
        km[..4].fill(0);
        km[cap + t - 6..cap + t].fill(0);
        c.key_mask = Some(km);
        check("combined", &c);
    }

    #[test]
    fn thread_counts_and_task_splits_agree() {
        // Few (batch, head) pairs on many threads: query chunks in forward, head splits in backward.
        for threads in [1, 3, 8, 16] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                check(&format!("threads={threads}"), &Case::new(1, 200, 200, 8, 2, 8).causal());
                check(&format!("threads={threads} mqa"), &Case::new(1, 130, 130, 4, 1, 8));
                check(&format!("threads={threads} decode"), &Case::new(1, 1, 150, 8, 2, 16).decode().cap(160));
                check(&format!("threads={threads} decode 4"), &Case::new(2, 4, 150, 8, 4, 16).decode());
            });
        }
    }

    #[test]
    fn finite_differences_agree_with_backward() {
        let mut c = Case::new(2, 5, 7, 4, 2, 3).causal().window(4);
        c.q_offset = 2;
        c.key_mask = Some(vec![1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1]);
        let (q, k, v, w) = inputs(&c, 77);
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            let g = run::<f64>(&c, q, k, v, &w);
            g.out.iter().zip(&w).map(|(a, b)| a * b).sum()
        };
        let g = run::<f64>(&c, &q, &k, &v, &w);
        let eps = 1e-5;
        let mut checked = 0;
        for which in 0..3 {
            let (base, grad) = match which {
                0 => (&q, &g.dq),
                1 => (&k, &g.dk),
                _ => (&v, &g.dv),
            };
            for n in 0..base.len() {
                let mut plus = base.clone();
                let mut minus = base.clone();
                plus[n] += eps;
                minus[n] -= eps;
                let (lp, lm) = match which {
                    0 => (loss(&plus, &k, &v), loss(&minus, &k, &v)),
                    1 => (loss(&q, &plus, &v), loss(&q, &minus, &v)),
                    _ => (loss(&q, &k, &plus), loss(&q, &k, &minus)),
                };
                let fd = (lp - lm) / (2.0 * eps);
                let rel = (fd - grad[n]).abs() / grad[n].abs().max(1e-2);
                assert!(rel < 1e-6, "tensor {which} element {n}: fd {fd} vs backward {}", grad[n]);
                checked += 1;
            }
        }
        assert_eq!(checked, 2 * 5 * 4 * 3 + 2 * 2 * 7 * 2 * 3);
    }

    #[test]
    fn packed_equals_unpacked() {
        let (la, lb) = (13usize, 20usize);
        let (nh, nkv, d) = (4, 2, 8);
        let t = la + lb;
        let mut packed = Case::new(1, t, t, nh, nkv, d).causal();
        packed.seg = Some([vec![0u32; la], vec![1u32; lb]].concat());
        let (q, k, v, d_out) = inputs(&packed, 1234);
        let gp = run::<f64>(&packed, &q, &k, &v, &d_out);
        let (qrow, krow) = (nh * d, nkv * d);
        for (start, len) in [(0, la), (la, lb)] {
            let single = Case::new(1, len, len, nh, nkv, d).causal();
            let qs = &q[start * qrow..(start + len) * qrow];
            let ks = &k[start * krow..(start + len) * krow];
            let vs = &v[start * krow..(start + len) * krow];
            let ds = &d_out[start * qrow..(start + len) * qrow];
            let gs = run::<f64>(&single, qs, ks, vs, ds);
            let what = format!("segment at {start}");
            assert_close(&what, "out", &gp.out[start * qrow..(start + len) * qrow], &gs.out, 1e-12);
            assert_close(&what, "dq", &gp.dq[start * qrow..(start + len) * qrow], &gs.dq, 1e-12);
            assert_close(&what, "dk", &gp.dk[start * krow..(start + len) * krow], &gs.dk, 1e-12);
            assert_close(&what, "dv", &gp.dv[start * krow..(start + len) * krow], &gs.dv, 1e-12);
            for h in 0..nh {
                assert_close(&what, "lse", &gp.lse[h * t + start..h * t + start + len], &gs.lse[h * len..(h + 1) * len], 1e-12);
            }
        }
    }

    #[test]
    fn f32_matches_f64() {
        let mut cases = vec![
            Case::new(2, 100, 100, 4, 2, 32).causal(),
            Case::new(1, 77, 77, 2, 1, 64),
            Case::new(2, 3, 90, 4, 2, 16).decode().cap(96),
        ];
        let mut c = Case::new(2, 60, 60, 2, 1, 8).causal().window(9);
        c.key_mask = Some([vec![0u8; 5], vec![1u8; 115]].concat());
        cases.push(c);
        for (n, c) in cases.iter().enumerate() {
            let (q, k, v, d_out) = inputs(c, 99 + n as u64);
            let g64 = run::<f64>(c, &q, &k, &v, &d_out);
            let g32 = run::<f32>(c, &q, &k, &v, &d_out);
            let what = format!("f32 case {n}");
            for (x, y) in g32.out.iter().zip(&g64.out) {
                assert!((x - y).abs() < 1e-5, "{what}: out {x} vs {y}");
            }
            assert_close(&what, "lse", &g32.lse, &g64.lse, 1e-5);
            assert_close(&what, "dq", &g32.dq, &g64.dq, 1e-4);
            assert_close(&what, "dk", &g32.dk, &g64.dk, 1e-4);
            assert_close(&what, "dv", &g32.dv, &g64.dv, 1e-4);
        }
    }

    #[test]
    fn exp_f32_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 10.0 {
            let want = (x as f64).exp();
            let rel = ((exp_f32::<false>(x) as f64) - want).abs() / want;
            worst = worst.max(rel);
            x += 0.001_3;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp_f32::<false>(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32::<false>(-90.0), 0.0);
        // The dispatched (SIMD / FMA where available) path over a long row.
        let xs: Vec<f32> = (0..20_001).map(|n| -95.0 + n as f32 * 0.005).collect();
        let mut row = xs.clone();
        let sum = exp_shift_sum(&mut row, 0.5f32);
        let mut want_sum = 0f64;
        for (&x, &y) in xs.iter().zip(&row) {
            let want = if x - 0.5 < -87.0 { 0.0 } else { ((x - 0.5) as f64).exp() };
            want_sum += want;
            assert!((y as f64 - want).abs() <= 5e-7 * want, "exp({}) = {y}, want {want}", x - 0.5);
        }
        assert!((sum as f64 - want_sum).abs() < 1e-5 * want_sum);
        let mut row = vec![0.0f32, -1.0, f32::NEG_INFINITY, 2.0, -3.0, 0.5, -0.25, 1.0, -2.0, 3.0];
        let want: f64 = row.iter().map(|&x| ((x - 1.0) as f64).exp()).sum();
        let got = exp_shift_sum(&mut row, 1.0f32);
        assert!((got as f64 - want).abs() < 1e-6 * want);
        assert_eq!(row[2], 0.0);
    }

    /// Timing sanity (not a pass/fail test), f32, on 1 thread and on rayon's default pool:
    /// `cargo test --release -p temper-runtime -- --ignored --nocapture attention_timing`.
    /// Minimum and median of 50 runs (the minimum is the useful number on a busy machine).
    #[test]
    #[ignore]
    fn attention_timing() {
        let (b, t, h, kv, d) = (4, 256, 8, 4, 32);
        let threads = [1, rayon::current_num_threads()];
        for (n, &nt) in threads.iter().enumerate() {
            if n == 1 && nt == 1 {
                break;
            }
            let pool = rayon::ThreadPoolBuilder::new().num_threads(nt).build().unwrap();
            for causal in [false, true] {
                let mut c = Case::new(b, t, t, h, kv, d);
                c.causal = causal;
                let s = c.s;
                let m = c.mask();
                let (q, k, v, d_out) = inputs(&c, 3);
                let cv = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
                let (q, k, v, d_out) = (cv(&q), cv(&k), cv(&v), cv(&d_out));
                let scale = c.scale as f32;
                let mut out = vec![0f32; s.q_elems()];
                let mut lse = vec![0f32; s.lse_elems()];
                let mut dq = vec![0f32; s.q_elems()];
                let mut dk = vec![0f32; s.kv_elems()];
                let mut dv = vec![0f32; s.kv_elems()];
                let (mut fwd, mut both) = (Vec::new(), Vec::new());
                pool.install(|| {
                    for _ in 0..53 {
                        let t0 = std::time::Instant::now();
                        attention_forward(&s, &m, scale, &q, &k, &v, &mut out, &mut lse);
                        let t1 = std::time::Instant::now();
                        attention_backward(&s, &m, scale, &q, &k, &v, &out, &lse, &d_out, &mut dq, &mut dk, &mut dv);
                        let t2 = std::time::Instant::now();
                        fwd.push((t1 - t0).as_secs_f64() * 1e3);
                        both.push((t2 - t0).as_secs_f64() * 1e3);
                    }
                });
                // The first runs warm up.
                let (mut fwd, mut both) = (fwd.split_off(3), both.split_off(3));
                fwd.sort_by(|a, b| a.partial_cmp(b).unwrap());
                both.sort_by(|a, b| a.partial_cmp(b).unwrap());
                println!(
                    "attention f32 B={b} T={t} H={h} KV={kv} D={d} causal={causal} threads={nt}: \
                     forward min {:.2} ms (median {:.2}), forward+backward min {:.2} ms (median {:.2})",
                    fwd[0],
                    fwd[fwd.len() / 2],
                    both[0],
                    both[both.len() / 2]
                );
            }
        }
    }
}
