// Just-in-time quantization on the GPU: the same codes as lorq's CPU quantizers (the references,
// src/bnb4/quantize.rs, src/bnb4/double_quant.rs, src/int8.rs, src/eetq.rs, src/fp8.rs,
// src/hqq/optimize.rs + bitpack.rs), from a weight in f32 / bf16 / f16 device memory.
//
// Bit-exactness: the fatbins are built with --use_fast_math (flush-to-zero, approximate division
// and reciprocal, FMA contraction), which would change codes at rounding boundaries. Every
// float operation whose rounding matters is therefore written as inline PTX with an explicit
// IEEE rounding mode and no .ftz (the compiler keeps inline PTX as written): products and sums are
// rounded separately (never fused), divisions and reciprocals are correctly rounded, as in Rust.
// f64 is untouched by fast-math.
#include "common.cuh"

// ---- exact f32 arithmetic (IEEE round-to-nearest-even, denormals kept) ----
__device__ __forceinline__ float f_mul(float a, float b) { float r; asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float f_add(float a, float b) { float r; asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float f_sub(float a, float b) { float r; asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float f_div(float a, float b) { float r; asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float f_rcp(float a) { float r; asm("rcp.rn.f32 %0, %1;" : "=f"(r) : "f"(a)); return r; }
// Round to the nearest integer, ties to even (Rust's round_ties_even).
__device__ __forceinline__ float f_rint(float a) { float r; asm("cvt.rni.f32.f32 %0, %1;" : "=f"(r) : "f"(a)); return r; }
__device__ __forceinline__ float f_abs(float a) { return __int_as_float(__float_as_int(a) & 0x7fffffff); }
__device__ __forceinline__ bool f_isnan(float a) { return (__float_as_uint(a) & 0x7fffffffu) > 0x7f800000u; }
// f32 -> f64, exact (subnormals kept).
__device__ __forceinline__ double f_to_d(float a) { double r; asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(a)); return r; }
// a < b on IEEE values (denormals compared as they are; false when either is NaN).
__device__ __forceinline__ bool f_lt(float a, float b) {
    unsigned r;
    asm("{ .reg .pred p; setp.lt.f32 p, %1, %2; selp.u32 %0, 1, 0, p; }" : "=r"(r) : "f"(a), "f"(b));
    return r != 0;
}
// Rust's f32::max / f32::min: a NaN operand yields the other one.
__device__ __forceinline__ float f_max(float a, float b) { float r; asm("max.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float f_min(float a, float b) { float r; asm("min.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
// Rust's f32::clamp: NaN stays NaN.
__device__ __forceinline__ float f_clamp(float v, float lo, float hi) {
    if (f_lt(v, lo)) v = lo;
    if (f_lt(hi, v)) v = hi;
    return v;
}
// `v.round_ties_even().clamp(-128, 127) as i8` (NaN -> 0, as Rust's saturating cast).
__device__ __forceinline__ int8_t round_i8(float v) {
    float r = f_clamp(f_rint(v), -128.f, 127.f);
    if (f_isnan(r)) return 0;
    return (int8_t)(int)r;
}
// f32 -> f16 -> f32, round to nearest even (half's from_f32).
__device__ __forceinline__ float round_f16(float x) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
    return r;
}
// f32 -> bf16 -> f32 as the half crate rounds (nearest even, NaN kept quiet), in integer ops.
__device__ __forceinline__ float round_bf16(float x) {
    uint32_t b = __float_as_uint(x);
    uint32_t h;
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        h = (b >> 16) | 0x0040u;
    } else if ((b & 0x8000u) != 0 && (b & (3u * 0x8000u - 1u)) != 0) {
        h = (b >> 16) + 1;
    } else {
        h = b >> 16;
    }
    return __uint_as_float(h << 16);
}
// dtype codes shared with src/cuda/quantize.rs: 0 f32, 1 bf16, 2 f16.
__device__ __forceinline__ float round_to(int dtype, float x) {
    return dtype == 1 ? round_bf16(x) : (dtype == 2 ? round_f16(x) : x);
}

// common.cuh's warp_max through f_max (an explicit max.f32, as every comparison of this file:
// the codes match the CPU quantizers' whatever --use_fast_math does to fmaxf).
__device__ __forceinline__ float warp_max_exact(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = f_max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide max of |.|-style values (blockDim.x a multiple of 32, at most 1024).
__device__ __forceinline__ float block_max(float v) {
    __shared__ float s_red[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max_exact(v);
    __syncthreads(); // s_red may still be read by a previous call
    if (lane == 0) s_red[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    v = lane < warps ? s_red[lane] : 0.f;
    return warp_max_exact(v);
}

// ---- bitsandbytes 4-bit: one warp per block of `bs` elements ----
// mids: the 15 sorted midpoints, order: sorted position -> code (src/bnb4/quantize.rs Bucketizer).
struct Bucket {
    float mids[15];
    unsigned char order[16];
};

__device__ __forceinline__ uint8_t bucket_code(const Bucket& b, float v) {
    int pos = 0;
#pragma unroll
    for (int i = 0; i < 15; i++) pos += f_lt(b.mids[i], v) ? 1 : 0;
    return b.order[pos];
}

template <typename T>
__device__ __forceinline__ void bnb4_quantize(const T* __restrict__ x, unsigned long long n, int bs,
                                              const Bucket bucket, uint8_t* __restrict__ packed,
                                              float* __restrict__ absmax) {
    const int lane = threadIdx.x & 31;
    const unsigned long long blk = (blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x) >> 5;
    const unsigned long long nblocks = (n + bs - 1) / bs;
    if (blk >= nblocks) return; // whole warps leave together
    const unsigned long long e0 = blk * bs;
    const int len = (int)min((unsigned long long)bs, n - e0);
    float am = 0.f;
    for (int i = lane; i < len; i += 32) am = f_max(am, f_abs(to_f(x[e0 + i])));
    am = warp_max_exact(am);
    if (lane == 0) absmax[blk] = am;
    const float amc = f_max(am, 1e-38f);
    // Full blocks multiply by the reciprocal, the short last block divides (bitsandbytes' kernels).
    const bool full = len == bs;
    const float r = f_rcp(amc);
    // Pairs of elements -> one byte, element 2i in the high nibble; an odd tail pads with code(0).
    const int pairs = (len + 1) >> 1;
    for (int p = lane; p < pairs; p += 32) {
        uint8_t c[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int i = 2 * p + h;
            float s = 0.f;
            if (i < len) {
                const float v = to_f(x[e0 + i]);
                s = f_clamp(full ? f_mul(v, r) : f_div(v, amc), -1.f, 1.f);
            }
            c[h] = bucket_code(bucket, s);
        }
        packed[(e0 >> 1) + p] = (uint8_t)((c[0] << 4) | c[1]);
    }
}

#define BNB4_Q(NAME, T)                                                                              \
    extern "C" __global__ void NAME(const T* x, unsigned long long n, int bs, const Bucket bucket,   \
                                    uint8_t* packed, float* absmax) {                                \
        bnb4_quantize<T>(x, n, bs, bucket, packed, absmax);                                          \
    }
BNB4_Q(bnb4_quantize_f32, float)
BNB4_Q(bnb4_quantize_bf16, __nv_bfloat16)
BNB4_Q(bnb4_quantize_f16, __half)

// ---- deterministic f64 sums (fixed order for a given n: same result on every run) ----
// Stage 1: block b sums elements b, b + grid, ... (f32 or f64 input) into part[b].
constexpr int SUM_THREADS = 256;
template <typename T>
__device__ __forceinline__ void sum_stage(const T* __restrict__ x, unsigned long long n, double* __restrict__ part) {
    __shared__ double s[SUM_THREADS];
    double acc = 0.0;
    for (unsigned long long i = blockIdx.x * (unsigned long long)SUM_THREADS + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * SUM_THREADS)
        acc += (double)x[i];
    s[threadIdx.x] = acc;
    __syncthreads();
    for (int w = SUM_THREADS / 2; w > 0; w >>= 1) {
        if (threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) part[blockIdx.x] = s[0];
}
extern "C" __global__ void sum_f32_f64(const float* x, unsigned long long n, double* part) { sum_stage<float>(x, n, part); }
extern "C" __global__ void sum_f64_f64(const double* x, unsigned long long n, double* part) { sum_stage<double>(x, n, part); }

// ---- double quantization of the absmax (src/bnb4/double_quant.rs): one warp per 256 codes ----
// sum: the f64 sum of every absmax (one block of sum_f64_f64 over the partials); the offset is
// (f32)(sum / n), as the CPU's f64 mean. map_mids: the 255 midpoints of the dynamic map.
extern "C" __global__ void bnb4_nested_quantize(const float* __restrict__ absmax, unsigned long long n,
                                                const double* __restrict__ sum, const float* __restrict__ map_mids,
                                                uint8_t* __restrict__ codes, float* __restrict__ nested,
                                                float* __restrict__ offset_out) {
    __shared__ float s_mids[255];
    for (int i = threadIdx.x; i < 255; i += blockDim.x) s_mids[i] = map_mids[i];
    __syncthreads();
    const float offset = n == 0 ? 0.f : (float)(sum[0] / (double)n);
    if (blockIdx.x == 0 && threadIdx.x == 0) offset_out[0] = offset;
    const int lane = threadIdx.x & 31;
    const unsigned long long blk = (blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x) >> 5;
    const int NB = 256;
    const unsigned long long nblocks = (n + NB - 1) / NB;
    if (blk >= nblocks) return;
    const unsigned long long e0 = blk * NB;
    const int len = (int)min((unsigned long long)NB, n - e0);
    float v[8];
    float am = 0.f;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const int i = lane + 32 * j;
        v[j] = i < len ? f_sub(absmax[e0 + i], offset) : 0.f;
        if (i < len) am = f_max(am, f_abs(v[j]));
    }
    am = warp_max_exact(am);
    if (lane == 0) nested[blk] = am;
    const float amc = f_max(am, 1e-38f);
    const float r = f_rcp(amc);
    const bool full = len == NB;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const int i = lane + 32 * j;
        if (i >= len) continue;
        const float s = f_clamp(full ? f_mul(v[j], r) : f_div(v[j], amc), -1.f, 1.f);
        // partition_point: the count of midpoints strictly below s (sorted).
        int lo = 0, hi = 255;
        while (lo < hi) {
            const int mid = (lo + hi) >> 1;
            if (f_lt(s_mids[mid], s)) lo = mid + 1; else hi = mid;
        }
        codes[e0 + i] = (uint8_t)lo;
    }
}

// ---- row-wise int8 (LLM.int8 through f16; EETQ) and fp8 row absmax: one block per row ----
// mode 0: LLM.int8 (values rounded to f16 first; r = (1/s)*127; codes in -128..127);
// mode 1: EETQ (r = 127/s; codes in -127..127; scale out = s/127).
template <typename T>
__device__ __forceinline__ void int8_rows(const T* __restrict__ x, int k, int mode, int8_t* __restrict__ q,
                                          float* __restrict__ scale) {
    const size_t row = blockIdx.x;
    const T* xr = x + row * (size_t)k;
    int8_t* qr = q + row * (size_t)k;
    float am = 0.f;
    for (int c = threadIdx.x; c < k; c += blockDim.x) {
        float v = to_f(xr[c]);
        if (mode == 0) v = round_f16(v);
        am = f_max(am, f_abs(v));
    }
    am = block_max(am);
    if (threadIdx.x == 0) scale[row] = mode == 0 ? am : f_div(am, 127.f);
    if (mode == 0 ? am == 0.f : !(am > 0.f)) {
        for (int c = threadIdx.x; c < k; c += blockDim.x) qr[c] = 0;
        return;
    }
    const float r = mode == 0 ? f_mul(f_rcp(am), 127.f) : f_div(127.f, am);
    for (int c = threadIdx.x; c < k; c += blockDim.x) {
        float v = to_f(xr[c]);
        if (mode == 0) v = round_f16(v);
        int8_t o = round_i8(f_mul(v, r));
        if (mode == 1 && o < -127) o = -127;
        qr[c] = o;
    }
}
#define INT8_Q(NAME, T)                                                                               \
    extern "C" __global__ void NAME(const T* x, int k, int mode, int8_t* q, float* scale) {          \
        int8_rows<T>(x, k, mode, q, scale);                                                           \
    }
INT8_Q(int8_rows_f32, float)
INT8_Q(int8_rows_bf16, __nv_bfloat16)
INT8_Q(int8_rows_f16, __half)

template <typename T>
__device__ __forceinline__ void row_absmax(const T* __restrict__ x, int k, float* __restrict__ out) {
    const T* xr = x + blockIdx.x * (size_t)k;
    float am = 0.f;
    for (int c = threadIdx.x; c < k; c += blockDim.x) am = f_max(am, f_abs(to_f(xr[c])));
    am = block_max(am);
    if (threadIdx.x == 0) out[blockIdx.x] = am;
}
#define ROW_ABSMAX(NAME, T) \
    extern "C" __global__ void NAME(const T* x, int k, float* out) { row_absmax<T>(x, k, out); }
ROW_ABSMAX(row_absmax_f32, float)
ROW_ABSMAX(row_absmax_bf16, __nv_bfloat16)
ROW_ABSMAX(row_absmax_f16, __half)

// `x.to(torch.float8_e4m3fn)` (src/fp8.rs f32_to_e4m3fn): nearest even, saturating to 448.
__device__ __forceinline__ uint8_t f32_to_e4m3fn(float x) {
    const uint32_t bits = __float_as_uint(x);
    const uint8_t sign = (uint8_t)((bits >> 24) & 0x80);
    const uint32_t ab = bits & 0x7fffffffu;
    if (ab > 0x7f800000u) return sign | 0x7f;
    if (ab >= 0x43e00000u) return sign | 0x7e; // >= 448
    if (ab < 0x3c800000u) {                    // < 2^-6: multiples of 2^-9
        return sign | (uint8_t)(int)f_rint(f_mul(__uint_as_float(ab), 512.f));
    }
    const uint32_t r = (ab + 0x7ffffu + ((ab >> 20) & 1u)) >> 20;
    const uint32_t code = r - ((127u - 7u) << 3);
    return sign | (uint8_t)min(code, 0x7eu);
}

// codes[r, c] = e4m3(round_to(w_dtype, x / scale[r or 0]).clamp(-448, 448)); one block per row.
template <typename T>
__device__ __forceinline__ void fp8_rows(const T* __restrict__ x, int k, const float* __restrict__ scale,
                                         int per_channel, int w_dtype, uint8_t* __restrict__ q) {
    const size_t row = blockIdx.x;
    const float s = scale[per_channel ? row : 0];
    const T* xr = x + row * (size_t)k;
    uint8_t* qr = q + row * (size_t)k;
    for (int c = threadIdx.x; c < k; c += blockDim.x)
        qr[c] = f32_to_e4m3fn(f_clamp(round_to(w_dtype, f_div(to_f(xr[c]), s)), -448.f, 448.f));
}
#define FP8_Q(NAME, T)                                                                                \
    extern "C" __global__ void NAME(const T* x, int k, const float* scale, int per_channel,          \
                                    int w_dtype, uint8_t* q) {                                        \
        fp8_rows<T>(x, k, scale, per_channel, w_dtype, q);                                            \
    }
FP8_Q(fp8_rows_f32, float)
FP8_Q(fp8_rows_bf16, __nv_bfloat16)
FP8_Q(fp8_rows_f16, __half)

// ---- HQQ (src/hqq/optimize.rs): groups of gs contiguous values, one thread per group ----
// Each block stages its groups in shared memory as f32 (row stride gs + 1: no bank conflicts),
// so the thread-per-group loops read shared memory; the CPU's sequential per-group order (and its
// f64 accumulators) is kept exactly.
struct HqqArgs {
    unsigned long long groups;
    int gs;
    float max_v;
    int round_zero;
    float inv_beta;  // 1 / beta (f32, as the CPU computes it)
    float p_minus_1; // lp_norm - 1 (f32)
};

__device__ __forceinline__ float hqq_quant(float w, float s, float z, float max_v) {
    return f_clamp(f_rint(f_add(f_mul(w, s), z)), 0.f, max_v);
}

// sign(x) * max(|x| - inv_beta * |x|^(p-1), 0). The power is taken in f64 and rounded once to
// f32: the correctly rounded f32 power, where the CPU's libm powf is within an ulp of it.
__device__ __forceinline__ float shrink_lp(float x, float inv_beta, float p_minus_1) {
    const float a = f_abs(x);
    const float pw = (float)pow(f_to_d(a), f_to_d(p_minus_1));
    const float out = f_max(f_sub(a, f_mul(inv_beta, pw)), 0.f);
    return f_lt(0.f, x) ? out : (f_lt(x, 0.f) ? -out : 0.f);
}

// Loads the block's groups into shared memory (f32) when they fit; returns the row pointer of
// this thread's group and its stride (1), reading global memory otherwise.
template <typename T>
__device__ __forceinline__ const float* hqq_stage(const T* __restrict__ x, const HqqArgs& a, float* smem,
                                                  int staged, unsigned long long g0, int ng_block) {
    if (!staged) return nullptr;
    const int total = ng_block * a.gs;
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
        const int gl = i / a.gs, e = i - gl * a.gs;
        smem[gl * (a.gs + 1) + e] = to_f(x[g0 * a.gs + i]);
    }
    __syncthreads();
    return smem + threadIdx.x * (a.gs + 1);
}

template <typename T>
__device__ __forceinline__ float hqq_load(const float* row, const T* __restrict__ x, unsigned long long g, int gs, int e) {
    return row != nullptr ? row[e] : to_f(x[g * gs + e]);
}

// Min/max initialisation: scale (not yet inverted) and zero per group.
template <typename T>
__device__ __forceinline__ void hqq_init(const T* __restrict__ x, const HqqArgs a, int staged,
                                         float* __restrict__ scale, float* __restrict__ zero) {
    extern __shared__ float smem[];
    const unsigned long long g0 = (unsigned long long)blockIdx.x * blockDim.x;
    const int ng_block = (int)min((unsigned long long)blockDim.x, a.groups - g0);
    const float* row = hqq_stage<T>(x, a, smem, staged, g0, ng_block);
    const unsigned long long g = g0 + threadIdx.x;
    if (threadIdx.x >= ng_block) return;
    float mn = __int_as_float(0x7f800000), mx = __int_as_float(0xff800000);
    for (int e = 0; e < a.gs; e++) {
        const float v = hqq_load<T>(row, x, g, a.gs, e);
        mn = f_min(mn, v);
        mx = f_max(mx, v);
    }
    const float denom = f_sub(mx, mn);
    float s = f_mul(f_rcp(denom), a.max_v);
    if (f_abs(denom) <= 1e-4f) s = 1.f;
    s = f_min(s, 2e4f);
    float z = f_mul(-mn, s);
    if (a.round_zero) z = f_rint(z);
    scale[g] = s;
    zero[g] = z;
}

// One proximal step: per-group |error| sum (f64) and the new zero.
template <typename T>
__device__ __forceinline__ void hqq_step(const T* __restrict__ x, const HqqArgs a, int staged,
                                         const float* __restrict__ scale, float* __restrict__ zero,
                                         double* __restrict__ err_g) {
    extern __shared__ float smem[];
    const unsigned long long g0 = (unsigned long long)blockIdx.x * blockDim.x;
    const int ng_block = (int)min((unsigned long long)blockDim.x, a.groups - g0);
    const float* row = hqq_stage<T>(x, a, smem, staged, g0, ng_block);
    const unsigned long long g = g0 + threadIdx.x;
    if (threadIdx.x >= ng_block) return;
    const float s = scale[g], z = zero[g];
    double err = 0.0, acc = 0.0;
    for (int e = 0; e < a.gs; e++) {
        const float v = hqq_load<T>(row, x, g, a.gs, e);
        const float wq = hqq_quant(v, s, z, a.max_v);
        const float wr = f_div(f_sub(wq, z), s);
        const float d = f_sub(v, wr);
        err += f_to_d(f_abs(d));
        const float we = shrink_lp(d, a.inv_beta, a.p_minus_1);
        acc += f_to_d(f_sub(wq, f_mul(f_sub(v, we), s)));
    }
    err_g[g] = err;
    zero[g] = f_div((float)acc, (float)a.gs);
}

// Codes of every element with the final scale/zero, written as [groups, gs].
template <typename T>
__device__ __forceinline__ void hqq_codes(const T* __restrict__ x, const HqqArgs a,
                                          const float* __restrict__ scale, const float* __restrict__ zero,
                                          uint8_t* __restrict__ codes) {
    const unsigned long long n = a.groups * (unsigned long long)a.gs;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const unsigned long long g = i / a.gs;
        const float c = hqq_quant(to_f(x[i]), scale[g], zero[g], a.max_v);
        codes[i] = f_isnan(c) ? 0 : (uint8_t)(int)c;
    }
}

#define HQQ_K(SUFFIX, T)                                                                              \
    extern "C" __global__ void hqq_init_##SUFFIX(const T* x, const HqqArgs a, int staged, float* scale, \
                                                 float* zero) {                                       \
        hqq_init<T>(x, a, staged, scale, zero);                                                       \
    }                                                                                                 \
    extern "C" __global__ void hqq_step_##SUFFIX(const T* x, const HqqArgs a, int staged,             \
                                                 const float* scale, float* zero, double* err_g) {    \
        hqq_step<T>(x, a, staged, scale, zero, err_g);                                                \
    }                                                                                                 \
    extern "C" __global__ void hqq_codes_##SUFFIX(const T* x, const HqqArgs a, const float* scale,    \
                                                  const float* zero, uint8_t* codes) {                \
        hqq_codes<T>(x, a, scale, zero, codes);                                                       \
    }
HQQ_K(f32, float)
HQQ_K(bf16, __nv_bfloat16)
HQQ_K(f16, __half)

// hqq's bit packing (src/hqq/bitpack.rs): grid [rows, cols] of codes -> [prow, cols] words, row
// slice k (rows k*prow .. (k+1)*prow) at shift top - bits*k; rows past `rows` (3-bit padding) are 0.
// word_bytes 1 (u8 words) or 4 (i32 words).
extern "C" __global__ void hqq_pack(const uint8_t* __restrict__ grid, unsigned long long rows,
                                    unsigned long long cols, unsigned long long prow, int slots, int bits,
                                    int top, int word_bytes, void* __restrict__ out) {
    const unsigned long long n = prow * cols;
    const uint32_t mask = (1u << bits) - 1u;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const unsigned long long pr = i / cols, c = i - pr * cols;
        uint32_t w = 0;
        for (int k = 0; k < slots; k++) {
            const unsigned long long r = (unsigned long long)k * prow + pr;
            if (r < rows) w |= ((uint32_t)grid[r * cols + c] & mask) << (top - bits * k);
        }
        if (word_bytes == 4) reinterpret_cast<int32_t*>(out)[i] = (int32_t)w;
        else reinterpret_cast<uint8_t*>(out)[i] = (uint8_t)w;
    }
}
