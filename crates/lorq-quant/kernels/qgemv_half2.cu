// One or two bf16/f16 activation rows (MR) through affine 4-bit codes in groups of a multiple of
// 32 (hqq / GPTQ / AWQ 4-bit; the packed layout of qgemv.cu), two weights per f16 instruction.
// Batch-1 decode spends most of its time here; at f32 math the kernel is issue-bound (Nsight Compute:
// 5-6 instructions per weight, DRAM 40 % busy), so halving the instructions moves it towards the
// bandwidth.
//
// A nibble masked in place is an f16 subnormal: bits 0-3 of a half are q * 2^-24 exactly, bits
// 4-7 q * 2^-20. So one AND gives two weights (one per half of the word) and one HFMA2 multiplies
// them by a matching activation pair (x0, x4), (x1, x5), ... that carries the 2^24 / 2^20 back:
// per 8 weights one shift, four ANDs and four HFMA2. Zeros by the group identity
// s (sum x q - z sum x), as qgemv.cu.
//
// The block first stores its activation row once in shared memory as those f16 pairs, each chunk
// of 32 scaled by a power of two so that no product (<= 15 * 2^-9) or 16-term f16 sum can overflow
// whatever the activations' range; then per chunk the factor back to x units and the chunk's f32
// sum of x. A chunk's f16 sum is scaled back and folded in f32 per group; rounding ~2e-3
// relative, about a bf16 output's own.
//
// Dynamic shared memory, per activation row (half2_stage_words apart): for chunk c, word j: uint4
// at [j * chunks + c] (lanes read consecutive chunks: 16-byte loads without bank conflicts), then
// a float2 per chunk: 72 bytes per chunk and row (crates/lorq-quant/src/cuda/qgemv.rs sizes it).
//
// Two rows (MR = 2: batch-2 decode) share each decoded pair: per 8 weights one shift, four ANDs
// and eight HFMA2, where the tiled tensor-core kernel pays its whole decode for an 8-row tile
// (docs/benchmarks.md, session 30).
//
// NF4 / FP4 (table codes) stay on qgemv.cu: a per-lane 256-entry table of f16 pairs in shared
// memory (32 KiB, one lookup per byte) measured slower there (docs/benchmarks.md, session 13).
#include "qparams.cuh"
#include "rms_norm.cuh"

__device__ __forceinline__ __half2 as_half2(uint32_t v) { return *reinterpret_cast<__half2*>(&v); }
__device__ __forceinline__ uint32_t as_u32(__half2 v) { return *reinterpret_cast<uint32_t*>(&v); }

// SHARED: x is in shared memory (the norm head's output), read with plain loads.
template <typename T, bool SHARED = false>
__device__ __forceinline__ void stage_x_half2(const T* __restrict__ x, int K, uint4* s_xh) {
    const int chunks = K >> 5;
    float2* s_cs = reinterpret_cast<float2*>(s_xh + 4 * chunks);
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        // The packed values stay in registers and are widened twice: half the registers of
        // holding 32 floats, which the weight loads issued before the staging need.
        Pack8<T> xr[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const T* xp = x + ((size_t)c << 5) + 8 * j;
            if constexpr (SHARED) {
#pragma unroll
                for (int i = 0; i < (int)(sizeof(T) / 2); i++) xr[j].w[i] = reinterpret_cast<const uint4*>(xp)[i];
            } else {
                xr[j] = ld_pack8<T>(xp);
            }
        }
        float mx = 0.f, sum = 0.f;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float v[8];
            unpack8<T>(xr[j], v);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                mx = fmaxf(mx, fabsf(v[e]));
                sum += v[e];
            }
        }
        // |x| < 2^E; clamped so every factor stays a normal float: a chunk below 2^-40 keeps only
        // its largest terms, activations of 2^100 and more become inf (NaN and inf propagate).
        const int E = min(max((int)((__float_as_uint(mx) >> 23) & 0xff) - 126, -40), 100);
        const auto pow2 = [](int e) { return __uint_as_float((uint32_t)(127 + e) << 23); };
        const float a = pow2(15 - E), b = pow2(11 - E);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float v[8];
            unpack8<T>(xr[j], v);
            s_xh[j * chunks + c] = make_uint4(as_u32(__floats2half2_rn(v[0] * a, v[4] * a)),
                                              as_u32(__floats2half2_rn(v[1] * b, v[5] * b)),
                                              as_u32(__floats2half2_rn(v[2] * a, v[6] * a)),
                                              as_u32(__floats2half2_rn(v[3] * b, v[7] * b)));
        }
        s_cs[c] = make_float2(pow2(9 + E), sum);
    }
}

// 16-byte words of the staged activations (72 bytes per chunk, rounded up): a norm head's x'
// follows them in the kernel's dynamic shared memory (crates/lorq-quant/src/cuda/qgemv.rs).
__device__ __forceinline__ int half2_stage_words(int chunks) { return (72 * chunks + 15) / 16; }

// Launch shapes: RPW = 4 rows per warp, SPLIT = 2 or 4 warps per row group (K-slices), as
// qgemv.cu's r4s2 / r4s4; a lane streams whole chunks. With SPLIT = 4 a 4096-input weight gives
// each lane one chunk, so nothing overlaps a lane's loads but the x staging; 2 slices (two chunks
// a lane, half the blocks and so half the blocks' stagings) are faster wherever they still give
// about 2,048 warps (lab, H200, session 28, with the bookkeeping below: 14336x4096 12.8 -> 11.3 us,
// the 28672-row gate+up 22.0 -> 18.4, q+k+v 7.6 -> 6.7, 4096x4096 6.0 -> 5.6, 4096x14336 12.3 ->
// 12.3; 1024x4096 keeps 4 slices). GATED (the MLP's gate and up sharing x): the warp's rows are 2
// rows of gate (p) and the same rows of up (p2), its output SiLU(gate) * up rounded as the two
// GEMVs followed by fused_ops.cu's silu_mul round it.
constexpr int RPW = 4;

// A warp's rows, once: each row's offset into the codes (16-byte units) and into the scales and
// zeros, and the group magic (common.cuh). Per chunk a load is then one 32-bit add and one wide
// multiply-add, not 64-bit row arithmetic and an integer division (the hosts check that the
// offsets fit: qgemv.rs half2_fits).
struct Half2Rows {
    uint32_t code[RPW], group[RPW];
    uint32_t gmagic;
    __device__ __forceinline__ Half2Rows(const QParams& p, int out, int n0, int N) {
#pragma unroll
        for (int r = 0; r < RPW; r++) {
            const uint32_t n = (uint32_t)min(n0 + r % out, N - 1);  // rows past N: garbage, never stored
            code[r] = n * (uint32_t)(p.wpr >> 2);
            group[r] = n * (uint32_t)p.groups;
        }
        gmagic = group_magic(p.gsize);
    }
};

// One lane's chunk c of its RPW rows: the 16-byte codes, scale and zero of each.
template <bool GATED>
struct Half2Chunk {
    uint4 wv[RPW];
    float s[RPW], z[RPW];
    __device__ __forceinline__ void load(const QParams& p, const QParams& p2, const Half2Rows& rows, int c) {
        constexpr int OUT = GATED ? RPW / 2 : RPW;
        const uint32_t g = __umulhi((uint32_t)c << 5, rows.gmagic);
#pragma unroll
        for (int r = 0; r < RPW; r++) {
            const QParams& q = GATED && r >= OUT ? p2 : p;
            wv[r] = __ldcs(reinterpret_cast<const uint4*>(q.codes) + (rows.code[r] + (uint32_t)c));
            s[r] = __ldg(q.scales + (rows.group[r] + g));
            z[r] = __ldg(q.zeros + (rows.group[r] + g));
        }
    }
    // acc[a][r] += row r's chunk . chunk c of activation row a (staged, `words` apart).
    template <int MR>
    __device__ __forceinline__ void dot(const uint4* s_xh, int words, int chunks, int c,
                                        float (&acc)[MR][RPW]) const {
        __half2 d[MR][RPW];
#pragma unroll
        for (int a = 0; a < MR; a++)
#pragma unroll
            for (int r = 0; r < RPW; r++) d[a][r] = __float2half2_rn(0.f);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            uint4 xp[MR];
#pragma unroll
            for (int a = 0; a < MR; a++) xp[a] = s_xh[a * words + j * chunks + c];
#pragma unroll
            for (int r = 0; r < RPW; r++) {
                const uint32_t w = j == 0 ? wv[r].x : j == 1 ? wv[r].y : j == 2 ? wv[r].z : wv[r].w;
                const uint32_t h = w >> 8;
                const __half2 q0 = as_half2(w & 0x000F000Fu), q1 = as_half2(w & 0x00F000F0u),
                              q2 = as_half2(h & 0x000F000Fu), q3 = as_half2(h & 0x00F000F0u);
#pragma unroll
                for (int a = 0; a < MR; a++) {
                    d[a][r] = __hfma2(q0, as_half2(xp[a].x), d[a][r]);
                    d[a][r] = __hfma2(q1, as_half2(xp[a].y), d[a][r]);
                    d[a][r] = __hfma2(q2, as_half2(xp[a].z), d[a][r]);
                    d[a][r] = __hfma2(q3, as_half2(xp[a].w), d[a][r]);
                }
            }
        }
#pragma unroll
        for (int a = 0; a < MR; a++) {
            const float2 cs = reinterpret_cast<const float2*>(s_xh + a * words + 4 * chunks)[c];
#pragma unroll
            for (int r = 0; r < RPW; r++) {
                const float2 f = __half22float2(d[a][r]);
                acc[a][r] = fmaf(s[r], fmaf(-z[r], cs.y, (f.x + f.y) * cs.x), acc[a][r]);
            }
        }
    }
};

// The residual add + RMSNorm whose output is the GEMV's x (decode at batch 1: the norm before
// q/k/v and the one before gate/up), run by every block of the GEMV before its product instead of
// in a launch of its own: s = x + d, x' = RMSNorm(s) * w, hidden = K. Block 0 stores s (the
// residual stream); x' stays in the block's shared memory. Same code and block size as
// add_rms_norm_vec_* launched alone, so x' is bit for bit that launch's output.
struct NormHead {
    const void* x;
    const void* d;
    const void* w;
    void* s;
    float eps;
};

// Every block of a launch with a norm head: the norm into shared memory (s_y, after the staging
// words), then x' staged from it. Outside the grouped dispatch, as the plain kernel stages x.
template <typename T>
__device__ __forceinline__ void norm_head_stage(const NormHead& nh, int K, uint4* s_xh) {
    T* s_y = reinterpret_cast<T*>(s_xh + half2_stage_words(K >> 5));
    add_rms_norm_vec<T, false>(static_cast<const T*>(nh.x), static_cast<const T*>(nh.d),
                               static_cast<const T*>(nh.w), blockIdx.x == 0 ? static_cast<T*>(nh.s) : nullptr,
                               s_y, nullptr, nullptr, K, nh.eps, 0);
    __syncthreads();
    stage_x_half2<T, true>(s_y, K, s_xh);
    __syncthreads();
}

// The rows of grid block bx; the lanes loop over their chunks. stage() (all threads, the block's
// x into s_xh and a barrier; a no-op where x is already there) runs after each lane's first loads
// are issued (plain kernels), so the weights' latency overlaps the staging (lab, H200, session
// 28: 14336x4096 at 2 slices 12.8 us with the loads after the staging, 11.3 before). PERSIST:
// the launch's blocks take the grid's blocks in turn (the norm-head kernels: the norm once per
// block), so the block waits before its next turn rewrites s_part. MR activation rows, staged
// half2_stage_words apart; y holds their outputs N apart, and the first `live_rows` are stored.
template <typename T, int SPLIT, bool GATED, bool PERSIST, int MR = 1, typename Stage>
__device__ __forceinline__ void qgemv_half2(const QParams p, const uint4* s_xh, T* __restrict__ y, int N,
                                            int K, int bx, Stage&& stage, const QParams p2 = QParams{},
                                            int live_rows = 1) {
    static_assert(WARPS % SPLIT == 0, "a block holds whole row groups");
    static_assert(MR == 1 || !GATED, "the gate/up kernel takes one activation row");
    constexpr int OUT = GATED ? RPW / 2 : RPW;  // output rows per warp
    __shared__ float s_part[WARPS][MR][RPW];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int chunks = K >> 5;
    const int gw = bx * WARPS + warp;
    const int n0 = (gw / SPLIT) * OUT, slice = gw % SPLIT;
    const int c0 = slice * 32 + lane;
    const bool live = n0 < N && c0 < chunks;
    const Half2Rows rows(p, OUT, n0, N);
    // The persistent kernels stage before their turns and load in the loop only: their first
    // loads held across the turns' dispatch took 122 registers against 64.
    Half2Chunk<GATED> ch;
    if (!PERSIST && live) ch.load(p, p2, rows, c0);
    stage();
    const int words = half2_stage_words(chunks);
    float acc[MR][RPW];
#pragma unroll
    for (int a = 0; a < MR; a++)
#pragma unroll
        for (int r = 0; r < RPW; r++) acc[a][r] = 0.f;
    if (live) {
        for (int c = c0; c < chunks; c += 32 * SPLIT) {
            if (PERSIST || c != c0) ch.load(p, p2, rows, c);
            ch.template dot<MR>(s_xh, words, chunks, c, acc);
        }
    }
#pragma unroll
    for (int a = 0; a < MR; a++)
#pragma unroll
        for (int r = 0; r < RPW; r++) acc[a][r] = warp_sum(acc[a][r]);
    if (lane == 0) {
#pragma unroll
        for (int a = 0; a < MR; a++)
#pragma unroll
            for (int r = 0; r < RPW; r++) s_part[warp][a][r] = acc[a][r];
    }
    __syncthreads();
    constexpr int GROUPS = WARPS / SPLIT;
    if (tid < GROUPS * OUT * MR) {
        const int a = tid / (GROUPS * OUT), grp = tid % (GROUPS * OUT) / OUT, r = tid % OUT;
        const int n = ((bx * WARPS + grp * SPLIT) / SPLIT) * OUT + r;
        float v = 0.f, u = 0.f;
#pragma unroll
        for (int sidx = 0; sidx < SPLIT; sidx++) {
            v += s_part[grp * SPLIT + sidx][a][r];
            if (GATED) u += s_part[grp * SPLIT + sidx][a][r + OUT];
        }
        if (n < N && a < live_rows)
            y[(size_t)a * N + n] = GATED ? silu_mul_rounded<T>(to_f(from_f<T>(v)), to_f(from_f<T>(u))) : from_f<T>(v);
    }
    if constexpr (PERSIST) __syncthreads();  // s_part is read before the block's next turn writes it
}

// The block's x staged, for qgemv_half2's stage() in the plain kernels: MR rows from x (the
// block's first), each its own staging; rows past the live ones restage the last live row (their
// sums are not stored). The norm-head kernels run the norm and stage x' once per block before
// their turns (no stage() then: holding a lane's first loads across the norm took 128-196
// registers).
#define HALF2_STAGE_ROWS(T, MR, live)                                                              \
    [&] {                                                                                          \
        for (int a = 0; a < MR; a++)                                                               \
            stage_x_half2<T>(x + (size_t)min(a, (live) - 1) * K, K, s_xh + a * half2_stage_words(K >> 5)); \
        __syncthreads();                                                                           \
    }

// qgemv_a4h_<dtype>_m<MR>_r4_s<S>: qgemv.cu's signature, MR activation rows per grid row
// (blockIdx.y), 72 bytes of dynamic shared memory per chunk of 32 inputs and activation row.
#define QGEMV_HALF2(TN, T, S, MR)                                                                  \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                       \
        qgemv_a4h_##TN##_m##MR##_r4_s##S(QARGS, const T* __restrict__ x, T* __restrict__ y, int M,  \
                                         int N, int K, const QGroup g) {                           \
        extern __shared__ uint4 s_xh[];                                                            \
        const int m0 = blockIdx.y * MR, live = min(MR, M - m0);                                    \
        x += (size_t)m0 * K;                                                                       \
        qgroup_dispatch(QParams QPARAMS, y, N, g, [&](const QParams& p, T* yw, int n, int b) {    \
            qgemv_half2<T, S, false, false, MR>(p, s_xh, yw + (size_t)m0 * n, n, K, b,            \
                                                HALF2_STAGE_ROWS(T, MR, live), QParams{}, live);   \
        });                                                                                        \
    }
// qgemv_a4h_norm_<dtype>_m1_r4_s<S>: the same with the norm head (x = RMSNorm(nh.x + nh.d) *
// nh.w, K up to what one block's norm holds, rms_norm.cuh), persistent blocks taking the `blocks`
// of the plain kernel's grid in turn (the norm once per block); dynamic shared memory: the staging
// words, then K values of T.
#define QGEMV_HALF2_NORM(TN, T, S)                                                                 \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                       \
        qgemv_a4h_norm_##TN##_m1_r4_s##S(QARGS, T* __restrict__ y, int N, int K, const QGroup g,   \
                                         const NormHead nh, int blocks) {                          \
        extern __shared__ uint4 s_xh[];                                                            \
        norm_head_stage<T>(nh, K, s_xh);                                                           \
        _Pragma("unroll 1") for (int bx = blockIdx.x; bx < blocks; bx += gridDim.x) {              \
            qgroup_dispatch_at(bx, QParams QPARAMS, y, N, g, [&](const QParams& p, T* yw, int n, int b) { \
                qgemv_half2<T, S, false, true>(p, s_xh, yw, n, K, b, [] {});                       \
            });                                                                                    \
        }                                                                                          \
    }

// qgemv_a4h_silu_<dtype>_m1_r4_s<S>: y = SiLU(x . gateᵀ) * (x . upᵀ), gate (QARGS) and up [N, K]
// of the same format; each warp 2 rows of each (registers as 4 rows of one weight): one launch for
// the MLP's two projections and its activation at batch 1.
#define QGEMV_HALF2_SILU(TN, T, S)                                                                 \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                       \
        qgemv_a4h_silu_##TN##_m1_r4_s##S(QARGS, const uint32_t* up_codes, const float* up_scales,  \
                                         const float* up_zeros, const T* __restrict__ x,           \
                                         T* __restrict__ y, int N, int K) {                        \
        extern __shared__ uint4 s_xh[];                                                            \
        const QParams p = QPARAMS;                                                                 \
        const QParams up = {up_codes, up_scales, up_zeros, lut, wpr, gsize, groups, round_mode};   \
        qgemv_half2<T, S, true, false>(p, s_xh, y, N, K, blockIdx.x, HALF2_STAGE_ROWS(T, 1, 1), up); \
    }
// qgemv_a4h_silu_norm_<dtype>_m1_r4_s<S>: the same with the norm head (as qgemv_a4h_norm_*).
#define QGEMV_HALF2_SILU_NORM(TN, T, S)                                                            \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                       \
        qgemv_a4h_silu_norm_##TN##_m1_r4_s##S(QARGS, const uint32_t* up_codes,                     \
                                              const float* up_scales, const float* up_zeros,       \
                                              T* __restrict__ y, int N, int K, const NormHead nh,  \
                                              int blocks) {                                        \
        extern __shared__ uint4 s_xh[];                                                            \
        const QParams p = QPARAMS;                                                                 \
        const QParams up = {up_codes, up_scales, up_zeros, lut, wpr, gsize, groups, round_mode};   \
        norm_head_stage<T>(nh, K, s_xh);                                                           \
        _Pragma("unroll 1") for (int bx = blockIdx.x; bx < blocks; bx += gridDim.x)                \
            qgemv_half2<T, S, true, true>(p, s_xh, y, N, K, bx, [] {}, up);                        \
    }
#define QGEMV_HALF2_ALL(TN, T, S)                                                                  \
    QGEMV_HALF2(TN, T, S, 1) QGEMV_HALF2(TN, T, S, 2) QGEMV_HALF2_NORM(TN, T, S)                   \
        QGEMV_HALF2_SILU(TN, T, S) QGEMV_HALF2_SILU_NORM(TN, T, S)
QGEMV_HALF2_ALL(bf16, __nv_bfloat16, 2)
QGEMV_HALF2_ALL(bf16, __nv_bfloat16, 4)
QGEMV_HALF2_ALL(f16, __half, 2)
QGEMV_HALF2_ALL(f16, __half, 4)
