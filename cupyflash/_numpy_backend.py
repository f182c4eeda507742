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

The variants of the forward change each block of scores where it is made: softcap,
ALiBi (from the block's row and column indices), a bias block and a mask block read
through the caller's own strides (a broadcast dimension stays broadcast, so a
``(B, 1, 1, Lk)`` padding mask is read as ``(n, 1, BLOCK_N)`` blocks), then the causal
and window band. Key blocks outside the band are never visited, and a key block that
the mask hides for every row of the query block is skipped before its product.

The backward pass is FlashAttention-2's too: an outer loop over key blocks, which own
their ``dK_j`` and ``dV_j`` accumulators, and an inner loop over query blocks, which
recompute ``P_ij = exp(S_ij - lse_i)`` from q, k and the forward's ``lse`` and add their
share to ``dQ_i``. Extra memory is the ``Lq x D`` accumulator of dQ and ``Delta`` per
batch element in flight, plus a few ``BLOCK_M x BLOCK_N`` blocks; never ``Lq x Lk``.
Each block of scores goes through the forward's own variants (``_score_variants``), the
query blocks outside the band of a key block are skipped, and so are blocks the mask
hides entirely. With softcap, ``dS`` is multiplied by ``1 - tanh^2`` of the raw scores
before dQ and dK; the gradient of a bias, when asked for, is ``dS`` itself, summed block
by block into a buffer of the bias's shape.

Dropout draws its keep mask ``Z`` block by block too (``_philox.dropout_keep_block``: one
Philox4x32-10 call per row and four keys of the block, from the batch element's flat index,
the row and the column only), so any tiling, forward or backward, draws the same mask. The
forward adds the undropped ``P~`` to ``l_i`` and the dropped ``P~ * Z`` to ``acc``, and
multiplies ``O_i`` by ``1 / (1 - dropout_p)`` at the end; the backward uses
``W = P * Z / (1 - dropout_p)`` for dV and ``dP * Z / (1 - dropout_p)`` in dS.
"""

import numpy as np

from . import _philox

BLOCK_M = 256  # query rows per block
BLOCK_N = 256  # key rows per block
CHUNK_BYTES = 16 << 20  # score-block bytes in flight across a chunk of batch elements


def _acc_dtype(dtype):
    return np.float64 if dtype == np.float64 else np.float32


class _Blocks:
    """Blocks of a bias or mask that broadcasts to ``(batch..., Lq, Lk)``, read in place.

    ``block(idx, rows, cols)`` returns the block of the batch elements ``idx``
    (unravelled indices into the full batch) as an array that broadcasts against the
    ``(n, rows, cols)`` block of scores: dimensions where the array has size 1 keep
    size 1 (``(n, 1, cols)`` for a padding mask ``(B, 1, 1, Lk)``; ``(rows, cols)``
    for a mask shared by the whole batch), so nothing is expanded beyond one block.
    A stride-0 dimension (an ``np.broadcast_to`` view) counts as the size-1 dimension
    it repeats.
    """

    def __init__(self, x, batch):
        view = x[(np.newaxis,) * (len(batch) + 2 - x.ndim)]      # left-pad with 1s
        self.view = view[tuple(slice(0, 1) if stride == 0 else slice(None)
                               for stride in view.strides)]
        self.keep = tuple(n != 1 for n in self.view.shape[:-2])   # dimensions it really has
        self.full_rows = self.view.shape[-2] != 1
        self.full_cols = self.view.shape[-1] != 1

    def block(self, idx, rows, cols):
        r = rows if self.full_rows else slice(None)
        c = cols if self.full_cols else slice(None)
        if not any(self.keep):
            return self.view[(0,) * len(self.keep) + (r, c)]      # (rows, cols), shared
        own_idx = tuple(i if keep else 0 for i, keep in zip(idx, self.keep))
        return self.view[own_idx + (r, c)]                        # (n, rows, cols)


def _band(problem):
    """``(offset, left, right)``: query i sees key j iff ``i + offset - left <= j <=
    i + offset + right``, None for an unbounded side; causal is the right side at 0."""
    left, right = problem.window or (None, None)
    if problem.causal:
        right = 0 if right is None else min(right, 0)
    return problem.Lk - problem.Lq, left, right


def _score_variants(s, i0, i1, j0, j1, band, *, softcap=None, slopes=None, bias=None,
                    keep=None, want_tanh=False):
    """Turn the block ``s = Q_i K_j^T * scale`` (n, BLOCK_M, BLOCK_N) of rows ``i0 .. i1 - 1``
    and keys ``j0 .. j1 - 1`` into the final scores, in place and in FlashAttention's
    order: softcap, ALiBi (``slopes`` (n, 1, 1)), the ``bias`` block, then ``-inf`` where
    the band or the ``keep`` block hides a key. Returns ``tanh(S / softcap)`` of the raw
    block when ``want_tanh`` (the backward's chain rule), else None."""
    offset, left, right = band
    tanh_s = None
    if softcap is not None:
        # S = softcap * tanh(S / softcap), before any bias
        np.divide(s, softcap, out=s)
        np.tanh(s, out=s)
        if want_tanh:
            tanh_s = s.copy()
        s *= softcap
    if slopes is not None:
        # S -= slope * |i + offset - j|: ALiBi from the block's indices
        distance = np.abs(np.arange(i0, i1)[:, None] + offset
                          - np.arange(j0, j1)[None, :]).astype(s.dtype)
        s -= slopes * distance
    if bias is not None:
        s += bias.astype(s.dtype)
    # The block reaches past an edge of the band: hide the keys beyond it.
    past_left = left is not None and j0 < i1 - 1 + offset - left
    past_right = right is not None and j1 - 1 > i0 + offset + right
    if past_left or past_right:
        diag = np.arange(i0, i1)[:, None] + offset                   # (BLOCK_M, 1)
        j = np.arange(j0, j1)[None, :]                               # (1, BLOCK_N)
        hidden = np.zeros((i1 - i0, j1 - j0), dtype=bool)
        if past_left:
            hidden |= j < diag - left
        if past_right:
            hidden |= j > diag + right
        np.copyto(s, -np.inf, where=hidden)  # broadcast over the chunk
    if keep is not None:
        np.copyto(s, -np.inf, where=~keep)
    return tanh_s


def _operand(x_all, index, acc_t):
    """The block ``x_all[index]`` of an operand of a product or a row sum, in ``acc_t``
    and row-major.

    BLAS rounds a product differently with another memory layout of its operands (OpenBLAS
    0.3.31 takes another kernel for a column-major block), and NumPy sums a strided row in
    another order than a contiguous one, so every such block is made row-major: a result
    is then the same, bit for bit, whatever the inputs' strides (a Fortran-ordered q gives
    exactly the contiguous q's result)."""
    return x_all[index].astype(acc_t, order="C")


def attention_forward(q, k, v, problem, out=None, block_m=BLOCK_M, block_n=BLOCK_N, *,
                      bias=None, mask=None, alibi_slopes=None):
    """Return ``(out, lse)`` for a validated problem (see ``_api.validate_attention``),
    with the variants of ``_api.validate_variants``: ``problem.window`` and
    ``problem.softcap``, and the arrays ``bias``, ``mask`` and ``alibi_slopes``."""
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
    bias_blocks = None if bias is None else _Blocks(bias, batch)
    mask_blocks = None if mask is None else _Blocks(mask, batch)
    slopes_all = None if alibi_slopes is None else np.broadcast_to(alibi_slopes, batch)
    softcap = None if p.softcap is None else acc_t(p.softcap)
    # Dropout: a score is kept iff its Philox word >= threshold; kept weights get 1 / (1 - p)
    dropout = p.dropout_p > 0
    if dropout:
        threshold = _philox.dropout_threshold(p.dropout_p)
        rp_dropout = acc_t(1.0 / (1.0 - p.dropout_p))

    # The band of keys query i sees: i + offset - left <= j <= i + offset + right
    band = offset, left, right = _band(p)

    chunk = max(1, CHUNK_BYTES // (block_m * block_n * np.dtype(acc_t).itemsize))
    for c0 in range(0, n_batch, chunk):
        flat = np.arange(c0, min(c0 + chunk, n_batch))               # flat batch indices b
        idx = np.unravel_index(flat, batch)
        if slopes_all is not None:
            slopes = slopes_all[idx].astype(acc_t)[:, None, None]    # (n, 1, 1)
        for i0 in range(0, p.Lq, block_m):
            i1 = min(i0 + block_m, p.Lq)
            rows = slice(i0, i1)
            # Q_i, pre-multiplied by the scale: (n, BLOCK_M, D)
            q_i = _operand(q_all, idx + (rows,), acc_t) * acc_t(p.scale)
            m_i = np.full(q_i.shape[:2], -np.inf, dtype=acc_t)       # running row max
            l_i = np.zeros(q_i.shape[:2], dtype=acc_t)               # running row sum
            acc = np.zeros(q_i.shape[:2] + (p.Dv,), dtype=acc_t)     # unnormalised O_i
            # Causal and window: only the key blocks of the band [n_start, n_end) that
            # the rows i0 .. i1 - 1 see are visited; the others are skipped.
            n_start = 0 if left is None else max(0, i0 + offset - left)
            n_end = p.Lk if right is None else min(p.Lk, i1 + offset + right)
            for j0 in range(n_start, n_end, block_n):
                j1 = min(j0 + block_n, n_end)
                cols = slice(j0, j1)
                keep = None
                if mask_blocks is not None:
                    keep = mask_blocks.block(idx, rows, cols)
                    if not keep.any():  # the mask hides the block from every row
                        continue
                k_j = _operand(k_all, idx + (cols,), acc_t)          # (n, BLOCK_N, D)
                v_j = _operand(v_all, idx + (cols,), acc_t)          # (n, BLOCK_N, Dv)
                # S = Q_i K_j^T * scale: (n, BLOCK_M, BLOCK_N)
                s = np.matmul(q_i, np.swapaxes(k_j, -1, -2))
                # softcap, ALiBi, bias, then -inf where the band or the mask hides a key
                _score_variants(s, i0, i1, j0, j1, band, softcap=softcap,
                                slopes=None if slopes_all is None else slopes,
                                bias=None if bias_blocks is None
                                else bias_blocks.block(idx, rows, cols),
                                keep=keep)
                # -- update m_i and l_i
                m_new = np.maximum(m_i, s.max(axis=-1))
                # A row with no visible key so far has m = -inf: use 0 so exp gives 0.
                m_safe = np.where(np.isneginf(m_new), 0, m_new)
                p_ij = np.exp(s - m_safe[..., None])                 # P~ = exp(S - m)
                alpha = np.exp(m_i - m_safe)                         # rescale of old acc
                l_i = alpha * l_i + p_ij.sum(axis=-1)
                if dropout:
                    # P~ * Z: the dropped weights leave acc, not l_i (softmax comes first)
                    p_ij *= _philox.dropout_keep_block(p.seed, threshold, flat, i0, i1, j0, j1)
                # -- update acc
                acc *= alpha[..., None]
                acc += np.matmul(p_ij, v_j)
                m_i = m_new
            # O_i = acc / l_i; a row that saw no key (l_i = 0) gives zeros, lse = -inf.
            empty = l_i == 0
            o_i = acc / np.where(empty, 1, l_i)[..., None]
            if dropout:
                o_i *= rp_dropout                            # O_i = (P * Z / (1 - p)) V
            with np.errstate(divide="ignore"):
                lse_i = np.where(empty, -np.inf, np.where(np.isneginf(m_i), 0, m_i) + np.log(l_i))
            out_all[idx + (rows,)] = o_i
            lse_all[idx + (rows,)] = lse_i
    return out, lse


class _Gradient:
    """The gradient ``result`` of one input (q, k or v), filled block by block.

    Blocks arrive per batch element of the full (broadcast) batch. An input that was not
    broadcast takes each block once, written straight into ``result`` in its dtype; a
    broadcast one sums the blocks of every batch element it served in an ``acc_t``
    buffer of its own shape, cast into ``result`` once at the end.
    """

    def __init__(self, result, batch, acc_t):
        self.result = result
        # The input's batch dimensions, padded on the left with 1s to the full batch's.
        pad = len(batch) - (result.ndim - 2)
        self.view = result[(np.newaxis,) * pad]
        own = self.view.shape[:-2]
        self.reduced = own != batch
        self.keep = tuple(n != 1 for n in own)  # dimensions the input really has
        self.acc = np.zeros(self.view.shape, dtype=acc_t) if self.reduced else None

    def add(self, idx, rows, g):
        """Add ``g`` (n, rows, cols) for the batch elements ``idx`` (unravelled indices)."""
        if not self.reduced:
            self.view[idx + (rows,)] = g
            return
        own_idx = tuple(i if keep else np.zeros_like(i) for i, keep in zip(idx, self.keep))
        np.add.at(self.acc, own_idx + (rows,), g)  # repeated indices add up

    def finish(self):
        if self.reduced:
            self.view[...] = self.acc
        return self.result


class _BiasGradient:
    """The gradient of a bias that broadcasts to ``(batch..., Lq, Lk)``: an ``acc_t``
    buffer of the bias's own shape, to which each block of ``dS`` adds its share.

    A block ``dS`` (n, rows, cols) is summed over the rows or the columns where the bias
    has size 1 there, and over the batch elements that share one element of the bias
    (repeated indices add up). Memory is the bias's size, never ``Lq x Lk`` per batch
    element unless the bias is that large itself.
    """

    def __init__(self, bias, batch, acc_t):
        self.shape, self.dtype = bias.shape, bias.dtype
        pad = len(batch) + 2 - bias.ndim
        self.acc = np.zeros((1,) * pad + tuple(bias.shape), dtype=acc_t)
        self.keep = tuple(n != 1 for n in self.acc.shape[:-2])  # dimensions it really has
        self.full_rows = self.acc.shape[-2] != 1
        self.full_cols = self.acc.shape[-1] != 1

    def add(self, idx, rows, cols, ds):
        """Add the block ``ds`` (n, rows, cols) of the batch elements ``idx``."""
        if not self.full_rows:
            ds, rows = ds.sum(axis=-2, keepdims=True), slice(None)
        if not self.full_cols:
            ds, cols = ds.sum(axis=-1, keepdims=True), slice(None)
        own_idx = tuple(i if keep else np.zeros_like(i) for i, keep in zip(idx, self.keep))
        np.add.at(self.acc, own_idx + (rows, cols), ds)

    def finish(self):
        with np.errstate(over="ignore"):  # beyond a float16 bias's range: +-inf, rounded
            return self.acc.reshape(self.shape).astype(self.dtype)


def attention_backward(dout, q, k, v, out, lse, problem, dq=None, dk=None, dv=None,
                       block_m=BLOCK_M, block_n=BLOCK_N, *, bias=None, mask=None,
                       alibi_slopes=None, return_dbias=False):
    """Return ``(dq, dk, dv)`` for a validated problem, from the forward's out and lse,
    with the forward's variants (``problem.window``, ``problem.softcap`` and the arrays
    ``bias``, ``mask``, ``alibi_slopes``); with ``return_dbias``, also the gradient of
    ``bias``, of bias's shape and dtype, as a fourth element."""
    p = problem
    acc_t = _acc_dtype(p.dtype)
    dq = np.empty(q.shape, dtype=p.dtype) if dq is None else dq
    dk = np.empty(k.shape, dtype=p.dtype) if dk is None else dk
    dv = np.empty(v.shape, dtype=p.dtype) if dv is None else dv
    batch = p.batch_shape or (1,)
    grad_q, grad_k, grad_v = (_Gradient(g, batch, acc_t) for g in (dq, dk, dv))
    grad_bias = _BiasGradient(bias, batch, acc_t) if return_dbias else None

    def result():
        grads = (grad_q.finish(), grad_k.finish(), grad_v.finish())
        return grads + (grad_bias.finish(),) if return_dbias else grads

    n_batch = int(np.prod(batch, dtype=np.int64))
    if n_batch == 0 or p.Lq == 0 or p.Lk == 0:  # no score at all: every gradient is 0
        for g in (dq, dk, dv):
            g[...] = 0
        return result()

    # Views of the full broadcast batch, as in the forward.
    q_all = np.broadcast_to(q, batch + q.shape[-2:])
    k_all = np.broadcast_to(k, batch + k.shape[-2:])
    v_all = np.broadcast_to(v, batch + v.shape[-2:])
    do_all = dout.reshape(batch + dout.shape[-2:]) if not p.batch_shape else dout
    o_all = out.reshape(batch + out.shape[-2:]) if not p.batch_shape else out
    lse_all = lse.reshape(batch + lse.shape[-1:])
    bias_blocks = None if bias is None else _Blocks(bias, batch)
    mask_blocks = None if mask is None else _Blocks(mask, batch)
    slopes_all = None if alibi_slopes is None else np.broadcast_to(alibi_slopes, batch)
    softcap = None if p.softcap is None else acc_t(p.softcap)
    dropout = p.dropout_p > 0
    if dropout:  # as in the forward
        threshold = _philox.dropout_threshold(p.dropout_p)
        rp_dropout = acc_t(1.0 / (1.0 - p.dropout_p))

    # Per batch element in flight: the blocks S, P, dP, dS (and tanh; with dropout Z and W)
    # and the dQ accumulator.
    per_element = (7 if dropout else 5) * block_m * block_n + p.Lq * (p.D + 2)
    chunk = max(1, CHUNK_BYTES // (per_element * np.dtype(acc_t).itemsize))
    # The band, as in the forward: key j is seen by the queries
    # j - offset - right <= i <= j - offset + left.
    band = offset, left, right = _band(p)
    scale = acc_t(p.scale)
    for c0 in range(0, n_batch, chunk):
        flat = np.arange(c0, min(c0 + chunk, n_batch))               # flat batch indices b
        idx = np.unravel_index(flat, batch)
        n = len(idx[0])
        slopes = None if slopes_all is None else slopes_all[idx].astype(acc_t)[:, None, None]
        # Delta = rowsum(dO * O), one query block at a time: (n, Lq)
        delta = np.empty((n, p.Lq), dtype=acc_t)
        for i0 in range(0, p.Lq, block_m):
            rows = slice(i0, min(i0 + block_m, p.Lq))
            delta[:, rows] = np.sum(_operand(do_all, idx + (rows,), acc_t)
                                    * _operand(o_all, idx + (rows,), acc_t), axis=-1)
        # A row that saw no key has lse = -inf: subtract +inf instead, so P = exp(-inf) = 0.
        lse_c = lse_all[idx].astype(acc_t)
        lse_safe = np.where(np.isneginf(lse_c), np.inf, lse_c)
        dq_acc = np.zeros((n, p.Lq, p.D), dtype=acc_t)               # dQ / scale
        for j0 in range(0, p.Lk, block_n):
            j1 = min(j0 + block_n, p.Lk)
            cols = slice(j0, j1)
            k_j = _operand(k_all, idx + (cols,), acc_t)              # (n, BLOCK_N, D)
            v_j = _operand(v_all, idx + (cols,), acc_t)              # (n, BLOCK_N, Dv)
            dk_j = np.zeros((n, j1 - j0, p.D), dtype=acc_t)
            dv_j = np.zeros((n, j1 - j0, p.Dv), dtype=acc_t)
            # Causal and window: only the query blocks that meet the band of keys
            # j0 .. j1 - 1 are visited (aligned to BLOCK_M, as the forward's blocks).
            m_start = 0 if right is None else (max(0, j0 - offset - right) // block_m) * block_m
            m_end = p.Lq if left is None else max(0, min(p.Lq, j1 - offset + left))
            for i0 in range(m_start, m_end, block_m):
                i1 = min(i0 + block_m, p.Lq)
                rows = slice(i0, i1)
                keep = None
                if mask_blocks is not None:
                    keep = mask_blocks.block(idx, rows, cols)
                    if not keep.any():  # the mask hides the block from every row: P = 0
                        continue
                # Q_i pre-multiplied by the scale, as in the forward: (n, BLOCK_M, D)
                q_i = _operand(q_all, idx + (rows,), acc_t) * scale
                do_i = _operand(do_all, idx + (rows,), acc_t)         # (n, BLOCK_M, Dv)
                # S = Q_i K_j^T * scale: (n, BLOCK_M, BLOCK_N), then the forward's variants
                s = np.matmul(q_i, np.swapaxes(k_j, -1, -2))
                tanh_s = _score_variants(
                    s, i0, i1, j0, j1, band, softcap=softcap, slopes=slopes,
                    bias=None if bias_blocks is None else bias_blocks.block(idx, rows, cols),
                    keep=keep, want_tanh=softcap is not None)
                # P = exp(S - lse), recomputed from the forward's lse
                p_ij = np.exp(s - lse_safe[:, rows, None])
                w_ij = p_ij                                          # the weights of O = W V
                if dropout:
                    # Z / (1 - p), the forward's mask redrawn: W = P * Z / (1 - p)
                    keep_drop = _philox.dropout_keep_block(p.seed, threshold, flat,
                                                           i0, i1, j0, j1)
                    z_scaled = np.where(keep_drop, rp_dropout, acc_t(0))
                    w_ij = p_ij * z_scaled
                # dV_j += W^T dO_i
                dv_j += np.matmul(np.swapaxes(w_ij, -1, -2), do_i)
                # dP = dO_i V_j^T (* Z / (1 - p)); dS = P * (dP - Delta): the gradient
                # w.r.t. the final S
                dp = np.matmul(do_i, np.swapaxes(v_j, -1, -2))
                if dropout:
                    dp *= z_scaled
                ds = p_ij * (dp - delta[:, rows, None])
                if grad_bias is not None:  # dbias = dS, summed where bias broadcasts
                    grad_bias.add(idx, rows, cols, ds)
                if tanh_s is not None:
                    # softcap: dS0 = dS * (1 - tanh^2(S0 / softcap)), S0 the raw score
                    np.multiply(tanh_s, tanh_s, out=tanh_s)
                    np.subtract(1, tanh_s, out=tanh_s)
                    ds *= tanh_s
                # dQ_i += dS K_j (times scale at the end); dK_j += dS^T (Q_i * scale)
                dq_acc[:, rows] += np.matmul(ds, k_j)
                dk_j += np.matmul(np.swapaxes(ds, -1, -2), q_i)
            grad_k.add(idx, cols, dk_j)
            grad_v.add(idx, cols, dv_j)
        dq_acc *= scale
        grad_q.add(idx, slice(None), dq_acc)
    return result()


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
