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
import sys, pathlib
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import numpy as np, cupy
import decode as bench
from cupyflash import _launch
SRC = r'''
struct P { const char* k; const char* v; long long L; long long S; unsigned* out; };
template <int NT, int STAGES, int TILE>
__global__ void __launch_bounds__(NT) skel(const P p) {
    extern __shared__ __align__(128) unsigned char sm[];
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
    if (acc == 0x12345678u) p.out[0] = acc;
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
CFGS = [(128, 3, 32), (128, 5, 32), (256, 3, 64), (256, 5, 32), (512, 3, 64), (256, 3, 32)]
names = [f"skel<{a},{b},{c}>" for a, b, c in CFGS]
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
pdt = np.dtype([("k", np.uint64), ("v", np.uint64), ("L", np.int64), ("S", np.int64), ("o", np.uint64)])
def report(name, ms):
    gbs = nbytes / ms / 1e6
    print(f"{name:40s} {ms*1e3:7.2f} us {gbs:6.0f} GB/s {gbs/copy:.3f} of copy", flush=True)
for (nt, st, tile), name in zip(CFGS, names):
    fn = mod.get_function(name); fn = getattr(fn, "kernel", fn)
    smem = st * 2 * tile * 256
    if smem > 48 * 1024:
        cupy.cuda.driver.funcSetAttribute(fn.ptr, cupy.cuda.driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
    for S in (8, 12, 16):
        mk = lambda k, v: (lambda: _launch.launch(fn, (Hk * S,), (nt,), np.array([(k.data.ptr, v.data.ptr, L, S, out.data.ptr)], pdt)[0], smem, overlap=True))
        report(f"skeleton NT={nt} ST={st} TILE={tile} S={S}", timer([mk(k, v) for k, v in caches]))
ff = mod.get_function("flat"); ff = getattr(ff, "kernel", ff)
fdt = np.dtype([("x", np.uint64), ("n", np.int64), ("o", np.uint64)])
bufs = [cupy.ones(nbytes, dtype=np.uint8) for _ in range(8)]
for blocks in (528, 1056):
    mk = lambda b: (lambda: _launch.launch(ff, (blocks,), (256,), np.array([(b.data.ptr, nbytes // 16, out.data.ptr)], fdt)[0], 0, overlap=True))
    report(f"flat read, {blocks} blocks of 256", timer([mk(b) for b in bufs]))
