"""softmax, log_softmax and logsumexp against the reference, on both backends.

The accuracy rule and the truth (float64, or long double for float64 inputs) are in
``accuracy.py``; the drawn cases in ``strategies.py``.
"""

import re

import numpy as np
import pytest
from hypothesis import example, given

import cupyflash
from accuracy import DTYPES, check_softmax_family
from backends import to_numpy, to_xp
from strategies import SoftmaxCase, softmax_cases

KINDS = ["softmax", "log_softmax", "logsumexp"]
ALL_DTYPES = pytest.mark.parametrize("dtype", list(DTYPES))


def run(xp, kind, x, **options):
    """``cupyflash.<kind>`` on an ``xp`` copy of NumPy x; the result back as NumPy.

    Also asserts that x was left bit for bit as it was.
    """
    x_x = to_xp(xp, x)
    result = getattr(cupyflash, kind)(x_x, **options)
    # An array of x's kind (NumPy, like its own reductions, may give a scalar for 0-d).
    zero_d_scalar = isinstance(result, np.generic) and xp is np
    assert type(result) is type(x_x) or zero_d_scalar, f"{kind} returned {type(result)}"
    assert to_numpy(x_x).tobytes() == x.tobytes(), f"{kind} modified x"
    return to_numpy(result)


def reduced_shape(shape, axis):
    axes = range(len(shape)) if axis is None else (axis if isinstance(axis, tuple) else (axis,))
    reduced = {a % len(shape) for a in axes}
    return tuple(n for i, n in enumerate(shape) if i not in reduced)


# A log_softmax beyond float16's range rounds to -inf (the truth is rounded the same way).
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
@pytest.mark.parametrize("kind", KINDS)
@given(case=softmax_cases())
@example(case=SoftmaxCase("float32", shape=(3, 1025), axis=-1, magnitude=1e4))
@example(case=SoftmaxCase("float64", shape=(2, 3, 4), axis=(0, -1), magnitude=1e300))
@example(case=SoftmaxCase("float16", shape=(257, 3), axis=0, special="neg_inf_slices"))
@example(case=SoftmaxCase("bfloat16", shape=(5, 33), axis=None, magnitude=1e30,
                          special="pos_inf"))
@example(case=SoftmaxCase("float32", shape=(4, 0, 3), axis=1))
@example(case=SoftmaxCase("float64", shape=(), axis=None, special="nan"))
@example(case=SoftmaxCase("float32", shape=(3, 4), axis=()))
@example(case=SoftmaxCase("float32", shape=(4, 64), axis=-1, offset=1e30))  # near-ties
@example(case=SoftmaxCase("float16", shape=(4, 64), axis=-1, offset=1e4))   # exact ties
# Rows past one block: on an H100 the cluster kernel (one cluster of 8 blocks per row) for
# 16-byte multiples up to 256k float32 / 128k float64 elements, else the split-row kernels.
@example(case=SoftmaxCase("float32", shape=(17, 262144), axis=-1))
@example(case=SoftmaxCase("bfloat16", shape=(20, 70000), axis=-1, magnitude=30.0))
@example(case=SoftmaxCase("float64", shape=(18, 40000), axis=-1, special="neg_inf_slices"))
@example(case=SoftmaxCase("float32", shape=(2, 100003), axis=-1))
@example(case=SoftmaxCase("float32", shape=(1, 300000), axis=-1))
def test_matches_reference(xp, kind, case):
    x = case.x()
    got = run(xp, kind, x, axis=case.axis)
    expected_shape = reduced_shape(x.shape, case.axis) if kind == "logsumexp" else x.shape
    assert got.shape == expected_shape
    check_softmax_family(got, x, case.axis, kind)


@ALL_DTYPES
def test_slices_of_only_minus_inf(xp, dtype):
    x = np.array([[-np.inf, -np.inf, -np.inf], [0.0, -np.inf, 1.0]]).astype(DTYPES[dtype])
    sm = run(xp, "softmax", x)
    lsm = run(xp, "log_softmax", x)
    lse = run(xp, "logsumexp", x)
    assert np.all(sm[0] == 0) and np.all(np.isneginf(lsm[0])) and np.isneginf(lse[0])
    assert not np.isnan(sm).any() and not np.isnan(lsm).any() and not np.isnan(lse).any()
    assert sm[1, 1] == 0 and np.isneginf(lsm[1, 1])
    for kind, got in (("softmax", sm), ("log_softmax", lsm), ("logsumexp", lse)):
        check_softmax_family(got, x, -1, kind)


@ALL_DTYPES
def test_plus_inf_as_documented(xp, dtype):
    """softmax: NaN at the +inf entries and 0 elsewhere; logsumexp: +inf."""
    x = np.array([[np.inf, 1.0, -np.inf, np.inf], [0.0, 0.0, 0.0, 0.0]]).astype(DTYPES[dtype])
    sm = run(xp, "softmax", x)
    assert np.array_equal(np.isnan(sm[0]), [True, False, False, True])
    assert sm[0, 1] == 0 and sm[0, 2] == 0
    np.testing.assert_array_equal(sm[1].astype(np.float64), 0.25)
    lse = run(xp, "logsumexp", x)
    assert np.isposinf(lse[0])
    lsm = run(xp, "log_softmax", x)
    for kind, got in (("softmax", sm), ("log_softmax", lsm), ("logsumexp", lse)):
        check_softmax_family(got, x, -1, kind)


@ALL_DTYPES
@pytest.mark.parametrize("kind", KINDS)
def test_nan_gives_nan_in_its_slice_only(xp, dtype, kind):
    x = np.array([[0.0, np.nan, 1.0], [0.0, 2.0, 1.0]]).astype(DTYPES[dtype])
    got = run(xp, kind, x).astype(np.float64)
    assert np.all(np.isnan(got[0])) and not np.isnan(got[1]).any()
    check_softmax_family(got.astype(x.dtype), x, -1, kind)


# log_softmax(-6e4) next to 6e4 is -1.2e5, beyond float16: -inf is the rounded answer
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
@pytest.mark.parametrize("dtype, big", [("float16", 6e4), ("bfloat16", 1e38), ("float32", 1e4),
                                        ("float32", 3e38), ("float64", 1e4),
                                        ("float64", 1e308)])
def test_huge_values(xp, dtype, big):
    x = np.array([[big, big, -big], [-big, -big, -big], [big, 0.0, 0.0]]).astype(DTYPES[dtype])
    sm = run(xp, "softmax", x).astype(np.float64)
    np.testing.assert_array_equal(sm[0], [0.5, 0.5, 0.0])
    np.testing.assert_array_equal(sm[2], [1.0, 0.0, 0.0])
    lse = run(xp, "logsumexp", x).astype(np.float64)
    assert np.all(np.isfinite(lse))
    for kind in KINDS:
        check_softmax_family(run(xp, kind, x), x, -1, kind)


def test_logsumexp_keeps_log_2_at_1e4():
    """The docstring's example: float64 keeps the log(2) that a shift-free sum would lose."""
    assert float(cupyflash.logsumexp(np.array([1e4, 1e4]))) == 1e4 + np.log(2)


@ALL_DTYPES
@pytest.mark.parametrize("kind", KINDS)
def test_dtype_is_preserved(xp, dtype, kind):
    x = np.linspace(-3, 3, 24).reshape(2, 3, 4).astype(DTYPES[dtype])
    got = run(xp, kind, x, axis=1)
    assert got.dtype == DTYPES[dtype]
    assert got.shape == ((2, 4) if kind == "logsumexp" else (2, 3, 4))


@pytest.mark.parametrize("kind", KINDS)
def test_equivalent_axis_arguments_agree_exactly(xp, kind):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    for same in ([2, -1, (2,), (-1,)], [(0, 2), (2, 0), (-3, -1)], [None, (0, 1, 2), (2, -2, 0)]):
        results = [run(xp, kind, x, axis=a).tobytes() for a in same]
        assert results.count(results[0]) == len(results), same


@pytest.mark.parametrize("kind", KINDS)
def test_empty_slices(xp, kind):
    x = np.zeros((3, 0), dtype=np.float32)
    got = run(xp, kind, x)
    if kind == "logsumexp":
        assert got.shape == (3,) and np.all(np.isneginf(got))
    else:
        assert got.shape == (3, 0)
    assert run(xp, kind, np.zeros((0, 4), dtype=np.float32)).shape == (
        (0,) if kind == "logsumexp" else (0, 4))


def test_array_likes():
    np.testing.assert_allclose(cupyflash.softmax([0.0, np.log(3.0)]), [0.25, 0.75], rtol=1e-15)
    assert cupyflash.logsumexp([[0.0, 0.0]]).dtype == np.float64


# ----------------------------------------------------------------------------------------
# bad arguments
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis, message", [
    (3, "axis 3 is out of bounds for an array of dimension 3"),
    (-4, "axis -4 is out of bounds for an array of dimension 3"),
    ((0, 5), "axis 5 is out of bounds for an array of dimension 3"),
    ((0, -3), "axis (0, -3) repeats an axis"),
    ((1, 1), "axis (1, 1) repeats an axis"),
])
def test_bad_axis_values(xp, kind, axis, message):
    x = to_xp(xp, np.zeros((2, 3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="^" + re.escape(f"{kind}: {message}")):
        getattr(cupyflash, kind)(x, axis=axis)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis", [1.0, True, "0", [0], (0, 1.5), (np.bool_(True),)])
def test_bad_axis_types(xp, kind, axis):
    x = to_xp(xp, np.zeros((2, 3, 4), dtype=np.float32))
    with pytest.raises(TypeError, match="^" + re.escape(
            f"{kind}: axis must be an int, a tuple of ints or None, got {axis!r}")):
        getattr(cupyflash, kind)(x, axis=axis)


@pytest.mark.parametrize("kind", KINDS)
def test_numpy_integer_axes_are_fine(xp, kind):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert run(xp, kind, x, axis=np.int64(1)).tobytes() == run(xp, kind, x, axis=1).tobytes()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.complex128, np.uint16])
def test_unsupported_dtypes(xp, kind, dtype):
    x = to_xp(xp, np.ones((2, 3), dtype=dtype))
    with pytest.raises(TypeError, match="^" + re.escape(
            f"{kind}: x has unsupported dtype {np.dtype(dtype).name}; "
            f"expected one of float16, bfloat16, float32, float64")):
        getattr(cupyflash, kind)(x)

