// nf4.cu — bitsandbytes 4-bit (NF4 / FP4) weights: dequantisation and the fused dequant-GEMMs of
// QLoRA's frozen base layer.
//
// Layout (bitsandbytes, byte for byte): the weight W [out, in] is flattened row-major (flat index
// i = o·in + c) and packed two codes per byte, element 2j in the HIGH nibble of byte j and 2j+1 in
// the LOW nibble. Scales: one f32 absmax per `bs` consecutive flat elements (blocks ignore row
// boundaries; bs is even, so a block starts on a byte). Value:
//     Ŵ[i] = code[q(i)] · absmax[i / bs]                      (one f32 multiply, as the CPU does)
// Double quantisation stores the absmax as u8 codes c[b] with a nested f32 absmax per 256 blocks
// (nested_bs) and an offset:
//     absmax[b] = map[c[b]] · nested_absmax[b / nested_bs] + offset   (f32 multiply, then f32 add:
//     two roundings exactly like the CPU's double_dequantize; __fmul_rn/__fadd_rn forbid an FMA)
// The decode (nf4_absmax_decode) runs once per weight and device; every kernel below reads f32 absmax.
//
// Linear layer (no weight gradient: the base is frozen):
//     forward   y[m, o]  = Σ_c x[m, c] · Ŵ[o, c]          (y = x·Ŵᵀ;  M = rows, N = out, K = in)
//     input grad dx[m, c] = Σ_o dy[m, o] · Ŵ[o, c]        (dx = dy·Ŵ;  M = rows, N = in,  K = out)
// Both are one GEMM template C[M, N] = A[M, K] · B̂[K, N] where B̂ is produced from the packed
// weight while a tile is staged into shared memory:
//     TRANS = false (forward): B̂[k, n] = Ŵ[n·ldw + k]
//     TRANS = true  (dx):      B̂[k, n] = Ŵ[k·ldw + n]          (ldw = in in both cases)
// Kernels:
//   nf4_absmax_decode             double-quant scale decode (u8 codes -> f32)
//   nf4_dequant_<T>               whole weight -> dense [out, in] in T (one thread per byte)
//   nf4_gemm_simt_{fwd,dx}_f32    64x64x16 tiles, 256 threads, 4x4 f32 FMA per thread
//   nf4_gemm_mma_{fwd,dx}_bf16    64x64x32 tiles, 4 warps (2x2), each warp 32x32 through
//                                 mma.sync m16n8k16 bf16 -> f32 accumulation
//   nf4_ref_{fwd,dx}_<T>          reference: one thread per output, dequantising on the fly (f32 math)
// All accumulate in f32; outputs are written for every element (the launcher's grid covers M x N).
// The host side (runtime/src/backend/cuda/nf4.rs) also has a "dequantise into scratch, then
// cuBLASLt" path and picks between them by the row count.

__device__ __forceinline__ float nf4_value(const u8* __restrict__ packed, const float* __restrict__ absmax, const float* sc, long long i, int bs) {
    const u8 byte = packed[i >> 1];
    const int q = (i & 1) ? (byte & 0x0F) : (byte >> 4);
    return __fmul_rn(sc[q], absmax[i / bs]);
}

extern "C" __global__ void nf4_absmax_decode(const u8* __restrict__ codes, const float* __restrict__ nested_absmax, const float* __restrict__ map,
                                             float offset, int nested_bs, long long nblocks, float* __restrict__ out) {
    const long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= nblocks) return;
    out[b] = __fadd_rn(__fmul_rn(map[codes[b]], nested_absmax[b / nested_bs]), offset);
}

// Dense Ŵ: thread j writes flat elements 2j and 2j+1 (when < n).
template <typename T>
__device__ void dequant_impl(const u8* __restrict__ packed, const float* __restrict__ absmax, const float* __restrict__ code, long long n, int bs,
                             T* __restrict__ out) {
    __shared__ float sc[16];
    if (threadIdx.x < 16) sc[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    const long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long i = 2 * j;
    if (i >= n) return;
    const u8 byte = packed[j];
    const float s = absmax[i / bs];  // i even and bs even: i and i+1 share a block
    out[i] = from_f<T>(__fmul_rn(sc[byte >> 4], s));
    if (i + 1 < n) out[i + 1] = from_f<T>(__fmul_rn(sc[byte & 0x0F], s));
}
#define DEQUANT(S, T)                                                                                                                  \
    extern "C" __global__ void nf4_dequant_##S(const u8* packed, const float* absmax, const float* code, long long n, int bs, T* out) { \
        dequant_impl<T>(packed, absmax, code, n, bs, out);                                                                             \
    }
FLOAT_KERNELS(DEQUANT)

// ---------------------------------------------------------------------------------------------
// Reference: one thread per output element, no shared tiles; f32 accumulation in order.
template <typename T, bool TRANS>
__device__ void ref_impl(const T* __restrict__ a, const u8* __restrict__ packed, const float* __restrict__ absmax, const float* __restrict__ code,
                         T* __restrict__ c, long long M, long long N, long long K, long long ldw, int bs) {
    __shared__ float sc[16];
    if (threadIdx.x < 16) sc[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= M * N) return;
    const long long m = t / N, n = t % N;
    float acc = 0.f;
    for (long long k = 0; k < K; ++k) {
        const long long i = TRANS ? k * ldw + n : n * ldw + k;
        acc += to_f(a[m * K + k]) * nf4_value(packed, absmax, sc, i, bs);
    }
    c[t] = from_f<T>(acc);
}
#define REF(S, T)                                                                                                                        \
    extern "C" __global__ void nf4_ref_fwd_##S(const T* x, const u8* packed, const float* absmax, const float* code, T* y, long long M,   \
                                               long long N, long long K, long long ldw, int bs) {                                        \
        ref_impl<T, false>(x, packed, absmax, code, y, M, N, K, ldw, bs);                                                                \
    }                                                                                                                                    \
    extern "C" __global__ void nf4_ref_dx_##S(const T* dy, const u8* packed, const float* absmax, const float* code, T* dx, long long M,  \
                                              long long N, long long K, long long ldw, int bs) {                                         \
        ref_impl<T, true>(dy, packed, absmax, code, dx, M, N, K, ldw, bs);                                                               \
    }
FLOAT_KERNELS(REF)

// ---------------------------------------------------------------------------------------------
// f32 SIMT tiles: block 16x16 threads, tile 64(M) x 64(N) x 16(K); thread (tx, ty) owns rows
// ty + 16·i and columns tx + 16·j (i, j < 4). Shared: As[k][m], Bs[k][n] (+4 padding).
#define S_BM 64
#define S_BN 64
#define S_BK 16
template <bool TRANS>
__device__ void gemm_simt_impl(const float* __restrict__ a, const u8* __restrict__ packed, const float* __restrict__ absmax,
                               const float* __restrict__ code, float* __restrict__ c, long long M, long long N, long long K, long long ldw, int bs) {
    __shared__ float sc[16];
    __shared__ float As[S_BK][S_BM + 4];
    __shared__ float Bs[S_BK][S_BN + 4];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    if (tid < 16) sc[tid] = code[tid];
    const long long m0 = (long long)blockIdx.y * S_BM, n0 = (long long)blockIdx.x * S_BN;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    __syncthreads();  // sc ready
    for (long long k0 = 0; k0 < K; k0 += S_BK) {
        // A tile: 64 x 16, k fastest (coalesced along a row of x / dy).
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int idx = tid + r * 256, mm = idx >> 4, kk = idx & 15;
            const long long gm = m0 + mm, gk = k0 + kk;
            As[kk][mm] = (gm < M && gk < K) ? a[gm * K + gk] : 0.f;
        }
        // B̂ tile: 16 x 64, walking the packed weight along its rows.
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int idx = tid + r * 256;
            int kk, nn;
            if (TRANS) { kk = idx >> 6; nn = idx & 63; } else { nn = idx >> 4; kk = idx & 15; }
            const long long gk = k0 + kk, gn = n0 + nn;
            float v = 0.f;
            if (gk < K && gn < N) v = nf4_value(packed, absmax, sc, TRANS ? gk * ldw + gn : gn * ldw + gk, bs);
            Bs[kk][nn] = v;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < S_BK; ++kk) {
            float av[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) av[i] = As[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const long long gm = m0 + ty + 16 * i;
        if (gm >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const long long gn = n0 + tx + 16 * j;
            if (gn < N) c[gm * N + gn] = acc[i][j];
        }
    }
}
extern "C" __global__ void __launch_bounds__(256) nf4_gemm_simt_fwd_f32(const float* x, const u8* packed, const float* absmax, const float* code, float* y,
                                                                       long long M, long long N, long long K, long long ldw, int bs) {
    gemm_simt_impl<false>(x, packed, absmax, code, y, M, N, K, ldw, bs);
}
extern "C" __global__ void __launch_bounds__(256) nf4_gemm_simt_dx_f32(const float* dy, const u8* packed, const float* absmax, const float* code, float* dx,
                                                                      long long M, long long N, long long K, long long ldw, int bs) {
    gemm_simt_impl<true>(dy, packed, absmax, code, dx, M, N, K, ldw, bs);
}

// ---------------------------------------------------------------------------------------------
// bf16 tensor cores: tile 64(M) x 64(N) x 32(K), 128 threads = 4 warps in a 2x2 grid, each warp a
// 32x32 sub-tile = 2 (m16) x 4 (n8) mma.sync.m16n8k16 per 16-wide k step, f32 accumulators.
// Shared: As[m][k] (x rows) and Bs[n][k] (B̂ stored n-major so a B fragment's two k values are one
// 32-bit word), both padded to 40 bf16 per row (80 bytes: the 8 fragment rows x 4 words hit 32
// distinct banks).
// Fragment layout (PTX ISA, m16n8k16 .bf16): g = lane / 4, t = lane % 4;
//   A regs: a0 = (row g, k 2t..2t+1), a1 = (row g+8, k 2t..), a2 = (row g, k 2t+8..), a3 = (row g+8, k 2t+8..)
//   B regs: b0 = (k 2t..2t+1, col g), b1 = (k 2t+8..2t+9, col g)
//   C regs: c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, cols 2t, 2t+1)
// The lower 16 bits of a register hold the element with the smaller k.
#define T_BM 64
#define T_BN 64
#define T_BK 32
#define T_LD 40
__device__ __forceinline__ void mma_bf16_16816(float* d, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <bool TRANS>
__device__ void gemm_mma_impl(const bf16* __restrict__ a, const u8* __restrict__ packed, const float* __restrict__ absmax,
                              const float* __restrict__ code, bf16* __restrict__ c, long long M, long long N, long long K, long long ldw, int bs) {
    __shared__ float sc[16];
    __shared__ __align__(16) bf16 As[T_BM][T_LD];
    __shared__ __align__(16) bf16 Bs[T_BN][T_LD];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1, g = lane >> 2, t = lane & 3;
    if (tid < 16) sc[tid] = code[tid];
    const long long m0 = (long long)blockIdx.y * T_BM, n0 = (long long)blockIdx.x * T_BN;
    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
    const bf16 zero = __float2bfloat16_rn(0.f);
    __syncthreads();  // sc ready
    for (long long k0 = 0; k0 < K; k0 += T_BK) {
        // A tile 64 x 32: 2048 elements, 16 per thread, k fastest.
#pragma unroll 4
        for (int r = 0; r < 16; ++r) {
            const int idx = tid + r * 128, mm = idx >> 5, kk = idx & 31;
            const long long gm = m0 + mm, gk = k0 + kk;
            As[mm][kk] = (gm < M && gk < K) ? a[gm * K + gk] : zero;
        }
        // B̂ tile 32(k) x 64(n), stored Bs[n][k]; walk the packed weight along its rows.
#pragma unroll 4
        for (int r = 0; r < 16; ++r) {
            const int idx = tid + r * 128;
            int kk, nn;
            if (TRANS) { kk = idx >> 6; nn = idx & 63; } else { nn = idx >> 5; kk = idx & 31; }
            const long long gk = k0 + kk, gn = n0 + nn;
            float v = 0.f;
            if (gk < K && gn < N) v = nf4_value(packed, absmax, sc, TRANS ? gk * ldw + gn : gn * ldw + gk, bs);
            Bs[nn][kk] = __float2bfloat16_rn(v);
        }
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < T_BK; ks += 16) {
            u32 af[2][4], bfr[4][2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int row = wm * 32 + i * 16 + g;
                af[i][0] = *reinterpret_cast<const u32*>(&As[row][ks + 2 * t]);
                af[i][1] = *reinterpret_cast<const u32*>(&As[row + 8][ks + 2 * t]);
                af[i][2] = *reinterpret_cast<const u32*>(&As[row][ks + 2 * t + 8]);
                af[i][3] = *reinterpret_cast<const u32*>(&As[row + 8][ks + 2 * t + 8]);
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int col = wn * 32 + j * 8 + g;
                bfr[j][0] = *reinterpret_cast<const u32*>(&Bs[col][ks + 2 * t]);
                bfr[j][1] = *reinterpret_cast<const u32*>(&Bs[col][ks + 2 * t + 8]);
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_bf16_16816(acc[i][j], af[i], bfr[j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const long long row = m0 + wm * 32 + i * 16 + g, col = n0 + wn * 32 + j * 8 + 2 * t;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const long long r = row + (e >> 1) * 8, cc = col + (e & 1);
                if (r < M && cc < N) c[r * N + cc] = __float2bfloat16_rn(acc[i][j][e]);
            }
        }
    }
}
extern "C" __global__ void __launch_bounds__(128) nf4_gemm_mma_fwd_bf16(const bf16* x, const u8* packed, const float* absmax, const float* code, bf16* y,
                                                                       long long M, long long N, long long K, long long ldw, int bs) {
    gemm_mma_impl<false>(x, packed, absmax, code, y, M, N, K, ldw, bs);
}
extern "C" __global__ void __launch_bounds__(128) nf4_gemm_mma_dx_bf16(const bf16* dy, const u8* packed, const float* absmax, const float* code, bf16* dx,
                                                                      long long M, long long N, long long K, long long ldw, int bs) {
    gemm_mma_impl<true>(dy, packed, absmax, code, dx, M, N, K, ldw, bs);
}
