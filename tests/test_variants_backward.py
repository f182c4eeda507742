"""Gradients through the variants of attention (bias, mask, window, alibi_slopes, softcap)
on the NumPy backend, against the float64 reference.

The backward under test is given the forward's own out and lse, computed by
cupyflash.attention with the same options; the truth and the naive same-dtype computation
start again from dout, q, k, v and the options. The accuracy rule is
:func:`accuracy.check_attention_backward`, with the variants applied to the truth and the
naive computation, and ``dbias`` judged like the other gradients. The properties run on the
NumPy backend, and under the ``gpu`` marker on the CuPy kernels for bias, mask, window,
ALiBi and softcap (``*_on_gpu``), dbias included.
"""

import re

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import cupyflash
from accuracy import (DTYPES, _finite_abs_max, check_attention_backward, dbias_term_sums,
                      true_attention_backward)
from backends import requires_gpu
from cupyflash import _api, _numpy_backend
from strategies import AttentionCase, VariantCase, examples, variant_cases
from test_backward import (FLOAT16_GRADIENT_MAX, assert_gradients_are_the_derivative,
                           assume_float16_range, draw_dout)

# See test_attention.py: OpenBLAS flags 0 * -inf on padding lanes; no NaN reaches a result.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")

ALL_DTYPES = pytest.mark.parametrize("dtype", list(DTYPES))


# Short sequences and small blocks: the full-matrix truth, the naive computation and the
# floors are all O(Lq Lk) per batch element on the host.
MAX_LEN, MAX_HEAD_DIM, MAX_WORK = 80, 32, 2 * 10**5
SMALL_BLOCKS = st.sampled_from([(2, 3), (3, 2), (7, 16), (16, 7), (33, 32)])


def cases(**kwargs):
    """Variant cases without -inf keys (an infinite k makes dq NaN, documented)."""
    return variant_cases(neg_inf=st.just("none"), max_len=MAX_LEN,
                         max_head_dim=MAX_HEAD_DIM, max_work=MAX_WORK, **kwargs)


def snapshot(arrays):
    return [a.tobytes() for a in arrays if isinstance(a, np.ndarray)]


def gradients(dout, q, k, v, scale, options, *, causal=False, blocks=None,
              return_dbias=None):
    """The forward's ``(out, lse)``, then the gradients of cupyflash.attention_backward
    (or of the NumPy backend with ``blocks = (BLOCK_M, BLOCK_N)``), with dbias whenever a
    bias is given (``return_dbias=None``). Asserts that no input was changed."""
    if return_dbias is None:
        return_dbias = options.get("bias") is not None
    arrays = [dout, q, k, v] + list(options.values())
    before = snapshot(arrays)
    out, lse = cupyflash.attention(q, k, v, causal=causal, scale=scale, return_lse=True,
                                   **options)
    if blocks is None:
        grads = cupyflash.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                             scale=scale, return_dbias=return_dbias,
                                             **options)
    else:
        problem = _api.validate_attention("attention_backward", q, k, v, causal, scale)
        _api.validate_variants("attention_backward", problem, options.get("bias"),
                               options.get("mask"), options.get("window"),
                               options.get("alibi_slopes"), options.get("softcap"))
        grads = _numpy_backend.attention_backward(
            dout, q, k, v, out, lse, problem, block_m=blocks[0], block_n=blocks[1],
            bias=options.get("bias"), mask=options.get("mask"),
            alibi_slopes=options.get("alibi_slopes"), return_dbias=return_dbias)
    assert snapshot(arrays) == before, "attention_backward modified an input"
    return grads


def check_case(vc, dout_scale=1.0, blocks=None):
    q, k, v, scale, options = vc.inputs()
    dout = draw_dout(vc.case, dout_scale)
    grads = gradients(dout, q, k, v, scale, options, causal=vc.case.causal, blocks=blocks)
    check_variant_gradients(vc, grads, dout, q, k, v, scale, options)


def check_variant_gradients(vc, grads, dout, q, k, v, scale, options):
    """``grads`` (dq, dk, dv[, dbias]) of the case ``vc`` against the accuracy rule."""
    dbias = grads[3] if len(grads) == 4 else None
    # float16 gradients (or dbias of a float16 bias) must stay far from 65504, or the
    # naive float16 computation overflows and the test would be judging the test
    halves = [vc.case.dtype == "float16"] * 3 + [vc.bias_dtype == "float16"]
    if any(halves[:len(grads)]):
        truth = list(true_attention_backward(dout, q, k, v, causal=vc.case.causal,
                                             scale=scale, return_dbias=dbias is not None,
                                             **options))
        if dbias is not None:  # (its terms, not only their sum, must stay in range)
            truth[3] = dbias_term_sums(dout, q, k, v, causal=vc.case.causal, scale=scale,
                                       **options)
        assume_float16_range(all(_finite_abs_max(g) < FLOAT16_GRADIENT_MAX
                                 for g, half in zip(truth, halves) if half))
    check_attention_backward(*grads[:3], dout, q, k, v, causal=vc.case.causal, scale=scale,
                             dbias=dbias, **options)


DOUT_SCALES = st.sampled_from([1.0, 1e-3, 1e3])


# ----------------------------------------------------------------------------------------
# accuracy: every variant and their combinations
# ----------------------------------------------------------------------------------------

@examples(120)
@given(vc=cases(), dout_scale=DOUT_SCALES)
@example(vc=VariantCase(AttentionCase("float32", Lq=70, Lk=10, D=8, Dv=8, seed=1),
                        window=(0, 0)), dout_scale=1.0)  # rows 0-59 see no key
@example(vc=VariantCase(AttentionCase("bfloat16", Lq=33, Lk=65, D=16, Dv=8,
                                      q_batch=(2, 3), k_batch=(2, 1), v_batch=(2, 1), seed=2),
                        bias_kind="padding", bias_shape=(2, 1, 1, 65), bias_dtype="float32",
                        mask_kind="rows", mask_shape=(33, 65)), dout_scale=1.0)
@example(vc=VariantCase(AttentionCase("float64", Lq=40, Lk=57, D=16, Dv=16, causal=True,
                                      q_batch=(2, 4), k_batch=(2, 1), v_batch=(2, 1),
                                      logit_max=50.0, seed=3),
                        slopes_shape=(4,), slopes_max=1.0, softcap=5.0), dout_scale=1e-3)
@example(vc=VariantCase(AttentionCase("float16", Lq=20, Lk=45, D=16, Dv=16, logit_max=1e3,
                                      seed=4), softcap=0.5, bias_kind="random",
                        bias_shape=(20, 45), bias_dtype="float16", bias_scale=10.0),
         dout_scale=1.0)
def test_variant_gradients_match_reference(vc, dout_scale):
    check_case(vc, dout_scale)


@examples(120)
@given(vc=cases(), dout_scale=DOUT_SCALES, blocks=SMALL_BLOCKS)
@example(vc=VariantCase(AttentionCase("float32", Lq=40, Lk=70, D=8, Dv=8, causal=True,
                                      seed=5),
                        window=(5, 3), mask_kind="blocky", mask_shape=(40, 70),
                        bias_kind="dense", bias_shape=(1, 70)),
         dout_scale=1.0, blocks=(7, 16))
def test_variant_gradients_with_small_blocks_match_reference(vc, dout_scale, blocks):
    """Small BLOCK_M and BLOCK_N: band edges, skipped query blocks, blocks the mask hides
    and dbias summed across many blocks."""
    check_case(vc, dout_scale, blocks)


@examples(60)
@given(vc=cases(options=("bias", "alibi_slopes", "mask"), required=("softcap",)),
       blocks=st.one_of(st.none(), SMALL_BLOCKS))
def test_softcap_gradients(vc, blocks):
    check_case(vc, blocks=blocks)


@examples(60)
@given(vc=cases(options=("alibi_slopes",), required=("window",),
                causal=st.booleans()),
       blocks=st.one_of(st.none(), SMALL_BLOCKS))
def test_window_gradients(vc, blocks):
    check_case(vc, blocks=blocks)


@examples(60)
@given(vc=cases(options=("mask",), required=("bias",)),
       blocks=st.one_of(st.none(), SMALL_BLOCKS))
def test_bias_gradients(vc, blocks):
    check_case(vc, blocks=blocks)


@examples(40)
@given(vc=cases(options=("window",), required=("alibi_slopes",), causal=st.just(True)),
       blocks=st.one_of(st.none(), SMALL_BLOCKS))
def test_alibi_gradients(vc, blocks):
    check_case(vc, blocks=blocks)


# ----------------------------------------------------------------------------------------
# finite differences (float64)
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, causal", [
    (dict(softcap=0.7), False),
    (dict(softcap=2.0, alibi_slopes=np.array([0.3, -0.2]), window=(2, 1)), True),
    (dict(bias="full"), False),
    (dict(bias="padding", softcap=1.5, mask="random"), True),
])
def test_gradients_match_finite_differences(options, causal):
    """The float64 path is the derivative of sum(dout * attention(q, k, v, bias=bias, ...))
    with respect to q, k, v and bias; softcap's chain rule included."""
    rng = np.random.default_rng(20)
    B, Lq, Lk, D, Dv = 2, 5, 6, 3, 2
    q, k, v = (rng.standard_normal(s) * 1.5 for s in ((B, Lq, D), (B, Lk, D), (B, Lk, Dv)))
    options = dict(options)
    if options.get("bias") == "full":
        options["bias"] = rng.standard_normal((B, Lq, Lk))
    elif options.get("bias") == "padding":
        options["bias"] = rng.standard_normal((B, 1, Lk))
    if options.get("mask") == "random":
        options["mask"] = rng.random((Lq, Lk)) < 0.7
    dout = rng.standard_normal((B, Lq, Dv))
    grads = gradients(dout, q, k, v, None, options, causal=causal)
    assert_gradients_are_the_derivative(grads, dout, q, k, v, causal=causal, options=options)


# ----------------------------------------------------------------------------------------
# rows that see no key; the gradient of a broadcast bias
# ----------------------------------------------------------------------------------------

@ALL_DTYPES
@pytest.mark.parametrize("how", ["mask_rows", "bias_rows", "window", "padding"])
def test_rows_that_keep_no_key_get_zero_gradients(dtype, how):
    """Rows that every key is hidden from (by mask, a -inf bias, the window or a padding
    mask of a whole batch element) have dq rows of exact zeros, add nothing to dk, dv and
    dbias, and nothing is NaN, with and without softcap."""
    rng = np.random.default_rng(21)
    Lq, Lk = 40, 60
    q, k, v, dout = (rng.standard_normal(s).astype(DTYPES[dtype])
                     for s in ((2, Lq, 16), (2, Lk, 16), (2, Lk, 8), (2, Lq, 8)))
    empty = np.zeros((2, Lq), dtype=bool)
    bias = np.zeros((Lq, Lk), dtype=np.float32)
    if how == "mask_rows":
        options = {"mask": np.ones((2, Lq, Lk), dtype=bool)}
        options["mask"][0, 5:20] = False
        empty[0, 5:20] = True
    elif how == "bias_rows":
        bias[::3] = -np.inf
        empty[:, ::3] = True
    elif how == "window":  # Lk = 5: row i sees keys [i - 37, i - 35], rows 0..34 none
        k, v = k[:, :5], v[:, :5]
        bias = bias[:, :5]
        options = {"window": (2, 0)}
        empty[:, :35] = True
    else:  # batch element 1 is all padding
        options = {"mask": np.arange(Lk) < np.array([Lk, 0])[:, None, None]}
        empty[1] = True
    if how == "bias_rows":
        options = {}
    options["bias"] = bias
    for softcap in (None, 5.0):
        opts = dict(options, softcap=softcap) if softcap else options
        for blocks in (None, (16, 7)):
            dq, dk, dv, dbias = gradients(dout, q, k, v, None, opts, blocks=blocks)
            for g in (dq, dk, dv, dbias):
                assert not np.isnan(g.astype(np.float64)).any()
            assert np.all(dq[empty] == 0)
            assert np.all(dbias[empty.all(axis=0)] == 0)  # rows empty in every element
            # the empty rows' dout does not matter at all
            dout_2 = dout.copy()
            dout_2[empty] = 100
            again = gradients(dout_2, q, k, v, None, opts, blocks=blocks)
            for g, g_2 in zip((dq, dk, dv, dbias), again):
                assert g.tobytes() == g_2.tobytes()
            check_attention_backward(dq, dk, dv, dout, q, k, v, causal=False, scale=None,
                                     dbias=dbias, **opts)


@ALL_DTYPES
@pytest.mark.parametrize("blocks", [None, (16, 7)])
def test_dbias_of_a_broadcast_bias_is_the_sum_over_its_broadcast_dimensions(dtype, blocks):
    """A (B, 1, 1, Lk) bias gets a dbias of that shape: the dbias of the same bias
    materialised as (B, H, Lq, Lk), summed over heads and query rows. A shared (Lq, Lk)
    bias and a () bias likewise."""
    rng = np.random.default_rng(22)
    B, H, Lq, Lk = 2, 3, 30, 45
    q, k, v = (rng.standard_normal(s).astype(DTYPES[dtype])
               for s in ((B, H, Lq, 8), (B, H, Lk, 8), (B, H, Lk, 8)))
    dout = rng.standard_normal((B, H, Lq, 8)).astype(DTYPES[dtype])
    full = (B, H, Lq, Lk)
    for shape, axes in (((B, 1, 1, Lk), (1, 2)), ((Lq, Lk), (0, 1)), ((), (0, 1, 2, 3))):
        bias = np.where(rng.random(shape) < 0.9, rng.standard_normal(shape), -np.inf)
        if not shape:
            bias = np.asarray(0.5)
        bias = bias.astype(np.float32)
        *grads, dbias = gradients(dout, q, k, v, None, {"bias": bias}, blocks=blocks)
        assert dbias.shape == shape and dbias.dtype == np.float32
        *grads_full, dbias_full = gradients(dout, q, k, v, None,
                                            {"bias": np.broadcast_to(bias, full).copy()},
                                            blocks=blocks)
        assert dbias_full.shape == full
        expected = dbias_full.astype(np.float64).sum(axis=axes, keepdims=True)
        expected = expected.reshape(shape)
        tol = 1e-5 * np.abs(dbias_full.astype(np.float64)).sum(axis=axes).max() + 1e-30
        np.testing.assert_allclose(dbias.astype(np.float64), expected, rtol=0, atol=tol)
        for g, g_full in zip(grads, grads_full):  # the same scores: the same bits
            assert g.tobytes() == g_full.tobytes()
        check_attention_backward(*grads, dout, q, k, v, causal=False, scale=None,
                                 dbias=dbias, bias=bias)


@ALL_DTYPES
def test_dbias_takes_the_bias_dtype(dtype):
    """dbias has bias's dtype, whatever the inputs' (a float16 bias of float64 inputs)."""
    rng = np.random.default_rng(23)
    q, k, v = (rng.standard_normal((2, 20, 8)).astype(DTYPES[dtype]) for _ in range(3))
    dout = rng.standard_normal((2, 20, 8)).astype(DTYPES[dtype])
    for bias_dtype in ("float16", "float64"):
        bias = rng.standard_normal((20, 20)).astype(bias_dtype)
        *grads, dbias = gradients(dout, q, k, v, None, {"bias": bias})
        assert dbias.dtype == bias.dtype
        check_attention_backward(*grads, dout, q, k, v, causal=False, scale=None,
                                 dbias=dbias, bias=bias)


# ----------------------------------------------------------------------------------------
# attention_vjp
# ----------------------------------------------------------------------------------------

@ALL_DTYPES
@pytest.mark.parametrize("return_dbias", [False, True])
def test_vjp_is_attention_then_attention_backward(dtype, return_dbias):
    rng = np.random.default_rng(24)
    q, k, v = (rng.standard_normal((2, 3, 37, 16)).astype(DTYPES[dtype]) for _ in range(3))
    options = dict(bias=rng.standard_normal((2, 1, 1, 37)).astype(np.float32),
                   mask=rng.random((37, 37)) < 0.9, window=(9, 2),
                   alibi_slopes=np.array([0.5, 0.25, 0.125]), softcap=20.0)
    out, vjp = cupyflash.attention_vjp(q, k, v, causal=True, return_dbias=return_dbias,
                                       **options)
    expected_out, lse = cupyflash.attention(q, k, v, causal=True, return_lse=True, **options)
    assert out.tobytes() == expected_out.tobytes()
    dout = rng.standard_normal(out.shape).astype(DTYPES[dtype])
    got = vjp(dout)
    assert len(got) == (4 if return_dbias else 3)
    expected = cupyflash.attention_backward(dout, q, k, v, out, lse, causal=True,
                                            return_dbias=return_dbias, **options)
    for g, e in zip(got, expected):
        assert g.tobytes() == e.tobytes()
    assert all(g.tobytes() == e.tobytes() for g, e in zip(vjp(dout), got))  # again


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------

def raises(error, message):
    return pytest.raises(error, match="^" + re.escape(message))


def backward_args(dtype=np.float32):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2,) + s).astype(dtype) for s in ((4, 8), (6, 8), (6, 5)))
    out, lse = cupyflash.attention(q, k, v, return_lse=True)
    return (np.ones_like(out), q, k, v, out, lse)


@pytest.mark.parametrize("options, error, message", [
    (dict(bias=np.zeros((4, 6), np.int32)), TypeError,
     "bias must have a float dtype (float16, bfloat16, float32, float64), got int32"),
    (dict(bias=np.zeros((4, 5), np.float32)), ValueError,
     "bias of shape (4, 5) must broadcast to (batch..., Lq, Lk) = (2, 4, 6)"),
    (dict(mask=np.ones((4, 6), np.float32)), TypeError,
     "mask must have dtype bool (True: keep), got float32"),
    (dict(mask=np.ones((3, 4, 6), bool)), ValueError,
     "mask of shape (3, 4, 6) must broadcast to (batch..., Lq, Lk) = (2, 4, 6)"),
    (dict(window=(-1, 0)), ValueError,
     "window left must be >= 0, or None for unbounded, got -1"),
    (dict(window=3), TypeError,
     "window must be None or a pair (left, right) of ints >= 0 or None, got int"),
    (dict(alibi_slopes=np.ones(3)), ValueError,
     "alibi_slopes of shape (3,) must broadcast to the batch shape (2,) "
     "(one slope per batch element)"),
    (dict(softcap=0.0), ValueError, "softcap must be positive and finite, got 0.0"),
    (dict(return_dbias=True), ValueError, "return_dbias=True needs a bias; got bias=None"),
    (dict(return_dbias=True, mask=np.ones((4, 6), bool)), ValueError,
     "return_dbias=True needs a bias; got bias=None"),
    (dict(return_dbias=1, bias=np.zeros((4, 6))), TypeError,
     "return_dbias must be a bool, got int"),
])
def test_backward_and_vjp_validate_the_variants_like_attention(options, error, message):
    dout, q, k, v, out, lse = backward_args()
    arrays = [dout, q, k, v, out, lse] + [x for x in options.values()
                                          if isinstance(x, np.ndarray)]
    before = snapshot(arrays)
    with raises(error, "attention_backward: " + message):
        cupyflash.attention_backward(dout, q, k, v, out, lse, **options)
    with raises(error, "attention_vjp: " + message):
        cupyflash.attention_vjp(q, k, v, **options)
    assert snapshot(arrays) == before


def test_gradients_must_not_overlap_the_bias():
    dout, q, k, v, out, lse = backward_args()
    bias = np.zeros((2, 4, 8), np.float32)
    with raises(ValueError, "attention_backward: dq must not overlap the input bias"):
        cupyflash.attention_backward(dout, q, k, v, out, lse, bias=bias[:, :, :6],
                                     dq=bias)


def gpu_only(test):
    """The ``gpu`` marker, and a skip where there is no CUDA device."""
    for mark in requires_gpu:
        test = mark(test)
    return test


# ----------------------------------------------------------------------------------------
# the GPU kernels (flash_bwd_*_variants): bias, mask, window, ALiBi, softcap
# ----------------------------------------------------------------------------------------

def gradients_on_gpu(dout, q, k, v, scale, options, *, causal, deterministic,
                     with_forward=False, return_dbias=False):
    """The CuPy forward's out and lse, then the CuPy backward's ``(dq, dk, dv)`` as NumPy
    arrays (``[out, lse, dq, dk, dv]`` with ``with_forward``; dbias after them with
    ``return_dbias``); gradients start as NaN (an element the kernels skip shows), no
    input changes."""
    import cupy
    gpu = {n: cupy.asarray(x) if isinstance(x, np.ndarray) else x for n, x in options.items()}
    arrays = [cupy.asarray(x) for x in (dout, q, k, v)]
    watched = arrays + [x for x in gpu.values() if isinstance(x, cupy.ndarray)]
    before = [x.get().tobytes() for x in watched]
    d_out, gq, gk, gv = arrays
    out, lse = cupyflash.attention(gq, gk, gv, causal=causal, scale=scale, return_lse=True,
                                   **gpu)
    grads = [cupy.full(x.shape, np.nan, dtype=x.dtype) for x in (gq, gk, gv)]
    result = cupyflash.attention_backward(d_out, gq, gk, gv, out, lse, causal=causal,
                                          scale=scale, deterministic=deterministic,
                                          dq=grads[0], dk=grads[1], dv=grads[2],
                                          return_dbias=return_dbias, **gpu)
    assert len(result) == 3 + return_dbias and all(r is g for r, g in zip(result, grads))
    if return_dbias:
        dbias = result[3]
        assert isinstance(dbias, cupy.ndarray)
        assert dbias.shape == gpu["bias"].shape and dbias.dtype == gpu["bias"].dtype
        grads.append(dbias)
    assert [x.get().tobytes() for x in watched] == before, "the GPU backward modified an input"
    return [x.get() for x in ((out, lse) if with_forward else ()) + tuple(grads)]


GPU_OPTIONS = ("bias", "mask", "window", "alibi_slopes", "softcap")


def check_case_on_gpu(vc, dout_scale, deterministic):
    """The GPU gradients of the case ``vc`` (dbias whenever it has a bias) against the
    accuracy rule."""
    q, k, v, scale, options = vc.inputs()
    dout = draw_dout(vc.case, dout_scale)
    grads = gradients_on_gpu(dout, q, k, v, scale, options, causal=vc.case.causal,
                             deterministic=deterministic,
                             return_dbias=options.get("bias") is not None)
    check_variant_gradients(vc, grads, dout, q, k, v, scale, options)


# The GPU tiles' edges (64 and 128 query rows, 32..128 keys per block), a window that
# skips most query blocks of a key block, padding masks and biases read with stride 0.
GPU_EXAMPLES = [
    VariantCase(AttentionCase("float16", Lq=129, Lk=200, D=64, Dv=64, neg_inf="none",
                              seed=31), window=(40, 3)),
    VariantCase(AttentionCase("bfloat16", Lq=300, Lk=260, D=128, Dv=128, causal=True,
                              q_batch=(2, 2), k_batch=(2, 1), v_batch=(2, 1), neg_inf="none",
                              seed=32),
                mask_kind="padding", mask_shape=(2, 1, 1, 260), slopes_shape=(2,),
                slopes_max=1.0),
    VariantCase(AttentionCase("float16", Lq=70, Lk=150, D=256, Dv=256, neg_inf="none",
                              seed=33),
                bias_kind="random", bias_shape=(70, 150), bias_dtype="float32"),
    VariantCase(AttentionCase("float32", Lq=100, Lk=90, D=128, Dv=100, neg_inf="none",
                              seed=34),
                window=(None, 0), bias_kind="padding", bias_shape=(90,), bias_dtype="float64"),
    VariantCase(AttentionCase("float64", Lq=50, Lk=70, D=32, Dv=32, causal=True,
                              neg_inf="none", seed=35),
                mask_kind="blocky", mask_shape=(50, 70), window=(10, None)),
    # softcap: on every kernel family and head-dim class of the tables (BLOCK_M 32 at
    # d = 128 and 256, 64 at d = 64), a cap that saturates (0.5 under logits of 30:
    # 1 - tanh^2 ~ 0 for most scores) and caps with bias, ALiBi, mask and window
    VariantCase(AttentionCase("bfloat16", Lq=150, Lk=190, D=128, Dv=128, causal=True,
                              q_batch=(2, 2), k_batch=(2, 1), v_batch=(2, 1), neg_inf="none",
                              seed=37),
                softcap=5.0, slopes_shape=(2,), slopes_max=1.0, bias_kind="padding",
                bias_shape=(2, 1, 1, 190), bias_dtype="float32"),
    VariantCase(AttentionCase("float16", Lq=130, Lk=97, D=64, Dv=64, logit_max=30.0,
                              neg_inf="none", seed=38), softcap=0.5),
    VariantCase(AttentionCase("float16", Lq=65, Lk=140, D=256, Dv=256, neg_inf="none",
                              seed=39),
                softcap=30.0, bias_kind="random", bias_shape=(65, 140), bias_dtype="float16",
                mask_kind="random", mask_shape=(65, 140)),
    VariantCase(AttentionCase("float32", Lq=97, Lk=113, D=64, Dv=59, logit_max=50.0,
                              neg_inf="none", seed=40), softcap=5.0, window=(30, 7)),
    VariantCase(AttentionCase("float64", Lq=60, Lk=45, D=128, Dv=128, causal=True,
                              neg_inf="none", seed=41),
                softcap=0.5, mask_kind="padding", mask_shape=(45,), slopes_shape=(),
                slopes_max=1.0),
]


@gpu_only
@examples(60)
@given(vc=variant_cases(options=GPU_OPTIONS, neg_inf=st.just("none"), max_len=300,
                        max_work=4 * 10**6),
       dout_scale=DOUT_SCALES, deterministic=st.booleans())
def test_variant_gradients_match_reference_on_gpu(vc, dout_scale, deterministic):
    check_case_on_gpu(vc, dout_scale, deterministic)


@gpu_only
@examples(40)
@given(vc=variant_cases(options=("bias", "mask", "window", "alibi_slopes"),
                        required=("softcap",), neg_inf=st.just("none"), max_len=300,
                        max_work=4 * 10**6),
       dout_scale=DOUT_SCALES, deterministic=st.booleans())
def test_softcap_gradients_on_gpu(vc, dout_scale, deterministic):
    check_case_on_gpu(vc, dout_scale, deterministic)


@gpu_only
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("index", range(len(GPU_EXAMPLES)))
def test_variant_gradients_on_gpu_examples(index, deterministic):
    check_case_on_gpu(GPU_EXAMPLES[index], 1.0, deterministic)


@gpu_only
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_deterministic_variant_gradients_on_gpu_are_bitwise_repeatable(dtype, softcap):
    vc = VariantCase(AttentionCase(dtype, Lq=200, Lk=230, D=64, Dv=64, causal=True,
                                   neg_inf="none", seed=36),
                     window=(50, None), bias_kind="random", bias_shape=(200, 230),
                     bias_dtype="float32", mask_kind="random", mask_shape=(200, 230),
                     slopes_shape=(), softcap=softcap)
    q, k, v, scale, options = vc.inputs()
    dout = draw_dout(vc.case, 1.0)
    first, second = (gradients_on_gpu(dout, q, k, v, scale, options, causal=True,
                                      deterministic=True, return_dbias=True)
                     for _ in range(2))
    assert len(first) == 4
    for a, b in zip(first, second):
        assert a.tobytes() == b.tobytes()


@gpu_only
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_dbias_on_gpu_of_every_broadcast(dtype, deterministic):
    """return_dbias on the GPU for biases broadcast every way the kernels sum (atomics,
    or the full array with ``deterministic``): over the batch, the heads, the query rows,
    the keys, all of them; with softcap (dbias is dS before the cap's factor), dropout,
    causal, a window and a mask; float16 and float64 biases of other inputs. d = 96
    runs the d = 128 kernel with variants. Each against the float64 reference, and the
    dbias of a broadcast bias against the sum of the full bias's dbias of the same run;
    deterministic runs are bitwise repeatable."""
    rng = np.random.default_rng()
    batch, Lq, Lk = (2, 3), 150, 170
    for shape, bias_dtype, extra, D in (
            ((2, 3, Lq, Lk), "float32", {}, 64),
            ((Lq, Lk), "float32", {"softcap": 5.0}, 128),
            ((2, 1, 1, Lk), "float32", {"window": (40, 3)}, 96),
            ((Lk,), "float16", {"mask": rng.random((Lq, Lk)) > 0.3}, 64),
            ((3, Lq, 1), "float64", {}, 32),
            ((1, 1, 1, 1), "float32", {"dropout_p": 0.3, "seed": 9}, 64)):
        causal = len(shape) == 3
        q = rng.standard_normal(batch + (Lq, D)).astype(DTYPES[dtype])
        k, v = (rng.standard_normal(batch + (Lk, D)).astype(DTYPES[dtype]) for _ in range(2))
        dout = rng.standard_normal(batch + (Lq, D)).astype(DTYPES[dtype])
        bias = rng.standard_normal(shape).astype(DTYPES[bias_dtype])
        options = dict(extra, bias=bias)
        *grads, dbias = gradients_on_gpu(dout, q, k, v, None, options, causal=causal,
                                         deterministic=deterministic, return_dbias=True)
        if "dropout_p" not in options:
            check_attention_backward(*grads, dout, q, k, v, causal=causal, scale=None,
                                     dbias=dbias, **options)
        full_bias = np.broadcast_to(bias, batch + (Lq, Lk)).copy()
        *_, dbias_full = gradients_on_gpu(dout, q, k, v, None, dict(options, bias=full_bias),
                                          causal=causal, deterministic=deterministic,
                                          return_dbias=True)
        axes = tuple(i for i, (n, m) in enumerate(zip((1,) * (4 - len(shape)) + shape,
                                                      full_bias.shape)) if n != m)
        expected = dbias_full.astype(np.float64).sum(axis=axes).reshape(shape)
        tol = 1e-5 * np.abs(dbias_full.astype(np.float64)).sum(axis=axes).max() + 1e-30
        if bias_dtype == "float16":
            tol += 1e-3 * np.abs(expected).max()
        np.testing.assert_allclose(dbias.astype(np.float64), expected, rtol=0, atol=tol)
        if deterministic:
            *_, again = gradients_on_gpu(dout, q, k, v, None, options, causal=causal,
                                         deterministic=True, return_dbias=True)
            assert again.tobytes() == dbias.tobytes()
