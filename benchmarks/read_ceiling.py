"""What any kernel can reach at decode's batch 1 with an 8k cache (session 14): a kernel
that only reads 32 MiB (flat 16-byte loads, grid-stride, xor per warp), over 132..1056
blocks of 256 threads, launched with and without programmatic dependent launch
(_launch.launch), in benchmarks/decode.py's queue timer, rotating over 8 copies (256 MiB,
more than L2). Prints time per call, GB/s and the fraction of the 1 GiB copy's bandwidth.

    python3 benchmarks/read_ceiling.py
"""
import sys, pathlib
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import numpy as np, cupy
import decode as bench
from cupyflash import _launch
SRC = r'''
struct P { const uint4* x; long long n16; unsigned* out; };
extern "C" __global__ void __launch_bounds__(256) read_all(const P p) {
    const uint4* __restrict__ x = p.x; const long long n16 = p.n16; unsigned* out = p.out;
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    unsigned acc = 0;
    long long i = blockIdx.x * 256LL + threadIdx.x;
    const long long stride = gridDim.x * 256LL;
    #pragma unroll 8
    for (; i < n16; i += stride) { uint4 v = __ldg(x + i); acc ^= v.x ^ v.y ^ v.z ^ v.w; }
    for (int m = 16; m; m >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, m);
    if ((threadIdx.x & 31) == 0 && acc == 0x12345678u) out[0] = acc;
}
'''
mod = cupy.RawModule(code=SRC)
fn = mod.get_function("read_all")
fn = getattr(fn, "kernel", fn)
timer = bench.QueueTimer(cupy, 20, 5)
stream = cupy.cuda.Stream(non_blocking=True); stream.use()
copy = bench.copy_bandwidth(cupy, timer)
nbytes = 32 << 20
bufs = [cupy.random.randint(0, 2**31, nbytes // 4, dtype=np.int32) for _ in range(8)]
out = cupy.zeros(1, dtype=np.uint32)
import struct
dt = np.dtype([("x", np.uint64), ("n", np.int64), ("o", np.uint64)])
print(f"copy {copy:.0f} GB/s")
for blocks in (132, 264, 528, 1056):
    for pdl in (False, True):
        def mk(b):
            p = np.array([(b.data.ptr, nbytes // 16, out.data.ptr)], dtype=dt)[0]
            return lambda: _launch.launch(fn, (blocks,), (256,), p, 0, overlap=pdl)
        ms = timer([mk(b) for b in bufs])
        gbs = nbytes / ms / 1e6
        print(f"blocks {blocks:5d} pdl {int(pdl)}: {ms*1e3:6.2f} us {gbs:6.0f} GB/s {gbs/copy:.3f} of copy", flush=True)
