// The backward pass's preprocessing: delta_i = rowsum(dO_i * O_i), for every element type.
//
// delta is the term that makes the softmax's Jacobian cheap: with P = softmax(S) and
// dP = dO V^T, the gradient of the scores is dS = P * (dP - delta), since
// rowsum(P * dP) = rowsum(P * (dO V^T)) = rowsum(dO * (P V)) = rowsum(dO * O).
//
// One warp per query row; each lane reads 16-byte chunks of O and dO (the launcher gives
// rows that are 16-byte aligned, with a length padded to whole chunks by zeros).
#pragma once

#include "attention_common.cuh"

namespace cupyflash {

__device__ __forceinline__ float to_acc(__half x, float) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x, float) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(float x, float) { return x; }
__device__ __forceinline__ double to_acc(double x, double) { return x; }

// AccT: float, or double for double. Grid: x = row blocks of 8 rows (8 warps), batch in
// (y, z) as in launch_grid.
template <typename T, typename AccT>
__global__ void __launch_bounds__(256) flash_bwd_preprocess(const AttentionParams p,
                                                           const BackwardParams bp) {
    constexpr int CHUNK = 16 / sizeof(T);
    const long long b = (long long)blockIdx.z * gridDim.y + blockIdx.y;
    if (b >= p.n_batch) return;
    const long long row = (long long)blockIdx.x * 8 + threadIdx.x / 32;
    if (row >= p.Lq) return;
    const int lane = threadIdx.x % 32;

    const BatchOffsets off = batch_offsets(p, b);
    const T* o = static_cast<const T*>(p.o) + off.o + row * p.o_row_stride;
    const T* dout = static_cast<const T*>(bp.dout) + off.o + row * p.o_row_stride;
    const int chunks = (int)((p.Dv + CHUNK - 1) / CHUNK);
    AccT sum = 0;
    for (int c = lane; c < chunks; c += 32) {
        const uint4 ov = *reinterpret_cast<const uint4*>(o + c * CHUNK);
        const uint4 dv = *reinterpret_cast<const uint4*>(dout + c * CHUNK);
        const T* oe = reinterpret_cast<const T*>(&ov);
        const T* de = reinterpret_cast<const T*>(&dv);
#pragma unroll
        for (int e = 0; e < CHUNK; ++e) sum += to_acc(oe[e], AccT(0)) * to_acc(de[e], AccT(0));
    }
#pragma unroll
    for (int w = 16; w > 0; w /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, w);
    if (lane == 0) static_cast<AccT*>(bp.delta)[b * p.Lq + row] = sum;
}

__device__ __forceinline__ void from_acc(float x, __half* y) { *y = __float2half_rn(x); }
__device__ __forceinline__ void from_acc(float x, __nv_bfloat16* y) { *y = __float2bfloat16_rn(x); }
__device__ __forceinline__ void from_acc(float x, float* y) { *y = x; }
__device__ __forceinline__ void from_acc(double x, double* y) { *y = x; }

// y[r, c] = x[r, c] * scale for c < cols, in the accumulator type AccT (float, or double
// for double), from rows of x_row elements to contiguous rows of cols: the last step of
// the gradients (dq_accum * scale -> dq; a cast between T and float around the sum over
// broadcast dimensions). Grid-stride over n_rows * cols elements.
template <typename TIn, typename TOut, typename AccT>
__global__ void __launch_bounds__(256) scale_convert(const TIn* x, long long x_row, TOut* y,
                                                     long long n_rows, long long cols,
                                                     double scale) {
    const long long n = n_rows * cols;
    if (n < (1LL << 30) && n_rows * x_row < (1LL << 30)) {  // 32-bit index arithmetic (no overflow)
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (int)n; i += gridDim.x * blockDim.x) {
            const int r = i / (int)cols, c = i - r * (int)cols;
            from_acc(to_acc(x[r * (int)x_row + c], AccT(0)) * static_cast<AccT>(scale), y + i);
        }
        return;
    }
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / cols, c = i - r * cols;
        from_acc(to_acc(x[r * x_row + c], AccT(0)) * static_cast<AccT>(scale), y + i);
    }
}

// dq[b, i, c] = dq_tiles[...] * scale for c < cols, from the tiled fp32 accumulator of
// flash_bwd_wgmma (DqTiles in flash_bwd_wgmma.cuh: 64 x 64 tiles, tile (b, i / 64, c / 64)
// at ((b * m_blocks + i / 64) * slabs + c / 64) * 4096, element (i % 64, c % 64) at
// (i % 64) * 64 + ((c % 64) ^ 8 (i % 8))) to contiguous rows of cols elements of TOut.
// Grid-stride over n_batch * Lq * cols elements.
template <typename TOut>
__global__ void __launch_bounds__(256) dq_from_tiles(const float* dq_tiles, TOut* y,
                                                     long long n_batch, long long Lq,
                                                     long long cols, int slabs, double scale) {
    const long long n = n_batch * Lq * cols;
    const long long m_blocks = (Lq + 63) / 64;
    const float s = static_cast<float>(scale);
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long row = idx / cols;
        const int c = (int)(idx - row * cols);
        const long long b = row / Lq, i = row - b * Lq;
        const int r = (int)(i % 64);
        const long long tile = ((b * m_blocks + i / 64) * slabs + c / 64) * 4096;
        from_acc(dq_tiles[tile + r * 64 + ((c % 64) ^ ((r % 8) * 8))] * s, y + idx);
    }
}

}  // namespace cupyflash
