"""FlashAttention's forward algorithm on the CPU, with NumPy and BLAS.

The loop order is FlashAttention-2's: an outer loop over query blocks of ``BLOCK_M``
rows and an inner loop over key blocks of ``BLOCK_N`` rows. For each query block the
running row maximum ``m_i``, running sum ``l_i`` and unnormalised output ``acc`` are
kept; each key block rescales ``acc`` once, and ``acc`` is divided by ``l_i`` once at
the end. The ``Lq x Lk`` score matrix never exists: extra memory is one
``BLOCK_M x BLOCK_N`` block of scores and probabilities per batch element in flight,
plus the ``Lq x Dv`` accumulator.

Batch elements are processed ``chunk`` at a time (vectorised through ``np.matmul``), so
that many small heads cost few Python iterations while a single long sequence keeps
to one block of scores.
"""

import numpy as np

BLOCK_M = 256  # query rows per block
BLOCK_N = 256  # key rows per block
CHUNK_BYTES = 16 << 20  # score-block bytes in flight across a chunk of batch elements


def _acc_dtype(dtype):
    return np.float64 if dtype == np.float64 else np.float32


def attention_forward(q, k, v, problem, out=None, block_m=BLOCK_M, block_n=BLOCK_N):
    """Return ``(out, lse)`` for a validated problem (see ``_api.validate_attention``)."""
    p = problem
    acc_t = _acc_dtype(p.dtype)
    if out is None:
        out = np.empty(p.out_shape, dtype=p.dtype)
    lse = np.empty(p.lse_shape, dtype=acc_t)

    # Views of the full broadcast batch: stride 0 where an input is broadcast, no copy.
    # Unbatched (2-D) inputs get a batch of one, through views of out and lse.
    batch = p.batch_shape or (1,)
    q_all = np.broadcast_to(q, batch + q.shape[-2:])
    k_all = np.broadcast_to(k, batch + k.shape[-2:])
    v_all = np.broadcast_to(v, batch + v.shape[-2:])
    out_all = out.reshape(batch + out.shape[-2:]) if not p.batch_shape else out
    lse_all = lse.reshape(batch + lse.shape[-1:])
    n_batch = int(np.prod(batch, dtype=np.int64))
    if n_batch == 0 or p.Lq == 0:
        return out, lse

    chunk = max(1, CHUNK_BYTES // (block_m * block_n * np.dtype(acc_t).itemsize))
    offset = p.Lk - p.Lq  # causal: query i sees key j iff j <= i + offset
    for c0 in range(0, n_batch, chunk):
        idx = np.unravel_index(np.arange(c0, min(c0 + chunk, n_batch)), batch)
        for i0 in range(0, p.Lq, block_m):
            i1 = min(i0 + block_m, p.Lq)
            rows = slice(i0, i1)
            # Q_i, pre-multiplied by the scale: (n, BLOCK_M, D)
            q_i = q_all[idx + (rows,)].astype(acc_t) * acc_t(p.scale)
            m_i = np.full(q_i.shape[:2], -np.inf, dtype=acc_t)       # running row max
            l_i = np.zeros(q_i.shape[:2], dtype=acc_t)               # running row sum
            acc = np.zeros(q_i.shape[:2] + (p.Dv,), dtype=acc_t)     # unnormalised O_i
            # Causal: key blocks that start after the last visible key are skipped.
            n_end = min(p.Lk, i1 + offset) if p.causal else p.Lk
            for j0 in range(0, max(n_end, 0), block_n):
                j1 = min(j0 + block_n, n_end)
                cols = slice(j0, j1)
                k_j = k_all[idx + (cols,)].astype(acc_t)             # (n, BLOCK_N, D)
                v_j = v_all[idx + (cols,)].astype(acc_t)             # (n, BLOCK_N, Dv)
                # S = Q_i K_j^T * scale: (n, BLOCK_M, BLOCK_N)
                s = np.matmul(q_i, np.swapaxes(k_j, -1, -2))
                if p.causal and j1 - 1 > i0 + offset:  # the block crosses the diagonal
                    hidden = (np.arange(j0, j1)[None, :]
                              > np.arange(i0, i1)[:, None] + offset)
                    np.copyto(s, -np.inf, where=hidden)  # broadcast over the chunk
                # -- update m_i and l_i
                m_new = np.maximum(m_i, s.max(axis=-1))
                # A row with no visible key so far has m = -inf: use 0 so exp gives 0.
                m_safe = np.where(np.isneginf(m_new), 0, m_new)
                p_ij = np.exp(s - m_safe[..., None])                 # P~ = exp(S - m)
                alpha = np.exp(m_i - m_safe)                         # rescale of old acc
                l_i = alpha * l_i + p_ij.sum(axis=-1)
                # -- update acc
                acc *= alpha[..., None]
                acc += np.matmul(p_ij, v_j)
                m_i = m_new
            # O_i = acc / l_i; a row that saw no key (l_i = 0) gives zeros, lse = -inf.
            empty = l_i == 0
            o_i = acc / np.where(empty, 1, l_i)[..., None]
            with np.errstate(divide="ignore"):
                lse_i = np.where(empty, -np.inf, np.where(np.isneginf(m_i), 0, m_i) + np.log(l_i))
            out_all[idx + (rows,)] = o_i
            lse_all[idx + (rows,)] = lse_i
    return out, lse


def softmax_family(x, axes, kind):
    """softmax / log_softmax / logsumexp over ``axes`` in float32 (float64 for float64)."""
    xf = x.astype(_acc_dtype(x.dtype))
    m = np.max(xf, axis=axes, keepdims=True, initial=-np.inf)
    # m = +-inf or NaN: shift by 0 instead, so that -inf rows give exp(-inf) = 0,
    # +inf rows give a sum of +inf, and NaN still propagates through x.
    m_safe = np.where(np.isfinite(m), m, 0)
    with np.errstate(divide="ignore", over="ignore"):
        log_l = np.log(np.sum(np.exp(xf - m_safe), axis=axes, keepdims=True))
    if kind == "logsumexp":
        return np.squeeze(log_l + m_safe, axis=axes).astype(x.dtype)
    # (x - m) - log(l), not x - lse: lse = m + log(l) rounds log(l) to the spacing of m.
    log_l_safe = np.where(np.isneginf(log_l), 0, log_l)  # all -inf slice: -inf - 0 = -inf
    with np.errstate(invalid="ignore", over="ignore"):
        r = (xf - m_safe) - log_l_safe
    if kind == "softmax":
        r = np.exp(r)
    return r.astype(x.dtype)
