// embedding.cu — token embedding gather and its scatter-add backward.
//
//   forward:   y[t, :] = W[id[t], :]                     W: [vocab, dim], ids: U32 [tokens], y: [tokens, dim]
//   backward:  dW[v, :] = Σ_{t : id[t] = v} dy[t, :]     dW: [vocab, dim] (ids get no gradient)
//
// Out-of-range ids: the op layer (runtime/src/ops/embedding.rs) rejects them on the host before
// the backend runs, as the CPU backend assumes. The kernels still never read or write out of
// bounds: a row with id ≥ vocab is written as zeros (forward) or skipped (backward), and when the
// launcher passes a flag pointer (checked / debug runs) the kernel records the first bad position
// as bad[0] = max(tokens − t) (0 = all ids valid; the launcher zeroes it). With a null flag the
// check costs one compare.
//
// forward (fast): a warp per token copies the row in units of W bytes (the launcher picks the
// widest of 16/8/4/2 bytes dividing the row's byte size, so bf16 rows of dim % 8 == 0 move 128 bits
// per lane); dtype-agnostic. Reference: one thread per output element, typed.
// backward (fast): a warp per token atomically adds its dy row into an accumulator table: the f32
// (f64) output itself for f32 (f64), an f32 scratch table for bf16/f16 that the launcher then
// rounds once to the output dtype (repeated ids accumulate in f32, not bf16). The summation order
// of repeated ids depends on timing (f32 atomics), so results may differ from the CPU in the last
// bits. Reference: one thread per (v, c) output, scanning the tokens in order (the CPU's order).

// ---------------------------------------------------------------- forward
// Launch: grid-stride, block 256 (8 warps = 8 tokens per block and step). row_units = dim·size/W.
template <typename W>
__device__ void emb_fwd_impl(const W* __restrict__ table, const u32* __restrict__ ids, W* __restrict__ y, u64 tokens, u64 vocab,
                             u64 row_units, u64* bad) {
    const u32 lane = threadIdx.x & 31;
    const u64 wpb = blockDim.x >> 5;
    for (u64 t = (u64)blockIdx.x * wpb + (threadIdx.x >> 5); t < tokens; t += (u64)gridDim.x * wpb) {
        const u32 id = ids[t];
        W* dst = y + t * row_units;
        if (id < vocab) {
            const W* src = table + (u64)id * row_units;
            for (u64 j = lane; j < row_units; j += 32) dst[j] = src[j];
        } else {
            for (u64 j = lane; j < row_units; j += 32) dst[j] = W{};
            if (lane == 0 && bad) atomicMax(bad, tokens - t);
        }
    }
}
#define EMB_FWD(NAME, W)                                                                                                 \
    extern "C" __global__ void embedding_fwd_##NAME(const W* table, const u32* ids, W* y, u64 tokens, u64 vocab, u64 row_units, \
                                                    u64* bad) {                                                          \
        emb_fwd_impl<W>(table, ids, y, tokens, vocab, row_units, bad);                                                   \
    }
EMB_FWD(b2, unsigned short)
EMB_FWD(b4, u32)
EMB_FWD(b8, u64)
EMB_FWD(b16, uint4)

// Reference forward: one thread per output element.
template <typename T> __device__ void emb_fwd_ref_impl(const T* table, const u32* ids, T* y, u64 tokens, u64 vocab, u64 dim, u64* bad) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= tokens * dim) return;
    const u64 t = i / dim, c = i - t * dim;
    const u32 id = ids[t];
    if (id < vocab) {
        y[i] = table[(u64)id * dim + c];
    } else {
        y[i] = from_f<T>(0.f);
        if (c == 0 && bad) atomicMax(bad, tokens - t);
    }
}

// ---------------------------------------------------------------- backward
// Launch: grid-stride, block 256 (a warp per token). acc: [vocab, dim] zeroed by the launcher.
template <typename T, typename A>
__device__ void emb_bwd_impl(const T* __restrict__ dy, const u32* __restrict__ ids, A* __restrict__ acc, u64 tokens, u64 vocab, u64 dim,
                             u64* bad) {
    const u32 lane = threadIdx.x & 31;
    const u64 wpb = blockDim.x >> 5;
    for (u64 t = (u64)blockIdx.x * wpb + (threadIdx.x >> 5); t < tokens; t += (u64)gridDim.x * wpb) {
        const u32 id = ids[t];
        if (id >= vocab) {
            if (lane == 0 && bad) atomicMax(bad, tokens - t);
            continue;
        }
        const T* g = dy + t * dim;
        A* d = acc + (u64)id * dim;
        for (u64 j = lane; j < dim; j += 32) atomicAdd(d + j, (A)to_f(g[j]));
    }
}
// Reference backward: one thread per dW element, tokens in order.
template <typename T> __device__ void emb_bwd_ref_impl(const T* dy, const u32* ids, T* dw, u64 tokens, u64 vocab, u64 dim, u64* bad) {
    typedef typename Acc<T>::t A;
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (bad && i < tokens && ids[i] >= vocab) atomicMax(bad, tokens - i);
    if (i >= vocab * dim) return;
    const u64 v = i / dim, c = i - v * dim;
    A s = 0;
    for (u64 t = 0; t < tokens; ++t)
        if (ids[t] == v) s += (A)to_f(dy[t * dim + c]);
    put(dw[i], s);
}

#define EMB(S, T)                                                                                                                 \
    extern "C" __global__ void embedding_fwd_ref_##S(const T* table, const u32* ids, T* y, u64 tokens, u64 vocab, u64 dim, u64* bad) { \
        emb_fwd_ref_impl<T>(table, ids, y, tokens, vocab, dim, bad);                                                              \
    }                                                                                                                             \
    extern "C" __global__ void embedding_bwd_##S(const T* dy, const u32* ids, Acc<T>::t* acc, u64 tokens, u64 vocab, u64 dim, u64* bad) { \
        emb_bwd_impl<T, Acc<T>::t>(dy, ids, acc, tokens, vocab, dim, bad);                                                        \
    }                                                                                                                             \
    extern "C" __global__ void embedding_bwd_ref_##S(const T* dy, const u32* ids, T* dw, u64 tokens, u64 vocab, u64 dim, u64* bad) { \
        emb_bwd_ref_impl<T>(dy, ids, dw, tokens, vocab, dim, bad);                                                                \
    }
EMB(f32, float)
EMB(bf16, bf16)
EMB(f16, __half)
EMB(f64, double)
