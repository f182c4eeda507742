"""Would a balanced end make batch 16 faster? A read skeleton with dynamic chunks (session 22).

At batch 16 with a 32k cache the one-row decode kernel runs one block per (b, kv head)
unit, 128 blocks on 132 SMs, and the slowest block sets the time. Session 22's timeline
(`TL_CASES=16:32768:8 decode_timeline.py`) put the blocks' loop ends 10 us apart (median
677, max 683-689 us of ~686), with no block or SM slow from call to call. This lab tool
asks how much of that a balanced end could win, before any kernel is written for it.

Skeleton blocks read K and V of a (16, L, 8, 128) bf16 cache with no arithmetic (a cp.async
ring of STAGES tiles of 32 keys x 256 bytes of K and of V, each thread reading back only
its own vectors, launched with PDL, as `read_layout.py`'s head cut), in three ways:

  static       one block per unit, all L keys of one kv head (the decode kernel's grid);
  sync S       static, in clusters of the 8 heads of a batch element, which wait for
               each other every S tiles (barrier.cluster): they read the same rows together;
  dyn C        132 persistent blocks take chunks of C tiles from a global counter, round
               by round over the 128 units (chunk c: unit c % 128, tiles (c / 128) * C
               ...), or unit by unit (unit-major), claiming the next chunk when they start
               one, the ring running on across chunks (no drain between them): an upper
               bound, since a decode kernel would also merge the chunks' partial results.

Session 22 (benchmarks/NOTES.md, R3): static 683.0 us, dyn round by round 677.5 (C = 8),
unit by unit 686.6, clusters 700-706: the order, not the balance alone, gave the 0.8%;
the kernel built on it did not keep it (R8).

Session 23 added three modes (benchmarks/NOTES.md, "Session 23"):

  rot          static units that start at other tiles (and wrap around), or of other
               shapes (whole rows, several heads or key streams a block): where the
               blocks of a batch element read different key rows at a time (heads
               started apart, key ranges split between blocks) the read is 1-3.5%
               slower; batch elements started apart, or whole rows whose 8 blocks read
               neighbouring keys, cost nothing;
  throttle     static blocks that count their tiles in a global word and nap when ahead
               of the grid's mean: the count alone costs 1.5% at every 8 tiles;
  alloc        the same cache at four places in memory, each read by every skeleton,
               `attention_decode` and cuDNN: where it lies moves ours by up to 1.5%.

Session 24 added three more (benchmarks/NOTES.md, "Session 24"), each at four places:

  heads        lean skeletons `heads<HPB, 3>`: a block per (b, group of HPB neighbouring
               kv heads), HPB = 1, 2, 4; HPB = 1 read 1% faster than `static` (same
               pattern, dyn<>'s per-copy bookkeeping gone), 2 and 4 heads slower;
  lean         HPB = 1 with the decode kernel's lanes (MAP 1), a chain of DELAY dependent
               FMAs or SHFL shuffles per tile after its wait, 2 or 4 stages;
  after        the same with the refill after the wait (AFTER 1: STAGES - 1 tiles in
               flight throughout) against before it.

Each launch gets a pair of counters of its own (a zeroed array, two slots per launch). It
prints us per call and GB/s, with `attention_decode` and torch's cuDNN backend timed in
the same run.

    python3 benchmarks/balance_probe.py            # batch 16 at 32k keys
    python3 benchmarks/balance_probe.py 16 131072  # batch, keys
    python3 benchmarks/balance_probe.py 16 32768 rot   # static units starting at other tiles
    python3 benchmarks/balance_probe.py 16 32768 throttle   # blocks ahead of the mean nap
    python3 benchmarks/balance_probe.py 16 32768 alloc   # four placements of the same cache
    python3 benchmarks/balance_probe.py 16 32768 heads   # blocks of 1, 2, 4 kv heads, 4 places
    python3 benchmarks/balance_probe.py 16 32768 lean    # math's latency per tile, stages
    python3 benchmarks/balance_probe.py 16 32768 after   # the refill after the wait
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import cupy  # noqa: E402
import decode as bench  # noqa: E402
from cupyflash import _cupy_decode, _launch  # noqa: E402

SRC = r'''
struct P {
    const char* k; const char* v; unsigned* counter; unsigned* out;
    long long L;
    long long units;    // B * 8 (b, kv head)
    long long chunk;    // tiles per chunk
    long long chunks;   // units * tiles per unit / chunk
    long long order;    // 0: chunk c is (round c / units, unit c % units); 1: (unit, round)
    long long sync;     // > 0: a cluster's blocks wait for each other every `sync` tiles
    long long rot;      // static only: unit u starts at tile rot_start(u) and wraps around
    long long thr;      // > 0: every `thr` tiles a block adds them to a progress count (counter[1])
    long long slack;    // and naps while more than `slack` tiles ahead of the grid's mean,
    long long nap;      // `nap` ns, once per check (no block waits for another)
};
// Every word of a thread's N vectors of one tile, xored (the skeletons' "use" of a tile).
template <int N, typename Slot>
__device__ __forceinline__ unsigned read_back(Slot slot) {
    unsigned acc = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        unsigned a, b2, c, d;
        asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(a), "=r"(b2), "=r"(c), "=r"(d) : "r"(slot(i)) : "memory");
        acc ^= a ^ b2 ^ c ^ d;
    }
    return acc;
}
// The tile a static unit starts at: 0; by batch element (b * TILES / B); by unit; by kv
// head (h * TILES / 8, batch elements in step); or scattered by a hash of the unit.
__device__ long long rot_start(const P& p, long long u) {
    const long long tiles = p.L / 32, B = p.units / 8;
    switch ((int)p.rot) {
    case 1: return (u / 8) * tiles / B;
    case 2: return u * tiles / p.units;
    case 3: return (u % 8) * tiles / 8;
    case 4: return ((u * 2654435761ull) >> 7) % tiles;
    case 5: case 6: case 7: case 10: case 11: case 12: return 0;   // (see the copies)
    case 8: return (u / 8) % tiles;         // batch elements a tile apart
    case 9: return (u / 8) * 3 % tiles;     // three tiles apart
    default: return 0;
    }
}
template <int NT, int STAGES>
__global__ void __launch_bounds__(NT) dyn(const P p) {
    constexpr int TB = 8192;                      // K (and V) bytes of a tile: 32 keys x 256
    constexpr int VPT = TB / 16 / NT;
    extern __shared__ __align__(128) unsigned char sm[];
    __shared__ int claimed[2];
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    const int tid = threadIdx.x;
    const unsigned smem = (unsigned)__cvta_generic_to_shared(sm) + tid * 16;
    auto slot = [&](int st, int i) { return smem + (st * 2 * VPT + i) * NT * 16; };
    const int chunk = (int)p.chunk, chunks = (int)p.chunks, units = (int)p.units;
    auto chunk_base = [&](int c) {   // byte offset of the chunk's first key, its head's columns
        const long long per = p.chunks / units;   // chunks per unit
        const long long u = p.order ? c / per : c % units, r = p.order ? c % per : c / units;
        return ((u / 8) * p.L + r * chunk * 32) * 2048 + (u % 8) * 256;
    };
    int lc = blockIdx.x;             // the chunk the loads are in, and the tile in it
    if (lc >= chunks) return;
    int lt = 0, parity = 0, loaded = 0;   // tiles issued
    bool more = true;
    long long base = chunk_base(lc);
    const long long rot0 = p.rot ? rot_start(p, lc) : 0, tiles = p.L / 32;
    auto load = [&](int j) {         // tile j of this block's sequence
        if (more) {
            const int st = j % STAGES;
            ++loaded;
#pragma unroll
            for (int i = 0; i < VPT; ++i) {
                const int o = (tid + i * NT) * 16;
                long long t = lt + rot0;                      // (static: one chunk)
                if (t >= tiles) t -= tiles;
                // Static units of other shapes (unit lc = (b, s), s < 8; o: the byte in a
                // tile of 8 KiB; piece kk = o / 256, a key's 256 bytes of one head):
                //  5: whole rows, interleaved: tile lt is keys (lt * 8 + s) * 4 .. + 4, all
                //     8 heads (the 8 units of b read 32 neighbouring keys together);
                //  6 / 7: one head, the tile's 32 keys 8 of each quarter (16 of each half);
                // 10: whole rows, unit s takes keys s * L / 8 .. (s + 1) * L / 8;
                // 11: heads 2 (s % 4) and the next, keys of half s / 4, 16 keys a tile;
                // 12: heads 4 (s % 2) .. + 3, keys of quarter s / 2, 8 keys a tile.
                const long long kk = o / 256, b = lc / 8, su = lc % 8;
                long long off;
                switch ((int)p.rot) {
                case 5: off = (b * p.L + (lt * 8 + su) * 4 + o / 2048) * 2048 + o % 2048; break;
                case 6: off = base + ((kk / 8) * (p.L / 4) + lt * 8 + kk % 8) * 2048 + o % 256;
                        break;
                case 7: off = base + ((kk / 16) * (p.L / 2) + lt * 16 + kk % 16) * 2048 + o % 256;
                        break;
                case 10: off = (b * p.L + su * (p.L / 8) + lt * 4 + o / 2048) * 2048 + o % 2048;
                         break;
                case 11: off = (b * p.L + (su / 4) * (p.L / 2) + lt * 16 + kk / 2) * 2048
                               + (2 * (su % 4) + kk % 2) * 256 + o % 256;
                         break;
                case 12: off = (b * p.L + (su / 2) * (p.L / 4) + lt * 8 + kk / 4) * 2048
                               + (4 * (su % 2) + kk % 4) * 256 + o % 256;
                         break;
                default: off = base + (t * 32 + kk) * 2048 + o % 256;
                }
                asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;"
                             :: "r"(slot(st, i)), "l"(p.k + off) : "memory");
                asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;"
                             :: "r"(slot(st, VPT + i)), "l"(p.v + off) : "memory");
            }
            // (after the copies: thread 0 waits for the atomic's value here, not before them)
            if (lt == 0 && tid == 0)
                claimed[parity] = (int)gridDim.x + (int)atomicAdd(p.counter, 1u);
            if (++lt == chunk) {     // the next chunk: the one claimed when this one began
                __syncthreads();
                const int c = claimed[parity];
                parity ^= 1;
                lt = 0;
                if (c < chunks) { lc = c; base = chunk_base(c); } else more = false;
            }
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };
    unsigned acc = 0, seen = 0;
#pragma unroll
    for (int j = 0; j < STAGES - 1; ++j) load(j);
    for (int j = 0; j < loaded; ++j) {   // (loaded grows while the claims give chunks)
        load(j + STAGES - 1);
        if (p.sync > 0 && j % p.sync == 0) {   // lockstep: wait for the last arrival, arrive
            if (j > 0) asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
            asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
        }
        if (p.thr > 0 && j % p.thr == 0) {   // throttle: keep near the grid's mean
            // Each warp on its own, nothing waited for: warp 0 adds the block's tiles (a
            // reduction, no reply), lane 0 of every warp compares with the count it loaded
            // at the last check and loads it again for the next; one nap when ahead.
            const int lane = tid % 32;
            unsigned* progress = p.counter + 1;
            if (tid == 0 && j > 0)
                asm volatile("red.relaxed.gpu.global.add.u32 [%0], %1;"
                             :: "l"(progress), "r"((unsigned)p.thr) : "memory");
            int ahead = 0;
            if (lane == 0) {
                // (seen was loaded p.thr tiles ago)
                ahead = j > p.thr
                        && (long long)(j - p.thr) * units > (long long)seen + p.slack * units;
                asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];"
                             : "=r"(seen) : "l"(progress) : "memory");
            }
            if (__shfl_sync(0xffffffffu, ahead, 0)) __nanosleep((unsigned)p.nap);
        }
        asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 1) : "memory");
        acc ^= read_back<2 * VPT>([&](int i) { return slot(j % STAGES, i); });
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    if (p.sync > 0) asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
    if (acc == 0x12345678u) p.out[0] = acc;
    if (tid == 0) atomicAdd(p.out + 1, (unsigned)loaded);   // (the check: every tile once)
}

// Session 24: a block per (batch element, group of HPB neighbouring kv heads), all L keys,
// the group's HPB x 256 contiguous bytes of each key row read together (NT = 128 * HPB
// threads, 4 vectors of K and 4 of V per thread a tile, as dyn<128,3>): the HPB heads of
// a group cannot drift apart, and a batch element has 8 / HPB readers instead of 8.
// MAP 1 (HPB = 1): the decode kernel's lanes (warp w copies keys 8w .. 8w + 7 of a tile,
// 2 a pass of 16 lanes) instead of MAP 0's (warp w: keys 2w, 2w + 1, + 8 a vector).
// DELAY: a chain of DELAY dependent FMAs per tile after its wait (the math's latency);
// SHFL: as many xor shuffles (the math's butterflies). AFTER 1: wait for tile j first,
// then refill the slot read in the iteration before (STAGES - 1 tiles in flight at every
// point of the loop) instead of refilling it before the wait (STAGES while waiting,
// STAGES - 1 while reading and through the delay).
template <int HPB, int STAGES, int MAP = 0, int DELAY = 0, int SHFL = 0, int AFTER = 0>
__global__ void __launch_bounds__(128 * HPB) heads(const P p) {
    constexpr int NT = 128 * HPB, VPT = 4, ROW = 256 * HPB;   // bytes of a key's group
    extern __shared__ __align__(128) unsigned char sm[];
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    const int tid = threadIdx.x;
    const unsigned smem = (unsigned)__cvta_generic_to_shared(sm) + tid * 16;
    auto slot = [&](int st, int i) { return smem + (st * 2 * VPT + i) * NT * 16; };
    const long long b = blockIdx.x / (8 / HPB), g = blockIdx.x % (8 / HPB);
    const long long base = b * p.L * 2048 + g * ROW;
    const int tiles = (int)(p.L / 32);
    auto load = [&](int j) {
        if (j < tiles) {
            const int st = j % STAGES;
#pragma unroll
            for (int i = 0; i < VPT; ++i) {
                const int o = (tid + i * NT) * 16;   // byte of the tile: key o / ROW
                const int key = MAP ? (tid / 32) * 8 + (tid % 32) / 16 + 2 * i : o / ROW;
                const int col = MAP ? (tid % 16) * 16 : o % ROW;
                const long long off = base + ((long long)j * 32 + key) * 2048 + col;
                asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;"
                             :: "r"(slot(st, i)), "l"(p.k + off) : "memory");
                asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;"
                             :: "r"(slot(st, VPT + i)), "l"(p.v + off) : "memory");
            }
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };
    unsigned acc = 0;
#pragma unroll
    for (int j = 0; j < STAGES - 1; ++j) load(j);
    for (int j = 0; j < tiles; ++j) {
        if (AFTER) {
            asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 2) : "memory");
            load(j + STAGES - 1);
        } else {
            load(j + STAGES - 1);
            asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 1) : "memory");
        }
        acc ^= read_back<2 * VPT>([&](int i) { return slot(j % STAGES, i); });
        if (DELAY > 0) {
            float x = __uint_as_float(acc & 0x3f7fffffu);
#pragma unroll
            for (int i = 0; i < DELAY; ++i) x = fmaf(x, 0.999f, 1e-7f);
            acc ^= __float_as_uint(x);
        }
#pragma unroll
        for (int i = 0; i < SHFL; ++i) acc += __shfl_xor_sync(0xffffffffu, acc, 1 << (i % 5));
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    if (acc == 0x12345678u) p.out[0] = acc;
    if (tid == 0) atomicAdd(p.out + 1, (unsigned)(tiles * HPB));   // (every unit's tiles once)
}
'''
B = int(sys.argv[1]) if len(sys.argv) > 1 else 16
L = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
Hk, D = 8, 128
TILES = L // 32
NAMES = ["dyn<128,3>", "dyn<256,3>"]
HEADS = {h: f"heads<{h},3>" for h in (1, 2, 4)}
HEADS.update({v: f"heads<1,{v[0]},{v[1]},{v[2]},{v[3]},{v[4]}>" for v in (
    (3, 1, 0, 0, 0), (3, 0, 64, 0, 0), (3, 0, 256, 0, 0), (3, 0, 128, 0, 0), (3, 0, 0, 32, 0),
    (3, 1, 256, 32, 0), (2, 0, 0, 0, 0), (4, 0, 0, 0, 0),
    (3, 1, 64, 0, 0), (4, 1, 0, 0, 1), (4, 1, 64, 0, 1), (4, 1, 128, 0, 1), (4, 1, 256, 0, 1),
    (4, 1, 64, 8, 1), (3, 1, 0, 0, 1), (5, 1, 0, 0, 1), (5, 1, 128, 0, 1))})
LEAN = {"lean": [1, (3, 1, 0, 0, 0), (3, 0, 64, 0, 0), (3, 0, 256, 0, 0), (3, 0, 128, 0, 0),
                 (3, 0, 0, 32, 0), (3, 1, 256, 32, 0), (2, 0, 0, 0, 0), (4, 0, 0, 0, 0)],
        "after": [(3, 1, 0, 0, 0), (3, 1, 64, 0, 0), (4, 1, 0, 0, 1), (4, 1, 64, 0, 1),
                  (4, 1, 128, 0, 1), (4, 1, 256, 0, 1), (4, 1, 64, 8, 1), (3, 1, 0, 0, 1),
                  (5, 1, 0, 0, 1), (5, 1, 128, 0, 1)]}
mod = cupy.RawModule(code=SRC, options=("-std=c++17", "-arch=sm_90a"),
                     name_expressions=NAMES + list(HEADS.values()))
timer, stream, torch, backends, copy = bench.lab_session(cupy)
print(f"batch {B}, {L} keys, {Hk} kv heads of {D}, bf16", flush=True)
dt = bench._dtype("bfloat16")
kv_bytes, q, caches, seqlens = bench.rotating_caches(cupy, B, L, Hk, Hk, D, dt)
out = cupy.zeros(2, dtype=np.uint32)
counters = cupy.zeros(1 << 16, dtype=np.uint32)
pdt = np.dtype([(n, np.uint64) for n in ("k", "v", "c", "o")]
               + [(n, np.int64) for n in ("L", "units", "chunk", "chunks", "order", "sync", "rot",
                                              "thr", "slack", "nap")])
sms = cupy.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]


def report(name, ms):
    gbs = kv_bytes / ms / 1e6
    print(f"{name:40s} {ms * 1e3:9.2f} us {gbs:6.0f} GB/s {gbs / copy:.3f} of copy", flush=True)


def skeleton(name, chunk, grid, order=0, sync=0, rot=0, thr=(0, 0, 0)):
    fn = mod.get_function(name)
    fn = getattr(fn, "kernel", fn)
    smem = 3 * 2 * 8192
    cupy.cuda.driver.funcSetAttribute(
        fn.ptr, cupy.cuda.driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
    units = B * Hk
    chunks = units * TILES // chunk
    nxt = [0]

    def mk(k, v):
        def run():
            i = nxt[0]
            nxt[0] += 1
            prm = np.array([(k.data.ptr, v.data.ptr, counters.data.ptr + 8 * i, out.data.ptr,
                             L, units, chunk, chunks, order, sync, rot, *thr)], pdt)[0]
            _launch.launch(fn, (grid or units,), (int(name[4:7]),), prm, smem, overlap=True,
                           cluster=8 if sync else None)
        return run
    counters.fill(0)
    out.fill(0)
    mk(*caches[0])()
    stream.synchronize()
    assert int(out[1].get()) == units * TILES, (name, chunk, grid, int(out[1].get()))
    counters.fill(0)
    nxt[0] = 0
    ms = timer([mk(k, v) for k, v in caches], kv_bytes / 3.1e9)
    assert 2 * nxt[0] < counters.size
    return ms


def heads_skeleton(hpb):
    """us of the `heads` skeleton: a block per (b, group of `hpb` neighbouring kv heads);
    ``hpb`` a tuple (STAGES, MAP, DELAY, SHFL, AFTER): one head a block, that variant."""
    fn = mod.get_function(HEADS[hpb])
    stages = hpb[0] if isinstance(hpb, tuple) else 3
    hpb = 1 if isinstance(hpb, tuple) else hpb
    fn = getattr(fn, "kernel", fn)
    smem = stages * 2 * 8192 * hpb
    cupy.cuda.driver.funcSetAttribute(
        fn.ptr, cupy.cuda.driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)

    def mk(k, v):
        def run():
            prm = np.array([(k.data.ptr, v.data.ptr, counters.data.ptr, out.data.ptr,
                             L, B * Hk, TILES, B * Hk, 0, 0, 0, 0, 0, 0)], pdt)[0]
            _launch.launch(fn, (B * Hk // hpb,), (128 * hpb,), prm, smem, overlap=True)
        return run
    out.fill(0)
    mk(*caches[0])()
    stream.synchronize()
    assert int(out[1].get()) == B * Hk * TILES, (hpb, int(out[1].get()))
    return timer([mk(k, v) for k, v in caches], kv_bytes / 3.1e9)


def package(k, v):
    return lambda: _cupy_decode.attention_decode(q, k, v, seqlens, None, None, None,
                                                 num_splits=None, causal=False,
                                                 scale=D ** -0.5, max_keys=L)


ROT_NAMES = {1: "by batch element", 2: "by unit", 3: "by kv head", 4: "scattered",
             5: "at 0, whole rows interleaved", 6: "at 0, 4 streams", 7: "at 0, 2 streams",
             8: "b tiles", 9: "3 b tiles", 10: "whole rows, key ranges",
             11: "2 heads, halves", 12: "4 heads, quarters"}


def torch_cudnn():
    tq = bench.as_torch(torch, q).transpose(1, 2)
    return [lambda k=k, v=v: backends["torch_cudnn"](
        tq, bench.as_torch(torch, k).transpose(1, 2), bench.as_torch(torch, v).transpose(1, 2),
        False) for k, v in caches]


def references(rnd):
    """Round ``rnd``'s lines for the package's kernel and cuDNN on the same caches."""
    report(f"r{rnd} attention_decode", timer([package(k, v) for k, v in caches],
                                             kv_bytes / 3.1e9))
    if "torch_cudnn" in backends:
        report(f"r{rnd} torch cudnn", timer(torch_cudnn(), kv_bytes / 3.1e9))


if len(sys.argv) > 3 and sys.argv[3] == "rot":   # session 23: where each static unit starts
    for rnd in range(4):
        references(rnd)
        for rot in (0, 5, 1):
            report(f"r{rnd} static, start {ROT_NAMES.get(rot, 'at 0')}",
                   skeleton(NAMES[0], TILES, None, rot=rot))
        report(f"r{rnd} dyn C=8 G=132 round-major", skeleton(NAMES[0], 8, sms, 0))
    sys.exit(0)

def by_place(columns):
    """Two rounds over four places of the cache (the first and three separately allocated
    copies of it): a line per place with ours, cuDNN and each ``(tag, time_fn)`` column."""
    k_vals, v_vals = caches[0]
    pairs = [caches[0]]
    for i in range(3):
        k, v = cupy.empty_like(k_vals), cupy.empty_like(v_vals)
        k[...] = k_vals
        v[...] = v_vals
        pairs.append((k, v))
    for rnd in range(2):
        for i, pair in enumerate(pairs):
            caches[:] = [pair]
            line = [f"r{rnd} pair {i}:"]
            for name, fns in (("ours", [package(*pair)]), ("cudnn", torch_cudnn())):
                line.append(f"{name} {timer(fns, kv_bytes / 3.1e9) * 1e3:7.2f}")
            for tag, time_fn in columns:
                line.append(f"{tag} {time_fn() * 1e3:7.2f}")
            print("  ".join(line), flush=True)


DYN8 = ("dyn8", lambda: skeleton(NAMES[0], 8, sms, 0))
if len(sys.argv) > 3 and sys.argv[3] == "alloc":   # session 23: four places of the cache
    by_place([(f"rot{rot}", lambda rot=rot: skeleton(NAMES[0], TILES, None, rot=rot))
              for rot in (0, 5, 10, 11, 12)] + [DYN8])
    sys.exit(0)

if len(sys.argv) > 3 and sys.argv[3] == "heads":   # session 24: heads read together
    by_place([("static", lambda: skeleton(NAMES[0], TILES, None))]
             + [(f"heads{hpb}", lambda hpb=hpb: heads_skeleton(hpb)) for hpb in (1, 2, 4)]
             + [DYN8])
    sys.exit(0)

if len(sys.argv) > 3 and sys.argv[3] in LEAN:   # session 24: what slows a lean read
    by_place([("lean" if var == 1 else "s{}m{}d{}x{}a{}".format(*var),
               lambda var=var: heads_skeleton(var)) for var in LEAN[sys.argv[3]]])
    sys.exit(0)

if len(sys.argv) > 3 and sys.argv[3] == "throttle":   # session 23: blocks held near the mean
    for rnd in range(2):
        references(rnd)
        report(f"r{rnd} static", skeleton(NAMES[0], TILES, None))
        for every, slack, nap in ((8, 1 << 20, 0), (8, 2, 300), (8, 4, 300), (8, 4, 600),
                                  (16, 4, 600), (16, 8, 1000), (32, 8, 1000), (4, 2, 300)):
            report(f"r{rnd} static, every {every} slack {slack} nap {nap}",
                   skeleton(NAMES[0], TILES, None, thr=(every, slack, nap)))
        report(f"r{rnd} dyn C=8 G=132 round-major", skeleton(NAMES[0], 8, sms, 0))
    sys.exit(0)

for rnd in range(2):
    references(rnd)
    for name in NAMES[:1]:
        report(f"r{rnd} static {name}", skeleton(name, TILES, None))
        for sync in (4, 16, 64):
            report(f"r{rnd} static, cluster of 8 heads, sync {sync}",
                   skeleton(name, TILES, None, sync=sync))
        for chunk in (8, 16, 32, 64):
            for order in (0, 1):
                report(f"r{rnd} dyn C={chunk:<3d} G=132 {'unit-major' if order else 'round-major'}",
                       skeleton(name, chunk, sms, order))
