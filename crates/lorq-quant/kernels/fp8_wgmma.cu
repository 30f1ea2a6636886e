// fp8wg_*: y[M, N] = (xq[M, K] . Wq[N, K]^T) * sx[m] * sw[n], the W8A8 FP8 product on Hopper's
// warpgroup tensor-core instruction (wgmma m64nBNk32 e4m3, sm_90a), for 17-64 activation rows of
// long-K weights (fp8_wgmma.rs `takes`),
// where fp8_mma.cu's mma.sync kernel re-reads its activations per 16 output rows and cuBLASLt's
// FP8 kernels stream the weight slowly (docs/benchmarks.md).
// - The weight is wgmma's A operand, from registers, as stored (row-major e4m3, the buffer
//   cuBLASLt reads): per 128-wide K step, lane (g, t) of warp w loads the 32-byte chunk t of its
//   rows g and g + 8, and the step's k32 wgmma j takes words 2j and 2j + 1 of each chunk as the
//   fragment's k and k + 16 halves (fp8_mma.cu's order). No decode: the codes are the operand.
// - The activations are B, from shared memory in the 128-byte swizzled K-major layout, in that
//   same K order: a block writes all the K steps it sums there at once (from the row-major codes
//   as fp8_act.cu or the norm wrote them), so its loop has no block barrier. (A separate launch
//   that reordered them for bulk copies was faster at 48-64 rows, slower at 16: docs/benchmarks.md.)
// - Block: 2 warpgroups x 64 output rows; the weight codes are loaded PF ring slots ahead, G
//   consecutive K steps a slot (a row's 256 bytes requested together). FP8 mma keeps fewer
//   accumulator bits than f32, so each step's four wgmmas sum into a step accumulator that is then
//   added to the f32 total (the promotion every 128 products that cuBLASLt and DeepSeek's kernels
//   do). Two step accumulators, so that step i's wgmmas run while step i - 1's are added, made
//   ptxas serialize the wgmmas (it sees accumulators read inside the pipeline).
// - Tiles (128 output rows x BN activation rows) and their K steps are shared out as qwgmma.cu's
//   are (wgmma::segment_at, fp8_wgmma.rs `schedule`); the per-token x per-row scales are applied
//   to the f32 sums before qmma_tiled.cuh's `finish` stores them or adds a split tile's parts.
// - Requires K % 128 == 0 (whole steps: no masks on the weight loads).
#include "qmma_tiled.cuh"
#include "wgmma.cuh"

namespace fp8wg {

constexpr int WARPGROUPS = 2;
constexpr int THREADS = 128 * WARPGROUPS;  // fp8_wgmma.rs THREADS
constexpr int WR = 4 * WARPGROUPS;         // warps of 16 output rows

// A lane's codes of G consecutive K steps: 32 bytes of each of its two rows per step.
template <int G> struct Frag {
    uint4 w[G][2][2];
};
using mma_pipeline::chunk_word;

template <int MT> __device__ __forceinline__ void add(float (&acc)[1][MT][4], const float (&p)[MT][4]) {
#pragma unroll
    for (int a = 0; a < MT; a++)
#pragma unroll
        for (int b = 0; b < 4; b++) acc[0][a][b] += p[a][b];
}

// BN activation rows per block, PF ring slots loaded ahead, G consecutive K steps per slot.
template <typename T, int BN, int PF, int G>
__device__ __forceinline__ void run(const uint8_t* __restrict__ wq, const float* __restrict__ sw,
                                    const uint8_t* __restrict__ xq, const float* __restrict__ sx,
                                    T* __restrict__ y, float* __restrict__ partial, unsigned* __restrict__ counters,
                                    int M, int N, int K, int per_block) {
    constexpr int MT = BN / 8;
    constexpr int SLOT = BN * 128;  // bytes: BN rows of one 128-byte K step
    extern __shared__ uint8_t smem_raw[];
    __shared__ float s_red[1][1][1];  // (no K-slice warps)
    __shared__ bool last;
    const uint32_t s0 = ((uint32_t)__cvta_generic_to_shared(smem_raw) + 1023u) & ~1023u;  // swizzle atoms
    const int tid = threadIdx.x;
    // Zero, unknown to the compiler (K > 0): see `operands`.
    const uint32_t zero = (uint32_t)K >> 31;
    const int steps = K / 128, row_blocks = (N + 127) / 128;
    const int total = row_blocks * ((M + BN - 1) / BN) * steps, end = min(total, ((int)blockIdx.x + 1) * per_block);
    for (int cur = (int)blockIdx.x * per_block; cur < end;) {
        const wgmma::Segment sg = wgmma::segment_at(cur, end, steps, per_block);
        // Every warp is done with the previous segment's activations (and its `last`).
        __syncthreads();
        const qmmat::Coords pos = qmmat::coords_at<1, WR, MT>(sg.tile % row_blocks, sg.tile / row_blocks, K, sg.st0,
                                                              sg.st1, sg.split, sg.splits, sg.tile);
        const int g = pos.g, t = pos.t, nw = pos.nw, mb = pos.mb, st0 = pos.st0;
        const int nsteps = pos.st1 - st0, nslots = (nsteps + G - 1) / G;
        // This lane's rows, clamped: rows past N read row N - 1 and are never stored.
        const uint8_t* rows[2] = {wq + (size_t)min(nw + g, N - 1) * K + 32 * t,
                                  wq + (size_t)min(nw + g + 8, N - 1) * K + 32 * t};
        // Slot si: steps G si .. G si + G - 1 (past the segment: its last step again, not used).
        auto load = [&](Frag<G>& f, int si, uint32_t dep) {
#pragma unroll
            for (int q = 0; q < G; q++) {
                const int st = st0 + min(si * G + q, nsteps - 1);
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const uint4* p = reinterpret_cast<const uint4*>(rows[h] + (size_t)st * 128 + dep);
                    f.w[q][h][0] = __ldcs(p);
                    f.w[q][h][1] = __ldcs(p + 1);
                }
            }
        };
        float acc[1][MT][4];
        mma_pipeline::zero(acc);
        float step_acc[MT][4];
        Frag<G> buf[PF + 1];
#pragma unroll
        for (int u = 0; u < PF; u++)
            if (u < nslots) load(buf[u], u, 0u);
        // While those loads fly: the segment's activations, every step, into shared memory in the
        // fragments' K order (the host sized it), rows past M zero. Then no block barrier in the
        // loop: each warpgroup streams its weights at its own pace.
        // x's word 8e + 2j + h of a step (lane t = e's words 2j, 2j + 1: wgmma j's k and k + 16
        // halves) is the logical word 8j + 4h + e, in 16-byte unit u = 2j + h, swizzled by the row
        // (u ^ row % 8, the 128-byte swizzle wgmma reads): a thread per (step, row, j) loads
        // words 2j, 2j + 1 of the four 32-byte chunks and stores units 2j and 2j + 1.
        for (int v = tid; v < nsteps * BN * 4; v += THREADS) {
            const int i = v / (BN * 4), r = (v >> 2) % BN, j = v & 3;
            const bool in = mb + r < M;
            const uint8_t* src = xq + (size_t)(in ? mb + r : 0) * K + (size_t)(st0 + i) * 128 + 8 * j;
            uint2 c[4];
#pragma unroll
            for (int e = 0; e < 4; e++)
                c[e] = in ? __ldg(reinterpret_cast<const uint2*>(src + 32 * e)) : make_uint2(0, 0);
            const uint32_t row = s0 + i * SLOT + r * 128;
            asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(row + (((2 * j) ^ (r & 7)) << 4)),
                         "r"(c[0].x), "r"(c[1].x), "r"(c[2].x), "r"(c[3].x)
                         : "memory");
            asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(row + (((2 * j + 1) ^ (r & 7)) << 4)),
                         "r"(c[0].y), "r"(c[1].y), "r"(c[2].y), "r"(c[3].y)
                         : "memory");
        }
        __syncthreads();
        for (int b0 = 0; b0 < nslots; b0 += PF + 1) {
#pragma unroll
            for (int u = 0; u <= PF; u++) {
                const int si = b0 + u;
                if (si >= nslots) continue;
                // The slot's operands: its codes XORed with `zero`, so that wgmma's fence waits for
                // this slot's loads only; their OR, and-ed with `zero`, is added to the refill's
                // addresses, so those loads are issued once this slot's codes are here (else ptxas
                // hoists them first and the slot's first use waits for them as well: the ring then
                // runs one slot at a time, as the tiled kernel's did before session 27).
                uint32_t a[G][4][4];
                uint32_t dep = 0;
#pragma unroll
                for (int q = 0; q < G; q++)
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        a[q][j][0] = chunk_word(buf[u].w[q][0], 2 * j) ^ zero;
                        a[q][j][1] = chunk_word(buf[u].w[q][1], 2 * j) ^ zero;
                        a[q][j][2] = chunk_word(buf[u].w[q][0], 2 * j + 1) ^ zero;
                        a[q][j][3] = chunk_word(buf[u].w[q][1], 2 * j + 1) ^ zero;
                        dep |= a[q][j][0] | a[q][j][1] | a[q][j][2] | a[q][j][3];
                    }
                // The previous slot's wgmmas are done: refill its registers PF slots ahead.
                if (si + PF < nslots) load(buf[(u + PF) % (PF + 1)], si + PF, dep & zero);
#pragma unroll
                for (int q = 0; q < G; q++) {
                    const int i = si * G + q;
                    if (i >= nsteps) continue;
                    const uint32_t sb = s0 + i * SLOT;
                    wgmma::fence();
#pragma unroll
                    for (int j = 0; j < 4; j++)
                        wgmma::Mma<BN>::e4m3(step_acc, a[q][j][0], a[q][j][1], a[q][j][2], a[q][j][3],
                                             wgmma::sw128_desc(sb + 32 * j), j > 0);
                    wgmma::commit();
                    // The step's 128 products, summed in the tensor cores, into the f32 total.
                    wgmma::wait<0>();
                    wgmma::pin(step_acc);
                    add(acc, step_acc);
                }
            }
        }
        // Scales: rows past N or M read the last one (never stored).
        const float sw0 = __ldg(sw + min(nw + g, N - 1)), sw1 = __ldg(sw + min(nw + g + 8, N - 1));
#pragma unroll
        for (int nt = 0; nt < MT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                acc[0][nt][e] *= (e >= 2 ? sw1 : sw0) * __ldg(sx + min(mb + nt * 8 + 2 * t + (e & 1), M - 1));
        qmmat::finish<T, MT, 1, WR, 1>(acc, s_red, last, y, partial, counters, M, N, pos);
        cur += nsteps;
    }
}

}  // namespace fp8wg

// Block shapes: activation rows per block BN, ring slots loaded ahead PF, K steps per slot G
// (fp8_wgmma.rs Shape). Lab, H200, 14336x4096 at 16 rows: one step a slot 24.7 us whatever PF
// (3-7), two steps 20.7 (PF 1-3), four 21.9 (PF 1): a warp's loads of a row's consecutive 256
// bytes issued together.
#define FP8WG_CFG_n16 16, 2, 2
#define FP8WG_CFG_n32 32, 2, 2
#define FP8WG_CFG_n64 64, 2, 2

// wgmma exists on sm_90a only (fp8_wgmma.rs `supports` routes nothing here elsewhere).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || !defined(__CUDA_ARCH__)
#define FP8WG_BODY(...) __VA_ARGS__
#else
#define FP8WG_BODY(...) __trap()
#endif

// fp8wg_*: arguments wq [N, K], sw (N), xq [M, K], sx (M), y [M, N], partial, counters, M, N, K, K
// steps per block; grid (blocks); dynamic shared memory per_block * BN * 128 + 1024 (fp8_wgmma.rs
// `shared_bytes`).
#define FP8WG(TN, T, C)                                                                              \
    extern "C" __global__ void __launch_bounds__(fp8wg::THREADS, 1)                                \
        fp8wg_##TN##_##C(const uint8_t* wq, const float* sw, const uint8_t* __restrict__ xq,       \
                         const float* sx, T* __restrict__ y, float* partial, unsigned* counters, int M, \
                         int N, int K, int per_block) {                                            \
        FP8WG_BODY(fp8wg::run<T, FP8WG_CFG_##C>(wq, sw, xq, sx, y, partial, counters, M, N, K, per_block)); \
    }
#define FP8WG_ALL(TN, T) FP8WG(TN, T, n16) FP8WG(TN, T, n32) FP8WG(TN, T, n64)
FP8WG_ALL(bf16, __nv_bfloat16)
FP8WG_ALL(f16, __half)
FP8WG_ALL(f32, float)
