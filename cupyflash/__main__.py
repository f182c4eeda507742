"""``python -m cupyflash``: check cupyflash against the reference, then compare it with
standard attention on the best backend present.

1. Self-check: :func:`cupyflash.attention` (grouped-query shapes, Lq != Lk, causal and
   not) against the float64 :func:`cupyflash.reference.attention`. The error budget
   follows the tests: ``err(cupyflash) <= 2 * err(naive) + floor``, where *naive* is
   standard attention computed in the same dtype. Prints PASS or FAIL; exit status 1 on
   FAIL.
2. A table: standard attention (matmul, safe softmax, matmul, in the same array module
   and dtype) against cupyflash, time (median) and peak extra memory at a few lengths.

The backend is CuPy if CuPy imports, sees a CUDA device and its kernels run; otherwise
NumPy, and the reason is printed. ``--backend`` forces one.
"""

import argparse
import os
import sys

import numpy as np

import cupyflash
from cupyflash import _measure, reference

# Error floor per dtype: about the rounding of one output element.
FLOOR = {"float64": 1e-12, "float32": 1e-6, "float16": 1e-3, "bfloat16": 1e-2}

# Defaults per backend: (lengths, batch, heads, dtype, repeats, warmup).
# The NumPy ones keep the whole run well under a minute on 2 CPU cores.
DEFAULTS = {
    "numpy": ((512, 1024, 2048), 1, 4, "float32", 5, 1),
    "cupy": ((1024, 4096, 16384), 1, 16, "float16", 10, 3),
}


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes  # cupyflash's bfloat16 is ml_dtypes.bfloat16, on NumPy and CuPy
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _random(xp, shape, dtype, rng):
    # Drawn on the host so that NumPy and CuPy runs see the same numbers.
    return xp.asarray(rng.standard_normal(shape).astype(dtype))


def _max_err(x, ref):
    """max |x - ref| over entries where ref is finite; inf if their -inf entries differ."""
    x = _measure.to_host(x).astype(np.float64)
    finite = np.isfinite(ref)
    if not np.array_equal(np.isneginf(x), np.isneginf(ref)):
        return np.inf
    return float(np.max(np.abs(x[finite] - ref[finite]), initial=0.0))


def self_check(xp, dtype):
    """Print one line per case; return True if every case is within its budget."""
    rng = np.random.default_rng(0)
    q_shape, kv_shape = (2, 2, 2, 97, 64), (2, 2, 1, 131, 64)  # (B, Hkv, G, L, D): GQA
    q, k, v = (_random(xp, s, dtype, rng) for s in (q_shape, kv_shape, kv_shape))
    floor = FLOOR[dtype.name]
    print(f"self-check against cupyflash.reference (float64), {dtype.name}, "
          f"q {q_shape}, k and v {kv_shape}:")
    ok = True
    for causal in (False, True):
        out, lse = cupyflash.attention(q, k, v, causal=causal, return_lse=True)
        ref_out, ref_lse = reference.attention(q, k, v, causal=causal, return_lse=True)
        naive_out, naive_lse = _measure.standard_attention(q, k, v, causal=causal,
                                                            return_lse=True)
        errors, case_ok = [], True
        for name, got, naive, ref in (("out", out, naive_out, ref_out),
                                      ("lse", lse, naive_lse, ref_lse)):
            err, budget = _max_err(got, ref), 2 * _max_err(naive, ref) + floor
            case_ok &= err <= budget
            errors.append(f"max |{name} - ref| {err:.2e} (budget {budget:.2e})")
        print(f"  causal={str(causal):5}  " + "  ".join(errors)
              + f"  {'PASS' if case_ok else 'FAIL'}")
        ok &= case_ok
    return ok


def _gpu_or_reason(requested):
    """``(cupy, None)`` if the GPU path is usable, else ``(None, reason)``."""
    if requested == "numpy":
        return None, "--backend numpy"
    cupy, what = _measure.find_gpu()
    if cupy is None:
        return None, what
    cc = int(cupy.cuda.Device().compute_capability)
    if cc < 80:
        return None, (f"{what}: compute capability {cc // 10}.{cc % 10}; cupyflash's "
                      f"kernels need 8.0 or newer")
    return cupy, what


def compare(xp, dtype, lengths, b, h, d, causal, repeats, warmup):
    """Print the standard-attention vs cupyflash table."""
    rng = np.random.default_rng(1)
    oom = (MemoryError,) if xp is np else (MemoryError, xp.cuda.memory.OutOfMemoryError)
    print(f"\nstandard attention (q k^T, safe softmax, p v, one (L, L) matrix per head) "
          f"vs cupyflash.attention\n{dtype.name}, batch {b}, heads {h}, head dim {d}, "
          f"causal={causal}; time: median of {repeats} runs after {warmup} warm-up; "
          f"peak extra: memory allocated during the call beyond its output")
    header = (f"{'L':>7} {'standard ms':>12} {'cupyflash ms':>13} {'speed-up':>9} "
              f"{'standard peak extra':>20} {'cupyflash peak extra':>21}")
    print(header)
    print("-" * len(header))
    for s in lengths:
        q, k, v = (_random(xp, (b, h, s, d), dtype, rng) for _ in range(3))
        row = {}
        for name, fn in (("standard", lambda: _measure.standard_attention(q, k, v, causal=causal)),
                         ("cupyflash", lambda: cupyflash.attention(q, k, v, causal=causal))):
            try:
                with _measure.peak_memory(xp) as mem:
                    out = fn()
                extra = max(mem.peak - out.nbytes, 0)  # beyond the output
                del out
                row[name] = (_measure.time_ms(fn, xp, repeats=repeats, warmup=warmup), extra)
            except oom:
                row[name] = None
            if xp is not np:
                xp.get_default_memory_pool().free_all_blocks()
        std, fl = row["standard"], row["cupyflash"]
        cell = lambda r, i, f: "out of memory" if r is None else f(r[i])  # noqa: E731
        speedup = f"{std[0] / fl[0]:.2f}x" if std and fl else "-"
        print(f"{s:>7} {cell(std, 0, lambda t: f'{t:.1f}'):>12} "
              f"{cell(fl, 0, lambda t: f'{t:.1f}'):>13} {speedup:>9} "
              f"{cell(std, 1, _measure.format_bytes):>20} "
              f"{cell(fl, 1, _measure.format_bytes):>21}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cupyflash",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("auto", "numpy", "cupy"), default="auto",
                        help="auto: CuPy if a GPU is usable, else NumPy (default)")
    parser.add_argument("--lengths", type=lambda t: [int(x) for x in t.split(",")],
                        help="comma-separated sequence lengths of the table "
                             "(default 512,1024,2048 on NumPy, 1024,4096,16384 on CuPy)")
    parser.add_argument("--batch", type=int, help="default 1")
    parser.add_argument("--heads", type=int, help="default 4 on NumPy, 16 on CuPy")
    parser.add_argument("--head-dim", type=int, default=64, help="of the table (default 64)")
    parser.add_argument("--dtype", choices=tuple(FLOOR),
                        help="default float32 on NumPy, float16 on CuPy")
    parser.add_argument("--causal", action="store_true", help="causal table")
    parser.add_argument("--repeats", type=int, help="timed runs per cell")
    parser.add_argument("--check-only", action="store_true", help="self-check, no table")
    args = parser.parse_args(argv)

    print(f"cupyflash {cupyflash.__version__}, NumPy {np.__version__}, "
          f"CPU: {_measure.cpu_name()} ({os.cpu_count()} cores)")
    cupy, what = _gpu_or_reason(args.backend)
    if cupy is None and args.backend == "cupy":
        print(f"error: --backend cupy: {what}", file=sys.stderr)
        return 1

    xp = np
    if cupy is not None:
        print(f"backend: CuPy on {what}")
        dtype = _dtype(args.dtype or DEFAULTS["cupy"][3])
        try:
            ok = self_check(cupy, dtype)
            xp = cupy
        except NotImplementedError as e:  # kernels not written yet for this case
            if args.backend == "cupy":
                raise
            print(f"the CuPy kernels are not available: {e}\n"
                  f"falling back to the NumPy backend")
    else:
        print(f"backend: NumPy ({what})")
    name = "numpy" if xp is np else "cupy"
    lengths, b, h, dtype_name, repeats, warmup = DEFAULTS[name]
    dtype = _dtype(args.dtype or dtype_name)
    if xp is np:
        ok = self_check(np, dtype)
    print("PASS" if ok else "FAIL")
    if not ok:
        return 1
    if not args.check_only:
        compare(xp, dtype, args.lengths or lengths, args.batch or b, args.heads or h,
                args.head_dim, args.causal, args.repeats or repeats, warmup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
