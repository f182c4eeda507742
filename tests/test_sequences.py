"""Packed variable-length attention (attention_varlen) and KV-cache decoding
(attention_decode), against the float64 reference.

Both run on the NumPy backend only (CuPy arrays raise NotImplementedError after
validation, checked under the ``gpu`` marker). Every sequence of a result is held to
``accuracy.py``'s rule against the truth of that sequence alone: its queries viewed as
``(Hk, G, Lq, D)`` against its own keys ``(Hk, 1, Lk, D)``. The draws put in what breaks
packing: empty sequences, Lq != Lk per sequence, grouped-query heads, causal masks that
hide whole rows, logits large enough that a merge without its lse shift overflows, and
caches filled with garbage beyond each sequence's length.
"""

import dataclasses
import re

import itertools

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import cupyflash
from accuracy import DTYPES, accumulator_dtype, check_attention
from backends import requires_gpu
from cupyflash import reference
from strategies import examples

# See test_attention.py: OpenBLAS flags 0 * -inf on padding lanes; no NaN reaches a result.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")


# Scales: None (1/sqrt(D)), tiny logits, and logits of hundreds (exp overflows float32
# without the max shift of the online softmax and of the merge).
SCALES = (None, 0.05, 1.0, 30.0)
SEQ_LENGTHS = st.one_of(st.sampled_from([0, 1, 2, 7, 17]), st.integers(0, 40))


def grouped(x, Hk):
    """``(L, H, D)`` -> a contiguous ``(Hk, G, L, D)``: head h in group h // G."""
    L, H, D = x.shape
    return np.ascontiguousarray(x.reshape(L, Hk, H // Hk, D).transpose(1, 2, 0, 3))


def kv_heads(x):
    """``(L, Hk, D)`` -> ``(Hk, 1, L, D)``."""
    return np.ascontiguousarray(x.transpose(1, 0, 2)[:, None])


def rounded(rng, shape, dtype):
    return rng.standard_normal(shape).astype(DTYPES[dtype])


def snapshot(arrays):
    return [np.asarray(a).tobytes() for a in arrays]


# ----------------------------------------------------------------------------------------
# attention_varlen
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VarlenCase:
    dtype: str
    lengths_q: tuple
    lengths_k: tuple
    Hk: int = 1
    group: int = 1
    D: int = 8
    Dv: int = 8
    causal: bool = False
    scale: float = None
    seed: int = 0

    def inputs(self):
        rng = np.random.default_rng(self.seed)
        H = self.Hk * self.group
        q = rounded(rng, (sum(self.lengths_q), H, self.D), self.dtype)
        k = rounded(rng, (sum(self.lengths_k), self.Hk, self.D), self.dtype)
        v = rounded(rng, (sum(self.lengths_k), self.Hk, self.Dv), self.dtype)
        cu_q = np.concatenate([[0], np.cumsum(self.lengths_q)]).astype(np.int32)
        cu_k = np.concatenate([[0], np.cumsum(self.lengths_k)]).astype(np.int32)
        return q, k, v, cu_q, cu_k


@st.composite
def varlen_cases(draw):
    n_seq = draw(st.integers(0, 4))
    return VarlenCase(dtype=draw(st.sampled_from(list(DTYPES))),
                      lengths_q=tuple(draw(SEQ_LENGTHS) for _ in range(n_seq)),
                      lengths_k=tuple(draw(SEQ_LENGTHS) for _ in range(n_seq)),
                      Hk=draw(st.integers(1, 2)), group=draw(st.sampled_from([1, 2, 3])),
                      D=draw(st.integers(1, 20)), Dv=draw(st.integers(1, 20)),
                      causal=draw(st.booleans()), scale=draw(st.sampled_from(SCALES)),
                      seed=draw(st.integers(0, 2**16)))


def check_varlen(case, out, lse, q, k, v, cu_q, cu_k):
    """Each sequence of out and lse meets the accuracy rule against its own truth."""
    H = q.shape[1]
    assert out.shape == (q.shape[0], H, v.shape[-1]) and out.dtype == q.dtype
    assert lse.shape == (H, q.shape[0]) and lse.dtype == accumulator_dtype(q.dtype)
    for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        if a == b:
            continue
        check_attention(grouped(out[a:b], case.Hk), lse[:, a:b].reshape(case.Hk, -1, b - a),
                        grouped(q[a:b], case.Hk), kv_heads(k[c:d]), kv_heads(v[c:d]),
                        causal=case.causal, scale=case.scale)


@examples(200)
@given(case=varlen_cases())
@example(case=VarlenCase("float32", (5, 0, 9), (9, 3, 0), Hk=2, group=2, causal=True))
@example(case=VarlenCase("float16", (1, 17, 3), (17, 1, 40), D=16, scale=30.0, seed=1))
@example(case=VarlenCase("bfloat16", (3, 12), (12, 3), Hk=2, group=3, D=5, Dv=11,
                         causal=True, seed=2))
def test_varlen_matches_each_sequence(case):
    q, k, v, cu_q, cu_k = case.inputs()
    before = snapshot([q, k, v, cu_q, cu_k])
    out, lse = cupyflash.attention_varlen(q, k, v, cu_q, cu_k, causal=case.causal,
                                          scale=case.scale, return_lse=True)
    assert snapshot([q, k, v, cu_q, cu_k]) == before, "attention_varlen modified an input"
    check_varlen(case, out, lse, q, k, v, cu_q, cu_k)
    ref_out, ref_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, causal=case.causal,
                                                  scale=case.scale, return_lse=True)
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))


def test_varlen_equals_attention_per_sequence_and_takes_out():
    case = VarlenCase("float32", (7, 30, 1), (30, 7, 64), Hk=2, group=2, causal=True)
    q, k, v, cu_q, cu_k = case.inputs()
    buf = np.full((38, 4, 8), np.nan, np.float32)
    out = cupyflash.attention_varlen(q, k, v, cu_q, cu_k, causal=True, out=buf,
                                     max_seqlen_q=30, max_seqlen_k=64)
    assert out is buf
    for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        expected = cupyflash.attention(grouped(q[a:b], 2), kv_heads(k[c:d]),
                                       kv_heads(v[c:d]), causal=True)
        np.testing.assert_allclose(grouped(out[a:b], 2), expected, rtol=0, atol=1e-6)


def test_varlen_empty_sequences_give_zeros_and_neg_inf():
    q = np.ones((6, 2, 4), np.float16)
    k = v = np.ones((3, 1, 4), np.float16)
    cu_q, cu_k = np.array([0, 4, 4, 6]), np.array([0, 0, 2, 3])  # no keys; no queries; 1 key
    out, lse = cupyflash.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    assert (out[:4] == 0).all() and np.isneginf(lse[:, :4]).all()
    assert (out[4:] == 1).all() and np.isfinite(lse[:, 4:]).all()
    empty = cupyflash.attention_varlen(q[:0], k[:0], v[:0], [0], [0], return_lse=True)
    assert empty[0].shape == (0, 2, 4) and empty[1].shape == (2, 0)


def test_reference_varlen_is_attention_per_sequence_with_repeated_heads():
    case = VarlenCase("float64", (4, 6), (5, 2), Hk=2, group=3, causal=True)
    q, k, v, cu_q, cu_k = case.inputs()
    out, lse = reference.attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        for h in range(6):  # query head h reads key/value head h // 3
            o, l = reference.attention(q[a:b, h], k[c:d, h // 3], v[c:d, h // 3],
                                       causal=True, return_lse=True)
            np.testing.assert_array_equal(out[a:b, h], o)
            np.testing.assert_array_equal(lse[h, a:b], l)


# ----------------------------------------------------------------------------------------
# attention_decode
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DecodeCase:
    dtype: str
    seqlens: tuple
    Lq: int = 1
    L_new: int = 0
    Hk: int = 1
    group: int = 1
    D: int = 8
    Dv: int = 8
    causal: bool = False
    scale: float = None
    spare: int = 3           # cache positions beyond the longest sequence
    block_size: int = 4
    seed: int = 0

    @property
    def max_len(self):
        return max(self.seqlens, default=0) + self.L_new + self.spare

    def inputs(self):
        """``(q, k_cache, v_cache, cache_seqlens, k_new, v_new)``; the cache is garbage
        (finite, large) beyond each sequence, so reading past the end shows."""
        rng = np.random.default_rng(self.seed)
        B, H = len(self.seqlens), self.Hk * self.group
        q = rounded(rng, (B, self.Lq, H, self.D), self.dtype)
        k_cache = (rounded(rng, (B, self.max_len, self.Hk, self.D), self.dtype) * 4)
        v_cache = (rounded(rng, (B, self.max_len, self.Hk, self.Dv), self.dtype) * 100)
        for b, s in enumerate(self.seqlens):
            v_cache[b, :s] /= 100
        k_new = rounded(rng, (B, self.L_new, self.Hk, self.D), self.dtype)
        v_new = rounded(rng, (B, self.L_new, self.Hk, self.Dv), self.dtype)
        seqlens = np.array(self.seqlens, dtype=np.int32)
        return q, k_cache, v_cache, seqlens, k_new, v_new


@st.composite
def decode_cases(draw):
    B = draw(st.integers(1, 3))
    return DecodeCase(dtype=draw(st.sampled_from(list(DTYPES))),
                      seqlens=tuple(draw(SEQ_LENGTHS) for _ in range(B)),
                      Lq=draw(st.sampled_from([1, 1, 2, 5])),
                      L_new=draw(st.sampled_from([0, 0, 1, 3])),
                      Hk=draw(st.integers(1, 2)), group=draw(st.sampled_from([1, 2, 4])),
                      D=draw(st.integers(1, 16)), Dv=draw(st.integers(1, 16)),
                      causal=draw(st.booleans()), scale=draw(st.sampled_from(SCALES)),
                      spare=draw(st.integers(0, 9)), block_size=draw(st.sampled_from([1, 3, 8])),
                      seed=draw(st.integers(0, 2**16)))


def to_paged(case, rng, k_cache, v_cache):
    """The contiguous cache as a shuffled pool of blocks (plus garbage blocks) and its
    block table, padded with -1 beyond what each sequence uses."""
    B, bs = k_cache.shape[0], case.block_size
    per_seq = -(-case.max_len // bs)
    n_blocks = B * per_seq + 2
    perm = rng.permutation(n_blocks)
    table = np.full((B, per_seq + 1), -1, dtype=np.int32)
    pools = []
    for cache in (k_cache, v_cache):
        pool = np.full((n_blocks, bs) + cache.shape[2:], 1000, dtype=cache.dtype)
        padded = np.zeros((B, per_seq * bs) + cache.shape[2:], dtype=cache.dtype)
        padded[:, :case.max_len] = cache
        for b in range(B):
            for j in range(per_seq):
                table[b, j] = perm[b * per_seq + j]
                pool[table[b, j]] = padded[b, j * bs:(j + 1) * bs]
        pools.append(pool)
    return pools[0], pools[1], table


def from_paged(pool, table, length):
    """The first ``length`` positions of each sequence of a paged cache, contiguous."""
    bs = pool.shape[1]
    t = np.arange(length)
    return np.stack([pool[row[t // bs], t % bs] for row in table])


def check_decode(case, out, lse, q, k_before, v_before, k_new, v_new):
    """Each batch element meets the accuracy rule against attention over its first
    ``cache_seqlens[b]`` cached keys followed by k_new[b]."""
    B, Lq, H, _ = q.shape
    assert out.shape == (B, Lq, H, case.Dv) and out.dtype == q.dtype
    assert lse.shape == (B, H, Lq) and lse.dtype == accumulator_dtype(q.dtype)
    for b, s in enumerate(case.seqlens):
        k = np.concatenate([k_before[b, :s], k_new[b]])
        v = np.concatenate([v_before[b, :s], v_new[b]])
        check_attention(grouped(out[b], case.Hk), lse[b].reshape(case.Hk, case.group, Lq),
                        grouped(q[b], case.Hk), kv_heads(k), kv_heads(v),
                        causal=case.causal, scale=case.scale)


def check_appended(case, k_after, k_before, k_new):
    """The append wrote k_new at positions seqlens[b] .. + L_new, and nothing else."""
    expected = k_before.copy()
    for b, s in enumerate(case.seqlens):
        expected[b, s:s + case.L_new] = k_new[b]
    np.testing.assert_array_equal(k_after, expected)


@examples(200)
@given(case=decode_cases(), paged=st.booleans(),
       num_splits=st.sampled_from([None, 1, 2, 3, 7]))
@example(case=DecodeCase("float32", (9, 0, 30), Lq=5, L_new=3, Hk=2, group=2, causal=True,
                         scale=30.0), paged=True, num_splits=3)
@example(case=DecodeCase("float16", (0, 0), Lq=2), paged=False, num_splits=2)
@example(case=DecodeCase("bfloat16", (40, 13), Lq=1, L_new=1, group=4, D=16, scale=30.0,
                         block_size=8), paged=True, num_splits=4)
def test_decode_matches_attention_over_the_cache(case, paged, num_splits):
    q, k_cache, v_cache, seqlens, k_new, v_new = case.inputs()
    new = dict(k_new=k_new, v_new=v_new) if case.L_new else {}
    k_before, v_before = k_cache.copy(), v_cache.copy()
    if paged:
        k_cache, v_cache, table = to_paged(case, np.random.default_rng(case.seed), k_cache,
                                           v_cache)
        new["block_table"] = table
    others = [q, seqlens, k_new, v_new] + ([table] if paged else [])
    before = snapshot(others)
    out, lse = cupyflash.attention_decode(q, k_cache, v_cache, seqlens, causal=case.causal,
                                          scale=case.scale, num_splits=num_splits,
                                          return_lse=True, **new)
    assert snapshot(others) == before, "attention_decode modified an input other than the cache"
    check_decode(case, out, lse, q, k_before, v_before, k_new, v_new)
    if paged:
        k_cache = from_paged(k_cache, table, case.max_len)
        v_cache = from_paged(v_cache, table, case.max_len)
    check_appended(case, k_cache, k_before, k_new if case.L_new else k_new[:, :0])
    check_appended(case, v_cache, v_before, v_new if case.L_new else v_new[:, :0])


@examples(100)
@given(case=decode_cases(), num_splits=st.sampled_from([1, 2, 5]))
def test_paged_equals_contiguous(case, num_splits):
    """The same keys in a shuffled pool of blocks give bitwise the same result, and the
    append lands in the same logical positions."""
    q, k_cache, v_cache, seqlens, k_new, v_new = case.inputs()
    new = dict(k_new=k_new, v_new=v_new) if case.L_new else {}
    k_pool, v_pool, table = to_paged(case, np.random.default_rng(case.seed), k_cache, v_cache)
    options = dict(causal=case.causal, scale=case.scale, num_splits=num_splits,
                   return_lse=True)
    out, lse = cupyflash.attention_decode(q, k_cache, v_cache, seqlens, **options, **new)
    p_out, p_lse = cupyflash.attention_decode(q, k_pool, v_pool, seqlens, block_table=table,
                                              **options, **new)
    np.testing.assert_array_equal(p_out, out)
    np.testing.assert_array_equal(p_lse, lse)
    np.testing.assert_array_equal(from_paged(k_pool, table, case.max_len), k_cache)


def test_splits_merge_to_one_split_and_reference():
    case = DecodeCase("float32", (200, 37, 1), Lq=3, L_new=2, Hk=2, group=2, causal=True,
                      scale=30.0)
    q, k_cache, v_cache, seqlens, k_new, v_new = case.inputs()
    one = cupyflash.attention_decode(q, k_cache.copy(), v_cache.copy(), seqlens, k_new=k_new,
                                     v_new=v_new, causal=True, scale=30.0, num_splits=1,
                                     return_lse=True)
    ref = reference.attention_decode(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new,
                                     causal=True, scale=30.0, return_lse=True)
    for splits in (2, 3, 16, 500):
        got = cupyflash.attention_decode(q, k_cache.copy(), v_cache.copy(), seqlens,
                                         k_new=k_new, v_new=v_new, causal=True, scale=30.0,
                                         num_splits=splits, return_lse=True)
        for g, o, r in zip(got, one, ref):
            np.testing.assert_allclose(g, o, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_append_leaves_cache_seqlens_and_the_next_call_reads_the_new_keys():
    case = DecodeCase("float64", (4, 0), L_new=2, Hk=1, group=2)
    q, k_cache, v_cache, seqlens, k_new, v_new = case.inputs()
    out = cupyflash.attention_decode(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new)
    assert seqlens.tolist() == [4, 0]                      # not advanced
    again = cupyflash.attention_decode(q, k_cache, v_cache, seqlens + 2)
    np.testing.assert_array_equal(again, out)
    assert (k_cache[0, 4:6] == k_new[0]).all() and (v_cache[1, 0:2] == v_new[1]).all()


def test_decode_empty_cache_gives_zeros_and_neg_inf():
    q = np.ones((2, 3, 2, 4), np.float32)
    cache = np.full((2, 5, 1, 4), np.nan, np.float32)     # never read beyond the lengths
    out, lse = cupyflash.attention_decode(q, cache, cache, np.array([0, 0]), num_splits=3,
                                          return_lse=True)
    assert (out == 0).all() and np.isneginf(lse).all()
    out, lse = cupyflash.attention_decode(q, cache, cache, np.array([0, 0]), causal=True,
                                          k_new=np.ones((2, 1, 1, 4), np.float32),
                                          v_new=np.ones((2, 1, 1, 4), np.float32),
                                          return_lse=True)
    # Lq = 3 causal queries after one key: the first two see nothing
    assert (out[:, :2] == 0).all() and np.isneginf(lse[:, :, :2]).all()
    assert (out[:, 2] == 1).all() and not np.isnan(out).any()


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------

def raises(error, message):
    return pytest.raises(error, match="^" + re.escape(message))


def varlen_args():
    q = np.zeros((6, 4, 8), np.float32)
    k = np.zeros((5, 2, 8), np.float32)
    v = np.zeros((5, 2, 3), np.float32)
    return dict(q=q, k=k, v=v, cu_seqlens_q=np.array([0, 2, 6], np.int32),
                cu_seqlens_k=np.array([0, 5, 5], np.int32))


@pytest.mark.parametrize("change, error, message", [
    (dict(q=np.zeros((6, 4), np.float32)), ValueError,
     "attention_varlen: q must have 3 dimensions (total, heads, head dim), got shape (6, 4)"),
    (dict(k=np.zeros((5, 2, 8), np.float16)), TypeError,
     "attention_varlen: q, k, v must share one dtype; got q float32, k float16, v float32"),
    (dict(v=np.zeros((5, 2, 3), np.int32)), TypeError,
     "attention_varlen: v has unsupported dtype int32"),
    (dict(k=np.zeros((5, 2, 7), np.float32)), ValueError,
     "attention_varlen: q.shape[-1] (8) must equal k.shape[-1] (7)"),
    (dict(v=np.zeros((4, 2, 3), np.float32)), ValueError,
     "attention_varlen: k.shape[:2] (5, 2) must equal v.shape[:2] (4, 2)"),
    (dict(k=np.zeros((5, 3, 8), np.float32), v=np.zeros((5, 3, 3), np.float32)), ValueError,
     "attention_varlen: the number of query heads q.shape[1] (4) must be a multiple of the "
     "number of key/value heads k.shape[1] (3)"),
    (dict(cu_seqlens_q=np.array([0.0, 2.0, 6.0])), TypeError,
     "attention_varlen: cu_seqlens_q must have an integer dtype (int32 as in "
     "FlashAttention), got float64"),
    (dict(cu_seqlens_k=np.array([[0, 5, 5]])), ValueError,
     "attention_varlen: cu_seqlens_k must have 1 dimension, got shape (1, 3)"),
    (dict(cu_seqlens_k=np.array([0, 5])), ValueError,
     "attention_varlen: cu_seqlens_q (3,) and cu_seqlens_k (2,) must have one shape"),
    (dict(cu_seqlens_q=np.array([1, 2, 6])), ValueError,
     "attention_varlen: cu_seqlens_q[0] must be 0, got 1"),
    (dict(cu_seqlens_q=np.array([0, 7, 6])),
     ValueError, "attention_varlen: cu_seqlens_q must be non-decreasing (prefix sums of the "
     "sequence lengths), but cu_seqlens_q[2] (6) < cu_seqlens_q[1] (7)"),
    (dict(cu_seqlens_k=np.array([0, 2, 4])), ValueError,
     "attention_varlen: cu_seqlens_k[-1] (4) must equal k.shape[0] (5)"),
    (dict(max_seqlen_q=3), ValueError,
     "attention_varlen: max_seqlen_q (3) is less than the longest sequence (4)"),
    (dict(max_seqlen_k=5.0), TypeError,
     "attention_varlen: max_seqlen_k must be an int or None, got float"),
    (dict(causal=1), TypeError, "attention_varlen: causal must be a bool, got int"),
    (dict(scale=np.inf), ValueError, "attention_varlen: scale must be finite, got inf"),
    (dict(return_lse="yes"), TypeError, "attention_varlen: return_lse must be a bool"),
    (dict(out=np.zeros((6, 4, 8), np.float32)), ValueError,
     "attention_varlen: out must have shape (6, 4, 3), got (6, 4, 8)"),
])
def test_varlen_validation(change, error, message):
    args = varlen_args()
    args.update(change)
    before = snapshot([a for a in args.values() if isinstance(a, np.ndarray)])
    with raises(error, message):
        cupyflash.attention_varlen(**args)
    assert snapshot([a for a in args.values() if isinstance(a, np.ndarray)]) == before


def decode_args(paged=False):
    args = dict(q=np.zeros((2, 1, 4, 8), np.float32),
                k_cache=np.zeros((2, 6, 2, 8), np.float32),
                v_cache=np.zeros((2, 6, 2, 3), np.float32),
                cache_seqlens=np.array([3, 5], np.int32),
                k_new=np.ones((2, 1, 2, 8), np.float32), v_new=np.ones((2, 1, 2, 3), np.float32))
    if paged:  # 5 blocks of 2 positions; sequences of at most 3 blocks
        args.update(k_cache=np.zeros((5, 2, 2, 8), np.float32),
                    v_cache=np.zeros((5, 2, 2, 3), np.float32),
                    block_table=np.array([[0, 1, -1], [2, 3, 4]], np.int32))
    return args


@pytest.mark.parametrize("paged, change, error, message", [
    (False, dict(q=np.zeros((2, 4, 8), np.float32)), ValueError,
     "attention_decode: q must have 4 dimensions (batch, length, heads, head dim), "
     "got shape (2, 4, 8)"),
    (False, dict(v_new=None), ValueError,
     "attention_decode: k_new and v_new must be given together, got k_new only"),
    (False, dict(k_new=np.ones((2, 1, 2, 8), np.float64)), TypeError,
     "attention_decode: q, k_cache, v_cache, k_new, v_new must share one dtype; got "
     "q float32, k_cache float32, v_cache float32, k_new float64, v_new float32"),
    (False, dict(v_cache=np.zeros((2, 7, 2, 3), np.float32)), ValueError,
     "attention_decode: k_cache.shape[:3] (2, 6, 2) must equal v_cache.shape[:3] (2, 7, 2)"),
    (False, dict(q=np.zeros((2, 1, 3, 8), np.float32)), ValueError,
     "attention_decode: the number of query heads q.shape[2] (3) must be a multiple of the "
     "number of key/value heads k_cache.shape[2] (2)"),
    (False, dict(q=np.zeros((3, 1, 4, 8), np.float32)), ValueError,
     "attention_decode: k_cache.shape[0] (2) must equal the batch size q.shape[0] (3); "
     "a paged cache needs block_table"),
    (False, dict(k_new=np.ones((2, 2, 2, 8), np.float32)), ValueError,
     "attention_decode: v_new must have shape (B, L_new, Hk, Dv) = (2, 2, 2, 3), "
     "got (2, 1, 2, 3)"),
    (False, dict(cache_seqlens=np.array([3.0, 5.0])), TypeError,
     "attention_decode: cache_seqlens must have an integer dtype (int32 as in "
     "FlashAttention), got float64"),
    (False, dict(cache_seqlens=np.array([3, 5, 1])), ValueError,
     "attention_decode: cache_seqlens must have shape (B,) = (2,), got (3,)"),
    (False, dict(cache_seqlens=np.array([3, -1])), ValueError,
     "attention_decode: cache_seqlens[1] (-1) must be >= 0"),
    (False, dict(cache_seqlens=np.array([3, 6])), ValueError,
     "attention_decode: cache_seqlens[1] + L_new (6 + 1) exceeds the cache length "
     "k_cache.shape[1] (6)"),
    (False, dict(cache_seqlens=np.array([7, 0]), k_new=None, v_new=None), ValueError,
     "attention_decode: cache_seqlens[0] (7) exceeds the cache length k_cache.shape[1] (6)"),
    (False, dict(num_splits=0), ValueError, "attention_decode: num_splits must be >= 1, got 0"),
    (False, dict(num_splits=2.0), TypeError,
     "attention_decode: num_splits must be an int or None, got float"),
    (False, dict(causal=0), TypeError, "attention_decode: causal must be a bool, got int"),
    (False, dict(scale="1"), TypeError, "attention_decode: scale must be a real number"),
    (True, dict(block_table=np.array([[0, 1, -1], [2, 3, 5]], np.int32)), ValueError,
     "attention_decode: block_table[1, 2] (5) is out of range for 5 blocks (k_cache.shape[0])"),
    (True, dict(block_table=np.array([[0, -1, -1], [2, 3, 4]], np.int32)), ValueError,
     "attention_decode: block_table[0, 1] (-1) is out of range for 5 blocks"),
    (True, dict(block_table=np.array([[0, 1, 0], [2, 3, 1]], np.float32)), TypeError,
     "attention_decode: block_table must have an integer dtype"),
    (True, dict(block_table=np.array([[0, 1], [2, 3]], np.int32)), ValueError,
     "attention_decode: cache_seqlens[1] + L_new (5 + 1) exceeds the paged capacity "
     "block_table.shape[1] * k_cache.shape[1] (4)"),
    (True, dict(block_table=np.array([[0, 1, -1]], np.int32)), ValueError,
     "attention_decode: block_table.shape[0] (1) must equal the batch size q.shape[0] (2)"),
    (True, dict(block_table=np.array([[0, 1, -1], [2, 3, 1]], np.int32)), ValueError,
     "attention_decode: the append of k_new would write one cache slot twice"),
])
def test_decode_validation(paged, change, error, message):
    args = decode_args(paged)
    args.update(change)
    args = {name: x for name, x in args.items() if x is not None}
    arrays = [a for a in args.values() if isinstance(a, np.ndarray)]
    before = snapshot(arrays)
    with raises(error, message):
        cupyflash.attention_decode(**args)
    assert snapshot(arrays) == before, "a failed call modified an input"


def test_decode_read_only_cache_with_append():
    args = decode_args()
    args["k_cache"].flags.writeable = False
    with raises(ValueError, "attention_decode: k_cache is read-only, but k_new is to be "
                            "appended to it"):
        cupyflash.attention_decode(**args)
    args.pop("k_new"), args.pop("v_new")
    cupyflash.attention_decode(**args)  # reading a read-only cache is fine


def test_mixed_numpy_and_lists_are_accepted_for_offsets():
    args = varlen_args()
    args["cu_seqlens_q"], args["cu_seqlens_k"] = [0, 2, 6], (0, 5, 5)
    assert cupyflash.attention_varlen(**args).shape == (6, 4, 3)


# ----------------------------------------------------------------------------------------
# the GPU: the same validation; varlen runs every sequence in one launch (fp16/bf16 above
# d = 128: the fused forward per sequence) (decode: test_decode_gpu.py)
# ----------------------------------------------------------------------------------------

def gpu_only(test):
    for mark in requires_gpu:
        test = mark(test)
    return test


@gpu_only
def test_cupy_inputs_are_validated_like_numpy_inputs():
    import cupy
    args = {n: cupy.asarray(x) for n, x in varlen_args().items()}
    with raises(ValueError, "attention_varlen: cu_seqlens_q[0] must be 0"):
        cupyflash.attention_varlen(**dict(args, cu_seqlens_q=cupy.asarray([1, 2, 6])))
    with raises(TypeError, "attention_varlen: arrays must be all NumPy or all CuPy arrays"):
        cupyflash.attention_varlen(**dict(args, q=np.zeros((6, 4, 8), np.float32)))
    for (paged, change, error, message), host_ints in itertools.product(DECODE_CASES_ON_GPU,
                                                                       (False, True)):
        # every array on the GPU, or cache_seqlens and block_table left on the host
        on_host = ("cache_seqlens", "block_table") if host_ints else ()
        args = {n: x if n in on_host else cupy.asarray(x)
                for n, x in decode_args(paged).items()}
        args.update({n: x if n in on_host or not isinstance(x, np.ndarray) else cupy.asarray(x)
                     for n, x in change.items()})
        args = {name: x for name, x in args.items() if x is not None}
        before = [args[n].get() for n in ("k_cache", "v_cache")]
        with raises(error, message):
            cupyflash.attention_decode(**args)
        assert all((args[n].get() == b).all() for n, b in zip(("k_cache", "v_cache"), before)), \
            "a failed call appended to the cache"


# A sample of test_decode_validation's cases, with every array moved to the GPU.
DECODE_CASES_ON_GPU = [
    (False, dict(num_splits=0), ValueError, "attention_decode: num_splits must be >= 1, got 0"),
    (False, dict(cache_seqlens=np.array([3, 6])), ValueError,
     "attention_decode: cache_seqlens[1] + L_new (6 + 1) exceeds the cache length "
     "k_cache.shape[1] (6)"),
    (False, dict(cache_seqlens=np.array([3.0, 5.0])), TypeError,
     "attention_decode: cache_seqlens must have an integer dtype"),
    (True, dict(block_table=np.array([[0, 1, -1], [2, 3, 5]], np.int32)), ValueError,
     "attention_decode: block_table[1, 2] (5) is out of range for 5 blocks (k_cache.shape[0])"),
    (True, dict(block_table=np.array([[0, 1, -1], [2, 3, 1]], np.int32)), ValueError,
     "attention_decode: the append of k_new would write one cache slot twice"),
    (False, dict(v_new=None), ValueError,
     "attention_decode: k_new and v_new must be given together, got k_new only"),
]


@gpu_only
@examples(60)
@given(case=varlen_cases())
@example(case=VarlenCase("float16", (130, 0, 257), (300, 5, 64), Hk=2, group=2, D=64,
                         Dv=64, causal=True, seed=3))
@example(case=VarlenCase("bfloat16", (1, 200), (129, 1), Hk=1, group=4, D=128, Dv=128,
                         seed=4))
@example(case=VarlenCase("float64", (33, 7), (7, 33), Hk=2, group=1, D=20, Dv=5,
                         causal=True, seed=5))
@example(case=VarlenCase("float16", (70, 0, 129, 1), (129, 3, 64, 0), Hk=2, group=2, D=128,
                         Dv=64, causal=True, seed=6))
def test_varlen_on_gpu_matches_each_sequence(case):
    import cupy
    q, k, v, cu_q, cu_k = case.inputs()
    gq, gk, gv, gcu_q, gcu_k = (cupy.asarray(x) for x in (q, k, v, cu_q, cu_k))
    buf = cupy.full((q.shape[0], q.shape[1], v.shape[-1]), np.nan, dtype=q.dtype)
    out, lse = cupyflash.attention_varlen(gq, gk, gv, gcu_q, gcu_k, causal=case.causal,
                                          scale=case.scale, return_lse=True, out=buf)
    assert out is buf and isinstance(lse, cupy.ndarray)
    for before, after in zip((q, k, v, cu_q, cu_k), (gq, gk, gv, gcu_q, gcu_k)):
        assert before.tobytes() == after.get().tobytes(), "attention_varlen modified an input"
    check_varlen(case, out.get(), lse.get(), q, k, v, cu_q, cu_k)


@gpu_only
@pytest.mark.parametrize("dtype, D, causal", [("bfloat16", 128, True), ("float16", 64, False),
                                              ("float32", 32, True)])
def test_varlen_on_gpu_takes_host_offsets(dtype, D, causal):
    """CuPy q, k, v with offsets on the host (NumPy arrays of any integer dtype, lists):
    the same output and lse, bit for bit, as with the offsets on the device, validated
    alike; only NumPy q, k, v refuse CuPy offsets."""
    import cupy
    case = VarlenCase(dtype, (3, 0, 70, 129, 300), (5, 9, 0, 200, 257), Hk=2, group=2, D=D,
                      Dv=D, causal=causal, seed=11)
    q, k, v, cu_q, cu_k = case.inputs()
    gq, gk, gv = (cupy.asarray(x) for x in (q, k, v))
    on_device = cupyflash.attention_varlen(gq, gk, gv, cupy.asarray(cu_q), cupy.asarray(cu_k),
                                           causal=causal, return_lse=True)
    check_varlen(case, on_device[0].get(), on_device[1].get(), q, k, v, cu_q, cu_k)
    for host_q, host_k in ((cu_q.astype(np.int32), cu_k.astype(np.int32)),
                           (cu_q.astype(np.int64), cu_k.astype(np.uint16)),
                           (cu_q.tolist(), cu_k.tolist())):
        out, lse = cupyflash.attention_varlen(gq, gk, gv, host_q, host_k, causal=causal,
                                              return_lse=True)
        assert isinstance(out, cupy.ndarray) and isinstance(lse, cupy.ndarray)
        assert out.get().tobytes() == on_device[0].get().tobytes()
        assert lse.get().tobytes() == on_device[1].get().tobytes()
    bad = cu_q.copy()
    bad[2] = bad[1] - 1
    with raises(ValueError, "attention_varlen: cu_seqlens_q must be non-decreasing"):
        cupyflash.attention_varlen(gq, gk, gv, bad, cu_k)
    with raises(TypeError, "attention_varlen: cu_seqlens_k must have an integer dtype"):
        cupyflash.attention_varlen(gq, gk, gv, cu_q, cu_k.astype(np.float32))
    with raises(TypeError, "attention_varlen: arrays must be all NumPy or all CuPy arrays"):
        cupyflash.attention_varlen(q, k, v, cupy.asarray(cu_q), cu_k)


@gpu_only
def test_uploads_are_kept_by_content_per_stream(monkeypatch):
    """_cupy_backend.uploaded: one copy per (key, device, stream), the right content, and
    the oldest dropped first."""
    import cupy
    from cupyflash import _cupy_backend
    monkeypatch.setattr(_cupy_backend, "UPLOADS_KEPT", 3)
    device = cupy.cuda.Device().id
    made = []

    def make(values):
        return lambda: made.append(values) or np.array(values)
    first = _cupy_backend.uploaded(device, ("test", 1), make([1, 2, 3]))
    assert first.dtype == np.int32 and first.get().tolist() == [1, 2, 3]
    assert _cupy_backend.uploaded(device, ("test", 1), make([9])) is first and len(made) == 1
    with cupy.cuda.Stream():
        other = _cupy_backend.uploaded(device, ("test", 1), make([1, 2, 3]))
    assert other is not first and len(made) == 2
    for i in range(2, 5):
        _cupy_backend.uploaded(device, ("test", i), make([i]))
    assert _cupy_backend.uploaded(device, ("test", 1), make([7])).get().tolist() == [7]


# Lengths that end on, just before and just after the 64- and 128-row tiles of the packed
# kernels (their BLOCK_M is 128 or 192 and BLOCK_N 64 or 128), empty queries, empty keys
# and both, and one sequence longer than three tiles; keys of a different length per
# sequence, so the causal diagonal moves.
EDGE_LENGTHS_Q = (64, 0, 63, 65, 127, 128, 129, 1, 0, 191, 193, 5, 400, 2)
EDGE_LENGTHS_K = (64, 7, 0, 129, 128, 65, 127, 300, 0, 192, 2, 1, 257, 64)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_m, block_n", [(128, 128), (192, 128), (64, 64)])
def test_varlen_tiles_are_every_sequence_with_queries_heaviest_first(causal, block_m, block_n):
    """The persistent varlen kernel's tile order (_cupy_backend.varlen_tiles): every
    sequence with queries once, none without, heaviest first (key blocks visited by its
    query blocks, plus one each), and the first tile of each after the tiles of all its
    heads' query blocks before it."""
    from cupyflash import _cupy_backend
    rng = np.random.default_rng(block_m + causal)
    lq = np.array(list(EDGE_LENGTHS_Q) + list(rng.integers(0, 2000, 20)))
    lk = np.array(list(EDGE_LENGTHS_K) + list(rng.integers(0, 2000, 20)))
    heads = 3
    tiles = _cupy_backend.varlen_tiles(lq, lk, heads, block_m, block_n, causal)
    assert tiles.dtype == np.int32
    n = (len(tiles) - 1) // 2
    first, order = tiles[:n + 1], tiles[n + 1:]
    assert sorted(order) == [s for s in range(len(lq)) if lq[s] > 0]
    blocks = -(-lq[order] // block_m)
    assert first.tolist() == [0] + np.cumsum(blocks * heads).tolist()

    def weight(s):
        total = 0
        for b in range(-(-lq[s] // block_m)):
            keys = lk[s]
            if causal:
                keys = min(max(min((b + 1) * block_m, lq[s]) + lk[s] - lq[s], 0), lk[s])
            total += -(-keys // block_n) + 1
        return total
    weights = [weight(s) for s in order]
    assert weights == sorted(weights, reverse=True)


@gpu_only
@pytest.mark.parametrize("persistent", ["auto", "0"])
@pytest.mark.parametrize("fwd_kernel", ["auto", "mma"])
@pytest.mark.parametrize("dtype, D, Hk, group, causal", [
    ("float16", 64, 2, 2, True),
    ("bfloat16", 64, 1, 3, False),
    ("bfloat16", 128, 2, 1, True),
    ("float16", 128, 1, 4, False),
    ("bfloat16", 96, 2, 2, True),
    ("float16", 32, 3, 1, True),
    ("float32", 64, 2, 2, True),   # flash_fwd_simt_varlen
    ("float64", 32, 1, 2, False),
    ("bfloat16", 256, 1, 2, True),  # above VARLEN_MAX_HEAD_DIM: the forward per sequence
])
def test_varlen_on_gpu_at_tile_edges(monkeypatch, persistent, fwd_kernel, dtype, D, Hk, group,
                                     causal):
    """Many sequences in one launch: each one exactly as attention on its own, whatever
    the packed kernel reads past its end (the next sequence's rows); the Hopper kernel
    persistent over its tile list or one block per tile, and its tile counter back at
    zero after it."""
    import cupy
    from cupyflash import _cupy_backend
    monkeypatch.setenv("CUPYFLASH_FWD_KERNEL", fwd_kernel)
    monkeypatch.setenv("CUPYFLASH_FWD_PERSISTENT", persistent)
    case = VarlenCase(dtype, EDGE_LENGTHS_Q, EDGE_LENGTHS_K, Hk=Hk, group=group, D=D, Dv=D,
                      causal=causal, seed=D + group)
    q, k, v, cu_q, cu_k = case.inputs()
    out, lse = cupyflash.attention_varlen(*(cupy.asarray(x) for x in (q, k, v, cu_q, cu_k)),
                                          causal=causal, return_lse=True)
    out, lse = out.get(), lse.get()
    check_varlen(case, out, lse, q, k, v, cu_q, cu_k)
    counter = _cupy_backend.stream_counters(cupy.cuda.Device().id, "tiles", 1)
    assert not counter.get().any(), "the persistent kernel left its tile counter non-zero"
    for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        if c == d:  # no key: zeros and -inf, never NaN
            assert (out[a:b] == 0).all() and (lse[:, a:b] == -np.inf).all()


@gpu_only
@pytest.mark.parametrize("persistent", ["auto", "0"])
@pytest.mark.parametrize("fwd_kernel", ["auto", "mma"])
@pytest.mark.parametrize("dtype, D, causal", [
    ("float16", 64, False),
    ("bfloat16", 128, True),
    ("float16", 96, False),
    ("float32", 32, True),
    ("bfloat16", 256, False),
])
def test_varlen_on_gpu_reads_no_other_sequence(monkeypatch, persistent, fwd_kernel, dtype, D,
                                              causal):
    """Every other sequence's keys and values are non-finite (K NaN, V +Inf and -Inf): the
    finite sequences still match their own truth, never NaN, whatever the packed kernels
    read past a sequence's end (the Hopper kernel's last key block reaches into the next
    sequence's rows, whose V rows P = 0 would turn into NaN)."""
    import cupy
    monkeypatch.setenv("CUPYFLASH_FWD_KERNEL", fwd_kernel)
    monkeypatch.setenv("CUPYFLASH_FWD_PERSISTENT", persistent)
    case = VarlenCase(dtype, EDGE_LENGTHS_Q, EDGE_LENGTHS_K, Hk=2, group=2, D=D, Dv=D,
                      causal=causal, seed=3 * D + causal)
    q, k, v, cu_q, cu_k = case.inputs()
    poisoned = np.arange(len(EDGE_LENGTHS_K)) % 2 == 1
    for s in np.flatnonzero(poisoned):
        k[cu_k[s]:cu_k[s + 1]] = np.nan
        v[cu_k[s]:cu_k[s + 1]] = np.inf
        v[cu_k[s]:cu_k[s + 1], :, ::2] = -np.inf
    out, lse = cupyflash.attention_varlen(*(cupy.asarray(x) for x in (q, k, v, cu_q, cu_k)),
                                          causal=causal, return_lse=True)
    out, lse = out.get(), lse.get()
    kept = [s for s in range(len(poisoned)) if not poisoned[s]]
    pick_q = np.concatenate([np.arange(cu_q[s], cu_q[s + 1]) for s in kept])
    pick_k = np.concatenate([np.arange(cu_k[s], cu_k[s + 1]) for s in kept])
    lengths_q = [EDGE_LENGTHS_Q[s] for s in kept]
    lengths_k = [EDGE_LENGTHS_K[s] for s in kept]
    cu = (np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
          for lengths in (lengths_q, lengths_k))
    check_varlen(dataclasses.replace(case, lengths_q=tuple(lengths_q), lengths_k=tuple(lengths_k)),
                 out[pick_q], lse[:, pick_q], q[pick_q], k[pick_k], v[pick_k], *cu)
    assert not np.isnan(out[pick_q]).any()


@gpu_only
@pytest.mark.parametrize("dtype, D", [("float16", 64), ("bfloat16", 128), ("float16", 24),
                                      ("float32", 64), ("float64", 40)])
def test_varlen_on_gpu_is_one_launch(monkeypatch, dtype, D):
    """The packed kernels take every sequence in one launch, with int64 offsets and a
    max_seqlen above the longest too."""
    import cupy
    from cupyflash import _kernels
    launches = []
    get_function = _kernels.get_function

    def counting(*args, **kwargs):
        kernel = get_function(*args, **kwargs)

        def launch(*a, **kw):
            launches.append(args[2])
            return kernel(*a, **kw)
        launch.ptr = kernel.ptr
        return launch
    monkeypatch.setattr(_kernels, "get_function", counting)
    case = VarlenCase(dtype, (3, 0, 70, 129), (5, 9, 0, 200), Hk=2, group=2, D=D, Dv=D,
                      causal=True, seed=7)
    q, k, v, cu_q, cu_k = case.inputs()
    for offsets in (np.int32, np.int64):
        launches.clear()
        gq, gk, gv = (cupy.asarray(x) for x in (q, k, v))
        out, lse = cupyflash.attention_varlen(
            gq, gk, gv, cupy.asarray(cu_q.astype(offsets)), cupy.asarray(cu_k.astype(offsets)),
            max_seqlen_q=200, max_seqlen_k=300, causal=True, return_lse=True)
        assert len(launches) == 1 and "_varlen<" in launches[0], launches
        check_varlen(case, out.get(), lse.get(), q, k, v, cu_q, cu_k)
