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
   a. ``S = round_T(c * tanh(S / c))``          with ``softcap=c``, in acc
   b. ``S = round_T(S + alibi + bias)``         with ``alibi_slopes`` or ``bias``, in acc
      (``alibi_ij = -slope * |i + Lk - Lq - j|``; slopes and bias converted to acc)
3. ``S  = -inf`` where the causal mask, the window or ``mask`` hides a key
4. ``P  = round_T(exp(S - m) / l)``             safe softmax in acc: m = row max, l = row sum
5. ``O  = round_T(P @ v)``                      products accumulated in acc, rounded to T

``lse`` is returned in acc (float32, or float64 for float64), so its naive counterpart
keeps everything in acc: ``logsumexp_acc((q * scale) @ k^T)`` from the rounded inputs,
with steps 2a, 2b and 3 in acc and nothing rounded to T.

The variants (``bias``, ``mask``, ``window``, ``alibi_slopes``, ``softcap``) are keyword
options of :func:`true_attention`, :func:`naive_attention`, :func:`score_rounding_slack`
and :func:`check_attention`, with the meaning of :func:`cupyflash.attention`; the truth
applies them in the same order, in float64 (WIDE for float64 inputs).

So is dropout (``dropout_p`` with a ``seed``): the truth multiplies ``P`` by the keep mask
``Z`` of :func:`cupyflash.reference.dropout_mask` and by ``1 / (1 - dropout_p)`` (in WIDE
for float64 inputs), and the naive computation adds one step after step 4:

4a. ``W  = round_T(P * Z / (1 - dropout_p))``    in acc; step 5 is then ``O = round_T(W @ v)``

The weights of a row then sum to at most ``1 / (1 - dropout_p)`` instead of 1, and so
does an output's natural magnitude relative to ``max|v|``: the out floor and the score
slack below are multiplied by ``1 / (1 - dropout_p)``. lse is not changed by dropout.

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
With the variants, each score is also rounded once more at the size of what is added to
it and of the cap, so ``eps_i`` gains ``FLOOR_ULPS * u_acc * (max_j |bias_ij + alibi_ij|
+ softcap)`` (over the finite entries; ``c tanh(x / c)`` has slope at most 1, so the
scores' own rounding passes through the cap unamplified).

The backward pass (:func:`check_attention_backward`) follows the same rule, gradient by
gradient: ``max|got - truth| <= 2 * max|naive - truth| + floor + slack`` for each of dq,
dk, dv. The truth is :func:`cupyflash.reference.attention_backward` of the rounded
inputs (dout, q, k, v), and for float64 the same formulas in WIDE
(:func:`true_attention_backward`). The backend under test is given the forward's own
out and lse; the truth and the naive computation start again from q, k, v.

Naive backward in a dtype ``T`` (:func:`naive_attention_backward`): the standard
full-matrix backward of a framework's autograd, every matrix product accumulated in acc
and rounded to T, from the naive forward's own P and O (steps 1-5, both rounded to T):

6.  ``dV    = round_T(W^T @ dO)``                (W = P without dropout)
7.  ``dP    = round_T(dO @ v^T)``
7a. ``dP    = round_T(dP * Z / (1 - dropout_p))``  with dropout, in acc (dropout's own
    backward, as an autograd applies it)
8.  ``Delta = rowsum(dO * O)``                 kept in acc, like lse
9.  ``dS    = round_T(P * (dP - Delta))``      computed in acc
10. ``dQ    = round_T(dS @ k * scale)``
11. ``dK    = round_T(dS^T @ q * scale)``

(each summed over the broadcast dimensions in acc, before the rounding to T). With the
variants the naive forward applies them (steps 2a, 2b, 3); with ``softcap``, step 9 is
followed by ``dS0 = round_T(dS * (1 - T^2))`` (``T = tanh(S0 / softcap)`` of the naive
raw scores), which steps 10 and 11 use; ``dbias`` is dS summed to bias's shape in acc and
rounded to bias's dtype, judged like the other gradients.

Floor: every entry of a gradient is a sum of products, and a rounding error is relative
to the sum of the absolute values of its terms, not to the (possibly cancelled) result:
``dS = P * (dP - Delta)`` cancels by design (each row of dS sums to 0). So the floor is
:data:`FLOOR_ULPS` unit roundoffs of T times the largest such natural magnitude
(``|dS|_ij = P_ij (|dO_i| . |v_j| + |dO_i| . |O_i|)``, then ``|scale| |dS| |k|`` for dq,
``|scale| |dS|^T |q|`` for dk, ``P^T |dO|`` for dv). Unlike the forward's floor there is
no ``max(1, ...)``: a gradient of tiny values is held to a floor of its own size. With
dropout, ``dP`` and ``P`` in these are the dropped ``dP * Z / (1 - dropout_p)`` and the
weights ``W``, as in the formulas themselves.

Underflow: ``u`` bounds the relative error of a rounding only above the dtype's smallest
normal number (6.1e-5 for float16). Below it the spacing is fixed (2^-24 for float16), so
a rounding errs by up to half of it whatever the value: ``round_T(x) = x (1 + d) + e``
with ``|d| <= u``, ``|e| <= eta_T`` (Higham's model with gradual underflow;
:data:`UNDERFLOW_ETA`). Gradients of inputs with tiny dout (1e-3 and less in float16) pass
through that range: the kernels round dS (and P, for dV) to T as the operands of their
products, and round the gradient of each batch element to T before the sum over broadcast
dimensions (grouped-query attention). So each batch element's gradient also gets
``eta_T`` for its own rounding plus that of its operands, ``|scale| eta_T sum_j |k_j|``
for dq, ``|scale| eta_T sum_i |q_i|`` for dk and ``eta_T sum_i |dO_i|`` for dv, over the
pairs with ``P_ij > 0`` (elsewhere dS and P are exactly 0), and a broadcast gradient the
sum of those of its terms. The forward's out reaches the backward rounded to T too, and
``Delta_i = dO_i . O_i`` is taken from it: an entry of O below T's smallest normal number
errs by up to ``min(|O_ic|, eta_T)`` (a float16 out of 1e-21 is stored as 0), so Delta_i
by ``sum_c |dO_ic| min(|O_ic|, eta_T)`` over those entries, which reaches every
``dS_ij`` as ``P_ij`` times it (where it does not cancel: dbias sums dS over a row).
Beyond float16's subnormals these terms are below 1e-38, nothing.

Slack: the backward recomputes ``P_ij = exp(S_ij - lse_i)`` from its own S and the
forward's lse. Both carry the score rounding of the forward's slack (``eps_i``), and the
subtraction rounds at the magnitude of ``lse_i`` (about the largest score, or ``log Lk``
for tiny scores), where the naive ``exp(S - m) / l`` rounds only at ``S - m``. So each
``P_ij`` may be off by ``P_ij (2 eps_i + FLOOR_ULPS u_acc (1 + |lse_i| + |log P_ij|))``,
and Delta by the same perturbation of the weights seen through the forward's out; their
first-order effects, carried through ``dS`` to dq, dk, dv, are the slacks of
:func:`backward_floors_and_slacks`. Measured on 1,600 random cases of all four dtypes:
without the slack, dv of float32 and float64 inputs exceeded ``2 * naive + floor`` by up
to 177 times at logits of 50 and more (an error of ``u_acc |lse|`` relative to P), and
just exceeded it at tiny logits with many keys; with it, the largest error used 40% of
its budget. Like the forward's slack it stays far below the effect of real bugs (a
missing Delta, a mask off by one, a forgotten scale), which change gradients by factors.

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

# Half the spacing of each dtype's subnormal numbers: the absolute error a rounding may add
# below the smallest normal number, where u no longer bounds it (see "Underflow" above).
UNDERFLOW_ETA = {
    "float16": 2.0 ** -25,
    "bfloat16": 2.0 ** -134,
    "float32": 2.0 ** -150,
    "float64": 0.0,  # 2^-1075: below float64's range; the truth is WIDE there anyway
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


def _split_dropout(variants):
    """``(dropout_p, seed, other_variants)``: the dropout options taken out of ``variants``."""
    variants = dict(variants)
    return variants.pop("dropout_p", 0.0), variants.pop("seed", None), variants


def dropout_scale(q, k, v, dropout_p, seed, dtype):
    """``Z / (1 - dropout_p)`` in ``dtype`` for the broadcast batch of q, k, v: 0 where
    :func:`cupyflash.reference.dropout_mask` drops a score, ``1 / (1 - dropout_p)`` where
    it keeps it; None without dropout."""
    if not dropout_p:
        return None
    batch_shape = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    z = reference.dropout_mask(seed, dropout_p, batch_shape, q.shape[-2], k.shape[-2])
    t = np.dtype(dtype).type
    return z.astype(dtype) / (t(1) - t(dropout_p))


def _keep_mask(Lq, Lk, *, causal, mask=None, window=None):
    """The keys each query sees (causal & window & mask), or None where all are seen."""
    keep = None
    for part in (reference.causal_mask(Lq, Lk) if causal else None,
                 None if window is None else reference.window_mask(Lq, Lk, window),
                 None if mask is None else np.asarray(mask, dtype=bool)):
        if part is not None:
            keep = part if keep is None else keep & part
    return keep


def apply_variants(s, Lq, Lk, *, causal, bias=None, mask=None, window=None,
                   alibi_slopes=None, softcap=None, round_to=None):
    """Steps 2a, 2b and 3 on the scores ``s`` (..., Lq, Lk), computed in s's dtype; with
    ``round_to`` (the dtype T), each arithmetic step is rounded to T, as in the naive
    computation. Returns the new scores in s's dtype (batch dimensions of bias and mask
    broadcast in)."""
    t = s.dtype.type

    def rounded(x):
        return x.astype(round_to).astype(s.dtype) if round_to is not None else x

    with np.errstate(invalid="ignore", over="ignore"):
        if softcap is not None:
            s = rounded(t(softcap) * np.tanh(s / t(softcap)))
        added = None
        if alibi_slopes is not None:
            distance = np.abs(np.arange(Lq)[:, None] + (Lk - Lq) - np.arange(Lk)[None, :])
            slopes = np.asarray(alibi_slopes).astype(s.dtype)[..., None, None]
            added = -(slopes * distance.astype(s.dtype))
        if bias is not None:
            b = np.asarray(bias).astype(s.dtype)
            added = b if added is None else added + b
        if added is not None:
            s = rounded(s + added)
    keep = _keep_mask(Lq, Lk, causal=causal, mask=mask, window=window)
    if keep is not None:
        s = np.where(keep, s, -np.inf).astype(s.dtype)
    return s


def true_attention(q, k, v, *, causal=False, scale=None, **variants):
    """``cupyflash.reference.attention(..., return_lse=True)``; for float64 inputs the
    same formulas in WIDE: ``S = q k^T * scale``, the variants, masked,
    ``P = exp(log_softmax(S))`` (times ``Z / (1 - dropout_p)`` with dropout),
    ``out = P v``."""
    if not _wide(q.dtype):
        return reference.attention(q, k, v, causal=causal, scale=scale, return_lse=True,
                                   **variants)
    dropout_p, seed, variants = _split_dropout(variants)
    zr = dropout_scale(q, k, v, dropout_p, seed, WIDE)
    q, k, v = q.astype(WIDE), k.astype(WIDE), v.astype(WIDE)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * WIDE.type(scale)
    s = apply_variants(s, q.shape[-2], k.shape[-2], causal=causal, **variants)
    m, log_l = _shift_and_log_sum(s, -1)
    p = np.exp(_wide_log_softmax(s, -1))
    out = np.matmul(p if zr is None else p * zr, v)
    lse = np.squeeze(log_l + m, axis=-1)
    return out, np.broadcast_to(lse, out.shape[:-1])


# ----------------------------------------------------------------------------------------
# naive same-dtype computations
# ----------------------------------------------------------------------------------------

def naive_attention(q, k, v, *, causal=False, scale=None, **variants):
    """Full-matrix attention in the inputs' dtype (steps 1-5 of the module docstring).

    Returns ``(out, lse)``: out in the inputs' dtype, lse in the accumulator dtype.
    """
    _, _, out, lse, _ = _naive_forward(q, k, v, causal=causal, scale=scale, **variants)
    return out, lse


def _naive_forward(q, k, v, *, causal, scale, **variants):
    """Steps 1-5: ``(P, W, out, lse, ZR)``: P, the weights W (step 4a; W = P without
    dropout) and out in the inputs' dtype, lse in acc, and ``ZR = Z / (1 - dropout_p)``
    in acc (None without dropout)."""
    dtype = q.dtype
    acc = accumulator_dtype(dtype).type
    dropout_p, seed, variants = _split_dropout(variants)
    zr = dropout_scale(q, k, v, dropout_p, seed, accumulator_dtype(dtype))
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
    # 2a, 2b. softcap, alibi and bias; 3. hide the keys the causal mask, window, mask hide
    Lq, Lk = q.shape[-2], k.shape[-2]
    s = apply_variants(s, Lq, Lk, causal=causal, round_to=dtype, **variants)
    s_lse = apply_variants(s_lse, Lq, Lk, causal=causal, **variants)
    # 4. P = round_T(exp(S - m) / l): a row of only -inf gets P = 0
    m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    with np.errstate(invalid="ignore", over="ignore"):
        p_tilde = np.exp(s - np.where(np.isfinite(m), m, 0).astype(acc))
        l = np.sum(p_tilde, axis=-1, keepdims=True)
        p = (p_tilde / np.where(l == 0, 1, l).astype(acc)).astype(dtype)
        # 4a. dropout: W = round_T(P * Z / (1 - dropout_p)), in acc
        w = p if zr is None else (p.astype(acc) * zr).astype(dtype)
        # 5. O = round_T(W @ v), accumulated in acc
        out = np.matmul(w.astype(acc), v.astype(acc)).astype(dtype)
    m_lse, log_l = _shift_and_log_sum(s_lse, -1)
    lse = np.squeeze(m_lse + log_l, axis=-1)
    return p, w, out, np.broadcast_to(lse, out.shape[:-1]), zr  # v may add batch dims


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
        # in the truth's dtype: float() would flush a long double below float64's range
        # (a WIDE truth of 1e-359 against a float64 zero) to 0
        naive_err = np.where(finite, np.abs(naive - ref), 0).max()
    bound = 2 * naive_err + floor + np.broadcast_to(slack, ref.shape)
    excess = np.where(finite, diff - bound, 0)
    if excess.max() > 0:
        where = tuple(int(i) for i in np.unravel_index(np.argmax(excess), excess.shape))
        raise AssertionError(
            f"{name}: |got - truth| = {float(diff[where]):.3e} at {where} exceeds "
            f"2 * max|naive - truth| + floor + slack = 2 * {float(naive_err):.3e} + "
            f"{floor:.3e} + {float(bound[where] - 2 * naive_err - floor):.3e}; "
            f"got {got[where]!r}, truth {ref[where]!r}, naive {naive[where]!r} "
            f"(max|got - truth| = {float(diff.max()):.3e})")


def score_rounding_slack(q, k, v, *, scale, bias=None, mask=None, window=None,
                         alibi_slopes=None, softcap=None, dropout_p=0.0, seed=None):
    """``(out_slack, lse_slack)``, per query row: the effect on out and lse of an error of
    at most ``eps_i`` in every score of row i (see the module docstring).

    Scores perturbed by ``|delta_j| <= eps`` change each weight by a factor within
    ``exp(+-2 eps)``, so out moves by at most ``2 eps * (max_j v_j - min_j v_j)
    <= 4 eps max|v|`` (to first order) and lse by at most ``eps``. Here
    ``eps_i = FLOOR_ULPS * u_acc * |scale| * |q_i| * max_j |k_j|`` (Euclidean norms, over
    the keys with a finite score), which bounds ``sum_d |q_id k_jd|`` by Cauchy-Schwarz.
    With the variants, ``eps_i`` also gets ``FLOOR_ULPS * u_acc * (max_j |bias_ij| +
    max_j |alibi_ij| + softcap)`` (finite entries only). ``mask`` and ``window`` only
    hide keys: they add nothing. With dropout the weights are scaled by up to
    ``1 / (1 - dropout_p)``, and so is out's slack (``seed`` does not matter).
    """
    u = unit_roundoff(accumulator_dtype(q.dtype))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q_norm = np.linalg.norm(q.astype(np.float64), axis=-1)              # (..., Lq)
    k_norm = np.linalg.norm(k.astype(np.float64), axis=-1)              # (..., Lk)
    k_norm = np.where(np.isfinite(k_norm), k_norm, 0.0).max(axis=-1, initial=0.0)
    magnitude = abs(scale) * q_norm * k_norm[..., None]
    Lq, Lk = q.shape[-2], k.shape[-2]
    if bias is not None:
        b = np.abs(np.asarray(bias, dtype=np.float64))
        magnitude = magnitude + np.where(np.isfinite(b), b, 0.0).max(axis=-1, initial=0.0)
    if alibi_slopes is not None:
        a = np.abs(reference.alibi_bias(alibi_slopes, Lq, Lk))
        magnitude = magnitude + np.where(np.isfinite(a), a, 0.0).max(axis=-1, initial=0.0)
    if softcap is not None:
        magnitude = magnitude + softcap
    eps = FLOOR_ULPS * u * magnitude
    eps = np.where(np.isfinite(eps), eps, 0.0)  # NaN rows are checked as special values
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    eps = np.broadcast_to(eps, batch + (q.shape[-2],))
    out_slack = 4 * eps[..., None] * _finite_abs_max(v) / (1.0 - dropout_p)
    return out_slack, eps


def check_attention(out, lse, q, k, v, *, causal, scale, ref_out=None, ref_lse=None,
                    **variants):
    """Assert that ``out`` and ``lse`` computed from the (rounded, NumPy) inputs q, k, v
    (and the variants' NumPy arrays and options) meet the accuracy rule, with the
    documented dtypes and shapes.

    ``ref_out`` / ``ref_lse`` replace the truth of ``(q, k, v)`` by one that must be
    mathematically equal (for invariance tests: the truth of the untransformed problem,
    from :func:`true_attention`).
    """
    dtype = q.dtype
    r_out, r_lse = true_attention(q, k, v, causal=causal, scale=scale, **variants)
    ref_out = r_out if ref_out is None else ref_out
    ref_lse = r_lse if ref_lse is None else ref_lse
    naive_out, naive_lse = naive_attention(q, k, v, causal=causal, scale=scale, **variants)
    assert out.dtype == dtype, f"out has dtype {out.dtype}, expected {dtype}"
    assert lse.dtype == accumulator_dtype(dtype), \
        f"lse has dtype {lse.dtype}, expected {accumulator_dtype(dtype)}"
    out_slack, lse_slack = score_rounding_slack(q, k, v, scale=scale, **variants)
    # with dropout, a row's weights sum to up to 1 / (1 - dropout_p), not 1
    floor = out_floor(dtype, v) / (1.0 - variants.get("dropout_p", 0.0))
    assert_within_budget("out", out, ref_out, naive_out, floor, out_slack)
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


# ----------------------------------------------------------------------------------------
# the backward pass
# ----------------------------------------------------------------------------------------

def sum_to_shape(g, shape):
    """Sum ``g`` over the dimensions along which an input of ``shape`` was broadcast."""
    lead = g.ndim - len(shape)
    g = np.sum(g, axis=tuple(range(lead))) if lead else g
    ones = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return np.sum(g, axis=ones, keepdims=True) if ones else g


def _backward_matrices(dout, q, k, v, *, causal, scale, dtype, **variants):
    """``(P, dP, Delta, O, lse, T, ZR)`` of the backward's formulas, every step in
    ``dtype`` (lse with keepdims, broadcast to the batch of P; ``T = tanh(S0 / softcap)``
    of the raw scores with ``softcap``, else None). With dropout ``ZR = Z / (1 -
    dropout_p)`` (else None), ``O = (P * ZR) v`` and dP is the dropped
    ``(dout v^T) * ZR``."""
    dropout_p, seed, variants = _split_dropout(variants)
    zr = dropout_scale(q, k, v, dropout_p, seed, dtype)
    q, k, v, dout = (x.astype(dtype) for x in (q, k, v, dout))
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * dtype.type(scale)
    softcap = variants.get("softcap")
    t = None if softcap is None else np.tanh(s / dtype.type(softcap))
    s = apply_variants(s, q.shape[-2], k.shape[-2], causal=causal, **variants)
    p = np.exp(_wide_log_softmax(s, -1))
    m, log_l = _shift_and_log_sum(s, -1)
    out = np.matmul(p if zr is None else p * zr, v)
    dp = np.matmul(dout, np.swapaxes(v, -1, -2))
    if zr is not None:
        dp = dp * zr
    delta = np.sum(dout * out, axis=-1, keepdims=True)
    return p, dp, delta, out, np.broadcast_to(m + log_l, delta.shape), t, zr


def true_attention_backward(dout, q, k, v, *, causal=False, scale=None, return_dbias=False,
                            **variants):
    """``cupyflash.reference.attention_backward``; for float64 inputs the same formulas
    in WIDE (``dq = dS0 k * scale``, ``dk = dS0^T q * scale``, ``dv = P^T dout`` with
    ``dS = P * (dP - Delta)`` and ``dS0 = dS * (1 - T^2)`` with softcap, summed to the
    inputs' shapes; ``dbias = dS`` summed to bias's shape; with dropout ``dv = W^T dout``
    and dP dropped, as in :func:`_backward_matrices`)."""
    if not _wide(q.dtype):
        return reference.attention_backward(dout, q, k, v, causal=causal, scale=scale,
                                            return_dbias=return_dbias, **variants)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p, dp, delta, _, _, t, zr = _backward_matrices(dout, q, k, v, causal=causal,
                                                   scale=scale, dtype=WIDE, **variants)
    ds = p * (dp - delta)
    ds0 = ds if t is None else ds * (1 - t * t)
    w = WIDE.type(scale)
    dq = np.matmul(ds0, k.astype(WIDE)) * w
    dk = np.matmul(np.swapaxes(ds0, -1, -2), q.astype(WIDE)) * w
    dv = np.matmul(np.swapaxes(p if zr is None else p * zr, -1, -2), dout.astype(WIDE))
    grads = (sum_to_shape(dq, q.shape), sum_to_shape(dk, k.shape), sum_to_shape(dv, v.shape))
    return grads + (sum_to_shape(ds, variants["bias"].shape),) if return_dbias else grads


def dbias_term_sums(dout, q, k, v, *, causal=False, scale=None, **variants):
    """What a dbias adds up, in absolute value: ``P * (|dP| + |Delta|)`` summed to bias's
    shape (in WIDE). A dbias whose exact value is small can be the sum of terms far beyond
    float16's range (they cancel), and the backward's Delta, from the rounded O, leaves
    errors of the terms' size: a float16 bias's test must keep these sums in range, not
    only dbias itself."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p, dp, delta, _, _, _, _ = _backward_matrices(dout, q, k, v, causal=causal, scale=scale,
                                                  dtype=WIDE, **variants)
    return sum_to_shape(p * (np.abs(dp) + np.abs(delta)), variants["bias"].shape)


def naive_attention_backward(dout, q, k, v, *, causal=False, scale=None, return_dbias=False,
                             **variants):
    """Full-matrix backward in the inputs' dtype (steps 6-11 of the module docstring),
    from the naive forward's own P, W and O (steps 1-5 and 4a, with the variants and
    dropout; then step 7a with dropout). With softcap, step 9 is followed by
    ``dS0 = round_T(dS * (1 - T^2))`` (``T = tanh(S0 / softcap)`` of the naive raw scores,
    in acc), which steps 10 and 11 use; ``dbias`` is dS summed to bias's shape in acc,
    rounded to bias's dtype. Returns ``(dq, dk, dv)`` (and
    ``dbias``) in the inputs' (bias's) dtype."""
    dtype = q.dtype
    acc = accumulator_dtype(dtype).type
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    p, w, out, _, zr = _naive_forward(q, k, v, causal=causal, scale=scale, **variants)
    p, w, out, do = p.astype(acc), w.astype(acc), out.astype(acc), dout.astype(acc)
    with np.errstate(invalid="ignore", over="ignore"):
        # 6. dV = round_T(W^T @ dO)
        dv = np.matmul(np.swapaxes(w, -1, -2), do)
        # 7. dP = round_T(dO @ v^T)
        dp = np.matmul(do, np.swapaxes(v.astype(acc), -1, -2)).astype(dtype).astype(acc)
        if zr is not None:
            # 7a. dP = round_T(dP * Z / (1 - dropout_p)): dropout's backward
            dp = (dp * zr).astype(dtype).astype(acc)
        # 8. Delta = rowsum(dO * O), kept in acc
        delta = np.sum(do * out, axis=-1, keepdims=True)
        # 9. dS = round_T(P * (dP - Delta))
        ds = (p * (dp - delta)).astype(dtype).astype(acc)
        ds0 = ds
        if variants.get("softcap") is not None:
            # 9a. dS0 = round_T(dS * (1 - T^2)), T from the naive raw scores (steps 1, 2)
            qs = (q.astype(acc) * acc(scale)).astype(dtype).astype(acc)
            s0 = np.matmul(qs, np.swapaxes(k.astype(acc), -1, -2)).astype(dtype).astype(acc)
            t = np.tanh(s0 / acc(variants["softcap"]))
            ds0 = (ds * (1 - t * t)).astype(dtype).astype(acc)
        # 10., 11. dQ = round_T(dS0 @ k * scale), dK = round_T(dS0^T @ q * scale)
        dq = np.matmul(ds0, k.astype(acc)) * acc(scale)
        dk = np.matmul(np.swapaxes(ds0, -1, -2), q.astype(acc)) * acc(scale)
    # (sums over broadcast dimensions in acc, before the rounding to T)
    grads = tuple(sum_to_shape(g, x.shape).astype(dtype) for g, x in ((dq, q), (dk, k), (dv, v)))
    if not return_dbias:
        return grads
    bias = variants["bias"]
    return grads + (sum_to_shape(ds, bias.shape).astype(bias.dtype),)


def backward_floors_and_slacks(dout, q, k, v, *, causal, scale, return_dbias=False,
                               **variants):
    """``(floors, slacks)``, each a tuple for (dq, dk, dv) (and dbias): the floor, a
    number, and the score-rounding slack, an array of the gradient's shape (see the
    module docstring).

    With ``P``, ``dP``, ``Delta``, ``O`` of the float64 formulas:

    * natural magnitudes, the sums of the absolute values of every term:
      ``|dS|_ij = P_ij * (sum_c |dO_ic| |v_jc| + sum_c |dO_ic| |O_ic|)``,
      ``|dq| = |scale| |dS| |k|``, ``|dk| = |scale| |dS|^T |q|``, ``|dv| = P^T |dO|``,
      ``|dbias| = |dS|`` summed to bias's shape; floor = FLOOR_ULPS * u_T * max of each
      (u of bias's dtype too for dbias, where it is coarser). With softcap the factor
      ``1 - T^2 <= 1`` is left out of the naturals of dq and dk: ``1 - T^2`` itself
      rounds at the size of 1, not at its own;
    * slack: every score of row i off by ``eps_i`` (:func:`score_rounding_slack`, with
      the variants), and the lse by as much, moves ``P_ij = exp(S_ij - lse_i)`` by a
      factor within ``exp(+-2 eps_i)``; the rounding of lse_i itself, of ``S_ij - lse_i``
      and of the exp add ``FLOOR_ULPS * u_acc * (1 + |lse_i| + |S_ij - lse_i|)``. So
      ``|dP_ij| <= r_ij = P_ij (2 eps_i + FLOOR_ULPS u_acc (1 + |lse_i| + |log P_ij|))``.
      The forward's out row moves by ``sum_j dP_ij (v_j - O_i)`` with
      ``|dP_ij| <= r_ij``, so ``Delta_i = dO_i . O_i`` by at most
      ``dDelta_i = sum_j r_ij |dP_ij - Delta_i|`` (``dO_i . v_j = dP_ij``), plus
      ``sum_c |dO_ic| min(|O_ic|, eta_T)`` where O_ic is subnormal in T, the underflow of
      the stored out the backward takes Delta from (module docstring). To first order
      ``|d dS_ij| <= r_ij |dP_ij - Delta_i| + P_ij dDelta_i``, and
      slack(dq) = ``|scale| |d dS0| |k|``, slack(dk) = ``|scale| |d dS0|^T |q|``,
      slack(dv) = ``r^T |dO|``, slack(dbias) = ``|d dS|`` summed to bias's shape. With
      softcap, ``|d dS0| = |d dS| (1 - T^2) + |dS| (2 |T| (1 - T^2) e_i / softcap +
      FLOOR_ULPS u_acc)``: the raw score's rounding ``e_i = FLOOR_ULPS u_acc |scale|
      |q_i| max_j |k_j|`` moves ``T``, and ``1 - T^2`` rounds; else ``d dS0 = d dS``.

    With dropout, ``dP`` above is the dropped ``(dout v^T) * ZR`` (``ZR = Z / (1 -
    dropout_p)``), ``|dv| = W^T |dO|`` with the weights ``W = P * ZR``, the ``|dO_i| .
    |v_j|`` of ``|dS|`` is multiplied by ``ZR_ij``, and slack(dv) = ``(r * ZR)^T |dO|``:
    a weight moves by ``ZR_ij`` times its probability's move. The bound on ``d Delta_i``
    keeps its form, since ``dO_i . (ZR_ij v_j)`` is the dropped ``dP_ij``.

    Every product is summed over the broadcast dimensions, as the gradients are.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    f64 = np.dtype(np.float64)
    p, dp, delta, out, lse, t, zr = _backward_matrices(dout, q, k, v, causal=causal,
                                                       scale=scale, dtype=f64, **variants)
    w = p if zr is None else p * zr                                     # the weights of O
    abs_do = np.abs(dout.astype(f64))
    abs_q, abs_k, abs_v = (np.abs(x.astype(f64)) for x in (q, k, v))
    w_t = np.swapaxes(w, -1, -2)
    # natural magnitudes
    abs_dp = np.matmul(abs_do, np.swapaxes(abs_v, -1, -2))
    if zr is not None:
        abs_dp = abs_dp * zr
    ds_nat = p * (abs_dp + np.sum(abs_do * np.abs(out), axis=-1, keepdims=True))
    naturals = (abs(scale) * np.matmul(ds_nat, abs_k),
                abs(scale) * np.matmul(np.swapaxes(ds_nat, -1, -2), abs_q),
                np.matmul(w_t, abs_do))
    # first-order effect of the score rounding
    _, eps = score_rounding_slack(q, k, v, scale=scale, **variants)      # (batch..., Lq)
    with np.errstate(divide="ignore"):
        s_minus_lse = np.where(p > 0, np.abs(np.log(p)), 0.0)           # |S_ij - lse_i|
    abs_lse = np.where(np.isfinite(lse), np.abs(lse), 0.0)              # (..., Lq, 1)
    u_acc = unit_roundoff(accumulator_dtype(q.dtype))
    rel = 2 * eps[..., None] + FLOOR_ULPS * u_acc * (1 + abs_lse + s_minus_lse)
    r = rel * p                                                         # bound on |d P_ij|
    r_ds = r * np.abs(dp - delta)
    d_delta = np.sum(r_ds, axis=-1, keepdims=True)                      # bound on |d Delta_i|
    # + the underflow of O rounded to T, from which the backward takes Delta
    eta = UNDERFLOW_ETA[np.dtype(q.dtype).name]
    abs_out = np.abs(out)
    subnormal = abs_out < 2 * float(ml_dtypes.finfo(q.dtype).smallest_normal)
    o_under = np.where(subnormal, np.minimum(abs_out, eta), 0.0)
    d_delta = d_delta + np.sum(abs_do * o_under, axis=-1, keepdims=True)
    d_ds = r_ds + p * d_delta
    d_ds0 = d_ds
    if t is not None:
        _, raw_eps = score_rounding_slack(q, k, v, scale=scale)        # the raw scores' own
        g = 1 - t * t
        d_ds0 = d_ds * g + np.abs(p * (dp - delta)) * (
            2 * np.abs(t) * g * raw_eps[..., None] / variants["softcap"] + FLOOR_ULPS * u_acc)
    # underflow of the operands dS (dq, dk) and W (dv) rounded to T where they are not 0
    seen, weighted = (p > 0).astype(f64), (w > 0).astype(f64)
    slacks = (abs(scale) * np.matmul(d_ds0 + eta * seen, abs_k),
              abs(scale) * np.matmul(np.swapaxes(d_ds0 + eta * seen, -1, -2), abs_q),
              np.matmul(np.swapaxes((r if zr is None else r * zr) + eta * weighted, -1, -2),
                        abs_do))
    u = unit_roundoff(q.dtype)
    shapes = (q.shape, k.shape, v.shape)
    floors = tuple(FLOOR_ULPS * u * _finite_abs_max(sum_to_shape(n, shape))
                   for n, shape in zip(naturals, shapes))
    # (+ eta: each batch element's gradient is rounded to T before the broadcast sum)
    slacks = tuple(sum_to_shape(sl + eta, shape) for sl, shape in zip(slacks, shapes))
    if return_dbias:
        bias = variants["bias"]
        u_bias = max(u, unit_roundoff(bias.dtype))
        floors += (FLOOR_ULPS * u_bias * _finite_abs_max(sum_to_shape(ds_nat, bias.shape)),)
        slacks += (sum_to_shape(d_ds, bias.shape) + UNDERFLOW_ETA[np.dtype(bias.dtype).name],)
    return floors, slacks


def check_attention_backward(dq, dk, dv, dout, q, k, v, *, causal, scale, dbias=None,
                             **variants):
    """Assert that ``dq, dk, dv`` (and ``dbias``, if given) computed from the (rounded,
    NumPy) inputs dout, q, k, v and the variants meet the accuracy rule, with the shapes
    and dtypes of q, k, v (and bias); and that a query row that sees no key has a dq row
    of exact zeros."""
    with_dbias = dbias is not None
    truth = true_attention_backward(dout, q, k, v, causal=causal, scale=scale,
                                    return_dbias=with_dbias, **variants)
    naive = naive_attention_backward(dout, q, k, v, causal=causal, scale=scale,
                                     return_dbias=with_dbias, **variants)
    floors, slacks = backward_floors_and_slacks(dout, q, k, v, causal=causal, scale=scale,
                                                return_dbias=with_dbias, **variants)
    names, grads, inputs = ["dq", "dk", "dv"], [dq, dk, dv], [q, k, v]
    if with_dbias:
        names.append("dbias")
        grads.append(dbias)
        inputs.append(variants["bias"])
    for name, got, x, ref, nv, floor, slack in zip(names, grads, inputs, truth, naive,
                                                   floors, slacks):
        assert got.dtype == x.dtype, f"{name} has dtype {got.dtype}, expected {x.dtype}"
        assert got.shape == x.shape, f"{name} has shape {got.shape}, expected {x.shape}"
        assert_within_budget(name, got, ref, nv, floor, slack)
    # rows 0 .. blind - 1 see no key (causal with Lq > Lk, or Lk = 0), and with the
    # variants every row whose final scores are all -inf
    Lq, Lk = q.shape[-2], k.shape[-2]
    blind = Lq - Lk if causal else (Lq if Lk == 0 else 0)
    assert np.all(np.asarray(dq[..., :max(blind, 0), :], dtype=np.float64) == 0), \
        "a query row that sees no key must have a dq row of exact zeros"
    if variants and Lq and Lk:
        _, _, _, _, lse, _, _ = _backward_matrices(dout, q, k, v, causal=causal,
                                                scale=1.0 if scale is None else scale,
                                                dtype=np.dtype(np.float64), **variants)
        empty = np.isneginf(lse[..., 0])                                # (batch..., Lq)
        dq_full = np.broadcast_to(np.asarray(dq, dtype=np.float64),
                                  empty.shape + (q.shape[-1],))
        if q.shape == dq_full.shape:  # dq of a broadcast q sums rows of other elements
            assert np.all(dq_full[empty] == 0), \
                "a query row that sees no key must have a dq row of exact zeros"
