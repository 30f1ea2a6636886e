// fp8mm_*: y[M, N] = (xq[M, K] . Wq[N, K]^T) * sx[m] * sw[n] on FP8 tensor cores (mma.sync
// m16n8k32, e4m3 x e4m3, f32 accumulation), the W8A8 path of src/cuda/fp8_gemm.rs for few rows,
// where cuBLASLt's FP8 kernels are tuned for compute rather than for streaming the weight.
//
// - Both operands are the row-major e4m3 codes as stored (W as checkpointed, xq as
//   fp8_act.cu writes it): no repacking, the weight buffer is the one cuBLASLt reads.
// - The weight is the mma's A operand (16 output rows x 32 k), the activations its B operand
//   (32 k x 8 activation rows). K order inside an mma is free as long as A and B agree: per
//   128-wide K step, lane (g, t) loads the 32-byte chunk t of its rows g and g + 8 (two 16-byte
//   loads each, streamed PF steps ahead of the math) and of its activation row g; mma j of the step
//   takes words 2j and 2j + 1 of every chunk as the fragment's k and k + 16 halves.
// - Block: WR x WK warps. Warp (wr, ws) owns RT m16 row tiles and the K steps ws, ws + WK, ... of
//   K; the WK warps of a row group add their sums in shared memory in a fixed order, then scale.
//   Splitting K over blocks as well was measured slower on every Llama-3-8B shape at 16-256 rows.
// - Requires K % 32 == 0 (16-byte aligned rows; a chunk never straddles the end of K).
#include "common.cuh"
#include "mma_pipeline.cuh"

namespace fp8mm {

constexpr int THREADS = 256;  // every block shape: WR * WK = 8 warps (fp8_mma.rs THREADS)

__device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                    uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Word i (0..7) of a lane's 32-byte chunk held as two 16-byte loads.
__device__ __forceinline__ uint32_t chunk_word(const uint4 (&v)[2], int i) {
    const uint4 u = v[i >> 2];
    const int j = i & 3;
    return j == 0 ? u.x : j == 1 ? u.y : j == 2 ? u.z : u.w;
}

// One K step's weight codes of a lane: chunk t (32 bytes) of rows g and g + 8 of each m16 tile.
template <int RT> struct Frag {
    uint4 w[RT][2][2];
};

template <typename T, int MT, int RT, int WR, int WK, int PF>
__device__ __forceinline__ void run(const uint8_t* __restrict__ wq, const float* __restrict__ sw,
                                    const uint8_t* __restrict__ xq, const float* __restrict__ sx,
                                    T* __restrict__ y, int M, int N, int K) {
    static_assert(WR * WK * 32 == THREADS, "8 warps per block");
    constexpr int BROWS = WR * RT * 16;  // output rows per block
    constexpr int NACC = RT * MT * 4;
    __shared__ float s_red[WK > 1 ? WR : 1][WK > 1 ? NACC : 1][WK > 1 ? 32 : 1];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wr = warp % WR, ws = warp / WR;
    const int nw = blockIdx.x * BROWS + wr * RT * 16;
    const int mb = blockIdx.z * (8 * MT);
    const int steps = (K + 127) / 128;
    const int chunks = K >> 5;

    // This lane's rows (clamped: rows past N compute garbage that is never stored).
    size_t wrow[RT][2];
#pragma unroll
    for (int rt = 0; rt < RT; rt++)
#pragma unroll
        for (int h = 0; h < 2; h++) wrow[rt][h] = (size_t)min(nw + rt * 16 + h * 8 + g, N - 1) * K;
    // Past K (the last step of K % 128 != 0): zero codes, so that 0 x NaN never enters a sum.
    auto load = [&](Frag<RT>& f, int st) {
        const int c = st * 4 + t;
        const bool ok = c < chunks;
#pragma unroll
        for (int rt = 0; rt < RT; rt++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const uint4* p = reinterpret_cast<const uint4*>(wq + wrow[rt][h] + (size_t)(ok ? c : 0) * 32);
                f.w[rt][h][0] = ok ? __ldcs(p) : make_uint4(0, 0, 0, 0);
                f.w[rt][h][1] = ok ? __ldcs(p + 1) : make_uint4(0, 0, 0, 0);
            }
    };
    float acc[RT][MT][4] = {};

    auto compute = [&](const Frag<RT>& f, int st) {
        const int c = st * 4 + t;
#pragma unroll
        for (int nt = 0; nt < MT; nt++) {
            const int m = mb + nt * 8 + g;
            const bool ok = c < chunks && m < M;
            const uint4* xp = reinterpret_cast<const uint4*>(xq + (ok ? (size_t)m * K + (size_t)c * 32 : 0));
            const uint4 xv[2] = {ok ? __ldg(xp) : make_uint4(0, 0, 0, 0), ok ? __ldg(xp + 1) : make_uint4(0, 0, 0, 0)};
#pragma unroll
            for (int rt = 0; rt < RT; rt++) {
                // The step's 128 products summed in the tensor cores, then added in f32: FP8 mma
                // keeps fewer accumulator bits than f32, so long K sums are promoted per step.
                float p[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int j = 0; j < 4; j++)
                    mma(p, chunk_word(f.w[rt][0], 2 * j), chunk_word(f.w[rt][1], 2 * j),
                        chunk_word(f.w[rt][0], 2 * j + 1), chunk_word(f.w[rt][1], 2 * j + 1), chunk_word(xv, 2 * j),
                        chunk_word(xv, 2 * j + 1));
#pragma unroll
                for (int e = 0; e < 4; e++) acc[rt][nt][e] += p[e];
            }
        }
    };

    Frag<RT> buf[PF + 1];
    mma_pipeline::stream_steps<PF>(buf, ws, WK, steps, load, compute);
    if constexpr (WK > 1) mma_pipeline::sum_k_slices<WK>(acc, s_red, wr, ws, lane);
    if (ws == 0)
        mma_pipeline::for_each_output(acc, nw, mb, g, t, [&](int n, int m, float v) {
            if (n < N && m < M) y[(size_t)m * N + n] = from_f<T>(v * __ldg(sx + m) * __ldg(sw + n));
        });
}

}  // namespace fp8mm

#ifndef FP8MM_NO_EXPORTS
// Block shapes (RT, WR, WK, PF), fp8_mma.rs picks one by N and M from an H100 sweep of 22 shapes x
// 4 weights x 16..256 rows (docs/benchmarks.md): 16 activation rows per block (MT = 2) won almost
// everywhere it is used.
//   k8: 1 row tile x 8 K-slice warps, 3 steps in flight (16 output rows per block)
//   k4: 1 row tile x 2 row warps x 4 K slices (32 rows)
//   k2: 1 row tile x 4 row warps x 2 K slices (64 rows)
#define FP8MM_CFG_k8 1, 1, 8, 3
#define FP8MM_CFG_k4 1, 2, 4, 1
#define FP8MM_CFG_k2 1, 4, 2, 1

// Arguments: weight codes [N, K], weight scales (N), activation codes [M, K], activation scales
// (M), y [M, N], M, N, K. Grid: (N / rows per block, 1, M / 16), both rounded up.
#define FP8MM(TN, T, C)                                                                            \
    extern "C" __global__ void __launch_bounds__(fp8mm::THREADS)                                   \
        fp8mm_##TN##_##C(const uint8_t* wq, const float* sw, const uint8_t* xq, const float* sx,   \
                         T* y, int M, int N, int K) {                                              \
        fp8mm::run<T, 2, FP8MM_CFG_##C>(wq, sw, xq, sx, y, M, N, K);                               \
    }
#define FP8MM_ALL(TN, T) FP8MM(TN, T, k8) FP8MM(TN, T, k4) FP8MM(TN, T, k2)
FP8MM_ALL(bf16, __nv_bfloat16)
FP8MM_ALL(f16, __half)
FP8MM_ALL(f32, float)
#endif
