"""The accuracy rule: how far from the truth a result may be.

The truth is :mod:`cupyflash.reference` (float64, full score matrix), evaluated on the
*same* inputs the backend saw, that is, after rounding to the dtype under test. The error
budget is set by a naive computation in that dtype, as in FlashAttention's own tests::

    max|got - truth| <= 2 * max|naive - truth| + floor

For float64 inputs a float64 truth is no truth: it rounds at the same 2^-53 as the result
it judges, and the naive computation, which sums ``P @ V`` in the reference's own order,
shares its rounding errors, so ``max|naive - ref|`` would hide them. There the reference's
formulas are evaluated in long double (:data:`WIDE`: a 64-bit significand on x86-64)
where the platform has one wider than float64 (:func:`true_attention`,
:func:`true_softmax_family`; ``test_reference.py`` checks that they agree with
:mod:`cupyflash.reference`).

Naive attention in a dtype ``T`` (:func:`naive_attention`), for float16, bfloat16 and
float32 (``acc`` = float32); for float64 every step is float64 and no rounding to ``T``
happens beyond float64's own:

1. ``qs = round_T(q * scale)``                  scale the queries, in T
2. ``S  = round_T(qs @ k^T)``                   products accumulated in acc, rounded to T
3. ``S  = -inf`` where the causal mask hides a key
4. ``P  = round_T(exp(S - m) / l)``             safe softmax in acc: m = row max, l = row sum
5. ``O  = round_T(P @ v)``                      products accumulated in acc, rounded to T

``lse`` is returned in acc (float32, or float64 for float64), so its naive counterpart
keeps everything in acc: ``logsumexp_acc((q * scale) @ k^T)`` from the rounded inputs.

The floor covers results that the naive path gets exactly right by luck while a tiled
algorithm does a few more roundings (the final rounding of the output to T, the running
rescale ``exp(m_old - m_new)``, the division by ``l_i``): :data:`FLOOR_ULPS` unit
roundoffs of the result's dtype, times the result's natural magnitude (``max(1, max|v|)``
for attention outputs, ``max(1, max|lse|)`` for lse; see the ``*_floor`` functions).

One more term covers the rounding of the scores themselves. Any implementation computes
``S = q k^T * scale`` in the accumulator dtype, with an error of a few units of
``u_acc * |scale| * sum_d |q_d k_d|``, and in its own order. The naive computation shows
one sample of that error; when one or two keys carry the weight of a row (few keys, or
logits of 1e3 and more), another order can be several times unluckier, with no bug at
all. So each row also gets the first-order effect of perturbing every score by
``eps_i = FLOOR_ULPS * u_acc * |scale| * |q_i| max_j |k_j|`` (:func:`score_rounding_slack`):
``4 eps_i max|v|`` for out and ``eps_i`` for lse. It is negligible against real bugs (a
mask off by one, a missed rescale), which move weights by factors, not by ulps.

Special values are never inside a tolerance: NaN, +inf and -inf must sit exactly where
the truth has them, so a NaN passes only where the truth is NaN.
"""

import math

import ml_dtypes
import numpy as np

from cupyflash import reference

DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}

# Unit roundoff u = 2^-p of each dtype (p = significand bits, implicit bit included):
# round-to-nearest puts any real x within u * |x| of a representable number.
UNIT_ROUNDOFF = {
    "float16": 2.0 ** -11,
    "bfloat16": 2.0 ** -8,
    "float32": 2.0 ** -24,
    "float64": 2.0 ** -53,
}

# The floor, in unit roundoffs of the result's dtype: one rounding of the result to its
# dtype plus the few extra roundings of the tiled algorithm (rescale, division).
FLOOR_ULPS = 4


def accumulator_dtype(dtype):
    """float32 for the half types and float32, float64 for float64 (as the backends)."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def unit_roundoff(dtype):
    return UNIT_ROUNDOFF[np.dtype(dtype).name]


def gamma(n, u):
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of any n-term sum
    of non-negative numbers (and of n products), in any summation order."""
    return n * u / (1 - n * u)


def _finite_abs_max(x):
    x = np.asarray(x, dtype=np.float64)
    finite = x[np.isfinite(x)]
    return float(np.abs(finite).max()) if finite.size else 0.0


def out_floor(dtype, v):
    """Floor for an attention output of dtype ``dtype`` made from values ``v``."""
    return FLOOR_ULPS * unit_roundoff(dtype) * max(1.0, _finite_abs_max(v))


def lse_floor(dtype, ref_lse):
    """Floor for an lse (computed in the accumulator dtype of inputs of ``dtype``)."""
    return FLOOR_ULPS * unit_roundoff(accumulator_dtype(dtype)) * max(1.0, _finite_abs_max(ref_lse))


def value_floor(dtype, magnitude):
    """Floor for a softmax-family result of ``dtype`` with natural size ``magnitude``."""
    return FLOOR_ULPS * unit_roundoff(dtype) * max(1.0, magnitude)


# ----------------------------------------------------------------------------------------
# the truth
# ----------------------------------------------------------------------------------------

# The wide type for float64 inputs: long double where it is wider than float64 (x86-64:
# 64-bit significand, u = 2^-64), else float64 itself.
WIDE = (np.dtype(np.longdouble)
        if np.finfo(np.longdouble).nmant > np.finfo(np.float64).nmant else np.dtype(np.float64))


def _wide(dtype):
    return np.dtype(dtype) == np.float64 and WIDE != np.float64


def _shift_and_log_sum(x, axis):
    """As in cupyflash.reference, in x's own dtype: ``(m, log(sum(exp(x - m))))``, keepdims,
    with m = 0 where the maximum is not finite."""
    m = np.max(x, axis=axis, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0).astype(x.dtype)
    with np.errstate(divide="ignore", over="ignore"):
        return m, np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def _wide_log_softmax(x, axis):
    m, log_l = _shift_and_log_sum(x, axis)
    with np.errstate(invalid="ignore", over="ignore"):
        return (x - m) - np.where(np.isneginf(log_l), 0, log_l).astype(x.dtype)


def true_softmax_family(x, axis, kind):
    """``cupyflash.reference.<kind>(x, axis)``; for float64 x the same formulas in WIDE."""
    if not _wide(x.dtype):
        return np.asarray(getattr(reference, kind)(x, axis=axis), dtype=np.float64)
    xw = x.astype(WIDE)
    axes = tuple(range(x.ndim)) if axis is None else axis
    if kind == "logsumexp":
        m, log_l = _shift_and_log_sum(xw, axes)
        return np.asarray(np.squeeze(log_l + m, axis=axes))
    r = _wide_log_softmax(xw, axes)
    return np.exp(r) if kind == "softmax" else r


def true_attention(q, k, v, *, causal=False, scale=None):
    """``cupyflash.reference.attention(..., return_lse=True)``; for float64 inputs the
    same formulas in WIDE: ``S = q k^T * scale``, masked, ``P = exp(log_softmax(S))``,
    ``out = P v``."""
    if not _wide(q.dtype):
        return reference.attention(q, k, v, causal=causal, scale=scale, return_lse=True)
    q, k, v = q.astype(WIDE), k.astype(WIDE), v.astype(WIDE)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * WIDE.type(scale)
    if causal:
        s = np.where(reference.causal_mask(q.shape[-2], k.shape[-2]), s, -np.inf).astype(WIDE)
    m, log_l = _shift_and_log_sum(s, -1)
    out = np.matmul(np.exp(_wide_log_softmax(s, -1)), v)
    lse = np.squeeze(log_l + m, axis=-1)
    return out, np.broadcast_to(lse, out.shape[:-1])


# ----------------------------------------------------------------------------------------
# naive same-dtype computations
# ----------------------------------------------------------------------------------------

def naive_attention(q, k, v, *, causal=False, scale=None):
    """Full-matrix attention in the inputs' dtype (steps 1-5 of the module docstring).

    Returns ``(out, lse)``: out in the inputs' dtype, lse in the accumulator dtype.
    """
    dtype = q.dtype
    acc = accumulator_dtype(dtype).type
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    k_t = np.swapaxes(k.astype(acc), -1, -2)
    with np.errstate(invalid="ignore", over="ignore"):
        # 1. qs = round_T(q * scale)
        qs = (q.astype(acc) * acc(scale)).astype(dtype)
        # 2. S = round_T(qs @ k^T), accumulated in acc
        s = np.matmul(qs.astype(acc), k_t).astype(dtype).astype(acc)
        # lse: like S, but nothing rounded to T
        s_lse = np.matmul(q.astype(acc) * acc(scale), k_t)
    if causal:
        # 3. hide the keys the causal mask hides
        keep = reference.causal_mask(q.shape[-2], k.shape[-2])
        s = np.where(keep, s, -np.inf).astype(acc)
        s_lse = np.where(keep, s_lse, -np.inf).astype(acc)
    # 4. P = round_T(exp(S - m) / l): a row of only -inf gets P = 0
    m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    with np.errstate(invalid="ignore", over="ignore"):
        p_tilde = np.exp(s - np.where(np.isfinite(m), m, 0).astype(acc))
        l = np.sum(p_tilde, axis=-1, keepdims=True)
        p = (p_tilde / np.where(l == 0, 1, l).astype(acc)).astype(dtype)
        # 5. O = round_T(P @ v), accumulated in acc
        out = np.matmul(p.astype(acc), v.astype(acc)).astype(dtype)
    m_lse, log_l = _shift_and_log_sum(s_lse, -1)
    lse = np.squeeze(m_lse + log_l, axis=-1)
    return out, np.broadcast_to(lse, out.shape[:-1])  # v may add batch dimensions


def naive_softmax_family(x, axis, kind):
    """softmax, log_softmax or logsumexp of ``x`` computed in the accumulator dtype from
    the rounded input, the result rounded to x's dtype:

    * softmax:     ``exp(x - m) / l``        (``l = sum(exp(x - m))``, ``m`` the max)
    * log_softmax: ``(x - m) - log(l)``
    * logsumexp:   ``m + log(l)``

    ``axis`` is an int, a tuple of ints or None, as in the public functions.
    """
    dtype = x.dtype
    xa = x.astype(accumulator_dtype(dtype))
    axes = tuple(range(x.ndim)) if axis is None else axis
    m_raw = np.max(xa, axis=axes, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m_raw), m_raw, 0).astype(xa.dtype)  # all -inf: exp(-inf) = 0
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        p_tilde = np.exp(xa - m)
        l = np.sum(p_tilde, axis=axes, keepdims=True)
        if kind == "logsumexp":
            r = np.squeeze(m + np.log(l), axis=axes)
        elif kind == "softmax":
            # a slice with +inf: exp(x - inf), NaN at the +inf entries, 0 elsewhere
            r = np.where(np.isposinf(m_raw), np.exp(xa - m_raw),
                         p_tilde / np.where(l == 0, 1, l).astype(xa.dtype))
        else:
            r = (xa - m) - np.where(l == 0, 0, np.log(l)).astype(xa.dtype)
        return np.asarray(r).astype(dtype)


# ----------------------------------------------------------------------------------------
# the rule
# ----------------------------------------------------------------------------------------

def assert_special_values_match(name, got, ref):
    """NaN, +inf and -inf of ``got`` exactly where ``ref`` has them."""
    got = np.asarray(got, dtype=np.float64)
    for what, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        differ = test(got) != test(ref)
        if differ.any():
            where = tuple(int(i) for i in np.argwhere(differ)[0])
            raise AssertionError(
                f"{name}: {int(differ.sum())} positions disagree with the truth about "
                f"{what}; first at {where}: got {got[where]!r}, truth {ref[where]!r}")


def assert_within_budget(name, got, ref, naive, floor, slack=0.0):
    """``|got - ref| <= 2 * max|naive - ref| + floor + slack`` at each of the truth's finite
    positions (``slack``: zero, or an array that broadcasts to ``ref``), after checking
    that special values match exactly."""
    assert got.shape == ref.shape, f"{name}: shape {got.shape}, truth {ref.shape}"
    assert_special_values_match(name, got, ref)
    finite = np.isfinite(ref)
    if not finite.any():
        return
    wide = np.result_type(ref.dtype, np.float64)  # float64, or WIDE for a WIDE truth
    got = np.asarray(got).astype(wide)
    naive = np.asarray(naive).astype(wide)
    if not np.isfinite(naive[finite]).all():
        raise AssertionError(f"{name}: the naive same-dtype computation overflowed where the "
                             f"truth is finite; the test drew inputs outside the dtype's "
                             f"range (a bug in the test)")
    with np.errstate(invalid="ignore"):  # inf - inf at the (already matched) specials
        diff = np.where(finite, np.abs(got - ref), 0)
        naive_err = float(np.where(finite, np.abs(naive - ref), 0).max())
    bound = 2 * naive_err + floor + np.broadcast_to(slack, ref.shape)
    excess = np.where(finite, diff - bound, 0)
    if excess.max() > 0:
        where = tuple(int(i) for i in np.unravel_index(np.argmax(excess), excess.shape))
        raise AssertionError(
            f"{name}: |got - truth| = {float(diff[where]):.3e} at {where} exceeds "
            f"2 * max|naive - truth| + floor + slack = 2 * {naive_err:.3e} + {floor:.3e} + "
            f"{float(bound[where]) - 2 * naive_err - floor:.3e}; got {got[where]!r}, "
            f"truth {ref[where]!r}, naive {naive[where]!r} (max|got - truth| = "
            f"{float(diff.max()):.3e})")


def score_rounding_slack(q, k, v, *, scale):
    """``(out_slack, lse_slack)``, per query row: the effect on out and lse of an error of
    at most ``eps_i`` in every score of row i (see the module docstring).

    Scores perturbed by ``|delta_j| <= eps`` change each weight by a factor within
    ``exp(+-2 eps)``, so out moves by at most ``2 eps * (max_j v_j - min_j v_j)
    <= 4 eps max|v|`` (to first order) and lse by at most ``eps``. Here
    ``eps_i = FLOOR_ULPS * u_acc * |scale| * |q_i| * max_j |k_j|`` (Euclidean norms, over
    the keys with a finite score), which bounds ``sum_d |q_id k_jd|`` by Cauchy-Schwarz.
    """
    u = unit_roundoff(accumulator_dtype(q.dtype))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q_norm = np.linalg.norm(q.astype(np.float64), axis=-1)              # (..., Lq)
    k_norm = np.linalg.norm(k.astype(np.float64), axis=-1)              # (..., Lk)
    k_norm = np.where(np.isfinite(k_norm), k_norm, 0.0).max(axis=-1, initial=0.0)
    eps = FLOOR_ULPS * u * abs(scale) * q_norm * k_norm[..., None]
    eps = np.where(np.isfinite(eps), eps, 0.0)  # NaN rows are checked as special values
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    eps = np.broadcast_to(eps, batch + (q.shape[-2],))
    out_slack = 4 * eps[..., None] * _finite_abs_max(v)
    return out_slack, eps


def check_attention(out, lse, q, k, v, *, causal, scale, ref_out=None, ref_lse=None):
    """Assert that ``out`` and ``lse`` computed from the (rounded, NumPy) inputs q, k, v
    meet the accuracy rule, with the documented dtypes and shapes.

    ``ref_out`` / ``ref_lse`` replace the truth of ``(q, k, v)`` by one that must be
    mathematically equal (for invariance tests: the truth of the untransformed problem,
    from :func:`true_attention`).
    """
    dtype = q.dtype
    r_out, r_lse = true_attention(q, k, v, causal=causal, scale=scale)
    ref_out = r_out if ref_out is None else ref_out
    ref_lse = r_lse if ref_lse is None else ref_lse
    naive_out, naive_lse = naive_attention(q, k, v, causal=causal, scale=scale)
    assert out.dtype == dtype, f"out has dtype {out.dtype}, expected {dtype}"
    assert lse.dtype == accumulator_dtype(dtype), \
        f"lse has dtype {lse.dtype}, expected {accumulator_dtype(dtype)}"
    out_slack, lse_slack = score_rounding_slack(q, k, v, scale=scale)
    assert_within_budget("out", out, ref_out, naive_out, out_floor(dtype, v), out_slack)
    assert_within_budget("lse", lse, ref_lse, naive_lse, lse_floor(dtype, ref_lse), lse_slack)
    # A row that sees no key is exactly zero (documented), not merely small.
    empty = np.isneginf(np.asarray(ref_lse))
    assert np.all(np.asarray(out, dtype=np.float64)[empty] == 0), \
        "a row that sees no key must be exactly zero"


def check_softmax_family(got, x, axis, kind):
    """Assert the accuracy rule for ``kind`` in (softmax, log_softmax, logsumexp) of x."""
    ref = true_softmax_family(x, axis, kind)
    # A true result beyond the dtype's range rounds to +-inf (log_softmax of -3e38 in
    # float32): that infinity is the correctly rounded answer.
    with np.errstate(over="ignore"):
        rounded = ref.astype(x.dtype).astype(ref.dtype)
    ref = np.where(np.isfinite(ref) & np.isinf(rounded), rounded, ref)
    naive = naive_softmax_family(x, axis, kind)
    assert got.dtype == x.dtype, f"{kind}: dtype {got.dtype}, expected {x.dtype}"
    # softmax lies in [0, 1]; log_softmax and logsumexp results are as large as they are
    magnitude = 1.0 if kind == "softmax" else _finite_abs_max(ref)
    assert_within_budget(kind, got, ref, naive, value_floor(x.dtype, magnitude))
