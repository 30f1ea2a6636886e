// wgmma with A from registers (4 x b32: the m16n8k16 A fragment of each warp's 16 rows: qwgmma.cu's
// decoded weights) or, for e4m3, from shared memory as B is (a matrix descriptor),
// f32 accumulators d[N/8][4] (the m16n8 C fragment of each n8 tile), for the N (activation rows)
// qwgmma.cu and fp8_wgmma.cu launch; and what both kernels share around it: the fences, the bulk
// and tensor-map copies completing on mbarriers, the 128-byte-swizzle descriptor, and the
// stream-K segments of a launch's tiles. sm_90a. The operand lists are written out (inline asm has no
// loops); each wider one extends the narrower.
#pragma once
#include <cstdint>

namespace wgmma {

template <int N> struct Mma;

// Operand lists: the accumulators of n8 tile i, the register numbers of 32 accumulators.
#define WGMMA_D(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define WGMMA_D_N16 WGMMA_D(0), WGMMA_D(1)
#define WGMMA_D_N32 WGMMA_D_N16, WGMMA_D(2), WGMMA_D(3)
#define WGMMA_D_N64 WGMMA_D_N32, WGMMA_D(4), WGMMA_D(5), WGMMA_D(6), WGMMA_D(7)
#define WGMMA_D_N128                                                                                     \
    WGMMA_D_N64, WGMMA_D(8), WGMMA_D(9), WGMMA_D(10), WGMMA_D(11), WGMMA_D(12), WGMMA_D(13), WGMMA_D(14), \
        WGMMA_D(15)
#define WGMMA_R_N16 "%0, %1, %2, %3, %4, %5, %6, %7"
#define WGMMA_R_N32 WGMMA_R_N16 ", %8, %9, %10, %11, %12, %13, %14, %15"
#define WGMMA_R_N64 WGMMA_R_N32 ", %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define WGMMA_R_N128                                                                                     \
    WGMMA_R_N64 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "    \
                "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"

// One shape's function NAME: N8 n8 tiles, its accumulator registers R and operands D, then the A
// registers, the descriptor and the scale-d predicate (operands A, A+1, A+2, A+3, DESC, PRED);
// TAIL: the immediates after it (scales and B's transpose).
// `accumulate` false: d = A . B (the accumulators' old values ignored).
#define WGMMA_FN(NAME, TY, SHAPE, N8, R, D, A, DESC, PRED, TAIL)                                         \
    static __device__ __forceinline__ void NAME(float (&d)[N8][4], uint32_t a0, uint32_t a1, uint32_t a2, \
                                                uint32_t a3, uint64_t desc, bool accumulate = true) {    \
        asm volatile("{ .reg .pred p; setp.ne.b32 p, %" PRED ", 0;\n"                                   \
                     "wgmma.mma_async.sync.aligned." SHAPE ".f32." TY "." TY " "                         \
                     "{" R "}, {%" A "}, %" DESC ", p" TAIL "; }\n"                                    \
                     : D                                                                                 \
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"((int)accumulate));             \
    }
#define WGMMA_M64N64(NAME, TY) \
    WGMMA_FN(NAME, TY, "m64n64k16", 8, WGMMA_R_N64, WGMMA_D_N64, "32, %33, %34, %35", "36", "37", ", 1, 1, 0")
#define WGMMA_M64N128(NAME, TY) \
    WGMMA_FN(NAME, TY, "m64n128k16", 16, WGMMA_R_N128, WGMMA_D_N128, "64, %65, %66, %67", "68", "69", ", 1, 1, 0")
// e4m3 x e4m3, K 32, A from shared memory too (descriptor DA; DB, PRED follow it; 8-bit types
// take no transpose).
#define WGMMA_E4M3_SS(N, N8, DA, DB, PRED)                                                                 \
    static __device__ __forceinline__ void e4m3_ss(float (&d)[N8][4], uint64_t da, uint64_t db,          \
                                                   bool accumulate = true) {                              \
        asm volatile("{ .reg .pred p; setp.ne.b32 p, %" PRED ", 0;\n"                                    \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k32.f32.e4m3.e4m3 "                          \
                     "{" WGMMA_R_N##N "}, %" DA ", %" DB ", p, 1, 1; }\n"                                  \
                     : WGMMA_D_N##N                                                                        \
                     : "l"(da), "l"(db), "r"((int)accumulate));                                           \
    }

template <> struct Mma<16> {
    WGMMA_E4M3_SS(16, 2, "8", "9", "10")
};
template <> struct Mma<32> {
    WGMMA_E4M3_SS(32, 4, "16", "17", "18")
};
template <> struct Mma<64> {
    WGMMA_M64N64(bf16, "bf16")
    WGMMA_M64N64(f16, "f16")
    WGMMA_E4M3_SS(64, 8, "32", "33", "34")
};
template <> struct Mma<128> {
    WGMMA_M64N128(bf16, "bf16")
    WGMMA_M64N128(f16, "f16")
    WGMMA_E4M3_SS(128, 16, "64", "65", "66")
};

// `count` arrivals (besides the transaction bytes) complete a phase.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count = 1) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t phase) {
    asm volatile(
        "{\n .reg .pred p;\n WAIT: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra WAIT;\n}\n" ::"r"(bar),
        "r"(phase)
        : "memory");
}
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}
// A 2-d box of a tensor map (`map`: a __grid_constant__ kernel parameter) at element (x, y) into
// shared memory, completing on `bar`, with the L2 policy `policy` (createpolicy).
__device__ __forceinline__ void tensor_copy(uint32_t dst, const void* map, int x, int y, uint32_t bar,
                                            uint64_t policy) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
        " [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(bar), "l"(policy)
        : "memory");
}
// K-major, 128-byte swizzle: rows of 128 bytes, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t saddr) {
    return (uint64_t)((saddr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from touching the accumulators while a wgmma may be writing them.
template <int MT> __device__ __forceinline__ void pin(float (&acc)[MT][4]) {
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int b = 0; b < 4; b++) asm volatile("" : "+f"(acc[m][b])::"memory");
}
template <int A, int MT> __device__ __forceinline__ void pin(float (&acc)[A][MT][4]) {
#pragma unroll
    for (int a = 0; a < A; a++) pin(acc[a]);
}

// Which K steps a block sums: the tiles (128 output rows x BN activation rows, row blocks fastest)
// laid end to end, each `steps` K steps long, block b taking the `per_block` steps from
// b * per_block on (qwgmma.rs `schedule`: a whole number of tiles, or, where the tiles would leave
// SMs idle, an equal share for every SM). A tile cut by block boundaries is summed in segments,
// one per block, each the tile's split number (its blocks in order), added in that order by the
// last to finish (qmma_tiled.cuh `finish`).
struct Segment {
    int tile, st0, st1, split, splits;
};
__device__ __forceinline__ Segment segment_at(int cur, int end, int steps, int per_block) {
    Segment s;
    s.tile = cur / steps;
    s.st0 = cur - s.tile * steps;
    s.st1 = min(steps, s.st0 + (end - cur));
    const int first = s.tile * steps, b0 = first / per_block;
    s.split = (int)blockIdx.x - b0;
    s.splits = (first + steps - 1) / per_block - b0 + 1;
    return s;
}

}  // namespace wgmma
