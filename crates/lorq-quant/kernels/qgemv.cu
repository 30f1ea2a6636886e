// Fused dequantize-GEMV for every weight-only format lorq runs on the GPU, from one packed layout
// (crates/lorq-quant/src/gpu_layout.rs builds it from each format; its CPU decoder is the reference):
//   codes: per output row, a dense little-endian stream of BITS-bit codes (code k at bit k*BITS),
//          K % 32 == 0, so 32 weights (a "chunk") are exactly BITS 32-bit words, word-aligned;
//   groups of G consecutive inputs (G % 32 == 0, or 8 / 16 for hqq 2-bit) with a scale and,
//   for affine codes, a zero: w = s * (q - z); for table codes (NF4/FP4, FP8 e4m3): w = lut[q] * s.
//
// - qgemv_*: y[M, N] = x[M, K] . W^T for M <= 8 rows per launch row-group (grid.y covers more);
//   up to three weights sharing x in one launch (QGroup), each with its own output.
//   Memory-bound: every code word is read once. A warp owns RPW output rows and a K-slice (SPLIT warps
//   share a row group); each lane streams whole chunks, loads the 32 activations of a chunk once for
//   all RPW rows, and accumulates in f32. bf16/f16 activations use the group identity
//   sum_k x_k s (q_k - z) = s (sum x_k q_k - z sum x_k): per weight one integer-to-float (a 2-op
//   magic-number conversion, not the quarter-rate I2F) and one FMA. f32 activations (training, tests
//   at 1e-5) compute each weight exactly as the CPU reference does, with its rounding.
// - qgemv_half2.cu: one bf16/f16 row through 4-bit codes, two weights per f16 instruction.
// - qdequant_*: the full weight [N, K] in the compute dtype (then cuBLAS for large M).
#include "qparams.cuh"
#include <type_traits>

template <int BITS>
__device__ __forceinline__ uint32_t code_at(const uint32_t (&w)[BITS], int e) {
    const int bit = e * BITS;
    const int i = bit >> 5, sh = bit & 31;
    uint32_t v = w[i] >> sh;
    if (sh + BITS > 32) v |= w[i + 1] << (32 - sh);
    return v & ((1u << BITS) - 1u);
}

// Elements 8j..8j+7 of a chunk (j a compile-time constant) in the low 8*BITS bits.
template <int BITS>
__device__ __forceinline__ uint64_t group8(const uint32_t (&w)[BITS], int j) {
    const int bit = 8 * j * BITS;
    const int i = bit >> 5, sh = bit & 31;
    const uint64_t lo = w[i];
    const uint64_t hi = (i + 1 < BITS) ? w[i + 1] : 0u;
    return ((hi << 32) | lo) >> sh;
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

// Blocks per weight: ceil(ceil(N / RPW) * SPLIT / WARPS), bx the block's index among them;
// grid.y: ceil(M / MR).
template <typename T, int BITS, bool LUTK, int MR, int RPW, int SPLIT>
__device__ __forceinline__ void qgemv(const QParams p, const T* __restrict__ x, T* __restrict__ y,
                                      int M, int N, int K, int bx) {
    constexpr bool EXACT = std::is_same<T, float>::value;
    // Affine codes of 2, 4 or 8 bits never straddle a word: the masked-in-place decode.
    constexpr bool FASTAFF = !EXACT && !LUTK && (BITS == 2 || BITS == 4 || BITS == 8);
    __shared__ float s_lut[LUTK ? (1 << BITS) : 1];
    __shared__ float s_part[SPLIT > 1 ? WARPS : 1][RPW * MR];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    if (LUTK) {
        for (int i = tid; i < (1 << BITS); i += blockDim.x) s_lut[i] = p.lut[i];
        __syncthreads();
    }
    const int gw = bx * WARPS + warp;
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
                if constexpr (FASTAFF) {
                    // A code at bit `pos` of its word, masked in place under the 2^23 exponent,
                    // is q * 2^pos exactly while it stays in the 23 mantissa bits (pos + BITS <=
                    // 23; higher codes come from the word shifted down by 16): one LOP3 + FADD
                    // per weight, the 2^-pos moved onto the activation once for all RPW rows.
                    float xq[MR][8];
#pragma unroll
                    for (int e = 0; e < 8; e++) {
                        const int pos = ((8 * j + e) * BITS) & 31;
                        const int sh = pos + BITS <= 23 ? pos : pos - 16;
#pragma unroll
                        for (int m = 0; m < MR; m++) xq[m][e] = xv[m][e] * __int_as_float((127 - sh) << 23);
                    }
#pragma unroll
                    for (int r = 0; r < RPW; r++) {
#pragma unroll
                        for (int e = 0; e < 8; e++) {
                            const int bit = (8 * j + e) * BITS;
                            const int pos = bit & 31;
                            const uint32_t word = wd[r][bit >> 5];
                            const uint32_t src = pos + BITS <= 23 ? word : (word >> 16);
                            const int sh = pos + BITS <= 23 ? pos : pos - 16;
                            const float w = __int_as_float(0x4B000000u | (src & (((1u << BITS) - 1u) << sh))) - 8388608.f;
#pragma unroll
                            for (int m = 0; m < MR; m++) dot[r][m] = fmaf(w, xq[m][e], dot[r][m]);
                        }
                    }
                } else {
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
        for (int m = 0; m < MR; m++)
            acc[r][m] = warp_sum(acc[r][m]);
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
        const int n = ((bx * WARPS + grp * SPLIT) / SPLIT) * RPW + r;
        float v = 0.f;
#pragma unroll
        for (int sidx = 0; sidx < SPLIT; sidx++) v += s_part[grp * SPLIT + sidx][rm];
        if (n < N && m0 + m < M) y[(size_t)(m0 + m) * N + n] = from_f<T>(v);
    }
}

// qgemv_<kind>_<dtype>_m<MR>_r<RPW>_s<SPLIT>; kinds: a2/a3/a4/a8 (affine), t4/t8 (table).
#define QGEMV(KN, BITS, LUTK, TN, T, MR, RPW, SPLIT)                                               \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                       \
        qgemv_##KN##_##TN##_m##MR##_r##RPW##_s##SPLIT(QARGS, const T* __restrict__ x,              \
                                                     T* __restrict__ y, int M, int N, int K,       \
                                                     const QGroup g) {                             \
        qgroup_dispatch(QParams QPARAMS, y, N, g, [&](const QParams& p, T* yw, int n, int b) {    \
            qgemv<T, BITS, LUTK, MR, RPW, SPLIT>(p, x, yw, M, n, K, b);                            \
        });                                                                                        \
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

// The codes of elements e0 .. e0 + 7 of a row (e0 a multiple of 8: BITS whole bytes) in the low
// 8 * BITS bits.
template <int BITS>
__device__ __forceinline__ uint64_t load_code8(const uint32_t* __restrict__ row, size_t e0) {
    const uint8_t* b = reinterpret_cast<const uint8_t*>(row) + e0 / 8 * BITS;
    if constexpr (BITS == 8) {
        const uint2 v = __ldcs(reinterpret_cast<const uint2*>(b));
        return (uint64_t)v.x | ((uint64_t)v.y << 32);
    } else if constexpr (BITS == 4) {
        return __ldcs(reinterpret_cast<const uint32_t*>(b));
    } else if constexpr (BITS == 2) {
        return __ldcs(reinterpret_cast<const unsigned short*>(b));
    } else {
        uint64_t v = 0;
#pragma unroll
        for (int i = 0; i < BITS; i++) v |= (uint64_t)__ldcs(b + i) << (8 * i);
        return v;
    }
}

// out[n, k] for 8 consecutive weights per thread, each exactly as the CPU reference: a warp reads
// 32 consecutive code runs and writes 32 consecutive 16-byte (bf16/f16) or 32-byte (f32) runs, so
// both sides coalesce (one chunk of 32 per thread, the first version, strode its 64-byte stores
// over the warp and moved about 1 TB/s).
template <typename T, int BITS, bool LUTK>
__device__ __forceinline__ void qdequant(const QParams p, T* __restrict__ out, int N, int K) {
    __shared__ float s_lut[LUTK ? (1 << BITS) : 1];
    if (LUTK) {
        for (int i = threadIdx.x; i < (1 << BITS); i += blockDim.x) s_lut[i] = p.lut[i];
        __syncthreads();
    }
    const int runs = K >> 3;
    const size_t total = (size_t)N * runs;
    for (size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        const int n = t / runs, k0 = (int)(t % runs) << 3;
        const uint64_t q = load_code8<BITS>(p.codes + (size_t)n * p.wpr, k0);
        const float* srow = p.scales + (size_t)n * p.groups;
        const float* zrow = LUTK ? nullptr : p.zeros + (size_t)n * p.groups;
        const int g0 = k0 / p.gsize;  // groups of 8 or more: one group per run of 8
        const float s = srow[g0], z = LUTK ? 0.f : zrow[g0];
        __align__(16) T v[8];
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const uint32_t c = (uint32_t)(q >> (e * BITS)) & ((1u << BITS) - 1u);
            v[e] = from_f<T>(exact_weight<LUTK>(c, s, z, s_lut, p.round_mode));
        }
        const uint4* src = reinterpret_cast<const uint4*>(v);
        uint4* dst = reinterpret_cast<uint4*>(out + (size_t)n * K + k0);
#pragma unroll
        for (int i = 0; i < (int)(8 * sizeof(T) / 16); i++) dst[i] = src[i];
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

// ---------------------------------------------------------------------------------------------
// qmma_*: the same layout on tensor cores, for 2..64 activation rows (bf16/f16 activations).
// A block owns 16 output rows (two n8 tiles) and up to MT*16 activation rows; its 8 warps split K
// by 32-weight chunks. Each lane decodes the 8 weights of its mma B fragments from the chunk
// (scale and zero applied in f32, rounded once to the activation dtype) — every weight decoded
// once per block — then runs m16n8k16 mma with f32 accumulation for every m tile; the 8 warps'
// partial sums are added in shared memory (the mma and the pair packing: common.cuh).
constexpr int MMA_WARPS = 8;

template <typename T, int BITS, bool LUTK, int MT>
__device__ __forceinline__ void qmma(const QParams p, const T* __restrict__ x, T* __restrict__ y,
                                     int M, int N, int K) {
    __shared__ float s_lut[LUTK ? (1 << BITS) : 1];
    __shared__ float s_red[MMA_WARPS - 1][MT * 2 * 4][32];  // lane fastest: no bank conflicts
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    if (LUTK) {
        for (int i = tid; i < (1 << BITS); i += blockDim.x) s_lut[i] = p.lut[i];
    }
    __syncthreads();
    const int g = lane >> 2, t = lane & 3;
    const int nb = blockIdx.x * 16;          // first output row of the block
    const int mb = blockIdx.y * (16 * MT);   // first activation row
    const int chunks = K >> 5;
    float acc[MT][2][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int j = 0; j < 2; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[mt][j][i] = 0.f;
    for (int c = warp; c < chunks; c += MMA_WARPS) {
        // B fragments of the two n8 tiles for the chunk's two k16 steps.
        uint32_t b[2][2][2];  // [tile][kstep][reg]
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const int n = min(nb + 8 * j + g, N - 1);
            uint32_t wd[BITS];
            load_chunk<BITS>(p.codes + (size_t)n * p.wpr + (size_t)c * BITS, wd);
            const float* srow = p.scales + (size_t)n * p.groups;
            const float* zrow = LUTK ? nullptr : p.zeros + (size_t)n * p.groups;
            const int g0 = (c * 32) / p.gsize;
            const float s0 = __ldg(srow + g0), z0 = LUTK ? 0.f : __ldg(zrow + g0);
#pragma unroll
            for (int ks = 0; ks < 2; ks++) {
#pragma unroll
                for (int half = 0; half < 2; half++) {
                    // Elements 8q..8q+7 of the chunk (q compile-time) hold this lane's two k,
                    // at 2t and 2t+1: shift the group, not index the words, so wd stays in
                    // registers.
                    const int q8 = 2 * ks + half;
                    const uint64_t grp = group8<BITS>(wd, q8) >> (2 * t * BITS);
                    float v[2];
#pragma unroll
                    for (int u = 0; u < 2; u++) {
                        const int e = 8 * q8 + 2 * t + u;
                        float s = s0, z = z0;
                        if (p.gsize < 32) {  // groups of 8 / 16 (hqq 2-bit)
                            const int gi = (c * 32 + e) / p.gsize;
                            s = __ldg(srow + gi);
                            z = LUTK ? 0.f : __ldg(zrow + gi);
                        }
                        const uint32_t q = (uint32_t)(grp >> (u * BITS)) & ((1u << BITS) - 1u);
                        v[u] = LUTK ? s_lut[q] * s : s * (u2f(q) - z);
                    }
                    b[j][ks][half] = pack2<T>(v[0], v[1]);
                }
            }
        }
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            const int r0 = mb + 16 * mt + g, r1 = r0 + 8;
#pragma unroll
            for (int ks = 0; ks < 2; ks++) {
                const int k0 = c * 32 + 16 * ks + 2 * t;
                uint32_t a[4];
                const uint32_t* x0 = reinterpret_cast<const uint32_t*>(x + (size_t)r0 * K + k0);
                const uint32_t* x1 = reinterpret_cast<const uint32_t*>(x + (size_t)r1 * K + k0);
                a[0] = r0 < M ? __ldg(x0) : 0u;
                a[1] = r1 < M ? __ldg(x1) : 0u;
                a[2] = r0 < M ? __ldg(x0 + 4) : 0u;
                a[3] = r1 < M ? __ldg(x1 + 4) : 0u;
#pragma unroll
                for (int j = 0; j < 2; j++) mma16816<T>(acc[mt][j], a, b[j][ks][0], b[j][ks][1]);
            }
        }
    }
    if (warp > 0) {
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int j = 0; j < 2; j++)
#pragma unroll
                for (int i = 0; i < 4; i++) s_red[warp - 1][(mt * 2 + j) * 4 + i][lane] = acc[mt][j][i];
    }
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int j = 0; j < 2; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                float v = acc[mt][j][i];
                for (int w = 0; w < MMA_WARPS - 1; w++) v += s_red[w][(mt * 2 + j) * 4 + i][lane];
                // c0, c1: row g, cols 2t, 2t+1; c2, c3: row g+8.
                const int r = mb + 16 * mt + g + (i >= 2 ? 8 : 0);
                const int n = nb + 8 * j + 2 * t + (i & 1);
                if (r < M && n < N) y[(size_t)r * N + n] = from_f<T>(v);
            }
}

#define QMMA(KN, BITS, LUTK, TN, T, MT)                                                            \
    extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32)                                   \
        qmma_##KN##_##TN##_t##MT(QARGS, const T* __restrict__ x, T* __restrict__ y, int M, int N,  \
                                 int K) {                                                          \
        const QParams p = QPARAMS;                                                                 \
        qmma<T, BITS, LUTK, MT>(p, x, y, M, N, K);                                                 \
    }
#define QMMA_KIND(KN, BITS, LUTK)                                                                  \
    QMMA(KN, BITS, LUTK, bf16, __nv_bfloat16, 1) QMMA(KN, BITS, LUTK, bf16, __nv_bfloat16, 2)      \
    QMMA(KN, BITS, LUTK, bf16, __nv_bfloat16, 4) QMMA(KN, BITS, LUTK, f16, __half, 1)              \
    QMMA(KN, BITS, LUTK, f16, __half, 2) QMMA(KN, BITS, LUTK, f16, __half, 4)
QMMA_KIND(a2, 2, false)
QMMA_KIND(a3, 3, false)
QMMA_KIND(a4, 4, false)
QMMA_KIND(a8, 8, false)
QMMA_KIND(t4, 4, true)
QMMA_KIND(t8, 8, true)
