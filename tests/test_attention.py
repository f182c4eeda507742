"""cupyflash.attention against the float64 reference, and its algebraic properties.

Every test takes the ``xp`` fixture, so the same functions run on the NumPy backend and,
where a CUDA device exists, on the CuPy backend (``pytest -m gpu`` selects those).
Inputs are drawn as NumPy arrays rounded to the dtype under test; the reference sees the
same rounded values. The accuracy rule is in ``accuracy.py``.
"""

import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import cupyflash
from accuracy import (DTYPES, accumulator_dtype, check_attention, gamma, true_attention,
                      unit_roundoff)
from backends import to_numpy, to_xp
from cupyflash import reference
from strategies import AttentionCase, attention_cases

# OpenBLAS's float32 kernels raise the invalid flag on padding lanes when a key holds -inf
# (0 * -inf), although no NaN reaches the result; NumPy turns the flag into this warning.
# The results themselves are checked for NaN.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")

ALL_DTYPES = pytest.mark.parametrize("dtype", list(DTYPES))


def run(xp, q, k, v, **options):
    """cupyflash.attention on ``xp`` copies of NumPy inputs; results back as NumPy.

    Also asserts that the call left its inputs bit for bit as they were.
    """
    q_x, k_x, v_x = to_xp(xp, q, k, v)
    result = cupyflash.attention(q_x, k_x, v_x, **options)
    for name, before, after in (("q", q, q_x), ("k", k, k_x), ("v", v, v_x)):
        assert to_numpy(after).tobytes() == before.tobytes(), f"attention modified {name}"
    if isinstance(result, tuple):
        return tuple(to_numpy(r) for r in result)
    return to_numpy(result)


def seen_keys(q, k, v, *, causal, scale):
    """(batch..., Lq, Lk) bool: key j has a finite score for query i and is not masked."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = np.matmul(q.astype(np.float64), np.swapaxes(k.astype(np.float64), -1, -2)) * scale
    seen = np.isfinite(s)
    if causal:
        seen &= reference.causal_mask(q.shape[-2], k.shape[-2])
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    return np.broadcast_to(seen, batch + seen.shape[-2:])


# ----------------------------------------------------------------------------------------
# accuracy
# ----------------------------------------------------------------------------------------

@given(case=attention_cases())
@example(case=AttentionCase("float16", Lq=97, Lk=113, D=59, Dv=59, seed=1))
@example(case=AttentionCase("bfloat16", Lq=113, Lk=97, D=111, Dv=64, causal=True,
                            logit_max=50.0, seed=2))
@example(case=AttentionCase("float32", Lq=1023, Lk=1025, D=64, Dv=64, causal=True,
                            logit_max=1e3, seed=3))
@example(case=AttentionCase("float16", Lq=1025, Lk=1023, D=128, Dv=128, causal=True,
                            neg_inf="prefix", seed=4))
@example(case=AttentionCase("float64", Lq=1, Lk=1025, D=1, Dv=3, logit_max=1e4, seed=5))
@example(case=AttentionCase("bfloat16", Lq=1025, Lk=1, D=256, Dv=256, causal=True, seed=6))
@example(case=AttentionCase("float32", Lq=97, Lk=113, D=64, Dv=32, q_batch=(2, 2, 4),
                            k_batch=(2, 2, 1), v_batch=(2, 2, 1), causal=True, seed=7))
@example(case=AttentionCase("float64", Lq=113, Lk=97, D=3, Dv=5, q_batch=(1, 3),
                            k_batch=(2, 1), v_batch=(3,), neg_inf="all", seed=8))
def test_matches_reference(xp, case):
    q, k, v, scale = case.inputs()
    out, lse = run(xp, q, k, v, causal=case.causal, scale=scale, return_lse=True)
    assert out.shape == case.batch_shape + (case.Lq, case.Dv)
    assert lse.shape == case.batch_shape + (case.Lq,)
    check_attention(out, lse, q, k, v, causal=case.causal, scale=scale)


@given(case=attention_cases(max_len=128, max_head_dim=64, max_work=2 * 10**6))
def test_output_rows_are_convex_combinations_of_value_rows(xp, case):
    """Each output row lies within [min v, max v] per column, over the keys it sees."""
    q, k, v, scale = case.inputs()
    out = run(xp, q, k, v, causal=case.causal, scale=scale).astype(np.float64)
    seen = seen_keys(q, k, v, causal=case.causal, scale=scale)[..., None]  # (..., Lq, Lk, 1)
    v64 = v.astype(np.float64)[..., None, :, :]                          # (..., 1, Lk, Dv)
    lo = np.where(seen, v64, np.inf).min(axis=-2)
    hi = np.where(seen, v64, -np.inf).max(axis=-2)
    # Weights that sum to 1 only up to rounding: the final rounding to the dtype, P
    # rounded to the dtype before P @ V (the GPU's tensor cores), and sums of at most
    # Lk terms plus Lk rescales for acc and for l_i in the accumulator dtype.
    rel = 2 * unit_roundoff(v.dtype) + 3 * gamma(2 * case.Lk + 2,
                                                 unit_roundoff(accumulator_dtype(v.dtype)))
    tol = rel * max(1.0, float(np.abs(v64).max(initial=0)))
    empty = ~seen[..., 0].any(axis=-1)
    assert np.all(out[empty] == 0), "a row that sees no key must be zero"
    visible = ~empty
    assert np.all(out[visible] >= lo[visible] - tol), float((lo - out)[visible].max())
    assert np.all(out[visible] <= hi[visible] + tol), float((out - hi)[visible].max())


@given(case=attention_cases(max_len=200, max_head_dim=128))
def test_values_of_ones_give_ones(xp, case):
    q, k, _, scale = case.inputs()
    v = np.ones(case.v_batch + (case.Lk, case.Dv), dtype=DTYPES[case.dtype])
    out = run(xp, q, k, v, causal=case.causal, scale=scale).astype(np.float64)
    seen_any = seen_keys(q, k, v, causal=case.causal, scale=scale).any(axis=-1)
    expected = np.broadcast_to(seen_any[..., None], out.shape).astype(np.float64)
    tol = 2 * unit_roundoff(v.dtype) + 3 * gamma(2 * case.Lk + 2,
                                                 unit_roundoff(accumulator_dtype(v.dtype)))
    assert np.all(out[expected == 0] == 0)
    assert np.abs(out - expected).max(initial=0) <= tol


@given(case=attention_cases(causal=st.just(False)),
       order=st.sampled_from(["random", "reversed", "ascending", "descending"]))
@example(case=AttentionCase("float32", Lq=3, Lk=1025, D=16, Dv=16, logit_max=1e3, seed=9),
         order="ascending")
def test_permuting_keys_and_values_together_changes_nothing(xp, case, order):
    """Non-causal attention is a function of the set of (key, value) pairs.

    "ascending" sorts the keys by their score for the first query, so its maximum comes
    last and every key block raises the running maximum (the most rescaling);
    "descending" puts the maximum first (no rescaling at all).
    """
    q, k, v, scale = case.inputs()
    ref_out, ref_lse = true_attention(q, k, v, scale=scale)
    rng = np.random.default_rng(case.seed)
    if order in ("ascending", "descending"):
        first = (0,) * (k.ndim - 2)
        s = k[first].astype(np.float64) @ q[(0,) * (q.ndim - 2) + (0,)].astype(np.float64)
        perm = np.argsort(s * np.sign(scale or 1.0), kind="stable")  # by score, not by q.k
        perm = perm[::-1] if order == "descending" else perm
    else:
        perm = rng.permutation(case.Lk) if order == "random" else np.arange(case.Lk)[::-1]
    k_p, v_p = k[..., perm, :], v[..., perm, :]
    out, lse = run(xp, q, k_p, v_p, scale=scale, return_lse=True)
    check_attention(out, lse, q, k_p, v_p, causal=False, scale=scale,
                    ref_out=ref_out, ref_lse=ref_lse)


@given(case=attention_cases(logit_max=st.just(None), max_head_dim=255),
       shift_max=st.sampled_from([30.0, 1e3, 1e4]))
def test_adding_a_constant_to_a_row_of_scores_changes_nothing(xp, case, shift_max):
    """Append a column c_i to q and a column of ones to k: every score of row i grows by
    scale * c_i. The output must not change; the lse grows by scale * c_i."""
    q, k, v, _ = case.inputs()
    dtype = q.dtype
    scale = 1.0 / math.sqrt(case.D)
    rng = np.random.default_rng(case.seed)
    c = rng.uniform(-1, 1, q.shape[:-1] + (1,)) * shift_max / scale
    if dtype == np.float16:
        c = np.clip(c, -3e4, 3e4)
    q_s = np.concatenate([q, c.astype(dtype)], axis=-1)
    k_s = np.concatenate([k, np.ones(k.shape[:-1] + (1,), dtype=dtype)], axis=-1)
    ref_out, _ = true_attention(q, k, v, causal=case.causal, scale=scale)
    out, lse = run(xp, q_s, k_s, v, causal=case.causal, scale=scale, return_lse=True)
    check_attention(out, lse, q_s, k_s, v, causal=case.causal, scale=scale, ref_out=ref_out)


# ----------------------------------------------------------------------------------------
# masking, -inf, NaN
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
])
def test_causal_mask_is_the_documented_picture(xp, Lq, Lk, picture):
    """With scale 0 and one-hot values, out[i, j] > 0 exactly where query i sees key j."""
    q = np.ones((Lq, 4))
    k = np.ones((Lk, 4))
    v = np.eye(Lk)
    out, lse = run(xp, q, k, v, causal=True, scale=0.0, return_lse=True)
    seen = ["".join("x" if w > 0 else "." for w in row) for row in out]
    assert seen == picture
    counts = np.array([row.count("x") for row in picture])
    expected = np.where(counts > 0, np.log(np.maximum(counts, 1)), -np.inf)
    np.testing.assert_allclose(lse, expected, rtol=1e-15, atol=1e-15)


@ALL_DTYPES
@pytest.mark.parametrize("Lk", [1, 5, 300])
def test_rows_whose_keys_are_all_minus_inf_give_zeros(xp, dtype, Lk):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 7, 8))
    q[..., 0] = 1
    k = rng.standard_normal((2, Lk, 8))
    k[0, :, 0] = -np.inf      # batch element 0: every score is -inf
    k[1, : Lk // 2, 0] = -np.inf  # batch element 1: the first half of the keys
    v = rng.standard_normal((2, Lk, 3))
    q, k, v = (x.astype(DTYPES[dtype]) for x in (q, k, v))
    for causal in (False, True):
        out, lse = run(xp, q, k, v, causal=causal, return_lse=True)
        assert np.all(out[0] == 0) and np.all(np.isneginf(lse[0]))
        assert not np.isnan(out).any() and not np.isnan(lse).any()
        check_attention(out, lse, q, k, v, causal=causal, scale=None)


@ALL_DTYPES
def test_causal_queries_that_see_no_key_give_zeros(xp, dtype):
    """Lq > Lk: queries 0 .. Lq - Lk - 1 see no key."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal(s).astype(DTYPES[dtype])
               for s in ((3, 300, 16), (3, 40, 16), (3, 40, 16)))
    out, lse = run(xp, q, k, v, causal=True, return_lse=True)
    assert np.all(out[:, :260] == 0) and np.all(np.isneginf(lse[:, :260]))
    assert np.all(np.isfinite(lse[:, 260:]))
    check_attention(out, lse, q, k, v, causal=True, scale=None)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN is being made on purpose
@ALL_DTYPES
def test_nan_scores_give_nan_rows(xp, dtype):
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal(s) for s in ((2, 6, 8), (2, 9, 8), (2, 9, 4)))
    q[0, 2, 3] = np.nan   # query row (0, 2): every score NaN
    k[1, 4, 1] = np.nan   # key (1, 4): NaN for every query that sees it
    q, k, v = (x.astype(DTYPES[dtype]) for x in (q, k, v))
    for causal in (False, True):
        out, lse = run(xp, q, k, v, causal=causal, return_lse=True)
        nan_rows = np.zeros((2, 6), dtype=bool)
        nan_rows[0, 2] = True
        nan_rows[1] = reference.causal_mask(6, 9)[:, 4] if causal else True
        assert np.array_equal(np.isnan(out).all(axis=-1), nan_rows)
        assert np.array_equal(np.isnan(out).any(axis=-1), nan_rows)
        assert np.array_equal(np.isnan(lse), nan_rows)
        check_attention(out, lse, q, k, v, causal=causal, scale=None)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN is being made on purpose
@ALL_DTYPES
def test_plus_inf_scores_give_nan_rows(xp, dtype):
    """Documented: "NaN or +inf scores give NaN", out and lse alike. (The reference's lse
    of such a row is the logsumexp's +inf; attention documents NaN.)"""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal(s) for s in ((6, 8), (9, 8), (9, 4)))
    q[:, 0] = 1
    k[4, 0] = np.inf  # score(i, 4) = +inf for every i
    q, k, v = (x.astype(DTYPES[dtype]) for x in (q, k, v))
    out, lse = run(xp, q, k, v, causal=True, return_lse=True)
    sees_inf = reference.causal_mask(6, 9)[:, 4]
    assert np.array_equal(np.isnan(out).all(axis=-1), sees_inf)
    assert np.array_equal(np.isnan(out).any(axis=-1), sees_inf)
    assert np.array_equal(np.isnan(lse), sees_inf)
    _, ref_lse = true_attention(q, k, v, causal=True)
    assert np.array_equal(np.isposinf(ref_lse), sees_inf)
    check_attention(out, lse, q, k, v, causal=True, scale=None,
                    ref_lse=np.where(sees_inf, np.nan, ref_lse))


# ----------------------------------------------------------------------------------------
# sizes: zero, unbatched, broadcast
# ----------------------------------------------------------------------------------------

@ALL_DTYPES
@pytest.mark.parametrize("q_shape, k_shape, v_shape", [
    ((2, 0, 8), (2, 5, 8), (2, 5, 4)),    # Lq = 0
    ((2, 3, 8), (2, 0, 8), (2, 0, 4)),    # Lk = 0: zeros, lse = -inf
    ((0, 3, 8), (1, 5, 8), (1, 5, 4)),    # a batch dimension of size 0
    ((2, 3, 8), (0, 2, 5, 8), (5, 4)),    # a batch dimension of size 0 from k
    ((2, 3, 8), (2, 5, 8), (2, 5, 0)),    # Dv = 0: an empty output, but lse is computed
    ((0, 8), (0, 8), (0, 4)),             # Lq = Lk = 0
    ((300, 8), (0, 8), (0, 3)),           # Lk = 0 over more than one query block
])
@pytest.mark.parametrize("causal", [False, True])
def test_zero_sizes(xp, dtype, q_shape, k_shape, v_shape, causal):
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal(s).astype(DTYPES[dtype]) for s in (q_shape, k_shape, v_shape))
    out, lse = run(xp, q, k, v, causal=causal, return_lse=True)
    batch = np.broadcast_shapes(q_shape[:-2], k_shape[:-2], v_shape[:-2])
    assert out.shape == batch + (q_shape[-2], v_shape[-1])
    assert lse.shape == batch + (q_shape[-2],)
    if k_shape[-2] == 0:
        assert np.all(out == 0) and np.all(np.isneginf(lse))
    check_attention(out, lse, q, k, v, causal=causal, scale=None)


def test_two_dimensional_inputs_and_array_likes(xp):
    """Unbatched (L, D) inputs give an unbatched output; lists become float64 arrays."""
    q = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    k = [[1.0, 0.0], [0.0, 1.0]]
    v = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    out = cupyflash.attention(q, k, v, scale=1.0)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (3, 3)
    np.testing.assert_allclose(out, reference.attention(q, k, v, scale=1.0), rtol=1e-15)
    out_x = to_numpy(cupyflash.attention(*to_xp(xp, *(np.array(a) for a in (q, k, v))),
                                         scale=1.0))
    # Another backend: the same values up to float64 rounding (the order of the sums differs).
    np.testing.assert_allclose(out_x, out, rtol=1e-14)


@ALL_DTYPES
def test_grouped_query_attention_equals_repeated_keys(xp, dtype):
    """q (B, Hkv, G, L, D) with k, v (B, Hkv, 1, L, D) is the same computation as with
    k and v repeated G times: the results agree bit for bit."""
    rng = np.random.default_rng(5)
    B, Hkv, G, Lq, Lk, D = 2, 3, 4, 70, 90, 32
    q = rng.standard_normal((B, Hkv, G, Lq, D)).astype(DTYPES[dtype])
    k = rng.standard_normal((B, Hkv, 1, Lk, D)).astype(DTYPES[dtype])
    v = rng.standard_normal((B, Hkv, 1, Lk, D)).astype(DTYPES[dtype])
    out, lse = run(xp, q, k, v, causal=True, return_lse=True)
    k_rep, v_rep = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    out_rep, lse_rep = run(xp, q, k_rep, v_rep, causal=True, return_lse=True)
    assert out.tobytes() == out_rep.tobytes() and lse.tobytes() == lse_rep.tobytes()
    check_attention(out, lse, q, k, v, causal=True, scale=None)


@ALL_DTYPES
def test_broadcast_queries(xp, dtype):
    """One set of queries against three sets of keys: q (1, L, D), k, v (3, L, D)."""
    rng = np.random.default_rng(6)
    q = rng.standard_normal((1, 33, 16)).astype(DTYPES[dtype])
    k = rng.standard_normal((3, 65, 16)).astype(DTYPES[dtype])
    v = rng.standard_normal((3, 65, 8)).astype(DTYPES[dtype])
    out, lse = run(xp, q, k, v, return_lse=True)
    assert out.shape == (3, 33, 8)
    check_attention(out, lse, q, k, v, causal=False, scale=None)


# ----------------------------------------------------------------------------------------
# strides and out=
# ----------------------------------------------------------------------------------------

def _strided_views(xp, dtype, layout):
    """q, k, v as ``xp`` views of the given layout, (B, H, L, D) = (2, 3, 67 or 129, 24/16)."""
    rng = np.random.default_rng(7)
    B, H = 2, 3
    views = []
    for L, d in ((67, 24), (129, 24), (129, 16)):  # q, k, v
        if layout == "BLHD":  # transposed (B, L, H, D) storage seen as (B, H, L, D)
            base = to_xp(xp, rng.standard_normal((B, L, H, d)).astype(DTYPES[dtype]))
            views.append(base.swapaxes(1, 2))
        elif layout == "last_dim_strided":  # every other element of a wider last dimension
            base = to_xp(xp, rng.standard_normal((B, H, L, 2 * d)).astype(DTYPES[dtype]))
            views.append(base[..., ::2])
        elif layout == "reversed_rows":  # a negative row stride
            base = to_xp(xp, rng.standard_normal((B, H, L, d)).astype(DTYPES[dtype]))
            views.append(base[:, :, ::-1])
        elif layout == "fortran":
            base = to_xp(xp, rng.standard_normal((B, H, L, d)).astype(DTYPES[dtype]))
            views.append(xp.asfortranarray(base))
        else:
            raise ValueError(layout)
    return tuple(views)


@ALL_DTYPES
@pytest.mark.parametrize("layout", ["BLHD", "last_dim_strided", "reversed_rows", "fortran"])
def test_strided_inputs(xp, dtype, layout):
    """Views are read in place or copied, and give exactly the contiguous result."""
    q_x, k_x, v_x = _strided_views(xp, dtype, layout)
    q, k, v = (to_numpy(x) for x in (q_x, k_x, v_x))
    out, lse = cupyflash.attention(q_x, k_x, v_x, causal=True, return_lse=True)
    out, lse = to_numpy(out), to_numpy(lse)
    for name, before, after in (("q", q, q_x), ("k", k, k_x), ("v", v, v_x)):
        assert to_numpy(after).tobytes() == before.tobytes(), f"attention modified {name}"
    out_c, lse_c = run(xp, np.ascontiguousarray(q), np.ascontiguousarray(k),
                       np.ascontiguousarray(v), causal=True, return_lse=True)
    assert out.tobytes() == out_c.tobytes() and lse.tobytes() == lse_c.tobytes()
    check_attention(out, lse, q, k, v, causal=True, scale=None)


@ALL_DTYPES
def test_broadcast_to_views(xp, dtype):
    """Stride-0 (read-only on NumPy) k and v from broadcast_to."""
    rng = np.random.default_rng(8)
    q = rng.standard_normal((4, 50, 16)).astype(DTYPES[dtype])
    k = rng.standard_normal((1, 60, 16)).astype(DTYPES[dtype])
    v = rng.standard_normal((1, 60, 8)).astype(DTYPES[dtype])
    k_x, v_x = (xp.broadcast_to(to_xp(xp, a), (4,) + a.shape[1:]) for a in (k, v))
    out, lse = cupyflash.attention(to_xp(xp, q), k_x, v_x, return_lse=True)
    check_attention(to_numpy(out), to_numpy(lse), q, k, v, causal=False, scale=None)


@ALL_DTYPES
@pytest.mark.parametrize("layout", ["contiguous", "every_other_row", "transposed"])
def test_out_is_written_in_place_and_returned(xp, dtype, layout):
    rng = np.random.default_rng(9)
    B, H, Lq, Lk, D, Dv = 2, 3, 40, 70, 16, 12
    q, k, v = (rng.standard_normal(s).astype(DTYPES[dtype])
               for s in ((B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, Dv)))
    sentinel = 7.0
    shape = {"contiguous": (B, H, Lq, Dv),
             "every_other_row": (B, H, 2 * Lq, Dv + 3),  # out's rows have gaps around them
             "transposed": (B, Lq, H, Dv)}[layout]       # (B, L, H, Dv) seen as (B, H, L, Dv)
    buf = np.full(shape, sentinel)

    def view(b):
        if layout == "every_other_row":
            return b[:, :, ::2, 1:Dv + 1]
        return b.swapaxes(1, 2) if layout == "transposed" else b

    buf_x = to_xp(xp, buf.astype(DTYPES[dtype]))
    out_x = view(buf_x)
    q_x, k_x, v_x = to_xp(xp, q, k, v)
    result, lse = cupyflash.attention(q_x, k_x, v_x, causal=True, out=out_x, return_lse=True)
    assert result is out_x
    expected, expected_lse = run(xp, q, k, v, causal=True, return_lse=True)
    assert to_numpy(out_x).tobytes() == expected.tobytes()
    assert to_numpy(lse).tobytes() == expected_lse.tobytes()
    untouched = np.ones(buf.shape, dtype=bool)
    view(untouched)[...] = False  # the elements out covers
    assert np.all(to_numpy(buf_x).astype(np.float64)[untouched] == sentinel)
    assert cupyflash.attention(q_x, k_x, v_x, out=out_x) is out_x  # without return_lse too


def test_causal_and_scale_accept_numpy_scalars(xp):
    rng = np.random.default_rng(10)
    q, k, v = (rng.standard_normal((5, 4)).astype(np.float32) for _ in range(3))
    expected = run(xp, q, k, v, causal=True, scale=0.25)
    for causal, scale in ((np.bool_(True), np.float32(0.25)), (True, np.float64(0.25)),
                          (True, 0.25), (np.True_, np.int64(1) / 4)):
        got = run(xp, q, k, v, causal=causal, scale=scale)
        assert got.tobytes() == expected.tobytes()


@ALL_DTYPES
def test_default_scale_is_one_over_sqrt_head_dim(xp, dtype):
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((2, 33, 59)).astype(DTYPES[dtype]) for _ in range(3))
    out, lse = run(xp, q, k, v, return_lse=True)
    out_s, lse_s = run(xp, q, k, v, scale=1 / math.sqrt(59), return_lse=True)
    assert out.tobytes() == out_s.tobytes() and lse.tobytes() == lse_s.tobytes()
    # and the reference agrees on what the default is
    check_attention(out, lse, q, k, v, causal=False, scale=1 / math.sqrt(59))


def test_accuracy_rule_can_fail():
    """The rule is not vacuous: a float32 output off by a relative 1e-3, an lse off by
    1e-4 and a single NaN are each caught."""
    rng = np.random.default_rng(12)
    q, k, v = (rng.standard_normal((64, 32)).astype(np.float32) for _ in range(3))
    out, lse = cupyflash.attention(q, k, v, return_lse=True)
    check_attention(out, lse, q, k, v, causal=False, scale=None)
    with pytest.raises(AssertionError, match="out: .got - truth."):
        check_attention(out * np.float32(1 + 1e-3), lse, q, k, v, causal=False, scale=None)
    with pytest.raises(AssertionError, match="lse: .got - truth."):
        check_attention(out, lse + np.float32(1e-4), q, k, v, causal=False, scale=None)
    bad = out.copy()
    bad[3, 1] = np.nan
    with pytest.raises(AssertionError, match="NaN"):
        check_attention(bad, lse, q, k, v, causal=False, scale=None)
