// Attention over a paged KV cache (the model code is in crates/lorq-model; the CPU `attend` there is
// the reference, tests in crates/lorq-model/tests/cuda_decode.rs).
//
// Cache layout, one K and one V tensor per decoder layer: [num_blocks, kv_heads, BS, HD], so a
// token's HD values of one KV head are contiguous. A sequence owns a list of blocks (its block
// table, one row of `block_tables [seqs, max_blocks]`); token t of it sits in block
// table[t / BS] at offset t % BS. Physical "slot" = block * BS + offset.
//
// Every new token of the batch is a "row": row_pos[r] is its position in its sequence,
// row_seq[r] the sequence (block-table row), row_slot[r] the slot its key/value go to.
//
// - rope_append_*: RoPE (rotate-half, transformers' Llama) on q and k of every row and the append
//   of k, v into the pages, all rows of the batch in one launch (grid.x: rows, grid.y: blocks
//   sharing a row's (heads + 2 kv_heads) * hd / 2 rotations).
// - paged_attn_*: causal (optionally sliding-window) attention of every row's query heads over
//   the keys 0..=pos of its sequence; a prefill chunk is many rows of one sequence, a decode step
//   one row per sequence, both in one launch. Block = (row, KV head, up to 8 query heads of its
//   GQA group, one partition of <= 256 keys): the group's queries share every K/V load. Scores of
//   the partition go to shared memory (pass 1 over K), then exp2 with the partition's max, then
//   pass 2 over V with f32 accumulation. With several partitions (split-K for long contexts or
//   few rows) each writes its (max, sum, unnormalized output) and paged_attn_combine_* merges
//   them (the online-softmax merge). Lanes: HD/8 lanes per key (16-byte loads), 32/(HD/8) keys
//   per warp at a time.
#include "common.cuh"

constexpr int NW = 4;          // warps per attention block
constexpr int GMAX = 8;        // query heads per block
constexpr int PMAX = 256;      // keys per partition (shared-memory scores)

template <typename T>
__device__ __forceinline__ void rope_append(const T* __restrict__ q, const T* __restrict__ k,
                                            const T* __restrict__ v, const T* __restrict__ cos_t,
                                            const T* __restrict__ sin_t,
                                            const int* __restrict__ row_pos,
                                            const int* __restrict__ row_slot, T* __restrict__ q_out,
                                            T* __restrict__ k_cache, T* __restrict__ v_cache,
                                            int heads, int kv_heads, int hd, int bs) {
    const int r = blockIdx.x;
    const int half = hd >> 1;
    const int pos = row_pos[r];
    const int slot = row_slot[r];
    const size_t blk = slot / bs, off = slot % bs;
    const T* c = cos_t + (size_t)pos * half;
    const T* s = sin_t + (size_t)pos * half;
    const int total = (heads + 2 * kv_heads) * half;
    // grid.y blocks share a row's rotations (one block alone took ~6.5 us at batch 1).
    for (int idx = blockIdx.y * blockDim.x + threadIdx.x; idx < total; idx += blockDim.x * gridDim.y) {
        const int j = idx / half, i = idx % half;
        if (j < heads) {
            const size_t base = ((size_t)r * heads + j) * hd;
            const float a = to_f(q[base + i]), b = to_f(q[base + i + half]);
            const float cc = to_f(c[i]), ss = to_f(s[i]);
            q_out[base + i] = from_f<T>(a * cc - b * ss);
            q_out[base + i + half] = from_f<T>(b * cc + a * ss);
        } else if (j < heads + kv_heads) {
            const int h = j - heads;
            const size_t src = ((size_t)r * kv_heads + h) * hd;
            const size_t dst = ((blk * kv_heads + h) * bs + off) * hd;
            const float a = to_f(k[src + i]), b = to_f(k[src + i + half]);
            const float cc = to_f(c[i]), ss = to_f(s[i]);
            k_cache[dst + i] = from_f<T>(a * cc - b * ss);
            k_cache[dst + i + half] = from_f<T>(b * cc + a * ss);
        } else {
            const int h = j - heads - kv_heads;
            const size_t src = ((size_t)r * kv_heads + h) * hd;
            const size_t dst = ((blk * kv_heads + h) * bs + off) * hd;
            v_cache[dst + i] = v[src + i];
            v_cache[dst + i + half] = v[src + i + half];
        }
    }
}

#define ROPE_APPEND(NAME, T)                                                                      \
    extern "C" __global__ void NAME(const T* q, const T* k, const T* v, const T* cos_t,           \
                                    const T* sin_t, const int* row_pos, const int* row_slot,      \
                                    T* q_out, T* k_cache, T* v_cache, int heads, int kv_heads,    \
                                    int hd, int bs) {                                             \
        rope_append<T>(q, k, v, cos_t, sin_t, row_pos, row_slot, q_out, k_cache, v_cache, heads,  \
                       kv_heads, hd, bs);                                                         \
    }
ROPE_APPEND(rope_append_f32, float)
ROPE_APPEND(rope_append_bf16, __nv_bfloat16)
ROPE_APPEND(rope_append_f16, __half)

struct AttnArgs {
    const int* row_pos;
    const int* row_seq;
    const int* block_tables;
    int max_blocks;
    int heads;
    int kv_heads;
    int bs;
    int window;      // 0: none
    int part_len;    // keys per partition (<= PMAX)
    int num_parts;
    float scale_log2;  // softmax scale * log2(e)
};

// Grid: (kv_heads * chunks, rows, num_parts), chunks = ceil(group / GMAX); NW warps.
template <typename T, int HD>
__device__ __forceinline__ void paged_attn(const T* __restrict__ q, const T* __restrict__ kc,
                                           const T* __restrict__ vc, T* __restrict__ out,
                                           float* __restrict__ part_ml,
                                           float* __restrict__ part_acc, const AttnArgs a) {
    constexpr int LPT = HD / 8;    // lanes per key
    constexpr int TPW = 32 / LPT;  // keys per warp step
    __shared__ float s_p[GMAX][PMAX];
    __shared__ float s_acc[NW][GMAX][HD];
    __shared__ float s_max[GMAX], s_sum[GMAX];

    const int group = a.heads / a.kv_heads;
    const int chunks = (group + GMAX - 1) / GMAX;
    const int kvh = blockIdx.x / chunks;
    const int g0 = (blockIdx.x % chunks) * GMAX;
    const int G = min(GMAX, group - g0);
    const int r = blockIdx.y, part = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane / LPT, dl = lane % LPT;

    const int ctx = a.row_pos[r] + 1;
    const int lo = a.window > 0 ? max(0, ctx - a.window) : 0;
    const int start = lo + part * a.part_len;
    const int end = min(ctx, start + a.part_len);
    const int head0 = kvh * group + g0;
    if (start >= end) {
        // An empty partition (this row's context is shorter than the longest one).
        if (threadIdx.x < G) {
            const size_t pi = ((size_t)r * a.heads + head0 + threadIdx.x) * a.num_parts + part;
            part_ml[2 * pi] = -INFINITY;
            part_ml[2 * pi + 1] = 0.f;
        }
        return;
    }
    const int n = end - start;
    const int* table = a.block_tables + (size_t)a.row_seq[r] * a.max_blocks;

    float qf[GMAX][8];
#pragma unroll
    for (int g = 0; g < GMAX; g++) {
        if (g < G) {
            const T* qp = q + ((size_t)r * a.heads + head0 + g) * HD + dl * 8;
#pragma unroll
            for (int i = 0; i < 8; i++) qf[g][i] = to_f(qp[i]) * a.scale_log2;
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) qf[g][i] = 0.f;
        }
    }

    // Pass 1: scores (log2 domain) of the partition's keys.
    for (int t0 = warp * TPW; t0 < n; t0 += NW * TPW) {
        const int t = t0 + sub;
        const bool valid = t < n;
        float kf[8];
        if (valid) {
            const int tok = start + t;
            const size_t blk = table[tok / a.bs];
            load8<T>(kc + ((blk * a.kv_heads + kvh) * a.bs + tok % a.bs) * HD + dl * 8, kf);
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) kf[i] = 0.f;
        }
#pragma unroll
        for (int g = 0; g < GMAX; g++) {
            if (g < G) {
                float d = 0.f;
#pragma unroll
                for (int i = 0; i < 8; i++) d = fmaf(qf[g][i], kf[i], d);
#pragma unroll
                for (int o = LPT / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                if (valid && dl == 0) s_p[g][t] = d;
            }
        }
    }
    __syncthreads();
    // Partition max and exp2; one warp per head.
    for (int g = warp; g < G; g += NW) {
        float m = -INFINITY;
        for (int t = lane; t < n; t += 32) m = fmaxf(m, s_p[g][t]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        float l = 0.f;
        for (int t = lane; t < n; t += 32) {
            const float p = exp2f(s_p[g][t] - m);
            s_p[g][t] = p;
            l += p;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
        if (lane == 0) {
            s_max[g] = m;
            s_sum[g] = l;
        }
    }
    __syncthreads();
    // Pass 2: probabilities · V, f32.
    float acc[GMAX][8];
#pragma unroll
    for (int g = 0; g < GMAX; g++)
#pragma unroll
        for (int i = 0; i < 8; i++) acc[g][i] = 0.f;
    for (int t0 = warp * TPW; t0 < n; t0 += NW * TPW) {
        const int t = t0 + sub;
        if (t < n) {
            const int tok = start + t;
            const size_t blk = table[tok / a.bs];
            float vf[8];
            load8<T>(vc + ((blk * a.kv_heads + kvh) * a.bs + tok % a.bs) * HD + dl * 8, vf);
#pragma unroll
            for (int g = 0; g < GMAX; g++) {
                if (g < G) {
                    const float p = s_p[g][t];
#pragma unroll
                    for (int i = 0; i < 8; i++) acc[g][i] = fmaf(p, vf[i], acc[g][i]);
                }
            }
        }
    }
    // Sum the warp's key slots (lanes with the same dl), then the warps.
#pragma unroll
    for (int g = 0; g < GMAX; g++) {
        if (g < G) {
#pragma unroll
            for (int i = 0; i < 8; i++) {
#pragma unroll
                for (int o = LPT; o < 32; o <<= 1)
                    acc[g][i] += __shfl_xor_sync(0xffffffffu, acc[g][i], o);
                if (sub == 0) s_acc[warp][g][dl * 8 + i] = acc[g][i];
            }
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < G * HD; idx += NW * 32) {
        const int g = idx / HD, d = idx % HD;
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < NW; w++) v += s_acc[w][g][d];
        const int h = head0 + g;
        if (a.num_parts == 1) {
            out[((size_t)r * a.heads + h) * HD + d] = from_f<T>(v / s_sum[g]);
        } else {
            const size_t pi = ((size_t)r * a.heads + h) * a.num_parts + part;
            part_acc[pi * HD + d] = v;
            if (d == 0) {
                part_ml[2 * pi] = s_max[g];
                part_ml[2 * pi + 1] = s_sum[g];
            }
        }
    }
}

// Grid: (heads, rows); HD threads. Merges the partitions of one (row, head).
template <typename T>
__device__ __forceinline__ void paged_attn_combine(const float* __restrict__ part_ml,
                                                   const float* __restrict__ part_acc,
                                                   T* __restrict__ out, int heads, int num_parts,
                                                   int hd) {
    const int h = blockIdx.x, r = blockIdx.y, d = threadIdx.x;
    const size_t base = ((size_t)r * heads + h) * num_parts;
    float m = -INFINITY;
    for (int p = 0; p < num_parts; p++) m = fmaxf(m, part_ml[2 * (base + p)]);
    float l = 0.f, v = 0.f;
    for (int p = 0; p < num_parts; p++) {
        const float pm = part_ml[2 * (base + p)];
        if (pm == -INFINITY) continue;
        const float w = exp2f(pm - m);
        l += part_ml[2 * (base + p) + 1] * w;
        v += part_acc[(base + p) * hd + d] * w;
    }
    out[((size_t)r * heads + h) * hd + d] = from_f<T>(v / l);
}

#define PAGED_ATTN(T, TN, HD)                                                                     \
    extern "C" __global__ void __launch_bounds__(NW * 32)                                        \
        paged_attn_##TN##_hd##HD(const T* q, const T* kc, const T* vc, T* out, float* part_ml,   \
                                 float* part_acc, const int* row_pos, const int* row_seq,         \
                                 const int* block_tables, int max_blocks, int heads,              \
                                 int kv_heads, int bs, int window, int part_len, int num_parts,   \
                                 float scale_log2) {                                              \
        const AttnArgs a{row_pos, row_seq,  block_tables, max_blocks, heads,     kv_heads,        \
                         bs,      window,   part_len,     num_parts,  scale_log2};                \
        paged_attn<T, HD>(q, kc, vc, out, part_ml, part_acc, a);                                 \
    }
#define PAGED_ATTN_ALL(T, TN)                                                                     \
    PAGED_ATTN(T, TN, 64)                                                                         \
    PAGED_ATTN(T, TN, 128)                                                                        \
    PAGED_ATTN(T, TN, 256)                                                                        \
    extern "C" __global__ void paged_attn_combine_##TN(const float* part_ml, const float* part_acc, \
                                                       T* out, int heads, int num_parts, int hd) { \
        paged_attn_combine<T>(part_ml, part_acc, out, heads, num_parts, hd);                     \
    }
PAGED_ATTN_ALL(float, f32)
PAGED_ATTN_ALL(__nv_bfloat16, bf16)
PAGED_ATTN_ALL(__half, f16)
