"""GPU-specific checks of the attention kernels (CuPy arrays), beyond the shared
property tests of test_attention.py: tile boundaries, every head dim, strided and
broadcast layouts, streams, 64-bit offsets and bitwise reproducibility.

Every output is poisoned with NaN before the call, inputs are fresh random draws, and
results are judged by the accuracy rule of accuracy.py against the float64 reference.
"""

import numpy as np
import pytest

import cupyflash
from accuracy import DTYPES, check_attention
from backends import requires_gpu

pytestmark = requires_gpu



def _cupy():
    import cupy
    return cupy


def _draw(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(DTYPES[dtype])


def _run(q, k, v, *, causal, scale=None, out_layout=None):
    """cupyflash on the GPU with a NaN-poisoned out; returns NumPy (out, lse)."""
    cupy = _cupy()
    gq, gk, gv = (cupy.asarray(x) for x in (q, k, v))
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    out = cupy.full(batch + (q.shape[-2], v.shape[-1]), np.nan, dtype=q.dtype)
    res, lse = cupyflash.attention(gq, gk, gv, causal=causal, scale=scale, return_lse=True, out=out)
    assert res is out
    return out.get(), lse.get()


def _check(q, k, v, *, causal, scale=None):
    out, lse = _run(q, k, v, causal=causal, scale=scale)
    check_attention(out, lse, q, k, v, causal=causal, scale=scale)


# Lengths on both sides of every tile size the kernels use (16, 32, 64, 128).
BOUNDARY_LENGTHS = (1, 15, 16, 17, 31, 33, 63, 64, 65, 127, 128, 129, 255, 257)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_lengths_around_tile_boundaries(dtype, causal, d):
    rng = np.random.default_rng()
    for i, lq in enumerate(BOUNDARY_LENGTHS):
        lk = BOUNDARY_LENGTHS[(i * 5 + 3) % len(BOUNDARY_LENGTHS)]  # Lq != Lk, both ways
        for a, b in ((lq, lk), (lq, lq)):
            q, k, v = (_draw(rng, (2, L, d), dtype) for L in (a, b, b))
            _check(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_every_head_dim(dtype):
    """D = 1..256, each once; Dv cycles through other values; causal alternates."""
    rng = np.random.default_rng()
    for D in range(1, 257):
        Dv = (D * 7) % 256 + 1
        causal = D % 2 == 0
        q = _draw(rng, (1, 2, 37, D), dtype)
        k = _draw(rng, (1, 2, 45, D), dtype)
        v = _draw(rng, (1, 2, 45, Dv), dtype)
        _check(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_grouped_query_attention_reads_kv_in_place(dtype):
    """k, v broadcast over the group axis (stride 0): no copy, right answer."""
    cupy = _cupy()
    rng = np.random.default_rng()
    q = _draw(rng, (2, 2, 4, 100, 64), dtype)   # (B, Hkv, G, L, D)
    k = _draw(rng, (2, 2, 1, 130, 64), dtype)
    v = _draw(rng, (2, 2, 1, 130, 64), dtype)
    _check(q, k, v, causal=True)
    # An explicit stride-0 view of k and v gives the same bits, and the pool grows by no
    # more than the outputs: k and v were not copied.
    gq, gk, gv = (cupy.asarray(x) for x in (q, k, v))
    gk0 = cupy.broadcast_to(gk, (2, 2, 4, 130, 64))
    gv0 = cupy.broadcast_to(gv, (2, 2, 4, 130, 64))
    a = cupyflash.attention(gq, gk, gv)
    pool = cupy.get_default_memory_pool()
    before = pool.used_bytes()
    b = cupyflash.attention(gq, gk0, gv0)
    grown = pool.used_bytes() - before
    assert grown <= b.nbytes + 4 * 2 * 2 * 4 * 100 + 4096  # out + lse (+ rounding)
    assert bool((a == b).all())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_transposed_bshd_views(dtype):
    """(B, L, H, D) arrays viewed as (B, H, L, D): strided, last dim contiguous."""
    cupy = _cupy()
    rng = np.random.default_rng()
    q = _draw(rng, (2, 77, 3, 64), dtype)
    k = _draw(rng, (2, 91, 3, 64), dtype)
    v = _draw(rng, (2, 91, 3, 64), dtype)
    qt, kt, vt = (np.swapaxes(x, 1, 2) for x in (q, k, v))
    gq, gk, gv = (cupy.swapaxes(cupy.asarray(x), 1, 2) for x in (q, k, v))
    assert not gq.flags.c_contiguous
    out, lse = cupyflash.attention(gq, gk, gv, causal=True, return_lse=True)
    check_attention(out.get(), lse.get(), qt, kt, vt, causal=True, scale=None)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_misaligned_and_noncontiguous_last_dim_are_copied_correctly(dtype):
    cupy = _cupy()
    rng = np.random.default_rng()
    big = _draw(rng, (3, 2, 50, 70), dtype)
    g = cupy.asarray(big)
    gq = g[0, :, :, 3:67]          # a pointer 6 bytes past alignment
    gk = g[1, :, :, 1:65]
    gv = cupy.asarray(_draw(rng, (2, 64, 50), dtype)).swapaxes(-1, -2)  # last dim strided
    out, lse = cupyflash.attention(gq, gk, gv, return_lse=True)
    check_attention(out.get(), lse.get(), gq.get(), gk.get(), gv.get(), causal=False, scale=None)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("lq, lk", [(300, 40), (40, 300), (129, 1), (1, 129)])
def test_causal_with_unequal_lengths(dtype, lq, lk):
    rng = np.random.default_rng()
    q, k, v = (_draw(rng, (2, L, 96), dtype) for L in (lq, lk, lk))
    _check(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("logit", [1e-4, 1e4])
def test_tiny_and_huge_logits(dtype, logit):
    rng = np.random.default_rng()
    d = 64
    q, k, v = (_draw(rng, (2, 150, d), dtype) for _ in range(3))
    _check(q, k, v, causal=False, scale=logit / d ** 0.5)
    _check(q, k, v, causal=True, scale=-logit / d ** 0.5)  # a negative scale too


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_minus_inf_scores_and_fully_masked_rows(dtype):
    """q[..., 0] = 1 and k[j, 0] = -inf give score(i, j) = -inf for every query."""
    rng = np.random.default_rng()
    q = _draw(rng, (2, 70, 64), dtype)
    k = _draw(rng, (2, 150, 64), dtype)
    v = _draw(rng, (2, 150, 32), dtype)
    q[..., 0] = 1
    k[0, ::3, 0] = -np.inf          # batch 0: a third of the keys hidden
    k[1, :, 0] = -np.inf            # batch 1: every key hidden -> zeros, lse = -inf
    for causal in (False, True):
        out, lse = _run(q, k, v, causal=causal)
        assert not np.isnan(out.astype(np.float64)).any()
        assert (out[1].astype(np.float64) == 0).all() and np.isneginf(lse[1]).all()
        check_attention(out, lse, q, k, v, causal=causal, scale=None)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_runs_on_the_current_non_default_stream(dtype):
    cupy = _cupy()
    rng = np.random.default_rng()
    q, k, v = (_draw(rng, (4, 256, 64), dtype) for _ in range(3))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        gq, gk, gv = (cupy.asarray(x) for x in (q, k, v))
        out, lse = cupyflash.attention(gq, gk, gv, causal=True, return_lse=True)
        got = out.get(stream=stream), lse.get(stream=stream)
    stream.synchronize()
    check_attention(got[0], got[1], q, k, v, causal=True, scale=None)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("causal", [False, True])
def test_same_inputs_give_bitwise_equal_outputs(dtype, causal):
    cupy = _cupy()
    rng = np.random.default_rng()
    q, k, v = (cupy.asarray(_draw(rng, (2, 3, 333, 128), dtype)) for _ in range(3))
    a, la = cupyflash.attention(q, k, v, causal=causal, return_lse=True)
    b, lb = cupyflash.attention(q, k, v, causal=causal, return_lse=True)
    assert bool((a.view(np.uint8) == b.view(np.uint8)).all())
    assert bool((la.view(np.uint8) == lb.view(np.uint8)).all())


def test_more_than_2_to_the_31_elements():
    """q, k, v, out of 2^31 + 2^21 fp16 elements each: batch offsets need 64 bits."""
    cupy = _cupy()
    free, _ = cupy.cuda.runtime.memGetInfo()
    B, L, D = 16400, 1024, 128                      # 16400 * 1024 * 128 > 2^31
    if free < 6 * B * L * D * 2:
        pytest.skip(f"needs {6 * B * L * D * 2 / 2**30:.0f} GiB of free GPU memory")
    assert B * L * D > 2 ** 31
    rng = np.random.default_rng()
    q, k, v = (cupy.empty((B, L, D), dtype=np.float16) for _ in range(3))
    for x in (q, k, v):
        x[...] = cupy.asarray(rng.standard_normal((1, L, D)).astype(np.float16))  # then vary:
        x *= cupy.linspace(0.5, 1.5, B, dtype=np.float16)[:, None, None]
    out, lse = cupyflash.attention(q, k, v, causal=True, return_lse=True)
    for b in (0, B // 2, B - 1):                      # the last rows sit past 2^31 elements
        check_attention(out[b].get(), lse[b].get(), q[b].get(), k[b].get(), v[b].get(),
                        causal=True, scale=None)
