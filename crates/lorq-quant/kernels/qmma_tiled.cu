// The tiled tensor-core kernels: the block shapes and the compiled instances of qmma_tiled.cuh.
#include "qmma_tiled.cuh"

// Block shapes (qmma_tiled.rs picks one by N and M; measured on an H100, docs/benchmarks.md):
//   c1: 1 row tile x 8 K-slice warps, 2 steps in flight (16 rows per block: M <= 8, or N < 8192
//       up to 16 rows, and N <= 4096 up to 32)
//   c2: 2 row tiles x 4 row warps x 2 K slices (128 rows: N >= 8192 past 8 rows)
//   c3: 1 row tile x 2 row warps x 4 K slices (32 rows: the rest)
//   c4: 2 row tiles x 2 row warps x 4 K slices (64 rows: affine codes, N >= 8192, up to 16 rows)
#define QMMAT_CFG_c1 1, 1, 8, 2
#define QMMAT_CFG_c2 2, 4, 2, 1
#define QMMAT_CFG_c3 1, 2, 4, 1
#define QMMAT_CFG_c4 2, 2, 4, 1
//   c5: 2 row tiles x 8 K-slice warps (32 rows: affine codes, N <= 4096, 9-32 rows, one weight)
#define QMMAT_CFG_c5 2, 1, 8, 1
// Staged activations (run_staged): RT, WR, WK, PF, S.
//   x1: 1 row tile x 8 row warps, 2 steps in flight, 3 activation slots (128 rows; 33-64
//       activation rows with 8 n8 tiles, 65-128 with 16: 64 accumulators a lane, 96 KiB of slots)
#define QMMAT_CFG_x1 1, 8, 1, 2, 3

// qmmat_*: one weight. Arguments: qgemv.cu's QARGS (DeviceLayout::push_args), then x, y, partial,
// counters, M, N, K, steps per split. BODY: run, or run_staged for the x* shapes (their dynamic
// shared memory: qmma_tiled.rs Shape::shared_bytes).
#define QMMAT(KN, BITS, LUTK, TN, T, MT, C, BODY)                                                        \
    extern "C" __global__ void __launch_bounds__(qmmat::THREADS)                                   \
        qmmat_##KN##_##TN##_t##MT##_##C(const uint32_t* codes, const float* scales,                \
                                        const float* zeros, const float* lut, int wpr, int gsize,  \
                                        int groups, int /* round_mode: f32 only */,                \
                                        const T* __restrict__ x, T* __restrict__ y,                \
                                        float* partial, unsigned* counters, int M, int N, int K,   \
                                        int steps_per_split) {                                     \
        qmmat::BODY<T, BITS, LUTK, MT, QMMAT_CFG_##C>(codes, scales, zeros, lut, wpr, gsize, groups, x, y, \
                                                partial, counters, M, N, K, steps_per_split,      \
                                                blockIdx.x);                                       \
    }
// qmmatg_*: 2 or 3 weights sharing x (q/k/v, gate/up): the same arguments, then the group's other
// weights (common.cuh QGroup); never split K. A separate kernel because the three inlined bodies
// cost the single-weight shapes registers (up to 138 against 106: a lost block per SM).
#define QMMATG(KN, BITS, LUTK, TN, T, MT, C, BODY)                                                       \
    extern "C" __global__ void __launch_bounds__(qmmat::THREADS)                                   \
        qmmatg_##KN##_##TN##_t##MT##_##C(const uint32_t* codes, const float* scales,               \
                                         const float* zeros, const float* lut, int wpr, int gsize, \
                                         int groups, int /* round_mode */,                         \
                                         const T* __restrict__ x, T* __restrict__ y,               \
                                         float* partial, unsigned* counters, int M, int N, int K,  \
                                         int steps_per_split, const QGroup g) {                    \
        const int bx = blockIdx.x;                                                                 \
        if (bx < g.b1) {                                                                           \
            qmmat::BODY<T, BITS, LUTK, MT, QMMAT_CFG_##C>(codes, scales, zeros, lut, wpr, gsize, groups, \
                                                    x, y, partial, counters, M, N, K,              \
                                                    steps_per_split, bx);                          \
        } else if (bx < g.b2) {                                                                    \
            qmmat::BODY<T, BITS, LUTK, MT, QMMAT_CFG_##C>(g.codes[0], g.scales[0], g.zeros[0], lut, wpr, \
                                                    gsize, groups, x, static_cast<T*>(g.y[0]),     \
                                                    partial, counters, M, g.n[0], K,               \
                                                    steps_per_split, bx - g.b1);                   \
        } else {                                                                                   \
            qmmat::BODY<T, BITS, LUTK, MT, QMMAT_CFG_##C>(g.codes[1], g.scales[1], g.zeros[1], lut, wpr, \
                                                    gsize, groups, x, static_cast<T*>(g.y[1]),     \
                                                    partial, counters, M, g.n[1], K,               \
                                                    steps_per_split, bx - g.b2);                   \
        }                                                                                          \
    }
#define QMMAT_BOTH(KN, BITS, LUTK, TN, T, MT, C) \
    QMMAT(KN, BITS, LUTK, TN, T, MT, C, run) QMMATG(KN, BITS, LUTK, TN, T, MT, C, run)
#define QMMATX(KN, BITS, LUTK, TN, T, MT, C) \
    QMMAT(KN, BITS, LUTK, TN, T, MT, C, run_staged) QMMATG(KN, BITS, LUTK, TN, T, MT, C, run_staged)
// The (shape, n8 tiles) pairs qmma_tiled.rs `shape` picks: c4 and c5 for one weight only, c2 up
// to 32 rows (64-row launches of 4096+ rows stage their activations, x1).
#define QMMAT_ALL(KN, BITS, LUTK, TN, T)                                                           \
    QMMAT_BOTH(KN, BITS, LUTK, TN, T, 1, c1) QMMAT_BOTH(KN, BITS, LUTK, TN, T, 2, c1)              \
    QMMAT_BOTH(KN, BITS, LUTK, TN, T, 4, c1) QMMAT_BOTH(KN, BITS, LUTK, TN, T, 2, c2)              \
    QMMAT_BOTH(KN, BITS, LUTK, TN, T, 4, c2) QMMAT_BOTH(KN, BITS, LUTK, TN, T, 4, c3)              \
    QMMAT_BOTH(KN, BITS, LUTK, TN, T, 8, c3) QMMAT(KN, BITS, LUTK, TN, T, 1, c4, run)              \
    QMMAT(KN, BITS, LUTK, TN, T, 2, c4, run) QMMAT(KN, BITS, LUTK, TN, T, 2, c5, run)              \
    QMMAT(KN, BITS, LUTK, TN, T, 4, c5, run) QMMATX(KN, BITS, LUTK, TN, T, 8, x1)                  \
    QMMATX(KN, BITS, LUTK, TN, T, 16, x1)
// f4: affine 4-bit codes with folded scales (qmma_tiled.cuh step_mma_folded; qmma_tiled.rs `folds`):
// every shape `shape` picks for one n8 tile, and for two the 16-row blocks of c1 and the grouped
// 128-row blocks of c2 (c4 and c5 measured slower there: they need more than 128 registers).
#define QMMAT_FOLDED(TN, T)                                                                        \
    QMMAT(f4, 4, false, TN, T, 1, c1, run_folded) QMMATG(f4, 4, false, TN, T, 1, c1, run_folded)   \
    QMMAT(f4, 4, false, TN, T, 2, c1, run_folded) QMMATG(f4, 4, false, TN, T, 2, c1, run_folded)   \
    QMMATG(f4, 4, false, TN, T, 2, c2, run_folded) QMMAT(f4, 4, false, TN, T, 1, c4, run_folded)
QMMAT_FOLDED(bf16, __nv_bfloat16)
QMMAT_FOLDED(f16, __half)
QMMAT_ALL(a4, 4, false, bf16, __nv_bfloat16)
QMMAT_ALL(a4, 4, false, f16, __half)
QMMAT_ALL(t4, 4, true, bf16, __nv_bfloat16)
QMMAT_ALL(t4, 4, true, f16, __half)
QMMAT_ALL(a8, 8, false, bf16, __nv_bfloat16)
QMMAT_ALL(a8, 8, false, f16, __half)
QMMAT_ALL(a2, 2, false, bf16, __nv_bfloat16)
QMMAT_ALL(a2, 2, false, f16, __half)
QMMAT_ALL(a3, 3, false, bf16, __nv_bfloat16)
QMMAT_ALL(a3, 3, false, f16, __half)
