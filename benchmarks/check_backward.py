"""Spot check of the GPU backward against a float64 NumPy gradient, kernel by kernel.

For each case it prints the largest error of dq, dk, dv relative to the largest
magnitude of the float64 truth (absolute where that magnitude is below 1), for the atomic and the deterministic dQ, and whether
two deterministic runs agree bit for bit. A quick look before the property suite;
``tests/test_backward.py`` holds the real accuracy rule.

    python benchmarks/check_backward.py
"""

import itertools
import math
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cupyflash import _api, _cupy_backward  # noqa: E402


def grads64(q, k, v, dout, causal, scale):
    q, k, v, dout = (x.astype(np.float64) for x in (q, k, v, dout))
    s = q @ np.swapaxes(k, -1, -2) * scale
    Lq, Lk = s.shape[-2:]
    if causal:
        keep = np.arange(Lk)[None, :] <= np.arange(Lq)[:, None] + (Lk - Lq)
        s = np.where(keep, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.exp(s - m)
    l = e.sum(-1, keepdims=True)
    p = e / np.where(l == 0, 1, l)
    o = p @ v
    dp = dout @ np.swapaxes(v, -1, -2)
    delta = (dout * o).sum(-1, keepdims=True)
    ds = p * (dp - delta)
    dq = ds @ k * scale
    dk = np.swapaxes(ds, -1, -2) @ q * scale
    dv = np.swapaxes(p, -1, -2) @ dout
    return dq, dk, dv


def sum_to(x, shape):
    lead = x.ndim - len(shape)
    x = x.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True)


def main():
    import cupy
    import ml_dtypes
    rng = np.random.default_rng(0)
    worst = 0.0
    cases = list(itertools.product(
        ("float16", "bfloat16"), (64, 128, 40, 96, 256, 200, 8),
        ((128, 128), (200, 333), (333, 200), (1, 70), (64, 1)), (False, True)))
    for dtype_name, D, (Lq, Lk), causal in cases:
        dt = np.dtype(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else np.dtype(dtype_name)
        B, H, G = 2, 2, 2
        q = rng.standard_normal((B, H, G, Lq, D)).astype(dt)
        k = rng.standard_normal((B, H, 1, Lk, D)).astype(dt)   # grouped-query: broadcast
        v = rng.standard_normal((B, H, 1, Lk, D)).astype(dt)
        dout = rng.standard_normal((B, H, G, Lq, D)).astype(dt)
        scale = 1 / math.sqrt(D)
        tq, tk, tv, tdo = (cupy.asarray(x) for x in (q, k, v, dout))
        prob = _api.validate_attention("check", tq, tk, tv, causal, None)
        from cupyflash import _cupy_backend
        out, lse = _cupy_backend.attention_forward(tq, tk, tv, prob)
        ref = grads64(q, k, v, dout.astype(np.float64), causal, scale)
        ref = [sum_to(r, x.shape) for r, x in zip(ref, (q, k, v))]
        line = f"{dtype_name:8s} D={D:3d} Lq={Lq:4d} Lk={Lk:4d} causal={causal!s:5s}"
        det_runs = []
        for det in (False, True, True):
            g = _cupy_backward.attention_backward(tdo, tq, tk, tv, out, lse, prob, det)
            g = [x.get().astype(np.float64) for x in g]
            # relative to the truth's largest magnitude, or absolute where that is below 1
            # (Lk = 1: dS = P (dP - delta) is exactly 0, so dq and dk vanish)
            errs = [np.abs(a - r).max() / max(np.abs(r).max(), 1.0) for a, r in zip(g, ref)]
            nan = any(np.isnan(a).any() for a in g)
            if det:
                det_runs.append(g)
            worst = max(worst, *errs)
            if det_runs and len(det_runs) == 1 or not det:
                line += f" | {'det' if det else 'atm'} " + " ".join(f"{e:.1e}" for e in errs)
                line += " NaN!" if nan else ""
        same = all(np.array_equal(a, b, equal_nan=True) for a, b in zip(*det_runs))
        print(line + f" | det bitwise {'ok' if same else 'DIFFER'}", flush=True)
    print(f"worst relative error {worst:.2e}")


if __name__ == "__main__":
    main()
