// Fused dequantize-GEMV for every weight-only format lorq runs on the GPU, from one packed layout
// (crates/lorq-quant/src/gpu_layout.rs builds it from each format; its CPU decoder is the reference):
//   codes: per output row, a dense little-endian stream of BITS-bit codes (code k at bit k*BITS),
//          K % 32 == 0, so 32 weights (a "chunk") are exactly BITS 32-bit words, word-aligned;
//   groups of G consecutive inputs (G % 32 == 0, or 8 / 16 for hqq 2-bit) with a scale and,
//   for affine codes, a zero: w = s * (q - z); for table codes (NF4/FP4, FP8 e4m3): w = lut[q] * s.
//
// - qgemv_*: y[M, N] = x[M, K] . W^T for M <= 8 rows per launch row-group (grid.y covers more).
//   Memory-bound: every code word is read once. A warp owns RPW output rows and a K-slice (SPLIT warps
//   share a row group); each lane streams whole chunks, loads the 32 activations of a chunk once for
//   all RPW rows, and accumulates in f32. bf16/f16 activations use the group identity
//   sum_k x_k s (q_k - z) = s (sum x_k q_k - z sum x_k): per weight one integer-to-float (a 2-op
//   magic-number conversion, not the quarter-rate I2F) and one FMA. f32 activations (training, tests
//   at 1e-5) compute each weight exactly as the CPU reference does, with its rounding.
// - qdequant_*: the full weight [N, K] in the compute dtype (then cuBLAS for large M).
#include "common.cuh"
#include <type_traits>

struct QParams {
    const uint32_t* codes;  // [N, wpr]
    const float* scales;    // [N, groups]
    const float* zeros;     // [N, groups] (affine codes only)
    const float* lut;       // 2^BITS entries (table codes only)
    int wpr;                // 32-bit words per row: K * BITS / 32
    int gsize;              // inputs per group: a multiple of 32, or 8 / 16
    int groups;             // groups per row
    int round_mode;         // f32 exact path: 0 none, 1 f16, 2 bf16; +4: (q - z) rounded first (hqq)
};

template <int BITS>
__device__ __forceinline__ uint32_t code_at(const uint32_t (&w)[BITS], int e) {
    const int bit = e * BITS;
    const int i = bit >> 5, sh = bit & 31;
    uint32_t v = w[i] >> sh;
    if (sh + BITS > 32) v |= w[i + 1] << (32 - sh);
    return v & ((1u << BITS) - 1u);
}

// Exact small unsigned int -> float without I2F: 2^23 + q has q in its mantissa.
__device__ __forceinline__ float u2f(uint32_t q) { return __int_as_float(0x4B000000u | q) - 8388608.f; }

__device__ __forceinline__ float round_to(float v, int mode) {
    if (mode == 1) return __half2float(__float2half_rn(v));
    if (mode == 2) return __bfloat162float(__float2bfloat16_rn(v));
    return v;
}

// The weight exactly as the CPU reference computes it.
template <bool LUTK>
__device__ __forceinline__ float exact_weight(uint32_t q, float s, float z, const float* s_lut, int mode) {
    const int m = mode & 3;
    if (LUTK) return round_to(s_lut[q] * s, m);
    float d = u2f(q) - z;
    if (mode & 4) d = round_to(d, m);
    return round_to(d * s, m);
}

template <int BITS>
__device__ __forceinline__ void load_chunk(const uint32_t* p, uint32_t (&w)[BITS]) {
    if constexpr (BITS == 4) {
        uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
        w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    } else if constexpr (BITS == 8) {
        uint4 a = __ldcs(reinterpret_cast<const uint4*>(p));
        uint4 b = __ldcs(reinterpret_cast<const uint4*>(p) + 1);
        w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
        w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
    } else if constexpr (BITS == 2) {
        uint2 v = __ldcs(reinterpret_cast<const uint2*>(p));
        w[0] = v.x; w[1] = v.y;
    } else {
#pragma unroll
        for (int i = 0; i < BITS; i++) w[i] = __ldcs(p + i);
    }
}

constexpr int WARPS = 8;  // warps per block

// grid.x: ceil(ceil(N / RPW) * SPLIT / WARPS); grid.y: ceil(M / MR).
template <typename T, int BITS, bool LUTK, int MR, int RPW, int SPLIT>
__device__ __forceinline__ void qgemv(const QParams p, const T* __restrict__ x, T* __restrict__ y,
                                      int M, int N, int K) {
    constexpr bool EXACT = std::is_same<T, float>::value;
    __shared__ float s_lut[LUTK ? (1 << BITS) : 1];
    __shared__ float s_part[SPLIT > 1 ? WARPS : 1][RPW * MR];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    if (LUTK) {
        for (int i = tid; i < (1 << BITS); i += blockDim.x) s_lut[i] = p.lut[i];
        __syncthreads();
    }
    const int gw = blockIdx.x * WARPS + warp;
    const int n0 = (gw / SPLIT) * RPW, slice = gw % SPLIT;
    const int m0 = blockIdx.y * MR;
    const int chunks = K >> 5;
    float acc[RPW][MR];
#pragma unroll
    for (int r = 0; r < RPW; r++)
#pragma unroll
        for (int m = 0; m < MR; m++) acc[r][m] = 0.f;
    if (n0 < N) {
        for (int c = slice * 32 + lane; c < chunks; c += 32 * SPLIT) {
            uint32_t wd[RPW][BITS];
            float s[RPW], z[RPW];
            const int g = (c * 32) / p.gsize;
#pragma unroll
            for (int r = 0; r < RPW; r++) {
                const int n = min(n0 + r, N - 1);  // rows past N compute garbage, never stored
                load_chunk<BITS>(p.codes + (size_t)n * p.wpr + (size_t)c * BITS, wd[r]);
                s[r] = __ldg(p.scales + (size_t)n * p.groups + g);
                z[r] = LUTK ? 0.f : __ldg(p.zeros + (size_t)n * p.groups + g);
            }
#pragma unroll
            for (int j = 0; j < 4; j++) {
                // Groups of 8 or 16 (hqq 2-bit): the scale changes inside a chunk.
                if (p.gsize < 32 && j > 0 && ((8 * j) % p.gsize) == 0) {
                    const int gj = (c * 32 + 8 * j) / p.gsize;
#pragma unroll
                    for (int r = 0; r < RPW; r++) {
                        const int n = min(n0 + r, N - 1);
                        s[r] = __ldg(p.scales + (size_t)n * p.groups + gj);
                        z[r] = LUTK ? 0.f : __ldg(p.zeros + (size_t)n * p.groups + gj);
                    }
                }
                float xv[MR][8], xs[MR], dot[RPW][MR];
#pragma unroll
                for (int m = 0; m < MR; m++) {
                    xs[m] = 0.f;
#pragma unroll
                    for (int r = 0; r < RPW; r++) dot[r][m] = 0.f;
                    if (MR == 1 || m0 + m < M) {
                        load8<T>(x + (size_t)(m0 + m) * K + ((size_t)c << 5) + 8 * j, xv[m]);
                    } else {
#pragma unroll
                        for (int e = 0; e < 8; e++) xv[m][e] = 0.f;
                    }
                    if (!EXACT && !LUTK) {
#pragma unroll
                        for (int e = 0; e < 8; e++) xs[m] += xv[m][e];
                    }
                }
#pragma unroll
                for (int r = 0; r < RPW; r++) {
#pragma unroll
                    for (int e = 0; e < 8; e++) {
                        const uint32_t q = code_at<BITS>(wd[r], 8 * j + e);
                        float w;
                        if (EXACT) w = exact_weight<LUTK>(q, s[r], z[r], s_lut, p.round_mode);
                        else w = LUTK ? s_lut[q] : u2f(q);
#pragma unroll
                        for (int m = 0; m < MR; m++) dot[r][m] = fmaf(w, xv[m][e], dot[r][m]);
                    }
                }
#pragma unroll
                for (int r = 0; r < RPW; r++)
#pragma unroll
                    for (int m = 0; m < MR; m++) {
                        if (EXACT) acc[r][m] += dot[r][m];
                        else if (LUTK) acc[r][m] = fmaf(s[r], dot[r][m], acc[r][m]);
                        else acc[r][m] = fmaf(s[r], fmaf(-z[r], xs[m], dot[r][m]), acc[r][m]);
                    }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < RPW; r++)
#pragma unroll
        for (int m = 0; m < MR; m++) {
            float v = acc[r][m];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            acc[r][m] = v;
        }
    if (SPLIT == 1) {
        if (lane == 0) {
#pragma unroll
            for (int r = 0; r < RPW; r++)
#pragma unroll
                for (int m = 0; m < MR; m++)
                    if (n0 + r < N && m0 + m < M) y[(size_t)(m0 + m) * N + n0 + r] = from_f<T>(acc[r][m]);
        }
        return;
    }
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < RPW; r++)
#pragma unroll
            for (int m = 0; m < MR; m++) s_part[warp][r * MR + m] = acc[r][m];
    }
    __syncthreads();
    // Warps w .. w+SPLIT-1 of a block share one row group (WARPS % SPLIT == 0).
    constexpr int GROUPS = WARPS / SPLIT;
    if (tid < GROUPS * RPW * MR) {
        const int grp = tid / (RPW * MR), rm = tid % (RPW * MR);
        const int r = rm / MR, m = rm % MR;
        const int n = ((blockIdx.x * WARPS + grp * SPLIT) / SPLIT) * RPW + r;
        float v = 0.f;
#pragma unroll
        for (int sidx = 0; sidx < SPLIT; sidx++) v += s_part[grp * SPLIT + sidx][rm];
        if (n < N && m0 + m < M) y[(size_t)(m0 + m) * N + n] = from_f<T>(v);
    }
}

#define QARGS                                                                                      \
    const uint32_t *codes, const float *scales, const float *zeros, const float *lut, int wpr,    \
        int gsize, int groups, int round_mode
#define QPARAMS {codes, scales, zeros, lut, wpr, gsize, groups, round_mode}

// qgemv_<kind>_<dtype>_m<MR>_r<RPW>_s<SPLIT>; kinds: a2/a3/a4/a8 (affine), t4/t8 (table).
#define QGEMV(KN, BITS, LUTK, TN, T, MR, RPW, SPLIT)                                               \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                       \
        qgemv_##KN##_##TN##_m##MR##_r##RPW##_s##SPLIT(QARGS, const T* __restrict__ x,              \
                                                     T* __restrict__ y, int M, int N, int K) {     \
        const QParams p = QPARAMS;                                                                 \
        qgemv<T, BITS, LUTK, MR, RPW, SPLIT>(p, x, y, M, N, K);                                    \
    }
#define QGEMV_SPLITS(KN, BITS, LUTK, TN, T, MR, RPW)                                               \
    QGEMV(KN, BITS, LUTK, TN, T, MR, RPW, 1) QGEMV(KN, BITS, LUTK, TN, T, MR, RPW, 4)
// Half-precision activations: RPW 1 or 4 up to MR 2, RPW 1 above (registers).
#define QGEMV_HALF(KN, BITS, LUTK, TN, T)                                                          \
    QGEMV_SPLITS(KN, BITS, LUTK, TN, T, 1, 1) QGEMV_SPLITS(KN, BITS, LUTK, TN, T, 1, 4)            \
    QGEMV_SPLITS(KN, BITS, LUTK, TN, T, 2, 1) QGEMV_SPLITS(KN, BITS, LUTK, TN, T, 2, 4)            \
    QGEMV_SPLITS(KN, BITS, LUTK, TN, T, 4, 1) QGEMV_SPLITS(KN, BITS, LUTK, TN, T, 8, 1)
#define QGEMV_F32(KN, BITS, LUTK)                                                                  \
    QGEMV_SPLITS(KN, BITS, LUTK, f32, float, 1, 1) QGEMV_SPLITS(KN, BITS, LUTK, f32, float, 2, 1)  \
    QGEMV_SPLITS(KN, BITS, LUTK, f32, float, 4, 1) QGEMV_SPLITS(KN, BITS, LUTK, f32, float, 8, 1)
#define QGEMV_KIND(KN, BITS, LUTK)                                                                 \
    QGEMV_HALF(KN, BITS, LUTK, bf16, __nv_bfloat16) QGEMV_HALF(KN, BITS, LUTK, f16, __half)        \
    QGEMV_F32(KN, BITS, LUTK)

QGEMV_KIND(a2, 2, false)
QGEMV_KIND(a3, 3, false)
QGEMV_KIND(a4, 4, false)
QGEMV_KIND(a8, 8, false)
QGEMV_KIND(t4, 4, true)
QGEMV_KIND(t8, 8, true)

// out[n, k] for one chunk of 32 weights per thread, each weight exactly as the CPU reference.
template <typename T, int BITS, bool LUTK>
__device__ __forceinline__ void qdequant(const QParams p, T* __restrict__ out, int N, int K) {
    __shared__ float s_lut[LUTK ? (1 << BITS) : 1];
    if (LUTK) {
        for (int i = threadIdx.x; i < (1 << BITS); i += blockDim.x) s_lut[i] = p.lut[i];
        __syncthreads();
    }
    const int chunks = K >> 5;
    const size_t total = (size_t)N * chunks;
    for (size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        const int n = t / chunks, c = t % chunks;
        uint32_t wd[BITS];
        load_chunk<BITS>(p.codes + (size_t)n * p.wpr + (size_t)c * BITS, wd);
        T* o = out + (size_t)n * K + ((size_t)c << 5);
#pragma unroll
        for (int e = 0; e < 32; e++) {
            const int g = (c * 32 + e) / p.gsize;
            const float s = p.scales[(size_t)n * p.groups + g];
            const float z = LUTK ? 0.f : p.zeros[(size_t)n * p.groups + g];
            o[e] = from_f<T>(exact_weight<LUTK>(code_at<BITS>(wd, e), s, z, s_lut, p.round_mode));
        }
    }
}

#define QDEQUANT(KN, BITS, LUTK, TN, T)                                                            \
    extern "C" __global__ void __launch_bounds__(256)                                              \
        qdequant_##KN##_##TN(QARGS, T* __restrict__ out, int N, int K) {                           \
        const QParams p = QPARAMS;                                                                 \
        qdequant<T, BITS, LUTK>(p, out, N, K);                                                     \
    }
#define QDEQUANT_KIND(KN, BITS, LUTK)                                                              \
    QDEQUANT(KN, BITS, LUTK, f32, float) QDEQUANT(KN, BITS, LUTK, bf16, __nv_bfloat16)             \
    QDEQUANT(KN, BITS, LUTK, f16, __half)
QDEQUANT_KIND(a2, 2, false)
QDEQUANT_KIND(a3, 3, false)
QDEQUANT_KIND(a4, 4, false)
QDEQUANT_KIND(a8, 8, false)
QDEQUANT_KIND(t4, 4, true)
QDEQUANT_KIND(t8, 8, true)
