"""Where the GPU backward's time goes: each launch of one ``attention_backward`` call timed
on its own with CUDA events (median of 20 after 3 warm-ups).

    python benchmarks/backward_parts.py [--d 64 128] [--s 4096] [--dtype float16]

It wraps ``_kernels.get_function`` and CuPy's allocations so that every kernel launch of
the call (preprocess, main, dQ, the conversions, CuPy's zero-fill and copies) is recorded
between events, then prints the median milliseconds per part and their sum next to the
whole call's time.
"""

import argparse
import collections
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import cupyflash  # noqa: E402
from cupyflash import _cupy_backward, _kernels, _measure  # noqa: E402


def main():
    import cupy
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--s", type=int, nargs="*", default=[4096])
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--causal", type=int, nargs="*", default=[0, 1])
    args = ap.parse_args()
    dt = np.dtype(args.dtype)
    real_get = _kernels.get_function
    times = collections.defaultdict(list)

    def timed_get(device_id, source, name, *a, **kw):
        fn = real_get(device_id, source, name, *a, **kw)
        label = name.split("<")[0].replace("cupyflash::", "")

        def launch(*la, **lkw):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            fn(*la, **lkw)
            end.record()
            times[label].append((start, end))
        return launch

    _cupy_backward._kernels = type("K", (), {"get_function": staticmethod(timed_get),
                                             "arch_for": staticmethod(_kernels.arch_for)})
    for d in args.d:
        for causal in map(bool, args.causal):
            for s in args.s:
                b, h = 16384 // s, 2048 // d
                q, k, v, do = (cupy.random.standard_normal((b, h, s, d), dtype=np.float32)
                               .astype(dt) for _ in range(4))
                out, lse = cupyflash.attention(q, k, v, causal=causal, return_lse=True)
                for det in (False, True):
                    whole = _measure.time_ms(
                        lambda: cupyflash.attention_backward(do, q, k, v, out, lse,
                                                             causal=causal, deterministic=det),
                        cupy, repeats=20, warmup=3)
                    times.clear()
                    for _ in range(23):
                        cupyflash.attention_backward(do, q, k, v, out, lse, causal=causal,
                                                     deterministic=det)
                    cupy.cuda.get_current_stream().synchronize()
                    parts = {lab: float(np.median([cupy.cuda.get_elapsed_time(a, e)
                                                   for a, e in ev[3:]]))
                             for lab, ev in times.items()}
                    flops = _measure.attention_flops(b, h, s, d, causal) * 2.5
                    print(f"d={d} s={s} causal={causal} det={det}: whole {whole:.3f} ms "
                          f"({flops / whole / 1e9:.0f} TFLOP/s); "
                          + ", ".join(f"{lab} {ms:.3f}" for lab, ms in parts.items())
                          + f"; kernels sum {sum(parts.values()):.3f} ms", flush=True)


if __name__ == "__main__":
    main()
