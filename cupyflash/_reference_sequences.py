"""Float64 ground truth of packed variable-length attention and KV-cache decoding.

Written plainly from the definitions: a loop over the sequences, each one standard
attention (:func:`cupyflash.reference.attention`, the full score matrix in float64) with
its key/value heads repeated for grouped-query attention. Exported through
:mod:`cupyflash.reference`. Inputs may be NumPy or CuPy arrays of any float dtype; the
results are float64 NumPy arrays. Nothing is ever modified: where
:func:`cupyflash.attention_decode` appends ``k_new`` to the cache in place, the reference
only reads it.
"""

import numpy as np


def _host(x):
    if hasattr(x, "get"):  # a CuPy array: bring it to the host
        x = x.get()
    return np.asarray(x)


def _sequence_attention(q, k, v, *, causal, scale):
    """Attention of one sequence: q ``(Lq, H, D)``, k ``(Lk, Hk, D)``, v ``(Lk, Hk, Dv)``
    -> out ``(Lq, H, Dv)``, lse ``(H, Lq)``; query head h uses key/value head
    ``h // (H // Hk)``."""
    from .reference import attention
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k, group, axis=1)                      # (Lk, H, D): head h -> h // group
    v = np.repeat(v, group, axis=1)
    out, lse = attention(q.transpose(1, 0, 2), k.transpose(1, 0, 2), v.transpose(1, 0, 2),
                         causal=causal, scale=scale, return_lse=True)   # (H, Lq, Dv)
    return out.transpose(1, 0, 2), lse


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, scale=None,
                     return_lse=False):
    """Packed variable-length attention in float64: ``out (total_q, H, Dv)`` and, with
    ``return_lse``, ``lse (H, total_q)``.

    Sequence ``i`` is standard attention of ``q[cu_q[i]:cu_q[i + 1]]`` against
    ``k[cu_k[i]:cu_k[i + 1]]`` and ``v[cu_k[i]:cu_k[i + 1]]`` (causal: aligned to that
    sequence's bottom-right corner); query head ``h`` uses key/value head
    ``h // (H // Hk)``.

    >>> q, k, v = np.zeros((3, 1, 1)), np.ones((3, 1, 1)), np.ones((3, 1, 1))
    >>> out, lse = attention_varlen(q, k, v, [0, 1, 3], [0, 2, 3], return_lse=True)
    >>> np.exp(lse)        # sequence 0 sees 2 keys, sequence 1 sees 1
    array([[2., 1., 1.]])
    """
    q, k, v = (_host(x).astype(np.float64) for x in (q, k, v))
    cu_q, cu_k = _host(cu_seqlens_q), _host(cu_seqlens_k)
    H, Dv = q.shape[1], v.shape[-1]
    out = np.zeros((q.shape[0], H, Dv))
    lse = np.full((H, q.shape[0]), -np.inf)
    for i in range(len(cu_q) - 1):
        a, b, c, d = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        out[a:b], lse[:, a:b] = _sequence_attention(q[a:b], k[c:d], v[c:d], causal=causal,
                                                    scale=scale)
    return (out, lse) if return_lse else out


def attention_decode(q, k_cache, v_cache, cache_seqlens, *, k_new=None, v_new=None,
                     block_table=None, causal=False, scale=None, return_lse=False):
    """Attention of ``q (B, Lq, H, D)`` against a KV cache in float64: ``out (B, Lq, H,
    Dv)`` and, with ``return_lse``, ``lse (B, H, Lq)``.

    Batch element ``b`` attends its keys ``0 .. cache_seqlens[b] - 1`` from the cache
    followed by ``k_new[b]`` (if given), causal aligned to the bottom-right corner. Key
    ``t`` of element ``b`` is ``k_cache[b, t]``, or with a ``block_table``
    ``k_cache[block_table[b, t // block_size], t % block_size]``. The cache is read,
    never written.

    >>> k_cache = np.zeros((1, 4, 1, 1)); v_cache = np.arange(4.0).reshape(1, 4, 1, 1)
    >>> attention_decode(np.zeros((1, 1, 1, 1)), k_cache, v_cache, [3]).ravel()
    array([1.])
    """
    q, k_cache, v_cache = (_host(x).astype(np.float64) for x in (q, k_cache, v_cache))
    seqlens = _host(cache_seqlens)
    B, Lq, H, _ = q.shape
    out = np.zeros((B, Lq, H, v_cache.shape[-1]))
    lse = np.full((B, H, Lq), -np.inf)
    for b in range(B):
        t = np.arange(seqlens[b])
        if block_table is None:
            k, v = k_cache[b, t], v_cache[b, t]
        else:
            table = _host(block_table)
            block_size = k_cache.shape[1]
            blocks, offsets = table[b, t // block_size], t % block_size
            k, v = k_cache[blocks, offsets], v_cache[blocks, offsets]
        if k_new is not None:
            k = np.concatenate([k, _host(k_new)[b].astype(np.float64)])
            v = np.concatenate([v, _host(v_new)[b].astype(np.float64)])
        out[b], lse[b] = _sequence_attention(q[b], k, v, causal=causal, scale=scale)
    return (out, lse) if return_lse else out
