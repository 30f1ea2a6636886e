// Multi-adapter LoRA over one batch in two launches (the role of Punica's SGMV/BGMV kernels):
//   shrink: h[row, j] = sum_k A_s[j, k] * x[row, k]                  (j < r_s, f32 h)
//   expand: out[row, o] = base[row, o] + scale_s * sum_j B_s[o, j] * h[row, j]
// where s is the adapter segment the row belongs to. Each launch covers the whole batch whatever
// the number of adapters: the host (src/cuda/sgmv.rs) cuts every segment into tiles of at most MT
// consecutive rows and uploads one table of tiles, each carrying its segment's A/B pointers, rank,
// dtype and scale (one dependent load before the weights: a separate segment table cost decode a
// second one per block); block x of both grids is tile x, so rows of one adapter share the weight
// loads (decode: one row per tile; prefill: MT rows per weight load). Ranks, weight dtypes
// (f32/bf16/f16) and rows without adapter (null pointers: the base output is copied) mix freely
// in one batch. Up to three modules sharing the batch run in one launch of each kernel (q/k/v,
// gate/up: ShrinkGroup, ExpandGroup), each module its own table, h and output.
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

// Mirrors src/cuda/sgmv.rs `push_tile` (little-endian, 40 bytes).
struct Tile {
    const void* a;  // [rank, K] row-major; null: rows without adapter
    const void* b;  // [N, rank] row-major
    int row0;
    int nrows;
    int rank;
    int flags;      // weight dtype | SHRINK_VEC | EXPAND_VEC
    float scale;
    int pad;
};

enum { W_F32 = 0, W_BF16 = 1, W_F16 = 2 };
constexpr int DTYPE_MASK = 0xff;
constexpr int SHRINK_VEC = 0x100;  // K % 8 == 0, A 16-byte aligned
constexpr int EXPAND_VEC = 0x200;  // rank % 8 == 0, B 16-byte aligned

// One warp: its K-slice's partial sums of h[row0 + m, j] for the tile's rows, reduced over the
// warp. Vectorized: the lane reads 8 consecutive k per 256-wide chunk, the warp takes every
// KSPLIT-th chunk, and issues every load of UNROLL chunks (A's and the tile's TR rows of x) before
// the math: A is streamed from memory once per tile, x rows are shared by the block's warps through
// L1. One-row tiles (decode) keep 4 chunks in flight, 8-row tiles one chunk's 8 rows of x (they
// waited on L1 one row after another: lab, H200, K 14336, 32 rows of one adapter, 26.2 -> 10.5 us).
// The slicing and the chunk order depend on K alone, so a row's sum is the same whatever else is in
// the batch, and whatever TR (the most rows a tile has) is.
template <typename T, typename W, int TR>
__device__ __forceinline__ void shrink_warp(const W* __restrict__ a, const T* __restrict__ x,
                                            int row0, int nrows, int j, int slice, int K, bool vec,
                                            float (&acc)[TR]) {
    const int lane = threadIdx.x & 31;
    const W* arow = a + (size_t)j * K;
    if (vec) {
        constexpr int UNROLL = TR == 1 ? 4 : 1;
        constexpr int STEP = 256 * KSPLIT;
        for (int k0 = slice * 256 + lane * 8; k0 < K; k0 += STEP * UNROLL) {
            Pack8<W> av[UNROLL];
            Pack8<T> xv[UNROLL][TR];
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                const int k = k0 + u * STEP;
                if (k < K) {
                    av[u] = ld_pack8<W>(arow + k);
#pragma unroll
                    for (int m = 0; m < TR; m++)
                        if (m < nrows) xv[u][m] = ld_pack8<T>(x + (size_t)(row0 + m) * K + k);
                }
            }
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                const int k = k0 + u * STEP;
                if (k >= K) break;
                float a8[8];
                unpack8<W>(av[u], a8);
#pragma unroll
                for (int m = 0; m < TR; m++) {
                    if (m < nrows) {
                        float x8[8];
                        unpack8<T>(xv[u][m], x8);
                        float s = 0.f;
#pragma unroll
                        for (int e = 0; e < 8; e++) s = fmaf(a8[e], x8[e], s);
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

// Block (tile, jb) of one module's shrink, jb < ceil(max rank / J_PER_BLOCK); block WARPS * 32:
// warp w takes rank index jb * J_PER_BLOCK + w / KSPLIT and K-slice w % KSPLIT; the slices' sums
// are added in a fixed order through shared memory. TR: the most rows a tile of the launch has
// (MT, or 1 for decode batches whose rows each have their own segment: 64 registers instead of
// the 8-row kernel's 114, four blocks per SM instead of two; lab, H100, 64 one-row adapters of rank
// 16: K 4096 9.9 -> 7.3 us, K 14336 21.4 -> 17.2; the same bits).
template <typename T, int TR>
__device__ __forceinline__ void shrink(const Tile* __restrict__ tiles, const T* __restrict__ x,
                                       float* __restrict__ h, int K, int R, int x_vec, int jb) {
    __shared__ float s_part[WARPS][TR];
    const Tile t = tiles[blockIdx.x];
    if (t.a == nullptr || jb * J_PER_BLOCK >= t.rank) return;  // the whole block leaves
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j = jb * J_PER_BLOCK + warp / KSPLIT;
    const int slice = warp % KSPLIT;
    float acc[TR];
#pragma unroll
    for (int m = 0; m < TR; m++) acc[m] = 0.f;
    if (j < t.rank) {
        const bool vec = x_vec && (t.flags & SHRINK_VEC);
        switch (t.flags & DTYPE_MASK) {
        case W_BF16:
            shrink_warp<T, __nv_bfloat16, TR>((const __nv_bfloat16*)t.a, x, t.row0, t.nrows, j,
                                              slice, K, vec, acc);
            break;
        case W_F16:
            shrink_warp<T, __half, TR>((const __half*)t.a, x, t.row0, t.nrows, j, slice, K, vec, acc);
            break;
        default:
            shrink_warp<T, float, TR>((const float*)t.a, x, t.row0, t.nrows, j, slice, K, vec, acc);
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
        const int jo = jb * J_PER_BLOCK + jj;
        if (jo < t.rank && m < t.nrows) {
            float v = 0.f;
#pragma unroll
            for (int sl = 0; sl < KSPLIT; sl++) v += s_part[jj * KSPLIT + sl][m];
            h[(size_t)(t.row0 + m) * R + jo] = v;
        }
    }
}

// The shrinks of up to three modules sharing x (q/k/v, gate/up: the same rows and tiles, each
// module its own table and h). Mirrors src/cuda/sgmv.rs `ShrinkGroup`. grid (tiles, sum of each
// module's ceil(R / J_PER_BLOCK)): module i owns the block rows [yb[i], yb[i + 1]). One launch
// instead of three on the decode step's side stream (lab, H200, 32 rows of rank-16 adapters,
// q/k/v: 16.6 -> 7.2 us).
struct ShrinkGroup {
    const Tile* tiles[3];
    float* h[3];
    int r[3];   // h's row stride (the module's largest rank)
    int yb[3];  // first block row of each module (yb[0] = 0)
    int count;
};

// Module i of a group launch for block row y, selected with constant indices (a run-time index
// into the parameters would copy them to local memory).
template <typename G> __device__ __forceinline__ int group_module(const G& g, int y) {
    return g.count > 2 && y >= g.yb[2] ? 2 : g.count > 1 && y >= g.yb[1] ? 1 : 0;
}
#define PICK(g, i, f) (i == 2 ? g.f[2] : i == 1 ? g.f[1] : g.f[0])

template <typename T, int TR>
__device__ __forceinline__ void shrink_group(const ShrinkGroup& g, const T* __restrict__ x, int K, int x_vec) {
    const int y = blockIdx.y;
    const int i = group_module(g, y);
    shrink<T, TR>(PICK(g, i, tiles), x, PICK(g, i, h), K, PICK(g, i, r), x_vec, y - PICK(g, i, yb));
}

// Block (tile, by) of one module's expand, by < ceil(N / EXPAND_THREADS); dynamic shared memory
// MT * R floats. One thread per output feature o: B's row o (rank values, contiguous) is read
// once per tile, h comes from shared memory (every thread reads the same word: a broadcast). The
// base values and B's first 16 ranks are loaded before h is staged, so the tile's three reads
// overlap instead of following one another (lab, H200, 32 rows of rank 16: gate/up 16.7 -> 11.5
// us). Every output element is written (rows without adapter get the base value).
template <typename T, typename W, int TR>
__device__ __forceinline__ void expand_tile(const Tile& t, const float* __restrict__ h, const T* __restrict__ base,
                                            T* __restrict__ out, int N, int R, int by) {
    extern __shared__ __align__(16) float s_h[];
    const int o = by * EXPAND_THREADS + threadIdx.x;
    const int r = t.rank;
    const W* brow = (const W*)t.b + (size_t)o * r;
    // The vector path reads h as float4 at m * r + j: r % 8 == 0 keeps those 16-byte aligned.
    const bool vec = (t.flags & EXPAND_VEC) != 0;
    constexpr int PRE = 2;  // 8-rank chunks of B loaded before the staging
    T bv[TR];
    Pack8<W> bpre[PRE];
    if (o < N) {
#pragma unroll
        for (int m = 0; m < TR; m++)
            if (m < t.nrows) bv[m] = base[(size_t)(t.row0 + m) * N + o];
        if (vec) {
#pragma unroll
            for (int c = 0; c < PRE; c++)
                if (8 * c < r) bpre[c] = ld_pack8<W>(brow + 8 * c);
        }
    }
    for (int i = threadIdx.x; i < t.nrows * r; i += EXPAND_THREADS) {
        const int m = i / r, j = i % r;
        s_h[m * r + j] = h[(size_t)(t.row0 + m) * R + j];
    }
    __syncthreads();
    if (o >= N) return;
    float acc[TR];
#pragma unroll
    for (int m = 0; m < TR; m++) acc[m] = 0.f;
    if (vec) {
        for (int j = 0; j < r; j += 8) {
            float b8[8];
            if (j < 8 * PRE) {
                Pack8<W> bp;
#pragma unroll
                for (int q = 0; q < (int)(sizeof(W) / 2); q++) bp.w[q] = j == 0 ? bpre[0].w[q] : bpre[1].w[q];
                unpack8<W>(bp, b8);
            } else {
                load8<W>(brow + j, b8);
            }
#pragma unroll
            for (int m = 0; m < TR; m++) {
                if (m < t.nrows) {
                    const float4 h0 = *reinterpret_cast<const float4*>(s_h + m * r + j);
                    const float4 h1 = *reinterpret_cast<const float4*>(s_h + m * r + j + 4);
                    float v = acc[m];
                    v = fmaf(b8[0], h0.x, v);
                    v = fmaf(b8[1], h0.y, v);
                    v = fmaf(b8[2], h0.z, v);
                    v = fmaf(b8[3], h0.w, v);
                    v = fmaf(b8[4], h1.x, v);
                    v = fmaf(b8[5], h1.y, v);
                    v = fmaf(b8[6], h1.z, v);
                    v = fmaf(b8[7], h1.w, v);
                    acc[m] = v;
                }
            }
        }
    } else {
        for (int j = 0; j < r; j++) {
            const float b1 = to_f<W>(brow[j]);
#pragma unroll
            for (int m = 0; m < TR; m++)
                if (m < t.nrows) acc[m] = fmaf(b1, s_h[m * r + j], acc[m]);
        }
    }
#pragma unroll
    for (int m = 0; m < TR; m++) {
        if (m < t.nrows) {
            const size_t i = (size_t)(t.row0 + m) * N + o;
            out[i] = from_f<T>(to_f<T>(bv[m]) + t.scale * acc[m]);
        }
    }
}

template <typename T, int TR>
__device__ __forceinline__ void expand(const Tile* __restrict__ tiles, const float* __restrict__ h,
                                       const T* __restrict__ base, T* __restrict__ out, int N, int R, int by) {
    const Tile t = tiles[blockIdx.x];
    if (t.b == nullptr) {
        const int o = by * EXPAND_THREADS + threadIdx.x;
        if (o < N)
            for (int m = 0; m < t.nrows; m++) {
                const size_t i = (size_t)(t.row0 + m) * N + o;
                out[i] = base[i];
            }
        return;
    }
    // The dtype is the tile's, so the whole block takes one branch (expand_tile synchronizes).
    switch (t.flags & DTYPE_MASK) {
    case W_BF16:
        expand_tile<T, __nv_bfloat16, TR>(t, h, base, out, N, R, by);
        break;
    case W_F16:
        expand_tile<T, __half, TR>(t, h, base, out, N, R, by);
        break;
    default:
        expand_tile<T, float, TR>(t, h, base, out, N, R, by);
    }
}

// The expands of up to three modules of one batch in one launch (q/k/v, gate/up: the same rows
// and tiles, each module its own table, h, base and output). Mirrors src/cuda/sgmv.rs
// `ExpandGroup`. grid (tiles, sum of each module's ceil(N / EXPAND_THREADS)), dynamic shared
// memory MT * (largest R) floats: module i owns the block rows [yb[i], yb[i + 1]).
struct ExpandGroup {
    const Tile* tiles[3];
    const float* h[3];
    const void* base[3];
    void* out[3];
    int n[3];
    int r[3];
    int yb[3];  // first block row of each module (yb[0] = 0)
    int count;
};

template <typename T, int TR>
__device__ __forceinline__ void expand_group(const ExpandGroup& g) {
    const int y = blockIdx.y;
    const int i = group_module(g, y);
    expand<T, TR>(PICK(g, i, tiles), PICK(g, i, h), (const T*)PICK(g, i, base), (T*)PICK(g, i, out), PICK(g, i, n),
              PICK(g, i, r), y - PICK(g, i, yb));
}
#undef PICK

#define SGMV(TNAME, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 2)                                    \
        sgmv_shrink_##TNAME(const ShrinkGroup g, const T* x, int K, int x_vec) {                   \
        shrink_group<T, MT>(g, x, K, x_vec);                                                       \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 4)                                    \
        sgmv_shrink1_##TNAME(const ShrinkGroup g, const T* x, int K, int x_vec) {                  \
        shrink_group<T, 1>(g, x, K, x_vec);                                                        \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(EXPAND_THREADS)                                   \
        sgmv_expand_##TNAME(const ExpandGroup g) {                                                 \
        expand_group<T, MT>(g);                                                                    \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(EXPAND_THREADS)                                   \
        sgmv_expand1_##TNAME(const ExpandGroup g) {                                                \
        expand_group<T, 1>(g);                                                                     \
    }

SGMV(f32, float)
SGMV(bf16, __nv_bfloat16)
SGMV(f16, __half)
