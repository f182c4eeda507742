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
    // mbarriers, 8 bytes each: q_full, q_empty, then k_full, v_full, k_empty, v_empty
    // [STAGES] each; then the tile in Q (persistent kernel): its number, and for packed
    // sequences its place (TileSlot), 32 bytes
    static constexpr int NUM_MBARRIERS = 2 + 4 * STAGES;
    static constexpr int SMEM_TILE = SMEM_BARRIERS + 8 * NUM_MBARRIERS;
    // + 1024: the dynamic shared memory is aligned up to 1024 bytes inside the block
    static constexpr int SMEM_BYTES = 1024 + SMEM_TILE + 32;

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

__device__ __forceinline__ void st_shared_zero16(unsigned addr) {  // 16 zero bytes
    asm volatile("st.shared.v4.b32 [%0], {%1, %1, %1, %1};\n" :: "r"(addr), "r"(0) : "memory");
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
// Four entry points share one body, as in flash_fwd_mma.cuh: flash_fwd_wgmma (plain or
// causal), flash_fwd_wgmma_local (a window and/or a padding mask, nothing else: IS_LOCAL),
// flash_fwd_wgmma_variants, whose scores go through ScoreModifier
// (attention_variants.cuh): bias, mask, window with the causal mask folded in, ALiBi,
// softcap, and flash_fwd_wgmma_varlen (packed sequences, plain or causal). The body
// reads vp only with VARIANTS, and its window sides and key_end with IS_LOCAL.
//
// A tile is one query block of one batch element. The variants kernels compute one tile
// per thread block, named by the block's index. flash_fwd_wgmma and flash_fwd_wgmma_local
// built with PERSISTENT are persistent: one block per SM, each computing tiles until none
// is left. Then the producer loads the next tile's
// Q and first K/V blocks while the consumers finish the last P V and the epilogue of the
// tile before, which a freshly launched block could not overlap: at s = 1k a tile has only
// 8 key blocks, and that prologue and epilogue are a large share of its time. Tiles are
// numbered batch element by batch element (so that the blocks running at one time share
// the K and V of a few batch elements in L2), and inside one from the longest to the
// shortest (causal: the last query block first). Block i takes tile i, then the next one
// not yet taken, from a counter in global memory that is zero at launch: the blocks that
// drew short causal tiles take more of them, with no fixed assignment to balance.
// The producer draws the tiles and hands each to the consumers through shared memory
// (tile_slot, published with Q by the q_full mbarrier; -1: no tile left).
struct FwdTile {
    long long b;         // batch element
    long long m0;        // first query row
    int n_first;         // key blocks to visit: [n_first, n_blocks), last to first
    int n_blocks;        // (-1, -1: a tile flash_fwd_wgmma_local leaves to another kernel)
};

// The tile a persistent block's producer hands to its consumers (in shared memory,
// published with Q by the q_full mbarrier): its number (-1: no tile left), and for packed
// sequences (VARLEN) the tile and its sequence's extent, which the producer looked up in
// global memory (a few dependent loads the consumers would otherwise wait for each tile).
struct TileSlot {
    int number;
    int b, m0, n_first, n_blocks;  // FwdTile
    int Lq, Lk, q_row0;            // the sequence's lengths and first query row
};

template <typename T, int HEAD_DIM, int BLOCK_N, int NUM_CONSUMERS, int STAGES, bool IS_CAUSAL,
          bool IS_LOCAL, bool VARIANTS, bool PERSISTENT, bool VARLEN = false,
          bool PACKED = VARLEN>
__device__ __forceinline__ void flash_fwd_wgmma_body(const AttentionParams& p,
                                                     const VariantParams& vp,
                                                     const TmaDescriptor& tma_q,
                                                     const TmaDescriptor& tma_k,
                                                     const TmaDescriptor& tma_v,
                                                     long long q_row0, long long k_row0,
                                                     int* tile_counter,
                                                     const int* varlen_tiles = nullptr,
                                                     int n_varlen_seqs = 0) {
    static_assert(!(IS_CAUSAL && VARIANTS), "with variants the causal mask is the window's");
    static_assert(!(PERSISTENT && VARIANTS), "the variants kernels take one tile per block");
    static_assert(!(IS_LOCAL && (IS_CAUSAL || VARIANTS)), "a local band holds the causal mask");
    static_assert(!VARLEN || (PERSISTENT && !IS_LOCAL), "varlen tiles are the persistent plain ones");
    using Tr = FwdWgmmaTraits<T, HEAD_DIM, BLOCK_N, NUM_CONSUMERS, STAGES>;
    using Mma = Wgmma<BLOCK_N, IsBf16<T>::value>;   // S = Q K^T: N = BLOCK_N
    using MmaO = Wgmma<HEAD_DIM, IsBf16<T>::value>; // acc += P V: N = HEAD_DIM
    constexpr int BLOCK_M = Tr::BLOCK_M, SLABS = Tr::SLABS;

    // Batch element b's problem: its lengths, the rows where its q and its k, v begin in
    // the tensor maps, and where its o and lse rows begin: p's, or (VARLEN) those of its
    // packed sequence (sequence_params; only the producer looks them up, and the
    // consumers find o and lse at the epilogue, so no pointers then).
    struct Extent {
        long long Lq, Lk, q_row0, k_row0;
        T* o;
        float* lse;
    };
    auto extent_of = [&](long long b) {
        if constexpr (VARLEN) {
            long long q0, k0;
            const AttentionParams s = sequence_params<T, float>(p, vp, b, q0, k0);
            return Extent{s.Lq, s.Lk, q0, k0, nullptr, nullptr};
        } else {
            const BatchOffsets off = batch_offsets(p, b);
            return Extent{p.Lq, p.Lk, q_row0, k_row0, static_cast<T*>(p.o) + off.o,
                          static_cast<float*>(p.lse) + b * p.Lq};
        }
    };

    // Key blocks to visit without variants: all, except (causal) those wholly above the
    // diagonal, or (local) those wholly outside the band of the block's rows: query i sees
    // keys [i + diag - left, i + diag + right] (vp.window_left, vp.window_right; the
    // causal mask is right = 0), and with a row-broadcast mask (vp.key_end, from
    // mask_key_end) only the keys before key_end[b], where the mask keeps a prefix of the
    // keys; where it has holes the tile is not this kernel's (n_blocks = -1: nothing
    // stored; flash_fwd_wgmma_variants computes it).
    auto plain_tile = [&](long long b, long long m0, long long Lq, long long Lk) {
        const long long diag = Lk - Lq;  // query i sees key j iff j <= i + diag
        long long n_begin = 0, n_end = Lk;
        if (IS_CAUSAL) n_end = min(n_end, m0 + BLOCK_M + diag);
        if (IS_LOCAL) {
            n_begin = max(n_begin, m0 + diag - vp.window_left);
            n_end = min(n_end, min(m0 + BLOCK_M, Lq) + diag + vp.window_right);
            if (vp.key_end != nullptr) {
                const long long kept = vp.key_end[b];
                if (vp.key_end[p.n_batch + b] < kept) return FwdTile{b, m0, -1, -1};
                n_end = min(n_end, kept);
            }
        }
        if (n_end <= n_begin) return FwdTile{b, m0, 0, 0};
        return FwdTile{b, m0, (int)(n_begin / BLOCK_N), (int)((n_end + BLOCK_N - 1) / BLOCK_N)};
    };
    // Causal (or a band bounded on the right only): the longest query blocks, the last
    // ones, first.
    const bool longest_last =
        IS_CAUSAL ||
        ((VARIANTS || IS_LOCAL) && vp.window_right < UNBOUNDED && vp.window_left >= UNBOUNDED);
    // Tile t of a persistent block: batch element t / n_m_blocks, query blocks in order
    // (longest_last: last to first). Packed sequences (VARLEN): the sequences in the
    // host's order, heaviest first (_cupy_backend.varlen_tiles: varlen_tiles[i] is the
    // first tile of the i-th, varlen_tiles[n_varlen_seqs] the number of tiles, and
    // varlen_tiles[n_varlen_seqs + 1 + i] the sequence), each head by head, each head's
    // query blocks in the dense order.
    const int n_m_blocks = (int)((p.Lq + BLOCK_M - 1) / BLOCK_M);
    const int n_tiles = VARLEN ? varlen_tiles[n_varlen_seqs]
                               : PERSISTENT ? (int)(n_m_blocks * p.n_batch) : 1;
    auto tile_at = [&](int t) {
        if constexpr (VARLEN) {
            int lo = 0, hi = n_varlen_seqs;  // the i with first tile <= t < the next one's
            while (hi - lo > 1) {
                const int mid = (lo + hi) / 2;
                if (varlen_tiles[mid] <= t) lo = mid; else hi = mid;
            }
            const int r = t - varlen_tiles[lo];
            const long long heads = p.batch_size[MAX_BATCH_DIMS - 2] * p.batch_size[MAX_BATCH_DIMS - 1];
            const long long seq = varlen_tiles[n_varlen_seqs + 1 + lo];
            const long long q0 = vp.cu_seqlens_q[seq], k0 = vp.cu_seqlens_k[seq];
            const long long Lq = vp.cu_seqlens_q[seq + 1] - q0, Lk = vp.cu_seqlens_k[seq + 1] - k0;
            const int blocks = (int)((Lq + BLOCK_M - 1) / BLOCK_M);
            const int m = r % blocks;
            return plain_tile(seq * heads + r / blocks,
                              (long long)(longest_last ? blocks - 1 - m : m) * BLOCK_M, Lq, Lk);
        } else {
            const int r = t % n_m_blocks;
            return plain_tile(t / n_m_blocks,
                              (long long)(longest_last ? n_m_blocks - 1 - r : r) * BLOCK_M,
                              p.Lq, p.Lk);
        }
    };

    // The one tile of a block of the other kernels, from the block index.
    FwdTile one{0, 0, 0, 0};
    if constexpr (!PERSISTENT) {
        one.b = (long long)blockIdx.z * gridDim.y + blockIdx.y;
        if (one.b >= p.n_batch) return;
        // A prefix mask's batch element, computed by flash_fwd_wgmma_local (see there).
        if (VARIANTS && vp.prefix_masks_done &&
            vp.key_end[p.n_batch + one.b] >= vp.key_end[one.b])
            return;
        one.m0 = (long long)(longest_last ? gridDim.x - 1 - blockIdx.x : blockIdx.x) * BLOCK_M;
        // A packed sequence (flash_fwd_wgmma_varlen) shorter than the grid's longest: the
        // whole block leaves before any mbarrier or named barrier exists, so no warp waits.
        // (A dense batch's grid has no such block.)
        if (one.m0 >= p.Lq) return;
        if constexpr (VARIANTS) {
            // (a modifier of its own: the consumers build theirs after setmaxnreg, so that
            // nothing of it is live in the producer's few registers)
            ScoreModifier<T, float>(p, vp, one.b).key_blocks(one.m0, min(one.m0 + BLOCK_M, p.Lq),
                                                             BLOCK_N, one.n_first, one.n_blocks);
        } else {
            one = plain_tile(one.b, one.m0, p.Lq, p.Lk);
        }
    }

    extern __shared__ unsigned char smem_raw[];
    const unsigned smem_raw_addr = smem_addr(smem_raw);
    const unsigned smem = (smem_raw_addr + 1023) & ~1023u;  // 1024-byte aligned base
    unsigned char* const smem_ptr = smem_raw + (smem - smem_raw_addr);
    const unsigned sQ = smem + Tr::SMEM_Q, sK = smem + Tr::SMEM_K, sV = smem + Tr::SMEM_V;
    const unsigned q_full = smem + Tr::SMEM_BARRIERS;
    const unsigned q_empty = q_full + 8;
    auto k_full = [&](int st) { return q_full + 8 * (2 + st); };
    auto v_full = [&](int st) { return q_full + 8 * (2 + STAGES + st); };
    auto k_empty = [&](int st) { return q_full + 8 * (2 + 2 * STAGES + st); };
    auto v_empty = [&](int st) { return q_full + 8 * (2 + 3 * STAGES + st); };
    volatile TileSlot* const tile_slot =
        reinterpret_cast<volatile TileSlot*>(smem_ptr + Tr::SMEM_TILE);

    if (threadIdx.x == 0) {
        mbarrier_init(q_full, 1);  // the producer's arrive.expect_tx; TMA brings the bytes
        mbarrier_init(q_empty, 4 * NUM_CONSUMERS);  // one arrival per consumer warp
        for (int st = 0; st < STAGES; ++st) {
            mbarrier_init(k_full(st), 1);
            mbarrier_init(v_full(st), 1);
            mbarrier_init(k_empty(st), 4 * NUM_CONSUMERS);
            mbarrier_init(v_empty(st), 4 * NUM_CONSUMERS);
        }
        fence_mbarrier_init();
    }
    __syncthreads();  // the mbarriers are initialised before anyone waits on them

    const int warpgroup = threadIdx.x / 128;
    // Key blocks are numbered over all of a block's tiles: block number kb (iteration it of
    // a tile whose first has number k_base: kb = k_base + it) goes through buffer
    // kb % STAGES, in that buffer's pass kb / STAGES (the parity its mbarriers wait for).
    auto stage_of = [](int kb) { return kb % STAGES; };
    auto pass_of = [](int kb) { return (kb / STAGES) & 1; };

    if (warpgroup == 0) {
        // ------------------------------- producer -------------------------------------
        setmaxnreg_dec<Tr::PRODUCER_REGS>();
        if (threadIdx.x == 0) {
            prefetch_tensor_map(tma_q);
            prefetch_tensor_map(tma_k);
            prefetch_tensor_map(tma_v);
            int t = blockIdx.x;  // (persistent) this block's first tile
            int k_base = 0;
            for (int n = 0; PERSISTENT || n == 0; ++n) {
                if (PERSISTENT && t >= n_tiles) {  // none left: tell the consumers
                    if (n > 0) mbarrier_wait(q_empty, (n - 1) & 1);  // (tile_slot is free)
                    tile_slot->number = -1;
                    mbarrier_arrive(q_full);
                    break;
                }
                const FwdTile tile = PERSISTENT ? tile_at(t) : one;
                const int n_iters = tile.n_blocks - tile.n_first;
                const Extent ext = extent_of(tile.b);
                // Batch element b's slice of each tensor map (strides in slices, see the
                // top), in 32 bits as the maps' coordinates are: few registers here.
                int slice_q = 0, slice_k = 0, slice_v = 0;
                unsigned rest = (unsigned)tile.b;
#pragma unroll
                for (int d = MAX_BATCH_DIMS - 1; d >= 0; --d) {
                    const unsigned size = (unsigned)p.batch_size[d];
                    const int i = (int)(rest % size);
                    rest /= size;
                    slice_q += i * (int)p.q_batch_stride[d];
                    slice_k += i * (int)p.k_batch_stride[d];
                    slice_v += i * (int)p.v_batch_stride[d];
                }
                // Key block of iteration it is j = n_blocks - 1 - it, in buffer
                // stage_of(k_base + it).
                auto load_kv = [&](const TmaDescriptor& map, unsigned tiles, unsigned full,
                                   unsigned empty, int it, int slice) {
                    const int kb = k_base + it;
                    mbarrier_wait(empty, pass_of(kb) ^ 1);  // the buffer was handed back
                    mbarrier_arrive_expect_tx(full, Tr::KV_TILE_BYTES);
                    // (rows past a packed sequence's Lk are the next sequence's: masked to P = 0,
                    // and V's zeroed by the consumers, PACKED)
                    const int n0 = (int)ext.k_row0 + (tile.n_blocks - 1 - it) * BLOCK_N;
#pragma unroll
                    for (int s = 0; s < SLABS; ++s)
                        tma_load_3d(tiles + stage_of(kb) * Tr::KV_TILE_BYTES + s * BLOCK_N * 128,
                                    map, full, s * Tr::SLAB, n0, slice);
                };
                auto load_k = [&](int it) {
                    const int st = stage_of(k_base + it);
                    load_kv(tma_k, sK, k_full(st), k_empty(st), it, slice_k);
                };
                auto load_v = [&](int it) {
                    const int st = stage_of(k_base + it);
                    load_kv(tma_v, sV, v_full(st), v_empty(st), it, slice_v);
                };
                // K_0 first: its buffer was handed back STAGES - 1 blocks ago, while Q's
                // waits for the consumers' last S of the tile before (q_empty); so a
                // persistent block's next K_0 is in flight while they finish that tile.
                if (n_iters > 0) load_k(0);
                if (n > 0) mbarrier_wait(q_empty, (n - 1) & 1);  // Q and tile_slot are free
                if (PERSISTENT) tile_slot->number = t;
                if (VARLEN) {
                    tile_slot->b = (int)tile.b;
                    tile_slot->m0 = (int)tile.m0;
                    tile_slot->n_first = tile.n_first;
                    tile_slot->n_blocks = tile.n_blocks;
                    tile_slot->Lq = (int)ext.Lq;
                    tile_slot->Lk = (int)ext.Lk;
                    tile_slot->q_row0 = (int)ext.q_row0;
                }
                // Q_i: (BLOCK_M, HEAD_DIM), one box of BLOCK_M rows x 64 columns per slab
                mbarrier_arrive_expect_tx(q_full, Tr::Q_TILE_BYTES);
#pragma unroll
                for (int s = 0; s < SLABS; ++s)
                    tma_load_3d(sQ + s * BLOCK_M * 128, tma_q, q_full, s * Tr::SLAB,
                                (int)(ext.q_row0 + tile.m0), slice_q);
                // Then K_it and V_{it-1}: the consumers need K_it for S before they need
                // V_{it-1} for P V.
                for (int it = 1; it <= n_iters; ++it) {
                    if (it < n_iters) load_k(it);
                    load_v(it - 1);
                }
                k_base += n_iters;
                if (PERSISTENT) {
                    // The next tile, drawn only now that this one's loads are all issued:
                    // drawn at its start, a block would hold a tile it cannot begin for a
                    // whole tile's time, and at the end of a causal grid blocks would idle
                    // while others still hold a tile besides a long one. (The atomic's
                    // latency hides behind the consumers, who are STAGES blocks behind.)
                    // All blocks together draw n_tiles times (each tile past the first
                    // gridDim.x once, and each block once more to find none left), so the
                    // draw of n_tiles - 1 is the last: it leaves the counter zero for the
                    // next launch on the stream (_cupy_backend.stream_counters).
                    const int drawn = atomicAdd(tile_counter, 1);
                    if (drawn == n_tiles - 1) atomicExch(tile_counter, 0);
                    t = drawn + gridDim.x;
                }
            }
        }
    } else {
        // ------------------------------- consumers ------------------------------------
        setmaxnreg_inc<Tr::CONSUMER_REGS>();
        // The variants of batch element b (built and read only with VARIANTS).
        const ScoreModifierIf<VARIANTS, T, float> mod(p, vp, one.b);
        constexpr int S_N_TILES = Tr::S_N_TILES, O_N_TILES = Tr::O_N_TILES;
        const int wg = warpgroup - 1;                // consumer index
        const int warp = (threadIdx.x / 32) % 4;     // warp inside the warpgroup
        const int lane = threadIdx.x % 32;
        const int g = lane / 4;  // this lane holds rows g and g + 8 of its warp's 16 rows
        const int t = lane % 4;  // and columns 2t, 2t + 1 of each n8 tile

        float acc[O_N_TILES][4];  // unnormalised O: (64, HEAD_DIM) over the warpgroup, fp32
        float s[S_N_TILES][4];                     // S, then P: (64, BLOCK_N), fp32
        unsigned p_frag[Tr::PV_K_STEPS][4];        // P rounded to T, the A operand of P V

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
        // The turns go round over all of the block's tiles; the last consumer opens the
        // first (consumer 0's), and consumer 0 takes the one it passes at the very end, so
        // that every named barrier ends with as many arrivals as waits.
        auto wait_turn = [&]() {
            named_barrier_sync(Tr::SCHED_BARRIER + wg, 256);
        };
        auto pass_turn = [&]() {
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

        if (wg == NUM_CONSUMERS - 1) named_barrier_arrive(Tr::SCHED_BARRIER, 256);
        int k_base = 0;  // number of this tile's first key block (see stage_of)
        for (int n = 0; PERSISTENT || n == 0; ++n) {
            mbarrier_wait(q_full, n & 1);  // Q of the tile, and (persistent) its number
            FwdTile tile = one;
            if constexpr (PERSISTENT) {
                const int tile_number = tile_slot->number;
                if (tile_number < 0) break;
                if constexpr (VARLEN) {
                    tile = FwdTile{tile_slot->b, tile_slot->m0, tile_slot->n_first,
                                   tile_slot->n_blocks};
                } else {
                    tile = tile_at(tile_number);
                }
            }
            const int n_iters = tile.n_blocks - tile.n_first;
            const long long wg_row0 = tile.m0 + Tr::WG_M * wg;  // this warpgroup's first row
            Extent ext;
            if constexpr (VARLEN) {  // (the producer's lookup: no pointers yet, see below)
                ext = Extent{tile_slot->Lq, tile_slot->Lk, tile_slot->q_row0, 0, nullptr, nullptr};
            } else {
                ext = extent_of(tile.b);
            }
            const long long diag = ext.Lk - ext.Lq;  // query i sees key j iff j <= i + diag

            // Packed sequences (PACKED): key block n_blocks - 1, the first visited, may
            // reach past the sequence's Lk into the next sequence's rows. Their scores are
            // set to -inf, but P = 0 times an Inf or NaN of V is NaN, so consumer 0 writes
            // zeros over those rows of the V buffer before it takes its turn to issue that
            // block's P V; the turns order the zeros before every other consumer's P V
            // (consumer 0 takes the first turn of each round). Whole 128-byte rows of each
            // slab: the swizzle moves 16-byte pieces only within a row. (Elsewhere the
            // maps end at Lk, and TMA fills the rows past it with zeros.)
            auto clear_v_past_end = [&](int st) {
                if constexpr (PACKED) {
                    const int valid = (int)(ext.Lk - (long long)(tile.n_blocks - 1) * BLOCK_N);
                    if (wg != 0 || valid >= BLOCK_N) return;
#pragma unroll
                    for (int s = 0; s < SLABS; ++s)
                        for (int i = valid * 8 + (int)threadIdx.x % 128; i < BLOCK_N * 8; i += 128)
                            st_shared_zero16(sV + st * Tr::KV_TILE_BYTES + s * BLOCK_N * 128 +
                                             i * 16);
                    fence_proxy_async_shared();  // (wgmma reads shared memory as the async proxy)
                }
            };

#pragma unroll
            for (int nt = 0; nt < O_N_TILES; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
            WgmmaSoftmax<S_N_TILES> softmax;

            // The softmax of the S just computed for key block j: scale, mask, update.
            auto softmax_step = [&](int it) {
                const long long n0 = (long long)(tile.n_blocks - 1 - it) * BLOCK_N;
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
                if constexpr (IS_LOCAL) {
                    // Keys outside the band or past Lk -> -inf, only in blocks that cross an
                    // edge of one of this thread's two rows. Row g of the warp sees the keys
                    // [band_lo, band_hi), row g + 8 those 8 further on, as far as [0, Lk)
                    // reaches: in 32 bits (tensor-map coordinates are), clamped to [-16, Lk],
                    // past either end of which a row sees no key either way.
                    // (key_end, a row-broadcast mask's prefix, cuts only the first block
                    // visited, the last one)
                    const int n0i = (int)n0;
                    const int lk = (int)(it == 0 && vp.key_end != nullptr
                                             ? min(ext.Lk, vp.key_end[tile.b]) : ext.Lk);
                    const long long row0 = wg_row0 + 16 * warp + g;
                    const int band_lo = (int)max(min(row0 + diag - vp.window_left, ext.Lk), -16LL);
                    const int band_hi =
                        (int)max(min(row0 + diag + vp.window_right + 1, ext.Lk), -16LL);
                    if (n0i < band_lo + 8 || n0i + BLOCK_N > min(band_hi, lk)) {
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            // Row g + 8 h sees the block's keys [first, visible): col is
                            // seen iff (unsigned)(col - first) < width, one compare a score
                            // (two spill the d = 64 kernel's three consumers: ptxas -v).
                            const int first = max(min(band_lo + 8 * h - n0i, BLOCK_N), 0);
                            const int visible =
                                max(min(min(band_hi + 8 * h, lk) - n0i, BLOCK_N), 0);
                            const unsigned width = (unsigned)max(visible - first, 0);
                            const int base = 2 * t - first;
#pragma unroll
                            for (int nt = 0; nt < S_N_TILES; ++nt)
#pragma unroll
                                for (int e = 2 * h; e < 2 * h + 2; ++e)
                                    if ((unsigned)(base + nt * 8 + (e & 1)) >= width)
                                        s[nt][e] = -INFINITY;
                        }
                    }
                    softmax.update(s, c);
                    return;
                }
                // Keys past Lk or above the causal diagonal -> -inf, only in blocks that
                // cross the Lk boundary or this warpgroup's diagonal; there row r sees the
                // block's first `visible` keys (query i sees key j iff j <= i + diag).
                if (n0 + BLOCK_N > ext.Lk || (IS_CAUSAL && n0 + BLOCK_N - 1 > wg_row0 + diag)) {
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        long long end = ext.Lk - n0;
                        if (IS_CAUSAL)
                            end = min(end, wg_row0 + 16 * warp + g + 8 * h + diag + 1 - n0);
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

            if (n_iters == 0) release(q_empty);  // (no key block: Q is not read)
            if (n_iters > 0) {
                // Iteration 0: S_0 alone.
                mbarrier_wait(k_full(stage_of(k_base)), pass_of(k_base));
                wait_turn();
                issue_qk(stage_of(k_base));
                pass_turn();
                wgmma_wait<0>();
                fence_operands(s);
                release(k_empty(stage_of(k_base)));
                if (n_iters == 1) release(q_empty);  // the tile's last read of Q is done
                softmax_step(0);
                pack_p();

                // Iterations 1..n_iters-1: S_it, and P V of the block before, in flight
                // together; the softmax of S_it runs while P V accumulates.
                for (int it = 1; it < n_iters; ++it) {
                    const int kb = k_base + it;
                    const int st = stage_of(kb), prev = stage_of(kb - 1);
                    // Both tiles are in before this warpgroup takes its turn, so that it
                    // never holds the tensor cores' turn while waiting for a load.
                    mbarrier_wait(k_full(st), pass_of(kb));
                    mbarrier_wait(v_full(prev), pass_of(kb - 1));
                    if (it == 1) clear_v_past_end(prev);
                    wait_turn();
                    issue_qk(st);
                    softmax.rescale_acc(acc);  // owed by the previous softmax; acc is idle now
                    issue_pv(prev);
                    pass_turn();
                    wgmma_wait<1>();  // S_it is done (groups complete in order); P V may not be
                    fence_operands(s);
                    release(k_empty(st));
                    if (it == n_iters - 1) release(q_empty);
                    softmax_step(it);
                    wgmma_wait<0>();  // P V is done: p_frag and the V buffer are free again
                    fence_operands(acc);
                    release(v_empty(prev));
                    pack_p();
                }

                // The last P V.
                const int last = stage_of(k_base + n_iters - 1);
                softmax.rescale_acc(acc);
                mbarrier_wait(v_full(last), pass_of(k_base + n_iters - 1));
                if (n_iters == 1) clear_v_past_end(last);
                wait_turn();
                issue_pv(last);
                pass_turn();
                wgmma_wait<0>();
                fence_operands(acc);
                release(v_empty(last));  // (read by no one before the block ends otherwise)
            }
            k_base += n_iters;
            if (IS_LOCAL && tile.n_blocks < 0) continue;  // not this kernel's (plain_tile)

            // O = acc / l_i; lse = (m_i + log2 l_i) * ln 2. A row with l_i = 0 saw no key:
            // zeros and lse = -inf.
            // (the pointers only now: they are not held through the key loop)
            Extent out = ext;
            if constexpr (VARLEN) {  // lse: FlashAttention's (H, total_q), as sequence_params
                const long long heads =
                    p.batch_size[MAX_BATCH_DIMS - 2] * p.batch_size[MAX_BATCH_DIMS - 1];
                const long long total_q = vp.cu_seqlens_q[p.batch_size[MAX_BATCH_DIMS - 3]];
                out.o = static_cast<T*>(p.o) + batch_offsets(p, tile.b).o +
                        ext.q_row0 * p.o_row_stride;
                out.lse = static_cast<float*>(p.lse) + (tile.b % heads) * total_q + ext.q_row0;
            } else {
                out = extent_of(tile.b);
            }
            T* const o = out.o;
            float* const lse = out.lse;
            const int o_chunks = (int)((p.Dv + 7) / 8);  // 8-column chunks of o to write
            float inv_l[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float l = quad_sum(softmax.l_i[h]);
                inv_l[h] = safe_inverse(l);
                // lse = ln 2 * m_i + ln l_i (m_i is in log2 units): one FMA, an accurate log.
                const long long row = wg_row0 + 16 * warp + g + 8 * h;
                if (t == 0 && row < out.Lq)
                    lse[row] = l == 0.f ? -INFINITY : fmaf(softmax.m_i[h], LN2, logf(l));
            }
            if constexpr (PERSISTENT) {
                // Straight from the accumulators: 4 bytes a lane, the 4 lanes of a row
                // writing 16 contiguous bytes. (sQ, where the others stage O, already
                // holds the next tile's Q.)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const long long row = wg_row0 + 16 * warp + g + 8 * h;
                    if (row < out.Lq) {
#pragma unroll
                        for (int nt = 0; nt < O_N_TILES; ++nt)
                            if (nt < o_chunks)
                                *reinterpret_cast<unsigned*>(o + row * p.o_row_stride + nt * 8 + 2 * t) =
                                    pack2<T>(acc[nt][2 * h] * inv_l[h], acc[nt][2 * h + 1] * inv_l[h]);
                    }
                }
            } else {
                // Staged in this warpgroup's own rows of sQ (same swizzled layout), then each
                // warp writes its 16 rows with 16-byte stores.
                named_barrier_sync(Tr::EPILOGUE_BARRIER + wg, 128);  // its wgmmas have read sQ
                T* const sO = reinterpret_cast<T*>(smem_ptr + Tr::SMEM_Q);
                auto staged = [&](int r, int chunk) {  // element offset of (row r of the block, chunk)
                    return (chunk / 8) * BLOCK_M * 64 + r * 64 + ((chunk % 8) ^ (r % 8)) * 8;
                };
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int r = Tr::WG_M * wg + 16 * warp + g + 8 * h;  // row inside the block
#pragma unroll
                    for (int nt = 0; nt < O_N_TILES; ++nt)
                        *reinterpret_cast<unsigned*>(sO + staged(r, nt) + 2 * t) =
                            pack2<T>(acc[nt][2 * h] * inv_l[h], acc[nt][2 * h + 1] * inv_l[h]);
                }
                __syncwarp();  // the warp's rows are staged before its lanes read them back

                constexpr int CHUNKS = HEAD_DIM / 8;  // 16-byte chunks per row
                for (int idx = lane; idx < 16 * CHUNKS; idx += 32) {
                    const int r = Tr::WG_M * wg + 16 * warp + idx / CHUNKS;
                    const int chunk = idx % CHUNKS;
                    if (tile.m0 + r < out.Lq && chunk < o_chunks)
                        *reinterpret_cast<uint4*>(o + (tile.m0 + r) * p.o_row_stride + chunk * 8) =
                            *reinterpret_cast<const uint4*>(sO + staged(r, chunk));
                }
            }
        }
        if (wg == 0) wait_turn();  // the turn the last consumer passed after its last P V
    }
}

// PERSISTENT (see above): launched with at most one block per SM and at most as many
// blocks as tiles, with *tile_counter = 0. Otherwise one block per tile, as the variants
// kernels, and tile_counter is not read.
template <typename T, int HEAD_DIM, int BLOCK_N, int NUM_CONSUMERS, int STAGES, bool IS_CAUSAL,
          bool PERSISTENT>
__global__ void __launch_bounds__(128 * (NUM_CONSUMERS + 1), 1)
flash_fwd_wgmma(const AttentionParams p, const __grid_constant__ TmaDescriptor tma_q,
                const __grid_constant__ TmaDescriptor tma_k,
                const __grid_constant__ TmaDescriptor tma_v, int* tile_counter) {
    flash_fwd_wgmma_body<T, HEAD_DIM, BLOCK_N, NUM_CONSUMERS, STAGES, IS_CAUSAL, false, false,
                         PERSISTENT>(p, VariantParams{}, tma_q, tma_k, tma_v, /*q_row0=*/0,
                                     /*k_row0=*/0, tile_counter);
}

// Sliding-window (local) attention and padding masks, with no other variant: the plain
// kernel, its tiles and its persistence, visiting only the key blocks of the band
// [i + diag - left, i + diag + right] (vp.window_left, vp.window_right, UNBOUNDED for an
// open side; causal folded in as right <= 0) and masking only the blocks that cross its
// edges. With a row-broadcast mask (vp.key_end) each batch element's keys end where its
// mask's kept prefix ends; elements whose mask has holes are left to the variants kernel
// launched after this one (vp.prefix_masks_done, see plain_tile). The rest of vp is not
// read. (The variants kernel's score modifier costs registers: at d = 64 it needs 64-key
// blocks, and a 1k window at s = 16k ran ~1.3x slower there than here.)
template <typename T, int HEAD_DIM, int BLOCK_N, int NUM_CONSUMERS, int STAGES, bool PERSISTENT>
__global__ void __launch_bounds__(128 * (NUM_CONSUMERS + 1), 1)
flash_fwd_wgmma_local(const AttentionParams p, const VariantParams vp,
                      const __grid_constant__ TmaDescriptor tma_q,
                      const __grid_constant__ TmaDescriptor tma_k,
                      const __grid_constant__ TmaDescriptor tma_v, int* tile_counter) {
    flash_fwd_wgmma_body<T, HEAD_DIM, BLOCK_N, NUM_CONSUMERS, STAGES, false, true, false,
                         PERSISTENT>(p, vp, tma_q, tma_k, tma_v, /*q_row0=*/0, /*k_row0=*/0,
                                     tile_counter);
}

template <typename T, int HEAD_DIM, int BLOCK_N, int NUM_CONSUMERS, int STAGES>
__global__ void __launch_bounds__(128 * (NUM_CONSUMERS + 1), 1)
flash_fwd_wgmma_variants(const AttentionParams p, const VariantParams vp,
                         const __grid_constant__ TmaDescriptor tma_q,
                         const __grid_constant__ TmaDescriptor tma_k,
                         const __grid_constant__ TmaDescriptor tma_v) {
    flash_fwd_wgmma_body<T, HEAD_DIM, BLOCK_N, NUM_CONSUMERS, STAGES, false, false, true, false>(
        p, vp, tma_q, tma_k, tma_v, /*q_row0=*/0, /*k_row0=*/0, nullptr);
}

// Packed sequences (attention_varlen): each tile attends the sequence of its batch
// element (sequence_params, attention_variants.cuh), reading q, k and v through (D, total
// rows, heads) maps from the sequence's first rows on. The plain body, with its own tiles
// (those of flash_fwd_wgmma): the sequence's lengths make its Lk boundary, and IS_CAUSAL
// its causal mask aligned to the bottom-right corner as FlashAttention's varlen, so no
// score modifier is needed (the variants kernel's d = 64 tile has 64-key blocks, which cost
// varlen 1.2-1.3x at d = 64). Rows past the sequence's end are the next sequence's, not
// zeros: keys there are past its Lk (P = 0 exactly, and the body writes zeros over their V
// rows, which might hold Inf or NaN, before P V reads them: PACKED), queries there are
// never stored.
//
// PERSISTENT: one block per SM at most, drawing tiles from *tile_counter (zero at launch)
// as flash_fwd_wgmma does, the n_seqs sequences that have queries in the host's order,
// heaviest first (`tiles`, _cupy_backend.varlen_tiles): the longest sequences start first
// and the short ones fill the gaps at the end, whatever the order they are packed in;
// each (sequence, head) is one batch element of the dense kernel, its query blocks taken
// one after another, so that the blocks running at one time share its K and V in L2.
// Otherwise one block per (query block, batch element) of the longest sequence's grid;
// tiles, n_seqs and tile_counter are not read.
template <typename T, int HEAD_DIM, int BLOCK_N, int NUM_CONSUMERS, int STAGES, bool IS_CAUSAL,
          bool PERSISTENT>
__global__ void __launch_bounds__(128 * (NUM_CONSUMERS + 1), 1)
flash_fwd_wgmma_varlen(const AttentionParams p, const VariantParams vp,
                       const __grid_constant__ TmaDescriptor tma_q,
                       const __grid_constant__ TmaDescriptor tma_k,
                       const __grid_constant__ TmaDescriptor tma_v, const int* tiles,
                       int n_seqs, int* tile_counter) {
    if constexpr (PERSISTENT) {
        flash_fwd_wgmma_body<T, HEAD_DIM, BLOCK_N, NUM_CONSUMERS, STAGES, IS_CAUSAL, false, false,
                             true, true>(p, vp, tma_q, tma_k, tma_v, /*q_row0=*/0, /*k_row0=*/0,
                                         tile_counter, tiles, n_seqs);
    } else {
        const long long b = (long long)blockIdx.z * gridDim.y + blockIdx.y;  // (sequence, head)
        if (b >= p.n_batch) return;
        long long q_row0, k_row0;
        const AttentionParams ps = sequence_params<T, float>(p, vp, b, q_row0, k_row0);
        flash_fwd_wgmma_body<T, HEAD_DIM, BLOCK_N, NUM_CONSUMERS, STAGES, IS_CAUSAL, false, false,
                             false, false, /*PACKED=*/true>(ps, vp, tma_q, tma_k, tma_v, q_row0,
                                                            k_row0, nullptr);
    }
}

}  // namespace cupyflash
