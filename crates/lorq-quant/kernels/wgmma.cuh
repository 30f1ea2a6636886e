// wgmma with A from registers (4 x b32: the m16n8k16 A fragment of each warp's 16 rows) and B
// from shared memory (a matrix descriptor), f32 accumulators d[N/8][4] (the m16n8 C fragment of
// each n8 tile), for the N (activation rows) qwgmma.cu launches; TY: "bf16" or "f16". sm_90a.
// The operand lists are written out (inline asm has no loops).
#pragma once
#include <cstdint>

namespace wgmma {

template <int N> struct Mma;

#define WGMMA_M64N64(NAME, TY)                                                                           \
    static __device__ __forceinline__ void NAME(float (&d)[8][4], uint32_t a0, uint32_t a1, uint32_t a2, \
                                                uint32_t a3, uint64_t desc) {                            \
        asm volatile(                                                                                    \
            "{ .reg .pred p; setp.ne.b32 p, %37, 0;\n"                                                   \
            "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " "                                  \
            "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                    \
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "          \
            "{%32, %33, %34, %35}, %36, p, 1, 1, 0; }\n"                                                 \
            : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),                                \
              "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),                                \
              "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),                                \
              "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),                                \
              "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),                                \
              "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),                                \
              "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),                                \
              "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])                                 \
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(1));                                    \
    }
template <> struct Mma<64> {
    WGMMA_M64N64(bf16, "bf16")
    WGMMA_M64N64(f16, "f16")
};

#define WGMMA_M64N128(NAME, TY)                                                                           \
    static __device__ __forceinline__ void NAME(float (&d)[16][4], uint32_t a0, uint32_t a1, uint32_t a2, \
                                                uint32_t a3, uint64_t desc) {                             \
        asm volatile(                                                                                     \
            "{ .reg .pred p; setp.ne.b32 p, %69, 0;\n"                                                    \
            "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " "                                  \
            "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                     \
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "            \
            "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "            \
            "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "           \
            "{%64, %65, %66, %67}, %68, p, 1, 1, 0; }\n"                                                  \
            : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),                                 \
              "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),                                 \
              "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),                                 \
              "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),                                 \
              "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),                                 \
              "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),                                 \
              "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),                                 \
              "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),                                 \
              "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),                                 \
              "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),                                 \
              "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),                             \
              "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),                             \
              "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),                             \
              "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),                             \
              "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),                             \
              "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])                              \
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(1));                                     \
    }
template <> struct Mma<128> {
    WGMMA_M64N128(bf16, "bf16")
    WGMMA_M64N128(f16, "f16")
};

}  // namespace wgmma
