// Exact FlashAttention-2 backward for float32 and float64 on the FMA units (no TF32).
//
// The forward (flash_fwd_simt.cuh) saves lse = m + log(l) of every query row, so P is
// recomputed tile by tile, exactly, with no second softmax pass. With S = Q K^T,
// P = exp(S * scale - lse), dP = dO V^T and delta_i = rowsum(dO_i * O_i) (computed by the
// launcher beforehand), the gradients are (Dao 2023, FlashAttention-2, Algorithm 2):
//
//   dS = P * (dP - delta)          (elementwise; delta is broadcast along the keys)
//   dV = P^T dO        dK = scale * dS^T Q        dQ = scale * dS K
//
// (with dropout, the variants kernels: W = P * Z / (1 - dropout_p) with the forward's keep
// mask Z, dV = W^T dO and dS = P * (dP * Z / (1 - dropout_p) - delta); with softcap, dS of
// the raw scores S * scale, dS * (1 - tanh^2(S * scale / softcap)), feeds dK and dQ)
//
// flash_bwd_simt: one thread block owns BLOCK_N keys of one batch element. K_j and V_j
// stay in shared memory and dK_j, dV_j in registers while the query tiles stream past:
//
//   for each query tile i that sees a key of tile j (causal: the tiles below the diagonal):
//     S  = Q_i K_j^T;   dP = dO_i V_j^T                        (BLOCK_M x BLOCK_N)
//     P  = exp(S * scale - lse_i);   dS = P * (dP - delta_i)    (0 where masked)
//     dV_j += P^T dO_i;   dK_j += dS^T Q_i                      (BLOCK_N x HEAD_DIM)
//     ATOMIC_DQ:  dq_accum_i += dS K_j                          (atomicAdd, no scale)
//   dk_j = scale * dK_j;   dv_j = dV_j
//
// flash_bwd_dq_simt: the deterministic dQ, with the roles of queries and keys swapped.
// One block owns BLOCK_M queries: Q_i, dO_i stay in shared memory and dQ_i in registers
// while the key tiles stream past, in order, so every run adds in the same order:
//
//   for each key tile j that query tile i sees:
//     recompute S, P, dP, dS as above;   dQ_i += dS K_j
//   dq_accum_i = dQ_i                                           (plain stores, no scale)
//
// Register blocking: every product reads each shared-memory value into a register that
// feeds several FMAs. The 128 threads are split three ways (SimtBwdLayout), each a grid of
// THREAD_ROWS x THREADS_PER_ROW lanes in which a thread owns up to 4 rows:
// - S, dP (BLOCK_M x BLOCK_N): TM query rows r_i = tr + i * THREAD_ROWS and TN keys
//   c_jj = tc + jj * THREADS_PER_ROW; per 16-byte vector of the head dim, TM + TN loads
//   feed TM x TN x VEC FMAs (the forward's S);
// - dQ (BLOCK_M x HEAD_DIM): DQ_TM query rows and DQ_TD_VECS column vectors; per VEC keys,
//   DQ_TM vectors of dS and VEC x DQ_TD_VECS vectors of K feed DQ_TM x DQ_TD x VEC FMAs
//   (the forward's P~ V);
// - dK, dV (BLOCK_N x HEAD_DIM): KV_TN keys and KV_TD_VECS column vectors. dV += P^T dO is
//   a sum of outer products over the query rows m: KV_TN scalars P[m, n_i] and KV_TD_VECS
//   vectors of dO[m, :] feed KV_TN x KV_TD FMAs. P and dO are both read along row m, so
//   neither is ever read transposed, and a warp reads one or two rows (no bank conflicts).
//
// Float works in log2 units: P = exp2(S * scale_log2 - lse * log2(e)) with exp2f, as the
// forward's softmax; doubles use scale, lse and exp. Q is not pre-scaled (dK needs it
// unscaled and scale may be 0): the scale goes into the one FMA that forms the exponent.
// P is 0 (never inf or NaN) for masked entries: keys past Lk, queries past Lq, causal
// entries above the diagonal, and every entry of a row whose lse is -inf (a row that saw
// no key in the forward).
//
// Copies: Q, dO, K and V arrive through cp.async (16 bytes each), so q, k, v and dout
// must have 16-byte aligned rows whose length is a multiple of VEC elements (the launcher
// uses _kernel_ready with align_elems = pad_d_to = VEC, as for the forward); lse and
// delta are read with plain loads. Columns past D (and past Dv) read as zero and so give
// zero gradients. dk, dv and dq_accum are written element by element (any grad_row
// works), columns < min(HEAD_DIM, grad_row) only; the atomic dQ adds only to columns
// < min(D, grad_row), so the launcher must zero dq_accum before flash_bwd_simt<..., true>.
#pragma once

#include "flash_fwd_simt.cuh"  // Vec16, load_vec16, cp_async_16, SimtMath

namespace cupyflash {

// ----------------------------------------------------------------------------------------
// Tile sizes per element type and padded head dim: (BLOCK_M, BLOCK_N) of flash_bwd_simt
// (BLOCK_N keys stay, BLOCK_M queries stream) and (DQ_BLOCK_M, DQ_BLOCK_N) of
// flash_bwd_dq_simt (DQ_BLOCK_M queries stay, DQ_BLOCK_N keys stream).
// _cupy_backend._simt_backward_config repeats this table.
//
// Not measured on a GPU yet (none was used); the reasons are the shared-memory budget and
// ptxas (NVRTC 13.5, sm_80 and sm_90a):
// - every configuration fits in 99 KiB of shared memory (the opt-in limit of sm_86/sm_89/
//   sm_120), so one set of variants serves every GPU from sm_80 on. Both kernels hold four
//   tiles of HEAD_DIM + VEC columns (Q, dO, K, V; the forward holds three), and that
//   bounds the tiles: double at HEAD_DIM = 256 needs an 8-row query tile in flash_bwd_simt
//   and takes exactly 99 KiB with BLOCK_N = 16;
// - the kept dimension (BLOCK_N of flash_bwd_simt, DQ_BLOCK_M of flash_bwd_dq_simt) is the
//   larger one where shared memory allows: the streamed tiles' global reads are amortised
//   over it. dK and dV take 2 x BLOCK_N x HEAD_DIM / 128 = 16-64 accumulators per thread
//   (up to 128 registers for double); every variant compiles to <= 255 registers, no spill;
// - 44-99 KiB of shared memory and 121-254 registers per thread allow 2 blocks of 128
//   threads per SM on A100 (1 for double at 256) and 2-3 on H100: hence
//   __launch_bounds__(128, 2), which also keeps ptxas from capping some variants at 128
//   or 168 registers and spilling;
// - the splits need BLOCK_M x BLOCK_N >= 128 and rows that split evenly (static_asserts in
//   SimtBwdLayout).
// ----------------------------------------------------------------------------------------
template <typename T, int HEAD_DIM> struct SimtBwdTiles;
template <> struct SimtBwdTiles<float, 32> {
    static constexpr int BLOCK_M = 32, BLOCK_N = 64, DQ_BLOCK_M = 64, DQ_BLOCK_N = 64;
};
template <> struct SimtBwdTiles<float, 64> {
    static constexpr int BLOCK_M = 32, BLOCK_N = 64, DQ_BLOCK_M = 64, DQ_BLOCK_N = 32;
};
template <> struct SimtBwdTiles<float, 128> {
    static constexpr int BLOCK_M = 32, BLOCK_N = 32, DQ_BLOCK_M = 32, DQ_BLOCK_N = 32;
};
template <> struct SimtBwdTiles<float, 256> {
    static constexpr int BLOCK_M = 16, BLOCK_N = 16, DQ_BLOCK_M = 16, DQ_BLOCK_N = 16;
};
template <> struct SimtBwdTiles<double, 32> {
    static constexpr int BLOCK_M = 32, BLOCK_N = 32, DQ_BLOCK_M = 64, DQ_BLOCK_N = 32;
};
template <> struct SimtBwdTiles<double, 64> {
    static constexpr int BLOCK_M = 16, BLOCK_N = 32, DQ_BLOCK_M = 32, DQ_BLOCK_N = 32;
};
template <> struct SimtBwdTiles<double, 128> {
    static constexpr int BLOCK_M = 16, BLOCK_N = 16, DQ_BLOCK_M = 16, DQ_BLOCK_N = 16;
};
template <> struct SimtBwdTiles<double, 256> {
    static constexpr int BLOCK_M = 8, BLOCK_N = 16, DQ_BLOCK_M = 16, DQ_BLOCK_N = 8;
};

// The thread layouts and the shared-memory layout of one pair of tiles: BLOCK_M query
// rows and BLOCK_N keys of HEAD_DIM columns.
template <typename T, int HEAD_DIM, int BLOCK_M_, int BLOCK_N_>
struct SimtBwdLayout {
    static constexpr int BLOCK_M = BLOCK_M_;  // query rows
    static constexpr int BLOCK_N = BLOCK_N_;  // keys
    static constexpr int NUM_THREADS = 128;
    static constexpr int VEC = 16 / int(sizeof(T));  // elements per 16-byte vector
    static constexpr int D_VECS = HEAD_DIM / VEC;    // vectors in one padded row
    static constexpr int D_GROUP = 4;                // vectors per step of S's inner loop

    // Three splits of the 128 threads, each a grid of THREAD_ROWS rows x THREADS_PER_ROW
    // neighbouring lanes: thread (tr, tc) = (tid / THREADS_PER_ROW, tid % THREADS_PER_ROW)
    // owns rows tr + i * THREAD_ROWS and columns (or column vectors) tc + j * THREADS_PER_ROW.
    // Up to 4 rows each, as square as the tile allows: a few loads feed many FMAs.
    // S, dP, dS (BLOCK_M x BLOCK_N): TM query rows x TN keys per thread.
    static constexpr int S_ELEMS = BLOCK_M * BLOCK_N / NUM_THREADS;
    static constexpr int TM = S_ELEMS < 4 ? S_ELEMS : 4;
    static constexpr int THREAD_ROWS = BLOCK_M / TM;
    static constexpr int THREADS_PER_ROW = NUM_THREADS / THREAD_ROWS;
    static constexpr int TN = BLOCK_N / THREADS_PER_ROW;
    // dQ (BLOCK_M x HEAD_DIM): DQ_TM query rows x DQ_TD columns (DQ_TD_VECS vectors).
    static constexpr int DQ_ELEMS = BLOCK_M * HEAD_DIM / NUM_THREADS;
    static constexpr int DQ_TM = DQ_ELEMS / VEC < 4 ? DQ_ELEMS / VEC : 4;
    static constexpr int DQ_THREAD_ROWS = BLOCK_M / DQ_TM;
    static constexpr int DQ_THREADS_PER_ROW = NUM_THREADS / DQ_THREAD_ROWS;
    static constexpr int DQ_TD = HEAD_DIM / DQ_THREADS_PER_ROW;
    static constexpr int DQ_TD_VECS = DQ_TD / VEC;
    // dK, dV (BLOCK_N x HEAD_DIM): KV_TN keys x KV_TD columns (KV_TD_VECS vectors).
    static constexpr int KV_ELEMS = BLOCK_N * HEAD_DIM / NUM_THREADS;
    static constexpr int KV_TN = KV_ELEMS / VEC < 4 ? KV_ELEMS / VEC : 4;
    static constexpr int KV_THREAD_ROWS = BLOCK_N / KV_TN;
    static constexpr int KV_THREADS_PER_ROW = NUM_THREADS / KV_THREAD_ROWS;
    static constexpr int KV_TD = HEAD_DIM / KV_THREADS_PER_ROW;
    static constexpr int KV_TD_VECS = KV_TD / VEC;

    // Shared memory, in elements. S and dP read K and V (and Q and dO when THREAD_ROWS
    // spans a warp) 8 different rows at a time per quarter warp, the unit of a 16-byte
    // load, so all four tiles carry VEC elements (16 bytes) of padding, as the forward's Q
    // and K: consecutive rows start 4 banks apart and those loads do not conflict. The
    // other products read one row of them per warp. P and dS get the same 16 bytes of
    // padding as the forward's P~: their scalar stores by S's split conflict at most 2-way.
    static constexpr int STRIDE = HEAD_DIM + VEC;
    static constexpr int P_STRIDE = BLOCK_N + VEC;
    static constexpr int Q_OFFSET = 0;                              // Q_i:  (BLOCK_M, STRIDE)
    static constexpr int DO_OFFSET = Q_OFFSET + BLOCK_M * STRIDE;   // dO_i: (BLOCK_M, STRIDE)
    static constexpr int K_OFFSET = DO_OFFSET + BLOCK_M * STRIDE;   // K_j:  (BLOCK_N, STRIDE)
    static constexpr int V_OFFSET = K_OFFSET + BLOCK_N * STRIDE;    // V_j:  (BLOCK_N, STRIDE)
    static constexpr int DS_OFFSET = V_OFFSET + BLOCK_N * STRIDE;   // dS:   (BLOCK_M, P_STRIDE)
    static constexpr int P_OFFSET = DS_OFFSET + BLOCK_M * P_STRIDE; // P:    (BLOCK_M, P_STRIDE)
    static constexpr int DQ_SMEM_BYTES = P_OFFSET * int(sizeof(T));  // flash_bwd_dq_simt: no P
    static constexpr int DKDV_SMEM_BYTES = (P_OFFSET + BLOCK_M * P_STRIDE) * int(sizeof(T));

    static_assert(HEAD_DIM == 32 || HEAD_DIM == 64 || HEAD_DIM == 128 || HEAD_DIM == 256,
                  "HEAD_DIM must be 32, 64, 128 or 256");
    static_assert(TM >= 1 && BLOCK_M % TM == 0 && NUM_THREADS % THREAD_ROWS == 0 &&
                  TN >= 1 && BLOCK_N % THREADS_PER_ROW == 0, "S splits evenly");
    static_assert(DQ_TM >= 1 && BLOCK_M % DQ_TM == 0 && NUM_THREADS % DQ_THREAD_ROWS == 0 &&
                  DQ_TD_VECS >= 1 && HEAD_DIM % (DQ_THREADS_PER_ROW * VEC) == 0,
                  "dQ splits evenly, in whole vectors");
    static_assert(KV_TN >= 1 && BLOCK_N % KV_TN == 0 && NUM_THREADS % KV_THREAD_ROWS == 0 &&
                  KV_TD_VECS >= 1 && HEAD_DIM % (KV_THREADS_PER_ROW * VEC) == 0,
                  "dK and dV split evenly, in whole vectors");
    static_assert(BLOCK_N % VEC == 0, "dS rows are read in vectors");
    static_assert(D_VECS % D_GROUP == 0, "S's inner loop steps D_GROUP vectors at a time");
};

template <typename T, int HEAD_DIM>
struct SimtBwdTraits {
    using Tiles = SimtBwdTiles<T, HEAD_DIM>;
    using DkDv = SimtBwdLayout<T, HEAD_DIM, Tiles::BLOCK_M, Tiles::BLOCK_N>;  // flash_bwd_simt
    using Dq = SimtBwdLayout<T, HEAD_DIM, Tiles::DQ_BLOCK_M, Tiles::DQ_BLOCK_N>;  // ..._dq_simt
    static constexpr int NUM_THREADS = 128;
    // __launch_bounds__' blocks per SM: without it ptxas capped some variants at 128 or
    // 168 registers and spilled 8-24 bytes; with 2 it may use up to 255 and none spills.
    static constexpr int MIN_BLOCKS = 2;
    static constexpr int VEC = DkDv::VEC;
    static constexpr int DKDV_SMEM_BYTES = DkDv::DKDV_SMEM_BYTES;
    static constexpr int DQ_SMEM_BYTES = Dq::DQ_SMEM_BYTES;
    static_assert(DkDv::NUM_THREADS == NUM_THREADS && Dq::NUM_THREADS == NUM_THREADS, "threads");
    static_assert(DKDV_SMEM_BYTES <= 99 * 1024 && DQ_SMEM_BYTES <= 99 * 1024,
                  "must fit the smallest opt-in shared memory (sm_86)");
};

// The exponent of P in the units of SimtMath<T>::exp: log2 units for float (exp2f),
// natural units for double (exp).
template <typename T> struct SimtBwdMath;
template <> struct SimtBwdMath<float> {
    static __device__ __forceinline__ float lse_units(float lse) {
        return lse * 1.4426950408889634f;  // log2(e)
    }
    // s * scale_log2 - lse * log2(e) in one rounding
    static __device__ __forceinline__ float exponent(float s, float exp_scale, float lse_units) {
        return fmaf(s, exp_scale, -lse_units);
    }
};
template <> struct SimtBwdMath<double> {
    static __device__ __forceinline__ double lse_units(double lse) { return lse; }
    static __device__ __forceinline__ double exponent(double s, double exp_scale,
                                                      double lse_units) {
        return fma(s, exp_scale, -lse_units);
    }
};

// ----------------------------------------------------------------------------------------
// Tile copies and products for a SimtBwdLayout L; (tr, tc) is the thread's position in the
// split a function uses.
// ----------------------------------------------------------------------------------------

// Start copying rows [row0, row0 + ROWS) of a (n_rows, *) matrix into a (ROWS, STRIDE) tile;
// only the first `vecs` vectors of each row; rows >= n_rows are zero-filled. Thread t copies
// vector t % D_VECS of rows t / D_VECS + k * COPY_ROWS. Its source address steps from row
// to row by one add: with addresses computed per copy from the tile's start, the compiler
// kept each row's offset in registers across the kernel's loop (flash_bwd_simt<double, 256>
// went from 255 registers and 56-144 bytes of spills to 196 registers).
template <int ROWS, class L, typename T>
__device__ __forceinline__ void copy_rows_async(T* tile, const T* src, long long row_stride,
                                                long long row0, long long n_rows, int vecs) {
    constexpr int COPY_ROWS = L::NUM_THREADS / L::D_VECS;  // rows one pass of the block covers
    static_assert(L::NUM_THREADS % L::D_VECS == 0 && ROWS % COPY_ROWS == 0,
                  "copies cover the tile");
    const int vec = threadIdx.x % L::D_VECS;
    const int r0 = threadIdx.x / L::D_VECS;
    if (vec < vecs) {
        const long long rows_left = n_rows - row0 - r0;  // copies k * COPY_ROWS < rows_left read
        const long long step = COPY_ROWS * row_stride;
        const T* g = src + (row0 + r0) * row_stride + vec * L::VEC;
        T* dst = tile + r0 * L::STRIDE + vec * L::VEC;
#pragma unroll
        for (int k = 0; k < ROWS / COPY_ROWS; ++k) {
            const bool in_range = k * COPY_ROWS < rows_left;
            // out of range: a zero-filled copy whose source is row 0 (always there)
            cp_async_16(dst + k * COPY_ROWS * L::STRIDE, in_range ? g : src, in_range);
            g += step;
        }
    }
    cp_async_commit();  // every thread commits a group (possibly empty): wait_group counts match
}

// Zero the vectors [vecs, D_VECS) of every row of a (ROWS, STRIDE) tile: the columns no
// copy writes (past D or Dv), once per kernel; stale memory there (0 * NaN) would poison S.
template <int ROWS, class L, typename T>
__device__ __forceinline__ void zero_columns(T* tile, int vecs) {
    constexpr int VECS = ROWS * L::D_VECS;
    Vec16<T> zero;
#pragma unroll
    for (int e = 0; e < L::VEC; ++e) zero.v[e] = T(0);
#pragma unroll
    for (int k = 0; k < (VECS + L::NUM_THREADS - 1) / L::NUM_THREADS; ++k) {
        const int idx = threadIdx.x + k * L::NUM_THREADS;
        const int vec = idx % L::D_VECS;
        if ((VECS % L::NUM_THREADS == 0 || idx < VECS) && vec >= vecs)
            store_vec16(tile + (idx / L::D_VECS) * L::STRIDE + vec * L::VEC, zero);
    }
}

// s = A_i B_j^T over the first `vecs` vectors of the head dim: s[i][jj] = A[r_i, :] . B[c_jj, :]
// (S = Q_i K_j^T, dP = dO_i V_j^T). A: (BLOCK_M, STRIDE), B: (BLOCK_N, STRIDE). S split.
template <class L, typename T>
__device__ __forceinline__ void dot_rows(T (&s)[L::TM][L::TN], const T* A, const T* B, int tr,
                                         int tc, int vecs) {
#pragma unroll
    for (int i = 0; i < L::TM; ++i)
#pragma unroll
        for (int jj = 0; jj < L::TN; ++jj) s[i][jj] = T(0);
#pragma unroll
    for (int c0 = 0; c0 < L::D_VECS; c0 += L::D_GROUP) {
        if (c0 < vecs) {  // vectors past D (Dv) are zero in both tiles: skip them
#pragma unroll
            for (int c = c0; c < c0 + L::D_GROUP; ++c) {
                Vec16<T> bf[L::TN];  // B[c_jj, c*VEC : (c+1)*VEC]
#pragma unroll
                for (int jj = 0; jj < L::TN; ++jj)
                    bf[jj] = load_vec16(B + (tc + jj * L::THREADS_PER_ROW) * L::STRIDE +
                                        c * L::VEC);
#pragma unroll
                for (int i = 0; i < L::TM; ++i) {
                    const Vec16<T> af =  // A[r_i, c*VEC : (c+1)*VEC]
                        load_vec16(A + (tr + i * L::THREAD_ROWS) * L::STRIDE + c * L::VEC);
#pragma unroll
                    for (int jj = 0; jj < L::TN; ++jj)
#pragma unroll
                        for (int e = 0; e < L::VEC; ++e) s[i][jj] += af.v[e] * bf[jj].v[e];
                }
            }
        }
    }
}

// The key masks of one (BLOCK_M, BLOCK_N) tile pair: query m0 + r sees key n0 + c iff
// c < key_limit and (causal) c <= r + diag. (Queries past Lq are masked by RowStats::live.)
struct TileMask {
    int key_limit;  // min(Lk - n0, BLOCK_N)
    int diag;       // m0 - n0 + (Lk - Lq), clamped to [-BLOCK_M - 1, BLOCK_N]
};

template <class L>
__device__ __forceinline__ TileMask tile_mask(const AttentionParams& p, long long m0,
                                              long long n0) {
    const long long keys = p.Lk - n0;
    // the clamp keeps every comparison c <= r + diag (0 <= r < BLOCK_M, 0 <= c < BLOCK_N)
    // and fits an int
    long long diag = m0 - n0 + (p.Lk - p.Lq);
    diag = diag > L::BLOCK_N ? L::BLOCK_N : diag;
    diag = diag < -L::BLOCK_M - 1 ? -L::BLOCK_M - 1 : diag;
    return {keys < L::BLOCK_N ? static_cast<int>(keys) : L::BLOCK_N, static_cast<int>(diag)};
}

// lse (in exponent units) and delta of a thread's query rows r_i = tr + i * THREAD_ROWS of
// the S split; live is false for rows past Lq and rows with lse = -inf, whose P is 0.
template <class L, typename T>
struct RowStats {
    T lse[L::TM];
    T delta[L::TM];
    bool live[L::TM];
};

template <class L, typename T>
__device__ __forceinline__ RowStats<L, T> load_row_stats(const T* lse, const T* delta,
                                                         long long m0, long long Lq, int tr) {
    RowStats<L, T> st;
#pragma unroll
    for (int i = 0; i < L::TM; ++i) {
        const long long row = m0 + tr + i * L::THREAD_ROWS;
        const T l = row < Lq ? lse[row] : T(-INFINITY);
        st.live[i] = l != T(-INFINITY);
        st.lse[i] = st.live[i] ? SimtBwdMath<T>::lse_units(l) : T(0);
        st.delta[i] = st.live[i] ? delta[row] : T(0);
    }
    return st;
}

// -- P = exp(S * scale - lse), dS = P * (dP - delta) for a thread's (TM, TN) block, 0 where
// masked, into the (BLOCK_M, P_STRIDE) tiles dSs and (unless null) Ps. S split.
template <class L, bool IS_CAUSAL, typename T>
__device__ __forceinline__ void softmax_backward(const T (&s)[L::TM][L::TN],
                                                 const T (&dp)[L::TM][L::TN],
                                                 const RowStats<L, T>& st, T exp_scale,
                                                 const TileMask& mask, T* Ps, T* dSs, int tr,
                                                 int tc) {
#pragma unroll
    for (int i = 0; i < L::TM; ++i) {
        const int r = tr + i * L::THREAD_ROWS;
#pragma unroll
        for (int jj = 0; jj < L::TN; ++jj) {
            const int c = tc + jj * L::THREADS_PER_ROW;
            const bool visible =
                st.live[i] && c < mask.key_limit && (!IS_CAUSAL || c <= r + mask.diag);
            const T p_ij = visible
                ? SimtMath<T>::exp(SimtBwdMath<T>::exponent(s[i][jj], exp_scale, st.lse[i]))
                : T(0);
            const T ds_ij = visible ? p_ij * (dp[i][jj] - st.delta[i]) : T(0);
            if (Ps != nullptr) Ps[r * L::P_STRIDE + c] = p_ij;
            dSs[r * L::P_STRIDE + c] = ds_ij;
        }
    }
}

// -- the same with the variants: the exponent is ScoreModifier's final score (score units)
// minus lse; a score it sets to -inf (outside the band, masked, past Lk) gives P = 0.
// Dropout: keep holds the keep bits Z (bit i * TN + jj; all ones without dropout) and
// drop_scale 1 / (1 - dropout_p) (1 without): Ps gets the weights W = P * Z * drop_scale
// of dV += W^T dO, and dS = P * (dP * Z * drop_scale - delta). SOFTCAP: dS of the raw
// scores, times 1 - th^2 (th = tanh(raw score / softcap), from modify), the gradient dK
// and dQ need; the callers choose it by a uniform test, so that without softcap no factor
// is computed. dbias (return_dbias; else null) points at the thread's first score, (tr,
// tc): each visible score adds its dS before the cap's factor (bias comes after the cap).
template <class L, bool SOFTCAP, class Mod, typename T>
__device__ __forceinline__ void softmax_backward_variants(const T (&s)[L::TM][L::TN],
                                                          const T (&dp)[L::TM][L::TN],
                                                          const RowStats<L, T>& st, T exp_scale,
                                                          const Mod& mod, long long m0,
                                                          long long n0, unsigned keep,
                                                          T drop_scale, T* Ps, T* dSs, int tr,
                                                          int tc, const BackwardParams& bp,
                                                          T* dbias) {
#pragma unroll
    for (int i = 0; i < L::TM; ++i) {
        const int r = tr + i * L::THREAD_ROWS;
#pragma unroll
        for (int jj = 0; jj < L::TN; ++jj) {
            const int c = tc + jj * L::THREADS_PER_ROW;
            T th;
            const T x = mod.modify(s[i][jj] * exp_scale, m0 + r, n0 + c, th);
            const bool visible = st.live[i] && x != T(-INFINITY);
            const T p_ij = visible ? SimtMath<T>::exp(x - st.lse[i]) : T(0);
            const T z = (keep >> (i * L::TN + jj)) & 1u ? drop_scale : T(0);  // Z / (1 - p)
            T ds_ij = visible ? p_ij * fma(dp[i][jj], z, -st.delta[i]) : T(0);
            // a hidden score (past Lq or Lk too) adds nothing to dbias
            if (dbias != nullptr && visible && ds_ij != T(0))
                add_dbias(bp, dbias, i * L::THREAD_ROWS, jj * L::THREADS_PER_ROW, ds_ij);
            if constexpr (SOFTCAP) ds_ij *= Mod::softcap_factor(th);
            if (Ps != nullptr) Ps[r * L::P_STRIDE + c] = p_ij * z;
            dSs[r * L::P_STRIDE + c] = ds_ij;
        }
    }
}

// The keep bits of a thread's (TM, TN) scores for softmax_backward_variants (all ones
// without dropout), and 1 / (1 - dropout_p) (1 without).
template <class L, typename T>
__device__ __forceinline__ unsigned dropout_keep_tile(const VariantParams& vp, long long b,
                                                      long long m0, long long n0, int tr, int tc,
                                                      T& drop_scale) {
    static_assert(L::THREADS_PER_ROW % 4 == 0 && L::BLOCK_N % 4 == 0,
                  "dropout: four neighbouring keys on four neighbouring lanes");
    drop_scale = T(1);
    if (!dropout_on(vp)) return ~0u;
    drop_scale = static_cast<T>(vp.dropout_scale);
    return dropout_keep_simt<L::TM, L::TN>(
        vp, b, [&](int i) { return m0 + tr + i * L::THREAD_ROWS; },
        [&](int jj) { return n0 + tc + jj * L::THREADS_PER_ROW; }, tc & 3);
}

// acc += A^T B over the BLOCK_M query rows m: acc[i][t*VEC + e] += A[m, n_i] * B[m, col]
// with n_i = tr + i * KV_THREAD_ROWS, col = (tc + t * KV_THREADS_PER_ROW) * VEC + e
// (dV_j += P^T dO_i, dK_j += dS^T Q_i). A: (BLOCK_M, P_STRIDE), B: (BLOCK_M, STRIDE).
// dK, dV split.
template <class L, typename T>
__device__ __forceinline__ void accumulate_outer(T (&acc)[L::KV_TN][L::KV_TD], const T* A,
                                                 const T* B, int tr, int tc) {
#pragma unroll 4
    for (int m = 0; m < L::BLOCK_M; ++m) {
        T af[L::KV_TN];  // A[m, n_i]
#pragma unroll
        for (int i = 0; i < L::KV_TN; ++i) af[i] = A[m * L::P_STRIDE + tr + i * L::KV_THREAD_ROWS];
        Vec16<T> bf[L::KV_TD_VECS];  // B[m, this thread's columns]
#pragma unroll
        for (int t = 0; t < L::KV_TD_VECS; ++t)
            bf[t] = load_vec16(B + m * L::STRIDE + (tc + t * L::KV_THREADS_PER_ROW) * L::VEC);
#pragma unroll
        for (int i = 0; i < L::KV_TN; ++i)
#pragma unroll
            for (int t = 0; t < L::KV_TD_VECS; ++t)
#pragma unroll
                for (int e = 0; e < L::VEC; ++e) acc[i][t * L::VEC + e] += af[i] * bf[t].v[e];
    }
}

// acc += dS K_j: acc[i][t*VEC + e] += sum_n dS[r_i, n] * K[n, col] with
// r_i = tr + i * DQ_THREAD_ROWS, col = (tc + t * DQ_THREADS_PER_ROW) * VEC + e, as the
// forward's P~ V. dS: (BLOCK_M, P_STRIDE), K: (BLOCK_N, STRIDE). dQ split.
template <class L, typename T>
__device__ __forceinline__ void accumulate_dq(T (&acc)[L::DQ_TM][L::DQ_TD], const T* dSs,
                                              const T* Ks, int tr, int tc) {
#pragma unroll
    for (int n = 0; n < L::BLOCK_N; n += L::VEC) {
        Vec16<T> sf[L::DQ_TM];  // dS[r_i, n : n + VEC]
#pragma unroll
        for (int i = 0; i < L::DQ_TM; ++i)
            sf[i] = load_vec16(dSs + (tr + i * L::DQ_THREAD_ROWS) * L::P_STRIDE + n);
#pragma unroll
        for (int u = 0; u < L::VEC; ++u) {
            Vec16<T> kf[L::DQ_TD_VECS];  // K_j[n + u, this thread's columns]
#pragma unroll
            for (int t = 0; t < L::DQ_TD_VECS; ++t)
                kf[t] = load_vec16(Ks + (n + u) * L::STRIDE +
                                   (tc + t * L::DQ_THREADS_PER_ROW) * L::VEC);
#pragma unroll
            for (int i = 0; i < L::DQ_TM; ++i)
#pragma unroll
                for (int t = 0; t < L::DQ_TD_VECS; ++t)
#pragma unroll
                    for (int e = 0; e < L::VEC; ++e)
                        acc[i][t * L::VEC + e] += sf[i].v[u] * kf[t].v[e];
        }
    }
}

// Write (or with ATOMIC, atomically add) a thread's (DQ_TM, DQ_TD) block of dQ_i to rows
// m0 + r_i < Lq, columns < col_limit of dq_accum. dQ split.
template <class L, bool ATOMIC, typename T>
__device__ __forceinline__ void store_dq(const T (&dq)[L::DQ_TM][L::DQ_TD], T* dq_accum,
                                         long long grad_row, long long m0, long long Lq,
                                         long long col_limit, int tr, int tc) {
#pragma unroll
    for (int i = 0; i < L::DQ_TM; ++i) {
        const long long row = m0 + tr + i * L::DQ_THREAD_ROWS;
        if (row < Lq) {
            T* dq_row = dq_accum + row * grad_row;
#pragma unroll
            for (int t = 0; t < L::DQ_TD_VECS; ++t)
#pragma unroll
                for (int e = 0; e < L::VEC; ++e) {
                    const int col = (tc + t * L::DQ_THREADS_PER_ROW) * L::VEC + e;
                    if (col < col_limit) {
                        if (ATOMIC) atomicAdd(dq_row + col, dq[i][t * L::VEC + e]);
                        else dq_row[col] = dq[i][t * L::VEC + e];
                    }
                }
        }
    }
}

// The launcher must give NUM_THREADS threads and at least smem_bytes of dynamic shared
// memory; trap (a launch error) rather than compute garbage or write past the end if
// _cupy_backend's table ever disagrees with SimtBwdTiles.
__device__ __forceinline__ void check_launch(int num_threads, int smem_bytes) {
    unsigned dynamic_smem;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dynamic_smem));
    if (dynamic_smem < static_cast<unsigned>(smem_bytes) ||
        blockDim.x != static_cast<unsigned>(num_threads))
        __trap();
}

// ----------------------------------------------------------------------------------------
// dK, dV (and with ATOMIC_DQ, dQ by atomics). Grid: (ceil(Lk / BLOCK_N), min(n_batch,
// 65535), ceil(n_batch / 65535)); 128 threads; SimtBwdTraits::DKDV_SMEM_BYTES of dynamic
// shared memory.
// ----------------------------------------------------------------------------------------
// flash_bwd_simt and flash_bwd_simt_variants (bias, mask, window with causal folded in,
// ALiBi: attention_variants.cuh; vp is read only with VARIANTS) share this body.
template <typename T, int HEAD_DIM, bool IS_CAUSAL, bool ATOMIC_DQ, bool VARIANTS>
__device__ __forceinline__ void flash_bwd_simt_body(const AttentionParams& p,
                                                    const BackwardParams& bp,
                                                    const VariantParams& vp) {
    using L = typename SimtBwdTraits<T, HEAD_DIM>::DkDv;
    constexpr int BLOCK_M = L::BLOCK_M, BLOCK_N = L::BLOCK_N, VEC = L::VEC;
    constexpr int TM = L::TM, TN = L::TN, DQ_TM = L::DQ_TM, DQ_TD = L::DQ_TD;
    constexpr int KV_TN = L::KV_TN, KV_TD = L::KV_TD, KV_TD_VECS = L::KV_TD_VECS;

    const long long b = static_cast<long long>(blockIdx.z) * gridDim.y + blockIdx.y;
    if (b >= p.n_batch) return;
    check_launch(L::NUM_THREADS, L::DKDV_SMEM_BYTES);

    const long long n0 = static_cast<long long>(blockIdx.x) * BLOCK_N;  // keys [n0, n0 + BLOCK_N)
    const BatchOffsets off = batch_offsets(p, b);
    const T* q = static_cast<const T*>(p.q) + off.q;
    const T* k = static_cast<const T*>(p.k) + off.k;
    const T* v = static_cast<const T*>(p.v) + off.v;
    const T* dout = static_cast<const T*>(bp.dout) + off.o;   // o's strides
    const T* lse = static_cast<const T*>(p.lse) + b * p.Lq;
    const T* delta = static_cast<const T*>(bp.delta) + b * p.Lq;
    T* dq_accum = static_cast<T*>(bp.dq_accum) + b * p.Lq * bp.grad_row;
    T* dk = static_cast<T*>(bp.dk) + b * p.Lk * bp.grad_row;
    T* dv = static_cast<T*>(bp.dv) + b * p.Lk * bp.grad_row;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* Qs = reinterpret_cast<T*>(smem_raw) + L::Q_OFFSET;    // (BLOCK_M, STRIDE)
    T* dOs = reinterpret_cast<T*>(smem_raw) + L::DO_OFFSET;  // (BLOCK_M, STRIDE)
    T* Ks = reinterpret_cast<T*>(smem_raw) + L::K_OFFSET;    // (BLOCK_N, STRIDE)
    T* Vs = reinterpret_cast<T*>(smem_raw) + L::V_OFFSET;    // (BLOCK_N, STRIDE)
    T* dSs = reinterpret_cast<T*>(smem_raw) + L::DS_OFFSET;  // (BLOCK_M, P_STRIDE)
    T* Ps = reinterpret_cast<T*>(smem_raw) + L::P_OFFSET;    // (BLOCK_M, P_STRIDE)

    const int tid = threadIdx.x;
    const int tr = tid / L::THREADS_PER_ROW;     // S split: rows tr + i * THREAD_ROWS
    const int tc = tid % L::THREADS_PER_ROW;     //          keys tc + jj * THREADS_PER_ROW
    const int kr = tid / L::KV_THREADS_PER_ROW;  // dK, dV split: keys kr + i * KV_THREAD_ROWS
    const int kc = tid % L::KV_THREADS_PER_ROW;
    const int qr = tid / L::DQ_THREADS_PER_ROW;  // dQ split: rows qr + i * DQ_THREAD_ROWS
    const int qc = tid % L::DQ_THREADS_PER_ROW;
    const int d_vecs = static_cast<int>((p.D + VEC - 1) / VEC);    // vectors holding q, k data
    const int dv_vecs = static_cast<int>((p.Dv + VEC - 1) / VEC);  // vectors holding v, dO data
    const T exp_scale = SimtMath<T>::q_scale(p);  // scale_log2 for float, scale for double

    // Causal: query m sees key n iff n <= m + (Lk - Lq); the first query that sees key n0
    // is n0 - (Lk - Lq), so the query tiles above it are skipped.
    // With variants the window's band gives the query tiles [first_m_block, num_m_blocks).
    const ScoreModifierIf<VARIANTS, T, T> mod(p, vp, b);
    int first_m_block, num_m_blocks;
    if constexpr (VARIANTS) {
        mod.query_blocks(n0, n0 + BLOCK_N < p.Lk ? n0 + BLOCK_N : p.Lk, BLOCK_M,
                         first_m_block, num_m_blocks);
    } else {
        long long m_begin = 0;
        if (IS_CAUSAL) m_begin = n0 - (p.Lk - p.Lq) > 0 ? n0 - (p.Lk - p.Lq) : 0;
        // block counts < 2^31: a query row holds at least 16 bytes
        num_m_blocks = static_cast<int>((p.Lq + BLOCK_M - 1) / BLOCK_M);
        first_m_block = m_begin < p.Lq ? static_cast<int>(m_begin / BLOCK_M) : num_m_blocks;
    }

    // -- prologue: zero the columns no copy writes; start K_j, V_j and the first Q_i, dO_i
    zero_columns<BLOCK_M, L>(Qs, d_vecs);
    zero_columns<BLOCK_M, L>(dOs, dv_vecs);
    zero_columns<BLOCK_N, L>(Ks, d_vecs);
    zero_columns<BLOCK_N, L>(Vs, dv_vecs);
    if (first_m_block < num_m_blocks) {
        const long long m0 = static_cast<long long>(first_m_block) * BLOCK_M;
        copy_rows_async<BLOCK_N, L>(Ks, k, p.k_row_stride, n0, p.Lk, d_vecs);
        copy_rows_async<BLOCK_N, L>(Vs, v, p.v_row_stride, n0, p.Lk, dv_vecs);
        copy_rows_async<BLOCK_M, L>(Qs, q, p.q_row_stride, m0, p.Lq, d_vecs);
        copy_rows_async<BLOCK_M, L>(dOs, dout, p.o_row_stride, m0, p.Lq, dv_vecs);
    }

    T dk_acc[KV_TN][KV_TD];  // dK_j (unscaled): keys n_i, this thread's KV_TD columns
    T dv_acc[KV_TN][KV_TD];  // dV_j
#pragma unroll
    for (int i = 0; i < KV_TN; ++i)
#pragma unroll
        for (int d = 0; d < KV_TD; ++d) dk_acc[i][d] = dv_acc[i][d] = T(0);

    for (int mb = first_m_block; mb < num_m_blocks; ++mb) {
        const long long m0 = static_cast<long long>(mb) * BLOCK_M;  // queries [m0, m0 + BLOCK_M)
        // global loads first: the cp.async waits below are compiler barriers
        const RowStats<L, T> st = load_row_stats<L>(lse, delta, m0, p.Lq, tr);
        cp_async_wait_all();
        // Q_i, dO_i (and on the first tile K_j, V_j and the zeroed columns) are visible to
        // every thread; every thread has finished reading P and dS of tile i-1.
        __syncthreads();

        // -- S = Q_i K_j^T, dP = dO_i V_j^T: (TM, TN) per thread
        T s[TM][TN], dp[TM][TN];
        dot_rows<L>(s, Qs, Ks, tr, tc, d_vecs);
        dot_rows<L>(dp, dOs, Vs, tr, tc, dv_vecs);

        // -- P = exp(S * scale - lse_i), dS = P * (dP - delta_i) into shared memory
        if constexpr (VARIANTS) {
            T drop_scale;
            const unsigned keep = dropout_keep_tile<L>(vp, b, m0, n0, tr, tc, drop_scale);
            // (return_dbias) b's dbias at this thread's first score (m0 + tr, n0 + tc),
            // found here rather than held through the kernel
            T* dbias = dbias_of<T>(p, bp, b);
            if (dbias != nullptr)
                dbias += (m0 + tr) * bp.dbias_row_stride + (n0 + tc) * bp.dbias_col_stride;
            if (mod.cap_u > T(0))  // uniform
                softmax_backward_variants<L, /*SOFTCAP=*/true>(s, dp, st, exp_scale, mod, m0, n0,
                                                               keep, drop_scale, Ps, dSs, tr, tc,
                                                               bp, dbias);
            else
                softmax_backward_variants<L, /*SOFTCAP=*/false>(s, dp, st, exp_scale, mod, m0,
                                                                n0, keep, drop_scale, Ps, dSs,
                                                                tr, tc, bp, dbias);
        } else
            softmax_backward<L, IS_CAUSAL>(s, dp, st, exp_scale, tile_mask<L>(p, m0, n0), Ps,
                                           dSs, tr, tc);
        __syncthreads();  // every thread's P and dS are visible

        // -- dV_j += P^T dO_i, dK_j += dS^T Q_i: (KV_TN, KV_TD) per thread
        accumulate_outer<L>(dv_acc, Ps, dOs, kr, kc);
        accumulate_outer<L>(dk_acc, dSs, Qs, kr, kc);

        // every thread has finished reading Q_i and dO_i: the next tile's copies may start
        __syncthreads();
        if (mb + 1 < num_m_blocks) {
            copy_rows_async<BLOCK_M, L>(Qs, q, p.q_row_stride, m0 + BLOCK_M, p.Lq, d_vecs);
            copy_rows_async<BLOCK_M, L>(dOs, dout, p.o_row_stride, m0 + BLOCK_M, p.Lq, dv_vecs);
        }

        if (ATOMIC_DQ) {
            // -- dq_accum_i += dS K_j: (DQ_TM, DQ_TD) per thread, added to global memory;
            // columns past D hold zeros: no atomics for them
            T dq[DQ_TM][DQ_TD];
#pragma unroll
            for (int i = 0; i < DQ_TM; ++i)
#pragma unroll
                for (int d = 0; d < DQ_TD; ++d) dq[i][d] = T(0);
            accumulate_dq<L>(dq, dSs, Ks, qr, qc);
            store_dq<L, /*ATOMIC=*/true>(dq, dq_accum, bp.grad_row, m0, p.Lq,
                                         p.D < bp.grad_row ? p.D : bp.grad_row, qr, qc);
        }
    }

    // -- epilogue: dk_j = scale * dK_j, dv_j = dV_j for keys < Lk, columns < min(HEAD_DIM,
    // grad_row)
    const T scale = static_cast<T>(p.scale);
    const long long col_limit = HEAD_DIM < bp.grad_row ? HEAD_DIM : bp.grad_row;
#pragma unroll
    for (int i = 0; i < KV_TN; ++i) {
        const long long row = n0 + kr + i * L::KV_THREAD_ROWS;
        if (row < p.Lk) {
            T* dk_row = dk + row * bp.grad_row;
            T* dv_row = dv + row * bp.grad_row;
#pragma unroll
            for (int t = 0; t < KV_TD_VECS; ++t)
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    const int col = (kc + t * L::KV_THREADS_PER_ROW) * VEC + e;
                    if (col < col_limit) {
                        dk_row[col] = dk_acc[i][t * VEC + e] * scale;
                        dv_row[col] = dv_acc[i][t * VEC + e];
                    }
                }
        }
    }
}

// ----------------------------------------------------------------------------------------
// The deterministic dQ. Grid: (ceil(Lq / DQ_BLOCK_M), min(n_batch, 65535),
// ceil(n_batch / 65535)); 128 threads; SimtBwdTraits::DQ_SMEM_BYTES of dynamic shared memory.
// ----------------------------------------------------------------------------------------
template <typename T, int HEAD_DIM, bool IS_CAUSAL, bool VARIANTS>
__device__ __forceinline__ void flash_bwd_dq_simt_body(const AttentionParams& p,
                                                       const BackwardParams& bp,
                                                       const VariantParams& vp) {
    using L = typename SimtBwdTraits<T, HEAD_DIM>::Dq;
    constexpr int BLOCK_M = L::BLOCK_M, BLOCK_N = L::BLOCK_N, VEC = L::VEC;
    constexpr int TM = L::TM, TN = L::TN, DQ_TM = L::DQ_TM, DQ_TD = L::DQ_TD;

    const long long b = static_cast<long long>(blockIdx.z) * gridDim.y + blockIdx.y;
    if (b >= p.n_batch) return;
    check_launch(L::NUM_THREADS, L::DQ_SMEM_BYTES);

    // Causal blocks (or a window's bounded on the right only) further down have more keys
    // to visit: start those first.
    const bool longest_last =
        IS_CAUSAL || (VARIANTS && vp.window_right < UNBOUNDED && vp.window_left >= UNBOUNDED);
    const long long m_block = longest_last ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    const long long m0 = m_block * BLOCK_M;  // queries [m0, m0 + BLOCK_M)
    const BatchOffsets off = batch_offsets(p, b);
    const T* q = static_cast<const T*>(p.q) + off.q;
    const T* k = static_cast<const T*>(p.k) + off.k;
    const T* v = static_cast<const T*>(p.v) + off.v;
    const T* dout = static_cast<const T*>(bp.dout) + off.o;   // o's strides
    const T* lse = static_cast<const T*>(p.lse) + b * p.Lq;
    const T* delta = static_cast<const T*>(bp.delta) + b * p.Lq;
    T* dq_accum = static_cast<T*>(bp.dq_accum) + b * p.Lq * bp.grad_row;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* Qs = reinterpret_cast<T*>(smem_raw) + L::Q_OFFSET;    // (BLOCK_M, STRIDE)
    T* dOs = reinterpret_cast<T*>(smem_raw) + L::DO_OFFSET;  // (BLOCK_M, STRIDE)
    T* Ks = reinterpret_cast<T*>(smem_raw) + L::K_OFFSET;    // (BLOCK_N, STRIDE)
    T* Vs = reinterpret_cast<T*>(smem_raw) + L::V_OFFSET;    // (BLOCK_N, STRIDE)
    T* dSs = reinterpret_cast<T*>(smem_raw) + L::DS_OFFSET;  // (BLOCK_M, P_STRIDE)

    const int tid = threadIdx.x;
    const int tr = tid / L::THREADS_PER_ROW;     // S split: rows tr + i * THREAD_ROWS
    const int tc = tid % L::THREADS_PER_ROW;     //          keys tc + jj * THREADS_PER_ROW
    const int qr = tid / L::DQ_THREADS_PER_ROW;  // dQ split: rows qr + i * DQ_THREAD_ROWS
    const int qc = tid % L::DQ_THREADS_PER_ROW;
    const int d_vecs = static_cast<int>((p.D + VEC - 1) / VEC);
    const int dv_vecs = static_cast<int>((p.Dv + VEC - 1) / VEC);
    const T exp_scale = SimtMath<T>::q_scale(p);

    // Causal: query m sees key n iff n <= m + (Lk - Lq). The block's last row sees the
    // most keys; key tiles past that are skipped by the loop bound.
    const long long m_end = m0 + BLOCK_M < p.Lq ? m0 + BLOCK_M : p.Lq;  // rows [m0, m_end)
    const ScoreModifierIf<VARIANTS, T, T> mod(p, vp, b);
    int n_first = 0, num_n_blocks;
    if constexpr (VARIANTS) {
        mod.key_blocks(m0, m_end, BLOCK_N, n_first, num_n_blocks);
    } else {
        long long n_end = p.Lk;
        if (IS_CAUSAL) n_end = m_end + (p.Lk - p.Lq) < p.Lk ? m_end + (p.Lk - p.Lq) : p.Lk;
        // < 2^31: a key row holds at least 16 bytes
        num_n_blocks = n_end > 0 ? static_cast<int>((n_end + BLOCK_N - 1) / BLOCK_N) : 0;
    }

    // -- prologue: zero the columns no copy writes; start Q_i, dO_i and the first K_j, V_j
    zero_columns<BLOCK_M, L>(Qs, d_vecs);
    zero_columns<BLOCK_M, L>(dOs, dv_vecs);
    zero_columns<BLOCK_N, L>(Ks, d_vecs);
    zero_columns<BLOCK_N, L>(Vs, dv_vecs);
    if (num_n_blocks > n_first) {
        const long long n_start = static_cast<long long>(n_first) * BLOCK_N;
        copy_rows_async<BLOCK_M, L>(Qs, q, p.q_row_stride, m0, p.Lq, d_vecs);
        copy_rows_async<BLOCK_M, L>(dOs, dout, p.o_row_stride, m0, p.Lq, dv_vecs);
        copy_rows_async<BLOCK_N, L>(Ks, k, p.k_row_stride, n_start, p.Lk, d_vecs);
        copy_rows_async<BLOCK_N, L>(Vs, v, p.v_row_stride, n_start, p.Lk, dv_vecs);
    }
    const RowStats<L, T> st = load_row_stats<L>(lse, delta, m0, p.Lq, tr);

    T dq[DQ_TM][DQ_TD];  // dQ_i (unscaled): rows qr + i * DQ_THREAD_ROWS, DQ_TD columns
#pragma unroll
    for (int i = 0; i < DQ_TM; ++i)
#pragma unroll
        for (int d = 0; d < DQ_TD; ++d) dq[i][d] = T(0);

    for (int j = n_first; j < num_n_blocks; ++j) {
        const long long n0 = static_cast<long long>(j) * BLOCK_N;  // keys [n0, n0 + BLOCK_N)
        cp_async_wait_all();
        // K_j, V_j (and on the first tile Q_i, dO_i and the zeroed columns) are visible to
        // every thread; every thread has finished reading dS of tile j-1.
        __syncthreads();

        // -- S = Q_i K_j^T, dP = dO_i V_j^T: (TM, TN) per thread
        T s[TM][TN], dp[TM][TN];
        dot_rows<L>(s, Qs, Ks, tr, tc, d_vecs);
        dot_rows<L>(dp, dOs, Vs, tr, tc, dv_vecs);

        // -- dS = P * (dP - delta_i) into shared memory
        if constexpr (VARIANTS) {
            T drop_scale;
            const unsigned keep = dropout_keep_tile<L>(vp, b, m0, n0, tr, tc, drop_scale);
            if (mod.cap_u > T(0))  // uniform
                softmax_backward_variants<L, /*SOFTCAP=*/true>(s, dp, st, exp_scale, mod, m0, n0,
                                                               keep, drop_scale,
                                                               static_cast<T*>(nullptr), dSs, tr,
                                                               tc, bp, static_cast<T*>(nullptr));
            else
                softmax_backward_variants<L, /*SOFTCAP=*/false>(s, dp, st, exp_scale, mod, m0,
                                                                n0, keep, drop_scale,
                                                                static_cast<T*>(nullptr), dSs,
                                                                tr, tc, bp,
                                                                static_cast<T*>(nullptr));
        } else
            softmax_backward<L, IS_CAUSAL>(s, dp, st, exp_scale, tile_mask<L>(p, m0, n0),
                                           static_cast<T*>(nullptr), dSs, tr, tc);
        // every thread's dS is visible; every thread has finished reading V_j
        __syncthreads();
        if (j + 1 < num_n_blocks)
            copy_rows_async<BLOCK_N, L>(Vs, v, p.v_row_stride, n0 + BLOCK_N, p.Lk, dv_vecs);

        // -- dQ_i += dS K_j: (DQ_TM, DQ_TD) per thread
        accumulate_dq<L>(dq, dSs, Ks, qr, qc);

        // every thread has finished reading K_j: the next tile's copy may start
        __syncthreads();
        if (j + 1 < num_n_blocks)
            copy_rows_async<BLOCK_N, L>(Ks, k, p.k_row_stride, n0 + BLOCK_N, p.Lk, d_vecs);
    }

    // -- epilogue: dq_accum_i = dQ_i for rows < Lq, columns < min(HEAD_DIM, grad_row)
    store_dq<L, /*ATOMIC=*/false>(dq, dq_accum, bp.grad_row, m0, p.Lq,
                                  HEAD_DIM < bp.grad_row ? HEAD_DIM : bp.grad_row, qr, qc);
}

// The entry points: plain or causal, and with the variants (then vp, after bp).
template <typename T, int HEAD_DIM, bool IS_CAUSAL, bool ATOMIC_DQ>
__global__ void __launch_bounds__(SimtBwdTraits<T, HEAD_DIM>::NUM_THREADS,
                  SimtBwdTraits<T, HEAD_DIM>::MIN_BLOCKS)
flash_bwd_simt(const AttentionParams p, const BackwardParams bp) {
    flash_bwd_simt_body<T, HEAD_DIM, IS_CAUSAL, ATOMIC_DQ, false>(p, bp, VariantParams{});
}

template <typename T, int HEAD_DIM, bool ATOMIC_DQ>
__global__ void __launch_bounds__(SimtBwdTraits<T, HEAD_DIM>::NUM_THREADS,
                  SimtBwdTraits<T, HEAD_DIM>::MIN_BLOCKS)
flash_bwd_simt_variants(const AttentionParams p, const BackwardParams bp,
                        const VariantParams vp) {
    flash_bwd_simt_body<T, HEAD_DIM, false, ATOMIC_DQ, true>(p, bp, vp);
}

template <typename T, int HEAD_DIM, bool IS_CAUSAL>
__global__ void __launch_bounds__(SimtBwdTraits<T, HEAD_DIM>::NUM_THREADS,
                  SimtBwdTraits<T, HEAD_DIM>::MIN_BLOCKS)
flash_bwd_dq_simt(const AttentionParams p, const BackwardParams bp) {
    flash_bwd_dq_simt_body<T, HEAD_DIM, IS_CAUSAL, false>(p, bp, VariantParams{});
}

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(SimtBwdTraits<T, HEAD_DIM>::NUM_THREADS,
                  SimtBwdTraits<T, HEAD_DIM>::MIN_BLOCKS)
flash_bwd_dq_simt_variants(const AttentionParams p, const BackwardParams bp,
                           const VariantParams vp) {
    flash_bwd_dq_simt_body<T, HEAD_DIM, false, true>(p, bp, vp);
}

}  // namespace cupyflash
