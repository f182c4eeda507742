"""The ground truth itself: cupyflash.reference against plain loops, known values, SciPy.

Everything else is measured against these functions, so they are checked against code
that shares nothing with them: Python loops over floats with ``math.fsum`` (exactly
rounded sums).
"""

import math

import numpy as np
import pytest
import scipy.special
from hypothesis import given
from hypothesis import strategies as st

from accuracy import (DTYPES, WIDE, true_attention, true_attention_backward,
                      true_softmax_family)
from backends import to_xp
from cupyflash import reference


def loop_attention(q, k, v, Dv, *, causal, scale):
    """One (Lq, D), (Lk, D), (Lk, Dv) problem with Python floats, one query at a time."""
    Lq, Lk = len(q), len(k)
    out, lse = [], []
    for i in range(Lq):
        scores = [scale * math.fsum(a * b for a, b in zip(q[i], k[j]))
                  if not causal or j <= i + (Lk - Lq) else -math.inf for j in range(Lk)]
        m = max(scores, default=-math.inf)
        if m == -math.inf:  # sees no key
            out.append([0.0] * Dv)
            lse.append(-math.inf)
            continue
        w = [math.exp(s - m) for s in scores]
        l = math.fsum(w)
        out.append([math.fsum(w[j] * v[j][c] for j in range(Lk)) / l for c in range(Dv)])
        lse.append(m + math.log(l))
    return np.array(out).reshape(Lq, Dv), np.array(lse)


# ----------------------------------------------------------------------------------------
# causal_mask
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("Lq, Lk, picture", [
    (2, 5, ["xxxx.",
            "xxxxx"]),
    (5, 2, ["..",
            "..",
            "..",
            "x.",
            "xx"]),
    (3, 3, ["x..",
            "xx.",
            "xxx"]),
    (1, 4, ["xxxx"]),
    (4, 1, ["...",
            "...",
            "...",
            "x"]),
])
def test_causal_mask_picture(Lq, Lk, picture):
    """The pictures of the attention docstring: bottom-right aligned."""
    picture = [row[:Lk] for row in picture]
    drawn = ["".join("x" if seen else "." for seen in row) for row in reference.causal_mask(Lq, Lk)]
    assert drawn == picture


@pytest.mark.parametrize("Lq, Lk", [(0, 3), (3, 0), (0, 0)])
def test_causal_mask_empty(Lq, Lk):
    mask = reference.causal_mask(Lq, Lk)
    assert mask.shape == (Lq, Lk) and mask.dtype == bool


# ----------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------

@given(Lq=st.integers(0, 9), Lk=st.integers(0, 9), D=st.integers(1, 6), Dv=st.integers(0, 5),
       causal=st.booleans(), scale=st.one_of(st.none(), st.floats(-3, 3)),
       hidden=st.sampled_from(["none", "some", "all"]), seed=st.integers(0, 2**32 - 1))
def test_attention_matches_loops(Lq, Lk, D, Dv, causal, scale, hidden, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(shape) for shape in ((Lq, D), (Lk, D), (Lk, Dv)))
    if hidden != "none":  # score(i, j) = -inf for the hidden keys j (needs scale > 0)
        scale = abs(scale) + 0.5 if scale is not None else None
        q[:, 0] = 1.0
        k[rng.random(Lk) < (1.0 if hidden == "all" else 0.4), 0] = -np.inf
    out, lse = reference.attention(q, k, v, causal=causal, scale=scale, return_lse=True)
    expected_out, expected_lse = loop_attention(
        q.tolist(), k.tolist(), v.tolist(), Dv, causal=causal,
        scale=1 / math.sqrt(D) if scale is None else scale)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    np.testing.assert_allclose(out, expected_out, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(expected_lse))
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-14, atol=1e-14)


def test_attention_batch_dimensions_broadcast():
    """Batched, broadcast inputs give, per batch element, the unbatched result."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 1, 4, 5, 3))
    k = rng.standard_normal((1, 3, 1, 6, 3))
    v = rng.standard_normal((3, 1, 6, 2))
    out, lse = reference.attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == (2, 3, 4, 5, 2) and lse.shape == (2, 3, 4, 5)
    qb, kb, vb = (np.broadcast_to(x, (2, 3, 4) + x.shape[-2:]) for x in (q, k, v))
    for idx in np.ndindex(2, 3, 4):
        o, l = reference.attention(qb[idx], kb[idx], vb[idx], causal=True, return_lse=True)
        np.testing.assert_array_equal(out[idx], o)
        np.testing.assert_array_equal(lse[idx], l)


def test_attention_lse_has_the_batch_dimensions_of_v():
    """v may bring batch dimensions q and k lack; lse has out's batch shape."""
    q, k, v = np.ones((3, 2)), np.ones((4, 2)), np.ones((5, 4, 2))
    out, lse = reference.attention(q, k, v, return_lse=True)
    assert out.shape == (5, 3, 2) and lse.shape == (5, 3)
    np.testing.assert_allclose(lse, np.log(4) + 2 / np.sqrt(2))


def test_attention_known_values():
    # scale 0: every visible key has the same weight, so out is the mean of their values
    v = np.arange(12.0).reshape(4, 3)
    out, lse = reference.attention(np.ones((2, 5)), np.ones((4, 5)), v, causal=True,
                                   scale=0.0, return_lse=True)
    np.testing.assert_allclose(out, [v[:3].mean(axis=0), v.mean(axis=0)], rtol=1e-15)
    np.testing.assert_allclose(lse, np.log([3, 4]), rtol=1e-15)
    # one dominant score selects its key's value
    k = np.eye(4)
    q = 100.0 * k[[2, 0]]
    out = reference.attention(q, k, v, scale=1.0)
    np.testing.assert_allclose(out, v[[2, 0]], rtol=1e-15, atol=1e-30)


def test_attention_rows_that_see_nothing():
    q = np.ones((5, 2))
    k = np.array([[-np.inf, 0.0], [-np.inf, 1.0]])  # every score -inf
    v = np.ones((2, 3))
    out, lse = reference.attention(q, k, v, return_lse=True)
    assert np.all(out == 0) and np.all(np.isneginf(lse))
    out, lse = reference.attention(np.ones((5, 2)), np.ones((2, 2)), v, causal=True,
                                   return_lse=True)
    assert np.all(out[:3] == 0) and np.all(np.isneginf(lse[:3]))
    assert np.all(out[3:] == 1) and np.all(np.isfinite(lse[3:]))


def test_attention_zero_lengths():
    out, lse = reference.attention(np.ones((3, 2)), np.ones((0, 2)), np.ones((0, 4)),
                                   return_lse=True)
    assert out.shape == (3, 4) and np.all(out == 0) and np.all(np.isneginf(lse))
    out, lse = reference.attention(np.ones((0, 2)), np.ones((3, 2)), np.ones((3, 4)),
                                   return_lse=True)
    assert out.shape == (0, 4) and lse.shape == (0,)


def test_attention_is_shift_invariant():
    """A constant added to all scores of a row changes out, not the weights."""
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((6, 4)), rng.standard_normal((7, 4)), rng.standard_normal((7, 3))
    c = rng.uniform(-1e3, 1e3, (6, 1))
    out, lse = reference.attention(q, k, v, scale=0.5, return_lse=True)
    out_s, lse_s = reference.attention(np.hstack([q, c]), np.hstack([k, np.ones((7, 1))]), v,
                                       scale=0.5, return_lse=True)
    np.testing.assert_allclose(out_s, out, rtol=0, atol=1e-11)
    np.testing.assert_allclose(lse_s, lse + 0.5 * c[:, 0], rtol=1e-14)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_attention_any_float_dtype_in_float64_out(dtype):
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((4, 8)).astype(DTYPES[dtype]) for _ in range(3))
    out, lse = reference.attention(q, k, v, return_lse=True)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    expected = reference.attention(*(x.astype(np.float64) for x in (q, k, v)))
    np.testing.assert_array_equal(out, expected)


def test_attention_reads_cupy_arrays(xp):
    """The reference brings device arrays to the host (NumPy arrays pass through)."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 5, 4)).astype(np.float32) for _ in range(3))
    out = reference.attention(*to_xp(xp, q, k, v), causal=True)
    assert type(out) is np.ndarray
    np.testing.assert_array_equal(out, reference.attention(q, k, v, causal=True))


# ----------------------------------------------------------------------------------------
# attention_backward
# ----------------------------------------------------------------------------------------

def loss_gradients_by_finite_differences(dout, q, k, v, *, causal, scale, h=1e-6):
    """Central differences of ``sum(dout * reference.attention(q, k, v))``, entry by entry:
    nothing shared with attention_backward but the forward."""
    def loss():
        return math.fsum((dout * reference.attention(q, k, v, causal=causal,
                                                     scale=scale)).ravel())
    grads = []
    for x in (q, k, v):
        g = np.empty_like(x)
        for i in np.ndindex(x.shape):
            saved = x[i]
            x[i] = saved + h
            up = loss()
            x[i] = saved - h
            down = loss()
            x[i] = saved
            g[i] = (up - down) / (2 * h)
        grads.append(g)
    return grads


@given(Lq=st.integers(0, 5), Lk=st.integers(0, 5), D=st.integers(1, 3), Dv=st.integers(0, 3),
       causal=st.booleans(), scale=st.one_of(st.none(), st.floats(-2, 2)),
       broadcast=st.sampled_from(["none", "k", "q", "v_extra"]),
       seed=st.integers(0, 2**32 - 1))
def test_attention_backward_matches_finite_differences(Lq, Lk, D, Dv, causal, scale,
                                                       broadcast, seed):
    rng = np.random.default_rng(seed)
    q_batch, k_batch, v_batch = {"none": ((2,), (2,), (2,)), "k": ((2,), (1,), (2,)),
                                 "q": ((1,), (2,), (2,)), "v_extra": ((), (), (2,))}[broadcast]
    q, k, v = (rng.standard_normal(b + s)
               for b, s in ((q_batch, (Lq, D)), (k_batch, (Lk, D)), (v_batch, (Lk, Dv))))
    out = reference.attention(q, k, v, causal=causal, scale=scale)
    dout = rng.standard_normal(out.shape)
    dq, dk, dv = reference.attention_backward(dout, q, k, v, causal=causal, scale=scale)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert all(g.dtype == np.float64 for g in (dq, dk, dv))
    for name, got, fd in zip(("dq", "dk", "dv"), (dq, dk, dv),
                             loss_gradients_by_finite_differences(dout, q, k, v,
                                                                  causal=causal, scale=scale)):
        np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-7, err_msg=name)


def test_attention_backward_sums_over_broadcast_dimensions():
    """The gradient of a broadcast input is the sum of the gradients of its copies."""
    rng = np.random.default_rng(4)
    q = rng.standard_normal((2, 1, 4, 5, 3))
    k = rng.standard_normal((1, 3, 1, 6, 3))
    v = rng.standard_normal((3, 1, 6, 2))
    dout = rng.standard_normal((2, 3, 4, 5, 2))
    dq, dk, dv = reference.attention_backward(dout, q, k, v, causal=True)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    qb, kb, vb = (np.broadcast_to(x, (2, 3, 4) + x.shape[-2:]) for x in (q, k, v))
    dq_b, dk_b, dv_b = reference.attention_backward(dout, qb, kb, vb, causal=True)
    np.testing.assert_allclose(dq, dq_b.sum(axis=1, keepdims=True), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(dk, dk_b.sum(axis=(0, 2), keepdims=True), rtol=1e-13,
                               atol=1e-15)
    np.testing.assert_allclose(dv, dv_b.sum(axis=0).sum(axis=1, keepdims=True), rtol=1e-13,
                               atol=1e-15)


def test_attention_backward_rows_that_see_nothing_and_known_values():
    # causal, Lq > Lk: queries 0-2 see nothing: zero dq rows, no NaN
    rng = np.random.default_rng(5)
    q, k, v, dout = (rng.standard_normal(s) for s in ((5, 2), (2, 2), (2, 3), (5, 3)))
    dq, dk, dv = reference.attention_backward(dout, q, k, v, causal=True)
    assert np.all(dq[:3] == 0) and not any(np.isnan(g).any() for g in (dq, dk, dv))
    # query 3 sees only key 0 (weight 1): dv[0] = dout[3] + P[4, 0] dout[4]
    _, lse = reference.attention(q, k, v, causal=True, return_lse=True)
    p40 = np.exp(q[4] @ k[0] / np.sqrt(2) - lse[4])
    np.testing.assert_allclose(dv[0], dout[3] + p40 * dout[4], rtol=1e-14)
    np.testing.assert_allclose(dv[1], (1 - p40) * dout[4], rtol=1e-14)
    # Lk = 0 and Lq = 0: zero gradients of the right shapes
    grads = reference.attention_backward(np.ones((3, 4)), np.ones((3, 2)), np.ones((0, 2)),
                                         np.ones((0, 4)))
    assert [g.shape for g in grads] == [(3, 2), (0, 2), (0, 4)] and np.all(grads[0] == 0)
    grads = reference.attention_backward(np.ones((0, 4)), np.ones((0, 2)), np.ones((3, 2)),
                                         np.ones((3, 4)))
    assert [g.shape for g in grads] == [(0, 2), (3, 2), (3, 4)]
    assert np.all(grads[1] == 0) and np.all(grads[2] == 0)


@given(Lq=st.integers(0, 30), Lk=st.integers(0, 30), D=st.integers(1, 8),
       causal=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_wide_backward_truth_agrees_with_reference(Lq, Lk, D, causal, seed):
    rng = np.random.default_rng(seed)
    q, k, v, dout = (rng.standard_normal(s)
                     for s in ((2, Lq, D), (1, Lk, D), (2, Lk, 3), (2, Lq, 3)))
    for wide, ref in zip(true_attention_backward(dout, q, k, v, causal=causal),
                         reference.attention_backward(dout, q, k, v, causal=causal)):
        assert wide.dtype == WIDE and wide.shape == ref.shape
        np.testing.assert_allclose(wide.astype(np.float64), ref, rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------------------
# softmax, log_softmax, logsumexp
# ----------------------------------------------------------------------------------------

@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
       magnitude=st.sampled_from([1e-3, 1.0, 100.0]), seed=st.integers(0, 2**32 - 1),
       data=st.data())
def test_softmax_family_matches_scipy(shape, magnitude, seed, data):
    x = np.random.default_rng(seed).standard_normal(shape) * magnitude
    axis = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1),
                               st.lists(st.integers(0, len(shape) - 1), unique=True,
                                        min_size=1).map(tuple)))
    np.testing.assert_allclose(reference.softmax(x, axis=axis),
                               scipy.special.softmax(x, axis=axis), rtol=1e-13, atol=1e-300)
    np.testing.assert_allclose(reference.log_softmax(x, axis=axis),
                               scipy.special.log_softmax(x, axis=axis), rtol=1e-13,
                               atol=1e-13 * magnitude)
    # logsumexp may cancel to near 0: its error is relative to max|x| + log(size)
    np.testing.assert_allclose(reference.logsumexp(x, axis=axis),
                               scipy.special.logsumexp(x, axis=axis), rtol=1e-14,
                               atol=1e-14 * (magnitude + np.log(x.size)))


@pytest.mark.parametrize("big", [1e4, 1e300, 1.7e308])
def test_softmax_family_huge_values(big):
    x = np.array([big, big, -big])
    np.testing.assert_array_equal(reference.softmax(x), [0.5, 0.5, 0.0])
    lsm = reference.log_softmax(x)
    np.testing.assert_allclose(lsm[:2], -np.log(2), rtol=1e-15)  # log(2) is not lost
    assert lsm[2] == -2 * big - np.log(2) or (np.isneginf(lsm[2]) and 2 * big == np.inf)
    assert reference.logsumexp(x) == big + np.log(2)


def test_softmax_family_special_values():
    x = np.array([[-np.inf, -np.inf], [np.inf, 0.0], [np.nan, 0.0], [0.0, -np.inf]])
    np.testing.assert_array_equal(reference.softmax(x), [[0, 0], [np.nan, 0], [np.nan, np.nan],
                                                         [1, 0]])
    np.testing.assert_array_equal(reference.log_softmax(x),
                                  [[-np.inf, -np.inf], [np.nan, -np.inf], [np.nan, np.nan],
                                   [0, -np.inf]])
    np.testing.assert_array_equal(reference.logsumexp(x), [-np.inf, np.inf, np.nan, 0.0])
    assert np.isneginf(reference.logsumexp(np.zeros(0)))


def test_softmax_axis_none_and_empty_tuple():
    x = np.arange(6.0).reshape(2, 3)
    np.testing.assert_allclose(reference.softmax(x, axis=None), np.exp(x) / np.exp(x).sum(),
                               rtol=1e-15)
    np.testing.assert_allclose(reference.log_softmax(x, axis=None),
                               x - scipy.special.logsumexp(x), rtol=1e-15)
    assert reference.logsumexp(x, axis=None).shape == ()
    np.testing.assert_array_equal(reference.softmax(x, axis=()), np.ones((2, 3)))


# ----------------------------------------------------------------------------------------
# the extended-precision truth of accuracy.py (float64 inputs) is the same function
# ----------------------------------------------------------------------------------------

@given(Lq=st.integers(0, 40), Lk=st.integers(0, 40), D=st.integers(1, 16),
       causal=st.booleans(), hidden=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_wide_truth_agrees_with_reference(Lq, Lk, D, causal, hidden, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((2, L, D)) for L in (Lq, Lk, Lk))
    if hidden:
        q[..., 0] = 1.0
        k[0, : Lk // 2, 0] = -np.inf
    out, lse = reference.attention(q, k, v, causal=causal, return_lse=True)
    wide_out, wide_lse = true_attention(q, k, v, causal=causal)
    assert wide_out.dtype == WIDE and wide_lse.dtype == WIDE
    np.testing.assert_array_equal(np.isneginf(wide_lse), np.isneginf(lse))
    np.testing.assert_allclose(wide_out.astype(np.float64), out, rtol=0, atol=1e-13)
    np.testing.assert_allclose(wide_lse.astype(np.float64), lse, rtol=1e-14, atol=1e-14)
    x = np.concatenate([rng.standard_normal((3, 5)) * 1e3, np.full((1, 5), -np.inf),
                        [[np.inf, 0, 1, 2, 3]]])
    for kind in ("softmax", "log_softmax", "logsumexp"):
        # softmax <= 1; the others carry absolute errors of order 2^-53 * max|x|
        atol = 1e-15 if kind == "softmax" else 1e-15 * np.abs(x[np.isfinite(x)]).max()
        for axis in (-1, 0, None):
            np.testing.assert_allclose(
                true_softmax_family(x, axis, kind).astype(np.float64),
                getattr(reference, kind)(x, axis=axis), rtol=1e-14, atol=atol)
