"""cupyflash.attention_backward and attention_vjp against the float64 reference.

Every property test takes the ``xp`` fixture, so the same functions run on the NumPy
backend and, where a CUDA device exists, on the CuPy backend (``pytest -m gpu``). The
backward under test is always given the forward's own out and lse, computed by
cupyflash.attention on the same backend; the truth and the naive same-dtype computation
start again from dout, q, k, v. The accuracy rule is in ``accuracy.py``
(:func:`~accuracy.check_attention_backward`).
"""

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

import cupyflash
from accuracy import (DTYPES, _finite_abs_max, check_attention_backward,
                      true_attention_backward, unit_roundoff)
from backends import HAS_GPU, to_numpy, to_xp
from cupyflash import _api, _numpy_backend, reference
from strategies import PROFILE, AttentionCase, attention_cases

ALL_DTYPES = pytest.mark.parametrize("dtype", list(DTYPES))

# The CPU suite runs this file in well under a minute on two cores: few examples and short
# sequences here; the gpu profile goes past the GPU's tiles (64, 128) and head dims.
EXAMPLES = {"cupyflash": 100, "thorough": 500, "gpu": 200}.get(PROFILE, 100)
MAX_LEN = {"cupyflash": 160, "thorough": 300, "gpu": 600}.get(PROFILE, 160)
MAX_HEAD_DIM = {"cupyflash": 128, "thorough": 256, "gpu": 256}.get(PROFILE, 128)
MAX_WORK = {"cupyflash": 2 * 10**6, "thorough": 10**7, "gpu": 3 * 10**7}.get(PROFILE, 2 * 10**6)

# No -inf keys: an infinite entry of k makes dq NaN (0 * inf), documented. The backward's
# -inf scores come from the causal mask.
backward_cases = attention_cases(neg_inf=st.just("none"), max_len=MAX_LEN,
                                 max_head_dim=MAX_HEAD_DIM, max_work=MAX_WORK)
DOUT_SCALES = st.sampled_from([1.0, 1e-3, 1e3])

# Largest |gradient| drawn for float16 (65504 is its largest finite value): beyond it the
# naive float16 computation overflows and the test would be judging the test.
FLOAT16_GRADIENT_MAX = 2e4


def assume_float16_range(ok):
    """Discard a Hypothesis draw whose float16 gradients leave FLOAT16_GRADIENT_MAX; in a
    test that is not a Hypothesis test (fixed examples), fail instead: such an example
    must be chosen inside the range (assume would not discard it there)."""
    if currently_in_test_context():
        assume(ok)
    else:
        assert ok, "a fixed example whose float16 gradients leave float16's range"


def draw_dout(case, dout_scale):
    """dout of out's shape, N(0, dout_scale^2) rounded to the dtype (its own seed)."""
    if case.dtype == "float16":  # keep dP = dO v^T within float16
        dout_scale = min(dout_scale, 1.0 / case.v_scale)
    rng = np.random.default_rng(case.seed + 1)
    shape = case.batch_shape + (case.Lq, case.Dv)
    return (rng.standard_normal(shape) * dout_scale).astype(DTYPES[case.dtype])


def run_backward(xp, dout, q, k, v, *, causal=False, scale=None, deterministic=False,
                 **grads):
    """cupyflash.attention then attention_backward on ``xp`` copies of NumPy inputs, the
    backward given the forward's own out and lse; ``(dq, dk, dv)`` back as NumPy.

    Also asserts that neither call changed any of its inputs.
    """
    dout_x, q_x, k_x, v_x = to_xp(xp, dout, q, k, v)
    out, lse = cupyflash.attention(q_x, k_x, v_x, causal=causal, scale=scale, return_lse=True)
    out_before, lse_before = to_numpy(out), to_numpy(lse)
    result = cupyflash.attention_backward(dout_x, q_x, k_x, v_x, out, lse, causal=causal,
                                          scale=scale, deterministic=deterministic, **grads)
    for name, before, after in (("dout", dout, dout_x), ("q", q, q_x), ("k", k, k_x),
                                ("v", v, v_x), ("out", out_before, out),
                                ("lse", lse_before, lse)):
        assert to_numpy(after).tobytes() == before.tobytes(), \
            f"attention_backward modified {name}"
    return tuple(to_numpy(g) for g in result)


def check_case(dq, dk, dv, dout, q, k, v, case, scale):
    if case.dtype == "float16":
        truth = true_attention_backward(dout, q, k, v, causal=case.causal, scale=scale)
        assume_float16_range(max(_finite_abs_max(g) for g in truth) < FLOAT16_GRADIENT_MAX)
    check_attention_backward(dq, dk, dv, dout, q, k, v, causal=case.causal, scale=scale)


# ----------------------------------------------------------------------------------------
# accuracy
# ----------------------------------------------------------------------------------------

@settings(max_examples=EXAMPLES)
@given(case=backward_cases, dout_scale=DOUT_SCALES, deterministic=st.booleans())
@example(case=AttentionCase("float16", Lq=37, Lk=53, D=59, Dv=59, seed=1),
         dout_scale=1.0, deterministic=False)
@example(case=AttentionCase("bfloat16", Lq=53, Lk=37, D=24, Dv=16, causal=True,
                            logit_max=50.0, seed=2), dout_scale=1.0, deterministic=True)
@example(case=AttentionCase("float32", Lq=1, Lk=1, D=1, Dv=1, seed=3),
         dout_scale=1.0, deterministic=False)
@example(case=AttentionCase("float32", Lq=65, Lk=63, D=64, Dv=32, q_batch=(2, 2, 3),
                            k_batch=(2, 2, 1), v_batch=(2, 2, 1), causal=True,
                            logit_max=1e3, seed=4), dout_scale=1e3, deterministic=False)
@example(case=AttentionCase("float64", Lq=70, Lk=3, D=3, Dv=5, q_batch=(1, 3),
                            k_batch=(2, 1), v_batch=(3,), causal=True, seed=5),
         dout_scale=1e-3, deterministic=True)
@example(case=AttentionCase("float16", Lq=2, Lk=80, D=8, Dv=8, q_batch=(3,), k_batch=(1,),
                            v_batch=(3,), logit_max=1e4, negative_scale=True, seed=6),
         dout_scale=1.0, deterministic=False)
@example(case=AttentionCase("float16", Lq=1, Lk=2, D=32, Dv=8, q_batch=(1,), k_batch=(),
                            v_batch=(3,), logit_max=1e-3, seed=0),
         dout_scale=1e-3, deterministic=False)  # subnormal float16 shares of a broadcast dk
def test_matches_reference(xp, case, dout_scale, deterministic):
    q, k, v, scale = case.inputs()
    dout = draw_dout(case, dout_scale)
    dq, dk, dv = run_backward(xp, dout, q, k, v, causal=case.causal, scale=scale,
                              deterministic=deterministic)
    check_case(dq, dk, dv, dout, q, k, v, case, scale)


BLOCKS = st.sampled_from([1, 2, 3, 7, 16, 32])


@settings(max_examples=EXAMPLES)
@given(case=attention_cases(neg_inf=st.just("none"), max_len=64, max_head_dim=32,
                            max_work=2 * 10**5),
       dout_scale=DOUT_SCALES, block_m=BLOCKS, block_n=BLOCKS)
@example(case=AttentionCase("float32", Lq=40, Lk=23, D=8, Dv=8, causal=True, seed=7),
         dout_scale=1.0, block_m=7, block_n=16)
@example(case=AttentionCase("float64", Lq=23, Lk=40, D=8, Dv=4, causal=True, seed=8),
         dout_scale=1.0, block_m=16, block_n=7)
def test_numpy_small_blocks_match_reference(case, dout_scale, block_m, block_n):
    """The NumPy backend's loops with small BLOCK_M and BLOCK_N, so that short sequences
    cross many blocks: causal block skipping, the diagonal blocks, the dQ accumulation
    across key blocks and the chunking of the batch are all exercised."""
    q, k, v, scale = case.inputs()
    dout = draw_dout(case, dout_scale)
    problem = _api.validate_attention("attention", q, k, v, case.causal, scale)
    out, lse = _numpy_backend.attention_forward(q, k, v, problem, block_m=block_m,
                                                block_n=block_n)
    dq, dk, dv = _numpy_backend.attention_backward(dout, q, k, v, out, lse, problem,
                                                   block_m=block_m, block_n=block_n)
    check_case(dq, dk, dv, dout, q, k, v, case, scale)


def test_numpy_chunks_of_the_batch(monkeypatch):
    """A chunk of one batch element at a time gives bitwise what one chunk for all does."""
    rng = np.random.default_rng(9)
    q = rng.standard_normal((3, 2, 20, 8)).astype(np.float32)
    k = rng.standard_normal((3, 1, 30, 8)).astype(np.float32)
    v = rng.standard_normal((1, 30, 4)).astype(np.float32)
    dout = rng.standard_normal((3, 2, 20, 4)).astype(np.float32)
    expected = run_backward(np, dout, q, k, v, causal=True)
    monkeypatch.setattr(_numpy_backend, "CHUNK_BYTES", 1)
    got = run_backward(np, dout, q, k, v, causal=True)
    for g, e in zip(got, expected):
        assert g.tobytes() == e.tobytes()
    check_attention_backward(*got, dout, q, k, v, causal=True, scale=None)


# ----------------------------------------------------------------------------------------
# finite differences (float64, NumPy)
# ----------------------------------------------------------------------------------------

def finite_difference_gradients(loss, arrays, h=1e-6):
    """Central differences ``(loss(x + h e) - loss(x - h e)) / 2h`` for every entry."""
    grads = []
    for a in arrays:
        g = np.empty_like(a)
        for i in np.ndindex(a.shape):
            saved = a[i]
            a[i] = saved + h
            up = loss()
            a[i] = saved - h
            down = loss()
            a[i] = saved
            g[i] = (up - down) / (2 * h)
        grads.append(g)
    return grads


def assert_gradients_are_the_derivative(grads, dout, q, k, v, *, causal, options):
    """float64 ``grads`` (dq, dk, dv[, dbias]) of sum(dout * attention(q, k, v, causal,
    **options)): equal to its central differences (rtol 1e-6) and to
    cupyflash.reference.attention_backward (rtol 1e-12)."""
    def loss():
        return float(np.sum(dout * cupyflash.attention(q, k, v, causal=causal, **options)))

    inputs = (q, k, v) + ((options["bias"],) if "bias" in options else ())
    for name, got, fd in zip(("dq", "dk", "dv", "dbias"), grads,
                             finite_difference_gradients(loss, inputs)):
        np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-8, err_msg=name)
    expected = reference.attention_backward(dout, q, k, v, causal=causal,
                                            return_dbias="bias" in options, **options)
    for got, e in zip(grads, expected):
        np.testing.assert_allclose(got, e, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("shapes, causal, scale", [
    (((4, 3), (5, 3), (5, 2)), False, None),
    (((6, 3), (4, 3), (4, 2)), True, 0.7),                        # Lq > Lk: rows see nothing
    (((2, 3, 4), (1, 5, 4), (2, 5, 3)), True, None),              # broadcast k
    (((1, 4, 2), (3, 1, 4, 2), (4, 3)), False, -1.3),             # broadcast q and v
])
def test_numpy_gradients_match_finite_differences(shapes, causal, scale):
    """The float64 NumPy path is the derivative of sum(dout * attention(q, k, v))."""
    rng = np.random.default_rng(10)
    q, k, v = (rng.standard_normal(s) for s in shapes)
    out = cupyflash.attention(q, k, v, causal=causal, scale=scale)
    dout = rng.standard_normal(out.shape)
    dq, dk, dv = run_backward(np, dout, q, k, v, causal=causal, scale=scale)

    def loss():
        return float(np.sum(dout * cupyflash.attention(q, k, v, causal=causal, scale=scale)))

    for name, got, fd in zip(("dq", "dk", "dv"), (dq, dk, dv),
                             finite_difference_gradients(loss, (q, k, v))):
        np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-8, err_msg=name)


# ----------------------------------------------------------------------------------------
# rows that see no key, sizes
# ----------------------------------------------------------------------------------------

@ALL_DTYPES
def test_causal_queries_that_see_no_key_get_zero_gradients(xp, dtype):
    """Lq > Lk with causal: queries 0 .. Lq - Lk - 1 see no key (their lse is -inf). Their
    dq rows are exactly zero, they add nothing to dk and dv, and nothing is NaN."""
    rng = np.random.default_rng(11)
    Lq, Lk = 150, 40
    q, k, v, dout = (rng.standard_normal(s).astype(DTYPES[dtype])
                     for s in ((2, Lq, 16), (2, Lk, 16), (2, Lk, 8), (2, Lq, 8)))
    dq, dk, dv = run_backward(xp, dout, q, k, v, causal=True, deterministic=True)
    for g in (dq, dk, dv):
        assert not np.isnan(g.astype(np.float64)).any()
    assert np.all(dq[:, :Lq - Lk] == 0)
    # The blind rows' dout does not matter at all.
    dout_2 = dout.copy()
    dout_2[:, :Lq - Lk] = rng.standard_normal((2, Lq - Lk, 8)).astype(DTYPES[dtype]) * 100
    dq_2, dk_2, dv_2 = run_backward(xp, dout_2, q, k, v, causal=True, deterministic=True)
    for g, g_2 in ((dq, dq_2), (dk, dk_2), (dv, dv_2)):
        assert g.tobytes() == g_2.tobytes()
    check_attention_backward(dq, dk, dv, dout, q, k, v, causal=True, scale=None)


@ALL_DTYPES
@pytest.mark.parametrize("q_shape, k_shape, v_shape", [
    ((2, 0, 8), (2, 5, 8), (2, 5, 4)),    # Lq = 0: dk = dv = 0
    ((2, 3, 8), (2, 0, 8), (2, 0, 4)),    # Lk = 0: dq = 0
    ((0, 3, 8), (1, 5, 8), (1, 5, 4)),    # an empty batch: the broadcast k, v get zeros
    ((2, 3, 8), (2, 5, 8), (2, 5, 0)),    # Dv = 0: dout is empty, every gradient is 0
    ((300, 8), (0, 8), (0, 3)),           # Lk = 0 over more than one query block
])
@pytest.mark.parametrize("causal", [False, True])
def test_zero_sizes(xp, dtype, q_shape, k_shape, v_shape, causal):
    rng = np.random.default_rng(12)
    q, k, v = (rng.standard_normal(s).astype(DTYPES[dtype]) for s in (q_shape, k_shape, v_shape))
    batch = np.broadcast_shapes(q_shape[:-2], k_shape[:-2], v_shape[:-2])
    dout = rng.standard_normal(batch + (q_shape[-2], v_shape[-1])).astype(DTYPES[dtype])
    dq, dk, dv = run_backward(xp, dout, q, k, v, causal=causal)
    for g, x in ((dq, q), (dk, k), (dv, v)):
        assert g.shape == x.shape and g.dtype == x.dtype
    if min(q_shape[-2], k_shape[-2], v_shape[-1]) == 0 or 0 in batch:
        assert all(np.all(g == 0) for g in (dq, dk, dv))
    check_attention_backward(dq, dk, dv, dout, q, k, v, causal=causal, scale=None)


def test_two_dimensional_inputs_and_array_likes():
    """Unbatched lists become float64 arrays, as in attention."""
    q = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    k = [[1.0, 0.0], [0.0, 1.0]]
    v = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    out, lse = cupyflash.attention(q, k, v, scale=1.0, return_lse=True)
    dout = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    grads = cupyflash.attention_backward(dout, q, k, v, out.tolist(), lse.tolist(), scale=1.0)
    for g, e in zip(grads, reference.attention_backward(dout, q, k, v, scale=1.0)):
        assert isinstance(g, np.ndarray) and g.dtype == np.float64
        np.testing.assert_allclose(g, e, rtol=1e-13, atol=1e-15)


# ----------------------------------------------------------------------------------------
# broadcasting: grouped-query attention
# ----------------------------------------------------------------------------------------

@ALL_DTYPES
def test_grouped_query_gradients_are_sums_over_the_group(xp, dtype):
    """q (B, Hkv, G, L, D) with k, v (B, Hkv, 1, L, D): dk and dv have k's and v's shapes
    and equal the gradients of k and v repeated G times, summed over the group; dq is the
    same as with the repeated k and v."""
    rng = np.random.default_rng(13)
    B, Hkv, G, Lq, Lk, D = 2, 2, 3, 40, 50, 16
    q = rng.standard_normal((B, Hkv, G, Lq, D)).astype(DTYPES[dtype])
    k = rng.standard_normal((B, Hkv, 1, Lk, D)).astype(DTYPES[dtype])
    v = rng.standard_normal((B, Hkv, 1, Lk, D)).astype(DTYPES[dtype])
    dout = rng.standard_normal((B, Hkv, G, Lq, D)).astype(DTYPES[dtype])
    dq, dk, dv = run_backward(xp, dout, q, k, v, causal=True, deterministic=True)
    assert dk.shape == k.shape and dv.shape == v.shape
    k_rep, v_rep = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    dq_rep, dk_rep, dv_rep = run_backward(xp, dout, q, k_rep, v_rep, causal=True,
                                          deterministic=True)
    # The repeated gradients are rounded to the dtype before this sum, the grouped ones
    # after it (and the GPU may sum in another order): a few roundings per group member.
    tol = 4 * (G + 1) * unit_roundoff(dtype)
    np.testing.assert_allclose(dq.astype(np.float64), dq_rep.astype(np.float64), rtol=0,
                               atol=tol * np.abs(dq_rep.astype(np.float64)).max())
    for name, got, rep in (("dk", dk, dk_rep), ("dv", dv, dv_rep)):
        rep = rep.astype(np.float64)
        np.testing.assert_allclose(got.astype(np.float64), rep.sum(axis=2, keepdims=True),
                                   rtol=0, atol=tol * np.abs(rep).max(), err_msg=name)
    check_attention_backward(dq, dk, dv, dout, q, k, v, causal=True, scale=None)


@ALL_DTYPES
def test_broadcast_to_views_and_broadcast_queries(xp, dtype):
    """Stride-0 k, v from broadcast_to get gradients of the view's shape (one per batch
    element); a q of batch 1 against three sets of keys gets the sum over the three."""
    rng = np.random.default_rng(14)
    q = rng.standard_normal((1, 33, 16)).astype(DTYPES[dtype])
    k = rng.standard_normal((1, 45, 16)).astype(DTYPES[dtype])
    v = rng.standard_normal((3, 45, 8)).astype(DTYPES[dtype])
    dout = rng.standard_normal((3, 33, 8)).astype(DTYPES[dtype])
    k_b = xp.broadcast_to(to_xp(xp, k), (3, 45, 16))
    q_x, v_x, dout_x = to_xp(xp, q, v, dout)
    out, lse = cupyflash.attention(q_x, k_b, v_x, return_lse=True)
    dq, dk, dv = (to_numpy(g) for g in cupyflash.attention_backward(dout_x, q_x, k_b, v_x,
                                                                     out, lse))
    assert dq.shape == (1, 33, 16) and dk.shape == (3, 45, 16) and dv.shape == (3, 45, 8)
    check_attention_backward(dq, dk, dv, dout, q, np.broadcast_to(k, (3, 45, 16)), v,
                             causal=False, scale=None)


# ----------------------------------------------------------------------------------------
# strides, preallocated outputs
# ----------------------------------------------------------------------------------------

@ALL_DTYPES
@pytest.mark.parametrize("layout", ["BLHD", "fortran"])
def test_strided_inputs_give_the_contiguous_result(xp, dtype, layout):
    """(B, L, H, D) storage seen as (B, H, L, D), or Fortran order, for q, k, v, dout and
    out: the gradients are bit for bit those of contiguous inputs."""
    rng = np.random.default_rng(15)
    B, H, Lq, Lk, D = 2, 3, 37, 45, 16

    def stored(shape_bhld):
        b, h, length, d = shape_bhld
        if layout == "BLHD":
            return xp.empty((b, length, h, d), dtype=DTYPES[dtype]).swapaxes(1, 2)
        return xp.asfortranarray(xp.empty(shape_bhld, dtype=DTYPES[dtype]))

    q_x, k_x, v_x, dout_x = (stored((B, H, L, D)) for L in (Lq, Lk, Lk, Lq))
    for x in (q_x, k_x, v_x, dout_x):
        x[...] = to_xp(xp, rng.standard_normal(x.shape).astype(DTYPES[dtype]))
    out, lse = cupyflash.attention(q_x, k_x, v_x, causal=True, return_lse=True)
    out_t = stored((B, H, Lq, D))
    out_t[...] = out
    grads = cupyflash.attention_backward(dout_x, q_x, k_x, v_x, out_t, lse, causal=True,
                                         deterministic=True)
    q, k, v, dout = (np.ascontiguousarray(to_numpy(x)) for x in (q_x, k_x, v_x, dout_x))
    expected = run_backward(xp, dout, q, k, v, causal=True, deterministic=True)
    for g, e in zip(grads, expected):
        assert to_numpy(g).tobytes() == e.tobytes()


@ALL_DTYPES
@pytest.mark.parametrize("given", ["all", "dk", "dq_dv"])
def test_preallocated_gradients_are_written_and_returned(xp, dtype, given):
    rng = np.random.default_rng(16)
    B, H, Lq, Lk, D, Dv = 2, 3, 30, 41, 16, 12
    q, k, v, dout = (rng.standard_normal(s).astype(DTYPES[dtype])
                     for s in ((B, H, Lq, D), (B, 1, Lk, D), (B, 1, Lk, Dv), (B, H, Lq, Dv)))
    sentinel = 7.0
    # every preallocated gradient is a view with gaps: every other row of a wider buffer
    bufs = {name: to_xp(xp, np.full(x.shape[:-2] + (2 * x.shape[-2], x.shape[-1] + 3),
                                    sentinel).astype(DTYPES[dtype]))
            for name, x in (("dq", q), ("dk", k), ("dv", v))}
    views = {name: b[..., ::2, 1:-2] for name, b in bufs.items()}
    names = {"all": ("dq", "dk", "dv"), "dk": ("dk",), "dq_dv": ("dq", "dv")}[given]
    grads = run_backward(xp, dout, q, k, v, causal=True, deterministic=True,
                         **{n: views[n] for n in names})
    expected = run_backward(xp, dout, q, k, v, causal=True, deterministic=True)
    for name, g, e in zip(("dq", "dk", "dv"), grads, expected):
        assert g.tobytes() == e.tobytes(), name
        if name in names:
            assert to_numpy(views[name]).tobytes() == e.tobytes(), name
            untouched = np.ones(bufs[name].shape, dtype=bool)
            untouched[..., ::2, 1:-2] = False
            assert np.all(to_numpy(bufs[name]).astype(np.float64)[untouched] == sentinel)
    # the returned objects are the given arrays
    dout_x, q_x, k_x, v_x = to_xp(xp, dout, q, k, v)
    out, lse = cupyflash.attention(q_x, k_x, v_x, return_lse=True)
    result = cupyflash.attention_backward(dout_x, q_x, k_x, v_x, out, lse,
                                          **{n: views[n] for n in names})
    for name, r in zip(("dq", "dk", "dv"), result):
        assert (r is views[name]) == (name in names)


def test_lse_in_float64_for_float32_inputs(xp):
    """lse may be float32 or float64 whatever the inputs' dtype."""
    rng = np.random.default_rng(17)
    q, k, v, dout = (rng.standard_normal((2, 20, 8)).astype(np.float32) for _ in range(4))
    q_x, k_x, v_x, dout_x = to_xp(xp, q, k, v, dout)
    out, lse = cupyflash.attention(q_x, k_x, v_x, causal=True, return_lse=True)
    grads = cupyflash.attention_backward(dout_x, q_x, k_x, v_x, out, lse.astype(np.float64),
                                         causal=True)
    check_attention_backward(*(to_numpy(g) for g in grads), dout, q, k, v, causal=True,
                             scale=None)


# ----------------------------------------------------------------------------------------
# attention_vjp
# ----------------------------------------------------------------------------------------

@ALL_DTYPES
@pytest.mark.parametrize("causal, scale", [(False, None), (True, 0.3)])
def test_vjp_is_attention_then_attention_backward(xp, dtype, causal, scale):
    rng = np.random.default_rng(18)
    q, k, v = (rng.standard_normal(s).astype(DTYPES[dtype])
               for s in ((2, 3, 25, 16), (2, 1, 31, 16), (2, 1, 31, 8)))
    dout = rng.standard_normal((2, 3, 25, 8)).astype(DTYPES[dtype])
    q_x, k_x, v_x, dout_x = to_xp(xp, q, k, v, dout)
    out, vjp = cupyflash.attention_vjp(q_x, k_x, v_x, causal=causal, scale=scale,
                                       deterministic=True)
    expected_out, lse = cupyflash.attention(q_x, k_x, v_x, causal=causal, scale=scale,
                                            return_lse=True)
    assert to_numpy(out).tobytes() == to_numpy(expected_out).tobytes()
    expected = cupyflash.attention_backward(dout_x, q_x, k_x, v_x, expected_out, lse,
                                            causal=causal, scale=scale, deterministic=True)
    for _ in range(2):  # vjp may be called again
        for g, e in zip(vjp(dout_x), expected):
            assert type(g) is type(e) and to_numpy(g).tobytes() == to_numpy(e).tobytes()


# ----------------------------------------------------------------------------------------
# determinism (GPU), and the rule itself
# ----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@ALL_DTYPES
@pytest.mark.parametrize("causal", [False, True])
def test_deterministic_gradients_are_bitwise_reproducible_on_the_gpu(dtype, causal):
    """deterministic=True: two runs on fresh, identical inputs give bitwise equal dq, dk, dv
    (grouped-query shapes, so that dk and dv are sums over the group)."""
    import cupy
    rng = np.random.default_rng(19)
    q, k, v = (rng.standard_normal(s).astype(DTYPES[dtype])
               for s in ((2, 2, 3, 300, 64), (2, 2, 1, 257, 64), (2, 2, 1, 257, 64)))
    dout = rng.standard_normal((2, 2, 3, 300, 64)).astype(DTYPES[dtype])
    runs = []
    for _ in range(2):
        dout_x, q_x, k_x, v_x = (cupy.asarray(x) for x in (dout, q, k, v))
        out, lse = cupyflash.attention(q_x, k_x, v_x, causal=causal, return_lse=True)
        grads = cupyflash.attention_backward(dout_x, q_x, k_x, v_x, out, lse, causal=causal,
                                             deterministic=True)
        runs.append([g.get().tobytes() for g in grads])
    assert runs[0] == runs[1]
    check_attention_backward(*(np.frombuffer(b, dtype=DTYPES[dtype]).reshape(x.shape)
                               for b, x in zip(runs[0], (q, k, v))),
                             dout, q, k, v, causal=causal, scale=None)


def test_accuracy_rule_can_fail():
    """The rule is not vacuous: float32 gradients off by a relative 1e-4, and a single
    NaN, are each caught."""
    rng = np.random.default_rng(20)
    q, k, v, dout = (rng.standard_normal((64, 32)).astype(np.float32) for _ in range(4))
    dq, dk, dv = run_backward(np, dout, q, k, v)
    check_attention_backward(dq, dk, dv, dout, q, k, v, causal=False, scale=None)
    for name in ("dq", "dk", "dv"):
        grads = {"dq": dq, "dk": dk, "dv": dv}
        grads[name] = grads[name] * np.float32(1 + 1e-4)
        with pytest.raises(AssertionError, match=f"{name}: .got - truth."):
            check_attention_backward(*grads.values(), dout, q, k, v, causal=False, scale=None)
    bad = dk.copy()
    bad[3, 1] = np.nan
    with pytest.raises(AssertionError, match="NaN"):
        check_attention_backward(dq, bad, dv, dout, q, k, v, causal=False, scale=None)
