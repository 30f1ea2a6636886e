// Picking the next token from a step's logits on the GPU, so that only token ids and their
// log-probabilities come back to the host (crates/lorq-model StepLogits; the host sampler,
// crates/lorq-model/src/sampling.rs, is the reference; tests in crates/lorq-model/tests/cuda_decode.rs).
// One block of 1024 threads per selected row; every pass over a row loads 8 values at a time,
// several loads in flight (for_each_value), since a block's passes are latency-bound otherwise.
// - greedy_rows_*: for each selected row r = sel[b], out[2b] = the index of its largest value (the
//   first on ties, as torch.argmax; NaN never wins) and out[2b + 1] = the bits of that value's
//   log-softmax (f32), in one pass: each thread keeps its best value and the sum of exp(v - best),
//   rescaled when the best changes, so the log-softmax at the argmax is -log(sum). 16-byte loads,
//   4 in flight per thread. (The host's 513 KB copy of a 128k-vocabulary row per sequence and step
//   was a synchronous transfer each, 1-5 ms per sequence with the host's log-softmax.)
// - prepare_rows_*: a sampled or penalized row's scores as f32, computed once by many blocks per row
//   before the single-block pick reads them several times: transformers' repetition penalty at
//   every listed token (a score s < 0 becomes s * penalty, else s / penalty), then the temperature
//   (s / temperature), IEEE products and quotients as the host computes them (the kernels build
//   with fast math). Each penalized value is computed from x, so a token listed twice counts once.
// - sample_rows_f32: on prepared rows, the host sampler's top-k and top-p, then its draw: top-k
//   keeps every score >= the
//   k-th largest (ties kept), top-p the smallest prefix of the rest ranked by score (ties by index)
//   whose probability reaches p, and the token is the first, in index order, whose cumulative
//   probability exceeds the uniform number u the host drew from the sequence's seeded generator.
//   Probabilities are exp(s - max) as 32.32 fixed-point integers, summed exactly (no order
//   dependence: a seed gives the same token every run); a token below 2^-33 of the top one weighs 0.
//   Each threshold comes from a histogram of the scores over value bins below the top one and an
//   exact sort of the crossing bin's keys (a binary search over the scores' ordered bit patterns
//   where that bin is too full), the draw is a block-wide prefix sum in index order. The host's
//   f32 sums can put a boundary elsewhere by a rounding: the same token, unless u or p lies within
//   ~1e-6 of a cumulative probability.
// - top_rows_*: a row's `count` (<= TOP_MAX) most likely tokens under its raw distribution, best
//   first (the smaller index on ties), with their log-softmax: the alternatives a request reports
//   (`top_n_tokens`, `top_logprobs`), as the host's `top_logprobs` ranks them. The count-th
//   largest key comes from select_key (the top-k threshold), the tokens above it are gathered, the
//   ones at it taken in index order, and the few sorted.
#include "common.cuh"

constexpr int PICK_THREADS = 1024;
constexpr int PICK_WARPS = PICK_THREADS / 32;

// (v, i) beats (bv, bi): larger, or equal with a smaller index; NaN never beats anything.
__device__ __forceinline__ bool am_better(float v, int i, float bv, int bi) {
    return v > bv || (v == bv && i < bi);
}

// A row slice's greedy state: the best (value, index) so far and the sum of exp(v - best value).
struct GreedyAcc {
    float v;
    int i;
    float s;
};

// s * exp(from - to): a sum taken against the best value `from`, moved to the best value `to`.
__device__ __forceinline__ float ga_rescale(float s, float from, float to) {
    return s == 0.f ? 0.f : (from == to ? s : s * expf(from - to));
}

__device__ __forceinline__ void ga_push(GreedyAcc& a, float v, int i) {
    if (am_better(v, i, a.v, a.i)) {
        a.s = ga_rescale(a.s, a.v, v) + 1.f;
        a.v = v;
        a.i = i;
    } else if (v != -INFINITY) {
        a.s += expf(v - a.v);  // NaN makes the sum NaN, as a host log-softmax over the row
    }
}

__device__ __forceinline__ GreedyAcc ga_merge(const GreedyAcc& a, const GreedyAcc& b) {
    const bool b_wins = am_better(b.v, b.i, a.v, a.i);
    const GreedyAcc& hi = b_wins ? b : a;
    const GreedyAcc& lo = b_wins ? a : b;
    return {hi.v, hi.i, hi.s + ga_rescale(lo.s, lo.v, hi.v)};
}

__device__ __forceinline__ GreedyAcc ga_warp_merge(GreedyAcc a) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const GreedyAcc b = {__shfl_xor_sync(0xffffffffu, a.v, o), __shfl_xor_sync(0xffffffffu, a.i, o),
                             __shfl_xor_sync(0xffffffffu, a.s, o)};
        a = ga_merge(a, b);
    }
    return a;
}

static_assert(PICK_WARPS == 32, "ga_block_merge: one warp merges one state per warp");

// Every thread's state merged across the block, in every thread. scratch: PICK_WARPS states.
__device__ __forceinline__ GreedyAcc ga_block_merge(GreedyAcc a, GreedyAcc* scratch) {
    a = ga_warp_merge(a);
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = a;
    __syncthreads();
    a = ga_warp_merge(scratch[threadIdx.x & 31]);
    __syncthreads();  // scratch is reused by the next call
    return a;
}

constexpr int INFLIGHT = 4;

// f(v, i) for every value v = row[i] of a row of n values, thread t taking 8-value chunks t,
// t + PICK_THREADS, ...: 16-byte loads, INFLIGHT in flight, where rows start 16-byte aligned
// (n % 8 == 0 on an aligned allocation); single values, 8 in flight, otherwise.
template <typename T, typename F>
__device__ __forceinline__ void for_each_value(const T* __restrict__ row, int n, F&& f) {
    if ((n & 7) == 0) {
        const int chunks = n >> 3;
        for (int c0 = threadIdx.x; c0 < chunks; c0 += INFLIGHT * PICK_THREADS) {
            Pack8<T> p[INFLIGHT] = {};
#pragma unroll
            for (int u = 0; u < INFLIGHT; u++) {
                const int c = c0 + u * PICK_THREADS;
                if (c < chunks) p[u] = ld_pack8<T>(row + 8 * c);
            }
#pragma unroll
            for (int u = 0; u < INFLIGHT; u++) {
                const int c = c0 + u * PICK_THREADS;
                if (c < chunks) {
                    float v[8];
                    unpack8<T>(p[u], v);
#pragma unroll
                    for (int e = 0; e < 8; e++) f(v[e], 8 * c + e);
                }
            }
        }
    } else {
        for (int i0 = threadIdx.x; i0 < n; i0 += 8 * PICK_THREADS) {
            float v[8];
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int i = i0 + u * PICK_THREADS;
                v[u] = i < n ? to_f(row[i]) : 0.f;
            }
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int i = i0 + u * PICK_THREADS;
                if (i < n) f(v[u], i);
            }
        }
    }
}

// The contiguous span [x, y) of a row of n values this thread takes in the passes that go in
// index order: a multiple of 8 values, so that it loads 8 at a time.
__device__ __forceinline__ int2 thread_span(int n) {
    const int per = ((n + PICK_THREADS - 1) / PICK_THREADS + 7) & ~7;
    const int lo = min(n, (int)threadIdx.x * per);
    return make_int2(lo, min(n, lo + per));
}

// f(v, i) for the values of `span` in index order.
template <typename T, typename F>
__device__ __forceinline__ void for_each_in_span(const T* __restrict__ row, int n, int2 span, F&& f) {
    int i = span.x;
    if ((n & 7) == 0) {  // span.x is a multiple of 8: aligned loads
        for (; i + 8 <= span.y; i += 8) {
            float v[8];
            load8<T>(row + i, v);
#pragma unroll
            for (int e = 0; e < 8; e++) f(v[e], i + e);
        }
    }
    for (; i < span.y; i++) f(to_f(row[i]), i);
}

template <typename T>
__device__ __forceinline__ void greedy_rows(const T* __restrict__ x, const unsigned* __restrict__ sel,
                                            unsigned* __restrict__ out, int n) {
    __shared__ GreedyAcc s_acc[PICK_THREADS / 32];
    GreedyAcc a = {-INFINITY, n, 0.f};  // index n: no candidate yet
    for_each_value(x + (size_t)sel[blockIdx.x] * n, n, [&](float v, int i) { ga_push(a, v, i); });
    a = ga_block_merge(a, s_acc);
    if (threadIdx.x == 0) {
        // All NaN (or no values): index 0, as a scan that never finds a larger value.
        out[2 * blockIdx.x] = a.i < n ? (unsigned)a.i : 0u;
        out[2 * blockIdx.x + 1] = __float_as_uint(-logf(a.s));
    }
}


// Ordered key of a float: a larger float has a larger key; NaN gets 0 (never kept, weighs 0).
__device__ __forceinline__ unsigned order_key(float f) {
    if (f != f) return 0u;
    const unsigned b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The block-wide sum (SUM) or max of v, in every thread. scratch: PICK_WARPS values.
template <bool SUM, typename V>
__device__ __forceinline__ V block_reduce(V v, V* scratch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const V w = __shfl_xor_sync(0xffffffffu, v, o);
        v = SUM ? v + w : (w > v ? w : v);
    }
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    V r = scratch[0];
#pragma unroll 8
    for (int i = 1; i < PICK_WARPS; i++) r = SUM ? r + scratch[i] : (scratch[i] > r ? scratch[i] : r);
    __syncthreads();  // scratch is reused by the next call
    return r;
}

// The sum of v over the threads before this one (in thread order). scratch: PICK_WARPS values.
template <typename V>
__device__ __forceinline__ V block_exclusive_scan(V v, V* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    V inc = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const V w = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += w;
    }
    if (lane == 31) scratch[warp] = inc;
    __syncthreads();
    V before = 0;
    for (int i = 0; i < warp; i++) before += scratch[i];
    __syncthreads();
    return before + inc - v;
}

struct SampleArgs {
    unsigned row;    // of the prepared scores
    unsigned top_k;  // 0: no top-k
    float top_p;     // >= 1: no top-p
    float u;         // in [0, 1)
};

constexpr float TWO_POW_32 = 4294967296.f;
constexpr float LN_TWO_POW_32 = 22.18070977791825f;

template <typename T>
struct SampleRow {
    const T* x;
    int n;
    float m;  // the largest score

    // 32.32 fixed-point exp(s - m); 0 for NaN.
    __device__ __forceinline__ unsigned long long weight(float s) const {
        if (s != s) return 0ull;
        return __float2ull_rn(expf(s - m) * TWO_POW_32);
    }
};

// count (WEIGHTED = false) or total weight of the row's scores whose key is >= lo (and >= floor).
template <bool WEIGHTED, typename T>
__device__ __forceinline__ unsigned long long mass_at_least(const SampleRow<T>& r, unsigned lo,
                                                             unsigned floor_key,
                                                             unsigned long long* scratch) {
    unsigned long long acc = 0;
    for_each_value(r.x, r.n, [&](float s, int) {
        const unsigned k = order_key(s);
        if (k >= lo && k >= floor_key) acc += WEIGHTED ? r.weight(s) : 1ull;
    });
    return block_reduce<true>(acc, scratch);
}

// The largest key tau in [lo, hi] with mass_at_least(tau) >= target (lo must satisfy it).
template <bool WEIGHTED, typename T>
__device__ __forceinline__ unsigned search_key(const SampleRow<T>& r, unsigned lo, unsigned hi,
                                               unsigned floor_key, unsigned long long target,
                                               unsigned long long* scratch) {
    while (lo < hi) {
        const unsigned mid = lo + (unsigned)(((unsigned long long)hi - lo + 1) >> 1);
        if (mass_at_least<WEIGHTED>(r, mid, floor_key, scratch) >= target)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

// The float an ordered key came from (order_key's inverse for keys of numbers).
__device__ __forceinline__ float key_value(unsigned k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Scores within VRANGE of the largest fall into VBINS value bins (a score further down weighs
// 0 in 32.32 fixed point: exp(-32) * 2^32 < 1e-4), the rest into the last.
constexpr int VBINS = 1024;
constexpr float VRANGE = 32.f;
constexpr int CANDIDATES = 4096;  // a power of two

static_assert(VBINS == PICK_THREADS, "select_key scans one bin per thread");

struct SelectScratch {
    float mass[VBINS];  // approximate: it only proposes the bin (see select_key)
    unsigned count[VBINS];
    unsigned keys[CANDIDATES];
    unsigned long long sums[PICK_WARPS];
    unsigned n_keys;
    int bin;
    unsigned long long before;
    unsigned tau;
    // Set by a weighted select_key that sorted the crossing bin: the mass above tau and how many
    // scores sit at tau (sample_rows then skips the passes that find them).
    bool split;
    unsigned long long above;
    unsigned long long tie_count;
};

// search_key's answer (largest tau >= floor with mass_at_least(tau) >= target, top the largest
// key) in a few passes: a histogram of the scores over value bins below the largest, the bin where
// the mass reaches target, and an exact sort of that bin's keys. Falls back to search_key when the
// bin is the last (scores past VRANGE) or holds more than CANDIDATES scores. Weights go into the
// histogram as f32 (64-bit shared atomics are compare-and-swap loops): the f32 scan proposes the
// bin, and one pass of exact 32.32 sums over the bins before it, it and its neighbours places the
// crossing exactly (else the search decides). (Summing each warp's equal bins first with
// __match_any_sync measured slower, session 39.)
template <bool WEIGHTED, typename T>
__device__ __forceinline__ unsigned select_key(const SampleRow<T>& r, unsigned floor_key, unsigned top,
                                               unsigned long long target, SelectScratch& sh) {
    for (int b = threadIdx.x; b < VBINS; b += PICK_THREADS) {
        sh.mass[b] = 0;
        sh.count[b] = 0;
    }
    if (threadIdx.x == 0) {
        sh.n_keys = 0;
        sh.split = false;
    }
    __syncthreads();
    const float scale = VBINS / VRANGE;
    auto bin_of = [&](float s) { return (int)fminf((r.m - s) * scale, (float)(VBINS - 1)); };
    auto kept = [&](float s) {
        const unsigned k = order_key(s);
        return k >= floor_key && k != 0u;
    };
    for_each_value(r.x, r.n, [&](float s, int) {
        if (!kept(s)) return;
        const int b = bin_of(s);
        atomicAdd(&sh.count[b], 1u);
        if (WEIGHTED) {
            const unsigned long long w = r.weight(s);
            if (w) atomicAdd(&sh.mass[b], (float)w);
        }
    });
    if (threadIdx.x == 0) sh.bin = -1;
    __syncthreads();
    // The crossing bin: thread t holds bin t; the one whose prefix reaches target.
    const int t = threadIdx.x;
    if (WEIGHTED) {
        const float w = sh.mass[t];
        const float before_t = block_exclusive_scan(w, reinterpret_cast<float*>(sh.sums));
        const float goal = (float)target;
        if (before_t < goal && before_t + w >= goal) sh.bin = t;
    } else {
        const unsigned long long w = sh.count[t];
        const unsigned long long before_t = block_exclusive_scan(w, sh.sums);
        if (before_t < target && before_t + w >= target) {
            sh.bin = t;
            sh.before = before_t;
        }
    }
    __syncthreads();
    int bin = sh.bin;
    if (WEIGHTED && bin >= 0) {
        // Exact masses: below bin - 1, bin - 1, bin, bin + 1.
        unsigned long long m[4] = {0, 0, 0, 0};
        for_each_value(r.x, r.n, [&](float s, int) {
            if (!kept(s)) return;
            const int d = bin_of(s) - bin + 1;
            if (d <= 2) m[max(d, -1) + 1] += r.weight(s);
        });
        unsigned long long c[4];
        for (int j = 0; j < 4; j++) c[j] = block_reduce<true>(m[j], sh.sums);
        const unsigned long long below = c[0], cross_prev = below + c[1], cross = cross_prev + c[2],
                                 cross_next = cross + c[3];
        if (below >= target) {
            bin = -1;  // the f32 sums were off by more than a bin: search
        } else if (cross_prev >= target) {
            bin -= 1;
            sh.before = below;
        } else if (cross >= target) {
            sh.before = cross_prev;
        } else if (cross_next >= target) {
            bin += 1;
            sh.before = cross;
        } else {
            bin = -1;
        }
    }
    if (bin < 0 || bin >= VBINS - 1 || sh.count[bin] > CANDIDATES)
        return search_key<WEIGHTED>(r, floor_key, top, floor_key, target, sh.sums);
    const unsigned long long before = sh.before;
    for_each_value(r.x, r.n, [&](float s, int) {
        const unsigned k = order_key(s);
        if (k >= floor_key && k != 0u && bin_of(s) == bin) sh.keys[atomicAdd(&sh.n_keys, 1u)] = k;
    });
    __syncthreads();
    const unsigned nk = sh.n_keys;
    unsigned len = 1;
    while (len < nk) len <<= 1;
    for (unsigned i = nk + threadIdx.x; i < len; i += PICK_THREADS) sh.keys[i] = 0u;
    __syncthreads();
    // Bitonic sort, largest key first.
    for (unsigned size = 2; size <= len; size <<= 1) {
        for (unsigned stride = size >> 1; stride > 0; stride >>= 1) {
            for (unsigned i = threadIdx.x; i < len; i += PICK_THREADS) {
                const unsigned j = i ^ stride;
                if (j > i) {
                    const unsigned ki = sh.keys[i], kj = sh.keys[j];
                    const bool desc = (i & size) == 0;
                    if (desc ? ki < kj : ki > kj) {
                        sh.keys[i] = kj;
                        sh.keys[j] = ki;
                    }
                }
            }
            __syncthreads();
        }
    }
    // The first sorted key where the running mass (after the bins above) reaches target: each
    // thread a run of consecutive keys, a block prefix sum over the runs.
    const unsigned per = (len + PICK_THREADS - 1) / PICK_THREADS;
    const unsigned c0 = min(nk, threadIdx.x * per), c1 = min(nk, c0 + per);
    auto w_of = [&](unsigned k) -> unsigned long long {
        return WEIGHTED ? r.weight(key_value(k)) : 1ull;
    };
    unsigned long long mine = 0;
    for (unsigned i = c0; i < c1; i++) mine += w_of(sh.keys[i]);
    unsigned long long acc = before + block_exclusive_scan(mine, sh.sums);
    if (threadIdx.x == 0) sh.tau = sh.keys[0];
    __syncthreads();
    if (acc < target && acc + mine >= target) {
        for (unsigned i = c0; i < c1; i++) {
            acc += w_of(sh.keys[i]);
            if (acc >= target) {
                sh.tau = sh.keys[i];
                break;
            }
        }
    }
    __syncthreads();
    const unsigned tau = sh.tau;
    if (WEIGHTED) {
        // Every score at tau is in this bin (equal values share a bin), every one above it here or
        // in the bins before.
        unsigned long long over = 0, at = 0;
        for (unsigned i = c0; i < c1; i++) {
            const unsigned k = sh.keys[i];
            if (k > tau) over += w_of(k);
            at += k == tau;
        }
        over = block_reduce<true>(over, sh.sums);
        at = block_reduce<true>(at, sh.sums);
        if (threadIdx.x == 0) {
            sh.above = before + over;
            sh.tie_count = at;
            sh.split = true;
        }
        __syncthreads();
    }
    return tau;
}

__device__ __forceinline__ void sample_rows(const float* __restrict__ x, const SampleArgs* __restrict__ args,
                                            unsigned* __restrict__ out, int n) {
    __shared__ unsigned long long s_u64[PICK_WARPS];
    __shared__ GreedyAcc s_acc[PICK_WARPS];
    __shared__ unsigned s_pick;
    __shared__ SelectScratch s_select;
    const SampleArgs a = args[blockIdx.x];
    SampleRow<float> r = {x + (size_t)a.row * n, n, 0.f};
    // The largest score and its index (the fallback if rounding leaves the draw unplaced).
    GreedyAcc best = {-INFINITY, n, 0.f};
    for_each_value(r.x, n, [&](float s, int i) {
        if (am_better(s, i, best.v, best.i)) {
            best.v = s;
            best.i = i;
        }
    });
    if (threadIdx.x == 0) s_pick = (unsigned)n;
    best = ga_block_merge(best, s_acc);
    if (best.i >= n) {  // every score NaN: token 0, as the host's argmax
        if (threadIdx.x == 0) {
            out[2 * blockIdx.x] = 0u;
            out[2 * blockIdx.x + 1] = __float_as_uint(NAN);
        }
        return;
    }
    r.m = best.v;
    const unsigned top = order_key(best.v);
    // Top-k: every score >= the k-th largest.
    unsigned floor_key = 1u;  // NaN (key 0) is never kept
    if (a.top_k > 0 && a.top_k < (unsigned)n)
        floor_key = select_key<false>(r, 1u, top, a.top_k, s_select);
    const unsigned long long total = mass_at_least<true>(r, floor_key, floor_key, s_u64);
    // Top-p: the smallest ranked prefix whose mass reaches p of the total; the scores at the
    // boundary key (equal weights) enter in index order, `ties` of them.
    bool cut = false;
    unsigned tau = floor_key;
    unsigned long long above = 0, tie_w = 0, ties = 0, kept = total;
    if (a.top_p < 1.f && total > 0) {
        unsigned long long target = (unsigned long long)ceil((double)a.top_p * (double)total);
        target = target < 1 ? 1 : (target > total ? total : target);
        tau = select_key<true>(r, floor_key, top, target, s_select);
        // One boundary score's weight (they are equal) and how many there are.
        unsigned long long tie_count;
        if (s_select.split) {
            above = s_select.above;
            tie_count = s_select.tie_count;
            tie_w = r.weight(key_value(tau));
        } else {
            above = tau < top ? mass_at_least<true>(r, tau + 1, floor_key, s_u64) : 0ull;
            unsigned long long w = 0, cnt = 0;
            for_each_value(r.x, n, [&](float s, int) {
                if (order_key(s) == tau) {
                    w = r.weight(s);
                    cnt++;
                }
            });
            tie_w = block_reduce<false>(w, s_u64);
            tie_count = block_reduce<true>(cnt, s_u64);
        }
        ties = tie_w > 0 ? (target - above + tie_w - 1) / tie_w : tie_count;
        ties = ties > tie_count ? tie_count : ties;
        kept = above + ties * tie_w;
        cut = true;
    }
    // The draw: the first token, in index order, whose cumulative kept weight exceeds u * kept.
    // Each thread takes a contiguous span of the row.
    const int2 span = thread_span(n);
    unsigned long long tie_base = 0;
    if (cut) {
        unsigned long long mine = 0;
        for_each_in_span(r.x, n, span, [&](float s, int) { mine += order_key(s) == tau; });
        tie_base = block_exclusive_scan(mine, s_u64);
    }
    auto kept_weight = [&](float s, unsigned long long& tie_rank) -> unsigned long long {
        const unsigned k = order_key(s);
        if (!cut) return k >= floor_key ? r.weight(s) : 0ull;
        if (k > tau) return r.weight(s);
        if (k == tau) return tie_rank++ < ties ? r.weight(s) : 0ull;
        return 0ull;
    };
    unsigned long long mine = 0, rank = tie_base;
    for_each_in_span(r.x, n, span, [&](float s, int) { mine += kept_weight(s, rank); });
    const unsigned long long base = block_exclusive_scan(mine, s_u64);
    unsigned long long target = kept > 0 ? (unsigned long long)((double)a.u * (double)kept) : 0ull;
    target = kept > 0 && target >= kept ? kept - 1 : target;
    if (kept > 0 && base <= target && target < base + mine) {
        unsigned long long acc = base;
        rank = tie_base;
        for (int i = span.x; i < span.y; i++) {
            acc += kept_weight(r.x[i], rank);
            if (acc > target) {
                s_pick = (unsigned)i;
                break;
            }
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned id = s_pick < (unsigned)n ? s_pick : (unsigned)best.i;
        const float lp = (r.x[id] - r.m) + LN_TWO_POW_32 - logf((float)kept);
        out[2 * blockIdx.x] = id;
        out[2 * blockIdx.x + 1] = __float_as_uint(lp);
    }
}

struct PrepareArgs {
    unsigned row;
    float penalty;      // > 0; 1: none
    float temperature;  // > 0; 1: none
    unsigned start;     // the row's penalized tokens: tokens[start .. start + count]
    unsigned count;
};

constexpr int PREPARE_THREADS = 256;

// Output row j is prepared by `parts` blocks (blockIdx.x = j * parts + part), each a slice.
template <typename T>
__device__ __forceinline__ void prepare_rows(const T* __restrict__ x, const PrepareArgs* __restrict__ args,
                                             const unsigned* __restrict__ tokens, float* __restrict__ out,
                                             int n, int parts) {
    const int j = blockIdx.x / parts, part = blockIdx.x % parts;
    const PrepareArgs a = args[j];
    const int per = (n + parts - 1) / parts;
    const int lo = min(n, part * per), hi = min(n, lo + per);
    const T* row = x + (size_t)a.row * n;
    float* o = out + (size_t)j * n;
    const bool scaled = a.temperature != 1.f;
    auto scale = [&](float s) { return scaled ? __fdiv_rn(s, a.temperature) : s; };
    for (int i = lo + threadIdx.x; i < hi; i += PREPARE_THREADS) o[i] = scale(to_f(row[i]));
    if (a.penalty == 1.f) return;
    __syncthreads();  // the penalized scores land after the slice's copy
    for (unsigned k = threadIdx.x; k < a.count; k += PREPARE_THREADS) {
        const unsigned t = tokens[a.start + k];
        if (t >= (unsigned)lo && t < (unsigned)hi) {
            const float s = to_f(row[t]);
            o[t] = scale(s < 0.f ? __fmul_rn(s, a.penalty) : __fdiv_rn(s, a.penalty));
        }
    }
}

constexpr int TOP_MAX = 64;  // a power of two

struct TopArgs {
    unsigned row;
    unsigned count;  // 1 ..= min(TOP_MAX, n)
    unsigned out;    // the row's first output pair
};

template <typename T>
__device__ __forceinline__ void top_rows(const T* __restrict__ x, const TopArgs* __restrict__ args,
                                         unsigned* __restrict__ out, int n) {
    __shared__ GreedyAcc s_acc[PICK_WARPS];
    __shared__ unsigned long long s_top[TOP_MAX];  // (key << 32) | ~index: larger is better
    __shared__ unsigned long long s_u64[PICK_WARPS];
    __shared__ unsigned s_above;
    __shared__ SelectScratch s_select;
    const TopArgs a = args[blockIdx.x];
    SampleRow<T> r = {x + (size_t)a.row * n, n, 0.f};
    // The largest value and the sum of exp(v - largest): the log-softmax's normalizer.
    GreedyAcc acc = {-INFINITY, n, 0.f};
    for_each_value(r.x, n, [&](float v, int i) { ga_push(acc, v, i); });
    for (int i = threadIdx.x; i < TOP_MAX; i += PICK_THREADS) s_top[i] = 0ull;
    if (threadIdx.x == 0) s_above = 0;
    acc = ga_block_merge(acc, s_acc);
    const unsigned count = a.count;
    unsigned* o = out + 2 * (size_t)a.out;
    if (acc.i >= n) {  // every value NaN: the first tokens, NaN log-probabilities
        for (unsigned j = threadIdx.x; j < count; j += PICK_THREADS) {
            o[2 * j] = j;
            o[2 * j + 1] = __float_as_uint(NAN);
        }
        return;
    }
    r.m = acc.v;
    const float lse = acc.v + logf(acc.s);
    const unsigned top = order_key(acc.v);
    const unsigned tau = select_key<false>(r, 1u, top, count, s_select);
    // Every value above the threshold (fewer than count of them), then the ones at it in index order.
    for_each_value(r.x, n, [&](float v, int i) {
        const unsigned k = order_key(v);
        if (k > tau) s_top[atomicAdd(&s_above, 1u)] = ((unsigned long long)k << 32) | (unsigned)~i;
    });
    __syncthreads();
    const unsigned need = count - s_above;
    const int2 span = thread_span(n);
    unsigned long long mine = 0;
    for_each_in_span(r.x, n, span, [&](float v, int) { mine += order_key(v) == tau; });
    unsigned long long rank = block_exclusive_scan(mine, s_u64);
    for (int i = span.x; i < span.y && rank < need; i++) {
        if (order_key(to_f(r.x[i])) == tau) {
            s_top[s_above + rank] = ((unsigned long long)tau << 32) | (unsigned)~i;
            rank++;
        }
    }
    __syncthreads();
    // Bitonic sort of the TOP_MAX entries, largest first (the empty ones, 0, sink).
    for (unsigned size = 2; size <= TOP_MAX; size <<= 1) {
        for (unsigned stride = size >> 1; stride > 0; stride >>= 1) {
            const unsigned i = threadIdx.x, j = i ^ stride;
            if (i < TOP_MAX && j > i) {
                const unsigned long long ki = s_top[i], kj = s_top[j];
                const bool desc = (i & size) == 0;
                if (desc ? ki < kj : ki > kj) {
                    s_top[i] = kj;
                    s_top[j] = ki;
                }
            }
            __syncthreads();
        }
    }
    if (threadIdx.x < count) {
        const unsigned id = ~(unsigned)s_top[threadIdx.x];
        o[2 * threadIdx.x] = id;
        o[2 * threadIdx.x + 1] = __float_as_uint(to_f(r.x[id]) - lse);
    }
}

#define PICK(T, TN)                                                                               \
    extern "C" __global__ void __launch_bounds__(PICK_THREADS)                                    \
        greedy_rows_##TN(const T* x, const unsigned* sel, unsigned* out, int n) {                 \
        greedy_rows<T>(x, sel, out, n);                                                           \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(PREPARE_THREADS)                                 \
        prepare_rows_##TN(const T* x, const PrepareArgs* args, const unsigned* tokens, float* out, \
                          int n, int parts) {                                                     \
        prepare_rows<T>(x, args, tokens, out, n, parts);                                          \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(PICK_THREADS)                                    \
        top_rows_##TN(const T* x, const TopArgs* args, unsigned* out, int n) {                    \
        top_rows<T>(x, args, out, n);                                                             \
    }
PICK(float, f32)
PICK(__nv_bfloat16, bf16)
PICK(__half, f16)

extern "C" __global__ void __launch_bounds__(PICK_THREADS)
    sample_rows_f32(const float* x, const SampleArgs* args, unsigned* out, int n) {
    sample_rows(x, args, out, n);
}
