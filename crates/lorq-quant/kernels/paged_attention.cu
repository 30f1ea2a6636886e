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
// - paged_attn_*_mma (16-bit caches, the default for them): the same blocks, partitions and
//   merge on tensor cores. The partition's keys and then its values stream through a
//   shared-memory ring of STAGES rounds filled with cp.async (up to STAGES - 1 rounds, 24 KB, in
//   flight a block; the values' first rounds load during the softmax); scores S^T = K Q^T and
//   outputs O^T = V^T P^T are m16n8k16 mmas (16 keys or 16 dimensions x the block's 8 heads) from
//   ldmatrix fragments, f32 sums; the probabilities enter the second mma rounded to bf16/f16, as
//   in FlashAttention. The FMA kernels issue many times the instructions (the lanes' dot products and
//   their shuffle sums) and stayed at ~1.4 TB/s at batch 32 whatever the loads in flight.
#include "common.cuh"

constexpr int NW = 4;          // warps per attention block
constexpr int GMAX = 8;        // query heads per block
constexpr int PMAX = 256;      // keys per partition (shared-memory scores)
// Blocks per SM the 4-head kernels are compiled for (_g4 below): 80 registers for 16-bit caches
// (no spills; 6 x 128 threads), f32 caches hold twice the bytes per load (3 blocks, no spills).
#define G4_BLOCKS(T) (sizeof(T) == 2 ? 6 : 3)
constexpr int KS = 4;      // warp steps per round of keys (every lane loads 16 bytes a step)
constexpr int STAGES = 4;  // rounds of the tensor-core kernels' ring (8 KB each)

// The rotate-half RoPE of the pair (a, b) = (x[i], x[i + hd/2]) at angle (cos, sin), with explicit
// FMAs so that rope_append and the attention's own RoPE (decode) round identically.
__device__ __forceinline__ float2 rope_pair(float a, float b, float cc, float ss) {
    return make_float2(fmaf(a, cc, -b * ss), fmaf(b, cc, a * ss));
}

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
            const float2 o = rope_pair(to_f(q[base + i]), to_f(q[base + i + half]), to_f(c[i]), to_f(s[i]));
            q_out[base + i] = from_f<T>(o.x);
            q_out[base + i + half] = from_f<T>(o.y);
        } else if (j < heads + kv_heads) {
            const int h = j - heads;
            const size_t src = ((size_t)r * kv_heads + h) * hd;
            const size_t dst = ((blk * kv_heads + h) * bs + off) * hd;
            const float2 o = rope_pair(to_f(k[src + i]), to_f(k[src + i + half]), to_f(c[i]), to_f(s[i]));
            k_cache[dst + i] = from_f<T>(o.x);
            k_cache[dst + i + half] = from_f<T>(o.y);
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

constexpr int MERGE_MAX = GMAX * PMAX;  // (head, partition) weights one merge holds in shared memory

// The online-softmax merge of the partitions of heads head0 .. head0 + G - 1 of row r, by the
// whole block: partition p of head h has (max, sum) at part_ml[2 (b + p)] and its unnormalized
// output at part_acc[(b + p) hd ..], b = (r heads + h) num_parts. Only partitions 0 .. used - 1
// are read: the later ones are empty for this row (a graph's launch has as many partitions as its
// context capacity, up to twice the row's context); an empty one among them (max -inf) gets weight
// 0 and its output, never written, is not read into v. One warp per head loads the partitions'
// (max, sum) pairs once (in registers up to 32 * MLR partitions), finds the max and writes every
// partition's weight to s_w (G * num_parts <= MERGE_MAX, checked by the host) and the head's sum
// to s_l; then each thread sums the weighted outputs of up to J elements, U partitions' loads in
// flight at once, in partition order (the sum is the same for every launch shape). L2 loads
// (__ldcg): in the fused combine other blocks wrote the partials during this launch.
template <typename T>
__device__ __forceinline__ void merge_block(const float* __restrict__ part_ml,
                                            const float* __restrict__ part_acc,
                                            T* __restrict__ out, int r, int heads, int head0,
                                            int G, int num_parts, int used, int hd, float* s_w,
                                            float* s_l) {
    constexpr int MLR = 4;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int g = warp; g < G; g += nw) {
        const size_t b = ((size_t)r * heads + head0 + g) * num_parts;
        const float2* ml = reinterpret_cast<const float2*>(part_ml) + b;
        float m = -INFINITY, l = 0.f;
        if (used <= 32 * MLR) {
            float2 v[MLR];
#pragma unroll
            for (int i = 0; i < MLR; i++) {
                const int p = lane + 32 * i;
                v[i] = p < used ? __ldcg(ml + p) : make_float2(-INFINITY, 0.f);
                m = fmaxf(m, v[i].x);
            }
            m = warp_max(m);
#pragma unroll
            for (int i = 0; i < MLR; i++) {
                const int p = lane + 32 * i;
                if (p < used) {
                    const float w = exp2f(v[i].x - m);
                    s_w[g * num_parts + p] = w;
                    l = fmaf(v[i].y, w, l);
                }
            }
        } else {
            for (int p = lane; p < used; p += 32) m = fmaxf(m, __ldcg(ml + p).x);
            m = warp_max(m);
            for (int p = lane; p < used; p += 32) {
                const float2 v = __ldcg(ml + p);
                const float w = exp2f(v.x - m);
                s_w[g * num_parts + p] = w;
                l = fmaf(v.y, w, l);
            }
        }
        l = warp_sum(l);
        if (lane == 0) s_l[g] = l;
    }
    __syncthreads();
    constexpr int J = 4;  // output elements per thread per pass
    constexpr int U = 8;  // partitions per round of loads
    for (int i0 = threadIdx.x; i0 < G * hd; i0 += J * blockDim.x) {
        float v[J];
        const float* src[J];
        const float* wts[J];
#pragma unroll
        for (int j = 0; j < J; j++) {
            v[j] = 0.f;
            const int idx = min(i0 + j * (int)blockDim.x, G * hd - 1);
            const int g = idx / hd, d = idx % hd;
            src[j] = part_acc + ((size_t)r * heads + head0 + g) * num_parts * hd + d;
            wts[j] = s_w + g * num_parts;
        }
        for (int p0 = 0; p0 < used; p0 += U) {
            float a[U][J];
#pragma unroll
            for (int u = 0; u < U; u++)
#pragma unroll
                for (int j = 0; j < J; j++)
                    a[u][j] = p0 + u < used ? __ldcg(src[j] + (size_t)(p0 + u) * hd) : 0.f;
#pragma unroll
            for (int u = 0; u < U; u++) {
                if (p0 + u < used) {
#pragma unroll
                    for (int j = 0; j < J; j++) {
                        const float w = wts[j][p0 + u];
                        v[j] = w > 0.f ? fmaf(a[u][j], w, v[j]) : v[j];
                    }
                }
            }
        }
#pragma unroll
        for (int j = 0; j < J; j++) {
            const int idx = i0 + j * blockDim.x;
            if (idx < G * hd) {
                const int g = idx / hd, d = idx % hd;
                out[((size_t)r * heads + head0 + g) * hd + d] = from_f<T>(v[j] / s_l[g]);
            }
        }
    }
}

// A decode step's RoPE and KV append done by the attention itself (paged_attn_rope_*): the
// un-rotated q, k, v of every row (one new token per sequence, at position ctx - 1), the RoPE
// tables and each row's slot.
template <typename T>
struct RopeNew {
    const T* k;
    const T* v;
    const T* cos_t;
    const T* sin_t;
    const int* row_slot;
};

// Grid: (kv_heads * chunks, rows, num_parts), chunks = ceil(group / GMAX); NW warps.
// ROPE (decode steps only): every block rotates its own query heads, and the block(s) whose
// partition holds the new token rotate its key and write key and value into the pages before
// reading the partition (L2 loads: pages written in this launch); the rounding is rope_append's.
// Keys go in rounds of KS warp steps (NW * TPW keys each): a round issues every block-table and
// key load first (and the value loads too when the whole partition is one round: the values then
// wait in registers through the softmax), so a block waits for memory about once per round
// instead of once per key step. With several partitions and `tickets` (zeroed u32, one per (row,
// grid.x block)), the last partition block of a (row, KV head chunk) to finish merges all the
// partitions itself (a ticket taken after a fence) and resets its ticket for the next launch;
// without tickets paged_attn_combine_* does it in a second launch.
template <typename T, int HD, bool ROPE, int GM, bool MMA>
__device__ __forceinline__ void paged_attn(const T* __restrict__ q, T* kc, T* vc,
                                           T* __restrict__ out, float* __restrict__ part_ml,
                                           float* __restrict__ part_acc,
                                           unsigned* __restrict__ tickets, const AttnArgs a,
                                           const RopeNew<T> rn) {
    constexpr int LPT = HD / 8;    // lanes per key
    constexpr int TPW = 32 / LPT;  // keys per warp step
    constexpr int ROUND = NW * TPW * KS;
    // MMA: the ring of rounds and the queries as bf16/f16 (8 heads, rows padded against bank
    // conflicts); else the warps' output sums s_acc (which hold the scaled queries first).
    static_assert(!MMA || sizeof(T) == 2, "tensor-core attention: 16-bit caches");
    constexpr int STAGE_ELEMS = ROUND * HD;  // T elements of one round of keys (or values)
    constexpr size_t BUF_BYTES = MMA ? sizeof(T) * STAGES * STAGE_ELEMS : sizeof(float) * NW * GM * HD;
    __shared__ float s_p[GM][PMAX];
    __shared__ __align__(16) unsigned char s_buf[BUF_BYTES];
    __shared__ __align__(16) T s_qh[MMA ? 8 : 1][MMA ? HD + 8 : 1];
    // MMA: the page row (block * kv_heads + kvh) * bs + offset of each partition key, looked up
    // once: the ring's copies of keys and then values read it instead of the block table.
    __shared__ unsigned s_rows[MMA ? PMAX : 1];
    float(*s_acc)[GM][HD] = reinterpret_cast<float(*)[GM][HD]>(s_buf);
    T* s_ring = reinterpret_cast<T*>(s_buf);
    __shared__ float s_max[GM], s_sum[GM];
    __shared__ int s_last;

    const int group = a.heads / a.kv_heads;
    const int chunks = (group + GM - 1) / GM;
    const int kvh = blockIdx.x / chunks;
    const int g0 = (blockIdx.x % chunks) * GM;
    const int G = min(GM, group - g0);
    const int r = blockIdx.y, part = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane / LPT, dl = lane % LPT;

    // The row's meta loads issued together (each later use would otherwise wait for the one
    // before it: position -> partition bounds -> sequence -> block table -> keys).
    const int ctx = a.row_pos[r] + 1;
    const int seq = a.row_seq[r];
    const int new_slot = ROPE ? rn.row_slot[r] : 0;
    const int lo = a.window > 0 ? max(0, ctx - a.window) : 0;
    const int start = lo + part * a.part_len;
    const int end = min(ctx, start + a.part_len);
    const int head0 = kvh * group + g0;
    const int n = end - start;
    // Block-uniform: an empty partition (this row's context is shorter than the longest one)
    // only reports itself and takes its ticket.
    if (n <= 0) {
        if (threadIdx.x < G) {
            const size_t pi = ((size_t)r * a.heads + head0 + threadIdx.x) * a.num_parts + part;
            part_ml[2 * pi] = -INFINITY;
            part_ml[2 * pi + 1] = 0.f;
        }
    } else {
        const int* table = a.block_tables + (size_t)seq * a.max_blocks;
        // Page row of partition key t (clamped into the partition: loads past its end read a
        // valid key whose result is dropped); a layer's cache holds fewer than 2^32 rows of HD.
        auto key_row = [&](int t) -> unsigned {
            const int tok = start + min(t, n - 1);
            return ((unsigned)table[tok / a.bs] * a.kv_heads + kvh) * a.bs + tok % a.bs;
        };
        // Element offset of partition key t's HD values.
        auto key_at = [&](int t) -> size_t { return (size_t)key_row(t) * HD; };

        constexpr int HALF = HD / 2;
        const int pos = ctx - 1;
        // Element e of a head vector x (HD elements at xp) rotated to position pos, rounded to T.
        auto rotated_at = [&](const T* xp, int e) -> float {
            const int j = e % HALF;
            const float cc = to_f(rn.cos_t[(size_t)pos * HALF + j]);
            const float ss = to_f(rn.sin_t[(size_t)pos * HALF + j]);
            const float2 v = rope_pair(to_f(xp[j]), to_f(xp[j + HALF]), cc, ss);
            return to_f(from_f<T>(e < HALF ? v.x : v.y));
        };
        // The new token's key and value, appended first by the block(s) whose partition holds it.
        auto append_new = [&]() {
            if constexpr (ROPE) {
                if (pos < end) {
                    const size_t at =
                        ((size_t)(new_slot / a.bs) * a.kv_heads + kvh) * a.bs + new_slot % a.bs;
                    if (threadIdx.x < LPT) {  // one key's lanes (dl = threadIdx.x)
                        float kf[8], vf[8];
#pragma unroll
                        for (int i = 0; i < 8; i++)
                            kf[i] = rotated_at(rn.k + ((size_t)r * a.kv_heads + kvh) * HD, dl * 8 + i);
                        load8<T>(rn.v + ((size_t)r * a.kv_heads + kvh) * HD + dl * 8, vf);
                        store8<T>(kc + at * HD + dl * 8, kf);
                        store8<T>(vc + at * HD + dl * 8, vf);
                    }
                    __syncthreads();
                }
            }
        };

        // Partition max and exp2 of the scores in s_p (log2 domain); one warp per head.
        auto softmax = [&]() {
            for (int g = warp; g < G; g += NW) {
                float m = -INFINITY;
                for (int t = lane; t < n; t += 32) m = fmaxf(m, s_p[g][t]);
                m = warp_max(m);
                float l = 0.f;
                for (int t = lane; t < n; t += 32) {
                    const float p = exp2f(s_p[g][t] - m);
                    s_p[g][t] = p;
                    l += p;
                }
                l = warp_sum(l);
                if (lane == 0) {
                    s_max[g] = m;
                    s_sum[g] = l;
                }
            }
        };
        // Element d of head g's unnormalized output: the output itself (one partition) or the
        // partition's partial with its (max, sum).
        auto emit = [&](int g, int d, float v) {
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
        };

        if constexpr (MMA) {
            // The ring's stages: rounds 0 .. R - 1 of keys, then of values; stage st goes to
            // slot st % STAGES, each thread copying KS 16-byte chunks (chunk c: key c / CH of the
            // round, part c % CH), chunk j of key k at j ^ (k % 8) (the eight rows of an
            // ldmatrix hit eight different bank groups). Every call commits a group (empty past
            // the last stage), so "stage st has landed" is "at most STAGES - 2 newer groups in
            // flight".
            constexpr int CH = HD / 8;
            constexpr int KT = ROUND / 16;  // key tiles of a round
            constexpr int DT = HD / 16;     // dimension tiles
            static_assert(ROUND * CH == KS * NW * 32 && DT % NW == 0, "round and tiles");
            auto at = [](int k, int c) { return k * HD + ((c ^ (k & 7)) << 3); };
            const int R = (n + ROUND - 1) / ROUND;
            append_new();  // before the ring reads the pages
            for (int t = threadIdx.x; t < R * ROUND; t += NW * 32) s_rows[t] = key_row(t);
            __syncthreads();
            auto issue = [&](int st) {
                if (st < 2 * R) {
                    const bool val = st >= R;
                    const int r0 = (val ? st - R : st) * ROUND;
                    const T* src = val ? vc : kc;
                    T* dst = s_ring + (st % STAGES) * STAGE_ELEMS;
#pragma unroll
                    for (int j = 0; j < KS; j++) {
                        const int c = threadIdx.x + j * NW * 32;
                        const int kk = c / CH, ch = c % CH;
                        cp_async16(dst + at(kk, ch), src + (size_t)s_rows[r0 + kk] * HD + ch * 8);
                    }
                }
                cp_commit();
            };
            // Waits for stage st, then refills the slot of stage st - 1 (every warp is past it).
            auto land = [&](int st) -> const T* {
                cp_wait<STAGES - 2>();
                __syncthreads();
                issue(st + STAGES - 1);
                return s_ring + (st % STAGES) * STAGE_ELEMS;
            };
#pragma unroll
            for (int st = 0; st < STAGES - 1; st++) issue(st);
            // The group's query heads (rotated: exact in T) as the mma's B operand, heads past
            // the group zero; the softmax scale goes on the f32 scores.
            for (int idx = threadIdx.x; idx < 8 * HD; idx += NW * 32) {
                const int g = idx / HD, e = idx % HD;
                float v = 0.f;
                if (g < G) {
                    const T* qh = q + ((size_t)r * a.heads + head0 + g) * HD;
                    if constexpr (ROPE) v = rotated_at(qh, e);
                    else v = to_f(qh[e]);
                }
                s_qh[g][e] = from_f<T>(v);
            }
            // mma m16n8k16 fragments: lane (gq, tq) = (lane / 4, lane % 4); ldmatrix row
            // addresses: matrix lane / 8, row lane % 8.
            const int gq = lane >> 2, tq = lane & 3, mrow = lane & 7, mat = lane >> 3;
            // Pass 1: S^T (16 keys x 8 heads) = K (16 x HD) . Q^T, key tiles over the warps.
            for (int st = 0; st < R; st++) {
                const T* slot = land(st);
                for (int kt = warp; kt < KT; kt += NW) {
                    float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                    for (int ks = 0; ks < DT; ks++) {
                        uint32_t fa[4];
                        ldsm_x4(fa, slot + at(kt * 16 + mrow + 8 * (mat & 1), 2 * ks + (mat >> 1)));
                        const T* qr = &s_qh[gq][16 * ks + 2 * tq];
                        mma16816<T>(c, fa, *reinterpret_cast<const uint32_t*>(qr),
                                    *reinterpret_cast<const uint32_t*>(qr + 8));
                    }
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        const int t = st * ROUND + kt * 16 + gq + 8 * (i >> 1), g = 2 * tq + (i & 1);
                        if (g < G && t < n) s_p[g][t] = c[i] * a.scale_log2;
                    }
                }
            }
            __syncthreads();
            softmax();
            __syncthreads();
            // Pass 2: O^T (HD x 8 heads) += V^T (HD x 16 keys) . P^T, dimension tiles over the
            // warps (each output element has one owner: no sum across warps).
            constexpr int DPW = DT / NW;
            float o[DPW][4];
#pragma unroll
            for (int i = 0; i < DPW; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) o[i][j] = 0.f;
            auto prob = [&](int g, int t) { return g < G && t < n ? s_p[g][t] : 0.f; };
            for (int st = R; st < 2 * R; st++) {
                const T* slot = land(st);
#pragma unroll
                for (int kt = 0; kt < KT; kt++) {
                    const int t0 = (st - R) * ROUND + kt * 16 + 2 * tq;
                    const uint32_t b0 = pack2<T>(prob(gq, t0), prob(gq, t0 + 1));
                    const uint32_t b1 = pack2<T>(prob(gq, t0 + 8), prob(gq, t0 + 9));
#pragma unroll
                    for (int i = 0; i < DPW; i++) {
                        uint32_t fa[4];
                        ldsm_x4_trans(fa, slot + at(kt * 16 + mrow + 8 * (mat >> 1), 2 * (warp + i * NW) + (mat & 1)));
                        mma16816<T>(o[i], fa, b0, b1);
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < DPW; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const int d = (warp + i * NW) * 16 + gq + 8 * (j >> 1), g = 2 * tq + (j & 1);
                    if (g < G) emit(g, d, o[i][j]);
                }
        } else {
            // The group's query heads, rotated (ROPE) and scaled once per block into shared
            // memory (s_acc is free until pass 2 ends): one element per thread instead of every
            // warp rotating all of them for its lanes.
            float(*s_q)[HD] = s_acc[0];
            for (int idx = threadIdx.x; idx < G * HD; idx += NW * 32) {
                const int g = idx / HD, e = idx % HD;
                const T* qh = q + ((size_t)r * a.heads + head0 + g) * HD;
                float v;
                if constexpr (ROPE) v = rotated_at(qh, e);
                else v = to_f(qh[e]);
                s_q[g][e] = v * a.scale_log2;
            }
            __syncthreads();
            float qf[GM][8];
#pragma unroll
            for (int g = 0; g < GM; g++) {
#pragma unroll
                for (int i = 0; i < 8; i++) qf[g][i] = g < G ? s_q[g][dl * 8 + i] : 0.f;
            }
            append_new();

            // Pass 1: scores (log2 domain) of the partition's keys.
            const bool resident = n <= ROUND;  // values loaded beside the keys, kept in registers
            Pack8<T> vr[KS];
            for (int r0 = 0; r0 < n; r0 += ROUND) {
                size_t at[KS];
#pragma unroll
                for (int s = 0; s < KS; s++) at[s] = key_at(r0 + (s * NW + warp) * TPW + sub) + dl * 8;
                Pack8<T> kr[KS];
#pragma unroll
                for (int s = 0; s < KS; s++) kr[s] = ld_pack8<T, !ROPE>(kc + at[s]);
                if (resident) {
#pragma unroll
                    for (int s = 0; s < KS; s++) vr[s] = ld_pack8<T, !ROPE>(vc + at[s]);
                }
#pragma unroll
                for (int s = 0; s < KS; s++) {
                    const int t = r0 + (s * NW + warp) * TPW + sub;
                    float kf[8];
                    unpack8<T>(kr[s], kf);
#pragma unroll
                    for (int g = 0; g < GM; g++) {
                        if (g < G) {
                            float d = 0.f;
#pragma unroll
                            for (int i = 0; i < 8; i++) d = fmaf(qf[g][i], kf[i], d);
#pragma unroll
                            for (int o = LPT / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                            if (t < n && dl == 0) s_p[g][t] = d;
                        }
                    }
                }
            }
            __syncthreads();
            softmax();
            __syncthreads();
            // Pass 2: probabilities · V, f32.
            float acc[GM][8];
#pragma unroll
            for (int g = 0; g < GM; g++)
#pragma unroll
                for (int i = 0; i < 8; i++) acc[g][i] = 0.f;
            for (int r0 = 0; r0 < n; r0 += ROUND) {
                if (!resident) {
                    size_t at[KS];
#pragma unroll
                    for (int s = 0; s < KS; s++) at[s] = key_at(r0 + (s * NW + warp) * TPW + sub) + dl * 8;
#pragma unroll
                    for (int s = 0; s < KS; s++) vr[s] = ld_pack8<T, !ROPE>(vc + at[s]);
                }
#pragma unroll
                for (int s = 0; s < KS; s++) {
                    const int t = r0 + (s * NW + warp) * TPW + sub;
                    if (t < n) {
                        float vf[8];
                        unpack8<T>(vr[s], vf);
#pragma unroll
                        for (int g = 0; g < GM; g++) {
                            if (g < G) {
                                const float p = s_p[g][t];
#pragma unroll
                                for (int i = 0; i < 8; i++) acc[g][i] = fmaf(p, vf[i], acc[g][i]);
                            }
                        }
                    }
                }
            }
            // Sum the warp's key slots (lanes with the same dl), then the warps.
#pragma unroll
            for (int g = 0; g < GM; g++) {
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
                emit(g, d, v);
            }
        }
    }
    if (a.num_parts == 1 || tickets == nullptr) return;
    // Fused combine: the partials above are made visible device-wide before the ticket.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned* ticket = tickets + (size_t)r * gridDim.x + blockIdx.x;
        const bool last = atomicAdd(ticket, 1u) == (unsigned)a.num_parts - 1;
        if (last) *ticket = 0u;  // every partition has taken its ticket: ready for the next launch
        s_last = last;
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    // s_p and s_sum are free again: the partition weights and sums of the merge.
    // Partitions past the row's last key are empty (the launch has the longest row's count).
    const int used = min(a.num_parts, (ctx - lo + a.part_len - 1) / a.part_len);
    merge_block<T>(part_ml, part_acc, out, r, a.heads, head0, G, a.num_parts, used, HD, &s_p[0][0], s_sum);
}

// Grid: (heads, rows); HD threads. Merges the partitions of one (row, head).
template <typename T>
__device__ __forceinline__ void paged_attn_combine(const float* __restrict__ part_ml,
                                                   const float* __restrict__ part_acc,
                                                   T* __restrict__ out, int heads, int num_parts,
                                                   int hd) {
    __shared__ float s_w[MERGE_MAX];
    __shared__ float s_l[1];
    merge_block<T>(part_ml, part_acc, out, blockIdx.y, heads, blockIdx.x, 1, num_parts, num_parts, hd, s_w, s_l);
}

// Prefill attention on query tiles (paged_prefill_*): the rows of a prefill chunk share their
// sequence's keys, so one block takes a tile of up to PF_ROWS / group consecutive rows of one
// sequence (tiles[2 i] = first row, tiles[2 i + 1] = rows; ascending positions) with all the
// query heads of one KV head: PF_ROWS query rows (token, head), 16 per warp, as the A operand of
// m16n8k16 mmas (held in registers for the whole key loop). The keys 0 .. last row's position
// (a sliding window: from the first row's lowest) stream through a two-stage shared-memory ring
// of K and V tiles of KB keys (cp.async, XOR-swizzled chunks as in the decode kernel; dynamic
// shared memory, 2 x 2 x KB x HD elements); per tile every warp
// computes S = Q K^T (f32), masks it causally per row, updates its rows' online softmax (max and
// sum in registers, FlashAttention-2's order) and adds P V (P rounded to bf16/f16, the S
// accumulators reused as the A fragments). Warps whose rows are all before a tile skip it. Each
// row reads its keys once per tile of rows instead of once per row.
constexpr int PF_ROWS = 64;  // query rows (token, head) per prefill block: NW warps x 16

template <typename T, int HD, int KB>
__device__ __forceinline__ void paged_prefill(const T* __restrict__ q, const T* __restrict__ kc,
                                              const T* __restrict__ vc, T* __restrict__ out,
                                              const int* __restrict__ tiles, int num_tiles,
                                              const AttnArgs a) {
    static_assert(sizeof(T) == 2 && NW * 16 == PF_ROWS, "16-bit caches, 16 rows a warp");
    constexpr int CH = HD / 8;         // 16-byte chunks per key
    constexpr int TILE = KB * HD;      // elements of one K or V tile
    constexpr int NT = KB / 8;         // n8 key tiles of S
    constexpr int KQ = HD / 16;        // k steps of Q K^T
    constexpr int DT = HD / 8;         // n8 dimension tiles of O
    constexpr int CPT = TILE / 8 / (NW * 32);  // chunks of K (and of V) per thread per stage
    static_assert(KB % 16 == 0 && KQ % 2 == 0 && DT % 2 == 0 && CPT * NW * 32 * 8 == TILE, "tiles");
    extern __shared__ __align__(16) unsigned char s_dyn[];
    T(*s_kv)[2][TILE] = reinterpret_cast<T(*)[2][TILE]>(s_dyn);  // [stage][keys, values]
    __shared__ int s_pos[PF_ROWS];

    // Heavy tiles (late positions) first: the host lists a sequence's tiles in order.
    const int tile = num_tiles - 1 - blockIdx.x;
    const int kvh = blockIdx.y;
    const int r0 = tiles[2 * tile], nr = tiles[2 * tile + 1];
    const int group = a.heads / a.kv_heads;
    const int head0 = kvh * group;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gq = lane >> 2, tq = lane & 3, mrow = lane & 7, mat = lane >> 3;
    if (threadIdx.x < nr) s_pos[threadIdx.x] = a.row_pos[r0 + threadIdx.x];
    const int* table = a.block_tables + (size_t)a.row_seq[r0] * a.max_blocks;
    __syncthreads();
    const int last = s_pos[nr - 1];
    const int lo = a.window > 0 ? max(0, s_pos[0] + 1 - a.window) : 0;
    const int ntiles = (last + 1 - lo + KB - 1) / KB;

    // This lane's two query rows (gq, gq + 8 of the warp): token i = m / group, head m % group;
    // rows past the tile's tokens have position -1 (every key masked, nothing stored).
    int rpos[2];
    const T* qrow[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int m = warp * 16 + gq + 8 * h, i = m / group;
        rpos[h] = i < nr ? s_pos[i] : -1;
        qrow[h] = q + ((size_t)(r0 + min(i, nr - 1)) * a.heads + head0 + m % group) * HD;
    }
    // The warp's positions (its first and last valid token), for skipping key tiles.
    const int wi0 = warp * 16 / group, wi1 = min(nr - 1, (warp * 16 + 15) / group);
    const bool warp_rows = wi0 < nr;
    const int wlo = warp_rows ? s_pos[wi0] : 0, whi = warp_rows ? s_pos[wi1] : -1;

    auto at = [](int k, int c) { return k * HD + ((c ^ (k & 7)) << 3); };
    auto issue = [&](int kt) {
        if (kt < ntiles) {
#pragma unroll
            for (int j = 0; j < CPT; j++) {
                const int c = threadIdx.x + j * NW * 32;
                const int kk = c / CH, ch = c % CH;
                const int tok = min(lo + kt * KB + kk, last);  // past the last key: a valid one, masked
                const size_t row = ((size_t)table[tok / a.bs] * a.kv_heads + kvh) * a.bs + tok % a.bs;
                const int st = kt & 1;
                cp_async16(&s_kv[st][0][at(kk, ch)], kc + row * HD + ch * 8);
                cp_async16(&s_kv[st][1][at(kk, ch)], vc + row * HD + ch * 8);
            }
        }
        cp_commit();
    };
    issue(0);

    // Q fragments (A operand: rows gq / gq + 8, dimensions 16 ks + 2 tq (+ 8)).
    uint32_t qf[KQ][4];
#pragma unroll
    for (int ks = 0; ks < KQ; ks++)
#pragma unroll
        for (int j = 0; j < 4; j++)
            qf[ks][j] = rpos[j & 1] >= 0
                            ? *reinterpret_cast<const uint32_t*>(qrow[j & 1] + 16 * ks + 2 * tq + 8 * (j >> 1))
                            : 0u;
    float o[DT][4];
#pragma unroll
    for (int d = 0; d < DT; d++)
#pragma unroll
        for (int j = 0; j < 4; j++) o[d][j] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

    for (int kt = 0; kt < ntiles; kt++) {
        issue(kt + 1);
        cp_wait<1>();
        __syncthreads();
        const int t0 = lo + kt * KB;
        // Skip a tile whose keys are all after the warp's rows or (window) before them.
        const bool skip = !warp_rows || t0 > whi || (a.window > 0 && t0 + KB - 1 < wlo + 1 - a.window);
        if (!skip) {
            const T* ks_ = s_kv[kt & 1][0];
            const T* vs_ = s_kv[kt & 1][1];
            float s[NT][4];
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int j = 0; j < 4; j++) s[nt][j] = 0.f;
#pragma unroll
            for (int ks = 0; ks < KQ; ks += 2)
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    uint32_t b[4];
                    ldsm_x4(b, ks_ + at(nt * 8 + mrow, 2 * ks + mat));
                    mma16816<T>(s[nt], qf[ks], b[0], b[1]);
                    mma16816<T>(s[nt], qf[ks + 1], b[2], b[3]);
                }
            // Causal (and window) mask, log2-domain scores, the rows' new max. A tile whose keys
            // all precede the warp's first row needs no mask (no window): only the tiles on the
            // diagonal pay for it (lab, H200: 8 x 2048 tokens 1320 -> 1255 us).
            float mx[2] = {m_run[0], m_run[1]};
            if (a.window <= 0 && t0 + KB - 1 <= wlo) {
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        s[nt][j] *= a.scale_log2;
                        mx[j >> 1] = fmaxf(mx[j >> 1], s[nt][j]);
                    }
            } else {
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        const int h = j >> 1, t = t0 + nt * 8 + 2 * tq + (j & 1);
                        const bool ok = t <= rpos[h] && (a.window <= 0 || t > rpos[h] - a.window);
                        s[nt][j] = ok ? s[nt][j] * a.scale_log2 : -INFINITY;
                        mx[h] = fmaxf(mx[h], s[nt][j]);
                    }
            }
            float base[2];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
                mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
                base[h] = mx[h] == -INFINITY ? 0.f : mx[h];  // no key yet: keep exp2 finite
                const float corr = exp2f(m_run[h] - base[h]);
                m_run[h] = mx[h];
                l_run[h] *= corr;
#pragma unroll
                for (int d = 0; d < DT; d++) {
                    o[d][2 * h] *= corr;
                    o[d][2 * h + 1] *= corr;
                }
            }
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    s[nt][j] = exp2f(s[nt][j] - base[j >> 1]);
                    l_run[j >> 1] += s[nt][j];
                }
            // O += P V: the S accumulators of key tiles 2 kk, 2 kk + 1 are the A fragment of
            // keys 16 kk .. 16 kk + 15; V^T fragments by ldmatrix.trans.
#pragma unroll
            for (int kk = 0; kk < KB / 16; kk++) {
                const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                        pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                        pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
                for (int d = 0; d < DT; d += 2) {
                    uint32_t b[4];
                    ldsm_x4_trans(b, vs_ + at(16 * kk + mrow + 8 * (mat & 1), d + (mat >> 1)));
                    mma16816<T>(o[d], pa, b[0], b[1]);
                    mma16816<T>(o[d + 1], pa, b[2], b[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with this stage before the next issue refills it
    }
    cp_wait<0>();
    // Row sums over the quad, then the normalized output of the valid rows.
#pragma unroll
    for (int h = 0; h < 2; h++) {
        float l = l_run[h];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        if (rpos[h] < 0) continue;
        const float inv = 1.f / l;
        const int m = warp * 16 + gq + 8 * h;
        T* dst = out + ((size_t)(r0 + m / group) * a.heads + head0 + m % group) * HD + 2 * tq;
#pragma unroll
        for (int d = 0; d < DT; d++)
            *reinterpret_cast<uint32_t*>(dst + 8 * d) = pack2<T>(o[d][2 * h] * inv, o[d][2 * h + 1] * inv);
    }
}

// Keys per tile: KB x HD = 8192 elements (K and V tiles of 16 KB, two stages: 64 KB of dynamic
// shared memory, paged_attention.rs PREFILL_TILE_ELEMS). Compiled for 2 blocks per SM: the
// queries, outputs and scores stay in registers (242-250, no spills). Nsight Compute on an H200
// (Llama-3-8B heads, batch 8 x 2048): 1894 us with tiles of 32 keys and 3 blocks per SM, 1725
// with 64 keys and 3 blocks (168 registers and spills), 1683 with 64 keys and 2 blocks.
#define PAGED_PREFILL(T, TN, HD)                                                                  \
    extern "C" __global__ void __launch_bounds__(NW * 32, 2)                                      \
        paged_prefill_##TN##_hd##HD(const T* q, const T* kc, const T* vc, T* out,                \
                                    const int* tiles, int num_tiles, const int* row_pos,          \
                                    const int* row_seq, const int* block_tables, int max_blocks,  \
                                    int heads, int kv_heads, int bs, int window,                  \
                                    float scale_log2) {                                           \
        const AttnArgs a{row_pos, row_seq, block_tables, max_blocks, heads, kv_heads,             \
                         bs,      window,  0,            0,          scale_log2};                 \
        paged_prefill<T, HD, 8192 / HD>(q, kc, vc, out, tiles, num_tiles, a);                     \
    }
PAGED_PREFILL(__nv_bfloat16, bf16, 64)
PAGED_PREFILL(__nv_bfloat16, bf16, 128)
PAGED_PREFILL(__half, f16, 64)
PAGED_PREFILL(__half, f16, 128)

// Blocks per SM a kernel is compiled for: _g4 G4_BLOCKS, the tensor-core kernels 4 (their
// shared memory holds 5), the 8-head kernels no bound.
#define PAGED_ATTN_KERNEL(NAME, T, HD, ROPE, GM, MMA)                                             \
    extern "C" __global__ void __launch_bounds__(NW * 32, MMA ? 4 : GM == 4 ? G4_BLOCKS(T) : 1)  \
        NAME(const T* q, T* kc, T* vc, T* out, float* part_ml, float* part_acc,                   \
             unsigned* tickets, const int* row_pos, const int* row_seq, const int* block_tables,  \
             int max_blocks, int heads, int kv_heads, int bs, int window, int part_len,           \
             int num_parts, float scale_log2, const RopeNew<T> rn) {                               \
        const AttnArgs a{row_pos, row_seq,  block_tables, max_blocks, heads,     kv_heads,        \
                         bs,      window,   part_len,     num_parts,  scale_log2};                \
        paged_attn<T, HD, ROPE, GM, MMA>(q, kc, vc, out, part_ml, part_acc, tickets, a, rn);      \
    }
// _g4: GQA groups of up to 4 query heads per KV head (Llama 3, Mistral): compiled for G4_BLOCKS
// blocks per SM (80 registers against the 8-head block's 134 and its 3 blocks per SM for bf16), so
// twice the blocks hide the chain of key loads of a decode step's attention.
#define PAGED_ATTN(T, TN, HD)                                                                     \
    PAGED_ATTN_KERNEL(paged_attn_##TN##_hd##HD, T, HD, false, GMAX, false)                        \
    PAGED_ATTN_KERNEL(paged_attn_rope_##TN##_hd##HD, T, HD, true, GMAX, false)                    \
    PAGED_ATTN_KERNEL(paged_attn_##TN##_hd##HD##_g4, T, HD, false, 4, false)                      \
    PAGED_ATTN_KERNEL(paged_attn_rope_##TN##_hd##HD##_g4, T, HD, true, 4, false)
// _mma: tensor-core kernels (16-bit caches), up to 8 heads a block (the mma's 8 columns).
#define PAGED_ATTN_MMA(T, TN, HD)                                                                 \
    PAGED_ATTN_KERNEL(paged_attn_##TN##_hd##HD##_mma, T, HD, false, GMAX, true)                   \
    PAGED_ATTN_KERNEL(paged_attn_rope_##TN##_hd##HD##_mma, T, HD, true, GMAX, true)
#define PAGED_ATTN_MMA_ALL(T, TN)                                                                 \
    PAGED_ATTN_MMA(T, TN, 64)                                                                     \
    PAGED_ATTN_MMA(T, TN, 128)                                                                    \
    PAGED_ATTN_MMA(T, TN, 256)
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
PAGED_ATTN_MMA_ALL(__nv_bfloat16, bf16)
PAGED_ATTN_MMA_ALL(__half, f16)
