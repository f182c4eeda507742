// Split-KV decoding ("flash-decoding"): a few new queries against a long KV cache.
//
// Decoding reads every key and value of the cache once and does ~M multiply-adds per
// element read (M = G * Lq query rows share a key/value head: G = H / Hk grouped-query
// heads times Lq new tokens, usually 1..8), so it is bound by memory bandwidth, not by
// arithmetic. The design keeps the bytes moving:
//
//   grid:  one thread block per work unit (batch b, kv head hk, split s, row chunk rc),
//          or (one-row kernel, batch 32-64) one block per SM taking several units in turn
//   block: NUM_WARPS = 4 independent warps; the block's keys [k0, k1) go in tiles of
//          BLOCK_N keys, WARP_KEYS consecutive keys per warp
//   warp:  LANES_PER_KEY lanes share a key, each lane owning VECS_PER_LANE 16-byte vectors
//          of its K row and of its V row (the same columns in every key), so
//
//     S[r, t]   = sum over the key's lanes of q[r, lane's columns] . K[t, lane's columns]
//                                                  (an xor butterfly: every lane holds it)
//     m_new     = max(m_i, max_t S[:, t]);  P~ = exp2(S - m_new);  alpha = exp2(m_i - m_new)
//                 (m_i per key group: the lanes of the keys kg, kg + KEYS_PER_PASS, ...;
//                  the groups are rescaled to the warp's max once, after the last tile)
//     l_i       = alpha * l_i + rowsum(P~);  acc = alpha * acc + P~ V[t, lane's columns]
//
//          and a lane multiplies exactly the V vectors it copied with the P~ of the key it
//          scored: no shared-memory exchange of P~, no barrier inside the loop.
//   copies: every lane copies its own vectors global -> shared with 16-byte cp.async,
//          STAGES tiles deep (one commit group per tile), and later reads back only what
//          it copied itself, so cp.async.wait_group alone orders copy and use. The loads
//          are 128-bit (LDGSTS.E.BYPASS.128 in the SASS) and coalesced: the LANES_PER_KEY
//          lanes of a key read its row contiguously. The one-row kernel (two passes, 4
//          warps) instead has 4 producer warps that issue the same copies into the same
//          slots, in step, and hand each tile over on an mbarrier (DecodeTraits::PRODUCER),
//          so that its math never delays a refill.
//   end:   each warp holds (m_i, l_i, acc) of its keys; the warps merge through shared
//          memory, and the block writes either the final out (input dtype) and lse when
//          there is one split, or its split's normalised partial out and lse in the
//          accumulator type; the last split block of a kv head to finish merges the splits
//          exactly through the lse (combine_splits; flash_decode_combine is the same merge
//          as a second launch, for comparison).
//
// fp16/bf16 with several query rows per kv head go to flash_decode_mma (below), which
// does the same on tensor cores; this SIMT kernel keeps one row (where it reads at the
// copy's bandwidth), fp32, fp64 and HEAD_DIM = 256.
//
// Bytes in flight: a tile is STAGE_VECS 16-byte vectors per lane (K and V); a warp refills
// a stage before it waits for the oldest, so STAGES tiles are in flight while it waits and
// STAGES - 1 (INFLIGHT_BYTES: 24-48 KiB per block of 4 warps) while it computes; the
// two-pass row's producer warps keep IN_FLIGHT = 3 tiles (48 KiB) in flight throughout
// (without them, REFILL_AFTER_WAIT: STAGES - 1 = 3). _cupy_decode.choose_num_splits asks for
// enough blocks that every multiprocessor holds at least 24 KiB of INFLIGHT_BYTES (about
// what an H100's 3.35 TB/s times ~1 us of loaded latency needs per SM).
//
// Scores of float, half and bfloat16 are kept in log2 units (q is multiplied by
// scale * log2(e) on its way into registers) so that the softmax uses exp2f; doubles use
// scale and exp. Accumulation is in float (double for double): exact FMA, no TF32.
//
// Layout (strides in elements, any sign): q (B, Lq, H, D); the cache (B, max_len, Hk, D),
// or paged (num_pages, page_size, Hk, D) with block_table (B, max_pages): key t of batch
// element b is at page block_table[b, t / page_size], position t % page_size. Query row
// r of a block is (i, g) = (r / G, r % G): token i of q, head hk * G + g.
//
// Caches whose rows are not 16-byte aligned vectors (an odd head dim, a strided last
// dimension) are read element by element through registers (vectorized = 0): the same
// kernel, slower copies, no copy of the cache.
#pragma once

#include "attention_common.cuh"

namespace cupyflash {

// Arguments of flash_decode, passed by value; every field is 8 bytes wide (see
// _cupy_decode.DECODE_PARAMS).
struct DecodeParams {
    const void* q;              // (B, Lq, H, D)
    const void* k;              // (B, max_len, Hk, D) or (num_pages, page_size, Hk, D)
    const void* v;              // (B, max_len, Hk, Dv) or (num_pages, page_size, Hk, Dv)
    const int* cache_seqlens;   // (B,): keys in the cache before the append
    const int* block_table;     // (B, max_pages) when paged, else unused
    void* out;                  // (B, Lq, H, Dv) T, written when num_splits == 1
    void* lse;                  // (B, H, Lq) Acc, contiguous, written when num_splits == 1
    void* out_partial;          // (B, Hk, num_splits, M, partial_row) Acc, num_splits > 1
    void* lse_partial;          // (B, Hk, num_splits, M) Acc, num_splits > 1
    int* split_counters;        // (B, Hk, row_chunks), zeros: the splits that have finished;
                                // null: flash_decode_combine merges the splits instead
    long long q_batch_stride, q_token_stride, q_head_stride, q_dim_stride;
    long long k_page_stride, k_token_stride, k_head_stride, k_dim_stride;
    long long v_page_stride, v_token_stride, v_head_stride, v_dim_stride;
    long long out_batch_stride, out_token_stride, out_head_stride;
    long long table_stride;     // block_table's row stride
    long long B, Lq, H, Hk, G, M;  // M = G * Lq query rows per kv head
    long long D, Dv;
    long long L_new;            // keys appended: batch element b attends cache_seqlens[b] + L_new
    long long page_size;        // tokens per page; 0 for a contiguous cache
    long long page_size_mul, page_size_shift;  // t / page_size = umulhi(t, mul) >> shift
    long long num_splits, row_chunks;
    long long partial_row;      // >= Dv, a multiple of 16 bytes: partial rows are vectors
    long long causal;           // bottom-right aligned: row i sees key t iff t <= i + n_b - Lq
    long long k_vectorized, v_vectorized;  // 1: rows are 16-byte aligned, last dim contiguous
    long long units;            // B * Hk * num_splits * row_chunks: the split kernel's work
                                // units; as many blocks, or (one-row flash_decode) fewer
    long long uniform_keys;     // n_b when the host knows that every batch element attends
                                // the same number of keys (then no kernel reads
                                // cache_seqlens for it), else -1
    long long prefetch_keys;    // flash_decode_cluster, uniform_keys >= 0: the keys of its
                                // split a block prefetches to L2 before its PDL wait; 0: none
    double scale, scale_log2;
};

// Arguments of flash_decode_combine.
struct DecodeCombineParams {
    const void* out_partial;    // (B, Hk, num_splits, M, partial_row) Acc
    const void* lse_partial;    // (B, Hk, num_splits, M) Acc
    void* out;                  // (B, Lq, H, Dv) T
    void* lse;                  // (B, H, Lq) Acc, contiguous
    long long out_batch_stride, out_token_stride, out_head_stride;
    long long B, Lq, H, Hk, G, M, Dv;
    long long num_splits, partial_row;
};

// Arguments of decode_append: k_new[b, j] -> cache position cache_seqlens[b] + j.
struct DecodeAppendParams {
    void* k_cache;
    void* v_cache;
    const void* k_new;          // (B, L_new, Hk, D)
    const void* v_new;          // (B, L_new, Hk, Dv)
    const int* cache_seqlens;
    const int* block_table;
    long long k_page_stride, k_token_stride, k_head_stride, k_dim_stride;
    long long v_page_stride, v_token_stride, v_head_stride, v_dim_stride;
    long long kn_batch_stride, kn_token_stride, kn_head_stride, kn_dim_stride;
    long long vn_batch_stride, vn_token_stride, vn_head_stride, vn_dim_stride;
    long long table_stride;
    long long B, L_new, Hk, D, Dv;
    long long page_size;        // 0 for a contiguous cache
};

// ----------------------------------------------------------------------------------------
// Element types: the accumulator, conversions and the softmax's exp in that precision.
// ----------------------------------------------------------------------------------------
template <typename T> struct DecodeMath {        // float, __half, __nv_bfloat16
    using Acc = float;
    static __device__ __forceinline__ float to_acc(T x) { return static_cast<float>(x); }
    static __device__ __forceinline__ T from_acc(float x) { return static_cast<T>(x); }
    static __device__ __forceinline__ float q_scale(const DecodeParams& p) {
        return static_cast<float>(p.scale_log2);  // exp(s * scale) = exp2(s * scale_log2)
    }
    static __device__ __forceinline__ float exp(float x) { return exp2f(x); }
    // lse (natural log) from a log2-unit max and a sum: m * ln(2) + log(l)
    static __device__ __forceinline__ float lse(float m_safe, float l) {
        return m_safe * LN2 + logf(l);
    }
    static __device__ __forceinline__ float exp_natural(float x) { return expf(x); }
    static __device__ __forceinline__ float log_natural(float x) { return logf(x); }
    // 1 / l, correctly rounded (as 1.0f / l) without the division's slow-path call, whose
    // calling convention would cost the kernel spilled registers; 0 for a row with no key
    static __device__ __forceinline__ float inverse(float l) { return l == 0.0f ? 0.0f : __frcp_rn(l); }
};

template <> struct DecodeMath<double> {
    using Acc = double;
    static __device__ __forceinline__ double to_acc(double x) { return x; }
    static __device__ __forceinline__ double from_acc(double x) { return x; }
    static __device__ __forceinline__ double q_scale(const DecodeParams& p) { return p.scale; }
    static __device__ __forceinline__ double exp(double x) { return ::exp(x); }
    static __device__ __forceinline__ double lse(double m_safe, double l) { return m_safe + ::log(l); }
    static __device__ __forceinline__ double exp_natural(double x) { return ::exp(x); }
    static __device__ __forceinline__ double log_natural(double x) { return ::log(x); }
    static __device__ __forceinline__ double inverse(double l) { return l == 0.0 ? 0.0 : __drcp_rn(l); }
};

// ----------------------------------------------------------------------------------------
// The shape of a block, per element type, padded head dim and query rows per block.
// _cupy_decode.decode_config repeats BLOCK_N, NUM_THREADS, SMEM_BYTES and the bytes in
// flight; tests/test_kernel_compile.py checks that the two agree.
// ----------------------------------------------------------------------------------------
// The kernels' pipelines start at a 128-byte boundary of their dynamic shared memory,
// which follows their static variables and so is only 16-byte aligned: then a warp's
// 16-byte copies and reads fill whole 128-byte lines. Unaligned, every 8-lane phase of a
// copy or read spanned two lines: twice the shared-memory wavefronts and twice the L2
// sector requests (ncu on an H100, benchmarks/NOTES.md session 11: batch 64 read at
// 2.85 TB/s, 3.05 aligned). SMEM_BYTES holds the slack.
constexpr int DECODE_PIPE_ALIGN = 128;

// WARPS: 4, or 8 for the one-row 16-bit kernel whose blocks take several units each
// (_cupy_decode.MANY_UNITS_WARPS), with 2 stages instead of 3: the same bytes in flight
// per block while it computes, twice the warps to issue them. Measured on an H100
// (benchmarks/NOTES.md, session 18): 0.1-0.6% faster at batch 32-64 (one block per SM,
// ~4 units each); at batch 1 and 16 (one unit a block) 0.5-0.7% slower, so not there.
// Since session 25 the 4-warp kernel with producer warps is faster at batch 32-64 too
// (0.4-0.8%), and the launcher asks for 8 warps only when told to.
template <typename T, int HEAD_DIM, int ROWS, int WARPS = 4, int PRODUCERS = 0,
          int PRODUCER_STAGES = 4>
struct DecodeTraits {
    using Acc = typename DecodeMath<T>::Acc;
    static constexpr int BLOCK_ROWS = ROWS;          // query rows per block
    static constexpr int NUM_WARPS = WARPS;          // the warps that compute
    static constexpr int CONSUMER_THREADS = 32 * NUM_WARPS;
    // PRODUCERS > 0 (the two-pass row, 4 warps): that many more warps issue every copy of
    // the block and nothing else, so that a tile's refill waits for the oldest tile in
    // flight to land, never for the math (see COPIED_WARPS below).
    static constexpr bool PRODUCER = PRODUCERS > 0;
    static constexpr int NUM_THREADS = 32 * (NUM_WARPS + PRODUCERS);
    static constexpr int VEC = 16 / int(sizeof(T));                  // elements per 16 bytes
    static constexpr int D_VECS = HEAD_DIM / VEC;                    // vectors per padded row
    // A lane owns VECS_PER_LANE vectors of each K and V row (the same columns in every key):
    // two while its ROWS rows of q and acc fit in registers that way (ROWS <= 4), which
    // saves butterfly stages and address arithmetic per key against one vector (SASS of the
    // loop's common path at ROWS = 4, fp16, d = 128: ~560 -> ~480 instructions per warp and
    // 2 KiB tile, where HBM gives an SM ~640 issue slots per 2 KiB; 188 registers instead of
    // ~150, 2 blocks per SM instead of 3, both above the 48 KiB in flight wanted); one for
    // ROWS = 8; more for rows wider than 32 vectors.
    static constexpr int MIN_VECS = ROWS <= 4 ? 2 : 1;
    static constexpr int VECS_PER_LANE = D_VECS / 32 > MIN_VECS ? D_VECS / 32
                                         : (D_VECS < MIN_VECS ? D_VECS : MIN_VECS);
    static constexpr int LANES_PER_KEY = D_VECS / VECS_PER_LANE;     // lanes sharing a key
    static constexpr int KEYS_PER_PASS = 32 / LANES_PER_KEY;         // keys a warp scores at once
    // Passes per tile: two K and two V vectors per lane and tile (four each for float64 at
    // HEAD_DIM = 256), 2 KiB per warp; with one row and two vectors a lane, two passes (4
    // KiB), whose keys' dependency chains (dot product, butterfly, max, exp) interleave.
    // Measured on an H100 (benchmarks/NOTES.md, session 9): batch 4 went from 0.82-0.89x
    // to 0.92-0.93x cuDNN; batch 1, 16 and 64 stayed where they were (at 64, ~4 blocks
    // per SM, the chain was not what held the copies back).
    static constexpr bool TWO_PASS_ROW = ROWS == 1 && VECS_PER_LANE == 2;
    static constexpr int PASSES = VECS_PER_LANE >= 2 ? (TWO_PASS_ROW ? 2 : 1) : 2;
    static constexpr int ELEMS = VECS_PER_LANE * VEC;                // q and acc columns per lane
    static constexpr int WARP_KEYS = PASSES * KEYS_PER_PASS;         // keys per warp per tile
    static constexpr int BLOCK_N = NUM_WARPS * WARP_KEYS;            // keys per block per tile
    // REFILL_AFTER_WAIT (the two-pass row, 4 warps, no producer warps): a thread waits for
    // tile j first and then refills the slot it read in the iteration before, so that
    // STAGES - 1 tiles are in flight at every point of its loop, the math included;
    // otherwise it refills that slot before the wait (STAGES in flight while it waits,
    // STAGES - 1 while it computes). With 4 slots that is 3 tiles (48 KiB a block) always:
    // the read rate of a block per SM falls both with more bytes in flight and with math
    // between a tile's arrival and the next refill (benchmarks/NOTES.md, session 24).
    static constexpr bool REFILL_AFTER_WAIT = TWO_PASS_ROW && WARPS == 4 && !PRODUCER;
    // PRODUCER: producer warp p copies the tiles of the compute warps p * COPIED_WARPS ..
    // (p + 1) * COPIED_WARPS - 1 into the slots those warps would have filled themselves
    // (so every lane still scores the same keys: the same results to the bit). The
    // producers keep IN_FLIGHT tiles (48 KiB) in flight: once every producer lane's copies
    // of the oldest have landed (its slot's "full" mbarrier), they start the next tile, into
    // a slot the compute warps have handed back ("empty"); the compute warps wait on
    // "full", and STAGES - IN_FLIGHT slots hold tiles that have landed and wait for the
    // math. So the math is never between a tile's arrival and the next refill. Measured on
    // an H100 (benchmarks/NOTES.md, session 25, paired at 4 places, bf16): 16 x 32k
    // 686.4 us against 691.4 without producer warps, 16 x 128k 2744 against 2765; one
    // producer warp for all four issued too slowly (689.5 against 684.0), and a ring per
    // producer and compute warp, not in step, read slower (685.5 against 681.9).
    static constexpr int COPIED_WARPS = PRODUCER ? NUM_WARPS / PRODUCERS : 1;
    static constexpr int IN_FLIGHT = 3;
    static constexpr int STAGES = PRODUCER ? PRODUCER_STAGES
                                  : TWO_PASS_ROW && WARPS == 8 ? 2 : 4;  // tiles in the pipeline
    static constexpr int KV_VECS = PASSES * VECS_PER_LANE;           // K (or V) vectors per lane
    static constexpr int STAGE_VECS = 2 * KV_VECS;                   // K, then V
    static constexpr int PIPE_BYTES = STAGES * STAGE_VECS * CONSUMER_THREADS * 16;
    static constexpr int INFLIGHT_BYTES =
        (PRODUCER ? IN_FLIGHT : STAGES - 1) * STAGE_VECS * CONSUMER_THREADS * 16;
    // Blocks per SM that ptxas must allow (it sizes registers to fit them). Two keep 2 x 24
    // KiB in flight (choose_num_splits counts on 24 KiB), and let ROWS = 8 use ~240 registers
    // (without a minimum ptxas aimed at 16 blocks per SM, 32 registers, and spilled). One
    // row with a 32 KiB pipeline asks for six: 80 registers or fewer, as the first H100
    // run's kernel had (80: 6 blocks per SM, 1.00 of the copy at batch 64); the fused
    // merge had taken it to 93 (5 blocks per SM) and batch 16-64 ran 8-10% slower.
    // The two-pass row refilling after its wait (64 KiB, 4 stages of 4 warps) asks for
    // three, what its shared memory allows on an H100; with producer warps (8 warps), two
    // (three gave ~80 registers and spills on sm_80; one block per SM is what runs).
    static constexpr int MIN_BLOCKS = ROWS == 1 && PIPE_BYTES <= 32 * 1024 ? 6
                                      : ROWS == 1 && PIPE_BYTES <= 48 * 1024 ? 4
                                      : REFILL_AFTER_WAIT ? 3
                                      : 2;
    // The warps' merge: acc (NUM_WARPS, ROWS, HEAD_DIM), then m and l (NUM_WARPS, ROWS), in
    // the pipeline's memory; the splits' merge (decode::combine_splits) needs less.
    static constexpr int MERGE_ACC = NUM_WARPS * ROWS * HEAD_DIM;
    static constexpr int MERGE_BYTES = (MERGE_ACC + 2 * NUM_WARPS * ROWS) * int(sizeof(Acc));
    static constexpr int SMEM_BYTES =
        (PIPE_BYTES > MERGE_BYTES ? PIPE_BYTES : MERGE_BYTES) + DECODE_PIPE_ALIGN;

    static_assert(HEAD_DIM == 32 || HEAD_DIM == 64 || HEAD_DIM == 128 || HEAD_DIM == 256,
                  "HEAD_DIM must be 32, 64, 128 or 256");
    static_assert(ROWS == 1 || ROWS == 4 || ROWS == 8, "ROWS must be 1, 4 or 8");
    static_assert(WARPS == 4 || (WARPS == 8 && TWO_PASS_ROW && sizeof(T) == 2),
                  "8 warps: the one-row 16-bit kernel only");
    static_assert(!PRODUCER || (TWO_PASS_ROW && WARPS == 4 && NUM_WARPS % PRODUCERS == 0
                                && PRODUCER_STAGES > IN_FLIGHT),
                  "producer warps: the two-pass row with 4 warps, more slots than in flight");
    static_assert(D_VECS % VECS_PER_LANE == 0 && LANES_PER_KEY <= 32 && 32 % LANES_PER_KEY == 0,
                  "lanes split a row");
    static_assert(SMEM_BYTES <= 99 * 1024, "must fit the smallest opt-in shared memory (sm_86)");
};

namespace decode {

// The first DECODE_PIPE_ALIGN-byte boundary of the dynamic shared memory (a shared address).
__device__ __forceinline__ unsigned aligned_pipe(const unsigned char* smem_raw) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem_raw));
    return (a + DECODE_PIPE_ALIGN - 1) & ~static_cast<unsigned>(DECODE_PIPE_ALIGN - 1);
}

// 16 bytes of T: one vector.
template <typename T>
struct alignas(16) Vec16 {
    T v[16 / sizeof(T)];
};

// Shared memory is addressed by 32-bit shared-window addresses in the pipeline (a
// generic 64-bit pointer kept for the slow path's stores was spilled by ptxas).

// 16-byte asynchronous copy global -> shared of the first `src_bytes` bytes (0..16); the
// rest of the 16 bytes is zero-filled, and with src_bytes = 0 nothing is read. L2::256B:
// a miss brings the 256 aligned bytes around the vector from DRAM in one request (a key
// row of d = 128 in 16-bit types, which the warp reads whole at once anyway; TMA's
// L2_PROMOTION_256B does the same for the forward kernel's tiles), fewer, larger DRAM
// requests for the same bytes.
__device__ __forceinline__ void cp_async_16(unsigned smem_dst, const void* gmem_src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n"
                 :: "r"(smem_dst), "l"(gmem_src), "r"(src_bytes) : "memory");
}

// Programmatic dependent launch (PDL, sm_90; _launch.launch): a grid launched with it
// may be scheduled while the grid before it in the stream still runs, so its launch and
// block scheduling (~3 us between two decode calls at batch 1, session 12) overlap that
// grid's work instead of following it. Every decode kernel, at its start:
//   - wait_for_previous_grid: returns once the grid before it has completed and its
//     writes are visible (at once when launched without PDL); no global memory is
//     touched before it, so the overlap is safe whatever that grid wrote;
//   - allow_next_grid: once every block of this grid has passed here, the next grid
//     (if launched with PDL) may be scheduled; its blocks then wait, resident, in
//     their own wait_for_previous_grid for this grid to complete.
//     (flash_decode_cluster, when it prefetches, allows it only near its end instead.)
// On sm_80 both compile to nothing, and the launcher asks for PDL only on sm_90.
__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Which (b, hk, split, row chunk) a split block is, the row chunk fastest (blocks that
// read the same keys for other rows run side by side and share them through L2). 32-bit:
// the launcher keeps every count below 2^31 (a 64-bit division is a call). blockIdx is
// read by a volatile instruction so that a kernel can compute this again after its main
// loop instead of holding it in registers through it.
struct BlockCoords {
    long long b;
    int hk, split, rc;
};

__device__ __forceinline__ BlockCoords block_coords(const DecodeParams& p, unsigned id) {
    BlockCoords c;
    c.rc = static_cast<int>(id % static_cast<unsigned>(p.row_chunks));
    id /= static_cast<unsigned>(p.row_chunks);
    c.split = static_cast<int>(id % static_cast<unsigned>(p.num_splits));
    id /= static_cast<unsigned>(p.num_splits);
    c.hk = static_cast<int>(id % static_cast<unsigned>(p.Hk));
    c.b = id / static_cast<unsigned>(p.Hk);
    return c;
}

__device__ __forceinline__ BlockCoords block_coords(const DecodeParams& p) {
    unsigned id;
    asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(id));
    return block_coords(p, id);
}

// n_b = cache_seqlens[b] + L_new, the keys batch element b attends (32-bit: the launcher
// keeps cache positions below 2^30); from the host's validated lengths when they are all
// equal, so that a block's first copies need not wait for a load.
__device__ __forceinline__ int keys_attended(const DecodeParams& p, long long b) {
    return p.uniform_keys >= 0 ? static_cast<int>(p.uniform_keys)
                               : p.cache_seqlens[b] + static_cast<int>(p.L_new);
}

// A compile-time bool passed as a value (the kernels' main loops are generic lambdas
// instantiated for the common case and for the general one).
template <bool B> struct BoolC { static constexpr bool value = B; };

// One 16-byte shared load (LDS.128).
template <typename T>
__device__ __forceinline__ Vec16<T> lds_vec16(unsigned addr) {
    Vec16<T> x;
    unsigned* w = reinterpret_cast<unsigned*>(&x);
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "r"(addr) : "memory");
    return x;
}

// One element store to shared memory.
__device__ __forceinline__ void sts(unsigned addr, __half x) {
    asm volatile("st.shared.b16 [%0], %1;\n" :: "r"(addr), "h"(__half_as_ushort(x)) : "memory");
}
__device__ __forceinline__ void sts(unsigned addr, __nv_bfloat16 x) {
    asm volatile("st.shared.b16 [%0], %1;\n" :: "r"(addr), "h"(__bfloat16_as_ushort(x)) : "memory");
}
__device__ __forceinline__ void sts(unsigned addr, float x) {
    asm volatile("st.shared.b32 [%0], %1;\n" :: "r"(addr), "f"(x) : "memory");
}
__device__ __forceinline__ void sts(unsigned addr, double x) {
    asm volatile("st.shared.b64 [%0], %1;\n" :: "r"(addr), "d"(x) : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}

// The producer warps' ring (DecodeTraits::PRODUCER): one "full" and one "empty" mbarrier
// per slot, in shared memory. arrive releases the arriving thread's earlier writes (its
// completed copies), a completed wait acquires them (PTX's default .release / .acquire at
// CTA scope). sm_80 has no try_wait: it polls test_wait.
__device__ __forceinline__ void ring_init(unsigned bar, unsigned arrivals) {
    asm volatile("mbarrier.init.shared.b64 [%0], %1;\n" :: "r"(bar), "r"(arrivals) : "memory");
}

__device__ __forceinline__ void ring_arrive(unsigned bar) {
    asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared.b64 state, [%0];\n}\n"
                 :: "r"(bar) : "memory");
}

// Wait until the phase of parity `parity` of the mbarrier has completed.
__device__ __forceinline__ void ring_wait(unsigned bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("{\n.reg .pred done;\nRING_WAIT_%=:\n"
                 "mbarrier.try_wait.parity.shared.b64 done, [%0], %1;\n"
                 "@!done bra RING_WAIT_%=;\n}\n" :: "r"(bar), "r"(parity) : "memory");
#else
    asm volatile("{\n.reg .pred done;\nRING_WAIT_%=:\n"
                 "mbarrier.test_wait.parity.shared.b64 done, [%0], %1;\n"
                 "@!done bra RING_WAIT_%=;\n}\n" :: "r"(bar), "r"(parity) : "memory");
#endif
}

// q . k over one 16-byte vector of VEC elements in two dependency chains (even and odd
// elements) that the scheduler overlaps: half the latency of one chain of VEC FMAs. In the
// one-row kernel that latency lies between a tile's arrival and its slot's refill, and the
// read rate feels it (benchmarks/NOTES.md, session 24).
template <int VEC, typename Acc>
__device__ __forceinline__ Acc dot_vec(const Acc* q, const Acc* k) {
    Acc even = q[0] * k[0], odd = q[1] * k[1];
#pragma unroll
    for (int e = 2; e < VEC; e += 2) {
        even = fma(q[e], k[e], even);
        odd = fma(q[e + 1], k[e + 1], odd);
    }
    return even + odd;
}

// The K and V rows of key t of a kv head whose rows start at k_base and v_base: row t of a
// contiguous cache, or of a paged one (`valid`: t < n_b, whose pages validation has
// checked) page block_table[b, t / page_size], position t % page_size in it. t / page_size
// by a multiply and a shift (the launcher's constants, exact for t and page_size below
// 2^31), not a division.
template <typename T>
struct KeyRows {
    const T* k;
    const T* v;
};

template <typename T>
__device__ __forceinline__ KeyRows<T> key_rows(const DecodeParams& p, const T* k_base,
                                               const T* v_base, bool paged,
                                               const int* table_row, int t, bool valid) {
    if (paged && valid) {
        const unsigned tt = static_cast<unsigned>(t);
        const unsigned q = p.page_size == 1 ? tt
            : __umulhi(tt, static_cast<unsigned>(p.page_size_mul)) >> static_cast<unsigned>(p.page_size_shift);
        const int page = table_row[q], pos = t - static_cast<int>(q) * static_cast<int>(p.page_size);
        return {k_base + page * p.k_page_stride + pos * p.k_token_stride,
                v_base + page * p.v_page_stride + pos * p.v_token_stride};
    }
    return {k_base + static_cast<long long>(t) * p.k_token_stride,
            v_base + static_cast<long long>(t) * p.v_token_stride};
}

// Copy one vector (columns c0 .. c0 + VEC - 1) of a row whose first `n_cols` columns are
// data into a 16-byte shared slot: a cp.async of its `bytes` data bytes (the lane's
// constant: min(n_cols - c0, VEC) * sizeof(T)) when rows are vectors, else element by
// element through registers (done when this returns). Columns past n_cols, and whole rows
// that are not `valid`, arrive as zeros.
template <typename T>
__device__ __forceinline__ void copy_vec(unsigned slot, const T* row, long long dim_stride, int c0,
                                         int bytes, int n_cols, bool valid, bool vectorized,
                                         const void* any_address) {
    constexpr int VEC = 16 / int(sizeof(T));
    if (vectorized) {
        cp_async_16(slot, valid ? static_cast<const void*>(row + c0) : any_address,
                    valid ? bytes : 0);
    } else {  // the slow path: a rolled loop keeps the kernel's code small
#pragma unroll 1
        for (int e = 0; e < VEC; ++e)
            sts(slot + e * int(sizeof(T)),
                valid && c0 + e < n_cols ? row[(c0 + e) * dim_stride] : T(0.0f));
    }
}

}  // namespace decode

namespace decode {

// 16 bytes of accumulators, for the partial rows' loads.
template <typename Acc> struct AccVec16 { using type = float4; };
template <> struct AccVec16<double> { using type = double2; };

// The split counter's atomic add, ordered both ways at GPU scope: it releases the block's
// partial stores (the other threads' too: they reached this thread through the barrier
// before it, and release is cumulative) and acquires every earlier arrival's, so that the
// last block, after its own barrier, reads all of them. One instruction (MEMBAR.ALL.GPU,
// ATOMG, CCTL.IVALL in the SASS) instead of a __threadfence (fence.sc) in every thread
// before the add and another in the last block after it: on an H100 at batch 1, 8k keys,
// 16 splits, arrival to merge went from 1.41 to 0.67 us (benchmarks/NOTES.md, session 12).
__device__ __forceinline__ int atomic_add_acq_rel(int* address, int value) {
    int old;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;\n"
                 : "=r"(old) : "l"(address), "r"(value) : "memory");
    return old;
}

// The merge of the splits, by the block of the last split to finish: rows row0 ..
// row0 + R - 1 of kv head hk of batch element b, as flash_decode_combine merges them
//
//     out = sum_s exp(lse_s - lse) out_s,   lse = log(sum_s exp(lse_s)),
//
// a split that saw no key has lse_s = -inf and adds nothing (every split -inf gives zeros
// and lse = -inf). This is the block's tail, after every other block has finished, so it
// is built for latency: a thread issues the loads of all its splits (lse_s and its 16 bytes
// of out_s, SPLIT_CHUNK splits at a time) before it uses any, and folds them in with the
// online softmax's rescaling (running max m, sum l); the thread groups that shared a
// vector's splits then merge the same way through shared memory. One round trip to L2
// where the first version made two and a rolled loop over the splits: on an H100 at batch
// 1, 8k keys, 16 splits, the merge took 3.8 us before and 1.9 us now (per-block timeline,
// benchmarks/NOTES.md, session 12). Fixed order, whichever block runs it: reproducible.
// Shared memory: (groups, n_out) running (m, l, 16-byte sum), at most NUM_THREADS of them
// (combine_smem_bytes). SPLIT_CHUNK: 128 bytes of partial rows in flight per thread (8
// splits of float, 4 of double: 8 double2 loads and their addresses spilled the one-row
// float64 kernel, which may use 128 registers, on sm_90a).
template <typename Acc> struct SplitChunk { static constexpr int value = 128 / 16 / (int(sizeof(Acc)) / 4); };

template <typename Acc>
__host__ __device__ constexpr int combine_smem_bytes(int num_threads) {
    return num_threads * (16 + 2 * int(sizeof(Acc)));
}

template <typename T, int NUM_WARPS>
__device__ __forceinline__ void combine_splits(const DecodeParams& p, unsigned char* smem_raw,
                                               long long b, int hk, int row0, int R) {
    using Math = DecodeMath<T>;
    using Acc = typename Math::Acc;
    using Vec = typename AccVec16<Acc>::type;
    constexpr int NUM_THREADS = 32 * NUM_WARPS;
    constexpr int PER_VEC = 16 / int(sizeof(Acc));        // Acc per 16-byte vector
    constexpr int SPLIT_CHUNK = SplitChunk<Acc>::value;   // splits whose loads are in flight
    const int tid = threadIdx.x;
    const int S = static_cast<int>(p.num_splits), M = static_cast<int>(p.M);
    const int G = static_cast<int>(p.G), Dv = static_cast<int>(p.Dv);
    const long long bhk = b * p.Hk + hk;
    const Acc* lse_part = static_cast<const Acc*>(p.lse_partial) + bhk * S * M + row0;  // (S, M)
    const int row_vecs = static_cast<int>(p.partial_row) / PER_VEC;
    const Vec* out_part = reinterpret_cast<const Vec*>(p.out_partial)
                          + (bhk * S * M + row0) * row_vecs;   // (S, M, row_vecs)

    // The result of one (row r, vector cv) from its running (m, l, sum): out and, from the
    // row's first vector, lse. (Dv = 0: one "vector" per row carries only the lse.)
    auto finish = [&](int r, int cv, Acc m, Acc l, const Acc (&sum)[PER_VEC]) {
        const int row = row0 + r, i = row / G, h = hk * G + row % G;
        if (cv == 0)
            static_cast<Acc*>(p.lse)[(b * p.H + h) * p.Lq + i] =
                l == Acc(0) ? Acc(-INFINITY) : m + Math::log_natural(l);
        const Acc inv_l = Math::inverse(l);
        T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + i * p.out_token_stride
                 + h * p.out_head_stride;
#pragma unroll
        for (int e = 0; e < PER_VEC; ++e)
            if (cv * PER_VEC + e < Dv) out[cv * PER_VEC + e] = Math::from_acc(sum[e] * inv_l);
    };

    // -- thread (group, o) folds in vector o of the splits s = group, group + groups, ...
    const int n_out = R * max(row_vecs, 1);
    const int groups = n_out >= NUM_THREADS ? 1 : NUM_THREADS / n_out;
    const int group = groups == 1 ? 0 : tid / n_out;         // >= groups: a spare thread
    const int o_first = groups == 1 ? tid : tid % n_out;
    const int o_step = groups == 1 ? NUM_THREADS : n_out;    // groups > 1: one vector each
    Acc* m_s = reinterpret_cast<Acc*>(smem_raw);             // (groups, n_out)
    Acc* l_s = m_s + NUM_THREADS;                            // (groups, n_out)
    Acc* sum_s = l_s + NUM_THREADS;                          // (groups, n_out, PER_VEC)
    for (int o = o_first; o < n_out && group < groups && tid < NUM_THREADS; o += o_step) {
        const int r = o / max(row_vecs, 1), cv = o % max(row_vecs, 1);
        Acc m = -INFINITY, l = Acc(0), sum[PER_VEC];
#pragma unroll
        for (int e = 0; e < PER_VEC; ++e) sum[e] = Acc(0);
        for (int s0 = group; s0 < S; s0 += SPLIT_CHUNK * groups) {
            Acc lse_c[SPLIT_CHUNK];
            Vec x_c[SPLIT_CHUNK];
#pragma unroll
            for (int k = 0; k < SPLIT_CHUNK; ++k) {  // every load first (L2: other blocks wrote them)
                const int s = s0 + k * groups;
                lse_c[k] = s < S ? __ldcg(lse_part + s * M + r) : Acc(-INFINITY);
                if (row_vecs > 0 && s < S)
                    x_c[k] = __ldcg(out_part + (static_cast<long long>(s) * M + r) * row_vecs + cv);
                else
                    x_c[k] = Vec{};
            }
            Acc m_new = m;
#pragma unroll
            for (int k = 0; k < SPLIT_CHUNK; ++k) m_new = fmax(m_new, lse_c[k]);
            const Acc m_safe = m_new == -INFINITY ? Acc(0) : m_new;
            const Acc alpha = Math::exp_natural(m - m_safe);  // 0 while m = -inf
            l *= alpha;
#pragma unroll
            for (int e = 0; e < PER_VEC; ++e) sum[e] *= alpha;
#pragma unroll
            for (int k = 0; k < SPLIT_CHUNK; ++k) {
                const Acc w = Math::exp_natural(lse_c[k] - m_safe);  // 0 for lse_s = -inf
                const Acc* xe = reinterpret_cast<const Acc*>(&x_c[k]);
                l += w;
#pragma unroll
                for (int e = 0; e < PER_VEC; ++e) sum[e] += w == Acc(0) ? Acc(0) : w * xe[e];
            }
            m = m_new;
        }
        if (groups == 1) {
            finish(r, cv, m == -INFINITY ? Acc(0) : m, l, sum);
        } else {
            m_s[group * n_out + o] = m;
            l_s[group * n_out + o] = l;
#pragma unroll
            for (int e = 0; e < PER_VEC; ++e) sum_s[(group * n_out + o) * PER_VEC + e] = sum[e];
        }
    }
    if (groups == 1) return;
    // every group's (m, l, sum) is in shared memory
    __syncthreads();
    for (int o = tid; o < n_out && tid < NUM_THREADS; o += NUM_THREADS) {
        Acc m = -INFINITY;
        for (int g = 0; g < groups; ++g) m = fmax(m, m_s[g * n_out + o]);
        const Acc m_safe = m == -INFINITY ? Acc(0) : m;
        Acc l = Acc(0), sum[PER_VEC];
#pragma unroll
        for (int e = 0; e < PER_VEC; ++e) sum[e] = Acc(0);
        for (int g = 0; g < groups; ++g) {
            const Acc w = Math::exp_natural(m_s[g * n_out + o] - m_safe);
            l += w * l_s[g * n_out + o];
#pragma unroll
            for (int e = 0; e < PER_VEC; ++e) sum[e] += w * sum_s[(g * n_out + o) * PER_VEC + e];
        }
        finish(o / max(row_vecs, 1), o % max(row_vecs, 1), m_safe, l, sum);
    }
}

// Column c of row r of a warp's acc in the warps' merge buffer: c XOR (8 * (r % 4) + (r / 4)
// % 2), a permutation of the row (HEAD_DIM >= 32). The tensor-core kernel's lanes hold rows
// g = 0..7 (and g + 8) at columns 2 * t4 (+ 1): unmoved, the 8 rows of a store, HEAD_DIM
// floats apart, fell in the same 4 banks (8-way conflicts on 64 stores per lane); moved,
// rows 0-3 take even banks of four different 8-bank groups and rows 4-7 the odd ones. Row
// 0 is not moved (the one-row kernel's layout is unchanged).
template <int HEAD_DIM>
__device__ __forceinline__ int merge_col(int r, int c) {
    static_assert(HEAD_DIM >= 32, "the permutation stays inside a row");
    return c ^ (((r & 3) << 3) | ((r >> 2) & 1));
}

// The warps' merge and the block's results. On entry warp w's (m_i, l_i, acc) over its keys
// are in shared memory, acc (NUM_WARPS, ROWS, HEAD_DIM) with columns at merge_col, then m
// and l (NUM_WARPS, ROWS), and a barrier has made them visible; rows past M are ignored.
// The block writes its rows' final out and lse (one split) or its split's normalised
// partial out and lse. Every thread computes the warp weights of the rows it writes
// itself (NUM_WARPS broadcast reads and exps): no barrier between the weights and the sums.
// Threads past 32 * NUM_WARPS (a block's producer warps) only take part in the barriers,
// here and in combine_splits.
template <typename T, int HEAD_DIM, int ROWS, int NUM_WARPS>
__device__ __forceinline__ void merge_warps_and_store(const DecodeParams& p,
                                                      unsigned char* smem_raw, long long b,
                                                      int hk, int split, int rc) {
    using Math = DecodeMath<T>;
    using Acc = typename Math::Acc;
    constexpr int NUM_THREADS = 32 * NUM_WARPS;
    const int tid = threadIdx.x;
    const int G = static_cast<int>(p.G), M = static_cast<int>(p.M);
    const Acc* acc_s = reinterpret_cast<const Acc*>(smem_raw);       // (NUM_WARPS, ROWS, HEAD_DIM)
    const Acc* m_s = acc_s + NUM_WARPS * ROWS * HEAD_DIM;             // (NUM_WARPS, ROWS)
    const Acc* l_s = m_s + NUM_WARPS * ROWS;                          // (NUM_WARPS, ROWS)

    // row r's weights exp(m_w - M) / l, M = max_w m_w, l = sum_w l_w exp(m_w - M) (all 0
    // for a row that saw no key: zeros out, lse -inf); returns l, sets m_safe
    auto weights = [&](int r, Acc (&w_r)[NUM_WARPS], Acc& m_safe) {
        Acc m = -INFINITY;
#pragma unroll
        for (int w = 0; w < NUM_WARPS; ++w) m = fmax(m, m_s[w * ROWS + r]);
        m_safe = safe_max(m);
        Acc l = Acc(0);
#pragma unroll
        for (int w = 0; w < NUM_WARPS; ++w) {
            w_r[w] = Math::exp(m_s[w * ROWS + r] - m_safe);
            l += l_s[w * ROWS + r] * w_r[w];
        }
        const Acc inv_l = Math::inverse(l);
#pragma unroll
        for (int w = 0; w < NUM_WARPS; ++w) w_r[w] *= inv_l;
        return l;
    };

    const bool one_split = p.num_splits == 1;
    // -- lse: final with one split, else this split's
    if (tid < ROWS && rc * ROWS + tid < M) {
        const int r = tid, row = rc * ROWS + r;
        Acc w_r[NUM_WARPS], m_safe;
        const Acc l = weights(r, w_r, m_safe);
        const Acc lse = l == Acc(0) ? Acc(-INFINITY) : Math::lse(m_safe, l);
        const int i = row / G, h = hk * G + row % G;
        if (one_split)
            static_cast<Acc*>(p.lse)[(b * p.H + h) * p.Lq + i] = lse;
        else
            static_cast<Acc*>(p.lse_partial)[((b * p.Hk + hk) * p.num_splits + split) * p.M + row] = lse;
    }

    // -- out = sum_w acc_w * weight_w: final (T) with one split, else this split's partial
    const int dv = static_cast<int>(p.Dv);
    int r_weights = -1;     // the row whose weights w_r holds
    Acc w_r[NUM_WARPS];
    for (int idx = tid; idx < ROWS * dv && tid < NUM_THREADS; idx += NUM_THREADS) {
        const int r = idx / dv, c = idx % dv;
        const int row = rc * ROWS + r;
        if (row >= M) break;  // rows grow with idx: the rest are past M too
        if (r != r_weights) {
            Acc m_safe;
            weights(r, w_r, m_safe);
            r_weights = r;
        }
        Acc o = Acc(0);
#pragma unroll
        for (int w = 0; w < NUM_WARPS; ++w)
            o += acc_s[(w * ROWS + r) * HEAD_DIM + merge_col<HEAD_DIM>(r, c)] * w_r[w];
        if (one_split) {
            const int i = row / G, h = hk * G + row % G;
            static_cast<T*>(p.out)[b * p.out_batch_stride + i * p.out_token_stride
                                   + h * p.out_head_stride + c] = Math::from_acc(o);
        } else {
            static_cast<Acc*>(p.out_partial)[(((b * p.Hk + hk) * p.num_splits + split) * p.M + row)
                                             * p.partial_row + c] = o;
        }
    }
    if (one_split || p.split_counters == nullptr) return;

    // -- the last split of (b, hk, rc) to finish merges them all (no second launch)
    __shared__ int is_last;
    // every thread's partial stores are issued (thread 0's release below publishes them)
    // and the merge's shared memory (acc_s, m_s, l_s) is read by no one any more
    __syncthreads();
    if (tid == 0) {
        int* counter = p.split_counters + (b * p.Hk + hk) * p.row_chunks + rc;
        const int arrived = atomic_add_acq_rel(counter, 1);
        is_last = arrived == static_cast<int>(p.num_splits) - 1;
        if (is_last) *counter = 0;  // every split has arrived: zero for the next launch
    }
    // is_last is set; if it is, every split's partials are visible to the whole block
    __syncthreads();
    if (!is_last) return;
    combine_splits<T, NUM_WARPS>(p, smem_raw, b, hk, rc * ROWS, min(ROWS, M - rc * ROWS));
}

// One work unit (b, hk, split, row chunk) of the split kernel, by the whole block.
// PRODUCER: `ring` is the shared address of the slots' mbarriers (full, then empty), and
// `tile_base` counts the tiles of the block's earlier units (the ring runs on across
// units: tile g of the block is in slot g % STAGES, in that slot's pass g / STAGES).
template <typename T, int HEAD_DIM, int ROWS, int WARPS, int PRODUCERS, int PRODUCER_STAGES>
__device__ __forceinline__ void split_unit(const DecodeParams& p, unsigned unit, int& tile_base,
                                           unsigned ring) {
    using Tr = DecodeTraits<T, HEAD_DIM, ROWS, WARPS, PRODUCERS, PRODUCER_STAGES>;
    using Math = DecodeMath<T>;
    using Acc = typename Tr::Acc;
    constexpr int VEC = Tr::VEC, LANES_PER_KEY = Tr::LANES_PER_KEY;
    constexpr int VECS_PER_LANE = Tr::VECS_PER_LANE, KEYS_PER_PASS = Tr::KEYS_PER_PASS;
    constexpr int PASSES = Tr::PASSES, ELEMS = Tr::ELEMS, WARP_KEYS = Tr::WARP_KEYS;
    constexpr int BLOCK_N = Tr::BLOCK_N, STAGES = Tr::STAGES, NUM_WARPS = Tr::NUM_WARPS;
    constexpr int CONSUMER_THREADS = Tr::CONSUMER_THREADS, KV_VECS = Tr::KV_VECS;
    constexpr int STAGE_VECS = Tr::STAGE_VECS, COPIED_WARPS = Tr::COPIED_WARPS;

    // -- which unit: (b, hk, split, row chunk) (decode::block_coords)
    const int G = static_cast<int>(p.G), M = static_cast<int>(p.M);
    const decode::BlockCoords coords = decode::block_coords(p, unit);
    const int rc = coords.rc, split = coords.split, hk = coords.hk;
    const long long b = coords.b;
    if (b >= p.B) return;

    // (read by a volatile instruction: the values a thread derives from tid are then
    // computed again for each unit, not held in registers through flash_decode's loop,
    // which took the one-row kernel from 94 to 128 registers and spills on sm_80)
    int tid;
    asm volatile("mov.u32 %0, %%tid.x;" : "=r"(tid));
    const int warp = tid / 32;
    const int lane = tid % 32;
    const bool producer = Tr::PRODUCER && warp >= NUM_WARPS;
    // the compute warps whose copies this warp issues: its own, or a producer's COPIED_WARPS
    const int copy_warp0 = producer ? (warp - NUM_WARPS) * COPIED_WARPS : warp;
    const int kg = lane / LANES_PER_KEY;   // this lane's key within a pass
    const int lv = lane % LANES_PER_KEY;   // its vectors: lv + j * LANES_PER_KEY, j < VECS_PER_LANE

    // -- this split's keys: the n_b keys in whole tiles, as evenly as tiles allow (32-bit:
    // the launcher keeps cache positions below 2^30)
    const int n = decode::keys_attended(p, b);
    const int n_tiles = (n + BLOCK_N - 1) / BLOCK_N;
    const int num_splits = static_cast<int>(p.num_splits);
    const int tiles_per_split = (n_tiles + num_splits - 1) / num_splits;
    const int k_begin = split * tiles_per_split * BLOCK_N;
    const int k_end = min(k_begin + tiles_per_split * BLOCK_N, n);
    const int num_tiles = k_end > k_begin ? (k_end - k_begin + BLOCK_N - 1) / BLOCK_N : 0;
    const int key0 = warp * WARP_KEYS + kg;  // this lane's key in a tile, first pass
    const int copy_key0 = copy_warp0 * WARP_KEYS + kg;  // the same for copy_warp0

    // -- what a lane's copies keep from tile to tile: its rows' bases (head hk; batch b
    // for a contiguous cache) and, per vector, its first column and its data bytes (0: a
    // vector past D, never copied)
    const bool paged = p.page_size > 0;
    const int* table_row = paged ? p.block_table + b * p.table_stride : nullptr;
    const T* k_base = static_cast<const T*>(p.k) + hk * p.k_head_stride
                      + (paged ? 0 : b * p.k_page_stride);
    const T* v_base = static_cast<const T*>(p.v) + hk * p.v_head_stride
                      + (paged ? 0 : b * p.v_page_stride);
    const bool k_vec = p.k_vectorized != 0, v_vec = p.v_vectorized != 0;
    const int D = static_cast<int>(p.D), Dv = static_cast<int>(p.Dv);
    const int d_vecs = (D + VEC - 1) / VEC;    // vectors holding k data
    const int dv_vecs = (Dv + VEC - 1) / VEC;  // vectors holding v data
    int k_bytes[VECS_PER_LANE], v_bytes[VECS_PER_LANE];
#pragma unroll
    for (int jj = 0; jj < VECS_PER_LANE; ++jj) {
        const int c0 = (lv + jj * LANES_PER_KEY) * VEC;
        k_bytes[jj] = max(0, min(D - c0, VEC)) * int(sizeof(T));
        v_bytes[jj] = max(0, min(Dv - c0, VEC)) * int(sizeof(T));
    }

    extern __shared__ __align__(16) unsigned char smem_raw[];
    // Pipeline: (STAGES, STAGE_VECS, CONSUMER_THREADS) vectors; a compute thread reads only
    // the slots it (or, PRODUCER, the same lane of a producer warp) copied into.
    const unsigned pipe = decode::aligned_pipe(smem_raw) + lane * 16;
    auto slot = [&](int stage, int i, int w) {  // vector i of compute warp w's lane's tile
        return pipe + w * (32 * 16) + (stage * STAGE_VECS + i) * (CONSUMER_THREADS * 16);
    };

    // FAST's K and V addresses of each pass in the next tile to load (the key of this
    // lane in copy_warp0 and its first column; tiles are loaded in order, each BLOCK_N rows
    // after the last; copy_warp0 + w's keys are w * WARP_KEYS rows further)
    const T* k_next[PASSES];
    const T* v_next[PASSES];
#pragma unroll
    for (int ps = 0; ps < PASSES; ++ps) {
        const long long t = k_begin + copy_key0 + ps * KEYS_PER_PASS;
        k_next[ps] = k_base + t * p.k_token_stride + lv * VEC;
        v_next[ps] = v_base + t * p.v_token_stride + lv * VEC;
    }
    const bool fast = !paged && k_vec && v_vec && D == HEAD_DIM && Dv == HEAD_DIM;

    // Start copying tile j (keys k_begin + j * BLOCK_N ...) of compute warps copy_warp0 ..
    // copy_warp0 + COPIED_WARPS - 1 (this lane's vectors of them) into slot `stage`.
    // FAST (a contiguous cache of 16-byte rows, D = Dv = HEAD_DIM: the common case): each
    // pass's K and V addresses advance by BLOCK_N rows a tile, every vector is whole, and
    // nothing else is decided per copy; the general path places every key (paged caches,
    // partial or element-wise rows).
    auto load_tile = [&](int j, int stage, auto fast) {
        constexpr bool FAST = decltype(fast)::value;
        if (j < num_tiles) {
#pragma unroll
            for (int w = 0; w < COPIED_WARPS; ++w) {  // compute warp copy_warp0 + w's vectors
                const int cw = copy_warp0 + w;
#pragma unroll
                for (int ps = 0; ps < PASSES; ++ps) {
                    const int t = k_begin + j * BLOCK_N + copy_key0 + w * WARP_KEYS
                                  + ps * KEYS_PER_PASS;
                    const bool valid = t < k_end;
                    if constexpr (FAST) {
                        const T* k_row = k_next[ps] + w * WARP_KEYS * p.k_token_stride;
                        const T* v_row = v_next[ps] + w * WARP_KEYS * p.v_token_stride;
#pragma unroll
                        for (int jj = 0; jj < VECS_PER_LANE; ++jj) {
                            const int c0 = jj * LANES_PER_KEY * VEC;  // (lv's columns in k_next)
                            decode::cp_async_16(slot(stage, ps * VECS_PER_LANE + jj, cw),
                                                valid ? static_cast<const void*>(k_row + c0) : p.k,
                                                valid ? 16 : 0);
                            decode::cp_async_16(slot(stage, KV_VECS + ps * VECS_PER_LANE + jj, cw),
                                                valid ? static_cast<const void*>(v_row + c0) : p.v,
                                                valid ? 16 : 0);
                        }
                        continue;
                    }
                    const auto rows = decode::key_rows(p, k_base, v_base, paged, table_row, t,
                                                       valid);
                    const T* k_row = rows.k;
                    const T* v_row = rows.v;
#pragma unroll
                    for (int jj = 0; jj < VECS_PER_LANE; ++jj) {
                        const int c0 = (lv + jj * LANES_PER_KEY) * VEC;
                        if (k_bytes[jj] > 0)
                            decode::copy_vec(slot(stage, ps * VECS_PER_LANE + jj, cw), k_row,
                                             p.k_dim_stride, c0, k_bytes[jj], D, valid, k_vec, p.k);
                        if (v_bytes[jj] > 0)
                            decode::copy_vec(slot(stage, KV_VECS + ps * VECS_PER_LANE + jj, cw),
                                             v_row, p.v_dim_stride, c0, v_bytes[jj], Dv, valid,
                                             v_vec, p.v);
                    }
                }
            }
            if constexpr (FAST) {
#pragma unroll
                for (int ps = 0; ps < PASSES; ++ps) {
                    k_next[ps] += BLOCK_N * p.k_token_stride;
                    v_next[ps] += BLOCK_N * p.v_token_stride;
                }
            }
        }
        decode::cp_async_commit();  // one group per tile, possibly empty: wait counts match
    };

    Acc q[ROWS][ELEMS];    // q[r][e]: row rc * ROWS + r, this lane's columns, times scale
    Acc m_i[ROWS];         // running max of this warp's scores (log2 units for float)
    Acc l_i[ROWS];         // running sum of exp(S - m_i) over this lane's keys
    Acc acc[ROWS][ELEMS];  // unnormalised out: this lane's keys and columns
    // PRODUCER: the slots' mbarriers; tile g of the block is in slot g % STAGES, in that
    // slot's pass g / STAGES, whose parity its waits name
    auto full = [&](int stage) { return ring + 8 * stage; };
    auto empty = [&](int stage) { return ring + 8 * (STAGES + stage); };

    // The producer warps' loop: keep IN_FLIGHT tiles in flight; as soon as the oldest has
    // landed, hand it to the compute warps (full) and start the next one, into a slot the
    // compute warps have handed back (empty).
    auto produce = [&](auto fast_c) {
        constexpr int IN_FLIGHT = Tr::IN_FLIGHT;
        auto fill = [&](int j) {   // tile j of this unit into its slot, once that is free
            const int g = tile_base + j;
            if (j < num_tiles && g >= STAGES)
                decode::ring_wait(empty(g % STAGES), (g / STAGES - 1) & 1);
            load_tile(j, g % STAGES, fast_c);
        };
#pragma unroll
        for (int j = 0; j < IN_FLIGHT; ++j) fill(j);
        for (int j = 0; j < num_tiles; ++j) {
            const int g = tile_base + j;
            decode::cp_async_wait<IN_FLIGHT - 1>();   // this lane's copies of tile j landed
            decode::ring_arrive(full(g % STAGES));
            // and every producer lane's: the block's copies go on tile by tile, in step
            decode::ring_wait(full(g % STAGES), (g / STAGES) & 1);
            fill(j + IN_FLIGHT);
        }
    };

    auto main_loop = [&](auto fast_c) {
        constexpr bool FAST = decltype(fast_c)::value;
        if constexpr (Tr::PRODUCER) {
            if (producer) {
                produce(fast_c);
                return;
            }
        } else {
            // -- prologue: the first STAGES - 1 tiles on their way while q is read
#pragma unroll
            for (int j = 0; j < STAGES - 1; ++j) load_tile(j, j % STAGES, fast_c);
        }

        // q[r][e]: row rc * ROWS + r, this lane's columns, times scale (* log2(e) for float)
        {
            const Acc q_scale = Math::q_scale(p);
            const T* qb = static_cast<const T*>(p.q) + b * p.q_batch_stride;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const int row = rc * ROWS + r;
                const bool valid = row < M;
                const int i = row / G, h = hk * G + row % G;
                const T* q_row = qb + i * p.q_token_stride + h * p.q_head_stride;
#pragma unroll
                for (int jj = 0; jj < VECS_PER_LANE; ++jj)
#pragma unroll
                    for (int e = 0; e < VEC; ++e) {
                        const int c = (lv + jj * LANES_PER_KEY) * VEC + e;
                        q[r][jj * VEC + e] = valid && c < D
                            ? Math::to_acc(q_row[c * p.q_dim_stride]) * q_scale : Acc(0);
                    }
            }
        }
        // causal: row r (token i_r = (rc * ROWS + r) / G) sees key t iff t <= i_r + n - Lq;
        // diag0 is the first row's bound, the smallest
        const int Lq = static_cast<int>(p.Lq);
        const int diag0 = rc * ROWS / G + n - Lq;

#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            m_i[r] = -INFINITY;
            l_i[r] = Acc(0);
#pragma unroll
            for (int e = 0; e < ELEMS; ++e) acc[r][e] = Acc(0);
        }

        int ring_stage = tile_base % STAGES;          // PRODUCER: tile j's slot and its pass
        unsigned ring_parity = (tile_base / STAGES) & 1;
        for (int j = 0; j < num_tiles; ++j) {
            // PRODUCER: tile j is the producer's to copy; wait until it has landed. Else the
            // slot of tile j - 1, whose values this thread read and used in the previous
            // iteration (program order: the copy's write follows those reads), is refilled
            // with tile j + STAGES - 1: after the wait for tile j (REFILL_AFTER_WAIT: STAGES
            // - 1 tiles in flight throughout) or before it (all STAGES while this thread
            // waits). Its own copies only; nobody else reads them.
            if constexpr (Tr::PRODUCER) {
                decode::ring_wait(full(ring_stage), ring_parity);
            } else if constexpr (Tr::REFILL_AFTER_WAIT) {
                decode::cp_async_wait<STAGES - 2>();
                load_tile(j + STAGES - 1, (j + STAGES - 1) % STAGES, fast_c);
            } else {
                load_tile(j + STAGES - 1, (j + STAGES - 1) % STAGES, fast_c);
                decode::cp_async_wait<STAGES - 1>();
            }
            const int stage = Tr::PRODUCER ? ring_stage : j % STAGES;
            const int t0 = k_begin + j * BLOCK_N + key0;

            // -- S = q K^T: s[ps][r] for key t0 + ps * KEYS_PER_PASS, summed over the key's lanes
            Acc s[PASSES][ROWS];
#pragma unroll
            for (int ps = 0; ps < PASSES; ++ps) {
#pragma unroll
                for (int r = 0; r < ROWS; ++r) s[ps][r] = Acc(0);
#pragma unroll
                for (int jj = 0; jj < VECS_PER_LANE; ++jj) {
                    if (FAST || lv + jj * LANES_PER_KEY < d_vecs) {  // (FAST: all are)  // vectors past D hold nothing
                        const decode::Vec16<T> x =
                            decode::lds_vec16<T>(slot(stage, ps * VECS_PER_LANE + jj, warp));
                        Acc kf[VEC];
#pragma unroll
                        for (int e = 0; e < VEC; ++e) kf[e] = Math::to_acc(x.v[e]);
#pragma unroll
                        for (int r = 0; r < ROWS; ++r)
                            s[ps][r] += decode::dot_vec<VEC>(&q[r][jj * VEC], kf);
                    }
                }
#pragma unroll
                for (int r = 0; r < ROWS; ++r)
#pragma unroll
                    for (int mask = 1; mask < LANES_PER_KEY; mask *= 2)
                        s[ps][r] += __shfl_xor_sync(0xffffffffu, s[ps][r], mask);
            }

            // -- keys past the split's end, and above the diagonal when causal, score -inf;
            // only the last tile and tiles that reach the diagonal need it
            const int t_last = t0 - kg + WARP_KEYS - 1;  // this warp's last key in the tile
            if (t_last >= k_end || (p.causal && t_last > diag0)) {
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    const int diag = (rc * ROWS + r) / G + n - Lq;
#pragma unroll
                    for (int ps = 0; ps < PASSES; ++ps) {
                        const int t = t0 + ps * KEYS_PER_PASS;
                        if (t >= k_end || (p.causal && t > diag)) s[ps][r] = -INFINITY;
                    }
                }
            }

            // -- update m_i and l_i; P~ = exp(S - m_new); rescale acc. m_i is the running
            // max of this lane's key group (the keys kg, kg + KEYS_PER_PASS, ... of the
            // warp's), not of the warp: the key groups agree on one max once, after the
            // loop, instead of two shuffles per tile on the path to the next refill
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                Acc m_new = m_i[r];
#pragma unroll
                for (int ps = 0; ps < PASSES; ++ps) m_new = fmax(m_new, s[ps][r]);
                // a row that has seen only -inf keeps m = -inf; shifting by 0 instead gives
                // exp(-inf) = 0 rather than exp(-inf + inf) = NaN
                const Acc m_safe = safe_max(m_new);
                if (m_new > m_i[r]) {  // rescale by alpha = exp(m_i - m_new) only when the max
                                       // grew (else alpha = 1; the key groups may differ)
                    const Acc alpha = Math::exp(m_i[r] - m_safe);  // 0 when m_i was -inf
                    l_i[r] *= alpha;
#pragma unroll
                    for (int e = 0; e < ELEMS; ++e) acc[r][e] *= alpha;
                }
                m_i[r] = m_new;
                Acc row_sum = Acc(0);
#pragma unroll
                for (int ps = 0; ps < PASSES; ++ps) {
                    s[ps][r] = Math::exp(s[ps][r] - m_safe);  // s now holds P~
                    row_sum += s[ps][r];
                }
                l_i[r] += row_sum;
            }

            // -- acc += P~ V: this lane's V vectors, of the keys it scored
#pragma unroll
            for (int ps = 0; ps < PASSES; ++ps) {
#pragma unroll
                for (int jj = 0; jj < VECS_PER_LANE; ++jj) {
                    if (FAST || lv + jj * LANES_PER_KEY < dv_vecs) {
                        const decode::Vec16<T> x =
                            decode::lds_vec16<T>(slot(stage, KV_VECS + ps * VECS_PER_LANE + jj, warp));
                        Acc vf[VEC];
#pragma unroll
                        for (int e = 0; e < VEC; ++e) vf[e] = Math::to_acc(x.v[e]);
#pragma unroll
                        for (int r = 0; r < ROWS; ++r)
#pragma unroll
                            for (int e = 0; e < VEC; ++e) acc[r][jj * VEC + e] += s[ps][r] * vf[e];
                    }
                }
            }
            if constexpr (Tr::PRODUCER) {   // the warp has read the slot: hand it back
                __syncwarp();
                if (lane == 0) decode::ring_arrive(empty(ring_stage));
                if (++ring_stage == STAGES) {
                    ring_stage = 0;
                    ring_parity ^= 1;
                }
            }
        }
    };
    if (fast) main_loop(decode::BoolC<true>{});
    else main_loop(decode::BoolC<false>{});
    tile_base += num_tiles;   // (PRODUCER: where the next unit's tiles start in the ring)

    // -- the warp's m_i, l_i and acc: its KEYS_PER_PASS key groups (same columns) rescaled
    // to the warp's max, then summed (the compute warps; a producer warp has none)
#pragma unroll
    for (int r = 0; r < ROWS && !producer; ++r) {
        Acc m_warp = m_i[r];
#pragma unroll
        for (int mask = LANES_PER_KEY; mask < 32; mask *= 2)
            m_warp = fmax(m_warp, __shfl_xor_sync(0xffffffffu, m_warp, mask));
        const Acc to_warp = Math::exp(m_i[r] - safe_max(m_warp));  // 0: a group that saw no key
        m_i[r] = m_warp;
        l_i[r] *= to_warp;
#pragma unroll
        for (int e = 0; e < ELEMS; ++e) acc[r][e] *= to_warp;
#pragma unroll
        for (int mask = LANES_PER_KEY; mask < 32; mask *= 2) {
            l_i[r] += __shfl_xor_sync(0xffffffffu, l_i[r], mask);
#pragma unroll
            for (int e = 0; e < ELEMS; ++e)
                acc[r][e] += __shfl_xor_sync(0xffffffffu, acc[r][e], mask);
        }
    }

    // -- merge the warps through shared memory (the pipeline's, now idle)
    decode::cp_async_wait<0>();
    // every thread's copies have landed and every thread is done reading its stages
    __syncthreads();
    Acc* acc_s = reinterpret_cast<Acc*>(smem_raw);                    // (NUM_WARPS, ROWS, HEAD_DIM)
    Acc* m_s = acc_s + Tr::MERGE_ACC;                                  // (NUM_WARPS, ROWS)
    Acc* l_s = m_s + NUM_WARPS * ROWS;                                 // (NUM_WARPS, ROWS)
    if (kg == 0 && !producer) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
#pragma unroll
            for (int jj = 0; jj < VECS_PER_LANE; ++jj)
#pragma unroll
                for (int e = 0; e < VEC; ++e)
                    acc_s[(warp * ROWS + r) * HEAD_DIM
                          + decode::merge_col<HEAD_DIM>(r, (lv + jj * LANES_PER_KEY) * VEC + e)] =
                        acc[r][jj * VEC + e];
        if (lv == 0) {
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                m_s[warp * ROWS + r] = m_i[r];
                l_s[warp * ROWS + r] = l_i[r];
            }
        }
    }
    // every warp's (m, l, acc) is in shared memory
    __syncthreads();

    // (the unit's coordinates again: recomputed, not held in registers through the loop)
    const decode::BlockCoords again = decode::block_coords(p, unit);
    decode::merge_warps_and_store<T, HEAD_DIM, ROWS, NUM_WARPS>(p, smem_raw, again.b, again.hk,
                                                                again.split, again.rc);
}

}  // namespace decode

// ----------------------------------------------------------------------------------------
// The split kernel. Grid: one block per work unit (b, hk, split, row chunk), or, for the
// one-row kernel (ROWS = 1), possibly fewer blocks than units (p.units): block i then
// takes units i, i + gridDim.x, ..., so that
// the blocks running side by side still read the same keys of neighbouring heads. With
// B * Hk units of one split each, 512 at batch 64, a grid of 128 blocks gives every
// multiprocessor but 4 one block and 4 units, as batch 16 does with one unit each,
// instead of four blocks on 116 of them and three on 16 (_cupy_decode.units_per_block).
// ----------------------------------------------------------------------------------------
template <typename T, int HEAD_DIM, int ROWS, int WARPS = 4, int PRODUCERS = 0,
          int PRODUCER_STAGES = 4>
__global__ void __launch_bounds__(
    DecodeTraits<T, HEAD_DIM, ROWS, WARPS, PRODUCERS, PRODUCER_STAGES>::NUM_THREADS,
    DecodeTraits<T, HEAD_DIM, ROWS, WARPS, PRODUCERS, PRODUCER_STAGES>::MIN_BLOCKS)
flash_decode(const DecodeParams p) {
    using Tr = DecodeTraits<T, HEAD_DIM, ROWS, WARPS, PRODUCERS, PRODUCER_STAGES>;
    constexpr int NUM_THREADS = Tr::NUM_THREADS, STAGES = Tr::STAGES;

    // The launcher must give NUM_THREADS threads and SMEM_BYTES of dynamic shared memory;
    // trap (a launch error) rather than write past the end if _cupy_decode disagrees.
    unsigned dynamic_smem;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dynamic_smem));
    static_assert(Tr::SMEM_BYTES - DECODE_PIPE_ALIGN
                      >= decode::combine_smem_bytes<typename Tr::Acc>(Tr::CONSUMER_THREADS),
                  "the splits' merge fits in the shared memory");
    if (dynamic_smem < static_cast<unsigned>(Tr::SMEM_BYTES) || blockDim.x != NUM_THREADS)
        __trap();

    // PRODUCER: the ring's mbarriers, full (the producer warps' lanes arrive) then empty
    // (one arrival per compute warp); they run on across the block's units
    __shared__ __align__(8) unsigned long long ring_bars[Tr::PRODUCER ? 2 * STAGES : 1];
    const unsigned ring = static_cast<unsigned>(__cvta_generic_to_shared(ring_bars));
    if constexpr (Tr::PRODUCER) {
        if (threadIdx.x == 0) {
            for (int s = 0; s < STAGES; ++s) {
                decode::ring_init(ring + 8 * s, 32 * PRODUCERS);
                decode::ring_init(ring + 8 * (STAGES + s), Tr::NUM_WARPS);
            }
        }
        __syncthreads();   // initialised before anyone arrives or waits
    }
    int tile_base = 0;     // the block's tiles so far (PRODUCER's ring position)

    // nothing global is touched before the grid before this one has completed (PDL)
    decode::wait_for_previous_grid();
    decode::allow_next_grid();

    if constexpr (ROWS == 1) {
        for (unsigned unit = blockIdx.x; unit < static_cast<unsigned>(p.units);
             unit += gridDim.x) {
            decode::split_unit<T, HEAD_DIM, ROWS, WARPS, PRODUCERS, PRODUCER_STAGES>(
                p, unit, tile_base, ring);
            // the unit's merge has read the shared memory the next unit's copies refill
            __syncthreads();
        }
    } else {  // one unit per block (the loop costs the many-row variants 10-20 registers)
        decode::split_unit<T, HEAD_DIM, ROWS, WARPS, PRODUCERS, PRODUCER_STAGES>(
            p, blockIdx.x, tile_base, ring);
    }
}

// ----------------------------------------------------------------------------------------
// The tensor-core split kernel: fp16/bf16, 2..16 query rows per kv head (grouped-query
// heads, several new tokens).
//
// The SIMT kernel does ROWS multiply-adds per K and V element on the CUDA cores, so its
// time per key grows with G * Lq (ROWS = 4: ~480 instructions per warp and 2 KiB, about
// what an SM can issue while HBM delivers them; measured 0.6 of the copy's bandwidth at
// G = 4, against 1.0 at G = 1). Here a block's query rows are one m16 tile, padded with
// zero rows, and both products run on mma.sync m16n8k16 with fp32 accumulators:
//
//     S (16, WARP_N)   = Q (16, HEAD_DIM) K^T            Q in registers, K by ldmatrix
//     P~               = exp2(S * scale_log2 - m_new)    rows g and g + 8 of each lane
//     acc (16, HEAD_DIM) = alpha * acc + P~ V           P~ rounded to T, V by ldmatrix.trans
//
// so a key costs the same for 1 or 16 rows: per warp and WARP_N keys (8 KiB of K and V),
// 2 * HEAD_DIM / 8 * WARP_N / 16 mma (32 at d = 128), 2 * WARP_N * HEAD_DIM / 256 ldmatrix.x4,
// and ~60 softmax instructions, against ~1900 for the SIMT loop at ROWS = 4.
//
//   grid:  as the SIMT kernel's (row chunks of 16 rows)
//   block: NUM_WARPS = 4 warps, each with a pipeline of its own: tile j of the block is
//          BLOCK_N keys, warp w's WARP_N of them at j * BLOCK_N + w * WARP_N; its lanes copy
//          them global -> shared (16-byte cp.async, rows XOR-swizzled so that ldmatrix is
//          free of bank conflicts) STAGES tiles deep, one commit group per tile. A warp
//          reads only its own stages: cp.async.wait_group then __syncwarp orders copy and
//          use, with no block barrier inside the loop.
//   end:   the warps' (m_i, l_i, acc) merge as the SIMT kernel's (merge_warps_and_store).
// ----------------------------------------------------------------------------------------
template <typename T, int HEAD_DIM>
struct DecodeMmaTraits {
    using Acc = float;
    static constexpr int ROWS = 16;                  // query rows per block: one m16 tile
    static constexpr int BLOCK_ROWS = ROWS;
    static constexpr int NUM_WARPS = 4;
    static constexpr int NUM_THREADS = 32 * NUM_WARPS;
    static constexpr int MIN_BLOCKS = 2;             // ~200 registers: two blocks per SM
    static constexpr int VEC = 8;                    // elements per 16-byte vector
    static constexpr int D_VECS = HEAD_DIM / VEC;    // vectors per row
    // Keys per warp and tile: 8 KiB of K and V per warp and stage for every head dim
    static constexpr int WARP_N = 2048 / HEAD_DIM;
    static constexpr int BLOCK_N = NUM_WARPS * WARP_N;
    static constexpr int S_N_TILES = WARP_N / 8;     // n8 tiles of S
    static constexpr int QK_K_STEPS = HEAD_DIM / 16; // k16 steps of Q K^T
    static constexpr int PV_K_STEPS = WARP_N / 16;   // k16 steps of P V
    static constexpr int O_N_TILES = HEAD_DIM / 8;   // n8 tiles of acc
    static constexpr int TILE_VECS = WARP_N * D_VECS;  // vectors of K (or V) per warp tile
    static constexpr int LANE_VECS = TILE_VECS / 32;             // of them per lane
    // Two stages: 32 KiB of K and V in flight per block while its warps compute, 64 KiB
    // while they wait. Three (64 / 96 KiB) read 1.5-2.3% slower at batch 16 on an H100 (one
    // block per SM; G = 2, 4, 8; 8k and 32k keys) and were no faster at batch 1 and 4
    // (benchmarks/NOTES.md, session 17): more bytes in flight is not always more bandwidth.
    static constexpr int STAGES = 2;
    static constexpr int WARP_STAGE_BYTES = 2 * TILE_VECS * 16;  // K, then V
    static constexpr int PIPE_BYTES = STAGES * NUM_WARPS * WARP_STAGE_BYTES;
    static constexpr int INFLIGHT_BYTES = (STAGES - 1) * NUM_WARPS * WARP_STAGE_BYTES;
    static constexpr int MERGE_BYTES = (NUM_WARPS * ROWS * HEAD_DIM + 2 * NUM_WARPS * ROWS) * 4;
    static constexpr int SMEM_BYTES =
        (PIPE_BYTES > MERGE_BYTES ? PIPE_BYTES : MERGE_BYTES) + DECODE_PIPE_ALIGN;
    // The XOR swizzle: the 8 rows one ldmatrix phase reads (same logical vector column)
    // land in 8 different 16-byte bank groups. Rows of 8 or more vectors XOR the column
    // with row % 8; rows of 4 vectors (two per 128 bytes) with (row / 2) % 4.
    static constexpr int SWIZZLE_ROWS = D_VECS >= 8 ? 1 : 8 / D_VECS;  // rows per swizzle step
    static constexpr int SWIZZLE_MASK = (D_VECS >= 8 ? 8 : D_VECS) - 1;

    static_assert(sizeof(T) == 2, "fp16 or bf16");
    static_assert(HEAD_DIM == 32 || HEAD_DIM == 64 || HEAD_DIM == 128,
                  "the tensor-core kernel takes HEAD_DIM 32, 64 or 128");
    static_assert(WARP_N % 16 == 0 && TILE_VECS % 32 == 0 && 32 % D_VECS == 0, "tile shape");
    static_assert(O_N_TILES % 2 == 0 && S_N_TILES % 2 == 0, "ldmatrix.x4 loads n-tile pairs");
    static_assert(SMEM_BYTES <= 99 * 1024, "must fit the smallest opt-in shared memory (sm_86)");
};

namespace decode {

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// d += a b for one m16n8k16 tile: a row-major (4 registers), b column-major (2), fp32 d.
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                          unsigned b1, __half) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                          unsigned b1, __nv_bfloat16) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two T in one register, x in the low half.
__device__ __forceinline__ unsigned pack2(__half x, __half y) {
    return static_cast<unsigned>(__half_as_ushort(x))
           | (static_cast<unsigned>(__half_as_ushort(y)) << 16);
}
__device__ __forceinline__ unsigned pack2(__nv_bfloat16 x, __nv_bfloat16 y) {
    return static_cast<unsigned>(__bfloat16_as_ushort(x))
           | (static_cast<unsigned>(__bfloat16_as_ushort(y)) << 16);
}
__device__ __forceinline__ unsigned pack2_rn(float x, float y, __half) {
    return pack2(__float2half_rn(x), __float2half_rn(y));
}
__device__ __forceinline__ unsigned pack2_rn(float x, float y, __nv_bfloat16) {
    return pack2(__float2bfloat16_rn(x), __float2bfloat16_rn(y));
}

// 2^x on the special-function unit (2^-inf = 0); P~ is rounded to T right after.
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

}  // namespace decode

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(DecodeMmaTraits<T, HEAD_DIM>::NUM_THREADS,
                                  DecodeMmaTraits<T, HEAD_DIM>::MIN_BLOCKS)
flash_decode_mma(const DecodeParams p) {
    using Tr = DecodeMmaTraits<T, HEAD_DIM>;
    constexpr int ROWS = Tr::ROWS, NUM_WARPS = Tr::NUM_WARPS, NUM_THREADS = Tr::NUM_THREADS;
    constexpr int VEC = Tr::VEC, D_VECS = Tr::D_VECS, WARP_N = Tr::WARP_N;
    constexpr int BLOCK_N = Tr::BLOCK_N, STAGES = Tr::STAGES, LANE_VECS = Tr::LANE_VECS;
    constexpr int S_N_TILES = Tr::S_N_TILES, O_N_TILES = Tr::O_N_TILES;
    constexpr int QK_K_STEPS = Tr::QK_K_STEPS, PV_K_STEPS = Tr::PV_K_STEPS;
    constexpr int TILE_BYTES = Tr::TILE_VECS * 16;   // K (or V) of one warp tile

    unsigned dynamic_smem;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dynamic_smem));
    static_assert(Tr::SMEM_BYTES - DECODE_PIPE_ALIGN >= decode::combine_smem_bytes<float>(NUM_THREADS),
                  "the splits' merge fits in the shared memory");
    if (dynamic_smem < static_cast<unsigned>(Tr::SMEM_BYTES) || blockDim.x != NUM_THREADS)
        __trap();
    // nothing global is touched before the grid before this one has completed (PDL)
    decode::wait_for_previous_grid();
    decode::allow_next_grid();

    // -- which block: (b, hk, split, row chunk), as the SIMT kernel's
    const int G = static_cast<int>(p.G), M = static_cast<int>(p.M);
    const decode::BlockCoords coords = decode::block_coords(p);
    const int rc = coords.rc, split = coords.split, hk = coords.hk;
    const long long b = coords.b;
    if (b >= p.B) return;

    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;

    // -- this split's keys, in whole tiles of BLOCK_N
    const int n = decode::keys_attended(p, b);
    const int n_tiles = (n + BLOCK_N - 1) / BLOCK_N;
    const int num_splits = static_cast<int>(p.num_splits);
    const int tiles_per_split = (n_tiles + num_splits - 1) / num_splits;
    const int k_begin = split * tiles_per_split * BLOCK_N;
    const int k_end = min(k_begin + tiles_per_split * BLOCK_N, n);
    const int num_tiles = k_end > k_begin ? (k_end - k_begin + BLOCK_N - 1) / BLOCK_N : 0;

    // -- a lane's copies: vector i of its warp tile is (key i * 32 / D_VECS + lane / D_VECS,
    // column vector lane % D_VECS): the same column in every key, 32 / D_VECS keys per
    // instruction, each row read whole by consecutive lanes
    const bool paged = p.page_size > 0;
    const int* table_row = paged ? p.block_table + b * p.table_stride : nullptr;
    const T* k_base = static_cast<const T*>(p.k) + hk * p.k_head_stride
                      + (paged ? 0 : b * p.k_page_stride);
    const T* v_base = static_cast<const T*>(p.v) + hk * p.v_head_stride
                      + (paged ? 0 : b * p.v_page_stride);
    const bool k_vec = p.k_vectorized != 0, v_vec = p.v_vectorized != 0;
    const int D = static_cast<int>(p.D), Dv = static_cast<int>(p.Dv);
    const int copy_col = lane % D_VECS;                      // this lane's column vector
    const int copy_key = lane / D_VECS;                      // its key in each group
    constexpr int KEYS_PER_COPY = 32 / D_VECS;               // keys per copy instruction
    const int k_bytes = max(0, min(D - copy_col * VEC, VEC)) * 2;  // 0: zero-filled
    const int v_bytes = max(0, min(Dv - copy_col * VEC, VEC)) * 2;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    // (NUM_WARPS, STAGES, K then V, WARP_N keys, D_VECS swizzled vectors): this warp's part
    const unsigned warp_pipe = decode::aligned_pipe(smem_raw) + warp * STAGES * Tr::WARP_STAGE_BYTES;
    auto swizzled = [](int key, int col) {                   // byte offset in a K or V tile
        return (key * D_VECS + (col ^ ((key / Tr::SWIZZLE_ROWS) & Tr::SWIZZLE_MASK))) * 16;
    };

    // A contiguous cache of 16-byte rows (the common case) takes a short path: one
    // address per lane and tile, a constant step per key, no branch per vector.
    const bool direct = !paged && k_vec && v_vec;
    const long long k_step = KEYS_PER_COPY * p.k_token_stride;
    const long long v_step = KEYS_PER_COPY * p.v_token_stride;

    // Start copying this warp's part of tile j into stage j % STAGES.
    auto load_tile = [&](int j) {
        if (j < num_tiles && direct) {
            const unsigned stage = warp_pipe + (j % STAGES) * Tr::WARP_STAGE_BYTES;
            const int t0 = k_begin + j * BLOCK_N + warp * WARP_N + copy_key;  // key i = 0
            const T* k_row = k_base + static_cast<long long>(t0) * p.k_token_stride
                             + copy_col * VEC;
            const T* v_row = v_base + static_cast<long long>(t0) * p.v_token_stride
                             + copy_col * VEC;
#pragma unroll
            for (int i = 0; i < LANE_VECS; ++i) {  // (no address past a row is formed)
                const bool valid = t0 + i * KEYS_PER_COPY < k_end;
                const bool k_valid = valid && k_bytes > 0, v_valid = valid && v_bytes > 0;
                const unsigned dst = stage + swizzled(i * KEYS_PER_COPY + copy_key, copy_col);
                decode::cp_async_16(dst, k_valid ? k_row + i * k_step : p.k,
                                    k_valid ? k_bytes : 0);
                decode::cp_async_16(dst + TILE_BYTES, v_valid ? v_row + i * v_step : p.v,
                                    v_valid ? v_bytes : 0);
            }
        } else if (j < num_tiles) {  // paged, or rows copied element by element
            const unsigned stage = warp_pipe + (j % STAGES) * Tr::WARP_STAGE_BYTES;
            const int t_first = k_begin + j * BLOCK_N + warp * WARP_N;
#pragma unroll
            for (int i = 0; i < LANE_VECS; ++i) {
                const int key = i * KEYS_PER_COPY + copy_key;
                const int t = t_first + key;
                const bool valid = t < k_end;
                const auto rows = decode::key_rows(p, k_base, v_base, paged, table_row, t, valid);
                const T* k_row = rows.k;
                const T* v_row = rows.v;
                // every vector is written (zeros past D, Dv and k_end): ldmatrix reads all
                const unsigned dst = stage + swizzled(key, copy_col);
                decode::copy_vec(dst, k_row, p.k_dim_stride, copy_col * VEC, k_bytes, D,
                                 valid && k_bytes > 0, k_vec, p.k);
                decode::copy_vec(dst + TILE_BYTES, v_row, p.v_dim_stride, copy_col * VEC, v_bytes,
                                 Dv, valid && v_bytes > 0, v_vec, p.v);
            }
        }
        decode::cp_async_commit();  // one group per tile, possibly empty: wait counts match
    };

    // Fragment coordinates: a lane holds rows g and g + 8 of the m16 tile, columns
    // 2 * t4 + {0, 1} of each n8 tile (k16 step: and + 8).
    const int g = lane / 4, t4 = lane % 4;

    // q's elements, rows rc * 16 + {g, g + 8} (zero rows past M, zero columns past D),
    // loaded before the first tiles' copies are queued ahead of them: the loop, which
    // issues the next tile, waits for q. Loaded after (an H100 at batch 1, 32/8 heads,
    // session 17's timeline), the first tile was used 4.3-5.5 us after a block's start;
    // loaded before, 3.2-3.7 us.
    T q_el[QK_K_STEPS][8];
    {
        const T* qb = static_cast<const T*>(p.q) + b * p.q_batch_stride;
        const T* q_rows[2];
        bool row_valid[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = rc * ROWS + g + 8 * h;
            row_valid[h] = row < M;
            q_rows[h] = qb + (row / G) * p.q_token_stride + (hk * G + row % G) * p.q_head_stride;
        }
        auto q_at = [&](int h, int c) {
            return row_valid[h] && c < D ? q_rows[h][c * p.q_dim_stride] : T(0.0f);
        };
#pragma unroll
        for (int ks = 0; ks < QK_K_STEPS; ++ks) {
            const int c = ks * 16 + 2 * t4;
#pragma unroll
            for (int e = 0; e < 8; ++e)   // (row h, column c + 8 * (e / 4) + e % 2)
                q_el[ks][e] = q_at((e / 2) % 2, c + 8 * (e / 4) + e % 2);
        }
    }

    // -- prologue: the first STAGES - 1 tiles on their way
#pragma unroll
    for (int j = 0; j < STAGES - 1; ++j) load_tile(j);

    // q_frag: the A operand of every k16 step of Q K^T, as T (unscaled: the scale
    // multiplies S in fp32)
    unsigned q_frag[QK_K_STEPS][4];
#pragma unroll
    for (int ks = 0; ks < QK_K_STEPS; ++ks)
#pragma unroll
        for (int i = 0; i < 4; ++i)
            q_frag[ks][i] = decode::pack2(q_el[ks][2 * i], q_el[ks][2 * i + 1]);
    const float scale_log2 = static_cast<float>(p.scale_log2);
    // causal: row r (token (rc * 16 + r) / G) sees key t iff t <= its diag
    const int Lq = static_cast<int>(p.Lq);
    int diag[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) diag[h] = (rc * ROWS + g + 8 * h) / G + n - Lq;
    const int diag0 = rc * ROWS / G + n - Lq;  // the block's smallest

    float m_i[2] = {-INFINITY, -INFINITY};  // running max of rows g, g + 8 (log2 units)
    float l_i[2] = {0.0f, 0.0f};            // running sum over this lane's columns
    float acc[O_N_TILES][4];                // unnormalised out, (16, HEAD_DIM) as n8 tiles
#pragma unroll
    for (int nt = 0; nt < O_N_TILES; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] = 0.0f;

    // ldmatrix addresses within a tile: lane l gives row l % 8 of matrix l / 8.
    // K (non-transposed, rows = keys): matrices (keys +0/+8) x (columns +0/+8), key-pair first
    const int k_ld_key = (lane / 16) * 8 + lane % 8, k_ld_col = (lane / 8) % 2;
    // V (transposed, rows = keys): matrices (keys +0/+8) x (columns +0/+8), key half first
    const int v_ld_key = ((lane / 8) % 2) * 8 + lane % 8, v_ld_col = lane / 16;

    for (int j = 0; j < num_tiles; ++j) {
        // Every lane is done reading tile j - 1's stage (the first barrier), which is
        // refilled with tile j + STAGES - 1 while the warp waits for tile j: all STAGES
        // tiles in flight. This lane's copies of tile j have landed; after the second
        // barrier every lane's have.
        __syncwarp();
        load_tile(j + STAGES - 1);
        decode::cp_async_wait<STAGES - 1>();
        __syncwarp();
        const unsigned k_tile = warp_pipe + (j % STAGES) * Tr::WARP_STAGE_BYTES;
        const unsigned v_tile = k_tile + TILE_BYTES;
        const int t_first = k_begin + j * BLOCK_N + warp * WARP_N;  // this warp's first key

        // -- S = Q K^T (fp32), then * scale_log2
        float s[S_N_TILES][4];
#pragma unroll
        for (int nt = 0; nt < S_N_TILES; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < QK_K_STEPS; ++ks)
#pragma unroll
            for (int np = 0; np < S_N_TILES / 2; ++np) {
                unsigned kb[4];  // b0, b1 of n-tiles 2 np and 2 np + 1
                decode::ldmatrix_x4(kb, k_tile + swizzled(np * 16 + k_ld_key, ks * 2 + k_ld_col));
                decode::mma_16816(s[2 * np], q_frag[ks], kb[0], kb[1], T());
                decode::mma_16816(s[2 * np + 1], q_frag[ks], kb[2], kb[3], T());
            }
#pragma unroll
        for (int nt = 0; nt < S_N_TILES; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] *= scale_log2;

        // -- keys past the split's end, and above a row's diagonal when causal, score -inf;
        // only the last tile and tiles that reach the diagonal need it
        const int t_last = t_first + WARP_N - 1;
        if (t_last >= k_end || (p.causal && t_last > diag0)) {
#pragma unroll
            for (int nt = 0; nt < S_N_TILES; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int t = t_first + nt * 8 + 2 * t4 + (e & 1);
                    if (t >= k_end || (p.causal && t > diag[e / 2])) s[nt][e] = -INFINITY;
                }
        }

        // -- update m_i and l_i; P~ = exp2(S - m_new); rescale acc by alpha = exp2(m_i - m_new)
        float m_new[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            m_new[h] = m_i[h];
#pragma unroll
            for (int nt = 0; nt < S_N_TILES; ++nt)
                m_new[h] = fmaxf(m_new[h], fmaxf(s[nt][2 * h], s[nt][2 * h + 1]));
            m_new[h] = fmaxf(m_new[h], __shfl_xor_sync(0xffffffffu, m_new[h], 1));  // the quad
            m_new[h] = fmaxf(m_new[h], __shfl_xor_sync(0xffffffffu, m_new[h], 2));  // holds a row
        }
        // rescale only when some row's max grew (after the first tiles, rarely); a row whose
        // max stayed -inf shifts by 0: exp2(-inf) = 0, never exp2(-inf + inf) = NaN
        const float m_safe[2] = {safe_max(m_new[0]), safe_max(m_new[1])};
        if (__any_sync(0xffffffffu, m_new[0] > m_i[0] || m_new[1] > m_i[1])) {
            const float alpha[2] = {decode::exp2_approx(m_i[0] - m_safe[0]),
                                    decode::exp2_approx(m_i[1] - m_safe[1])};
#pragma unroll
            for (int h = 0; h < 2; ++h) l_i[h] *= alpha[h];
#pragma unroll
            for (int nt = 0; nt < O_N_TILES; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[nt][e] *= alpha[e / 2];
        }
        m_i[0] = m_new[0];
        m_i[1] = m_new[1];
#pragma unroll
        for (int nt = 0; nt < S_N_TILES; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[nt][e] = decode::exp2_approx(s[nt][e] - m_safe[e / 2]);  // s now holds P~
                l_i[e / 2] += s[nt][e];
            }

        // -- acc += P~ V: P~'s n8 tiles 2 kk, 2 kk + 1 are the A operand of k16 step kk
#pragma unroll
        for (int kk = 0; kk < PV_K_STEPS; ++kk) {
            unsigned pa[4];
            pa[0] = decode::pack2_rn(s[2 * kk][0], s[2 * kk][1], T());
            pa[1] = decode::pack2_rn(s[2 * kk][2], s[2 * kk][3], T());
            pa[2] = decode::pack2_rn(s[2 * kk + 1][0], s[2 * kk + 1][1], T());
            pa[3] = decode::pack2_rn(s[2 * kk + 1][2], s[2 * kk + 1][3], T());
#pragma unroll
            for (int dp = 0; dp < O_N_TILES / 2; ++dp) {
                unsigned vb[4];  // b0, b1 of n-tiles 2 dp and 2 dp + 1
                decode::ldmatrix_x4_trans(vb, v_tile + swizzled(kk * 16 + v_ld_key,
                                                                 dp * 2 + v_ld_col));
                decode::mma_16816(acc[2 * dp], pa, vb[0], vb[1], T());
                decode::mma_16816(acc[2 * dp + 1], pa, vb[2], vb[3], T());
            }
        }
    }

    // -- the rows' sums over the quad's columns
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        l_i[h] += __shfl_xor_sync(0xffffffffu, l_i[h], 1);
        l_i[h] += __shfl_xor_sync(0xffffffffu, l_i[h], 2);
    }

    // -- merge the warps through shared memory (the pipeline's, now idle)
    decode::cp_async_wait<0>();
    // every thread's copies have landed and every warp is done reading its stages
    __syncthreads();
    float* acc_s = reinterpret_cast<float*>(smem_raw);   // (NUM_WARPS, ROWS, HEAD_DIM)
    float* m_s = acc_s + NUM_WARPS * ROWS * HEAD_DIM;     // (NUM_WARPS, ROWS)
    float* l_s = m_s + NUM_WARPS * ROWS;                  // (NUM_WARPS, ROWS)
#pragma unroll
    for (int nt = 0; nt < O_N_TILES; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
            acc_s[(warp * ROWS + g + 8 * (e / 2)) * HEAD_DIM
                  + decode::merge_col<HEAD_DIM>(g + 8 * (e / 2), nt * 8 + 2 * t4 + (e & 1))] =
                acc[nt][e];
    if (t4 == 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            m_s[warp * ROWS + g + 8 * h] = m_i[h];
            l_s[warp * ROWS + g + 8 * h] = l_i[h];
        }
    }
    // every warp's (m, l, acc) is in shared memory
    __syncthreads();
    decode::merge_warps_and_store<T, HEAD_DIM, ROWS, NUM_WARPS>(p, smem_raw, b, hk, split, rc);
}

// ----------------------------------------------------------------------------------------
// The cluster kernel (sm_90): one query row per kv head (G * Lq = 1), fp16/bf16, a
// contiguous cache of 16-byte rows, and few (batch, kv head) pairs: clusters on at most
// half the SMs, batch 1 at 8 kv heads (_cupy_decode.uses_cluster). The CLUSTER splits of a kv head are one thread-block
// cluster and merge in block 0's shared memory instead of through L2:
//
//   grid:  B * Hk clusters of CLUSTER blocks; block s of cluster (b, hk) reads keys
//          [s * C, (s + 1) * C) of its n_b keys, C = ceil(n_b / (CLUSTER * BLOCK_N)) tiles
//   start: with every n_b equal (the host's uniform_keys, then prefetch_keys > 0), the
//          first tiles are prefetched to L2 before the PDL wait, while the grid before
//          ends; then q, then the first copies. Such a grid allows the next one only
//          when ALLOW_LEFT tiles of its block remain, so that the next grid's blocks
//          arrive, and prefetch, as this grid's reads end and the DRAM would go idle
//   block: 8 warps; the LANES_PER_KEY = HEAD_DIM / 8 lanes of a key own one 16-byte
//          vector (8 columns) each of its K and V rows; a tile is BLOCK_N keys, KEYS per
//          thread, copied by the thread itself (cp.async, STAGES deep) and read back only
//          by it, so no barrier in the loop, as in flash_decode:
//
//     S[t]   = sum over the key's lanes of q[lane's columns] . K[t, lane's columns]
//     m_new  = max(m, max_t S[t]) over the warp;  P~ = exp2(S - m_new);  alpha = exp2(m - m_new)
//     l      = alpha * l + sum_t P~[t];  acc = alpha * acc + sum_t P~[t] V[t, lane's columns]
//
//   end:   the key groups of a warp (shuffles), then the warps (shared memory), then every
//          block's (m, l, acc) goes to block 0 by st.async, which counts its bytes on an
//          mbarrier of block 0 (complete_tx), with no fence and no wait for the stores;
//          block 0 waits for all CLUSTER * (HEAD_DIM + 2) words, merges them through the
//          lse and writes out and lse; then the cluster leaves together.
//
// Why (benchmarks/NOTES.md, session 19; H100, batch 1, 8k keys, 8 kv heads of 128, bf16):
// the reads alone take ~12.2 us; merging splits through L2 (fence, counter, loads) adds
// ~2.6 us after the last key even with nothing else to do (read_skeleton.py's merge
// tails). A cluster of 8 blocks with 96 KiB of tiles each runs one block per SM and reads
// at the rate of 16 splits of flash_decode, and its st.async merge adds ~0.6 us. The
// first tile took ~1.8 us to arrive from DRAM (session 19's timeline), hence the prefetch.
// Prefetched by blocks that arrive with the grid before (allowed at its start), the rows
// were gone from L2 by the time they were read, and the call was 0.6-0.8 us slower;
// prefetched ~2.5 us before they are read (allowed with 2 tiles left), the call was
// 0.5 us faster (session 21, cluster_decode.py CL_TRIGGER=1).
// Clusters of 12 or 16, or blocks that an SM holds two of, got two blocks of a cluster
// on one SM (session 15); so did batch 2 (128 blocks: 7-31% slower than flash_decode).
// ----------------------------------------------------------------------------------------
// Lab parameters (benchmarks/decode_prefetch.py; the launcher uses the defaults): CLUSTER
// = 1 runs the same loop as a one-split kernel, one block per (b, hk) in clusters of one,
// with STAGES 2..4, against flash_decode at batch 16; ALLOW_LEFT: the tiles left when a
// prefetching grid allows the next one.
template <typename T, int HEAD_DIM, int CLUSTER_ = 8, int STAGES_ = 3, int ALLOW_LEFT_ = 2>
struct DecodeClusterTraits {
    using Acc = float;
    static constexpr int CLUSTER = CLUSTER_;               // splits of a kv head (portable size)
    static constexpr int NUM_WARPS = 8;
    static constexpr int NUM_THREADS = 32 * NUM_WARPS;
    static constexpr int VEC = 8;                          // elements per 16-byte vector
    static constexpr int LANES_PER_KEY = HEAD_DIM / VEC;   // 8, 16 or 32
    static constexpr int KEYS_PER_PASS = NUM_THREADS / LANES_PER_KEY;
    static constexpr int KEYS = 4;                         // keys per thread and tile
    static constexpr int BLOCK_N = KEYS_PER_PASS * KEYS;   // a tile: 16 KiB of K, 16 of V
    static constexpr int STAGES = STAGES_;                 // 3: 64 KiB in flight while computing
    static constexpr int ALLOW_LEFT = ALLOW_LEFT_;         // see "start" above
    static constexpr int SMEM_BYTES = STAGES * 2 * KEYS * NUM_THREADS * 16 + DECODE_PIPE_ALIGN;
    static constexpr int MERGE_WORDS = CLUSTER * (HEAD_DIM + 2);  // what block 0 receives
    static_assert(sizeof(T) == 2, "fp16 or bf16");
    static_assert(HEAD_DIM == 64 || HEAD_DIM == 128 || HEAD_DIM == 256, "head dim 64, 128, 256");
    static_assert(NUM_WARPS * (HEAD_DIM + 2) * 4 <= SMEM_BYTES - DECODE_PIPE_ALIGN,
                  "the warps' merge fits in the pipeline's shared memory");
    static_assert(HEAD_DIM <= NUM_THREADS, "a thread per column in the merges");
};

namespace decode {

// The address in block 0's shared memory (cluster window) of this block's variable at
// `local_shared_address`: static shared variables sit at the same offset in every block.
__device__ __forceinline__ unsigned cluster_rank0(unsigned local_shared_address) {
    unsigned remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, 0;\n" : "=r"(remote) : "r"(local_shared_address));
    return remote;
}

// `bytes` (a multiple of 16) at `src` (16-byte aligned, global) from DRAM into L2, by the
// TMA unit; nothing comes back to the thread.
__device__ __forceinline__ void prefetch_l2(const void* src, unsigned bytes) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n"
                 :: "l"(__cvta_generic_to_global(src)), "r"(bytes) : "memory");
}

// One word into block 0's shared memory (st.async), counted on block 0's mbarrier.
__device__ __forceinline__ void send_to_rank0(const float* local_word, float x, unsigned mbar) {
    const unsigned dst = cluster_rank0(static_cast<unsigned>(__cvta_generic_to_shared(local_word)));
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.f32 [%0], %1, [%2];\n"
                 :: "r"(dst), "f"(x), "r"(mbar) : "memory");
}

}  // namespace decode

template <typename T, int HEAD_DIM, int CLUSTER_ = 8, int STAGES_ = 3, int ALLOW_LEFT_ = 2>
__global__ void __launch_bounds__(DecodeClusterTraits<T, HEAD_DIM>::NUM_THREADS, 1)
flash_decode_cluster(const DecodeParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    using Tr = DecodeClusterTraits<T, HEAD_DIM, CLUSTER_, STAGES_, ALLOW_LEFT_>;
    using Math = DecodeMath<T>;
    constexpr int CLUSTER = Tr::CLUSTER, NUM_WARPS = Tr::NUM_WARPS, NUM_THREADS = Tr::NUM_THREADS;
    constexpr int VEC = Tr::VEC, LANES_PER_KEY = Tr::LANES_PER_KEY, KEYS = Tr::KEYS;
    constexpr int KEYS_PER_PASS = Tr::KEYS_PER_PASS, BLOCK_N = Tr::BLOCK_N, STAGES = Tr::STAGES;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    __shared__ __align__(16) float merge_acc[CLUSTER * HEAD_DIM];  // block 0's: every split's
    __shared__ float merge_m[CLUSTER], merge_l[CLUSTER];
    __shared__ __align__(8) unsigned long long merge_bar;           // counts their bytes

    unsigned dynamic_smem, cluster_size, rank;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dynamic_smem));
    asm("mov.u32 %0, %%cluster_nctarank;" : "=r"(cluster_size));
    asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));   // the split
    if (dynamic_smem < static_cast<unsigned>(Tr::SMEM_BYTES) || blockDim.x != NUM_THREADS
        || cluster_size != CLUSTER)
        __trap();
    const unsigned bar = static_cast<unsigned>(__cvta_generic_to_shared(&merge_bar));
    if (rank == 0 && threadIdx.x == 0) {   // one arrival (here) and MERGE_WORDS words to come
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" :: "r"(bar) : "memory");
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n"
                     :: "r"(bar), "r"(Tr::MERGE_WORDS * 4) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    // the cluster barrier's first phase, waited for before the merge: block 0 has started
    // and initialised its mbarrier before anyone sends to it
    asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int lv = tid % LANES_PER_KEY;       // this thread's vector of a row
    const int kt = tid / LANES_PER_KEY;       // its key in a pass of the block
    const int unit = blockIdx.x / CLUSTER;    // (b, hk)
    const int hk = unit % static_cast<int>(p.Hk);
    const long long b = unit / static_cast<int>(p.Hk);
    const T* k_head = static_cast<const T*>(p.k) + b * p.k_page_stride + hk * p.k_head_stride;
    const T* v_head = static_cast<const T*>(p.v) + b * p.v_page_stride + hk * p.v_head_stride;
    // split `rank` reads keys [rank * C, (rank + 1) * C) of the n_b, C = chunk(n_b) whole tiles
    const auto chunk = [](int n) {
        return (n + CLUSTER * BLOCK_N - 1) / (CLUSTER * BLOCK_N) * BLOCK_N;
    };

    // -- before the PDL wait, with the host's length: the split's first prefetch_keys
    // keys of K and V into L2, one bulk prefetch per row, while the grid before ends;
    // after the wait the first tiles' copies find them there. Safe whatever that grid
    // writes (an append): a prefetch gives the block no value, and L2 is where every
    // write lands.
    const bool prefetching = p.prefetch_keys > 0;
    if (prefetching) {
        const int n = static_cast<int>(p.uniform_keys);
        const int t0 = static_cast<int>(rank) * chunk(n);
        const int rows = min(min(n, t0 + chunk(n)) - t0, static_cast<int>(p.prefetch_keys));
        for (int r = tid; r < 2 * rows; r += NUM_THREADS) {   // key r / 2: K, then V
            const int t = t0 + r / 2;
            decode::prefetch_l2(r % 2 ? v_head + t * p.v_token_stride : k_head + t * p.k_token_stride,
                                HEAD_DIM * sizeof(T));
        }
    }
    decode::wait_for_previous_grid();
    if (!prefetching) decode::allow_next_grid();   // else with ALLOW_LEFT tiles left

    // q first (its loads then return before the first tile's), and the sequence's length
    const T* q_row = static_cast<const T*>(p.q) + b * p.q_batch_stride + hk * p.q_head_stride;
    T q_raw[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) q_raw[e] = q_row[(lv * VEC + e) * p.q_dim_stride];
    const int n = decode::keys_attended(p, b);
    const int k0 = static_cast<int>(rank) * chunk(n);
    const int k1 = min(n, k0 + chunk(n));
    const int num_tiles = k1 > k0 ? (k1 - k0 + BLOCK_N - 1) / BLOCK_N : 0;

    const T* k_base = k_head + lv * VEC;
    const T* v_base = v_head + lv * VEC;
    const unsigned pipe = decode::aligned_pipe(smem_raw) + tid * 16;
    auto slot = [&](int stage, int i) {  // i < KEYS: K of key i, else V of key i - KEYS
        return pipe + (stage * 2 * KEYS + i) * (NUM_THREADS * 16);
    };
    auto load_tile = [&](int j) {
        if (j < num_tiles) {
            const int stage = j % STAGES;
#pragma unroll
            for (int i = 0; i < KEYS; ++i) {
                const int t = k0 + j * BLOCK_N + kt + i * KEYS_PER_PASS;
                const bool valid = t < k1;
                decode::cp_async_16(slot(stage, i),
                    valid ? static_cast<const void*>(k_base + t * p.k_token_stride) : p.k,
                    valid ? 16 : 0);
                decode::cp_async_16(slot(stage, KEYS + i),
                    valid ? static_cast<const void*>(v_base + t * p.v_token_stride) : p.v,
                    valid ? 16 : 0);
            }
        }
        decode::cp_async_commit();  // one group per tile, possibly empty: wait counts match
    };
#pragma unroll
    for (int j = 0; j < STAGES - 1; ++j) load_tile(j);

    float q[VEC];   // times scale * log2(e): scores in log2 units
#pragma unroll
    for (int e = 0; e < VEC; ++e) q[e] = Math::to_acc(q_raw[e]) * static_cast<float>(p.scale_log2);
    float m = -INFINITY, l = 0.f, acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0.f;

    for (int j = 0; j < num_tiles; ++j) {
        if (prefetching && j == max(num_tiles - Tr::ALLOW_LEFT, 0)) decode::allow_next_grid();
        // the slot of tile j - 1, read and used in the previous iteration, is refilled first
        load_tile(j + STAGES - 1);
        decode::cp_async_wait<STAGES - 1>();
        const int stage = j % STAGES;

        float s[KEYS];   // S of this thread's keys, summed over the key's lanes
#pragma unroll
        for (int i = 0; i < KEYS; ++i) {
            const decode::Vec16<T> x = decode::lds_vec16<T>(slot(stage, i));
            s[i] = 0.f;
#pragma unroll
            for (int e = 0; e < VEC; ++e) s[i] += q[e] * Math::to_acc(x.v[e]);
#pragma unroll
            for (int mask = 1; mask < LANES_PER_KEY; mask *= 2)
                s[i] += __shfl_xor_sync(0xffffffffu, s[i], mask);
        }
        if (j == num_tiles - 1) {   // keys past the split's end score -inf
#pragma unroll
            for (int i = 0; i < KEYS; ++i)
                if (k0 + j * BLOCK_N + kt + i * KEYS_PER_PASS >= k1) s[i] = -INFINITY;
        }
        float m_new = m;
#pragma unroll
        for (int i = 0; i < KEYS; ++i) m_new = fmaxf(m_new, s[i]);
#pragma unroll
        for (int mask = LANES_PER_KEY; mask < 32; mask *= 2)   // over the warp's keys
            m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffffu, m_new, mask));
        const float m_safe = safe_max(m_new);   // -inf only before any key: exp2 gives 0
        if (m_new > m) {   // rescale only when the max grew (m is the warp's: no divergence)
            const float alpha = exp2f(m - m_safe);
            l *= alpha;
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[e] *= alpha;
        }
        m = m_new;
#pragma unroll
        for (int i = 0; i < KEYS; ++i) {
            const float p_i = exp2f(s[i] - m_safe);
            l += p_i;
            const decode::Vec16<T> y = decode::lds_vec16<T>(slot(stage, KEYS + i));
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[e] += p_i * Math::to_acc(y.v[e]);
        }
    }

    if (prefetching && num_tiles == 0) decode::allow_next_grid();   // an empty split

    // -- the warp's key groups (same columns, other keys, the same m)
#pragma unroll
    for (int mask = LANES_PER_KEY; mask < 32; mask *= 2) {
        l += __shfl_xor_sync(0xffffffffu, l, mask);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += __shfl_xor_sync(0xffffffffu, acc[e], mask);
    }
    // -- the warps, through the pipeline's shared memory (every copy landed and was read)
    decode::cp_async_wait<0>();
    __syncthreads();
    float* acc_s = reinterpret_cast<float*>(smem_raw);   // (NUM_WARPS, HEAD_DIM)
    float* m_s = acc_s + NUM_WARPS * HEAD_DIM;
    float* l_s = m_s + NUM_WARPS;
    if (lane < LANES_PER_KEY) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc_s[warp * HEAD_DIM + lv * VEC + e] = acc[e];
    }
    if (lane == 0) {
        m_s[warp] = m;
        l_s[warp] = l;
    }
    __syncthreads();
    asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");   // (the first phase)
    if (tid < HEAD_DIM) {   // column tid of this split: to block 0
        float mb = -INFINITY;
#pragma unroll
        for (int w = 0; w < NUM_WARPS; ++w) mb = fmaxf(mb, m_s[w]);
        const float mb_safe = safe_max(mb);
        float a = 0.f, lb = 0.f;
#pragma unroll
        for (int w = 0; w < NUM_WARPS; ++w) {
            const float weight = exp2f(m_s[w] - mb_safe);
            a += weight * acc_s[w * HEAD_DIM + tid];
            lb += weight * l_s[w];
        }
        const unsigned bar0 = decode::cluster_rank0(bar);
        decode::send_to_rank0(merge_acc + rank * HEAD_DIM + tid, a, bar0);
        if (tid == 0) {
            decode::send_to_rank0(merge_m + rank, mb, bar0);
            decode::send_to_rank0(merge_l + rank, lb, bar0);
        }
    }
    if (rank != 0) {
        // the cluster barrier's second phase: no block leaves before block 0 has merged,
        // so none leaves with its st.async in flight (the PTX ISA does not say that it
        // may; the wait costs nothing measurable at batch 1, 8k: 14.4-14.5 us either way)
        asm volatile("barrier.cluster.arrive.relaxed.aligned;\n"
                     "barrier.cluster.wait.aligned;\n" ::: "memory");
        return;
    }

    // -- block 0: every split's words have landed; out = sum_s w_s acc_s / sum_s w_s l_s
    unsigned done = 0;
    while (!done)
        asm volatile("{\n .reg .pred ready;\n"
                     " mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 ready, [%1], 0;\n"
                     " selp.u32 %0, 1, 0, ready;\n}\n" : "=r"(done) : "r"(bar) : "memory");
    if (tid < HEAD_DIM) {
        float mg = -INFINITY;
#pragma unroll
        for (int i = 0; i < CLUSTER; ++i) mg = fmaxf(mg, merge_m[i]);
        const float mg_safe = safe_max(mg);
        float num = 0.f, den = 0.f;
#pragma unroll
        for (int i = 0; i < CLUSTER; ++i) {   // fixed order: bitwise reproducible
            const float weight = exp2f(merge_m[i] - mg_safe);
            num += weight * merge_acc[i * HEAD_DIM + tid];
            den += weight * merge_l[i];
        }
        T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + hk * p.out_head_stride;
        out[tid] = Math::from_acc(den > 0.f ? num / den : 0.f);   // no key: zeros, lse -inf
        if (tid == 0)
            static_cast<float*>(p.lse)[(b * p.H + hk) * p.Lq] =
                den > 0.f ? Math::lse(mg_safe, den) : -INFINITY;
    }
    asm volatile("barrier.cluster.arrive.relaxed.aligned;\n"
                 "barrier.cluster.wait.aligned;\n" ::: "memory");
#else
    __trap();   // sm_90 only (the launcher never launches it below)
#endif
}

// ----------------------------------------------------------------------------------------
// The combine: out = sum_s exp(lse_s - lse) out_s, lse = M + log(sum_s exp(lse_s - M)),
// M = max_s lse_s, as merge_attention. A split with lse = -inf (it saw no key) adds
// nothing; every split -inf gives zeros and lse = -inf. Fixed order: bitwise reproducible.
// Grid: one block of COMBINE_THREADS per query row (b, hk, r), B * Hk * M blocks.
// ----------------------------------------------------------------------------------------
constexpr int COMBINE_THREADS = 128;
constexpr int COMBINE_MAX_SPLITS = 1024;  // the weights live in shared memory
constexpr int COMBINE_MAX_DV = 256;       // the largest head dim of the split kernel

template <typename T>
__global__ void __launch_bounds__(COMBINE_THREADS)
flash_decode_combine(const DecodeCombineParams p) {
    using Math = DecodeMath<T>;
    using Acc = typename Math::Acc;
    __shared__ Acc w_s[COMBINE_MAX_SPLITS];  // exp(lse_s - M)
    __shared__ Acc red[COMBINE_THREADS / 32];  // the warps' maxima, then their sums
    decode::wait_for_previous_grid();  // (PDL: the split kernel has completed)
    decode::allow_next_grid();

    // (32-bit: the launcher keeps every count below 2^31; 64-bit division is a call)
    const int M = static_cast<int>(p.M), G = static_cast<int>(p.G), Hk = static_cast<int>(p.Hk);
    const unsigned row_id = blockIdx.x;      // (b * Hk + hk) * M + r
    const int r = static_cast<int>(row_id % M);
    const long long bh = row_id / M;         // b * Hk + hk
    const int hk = static_cast<int>(bh % Hk);
    const long long b = bh / Hk;
    const int tid = threadIdx.x;
    const int S = static_cast<int>(p.num_splits);
    const Acc* lse_part = static_cast<const Acc*>(p.lse_partial) + bh * S * p.M + r;  // stride M
    const Acc* out_part = static_cast<const Acc*>(p.out_partial) + (bh * S * p.M + r) * p.partial_row;
    const long long split_stride = p.M * p.partial_row;

    constexpr int COMBINE_WARPS = COMBINE_THREADS / 32;
    const int warp = tid / 32, lane = tid % 32;

    // -- M = max_s lse_s: each thread over s = tid, tid + 128, ...; an xor butterfly per
    // warp, then the warps' maxima
    Acc m = -INFINITY;
    for (int s = tid; s < S; s += COMBINE_THREADS) m = fmax(m, lse_part[s * p.M]);
#pragma unroll
    for (int mask = 1; mask < 32; mask *= 2) m = fmax(m, __shfl_xor_sync(0xffffffffu, m, mask));
    if (lane == 0) red[warp] = m;
    // every warp's maximum is in red
    __syncthreads();
    m = red[0];
#pragma unroll
    for (int w = 1; w < COMBINE_WARPS; ++w) m = fmax(m, red[w]);
    const Acc m_safe = m == -INFINITY ? Acc(0) : m;

    // -- weights exp(lse_s - M) and l = sum_s of them: per thread, an xor butterfly per
    // warp (the same order in every lane), then the warps' sums in warp order
    Acc l = Acc(0);
    for (int s = tid; s < S; s += COMBINE_THREADS) {
        const Acc w = Math::exp_natural(lse_part[s * p.M] - m_safe);  // 0 for lse_s = -inf
        w_s[s] = w;
        l += w;
    }
#pragma unroll
    for (int mask = 1; mask < 32; mask *= 2) l += __shfl_xor_sync(0xffffffffu, l, mask);
    // every thread has read red's maxima before they are overwritten
    __syncthreads();
    if (lane == 0) red[warp] = l;
    // every warp's sum, and every weight, is in shared memory
    __syncthreads();
    l = red[0];
#pragma unroll
    for (int w = 1; w < COMBINE_WARPS; ++w) l += red[w];
    const Acc inv_l = Math::inverse(l);

    const int i = r / G, h = hk * G + r % G;
    if (tid == 0)
        static_cast<Acc*>(p.lse)[(b * p.H + h) * p.Lq + i] =
            l == Acc(0) ? Acc(-INFINITY) : m_safe + Math::log_natural(l);

    // -- out: warp w sums the splits s = w, w + COMBINE_WARPS, ... for the columns
    // c = lane + 32 k (coalesced rows; up to 4 x 8 loads in flight per lane); the warps'
    // sums are then added in warp order through shared memory (fixed order: reproducible)
    constexpr int COLS = COMBINE_MAX_DV / 32;  // columns per lane
    const int Dv = static_cast<int>(p.Dv);
    Acc o[COLS];
#pragma unroll
    for (int k = 0; k < COLS; ++k) o[k] = Acc(0);
#pragma unroll 4
    for (int s = warp; s < S; s += COMBINE_WARPS) {
        const Acc w = w_s[s];
        if (w == Acc(0)) continue;  // a split that saw no key adds nothing (nor is read)
        const Acc* row = out_part + s * split_stride;
#pragma unroll
        for (int k = 0; k < COLS; ++k)
            if (lane + 32 * k < Dv) o[k] += w * row[lane + 32 * k];
    }
    __shared__ Acc o_s[COMBINE_WARPS - 1][COMBINE_MAX_DV];  // warps 1.. sums
    if (warp > 0) {
#pragma unroll
        for (int k = 0; k < COLS; ++k) o_s[warp - 1][lane + 32 * k] = o[k];
    }
    // every warp's sums are in shared memory
    __syncthreads();
    if (warp == 0) {
        T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + i * p.out_token_stride
                 + h * p.out_head_stride;
#pragma unroll
        for (int k = 0; k < COLS; ++k) {
            const int c = lane + 32 * k;
            if (c < Dv) {
                Acc total = o[k];
#pragma unroll
                for (int w = 1; w < COMBINE_WARPS; ++w) total += o_s[w - 1][c];
                out[c] = Math::from_acc(total * inv_l);
            }
        }
    }
}

// ----------------------------------------------------------------------------------------
// The append: k_new[b, j] -> the cache at position cache_seqlens[b] + j (through the block
// table when paged), and v_new likewise; element by element, any strides. Validation has
// checked that the positions fit and are distinct. Grid: one block per new token
// (b * L_new + j); its threads stride over the token's Hk * (D + Dv) elements, K then V.
// ----------------------------------------------------------------------------------------
constexpr int APPEND_THREADS = 256;

template <typename T>
__global__ void __launch_bounds__(APPEND_THREADS) decode_append(const DecodeAppendParams p) {
    decode::wait_for_previous_grid();  // (PDL: whatever wrote the cache has completed)
    decode::allow_next_grid();
    const unsigned token = blockIdx.x;  // b * L_new + j (32-bit: below 2^31)
    const unsigned L_new = static_cast<unsigned>(p.L_new);
    const long long b = token / L_new, j = token % L_new;
    const long long t = static_cast<long long>(p.cache_seqlens[b]) + j;  // its cache position
    long long page = b, pos = t;
    if (p.page_size > 0) {
        const unsigned q = static_cast<unsigned>(t) / static_cast<unsigned>(p.page_size);
        page = p.block_table[b * p.table_stride + q];
        pos = t - static_cast<long long>(q) * p.page_size;
    }
    const int D = static_cast<int>(p.D), Dv = static_cast<int>(p.Dv);
    const int k_elems = static_cast<int>(p.Hk) * D;
    const int total = k_elems + static_cast<int>(p.Hk) * Dv;
    T* k_dst = static_cast<T*>(p.k_cache) + page * p.k_page_stride + pos * p.k_token_stride;
    T* v_dst = static_cast<T*>(p.v_cache) + page * p.v_page_stride + pos * p.v_token_stride;
    const T* k_src = static_cast<const T*>(p.k_new) + b * p.kn_batch_stride + j * p.kn_token_stride;
    const T* v_src = static_cast<const T*>(p.v_new) + b * p.vn_batch_stride + j * p.vn_token_stride;
    for (int idx = threadIdx.x; idx < total; idx += APPEND_THREADS) {
        if (idx < k_elems) {
            const int hk = idx / D, c = idx % D;
            k_dst[hk * p.k_head_stride + c * p.k_dim_stride] =
                k_src[hk * p.kn_head_stride + c * p.kn_dim_stride];
        } else {
            const int hk = (idx - k_elems) / Dv, c = (idx - k_elems) % Dv;
            v_dst[hk * p.v_head_stride + c * p.v_dim_stride] =
                v_src[hk * p.vn_head_stride + c * p.vn_dim_stride];
        }
    }
}

}  // namespace cupyflash
