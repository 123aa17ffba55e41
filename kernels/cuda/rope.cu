// rope.cu — rotary position embedding in Hugging Face's rotate-half layout (forward and backward).
//
// Layouts (contiguous, row-major): x, y [tokens, heads, head_dim] in T; cos, sin [tokens, half] in T
// with half = head_dim / 2 (head_dim even). The tables carry every frequency adjustment (linear or
// llama3 scaling is applied on the host when they are built, ops/rope.rs `RopeTable`); the kernel only
// applies them. For token t, head h, pair i < half (a = x[t,h,i], b = x[t,h,i+half], c = cos[t,i],
// s = sin[t,i], and s → −s when `inverse`):
//   y[t,h,i]      = a·c − b·s
//   y[t,h,i+half] = b·c + a·s
// The map is a rotation, so the backward is the same map with −θ: dx = apply(dy, inverse = 1).
//
// Kernels (each `_<dtype>` for f32, bf16, f16):
//   rope          one thread per N = 16/sizeof(T) consecutive pairs of one head: 128-bit loads of the
//                 two halves and of the two tables when half % N == 0 and all pointers are 16-byte
//                 aligned (the launch then has tokens·heads·half/N threads); otherwise `vec` = 0 and
//                 one thread per pair with scalar loads (tokens·heads·half threads). The host picks.
//   rope_ref      one thread per pair, scalar (the reference).

template <typename T>
__device__ __forceinline__ void rope_pair(const T* x, const T* cs, const T* sn, T* y, u64 xo, u64 to, int half, float sg) {
    const float a = to_f(x[xo]), b = to_f(x[xo + half]);
    const float c = to_f(cs[to]), s = sg * to_f(sn[to]);
    y[xo] = from_f<T>(a * c - b * s);
    y[xo + half] = from_f<T>(b * c + a * s);
}

template <typename T>
__device__ __forceinline__ void rope_impl(const T* __restrict__ x, const T* __restrict__ cs, const T* __restrict__ sn, T* __restrict__ y,
                                          u64 tokens, int heads, int half, int inverse, int vec) {
    constexpr int N = Pack128<T>::N;
    const float sg = inverse ? -1.f : 1.f;
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const int per_head = vec ? half / N : half;  // threads per head
    const u64 th = i / (u64)per_head;            // token · heads + head
    if (th >= tokens * (u64)heads) return;
    const int j = (int)(i - th * (u64)per_head) * (vec ? N : 1);  // first pair of this thread
    const u64 t = th / (u64)heads;
    const u64 xo = th * (u64)(2 * half) + j;  // x offset of element j of this head
    const u64 to = t * (u64)half + j;         // table offset
    if (vec) {
        const Pack128<T> pa = load128(x + xo), pb = load128(x + xo + half);
        const Pack128<T> pc = load128(cs + to), ps = load128(sn + to);
        Pack128<T> ya, yb;
#pragma unroll
        for (int k = 0; k < N; k++) {
            const float a = to_f(pa.v[k]), b = to_f(pb.v[k]);
            const float c = to_f(pc.v[k]), s = sg * to_f(ps.v[k]);
            ya.v[k] = from_f<T>(a * c - b * s);
            yb.v[k] = from_f<T>(b * c + a * s);
        }
        store128(y + xo, ya);
        store128(y + xo + half, yb);
    } else {
        rope_pair<T>(x, cs, sn, y, xo, to, half, sg);
    }
}

// One thread per pair (tokens·heads·half threads).
template <typename T>
__device__ __forceinline__ void rope_ref_impl(const T* x, const T* cs, const T* sn, T* y, u64 tokens, int heads, int half, int inverse) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= tokens * (u64)heads * (u64)half) return;
    const u64 th = i / (u64)half;
    const int j = (int)(i % (u64)half);
    const u64 t = th / (u64)heads;
    rope_pair<T>(x, cs, sn, y, th * (u64)(2 * half) + j, t * (u64)half + j, half, inverse ? -1.f : 1.f);
}

#define ROPE_KERNELS(S, T)                                                                                                       \
    extern "C" __global__ void rope_##S(const T* x, const T* cs, const T* sn, T* y, u64 tokens, int heads, int half, int inverse, \
                                        int vec) {                                                                              \
        rope_impl<T>(x, cs, sn, y, tokens, heads, half, inverse, vec);                                                          \
    }                                                                                                                            \
    extern "C" __global__ void rope_ref_##S(const T* x, const T* cs, const T* sn, T* y, u64 tokens, int heads, int half,        \
                                            int inverse) {                                                                      \
        rope_ref_impl<T>(x, cs, sn, y, tokens, heads, half, inverse);                                                           \
    }

FLOAT_KERNELS(ROPE_KERNELS)
