"""What a key block costs the Hopper forward, and what a window's band edges add (a lab
tool, session 13; benchmarks/NOTES.md "Session 13").

bf16, b = 1, h = 2048 // d, Lq = 16k queries: against Lk = 128 n keys for n = 1 .. 128
(no mask; every query block visits n key blocks of 128), and against Lq = Lk = 16k with
sliding windows, whose query blocks visit about (left + right + BLOCK_M) / 128 key blocks,
some of them masked at the band's edges. Printed per "tile round" (the time over the
tiles per SM), so that the slope is the cost of one key block and the intercept a tile's
fixed cost. Times are decode.py's QueueTimer (calls back to back), median of 5 queues.

    python3 benchmarks/window_tiles.py     # on the GPU
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import cupyflash  # noqa: E402
from cupyflash import _cupy_backend  # noqa: E402
from attention import _dtype, _random  # noqa: E402
from decode import QueueTimer  # noqa: E402


def main():
    import cupy
    timer = QueueTimer(cupy, 30, 5)
    dt = _dtype("bfloat16")
    sms = _cupy_backend.num_sms(cupy.cuda.Device().id)
    for d in (64, 128):
        h, s = 2048 // d, 16384
        q, k, v = (_random(cupy, (1, h, s, d), dt) for _ in range(3))
        block_m = _cupy_backend._wgmma_config(d, d, "bfloat16", False, local=True).block_m
        rounds = -(-s // block_m) * h / sms
        print(f"\nd = {d}: BLOCK_M {block_m}, {rounds:.2f} tiles per SM; us, us per tile round")
        for n in (1, 2, 5, 10, 11, 20, 40, 128):
            kn, vn = k[:, :, :128 * n], v[:, :, :128 * n]
            ms = timer([lambda: cupyflash.attention(q, kn, vn)], 0.3)
            print(f"  Lk = {128 * n:6d} ({n:3d} key blocks) {ms * 1e3:9.1f} {ms * 1e3 / rounds:8.2f}",
                  flush=True)
        for window in ((1024, 0), (512, 512), (1024 - block_m, 0)):
            ms = timer([lambda: cupyflash.attention(q, k, v, window=window)], 0.3)
            print(f"  window {str(window):12s}           {ms * 1e3:9.1f} {ms * 1e3 / rounds:8.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
