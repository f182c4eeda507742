"""Which order of reading a (B, L, Hk, D) cache streams fastest at batch 16 (session 18).

At batch 16 and 64 the decode kernels and cuDNN read K and V at ~3.13-3.14 TB/s, and which
of them is ahead changes between runs. This lab tool asks whether the order of the reads
could make either faster. Skeleton blocks read K and V through a cp.async ring (ST stages
of TB bytes of each, NT threads, each thread reading back only its own vectors, no math,
launched with PDL), and they cut the cache in two ways:

  head   a block per (b, kv head): all L keys of one head, 256-byte pieces of 2 KiB rows
         (the decode kernels' units at batch 16: one split);
  rows   a block per (b, key range): whole 2 KiB rows (every head) of L / S keys, one
         contiguous stretch per block.

Each cut is also run as a grid of one block per SM's worth (GRID = 128) whose blocks take
the units i, i + 128, ... in turn, as the one-row decode kernel does at batch 32-64
("x128").

It also times a flat grid-stride read of the same bytes with 16-byte loads. Caches are
bf16, 8 kv heads of 128, copies rotated so that a queue reads at least 4x the L2. It
prints us per call, GB/s, and the fraction of the 1 GiB copy's bandwidth.

    python3 benchmarks/read_layout.py            # batch 16 at 32k keys
    python3 benchmarks/read_layout.py 64 8192    # batch, keys
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import cupy  # noqa: E402
import decode as bench  # noqa: E402
from cupyflash import _launch  # noqa: E402

SRC = r'''
struct P {
    const char* k; const char* v; unsigned* out;
    long long piece;     // bytes read at a time, then skip to the next 2 KiB row
    long long pieces;    // pieces per block
    long long per_b;     // blocks per batch element
    long long head_off;  // bytes between the pieces of neighbouring blocks of one b (head)
    long long row_off;   // rows between the stretches of neighbouring blocks of one b
    long long L;
    long long units;     // B * per_b; blocks take units blockIdx.x, + gridDim.x, ...
};
template <int NT, int STAGES, int TB>
__global__ void __launch_bounds__(NT) skel(const P p) {
    extern __shared__ __align__(128) unsigned char sm[];
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    constexpr int VPT = TB / 16 / NT;             // vectors per thread per tile (K; V alike)
    const int tid = threadIdx.x;
    const unsigned smem = (unsigned)__cvta_generic_to_shared(sm) + tid * 16;
    auto slot = [&](int st, int i) { return smem + (st * 2 * VPT + i) * NT * 16; };
    unsigned acc = 0;
    for (long long u = blockIdx.x; u < p.units; u += gridDim.x) {
        const long long b = u / p.per_b, part = u % p.per_b;
        const long long base = (b * p.L + part * p.row_off) * 2048 + part * p.head_off;
        const long long total = p.pieces * p.piece;   // bytes of K (and of V) for this unit
        const int ntiles = (int)(total / TB);
        auto load = [&](int j) {
            if (j < ntiles) {
                const int st = j % STAGES;
#pragma unroll
                for (int i = 0; i < VPT; ++i) {
                    const long long o = (long long)j * TB + (tid + i * NT) * 16;  // in the stream
                    const long long off = base + (o / p.piece) * 2048 + o % p.piece;
                    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;"
                                 :: "r"(slot(st, i)), "l"(p.k + off) : "memory");
                    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;"
                                 :: "r"(slot(st, VPT + i)), "l"(p.v + off) : "memory");
                }
            }
            asm volatile("cp.async.commit_group;" ::: "memory");
        };
#pragma unroll
        for (int j = 0; j < STAGES - 1; ++j) load(j);
        for (int j = 0; j < ntiles; ++j) {
            load(j + STAGES - 1);
            asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 1) : "memory");
            const int st = j % STAGES;
#pragma unroll
            for (int i = 0; i < 2 * VPT; ++i) {
                unsigned a, b2, c, d;
                asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];"
                             : "=r"(a), "=r"(b2), "=r"(c), "=r"(d) : "r"(slot(st, i)) : "memory");
                acc ^= a ^ b2 ^ c ^ d;
            }
        }
        asm volatile("cp.async.wait_group 0;" ::: "memory");
    }
    if (acc == 0x12345678u) p.out[0] = acc;
}
struct PF { const uint4* k; const uint4* v; long long n16; unsigned* out; };
extern "C" __global__ void __launch_bounds__(256) flat(const PF p) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    unsigned acc = 0;
    const long long stride = gridDim.x * 256LL;
    for (long long i = blockIdx.x * 256LL + threadIdx.x; i < p.n16; i += stride) {
        const uint4 a = __ldcs(p.k + i), c = __ldcs(p.v + i);
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ c.x ^ c.y ^ c.z ^ c.w;
    }
    if (acc == 0x12345678u) p.out[0] = acc;
}
'''
B = int(sys.argv[1]) if len(sys.argv) > 1 else 16
L = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
Hk, D = 8, 128
CFGS = [(128, 3, 8192), (128, 2, 8192), (128, 4, 8192), (256, 3, 8192)]
names = [f"skel<{a},{b},{c}>" for a, b, c in CFGS]
mod = cupy.RawModule(code=SRC, options=("-std=c++17", "-arch=sm_90a"),
                     name_expressions=names + ["flat"])
stream = cupy.cuda.Stream(non_blocking=True)
stream.use()
timer = bench.QueueTimer(cupy, 20, 5)
copy = bench.copy_bandwidth(cupy, timer)
print(f"GPU {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, copy {copy:.0f} GB/s; "
      f"batch {B}, {L} keys, {Hk} kv heads of {D}, bf16", flush=True)
dt = bench._dtype("bfloat16")
nbytes = 2 * B * L * Hk * D * 2
copies = max(1, -(-200 * 2**20 // (nbytes // 2)))   # (at least 4x L2 rotated)
caches = [(bench._random(cupy, (B, L, Hk, D), dt), bench._random(cupy, (B, L, Hk, D), dt))
          for _ in range(copies)]
out = cupy.zeros(1, dtype=np.uint32)
pdt = np.dtype([(n, np.uint64) for n in ("k", "v", "o")]
               + [(n, np.int64) for n in ("piece", "pieces", "per_b", "head_off", "row_off", "L",
                                          "units")])


def report(name, ms):
    gbs = nbytes / ms / 1e6
    print(f"{name:44s} {ms * 1e3:9.2f} us {gbs:6.0f} GB/s {gbs / copy:.3f} of copy", flush=True)


# (name, piece, pieces per block, blocks per b, head offset, row offset)
GRID = 128   # the one-row decode kernel's grid at batch 32-64 (units_per_block)
LAYOUTS = [("head", 256, L, Hk, 256, 0)]
for S in (2, 4, 8, 16):
    LAYOUTS.append((f"rows S={S}", 2048, L // S, S, 0, L // S))
for rnd in range(2):
    for (nt, st, tb), name in zip(CFGS, names):
        fn = mod.get_function(name)
        fn = getattr(fn, "kernel", fn)
        smem = st * 2 * tb
        if smem > 48 * 1024:
            cupy.cuda.driver.funcSetAttribute(
                fn.ptr, cupy.cuda.driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
        for (lname, piece, pieces, per_b, head_off, row_off), grid in (
                [(c, None) for c in LAYOUTS] + [(c, GRID) for c in LAYOUTS if B * c[3] > GRID]):
            units = B * per_b

            def mk(k, v, fn=fn, smem=smem, nt=nt, piece=piece, pieces=pieces, per_b=per_b,
                   head_off=head_off, row_off=row_off, units=units, grid=grid):
                prm = np.array([(k.data.ptr, v.data.ptr, out.data.ptr, piece, pieces, per_b,
                                 head_off, row_off, L, units)], pdt)[0]
                return lambda: _launch.launch(fn, (grid or units,), (nt,), prm, smem,
                                              overlap=True)
            report(f"r{rnd} {lname:9s}{' x128' if grid else '     '} NT={nt} ST={st} TB={tb}",
                   timer([mk(k, v) for k, v in caches], nbytes / 3e9))
    ff = mod.get_function("flat")
    ff = getattr(ff, "kernel", ff)
    fdt = np.dtype([("k", np.uint64), ("v", np.uint64), ("n", np.int64), ("o", np.uint64)])
    for blocks in (528, 1056, 2112):
        def mkf(k, v, blocks=blocks):
            prm = np.array([(k.data.ptr, v.data.ptr, nbytes // 32, out.data.ptr)], fdt)[0]
            return lambda: _launch.launch(ff, (blocks,), (256,), prm, 0, overlap=True)
        report(f"r{rnd} flat read, {blocks} blocks of 256",
               timer([mkf(k, v) for k, v in caches], nbytes / 3e9))
