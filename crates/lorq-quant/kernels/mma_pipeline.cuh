// The pieces shared by the tensor-core kernels that stream a weight through registers (qmma_tiled.cuh,
// fp8_mma.cu): the register ring of K steps in flight, the fixed-order sum of the warps that split
// K inside a block, and the accumulators' output coordinates.
#pragma once

namespace mma_pipeline {

// Zeroes a lane's accumulators (RT m16 tiles x MT n8 tiles).
template <int RT, int MT> __device__ __forceinline__ void zero(float (&acc)[RT][MT][4]) {
#pragma unroll
    for (int a = 0; a < RT; a++)
#pragma unroll
        for (int b = 0; b < MT; b++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[a][b][c] = 0.f;
}

// Runs compute(buf[slot], step) for this warp's steps first, first + stride, ... < end, keeping
// PF + 1 steps' loads in flight: a ring slot is refilled right after its step is computed.
template <int PF, typename Frag, typename Load, typename Compute>
__device__ __forceinline__ void stream_steps(Frag (&buf)[PF + 1], int first, int stride, int end, Load& load,
                                             Compute& compute) {
#pragma unroll
    for (int u = 0; u <= PF; u++) {
        const int st = first + u * stride;
        if (st < end) load(buf[u], st);
    }
    for (int base = first; base < end; base += (PF + 1) * stride) {
#pragma unroll
        for (int u = 0; u <= PF; u++) {
            const int st = base + u * stride;
            if (st < end) {
                compute(buf[u], st);
                const int nx = st + (PF + 1) * stride;
                if (nx < end) load(buf[u], nx);
            }
        }
    }
}

// The WK warps of row group wr (K slices ws = 0..WK-1) add their accumulators in a fixed order
// (deterministic sums) through shared memory; slice 0 ends with the total. All threads of the
// block must call it. The lane is the fastest index of `red`, so a warp's stores of one
// accumulator hit 32 banks (with a row of NACC floats per lane they were 4- to 32-way bank
// conflicts: 93 % of the shared wavefronts in excess in Nsight Compute, 16-row c4 kernel).
template <int WK, int WR, int RT, int MT>
__device__ __forceinline__ void sum_k_slices(float (&acc)[RT][MT][4], float (&red)[WR][RT * MT * 4][32], int wr,
                                             int ws, int lane) {
    for (int s = 0; s < WK; s++) {
        if (ws == s) {
#pragma unroll
            for (int a = 0; a < RT; a++)
#pragma unroll
                for (int b = 0; b < MT; b++)
#pragma unroll
                    for (int c = 0; c < 4; c++) {
                        float& r = red[wr][(a * MT + b) * 4 + c][lane];
                        r = s == 0 ? acc[a][b][c] : r + acc[a][b][c];
                    }
        }
        __syncthreads();
    }
    if (ws == 0) {
#pragma unroll
        for (int a = 0; a < RT; a++)
#pragma unroll
            for (int b = 0; b < MT; b++)
#pragma unroll
                for (int c = 0; c < 4; c++) acc[a][b][c] = red[wr][(a * MT + b) * 4 + c][lane];
    }
}

// Calls store(n, m, v) for each accumulator of the lane (g, t): element e of tile (rt, nt) is output
// row nw + 16 rt + g (+ 8 for e >= 2) of activation row mb + 8 nt + 2t + (e & 1).
template <int RT, int MT, typename Store>
__device__ __forceinline__ void for_each_output(const float (&acc)[RT][MT][4], int nw, int mb, int g, int t,
                                                Store&& store) {
#pragma unroll
    for (int rt = 0; rt < RT; rt++)
#pragma unroll
        for (int nt = 0; nt < MT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                store(nw + rt * 16 + g + (e >= 2 ? 8 : 0), mb + nt * 8 + 2 * t + (e & 1), acc[rt][nt][e]);
}

}  // namespace mma_pipeline
