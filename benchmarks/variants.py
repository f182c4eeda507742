"""The GPU cost of the attention variants, against plain attention in the same run.

Issue 6's bars, on an H100:
- a sliding window of 1k keys at s = 16k runs >= 10x faster than full attention;
- a (B, 1, 1, Lk) padding mask costs <= 15% over no mask.

Every line times one forward call of ``cupyflash.attention`` (``--op bwd``: one call of
``cupyflash.attention_backward``, FLOPs 2.5x the forward's) on fp16/bf16 (b, h, s, d)
inputs (FlashAttention's grid at 16k tokens: b = 16384 // s, h = 2048 // d) and prints the
time, the ratio to the plain call of the same shape (>1 = slower), and, for the windows,
the speed-up over full attention. FLOPs are not counted for the variants (a window does
less work by design); the plain lines give TFLOP/s as attention.py does. JSON records
go to benchmarks/results/variants_<gpu>.json.

    python benchmarks/variants.py [--s 16384] [--d 128] [--dtype float16,bfloat16]
                                  [--op fwd,bwd] [--rounds 2]
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
        ("dropout 0.1", False, {"dropout_p": 0.1, "seed": 1}),
        ("dropout 0.1, causal", True, {"dropout_p": 0.1, "seed": 1}),
        ("window (1024, 0)", False, {"window": (1024, 0)}),
        ("window (512, 512)", False, {"window": (512, 512)}),
        ("window (1024, 0) + causal", True, {"window": (1024, 0)}),
    ]


def _call(op, q, k, v, dout, causal, options):
    """The call timed: the forward, or the backward given the forward's out and lse
    (computed once here, with the same options: dropout regenerates its mask)."""
    if op == "fwd":
        return lambda: cupyflash.attention(q, k, v, causal=causal, **options)
    if op != "bwd":
        raise SystemExit(f"--op: fwd or bwd, got {op!r}")
    out, lse = cupyflash.attention(q, k, v, causal=causal, return_lse=True, **options)
    return lambda: cupyflash.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                                **options)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--s", default="16384", help="sequence lengths, comma-separated")
    parser.add_argument("--d", default="128", help="head dims, comma-separated")
    parser.add_argument("--dtype", default="float16,bfloat16")
    parser.add_argument("--op", default="fwd", help="fwd, bwd or fwd,bwd: the forward "
                        "call, or attention_backward given the forward's out and lse")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every line this many times, all lines once per round")
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
                q, k, v, dout = (_random(cupy, (b, h, s, d), dtype) for _ in range(4))
                for op in args.op.split(","):
                    base = {}
                    print(f"\n{op} {dtype_name} d={d} s={s} b={b} h={h}")
                    print(f"{'variant':28s} {'ms':>9s} {'vs plain':>9s} {'TFLOP/s':>8s}")
                    # Rounds go over every line in turn, so that round r's ratios compare
                    # calls timed minutes apart at most (the 700 W cap moves the clocks:
                    # NOTES.md, session 7), not the first lines' rounds with the last ones'.
                    runs = [(name, causal, options, _call(op, q, k, v, dout, causal, options))
                            for name, causal, options in cases(cupy, b, h, s, d, dtype)]
                    for r in range(args.rounds):  # round r's ratios to plain's round r
                        for name, causal, options, run in runs:
                            ms = timer(run)
                            if not options:
                                base[causal, r] = ms
                            ratio = ms / base[causal, r]
                            flops = _measure.attention_flops(b, h, s, d, causal=causal)
                            flops *= 2.5 if op == "bwd" else 1.0  # FlashAttention's count
                            tflops = flops / ms / 1e9 if not options else float("nan")
                            extra = ""
                            if "window" in options:
                                extra = f"  {base[False, r] / ms:6.1f}x faster than full attention"
                            print(f"{name:28s} {ms:9.3f} {ratio:9.3f} {tflops:8.1f}{extra}",
                                  flush=True)
                            records.append(dict(gpu=gpu, provider="cupyflash", op=op,
                                                variant=name, dtype=dtype_name, d=d,
                                                causal=causal, s=s, b=b, h=h, ms=ms,
                                                vs_plain=ratio, round=r))
                    del runs
                del q, k, v, dout
    path = pathlib.Path(args.out) if args.out else (
        pathlib.Path(__file__).parent / "results" / f"variants_{gpu.replace(' ', '_')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
