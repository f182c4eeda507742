"""First-light check of the Hopper forward kernel: errors that say which part is wrong.

For one head dim, runs small problems through the wgmma kernel (and the mma.sync kernel
beside it) and prints the largest error against the float64 reference, the NaN count,
and where the errors sit. Four probes isolate the kernel's parts:

  random     q, k, v ~ N(0, 1): the whole kernel.
  uniform    q = 0, so S = 0 and P = 1 / Lk: O is the mean of V's rows. Wrong here means
             the P V product (V's descriptor, its transposed read) or the O write.
  one-hot    Lk = Dv and v = identity: O = P itself. Wrong here, right in "uniform",
             means S = Q K^T (Q's or K's descriptor), the mask or the softmax.
  ones       v = 1: O = 1 in every row that sees a key, whatever P is: the normalisation
             (l_i, the lse) and the row bookkeeping, apart from both products' layouts.

Errors are also summarised by 8-row group and 8-column (16-byte) chunk: a layout mistake
(a wrong swizzle, stride or fragment order) shows up as whole groups or chunks in error.

    CUPYFLASH_FWD_KERNEL is set here; run as  python benchmarks/wgmma_debug.py --d 128
"""

import argparse
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import cupyflash  # noqa: E402
from cupyflash import reference  # noqa: E402


def run(kernel, q, k, v, causal):
    import cupy
    os.environ["CUPYFLASH_FWD_KERNEL"] = kernel
    gq, gk, gv = (cupy.asarray(x) for x in (q, k, v))
    out = cupy.full(gq.shape[:-1] + (gv.shape[-1],), np.nan, dtype=q.dtype)
    start = time.perf_counter()
    cupyflash.attention(gq, gk, gv, causal=causal, out=out)
    _, lse = cupyflash.attention(gq, gk, gv, causal=causal, return_lse=True)
    cupy.cuda.get_current_stream().synchronize()
    return out.get().astype(np.float64), lse.get().astype(np.float64), time.perf_counter() - start


def where(err, tol):
    """Rows (8-row groups) and columns (8-column chunks) whose error exceeds tol."""
    bad = err > tol
    if not bad.any():
        return "none"
    rows = np.nonzero(bad.any(axis=-1).reshape(-1, bad.shape[-2]).any(axis=0))[0]
    cols = np.nonzero(bad.reshape(-1, bad.shape[-1]).any(axis=0))[0]
    groups = sorted(set(int(r) // 8 for r in rows))
    chunks = sorted(set(int(c) // 8 for c in cols))
    frac = bad.mean()
    return (f"{frac:.1%} of entries; 8-row groups {groups[:12]}{'...' if len(groups) > 12 else ''}"
            f" of {-(-bad.shape[-2] // 8)}; 8-col chunks {chunks[:16]}"
            f"{'...' if len(chunks) > 16 else ''} of {-(-bad.shape[-1] // 8)}")


def probe(name, q, k, v, causal, tol):
    ref_out, ref_lse = reference.attention(q.astype(np.float64), k.astype(np.float64),
                                           v.astype(np.float64), causal=causal, return_lse=True)
    for kernel in ("wgmma", "mma"):
        try:
            out, lse, seconds = run(kernel, q, k, v, causal)
        except Exception as e:  # a launch error is an answer too
            print(f"  {name:8s} {kernel:5s} {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        err = np.abs(out - ref_out)
        nan = int(np.isnan(out).sum())
        err = np.where(np.isnan(err), np.inf, err)
        lse_err = np.abs(np.where(np.isneginf(ref_lse) & np.isneginf(lse), 0.0, lse - ref_lse))
        print(f"  {name:8s} {kernel:5s} max|out err| {err.max():.3g}  NaN {nan}  "
              f"max|lse err| {np.nanmax(lse_err):.3g}  ({seconds * 1e3:.0f} ms)", flush=True)
        if kernel == "wgmma":
            print(f"           bad (> {tol:g}): {where(err, tol)}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--dtype", default="float16")
    args = ap.parse_args()
    import cupy
    import ml_dtypes  # noqa: F401
    dtype = np.dtype(ml_dtypes.bfloat16) if args.dtype == "bfloat16" else np.dtype(args.dtype)
    dev = cupy.cuda.Device()
    print(f"{cupy.cuda.runtime.getDeviceProperties(dev.id)['name'].decode()} cc "
          f"{dev.compute_capability}; d = {args.d}, {args.dtype}", flush=True)
    rng = np.random.default_rng(0)
    d = args.d
    tol = 0.02 if args.dtype == "float16" else 0.1

    def draw(*shape):
        return rng.standard_normal(shape).astype(dtype)

    for causal in (False, True):
        print(f"causal = {causal}", flush=True)
        lq, lk = 300, 333  # misses every tile size
        probe("random", draw(1, 2, lq, d), draw(1, 2, lk, d), draw(1, 2, lk, d), causal, tol)
        probe("uniform", np.zeros((1, 2, lq, d), dtype), draw(1, 2, lk, d), draw(1, 2, lk, d),
              causal, tol)
        probe("one-hot", draw(1, 2, lq, d), draw(1, 2, d, d),
              np.broadcast_to(np.eye(d, dtype=dtype), (1, 2, d, d)).copy(), causal, tol)
        probe("ones", draw(1, 2, lq, d), draw(1, 2, lk, d), np.ones((1, 2, lk, d), dtype),
              causal, tol)
        probe("long", draw(1, 1, 2048, d), draw(1, 1, 2048, d), draw(1, 1, 2048, d), causal, tol)


if __name__ == "__main__":
    main()
