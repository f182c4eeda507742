"""attention_decode on the GPU (CuPy arrays): the split-KV kernels of
``cuda/flash_decode.cuh`` against the float64 reference, with the accuracy rule of
``accuracy.py``, and the append against the NumPy backend's (the spec), bit for bit.

Every test is marked ``gpu``. Outputs come from CuPy's memory pool after it was filled
with NaN (:func:`poison_pool`), so an element a kernel forgets to write shows; caches
hold large finite garbage (and NaN where stated) beyond each sequence, so a key read past
its length shows. Sizes are small: the float64 reference on the host sets the pace. The
tests share kernel variants where they can (head dim 32 for the drawn cases, 128 for the
long ones): about 36 variants, whose cold NVRTC compiles (~0.8 s each) come on top of
the first run on a machine.
"""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import cupyflash
from accuracy import DTYPES, accumulator_dtype, check_attention
from backends import requires_gpu
from test_sequences import (DecodeCase, check_decode, decode_cases, grouped, kv_heads,
                            to_paged)

pytestmark = requires_gpu + [
    pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")]


def _cupy():
    import cupy
    return cupy


def poison_pool():
    """Leave 64 MiB of NaN in CuPy's pool: the next allocations are carved from it."""
    cupy = _cupy()
    x = cupy.full((16 << 20,), np.nan, dtype=np.float32)
    del x


def to_gpu(*arrays):
    cupy = _cupy()
    return [None if a is None else cupy.asarray(a) for a in arrays]


def decode_both(q, k_cache, v_cache, seqlens, *, k_new=None, v_new=None, block_table=None,
                **options):
    """Run attention_decode on the GPU and on NumPy copies of the same inputs.

    Returns ``(out, lse, k_after, v_after, np_k_after, np_v_after)`` as NumPy arrays: the
    GPU's results and caches after its append, and the caches after the NumPy backend's
    append (the spec; NumPy runs with one split, which does not change what it appends).
    q, the caches and the new keys may be NumPy arrays (copied to the GPU contiguous) or
    CuPy arrays of any layout (copied to the host for NumPy).
    """
    cupy = _cupy()
    host = [None if a is None else (a.get() if isinstance(a, cupy.ndarray) else np.array(a))
            for a in (q, k_cache, v_cache, seqlens, k_new, v_new, block_table)]
    dev = [None if a is None else (a if isinstance(a, cupy.ndarray) else cupy.asarray(a))
           for a in (q, k_cache, v_cache, seqlens, k_new, v_new, block_table)]
    extra = {}
    if k_new is not None:
        extra.update(k_new=dev[4], v_new=dev[5])
    if block_table is not None:
        extra.update(block_table=dev[6])
    poison_pool()
    out, lse = cupyflash.attention_decode(dev[0], dev[1], dev[2], dev[3], return_lse=True,
                                          **options, **extra)
    h_extra = {}
    if k_new is not None:
        h_extra.update(k_new=host[4], v_new=host[5])
    if block_table is not None:
        h_extra.update(block_table=host[6])
    np_k, np_v = host[1].copy(), host[2].copy()
    cupyflash.attention_decode(host[0], np_k, np_v, host[3], **dict(options, num_splits=1),
                               **h_extra)
    return out.get(), lse.get(), dev[1].get(), dev[2].get(), np_k, np_v


def check_sequences(out, lse, q, keys, values, *, Hk, causal, scale):
    """Each batch element meets the accuracy rule against attention over its keys."""
    B, Lq, H, _ = q.shape
    assert out.shape == (B, Lq, H, values[0].shape[-1]) and out.dtype == q.dtype
    assert lse.shape == (B, H, Lq) and lse.dtype == accumulator_dtype(q.dtype)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    for b in range(B):
        check_attention(grouped(out[b], Hk), lse[b].reshape(Hk, H // Hk, Lq),
                        grouped(q[b], Hk), kv_heads(keys[b]), kv_heads(values[b]),
                        causal=causal, scale=scale)


def logical_keys(cache, seqlens, new, table=None):
    """Keys 0 .. seqlens[b] - 1 of each sequence (through the table), then new[b]."""
    keys = []
    for b, s in enumerate(seqlens):
        t = np.arange(s)
        old = cache[b, t] if table is None else cache[table[b, t // cache.shape[1]],
                                                      t % cache.shape[1]]
        keys.append(np.concatenate([old, new[b]]) if new is not None else old)
    return keys


# ----------------------------------------------------------------------------------------
# properties: the NumPy suite's draws, on the GPU
# ----------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(case=decode_cases(), paged=st.booleans(),
       num_splits=st.sampled_from([None, 1, 2, 3, 7, 64]))
@example(case=DecodeCase("float32", (9, 0, 30), Lq=5, L_new=3, Hk=2, group=2, causal=True,
                         scale=30.0), paged=True, num_splits=3)
@example(case=DecodeCase("float16", (0, 0), Lq=2), paged=False, num_splits=2)
@example(case=DecodeCase("bfloat16", (40, 13), Lq=1, L_new=1, group=4, D=16, scale=30.0,
                         block_size=8), paged=True, num_splits=64)
@example(case=DecodeCase("float64", (33, 1, 0), Lq=3, L_new=1, Hk=2, group=4, D=5, Dv=11,
                         causal=True), paged=True, num_splits=None)
def test_decode_matches_the_reference(case, paged, num_splits):
    q, k_cache, v_cache, seqlens, k_new, v_new = case.inputs()
    new = dict(k_new=k_new, v_new=v_new) if case.L_new else {}
    k_before, v_before = k_cache.copy(), v_cache.copy()
    if paged:
        k_cache, v_cache, table = to_paged(case, np.random.default_rng(case.seed), k_cache,
                                           v_cache)
        new["block_table"] = table
    out, lse, k_after, v_after, np_k, np_v = decode_both(
        q, k_cache, v_cache, seqlens, causal=case.causal, scale=case.scale,
        num_splits=num_splits, **new)
    check_decode(case, out, lse, q, k_before, v_before, k_new, v_new)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    # the append, element by element, and every other element of the cache (the pool's
    # unused blocks included) untouched: exactly what the NumPy backend does
    np.testing.assert_array_equal(k_after, np_k)
    np.testing.assert_array_equal(v_after, np_v)


# ----------------------------------------------------------------------------------------
# long caches: tiles, pages, splits
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, page_size", [
    (dt, page) for dt in ("float16", "bfloat16", "float32", "float64") for page in (None, 16)
] + [(dt, page) for dt in ("float16", "bfloat16") for page in (1, 48, 256)])
def test_long_caches_with_every_split_count(dtype, page_size):
    """Lengths around tile and page boundaries, 0 to 2050 keys; splits from one to more
    than the tiles of the longest sequence (empty splits); grouped-query heads. One split
    and the chosen count meet the accuracy rule; every count agrees with one split, and
    appends what NumPy appends."""
    rng = np.random.default_rng(7)
    seqlens = np.array([2049, 0, 1, 17, 1000, 255], dtype=np.int32)
    B, Hk, group, D, L_new = len(seqlens), 2, 4, 128, 1
    capacity = int(seqlens.max()) + L_new + 3
    q = rng.standard_normal((B, 1, Hk * group, D)).astype(DTYPES[dtype])
    k_cache = (rng.standard_normal((B, capacity, Hk, D)) * 4).astype(DTYPES[dtype])
    v_cache = (rng.standard_normal((B, capacity, Hk, D)) * 100).astype(DTYPES[dtype])
    for b, s in enumerate(seqlens):
        v_cache[b, :s] /= 100                     # garbage beyond each sequence stays large
    k_new = rng.standard_normal((B, L_new, Hk, D)).astype(DTYPES[dtype])
    v_new = rng.standard_normal((B, L_new, Hk, D)).astype(DTYPES[dtype])
    keys = logical_keys(k_cache, seqlens, k_new)
    values = logical_keys(v_cache, seqlens, v_new)
    table = None
    if page_size is not None:
        case = DecodeCase(dtype, tuple(int(s) for s in seqlens), L_new=L_new, Hk=Hk, D=D, Dv=D,
                          spare=3, block_size=page_size)
        k_cache, v_cache, table = to_paged(case, rng, k_cache, v_cache)
    out1, lse1, k_after, v_after, np_k, np_v = decode_both(
        q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new, block_table=table,
        num_splits=1)
    check_sequences(out1, lse1, q, keys, values, Hk=Hk, causal=False, scale=None)
    np.testing.assert_array_equal(k_after, np_k)
    np.testing.assert_array_equal(v_after, np_v)
    tol = {"float16": 2e-3, "bfloat16": 2e-2, "float32": 1e-5, "float64": 1e-12}[dtype]
    for num_splits in (None, 2, 7, 64, 100000):
        cupy = _cupy()
        gk, gv = cupy.asarray(k_cache), cupy.asarray(v_cache)
        poison_pool()
        out, lse = cupyflash.attention_decode(
            *to_gpu(q), gk, gv, *to_gpu(seqlens), k_new=cupy.asarray(k_new),
            v_new=cupy.asarray(v_new), block_table=None if table is None else cupy.asarray(table),
            num_splits=num_splits, return_lse=True)
        out, lse = out.get(), lse.get()
        if num_splits is None:
            check_sequences(out, lse, q, keys, values, Hk=Hk, causal=False, scale=None)
        assert not np.isnan(out).any() and not np.isnan(lse).any()
        np.testing.assert_allclose(out.astype(np.float64), out1.astype(np.float64), rtol=tol,
                                   atol=tol, err_msg=f"num_splits={num_splits}")
        np.testing.assert_allclose(lse, lse1, rtol=tol, atol=tol)
        np.testing.assert_array_equal(gk.get(), k_after)
        np.testing.assert_array_equal(gv.get(), v_after)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("group, Lq, causal", [(1, 1, False), (3, 1, True), (8, 1, False),
                                               (8, 3, True), (2, 7, True), (6, 5, False)])
def test_grouped_heads_and_query_rows(dtype, group, Lq, causal):
    """G * Lq query rows per kv head: 1 (ROWS = 1), up to 4, up to 8, and more than one
    block's rows (row chunks that read the keys again); causal with Lq > n hides rows."""
    rng = np.random.default_rng(group * 10 + Lq)
    seqlens = np.array([300, 2, 0, 77], dtype=np.int32)
    B, Hk, D = len(seqlens), 2, 128
    q = rng.standard_normal((B, Lq, Hk * group, D)).astype(DTYPES[dtype])
    k_cache = rng.standard_normal((B, 310, Hk, D)).astype(DTYPES[dtype])
    v_cache = rng.standard_normal((B, 310, Hk, D)).astype(DTYPES[dtype])
    for num_splits in (1, 5, None):
        out, lse, *_ = decode_both(q, k_cache, v_cache, seqlens, causal=causal,
                                   num_splits=num_splits)
        check_sequences(out, lse, q, logical_keys(k_cache, seqlens, None),
                        logical_keys(v_cache, seqlens, None), Hk=Hk, causal=causal, scale=None)
        if causal:  # row i sees keys t <= i + n - Lq: none when n <= Lq - 1 - i
            for b, n in enumerate(seqlens):
                blind = max(0, Lq - int(n))
                assert (out[b, :blind] == 0).all() and np.isneginf(lse[b, :, :blind]).all()


# ----------------------------------------------------------------------------------------
# head dims, layouts, the element-by-element path
# ----------------------------------------------------------------------------------------

def test_every_head_dim():
    """D = 1..256 in float16 (Dv cycling through other values): the padded HEAD_DIM of
    each bucket, partial vectors, and (D not a multiple of 8) the element-by-element copy
    path; a few head dims in the other dtypes."""
    rng = np.random.default_rng(3)
    cases = [("float16", D) for D in range(1, 257)]
    cases += [(dt, D) for dt in ("bfloat16", "float32", "float64") for D in (1, 6, 59, 128, 200)]
    for dtype, D in cases:
        Dv = (D * 7) % 256 + 1
        seqlens = np.array([45, 3], dtype=np.int32)
        q = rng.standard_normal((2, 1, 2, D)).astype(DTYPES[dtype])
        k_cache = rng.standard_normal((2, 50, 1, D)).astype(DTYPES[dtype])
        v_cache = rng.standard_normal((2, 50, 1, Dv)).astype(DTYPES[dtype])
        k_new = rng.standard_normal((2, 1, 1, D)).astype(DTYPES[dtype])
        v_new = rng.standard_normal((2, 1, 1, Dv)).astype(DTYPES[dtype])
        out, lse, k_after, v_after, np_k, np_v = decode_both(
            q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new, causal=D % 2 == 0,
            num_splits=D % 3 + 1)
        check_sequences(out, lse, q, logical_keys(k_cache, seqlens, k_new),
                        logical_keys(v_cache, seqlens, v_new), Hk=1, causal=D % 2 == 0,
                        scale=None)
        np.testing.assert_array_equal(k_after, np_k)
        np.testing.assert_array_equal(v_after, np_v)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_strided_views_are_read_and_written_in_place(dtype):
    """q transposed; caches that are views: padded head dims (rows still 16-byte vectors),
    an odd element offset (rows not aligned: the element path), a reversed batch axis;
    k_new with a stride of 2 along its tokens. The append writes through the views into
    their base arrays, exactly where NumPy's would."""
    cupy = _cupy()
    rng = np.random.default_rng(11)
    B, Hk, D, L = 3, 2, 64, 70
    seqlens = np.array([60, 0, 33], dtype=np.int32)
    q_base = rng.standard_normal((B, 2 * Hk, 1, D)).astype(DTYPES[dtype])
    q = cupy.asarray(q_base).transpose(0, 2, 1, 3)[:, :, ::2]  # (B, 1, Hk, D), strided
    q_host = q.get()
    layouts = {
        "padded": lambda x: x[..., :D],
        "unaligned": lambda x: x[..., 1:D + 1],
        "reversed": lambda x: x[::-1, ..., :D],
    }
    for name, view in layouts.items():
        k_base = cupy.asarray(rng.standard_normal((B, L, Hk, D + 8)).astype(DTYPES[dtype]))
        v_base = cupy.asarray(rng.standard_normal((B, L, Hk, D + 8)).astype(DTYPES[dtype]))
        k_cache, v_cache = view(k_base), view(v_base)
        kn_base = cupy.asarray(rng.standard_normal((B, 4, Hk, D)).astype(DTYPES[dtype]))
        k_new, v_new = kn_base[:, ::2], kn_base[:, 1::2]      # (B, 2, Hk, D), strided
        keys = logical_keys(k_cache.get(), seqlens, k_new.get())
        values = logical_keys(v_cache.get(), seqlens, v_new.get())
        expected_k, expected_v = k_base.get(), v_base.get()    # NumPy appends through
        cupyflash.attention_decode(q_host, view(expected_k), view(expected_v), seqlens,
                                   k_new=k_new.get(), v_new=v_new.get())  # the same views
        poison_pool()
        out, lse = cupyflash.attention_decode(q, k_cache, v_cache, cupy.asarray(seqlens),
                                              k_new=k_new, v_new=v_new, return_lse=True,
                                              num_splits=3)
        check_sequences(out.get(), lse.get(), q_host, keys, values, Hk=Hk, causal=False,
                        scale=None)
        np.testing.assert_array_equal(k_base.get(), expected_k, err_msg=name)
        np.testing.assert_array_equal(v_base.get(), expected_v, err_msg=name)


# ----------------------------------------------------------------------------------------
# special values, reproducibility, streams
# ----------------------------------------------------------------------------------------

def test_empty_caches_give_zeros_and_neg_inf():
    """cache_seqlens of 0 everywhere (a cache of NaN that must not be read), with and
    without splits; an append of one key to empty caches with causal Lq = 3 hides two rows."""
    cupy = _cupy()
    q = cupy.ones((2, 3, 2, 4), np.float32)
    cache = cupy.full((2, 5, 1, 4), np.nan, np.float32)
    for num_splits in (None, 1, 3):
        poison_pool()
        out, lse = cupyflash.attention_decode(q, cache, cache, cupy.zeros(2, np.int32),
                                              num_splits=num_splits, return_lse=True)
        assert (out.get() == 0).all() and np.isneginf(lse.get()).all()
    k_cache, v_cache = cupy.full((2, 5, 1, 4), np.nan, np.float32), cupy.zeros((2, 5, 1, 4),
                                                                               np.float32)
    poison_pool()
    out, lse = cupyflash.attention_decode(q, k_cache, v_cache, cupy.zeros(2, np.int64),
                                          k_new=cupy.ones((2, 1, 1, 4), np.float32),
                                          v_new=cupy.ones((2, 1, 1, 4), np.float32),
                                          causal=True, return_lse=True)
    out, lse = out.get(), lse.get()
    assert (out[:, :2] == 0).all() and np.isneginf(lse[:, :, :2]).all()
    assert (out[:, 2] == 1).all() and not np.isnan(out).any()
    assert (k_cache.get()[:, 0] == 1).all() and np.isnan(k_cache.get()[:, 1:]).all()


def test_nan_beyond_the_lengths_is_never_read():
    """Cache positions past each sequence, and pool blocks no table entry names, are NaN;
    table padding is -1. Nothing of them may reach the result."""
    rng = np.random.default_rng(5)
    case = DecodeCase("bfloat16", (100, 31, 0), Lq=2, L_new=1, Hk=2, group=2, D=32, Dv=32,
                      causal=True, spare=20, block_size=16, seed=5)
    q, k_cache, v_cache, seqlens, k_new, v_new = case.inputs()
    for b, s in enumerate(seqlens):
        k_cache[b, s:] = np.nan
        v_cache[b, s:] = np.nan
    keys = logical_keys(k_cache, seqlens, k_new)
    values = logical_keys(v_cache, seqlens, v_new)
    k_pool, v_pool, table = to_paged(case, rng, k_cache, v_cache)
    k_pool[table.max() + 1:] = np.nan
    v_pool[table.max() + 1:] = np.nan
    for cache_k, cache_v, t in ((k_cache, v_cache, None), (k_pool, v_pool, table)):
        out, lse, *_ = decode_both(q, cache_k, cache_v, seqlens, k_new=k_new, v_new=v_new,
                                   block_table=t, causal=True, num_splits=4)
        check_sequences(out, lse, q, keys, values, Hk=2, causal=True, scale=None)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_repeated_runs_are_bitwise_equal_and_paged_equals_contiguous(dtype):
    cupy = _cupy()
    case = DecodeCase(dtype, (700, 5, 0, 129), Lq=1, L_new=0, Hk=2, group=4, D=128, Dv=128,
                      scale=30.0, block_size=16, seed=9)
    q, k_cache, v_cache, seqlens, _, _ = case.inputs()
    k_pool, v_pool, table = to_paged(case, np.random.default_rng(9), k_cache, v_cache)
    gq, gk, gv, gs, gkp, gvp, gt = to_gpu(q, k_cache, v_cache, seqlens, k_pool, v_pool, table)
    for num_splits in (1, 6, None):
        runs = []
        for paged in (False, True, False, True):
            poison_pool()
            args = (gq, gkp, gvp, gs) if paged else (gq, gk, gv, gs)
            out, lse = cupyflash.attention_decode(*args, block_table=gt if paged else None,
                                                  num_splits=num_splits, scale=30.0,
                                                  return_lse=True)
            runs.append((out.get().tobytes(), lse.get().tobytes()))
        assert all(r == runs[0] for r in runs[1:]), f"num_splits={num_splits}"
    with cupy.cuda.Stream(non_blocking=True) as stream:  # a stream of its own: same bits
        out, lse = cupyflash.attention_decode(gq, gk, gv, gs, scale=30.0, return_lse=True)
        stream.synchronize()
    assert (out.get().tobytes(), lse.get().tobytes()) == runs[0]


def test_zero_sizes_and_integer_dtypes():
    """Lq = 0 still appends; B = 0; Dv = 0 still gives lse; int64 and int16 lengths and
    tables are accepted."""
    cupy = _cupy()
    q = cupy.ones((2, 0, 2, 4), np.float32)
    k_cache, v_cache = cupy.zeros((2, 5, 1, 4), np.float32), cupy.zeros((2, 5, 1, 4), np.float32)
    out, lse = cupyflash.attention_decode(q, k_cache, v_cache, cupy.asarray([3, 0], np.int16),
                                          k_new=cupy.full((2, 1, 1, 4), 2, np.float32),
                                          v_new=cupy.full((2, 1, 1, 4), 2, np.float32),
                                          return_lse=True)
    assert out.shape == (2, 0, 2, 4) and lse.shape == (2, 2, 0)
    assert (k_cache.get()[0, 3] == 2).all() and (k_cache.get()[1, 0] == 2).all()
    out, lse = cupyflash.attention_decode(cupy.ones((0, 1, 2, 4), np.float32), k_cache[:0],
                                          v_cache[:0], cupy.zeros(0, np.int32), return_lse=True)
    assert out.shape == (0, 1, 2, 4) and lse.shape == (0, 2, 1)
    out, lse = cupyflash.attention_decode(cupy.ones((2, 1, 2, 4), np.float32), k_cache,
                                          cupy.zeros((2, 5, 1, 0), np.float32),
                                          cupy.asarray([3, 0], np.int64), return_lse=True)
    expected = cupyflash.attention_decode(np.ones((2, 1, 2, 4), np.float32), k_cache.get(),
                                          np.zeros((2, 5, 1, 0), np.float32),
                                          np.array([3, 0]), return_lse=True)
    assert out.shape == (2, 1, 2, 0)
    np.testing.assert_allclose(lse.get(), expected[1], rtol=1e-6)
    pool = cupy.zeros((4, 2, 1, 4), np.float32)
    table = cupy.asarray([[3, 1], [2, -1]], np.int64)
    out = cupyflash.attention_decode(cupy.ones((2, 1, 2, 4), np.float32), pool, pool,
                                     cupy.asarray([3, 1], np.int64), block_table=table,
                                     k_new=cupy.ones((2, 1, 1, 4), np.float32),
                                     v_new=cupy.ones((2, 1, 1, 4), np.float32))
    assert (pool.get()[1, 1] == 1).all() and (pool.get()[2, 1] == 1).all()
    assert np.isfinite(out.get()).all()


def test_gpu_only_limits_raise_value_error():
    cupy = _cupy()
    q = cupy.ones((1, 1, 1, 300), np.float32)
    cache = cupy.zeros((1, 4, 1, 300), np.float32)
    with pytest.raises(ValueError, match="^attention_decode: head dims up to 256 are "
                                         "supported on the GPU, got 300"):
        cupyflash.attention_decode(q, cache, cache, cupy.asarray([2], np.int32))


# ----------------------------------------------------------------------------------------
# the tensor-core kernel (fp16/bf16, several rows per kv head) and the fused merge
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("D, Dv", [(128, 128), (64, 64), (32, 32), (100, 75), (20, 64)])
def test_tensor_core_kernel(dtype, D, Dv):
    """flash_decode_mma: G * Lq from 2 to 33 rows (row chunks of 16 past 16; rows of one
    chunk padded), lengths around its tiles (BLOCK_N = 4 * 2048 / HEAD_DIM keys), paged
    and contiguous, causal, split counts from 1 to more than the tiles; fresh random
    inputs, against the float64 reference."""
    from cupyflash import _cupy_decode
    assert _cupy_decode.decode_config(D, Dv, dtype, 90, 2).name_expression.startswith(
        "cupyflash::flash_decode_mma")
    rng = np.random.default_rng(D * 1000 + Dv)
    seqlens = (0, 1, 63, 64, 65, 257, 1100)
    for group, Lq, causal, paged, num_splits in [(4, 1, False, False, None),
                                                 (2, 1, False, True, 7),
                                                 (16, 1, False, False, 3),
                                                 (8, 2, True, True, None),
                                                 (11, 3, True, False, 1),
                                                 (4, 1, False, True, 1000)]:
        case = DecodeCase(dtype, seqlens, Lq=Lq, L_new=1, Hk=2, group=group, D=D, Dv=Dv,
                          causal=causal, spare=5, block_size=16,
                          seed=int(rng.integers(2**16)))
        q, k_cache, v_cache, lens, k_new, v_new = case.inputs()
        k_before, v_before = k_cache.copy(), v_cache.copy()
        extra = {}
        if paged:
            k_cache, v_cache, table = to_paged(case, rng, k_cache, v_cache)
            extra["block_table"] = table
        out, lse, *_ = decode_both(q, k_cache, v_cache, lens, k_new=k_new, v_new=v_new,
                                   causal=causal, num_splits=num_splits, **extra)
        assert not np.isnan(out).any() and not np.isnan(lse).any()
        check_decode(case, out, lse, q, k_before, v_before, k_new, v_new)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tensor_core_kernel_with_one_row(dtype, monkeypatch):
    """MMA_ONE_ROW (what benchmarks/decode.py compares): one query row per kv head, 15
    zero rows of padding, on the tensor-core kernel."""
    from cupyflash import _cupy_decode
    monkeypatch.setattr(_cupy_decode, "MMA_ONE_ROW", True)
    assert _cupy_decode.decode_config(128, 128, dtype, 90, 1).rows == 16
    case = DecodeCase(dtype, (0, 5, 64, 2000), L_new=1, Hk=3, D=128, Dv=128, spare=4,
                      block_size=16, seed=3)
    q, k_cache, v_cache, lens, k_new, v_new = case.inputs()
    for num_splits in (None, 1, 5):
        out, lse, *_ = decode_both(q, k_cache, v_cache, lens, k_new=k_new, v_new=v_new,
                                   num_splits=num_splits)
        check_decode(case, out, lse, q, k_cache, v_cache, k_new, v_new)


def _sm90():
    cupy = _cupy()
    major, minor = cupy.cuda.Device().compute_capability
    return int(major) * 10 + int(minor) >= 90


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_cluster_kernel(dtype, D, monkeypatch):
    """flash_decode_cluster (one row per kv head at batch 1-2, sm_90): the accuracy rule
    with lengths that leave some of its 8 splits empty or with a partial tile, appended
    keys, a strided q; the call launched it (in clusters of 8), it agrees with flash_decode
    (CLUSTER_DECODE off), and two runs are bitwise equal."""
    if not _sm90():
        pytest.skip("thread-block clusters need sm_90")
    from cupyflash import _cupy_decode, _launch
    cupy = _cupy()
    launched = []
    real_launch = _launch.launch

    def spy(kernel, grid, block, params, shared_mem=0, **options):
        launched.append((grid, block, options.get("cluster")))
        return real_launch(kernel, grid, block, params, shared_mem, **options)
    monkeypatch.setattr(_launch, "launch", spy)
    tol = {"float16": 2e-3, "bfloat16": 2e-2}[dtype]
    for seqlens, L_new, Hk in [((0, 1), 0, 3), ((63, 64), 1, 2), ((65, 8191), 1, 4),
                               ((3000,), 0, 8), ((513, 20000), 3, 1)]:
        case = DecodeCase(dtype, seqlens, L_new=L_new, Hk=Hk, D=D, Dv=D, spare=5,
                          seed=sum(seqlens) + D)
        q, k_cache, v_cache, lens, k_new, v_new = case.inputs()
        gq = cupy.asarray(np.stack([q, -q], axis=-1))[..., 0]   # q, with a dim stride of 2
        assert _cupy_decode.uses_cluster(90, dtype, D, D, 1, len(seqlens) * Hk, False, True,
                                         None, _cupy_decode.num_sms(cupy.cuda.Device().id))
        launched.clear()
        out, lse, *_ = decode_both(gq, k_cache, v_cache, lens, k_new=k_new if L_new else None,
                                   v_new=v_new if L_new else None)
        assert ((len(seqlens) * Hk * 8,), (256,), 8) in launched, launched
        check_decode(case, out, lse, q, k_cache, v_cache, k_new, v_new)
        for i, n in enumerate(seqlens):
            if n + L_new == 0:   # no key: zeros and -inf, as every kernel
                assert not out[i].any() and np.isneginf(lse[i]).all()
        # the same inputs again (the append done: L_new = 0 now sees the same keys)
        lens_after = lens + L_new
        gk, gv, gl = to_gpu(*_caches_after(k_cache, v_cache, lens, k_new, v_new), lens_after)
        first = cupyflash.attention_decode(gq, gk, gv, gl, return_lse=True)
        second = cupyflash.attention_decode(gq, gk, gv, gl, return_lse=True)
        assert all(a.get().tobytes() == b.get().tobytes() for a, b in zip(first, second))
        monkeypatch.setattr(_cupy_decode, "CLUSTER_DECODE", False)
        plain = cupyflash.attention_decode(gq, gk, gv, gl, return_lse=True)
        monkeypatch.setattr(_cupy_decode, "CLUSTER_DECODE", True)
        np.testing.assert_allclose(first[0].get().astype(np.float64),
                                   plain[0].get().astype(np.float64), rtol=tol, atol=tol)
        np.testing.assert_allclose(first[1].get(), plain[1].get(), rtol=1e-5, atol=1e-5)


def _caches_after(k_cache, v_cache, lens, k_new, v_new):
    """The caches with k_new and v_new written at lens[b] .. (host arrays)."""
    k, v = k_cache.copy(), v_cache.copy()
    for b, s in enumerate(lens):
        k[b, s:s + k_new.shape[1]] = k_new[b]
        v[b, s:s + v_new.shape[1]] = v_new[b]
    return k, v


@pytest.mark.parametrize("dtype, group, Lq", [("float16", 1, 1), ("bfloat16", 4, 1),
                                              ("float16", 5, 4), ("float32", 1, 1),
                                              ("float32", 8, 1), ("float64", 4, 1)])
def test_fused_merge_matches_the_combine_kernel(dtype, group, Lq, monkeypatch):
    """The split kernel's own merge (the last block of each kv head) and the separate
    flash_decode_combine both meet the accuracy rule and agree; the split counters are
    all zero again after every call, on the default stream and on another."""
    from cupyflash import _cupy_backend, _cupy_decode
    cupy = _cupy()
    rng = np.random.default_rng(group * 10 + Lq)
    seqlens = np.array([3000, 0, 700, 64], dtype=np.int32)
    B, Hk, D = len(seqlens), 2, 128
    q = rng.standard_normal((B, Lq, Hk * group, D)).astype(DTYPES[dtype])
    k_cache = rng.standard_normal((B, 3001, Hk, D)).astype(DTYPES[dtype])
    v_cache = rng.standard_normal((B, 3001, Hk, D)).astype(DTYPES[dtype])
    keys = logical_keys(k_cache, seqlens, None)
    values = logical_keys(v_cache, seqlens, None)
    tol = {"float16": 2e-3, "bfloat16": 2e-2, "float32": 1e-5, "float64": 1e-12}[dtype]
    for num_splits in (None, 2, 9, 64):
        results = []
        for fuse in (True, False):
            monkeypatch.setattr(_cupy_decode, "FUSE_COMBINE", fuse)
            out, lse, *_ = decode_both(q, k_cache, v_cache, seqlens, num_splits=num_splits)
            check_sequences(out, lse, q, keys, values, Hk=Hk, causal=False, scale=None)
            results.append((out.astype(np.float64), lse))
        np.testing.assert_allclose(results[0][0], results[1][0], rtol=tol, atol=tol)
        np.testing.assert_allclose(results[0][1], results[1][1], rtol=tol, atol=tol)
    monkeypatch.setattr(_cupy_decode, "FUSE_COMBINE", True)
    gq, gk, gv, gs = to_gpu(q, k_cache, v_cache, seqlens)
    with cupy.cuda.Stream(non_blocking=True) as stream:
        other = cupyflash.attention_decode(gq, gk, gv, gs, num_splits=9)
        stream.synchronize()
    same = cupyflash.attention_decode(gq, gk, gv, gs, num_splits=9)
    cupy.cuda.Device().synchronize()
    assert other.get().tobytes() == same.get().tobytes()
    for buf in _cupy_backend._STREAM_COUNTERS.values():
        assert not buf.get().any(), "split counters left non-zero"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_one_row_kernel_holds_two_blocks_per_sm(dtype):
    """The one-row SIMT kernel (two passes, 16 KiB tiles in PRODUCER_STAGES slots, 4
    compute and PRODUCER_WARPS producer warps) fits two blocks per SM (the driver's
    occupancy calculator), so that the next call's blocks (PDL) are resident beside a
    call's last ones. (Registers were once what held the one-pass kernel below its six
    blocks: at 93, 5 blocks per SM, batch 4-64 with 8/8 heads ran 8-10% slower on an
    H100; now the launcher gives a block per SM at batch 16-64 and splits to about one
    per SM below.)"""
    from cupyflash import _cupy_decode
    cupy = _cupy()
    device_id = cupy.cuda.Device().id
    cc = _cupy_decode._compute_capability(device_id)
    arch = _cupy_decode._kernels.arch_for(cc)
    cfg = _cupy_decode.decode_config(128, 128, dtype, cc, 1)
    assert cfg.rows == 1
    smem_per_sm = cupy.cuda.runtime.deviceGetAttribute(
        cupy.cuda.runtime.cudaDevAttrMaxSharedMemoryPerMultiprocessor, device_id)
    by_smem = smem_per_sm // (cfg.smem_bytes + 1024)   # 1 KiB reserved per block
    resident = _cupy_decode.resident_blocks(device_id, cfg.name_expression, arch,
                                            cfg.smem_bytes, cfg.num_threads)
    assert resident >= min(2, by_smem), (cfg.name_expression, resident, by_smem)


# ----------------------------------------------------------------------------------------
# several units per block, and back-to-back launches (PDL)
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("units_per_block", [2, 3, 7])
def test_blocks_that_take_several_units(dtype, units_per_block, monkeypatch):
    """The one-row flash_decode with fewer blocks than units (each block takes units i,
    i + grid, ...: what units_per_block chooses at batch 64) meets the accuracy rule, with
    one split and with several (whose merges then happen inside the loop), and leaves the
    split counters at zero. With the warps of one unit a block (MANY_UNITS_WARPS = 4, the
    default) it gives the bits of one block per unit; with MANY_UNITS_WARPS = 8, fp16 and
    bf16 run on the 8-warp kernel, whose two launches give the same bits."""
    from cupyflash import _cupy_backend, _cupy_decode
    rng = np.random.default_rng(units_per_block)
    seqlens = np.array([700, 0, 129, 64, 1, 300, 2000], dtype=np.int32)
    B, Hk, D = len(seqlens), 3, 64
    assert _cupy_decode.decode_config(D, D, dtype, 90, 1).rows == 1  # the loop's kernel
    q = rng.standard_normal((B, 1, Hk, D)).astype(DTYPES[dtype])
    k_cache = rng.standard_normal((B, 2001, Hk, D)).astype(DTYPES[dtype])
    v_cache = rng.standard_normal((B, 2001, Hk, D)).astype(DTYPES[dtype])
    keys = logical_keys(k_cache, seqlens, None)
    values = logical_keys(v_cache, seqlens, None)
    for num_splits in (1, 3):
        results = {}
        for name, per_block, warps in (("one unit", None, 8), ("loop, 4 warps", units_per_block, 4),
                                       ("loop", units_per_block, 8), ("loop again", units_per_block, 8)):
            monkeypatch.setattr(_cupy_decode, "UNITS_PER_BLOCK", per_block)
            monkeypatch.setattr(_cupy_decode, "MANY_UNITS_WARPS", warps)
            out, lse, *_ = decode_both(q, k_cache, v_cache, seqlens, num_splits=num_splits)
            check_sequences(out, lse, q, keys, values, Hk=Hk, causal=False, scale=None)
            results[name] = (out.tobytes(), lse.tobytes())
        assert results["one unit"] == results["loop, 4 warps"]
        assert results["loop"] == results["loop again"]
        if dtype in ("float32", "float64"):   # (no 8-warp kernel: the same one)
            assert results["loop"] == results["one unit"]
    _cupy().cuda.Device().synchronize()
    for buf in _cupy_backend._STREAM_COUNTERS.values():
        assert not buf.get().any(), "split counters left non-zero"


@pytest.mark.parametrize("dtype, D", [("float16", 128), ("bfloat16", 128), ("bfloat16", 100),
                                      ("float32", 64), ("float32", 50), ("float64", 32)])
def test_producer_warps_change_who_copies_not_what_is_computed(dtype, D, monkeypatch):
    """The one-row kernel with producer warps (PRODUCER_WARPS, the default: they issue
    every copy, the compute warps only read) gives the bits of the same kernel without
    them (each compute warp copying its own tiles), since every lane still scores the same
    keys in the same order: contiguous and paged caches, rows of HEAD_DIM (the fast copy
    path) and narrower ones (the general path), one split and several, a block per unit
    and several units a block (the ring runs on across units). Both meet the accuracy rule
    and leave the split counters at zero."""
    from cupyflash import _cupy_backend, _cupy_decode
    assert _cupy_decode.PRODUCER_WARPS > 0
    case = DecodeCase(dtype, (700, 0, 129, 64, 1, 300, 2000), Lq=1, L_new=0, Hk=3, group=1,
                      D=D, Dv=D, block_size=16, seed=D)
    q, k_cache, v_cache, seqlens, _, _ = case.inputs()
    k_pool, v_pool, table = to_paged(case, np.random.default_rng(D), k_cache, v_cache)
    keys = logical_keys(k_cache, seqlens, None)
    values = logical_keys(v_cache, seqlens, None)
    monkeypatch.setattr(_cupy_decode, "MANY_UNITS_WARPS", 4)   # (the loop's 16-bit kernel too)
    for paged in (False, True):
        caches = (k_pool, v_pool) if paged else (k_cache, v_cache)
        for num_splits, per_block in ((1, None), (3, None), (1, 4), (3, 5)):
            monkeypatch.setattr(_cupy_decode, "UNITS_PER_BLOCK", per_block)
            results = []
            for producers in (_cupy_decode.PRODUCER_WARPS, 0):
                monkeypatch.setattr(_cupy_decode, "PRODUCER_WARPS", producers)
                out, lse, *_ = decode_both(q, *caches, seqlens, num_splits=num_splits,
                                           block_table=table if paged else None)
                check_sequences(out, lse, q, keys, values, Hk=case.Hk, causal=False,
                                scale=None)
                results.append((out.tobytes(), lse.tobytes()))
            assert results[0] == results[1], (paged, num_splits, per_block)
    _cupy().cuda.Device().synchronize()
    for buf in _cupy_backend._STREAM_COUNTERS.values():
        assert not buf.get().any(), "split counters left non-zero"


@pytest.mark.parametrize("pdl", ["1", "0"])
@pytest.mark.parametrize("dtype, group", [("bfloat16", 1), ("float16", 4), ("float32", 1)])
def test_back_to_back_steps_see_each_others_writes(dtype, group, pdl, monkeypatch):
    """Decoding steps queued with no synchronisation in between (the launch after
    validation, as a model's decode loop would queue them), each appending a token to the
    cache that its own split kernel then reads, and every other step with a CuPy kernel
    rewriting q in place first: every step meets the accuracy rule against its own keys,
    and the caches end as the NumPy backend's. Run with the kernels launched with
    programmatic dependent launch (CUPYFLASH_PDL=1, where the device has it) and
    without: a kernel that touched memory before the grid before it completed would
    read a stale q, or miss the appended key."""
    from cupyflash import _cupy_decode
    monkeypatch.setenv("CUPYFLASH_PDL", pdl)
    cupy = _cupy()
    rng = np.random.default_rng(int(pdl) * 5 + group)
    B, Hk, D, steps, max_len = 3, 2, 128, 6, 1024
    H = Hk * group
    seqlens = np.array([1000, 37, 512], dtype=np.int32)
    k_cache = rng.standard_normal((B, max_len, Hk, D)).astype(DTYPES[dtype])
    v_cache = rng.standard_normal((B, max_len, Hk, D)).astype(DTYPES[dtype])
    qs = rng.standard_normal((steps, B, 1, H, D)).astype(DTYPES[dtype])
    qs[1::2] = qs[0::2]                       # odd steps reuse the q of the step before
    news = rng.standard_normal((steps, 2, B, 1, Hk, D)).astype(DTYPES[dtype])
    gk, gv = cupy.asarray(k_cache), cupy.asarray(v_cache)
    g_qs, g_news = cupy.asarray(qs), cupy.asarray(news)
    g_lens = [cupy.asarray(seqlens + s) for s in range(steps)]
    gq = cupy.zeros((B, 1, H, D), dtype=qs.dtype)
    poison_pool()
    outs = []
    cupy.cuda.Device().synchronize()
    with cupy.cuda.Stream(non_blocking=True) as stream:
        for s in range(steps):
            if s % 2 == 0:
                gq[...] = g_qs[s]                 # q rewritten in place by a CuPy kernel
            outs.append(_cupy_decode.attention_decode(
                gq, gk, gv, g_lens[s], g_news[s, 0], g_news[s, 1], None, num_splits=2,
                causal=False, scale=D ** -0.5, max_keys=int(seqlens.max()) + s + 1))
        stream.synchronize()
    np_k, np_v = k_cache.copy(), v_cache.copy()
    for s in range(steps):
        lens = seqlens + s
        keys = [np.concatenate([np_k[b, :lens[b]], news[s, 0, b]]) for b in range(B)]
        values = [np.concatenate([np_v[b, :lens[b]], news[s, 1, b]]) for b in range(B)]
        check_sequences(outs[s][0].get(), outs[s][1].get(), qs[s], keys, values, Hk=Hk,
                        causal=False, scale=None)
        cupyflash.attention_decode(qs[s], np_k, np_v, lens, k_new=news[s, 0],
                                   v_new=news[s, 1])
    np.testing.assert_array_equal(gk.get(), np_k)
    np.testing.assert_array_equal(gv.get(), np_v)


@pytest.mark.parametrize("n0", [60, 4000])
@pytest.mark.parametrize("pdl", ["1", "0"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_back_to_back_cluster_steps_prefetch_the_appended_keys(dtype, pdl, n0, monkeypatch):
    """test_back_to_back_steps_see_each_others_writes for the cluster kernel at batch 1
    (sm_90), whose blocks prefetch their first keys to L2 before their PDL wait, while the
    append of the same call (which lets them start early) may still be writing. n0 = 60:
    the appended keys land in the prefetched tiles of split 0, then split 1; n0 = 4000: 8
    tiles a split, so each grid allows the next one late in its loop (ALLOW_LEFT), and the
    appends land in split 7's seventh tile. Every step sees them."""
    if not _sm90():
        pytest.skip("thread-block clusters need sm_90")
    from cupyflash import _cupy_decode, _launch
    monkeypatch.setenv("CUPYFLASH_PDL", pdl)
    cupy = _cupy()
    launched = []
    real_launch = _launch.launch

    def spy(kernel, grid, block, params, shared_mem=0, **options):
        launched.append(options.get("cluster"))
        return real_launch(kernel, grid, block, params, shared_mem, **options)
    monkeypatch.setattr(_launch, "launch", spy)
    rng = np.random.default_rng(11 + int(pdl) + n0)
    Hk, D, steps, max_len = 8, 128, 6, n0 + 196
    k_cache = rng.standard_normal((1, max_len, Hk, D)).astype(DTYPES[dtype])
    v_cache = rng.standard_normal((1, max_len, Hk, D)).astype(DTYPES[dtype])
    qs = rng.standard_normal((steps, 1, 1, Hk, D)).astype(DTYPES[dtype])
    news = rng.standard_normal((steps, 2, 1, 1, Hk, D)).astype(DTYPES[dtype])
    gk, gv = cupy.asarray(k_cache), cupy.asarray(v_cache)
    g_qs, g_news = cupy.asarray(qs), cupy.asarray(news)
    g_lens = [cupy.asarray(np.array([n0 + s], dtype=np.int32)) for s in range(steps)]
    poison_pool()
    outs = []
    cupy.cuda.Device().synchronize()
    with cupy.cuda.Stream(non_blocking=True) as stream:
        for s in range(steps):
            outs.append(_cupy_decode.attention_decode(
                g_qs[s], gk, gv, g_lens[s], g_news[s, 0], g_news[s, 1], None, num_splits=None,
                causal=False, scale=D ** -0.5, max_keys=n0 + s + 1, min_keys=n0 + s + 1))
        stream.synchronize()
    assert launched.count(_cupy_decode.CLUSTER_SIZE) == steps, launched
    np_k, np_v = k_cache.copy(), v_cache.copy()
    for s in range(steps):
        np_k[0, n0 + s], np_v[0, n0 + s] = news[s, 0, 0, 0], news[s, 1, 0, 0]
        n = n0 + s + 1
        check_sequences(outs[s][0].get(), outs[s][1].get(), qs[s], [np_k[0, :n]],
                        [np_v[0, :n]], Hk=Hk, causal=False, scale=None)
    np.testing.assert_array_equal(gk.get(), np_k)
    np.testing.assert_array_equal(gv.get(), np_v)


@pytest.mark.parametrize("dtype, B, group", [("bfloat16", 1, 1), ("float16", 16, 1),
                                             ("bfloat16", 3, 4), ("float32", 2, 1)])
def test_lengths_from_the_host_or_from_cache_seqlens(dtype, B, group):
    """With every sequence of one length the launcher passes it to the kernels
    (uniform_keys), which then neither load cache_seqlens nor (the cluster kernel) wait
    for it before prefetching; the bits are those of the kernels that load it."""
    from cupyflash import _cupy_decode
    cupy = _cupy()
    rng = np.random.default_rng(B * 10 + group)
    Hk, D, n = 8 // group if B == 1 else 2, 128, 1500
    q = cupy.asarray(rng.standard_normal((B, 1, Hk * group, D)).astype(DTYPES[dtype]))
    k = cupy.asarray(rng.standard_normal((B, 1600, Hk, D)).astype(DTYPES[dtype]))
    v = cupy.asarray(rng.standard_normal((B, 1600, Hk, D)).astype(DTYPES[dtype]))
    lens = cupy.full((B,), n, dtype=cupy.int32)
    results = []
    for min_keys in (n, None):
        out, lse = _cupy_decode.attention_decode(q, k, v, lens, None, None, None,
                                                 num_splits=None, causal=False,
                                                 scale=D ** -0.5, max_keys=n, min_keys=min_keys)
        results.append((out.get().tobytes(), lse.get().tobytes()))
    assert results[0] == results[1]
    keys = [k[b, :n].get() for b in range(B)]
    values = [v[b, :n].get() for b in range(B)]
    check_sequences(cupy.asnumpy(out), cupy.asnumpy(lse), q.get(), keys, values, Hk=Hk,
                    causal=False, scale=None)


@pytest.mark.parametrize("fuse", [True, False])
def test_split_scratch_shared_by_queued_calls(fuse, monkeypatch):
    """The split partials live in one scratch buffer per stream (stream_workspace), which
    a larger call replaces: calls of different sizes and split counts queued on one stream
    with no synchronisation (the merge in the split kernel or in flash_decode_combine)
    give the bits each gives alone."""
    from cupyflash import _cupy_decode
    monkeypatch.setattr(_cupy_decode, "FUSE_COMBINE", fuse)
    cupy = _cupy()
    rng = np.random.default_rng(7 + fuse)
    problems = []
    for B, Hk, G, L, splits in ((2, 2, 1, 700, 3), (5, 4, 4, 3000, 9), (1, 2, 2, 300, 2),
                                (5, 4, 4, 3000, 16)):
        q = cupy.asarray(rng.standard_normal((B, 1, Hk * G, 128)).astype(np.float16))
        k = cupy.asarray(rng.standard_normal((B, L, Hk, 128)).astype(np.float16))
        v = cupy.asarray(rng.standard_normal((B, L, Hk, 128)).astype(np.float16))
        lens = np.full((B,), L, dtype=np.int32)
        problems.append((q, k, v, lens, splits))
    alone = []
    for q, k, v, lens, splits in problems:
        out, lse = cupyflash.attention_decode(q, k, v, lens, num_splits=splits,
                                              return_lse=True)
        cupy.cuda.Device().synchronize()
        alone.append((out.get(), lse.get()))
    poison_pool()
    with cupy.cuda.Stream(non_blocking=True) as stream:
        queued = [cupyflash.attention_decode(q, k, v, lens, num_splits=splits,
                                             return_lse=True)
                  for q, k, v, lens, splits in problems * 2]
        stream.synchronize()
    for (out, lse), (out_a, lse_a) in zip(queued, alone * 2):
        assert out.get().tobytes() == out_a.tobytes()
        assert lse.get().tobytes() == lse_a.tobytes()


@pytest.mark.parametrize("dtype, paged", [("bfloat16", False), ("float32", True),
                                          ("float16", True)])
def test_host_lengths_and_table_give_the_device_results(dtype, paged):
    """CuPy q and caches with cache_seqlens and block_table on the host (NumPy arrays of
    any integer dtype, lists): the out, lse and appended caches of the same call with
    them on the device, bit for bit; NumPy data still refuses CuPy lengths."""
    cupy = _cupy()
    case = DecodeCase(dtype, (0, 5, 64, 300), L_new=1, Hk=2, group=2, D=64, Dv=64, spare=3,
                      block_size=16, seed=17)
    q, k_cache, v_cache, lens, k_new, v_new = case.inputs()
    table = None
    if paged:
        k_cache, v_cache, table = to_paged(case, np.random.default_rng(case.seed), k_cache,
                                           v_cache)
    results = []
    for form in ("device", "int32", "int64", "list"):
        convert = {"device": cupy.asarray, "int32": lambda x: x.astype(np.int32),
                   "int64": lambda x: x.astype(np.int64), "list": lambda x: x.tolist()}[form]
        gk, gv = cupy.asarray(k_cache), cupy.asarray(v_cache)
        extra = {} if table is None else {"block_table": convert(table)}
        poison_pool()
        out, lse = cupyflash.attention_decode(cupy.asarray(q), gk, gv, convert(lens),
                                              k_new=cupy.asarray(k_new),
                                              v_new=cupy.asarray(v_new), return_lse=True,
                                              **extra)
        results.append([x.get().tobytes() for x in (out, lse, gk, gv)])
    assert all(r == results[0] for r in results[1:])
    with pytest.raises(TypeError, match="arrays must be all NumPy or all CuPy arrays"):
        cupyflash.attention_decode(q, k_cache, v_cache, cupy.asarray(lens))
