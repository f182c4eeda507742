"""The NumPy backend on the CPU: time against the float64 reference, and peak memory at
long sequences.

    python benchmarks/numpy_backend.py            # about 3 minutes on 2 cores, ~11 GiB peak
    python benchmarks/numpy_backend.py --quick    # seconds: small sizes, to try the script

1. Time at s = 2048, d = 64, b = 1, h = 4, float32 inputs: cupyflash's NumPy backend,
   the float64 reference (:mod:`cupyflash.reference`, the full score matrix in float64)
   and standard attention in float32 (:func:`cupyflash._measure.standard_attention`,
   one in-place score matrix), causal and not.
2. Peak extra memory (tracemalloc; bytes allocated beyond the inputs and the returned
   output) at s = 16384 and 65536, b = h = 1: cupyflash at both;
   the reference and standard attention at 16384 only. At 65536 one float64 score matrix
   is 65536^2 * 8 B = 32 GiB (float32: 16 GiB), more than this 24 GiB machine holds
   beside the reference's temporaries; cupyflash needs the output and one block of
   scores. Sampled query rows of the 65536 result are checked against the reference.

Writes ``benchmarks/results/numpy_cpu.json``. FLOPs: 4 * b * h * s^2 * d, halved when
causal (FlashAttention's convention).
"""

import argparse
import datetime
import json
import os
import pathlib
import sys
import time

import numpy as np

# Measure the checkout this script lives in, installed or not.
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cupyflash  # noqa: E402
from cupyflash import _measure, reference  # noqa: E402

D = 64


def _inputs(b, h, s, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((b, h, s, D), dtype=np.float32) for _ in range(3)]


PROVIDERS = {
    # provider: (compute dtype, function of (q, k, v, causal))
    "cupyflash-numpy": ("float32", lambda q, k, v, c: cupyflash.attention(q, k, v, causal=c)),
    "reference-float64": ("float64", lambda q, k, v, c: reference.attention(q, k, v, causal=c)),
    "standard-numpy": ("float32",
                       lambda q, k, v, c: _measure.standard_attention(q, k, v, causal=c)),
}


def measure(provider, b, h, s, causal, *, repeats, warmup, memory):
    """One record: median time of ``repeats`` runs and, if ``memory``, the peak extra
    bytes of one more run under tracemalloc (kept apart from the timed runs, whose
    small allocations tracemalloc would slow)."""
    dtype, fn = PROVIDERS[provider]
    q, k, v = _inputs(b, h, s)
    ms = _measure.time_ms(lambda: fn(q, k, v, causal), np, repeats=repeats, warmup=warmup)
    peak = None
    if memory:
        with _measure.peak_memory(np) as mem:
            out = fn(q, k, v, causal)
        peak = max(mem.peak - out.nbytes, 0)  # beyond the output, as benchmarks/attention.py
        del out
    flops = _measure.attention_flops(b, h, s, D, causal)
    record = {"gpu": None, "provider": provider, "op": "fwd", "dtype": dtype,
              "d": D, "causal": causal, "s": s, "b": b, "h": h, "ms": round(ms, 3),
              "tflops": round(flops / (ms * 1e-3) / 1e12, 5), "peak_extra_bytes": peak}
    mem_text = "-" if peak is None else _measure.format_bytes(peak)
    print(f"{provider:>18} {dtype:>8} causal={str(causal):5} s={s:>6} b={b} h={h}  "
          f"{ms:>10.1f} ms  {record['tflops'] * 1e3:7.2f} GFLOP/s  peak extra {mem_text:>10}"
          f"  (median of {repeats})", flush=True)
    return record


def check_sampled_rows(s, n_rows=16):
    """Max error of cupyflash at length s on a few query rows, against the float64
    reference for those rows (non-causal: a row's output depends only on its own query)."""
    q, k, v = _inputs(1, 1, s)
    out = cupyflash.attention(q, k, v)
    rows = np.linspace(0, s - 1, n_rows).astype(int)
    ref = reference.attention(q[..., rows, :], k, v)
    return rows.tolist(), float(np.max(np.abs(out[..., rows, :] - ref)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (s = 512, 2048, 4096) to try the script")
    parser.add_argument("--out", type=pathlib.Path,
                        help="JSON file to write (default benchmarks/results/numpy_cpu.json; "
                             "none with --quick)")
    args = parser.parse_args(argv)
    if args.out is None and not args.quick:
        args.out = ROOT / "benchmarks" / "results" / "numpy_cpu.json"
    s_time, s_mid, s_long = (512, 2048, 4096) if args.quick else (2048, 16384, 65536)

    info = _measure.machine_info(np)
    info["loadavg_at_start"] = list(os.getloadavg())  # other processes skew CPU timings
    print(f"cupyflash {info['cupyflash']}, NumPy {info['numpy']} ({info['blas']}), "
          f"Python {info['python']}\nCPU: {info['cpu']}, {info['cpu_count']} cores")
    records = []
    t_start = time.perf_counter()

    print(f"\n-- time at s = {s_time}, d = {D}, b = 1, h = 4 (float32 inputs)")
    for causal in (False, True):
        records.append(measure("cupyflash-numpy", 1, 4, s_time, causal, repeats=11, warmup=1,
                               memory=True))
        records.append(measure("standard-numpy", 1, 4, s_time, causal, repeats=11, warmup=1,
                               memory=True))
        records.append(measure("reference-float64", 1, 4, s_time, causal, repeats=5, warmup=1,
                               memory=True))

    print(f"\n-- peak extra memory at s = {s_mid} and {s_long}, b = h = 1")
    records.append(measure("cupyflash-numpy", 1, 1, s_mid, False, repeats=3, warmup=0,
                           memory=True))
    records.append(measure("standard-numpy", 1, 1, s_mid, False, repeats=3, warmup=0,
                           memory=True))
    records.append(measure("reference-float64", 1, 1, s_mid, False, repeats=1, warmup=0,
                           memory=True))
    records.append(measure("cupyflash-numpy", 1, 1, s_long, False, repeats=1, warmup=0,
                           memory=True))
    rows, err = check_sampled_rows(s_long)
    print(f"s = {s_long}: max |cupyflash - reference| over {len(rows)} sampled query rows: "
          f"{err:.2e}")

    ratios = {}
    for causal in (False, True):
        by = {r["provider"]: r["ms"] for r in records if r["s"] == s_time and r["causal"] == causal}
        ratios[f"causal={causal}"] = {
            f"{anchor}_ms_over_cupyflash_ms": round(by[provider] / by["cupyflash-numpy"], 3)
            for anchor, provider in (("reference", "reference-float64"),
                                     ("standard", "standard-numpy"))}
    print(f"\nratios at s = {s_time} (time of the anchor / time of cupyflash): {ratios}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    info["loadavg_at_end"] = list(os.getloadavg())
    print(f"load average (1, 5, 15 min): at start {info['loadavg_at_start']}, "
          f"at end {info['loadavg_at_end']}")

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/numpy_backend.py" + (" --quick" if args.quick else ""),
        "machine": info,
        "flop_convention": "4*b*h*s^2*d, halved when causal; tflops = that / time",
        "method": ("ms: median of repeated runs (perf_counter) after one warm-up at the "
                   "timing length: 11 for cupyflash and standard, 5 for the reference; at "
                   "the long lengths, no warm-up, 3 runs at the middle length, 1 for the "
                   "reference and at the longest; peak_extra_bytes: tracemalloc peak above "
                   "the level before the call, less the bytes of the output it returns, "
                   "from one separate untimed run"),
        "anchors": {
            "reference-float64": "cupyflash.reference.attention: float64, full score matrix",
            "standard-numpy": "matmul, in-place safe softmax, matmul in float32 "
                              "(cupyflash._measure.standard_attention)"},
        "not_run": {f"reference-float64 and standard-numpy at s={s_long}":
                    f"one score matrix is {s_long}^2 * 8 B = "
                    f"{_measure.format_bytes(s_long ** 2 * 8)} in float64 "
                    f"({_measure.format_bytes(s_long ** 2 * 4)} in float32); "
                    "the machine has 24 GiB"},
        "ratios": ratios,
        "checks": {f"s={s_long} sampled rows": {"rows": rows, "max_abs_err_vs_reference": err}},
        "records": records,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
