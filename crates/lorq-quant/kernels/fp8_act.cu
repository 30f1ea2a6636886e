// The activation side of the W8A8 FP8 matmul (src/cuda/fp8_gemm.rs): x [m, k] (f32 / bf16 / f16)
// quantized to e4m3fn codes with one f32 scale per row, plus the scaling epilogue used where
// cuBLASLt has no outer-vector scale mode.
//
// Scales: per token (row absmax / 448), per tensor (whole-tensor absmax / 448, computed from the
// row maxima of fp8_absmax_rows) or a static checkpoint `input_scale`. Dynamic scales are floored
// at 1 / (448 * 512) so that an all-zero row divides by a positive number. The codes are
// `e4m3fn(x / scale)`, the division IEEE-rounded (`__fdiv_rn`: the build uses --use_fast_math)
// and the conversion bit-exact with lorq's CPU `f32_to_e4m3fn` (round to nearest even,
// saturating to +-448), so the CPU reference reproduces every code and every scale.
//
// Launch: one block per row, blockDim a multiple of 32 (<= 1024); k % 8 == 0 and every row
// 16-byte aligned (the Rust side guarantees both: FP8 cuBLASLt needs k % 16 == 0 anyway).
#include <cooperative_groups.h>

#include "e4m3.cuh"

template <typename T>
__device__ __forceinline__ float row_absmax(const T* __restrict__ row, int k, float* sh) {
    float m = 0.0f;
    for (int c = threadIdx.x * 8; c < k; c += blockDim.x * 8) {
        float v[8];
        load8<T>(row + c, v);
#pragma unroll
        for (int i = 0; i < 8; i++) m = fmaxf(m, fabsf(v[i]));
    }
    return block_max(m, sh);
}

// rowmax[r] = max |x[r, :]| (first launch of per-tensor dynamic quantization).
template <typename T>
__device__ void absmax_rows(const T* __restrict__ x, float* __restrict__ rowmax, int k) {
    __shared__ float sh[32];
    const T* row = x + (size_t)blockIdx.x * k;
    float m = row_absmax(row, k, sh);
    if (threadIdx.x == 0) rowmax[blockIdx.x] = m;
}

// Chunks of 8 a thread keeps in registers in the one-pass per-token mode: rows up to
// 8 * blockDim * HOLD_CHUNKS values (32768 at 1024 threads) are read once.
constexpr int HOLD_CHUNKS = 4;

// mode 0: per-token dynamic; 1: static scale `static_scale`; 2: per-tensor dynamic from
// rowmax[0..m]. Writes q[r, :] and scales[r] (every row gets its scale, so per-tensor scales
// serve both as a scalar, scales[0], and as an outer vector).
// The FP8 kernels that read q and scales may be launched as its programmatic dependents
// (fp8_wgmma.rs): they start streaming their weight while this kernel runs.
template <typename T>
__device__ void quant_rows(const T* __restrict__ x, uint8_t* __restrict__ q,
                           float* __restrict__ scales, const float* __restrict__ rowmax,
                           int m, int k, int mode, float static_scale) {
    launch_dependents();
    __shared__ float sh[32];
    const size_t r = blockIdx.x;
    const T* row = x + r * k;
    uint8_t* qrow = q + r * k;
    if (mode == 0 && k <= (int)blockDim.x * 8 * HOLD_CHUNKS) {
        // One read of the row: every chunk's loads in flight at once, then the block's maximum.
        const int chunks = k >> 3;
        float v[HOLD_CHUNKS][8];
        const float amax = hold_chunks(v, 0, chunks, [&](int c, float(&o)[8]) { load8<T>(row + 8 * c, o); });
        write_row_codes(v, amax, chunks, qrow, scales + r, sh);
        return;
    }
    float s;
    if (mode == 0) {
        s = e4m3_row_scale(row_absmax(row, k, sh));
    } else if (mode == 1) {
        s = static_scale;
    } else {
        float mx = 0.0f;
        for (int i = threadIdx.x; i < m; i += blockDim.x) mx = fmaxf(mx, rowmax[i]);
        s = e4m3_row_scale(block_max(mx, sh));
    }
    if (threadIdx.x == 0) scales[r] = s;
    for (int c = threadIdx.x * 8; c < k; c += blockDim.x * 8) {
        float v[8];
        load8<T>(row + c, v);
        *reinterpret_cast<uint2*>(qrow + c) = e4m3_codes8(v, s);
    }
}

// Blocks that share a row in quant_rows_cluster (fp8_gemm.rs ROW_CLUSTER).
constexpr int ROW_CLUSTER = 8;

// Per-token dynamic quantization (mode 0) of row blockIdx.x / ROW_CLUSTER by a cluster of
// ROW_CLUSTER blocks (compute capability 9.0): each block holds a slice of the row's chunks in
// registers, the blocks' maxima are exchanged through distributed shared memory. For few long
// rows, where one block per row leaves most SMs idle and the conversion (an IEEE division per
// value) is the time (fp8_gemm.rs `cluster_threads`: where it was measured faster). Codes and
// scales are quant_rows' (the maximum does not depend on who reduces what).
// Launch: grid m * ROW_CLUSTER, blockDim a multiple of 32 with blockDim * HOLD_CHUNKS >= the
// slice, ceil(k / 8 / ROW_CLUSTER) chunks.
template <typename T>
__device__ void quant_rows_cluster(const T* __restrict__ x, uint8_t* __restrict__ q,
                                   float* __restrict__ scales, int k) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    launch_dependents();
    namespace cg = cooperative_groups;
    __shared__ float sh[32];
    __shared__ float s_max;
    const cg::cluster_group cluster = cg::this_cluster();
    const int rank = (int)cluster.block_rank();
    const size_t r = blockIdx.x / ROW_CLUSTER;
    const int chunks = k >> 3, per = (chunks + ROW_CLUSTER - 1) / ROW_CLUSTER;
    const int c0 = rank * per, c1 = min(chunks, c0 + per);
    const T* row = x + r * k;
    float v[HOLD_CHUNKS][8];
    float amax = hold_chunks(v, c0, c1, [&](int c, float(&o)[8]) { load8<T>(row + 8 * c, o); });
    amax = block_max(amax, sh);
    if (threadIdx.x == 0) s_max = amax;
    cluster.sync();
#pragma unroll
    for (int b = 0; b < ROW_CLUSTER; b++) amax = fmaxf(amax, *cluster.map_shared_rank(&s_max, b));
    cluster.sync();  // no block leaves while another still reads its maximum
    const float sc = e4m3_row_scale(amax);
    if (rank == 0 && threadIdx.x == 0) scales[r] = sc;
    write_codes(v, c0, c1, q + r * k, sc);
#else
    __trap();  // fp8_gemm.rs launches it on compute capability 9.0+ only
#endif
}

// Clusters exist from compute capability 9.0.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define ROW_CLUSTER_DIMS __cluster_dims__(ROW_CLUSTER, 1, 1)
#else
#define ROW_CLUSTER_DIMS
#endif

// y[r, j] = acc[r, j] * sx[r] * sw[j]: the scaling epilogue where cuBLASLt cannot apply outer
// vectors itself. acc is the unscaled f32 product [m, n]; grid-stride over m * n.
template <typename T>
__device__ void scale_out(const float* __restrict__ acc, T* __restrict__ y,
                          const float* __restrict__ sx, const float* __restrict__ sw, int m,
                          int n) {
    size_t total = (size_t)m * n;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / n, j = i - r * n;
        y[i] = from_f<T>(acc[i] * sx[r] * sw[j]);
    }
}

#define FP8_ACT_KERNELS(T, NAME)                                                              \
    extern "C" __global__ void fp8_absmax_rows_##NAME(const T* x, float* rowmax, int k) {     \
        absmax_rows<T>(x, rowmax, k);                                                         \
    }                                                                                         \
    extern "C" __global__ void fp8_quant_rows_##NAME(const T* x, uint8_t* q, float* scales,   \
                                                     const float* rowmax, int m, int k,       \
                                                     int mode, float static_scale) {          \
        quant_rows<T>(x, q, scales, rowmax, m, k, mode, static_scale);                        \
    }                                                                                         \
    extern "C" __global__ void ROW_CLUSTER_DIMS fp8_quant_rows_cluster_##NAME(                \
        const T* x, uint8_t* q, float* scales, int k) {                                       \
        quant_rows_cluster<T>(x, q, scales, k);                                               \
    }                                                                                         \
    extern "C" __global__ void fp8_scale_out_##NAME(const float* acc, T* y, const float* sx,  \
                                                    const float* sw, int m, int n) {          \
        scale_out<T>(acc, y, sx, sw, m, n);                                                   \
    }

FP8_ACT_KERNELS(float, f32)
FP8_ACT_KERNELS(__nv_bfloat16, bf16)
FP8_ACT_KERNELS(__half, f16)
