// What every attention kernel shares: its argument struct, batch offsets, the element
// types and the online-softmax guards.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// NVRTC compiles without the C library headers, so math.h's INFINITY is not there.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

namespace cupyflash {

constexpr int MAX_BATCH_DIMS = 4;
constexpr float LN2 = 0.69314718055994531f;

// Arguments of every attention forward kernel, passed by value. Every field is 8 bytes
// wide so that the NumPy structured dtype built in _cupy_backend.py has this exact layout.
// Strides are in elements; each row (the last dimension) is contiguous.
struct AttentionParams {
    const void* q;                              // (batch..., Lq, D)
    const void* k;                              // (batch..., Lk, D)
    const void* v;                              // (batch..., Lk, Dv)
    void* o;                                    // (batch..., Lq, Dv)
    void* lse;                                  // (n_batch, Lq) contiguous, float (double for fp64)
    long long batch_size[MAX_BATCH_DIMS];       // broadcast batch shape, padded with 1s in front
    long long q_batch_stride[MAX_BATCH_DIMS];   // 0 where q is broadcast
    long long k_batch_stride[MAX_BATCH_DIMS];   // 0 where k is broadcast (grouped-query attention)
    long long v_batch_stride[MAX_BATCH_DIMS];
    long long o_batch_stride[MAX_BATCH_DIMS];
    long long q_row_stride, k_row_stride, v_row_stride, o_row_stride;
    long long n_batch;                          // product of batch_size
    long long Lq, Lk;                           // sequence lengths
    long long D, Dv;                            // head dims (the kernel's HEAD_DIM may be larger)
    double scale;                               // softmax scale
    double scale_log2;                          // scale * log2(e): exp(x * scale) = exp2(x * scale_log2)
};

// Extra arguments of the backward kernels, passed by value after AttentionParams (whose
// lse is then an input). dout has o's strides. delta, dq_accum, dk and dv are contiguous
// per batch element b of the broadcast batch (b in [0, n_batch)); the launcher sums dk and
// dv (and dq) over broadcast dimensions afterwards. With S = q k^T, P = exp(S * scale - lse)
// and dS = P * (dP - delta), dP = dO v^T:
//   delta[b, i]       = sum_d dO[i, d] * O[i, d]
//   dq_accum[b, i, :] = sum_j dS[i, j] * k[j, :]       (no scale: the launcher multiplies)
//   dk[b, j, :]       = scale * sum_i dS[i, j] * q[i, :]
//   dv[b, j, :]       = sum_i P[i, j] * dO[i, :]
struct BackwardParams {
    const void* dout;     // (batch..., Lq, Dv) with o's strides
    void* delta;          // (n_batch, Lq) float (double for fp64)
    void* dq_accum;       // (n_batch, Lq, grad_row) float (double for fp64)
    void* dk;             // (n_batch, Lk, grad_row) T
    void* dv;             // (n_batch, Lk, grad_row) T
    long long grad_row;   // row length of dq_accum, dk and dv (>= D and >= Dv)
    // The gradient of a bias (return_dbias; the variants kernels only): null, or an
    // accumulator of the bias's own shape in the accumulator type (float, double for
    // fp64), zero before the kernel, with its batch strides (in elements, 0 where the bias
    // broadcasts) as AttentionParams packs them, and its row and column strides (0 where
    // it broadcasts). dbias[b, i, j] += dS[i, j], atomically where several scores share an
    // element (dbias_atomic), else a plain store (each element's one score).
    void* dbias;
    long long dbias_batch_stride[MAX_BATCH_DIMS];
    long long dbias_row_stride, dbias_col_stride;
    long long dbias_atomic;
};

// Batch element b's part of bp.dbias (b in [0, n_batch), row-major unravel as
// batch_offsets), or null without one.
template <typename Acc>
__device__ __forceinline__ Acc* dbias_of(const AttentionParams& p, const BackwardParams& bp,
                                         long long b) {
    if (bp.dbias == nullptr) return nullptr;
    long long off = 0;
#pragma unroll
    for (int d = MAX_BATCH_DIMS - 1; d >= 0; --d) {
        off += (b % p.batch_size[d]) * bp.dbias_batch_stride[d];
        b /= p.batch_size[d];
    }
    return static_cast<Acc*>(bp.dbias) + off;
}

// dbias[i, j] of one batch element (from dbias_of) takes dS[i, j] = value.
template <typename Acc>
__device__ __forceinline__ void add_dbias(const BackwardParams& bp, Acc* dbias, long long i,
                                          long long j, Acc value) {
    Acc* const at = dbias + i * bp.dbias_row_stride + j * bp.dbias_col_stride;
    if (bp.dbias_atomic)
        atomicAdd(at, value);
    else
        *at = value;
}

// Element offsets of batch element b in q, k, v, o (b in [0, n_batch), row-major unravel).
struct BatchOffsets {
    long long q, k, v, o;
};

__device__ __forceinline__ BatchOffsets batch_offsets(const AttentionParams& p, long long b) {
    BatchOffsets off{0, 0, 0, 0};
#pragma unroll
    for (int d = MAX_BATCH_DIMS - 1; d >= 0; --d) {
        const long long i = b % p.batch_size[d];
        b /= p.batch_size[d];
        off.q += i * p.q_batch_stride[d];
        off.k += i * p.k_batch_stride[d];
        off.v += i * p.v_batch_stride[d];
        off.o += i * p.o_batch_stride[d];
    }
    return off;
}

// The tensors of batch element b: q, k, v, o at their batch offsets, and b's row of lse
// (LseT: float, or double for fp64).
template <typename T, typename LseT>
struct BatchPointers {
    const T* q;
    const T* k;
    const T* v;
    T* o;
    LseT* lse;
};

template <typename T, typename LseT>
__device__ __forceinline__ BatchPointers<T, LseT> batch_pointers(const AttentionParams& p,
                                                                 long long b) {
    const BatchOffsets off = batch_offsets(p, b);
    return {static_cast<const T*>(p.q) + off.q, static_cast<const T*>(p.k) + off.k,
            static_cast<const T*>(p.v) + off.v, static_cast<T*>(p.o) + off.o,
            static_cast<LseT*>(p.lse) + b * p.Lq};
}

// Online-softmax guards (the same rules in every kernel and in the NumPy backend):
// a row whose running max is -inf uses 0 as its max, so exp(-inf - 0) = 0 and no NaN
// appears; a row whose sum is 0 (it saw no key) gets an inverse of 0: zeros out.
template <typename T>
__device__ __forceinline__ T safe_max(T m) {
    return m == -INFINITY ? T(0) : m;
}

template <typename T>
__device__ __forceinline__ T safe_inverse(T l) {
    return l == T(0) ? T(0) : T(1) / l;
}

// Make this thread's shared-memory writes visible to the async proxy (bulk copies, TMA,
// wgmma's shared-memory operands) of an operation ordered after it (sm_90).
__device__ __forceinline__ void fence_proxy_async_shared() {
#if __CUDA_ARCH__ == 900
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

}  // namespace cupyflash
