"""How the timer moves the numbers: do_bench against back-to-back calls (a lab tool,
session 13; benchmarks/NOTES.md "Session 13").

For bf16 attention at s = 16k (b = 1, h = 2048 // d), d = 128 and 64: plain, causal and
the 1k window, cupyflash and torch SDPA's cuDNN backend, each timed

- ``do_bench``: triton.testing.do_bench, median (what attention.py and variants.py use,
  as ANCHORS.md did): one call at a time, L2 cleared before each;
- ``queue``: decode.py's QueueTimer, calls enqueued back to back behind a spinning kernel;

and, for cupyflash, do_bench of two controls: ``prepared``, the very kernel launch that
``cupyflash.attention`` makes, with its arguments built once (about 10 us of host time
instead of 100-200), and ``prepared+150us``, the same after 150 us of busy host work. If
the host's time per call slowed the kernel under do_bench (the GPU idling between calls),
``prepared`` would be faster than the public call. Two rounds.

    python3 benchmarks/timers.py      # on the GPU, torch and triton present
"""

import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import cupyflash  # noqa: E402
from cupyflash import _kernels  # noqa: E402
from attention import _dtype, _random  # noqa: E402
from decode import QueueTimer  # noqa: E402


def prepared_launch(q, k, v, options):
    """A function that repeats the kernel launch ``cupyflash.attention(q, k, v,
    **options)`` makes (one launch: the plain, causal and window problems here), with the
    arguments of one call."""
    seen = []
    load = _kernels.get_function

    class Recording:
        def __init__(self, kernel):
            self.kernel, self.ptr = kernel, kernel.ptr

        def __call__(self, grid, block, args, **kw):
            seen.append((self.kernel, grid, block, args, kw))
            return self.kernel(grid, block, args, **kw)

    _kernels.get_function = lambda *a, **kw: Recording(load(*a, **kw))
    try:
        cupyflash.attention(q, k, v, **options)
    finally:
        _kernels.get_function = load
    assert len(seen) == 1, f"expected one launch, saw {len(seen)}"
    kernel, grid, block, args, kw = seen[0]
    return lambda: kernel(grid, block, args, **kw)


def busy_host(us):
    t0 = time.perf_counter()
    while (time.perf_counter() - t0) * 1e6 < us:
        pass


def main():
    import cupy
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    def bench(fn):
        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    queue = QueueTimer(cupy, 30, 5)
    dt = _dtype("bfloat16")
    print(f"GPU: {torch.cuda.get_device_name()}; ms per call")
    for d in (128, 64):
        s, b, h = 16384, 1, 2048 // d
        q, k, v = (_random(cupy, (b, h, s, d), dt) for _ in range(3))
        tq, tk, tv = (torch.from_dlpack(x.view(np.uint16)).view(torch.bfloat16)
                      for x in (q, k, v))
        for name, options in (("plain", {}), ("causal", {"causal": True}),
                              ("window (1024, 0)", {"window": (1024, 0)})):
            api = lambda: cupyflash.attention(q, k, v, **options)  # noqa: E731
            launch = prepared_launch(q, k, v, options)
            causal = options.get("causal", False)

            def cudnn():
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
            for r in range(2):
                ours = bench(api)
                line = (f"d={d:3d} {name:17s} r{r}: cupyflash do_bench {ours:.4f} "
                        f"queue {queue([api], ours):.4f} | prepared {bench(launch):.4f} "
                        f"prepared+150us {bench(lambda: (busy_host(150), launch())):.4f}")
                if "window" not in name:
                    theirs = bench(cudnn)
                    line += f" | cudnn do_bench {theirs:.4f} queue {queue([cudnn], theirs):.4f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
