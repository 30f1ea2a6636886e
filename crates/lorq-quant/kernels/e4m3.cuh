// e4m3fn codes of activations, shared by fp8_act.cu (the W8A8 activation quantization) and
// fused_ops.cu (RMSNorm that also writes the next FP8 projection's codes): the conversion is
// bit-exact with lorq's CPU `f32_to_e4m3fn` (round to nearest even, saturating to +-448).
#pragma once
#include "common.cuh"

#define E4M3_MAX 448.0f
#define MIN_SCALE (1.0f / (448.0f * 512.0f))

// lorq's `f32_to_e4m3fn` (src/fp8.rs), bit for bit.
__device__ __forceinline__ uint32_t f32_to_e4m3fn(float x) {
    uint32_t bits = __float_as_uint(x);
    uint32_t sign = (bits >> 24) & 0x80u;
    uint32_t ab = bits & 0x7fffffffu;
    if (ab > 0x7f800000u) return sign | 0x7fu;  // NaN
    float a = __uint_as_float(ab);
    if (a >= E4M3_MAX) return sign | 0x7eu;      // saturate (inf included)
    if (a < 0.015625f) {                        // subnormal codes: multiples of 2^-9
        return sign | (uint32_t)__float2int_rn(a * 512.0f);
    }
    // Keep 3 of 23 mantissa bits, rounding half to even; a carry moves into the exponent.
    uint32_t r = (ab + 0x7ffffu + ((ab >> 20) & 1u)) >> 20;
    uint32_t code = r - ((127u - 7u) << 3);
    return sign | min(code, 0x7eu);
}

// Block-wide max of non-negative values; every thread gets the result.
__device__ __forceinline__ float block_max(float v, float* sh) {
    v = warp_max(v);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    int nw = (blockDim.x + 31) >> 5;
    v = lane < nw ? sh[lane] : 0.0f;
    v = warp_max(v);
    __syncthreads();  // sh may be reused by the caller
    return v;
}

// The per-token dynamic scale of a row whose largest |value| is `absmax` (floored so that an
// all-zero row divides by a positive number).
__device__ __forceinline__ float e4m3_row_scale(float absmax) {
    return fmaxf(__fdiv_rn(absmax, E4M3_MAX), MIN_SCALE);
}

// Codes of v[0..8) / s, little-endian in two words (byte i = element i).
__device__ __forceinline__ uint2 e4m3_codes8(const float (&v)[8], float s) {
    uint32_t lo = 0, hi = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        lo |= f32_to_e4m3fn(__fdiv_rn(v[i], s)) << (8 * i);
        hi |= f32_to_e4m3fn(__fdiv_rn(v[i + 4], s)) << (8 * i);
    }
    return make_uint2(lo, hi);
}

// A row's per-token codes, first half: v[i] = chunk c = c0 + threadIdx.x + i * blockDim.x of the
// row (c < c1), as chunk(c, v[i]) makes it (the values the codes are of); returns the largest
// |value| this thread holds.
template <int C, typename Chunk>
__device__ __forceinline__ float hold_chunks(float (&v)[C][8], int c0, int c1, Chunk chunk) {
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < C; i++) {
        const int c = c0 + threadIdx.x + i * blockDim.x;
        if (c < c1) {
            chunk(c, v[i]);
#pragma unroll
            for (int j = 0; j < 8; j++) amax = fmaxf(amax, fabsf(v[i][j]));
        }
    }
    return amax;
}

// The codes of the chunks hold_chunks(v, c0, c1, ..) holds, with the row's scale sc.
template <int C>
__device__ __forceinline__ void write_codes(const float (&v)[C][8], int c0, int c1, uint8_t* __restrict__ qrow,
                                            float sc) {
#pragma unroll
    for (int i = 0; i < C; i++) {
        const int c = c0 + threadIdx.x + i * blockDim.x;
        if (c < c1) *reinterpret_cast<uint2*>(qrow + 8 * c) = e4m3_codes8(v[i], sc);
    }
}

// The per-token e4m3 codes (qrow) and scale (*scale) of a row whose chunks c = threadIdx.x +
// i * blockDim.x (c < chunks) each thread holds in v[i], amax its largest |value| of them (the
// block's maximum through `sh`): fp8_act.cu quant_rows (mode 0), rms_norm.cuh's norm and
// fused_ops.cu's SiLU-mul write a row's codes with it, so all of them agree bit for bit. All threads.
template <int C>
__device__ __forceinline__ void write_row_codes(const float (&v)[C][8], float amax, int chunks,
                                                uint8_t* __restrict__ qrow, float* __restrict__ scale,
                                                float* sh) {
    const float sc = e4m3_row_scale(block_max(amax, sh));
    if (threadIdx.x == 0) *scale = sc;
    write_codes(v, 0, chunks, qrow, sc);
}
