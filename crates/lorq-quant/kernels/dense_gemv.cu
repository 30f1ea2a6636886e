// y[N] = W[N, K] . x[K] for one activation row (decode at batch 1), bf16 / f16 weight and
// activations, f32 accumulation, rounded once to the output dtype; up to three weights sharing x
// in one launch (DGroup), each with its own output.
//
// Memory-bound: the weight is streamed once. A warp owns one output row; each lane reads 16-byte
// vectors (8 weights) of it, DG_UNROLL vectors in flight before any math (latency hiding without
// relying on occupancy: the k/v projections have only 1024 rows), with the streaming cache hint
// (the weight is read once; the activation row, shared by every warp, stays in L1/L2). Measured
// on H100 (docs/benchmarks.md): ahead of cuBLAS at one row, behind it from two rows on, so the
// wrapper takes one row only. Needs K % 8 == 0 and 16-byte aligned rows (the wrapper checks).
#include "common.cuh"
#include <type_traits>

constexpr int DG_WARPS = 8;
constexpr int DG_UNROLL = 4;

// acc += w . x[k0 .. k0+8).
template <typename T>
__device__ __forceinline__ float dot8(const uint4& wv, const T* __restrict__ x, int k0, float acc) {
    float w[8], xv[8];
    const uint32_t* wd = reinterpret_cast<const uint32_t*>(&wv);
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            w[2 * i] = __uint_as_float(wd[i] << 16);
            w[2 * i + 1] = __uint_as_float(wd[i] & 0xffff0000u);
        }
    } else {
        const __half2* h = reinterpret_cast<const __half2*>(&wv);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float2 f = __half22float2(h[i]);
            w[2 * i] = f.x;
            w[2 * i + 1] = f.y;
        }
    }
    load8<T>(x + k0, xv);
#pragma unroll
    for (int i = 0; i < 8; i++) acc = fmaf(w[i], xv[i], acc);
    return acc;
}

// Up to two more weights sharing x (q/k/v, gate/up) in the same launch: blocks [0, b1) compute
// weight 0 (N rows), [b1, b2) weight 1, [b2, grid) weight 2 (b1 = b2 = grid for one weight), each
// with its pointers straight from the parameters (as in qgemv.cu's QGroup).
struct DGroup {
    const void* w[2];
    void* y[2];
    int n[2];
    int b1, b2;
};

// Blocks per weight: ceil(N / DG_WARPS), bx the block's index among them.
template <typename T>
__device__ __forceinline__ void dense_gemv(const T* __restrict__ w, const T* __restrict__ x,
                                           T* __restrict__ y, int N, int K, int bx) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n = bx * DG_WARPS + warp;
    if (n >= N) return;
    const int kv = K >> 3;
    const uint4* wr = reinterpret_cast<const uint4*>(w + (size_t)n * K);
    float acc = 0.f;
    int v = lane;
    for (; v + 32 * (DG_UNROLL - 1) < kv; v += 32 * DG_UNROLL) {
        uint4 wv[DG_UNROLL];
#pragma unroll
        for (int u = 0; u < DG_UNROLL; u++) wv[u] = __ldcs(wr + v + 32 * u);
#pragma unroll
        for (int u = 0; u < DG_UNROLL; u++) acc = dot8<T>(wv[u], x, (v + 32 * u) * 8, acc);
    }
    for (; v < kv; v += 32) acc = dot8<T>(__ldcs(wr + v), x, v * 8, acc);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) y[n] = from_f<T>(acc);
}

#define DENSE_GEMV(TN, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(DG_WARPS * 32)                                    \
        dense_gemv_##TN(const T* __restrict__ w, const T* __restrict__ x, T* __restrict__ y,       \
                        int N, int K, const DGroup g) {                                            \
        const int bx = blockIdx.x;                                                                 \
        if (bx < g.b1) dense_gemv<T>(w, x, y, N, K, bx);                                           \
        else if (bx < g.b2)                                                                        \
            dense_gemv<T>(static_cast<const T*>(g.w[0]), x, static_cast<T*>(g.y[0]), g.n[0], K,    \
                          bx - g.b1);                                                              \
        else                                                                                       \
            dense_gemv<T>(static_cast<const T*>(g.w[1]), x, static_cast<T*>(g.y[1]), g.n[1], K,    \
                          bx - g.b2);                                                              \
    }
DENSE_GEMV(bf16, __nv_bfloat16)
DENSE_GEMV(f16, __half)
