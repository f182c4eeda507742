"""softmax / log_softmax / logsumexp on the GPU against a device-to-device copy.

Rows of 1k, 4k, 32k and 256k float32 elements, 1 GiB in all. Bandwidth counts the bytes
that must move: softmax and log_softmax read the input once and write the output once
(2 x 1 GiB); logsumexp reads the input once (the output is tiny). The ceiling is a
device-to-device copy of the same 1 GiB (read + write), measured in the same run, as are
torch.softmax and cupyx.scipy.special.softmax when they import.

    python benchmarks/softmax.py
"""

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import cupyflash  # noqa: E402
from cupyflash import _measure  # noqa: E402


def main():
    import cupy
    from triton.testing import do_bench

    def bench(fn):
        return do_bench(fn, warmup=25, rep=200, return_mode="median")

    total = 1 << 28  # float32 elements: 1 GiB
    x = cupy.random.standard_normal(total, dtype=np.float32)
    y = cupy.empty_like(x)
    t_copy = bench(lambda: y.__setitem__(Ellipsis, x))  # a kernel copy, read + write
    copy_gbs = 2 * x.nbytes / t_copy / 1e6
    print(f"GPU: {_measure.gpu_name()}; device-to-device copy of 1 GiB: {copy_gbs:.0f} GB/s "
          f"(read + write)")
    others = {}
    try:
        import torch
        others["torch.softmax"] = lambda a: torch.softmax(a, dim=-1)
    except Exception:
        torch = None
    try:
        import cupyx.scipy.special as special
        others["cupyx softmax"] = lambda a: special.softmax(a, axis=-1)
    except Exception:
        special = None
    print(f"{'row':>7s} | {'softmax':>16s} {'log_softmax':>16s} {'logsumexp':>16s} | "
          + " ".join(f"{k:>16s}" for k in others))
    for n in (1024, 4096, 32768, 262144):
        a = x.reshape(-1, n)
        cells = []
        for fn, rw in ((cupyflash.softmax, 2), (cupyflash.log_softmax, 2),
                       (cupyflash.logsumexp, 1)):
            t = bench(lambda: fn(a))
            gbs = rw * a.nbytes / t / 1e6
            cells.append(f"{gbs:6.0f} ({gbs / copy_gbs:4.2f})")
        other_cells = []
        for name, f in others.items():
            arg = torch.as_tensor(a, device="cuda") if name.startswith("torch") else a
            t = bench(lambda: f(arg))
            gbs = 2 * a.nbytes / t / 1e6
            other_cells.append(f"{gbs:6.0f} ({gbs / copy_gbs:4.2f})")
        print(f"{n:7d} | " + " ".join(f"{c:>16s}" for c in cells) + " | "
              + " ".join(f"{c:>16s}" for c in other_cells), flush=True)
    print("GB/s (fraction of the copy); softmax and log_softmax count read + write, "
          "logsumexp the read")


if __name__ == "__main__":
    main()
