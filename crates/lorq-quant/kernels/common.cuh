// Helpers shared by the kernels in this folder: dtype conversion to and from f32 and 8-wide
// activation loads (candle's f32 / bf16 / f16 tensors).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

// SiLU(gate) * up from gate and up as stored in T, rounded as candle's separate ops round it: the
// SiLU to T, then the product (fused_ops.cu silu_mul_*; the GEMVs that fold it in round alike).
template <typename T> __device__ __forceinline__ T silu_mul_rounded(float g, float u) {
    const float a = to_f(from_f<T>(g / (1.f + expf(-g))));
    return from_f<T>(a * u);
}

// Warp reductions (xor butterfly: every lane combines in the same order, so all lanes hold the
// same bits). The sum of v over the 32 lanes of a warp, in every lane.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The largest v over the 32 lanes of a warp, in every lane.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Asynchronous 16-byte copies global -> shared through L2 (cp.async.cg: data written earlier in
// the same launch is seen), in commit groups; ok = false fills the 16 bytes with zeros.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool ok = true) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's newest commit groups are still in flight.
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Tensor-core fragments (mma.m16n8k16, f32 accumulators): two values packed as one register,
// ldmatrix of four 8x8 b16 matrices (row addresses from lanes 8j .. 8j + 7 for matrix j;
// .trans: each matrix transposed), and the mma d += a . b for bf16 or f16 operands.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
        static_assert(std::is_same_v<T, __half>, "bf16 or f16 operands");
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
}
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma16816<T>(d, a[0], a[1], a[2], a[3], b0, b1);
}

// 8 consecutive values as loaded (16 bytes for bf16/f16, 32 for f32), to convert later: loads can
// be issued long before their values are needed without holding 8 floats each.
// NC: through the read-only cache (__ldg); otherwise from L2 (__ldcg), for data written earlier
// in the same launch.
template <typename T> struct Pack8 { uint4 w[sizeof(T) / 2]; };
template <typename T, bool NC = true> __device__ __forceinline__ Pack8<T> ld_pack8(const T* p) {
    Pack8<T> r;
#pragma unroll
    for (int i = 0; i < (int)(sizeof(T) / 2); i++) {
        const uint4* v = reinterpret_cast<const uint4*>(p) + i;
        r.w[i] = NC ? __ldg(v) : __ldcg(v);
    }
    return r;
}
template <typename T> __device__ __forceinline__ void unpack8(const Pack8<T>& r, float (&o)[8]);
template <> __device__ __forceinline__ void unpack8<float>(const Pack8<float>& r, float (&o)[8]) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(r.w);
#pragma unroll
    for (int i = 0; i < 8; i++) o[i] = __uint_as_float(w[i]);
}
template <> __device__ __forceinline__ void unpack8<__nv_bfloat16>(const Pack8<__nv_bfloat16>& r, float (&o)[8]) {
    const uint32_t w[4] = {r.w[0].x, r.w[0].y, r.w[0].z, r.w[0].w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        o[2 * i] = __uint_as_float(w[i] << 16);
        o[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
template <> __device__ __forceinline__ void unpack8<__half>(const Pack8<__half>& r, float (&o)[8]) {
    const __half2* h = reinterpret_cast<const __half2*>(&r.w[0]);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __half22float2(h[i]);
        o[2 * i] = f.x;
        o[2 * i + 1] = f.y;
    }
}

// 8 consecutive activations as f32 (p 16-byte aligned).
template <typename T> __device__ __forceinline__ void load8(const T* p, float (&o)[8]) { unpack8<T>(ld_pack8<T>(p), o); }

// 8 consecutive values from f32 to T, stored at p (16-byte aligned; 32 bytes for f32).
template <typename T> __device__ __forceinline__ void store8(T* p, const float (&v)[8]);
template <> __device__ __forceinline__ void store8<float>(float* p, const float (&v)[8]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
template <> __device__ __forceinline__ void store8<__nv_bfloat16>(__nv_bfloat16* p, const float (&v)[8]) {
    __align__(16) __nv_bfloat162 h[4];
#pragma unroll
    for (int i = 0; i < 4; i++) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(h);
}
template <> __device__ __forceinline__ void store8<__half>(__half* p, const float (&v)[8]) {
    __align__(16) __half2 h[4];
#pragma unroll
    for (int i = 0; i < 4; i++) h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(h);
}

// Programmatic dependent launch (compute capability 9.0+, src/cuda/dependent_launch.rs): a kernel
// launched with it may start its blocks while the kernel ahead of it in the stream still runs, once
// every block of that kernel has called launch_dependents() (or exited). Such a kernel calls
// wait_for_producers() before it reads what an earlier kernel wrote or writes what an earlier
// kernel may read; until then it may only touch what no kernel writes (weights). Both are no-ops
// for a kernel launched without it.
__device__ __forceinline__ void wait_for_producers() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Up to two more weights of the same format and K sharing the activations (q/k/v, gate/up), in
// the same launch (qgemv.cu, qmma_tiled.cu): blocks [0, b1) compute weight 0 (the QARGS one, N rows), [b1, b2) weight 1,
// [b2, grid) weight 2; a single weight has b1 = b2 = grid. Each block runs the kernel body of
// one weight with that weight's pointers taken straight from the parameters (selecting them at
// run time would move them into registers and cost the hot loop occupancy).
struct QGroup {
    const uint32_t* codes[2];
    const float* scales[2];
    const float* zeros[2];
    void* y[2];
    int n[2];
    int b1, b2;
};

// n / gsize as __umulhi(n, group_magic(gsize)), exact while n * gsize < 2^32 (the hosts check
// K * gsize: gpu_layout::group_index_exact in qgemv.rs, qmma_tiled.rs, qwgmma.rs): the group of
// each chunk a lane loads, without the ~20 instructions of an integer division per load (lab,
// H200: part of the wgmma kernel's 14336x4096 at 128 rows 36.3 -> 33.4 us, session 27; part of
// the one-row half2 GEMV's gain, session 28).
__device__ __forceinline__ uint32_t group_magic(int gsize) { return 0xFFFFFFFFu / (uint32_t)gsize + 1u; }
