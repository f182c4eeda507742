"""The GPU cost of the attention variants, against plain attention in the same run.

Issue 6's bars, on an H100:
- a sliding window of 1k keys at s = 16k runs >= 10x faster than full attention;
- a (B, 1, 1, Lk) padding mask costs <= 15% over no mask.

Every line times one forward call of ``cupyflash.attention`` on fp16/bf16 (b, h, s, d)
inputs (FlashAttention's grid at 16k tokens: b = 16384 // s, h = 2048 // d) and prints the
time, the ratio to the plain call of the same shape (>1 = slower), and, for the windows,
the speed-up over full attention. FLOPs are not counted for the variants (a window does
less work by design); the plain lines give TFLOP/s as attention.py does. JSON records
go to benchmarks/results/variants_<gpu>.json.

    python benchmarks/variants.py [--s 16384] [--d 128] [--dtype float16,bfloat16]
"""

import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import cupyflash  # noqa: E402
from cupyflash import _measure  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from attention import _dtype, _random, make_timer  # noqa: E402


def cases(cupy, b, h, s, d, dtype):
    """(name, causal, options) of each variant timed, the plain calls first."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(s // 2, s + 1, size=b)
    lengths[0] = s  # at least one full row: the mask never shortens the longest sequence
    padding = cupy.asarray(np.arange(s) < lengths[:, None, None, None])  # (B, 1, 1, s)
    slopes = cupy.asarray(2.0 ** -np.arange(1, h + 1), dtype=np.float32)
    bias_row = cupy.asarray(rng.standard_normal((b, 1, 1, s)).astype(dtype))
    return [
        ("plain", False, {}),
        ("causal", True, {}),
        ("padding mask (B,1,1,s)", False, {"mask": padding}),
        ("padding mask, causal", True, {"mask": padding}),
        ("bias (B,1,1,s)", False, {"bias": bias_row}),
        ("alibi (H,)", True, {"alibi_slopes": slopes}),
        ("softcap 30", False, {"softcap": 30.0}),
        ("window (1024, 0)", False, {"window": (1024, 0)}),
        ("window (512, 512)", False, {"window": (512, 512)}),
        ("window (1024, 0) + causal", True, {"window": (1024, 0)}),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--s", default="16384", help="sequence lengths, comma-separated")
    parser.add_argument("--d", default="128", help="head dims, comma-separated")
    parser.add_argument("--dtype", default="float16,bfloat16")
    parser.add_argument("--out", default=None, help="JSON path (default: results/)")
    args = parser.parse_args(argv)

    import cupy
    timer, how = make_timer()
    gpu = _measure.gpu_name()
    print(f"GPU: {gpu}; timer: {how}")
    records = []
    for dtype_name in args.dtype.split(","):
        dtype = _dtype(dtype_name)
        for d in map(int, args.d.split(",")):
            for s in map(int, args.s.split(",")):
                b, h = max(1, 16384 // s), max(1, 2048 // d)
                q, k, v = (_random(cupy, (b, h, s, d), dtype) for _ in range(3))
                base = {}
                print(f"\n{dtype_name} d={d} s={s} b={b} h={h}")
                print(f"{'variant':28s} {'ms':>9s} {'vs plain':>9s} {'TFLOP/s':>8s}")
                for name, causal, options in cases(cupy, b, h, s, d, dtype):
                    def run():
                        cupyflash.attention(q, k, v, causal=causal, **options)
                    ms = timer(run)
                    ref = base.get(causal)
                    if not options:
                        base[causal] = ms
                    flops = _measure.attention_flops(b, h, s, d, causal=causal)
                    tflops = flops / ms / 1e9 if not options else float("nan")
                    ratio = ms / ref if ref else 1.0
                    extra = ""
                    if "window" in options:
                        extra = f"  {base[False] / ms:6.1f}x faster than full attention"
                    print(f"{name:28s} {ms:9.3f} {ratio:9.3f} {tflops:8.1f}{extra}")
                    records.append(dict(gpu=gpu, provider="cupyflash", op="fwd",
                                        variant=name, dtype=dtype_name, d=d, causal=causal,
                                        s=s, b=b, h=h, ms=ms, vs_plain=ratio))
                del q, k, v
    path = pathlib.Path(args.out) if args.out else (
        pathlib.Path(__file__).parent / "results" / f"variants_{gpu.replace(' ', '_')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
