// The attention variants of issue 6, as one score modifier shared by the forward and backward
// kernels:
//
//   s_ij = scale * q_i . k_j                       (the plain score)
//   s_ij = softcap * tanh(s_ij / softcap)          (softcap > 0)
//   s_ij = s_ij - slope_b * |i + diag - j|         (ALiBi, diag = Lk - Lq)
//   s_ij = s_ij + bias_b[i, j]                     (additive bias, any broadcast)
//   s_ij = -inf  unless  i + diag - left <= j <= i + diag + right  and  mask_b[i, j]
//
// in that order, as cupyflash.reference._scores applies them. Dropout acts after the
// softmax: the weights of O = W V are W = P * Z / (1 - dropout_p), with the keep mask Z of
// philox.cuh, while l_i and lse are P's (see the Dropout section below). The causal mask is the band
// with right = 0 (the launcher folds it into window_right), so a kernel built with
// variants needs no IS_CAUSAL of its own.
//
// Kernels work in "score units": log2 units for float accumulators (exp2 in the softmax,
// scale * log2 e folded into the score) and natural units for double. Every term above is
// multiplied by the same unit, so softcap, slope and bias are carried pre-multiplied.
#pragma once

#include "attention_common.cuh"
#include "philox.cuh"

namespace cupyflash {

// A window side that is not given: far past any length, and far from overflowing when
// lengths are added to it.
constexpr long long UNBOUNDED = 1LL << 62;

// Arguments of the variants, passed by value after AttentionParams. Every field is 8
// bytes wide (the NumPy structured dtype in _cupy_backend.py has this exact layout).
// bias and mask are read in place with their own element strides (0 where broadcast),
// so a (B, 1, 1, Lk) padding mask costs no copy. Batch strides follow AttentionParams'
// batch_size (the launcher collapses the batch dims of all tensors together).
struct VariantParams {
    const void* bias;                              // null, or (batch..., Lq, Lk) strided
    const void* mask;                              // null, or bool (one byte) (batch..., Lq, Lk)
    const void* slopes;                            // null, or (n_batch,) contiguous, the Acc type
    const long long* key_end;  // null, or (2 n_batch,): keys past key_end[b] are masked
                               // out, keys before key_end[n_batch + b] all kept
                               // (mask_key_end's output, for a row-broadcast mask)
    long long bias_batch_stride[MAX_BATCH_DIMS];
    long long mask_batch_stride[MAX_BATCH_DIMS];
    long long bias_row_stride, bias_col_stride;
    long long mask_row_stride, mask_col_stride;
    long long bias_is_float;    // 1: bias holds float; 0: it holds the kernel's element type
    long long window_left;      // query i sees keys [i + diag - left, i + diag + right];
    long long window_right;     // UNBOUNDED where a side is not limited
    double softcap;             // > 0: scores -> softcap * tanh(scores / softcap); 0: none
    // Packed sequences of attention_varlen (null for a dense batch): (n_seq + 1,) int32
    // prefix sums of the query and key lengths. The batch is then (1, n_seq, Hk, G) with a
    // sequence stride of 0, Lq and Lk are the longest lengths (they size the grid), and
    // each block attends the sequence of its batch element (sequence_params).
    const int* cu_seqlens_q;
    const int* cu_seqlens_k;
    // Dropout on the probabilities (a runtime switch: only kernels launched with it pay for
    // Philox): dropout_scale = 1 / (1 - dropout_p), or 0 without dropout; a score is kept
    // iff its Philox word >= dropout_threshold = floor(dropout_p * 2^32) under the key
    // dropout_seed (philox.cuh).
    unsigned long long dropout_seed;
    long long dropout_threshold;
    double dropout_scale;
    // 1: flash_fwd_wgmma_local has computed the batch elements whose row-broadcast mask
    // keeps a prefix of the keys (key_end[n_batch + b] >= key_end[b]), and the variants
    // kernel skips them; 0 otherwise.
    long long prefix_masks_done;
};

// The AttentionParams of batch element b = (seq, h) of a packed batch (vp.cu_seqlens_q not
// null): the lengths of sequence seq, q, k, v and o moved to its first rows, and lse moved
// so that its row r of head h lands at lse[h * total_q + cu_q[seq] + r], FlashAttention's
// (H, total_q) layout (the kernels write row r of batch element b at lse + b * Lq + r).
// q_row0 and k_row0 get the first query and key row, for kernels that read through tensor
// maps. A local copy: only the fields the kernels read survive, in registers.
template <typename T, typename LseT>
__device__ __forceinline__ AttentionParams sequence_params(const AttentionParams& p,
                                                           const VariantParams& vp, long long b,
                                                           long long& q_row0, long long& k_row0) {
    const long long heads = p.batch_size[MAX_BATCH_DIMS - 2] * p.batch_size[MAX_BATCH_DIMS - 1];
    const long long seq = b / heads, h = b - seq * heads;
    const long long total_q = vp.cu_seqlens_q[p.batch_size[MAX_BATCH_DIMS - 3]];  // cu_q[n_seq]
    q_row0 = vp.cu_seqlens_q[seq];
    k_row0 = vp.cu_seqlens_k[seq];
    AttentionParams s = p;
    s.Lq = vp.cu_seqlens_q[seq + 1] - q_row0;
    s.Lk = vp.cu_seqlens_k[seq + 1] - k_row0;
    s.q = static_cast<const T*>(p.q) + q_row0 * p.q_row_stride;
    s.k = static_cast<const T*>(p.k) + k_row0 * p.k_row_stride;
    s.v = static_cast<const T*>(p.v) + k_row0 * p.v_row_stride;
    s.o = static_cast<T*>(p.o) + q_row0 * p.o_row_stride;
    // (the offset may be negative for b * Lq past the target: only the sum is dereferenced)
    s.lse = static_cast<LseT*>(p.lse) + (h * total_q + q_row0 - b * s.Lq);
    return s;
}

// The modifier of one batch element, in score units of Acc (float: log2, double: natural).
// T is the kernel's element type (a bias either has it or is float). It keeps only what
// depends on the batch element (bias and mask offsets, the slope) and the softcap in score
// units; everything else is read from the kernel parameters p and vp when needed, so it
// costs the kernels' main loops a handful of registers.
template <typename T, typename Acc>
struct ScoreModifier {
    static constexpr Acc UNIT = sizeof(Acc) == 4 ? Acc(1.4426950408889634) : Acc(1);  // log2 e

    const AttentionParams& p;
    const VariantParams& vp;
    long long bias_off, mask_off;  // element offsets of batch element b in bias and mask
    Acc slope_u;                   // slope * UNIT (0 without ALiBi)
    Acc cap_u, inv_cap_u;          // softcap * UNIT and its inverse (0 without softcap)
    long long key_end;             // keys past it are masked out for every row (<= Lk)
    long long dense_end;           // keys before it are kept for every row (0: unknown)

    __device__ __forceinline__ ScoreModifier(const AttentionParams& p_, const VariantParams& vp_,
                                             long long b)
        : p(p_), vp(vp_), bias_off(0), mask_off(0) {
        long long rest = b;
#pragma unroll
        for (int d = MAX_BATCH_DIMS - 1; d >= 0; --d) {
            const long long i = rest % p.batch_size[d];
            rest /= p.batch_size[d];
            bias_off += i * vp.bias_batch_stride[d];
            mask_off += i * vp.mask_batch_stride[d];
        }
        slope_u = vp.slopes != nullptr ? static_cast<const Acc*>(vp.slopes)[b] * UNIT : Acc(0);
        cap_u = static_cast<Acc>(vp.softcap) * UNIT;
        inv_cap_u = vp.softcap > 0 ? Acc(1) / cap_u : Acc(0);
        key_end = vp.key_end != nullptr ? vp.key_end[b] : p.Lk;
        dense_end = vp.key_end != nullptr ? vp.key_end[p.n_batch + b] : 0;
    }

    // Whether any score may need more than the band test (the SIMT kernels' test).
    __device__ __forceinline__ bool changes_scores() const {
        return changes_values() || vp.mask != nullptr;
    }

    // Whether every score needs a change (bias, ALiBi or softcap): then apply() runs on
    // every key block, not only on those that cross the band or hold masked keys.
    __device__ __forceinline__ bool changes_values() const {
        return vp.bias != nullptr || vp.slopes != nullptr || vp.softcap > 0;
    }

    // Whether the mask can hide a key of block [n0, n0 + block_n) from this warp's rows,
    // decided by the whole warp (the result is warp-uniform). A mask broadcast along the
    // rows (a (B, 1, 1, Lk) padding mask: row stride 0) that keeps every key of the block
    // hides none: the warp reads the block's bytes, block_n / 32 a lane, and skips the
    // per-score test; before dense_end (a padding mask's length) it knows without reading.
    __device__ __forceinline__ bool warp_needs_mask(long long n0, int block_n) const {
        if (vp.mask == nullptr) return false;
        if (vp.mask_row_stride != 0) return true;
        if (n0 + block_n <= dense_end) return false;
        const unsigned char* row = static_cast<const unsigned char*>(vp.mask) + mask_off;
        bool kept = true;
        for (int c = threadIdx.x % 32; c < block_n; c += 32) {
            const long long j = n0 + c;
            kept &= j >= p.Lk || row[j * vp.mask_col_stride] != 0;
        }
        return !__all_sync(0xffffffffu, kept);
    }

    // The variants on one m16 x (8 N_TILES) tile of S in the accumulator layout of
    // mma.sync and wgmma: this thread holds rows i0 and i0 + 8 (s[nt][0..1] and
    // s[nt][2..3]) and columns n0 + 8 nt + 2 t + {0, 1}. Scores are in score units (the
    // mask and the band alone, which only set -inf, also take unscaled scores).
    // band: the tile crosses the band's edges, Lk or Lq (block_inside is false); mask: the
    // mask can hide a key here (warp_needs_mask). Each part is one pass over the tile
    // behind a uniform test; the per-score work is 32-bit (column offsets inside the tile
    // are compile-time constants plus 2 t), the 64-bit arithmetic is done once per row.
    // Memory is read only for scores inside [0, Lq) x [0, Lk).
    template <int N_TILES>
    __device__ __forceinline__ void apply(float (&s)[N_TILES][4], long long i0, long long n0,
                                          int t, bool band, bool mask) const {
        constexpr int COLS = 8 * N_TILES;
        const long long diag = p.Lk - p.Lq;
        const long long j0 = n0 + 2 * t;  // the key of column offset 0 of this thread
        // Columns c (offsets from j0) that exist: c < cols_in.
        const int cols_in = static_cast<int>(p.Lk - j0 < COLS ? p.Lk - j0 : COLS);
        if (cap_u > Acc(0)) {
#pragma unroll
            for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[nt][e] = cap_u * tanh_(s[nt][e] * inv_cap_u);
        }
        if (vp.slopes != nullptr) {  // s -= slope |i + diag - j|, j = j0 + c (slopes of any sign)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                // exact while |i + diag - j0| < 2^24 (float), else within two roundings
                const Acc a = static_cast<Acc>(i0 + 8 * h + diag - j0);
#pragma unroll
                for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
                    for (int e = 2 * h; e < 2 * h + 2; ++e)
                        s[nt][e] -= slope_u * fabs(a - static_cast<Acc>(8 * nt + (e & 1)));
            }
        }
        if (vp.bias != nullptr && vp.bias_row_stride == 0) {  // one value per column, both rows
            const long long row = bias_off + j0 * vp.bias_col_stride;
            const long long cs = vp.bias_col_stride;
#pragma unroll
            for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = 8 * nt + e;
                    if (c < cols_in) {
                        const Acc x = bias_at(row + c * cs) * UNIT;
                        s[nt][e] += x;
                        s[nt][e + 2] += x;
                    }
                }
        } else if (vp.bias != nullptr) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const long long i = i0 + 8 * h;
                if (i >= p.Lq) continue;
                const long long row = bias_off + i * vp.bias_row_stride + j0 * vp.bias_col_stride;
                const long long cs = vp.bias_col_stride;
#pragma unroll
                for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
                    for (int e = 2 * h; e < 2 * h + 2; ++e) {
                        const int c = 8 * nt + (e & 1);
                        if (c < cols_in) s[nt][e] += bias_at(row + c * cs) * UNIT;
                    }
            }
        }
        if (mask) {
            const unsigned char* m = static_cast<const unsigned char*>(vp.mask) + mask_off;
            const long long cs = vp.mask_col_stride;
            if (vp.mask_row_stride == 0) {  // one byte per column serves both rows
                const unsigned char* row = m + j0 * cs;
#pragma unroll
                for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int c = 8 * nt + e;
                        if (!(c < cols_in && row[c * cs])) s[nt][e] = s[nt][e + 2] = -INFINITY;
                    }
            } else {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const long long i = i0 + 8 * h;
                    const unsigned char* row = m + i * vp.mask_row_stride + j0 * cs;
                    const bool row_in = i < p.Lq;
#pragma unroll
                    for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
                        for (int e = 2 * h; e < 2 * h + 2; ++e) {
                            const int c = 8 * nt + (e & 1);
                            if (!(row_in && c < cols_in && row[c * cs])) s[nt][e] = -INFINITY;
                        }
                }
            }
        }
        if (band) {  // keys outside [i + diag - left, i + diag + right], past Lk; rows past Lq
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const long long i = i0 + 8 * h;
                const long long centre = i + diag - j0;
                // visible offsets [lo, hi], clamped into [-1, COLS] so that they fit an int
                long long lo = centre - vp.window_left, hi = centre + vp.window_right;
                hi = hi < cols_in - 1 ? hi : cols_in - 1;
                if (i >= p.Lq) hi = -1;
                lo = lo < 0 ? 0 : (lo > COLS ? COLS : lo);
                hi = hi < -1 ? -1 : hi;
                const int lo32 = static_cast<int>(lo), hi32 = static_cast<int>(hi);
#pragma unroll
                for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
                    for (int e = 2 * h; e < 2 * h + 2; ++e) {
                        const int c = 8 * nt + (e & 1);
                        if (c < lo32 || c > hi32) s[nt][e] = -INFINITY;
                    }
            }
        }
    }

    __device__ __forceinline__ Acc bias_at(long long at) const {
        return vp.bias_is_float ? static_cast<Acc>(static_cast<const float*>(vp.bias)[at])
                                : static_cast<Acc>(static_cast<const T*>(vp.bias)[at]);
    }

    // Key blocks [first, end) that can hold a visible key of query rows [m0, m_end).
    __device__ __forceinline__ void key_blocks(long long m0, long long m_end, int block_n,
                                               int& first, int& end) const {
        const long long diag = p.Lk - p.Lq;
        long long lo = m0 + diag - vp.window_left;            // first key of the first row
        long long hi = (m_end - 1) + diag + vp.window_right + 1;  // past the last row's last
        lo = lo < 0 ? 0 : lo;
        hi = hi > key_end ? key_end : hi;
        if (hi <= lo) {
            first = end = 0;
            return;
        }
        first = static_cast<int>(lo / block_n);
        end = static_cast<int>((hi + block_n - 1) / block_n);
    }

    // Query blocks [first, end) that can see a key of [n0, n_end) (the backward's loop
    // over query blocks for one key block): query i sees key j only if
    // j - diag - right <= i <= j - diag + left.
    __device__ __forceinline__ void query_blocks(long long n0, long long n_end, int block_m,
                                                 int& first, int& end) const {
        const long long diag = p.Lk - p.Lq;
        long long lo = n0 - diag - vp.window_right;
        long long hi = (n_end - 1) - diag + vp.window_left + 1;
        lo = lo < 0 ? 0 : lo;
        hi = hi > p.Lq ? p.Lq : hi;
        if (hi <= lo) {
            first = end = 0;
            return;
        }
        first = static_cast<int>(lo / block_m);
        end = static_cast<int>((hi + block_m - 1) / block_m);
    }

    // Whether every key of [n0, n0 + block_n) is inside the band of every row of
    // [m0, m0 + block_m) and before Lk (then only changes_scores() asks for modify()).
    __device__ __forceinline__ bool block_inside(long long m0, int block_m, long long n0,
                                                 int block_n) const {
        const long long diag = p.Lk - p.Lq;
        return n0 + block_n <= p.Lk && n0 >= m0 + block_m - 1 + diag - vp.window_left &&
               n0 + block_n - 1 <= m0 + diag + vp.window_right;
    }

    // The final score of (i, j) in score units, from the scaled score s (score units).
    // Keys past Lk, outside the band or masked out give -inf; nothing is read for them
    // or for rows past Lq.
    __device__ __forceinline__ Acc modify(Acc s, long long i, long long j) const {
        Acc th;  // (dead here: the forward needs no chain rule)
        return modify(s, i, j, th);
    }

    // As modify, and th = tanh(s / softcap), the capped score over softcap (0 without
    // softcap, and where the score is hidden): the backward's chain rule through the cap
    // is dS_raw = dS * (1 - th^2) (softcap_factor). Taken here, from the raw score in
    // fp32 or fp64, not recovered later from P = exp2(score - lse2): P rounded to 16 bits
    // would move th by 2^-9 / softcap, and 1 - th^2 by as much where the cap saturates
    // and the true factor is ~0.
    __device__ __forceinline__ Acc modify(Acc s, long long i, long long j, Acc& th) const {
        th = Acc(0);
        const long long centre = i + (p.Lk - p.Lq);
        if (!(i < p.Lq && j < p.Lk && j >= centre - vp.window_left &&
              j <= centre + vp.window_right))
            return -INFINITY;
        if (vp.mask != nullptr &&
            !static_cast<const unsigned char*>(vp.mask)[mask_off + i * vp.mask_row_stride +
                                                        j * vp.mask_col_stride])
            return -INFINITY;
        if (cap_u > Acc(0)) {
            th = tanh_(s * inv_cap_u);
            s = cap_u * th;
        }
        if (vp.slopes != nullptr) {
            const long long dist = centre >= j ? centre - j : j - centre;
            s -= slope_u * static_cast<Acc>(dist);
        }
        if (vp.bias != nullptr) {
            s += bias_at(bias_off + i * vp.bias_row_stride + j * vp.bias_col_stride) * UNIT;
        }
        return s;
    }

    // d(softcap tanh(x / softcap)) / dx = 1 - th^2, from modify's th (in [-1, 1]; the
    // product rounds at the size of 1, as 1 - T^2 of a naive computation does).
    static __device__ __forceinline__ Acc softcap_factor(Acc th) { return fma(-th, th, Acc(1)); }

    // tanh: for fp16/bf16 inputs 1 - 2 / (1 + e^2x) on the special-function unit (absolute
    // error ~1e-7, far below what rounding P to 16 bits costs); else the accurate library
    // tanh.
    static __device__ __forceinline__ float tanh_(float x) {
        if constexpr (sizeof(T) == 2) {
            float e, r;
            asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(e) : "f"(x * 2.8853900817779268f));  // 2 log2 e
            asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(1.f + e));
            return fmaf(-2.f, r, 1.f);
        } else {
            return tanhf(x);
        }
    }
    static __device__ __forceinline__ double tanh_(double x) { return tanh(x); }
};

// ---------------------------------------------------------------------------------------
// Dropout (VariantParams::dropout_scale > 0). The kernels keep l_i, lse and dS's P
// undropped and draw the keep mask Z of philox.cuh where the scores are: one
// philox4x32_10 call gives the words of four neighbouring keys 4u .. 4u + 3 of one query
// row, so the lanes that hold those keys split the calls between them and swap the keep
// bits by shuffles: one call per four scores a thread holds. Every helper below is called
// by all 32 lanes of a warp (shuffles), behind a test of vp that is uniform.
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ bool dropout_on(const VariantParams& vp) {
    return vp.dropout_scale > 0;
}

// Keep bits of keys j4 .. j4 + 3 (j4 % 4 == 0) of query row i of batch element b: bit w
// for key j4 + w.
__device__ __forceinline__ unsigned dropout_keep4(const VariantParams& vp, long long b,
                                                  long long i, long long j4) {
    const uint4 counter = make_uint4(static_cast<unsigned>(j4 >> 2), static_cast<unsigned>(i),
                                     static_cast<unsigned>(b),
                                     static_cast<unsigned>(static_cast<unsigned long long>(b) >> 32));
    const uint4 r = philox4x32_10(counter, make_uint2(static_cast<unsigned>(vp.dropout_seed),
                                                      static_cast<unsigned>(vp.dropout_seed >> 32)));
    const unsigned th = static_cast<unsigned>(vp.dropout_threshold);
    return static_cast<unsigned>(r.x >= th) | static_cast<unsigned>(r.y >= th) << 1 |
           static_cast<unsigned>(r.z >= th) << 2 | static_cast<unsigned>(r.w >= th) << 3;
}

// Keep bits of one m16 x n8 tile in the mma.sync accumulator layout with queries as rows
// (the forward, the deterministic dQ): bit e for element e, row i0 + 8 (e >> 1) (i0 the
// row of lane group g) and key j0 + 2 t + (e & 1) (j0 = the tile's first key, a multiple
// of 8). Lanes t and t ^ 1 hold the four keys j0 + 4 (t >> 1) + 0..3 of both rows: lane
// t draws row i0 + 8 (t & 1), and each passes the other its nibble.
__device__ __forceinline__ unsigned dropout_keep_mma(const VariantParams& vp, long long b,
                                                     long long i0, long long j0, int t) {
    const int w = t & 1;
    unsigned both = dropout_keep4(vp, b, i0 + 8 * w, j0 + 4 * (t >> 1)) << (4 * w);
    both |= __shfl_xor_sync(0xffffffffu, both, 1);  // nibble h: row i0 + 8h
    // element e: nibble e >> 1, key 2w + (e & 1) of the group
    return ((both >> (2 * w)) & 3u) | (((both >> (4 + 2 * w)) & 3u) << 2);
}

// The same for the transposed layout of flash_bwd_mma (keys as rows): bit e for key
// j0 + g + 8 (e >> 1) (j0 = the warp's first key, a multiple of 4) and query
// i0 + 2 t + (e & 1) (i0 = the tile's first query). The lanes g = 4v .. 4v + 3 of one t
// hold keys j0 + 4v + 0..3 and j0 + 4v + 8 + 0..3 of two queries, four groups: lane g
// draws group g & 3 (query i0 + 2 t + (g & 1), keys + 8 (g >> 1 & 1)), and two shuffles
// give every lane all four nibbles.
__device__ __forceinline__ unsigned dropout_keep_mma_t(const VariantParams& vp, long long b,
                                                       long long i0, long long j0, int g,
                                                       int t) {
    const int w = g & 3;
    unsigned all = dropout_keep4(vp, b, i0 + 2 * t + (w & 1), j0 + (g & ~3) + 8 * (w >> 1))
                   << (4 * w);
    all |= __shfl_xor_sync(0xffffffffu, all, 4);  // lane 4g + t: xor 4 flips g's bit 0
    all |= __shfl_xor_sync(0xffffffffu, all, 8);  // and xor 8 its bit 1
    // element e: nibble e, bit w (key g & 3 of the group)
    return ((all >> w) & 1u) | ((all >> (3 + w)) & 2u) | ((all >> (6 + w)) & 4u) |
           ((all >> (9 + w)) & 8u);
}

// Keep bits of the TM x TN scores of a SIMT thread: bit i * TN + jj for query row(i) and
// key key(jj), where key(jj) % 4 == lane4 and the lanes lane ^ 1, lane ^ 2, lane ^ 3
// hold the other keys of the same groups for the same rows (THREADS_PER_ROW a multiple
// of 4, tiles starting at multiples of 4). The four lanes draw the TM x TN groups in
// turns of four, one each (a turn past the end repeats the last group).
template <int TM, int TN, typename RowOf, typename KeyOf>
__device__ __forceinline__ unsigned dropout_keep_simt(const VariantParams& vp, long long b,
                                                      RowOf row, KeyOf key, int lane4) {
    constexpr int N = TM * TN;
    static_assert(N <= 32, "one bit per score in a 32-bit word");
    unsigned bits = 0;
#pragma unroll
    for (int turn = 0; turn < (N + 3) / 4; ++turn) {
        const int q = 4 * turn + lane4 < N ? 4 * turn + lane4 : N - 1;  // this lane's group
        unsigned all = dropout_keep4(vp, b, row(q / TN), key(q % TN) & ~3LL) << (4 * lane4);
        all |= __shfl_xor_sync(0xffffffffu, all, 1);
        all |= __shfl_xor_sync(0xffffffffu, all, 2);
#pragma unroll
        for (int k = 0; k < 4; ++k)  // score 4 turn + k: nibble k, bit lane4
            if (4 * turn + k < N) bits |= ((all >> (4 * k + lane4)) & 1u) << (4 * turn + k);
    }
    return bits;
}

// ScoreModifier with VARIANTS, else an empty stand-in (nothing computed, nothing read).
struct NoScoreModifier {
    __device__ __forceinline__ NoScoreModifier(const AttentionParams&, const VariantParams&,
                                               long long) {}
};
template <bool VARIANTS, typename T, typename Acc> struct ScoreModifierSelect {
    using type = ScoreModifier<T, Acc>;
};
template <typename T, typename Acc> struct ScoreModifierSelect<false, T, Acc> {
    using type = NoScoreModifier;
};
template <bool VARIANTS, typename T, typename Acc>
using ScoreModifierIf = typename ScoreModifierSelect<VARIANTS, T, Acc>::type;

// For a mask broadcast along the rows (a (B, 1, 1, Lk) padding mask), per batch element b
// of AttentionParams' batch: key_end[b], one past the last key it keeps (0 if it keeps
// none), and key_end[n_batch + b], its first hidden key (Lk if none). The forward kernels
// take it as VariantParams::key_end: they skip the key blocks past the first, and read no
// mask byte for the blocks before the second, so that padding costs no products and no
// mask reads. One block of THREADS per batch element (grid-stride).
// (A template only so that the modules which include this header do not all build it.)
template <int MASK_KEY_END_THREADS>
__global__ void __launch_bounds__(MASK_KEY_END_THREADS)
mask_key_end(const AttentionParams p, const VariantParams vp, long long* key_end) {
    __shared__ long long warp_last[MASK_KEY_END_THREADS / 32];
    __shared__ long long warp_first[MASK_KEY_END_THREADS / 32];
    for (long long b = blockIdx.x; b < p.n_batch; b += gridDim.x) {
        const ScoreModifier<float, float> mod(p, vp, b);
        const unsigned char* row = static_cast<const unsigned char*>(vp.mask) + mod.mask_off;
        long long last = -1, first = p.Lk;  // last kept key, first hidden key
        for (long long j = threadIdx.x; j < p.Lk; j += MASK_KEY_END_THREADS) {
            if (row[j * vp.mask_col_stride]) last = j;
            else if (j < first) first = j;
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) {
            const long long other_last = __shfl_xor_sync(0xffffffffu, last, offset);
            const long long other_first = __shfl_xor_sync(0xffffffffu, first, offset);
            last = other_last > last ? other_last : last;
            first = other_first < first ? other_first : first;
        }
        if (threadIdx.x % 32 == 0) {
            warp_last[threadIdx.x / 32] = last;
            warp_first[threadIdx.x / 32] = first;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 1; w < MASK_KEY_END_THREADS / 32; ++w) {
                last = warp_last[w] > last ? warp_last[w] : last;
                first = warp_first[w] < first ? warp_first[w] : first;
            }
            key_end[b] = last + 1;
            key_end[p.n_batch + b] = first;
        }
        __syncthreads();  // warp_last, warp_first are read before the next b overwrites them
    }
}

}  // namespace cupyflash
