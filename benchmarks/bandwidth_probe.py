#!/usr/bin/env python3
"""DRAM read-bandwidth probe for a KV-cache decode workload (H100, CuPy + NVRTC).

Why: cupyflash's decode kernel reads the KV cache at ~2.85 TB/s where cuDNN reads the
same bytes at ~3.1 TB/s. This script measures how fast a few *pure read* access patterns
move those bytes, with no attention math, so that the cost of the access pattern itself
(plain loads vs cp.async vs TMA, block order, bytes in flight) can be told apart from the
cost of the kernel's arithmetic.

Workload: K and V caches, each (B, L, Hk, D) bf16 (stored as uint16), FlashAttention
layout, Hk = 8, D = 128: one key row of one head is 256 contiguous bytes, and consecutive
keys of the same head are Hk * D * 2 = 2048 bytes apart. Bytes read per call:
2 * B * L * Hk * D * 2 (2 GiB at the default sizes, 40x the 50 MiB L2).

Patterns (one kernel each; every kernel xors every 32-bit word it reads and writes one
word per warp, so no load can be dropped and the bytes read are verified):

  P0  the project's reference figure: a CuPy device-to-device copy `dst[...] = src` of
      1 GiB, float32 elements as benchmarks/decode.py does it ("copy GB/s" = read + write
      bytes / time); the same on uint8 elements is printed for information ("P0u8").
  P1  ideal streaming read: K then V read as flat arrays, grid = SMs * 8 blocks x 256
      threads (all resident), grid-stride loop of 16-byte __ldg (LDG.E.128.CONSTANT),
      8 loads per iteration. At 2048 threads per SM a thread has 32 registers, and ptxas
      then issues only ~4 of the 8 loads before xoring the first (see the SASS).
  P1d the same loop with __launch_bounds__(256, 4): 48 registers, all 8 loads issued
      before the first use (checked in the SASS), 5 blocks per SM, grid = SMs x the
      occupancy API's blocks per SM. P1/P1d: the upper bound of plain loads.
  P2  decode pattern, plain loads: one block of 4 warps per (b, hk, split of CHUNK keys);
      16 lanes per 256-byte row, 2 rows per warp instruction, each thread has 4 K + 4 V
      16-byte __ldg in flight (8 x 16 B), then xors them. Like a register-staged decode
      kernel. __launch_bounds__(128, 8): 64 registers, 8 blocks per SM (with the default
      32-register target ptxas kept only ~3 loads in flight).
  P3  decode pattern, cp.async (what cupyflash's flash_decode does): same block mapping;
      each lane copies its own 16-byte pieces of K and V rows with
      cp.async.cg.shared.global.L2::256B into a per-warp slice of a STAGES-deep shared
      ring (default 4 stages x 8 KiB = 32 KiB per block), one commit group per stage;
      every stage of the ring is in flight while the oldest is waited for
      (cp.async.wait_group STAGES-1), then read back with ld.shared.v4 and xored.
  P4  decode pattern, TMA tensor loads: same block mapping, 4 consumer warps + 1
      producer warp; one producer thread loads boxes of 64 keys x 128 dims x 1 head
      (16 KiB, K and V alternately) with cp.async.bulk.tensor.3d into a 4-stage ring
      (64 KiB), completion on "full" mbarriers (arrive.expect_tx + complete_tx); the
      consumer warps read a stage back and release it on its "empty" mbarrier (one
      arrival per consumer warp). The tensor map is (D, Hk, B * L) elements, built on the
      host by cuTensorMapEncodeTiled, passed as a const __grid_constant__ parameter.
  P5  decode pattern, 1-D bulk copies: as P4, but the producer warp's 32 lanes fetch the
      64 rows (256 bytes each) of a stage with cp.async.bulk ... mbarrier::complete_tx
      (2 per lane) instead of one tensor copy.

P2..P5 launch blocks in the order given by --orders: "split" = split fastest, then head,
then batch (cupyflash's flash_decode order: the blocks that run side by side read one
(b, hk) at different key offsets, 2 KiB-strided 256-byte pieces), "head" = head fastest
(the blocks that run side by side read the 8 heads of the same keys, i.e. contiguous 2 KiB
rows of the cache).

Timing: CUDA events around a loop of N calls (N chosen so the loop takes >= 50 ms), after
3 warm-up calls; median of 5 repetitions. GB/s = bytes read / time (1 GB = 1e9 B).

Check: before timing, each kernel runs once into an output poisoned with random words;
the xor of its per-warp partials must equal the xor of every 32-bit word of K and V
computed on the host with NumPy (a trivially correct reference). A pattern that skips or
double-reads bytes prints MISMATCH. P4/P5 wait on mbarriers through a watchdog: a wait
that spins ~1 s (a call takes ~1 ms) sets a device flag that makes every wait give up,
so a parity bug prints DEADLOCK instead of hanging the GPU (--no-watchdog compiles it
out, to compare).

Usage:
  python3 benchmarks/bandwidth_probe.py [--repo PATH] [--patterns P0 P1 ...] [--sizes 64x8192 16x32768]
                      [--orders split head] [--chunk 1024] [--out results.json]
                      [--p3-stages 4] [--p3-rows 4] [--tma-swizzle none|128]
                      [--no-watchdog]
  (--patterns P1 runs P1 and P1d.) Run it from the cupyflash checkout (or pass --repo):
  the tensor maps are encoded with cupyflash._tensor_map's binding.
  python3 benchmarks/bandwidth_probe.py --compile-only     # no GPU needed: NVRTC for sm_90a + ptxas -v
"""

import argparse
import ctypes
import json
import math
import os
import re
import statistics
import sys
import time

import numpy as np

HK = 8            # kv heads
HEAD_DIM = 128    # D
ROW_BYTES = HEAD_DIM * 2          # one key of one head: 256 bytes
BOX_KEYS = 64                     # keys per TMA box / per bulk-copy stage
BOX_BYTES = BOX_KEYS * ROW_BYTES  # 16 KiB
TMA_STAGES = 4
P1_BLOCKS_PER_SM, P1_THREADS = 8, 256
DECODE_THREADS = 128              # P2, P3: 4 warps
TMA_THREADS = 160                 # P4, P5: 4 consumer warps + 1 producer warp
TMA_SMEM = 1024 + TMA_STAGES * BOX_BYTES + 2 * TMA_STAGES * 8  # + alignment slack, mbarriers

KERNELS = ["p1_stream", "p1_stream_deep", "p2_decode_ldg", "p3_decode_cp_async",
           "p4_decode_tma", "p5_decode_bulk"]

# ---------------------------------------------------------------------------------------
# CUDA source (one NVRTC program, extern "C" kernels)
# ---------------------------------------------------------------------------------------
CUDA_SOURCE = r"""
#define HK 8
#define HEAD_DIM 128
#define ROW_BYTES 256                  // one key of one head
#define ROW_STRIDE (HK * ROW_BYTES)    // bytes between consecutive keys of one head
#define BOX_KEYS 64
#define BOX_BYTES (BOX_KEYS * ROW_BYTES)
#define TMA_STAGES 4
#ifndef P3_STAGES
#define P3_STAGES 4
#endif
#ifndef P3_ROWS                        // K rows (and as many V rows) per warp per stage
#define P3_ROWS 4
#endif

typedef unsigned int u32;
typedef unsigned long long u64;

// The driver's CUtensorMap: 128 opaque bytes (cuda.h is not available to NVRTC).
struct __align__(64) TmaDesc { u64 opaque[16]; };

extern __shared__ __align__(1024) unsigned char dyn_smem[];

__device__ __forceinline__ u32 fold(uint4 a) { return a.x ^ a.y ^ a.z ^ a.w; }
__device__ __forceinline__ u32 smem_u32(const void* p) {
    return static_cast<u32>(__cvta_generic_to_shared(p));
}

// Xor over the warp; lane 0 writes out[block * warps_per_block + warp].
__device__ __forceinline__ void write_warp_partial(u32* out, int warps_per_block, int warp,
                                                   u32 x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x ^= __shfl_xor_sync(0xffffffffu, x, o);
    if ((threadIdx.x & 31) == 0) out[(u64)blockIdx.x * warps_per_block + warp] = x;
}

// Block -> (b, hk, split). order 0: split fastest, then hk, then b (cupyflash's
// flash_decode); order 1: hk fastest, then split, then b.
struct BlockCoords { int b, hk, split; };
__device__ __forceinline__ BlockCoords block_coords(int n_split, int order) {
    unsigned id = blockIdx.x;
    BlockCoords c;
    if (order == 0) {
        c.split = id % n_split; id /= n_split;
        c.hk = id % HK;         c.b = id / HK;
    } else {
        c.hk = id % HK;         id /= HK;
        c.split = id % n_split; c.b = id / n_split;
    }
    return c;
}

// ---- PTX wrappers ----------------------------------------------------------------------
__device__ __forceinline__ uint4 lds128(u32 addr) {
    uint4 r;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(addr) : "memory");
    return r;
}
__device__ __forceinline__ void cp_async16(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;\n"
                 :: "r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void fence_mbar_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n"
                 :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(bar) : "memory");
}
// Watchdog: a wait that has spun for WATCHDOG_CYCLES (~1 s; a call takes ~1 ms) sets
// g_abort, and every wait gives up at once while it is set, so a parity bug ends the
// kernel (with a wrong xor) instead of hanging the GPU. The host reads and resets it.
// Checked once per 64 failed try_waits, so a waiter wakes up as fast as without it;
// --no-watchdog compiles it out.
#ifndef WATCHDOG_CYCLES
#define WATCHDOG_CYCLES 2000000000ll
#endif
__device__ volatile int g_abort;

// Wait until the phase of parity `parity` has completed. A fresh mbarrier is in phase 0
// (incomplete); asking for parity 1 refers to the phase "before" it, which counts as
// completed, so a producer's first wait on an empty barrier returns at once.
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
#ifndef NO_WATCHDOG
    u32 spins = 0;
    long long t0 = 0;
#endif
    for (;;) {
        u32 done;
        asm volatile("{\n.reg .pred p;\n"
                     "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     "selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(bar), "r"(parity) : "memory");
        if (done) return;
#ifndef NO_WATCHDOG
        if ((++spins & 63u) == 0) {
            if (g_abort) return;
            const long long now = clock64();
            if (spins == 64) t0 = now;
            else if (now - t0 > WATCHDOG_CYCLES) { g_abort = 1; return; }
        }
#endif
    }
}
__device__ __forceinline__ void tma_load_3d(u32 dst, const TmaDesc& map, u32 bar,
                                            int c0, int c1, int c2) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.tile"
                 ".mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];\n"
                 :: "r"(dst), "l"(reinterpret_cast<u64>(&map)), "r"(bar),
                    "r"(c0), "r"(c1), "r"(c2) : "memory");
}
__device__ __forceinline__ void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes "
                 "[%0], [%1], %2, [%3];\n"
                 :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ void prefetch_tensormap(const TmaDesc& map) {
    asm volatile("prefetch.tensormap [%0];\n" :: "l"(reinterpret_cast<u64>(&map)) : "memory");
}

// ---- P1: flat streaming read of K then V -----------------------------------------------
// grid-stride; each iteration a thread issues 8 independent 16-byte loads, S apart
// (S = all threads of the grid), so consecutive threads read consecutive 16 B.
// Two launch bounds: ptxas schedules the xor of a load right behind it when it aims at
// 32 registers (2048 threads per SM), which leaves only ~4 of the 8 loads in flight;
// with room for 48 registers it issues all 8 before the first use (but then only 5 blocks
// of 256 fit on an SM, so P1d's grid is sized from the occupancy API).
__device__ __forceinline__ void p1_body(const uint4* __restrict__ k, const uint4* __restrict__ v,
                                        u64 n_vec, u32* __restrict__ out) {
    const u64 S = (u64)gridDim.x * blockDim.x;
    const u64 first = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    u32 x = 0;
    for (int t = 0; t < 2; ++t) {
        const uint4* __restrict__ p = t ? v : k;
        u64 i = first;
        for (; i + 7 * S < n_vec; i += 8 * S) {
            uint4 r[8];
#pragma unroll
            for (int u = 0; u < 8; ++u) r[u] = __ldg(p + i + u * S);
#pragma unroll
            for (int u = 0; u < 8; ++u) x ^= fold(r[u]);
        }
        for (; i < n_vec; i += S) x ^= fold(__ldg(p + i));  // tail
    }
    write_warp_partial(out, blockDim.x / 32, threadIdx.x / 32, x);
}
// P1: SMs * 8 blocks of 256 threads (the whole grid resident: <= 32 registers)
extern "C" __global__ void __launch_bounds__(256, 8)
p1_stream(const uint4* __restrict__ k, const uint4* __restrict__ v, u64 n_vec,
          u32* __restrict__ out) {
    p1_body(k, v, n_vec, out);
}
// P1d: 8 loads really in flight per thread (48 registers), SMs * occupancy blocks
extern "C" __global__ void __launch_bounds__(256, 4)
p1_stream_deep(const uint4* __restrict__ k, const uint4* __restrict__ v, u64 n_vec,
               u32* __restrict__ out) {
    p1_body(k, v, n_vec, out);
}

// ---- P2: decode pattern, plain 16-byte loads --------------------------------------------
// Block (b, hk, split) reads keys [split*chunk, (split+1)*chunk) of head hk of batch b.
// Per iteration the block covers 32 keys, warp w keys 8w..8w+7: lanes 0-15 the even ones,
// lanes 16-31 the odd ones, 16 B per lane (a whole 256-byte row per half-warp), K and V:
// 8 loads of 16 B per thread in flight. (Launch bounds (128, 8): up to 64 registers, which
// ptxas needs to issue all 8 loads before the first xor; with the default 32-register
// target it keeps only ~3 in flight. 8 blocks of 128 threads per SM.)
extern "C" __global__ void __launch_bounds__(128, 8)
p2_decode_ldg(const unsigned char* __restrict__ k, const unsigned char* __restrict__ v,
              int L, int chunk, int n_split, int order, u32* __restrict__ out) {
    const BlockCoords c = block_coords(n_split, order);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u64 row0 = (u64)c.b * L + (u64)c.split * chunk;   // first key (row of the cache)
    const u64 base = (row0 * HK + c.hk) * ROW_BYTES + (lane & 15) * 16;
    const unsigned char* __restrict__ kp = k + base;
    const unsigned char* __restrict__ vp = v + base;
    u32 x = 0;
    for (int key = warp * 8 + (lane >> 4); key < chunk; key += 32) {
        uint4 r[8];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const u64 off = (u64)(key + 2 * j) * ROW_STRIDE;
            r[j] = __ldg(reinterpret_cast<const uint4*>(kp + off));
            r[4 + j] = __ldg(reinterpret_cast<const uint4*>(vp + off));
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) x ^= fold(r[j]);
    }
    write_warp_partial(out, 4, warp, x);
}

// ---- P3: decode pattern, cp.async into a shared ring ------------------------------------
// Stage i of a block = keys [16*i... ) : warp w copies P3_ROWS keys (K and V rows) into its
// own slice ring[i % STAGES][w]; lane l copies (and later reads back) the 16-byte column
// l % 16 of rows 2j + l / 16: a lane only ever reads what it copied itself, so
// cp.async.wait_group alone orders copy and use (no barrier). One commit group per stage
// (empty groups past the end keep the count uniform). Issue-then-wait: at the wait, all
// STAGES stages are in flight.
extern "C" __global__ void __launch_bounds__(128)
p3_decode_cp_async(const unsigned char* __restrict__ k, const unsigned char* __restrict__ v,
                   int L, int chunk, int n_split, int order, u32* __restrict__ out) {
    __shared__ __align__(128) uint4 ring[P3_STAGES][4][2][P3_ROWS][16];
    const BlockCoords c = block_coords(n_split, order);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u64 row0 = (u64)c.b * L + (u64)c.split * chunk;
    const u64 base = (row0 * HK + c.hk) * ROW_BYTES + (lane & 15) * 16;
    const unsigned char* __restrict__ kp = k + base;
    const unsigned char* __restrict__ vp = v + base;
    const int n_iter = chunk / (4 * P3_ROWS);

    auto issue = [&](int i) {  // stage i -> ring slot i % P3_STAGES
        if (i < n_iter) {
            const int s = i % P3_STAGES;
#pragma unroll
            for (int j = 0; j < P3_ROWS / 2; ++j) {
                const int r = 2 * j + (lane >> 4);
                const u64 off = (u64)(i * 4 * P3_ROWS + warp * P3_ROWS + r) * ROW_STRIDE;
                cp_async16(smem_u32(&ring[s][warp][0][r][lane & 15]), kp + off);
                cp_async16(smem_u32(&ring[s][warp][1][r][lane & 15]), vp + off);
            }
        }
        cp_async_commit();
    };

#pragma unroll
    for (int i = 0; i < P3_STAGES - 1; ++i) issue(i);
    u32 x = 0;
    for (int i = 0; i < n_iter; ++i) {
        // refills slot (i - 1) % STAGES, which this lane finished reading last iteration
        issue(i + P3_STAGES - 1);
        cp_async_wait<P3_STAGES - 1>();  // stage i (the oldest group) has landed
        const int s = i % P3_STAGES;
#pragma unroll
        for (int j = 0; j < P3_ROWS / 2; ++j) {
            const int r = 2 * j + (lane >> 4);
            x ^= fold(lds128(smem_u32(&ring[s][warp][0][r][lane & 15])));
            x ^= fold(lds128(smem_u32(&ring[s][warp][1][r][lane & 15])));
        }
    }
    write_warp_partial(out, 4, warp, x);
}

// ---- P4 / P5 common: ring of TMA_STAGES boxes of 16 KiB + full/empty mbarriers ----------
// Box t of a block (t = 0 .. 2 * chunk / 64 - 1): tensor t & 1 (0 = K, 1 = V), keys
// 64 * (t >> 1) ... of the block's chunk; it goes to stage s = t % STAGES in that stage's
// pass n = t / STAGES.
//   full[s]:  count 1 (the producer's arrive.expect_tx of BOX_BYTES) + the copies' bytes;
//             its phase n completes when box t has landed. Consumers wait parity n & 1.
//   empty[s]: count 4 (one arrival per consumer warp after it has read the stage); its
//             phase n completes when box t has been consumed. Before issuing box t the
//             producer waits for phase n - 1, i.e. parity (n - 1) & 1 = (n & 1) ^ 1; for
//             n = 0 that is parity 1 on a fresh barrier, which returns at once.
// Neither barrier can run more than one phase ahead of its waiter (full[s] phase n + 1
// needs empty[s] phase n, which needs every consumer warp to be done with box t), so one
// parity bit is enough.
struct Ring {
    u32 base;  // 1024-byte aligned shared address of stage 0
    __device__ __forceinline__ u32 stage(int s) const { return base + s * BOX_BYTES; }
    __device__ __forceinline__ u32 full(int s) const {
        return base + TMA_STAGES * BOX_BYTES + 8 * s;
    }
    __device__ __forceinline__ u32 empty(int s) const {
        return base + TMA_STAGES * BOX_BYTES + 8 * (TMA_STAGES + s);
    }
};

__device__ __forceinline__ Ring ring_setup() {
    Ring ring;
    ring.base = (smem_u32(dyn_smem) + 1023u) & ~1023u;
    if (threadIdx.x == 0) {
        for (int s = 0; s < TMA_STAGES; ++s) {
            mbar_init(ring.full(s), 1);
            mbar_init(ring.empty(s), 4);
        }
        fence_mbar_init();  // visible to the async proxy (TMA, bulk copies)
    }
    __syncthreads();
    return ring;
}

// Consumer warps 0..3 (threads 0..127): each stage, thread t reads bytes 16t + 2048p,
// p < 8 (16 KiB, conflict-free), then each warp releases the stage.
__device__ __forceinline__ void consume(const Ring& ring, int n_boxes, u32* out) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    u32 x = 0;
    for (int t = 0; t < n_boxes; ++t) {
        const int s = t % TMA_STAGES;
        const u32 n = t / TMA_STAGES;
        mbar_wait(ring.full(s), n & 1);
        const u32 src = ring.stage(s) + threadIdx.x * 16;
#pragma unroll
        for (int p = 0; p < BOX_BYTES / (128 * 16); ++p) x ^= fold(lds128(src + p * 2048));
        __syncwarp();                          // every lane of the warp has read the stage
        if (lane == 0) mbar_arrive(ring.empty(s));
    }
    write_warp_partial(out, 4, warp, x);
}

// ---- P4: TMA tensor loads ---------------------------------------------------------------
// Map: 3-D (D, Hk, B*L) elements, strides 256 B (head) and 2048 B (row); box (128 / halves,
// 1, 64). halves = 1: SWIZZLE_NONE, one 16 KiB box per stage; halves = 2: SWIZZLE_128B,
// two 8 KiB boxes (columns 0-63 and 64-127) per stage. The consumers xor every word, so
// the swizzled order in shared memory does not matter.
extern "C" __global__ void __launch_bounds__(160)
p4_decode_tma(const __grid_constant__ TmaDesc map_k, const __grid_constant__ TmaDesc map_v,
              int L, int chunk, int n_split, int order, int halves, u32* __restrict__ out) {
    const Ring ring = ring_setup();
    const BlockCoords c = block_coords(n_split, order);
    const int row0 = c.b * L + c.split * chunk;  // < 2^31 (checked on the host)
    const int n_boxes = 2 * (chunk / BOX_KEYS);
    if (threadIdx.x >= 128) {                    // producer warp: one elected thread
        if (threadIdx.x == 128) {
            prefetch_tensormap(map_k);
            prefetch_tensormap(map_v);
            const int box_cols = HEAD_DIM / halves;
            const u32 part = BOX_BYTES / halves;
            for (int t = 0; t < n_boxes; ++t) {
                const int s = t % TMA_STAGES;
                const u32 n = t / TMA_STAGES;
                mbar_wait(ring.empty(s), (n & 1) ^ 1);
                mbar_arrive_expect_tx(ring.full(s), BOX_BYTES);
                const TmaDesc& map = (t & 1) ? map_v : map_k;
                const int row = row0 + (t >> 1) * BOX_KEYS;
                for (int h = 0; h < halves; ++h)
                    tma_load_3d(ring.stage(s) + h * part, map, ring.full(s),
                                h * box_cols, c.hk, row);
            }
        }
        return;
    }
    consume(ring, n_boxes, out);
}

// ---- P5: 1-D bulk copies, one per 256-byte row ------------------------------------------
// Producer warp: lane 0 announces BOX_BYTES on full[s], then lanes l copy rows l and l + 32
// of the stage (2 bulk copies of 256 B each per lane).
extern "C" __global__ void __launch_bounds__(160)
p5_decode_bulk(const unsigned char* __restrict__ k, const unsigned char* __restrict__ v,
               int L, int chunk, int n_split, int order, u32* __restrict__ out) {
    const Ring ring = ring_setup();
    const BlockCoords c = block_coords(n_split, order);
    const u64 row0 = (u64)c.b * L + (u64)c.split * chunk;
    const int n_boxes = 2 * (chunk / BOX_KEYS);
    if (threadIdx.x >= 128) {
        const int lane = threadIdx.x & 31;
        for (int t = 0; t < n_boxes; ++t) {
            const int s = t % TMA_STAGES;
            const u32 n = t / TMA_STAGES;
            mbar_wait(ring.empty(s), (n & 1) ^ 1);   // every lane waits (no shared state)
            if (lane == 0) mbar_arrive_expect_tx(ring.full(s), BOX_BYTES);
            __syncwarp();
            const unsigned char* src = ((t & 1) ? v : k) +
                ((row0 + (u64)(t >> 1) * BOX_KEYS) * HK + c.hk) * ROW_BYTES;
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int r = lane + 32 * j;
                bulk_load(ring.stage(s) + r * ROW_BYTES, src + (u64)r * ROW_STRIDE,
                          ROW_BYTES, ring.full(s));
            }
        }
        return;
    }
    consume(ring, n_boxes, out);
}
"""


# ---------------------------------------------------------------------------------------
# Compilation (NVRTC, no GPU needed)
# ---------------------------------------------------------------------------------------
def nvrtc_options(arch, p3_stages, p3_rows, watchdog=True):
    return (["-std=c++17", f"-arch={arch}", "-DNDEBUG", f"-DP3_STAGES={p3_stages}",
             f"-DP3_ROWS={p3_rows}", "-Xptxas=-v", "-Xptxas=--warn-on-spills"]
            + ([] if watchdog else ["-DNO_WATCHDOG"]))


def compile_source(arch, p3_stages, p3_rows, watchdog=True):
    """(cubin bytes, ptxas log) of CUDA_SOURCE for ``arch``."""
    from cupy.cuda import nvrtc
    prog = nvrtc.createProgram(CUDA_SOURCE, "bw_probe.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, nvrtc_options(arch, p3_stages, p3_rows, watchdog))
        except nvrtc.NVRTCError:
            raise RuntimeError("NVRTC failed:\n" + nvrtc.getProgramLog(prog)) from None
        return nvrtc.getCUBIN(prog), nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


_PTXAS_RE = re.compile(
    r"Compiling entry function '(?P<name>\w+)'.*?"
    r"(?P<stack>\d+) bytes stack frame, (?P<ss>\d+) bytes spill stores, "
    r"(?P<sl>\d+) bytes spill loads.*?Used (?P<regs>\d+) registers(?P<rest>[^\n]*)", re.S)


def ptxas_report(log):
    """{kernel: dict(regs, stack, spill_stores, spill_loads, line)} from ptxas -v output."""
    out = {}
    for chunk in log.split("ptxas info    : Compiling entry function")[1:]:
        m = _PTXAS_RE.search("Compiling entry function" + chunk)
        if m:
            out[m["name"]] = dict(regs=int(m["regs"]), stack=int(m["stack"]),
                                  spill_stores=int(m["ss"]), spill_loads=int(m["sl"]),
                                  line=f"Used {m['regs']} registers{m['rest'].rstrip()}")
    return out


def print_compile_report(log):
    rep = ptxas_report(log)
    ok = True
    for name in KERNELS:
        r = rep.get(name)
        if r is None:
            print(f"  {name:20s} NOT FOUND in the ptxas log")
            ok = False
            continue
        spill = r["spill_stores"] + r["spill_loads"] + r["stack"]
        ok &= spill == 0
        print(f"  {name:20s} {r['regs']:3d} regs, {r['stack']} B stack, "
              f"{r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads   "
              f"[{r['line']}]")
    warns = [l for l in log.splitlines() if "arning" in l]
    for w in warns:
        print("  ", w)
    return ok and not warns, rep


# ---------------------------------------------------------------------------------------
# Problem geometry
# ---------------------------------------------------------------------------------------
def parse_size(s):
    b, l = s.lower().split("x")
    return int(b), int(l)


def geometry(B, L, chunk, p3_rows):
    if L % chunk:
        raise SystemExit(f"L = {L} is not a multiple of --chunk {chunk}")
    for need, what in ((32, "P2"), (4 * p3_rows, "P3"), (BOX_KEYS, "P4/P5")):
        if chunk % need:
            raise SystemExit(f"--chunk {chunk} must be a multiple of {need} ({what})")
    if B * L >= 2 ** 31:
        raise SystemExit("B * L must be below 2^31 (32-bit TMA row coordinates)")
    n_split = L // chunk
    return dict(B=B, L=L, n_split=n_split, blocks=B * HK * n_split,
                elems=B * L * HK * HEAD_DIM, bytes_read=2 * B * L * HK * HEAD_DIM * 2)


# ---------------------------------------------------------------------------------------
# Tensor maps (cuTensorMapEncodeTiled through ctypes, as cupyflash/_tensor_map.py does)
# ---------------------------------------------------------------------------------------
DT_UINT16 = 1          # CU_TENSOR_MAP_DATA_TYPE_UINT16
SWIZZLE = {"none": 0, "128": 3}  # CU_TENSOR_MAP_SWIZZLE_NONE / _128B
L2_PROMO_256B = 3      # CU_TENSOR_MAP_L2_PROMOTION_L2_256B
OOB_FILL_NONE = 0
INTERLEAVE_NONE = 0


def _encode_fn(repo):
    """cuTensorMapEncodeTiled with its prototype, from cupyflash/_tensor_map.py."""
    sys.path.insert(0, os.path.abspath(repo))
    try:
        from cupyflash import _tensor_map
        return _tensor_map._encode_tiled(), "cupyflash._tensor_map"
    finally:
        sys.path.pop(0)


def encode_cache_map(fn, address, rows, swizzle):
    """3-D map (D, Hk, rows) of a (B, L, Hk, D) uint16 cache with rows = B * L; returns
    (CUresult, one-element V128 array, 64-byte aligned)."""
    raw = np.zeros(128 + 64, dtype=np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start:start + 128].view(np.dtype((np.void, 128)))
    box0 = HEAD_DIM if swizzle == "none" else 64
    u32, u64 = ctypes.c_uint32, ctypes.c_uint64
    res = fn(out.ctypes.data, DT_UINT16, 3, address,
             (u64 * 3)(HEAD_DIM, HK, rows), (u64 * 2)(ROW_BYTES, HK * ROW_BYTES),
             (u32 * 3)(box0, 1, BOX_KEYS), (u32 * 3)(1, 1, 1),
             INTERLEAVE_NONE, SWIZZLE[swizzle], L2_PROMO_256B, OOB_FILL_NONE)
    # (out is a view of raw: it keeps the buffer alive)
    return res, out


# ---------------------------------------------------------------------------------------
# GPU part
# ---------------------------------------------------------------------------------------
def time_ms(cupy, launch, target_ms=50.0, warmup=3, reps=5):
    """Median over reps of (event time of N back-to-back calls) / N; N makes a loop take
    >= target_ms."""
    for _ in range(warmup):
        launch()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    launch()
    end.record()
    end.synchronize()
    one = cupy.cuda.get_elapsed_time(start, end)
    n = max(1, math.ceil(target_ms / max(one, 1e-3)))
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(n):
            launch()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / n)
    return statistics.median(times), n, times


def run_gpu(args, cubin, ptxas):
    import cupy
    from cupy.cuda import driver, function

    dev = cupy.cuda.Device(0)
    dev.use()
    props = cupy.cuda.runtime.getDeviceProperties(0)
    n_sms = props["multiProcessorCount"]
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print(f"GPU: {gpu}, {n_sms} SMs, L2 {props['l2CacheSize'] >> 20} MiB; CuPy "
          f"{cupy.__version__}; CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, "
          f"driver {cupy.cuda.runtime.driverGetVersion()}")

    module = function.Module()
    module.load(cubin)
    # the kernels' watchdog flag (see mbar_wait): 1 after a wait timed out
    # (Module.get_global_var returns the device address, an int)
    abort_flag = cupy.ndarray((1,), np.int32, memptr=cupy.cuda.MemoryPointer(
        cupy.cuda.UnownedMemory(module.get_global_var("g_abort"), 4, module, dev.id), 0))
    fns = {name: module.get_function(name) for name in KERNELS}
    for name in ("p4_decode_tma", "p5_decode_bulk"):
        driver.funcSetAttribute(fns[name].ptr,
                                driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, TMA_SMEM)

    def kinfo(name, threads, smem):
        f = fns[name]
        return dict(regs=driver.funcGetAttribute(driver.CU_FUNC_ATTRIBUTE_NUM_REGS, f.ptr),
                    static_smem=driver.funcGetAttribute(
                        driver.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, f.ptr),
                    dyn_smem=smem, threads=threads,
                    blocks_per_sm=driver.occupancyMaxActiveBlocksPerMultiprocessor(
                        f.ptr, threads, smem))

    init = cupy.ElementwiseKernel(
        "uint32 seed", "uint32 y",
        """unsigned int h = (unsigned int)i * 0x9E3779B1u ^ seed;
           h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u; h ^= h >> 16;
           y = h;""", "bw_probe_init")

    results = []

    def report(rec):
        results.append(rec)
        extra = ""
        if "regs" in rec:
            extra = (f" regs {rec['regs']:3d} blk/SM {rec['blocks_per_sm']:2d}"
                     f" grid {rec['grid']:5d}x{rec['threads']}")
        ratio = f"{rec['ratio_to_copy']:.3f}" if rec.get("ratio_to_copy") else "  -  "
        print(f"{rec['label']:<34s} {rec['size']:>9s} {rec['ms']:8.4f} ms "
              f"{rec['gbs']:7.0f} GB/s  x{ratio} of copy{extra}  "
              f"[N={rec['n']}] {rec.get('check', '')}", flush=True)

    # -- P0: the project's reference copy (1 GiB float32, read + write), and on uint8
    copy_gbs = None
    if "P0" in args.patterns:
        x = cupy.empty(1 << 28, dtype=np.float32)
        y = cupy.empty_like(x)
        init(np.uint32(7), x.view(np.uint32))
        for label, a, b in (("P0 copy (float32 1 GiB, r+w)", x, y),
                            ("P0u8 copy (uint8 1 GiB, r+w)", x.view(np.uint8),
                             y.view(np.uint8))):
            ms, n, _ = time_ms(cupy, lambda a=a, b=b: b.__setitem__(Ellipsis, a))
            gbs = 2 * (1 << 30) / ms / 1e6
            if copy_gbs is None:
                copy_gbs = gbs
            report(dict(pattern=label.split()[0], label=label, size="1GiB", ms=ms, n=n,
                        gbs=gbs, ratio_to_copy=gbs / copy_gbs))
        del x, y
        cupy.get_default_memory_pool().free_all_blocks()

    # -- K and V, shared by all sizes (the first elems of one allocation each)
    sizes = [parse_size(s) for s in args.sizes]
    geos = [geometry(B, L, args.chunk, args.p3_rows) for B, L in sizes]
    max_elems = max(g["elems"] for g in geos)
    k = cupy.empty(max_elems, dtype=np.uint16)
    v = cupy.empty(max_elems, dtype=np.uint16)
    init(np.uint32(0x1234567), k.view(np.uint32))
    init(np.uint32(0x7654321), v.view(np.uint32))
    cupy.cuda.runtime.deviceSynchronize()

    ref_cache = {}

    def reference_xor(elems):
        """Xor of every 32-bit word of k[:elems] and v[:elems], on the host (NumPy)."""
        if elems not in ref_cache:
            acc = np.uint64(0)
            step = 1 << 25  # uint64 words per transfer (256 MiB)
            for buf in (k, v):
                w = buf[:elems].view(np.uint64)
                for i in range(0, w.size, step):
                    acc ^= np.bitwise_xor.reduce(cupy.asnumpy(w[i:i + step]))
            ref_cache[elems] = int((acc & np.uint64(0xFFFFFFFF)) ^ (acc >> np.uint64(32)))
        return ref_cache[elems]

    encode, encode_src = (None, None)
    orders = {"split": 0, "head": 1}

    for (B, L), g in zip(sizes, geos):
        size = f"{B}x{L}"
        kk, vv = k[:g["elems"]], v[:g["elems"]]
        rows = B * L
        i32 = np.int32

        # Each entry: (pattern, label, kernel, grid, threads, dyn smem, args, warps/block)
        launches = []
        if "P1" in args.patterns:
            n_vec = np.uint64(g["elems"] * 2 // 16)  # 16-byte vectors per tensor
            launches.append(("P1", "P1 stream ldg.128 SMsx8 blocks", "p1_stream",
                             n_sms * P1_BLOCKS_PER_SM, P1_THREADS, 0, (kk, vv, n_vec),
                             P1_THREADS // 32))
            deep_grid = n_sms * kinfo("p1_stream_deep", P1_THREADS, 0)["blocks_per_sm"]
            launches.append(("P1", "P1d stream ldg.128 8 in flight", "p1_stream_deep",
                             deep_grid, P1_THREADS, 0, (kk, vv, n_vec), P1_THREADS // 32))
        for oname in args.orders:
            o = orders[oname]
            dec = (i32(L), i32(args.chunk), i32(g["n_split"]), i32(o))
            if "P2" in args.patterns:
                launches.append(("P2", f"P2 decode ldg.128 [{oname}]", "p2_decode_ldg",
                                 g["blocks"], DECODE_THREADS, 0, (kk, vv) + dec, 4))
            if "P3" in args.patterns:
                launches.append(("P3", f"P3 decode cp.async {args.p3_stages}x"
                                 f"{4 * 2 * args.p3_rows * ROW_BYTES >> 10}K"
                                 f" [{oname}]", "p3_decode_cp_async", g["blocks"],
                                 DECODE_THREADS, 0, (kk, vv) + dec, 4))
            if "P4" in args.patterns and encode is None:
                try:
                    encode, encode_src = _encode_fn(args.repo)
                except (OSError, AttributeError) as e:
                    encode = False
                    print(f"  P4 skipped: no cuTensorMapEncodeTiled ({e})")
            if "P4" in args.patterns and encode:
                swz = args.tma_swizzle
                res_k, map_k = encode_cache_map(encode, kk.data.ptr, rows, swz)
                res_v, map_v = encode_cache_map(encode, vv.data.ptr, rows, swz)
                if (res_k or res_v) and swz == "none":
                    print(f"  cuTensorMapEncodeTiled refused SWIZZLE_NONE with a 256-byte "
                          f"box (CUresult {res_k}/{res_v}); using SWIZZLE_128B, 2 boxes")
                    swz = "128"
                    res_k, map_k = encode_cache_map(encode, kk.data.ptr, rows, swz)
                    res_v, map_v = encode_cache_map(encode, vv.data.ptr, rows, swz)
                if res_k or res_v:
                    print(f"  P4 skipped: cuTensorMapEncodeTiled failed ({res_k}/{res_v})")
                else:
                    halves = 1 if swz == "none" else 2
                    launches.append(("P4", f"P4 decode TMA swz-{swz} [{oname}]",
                                     "p4_decode_tma", g["blocks"], TMA_THREADS, TMA_SMEM,
                                     (map_k, map_v) + dec + (i32(halves),), 4))
            if "P5" in args.patterns:
                launches.append(("P5", f"P5 decode bulk 256B [{oname}]", "p5_decode_bulk",
                                 g["blocks"], TMA_THREADS, TMA_SMEM, (kk, vv) + dec, 4))

        for pattern, label, name, grid, threads, smem, kargs, wpb in launches:
            out = cupy.empty(grid * wpb, dtype=np.uint32)
            fn = fns[name]

            def launch(fn=fn, grid=grid, threads=threads, smem=smem, kargs=kargs, out=out):
                fn((grid, 1, 1), (threads, 1, 1), kargs + (out,), shared_mem=smem)

            # verify: poisoned output, one call, xor of the partials vs the host reference
            init(np.uint32(0xBADC0DE), out)
            abort_flag.fill(0)
            launch()
            got = int(np.bitwise_xor.reduce(cupy.asnumpy(out)))
            want = reference_xor(g["elems"])
            check = "OK" if got == want else f"MISMATCH (got {got:#010x}, want {want:#010x})"
            if int(abort_flag.get()[0]):
                print(f"{label:<34s} {size:>9s} DEADLOCK: an mbarrier wait timed out "
                      f"(watchdog); not timed. {check}", flush=True)
                results.append(dict(pattern=pattern, label=label, kernel=name, size=size,
                                    check="DEADLOCK " + check))
                continue
            ms, n, times = time_ms(cupy, launch)
            gbs = g["bytes_read"] / ms / 1e6
            rec = dict(pattern=pattern, label=label, kernel=name, size=size, B=B, L=L,
                       chunk=args.chunk, n_split=g["n_split"], ms=ms, n=n, times_ms=times,
                       bytes_read=g["bytes_read"], gbs=gbs,
                       ratio_to_copy=(gbs / copy_gbs) if copy_gbs else None,
                       check=check, grid=grid, **kinfo(name, threads, smem))
            if name == "p4_decode_tma":
                rec["tensor_map_encoder"] = encode_src
            if name in ptxas:
                rec["ptxas"] = ptxas[name]["line"]
            report(rec)
            del out

    # -- summary table: pattern rows x size columns
    print("\nSummary (GB/s of bytes read; in parentheses: ratio to the copy's GB/s)")
    labels = list(dict.fromkeys(r["label"] for r in results))
    cols = list(dict.fromkeys(r["size"] for r in results))
    print(f"{'pattern':<34s}" + "".join(f"{c:>20s}" for c in cols) + "   regs blk/SM check")
    for lab in labels:
        cells, meta = [], ""
        for c in cols:
            r = next((r for r in results if r["label"] == lab and r["size"] == c), None)
            if r is None:
                cells.append(f"{'':>20s}")
                continue
            if "gbs" not in r:
                cells.append(f"{'DEADLOCK':>20s}")
                continue
            ratio = f"({r['ratio_to_copy']:.3f})" if r.get("ratio_to_copy") else ""
            cells.append(f"{r['gbs']:>12.0f} {ratio:>7s}")
            if "regs" in r:
                checks = {x["check"].split()[0] for x in results if x["label"] == lab}
                meta = f"   {r['regs']:4d} {r['blocks_per_sm']:6d} {'/'.join(sorted(checks))}"
        print(f"{lab:<34s}" + "".join(cells) + meta)

    return dict(gpu=gpu, sms=n_sms, cupy=cupy.__version__, copy_gbs=copy_gbs,
                chunk=args.chunk, p3_stages=args.p3_stages, p3_rows=args.p3_rows,
                results=results)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", default=".",
                    help="cupyflash checkout; its _tensor_map ctypes binding is used for the "
                         "tensor maps when importable (default: .)")
    ap.add_argument("--patterns", nargs="+", default=["P0", "P1", "P2", "P3", "P4", "P5"],
                    choices=["P0", "P1", "P2", "P3", "P4", "P5"])
    ap.add_argument("--sizes", nargs="+", default=["64x8192", "16x32768"],
                    help="BxL of the cache (default: 64x8192 16x32768)")
    ap.add_argument("--orders", nargs="+", default=["split", "head"], choices=["split", "head"],
                    help="block orders of P2..P5 (default: both)")
    ap.add_argument("--chunk", type=int, default=1024, help="keys per block (default 1024)")
    ap.add_argument("--p3-stages", type=int, default=4, help="P3 ring stages (default 4)")
    ap.add_argument("--p3-rows", type=int, default=4,
                    help="P3 K rows (and V rows) per warp per stage, even (default 4: "
                         "8 KiB per stage per block)")
    ap.add_argument("--tma-swizzle", choices=["none", "128"], default="none",
                    help="P4 tensor map swizzle (none: one 128x1x64 box; 128: two 64x1x64)")
    ap.add_argument("--no-watchdog", action="store_true",
                    help="compile out the mbarrier-wait watchdog of P4/P5")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--compile-only", action="store_true",
                    help="compile every kernel for --arch with NVRTC, print ptxas -v, exit")
    args = ap.parse_args()
    if args.p3_rows % 2 or args.p3_rows < 2 or args.p3_stages < 2:
        raise SystemExit("--p3-rows must be even >= 2, --p3-stages >= 2")
    p3_bytes = args.p3_stages * 4 * 2 * args.p3_rows * ROW_BYTES
    if p3_bytes > 48 * 1024:
        raise SystemExit(f"P3 ring of {p3_bytes} B exceeds 48 KiB of static shared memory")

    t0 = time.time()
    from cupy.cuda import nvrtc
    cubin, log = compile_source(args.arch, args.p3_stages, args.p3_rows, not args.no_watchdog)
    print(f"NVRTC {nvrtc.getVersion()}, {args.arch}, {time.time() - t0:.1f} s; ptxas -v:")
    ok, ptxas = print_compile_report(log)
    print(f"P3 ring: {args.p3_stages} stages x {p3_bytes // args.p3_stages} B = {p3_bytes} B "
          f"per block; P4/P5 ring: {TMA_STAGES} x {BOX_BYTES} B + mbarriers, "
          f"{TMA_SMEM} B dynamic smem per block")
    for s in args.sizes:
        B, L = parse_size(s)
        g = geometry(B, L, args.chunk, args.p3_rows)
        print(f"size {s}: {g['bytes_read'] / 2**30:.2f} GiB read per call, "
              f"{g['n_split']} splits of {args.chunk} keys, {g['blocks']} decode blocks")
    print("compile check:", "OK (no spills, no warnings)" if ok else "PROBLEMS (see above)")
    if args.compile_only:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(arch=args.arch, ptxas=ptxas, ok=ok), f, indent=1)
        return 0 if ok else 1

    summary = run_gpu(args, cubin, ptxas)
    summary["total_s"] = time.time() - t0
    print(f"total {summary['total_s']:.1f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
