// bitsandbytes 4-bit (NF4/FP4, optionally double-quantized) kernels, straight from the packed layout
// of crates/lorq-quant/src/bnb4 (the CPU kernel there is the reference):
//   weight [N, K] row-major, flattened, cut into blocks of `bs` (a power of two >= 32) elements;
//   element 2i is the HIGH nibble of byte i, 2i+1 the low one; value = lut[nibble] * absmax[block].
//   Double quantization: absmax[b] = dq_map[qabs[b]] * nested[b / nested_bs] + offset.
//
// - bnb4_gemv_*: y[M, N] = x[M, K] . W^T for a few rows (M <= 8 per launch row-group, grid.y covers
//   more): memory-bound, each weight byte read once. One warp per (output row, K-slice): every lane
//   streams 16-byte chunks (32 weights, always inside one absmax block since bs >= 32 and chunks
//   start on multiples of 32), decodes them through a 16-entry table in shared memory, multiplies
//   with x (L1/L2-resident) and applies the block's absmax once per chunk. Needs K % 32 == 0.
// - bnb4_dequant_*: the full weight in the compute dtype (then cuBLAS), any shape.
#include "common.cuh"

struct Bnb4Params {
    const uint8_t* w;       // packed nibbles, (N*K+1)/2 bytes
    const float* absmax;    // f32 absmax per block (when qabs == nullptr)
    const uint8_t* qabs;    // double quant: 8-bit absmax codes per block
    const float* nested;    // double quant: f32 absmax per nested block
    const float* dq_map;    // double quant: 256-entry map
    const float* lut;       // 16-entry NF4/FP4 table
    float offset;           // double quant: mean added back
    int nested_bs;          // double quant: codes per nested block
    int log2bs;             // log2(blocksize)
};

__device__ __forceinline__ float block_scale(const Bnb4Params& p, const float* s_map, size_t b) {
    if (p.qabs == nullptr) return __ldg(p.absmax + b);
    return s_map[__ldg(p.qabs + b)] * __ldg(p.nested + b / p.nested_bs) + p.offset;
}

constexpr int WARPS = 8;  // warps per block

// grid.x: N / (WARPS / SPLIT) row groups; grid.y: ceil(M / MR) activation row groups.
// Warp w of a block: output row blockIdx.x * (WARPS/SPLIT) + w / SPLIT, K-slice w % SPLIT.
template <typename T, int MR, int SPLIT>
__device__ __forceinline__ void gemv(const Bnb4Params p, const T* __restrict__ x, T* __restrict__ y,
                                     int M, int N, int K) {
    __shared__ float s_lut[16];
    __shared__ float s_map[256];
    __shared__ float s_part[WARPS][MR];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (tid < 16) s_lut[tid] = p.lut[tid];
    if (p.qabs != nullptr && tid < 256) s_map[tid] = p.dq_map[tid];
    __syncthreads();
    const int rows_per_block = WARPS / SPLIT;
    const int n = blockIdx.x * rows_per_block + warp / SPLIT;
    const int slice = warp % SPLIT;
    const int m0 = blockIdx.y * MR;
    // 16-byte chunks in flight per lane: fewer for more activation rows (registers).
    constexpr int UNROLL = MR <= 2 ? 4 : (MR == 4 ? 2 : 1);
    float acc[MR];
#pragma unroll
    for (int r = 0; r < MR; r++) acc[r] = 0.f;
    if (n < N) {
        const int chunks = K >> 5; // 32 weights per 16-byte chunk
        const uint4* wrow = reinterpret_cast<const uint4*>(p.w + (size_t)n * (K >> 1));
        const size_t elem0 = (size_t)n * K;
        for (int c0 = slice * 32 + lane; c0 < chunks; c0 += 32 * SPLIT * UNROLL) {
            uint4 q[UNROLL];
            float s[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                const int c = c0 + u * 32 * SPLIT;
                if (c < chunks) {
                    q[u] = __ldcs(wrow + c); // streamed once: don't keep it in L1
                    s[u] = block_scale(p, s_map, (elem0 + ((size_t)c << 5)) >> p.log2bs);
                }
            }
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                const int c = c0 + u * 32 * SPLIT;
                if (c >= chunks) break;
                const uint32_t words[4] = {q[u].x, q[u].y, q[u].z, q[u].w};
                float part[MR];
#pragma unroll
                for (int r = 0; r < MR; r++) part[r] = 0.f;
#pragma unroll
                for (int g = 0; g < 4; g++) {
                    // word g holds bytes 4g..4g+3 = elements 8g..8g+7 of the chunk.
                    float wv[8];
                    const uint32_t v = words[g];
#pragma unroll
                    for (int b = 0; b < 4; b++) {
                        wv[2 * b] = s_lut[(v >> (8 * b + 4)) & 15];
                        wv[2 * b + 1] = s_lut[(v >> (8 * b)) & 15];
                    }
#pragma unroll
                    for (int r = 0; r < MR; r++) {
                        if (MR == 1 || m0 + r < M) {
                            float xv[8];
                            load8<T>(x + (size_t)(m0 + r) * K + ((size_t)c << 5) + 8 * g, xv);
#pragma unroll
                            for (int e = 0; e < 8; e++) part[r] = fmaf(wv[e], xv[e], part[r]);
                        }
                    }
                }
#pragma unroll
                for (int r = 0; r < MR; r++) acc[r] = fmaf(part[r], s[u], acc[r]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < MR; r++)
        acc[r] = warp_sum(acc[r]);
    if (SPLIT == 1) {
        if (lane == 0 && n < N) {
#pragma unroll
            for (int r = 0; r < MR; r++)
                if (m0 + r < M) y[(size_t)(m0 + r) * N + n] = from_f<T>(acc[r]);
        }
        return;
    }
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < MR; r++) s_part[warp][r] = acc[r];
    }
    __syncthreads();
    if (tid < rows_per_block * MR) {
        const int row = tid / MR, r = tid % MR;
        const int nn = blockIdx.x * rows_per_block + row;
        float v = 0.f;
#pragma unroll
        for (int sidx = 0; sidx < SPLIT; sidx++) v += s_part[row * SPLIT + sidx][r];
        if (nn < N && m0 + r < M) y[(size_t)(m0 + r) * N + nn] = from_f<T>(v);
    }
}

// The weight arguments every kernel starts with (pushed by src/cuda/bnb4.rs `push_args`).
#define BNB4_ARGS                                                                                  \
    const uint8_t *w, const float *absmax, const uint8_t *qabs, const float *nested,              \
        const float *dq_map, const float *lut, float offset, int nested_bs, int log2bs
#define BNB4_PARAMS {w, absmax, qabs, nested, dq_map, lut, offset, nested_bs, log2bs}

#define GEMV(TNAME, T, MR, SPLIT)                                                                  \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) bnb4_gemv_##TNAME##_m##MR##_s##SPLIT( \
        BNB4_ARGS, const T* __restrict__ x, T* __restrict__ y, int M, int N, int K) {             \
        const Bnb4Params p = BNB4_PARAMS;                                                          \
        gemv<T, MR, SPLIT>(p, x, y, M, N, K);                                                      \
    }
#define GEMV_SPLITS(TNAME, T, MR) \
    GEMV(TNAME, T, MR, 1) GEMV(TNAME, T, MR, 2) GEMV(TNAME, T, MR, 4) GEMV(TNAME, T, MR, 8)
#define GEMV_ALL(TNAME, T) \
    GEMV_SPLITS(TNAME, T, 1) GEMV_SPLITS(TNAME, T, 2) GEMV_SPLITS(TNAME, T, 4) GEMV_SPLITS(TNAME, T, 8)

GEMV_ALL(f32, float)
GEMV_ALL(bf16, __nv_bfloat16)
GEMV_ALL(f16, __half)

// out[e] = lut[nibble(e)] * absmax[e >> log2bs] for e < numel, one byte (two elements) per thread.
template <typename T>
__device__ __forceinline__ void dequant(const Bnb4Params p, T* __restrict__ out, size_t numel) {
    __shared__ float s_lut[16];
    __shared__ float s_map[256];
    const int tid = threadIdx.x;
    if (tid < 16) s_lut[tid] = p.lut[tid];
    if (p.qabs != nullptr && tid < 256) s_map[tid] = p.dq_map[tid];
    __syncthreads();
    const size_t bytes = (numel + 1) / 2;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + tid; i < bytes; i += (size_t)gridDim.x * blockDim.x) {
        const uint8_t b = p.w[i];
        const size_t e = 2 * i;
        const float s = block_scale(p, s_map, e >> p.log2bs);
        out[e] = from_f<T>(s_lut[b >> 4] * s);
        if (e + 1 < numel) {
            // Elements 2i and 2i+1 share a block: blocks are even-sized.
            out[e + 1] = from_f<T>(s_lut[b & 15] * s);
        }
    }
}

#define DEQUANT(TNAME, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                              \
        bnb4_dequant_##TNAME(BNB4_ARGS, T* __restrict__ out, unsigned long long numel) {           \
        const Bnb4Params p = BNB4_PARAMS;                                                          \
        dequant<T>(p, out, (size_t)numel);                                                         \
    }
DEQUANT(f32, float)
DEQUANT(bf16, __nv_bfloat16)
DEQUANT(f16, __half)
