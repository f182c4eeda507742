"""A decode kernel whose splits of a kv head are one thread-block cluster, with 8 warps and
64-key tiles (session 19 lab kernel; not the package's).

Session 19's merge skeletons (read_skeleton.py, SKEL_TAILS=1) put the floor of a kernel
that reads batch 1's 8k cache (bf16, 8 kv heads of 128, 32 MiB) and merges its splits at
0.82 of the 1 GiB copy for clusters of 8 blocks of 256 threads reading 64-key tiles three
deep (13.6 us), against 0.73-0.75 for any merge through L2 (a counter, 14.8-15.2 us). This
kernel adds the arithmetic to that skeleton, to see what is left of the 0.82:

  block (b, hk, split s): keys [s * C, (s + 1) * C) of one kv head, one query row;
  thread: the 16 lanes of a half-warp share a key, a lane owns one 16-byte vector
          (8 columns) of its K and V rows; a tile is 64 keys, 4 per thread, copied by the
          thread itself (cp.async, 3 stages) and read back only by it: no barrier inside
          the loop;
  warp:   S (4 shuffles per key over the half-warp), m warp-wide, P~ = exp2(S - m),
          acc += P~ V on the lane's 8 columns;
  end:    the two half-warps, then the 8 warps through shared memory (block-local), then
          every block's (m, l, acc) into block 0's shared memory (st.shared::cluster),
          a cluster barrier (release / acquire), and block 0 writes out and lse.

Only bf16, D = 128, one query row per kv head, a contiguous (B, L, Hk, D) cache. Checks the
result against float64 NumPy, then times it with decode.py's queue timer beside
cupyflash.attention_decode, on the same 8 rotating caches (256 MiB).

    python3 benchmarks/cluster_decode.py [L ...]
"""
import math
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import numpy as np
import cupy

import decode as bench
from cupyflash import _cupy_decode, _launch

SRC = r'''
#include <cuda_bf16.h>
#define INFINITY __int_as_float(0x7f800000)
struct P {
    const __nv_bfloat16* q; const __nv_bfloat16* k; const __nv_bfloat16* v;
    __nv_bfloat16* o; float* lse; long long L; long long Hk; float scale_log2;
    unsigned* smid;   // where each block ran (the last launch's), or null
    unsigned long long* stamps;   // globaltimer stamps, 8 per block, or null
};
// stamps go to shared memory first (a global store before the cluster barrier's release
// would wait for its own round trip) and to global memory as the block leaves
#define STAMP(k) do { if (p.stamps && threadIdx.x == 0) { unsigned long long t_; \
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_)); stamp_s[k] = t_; } } while (0)
#define FLUSH_STAMPS() do { if (p.stamps && threadIdx.x == 0) \
    for (int k_ = 0; k_ < 8; ++k_) p.stamps[blockIdx.x * 8 + k_] = stamp_s[k_]; } while (0)
__device__ __forceinline__ void cp16(unsigned dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;"
                 :: "r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ uint4 lds16(unsigned a) {
    uint4 x;
    asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(x.x), "=r"(x.y), "=r"(x.z), "=r"(x.w) : "r"(a));
    return x;
}
// cp.async.wait_group with n known once the caller's loop is unrolled
__device__ __forceinline__ void wait_pending(int n) {
    switch (n) {
#define W(k) case k: asm volatile("cp.async.wait_group " #k ";" ::: "memory"); break;
        W(0) W(1) W(2) W(3) W(4) W(5) W(6) W(7) W(8) W(9) W(10) W(11) W(12) W(13) W(14) W(15)
#undef W
        default: asm volatile("cp.async.wait_group 0;" ::: "memory");
    }
}
__device__ __forceinline__ float lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }

// NT threads, S splits per kv head = the cluster, VPT keys per thread and tile (TILE =
// NT / 16 * VPT keys), STAGES tiles deep. MATH = 0: no arithmetic (the copies' words
// folded by xor), for the breakdown; the merges as with MATH = 1. MATH = 2: as 1, but a
// slot is refilled as soon as its vectors are in registers, before the arithmetic.
// EW = 1: the wait for the cluster barrier's first phase (every block has started) is done
// after the first tile, not after the loop.
// AS = 1: each block's (m, l, acc) goes to block 0 by st.async, which counts its bytes on
// an mbarrier of block 0 (complete_tx): no release fence, no second cluster barrier phase.
// PF > 0 (session 20): the split's first PF tiles of K and V are prefetched to L2
// (cp.async.bulk.prefetch, a row each) before the PDL wait.
// TR > 0 (session 21): the next grid is allowed (launch_dependents) only when TR tiles of
// this block's remain, not at the start, so that its blocks arrive, and prefetch, near
// this grid's end, when the DRAM goes idle, instead of ~13 us early.
template <int NT, int S, int VPT, int STAGES, int MATH, int QF = 0, int EW = 0, int AS = 0,
          int PF = 0, int TR = 0>
__global__ void __launch_bounds__(NT) cdec(const P p) {
    constexpr int TILE = NT / 16 * VPT, WARPS = NT / 32;
    extern __shared__ __align__(128) unsigned char sm[];
    __shared__ __align__(16) float region[S * 128];   // block 0's: every split's acc
    __shared__ float region_m[S], region_l[S];
    __shared__ unsigned long long stamp_s[8];
    __shared__ __align__(8) unsigned long long mbar;            // block 0's (AS = 1)
    const unsigned mbar_a = (unsigned)__cvta_generic_to_shared(&mbar);
    if constexpr (AS) {
        if (blockIdx.x % S == 0 && threadIdx.x == 0) {
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(mbar_a) : "memory");
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                         :: "r"(mbar_a), "r"(S * 130 * 4) : "memory");
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        }
    }
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
    STAMP(7);                                                   // 7: resident (before the wait)
    if constexpr (PF > 0) {
        const int TILE_ = NT / 16 * VPT, s_ = blockIdx.x % S, L_ = (int)p.L;
        const int head_ = blockIdx.x / S, b_ = head_ / (int)p.Hk, hk_ = head_ % (int)p.Hk;
        const int chunk_ = (L_ + S * TILE_ - 1) / (S * TILE_) * TILE_;
        const int t0_ = s_ * chunk_, rows_ = min(min(L_, t0_ + chunk_) - t0_, PF * TILE_);
        const long long row_ = 128LL * p.Hk;
        for (int r = threadIdx.x; r < 2 * rows_; r += NT) {
            const __nv_bfloat16* src = (r % 2 ? p.v : p.k) + ((long long)b_ * L_ + t0_ + r / 2) * row_
                                       + hk_ * 128;
            asm volatile("cp.async.bulk.prefetch.L2.global [%0], 256;"
                         :: "l"(__cvta_generic_to_global(src)) : "memory");
        }
    }
    asm volatile("griddepcontrol.wait;" ::: "memory");
    if constexpr (TR == 0) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    STAMP(0);                                                   // 0: past the PDL wait
    if (p.smid && tid == 0) {
        unsigned id;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
        p.smid[blockIdx.x] = id;
    }
    const int head = blockIdx.x / S, s = blockIdx.x % S;     // head = b * Hk + hk
    const int b = head / (int)p.Hk, hk = head % (int)p.Hk;
    const int L = (int)p.L;
    const int chunk = (L + S * TILE - 1) / (S * TILE) * TILE;
    const int k0 = s * chunk, k1 = min(L, k0 + chunk);
    const int ntiles = k1 > k0 ? (k1 - k0 + TILE - 1) / TILE : 0;
    const int vec = tid & 15, key_of_thread = tid >> 4;      // key (in the tile) of i = 0
    const long long row = 128LL * p.Hk;                      // elements per cache row
    const __nv_bfloat16* kb = p.k + (long long)b * L * row + hk * 128 + vec * 8;
    const __nv_bfloat16* vb = p.v + (long long)b * L * row + hk * 128 + vec * 8;

    const unsigned base = (unsigned)__cvta_generic_to_shared(sm) + tid * 16;
    auto slot = [&](int st, int i) { return base + (st * 2 * VPT + i) * NT * 16; };
    auto load = [&](int j) {
        if (j < ntiles) {
            const int st = j % STAGES;
#pragma unroll
            for (int i = 0; i < VPT; ++i) {
                const int t = k0 + j * TILE + key_of_thread + i * (NT / 16);
                const bool ok = t < k1;
                cp16(slot(st, i), ok ? (const void*)(kb + t * row) : (const void*)p.k, ok ? 16 : 0);
                cp16(slot(st, VPT + i), ok ? (const void*)(vb + t * row) : (const void*)p.v, ok ? 16 : 0);
                if constexpr (MATH == 5) asm volatile("cp.async.commit_group;" ::: "memory");
            }
        } else if constexpr (MATH == 5) {
#pragma unroll
            for (int i = 0; i < VPT; ++i) asm volatile("cp.async.commit_group;" ::: "memory");
        }
        if constexpr (MATH != 5) asm volatile("cp.async.commit_group;" ::: "memory");
    };
    // QF = 1: q's load before the first tiles' copies (else after them)
    uint4 qx;
    if constexpr (QF) qx = *reinterpret_cast<const uint4*>(p.q + head * 128 + vec * 8);
#pragma unroll
    for (int j = 0; j < (MATH == 2 ? STAGES : STAGES - 1); ++j) load(j);
    if constexpr (!QF) qx = *reinterpret_cast<const uint4*>(p.q + head * 128 + vec * 8);
    float q[8];
    {
        const unsigned w[4] = {qx.x, qx.y, qx.z, qx.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) { q[2 * e] = lo(w[e]) * p.scale_log2; q[2 * e + 1] = hi(w[e]) * p.scale_log2; }
    }
    float m = -INFINITY, l = 0.f, acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = 0.f;

    for (int j = 0; j < ntiles; ++j) {
        if constexpr (TR > 0)
            if (j == max(ntiles - TR, 0)) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
        if constexpr (MATH == 5) {
            // one commit group per key of the thread (its K and V vectors): key i is used as
            // soon as it has landed, the online softmax taking one key (two per warp) at a time
            load(j + STAGES - 1);
            const int st = j % STAGES;
#pragma unroll
            for (int i = 0; i < VPT; ++i) {
                wait_pending(STAGES * VPT - i - 1);
                const uint4 x = lds16(slot(st, i)), y = lds16(slot(st, VPT + i));
                float sc = q[0] * lo(x.x) + q[1] * hi(x.x) + q[2] * lo(x.y) + q[3] * hi(x.y)
                         + q[4] * lo(x.z) + q[5] * hi(x.z) + q[6] * lo(x.w) + q[7] * hi(x.w);
#pragma unroll
                for (int mask = 1; mask < 16; mask *= 2) sc += __shfl_xor_sync(0xffffffffu, sc, mask);
                if (k0 + j * TILE + key_of_thread + i * (NT / 16) >= k1) sc = -INFINITY;
                float m_new = fmaxf(m, sc);
                m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffffu, m_new, 16));
                const float m_safe = m_new == -INFINITY ? 0.f : m_new;
                if (m_new > m) {
                    const float alpha = exp2f(m - m_safe);
                    l *= alpha;
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[e] *= alpha;
                }
                m = m_new;
                const float pr = exp2f(sc - m_safe);
                l += pr;
                acc[0] += pr * lo(y.x); acc[1] += pr * hi(y.x); acc[2] += pr * lo(y.y); acc[3] += pr * hi(y.y);
                acc[4] += pr * lo(y.z); acc[5] += pr * hi(y.z); acc[6] += pr * lo(y.w); acc[7] += pr * hi(y.w);
            }
            continue;
        }
        if constexpr (MATH != 2) load(j + STAGES - 1);
        asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 1) : "memory");
        if (j == 0) {
            STAMP(1);                                           // 1: the first tile landed
            if constexpr (EW) asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
        }
        const int st = j % STAGES;
        // MATH = 3: the arithmetic on the last tile only; 4: on every tile but the last
        const bool math_here = MATH == 1 || MATH == 2 || (MATH == 3 && j == ntiles - 1)
                               || (MATH == 4 && j != ntiles - 1);
        if (!math_here) {
            unsigned x_or = 0;
#pragma unroll
            for (int i = 0; i < 2 * VPT; ++i) { const uint4 x = lds16(slot(st, i)); x_or ^= x.x ^ x.y ^ x.z ^ x.w; }
            acc[0] += __uint_as_float(x_or & 0x007fffffu);   // a finite float of the data
            if (MATH == 0) { m = 0.f; l = 1.f; }
            continue;
        }
        uint4 kx[VPT], vx[VPT];   // the tile's K and V vectors of this thread
#pragma unroll
        for (int i = 0; i < VPT; ++i) { kx[i] = lds16(slot(st, i)); vx[i] = lds16(slot(st, VPT + i)); }
        // MATH = 2: the slot is refilled now, so that STAGES tiles stay in flight while
        // this thread computes (program order: the copy's write follows these reads)
        if constexpr (MATH == 2) load(j + STAGES);
        float sc[VPT];
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
            const uint4 x = kx[i];
            sc[i] = q[0] * lo(x.x) + q[1] * hi(x.x) + q[2] * lo(x.y) + q[3] * hi(x.y)
                  + q[4] * lo(x.z) + q[5] * hi(x.z) + q[6] * lo(x.w) + q[7] * hi(x.w);
        }
#pragma unroll
        for (int i = 0; i < VPT; ++i)
#pragma unroll
            for (int mask = 1; mask < 16; mask *= 2) sc[i] += __shfl_xor_sync(0xffffffffu, sc[i], mask);
        if (j == ntiles - 1) {                                   // keys past the split's end
#pragma unroll
            for (int i = 0; i < VPT; ++i)
                if (k0 + j * TILE + key_of_thread + i * (NT / 16) >= k1) sc[i] = -INFINITY;
        }
        float m_new = m;
#pragma unroll
        for (int i = 0; i < VPT; ++i) m_new = fmaxf(m_new, sc[i]);
        m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffffu, m_new, 16));
        const float m_safe = m_new == -INFINITY ? 0.f : m_new;
        if (m_new > m) {
            const float alpha = exp2f(m - m_safe);
            l *= alpha;
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[e] *= alpha;
        }
        m = m_new;
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
            const float pr = exp2f(sc[i] - m_safe);
            l += pr;
            const uint4 x = vx[i];
            acc[0] += pr * lo(x.x); acc[1] += pr * hi(x.x); acc[2] += pr * lo(x.y); acc[3] += pr * hi(x.y);
            acc[4] += pr * lo(x.z); acc[5] += pr * hi(x.z); acc[6] += pr * lo(x.w); acc[7] += pr * hi(x.w);
        }
    }
    STAMP(2);                                                   // 2: thread 0's loop ended
    if constexpr (TR > 0)
        if (ntiles == 0) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    // the two half-warps (same columns, different keys, the same m)
    l += __shfl_xor_sync(0xffffffffu, l, 16);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] += __shfl_xor_sync(0xffffffffu, acc[e], 16);

    // the warps, through the (now idle) pipeline's shared memory
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    __syncthreads();
    float* acc_s = reinterpret_cast<float*>(sm);                 // (WARPS, 128)
    float* m_s = acc_s + WARPS * 128;
    float* l_s = m_s + WARPS;
    if (lane < 16) {
        float4* d = reinterpret_cast<float4*>(acc_s + warp * 128 + lane * 8);
        d[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
        d[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
    }
    if (lane == 0) { m_s[warp] = m; l_s[warp] = l; }
    __syncthreads();
    // the cluster's first barrier phase has completed: block 0 is running
    STAMP(3);                                                   // 3: the warps merged
    if constexpr (!EW) asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
    if (tid < 128) {
        float mb = -INFINITY;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) mb = fmaxf(mb, m_s[w]);
        const float mb_safe = mb == -INFINITY ? 0.f : mb;
        float a = 0.f, lb = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const float wt = exp2f(m_s[w] - mb_safe);
            a += wt * acc_s[w * 128 + tid];
            lb += wt * l_s[w];
        }
        unsigned r;
        asm volatile("mapa.shared::cluster.u32 %0, %1, 0;" : "=r"(r)
                     : "r"((unsigned)__cvta_generic_to_shared(region + s * 128 + tid)));
        if constexpr (AS) {
            unsigned rb, rm, rl;
            asm volatile("mapa.shared::cluster.u32 %0, %1, 0;" : "=r"(rb) : "r"(mbar_a));
            asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.f32 [%0], %1, [%2];"
                         :: "r"(r), "f"(a), "r"(rb) : "memory");
            if (tid == 0) {
                asm volatile("mapa.shared::cluster.u32 %0, %1, 0;" : "=r"(rm)
                             : "r"((unsigned)__cvta_generic_to_shared(region_m + s)));
                asm volatile("mapa.shared::cluster.u32 %0, %1, 0;" : "=r"(rl)
                             : "r"((unsigned)__cvta_generic_to_shared(region_l + s)));
                asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.f32 [%0], %1, [%2];"
                             :: "r"(rm), "f"(mb), "r"(rb) : "memory");
                asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.f32 [%0], %1, [%2];"
                             :: "r"(rl), "f"(lb), "r"(rb) : "memory");
            }
        } else {
        asm volatile("st.shared::cluster.f32 [%0], %1;" :: "r"(r), "f"(a) : "memory");
        if (tid == 0) {
            asm volatile("mapa.shared::cluster.u32 %0, %1, 0;" : "=r"(r)
                         : "r"((unsigned)__cvta_generic_to_shared(region_m + s)));
            asm volatile("st.shared::cluster.f32 [%0], %1;" :: "r"(r), "f"(mb) : "memory");
            asm volatile("mapa.shared::cluster.u32 %0, %1, 0;" : "=r"(r)
                         : "r"((unsigned)__cvta_generic_to_shared(region_l + s)));
            asm volatile("st.shared::cluster.f32 [%0], %1;" :: "r"(r), "f"(lb) : "memory");
        }
        }
    }
    if constexpr (!AS) asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
    STAMP(4);                                                   // 4: arrived (stored)
    if (s != 0) {
        FLUSH_STAMPS();
        return;
    }
    if constexpr (AS) {   // every split's bytes have landed in this block's shared memory
        unsigned done = 0;
        while (!done)
            asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], 0;"
                         " selp.u32 %0, 1, 0, p; }" : "=r"(done) : "r"(mbar_a) : "memory");
    } else {
        asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
    }
    STAMP(5);                                                   // 5: block 0: all arrived
    if (tid < 128) {
        float mg = -INFINITY;
#pragma unroll
        for (int i = 0; i < S; ++i) mg = fmaxf(mg, region_m[i]);
        const float mg_safe = mg == -INFINITY ? 0.f : mg;
        float num = 0.f, den = 0.f;
#pragma unroll
        for (int i = 0; i < S; ++i) {
            const float wt = exp2f(region_m[i] - mg_safe);
            num += wt * region[i * 128 + tid];
            den += wt * region_l[i];
        }
        p.o[head * 128 + tid] = __float2bfloat16_rn(den > 0.f ? num / den : 0.f);
        STAMP(6);                                               // 6: block 0: out stored
        if (tid == 0) p.lse[head] = den > 0.f ? (mg + log2f(den)) * 0.6931471805599453f : -INFINITY;
    }
    FLUSH_STAMPS();
}
'''

# (threads, splits = cluster size, keys per thread and tile, stages, math)
# math 2: the tile's vectors into registers, then the slot's refill, then the arithmetic
# math 5: one commit group per key (K and V vectors) of the thread, used as it lands
CONFIGS = [(256, 8, 4, 3, 1, 1), (256, 8, 4, 3, 0, 0), (256, 8, 4, 3, 1, 1, 0, 1), (256, 8, 4, 3, 0, 0, 0, 1),
           (256, 8, 4, 3, 1, 1), (256, 8, 4, 3, 1, 1, 0, 1), (512, 8, 2, 3, 1, 1, 0, 1)]
STAMPS = os.environ.get("CL_STAMPS") is not None   # a timeline of the last 8 calls
if STAMPS:
    CONFIGS = [(256, 8, 4, 3, 1, 1), (256, 8, 4, 3, 1, 1, 0, 1), (256, 8, 4, 3, 0, 0, 0, 1)]
if os.environ.get("CL_PREFETCH"):   # session 20: the st.async kernel with 0, 2, 4 tiles prefetched
    CONFIGS = [(256, 8, 4, 3, 1, 1, 0, 1, pf) for pf in (0, 2, 4)]
if os.environ.get("CL_TRIGGER"):   # session 21: the next grid allowed with TR tiles left, PF prefetched
    CONFIGS = [(256, 8, 4, 3, 1, 1, 0, 1, pf, tr)
               for pf, tr in [(0, 0), (2, 0), (0, 2), (2, 2), (0, 4), (2, 4), (4, 4), (2, 8), (4, 8)]]
CONFIGS = [c + (0,) * (10 - len(c)) for c in CONFIGS]
NAMES = [f"cdec<{','.join(map(str, c))}>" for c in CONFIGS]


def launch_cluster(fn, grid, block, params, smem, cluster):
    """A PDL launch in clusters of ``cluster`` blocks along x (the package's launcher)."""
    _launch.launch(fn, (grid,) if isinstance(grid, int) else grid,
                   (block,) if isinstance(block, int) else block, params, smem,
                   overlap=True, cluster=cluster)


def timeline(st, S):
    """Medians over the last 8 calls (us from the call's first block start)."""
    order = np.argsort(st[:, :, 0].min(1))
    rows = []
    for n, c in enumerate(order):
        t0 = st[c, :, 0].min()
        r = (st[c] - t0) / 1e3
        zero = r[::S]                                  # the clusters' block 0
        prev_end = None if n == 0 else (st[order[n - 1], ::S, 6].max() - t0) / 1e3
        rows.append([np.median(r[:, 7]), r[:, 0].max(), np.median(r[:, 1]), np.median(r[:, 2]), r[:, 2].max(),
                     r[:, 3].max(), r[:, 4].max(), zero[:, 5].max(), zero[:, 6].max(),
                     np.nan if prev_end is None else -prev_end])
    names = ["resident (med)", "last start", "tile 0 (med)", "loop end (med)", "loop end (max)", "warps merged (max)",
             "arrived (max)", "blk0 all in (max)", "out stored (max)", "gap after prev"]
    med = np.nanmedian(np.array(rows), axis=0)
    print("   timeline: " + ", ".join(f"{a} {b:.2f}" for a, b in zip(names, med)), flush=True)


def main():
    lengths = [int(a) for a in sys.argv[1:]] or [8192]
    mod = cupy.RawModule(code=SRC, options=("-std=c++17", "-arch=sm_90a"), name_expressions=sorted(set(NAMES)))
    stream = cupy.cuda.Stream(non_blocking=True)
    stream.use()
    timer = bench.QueueTimer(cupy, 20, 5)
    copy = bench.copy_bandwidth(cupy, timer)
    print(f"copy {copy:.0f} GB/s", flush=True)
    B, Hk, D = int(os.environ.get("CL_B", "1")), 8, 128
    dt = bench._dtype("bfloat16")
    pdt = np.dtype([("q", np.uint64), ("k", np.uint64), ("v", np.uint64), ("o", np.uint64),
                    ("lse", np.uint64), ("L", np.int64), ("Hk", np.int64), ("sc", np.float32),
                    ("pad", np.float32), ("smid", np.uint64), ("stamps", np.uint64)])
    stamps = cupy.zeros(8 * 8 * 4096, dtype=np.uint64)   # 8 caches' calls, 8 per block
    smid = cupy.zeros(4096, dtype=np.uint32)
    scale = D ** -0.5
    for L in lengths:
        caches = [(bench._random(cupy, (B, L, Hk, D), dt), bench._random(cupy, (B, L, Hk, D), dt))
                  for _ in range(8)]
        q = bench._random(cupy, (B, 1, Hk, D), dt)
        out = cupy.empty((B, 1, Hk, D), dtype=dt)
        lse = cupy.empty((B * Hk,), dtype=np.float32)
        nbytes = 2 * B * L * Hk * D * 2
        seqlens = cupy.full((B,), L, dtype=np.int32)

        def report(name, ms):
            gbs = nbytes / ms / 1e6
            print(f"L={L:6d} {name:34s} {ms * 1e3:8.2f} us {gbs:6.0f} GB/s {gbs / copy:.3f} of copy",
                  flush=True)

        def ours(k, v):
            return lambda: _cupy_decode.attention_decode(q, k, v, seqlens, None, None, None,
                                                         num_splits=None, causal=False,
                                                         scale=scale, max_keys=L, min_keys=L)
        report("cupyflash attention_decode", timer([ours(k, v) for k, v in caches]))
        # float64 truth for cache 0
        qf = cupy.asnumpy(q.astype(np.float32)).astype(np.float64)[:, 0]       # (B, Hk, D)
        kf = cupy.asnumpy(caches[0][0].astype(np.float32)).astype(np.float64)  # (B, L, Hk, D)
        vf = cupy.asnumpy(caches[0][1].astype(np.float32)).astype(np.float64)
        s = np.einsum("bhd,blhd->bhl", qf, kf) * scale
        mx = s.max(-1, keepdims=True)
        p = np.exp(s - mx)
        want = np.einsum("bhl,blhd->bhd", p / p.sum(-1, keepdims=True), vf)
        want_lse = (mx[..., 0] + np.log(p.sum(-1))).reshape(-1)
        for (nt, S, vpt, stages, math_on, qf, ew, st_async, pf, tr), name in zip(CONFIGS, NAMES):
            fn = mod.get_function(name)
            fn = getattr(fn, "kernel", fn)
            smem = stages * 2 * vpt * nt * 16
            cupy.cuda.driver.funcSetAttribute(
                fn.ptr, cupy.cuda.driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
            if S > 8:  # CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED
                cupy.cuda.driver.funcSetAttribute(fn.ptr, 14, 1)

            def mk(k, v, c=0):
                where_stamps = stamps.data.ptr + c * 8 * 4096 * 8 if STAMPS else 0
                prm = np.array([(q.data.ptr, k.data.ptr, v.data.ptr, out.data.ptr, lse.data.ptr,
                                 L, Hk, scale * math.log2(math.e), 0, smid.data.ptr,
                                 where_stamps)], pdt)[0]
                return lambda: launch_cluster(fn, B * Hk * S, nt, prm, smem, S)
            out.fill(np.nan)
            lse.fill(np.nan)
            mk(*caches[0])()
            stream.synchronize()
            got = cupy.asnumpy(out.astype(np.float32))[:, 0].astype(np.float64)
            err = float(np.abs(got - want).max())
            lerr = float(np.abs(cupy.asnumpy(lse) - want_lse).max())
            check = (f"err {err:.1e}, lse {lerr:.1e}" if math_on in (1, 2, 5) else
                     {0: "no math", 3: "math: last tile", 4: "math: all tiles but the last"}[math_on])
            ms = timer([mk(k, v, c) for c, (k, v) in enumerate(caches)])
            where = np.bincount(cupy.asnumpy(smid[:B * Hk * S]))
            report(f"NT={nt} S={S} VPT={vpt} ST={stages}{' qfirst' if qf else ''}{' early-wait' if ew else ''}{' st.async' if st_async else ''}{f' prefetch {pf}' if pf else ''}{f' trigger {tr} left' if tr else ''} ({check}; {int((where > 1).sum())} SMs of "
                   f"{int((where > 0).sum())} run 2+)", ms)
            if STAMPS:
                timeline(cupy.asnumpy(stamps).reshape(8, 4096, 8)[:, :B * Hk * S].astype(np.int64), S)
        del caches


if __name__ == "__main__":
    main()
