// qmmat_*: y[M, N] = x[M, K] . W^T on tensor cores for 4-bit (affine a4, table t4), 8-bit (a8),
// 3-bit (a3) and 2-bit (a2) weights in the packed GPU layout (crates/lorq-quant/src/gpu_layout.rs;
// the same buffers the GEMV of qgemv.cu reads), bf16/f16 activations, f32 accumulation, M rows in
// blocks of up to 128. Groups must be a multiple of 32 (16 for 2-bit codes).
//
// The weight is the mma's A operand (16 output rows x 16 k), the activations its B operand (16 k x
// 8 activation rows), so M = 2..8 wastes no tensor-core rows on padding.
// - The weight codes stream from global memory straight into registers, as in the GEMV: lane (g, t)
//   of a warp loads, per 128-wide K step, the chunk t (32 codes: 8, 12, 16 or 32 bytes) of each of
//   its output rows g and g + 8 of every m16 tile it owns, with the chunk's scale (and zero), PF
//   steps ahead of the math. Staging the weights through shared memory (the first version of this
//   kernel) streamed at about 1 TB/s; from registers the same loop reaches the GEMV's bandwidth at
//   small M.
// - Block: WR x WK warps. Warp (wr, ws) owns RT m16 row tiles and the K steps ws, ws + WK, ... of
//   the block's K range; the WK warps of a row group add their sums in shared memory in a fixed
//   order. Several blocks split K only when the row blocks alone leave most SMs idle; the last one
//   to finish a tile adds the others' f32 partial sums (in split order: deterministic).
// - Activations: each lane reads the 32 activations of its chunk for each n8 tile (L1-cached; the
//   block's warps share them).
// - K order inside an mma is free as long as A and B agree: lane t of a quad takes the whole
//   32-weight chunk t of the step, and its bf16x2/f16x2 pairs are codes (j, j+4) of a 32-bit word —
//   what one mask with the 2^7 (bf16) / 2^10 (f16) magic exponent yields — so the activations are
//   paired the same way ((x_j, x_j+4), one PRMT each). 8-bit codes pair byte j of two words (the
//   same (j, j+4)); 2-bit words pair codes (c, c+8), and their activations likewise (Walk).
// - Affine codes: (q - zi) * s - (z - zi) * s in half precision, zi the zero rounded to an integer
//   (q - zi exact via the magic number, one HSUB2 + one HFMA2 per pair; exact zeros, as GPTQ/AWQ
//   have, leave one rounding per weight); table codes (NF4/FP4): the 16-entry table as bytes in
//   registers, looked up with PRMT four codes at a time, times s (HMUL2). Error: a few 2^-9
//   relative per weight in bf16. 8-bit codes with bf16 activations form q - zi in f32 (128 + q is
//   not an exact bf16 past q = 127), then pack it (exact) and scale it as above.
// (The kernel bodies and their helpers; qmma_tiled.cu instantiates them, qwgmma.cu reuses the
// weight stream, the decode and the epilogue.)
#pragma once
#include <cooperative_groups.h>
#include <type_traits>

#include "common.cuh"
#include "mma_pipeline.cuh"
#include "table_codes.cuh"

namespace qmmat {

constexpr int THREADS = 256;  // every block shape: WR * WK = 8 warps (qmma_tiled.rs THREADS)

template <typename T> struct Half;
template <> struct Half<__nv_bfloat16> {
    static constexpr uint32_t MAGIC = 0x43004300u;  // bf16x2 (128, 128): 128 + q for q < 128 exact
    static constexpr float MAGIC_F = 128.f;
    static constexpr float ZI_MAX = 127.f;  // 128 + zi stays an exact bf16 integer
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) { return pack2<__nv_bfloat16>(lo, hi); }
    static __device__ __forceinline__ uint32_t sub(uint32_t a, uint32_t b) {
        __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
        return *reinterpret_cast<uint32_t*>(&r);
    }
    static __device__ __forceinline__ uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
        __nv_bfloat162 r = __hfma2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b),
                                   *reinterpret_cast<__nv_bfloat162*>(&c));
        return *reinterpret_cast<uint32_t*>(&r);
    }
    static __device__ __forceinline__ uint32_t mul(uint32_t a, uint32_t b) {
        __nv_bfloat162 r = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
        return *reinterpret_cast<uint32_t*>(&r);
    }
    static __device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
        mma16816<__nv_bfloat16>(d, a0, a1, a2, a3, b0, b1);
    }
};
template <> struct Half<__half> {
    static constexpr uint32_t MAGIC = 0x64006400u;  // f16x2 (1024, 1024): 1024 + q exact
    static constexpr float MAGIC_F = 1024.f;
    static constexpr float ZI_MAX = 1023.f;
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) { return pack2<__half>(lo, hi); }
    static __device__ __forceinline__ uint32_t sub(uint32_t a, uint32_t b) {
        __half2 r = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
        return *reinterpret_cast<uint32_t*>(&r);
    }
    static __device__ __forceinline__ uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
        __half2 r = __hfma2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b),
                            *reinterpret_cast<__half2*>(&c));
        return *reinterpret_cast<uint32_t*>(&r);
    }
    static __device__ __forceinline__ uint32_t mul(uint32_t a, uint32_t b) {
        __half2 r = __hmul2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
        return *reinterpret_cast<uint32_t*>(&r);
    }
    static __device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
        mma16816<__half>(d, a0, a1, a2, a3, b0, b1);
    }
};

// Pair j (codes j, j + 4) of 4-bit word w as the magic number leaves it: (MAGIC + q, MAGIC + q'),
// exact in bf16 and f16.
template <typename T> __device__ __forceinline__ uint32_t raw_pair(uint32_t w, int j) {
    return ((w >> (4 * j)) & 0x000F000Fu) | Half<T>::MAGIC;
}

// The 4 pairs (codes j, j+4), j = 0..3, of word w: table codes lut[q] (unscaled); affine codes
// q - zi exactly, base holding the pair (MAGIC + zi, MAGIC + zi).
template <typename T, bool LUTK>
__device__ __forceinline__ void decode_word(uint32_t w, uint32_t base, const uint32_t (&tlo)[4], const uint32_t (&thi)[4],
                                            uint32_t (&p)[4]) {
    if constexpr (LUTK) {
        table_pairs(w, tlo, thi, p);
    } else {
#pragma unroll
        for (int j = 0; j < 4; j++) p[j] = Half<T>::sub(raw_pair<T>(w, j), base);
    }
}

// One K step's weights of a lane: chunk t (32 codes, BITS words) of rows g and g + 8 of each m16
// tile, with scales.
template <int RT, int BITS> struct Frag {
    static constexpr int NG = BITS == 2 ? 2 : 1;  // groups a chunk may span (Walk)
    uint32_t w[RT][2][BITS];
    float s[RT][2][NG], z[RT][2][NG];
};

// Makes the lane wait here for every register of f, i.e. for its loads: an XOR of them decides a
// store to a word nobody reads, which the compiler cannot drop. A register ring refilled right
// after its step is computed hands the next step's first use a wait on the loads just issued (the
// loads share the warp's few scoreboards: a wait for an old load also waits for younger ones on
// the same scoreboard); awaiting a step's registers before refilling the ring moves that wait
// ahead of the new loads (qwgmma.cu).
__device__ __forceinline__ void sink_word(uint32_t h) {
    __shared__ uint32_t s_sink;
    asm volatile("{ .reg .pred q; setp.eq.u32 q, %0, 0x9E3779B9; @q st.shared.u32 [%1], %0; }" ::"r"(h),
                 "r"((uint32_t)__cvta_generic_to_shared(&s_sink))
                 : "memory");
}
template <int RT, int BITS> __device__ __forceinline__ void await_frag(const Frag<RT, BITS>& f) {
    uint32_t h = 0;
#pragma unroll
    for (int rt = 0; rt < RT; rt++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
#pragma unroll
            for (int q = 0; q < BITS; q++) h ^= f.w[rt][e][q];
#pragma unroll
            for (int q = 0; q < Frag<RT, BITS>::NG; q++)
                h ^= __float_as_uint(f.s[rt][e][q]) ^ __float_as_uint(f.z[rt][e][q]);
        }
    sink_word(h);
}

// How a step's 32 codes of a lane are walked: SUBS sub-steps of PAIRS half-precision pairs each,
// whose activations are UNITS 16-byte units (8 activations each). A pair's two codes are what one
// mask of a word yields: (j, j + 4) of 8 codes for 4-bit words and for 8-bit word pairs (byte j
// of two words), (c, c + 8) of a 16-code word for 2-bit. The activations are paired the same way.
// 3-bit codes (a dense 96-bit stream) pair (j, j + 4) too, each pair cut from the stream with a
// funnel shift. 2-bit chunks may span two groups (hqq 2-bit's groups of 16: one per word,
// Frag::NG).
template <int BITS> struct Walk {
    static_assert(BITS == 2 || BITS == 3 || BITS == 4 || BITS == 8, "2-, 3-, 4- or 8-bit codes");
    static constexpr int SUBS = BITS == 2 ? 2 : 4;
    static constexpr int PAIRS = 16 / SUBS;
    static constexpr int UNITS = 4 / SUBS;
};

// Row offsets of lane row g (and g + 8) of each m16 tile of a warp whose first row is nw, into the
// codes and the (scale, zero) arrays; clamped: rows past N compute garbage that is never stored.
template <int RT>
__device__ __forceinline__ void lane_rows(int nw, int g, int N, int wpr, int groups, size_t (&crow)[RT][2],
                                          size_t (&srow)[RT][2]) {
#pragma unroll
    for (int rt = 0; rt < RT; rt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int n = min(nw + rt * 16 + h * 8 + g, N - 1);
            crow[rt][h] = (size_t)n * wpr;
            srow[rt][h] = (size_t)n * groups;
        }
}

// The BITS words of one chunk: 8 bytes (2-bit), 12 (3-bit: 4-byte aligned), 16 (4-bit) or 32
// (8-bit), streamed past L1.
template <int BITS>
__device__ __forceinline__ void load_words(uint32_t (&w)[BITS], const uint32_t* __restrict__ p) {
    if constexpr (BITS == 3) {
#pragma unroll
        for (int q = 0; q < 3; q++) w[q] = __ldcs(p + q);
    } else if constexpr (BITS == 2) {
        const uint2 v = __ldcs(reinterpret_cast<const uint2*>(p));
        w[0] = v.x;
        w[1] = v.y;
    } else {
#pragma unroll
        for (int q = 0; q < BITS / 4; q++) {
            const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p) + q);
            w[4 * q] = v.x;
            w[4 * q + 1] = v.y;
            w[4 * q + 2] = v.z;
            w[4 * q + 3] = v.w;
        }
    }
}

// Chunk c (32 codes, BITS words) of each of the lane's rows into f, with its group's scale and zero
// (gmagic: group_magic of the group size).
template <bool LUTK, int RT, int BITS>
__device__ __forceinline__ void load_chunk(Frag<RT, BITS>& f, const uint32_t* __restrict__ codes,
                                           const float* __restrict__ scales, const float* __restrict__ zeros,
                                           const size_t (&crow)[RT][2], const size_t (&srow)[RT][2], int c,
                                           uint32_t gmagic) {
    constexpr int NG = Frag<RT, BITS>::NG;
#pragma unroll
    for (int rt = 0; rt < RT; rt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            load_words<BITS>(f.w[rt][h], codes + crow[rt][h] + (size_t)c * BITS);
#pragma unroll
            for (int q = 0; q < NG; q++) {
                const int gi = (int)__umulhi((uint32_t)(c * 32 + q * (32 / NG)), gmagic);
                f.s[rt][h][q] = __ldg(scales + srow[rt][h] + gi);
                f.z[rt][h][q] = LUTK ? 0.f : __ldg(zeros + srow[rt][h] + gi);
            }
        }
}

// Whether q - zi goes through f32 (8-bit codes, bf16): see scale_pairs.
template <typename T, int BITS> __device__ __forceinline__ constexpr bool f32_codes() {
    return BITS == 8 && std::is_same<T, __nv_bfloat16>::value;
}

// The step's half-precision constants of each row: s2 = (s, s); affine codes also the zero's
// integer part inside the magic base and -(z - zi) s. Affine: w = (q - zi) * s - (z - zi) * s
// with zi the zero rounded to an integer, so q - zi is exact and only the fraction's product is a
// half-precision constant: rounding z * s whole (up to 8 ulps of s per weight, the same for a
// whole group) biased the sums.
// 8-bit codes with bf16 activations: 128 + q is not exact in bf16 past q = 127, so q - zi is
// formed in f32 (2^23 + q by magic, minus 2^23 + zi) and base holds that f32 constant.
template <typename T, bool LUTK, int RT, int BITS>
__device__ __forceinline__ void scale_pairs(const Frag<RT, BITS>& f, int q, uint32_t (&s2)[RT][2],
                                            uint32_t (&zs2)[RT][2], uint32_t (&base)[RT][2]) {
#pragma unroll
    for (int rt = 0; rt < RT; rt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const float sc = f.s[rt][h][q];
            s2[rt][h] = Half<T>::pack(sc, sc);
            base[rt][h] = Half<T>::MAGIC;
            if constexpr (!LUTK) {
                const float z = f.z[rt][h][q];
                // f32 codes: zi within the codes' range keeps |q - zi| <= 255, exact in bf16.
                const float zi = f32_codes<T, BITS>() ? fminf(fmaxf(rintf(z), 0.f), 255.f)
                                                      : fminf(fmaxf(rintf(z), -Half<T>::ZI_MAX), Half<T>::ZI_MAX);
                const float zs = -(z - zi) * sc;
                zs2[rt][h] = Half<T>::pack(zs, zs);
                base[rt][h] = f32_codes<T, BITS>() ? __float_as_uint(8388608.f + zi)
                                                   : Half<T>::pack(Half<T>::MAGIC_F + zi, Half<T>::MAGIC_F + zi);
            }
        }
}

// The unscaled pairs of sub-step i of one row's chunk (Walk<BITS>): table codes lut[q], affine
// codes q - zi exactly (base: see scale_pairs).
template <typename T, bool LUTK, int BITS>
__device__ __forceinline__ void decode_sub(const uint32_t (&w)[BITS], int i, uint32_t base, const uint32_t (&tlo)[4],
                                           const uint32_t (&thi)[4], uint32_t (&p)[Walk<BITS>::PAIRS]) {
    if constexpr (BITS == 4) {
        decode_word<T, LUTK>(w[i], base, tlo, thi, p);
    } else if constexpr (BITS == 3) {
        static_assert(!LUTK, "3-bit codes are affine");
#pragma unroll
        for (int j = 0; j < 4; j++) {
            // Codes a = 8i + j (bits 3a..) and a + 4 (12 bits up) into the low bits of v; then
            // a + 4 moves to bit 16: (v & 0x7007) + 15 (v & 0x7000).
            const int bit = 3 * (8 * i + j), q = bit >> 5;
            const uint32_t v = __funnelshift_r(w[q], q < 2 ? w[min(q + 1, 2)] : 0u, bit & 31);
            const uint32_t hi = v & 0x7000u;
            p[j] = Half<T>::sub(((v & 0x7007u) + 15u * hi) | Half<T>::MAGIC, base);
        }
    } else if constexpr (BITS == 2) {
        static_assert(!LUTK, "2-bit codes are affine");
#pragma unroll
        for (int c = 0; c < 8; c++) p[c] = Half<T>::sub(((w[i] >> (2 * c)) & 0x00030003u) | Half<T>::MAGIC, base);
    } else {
        static_assert(!LUTK, "8-bit codes are affine");
        const uint32_t wa = w[2 * i], wb = w[2 * i + 1];  // codes 8i + (0..3), 8i + (4..7)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            if constexpr (f32_codes<T, BITS>()) {
                const float zf = __uint_as_float(base);
                const float lo = __uint_as_float(prmt(wa, 0x4B000000u, 0x7540u | j)) - zf;
                const float hi = __uint_as_float(prmt(wb, 0x4B000000u, 0x7540u | j)) - zf;
                p[j] = Half<T>::pack(lo, hi);  // |q - zi| <= 255: exact
            } else {
                const uint32_t v = prmt(wa, wb, ((4u + j) << 8) | j);  // byte j of wa, of wb
                p[j] = Half<T>::sub((v & 0x00FF00FFu) | Half<T>::MAGIC, base);
            }
        }
    }
}

// Sub-step i of this lane's chunk, every row: the scaled pairs of every m16 tile.
template <typename T, bool LUTK, int RT, int BITS>
__device__ __forceinline__ void decode_step_sub(const Frag<RT, BITS>& f, int i, const uint32_t (&base)[RT][2],
                                                const uint32_t (&s2)[RT][2], const uint32_t (&zs2)[RT][2],
                                                const uint32_t (&tlo)[4], const uint32_t (&thi)[4],
                                                uint32_t (&p)[RT][2][Walk<BITS>::PAIRS]) {
#pragma unroll
    for (int rt = 0; rt < RT; rt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            decode_sub<T, LUTK, BITS>(f.w[rt][h], i, base[rt][h], tlo, thi, p[rt][h]);
#pragma unroll
            for (int j = 0; j < Walk<BITS>::PAIRS; j++)
                p[rt][h][j] = LUTK ? Half<T>::mul(p[rt][h][j], s2[rt][h]) : Half<T>::fma(p[rt][h][j], s2[rt][h], zs2[rt][h]);
        }
}

// A 16-byte unit of 8 activations paired as 4-bit codes are decoded, (j, j + 4): pair j is
// halves (j, j + 4) of the unit (the wgmma kernel's activation pass pairs them the same way).
__device__ __forceinline__ void pair_unit(const uint4& v, uint32_t (&xb)[4]) {
    xb[0] = prmt(v.x, v.z, 0x5410u);
    xb[1] = prmt(v.x, v.z, 0x7632u);
    xb[2] = prmt(v.y, v.w, 0x5410u);
    xb[3] = prmt(v.y, v.w, 0x7632u);
}

// The activations of one sub-step (v: UNITS 16-byte units as loaded), paired as the codes are
// (Walk).
template <int BITS>
__device__ __forceinline__ void pair_activations(const uint4 (&v)[Walk<BITS>::UNITS], uint32_t (&xb)[Walk<BITS>::PAIRS]) {
    if constexpr (Walk<BITS>::UNITS == 1) {  // (j, j + 4) of 8
        pair_unit(v[0], xb);
    } else {  // (c, c + 8) of 16
        const uint32_t a[4] = {v[0].x, v[0].y, v[0].z, v[0].w}, b[4] = {v[1].x, v[1].y, v[1].z, v[1].w};
#pragma unroll
        for (int q = 0; q < 4; q++) {
            xb[2 * q] = prmt(a[q], b[q], 0x5410u);
            xb[2 * q + 1] = prmt(a[q], b[q], 0x7632u);
        }
    }
}

// The activations of one sub-step of n8 tile nt (v: UNITS 16-byte units as loaded), paired as
// the codes are (Walk), times the decoded pairs of every row tile.
template <typename T, int RT, int MT, int BITS>
__device__ __forceinline__ void mma_sub(float (&acc)[RT][MT][4], int nt, const uint32_t (&p)[RT][2][Walk<BITS>::PAIRS],
                                        const uint4 (&v)[Walk<BITS>::UNITS]) {
    constexpr int PAIRS = Walk<BITS>::PAIRS;
    uint32_t xb[PAIRS];
    pair_activations<BITS>(v, xb);
#pragma unroll
    for (int j2 = 0; j2 < PAIRS / 2; j2++)
#pragma unroll
        for (int rt = 0; rt < RT; rt++)
            Half<T>::mma(acc[rt][nt], p[rt][0][2 * j2], p[rt][1][2 * j2], p[rt][0][2 * j2 + 1], p[rt][1][2 * j2 + 1],
                         xb[2 * j2], xb[2 * j2 + 1]);
}

// One K step's math for a lane: sub-step i's decoded pairs (2-bit chunks refresh the group
// constants per word; others come in with them) times the activation units fetch(nt, u) returns
// (u: the step's 16-byte unit), for every n8 tile. run and run_staged differ only in fetch.
template <typename T, bool LUTK, int RT, int MT, int BITS, typename Fetch>
__device__ __forceinline__ void step_mma(float (&acc)[RT][MT][4], const Frag<RT, BITS>& f, uint32_t (&s2)[RT][2],
                                         uint32_t (&zs2)[RT][2], uint32_t (&base)[RT][2], const uint32_t (&tlo)[4],
                                         const uint32_t (&thi)[4], Fetch fetch) {
    using W = Walk<BITS>;
    constexpr int NG = Frag<RT, BITS>::NG, PER_GROUP = W::SUBS / NG;
#pragma unroll
    for (int i = 0; i < W::SUBS; i++) {
        if constexpr (NG > 1)
            if (i % PER_GROUP == 0) scale_pairs<T, LUTK, RT, BITS>(f, i / PER_GROUP, s2, zs2, base);
        uint32_t p[RT][2][W::PAIRS];
        decode_step_sub<T, LUTK, RT, BITS>(f, i, base, s2, zs2, tlo, thi, p);
#pragma unroll
        for (int nt = 0; nt < MT; nt++) {
            uint4 v[W::UNITS];
#pragma unroll
            for (int u = 0; u < W::UNITS; u++) v[u] = fetch(nt, i * W::UNITS + u);
            mma_sub<T, RT, MT, BITS>(acc, nt, p, v);
        }
    }
}

// Folded scales (affine 4-bit codes in groups of a multiple of 128, so that one K step is one
// group for every lane): the mma multiplies the raw codes as the magic number leaves them,
// MAGIC + q (exact in bf16 and f16), and the step's sums are scaled once per output instead of
// each weight before the mma:
//   sum_k x_k (q_k - z) s = s (sum_k x_k (MAGIC + q_k) - (MAGIC + z) sum_k x_k),
// with sum_k x_k of each activation row from one more mma per k16 whose weight operand is all
// ones (its sums land in the lanes that hold those rows' outputs). The decode is one shift and
// one LOP3 per pair instead of four instructions; the step adds RT x MT x 8 FFMAs and MT x 8 mmas,
// which paid at one n8 tile (8 rows) in every block shape and at two only in c1 / c2 (qmma_tiled.rs
// `folds_in`). All in f32 after the mma: the offset MAGIC sum_k x_k
// cancels at the cost of ~log2(MAGIC / 8) bits of the f32 sums' 24 (bf16: 4, f16: 7), far below
// the bf16 operands' rounding; the zero is used whole (no integer part rounded, as scale_pairs
// needs), so no half-precision constant biases a group.
template <typename T> __device__ __forceinline__ constexpr uint32_t ones2() {
    return std::is_same<T, __nv_bfloat16>::value ? 0x3F803F80u : 0x3C003C00u;
}
template <typename T, int RT, int MT, typename Fetch>
__device__ __forceinline__ void step_mma_folded(float (&acc)[RT][MT][4], const Frag<RT, 4>& f, Fetch fetch) {
    // The step's activations paired once; then one row tile at a time, so that only one tile's
    // raw sums are live (two at once cost 32 registers: one block per SM instead of two).
    uint32_t xb[MT][4][4];
#pragma unroll
    for (int nt = 0; nt < MT; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const uint4 v[1] = {fetch(nt, i)};
            pair_activations<4>(v, xb[nt][i]);
        }
    float xs[MT][4];
    constexpr uint32_t ONE = ones2<T>();
#pragma unroll
    for (int rt = 0; rt < RT; rt++) {
        float raw[MT][4];
#pragma unroll
        for (int nt = 0; nt < MT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                raw[nt][e] = 0.f;
                if (rt == 0) xs[nt][e] = 0.f;
            }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            uint32_t p[2][4];
#pragma unroll
            for (int h = 0; h < 2; h++)
#pragma unroll
                for (int j = 0; j < 4; j++) p[h][j] = raw_pair<T>(f.w[rt][h][i], j);
#pragma unroll
            for (int nt = 0; nt < MT; nt++)
#pragma unroll
                for (int j2 = 0; j2 < 2; j2++) {
                    const uint32_t b0 = xb[nt][i][2 * j2], b1 = xb[nt][i][2 * j2 + 1];
                    Half<T>::mma(raw[nt], p[0][2 * j2], p[1][2 * j2], p[0][2 * j2 + 1], p[1][2 * j2 + 1], b0, b1);
                    if (rt == 0) Half<T>::mma(xs[nt], ONE, ONE, ONE, ONE, b0, b1);
                }
        }
        // Element e of a tile: output row g (e < 2) or g + 8 (h), activation row 2t + (e & 1).
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const float s = f.s[rt][h][0], mz = -(Half<T>::MAGIC_F + f.z[rt][h][0]);
#pragma unroll
            for (int nt = 0; nt < MT; nt++)
#pragma unroll
                for (int c = 0; c < 2; c++)
                    acc[rt][nt][2 * h + c] = fmaf(s, fmaf(mz, xs[nt][c], raw[nt][2 * h + c]), acc[rt][nt][2 * h + c]);
        }
    }
}

// A thread's place in a tiled launch (run and run_staged; qwgmma's segments): its lane (g, t), its
// warp's row group wr and K slice ws, the block's first output row nb and the warp's nw, the
// block's first activation row mb, the K steps [st0, st1) it sums, and with K split over blocks its
// split's index (its partial-sum slice), the tile's split count and the tile's counter.
struct Coords {
    int tid, lane, g, t, wr, ws, nb, nw, mb, splits, st0, st1, chunks, split, tile;
};
template <int RT, int WR, int MT>
__device__ __forceinline__ Coords coords_at(int bx, int mbi, int K, int st0, int st1, int split, int splits,
                                            int tile) {
    Coords p;
    p.tid = threadIdx.x;
    const int warp = p.tid >> 5;
    p.lane = p.tid & 31;
    p.g = p.lane >> 2;
    p.t = p.lane & 3;
    p.wr = warp % WR;
    p.ws = warp / WR;
    p.nb = bx * (WR * RT * 16);
    p.nw = p.nb + p.wr * RT * 16;
    p.mb = mbi * (8 * MT);
    p.splits = splits;
    p.st0 = st0;
    p.st1 = st1;
    p.chunks = K >> 5;
    p.split = split;
    p.tile = tile;
    return p;
}
// The tiled launch's grid: x row blocks (bx, shifted in a group), y K splits, z activation blocks.
template <int RT, int WR, int MT>
__device__ __forceinline__ Coords coords(int bx, int K, int steps_per_split) {
    const int st0 = blockIdx.y * steps_per_split;
    return coords_at<RT, WR, MT>(bx, blockIdx.z, K, st0, min((K + 127) / 128, st0 + steps_per_split), blockIdx.y,
                                 gridDim.y, blockIdx.z * gridDim.x + blockIdx.x);
}

// V consecutive outputs from f32 (V = 4: 4-aligned, one 8-byte store for 16-bit T).
template <typename T, int V>
__device__ __forceinline__ void store_outputs(T* __restrict__ out, const float (&v)[V]) {
    if constexpr (V == 4 && sizeof(T) == 2) {
        T h[4] = {from_f<T>(v[0]), from_f<T>(v[1]), from_f<T>(v[2]), from_f<T>(v[3])};
        *reinterpret_cast<uint2*>(out) = *reinterpret_cast<const uint2*>(h);
    } else {
#pragma unroll
        for (int e = 0; e < V; e++) out[e] = from_f<T>(v[e]);
    }
}

// The split-K tile's sum, by the tile's last block: y[m][n] = sum over splits, in split order, of
// the f32 partial sums. Each thread keeps U units of V consecutive outputs (one 16-byte load each
// when V = 4) for SU splits in flight at once: one 4-byte load per output and split, the splits
// one after the other, waited on L2 for each (the wgmma kernel's 4 splits, H100, session 20:
// 4096x14336 at 128 rows 79.4 -> 75.2 us), and the units alone, split after split, were slower
// again where a tile has few outputs per thread and many splits (lab, 1024x4096 at 33 rows in 8
// splits: 13.9 us before, 18.7 with the splits one after the other).
template <typename T, int V, int NT>
__device__ __forceinline__ void add_partials(const float* __restrict__ partial, T* __restrict__ y, int splits, int M,
                                             int N, int mb, int nb, int mrows, int ncols, int tid) {
    constexpr int U = 4, SU = 4;
    const int per_row = ncols / V, total = mrows * per_row;  // V = 4: N, nb and so ncols are multiples of 4
    for (int i0 = tid; i0 < total; i0 += U * NT) {
        size_t o[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int i = min(i0 + u * NT, total - 1);
            o[u] = (size_t)(mb + i / per_row) * N + nb + V * (i % per_row);
        }
        float v[U][V];
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int e = 0; e < V; e++) v[u][e] = 0.f;
        for (int sp0 = 0; sp0 < splits; sp0 += SU) {
            float p[SU][U][V];
#pragma unroll
            for (int s = 0; s < SU; s++)
#pragma unroll
                for (int u = 0; u < U; u++) {
                    const float* ps = partial + (size_t)min(sp0 + s, splits - 1) * M * N + o[u];
                    if constexpr (V == 4) {
                        const float4 q = __ldcg(reinterpret_cast<const float4*>(ps));
                        p[s][u][0] = q.x;
                        p[s][u][1] = q.y;
                        p[s][u][2] = q.z;
                        p[s][u][3] = q.w;
                    } else {
                        p[s][u][0] = __ldcg(ps);
                    }
                }
#pragma unroll
            for (int s = 0; s < SU; s++)
                if (sp0 + s < splits)
#pragma unroll
                    for (int u = 0; u < U; u++)
#pragma unroll
                        for (int e = 0; e < V; e++) v[u][e] += p[s][u][e];
        }
#pragma unroll
        for (int u = 0; u < U; u++)
            if (i0 + u * NT < total) store_outputs<T, V>(y + o[u], v[u]);
    }
}

// The barrier of the threads that compute (all of a block's, unless it has others: fp8_wgmma.cu).
struct BlockSync {
    __device__ __forceinline__ void operator()() const { __syncthreads(); }
};

// The block's epilogue: the K-slice warps' sums, the outputs (or the split's f32 partial sums),
// and with several splits the last block of the tile adding them in split order. All the threads
// that compute (threads 0 .. WR * WK * 32 - 1, meeting at Sync).
template <typename T, int MT, int RT, int WR, int WK, typename Sync = BlockSync, typename Red>
__device__ __forceinline__ void finish(float (&acc)[RT][MT][4], Red& s_red, bool& last, T* __restrict__ y,
                                       float* __restrict__ partial, unsigned* __restrict__ counters, int M, int N,
                                       const Coords& pos) {
    const Sync sync;
    constexpr int BROWS = WR * RT * 16;
    const int nb = pos.nb, nw = pos.nw, mb = pos.mb, wr = pos.wr, ws = pos.ws, g = pos.g, t = pos.t,
              tid = pos.tid, lane = pos.lane, splits = pos.splits;
    if constexpr (WK > 1) mma_pipeline::sum_k_slices<WK>(acc, s_red, wr, ws, lane);
    float* out32 = splits == 1 ? nullptr : partial + (size_t)pos.split * M * N;
    if (ws == 0)
        mma_pipeline::for_each_output(acc, nw, mb, g, t, [&](int n, int m, float v) {
            if (n < N && m < M) {
                if (splits == 1) y[(size_t)m * N + n] = from_f<T>(v);
                else __stcg(out32 + (size_t)m * N + n, v);
            }
        });
    if (splits == 1) return;
    // Split K: the last block of this tile adds the splits' partial sums, in split order.
    __threadfence();
    sync();
    unsigned* counter = counters + pos.tile;
    if (tid == 0) last = atomicAdd(counter, 1u) == (unsigned)(splits - 1);
    sync();
    if (!last) return;
    __threadfence();
    const int mrows = min(M - mb, 8 * MT), ncols = min(BROWS, N - nb);
    if ((N & 3) == 0 && ((uintptr_t)y & 7) == 0 && ((uintptr_t)partial & 15) == 0)
        add_partials<T, 4, WR * WK * 32>(partial, y, splits, M, N, mb, nb, mrows, ncols, tid);
    else
        add_partials<T, 1, WR * WK * 32>(partial, y, splits, M, N, mb, nb, mrows, ncols, tid);
    if (tid == 0) *counter = 0u;  // ready for the next launch on this stream
}

// The epilogue of a tile split over the blocks of one thread-block cluster (fp8_wgmma.cu), the
// blocks' cluster ranks its split numbers: each block puts its f32 sums (scaled) in its shared
// memory `tile` (8 MT activation rows of WR 16 outputs, rows padded by 4 floats: the fragments'
// stores hit 32 banks), and after the cluster's barrier, block r adds share r of the tile's
// outputs from every block's memory, in split order as add_partials does (the same sums, bit for
// bit, without the round trip through L2, the fence and the ticket). Requires N % 4 == 0 (FP8
// weights have multiples of 16 rows: fp8_gemm.rs `shape_unsupported`). Every thread of the
// cluster's blocks meets at its two barriers: the consumers here, the others (fp8_wgmma.cu's
// producer warpgroup) through `cluster_epilogue_barriers`.
template <typename T, int MT, int WR, typename Sync>
__device__ __forceinline__ void finish_in_cluster(float (&acc)[1][MT][4], float* tile, T* __restrict__ y, int M,
                                                  int N, const Coords& pos) {
    namespace cg = cooperative_groups;
    constexpr int COLS = WR * 16, PITCH = COLS + 4, NT = WR * 32;
    Sync()();  // every consumer is done with the shared memory the sums now take
    mma_pipeline::for_each_output(acc, pos.nw, pos.mb, pos.g, pos.t, [&](int n, int m, float v) {
        tile[(m - pos.mb) * PITCH + (n - pos.nb)] = v;
    });
    const cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    const int mrows = min(M - pos.mb, 8 * MT), ncols = min(COLS, N - pos.nb), total = mrows * (COLS / 4);
    for (int i = pos.split * NT + pos.tid; i < total; i += pos.splits * NT) {
        const int r = i / (COLS / 4), c = 4 * (i % (COLS / 4));
        if (c >= ncols) continue;  // (N % 4 == 0: a quad is all in or all out)
        float v[4] = {0.f, 0.f, 0.f, 0.f};
        for (int s = 0; s < pos.splits; s++) {
            const float4 p = *reinterpret_cast<const float4*>(cluster.map_shared_rank(tile + r * PITCH + c, s));
            v[0] += p.x;
            v[1] += p.y;
            v[2] += p.z;
            v[3] += p.w;
        }
        store_outputs<T, 4>(y + (size_t)(pos.mb + r) * N + pos.nb + c, v);
    }
    cluster.sync();  // no block leaves while another still reads its sums
}

// The two barriers of finish_in_cluster, for the threads of a block that do not compute.
__device__ __forceinline__ void cluster_epilogue_barriers() {
    namespace cg = cooperative_groups;
    const cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    cluster.sync();
}

// FOLD: step_mma_folded's scaling (4-bit affine codes, groups of a multiple of 128, K a multiple
// of 128: the caller checks).
template <typename T, int BITS, bool LUTK, int MT, int RT, int WR, int WK, int PF, bool FOLD = false>
__device__ __forceinline__ void run(const uint32_t* __restrict__ codes, const float* __restrict__ scales,
                                    const float* __restrict__ zeros, const float* __restrict__ lut, int wpr,
                                    int gsize, int groups, const T* __restrict__ x, T* __restrict__ y,
                                    float* __restrict__ partial, unsigned* __restrict__ counters, int M,
                                    int N, int K, int steps_per_split, int bx) {
    static_assert(WR * WK * 32 == THREADS, "8 warps per block");
    constexpr int NACC = RT * MT * 4;
    __shared__ float s_red[WK > 1 ? WR : 1][WK > 1 ? NACC : 1][WK > 1 ? 32 : 1];
    __shared__ bool last;
    const Coords pos = coords<RT, WR, MT>(bx, K, steps_per_split);
    const int g = pos.g, t = pos.t, ws = pos.ws, nw = pos.nw, mb = pos.mb, st0 = pos.st0, st1 = pos.st1,
              chunks = pos.chunks;

    uint32_t tlo[4] = {0, 0, 0, 0}, thi[4] = {0, 0, 0, 0};
    if constexpr (LUTK) table_bytes<T>(lut, tlo, thi);
    size_t crow[RT][2], srow[RT][2];
    lane_rows<RT>(nw, g, N, wpr, groups, crow, srow);
    const uint32_t gmagic = group_magic(gsize);
    auto load = [&](Frag<RT, BITS>& f, int st) {
        const int c = min(st * 4 + t, chunks - 1);  // past K: any chunk, its activations are 0
        load_chunk<LUTK, RT, BITS>(f, codes, scales, zeros, crow, srow, c, gmagic);
    };
    float acc[RT][MT][4];
    mma_pipeline::zero(acc);

    auto compute = [&](const Frag<RT, BITS>& f, int st) {
        const int k0 = st * 128 + t * 32;
        uint32_t s2[RT][2], zs2[RT][2], base[RT][2];
        // (Before the activation loads: after them, some shapes took up to 10 more registers.)
        if constexpr (Frag<RT, BITS>::NG == 1 && !FOLD) scale_pairs<T, LUTK, RT, BITS>(f, 0, s2, zs2, base);
        uint4 xv[MT][4];
#pragma unroll
        for (int nt = 0; nt < MT; nt++) {
            const int m = mb + nt * 8 + g;
            if constexpr (FOLD) {
                // K is a multiple of the step, and a row past M computes outputs nobody stores
                // (an activation row feeds only its own output column, its sum only its own):
                // the last row's activations stand in, no masked loads.
                const uint4* xp = reinterpret_cast<const uint4*>(x + (size_t)min(m, M - 1) * K + k0);
#pragma unroll
                for (int i = 0; i < 4; i++) xv[nt][i] = __ldg(xp + i);
            } else {
                const bool ok = k0 < K && m < M;
                const uint4* xp = reinterpret_cast<const uint4*>(x + (ok ? (size_t)m * K + k0 : 0));
#pragma unroll
                for (int i = 0; i < 4; i++) xv[nt][i] = ok ? __ldg(xp + i) : make_uint4(0, 0, 0, 0);
            }
        }
        if constexpr (FOLD) {
            static_assert(BITS == 4 && !LUTK, "folded scales: affine 4-bit codes");
            step_mma_folded<T, RT, MT>(acc, f, [&](int nt, int u) { return xv[nt][u]; });
        } else {
            step_mma<T, LUTK, RT, MT, BITS>(acc, f, s2, zs2, base, tlo, thi, [&](int nt, int u) { return xv[nt][u]; });
        }
    };

    Frag<RT, BITS> buf[PF + 1];
    mma_pipeline::stream_steps<PF>(buf, st0 + ws, WK, st1, load, compute);
    finish<T, MT, RT, WR, WK>(acc, s_red, last, y, partial, counters, M, N, pos);
}

// run with folded scales (the f4 kernels: qmma_tiled.rs `folds`).
template <typename T, int BITS, bool LUTK, int MT, int RT, int WR, int WK, int PF>
__device__ __forceinline__ void run_folded(const uint32_t* __restrict__ codes, const float* __restrict__ scales,
                                           const float* __restrict__ zeros, const float* __restrict__ lut, int wpr,
                                           int gsize, int groups, const T* __restrict__ x, T* __restrict__ y,
                                           float* __restrict__ partial, unsigned* __restrict__ counters, int M,
                                           int N, int K, int steps_per_split, int bx) {
    run<T, BITS, LUTK, MT, RT, WR, WK, PF, true>(codes, scales, zeros, lut, wpr, gsize, groups, x, y, partial,
                                                 counters, M, N, K, steps_per_split, bx);
}

}  // namespace qmmat

// ---- Staged activations (block shapes x1, x2: 33-128 activation rows) ----
// The same weight stream and math as run(), but the activations of each block step (WK warp
// steps of 128) come from shared memory: all 256 threads copy them there with cp.async, S steps
// ahead, into a ring of S slots, and the lanes read their fragments with conflict-free 16-byte
// loads (unit u of token row m at swizzle(u, m): the quarter-warp pattern g = 2q, 2q + 1 x
// t = 0..3 hits 8 distinct 16-byte bank groups). At 64 rows every lane of run() re-reads its
// 512 activation bytes per step through L1 (88 % busy in Nsight Compute); staged, the block reads
// them once. Lab sweep (session 16, H200): 64 rows 14336x4096 56.7 us against 68.0 (c2),
// 4096x14336 65.4 against 92.8 (c3), 4096x4096 32.6 against 35.4.
namespace qmmat {

__device__ __forceinline__ int swizzle(int u, int m) { return u ^ ((u >> 3) & 1) ^ ((m & 1) << 1); }

template <typename T, int BITS, bool LUTK, int MT, int RT, int WR, int WK, int PF, int S>
__device__ __forceinline__ void run_staged(const uint32_t* __restrict__ codes, const float* __restrict__ scales,
                                           const float* __restrict__ zeros, const float* __restrict__ lut,
                                           int wpr, int gsize, int groups, const T* __restrict__ x,
                                           T* __restrict__ y, float* __restrict__ partial,
                                           unsigned* __restrict__ counters, int M, int N, int K,
                                           int steps_per_split, int bx) {
    static_assert(WR * WK * 32 == THREADS, "8 warps per block");
    constexpr int NACC = RT * MT * 4;
    constexpr int MB = 8 * MT;      // activation rows per block
    constexpr int UR = WK * 16;     // 16-byte units per activation row of a slot
    constexpr int SLOT = MB * UR;   // units per slot
    extern __shared__ uint4 s_x[];  // [S][MB][UR]
    __shared__ float s_red[WK > 1 ? WR : 1][WK > 1 ? NACC : 1][WK > 1 ? 32 : 1];
    __shared__ bool last;
    const Coords pos = coords<RT, WR, MT>(bx, K, steps_per_split);
    const int tid = pos.tid, g = pos.g, t = pos.t, ws = pos.ws, nw = pos.nw, mb = pos.mb, st0 = pos.st0,
              st1 = pos.st1, chunks = pos.chunks;
    const int bsteps = (st1 - st0 + WK - 1) / WK;  // block steps

    uint32_t tlo[4] = {0, 0, 0, 0}, thi[4] = {0, 0, 0, 0};
    if constexpr (LUTK) table_bytes<T>(lut, tlo, thi);
    size_t crow[RT][2], srow[RT][2];
    lane_rows<RT>(nw, g, N, wpr, groups, crow, srow);
    const uint32_t gmagic = group_magic(gsize);
    // Block step bs of this warp: its K step st0 + bs WK + ws (clamped: past the split's end the
    // loads repeat a valid chunk and the step is not computed).
    auto load = [&](Frag<RT, BITS>& f, int bs) {
        const int st = min(st0 + bs * WK + ws, st1 - 1);
        const int c = min(st * 4 + t, chunks - 1);
        load_chunk<LUTK, RT, BITS>(f, codes, scales, zeros, crow, srow, c, gmagic);
    };
    // The activations of block step bs into its slot, zero past M, K and the split's end.
    auto stage = [&](int bs) {
        uint4* dst = s_x + (bs % S) * SLOT;
        const int k0 = (st0 + bs * WK) * 128;
        for (int i = tid; i < SLOT; i += THREADS) {
            const int m = i / UR, u = i % UR;
            const int k = k0 + u * 8;
            const bool ok = bs < bsteps && mb + m < M && k < K && k < st1 * 128;
            cp_async16(dst + m * UR + swizzle(u, m), ok ? x + (size_t)(mb + m) * K + k : x, ok);
        }
    };
    float acc[RT][MT][4];
    mma_pipeline::zero(acc);

    auto compute = [&](const Frag<RT, BITS>& f, int bs) {
        const uint4* src = s_x + (bs % S) * SLOT;
        uint32_t s2[RT][2], zs2[RT][2], base[RT][2];
        if constexpr (Frag<RT, BITS>::NG == 1) scale_pairs<T, LUTK, RT, BITS>(f, 0, s2, zs2, base);
        step_mma<T, LUTK, RT, MT, BITS>(acc, f, s2, zs2, base, tlo, thi, [&](int nt, int u) {
            const int m = nt * 8 + g;
            return src[m * UR + swizzle(ws * 16 + 4 * t + u, m)];
        });
    };

#pragma unroll
    for (int s = 0; s < S - 1; s++) {
        stage(s);
        cp_commit();
    }
    Frag<RT, BITS> buf[PF + 1];
#pragma unroll
    for (int u = 0; u <= PF; u++)
        if (u < bsteps) load(buf[u], u);
    for (int b0 = 0; b0 < bsteps; b0 += PF + 1) {
#pragma unroll
        for (int u = 0; u <= PF; u++) {
            const int bs = b0 + u;
            if (bs < bsteps) {
                cp_wait<S - 2>();
                __syncthreads();  // slot bs landed for every thread; slot bs - 1 is free
                stage(bs + S - 1);
                cp_commit();
                if (st0 + bs * WK + ws < st1) compute(buf[u], bs);
                if (bs + PF + 1 < bsteps) load(buf[u], bs + PF + 1);
            }
        }
    }
    cp_wait<0>();
    finish<T, MT, RT, WR, WK>(acc, s_red, last, y, partial, counters, M, N, pos);
}

}  // namespace qmmat
