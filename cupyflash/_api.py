"""Public functions: validate in Python, then dispatch to the NumPy or CuPy backend.

Every check happens here, before any backend runs, so that a bad call raises a
``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong value) whose message names
the function and the argument, and no input is ever touched.
"""

import math
import numbers

import numpy as np

from . import _numpy_backend

# ----------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------

SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")


def accumulator_dtype(dtype):
    """float32 accumulation for every dtype but float64, which keeps float64."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _supported_dtype_objects():
    found = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}
    try:
        import ml_dtypes
        found.add(np.dtype(ml_dtypes.bfloat16))
    except ImportError:  # without ml_dtypes no bfloat16 array can exist either
        pass
    return frozenset(found)


_SUPPORTED = _supported_dtype_objects()  # a set lookup: dtype.name is slow on a hot path


def _check_dtype(fn, name, x):
    if x.dtype not in _SUPPORTED:
        raise TypeError(f"{fn}: {name} has unsupported dtype {x.dtype.name}; "
                        f"expected one of {', '.join(SUPPORTED_DTYPES)}")


# ----------------------------------------------------------------------------------------
# array types: NumPy in -> NumPy out, CuPy in -> CuPy out, never mixed
# ----------------------------------------------------------------------------------------

def _is_cupy_array(x):
    # No import of CuPy here: the package must import on machines without it.
    return type(x).__module__.split(".")[0] == "cupy" and hasattr(x, "__cuda_array_interface__")


def _as_arrays(fn, names, arrays):
    """Return ``(xp_name, arrays)``: all NumPy (array-likes converted) or all CuPy."""
    first = type(arrays[0])
    if all(type(a) is first for a in arrays):  # the common case, decided without imports
        if first is np.ndarray:
            return "numpy", list(arrays)
        if _is_cupy_array(arrays[0]):
            return "cupy", list(arrays)
    on_gpu = [_is_cupy_array(a) for a in arrays]
    if any(on_gpu) and not all(on_gpu):
        kinds = ", ".join(f"{n} {'cupy' if g else type(a).__module__.split('.')[0]}"
                          f".{type(a).__name__}" for n, a, g in zip(names, arrays, on_gpu))
        raise TypeError(f"{fn}: arrays must be all NumPy or all CuPy arrays; got {kinds}")
    if all(on_gpu):
        return "cupy", list(arrays)
    out = []
    for n, a in zip(names, arrays):
        try:
            out.append(np.asarray(a))
        except Exception as e:  # ragged lists and the like
            raise TypeError(f"{fn}: {n} could not be converted to an array ({e})") from None
    return "numpy", out


# ----------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------

class AttentionProblem:
    """The validated shape of one attention call (no arrays, only sizes and options)."""

    __slots__ = ("batch_shape", "Lq", "Lk", "D", "Dv", "dtype", "causal", "scale")

    def __init__(self, batch_shape, Lq, Lk, D, Dv, dtype, causal, scale):
        self.batch_shape, self.Lq, self.Lk, self.D, self.Dv = batch_shape, Lq, Lk, D, Dv
        self.dtype, self.causal, self.scale = dtype, causal, scale

    @property
    def out_shape(self):
        return self.batch_shape + (self.Lq, self.Dv)

    @property
    def lse_shape(self):
        return self.batch_shape + (self.Lq,)


def validate_attention(fn, q, k, v, causal, scale):
    """Check q, k, v and the options; return an :class:`AttentionProblem`."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim < 2:
            raise ValueError(f"{fn}: {name} must have at least 2 dimensions (..., L, D), "
                             f"got shape {tuple(x.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_dtype(fn, name, x)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{fn}: q, k, v must share one dtype; "
                        f"got q {q.dtype.name}, k {k.dtype.name}, v {v.dtype.name}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{fn}: q.shape[-1] ({q.shape[-1]}) must equal "
                         f"k.shape[-1] ({k.shape[-1]})")
    if q.shape[-1] < 1:
        raise ValueError(f"{fn}: the head dimension q.shape[-1] must be at least 1, got 0")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"{fn}: k.shape[-2] ({k.shape[-2]}) must equal "
                         f"v.shape[-2] ({v.shape[-2]})")
    try:
        batch_shape = q.shape[:-2]
        if not (k.shape[:-2] == batch_shape == v.shape[:-2]):
            batch_shape = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError:
        raise ValueError(f"{fn}: the batch dimensions of q {tuple(q.shape[:-2])}, "
                         f"k {tuple(k.shape[:-2])} and v {tuple(v.shape[:-2])} "
                         f"do not broadcast") from None
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"{fn}: causal must be a bool, got {type(causal).__name__}")
    D = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    else:
        if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
            raise TypeError(f"{fn}: scale must be a real number or None, "
                            f"got {type(scale).__name__}")
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"{fn}: scale must be finite, got {scale}")
    return AttentionProblem(tuple(batch_shape), q.shape[-2], k.shape[-2], D, v.shape[-1],
                            q.dtype, bool(causal), scale)


def check_out(fn, out, xp_name, shape, dtype, inputs, name="out"):
    """Check a caller-supplied output array; it must not overlap any input."""
    if xp_name == "cupy":
        if not _is_cupy_array(out):
            raise TypeError(f"{fn}: {name} must be a cupy.ndarray like the inputs, "
                            f"got {type(out).__name__}")
    elif not isinstance(out, np.ndarray):
        raise TypeError(f"{fn}: {name} must be a numpy.ndarray like the inputs, "
                        f"got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{fn}: {name} must have dtype {np.dtype(dtype).name}, "
                        f"got {out.dtype.name}")
    if xp_name == "numpy" and not out.flags.writeable:
        raise ValueError(f"{fn}: {name} is read-only")
    for input_name, x in inputs:
        if _overlap(xp_name, out, x):
            raise ValueError(f"{fn}: {name} must not overlap the input {input_name}")


def _overlap(xp_name, a, b):
    if not (a.size and b.size):
        return False
    if xp_name == "numpy":
        return np.shares_memory(a, b)
    import cupy
    return cupy.shares_memory(a, b, max_work="MAY_SHARE_BOUNDS")


def attention(q, k, v, *, causal=False, scale=None, return_lse=False, out=None):
    r"""Exact softmax attention, computed tile by tile without the ``L x L`` matrix.

    .. math::

        \mathrm{out} = \mathrm{softmax}\!\left(q k^T \cdot \mathrm{scale}\right) v

    NumPy arrays run the tiled NumPy backend (FlashAttention's algorithm on the CPU,
    with BLAS products on blocks); CuPy arrays run fused CUDA kernels on the arrays'
    device and CuPy's current stream.

    Parameters
    ----------
    q : array, shape ``(..., Lq, D)``
        Queries.
    k : array, shape ``(..., Lk, D)``
        Keys.
    v : array, shape ``(..., Lk, Dv)``
        Values. ``Dv`` may differ from ``D``.
        The leading (batch) dimensions of q, k and v broadcast by NumPy's rules, so
        multi-query and grouped-query attention are plain broadcasting: q of shape
        ``(B, Hkv, G, L, D)`` with k, v of shape ``(B, Hkv, 1, L, D)``. Broadcast k and
        v are never copied. The arrays may have any strides (a transposed
        ``(B, L, H, D)`` view, say); see Notes for what is copied.
        All three must share one dtype: float16, bfloat16 (``ml_dtypes.bfloat16``),
        float32 or float64.
    causal : bool, optional
        If True, query ``i`` sees key ``j`` iff ``j <= i + (Lk - Lq)``: the mask is
        aligned to the bottom-right corner, as in FlashAttention 2.1 and later.
        For ``Lq = 2, Lk = 5`` (``x`` = seen)::

                 keys 0 1 2 3 4
            query 0   x x x x .
            query 1   x x x x x

        and for ``Lq = 5, Lk = 2`` the first three queries see no key (their
        output rows are zeros and their lse is ``-inf``)::

                 keys 0 1
            query 0   . .
            query 1   . .
            query 2   . .
            query 3   x .
            query 4   x x

    scale : float, optional
        Multiplies the scores before the softmax. Default ``1 / sqrt(D)``.
    return_lse : bool, optional
        Also return the natural-log logsumexp of each row of scaled scores.
    out : array, optional
        Preallocated output of shape ``(..., Lq, Dv)`` and the inputs' dtype and
        array type. It must not overlap q, k or v.

    Returns
    -------
    out : array, shape ``(broadcast batch..., Lq, Dv)``, the inputs' dtype
    lse : array, shape ``(broadcast batch..., Lq)``, only if ``return_lse``
        float32 (float64 for float64 inputs). ``-inf`` for a row that sees no key.

    Raises
    ------
    TypeError
        Mixed NumPy and CuPy arrays, unsupported or mixed dtypes, a non-real ``scale``,
        or an ``out`` of the wrong type or dtype.
    ValueError
        Arrays with fewer than 2 dimensions, ``D`` of q and k that differ, ``Lk`` of k
        and v that differ, batch dimensions that do not broadcast, a non-finite
        ``scale``, or an ``out`` of the wrong shape or that overlaps an input.

    Notes
    -----
    Scores are accumulated in float32 for float16, bfloat16 and float32 inputs (float64
    for float64); the softmax is computed online, one key block at a time, keeping
    the running row maximum ``m_i``, the running sum ``l_i`` and the unnormalised
    output ``acc``, which is rescaled by ``exp(m_old - m_new)`` whenever the maximum
    grows and divided by ``l_i`` once at the end. Extra memory is ``O(Lq * Dv)`` per
    batch element plus one block of scores, never ``O(Lq * Lk)``.

    A score of ``-inf`` gives its key zero weight, so a row of only ``-inf`` scores
    gives zeros and ``lse = -inf``, never NaN. NaN or ``+inf`` scores give NaN.

    Copies: the NumPy backend gathers one block of q, k, v at a time (in float32 for
    half-precision inputs). The CuPy backend reads any strides whose last dimension is
    contiguous (stride-0 broadcast dimensions included) in place; an input whose last
    dimension is not contiguous is copied once.

    References
    ----------
    T. Dao, D. Y. Fu, S. Ermon, A. Rudra, C. Re, "FlashAttention: Fast and
    Memory-Efficient Exact Attention with IO-Awareness", NeurIPS 2022.
    T. Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
    Partitioning", ICLR 2024.

    Examples
    --------
    >>> import numpy as np
    >>> import cupyflash
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 8, 128, 64), dtype=np.float32)  # (B, H, L, D)
    >>> k = rng.standard_normal((2, 8, 128, 64), dtype=np.float32)
    >>> v = rng.standard_normal((2, 8, 128, 64), dtype=np.float32)
    >>> out = cupyflash.attention(q, k, v, causal=True)
    >>> out.shape, out.dtype
    ((2, 8, 128, 64), dtype('float32'))
    >>> expected = cupyflash.reference.attention(q, k, v, causal=True)
    >>> bool(np.abs(out - expected).max() < 1e-5)
    True

    Grouped-query attention: 8 query heads share 2 key/value heads.

    >>> q = rng.standard_normal((1, 2, 4, 16, 32), dtype=np.float32)  # (B, Hkv, G, L, D)
    >>> k = rng.standard_normal((1, 2, 1, 16, 32), dtype=np.float32)
    >>> v = rng.standard_normal((1, 2, 1, 16, 32), dtype=np.float32)
    >>> out, lse = cupyflash.attention(q, k, v, return_lse=True)
    >>> out.shape, lse.shape
    ((1, 2, 4, 16, 32), (1, 2, 4, 16))
    """
    fn = "attention"
    xp_name, (q, k, v) = _as_arrays(fn, ("q", "k", "v"), (q, k, v))
    problem = validate_attention(fn, q, k, v, causal, scale)
    _check_bool(fn, "return_lse", return_lse)
    if out is not None:
        check_out(fn, out, xp_name, problem.out_shape, problem.dtype,
                  (("q", q), ("k", k), ("v", v)))
    result, lse = _forward(xp_name, q, k, v, problem, out)
    return (result, lse) if return_lse else result


def _check_bool(fn, name, x):
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be a bool, got {type(x).__name__}")


def _forward(xp_name, q, k, v, problem, out):
    if xp_name == "cupy":
        from . import _cupy_backend
        return _cupy_backend.attention_forward(q, k, v, problem, out)
    return _numpy_backend.attention_forward(q, k, v, problem, out)


# ----------------------------------------------------------------------------------------
# the backward pass
# ----------------------------------------------------------------------------------------

def attention_backward(dout, q, k, v, out, lse, *, causal=False, scale=None,
                       deterministic=False, dq=None, dk=None, dv=None):
    r"""Gradients of :func:`attention` with respect to q, k and v (FlashAttention-2's
    backward pass, which recomputes the probabilities from ``lse``).

    For ``out, lse = attention(q, k, v, causal=causal, scale=scale, return_lse=True)``
    and the gradient ``dout`` of a loss with respect to ``out``, returns the gradients
    of that loss with respect to q, k and v.

    Parameters
    ----------
    dout : array, shape ``(broadcast batch..., Lq, Dv)``
        The upstream gradient, with out's shape and the inputs' dtype.
    q, k, v : array
        The forward pass's inputs, as for :func:`attention`.
    out : array, shape ``(broadcast batch..., Lq, Dv)``
        The forward pass's output for these q, k, v and options.
    lse : array, shape ``(broadcast batch..., Lq)``
        The forward pass's lse (``return_lse=True``): float32 or float64. Each
        probability is recomputed from it, so an lse less precise than the forward's
        (float32 for float64 inputs) limits the gradients to its precision.
    causal, scale :
        The forward pass's options, as for :func:`attention`.
    deterministic : bool, optional
        On CuPy arrays, True makes runs on the same inputs and device give bitwise
        identical gradients, possibly at some cost in speed; False lets the GPU add
        partial sums in an order that may change from run to run (every run meets the
        same accuracy). On NumPy arrays it has no effect: the CPU backend is always
        deterministic.
    dq, dk, dv : array, optional
        Preallocated outputs with the shapes of q, k and v and the inputs' dtype and
        array type. None of them may overlap an input or another of them.

    Returns
    -------
    dq, dk, dv : arrays of the shapes of q, k, v, the inputs' dtype
        A gradient is summed over the batch dimensions its input was broadcast along
        (grouped-query attention: dk and dv sum over the query heads of a group).

    Raises
    ------
    TypeError
        Mixed NumPy and CuPy arrays, unsupported or mixed dtypes (dout and out must
        have the dtype of q, k and v; lse float32 or float64), a non-real ``scale``, a
        non-bool ``causal`` or ``deterministic``, or a ``dq``, ``dk``, ``dv`` of the
        wrong type or dtype.
    ValueError
        Any shape error of :func:`attention`, a dout, out or lse of the wrong shape, a
        non-finite ``scale``, or a ``dq``, ``dk``, ``dv`` of the wrong shape or that
        overlaps an input or another output.

    Notes
    -----
    With ``S = q k^T \cdot scale`` (``-inf`` where the causal mask hides a key),
    ``P = softmax(S)`` and ``O = P v``:

    .. math::

        dV = P^T dO, \quad dP = dO\, V^T, \quad
        \Delta_i = \sum_c dO_{ic} O_{ic}, \quad
        dS = P \circ (dP - \Delta), \quad
        dQ = dS\, K \cdot scale, \quad dK = dS^T Q \cdot scale

    ``P`` is never stored: each block is recomputed as ``P_ij = exp(S_ij - lse_i)``
    from q, k and the forward's lse, so extra memory stays ``O(Lq * D)`` per batch
    element (the float32 accumulator of dQ, float64 for float64 inputs) plus a few
    blocks of scores. The loop is FlashAttention-2's: over key blocks outside, each
    owning its ``dK_j`` and ``dV_j``, and over query blocks inside. Sums are
    accumulated in float32 (float64 for float64 inputs); the NumPy backend computes
    every block in that dtype and rounds each gradient to the inputs' dtype once.

    A query that sees no key (``lse = -inf``) contributes nothing and gets a zero row
    of dq, never NaN. An infinite entry of q or k (the forward's way to hide a key
    without ``causal``) gives NaN in dq or dk: its gradient is ``0 * inf``.

    References
    ----------
    T. Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
    Partitioning", ICLR 2024 (Algorithm 2).

    Examples
    --------
    >>> import numpy as np
    >>> import cupyflash
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 64, 32)) for _ in range(3))  # float64
    >>> out, lse = cupyflash.attention(q, k, v, causal=True, return_lse=True)
    >>> dout = rng.standard_normal(out.shape)  # the gradient of a loss w.r.t. out
    >>> dq, dk, dv = cupyflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    >>> expected = cupyflash.reference.attention_backward(dout, q, k, v, causal=True)
    >>> all(bool(np.abs(g - e).max() < 1e-12) for g, e in zip((dq, dk, dv), expected))
    True

    Grouped-query attention: dk and dv have the shapes of k and v, summed over the
    query heads that share them.

    >>> q = rng.standard_normal((1, 2, 4, 16, 8), dtype=np.float32)  # (B, Hkv, G, L, D)
    >>> k = rng.standard_normal((1, 2, 1, 16, 8), dtype=np.float32)
    >>> v = rng.standard_normal((1, 2, 1, 16, 8), dtype=np.float32)
    >>> out, lse = cupyflash.attention(q, k, v, return_lse=True)
    >>> dq, dk, dv = cupyflash.attention_backward(np.ones_like(out), q, k, v, out, lse)
    >>> dq.shape, dk.shape, dv.shape
    ((1, 2, 4, 16, 8), (1, 2, 1, 16, 8), (1, 2, 1, 16, 8))
    """
    fn = "attention_backward"
    xp_name, arrays = _as_arrays(fn, ("dout", "q", "k", "v", "out", "lse"),
                                 (dout, q, k, v, out, lse))
    dout, q, k, v, out, lse = arrays
    problem = validate_attention(fn, q, k, v, causal, scale)
    _check_backward_arrays(fn, xp_name, problem, dout, q, k, v, out, lse, deterministic,
                           dq, dk, dv)
    return _backward(xp_name, dout, q, k, v, out, lse, problem, deterministic, dq, dk, dv)


def _check_backward_arrays(fn, xp_name, problem, dout, q, k, v, out, lse, deterministic,
                           dq, dk, dv):
    """Check what attention_backward takes beyond attention's q, k, v and options."""
    for name, x in (("dout", dout), ("out", out)):
        if tuple(x.shape) != problem.out_shape:
            raise ValueError(f"{fn}: {name} must have shape {problem.out_shape} "
                             f"(broadcast batch..., Lq, Dv), got {tuple(x.shape)}")
        if x.dtype != problem.dtype:
            raise TypeError(f"{fn}: {name} must have dtype {problem.dtype.name} like q, k "
                            f"and v, got {x.dtype.name}")
    if tuple(lse.shape) != problem.lse_shape:
        raise ValueError(f"{fn}: lse must have shape {problem.lse_shape} "
                         f"(broadcast batch..., Lq), got {tuple(lse.shape)}")
    if lse.dtype not in (np.float32, np.float64):
        raise TypeError(f"{fn}: lse must have dtype float32 or float64, got {lse.dtype.name}")
    _check_bool(fn, "deterministic", deterministic)
    inputs = (("dout", dout), ("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse))
    checked = []
    for name, g, x in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if g is None:
            continue
        check_out(fn, g, xp_name, x.shape, problem.dtype, inputs, name=name)
        for other_name, other in checked:
            if _overlap(xp_name, g, other):
                raise ValueError(f"{fn}: {name} must not overlap {other_name}")
        checked.append((name, g))


def _backward(xp_name, dout, q, k, v, out, lse, problem, deterministic, dq, dk, dv):
    if xp_name == "cupy":
        from . import _cupy_backward
        return _cupy_backward.attention_backward(dout, q, k, v, out, lse, problem,
                                                 deterministic, dq, dk, dv)
    return _numpy_backend.attention_backward(dout, q, k, v, out, lse, problem, dq, dk, dv)


def attention_vjp(q, k, v, *, causal=False, scale=None, deterministic=False):
    r"""Run :func:`attention` and return its output with a function that computes the
    gradients, in the style of ``jax.vjp``.

    Parameters
    ----------
    q, k, v, causal, scale :
        As for :func:`attention`.
    deterministic : bool, optional
        As for :func:`attention_backward`.

    Returns
    -------
    out : array, shape ``(broadcast batch..., Lq, Dv)``
        ``attention(q, k, v, causal=causal, scale=scale)``.
    vjp : callable
        ``vjp(dout) -> (dq, dk, dv)``: :func:`attention_backward` with the saved out
        and lse, for a ``dout`` of out's shape and dtype. It may be called any number
        of times. It keeps references to q, k, v (not copies): changing them in
        place between the two calls changes the gradients.

    Raises
    ------
    TypeError, ValueError
        As :func:`attention` for q, k, v and the options (and for ``deterministic``
        a TypeError if it is not a bool); ``vjp`` raises as :func:`attention_backward`
        for a bad ``dout``. Every message names ``attention_vjp``.

    Examples
    --------
    >>> import numpy as np
    >>> import cupyflash
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((8, 32, 16), dtype=np.float32) for _ in range(3))
    >>> out, vjp = cupyflash.attention_vjp(q, k, v, causal=True)
    >>> dq, dk, dv = vjp(np.ones_like(out))  # gradients of out.sum()
    >>> dq.shape, dk.dtype
    ((8, 32, 16), dtype('float32'))
    """
    fn = "attention_vjp"
    xp_name, (q, k, v) = _as_arrays(fn, ("q", "k", "v"), (q, k, v))
    problem = validate_attention(fn, q, k, v, causal, scale)
    _check_bool(fn, "deterministic", deterministic)
    out, lse = _forward(xp_name, q, k, v, problem, None)

    def vjp(dout):
        """``(dq, dk, dv)``: the gradients of the loss whose gradient w.r.t. out is dout."""
        _, (d, _) = _as_arrays(fn, ("dout", "q"), (dout, q))  # dout of q's array type
        _check_backward_arrays(fn, xp_name, problem, d, q, k, v, out, lse, deterministic,
                               None, None, None)
        return _backward(xp_name, d, q, k, v, out, lse, problem, deterministic,
                         None, None, None)

    return out, vjp


# ----------------------------------------------------------------------------------------
# softmax, log_softmax, logsumexp
# ----------------------------------------------------------------------------------------

def normalize_axis(fn, axis, ndim):
    """Return a sorted tuple of non-negative axes, from an int, a tuple of ints or None."""
    if axis is None:
        return tuple(range(ndim))
    axes = axis if isinstance(axis, tuple) else (axis,)
    result = []
    for a in axes:
        if isinstance(a, (bool, np.bool_)) or not isinstance(a, numbers.Integral):
            raise TypeError(f"{fn}: axis must be an int, a tuple of ints or None, "
                            f"got {axis!r}")
        a = int(a)
        if not -ndim <= a < ndim:
            raise ValueError(f"{fn}: axis {a} is out of bounds for an array of "
                             f"dimension {ndim}")
        result.append(a % ndim)
    if len(set(result)) != len(result):
        raise ValueError(f"{fn}: axis {axis!r} repeats an axis")
    return tuple(sorted(result))


def _softmax_family(fn, x, axis, kind):
    xp_name, (x,) = _as_arrays(fn, ("x",), (x,))
    _check_dtype(fn, "x", x)
    axes = normalize_axis(fn, axis, x.ndim)
    if xp_name == "cupy":
        from . import _cupy_backend
        return _cupy_backend.softmax_family(x, axes, kind)
    return _numpy_backend.softmax_family(x, axes, kind)


def softmax(x, axis=-1):
    r"""Softmax along ``axis``: ``exp(x - logsumexp(x))``, numerically safe.

    Parameters
    ----------
    x : array
        float16, bfloat16, float32 or float64, NumPy or CuPy.
    axis : int, tuple of ints or None, optional
        The axes to normalise over (all axes for None). Default ``-1``.

    Returns
    -------
    array of the shape and dtype of ``x``
        Computed in float32 (float64 for float64 input). A slice of only ``-inf`` gives
        all zeros (not NaN); a slice with ``+inf`` gives NaN at its ``+inf`` entries
        and 0 elsewhere; NaN in a slice gives NaN.

    Raises
    ------
    TypeError
        Unsupported dtype or a non-integer axis.
    ValueError
        An axis out of bounds or repeated.

    Notes
    -----
    .. math:: \mathrm{softmax}(x)_i = \frac{e^{x_i - m}}{\sum_j e^{x_j - m}},
              \quad m = \max_j x_j

    On CuPy arrays one pass reads each slice to compute its running maximum and sum
    together (the online normaliser), and a second pass writes the result.

    Examples
    --------
    >>> import numpy as np
    >>> import cupyflash
    >>> cupyflash.softmax(np.array([1000.0, 1000.0, -np.inf]))
    array([0.5, 0.5, 0. ])
    >>> cupyflash.softmax(np.array([-np.inf, -np.inf]))
    array([0., 0.])
    """
    return _softmax_family("softmax", x, axis, "softmax")


def log_softmax(x, axis=-1):
    r"""Log of the softmax along ``axis``: ``x - logsumexp(x)``, numerically safe.

    Parameters and dtype rules as in :func:`softmax`. A slice of only ``-inf``
    gives all ``-inf`` (the log of zero probabilities), not NaN.

    Notes
    -----
    .. math:: \log\mathrm{softmax}(x)_i = x_i - m - \log\sum_j e^{x_j - m}

    Examples
    --------
    >>> import numpy as np
    >>> import cupyflash
    >>> cupyflash.log_softmax(np.array([0.0, 0.0]))
    array([-0.69314718, -0.69314718])
    """
    return _softmax_family("log_softmax", x, axis, "log_softmax")


def logsumexp(x, axis=-1):
    r"""``log(sum(exp(x)))`` along ``axis``, numerically safe for huge values.

    Parameters and dtype rules as in :func:`softmax`; the reduced axes are removed.
    A slice of only ``-inf`` (or an empty slice) gives ``-inf``; a slice with
    ``+inf`` gives ``+inf``; NaN gives NaN.

    Notes
    -----
    .. math:: \mathrm{logsumexp}(x) = m + \log\sum_j e^{x_j - m}, \quad m = \max_j x_j

    Examples
    --------
    >>> import numpy as np
    >>> import cupyflash
    >>> float(cupyflash.logsumexp(np.array([1e4, 1e4])))
    10000.69314718056
    """
    return _softmax_family("logsumexp", x, axis, "logsumexp")
