// softmax, log_softmax and logsumexp over the rows of a contiguous (n_rows, row_len) array.
//
// Pass 1 reads a row once and keeps its running max m and running sum
// d = sum_j exp(x_j - shift(m)) together: the online normaliser of Milakov & Gimelshein
// (2018). Partial normalisers of threads, warps and blocks merge exactly with one rule:
//
//     m = max(m_a, m_b);  d = d_a * exp(m_a - shift(m)) + d_b * exp(m_b - shift(m))
//
// where shift(m) = m if m is finite, else 0 (as in _numpy_backend.softmax_family): a row of
// only -inf gives d = 0 and lse = -inf; a row with +inf gives d = +inf and lse = +inf;
// NaN reaches d through exp(NaN) and gives NaN. The old max is used unshifted in
// exp(m_a - shift(m)), so a normaliser that has seen only -inf (d = 0) contributes
// exp(-inf) = 0, never 0 * inf. Then lse = log(d) + shift(m), and pass 2 writes
//
//     log_softmax = (x - shift(m)) - log(d)',  softmax = exp(log_softmax),
//     log(d)' = (d == 0 ? 0 : log(d)),
//
// not x - lse: lse rounds log(d) to the spacing of m (for m = 3e38 it would be lost).
//
// Three kernels:
// - softmax_rows: a group of tpr (8..512, a power of two) threads per row holds the whole
//   row in registers (SoftmaxRowVecs 16-byte vectors per thread): the input is read once.
// - softmax_partials + softmax_finish: rows too long for that (or too few to fill the GPU)
//   are cut into segments of seg_vecs vectors; softmax_partials writes each segment's
//   (m, d), softmax_finish merges a row's partials in a fixed order and writes its segment
//   (the input is read twice).
// - softmax_cluster (sm_90): rows of up to SOFTMAX_CLUSTER times what softmax_rows holds,
//   split over the SOFTMAX_CLUSTER blocks of one thread-block cluster, each holding its
//   segment in registers; the blocks merge their (m, d) through distributed shared
//   memory, so the input is still read once.
// Every merge happens in a fixed order, so results are bitwise reproducible.
//
// Layout: x and y are 16-byte aligned and rows follow each other (row r starts at element
// r * row_len), so a row's first ((-r * row_len) mod VEC) elements (its head) and its last
// elements past the 16-byte vectors (its tail) are read one at a time.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// NVRTC compiles without the C library headers, so math.h's INFINITY is not there.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

namespace cupyflash {

// the numbers _cupy_backend.softmax_family passes
enum SoftmaxKind : int { KIND_SOFTMAX = 0, KIND_LOG_SOFTMAX = 1, KIND_LOGSUMEXP = 2 };

constexpr int SOFTMAX_ROW_MAX_THREADS = 512;
constexpr int SOFTMAX_SPLIT_THREADS = 256;  // threads of softmax_partials / softmax_finish
constexpr int SOFTMAX_SPLIT_UNROLL = 4;     // vectors in flight per thread in those

// Element type -> accumulation type (float, double for double), conversions and exp/log.
// Half and bfloat16 use the fast __expf: its error is far below their rounding.
template <typename T> struct SoftmaxElem;

template <> struct SoftmaxElem<float> {
    using Acc = float;
    static __device__ __forceinline__ Acc to_acc(float x) { return x; }
    static __device__ __forceinline__ float from_acc(Acc x) { return x; }
    static __device__ __forceinline__ Acc exp(Acc x) { return expf(x); }
    static __device__ __forceinline__ Acc log(Acc x) { return logf(x); }
};

template <> struct SoftmaxElem<double> {
    using Acc = double;
    static __device__ __forceinline__ Acc to_acc(double x) { return x; }
    static __device__ __forceinline__ double from_acc(Acc x) { return x; }
    static __device__ __forceinline__ Acc exp(Acc x) { return ::exp(x); }
    static __device__ __forceinline__ Acc log(Acc x) { return ::log(x); }
};

template <> struct SoftmaxElem<__half> {
    using Acc = float;
    static __device__ __forceinline__ Acc to_acc(__half x) { return __half2float(x); }
    static __device__ __forceinline__ __half from_acc(Acc x) { return __float2half_rn(x); }
    static __device__ __forceinline__ Acc exp(Acc x) { return __expf(x); }
    static __device__ __forceinline__ Acc log(Acc x) { return logf(x); }
};

template <> struct SoftmaxElem<__nv_bfloat16> {
    using Acc = float;
    static __device__ __forceinline__ Acc to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
    static __device__ __forceinline__ __nv_bfloat16 from_acc(Acc x) { return __float2bfloat16_rn(x); }
    static __device__ __forceinline__ Acc exp(Acc x) { return __expf(x); }
    static __device__ __forceinline__ Acc log(Acc x) { return logf(x); }
};

// Vectors a thread of softmax_rows holds (64 registers; 32 for 16-bit types, whose
// float copies also take registers): rows up to 32k elements (16k for float64).
template <typename T> struct SoftmaxRowVecs { static constexpr int value = sizeof(T) == 2 ? 8 : 16; };

// 16 bytes of T: one vector load or store.
template <typename T>
struct alignas(16) Packed16 {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};

// max that skips NaN (IEEE maxNum): m stays a number and NaN reaches the result through d
__device__ __forceinline__ float acc_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double acc_max(double a, double b) { return fmax(a, b); }

// Products and sums rounded one by one (no FMA contraction), so that merge(a, b) and
// merge(b, a) give the same bits and every lane of a shuffle butterfly agrees.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// The running (m, d) of some elements of one row.
template <typename T>
struct OnlineNormaliser {
    using E = SoftmaxElem<T>;
    using Acc = typename E::Acc;
    Acc m;  // max of the elements seen; NaN elements are skipped here (they reach d)
    Acc d;  // sum of exp(x - shift(m)) over the elements seen

    static __device__ __forceinline__ Acc shift(Acc m) { return isfinite(m) ? m : Acc(0); }

    static __device__ __forceinline__ OnlineNormaliser empty() { return {Acc(-INFINITY), Acc(0)}; }

    // (m, d) of N values at once: one exp per value, none to rescale.
    template <int N>
    static __device__ __forceinline__ OnlineNormaliser of(const Acc (&x)[N]) {
        Acc m = Acc(-INFINITY);
#pragma unroll
        for (int k = 0; k < N; ++k) m = acc_max(m, x[k]);
        const Acc s = shift(m);
        Acc d = Acc(0);
#pragma unroll
        for (int k = 0; k < N; ++k) d += E::exp(x[k] - s);
        return {m, d};
    }

    // The merge rule: exact for -inf, +inf and NaN (see the top of this file).
    __device__ __forceinline__ void merge(const OnlineNormaliser& o) {
        const Acc m_new = acc_max(m, o.m);
        const Acc s = shift(m_new);
        d = add_rn(mul_rn(d, E::exp(m - s)), mul_rn(o.d, E::exp(o.m - s)));
        m = m_new;
    }

    // natural-log logsumexp of the elements seen: -inf for none or only -inf
    __device__ __forceinline__ Acc lse() const { return E::log(d) + shift(m); }

    // log(d), with 0 for d = 0 (none or only -inf: then x - shift(m) - 0 = -inf)
    __device__ __forceinline__ Acc log_d_safe() const {
        const Acc log_d = E::log(d);
        return log_d == Acc(-INFINITY) ? Acc(0) : log_d;
    }
};

// Merge over aligned groups of `width` lanes (a power of two <= 32) by a butterfly; every
// lane of a group ends with the same bits. All 32 lanes of the warp must call it.
template <typename T>
__device__ __forceinline__ OnlineNormaliser<T> merge_lanes(OnlineNormaliser<T> a, int width) {
    for (int lane_mask = 1; lane_mask < width; lane_mask *= 2) {
        OnlineNormaliser<T> b;
        b.m = __shfl_xor_sync(0xffffffffu, a.m, lane_mask);
        b.d = __shfl_xor_sync(0xffffffffu, a.d, lane_mask);
        a.merge(b);
    }
    return a;
}

// Merge over groups of `width` threads (a power of two, 64..1024, whole warps) through
// shared memory, given each warp's merged normaliser (merge_lanes(a, 32) first): lane 0 of
// every warp publishes it, then every thread merges its group's warps in order. Every
// thread of the block must call it; every thread of a group gets the same bits.
template <typename T>
__device__ __forceinline__ OnlineNormaliser<T> merge_warps(OnlineNormaliser<T> a, int width,
                                                           typename OnlineNormaliser<T>::Acc* warp_m,
                                                           typename OnlineNormaliser<T>::Acc* warp_d) {
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
        warp_m[warp] = a.m;
        warp_d[warp] = a.d;
    }
    __syncthreads();  // every warp's (m, d) is in shared memory
    const int first = warp / (width / 32) * (width / 32);
    OnlineNormaliser<T> r = OnlineNormaliser<T>::empty();
    for (int w = first; w < first + width / 32; ++w) r.merge({warp_m[w], warp_d[w]});
    __syncthreads();  // every thread has read warp_m, warp_d: the next call may overwrite them
    return r;
}

// The geometry of one row: its head (elements before the first 16-byte boundary), its
// 16-byte vectors, its tail.
struct RowSpan {
    long long start;  // element offset of the row
    int head;
    long long n_vec;
    int tail;
};

template <int VEC>
__device__ __forceinline__ RowSpan row_span(long long row, long long row_len) {
    RowSpan r;
    r.start = row * row_len;
    const long long to_boundary = (VEC - r.start % VEC) % VEC;
    r.head = static_cast<int>(to_boundary < row_len ? to_boundary : row_len);
    r.n_vec = (row_len - r.head) / VEC;
    r.tail = static_cast<int>(row_len - r.head - r.n_vec * VEC);
    return r;
}

// log_softmax = (x - shift(m)) - log(d)', softmax = exp(log_softmax) of one value, as in
// _numpy_backend.softmax_family
template <typename T>
__device__ __forceinline__ typename SoftmaxElem<T>::Acc normalised(
        int kind, typename SoftmaxElem<T>::Acc x, typename SoftmaxElem<T>::Acc shift_m,
        typename SoftmaxElem<T>::Acc log_d) {
    const typename SoftmaxElem<T>::Acc r = (x - shift_m) - log_d;
    return kind == KIND_SOFTMAX ? SoftmaxElem<T>::exp(r) : r;
}

// the same for the VEC values of a vector
template <typename T, int N>
__device__ __forceinline__ void normalise(int kind, typename SoftmaxElem<T>::Acc shift_m,
                                          typename SoftmaxElem<T>::Acc log_d,
                                          const Packed16<T>& x, Packed16<T>& y) {
    using E = SoftmaxElem<T>;
#pragma unroll
    for (int k = 0; k < N; ++k)
        y.v[k] = E::from_acc(normalised<T>(kind, E::to_acc(x.v[k]), shift_m, log_d));
}

// ----------------------------------------------------------------------------------------
// One group of tpr = 2^log2_tpr threads per row, the row held in registers (KIND is a
// template parameter: with it run-time, the compiler kept both output paths' temporaries
// live and spilled at 16 vectors per thread). Block: 256
// threads (tpr <= 256) or tpr threads. The launcher guarantees that a row has at most
// tpr * SoftmaxRowVecs<T>::value vectors and that tpr >= VEC (a thread holds at most one
// head and one tail element). Output y: (n_rows, row_len) for softmax and log_softmax,
// (n_rows,) for logsumexp.
// ----------------------------------------------------------------------------------------
template <typename T, SoftmaxKind KIND>
__global__ void __launch_bounds__(SOFTMAX_ROW_MAX_THREADS)
softmax_rows(const T* __restrict__ x, T* __restrict__ y, long long n_rows, long long row_len,
             int log2_tpr) {
    using E = SoftmaxElem<T>;
    using Acc = typename E::Acc;
    using Norm = OnlineNormaliser<T>;
    constexpr int VEC = Packed16<T>::N;
    constexpr int VECS = SoftmaxRowVecs<T>::value;
    __shared__ Acc warp_m[SOFTMAX_ROW_MAX_THREADS / 32];
    __shared__ Acc warp_d[SOFTMAX_ROW_MAX_THREADS / 32];

    const int tpr = 1 << log2_tpr;
    const int lane = threadIdx.x & (tpr - 1);  // this thread's place in its row's group
    const long long rows_per_block = blockDim.x >> log2_tpr;
    const long long group = threadIdx.x >> log2_tpr;
    // The launcher's promises (see above); trap (a launch error) rather than read past a row.
    if (blockDim.x > SOFTMAX_ROW_MAX_THREADS || blockDim.x % tpr != 0 || tpr < VEC ||
        row_len / VEC > static_cast<long long>(tpr) * VECS)
        __trap();

    // Every thread runs the same number of iterations (the bound depends on the block
    // only), so the shuffles and __syncthreads below are reached by all.
    for (long long row0 = blockIdx.x * rows_per_block; row0 < n_rows;
         row0 += static_cast<long long>(gridDim.x) * rows_per_block) {
        const long long row = row0 + group;
        const bool active = row < n_rows;
        const RowSpan span = row_span<VEC>(active ? row : 0, row_len);
        const int n_vec = static_cast<int>(span.n_vec);  // <= 512 * VECS here
        // this thread's vectors: lane, lane + tpr, ...: `mine` of them
        const int mine = active && lane < n_vec ? (n_vec - lane + tpr - 1) >> log2_tpr : 0;
        const int tail_at = span.head + n_vec * VEC;
        const T* xr = x + span.start;
        const T* x_vec = xr + span.head + lane * VEC;

        // -- load: this thread's vectors, and one head and one tail element at most
        Packed16<T> cache[VECS];  // (VECS, VEC) of this thread's part of the row
        const bool has_head = active && lane < span.head;
        const bool has_tail = active && lane < span.tail;
        Acc edge[2];  // head and tail element; -inf where absent (no weight, no max)
        edge[0] = has_head ? E::to_acc(xr[lane]) : Acc(-INFINITY);
        edge[1] = has_tail ? E::to_acc(xr[tail_at + lane]) : Acc(-INFINITY);
#pragma unroll
        for (int i = 0; i < VECS; ++i)
            if (i < mine) cache[i] = *reinterpret_cast<const Packed16<T>*>(x_vec + i * tpr * VEC);

        // -- pass 1: this thread's max, then its sum of exp(x - shift(max)); then the row's
        Acc m = acc_max(edge[0], edge[1]);
#pragma unroll
        for (int i = 0; i < VECS; ++i)
            if (i < mine)
#pragma unroll
                for (int k = 0; k < VEC; ++k) m = acc_max(m, E::to_acc(cache[i].v[k]));
        const Acc s = Norm::shift(m);
        Acc d = E::exp(edge[0] - s) + E::exp(edge[1] - s);
#pragma unroll
        for (int i = 0; i < VECS; ++i)
            if (i < mine)
#pragma unroll
                for (int k = 0; k < VEC; ++k) d += E::exp(E::to_acc(cache[i].v[k]) - s);
        Norm row_norm{m, d};
        row_norm = merge_lanes(row_norm, tpr < 32 ? tpr : 32);
        if (tpr > 32) row_norm = merge_warps(row_norm, tpr, warp_m, warp_d);

        // -- pass 2, from registers
        if (KIND == KIND_LOGSUMEXP) {
            if (active && lane == 0) y[row] = E::from_acc(row_norm.lse());
            continue;
        }
        const Acc shift_m = Norm::shift(row_norm.m);
        const Acc log_d = row_norm.log_d_safe();
        T* yr = y + span.start;
        if (has_head) yr[lane] = E::from_acc(normalised<T>(KIND, edge[0], shift_m, log_d));
        if (has_tail) yr[tail_at + lane] = E::from_acc(normalised<T>(KIND, edge[1], shift_m, log_d));
        T* y_vec = yr + span.head + lane * VEC;
#pragma unroll
        for (int i = 0; i < VECS; ++i) {
            if (i < mine) {
                Packed16<T> out;
                normalise<T, VEC>(KIND, shift_m, log_d, cache[i], out);
                *reinterpret_cast<Packed16<T>*>(y_vec + i * tpr * VEC) = out;
            }
        }
    }
}

// ----------------------------------------------------------------------------------------
// Long rows. Row r is cut into n_seg segments of seg_vecs vectors (the last one shorter);
// segment 0 also owns the head, the last segment the tail. Grid: (n_seg, rows): block
// (s, r) handles segment s of rows r, r + gridDim.y, ... partial: (n_rows, n_seg, 2) of
// Acc, (m, d) per segment.
// ----------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(SOFTMAX_SPLIT_THREADS, 1)
softmax_partials(const T* __restrict__ x, typename SoftmaxElem<T>::Acc* __restrict__ partial,
                 long long n_rows, long long row_len, long long n_seg, long long seg_vecs) {
    using E = SoftmaxElem<T>;
    using Acc = typename E::Acc;
    using Norm = OnlineNormaliser<T>;
    constexpr int VEC = Packed16<T>::N;
    constexpr int UNROLL = SOFTMAX_SPLIT_UNROLL;
    __shared__ Acc warp_m[SOFTMAX_SPLIT_THREADS / 32];
    __shared__ Acc warp_d[SOFTMAX_SPLIT_THREADS / 32];
    if (blockDim.x != SOFTMAX_SPLIT_THREADS) __trap();  // the loops below assume it

    const long long seg = blockIdx.x;
    for (long long row = blockIdx.y; row < n_rows; row += gridDim.y) {
        const RowSpan span = row_span<VEC>(row, row_len);
        const T* xr = x + span.start;
        const long long v_begin = seg * seg_vecs;
        const long long v_end = v_begin + seg_vecs < span.n_vec ? v_begin + seg_vecs : span.n_vec;

        // -- pass 1 over the segment: UNROLL vectors in flight, then one update for them all
        Norm norm = Norm::empty();
        Acc edge[2];
        edge[0] = seg == 0 && threadIdx.x < span.head ? E::to_acc(xr[threadIdx.x]) : Acc(-INFINITY);
        edge[1] = seg == n_seg - 1 && threadIdx.x < span.tail
                      ? E::to_acc(xr[span.head + span.n_vec * VEC + threadIdx.x]) : Acc(-INFINITY);
        norm.merge(Norm::of(edge));
        for (long long v0 = v_begin + threadIdx.x; v0 < v_end;
             v0 += static_cast<long long>(UNROLL) * SOFTMAX_SPLIT_THREADS) {
            Packed16<T> in[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const long long v = v0 + static_cast<long long>(u) * SOFTMAX_SPLIT_THREADS;
                if (v < v_end) in[u] = *reinterpret_cast<const Packed16<T>*>(xr + span.head + v * VEC);
            }
            Acc vals[UNROLL * VEC];  // absent vectors count as -inf
#pragma unroll
            for (int u = 0; u < UNROLL; ++u)
#pragma unroll
                for (int k = 0; k < VEC; ++k)
                    vals[u * VEC + k] = v0 + static_cast<long long>(u) * SOFTMAX_SPLIT_THREADS < v_end
                                            ? E::to_acc(in[u].v[k]) : Acc(-INFINITY);
            norm.merge(Norm::of(vals));
        }
        norm = merge_warps(merge_lanes(norm, 32), SOFTMAX_SPLIT_THREADS, warp_m, warp_d);
        if (threadIdx.x == 0) {
            partial[2 * (row * n_seg + seg)] = norm.m;
            partial[2 * (row * n_seg + seg) + 1] = norm.d;
        }
    }
}

// Merge a row's partials (thread t: partials t, t + 256, ..., then the block in order),
// then write segment blockIdx.x of softmax / log_softmax, or, for logsumexp (launched
// with gridDim.x = 1), the row's lse. Grid: (n_seg or 1, rows) as for softmax_partials.
template <typename T>
__global__ void __launch_bounds__(SOFTMAX_SPLIT_THREADS, 1)
softmax_finish(const T* __restrict__ x, T* __restrict__ y,
               const typename SoftmaxElem<T>::Acc* __restrict__ partial, long long n_rows,
               long long row_len, long long n_seg, long long seg_vecs, int kind) {
    using E = SoftmaxElem<T>;
    using Acc = typename E::Acc;
    using Norm = OnlineNormaliser<T>;
    constexpr int VEC = Packed16<T>::N;
    constexpr int UNROLL = SOFTMAX_SPLIT_UNROLL;
    __shared__ Acc warp_m[SOFTMAX_SPLIT_THREADS / 32];
    __shared__ Acc warp_d[SOFTMAX_SPLIT_THREADS / 32];
    if (blockDim.x != SOFTMAX_SPLIT_THREADS) __trap();  // the loops below assume it

    const long long seg = blockIdx.x;
    for (long long row = blockIdx.y; row < n_rows; row += gridDim.y) {
        Norm norm = Norm::empty();
        for (long long s = threadIdx.x; s < n_seg; s += SOFTMAX_SPLIT_THREADS)
            norm.merge({partial[2 * (row * n_seg + s)], partial[2 * (row * n_seg + s) + 1]});
        norm = merge_warps(merge_lanes(norm, 32), SOFTMAX_SPLIT_THREADS, warp_m, warp_d);
        if (kind == KIND_LOGSUMEXP) {
            if (threadIdx.x == 0) y[row] = E::from_acc(norm.lse());
            continue;
        }

        // -- pass 2 over the segment: read x again, write y
        const Acc shift_m = Norm::shift(norm.m);
        const Acc log_d = norm.log_d_safe();
        const RowSpan span = row_span<VEC>(row, row_len);
        const T* xr = x + span.start;
        T* yr = y + span.start;
        if (seg == 0 && threadIdx.x < span.head)
            yr[threadIdx.x] =
                E::from_acc(normalised<T>(kind, E::to_acc(xr[threadIdx.x]), shift_m, log_d));
        const long long tail_at = span.head + span.n_vec * VEC;
        if (seg == n_seg - 1 && threadIdx.x < span.tail)
            yr[tail_at + threadIdx.x] =
                E::from_acc(normalised<T>(kind, E::to_acc(xr[tail_at + threadIdx.x]), shift_m, log_d));
        const long long v_begin = seg * seg_vecs;
        const long long v_end = v_begin + seg_vecs < span.n_vec ? v_begin + seg_vecs : span.n_vec;
        for (long long v0 = v_begin + threadIdx.x; v0 < v_end;
             v0 += static_cast<long long>(UNROLL) * SOFTMAX_SPLIT_THREADS) {
            Packed16<T> in[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const long long v = v0 + static_cast<long long>(u) * SOFTMAX_SPLIT_THREADS;
                if (v < v_end) in[u] = *reinterpret_cast<const Packed16<T>*>(xr + span.head + v * VEC);
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const long long v = v0 + static_cast<long long>(u) * SOFTMAX_SPLIT_THREADS;
                if (v < v_end) {
                    Packed16<T> out;
                    normalise<T, VEC>(kind, shift_m, log_d, in[u], out);
                    *reinterpret_cast<Packed16<T>*>(yr + span.head + v * VEC) = out;
                }
            }
        }
    }
}

// ----------------------------------------------------------------------------------------
// Rows too long for one block, on sm_90: one cluster of SOFTMAX_CLUSTER blocks of 512
// threads per row. Block `rank` of the cluster holds vectors [rank * seg, (rank + 1) * seg)
// of the row in registers (seg = ceil(n_vec / SOFTMAX_CLUSTER) <= 512 * SoftmaxRowVecs),
// merges its (m, d), publishes it in its shared memory, and every block merges the
// cluster's SOFTMAX_CLUSTER normalisers in rank order from distributed shared memory. The
// launcher guarantees row_len % VEC == 0 (every row 16-byte aligned: no head or tail) and
// the segment bound. Grid: x = SOFTMAX_CLUSTER * (rows in flight); cluster c handles rows
// c, c + gridDim.x / SOFTMAX_CLUSTER, ... Built as a stub that traps below sm_90.
// ----------------------------------------------------------------------------------------
constexpr int SOFTMAX_CLUSTER = 8;  // the portable maximum cluster size

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define CUPYFLASH_SOFTMAX_CLUSTER_DIMS __cluster_dims__(SOFTMAX_CLUSTER, 1, 1)
#else
#define CUPYFLASH_SOFTMAX_CLUSTER_DIMS
#endif

__device__ __forceinline__ unsigned cluster_rank() {
    unsigned r = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
#endif
    return r;
}

// Every thread of every block of the cluster arrives; shared-memory writes before it are
// visible to the whole cluster after it.
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;\n"
                 "barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}

// A value in block `rank`'s shared memory at the address of `local` in this block's.
template <typename A>
__device__ __forceinline__ A load_from_rank(const A* local, unsigned rank) {
    A v = A(0);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    unsigned remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n"
                 : "=r"(remote) : "r"(static_cast<unsigned>(__cvta_generic_to_shared(local))), "r"(rank));
    if constexpr (sizeof(A) == 8)
        asm volatile("ld.shared::cluster.f64 %0, [%1];\n" : "=d"(v) : "r"(remote) : "memory");
    else
        asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(remote) : "memory");
#endif
    return v;
}

template <typename T, SoftmaxKind KIND>
__global__ void CUPYFLASH_SOFTMAX_CLUSTER_DIMS __launch_bounds__(SOFTMAX_ROW_MAX_THREADS, 1)
softmax_cluster(const T* __restrict__ x, T* __restrict__ y, long long n_rows, long long row_len) {
    using E = SoftmaxElem<T>;
    using Acc = typename E::Acc;
    using Norm = OnlineNormaliser<T>;
    constexpr int VEC = Packed16<T>::N;
    constexpr int VECS = SoftmaxRowVecs<T>::value;
    constexpr int THREADS = SOFTMAX_ROW_MAX_THREADS;
    __shared__ Acc warp_m[THREADS / 32];
    __shared__ Acc warp_d[THREADS / 32];
    __shared__ Acc block_norm[2];  // this block's (m, d), read by the whole cluster
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ < 900
    __trap();  // clusters need sm_90; the launcher never picks this kernel below it
#endif
    const long long n_vec = row_len / VEC;
    const long long seg = (n_vec + SOFTMAX_CLUSTER - 1) / SOFTMAX_CLUSTER;
    // The launcher's promises; trap (a launch error) rather than read past a row.
    if (blockDim.x != THREADS || row_len % VEC != 0 || seg > static_cast<long long>(THREADS) * VECS)
        __trap();
    const unsigned rank = cluster_rank();
    const long long v_begin = rank * seg;
    const long long v_end = v_begin + seg < n_vec ? v_begin + seg : n_vec;
    // vectors v_begin + threadIdx.x + i * THREADS, i < mine (the same for every row)
    const long long my_first = v_begin + threadIdx.x;
    const int mine = my_first < v_end ? static_cast<int>((v_end - my_first + THREADS - 1) / THREADS) : 0;

    for (long long row = blockIdx.x / SOFTMAX_CLUSTER; row < n_rows;
         row += gridDim.x / SOFTMAX_CLUSTER) {
        const T* x_vec = x + row * row_len + my_first * VEC;
        Packed16<T> cache[VECS];
#pragma unroll
        for (int i = 0; i < VECS; ++i)
            if (i < mine) cache[i] = *reinterpret_cast<const Packed16<T>*>(x_vec + i * THREADS * VEC);

        // -- pass 1: this thread's (m, d), the block's, then the cluster's in rank order
        Acc m = Acc(-INFINITY);
#pragma unroll
        for (int i = 0; i < VECS; ++i)
            if (i < mine)
#pragma unroll
                for (int k = 0; k < VEC; ++k) m = acc_max(m, E::to_acc(cache[i].v[k]));
        const Acc s = Norm::shift(m);
        Acc d = Acc(0);
#pragma unroll
        for (int i = 0; i < VECS; ++i)
            if (i < mine)
#pragma unroll
                for (int k = 0; k < VEC; ++k) d += E::exp(E::to_acc(cache[i].v[k]) - s);
        Norm block = merge_warps(merge_lanes(Norm{m, d}, 32), THREADS, warp_m, warp_d);
        if (threadIdx.x == 0) {
            block_norm[0] = block.m;
            block_norm[1] = block.d;
        }
        cluster_sync();  // every block's (m, d) is published
        Norm row_norm = Norm::empty();
        for (unsigned r = 0; r < SOFTMAX_CLUSTER; ++r)
            row_norm.merge({load_from_rank(&block_norm[0], r), load_from_rank(&block_norm[1], r)});
        cluster_sync();  // every block has read them: block_norm may be rewritten, or freed

        // -- pass 2, from registers
        if (KIND == KIND_LOGSUMEXP) {
            if (rank == 0 && threadIdx.x == 0) y[row] = E::from_acc(row_norm.lse());
            continue;
        }
        const Acc shift_m = Norm::shift(row_norm.m);
        const Acc log_d = row_norm.log_d_safe();
        T* y_vec = y + row * row_len + my_first * VEC;
#pragma unroll
        for (int i = 0; i < VECS; ++i) {
            if (i < mine) {
                Packed16<T> out;
                normalise<T, VEC>(KIND, shift_m, log_d, cache[i], out);
                *reinterpret_cast<Packed16<T>*>(y_vec + i * THREADS * VEC) = out;
            }
        }
    }
}

}  // namespace cupyflash
