// The packed weight every kernel of qgemv.cu and qgemv_half2.cu reads (layout: qgemv.cu's header;
// crates/lorq-quant/src/gpu_layout.rs builds it), its kernel arguments, and the dispatch of a
// grouped launch (QGroup, common.cuh).
#pragma once
#include "common.cuh"

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

constexpr int WARPS = 8;  // warps per GEMV block

#define QARGS                                                                                      \
    const uint32_t *codes, const float *scales, const float *zeros, const float *lut, int wpr,    \
        int gsize, int groups, int round_mode
#define QPARAMS {codes, scales, zeros, lut, wpr, gsize, groups, round_mode}

// The weight of block bx of a QGroup launch (common.cuh): call(params, y, N, block index within
// that weight), in each branch with that weight's pointers straight from the kernel parameters.
// bx is blockIdx.x, or a block of the launch's grid that a persistent block takes in turn.
template <typename T, typename F>
__device__ __forceinline__ void qgroup_dispatch_at(int bx, const QParams& p, T* y, int N, const QGroup& g, F&& call) {
    if (bx < g.b1) {
        call(p, y, N, bx);
    } else if (bx < g.b2) {
        const QParams q = {g.codes[0], g.scales[0], g.zeros[0], p.lut, p.wpr, p.gsize, p.groups, p.round_mode};
        call(q, static_cast<T*>(g.y[0]), g.n[0], bx - g.b1);
    } else {
        const QParams q = {g.codes[1], g.scales[1], g.zeros[1], p.lut, p.wpr, p.gsize, p.groups, p.round_mode};
        call(q, static_cast<T*>(g.y[1]), g.n[1], bx - g.b2);
    }
}
template <typename T, typename F>
__device__ __forceinline__ void qgroup_dispatch(const QParams& p, T* y, int N, const QGroup& g, F&& call) {
    qgroup_dispatch_at(blockIdx.x, p, y, N, g, static_cast<F&&>(call));
}
