"""Host time of the public calls (session 14): host microseconds per call of
attention_decode (device and host lengths, and the launch after validation) and of
attention, a 100-step decoding loop's wall and GPU time per step, and a cProfile of each.

    python3 benchmarks/host_time.py
"""
import cProfile, pstats, io, time, sys, pathlib, math
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import numpy as np, cupy, cupyflash
from cupyflash import _cupy_decode
import ml_dtypes
bf = np.dtype(ml_dtypes.bfloat16)
B, L, H, Hk, D = 4, 8192, 8, 8, 128
q = cupy.random.standard_normal((B, 1, H, D), dtype=np.float32).astype(bf)
k = cupy.random.standard_normal((B, L, Hk, D), dtype=np.float32).astype(bf)
v = cupy.random.standard_normal((B, L, Hk, D), dtype=np.float32).astype(bf)
lens_d = cupy.full((B,), L, dtype=np.int32)
lens_h = np.full((B,), L, dtype=np.int32)
kn = cupy.random.standard_normal((B, 1, Hk, D), dtype=np.float32).astype(bf)
qa = cupy.random.standard_normal((2, 4096, 16, 128), dtype=np.float32).astype(bf)

def wall(fn, n=200):
    fn(); cupy.cuda.Device().synchronize()
    t = time.perf_counter()
    for _ in range(n): fn()
    host = (time.perf_counter() - t) / n
    cupy.cuda.Device().synchronize()
    return host * 1e6

cases = {
  "decode public (device lens)": lambda: cupyflash.attention_decode(q, k, v, lens_d),
  "decode public (host lens)": lambda: cupyflash.attention_decode(q, k, v, lens_h),
  "decode internal": lambda: _cupy_decode.attention_decode(q, k, v, lens_d, None, None, None, num_splits=None, causal=False, scale=D ** -0.5, max_keys=L),
  "attention fwd bf16 2x4096x16x128": lambda: cupyflash.attention(qa, qa, qa),
  "cupy elementwise q*2 (reference)": lambda: q * 2,
}
for name, fn in cases.items():
    try:
        print(f"{name}: {wall(fn):.1f} us host per call", flush=True)
    except Exception as e:
        print(f"{name}: {type(e).__name__}: {e}")
# a decoding loop: 100 public calls queued; wall time per step against the kernel's
for B2 in (1, 16):
    q2 = cupy.random.standard_normal((B2, 1, H, D), dtype=np.float32).astype(bf)
    k2 = cupy.random.standard_normal((B2, L, Hk, D), dtype=np.float32).astype(bf)
    v2 = cupy.random.standard_normal((B2, L, Hk, D), dtype=np.float32).astype(bf)
    ld, lh = cupy.full((B2,), L, dtype=np.int32), np.full((B2,), L, dtype=np.int32)
    for label, lens in (("device lens", ld), ("host lens", lh)):
        fn = lambda: cupyflash.attention_decode(q2, k2, v2, lens)
        for _ in range(3): fn()
        cupy.cuda.Device().synchronize()
        e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
        t = time.perf_counter(); e0.record()
        for _ in range(100): fn()
        e1.record(); e1.synchronize()
        print(f"loop B={B2} 8k {label}: {(time.perf_counter() - t) * 1e4:.1f} us wall per step, "
              f"{cupy.cuda.get_elapsed_time(e0, e1) * 10:.1f} us GPU per step", flush=True)
for name in ("decode public (device lens)", "decode public (host lens)", "decode internal", "attention fwd bf16 2x4096x16x128"):
    fn = cases[name]
    pr = cProfile.Profile(); pr.enable()
    for _ in range(300): fn()
    pr.disable(); cupy.cuda.Device().synchronize()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
    print("=" * 30, name); print(s.getvalue()[:6000])
