// rms_norm.cu — RMSNorm over the last dimension, forward and backward.
//
// Layouts (all contiguous, row-major): x, y, dy, dx [rows, dim] in T; w, dw [dim] in T;
// rstd [rows] in F32 for every T (it is only handed back to the backward by ops/rms_norm.rs, so the
// GPU keeps it in full precision even for bf16/f16 inputs).
//
// Forward, per row:   r = 1 / sqrt(mean(x²) + eps)          (sum in f32, then / dim)
//                     y = x · r · w
// Backward, per row:  dot = Σ_j dy_j · w_j · x_j
//                     dx  = r · dy · w − x · (dot · r³ / dim)
//                     dw  = Σ_rows dy · x · r                 (reduced over rows, deterministically)
//
// Kernels (each `_<dtype>` for f32, bf16, f16):
//   rms_norm_fwd            one warp per row, 128-bit loads (Pack128) when dim % pack == 0 and the
//                           pointers are 16-byte aligned, a scalar loop otherwise.
//   rms_norm_bwd_dx         the same shape for dx.
//   rms_norm_bwd_dw_partial grid (column blocks, row chunks): thread owns `pack` columns, sums
//                           dy·x·r over the rows of its chunk into F32 scratch part[chunk, dim].
//   rms_norm_bwd_dw_finish  dw[c] = Σ_chunk part[chunk, c] in a fixed order (no float atomics, so
//                           dw is bitwise reproducible for a given shape).
//   rms_norm_fwd_ref, rms_norm_bwd_dx_ref, rms_norm_bwd_dw_ref: simple references (one thread per
//                           row / per column, scalar loads, no shared memory).

#define RMS_WARPS 4  // rows (warps) per block of the warp-per-row kernels: blockDim.x = 32 * RMS_WARPS

template <typename T>
__device__ __forceinline__ void rms_fwd_impl(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, float* __restrict__ rstd,
                                             u64 rows, int dim, float eps) {
    const u64 row = (u64)blockIdx.x * RMS_WARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;  // the whole warp leaves together
    constexpr int N = Pack128<T>::N;
    const T* xr = x + row * (u64)dim;
    T* yr = y + row * (u64)dim;
    const bool vec = (dim % N) == 0 && aligned16(x) && aligned16(w) && aligned16(y);
    float ss = 0.f;
    if (vec) {
        for (int i = lane * N; i < dim; i += 32 * N) {
            const Pack128<T> p = load128(xr + i);
#pragma unroll
            for (int k = 0; k < N; k++) {
                const float f = to_f(p.v[k]);
                ss += f * f;
            }
        }
    } else {
        for (int i = lane; i < dim; i += 32) {
            const float f = to_f(xr[i]);
            ss += f * f;
        }
    }
    ss = warp_sum(ss);
    const float r = 1.f / sqrtf(ss / (float)dim + eps);
    if (lane == 0) rstd[row] = r;
    if (vec) {
        for (int i = lane * N; i < dim; i += 32 * N) {
            const Pack128<T> px = load128(xr + i);
            const Pack128<T> pw = load128(w + i);
            Pack128<T> py;
#pragma unroll
            for (int k = 0; k < N; k++) py.v[k] = from_f<T>(to_f(px.v[k]) * r * to_f(pw.v[k]));
            store128(yr + i, py);
        }
    } else {
        for (int i = lane; i < dim; i += 32) yr[i] = from_f<T>(to_f(xr[i]) * r * to_f(w[i]));
    }
}

template <typename T>
__device__ __forceinline__ void rms_bwd_dx_impl(const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ rstd,
                                                const T* __restrict__ dy, T* __restrict__ dx, u64 rows, int dim) {
    const u64 row = (u64)blockIdx.x * RMS_WARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    constexpr int N = Pack128<T>::N;
    const u64 off = row * (u64)dim;
    const T* xr = x + off;
    const T* gr = dy + off;
    T* dr = dx + off;
    const bool vec = (dim % N) == 0 && aligned16(x) && aligned16(w) && aligned16(dy) && aligned16(dx);
    float dot = 0.f;
    if (vec) {
        for (int i = lane * N; i < dim; i += 32 * N) {
            const Pack128<T> px = load128(xr + i), pw = load128(w + i), pg = load128(gr + i);
#pragma unroll
            for (int k = 0; k < N; k++) dot += to_f(pg.v[k]) * to_f(pw.v[k]) * to_f(px.v[k]);
        }
    } else {
        for (int i = lane; i < dim; i += 32) dot += to_f(gr[i]) * to_f(w[i]) * to_f(xr[i]);
    }
    dot = warp_sum(dot);
    const float r = rstd[row];
    const float c = dot * r * r * r / (float)dim;
    if (vec) {
        for (int i = lane * N; i < dim; i += 32 * N) {
            const Pack128<T> px = load128(xr + i), pw = load128(w + i), pg = load128(gr + i);
            Pack128<T> pd;
#pragma unroll
            for (int k = 0; k < N; k++) pd.v[k] = from_f<T>(r * to_f(pg.v[k]) * to_f(pw.v[k]) - to_f(px.v[k]) * c);
            store128(dr + i, pd);
        }
    } else {
        for (int i = lane; i < dim; i += 32) dr[i] = from_f<T>(r * to_f(gr[i]) * to_f(w[i]) - to_f(xr[i]) * c);
    }
}

// Block b covers columns [b·256·N, (b+1)·256·N) (blockDim.x == 256); chunk blockIdx.y covers rows
// [chunk·rows_per_chunk, min(rows, (chunk+1)·rows_per_chunk)). Writes part[chunk·dim + c] for every
// column c of its range that is < dim (every chunk writes, so the scratch needs no zeroing).
#define DW_THREADS 256
template <typename T>
__device__ __forceinline__ void rms_bwd_dw_partial_impl(const T* __restrict__ x, const float* __restrict__ rstd, const T* __restrict__ dy,
                                                        float* __restrict__ part, u64 rows, int dim, u64 rows_per_chunk) {
    constexpr int N = Pack128<T>::N;
    const u64 chunk = blockIdx.y;
    const u64 r0 = chunk * rows_per_chunk;
    const u64 r1 = min(rows, r0 + rows_per_chunk);
    const int base = blockIdx.x * (DW_THREADS * N);
    float acc[N];
#pragma unroll
    for (int k = 0; k < N; k++) acc[k] = 0.f;
    const bool vec = (dim % N) == 0 && aligned16(x) && aligned16(dy);
    float* pr = part + chunk * (u64)dim;
    if (vec) {
        // Thread owns N consecutive columns c0 .. c0+N (all < dim when c0 < dim, since dim % N == 0).
        const int c0 = base + threadIdx.x * N;
        if (c0 >= dim) return;
        for (u64 row = r0; row < r1; row++) {
            const float r = rstd[row];
            const Pack128<T> px = load128(x + row * (u64)dim + c0), pg = load128(dy + row * (u64)dim + c0);
#pragma unroll
            for (int k = 0; k < N; k++) acc[k] += to_f(pg.v[k]) * to_f(px.v[k]) * r;
        }
#pragma unroll
        for (int k = 0; k < N; k++) pr[c0 + k] = acc[k];
    } else {
        // Thread owns columns base + threadIdx.x + k·256 (coalesced scalar loads).
        for (u64 row = r0; row < r1; row++) {
            const float r = rstd[row];
            const u64 o = row * (u64)dim;
#pragma unroll
            for (int k = 0; k < N; k++) {
                const int c = base + threadIdx.x + k * DW_THREADS;
                if (c < dim) acc[k] += to_f(dy[o + c]) * to_f(x[o + c]) * r;
            }
        }
#pragma unroll
        for (int k = 0; k < N; k++) {
            const int c = base + threadIdx.x + k * DW_THREADS;
            if (c < dim) pr[c] = acc[k];
        }
    }
}

// blockDim (32, 8): threadIdx.x picks the column of blockIdx.x·32, threadIdx.y strides the chunks;
// the 8 stripes are then added in order by threadIdx.y == 0.
template <typename T>
__device__ __forceinline__ void rms_bwd_dw_finish_impl(const float* __restrict__ part, T* __restrict__ dw, int chunks, int dim) {
    __shared__ float s[8][32];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float acc = 0.f;
    if (c < dim)
        for (int k = threadIdx.y; k < chunks; k += 8) acc += part[(u64)k * dim + c];
    s[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < dim) {
        float t = 0.f;
#pragma unroll
        for (int j = 0; j < 8; j++) t += s[j][threadIdx.x];
        dw[c] = from_f<T>(t);
    }
}

// ---- references: one thread per row (forward, dx) or per column (dw), scalar loads ----

template <typename T>
__device__ __forceinline__ void rms_fwd_ref_impl(const T* x, const T* w, T* y, float* rstd, u64 rows, int dim, float eps) {
    const u64 row = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    const T* xr = x + row * (u64)dim;
    float ss = 0.f;
    for (int i = 0; i < dim; i++) ss += to_f(xr[i]) * to_f(xr[i]);
    const float r = 1.f / sqrtf(ss / (float)dim + eps);
    rstd[row] = r;
    for (int i = 0; i < dim; i++) y[row * (u64)dim + i] = from_f<T>(to_f(xr[i]) * r * to_f(w[i]));
}

template <typename T>
__device__ __forceinline__ void rms_bwd_dx_ref_impl(const T* x, const T* w, const float* rstd, const T* dy, T* dx, u64 rows, int dim) {
    const u64 row = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    const u64 o = row * (u64)dim;
    float dot = 0.f;
    for (int i = 0; i < dim; i++) dot += to_f(dy[o + i]) * to_f(w[i]) * to_f(x[o + i]);
    const float r = rstd[row];
    const float c = dot * r * r * r / (float)dim;
    for (int i = 0; i < dim; i++) dx[o + i] = from_f<T>(r * to_f(dy[o + i]) * to_f(w[i]) - to_f(x[o + i]) * c);
}

template <typename T>
__device__ __forceinline__ void rms_bwd_dw_ref_impl(const T* x, const float* rstd, const T* dy, T* dw, u64 rows, int dim) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= dim) return;
    float acc = 0.f;
    for (u64 row = 0; row < rows; row++) acc += to_f(dy[row * (u64)dim + c]) * to_f(x[row * (u64)dim + c]) * rstd[row];
    dw[c] = from_f<T>(acc);
}

#define RMS_NORM_KERNELS(S, T)                                                                                                         \
    extern "C" __global__ void __launch_bounds__(32 * RMS_WARPS) rms_norm_fwd_##S(const T* x, const T* w, T* y, float* rstd, u64 rows, \
                                                                                   int dim, float eps) {                               \
        rms_fwd_impl<T>(x, w, y, rstd, rows, dim, eps);                                                                               \
    }                                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * RMS_WARPS)                                                                      \
        rms_norm_bwd_dx_##S(const T* x, const T* w, const float* rstd, const T* dy, T* dx, u64 rows, int dim) {                       \
        rms_bwd_dx_impl<T>(x, w, rstd, dy, dx, rows, dim);                                                                            \
    }                                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(DW_THREADS)                                                                          \
        rms_norm_bwd_dw_partial_##S(const T* x, const float* rstd, const T* dy, float* part, u64 rows, int dim, u64 rows_per_chunk) { \
        rms_bwd_dw_partial_impl<T>(x, rstd, dy, part, rows, dim, rows_per_chunk);                                                     \
    }                                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) rms_norm_bwd_dw_finish_##S(const float* part, T* dw, int chunks, int dim) {     \
        rms_bwd_dw_finish_impl<T>(part, dw, chunks, dim);                                                                             \
    }                                                                                                                                  \
    extern "C" __global__ void rms_norm_fwd_ref_##S(const T* x, const T* w, T* y, float* rstd, u64 rows, int dim, float eps) {        \
        rms_fwd_ref_impl<T>(x, w, y, rstd, rows, dim, eps);                                                                           \
    }                                                                                                                                  \
    extern "C" __global__ void rms_norm_bwd_dx_ref_##S(const T* x, const T* w, const float* rstd, const T* dy, T* dx, u64 rows,       \
                                                       int dim) {                                                                     \
        rms_bwd_dx_ref_impl<T>(x, w, rstd, dy, dx, rows, dim);                                                                        \
    }                                                                                                                                  \
    extern "C" __global__ void rms_norm_bwd_dw_ref_##S(const T* x, const float* rstd, const T* dy, T* dw, u64 rows, int dim) {        \
        rms_bwd_dw_ref_impl<T>(x, rstd, dy, dw, rows, dim);                                                                           \
    }

FLOAT_KERNELS(RMS_NORM_KERNELS)
