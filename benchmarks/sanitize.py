"""A small grid of every GPU kernel, for compute-sanitizer.

    for tool in memcheck racecheck initcheck synccheck; do
        compute-sanitizer --tool $tool --error-exitcode 1 python3 benchmarks/sanitize.py
    done

Covers: the tensor-core forward (fp16, bf16; every head-dim bucket; causal and not;
lengths off the tile sizes, Lq != Lk, a row that sees no key), the fp32/fp64 forward, the
softmax kernels (a short row, rows for the cluster kernel, a row longer than that), and the backward ("bwd": the
same attention cases, atomic and deterministic dQ, grouped-query k and v), the variant
kernels ("variants": bias, mask, window, ALiBi, softcap, forward and backward), and decoding ("decode": the
split, combine and append kernels; contiguous and paged caches, grouped heads and row chunks, one and
many splits, the element-by-element copy path, float64 at head dim 256). Each result is also checked
against the float64 reference, so a sanitizer-clean but wrong kernel still fails.
"""

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import cupyflash  # noqa: E402
from cupyflash import reference  # noqa: E402


def main(families=("mma", "simt", "softmax")):
    import cupy
    import ml_dtypes
    rng = np.random.default_rng(0)
    worst = 0.0
    cases = []
    if "mma" in families:
        for dt in (np.float16, ml_dtypes.bfloat16):
            for d in (32, 64, 96, 128, 192, 256):
                for causal in (False, True):
                    cases.append((dt, d, causal, 77, 130))
        cases.append((np.float16, 64, True, 130, 77))  # rows that see no key
    if "simt" in families:
        for dt in (np.float32, np.float64):
            for d in (64, 128):
                for causal in (False, True):
                    cases.append((dt, d, causal, 77, 130))
    for dt, d, causal, lq, lk in cases:
        q = rng.standard_normal((2, lq, d)).astype(dt)
        k = rng.standard_normal((2, lk, d)).astype(dt)
        v = rng.standard_normal((2, lk, d)).astype(dt)
        out = cupyflash.attention(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), causal=causal)
        ref = reference.attention(q, k, v, causal=causal)
        err = float(np.abs(out.get().astype(np.float64) - ref).max())
        tol = 1e-2 if np.dtype(dt).itemsize == 2 else 1e-5
        assert err < tol, (dt, d, causal, err)
        worst = max(worst, err)
    if "bwd" in families:
        # one head dim per tile class of the tensor-core backward (BLOCK_M 128 / 64 /
        # two warps per 16 keys), bf16 once, and the SIMT kernels
        kinds = [(np.float16, 64), (np.float16, 128), (np.float16, 256),
                 (ml_dtypes.bfloat16, 128), (np.float32, 64), (np.float64, 64)]
        bwd_cases = [(dt, d, causal, lq, lk) for dt, d in kinds for causal in (False, True)
                     for lq, lk in ((77, 130), (130, 77))]
        for dt, d, causal, lq, lk in bwd_cases:
            q = rng.standard_normal((2, 2, lq, d)).astype(dt)
            k = rng.standard_normal((2, 1, lk, d)).astype(dt)  # shared by 2 query heads
            v = rng.standard_normal((2, 1, lk, d)).astype(dt)
            do = rng.standard_normal((2, 2, lq, d)).astype(dt)
            gq, gk, gv, gdo = (cupy.asarray(x) for x in (q, k, v, do))
            out, lse = cupyflash.attention(gq, gk, gv, causal=causal, return_lse=True)
            ref = reference.attention_backward(do, q, k, v, causal=causal)
            for det in (False, True):
                got = cupyflash.attention_backward(gdo, gq, gk, gv, out, lse, causal=causal,
                                                   deterministic=det)
                for g, r in zip(got, ref):
                    err = float(np.abs(g.get().astype(np.float64) - r).max())
                    err /= max(1.0, float(np.abs(r).max()))
                    tol = 3e-2 if np.dtype(dt).itemsize == 2 else 1e-4
                    assert err < tol, ("bwd", dt, d, causal, lq, lk, det, err)
                    worst = max(worst, err)
        cases += bwd_cases
    if "variants" in families:
        # the _variants kernels, forward and backward: every score modifier at once (bias
        # of its own dtype, a padding mask read with stride 0, a window that skips blocks,
        # ALiBi; softcap in the forward), off the tile sizes, for each kernel family
        kinds = [(np.float16, 64), (ml_dtypes.bfloat16, 128), (np.float16, 256),
                 (np.float32, 64), (np.float64, 128)]
        for dt, d in kinds:
            lq, lk = 150, 333
            q = rng.standard_normal((2, 2, lq, d)).astype(dt)
            k = rng.standard_normal((2, 1, lk, d)).astype(dt)
            v = rng.standard_normal((2, 1, lk, d)).astype(dt)
            do = rng.standard_normal((2, 2, lq, d)).astype(dt)
            options = dict(bias=rng.standard_normal((lq, lk)).astype(np.float32),
                           mask=(np.arange(lk) < np.array([333, 200])[:, None, None, None]),
                           window=(70, 10), alibi_slopes=np.array([0.5, 0.25]))
            gpu = {n: cupy.asarray(x) if isinstance(x, np.ndarray) else x
                   for n, x in options.items()}
            gq, gk, gv, gdo = (cupy.asarray(x) for x in (q, k, v, do))
            tol = 3e-2 if np.dtype(dt).itemsize == 2 else 1e-4
            for softcap in (None, 20.0):
                out = cupyflash.attention(gq, gk, gv, causal=True, softcap=softcap, **gpu)
                ref = reference.attention(q, k, v, causal=True, softcap=softcap, **options)
                err = float(np.abs(out.get().astype(np.float64) - ref).max())
                assert err < tol, ("variants", dt, d, softcap, err)
                worst = max(worst, err)
            out, lse = cupyflash.attention(gq, gk, gv, causal=True, return_lse=True, **gpu)
            ref = reference.attention_backward(do, q, k, v, causal=True, **options)
            for det in (False, True):
                got = cupyflash.attention_backward(gdo, gq, gk, gv, out, lse, causal=True,
                                                   deterministic=det, **gpu)
                for g, r in zip(got, ref):
                    err = float(np.abs(g.get().astype(np.float64) - r).max())
                    err /= max(1.0, float(np.abs(r).max()))
                    assert err < tol, ("variants bwd", dt, d, det, err)
                    worst = max(worst, err)
            cases.append(("variants", dt, d))
    if "decode" in families:
        # (dtype, D, Hk, G, Lq, causal, page size or None, num_splits, element path)
        decode_cases = [(np.float16, 128, 2, 1, 1, False, None, None, False),
                        (np.float16, 128, 2, 1, 1, False, 16, 7, False),
                        (ml_dtypes.bfloat16, 128, 2, 4, 1, True, 3, None, False),
                        (np.float16, 64, 1, 8, 3, True, None, 1, False),
                        (np.float32, 59, 2, 2, 2, False, 8, 4, True),
                        (np.float64, 256, 1, 3, 1, False, None, 5, False)]
        for dt, d, hk, g, lq, causal, page, splits, odd in decode_cases:
            seqlens = np.array([300, 0, 37], np.int32)
            k_cache = rng.standard_normal((3, 310, hk, d + odd)).astype(dt)[..., odd:]
            v_cache = rng.standard_normal((3, 310, hk, d)).astype(dt)
            q = rng.standard_normal((3, lq, hk * g, d)).astype(dt)
            k_new = rng.standard_normal((3, 1, hk, d)).astype(dt)
            v_new = rng.standard_normal((3, 1, hk, d)).astype(dt)
            ref = reference.attention_decode(q, k_cache, v_cache, seqlens, k_new=k_new,
                                             v_new=v_new, causal=causal)
            table = None
            if page is not None:  # the same keys as a shuffled pool of pages
                per_seq = -(-310 // page)
                perm = rng.permutation(3 * per_seq)
                table = perm.reshape(3, per_seq).astype(np.int32)
                pad = np.zeros((3, per_seq * page - 310) + k_cache.shape[2:], dt)
                pools = []
                for cache in (k_cache, v_cache):
                    blocks = np.concatenate([cache, pad[..., :cache.shape[-1]]], axis=1)
                    pool = np.empty((3 * per_seq, page) + cache.shape[2:], dt)
                    pool[table.ravel()] = blocks.reshape((3 * per_seq, page) + cache.shape[2:])
                    pools.append(pool)
                k_cache, v_cache = pools
            gk = cupy.asarray(np.ascontiguousarray(k_cache) if not odd else k_cache)
            if odd:  # rows that are not 16-byte vectors: a view one element in
                base = cupy.zeros(k_cache.shape[:-1] + (d + 1,), dt)
                base[..., 1:] = cupy.asarray(k_cache)
                gk = base[..., 1:]
            out = cupyflash.attention_decode(
                cupy.asarray(q), gk, cupy.asarray(v_cache), cupy.asarray(seqlens),
                k_new=cupy.asarray(k_new), v_new=cupy.asarray(v_new),
                block_table=None if table is None else cupy.asarray(table),
                causal=causal, num_splits=splits)
            err = float(np.abs(out.get().astype(np.float64) - ref).max())
            tol = 3e-2 if np.dtype(dt).itemsize == 2 else 1e-5
            assert err < tol, ("decode", dt, d, hk, g, lq, causal, page, splits, odd, err)
            worst = max(worst, err)
        cases += decode_cases
    if "softmax" in families:
        # one block per row; the cluster kernel (sm_90: 17 rows fill an H100's 132 SMs);
        # the split-row kernels
        for rows, n in ((3, 1000), (17, 262_144), (3, 300_000)):
            x = rng.standard_normal((rows, n)).astype(np.float32)
            for fn in (cupyflash.softmax, cupyflash.log_softmax, cupyflash.logsumexp):
                got = fn(cupy.asarray(x)).get()
                ref = getattr(reference, fn.__name__)(x)
                assert np.allclose(got, ref, rtol=1e-4, atol=1e-6), fn.__name__
    cupy.cuda.Device().synchronize()
    print(f"sanitize grid: {len(cases)} attention cases, worst attention error {worst:.2e}: ok")


if __name__ == "__main__":
    main(tuple(sys.argv[1:]) or ("mma", "simt", "softmax", "bwd", "variants", "decode"))
