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
    shares = np.shares_memory if xp_name == "numpy" else _cupy_shares_memory
    for input_name, x in inputs:
        if out.size and x.size and shares(out, x):
            raise ValueError(f"{fn}: {name} must not overlap the input {input_name}")


def _cupy_shares_memory(a, b):
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
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"{fn}: return_lse must be a bool, got {type(return_lse).__name__}")
    if out is not None:
        check_out(fn, out, xp_name, problem.out_shape, problem.dtype,
                  (("q", q), ("k", k), ("v", v)))
    if xp_name == "cupy":
        from . import _cupy_backend
        result, lse = _cupy_backend.attention_forward(q, k, v, problem, out)
    else:
        result, lse = _numpy_backend.attention_forward(q, k, v, problem, out)
    return (result, lse) if return_lse else result


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
