// Exact FlashAttention-2 forward for float32 and float64 on the FMA units (no TF32).
//
// One thread block owns BLOCK_M query rows of one batch element and streams the keys
// and values through shared memory, BLOCK_N rows at a time:
//
//   Q_i   = Q[m0 : m0 + BLOCK_M] * scale          (kept in shared memory for the whole loop)
//   for each key tile j:
//     S   = Q_i K_j^T                              (BLOCK_M x BLOCK_N, registers)
//     m_new = max(m_i, rowmax(S));  P~ = exp(S - m_new);  alpha = exp(m_i - m_new)
//     l_i = alpha * l_i + rowsum(P~);  acc = alpha * acc + P~ V_j
//   O_i = acc / l_i;  lse_i = m_i + log(l_i)
//
// Both products are register-blocked: a thread owns TM query rows x TN keys of S and the
// same TM rows x TD columns of acc, so that every value read from shared memory feeds
// several FMAs. The 128 threads form 16 thread rows x THREADS_PER_ROW = 8 threads per
// query row; a row's max and sum reduce over those 8 neighbouring lanes by shuffles.
//
// Float scores are kept in log2 units (Q is multiplied by scale * log2(e) once, on its
// way into shared memory) so that the softmax uses exp2f; doubles use scale and exp.
//
// Copies: K and V arrive through cp.async (16 bytes each), so q, k, v and o must have
// 16-byte aligned rows whose length is a multiple of VEC elements; the launcher
// (_cupy_backend._kernel_ready with align_elems = pad_d_to = VEC) copies and zero-pads
// any array that does not. Columns past D (and past Dv) read as zero.
#pragma once

#include "attention_common.cuh"
#include "attention_variants.cuh"

namespace cupyflash {

// ----------------------------------------------------------------------------------------
// Tile sizes per element type and padded head dim. Every configuration fits in 99 KiB of
// shared memory (the opt-in limit of sm_86/sm_89/sm_120), so one set of variants serves
// every GPU from sm_80 on. _cupy_backend._simt_config repeats this table;
// tests/test_kernel_compile.py checks that the two agree.
//
// Measured on an H200 (benchmarks/NOTES.md): float32 21-30 TFLOP/s at d = 64 and 128, 0.53-0.86x
// torch's memory-efficient attention; the tiles were not tuned on a GPU yet.
// Why these (from ptxas and the SASS instruction mix):
// - a thread's TM x TN block of S and TM x TD block of acc make each 16-byte shared load
//   feed 8-16 FMAs; the loop over key tiles is ~80% FFMA for float (SASS, d = 64, 128);
// - ptxas settles at <= 168 registers for float, so 3 blocks of 128 threads fit an SM by
//   registers; shared memory then allows 3 blocks per H100 SM for HEAD_DIM <= 128
//   (43, 67, 74.5 KiB; it needs the driver's largest carveout) and 2 for 256 (84 KiB);
// - float64 and HEAD_DIM 256 are bound by shared memory (Q, K, V tiles of HEAD_DIM
//   columns), hence their smaller BLOCK_M and BLOCK_N (2 blocks per H100 SM, 3 for
//   float64 at 32).
// ----------------------------------------------------------------------------------------
template <typename T, int HEAD_DIM> struct SimtTiles;
template <> struct SimtTiles<float, 32>   { static constexpr int BLOCK_M = 64,  BLOCK_N = 64; };
template <> struct SimtTiles<float, 64>   { static constexpr int BLOCK_M = 64,  BLOCK_N = 64; };
template <> struct SimtTiles<float, 128>  { static constexpr int BLOCK_M = 64,  BLOCK_N = 32; };
template <> struct SimtTiles<float, 256>  { static constexpr int BLOCK_M = 32,  BLOCK_N = 24; };
template <> struct SimtTiles<double, 32>  { static constexpr int BLOCK_M = 64,  BLOCK_N = 32; };
template <> struct SimtTiles<double, 64>  { static constexpr int BLOCK_M = 64,  BLOCK_N = 32; };
template <> struct SimtTiles<double, 128> { static constexpr int BLOCK_M = 32,  BLOCK_N = 24; };
template <> struct SimtTiles<double, 256> { static constexpr int BLOCK_M = 16,  BLOCK_N = 16; };

template <typename T, int HEAD_DIM>
struct SimtTraits {
    static constexpr int BLOCK_M = SimtTiles<T, HEAD_DIM>::BLOCK_M;  // query rows per block
    static constexpr int BLOCK_N = SimtTiles<T, HEAD_DIM>::BLOCK_N;  // keys per tile
    static constexpr int NUM_THREADS = 128;
    static constexpr int THREADS_PER_ROW = 8;   // lanes sharing a query row (one shuffle group)
    static constexpr int THREAD_ROWS = NUM_THREADS / THREADS_PER_ROW;  // 16
    static constexpr int VEC = 16 / int(sizeof(T));  // elements per 16-byte vector
    static constexpr int TM = BLOCK_M / THREAD_ROWS;     // query rows per thread
    static constexpr int TN = BLOCK_N / THREADS_PER_ROW; // keys per thread in S
    static constexpr int TD = HEAD_DIM / THREADS_PER_ROW;  // acc columns per thread
    static constexpr int TD_VECS = TD / VEC;
    static constexpr int D_VECS = HEAD_DIM / VEC;        // vectors in one padded row
    static constexpr int D_GROUP = 4;                    // vectors per step of S's inner loop

    // Shared memory, in elements. Q and K rows are read 4 (Q) or 8 (K) different rows at
    // a time, so they carry VEC elements (16 bytes) of padding: consecutive rows start 4
    // banks apart and those 16-byte loads do not conflict. V rows are read one row at a
    // time by all lanes of a warp: no padding. P~ is read as 16-byte vectors from 4 rows
    // at a time: a row stride of BLOCK_N + 4 puts them in distinct 16-byte bank groups
    // (its one-element stores, 4 rows x 8 keys per warp, conflict at most 2-way).
    static constexpr int QK_STRIDE = HEAD_DIM + VEC;
    static constexpr int V_STRIDE = HEAD_DIM;
    static constexpr int P_STRIDE = BLOCK_N + 4;
    static constexpr int Q_OFFSET = 0;                                 // Q_i: (BLOCK_M, QK_STRIDE)
    static constexpr int K_OFFSET = Q_OFFSET + BLOCK_M * QK_STRIDE;    // K_j: (BLOCK_N, QK_STRIDE)
    static constexpr int V_OFFSET = K_OFFSET + BLOCK_N * QK_STRIDE;    // V_j: (BLOCK_N, V_STRIDE)
    static constexpr int P_OFFSET = V_OFFSET + BLOCK_N * V_STRIDE;     // P~:  (BLOCK_M, P_STRIDE)
    static constexpr int SMEM_BYTES = (P_OFFSET + BLOCK_M * P_STRIDE) * int(sizeof(T));

    // Tile copies: thread t copies vector t % D_VECS of rows t / D_VECS + k * COPY_ROWS.
    static constexpr int COPY_ROWS = NUM_THREADS / D_VECS;

    static_assert(HEAD_DIM == 32 || HEAD_DIM == 64 || HEAD_DIM == 128 || HEAD_DIM == 256,
                  "HEAD_DIM must be 32, 64, 128 or 256");
    static_assert(THREADS_PER_ROW == 8, "the bank analysis above assumes 8 lanes per row");
    static_assert(BLOCK_N % 4 == 0, "dropout: tiles start at a group of four keys");
    static_assert(BLOCK_M % THREAD_ROWS == 0 && BLOCK_N % THREADS_PER_ROW == 0, "tile split");
    static_assert(BLOCK_N % VEC == 0 && TD % VEC == 0, "P and acc columns come in vectors");
    static_assert(D_VECS % D_GROUP == 0, "S's inner loop steps D_GROUP vectors at a time");
    static_assert(NUM_THREADS % D_VECS == 0, "a copy pass covers whole rows");
    static_assert(BLOCK_M % COPY_ROWS == 0 && BLOCK_N % COPY_ROWS == 0, "copies cover the tile");
    static_assert(SMEM_BYTES <= 99 * 1024, "must fit the smallest opt-in shared memory (sm_86)");
};

// ----------------------------------------------------------------------------------------
// The softmax in the precision of T: float works in log2 units with exp2f, double in
// natural units with exp.
// ----------------------------------------------------------------------------------------
template <typename T> struct SimtMath;

template <> struct SimtMath<float> {
    static __device__ __forceinline__ float q_scale(const AttentionParams& p) {
        return static_cast<float>(p.scale_log2);  // exp(s * scale) = exp2(s * scale_log2)
    }
    static __device__ __forceinline__ float exp(float x) { return exp2f(x); }
    static __device__ __forceinline__ float max(float a, float b) { return fmaxf(a, b); }
    // lse (natural log) of a row from its log2-unit max and its sum: m * ln(2) + log(l)
    static __device__ __forceinline__ float lse(float m_safe, float l) {
        return m_safe * 0.6931471805599453f + logf(l);
    }
};

template <> struct SimtMath<double> {
    static __device__ __forceinline__ double q_scale(const AttentionParams& p) { return p.scale; }
    static __device__ __forceinline__ double exp(double x) { return ::exp(x); }
    static __device__ __forceinline__ double max(double a, double b) { return fmax(a, b); }
    static __device__ __forceinline__ double lse(double m_safe, double l) { return m_safe + ::log(l); }
};

// 16 bytes of T: one shared or global vector access (LDS.128 / LDG.128 / cp.async).
template <typename T>
struct alignas(16) Vec16 {
    T v[16 / sizeof(T)];
};

template <typename T>
__device__ __forceinline__ Vec16<T> load_vec16(const T* ptr) {
    return *reinterpret_cast<const Vec16<T>*>(ptr);
}

template <typename T>
__device__ __forceinline__ void store_vec16(T* ptr, const Vec16<T>& x) {
    *reinterpret_cast<Vec16<T>*>(ptr) = x;
}

// 16-byte asynchronous copy global -> shared; when `fill` is false nothing is read and
// the 16 bytes are zero-filled (src-size 0), so rows past the sequence end read as zero.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool fill) {
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
    const int src_bytes = fill ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(dst), "l"(gmem_src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// Start copying rows [n0, n0 + BLOCK_N) of a (L, *) matrix into a (BLOCK_N, STRIDE) tile;
// only the first `vecs` vectors of each row; rows >= L are zero-filled.
template <typename Tr, int STRIDE, typename T>
__device__ __forceinline__ void load_tile_async(T* tile, const T* src, long long row_stride,
                                                long long n0, long long L, int vecs) {
    const int vec = threadIdx.x % Tr::D_VECS;
    const int row0 = threadIdx.x / Tr::D_VECS;
    if (vec < vecs) {
#pragma unroll
        for (int k = 0; k < Tr::BLOCK_N / Tr::COPY_ROWS; ++k) {
            const int r = row0 + k * Tr::COPY_ROWS;
            const bool in_range = n0 + r < L;
            // out of range: a zero-filled copy whose source is row 0 (always there)
            const T* g = src + (in_range ? n0 + r : 0) * row_stride + vec * Tr::VEC;
            cp_async_16(tile + r * STRIDE + vec * Tr::VEC, g, in_range);
        }
    }
    cp_async_commit();  // every thread commits a group (possibly empty): wait_group counts match
}

// ----------------------------------------------------------------------------------------
// The kernel. Grid: (ceil(Lq / BLOCK_M), min(n_batch, 65535), ceil(n_batch / 65535)).
// Two entry points share one body: flash_fwd_simt (plain or causal attention) and
// flash_fwd_simt_variants, whose scores go through ScoreModifier (attention_variants.cuh)
// built from vp, with the causal mask folded into its window, and whose P~ is dropped with
// the keep mask of vp's seed when vp asks for dropout. The body reads vp only with
// VARIANTS.
// ----------------------------------------------------------------------------------------
template <typename T, int HEAD_DIM, bool IS_CAUSAL, bool VARIANTS>
__device__ __forceinline__ void flash_fwd_simt_body(const AttentionParams& p,
                                                    const VariantParams& vp) {
    static_assert(!(IS_CAUSAL && VARIANTS), "with variants the causal mask is the window's");
    using Tr = SimtTraits<T, HEAD_DIM>;
    using Math = SimtMath<T>;
    constexpr int BLOCK_M = Tr::BLOCK_M, BLOCK_N = Tr::BLOCK_N, VEC = Tr::VEC;
    constexpr int TM = Tr::TM, TN = Tr::TN, TD = Tr::TD, TD_VECS = Tr::TD_VECS;
    constexpr int THREADS_PER_ROW = Tr::THREADS_PER_ROW, THREAD_ROWS = Tr::THREAD_ROWS;
    constexpr int QK_STRIDE = Tr::QK_STRIDE, V_STRIDE = Tr::V_STRIDE, P_STRIDE = Tr::P_STRIDE;

    const long long b = static_cast<long long>(blockIdx.z) * gridDim.y + blockIdx.y;
    if (b >= p.n_batch) return;

    // The launcher must give NUM_THREADS threads and at least SMEM_BYTES of dynamic shared
    // memory; trap (a launch error) rather than compute garbage or write past the end if
    // _cupy_backend's table ever disagrees with SimtTiles.
    unsigned dynamic_smem;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dynamic_smem));
    if (dynamic_smem < static_cast<unsigned>(Tr::SMEM_BYTES) || blockDim.x != Tr::NUM_THREADS)
        __trap();

    // Causal blocks (or those of a window bounded on the right only) further down have
    // more keys to visit: start those first.
    const bool longest_last =
        IS_CAUSAL || (VARIANTS && vp.window_right < UNBOUNDED && vp.window_left >= UNBOUNDED);
    const long long m_block = longest_last ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    const long long m0 = m_block * BLOCK_M;
    // A packed sequence (flash_fwd_simt_varlen) shorter than the grid's longest: no rows here.
    if (VARIANTS && m0 >= p.Lq) return;
    const BatchPointers<T, T> ptr = batch_pointers<T, T>(p, b);
    const T* q = ptr.q;
    const T* k = ptr.k;
    const T* v = ptr.v;
    T* o = ptr.o;
    T* lse = ptr.lse;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* Qs = reinterpret_cast<T*>(smem_raw) + Tr::Q_OFFSET;  // (BLOCK_M, QK_STRIDE), pre-scaled
    T* Ks = reinterpret_cast<T*>(smem_raw) + Tr::K_OFFSET;  // (BLOCK_N, QK_STRIDE)
    T* Vs = reinterpret_cast<T*>(smem_raw) + Tr::V_OFFSET;  // (BLOCK_N, V_STRIDE)
    T* Ps = reinterpret_cast<T*>(smem_raw) + Tr::P_OFFSET;  // (BLOCK_M, P_STRIDE)

    const int tid = threadIdx.x;
    const int tr = tid / THREADS_PER_ROW;  // this thread's rows:  r_i = tr + i * THREAD_ROWS
    const int tc = tid % THREADS_PER_ROW;  // its keys in S:       c_j = tc + j * THREADS_PER_ROW
                                           // its acc vectors:     (tc + t * THREADS_PER_ROW) * VEC
    const int d_vecs = static_cast<int>((p.D + VEC - 1) / VEC);    // vectors holding q, k data
    const int dv_vecs = static_cast<int>((p.Dv + VEC - 1) / VEC);  // vectors holding v, o data

    // Causal: query i sees key j iff j <= i + (Lk - Lq). The block's last row sees the
    // most keys; key tiles past that are skipped by the loop bound.
    const long long causal_shift = p.Lk - p.Lq;
    const long long m_end = m0 + BLOCK_M < p.Lq ? m0 + BLOCK_M : p.Lq;  // rows [m0, m_end)
    // With variants the band of the window gives the tiles [n_first, num_n_blocks).
    const ScoreModifierIf<VARIANTS, T, T> mod(p, vp, b);
    int n_first = 0, num_n_blocks;
    if constexpr (VARIANTS) {
        mod.key_blocks(m0, m_end, BLOCK_N, n_first, num_n_blocks);
    } else {
        long long n_end = p.Lk;
        if (IS_CAUSAL) n_end = m_end + causal_shift < p.Lk ? m_end + causal_shift : p.Lk;
        // < 2^31: a key row holds at least 16 bytes, so Lk / BLOCK_N is far below 2^31
        num_n_blocks = n_end > 0 ? static_cast<int>((n_end + BLOCK_N - 1) / BLOCK_N) : 0;
    }

    // -- prologue: Q_i into shared memory, times scale; columns of K and V tiles that no
    // copy writes (past D or Dv) are zeroed once (a 0 * NaN from stale memory would poison S)
    {
        const T q_scale = Math::q_scale(p);
        const int vec = tid % Tr::D_VECS;
        const int row0 = tid / Tr::D_VECS;
#pragma unroll
        for (int kk = 0; kk < BLOCK_M / Tr::COPY_ROWS; ++kk) {
            const int r = row0 + kk * Tr::COPY_ROWS;
            Vec16<T> x;
#pragma unroll
            for (int e = 0; e < VEC; ++e) x.v[e] = T(0);
            if (vec < d_vecs && m0 + r < p.Lq) {
                x = load_vec16(q + (m0 + r) * p.q_row_stride + vec * VEC);
#pragma unroll
                for (int e = 0; e < VEC; ++e) x.v[e] *= q_scale;
            }
            store_vec16(Qs + r * QK_STRIDE + vec * VEC, x);
        }
        Vec16<T> zero;
#pragma unroll
        for (int e = 0; e < VEC; ++e) zero.v[e] = T(0);
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / Tr::COPY_ROWS; ++kk) {
            const int r = row0 + kk * Tr::COPY_ROWS;
            if (vec >= d_vecs) store_vec16(Ks + r * QK_STRIDE + vec * VEC, zero);
            if (vec >= dv_vecs) store_vec16(Vs + r * V_STRIDE + vec * VEC, zero);
        }
    }
    if (num_n_blocks > n_first)
        load_tile_async<Tr, QK_STRIDE>(Ks, k, p.k_row_stride,
                                       static_cast<long long>(n_first) * BLOCK_N, p.Lk, d_vecs);

    T m_i[TM];        // running row max of the scaled scores (log2 units for float)
    T l_i[TM];        // running row sum of exp(S - m_i), partial: this thread's keys only
    T acc[TM][TD];    // unnormalised O_i: rows r_i, this thread's TD columns
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        m_i[i] = -INFINITY;
        l_i[i] = T(0);
#pragma unroll
        for (int d = 0; d < TD; ++d) acc[i][d] = T(0);
    }

    for (int j = n_first; j < num_n_blocks; ++j) {
        const long long n0 = static_cast<long long>(j) * BLOCK_N;
        cp_async_wait_all();
        // K_j (and, on the first tile, Q_i and the zeroed columns) is visible to every
        // thread; every thread has finished the P~ V product of tile j-1, so Vs and Ps
        // may be overwritten.
        __syncthreads();
        load_tile_async<Tr, V_STRIDE>(Vs, v, p.v_row_stride, n0, p.Lk, dv_vecs);

        // -- S = Q_i K_j^T * scale: s[i][jj] for row r_i and key c_jj, (TM, TN) per thread
        T s[TM][TN];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int jj = 0; jj < TN; ++jj) s[i][jj] = T(0);
#pragma unroll
        for (int c0 = 0; c0 < Tr::D_VECS; c0 += Tr::D_GROUP) {
            if (c0 < d_vecs) {  // vectors past D are zero in Q and K: skip them
#pragma unroll
                for (int c = c0; c < c0 + Tr::D_GROUP; ++c) {
                    Vec16<T> kf[TN];  // K_j[c_jj, c*VEC : (c+1)*VEC]
#pragma unroll
                    for (int jj = 0; jj < TN; ++jj)
                        kf[jj] = load_vec16(Ks + (tc + jj * THREADS_PER_ROW) * QK_STRIDE + c * VEC);
#pragma unroll
                    for (int i = 0; i < TM; ++i) {
                        const Vec16<T> qf =  // Q_i[r_i, c*VEC : (c+1)*VEC]
                            load_vec16(Qs + (tr + i * THREAD_ROWS) * QK_STRIDE + c * VEC);
#pragma unroll
                        for (int jj = 0; jj < TN; ++jj)
#pragma unroll
                            for (int e = 0; e < VEC; ++e) s[i][jj] += qf.v[e] * kf[jj].v[e];
                    }
                }
            }
        }

        // -- mask keys past Lk and, if causal, above the diagonal; only tiles that cross
        // the sequence end or the diagonal of this block's first row need it
        const bool crosses_end = n0 + BLOCK_N > p.Lk;
        const bool crosses_diagonal = IS_CAUSAL && n0 + BLOCK_N - 1 > m0 + causal_shift;
        if constexpr (VARIANTS) {
            // -- or, with variants: softcap, ALiBi, bias, band and mask on every score of
            // the tiles that need it (all if any score changes, else those crossing the
            // band's edges or Lk)
            if (mod.changes_scores() || !mod.block_inside(m0, BLOCK_M, n0, BLOCK_N)) {
#pragma unroll
                for (int i = 0; i < TM; ++i)
#pragma unroll
                    for (int jj = 0; jj < TN; ++jj)
                        s[i][jj] = mod.modify(s[i][jj], m0 + tr + i * THREAD_ROWS,
                                              n0 + tc + jj * THREADS_PER_ROW);
            }
        } else if (crosses_end || crosses_diagonal) {
            const long long key_limit_ll = p.Lk - n0;
            const int key_limit = key_limit_ll < BLOCK_N ? static_cast<int>(key_limit_ll) : BLOCK_N;
            // key n0 + c is visible to row m0 + r iff c <= r + diag; diag clamped to
            // [-BLOCK_M - 1, BLOCK_N] keeps every comparison's result and fits an int
            long long diag_ll = m0 - n0 + causal_shift;
            diag_ll = diag_ll > BLOCK_N ? BLOCK_N : diag_ll;
            diag_ll = diag_ll < -BLOCK_M - 1 ? -BLOCK_M - 1 : diag_ll;
            const int diag = static_cast<int>(diag_ll);
#pragma unroll
            for (int i = 0; i < TM; ++i) {
                const int r = tr + i * THREAD_ROWS;
#pragma unroll
                for (int jj = 0; jj < TN; ++jj) {
                    const int c = tc + jj * THREADS_PER_ROW;
                    const bool visible = c < key_limit && (!IS_CAUSAL || c <= r + diag);
                    if (!visible) s[i][jj] = -INFINITY;
                }
            }
        }

        // -- dropout: the keep bits of this thread's scores (bit i * TN + jj)
        unsigned keep = ~0u;
        if constexpr (VARIANTS) {
            if (dropout_on(vp))
                keep = dropout_keep_simt<TM, TN>(
                    vp, b, [&](int i) { return m0 + tr + i * THREAD_ROWS; },
                    [&](int jj) { return n0 + tc + jj * THREADS_PER_ROW; }, tc & 3);
        }

        // -- update m_i and l_i; P~ = exp(S - m_new) into shared memory (P~ * Z with
        // dropout: the dropped weights leave acc, not l_i); rescale acc
#pragma unroll
        for (int i = 0; i < TM; ++i) {
            T m_new = m_i[i];
#pragma unroll
            for (int jj = 0; jj < TN; ++jj) m_new = Math::max(m_new, s[i][jj]);
#pragma unroll
            for (int lane_mask = 1; lane_mask < THREADS_PER_ROW; lane_mask *= 2)
                m_new = Math::max(m_new, __shfl_xor_sync(0xffffffffu, m_new, lane_mask));
            // a row that has seen only -inf keeps m = -inf; shifting by 0 instead gives
            // exp(-inf) = 0 rather than exp(-inf + inf) = NaN
            const T m_safe = safe_max(m_new);
            const T alpha = Math::exp(m_i[i] - m_safe);  // 0 when m_i was -inf, 1 if unchanged
            m_i[i] = m_new;
            T row_sum = T(0);
            const int r = tr + i * THREAD_ROWS;
#pragma unroll
            for (int jj = 0; jj < TN; ++jj) {
                const T p_ij = Math::exp(s[i][jj] - m_safe);
                row_sum += p_ij;
                T p_kept = p_ij;
                if constexpr (VARIANTS) p_kept = (keep >> (i * TN + jj)) & 1u ? p_ij : T(0);
                Ps[r * P_STRIDE + tc + jj * THREADS_PER_ROW] = p_kept;
            }
            l_i[i] = alpha * l_i[i] + row_sum;
#pragma unroll
            for (int d = 0; d < TD; ++d) acc[i][d] *= alpha;
        }

        cp_async_wait_all();
        // V_j and every thread's P~ are visible; every thread has finished reading K_j,
        // so Ks may be overwritten by the next tile's copy.
        __syncthreads();
        if (j + 1 < num_n_blocks)
            load_tile_async<Tr, QK_STRIDE>(Ks, k, p.k_row_stride, n0 + BLOCK_N, p.Lk, d_vecs);

        // -- acc += P~ V_j: (TM, BLOCK_N) x (BLOCK_N, TD) per thread
#pragma unroll
        for (int n = 0; n < BLOCK_N; n += VEC) {
            Vec16<T> pf[TM];  // P~[r_i, n : n + VEC]
#pragma unroll
            for (int i = 0; i < TM; ++i)
                pf[i] = load_vec16(Ps + (tr + i * THREAD_ROWS) * P_STRIDE + n);
#pragma unroll
            for (int u = 0; u < VEC; ++u) {
                Vec16<T> vf[TD_VECS];  // V_j[n + u, this thread's columns]
#pragma unroll
                for (int t = 0; t < TD_VECS; ++t)
                    vf[t] = load_vec16(Vs + (n + u) * V_STRIDE + (tc + t * THREADS_PER_ROW) * VEC);
#pragma unroll
                for (int i = 0; i < TM; ++i)
#pragma unroll
                    for (int t = 0; t < TD_VECS; ++t)
#pragma unroll
                        for (int e = 0; e < VEC; ++e) acc[i][t * VEC + e] += pf[i].v[u] * vf[t].v[e];
            }
        }
    }

    // -- epilogue: l_i summed over the row's 8 lanes (the same order in every lane, so
    // every lane holds the same bits); O_i = acc / l_i (with dropout also / (1 -
    // dropout_p)); lse = m_i + log(l_i). A row that saw no key has l_i = 0: zeros out,
    // lse = -inf.
    T o_scale = T(1);
    if constexpr (VARIANTS) o_scale = dropout_on(vp) ? static_cast<T>(vp.dropout_scale) : T(1);
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        T l = l_i[i];
#pragma unroll
        for (int lane_mask = 1; lane_mask < THREADS_PER_ROW; lane_mask *= 2)
            l += __shfl_xor_sync(0xffffffffu, l, lane_mask);
        T inv_l = safe_inverse(l);
        if constexpr (VARIANTS) inv_l *= o_scale;
        const long long row = m0 + tr + i * THREAD_ROWS;
        if (row < p.Lq) {
            T* o_row = o + row * p.o_row_stride;
#pragma unroll
            for (int t = 0; t < TD_VECS; ++t) {
                const int vec = tc + t * THREADS_PER_ROW;
                if (vec < dv_vecs) {
                    Vec16<T> x;
#pragma unroll
                    for (int e = 0; e < VEC; ++e) x.v[e] = acc[i][t * VEC + e] * inv_l;
                    store_vec16(o_row + vec * VEC, x);
                }
            }
            if (tc == 0) lse[row] = l == T(0) ? T(-INFINITY) : Math::lse(safe_max(m_i[i]), l);
        }
    }
}

template <typename T, int HEAD_DIM, bool IS_CAUSAL>
__global__ void __launch_bounds__(SimtTraits<T, HEAD_DIM>::NUM_THREADS)
flash_fwd_simt(const AttentionParams p) {
    flash_fwd_simt_body<T, HEAD_DIM, IS_CAUSAL, false>(p, VariantParams{});
}

// Left to itself ptxas caps the variants at 128-168 registers and spills (sm_80, float at
// 128, double at 32); two blocks per multiprocessor lets it use up to 255, and 168-234 do.
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(SimtTraits<T, HEAD_DIM>::NUM_THREADS, 2)
flash_fwd_simt_variants(const AttentionParams p, const VariantParams vp) {
    flash_fwd_simt_body<T, HEAD_DIM, false, true>(p, vp);
}

// The variants over packed sequences (attention_varlen), as flash_fwd_mma_varlen: each
// block attends the sequence of its batch element (sequence_params; lse in T).
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(SimtTraits<T, HEAD_DIM>::NUM_THREADS, 2)
flash_fwd_simt_varlen(const AttentionParams p, const VariantParams vp) {
    const long long b = static_cast<long long>(blockIdx.z) * gridDim.y + blockIdx.y;
    if (b >= p.n_batch) return;
    long long q_row0, k_row0;
    const AttentionParams ps = sequence_params<T, T>(p, vp, b, q_row0, k_row0);
    flash_fwd_simt_body<T, HEAD_DIM, false, true>(ps, vp);
}

}  // namespace cupyflash
