// elementwise.cu — dtype conversion, strided gather, binary ops, affine, in-place add, row
// broadcasts and the KV-cache block copy. All tensors are flat, contiguous, row-major buffers
// (the strided gather takes a layout); n, rows·cols and offsets are u64.
//
// Math (forward; the backward of each op is another op of this file, wired in runtime/src/ops):
//   cast:          y[i] = convert(x[i])        floats: round to nearest even; I64→U32 range-checked
//                                              (a device flag records the first bad index); I64→U8 is x≠0
//   gather:        y[i] = x[off + Σ_d idx_d(i)·stride_d]   (i in row-major order of `shape`)
//   binary:        y = a + b | a − b | a ∘ b                (d: (g, g) | (g, −g) | (g∘b, g∘a))
//   affine:        y = x·mul + add                          (d: mul·g)
//   add_assign:    a += b                                   (gradient accumulation)
//   add_row:       y[r, c] = a[r, c] + row[c]   over [rows, cols]   (d row = column sums, reduce.cu)
//   mul_row:       y[r, c] = a[r, c] · row[c]
//   write_blocks:  dst[o·dst_stride + dst_offset + j] = src[o·len + j],  o < outer, j < len
//
// Every float kernel computes in f32 for f32/bf16/f16 storage and in f64 for f64 storage, and
// rounds once on the store. f32 results match the CPU backend bit for bit (no FMA contraction:
// the multiply and add of affine are rounded separately, as the CPU does).
//
// The fast kernels move 128 bits per thread when every pointer is 16-byte aligned (then a scalar
// tail); the copy kernels (gather, write_blocks) move "units" of 1..16 bytes that the launcher picks
// as the widest size dividing every byte offset, so they are dtype-agnostic. Each fast kernel has
// a simple one-thread-per-element `_ref` kernel beside it (checked in parity).

// Unfused arithmetic (matches the CPU backend, which never contracts to FMA).
template <int OP> __device__ __forceinline__ float bop(float a, float b) {
    return OP == 0 ? __fadd_rn(a, b) : OP == 1 ? __fsub_rn(a, b) : __fmul_rn(a, b);
}
template <int OP> __device__ __forceinline__ double bop(double a, double b) {
    return OP == 0 ? __dadd_rn(a, b) : OP == 1 ? __dsub_rn(a, b) : __dmul_rn(a, b);
}
__device__ __forceinline__ float affine_op(float x, float m, float c) { return __fadd_rn(__fmul_rn(x, m), c); }
__device__ __forceinline__ double affine_op(double x, double m, double c) { return __dadd_rn(__dmul_rn(x, m), c); }

__device__ __forceinline__ u64 gtid() { return (u64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ u64 gstride() { return (u64)gridDim.x * blockDim.x; }

// ---------------------------------------------------------------- cast (to_dtype)
// One kernel per supported pair (the CPU backend's pairs plus every float↔float pair).
#define CAST(SN, S, DN, D, EXPR)                                                                   \
    extern "C" __global__ void cast_##SN##_##DN(const S* __restrict__ x, D* __restrict__ y, u64 n) { \
        for (u64 i = gtid(); i < n; i += gstride()) {                                              \
            const S v = x[i];                                                                      \
            y[i] = EXPR;                                                                           \
        }                                                                                          \
    }
CAST(f32, float, f64, double, (double)v)
CAST(f32, float, bf16, bf16, __float2bfloat16_rn(v))
CAST(f32, float, f16, __half, __float2half_rn(v))
CAST(f64, double, f32, float, __double2float_rn(v))
CAST(f64, double, bf16, bf16, __double2bfloat16(v))
CAST(f64, double, f16, __half, __double2half(v))
CAST(bf16, bf16, f32, float, __bfloat162float(v))
CAST(bf16, bf16, f64, double, (double)__bfloat162float(v))
CAST(bf16, bf16, f16, __half, __float2half_rn(__bfloat162float(v)))
CAST(f16, __half, f32, float, __half2float(v))
CAST(f16, __half, f64, double, (double)__half2float(v))
CAST(f16, __half, bf16, bf16, __float2bfloat16_rn(__half2float(v)))
CAST(u32, u32, i64, i64, (i64)v)
CAST(i64, i64, f32, float, __ll2float_rn(v))
CAST(i64, i64, f64, double, __ll2double_rn(v))
CAST(i64, i64, u8, u8, (u8)(v != 0))

// I64 → U32 with a range check: out-of-range values store 0 and raise `bad[0] = max(n − i)`, so
// the first offending index is n − bad[0] (bad is zeroed by the caller; 0 = all in range).
extern "C" __global__ void cast_i64_u32(const i64* __restrict__ x, u32* __restrict__ y, u64 n, u64* bad) {
    for (u64 i = gtid(); i < n; i += gstride()) {
        const i64 v = x[i];
        const bool ok = v >= 0 && v <= 0xffffffffLL;
        y[i] = ok ? (u32)v : 0u;
        if (!ok) atomicMax(bad, n - i);
    }
}

// ---------------------------------------------------------------- gather (copy_strided)
// The layout is passed innermost dimension first (sz0/st0 = the last dimension) after the
// launcher merged mergeable dimensions and dropped size-1 ones; nd ≤ 8. Sizes, strides and the
// offset are in units of W. I = u32 when every index fits (cheaper divisions), else u64.
template <typename W, typename I>
__device__ void gather_impl(const W* __restrict__ x, W* __restrict__ y, u64 n, int nd, u64 off, u64 sz0, u64 sz1, u64 sz2,
                            u64 sz3, u64 sz4, u64 sz5, u64 sz6, u64 sz7, u64 st0, u64 st1, u64 st2, u64 st3, u64 st4, u64 st5,
                            u64 st6, u64 st7) {
    const I sz[8] = {(I)sz0, (I)sz1, (I)sz2, (I)sz3, (I)sz4, (I)sz5, (I)sz6, (I)sz7};
    const I st[8] = {(I)st0, (I)st1, (I)st2, (I)st3, (I)st4, (I)st5, (I)st6, (I)st7};
    for (u64 i = gtid(); i < n; i += gstride()) {
        I rem = (I)i, src = (I)off;
#pragma unroll
        for (int d = 0; d < 8; ++d) {
            if (d < nd) {
                const I q = rem / sz[d];
                src += (rem - q * sz[d]) * st[d];
                rem = q;
            }
        }
        y[i] = x[src];
    }
}
#define GATHER_ARGS                                                                                                   \
    u64 n, int nd, u64 off, u64 sz0, u64 sz1, u64 sz2, u64 sz3, u64 sz4, u64 sz5, u64 sz6, u64 sz7, u64 st0, u64 st1, \
        u64 st2, u64 st3, u64 st4, u64 st5, u64 st6, u64 st7
#define GATHER_PASS n, nd, off, sz0, sz1, sz2, sz3, sz4, sz5, sz6, sz7, st0, st1, st2, st3, st4, st5, st6, st7
#define GATHER(NAME, W)                                                                                    \
    extern "C" __global__ void gather_##NAME##_i32(const W* __restrict__ x, W* __restrict__ y, GATHER_ARGS) { \
        gather_impl<W, u32>(x, y, GATHER_PASS);                                                            \
    }                                                                                                      \
    extern "C" __global__ void gather_##NAME##_i64(const W* __restrict__ x, W* __restrict__ y, GATHER_ARGS) { \
        gather_impl<W, u64>(x, y, GATHER_PASS);                                                            \
    }
GATHER(b1, u8)
GATHER(b2, unsigned short)
GATHER(b4, u32)
GATHER(b8, u64)
GATHER(b16, uint4)

// Reference: one thread per output element, u64 index math, the layout exactly as given (not
// merged), element-sized units.
template <typename W>
__device__ void gather_ref_impl(const W* __restrict__ x, W* __restrict__ y, u64 n, int nd, u64 off, u64 sz0, u64 sz1, u64 sz2,
                                u64 sz3, u64 sz4, u64 sz5, u64 sz6, u64 sz7, u64 st0, u64 st1, u64 st2, u64 st3, u64 st4, u64 st5,
                                u64 st6, u64 st7) {
    const u64 i = gtid();
    if (i >= n) return;
    const u64 sz[8] = {sz0, sz1, sz2, sz3, sz4, sz5, sz6, sz7};
    const u64 st[8] = {st0, st1, st2, st3, st4, st5, st6, st7};
    u64 rem = i, src = off;
#pragma unroll
    for (int d = 0; d < 8; ++d) {
        if (d < nd) {
            src += (rem % sz[d]) * st[d];
            rem /= sz[d];
        }
    }
    y[i] = x[src];
}
#define GATHER_REF(NAME, W)                                                                                    \
    extern "C" __global__ void gather_ref_##NAME(const W* __restrict__ x, W* __restrict__ y, GATHER_ARGS) { \
        gather_ref_impl<W>(x, y, GATHER_PASS);                                                                 \
    }
GATHER_REF(b1, u8)
GATHER_REF(b2, unsigned short)
GATHER_REF(b4, u32)
GATHER_REF(b8, u64)

// ---------------------------------------------------------------- binary, add_assign
// OP: 0 add, 1 sub, 2 mul. y may alias a (add_assign passes y = a).
template <typename T, int OP> __device__ void binary_impl(const T* a, const T* __restrict__ b, T* y, u64 n) {
    typedef typename Acc<T>::t A;
    constexpr int N = Pack128<T>::N;
    const bool vec = aligned16(a) && aligned16(b) && aligned16(y);
    const u64 nvec = vec ? n / N : 0;
    for (u64 p = gtid(); p < nvec; p += gstride()) {
        const Pack128<T> pa = load128(a + p * N), pb = load128(b + p * N);
        Pack128<T> py;
#pragma unroll
        for (int j = 0; j < N; ++j) put(py.v[j], bop<OP>((A)to_f(pa.v[j]), (A)to_f(pb.v[j])));
        store128(y + p * N, py);
    }
    for (u64 i = nvec * N + gtid(); i < n; i += gstride()) put(y[i], bop<OP>((A)to_f(a[i]), (A)to_f(b[i])));
}
template <typename T, int OP> __device__ void binary_ref_impl(const T* a, const T* b, T* y, u64 n) {
    typedef typename Acc<T>::t A;
    const u64 i = gtid();
    if (i < n) put(y[i], bop<OP>((A)to_f(a[i]), (A)to_f(b[i])));
}
#define BINARY(S, T)                                                                                                  \
    extern "C" __global__ void add_##S(const T* a, const T* b, T* y, u64 n) { binary_impl<T, 0>(a, b, y, n); }         \
    extern "C" __global__ void sub_##S(const T* a, const T* b, T* y, u64 n) { binary_impl<T, 1>(a, b, y, n); }         \
    extern "C" __global__ void mul_##S(const T* a, const T* b, T* y, u64 n) { binary_impl<T, 2>(a, b, y, n); }         \
    extern "C" __global__ void add_ref_##S(const T* a, const T* b, T* y, u64 n) { binary_ref_impl<T, 0>(a, b, y, n); } \
    extern "C" __global__ void sub_ref_##S(const T* a, const T* b, T* y, u64 n) { binary_ref_impl<T, 1>(a, b, y, n); } \
    extern "C" __global__ void mul_ref_##S(const T* a, const T* b, T* y, u64 n) { binary_ref_impl<T, 2>(a, b, y, n); } \
    extern "C" __global__ void add_assign_##S(T* a, const T* b, u64 n) { binary_impl<T, 0>(a, b, a, n); }              \
    extern "C" __global__ void add_assign_ref_##S(T* a, const T* b, u64 n) { binary_ref_impl<T, 0>(a, b, a, n); }

// ---------------------------------------------------------------- affine
template <typename T> __device__ void affine_impl(const T* __restrict__ x, T* __restrict__ y, u64 n, double mul, double add) {
    typedef typename Acc<T>::t A;
    constexpr int N = Pack128<T>::N;
    const A m = (A)mul, c = (A)add;
    const bool vec = aligned16(x) && aligned16(y);
    const u64 nvec = vec ? n / N : 0;
    for (u64 p = gtid(); p < nvec; p += gstride()) {
        const Pack128<T> px = load128(x + p * N);
        Pack128<T> py;
#pragma unroll
        for (int j = 0; j < N; ++j) put(py.v[j], affine_op((A)to_f(px.v[j]), m, c));
        store128(y + p * N, py);
    }
    for (u64 i = nvec * N + gtid(); i < n; i += gstride()) put(y[i], affine_op((A)to_f(x[i]), m, c));
}
template <typename T> __device__ void affine_ref_impl(const T* x, T* y, u64 n, double mul, double add) {
    typedef typename Acc<T>::t A;
    const u64 i = gtid();
    if (i < n) put(y[i], affine_op((A)to_f(x[i]), (A)mul, (A)add));
}
#define AFFINE(S, T)                                                                                                                   \
    extern "C" __global__ void affine_##S(const T* x, T* y, u64 n, double mul, double add) { affine_impl<T>(x, y, n, mul, add); }     \
    extern "C" __global__ void affine_ref_##S(const T* x, T* y, u64 n, double mul, double add) { affine_ref_impl<T>(x, y, n, mul, add); }

// ---------------------------------------------------------------- add_row, mul_row
// a: [n / cols, cols], row: [cols]. 128-bit path when cols is a multiple of the pack width (a pack
// then never straddles two rows and row + c stays 16-byte aligned).
template <typename T, int OP> __device__ void row_impl(const T* __restrict__ a, const T* __restrict__ row, T* __restrict__ y, u64 n, u64 cols) {
    typedef typename Acc<T>::t A;
    constexpr int N = Pack128<T>::N;
    const bool vec = aligned16(a) && aligned16(row) && aligned16(y) && cols % N == 0;
    const u64 nvec = vec ? n / N : 0;
    for (u64 p = gtid(); p < nvec; p += gstride()) {
        const u64 i = p * N, c = i % cols;
        const Pack128<T> pa = load128(a + i), pr = load128(row + c);
        Pack128<T> py;
#pragma unroll
        for (int j = 0; j < N; ++j) put(py.v[j], bop<OP>((A)to_f(pa.v[j]), (A)to_f(pr.v[j])));
        store128(y + i, py);
    }
    for (u64 i = nvec * N + gtid(); i < n; i += gstride()) put(y[i], bop<OP>((A)to_f(a[i]), (A)to_f(row[i % cols])));
}
template <typename T, int OP> __device__ void row_ref_impl(const T* a, const T* row, T* y, u64 n, u64 cols) {
    typedef typename Acc<T>::t A;
    const u64 i = gtid();
    if (i < n) put(y[i], bop<OP>((A)to_f(a[i]), (A)to_f(row[i % cols])));
}
#define ROWS(S, T)                                                                                                                       \
    extern "C" __global__ void add_row_##S(const T* a, const T* r, T* y, u64 n, u64 cols) { row_impl<T, 0>(a, r, y, n, cols); }         \
    extern "C" __global__ void mul_row_##S(const T* a, const T* r, T* y, u64 n, u64 cols) { row_impl<T, 2>(a, r, y, n, cols); }         \
    extern "C" __global__ void add_row_ref_##S(const T* a, const T* r, T* y, u64 n, u64 cols) { row_ref_impl<T, 0>(a, r, y, n, cols); } \
    extern "C" __global__ void mul_row_ref_##S(const T* a, const T* r, T* y, u64 n, u64 cols) { row_ref_impl<T, 2>(a, r, y, n, cols); }

#define FLOAT_OPS(S, T) BINARY(S, T) AFFINE(S, T) ROWS(S, T)
FLOAT_OPS(f32, float)
FLOAT_OPS(bf16, bf16)
FLOAT_OPS(f16, __half)
FLOAT_OPS(f64, double)

// ---------------------------------------------------------------- write_blocks
// Units of W bytes (the launcher rescales len, dst_stride and dst_offset). Grid: x over the block's
// elements, y over blocks (grid-strided both ways, so any outer fits the 65535 limit of y).
template <typename W>
__device__ void write_blocks_impl(W* __restrict__ dst, const W* __restrict__ src, u64 outer, u64 len, u64 dst_stride, u64 dst_offset) {
    for (u64 o = blockIdx.y; o < outer; o += gridDim.y) {
        const W* s = src + o * len;
        W* d = dst + o * dst_stride + dst_offset;
        for (u64 j = gtid(); j < len; j += gstride()) d[j] = s[j];
    }
}
// Reference: one thread per element, u64 division.
template <typename W> __device__ void write_blocks_ref_impl(W* dst, const W* src, u64 outer, u64 len, u64 dst_stride, u64 dst_offset) {
    const u64 i = gtid();
    if (i >= outer * len) return;
    const u64 o = i / len, j = i - o * len;
    dst[o * dst_stride + dst_offset + j] = src[i];
}
#define WRITE_BLOCKS(NAME, W)                                                                                              \
    extern "C" __global__ void write_blocks_##NAME(W* dst, const W* src, u64 outer, u64 len, u64 dst_stride, u64 dst_offset) { \
        write_blocks_impl<W>(dst, src, outer, len, dst_stride, dst_offset);                                                \
    }                                                                                                                      \
    extern "C" __global__ void write_blocks_ref_##NAME(W* dst, const W* src, u64 outer, u64 len, u64 dst_stride, u64 dst_offset) { \
        write_blocks_ref_impl<W>(dst, src, outer, len, dst_stride, dst_offset);                                            \
    }
WRITE_BLOCKS(b1, u8)
WRITE_BLOCKS(b2, unsigned short)
WRITE_BLOCKS(b4, u32)
WRITE_BLOCKS(b8, u64)
WRITE_BLOCKS(b16, uint4)
