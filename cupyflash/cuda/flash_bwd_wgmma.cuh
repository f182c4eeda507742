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
    static constexpr int WG_N = 64;                       // keys per consumer (wgmma M)
    static constexpr int BLOCK_N = WG_N * NUM_CONSUMERS;  // keys per thread block
    static constexpr int BLOCK_M = 64;                    // query rows per step
    static constexpr int NUM_THREADS = 128 * (NUM_CONSUMERS + 1);

    static constexpr int SLAB = 64;                       // elements of one 128-byte row
    static constexpr int SLABS = HEAD_DIM / SLAB;
    static constexpr int S_N_TILES = BLOCK_M / 8;         // n8 tiles of S^T, dP^T
    static constexpr int KV_N_TILES = HEAD_DIM / 8;       // n8 tiles of dK, dV
    static constexpr int QK_K_STEPS = HEAD_DIM / 16;      // k16 steps of K Q^T, V dO^T
    static constexpr int M_K_STEPS = BLOCK_M / 16;        // k16 steps of P^T dO, dS^T Q
    static constexpr int N_K_STEPS = BLOCK_N / 16;        // k16 steps of dS K
    static constexpr int DQ_N = 64;                       // dQ columns per dQ consumer
    static constexpr int DQ_CONSUMERS = HEAD_DIM / DQ_N;  // consumers that compute dQ

    // Shared memory, byte offsets from a 1024-byte aligned base (see flash_fwd_wgmma.cuh).
    static constexpr int KV_TILE_BYTES = BLOCK_N * HEAD_DIM * 2;  // SLABS x (BLOCK_N x 128 B)
    static constexpr int Q_TILE_BYTES = BLOCK_M * HEAD_DIM * 2;   // SLABS x (BLOCK_M x 128 B)
    static constexpr int DS_TILE_BYTES = BLOCK_N * BLOCK_M * 2;   // dS^T: BLOCK_N x 128 B
    // dQ staging: two 64 x DQ_N fp32 tiles per dQ consumer (query block i in i % 2), in
    // dq_accum's tile layout (DqTiles), so that one bulk reduce-add copies a whole tile.
    static constexpr int DQ_TILE_FLOATS = 64 * DQ_N;
    static constexpr int DQ_STAGE_BYTES = 2 * DQ_TILE_FLOATS * 4;
    static constexpr int SMEM_K = 0;
    static constexpr int SMEM_V = SMEM_K + KV_TILE_BYTES;
    static constexpr int SMEM_Q = SMEM_V + KV_TILE_BYTES;
    static constexpr int SMEM_DO = SMEM_Q + STAGES * Q_TILE_BYTES;
    static constexpr int SMEM_DS = SMEM_DO + STAGES * Q_TILE_BYTES;
    static constexpr int SMEM_DQ = SMEM_DS + 2 * DS_TILE_BYTES;
    static constexpr int SMEM_LSE = SMEM_DQ + DQ_CONSUMERS * DQ_STAGE_BYTES;  // STAGES x BLOCK_M
    static constexpr int SMEM_DELTA = SMEM_LSE + STAGES * BLOCK_M * 4;        // STAGES x BLOCK_M
    static constexpr int SMEM_BARRIERS = SMEM_DELTA + STAGES * BLOCK_M * 4;
    // mbarriers: kv_full, then q_full, q_empty [STAGES] each
    static constexpr int NUM_MBARRIERS = 1 + 2 * STAGES;
    static constexpr int SMEM_BYTES = 1024 + SMEM_BARRIERS + 8 * NUM_MBARRIERS;

    // setmaxnreg: as FwdWgmmaTraits with two consumers (168 a thread at launch).
    static constexpr int PRODUCER_REGS = 24;
    static constexpr int CONSUMER_REGS = 240;
    // Named barriers: dS^T of query block i is complete (DS_BARRIER + i % 2; two, so that
    // consumer 1 at d = 64, which only arrives, never counts twice towards one phase).
    static constexpr int DS_BARRIER = 1;
    // A dQ consumer's tile is staged (DQ_BARRIER + consumer, 128 threads).
    static constexpr int DQ_BARRIER = 3;

    static_assert(sizeof(T) == 2, "wgmma path is for fp16 and bf16");
    static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "HEAD_DIM: 64 or 128");
    static_assert(STAGES >= 2, "dS^T's two buffers rely on the consumers being at most one "
                               "query block apart, which the Q ring of >= 2 stages ensures");
    static_assert(128 * PRODUCER_REGS + 128 * NUM_CONSUMERS * CONSUMER_REGS
                      == NUM_THREADS * (65536 / NUM_THREADS / 8 * 8),
                  "setmaxnreg must hand over exactly the registers the block holds");
    static_assert(SMEM_BYTES <= 227 * 1024, "227 KiB of shared memory per block on sm_90");
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
    constexpr bool BF16 = IsBf16<T>::value;
    using MmaS = Wgmma<Tr::BLOCK_M, BF16>;   // S^T, dP^T: N = BLOCK_M queries
    using MmaKV = Wgmma<HEAD_DIM, BF16>;     // dV, dK: N = HEAD_DIM
    using MmaQ = Wgmma<Tr::DQ_N, BF16>;      // dQ: N = 64 columns
    constexpr int BLOCK_M = Tr::BLOCK_M, BLOCK_N = Tr::BLOCK_N, SLABS = Tr::SLABS;

    const long long b = (long long)blockIdx.z * gridDim.y + blockIdx.y;  // batch element
    if (b >= p.n_batch) return;
    const long long n0 = (long long)blockIdx.x * BLOCK_N;  // first key of this block

    // Query blocks that see this key block: causal, query i sees key j iff j <= i + diag.
    const long long diag = p.Lk - p.Lq;
    const int m_blocks = (int)((p.Lq + BLOCK_M - 1) / BLOCK_M);
    const long long m_first = IS_CAUSAL ? max(n0 - diag, 0LL) : 0LL;
    const int m_begin = (int)min(m_first / BLOCK_M, (long long)m_blocks);
    const int n_iters = m_blocks - m_begin;

    extern __shared__ unsigned char smem_raw[];
    const unsigned smem_raw_addr = smem_addr(smem_raw);
    const unsigned smem = (smem_raw_addr + 1023) & ~1023u;
    unsigned char* const smem_ptr = smem_raw + (smem - smem_raw_addr);
    const unsigned sK = smem + Tr::SMEM_K, sV = smem + Tr::SMEM_V;
    const unsigned sQ = smem + Tr::SMEM_Q, sdO = smem + Tr::SMEM_DO, sdS = smem + Tr::SMEM_DS;
    float* const sLse = reinterpret_cast<float*>(smem_ptr + Tr::SMEM_LSE);
    float* const sDelta = reinterpret_cast<float*>(smem_ptr + Tr::SMEM_DELTA);
    const unsigned kv_full = smem + Tr::SMEM_BARRIERS;
    auto q_full = [&](int st) { return kv_full + 8 * (1 + st); };
    auto q_empty = [&](int st) { return kv_full + 8 * (1 + STAGES + st); };

    if (threadIdx.x == 0) {
        mbarrier_init(kv_full, 1);
        for (int st = 0; st < STAGES; ++st) {
            mbarrier_init(q_full(st), 1 + 32);  // TMA's arrive.expect_tx + warp 1's lanes
            mbarrier_init(q_empty(st), 4 * Tr::NUM_CONSUMERS);  // one per consumer warp
        }
        fence_mbarrier_init();
    }
    __syncthreads();

    const BatchOffsets off = batch_offsets(p, b);  // q, k, v, o: slices of the maps
    const int warpgroup = threadIdx.x / 128;

    if (warpgroup == 0) {
        // ------------------------------- producer -------------------------------------
        setmaxnreg_dec<Tr::PRODUCER_REGS>();
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
        if (n_iters > 0 && warp == 0 && lane == 0) {
            prefetch_tensor_map(tma_q);
            prefetch_tensor_map(tma_k);
            prefetch_tensor_map(tma_v);
            prefetch_tensor_map(tma_do);
            mbarrier_arrive_expect_tx(kv_full, 2 * Tr::KV_TILE_BYTES);
#pragma unroll
            for (int s = 0; s < SLABS; ++s) {
                tma_load_3d(sK + s * BLOCK_N * 128, tma_k, kv_full, s * Tr::SLAB, (int)n0,
                            (int)off.k);
                tma_load_3d(sV + s * BLOCK_N * 128, tma_v, kv_full, s * Tr::SLAB, (int)n0,
                            (int)off.v);
            }
            for (int it = 0; it < n_iters; ++it) {
                const int st = it % STAGES;
                const int m0 = (m_begin + it) * BLOCK_M;
                mbarrier_wait(q_empty(st), ((it / STAGES) & 1) ^ 1);
                mbarrier_arrive_expect_tx(q_full(st), 2 * Tr::Q_TILE_BYTES);
#pragma unroll
                for (int s = 0; s < SLABS; ++s) {
                    tma_load_3d(sQ + st * Tr::Q_TILE_BYTES + s * BLOCK_M * 128, tma_q,
                                q_full(st), s * Tr::SLAB, m0, (int)off.q);
                    tma_load_3d(sdO + st * Tr::Q_TILE_BYTES + s * BLOCK_M * 128, tma_do,
                                q_full(st), s * Tr::SLAB, m0, (int)off.o);
                }
            }
        } else if (n_iters > 0 && warp == 1) {
            // lse_i in log2 units (+inf: P = 0) and delta_i, beside Q_i and dO_i.
            const float* lse = static_cast<const float*>(p.lse) + b * p.Lq;
            const float* delta = static_cast<const float*>(bp.delta) + b * p.Lq;
            for (int it = 0; it < n_iters; ++it) {
                const int st = it % STAGES;
                const long long m0 = (long long)(m_begin + it) * BLOCK_M;
                mbarrier_wait(q_empty(st), ((it / STAGES) & 1) ^ 1);
#pragma unroll
                for (int r = lane; r < BLOCK_M; r += 32) {
                    sLse[st * BLOCK_M + r] = lse_log2(lse, m0 + r, p.Lq);
                    sDelta[st * BLOCK_M + r] = m0 + r < p.Lq ? delta[m0 + r] : 0.f;
                }
                mbarrier_arrive(q_full(st));
            }
        }
    } else {
        // ------------------------------- consumers ------------------------------------
        setmaxnreg_inc<Tr::CONSUMER_REGS>();
        constexpr int S_N_TILES = Tr::S_N_TILES, KV_N_TILES = Tr::KV_N_TILES;
        const int wg = warpgroup - 1;
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

        float* const sdQ = reinterpret_cast<float*>(smem_ptr + Tr::SMEM_DQ) +
                           wg * (Tr::DQ_STAGE_BYTES / 4);  // this consumer's two tiles
        float* const dq_accum = static_cast<float*>(bp.dq_accum);
        const bool dq_issuer = dq_consumer && threadIdx.x % 128 == 0;  // issues its adds

        if (n_iters > 0) mbarrier_wait(kv_full, 0);
        for (int it = 0; it < n_iters; ++it) {
            const int st = it % STAGES;
            const long long m0 = (long long)(m_begin + it) * BLOCK_M;
            mbarrier_wait(q_full(st), (it / STAGES) & 1);

            // S^T = K_j Q_i^T and dP^T = V_j dO_i^T, two groups in flight: A = this
            // consumer's rows of K (V), B = Q_i (dO_i) of buffer st, k over the head dim.
            auto issue_over_head_dim = [&](float (&acc)[S_N_TILES][4],
                                           unsigned long long a_desc, unsigned long long b_desc) {
#pragma unroll
                for (int kk = 0; kk < Tr::QK_K_STEPS; ++kk) {
                    // head dims 16kk..16kk+15: slab kk / 4, 32 bytes into its rows per step
                    const int a_off = (kk / 4) * BLOCK_N * 128 + (kk % 4) * 32;
                    const int b_off =
                        st * Tr::Q_TILE_BYTES + (kk / 4) * BLOCK_M * 128 + (kk % 4) * 32;
                    MmaS::ss(acc, a_desc + (a_off >> 4), b_desc + (b_off >> 4), kk > 0);
                }
                wgmma_commit();
            };
            fence_operands(s);
            fence_operands(dp);
            wgmma_fence();
            issue_over_head_dim(s, k_desc, q_desc);
            issue_over_head_dim(dp, v_desc, do_desc);

            // P^T = exp2(S^T * scale_log2 - lse2) while dP^T accumulates. Keys past Lk and
            // (causal) queries that do not see a key get P = 0, tested only in the blocks on
            // the Lk boundary or the diagonal; queries past Lq have lse2 = +inf.
            wgmma_wait<1>();
            fence_operands(s);
            const float* lse2 = sLse + st * BLOCK_M;
            const bool edge =
                n0 + BLOCK_N > p.Lk || (IS_CAUSAL && n0 + BLOCK_N - 1 > m0 + diag);
            // block coordinates: key row r exists iff r < keys; query column c sees it
            // iff r <= c + causal_shift (both clamped into int range)
            const int keys = (int)min(p.Lk - n0, (long long)BLOCK_N);
            const int causal_shift =
                (int)max(min(m0 + diag - n0, (long long)BLOCK_N), -2LL * BLOCK_N);
#pragma unroll
            for (int nt = 0; nt < S_N_TILES; ++nt) {
                const float2 l2 = *reinterpret_cast<const float2*>(lse2 + nt * 8 + 2 * t);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float pe = exp2_ftz(fmaf(s[nt][e], scale_log2, -((e & 1) ? l2.y : l2.x)));
                    if (edge) {
                        const int col = nt * 8 + 2 * t + (e & 1);
                        const int row = key0 + g + 8 * (e >> 1);
                        if (row >= keys || (IS_CAUSAL && row > col + causal_shift)) pe = 0.f;
                    }
                    s[nt][e] = pe;
                }
            }
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
            const float* delta = sDelta + st * BLOCK_M;
#pragma unroll
            for (int nt = 0; nt < S_N_TILES; ++nt) {
                const float2 d2 = *reinterpret_cast<const float2*>(delta + nt * 8 + 2 * t);
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    dp[nt][e] = s[nt][e] * (dp[nt][e] - ((e & 1) ? d2.y : d2.x));
            }
            to_a_fragments<T, S_N_TILES>(dp, ds_frag);
            unsigned char* const ds_tile = smem_ptr + Tr::SMEM_DS + (it % 2) * Tr::DS_TILE_BYTES;
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
                if (lane == 0) mbarrier_arrive(q_empty(st));  // Q_i, dO_i, lse_i, delta_i read

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
                        dq_accum + DqTiles::tile(b, m_begin + it, m_blocks, wg, Tr::SLABS),
                        stage, DqTiles::FLOATS * 4);
            } else {
                if (ATOMIC_DQ) named_barrier_arrive(Tr::DS_BARRIER + it % 2, 256);
                wgmma_wait<0>();
                fence_operands(dk);
                fence_operands(dv);
                if (lane == 0) mbarrier_arrive(q_empty(st));
            }
        }
        if (dq_issuer) bulk_wait<false>();  // the last add is done before the block ends

        // dK_j *= scale; dK_j and dV_j rows past Lk are not stored.
        const float scale = static_cast<float>(p.scale);
        T* const dk_out = static_cast<T*>(bp.dk) + (b * p.Lk + n0) * bp.grad_row;
        T* const dv_out = static_cast<T*>(bp.dv) + (b * p.Lk + n0) * bp.grad_row;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = key0 + g + 8 * h;
            if (n0 + r < p.Lk) {
#pragma unroll
                for (int nt = 0; nt < KV_N_TILES; ++nt) {
                    *reinterpret_cast<unsigned*>(dk_out + r * bp.grad_row + nt * 8 + 2 * t) =
                        pack2<T>(dk[nt][2 * h] * scale, dk[nt][2 * h + 1] * scale);
                    *reinterpret_cast<unsigned*>(dv_out + r * bp.grad_row + nt * 8 + 2 * t) =
                        pack2<T>(dv[nt][2 * h], dv[nt][2 * h + 1]);
                }
            }
        }
    }
}

}  // namespace cupyflash
