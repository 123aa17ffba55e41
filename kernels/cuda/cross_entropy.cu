// cross_entropy.cu — token-level NLL (log-softmax fused in), per-row KL between two softmaxes, and
// the per-chunk pieces of the fused linear cross-entropy (logits never materialised in full).
//
// Layouts: logits z, reference logits r: [rows, vocab] row-major, dtype T (f32/bf16/f16);
// targets y: [rows] I64 (−100 = ignored); per-row outputs [rows].
//
// token_nll  forward : lse = log Σ_j exp(z_j)  (one pass: online max/sum per thread, then a block merge)
//                      nll = lse − z[y]  (0 where y = −100).  nll is T; lse is F32 (it only goes back
//                      to the backward through the op layer, runtime/src/ops/token_nll.rs, and a bf16
//                      lse would put ~1e-2 relative error on every softmax of the backward).
//            backward: dz_j = g·(exp(z_j − lse) − [j = y])  (all 0 where y = −100). The kernel also takes a
//                      column window (c0, cols) of a wider vocabulary, which the fused linear CE uses
//                      on its logit chunks; input and output may alias (dz written in place over z).
// kl_rows    forward : p = softmax(z), q = softmax(r):  kl = Σ_j p_j (log p_j − log q_j)   (T)
//            backward: dz_j = g·p_j·(log p_j − log q_j − kl)                               (T)
//                      pass 1: online lse of z and r; pass 2: kl; pass 3 (backward): dz.
// linear CE  chunk   : for logits L = h·W_cᵀ of vocab columns [c0, c0+cols): merge the chunk's
//                      (max, Σexp) into a running F32 state per row and pick the target logit when
//                      y lies in the chunk; `lce_finish` turns the state into (nll T, lse F32).
//            accum   : acc (F32) = / += x (T) — d hidden summed over chunks in f32 for bf16/f16.
//
// One block per row for the row kernels (grid.x = rows, blockDim.x a multiple of 32, ≤ 1024);
// 128-bit loads over the 16-byte-aligned middle of each row, scalar head and tail. The `_ref_`
// kernels are the simple versions (one thread per row or per element, no shared memory) that the
// parity suite checks the fast ones against.

#define IGNORE_INDEX (-100LL)

// Elements before the first 16-byte boundary of `row` (all of them when `row` is not even
// T-aligned, so the vector body is then empty).
template <typename T> __device__ __forceinline__ u64 row_head(const void* row, u64 n) {
    const u64 a = reinterpret_cast<u64>(row);
    if (a % sizeof(T) != 0) return n;
    const u64 mis = a & 15;
    const u64 h = mis ? (16 - mis) / sizeof(T) : 0;
    return h < n ? h : n;
}

// Online log-sum-exp state of one thread: running max m and Σ exp(x − m).
struct Lse {
    float m, s;
    __device__ __forceinline__ void init() { m = NEG_INF; s = 0.f; }
    __device__ __forceinline__ void add(float x) {
        if (x > m) {
            s = s * expf(m - x) + 1.f;  // m = −inf: expf(−inf) = 0
            m = x;
        } else if (x > NEG_INF) {
            s += expf(x - m);
        }
    }
    template <int N> __device__ __forceinline__ void add_pack(const float (&v)[N]) {
        float pm = v[0];
#pragma unroll
        for (int k = 1; k < N; k++) pm = fmaxf(pm, v[k]);
        const float mn = fmaxf(m, pm);
        if (mn == NEG_INF) return;
        float acc = s * expf(m - mn);
#pragma unroll
        for (int k = 0; k < N; k++) acc += expf(v[k] - mn);
        s = acc;
        m = mn;
    }
    // Merges every thread's state; returns the row's lse (all threads). Synchronises the block.
    __device__ __forceinline__ float block_lse(float* scratch) {
        const float bm = block_max(m, scratch);
        const float part = (m == NEG_INF) ? 0.f : s * expf(m - bm);
        const float bs = block_sum(part, scratch);
        return bm + logf(bs);
    }
    // Merges every thread's state into (max, sum) without taking the log.
    __device__ __forceinline__ void block_merge(float* scratch, float& bm, float& bs) {
        bm = block_max(m, scratch);
        const float part = (m == NEG_INF) ? 0.f : s * expf(m - bm);
        bs = block_sum(part, scratch);
    }
};

template <typename T> __device__ __forceinline__ void lse_row(const T* row, u64 n, Lse& st) {
    constexpr int N = Pack128<T>::N;
    const u64 h = row_head<T>(row, n);
    const u64 np = (n - h) / N;
    const T* vb = row + h;
    for (u64 i = threadIdx.x; i < h; i += blockDim.x) st.add(to_f(row[i]));
    for (u64 p = threadIdx.x; p < np; p += blockDim.x) {
        const Pack128<T> pk = load128(vb + p * N);
        float v[N];
#pragma unroll
        for (int k = 0; k < N; k++) v[k] = to_f(pk.v[k]);
        st.add_pack<N>(v);
    }
    for (u64 i = h + np * N + threadIdx.x; i < n; i += blockDim.x) st.add(to_f(row[i]));
}

// Reference row statistics: two plain sequential passes, sums in double (a long f32 running sum
// drifts by ~1e-5 relative over 50k terms, more than the tree sums of the fast kernels).
template <typename T> __device__ __forceinline__ float ref_lse(const T* row, u64 n) {
    float m = NEG_INF;
    for (u64 j = 0; j < n; j++) m = fmaxf(m, to_f(row[j]));
    double s = 0.0;
    for (u64 j = 0; j < n; j++) s += (double)expf(to_f(row[j]) - m);
    return m + (float)log(s);
}
template <typename T> __device__ __forceinline__ float ref_kl(const T* zr, const T* rr, u64 n) {
    const float lz = ref_lse(zr, n), lr = ref_lse(rr, n);
    double k = 0.0;
    for (u64 j = 0; j < n; j++) {
        const float a = to_f(zr[j]) - lz, b = to_f(rr[j]) - lr;
        k += (double)(expf(a) * (a - b));
    }
    return (float)k;
}

// ---------------------------------------------------------------- token_nll forward
template <typename T>
__device__ void token_nll_fwd_impl(const T* z, const i64* y, T* nll, float* lse, u64 vocab) {
    __shared__ float scratch[32];
    const u64 r = blockIdx.x;
    const T* row = z + r * vocab;
    Lse st;
    st.init();
    lse_row(row, vocab, st);
    const float l = st.block_lse(scratch);
    if (threadIdx.x == 0) {
        const i64 t = y[r];
        lse[r] = l;
        nll[r] = from_f<T>(t == IGNORE_INDEX ? 0.f : l - to_f(row[t]));
    }
}

// One thread per row, two plain passes (max, then Σexp in double): the reference.
template <typename T>
__device__ void token_nll_fwd_ref_impl(const T* z, const i64* y, T* nll, float* lse, u64 rows, u64 vocab) {
    const u64 r = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float l = ref_lse(z + r * vocab, vocab);
    const T* row = z + r * vocab;
    lse[r] = l;
    nll[r] = from_f<T>(y[r] == IGNORE_INDEX ? 0.f : l - to_f(row[y[r]]));
}

// ---------------------------------------------------------------- token_nll backward
// Row r of z/dz has `cols` columns holding vocabulary entries [c0, c0 + cols); y, lse, g are per row.
// z and dz may be the same buffer (each element is read and written by the same thread).
template <typename T>
__device__ void token_nll_bwd_impl(const T* z, const i64* y, const float* lse, const T* g, T* dz, u64 cols, i64 c0) {
    constexpr int N = Pack128<T>::N;
    const u64 r = blockIdx.x;
    const T* zr = z + r * cols;
    T* dr = dz + r * cols;
    const i64 t = y[r];
    const bool ign = (t == IGNORE_INDEX);
    const float gf = ign ? 0.f : to_f(g[r]);
    const float l = lse[r];
    // Column of the target inside this window (−1 when outside or ignored).
    const i64 tc = (!ign && t >= c0 && t < c0 + (i64)cols) ? t - c0 : -1;
    u64 h = row_head<T>(zr, cols);
    if (row_head<T>(dr, cols) != h) h = cols;  // different alignment: all scalar
    const u64 np = (cols - h) / N;
    for (u64 i = threadIdx.x; i < h; i += blockDim.x) {
        const float d = ign ? 0.f : gf * expf(to_f(zr[i]) - l) - ((i64)i == tc ? gf : 0.f);
        dr[i] = from_f<T>(d);
    }
    for (u64 p = threadIdx.x; p < np; p += blockDim.x) {
        const u64 i0 = h + p * N;
        const Pack128<T> pk = load128(zr + i0);
        Pack128<T> o;
#pragma unroll
        for (int k = 0; k < N; k++) {
            const float d = ign ? 0.f : gf * expf(to_f(pk.v[k]) - l) - ((i64)(i0 + k) == tc ? gf : 0.f);
            o.v[k] = from_f<T>(d);
        }
        store128(dr + i0, o);
    }
    for (u64 i = h + np * N + threadIdx.x; i < cols; i += blockDim.x) {
        const float d = ign ? 0.f : gf * expf(to_f(zr[i]) - l) - ((i64)i == tc ? gf : 0.f);
        dr[i] = from_f<T>(d);
    }
}

// One thread per element: the reference.
template <typename T>
__device__ void token_nll_bwd_ref_impl(const T* z, const i64* y, const float* lse, const T* g, T* dz, u64 rows, u64 cols, i64 c0) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * cols) return;
    const u64 r = i / cols, j = i % cols;
    const i64 t = y[r];
    if (t == IGNORE_INDEX) {
        dz[i] = from_f<T>(0.f);
        return;
    }
    const float gf = to_f(g[r]);
    float d = gf * expf(to_f(z[i]) - lse[r]);
    if ((i64)j + c0 == t) d -= gf;
    dz[i] = from_f<T>(d);
}

// ---------------------------------------------------------------- kl_rows
// Pass 1 of both: the lse of z and r over the row (thread-parallel, block merge).
template <typename T>
__device__ __forceinline__ void kl_lses(const T* zr, const T* rr, u64 n, float* scratch, float& lz, float& lr) {
    Lse a, b;
    a.init();
    b.init();
    lse_row(zr, n, a);
    lse_row(rr, n, b);
    lz = a.block_lse(scratch);
    lr = b.block_lse(scratch);
}

// Σ_j p_j (lp_j − lq_j) over the row, every thread gets it.
template <typename T>
__device__ __forceinline__ float kl_sum(const T* zr, const T* rr, u64 n, float lz, float lr, float* scratch) {
    constexpr int N = Pack128<T>::N;
    u64 h = row_head<T>(zr, n);
    if (row_head<T>(rr, n) != h) h = n;
    const u64 np = (n - h) / N;
    float acc = 0.f;
    for (u64 i = threadIdx.x; i < h; i += blockDim.x) {
        const float a = to_f(zr[i]) - lz, b = to_f(rr[i]) - lr;
        acc += expf(a) * (a - b);
    }
    for (u64 p = threadIdx.x; p < np; p += blockDim.x) {
        const Pack128<T> pz = load128(zr + h + p * N), pr = load128(rr + h + p * N);
#pragma unroll
        for (int k = 0; k < N; k++) {
            const float a = to_f(pz.v[k]) - lz, b = to_f(pr.v[k]) - lr;
            acc += expf(a) * (a - b);
        }
    }
    for (u64 i = h + np * N + threadIdx.x; i < n; i += blockDim.x) {
        const float a = to_f(zr[i]) - lz, b = to_f(rr[i]) - lr;
        acc += expf(a) * (a - b);
    }
    return block_sum(acc, scratch);
}

template <typename T> __device__ void kl_fwd_impl(const T* z, const T* rf, T* kl, u64 vocab) {
    __shared__ float scratch[32];
    const u64 r = blockIdx.x;
    const T* zr = z + r * vocab;
    const T* rr = rf + r * vocab;
    float lz, lr;
    kl_lses(zr, rr, vocab, scratch, lz, lr);
    const float k = kl_sum(zr, rr, vocab, lz, lr, scratch);
    if (threadIdx.x == 0) kl[r] = from_f<T>(k);
}

template <typename T> __device__ void kl_bwd_impl(const T* z, const T* rf, const T* g, T* dz, u64 vocab) {
    constexpr int N = Pack128<T>::N;
    __shared__ float scratch[32];
    const u64 r = blockIdx.x;
    const T* zr = z + r * vocab;
    const T* rr = rf + r * vocab;
    T* dr = dz + r * vocab;
    float lz, lr;
    kl_lses(zr, rr, vocab, scratch, lz, lr);
    const float k = kl_sum(zr, rr, vocab, lz, lr, scratch);
    const float gf = to_f(g[r]);
    u64 h = row_head<T>(zr, vocab);
    if (row_head<T>(rr, vocab) != h || row_head<T>(dr, vocab) != h) h = vocab;
    const u64 np = (vocab - h) / N;
    for (u64 i = threadIdx.x; i < h; i += blockDim.x) {
        const float a = to_f(zr[i]) - lz, b = to_f(rr[i]) - lr;
        dr[i] = from_f<T>(gf * expf(a) * (a - b - k));
    }
    for (u64 p = threadIdx.x; p < np; p += blockDim.x) {
        const u64 i0 = h + p * N;
        const Pack128<T> pz = load128(zr + i0), pr = load128(rr + i0);
        Pack128<T> o;
#pragma unroll
        for (int q = 0; q < N; q++) {
            const float a = to_f(pz.v[q]) - lz, b = to_f(pr.v[q]) - lr;
            o.v[q] = from_f<T>(gf * expf(a) * (a - b - k));
        }
        store128(dr + i0, o);
    }
    for (u64 i = h + np * N + threadIdx.x; i < vocab; i += blockDim.x) {
        const float a = to_f(zr[i]) - lz, b = to_f(rr[i]) - lr;
        dr[i] = from_f<T>(gf * expf(a) * (a - b - k));
    }
}

template <typename T> __device__ void kl_fwd_ref_impl(const T* z, const T* rf, T* kl, u64 rows, u64 vocab) {
    const u64 r = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    kl[r] = from_f<T>(ref_kl(z + r * vocab, rf + r * vocab, vocab));
}
// One thread per row, writing the whole row (the per-element variant would redo the row stats
// vocab times).
template <typename T> __device__ void kl_bwd_ref_impl(const T* z, const T* rf, const T* g, T* dz, u64 rows, u64 vocab) {
    const u64 r = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const T* zr = z + r * vocab;
    const T* rr = rf + r * vocab;
    const float lz = ref_lse(zr, vocab), lr = ref_lse(rr, vocab), k = ref_kl(zr, rr, vocab), gf = to_f(g[r]);
    for (u64 j = 0; j < vocab; j++) {
        const float a = to_f(zr[j]) - lz, b = to_f(rr[j]) - lr;
        dz[r * vocab + j] = from_f<T>(gf * expf(a) * (a - b - k));
    }
}

// ---------------------------------------------------------------- fused linear CE pieces
// state: F32 [3, rows] = running max, running Σexp (relative to the max), target logit.
// `first` != 0 overwrites the state (the first chunk), else merges into it.
template <typename T>
__device__ void lce_chunk_fwd_impl(const T* logits, const i64* y, float* state, u64 rows, u64 cols, i64 c0, int first) {
    __shared__ float scratch[32];
    const u64 r = blockIdx.x;
    const T* row = logits + r * cols;
    Lse st;
    st.init();
    lse_row(row, cols, st);
    float cm, cs;
    st.block_merge(scratch, cm, cs);
    if (threadIdx.x == 0) {
        float* M = state;
        float* S = state + rows;
        float* Z = state + 2 * rows;
        if (first) {
            M[r] = cm;
            S[r] = cs;
        } else {
            const float om = M[r], os = S[r];
            const float nm = fmaxf(om, cm);
            if (nm > NEG_INF) {
                const float a = (om == NEG_INF) ? 0.f : os * expf(om - nm);
                const float b = (cm == NEG_INF) ? 0.f : cs * expf(cm - nm);
                M[r] = nm;
                S[r] = a + b;
            }
        }
        const i64 t = y[r];
        if (t != IGNORE_INDEX && t >= c0 && t < c0 + (i64)cols) Z[r] = to_f(row[t - c0]);
    }
}

// One thread per row: nll = lse − z_target (0 when ignored), lse = m + log s.
template <typename T> __device__ void lce_finish_impl(const float* state, const i64* y, T* nll, float* lse, u64 rows) {
    const u64 r = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float l = state[r] + logf(state[rows + r]);
    lse[r] = l;
    nll[r] = from_f<T>(y[r] == IGNORE_INDEX ? 0.f : l - state[2 * rows + r]);
}

// acc = x (first) or acc += x, elementwise over n (grid-stride).
template <typename T> __device__ void lce_accum_impl(float* acc, const T* x, u64 n, int first) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float v = to_f(x[i]);
        acc[i] = first ? v : acc[i] + v;
    }
}
// out (T) = acc, rounded.
template <typename T> __device__ void lce_store_impl(T* out, const float* acc, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) out[i] = from_f<T>(acc[i]);
}

#define CE_KERNELS(S, T)                                                                                                          \
    extern "C" __global__ void token_nll_fwd_##S(const T* z, const i64* y, T* nll, float* lse, u64 vocab) {                        \
        token_nll_fwd_impl<T>(z, y, nll, lse, vocab);                                                                             \
    }                                                                                                                             \
    extern "C" __global__ void token_nll_fwd_ref_##S(const T* z, const i64* y, T* nll, float* lse, u64 rows, u64 vocab) {          \
        token_nll_fwd_ref_impl<T>(z, y, nll, lse, rows, vocab);                                                                   \
    }                                                                                                                             \
    extern "C" __global__ void token_nll_bwd_##S(const T* z, const i64* y, const float* lse, const T* g, T* dz, u64 cols, i64 c0) { \
        token_nll_bwd_impl<T>(z, y, lse, g, dz, cols, c0);                                                                        \
    }                                                                                                                             \
    extern "C" __global__ void token_nll_bwd_ref_##S(const T* z, const i64* y, const float* lse, const T* g, T* dz, u64 rows,      \
                                                     u64 cols, i64 c0) {                                                          \
        token_nll_bwd_ref_impl<T>(z, y, lse, g, dz, rows, cols, c0);                                                              \
    }                                                                                                                             \
    extern "C" __global__ void kl_fwd_##S(const T* z, const T* r, T* kl, u64 vocab) { kl_fwd_impl<T>(z, r, kl, vocab); }          \
    extern "C" __global__ void kl_bwd_##S(const T* z, const T* r, const T* g, T* dz, u64 vocab) { kl_bwd_impl<T>(z, r, g, dz, vocab); } \
    extern "C" __global__ void kl_fwd_ref_##S(const T* z, const T* r, T* kl, u64 rows, u64 vocab) {                                \
        kl_fwd_ref_impl<T>(z, r, kl, rows, vocab);                                                                                \
    }                                                                                                                             \
    extern "C" __global__ void kl_bwd_ref_##S(const T* z, const T* r, const T* g, T* dz, u64 rows, u64 vocab) {                    \
        kl_bwd_ref_impl<T>(z, r, g, dz, rows, vocab);                                                                             \
    }                                                                                                                             \
    extern "C" __global__ void lce_chunk_fwd_##S(const T* logits, const i64* y, float* state, u64 rows, u64 cols, i64 c0,          \
                                                 int first) {                                                                     \
        lce_chunk_fwd_impl<T>(logits, y, state, rows, cols, c0, first);                                                           \
    }                                                                                                                             \
    extern "C" __global__ void lce_finish_##S(const float* state, const i64* y, T* nll, float* lse, u64 rows) {                    \
        lce_finish_impl<T>(state, y, nll, lse, rows);                                                                             \
    }                                                                                                                             \
    extern "C" __global__ void lce_accum_##S(float* acc, const T* x, u64 n, int first) { lce_accum_impl<T>(acc, x, n, first); }   \
    extern "C" __global__ void lce_store_##S(T* out, const float* acc, u64 n) { lce_store_impl<T>(out, acc, n); }

FLOAT_KERNELS(CE_KERNELS)
