// FlashAttention backward for fp16 / bf16 on Hopper (sm_90a): the five products of
// flash_bwd_mma.cuh on warpgroup matrix units (wgmma), Q and dO streamed by the tensor-
// memory accelerator (TMA), a producer warpgroup and two consumer warpgroups.
//
// One thread block owns the key block j (BLOCK_N = 128 keys: 64 per consumer, wgmma's M)
// of one batch element and loops over the query blocks i (BLOCK_M = 64 rows) that see it.
// Keys are the rows of every product a consumer keeps (as in flash_bwd_mma.cuh), so that
// P^T and dS^T come out of the accumulators in the A-operand layout of the next product:
//
//   S^T  = K_j Q_i^T                  (64 keys x BLOCK_M; A = K, B = Q, both from smem)
//   P^T  = exp2(S^T * scale * log2 e - lse_i * log2 e)   (the forward's P, exactly)
//   dP^T = V_j dO_i^T                 (A = V, B = dO from smem)
//   dV_j += P^T dO_i                  (A = P^T from registers, B = dO read MN-major)
//   dS^T = P^T * (dP^T - delta_i)     (delta = rowsum(dO * O): flash_bwd_preprocess.cuh)
//   dK_j += dS^T Q_i                  (A = dS^T from registers, B = Q read MN-major)
//   dQ_i += dS_i K_j                  (A = dS^T of both consumers through smem, read
//                                      transposed; B = K read MN-major)
//   at the end: dK_j *= scale; dK_j and dV_j (fp32 in registers all along) are stored.
//
// dQ_i needs every key of the block as its k-dimension, so both consumers write dS^T to
// one shared tile (two buffers, alternating with i) and meet at a named barrier. Its
// HEAD_DIM columns are split in 64-column slabs over the first HEAD_DIM / 64 consumers
// (at d = 64 consumer 1 only writes its half of dS^T and goes on). Each fp32 64 x 64 tile
// of dQ_i is staged in shared memory and added to dq_accum in global memory by one bulk
// reduce-add of 16 KiB (the copy engine). For that, dq_accum is *tiled*, not row-major:
//   dq_accum[b][i / 64][c / 64][i % 64][(c % 64) ^ 8 (i % 8)]     (DqTiles; fp32)
// (the XOR keeps the staging stores free of bank conflicts); flash_bwd_preprocess.cuh's
// dq_from_tiles multiplies by scale and writes the usual layout. One reduce-add per tile
// rather than one per 256-byte row: on the H100 the 64 row-sized ones per tile cost
// 25-35% of the kernel's time (benchmarks/NOTES.md, session 5).
//
// The producer's thread 0 loads K_j and V_j once and then Q_i and dO_i of each query block
// by TMA into a ring of STAGES buffers (128-byte swizzled slabs, the layout of
// flash_fwd_wgmma.cuh); its warp 1 fills lse_i * log2 e and delta_i beside them. A buffer
// completes on its "full" mbarrier (the TMA bytes and 32 arrivals of warp 1) and is
// handed back on its "empty" mbarrier by the 8 consumer warps.
//
// Semantics are flash_bwd_mma.cuh's: keys past Lk and (causal) query-key pairs above the
// diagonal get P = 0, query rows past Lq and rows that saw no key in the forward (lse =
// -inf) get lse2 = +inf, hence P = 0 (TMA fills rows past the tensors' ends with zeros).
// AttentionParams' q, k, v and o batch strides count slices of the tensor maps of q, k, v
// and dO (cupyflash/_tensor_map.py), as in flash_fwd_wgmma.cuh; BackwardParams as usual.
//
// Head dim 256 (SPLIT_D). With 64 keys per consumer, dK_j and dV_j would take 256 fp32
// registers a thread. So at d = 256 a thread block owns BLOCK_N = 64 keys, which both
// consumers share, and consumer w keeps the head-dim columns 128w..128w+127 of dK_j and
// dV_j (64 registers each):
//
//   S^T, dP^T   consumer w computes query columns 32w..32w+31 of the 64 x 64 tiles (wgmma
//               N = 32, k over all 256 head dims) and writes its half of P^T and dS^T to
//               shared tiles (two buffers each); both meet at a named barrier, because
//               dV and dK take every query of the block as their k:
//   dV_j[:, w] += P^T dO_i[:, w],  dK_j[:, w] += dS^T Q_i[:, w]
//               (A = P^T, dS^T from shared memory, K-major; B = dO, Q read MN-major)
//   dQ_i[:, w]  = dS K_j[:, w]     (A = dS^T read transposed, B = K read MN-major; 64 x 128)
//
// K, V, two Q and dO stages and the P^T and dS^T buffers fill 225 of the 227 KiB, which
// leaves no room for dQ staging tiles. But once its products of block i are done, consumer
// w has read the last of Q_i's and dO_i's slabs 2w and 2w + 1 (32 KiB: its 64 x 128 fp32
// dQ_i exactly), and nobody else reads them. It stages dQ_i there, in DqTiles' layout, and
// arrives on the stage's dq_full mbarrier; warp 2 of the producer (the dQ writer) adds the
// four 16 KiB tiles to dq_accum by bulk reduce-adds and hands the stage back to the loads
// once they have been read. 8-byte reductions from registers (red.global.add.v2.f32)
// instead made the kernel 1.16x slower on the H100 (benchmarks/NOTES.md, session 10).
#pragma once

#include "flash_bwd_mma.cuh"    // lse_log2, bulk reduce-adds, fence_proxy_async_shared
#include "flash_fwd_wgmma.cuh"  // TMA, mbarriers, wgmma bookkeeping, smem descriptors

namespace cupyflash {

template <typename T_, int HEAD_DIM_, int STAGES_>
struct BwdWgmmaTraits {
    using T = T_;
    static constexpr int HEAD_DIM = HEAD_DIM_;
    static constexpr int STAGES = STAGES_;                // Q_i / dO_i buffers
    static constexpr int NUM_CONSUMERS = 2;
    static constexpr bool SPLIT_D = HEAD_DIM == 256;      // see "Head dim 256" above
    static constexpr int WG_N = 64;                       // keys of a consumer (wgmma M)
    static constexpr int BLOCK_N = SPLIT_D ? WG_N : WG_N * NUM_CONSUMERS;  // keys per block
    static constexpr int BLOCK_M = 64;                    // query rows per step
    static constexpr int NUM_THREADS = 128 * (NUM_CONSUMERS + 1);
    // A consumer's query columns of S^T, dP^T (wgmma N) and head-dim columns of dK, dV.
    static constexpr int WG_M = SPLIT_D ? BLOCK_M / NUM_CONSUMERS : BLOCK_M;
    static constexpr int WG_D = SPLIT_D ? HEAD_DIM / NUM_CONSUMERS : HEAD_DIM;

    static constexpr int SLAB = 64;                       // elements of one 128-byte row
    static constexpr int SLABS = HEAD_DIM / SLAB;
    static constexpr int S_N_TILES = WG_M / 8;            // n8 tiles of S^T, dP^T
    static constexpr int KV_N_TILES = WG_D / 8;           // n8 tiles of dK, dV
    static constexpr int QK_K_STEPS = HEAD_DIM / 16;      // k16 steps of K Q^T, V dO^T
    static constexpr int M_K_STEPS = BLOCK_M / 16;        // k16 steps of P^T dO, dS^T Q
    static constexpr int N_K_STEPS = BLOCK_N / 16;        // k16 steps of dS K
    static constexpr int DQ_N = SPLIT_D ? WG_D : 64;      // dQ columns per dQ consumer
    static constexpr int DQ_CONSUMERS = HEAD_DIM / DQ_N;  // consumers that compute dQ

    // Shared memory, byte offsets from a 1024-byte aligned base (see flash_fwd_wgmma.cuh).
    static constexpr int KV_TILE_BYTES = BLOCK_N * HEAD_DIM * 2;  // SLABS x (BLOCK_N x 128 B)
    static constexpr int Q_TILE_BYTES = BLOCK_M * HEAD_DIM * 2;   // SLABS x (BLOCK_M x 128 B)
    static constexpr int DS_TILE_BYTES = BLOCK_N * BLOCK_M * 2;   // dS^T (P^T): BLOCK_N x 128 B
    static constexpr int P_TILES = SPLIT_D ? 2 : 0;               // P^T through shared memory
    // dQ staging: two 64 x DQ_N fp32 tiles per dQ consumer (query block i in i % 2), in
    // dq_accum's tile layout (DqTiles), so that one bulk reduce-add copies a whole tile;
    // none at d = 256 (staged in the Q and dO stages instead, see the top).
    static constexpr int DQ_TILE_FLOATS = 64 * DQ_N;
    static constexpr int DQ_STAGE_BYTES = SPLIT_D ? 0 : 2 * DQ_TILE_FLOATS * 4;
    static constexpr int SMEM_K = 0;
    static constexpr int SMEM_V = SMEM_K + KV_TILE_BYTES;
    static constexpr int SMEM_Q = SMEM_V + KV_TILE_BYTES;
    static constexpr int SMEM_DO = SMEM_Q + STAGES * Q_TILE_BYTES;
    static constexpr int SMEM_P = SMEM_DO + STAGES * Q_TILE_BYTES;
    static constexpr int SMEM_DS = SMEM_P + P_TILES * DS_TILE_BYTES;
    static constexpr int SMEM_DQ = SMEM_DS + 2 * DS_TILE_BYTES;
    static constexpr int SMEM_LSE = SMEM_DQ + DQ_CONSUMERS * DQ_STAGE_BYTES;  // STAGES x BLOCK_M
    static constexpr int SMEM_DELTA = SMEM_LSE + STAGES * BLOCK_M * 4;        // STAGES x BLOCK_M
    static constexpr int SMEM_BARRIERS = SMEM_DELTA + STAGES * BLOCK_M * 4;
    // mbarriers: kv_full, then q_full, q_empty [STAGES] each, at d = 256 dq_full [STAGES]
    static constexpr int NUM_MBARRIERS = 1 + (SPLIT_D ? 3 : 2) * STAGES;
    static constexpr int SMEM_BYTES = 1024 + SMEM_BARRIERS + 8 * NUM_MBARRIERS;

    // setmaxnreg: as FwdWgmmaTraits with two consumers (168 a thread at launch).
    static constexpr int PRODUCER_REGS = 24;
    static constexpr int CONSUMER_REGS = 240;
    // Named barriers: dS^T of query block i is complete (DS_BARRIER + i % 2; two, so that
    // consumer 1 at d = 64, which only arrives, never counts twice towards one phase; at
    // d = 256 also P^T).
    static constexpr int DS_BARRIER = 1;
    // A dQ consumer's tile is staged (DQ_BARRIER + consumer, 128 threads).
    static constexpr int DQ_BARRIER = 3;

    static_assert(sizeof(T) == 2, "wgmma path is for fp16 and bf16");
    static_assert(HEAD_DIM == 64 || HEAD_DIM == 128 || HEAD_DIM == 256, "HEAD_DIM: 64, 128, 256");
    static_assert(STAGES >= 2, "dS^T's two buffers rely on the consumers being at most one "
                               "query block apart, which the Q ring of >= 2 stages ensures");
    static_assert(128 * PRODUCER_REGS + 128 * NUM_CONSUMERS * CONSUMER_REGS
                      == NUM_THREADS * (65536 / NUM_THREADS / 8 * 8),
                  "setmaxnreg must hand over exactly the registers the block holds");
    static_assert(SMEM_BYTES <= 227 * 1024, "227 KiB of shared memory per block on sm_90");

    // d = 256: where dQ slab c (64 x 64 fp32, 16 KiB) of query block i is staged: consumer
    // c / 2's slabs of Q_i (c even) or dO_i (c odd), see the top.
    static constexpr int dq_stage_offset(int st, int c) {
        return (c % 2 ? SMEM_DO : SMEM_Q) + st * Q_TILE_BYTES + (c / 2) * 2 * BLOCK_M * 128;
    }
    static_assert(!SPLIT_D || (DQ_N == 2 * SLAB && 2 * BLOCK_M * 128 == 64 * 64 * 4),
                  "a consumer's dQ is two 64 x 64 fp32 tiles, each two slabs of Q_i or dO_i");
};

// dq_accum's layout for this kernel (see the top): 64 x 64 fp32 tiles, tile (b, m_block,
// slab) at ((b * m_blocks + m_block) * slabs + slab) * 4096 floats, element (r, c) of a
// tile at r * 64 + (c ^ 8 (r % 8)).
struct DqTiles {
    static constexpr int ROWS = 64, COLS = 64, FLOATS = ROWS * COLS;
    static __device__ __forceinline__ int offset(int r, int c) {
        return r * COLS + (c ^ ((r % 8) * 8));
    }
    static __device__ __forceinline__ long long tile(long long b, long long m_block,
                                                     long long m_blocks, int slab, int slabs) {
        return ((b * m_blocks + m_block) * slabs + slab) * FLOATS;
    }
};

// One thread block's shared memory (1024-byte aligned) and its place in the problem.
template <typename Tr>
struct BwdBlock {
    unsigned char* smem_ptr;
    unsigned smem;
    long long b, n0, diag;      // batch element, first key, Lk - Lq
    int m_blocks, m_begin, n_iters;  // query blocks: all, the first that sees key n0, count

    __device__ __forceinline__ unsigned kv_full() const { return smem + Tr::SMEM_BARRIERS; }
    __device__ __forceinline__ unsigned q_full(int st) const { return kv_full() + 8 * (1 + st); }
    __device__ __forceinline__ unsigned q_empty(int st) const {
        return kv_full() + 8 * (1 + Tr::STAGES + st);
    }
    __device__ __forceinline__ unsigned dq_full(int st) const {  // d = 256 only
        return kv_full() + 8 * (1 + 2 * Tr::STAGES + st);
    }
    __device__ __forceinline__ float* lse(int st) const {
        return reinterpret_cast<float*>(smem_ptr + Tr::SMEM_LSE) + st * Tr::BLOCK_M;
    }
    __device__ __forceinline__ float* delta(int st) const {
        return reinterpret_cast<float*>(smem_ptr + Tr::SMEM_DELTA) + st * Tr::BLOCK_M;
    }
};

// The producer warpgroup: thread 0 loads K_j and V_j once and then Q_i and dO_i of each
// query block into the ring; warp 1 writes lse_i * log2 e and delta_i beside them; at
// d = 256 warp 2 adds the staged dQ_i to dq_accum (the dQ writer).
template <typename Tr, bool ATOMIC_DQ>
__device__ __forceinline__ void bwd_wgmma_producer(const AttentionParams& p,
                                                   const BackwardParams& bp,
                                                   const BwdBlock<Tr>& blk,
                                                   const BatchOffsets& off,
                                                   const TmaDescriptor& tma_q,
                                                   const TmaDescriptor& tma_k,
                                                   const TmaDescriptor& tma_v,
                                                   const TmaDescriptor& tma_do) {
    constexpr int BLOCK_M = Tr::BLOCK_M, BLOCK_N = Tr::BLOCK_N, STAGES = Tr::STAGES;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int n_iters = blk.n_iters, m_begin = blk.m_begin;
    if (n_iters > 0 && warp == 0 && lane == 0) {
        const unsigned sK = blk.smem + Tr::SMEM_K, sV = blk.smem + Tr::SMEM_V;
        const unsigned sQ = blk.smem + Tr::SMEM_Q, sdO = blk.smem + Tr::SMEM_DO;
        prefetch_tensor_map(tma_q);
        prefetch_tensor_map(tma_k);
        prefetch_tensor_map(tma_v);
        prefetch_tensor_map(tma_do);
        mbarrier_arrive_expect_tx(blk.kv_full(), 2 * Tr::KV_TILE_BYTES);
#pragma unroll
        for (int s = 0; s < Tr::SLABS; ++s) {
            tma_load_3d(sK + s * BLOCK_N * 128, tma_k, blk.kv_full(), s * Tr::SLAB,
                        (int)blk.n0, (int)off.k);
            tma_load_3d(sV + s * BLOCK_N * 128, tma_v, blk.kv_full(), s * Tr::SLAB,
                        (int)blk.n0, (int)off.v);
        }
        for (int it = 0; it < n_iters; ++it) {
            const int st = it % STAGES;
            const int m0 = (m_begin + it) * BLOCK_M;
            mbarrier_wait(blk.q_empty(st), ((it / STAGES) & 1) ^ 1);
            mbarrier_arrive_expect_tx(blk.q_full(st), 2 * Tr::Q_TILE_BYTES);
#pragma unroll
            for (int s = 0; s < Tr::SLABS; ++s) {
                tma_load_3d(sQ + st * Tr::Q_TILE_BYTES + s * BLOCK_M * 128, tma_q,
                            blk.q_full(st), s * Tr::SLAB, m0, (int)off.q);
                tma_load_3d(sdO + st * Tr::Q_TILE_BYTES + s * BLOCK_M * 128, tma_do,
                            blk.q_full(st), s * Tr::SLAB, m0, (int)off.o);
            }
        }
    } else if (n_iters > 0 && warp == 1) {
        // lse_i in log2 units (+inf: P = 0) and delta_i, beside Q_i and dO_i.
        const float* lse = static_cast<const float*>(p.lse) + blk.b * p.Lq;
        const float* delta = static_cast<const float*>(bp.delta) + blk.b * p.Lq;
        for (int it = 0; it < n_iters; ++it) {
            const int st = it % STAGES;
            const long long m0 = (long long)(m_begin + it) * BLOCK_M;
            mbarrier_wait(blk.q_empty(st), ((it / STAGES) & 1) ^ 1);
#pragma unroll
            for (int r = lane; r < BLOCK_M; r += 32) {
                blk.lse(st)[r] = lse_log2(lse, m0 + r, p.Lq);
                blk.delta(st)[r] = m0 + r < p.Lq ? delta[m0 + r] : 0.f;
            }
            mbarrier_arrive(blk.q_full(st));
        }
    } else if (Tr::SPLIT_D && ATOMIC_DQ && n_iters > 0 && warp == 2 && lane == 0) {
        // The dQ writer: four bulk reduce-adds per query block; once they have read the
        // stage, it goes back to the loads (q_empty counts this arrival alone).
        float* const dq_accum = static_cast<float*>(bp.dq_accum);
        for (int it = 0; it < n_iters; ++it) {
            const int st = it % STAGES;
            mbarrier_wait(blk.dq_full(st), (it / STAGES) & 1);
            float* const tiles =
                dq_accum + DqTiles::tile(blk.b, m_begin + it, blk.m_blocks, 0, Tr::SLABS);
#pragma unroll
            for (int c = 0; c < Tr::SLABS; ++c)
                bulk_reduce_add_f32(
                    tiles + c * DqTiles::FLOATS,
                    reinterpret_cast<const float*>(blk.smem_ptr + Tr::dq_stage_offset(st, c)),
                    DqTiles::FLOATS * 4);
            bulk_wait<true>();
            mbarrier_arrive(blk.q_empty(st));
        }
        bulk_wait<false>();  // the last adds are done before the block ends
    }
}

// P^T = exp2(S^T * scale_log2 - lse2) for a consumer's S^T tile, in place (rows: its keys,
// columns: the query columns q_col0.. of the block). Keys past Lk and (causal) queries that
// do not see a key get P = 0, tested only in the blocks on the Lk boundary or the diagonal;
// queries past Lq have lse2 = +inf.
template <typename Tr, bool IS_CAUSAL>
__device__ __forceinline__ void bwd_probabilities(float (&s)[Tr::S_N_TILES][4],
                                                  const AttentionParams& p,
                                                  const BwdBlock<Tr>& blk, long long m0,
                                                  const float* lse2, int key0, int q_col0,
                                                  float scale_log2) {
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    const long long n0 = blk.n0;
    const bool edge =
        n0 + Tr::BLOCK_N > p.Lk || (IS_CAUSAL && n0 + Tr::BLOCK_N - 1 > m0 + blk.diag);
    // block coordinates: key row r exists iff r < keys; query column c sees it
    // iff r <= c + causal_shift (both clamped into int range)
    const int keys = (int)min(p.Lk - n0, (long long)Tr::BLOCK_N);
    const int causal_shift =
        (int)max(min(m0 + blk.diag - n0, (long long)Tr::BLOCK_N), -2LL * Tr::BLOCK_N);
#pragma unroll
    for (int nt = 0; nt < Tr::S_N_TILES; ++nt) {
        const float2 l2 = *reinterpret_cast<const float2*>(lse2 + q_col0 + nt * 8 + 2 * t);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float pe = exp2_ftz(fmaf(s[nt][e], scale_log2, -((e & 1) ? l2.y : l2.x)));
            if (edge) {
                const int col = q_col0 + nt * 8 + 2 * t + (e & 1);
                const int row = key0 + g + 8 * (e >> 1);
                if (row >= keys || (IS_CAUSAL && row > col + causal_shift)) pe = 0.f;
            }
            s[nt][e] = pe;
        }
    }
}

// One commit group of S^T = K_j Q_i^T (or dP^T = V_j dO_i^T): A = the consumer's key rows
// of K (V) at a_desc, B = its query rows of Q_i (dO_i) of buffer st at b_desc, both K-major;
// k over the head dim: slab kk / 4, 32 bytes into its 128-byte rows per k16 step.
template <typename Tr, typename Mma, int N_TILES>
__device__ __forceinline__ void bwd_issue_over_head_dim(float (&acc)[N_TILES][4],
                                                        unsigned long long a_desc,
                                                        unsigned long long b_desc, int st) {
#pragma unroll
    for (int kk = 0; kk < Tr::QK_K_STEPS; ++kk) {
        const int a_off = (kk / 4) * Tr::BLOCK_N * 128 + (kk % 4) * 32;
        const int b_off = st * Tr::Q_TILE_BYTES + (kk / 4) * Tr::BLOCK_M * 128 + (kk % 4) * 32;
        Mma::ss(acc, a_desc + (a_off >> 4), b_desc + (b_off >> 4), kk > 0);
    }
    wgmma_commit();
}

// dK_j *= scale; a consumer's dK_j and dV_j (its keys key0.., head-dim columns col0..) to
// global memory; rows past Lk are not stored.
template <typename Tr>
__device__ __forceinline__ void bwd_store_dk_dv(const float (&dk)[Tr::KV_N_TILES][4],
                                                const float (&dv)[Tr::KV_N_TILES][4],
                                                const AttentionParams& p,
                                                const BackwardParams& bp,
                                                const BwdBlock<Tr>& blk, int key0, int col0) {
    using T = typename Tr::T;
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    const float scale = static_cast<float>(p.scale);
    T* const dk_out = static_cast<T*>(bp.dk) + (blk.b * p.Lk + blk.n0) * bp.grad_row + col0;
    T* const dv_out = static_cast<T*>(bp.dv) + (blk.b * p.Lk + blk.n0) * bp.grad_row + col0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = key0 + g + 8 * h;
        if (blk.n0 + r < p.Lk) {
#pragma unroll
            for (int nt = 0; nt < Tr::KV_N_TILES; ++nt) {
                *reinterpret_cast<unsigned*>(dk_out + r * bp.grad_row + nt * 8 + 2 * t) =
                    pack2<T>(dk[nt][2 * h] * scale, dk[nt][2 * h + 1] * scale);
                *reinterpret_cast<unsigned*>(dv_out + r * bp.grad_row + nt * 8 + 2 * t) =
                    pack2<T>(dv[nt][2 * h], dv[nt][2 * h + 1]);
            }
        }
    }
}

// A consumer's fp32 S^T-shaped tile (rows key0 + g (+8), query columns q_col0 + 8nt + 2t)
// into a swizzled tile of T in shared memory: row = key, 16-byte chunk c ^ (key % 8).
template <typename Tr, int N_TILES>
__device__ __forceinline__ void bwd_store_keys_by_queries(unsigned char* tile,
                                                          const float (&x)[N_TILES][4],
                                                          int key0, int q_col0) {
    using T = typename Tr::T;
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = key0 + g + 8 * h;
            const int chunk = q_col0 / 8 + nt;
            *reinterpret_cast<unsigned*>(tile + r * 128 + ((chunk ^ (r % 8)) * 16) + 4 * t) =
                pack2<T>(x[nt][2 * h], x[nt][2 * h + 1]);
        }
}

// The consumers at d = 64 and 128: keys 64w..64w+63 of the block are consumer w's.
template <typename Tr, bool IS_CAUSAL, bool ATOMIC_DQ>
__device__ __forceinline__ void bwd_wgmma_consumer(const AttentionParams& p,
                                                   const BackwardParams& bp,
                                                   const BwdBlock<Tr>& blk, int wg) {
    using T = typename Tr::T;
    constexpr bool BF16 = IsBf16<T>::value;
    using MmaS = Wgmma<Tr::BLOCK_M, BF16>;   // S^T, dP^T: N = BLOCK_M queries
    using MmaKV = Wgmma<Tr::HEAD_DIM, BF16>; // dV, dK: N = HEAD_DIM
    using MmaQ = Wgmma<Tr::DQ_N, BF16>;      // dQ: N = 64 columns
    constexpr int BLOCK_M = Tr::BLOCK_M, BLOCK_N = Tr::BLOCK_N, STAGES = Tr::STAGES;
    constexpr int S_N_TILES = Tr::S_N_TILES, KV_N_TILES = Tr::KV_N_TILES;
    const unsigned smem = blk.smem;
    const unsigned sK = smem + Tr::SMEM_K, sV = smem + Tr::SMEM_V;
    const unsigned sQ = smem + Tr::SMEM_Q, sdO = smem + Tr::SMEM_DO, sdS = smem + Tr::SMEM_DS;
    const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int key0 = Tr::WG_N * wg + 16 * warp;  // this warp's 16 keys in the block
    const bool dq_consumer = ATOMIC_DQ && wg < Tr::DQ_CONSUMERS;

    float dk[KV_N_TILES][4], dv[KV_N_TILES][4];
    zero(dk);
    zero(dv);
    float s[S_N_TILES][4], dp[S_N_TILES][4];  // S^T then P^T; dP^T then dS^T
    unsigned p_frag[Tr::M_K_STEPS][4], ds_frag[Tr::M_K_STEPS][4];
    const float scale_log2 = static_cast<float>(p.scale_log2);

    // Descriptors (see smem_descriptor in flash_fwd_wgmma.cuh). K-major: this
    // consumer's 64 rows of K and V as A, Q and dO as B of S^T and dP^T. MN-major: dO
    // and Q as B of dV and dK, dS^T (read as dS) and K as A and B of dQ.
    const unsigned long long k_desc = smem_descriptor(sK + Tr::WG_N * wg * 128, 16, 1024);
    const unsigned long long v_desc = smem_descriptor(sV + Tr::WG_N * wg * 128, 16, 1024);
    const unsigned long long q_desc = smem_descriptor(sQ, 16, 1024);
    const unsigned long long do_desc = smem_descriptor(sdO, 16, 1024);
    const unsigned long long q_mn_desc = smem_descriptor(sQ, BLOCK_M * 128, 1024);
    const unsigned long long do_mn_desc = smem_descriptor(sdO, BLOCK_M * 128, 1024);
    const unsigned long long ds_mn_desc = smem_descriptor(sdS, BLOCK_N * 128, 1024);
    const unsigned long long k_mn_desc =
        smem_descriptor(sK + wg * BLOCK_N * 128, BLOCK_N * 128, 1024);  // slab wg of K

    float* const sdQ = reinterpret_cast<float*>(blk.smem_ptr + Tr::SMEM_DQ) +
                       wg * (Tr::DQ_STAGE_BYTES / 4);  // this consumer's two tiles
    float* const dq_accum = static_cast<float*>(bp.dq_accum);
    const bool dq_issuer = dq_consumer && threadIdx.x % 128 == 0;  // issues its adds

    if (blk.n_iters > 0) mbarrier_wait(blk.kv_full(), 0);
    for (int it = 0; it < blk.n_iters; ++it) {
        const int st = it % STAGES;
        const long long m0 = (long long)(blk.m_begin + it) * BLOCK_M;
        mbarrier_wait(blk.q_full(st), (it / STAGES) & 1);

        // S^T = K_j Q_i^T and dP^T = V_j dO_i^T, two groups in flight: A = this
        // consumer's rows of K (V), B = Q_i (dO_i) of buffer st, k over the head dim.
        fence_operands(s);
        fence_operands(dp);
        wgmma_fence();
        bwd_issue_over_head_dim<Tr, MmaS>(s, k_desc, q_desc, st);
        bwd_issue_over_head_dim<Tr, MmaS>(dp, v_desc, do_desc, st);

        // P^T while dP^T accumulates.
        wgmma_wait<1>();
        fence_operands(s);
        bwd_probabilities<Tr, IS_CAUSAL>(s, p, blk, m0, blk.lse(st), key0, 0, scale_log2);
        to_a_fragments<T, S_N_TILES>(s, p_frag);

        // dV_j += P^T dO_i
        fence_operands(dv);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < Tr::M_K_STEPS; ++kk)
            MmaKV::rs(dv, p_frag[kk],
                      do_mn_desc + ((st * Tr::Q_TILE_BYTES + kk * 16 * 128) >> 4), 1);
        wgmma_commit();

        // dS^T = P^T * (dP^T - delta_i), into registers (dK's A operand) and into the
        // shared dS^T tile (dQ's A operand): row = key, 16-byte chunk nt ^ (key % 8).
        wgmma_wait<1>();  // S^T and dP^T are done; dV may still run
        fence_operands(dp);
        const float* delta = blk.delta(st);
#pragma unroll
        for (int nt = 0; nt < S_N_TILES; ++nt) {
            const float2 d2 = *reinterpret_cast<const float2*>(delta + nt * 8 + 2 * t);
#pragma unroll
            for (int e = 0; e < 4; ++e)
                dp[nt][e] = s[nt][e] * (dp[nt][e] - ((e & 1) ? d2.y : d2.x));
        }
        to_a_fragments<T, S_N_TILES>(dp, ds_frag);
        unsigned char* const ds_tile = blk.smem_ptr + Tr::SMEM_DS + (it % 2) * Tr::DS_TILE_BYTES;
#pragma unroll
        for (int kk = 0; kk < (ATOMIC_DQ ? Tr::M_K_STEPS : 0); ++kk)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = key0 + g + 8 * h;
#pragma unroll
                for (int half = 0; half < 2; ++half) {  // n8 tile 2kk + half
                    const int chunk = 2 * kk + half;
                    *reinterpret_cast<unsigned*>(ds_tile + r * 128 +
                                                 ((chunk ^ (r % 8)) * 16) + 4 * t) =
                        ds_frag[kk][2 * half + h];
                }
            }

        // dK_j += dS^T Q_i
        fence_operands(dk);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < Tr::M_K_STEPS; ++kk)
            MmaKV::rs(dk, ds_frag[kk],
                      q_mn_desc + ((st * Tr::Q_TILE_BYTES + kk * 16 * 128) >> 4), 1);
        wgmma_commit();

        // Both halves of dS^T are in shared memory (made visible to the wgmma's async
        // proxy first); the dQ consumers wait for them, the others only arrive.
        fence_proxy_async_shared();
        if (dq_consumer) {
            named_barrier_sync(Tr::DS_BARRIER + it % 2, 256);
            // dQ_i (64 rows x 64 columns of slab wg) = dS K_j: A = dS^T read
            // transposed, B = K read MN-major; k16 steps over the 128 keys.
            float dq[Tr::DQ_N / 8][4];
            fence_operands(dq);
            wgmma_fence();
            const unsigned long long ds_desc =
                ds_mn_desc + (((it % 2) * Tr::DS_TILE_BYTES) >> 4);
#pragma unroll
            for (int kk = 0; kk < Tr::N_K_STEPS; ++kk)
                MmaQ::ss_mn(dq, ds_desc + ((kk * 16 * 128) >> 4),
                            k_mn_desc + ((kk * 16 * 128) >> 4), kk > 0);
            wgmma_commit();
            wgmma_wait<0>();
            fence_operands(dq);
            fence_operands(dk);
            fence_operands(dv);
            if (lane == 0) mbarrier_arrive(blk.q_empty(st));  // Q_i, dO_i, lse_i, delta_i read

            // Stage the tile in buffer it % 2 and add it to dq_accum with one bulk
            // reduce-add. The buffer's previous add (block it - 2) has read it: the
            // issuer waits for the add of block it - 1 before the barrier below, every
            // iteration, so that one barrier per block suffices.
            float* const stage = sdQ + (it % 2) * Tr::DQ_TILE_FLOATS;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = 16 * warp + g + 8 * h;
#pragma unroll
                for (int nt = 0; nt < Tr::DQ_N / 8; ++nt)
                    *reinterpret_cast<float2*>(stage + DqTiles::offset(r, nt * 8 + 2 * t)) =
                        make_float2(dq[nt][2 * h], dq[nt][2 * h + 1]);
            }
            fence_proxy_async_shared();
            if (dq_issuer) bulk_wait<true>();  // block it - 1's add has read its buffer
            named_barrier_sync(Tr::DQ_BARRIER + wg, 128);
            if (dq_issuer)
                bulk_reduce_add_f32(
                    dq_accum + DqTiles::tile(blk.b, blk.m_begin + it, blk.m_blocks, wg,
                                             Tr::SLABS),
                    stage, DqTiles::FLOATS * 4);
        } else {
            if (ATOMIC_DQ) named_barrier_arrive(Tr::DS_BARRIER + it % 2, 256);
            wgmma_wait<0>();
            fence_operands(dk);
            fence_operands(dv);
            if (lane == 0) mbarrier_arrive(blk.q_empty(st));
        }
    }
    if (dq_issuer) bulk_wait<false>();  // the last add is done before the block ends
    bwd_store_dk_dv<Tr>(dk, dv, p, bp, blk, key0, 0);
}

// The consumers at d = 256 (SPLIT_D, see the top): both own the block's 64 keys; consumer
// w computes query columns 32w.. of S^T and dP^T and head-dim columns 128w.. of dK, dV, dQ.
template <typename Tr, bool IS_CAUSAL, bool ATOMIC_DQ>
__device__ __forceinline__ void bwd_wgmma_consumer_split_d(const AttentionParams& p,
                                                           const BackwardParams& bp,
                                                           const BwdBlock<Tr>& blk, int wg) {
    using T = typename Tr::T;
    constexpr bool BF16 = IsBf16<T>::value;
    using MmaS = Wgmma<Tr::WG_M, BF16>;  // S^T, dP^T: N = 32 query columns
    using MmaD = Wgmma<Tr::WG_D, BF16>;  // dV, dK, dQ: N = 128 head-dim columns
    constexpr int BLOCK_M = Tr::BLOCK_M, BLOCK_N = Tr::BLOCK_N, STAGES = Tr::STAGES;
    constexpr int S_N_TILES = Tr::S_N_TILES, KV_N_TILES = Tr::KV_N_TILES;
    const unsigned smem = blk.smem;
    const unsigned sK = smem + Tr::SMEM_K, sV = smem + Tr::SMEM_V, sQ = smem + Tr::SMEM_Q;
    const unsigned sdO = smem + Tr::SMEM_DO, sP = smem + Tr::SMEM_P, sdS = smem + Tr::SMEM_DS;
    const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int key0 = 16 * warp;           // this warp's 16 keys of the block's 64
    const int q_col0 = Tr::WG_M * wg;     // this consumer's query columns of S^T, dP^T
    const int d_slab0 = Tr::WG_D / Tr::SLAB * wg;  // and its first slab of the head dim

    float dk[KV_N_TILES][4], dv[KV_N_TILES][4];
    zero(dk);
    zero(dv);
    float s[S_N_TILES][4], dp[S_N_TILES][4];  // S^T then P^T; dP^T then dS^T
    const float scale_log2 = static_cast<float>(p.scale_log2);

    // Descriptors. K-major: K and V (all 64 keys, 4 slabs) as A and this consumer's 32
    // rows of Q and dO as B of S^T and dP^T; P^T and dS^T as A of dV and dK. MN-major: dO
    // and Q (slabs d_slab0, d_slab0 + 1) as B of dV and dK; dS^T read as dS (A) and K
    // (B) of dQ.
    const unsigned long long k_desc = smem_descriptor(sK, 16, 1024);
    const unsigned long long v_desc = smem_descriptor(sV, 16, 1024);
    const unsigned long long q_desc = smem_descriptor(sQ + q_col0 * 128, 16, 1024);
    const unsigned long long do_desc = smem_descriptor(sdO + q_col0 * 128, 16, 1024);
    const unsigned long long p_desc = smem_descriptor(sP, 16, 1024);
    const unsigned long long ds_desc = smem_descriptor(sdS, 16, 1024);
    const unsigned long long q_mn_desc =
        smem_descriptor(sQ + d_slab0 * BLOCK_M * 128, BLOCK_M * 128, 1024);
    const unsigned long long do_mn_desc =
        smem_descriptor(sdO + d_slab0 * BLOCK_M * 128, BLOCK_M * 128, 1024);
    const unsigned long long ds_mn_desc = smem_descriptor(sdS, BLOCK_N * 128, 1024);
    const unsigned long long k_mn_desc =
        smem_descriptor(sK + d_slab0 * BLOCK_N * 128, BLOCK_N * 128, 1024);

    if (blk.n_iters > 0) mbarrier_wait(blk.kv_full(), 0);
    for (int it = 0; it < blk.n_iters; ++it) {
        const int st = it % STAGES;
        const long long m0 = (long long)(blk.m_begin + it) * BLOCK_M;
        mbarrier_wait(blk.q_full(st), (it / STAGES) & 1);

        // S^T = K_j Q_i^T and dP^T = V_j dO_i^T on this consumer's query columns, two
        // groups in flight, k over the 256 head dims.
        fence_operands(s);
        fence_operands(dp);
        wgmma_fence();
        bwd_issue_over_head_dim<Tr, MmaS>(s, k_desc, q_desc, st);
        bwd_issue_over_head_dim<Tr, MmaS>(dp, v_desc, do_desc, st);

        // P^T while dP^T accumulates, then dS^T = P^T * (dP^T - delta_i); both halves go
        // to the shared tiles of buffer it % 2.
        const int buf = it % 2;
        wgmma_wait<1>();
        fence_operands(s);
        bwd_probabilities<Tr, IS_CAUSAL>(s, p, blk, m0, blk.lse(st), key0, q_col0,
                                         scale_log2);
        bwd_store_keys_by_queries<Tr>(blk.smem_ptr + Tr::SMEM_P + buf * Tr::DS_TILE_BYTES, s,
                                      key0, q_col0);
        wgmma_wait<0>();
        fence_operands(dp);
        const float* delta = blk.delta(st) + q_col0;
#pragma unroll
        for (int nt = 0; nt < S_N_TILES; ++nt) {
            const float2 d2 = *reinterpret_cast<const float2*>(delta + nt * 8 + 2 * t);
#pragma unroll
            for (int e = 0; e < 4; ++e)
                dp[nt][e] = s[nt][e] * (dp[nt][e] - ((e & 1) ? d2.y : d2.x));
        }
        bwd_store_keys_by_queries<Tr>(blk.smem_ptr + Tr::SMEM_DS + buf * Tr::DS_TILE_BYTES,
                                      dp, key0, q_col0);
        // Made visible to the wgmma's async proxy; both consumers' halves are written.
        // (A consumer writes buffer it % 2 again at it + 2 only after passing this barrier
        // at it + 1, which the other reaches after its products of block it are done.)
        fence_proxy_async_shared();
        named_barrier_sync(Tr::DS_BARRIER, 256);

        // dV_j += P^T dO_i, dK_j += dS^T Q_i, dQ_i = dS K_j on this consumer's columns.
        fence_operands(dv);
        fence_operands(dk);
        wgmma_fence();
        const int ps_off = buf * Tr::DS_TILE_BYTES;
#pragma unroll
        for (int kk = 0; kk < Tr::M_K_STEPS; ++kk)
            MmaD::ss_kmn(dv, p_desc + ((ps_off + kk * 32) >> 4),
                         do_mn_desc + ((st * Tr::Q_TILE_BYTES + kk * 16 * 128) >> 4), 1);
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < Tr::M_K_STEPS; ++kk)
            MmaD::ss_kmn(dk, ds_desc + ((ps_off + kk * 32) >> 4),
                         q_mn_desc + ((st * Tr::Q_TILE_BYTES + kk * 16 * 128) >> 4), 1);
        wgmma_commit();
        if (ATOMIC_DQ) {
            float dq[KV_N_TILES][4];
            fence_operands(dq);
#pragma unroll
            for (int kk = 0; kk < Tr::N_K_STEPS; ++kk)
                MmaD::ss_mn(dq, ds_mn_desc + ((ps_off + kk * 16 * 128) >> 4),
                            k_mn_desc + ((kk * 16 * 128) >> 4), kk > 0);
            wgmma_commit();
            wgmma_wait<0>();
            fence_operands(dq);
            fence_operands(dk);
            fence_operands(dv);
            // Stage dQ_i (rows 16 warp + g (+8), columns 8nt + 2t of this consumer's 128) in
            // the slabs of Q_i and dO_i that only this consumer read after the barrier, for
            // the dQ writer (see the top); its arrival hands Q_i, dO_i, lse_i, delta_i back.
#pragma unroll
            for (int nt = 0; nt < KV_N_TILES; ++nt) {
                float* const stage = reinterpret_cast<float*>(
                    blk.smem_ptr + Tr::dq_stage_offset(st, d_slab0 + nt / 8));
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int r = 16 * warp + g + 8 * h;
                    *reinterpret_cast<float2*>(stage + DqTiles::offset(r, (nt % 8) * 8 + 2 * t)) =
                        make_float2(dq[nt][2 * h], dq[nt][2 * h + 1]);
                }
            }
            fence_proxy_async_shared();
            __syncwarp();
            if (lane == 0) mbarrier_arrive(blk.dq_full(st));
        } else {
            wgmma_wait<0>();
            fence_operands(dk);
            fence_operands(dv);
            if (lane == 0) mbarrier_arrive(blk.q_empty(st));
        }
    }
    bwd_store_dk_dv<Tr>(dk, dv, p, bp, blk, key0, Tr::WG_D * wg);
}

// ATOMIC_DQ = false (deterministic=True): dK and dV only; dQ comes from flash_bwd_dq_mma
// (flash_bwd_mma.cuh), which sums over key blocks in a fixed order.
template <typename T, int HEAD_DIM, int STAGES, bool IS_CAUSAL, bool ATOMIC_DQ>
__global__ void __launch_bounds__(384, 1)
flash_bwd_wgmma(const AttentionParams p, const BackwardParams bp,
                const __grid_constant__ TmaDescriptor tma_q,
                const __grid_constant__ TmaDescriptor tma_k,
                const __grid_constant__ TmaDescriptor tma_v,
                const __grid_constant__ TmaDescriptor tma_do) {
    using Tr = BwdWgmmaTraits<T, HEAD_DIM, STAGES>;
    constexpr int BLOCK_M = Tr::BLOCK_M, BLOCK_N = Tr::BLOCK_N;

    BwdBlock<Tr> blk;
    blk.b = (long long)blockIdx.z * gridDim.y + blockIdx.y;  // batch element
    if (blk.b >= p.n_batch) return;
    blk.n0 = (long long)blockIdx.x * BLOCK_N;  // first key of this block

    // Query blocks that see this key block: causal, query i sees key j iff j <= i + diag.
    blk.diag = p.Lk - p.Lq;
    blk.m_blocks = (int)((p.Lq + BLOCK_M - 1) / BLOCK_M);
    const long long m_first = IS_CAUSAL ? max(blk.n0 - blk.diag, 0LL) : 0LL;
    blk.m_begin = (int)min(m_first / BLOCK_M, (long long)blk.m_blocks);
    blk.n_iters = blk.m_blocks - blk.m_begin;

    extern __shared__ unsigned char smem_raw[];
    const unsigned smem_raw_addr = smem_addr(smem_raw);
    blk.smem = (smem_raw_addr + 1023) & ~1023u;
    blk.smem_ptr = smem_raw + (blk.smem - smem_raw_addr);

    if (threadIdx.x == 0) {
        mbarrier_init(blk.kv_full(), 1);
        for (int st = 0; st < STAGES; ++st) {
            mbarrier_init(blk.q_full(st), 1 + 32);  // TMA's arrive.expect_tx + warp 1's lanes
            // one arrival per consumer warp; at d = 256 the dQ writer's alone (after the
            // consumers' arrivals on dq_full)
            mbarrier_init(blk.q_empty(st), Tr::SPLIT_D && ATOMIC_DQ ? 1 : 4 * Tr::NUM_CONSUMERS);
            if (Tr::SPLIT_D) mbarrier_init(blk.dq_full(st), 4 * Tr::NUM_CONSUMERS);
        }
        fence_mbarrier_init();
    }
    __syncthreads();

    const int warpgroup = threadIdx.x / 128;
    if (warpgroup == 0) {
        setmaxnreg_dec<Tr::PRODUCER_REGS>();
        bwd_wgmma_producer<Tr, ATOMIC_DQ>(p, bp, blk, batch_offsets(p, blk.b), tma_q, tma_k, tma_v,
                               tma_do);
    } else {
        setmaxnreg_inc<Tr::CONSUMER_REGS>();
        if constexpr (Tr::SPLIT_D)
            bwd_wgmma_consumer_split_d<Tr, IS_CAUSAL, ATOMIC_DQ>(p, bp, blk, warpgroup - 1);
        else
            bwd_wgmma_consumer<Tr, IS_CAUSAL, ATOMIC_DQ>(p, bp, blk, warpgroup - 1);
    }
}

}  // namespace cupyflash
