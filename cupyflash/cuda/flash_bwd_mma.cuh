// FlashAttention-2 backward for fp16 / bf16 on tensor cores (sm_80 and newer).
//
// The forward pass saved O and lse = logsumexp(S * scale) per query row; nothing of size
// Lq x Lk. The backward recomputes the scores block by block (delta = rowsum(dO * O) comes
// from flash_bwd_preprocess.cuh):
//
// flash_bwd_mma: one thread block per key block j (BLOCK_N keys), looping over the query
// blocks i that see it:
//
//   S^T  = K_j Q_i^T                                   (mma.sync, fp32)
//   P^T  = exp2(S^T * scale * log2 e - lse_i * log2 e)  (the forward's P, exactly normalised)
//   dP^T = V_j dO_i^T
//   dS^T = P^T * (dP^T - delta_i)
//   dV_j += P^T dO_i,   dK_j += dS^T Q_i               (registers, fp32)
//   dQ_i += dS_i K_j                                   (ATOMIC_DQ: fp32 atomics in global;
//                                                       on sm_90 bulk reduce-adds of rows)
//   at the end: dK_j *= scale
//
// The products are computed transposed (keys as rows), so that each warp owns 16 keys: the
// accumulator layout of P^T and dS^T is then the A-operand layout of P^T dO and dS^T Q, and
// they never leave the registers. Only dQ = dS K needs the keys as its k-dimension, across
// warps: dS^T goes through shared memory once, into one of two buffers, and dQ_i is
// computed during block i+1, right after the barrier that block needs anyway (one
// block-wide barrier per query block). dK and dV stay in registers for the whole loop;
// Q_i, dO_i, lse_i and delta_i stream through Q_BUFFERS shared-memory buffers (cp.async),
// so that with two buffers block i+1 loads while block i computes.
//
// flash_bwd_dq_mma (the deterministic mode): one thread block per query block i, looping
// over key blocks in a fixed order and keeping dQ_i in registers (the forward's layout:
// 16 query rows per warp): S = Q_i K_j^T, P, dP = dO_i V_j^T, dS, dQ_i += dS K_j. No
// atomics; flash_bwd_mma then runs with ATOMIC_DQ = false. It recomputes S and dP, two of
// the five products, once more.
//
// Head dims above 128: the fp32 dK and dV of 16 keys x HEAD_DIM would not fit in one warp's
// registers, so D_SPLIT = 2 warps share 16 keys, each keeping half of the columns of dK and
// dV and both computing that S^T and dP^T (the price: those two products twice).
#pragma once

#include "flash_fwd_mma.cuh"

namespace cupyflash {

template <typename T_, int HEAD_DIM_, int BLOCK_M_, int NUM_WARPS_, int D_SPLIT_, int Q_BUFFERS_>
struct BwdMmaTraits {
    using T = T_;
    static constexpr int HEAD_DIM = HEAD_DIM_;
    static constexpr int BLOCK_M = BLOCK_M_;                 // query rows per inner step
    static constexpr int NUM_WARPS = NUM_WARPS_;
    static constexpr int NUM_THREADS = 32 * NUM_WARPS;
    static constexpr int D_SPLIT = D_SPLIT_;                 // warps sharing 16 keys
    static constexpr int BLOCK_N = 16 * NUM_WARPS / D_SPLIT; // keys per thread block
    static constexpr int Q_BUFFERS = Q_BUFFERS_;

    static constexpr int S_N_TILES = BLOCK_M / 8;            // n8 tiles of S^T per warp
    static constexpr int QK_K_STEPS = HEAD_DIM / 16;         // k16 steps of K Q^T and V dO^T
    static constexpr int M_K_STEPS = BLOCK_M / 16;           // k16 steps of P^T dO, dS^T Q
    static constexpr int KV_COLS = HEAD_DIM / D_SPLIT;       // columns of dK, dV per warp
    static constexpr int KV_N_TILES = KV_COLS / 8;

    // dQ_i = dS K_j: (BLOCK_M x HEAD_DIM) split into m16 row tiles x column groups.
    static constexpr int DQ_ROW_TILES = BLOCK_M / 16;
    static constexpr int DQ_COL_GROUPS = NUM_WARPS / DQ_ROW_TILES;
    static constexpr int DQ_COLS = HEAD_DIM / DQ_COL_GROUPS;
    static constexpr int DQ_N_TILES = DQ_COLS / 8;
    static constexpr int N_K_STEPS = BLOCK_N / 16;           // k16 steps of dS K
    // dQ's columns in two passes where its fp32 tile is large (fewer live registers).
    static constexpr int DQ_PASSES = DQ_N_TILES >= 8 ? 2 : 1;

    static constexpr int CHUNK = 16 / sizeof(T);
    static constexpr int ROW_CHUNKS = HEAD_DIM / CHUNK;
    static constexpr int SMEM_ROW = (HEAD_DIM + 8 * CHUNK - 1) / (8 * CHUNK) * (8 * CHUNK);
    static constexpr int DS_ROW = (BLOCK_M + 8 * CHUNK - 1) / (8 * CHUNK) * (8 * CHUNK);

    // Shared memory: K_j, V_j; Q_BUFFERS x (Q_i, dO_i); dS^T; Q_BUFFERS x (lse_i, delta_i).
    static constexpr int KV_TILE = BLOCK_N * SMEM_ROW;
    static constexpr int Q_TILE = BLOCK_M * SMEM_ROW;
    static constexpr int DS_TILE = BLOCK_N * DS_ROW;
    // dS^T of block i is written during block i and read (for dQ_i) during block i+1: two
    // buffers, so that no barrier is needed between the two.
    static constexpr int SMEM_ELEMS = 2 * KV_TILE + 2 * Q_BUFFERS * Q_TILE + 2 * DS_TILE;
    static constexpr int SMEM_BYTES = SMEM_ELEMS * sizeof(T) + 2 * Q_BUFFERS * BLOCK_M * 4;
    // sm_90 with ATOMIC_DQ: dQ_i is staged in fp32 after that and added to global memory by
    // bulk reduce-adds. Rows padded by 8 floats: float2 stores of 8 rows x 4 lanes then
    // fill 32 banks twice, and each row stays 16-byte aligned for the bulk copy.
    static constexpr int DQ_STAGE_ROW = HEAD_DIM + 8;
    static constexpr int DQ_STAGE_BYTES = BLOCK_M * DQ_STAGE_ROW * 4;

    static_assert(sizeof(T) == 2, "tensor-core path is for fp16 and bf16");
    static_assert(HEAD_DIM % (16 * D_SPLIT) == 0 && DQ_COLS % 16 == 0, "column split");
    static_assert(BLOCK_M % 16 == 0 && NUM_WARPS % DQ_ROW_TILES == 0, "dQ warp layout");
    static_assert(Q_BUFFERS == 1 || Q_BUFFERS == 2, "one or two Q/dO buffers");
};

// Element offset of (row, chunk) in a swizzled tile of ROW-element rows (see swizzle()).
template <typename T, int ROW>
__device__ __forceinline__ int swizzle_row(int row, int chunk) {
    return row * ROW + ((chunk ^ (row & 7)) * (16 / (int)sizeof(T)));
}

// Two T in one register -> two floats (the inverse of pack2).
template <typename T> __device__ __forceinline__ float2 unpack2(unsigned x);
template <> __device__ __forceinline__ float2 unpack2<__half>(unsigned x) {
    return __half22float2(*reinterpret_cast<__half2*>(&x));
}
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(unsigned x) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&x));
}

// P^T (or dS^T) as A fragments: the accumulator n8 tiles 2kk and 2kk+1 form k16 step kk.
template <typename T, int S_N_TILES>
__device__ __forceinline__ void to_a_fragments(const float (&s)[S_N_TILES][4],
                                               unsigned (&a)[S_N_TILES / 2][4]) {
#pragma unroll
    for (int kk = 0; kk < S_N_TILES / 2; ++kk) {
        a[kk][0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
        a[kk][1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
        a[kk][2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        a[kk][3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
}

// C (+)= A B^T over HEAD_DIM for one warp: A = 16 rows of sA starting at a_row0, B = the
// rows of sB (n8 tiles 0..N_TILES-1), both row-major swizzled (HEAD_DIM contiguous).
// This is S = Q K^T, S^T = K Q^T, dP = dO V^T and dP^T = V dO^T alike.
template <typename Tr, int N_TILES>
__device__ __forceinline__ void gemm_abt(float (&c)[N_TILES][4], const typename Tr::T* sA,
                                         int a_row0, const typename Tr::T* sB) {
    using T = typename Tr::T;
    const int lane = lane_id_volatile();
    auto step = [&](int kk, auto first) {
        unsigned a[4];
        ldmatrix_x4(a, sA + swizzle<Tr>(a_row0 + (lane & 15), 2 * kk + (lane >> 4)));
#pragma unroll
        for (int nt = 0; nt < N_TILES; nt += 2) {
            unsigned bk[4];
            ldmatrix_x4(bk, sB + swizzle<Tr>(nt * 8 + (lane & 7) + ((lane >> 4) << 3),
                                              2 * kk + ((lane >> 3) & 1)));
            mma_16816<T, decltype(first)::value>(c[nt], a, bk[0], bk[1]);
            mma_16816<T, decltype(first)::value>(c[nt + 1], a, bk[2], bk[3]);
        }
    };
    step(0, BoolConst<true>{});
    // Not unrolled: kk only moves addresses, and the loop keeps the ldmatrix results of one
    // step live at a time (the d = 128 kernels sit at ptxas's 255-register limit).
#pragma unroll 1
    for (int kk = 1; kk < Tr::QK_K_STEPS; ++kk) step(kk, BoolConst<false>{});
}

// C += A B for one warp: A from registers (K_STEPS k16 fragments), B = rows [0, 16 K_STEPS)
// of the row-major swizzled sB (k-major), columns [col_tile0 * 8, + 8 N_TILES).
// This is dV += P^T dO, dK += dS^T Q and dQ += dS K.
template <typename Tr, int K_STEPS, int N_TILES>
__device__ __forceinline__ void gemm_ab_reg(float (&c)[N_TILES][4], const unsigned (&a)[K_STEPS][4],
                                            const typename Tr::T* sB, int col_tile0) {
    using T = typename Tr::T;
    const int lane = lane_id_volatile();
#pragma unroll
    for (int kk = 0; kk < K_STEPS; ++kk)
#pragma unroll
        for (int nt = 0; nt < N_TILES; nt += 2) {
            unsigned bv[4];
            ldmatrix_x4_trans(bv, sB + swizzle<Tr>(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3),
                                                    col_tile0 + nt + (lane >> 4)));
            mma_16816<T>(c[nt], a[kk], bv[0], bv[1]);
            mma_16816<T>(c[nt + 1], a[kk], bv[2], bv[3]);
        }
}

// Bulk reduce-add (sm_90): global[0, bytes) += shared[0, bytes) in fp32, done by the
// copy engine; the issuing thread tracks it as one bulk group.
__device__ __forceinline__ void bulk_reduce_add_f32(float* gmem, const float* smem, int bytes) {
#if __CUDA_ARCH__ == 900
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
                 ::"l"(gmem), "r"(smem_addr(smem)), "r"(bytes) : "memory");
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}
// Wait until this thread's bulk copies have read their shared memory (READ_ONLY) or are
// complete.
template <bool READ_ONLY>
__device__ __forceinline__ void bulk_wait() {
#if __CUDA_ARCH__ == 900
    if (READ_ONLY) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
    else asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
#endif
}

template <int N_TILES>
__device__ __forceinline__ void zero(float (&c)[N_TILES][4]) {
#pragma unroll
    for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) c[nt][e] = 0.f;
}

// lse in log2 units for the exponent P = exp2(S * scale_log2 - lse2). A row past Lq or a
// row that saw no key in the forward (lse = -inf, its output is 0) gets +inf: P = 0.
__device__ __forceinline__ float lse_log2(const float* lse, long long row, long long Lq) {
    constexpr float LOG2E = 1.4426950408889634f;
    if (row >= Lq) return INFINITY;
    const float x = lse[row];
    return x == -INFINITY ? INFINITY : x * LOG2E;
}

// Stage a warp's 16 rows x (N_TILES * 8) columns of an fp32 accumulator, times `mul`, into
// a swizzled tile of T (rows row0.., columns from col_tile0 * 8).
template <typename Tr, int N_TILES>
__device__ __forceinline__ void stage_rows(typename Tr::T* smem, const float (&c)[N_TILES][4],
                                           int row0, int col_tile0, float mul) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
            *reinterpret_cast<unsigned*>(smem + swizzle<Tr>(row0 + g + 8 * h, col_tile0 + nt) + 2 * t) =
                pack2<typename Tr::T>(c[nt][2 * h] * mul, c[nt][2 * h + 1] * mul);
}

// 16-byte stores of rows [0, ROWS) of a swizzled tile to dst rows (row0 + r) * row_len,
// rows past n_rows skipped; all HEAD_DIM columns (the launcher's buffers are that wide).
template <typename Tr, int ROWS>
__device__ __forceinline__ void store_tile(typename Tr::T* dst, const typename Tr::T* smem,
                                           long long row0, long long n_rows, long long row_len) {
    for (int idx = threadIdx.x; idx < ROWS * Tr::ROW_CHUNKS; idx += Tr::NUM_THREADS) {
        const int r = idx / Tr::ROW_CHUNKS, c = idx % Tr::ROW_CHUNKS;
        if (row0 + r < n_rows)
            *reinterpret_cast<uint4*>(dst + (row0 + r) * row_len + c * Tr::CHUNK) =
                *reinterpret_cast<const uint4*>(smem + swizzle<Tr>(r, c));
    }
}

// ---------------------------------------------------------------------------------------
// dK, dV (and, with ATOMIC_DQ, dQ): one thread block per key block
// ---------------------------------------------------------------------------------------
// flash_bwd_mma and flash_bwd_mma_variants (bias, mask, window with causal folded in,
// ALiBi, softcap, dropout: attention_variants.cuh; vp is read only with VARIANTS) share
// this body. Dropout redraws the forward's keep mask Z: dV_j += (P^T * Z^T) dO_i /
// (1 - dropout_p) and dS^T = P^T * (dP^T * Z^T / (1 - dropout_p) - delta_i), delta from
// the dropped O. Softcap: dS^T of the raw scores, dS^T * (1 - th^2) with th = tanh(raw
// score * scale / softcap) (ScoreModifier::modify), the gradient dK and dQ need.
template <typename T, int HEAD_DIM, int BLOCK_M, int NUM_WARPS, int D_SPLIT, int Q_BUFFERS,
          bool IS_CAUSAL, bool ATOMIC_DQ, bool VARIANTS>
__device__ __forceinline__ void flash_bwd_mma_body(const AttentionParams& p,
                                                   const BackwardParams& bp,
                                                   const VariantParams& vp) {
    using Tr = BwdMmaTraits<T, HEAD_DIM, BLOCK_M, NUM_WARPS, D_SPLIT, Q_BUFFERS>;
    constexpr int BLOCK_N = Tr::BLOCK_N, S_N_TILES = Tr::S_N_TILES;

    const long long b = (long long)blockIdx.z * gridDim.y + blockIdx.y;
    if (b >= p.n_batch) return;
    const long long n0 = (long long)blockIdx.x * BLOCK_N;  // first key of this block

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int key_row0 = (warp / D_SPLIT) * 16;          // this warp's 16 keys in the block
    const int kv_col_tile0 = (warp % D_SPLIT) * Tr::KV_N_TILES;  // its columns of dK, dV

    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* sK = reinterpret_cast<T*>(smem_raw);
    T* sV = sK + Tr::KV_TILE;
    T* sQ0 = sV + Tr::KV_TILE;                      // Q_BUFFERS x Q_TILE
    T* sdO0 = sQ0 + Q_BUFFERS * Tr::Q_TILE;         // Q_BUFFERS x Q_TILE
    T* sdS0 = sdO0 + Q_BUFFERS * Tr::Q_TILE;        // dS^T: 2 x (BLOCK_N, DS_ROW)
    float* sLse0 = reinterpret_cast<float*>(sdS0 + 2 * Tr::DS_TILE);  // Q_BUFFERS x BLOCK_M
    float* sDelta0 = sLse0 + Q_BUFFERS * BLOCK_M;               // Q_BUFFERS x BLOCK_M
    float* sdQ = sDelta0 + Q_BUFFERS * BLOCK_M;  // sm_90: (BLOCK_M, DQ_STAGE_ROW) fp32

    const BatchOffsets off = batch_offsets(p, b);
    const T* q = static_cast<const T*>(p.q) + off.q;
    const T* k = static_cast<const T*>(p.k) + off.k;
    const T* v = static_cast<const T*>(p.v) + off.v;
    const T* dout = static_cast<const T*>(bp.dout) + off.o;
    const float* lse = static_cast<const float*>(p.lse) + b * p.Lq;
    const float* delta = static_cast<const float*>(bp.delta) + b * p.Lq;
    // With VARIANTS and return_dbias: dbias of b; written by one warp of each D_SPLIT group
    // (the others compute the same dS^T).
    float* const dbias =
        VARIANTS && warp % D_SPLIT == 0 ? dbias_of<float>(p, bp, b) : nullptr;

    // Query blocks that see this key block: causal, query i sees key j iff j <= i + diag.
    // With variants, those the window's band allows.
    const long long diag = p.Lk - p.Lq;
    const ScoreModifierIf<VARIANTS, T, float> mod(p, vp, b);
    int m_block_begin, m_block_end;
    if constexpr (VARIANTS) {
        mod.query_blocks(n0, min(n0 + BLOCK_N, p.Lk), BLOCK_M, m_block_begin, m_block_end);
    } else {
        const long long m_first = IS_CAUSAL ? max(n0 - diag, 0LL) : 0LL;
        m_block_begin = (int)min(m_first / BLOCK_M, (p.Lq + BLOCK_M - 1) / BLOCK_M);
        m_block_end = (int)((p.Lq + BLOCK_M - 1) / BLOCK_M);
    }

    auto load_q_block = [&](int m_block) {
        const int buf = m_block % Q_BUFFERS;
        const long long m0 = (long long)m_block * BLOCK_M;
        load_tile<Tr, BLOCK_M>(sQ0 + buf * Tr::Q_TILE, q, p.q_row_stride, m0, p.Lq, p.D);
        load_tile<Tr, BLOCK_M>(sdO0 + buf * Tr::Q_TILE, dout, p.o_row_stride, m0, p.Lq, p.Dv);
        for (int r = threadIdx.x; r < BLOCK_M; r += Tr::NUM_THREADS) {
            sLse0[buf * BLOCK_M + r] = lse_log2(lse, m0 + r, p.Lq);
            sDelta0[buf * BLOCK_M + r] = m0 + r < p.Lq ? delta[m0 + r] : 0.f;
        }
    };

    load_tile<Tr, BLOCK_N>(sK, k, p.k_row_stride, n0, p.Lk, p.D);
    load_tile<Tr, BLOCK_N>(sV, v, p.v_row_stride, n0, p.Lk, p.Dv);
    if (m_block_begin < m_block_end) load_q_block(m_block_begin);
    cp_async_commit();

    float dk[Tr::KV_N_TILES][4], dv[Tr::KV_N_TILES][4];
    zero(dk);
    zero(dv);
    const float scale_log2 = static_cast<float>(p.scale_log2);

    // dQ_i += dS_i K_j from dS^T of query block mb (complete in shared memory), by m16 row
    // tiles x column groups of warps, added to dq_accum in global memory: on sm_90 each warp
    // stages its fp32 tile and adds it row by row with bulk reduce-adds (lanes 0-15, one
    // row each: no block barrier); elsewhere with fp32 atomics.
    const int dq_row_tile = warp / Tr::DQ_COL_GROUPS;
    const int dq_col_tile0 = (warp % Tr::DQ_COL_GROUPS) * Tr::DQ_N_TILES;
    auto dq_step = [&](int mb) {
        const long long m0 = (long long)mb * BLOCK_M;
        const T* sdS = sdS0 + (mb % 2) * Tr::DS_TILE;
        float* dq_accum = static_cast<float*>(bp.dq_accum) + (b * p.Lq + m0) * bp.grad_row;
#if __CUDA_ARCH__ == 900
        if (lane < 16) bulk_wait<true>();  // this warp's previous rows have left sdQ
        __syncwarp();
#endif
        // In DQ_PASSES column passes, so that fewer fp32 accumulators are live at once.
#pragma unroll
        for (int pass = 0; pass < Tr::DQ_PASSES; ++pass) {
            constexpr int N_TILES = Tr::DQ_N_TILES / Tr::DQ_PASSES;
            const int col_tile0 = dq_col_tile0 + pass * N_TILES;
            float dq[N_TILES][4];
            zero(dq);
            const int ln = lane_id_volatile();
#pragma unroll
            for (int kk = 0; kk < Tr::N_K_STEPS; ++kk) {
                unsigned ads[4];  // dS as A: rows = queries, k = keys (a transposed load of dS^T)
                ldmatrix_x4_trans(ads, sdS + swizzle_row<T, Tr::DS_ROW>(
                                                 kk * 16 + (ln & 7) + ((ln >> 4) << 3),
                                                 2 * dq_row_tile + ((ln >> 3) & 1)));
#pragma unroll
                for (int nt = 0; nt < N_TILES; nt += 2) {
                    unsigned bk[4];  // K_j as B: k = keys, n = head-dim columns
                    ldmatrix_x4_trans(bk, sK + swizzle<Tr>(kk * 16 + (ln & 7) + (((ln >> 3) & 1) << 3),
                                                            col_tile0 + nt + (ln >> 4)));
                    mma_16816<T>(dq[nt], ads, bk[0], bk[1]);
                    mma_16816<T>(dq[nt + 1], ads, bk[2], bk[3]);
                }
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = dq_row_tile * 16 + g + 8 * h;
#if __CUDA_ARCH__ == 900
#pragma unroll
                for (int nt = 0; nt < N_TILES; ++nt)
                    *reinterpret_cast<float2*>(sdQ + r * Tr::DQ_STAGE_ROW + (col_tile0 + nt) * 8 + 2 * t) =
                        make_float2(dq[nt][2 * h], dq[nt][2 * h + 1]);
#else
                if (m0 + r < p.Lq) {
#pragma unroll
                    for (int nt = 0; nt < N_TILES; ++nt) {
                        float* dst = dq_accum + r * bp.grad_row + (col_tile0 + nt) * 8 + 2 * t;
                        atomicAdd(dst, dq[nt][2 * h]);
                        atomicAdd(dst + 1, dq[nt][2 * h + 1]);
                    }
                }
#endif
            }
        }
#if __CUDA_ARCH__ == 900
        fence_proxy_async_shared();  // the staged tile is visible to the bulk copies
        __syncwarp();
        const int r = dq_row_tile * 16 + lane;
        if (lane < 16 && m0 + r < p.Lq)
            bulk_reduce_add_f32(dq_accum + r * bp.grad_row + dq_col_tile0 * 8,
                                sdQ + r * Tr::DQ_STAGE_ROW + dq_col_tile0 * 8, Tr::DQ_COLS * 4);
#endif
    };

    for (int m_block = m_block_begin; m_block < m_block_end; ++m_block) {
        const long long m0 = (long long)m_block * BLOCK_M;
        const int buf = m_block % Q_BUFFERS;
        const T* sQ = sQ0 + buf * Tr::Q_TILE;
        const T* sdO = sdO0 + buf * Tr::Q_TILE;
        const float* sLse = sLse0 + buf * BLOCK_M;
        const float* sDelta = sDelta0 + buf * BLOCK_M;
        if (Q_BUFFERS == 1 && m_block > m_block_begin) {
            __syncthreads();  // every warp is done with block i-1: load block i in its place
            load_q_block(m_block);
            cp_async_commit();
        }
        cp_async_wait_all();
        // Block i has landed for every thread; every warp has finished block i-1, so its
        // buffer (and sdS) may be refilled.
        __syncthreads();
        if (Q_BUFFERS == 2 && m_block + 1 < m_block_end) load_q_block(m_block + 1);
        cp_async_commit();
        if (ATOMIC_DQ && m_block > m_block_begin) dq_step(m_block - 1);  // dS^T of block i-1

        // S^T = K_j Q_i^T, then P^T = exp2(S^T * scale_log2 - lse2): (16 keys, BLOCK_M) per warp
        float s[S_N_TILES][4];
        gemm_abt<Tr, S_N_TILES>(s, sK, key_row0, sQ);
        // Keys past Lk and (causal) queries that do not see a key get P = 0; only blocks on
        // the Lk boundary or the diagonal need the test. Queries past Lq have lse2 = +inf.
        const bool edge = n0 + BLOCK_N > p.Lk || (IS_CAUSAL && n0 + BLOCK_N - 1 > m0 + diag);
        // In block coordinates: key row r (0 <= r < BLOCK_N) exists iff r < keys, and query
        // column c sees it iff r <= c + causal_shift (both clamped into int range).
        const int keys = (int)min(p.Lk - n0, (long long)BLOCK_N);
        const int causal_shift = (int)max(min(m0 + diag - n0, (long long)BLOCK_N), -2LL * BLOCK_N);
        // P^T as A fragments, rounded to T (the operand of dV); with the variants also
        // a_ds, P^T for dS: with softcap P^T * (1 - th^2) (the cap's chain rule, th =
        // tanh(raw score / softcap), taken while the raw score is at hand: S^T becomes P^T
        // here), else a copy of a. Both are packed as they are computed, so that the 16
        // registers of a and a_ds together replace the fp32 P^T's 32 (BLOCK_M = 64) while
        // the dropout mask is drawn, and the dV product holds a_kept and a_ds, as it held
        // a_kept and a.
        unsigned a[Tr::M_K_STEPS][4];
        unsigned a_ds[VARIANTS ? Tr::M_K_STEPS : 1][4];
        if constexpr (VARIANTS) {
            auto p_tiles = [&](auto softcap) {
#pragma unroll
                for (int nt = 0; nt < S_N_TILES; ++nt) {
                    const float2 l2 = *reinterpret_cast<const float2*>(sLse + nt * 8 + 2 * t);
#pragma unroll
                    for (int h = 0; h < 2; ++h) {  // elements 2h, 2h + 1: key n0 + row
                        const int row = key_row0 + g + 8 * h;
                        float pe[2], pf[2];
#pragma unroll
                        for (int w = 0; w < 2; ++w) {
                            const int col = nt * 8 + 2 * t + w;  // query m0 + col
                            float th;
                            // the final score (-inf where hidden) minus lse
                            pe[w] = exp2_ftz(mod.modify(s[nt][2 * h + w] * scale_log2, m0 + col,
                                                        n0 + row, th) - (w ? l2.y : l2.x));
                            if constexpr (decltype(softcap)::value)
                                pf[w] = pe[w] * mod.softcap_factor(th);
                        }
                        a[nt / 2][2 * (nt % 2) + h] = pack2<T>(pe[0], pe[1]);
                        if constexpr (decltype(softcap)::value)
                            a_ds[nt / 2][2 * (nt % 2) + h] = pack2<T>(pf[0], pf[1]);
                    }
                }
            };
            if (mod.cap_u > 0.f) {  // uniform: without softcap no factor is computed
                p_tiles(/*softcap=*/BoolConst<true>{});
            } else {
                p_tiles(/*softcap=*/BoolConst<false>{});
#pragma unroll
                for (int kk = 0; kk < Tr::M_K_STEPS; ++kk)
#pragma unroll
                    for (int r = 0; r < 4; ++r) a_ds[kk][r] = a[kk][r];
            }
        } else {
#pragma unroll
            for (int nt = 0; nt < S_N_TILES; ++nt) {
                const float2 l2 = *reinterpret_cast<const float2*>(sLse + nt * 8 + 2 * t);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int col = nt * 8 + 2 * t + (e & 1);           // query m0 + col
                    const int row = key_row0 + g + 8 * (e >> 1);         // key n0 + row
                    const float lse2 = (e & 1) ? l2.y : l2.x;
                    float pe = exp2_ftz(fmaf(s[nt][e], scale_log2, -lse2));
                    if (edge && (row >= keys || (IS_CAUSAL && row > col + causal_shift))) pe = 0.f;
                    s[nt][e] = pe;
                }
            }
        }

        // Dropout: the keep mask Z^T of this warp's keys, 4 bits (e) per n8 tile nt, in
        // keep[nt / 8] at bit 4 (nt % 8) + e; all ones without dropout.
        constexpr int KEEP_WORDS = VARIANTS ? (S_N_TILES + 7) / 8 : 1;
        unsigned keep[KEEP_WORDS];
        float drop_scale = 1.f;  // 1 / (1 - dropout_p)
#pragma unroll
        for (int w = 0; w < KEEP_WORDS; ++w) keep[w] = ~0u;
        if constexpr (VARIANTS) {
            if (dropout_on(vp)) {
                drop_scale = static_cast<float>(vp.dropout_scale);
#pragma unroll
                for (int w = 0; w < KEEP_WORDS; ++w) keep[w] = 0u;
#pragma unroll
                for (int nt = 0; nt < S_N_TILES; ++nt)
                    keep[nt / 8] |= dropout_keep_mma_t(vp, b, m0 + nt * 8, n0 + key_row0, g, t)
                                    << (4 * (nt % 8));
            }
        }

        // dV_j += P^T dO_i, with P^T rounded to T: its A fragments (half the registers of
        // the fp32 scores, which are dead from here on). Dropout: dV_j += (P^T * Z^T) dO_i,
        // times 1 / (1 - dropout_p) when dV is stored.
        if constexpr (!VARIANTS) to_a_fragments<T>(s, a);
        if constexpr (VARIANTS) {
            unsigned a_kept[Tr::M_K_STEPS][4];  // a with the dropped halves zeroed
#pragma unroll
            for (int kk = 0; kk < Tr::M_K_STEPS; ++kk)
#pragma unroll
                for (int r = 0; r < 4; ++r) {  // elements 2 (r % 2) + {0, 1} of tile 2kk + r/2
                    const int nt = 2 * kk + r / 2;
                    const unsigned z = keep[nt / 8] >> (4 * (nt % 8) + 2 * (r % 2));
                    a_kept[kk][r] = a[kk][r] & ((z & 1u ? 0x0000ffffu : 0u) |
                                                (z & 2u ? 0xffff0000u : 0u));
                }
            gemm_ab_reg<Tr, Tr::M_K_STEPS, Tr::KV_N_TILES>(dv, a_kept, sdO, kv_col_tile0);
        } else {
            gemm_ab_reg<Tr, Tr::M_K_STEPS, Tr::KV_N_TILES>(dv, a, sdO, kv_col_tile0);
        }

        // dP^T = V_j dO_i^T; dS^T = P^T * (dP^T - delta_i) (P^T as rounded for dV; with
        // dropout dP^T * Z^T / (1 - dropout_p) in place of dP^T; with softcap P^T * (1 -
        // th^2), a_ds); then dK_j += dS^T Q_i
        float ds[S_N_TILES][4];
        gemm_abt<Tr, S_N_TILES>(ds, sV, key_row0, sdO);
#pragma unroll
        for (int kk = 0; kk < Tr::M_K_STEPS; ++kk)
#pragma unroll
            for (int r = 0; r < 4; ++r) {  // register r of A step kk: n8 tile 2kk + r/2, row half r%2
                float2 pp;
                if constexpr (VARIANTS) pp = unpack2<T>(a_ds[kk][r]);
                else pp = unpack2<T>(a[kk][r]);
                const int nt = 2 * kk + r / 2, e = 2 * (r % 2);
                const float2 dl = *reinterpret_cast<const float2*>(sDelta + nt * 8 + 2 * t);
                if constexpr (VARIANTS) {
                    const unsigned z = keep[nt / 8] >> (4 * (nt % 8) + e);
                    const float d0 = fmaf(ds[nt][e], z & 1u ? drop_scale : 0.f, -dl.x);
                    const float d1 = fmaf(ds[nt][e + 1], z & 2u ? drop_scale : 0.f, -dl.y);
                    ds[nt][e] = pp.x * d0;
                    ds[nt][e + 1] = pp.y * d1;
                    if (dbias != nullptr) {  // dbias = P * (dP * Z / (1 - p) - delta): no cap
                        // factor (bias comes after the cap). Key n0 + key_row0 + g + e/2 * 8,
                        // queries m0 + 8 nt + 2t (+1); a zero (hidden, past Lq or Lk) is
                        // not added.
                        const float2 pa = unpack2<T>(a[kk][r]);
                        const long long j = n0 + key_row0 + g + 4 * e;
                        const long long i = m0 + nt * 8 + 2 * t;
                        const float b0 = pa.x * d0, b1 = pa.y * d1;
                        if (j < p.Lk) {
                            if (b0 != 0.f && i < p.Lq) add_dbias(bp, dbias, i, j, b0);
                            if (b1 != 0.f && i + 1 < p.Lq) add_dbias(bp, dbias, i + 1, j, b1);
                        }
                    }
                } else {
                    ds[nt][e] = pp.x * (ds[nt][e] - dl.x);
                    ds[nt][e + 1] = pp.y * (ds[nt][e + 1] - dl.y);
                }
            }
        to_a_fragments<T>(ds, a);
        gemm_ab_reg<Tr, Tr::M_K_STEPS, Tr::KV_N_TILES>(dk, a, sQ, kv_col_tile0);

        if constexpr (ATOMIC_DQ) {
            // dS^T to shared memory (one of the D_SPLIT warps of each 16 keys); dQ_i is
            // computed from it during block i+1, after that block's barrier.
            T* sdS = sdS0 + (m_block % 2) * Tr::DS_TILE;
            if (warp % D_SPLIT == 0) {
#pragma unroll
                for (int nt = 0; nt < S_N_TILES; ++nt)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
                        *reinterpret_cast<unsigned*>(
                            sdS + swizzle_row<T, Tr::DS_ROW>(key_row0 + g + 8 * h, nt) + 2 * t) =
                            a[nt / 2][2 * (nt % 2) + h];  // dS^T rows g + 8h, n8 tile nt
            }
        }
    }
    if (ATOMIC_DQ && m_block_begin < m_block_end) {
        __syncthreads();  // the last block's dS^T is complete
        dq_step(m_block_end - 1);
    }
#if __CUDA_ARCH__ == 900
    if (ATOMIC_DQ && lane < 16) bulk_wait<false>();  // this warp's last dQ rows have landed
#endif

    // dK_j * scale and dV_j, staged through the (now idle) K and V tiles, 16-byte stores.
    cp_async_wait_all();
    __syncthreads();
    stage_rows<Tr, Tr::KV_N_TILES>(sK, dk, key_row0, kv_col_tile0, static_cast<float>(p.scale));
    float dv_scale = 1.f;  // dropout: the 1 / (1 - dropout_p) of W = P * Z / (1 - dropout_p)
    if constexpr (VARIANTS) dv_scale = dropout_on(vp) ? static_cast<float>(vp.dropout_scale) : 1.f;
    stage_rows<Tr, Tr::KV_N_TILES>(sV, dv, key_row0, kv_col_tile0, dv_scale);
    __syncthreads();
    T* dk_out = static_cast<T*>(bp.dk) + b * p.Lk * bp.grad_row;
    T* dv_out = static_cast<T*>(bp.dv) + b * p.Lk * bp.grad_row;
    store_tile<Tr, BLOCK_N>(dk_out, sK, n0, p.Lk, bp.grad_row);
    store_tile<Tr, BLOCK_N>(dv_out, sV, n0, p.Lk, bp.grad_row);
}

// ---------------------------------------------------------------------------------------
// dQ alone, deterministic: one thread block per query block, 16 query rows per warp
// ---------------------------------------------------------------------------------------
template <typename T_, int HEAD_DIM_, int BLOCK_M_, int BLOCK_N_, int NUM_WARPS_>
struct BwdDqTraits {
    using T = T_;
    static constexpr int HEAD_DIM = HEAD_DIM_, BLOCK_M = BLOCK_M_, BLOCK_N = BLOCK_N_;
    static constexpr int NUM_WARPS = NUM_WARPS_, NUM_THREADS = 32 * NUM_WARPS;
    static constexpr int S_N_TILES = BLOCK_N / 8;
    static constexpr int QK_K_STEPS = HEAD_DIM / 16;
    static constexpr int N_K_STEPS = BLOCK_N / 16;
    static constexpr int DQ_N_TILES = HEAD_DIM / 8;
    static constexpr int CHUNK = 16 / sizeof(T);
    static constexpr int ROW_CHUNKS = HEAD_DIM / CHUNK;
    static constexpr int SMEM_ROW = (HEAD_DIM + 8 * CHUNK - 1) / (8 * CHUNK) * (8 * CHUNK);
    static constexpr int Q_TILE = BLOCK_M * SMEM_ROW, KV_TILE = BLOCK_N * SMEM_ROW;
    // Q_i, dO_i, and two buffers each of K and V (block j-1 loads while j computes).
    static constexpr int SMEM_BYTES = (2 * Q_TILE + 4 * KV_TILE) * sizeof(T);
    static_assert(BLOCK_M == 16 * NUM_WARPS, "16 query rows per warp");
    static_assert(sizeof(T) == 2 && BLOCK_N % 16 == 0 && HEAD_DIM % 16 == 0, "tile shape");
};

template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N, int NUM_WARPS, bool IS_CAUSAL,
          bool VARIANTS>
__device__ __forceinline__ void flash_bwd_dq_mma_body(const AttentionParams& p,
                                                      const BackwardParams& bp,
                                                      const VariantParams& vp) {
    using Tr = BwdDqTraits<T, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_WARPS>;
    constexpr int S_N_TILES = Tr::S_N_TILES;

    const long long b = (long long)blockIdx.z * gridDim.y + blockIdx.y;
    if (b >= p.n_batch) return;
    const bool longest_last =
        IS_CAUSAL || (VARIANTS && vp.window_right < UNBOUNDED && vp.window_left >= UNBOUNDED);
    const int m_block = longest_last ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    const long long m0 = (long long)m_block * BLOCK_M;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int row0 = warp * 16;

    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sdO = sQ + Tr::Q_TILE;
    T* sK0 = sdO + Tr::Q_TILE;          // 2 x KV_TILE
    T* sV0 = sK0 + 2 * Tr::KV_TILE;     // 2 x KV_TILE

    const BatchOffsets off = batch_offsets(p, b);
    const T* q = static_cast<const T*>(p.q) + off.q;
    const T* k = static_cast<const T*>(p.k) + off.k;
    const T* v = static_cast<const T*>(p.v) + off.v;
    const T* dout = static_cast<const T*>(bp.dout) + off.o;
    const float* lse = static_cast<const float*>(p.lse) + b * p.Lq;
    const float* delta = static_cast<const float*>(bp.delta) + b * p.Lq;

    const long long diag = p.Lk - p.Lq;
    const ScoreModifierIf<VARIANTS, T, float> mod(p, vp, b);
    int n_first = 0, n_blocks;
    if constexpr (VARIANTS) {
        mod.key_blocks(m0, min(m0 + BLOCK_M, p.Lq), BLOCK_N, n_first, n_blocks);
    } else {
        long long n_end = p.Lk;
        if (IS_CAUSAL) n_end = min(n_end, m0 + BLOCK_M + diag);
        n_blocks = n_end > 0 ? (int)((n_end + BLOCK_N - 1) / BLOCK_N) : 0;
    }

    // This lane's rows: lse2 and delta of rows g and g + 8 of the warp's 16.
    float row_lse2[2], row_delta[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const long long r = m0 + row0 + g + 8 * h;
        row_lse2[h] = lse_log2(lse, r, p.Lq);
        row_delta[h] = r < p.Lq ? delta[r] : 0.f;
    }

    auto load_kv = [&](int n_block) {
        const int buf = n_block % 2;
        load_tile<Tr, BLOCK_N>(sK0 + buf * Tr::KV_TILE, k, p.k_row_stride, (long long)n_block * BLOCK_N, p.Lk, p.D);
        load_tile<Tr, BLOCK_N>(sV0 + buf * Tr::KV_TILE, v, p.v_row_stride, (long long)n_block * BLOCK_N, p.Lk, p.Dv);
    };
    if (n_blocks > n_first) {
        load_tile<Tr, BLOCK_M>(sQ, q, p.q_row_stride, m0, p.Lq, p.D);
        load_tile<Tr, BLOCK_M>(sdO, dout, p.o_row_stride, m0, p.Lq, p.Dv);
        load_kv(n_blocks - 1);
        cp_async_commit();
    }

    float dq[Tr::DQ_N_TILES][4];
    zero(dq);
    const float scale_log2 = static_cast<float>(p.scale_log2);

    for (int n_block = n_blocks - 1; n_block >= n_first; --n_block) {  // fixed order: deterministic
        const long long n0 = (long long)n_block * BLOCK_N;
        const T* sK = sK0 + (n_block % 2) * Tr::KV_TILE;
        const T* sV = sV0 + (n_block % 2) * Tr::KV_TILE;
        cp_async_wait_all();
        __syncthreads();  // K_j, V_j landed; every warp is done with block j+1's buffers
        if (n_block > n_first) load_kv(n_block - 1);
        cp_async_commit();

        float s[S_N_TILES][4];
        gemm_abt<Tr, S_N_TILES>(s, sQ, row0, sK);  // S = Q_i K_j^T
        const bool edge = n0 + BLOCK_N > p.Lk || (IS_CAUSAL && n0 + BLOCK_N - 1 > m0 + row0 + diag);
        if constexpr (VARIANTS) {
            // P, and with softcap P * (1 - th^2) (th = tanh(raw score / softcap)): here P
            // is only dS's operand, so the cap's chain rule goes into it, from the raw score.
            auto p_tiles = [&](auto softcap) {
#pragma unroll
                for (int nt = 0; nt < S_N_TILES; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int h = e >> 1;
                        const long long key = n0 + nt * 8 + 2 * t + (e & 1);
                        float th;  // the final score (-inf where hidden) minus lse
                        float pe = exp2_ftz(mod.modify(s[nt][e] * scale_log2,
                                                       m0 + row0 + g + 8 * h, key, th) -
                                            row_lse2[h]);
                        if constexpr (decltype(softcap)::value) pe *= mod.softcap_factor(th);
                        s[nt][e] = pe;
                    }
            };
            if (mod.cap_u > 0.f) p_tiles(/*softcap=*/BoolConst<true>{});  // uniform
            else p_tiles(/*softcap=*/BoolConst<false>{});
        } else {
#pragma unroll
            for (int nt = 0; nt < S_N_TILES; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int h = e >> 1;
                    const long long key = n0 + nt * 8 + 2 * t + (e & 1);
                    float pe = exp2_ftz(fmaf(s[nt][e], scale_log2, -row_lse2[h]));
                    if (edge && (key >= p.Lk || (IS_CAUSAL && key > m0 + row0 + g + 8 * h + diag))) pe = 0.f;
                    s[nt][e] = pe;
                }
        }
        float ds[S_N_TILES][4];
        gemm_abt<Tr, S_N_TILES>(ds, sdO, row0, sV);  // dP = dO_i V_j^T
        if constexpr (VARIANTS) {
            // dS = P * (dP * Z / (1 - dropout_p) - delta) (P times 1 - th^2 with softcap);
            // Z = 1 and the factor 1 without dropout, where the FMA gives the bits of dP - delta
            const bool dropout = dropout_on(vp);
            const float drop_scale = dropout ? static_cast<float>(vp.dropout_scale) : 1.f;
#pragma unroll
            for (int nt = 0; nt < S_N_TILES; ++nt) {
                unsigned keep = 0xfu;
                if (dropout) keep = dropout_keep_mma(vp, b, m0 + row0 + g, n0 + 8 * nt, t);
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    ds[nt][e] = s[nt][e] * fmaf(ds[nt][e], (keep >> e) & 1u ? drop_scale : 0.f,
                                                -row_delta[e >> 1]);
            }
        } else {  // dS = P * (dP - delta)
#pragma unroll
            for (int nt = 0; nt < S_N_TILES; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) ds[nt][e] = s[nt][e] * (ds[nt][e] - row_delta[e >> 1]);
        }
        unsigned a[Tr::N_K_STEPS][4];
        to_a_fragments<T>(ds, a);
        gemm_ab_reg<Tr, Tr::N_K_STEPS, Tr::DQ_N_TILES>(dq, a, sK, 0);  // dQ_i += dS K_j
    }

    // Plain stores of this warp's rows (fp32, unscaled, all HEAD_DIM columns).
    float* dq_accum = static_cast<float*>(bp.dq_accum) + (b * p.Lq + m0) * bp.grad_row;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = row0 + g + 8 * h;
        if (m0 + r < p.Lq) {
#pragma unroll
            for (int nt = 0; nt < Tr::DQ_N_TILES; ++nt)
                *reinterpret_cast<float2*>(dq_accum + r * bp.grad_row + nt * 8 + 2 * t) =
                    make_float2(dq[nt][2 * h], dq[nt][2 * h + 1]);
        }
    }
}

// The entry points: plain or causal, and with the variants (then vp, after bp).
// MIN_BLOCKS: thread blocks per multiprocessor the register budget must allow.
template <typename T, int HEAD_DIM, int BLOCK_M, int NUM_WARPS, int D_SPLIT, int Q_BUFFERS,
          int MIN_BLOCKS, bool IS_CAUSAL, bool ATOMIC_DQ>
__global__ void __launch_bounds__(NUM_WARPS * 32, MIN_BLOCKS)
flash_bwd_mma(const AttentionParams p, const BackwardParams bp) {
    flash_bwd_mma_body<T, HEAD_DIM, BLOCK_M, NUM_WARPS, D_SPLIT, Q_BUFFERS, IS_CAUSAL, ATOMIC_DQ,
                       false>(p, bp, VariantParams{});
}

template <typename T, int HEAD_DIM, int BLOCK_M, int NUM_WARPS, int D_SPLIT, int Q_BUFFERS,
          int MIN_BLOCKS, bool ATOMIC_DQ>
__global__ void __launch_bounds__(NUM_WARPS * 32, MIN_BLOCKS)
flash_bwd_mma_variants(const AttentionParams p, const BackwardParams bp, const VariantParams vp) {
    flash_bwd_mma_body<T, HEAD_DIM, BLOCK_M, NUM_WARPS, D_SPLIT, Q_BUFFERS, false, ATOMIC_DQ,
                       true>(p, bp, vp);
}

template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N, int NUM_WARPS, bool IS_CAUSAL>
__global__ void __launch_bounds__(NUM_WARPS * 32, 1)
flash_bwd_dq_mma(const AttentionParams p, const BackwardParams bp) {
    flash_bwd_dq_mma_body<T, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_WARPS, IS_CAUSAL, false>(
        p, bp, VariantParams{});
}

template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N, int NUM_WARPS>
__global__ void __launch_bounds__(NUM_WARPS * 32, 1)
flash_bwd_dq_mma_variants(const AttentionParams p, const BackwardParams bp,
                          const VariantParams vp) {
    flash_bwd_dq_mma_body<T, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_WARPS, false, true>(p, bp, vp);
}

}  // namespace cupyflash
