// reduce.cu — column sums and the full sum.
//
//   sum_rows:  y[c] = Σ_r x[r, c]          x: [rows, cols] row-major, y: [cols] (the dtype of x)
//              (the backward of add_row / mul_row's row operand and of a bias)
//   sum_all:   s   = Σ_i x[i]  as f64      (loss values; its backward is a broadcast, an affine op)
//
// Both are deterministic: the work split depends only on the shape, never on timing or atomics.
//
// sum_rows (fast): pass 1 cuts the rows into `chunks` contiguous chunks; block (32, 8) sums 32
// columns of one chunk (thread (tx, ty) takes rows ty, ty+8, ... of the chunk, then the 8 partial
// sums are added in ty order) into part[chunk, col] (f32; f64 for f64 input). Pass 2 adds the
// chunks of each column in chunk order and rounds once to the output dtype. The reference kernel
// (one thread per column, rows in order) reproduces the CPU backend's order exactly.
//
// sum_all (fast): pass 1, a fixed number of blocks (chosen from n) each grid-stride over x
// (128-bit loads when aligned) accumulating in f64, then a block tree-sum into part[block]; pass 2,
// one block adds the parts into out[0]. The reference is one thread adding in index order (the CPU
// backend's order, in f64).

// ---------------------------------------------------------------- sum_rows
// Launch: grid (ceil(cols / 32), chunks), block (32, 8). part: [chunks, cols] of Acc<T>.
template <typename T>
__device__ void sum_rows_part_impl(const T* __restrict__ x, typename Acc<T>::t* __restrict__ part, u64 rows, u64 cols, u64 rows_per_chunk) {
    typedef typename Acc<T>::t A;
    __shared__ A sh[8][33];
    const u64 col = (u64)blockIdx.x * 32 + threadIdx.x;
    const u64 r0 = (u64)blockIdx.y * rows_per_chunk;
    const u64 r1 = min(rows, r0 + rows_per_chunk);
    A acc = 0;
    if (col < cols)
        for (u64 r = r0 + threadIdx.y; r < r1; r += 8) acc += (A)to_f(x[r * cols + col]);
    sh[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < cols) {
        A s = sh[0][threadIdx.x];
#pragma unroll
        for (int k = 1; k < 8; ++k) s += sh[k][threadIdx.x];
        part[(u64)blockIdx.y * cols + col] = s;
    }
}
// One thread per column: y[c] = Σ_chunk part[chunk, c].
template <typename T> __device__ void sum_rows_final_impl(const typename Acc<T>::t* __restrict__ part, T* __restrict__ y, u64 chunks, u64 cols) {
    typedef typename Acc<T>::t A;
    const u64 c = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    A s = 0;
    for (u64 k = 0; k < chunks; ++k) s += part[k * cols + c];
    put(y[c], s);
}
// Reference: one thread per column, rows in order.
template <typename T> __device__ void sum_rows_ref_impl(const T* x, T* y, u64 rows, u64 cols) {
    typedef typename Acc<T>::t A;
    const u64 c = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    A s = 0;
    for (u64 r = 0; r < rows; ++r) s += (A)to_f(x[r * cols + c]);
    put(y[c], s);
}

// ---------------------------------------------------------------- sum_all
__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
// Block sum in f64 (blockDim.x a multiple of 32, ≤ 1024); the result is valid in thread 0.
__device__ __forceinline__ double block_sum_d(double v) {
    __shared__ double scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_d(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = threadIdx.x < nw ? scratch[threadIdx.x] : 0.0;
    if (warp == 0) v = warp_sum_d(v);
    return v;
}
// Launch: grid (blocks), block 256. part: [blocks] f64.
template <typename T> __device__ void sum_all_part_impl(const T* __restrict__ x, double* __restrict__ part, u64 n) {
    constexpr int N = Pack128<T>::N;
    const u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x, stride = (u64)gridDim.x * blockDim.x;
    const u64 nvec = aligned16(x) ? n / N : 0;
    double acc = 0.0;
    for (u64 p = tid; p < nvec; p += stride) {
        const Pack128<T> v = load128(x + p * N);
        // Each element is widened and added in f64.
#pragma unroll
        for (int j = 0; j < N; ++j) acc += (double)to_f(v.v[j]);
    }
    for (u64 i = nvec * N + tid; i < n; i += stride) acc += (double)to_f(x[i]);
    acc = block_sum_d(acc);
    if (threadIdx.x == 0) part[blockIdx.x] = acc;
}
// One block of 256 threads: out[0] = Σ part.
extern "C" __global__ void sum_all_final(const double* __restrict__ part, double* __restrict__ out, u64 parts) {
    double acc = 0.0;
    for (u64 i = threadIdx.x; i < parts; i += blockDim.x) acc += part[i];
    acc = block_sum_d(acc);
    if (threadIdx.x == 0) out[0] = acc;
}
// Reference: a single thread, index order, f64.
template <typename T> __device__ void sum_all_ref_impl(const T* x, double* out, u64 n) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double s = 0.0;
    for (u64 i = 0; i < n; ++i) s += (double)to_f(x[i]);
    out[0] = s;
}

#define REDUCE(S, T)                                                                                                      \
    extern "C" __global__ void sum_rows_part_##S(const T* x, Acc<T>::t* part, u64 rows, u64 cols, u64 rows_per_chunk) { \
        sum_rows_part_impl<T>(x, part, rows, cols, rows_per_chunk);                                                       \
    }                                                                                                                     \
    extern "C" __global__ void sum_rows_final_##S(const Acc<T>::t* part, T* y, u64 chunks, u64 cols) {                  \
        sum_rows_final_impl<T>(part, y, chunks, cols);                                                                    \
    }                                                                                                                     \
    extern "C" __global__ void sum_rows_ref_##S(const T* x, T* y, u64 rows, u64 cols) { sum_rows_ref_impl<T>(x, y, rows, cols); } \
    extern "C" __global__ void sum_all_part_##S(const T* x, double* part, u64 n) { sum_all_part_impl<T>(x, part, n); }  \
    extern "C" __global__ void sum_all_ref_##S(const T* x, double* out, u64 n) { sum_all_ref_impl<T>(x, out, n); }
REDUCE(f32, float)
REDUCE(bf16, bf16)
REDUCE(f16, __half)
REDUCE(f64, double)
