"""Philox4x32-10, vectorised in NumPy, and the keep mask of attention dropout.

Philox (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3",
SC 2011) is a counter-based generator: a keyed bijection of a 128-bit counter, so the
random word of any element is computed from the element's own coordinates, with no state
carried from one element to the next. A tiled forward pass, a backward pass that visits
the blocks in another order and a GPU kernel therefore all draw the same mask. This is
the algorithm of Random123's ``philox4x32`` and of cuRAND's ``curand_Philox4x32_10``,
with 10 rounds; ``cuda/philox.cuh`` is the same code for the kernels.

One round maps the counter ``(c0, c1, c2, c3)`` with the round key ``(k0, k1)`` to::

    hi0:lo0 = M0 * c0          (the 64-bit product of two 32-bit words)
    hi1:lo1 = M1 * c2
    (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)

and the key is bumped by the Weyl constants ``(W0, W1)`` between rounds (mod 2^32).
Here the 32x32 -> 64-bit products are taken in uint64, which holds them exactly.

Dropout on the attention probabilities (the layout ``cuda/philox.cuh`` follows too):

* key ``= (seed & 0xFFFFFFFF, seed >> 32)``, for a seed in ``[0, 2**64)``;
* the score of batch element ``b`` (the row-major flat index over the broadcast batch
  shape), query row ``i`` and key column ``j`` takes output word ``j & 3`` of the counter
  ``(j >> 2, i, b & 0xFFFFFFFF, b >> 32)`` (word 0 first): one Philox call serves four
  neighbouring keys;
* it is dropped iff that word ``< threshold = floor(dropout_p * 2**32)``, kept iff
  ``word >= threshold``.

>>> import numpy as np
>>> from cupyflash import _philox
>>> keep = _philox.dropout_keep_mask(1234, 0.25, (2, 3), 64, 80)
>>> keep.shape, keep.dtype
((2, 3, 64, 80), dtype('bool'))
>>> tile = _philox.dropout_keep_mask(1234, 0.25, (2, 3), 64, 80, row0=16, col0=5,
...                                  rows=8, cols=30)
>>> bool((tile == keep[..., 16:24, 5:35]).all())
True
"""

import numpy as np

# Multipliers and Weyl constants of Philox4x32 (Random123's PHILOX_M4x32_0/1, PHILOX_W32_0/1).
PHILOX_M4x32_0 = 0xD2511F53
PHILOX_M4x32_1 = 0xCD9E8D57
PHILOX_W32_0 = 0x9E3779B9  # golden ratio
PHILOX_W32_1 = 0xBB67AE85  # sqrt(3) - 1
ROUNDS = 10

_LO = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)


def _philox_words(c0, c1, c2, c3, k0, k1, rounds=ROUNDS):
    """Philox4x32 on counter words and key words that broadcast against each other
    (uint64 scalars or arrays, every value below 2^32). Returns the four output words as
    uint64 arrays of the broadcast shape."""
    m0, m1 = np.uint64(PHILOX_M4x32_0), np.uint64(PHILOX_M4x32_1)
    w0, w1 = np.uint64(PHILOX_W32_0), np.uint64(PHILOX_W32_1)
    for r in range(rounds):
        if r:  # bump the key between rounds, mod 2^32
            k0, k1 = (k0 + w0) & _LO, (k1 + w1) & _LO
        p0 = m0 * c0                                     # hi0:lo0 = M0 * c0, exact in uint64
        p1 = m1 * c2                                     # hi1:lo1 = M1 * c2
        c0, c1, c2, c3 = (p1 >> _32) ^ c1 ^ k0, p1 & _LO, (p0 >> _32) ^ c3 ^ k1, p0 & _LO
    return c0, c1, c2, c3


def philox4x32(counter, key, rounds=ROUNDS):
    """Philox4x32 with ``rounds`` rounds (10 by default: Philox4x32-10).

    Parameters
    ----------
    counter : array_like of integers, shape ``(..., 4)``
        Counters, word 0 first, each word in ``[0, 2**32)``.
    key : array_like of integers, shape ``(..., 2)``
        Keys, word 0 first, broadcasting against the counters' leading dimensions.
    rounds : int, optional
        Number of rounds (Random123 publishes answers for 7 and 10).

    Returns
    -------
    numpy.ndarray of uint32, shape ``(..., 4)``
        The output words, word 0 first.

    Examples
    --------
    Random123's known answer for a zero counter and key (``tests/kat_vectors``):

    >>> [hex(w) for w in philox4x32([0, 0, 0, 0], [0, 0])]
    ['0x6627e8d5', '0xe169c58d', '0xbc57ac4c', '0x9b00dbd8']
    """
    counter = np.asarray(counter, dtype=np.uint64)
    key = np.asarray(key, dtype=np.uint64)
    if counter.shape[-1:] != (4,) or key.shape[-1:] != (2,):
        raise ValueError(f"philox4x32: counter must have shape (..., 4) and key (..., 2), "
                         f"got {counter.shape} and {key.shape}")
    words = _philox_words(*(counter[..., w] for w in range(4)), key[..., 0], key[..., 1],
                          rounds)
    return np.stack(np.broadcast_arrays(*words), axis=-1).astype(np.uint32)


def dropout_threshold(dropout_p):
    """``floor(dropout_p * 2**32)``: a score whose random word is below it is dropped.

    Exact: multiplying a float64 by a power of two does not round.

    >>> dropout_threshold(0.0), dropout_threshold(0.5), dropout_threshold(0.1)
    (0, 2147483648, 429496729)
    """
    return int(float(dropout_p) * 2.0 ** 32)


def dropout_keep_block(seed, threshold, b, i0, i1, j0, j1):
    """The keep mask of the rows ``i0 .. i1 - 1`` and keys ``j0 .. j1 - 1`` of the batch
    elements ``b`` (flat indices into the broadcast batch, a 1-D integer array).

    Returns a bool array ``(len(b), i1 - i0, j1 - j0)``: True where the score is kept.
    Only the counters of this block are computed (one per row and group of four keys), so
    a tiled backend never holds more than a block of the mask.

    >>> import numpy as np
    >>> dropout_keep_block(7, 2**31, np.array([0, 5]), 3, 5, 2, 9).shape
    (2, 2, 7)
    """
    b = np.asarray(b).astype(np.uint64).reshape(-1)
    g0, g1 = j0 >> 2, (j1 + 3) >> 2              # the groups of four keys that meet the block
    c0 = np.arange(g0, g1, dtype=np.uint64)[None, None, :]                # j >> 2
    c1 = np.arange(i0, i1, dtype=np.uint64)[None, :, None]                # i
    c2 = (b & _LO)[:, None, None]                                         # b, low word
    c3 = (b >> _32)[:, None, None]                                        # b, high word
    words = _philox_words(c0, c1, c2, c3, np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32))
    shape = (len(b), i1 - i0, g1 - g0)
    # word j & 3 of group j >> 2: interleave the four words along the keys
    r = np.empty(shape + (4,), dtype=np.uint32)
    for w in range(4):
        r[..., w] = words[w]
    r = r.reshape(shape[:2] + (4 * (g1 - g0),))[..., j0 - 4 * g0:j1 - 4 * g0]
    return r >= np.uint32(threshold) if threshold else np.ones(r.shape, dtype=bool)


def dropout_keep_mask(seed, dropout_p, batch_shape, Lq, Lk, *, row0=0, col0=0, rows=None,
                      cols=None):
    """The keep mask of dropout on the ``(batch..., Lq, Lk)`` attention probabilities, or
    of one tile of it.

    Parameters
    ----------
    seed : int
        In ``[0, 2**64)``: the Philox key ``(seed & 0xFFFFFFFF, seed >> 32)``.
    dropout_p : float
        In ``[0, 1)``: the probability that a score is dropped. The threshold is
        ``floor(dropout_p * 2**32)``; a score is kept iff its random word is at least that.
    batch_shape : tuple of int
        The broadcast batch shape of the problem (``()`` for unbatched q, k, v).
    Lq, Lk : int
        Query and key lengths.
    row0, col0 : int, optional
        The first query row and key column of a tile.
    rows, cols : int, optional
        The tile's size; default: to the end (``Lq - row0``, ``Lk - col0``).

    Returns
    -------
    numpy.ndarray of bool, shape ``batch_shape + (rows, cols)``
        True where a score is kept. The mask of score ``(b, i, j)`` does not depend on
        the tile it is computed in.

    Examples
    --------
    >>> import numpy as np
    >>> keep = dropout_keep_mask(2024, 0.1, (4,), 300, 200)
    >>> round(float(keep.mean()), 2)
    0.9
    >>> tile = dropout_keep_mask(2024, 0.1, (4,), 300, 200, row0=100, col0=37, rows=5, cols=9)
    >>> bool((tile == keep[:, 100:105, 37:46]).all())
    True
    """
    batch_shape = tuple(batch_shape)
    rows = Lq - row0 if rows is None else rows
    cols = Lk - col0 if cols is None else cols
    n = int(np.prod(batch_shape, dtype=np.int64))
    keep = dropout_keep_block(seed, dropout_threshold(dropout_p), np.arange(n),
                              row0, row0 + rows, col0, col0 + cols)
    return keep.reshape(batch_shape + (rows, cols))
