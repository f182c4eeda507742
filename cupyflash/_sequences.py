"""Packed variable-length attention and decoding with a KV cache: validation and the
NumPy implementation.

Both functions reduce to the tiled forward of ``_numpy_backend`` on views: a packed
sequence ``q[cu_q[i]:cu_q[i + 1]]`` of shape ``(Lq_i, H, D)`` is viewed as
``(Hk, G, Lq_i, D)`` (``G = H // Hk`` query heads per key/value head) and its keys as
``(Hk, 1, Lk_i, D)``, so grouped-query attention is the forward's broadcasting and
nothing is padded. The forward keeps to one ``BLOCK_M x BLOCK_N`` block of scores; the
only copies are the key blocks of a paged cache, gathered one split at a time.

Split-KV decoding ("flash-decoding") attends each of ``num_splits`` chunks of a
sequence's keys separately, keeps each partial output in the accumulator dtype, and
merges them exactly through their lse with :func:`cupyflash.merge_attention`: the
algorithm of the GPU kernels.

CuPy arrays are validated like NumPy arrays (the same checks, the same messages, on host
copies of the integer arrays); then ``attention_decode`` runs the kernels of
``_cupy_decode`` and ``attention_varlen`` runs all sequences in one launch of the packed
kernels (``_cupy_backend.attention_varlen_forward``), or, for fp16/bf16 head dims above
128, the GPU forward per sequence on the same views.
"""

import numbers

import numpy as np

from . import _api, _numpy_backend

# ----------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------


def _check_integer(fn, name, x, ndim):
    if not (np.issubdtype(x.dtype, np.integer) and x.dtype != np.bool_):
        raise TypeError(f"{fn}: {name} must have an integer dtype (int32 as in "
                        f"FlashAttention), got {x.dtype.name}")
    if x.ndim != ndim:
        raise ValueError(f"{fn}: {name} must have {ndim} dimension{'s' * (ndim > 1)}, "
                         f"got shape {tuple(x.shape)}")


def _host(x):
    """A NumPy int64 copy of an integer array (CuPy arrays come to the host)."""
    if _api._is_cupy_array(x):
        x = x.get()
    return np.asarray(x).astype(np.int64)


def _check_heads(fn, q_name, H, k_name, Hk):
    if Hk < 1 or H % Hk:
        raise ValueError(f"{fn}: the number of query heads {q_name} ({H}) must be a "
                         f"multiple of the number of key/value heads {k_name} ({Hk})")


def _check_qkv(fn, names, arrays, ndim, layout):
    """ndim, dtypes (float, one dtype) and head dims of q, k, v-like arrays."""
    for name, x in zip(names, arrays):
        if x.ndim != ndim:
            raise ValueError(f"{fn}: {name} must have {ndim} dimensions {layout}, "
                             f"got shape {tuple(x.shape)}")
    for name, x in zip(names, arrays):
        _api._check_dtype(fn, name, x)
    if len({x.dtype for x in arrays}) != 1:
        kinds = ", ".join(f"{n} {x.dtype.name}" for n, x in zip(names, arrays))
        raise TypeError(f"{fn}: {', '.join(names)} must share one dtype; got {kinds}")
    q, k = arrays[0], arrays[1]
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{fn}: {names[0]}.shape[-1] ({q.shape[-1]}) must equal "
                         f"{names[1]}.shape[-1] ({k.shape[-1]})")
    if q.shape[-1] < 1:
        raise ValueError(f"{fn}: the head dimension {names[0]}.shape[-1] must be at "
                         f"least 1, got 0")


def _check_options(fn, causal, scale, return_lse, D):
    """causal, scale and return_lse, checked by ``_api``'s rules; returns the scale."""
    empty = np.empty((0, D))
    problem = _api.validate_attention(fn, empty, empty, empty, causal, scale)
    _api._check_bool(fn, "return_lse", return_lse)
    return problem.scale


def _grouped(x, Hk):
    """``(L, H, D)`` -> the view ``(Hk, H // Hk, L, D)``: query head ``h`` is in group
    ``h // (H // Hk)``, as in FlashAttention."""
    L, H, D = x.shape
    return x.reshape(L, Hk, H // Hk, D).transpose(1, 2, 0, 3)


def _kv_view(x):
    """``(L, Hk, D)`` -> the view ``(Hk, 1, L, D)``, broadcast over each group."""
    return x.transpose(1, 0, 2)[:, None]


def _forward(q, k, v, causal, scale, out, window=None):
    """The forward of :func:`cupyflash.attention` on ``(Hk, G, Lq, D)`` / ``(Hk, 1, Lk, D)``
    views: the tiled NumPy forward, or the fused kernels for CuPy arrays. Writes ``out``
    (a view; for NumPy possibly of another dtype) and returns the lse ``(Hk, G, Lq)``."""
    problem = _api.validate_attention("", q, k, v, causal, scale)  # checked already
    problem.window = window
    if _api._is_cupy_array(q):
        from . import _cupy_backend
        _, lse = _cupy_backend.attention_forward(q, k, v, problem, out)
    else:
        _, lse = _numpy_backend.attention_forward(q, k, v, problem, out)
    return lse


# ----------------------------------------------------------------------------------------
# attention_varlen
# ----------------------------------------------------------------------------------------

def _check_cu_seqlens(fn, name, cu, total, total_name):
    if cu.shape[0] < 1:
        raise ValueError(f"{fn}: {name} must hold n_seq + 1 >= 1 offsets, got shape "
                         f"{tuple(cu.shape)}")
    if cu[0] != 0:
        raise ValueError(f"{fn}: {name}[0] must be 0, got {int(cu[0])}")
    steps = np.diff(cu)
    if (steps < 0).any():
        i = int(np.argmax(steps < 0))
        raise ValueError(f"{fn}: {name} must be non-decreasing (prefix sums of the "
                         f"sequence lengths), but {name}[{i + 1}] ({int(cu[i + 1])}) < "
                         f"{name}[{i}] ({int(cu[i])})")
    if cu[-1] != total:
        raise ValueError(f"{fn}: {name}[-1] ({int(cu[-1])}) must equal {total_name} "
                         f"({total})")


def _check_max_seqlen_type(fn, name, value):
    if value is not None and (isinstance(value, (bool, np.bool_))
                              or not isinstance(value, numbers.Integral)):
        raise TypeError(f"{fn}: {name} must be an int or None, got {type(value).__name__}")


def _check_max_seqlen(fn, name, value, lengths):
    """The longest length: ``value`` (checked by :func:`_check_max_seqlen_type`), which
    must be at least the actual longest, or that when None."""
    actual = int(lengths.max(initial=0))
    if value is None:
        return actual
    if value < actual:
        raise ValueError(f"{fn}: {name} ({int(value)}) is less than the longest sequence "
                         f"({actual})")
    return int(value)


def _device_offsets(given, host, device_id):
    """The int32 device offsets a packed kernel reads: the caller's CuPy array when it is
    int32 and contiguous, else a copy of the validated host offsets on ``device_id``,
    beside q (``_cupy_backend.uploaded``: no wait, and kept for the next calls with the
    same offsets; all below 2^31: they index rows that a tensor map or an int row
    coordinate reaches)."""
    from . import _cupy_backend
    if (_api._is_cupy_array(given) and given.dtype == np.int32
            and given.flags.c_contiguous):
        return given
    return _cupy_backend.uploaded(device_id, ("offsets", host.tobytes()),
                                  lambda: host.astype(np.int32))


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None,
                     max_seqlen_k=None, causal=False, scale=None, return_lse=False,
                     out=None):
    r"""Attention over a batch of sequences of different lengths, packed along one axis
    without padding (FlashAttention's ``flash_attn_varlen_func``).

    Sequence ``i`` attends its queries ``q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]]`` to its
    keys and values ``k[cu_seqlens_k[i]:cu_seqlens_k[i + 1]]``, exactly as
    :func:`attention` would on that sequence alone; no padding is stored or computed.

    Parameters
    ----------
    q : array, shape ``(total_q, H, D)``
        The queries of all sequences, one after another.
    k : array, shape ``(total_k, Hk, D)``
    v : array, shape ``(total_k, Hk, Dv)``
        Keys and values. ``H`` must be a multiple of ``Hk`` (grouped-query attention):
        query head ``h`` uses key/value head ``h // (H // Hk)``, as in FlashAttention.
        q, k and v share one dtype: float16, bfloat16, float32 or float64.
    cu_seqlens_q, cu_seqlens_k : integer arrays, shape ``(n_seq + 1,)``
        Prefix sums of the sequence lengths (int32 in FlashAttention; any integer dtype
        is accepted): ``cu[0] == 0``, non-decreasing, ``cu[-1]`` = total_q (total_k).
        Sequences may be empty. With CuPy q, k, v they may be CuPy arrays or host
        arrays (NumPy arrays, lists); host offsets spare the call its wait for the GPU
        (see Notes).
    max_seqlen_q, max_seqlen_k : int, optional
        The longest sequence, as FlashAttention takes it (it sizes the GPU grid). If
        given it must be at least the actual longest; None computes it.
    causal : bool, optional
        The causal mask of :func:`attention` per sequence, aligned to the bottom-right
        corner of that sequence: query ``t`` of sequence ``i`` sees key ``s`` iff
        ``s <= t + (Lk_i - Lq_i)``.
    scale : float, optional
        Default ``1 / sqrt(D)``.
    return_lse : bool, optional
        Also return the lse.
    out : array, optional
        A preallocated ``(total_q, H, Dv)`` output of the inputs' dtype and array type
        that does not overlap an input.

    Returns
    -------
    out : array, shape ``(total_q, H, Dv)``, the inputs' dtype
    lse : array, shape ``(H, total_q)``, only if ``return_lse``
        FlashAttention's varlen layout; float32 (float64 for float64 inputs). A query
        that sees no key (an empty key sequence, or hidden by ``causal``) gets an
        output row of zeros and ``lse = -inf``, never NaN.

    Raises
    ------
    TypeError
        Mixed NumPy and CuPy arrays (other than host offsets with CuPy q, k, v),
        unsupported or mixed dtypes of q, k, v, offsets that are not integers, a non-int
        ``max_seqlen_*``, or as :func:`attention` for ``causal``, ``scale``,
        ``return_lse`` and ``out``.
    ValueError
        q, k, v not 3-dimensional, head dims that differ, ``H`` not a multiple of
        ``Hk``, offsets that are not 1-dimensional, differ in length, do not start at
        0, decrease or do not end at the total, a ``max_seqlen_*`` below the longest
        sequence, or a bad ``out``.

    Notes
    -----
    On NumPy arrays each sequence runs the tiled forward of :func:`attention` on views
    of the packed arrays (no ``Lq x Lk`` matrix). On CuPy arrays one launch of the fused
    kernel covers every sequence: a grid sized by the longest sequence over
    ``(n_seq, H)``, each block moved to its own sequence's rows (FlashAttention's varlen
    kernel); only float16/bfloat16 with head dims above 128 run the fused kernel once
    per non-empty sequence on strided views. The offsets are validated on the host:
    CuPy offsets are read there, which waits for the GPU to finish the work queued
    before the call (the kernel's own preparation is done before that read, so the GPU
    then idles only for the validation and the launch). Offsets already on the host
    (where a data loader produces them) are copied to the GPU without any wait, and the
    call returns before the GPU has run it, as :func:`attention` does.
    ``cupyflash.reference.attention_varlen`` is the float64 truth.

    Examples
    --------
    >>> import numpy as np
    >>> import cupyflash
    >>> rng = np.random.default_rng(0)
    >>> cu = np.array([0, 5, 5, 12], dtype=np.int32)        # lengths 5, 0 and 7
    >>> q = rng.standard_normal((12, 4, 16), dtype=np.float32)   # (total, H, D)
    >>> k = rng.standard_normal((12, 2, 16), dtype=np.float32)   # 2 key/value heads
    >>> v = rng.standard_normal((12, 2, 16), dtype=np.float32)
    >>> out, lse = cupyflash.attention_varlen(q, k, v, cu, cu, causal=True, return_lse=True)
    >>> out.shape, lse.shape
    ((12, 4, 16), (4, 12))
    >>> expected = cupyflash.reference.attention_varlen(q, k, v, cu, cu, causal=True)
    >>> bool(np.abs(out - expected).max() < 1e-5)
    True
    """
    fn = "attention_varlen"
    names = ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"]
    given = (q, k, v, cu_seqlens_q, cu_seqlens_k)
    if all(_api._is_cupy_array(x) for x in given[:3]):
        # CuPy data; offsets on the device or the host (then nothing waits for the GPU)
        xp_name, (q, k, v) = "cupy", given[:3]
        cu_q, cu_k = (x if _api._is_cupy_array(x) else _api._as_arrays(fn, [n], [x])[1][0]
                      for n, x in zip(names[3:], given[3:]))
    else:
        xp_name, (q, k, v, cu_q, cu_k) = _api._as_arrays(fn, names, given)
    _check_qkv(fn, ("q", "k", "v"), (q, k, v), 3, "(total, heads, head dim)")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"{fn}: k.shape[:2] {tuple(k.shape[:2])} must equal "
                         f"v.shape[:2] {tuple(v.shape[:2])} (total_k, Hk)")
    _check_heads(fn, "q.shape[1]", q.shape[1], "k.shape[1]", k.shape[1])
    _check_integer(fn, "cu_seqlens_q", cu_q, 1)
    _check_integer(fn, "cu_seqlens_k", cu_k, 1)
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"{fn}: cu_seqlens_q {tuple(cu_q.shape)} and cu_seqlens_k "
                         f"{tuple(cu_k.shape)} must have one shape (n_seq + 1,)")
    scale = _check_options(fn, causal, scale, return_lse, q.shape[-1])
    _check_max_seqlen_type(fn, "max_seqlen_q", max_seqlen_q)
    _check_max_seqlen_type(fn, "max_seqlen_k", max_seqlen_k)
    total_q, H, _ = q.shape
    Hk, Dv = k.shape[1], v.shape[-1]
    if out is not None:
        _api.check_out(fn, out, xp_name, (total_q, H, Dv), q.dtype,
                       (("q", q), ("k", k), ("v", v)))
    if xp_name == "cupy":
        import cupy as xp
    else:
        xp = np
    if out is None:
        out = xp.empty((total_q, H, Dv), dtype=q.dtype)
    lse = xp.empty((H, total_q), dtype=_api.accumulator_dtype(q.dtype))
    launch = None
    if xp_name == "cupy" and max(q.shape[0], k.shape[0]) < 2**31:
        from . import _cupy_backend
        # all the host work that needs no offsets, before device offsets are read
        launch = _cupy_backend.prepare_varlen_forward(q, k, v, cu_q.shape[0] - 1,
                                                      bool(causal), scale, out, lse)
    given_cu = (cu_q, cu_k)
    cu_q, cu_k = _host(cu_q), _host(cu_k)  # device offsets: waits for the GPU
    _check_cu_seqlens(fn, "cu_seqlens_q", cu_q, q.shape[0], "q.shape[0]")
    _check_cu_seqlens(fn, "cu_seqlens_k", cu_k, k.shape[0], "k.shape[0]")
    lengths_q, lengths_k = np.diff(cu_q), np.diff(cu_k)
    max_seqlen_q = _check_max_seqlen(fn, "max_seqlen_q", max_seqlen_q, lengths_q)
    max_seqlen_k = _check_max_seqlen(fn, "max_seqlen_k", max_seqlen_k, lengths_k)
    if launch is not None:
        device_id = q.data.device_id
        launch(_device_offsets(given_cu[0], cu_q, device_id),
               _device_offsets(given_cu[1], cu_k, device_id),
               max_seqlen_q, max_seqlen_k, (lengths_q, lengths_k))
        return (out, lse) if return_lse else out
    for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        if a == b:
            continue
        # (Hk, G, Lq_i, Dv) views of out; the forward writes straight into them
        lse_i = _forward(_grouped(q[a:b], Hk), _kv_view(k[c:d]), _kv_view(v[c:d]),
                         causal, scale, _grouped(out[a:b], Hk))
        lse[:, a:b] = lse_i.reshape(H, b - a)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------
# attention_decode
# ----------------------------------------------------------------------------------------

class _Cache:
    """Where key ``t`` of sequence ``b`` lives: ``cache[b, t]`` (contiguous) or
    ``cache[block_table[b, t // block_size], t % block_size]`` (paged)."""

    def __init__(self, block_table, block_size):
        self.table, self.block_size = block_table, block_size

    def slots(self, b, t0, t1):
        """The index of keys ``t0 .. t1 - 1`` of sequence ``b`` into a cache array."""
        if self.table is None:
            return (b, slice(t0, t1))
        t = np.arange(t0, t1)
        return (self.table[b, t // self.block_size], t % self.block_size)


# num_splits=None on the NumPy backend: one split. On the CPU more splits add work (a merge)
# and no parallelism; on the GPU they fill the SMs when B * Hk is small
# (_cupy_decode.choose_num_splits).
DEFAULT_SPLITS_NUMPY = 1


# attention_decode's integer arguments: with CuPy data they may be on the host
_DECODE_INTS = ("cache_seqlens", "block_table")


def attention_decode(q, k_cache, v_cache, cache_seqlens, *, k_new=None, v_new=None,
                     block_table=None, num_splits=None, causal=False, scale=None,
                     return_lse=False):
    r"""Attention of a few new queries against a KV cache, optionally appending new keys
    and values to the cache first (FlashAttention's ``flash_attn_with_kvcache``).

    For each batch element ``b`` the queries ``q[b]`` attend the first
    ``n_b = cache_seqlens[b] + L_new`` keys of the cache: the ``cache_seqlens[b]`` keys
    already there, then the ``L_new`` keys of ``k_new[b]`` (if given), which are first
    written into the cache in place at positions ``cache_seqlens[b] ..
    cache_seqlens[b] + L_new - 1``.

    Parameters
    ----------
    q : array, shape ``(B, Lq, H, D)``
        The new queries (``Lq`` is usually 1).
    k_cache : array, shape ``(B, max_len, Hk, D)``, or ``(num_blocks, block_size, Hk, D)``
    v_cache : array, shape ``(B, max_len, Hk, Dv)``, or ``(num_blocks, block_size, Hk, Dv)``
        The cache: contiguous per batch element, or paged (with ``block_table``): a pool
        of blocks of ``block_size`` positions. ``H`` must be a multiple of ``Hk``;
        query head ``h`` uses key/value head ``h // (H // Hk)``. One float dtype for
        q, the caches, k_new and v_new.
    cache_seqlens : integer array, shape ``(B,)``
        The number of keys already in the cache of each batch element. It is read,
        never modified: after an append, pass ``cache_seqlens + L_new`` next time.
        With CuPy q and caches it may be a CuPy array or a host array (NumPy, list):
        host lengths spare the call its wait for the GPU (see Notes).
    k_new : array, shape ``(B, L_new, Hk, D)``, optional
    v_new : array, shape ``(B, L_new, Hk, Dv)``, optional
        Keys and values to append in place (both or neither). ``cache_seqlens[b] +
        L_new`` must fit in the cache (``max_len``, or ``max_blocks_per_seq *
        block_size``), and the slots written must be distinct.
    block_table : integer array, shape ``(B, max_blocks_per_seq)``, optional
        For a paged cache: position ``t`` of sequence ``b`` lives at
        ``cache[block_table[b, t // block_size], t % block_size]``. The entries that
        cover the ``n_b`` keys must lie in ``[0, num_blocks)``; the others are ignored
        (padding such as -1 is fine). On the device or the host, as ``cache_seqlens``.
    num_splits : int, optional
        Split-KV decoding ("flash-decoding"): the ``n_b`` keys are cut into
        ``num_splits`` contiguous chunks, each attended separately, and the partial
        results merged exactly through their lse (:func:`merge_attention`). The result
        equals ``num_splits=1`` up to rounding. None chooses: 1 on the NumPy backend;
        on the GPU enough splits to fill the multiprocessors when ``B * Hk`` blocks do
        not (the GPU cuts at whole tiles of keys, and launches no split that would be
        empty for every batch element).
    causal : bool, optional
        Bottom-right aligned as in :func:`attention`: the ``Lq`` queries are the last
        ``Lq`` positions, so query ``i`` sees key ``j`` iff ``j <= i + n_b - Lq``.
    scale : float, optional
        Default ``1 / sqrt(D)``.
    return_lse : bool, optional
        Also return the lse.

    Returns
    -------
    out : array, shape ``(B, Lq, H, Dv)``, the inputs' dtype
    lse : array, shape ``(B, H, Lq)``, only if ``return_lse``
        FlashAttention's layout; float32 (float64 for float64 inputs). A query that
        sees no key (``n_b = 0``) gets zeros and ``lse = -inf``, never NaN.

    Raises
    ------
    TypeError
        Mixed NumPy and CuPy arrays (other than host ``cache_seqlens`` and
        ``block_table`` with CuPy data), unsupported or mixed float dtypes, integer
        arguments that are not integer arrays, a non-int ``num_splits``, or as
        :func:`attention` for ``causal``, ``scale`` and ``return_lse``.
    ValueError
        Arrays of the wrong number of dimensions or of shapes that disagree, ``H`` not
        a multiple of ``Hk``, only one of ``k_new`` and ``v_new``, negative
        ``cache_seqlens``, a cache too short for ``cache_seqlens + L_new``, block
        indices out of range, an append that writes one slot twice, ``num_splits <
        1``, or a read-only cache when appending. On the GPU also: arrays on different
        devices, a head dim ``max(D, Dv)`` above 256, or a cache of ``2**30`` or more
        positions per sequence.

    Notes
    -----
    Only the append writes: it changes ``k_cache`` and ``v_cache`` (and nothing else)
    after every check has passed. Each batch element (and split) runs the tiled NumPy
    forward on views of the contiguous cache; a paged cache has the keys of one split
    gathered into a buffer first. Split partial outputs are kept in the accumulator
    dtype (float32, float64 for float64), as FlashAttention's split-KV kernel does,
    and rounded once after the merge. ``cupyflash.reference.attention_decode`` is the
    float64 truth.

    On CuPy arrays the checks read ``cache_seqlens`` and ``block_table`` to the host (a
    synchronisation: their values decide whether the call is valid), unless they are
    host arrays already: then they are checked there and copied to the GPU without a
    wait, so a decoding loop that keeps its lengths on the host queues its steps
    without draining the GPU. Then a small kernel appends ``k_new`` and ``v_new``, and
    the split-KV kernel (``cuda/flash_decode.cuh``) reads each key and value once per
    kv head for all ``G * Lq`` query rows that use it and merges the splits through
    their lse, all on CuPy's current stream. q, the cache and the new keys are read in
    place, with any strides.

    Examples
    --------
    >>> import numpy as np
    >>> import cupyflash
    >>> rng = np.random.default_rng(0)
    >>> k_cache = np.zeros((2, 64, 2, 16), dtype=np.float32)   # (B, max_len, Hk, D)
    >>> v_cache = np.zeros((2, 64, 2, 16), dtype=np.float32)
    >>> lengths = np.array([10, 3], dtype=np.int32)           # keys already cached
    >>> q = rng.standard_normal((2, 1, 4, 16), dtype=np.float32)   # one new token, H = 4
    >>> k_new = rng.standard_normal((2, 1, 2, 16), dtype=np.float32)
    >>> v_new = rng.standard_normal((2, 1, 2, 16), dtype=np.float32)
    >>> out = cupyflash.attention_decode(q, k_cache, v_cache, lengths, k_new=k_new,
    ...                                  v_new=v_new, causal=True)
    >>> out.shape, bool((k_cache[1, 3] == k_new[1, 0]).all())   # appended in place
    ((2, 1, 4, 16), True)
    >>> lengths += 1                                          # the caller's bookkeeping
    >>> again = cupyflash.attention_decode(q, k_cache, v_cache, lengths, num_splits=3)
    >>> bool(np.abs(again - out).max() < 1e-5)
    True

    A paged cache: blocks of 16 positions from a shared pool.

    >>> pool_k = rng.standard_normal((8, 16, 2, 16), dtype=np.float32)
    >>> pool_v = rng.standard_normal((8, 16, 2, 16), dtype=np.float32)
    >>> table = np.array([[5, 2, -1], [7, 0, 1]], dtype=np.int32)   # -1: unused
    >>> out = cupyflash.attention_decode(q, pool_k, pool_v, np.array([20, 40]),
    ...                                  block_table=table)
    >>> expected = cupyflash.reference.attention_decode(q, pool_k, pool_v,
    ...                                                 np.array([20, 40]), block_table=table)
    >>> bool(np.abs(out - expected).max() < 1e-5)
    True
    """
    fn = "attention_decode"
    names = ["q", "k_cache", "v_cache", "cache_seqlens"]
    arrays = [q, k_cache, v_cache, cache_seqlens]
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{fn}: k_new and v_new must be given together, got "
                         f"{'k_new' if v_new is None else 'v_new'} only")
    for name, x in (("k_new", k_new), ("v_new", v_new), ("block_table", block_table)):
        if x is not None:
            names.append(name)
            arrays.append(x)
    host_ints = set()   # integer arguments given on the host with CuPy data
    float_given = [x for n, x in zip(names, arrays) if n not in _DECODE_INTS]
    if all(_api._is_cupy_array(x) for x in float_given):
        # CuPy data; cache_seqlens and block_table on the device or on the host (then
        # nothing waits for the GPU: they are checked where they are)
        xp_name = "cupy"
        for i, (n, x) in enumerate(zip(names, arrays)):
            if n in _DECODE_INTS and not _api._is_cupy_array(x):
                arrays[i] = _api._as_arrays(fn, [n], [x])[1][0]
                host_ints.add(n)
    else:
        xp_name, arrays = _api._as_arrays(fn, names, arrays)
    given = dict(zip(names, arrays))
    q, k_cache, v_cache = given["q"], given["k_cache"], given["v_cache"]
    k_new, v_new = given.get("k_new"), given.get("v_new")
    block_table = given.get("block_table")
    float_names = [n for n in ("q", "k_cache", "v_cache", "k_new", "v_new") if n in given]
    _check_qkv(fn, float_names, [given[n] for n in float_names], 4,
               "(batch, length, heads, head dim)")
    B, Lq, H, D = q.shape
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"{fn}: k_cache.shape[:3] {tuple(k_cache.shape[:3])} must equal "
                         f"v_cache.shape[:3] {tuple(v_cache.shape[:3])}")
    Hk, Dv = k_cache.shape[2], v_cache.shape[3]
    _check_heads(fn, "q.shape[2]", H, "k_cache.shape[2]", Hk)
    paged = block_table is not None
    if paged:
        _check_integer(fn, "block_table", block_table, 2)
        if block_table.shape[0] != B:
            raise ValueError(f"{fn}: block_table.shape[0] ({block_table.shape[0]}) must "
                             f"equal the batch size q.shape[0] ({B})")
        block_size = k_cache.shape[1]
        capacity = block_table.shape[1] * block_size
        capacity_text = (f"the paged capacity block_table.shape[1] * k_cache.shape[1] "
                         f"({capacity})")
    else:
        if k_cache.shape[0] != B:
            raise ValueError(f"{fn}: k_cache.shape[0] ({k_cache.shape[0]}) must equal the "
                             f"batch size q.shape[0] ({B}); a paged cache needs block_table")
        block_size, capacity = None, k_cache.shape[1]
        capacity_text = f"the cache length k_cache.shape[1] ({capacity})"
    L_new = 0
    if k_new is not None:
        for name, x, width in (("k_new", k_new, D), ("v_new", v_new, Dv)):
            expected = (B, k_new.shape[1], Hk, width)
            if tuple(x.shape) != expected:
                raise ValueError(f"{fn}: {name} must have shape (B, L_new, Hk, "
                                 f"{'D' if width == D else 'Dv'}) = {expected}, "
                                 f"got {tuple(x.shape)}")
        L_new = k_new.shape[1]
    _check_integer(fn, "cache_seqlens", given["cache_seqlens"], 1)
    if given["cache_seqlens"].shape[0] != B:
        raise ValueError(f"{fn}: cache_seqlens must have shape (B,) = ({B},), got "
                         f"{tuple(given['cache_seqlens'].shape)}")
    seqlens = _host(given["cache_seqlens"])
    if (seqlens < 0).any():
        b = int(np.argmax(seqlens < 0))
        raise ValueError(f"{fn}: cache_seqlens[{b}] ({int(seqlens[b])}) must be >= 0")
    lengths = seqlens + L_new                                     # n_b: keys attended
    if (lengths > capacity).any():
        b = int(np.argmax(lengths > capacity))
        what = f"cache_seqlens[{b}] + L_new ({int(seqlens[b])} + {L_new})" if L_new else \
            f"cache_seqlens[{b}] ({int(seqlens[b])})"
        raise ValueError(f"{fn}: {what} exceeds {capacity_text}")
    table = None
    if paged:
        table = _host(block_table)
        num_blocks = k_cache.shape[0]
        used = np.arange(table.shape[1])[None, :] * block_size < lengths[:, None]
        bad = used & ((table < 0) | (table >= num_blocks))
        if bad.any():
            b, j = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{fn}: block_table[{b}, {j}] ({int(table[b, j])}) is out of "
                             f"range for {num_blocks} blocks (k_cache.shape[0])")
        if L_new:
            t = seqlens[:, None] + np.arange(L_new)[None, :]          # (B, L_new)
            written = table[np.arange(B)[:, None], t // block_size] * block_size \
                + t % block_size
            if np.unique(written).size != written.size:
                raise ValueError(f"{fn}: the append of k_new would write one cache slot "
                                 f"twice: block_table maps two new positions to one block")
    if num_splits is not None:
        if isinstance(num_splits, (bool, np.bool_)) or \
                not isinstance(num_splits, numbers.Integral):
            raise TypeError(f"{fn}: num_splits must be an int or None, "
                            f"got {type(num_splits).__name__}")
        if num_splits < 1:
            raise ValueError(f"{fn}: num_splits must be >= 1, got {int(num_splits)}")
    scale = _check_options(fn, causal, scale, return_lse, D)
    if L_new and xp_name == "numpy":
        for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
            if not x.flags.writeable:
                raise ValueError(f"{fn}: {name} is read-only, but k_new is to be "
                                 f"appended to it")
    if xp_name == "cupy":
        from . import _cupy_backend, _cupy_decode
        ints = {}
        for name, host in (("cache_seqlens", seqlens), ("block_table", table)):
            if name in host_ints:   # a copy beside q, no wait (validated: all fit int32)
                ints[name] = _cupy_backend.uploaded(
                    q.data.device_id, (name, host.shape, host.tobytes()),
                    lambda host=host: host.astype(np.int32))
            else:
                ints[name] = given.get(name)
        out, lse = _cupy_decode.attention_decode(
            q, k_cache, v_cache, ints["cache_seqlens"], k_new, v_new, ints["block_table"],
            num_splits=num_splits, causal=bool(causal), scale=scale,
            max_keys=int(lengths.max(initial=0)),
            min_keys=int(lengths.min()) if lengths.size else 0)
        return (out, lse) if return_lse else out

    cache = _Cache(table, block_size)
    # Append k_new, v_new in place: the only write to an input.
    for b in range(B if L_new else 0):
        where = cache.slots(b, seqlens[b], lengths[b])
        k_cache[where] = k_new[b]
        v_cache[where] = v_new[b]

    splits = DEFAULT_SPLITS_NUMPY if num_splits is None else int(num_splits)
    acc_t = _api.accumulator_dtype(q.dtype)
    out = np.empty((B, Lq, H, Dv), dtype=q.dtype)
    lse = np.empty((B, H, Lq), dtype=acc_t)
    for b in range(B):
        n = int(lengths[b])
        q_b = _grouped(q[b], Hk)                                  # (Hk, G, Lq, D)
        chunk = max(1, -(-n // splits))
        bounds = [(t0, min(t0 + chunk, n)) for t0 in range(0, n, chunk)] or [(0, 0)]
        outs, lses = [], []
        for t0, t1 in bounds:
            where = cache.slots(b, t0, t1)
            o = np.empty((Hk, H // Hk, Lq, Dv), dtype=acc_t)     # partial out, in acc
            # Causal: query i sees key t iff t <= i + n - Lq; for keys t0 .. t1 - 1 seen
            # as a sequence of their own that is the window (None, n - t1) around its
            # bottom-right diagonal (and plain causal for the last chunk).
            window = (None, n - t1) if causal else None
            lses.append(_forward(q_b, _kv_view(k_cache[where]), _kv_view(v_cache[where]),
                                 False, scale, o, window=window))
            outs.append(o)
        o, l = (outs[0], lses[0]) if len(outs) == 1 else _api.merge_attention(outs, lses)
        out[b] = o.reshape(H, Lq, Dv).transpose(1, 0, 2)
        lse[b] = l.reshape(H, Lq)
    return (out, lse) if return_lse else out
