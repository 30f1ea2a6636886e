// wgmma with A from registers (4 x b32: the m16n8k16 A fragment of each warp's 16 rows) and B
// from shared memory (a matrix descriptor), f32 accumulators d[N/8][4] (the m16n8 C fragment of
// each n8 tile), for the N (activation rows) qwgmma.cu launches; TY: "bf16" or "f16". sm_90a.
// The operand lists are written out (inline asm has no loops); the 128-wide one extends the 64-wide.
#pragma once
#include <cstdint>

namespace wgmma {

template <int N> struct Mma;

// Operand lists: the accumulators of n8 tile i, the register numbers of 32 accumulators.
#define WGMMA_D(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define WGMMA_D_N64 WGMMA_D(0), WGMMA_D(1), WGMMA_D(2), WGMMA_D(3), WGMMA_D(4), WGMMA_D(5), WGMMA_D(6), WGMMA_D(7)
#define WGMMA_D_N128                                                                                     \
    WGMMA_D_N64, WGMMA_D(8), WGMMA_D(9), WGMMA_D(10), WGMMA_D(11), WGMMA_D(12), WGMMA_D(13), WGMMA_D(14), \
        WGMMA_D(15)
#define WGMMA_R_N64                                                                                      \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                             \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define WGMMA_R_N128                                                                                     \
    WGMMA_R_N64 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "    \
                "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"

// One shape's function NAME: N8 n8 tiles, its accumulator registers R and operands D, then the A
// registers, the descriptor and the scale-d predicate (operands A, A+1, A+2, A+3, DESC, PRED).
#define WGMMA_FN(NAME, TY, SHAPE, N8, R, D, A, DESC, PRED)                                               \
    static __device__ __forceinline__ void NAME(float (&d)[N8][4], uint32_t a0, uint32_t a1, uint32_t a2, \
                                                uint32_t a3, uint64_t desc) {                            \
        asm volatile("{ .reg .pred p; setp.ne.b32 p, %" PRED ", 0;\n"                                   \
                     "wgmma.mma_async.sync.aligned." SHAPE ".f32." TY "." TY " "                         \
                     "{" R "}, {%" A "}, %" DESC ", p, 1, 1, 0; }\n"                                   \
                     : D                                                                                 \
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(1));                           \
    }
#define WGMMA_M64N64(NAME, TY) WGMMA_FN(NAME, TY, "m64n64k16", 8, WGMMA_R_N64, WGMMA_D_N64, "32, %33, %34, %35", "36", "37")
#define WGMMA_M64N128(NAME, TY) \
    WGMMA_FN(NAME, TY, "m64n128k16", 16, WGMMA_R_N128, WGMMA_D_N128, "64, %65, %66, %67", "68", "69")

template <> struct Mma<64> {
    WGMMA_M64N64(bf16, "bf16")
    WGMMA_M64N64(f16, "f16")
};
template <> struct Mma<128> {
    WGMMA_M64N128(bf16, "bf16")
    WGMMA_M64N128(f16, "f16")
};

}  // namespace wgmma
