// Multi-adapter LoRA over one batch in two launches (the role of Punica's SGMV/BGMV kernels):
//   shrink: h[row, j] = sum_k A_s[j, k] * x[row, k]                  (j < r_s, f32 h)
//   expand: out[row, o] = base[row, o] + scale_s * sum_j B_s[o, j] * h[row, j]
// where s is the adapter segment the row belongs to. Each launch covers the whole batch whatever
// the number of adapters: the host (src/cuda/sgmv.rs) cuts every segment into tiles of at most MT
// consecutive rows and uploads one table of segments (A/B pointers, rank, dtype, scale) and tiles;
// block x of both grids is tile x, so rows of one adapter share the weight loads (decode: one
// row per tile; prefill: MT rows per weight load). Ranks, weight dtypes (f32/bf16/f16) and rows
// without adapter (segment -1: the base output is copied) mix freely in one batch.
//
// Accumulation is f32 and h stays f32 (the CPU path and PEFT's float32 LoRA compute); the output
// is rounded once. No atomics and no batch-dependent split: a row's result is the same bits
// whatever else is in the batch.
#include "common.cuh"

constexpr int MT = 8;     // rows per tile (src/cuda/sgmv.rs ROWS_PER_TILE)
constexpr int WARPS = 8;  // shrink: warps per block
constexpr int KSPLIT = 4; // shrink: warps (K-slices) per rank index
constexpr int J_PER_BLOCK = WARPS / KSPLIT;  // shrink: rank indices per block (src/cuda/sgmv.rs)
constexpr int EXPAND_THREADS = 256;  // expand: one thread per output feature

// Mirrors src/cuda/sgmv.rs `push_segment` / `push_tile` (little-endian, 32 and 16 bytes).
struct Seg {
    const void* a;  // [rank, K] row-major
    const void* b;  // [N, rank] row-major
    int rank;
    int flags;      // weight dtype | SHRINK_VEC | EXPAND_VEC
    float scale;
    int pad;
};
struct Tile {
    int seg;  // -1: rows without adapter
    int row0;
    int nrows;
    int pad;
};

enum { W_F32 = 0, W_BF16 = 1, W_F16 = 2 };
constexpr int DTYPE_MASK = 0xff;
constexpr int SHRINK_VEC = 0x100;  // K % 8 == 0, A 16-byte aligned
constexpr int EXPAND_VEC = 0x200;  // rank % 8 == 0, B 16-byte aligned

// One warp: its K-slice's partial sums of h[row0 + m, j] for the tile's rows, reduced over the
// warp. Vectorized: the lane reads 8 consecutive k per 256-wide chunk, the warp takes every
// KSPLIT-th chunk, UNROLL chunks of A in flight (A is streamed from memory once per tile; x rows
// are shared by the block's warps through L1). The slicing depends on K alone, so a row's sum is
// the same whatever else is in the batch, and whatever TR (the most rows a tile has) is.
template <typename T, typename W, int TR>
__device__ __forceinline__ void shrink_warp(const W* __restrict__ a, const T* __restrict__ x,
                                            int row0, int nrows, int j, int slice, int K, bool vec,
                                            float (&acc)[TR]) {
    const int lane = threadIdx.x & 31;
    const W* arow = a + (size_t)j * K;
    if (vec) {
        constexpr int UNROLL = 4;
        constexpr int STEP = 256 * KSPLIT;
        for (int k0 = slice * 256 + lane * 8; k0 < K; k0 += STEP * UNROLL) {
            float av[UNROLL][8];
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                const int k = k0 + u * STEP;
                if (k < K) load8<W>(arow + k, av[u]);
            }
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                const int k = k0 + u * STEP;
                if (k >= K) break;
#pragma unroll
                for (int m = 0; m < TR; m++) {
                    if (m < nrows) {
                        float xv[8];
                        load8<T>(x + (size_t)(row0 + m) * K + k, xv);
                        float s = 0.f;
#pragma unroll
                        for (int e = 0; e < 8; e++) s = fmaf(av[u][e], xv[e], s);
                        acc[m] += s;
                    }
                }
            }
        }
    } else {
        for (int k = slice * 32 + lane; k < K; k += 32 * KSPLIT) {
            const float av = to_f<W>(arow[k]);
#pragma unroll
            for (int m = 0; m < TR; m++)
                if (m < nrows) acc[m] = fmaf(av, to_f<T>(x[(size_t)(row0 + m) * K + k]), acc[m]);
        }
    }
#pragma unroll
    for (int m = 0; m < TR; m++)
        acc[m] = warp_sum(acc[m]);
}

// grid (tiles, ceil(max rank / J_PER_BLOCK)), block WARPS * 32: warp w takes rank index
// blockIdx.y * J_PER_BLOCK + w / KSPLIT and K-slice w % KSPLIT; the slices' sums are added in a
// fixed order through shared memory. TR: the most rows a tile of the launch has (MT, or 1 for
// decode batches whose rows each have their own segment: 64 registers instead of 98, four blocks
// per SM instead of two; lab, H100, 64 one-row adapters of rank 16: K 4096 9.9 -> 7.3 us, K 14336
// 21.4 -> 17.2; the same bits).
template <typename T, int TR>
__device__ __forceinline__ void shrink(const Seg* __restrict__ segs, const Tile* __restrict__ tiles,
                                       const T* __restrict__ x, float* __restrict__ h, int K, int R,
                                       int x_vec) {
    __shared__ float s_part[WARPS][TR];
    const Tile t = tiles[blockIdx.x];
    if (t.seg < 0) return;  // the whole block leaves
    const Seg s = segs[t.seg];
    if (blockIdx.y * J_PER_BLOCK >= s.rank) return;  // the whole block leaves
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j = blockIdx.y * J_PER_BLOCK + warp / KSPLIT;
    const int slice = warp % KSPLIT;
    float acc[TR];
#pragma unroll
    for (int m = 0; m < TR; m++) acc[m] = 0.f;
    if (j < s.rank) {
        const bool vec = x_vec && (s.flags & SHRINK_VEC);
        switch (s.flags & DTYPE_MASK) {
        case W_BF16:
            shrink_warp<T, __nv_bfloat16, TR>((const __nv_bfloat16*)s.a, x, t.row0, t.nrows, j,
                                              slice, K, vec, acc);
            break;
        case W_F16:
            shrink_warp<T, __half, TR>((const __half*)s.a, x, t.row0, t.nrows, j, slice, K, vec, acc);
            break;
        default:
            shrink_warp<T, float, TR>((const float*)s.a, x, t.row0, t.nrows, j, slice, K, vec, acc);
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int m = 0; m < TR; m++) s_part[warp][m] = acc[m];
    }
    __syncthreads();
    const int tid = threadIdx.x;
    if (tid < J_PER_BLOCK * TR) {
        const int jj = tid / TR, m = tid % TR;
        const int jo = blockIdx.y * J_PER_BLOCK + jj;
        if (jo < s.rank && m < t.nrows) {
            float v = 0.f;
#pragma unroll
            for (int sl = 0; sl < KSPLIT; sl++) v += s_part[jj * KSPLIT + sl][m];
            h[(size_t)(t.row0 + m) * R + jo] = v;
        }
    }
}

// One thread: output feature o for the tile's rows; B's row o (rank values, contiguous) is read
// once per tile, h comes from shared memory (every thread reads the same word: a broadcast).
template <typename T, typename W>
__device__ __forceinline__ void expand_thread(const W* __restrict__ b, float scale,
                                              const float* s_h, const T* __restrict__ base,
                                              T* __restrict__ out, int row0, int nrows, int o,
                                              int N, int r, bool vec) {
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; m++) acc[m] = 0.f;
    const W* brow = b + (size_t)o * r;
    if (vec) {
        for (int j = 0; j < r; j += 8) {
            float bv[8];
            load8<W>(brow + j, bv);
#pragma unroll
            for (int m = 0; m < MT; m++) {
                if (m < nrows) {
                    const float4 h0 = *reinterpret_cast<const float4*>(s_h + m * r + j);
                    const float4 h1 = *reinterpret_cast<const float4*>(s_h + m * r + j + 4);
                    float v = acc[m];
                    v = fmaf(bv[0], h0.x, v);
                    v = fmaf(bv[1], h0.y, v);
                    v = fmaf(bv[2], h0.z, v);
                    v = fmaf(bv[3], h0.w, v);
                    v = fmaf(bv[4], h1.x, v);
                    v = fmaf(bv[5], h1.y, v);
                    v = fmaf(bv[6], h1.z, v);
                    v = fmaf(bv[7], h1.w, v);
                    acc[m] = v;
                }
            }
        }
    } else {
        for (int j = 0; j < r; j++) {
            const float bv = to_f<W>(brow[j]);
#pragma unroll
            for (int m = 0; m < MT; m++)
                if (m < nrows) acc[m] = fmaf(bv, s_h[m * r + j], acc[m]);
        }
    }
#pragma unroll
    for (int m = 0; m < MT; m++) {
        if (m < nrows) {
            const size_t i = (size_t)(row0 + m) * N + o;
            out[i] = from_f<T>(to_f<T>(base[i]) + scale * acc[m]);
        }
    }
}

// Block (tile, by) of one module's expand, by < ceil(N / EXPAND_THREADS); dynamic shared memory
// MT * R floats. Every output element is written (rows without adapter get the base value).
template <typename T>
__device__ __forceinline__ void expand(const Seg* __restrict__ segs, const Tile* __restrict__ tiles,
                                       const float* __restrict__ h, const T* __restrict__ base,
                                       T* __restrict__ out, int N, int R, int by) {
    extern __shared__ __align__(16) float s_h[];
    const Tile t = tiles[blockIdx.x];
    const int o = by * EXPAND_THREADS + threadIdx.x;
    if (t.seg < 0) {
        if (o < N)
            for (int m = 0; m < t.nrows; m++) {
                const size_t i = (size_t)(t.row0 + m) * N + o;
                out[i] = base[i];
            }
        return;
    }
    const Seg s = segs[t.seg];
    const int r = s.rank;
    for (int i = threadIdx.x; i < t.nrows * r; i += EXPAND_THREADS) {
        const int m = i / r, j = i % r;
        s_h[m * r + j] = h[(size_t)(t.row0 + m) * R + j];
    }
    __syncthreads();
    if (o >= N) return;
    // The vector path reads h as float4 at m * r + j: r % 8 == 0 keeps those 16-byte aligned.
    const bool vec = (s.flags & EXPAND_VEC) != 0;
    switch (s.flags & DTYPE_MASK) {
    case W_BF16:
        expand_thread<T, __nv_bfloat16>((const __nv_bfloat16*)s.b, s.scale, s_h, base, out, t.row0,
                                        t.nrows, o, N, r, vec);
        break;
    case W_F16:
        expand_thread<T, __half>((const __half*)s.b, s.scale, s_h, base, out, t.row0, t.nrows, o, N,
                                 r, vec);
        break;
    default:
        expand_thread<T, float>((const float*)s.b, s.scale, s_h, base, out, t.row0, t.nrows, o, N,
                                r, vec);
    }
}

// The expands of up to three modules of one batch in one launch (q/k/v, gate/up: the same rows
// and tiles, each module its own table, h, base and output). Mirrors src/cuda/sgmv.rs
// `ExpandGroup`. grid (tiles, sum of each module's ceil(N / EXPAND_THREADS)), dynamic shared
// memory MT * (largest R) floats: module i owns the block rows [yb[i], yb[i + 1]).
struct ExpandGroup {
    const Seg* segs[3];
    const Tile* tiles[3];
    const float* h[3];
    const void* base[3];
    void* out[3];
    int n[3];
    int r[3];
    int yb[3];  // first block row of each module (yb[0] = 0)
    int count;
};

template <typename T>
__device__ __forceinline__ void expand_group(const ExpandGroup& g) {
    // Module i's arguments, selected with constant indices (a run-time index into the
    // parameters would copy them to local memory), then one inlined body.
    const int y = blockIdx.y;
    const int i = g.count > 2 && y >= g.yb[2] ? 2 : g.count > 1 && y >= g.yb[1] ? 1 : 0;
#define PICK(f) (i == 2 ? g.f[2] : i == 1 ? g.f[1] : g.f[0])
    expand<T>(PICK(segs), PICK(tiles), PICK(h), (const T*)PICK(base), (T*)PICK(out), PICK(n), PICK(r),
              y - PICK(yb));
#undef PICK
}

#define SGMV(TNAME, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 2)                                       \
        sgmv_shrink_##TNAME(const Seg* segs, const Tile* tiles, const T* x, float* h, int K,       \
                            int R, int x_vec) {                                                    \
        shrink<T, MT>(segs, tiles, x, h, K, R, x_vec);                                             \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 4)                                    \
        sgmv_shrink1_##TNAME(const Seg* segs, const Tile* tiles, const T* x, float* h, int K,      \
                             int R, int x_vec) {                                                   \
        shrink<T, 1>(segs, tiles, x, h, K, R, x_vec);                                              \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(EXPAND_THREADS)                                   \
        sgmv_expand_##TNAME(const ExpandGroup g) {                                                 \
        expand_group<T>(g);                                                                        \
    }

SGMV(f32, float)
SGMV(bf16, __nv_bfloat16)
SGMV(f16, __half)
