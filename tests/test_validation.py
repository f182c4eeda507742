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


# ----------------------------------------------------------------------------------------
# attention_backward and attention_vjp
# ----------------------------------------------------------------------------------------

def backward_args(xp, dtype=np.float32, Lq=4, Lk=5, D=8, Dv=6):
    """A valid ``attention_backward`` call's arguments: dout, q, k, v, out, lse."""
    q, k, v, dout = arrays(xp, (2, Lq, D), (2, Lk, D), (2, Lk, Dv), (2, Lq, Dv), dtype=dtype)
    out, lse = cupyflash.attention(q, k, v, return_lse=True)
    return dict(dout=dout, q=q, k=k, v=v, out=out, lse=lse)


def call_backward(args, **options):
    return cupyflash.attention_backward(args["dout"], args["q"], args["k"], args["v"],
                                        args["out"], args["lse"], **options)


def test_backward_checks_q_k_v_like_attention(xp):
    args = backward_args(xp)
    args["k"], = arrays(xp, (2, 5, 7))
    with raises(ValueError, "attention_backward: q.shape[-1] (8) must equal k.shape[-1] (7)"):
        call_backward(args)
    args = backward_args(xp)
    args["v"], = arrays(xp, (2, 5, 6), dtype=np.float16)
    with raises(TypeError, "attention_backward: q, k, v must share one dtype; "
                           "got q float32, k float32, v float16"):
        call_backward(args)
    with raises(TypeError, "attention_backward: causal must be a bool, got int"):
        call_backward(backward_args(xp), causal=1)
    with raises(ValueError, "attention_backward: scale must be finite, got nan"):
        call_backward(backward_args(xp), scale=float("nan"))


@pytest.mark.parametrize("name", ["dout", "out"])
@pytest.mark.parametrize("shape", [(2, 4, 5), (2, 5, 6), (4, 6), (1, 2, 4, 6)])
def test_backward_dout_and_out_shape(xp, name, shape):
    args = backward_args(xp)
    args[name], = arrays(xp, shape)
    with raises(ValueError, f"attention_backward: {name} must have shape (2, 4, 6) "
                            f"(broadcast batch..., Lq, Dv), got {shape}"):
        call_backward(args)


@pytest.mark.parametrize("name", ["dout", "out"])
@pytest.mark.parametrize("dtype", [np.float16, np.float64, ml_dtypes.bfloat16, np.int32])
def test_backward_dout_and_out_dtype(xp, name, dtype):
    args = backward_args(xp)
    args[name] = to_xp(xp, to_numpy(args[name]).astype(dtype))
    with raises(TypeError, f"attention_backward: {name} must have dtype float32 like q, k "
                           f"and v, got {np.dtype(dtype).name}"):
        call_backward(args)


@pytest.mark.parametrize("shape", [(2, 5), (4,), (2, 4, 1), (1, 4)])
def test_backward_lse_shape(xp, shape):
    args = backward_args(xp)
    args["lse"], = arrays(xp, shape)
    with raises(ValueError, f"attention_backward: lse must have shape (2, 4) "
                            f"(broadcast batch..., Lq), got {shape}"):
        call_backward(args)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.int32, np.complex64])
def test_backward_lse_dtype(xp, dtype):
    args = backward_args(xp)
    args["lse"] = to_xp(xp, to_numpy(args["lse"]).astype(dtype))
    with raises(TypeError, f"attention_backward: lse must have dtype float32 or float64, "
                           f"got {np.dtype(dtype).name}"):
        call_backward(args)


@pytest.mark.parametrize("deterministic", [1, 0, "yes", None, np.int64(1)])
def test_backward_deterministic_must_be_a_bool(xp, deterministic):
    with raises(TypeError, f"attention_backward: deterministic must be a bool, "
                           f"got {type(deterministic).__name__}"):
        call_backward(backward_args(xp), deterministic=deterministic)
    q, k, v = arrays(xp, (4, 8), (5, 8), (5, 8))
    with raises(TypeError, f"attention_vjp: deterministic must be a bool, "
                           f"got {type(deterministic).__name__}"):
        cupyflash.attention_vjp(q, k, v, deterministic=deterministic)


def test_backward_options_are_keyword_only(xp):
    args = backward_args(xp)
    with pytest.raises(TypeError):
        cupyflash.attention_backward(*args.values(), True)
    with pytest.raises(TypeError):
        cupyflash.attention_vjp(args["q"], args["k"], args["v"], True)


@pytest.mark.parametrize("name, shape, expected", [
    ("dq", (2, 4, 6), (2, 4, 8)),
    ("dk", (2, 4, 8), (2, 5, 8)),
    ("dv", (1, 5, 6), (2, 5, 6)),   # the gradient of v has v's shape, not a broadcast one
    ("dv", (5, 6), (2, 5, 6)),
])
def test_backward_gradient_shapes(xp, name, shape, expected):
    out = xp.zeros(shape, dtype=np.float32)
    with raises(ValueError, f"attention_backward: {name} must have shape {expected}, "
                            f"got {shape}"):
        call_backward(backward_args(xp), **{name: out})


def test_backward_gradients_of_broadcast_inputs_have_the_inputs_shapes(xp):
    """k, v of batch 1 against q of batch 2: dk and dv are (1, 5, ...), and a dk of the
    broadcast shape is refused."""
    q, k, v, dout = arrays(xp, (2, 4, 8), (1, 5, 8), (1, 5, 6), (2, 4, 6))
    out, lse = cupyflash.attention(q, k, v, return_lse=True)
    dq, dk, dv = cupyflash.attention_backward(dout, q, k, v, out, lse)
    assert dq.shape == (2, 4, 8) and dk.shape == (1, 5, 8) and dv.shape == (1, 5, 6)
    with raises(ValueError, "attention_backward: dk must have shape (1, 5, 8), got (2, 5, 8)"):
        cupyflash.attention_backward(dout, q, k, v, out, lse,
                                     dk=xp.zeros((2, 5, 8), dtype=np.float32))


@pytest.mark.parametrize("name", ["dq", "dk", "dv"])
@pytest.mark.parametrize("dtype", [np.float64, np.float16, ml_dtypes.bfloat16, np.int32])
def test_backward_gradient_dtypes(xp, name, dtype):
    args = backward_args(xp)
    shape = to_numpy(args[name[1]]).shape
    with raises(TypeError, f"attention_backward: {name} must have dtype float32, "
                           f"got {np.dtype(dtype).name}"):
        call_backward(args, **{name: to_xp(xp, np.zeros(shape, dtype=dtype))})


@pytest.mark.parametrize("name", ["dq", "dk", "dv"])
def test_backward_gradient_types_and_read_only(name):
    args = backward_args(np)
    shape = args[name[1]].shape
    with raises(TypeError, f"attention_backward: {name} must be a numpy.ndarray like the "
                           f"inputs, got list"):
        call_backward(args, **{name: np.zeros(shape, np.float32).tolist()})
    frozen = np.zeros(shape, np.float32)
    frozen.flags.writeable = False
    with raises(ValueError, f"attention_backward: {name} is read-only"):
        call_backward(args, **{name: frozen})


def _one_buffer_args(xp):
    """dout, q, k, v, out, lse all views of one float32 buffer (Lq = Lk = 4, D = Dv = 8,
    so that any gradient has the shape of each), with valid values."""
    rng = np.random.default_rng(4)
    buf = to_xp(xp, rng.standard_normal((6, 4, 8)).astype(np.float32))
    q, k, v, dout = buf[0], buf[1], buf[2], buf[3]
    out, lse = cupyflash.attention(q, k, v, return_lse=True)
    buf[4] = out
    buf[5, 0, :4] = lse
    return buf, dict(dout=dout, q=q, k=k, v=v, out=buf[4], lse=buf[5, 0, :4])


@pytest.mark.parametrize("grad", ["dq", "dk", "dv"])
@pytest.mark.parametrize("which", ["dout", "q", "k", "v", "out", "lse"])
def test_backward_gradients_must_not_overlap_an_input(xp, grad, which):
    buf, args = _one_buffer_args(xp)
    index = ["q", "k", "v", "dout", "out", "lse"].index(which)
    before = snapshot(buf)
    with raises(ValueError, f"attention_backward: {grad} must not overlap the input {which}"):
        call_backward(args, **{grad: buf[index]})
    assert snapshot(buf) == before


@pytest.mark.parametrize("first, second", [("dq", "dk"), ("dq", "dv"), ("dk", "dv")])
def test_backward_gradients_must_not_overlap_each_other(xp, first, second):
    _, args = _one_buffer_args(xp)
    grads = xp.zeros((2, 4, 8), dtype=np.float32)
    shifted = grads.reshape(64)[4:36].reshape(4, 8)  # overlaps grads[0] in part
    with raises(ValueError, f"attention_backward: {second} must not overlap {first}"):
        call_backward(args, **{first: grads[0], second: shifted})
    result = call_backward(args, **{first: grads[0], second: grads[1]})  # adjacent is fine
    assert result[["dq", "dk", "dv"].index(first)] is not None


def test_vjp_errors_name_attention_vjp(xp):
    q, k, v = arrays(xp, (2, 4, 8), (2, 5, 7), (2, 5, 6))
    with raises(ValueError, "attention_vjp: q.shape[-1] (8) must equal k.shape[-1] (7)"):
        cupyflash.attention_vjp(q, k, v)
    q, k, v = arrays(xp, (2, 4, 8), (2, 5, 8), (2, 5, 6))
    out, vjp = cupyflash.attention_vjp(q, k, v, causal=True)
    with raises(ValueError, "attention_vjp: dout must have shape (2, 4, 6) "
                            "(broadcast batch..., Lq, Dv), got (2, 4, 5)"):
        vjp(xp.zeros((2, 4, 5), dtype=np.float32))
    with raises(TypeError, "attention_vjp: dout must have dtype float32 like q, k and v, "
                           "got float64"):
        vjp(to_numpy(out).astype(np.float64).tolist() if xp is np
            else xp.zeros((2, 4, 6), dtype=np.float64))


@pytest.mark.parametrize("options", [
    dict(causal="yes"), dict(scale=float("inf")), dict(deterministic=None),
    dict(dq="wrong"), dict(dk=np.zeros((2, 5, 8), np.float64)),
])
def test_backward_inputs_are_never_modified(xp, options):
    args = backward_args(xp, dtype=np.float16)
    before = snapshot(*args.values())
    with pytest.raises((TypeError, ValueError)):
        call_backward(args, **options)
    call_backward(args, causal=False)  # and a valid call neither
    assert snapshot(*args.values()) == before


@pytest.mark.parametrize("gpu_arg", ["dout", "q", "k", "v", "out", "lse"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_backward_numpy_and_cupy_arrays_do_not_mix(gpu_arg):
    import cupy
    args = backward_args(np)
    args[gpu_arg] = cupy.asarray(args[gpu_arg])
    with raises(TypeError, "attention_backward: arrays must be all NumPy or all CuPy arrays"):
        call_backward(args)
    if gpu_arg == "dout":  # and through attention_vjp: a CuPy dout for NumPy inputs
        _, vjp = cupyflash.attention_vjp(args["q"], args["k"], args["v"])
        with raises(TypeError, "attention_vjp: arrays must be all NumPy or all CuPy arrays"):
            vjp(args["dout"])


@pytest.mark.parametrize("name", ["dq", "dk", "dv"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_backward_numpy_gradient_for_cupy_inputs_is_rejected(name):
    import cupy
    args = backward_args(cupy)
    shape = args[name[1]].shape
    with raises(TypeError, f"attention_backward: {name} must be a cupy.ndarray like the "
                           f"inputs, got ndarray"):
        call_backward(args, **{name: np.zeros(shape, np.float32)})
