// swiglu.cu — the SwiGLU gate of the Llama MLP, forward and backward (elementwise).
//
// Layouts: gate, up, y, dy, dgate, dup are n contiguous elements of T (any shape, same for all).
//   σ(g) = 1 / (1 + exp(−g)),  silu(g) = g·σ(g)
//   y     = silu(g) · u
//   dgate = dy · u · σ(g) · (1 + g·(1 − σ(g)))      (= dy · u · silu'(g))
//   dup   = dy · silu(g)
// Computed in f32 with the accurate expf (no fast-math) for every storage type.
//
// Kernels (each `_<dtype>` for f32, bf16, f16):
//   swiglu_fwd, swiglu_bwd          thread i owns elements [i·N, i·N + N) with N = 16/sizeof(T):
//                                   one 128-bit load/store per operand when the pack is whole and
//                                   every pointer is 16-byte aligned, a scalar loop otherwise (the
//                                   tail pack, misaligned buffers). Launch ceil(n / N) threads.
//   swiglu_fwd_ref, swiglu_bwd_ref  one thread per element, scalar (the references; n threads).

__device__ __forceinline__ float sigmoidf_(float g) { return 1.f / (1.f + expf(-g)); }

template <typename T>
__device__ __forceinline__ void swiglu_fwd_impl(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ y, u64 n) {
    constexpr int N = Pack128<T>::N;
    const u64 i0 = ((u64)blockIdx.x * blockDim.x + threadIdx.x) * N;
    if (i0 >= n) return;
    if (i0 + N <= n && aligned16(g) && aligned16(u) && aligned16(y)) {
        const Pack128<T> pg = load128(g + i0), pu = load128(u + i0);
        Pack128<T> py;
#pragma unroll
        for (int k = 0; k < N; k++) {
            const float gv = to_f(pg.v[k]);
            py.v[k] = from_f<T>(gv * sigmoidf_(gv) * to_f(pu.v[k]));
        }
        store128(y + i0, py);
    } else {
        const u64 e = min(n, i0 + N);
        for (u64 i = i0; i < e; i++) {
            const float gv = to_f(g[i]);
            y[i] = from_f<T>(gv * sigmoidf_(gv) * to_f(u[i]));
        }
    }
}

__device__ __forceinline__ void swiglu_grad(float g, float u, float d, float& dg, float& du) {
    const float s = sigmoidf_(g);
    du = d * g * s;
    dg = d * u * s * (1.f + g * (1.f - s));
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd_impl(const T* __restrict__ g, const T* __restrict__ u, const T* __restrict__ dy,
                                                T* __restrict__ dg, T* __restrict__ du, u64 n) {
    constexpr int N = Pack128<T>::N;
    const u64 i0 = ((u64)blockIdx.x * blockDim.x + threadIdx.x) * N;
    if (i0 >= n) return;
    if (i0 + N <= n && aligned16(g) && aligned16(u) && aligned16(dy) && aligned16(dg) && aligned16(du)) {
        const Pack128<T> pg = load128(g + i0), pu = load128(u + i0), pd = load128(dy + i0);
        Pack128<T> og, ou;
#pragma unroll
        for (int k = 0; k < N; k++) {
            float a, b;
            swiglu_grad(to_f(pg.v[k]), to_f(pu.v[k]), to_f(pd.v[k]), a, b);
            og.v[k] = from_f<T>(a);
            ou.v[k] = from_f<T>(b);
        }
        store128(dg + i0, og);
        store128(du + i0, ou);
    } else {
        const u64 e = min(n, i0 + N);
        for (u64 i = i0; i < e; i++) {
            float a, b;
            swiglu_grad(to_f(g[i]), to_f(u[i]), to_f(dy[i]), a, b);
            dg[i] = from_f<T>(a);
            du[i] = from_f<T>(b);
        }
    }
}

template <typename T>
__device__ __forceinline__ void swiglu_fwd_ref_impl(const T* g, const T* u, T* y, u64 n) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float gv = to_f(g[i]);
    y[i] = from_f<T>(gv * sigmoidf_(gv) * to_f(u[i]));
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd_ref_impl(const T* g, const T* u, const T* dy, T* dg, T* du, u64 n) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float a, b;
    swiglu_grad(to_f(g[i]), to_f(u[i]), to_f(dy[i]), a, b);
    dg[i] = from_f<T>(a);
    du[i] = from_f<T>(b);
}

#define SWIGLU_KERNELS(S, T)                                                                                                         \
    extern "C" __global__ void swiglu_fwd_##S(const T* g, const T* u, T* y, u64 n) { swiglu_fwd_impl<T>(g, u, y, n); }              \
    extern "C" __global__ void swiglu_bwd_##S(const T* g, const T* u, const T* dy, T* dg, T* du, u64 n) {                            \
        swiglu_bwd_impl<T>(g, u, dy, dg, du, n);                                                                                    \
    }                                                                                                                                \
    extern "C" __global__ void swiglu_fwd_ref_##S(const T* g, const T* u, T* y, u64 n) { swiglu_fwd_ref_impl<T>(g, u, y, n); }      \
    extern "C" __global__ void swiglu_bwd_ref_##S(const T* g, const T* u, const T* dy, T* dg, T* du, u64 n) {                        \
        swiglu_bwd_ref_impl<T>(g, u, dy, dg, du, n);                                                                                \
    }

FLOAT_KERNELS(SWIGLU_KERNELS)
