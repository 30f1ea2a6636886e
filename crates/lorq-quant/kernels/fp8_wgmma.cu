// fp8wg_*: y[M, N] = (xq[M, K] . Wq[N, K]^T) * sx[m] * sw[n], the W8A8 FP8 product on Hopper's
// warpgroup tensor-core instruction (wgmma m64nBNk32 e4m3, sm_90a), for the activation rows
// fp8_wgmma.rs `takes` routes here, where fp8_mma.cu's mma.sync kernel re-reads its activations
// per 16 output rows and cuBLASLt's FP8 kernels stream the weight slowly (docs/benchmarks.md).
// - Both operands come from shared memory, copied there by the tensor-memory accelerator: the
//   weight's row-major e4m3 codes (the buffer cuBLASLt and the mma kernel read: one copy) in boxes
//   of 128 rows x 128 bytes, the activations' in boxes of BN rows x 128 bytes, both 128-byte
//   swizzled as wgmma reads them (rows past N or M arrive as zeros). A producer warp issues the
//   copies of G consecutive K steps a stage (a row's 128 G bytes requested together) into a ring
//   of S stages; two consumer warpgroups of 64 output rows each wait for a stage, sum it, and give
//   it back. The weight streams through L2 with an evict-first policy, the activations (read by
//   every tile of their rows) with evict-last.
// - Register-fed versions (the codes loaded by every lane, session 32) streamed at 2.3-2.9 TB/s:
//   each lane's 32-byte pieces of a row kept DRAM pages open for few bytes; the copies here ask
//   for whole boxes (lab, H200: 14336x4096 at 16 rows 22.1 -> 19.8 us, at 64 rows 32.1 -> 22.4).
// - FP8 mma keeps fewer accumulator bits than f32, so each K step's four wgmmas sum into a step
//   accumulator that is then added to the f32 total (the promotion every 128 products that
//   cuBLASLt and DeepSeek's kernels do).
// - Tiles (128 output rows x BN activation rows) and their K steps are shared out as qwgmma.cu's
//   are (wgmma::segment_at, fp8_wgmma.rs `plan`); the per-token x per-row scales are applied
//   to the f32 sums before qmma_tiled.cuh's `finish` stores them or adds a split tile's parts
//   through L2 partial sums and a ticket. Launched in clusters (each tile's equal splits one
//   cluster: fp8_wgmma.rs `plan`), the parts are added from the blocks' shared memory instead
//   (`finish_in_cluster`).
// - One launch may compute up to three weights sharing the activations (q/k/v, gate/up:
//   `Weights`), their tiles laid end to end; such groups run whole tiles or clusters only.
// - Requires K % 128 == 0 (whole steps), 16-byte aligned rows (the copies' rule) and N % 4 == 0
//   (the cluster sums' stores).
#include "qmma_tiled.cuh"
#include "wgmma.cuh"

namespace fp8wg {

constexpr int CONSUMERS = 2;                  // warpgroups of 64 output rows
constexpr int THREADS = 128 * (CONSUMERS + 1);  // and a producer warpgroup (fp8_wgmma.rs THREADS)
constexpr int WR = 4 * CONSUMERS;             // warps of 16 output rows
constexpr int ROWS = 64 * CONSUMERS;          // output rows a tile

// A CUtensorMap (cuda.h), built by fp8_wgmma.rs `tensor_map`.
struct alignas(64) TensorMap {
    uint64_t opaque[16];
};

// Up to three weights sharing the activations (q/k/v, gate/up: fp8_wgmma.rs `Weights`, the same
// layout): weight g's codes' tensor map ([n[g], K] bytes), row scales and output y[g] [M, n[g]].
// Their tiles are laid end to end, weight after weight.
constexpr int MAX_WEIGHTS = 3;
struct alignas(64) Weights {
    TensorMap map[MAX_WEIGHTS];
    const float* sw[MAX_WEIGHTS];
    void* y[MAX_WEIGHTS];
    int n[MAX_WEIGHTS];
    int count;
};

// Where a tile is: its weight, its 128-row block in that weight and its activation block.
struct Place {
    int g, bx, mbi;
};
__device__ __forceinline__ Place place(const Weights& ws, int tile, int m_blocks) {
    Place p{0, 0, 0};
    for (; p.g + 1 < ws.count; p.g++) {
        const int tiles = (ws.n[p.g] + ROWS - 1) / ROWS * m_blocks;
        if (tile < tiles) break;
        tile -= tiles;
    }
    const int row_blocks = (ws.n[p.g] + ROWS - 1) / ROWS;
    p.bx = tile % row_blocks;
    p.mbi = tile / row_blocks;
    return p;
}

// The consumer warps' barrier (named barrier 1: the producer warpgroup never joins).
struct ConsumerSync {
    __device__ __forceinline__ void operator()() const {
        asm volatile("bar.sync 1, %0;\n" ::"n"(WR * 32) : "memory");
    }
};

// BN activation rows a tile, G K steps (128 bytes of each row) a stage, S stages.
template <typename T, int BN, int G, int S>
__device__ __forceinline__ void run(const Weights& ws, const TensorMap& mx, const float* __restrict__ sx,
                                    float* __restrict__ partial, unsigned* __restrict__ counters, int M, int K,
                                    int per_block, bool in_cluster) {
    constexpr int MT = BN / 8;
    constexpr int WBOX = ROWS * 128, XBOX = BN * 128, STAGE = G * (WBOX + XBOX);
    extern __shared__ uint8_t smem_raw[];
    __shared__ __align__(8) uint64_t full[S], empty[S];
    __shared__ float s_red[1][1][1];  // (no K-slice warps)
    __shared__ bool last;
    const uint32_t raw0 = (uint32_t)__cvta_generic_to_shared(smem_raw), s0 = (raw0 + 1023u) & ~1023u;  // swizzle atoms
    const uint32_t full0 = (uint32_t)__cvta_generic_to_shared(full), empty0 = (uint32_t)__cvta_generic_to_shared(empty);
    const int tid = threadIdx.x;
    if (tid == 0) {
        for (int s = 0; s < S; s++) {
            wgmma::mbar_init(full0 + 8 * s, 1);       // the producer's arrival + the copies' bytes
            wgmma::mbar_init(empty0 + 8 * s, WR);  // one arrival per consumer warp
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    // A product launched after this one as a dependent (k after q, up after gate) may start on
    // the SMs this grid leaves free and stream the first lap of its weight; it waits for this
    // grid's end before it reads or writes anything a kernel writes.
    launch_dependents();
    const int steps = K / 128, m_blocks = (M + BN - 1) / BN;
    int tiles = 0;
    for (int g = 0; g < ws.count; g++) tiles += (ws.n[g] + ROWS - 1) / ROWS * m_blocks;
    const int total = tiles * steps, end = min(total, ((int)blockIdx.x + 1) * per_block);
    if (tid >= WR * 32) {
        // Producer: one lane walks the block's segments as the consumers do and fills the ring.
        if (tid == WR * 32) {
            uint64_t policy;
            asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
            uint64_t keep;
            asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(keep));
            // The block's stages in order: visit(it, s, w, nb, mb, i, n) for stage it (ring slot s)
            // holding K steps i .. i + n - 1 of weight w's tile at output rows nb, activation rows
            // mb; false stops.
            auto walk = [&](auto&& visit) {
                int it = 0;
                for (int cur = (int)blockIdx.x * per_block; cur < end;) {
                    const wgmma::Segment sg = wgmma::segment_at(cur, end, steps, per_block);
                    const Place p = place(ws, sg.tile, m_blocks);
                    const int nb = p.bx * ROWS, mb = p.mbi * BN;
                    for (int i = sg.st0; i < sg.st1; i += G, it++)
                        if (!visit(it, it % S, p.g, nb, mb, i, min(G, sg.st1 - i))) return;
                    cur += sg.st1 - sg.st0;
                }
            };
            auto copy_weight = [&](int s, int w, int nb, int i, int n) {
                for (int q = 0; q < n; q++)
                    wgmma::tensor_copy(s0 + s * STAGE + q * WBOX, &ws.map[w], (i + q) * 128, nb, full0 + 8 * s,
                                       policy);
            };
            // The weight of the ring's first lap before the activations exist: launched as a dependent
            // of the kernel writing them (fp8_act.cu quant_rows), the block streams its weight while
            // that kernel runs. A stage's barrier expects the weight's and the activations' bytes.
            walk([&](int it, int s, int w, int nb, int, int i, int n) {
                if (it >= S) return false;
                wgmma::mbar_expect(full0 + 8 * s, n * (WBOX + XBOX));
                copy_weight(s, w, nb, i, n);
                return true;
            });
            wait_for_producers();
            walk([&](int it, int s, int w, int nb, int mb, int i, int n) {
                if (it >= S) {
                    wgmma::mbar_wait(empty0 + 8 * s, ((it / S) & 1) ^ 1);
                    wgmma::mbar_expect(full0 + 8 * s, n * (WBOX + XBOX));
                    copy_weight(s, w, nb, i, n);
                }
                for (int q = 0; q < n; q++)
                    wgmma::tensor_copy(s0 + s * STAGE + G * WBOX + q * XBOX, &mx, (i + q) * 128, mb, full0 + 8 * s,
                                       keep);
                return true;
            });
        }
        if (in_cluster) qmmat::cluster_epilogue_barriers();
        return;
    }
    // Consumers: warp w sums output rows nb + 16 w .. + 15 (warpgroup w / 4's m64 rows). They read
    // the activation scales and write y, partial and counters, so they wait for the kernels ahead.
    wait_for_producers();
    const int lane = tid & 31;
    int it = 0;
    for (int cur = (int)blockIdx.x * per_block; cur < end;) {
        const wgmma::Segment sg = wgmma::segment_at(cur, end, steps, per_block);
        const Place p = place(ws, sg.tile, m_blocks);
        const qmmat::Coords pos =
            qmmat::coords_at<1, WR, MT>(p.bx, p.mbi, K, sg.st0, sg.st1, sg.split, sg.splits, sg.tile);
        const int g = pos.g, t = pos.t, nw = pos.nw, mb = pos.mb, N = ws.n[p.g];
        const float* __restrict__ sw = ws.sw[p.g];
        T* __restrict__ y = static_cast<T*>(ws.y[p.g]);
        const uint32_t arow = (uint32_t)(tid >> 7) * 64 * 128;  // the warpgroup's rows in a weight box
        float acc[1][MT][4];
        mma_pipeline::zero(acc);
        float step_acc[MT][4];
        for (int i = sg.st0; i < sg.st1; i += G, it++) {
            const int s = it % S, n = min(G, sg.st1 - i);
            wgmma::mbar_wait(full0 + 8 * s, (it / S) & 1);
            const uint32_t base = s0 + s * STAGE;
#pragma unroll
            for (int q = 0; q < G; q++) {
                if (q >= n) break;
                const uint32_t wa = base + q * WBOX + arow, xa = base + G * WBOX + q * XBOX;
                wgmma::fence();
#pragma unroll
                for (int j = 0; j < 4; j++)
                    wgmma::Mma<BN>::e4m3_ss(step_acc, wgmma::sw128_desc(wa + 32 * j), wgmma::sw128_desc(xa + 32 * j), j > 0);
                wgmma::commit();
                // The step's 128 products, summed in the tensor cores, into the f32 total.
                wgmma::wait<0>();
                wgmma::pin(step_acc);
#pragma unroll
                for (int a = 0; a < MT; a++)
#pragma unroll
                    for (int b = 0; b < 4; b++) acc[0][a][b] += step_acc[a][b];
            }
            // This warp has read the stage (its wgmmas are done).
            __syncwarp();
            if (lane == 0) wgmma::mbar_arrive(empty0 + 8 * s);
        }
        // Scales: rows past N or M read the last one (never stored).
        const float sw0 = __ldg(sw + min(nw + g, N - 1)), sw1 = __ldg(sw + min(nw + g + 8, N - 1));
#pragma unroll
        for (int nt = 0; nt < MT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                acc[0][nt][e] *= (e >= 2 ? sw1 : sw0) * __ldg(sx + min(mb + nt * 8 + 2 * t + (e & 1), M - 1));
        if (in_cluster)  // (one segment a block: the ring's memory is free for the sums)
            qmmat::finish_in_cluster<T, MT, WR, ConsumerSync>(acc, reinterpret_cast<float*>(smem_raw + (s0 - raw0)), y,
                                                               M, N, pos);
        else
            qmmat::finish<T, MT, 1, WR, 1, ConsumerSync>(acc, s_red, last, y, partial, counters, M, N, pos);
        cur += sg.st1 - sg.st0;
    }
}

}  // namespace fp8wg

// Block shapes: activation rows a tile BN, K steps a stage G, stages S (fp8_wgmma.rs Shape: the
// shared memory is S G (128 + BN) 128 bytes + 1 KiB). Lab, H200: two steps a stage at 16-64 rows
// within 2 % of four and 2-10 % faster than one; at 128 rows 1-9 % faster than one.
#define FP8WG_CFG_n16 16, 2, 6
#define FP8WG_CFG_n32 32, 2, 5
#define FP8WG_CFG_n64 64, 2, 4
#define FP8WG_CFG_n128 128, 2, 3

// wgmma exists on sm_90a only (fp8_wgmma.rs `supports` routes nothing here elsewhere).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || !defined(__CUDA_ARCH__)
#define FP8WG_BODY(...) __VA_ARGS__
#else
#define FP8WG_BODY(...) __trap()
#endif

// fp8wg_*: arguments: the weights (Weights: tensor maps of [n, K] bytes in boxes of 128 x 128, row
// scales, outputs [M, n]), the activations' tensor map ([M, K], boxes of 128 x BN), sx (M),
// partial, counters, M, K, K steps per block, in_cluster (1: the blocks of a tile form a cluster,
// in split order, each one segment; partial and counters unused). Split tiles summed through
// partial and counters (stream-K) only for a single weight. Grid (blocks), THREADS threads;
// dynamic shared memory fp8_wgmma.rs `shared_bytes`.
#define FP8WG(TN, T, C)                                                                                  \
    extern "C" __global__ void __launch_bounds__(fp8wg::THREADS, 1)                                    \
        fp8wg_##TN##_##C(const __grid_constant__ fp8wg::Weights ws,                                    \
                         const __grid_constant__ fp8wg::TensorMap mx, const float* sx, float* partial,  \
                         unsigned* counters, int M, int K, int per_block, int in_cluster) {             \
        FP8WG_BODY(fp8wg::run<T, FP8WG_CFG_##C>(ws, mx, sx, partial, counters, M, K, per_block, in_cluster != 0)); \
    }
#define FP8WG_ALL(TN, T) FP8WG(TN, T, n16) FP8WG(TN, T, n32) FP8WG(TN, T, n64) FP8WG(TN, T, n128)
FP8WG_ALL(bf16, __nv_bfloat16)
FP8WG_ALL(f16, __half)
FP8WG_ALL(f32, float)
