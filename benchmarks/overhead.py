"""Host-side costs of a cupyflash call on the GPU.

1. Cold compile: NVRTC time of each attention variant the library can request, compiled
   from scratch (no disk cache), and the first call of a fresh variant end to end.
2. Host overhead: wall time on the host of one `cupyflash.attention` call whose kernel is
   cached, on a tiny problem, with no synchronisation inside the timed loop, next to the
   host time of launching a trivial kernel with the same launcher. The difference is what
   cupyflash adds (validation, dispatch, argument packing, allocation of out and lse).

    python benchmarks/overhead.py
"""

import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import cupyflash  # noqa: E402
from cupyflash import _cupy_backend, _kernels  # noqa: E402


def host_time_us(fn, n=2000, rounds=7):
    """Median over rounds of the mean host time of n calls (no sync inside a round)."""
    import cupy
    per_call = []
    for _ in range(rounds):
        cupy.cuda.get_current_stream().synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        per_call.append((time.perf_counter() - t0) / n * 1e6)
        cupy.cuda.get_current_stream().synchronize()
    return statistics.median(per_call)


def main():
    import cupy
    cc = int(cupy.cuda.Device().compute_capability)
    arch = _kernels.arch_for(cc)
    variants = _cupy_backend.all_attention_variants()
    times = []
    for source, name in variants:
        t0 = time.perf_counter()
        _kernels.compile_variant(source, name, arch, use_disk_cache=False)
        times.append((time.perf_counter() - t0, name))
    times.sort()
    print(f"cold NVRTC compile of {len(times)} attention variants for {arch}: "
          f"median {statistics.median(t for t, _ in times):.2f} s, "
          f"max {times[-1][0]:.2f} s ({times[-1][1]})")

    # First call of a variant nobody compiled yet in this process or on disk.
    with tempfile.TemporaryDirectory() as cache:
        os.environ["CUPYFLASH_CACHE_DIR"] = cache
        _kernels._load.cache_clear()
        q = cupy.asarray(np.random.default_rng(0).standard_normal((1, 1, 64, 96)).astype(np.float16))
        t0 = time.perf_counter()
        cupyflash.attention(q, q, q)
        cupy.cuda.get_current_stream().synchronize()
        print(f"first call, fresh variant (compile + load + run): {time.perf_counter() - t0:.2f} s")
        _kernels._load.cache_clear()
        t0 = time.perf_counter()
        cupyflash.attention(q, q, q)
        cupy.cuda.get_current_stream().synchronize()
        print(f"first call in a new process, variant in the disk cache: "
              f"{time.perf_counter() - t0:.3f} s")

    # Host overhead of a cached call.
    q = cupy.asarray(np.random.default_rng(0).standard_normal((1, 1, 16, 64)).astype(np.float16))
    out = cupy.empty_like(q)
    cupyflash.attention(q, q, q)
    noop = cupy.RawKernel(r'extern "C" __global__ void noop(const float* x) {}', "noop")
    noop((1,), (32,), (q,))
    t_launch = host_time_us(lambda: noop((1,), (32,), (q,)))
    t_call = host_time_us(lambda: cupyflash.attention(q, q, q))
    t_out = host_time_us(lambda: cupyflash.attention(q, q, q, out=out))
    print(f"host time per call: bare kernel launch {t_launch:.1f} us; cupyflash.attention "
          f"{t_call:.1f} us (+{t_call - t_launch:.1f} us); with out= {t_out:.1f} us "
          f"(+{t_out - t_launch:.1f} us)")


if __name__ == "__main__":
    main()
