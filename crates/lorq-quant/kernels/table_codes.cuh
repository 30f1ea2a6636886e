// 4-bit table codes (NF4, FP4: w = lut[q] * s) decoded to half-precision pairs with byte permutes:
// the 16-entry table lives in 8 registers as bytes (the low byte of each entry's half-precision
// bits in tlo, the high byte in thi), and PRMT looks up four codes at a time, no shared memory.
// A word's 8 codes come out as the pairs (j, j + 4), j = 0..3: the order one mask of a word gives
// affine codes, so the tensor-core kernels (qmma_tiled.cuh, qwgmma.cu) pair their activations the
// same way for both kinds of code. (Per 8 weights 2 + 18 PRMT/LOP and 4 PRMT to pair: in a
// one-row half2 GEMV this decode measured slower than qgemv.cu's f32 lookups from shared memory,
// 23.5 against 17.7 us on 14336x4096, H200, session 28.)
#pragma once
#include "common.cuh"

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
    uint32_t r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
}

// The bits of v rounded to H (__half or __nv_bfloat16, as common.cuh's from_f rounds).
template <typename H> __device__ __forceinline__ uint16_t half_bits(float v) {
    const H h = from_f<H>(v);
    return *reinterpret_cast<const uint16_t*>(&h);
}

// The 16-entry table in H as bytes in registers (lookup4): entry e's low byte in byte e % 4 of
// tlo[e / 4], its high byte likewise in thi. tlo and thi start at zero.
template <typename H>
__device__ __forceinline__ void table_bytes(const float* __restrict__ lut, uint32_t (&tlo)[4], uint32_t (&thi)[4]) {
#pragma unroll
    for (int e = 0; e < 16; e++) {
        const uint32_t b = half_bits<H>(__ldg(lut + e));
        tlo[e >> 2] |= (b & 0xFFu) << (8 * (e & 3));
        thi[e >> 2] |= (b >> 8) << (8 * (e & 3));
    }
}

// Four table entries (half-precision bit patterns) for the four 4-bit codes in sel's low 16 bits,
// one per byte: low bytes from tlo, high bytes from thi (entry e in byte e%4 of register e/4).
__device__ __forceinline__ void lookup4(uint32_t sel, const uint32_t (&tlo)[4], const uint32_t (&thi)[4],
                                        uint32_t& lo, uint32_t& hi) {
    const uint32_t idx = sel & 0x7777u;                        // entry within its half-table
    const uint32_t pick = ((sel >> 1) & 0x4444u) | 0x3210u;    // byte i from the upper half-table?
    lo = prmt(prmt(tlo[0], tlo[1], idx), prmt(tlo[2], tlo[3], idx), pick);
    hi = prmt(prmt(thi[0], thi[1], idx), prmt(thi[2], thi[3], idx), pick);
}

// The 4 pairs (lut[code j], lut[code j + 4]), j = 0..3, of word w's 8 codes (code c at bits 4c),
// unscaled.
__device__ __forceinline__ void table_pairs(uint32_t w, const uint32_t (&tlo)[4], const uint32_t (&thi)[4],
                                            uint32_t (&p)[4]) {
    uint32_t lo, hi;
    lookup4(prmt(w, 0u, 0x4420u), tlo, thi, lo, hi);  // codes 0, 1, 4, 5
    p[0] = prmt(lo, hi, 0x6240u);                      // (0, 4)
    p[1] = prmt(lo, hi, 0x7351u);                      // (1, 5)
    lookup4(prmt(w, 0u, 0x4431u), tlo, thi, lo, hi);  // codes 2, 3, 6, 7
    p[2] = prmt(lo, hi, 0x6240u);
    p[3] = prmt(lo, hi, 0x7351u);
}
