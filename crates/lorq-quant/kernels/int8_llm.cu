// LLM.int8 (bitsandbytes' Linear8bitLt inference) on the GPU, step for step as lorq's CPU kernel
// (crates/lorq-quant/src/int8.rs `matmul_f32`, itself checked against bitsandbytes):
//   1. llmint8_outliers: columns where any activation, rounded to f16, has |x| >= threshold;
//   2. llmint8_compact: the outlier columns as an increasing list (one block);
//   3. llmint8_quantize: per row, absmax s over the non-outlier f16 activations, codes
//      rint(x16 * ((1/s) * 127)) (outlier columns 0);
//   4. llmint8_gemv_*: y = round(acc * (s_x * SCB) * 1/127^2) + sum over outliers of
//      x * round(CB * SCB * 1/127), with acc the exact int32 dot product (dp4a), round() to the
//      activations' dtype, as the CPU does.
#include "common.cuh"

#define OUTLIERS(TN, T)                                                                            \
    extern "C" __global__ void llmint8_outliers_##TN(const T* x, int* flags, long long total, int K, float thr) { \
        for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;            \
             e += (long long)gridDim.x * blockDim.x) {                                             \
            if (fabsf(__half2float(__float2half_rn(to_f<T>(x[e])))) >= thr) flags[e % K] = 1;    \
        }                                                                                          \
    }
OUTLIERS(f32, float)
OUTLIERS(bf16, __nv_bfloat16)
OUTLIERS(f16, __half)

// One block of 1024 threads: list[0..count) = the flagged columns in increasing order.
extern "C" __global__ void __launch_bounds__(1024) llmint8_compact(const int* flags, int K, int* list, int* count) {
    __shared__ int warp_sums[32];
    __shared__ int base;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (tid == 0) base = 0;
    __syncthreads();
    for (int c0 = 0; c0 < K; c0 += 1024) {
        const int c = c0 + tid;
        const bool f = c < K && flags[c] != 0;
        const unsigned ballot = __ballot_sync(0xffffffffu, f);
        if (lane == 0) warp_sums[warp] = __popc(ballot);
        __syncthreads();
        int before = 0;
        for (int w = 0; w < warp; w++) before += warp_sums[w];
        if (f) list[base + before + __popc(ballot & ((1u << lane) - 1u))] = c;
        __syncthreads();
        if (tid == 0) {
            int t = 0;
            for (int w = 0; w < 32; w++) t += warp_sums[w];
            base += t;
        }
        __syncthreads();
    }
    if (tid == 0) *count = base;
}

// One block (256 threads) per activation row.
template <typename T>
__device__ __forceinline__ void quantize_row(const T* x, const int* flags, int K, signed char* ca, float* sca) {
    __shared__ float red[8];
    const int i = blockIdx.x, tid = threadIdx.x;
    const T* xr = x + (size_t)i * K;
    float m = 0.f;
    for (int c = tid; c < K; c += blockDim.x)
        if (!flags[c]) m = fmaxf(m, fabsf(__half2float(__float2half_rn(to_f<T>(xr[c])))));
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((tid & 31) == 0) red[tid >> 5] = m;
    __syncthreads();
    float s = 0.f;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) s = fmaxf(s, red[w]);
    // torch's `127.0 / row_stats` is reciprocal(s) * 127 (see int8.rs quantize_row).
    const float r = s == 0.f ? 0.f : __fmul_rn(__frcp_rn(s), 127.f);
    for (int c = tid; c < K; c += blockDim.x) {
        const float v = __half2float(__float2half_rn(to_f<T>(xr[c])));
        const float q = flags[c] ? 0.f : fminf(fmaxf(rintf(__fmul_rn(v, r)), -128.f), 127.f);
        ca[(size_t)i * K + c] = (signed char)q;
    }
    if (tid == 0) sca[i] = s;
}
#define QUANTIZE(TN, T)                                                                            \
    extern "C" __global__ void __launch_bounds__(256) llmint8_quantize_##TN(                      \
        const T* x, const int* flags, int K, signed char* ca, float* sca) {                        \
        quantize_row<T>(x, flags, K, ca, sca);                                                     \
    }
QUANTIZE(f32, float)
QUANTIZE(bf16, __nv_bfloat16)
QUANTIZE(f16, __half)

template <typename T> __device__ __forceinline__ float round_as(float v) { return to_f<T>(from_f<T>(v)); }

constexpr float INV_127 = 0.007874016f;
constexpr float INV_127_SQ = 6.200124e-5f;

// One warp per output feature j and up to MR activation rows; lanes stride over 32-byte chunks.
template <typename T, int MR>
__device__ __forceinline__ void gemv(const signed char* __restrict__ cb, const float* __restrict__ scb,
                                     const signed char* __restrict__ ca, const float* __restrict__ sca,
                                     const int* __restrict__ list, const int* __restrict__ count,
                                     const T* __restrict__ x, T* __restrict__ y, int M, int N, int K) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j = blockIdx.x * (blockDim.x >> 5) + warp;
    const int m0 = blockIdx.y * MR;
    if (j >= N) return;
    int acc[MR];
#pragma unroll
    for (int r = 0; r < MR; r++) acc[r] = 0;
    const int chunks = K >> 5;
    const uint4* wrow = reinterpret_cast<const uint4*>(cb + (size_t)j * K);
    for (int c = lane; c < chunks; c += 32) {
        const uint4 w0 = __ldcs(wrow + 2 * c), w1 = __ldcs(wrow + 2 * c + 1);
        const int wv[8] = {(int)w0.x, (int)w0.y, (int)w0.z, (int)w0.w, (int)w1.x, (int)w1.y, (int)w1.z, (int)w1.w};
#pragma unroll
        for (int r = 0; r < MR; r++) {
            if (m0 + r < M) {
                const uint4* arow = reinterpret_cast<const uint4*>(ca + (size_t)(m0 + r) * K);
                const uint4 a0 = __ldg(arow + 2 * c), a1 = __ldg(arow + 2 * c + 1);
                const int av[8] = {(int)a0.x, (int)a0.y, (int)a0.z, (int)a0.w, (int)a1.x, (int)a1.y, (int)a1.z, (int)a1.w};
#pragma unroll
                for (int t = 0; t < 8; t++) acc[r] = __dp4a(av[t], wv[t], acc[r]);
            }
        }
    }
    // The K % 32 tail, by lane 0 alone.
    if (lane == 0) {
        for (int c = chunks << 5; c < K; c++)
#pragma unroll
            for (int r = 0; r < MR; r++)
                if (m0 + r < M) acc[r] += (int)ca[(size_t)(m0 + r) * K + c] * (int)cb[(size_t)j * K + c];
    }
#pragma unroll
    for (int r = 0; r < MR; r++)
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
    if (lane != 0) return;
    const float sw = scb[j];
    const int no = *count;
#pragma unroll
    for (int r = 0; r < MR; r++) {
        const int i = m0 + r;
        if (i >= M) break;
        float v = round_as<T>(__fmul_rn(__fmul_rn((float)acc[r], __fmul_rn(sca[i], sw)), INV_127_SQ));
        for (int t = 0; t < no; t++) {
            const int c = list[t];
            const float wdq = round_as<T>(__fmul_rn(__fmul_rn((float)cb[(size_t)j * K + c], sw), INV_127));
            v = __fadd_rn(v, __fmul_rn(to_f<T>(x[(size_t)i * K + c]), wdq));
        }
        y[(size_t)i * N + j] = from_f<T>(v);
    }
}

#define GEMV(TN, T, MR)                                                                            \
    extern "C" __global__ void __launch_bounds__(256) llmint8_gemv_##TN##_m##MR(                  \
        const signed char* cb, const float* scb, const signed char* ca, const float* sca,          \
        const int* list, const int* count, const T* x, T* y, int M, int N, int K) {                \
        gemv<T, MR>(cb, scb, ca, sca, list, count, x, y, M, N, K);                                 \
    }
GEMV(f32, float, 1) GEMV(f32, float, 4) GEMV(f32, float, 8)
GEMV(bf16, __nv_bfloat16, 1) GEMV(bf16, __nv_bfloat16, 4) GEMV(bf16, __nv_bfloat16, 8)
GEMV(f16, __half, 1) GEMV(f16, __half, 4) GEMV(f16, __half, 8)
