// attention.cu — scaled dot-product attention (forward, backward, split-KV decode) with causal,
// key-padding, packed-segment and sliding-window masks and GQA.
//
// Layouts (row-major, contiguous):
//   Q, O, dO, dQ : [batch, q_len, n_heads, D]
//   K, V, dK, dV : [batch, kv_cap, n_kv_heads, D]   (positions j < kv_len are used; dK/dV rows j >= kv_len are 0)
//   lse, Dv      : [batch, n_heads, q_len]  F32 for every storage dtype (the op layer only hands lse back to the
//                  backward, runtime/src/ops/attention.rs)
//   key_mask U8 [batch, kv_cap] (1 = real key), segment_ids U32 [batch, kv_cap]; either may be null.
// Head h reads KV head g = h / (n_heads / n_kv_heads); K/V are never repeated.
// Query i sits at key position p = q_offset + i. Key j is visible from query i iff j < kv_len and
//   (!causal || j <= p) && (!key_mask || key_mask[j]) && (!seg || seg[j] == seg[p]) && (window < 0 || p - j < window).
//
// Forward:  S = scale·Q Kᵀ + M,  lse = log Σ_j exp(S_j),  O = exp(S − lse) V.
//           A query that sees no key gets O = 0 and lse = −inf (the CPU backend's rule).
// Backward: P = exp(S − lse) (0 where lse = −inf), D = rowsum(dO ∘ O),
//           dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − D),  dQ = scale·dS K,  dK = scale·dSᵀ Q.
//
// Kernels (all math in f32):
//   attention_fwd_mma{64,128}_bf16  flash forward, bf16 tensor cores (mma.sync m16n8k16, f32 accumulate): one CTA
//                                   (4 warps) per (batch, head, 64 queries), K/V tiles of 64 keys in shared memory,
//                                   online softmax in registers, scores in base 2 (exp2f). A tile whose 64×64
//                                   pairs are all visible (no padding/segments, inside causality and window:
//                                   tile_full) skips the per-element mask; the backward does the same.
//   attention_fwd_simt{2,4,8}_<T>   tiled SIMT forward for any dtype and D <= 32·DC: one CTA per (batch, kv head,
//                                   32 rows of the stacked (group head, query) rows, key split); with nsplit > 1 it
//                                   writes per-split partial (O, lse) that attention_combine merges (decode path).
//   attention_combine                merges split-KV partials with their lse's.
//   attention_bwd_dot_<T>            Dv = rowsum(dO ∘ O).
//   attention_bwd_mma{64,128}_bf16  flash backward on bf16 tensor cores: one CTA (4 warps) per (batch, kv head, 64 keys)
//                                   owns dK/dV in registers (f32), loops over tiles of 64 (D=64) / 32 (D=128) of the
//                                   group's stacked (head, query) rows: Sᵀ = K Qᵀ, dPᵀ = V dOᵀ, dV += Pᵀ dO, dK += dSᵀ Q
//                                   (P, dS rounded to bf16 as MMA operands), dQ += dS K through smem and f32 atomics.
//   attention_bwd_simt{2,4}_<T>      flash backward: one CTA per (batch, kv head, 32 keys) owns dK/dV in registers,
//                                   loops over the 32-row tiles of all the group's (head, query) rows, adds dQ with
//                                   f32 atomics into an F32 scratch (dQ is thus not bitwise deterministic).
//   attention_cast_<T>               F32 scratch -> T.
//   attention_ref_fwd_<T>, attention_ref_bwd_<T>: one warp per (batch, head, query), two passes over the keys
//                                   (D <= 256); the backward adds dK/dV with f32 atomics.

struct AttnArgs {
    int batch, q_len, kv_len, kv_cap, nh, nkv, D, causal, q_off;
    long long window;  // < 0: none
    const u8* km;
    const u32* seg;
    float scale;
};

#define ATTN_PARAMS                                                                                                  \
    int batch, int q_len, int kv_len, int kv_cap, int nh, int nkv, int D, const u8 *km, const u32 *seg, int causal, \
        int q_off, long long window, float scale
#define ATTN_MAKE AttnArgs a{batch, q_len, kv_len, kv_cap, nh, nkv, D, causal, q_off, window, km, seg, scale};
#define ATTN_PASS batch, q_len, kv_len, kv_cap, nh, nkv, D, km, seg, causal, q_off, window, scale

// Key j of batch b exists and is not padding.
__device__ __forceinline__ bool key_ok(const AttnArgs& a, int b, int j) {
    return j < a.kv_len && (a.km == nullptr || a.km[(i64)b * a.kv_cap + j] != 0);
}
// Position rules (causal, window) between query position p and key j.
__device__ __forceinline__ bool pos_ok(const AttnArgs& a, long long p, long long j) {
    return (!a.causal || j <= p) && (a.window < 0 || p - j < a.window);
}
__device__ __forceinline__ u32 seg_of(const AttnArgs& a, int b, long long pos) {
    return a.seg == nullptr ? 0u : a.seg[(i64)b * a.kv_cap + pos];
}

// Flags of the key tile [j0, j0 + n) for the block (threads < n each write one; the caller syncs):
// whether key j exists (below hi, not padding) and its segment id.
template <typename Flag>
__device__ __forceinline__ void key_flags(const AttnArgs& a, int b, int j0, int hi, int n, Flag* kok, u32* ksg) {
    if (threadIdx.x < n) {
        const int j = j0 + threadIdx.x;
        const bool ok = j < hi && key_ok(a, b, j);
        kok[threadIdx.x] = (Flag)ok;
        ksg[threadIdx.x] = ok ? seg_of(a, b, j) : 0u;
    }
}

// Key range [lo, hi) that queries at positions [pmin, pmax] can see under causality, window and kv_len.
__device__ __forceinline__ void key_range(const AttnArgs& a, long long pmin, long long pmax, int& lo, int& hi) {
    long long l = 0, h = a.kv_len;
    if (a.causal) h = min(h, pmax + 1);
    if (a.window >= 0) l = max(l, pmin + 1 - a.window);
    if (l > h) l = h;
    lo = (int)l;
    hi = (int)h;
}

// Narrows [lo, hi) to the span of real keys of batch b (key_mask hull); block-wide, synchronises.
__device__ __forceinline__ void mask_hull(const AttnArgs& a, int b, int& lo, int& hi, int* s2) {
    if (a.km == nullptr) return;
    if (threadIdx.x == 0) {
        s2[0] = a.kv_len;
        s2[1] = 0;
    }
    __syncthreads();
    int mn = a.kv_len, mx = 0;
    for (int j = lo + threadIdx.x; j < hi; j += blockDim.x)
        if (a.km[(i64)b * a.kv_cap + j] != 0) {
            mn = min(mn, j);
            mx = max(mx, j + 1);
        }
    if (mn < a.kv_len) atomicMin(&s2[0], mn);
    if (mx > 0) atomicMax(&s2[1], mx);
    __syncthreads();
    lo = max(lo, s2[0]);
    hi = min(hi, s2[1]);
    __syncthreads();
}

// Row r of the (group head, query) rows of KV head g: head and query index.
__device__ __forceinline__ void row_of(const AttnArgs& a, int g, int r, int& h, int& i) {
    const int group = a.nh / a.nkv;
    h = g * group + r / a.q_len;
    i = r % a.q_len;
}
// Per-row data of the backward's row tile [r0, r1) of KV head g (threads < n fill one row each; the
// caller syncs): LSE · lse_scale, D = rowsum(dO ∘ O), the row's segment and position (−1: past the end).
__device__ __forceinline__ void row_meta(const AttnArgs& a, int b, int g, int r0, int r1, int n, float lse_scale, const float* lse,
                                         const float* dvec, float* rl, float* rd, u32* rsg, int* rpos) {
    if (threadIdx.x < n) {
        const int r = r0 + threadIdx.x;
        float lv = NEG_INF, dd = 0.f;
        u32 sg = 0;
        int pos = -1;
        if (r < r1) {
            int h, i;
            row_of(a, g, r, h, i);
            const i64 li = ((i64)b * a.nh + h) * a.q_len + i;
            lv = lse[li];
            dd = dvec[li];
            pos = a.q_off + i;
            sg = seg_of(a, b, pos);
        }
        rl[threadIdx.x] = lv * lse_scale;
        rd[threadIdx.x] = dd;
        rsg[threadIdx.x] = sg;
        rpos[threadIdx.x] = pos;
    }
}

// Query positions covered by rows [r0, r1) (conservative when the rows span two heads).
__device__ __forceinline__ void pos_span(const AttnArgs& a, int r0, int r1, long long& pmin, long long& pmax) {
    int i0 = r0 % a.q_len, i1 = (r1 - 1) % a.q_len;
    if (r0 / a.q_len != (r1 - 1) / a.q_len) {
        i0 = 0;
        i1 = a.q_len - 1;
    }
    pmin = (long long)a.q_off + i0;
    pmax = (long long)a.q_off + i1;
}

// ------------------------------------------------------------------------------------------------
// bf16 tensor-core forward.
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ void mma_bf16(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<u32*>(&v);
}
__device__ __forceinline__ u32 pack_raw(bf16 lo, bf16 hi) {
    u32 l = (u32)(*reinterpret_cast<unsigned short*>(&lo));
    u32 h = (u32)(*reinterpret_cast<unsigned short*>(&hi));
    return l | (h << 16);
}
__device__ __forceinline__ u32 ld32(const bf16* p) { return *reinterpret_cast<const u32*>(p); }

#define MMA_BQ 64
#define MMA_BK 64
// The tensor-core kernels keep scores in base 2 (scores pre-multiplied by log2 e): exp2f is one
// MUFU.EX2, where expf adds a range reduction around it.
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

// Whether every (query position in [pmin, pmax], key in [j0, j0 + 64)) pair of a tile is visible
// with no per-element test: no key padding or segments, the 64 keys all exist, and causality and
// the window admit the whole rectangle. Uniform over the CTA (no divergence); most tiles of a
// long causal sequence are full, and skipping the per-element mask is most of their ALU work.
__device__ __forceinline__ bool tile_full(const AttnArgs& a, long long pmin, long long pmax, int j0, int nkeys) {
    return a.km == nullptr && a.seg == nullptr && nkeys == 64 && (!a.causal || (long long)j0 + 63 <= pmin) &&
           (a.window < 0 || pmax - j0 < a.window);
}

// Copies rows [row0, row0 + 64) of a [.., D] tensor slice (row stride `ld` elements) into smem rows of
// `LD` elements; rows >= nrows (or failing `ok`) are zero. 16-byte vectors (the host checks alignment).
template <int D, int LD>
__device__ __forceinline__ void load_tile_bf16(bf16* dst, const bf16* src, long long ld, int nvalid, const bool* ok) {
    constexpr int V = D / 8;
    for (int e = threadIdx.x; e < 64 * V; e += blockDim.x) {
        const int r = e / V, c = (e % V) * 8;
        int4 val = make_int4(0, 0, 0, 0);
        if (r < nvalid && (ok == nullptr || ok[r])) val = *reinterpret_cast<const int4*>(src + r * ld + c);
        *reinterpret_cast<int4*>(dst + r * LD + c) = val;
    }
}

template <int D>
__device__ void fwd_mma_impl(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                             bf16* __restrict__ out, float* __restrict__ lse, const AttnArgs a) {
    constexpr int LD = D + 8;
    constexpr int NT = MMA_BK / 8;   // n-tiles of S
    constexpr int DT = D / 8;        // n-tiles of O
    constexpr int KS = D / 16;       // k-steps of Q Kᵀ
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* Qs = reinterpret_cast<bf16*>(smem);
    bf16* Ks = Qs + MMA_BQ * LD;
    bf16* Vs = Ks + MMA_BK * LD;
    bool* kok = reinterpret_cast<bool*>(Vs + MMA_BK * LD);
    u32* ksg = reinterpret_cast<u32*>(kok + MMA_BK);  // kok is 64 bytes: ksg stays 4-aligned
    int* s2 = reinterpret_cast<int*>(ksg + MMA_BK);

    const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * MMA_BQ;
    const int g = h / (a.nh / a.nkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tig = lane & 3;
    const int i1 = min(i0 + MMA_BQ, a.q_len);
    const long long ldq = (long long)a.nh * D, ldk = (long long)a.nkv * D;

    load_tile_bf16<D, LD>(Qs, q + ((i64)b * a.q_len + i0) * ldq + (i64)h * D, ldq, i1 - i0, nullptr);

    // The two query rows of this thread.
    int ri[2];
    long long rp[2];
    u32 rs[2];
    bool rv[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        ri[e] = i0 + warp * 16 + gq + e * 8;
        rv[e] = ri[e] < a.q_len;
        rp[e] = (long long)a.q_off + ri[e];
        rs[e] = rv[e] ? seg_of(a, b, rp[e]) : 0u;
    }

    int lo, hi;
    key_range(a, (long long)a.q_off + i0, (long long)a.q_off + i1 - 1, lo, hi);
    mask_hull(a, b, lo, hi, s2);

    float o[DT][4];
#pragma unroll
    for (int t = 0; t < DT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[t][e] = 0.f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};

    const bool rows_full = i1 - i0 == MMA_BQ;
    const float scale2 = a.scale * LOG2E;
    for (int j0 = lo; j0 < hi; j0 += MMA_BK) {
        const int nk = min(MMA_BK, hi - j0);
        const bool full = rows_full && tile_full(a, (long long)a.q_off + i0, (long long)a.q_off + i1 - 1, j0, nk);
        __syncthreads();  // previous tile fully consumed
        if (!full) {
            key_flags(a, b, j0, hi, MMA_BK, kok, ksg);
            __syncthreads();
        }
        const bf16* kb = k + ((i64)b * a.kv_cap + j0) * ldk + (i64)g * D;
        const bf16* vb = v + ((i64)b * a.kv_cap + j0) * ldk + (i64)g * D;
        load_tile_bf16<D, LD>(Ks, kb, ldk, nk, full ? nullptr : kok);
        load_tile_bf16<D, LD>(Vs, vb, ldk, nk, full ? nullptr : kok);

        // Visibility of this thread's 32 score elements: bit t*4 + e.
        u32 vis = 0xffffffffu;
        if (full) {
            __syncthreads();  // publishes the K/V tile
        } else {
            vis = 0;
#pragma unroll
            for (int t = 0; t < NT; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int jj = t * 8 + 2 * tig + (e & 1), r = e >> 1;
                    const long long j = j0 + jj;
                    const bool ok = rv[r] && kok[jj] && pos_ok(a, rp[r], j) && (a.seg == nullptr || ksg[jj] == rs[r]);
                    vis |= (ok ? 1u : 0u) << (t * 4 + e);
                }
            if (!__syncthreads_or(vis != 0)) continue;  // also publishes the K/V tile
        }

        float s[NT][4];
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[t][e] = 0.f;
        const bf16* qa = Qs + (warp * 16 + gq) * LD + 2 * tig;
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
            const u32 a0 = ld32(qa + kk * 16), a1 = ld32(qa + 8 * LD + kk * 16);
            const u32 a2 = ld32(qa + kk * 16 + 8), a3 = ld32(qa + 8 * LD + kk * 16 + 8);
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                const bf16* kp = Ks + (t * 8 + gq) * LD + kk * 16 + 2 * tig;
                mma_bf16(s[t], a0, a1, a2, a3, ld32(kp), ld32(kp + 8));
            }
        }
        // Scale (to base 2), mask, online softmax; m is kept in base 2.
        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[t][e] = ((vis >> (t * 4 + e)) & 1u) ? s[t][e] * scale2 : NEG_INF;
                mx[e >> 1] = fmaxf(mx[e >> 1], s[t][e]);
            }
        float alpha[2], mu[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float mn = fmaxf(m[r], mx[r]);
            mu[r] = mn == NEG_INF ? 0.f : mn;
            alpha[r] = exp2f(m[r] - mu[r]);
            m[r] = mn;
        }
        float ls[2] = {0.f, 0.f};
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[t][e] = exp2f(s[t][e] - mu[e >> 1]);
                ls[e >> 1] += s[t][e];
            }
#pragma unroll
        for (int r = 0; r < 2; ++r) l[r] = l[r] * alpha[r] + ls[r];
#pragma unroll
        for (int t = 0; t < DT; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[t][e] *= alpha[e >> 1];
        // O += P V
#pragma unroll
        for (int kk = 0; kk < MMA_BK / 16; ++kk) {
            const u32 a0 = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            const u32 a1 = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            const u32 a2 = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            const u32 a3 = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            const bf16* vp = Vs + (kk * 16 + 2 * tig) * LD + gq;
#pragma unroll
            for (int t = 0; t < DT; ++t) {
                const bf16* c = vp + t * 8;
                const u32 b0 = pack_raw(c[0], c[LD]);
                const u32 b1 = pack_raw(c[8 * LD], c[9 * LD]);
                mma_bf16(o[t], a0, a1, a2, a3, b0, b1);
            }
        }
    }
    // Finish: reduce l over the quad, normalise, write.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (!rv[r]) continue;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        bf16* orow = out + ((i64)b * a.q_len + ri[r]) * ldq + (i64)h * D + 2 * tig;
#pragma unroll
        for (int t = 0; t < DT; ++t) {
            __nv_bfloat162 pr = __floats2bfloat162_rn(o[t][2 * r] * inv, o[t][2 * r + 1] * inv);
            *reinterpret_cast<__nv_bfloat162*>(orow + t * 8) = pr;
        }
        // Natural-log LSE (m is in base 2) for the backward and the split-KV combine.
        if (tig == 0) lse[((i64)b * a.nh + h) * a.q_len + ri[r]] = l[r] > 0.f ? m[r] * LN2 + logf(l[r]) : NEG_INF;
    }
}

extern "C" __global__ void __launch_bounds__(128) attention_fwd_mma64_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out,
                                                                           float* lse, ATTN_PARAMS) {
    ATTN_MAKE
    fwd_mma_impl<64>(q, k, v, out, lse, a);
}
extern "C" __global__ void __launch_bounds__(128) attention_fwd_mma128_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out,
                                                                            float* lse, ATTN_PARAMS) {
    ATTN_MAKE
    fwd_mma_impl<128>(q, k, v, out, lse, a);
}

// ------------------------------------------------------------------------------------------------
// SIMT tiled forward (any dtype, D <= 32·DC), optionally split over keys.
// Rows: r in [0, group·q_len) of KV head g is (head g·group + r / q_len, query r % q_len).
// Grid: (row_tiles · nsplit, n_kv_heads, batch), 128 threads; warp w owns rows w·8 .. w·8+7 of the tile,
// lane = key in the score phase and output dim (lane + 32c) in the P·V phase.
// smem (floats): Qs[32][D], Ks[32][D+1], Vs[32][32·DC], Ps[32][32], then kok[32], ksg[32], s2[2] ints.
// ------------------------------------------------------------------------------------------------
#define SB 32

template <typename T, int DC>
__device__ void fwd_simt_impl(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
                              float* __restrict__ lse, float* __restrict__ po, float* __restrict__ plse, int nsplit,
                              const AttnArgs a) {
    const int D = a.D, LDK = D + 1, DV = 32 * DC;
    extern __shared__ __align__(16) unsigned char smem[];
    float* Qs = reinterpret_cast<float*>(smem);
    float* Ks = Qs + SB * D;
    float* Vs = Ks + SB * LDK;
    float* Ps = Vs + SB * DV;
    int* kok = reinterpret_cast<int*>(Ps + SB * SB);
    u32* ksg = reinterpret_cast<u32*>(kok + SB);
    int* s2 = reinterpret_cast<int*>(ksg + SB);

    const int group = a.nh / a.nkv, R = group * a.q_len;
    const int split = blockIdx.x % nsplit, rt = blockIdx.x / nsplit;
    const int g = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r0 = rt * SB, r1 = min(r0 + SB, R);
    const long long ldq = (long long)a.nh * D, ldk = (long long)a.nkv * D;

    // Q tile.
    for (int e = threadIdx.x; e < SB * D; e += blockDim.x) {
        const int rr = e / D, d = e % D, r = r0 + rr;
        float val = 0.f;
        if (r < r1) {
            int h, i;
            row_of(a, g, r, h, i);
            val = to_f(q[((i64)b * a.q_len + i) * ldq + (i64)h * D + d]);
        }
        Qs[e] = val;
    }
    // This warp's rows.
    long long rp[8];
    u32 rs[8];
    bool rv[8];
#pragma unroll
    for (int x = 0; x < 8; ++x) {
        const int r = r0 + warp * 8 + x;
        rv[x] = r < r1;
        int h = 0, i = 0;
        if (rv[x]) row_of(a, g, r, h, i);
        rp[x] = (long long)a.q_off + i;
        rs[x] = rv[x] ? seg_of(a, b, rp[x]) : 0u;
    }
    long long pmin, pmax;
    pos_span(a, r0, r1, pmin, pmax);
    int lo, hi;
    key_range(a, pmin, pmax, lo, hi);
    // This split's chunk of keys.
    {
        const int chunk = ((a.kv_len + nsplit - 1) / nsplit + SB - 1) / SB * SB;
        lo = max(lo, split * chunk);
        hi = min(hi, (split + 1) * chunk);
    }
    mask_hull(a, b, lo, hi, s2);

    float acc[8][DC], m[8], l[8];
#pragma unroll
    for (int x = 0; x < 8; ++x) {
        m[x] = NEG_INF;
        l[x] = 0.f;
#pragma unroll
        for (int c = 0; c < DC; ++c) acc[x][c] = 0.f;
    }
    float* Pw = Ps + warp * 8 * SB;

    for (int j0 = lo; j0 < hi; j0 += SB) {
        __syncthreads();
        key_flags(a, b, j0, hi, SB, kok, ksg);
        __syncthreads();
        for (int e = threadIdx.x; e < SB * DV; e += blockDim.x) {
            const int jj = e / DV, d = e % DV;
            float kv = 0.f, vv = 0.f;
            if (d < D && kok[jj]) {
                const i64 off = ((i64)b * a.kv_cap + j0 + jj) * ldk + (i64)g * D + d;
                kv = to_f(k[off]);
                vv = to_f(v[off]);
            }
            if (d < D) Ks[jj * LDK + d] = kv;
            Vs[e] = vv;
        }
        const long long j = j0 + lane;
        bool vis[8];
        bool any = false;
#pragma unroll
        for (int x = 0; x < 8; ++x) {
            vis[x] = rv[x] && kok[lane] && pos_ok(a, rp[x], j) && (a.seg == nullptr || ksg[lane] == rs[x]);
            any |= vis[x];
        }
        if (!__syncthreads_or(any)) continue;
        if (!rv[0]) continue;  // a warp whose rows are all past the end (decode: few rows) has nothing to do

        float s[8];
#pragma unroll
        for (int x = 0; x < 8; ++x) s[x] = 0.f;
        const float* kr = Ks + lane * LDK;
        const float* qr = Qs + warp * 8 * D;
        for (int d = 0; d < D; ++d) {
            const float kd = kr[d];
#pragma unroll
            for (int x = 0; x < 8; ++x) s[x] = fmaf(qr[x * D + d], kd, s[x]);
        }
#pragma unroll
        for (int x = 0; x < 8; ++x) {
            const float sv = vis[x] ? s[x] * a.scale : NEG_INF;
            const float mn = fmaxf(m[x], warp_max(sv));
            const float mu = mn == NEG_INF ? 0.f : mn;
            const float alpha = expf(m[x] - mu);
            const float p = expf(sv - mu);
            l[x] = l[x] * alpha + warp_sum(p);
            m[x] = mn;
#pragma unroll
            for (int c = 0; c < DC; ++c) acc[x][c] *= alpha;
            Pw[x * SB + lane] = p;
        }
        __syncwarp();
        for (int jj = 0; jj < SB; ++jj) {
            float vd[DC];
#pragma unroll
            for (int c = 0; c < DC; ++c) vd[c] = Vs[jj * DV + lane + 32 * c];
#pragma unroll
            for (int x = 0; x < 8; ++x) {
                const float p = Pw[x * SB + jj];
#pragma unroll
                for (int c = 0; c < DC; ++c) acc[x][c] = fmaf(p, vd[c], acc[x][c]);
            }
        }
    }
#pragma unroll
    for (int x = 0; x < 8; ++x) {
        if (!rv[x]) continue;
        const int r = r0 + warp * 8 + x;
        const float inv = l[x] > 0.f ? 1.f / l[x] : 0.f;
        const float ls = l[x] > 0.f ? m[x] + logf(l[x]) : NEG_INF;
        if (po == nullptr) {
            int h, i;
            row_of(a, g, r, h, i);
            T* orow = out + ((i64)b * a.q_len + i) * ldq + (i64)h * D;
#pragma unroll
            for (int c = 0; c < DC; ++c)
                if (lane + 32 * c < D) orow[lane + 32 * c] = from_f<T>(acc[x][c] * inv);
            if (lane == 0) lse[((i64)b * a.nh + h) * a.q_len + i] = ls;
        } else {
            const i64 prow = (((i64)b * a.nkv + g) * R + r) * nsplit + split;
#pragma unroll
            for (int c = 0; c < DC; ++c)
                if (lane + 32 * c < D) po[prow * D + lane + 32 * c] = acc[x][c] * inv;
            if (lane == 0) plse[prow] = ls;
        }
    }
}

#define FWD_SIMT(SFX, T, DC)                                                                                                \
    extern "C" __global__ void __launch_bounds__(128) attention_fwd_simt##DC##_##SFX(                                     \
        const T* q, const T* k, const T* v, T* out, float* lse, float* po, float* plse, int nsplit, ATTN_PARAMS) {         \
        ATTN_MAKE                                                                                                       \
        fwd_simt_impl<T, DC>(q, k, v, out, lse, po, plse, nsplit, a);                                                    \
    }
#define FWD_SIMT_ALL(SFX, T) FWD_SIMT(SFX, T, 2) FWD_SIMT(SFX, T, 4) FWD_SIMT(SFX, T, 8)
FLOAT_KERNELS(FWD_SIMT_ALL)

// Merges the nsplit partials of each (b, g, r) row: lse = log Σ_s exp(lse_s), O = Σ_s exp(lse_s − lse) O_s.
// Grid: (batch · n_kv_heads · group · q_len), 64 threads.
template <typename T>
__device__ void combine_impl(const float* __restrict__ po, const float* __restrict__ plse, T* __restrict__ out,
                             float* __restrict__ lse, int nsplit, const AttnArgs a) {
    const int group = a.nh / a.nkv, R = group * a.q_len;
    const i64 row = blockIdx.x;
    const int r = (int)(row % R), g = (int)((row / R) % a.nkv), b = (int)(row / ((i64)R * a.nkv));
    int h, i;
    row_of(a, g, r, h, i);
    const float* pl = plse + row * nsplit;
    float mx = NEG_INF;
    for (int s = 0; s < nsplit; ++s) mx = fmaxf(mx, pl[s]);
    float wsum = 0.f;
    if (mx != NEG_INF)
        for (int s = 0; s < nsplit; ++s) wsum += expf(pl[s] - mx);
    const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
    T* orow = out + ((i64)b * a.q_len + i) * ((i64)a.nh * a.D) + (i64)h * a.D;
    for (int d = threadIdx.x; d < a.D; d += blockDim.x) {
        float o = 0.f;
        if (mx != NEG_INF)
            for (int s = 0; s < nsplit; ++s) {
                const float w = expf(pl[s] - mx);
                o += w * po[(row * nsplit + s) * a.D + d];
            }
        orow[d] = from_f<T>(o * inv);
    }
    if (threadIdx.x == 0) lse[((i64)b * a.nh + h) * a.q_len + i] = mx == NEG_INF ? NEG_INF : mx + logf(wsum);
}
#define COMBINE(SFX, T)                                                                                              \
    extern "C" __global__ void attention_combine_##SFX(const float* po, const float* plse, T* out, float* lse, int nsplit, \
                                                       ATTN_PARAMS) {                                                \
        ATTN_MAKE                                                                                                    \
        combine_impl<T>(po, plse, out, lse, nsplit, a);                                                              \
    }
FLOAT_KERNELS(COMBINE)

// ------------------------------------------------------------------------------------------------
// Backward.
// ------------------------------------------------------------------------------------------------
// Dv[b, h, i] = Σ_d dO·O; one warp per (b, i, h) row of Q-like tensors, 4 warps per block.
template <typename T>
__device__ void bwd_dot_impl(const T* __restrict__ o, const T* __restrict__ dout, float* __restrict__ dv, int batch, int q_len, int nh,
                             int D) {
    const i64 row = (i64)blockIdx.x * 4 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= (i64)batch * q_len * nh) return;
    float s = 0.f;
    for (int d = lane; d < D; d += 32) s += to_f(o[row * D + d]) * to_f(dout[row * D + d]);
    s = warp_sum(s);
    const int h = (int)(row % nh);
    const i64 bi = row / nh;
    const int i = (int)(bi % q_len), b = (int)(bi / q_len);
    if (lane == 0) dv[((i64)b * nh + h) * q_len + i] = s;
}
#define BWD_DOT(SFX, T)                                                                                           \
    extern "C" __global__ void attention_bwd_dot_##SFX(const T* o, const T* dout, float* dv, int batch, int q_len, \
                                                       int nh, int D) {                                            \
        bwd_dot_impl<T>(o, dout, dv, batch, q_len, nh, D);                                                        \
    }
FLOAT_KERNELS(BWD_DOT)

// One CTA per (key tile of 32, kv head g, batch); 128 threads; warp w owns keys w·8 .. w·8+7 (dK/dV rows in
// registers, dims lane + 32c). Per 32-row tile of the group's (head, query) rows: lane = row for S, dP;
// P and dS go to smem [key][row]; dQ (rows w·8.., dims lane+32c) is added to the F32 scratch with atomics.
// smem (floats): Qs[32][D+1], dOs[32][D+1], Ks[32][D], Vs[32][D], Ps[32][32], dSs[32][32], rl[32], rd[32],
// then ints kok[32], ksg[32], rsg[32], rpos[32] (long long as 2 ints not needed: positions fit in int).
template <typename T, int DC>
__device__ void bwd_simt_impl(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
                              const float* __restrict__ lse, const float* __restrict__ dvec, float* __restrict__ dq32,
                              T* __restrict__ dk, T* __restrict__ dv, const AttnArgs a) {
    const int D = a.D, LDQ = D + 1;
    extern __shared__ __align__(16) unsigned char smem[];
    float* Qs = reinterpret_cast<float*>(smem);
    float* dOs = Qs + SB * LDQ;
    float* Ks = dOs + SB * LDQ;
    float* Vs = Ks + SB * D;
    float* Ps = Vs + SB * D;
    float* dSs = Ps + SB * SB;
    float* rl = dSs + SB * SB;
    float* rd = rl + SB;
    int* kok = reinterpret_cast<int*>(rd + SB);
    u32* ksg = reinterpret_cast<u32*>(kok + SB);
    u32* rsg = ksg + SB;
    int* rok = reinterpret_cast<int*>(rsg + SB);

    const int group = a.nh / a.nkv, R = group * a.q_len;
    const int j0 = blockIdx.x * SB, g = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long ldq = (long long)a.nh * D, ldk = (long long)a.nkv * D;

    if (threadIdx.x < SB) {
        const int j = j0 + threadIdx.x;
        const bool ok = key_ok(a, b, j);
        kok[threadIdx.x] = ok;
        ksg[threadIdx.x] = ok ? seg_of(a, b, j) : 0u;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < SB * D; e += blockDim.x) {
        const int jj = e / D, d = e % D;
        float kv = 0.f, vv = 0.f;
        if (kok[jj]) {
            const i64 off = ((i64)b * a.kv_cap + j0 + jj) * ldk + (i64)g * D + d;
            kv = to_f(k[off]);
            vv = to_f(v[off]);
        }
        Ks[e] = kv;
        Vs[e] = vv;
    }
    int any_key = 0;
    if (threadIdx.x < SB) any_key = kok[threadIdx.x];
    const bool have_keys = __syncthreads_or(any_key);
    const int jl = min(j0 + SB, a.kv_len) - 1;  // last key of the tile

    float dka[8][DC], dva[8][DC];
#pragma unroll
    for (int x = 0; x < 8; ++x)
#pragma unroll
        for (int c = 0; c < DC; ++c) dka[x][c] = dva[x][c] = 0.f;

    for (int r0 = 0; have_keys && r0 < R; r0 += SB) {
        const int r1 = min(r0 + SB, R);
        long long pmin, pmax;
        pos_span(a, r0, r1, pmin, pmax);
        if (a.causal && pmax < j0) continue;
        if (a.window >= 0 && pmin - jl >= a.window) continue;
        __syncthreads();  // previous row tile consumed
        for (int e = threadIdx.x; e < SB * D; e += blockDim.x) {
            const int rr = e / D, d = e % D, r = r0 + rr;
            float qv = 0.f, gv = 0.f;
            if (r < r1) {
                int h, i;
                row_of(a, g, r, h, i);
                const i64 off = ((i64)b * a.q_len + i) * ldq + (i64)h * D + d;
                qv = to_f(q[off]);
                gv = to_f(dout[off]);
            }
            Qs[rr * LDQ + d] = qv;
            dOs[rr * LDQ + d] = gv;
        }
        row_meta(a, b, g, r0, r1, SB, 1.f, lse, dvec, rl, rd, rsg, rok);
        __syncthreads();
        // Scores of row `lane` against keys w·8 + x.
        {
            const int pos = rok[lane];
            const float lr = rl[lane];
            bool vis[8];
#pragma unroll
            for (int x = 0; x < 8; ++x) {
                const int jj = warp * 8 + x;
                vis[x] = pos >= 0 && lr != NEG_INF && kok[jj] && pos_ok(a, pos, (long long)j0 + jj) &&
                         (a.seg == nullptr || ksg[jj] == rsg[lane]);
            }
            float s[8], dp[8];
#pragma unroll
            for (int x = 0; x < 8; ++x) s[x] = dp[x] = 0.f;
            const float* qr = Qs + lane * LDQ;
            const float* gr = dOs + lane * LDQ;
            const float* kw = Ks + warp * 8 * D;
            const float* vw = Vs + warp * 8 * D;
            for (int d = 0; d < D; ++d) {
                const float qd = qr[d], gd = gr[d];
#pragma unroll
                for (int x = 0; x < 8; ++x) {
                    s[x] = fmaf(qd, kw[x * D + d], s[x]);
                    dp[x] = fmaf(gd, vw[x * D + d], dp[x]);
                }
            }
            const float dr = rd[lane];
#pragma unroll
            for (int x = 0; x < 8; ++x) {
                const float p = vis[x] ? expf(s[x] * a.scale - lr) : 0.f;
                Ps[(warp * 8 + x) * SB + lane] = p;
                dSs[(warp * 8 + x) * SB + lane] = p * (dp[x] - dr);
            }
        }
        __syncthreads();
        // dV += Pᵀ dO, dK += dSᵀ Q (scale applied at the end).
        for (int rr = 0; rr < SB; ++rr) {
            float qd[DC], gd[DC];
#pragma unroll
            for (int c = 0; c < DC; ++c) {
                const int d = lane + 32 * c;
                qd[c] = d < D ? Qs[rr * LDQ + d] : 0.f;
                gd[c] = d < D ? dOs[rr * LDQ + d] : 0.f;
            }
#pragma unroll
            for (int x = 0; x < 8; ++x) {
                const float p = Ps[(warp * 8 + x) * SB + rr], ds = dSs[(warp * 8 + x) * SB + rr];
#pragma unroll
                for (int c = 0; c < DC; ++c) {
                    dva[x][c] = fmaf(p, gd[c], dva[x][c]);
                    dka[x][c] = fmaf(ds, qd[c], dka[x][c]);
                }
            }
        }
        // dQ += scale·dS K for rows w·8 + x.
        for (int x = 0; x < 8; ++x) {
            const int rr = warp * 8 + x, r = r0 + rr;
            if (r >= r1) break;
            float dqa[DC];
#pragma unroll
            for (int c = 0; c < DC; ++c) dqa[c] = 0.f;
            bool nz = false;
            for (int jj = 0; jj < SB; ++jj) {
                const float ds = dSs[jj * SB + rr];
                nz |= ds != 0.f;
#pragma unroll
                for (int c = 0; c < DC; ++c) {
                    const int d = lane + 32 * c;
                    dqa[c] = fmaf(ds, d < D ? Ks[jj * D + d] : 0.f, dqa[c]);
                }
            }
            if (!nz) continue;  // warp-uniform (dSs is shared)
            int h, i;
            row_of(a, g, r, h, i);
            float* dqr = dq32 + ((i64)b * a.q_len + i) * ldq + (i64)h * D;
#pragma unroll
            for (int c = 0; c < DC; ++c)
                if (lane + 32 * c < D) atomicAdd(dqr + lane + 32 * c, a.scale * dqa[c]);
        }
    }
    // Write dK/dV rows j < kv_len (rows >= kv_len stay as the zero-filled buffer has them).
#pragma unroll
    for (int x = 0; x < 8; ++x) {
        const int j = j0 + warp * 8 + x;
        if (j >= a.kv_len) continue;
        const i64 off = ((i64)b * a.kv_cap + j) * ldk + (i64)g * D;
#pragma unroll
        for (int c = 0; c < DC; ++c) {
            const int d = lane + 32 * c;
            if (d < D) {
                dk[off + d] = from_f<T>(a.scale * dka[x][c]);
                dv[off + d] = from_f<T>(dva[x][c]);
            }
        }
    }
}
#define BWD_SIMT(SFX, T, DC)                                                                                         \
    extern "C" __global__ void __launch_bounds__(128) attention_bwd_simt##DC##_##SFX(                              \
        const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* dvec, float* dq32, T* dk, \
        T* dv, ATTN_PARAMS) {                                                                                    \
        ATTN_MAKE                                                                                                \
        bwd_simt_impl<T, DC>(q, k, v, dout, lse, dvec, dq32, dk, dv, a);                                         \
    }
#define BWD_SIMT_ALL(SFX, T) BWD_SIMT(SFX, T, 2) BWD_SIMT(SFX, T, 4)
FLOAT_KERNELS(BWD_SIMT_ALL)

// bf16 tensor-core backward: one CTA (4 warps) per (64 keys, kv head g, batch); warp w owns keys w·16 .. w·16+15
// and keeps their dK/dV (16 × D, f32) in registers. Per tile of BR stacked (group head, query) rows:
//   Sᵀ = K Qᵀ, dPᵀ = V dOᵀ (mma, keys × rows), Pᵀ = exp(scale·Sᵀ − lse), dSᵀ = Pᵀ ∘ (dPᵀ − D);
//   dV += Pᵀ dO, dK += dSᵀ Q (A operands straight from the accumulators, rounded to bf16);
//   dS (bf16) goes to smem, then dQ(rows) += dS K is split over the warps and added with f32 atomics.
// smem (bf16, LD = D + 8): Ks[64][LD], Vs[64][LD], Qs[BR][LD], dOs[BR][LD], dSs[BR][72]; then floats rl[BR], rd[BR],
// ints rpos[BR], u32 rsg[BR], ints kok[64], u32 ksg[64].
template <int D, int BR>
__device__ void bwd_mma_impl(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                             const bf16* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dvec,
                             float* __restrict__ dq32, bf16* __restrict__ dk, bf16* __restrict__ dv, const AttnArgs a) {
    constexpr int LD = D + 8, LDS = 64 + 8;
    constexpr int DT = D / 8, KS = D / 16, NT = BR / 8;
    constexpr int RB = BR / 16, WPR = 4 / RB, DTW = DT / WPR;  // dQ: row blocks, warps per row block, d-tiles per warp
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* Ks = reinterpret_cast<bf16*>(smem);
    bf16* Vs = Ks + 64 * LD;
    bf16* Qs = Vs + 64 * LD;
    bf16* dOs = Qs + BR * LD;
    bf16* dSs = dOs + BR * LD;
    float* rl = reinterpret_cast<float*>(dSs + BR * LDS);
    float* rd = rl + BR;
    int* rpos = reinterpret_cast<int*>(rd + BR);
    u32* rsg = reinterpret_cast<u32*>(rpos + BR);
    int* kok = reinterpret_cast<int*>(rsg + BR);
    u32* ksg = reinterpret_cast<u32*>(kok + 64);

    const int group = a.nh / a.nkv, R = group * a.q_len;
    const int j0 = blockIdx.x * 64, g = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tig = lane & 3;
    const long long ldq = (long long)a.nh * D, ldk = (long long)a.nkv * D;

    if (threadIdx.x < 64) {
        const int j = j0 + threadIdx.x;
        const bool ok = key_ok(a, b, j);
        kok[threadIdx.x] = ok;
        ksg[threadIdx.x] = ok ? seg_of(a, b, j) : 0u;
    }
    __syncthreads();
    {
        const bf16* kb = k + ((i64)b * a.kv_cap + j0) * ldk + (i64)g * D;
        const bf16* vb = v + ((i64)b * a.kv_cap + j0) * ldk + (i64)g * D;
        constexpr int V8 = D / 8;
        for (int e = threadIdx.x; e < 64 * V8; e += blockDim.x) {
            const int r = e / V8, c = (e % V8) * 8;
            int4 kv = make_int4(0, 0, 0, 0), vv = make_int4(0, 0, 0, 0);
            if (kok[r]) {
                kv = *reinterpret_cast<const int4*>(kb + r * ldk + c);
                vv = *reinterpret_cast<const int4*>(vb + r * ldk + c);
            }
            *reinterpret_cast<int4*>(Ks + r * LD + c) = kv;
            *reinterpret_cast<int4*>(Vs + r * LD + c) = vv;
        }
    }
    int any_key = 0;
    if (threadIdx.x < 64) any_key = kok[threadIdx.x];
    const bool have_keys = __syncthreads_or(any_key);
    const int jl = min(j0 + 64, a.kv_len) - 1;

    float dka[DT][4], dva[DT][4];
#pragma unroll
    for (int t = 0; t < DT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[t][e] = dva[t][e] = 0.f;
    // This thread's two keys (rows of Kᵀ-side fragments).
    const int kr0 = warp * 16 + gq;
    const float scale2 = a.scale * LOG2E;

    for (int r0 = 0; have_keys && r0 < R; r0 += BR) {
        const int r1 = min(r0 + BR, R);
        long long pmin, pmax;
        pos_span(a, r0, r1, pmin, pmax);
        if (a.causal && pmax < j0) continue;
        if (a.window >= 0 && pmin - jl >= a.window) continue;
        __syncthreads();  // previous row tile consumed
        {
            constexpr int V8 = D / 8;
            for (int e = threadIdx.x; e < BR * V8; e += blockDim.x) {
                const int rr = e / V8, c = (e % V8) * 8, r = r0 + rr;
                int4 qv = make_int4(0, 0, 0, 0), gv = make_int4(0, 0, 0, 0);
                if (r < r1) {
                    int h, i;
                    row_of(a, g, r, h, i);
                    const i64 off = ((i64)b * a.q_len + i) * ldq + (i64)h * D + c;
                    qv = *reinterpret_cast<const int4*>(q + off);
                    gv = *reinterpret_cast<const int4*>(dout + off);
                }
                *reinterpret_cast<int4*>(Qs + rr * LD + c) = qv;
                *reinterpret_cast<int4*>(dOs + rr * LD + c) = gv;
            }
        }
        row_meta(a, b, g, r0, r1, BR, LOG2E, lse, dvec, rl, rd, rsg, rpos);  // LSE in base 2, as the scores
        __syncthreads();
        // Visibility of this thread's NT·4 elements (key kr0 + 8·(e>>1), row t·8 + 2·tig + (e&1)).
        // A full tile (every row real, every pair admitted) skips the per-element test; its rows all
        // see keys, so their LSE is finite.
        u32 vis = 0xffffffffu;
        if (!(r1 - r0 == BR && tile_full(a, pmin, pmax, j0, min(64, a.kv_len - j0)))) {
            vis = 0;
#pragma unroll
            for (int t = 0; t < NT; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = kr0 + 8 * (e >> 1), rr = t * 8 + 2 * tig + (e & 1);
                    const int pos = rpos[rr];
                    const bool ok = pos >= 0 && rl[rr] != NEG_INF && kok[key] && pos_ok(a, pos, (long long)j0 + key) &&
                                    (a.seg == nullptr || ksg[key] == rsg[rr]);
                    vis |= (ok ? 1u : 0u) << (t * 4 + e);
                }
            if (!__syncthreads_or(vis != 0)) continue;
        }

        float st[NT][4], dpt[NT][4];
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) st[t][e] = dpt[t][e] = 0.f;
        {
            const bf16* ka = Ks + kr0 * LD + 2 * tig;
            const bf16* va = Vs + kr0 * LD + 2 * tig;
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) {
                const u32 a0 = ld32(ka + kk * 16), a1 = ld32(ka + 8 * LD + kk * 16);
                const u32 a2 = ld32(ka + kk * 16 + 8), a3 = ld32(ka + 8 * LD + kk * 16 + 8);
                const u32 c0 = ld32(va + kk * 16), c1 = ld32(va + 8 * LD + kk * 16);
                const u32 c2 = ld32(va + kk * 16 + 8), c3 = ld32(va + 8 * LD + kk * 16 + 8);
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    const bf16* qp = Qs + (t * 8 + gq) * LD + kk * 16 + 2 * tig;
                    const bf16* gp = dOs + (t * 8 + gq) * LD + kk * 16 + 2 * tig;
                    mma_bf16(st[t], a0, a1, a2, a3, ld32(qp), ld32(qp + 8));
                    mma_bf16(dpt[t], c0, c1, c2, c3, ld32(gp), ld32(gp + 8));
                }
            }
        }
        // P and dS (in st / dpt); dS to smem as [row][key].
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = kr0 + 8 * (e >> 1), rr = t * 8 + 2 * tig + (e & 1);
                const float p = ((vis >> (t * 4 + e)) & 1u) ? exp2f(st[t][e] * scale2 - rl[rr]) : 0.f;
                const float ds = p * (dpt[t][e] - rd[rr]);
                st[t][e] = p;
                dpt[t][e] = ds;
                dSs[rr * LDS + key] = __float2bfloat16_rn(ds);
            }
        // dV += Pᵀ dO, dK += dSᵀ Q.
#pragma unroll
        for (int kk = 0; kk < BR / 16; ++kk) {
            const u32 p0 = pack_bf16(st[2 * kk][0], st[2 * kk][1]), p1 = pack_bf16(st[2 * kk][2], st[2 * kk][3]);
            const u32 p2 = pack_bf16(st[2 * kk + 1][0], st[2 * kk + 1][1]), p3 = pack_bf16(st[2 * kk + 1][2], st[2 * kk + 1][3]);
            const u32 s0 = pack_bf16(dpt[2 * kk][0], dpt[2 * kk][1]), s1 = pack_bf16(dpt[2 * kk][2], dpt[2 * kk][3]);
            const u32 s2 = pack_bf16(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]), s3 = pack_bf16(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
            const bf16* gp = dOs + (kk * 16 + 2 * tig) * LD + gq;
            const bf16* qp = Qs + (kk * 16 + 2 * tig) * LD + gq;
#pragma unroll
            for (int t = 0; t < DT; ++t) {
                const bf16* c = gp + t * 8;
                mma_bf16(dva[t], p0, p1, p2, p3, pack_raw(c[0], c[LD]), pack_raw(c[8 * LD], c[9 * LD]));
                const bf16* d = qp + t * 8;
                mma_bf16(dka[t], s0, s1, s2, s3, pack_raw(d[0], d[LD]), pack_raw(d[8 * LD], d[9 * LD]));
            }
        }
        __syncthreads();  // dSs complete
        // dQ[rows rb·16 .., d-tiles dw·DTW ..] += dS K over the 64 keys.
        {
            const int rb = warp % RB, dw = warp / RB;
            float qa[DTW][4];
#pragma unroll
            for (int t = 0; t < DTW; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) qa[t][e] = 0.f;
            const bf16* sa = dSs + (rb * 16 + gq) * LDS + 2 * tig;
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                const u32 a0 = ld32(sa + kk * 16), a1 = ld32(sa + 8 * LDS + kk * 16);
                const u32 a2 = ld32(sa + kk * 16 + 8), a3 = ld32(sa + 8 * LDS + kk * 16 + 8);
                const bf16* kp = Ks + (kk * 16 + 2 * tig) * LD + dw * DTW * 8 + gq;
#pragma unroll
                for (int t = 0; t < DTW; ++t) {
                    const bf16* c = kp + t * 8;
                    mma_bf16(qa[t], a0, a1, a2, a3, pack_raw(c[0], c[LD]), pack_raw(c[8 * LD], c[9 * LD]));
                }
            }
#pragma unroll
            for (int hr = 0; hr < 2; ++hr) {
                const int r = r0 + rb * 16 + gq + 8 * hr;
                if (r >= r1) continue;
                int h, i;
                row_of(a, g, r, h, i);
                float* dqr = dq32 + ((i64)b * a.q_len + i) * ldq + (i64)h * D + dw * DTW * 8 + 2 * tig;
#pragma unroll
                for (int t = 0; t < DTW; ++t) {
                    atomicAdd(dqr + t * 8, a.scale * qa[t][2 * hr]);
                    atomicAdd(dqr + t * 8 + 1, a.scale * qa[t][2 * hr + 1]);
                }
            }
        }
    }
    // dK/dV rows j < kv_len.
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int j = j0 + kr0 + 8 * hr;
        if (j >= a.kv_len) continue;
        const i64 off = ((i64)b * a.kv_cap + j) * ldk + (i64)g * D + 2 * tig;
#pragma unroll
        for (int t = 0; t < DT; ++t) {
            *reinterpret_cast<__nv_bfloat162*>(dk + off + t * 8) =
                __floats2bfloat162_rn(a.scale * dka[t][2 * hr], a.scale * dka[t][2 * hr + 1]);
            *reinterpret_cast<__nv_bfloat162*>(dv + off + t * 8) = __floats2bfloat162_rn(dva[t][2 * hr], dva[t][2 * hr + 1]);
        }
    }
}
extern "C" __global__ void __launch_bounds__(128) attention_bwd_mma64_bf16(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                                                                           const float* lse, const float* dvec, float* dq32, bf16* dk,
                                                                           bf16* dv, ATTN_PARAMS) {
    ATTN_MAKE
    bwd_mma_impl<64, 64>(q, k, v, dout, lse, dvec, dq32, dk, dv, a);
}
extern "C" __global__ void __launch_bounds__(128) attention_bwd_mma128_bf16(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                                                                            const float* lse, const float* dvec, float* dq32, bf16* dk,
                                                                            bf16* dv, ATTN_PARAMS) {
    ATTN_MAKE
    bwd_mma_impl<128, 32>(q, k, v, dout, lse, dvec, dq32, dk, dv, a);
}

template <typename T>
__device__ void cast_impl(const float* __restrict__ src, T* __restrict__ dst, u64 n) {
    for (u64 e = (u64)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (u64)gridDim.x * blockDim.x) dst[e] = from_f<T>(src[e]);
}
#define CAST(SFX, T) \
    extern "C" __global__ void attention_cast_##SFX(const float* src, T* dst, u64 n) { cast_impl<T>(src, dst, n); }
FLOAT_KERNELS(CAST)

// ------------------------------------------------------------------------------------------------
// Reference kernels: one warp per (b, h, i) (row index (b·q_len + i)·nh + h), 4 warps per block,
// lane holds dims lane + 32c (c < 8, D <= 256), two passes over the keys.
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ bool ref_visible(const AttnArgs& a, int b, long long p, u32 qs, int j) {
    return key_ok(a, b, j) && pos_ok(a, p, j) && (a.seg == nullptr || a.seg[(i64)b * a.kv_cap + j] == qs);
}

template <typename T>
__device__ void ref_fwd_impl(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
                             float* __restrict__ lse, const AttnArgs a) {
    const i64 row = (i64)blockIdx.x * 4 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31, D = a.D;
    if (row >= (i64)a.batch * a.q_len * a.nh) return;
    const int h = (int)(row % a.nh), i = (int)((row / a.nh) % a.q_len), b = (int)(row / ((i64)a.nh * a.q_len));
    const int g = h / (a.nh / a.nkv);
    const long long p = (long long)a.q_off + i;
    const u32 qs = seg_of(a, b, p);
    float qv[8], o[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        const int d = lane + 32 * c;
        qv[c] = d < D ? to_f(q[row * D + d]) : 0.f;
        o[c] = 0.f;
    }
    const i64 kbase = (i64)b * a.kv_cap * a.nkv * D + (i64)g * D, ldk = (i64)a.nkv * D;
    float m = NEG_INF;
    for (int j = 0; j < a.kv_len; ++j) {
        if (!ref_visible(a, b, p, qs, j)) continue;
        float s = 0.f;
#pragma unroll
        for (int c = 0; c < 8; ++c)
            if (lane + 32 * c < D) s += qv[c] * to_f(k[kbase + j * ldk + lane + 32 * c]);
        m = fmaxf(m, warp_sum(s) * a.scale);
    }
    float l = 0.f;
    if (m != NEG_INF)
        for (int j = 0; j < a.kv_len; ++j) {
            if (!ref_visible(a, b, p, qs, j)) continue;
            float s = 0.f;
#pragma unroll
            for (int c = 0; c < 8; ++c)
                if (lane + 32 * c < D) s += qv[c] * to_f(k[kbase + j * ldk + lane + 32 * c]);
            const float pj = expf(warp_sum(s) * a.scale - m);
            l += pj;
#pragma unroll
            for (int c = 0; c < 8; ++c)
                if (lane + 32 * c < D) o[c] += pj * to_f(v[kbase + j * ldk + lane + 32 * c]);
        }
    const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int c = 0; c < 8; ++c)
        if (lane + 32 * c < D) out[row * D + lane + 32 * c] = from_f<T>(o[c] * inv);
    if (lane == 0) lse[((i64)b * a.nh + h) * a.q_len + i] = l > 0.f ? m + logf(l) : NEG_INF;
}
#define REF_FWD(SFX, T)                                                                                              \
    extern "C" __global__ void attention_ref_fwd_##SFX(const T* q, const T* k, const T* v, T* out, float* lse, ATTN_PARAMS) { \
        ATTN_MAKE                                                                                                    \
        ref_fwd_impl<T>(q, k, v, out, lse, a);                                                                       \
    }
FLOAT_KERNELS(REF_FWD)

// dQ written directly; dK/dV added with atomics into F32 scratches [batch, kv_cap, nkv, D] (zero-filled).
template <typename T>
__device__ void ref_bwd_impl(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ o,
                             const float* __restrict__ lse, const T* __restrict__ dout, T* __restrict__ dq, float* __restrict__ dk32,
                             float* __restrict__ dv32, const AttnArgs a) {
    const i64 row = (i64)blockIdx.x * 4 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31, D = a.D;
    if (row >= (i64)a.batch * a.q_len * a.nh) return;
    const int h = (int)(row % a.nh), i = (int)((row / a.nh) % a.q_len), b = (int)(row / ((i64)a.nh * a.q_len));
    const int g = h / (a.nh / a.nkv);
    const long long p = (long long)a.q_off + i;
    const u32 qs = seg_of(a, b, p);
    const float lr = lse[((i64)b * a.nh + h) * a.q_len + i];
    float qv[8], gv[8], dqa[8];
    float dd = 0.f;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        const int d = lane + 32 * c;
        qv[c] = d < D ? to_f(q[row * D + d]) : 0.f;
        gv[c] = d < D ? to_f(dout[row * D + d]) : 0.f;
        dd += d < D ? gv[c] * to_f(o[row * D + d]) : 0.f;
        dqa[c] = 0.f;
    }
    dd = warp_sum(dd);
    const i64 kbase = (i64)b * a.kv_cap * a.nkv * D + (i64)g * D, ldk = (i64)a.nkv * D;
    if (lr != NEG_INF)
        for (int j = 0; j < a.kv_len; ++j) {
            if (!ref_visible(a, b, p, qs, j)) continue;
            float s = 0.f, dp = 0.f;
#pragma unroll
            for (int c = 0; c < 8; ++c)
                if (lane + 32 * c < D) {
                    s += qv[c] * to_f(k[kbase + j * ldk + lane + 32 * c]);
                    dp += gv[c] * to_f(v[kbase + j * ldk + lane + 32 * c]);
                }
            const float pj = expf(warp_sum(s) * a.scale - lr);
            const float ds = pj * (warp_sum(dp) - dd);
#pragma unroll
            for (int c = 0; c < 8; ++c) {
                const int d = lane + 32 * c;
                if (d < D) {
                    dqa[c] += a.scale * ds * to_f(k[kbase + j * ldk + d]);
                    atomicAdd(dk32 + kbase + j * ldk + d, a.scale * ds * qv[c]);
                    atomicAdd(dv32 + kbase + j * ldk + d, pj * gv[c]);
                }
            }
        }
#pragma unroll
    for (int c = 0; c < 8; ++c)
        if (lane + 32 * c < D) dq[row * D + lane + 32 * c] = from_f<T>(dqa[c]);
}
#define REF_BWD(SFX, T)                                                                                                      \
    extern "C" __global__ void attention_ref_bwd_##SFX(const T* q, const T* k, const T* v, const T* o, const float* lse,     \
                                                       const T* dout, T* dq, float* dk32, float* dv32, ATTN_PARAMS) {       \
        ATTN_MAKE                                                                                                            \
        ref_bwd_impl<T>(q, k, v, o, lse, dout, dq, dk32, dv32, a);                                                           \
    }
FLOAT_KERNELS(REF_BWD)
