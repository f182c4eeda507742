// FlashAttention-2 forward for fp16 / bf16 on tensor cores (sm_80 and newer).
//
// One thread block computes O_i for one block of BLOCK_M query rows of one batch element:
//
//   for each key block j (BLOCK_N keys), last to first:
//       S    = Q_i K_j^T                            (mma.sync, fp32 accumulators)
//       m    = max(m_i, rowmax(S) * scale * log2 e) -- update m_i and l_i
//       P    = exp2(S * scale * log2 e - m)         (one FFMA and one ex2 per score)
//       l_i  = l_i * exp2(m_i - m) + rowsum(P)
//       acc  = acc * exp2(m_i - m) + P V_j          (P rounded to T, mma.sync)
//       m_i  = m
//   O_i = acc / l_i,   lse_i = (m_i + log2(l_i)) * ln(2)
//
// Each warp owns WARP_M consecutive query rows, so the softmax statistics of a row live
// in the four lanes of one quad and need no shared memory. K and V tiles are loaded with
// cp.async into one or two buffers each (KV_BUFFERS): with one, V_j loads during
// S = Q K_j^T and the softmax and K_{j-1} during P V_j; with two, K_{j-1} and V_{j-1} load
// during all of block j. Shared-memory tiles are row-major with the 16-byte
// chunks of each row XOR-swizzled by (row % 8), so that ldmatrix and cp.async are free of
// bank conflicts.
#pragma once

#include "attention_common.cuh"
#include "attention_variants.cuh"

namespace cupyflash {

// ---------------------------------------------------------------------------------------
// Tile shape: template parameters in, derived sizes out.
// ---------------------------------------------------------------------------------------
template <typename T_, int HEAD_DIM_, int BLOCK_M_, int BLOCK_N_, int NUM_WARPS_, int KV_BUFFERS_>
struct FwdMmaTraits {
    using T = T_;
    static constexpr int HEAD_DIM = HEAD_DIM_;    // padded head dim (q, k and v)
    static constexpr int BLOCK_M = BLOCK_M_;      // query rows per thread block
    static constexpr int BLOCK_N = BLOCK_N_;      // keys per inner-loop step
    static constexpr int NUM_WARPS = NUM_WARPS_;
    static constexpr int NUM_THREADS = 32 * NUM_WARPS;

    static constexpr int WARP_M = BLOCK_M / NUM_WARPS;   // query rows per warp
    static constexpr int M_TILES = WARP_M / 16;          // m16 tiles per warp
    static constexpr int S_N_TILES = BLOCK_N / 8;        // n8 tiles of S per warp
    static constexpr int O_N_TILES = HEAD_DIM / 8;       // n8 tiles of O per warp
    static constexpr int QK_K_STEPS = HEAD_DIM / 16;     // k16 steps of Q K^T
    static constexpr int PV_K_STEPS = BLOCK_N / 16;      // k16 steps of P V

    static constexpr int CHUNK = 16 / sizeof(T);         // elements per 16-byte chunk
    static constexpr int ROW_CHUNKS = HEAD_DIM / CHUNK;  // chunks of one row that hold data
    // Shared-memory rows are a whole number of 128-byte (8-chunk) swizzle groups.
    static constexpr int SMEM_ROW = (HEAD_DIM + 8 * CHUNK - 1) / (8 * CHUNK) * (8 * CHUNK);
    // K and V buffers: 1 = K_{j-1} loads during P V_j and V_j during S = Q K_j^T (two
    // barriers per key block); 2 = K_{j-1} and V_{j-1} load during all of block j (one
    // barrier). Which is faster depends on the shape: see MMA_TILES in _cupy_backend.py.
    static constexpr int KV_BUFFERS = KV_BUFFERS_;
    static constexpr int KV_TILE = BLOCK_N * SMEM_ROW;   // elements of one K or V buffer
    static constexpr int SMEM_ELEMS = BLOCK_M * SMEM_ROW + 2 * KV_BUFFERS * KV_TILE;
    static constexpr int SMEM_BYTES = SMEM_ELEMS * sizeof(T);

    static_assert(sizeof(T) == 2, "tensor-core path is for fp16 and bf16");
    static_assert(KV_BUFFERS == 1 || KV_BUFFERS == 2, "one or two K/V buffers");
    static_assert(HEAD_DIM % 16 == 0 && O_N_TILES % 2 == 0, "HEAD_DIM must be a multiple of 16");
    static_assert(BLOCK_N % 16 == 0, "BLOCK_N must be a multiple of 16");
    static_assert(WARP_M % 16 == 0 && WARP_M * NUM_WARPS == BLOCK_M,
                  "each warp owns a whole number of 16-row tiles");
};

// ---------------------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; copies src_bytes (0 or 16) and zero-fills the rest.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
                 "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }


__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(smem)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(smem)));
}

template <bool B>
struct BoolConst {
    static constexpr bool value = B;
};

template <typename T> struct IsBf16 { static constexpr bool value = false; };
template <> struct IsBf16<__nv_bfloat16> { static constexpr bool value = true; };

// D = A B + D for one m16n8k16 tile (D = A B when ZERO_C): A row-major (4 regs), B
// column-major (2 regs). With ZERO_C the accumulator input is the constant 0, which ptxas
// feeds from the zero register instead of clearing D first.
template <typename T, bool ZERO_C = false>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                          unsigned b1) {
    static_assert(sizeof(T) == 2, "fp16 or bf16 operands");
    const float c0 = ZERO_C ? 0.f : d[0], c1 = ZERO_C ? 0.f : d[1];
    const float c2 = ZERO_C ? 0.f : d[2], c3 = ZERO_C ? 0.f : d[3];
    if constexpr (IsBf16<T>::value) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%10,%11,%12,%13};\n"
            : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1),
              "f"(c0), "f"(c1), "f"(c2), "f"(c3));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%10,%11,%12,%13};\n"
            : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1),
              "f"(c0), "f"(c1), "f"(c2), "f"(c3));
    }
}

// Two floats -> one register of two T (the low half holds x).
template <typename T> __device__ __forceinline__ unsigned pack2(float x, float y);
template <> __device__ __forceinline__ unsigned pack2<__half>(float x, float y) {
    __half2 h = __floats2half2_rn(x, y);
    return *reinterpret_cast<unsigned*>(&h);
}
template <> __device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float x, float y) {
    __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<unsigned*>(&h);
}

// The lane index, read so that the compiler cannot hoist what is computed from it out of
// the key-block loop: the swizzled ldmatrix addresses are then recomputed in each phase
// (a few integer instructions) instead of holding ~24 registers for the whole loop.
__device__ __forceinline__ int lane_id_volatile() {
    int lane;
    asm volatile("mov.u32 %0, %%laneid;\n" : "=r"(lane));
    return lane;
}

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// 2^x on the special-function unit, flushing denormal results to 0. (exp2f without
// --use_fast_math adds a compare and two multiplies per call to keep denormals.)
__device__ __forceinline__ float exp2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// ---------------------------------------------------------------------------------------
// Online softmax over the rows a lane holds: rows g and g + 8 of each m16 tile.
// ---------------------------------------------------------------------------------------
// The scores arrive as S = Q K^T (or already multiplied by scale * log2 e, then c = 1) and
// are turned into P = exp2(S * c - m_i) in place with one FFMA each; c > 0, so the row
// maximum of S * c is the row maximum of S times c. As in FlashAttention-4, m_i is moved
// (and acc rescaled) only when a block's maximum exceeds it by more than 8, which keeps
// P <= 256 and skips most rescales. Guards: a row whose maximum is -inf
// (no visible key yet) uses 0 as its maximum, so exp2(-inf) = 0 and no NaN appears; a row
// whose sum is 0 at the end gets an inverse of 0, so its output is 0.
template <int M_TILES, int S_N_TILES, int O_N_TILES>
struct OnlineSoftmax {
    // The running max is moved only when a block's max exceeds it by more than this many
    // (log2 units); every exponent uses the same m_i, so the result is exact either way.
    static constexpr float RESCALE_THRESHOLD = 8.f;

    float m_i[M_TILES][2];  // running row max of S * c (log2 units); -inf: nothing seen yet
    float l_i[M_TILES][2];  // running row sum of P over this lane's columns only

    __device__ __forceinline__ OnlineSoftmax() {
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt) {
            m_i[mt][0] = m_i[mt][1] = -INFINITY;
            l_i[mt][0] = l_i[mt][1] = 0.f;
        }
    }

    // -- update m_i and l_i with one key block; S becomes P; acc is rescaled by alpha
    __device__ __forceinline__ void update(float (&s)[M_TILES][S_N_TILES][4],
                                           float (&acc)[M_TILES][O_N_TILES][4], float c) {
        float alpha[M_TILES][2];
        bool any_grow = false;
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {  // h = 0: row g (elements 0, 1), h = 1: row g + 8
                float row_max = -INFINITY;
#pragma unroll
                for (int nt = 0; nt < S_N_TILES; ++nt)
                    row_max = fmaxf(row_max, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
                // m_i may lag the true row max by up to RESCALE_THRESHOLD: then P <= 2^8
                // (fine in fp16/bf16) and acc needs no rescale for this block.
                const float m_blk = quad_max(row_max) * c;
                const bool grow = m_blk > m_i[mt][h] + RESCALE_THRESHOLD;  // m_i = -inf: grows
                const float m_new = grow ? m_blk : m_i[mt][h];
                const float m_use = safe_max(m_new);
                alpha[mt][h] = grow ? exp2_ftz(m_i[mt][h] - m_use) : 1.f;  // exp2(m_old - m_new)
                any_grow |= grow;
                float row_sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < S_N_TILES; ++nt)
#pragma unroll
                    for (int e = 2 * h; e < 2 * h + 2; ++e) {
                        s[mt][nt][e] = exp2_ftz(fmaf(s[mt][nt][e], c, -m_use));  // P = exp2(S c - m)
                        row_sum += s[mt][nt][e];
                    }
                l_i[mt][h] = l_i[mt][h] * alpha[mt][h] + row_sum;
                m_i[mt][h] = m_new;
            }
        // Rescale acc only when some row of the warp moved its max (rare after the first
        // blocks); the branch is uniform across the warp.
        if (__any_sync(0xffffffffu, any_grow)) {
#pragma unroll
            for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
                for (int nt = 0; nt < O_N_TILES; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[mt][nt][e] *= alpha[mt][e / 2];
        }
    }

    // The row sum over the whole quad; 1 / l_i, or 0 for a row that saw no key.
    __device__ __forceinline__ float row_sum(int mt, int h) const { return quad_sum(l_i[mt][h]); }
};

// ---------------------------------------------------------------------------------------
// Swizzled shared-memory tiles
// ---------------------------------------------------------------------------------------
// Element offset of (row, chunk) in a tile of Traits::SMEM_ROW-element rows: the low three
// bits of the chunk index are XORed with row % 8, so the 8 rows read by one ldmatrix phase
// (or written by 8 consecutive cp.async) fall in 8 different groups of 4 banks.
template <typename Traits>
__device__ __forceinline__ int swizzle(int row, int chunk) {
    return row * Traits::SMEM_ROW + ((chunk ^ (row & 7)) * Traits::CHUNK);
}

// Copy rows [row0, row0 + ROWS) of a (rows x HEAD_DIM) global tile into shared memory.
// Rows >= n_rows and chunks at or past `cols` (the real head dim) are zero-filled.
// When the threads tile whole rows (NUM_THREADS a multiple of ROW_CHUNKS), each thread
// keeps one chunk column and steps down the rows: constant shared-memory offsets and one
// pointer increment per 16-byte copy. Otherwise a generic loop does the same copies.
template <typename Traits, int ROWS>
__device__ __forceinline__ void load_tile(typename Traits::T* smem, const typename Traits::T* gmem,
                                          long long row_stride, long long row0, long long n_rows,
                                          long long cols) {
    using T = typename Traits::T;
    constexpr int CHUNKS = Traits::ROW_CHUNKS;
    if constexpr (Traits::NUM_THREADS % CHUNKS == 0) {
        constexpr int ROWS_PER_PASS = Traits::NUM_THREADS / CHUNKS;
        static_assert(ROWS % ROWS_PER_PASS == 0, "the threads tile whole passes of rows");
        const int r = threadIdx.x / CHUNKS;  // first row of this thread
        const int c = threadIdx.x % CHUNKS;  // its chunk column
        const bool col_ok = c * Traits::CHUNK < cols;
        const T* src = gmem + (row0 + r) * row_stride + c * Traits::CHUNK;
#pragma unroll
        for (int i = 0; i < ROWS / ROWS_PER_PASS; ++i) {
            const bool valid = col_ok && row0 + r + i * ROWS_PER_PASS < n_rows;
            cp_async_16(smem + swizzle<Traits>(r + i * ROWS_PER_PASS, c),
                        valid ? src : gmem, valid ? 16 : 0);
            src += ROWS_PER_PASS * row_stride;
        }
    } else {
#pragma unroll 1
        for (int idx = threadIdx.x; idx < ROWS * CHUNKS; idx += Traits::NUM_THREADS) {
            const int r = idx / CHUNKS;
            const int c = idx % CHUNKS;
            const bool valid = row0 + r < n_rows && c * Traits::CHUNK < cols;
            const T* src = valid ? gmem + (row0 + r) * row_stride + c * Traits::CHUNK : gmem;
            cp_async_16(smem + swizzle<Traits>(r, c), src, valid ? 16 : 0);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------
// Two entry points share one body: flash_fwd_mma (plain or causal attention) and
// flash_fwd_mma_variants, whose scores go through ScoreModifier (attention_variants.cuh)
// built from vp: bias, mask, window with the causal mask folded in, ALiBi, softcap; and
// which drops P with the keep mask of vp's seed when vp asks for dropout. The body reads
// vp only with VARIANTS. MIN_BLOCKS: thread blocks per multiprocessor that the
// register budget must allow (__launch_bounds__); 3 at d = 64 lets three blocks hide each
// other's softmax.
template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N, int NUM_WARPS, int KV_BUFFERS,
          bool IS_CAUSAL, bool VARIANTS>
__device__ __forceinline__ void flash_fwd_mma_body(const AttentionParams& p,
                                                   const VariantParams& vp) {
    static_assert(!(IS_CAUSAL && VARIANTS), "with variants the causal mask is the window's");
    using Tr = FwdMmaTraits<T, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_WARPS, KV_BUFFERS>;
    constexpr int M_TILES = Tr::M_TILES, S_N_TILES = Tr::S_N_TILES, O_N_TILES = Tr::O_N_TILES;

    const long long b = (long long)blockIdx.z * gridDim.y + blockIdx.y;  // batch element
    if (b >= p.n_batch) return;
    // Causal (or a window bounded on the right only): the longest query blocks, the last
    // ones, start first.
    const bool longest_last =
        IS_CAUSAL || (VARIANTS && vp.window_right < UNBOUNDED && vp.window_left >= UNBOUNDED);
    const int m_block = longest_last ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    const long long m0 = (long long)m_block * BLOCK_M;
    // A packed sequence (flash_fwd_mma_varlen) shorter than the grid's longest: no rows here.
    if (VARIANTS && m0 >= p.Lq) return;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4;  // mma "group": this lane holds rows g and g + 8 of each m16 tile
    const int t = lane % 4;  // and columns 2t, 2t + 1 of each n8 tile

    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);    // (BLOCK_M, SMEM_ROW) swizzled
    T* sK0 = sQ + BLOCK_M * Tr::SMEM_ROW;        // KV_BUFFERS x (BLOCK_N, SMEM_ROW) swizzled
    T* sV0 = sK0 + KV_BUFFERS * Tr::KV_TILE;     // KV_BUFFERS x (BLOCK_N, SMEM_ROW) swizzled

    const BatchPointers<T, float> ptr = batch_pointers<T, float>(p, b);
    const T* q = ptr.q;
    const T* k = ptr.k;
    const T* v = ptr.v;
    T* o = ptr.o;
    float* lse = ptr.lse;

    // Key blocks to visit, [n_first, n_blocks): causal skips the blocks wholly above the
    // diagonal, a window those wholly outside its band.
    const long long diag = p.Lk - p.Lq;  // query i sees key j iff j <= i + diag
    // The variants of batch element b (built and read only with VARIANTS).
    const ScoreModifierIf<VARIANTS, T, float> mod(p, vp, b);
    int n_first = 0, n_blocks;
    if constexpr (VARIANTS) {
        mod.key_blocks(m0, min(m0 + BLOCK_M, p.Lq), BLOCK_N, n_first, n_blocks);
    } else {
        long long n_end = p.Lk;
        if (IS_CAUSAL) n_end = min(n_end, m0 + BLOCK_M + diag);
        n_blocks = n_end > 0 ? (int)((n_end + BLOCK_N - 1) / BLOCK_N) : 0;
    }

    // Per-thread state: rows (g, g+8) of each m16 tile.
    float acc[M_TILES][O_N_TILES][4];  // unnormalised O_i: (WARP_M, HEAD_DIM) fp32
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int nt = 0; nt < O_N_TILES; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
    OnlineSoftmax<M_TILES, S_N_TILES, O_N_TILES> softmax;

    // exp(S * scale) = exp2(S * scale_log2). For scale > 0 the factor is folded into the
    // exponent's FFMA (c = scale_log2); otherwise S is multiplied first and c = 1.
    const float scale_log2 = static_cast<float>(p.scale_log2);
    const bool prescale = !(scale_log2 > 0.f);
    const float c = prescale ? 1.f : scale_log2;
    // Bias, ALiBi and softcap work on scaled scores, so with them S is scaled first; a mask
    // or a window only sets -inf, which the exponent's FFMA keeps (scale > 0).
    bool scale_first = prescale;
    if constexpr (VARIANTS) scale_first = prescale || mod.changes_values();
    const int warp_row0 = warp * Tr::WARP_M;  // first row of this warp inside the block

    // Key block j lives in buffer j % KV_BUFFERS of K and of V.
    auto load_kv = [&](long long n_start, bool with_k, bool with_v) {
        const int buf = (int)(n_start / BLOCK_N) % KV_BUFFERS;
        if (with_k) load_tile<Tr, BLOCK_N>(sK0 + buf * Tr::KV_TILE, k, p.k_row_stride, n_start, p.Lk, p.D);
        if (with_v) load_tile<Tr, BLOCK_N>(sV0 + buf * Tr::KV_TILE, v, p.v_row_stride, n_start, p.Lk, p.Dv);
    };
    if (n_blocks > n_first) {  // Q and the first key block (with one buffer, V follows in the loop)
        load_tile<Tr, BLOCK_M>(sQ, q, p.q_row_stride, m0, p.Lq, p.D);
        load_kv((long long)(n_blocks - 1) * BLOCK_N, /*with_k=*/true, /*with_v=*/KV_BUFFERS == 2);
        cp_async_commit();
    }

    for (int n_block = n_blocks - 1; n_block >= n_first; --n_block) {
        const long long n0 = (long long)n_block * BLOCK_N;
        const T* sK = sK0 + (n_block % KV_BUFFERS) * Tr::KV_TILE;
        const T* sV = sV0 + (n_block % KV_BUFFERS) * Tr::KV_TILE;
        cp_async_wait_all();
        // K_j (and Q; with two buffers V_j too) has landed for every thread, and every warp
        // has finished block j+1, whose buffers may now be refilled.
        __syncthreads();
        if (KV_BUFFERS == 2) {
            if (n_block > n_first) load_kv(n0 - BLOCK_N, /*with_k=*/true, /*with_v=*/true);
        } else {
            load_kv(n0, /*with_k=*/false, /*with_v=*/true);
        }
        cp_async_commit();

        // S = Q_i K_j^T: (WARP_M, BLOCK_N) per warp, fp32
        float s[M_TILES][S_N_TILES][4];
        const int qk_lane = lane_id_volatile();
        auto qk_step = [&](int kk, auto first) {  // one k16 step; the first starts from S = 0
            unsigned a[M_TILES][4];  // Q fragments: rows (lane % 16), k-chunk 2kk + lane / 16
#pragma unroll
            for (int mt = 0; mt < M_TILES; ++mt)
                ldmatrix_x4(a[mt], sQ + swizzle<Tr>(warp_row0 + mt * 16 + (qk_lane & 15),
                                                     2 * kk + (qk_lane >> 4)));
#pragma unroll
            for (int nt = 0; nt < S_N_TILES; nt += 2) {
                unsigned bk[4];  // K fragments for keys 8nt..8nt+15: rows lane%8 (+8), chunk +lane/8%2
                ldmatrix_x4(bk, sK + swizzle<Tr>(nt * 8 + (qk_lane & 7) + ((qk_lane >> 4) << 3),
                                                  2 * kk + ((qk_lane >> 3) & 1)));
#pragma unroll
                for (int mt = 0; mt < M_TILES; ++mt) {
                    mma_16816<T, decltype(first)::value>(s[mt][nt], a[mt], bk[0], bk[1]);
                    mma_16816<T, decltype(first)::value>(s[mt][nt + 1], a[mt], bk[2], bk[3]);
                }
            }
        };
        qk_step(0, /*first=*/BoolConst<true>{});
        // kk only moves addresses (no register array is indexed by it): unrolling by 2 rather
        // than fully keeps the d = 96 and 128 variants under 255 registers without spills.
#pragma unroll 2
        for (int kk = 1; kk < Tr::QK_K_STEPS; ++kk) qk_step(kk, /*first=*/BoolConst<false>{});

        if (scale_first) {  // S *= scale * log2(e) before the variants, the mask and the max
#pragma unroll
            for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
                for (int nt = 0; nt < S_N_TILES; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[mt][nt][e] *= scale_log2;
        }
        if constexpr (VARIANTS) {
            // Scores -> softcap, ALiBi, bias, band and mask, in the blocks that need it:
            // those that cross the band's edges or Lk for this warp's rows, those where
            // the mask hides a key, and all of them with a bias, ALiBi or softcap.
            const long long warp_m0 = m0 + warp_row0;
            const bool band = !mod.block_inside(warp_m0, Tr::WARP_M, n0, BLOCK_N);
            const bool mask = mod.warp_needs_mask(n0, BLOCK_N);
            if (band || mask || mod.changes_values()) {
#pragma unroll
                for (int mt = 0; mt < M_TILES; ++mt)
                    mod.apply(s[mt], warp_m0 + mt * 16 + g, n0, t, band, mask);
            }
        } else if (n0 + BLOCK_N > p.Lk || (IS_CAUSAL && n0 + BLOCK_N - 1 > m0 + diag)) {
            // Keys past Lk or above the causal diagonal -> -inf. Only blocks that cross the
            // Lk boundary or the diagonal need it; there row r sees the block's first
            // `visible` keys (query i sees key j iff j <= i + diag).
#pragma unroll
            for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    long long end = p.Lk - n0;
                    if (IS_CAUSAL) end = min(end, m0 + warp_row0 + mt * 16 + g + 8 * h + diag + 1 - n0);
                    const int visible = (int)max(min(end, (long long)BLOCK_N), 0LL);
#pragma unroll
                    for (int nt = 0; nt < S_N_TILES; ++nt)
#pragma unroll
                        for (int e = 2 * h; e < 2 * h + 2; ++e)
                            if (nt * 8 + 2 * t + (e & 1) >= visible) s[mt][nt][e] = -INFINITY;
                }
        }

        softmax.update(s, acc, scale_first ? 1.f : c);  // S becomes P; acc rescaled
        if constexpr (VARIANTS) {
            if (dropout_on(vp)) {  // P * Z: the dropped weights leave acc, not l_i
#pragma unroll
                for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
                    for (int nt = 0; nt < S_N_TILES; ++nt) {
                        const unsigned keep = dropout_keep_mma(
                            vp, b, m0 + warp_row0 + mt * 16 + g, n0 + 8 * nt, t);
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            if (!((keep >> e) & 1u)) s[mt][nt][e] = 0.f;
                    }
            }
        }

        // P rounded to T, already in the A-operand layout of P V: the accumulator layout of
        // the n8 tiles 2kk and 2kk+1 of S is the A fragment of k16 step kk.
        unsigned p_frag[M_TILES][Tr::PV_K_STEPS][4];
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
            for (int kk = 0; kk < Tr::PV_K_STEPS; ++kk) {
                p_frag[mt][kk][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                p_frag[mt][kk][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                p_frag[mt][kk][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                p_frag[mt][kk][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }

        if (KV_BUFFERS == 1) {
            cp_async_wait_all();
            // V_j has landed for every thread, and every warp has finished Q K_j^T, so the
            // K buffer may be refilled with K_{j-1}.
            __syncthreads();
            if (n_block > n_first) load_kv(n0 - BLOCK_N, /*with_k=*/true, /*with_v=*/false);
            cp_async_commit();
        }

        // acc += P V_j: (WARP_M, BLOCK_N) x (BLOCK_N, HEAD_DIM)
        const int pv_lane = lane_id_volatile();
#pragma unroll
        for (int kk = 0; kk < Tr::PV_K_STEPS; ++kk)
#pragma unroll
            for (int nt = 0; nt < O_N_TILES; nt += 2) {
                unsigned bv[4];  // V^T fragments: keys 16kk + lane%8 (+8), columns 8nt (+8)
                ldmatrix_x4_trans(bv, sV + swizzle<Tr>(kk * 16 + (pv_lane & 7) + (((pv_lane >> 3) & 1) << 3),
                                                        nt + (pv_lane >> 4)));
#pragma unroll
                for (int mt = 0; mt < M_TILES; ++mt) {
                    mma_16816<T>(acc[mt][nt], p_frag[mt][kk], bv[0], bv[1]);
                    mma_16816<T>(acc[mt][nt + 1], p_frag[mt][kk], bv[2], bv[3]);
                }
            }
    }

    // O_i = acc / l_i (dropout: acc / l_i / (1 - dropout_p)); lse_i = (m_i + log2 l_i) *
    // ln 2. A row with l_i = 0 saw no key: zeros and lse = -inf. The warp stages its own
    // rows in its own part of sQ.
    T* sO = sQ;
    float o_scale = 1.f;
    if constexpr (VARIANTS) o_scale = dropout_on(vp) ? static_cast<float>(vp.dropout_scale) : 1.f;
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float l = softmax.row_sum(mt, h);
            float inv_l = safe_inverse(l);
            if constexpr (VARIANTS) inv_l *= o_scale;
            const int r = warp_row0 + mt * 16 + g + 8 * h;
#pragma unroll
            for (int nt = 0; nt < O_N_TILES; ++nt)
                *reinterpret_cast<unsigned*>(sO + swizzle<Tr>(r, nt) + 2 * t) =
                    pack2<T>(acc[mt][nt][2 * h] * inv_l, acc[mt][nt][2 * h + 1] * inv_l);
            // lse = ln 2 * m_i + ln l_i (m_i is in log2 units): one FMA, an accurate log.
            if (t == 0 && m0 + r < p.Lq)
                lse[m0 + r] = l == 0.f ? -INFINITY : fmaf(softmax.m_i[mt][h], LN2, logf(l));
        }
    __syncwarp();  // the warp's rows of sO are written before its lanes read them back

    // 16-byte stores of the warp's rows: (WARP_M, Dv) of O
    const int o_chunks = (int)((p.Dv + Tr::CHUNK - 1) / Tr::CHUNK);
    for (int idx = lane; idx < Tr::WARP_M * Tr::ROW_CHUNKS; idx += 32) {
        const int r = warp_row0 + idx / Tr::ROW_CHUNKS;
        const int c = idx % Tr::ROW_CHUNKS;
        if (m0 + r < p.Lq && c < o_chunks)
            *reinterpret_cast<uint4*>(o + (m0 + r) * p.o_row_stride + c * Tr::CHUNK) =
                *reinterpret_cast<const uint4*>(sO + swizzle<Tr>(r, c));
    }
}

template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N, int NUM_WARPS, int KV_BUFFERS,
          int MIN_BLOCKS, bool IS_CAUSAL>
__global__ void __launch_bounds__(NUM_WARPS * 32, MIN_BLOCKS)
flash_fwd_mma(const AttentionParams p) {
    flash_fwd_mma_body<T, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_WARPS, KV_BUFFERS, IS_CAUSAL, false>(
        p, VariantParams{});
}

template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N, int NUM_WARPS, int KV_BUFFERS,
          int MIN_BLOCKS>
__global__ void __launch_bounds__(NUM_WARPS * 32, MIN_BLOCKS)
flash_fwd_mma_variants(const AttentionParams p, const VariantParams vp) {
    flash_fwd_mma_body<T, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_WARPS, KV_BUFFERS, false, true>(p, vp);
}

// The variants over packed sequences (attention_varlen; vp.cu_seqlens_q and cu_seqlens_k
// set): each block attends the sequence of its batch element as a problem of its own
// (sequence_params). An entry point of its own rather than a branch in the one above: the
// sequence's pointers and lengths live in registers, not in the parameter space, which
// cost the dense variants up to 23 registers a thread and spilled them at d = 256 (ptxas
// -v, sm_80 and sm_90a, 2026-11-22).
template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N, int NUM_WARPS, int KV_BUFFERS,
          int MIN_BLOCKS>
__global__ void __launch_bounds__(NUM_WARPS * 32, MIN_BLOCKS)
flash_fwd_mma_varlen(const AttentionParams p, const VariantParams vp) {
    const long long b = (long long)blockIdx.z * gridDim.y + blockIdx.y;  // (sequence, head)
    if (b >= p.n_batch) return;
    long long q_row0, k_row0;
    const AttentionParams ps = sequence_params<T, float>(p, vp, b, q_row0, k_row0);
    flash_fwd_mma_body<T, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_WARPS, KV_BUFFERS, false, true>(ps, vp);
}

}  // namespace cupyflash
