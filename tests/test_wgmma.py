"""The Hopper forward kernel (cuda/flash_fwd_wgmma.cuh), selected with
``CUPYFLASH_FWD_KERNEL=wgmma``, on a GPU of compute capability 9.0.

Every test records which kernel sources were launched and checks that the wgmma kernel
ran (or, where the layout cannot be described by tensor maps, that the mma.sync kernel
took over). Outputs are poisoned with NaN before the call and judged by the accuracy rule
of accuracy.py against the float64 reference. The dispatch tests at the end need no GPU.

    CUPYFLASH_FWD_KERNEL=wgmma python -m pytest -m gpu tests/test_wgmma.py
    CUPYFLASH_FWD_KERNEL=wgmma python -m pytest -m gpu tests/test_cupy_attention.py

(The second runs the whole GPU attention suite on the Hopper kernel.)
"""

import ctypes

import numpy as np
import pytest

import cupyflash
from accuracy import DTYPES, check_attention
from backends import HAS_GPU, requires_gpu
from cupyflash import _cupy_backend, _cupy_backward, _kernels, _tensor_map


def _cupy():
    import cupy
    return cupy


def _is_hopper():
    return HAS_GPU and _cupy().cuda.Device().compute_capability == "90"


def on_hopper(test):
    """Mark a test gpu, and skip it without a GPU of compute capability 9.0."""
    for mark in (*requires_gpu, pytest.mark.skipif(
            HAS_GPU and not _is_hopper(), reason="the wgmma kernel needs compute capability 9.0")):
        test = mark(test)
    return test


@pytest.fixture
def launched(monkeypatch):
    """Select the wgmma kernel and record the source file of every kernel launched."""
    monkeypatch.setenv("CUPYFLASH_FWD_KERNEL", "wgmma")
    sources = []
    get_function = _kernels.get_function

    def recording(device_id, source, name_expression, arch, dynamic_smem_bytes=0):
        sources.append(source)
        return get_function(device_id, source, name_expression, arch, dynamic_smem_bytes)

    monkeypatch.setattr(_kernels, "get_function", recording)
    return sources


def _record_names(monkeypatch):
    """The name expressions of the kernels launched from now on, in order (on top of the
    ``launched`` fixture's record of their sources)."""
    names = []
    get_function = _kernels.get_function

    def recording(device_id, source, name_expression, *args):
        names.append(name_expression)
        return get_function(device_id, source, name_expression, *args)

    monkeypatch.setattr(_kernels, "get_function", recording)
    return names


def _draw(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(DTYPES[dtype])


def _run(q, k, v, *, causal, scale=None, views=None):
    """cupyflash on the GPU with a NaN-poisoned out; returns NumPy (out, lse).
    ``views``: a function applied to the CuPy q, k, v before the call (strided views)."""
    cupy = _cupy()
    gq, gk, gv = (cupy.asarray(x) for x in (q, k, v))
    if views is not None:
        gq, gk, gv = views(gq, gk, gv)
    batch = np.broadcast_shapes(gq.shape[:-2], gk.shape[:-2], gv.shape[:-2])
    out = cupy.full(batch + (gq.shape[-2], gv.shape[-1]), np.nan, dtype=q.dtype)
    res, lse = cupyflash.attention(gq, gk, gv, causal=causal, scale=scale, return_lse=True,
                                   out=out)
    assert res is out
    return out.get(), lse.get()


def _check(q, k, v, *, causal, scale=None):
    out, lse = _run(q, k, v, causal=causal, scale=scale)
    check_attention(out, lse, q, k, v, causal=causal, scale=scale)


WGMMA = "flash_fwd_wgmma.cuh"

# Both sides of every tile the Hopper kernel uses: BLOCK_N 64 and 128, BLOCK_M 128 and
# 192, and the 2-stage ring wrapping around (257+ keys: 3+ blocks of 128).
BOUNDARY_LENGTHS = (1, 17, 63, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 257, 385, 513)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128, 256])
@on_hopper
def test_lengths_around_tile_boundaries(launched, dtype, causal, d):
    rng = np.random.default_rng()
    for i, lq in enumerate(BOUNDARY_LENGTHS):
        lk = BOUNDARY_LENGTHS[(i * 5 + 3) % len(BOUNDARY_LENGTHS)]  # Lq != Lk, both ways
        for a, b in ((lq, lk), (lq, lq)):
            q, k, v = (_draw(rng, (1, L, d), dtype) for L in (a, b, b))
            _check(q, k, v, causal=causal)
    assert set(launched) == {WGMMA}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@on_hopper
def test_every_head_dim(launched, dtype):
    """D = 1..256 (zero-filled by the tensor maps up to 64, 128 or 256), Dv cycling,
    causal alternating."""
    rng = np.random.default_rng()
    for D in range(1, 257):
        Dv = (D * 7) % 256 + 1
        causal = D % 2 == 0
        q = _draw(rng, (1, 2, 37, D), dtype)
        k = _draw(rng, (1, 2, 145, D), dtype)
        v = _draw(rng, (1, 2, 145, Dv), dtype)
        _check(q, k, v, causal=causal)
    assert set(launched) == {WGMMA}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d, dv", [(64, 128), (128, 64), (256, 32), (96, 96), (192, 200)])
@on_hopper
def test_value_head_dim_differs(launched, dtype, d, dv):
    rng = np.random.default_rng()
    q = _draw(rng, (3, 300, d), dtype)
    k = _draw(rng, (3, 450, d), dtype)
    v = _draw(rng, (3, 450, dv), dtype)
    for causal in (False, True):
        _check(q, k, v, causal=causal)
    assert set(launched) == {WGMMA}


@pytest.mark.parametrize("d", [64, 128, 256])
@on_hopper
def test_long_sequences_many_ring_passes(launched, d):
    """2048 keys: 16 or 32 key blocks through a 2-stage ring, so every mbarrier goes
    through many phases; one short and one long query block."""
    rng = np.random.default_rng()
    for lq in (200, 2048):
        q = _draw(rng, (1, 1, lq, d), "float16")
        k, v = (_draw(rng, (1, 1, 2048, d), "float16") for _ in range(2))
        for causal in (False, True):
            _check(q, k, v, causal=causal)
    assert set(launched) == {WGMMA}


@pytest.mark.parametrize("persistent", ["1", "0"])
@pytest.mark.parametrize("d", [64, 128, 256])
@on_hopper
def test_persistent_blocks_take_many_tiles(launched, monkeypatch, d, persistent):
    """Several times more tiles than SMs, so that every block of the persistent kernel
    takes tiles one after another: of different lengths (causal), some with no key at all
    (causal with Lq > Lk: the first query rows see none), and calls back to back on one
    stream, each of which must find the tile counter at zero again (a tile not computed
    leaves its NaN poison in out). The same problems with one block per tile too."""
    monkeypatch.setenv("CUPYFLASH_FWD_PERSISTENT", persistent)
    rng = np.random.default_rng()
    for lq, lk, causal in ((1000, 1000, False), (1000, 1000, True), (1500, 300, True),
                           (300, 1700, True), (517, 517, False)):
        q = _draw(rng, (2, 24, lq, d), "bfloat16")  # 288 (d = 64) or 384 tiles at 1000
        k, v = (_draw(rng, (2, 24, lk, d), "bfloat16") for _ in range(2))
        _check(q, k, v, causal=causal)
    assert set(launched) == {WGMMA}
    for buf in _cupy_backend._STREAM_COUNTERS.values():
        assert not buf.get().any(), "a tile counter was left non-zero"


@pytest.mark.parametrize("persistent", ["1", "0"])
@pytest.mark.parametrize("d", [64, 128, 256])
@on_hopper
def test_sliding_windows_run_the_local_kernel(launched, monkeypatch, d, persistent):
    """A window alone runs flash_fwd_wgmma_local: bands of every kind (empty rows, one key,
    bounded on one side, wider than the keys, Lq != Lk so that the band is offset by
    Lk - Lq) against the float64 reference, over many tiles per block and back-to-back calls
    (the tile counter must come back to zero); then, bitwise, a band that covers every key
    is the plain kernel's result and (None, 0) is the causal kernel's: the same key blocks
    in the same order, and masking that only writes -inf where the others do."""
    cupy = _cupy()
    monkeypatch.setenv("CUPYFLASH_FWD_PERSISTENT", persistent)
    names = _record_names(monkeypatch)
    rng = np.random.default_rng()
    for lq, lk, window, causal in ((700, 900, (0, 0), False), (900, 700, (1, 0), False),
                                   (700, 900, (100, 37), False), (700, 900, (None, 130), True),
                                   (1000, 1000, (300, None), False), (300, 1700, (5, 700), True),
                                   (1700, 300, (2000, 2000), False), (640, 640, (127, 129), False)):
        q = _draw(rng, (2, 12, lq, d), "bfloat16")
        k, v = (_draw(rng, (2, 12, lk, d), "bfloat16") for _ in range(2))
        out = cupy.full(q.shape[:-1] + (d,), np.nan, dtype=q.dtype)
        _, lse = cupyflash.attention(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v),
                                     window=window, causal=causal, return_lse=True, out=out)
        check_attention(out.get(), lse.get(), q, k, v, causal=causal, scale=None,
                        window=window)
        assert "flash_fwd_wgmma_local<" in names[-1], names[-1]
    assert not any(buf.get().any() for buf in _cupy_backend._STREAM_COUNTERS.values())

    q, k, v = (cupy.asarray(_draw(rng, (2, 12, n, d), "float16")) for n in (900, 1000, 1000))

    def bits(**options):
        out, lse = cupyflash.attention(q, k, v, return_lse=True, **options)
        return out.get().tobytes() + lse.get().tobytes()

    assert bits(window=(5000, 5000)) == bits()
    assert "flash_fwd_wgmma_local<" in names[-2] and "flash_fwd_wgmma<" in names[-1]
    assert bits(window=(None, 0)) == bits(causal=True)
    assert bits(window=(None, 7), causal=True) == bits(causal=True)


@pytest.mark.parametrize("persistent", ["1", "0"])
@pytest.mark.parametrize("d", [64, 128, 256])
@on_hopper
def test_padding_masks_run_the_local_kernel(launched, monkeypatch, d, persistent):
    """A (B, 1, 1, Lk) mask, alone, with causal and with a window: flash_fwd_wgmma_local
    computes the batch elements whose mask keeps a prefix of the keys (none, one, around
    the key-block edges, all), and flash_fwd_wgmma_variants, launched after it, those with
    holes (in the middle, at the start); together they match the float64 reference in
    every element (out starts as NaN)."""
    cupy = _cupy()
    monkeypatch.setenv("CUPYFLASH_FWD_PERSISTENT", persistent)
    names = _record_names(monkeypatch)
    rng = np.random.default_rng()
    Lq, Lk = 300, 700
    ends = np.array([0, 1, 127, 128, 129, 700, 500, 650])
    mask = np.arange(Lk) < ends[:, None, None, None]  # (B, 1, 1, Lk)
    mask[6, ..., 100:140] = False
    mask[7, ..., 0] = False
    for causal, window in ((False, None), (True, None), (False, (200, 50))):
        q = _draw(rng, (len(ends), 2, Lq, d), "bfloat16")
        k, v = (_draw(rng, (len(ends), 2, Lk, d), "bfloat16") for _ in range(2))
        out = cupy.full(q.shape[:-1] + (d,), np.nan, dtype=q.dtype)
        _, lse = cupyflash.attention(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v),
                                     mask=cupy.asarray(mask), window=window, causal=causal,
                                     return_lse=True, out=out)
        check_attention(out.get(), lse.get(), q, k, v, causal=causal, scale=None, mask=mask,
                        window=window)
        assert "flash_fwd_wgmma_local<" in names[-2], names[-2:]
        assert "flash_fwd_wgmma_variants<" in names[-1], names[-2:]
    assert not any(buf.get().any() for buf in _cupy_backend._STREAM_COUNTERS.values())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@on_hopper
def test_grouped_query_attention_reads_kv_in_place(launched, dtype):
    """k, v broadcast over the group axis (stride 0): one slice per KV head, no copy, and
    the same bits as explicit stride-0 views."""
    cupy = _cupy()
    rng = np.random.default_rng()
    q = _draw(rng, (2, 2, 4, 300, 128), dtype)   # (B, Hkv, G, L, D)
    k = _draw(rng, (2, 2, 1, 330, 128), dtype)
    v = _draw(rng, (2, 2, 1, 330, 128), dtype)
    _check(q, k, v, causal=True)
    gq, gk, gv = (cupy.asarray(x) for x in (q, k, v))
    a = cupyflash.attention(gq, gk, gv, causal=True)
    pool = cupy.get_default_memory_pool()
    before = pool.used_bytes()
    b = cupyflash.attention(gq, cupy.broadcast_to(gk, (2, 2, 4, 330, 128)),
                            cupy.broadcast_to(gv, (2, 2, 4, 330, 128)), causal=True)
    assert pool.used_bytes() - before <= b.nbytes + 4 * 2 * 2 * 4 * 300 + 4096
    assert bool((a == b).all())
    assert set(launched) == {WGMMA}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@on_hopper
def test_transposed_bshd_views(launched, dtype):
    """(B, L, H, D) arrays viewed as (B, H, L, D): row stride H * D, head stride D (smaller
    than the row stride), read in place through the tensor maps."""
    rng = np.random.default_rng()
    q = _draw(rng, (2, 277, 3, 128), dtype)
    k = _draw(rng, (2, 391, 3, 128), dtype)
    v = _draw(rng, (2, 391, 3, 128), dtype)
    qt, kt, vt = (np.swapaxes(x, 1, 2) for x in (q, k, v))
    for causal in (False, True):
        out, lse = _run(q, k, v, causal=causal,
                        views=lambda *xs: tuple(x.swapaxes(1, 2) for x in xs))
        check_attention(out, lse, qt, kt, vt, causal=causal, scale=None)
    assert set(launched) == {WGMMA}


@on_hopper
def test_layouts_tensor_maps_cannot_describe_fall_back_to_mma(launched):
    """Reversed batch strides, and batch strides that are not multiples of the smallest
    one, cannot be slices of a tensor map: the mma.sync kernel runs, with the right answer."""
    rng = np.random.default_rng()
    q, k, v = (_draw(rng, (3, 100, 64), "float16") for _ in range(3))
    out, lse = _run(q, k, v, causal=False, views=lambda *xs: tuple(x[::-1] for x in xs))
    check_attention(out, lse, q[::-1], k[::-1], v[::-1], causal=False, scale=None)
    assert launched == ["flash_fwd_mma.cuh"]
    launched.clear()
    big = _draw(rng, (5, 7, 64, 64), "float16")  # [:, ::3]: batch strides 7*64*64, 3*64*64
    out, lse = _run(big, big, big, causal=True, views=lambda *xs: tuple(x[:, ::3] for x in xs))
    check_attention(out, lse, big[:, ::3], big[:, ::3], big[:, ::3], causal=True, scale=None)
    assert launched == ["flash_fwd_mma.cuh"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("lq, lk", [(300, 40), (40, 300), (129, 1), (1, 129), (1000, 700)])
@on_hopper
def test_causal_with_unequal_lengths(launched, dtype, lq, lk):
    rng = np.random.default_rng()
    for d in (64, 128, 256):
        q, k, v = (_draw(rng, (2, L, d), dtype) for L in (lq, lk, lk))
        _check(q, k, v, causal=True)
    assert set(launched) == {WGMMA}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("logit", [1e-4, 1e4])
@on_hopper
def test_tiny_and_huge_logits(launched, dtype, logit):
    rng = np.random.default_rng()
    for d in (64, 128):
        q, k, v = (_draw(rng, (2, 350, d), dtype) for _ in range(3))
        _check(q, k, v, causal=False, scale=logit / d ** 0.5)
        _check(q, k, v, causal=True, scale=-logit / d ** 0.5)  # a negative scale too
    assert set(launched) == {WGMMA}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@on_hopper
def test_minus_inf_scores_and_fully_masked_rows(launched, dtype):
    """q[..., 0] = 1 and k[j, 0] = -inf give score(i, j) = -inf for every query."""
    rng = np.random.default_rng()
    q = _draw(rng, (2, 270, 64), dtype)
    k = _draw(rng, (2, 350, 64), dtype)
    v = _draw(rng, (2, 350, 32), dtype)
    q[..., 0] = 1
    k[0, ::3, 0] = -np.inf          # batch 0: a third of the keys hidden
    k[1, :, 0] = -np.inf            # batch 1: every key hidden -> zeros, lse = -inf
    for causal in (False, True):
        out, lse = _run(q, k, v, causal=causal)
        assert not np.isnan(out.astype(np.float64)).any()
        assert (out[1].astype(np.float64) == 0).all() and np.isneginf(lse[1]).all()
        check_attention(out, lse, q, k, v, causal=causal, scale=None)
    assert set(launched) == {WGMMA}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
@on_hopper
def test_same_inputs_give_bitwise_equal_outputs(launched, dtype, causal):
    cupy = _cupy()
    rng = np.random.default_rng()
    for d in (64, 128, 256):
        q, k, v = (cupy.asarray(_draw(rng, (2, 3, 1333, d), dtype)) for _ in range(3))
        a, la = cupyflash.attention(q, k, v, causal=causal, return_lse=True)
        b, lb = cupyflash.attention(q, k, v, causal=causal, return_lse=True)
        assert bool((a.view(np.uint8) == b.view(np.uint8)).all())
        assert bool((la.view(np.uint8) == lb.view(np.uint8)).all())
    assert set(launched) == {WGMMA}


@on_hopper
def test_agrees_with_the_mma_kernel(launched, monkeypatch):
    """The two fp16 kernels differ only in summation order: their outputs agree to a few
    units in the last place, and their lse to float32 rounding."""
    cupy = _cupy()
    rng = np.random.default_rng()
    for d in (64, 128, 256):
        q, k, v = (cupy.asarray(_draw(rng, (2, 2, 1000, d), "float16")) for _ in range(3))
        a, la = cupyflash.attention(q, k, v, causal=True, return_lse=True)
        monkeypatch.setenv("CUPYFLASH_FWD_KERNEL", "mma")
        b, lb = cupyflash.attention(q, k, v, causal=True, return_lse=True)
        monkeypatch.setenv("CUPYFLASH_FWD_KERNEL", "wgmma")
        diff = float(cupy.abs(a.astype(np.float32) - b.astype(np.float32)).max())
        assert diff <= 4e-3, f"d = {d}: the kernels differ by {diff}"
        assert float(cupy.abs(la - lb).max()) <= 1e-4
    assert launched.count(WGMMA) == 3 and launched.count("flash_fwd_mma.cuh") == 3


@on_hopper
def test_runs_on_the_current_non_default_stream(launched):
    cupy = _cupy()
    rng = np.random.default_rng()
    q, k, v = (_draw(rng, (4, 1024, 128), "bfloat16") for _ in range(3))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        gq, gk, gv = (cupy.asarray(x) for x in (q, k, v))
        out, lse = cupyflash.attention(gq, gk, gv, causal=True, return_lse=True)
        got = out.get(stream=stream), lse.get(stream=stream)
    stream.synchronize()
    check_attention(got[0], got[1], q, k, v, causal=True, scale=None)
    assert set(launched) == {WGMMA}


# ------------------------------------------------------------------------------------
# dispatch (no GPU needed)
# ------------------------------------------------------------------------------------

def test_dispatch_follows_the_environment(monkeypatch):
    monkeypatch.delenv("CUPYFLASH_FWD_KERNEL", raising=False)
    assert _cupy_backend.attention_config(128, 128, "float16", 90, False).kernel == "wgmma"
    monkeypatch.setenv("CUPYFLASH_FWD_KERNEL", "auto")  # wgmma above d = 32 on sm_90
    assert _cupy_backend.attention_config(96, 96, "float16", 90, False).kernel == "wgmma"
    assert _cupy_backend.attention_config(32, 32, "float16", 90, False).kernel == "mma"
    assert _cupy_backend.attention_config(128, 128, "float16", 80, False).kernel == "mma"
    cfg = _cupy_backend.attention_config(64, 64, "float16", 90, True, variants=True)
    assert cfg.kernel == "wgmma" and cfg.block_m == 192 and cfg.block_n == 64
    assert cfg.name_expression == "cupyflash::flash_fwd_wgmma_variants<__half, 64, 64, 3, 2>"
    monkeypatch.setenv("CUPYFLASH_FWD_KERNEL", "wgmma")
    cfg = _cupy_backend.attention_config(100, 30, "bfloat16", 90, True)
    assert cfg.kernel == "wgmma" and cfg.source == WGMMA
    assert cfg.name_expression == \
        "cupyflash::flash_fwd_wgmma<__nv_bfloat16, 128, 128, 2, 3, true, true>"
    assert (cfg.block_m, cfg.num_threads, cfg.persistent) == (128, 384, True)
    monkeypatch.setenv("CUPYFLASH_FWD_PERSISTENT", "0")  # one block per tile
    cfg = _cupy_backend.attention_config(100, 30, "bfloat16", 90, True)
    assert cfg.name_expression == \
        "cupyflash::flash_fwd_wgmma<__nv_bfloat16, 128, 128, 2, 3, true, false>"
    assert not cfg.persistent
    monkeypatch.setenv("CUPYFLASH_FWD_PERSISTENT", "2")
    with pytest.raises(ValueError, match="CUPYFLASH_FWD_PERSISTENT"):
        _cupy_backend.attention_config(100, 30, "bfloat16", 90, True)
    # auto: persistent where it measured faster (d = 64; d = 128 causal or short keys)
    monkeypatch.delenv("CUPYFLASH_FWD_PERSISTENT")
    for d, causal, Lk, persistent in ((64, False, 16384, True), (128, True, 16384, True),
                                      (128, False, 2048, True), (128, False, 2049, False),
                                      (128, False, None, False), (256, True, 1024, False)):
        cfg = _cupy_backend.attention_config(d, d, "float16", 90, causal, Lk=Lk)
        assert cfg.persistent == persistent, (d, causal, Lk)
        assert cfg.name_expression.endswith(f", {str(persistent).lower()}>")
    monkeypatch.setenv("CUPYFLASH_FWD_PERSISTENT", "1")
    assert _cupy_backend.attention_config(256, 256, "float16", 90, True, Lk=1024).persistent
    monkeypatch.delenv("CUPYFLASH_FWD_PERSISTENT")
    assert _cupy_backend.attention_config(64, 64, "float16", 90, False).block_m == 192
    # a window alone: the local kernel, persistent by the keys a query sees
    for d, Lk, persistent, tiles in ((64, 16384, True, "128, 3, 3"),
                                     (128, 1025, True, "128, 2, 3"),
                                     (128, 4097, False, "128, 2, 3"),
                                     (256, 1025, False, "64, 2, 2")):
        cfg = _cupy_backend.attention_config(d, d, "bfloat16", 90, False, variants=True,
                                             Lk=Lk, local=True)
        assert cfg.local and cfg.persistent == persistent, (d, Lk)
        assert cfg.name_expression == (f"cupyflash::flash_fwd_wgmma_local<__nv_bfloat16, {d}, "
                                       f"{tiles}, {str(persistent).lower()}>")
    assert not _cupy_backend.attention_config(128, 128, "bfloat16", 90, False, variants=True,
                                              local=False).local
    # a causal band over many keys (a causal padding mask): persistent as plain causal
    assert _cupy_backend.attention_config(128, 128, "bfloat16", 90, True, variants=True,
                                          Lk=16384, local=True).persistent
    assert not _cupy_backend.attention_config(128, 128, "bfloat16", 90, False, variants=True,
                                              Lk=16384, local=True).persistent
    # what the local kernel takes: a window and/or a row-broadcast mask, nothing else
    from test_dropout import _problem
    q = np.zeros((2, 3, 10, 8), np.float16)
    problem = _problem("attention", q, q, q, False, None, dict(window=(4, 0)))
    assert _cupy_backend.band_only(problem)
    assert _cupy_backend.band_only(problem, mask=np.ones((2, 1, 1, 10), bool))
    assert not _cupy_backend.band_only(problem, mask=np.ones((10, 10), bool))
    assert not _cupy_backend.band_only(problem, bias=np.zeros(10, np.float16))
    assert not _cupy_backend.band_only(problem, alibi_slopes=np.ones(3, np.float32))
    plain = _problem("attention", q, q, q, True, None, {})
    assert _cupy_backend.band_only(plain, mask=np.ones(10, bool))
    assert _cupy_backend.band_keys(problem) == 5 and _cupy_backend.band_keys(plain) == 10
    assert _cupy_backend.attention_config(128, 128, "bfloat16", 80, False, variants=True,
                                          local=True).kernel == "mma"
    # elsewhere the other kernels: not Hopper, fp32, head dims past 256
    assert _cupy_backend.attention_config(128, 128, "float16", 80, False).kernel == "mma"
    assert _cupy_backend.attention_config(128, 128, "float32", 90, False).kernel == "simt"
    monkeypatch.setenv("CUPYFLASH_FWD_KERNEL", "mma")
    assert _cupy_backend.attention_config(128, 128, "float16", 90, False).kernel == "mma"
    monkeypatch.setenv("CUPYFLASH_FWD_KERNEL", "fast")
    with pytest.raises(ValueError, match="^attention: CUPYFLASH_FWD_KERNEL must be one of"):
        _cupy_backend.attention_config(128, 128, "float16", 90, False)


def test_a_register_count_the_split_cannot_use_is_refused(monkeypatch):
    """setmaxnreg hands over exactly what the block was launched with (168 registers at 384
    threads, 128 at 512): any other count at launch is an error, not a hung GPU."""
    class Kernel:
        ptr = 1234

    for head_dim, regs in ((128, 168), (64, 128)):
        cfg = _cupy_backend._wgmma_config(head_dim, head_dim, "float16", causal=False)
        monkeypatch.setattr(_cupy_backend, "_launch_registers", lambda ptr, r=regs: r)
        _cupy_backend.check_register_split(Kernel(), cfg.num_threads, cfg.name_expression)
        monkeypatch.setattr(_cupy_backend, "_launch_registers", lambda ptr, r=regs: r - 8)
        with pytest.raises(RuntimeError, match="^attention: .*setmaxnreg split needs exactly"):
            _cupy_backend.check_register_split(Kernel(), cfg.num_threads, cfg.name_expression)
    # the Hopper backward: 384 threads, its own function name and knob in the message
    cfg = _cupy_backward._wgmma_backward_config(128, "float16", 90, False, False)
    monkeypatch.setattr(_cupy_backend, "_launch_registers", lambda ptr: 160)
    with pytest.raises(RuntimeError, match="^attention_backward: .*CUPYFLASH_BWD_KERNEL=mma"):
        _cupy_backend.check_register_split(Kernel(), cfg.main_threads, cfg.main_name,
                                           "attention_backward", "CUPYFLASH_BWD_KERNEL")


def test_slice_layouts_of_the_batch_dimensions():
    """One slice dimension per tensor map: batch offsets in units of the smallest stride."""
    L, D = 100, 64
    # contiguous (B, H, L, D), collapsed to one batch dim of B * H slices
    assert _tensor_map.slice_layout([6], [L * D]) == (L * D, 6, [1])
    # grouped-query k: (B, Hkv, G) with G broadcast
    assert _tensor_map.slice_layout([2, 3, 4], [3 * L * D, L * D, 0]) == (L * D, 6, [3, 1, 0])
    # (B, L, H, D) viewed as (B, H, L, D): head stride D, batch stride L * H * D
    assert _tensor_map.slice_layout([2, 3], [L * 3 * D, D]) == (D, 3 * L + 3, [3 * L, 1])
    # fully broadcast: one slice
    assert _tensor_map.slice_layout([5], [0]) == (0, 1, [0])
    # reversed, or strides that are not multiples of the smallest: no map
    assert _tensor_map.slice_layout([3], [-L * D]) is None
    assert _tensor_map.slice_layout([5, 3], [7 * L * D, 3 * L * D]) is None


def test_attention_map_shapes():
    """dims (head dim, L, slices), byte strides of rows and slices, boxes of 64 columns."""
    shape = _tensor_map.attention_map_shape((2, 3, 100, 64), (3 * 12800, 12800, 128, 2), 2,
                                            6400, 6, 128)
    assert shape == ((64, 100, 6), (128, 12800), (64, 128, 1))
    # one row: any valid row stride; one slice: any valid slice stride
    assert _tensor_map.attention_map_shape((1, 1, 40), (0, 0, 2), 2, 0, 1, 64) == (
        (40, 1, 1), (80, 80), (64, 64, 1))
    # rows broadcast (stride 0) or reversed, a 257-row box, an empty dim: no map
    assert _tensor_map.attention_map_shape((7, 64), (0, 2), 2, 0, 1, 64) is None
    assert _tensor_map.attention_map_shape((7, 64), (-128, 2), 2, 0, 1, 64) is None
    assert _tensor_map.attention_map_shape((7, 64), (128, 2), 2, 0, 1, 257) is None
    assert _tensor_map.attention_map_shape((7, 0), (0, 2), 2, 0, 1, 64) is None


class _DeviceArray:
    """A NumPy array dressed as a CuPy one (``.data.ptr``) for the host-side packing."""

    class _Data:
        def __init__(self, ptr):
            self.ptr = ptr

    def __init__(self, x, ptr):
        self._x, self.data = x, self._Data(ptr)
        self.shape, self.strides = x.shape, x.strides
        self.itemsize, self.dtype = x.itemsize, x.dtype


def test_tensor_maps_are_encoded_once_per_distinct_tensor(monkeypatch):
    """encode_tiled keeps its last ENCODED_CACHE maps: the same arguments give the same
    map without the driver, any other address or layout is encoded anew, and the oldest
    map is dropped first."""
    calls = []

    def fake_encoder(out, dtype, rank, address, dims, strides, box, *rest):
        calls.append(address)
        ctypes.memmove(out, address.to_bytes(8, "little") * 16, _tensor_map.TENSOR_MAP_BYTES)
        return 0
    monkeypatch.setattr(_tensor_map, "_encode_tiled", lambda: fake_encoder)
    _tensor_map._encode_tiled_cached.cache_clear()
    try:
        def encode(address, rows=128):
            return _tensor_map.encode_tiled("float16", address, (64, 100, 3), (128, 12800),
                                            (64, rows, 1))
        first = encode(1 << 20)
        assert encode(1 << 20) is first and calls == [1 << 20]
        assert encode(2 << 20).tobytes() != first.tobytes() and len(calls) == 2
        encode(1 << 20, rows=64)
        assert len(calls) == 3  # another box: another map
        for i in range(_tensor_map.ENCODED_CACHE):
            encode((100 + i) << 20)
        encode(1 << 20)
        assert calls[-1] == 1 << 20, "the oldest map was not the one dropped"
    finally:
        _tensor_map._encode_tiled_cached.cache_clear()


def test_wgmma_arguments_describe_q_k_v_as_slices(monkeypatch):
    """Grouped-query k and v (a stride-0 group axis) and (B, L, H, D) views: the tensor
    maps the kernel gets, and the batch strides in slices that AttentionParams carries."""
    from cupyflash._api import AttentionProblem
    encoded = []
    monkeypatch.setattr(_tensor_map, "encode_tiled",
                        lambda dtype, address, dims, strides, box: encoded.append(
                            (dtype, address, tuple(dims), tuple(strides), tuple(box))) or "map")
    B, H, G, Lq, Lk, D = 2, 3, 4, 100, 130, 128
    cfg = _cupy_backend._wgmma_config(D, D, "float16", causal=True)
    q = _DeviceArray(np.zeros((B, H, G, Lq, D), np.float16), 1 << 20)
    kv = np.zeros((B, H, 1, Lk, D), np.float16)
    k = _DeviceArray(np.broadcast_to(kv, (B, H, G, Lk, D)), 2 << 20)
    bshd = np.zeros((B, Lk, H * G, D), np.float16).reshape(B, Lk, H, G, D).transpose(0, 2, 3, 1, 4)
    v = _DeviceArray(bshd, 3 << 20)
    o = _DeviceArray(np.zeros((B, H, G, Lq, D), np.float16), 4 << 20)
    lse = _DeviceArray(np.zeros((B, H, G, Lq), np.float32), 5 << 20)
    problem = AttentionProblem((B, H, G), Lq, Lk, D, D, np.dtype(np.float16), True, D ** -0.5)
    params, maps, extra_strides = _cupy_backend._wgmma_arguments(problem, cfg, q, k, v, o, lse)
    assert maps == ("map",) * 3 and extra_strides == []
    (_, *q_map), (_, *k_map), (_, *v_map) = encoded  # address, dims, byte strides, box
    assert q_map == [1 << 20, (D, Lq, B * H * G), (2 * D, 2 * D * Lq), (64, 128, 1)]
    assert k_map == [2 << 20, (D, Lk, B * H), (2 * D, 2 * D * Lk), (64, 128, 1)]
    # v: rows H * G * D apart, (h, g) slices D apart, batch slices Lk * H * G apart
    assert v_map == [3 << 20, (D, Lk, (B - 1) * Lk * H * G + H * G), (2 * D * H * G, 2 * D),
                     (64, 128, 1)]
    # no two batch dims merge for all four tensors (v's B and H, k's H and G do not)
    assert list(params["batch_size"]) == [1, B, H, G]
    assert list(params["q_batch_stride"]) == [0, H * G, G, 1]          # slices of Lq x D
    assert list(params["k_batch_stride"]) == [0, H, 1, 0]              # slices of Lk x D
    assert list(params["v_batch_stride"]) == [0, Lk * H * G, G, 1]    # slices of D
    assert list(params["o_batch_stride"]) == [0, H * G * Lq * D, G * Lq * D, Lq * D]  # elements
    assert (params["Lq"], params["Lk"], params["D"], params["Dv"]) == (Lq, Lk, D, D)
