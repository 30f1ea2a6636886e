// qwg_*: y[M, N] = x[M, K] . W^T for 4-bit weights (affine a4, table t4) in the packed GPU layout
// on Hopper's warpgroup tensor-core instruction (wgmma, sm_90a), for 17-256 activation rows; the
// weight stream, the code decode and the epilogue are the tiled kernel's (qmma_tiled.cuh).
// - The weight is wgmma's A operand, from registers: warp w of a warpgroup decodes the m16n8k16 A
//   fragments of its 16 output rows exactly as the tiled kernel's warps do (lane (g, t): chunk t
//   of rows g and g + 8 per 128-wide K step, codes (j, j + 4) of each word paired), and one
//   wgmma m64nBNk16 consumes them for all BN activation rows of the block at once.
// - The activations are B, from shared memory in the 128-byte swizzled K-major layout. Since the
//   decoded pairs are codes (j, j + 4), the activations must sit in the same order:
//   qwg_permute_* (one pass over x per call, shared by the weights of a group) writes them in that
//   order and already swizzled, step-major ([K/128 steps][2 halves][Mp rows][64]), so each K step
//   of a block is two contiguous bulk copies (cp.async.bulk, completing on an mbarrier) issued by
//   one thread, S - 2 steps ahead.
// - Block: 2 warpgroups x 64 output rows; the weight codes of a step are loaded PF steps ahead
//   into registers, a ring of PF + 1 slots each refilled once its step's registers arrived (more
//   bytes in flight per SM: lab, H100, 14336x4096 at 128 rows 48.9 us with 2 steps, 45.9 with 6).
//   wgmma runs asynchronously: a word's two wgmmas are committed as one group, and the next word
//   is decoded (into another register buffer) while up to GROUPS of them run.
// - One launch computes one weight or a group sharing x (q/k/v, gate/up: one wave of blocks over
//   all their tiles, not one per weight, each waiting for the one before it: part_at).
// - Each block sums a run of K steps of the tiles laid end to end (segment_at): whole tiles, or,
//   where the tiles would leave half the SMs idle, equal shares (stream-K); a tile cut between
//   blocks is summed as the tiled kernel's K splits are (f32 partial sums added by the tile's last
//   block, in split order: finish), or, launched in clusters (each tile's equal splits one
//   cluster: qwgmma.rs `plan`), from the blocks' shared memory (finish_in_cluster).
// Lab (session 19, H100, kernel alone): 14336x4096 at 128 rows 45.9 us (tiled x1 83.0, bf16
// cuBLAS 49.7), 4096x14336 72 us (101), 4096x4096 at 64 rows 25.3 (31.2).
#include "qmma_tiled.cuh"
#include "wgmma.cuh"

namespace qwg {
using namespace qmmat;
using wgmma::bulk_copy;
using wgmma::mbar_expect;
using wgmma::mbar_init;
using wgmma::mbar_wait;
using wgmma::pin;
using wgmma::Segment;
using wgmma::sw128_desc;

// Each 32 consecutive activations (chunk t of step st, t = 0..3) land where lane t's decoded
// pairs are: xp[st][(4w + j) / 8][m][8 ((4w + j) % 8) + 2t + e] = x[m][128 st + 32t + 8w + j + 4e],
// 16-byte units swizzled by m % 8 (the 128-byte swizzle wgmma reads). Rows m >= M and columns
// past K are zero. One thread per (row, step, word w): its four 16-byte loads, four stores.
template <typename T>
__device__ __forceinline__ void permute(const T* __restrict__ x, T* __restrict__ xp, int M, int K, int Kp, int Mp) {
    // The wgmma kernel after it may start loading its weight codes (it waits for xp).
    launch_dependents();
    const int per_row = Kp / 32;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= Mp * per_row) return;
    const int m = i / per_row, r = i % per_row, st = r / 4, w = r % 4;
    uint32_t pairs[4][4];  // [t][j]: pair j of unit t, as the tiled kernel's lanes pair them
#pragma unroll
    for (int t = 0; t < 4; t++) {
        const int col = st * 128 + 32 * t + 8 * w;
        const uint4 v = col < K && m < M ? __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * K + col))
                                         : make_uint4(0, 0, 0, 0);
        pair_unit(v, pairs[t]);
    }
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const int c = 4 * w + j, half = c >> 3, cc = c & 7;
        uint4* out = reinterpret_cast<uint4*>(xp + ((size_t)(st * 2 + half) * Mp + m) * 64) + (cc ^ (m & 7));
        *out = make_uint4(pairs[0][j], pairs[1][j], pairs[2][j], pairs[3][j]);
    }
}

// Word w's scaled pairs of both lane rows. Affine codes: one LOP3 per pair ((v & mask) | magic,
// which the compiler emitted as two), then q - zi and the scale as decode_step_sub does.
template <typename T, bool LUTK>
__device__ __forceinline__ void decode(const Frag<1, 4>& f, int w, const uint32_t (&base)[1][2], const uint32_t (&s2)[1][2],
                                       const uint32_t (&zs2)[1][2], const uint32_t (&tlo)[4], const uint32_t (&thi)[4],
                                       uint32_t (&p)[1][2][4]) {
    if constexpr (LUTK) {
        decode_step_sub<T, LUTK, 1, 4>(f, w, base, s2, zs2, tlo, thi, p);
    } else {
#pragma unroll
        for (int h = 0; h < 2; h++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                uint32_t v;
                asm("lop3.b32 %0, %1, %2, %3, 0xEA;"
                    : "=r"(v)
                    : "r"(f.w[0][h][w] >> (4 * j)), "r"(0x000F000Fu), "r"(Half<T>::MAGIC));
                p[0][h][j] = Half<T>::fma(Half<T>::sub(v, base[0][h]), s2[0][h], zs2[0][h]);
            }
    }
}

constexpr int WARPGROUPS = 2;
// wgmma groups (a word's two wgmmas each) a warpgroup keeps in flight while it decodes the next word
// (lab, H200, 14336x4096 at 128 rows: 2 groups 34.7 us, 3 groups 33.4).
constexpr int GROUPS = 3;
static_assert(GROUPS <= 4, "a step's slot is refilled two steps later (run)");
constexpr int THREADS = 128 * WARPGROUPS;  // qwgmma.rs THREADS

// The weight a tile of a launch belongs to: a launch's tiles are its weights' tiles end to end
// (QGroup: the second and third weight's first tiles b1, b2; b1 = b2 = the launch's tiles for one
// weight), each weight's row blocks fastest. Its split tiles' f32 partial sums lie end to end too:
// `slots` per tile, [slots][M][N] per weight.
template <typename T>
struct Part {
    const uint32_t* codes;
    const float* scales;
    const float* zeros;
    T* y;
    float* partial;
    int N, tile0;
};
template <typename T>
__device__ __forceinline__ Part<T> part_at(int tile, const Part<T>& first, int M, int slots, const QGroup& g) {
    // (Constant indices into the parameter: an indexed one would copy it to local memory.)
    if (tile < g.b1) return first;
    float* const p = first.partial;
    if (tile < g.b2)
        return {g.codes[0], g.scales[0], g.zeros[0], static_cast<T*>(g.y[0]),
                p == nullptr ? nullptr : p + (size_t)slots * M * first.N, g.n[0], g.b1};
    return {g.codes[1], g.scales[1], g.zeros[1], static_cast<T*>(g.y[1]),
            p == nullptr ? nullptr : p + (size_t)slots * M * (first.N + g.n[0]), g.n[1], g.b2};
}

template <typename T, bool LUTK, int BN, int S, int PF>
__device__ __forceinline__ void run(const Part<T>& first, const float* __restrict__ lut, int wpr, int gsize,
                                    int groups, const T* __restrict__ xp, int Mp, unsigned* __restrict__ counters,
                                    int M, int K, int per_block, bool in_cluster, int slots, int tiles,
                                    const QGroup& grp) {
    constexpr int MT = BN / 8;
    constexpr int WR = 4 * WARPGROUPS;
    constexpr int SLOT = BN * 256;  // bytes: two 64-wide halves of BN rows x 128 bytes
    extern __shared__ uint8_t smem_raw[];
    __shared__ float s_red[1][1][1];  // (no K-slice warps)
    __shared__ bool last;
    __shared__ __align__(8) uint64_t bars[S];
    const uint32_t raw0 = (uint32_t)__cvta_generic_to_shared(smem_raw), s0 = (raw0 + 1023u) & ~1023u;  // swizzle atoms
    const uint32_t bar0 = (uint32_t)__cvta_generic_to_shared(bars);
    const int tid = threadIdx.x;
    // The next weight of a group may start its ring while this one runs (qwgmma.rs).
    launch_dependents();
    if (tid == 0) {
        for (int s = 0; s < S; s++) mbar_init(bar0 + 8 * s);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    uint32_t tlo[4] = {0, 0, 0, 0}, thi[4] = {0, 0, 0, 0};
    if constexpr (LUTK) table_bytes<T>(lut, tlo, thi);
    const uint32_t gmagic = group_magic(gsize);

    const int steps = (K + 127) / 128;
    const int total = tiles * steps, end = min(total, ((int)blockIdx.x + 1) * per_block);
    int used = 0;  // slots filled so far by this block: slot used % S, its barrier's phase (used / S) & 1
    for (int cur = (int)blockIdx.x * per_block; cur < end;) {
        const Segment sg = wgmma::segment_at(cur, end, steps, per_block);
        // Every warp is done with the previous segment's slots (and its `last`).
        __syncthreads();
        const Part<T> w = part_at(sg.tile, first, M, slots, grp);
        const int N = w.N, row_blocks = (N + 127) / 128, local = sg.tile - w.tile0;
        const Coords pos = coords_at<1, WR, MT>(local % row_blocks, local / row_blocks, K, sg.st0, sg.st1, sg.split,
                                               sg.splits, sg.tile);
        const int g = pos.g, t = pos.t, nw = pos.nw, mb = pos.mb, st0 = pos.st0, st1 = pos.st1, chunks = pos.chunks;
        const int nsteps = st1 - st0;

        size_t crow[1][2], srow[1][2];
        lane_rows<1>(nw, g, N, wpr, groups, crow, srow);
        auto load = [&](Frag<1, 4>& f, int i) {
            const int c = min(min(st0 + i, st1 - 1) * 4 + t, chunks - 1);  // past K: activations are 0
            load_chunk<LUTK, 1, 4>(f, w.codes, w.scales, w.zeros, crow, srow, c, gmagic);
        };
        // Step i's activations into slot (used + i) % S (thread 0).
        auto stage = [&](int i) {
            if (tid != 0 || i >= nsteps) return;
            const uint32_t slot = (used + i) % S, dst = s0 + slot * SLOT, bar = bar0 + 8 * slot;
            mbar_expect(bar, SLOT);
#pragma unroll
            for (int h = 0; h < 2; h++)
                bulk_copy(dst + h * (BN * 128), xp + ((size_t)((st0 + i) * 2 + h) * Mp + mb) * 64, BN * 128, bar);
        };
        float acc[1][MT][4];
        mma_pipeline::zero(acc);

        // A word's pairs, one buffer per wgmma group in flight (GROUPS) and the one being decoded.
        uint32_t pw[GROUPS][1][2][4];
        auto compute = [&](const Frag<1, 4>& f, int i) {
            const uint32_t sb = s0 + ((used + i) % S) * SLOT;
            uint32_t s2[1][2], zs2[1][2], base[1][2];
            scale_pairs<T, LUTK, 1, 4>(f, 0, s2, zs2, base);
#pragma unroll
            for (int w = 0; w < 4; w++) {
                uint32_t(&p)[1][2][4] = pw[w % GROUPS];
                decode<T, LUTK>(f, w, base, s2, zs2, tlo, thi, p);
                pin(acc);
                wgmma::fence();
#pragma unroll
                for (int jj = 0; jj < 2; jj++) {  // k16 sub-steps 2w + jj: pairs 2jj, 2jj + 1
                    const int s = 2 * w + jj;
                    const uint64_t d = sw128_desc(sb + (s >> 2) * (BN * 128) + (s & 3) * 32);
                    if constexpr (std::is_same<T, __nv_bfloat16>::value)
                        wgmma::Mma<BN>::bf16(acc[0], p[0][0][2 * jj], p[0][1][2 * jj], p[0][0][2 * jj + 1],
                                             p[0][1][2 * jj + 1], d);
                    else
                        wgmma::Mma<BN>::f16(acc[0], p[0][0][2 * jj], p[0][1][2 * jj], p[0][0][2 * jj + 1],
                                            p[0][1][2 * jj + 1], d);
                }
                wgmma::commit();
                wgmma::wait<GROUPS - 1>();  // the oldest word's wgmmas are done: its buffer is free
                pin(acc);
            }
        };

        // The register ring: PF + 1 slots, refilled PF steps ahead once the step's own registers
        // have arrived (await_frag; refilled after the step, H200, 14336x4096 at 128 rows: 45.8
        // against 36.8 us). Its first loads (weight codes, which no kernel writes) go out before
        // the block waits for the permute ahead of it (a dependent launch: qwgmma.rs).
        Frag<1, 4> buf[PF + 1];
#pragma unroll
        for (int u = 0; u < PF; u++)
            if (u < nsteps) load(buf[u], u);
        if (used == 0) wait_for_producers();
#pragma unroll
        for (int s = 0; s < S - 2; s++) stage(s);
        for (int b0 = 0; b0 < nsteps; b0 += PF + 1) {
#pragma unroll
            for (int u = 0; u <= PF; u++) {
                const int i = b0 + u;
                if (i < nsteps) {
                    // Every warp has issued step i - 1's four groups, so (GROUPS - 1 <= 3 in flight)
                    // step i - 2's wgmmas are done and its slot can be refilled.
                    __syncthreads();
                    stage(i + S - 2);
                    await_frag<1, 4>(buf[u]);
                    if (i + PF < nsteps) load(buf[(u + PF) % (PF + 1)], i + PF);  // step i - 1's slot
                    const int slot = used + i;
                    mbar_wait(bar0 + 8 * (slot % S), (slot / S) & 1);
                    compute(buf[u], i);
                }
            }
        }
        wgmma::wait<0>();
        pin(acc);
        if (in_cluster)  // (one segment a block: the slots' memory is free for the sums)
            finish_in_cluster<T, MT, WR, BlockSync>(acc, reinterpret_cast<float*>(smem_raw + (s0 - raw0)), w.y, M, N,
                                                    pos);
        else
            finish<T, MT, 1, WR, 1>(acc, s_red, last, w.y, w.partial, counters, M, N, pos);
        used += nsteps;
        cur += nsteps;
    }
}

}  // namespace qwg

// Block shapes: activation rows per block BN, activation slots S, weight steps in flight PF
// (qwgmma.rs Shape). n64: up to 64 rows; n128: past 64 (blocks of 128 rows).
#define QWG_CFG_n64 64, 8, 6
#define QWG_CFG_n128 128, 4, 6

// wgmma exists on sm_90a only (qwgmma.rs `supports` routes nothing here elsewhere).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || !defined(__CUDA_ARCH__)
#define QWG_BODY(...) __VA_ARGS__
#else
#define QWG_BODY(...) __trap()
#endif

// qwg_permute_*: x [M, K] -> xp [Kp / 128][2][Mp][64] (qwg::permute). Arguments: x, xp, M, K, Kp, Mp.
#define QWG_PERMUTE(TN, T)                                                                           \
    extern "C" __global__ void qwg_permute_##TN(const T* __restrict__ x, T* __restrict__ xp, int M, int K, \
                                                int Kp, int Mp) {                                  \
        qwg::permute<T>(x, xp, M, K, Kp, Mp);                                                      \
    }
// qwg_*: one weight, or up to three sharing x and their format (q/k/v, gate/up), their tiles end
// to end (qwg::part_at). Arguments: the first weight's QARGS (DeviceLayout::push_kernel_args),
// then xp, Mp, its y, the launch's partial sums, the counters (one per tile of the launch), M,
// its N, K, K steps per block, in_cluster (1: each tile's equal splits are the blocks of one
// cluster, summed in shared memory), partial-sum slots per tile, the launch's tiles, and the
// other weights (QGroup, common.cuh; b1 = b2 = tiles for one weight); grid (blocks); dynamic
// shared memory S * BN * 256 + 1024 (qwgmma.rs Shape::shared_bytes).
#define QWG(KN, LUTK, TN, T, C)                                                                      \
    extern "C" __global__ void __launch_bounds__(qwg::THREADS, 1)                                  \
        qwg_##KN##_##TN##_##C(const uint32_t* codes, const float* scales, const float* zeros,      \
                              const float* lut, int wpr, int gsize, int groups, int /* round_mode */, \
                              const T* __restrict__ xp, int Mp, T* __restrict__ y, float* partial, \
                              unsigned* counters, int M, int N, int K, int per_block, int in_cluster, \
                              int slots, int tiles, const QGroup grp) {                           \
        QWG_BODY(qwg::run<T, LUTK, QWG_CFG_##C>(qwg::Part<T>{codes, scales, zeros, y, partial, N, 0}, lut, wpr, \
                                                gsize, groups, xp, Mp, counters, M, K, per_block,    \
                                                in_cluster != 0, slots, tiles, grp));               \
    }
#define QWG_ALL(TN, T)                                                                               \
    QWG_PERMUTE(TN, T)                                                                               \
    QWG(a4, false, TN, T, n64) QWG(a4, false, TN, T, n128) QWG(t4, true, TN, T, n64) QWG(t4, true, TN, T, n128)
QWG_ALL(bf16, __nv_bfloat16)
QWG_ALL(f16, __half)
