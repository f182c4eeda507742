"""Float64 ground truth: standard (full score matrix) safe-softmax attention.

Everything here is written for clarity, never for speed: the whole ``(..., Lq, Lk)``
score matrix is materialised in float64, exactly as in the "standard attention" that
FlashAttention replaces. The tests compare every backend of cupyflash against these
functions. They accept NumPy or CuPy arrays of any float dtype and always compute and
return float64 NumPy arrays.

Semantics shared with :func:`cupyflash.attention`:

* ``scale`` defaults to ``1 / sqrt(D)``;
* ``causal=True``: query ``i`` sees key ``j`` iff ``j <= i + (Lk - Lq)``
  (the mask is aligned to the bottom-right corner);
* ``window=(left, right)``: query ``i`` sees key ``j`` iff
  ``i + (Lk - Lq) - left <= j <= i + (Lk - Lq) + right`` (``None``: unbounded on that side);
* the order of operations: ``S = q k^T * scale``; ``S = softcap * tanh(S / softcap)``;
  ``S = S + alibi + bias`` with ``alibi_ij = -slope * |i + (Lk - Lq) - j|``; then
  ``S = -inf`` wherever ``mask``, ``causal`` or ``window`` hides a key;
* a score of ``-inf`` gives that key weight 0; a query row that sees no key at all
  (every score ``-inf`` or masked) returns zeros and ``lse = -inf``;
* ``dropout_p=p`` with a ``seed``: ``out = (P * Z / (1 - p)) v`` with ``P = softmax(S)``
  and the keep mask ``Z = dropout_mask(seed, p, batch_shape, Lq, Lk)`` (Philox4x32-10;
  see :func:`dropout_mask`); ``lse`` is that of the undropped scores.

>>> import numpy as np
>>> from cupyflash import reference
>>> q = k = v = np.eye(2)
>>> out, lse = reference.attention(q, k, v, scale=0.0, return_lse=True)
>>> out
array([[0.5, 0.5],
       [0.5, 0.5]])
>>> np.allclose(lse, np.log(2))
True
"""

import numpy as np

from . import _philox

__all__ = ["attention", "attention_backward", "causal_mask", "window_mask", "alibi_bias",
           "dropout_mask", "merge_attention", "softmax", "log_softmax", "logsumexp"]


def _as_float64(x):
    if hasattr(x, "get"):  # a CuPy array: bring it to the host
        x = x.get()
    return np.asarray(x).astype(np.float64)


def _as_bool(x):
    if hasattr(x, "get"):
        x = x.get()
    return np.asarray(x, dtype=bool)


def causal_mask(Lq, Lk):
    """Boolean ``(Lq, Lk)`` keep-mask: True where query ``i`` may see key ``j``.

    The diagonal is aligned to the bottom-right corner: ``j <= i + (Lk - Lq)``.

    >>> causal_mask(2, 4).astype(int)
    array([[1, 1, 1, 0],
           [1, 1, 1, 1]])
    """
    i = np.arange(Lq)[:, None]
    j = np.arange(Lk)[None, :]
    return j <= i + (Lk - Lq)


def window_mask(Lq, Lk, window):
    """Boolean ``(Lq, Lk)`` keep-mask of a sliding window ``(left, right)``.

    Query ``i`` sees key ``j`` iff ``i + (Lk - Lq) - left <= j <= i + (Lk - Lq) + right``:
    the window is centred on the causal diagonal, aligned to the bottom-right corner.
    ``None`` on either side means unbounded on that side.

    >>> window_mask(3, 5, (1, 0)).astype(int)  # a key and the one before it
    array([[0, 1, 1, 0, 0],
           [0, 0, 1, 1, 0],
           [0, 0, 0, 1, 1]])
    >>> window_mask(2, 4, (None, 1)).astype(int)
    array([[1, 1, 1, 1],
           [1, 1, 1, 1]])
    """
    left, right = window
    diag = np.arange(Lq)[:, None] + (Lk - Lq)  # the causal diagonal of row i
    j = np.arange(Lk)[None, :]
    keep = np.ones((Lq, Lk), dtype=bool)
    if left is not None:
        keep &= j >= diag - left
    if right is not None:
        keep &= j <= diag + right
    return keep


def alibi_bias(alibi_slopes, Lq, Lk):
    """The ALiBi bias ``-slope * |i + (Lk - Lq) - j|`` in float64, ``(..., Lq, Lk)``.

    ``alibi_slopes`` has the batch shape (one slope per batch element, broadcasting as
    the batch does, e.g. ``(H,)`` for q of shape ``(B, H, Lq, D)``); the result has that
    shape followed by ``(Lq, Lk)``.

    >>> alibi_bias(np.array([0.5]), 2, 3)
    array([[[-0.5, -0. , -0.5],
            [-1. , -0.5, -0. ]]])
    """
    slopes = _as_float64(alibi_slopes)
    distance = np.abs(np.arange(Lq)[:, None] + (Lk - Lq) - np.arange(Lk)[None, :])
    return -slopes[..., None, None] * distance


def dropout_mask(seed, dropout_p, batch_shape, Lq, Lk):
    """Boolean ``(batch..., Lq, Lk)`` keep-mask of dropout: True where a probability is kept.

    Philox4x32-10 (Salmon et al., SC 2011) with the key ``(seed & 0xFFFFFFFF, seed >> 32)``.
    Score ``(b, i, j)``, with ``b`` the row-major flat index into ``batch_shape``, takes
    output word ``j & 3`` of the counter ``(j >> 2, i, b & 0xFFFFFFFF, b >> 32)`` and is
    dropped iff that word is below ``floor(dropout_p * 2**32)``. Here every score gets its
    own Philox call (the whole matrix at once, four times the work of the backends, which
    share one call among four keys and compute one block at a time).

    >>> keep = dropout_mask(seed=0, dropout_p=0.5, batch_shape=(), Lq=2, Lk=6)
    >>> keep.astype(int)
    array([[0, 1, 1, 1, 1, 0],
           [0, 1, 0, 0, 0, 1]])
    >>> bool(dropout_mask(1, 0.0, (3,), 4, 5).all())
    True
    """
    batch_shape = tuple(batch_shape)
    b = np.arange(int(np.prod(batch_shape, dtype=np.int64))).reshape(batch_shape)
    b = b[..., None, None]                                        # (batch..., 1, 1)
    i = np.arange(Lq)[:, None]                                    # (Lq, 1)
    j = np.arange(Lk)[None, :]                                    # (1, Lk)
    counter = np.stack(np.broadcast_arrays(j >> 2, i, b & 0xFFFFFFFF, b >> 32), axis=-1)
    words = _philox.philox4x32(counter, [seed & 0xFFFFFFFF, seed >> 32])  # (..., Lq, Lk, 4)
    word = np.take_along_axis(words, np.broadcast_to(j & 3, words.shape[:-1])[..., None],
                              axis=-1)[..., 0]
    return word >= _philox.dropout_threshold(dropout_p)


def _dropout_mask_of(q, k, v, dropout_p, seed):
    """:func:`dropout_mask` for the broadcast batch of q, k and v, as float64 0s and 1s;
    None without dropout."""
    if not dropout_p:
        return None
    if seed is None:
        raise ValueError("reference: dropout_p > 0 needs a seed")
    batch_shape = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    keep = dropout_mask(seed, dropout_p, batch_shape, q.shape[-2], k.shape[-2])
    return keep.astype(np.float64)


def attention(q, k, v, *, causal=False, scale=None, return_lse=False, bias=None,
              mask=None, window=None, alibi_slopes=None, softcap=None, dropout_p=0.0,
              seed=None):
    """Standard attention ``softmax(q k^T * scale) v`` in float64, with its variants.

    Shapes ``q (..., Lq, D)``, ``k (..., Lk, D)``, ``v (..., Lk, Dv)``; leading
    dimensions broadcast. Returns ``out (..., Lq, Dv)`` and, with ``return_lse``,
    the natural-log logsumexp of the final scores (scaled, capped, biased and
    masked), ``(..., Lq)``.

    The options are those of :func:`cupyflash.attention`, applied in this order to the
    full score matrix::

        S = q k^T * scale
        S = softcap * tanh(S / softcap)                       if softcap
        S = S + alibi_bias(alibi_slopes, Lq, Lk)              if alibi_slopes
        S = S + bias                                          if bias
        S = -inf where not (mask & causal_mask & window_mask)
        P = softmax(S)
        P = P * Z / (1 - dropout_p)                           if dropout_p
        out = P v

    with ``Z = dropout_mask(seed, dropout_p, batch_shape, Lq, Lk)``; ``lse`` is always
    that of the final scores ``S``, undropped.

    >>> q = k = np.zeros((3, 2))
    >>> v = np.arange(3.0)[:, None]
    >>> attention(q, k, v, window=(1, 0))[:, 0]  # the mean of a key and the one before
    array([0. , 0.5, 1.5])
    >>> attention(q, k, v, mask=np.array([True, False, True]))[:, 0]
    array([1., 1., 1.])
    >>> dropout_mask(5, 0.5, (), 3, 3).astype(int)
    array([[1, 0, 1],
           [1, 0, 0],
           [1, 1, 0]])
    >>> attention(q, k, v, dropout_p=0.5, seed=5)[:, 0]  # P = 1/3, kept ones times 1/(1 - p)
    array([1.33333333, 0.        , 0.66666667])
    """
    q, k, v = _as_float64(q), _as_float64(k), _as_float64(v)
    s, _ = _scores(q, k, causal=causal, scale=scale, bias=bias, mask=mask, window=window,
                   alibi_slopes=alibi_slopes, softcap=softcap)
    lse = logsumexp(s, axis=-1)
    # P = softmax(S); rows with no visible key get all-zero probabilities
    p = softmax(s, axis=-1)
    z = _dropout_mask_of(q, k, v, dropout_p, seed)
    if z is not None:
        # dropout: P * Z / (1 - p), the kept probabilities scaled up (lse stays undropped)
        p = p * z / (1.0 - dropout_p)
    out = np.matmul(p, v)
    # v may bring batch dimensions that q and k lack: lse has the batch shape of out
    lse = np.broadcast_to(lse, out.shape[:-1]).copy()
    return (out, lse) if return_lse else out


def _scores(q, k, *, causal, scale, bias, mask, window, alibi_slopes, softcap):
    """The final score matrix of :func:`attention` (float64 q and k) and, with softcap,
    ``t = tanh(S0 / softcap)`` of the scaled scores ``S0`` (for the backward's chain
    rule; None without softcap)."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[-1])
    # S = Q K^T * scale: the full (..., Lq, Lk) score matrix
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * scale
    t = None
    if softcap is not None:
        t = np.tanh(s / softcap)
        s = softcap * t
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, Lq, Lk)
    if bias is not None:
        s = s + _as_float64(bias)
    keep = None
    if causal:
        keep = causal_mask(Lq, Lk)
    if window is not None:
        keep = window_mask(Lq, Lk, window) if keep is None else keep & window_mask(Lq, Lk, window)
    if mask is not None:
        keep = _as_bool(mask) if keep is None else keep & _as_bool(mask)
    if keep is not None:
        s = np.where(keep, s, -np.inf)
    return s, t


def merge_attention(outs, lses):
    """Merge partial attention results in float64: ``(out, lse)``.

    ``outs`` (``K`` parts of shape ``(..., Lq, Dv)``) and ``lses`` (``K`` parts of shape
    ``(..., Lq)``) are arrays stacked along a leading axis or sequences of arrays, e.g.
    the attention of one query block against ``K`` disjoint sets of keys. Then::

        lse = logsumexp_k lse_k
        out = sum_k exp(lse_k - lse) * out_k

    is the attention against all the keys. A part with ``lse_k = -inf`` contributes
    nothing (whatever its out); if every part is ``-inf``, out is zeros and lse ``-inf``.

    >>> out, lse = merge_attention([np.ones((1, 2)), np.zeros((1, 2))],
    ...                            [np.log([3.0]), np.log([1.0])])
    >>> out, np.exp(lse)
    (array([[0.75, 0.75]]), array([4.]))
    """
    if hasattr(outs, "shape"):
        outs = _as_float64(outs)
    else:
        outs = np.stack([_as_float64(o) for o in outs])
    if hasattr(lses, "shape"):
        lses = _as_float64(lses)
    else:
        lses = np.stack([_as_float64(x) for x in lses])
    lse = logsumexp(lses, axis=0)
    # exp(lse_k - lse), with lse = -inf only where every lse_k is -inf: there exp(-inf) = 0
    with np.errstate(invalid="ignore"):
        weights = np.exp(lses - np.where(np.isneginf(lse), 0.0, lse))
    parts = np.where(np.isneginf(lses)[..., None], 0.0, weights[..., None] * outs)
    return np.sum(parts, axis=0), lse


def attention_backward(dout, q, k, v, *, causal=False, scale=None, bias=None, mask=None,
                       window=None, alibi_slopes=None, softcap=None, return_dbias=False,
                       dropout_p=0.0, seed=None):
    """Gradients ``(dq, dk, dv)`` of standard attention in float64, from the full matrices.

    For ``out = attention(q, k, v, **options)`` and an upstream gradient ``dout`` of
    out's shape, returns the gradients of ``sum(dout * out)`` with respect to q, k and v,
    each with exactly the shape of its input: a gradient is summed over the batch
    dimensions its input was broadcast along (the leading dimensions it lacks, and those
    where it has size 1 and the batch more). The options are :func:`attention`'s, in its
    order of operations; with ``return_dbias=True`` (and a ``bias``) the gradient with
    respect to ``bias`` comes fourth, of bias's shape. The formulas, with every matrix
    materialised::

        S0    = q k^T * scale
        T     = tanh(S0 / softcap)                 (softcap; S0 = softcap * T)
        S     = softcap * T + alibi + bias         (-inf where mask, causal, window hide)
        P     = softmax(S)                         (a row that sees no key: P = 0)
        W     = P * Z / (1 - dropout_p)            (dropout; W = P without it)
        O     = W v
        dP    = (dout v^T) * Z / (1 - dropout_p)   (dropout; dout v^T without it)
        Delta = rowsum(dout * O)
        dS    = P * (dP - Delta)                   (the gradient w.r.t. S)
        dbias = dS summed over bias's broadcast dimensions
        dS0   = dS * (1 - T^2)                     (softcap; dS0 = dS without it)
        dq    = dS0 k * scale
        dk    = dS0^T q * scale
        dv    = W^T dout

    with the keep mask ``Z = dropout_mask(seed, dropout_p, batch_shape, Lq, Lk)``
    (``Delta = rowsum(dout * O) = rowsum(P * dP)`` holds with dropout too).
    ``mask``, ``window`` and ``alibi_slopes`` have no gradient. A row that sees no key
    gets zero gradients, never NaN.

    >>> import numpy as np
    >>> from cupyflash import reference
    >>> q = k = v = np.eye(2)
    >>> dq, dk, dv = reference.attention_backward(np.ones((2, 2)), q, k, v, scale=1.0)
    >>> dv  # dv[j] = sum_i P[i, j] * dout[i]: the two weights of each key sum to 1 here
    array([[1., 1.],
           [1., 1.]])
    >>> # sum(out) is 1 per row for v = I, whatever the weights: no score matters
    >>> bool(np.abs(dq).max() < 1e-15 and np.abs(dk).max() < 1e-15)
    True
    >>> # a bias shared by the rows: its gradient sums dS over them; each row of dS sums to 0
    >>> *_, dbias = reference.attention_backward(np.array([[1.0, 0.0], [0.0, 0.0]]), q, k, v,
    ...                                          bias=np.zeros(2), return_dbias=True)
    >>> dbias.shape, bool(abs(dbias.sum()) < 1e-15)
    ((2,), True)
    """
    dout, q, k, v = _as_float64(dout), _as_float64(q), _as_float64(k), _as_float64(v)
    if return_dbias and bias is None:
        raise ValueError("attention_backward: return_dbias=True needs a bias")
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[-1])
    # S = Q K^T * scale, capped, biased and masked; P = softmax(S), zero for a row that
    # sees no key
    s, t = _scores(q, k, causal=causal, scale=scale, bias=bias, mask=mask, window=window,
                   alibi_slopes=alibi_slopes, softcap=softcap)
    p = softmax(s, axis=-1)
    # W = P, or P * Z / (1 - p) with dropout: the weights of O = W V
    z = _dropout_mask_of(q, k, v, dropout_p, seed)
    w = p if z is None else p * z / (1.0 - dropout_p)
    out = np.matmul(w, v)
    # dP = dO V^T (times Z / (1 - p) with dropout); Delta = rowsum(dO * O) = rowsum(P * dP);
    # dS = P * (dP - Delta)
    dp = np.matmul(dout, np.swapaxes(v, -1, -2))
    if z is not None:
        dp = dp * z / (1.0 - dropout_p)
    delta = np.sum(dout * out, axis=-1, keepdims=True)
    ds = p * (dp - delta)
    dbias = _sum_to_shape(ds, np.shape(bias)) if return_dbias else None
    # softcap: d(softcap * tanh(S0 / softcap)) / dS0 = 1 - tanh^2
    ds0 = ds * (1 - t * t) if softcap is not None else ds
    # dQ = dS0 K * scale, dK = dS0^T Q * scale, dV = W^T dO
    dq = np.matmul(ds0, k) * scale
    dk = np.matmul(np.swapaxes(ds0, -1, -2), q) * scale
    dv = np.matmul(np.swapaxes(w, -1, -2), dout)
    grads = (_sum_to_shape(dq, q.shape), _sum_to_shape(dk, k.shape), _sum_to_shape(dv, v.shape))
    return grads + (dbias,) if return_dbias else grads


def _sum_to_shape(g, shape):
    """Sum ``g`` over the dimensions along which an input of ``shape`` was broadcast."""
    lead = g.ndim - len(shape)
    g = np.sum(g, axis=tuple(range(lead))) if lead else g
    ones = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return np.sum(g, axis=ones, keepdims=True) if ones else g


def _shift_and_log_sum(x, axis):
    """``(m, log_l)``, keepdims: the shift ``m`` (the max, or 0 where the max is not
    finite) and ``log_l = log(sum(exp(x - m)))``, so that ``logsumexp = m + log_l``."""
    m = np.max(x, axis=axis, keepdims=True, initial=-np.inf)
    # Shift by 0 where m is not finite: an all -inf row gives exp(-inf) = 0 and
    # log(0) = -inf; a row with +inf gives +inf; NaN propagates through x.
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", over="ignore"):
        return m_safe, np.log(np.sum(np.exp(x - m_safe), axis=axis, keepdims=True))


def logsumexp(x, axis=-1):
    """``log(sum(exp(x)))`` along ``axis`` in float64, safe for huge values.

    A row of only ``-inf`` gives ``-inf``; an empty row gives ``-inf``; a row with
    ``+inf`` gives ``+inf``.
    """
    x = _as_float64(x)
    m, log_l = _shift_and_log_sum(x, axis)
    return np.squeeze(log_l + m, axis=axis)


def softmax(x, axis=-1):
    """``exp(x) / sum(exp(x))`` along ``axis`` in float64 (safe softmax).

    A row of only ``-inf`` gives all zeros rather than NaN; a row with ``+inf`` gives
    NaN at the ``+inf`` entries.
    """
    return np.exp(log_softmax(x, axis=axis))


def log_softmax(x, axis=-1):
    """``x - logsumexp(x)`` along ``axis`` in float64, as ``(x - m) - log(l)``.

    The shift comes first: ``x - (m + log(l))`` would round ``log(l)`` to the spacing of
    ``m``, an error of order ``|m| * 2^-53`` that is all of ``log(2)`` at ``m = 1e300``.
    A row of only ``-inf`` gives all ``-inf`` (the log of the zero probabilities).
    """
    x = _as_float64(x)
    m, log_l = _shift_and_log_sum(x, axis)
    log_l = np.where(np.isneginf(log_l), 0.0, log_l)  # all -inf row: -inf - 0 = -inf
    with np.errstate(invalid="ignore", over="ignore"):
        return (x - m) - log_l


from ._reference_sequences import attention_decode, attention_varlen  # noqa: E402

__all__ += ["attention_varlen", "attention_decode"]
