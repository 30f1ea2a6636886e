// Elementwise decoder ops fused so that a decode step launches fewer kernels and reads each
// activation once (the model code in crates/lorq-model uses them on CUDA; candle's ops are the
// reference, tests in crates/lorq-model/tests/cuda_decode.rs):
// - add_rms_norm_*: s = x + d (the residual add), y = RMSNorm(s) * w; writes both s and y. One
//   block per row; f32 sum of squares. add_rms_norm_vec_* (hidden % 8 == 0, 16-byte aligned rows,
//   hidden <= 8 * 1024 * ARN_CHUNKS; rms_norm.cuh): each thread holds its 8-element chunks in
//   registers between the sum and the scaling (one read of x, d and w, 16-byte loads): at batch 1
//   the row is one block, and the scalar kernel's serial loop took ~12 us on an H100 for 4096
//   values (ncu), this one a few. The GEMVs at batch 1 run the same code as their tail.
// - silu_mul_*: y = SiLU(gate) * up, elementwise, f32 math. silu_mul_fp8_* (one block per row,
//   n % 8 == 0, n <= 8 * blockDim * ARN_CHUNKS) also writes y's e4m3 codes and per-token scale,
//   the down projection's own quantization (fp8_act.cu quant_rows, mode 0) of y as stored, bit for
//   bit, so that an FP8 down_proj skips that launch.
// - embed_rows_*: out[r] = table[ids[r]] (the embedding lookup reading its ids on the GPU; an id
//   past the vocabulary gives a zero row, never a read outside the table). One block per row.
// - gather_columns_*: out[r][i] = x[r][cols[i]] (act-order weights: x into the packed column order,
//   a dequantized weight back to the original one); a column past k reads as zero. candle's
//   index_select uploads its index layout from the host at every call, which a CUDA graph
//   cannot replay.
#include "rms_norm.cuh"

constexpr int THREADS = 256;

template <typename T>
__device__ __forceinline__ void add_rms_norm(const T* __restrict__ x, const T* __restrict__ d,
                                             const T* __restrict__ w, T* __restrict__ s,
                                             T* __restrict__ y, int hidden, float eps) {
    __shared__ float s_part[THREADS / 32];
    const size_t row = (size_t)blockIdx.x * hidden;
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += THREADS) {
        // Rounded to T first: the sum the next layer sees is the stored one.
        const T sum = from_f<T>(to_f(x[row + i]) + to_f(d[row + i]));
        s[row + i] = sum;
        const float f = to_f(sum);
        ss = fmaf(f, f, ss);
    }
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) s_part[threadIdx.x >> 5] = ss;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < THREADS / 32; i++) total += s_part[i];
    const float inv = rsqrtf(total / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += THREADS)
        y[row + i] = from_f<T>(to_f(s[row + i]) * inv * to_f(w[i]));
}

template <typename T>
__device__ __forceinline__ void silu_mul(const T* __restrict__ gate, const T* __restrict__ up,
                                         T* __restrict__ y, size_t n) {
    for (size_t i = (size_t)blockIdx.x * THREADS + threadIdx.x; i < n;
         i += (size_t)gridDim.x * THREADS) {
        y[i] = silu_mul_rounded<T>(to_f(gate[i]), to_f(up[i]));
    }
}

template <typename T>
__device__ __forceinline__ void silu_mul_fp8(const T* __restrict__ gate, const T* __restrict__ up,
                                             T* __restrict__ y, uint8_t* __restrict__ q,
                                             float* __restrict__ scales, int n) {
    __shared__ float s_part[32];
    const size_t row = (size_t)blockIdx.x * n;
    const int chunks = n >> 3;
    float v[ARN_CHUNKS][8];
    const float amax = hold_chunks(v, 0, chunks, [&](int c, float(&o)[8]) {
        float g[8], u[8];
        unpack8<T>(ld_pack8<T>(gate + row + 8 * c), g);
        unpack8<T>(ld_pack8<T>(up + row + 8 * c), u);
#pragma unroll
        for (int e = 0; e < 8; e++) o[e] = to_f(silu_mul_rounded<T>(g[e], u[e]));  // y as stored
        store8<T>(y + row + 8 * c, o);
    });
    write_row_codes(v, amax, chunks, q + row, scales + blockIdx.x, s_part);
}

template <typename T>
__device__ __forceinline__ void embed_rows(const T* __restrict__ table,
                                           const unsigned* __restrict__ ids, T* __restrict__ out,
                                           int hidden, unsigned vocab) {
    const unsigned id = ids[blockIdx.x];
    const size_t dst = (size_t)blockIdx.x * hidden, src = (size_t)id * hidden;
    for (int i = threadIdx.x; i < hidden; i += THREADS)
        out[dst + i] = id < vocab ? table[src + i] : from_f<T>(0.f);
}

template <typename T>
__device__ __forceinline__ void gather_columns(const T* __restrict__ x, const unsigned* __restrict__ cols,
                                               T* __restrict__ out, int rows, int k, int kc) {
    const int i = blockIdx.x * THREADS + threadIdx.x;
    if (i >= kc) return;
    const unsigned c = cols[i];
    for (int r = blockIdx.y; r < rows; r += gridDim.y)
        out[(size_t)r * kc + i] = c < (unsigned)k ? x[(size_t)r * k + c] : from_f<T>(0.f);
}

#define FUSED(T, TN)                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS)                                         \
        add_rms_norm_##TN(const T* x, const T* d, const T* w, T* s, T* y, int hidden, float eps) { \
        add_rms_norm<T>(x, d, w, s, y, hidden, eps);                                              \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(1024)                                            \
        add_rms_norm_vec_##TN(const T* x, const T* d, const T* w, T* s, T* y, int hidden,         \
                              float eps) {                                                        \
        add_rms_norm_vec<T, false>(x, d, w, s, y, nullptr, nullptr, hidden, eps, blockIdx.x);     \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(1024)                                            \
        add_rms_norm_fp8_##TN(const T* x, const T* d, const T* w, T* s, T* y, uint8_t* q,         \
                              float* scales, int hidden, float eps) {                             \
        add_rms_norm_vec<T, true>(x, d, w, s, y, q, scales, hidden, eps, blockIdx.x);             \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS)                                         \
        silu_mul_##TN(const T* gate, const T* up, T* y, unsigned long long n) {                   \
        silu_mul<T>(gate, up, y, (size_t)n);                                                      \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(1024)                                            \
        silu_mul_fp8_##TN(const T* gate, const T* up, T* y, uint8_t* q, float* scales, int n) {   \
        silu_mul_fp8<T>(gate, up, y, q, scales, n);                                               \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS)                                         \
        embed_rows_##TN(const T* table, const unsigned* ids, T* out, int hidden, unsigned vocab) { \
        embed_rows<T>(table, ids, out, hidden, vocab);                                            \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS)                                         \
        gather_columns_##TN(const T* x, const unsigned* cols, T* out, int rows, int k, int kc) {  \
        gather_columns<T>(x, cols, out, rows, k, kc);                                             \
    }
FUSED(float, f32)
FUSED(__nv_bfloat16, bf16)
FUSED(__half, f16)
