// adamw.cu — AdamW (decoupled weight decay, bias correction) with f32 master weights and f32 moments,
// the semantics of runtime/src/backend/cpu/adamw.rs:
//
//   m = β1·m + (1−β1)·g;   v = β2·v + (1−β2)·g²
//   p = p·decay − step_size · m / (sqrt(v)/sqrt(bc2) + eps)
//   with decay = 1 − lr·wd, step_size = lr/bc1, bc1 = 1 − β1ᵗ, bc2 = 1 − β2ᵗ (computed on the host in f64).
//
// `adamw_step_<G>`: one tensor, f32 p/m/v, gradient of dtype G, one thread per element (grid-stride);
// it is also the reference the multi-tensor kernel is checked against.
// `adamw_multi`: many tensors in one launch. `descs` is a device array of AdamWTensor (one per
// tensor; the gradient and the optional rounded copy of the parameter may be f32/bf16/f16); `work`
// holds one u64 per block, (tensor index << 32) | chunk index, and block b updates elements
// [chunk·ADAMW_CHUNK, min(n, (chunk+1)·ADAMW_CHUNK)) of that tensor, four per thread with 128-bit
// loads of p, m, v where aligned. For bf16/f16 parameters `p` is the f32 master copy and `out16`
// the parameter itself, written back rounded to nearest; for f32 parameters out16 = 0.

#define ADAMW_CHUNK 8192

struct AdamWTensor {
    u64 p, g, m, v, out16, n;  // f32*, G*, f32*, f32*, half-precision param (0 = none), elements
    u32 gkind, okind;          // 0 = f32, 1 = bf16, 2 = f16
    float step_size, decay;    // per tensor (learning-rate multipliers)
};

__device__ __forceinline__ float load_any(u64 base, u32 kind, u64 i) {
    if (kind == 1) return to_f(reinterpret_cast<const bf16*>(base)[i]);
    if (kind == 2) return to_f(reinterpret_cast<const __half*>(base)[i]);
    return reinterpret_cast<const float*>(base)[i];
}
__device__ __forceinline__ void store_half(u64 base, u32 kind, u64 i, float x) {
    if (kind == 1) reinterpret_cast<bf16*>(base)[i] = from_f<bf16>(x);
    else if (kind == 2) reinterpret_cast<__half*>(base)[i] = from_f<__half>(x);
}

// The update of one element; returns the new parameter.
__device__ __forceinline__ float adamw_one(float p, float g, float& m, float& v, float b1, float b2, float eps, float bc2_sqrt,
                                           float step_size, float decay) {
    m = b1 * m + (1.f - b1) * g;
    v = b2 * v + (1.f - b2) * g * g;
    const float denom = sqrtf(v) / bc2_sqrt + eps;
    return p * decay - step_size * m / denom;
}

template <typename G>
__device__ void adamw_step_impl(float* p, const G* g, float* m, float* v, u64 n, float b1, float b2, float eps, float bc2_sqrt,
                                float step_size, float decay) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float mi = m[i], vi = v[i];
        p[i] = adamw_one(p[i], to_f(g[i]), mi, vi, b1, b2, eps, bc2_sqrt, step_size, decay);
        m[i] = mi;
        v[i] = vi;
    }
}

extern "C" __global__ void adamw_multi(const AdamWTensor* descs, const u64* work, float b1, float b2, float eps, float bc2_sqrt) {
    const u64 w = work[blockIdx.x];
    const AdamWTensor d = descs[w >> 32];
    const u64 start = (w & 0xffffffffull) * ADAMW_CHUNK;
    const u64 end = min(d.n, start + ADAMW_CHUNK);
    float* p = reinterpret_cast<float*>(d.p);
    float* m = reinterpret_cast<float*>(d.m);
    float* v = reinterpret_cast<float*>(d.v);
    const bool vec = aligned16(p) && aligned16(m) && aligned16(v);  // start is a multiple of 4 elements
    for (u64 i = start + 4 * (u64)threadIdx.x; i < end; i += 4 * (u64)blockDim.x) {
        if (vec && i + 4 <= end) {
            float4 pp = *reinterpret_cast<const float4*>(p + i);
            float4 mm = *reinterpret_cast<const float4*>(m + i);
            float4 vv = *reinterpret_cast<const float4*>(v + i);
            float gg[4];
#pragma unroll
            for (int k = 0; k < 4; k++) gg[k] = load_any(d.g, d.gkind, i + k);
            pp.x = adamw_one(pp.x, gg[0], mm.x, vv.x, b1, b2, eps, bc2_sqrt, d.step_size, d.decay);
            pp.y = adamw_one(pp.y, gg[1], mm.y, vv.y, b1, b2, eps, bc2_sqrt, d.step_size, d.decay);
            pp.z = adamw_one(pp.z, gg[2], mm.z, vv.z, b1, b2, eps, bc2_sqrt, d.step_size, d.decay);
            pp.w = adamw_one(pp.w, gg[3], mm.w, vv.w, b1, b2, eps, bc2_sqrt, d.step_size, d.decay);
            *reinterpret_cast<float4*>(p + i) = pp;
            *reinterpret_cast<float4*>(m + i) = mm;
            *reinterpret_cast<float4*>(v + i) = vv;
            if (d.out16) {
                store_half(d.out16, d.okind, i, pp.x);
                store_half(d.out16, d.okind, i + 1, pp.y);
                store_half(d.out16, d.okind, i + 2, pp.z);
                store_half(d.out16, d.okind, i + 3, pp.w);
            }
        } else {
            const u64 e = min(end, i + 4);
            for (u64 j = i; j < e; j++) {
                float mj = m[j], vj = v[j];
                const float pj = adamw_one(p[j], load_any(d.g, d.gkind, j), mj, vj, b1, b2, eps, bc2_sqrt, d.step_size, d.decay);
                p[j] = pj;
                m[j] = mj;
                v[j] = vj;
                if (d.out16) store_half(d.out16, d.okind, j, pj);
            }
        }
    }
}

#define ADAMW_KERNELS(S, G)                                                                                                      \
    extern "C" __global__ void adamw_step_##S(float* p, const G* g, float* m, float* v, u64 n, float b1, float b2, float eps,     \
                                              float bc2_sqrt, float step_size, float decay) {                                    \
        adamw_step_impl<G>(p, g, m, v, n, b1, b2, eps, bc2_sqrt, step_size, decay);                                              \
    }

FLOAT_KERNELS(ADAMW_KERNELS)
