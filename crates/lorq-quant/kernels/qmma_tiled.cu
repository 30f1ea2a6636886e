// qmmat_*: y[M, N] = x[M, K] . W^T on tensor cores for 4-bit weights in the packed GPU layout
// (crates/lorq-quant/src/gpu_layout.rs; the same buffers the GEMV of qgemv.cu reads), bf16/f16
// activations, f32 accumulation, M rows in blocks of up to 64. Groups must be a multiple of 32.
//
// The weight is the mma's A operand (16 output rows x 16 k), the activations its B operand (16 k x
// 8 activation rows), so M = 2..8 wastes no tensor-core rows on padding.
// - Block: 4 warps, 128 output rows (32 per warp: two m16 tiles), up to 64 activation rows (MT n8
//   tiles), a K range of whole 128-wide steps; several blocks split K when the row blocks alone
//   do not fill the GPU, and the last one to finish a tile adds the others' f32 partial sums.
// - Each step's weight tile (128 rows x 64 bytes), activation tile (8*MT rows x 256 bytes) and
//   per-(row, chunk) scales/zeros land in shared memory through a STAGES-deep cp.async pipeline, so
//   every global read is a coalesced 16-byte piece read once per block.
// - K order inside an mma is free as long as A and B agree: lane t of a quad takes the whole
//   32-weight chunk t of the step (one 16-byte shared load per row), and its bf16x2/f16x2 pairs are
//   codes (j, j+4) of a 32-bit word — what one mask with the 2^7 (bf16) / 2^10 (f16) magic
//   exponent yields — so the activations are paired the same way ((x_j, x_j+4), one PRMT each).
// - Affine codes: (q - z) * s in half precision (q exact via the magic number, one HSUB2 + one
//   HFMA2 per pair); table codes (NF4/FP4): the 16-entry table as bytes in registers, looked up
//   with PRMT four codes at a time, times s (HMUL2). Error: a few 2^-9 relative per weight in bf16.
#include "common.cuh"

namespace qmmat {

constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr int ROWS = WARPS * 32;   // output rows per block
constexpr int KSTEP = 128;         // k per pipeline step (4 chunks of 32)
constexpr int STAGES = 4;

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
    uint32_t r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; zero-filled when !valid (src must still be a mapped address).
__device__ __forceinline__ void cp16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp4(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <typename T> struct Half;
template <> struct Half<__nv_bfloat16> {
    static constexpr uint32_t MAGIC = 0x43004300u;  // bf16x2 (128, 128): 128 + q for q < 128 exact
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
    static __device__ __forceinline__ uint16_t bits(float v) {
        __nv_bfloat16 h = __float2bfloat16_rn(v);
        return *reinterpret_cast<uint16_t*>(&h);
    }
    static __device__ __forceinline__ uint32_t sub(uint32_t a, uint32_t b) {
        __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
        return *reinterpret_cast<uint32_t*>(&r);
    }
    static __device__ __forceinline__ uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
        __nv_bfloat162 r = __hfma2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b),
                                   *reinterpret_cast<__nv_bfloat162*>(&c));
        return *reinterpret_cast<uint32_t*>(&r);
    }
    static __device__ __forceinline__ uint32_t mul(uint32_t a, uint32_t b) {
        __nv_bfloat162 r = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
        return *reinterpret_cast<uint32_t*>(&r);
    }
    static __device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
};
template <> struct Half<__half> {
    static constexpr uint32_t MAGIC = 0x64006400u;  // f16x2 (1024, 1024): 1024 + q exact
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
    static __device__ __forceinline__ uint16_t bits(float v) {
        __half h = __float2half_rn(v);
        return *reinterpret_cast<uint16_t*>(&h);
    }
    static __device__ __forceinline__ uint32_t sub(uint32_t a, uint32_t b) {
        __half2 r = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
        return *reinterpret_cast<uint32_t*>(&r);
    }
    static __device__ __forceinline__ uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
        __half2 r = __hfma2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b),
                            *reinterpret_cast<__half2*>(&c));
        return *reinterpret_cast<uint32_t*>(&r);
    }
    static __device__ __forceinline__ uint32_t mul(uint32_t a, uint32_t b) {
        __half2 r = __hmul2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
        return *reinterpret_cast<uint32_t*>(&r);
    }
    static __device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
};

// Four table entries (half-precision bit patterns) for the four 4-bit codes in sel's low 16 bits,
// one per byte: low bytes from tlo, high bytes from thi (entry e in byte e%4 of register e/4).
__device__ __forceinline__ void lookup4(uint32_t sel, const uint32_t (&tlo)[4], const uint32_t (&thi)[4],
                                        uint32_t& lo, uint32_t& hi) {
    const uint32_t idx = sel & 0x7777u;                        // entry within its half-table
    const uint32_t pick = ((sel >> 1) & 0x4444u) | 0x3210u;    // byte i from the upper half-table?
    lo = prmt(prmt(tlo[0], tlo[1], idx), prmt(tlo[2], tlo[3], idx), pick);
    hi = prmt(prmt(thi[0], thi[1], idx), prmt(thi[2], thi[3], idx), pick);
}

// The 4 pairs (codes j, j+4), j = 0..3, of word w, unscaled: affine q exactly, table lut[q].
template <typename T, bool LUTK>
__device__ __forceinline__ void decode_word(uint32_t w, const uint32_t (&tlo)[4], const uint32_t (&thi)[4],
                                            uint32_t (&p)[4]) {
    if constexpr (LUTK) {
        uint32_t lo, hi;
        lookup4(prmt(w, 0u, 0x4420u), tlo, thi, lo, hi);  // codes 0, 1, 4, 5
        p[0] = prmt(lo, hi, 0x6240u);                      // (0, 4)
        p[1] = prmt(lo, hi, 0x7351u);                      // (1, 5)
        lookup4(prmt(w, 0u, 0x4431u), tlo, thi, lo, hi);  // codes 2, 3, 6, 7
        p[2] = prmt(lo, hi, 0x6240u);
        p[3] = prmt(lo, hi, 0x7351u);
    } else {
#pragma unroll
        for (int j = 0; j < 4; j++)
            p[j] = Half<T>::sub(((w >> (4 * j)) & 0x000F000Fu) | Half<T>::MAGIC, Half<T>::MAGIC);
    }
}

// Shared memory of one pipeline stage.
template <int MT, bool LUTK> struct Stage {
    uint4 w[ROWS][4];          // 128 rows x 4 chunks (16 bytes each)
    uint4 x[8 * MT][16];       // activation rows x 16 pieces of 8 (swizzled, see xpiece)
    float s[ROWS][4];          // scale of (row, chunk)
    float z[LUTK ? 1 : ROWS][4];
};

// Piece u (8 activations) of activation row r is stored at xpiece(r, u): lane (g, t) reads piece
// 4t + i of row g, and this keeps each quarter-warp's 8 reads in 8 distinct 16-byte bank groups.
__device__ __forceinline__ int xpiece(int r, int u) { return u ^ (((u >> 3) & 1) << 1) ^ (r & 1); }

template <typename T, bool LUTK, int MT>
__device__ __forceinline__ void run(const uint32_t* __restrict__ codes, const float* __restrict__ scales,
                                    const float* __restrict__ zeros, const float* __restrict__ lut, int wpr,
                                    int gsize, int groups, const T* __restrict__ x, T* __restrict__ y,
                                    float* __restrict__ partial, unsigned* __restrict__ counters, int M,
                                    int N, int K, int steps_per_split) {
    using St = Stage<MT, LUTK>;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    St* stages = reinterpret_cast<St*>(smem_raw);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int nb = blockIdx.x * ROWS;
    const int mb = blockIdx.z * (8 * MT);
    const int splits = gridDim.y;
    const int steps = (K + KSTEP - 1) / KSTEP;
    const int st0 = blockIdx.y * steps_per_split;
    const int nst = max(0, min(steps, st0 + steps_per_split) - st0);
    const int chunks = K >> 5;

    uint32_t tlo[4] = {0, 0, 0, 0}, thi[4] = {0, 0, 0, 0};
    if constexpr (LUTK) {
#pragma unroll
        for (int e = 0; e < 16; e++) {
            const uint32_t b = Half<T>::bits(__ldg(lut + e));
            tlo[e >> 2] |= (b & 0xFFu) << (8 * (e & 3));
            thi[e >> 2] |= (b >> 8) << (8 * (e & 3));
        }
    }

    auto load = [&](int buf, int st) {
        St& S = stages[buf];
        const int c0 = st * (KSTEP / 32);
#pragma unroll
        for (int r = 0; r < ROWS * 4 / THREADS; r++) {
            const int id = tid + r * THREADS, row = id >> 2, ch = id & 3;
            const int n = min(nb + row, N - 1), c = c0 + ch;
            const bool ok = c < chunks;
            cp16(&S.w[row][ch], codes + (size_t)n * wpr + (size_t)(ok ? c : 0) * 4, ok);
            const int gi = (min(c, chunks - 1) * 32) / gsize;
            cp4(&S.s[row][ch], scales + (size_t)n * groups + gi);
            if constexpr (!LUTK) cp4(&S.z[row][ch], zeros + (size_t)n * groups + gi);
        }
#pragma unroll
        for (int r = 0; r < MT; r++) {
            const int id = tid + r * THREADS, row = id >> 4, u = id & 15;
            const int m = mb + row, k = st * KSTEP + 8 * u;
            const bool ok = m < M && k < K;
            cp16(&S.x[row][xpiece(row, u)], x + (ok ? (size_t)m * K + k : 0), ok);
        }
    };

    float acc[2][MT][4];
#pragma unroll
    for (int a = 0; a < 2; a++)
#pragma unroll
        for (int b = 0; b < MT; b++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[a][b][c] = 0.f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < nst) load(s, st0 + s);
        cp_commit();
    }
    for (int it = 0; it < nst; it++) {
        cp_wait<STAGES - 2>();
        __syncthreads();
        if (it + STAGES - 1 < nst) load((it + STAGES - 1) % STAGES, st0 + it + STAGES - 1);
        cp_commit();
        const St& S = stages[it % STAGES];
        // This lane's chunk t of rows g, g+8 of both m16 tiles, with their scales.
        uint4 wv[2][2];
        uint32_t s2[2][2], zs2[2][2];
#pragma unroll
        for (int wt = 0; wt < 2; wt++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int row = warp * 32 + wt * 16 + h * 8 + g;
                wv[wt][h] = S.w[row][t];
                const float s = S.s[row][t];
                s2[wt][h] = Half<T>::pack(s, s);
                if constexpr (!LUTK) {
                    const float zs = -S.z[row][t] * s;
                    zs2[wt][h] = Half<T>::pack(zs, zs);
                }
            }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            // Word i of this lane's chunk, every row: 16 scaled pairs, live across the n8 tiles.
            uint32_t p[2][2][4];
#pragma unroll
            for (int wt = 0; wt < 2; wt++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const uint4 v = wv[wt][h];
                    const uint32_t w = i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
                    decode_word<T, LUTK>(w, tlo, thi, p[wt][h]);
#pragma unroll
                    for (int j = 0; j < 4; j++)
                        p[wt][h][j] = LUTK ? Half<T>::mul(p[wt][h][j], s2[wt][h])
                                           : Half<T>::fma(p[wt][h][j], s2[wt][h], zs2[wt][h]);
                }
            // Activations k = 32t + 8i + (0..7) of one n8 tile at a time, paired (j, j+4).
#pragma unroll
            for (int nt = 0; nt < MT; nt++) {
                const int r = nt * 8 + g;
                const uint4 v = S.x[r][xpiece(r, 4 * t + i)];
                const uint32_t xb[4] = {prmt(v.x, v.z, 0x5410u), prmt(v.x, v.z, 0x7632u),
                                        prmt(v.y, v.w, 0x5410u), prmt(v.y, v.w, 0x7632u)};
#pragma unroll
                for (int j2 = 0; j2 < 2; j2++)
#pragma unroll
                    for (int wt = 0; wt < 2; wt++)
                        Half<T>::mma(acc[wt][nt], p[wt][0][2 * j2], p[wt][1][2 * j2], p[wt][0][2 * j2 + 1],
                                     p[wt][1][2 * j2 + 1], xb[2 * j2], xb[2 * j2 + 1]);
            }
        }
    }

    // d0, d1: output row g, activation rows 2t, 2t+1; d2, d3: output row g + 8.
    if (splits == 1) {
#pragma unroll
        for (int wt = 0; wt < 2; wt++)
#pragma unroll
            for (int nt = 0; nt < MT; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int n = nb + warp * 32 + wt * 16 + g + (e >= 2 ? 8 : 0);
                    const int m = mb + nt * 8 + 2 * t + (e & 1);
                    if (n < N && m < M) y[(size_t)m * N + n] = from_f<T>(acc[wt][nt][e]);
                }
        return;
    }
    // Split K: partial[split][m][n] in f32; the last block of this tile adds them up.
    float* part = partial + (size_t)blockIdx.y * M * N;
#pragma unroll
    for (int wt = 0; wt < 2; wt++)
#pragma unroll
        for (int nt = 0; nt < MT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int n = nb + warp * 32 + wt * 16 + g + (e >= 2 ? 8 : 0);
                const int m = mb + nt * 8 + 2 * t + (e & 1);
                if (n < N && m < M) __stcg(part + (size_t)m * N + n, acc[wt][nt][e]);
            }
    __threadfence();
    __syncthreads();
    __shared__ bool last;
    unsigned* counter = counters + blockIdx.z * gridDim.x + blockIdx.x;
    if (tid == 0) last = atomicAdd(counter, 1u) == (unsigned)(splits - 1);
    __syncthreads();
    if (!last) return;
    __threadfence();
    const int n = nb + tid;  // ROWS == THREADS: one output row per thread, coalesced over n
    if (n < N) {
        for (int m = mb; m < min(M, mb + 8 * MT); m++) {
            float v = 0.f;
            for (int sp = 0; sp < splits; sp++) v += __ldcg(partial + ((size_t)sp * M + m) * N + n);
            y[(size_t)m * N + n] = from_f<T>(v);
        }
    }
    if (tid == 0) *counter = 0u;  // ready for the next launch on this stream
}

}  // namespace qmmat

// Arguments: qgemv.cu's QARGS (DeviceLayout::push_args), then x, y, partial, counters, M, N, K,
// steps per split. Shared memory per block: STAGES * sizeof(Stage) (qmma_tiled.rs computes the same).
#define QMMAT(KN, LUTK, TN, T, MT)                                                                 \
    extern "C" __global__ void __launch_bounds__(qmmat::THREADS)                                   \
        qmmat_##KN##_##TN##_t##MT(const uint32_t* codes, const float* scales, const float* zeros,  \
                                  const float* lut, int wpr, int gsize, int groups,               \
                                  int /* round_mode: f32 only */, const T* __restrict__ x, T* __restrict__ y, float* partial,     \
                                  unsigned* counters, int M, int N, int K, int steps_per_split) { \
        qmmat::run<T, LUTK, MT>(codes, scales, zeros, lut, wpr, gsize, groups, x, y, partial,     \
                                counters, M, N, K, steps_per_split);                               \
    }
#define QMMAT_MT(KN, LUTK, TN, T)                                                                  \
    QMMAT(KN, LUTK, TN, T, 1) QMMAT(KN, LUTK, TN, T, 2) QMMAT(KN, LUTK, TN, T, 4)                  \
        QMMAT(KN, LUTK, TN, T, 8)
QMMAT_MT(a4, false, bf16, __nv_bfloat16)
QMMAT_MT(a4, false, f16, __half)
QMMAT_MT(t4, true, bf16, __nv_bfloat16)
QMMAT_MT(t4, true, f16, __half)
