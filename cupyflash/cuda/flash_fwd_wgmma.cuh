// FlashAttention forward for fp16 / bf16 on Hopper (sm_90a): warpgroup matrix products
// (wgmma), the tensor-memory accelerator (TMA) and warp specialisation, as in
// FlashAttention-3.
//
// One thread block computes O_i for BLOCK_M = 64 * NUM_CONSUMERS query rows of one batch
// element. Its warpgroups (4 warps each) have fixed roles:
//
//   producer (warpgroup 0; one thread issues everything): Q_i once, then K_j and V_j of
//       each key block j, by TMA into a ring of STAGES shared-memory buffers. A load
//       completes on the buffer's "full" mbarrier; the consumers hand a buffer back on its
//       "empty" mbarrier once their products have read it.
//   consumers (warpgroups 1..NUM_CONSUMERS), 64 query rows each (wgmma's M):
//       for each key block j, last to first:
//           S    = Q_i K_j^T                       (wgmma, Q and K from shared memory)
//           m    = max(m_i, rowmax(S) * scale * log2 e)    -- lazy: see WgmmaSoftmax
//           P    = exp2(S * scale * log2 e - m),   l_i = l_i * exp2(m_i - m) + rowsum(P)
//           acc  = acc * exp2(m_i - m) + P V_j     (wgmma, P from registers, V from smem)
//       O_i = acc / l_i,   lse_i = (m_i + log2 l_i) * ln 2
//
// The softmax runs on the FMA and special-function units while the tensor cores would
// idle; two overlaps hide it, as in the FlashAttention-3 paper:
//  * inside a warpgroup, S_{j-1} = Q K_{j-1}^T and acc += P_j V_j are issued together and
//    the softmax of S_{j-1} runs while P_j V_j is still accumulating (so acc's rescale by
//    exp2(m_old - m_new) is applied just before the next P V is issued, not in the softmax);
//  * between warpgroups ("ping-pong"), named barriers make the consumers issue their
//    products in turn, so that one warpgroup's softmax overlaps another's products.
// setmaxnreg moves registers from the producer, which needs few, to the consumers, which
// hold acc (HEAD_DIM / 2 floats per thread), S (BLOCK_N / 2) and P (BLOCK_N / 4).
//
// Shared-memory tiles are in the layout that TMA writes with 128-byte swizzling and that
// wgmma reads directly: a tile of R rows and HEAD_DIM columns is HEAD_DIM / 64 column
// "slabs" of R rows x 128 bytes (64 elements), and in each 8-row group of 1024 bytes the
// 16-byte chunk c of row r sits at chunk position c ^ (r % 8). Loading 64-column slabs one
// TMA box at a time is what the 128-byte swizzle allows (a box's inner extent is at most
// 128 bytes); columns past the tensor's head dim, rows past its length, are zero-filled by
// TMA, so no bounds checks are needed on loads and any head dim up to HEAD_DIM works.
//
// Semantics are flash_fwd_mma.cuh's (the same online softmax, guards, masks and lse);
// AttentionParams differs in one respect: q_batch_stride, k_batch_stride and
// v_batch_stride count *slices* of the tensor maps (their third dimension, see
// cupyflash/_tensor_map.py), not elements; o_batch_stride is in elements as usual, and the
// q, k, v pointers are unused (the tensor maps hold them).
#pragma once

#include "flash_fwd_mma.cuh"  // AttentionParams, pack2, exp2_ftz, quad_max, quad_sum, IsBf16
#include "wgmma_ops.cuh"

namespace cupyflash {

// The CUDA driver's CUtensorMap (cuda.h is not available to NVRTC): 128 opaque bytes,
// built on the host by cuTensorMapEncodeTiled and passed by value as a __grid_constant__
// parameter, whose address the TMA instructions take.
struct alignas(64) TmaDescriptor {
    unsigned long long opaque[16];
};

// ---------------------------------------------------------------------------------------
// Tile shape: template parameters in, derived sizes out.
// ---------------------------------------------------------------------------------------
template <typename T_, int HEAD_DIM_, int BLOCK_N_, int NUM_CONSUMERS_, int STAGES_>
struct FwdWgmmaTraits {
    using T = T_;
    static constexpr int HEAD_DIM = HEAD_DIM_;            // padded head dim of q, k and v
    static constexpr int BLOCK_N = BLOCK_N_;              // keys per key block
    static constexpr int NUM_CONSUMERS = NUM_CONSUMERS_;  // consumer warpgroups
    static constexpr int STAGES = STAGES_;                // K and V buffers each
    static constexpr int WG_M = 64;                       // query rows per consumer (wgmma M)
    static constexpr int BLOCK_M = WG_M * NUM_CONSUMERS;  // query rows per thread block
    static constexpr int NUM_THREADS = 128 * (NUM_CONSUMERS + 1);

    static constexpr int SLAB = 64;                       // elements of one 128-byte row
    static constexpr int SLABS = HEAD_DIM / SLAB;         // column slabs per tile
    static constexpr int S_N_TILES = BLOCK_N / 8;         // n8 column tiles of S
    static constexpr int O_N_TILES = HEAD_DIM / 8;        // n8 column tiles of O
    static constexpr int QK_K_STEPS = HEAD_DIM / 16;      // k16 steps of Q K^T
    static constexpr int PV_K_STEPS = BLOCK_N / 16;       // k16 steps of P V

    // Shared memory: byte offsets from a 1024-byte aligned base (the swizzle pattern
    // repeats every 1024 bytes and TMA and wgmma derive it from the address bits).
    static constexpr int Q_TILE_BYTES = BLOCK_M * HEAD_DIM * 2;   // SLABS x (BLOCK_M x 128 B)
    static constexpr int KV_TILE_BYTES = BLOCK_N * HEAD_DIM * 2;  // SLABS x (BLOCK_N x 128 B)
    static constexpr int SMEM_Q = 0;
    static constexpr int SMEM_K = SMEM_Q + Q_TILE_BYTES;
    static constexpr int SMEM_V = SMEM_K + STAGES * KV_TILE_BYTES;
    static constexpr int SMEM_BARRIERS = SMEM_V + STAGES * KV_TILE_BYTES;
    // mbarriers, 8 bytes each: q_full, then k_full, v_full, k_empty, v_empty [STAGES] each
    static constexpr int NUM_MBARRIERS = 1 + 4 * STAGES;
    // + 1024: the dynamic shared memory is aligned up to 1024 bytes inside the block
    static constexpr int SMEM_BYTES = 1024 + SMEM_BARRIERS + 8 * NUM_MBARRIERS;

    // Registers per thread after setmaxnreg. The block starts with 65536 / NUM_THREADS
    // (rounded down to a multiple of 8: 168 for 384 threads, 128 for 512) and the pool
    // must balance: 128 * PRODUCER_REGS + 128 * NUM_CONSUMERS * CONSUMER_REGS equals what
    // the block started with.
    static constexpr int PRODUCER_REGS = NUM_CONSUMERS == 2 ? 24 : 32;
    static constexpr int CONSUMER_REGS = NUM_CONSUMERS == 2 ? 240 : 160;

    // Named barriers (0 is __syncthreads): the consumers' turn to issue products
    // (SCHED_BARRIER + consumer) and each consumer's epilogue (EPILOGUE_BARRIER + consumer).
    static constexpr int SCHED_BARRIER = 1;
    static constexpr int EPILOGUE_BARRIER = SCHED_BARRIER + NUM_CONSUMERS;

    static_assert(sizeof(T) == 2, "wgmma path is for fp16 and bf16");
    static_assert(HEAD_DIM % SLAB == 0 && HEAD_DIM <= 256, "HEAD_DIM: 64, 128, 192 or 256");
    static_assert(BLOCK_N % 16 == 0 && BLOCK_N <= 256, "BLOCK_N: a multiple of 16 up to 256");
    static_assert(NUM_CONSUMERS == 2 || NUM_CONSUMERS == 3, "two or three consumer warpgroups");
    static_assert(BLOCK_M <= 256, "a TMA box has at most 256 rows");
    static_assert(128 * PRODUCER_REGS + 128 * NUM_CONSUMERS * CONSUMER_REGS
                      == NUM_THREADS * (65536 / NUM_THREADS / 8 * 8),
                  "setmaxnreg must hand over exactly the registers the block holds");
    static_assert(EPILOGUE_BARRIER + NUM_CONSUMERS <= 16, "16 named barriers");
    static_assert(SMEM_BYTES <= 227 * 1024, "227 KiB of shared memory per block on sm_90");
};

// ---------------------------------------------------------------------------------------
// PTX wrappers: mbarriers, TMA, wgmma bookkeeping, register reallocation
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ void mbarrier_init(unsigned bar, unsigned arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals));
}
// Make the initialised mbarriers visible to the async proxy (TMA) before first use.
__device__ __forceinline__ void fence_mbarrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// One arrival that also announces `bytes` more bytes of TMA traffic for this phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Wait until the phase of parity `phase` has completed. A fresh mbarrier is in phase 0,
// so waiting for parity 1 returns at once (the producer's first pass over empty buffers).
__device__ __forceinline__ void mbarrier_wait(unsigned bar, unsigned phase) {
    unsigned done;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(phase)
            : "memory");
    } while (!done);
}

// Box (c0, c1, c2) of a 3-D tensor map -> shared memory, completing on mbarrier `bar`.
__device__ __forceinline__ void tma_load_3d(unsigned dst, const TmaDescriptor& map, unsigned bar,
                                            int c0, int c1, int c2) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
        "[%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(dst),
        "l"(reinterpret_cast<unsigned long long>(&map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
        : "memory");
}
__device__ __forceinline__ void prefetch_tensor_map(const TmaDescriptor& map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<unsigned long long>(&map))
                 : "memory");
}

__device__ __forceinline__ void wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Wait until at most N committed groups of this warpgroup's wgmmas are still running.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// The compiler sees an asynchronous wgmma's accumulators as written when it is issued.
// An empty asm that "rewrites" each register pins the code that reads them (after the
// wait) or writes them (before the issue) to its side of the fence.
template <int N>
__device__ __forceinline__ void fence_operands(float (&x)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(x[i][e])::"memory");
}

template <int REGS>
__device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
}
template <int REGS>
__device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
}

__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// wgmma's shared-memory matrix descriptor for a tile in the 128-byte swizzled layout:
// start address, leading and stride byte offsets (16-byte units, 14 bits each), base
// offset 0 (tiles are 1024-byte aligned) and swizzle mode 1 = 128 B in bits 62-63.
//   K-major (Q, K: rows of K-contiguous values): the stride offset is 1024 B from one
//   8-row group to the next; the leading offset is unused (one k16 step stays inside a
//   128-byte row), 16 by convention.
//   MN-major (V: rows of N-contiguous values, read transposed): the leading offset steps
//   N by 64 (one slab), the stride offset K by 8 rows (1024 B).
// A k16 step inside a 128-byte row moves the start address by 32 bytes; the hardware
// applies the swizzle to the final addresses, so the XOR pattern needs no adjustment.
__device__ __forceinline__ unsigned long long smem_descriptor(unsigned addr, unsigned lead_bytes,
                                                              unsigned stride_bytes) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4)
           | ((unsigned long long)(lead_bytes >> 4) << 16)
           | ((unsigned long long)(stride_bytes >> 4) << 32) | (1ull << 62);
}

// ---------------------------------------------------------------------------------------
// Online softmax of the two rows a thread holds: rows g and g + 8 of its warp's 16.
// ---------------------------------------------------------------------------------------
// OnlineSoftmax of flash_fwd_mma.cuh, with one change: acc is not rescaled here, because
// the previous block's P V may still be accumulating into it. The factor is kept in alpha
// and rescale() applies it just before the next P V is issued. The same guards: a row whose
// maximum is -inf uses 0 as its maximum (no NaN), a row that saw no key ends with l_i = 0.
template <int S_N_TILES>
struct WgmmaSoftmax {
    // m_i moves only when a block's max exceeds it by more than this (log2 units), as in
    // FlashAttention-4: P <= 2^8, and most blocks need no rescale of acc.
    static constexpr float RESCALE_THRESHOLD = 8.f;

    float m_i[2];    // running row max of S * c (log2 units); -inf: nothing seen yet
    float l_i[2];    // running row sum of P over this lane's columns only
    float alpha[2];  // exp2(m_old - m_new) of the last update, owed to acc
    bool rescale;    // some row of the warp moved its max: acc *= alpha is owed (warp-uniform)

    __device__ __forceinline__ WgmmaSoftmax() : rescale(false) {
        m_i[0] = m_i[1] = -INFINITY;
        l_i[0] = l_i[1] = 0.f;
        alpha[0] = alpha[1] = 1.f;
    }

    // -- update m_i and l_i with one key block; S becomes P = exp2(S c - m_i)
    __device__ __forceinline__ void update(float (&s)[S_N_TILES][4], float c) {
        bool any_grow = false;
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // h = 0: row g (elements 0, 1); h = 1: row g + 8
            float row_max = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < S_N_TILES; ++nt)
                row_max = fmaxf(row_max, fmaxf(s[nt][2 * h], s[nt][2 * h + 1]));
            const float m_blk = quad_max(row_max) * c;
            const bool grow = m_blk > m_i[h] + RESCALE_THRESHOLD;  // m_i = -inf: grows
            const float m_new = grow ? m_blk : m_i[h];
            const float m_use = safe_max(m_new);
            alpha[h] = grow ? exp2_ftz(m_i[h] - m_use) : 1.f;  // exp2(m_old - m_new)
            any_grow |= grow;
            float row_sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < S_N_TILES; ++nt)
#pragma unroll
                for (int e = 2 * h; e < 2 * h + 2; ++e) {
                    s[nt][e] = exp2_ftz(fmaf(s[nt][e], c, -m_use));  // P = exp2(S c - m)
                    row_sum += s[nt][e];
                }
            l_i[h] = l_i[h] * alpha[h] + row_sum;
            m_i[h] = m_new;
        }
        rescale = __any_sync(0xffffffffu, any_grow);
    }

    // acc *= alpha, when some row of the warp moved its max since the last call.
    template <int O_N_TILES>
    __device__ __forceinline__ void rescale_acc(float (&acc)[O_N_TILES][4]) {
        if (rescale) {
#pragma unroll
            for (int nt = 0; nt < O_N_TILES; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[nt][e] *= alpha[e / 2];
        }
        rescale = false;
    }
};

// ---------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------
// Two entry points share one body, as in flash_fwd_mma.cuh: flash_fwd_wgmma (plain or
// causal) and flash_fwd_wgmma_variants, whose scores go through ScoreModifier
// (attention_variants.cuh): bias, mask, window with the causal mask folded in, ALiBi,
// softcap. The body reads vp only with VARIANTS.
template <typename T, int HEAD_DIM, int BLOCK_N, int NUM_CONSUMERS, int STAGES, bool IS_CAUSAL,
          bool VARIANTS>
__device__ __forceinline__ void flash_fwd_wgmma_body(const AttentionParams& p,
                                                     const VariantParams& vp,
                                                     const TmaDescriptor& tma_q,
                                                     const TmaDescriptor& tma_k,
                                                     const TmaDescriptor& tma_v,
                                                     long long q_row0, long long k_row0) {
    static_assert(!(IS_CAUSAL && VARIANTS), "with variants the causal mask is the window's");
    using Tr = FwdWgmmaTraits<T, HEAD_DIM, BLOCK_N, NUM_CONSUMERS, STAGES>;
    using Mma = Wgmma<BLOCK_N, IsBf16<T>::value>;   // S = Q K^T: N = BLOCK_N
    using MmaO = Wgmma<HEAD_DIM, IsBf16<T>::value>; // acc += P V: N = HEAD_DIM
    constexpr int BLOCK_M = Tr::BLOCK_M, SLABS = Tr::SLABS;

    const long long b = (long long)blockIdx.z * gridDim.y + blockIdx.y;  // batch element
    if (b >= p.n_batch) return;
    // Causal (or a window bounded on the right only): the longest query blocks, the last
    // ones, start first.
    const bool longest_last =
        IS_CAUSAL || (VARIANTS && vp.window_right < UNBOUNDED && vp.window_left >= UNBOUNDED);
    const int m_block = longest_last ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    const long long m0 = (long long)m_block * BLOCK_M;
    // A packed sequence (flash_fwd_wgmma_varlen) shorter than the grid's longest: the whole
    // block leaves before any mbarrier or named barrier exists, so no warp waits on it.
    if (VARIANTS && m0 >= p.Lq) return;

    // Key blocks to visit, [n_first, n_blocks), last to first: iteration it takes block
    // n_blocks - 1 - it. Causal skips the blocks wholly above the diagonal, a window
    // those wholly outside its band.
    const long long diag = p.Lk - p.Lq;  // query i sees key j iff j <= i + diag
    int n_first = 0, n_blocks;
    if constexpr (VARIANTS) {
        // (a modifier of its own: the consumers build theirs after setmaxnreg, so that
        // nothing of it is live in the producer's few registers)
        ScoreModifier<T, float>(p, vp, b).key_blocks(m0, min(m0 + BLOCK_M, p.Lq), BLOCK_N,
                                                     n_first, n_blocks);
    } else {
        long long n_end = p.Lk;
        if (IS_CAUSAL) n_end = min(n_end, m0 + BLOCK_M + diag);
        n_blocks = n_end > 0 ? (int)((n_end + BLOCK_N - 1) / BLOCK_N) : 0;
    }
    const int n_iters = n_blocks - n_first;

    extern __shared__ unsigned char smem_raw[];
    const unsigned smem_raw_addr = smem_addr(smem_raw);
    const unsigned smem = (smem_raw_addr + 1023) & ~1023u;  // 1024-byte aligned base
    unsigned char* const smem_ptr = smem_raw + (smem - smem_raw_addr);
    const unsigned sQ = smem + Tr::SMEM_Q, sK = smem + Tr::SMEM_K, sV = smem + Tr::SMEM_V;
    const unsigned q_full = smem + Tr::SMEM_BARRIERS;
    auto k_full = [&](int st) { return q_full + 8 * (1 + st); };
    auto v_full = [&](int st) { return q_full + 8 * (1 + STAGES + st); };
    auto k_empty = [&](int st) { return q_full + 8 * (1 + 2 * STAGES + st); };
    auto v_empty = [&](int st) { return q_full + 8 * (1 + 3 * STAGES + st); };

    if (threadIdx.x == 0) {
        mbarrier_init(q_full, 1);  // the producer's arrive.expect_tx; TMA brings the bytes
        for (int st = 0; st < STAGES; ++st) {
            mbarrier_init(k_full(st), 1);
            mbarrier_init(v_full(st), 1);
            mbarrier_init(k_empty(st), 4 * NUM_CONSUMERS);  // one arrival per consumer warp
            mbarrier_init(v_empty(st), 4 * NUM_CONSUMERS);
        }
        fence_mbarrier_init();
    }
    __syncthreads();  // the mbarriers are initialised before anyone waits on them

    // Batch element b's slice of each tensor map (strides in slices, see the top).
    const BatchOffsets off = batch_offsets(p, b);
    const int warpgroup = threadIdx.x / 128;

    if (warpgroup == 0) {
        // ------------------------------- producer -------------------------------------
        setmaxnreg_dec<Tr::PRODUCER_REGS>();
        if (threadIdx.x == 0 && n_iters > 0) {
            prefetch_tensor_map(tma_q);
            prefetch_tensor_map(tma_k);
            prefetch_tensor_map(tma_v);
            // Q_i: (BLOCK_M, HEAD_DIM), one box of BLOCK_M rows x 64 columns per slab
            mbarrier_arrive_expect_tx(q_full, Tr::Q_TILE_BYTES);
#pragma unroll
            for (int s = 0; s < SLABS; ++s)
                tma_load_3d(sQ + s * BLOCK_M * 128, tma_q, q_full, s * Tr::SLAB,
                            (int)(q_row0 + m0), (int)off.q);
            // Key block of iteration it is j = n_blocks - 1 - it, in buffer it % STAGES.
            // Order K_0, then K_it and V_{it-1}: the consumers need K_it for S before
            // they need V_{it-1} for P V.
            auto load_kv = [&](const TmaDescriptor& map, unsigned tiles, unsigned full,
                               unsigned empty, int it, long long slice) {
                const int st = it % STAGES;
                mbarrier_wait(empty, ((it / STAGES) & 1) ^ 1);  // the buffer was handed back
                mbarrier_arrive_expect_tx(full, Tr::KV_TILE_BYTES);
                // (rows past a packed sequence's Lk are the next sequence's: masked to P = 0)
                const int n0 = (int)k_row0 + (n_blocks - 1 - it) * BLOCK_N;
#pragma unroll
                for (int s = 0; s < SLABS; ++s)
                    tma_load_3d(tiles + st * Tr::KV_TILE_BYTES + s * BLOCK_N * 128, map, full,
                                s * Tr::SLAB, n0, (int)slice);
            };
            for (int it = 0; it <= n_iters; ++it) {
                if (it < n_iters)
                    load_kv(tma_k, sK, k_full(it % STAGES), k_empty(it % STAGES), it, off.k);
                if (it > 0)
                    load_kv(tma_v, sV, v_full((it - 1) % STAGES), v_empty((it - 1) % STAGES),
                            it - 1, off.v);
            }
        }
    } else {
        // ------------------------------- consumers ------------------------------------
        setmaxnreg_inc<Tr::CONSUMER_REGS>();
        // The variants of batch element b (built and read only with VARIANTS).
        const ScoreModifierIf<VARIANTS, T, float> mod(p, vp, b);
        constexpr int S_N_TILES = Tr::S_N_TILES, O_N_TILES = Tr::O_N_TILES;
        const int wg = warpgroup - 1;                // consumer index
        const int warp = (threadIdx.x / 32) % 4;     // warp inside the warpgroup
        const int lane = threadIdx.x % 32;
        const int g = lane / 4;  // this lane holds rows g and g + 8 of its warp's 16 rows
        const int t = lane % 4;  // and columns 2t, 2t + 1 of each n8 tile
        const long long wg_row0 = m0 + Tr::WG_M * wg;  // first query row of this warpgroup

        float acc[O_N_TILES][4];  // unnormalised O: (64, HEAD_DIM) over the warpgroup, fp32
#pragma unroll
        for (int nt = 0; nt < O_N_TILES; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
        float s[S_N_TILES][4];                     // S, then P: (64, BLOCK_N), fp32
        unsigned p_frag[Tr::PV_K_STEPS][4];        // P rounded to T, the A operand of P V
        WgmmaSoftmax<S_N_TILES> softmax;

        // exp(S * scale) = exp2(S * scale_log2), folded into one FFMA for scale > 0
        // (c = scale_log2); otherwise S is multiplied first and c = 1.
        const float scale_log2 = static_cast<float>(p.scale_log2);
        const bool prescale = !(scale_log2 > 0.f);
        const float c = prescale ? 1.f : scale_log2;
        // Bias, ALiBi and softcap work on scaled scores, so with them S is scaled first; a
        // mask or a window only sets -inf, which the exponent's FFMA keeps (scale > 0).
        bool scale_first = prescale;
        if constexpr (VARIANTS) scale_first = prescale || mod.changes_values();

        // Descriptors: this warpgroup's 64 rows of Q (K-major), buffer 0 of K (K-major)
        // and of V (MN-major: N steps by slab); a k16 step moves them as the comment of
        // smem_descriptor says. (Added to the start address field in 16-byte units.)
        const unsigned long long q_desc = smem_descriptor(sQ + Tr::WG_M * wg * 128, 16, 1024);
        const unsigned long long k_desc = smem_descriptor(sK, 16, 1024);
        const unsigned long long v_desc = smem_descriptor(sV, BLOCK_N * 128, 1024);

        // Turns: consumer wg issues its products after consumer wg - 1 has issued its own.
        auto wait_turn = [&]() {
            named_barrier_sync(Tr::SCHED_BARRIER + wg, 256);
        };
        auto pass_turn = [&](bool last) {
            // The last consumer's last pass would open a turn nobody takes: skip it, so
            // that every named barrier ends with as many arrivals as waits.
            if (!(last && wg == NUM_CONSUMERS - 1))
                named_barrier_arrive(Tr::SCHED_BARRIER + (wg + 1) % NUM_CONSUMERS, 256);
        };

        // S = Q_i K_j^T for the K tile in buffer st: (64, BLOCK_N), fp32. Asynchronous.
        auto issue_qk = [&](int st) {
            fence_operands(s);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < Tr::QK_K_STEPS; ++kk) {
                // head dims 16kk..16kk+15: slab kk / 4, 32 bytes into its rows per step
                const int q_offset = (kk / 4) * BLOCK_M * 128 + (kk % 4) * 32;
                const int k_offset =
                    st * Tr::KV_TILE_BYTES + (kk / 4) * BLOCK_N * 128 + (kk % 4) * 32;
                Mma::ss(s, q_desc + (q_offset >> 4), k_desc + (k_offset >> 4),
                        /*accumulate=*/kk > 0);
            }
            wgmma_commit();
        };
        // acc += P V_j for the V tile in buffer st: (64, BLOCK_N) x (BLOCK_N, HEAD_DIM).
        auto issue_pv = [&](int st) {
            fence_operands(acc);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < Tr::PV_K_STEPS; ++kk)
                MmaO::rs(acc, p_frag[kk],
                         v_desc + ((st * Tr::KV_TILE_BYTES + kk * 16 * 128) >> 4),
                         /*accumulate=*/1);
            wgmma_commit();
        };
        auto release = [&](unsigned empty) {  // this warp is done reading a K or V buffer
            if (lane == 0) mbarrier_arrive(empty);
        };
        // The softmax of the S just computed for key block j: scale, mask, update.
        auto softmax_step = [&](int it) {
            const long long n0 = (long long)(n_blocks - 1 - it) * BLOCK_N;
            if (scale_first) {  // S *= scale * log2(e) before the variants, mask and max
#pragma unroll
                for (int nt = 0; nt < S_N_TILES; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[nt][e] *= scale_log2;
            }
            if constexpr (VARIANTS) {
                // Scores -> softcap, ALiBi, bias, band and mask, in the blocks that need
                // it: those that cross the band's edges or Lk for this warp's 16 rows,
                // those where the mask hides a key, and all with bias, ALiBi or softcap.
                const long long warp_m0 = wg_row0 + 16 * warp;
                const bool band = !mod.block_inside(warp_m0, 16, n0, BLOCK_N);
                const bool mask = mod.warp_needs_mask(n0, BLOCK_N);
                if (band || mask || mod.changes_values())
                    mod.apply(s, warp_m0 + g, n0, t, band, mask);
                softmax.update(s, scale_first ? 1.f : c);
                return;
            }
            // Keys past Lk or above the causal diagonal -> -inf, only in blocks that cross
            // the Lk boundary or this warpgroup's diagonal; there row r sees the block's
            // first `visible` keys (query i sees key j iff j <= i + diag).
            if (n0 + BLOCK_N > p.Lk || (IS_CAUSAL && n0 + BLOCK_N - 1 > wg_row0 + diag)) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    long long end = p.Lk - n0;
                    if (IS_CAUSAL) end = min(end, wg_row0 + 16 * warp + g + 8 * h + diag + 1 - n0);
                    const int visible = (int)max(min(end, (long long)BLOCK_N), 0LL);
#pragma unroll
                    for (int nt = 0; nt < S_N_TILES; ++nt)
#pragma unroll
                        for (int e = 2 * h; e < 2 * h + 2; ++e)
                            if (nt * 8 + 2 * t + (e & 1) >= visible) s[nt][e] = -INFINITY;
                }
            }
            softmax.update(s, c);
        };
        // P rounded to T in the A-operand layout of P V: the accumulator layout of the n8
        // tiles 2kk and 2kk + 1 of S is the A fragment of k16 step kk.
        auto pack_p = [&]() {
#pragma unroll
            for (int kk = 0; kk < Tr::PV_K_STEPS; ++kk) {
                p_frag[kk][0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
                p_frag[kk][1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
                p_frag[kk][2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                p_frag[kk][3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            }
        };

        if (n_iters > 0) {
            mbarrier_wait(q_full, 0);
            if (wg == NUM_CONSUMERS - 1)  // open the first turn, consumer 0's
                named_barrier_arrive(Tr::SCHED_BARRIER, 256);

            // Iteration 0: S_0 alone.
            mbarrier_wait(k_full(0), 0);
            wait_turn();
            issue_qk(0);
            pass_turn(/*last=*/false);
            wgmma_wait<0>();
            fence_operands(s);
            release(k_empty(0));
            softmax_step(0);
            pack_p();

            // Iterations 1..n_iters-1: S_it, and P V of the block before, in flight
            // together; the softmax of S_it runs while P V accumulates.
            for (int it = 1; it < n_iters; ++it) {
                const int st = it % STAGES, prev = (it - 1) % STAGES;
                // Both tiles are in before this warpgroup takes its turn, so that it never
                // holds the tensor cores' turn while waiting for a load.
                mbarrier_wait(k_full(st), (it / STAGES) & 1);
                mbarrier_wait(v_full(prev), ((it - 1) / STAGES) & 1);
                wait_turn();
                issue_qk(st);
                softmax.rescale_acc(acc);  // owed by the previous softmax; acc is idle now
                issue_pv(prev);
                pass_turn(/*last=*/false);
                wgmma_wait<1>();  // S_it is done (groups complete in order); P V may not be
                fence_operands(s);
                release(k_empty(st));
                softmax_step(it);
                wgmma_wait<0>();  // P V is done: p_frag and the V buffer are free again
                fence_operands(acc);
                release(v_empty(prev));
                pack_p();
            }

            // The last P V.
            const int last = (n_iters - 1) % STAGES;
            softmax.rescale_acc(acc);
            mbarrier_wait(v_full(last), ((n_iters - 1) / STAGES) & 1);
            wait_turn();
            issue_pv(last);
            pass_turn(/*last=*/true);
            wgmma_wait<0>();
            fence_operands(acc);
        }

        // O = acc / l_i; lse = (m_i + log2 l_i) * ln 2. A row with l_i = 0 saw no key:
        // zeros and lse = -inf. O is staged in this warpgroup's own rows of sQ (same
        // swizzled layout), then each warp writes its 16 rows with 16-byte stores.
        T* const o = static_cast<T*>(p.o) + off.o;
        float* const lse = static_cast<float*>(p.lse) + b * p.Lq;
        named_barrier_sync(Tr::EPILOGUE_BARRIER + wg, 128);  // all its wgmmas have read sQ
        T* const sO = reinterpret_cast<T*>(smem_ptr + Tr::SMEM_Q);
        auto staged = [&](int r, int chunk) {  // element offset of (row r of the block, chunk)
            return (chunk / 8) * BLOCK_M * 64 + r * 64 + ((chunk % 8) ^ (r % 8)) * 8;
        };
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float l = quad_sum(softmax.l_i[h]);
            const float inv_l = safe_inverse(l);
            const int r = Tr::WG_M * wg + 16 * warp + g + 8 * h;  // row inside the block
#pragma unroll
            for (int nt = 0; nt < O_N_TILES; ++nt)
                *reinterpret_cast<unsigned*>(sO + staged(r, nt) + 2 * t) =
                    pack2<T>(acc[nt][2 * h] * inv_l, acc[nt][2 * h + 1] * inv_l);
            // lse = ln 2 * m_i + ln l_i (m_i is in log2 units): one FMA, an accurate log.
            if (t == 0 && m0 + r < p.Lq)
                lse[m0 + r] = l == 0.f ? -INFINITY : fmaf(softmax.m_i[h], LN2, logf(l));
        }
        __syncwarp();  // the warp's rows are staged before its lanes read them back

        constexpr int CHUNKS = HEAD_DIM / 8;  // 16-byte chunks per row
        const int o_chunks = (int)((p.Dv + 7) / 8);
        for (int idx = lane; idx < 16 * CHUNKS; idx += 32) {
            const int r = Tr::WG_M * wg + 16 * warp + idx / CHUNKS;
            const int chunk = idx % CHUNKS;
            if (m0 + r < p.Lq && chunk < o_chunks)
                *reinterpret_cast<uint4*>(o + (m0 + r) * p.o_row_stride + chunk * 8) =
                    *reinterpret_cast<const uint4*>(sO + staged(r, chunk));
        }
    }
}

template <typename T, int HEAD_DIM, int BLOCK_N, int NUM_CONSUMERS, int STAGES, bool IS_CAUSAL>
__global__ void __launch_bounds__(128 * (NUM_CONSUMERS + 1), 1)
flash_fwd_wgmma(const AttentionParams p, const __grid_constant__ TmaDescriptor tma_q,
                const __grid_constant__ TmaDescriptor tma_k,
                const __grid_constant__ TmaDescriptor tma_v) {
    flash_fwd_wgmma_body<T, HEAD_DIM, BLOCK_N, NUM_CONSUMERS, STAGES, IS_CAUSAL, false>(
        p, VariantParams{}, tma_q, tma_k, tma_v, /*q_row0=*/0, /*k_row0=*/0);
}

template <typename T, int HEAD_DIM, int BLOCK_N, int NUM_CONSUMERS, int STAGES>
__global__ void __launch_bounds__(128 * (NUM_CONSUMERS + 1), 1)
flash_fwd_wgmma_variants(const AttentionParams p, const VariantParams vp,
                         const __grid_constant__ TmaDescriptor tma_q,
                         const __grid_constant__ TmaDescriptor tma_k,
                         const __grid_constant__ TmaDescriptor tma_v) {
    flash_fwd_wgmma_body<T, HEAD_DIM, BLOCK_N, NUM_CONSUMERS, STAGES, false, true>(
        p, vp, tma_q, tma_k, tma_v, /*q_row0=*/0, /*k_row0=*/0);
}

// The variants over packed sequences (attention_varlen), as flash_fwd_mma_varlen: each
// block attends the sequence of its batch element (sequence_params), reading q, k and v
// through (D, total rows, heads) maps from the sequence's first rows on. Rows past the
// sequence's end are the next sequence's, not zeros: keys there are past its Lk (P = 0
// exactly, so their V rows add nothing), queries there are never stored.
template <typename T, int HEAD_DIM, int BLOCK_N, int NUM_CONSUMERS, int STAGES>
__global__ void __launch_bounds__(128 * (NUM_CONSUMERS + 1), 1)
flash_fwd_wgmma_varlen(const AttentionParams p, const VariantParams vp,
                       const __grid_constant__ TmaDescriptor tma_q,
                       const __grid_constant__ TmaDescriptor tma_k,
                       const __grid_constant__ TmaDescriptor tma_v) {
    const long long b = (long long)blockIdx.z * gridDim.y + blockIdx.y;  // (sequence, head)
    if (b >= p.n_batch) return;
    long long q_row0, k_row0;
    const AttentionParams ps = sequence_params<T, float>(p, vp, b, q_row0, k_row0);
    flash_fwd_wgmma_body<T, HEAD_DIM, BLOCK_N, NUM_CONSUMERS, STAGES, false, true>(
        ps, vp, tma_q, tma_k, tma_v, q_row0, k_row0);
}

}  // namespace cupyflash
