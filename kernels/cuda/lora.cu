// lora.cu — the small kernels of the fused LoRA linear (runtime/src/ops/lora_linear.rs) and its
// reference kernel. The GEMMs themselves run in cuBLASLt (gemm_raw) or nf4.cu.
//
// Math (x [rows, in], A [r, in], B [out, r], base W [out, in] dense or quantised, s = scale):
//   forward   y   = x·Wᵀ (+ b) + s·(x·Aᵀ)·Bᵀ        xa = x·Aᵀ [rows, r] is saved for the backward
//             (base GEMM into y, bias added in place by lora_bias_add, then xa, then
//              y += s·xa·Bᵀ as one cuBLASLt GEMM with beta = 1)
//   backward  dxa = s·dy·B          [rows, r]
//             dB  = s·dyᵀ·xa        [out, r]
//             dA  = dxaᵀ·x          [r, in]
//             dx  = dy·W + dxa·A    [rows, in]   (second term accumulated with beta = 1)
//             dW  = dyᵀ·x (dense base that trains),  db = Σ_rows dy
// Kernels:
//   lora_bias_add_<T>   y[m, n] += b[n] in place (f32 math)
//   lora_ref_gemm_<T>   reference: C[m, n] = α·Σ_k A(m, k)·B(k, n) + β·C[m, n] with arbitrary element
//                       strides (so it covers every transpose above), one thread per output, f32
//                       accumulation; C is not read when β = 0 (outputs are poisoned in parity runs).
//                       The reference forward/backward of the op are chains of this kernel.

template <typename T>
__device__ void bias_add_impl(T* __restrict__ y, const T* __restrict__ b, long long rows, long long cols) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * cols) return;
    y[i] = from_f<T>(to_f(y[i]) + to_f(b[i % cols]));
}
#define BIAS(S, T)                                                                                   \
    extern "C" __global__ void lora_bias_add_##S(T* y, const T* b, long long rows, long long cols) { \
        bias_add_impl<T>(y, b, rows, cols);                                                          \
    }
FLOAT_KERNELS(BIAS)

template <typename T>
__device__ void ref_gemm_impl(const T* __restrict__ a, long long sam, long long sak, const T* __restrict__ b, long long sbk, long long sbn, T* c,
                              long long M, long long N, long long K, float alpha, float beta) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M * N) return;
    const long long m = i / N, n = i % N;
    float acc = 0.f;
    for (long long k = 0; k < K; ++k) acc += to_f(a[m * sam + k * sak]) * to_f(b[k * sbk + n * sbn]);
    float v = alpha * acc;
    if (beta != 0.f) v += beta * to_f(c[i]);
    c[i] = from_f<T>(v);
}
#define REFGEMM(S, T)                                                                                                                \
    extern "C" __global__ void lora_ref_gemm_##S(const T* a, long long sam, long long sak, const T* b, long long sbk, long long sbn, \
                                                 T* c, long long M, long long N, long long K, float alpha, float beta) {             \
        ref_gemm_impl<T>(a, sam, sak, b, sbk, sbn, c, M, N, K, alpha, beta);                                                        \
    }
FLOAT_KERNELS(REFGEMM)
