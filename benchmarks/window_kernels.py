"""Sliding windows on the Hopper forward: the local kernel against the variants kernel (a
lab tool, session 7; benchmarks/NOTES.md "Sliding windows on the plain kernel").

Times the three window lines of benchmarks/variants.py at s = 16k (b = 1, h = 2048 // d)
and full attention, in rounds of rotated order, three ways:
- ``local``: flash_fwd_wgmma_local with WGMMA_LOCAL_TILES (what attention runs);
- ``variants``: flash_fwd_wgmma_variants (what ran before; band_only patched off);
- ``local2c``: the local kernel with (128, 2, 3) tiles at d = 64 (two consumers).

    python benchmarks/window_kernels.py
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import cupyflash  # noqa: E402
from cupyflash import _cupy_backend as cb  # noqa: E402
from attention import _dtype, _random, make_timer  # noqa: E402

WINDOWS = (("window (1024, 0)", False, (1024, 0)),
           ("window (512, 512)", False, (512, 512)),
           ("window (1024, 0) + causal", True, (1024, 0)))
MODES = ("local", "variants", "local2c")


def select(mode, band_only=cb.band_only, d64_tiles=cb.WGMMA_LOCAL_TILES[64]):
    cb.WGMMA_LOCAL_TILES[64] = (128, 2, 3) if mode == "local2c" else d64_tiles
    cb.band_only = (lambda *a, **k: False) if mode == "variants" else band_only
    cb._attention_config.cache_clear()


def main():
    import cupy
    timer, how = make_timer()
    print("timer:", how)
    for dtype_name in ("bfloat16", "float16"):
        dtype = _dtype(dtype_name)
        for d in (64, 128):
            s, b, h = 16384, 1, 2048 // d
            q, k, v = (_random(cupy, (b, h, s, d), dtype) for _ in range(3))
            print(f"\n{dtype_name} d={d} s={s}")
            for rnd in range(3):
                full = timer(lambda: cupyflash.attention(q, k, v))
                print(f"  round {rnd} full {full:.3f} ms")
                for mode in MODES[rnd:] + MODES[:rnd]:
                    if mode == "local2c" and d != 64:
                        continue
                    select(mode)
                    for name, causal, window in WINDOWS:
                        ms = timer(lambda: cupyflash.attention(q, k, v, causal=causal,
                                                               window=window))
                        print(f"  round {rnd} {mode:10s} {name:28s} {ms:8.3f} ms  "
                              f"{full / ms:5.1f}x")
                select("local")


if __name__ == "__main__":
    main()
