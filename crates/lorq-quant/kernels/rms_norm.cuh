// The residual add and RMSNorm of a decoder layer, shared by its own launch (fused_ops.cu
// add_rms_norm_vec_* / add_rms_norm_fp8_*) and by the tail of the dense GEMV that produces the
// added term at batch 1 (dense_gemv.cu dense_gemv_norm_*): the same code with the same block size
// (ARN_THREADS up to hidden 8 * ARN_THREADS * ARN_CHUNKS) rounds the same, bit for bit.
#pragma once
#include "e4m3.cuh"

constexpr int ARN_CHUNKS = 4;    // 8-element chunks per thread
constexpr int ARN_THREADS = 256;  // the block of every GEMV with a norm tail (8 warps)

// s = x + d (rounded to T), y = RMSNorm(s) * w for row `row` of [rows, hidden] (s not stored where
// null: the GEMVs that run the norm in every block store it from one). blockDim: a
// multiple of 32 with blockDim * 8 * ARN_CHUNKS >= hidden. D_NC: d through the read-only cache;
// false for a d written earlier in the same launch (the GEMV tail). With FP8, also writes y's e4m3
// codes q[row, :] and scale scales[row], the per-token dynamic quantization of the next FP8
// projection (fp8_act.cu quant_rows, mode 0) bit for bit: the codes come from y as stored
// (rounded to T), so the projection skips its own quantization launch. The norm weight is loaded
// before the block-wide sum, so its latency hides behind it.
template <typename T, bool FP8, bool D_NC = true>
__device__ __forceinline__ void add_rms_norm_vec(const T* __restrict__ x, const T* __restrict__ d,
                                                 const T* __restrict__ w, T* __restrict__ s,
                                                 T* __restrict__ y, uint8_t* __restrict__ q,
                                                 float* __restrict__ scales, int hidden, float eps,
                                                 int row_index) {
    __shared__ float s_part[32];
    const size_t row = (size_t)row_index * hidden;
    const int chunks = hidden >> 3;
    float v[ARN_CHUNKS][8];
    Pack8<T> wp[ARN_CHUNKS];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < ARN_CHUNKS; i++) {
        const int c = threadIdx.x + i * blockDim.x;
        if (c < chunks) {
            const Pack8<T> xp = ld_pack8<T>(x + row + 8 * c);
            const Pack8<T> dp = ld_pack8<T, D_NC>(d + row + 8 * c);
            wp[i] = ld_pack8<T>(w + 8 * c);
            float a[8], b[8];
            unpack8<T>(xp, a);
            unpack8<T>(dp, b);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                // Rounded to T first: the sum the next layer sees is the stored one.
                v[i][e] = to_f(from_f<T>(a[e] + b[e]));
                ss = fmaf(v[i][e], v[i][e], ss);
            }
            if (s != nullptr) store8<T>(s + row + 8 * c, v[i]);
        }
    }
    ss = warp_sum(ss);
    const int warps = blockDim.x >> 5;
    if ((threadIdx.x & 31) == 0) s_part[threadIdx.x >> 5] = ss;
    __syncthreads();
    float total = (threadIdx.x & 31) < warps ? s_part[threadIdx.x & 31] : 0.f;
    total = warp_sum(total);
    const float inv = rsqrtf(total / hidden + eps);
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < ARN_CHUNKS; i++) {
        const int c = threadIdx.x + i * blockDim.x;
        if (c < chunks) {
            float wv[8];
            unpack8<T>(wp[i], wv);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                v[i][e] = v[i][e] * inv * wv[e];
                if constexpr (FP8) {
                    v[i][e] = to_f(from_f<T>(v[i][e]));  // y as stored
                    amax = fmaxf(amax, fabsf(v[i][e]));
                }
            }
            store8<T>(y + row + 8 * c, v[i]);
        }
    }
    if constexpr (FP8) {
        __syncthreads();  // every warp has read its total from s_part, which block_max reuses
        write_row_codes(v, amax, chunks, q + row, scales + row_index, s_part);
    }
}

// The norm a GEMV launch runs after its one output row d (y = x . W^T at batch 1): s = x + d,
// y = RMSNorm(s) * w, hidden = the GEMV's N. `ticket`: a zeroed u32 (the last block sets it back to
// zero, so one serves every launch of a stream).
struct NormTail {
    const void* x;
    const void* w;
    void* s;
    void* y;
    unsigned* ticket;
    int hidden;
    float eps;
};

// Called by every thread of every block of the GEMV after its outputs are stored: each block takes
// a ticket after a fence; the last one (all of d written) runs the norm with its ARN_THREADS
// threads, the same code as add_rms_norm_vec_* launched alone (its wrapper gives it ARN_THREADS
// threads where the tail applies), so both round the same.
template <typename T>
__device__ __forceinline__ void norm_tail(const NormTail& nt, const T* d) {
    __shared__ bool s_last;
    __syncthreads();  // the block's outputs are stored
    if (threadIdx.x == 0) {
        __threadfence();
        const unsigned blocks = gridDim.x * gridDim.y;
        s_last = atomicAdd(nt.ticket, 1u) == blocks - 1;
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    add_rms_norm_vec<T, false, false>(static_cast<const T*>(nt.x), d, static_cast<const T*>(nt.w),
                                      static_cast<T*>(nt.s), static_cast<T*>(nt.y), nullptr,
                                      nullptr, nt.hidden, nt.eps, 0);
    if (threadIdx.x == 0) *nt.ticket = 0u;
}
