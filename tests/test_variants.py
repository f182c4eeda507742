"""The variants of attention (bias, mask, window, alibi_slopes, softcap) and
merge_attention, against the float64 reference.

The accuracy properties run on the NumPy backend, and again under the ``gpu`` marker on
the CuPy kernels (``*_on_gpu``, with the GPU's own tile edges among the examples);
merge_attention uses only array-module operations and takes the ``xp`` fixture. Each property runs both through
:func:`cupyflash.attention` (256-row blocks) and through the NumPy backend with small
blocks, so that every band edge, skipped block and partially masked block is met on short
sequences. The accuracy rule is ``accuracy.py``'s, with the variants applied to the truth
and to the naive same-dtype computation.
"""

import math
import re
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import cupyflash
from accuracy import (DTYPES, WIDE, accumulator_dtype, assert_within_budget, check_attention,
                      gamma, lse_floor, out_floor, score_rounding_slack, true_attention,
                      unit_roundoff)
from backends import requires_gpu, to_numpy, to_xp
from cupyflash import _api, _numpy_backend, reference
from strategies import MAX_LEN, AttentionCase, VariantCase, examples, variant_cases

# See test_attention.py: OpenBLAS flags 0 * -inf on padding lanes; no NaN reaches a result.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")

ALL_DTYPES = pytest.mark.parametrize("dtype", list(DTYPES))


# Small blocks for the NumPy backend, and the longest sequence drawn with them.
SMALL_BLOCKS = st.sampled_from([(2, 3), (3, 2), (7, 16), (16, 7), (33, 32)])
SMALL_MAX_LEN = 96


def snapshot(arrays):
    return [np.asarray(a).tobytes() for a in arrays if isinstance(a, np.ndarray)]


def attend(q, k, v, scale, options, *, causal=False, blocks=None):
    """``(out, lse)`` of cupyflash.attention, or of the NumPy backend with ``blocks =
    (BLOCK_M, BLOCK_N)``; also asserts that no input (options included) was changed."""
    arrays = [q, k, v] + list(options.values())
    before = snapshot(arrays)
    if blocks is None:
        out, lse = cupyflash.attention(q, k, v, causal=causal, scale=scale, return_lse=True,
                                       **options)
    else:
        problem = _api.validate_attention("attention", q, k, v, causal, scale)
        _api.validate_variants("attention", problem, options.get("bias"),
                               options.get("mask"), options.get("window"),
                               options.get("alibi_slopes"), options.get("softcap"))
        out, lse = _numpy_backend.attention_forward(
            q, k, v, problem, block_m=blocks[0], block_n=blocks[1], bias=options.get("bias"),
            mask=options.get("mask"), alibi_slopes=options.get("alibi_slopes"))
    assert snapshot(arrays) == before, "attention modified an input"
    return out, lse


def check_case(vc, blocks=None):
    q, k, v, scale, options = vc.inputs()
    out, lse = attend(q, k, v, scale, options, causal=vc.case.causal, blocks=blocks)
    assert out.shape == vc.case.batch_shape + (vc.case.Lq, vc.case.Dv)
    assert lse.shape == vc.case.batch_shape + (vc.case.Lq,)
    check_attention(out, lse, q, k, v, causal=vc.case.causal, scale=scale, **options)


# ----------------------------------------------------------------------------------------
# accuracy: every variant and their combinations
# ----------------------------------------------------------------------------------------

@examples(150)
@given(vc=variant_cases())
@example(vc=VariantCase(AttentionCase("float32", Lq=100, Lk=10, D=8, Dv=8, seed=1),
                        window=(0, 0)))  # rows 0-89 see no key
@example(vc=VariantCase(AttentionCase("float16", Lq=300, Lk=280, D=16, Dv=16, causal=True,
                                      seed=2), window=(40, 5), softcap=30.0))
@example(vc=VariantCase(AttentionCase("bfloat16", Lq=257, Lk=300, D=32, Dv=8,
                                      q_batch=(2, 3), k_batch=(2, 3), v_batch=(2, 3),
                                      seed=3),
                        bias_kind="padding", bias_shape=(2, 1, 1, 300), bias_dtype="float32",
                        mask_kind="rows", mask_shape=(257, 300)))
@example(vc=VariantCase(AttentionCase("float64", Lq=129, Lk=257, D=16, Dv=16, causal=True,
                                      q_batch=(2, 4), k_batch=(2, 1), v_batch=(2, 1),
                                      logit_max=50.0, seed=4),
                        slopes_shape=(4,), slopes_max=1.0))
@example(vc=VariantCase(AttentionCase("float32", Lq=64, Lk=300, D=64, Dv=64, logit_max=1e3,
                                      seed=5), softcap=5.0, bias_kind="random",
                        bias_shape=(64, 300), bias_dtype="float16", bias_scale=10.0))
def test_variants_match_reference(vc):
    check_case(vc)


@examples(150)
@given(vc=variant_cases(max_len=SMALL_MAX_LEN, max_head_dim=64), blocks=SMALL_BLOCKS)
@example(vc=VariantCase(AttentionCase("float32", Lq=40, Lk=90, D=8, Dv=8, seed=6),
                        window=(5, 3), mask_kind="blocky", mask_shape=(40, 90)),
         blocks=(7, 16))
def test_variants_with_small_blocks_match_reference(vc, blocks):
    check_case(vc, blocks)


@examples(60)
@given(vc=variant_cases(options=(), required=("window",), causal=st.just(True),
                        max_len=SMALL_MAX_LEN, max_head_dim=64),
       blocks=st.one_of(st.none(), SMALL_BLOCKS))
def test_window_with_causal(vc, blocks):
    check_case(vc, blocks)


@examples(60)
@given(vc=variant_cases(options=(), required=("bias", "mask"), max_len=SMALL_MAX_LEN,
                        max_head_dim=64),
       blocks=st.one_of(st.none(), SMALL_BLOCKS))
def test_mask_with_bias(vc, blocks):
    check_case(vc, blocks)


@examples(60)
@given(vc=variant_cases(options=("window",), required=("alibi_slopes",),
                        causal=st.just(True), max_len=SMALL_MAX_LEN, max_head_dim=64),
       blocks=st.one_of(st.none(), SMALL_BLOCKS))
def test_alibi_with_causal(vc, blocks):
    check_case(vc, blocks)


@examples(60)
@given(vc=variant_cases(options=("bias", "alibi_slopes"), required=("softcap",),
                        max_len=SMALL_MAX_LEN, max_head_dim=64),
       blocks=st.one_of(st.none(), SMALL_BLOCKS))
@example(vc=VariantCase(AttentionCase("float16", Lq=33, Lk=65, D=16, Dv=16, logit_max=1e4,
                                      seed=7), softcap=0.5), blocks=None)
def test_softcap(vc, blocks):
    check_case(vc, blocks)


# ----------------------------------------------------------------------------------------
# the semantics, case by case
# ----------------------------------------------------------------------------------------

def seen_picture(out):
    return ["".join("x" if w > 0 else "." for w in row) for row in out]


@pytest.mark.parametrize("Lq, Lk, window, causal, picture", [
    (3, 5, (1, 0), False, [".xx..",
                           "..xx.",
                           "...xx"]),
    (3, 5, (0, 1), False, ["..xx.",
                           "...xx",
                           "....x"]),
    (5, 2, (1, 1), False, ["..",
                           "..",
                           "x.",
                           "xx",
                           "xx"]),
    (4, 4, (0, None), False, ["xxxx",
                              ".xxx",
                              "..xx",
                              "...x"]),
    (4, 4, (1, 5), True, ["x...",
                          "xx..",
                          ".xx.",
                          "..xx"]),
    (4, 4, (None, 0), False, ["x...",
                              "xx..",
                              "xxx.",
                              "xxxx"]),
])
def test_window_is_the_documented_band(Lq, Lk, window, causal, picture):
    """With scale 0 and one-hot values, out[i, j] > 0 exactly where query i sees key j:
    ``i + (Lk - Lq) - left <= j <= i + (Lk - Lq) + right``, intersected with causal."""
    out = cupyflash.attention(np.ones((Lq, 4)), np.ones((Lk, 4)), np.eye(Lk), scale=0.0,
                              window=window, causal=causal)
    assert seen_picture(out) == picture
    expected = reference.window_mask(Lq, Lk, window)
    if causal:
        expected &= reference.causal_mask(Lq, Lk)
    assert seen_picture(expected) == picture


@ALL_DTYPES
def test_window_equivalences_are_bitwise(dtype):
    """(None, None) is no window; (None, 0) is causal; causal with (left, r) for any r is
    (left, 0) with causal. Same blocks, same arithmetic: the same bits."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(DTYPES[dtype])
               for s in ((2, 300, 16), (2, 270, 16), (2, 270, 8)))

    def run(**options):
        out, lse = cupyflash.attention(q, k, v, return_lse=True, **options)
        return out.tobytes() + lse.tobytes()

    assert run(window=(None, None)) == run()
    assert run(window=(None, 0)) == run(causal=True)
    assert run(window=[None, 7], causal=True) == run(causal=True)
    assert run(window=(20, 7), causal=True) == run(window=(20, 0), causal=True)
    assert run(window=(20, 7), causal=True) == run(window=(20, 0))


@ALL_DTYPES
@pytest.mark.parametrize("how", ["mask_rows", "bias_rows", "window", "padding"])
def test_rows_that_keep_no_key_give_zeros_and_minus_inf(dtype, how):
    rng = np.random.default_rng(1)
    Lq, Lk = 70, 300
    q, k, v = (rng.standard_normal(s).astype(DTYPES[dtype])
               for s in ((2, Lq, 16), (2, Lk, 16), (2, Lk, 8)))
    empty = np.zeros((2, Lq), dtype=bool)
    if how == "mask_rows":
        options = {"mask": np.ones((2, Lq, Lk), dtype=bool)}
        options["mask"][0, 5:40] = False
        empty[0, 5:40] = True
    elif how == "bias_rows":
        options = {"bias": np.zeros((Lq, Lk), dtype=np.float32)}
        options["bias"][::3] = -np.inf
        empty[:, ::3] = True
    elif how == "window":  # Lk = 5: row i sees keys [i - 67, i - 65], rows 0..64 none
        k, v = k[:, :5], v[:, :5]
        options = {"window": (2, 0)}
        empty[:, :65] = True
    else:  # batch element 1 is all padding
        options = {"mask": np.arange(Lk) < np.array([Lk, 0])[:, None, None]}
        empty[1] = True
    for causal in (False, True):
        for softcap in (None, 5.0):  # the cap acts before the masks: -inf stays -inf
            opts = dict(options, softcap=softcap) if softcap else options
            for blocks in (None, (16, 7)):
                out, lse = attend(q, k, v, None, opts, causal=causal, blocks=blocks)
                reference_lse = reference.attention(q, k, v, causal=causal,
                                                    return_lse=True, **opts)[1]
                no_key = empty | np.isneginf(reference_lse)
                assert np.all(out[no_key] == 0) and np.all(np.isneginf(lse[no_key]))
                assert np.isfinite(lse[~no_key]).all()
                assert not np.isnan(out).any()
                check_attention(out, lse, q, k, v, causal=causal, scale=None, **opts)


def test_alibi_known_values():
    """One query, two keys, raw scores 0: distances 1 and 0 (bottom-right aligned), slope
    ln 2: weights 1/2 : 1, so out = 2/3 of the second value; lse = log(3/2)."""
    q, k = np.zeros((1, 4)), np.zeros((2, 4))
    v = np.array([[0.0], [1.0]])
    out, lse = cupyflash.attention(q, k, v, alibi_slopes=np.log(2.0), return_lse=True)
    np.testing.assert_allclose(out, [[2 / 3]], rtol=1e-15)
    np.testing.assert_allclose(lse, [np.log(1.5)], rtol=1e-15)


def test_softcap_comes_before_bias():
    """Raw scores 100 and 0, cap 1: capped scores tanh(100) = 1 and 0, then a bias of +1
    on the second key: scores 1 and 1, equal weights (the cap does not touch the bias)."""
    q = np.array([[10.0, 0.0]])
    k = np.array([[10.0, 0.0], [0.0, 1.0]])
    v = np.array([[0.0], [1.0]])
    out = cupyflash.attention(q, k, v, scale=1.0, softcap=1.0, bias=np.array([0.0, 1.0]))
    np.testing.assert_allclose(out, [[0.5]], rtol=1e-15)
    out = cupyflash.attention(q, k, v, scale=1.0, softcap=1.0)  # weights e : 1
    np.testing.assert_allclose(out, [[1 / (math.e + 1)]], rtol=1e-15)


@ALL_DTYPES
def test_alibi_equals_its_bias(dtype):
    """alibi_slopes = s is the bias reference.alibi_bias(s); slopes of shape (H,), (1, H)
    and (B, H) give the same bits."""
    rng = np.random.default_rng(2)
    B, H = 2, 3
    q, k, v = (rng.standard_normal(s).astype(DTYPES[dtype])
               for s in ((B, H, 70, 16), (B, H, 90, 16), (B, H, 90, 16)))
    slopes = 2.0 ** -np.arange(1, H + 1)
    out, lse = attend(q, k, v, None, {"alibi_slopes": slopes}, causal=True)
    for shaped in (slopes[None], np.broadcast_to(slopes, (B, H)).copy()):
        out_s, lse_s = attend(q, k, v, None, {"alibi_slopes": shaped}, causal=True)
        assert out_s.tobytes() == out.tobytes() and lse_s.tobytes() == lse.tobytes()
    bias = reference.alibi_bias(slopes, 70, 90)
    check_attention(out, lse, q, k, v, causal=True, scale=None, bias=bias)


@ALL_DTYPES
@pytest.mark.parametrize("blocks", [None, (16, 7)])
def test_broadcast_views_and_strides_give_the_same_bits(dtype, blocks):
    """A padding bias and mask of shape (B, 1, 1, Lk), the same as broadcast_to views of
    (B, H, Lq, Lk), as materialised copies, and as transposed views: the same values
    reach every block, so the results agree bit for bit."""
    rng = np.random.default_rng(3)
    B, H, Lq, Lk = 2, 3, 40, 75
    q, k, v = (rng.standard_normal(s).astype(DTYPES[dtype])
               for s in ((B, H, Lq, 8), (B, H, Lk, 8), (B, H, Lk, 8)))
    full = (B, H, Lq, Lk)
    bias = np.where(np.arange(Lk) < np.array([Lk, 50])[:, None, None, None], 0.5, -np.inf)
    mask = rng.random((B, 1, 1, Lk)) < 0.8
    out, lse = attend(q, k, v, None, {"bias": bias, "mask": mask}, blocks=blocks)
    transposed = np.ascontiguousarray(np.broadcast_to(bias, full).swapaxes(-1, -2))
    for b, m in ((np.broadcast_to(bias, full), np.broadcast_to(mask, full)),
                 (np.broadcast_to(bias, full).copy(), np.broadcast_to(mask, full).copy()),
                 (transposed.swapaxes(-1, -2), mask)):
        out_b, lse_b = attend(q, k, v, None, {"bias": b, "mask": m}, blocks=blocks)
        assert out_b.tobytes() == out.tobytes() and lse_b.tobytes() == lse.tobytes()
    # neutral options change nothing at all
    plain = attend(q, k, v, None, {}, blocks=blocks)
    neutral = attend(q, k, v, None, {"bias": np.zeros((Lq, Lk)),
                                     "mask": np.ones((Lq, Lk), dtype=bool)}, blocks=blocks)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(plain, neutral))
    check_attention(out, lse, q, k, v, causal=False, scale=None, bias=bias, mask=mask)


def test_padding_bias_and_mask_are_never_expanded():
    """A (B, 1, 1, Lk) bias and mask cost no full-size copy: the peak memory of the call
    (tracemalloc) stays within 1 MiB of plain attention's (about 19 MiB of score blocks
    here), far below the 128 MiB a (B, H, Lq, Lk) float64 bias would take."""
    rng = np.random.default_rng(4)
    B, H, L, D = 2, 8, 1024, 16
    q, k, v = (rng.standard_normal((B, H, L, D), dtype=np.float32) for _ in range(3))
    bias = np.where(np.arange(L) < np.array([L, 700])[:, None, None, None], 0.0, -np.inf)
    mask = np.arange(L) < np.array([900, L])[:, None, None, None]
    full_bytes = B * H * L * L * bias.itemsize

    def peak(**options):
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            cupyflash.attention(q, k, v, **options)
            return tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()

    plain = peak()
    with_variants = peak(bias=bias, mask=mask, alibi_slopes=np.linspace(0.1, 1, H),
                         window=(300, 0))
    assert with_variants <= plain + (1 << 20), (with_variants, plain)
    assert with_variants < full_bytes / 4, (with_variants, full_bytes)


# ----------------------------------------------------------------------------------------
# the reference itself
# ----------------------------------------------------------------------------------------

def loop_variant_attention(q, k, v, Dv, *, scale, causal, bias, mask, window, slope,
                           softcap):
    """One (Lq, D) problem with Python floats, one query at a time: nothing shared with
    reference.attention but the definitions."""
    Lq, Lk = len(q), len(k)
    off = Lk - Lq
    out, lse = [], []
    for i in range(Lq):
        scores = []
        for j in range(Lk):
            s = scale * math.fsum(a * b for a, b in zip(q[i], k[j]))
            if softcap is not None:
                s = softcap * math.tanh(s / softcap)
            s += -slope * abs(i + off - j) + bias[i][j]
            seen = mask[i][j] and not (causal and j > i + off)
            if window is not None:
                left, right = window
                seen = seen and (left is None or j >= i + off - left)
                seen = seen and (right is None or j <= i + off + right)
            scores.append(s if seen else -math.inf)
        m = max(scores, default=-math.inf)
        if m == -math.inf:
            out.append([0.0] * Dv)
            lse.append(-math.inf)
            continue
        w = [math.exp(s - m) for s in scores]
        l = math.fsum(w)
        out.append([math.fsum(w[j] * v[j][c] for j in range(Lk)) / l for c in range(Dv)])
        lse.append(m + math.log(l))
    return np.array(out).reshape(Lq, Dv), np.array(lse)


@examples(60)
@given(Lq=st.integers(0, 8), Lk=st.integers(0, 8), D=st.integers(1, 4), Dv=st.integers(1, 3),
       causal=st.booleans(), window=st.one_of(st.none(), st.tuples(
           st.one_of(st.none(), st.integers(0, 4)), st.one_of(st.none(), st.integers(0, 4)))),
       slope=st.one_of(st.none(), st.floats(-1, 2)),
       softcap=st.one_of(st.none(), st.sampled_from([0.3, 2.0, 50.0])),
       with_bias=st.booleans(), with_mask=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_reference_matches_loops(Lq, Lk, D, Dv, causal, window, slope, softcap, with_bias,
                                 with_mask, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(s) * 3 for s in ((Lq, D), (Lk, D), (Lk, Dv)))
    bias = np.where(rng.random((Lq, Lk)) < 0.2, -np.inf, rng.standard_normal((Lq, Lk)))
    mask = rng.random((Lq, Lk)) < 0.7
    options = dict(causal=causal, window=window, softcap=softcap,
                   bias=bias if with_bias else None, mask=mask if with_mask else None,
                   alibi_slopes=None if slope is None else np.array(slope))
    out, lse = reference.attention(q, k, v, return_lse=True, **options)
    expected_out, expected_lse = loop_variant_attention(
        q.tolist(), k.tolist(), v.tolist(), Dv, scale=1 / math.sqrt(D), causal=causal,
        bias=(bias if with_bias else np.zeros((Lq, Lk))).tolist(),
        mask=(mask if with_mask else np.ones((Lq, Lk), dtype=bool)).tolist(),
        window=window, slope=slope or 0.0, softcap=softcap)
    np.testing.assert_allclose(out, expected_out, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(expected_lse))
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-13, atol=1e-13)


@examples(20)
@given(vc=variant_cases(dtypes=("float64",), max_len=64, max_head_dim=16))
def test_wide_truth_agrees_with_reference(vc):
    """accuracy.true_attention (long double for float64) computes the reference's formulas."""
    q, k, v, scale, options = vc.inputs()
    out, lse = reference.attention(q, k, v, causal=vc.case.causal, scale=scale,
                                   return_lse=True, **options)
    wide_out, wide_lse = true_attention(q, k, v, causal=vc.case.causal, scale=scale, **options)
    assert wide_out.dtype == WIDE
    # float64 rounds each score to within score_rounding_slack's eps (scores reach 1e4
    # here, values 1e3): the two differ by that plus a few roundings of the result.
    out_slack, lse_slack = score_rounding_slack(q, k, v, scale=scale, **options)
    # (naive = the truth itself: the budget is the floor and the slack, nothing more)
    assert_within_budget("out", out, wide_out, wide_out, out_floor(q.dtype, v), out_slack)
    np.testing.assert_array_equal(np.isneginf(wide_lse), np.isneginf(lse))
    assert_within_budget("lse", lse, wide_lse, wide_lse, lse_floor(q.dtype, wide_lse), lse_slack)


def test_reference_merge_of_key_chunks_is_attention_over_all_keys():
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal(s) for s in ((3, 20, 4), (3, 50, 4), (3, 50, 2)))
    parts = [reference.attention(q, k[:, a:b], v[:, a:b], return_lse=True)
             for a, b in ((0, 7), (7, 7), (7, 40), (40, 50))]  # (7, 7): an empty chunk
    out, lse = reference.merge_attention([p[0] for p in parts], [p[1] for p in parts])
    expected, expected_lse = reference.attention(q, k, v, return_lse=True)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-14)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-15)


# ----------------------------------------------------------------------------------------
# merge_attention
# ----------------------------------------------------------------------------------------

def _key_slice(x, a, b, Lk):
    """The part of a bias or mask broadcastable to (..., Lk) for keys a .. b - 1."""
    return x[..., a:b] if x.ndim and x.shape[-1] == Lk else x


@examples(100)
@given(vc=variant_cases(options=("bias", "mask", "softcap"), causal=st.just(False)),
       cuts=st.lists(st.integers(0, MAX_LEN), max_size=4),
       order=st.sampled_from(["given", "reversed", "shuffled"]), stacked=st.booleans())
@example(vc=VariantCase(AttentionCase("float32", Lq=5, Lk=300, D=16, Dv=16, logit_max=1e4,
                                      seed=8)), cuts=[100, 200], order="reversed", stacked=True)
@example(vc=VariantCase(AttentionCase("float16", Lq=20, Lk=64, D=8, Dv=8, seed=9),
                        mask_kind="padding", mask_shape=(20, 1)), cuts=[10, 10, 40],
         order="given", stacked=False)
def test_merging_key_chunks_equals_attention_over_all_keys(xp, vc, cuts, order, stacked):
    """The attention of q against chunks of the keys (empty chunks, fully masked chunks
    included), merged, meets the accuracy rule of attention against all the keys, in any
    order of the chunks."""
    q, k, v, scale, options = vc.inputs()
    Lk = vc.case.Lk
    bounds = [0] + sorted(c % (Lk + 1) for c in cuts) + [Lk]
    chunks = list(zip(bounds[:-1], bounds[1:]))
    if order == "reversed":
        chunks = chunks[::-1]
    elif order == "shuffled":
        chunks = [chunks[i] for i in np.random.default_rng(vc.seed).permutation(len(chunks))]
    outs, lses = [], []
    for a, b in chunks:
        part = {name: _key_slice(x, a, b, Lk) if name in ("bias", "mask") else x
                for name, x in options.items()}
        o, l = cupyflash.attention(q, k[..., a:b, :], v[..., a:b, :], scale=scale,
                                   return_lse=True, **part)
        outs.append(to_xp(xp, o))
        lses.append(to_xp(xp, l))
    if stacked:
        outs, lses = xp.stack(outs), xp.stack(lses)
    out, lse = cupyflash.merge_attention(outs, lses)
    assert type(out) is type(outs[0]) and type(lse) is type(lses[0])
    check_attention(to_numpy(out), to_numpy(lse), q, k, v, causal=False, scale=scale,
                    **options)


def random_parts(rng, K, shape, dtype, magnitude):
    """K parts: outs of ``shape`` in ``dtype``; lses with -inf entries (and whole -inf
    rows across the parts) in float32 or float64, of the given magnitude."""
    outs = rng.standard_normal((K,) + shape).astype(dtype)
    lse_t = np.float64 if dtype == np.float64 else np.float32
    lses = rng.standard_normal((K,) + shape[:-1]) * magnitude + rng.uniform(-1, 1) * magnitude
    lses = np.where(rng.random(lses.shape) < 0.2, -np.inf, lses)
    lses[:, 0] = -np.inf  # a row that no part saw
    return outs, lses.astype(lse_t)


@examples(60)
@given(dtype=st.sampled_from(list(DTYPES)), K=st.integers(1, 6),
       shape=st.sampled_from([(3, 4), (2, 5, 3), (1, 1), (7, 1, 2)]),
       magnitude=st.sampled_from([1e-3, 1.0, 50.0, 1e4]), seed=st.integers(0, 2**32 - 1))
def test_merge_matches_reference(xp, dtype, K, shape, magnitude, seed):
    """Against reference.merge_attention: out within the final rounding to its dtype plus
    a few roundings in acc per part; lse within a few acc roundings of its size.

    The float64 reference has an error of its own: it rounds ``lse`` at ``2^-53 |lse|``
    before ``exp(lse_k - lse)``, which moves every weight by that much relative (1e-14 at
    |lse| = 100, more than float64's other roundings), so the out tolerance adds it. The
    backend shifts by the maximum lse_k instead, which is exact."""
    rng = np.random.default_rng(seed)
    outs, lses = random_parts(rng, K, shape, DTYPES[dtype], magnitude)
    before = snapshot([outs, lses])
    out, lse = cupyflash.merge_attention(to_xp(xp, outs), to_xp(xp, lses))
    out, lse = to_numpy(out), to_numpy(lse)
    assert snapshot([outs, lses]) == before
    assert out.dtype == DTYPES[dtype] and out.shape == shape
    assert lse.dtype == accumulator_dtype(DTYPES[dtype]) and lse.shape == shape[:-1]
    ref_out, ref_lse = reference.merge_attention(outs, lses)
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    assert not np.isnan(out).any() and np.all(out[np.isneginf(ref_lse)] == 0)
    u_acc = unit_roundoff(accumulator_dtype(DTYPES[dtype]))
    finite = np.isfinite(ref_lse)
    reference_error = 4 * 2.0 ** -53 * (1 + float(np.abs(ref_lse[finite]).max(initial=0)))
    tol = (2 * unit_roundoff(DTYPES[dtype]) + gamma(4 * K + 4, u_acc) + reference_error) \
        * float(np.abs(outs.astype(np.float64)).max())
    assert np.abs(out.astype(np.float64) - ref_out).max() <= tol
    lse_tol = 4 * u_acc * (np.abs(ref_lse[finite]) + K + 1)
    assert np.all(np.abs(lse[finite] - ref_lse[finite]) <= lse_tol)


def test_merge_parts_that_saw_nothing(xp):
    """lse_k = -inf: the part adds nothing, even a NaN out; all -inf: zeros and -inf."""
    outs = np.array([[[1.0, 2.0], [np.nan, np.nan]],
                     [[np.nan, 5.0], [3.0, 4.0]],
                     [[7.0, 8.0], [9.0, 9.0]]], dtype=np.float32)
    lses = np.array([[0.0, -np.inf], [-np.inf, 2.0], [-np.inf, -np.inf]], dtype=np.float32)
    out, lse = cupyflash.merge_attention(to_xp(xp, outs), to_xp(xp, lses))
    out, lse = to_numpy(out), to_numpy(lse)
    np.testing.assert_array_equal(out, [[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(lse, [0.0, 2.0])
    out, lse = cupyflash.merge_attention(to_xp(xp, outs[:, :1]),
                                         to_xp(xp, np.full((3, 1), -np.inf, np.float32)))
    np.testing.assert_array_equal(to_numpy(out), [[0.0, 0.0]])
    assert np.isneginf(to_numpy(lse)).all()


@ALL_DTYPES
def test_merge_of_huge_lse_does_not_overflow(xp, dtype):
    """lse values far past exp's range (1e4; 1e30 in float32): shifted by their maximum."""
    lse_t = accumulator_dtype(DTYPES[dtype])
    big = 1e30 if lse_t == np.float32 else 1e300
    outs = np.array([[[2.0]], [[4.0]]]).astype(DTYPES[dtype])
    for level in (1e4, big, -big):
        lses = np.array([[level], [level]], dtype=lse_t)
        out, lse = cupyflash.merge_attention(to_xp(xp, outs), to_xp(xp, lses))
        out, lse = to_numpy(out), to_numpy(lse)
        np.testing.assert_array_equal(out.astype(np.float64), [[3.0]])
        assert np.isfinite(lse).all()


def test_merge_stacked_and_sequences_agree(xp):
    rng = np.random.default_rng(6)
    outs, lses = random_parts(rng, 4, (2, 6, 8), np.float16, 10.0)
    stacked = cupyflash.merge_attention(to_xp(xp, outs), to_xp(xp, lses))
    for o, l in ((list(to_xp(xp, *outs)), to_xp(xp, lses)),
                 (tuple(to_xp(xp, *outs)), list(to_xp(xp, *lses)))):
        got = cupyflash.merge_attention(o, l)
        assert all(to_numpy(a).tobytes() == to_numpy(b).tobytes() for a, b in zip(got, stacked))


def test_merge_order_changes_only_rounding(xp):
    rng = np.random.default_rng(7)
    outs, lses = random_parts(rng, 5, (3, 40, 16), np.float32, 30.0)
    out, lse = (to_numpy(x) for x in cupyflash.merge_attention(to_xp(xp, outs),
                                                                to_xp(xp, lses)))
    perm = [3, 0, 4, 2, 1]
    out_p, lse_p = (to_numpy(x) for x in cupyflash.merge_attention(to_xp(xp, outs[perm]),
                                                                    to_xp(xp, lses[perm])))
    np.testing.assert_allclose(out_p, out, rtol=0, atol=1e-5 * np.abs(outs).max())
    np.testing.assert_array_equal(np.isneginf(lse_p), np.isneginf(lse))
    finite = np.isfinite(lse)
    np.testing.assert_allclose(lse_p[finite], lse[finite], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------

def raises(error, message):
    return pytest.raises(error, match="^" + re.escape(message))


def gpu_only(test):
    """The ``gpu`` marker, and a skip where there is no CUDA device."""
    for mark in requires_gpu:
        test = mark(test)
    return test


def qkv(xp, Lq=4, Lk=6, batch=(2,), dtype=np.float32):
    rng = np.random.default_rng(0)
    return tuple(to_xp(xp, rng.standard_normal(batch + s).astype(dtype))
                 for s in ((Lq, 8), (Lk, 8), (Lk, 5)))


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex64])
def test_bias_must_be_float(xp, dtype):
    q, k, v = qkv(xp)
    with raises(TypeError, f"attention: bias must have a float dtype (float16, bfloat16, "
                           f"float32, float64), got {np.dtype(dtype).name}"):
        cupyflash.attention(q, k, v, bias=to_xp(xp, np.zeros((4, 6), dtype=dtype)))


@pytest.mark.parametrize("dtype", [np.float32, np.int8, np.uint8])
def test_mask_must_be_bool(xp, dtype):
    q, k, v = qkv(xp)
    with raises(TypeError, f"attention: mask must have dtype bool (True: keep), "
                           f"got {np.dtype(dtype).name}"):
        cupyflash.attention(q, k, v, mask=to_xp(xp, np.ones((4, 6), dtype=dtype)))


@pytest.mark.parametrize("name", ["bias", "mask"])
@pytest.mark.parametrize("shape", [(4, 5), (6, 4), (3, 4, 6), (5, 2, 4, 6), (2, 4, 6, 1)])
def test_bias_and_mask_must_broadcast_to_the_scores(xp, name, shape):
    q, k, v = qkv(xp)
    x = to_xp(xp, np.zeros(shape, dtype=bool if name == "mask" else np.float32))
    with raises(ValueError, f"attention: {name} of shape {shape} must broadcast to "
                            f"(batch..., Lq, Lk) = (2, 4, 6)"):
        cupyflash.attention(q, k, v, **{name: x})


@pytest.mark.parametrize("window, error, message", [
    (3, TypeError, "attention: window must be None or a pair (left, right) of ints >= 0 "
                   "or None, got int"),
    ("3,0", TypeError, "attention: window must be None or a pair (left, right) of ints >= 0 "
                       "or None, got str"),
    ((1, 2, 3), ValueError, "attention: window must be a pair (left, right), got 3 elements"),
    ((1,), ValueError, "attention: window must be a pair (left, right), got 1 elements"),
    ((-1, 0), ValueError, "attention: window left must be >= 0, or None for unbounded, got -1"),
    ((0, -1), ValueError, "attention: window right must be >= 0, or None for unbounded, "
                          "got -1"),
    ((1.0, 2), TypeError, "attention: window left must be an int >= 0 or None, got float"),
    ((1, True), TypeError, "attention: window right must be an int >= 0 or None, got bool"),
])
def test_window_must_be_a_pair_of_non_negative_ints_or_none(xp, window, error, message):
    q, k, v = qkv(xp)
    with raises(error, message):
        cupyflash.attention(q, k, v, window=window)


def test_window_accepts_numpy_integers_and_lists():
    q, k, v = qkv(np)
    expected = cupyflash.attention(q, k, v, window=(2, 1))
    for window in ([2, 1], (np.int64(2), np.uint8(1))):
        assert cupyflash.attention(q, k, v, window=window).tobytes() == expected.tobytes()


@pytest.mark.parametrize("softcap, error, message", [
    (0, ValueError, "attention: softcap must be positive and finite, got 0.0"),
    (-1.0, ValueError, "attention: softcap must be positive and finite, got -1.0"),
    (float("inf"), ValueError, "attention: softcap must be positive and finite, got inf"),
    (float("nan"), ValueError, "attention: softcap must be positive and finite, got nan"),
    ("30", TypeError, "attention: softcap must be a real number or None, got str"),
    (True, TypeError, "attention: softcap must be a real number or None, got bool"),
    (1j, TypeError, "attention: softcap must be a real number or None, got complex"),
])
def test_softcap_must_be_positive_and_finite(xp, softcap, error, message):
    q, k, v = qkv(xp)
    with raises(error, message):
        cupyflash.attention(q, k, v, softcap=softcap)


def test_softcap_accepts_any_real_number():
    q, k, v = qkv(np)
    expected = cupyflash.attention(q, k, v, softcap=30.0)
    for softcap in (30, np.float32(30), np.int64(30)):
        assert cupyflash.attention(q, k, v, softcap=softcap).tobytes() == expected.tobytes()


@pytest.mark.parametrize("batch, shape", [
    ((2, 3), (2,)),        # (B,) against (B, H): slopes align with the last batch dims
    ((2, 3), (4,)),
    ((2, 3), (1, 2, 3)),   # more dimensions than the batch
    ((), (1,)),            # an unbatched problem takes only a single () slope
    ((2, 3), (3, 1)),
])
def test_alibi_slopes_must_broadcast_to_the_batch(xp, batch, shape):
    q, k, v = qkv(xp, batch=batch)
    with raises(ValueError, f"attention: alibi_slopes of shape {shape} must broadcast to the "
                            f"batch shape {batch} (one slope per batch element)"):
        cupyflash.attention(q, k, v, alibi_slopes=to_xp(xp, np.ones(shape, np.float32)))


def test_alibi_slopes_must_be_float(xp):
    q, k, v = qkv(xp, batch=(2, 3))
    with raises(TypeError, "attention: alibi_slopes must have a float dtype (float16, "
                           "bfloat16, float32, float64), got int64"):
        cupyflash.attention(q, k, v, alibi_slopes=to_xp(xp, np.array([1, 2, 3])))


@pytest.mark.parametrize("shape", [(), (3,), (1, 3), (2, 3), (2, 1)])
def test_alibi_slope_shapes_that_broadcast(shape):
    """For q of shape (B, H, Lq, D) = (2, 3, ...): one slope, per head, per (batch, head)
    and per batch element; a Python float is a () slope."""
    q, k, v = qkv(np, batch=(2, 3))
    slopes = np.linspace(0.1, 0.6, math.prod(shape)).reshape(shape)
    out, lse = cupyflash.attention(q, k, v, alibi_slopes=slopes, return_lse=True)
    check_attention(out, lse, q, k, v, causal=False, scale=None, alibi_slopes=slopes)
    if not shape:
        assert cupyflash.attention(q, k, v, alibi_slopes=float(slopes)).tobytes() \
            == out.tobytes()


def test_out_must_not_overlap_bias():
    q, k, v = qkv(np, batch=())
    buf = np.zeros((4, 6), np.float32)
    with raises(ValueError, "attention: out must not overlap the input bias"):
        cupyflash.attention(q, k, v, bias=buf, out=buf[:, :5])


@pytest.mark.parametrize("options", [
    dict(bias=np.zeros((2, 4, 6), np.float16)),
    dict(mask=np.ones((6,), bool)),
    dict(window=(1, 1)),
    dict(alibi_slopes=np.ones(2)),
    dict(softcap=10.0),
    dict(bias=np.full((4, 6), -np.inf), mask=np.zeros((2, 1, 6), bool), window=(0, 0),
         alibi_slopes=np.ones(2), softcap=1.0, causal=True),
    dict(bias=np.zeros((4, 6), np.int32)),
    dict(mask=np.ones((4, 6), np.float32)),
    dict(window=(-2, 0)),
    dict(softcap=0.0),
])
def test_inputs_and_options_are_never_modified(options):
    q, k, v = qkv(np, dtype=np.float16)
    arrays = [q, k, v] + [x for x in options.values() if isinstance(x, np.ndarray)]
    before = snapshot(arrays)
    try:
        cupyflash.attention(q, k, v, **options)
    except (TypeError, ValueError):
        pass
    assert snapshot(arrays) == before


def merge_args(xp, K=2, dtype=np.float32):
    rng = np.random.default_rng(1)
    return (to_xp(xp, rng.standard_normal((K, 3, 4)).astype(dtype)),
            to_xp(xp, rng.standard_normal((K, 3)).astype(np.float32)))


def test_merge_validation(xp):
    outs, lses = merge_args(xp)
    with raises(ValueError, "merge_attention: outs and lses must hold at least one part "
                            "each, got 0 and 0"):
        cupyflash.merge_attention([], [])
    with raises(ValueError, "merge_attention: outs has 2 parts but lses has 1"):
        cupyflash.merge_attention(outs, lses[:1])
    with raises(ValueError, "merge_attention: lses[0] must have shape (3,) (the parts of outs "
                            "without their last dimension), got (4,)"):
        cupyflash.merge_attention(outs, xp.zeros((2, 4), dtype=np.float32))
    with raises(ValueError, "merge_attention: outs[1] has shape (3, 5) but outs[0] has "
                            "(3, 4); every part must have one shape"):
        cupyflash.merge_attention([outs[0], xp.zeros((3, 5), np.float32)], lses)
    with raises(TypeError, "merge_attention: outs must share one dtype; got outs[0] float32, "
                           "outs[1] float16"):
        cupyflash.merge_attention([outs[0], outs[1].astype(np.float16)], lses)
    with raises(TypeError, "merge_attention: lses[1] must have dtype float32 or float64, "
                           "got float16"):
        cupyflash.merge_attention(outs, [lses[0], lses[1].astype(np.float16)])
    with raises(TypeError, "merge_attention: outs[0] has unsupported dtype int32"):
        cupyflash.merge_attention(xp.zeros((2, 3, 4), np.int32), lses)
    with raises(ValueError, "merge_attention: outs must be a sequence of arrays or an array "
                            "stacked along a leading axis, got a 0-dimensional array"):
        cupyflash.merge_attention(xp.zeros(()), lses)
    with raises(ValueError, "merge_attention: outs[0] must have at least 1 dimension "
                            "(..., Lq, Dv), got shape ()"):
        cupyflash.merge_attention(xp.zeros((2,), np.float32), xp.zeros((2,), np.float32))


def test_merge_accepts_bfloat16_and_float64():
    rng = np.random.default_rng(2)
    for dtype, lse_t in ((ml_dtypes.bfloat16, np.float32), (np.float64, np.float64)):
        outs = rng.standard_normal((3, 2, 4)).astype(dtype)
        out, lse = cupyflash.merge_attention(outs, np.zeros((3, 2), np.float32))
        assert out.dtype == dtype and lse.dtype == lse_t
        np.testing.assert_allclose(out.astype(np.float64),
                                   outs.astype(np.float64).mean(axis=0), rtol=1e-2, atol=1e-2)


@gpu_only
def test_merge_does_not_mix_numpy_and_cupy():
    import cupy
    outs, lses = merge_args(np)
    with raises(TypeError, "merge_attention: arrays must be all NumPy or all CuPy arrays"):
        cupyflash.merge_attention(cupy.asarray(outs), lses)


# ----------------------------------------------------------------------------------------
# the GPU kernels (flash_fwd_mma_variants, flash_fwd_simt_variants)
# ----------------------------------------------------------------------------------------

def attend_on_gpu(q, k, v, scale, options, *, causal=False):
    """``(out, lse)`` of cupyflash.attention on CuPy copies of the NumPy inputs, as NumPy
    arrays: out starts as NaN (a row the kernel skips shows), and no input may change."""
    import cupy
    gpu = {n: cupy.asarray(x) if isinstance(x, np.ndarray) else x for n, x in options.items()}
    arrays = [cupy.asarray(x) for x in (q, k, v)]
    watched = arrays + [x for x in gpu.values() if isinstance(x, cupy.ndarray)]
    before = [x.get().tobytes() for x in watched]
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    out = cupy.full(batch + (q.shape[-2], v.shape[-1]), np.nan, dtype=q.dtype)
    result, lse = cupyflash.attention(*arrays, causal=causal, scale=scale, return_lse=True,
                                      out=out, **gpu)
    assert result is out
    assert [x.get().tobytes() for x in watched] == before, "attention modified an input"
    return to_numpy(result), to_numpy(lse)


def check_case_on_gpu(vc):
    q, k, v, scale, options = vc.inputs()
    out, lse = attend_on_gpu(q, k, v, scale, options, causal=vc.case.causal)
    check_attention(out, lse, q, k, v, causal=vc.case.causal, scale=scale, **options)


# Cases the GPU's tiles make interesting: the tile edges of the variant kernels (128 and 64
# query rows, 128, 64 and 32 keys), windows that skip most key blocks, padding masks and
# biases read with stride 0, bias dtypes the kernel converts (float64 on fp16, fp16 on
# bf16), head dims 1..256, broadcast batch dims.
GPU_EXAMPLES = [
    VariantCase(AttentionCase("float16", Lq=129, Lk=257, D=64, Dv=64, seed=11),
                window=(70, 0)),
    VariantCase(AttentionCase("bfloat16", Lq=1000, Lk=1100, D=128, Dv=128, seed=12),
                window=(100, 20), softcap=30.0),
    VariantCase(AttentionCase("float16", Lq=300, Lk=300, D=128, Dv=64, causal=True,
                              q_batch=(2, 4), k_batch=(2, 1), v_batch=(2, 1), seed=13),
                mask_kind="padding", mask_shape=(2, 1, 1, 300), slopes_shape=(4,),
                slopes_max=1.0),
    VariantCase(AttentionCase("bfloat16", Lq=65, Lk=190, D=256, Dv=256, seed=14),
                bias_kind="random", bias_shape=(65, 190), bias_dtype="float16",
                bias_scale=10.0),
    VariantCase(AttentionCase("float16", Lq=200, Lk=130, D=32, Dv=32, seed=15),
                bias_kind="padding", bias_shape=(130,), bias_dtype="float64"),
    VariantCase(AttentionCase("float16", Lq=160, Lk=96, D=96, Dv=96, causal=True, seed=16),
                window=(0, 0)),   # the diagonal only; rows 0..63 see no key
    VariantCase(AttentionCase("bfloat16", Lq=64, Lk=512, D=192, Dv=192, seed=17),
                mask_kind="blocky", mask_shape=(64, 512), softcap=5.0),
    VariantCase(AttentionCase("float32", Lq=130, Lk=200, D=128, Dv=128, causal=True, seed=18),
                window=(33, None), bias_kind="random", bias_shape=(130, 200),
                bias_dtype="bfloat16"),
    VariantCase(AttentionCase("float64", Lq=70, Lk=90, D=256, Dv=17, seed=19),
                mask_kind="rows", mask_shape=(70, 90), softcap=2.0, slopes_shape=(),
                slopes_max=0.05),
    VariantCase(AttentionCase("float32", Lq=5, Lk=700, D=3, Dv=3, seed=20), window=(None, 0)),
    # a padding mask alone: key blocks it keeps whole take the plain path (the warp checks
    # the block's mask bytes), the others the per-score path
    VariantCase(AttentionCase("float16", Lq=200, Lk=700, D=64, Dv=64, q_batch=(3, 2),
                              k_batch=(3, 2), v_batch=(3, 2), seed=22),
                mask_kind="padding", mask_shape=(3, 1, 1, 700)),
    VariantCase(AttentionCase("bfloat16", Lq=130, Lk=530, D=128, Dv=128, causal=True,
                              q_batch=(2,), k_batch=(2,), v_batch=(2,), seed=23),
                mask_kind="padding", mask_shape=(2, 1, 530)),
]


def _gpu_examples(test):
    for vc in GPU_EXAMPLES:
        test = example(vc=vc)(test)
    return test


@gpu_only
@examples(100)
@given(vc=variant_cases())
@_gpu_examples
def test_variants_match_reference_on_gpu(vc):
    check_case_on_gpu(vc)


@gpu_only
@examples(30)
@given(vc=variant_cases(options=(), required=("window",), max_len=MAX_LEN))
def test_windows_on_gpu(vc):
    check_case_on_gpu(vc)


@gpu_only
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("causal", [False, True])
def test_padding_masks_skip_their_padding_on_gpu(dtype, causal):
    """A (B, 1, 1, Lk) mask: the kernels stop at one past its last kept key
    (mask_key_end), including keeping nothing (zeros, lse = -inf), a single key, keys
    around the 64- and 128-key block edges, and everything; keys kept after a gap count,
    and a gap at the start (the kernels read no mask byte before the first hidden key)."""
    rng = np.random.default_rng()
    Lq, Lk, D = 150, 700, 128
    ends = [0, 1, 127, 128, 129, 300, 700]
    q = rng.standard_normal((len(ends), 2, Lq, D)).astype(_np_dtype(dtype))
    k = rng.standard_normal((len(ends), 2, Lk, D)).astype(_np_dtype(dtype))
    v = rng.standard_normal((len(ends), 2, Lk, D)).astype(_np_dtype(dtype))
    mask = np.arange(Lk) < np.array(ends)[:, None, None, None]   # (B, 1, 1, Lk)
    mask[5, ..., 200:260] = False                                 # a gap before the end
    mask[6, ..., 650] = False
    mask[4, ..., 0:3] = False                                     # a gap at the start
    out, lse = attend_on_gpu(q, k, v, None, {"mask": mask}, causal=causal)
    check_attention(out, lse, q, k, v, causal=causal, scale=None, mask=mask)
    assert not np.isnan(out.astype(np.float32)).any()


def _np_dtype(name):
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


@gpu_only
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_variants_on_gpu_are_bitwise_repeatable(dtype):
    vc = VariantCase(AttentionCase(dtype, Lq=333, Lk=444, D=64, Dv=64, causal=True, seed=21),
                     window=(100, None), bias_kind="random", bias_shape=(333, 444),
                     bias_dtype="float32", mask_kind="random", mask_shape=(333, 444),
                     slopes_shape=(), softcap=20.0)
    q, k, v, scale, options = vc.inputs()
    first = attend_on_gpu(q, k, v, scale, options, causal=True)
    second = attend_on_gpu(q, k, v, scale, options, causal=True)
    for a, b in zip(first, second):
        assert a.tobytes() == b.tobytes()


@gpu_only
def test_neutral_variants_take_the_plain_kernel_on_gpu():
    """window=(None, None) is no window: the result is bitwise the plain kernel's."""
    import cupy
    q, k, v = qkv(cupy)
    assert (cupyflash.attention(q, k, v, window=(None, None)).tobytes()
            == cupyflash.attention(q, k, v).tobytes())


@gpu_only
def test_numpy_bias_with_cupy_inputs_is_rejected():
    import cupy
    q, k, v = qkv(cupy)
    with raises(TypeError, "attention: arrays must be all NumPy or all CuPy arrays"):
        cupyflash.attention(q, k, v, bias=np.zeros((4, 6), np.float32))
