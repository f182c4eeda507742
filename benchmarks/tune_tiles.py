"""Time the tensor-core forward kernel under several tile shapes (a lab tool).

mma.sync (default): each candidate ``BLOCK_M,BLOCK_N,NUM_WARPS[,KV_BUFFERS,MIN_BLOCKS]``
is selected through the ``CUPYFLASH_MMA_TILES`` knob of cupyflash/_cupy_backend.py.
``--kernel wgmma`` (sm_90): each candidate is ``BLOCK_N,NUM_CONSUMERS,STAGES``, set into
``_cupy_backend.WGMMA_TILES`` for the run. Timed on FlashAttention's grid (16k tokens,
model dim 2048) with triton's do_bench (median). The winners go into ``MMA_TILES`` or
``WGMMA_TILES``; the table goes into benchmarks/NOTES.md.

    python benchmarks/tune_tiles.py --d 64 --tiles 128,64,4 128,128,4 64,64,4
    python benchmarks/tune_tiles.py --kernel wgmma --d 128 --tiles 128,2,2 128,2,3
"""

import argparse
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import cupyflash  # noqa: E402
from cupyflash import _measure  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, required=True)
    ap.add_argument("--tiles", nargs="+", required=True, help="BLOCK_M,BLOCK_N,NUM_WARPS")
    ap.add_argument("--s", type=int, nargs="*", default=[1024, 4096, 16384])
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--kernel", choices=("mma", "wgmma"), default="mma")
    args = ap.parse_args()
    from cupyflash import _cupy_backend
    os.environ["CUPYFLASH_FWD_KERNEL"] = args.kernel

    import cupy
    from triton.testing import do_bench
    dt = np.dtype(args.dtype) if args.dtype != "bfloat16" else np.dtype(__import__("ml_dtypes").bfloat16)
    rng = np.random.default_rng(0)
    print(f"GPU: {_measure.gpu_name()}; d={args.d} {args.dtype}; TFLOP/s (do_bench median)")
    print(f"{'tiles':>14s} " + " ".join(f"{f'{s}/{c}':>9s}" for c in ("F", "C") for s in args.s))
    for tiles in args.tiles:
        if args.kernel == "wgmma":
            _cupy_backend.WGMMA_TILES[args.d] = tuple(int(x) for x in tiles.split(","))
            _cupy_backend._attention_config.cache_clear()
        else:
            os.environ["CUPYFLASH_MMA_TILES"] = f"{args.d}:{tiles}"
        row = []
        for causal in (False, True):
            for s in args.s:
                b, h = 16384 // s, 2048 // args.d
                q, k, v = (cupy.asarray(rng.standard_normal((b, h, s, args.d), dtype=np.float32)
                                        .astype(dt)) for _ in range(3))
                ms = do_bench(lambda: cupyflash.attention(q, k, v, causal=causal),
                              warmup=25, rep=100, return_mode="median")
                row.append(_measure.attention_flops(b, h, s, args.d, causal) / ms / 1e9)
        print(f"{tiles:>14s} " + " ".join(f"{x:9.1f}" for x in row), flush=True)


if __name__ == "__main__":
    main()
