// y[M, N] = x[M, K] . W[N, K]^T for a few activation rows (decode), bf16 / f16 weight and
// activations, f32 accumulation, rounded once to the output dtype.
//
// Memory-bound: the weight is streamed once. A warp owns one output row; each lane reads 16-byte
// vectors (8 weights) of it, U vectors in flight before any math (latency hiding without relying
// on occupancy: the k/v projections have only 1024 rows), with the streaming cache hint (the
// weight is read once; the activations, shared by every warp, stay in L1/L2). The MR activation
// rows of a launch row-group are applied to each loaded vector, so the weight is read once for
// all of them. Needs K % 8 == 0 and 16-byte aligned rows (the wrapper checks, else cuBLAS).
#include "common.cuh"

constexpr int DG_WARPS = 8;
constexpr int DG_UNROLL = 4;

template <typename T>
__device__ __forceinline__ void w8(const uint4& v, float (&o)[8]);
template <>
__device__ __forceinline__ void w8<__nv_bfloat16>(const uint4& v, float (&o)[8]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        o[2 * i] = __uint_as_float(w[i] << 16);
        o[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
template <>
__device__ __forceinline__ void w8<__half>(const uint4& v, float (&o)[8]) {
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float2 f = __half22float2(h[i]);
        o[2 * i] = f.x;
        o[2 * i + 1] = f.y;
    }
}

// acc[m] += w . x[m0 + m, k0 .. k0+8) for the MR rows of the group (rows past M skipped).
template <typename T, int MR>
__device__ __forceinline__ void dot8(const uint4& wv, const T* __restrict__ x, int m0, int M, int K,
                                     int k0, float (&acc)[MR]) {
    float w[8];
    w8<T>(wv, w);
#pragma unroll
    for (int m = 0; m < MR; m++) {
        if (MR == 1 || m0 + m < M) {
            float xv[8];
            load8<T>(x + (size_t)(m0 + m) * K + k0, xv);
#pragma unroll
            for (int i = 0; i < 8; i++) acc[m] = fmaf(w[i], xv[i], acc[m]);
        }
    }
}

// grid.x: ceil(N / DG_WARPS); grid.y: ceil(M / MR).
template <typename T, int MR>
__device__ __forceinline__ void dense_gemv(const T* __restrict__ w, const T* __restrict__ x,
                                           T* __restrict__ y, int M, int N, int K) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n = blockIdx.x * DG_WARPS + warp;
    const int m0 = blockIdx.y * MR;
    if (n >= N) return;
    const int kv = K >> 3;
    const uint4* wr = reinterpret_cast<const uint4*>(w + (size_t)n * K);
    float acc[MR];
#pragma unroll
    for (int m = 0; m < MR; m++) acc[m] = 0.f;
    int v = lane;
    for (; v + 32 * (DG_UNROLL - 1) < kv; v += 32 * DG_UNROLL) {
        uint4 wv[DG_UNROLL];
#pragma unroll
        for (int u = 0; u < DG_UNROLL; u++) wv[u] = __ldcs(wr + v + 32 * u);
#pragma unroll
        for (int u = 0; u < DG_UNROLL; u++) dot8<T, MR>(wv[u], x, m0, M, K, (v + 32 * u) * 8, acc);
    }
    for (; v < kv; v += 32) dot8<T, MR>(__ldcs(wr + v), x, m0, M, K, v * 8, acc);
#pragma unroll
    for (int m = 0; m < MR; m++) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], o);
    }
#pragma unroll
    for (int m = 0; m < MR; m++) {
        if (lane == m && m0 + m < M) y[(size_t)(m0 + m) * N + n] = from_f<T>(acc[m]);
    }
}

#define DENSE_GEMV(TN, T, MR)                                                                      \
    extern "C" __global__ void __launch_bounds__(DG_WARPS * 32)                                    \
        dense_gemv_##TN##_m##MR(const T* __restrict__ w, const T* __restrict__ x,                 \
                                T* __restrict__ y, int M, int N, int K) {                          \
        dense_gemv<T, MR>(w, x, y, M, N, K);                                                       \
    }
#define DENSE_GEMV_ROWS(TN, T)                                                                     \
    DENSE_GEMV(TN, T, 1) DENSE_GEMV(TN, T, 2) DENSE_GEMV(TN, T, 3) DENSE_GEMV(TN, T, 4)            \
    DENSE_GEMV(TN, T, 5) DENSE_GEMV(TN, T, 6) DENSE_GEMV(TN, T, 7) DENSE_GEMV(TN, T, 8)
DENSE_GEMV_ROWS(bf16, __nv_bfloat16)
DENSE_GEMV_ROWS(f16, __half)
