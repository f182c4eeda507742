"""Dropout (``dropout_p``, ``seed``): the Philox4x32-10 generator, the keep mask it draws,
and attention and its gradients with dropout on the NumPy backend.

The generator is checked three ways: against Random123's published known answers, against
a scalar Python Philox written from the paper (one counter at a time, on Python ints), and
through the counter layout of the mask, element by element. The mask of the NumPy backend
(drawn block by block) is read back through attention itself (scale 0 and one-hot values
make ``out[i, j] > 0`` exactly where score ``(i, j)`` is kept), for any block size, and
compared with :func:`cupyflash.reference.dropout_mask` (drawn for the whole matrix at once).

Accuracy follows ``accuracy.py``'s rule, the truth and the naive same-dtype computation
applying the same mask (their ``dropout_p`` and ``seed`` options). Dropout runs on the
NumPy backend and, under the ``gpu`` marker, on the CuPy kernels (the variants kernels,
which draw the mask of ``cuda/philox.cuh``): their mask is read back through attention and
its backward as above and compared with the NumPy mask bit for bit, their results meet the
accuracy rule with the same seed, and a tiny kernel compares ``cuda/philox.cuh`` with the
NumPy generator directly.
"""

import functools
import math
import re

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import cupyflash
from accuracy import (DTYPES, WIDE, assert_within_budget,
                      backward_floors_and_slacks, check_attention, check_attention_backward,
                      lse_floor, out_floor, score_rounding_slack, true_attention,
                      true_attention_backward)
from backends import requires_gpu
from cupyflash import _api, _kernels, _numpy_backend, _philox, reference
from strategies import AttentionCase, VariantCase, examples, variant_cases
from test_backward import assert_gradients_are_the_derivative, draw_dout
from test_variants_backward import check_variant_gradients, gradients_on_gpu

# See test_attention.py: OpenBLAS flags 0 * -inf on padding lanes; no NaN reaches a result.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")

ALL_DTYPES = pytest.mark.parametrize("dtype", list(DTYPES))


DROPOUT_PS = st.sampled_from([0.1, 0.5, 0.9])
# Seeds with both key words in play, and the edges of the two words.
SEEDS = st.one_of(st.integers(0, 2**64 - 1),
                  st.sampled_from([0, 1, 2**32 - 1, 2**32, 2**63, 2**64 - 1]))
SMALL_BLOCKS = st.sampled_from([(2, 3), (3, 2), (7, 16), (16, 7), (33, 32)])
MASK_BLOCKS = [None, (1, 1), (2, 3), (3, 5), (7, 16), (16, 7), (33, 32)]


def snapshot(arrays):
    return [np.asarray(a).tobytes() for a in arrays if isinstance(a, np.ndarray)]


# ----------------------------------------------------------------------------------------
# Philox4x32: known answers and a scalar implementation from the paper
# ----------------------------------------------------------------------------------------

# Random123's known-answer vectors of philox4x32, verbatim from its file tests/kat_vectors
# (https://github.com/DEShawResearch/random123, lines 24-29 at commit
# 9545ff6413f258be2f04c1d319d99aaef7521150; the same lines are pasted into D. E. Shaw
# Research's Random123-Boost, libs/random/test/test_philox.cpp). Columns: name, rounds,
# counter (4 words, word 0 first), key (2 words), expected output (4 words). The first
# three are 7 rounds; the last three are Philox4x32-10, the generator of dropout.
KAT_VECTORS = """
philox4x32 7 00000000 00000000 00000000 00000000 00000000 00000000   5f6fb709 0d893f64 4f121f81 4f730a48
philox4x32 7 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff   5207ddc2 45165e59 4d8ee751 8c52f662
philox4x32 7 243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0   4dfccaba 190a87f0 c47362ba b6b5242a
philox4x32 10 00000000 00000000 00000000 00000000 00000000 00000000   6627e8d5 e169c58d bc57ac4c 9b00dbd8
philox4x32 10 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff   408f276d 41c83b0e a20bc7c6 6d5451fd
philox4x32 10 243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0   d16cfe09 94fdcceb 5001e420 24126ea1
"""


def _kat():
    vectors = []
    for line in KAT_VECTORS.strip().splitlines():
        name, rounds, *words = line.split()
        words = [int(w, 16) for w in words]
        vectors.append((int(rounds), words[:4], words[4:6], words[6:]))
    return vectors


KAT = _kat()


def philox_scalar(counter, key, rounds=10):
    """Philox4x32 on Python ints, one counter at a time, from the paper's description:
    each round multiplies words 0 and 2 by M0 and M1 into 64-bit products, and the new
    counter is (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0); the key is bumped by the Weyl
    constants W0 = 0x9E3779B9, W1 = 0xBB67AE85 between rounds."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) % 2**32, (k1 + 0xBB67AE85) % 2**32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 % 2**32, (p0 >> 32) ^ c3 ^ k1, p0 % 2**32
    return c0, c1, c2, c3


def keep_scalar(seed, dropout_p, b, i, j):
    """The documented layout, element by element: word ``j & 3`` of the counter
    ``(j >> 2, i, b & 0xFFFFFFFF, b >> 32)`` under the key ``(seed & 0xFFFFFFFF,
    seed >> 32)``, kept iff it is at least ``floor(dropout_p * 2**32)``."""
    words = philox_scalar((j >> 2, i, b % 2**32, b >> 32), (seed % 2**32, seed >> 32))
    return words[j & 3] >= math.floor(dropout_p * 2**32)


@pytest.mark.parametrize("rounds, counter, key, expected", KAT,
                         ids=[f"R{r}-{c[0]:08x}" for r, c, _, _ in KAT])
def test_philox_known_answers(rounds, counter, key, expected):
    assert philox_scalar(counter, key, rounds) == tuple(expected)
    got = _philox.philox4x32(counter, key, rounds=rounds)
    assert got.dtype == np.uint32 and got.shape == (4,)
    assert [int(w) for w in got] == expected


def test_philox_is_vectorised_over_counters_and_keys():
    """All the known answers in one call (arrays of counters and of keys), and a batch of
    counters under one key, agree with the scalar Philox."""
    for rounds in (7, 10):
        rows = [(c, k, e) for r, c, k, e in KAT if r == rounds]
        got = _philox.philox4x32([c for c, _, _ in rows], [k for _, k, _ in rows], rounds)
        assert got.tolist() == [e for _, _, e in rows]
    rng = np.random.default_rng(0)
    counters = rng.integers(0, 2**32, (3, 5, 4), dtype=np.uint64)
    key = [0xDEADBEEF, 0x01234567]
    got = _philox.philox4x32(counters, key)
    assert got.shape == (3, 5, 4)
    for idx in np.ndindex(3, 5):
        assert tuple(int(w) for w in got[idx]) == philox_scalar(
            [int(c) for c in counters[idx]], key)


# ----------------------------------------------------------------------------------------
# the keep mask: layout, threshold, tiles, statistics
# ----------------------------------------------------------------------------------------

@examples(100)
@given(seed=SEEDS, dropout_p=st.floats(0, 1, exclude_max=True),
       b=st.one_of(st.integers(0, 20), st.integers(2**32 - 3, 2**32 + 3),
                   st.integers(0, 2**48)),
       i0=st.integers(0, 2**31), j0=st.integers(0, 2**31))
@example(seed=2**64 - 1, dropout_p=0.5, b=2**32, i0=0, j0=3)
def test_block_mask_follows_the_documented_layout(seed, dropout_p, b, i0, j0):
    """A 3 x 7 block of two batch elements (b and b + 1; the block starts at any column,
    so it cuts groups of four keys) is the scalar layout, score by score."""
    threshold = _philox.dropout_threshold(dropout_p)
    keep = _philox.dropout_keep_block(seed, threshold, np.array([b, b + 1]),
                                      i0, i0 + 3, j0, j0 + 7)
    assert keep.shape == (2, 3, 7) and keep.dtype == bool
    expected = [[[keep_scalar(seed, dropout_p, bb, i, j) for j in range(j0, j0 + 7)]
                 for i in range(i0, i0 + 3)] for bb in (b, b + 1)]
    assert keep.tolist() == expected


def test_threshold_is_the_floor_of_p_times_2_to_32():
    assert _philox.dropout_threshold(0.0) == 0
    assert _philox.dropout_threshold(0.5) == 2**31
    assert _philox.dropout_threshold(0.1) == math.floor(0.1 * 2**32) == 429496729
    assert _philox.dropout_threshold(2.0**-33) == 0          # below one word: nothing dropped
    assert _philox.dropout_threshold(1 - 2.0**-32) == 2**32 - 1
    assert _philox.dropout_threshold(np.nextafter(1.0, 0.0)) == 2**32 - 1


def test_a_word_equal_to_the_threshold_is_kept():
    """Dropped iff word < threshold: a threshold equal to an element's word keeps it, one
    more drops it."""
    seed, b, i, j = 99, 3, 5, 6
    word = philox_scalar((j >> 2, i, b, 0), (seed, 0))[j & 3]
    for threshold, kept in ((word, True), (word + 1, False), (0, True)):
        assert _philox.dropout_keep_block(seed, threshold, [b], i, i + 1, j, j + 1)[0, 0, 0] \
            == kept


@examples(50)
@given(batch_shape=st.lists(st.integers(1, 3), max_size=3).map(tuple),
       Lq=st.integers(1, 40), Lk=st.integers(1, 40), seed=SEEDS,
       dropout_p=st.floats(0, 1, exclude_max=True), data=st.data())
def test_tiles_and_the_reference_mask_agree(batch_shape, Lq, Lk, seed, dropout_p, data):
    """reference.dropout_mask (one Philox call per score, the whole matrix) equals
    _philox.dropout_keep_mask (one call per four keys, by blocks), and any tile of the
    latter is the same slice of the whole."""
    whole = reference.dropout_mask(seed, dropout_p, batch_shape, Lq, Lk)
    assert whole.shape == batch_shape + (Lq, Lk) and whole.dtype == bool
    assert np.array_equal(_philox.dropout_keep_mask(seed, dropout_p, batch_shape, Lq, Lk),
                          whole)
    row0, col0 = data.draw(st.integers(0, Lq - 1)), data.draw(st.integers(0, Lk - 1))
    rows, cols = data.draw(st.integers(1, Lq - row0)), data.draw(st.integers(1, Lk - col0))
    tile = _philox.dropout_keep_mask(seed, dropout_p, batch_shape, Lq, Lk, row0=row0,
                                     col0=col0, rows=rows, cols=cols)
    assert np.array_equal(tile, whole[..., row0:row0 + rows, col0:col0 + cols])
    # the first and the last score, by the scalar layout (b: the flat batch index)
    last_b = math.prod(batch_shape) - 1
    assert whole.reshape(-1, Lq, Lk)[0, 0, 0] == keep_scalar(seed, dropout_p, 0, 0, 0)
    assert whole.reshape(-1, Lq, Lk)[-1, -1, -1] == keep_scalar(seed, dropout_p, last_b,
                                                                Lq - 1, Lk - 1)


def within_6_sigma(count, n, prob):
    """``|count - n prob| <= 6 sqrt(n prob (1 - prob))``: a binomial count near its mean."""
    return abs(count - n * prob) <= 6 * math.sqrt(n * prob * (1 - prob))


@pytest.mark.parametrize("dropout_p", [0.001, 0.1, 0.5, 0.9, 0.999])
def test_kept_fraction_is_binomial(dropout_p):
    """Over 10^6 scores the kept count is within 6 binomial sigmas of its mean, for the
    whole mask, each of the four words of a Philox call (j & 3), each batch element and
    the first and last rows; two seeds and two neighbouring batch elements agree as often
    as independent masks do."""
    keep_prob = 1 - _philox.dropout_threshold(dropout_p) / 2**32
    keep = _philox.dropout_keep_mask(20240601, dropout_p, (4, 3), 256, 327)
    assert within_6_sigma(int(keep.sum()), keep.size, keep_prob)
    for lane in range(4):
        part = keep[..., lane::4]
        assert within_6_sigma(int(part.sum()), part.size, keep_prob), f"word {lane}"
    for part in list(keep.reshape(12, 256, 327)) + [keep[..., :8, :], keep[..., -8:, :]]:
        assert within_6_sigma(int(part.sum()), part.size, keep_prob)
    other_seed = _philox.dropout_keep_mask(20240602, dropout_p, (4, 3), 256, 327)
    agree = keep_prob**2 + (1 - keep_prob)**2
    for a, b in ((keep, other_seed), (keep[:, 0], keep[:, 1])):
        assert within_6_sigma(int((a == b).sum()), a.size, agree)


# ----------------------------------------------------------------------------------------
# the mask the NumPy backend uses, read back through attention
# ----------------------------------------------------------------------------------------

def forward(q, k, v, scale, options, *, causal=False, blocks=None):
    """``(out, lse)`` of cupyflash.attention, or of the NumPy backend with ``blocks =
    (BLOCK_M, BLOCK_N)``; ``options`` hold the variants and ``dropout_p`` and ``seed``.
    Asserts that no input was changed."""
    arrays = [q, k, v] + list(options.values())
    before = snapshot(arrays)
    if blocks is None:
        out, lse = cupyflash.attention(q, k, v, causal=causal, scale=scale, return_lse=True,
                                       **options)
    else:
        problem = _problem("attention", q, k, v, causal, scale, options)
        out, lse = _numpy_backend.attention_forward(
            q, k, v, problem, block_m=blocks[0], block_n=blocks[1], bias=options.get("bias"),
            mask=options.get("mask"), alibi_slopes=options.get("alibi_slopes"))
    assert snapshot(arrays) == before, "attention modified an input"
    return out, lse


def _problem(fn, q, k, v, causal, scale, options):
    problem = _api.validate_attention(fn, q, k, v, causal, scale)
    _api.validate_variants(fn, problem, options.get("bias"), options.get("mask"),
                           options.get("window"), options.get("alibi_slopes"),
                           options.get("softcap"))
    _api.validate_dropout(fn, problem, options.get("dropout_p", 0.0), options.get("seed"))
    return problem


def gradients(dout, q, k, v, scale, options, *, causal=False, blocks=None):
    """The forward's ``(out, lse)`` then the gradients of cupyflash.attention_backward (or
    of the NumPy backend with ``blocks``), with dbias whenever a bias is given. Asserts
    that no input was changed."""
    return_dbias = options.get("bias") is not None
    arrays = [dout, q, k, v] + list(options.values())
    before = snapshot(arrays)
    out, lse = forward(q, k, v, scale, options, causal=causal, blocks=blocks)
    if blocks is None:
        grads = cupyflash.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                             scale=scale, return_dbias=return_dbias,
                                             **options)
    else:
        problem = _problem("attention_backward", q, k, v, causal, scale, options)
        grads = _numpy_backend.attention_backward(
            dout, q, k, v, out, lse, problem, block_m=blocks[0], block_n=blocks[1],
            bias=options.get("bias"), mask=options.get("mask"),
            alibi_slopes=options.get("alibi_slopes"), return_dbias=return_dbias)
    assert snapshot(arrays) == before, "attention_backward modified an input"
    return grads


@pytest.mark.parametrize("blocks", MASK_BLOCKS, ids=str)
@pytest.mark.parametrize("causal, window", [(False, None), (True, None), (False, (5, 2))])
def test_the_backend_draws_the_reference_mask_for_any_tiles(blocks, causal, window):
    """Scale 0 gives uniform weights and v = I makes ``out[..., i, j]`` the weight of key
    j, so ``out > 0`` is the keep mask (within the causal or window band): exactly
    reference.dropout_mask, for every block size and batch element. The backward's
    mask, read back the same way from ``dv^T = W`` with ``dout = I``, is the same."""
    batch, Lq, Lk, seed, dropout_p = (2, 3), 37, 45, 2**40 + 17, 0.4
    rng = np.random.default_rng(1)
    q = rng.standard_normal(batch + (Lq, 4))
    k = rng.standard_normal(batch + (Lk, 4))
    v = np.broadcast_to(np.eye(Lk), batch + (Lk, Lk)).copy()
    options = dict(dropout_p=dropout_p, seed=seed)
    if window is not None:
        options["window"] = window
    out, _ = forward(q, k, v, 0.0, options, causal=causal, blocks=blocks)
    expected = reference.dropout_mask(seed, dropout_p, batch, Lq, Lk)
    band = reference.causal_mask(Lq, Lk) if causal else np.ones((Lq, Lk), bool)
    if window is not None:
        band &= reference.window_mask(Lq, Lk, window)
    assert np.array_equal(out > 0, expected & band)
    # the backward: dv = W^T dout = W^T for dout = I (Dv = Lq)
    v = rng.standard_normal(batch + (Lk, Lq))
    dout = np.broadcast_to(np.eye(Lq), batch + (Lq, Lq)).copy()
    _, dk, dv = gradients(dout, q, k, v, 0.0, options, causal=causal, blocks=blocks)
    assert np.array_equal(np.swapaxes(dv, -1, -2) > 0, expected & band)
    assert np.all(dk == 0)  # scale 0: the scores do not depend on k


def test_broadcast_batches_index_the_broadcast_batch():
    """The batch index of the mask is the flat index over the broadcast batch shape of
    q, k and v together, whichever of them brings a dimension."""
    seed, dropout_p, Lq, Lk = 5, 0.5, 9, 11
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 1, Lq, 4))
    k = rng.standard_normal((1, 3, Lk, 4))
    v = np.broadcast_to(np.eye(Lk), (Lk, Lk))
    out = cupyflash.attention(q, k, v, scale=0.0, dropout_p=dropout_p, seed=seed)
    assert out.shape == (2, 3, Lq, Lk)
    assert np.array_equal(out > 0, reference.dropout_mask(seed, dropout_p, (2, 3), Lq, Lk))
    out_2d = cupyflash.attention(q[0, 0], k[0, 0], v, scale=0.0, dropout_p=dropout_p,
                                 seed=seed)  # unbatched: b = 0
    assert np.array_equal(out_2d > 0, reference.dropout_mask(seed, dropout_p, (), Lq, Lk))


# ----------------------------------------------------------------------------------------
# accuracy against the reference
# ----------------------------------------------------------------------------------------

def with_dropout(vc, dropout_p, seed):
    q, k, v, scale, options = vc.inputs()
    return q, k, v, scale, dict(options, dropout_p=dropout_p, seed=seed)


def check_forward(vc, dropout_p, seed, blocks=None):
    q, k, v, scale, options = with_dropout(vc, dropout_p, seed)
    out, lse = forward(q, k, v, scale, options, causal=vc.case.causal, blocks=blocks)
    assert out.shape == vc.case.batch_shape + (vc.case.Lq, vc.case.Dv)
    check_attention(out, lse, q, k, v, causal=vc.case.causal, scale=scale, **options)


def check_backward(vc, dropout_p, seed, blocks=None, dout_scale=1.0):
    q, k, v, scale, options = with_dropout(vc, dropout_p, seed)
    if vc.bias_kind is not None and vc.bias_dtype == "float16":
        # dbias sums the terms P dO . v / (1 - p) of dS, which cancel: keep the terms
        # themselves within float16's range, as draw_dout does for float16 inputs
        dout_scale = min(dout_scale, 1.0 / vc.case.v_scale)
    dout = draw_dout(vc.case, dout_scale)
    grads = gradients(dout, q, k, v, scale, options, causal=vc.case.causal, blocks=blocks)
    check_variant_gradients(vc, grads, dout, q, k, v, scale, options)


def backward_cases(**kwargs):
    """Variant cases without -inf keys (an infinite k makes dq NaN, documented)."""
    return variant_cases(neg_inf=st.just("none"), max_len=64, max_head_dim=32,
                         max_work=2 * 10**5, **kwargs)


@examples(60)
@given(vc=variant_cases(), dropout_p=DROPOUT_PS, seed=SEEDS)
@example(vc=VariantCase(AttentionCase("float16", Lq=257, Lk=300, D=16, Dv=16, causal=True,
                                      seed=1)), dropout_p=0.1, seed=1)
@example(vc=VariantCase(AttentionCase("bfloat16", Lq=70, Lk=10, D=8, Dv=8, seed=3),
                        window=(0, 0)), dropout_p=0.5, seed=3)  # rows 0-59 see no key
def test_forward_matches_reference(vc, dropout_p, seed):
    """Dropout with any combination of the variants, through cupyflash.attention (256-row
    blocks, so only long sequences cross blocks)."""
    check_forward(vc, dropout_p, seed)


@examples(100)
@given(vc=variant_cases(max_len=96, max_head_dim=64), dropout_p=DROPOUT_PS, seed=SEEDS,
       blocks=SMALL_BLOCKS)
@example(vc=VariantCase(AttentionCase("float64", Lq=40, Lk=57, D=16, Dv=8,
                                      q_batch=(2, 3), k_batch=(2, 1), v_batch=(1, 3),
                                      logit_max=50.0, seed=2)),
         dropout_p=0.9, seed=2**64 - 1, blocks=(7, 16))
def test_forward_with_small_blocks_matches_reference(vc, dropout_p, seed, blocks):
    """The NumPy backend with small BLOCK_M and BLOCK_N: the mask drawn block by block,
    at band edges and in blocks that start inside a group of four keys."""
    check_forward(vc, dropout_p, seed, blocks)


@examples(150)
@given(vc=backward_cases(), dropout_p=DROPOUT_PS, seed=SEEDS,
       blocks=st.one_of(st.none(), SMALL_BLOCKS),
       dout_scale=st.sampled_from([1.0, 1e-3, 1e3]))
@example(vc=VariantCase(AttentionCase("float32", Lq=40, Lk=23, D=8, Dv=8, causal=True,
                                      q_batch=(2,), seed=4)),
         dropout_p=0.5, seed=4, blocks=(7, 16), dout_scale=1.0)
@example(vc=VariantCase(AttentionCase("float64", Lq=23, Lk=40, D=8, Dv=4, seed=5),
                        bias_kind="padding", bias_shape=(1, 40), softcap=5.0),
         dropout_p=0.9, seed=2**32, blocks=None, dout_scale=1.0)
@example(vc=VariantCase(AttentionCase("float16", Lq=1, Lk=12, D=1, Dv=1, logit_max=50.0,
                                      seed=0),
                        bias_kind="dense", bias_shape=(1, 1), bias_dtype="bfloat16",
                        mask_kind="dense", mask_shape=(1, 1), softcap=30.0),
         dropout_p=0.9, seed=1, blocks=None, dout_scale=1.0)  # out 1.9e-21 stored as 0
def test_gradients_match_reference(vc, dropout_p, seed, blocks, dout_scale):
    check_backward(vc, dropout_p, seed, blocks, dout_scale)


@pytest.mark.parametrize("variant", ["causal", "bias", "mask", "window", "alibi_slopes",
                                     "softcap"])
@examples(25)
@given(dropout_p=DROPOUT_PS, seed=SEEDS, blocks=st.one_of(st.none(), SMALL_BLOCKS),
       data=st.data())
def test_dropout_with_each_variant(variant, dropout_p, seed, blocks, data):
    """Dropout with causal and with each variant on its own, forward and backward."""
    vc = data.draw(backward_cases(
        options=(), required=() if variant == "causal" else (variant,),
        causal=st.just(True) if variant == "causal" else st.booleans()))
    check_forward(vc, dropout_p, seed, blocks)
    check_backward(vc, dropout_p, seed, blocks)


@examples(25)
@given(vc=variant_cases(dtypes=("float64",), neg_inf=st.just("none"), max_len=48,
                        max_head_dim=16, max_work=10**5),
       dropout_p=DROPOUT_PS, seed=SEEDS)
def test_wide_truth_agrees_with_reference(vc, dropout_p, seed):
    """accuracy.py's long-double truth with dropout computes reference.attention's and
    reference.attention_backward's formulas (the same mask, the same scaling)."""
    q, k, v, scale, options = with_dropout(vc, dropout_p, seed)
    causal = vc.case.causal
    out, lse = reference.attention(q, k, v, causal=causal, scale=scale, return_lse=True,
                                   **options)
    wide_out, wide_lse = true_attention(q, k, v, causal=causal, scale=scale, **options)
    assert wide_out.dtype == WIDE
    out_slack, lse_slack = score_rounding_slack(q, k, v, scale=scale, **options)
    assert_within_budget("out", out, wide_out, wide_out,
                         out_floor(q.dtype, v) / (1 - dropout_p), out_slack)
    assert_within_budget("lse", lse, wide_lse, wide_lse, lse_floor(q.dtype, wide_lse),
                         lse_slack)
    dout = draw_dout(vc.case, 1.0)
    with_dbias = "bias" in options
    grads = reference.attention_backward(dout, q, k, v, causal=causal, scale=scale,
                                         return_dbias=with_dbias, **options)
    wide = true_attention_backward(dout, q, k, v, causal=causal, scale=scale,
                                   return_dbias=with_dbias, **options)
    floors, slacks = backward_floors_and_slacks(dout, q, k, v, causal=causal, scale=scale,
                                                return_dbias=with_dbias, **options)
    # (naive = the truth rounded to float64: gradients may lie below float64's range)
    for name, g, w, floor, slack in zip(("dq", "dk", "dv", "dbias"), grads, wide, floors,
                                        slacks):
        assert_within_budget(name, g, w, w.astype(np.float64), floor, slack)


def test_the_accuracy_rule_catches_a_wrong_mask():
    """The rule is not vacuous: a result drawn with another seed fails it, forward and
    backward."""
    rng = np.random.default_rng(3)
    q, k, v, dout = (rng.standard_normal((2, 48, 16)).astype(np.float32) for _ in range(4))
    out, lse = cupyflash.attention(q, k, v, dropout_p=0.2, seed=1, return_lse=True)
    check_attention(out, lse, q, k, v, causal=False, scale=None, dropout_p=0.2, seed=1)
    with pytest.raises(AssertionError, match="out: .got - truth."):
        check_attention(out, lse, q, k, v, causal=False, scale=None, dropout_p=0.2, seed=2)
    grads = cupyflash.attention_backward(dout, q, k, v, out, lse, dropout_p=0.2, seed=1)
    with pytest.raises(AssertionError, match=".got - truth."):
        check_attention_backward(*grads, dout, q, k, v, causal=False, scale=None,
                                 dropout_p=0.2, seed=2)


@pytest.mark.parametrize("options, causal", [
    (dict(dropout_p=0.3), False),
    (dict(dropout_p=0.7), True),
    (dict(dropout_p=0.5, softcap=1.5, bias="padding", alibi_slopes=np.array([0.3, -0.2])),
     True),
    (dict(dropout_p=0.2, bias="full", window=(2, 1), mask="random"), False),
])
def test_gradients_match_finite_differences(options, causal):
    """The float64 NumPy backward with dropout is the derivative of
    sum(dout * attention(q, k, v, dropout_p=p, seed=seed, ...)): one seed, one mask, a
    smooth function of q, k, v and bias (softcap's chain rule included)."""
    rng = np.random.default_rng(30)
    B, Lq, Lk, D, Dv = 2, 5, 6, 3, 2
    q, k, v = (rng.standard_normal(s) * 1.5 for s in ((B, Lq, D), (B, Lk, D), (B, Lk, Dv)))
    options = dict(options, seed=12345)
    if options.get("bias") == "full":
        options["bias"] = rng.standard_normal((B, Lq, Lk))
    elif options.get("bias") == "padding":
        options["bias"] = rng.standard_normal((B, 1, Lk))
    if options.get("mask") == "random":
        options["mask"] = rng.random((Lq, Lk)) < 0.7
    dout = rng.standard_normal((B, Lq, Dv))
    keep = reference.dropout_mask(12345, options["dropout_p"], (B,), Lq, Lk)
    assert 0 < keep.sum() < keep.size  # the mask matters here
    for blocks in (None, (2, 3)):
        grads = gradients(dout, q, k, v, None, options, causal=causal, blocks=blocks)
        assert_gradients_are_the_derivative(grads, dout, q, k, v, causal=causal,
                                            options=options)


# ----------------------------------------------------------------------------------------
# bitwise properties
# ----------------------------------------------------------------------------------------

def qkv(dtype, batch=(2, 3), Lq=37, Lk=45, seed=4):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(batch + s).astype(DTYPES[dtype])
               for s in ((Lq, 16), (Lk, 16), (Lk, 8)))
    dout = rng.standard_normal(batch + (Lq, 8)).astype(DTYPES[dtype])
    return q, k, v, dout


def run_all(q, k, v, dout, **options):
    """Bytes of attention's out and lse, attention_backward's gradients from them, and
    attention_vjp's out and gradients, all with ``options``."""
    out, lse = cupyflash.attention(q, k, v, return_lse=True, **options)
    grads = cupyflash.attention_backward(dout, q, k, v, out, lse, **options)
    vjp_out, vjp = cupyflash.attention_vjp(q, k, v, **options)
    return [x.tobytes() for x in (out, lse, *grads, vjp_out, *vjp(dout))]


@ALL_DTYPES
def test_zero_dropout_is_bitwise_no_dropout(dtype):
    """dropout_p = 0 (float or int, with or without a seed) gives exactly the bits of a
    call without dropout, forward, backward and vjp; the reference likewise."""
    q, k, v, dout = qkv(dtype)
    expected = run_all(q, k, v, dout, causal=True, softcap=20.0)
    for options in (dict(dropout_p=0.0), dict(dropout_p=0), dict(dropout_p=0.0, seed=7),
                    dict(seed=2**64 - 1)):
        assert run_all(q, k, v, dout, causal=True, softcap=20.0, **options) == expected
    ref = reference.attention(q, k, v, causal=True, return_lse=True)
    ref_0 = reference.attention(q, k, v, causal=True, return_lse=True, dropout_p=0.0, seed=3)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(ref, ref_0))
    ref_grads = reference.attention_backward(dout, q, k, v, dropout_p=0.0, seed=3)
    assert all(a.tobytes() == b.tobytes()
               for a, b in zip(ref_grads, reference.attention_backward(dout, q, k, v)))


@ALL_DTYPES
def test_same_seed_same_bits_other_seed_other_result(dtype):
    """The same seed gives the same bits on every call (attention, attention_backward,
    attention_vjp, whose closure keeps the seed); another seed gives another out and
    other gradients; the lse never depends on dropout."""
    q, k, v, dout = qkv(dtype)
    options = dict(causal=True, bias=np.zeros((37, 45), np.float32))
    first = run_all(q, k, v, dout, dropout_p=0.25, seed=2**33 + 1, **options)
    assert run_all(q, k, v, dout, dropout_p=0.25, seed=2**33 + 1, **options) == first
    other = run_all(q, k, v, dout, dropout_p=0.25, seed=2**33 + 2, **options)
    out, lse, dq, dk, dv, vjp_out, vjp_dq, vjp_dk, vjp_dv = range(9)
    for i in (out, dq, dk, dv):
        assert other[i] != first[i]
    assert first[vjp_out] == first[out] and first[vjp_dq:] == first[dq:vjp_out]
    no_dropout = run_all(q, k, v, dout, **options)
    assert first[lse] == other[lse] == no_dropout[lse]
    # the high word of the seed matters too
    high = run_all(q, k, v, dout, dropout_p=0.25, seed=1, **options)
    assert high[out] != first[out]


def test_vjp_keeps_its_seed():
    """attention_vjp's gradients are those of its own forward's mask, called again after
    other dropout calls."""
    q, k, v, dout = qkv("float64")
    out, vjp = cupyflash.attention_vjp(q, k, v, dropout_p=0.5, seed=11)
    cupyflash.attention(q, k, v, dropout_p=0.5, seed=12)
    _, lse = cupyflash.attention(q, k, v, dropout_p=0.5, seed=11, return_lse=True)
    expected = cupyflash.attention_backward(dout, q, k, v, out, lse, dropout_p=0.5, seed=11)
    assert all(g.tobytes() == e.tobytes() for g, e in zip(vjp(dout), expected))


def test_chunks_of_the_batch_draw_the_same_mask(monkeypatch):
    """A chunk of one batch element at a time gives bitwise what one chunk for all does:
    each element's mask comes from its own flat index, not from its place in a chunk."""
    q, k, v, dout = qkv("float32")
    expected = run_all(q, k, v, dout, dropout_p=0.3, seed=8)
    monkeypatch.setattr(_numpy_backend, "CHUNK_BYTES", 1)
    assert run_all(q, k, v, dout, dropout_p=0.3, seed=8) == expected


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------

def raises(error, message):
    return pytest.raises(error, match="^" + re.escape(message))


def call(fn, q, k, v, **options):
    """The arrays ``fn`` returns with ``options`` (for attention_vjp: out, then the
    gradients of out.sum()); attention_backward gets a forward without options."""
    if fn == "attention":
        return [cupyflash.attention(q, k, v, **options)]
    if fn == "attention_vjp":
        out, vjp = cupyflash.attention_vjp(q, k, v, **options)
        return [out, *vjp(out * 0 + 1)]
    out, lse = cupyflash.attention(q, k, v, return_lse=True)
    return list(cupyflash.attention_backward(out * 0 + 1, q, k, v, out, lse, **options))


FUNCTIONS = pytest.mark.parametrize("fn", ["attention", "attention_backward", "attention_vjp"])


@FUNCTIONS
@pytest.mark.parametrize("options, error, message", [
    (dict(dropout_p="0.1", seed=1), TypeError,
     "dropout_p must be a real number in [0, 1), got str"),
    (dict(dropout_p=True, seed=1), TypeError,
     "dropout_p must be a real number in [0, 1), got bool"),
    (dict(dropout_p=None), TypeError,
     "dropout_p must be a real number in [0, 1), got NoneType"),
    (dict(dropout_p=0.1j, seed=1), TypeError,
     "dropout_p must be a real number in [0, 1), got complex"),
    (dict(dropout_p=1.0, seed=1), ValueError, "dropout_p must be in [0, 1), got 1.0"),
    (dict(dropout_p=1, seed=1), ValueError, "dropout_p must be in [0, 1), got 1.0"),
    (dict(dropout_p=-0.1, seed=1), ValueError, "dropout_p must be in [0, 1), got -0.1"),
    (dict(dropout_p=float("nan"), seed=1), ValueError, "dropout_p must be in [0, 1), got nan"),
    (dict(dropout_p=float("inf"), seed=1), ValueError, "dropout_p must be in [0, 1), got inf"),
    (dict(dropout_p=0.1), ValueError,
     "dropout_p=0.1 needs a seed (an int in [0, 2**64)); got seed=None"),
    (dict(dropout_p=0.1, seed=1.0), TypeError,
     "seed must be an int in [0, 2**64) or None, got float"),
    (dict(dropout_p=0.1, seed="1"), TypeError,
     "seed must be an int in [0, 2**64) or None, got str"),
    (dict(dropout_p=0.1, seed=True), TypeError,
     "seed must be an int in [0, 2**64) or None, got bool"),
    (dict(dropout_p=0.1, seed=-1), ValueError, "seed must be in [0, 2**64), got -1"),
    (dict(dropout_p=0.1, seed=2**64), ValueError,
     f"seed must be in [0, 2**64), got {2**64}"),
    # without dropout the seed is unused, but still checked
    (dict(seed=-1), ValueError, "seed must be in [0, 2**64), got -1"),
    (dict(dropout_p=0.0, seed=np.float64(3)), TypeError,
     "seed must be an int in [0, 2**64) or None, got float64"),
])
def test_dropout_options_are_validated(fn, options, error, message):
    q, k, v, _ = qkv("float32", batch=(2,), Lq=4, Lk=6)
    before = snapshot([q, k, v])
    with raises(error, f"{fn}: {message}"):
        call(fn, q, k, v, **options)
    assert snapshot([q, k, v]) == before


@FUNCTIONS
def test_numpy_scalars_are_accepted(fn):
    """NumPy floats and ints (a uint64 seed of 2**64 - 1) are as good as Python's."""
    q, k, v, _ = qkv("float64", batch=(2,), Lq=4, Lk=6)
    expected = call(fn, q, k, v, dropout_p=0.25, seed=2**64 - 1)
    got = call(fn, q, k, v, dropout_p=np.float32(0.25), seed=np.uint64(2**64 - 1))
    assert [g.tobytes() for g in got] == [e.tobytes() for e in expected]


def test_the_reference_needs_a_seed():
    q = np.zeros((2, 3))
    with pytest.raises(ValueError, match="seed"):
        reference.attention(q, q, q, dropout_p=0.5)


# ----------------------------------------------------------------------------------------
# the GPU: the mask of cuda/philox.cuh is the NumPy mask
# ----------------------------------------------------------------------------------------

# One thread per score of n_batch batch elements starting at b0: keep[x] for
# x = ((b - b0) * Lq + i) * Lk + j, from cupyflash::dropout_keep of cuda/philox.cuh.
KEEP_MASK_KERNEL = r"""
#include "philox.cuh"

extern "C" __global__ void dropout_keep_mask(unsigned int seed_lo, unsigned int seed_hi,
                                             unsigned int threshold, unsigned long long b0,
                                             long long n_batch, int Lq, int Lk,
                                             unsigned char* keep) {
    const long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (x >= n_batch * Lq * Lk) return;
    const unsigned int j = (unsigned int)(x % Lk);
    const unsigned int i = (unsigned int)((x / Lk) % Lq);
    const unsigned long long b = b0 + (unsigned long long)(x / ((long long)Lq * Lk));
    keep[x] = cupyflash::dropout_keep(seed_lo, seed_hi, threshold, b, i, j) ? 1 : 0;
}
"""


def compile_keep_mask_kernel(arch, verbose=False):
    """NVRTC-compile :data:`KEEP_MASK_KERNEL` for ``arch`` with the kernels' own options:
    ``(cubin, log)``."""
    from cupy.cuda import nvrtc
    prog = nvrtc.createProgram(KEEP_MASK_KERNEL, "dropout_keep_mask.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, _kernels.nvrtc_options(arch, verbose))
        except nvrtc.NVRTCError:
            raise AssertionError(f"philox.cuh does not compile for {arch}:\n"
                                 f"{nvrtc.getProgramLog(prog)}") from None
        return _kernels._whole_elf(nvrtc.getCUBIN(prog)), nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


def gpu_only(test):
    """The ``gpu`` marker, and a skip where there is no CUDA device."""
    for mark in requires_gpu:
        test = mark(test)
    return test


@gpu_only
@pytest.mark.parametrize("seed, dropout_p, b0, n_batch, Lq, Lk", [
    (0, 0.5, 0, 3, 67, 130),
    (2**64 - 1, 0.1, 0, 2, 33, 257),
    (0xDEADBEEF12345678, 0.9, 2**32 - 2, 4, 17, 29),   # b crosses into the high word
    (12345, 0.0, 7, 1, 5, 9),                            # threshold 0: every score kept
])
def test_gpu_keep_mask_is_the_numpy_mask_bit_for_bit(seed, dropout_p, b0, n_batch, Lq, Lk):
    import cupy
    from cupy.cuda import function

    cc = cupy.cuda.Device().compute_capability
    cubin, _ = compile_keep_mask_kernel(_kernels.arch_for(cc))
    module = function.Module()
    module.load(cubin)
    kernel = module.get_function("dropout_keep_mask")
    threshold = _philox.dropout_threshold(dropout_p)
    n = n_batch * Lq * Lk
    keep = cupy.full(n, 2, dtype=cupy.uint8)
    kernel(((n + 255) // 256, 1, 1), (256, 1, 1),
           (np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32), np.uint32(threshold),
            np.uint64(b0), np.int64(n_batch), np.int32(Lq), np.int32(Lk), keep))
    got = keep.get().reshape(n_batch, Lq, Lk)
    assert set(np.unique(got)) <= {0, 1}
    expected = _philox.dropout_keep_block(seed, threshold, np.arange(b0, b0 + n_batch),
                                          0, Lq, 0, Lk)
    assert np.array_equal(got.astype(bool), expected)
    if b0 == 0:
        assert np.array_equal(got.astype(bool),
                              reference.dropout_mask(seed, dropout_p, (n_batch,), Lq, Lk))


# ----------------------------------------------------------------------------------------
# the kernels: dropout in flash_fwd_{mma,simt}_variants and flash_bwd_*_variants
# ----------------------------------------------------------------------------------------

def test_dropout_routes_fp16_and_bf16_to_the_mma_variants_kernel():
    """The Hopper forward has no dropout: with dropout, fp16/bf16 take the mma.sync
    variants kernel on sm_90 too; float32/float64 keep the SIMT variants kernel."""
    from cupyflash import _cupy_backend
    for dtype in ("float16", "bfloat16"):
        for d in (64, 128, 256):
            plain = _cupy_backend.attention_config(d, d, dtype, 90, True, variants=True)
            dropped = _cupy_backend.attention_config(d, d, dtype, 90, True, variants=True,
                                                     dropout=True)
            assert plain.kernel == "wgmma"
            assert dropped.kernel == "mma"
            assert dropped.name_expression.startswith("cupyflash::flash_fwd_mma_variants<")
            on_ampere = _cupy_backend.attention_config(d, d, dtype, 80, True, variants=True,
                                                       dropout=True)
            assert on_ampere.name_expression == dropped.name_expression
    for dtype in ("float32", "float64"):
        cfg = _cupy_backend.attention_config(64, 64, dtype, 90, False, variants=True,
                                             dropout=True)
        assert cfg.name_expression.startswith("cupyflash::flash_fwd_simt_variants<")


def test_dropout_is_a_variant_and_fills_the_variant_params():
    """A problem with dropout goes to the VARIANTS kernels, and VariantParams carries the
    seed, the threshold of _philox.py and 1 / (1 - dropout_p); without dropout they are
    zero (the kernels' switch)."""
    from cupyflash import _cupy_backend
    q, k, v = qkv("float32")[:3]
    problem = _problem("attention", q, k, v, False, None, dict(dropout_p=0.3, seed=2**40 + 3))
    assert _cupy_backend.has_variants(problem)
    fields, _ = _cupy_backend._pack_variants(problem, None, None, None, [])
    assert int(fields["dropout_seed"]) == 2**40 + 3
    assert int(fields["dropout_threshold"]) == _philox.dropout_threshold(0.3)
    assert float(fields["dropout_scale"]) == 1.0 / (1.0 - 0.3)
    none = _problem("attention", q, k, v, False, None, dict(dropout_p=0.0, seed=5))
    assert not _cupy_backend.has_variants(none)
    fields, _ = _cupy_backend._pack_variants(none, None, None, None, [])
    assert (int(fields["dropout_seed"]), int(fields["dropout_threshold"]),
            float(fields["dropout_scale"])) == (0, 0, 0.0)


def on_gpu(dout, q, k, v, scale, options, *, causal, deterministic):
    """The CuPy forward's out and lse and the CuPy backward's dq, dk, dv (NaN-filled
    beforehand, so a skipped element shows), all as NumPy arrays; no input changes."""
    return gradients_on_gpu(dout, q, k, v, scale, options, causal=causal,
                            deterministic=deterministic, with_forward=True)


@gpu_only
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("causal, window", [(False, None), (True, None), (False, (30, 7))])
@ALL_DTYPES
def test_gpu_kernels_draw_the_reference_mask(dtype, causal, window, deterministic):
    """Bit for bit on the GPU, as for the NumPy backend: scale 0 and v = I make
    ``out > 0`` the forward kernel's keep mask, and dout = I makes ``dv^T > 0`` the
    backward kernel's. D = 64 is a head dim that the Hopper kernel would take without
    dropout; 150 keys cross several key blocks and end inside a group of four."""
    batch, Lq, Lk, seed, dropout_p = (2, 3), 97, 150, 2**40 + 17, 0.4
    rng = np.random.default_rng(3)
    q = rng.standard_normal(batch + (Lq, 64)).astype(dtype)
    k = rng.standard_normal(batch + (Lk, 64)).astype(dtype)
    options = dict(dropout_p=dropout_p, seed=seed)
    if window is not None:
        options["window"] = window
    expected = reference.dropout_mask(seed, dropout_p, batch, Lq, Lk)
    band = reference.causal_mask(Lq, Lk) if causal else np.ones((Lq, Lk), bool)
    if window is not None:
        band &= reference.window_mask(Lq, Lk, window)
    v = np.broadcast_to(np.eye(Lk, dtype=dtype), batch + (Lk, Lk))
    dout = np.zeros(batch + (Lq, Lk), dtype)
    out = on_gpu(dout, q, k, v, 0.0, options, causal=causal, deterministic=deterministic)[0]
    assert np.array_equal(out > 0, expected & band)
    # the backward: dv = W^T dout = W^T for dout = I (Dv = Lq)
    v = rng.standard_normal(batch + (Lk, Lq)).astype(dtype)
    dout = np.broadcast_to(np.eye(Lq, dtype=dtype), batch + (Lq, Lq)).copy()
    _, _, dq, dk, dv = on_gpu(dout, q, k, v, 0.0, options, causal=causal,
                              deterministic=deterministic)
    assert np.array_equal(np.swapaxes(dv, -1, -2) > 0, expected & band)
    assert np.all(dk == 0) and np.all(dq == 0)  # scale 0: the scores depend on neither


def check_on_gpu(vc, dropout_p, seed, deterministic, dout_scale=1.0):
    """Forward and backward on the GPU against the accuracy rule, the truth and the naive
    computation drawing the same mask from the same seed."""
    q, k, v, scale, options = with_dropout(vc, dropout_p, seed)
    dout = draw_dout(vc.case, dout_scale)
    out, lse, dq, dk, dv = on_gpu(dout, q, k, v, scale, options, causal=vc.case.causal,
                                  deterministic=deterministic)
    check_attention(out, lse, q, k, v, causal=vc.case.causal, scale=scale, **options)
    check_variant_gradients(vc, (dq, dk, dv), dout, q, k, v, scale, options)


# Awkward sizes for the GPU tiles (64 and 128 query rows, 32..128 keys per block): lengths
# that miss the blocks, Lq != Lk, a single query row, odd head dims, a broadcast batch.
GPU_SIZES = [
    dict(Lq=113, Lk=97, D=59, Dv=59),
    dict(Lq=1, Lk=257, D=64, Dv=64),
    dict(Lq=300, Lk=129, D=111, Dv=96, q_batch=(2, 2), k_batch=(2, 1), v_batch=(2, 1)),
    dict(Lq=70, Lk=150, D=256, Dv=256),
]


@gpu_only
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("size", range(len(GPU_SIZES)))
@pytest.mark.parametrize("causal", [False, True])
@ALL_DTYPES
def test_gpu_matches_reference(dtype, causal, size, deterministic):
    vc = VariantCase(AttentionCase(dtype, causal=causal, neg_inf="none", seed=40 + size,
                                   **GPU_SIZES[size]))
    check_on_gpu(vc, 0.3 if size % 2 else 0.1, 2**64 - 1 - size, deterministic)


# bias, mask, window, ALiBi and softcap with dropout
GPU_OPTIONS = ("bias", "mask", "window", "alibi_slopes", "softcap")


@gpu_only
@examples(40)
@given(vc=variant_cases(options=GPU_OPTIONS, neg_inf=st.just("none"), max_len=300,
                        max_work=4 * 10**6),
       dropout_p=DROPOUT_PS, seed=SEEDS, deterministic=st.booleans(),
       dout_scale=st.sampled_from([1.0, 1e-3, 1e3]))
def test_gpu_matches_reference_with_variants(vc, dropout_p, seed, deterministic, dout_scale):
    check_on_gpu(vc, dropout_p, seed, deterministic, dout_scale)


@gpu_only
@ALL_DTYPES
def test_gpu_dropout_is_bitwise_repeatable(dtype):
    """The same seed gives the same bits on the GPU (forward, and the deterministic
    backward); another seed gives another out and other gradients, and the same lse
    (dropout leaves l_i alone)."""
    vc = VariantCase(AttentionCase(dtype, Lq=200, Lk=230, D=64, Dv=64, causal=True,
                                   neg_inf="none", seed=36))
    q, k, v, scale, options = with_dropout(vc, 0.25, 2**33 + 1)
    dout = draw_dout(vc.case, 1.0)
    run = functools.partial(on_gpu, dout, q, k, v, scale, causal=True, deterministic=True)
    first, second = run(options), run(options)
    assert [x.tobytes() for x in first] == [x.tobytes() for x in second]
    other = run(dict(options, seed=2**33 + 2))
    out, lse, dq, dk, dv = range(5)
    for i in (out, dq, dk, dv):
        assert other[i].tobytes() != first[i].tobytes()
    assert other[lse].tobytes() == first[lse].tobytes()
