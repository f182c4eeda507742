"""Every bad call raises before any work, with a message that names the function, the
argument, what was expected and what came; no call ever changes its inputs.

Validation lives in ``cupyflash._api`` and runs for both backends, so these tests take the
``xp`` fixture too (CuPy arrays differ only for ``out``: no read-only arrays, and overlap
is judged by memory bounds).
"""

import re
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest

import cupyflash
from backends import HAS_GPU, to_numpy, to_xp


def arrays(xp, *shapes, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(to_xp(xp, rng.standard_normal(s).astype(dtype)) for s in shapes)


def snapshot(*arrays):
    return [to_numpy(a).tobytes() for a in arrays]


def raises(error, message):
    """``pytest.raises`` matching the whole message literally from its start."""
    return pytest.raises(error, match="^" + re.escape(message))


# ----------------------------------------------------------------------------------------
# attention: shapes
# ----------------------------------------------------------------------------------------

def test_head_dims_of_q_and_k_must_match(xp):
    q, k, v = arrays(xp, (2, 10, 59), (2, 12, 64), (2, 12, 64))
    with raises(ValueError, "attention: q.shape[-1] (59) must equal k.shape[-1] (64)"):
        cupyflash.attention(q, k, v)


def test_key_lengths_of_k_and_v_must_match(xp):
    q, k, v = arrays(xp, (2, 10, 16), (2, 12, 16), (2, 13, 16))
    with raises(ValueError, "attention: k.shape[-2] (12) must equal v.shape[-2] (13)"):
        cupyflash.attention(q, k, v)


@pytest.mark.parametrize("name, shapes", [
    ("q", ((16,), (12, 16), (12, 16))),
    ("k", ((10, 16), (16,), (12, 16))),
    ("v", ((10, 16), (12, 16), (16,))),
    ("q", ((), (12, 16), (12, 16))),
])
def test_arrays_need_two_dimensions(xp, name, shapes):
    q, k, v = arrays(xp, *shapes)
    shape = dict(zip("qkv", shapes))[name]
    with raises(ValueError, f"attention: {name} must have at least 2 dimensions (..., L, D), "
                            f"got shape {shape}"):
        cupyflash.attention(q, k, v)


def test_head_dim_zero_is_rejected(xp):
    q, k, v = arrays(xp, (3, 0), (4, 0), (4, 5))
    with raises(ValueError, "attention: the head dimension q.shape[-1] must be at least 1"):
        cupyflash.attention(q, k, v)


@pytest.mark.parametrize("shapes", [
    ((2, 10, 16), (3, 12, 16), (3, 12, 16)),
    ((2, 3, 10, 16), (2, 1, 12, 16), (3, 2, 12, 16)),
    ((4, 10, 16), (4, 12, 16), (2, 12, 16)),
])
def test_batch_dimensions_must_broadcast(xp, shapes):
    q, k, v = arrays(xp, *shapes)
    batches = [tuple(s[:-2]) for s in shapes]
    with raises(ValueError, f"attention: the batch dimensions of q {batches[0]}, k {batches[1]} "
                            f"and v {batches[2]} do not broadcast"):
        cupyflash.attention(q, k, v)


# ----------------------------------------------------------------------------------------
# attention: dtypes
# ----------------------------------------------------------------------------------------

def test_dtypes_must_match(xp):
    q, = arrays(xp, (4, 8), dtype=np.float32)
    k, = arrays(xp, (5, 8), dtype=np.float16)
    v, = arrays(xp, (5, 8), dtype=np.float32)
    with raises(TypeError, "attention: q, k, v must share one dtype; "
                           "got q float32, k float16, v float32"):
        cupyflash.attention(q, k, v)


def test_bfloat16_and_float16_do_not_mix(xp):
    q, k = arrays(xp, (4, 8), (5, 8), dtype=np.float16)
    v, = arrays(xp, (5, 8), dtype=ml_dtypes.bfloat16)
    with raises(TypeError, "attention: q, k, v must share one dtype; "
                           "got q float16, k float16, v bfloat16"):
        cupyflash.attention(q, k, v)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_,
                                   np.complex64, np.complex128])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_unsupported_dtypes(xp, dtype, which):
    inputs = dict(zip("qkv", arrays(xp, (4, 8), (5, 8), (5, 8))))
    inputs[which] = to_xp(xp, np.ones((4, 8) if which == "q" else (5, 8), dtype=dtype))
    name = np.dtype(dtype).name
    with raises(TypeError, f"attention: {which} has unsupported dtype {name}; expected one of "
                           f"float16, bfloat16, float32, float64"):
        cupyflash.attention(inputs["q"], inputs["k"], inputs["v"])


def test_python_integers_are_an_unsupported_dtype():
    with raises(TypeError, "attention: q has unsupported dtype int64"):
        cupyflash.attention([[1, 2]], [[1, 2]], [[1, 2]])


def test_ragged_lists_are_rejected():
    with raises(TypeError, "attention: k could not be converted to an array"):
        cupyflash.attention([[1.0, 2.0]], [[1.0, 2.0], [1.0]], [[1.0]])


# ----------------------------------------------------------------------------------------
# attention: options
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [float("inf"), float("-inf"), float("nan"), np.float32("nan")])
def test_scale_must_be_finite(xp, scale):
    q, k, v = arrays(xp, (4, 8), (5, 8), (5, 8))
    with raises(ValueError, f"attention: scale must be finite, got {float(scale)}"):
        cupyflash.attention(q, k, v, scale=scale)


@pytest.mark.parametrize("scale", [1j, complex(1, 0), np.complex64(1), "0.5", True,
                                   np.bool_(False), np.array(0.5), [0.5]])
def test_scale_must_be_a_real_number(xp, scale):
    q, k, v = arrays(xp, (4, 8), (5, 8), (5, 8))
    with raises(TypeError, f"attention: scale must be a real number or None, "
                           f"got {type(scale).__name__}"):
        cupyflash.attention(q, k, v, scale=scale)


@pytest.mark.parametrize("scale", [2, np.int32(2), np.float16(2), Fraction(2), 2.0, -2.0, 0])
def test_scale_accepts_any_real_number(xp, scale):
    q, k, v = arrays(xp, (4, 8), (5, 8), (5, 8))
    out = to_numpy(cupyflash.attention(q, k, v, scale=scale))
    expected = to_numpy(cupyflash.attention(q, k, v, scale=float(scale)))
    assert out.tobytes() == expected.tobytes()


@pytest.mark.parametrize("causal", [1, 0, "yes", None, 1.0, np.int64(1)])
def test_causal_must_be_a_bool(xp, causal):
    q, k, v = arrays(xp, (4, 8), (5, 8), (5, 8))
    with raises(TypeError, f"attention: causal must be a bool, got {type(causal).__name__}"):
        cupyflash.attention(q, k, v, causal=causal)


@pytest.mark.parametrize("return_lse", [1, 0, "no", None])
def test_return_lse_must_be_a_bool(xp, return_lse):
    q, k, v = arrays(xp, (4, 8), (5, 8), (5, 8))
    with raises(TypeError, f"attention: return_lse must be a bool, "
                           f"got {type(return_lse).__name__}"):
        cupyflash.attention(q, k, v, return_lse=return_lse)


def test_options_are_keyword_only(xp):
    q, k, v = arrays(xp, (4, 8), (5, 8), (5, 8))
    with pytest.raises(TypeError):
        cupyflash.attention(q, k, v, True)


# ----------------------------------------------------------------------------------------
# attention: out
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 4, 7), (2, 5, 6), (4, 6), (1, 2, 4, 6), (2, 6, 4)])
def test_out_shape(xp, shape):
    q, k, v = arrays(xp, (2, 4, 8), (2, 5, 8), (2, 5, 6))
    out = xp.zeros(shape, dtype=np.float32)
    before = snapshot(out)
    with raises(ValueError, f"attention: out must have shape (2, 4, 6), got {shape}"):
        cupyflash.attention(q, k, v, out=out)
    assert snapshot(out) == before


@pytest.mark.parametrize("dtype", [np.float64, np.float16, ml_dtypes.bfloat16, np.int32])
def test_out_dtype(xp, dtype):
    q, k, v = arrays(xp, (4, 8), (5, 8), (5, 6))
    out = to_xp(xp, np.zeros((4, 6), dtype=dtype))
    with raises(TypeError, f"attention: out must have dtype float32, "
                           f"got {np.dtype(dtype).name}"):
        cupyflash.attention(q, k, v, out=out)


def test_out_type_numpy():
    q, k, v = arrays(np, (4, 8), (5, 8), (5, 6))
    with raises(TypeError, "attention: out must be a numpy.ndarray like the inputs, got list"):
        cupyflash.attention(q, k, v, out=np.zeros((4, 6), np.float32).tolist())


@pytest.mark.parametrize("which", ["q", "k", "v", "q_view"])
def test_out_must_not_overlap_an_input(xp, which):
    rng = np.random.default_rng(1)
    buf = to_xp(xp, rng.standard_normal((3, 6, 8)).astype(np.float32))
    q, k, v = buf[0], buf[1], buf[2]  # Lq = Lk = 6, D = Dv = 8: out has the shape of each
    out = {"q": q, "k": k, "v": v, "q_view": buf[0:2].reshape(12, 8)[1:7]}[which]
    name = "q" if which == "q_view" else which
    before = snapshot(buf)
    with raises(ValueError, f"attention: out must not overlap the input {name}"):
        cupyflash.attention(q, k, v, out=out)
    assert snapshot(buf) == before


def test_out_must_be_writeable():
    q, k, v = arrays(np, (4, 8), (5, 8), (5, 6))
    out = np.zeros((4, 6), np.float32)
    out.flags.writeable = False
    with raises(ValueError, "attention: out is read-only"):
        cupyflash.attention(q, k, v, out=out)
    broadcast = np.broadcast_to(np.zeros(6, np.float32), (4, 6))
    with raises(ValueError, "attention: out is read-only"):
        cupyflash.attention(q, k, v, out=broadcast)


def test_out_next_to_an_input_is_fine():
    """Adjacent, not overlapping: halves of one buffer."""
    rng = np.random.default_rng(2)
    buf = rng.standard_normal((2, 6, 8)).astype(np.float32)
    q = buf[0]
    out = buf[1]
    result = cupyflash.attention(q, q, q, out=out)
    assert result is out
    np.testing.assert_array_equal(out, cupyflash.attention(buf[0], buf[0], buf[0]))


# ----------------------------------------------------------------------------------------
# array types
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("gpu_arg", ["q", "k", "v"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_numpy_and_cupy_arrays_do_not_mix(gpu_arg):
    import cupy
    inputs = dict(zip("qkv", arrays(np, (4, 8), (5, 8), (5, 8))))
    inputs[gpu_arg] = cupy.asarray(inputs[gpu_arg])
    with raises(TypeError, "attention: arrays must be all NumPy or all CuPy arrays"):
        cupyflash.attention(inputs["q"], inputs["k"], inputs["v"])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_numpy_out_for_cupy_inputs_is_rejected():
    import cupy
    q, k, v = arrays(cupy, (4, 8), (5, 8), (5, 6))
    with raises(TypeError, "attention: out must be a cupy.ndarray like the inputs, got ndarray"):
        cupyflash.attention(q, k, v, out=np.zeros((4, 6), np.float32))


def test_cupy_like_out_for_numpy_inputs_is_rejected(xp):
    """An out of the other array type: a cupy array on the GPU run, a memoryview here."""
    q, k, v = arrays(np, (4, 8), (5, 8), (5, 6))
    out = (to_xp(xp, np.zeros((4, 6), np.float32)) if xp is not np
           else memoryview(np.zeros((4, 6), np.float32)))
    with raises(TypeError, "attention: out must be a numpy.ndarray like the inputs, got "):
        cupyflash.attention(q, k, v, out=out)


# ----------------------------------------------------------------------------------------
# inputs are never modified
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, valid", [
    (dict(), True),
    (dict(causal=True), True),
    (dict(return_lse=True), True),
    (dict(scale=-3.0, causal=True), True),
    (dict(scale=float("nan")), False),
    (dict(causal="yes"), False),
    (dict(return_lse=1), False),
    (dict(out="wrong"), False),
])
def test_inputs_are_never_modified(xp, options, valid):
    q, k, v = arrays(xp, (2, 40, 24), (2, 50, 24), (2, 50, 16), dtype=np.float16, seed=3)
    before = snapshot(q, k, v)
    if valid:
        cupyflash.attention(q, k, v, **options)
    else:
        with pytest.raises((TypeError, ValueError)):
            cupyflash.attention(q, k, v, **options)
    assert snapshot(q, k, v) == before
