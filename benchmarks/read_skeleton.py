"""The decode split kernel's reads without its arithmetic (session 15): what the access
pattern itself reaches at batch 1 with an 8k cache (bf16, 8 kv heads of 128: 32 MiB).

A skeleton block (kv head hk, split s) streams keys [s * L / S, (s + 1) * L / S) of head hk
of K and V, laid out (L, 8, 128) like the cache (256-byte pieces of 2 KiB rows), through a
cp.async ring of ST stages of TILE keys, each thread reading back only its own vectors, as
flash_decode's pipeline does, and no math. Grids of 8 * S blocks of NT threads, launched with
programmatic dependent launch, timed with benchmarks/decode.py's queue timer rotating over
8 caches (256 MiB, more than L2), against the flat grid-stride read of read_ceiling.py.
(S = 12 reads 8064 of the 8192 keys: whole tiles only.) Prints us per call, GB/s and the
fraction of the 1 GiB copy's bandwidth.

    python3 benchmarks/read_skeleton.py
"""
import os, sys, pathlib
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import numpy as np, cupy
import decode as bench
from cupyflash import _launch
SRC = r'''
struct P { const char* k; const char* v; long long L; long long S; unsigned* out;
           float* part; float* lse; unsigned* count; float* o; };
// TAIL 0: nothing after the reads. 1: every block stores a partial row of 128 floats and
// an lse (what the split kernel stores), then leaves. 2: as 1, then the splits of a head
// merge as the split kernel's counter merge does, with nothing else: fence, one counter
// add, and the last block loads every split's lse and row at once, weighs, sums, stores.
// 3: the splits of a head are one thread-block cluster: every block stores its row and lse
// into block 0's shared memory (st.shared::cluster) and arrives with release; block 0 waits
// (acquire), weighs, sums, stores (session 15's cluster merge, with nothing else).
template <int NT, int STAGES, int TILE, int TAIL>
__global__ void __launch_bounds__(NT) skel(const P p) {
    extern __shared__ __align__(128) unsigned char sm[];
    // (tail 3) the barrier's first phase: block 0 has started before anyone stores into it
    if constexpr (TAIL == 3) asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    const int S = (int)p.S; const int hk = blockIdx.x / S, s = blockIdx.x % S;
    const int chunk = (int)p.L / S; const int k0 = s * chunk;
    const int ntiles = chunk / TILE;
    constexpr int VPT = TILE * 16 / NT;   // vectors per thread per tile (K); same for V
    const int tid = threadIdx.x;
    unsigned base = (unsigned)__cvta_generic_to_shared(sm) + tid * 16;
    auto slot = [&](int st, int i) { return base + (st * 2 * VPT + i) * NT * 16; };
    auto load = [&](int j) {
        if (j < ntiles) {
            const int st = j % STAGES;
            #pragma unroll
            for (int i = 0; i < VPT; ++i) {
                const int e = tid + i * NT; const int key = k0 + j * TILE + e / 16, vec = e % 16;
                const long long off = (long long)key * 2048 + hk * 256 + vec * 16;
                asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" :: "r"(slot(st, i)), "l"(p.k + off) : "memory");
                asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" :: "r"(slot(st, VPT + i)), "l"(p.v + off) : "memory");
            }
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };
    unsigned acc = 0;
    #pragma unroll
    for (int j = 0; j < STAGES - 1; ++j) load(j);
    for (int j = 0; j < ntiles; ++j) {
        load(j + STAGES - 1);
        asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 1) : "memory");
        const int st = j % STAGES;
        #pragma unroll
        for (int i = 0; i < 2 * VPT; ++i) {
            unsigned a, b, c, d;
            asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];" : "=r"(a), "=r"(b), "=r"(c), "=r"(d) : "r"(slot(st, i)) : "memory");
            acc ^= a ^ b ^ c ^ d;
        }
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    if constexpr (TAIL == 0) {
        if (acc == 0x12345678u) p.out[0] = acc;
    } else {
        // the row and lse stand for the block's (data-dependent, never NaN) partial result
        if (tid < 128) p.part[blockIdx.x * 128 + tid] = float(acc & 0xffffu);
        if (tid == 0) p.lse[blockIdx.x] = float(acc & 0xffu) * 0.01f;
        if constexpr (TAIL == 2) {
            __shared__ unsigned last;
            __syncthreads();
            if (tid == 0) {
                __threadfence();
                last = atomicAdd(p.count + hk, 1u) == unsigned(S - 1);
            }
            __syncthreads();
            if (!last) return;
            __threadfence();
            if (tid < 128) {
                float l[32], x[32];
                #pragma unroll
                for (int i = 0; i < 32; ++i)
                    if (i < S) { l[i] = __ldcg(p.lse + hk * S + i); x[i] = __ldcg(p.part + (hk * S + i) * 128 + tid); }
                float m = -__int_as_float(0x7f800000);
                #pragma unroll
                for (int i = 0; i < 32; ++i) if (i < S) m = fmaxf(m, l[i]);
                float num = 0.f, den = 0.f;
                #pragma unroll
                for (int i = 0; i < 32; ++i) if (i < S) { const float w = exp2f(l[i] - m); num += w * x[i]; den += w; }
                p.o[hk * 128 + tid] = num / den;
            }
            if (tid == 0) p.count[hk] = 0;
        }
        if constexpr (TAIL == 3) {
            __shared__ __align__(16) float region[16 * 128 + 16];   // block 0's: S <= 16
            unsigned rank, remote;
            asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
            asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
            asm volatile("mapa.shared::cluster.u32 %0, %1, 0;" : "=r"(remote)
                         : "r"((unsigned)__cvta_generic_to_shared(region)));
            if (tid < 128)
                asm volatile("st.shared::cluster.f32 [%0], %1;" :: "r"(remote + (rank * 128 + tid) * 4),
                             "f"(float(acc & 0xffffu)) : "memory");
            if (tid == 0)
                asm volatile("st.shared::cluster.f32 [%0], %1;" :: "r"(remote + (16 * 128 + rank) * 4),
                             "f"(float(acc & 0xffu) * 0.01f) : "memory");
            asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
            if (rank != 0) return;
            asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
            if (tid < 128) {
                float m = -__int_as_float(0x7f800000), num = 0.f, den = 0.f;
                #pragma unroll
                for (int i = 0; i < 16; ++i) if (i < S) m = fmaxf(m, region[16 * 128 + i]);
                #pragma unroll
                for (int i = 0; i < 16; ++i)
                    if (i < S) { const float w = exp2f(region[16 * 128 + i] - m); num += w * region[i * 128 + tid]; den += w; }
                p.o[hk * 128 + tid] = num / den;
            }
        }
    }
}
struct PF { const uint4* x; long long n16; unsigned* out; };
extern "C" __global__ void __launch_bounds__(256) flat(const PF p) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    unsigned acc = 0;
    long long i = blockIdx.x * 256LL + threadIdx.x;
    const long long stride = gridDim.x * 256LL;
    for (; i < p.n16; i += stride) { uint4 v = __ldg(p.x + i); acc ^= v.x ^ v.y ^ v.z ^ v.w; }
    if (acc == 0x12345678u) p.out[0] = acc;
}
'''
TAILS = os.environ.get("SKEL_TAILS") is not None   # session 19: the merge's floor
if TAILS:   # our kernel's ring (and the fastest at S = 16), each with the three tails
    CFGS = [(nt, st, tile, tail) for nt, st, tile in ((128, 3, 32), (256, 3, 64)) for tail in (0, 1, 2, 3)]
    CFGS += [(256, 5, 64, 0), (256, 5, 64, 3)]   # 160 KiB: one block per SM
else:
    CFGS = [(nt, st, tile, 0) for nt, st, tile in
            [(128, 3, 32), (128, 5, 32), (256, 3, 64), (256, 5, 32), (512, 3, 64), (256, 3, 32)]]
names = [f"skel<{a},{b},{c},{d}>" for a, b, c, d in CFGS]
mod = cupy.RawModule(code=SRC, options=("-std=c++17", "-arch=sm_90a"), name_expressions=names + ["flat"])
stream = cupy.cuda.Stream(non_blocking=True); stream.use()
timer = bench.QueueTimer(cupy, 20, 5)
copy = bench.copy_bandwidth(cupy, timer)
print(f"copy {copy:.0f} GB/s", flush=True)
L, Hk, D = 8192, 8, 128
dt = bench._dtype('bfloat16')
caches = [(bench._random(cupy, (1, L, Hk, D), dt), bench._random(cupy, (1, L, Hk, D), dt)) for _ in range(8)]
nbytes = 2 * L * Hk * D * 2
out = cupy.zeros(1, dtype=np.uint32)
pdt = np.dtype([("k", np.uint64), ("v", np.uint64), ("L", np.int64), ("S", np.int64), ("o", np.uint64),
                ("part", np.uint64), ("lse", np.uint64), ("count", np.uint64), ("out", np.uint64)])
part = cupy.zeros(Hk * 32 * 128, dtype=np.float32); lse = cupy.zeros(Hk * 32, dtype=np.float32)
count = cupy.zeros(Hk, dtype=np.uint32); merged = cupy.zeros(Hk * 128, dtype=np.float32)
ptrs = (part.data.ptr, lse.data.ptr, count.data.ptr, merged.data.ptr)
def report(name, ms):
    gbs = nbytes / ms / 1e6
    print(f"{name:40s} {ms*1e3:7.2f} us {gbs:6.0f} GB/s {gbs/copy:.3f} of copy", flush=True)
def launch_cluster(fn, grid, block, params, smem, cluster):
    """A PDL launch in clusters of ``cluster`` blocks along x (the package's launcher)."""
    _launch.launch(fn, (grid,) if isinstance(grid, int) else grid,
                   (block,) if isinstance(block, int) else block, params, smem,
                   overlap=True, cluster=cluster)
if TAILS:   # our kernel on the same caches, as decode.py times it
    from cupyflash import _cupy_decode
    q = bench._random(cupy, (1, 1, Hk, D), dt); seqlens = cupy.full((1,), L, dtype=np.int32)
    mk = lambda k, v: (lambda: _cupy_decode.attention_decode(q, k, v, seqlens, None, None, None, num_splits=None,
                                                             causal=False, scale=D ** -0.5, max_keys=L))
    report("cupyflash attention_decode", timer([mk(k, v) for k, v in caches]))
for (nt, st, tile, tail), name in zip(CFGS, names):
    fn = mod.get_function(name); fn = getattr(fn, "kernel", fn)
    smem = st * 2 * tile * 256
    if smem > 48 * 1024 or tail >= 2:   # (tail 2's and 3's static words count too)
        cupy.cuda.driver.funcSetAttribute(fn.ptr, cupy.cuda.driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
    if tail == 3:   # CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED: clusters of 12, 16
        cupy.cuda.driver.funcSetAttribute(fn.ptr, 14, 1)
    for S in (8, 12, 16):
        go = (lambda *a: launch_cluster(*a, cluster=S)) if tail == 3 else (lambda *a: _launch.launch(*a, overlap=True))
        mk = lambda k, v: (lambda: go(fn, (Hk * S,), (nt,), np.array([(k.data.ptr, v.data.ptr, L, S, out.data.ptr) + ptrs], pdt)[0], smem))
        report(f"skeleton NT={nt} ST={st} TILE={tile} S={S} tail={tail}", timer([mk(k, v) for k, v in caches]))
    if tail >= 2:   # the merge's answer: the weighted mean of the rows (checked once)
        cupy.cuda.get_current_stream().synchronize()
        assert int(count.sum()) == 0 and bool(cupy.isfinite(merged).all()), "merge skeleton"
ff = mod.get_function("flat"); ff = getattr(ff, "kernel", ff)
fdt = np.dtype([("x", np.uint64), ("n", np.int64), ("o", np.uint64)])
bufs = [cupy.ones(nbytes, dtype=np.uint8) for _ in range(8)]
for blocks in (528, 1056):
    mk = lambda b: (lambda: _launch.launch(ff, (blocks,), (256,), np.array([(b.data.ptr, nbytes // 16, out.data.ptr)], fdt)[0], 0, overlap=True))
    report(f"flat read, {blocks} blocks of 256", timer([mk(b) for b in bufs]))
