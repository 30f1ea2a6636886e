// y[N] = W[N, K] . x[K] for one activation row (decode at batch 1), bf16 / f16 weight and
// activations, f32 accumulation, rounded once to the output dtype; up to three weights sharing x
// in one launch (DGroup), each with its own output; or one weight and the residual add + RMSNorm of
// its output in the same launch (dense_gemv_norm_*: the last block runs rms_norm.cuh's norm_tail).
//
// Memory-bound: the weight is streamed once. A warp owns one output row; each lane reads 16-byte
// vectors (8 weights) of it, DG_UNROLL vectors in flight before any math (latency hiding without
// relying on occupancy: the k/v projections have only 1024 rows), with the streaming cache hint
// (the weight is read once; the activation row, shared by every warp, stays in L1/L2). Measured
// on H100 (docs/benchmarks.md): ahead of cuBLAS at one row, behind it from two rows on, so the
// wrapper takes one row only. Needs K % 8 == 0 and 16-byte aligned rows (the wrapper checks).
#include "rms_norm.cuh"
#include <type_traits>

constexpr int DG_WARPS = 8;
constexpr int DG_UNROLL = 4;
static_assert(DG_WARPS * 32 == ARN_THREADS, "the norm tail runs with the GEMV's block");

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

// Blocks per weight: ceil(N / DG_WARPS), bx the block's index among them. GATED: the warp's row n
// of w and of w2 (gate and up sharing x), its output SiLU(gate) * up rounded as silu_mul_*
// (fused_ops.cu) rounds the two products and the SiLU: the MLP's activation without a launch.
template <typename T, bool GATED = false>
__device__ __forceinline__ void dense_gemv(const T* __restrict__ w, const T* __restrict__ x,
                                           T* __restrict__ y, int N, int K, int bx,
                                           const T* __restrict__ w2 = nullptr) {
    constexpr int R = GATED ? 2 : 1;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n = bx * DG_WARPS + warp;
    if (n >= N) return;
    const int kv = K >> 3;
    const uint4* wr[R];
    wr[0] = reinterpret_cast<const uint4*>(w + (size_t)n * K);
    if constexpr (GATED) wr[1] = reinterpret_cast<const uint4*>(w2 + (size_t)n * K);
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.f;
    int v = lane;
    for (; v + 32 * (DG_UNROLL - 1) < kv; v += 32 * DG_UNROLL) {
        uint4 wv[DG_UNROLL][R];
#pragma unroll
        for (int u = 0; u < DG_UNROLL; u++)
#pragma unroll
            for (int r = 0; r < R; r++) wv[u][r] = __ldcs(wr[r] + v + 32 * u);
#pragma unroll
        for (int u = 0; u < DG_UNROLL; u++)
#pragma unroll
            for (int r = 0; r < R; r++) acc[r] = dot8<T>(wv[u][r], x, (v + 32 * u) * 8, acc[r]);
    }
    for (; v < kv; v += 32)
#pragma unroll
        for (int r = 0; r < R; r++) acc[r] = dot8<T>(__ldcs(wr[r] + v), x, v * 8, acc[r]);
#pragma unroll
    for (int r = 0; r < R; r++)
        acc[r] = warp_sum(acc[r]);
    if (lane != 0) return;
    if constexpr (GATED) {
        y[n] = silu_mul_rounded<T>(to_f(from_f<T>(acc[0])), to_f(from_f<T>(acc[1])));
    } else {
        y[n] = from_f<T>(acc[0]);
    }
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
// dense_gemv_silu_<dtype>: y = SiLU(x . gateᵀ) * (x . upᵀ), gate and up [N, K].
#define DENSE_GEMV_SILU(TN, T)                                                                     \
    extern "C" __global__ void __launch_bounds__(DG_WARPS * 32)                                    \
        dense_gemv_silu_##TN(const T* __restrict__ gate, const T* __restrict__ up,                 \
                             const T* __restrict__ x, T* __restrict__ y, int N, int K) {           \
        dense_gemv<T, true>(gate, x, y, N, K, blockIdx.x, up);                                     \
    }
// dense_gemv_norm_<dtype>: y = x . W^T (one weight, N = nt.hidden), then nt's s = nt.x + y and
// RMSNorm(s) * nt.w by the launch's last block.
#define DENSE_GEMV_NORM(TN, T)                                                                     \
    extern "C" __global__ void __launch_bounds__(DG_WARPS * 32)                                    \
        dense_gemv_norm_##TN(const T* __restrict__ w, const T* __restrict__ x, T* __restrict__ y,  \
                             int N, int K, const NormTail nt) {                                    \
        dense_gemv<T>(w, x, y, N, K, blockIdx.x);                                                  \
        norm_tail<T>(nt, y);                                                                       \
    }
DENSE_GEMV(bf16, __nv_bfloat16)
DENSE_GEMV(f16, __half)
DENSE_GEMV_SILU(bf16, __nv_bfloat16)
DENSE_GEMV_SILU(f16, __half)
DENSE_GEMV_NORM(bf16, __nv_bfloat16)
DENSE_GEMV_NORM(f16, __half)
