"""Render benchmark records (benchmarks/results/attention_*.json) as markdown tables.

    python benchmarks/table.py benchmarks/results/attention_NVIDIA_H200.json

One table per dtype: rows (d, causal), columns s; each cell is cupyflash's TFLOP/s and,
in parentheses, its ratio to torch SDPA's flash backend measured in the same run.
"""

import collections
import json
import sys


def main(path):
    records = json.load(open(path))
    by = collections.defaultdict(dict)
    for r in records:
        by[(r["dtype"], r["d"], r["causal"], r["s"])][r["provider"]] = r
    dtypes = sorted({k[0] for k in by})
    ss = sorted({k[3] for k in by})
    gpu = records[0]["gpu"]
    for dt in dtypes:
        print(f"\n{gpu}, {dt}, forward: cupyflash TFLOP/s (x torch SDPA flash, x cuDNN)\n")
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
    main(sys.argv[1])
