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
    """The validated shape of one attention call (no arrays, only sizes and options).

    ``window`` is None or a pair ``(left, right)`` of ints or None (unbounded), never
    ``(None, None)``; ``softcap`` is None or a positive float. The arrays of the other
    variants (bias, mask, alibi_slopes) travel beside the problem. ``dropout_p`` is a
    float in ``[0, 1)`` (0.0: no dropout) and ``seed`` an int in ``[0, 2**64)``, or None
    when there is no dropout.
    """

    __slots__ = ("batch_shape", "Lq", "Lk", "D", "Dv", "dtype", "causal", "scale",
                 "window", "softcap", "dropout_p", "seed")

    def __init__(self, batch_shape, Lq, Lk, D, Dv, dtype, causal, scale, window=None,
                 softcap=None, dropout_p=0.0, seed=None):
        self.batch_shape, self.Lq, self.Lk, self.D, self.Dv = batch_shape, Lq, Lk, D, Dv
        self.dtype, self.causal, self.scale = dtype, causal, scale
        self.window, self.softcap = window, softcap
        self.dropout_p, self.seed = dropout_p, seed

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


def _broadcasts_to(shape, target):
    try:
        return np.broadcast_shapes(tuple(shape), target) == target
    except ValueError:
        return False


def _check_float(fn, name, x):
    if x.dtype not in _SUPPORTED:
        raise TypeError(f"{fn}: {name} must have a float dtype ({', '.join(SUPPORTED_DTYPES)}), "
                        f"got {x.dtype.name}")


def _check_window(fn, window):
    """Return the window as ``(left, right)``, or None for no window (None or (None, None))."""
    if window is None:
        return None
    if not isinstance(window, (tuple, list)):
        raise TypeError(f"{fn}: window must be None or a pair (left, right) of ints >= 0 "
                        f"or None, got {type(window).__name__}")
    if len(window) != 2:
        raise ValueError(f"{fn}: window must be a pair (left, right), got {len(window)} "
                         f"elements")
    for side, w in zip(("left", "right"), window):
        if w is None:
            continue
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, numbers.Integral):
            raise TypeError(f"{fn}: window {side} must be an int >= 0 or None, "
                            f"got {type(w).__name__}")
        if w < 0:
            raise ValueError(f"{fn}: window {side} must be >= 0, or None for unbounded, "
                             f"got {int(w)}")
    left, right = (None if w is None else int(w) for w in window)
    return None if left is None and right is None else (left, right)


def validate_variants(fn, problem, bias, mask, window, alibi_slopes, softcap):
    """Check the variant options of :func:`attention` against a validated problem; set
    ``problem.window`` and ``problem.softcap``."""
    full = problem.batch_shape + (problem.Lq, problem.Lk)
    if bias is not None:
        _check_float(fn, "bias", bias)
        if not _broadcasts_to(bias.shape, full):
            raise ValueError(f"{fn}: bias of shape {tuple(bias.shape)} must broadcast to "
                             f"(batch..., Lq, Lk) = {full}")
    if mask is not None:
        if mask.dtype != np.bool_:
            raise TypeError(f"{fn}: mask must have dtype bool (True: keep), "
                            f"got {mask.dtype.name}")
        if not _broadcasts_to(mask.shape, full):
            raise ValueError(f"{fn}: mask of shape {tuple(mask.shape)} must broadcast to "
                             f"(batch..., Lq, Lk) = {full}")
    problem.window = _check_window(fn, window)
    if alibi_slopes is not None:
        _check_float(fn, "alibi_slopes", alibi_slopes)
        if not _broadcasts_to(alibi_slopes.shape, problem.batch_shape):
            raise ValueError(f"{fn}: alibi_slopes of shape {tuple(alibi_slopes.shape)} must "
                             f"broadcast to the batch shape {problem.batch_shape} "
                             f"(one slope per batch element)")
    if softcap is not None:
        if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, numbers.Real):
            raise TypeError(f"{fn}: softcap must be a real number or None, "
                            f"got {type(softcap).__name__}")
        softcap = float(softcap)
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"{fn}: softcap must be positive and finite, got {softcap}")
    problem.softcap = softcap
    return problem


def validate_dropout(fn, problem, dropout_p, seed):
    """Check ``dropout_p`` and ``seed``; set ``problem.dropout_p`` (a float in [0, 1)) and
    ``problem.seed`` (an int in [0, 2**64), None without dropout)."""
    if isinstance(dropout_p, (bool, np.bool_)) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"{fn}: dropout_p must be a real number in [0, 1), "
                        f"got {type(dropout_p).__name__}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:  # NaN fails both comparisons
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p}")
    if seed is not None:
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"{fn}: seed must be an int in [0, 2**64) or None, "
                            f"got {type(seed).__name__}")
        seed = int(seed)
        if not 0 <= seed < 2**64:
            raise ValueError(f"{fn}: seed must be in [0, 2**64), got {seed}")
    if dropout_p > 0 and seed is None:
        raise ValueError(f"{fn}: dropout_p={dropout_p} needs a seed (an int in [0, 2**64)); "
                         f"got seed=None")
    problem.dropout_p = dropout_p
    problem.seed = seed if dropout_p > 0 else None  # without dropout the seed is unused
    return problem


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


def attention(q, k, v, *, causal=False, scale=None, bias=None, mask=None, window=None,
              alibi_slopes=None, softcap=None, dropout_p=0.0, seed=None, return_lse=False,
              out=None):
    r"""Exact softmax attention, computed tile by tile without the ``L x L`` matrix.

    .. math::

        \mathrm{out} = \mathrm{softmax}\!\left(q k^T \cdot \mathrm{scale}\right) v

    with optional variants of the scores (``bias``, ``mask``, ``window``,
    ``alibi_slopes``, ``softcap``; see Notes for their order).

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
    bias : array, optional
        An additive score bias of any float dtype whose shape broadcasts to
        ``(batch..., Lq, Lk)`` (it may not add batch dimensions). It is read one block
        at a time through its own strides: a padding bias of shape ``(B, 1, 1, Lk)``
        or a shared ``(Lq, Lk)`` one is never expanded. ``-inf`` hides a key.
    mask : array of bool, optional
        A keep-mask broadcastable to ``(batch..., Lq, Lk)`` like ``bias``: query ``i``
        sees key ``j`` only where ``mask`` is True. A row that keeps no key gives
        zeros and ``lse = -inf``. Key blocks that a mask hides for every row are
        skipped.
    window : (int or None, int or None), optional
        Sliding-window (local) attention: query ``i`` sees key ``j`` iff
        ``i + (Lk - Lq) - left <= j <= i + (Lk - Lq) + right``, a band around the
        bottom-right aligned diagonal of ``causal``. ``None`` on a side leaves that
        side unbounded; ``(None, None)`` is no window; ``(None, 0)`` is ``causal``.
        With ``causal=True`` a query sees the intersection, ``(left, 0)``. Key blocks
        outside the band are skipped, so the cost grows with the window, not ``Lk``.
    alibi_slopes : array, optional
        ALiBi: adds ``-slope * |i + (Lk - Lq) - j|`` to score ``(i, j)``, computed
        block by block (never an ``Lq x Lk`` array). One slope per batch element: a
        float array whose shape broadcasts to the batch shape, such as ``(H,)`` or
        ``(B, H)`` for q of shape ``(B, H, Lq, D)`` (FlashAttention's two shapes),
        or ``()`` for one slope.
    softcap : float, optional
        Soft-capping (Gemma 2, Grok): each scaled score ``s`` becomes
        ``softcap * tanh(s / softcap)``, in ``(-softcap, softcap)``. Positive.
    dropout_p : float, optional
        Dropout on the attention probabilities, in ``[0, 1)``: each probability is
        dropped (set to 0) with probability ``dropout_p`` and the kept ones are divided
        by ``1 - dropout_p``. Default 0.0, no dropout. ``lse`` is not changed by it.
    seed : int, optional
        In ``[0, 2**64)``; needed when ``dropout_p > 0`` (checked but unused otherwise).
        The keep mask is a function of ``seed`` and each score's batch element, row and
        column only (Philox4x32-10, see Notes): the same seed gives the same mask on
        every call, whatever the tiling, and :func:`attention_backward` with the same
        seed recomputes it.
    return_lse : bool, optional
        Also return the natural-log logsumexp of each row of final scores (after
        scale, softcap, bias and masking).
    out : array, optional
        Preallocated output of shape ``(..., Lq, Dv)`` and the inputs' dtype and
        array type. It must not overlap q, k, v, bias, mask or alibi_slopes.

    Returns
    -------
    out : array, shape ``(broadcast batch..., Lq, Dv)``, the inputs' dtype
    lse : array, shape ``(broadcast batch..., Lq)``, only if ``return_lse``
        float32 (float64 for float64 inputs). ``-inf`` for a row that sees no key.

    Raises
    ------
    TypeError
        Mixed NumPy and CuPy arrays, unsupported or mixed dtypes, a non-real ``scale``,
        ``softcap`` or ``dropout_p``, a ``seed`` that is not an int, a ``bias`` or
        ``alibi_slopes`` that is not float, a ``mask`` that is not bool, a ``window``
        that is not a pair of ints or None, or an ``out`` of the wrong type or dtype.
    ValueError
        Arrays with fewer than 2 dimensions, ``D`` of q and k that differ, ``Lk`` of k
        and v that differ, batch dimensions that do not broadcast, a non-finite
        ``scale``, a ``softcap`` that is not positive and finite, a negative
        ``window`` side, a ``bias`` or ``mask`` that does not broadcast to
        ``(batch..., Lq, Lk)``, ``alibi_slopes`` that do not broadcast to the batch
        shape, a ``dropout_p`` outside ``[0, 1)``, a ``seed`` outside ``[0, 2**64)``
        or missing with ``dropout_p > 0``, or an ``out`` of the wrong shape or that
        overlaps an input.

    Notes
    -----
    Scores are accumulated in float32 for float16, bfloat16 and float32 inputs (float64
    for float64); the softmax is computed online, one key block at a time, keeping
    the running row maximum ``m_i``, the running sum ``l_i`` and the unnormalised
    output ``acc``, which is rescaled by ``exp(m_old - m_new)`` whenever the maximum
    grows and divided by ``l_i`` once at the end. Extra memory is ``O(Lq * Dv)`` per
    batch element plus one block of scores, never ``O(Lq * Lk)``.

    The variants change the scores in FlashAttention's order, block by block in the
    accumulator dtype::

        S = q k^T * scale
        S = softcap * tanh(S / softcap)               (softcap)
        S = S - slope * |i + (Lk - Lq) - j| + bias    (alibi_slopes, bias)
        S = -inf where mask, causal or window hides key j from query i
        out = softmax(S) v,  lse = logsumexp(S)

    So the cap acts on the scaled scores only, never on the bias or ALiBi, and the
    slopes are in units of the final scores (not multiplied by ``scale``).
    ``cupyflash.reference.attention`` takes the same options in float64.

    Dropout acts on the probabilities ``P = softmax(S)``, as in FlashAttention::

        out = (P * Z / (1 - dropout_p)) v,   lse = logsumexp(S)   (undropped)

    where the keep mask ``Z`` of score ``(b, i, j)`` (``b`` the row-major flat index
    of the batch element in the broadcast batch shape, ``i`` the query, ``j`` the key)
    comes from Philox4x32-10, the counter-based generator of cuRAND and Random123:
    with the key ``(seed & 0xFFFFFFFF, seed >> 32)`` and the counter
    ``(j >> 2, i, b & 0xFFFFFFFF, b >> 32)``, output word ``j & 3`` is a uniform
    uint32, and the score is dropped iff that word is below
    ``floor(dropout_p * 2**32)``. The NumPy backend draws the mask block by block and
    the GPU kernels tile by tile, never ``Lq x Lk`` of it, and both draw the same mask
    bit for bit; ``cupyflash.reference.dropout_mask`` returns the whole of it, and
    ``reference.attention`` takes ``dropout_p`` and ``seed`` too. On CuPy arrays dropout
    runs in the variants kernels (fp16/bf16 in the mma.sync kernel, also on Hopper,
    where the wgmma kernel has no dropout).

    A score of ``-inf`` gives its key zero weight, so a row of only ``-inf`` scores
    gives zeros and ``lse = -inf``, never NaN. NaN or ``+inf`` scores give NaN
    (where a mask, causal or window hides a key, its score is ``-inf`` whatever it
    was). With ``softcap``, a raw score of ``-inf`` (an infinite q or k) becomes
    ``-softcap``, a finite score: hide keys with ``mask`` or ``bias`` instead.

    Copies: the NumPy backend gathers one block of q, k, v at a time (in float32 for
    half-precision inputs), and one block of bias and mask, without their broadcast
    dimensions. The CuPy backend reads any strides whose last dimension is
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

    Variants: a padding mask of shape ``(B, 1, 1, Lk)`` (never expanded), a sliding
    window of 32 keys back with ALiBi slopes per head, and soft-capped scores.

    >>> q, k, v = (rng.standard_normal((2, 4, 96, 16)) for _ in range(3))  # float64
    >>> lengths = np.array([96, 50])                   # batch 1 has 46 padding keys
    >>> keep = np.arange(96) < lengths[:, None, None, None]
    >>> keep.shape
    (2, 1, 1, 96)
    >>> slopes = 2.0 ** -np.arange(1, 5)               # (H,): one slope per head
    >>> out = cupyflash.attention(q, k, v, mask=keep, window=(32, 0), alibi_slopes=slopes,
    ...                           softcap=30.0)
    >>> expected = cupyflash.reference.attention(q, k, v, mask=keep, window=(32, 0),
    ...                                          alibi_slopes=slopes, softcap=30.0)
    >>> bool(np.abs(out - expected).max() < 1e-12)
    True

    Dropout: the same seed gives the same mask, and the reference draws it too.

    >>> out = cupyflash.attention(q, k, v, causal=True, dropout_p=0.1, seed=1234)
    >>> again = cupyflash.attention(q, k, v, causal=True, dropout_p=0.1, seed=1234)
    >>> bool((out == again).all())
    True
    >>> expected = cupyflash.reference.attention(q, k, v, causal=True, dropout_p=0.1,
    ...                                          seed=1234)
    >>> bool(np.abs(out - expected).max() < 1e-12)
    True
    >>> keep = cupyflash.reference.dropout_mask(1234, 0.1, (2, 4), 96, 96)
    >>> keep.shape, round(float(keep.mean()), 2)
    ((2, 4, 96, 96), 0.9)
    """
    fn = "attention"
    xp_name, given = _as_arrays_with_variants(fn, ("q", "k", "v"), (q, k, v), bias, mask,
                                              alibi_slopes)
    q, k, v = given["q"], given["k"], given["v"]
    bias, mask, alibi_slopes = given.get("bias"), given.get("mask"), given.get("alibi_slopes")
    problem = validate_attention(fn, q, k, v, causal, scale)
    validate_variants(fn, problem, bias, mask, window, alibi_slopes, softcap)
    validate_dropout(fn, problem, dropout_p, seed)
    _check_bool(fn, "return_lse", return_lse)
    if out is not None:
        check_out(fn, out, xp_name, problem.out_shape, problem.dtype, list(given.items()))
    variants = dict(bias=bias, mask=mask, alibi_slopes=alibi_slopes)
    result, lse = _forward(xp_name, q, k, v, problem, out, **variants)
    return (result, lse) if return_lse else result


def _as_arrays_with_variants(fn, names, arrays, bias, mask, alibi_slopes):
    """:func:`_as_arrays` of ``arrays`` and the variant arrays that are given: ``(xp_name,
    {name: array})``, the variants left out where they are None."""
    names, arrays = list(names), list(arrays)
    for name, x in (("bias", bias), ("mask", mask), ("alibi_slopes", alibi_slopes)):
        if x is not None:
            names.append(name)
            arrays.append(x)
    xp_name, arrays = _as_arrays(fn, names, arrays)
    return xp_name, dict(zip(names, arrays))


def _check_bool(fn, name, x):
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be a bool, got {type(x).__name__}")


def _forward(xp_name, q, k, v, problem, out, bias=None, mask=None, alibi_slopes=None):
    if xp_name == "cupy":
        from . import _cupy_backend
        return _cupy_backend.attention_forward(q, k, v, problem, out, bias=bias, mask=mask,
                                               alibi_slopes=alibi_slopes)
    return _numpy_backend.attention_forward(q, k, v, problem, out, bias=bias, mask=mask,
                                            alibi_slopes=alibi_slopes)


# ----------------------------------------------------------------------------------------
# the backward pass
# ----------------------------------------------------------------------------------------

def attention_backward(dout, q, k, v, out, lse, *, causal=False, scale=None, bias=None,
                       mask=None, window=None, alibi_slopes=None, softcap=None,
                       dropout_p=0.0, seed=None, return_dbias=False, deterministic=False,
                       dq=None, dk=None, dv=None):
    r"""Gradients of :func:`attention` with respect to q, k and v, and optionally ``bias``
    (FlashAttention-2's backward pass, which recomputes the probabilities from ``lse``).

    For ``out, lse = attention(q, k, v, causal=causal, scale=scale, return_lse=True,
    **variants)`` and the gradient ``dout`` of a loss with respect to ``out``, returns
    the gradients of that loss with respect to q, k and v (and ``bias``).

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
    causal, scale, bias, mask, window, alibi_slopes, softcap, dropout_p, seed :
        The forward pass's options, as for :func:`attention`, validated the same way.
        They must be the forward's own: the probabilities are recomputed from them,
        and with ``dropout_p > 0`` the keep mask from ``seed``.
        On CuPy arrays every option runs (softcap and dropout included).
    return_dbias : bool, optional
        Also return the gradient of ``bias`` (which must then be given): an array of
        bias's shape and dtype, ``dS`` summed over the dimensions along which bias was
        broadcast. Its memory is bias's size (in float32, float64 for float64 inputs,
        while it is summed). On CuPy arrays a broadcast bias is summed with atomic
        adds; with ``deterministic=True`` it is summed from an array of the full
        ``(batch..., Lq, Lk)`` shape instead, whose memory that costs.
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
    dbias : array of bias's shape and dtype, only if ``return_dbias``

    Raises
    ------
    TypeError
        Mixed NumPy and CuPy arrays, unsupported or mixed dtypes (dout and out must
        have the dtype of q, k and v; lse float32 or float64), a non-real ``scale``, a
        non-bool ``causal``, ``deterministic`` or ``return_dbias``, a ``dq``, ``dk``,
        ``dv`` of the wrong type or dtype, or any type error of the variants and of
        ``dropout_p`` and ``seed`` as in :func:`attention`.
    ValueError
        Any shape error of :func:`attention` (the variants' included), a dout, out or
        lse of the wrong shape, a non-finite ``scale``, ``return_dbias=True`` without a
        ``bias``, a ``dropout_p`` or ``seed`` out of range or a missing ``seed`` as in
        :func:`attention`, or a ``dq``, ``dk``, ``dv`` of the wrong shape or that
        overlaps an input or another output.

    Notes
    -----
    With the raw scores ``S0 = q k^T \cdot scale``, the final scores ``S`` of
    :func:`attention` (capped, plus ALiBi and bias, ``-inf`` where mask, causal or
    window hide a key), ``P = softmax(S)``, the weights ``W`` of ``O = W v`` and the
    keep mask ``Z`` that ``seed`` draws (``W = P`` and ``Z = 1`` without dropout):

    .. math::

        W = P \circ Z / (1 - p_{drop}), \quad
        dV = W^T dO, \quad dP = (dO\, V^T) \circ Z / (1 - p_{drop}), \quad
        \Delta_i = \sum_c dO_{ic} O_{ic}, \quad
        dS = P \circ (dP - \Delta),

        dS_0 = dS \circ \left(1 - \tanh^2(S_0 / \mathrm{softcap})\right)
        \ (\text{softcap; else } dS_0 = dS), \quad
        dQ = dS_0\, K \cdot scale, \quad dK = dS_0^T Q \cdot scale

    (``p_drop`` is ``dropout_p``; ``\Delta_i = \sum_j P_{ij} dP_{ij}`` holds with dropout
    too) and ``dbias = dS``, summed over the dimensions along which ``bias`` broadcasts to
    ``(batch..., Lq, Lk)`` (a ``(B, 1, 1, Lk)`` bias gets the sum over heads and
    query rows). A hidden key has ``P = 0`` and so ``dS = 0``: ``mask``, ``window``
    and a ``-inf`` bias pass no gradient, and ``alibi_slopes`` and ``mask`` get none.
    The NumPy backend skips the blocks outside the causal and window band and those the
    mask hides entirely, as the forward does.

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

    Variants, and the gradient of a padding bias of shape ``(B, 1, 1, Lk)``: summed
    over the heads and the query rows it was broadcast along.

    >>> q, k, v = (rng.standard_normal((2, 4, 64, 16)) for _ in range(3))  # float64
    >>> bias = rng.standard_normal((2, 1, 1, 64))
    >>> options = dict(bias=bias, window=(16, 0), alibi_slopes=2.0 ** -np.arange(1, 5),
    ...                softcap=30.0)
    >>> out, lse = cupyflash.attention(q, k, v, return_lse=True, **options)
    >>> dout = rng.standard_normal(out.shape)
    >>> dq, dk, dv, dbias = cupyflash.attention_backward(dout, q, k, v, out, lse,
    ...                                                  return_dbias=True, **options)
    >>> dbias.shape
    (2, 1, 1, 64)
    >>> expected = cupyflash.reference.attention_backward(dout, q, k, v, return_dbias=True,
    ...                                                   **options)
    >>> all(bool(np.abs(g - e).max() < 1e-12) for g, e in zip((dq, dk, dv, dbias), expected))
    True

    Dropout: the backward takes the forward's ``dropout_p`` and ``seed`` and redraws the
    same mask.

    >>> out, lse = cupyflash.attention(q, k, v, causal=True, dropout_p=0.2, seed=7,
    ...                                return_lse=True)
    >>> dq, dk, dv = cupyflash.attention_backward(dout, q, k, v, out, lse, causal=True,
    ...                                           dropout_p=0.2, seed=7)
    >>> expected = cupyflash.reference.attention_backward(dout, q, k, v, causal=True,
    ...                                                   dropout_p=0.2, seed=7)
    >>> all(bool(np.abs(g - e).max() < 1e-12) for g, e in zip((dq, dk, dv), expected))
    True
    """
    fn = "attention_backward"
    xp_name, given = _as_arrays_with_variants(fn, ("dout", "q", "k", "v", "out", "lse"),
                                              (dout, q, k, v, out, lse), bias, mask,
                                              alibi_slopes)
    dout, q, k, v, out, lse = (given[n] for n in ("dout", "q", "k", "v", "out", "lse"))
    variants = dict(bias=given.get("bias"), mask=given.get("mask"),
                    alibi_slopes=given.get("alibi_slopes"))
    problem = validate_attention(fn, q, k, v, causal, scale)
    validate_variants(fn, problem, variants["bias"], variants["mask"], window,
                      variants["alibi_slopes"], softcap)
    validate_dropout(fn, problem, dropout_p, seed)
    _check_return_dbias(fn, return_dbias, variants["bias"])
    _check_backward_arrays(fn, xp_name, problem, dout, q, k, v, out, lse, deterministic,
                           dq, dk, dv, variants)
    return _backward(xp_name, dout, q, k, v, out, lse, problem, deterministic, dq, dk, dv,
                     variants, return_dbias)


def _check_return_dbias(fn, return_dbias, bias):
    _check_bool(fn, "return_dbias", return_dbias)
    if return_dbias and bias is None:
        raise ValueError(f"{fn}: return_dbias=True needs a bias; got bias=None")


def _check_backward_arrays(fn, xp_name, problem, dout, q, k, v, out, lse, deterministic,
                           dq, dk, dv, variants=None):
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
    inputs += tuple((name, x) for name, x in (variants or {}).items() if x is not None)
    checked = []
    for name, g, x in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if g is None:
            continue
        check_out(fn, g, xp_name, x.shape, problem.dtype, inputs, name=name)
        for other_name, other in checked:
            if _overlap(xp_name, g, other):
                raise ValueError(f"{fn}: {name} must not overlap {other_name}")
        checked.append((name, g))


def _backward(xp_name, dout, q, k, v, out, lse, problem, deterministic, dq, dk, dv,
              variants=None, return_dbias=False):
    if xp_name == "cupy":
        from . import _cupy_backward
        return _cupy_backward.attention_backward(dout, q, k, v, out, lse, problem,
                                                 deterministic, dq, dk, dv,
                                                 return_dbias=return_dbias,
                                                 **(variants or {}))
    return _numpy_backend.attention_backward(dout, q, k, v, out, lse, problem, dq, dk, dv,
                                             return_dbias=return_dbias, **(variants or {}))


def attention_vjp(q, k, v, *, causal=False, scale=None, bias=None, mask=None, window=None,
                  alibi_slopes=None, softcap=None, dropout_p=0.0, seed=None,
                  return_dbias=False, deterministic=False):
    r"""Run :func:`attention` and return its output with a function that computes the
    gradients, in the style of ``jax.vjp``.

    Parameters
    ----------
    q, k, v, causal, scale, bias, mask, window, alibi_slopes, softcap, dropout_p, seed :
        As for :func:`attention`. ``vjp`` uses the same ``seed``, so its gradients are
        those of the dropout mask the forward drew.
    return_dbias, deterministic : bool, optional
        As for :func:`attention_backward`.

    Returns
    -------
    out : array, shape ``(broadcast batch..., Lq, Dv)``
        ``attention(q, k, v, causal=causal, scale=scale, **variants)``.
    vjp : callable
        ``vjp(dout) -> (dq, dk, dv)``, or ``(dq, dk, dv, dbias)`` with
        ``return_dbias=True``: :func:`attention_backward` with the saved out and lse
        and the same options, for a ``dout`` of out's shape and dtype. It may be
        called any number of times. It keeps references to q, k, v and the variant
        arrays (not copies): changing them in place between the two calls changes the
        gradients.

    Raises
    ------
    TypeError, ValueError
        As :func:`attention` for q, k, v and the options (and for ``deterministic``
        or ``return_dbias`` a TypeError if it is not a bool; ``return_dbias=True``
        without a bias, a ValueError); ``vjp`` raises as :func:`attention_backward`
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
    >>> bias = np.zeros((32, 32), dtype=np.float32)   # one bias shared by the batch
    >>> out, vjp = cupyflash.attention_vjp(q, k, v, bias=bias, softcap=5.0, return_dbias=True)
    >>> dq, dk, dv, dbias = vjp(np.ones_like(out))
    >>> dbias.shape, dbias.dtype
    ((32, 32), dtype('float32'))
    >>> out, vjp = cupyflash.attention_vjp(q, k, v, dropout_p=0.1, seed=42)  # one mask
    >>> dq, dk, dv = vjp(np.ones_like(out))
    """
    fn = "attention_vjp"
    xp_name, given = _as_arrays_with_variants(fn, ("q", "k", "v"), (q, k, v), bias, mask,
                                              alibi_slopes)
    q, k, v = given["q"], given["k"], given["v"]
    variants = dict(bias=given.get("bias"), mask=given.get("mask"),
                    alibi_slopes=given.get("alibi_slopes"))
    problem = validate_attention(fn, q, k, v, causal, scale)
    validate_variants(fn, problem, variants["bias"], variants["mask"], window,
                      variants["alibi_slopes"], softcap)
    validate_dropout(fn, problem, dropout_p, seed)
    _check_return_dbias(fn, return_dbias, variants["bias"])
    _check_bool(fn, "deterministic", deterministic)
    out, lse = _forward(xp_name, q, k, v, problem, None, **variants)

    def vjp(dout):
        """``(dq, dk, dv)`` (and ``dbias``): the gradients of the loss whose gradient
        w.r.t. out is dout."""
        _, (d, _) = _as_arrays(fn, ("dout", "q"), (dout, q))  # dout of q's array type
        _check_backward_arrays(fn, xp_name, problem, d, q, k, v, out, lse, deterministic,
                               None, None, None)
        return _backward(xp_name, d, q, k, v, out, lse, problem, deterministic,
                         None, None, None, variants, return_dbias)

    return out, vjp


# ----------------------------------------------------------------------------------------
# merging partial results
# ----------------------------------------------------------------------------------------

def _parts(fn, name, x):
    """``(names, parts)`` of a sequence of arrays, or of an array stacked along axis 0."""
    if isinstance(x, (list, tuple)):
        return [f"{name}[{i}]" for i in range(len(x))], list(x)
    if not (isinstance(x, np.ndarray) or _is_cupy_array(x)):
        try:
            x = np.asarray(x)
        except Exception as e:
            raise TypeError(f"{fn}: {name} could not be converted to an array ({e})") from None
    if x.ndim == 0:
        raise ValueError(f"{fn}: {name} must be a sequence of arrays or an array stacked "
                         f"along a leading axis, got a 0-dimensional array")
    return [f"{name}[{i}]" for i in range(x.shape[0])], [x[i] for i in range(x.shape[0])]


def merge_attention(outs, lses):
    r"""Merge the results of attention over disjoint sets of keys into the attention over
    all of them, exactly: the lse-weighted sum of chunked or distributed attention.

    Parameters
    ----------
    outs : array ``(K, ..., Lq, Dv)``, or a sequence of ``K`` arrays ``(..., Lq, Dv)``
        The partial outputs, e.g. ``attention(q, k_part, v_part)`` for ``K`` parts of
        the keys. They share one dtype: float16, bfloat16, float32 or float64.
    lses : array ``(K, ..., Lq)``, or a sequence of ``K`` arrays ``(..., Lq)``
        Their lse (``return_lse=True``): float32 or float64, ``lses[k].shape ==
        outs[k].shape[:-1]``. Stacked arrays and sequences may be mixed.

    Returns
    -------
    out : array of shape ``(..., Lq, Dv)``, the dtype of ``outs``
    lse : array of shape ``(..., Lq)``, float32 (float64 for float64 ``outs``)

    Raises
    ------
    TypeError
        Mixed NumPy and CuPy arrays, an unsupported or mixed dtype of ``outs``, or a
        dtype of ``lses`` other than float32 and float64.
    ValueError
        No parts, different numbers of parts in ``outs`` and ``lses``, parts of
        different shapes, or an lse whose shape is not its out's without the last
        dimension.

    Notes
    -----
    .. math::

        \mathrm{lse} = \log \sum_k e^{\mathrm{lse}_k}, \qquad
        \mathrm{out} = \sum_k e^{\mathrm{lse}_k - \mathrm{lse}}\, \mathrm{out}_k

    computed with the maximum ``m`` of the ``lse_k`` as the shift (``l = sum_k
    exp(lse_k - m)``, ``lse = m + log(l)``, ``out = sum_k exp(lse_k - m) out_k / l``),
    so huge lse values do not overflow. A part with ``lse_k = -inf`` (it saw no key)
    contributes nothing, whatever its out; if every part is ``-inf``, out is zeros and
    lse ``-inf``, never NaN. NaN in an lse gives NaN. Sums are in float32 (float64 for
    float64 ``outs``); the merge is exact up to rounding, and the order of the parts
    changes only rounding.

    Works on NumPy and CuPy arrays alike, with the array module's own operations
    (no kernel of cupyflash); CuPy in, CuPy out.

    Examples
    --------
    >>> import numpy as np
    >>> import cupyflash
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((4, 64, 32), dtype=np.float32)
    >>> k = rng.standard_normal((4, 300, 32), dtype=np.float32)
    >>> v = rng.standard_normal((4, 300, 32), dtype=np.float32)
    >>> parts = [cupyflash.attention(q, k[:, j:j + 100], v[:, j:j + 100], return_lse=True)
    ...          for j in range(0, 300, 100)]          # three chunks of the keys
    >>> out, lse = cupyflash.merge_attention(*zip(*parts))
    >>> expected, expected_lse = cupyflash.attention(q, k, v, return_lse=True)
    >>> bool(np.abs(out - expected).max() < 1e-5), bool(np.abs(lse - expected_lse).max() < 1e-5)
    (True, True)
    """
    fn = "merge_attention"
    out_names, out_parts = _parts(fn, "outs", outs)
    lse_names, lse_parts = _parts(fn, "lses", lses)
    if not out_parts or not lse_parts:
        raise ValueError(f"{fn}: outs and lses must hold at least one part each, got "
                         f"{len(out_parts)} and {len(lse_parts)}")
    if len(out_parts) != len(lse_parts):
        raise ValueError(f"{fn}: outs has {len(out_parts)} parts but lses has "
                         f"{len(lse_parts)}")
    K = len(out_parts)
    xp_name, arrays = _as_arrays(fn, out_names + lse_names, out_parts + lse_parts)
    out_parts, lse_parts = arrays[:K], arrays[K:]
    for name, o in zip(out_names, out_parts):
        _check_dtype(fn, name, o)
    dtype = out_parts[0].dtype
    if any(o.dtype != dtype for o in out_parts):
        kinds = ", ".join(f"{n} {o.dtype.name}" for n, o in zip(out_names, out_parts))
        raise TypeError(f"{fn}: outs must share one dtype; got {kinds}")
    for name, x in zip(lse_names, lse_parts):
        if x.dtype not in (np.float32, np.float64):
            raise TypeError(f"{fn}: {name} must have dtype float32 or float64, "
                            f"got {x.dtype.name}")
    shape = tuple(out_parts[0].shape)
    if not shape:
        raise ValueError(f"{fn}: {out_names[0]} must have at least 1 dimension "
                         f"(..., Lq, Dv), got shape ()")
    for name, o in zip(out_names, out_parts):
        if tuple(o.shape) != shape:
            raise ValueError(f"{fn}: {name} has shape {tuple(o.shape)} but {out_names[0]} "
                             f"has {shape}; every part must have one shape")
    for name, x in zip(lse_names, lse_parts):
        if tuple(x.shape) != shape[:-1]:
            raise ValueError(f"{fn}: {name} must have shape {shape[:-1]} "
                             f"(the parts of outs without their last dimension), "
                             f"got {tuple(x.shape)}")
    if xp_name == "cupy":
        import cupy as xp
    else:
        xp = np
    return _merge(xp, out_parts, lse_parts, dtype)


def _merge(xp, out_parts, lse_parts, dtype):
    """The merge of validated parts with ``xp``'s own operations, in the accumulator dtype."""
    acc_t = accumulator_dtype(dtype)
    neg_inf, zero = acc_t.type(-np.inf), acc_t.type(0)
    lse_k = [x.astype(acc_t) for x in lse_parts]
    # m = max_k lse_k (NaN propagates); shift by 0 where m is not finite, so that a row
    # of only -inf parts gives exp(-inf) = 0 everywhere.
    m = lse_k[0]
    for x in lse_k[1:]:
        m = xp.maximum(m, x)
    m_safe = xp.where(xp.isfinite(m), m, zero)
    l = xp.zeros(m.shape, dtype=acc_t)                            # sum_k exp(lse_k - m)
    acc = xp.zeros(out_parts[0].shape, dtype=acc_t)               # sum_k exp(lse_k - m) out_k
    for o, x in zip(out_parts, lse_k):
        w = xp.exp(x - m_safe)
        l += w
        # a part that saw no key (lse_k = -inf) adds nothing, not 0 * its out
        acc += xp.where(xp.isneginf(x)[..., None], zero, w[..., None] * o.astype(acc_t))
    empty = l == 0
    out = (acc / xp.where(empty, acc_t.type(1), l)[..., None]).astype(dtype)
    lse = xp.where(empty, neg_inf, m_safe + xp.log(xp.where(empty, acc_t.type(1), l)))
    return out, lse


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
