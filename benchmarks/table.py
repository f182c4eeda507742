"""Render benchmark records (benchmarks/results/attention_*.json) as markdown tables.

    python benchmarks/table.py benchmarks/results/attention_NVIDIA_H100_80GB_HBM3.json [op]

One table per dtype for one op (fwd, bwd or fwdbwd; default fwd): rows (d, causal),
columns s; each cell is cupyflash's TFLOP/s and, in parentheses, its ratios to torch SDPA's
flash and cuDNN backends measured in the same run.
"""

import collections
import json
import sys


def main(path, op="fwd"):
    records = [r for r in json.load(open(path)) if r.get("op", "fwd") == op]
    # Ratios pair records of one run: per cell, the last run that measured cupyflash and
    # both torch backends (else the last that measured cupyflash).
    runs = collections.defaultdict(lambda: collections.defaultdict(dict))
    for r in records:
        runs[(r["dtype"], r["d"], r["causal"], r["s"])][r.get("run")][r["provider"]] = r
    by = {}
    for key, per_run in runs.items():
        with_cf = [run for run, prov in per_run.items() if "cupyflash" in prov]
        full = [run for run in with_cf if {"torch_flash", "torch_cudnn"} <= per_run[run].keys()]
        by[key] = per_run[(full or with_cf)[-1]] if with_cf else {}
    dtypes = sorted({k[0] for k in by})
    ss = sorted({k[3] for k in by})
    gpu = records[0]["gpu"]
    for dt in dtypes:
        print(f"\n{gpu}, {dt}, {op}: cupyflash TFLOP/s (x torch SDPA flash, x cuDNN)\n")
        print("| d | causal | " + " | ".join(f"s={s}" for s in ss) + " |")
        print("|---|---|" + "---|" * len(ss))
        for d in sorted({k[1] for k in by if k[0] == dt}):
            for causal in (False, True):
                cells = []
                for s in ss:
                    row = by.get((dt, d, causal, s), {})
                    cf = row.get("cupyflash")
                    if not cf:
                        cells.append("-")
                        continue
                    fl, cu = row.get("torch_flash"), row.get("torch_cudnn")
                    cells.append(f"{cf['tflops']:.0f} ({cf['tflops'] / fl['tflops']:.2f}, "
                                 f"{cf['tflops'] / cu['tflops']:.2f})" if fl and cu
                                 else f"{cf['tflops']:.0f}")
                print(f"| {d} | {causal} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
