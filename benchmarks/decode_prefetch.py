"""Sessions 20-21 lab, A/B in one run with torch's cuDNN and flash backends timed alike
(benchmarks/decode.py's queue timer), head dim 128, 8/8 heads, two rounds:

- batch 1: the cluster kernel's L2 prefetch before the PDL wait (CLUSTER_PREFETCH_TILES),
  with the next grid allowed when ALLOW_LEFT tiles of a block remain (the kernel's
  template parameter), and the host's uniform length against a cache_seqlens load;
- batch 16 (when asked for, e.g. 16x32768): the cluster kernel's loop as a one-split
  kernel (flash_decode_cluster<T, 128, 1, STAGES>: 256 threads, 32, 64 or 96 KiB in
  flight a block for 2, 3, 4 stages) against flash_decode (32 KiB in flight). Session 20:
  no better (R1 of session 21).

Every variant goes through the package's launcher (its module settings patched), so
everything but the variant is what attention_decode does.

    python3 benchmarks/decode_prefetch.py                 # batch 1 at 8k..128k
    python3 benchmarks/decode_prefetch.py 1x8192 16x32768
    PF_DTYPE=float16 python3 benchmarks/decode_prefetch.py

Each variant's output on cache 0 is checked against a float32 GPU reference first.
"""
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import numpy as np
import cupy
import decode as bench
from cupyflash import _cupy_decode

timer, stream, torch, backends, copy_gbs = bench.lab_session(cupy)
dtype_name = os.environ.get("PF_DTYPE", "bfloat16")
dt = bench._dtype(dtype_name)
ctype = {"bfloat16": "__nv_bfloat16", "float16": "__half"}[dtype_name]
cases = [(1, 8192), (1, 16384), (1, 32768), (1, 131072)]
if len(sys.argv) > 1:
    cases = [tuple(int(x) for x in c.split("x")) for c in sys.argv[1:]]
H = Hk = 8
D = 128
ROUNDS = int(os.environ.get("PF_ROUNDS", "2"))

SETTINGS = ("uses_cluster", "CLUSTER_SIZE", "cluster_name", "CLUSTER_SMEM_BYTES",
            "CLUSTER_PREFETCH_TILES")
original = {name: getattr(_cupy_decode, name) for name in SETTINGS}


def variant(label, uniform=True, tiles=None, cluster=None, stages=3, allow_left=2):
    """(label, uniform lengths passed, module settings) of one variant."""
    settings = {}
    if tiles is not None:
        settings["CLUSTER_PREFETCH_TILES"] = tiles
    if cluster is not None:   # the cluster kernel with `cluster` blocks a kv head, forced
        expr = (f"cupyflash::flash_decode_cluster<{ctype}, {D}, {cluster}, {stages}, "
                f"{allow_left}>")
        settings.update(uses_cluster=lambda *a: True, CLUSTER_SIZE=cluster,
                        cluster_name=lambda *a, e=expr: e,
                        CLUSTER_SMEM_BYTES=stages * 2 * 4 * _cupy_decode.CLUSTER_THREADS * 16
                        + _cupy_decode.PIPE_ALIGN)
    return label, uniform, settings


def install(settings):
    for name in SETTINGS:
        setattr(_cupy_decode, name, settings.get(name, original[name]))


for B, L in cases:
    kv_bytes, q, caches, seqlens = bench.rotating_caches(cupy, B, L, H, Hk, D, dt)
    if B == 1:
        variants = [variant("package"), variant("lengths loaded", uniform=False),
                    variant("P0", tiles=0), variant("P1 A2", tiles=1),
                    variant("P3 A2", tiles=3), variant("P2 A1", cluster=8, allow_left=1),
                    variant("P2 A3", cluster=8, allow_left=3),
                    variant("P4 A3", tiles=4, cluster=8, allow_left=3)]
    else:
        variants = [variant("package"), variant("C1 S2", cluster=1, stages=2),
                    variant("C1 S3", cluster=1, stages=3), variant("C1 S4", cluster=1, stages=4)]

    def launch(k, v, uniform):
        return lambda: _cupy_decode.attention_decode(
            q, k, v, seqlens, None, None, None, num_splits=None, causal=False,
            scale=D ** -0.5, max_keys=L, min_keys=L if uniform else None)

    # float32 reference on cache 0, one batch element at a time
    want = cupy.empty((B, H, D), dtype=np.float32)
    for b in range(B):
        qf = q[b, 0].astype(np.float32)                              # (H, D)
        kf = caches[0][0][b].astype(np.float32)                       # (L, Hk, D)
        s = cupy.einsum("hd,lhd->hl", qf, kf) * D ** -0.5
        p = cupy.exp(s - s.max(-1, keepdims=True))
        want[b] = cupy.einsum("hl,lhd->hd", p / p.sum(-1, keepdims=True),
                              caches[0][1][b].astype(np.float32))
        del kf, s, p
    expected = kv_bytes / 2.5e9
    res = {}
    for rnd in range(ROUNDS):
        for label, uniform, settings in variants:
            install(settings)
            if rnd == 0:
                out = launch(*caches[0], uniform)()[0]
                stream.synchronize()
                err = float(abs(out[:, 0].astype(np.float32) - want).max())
                print(f"  B={B} L={L} {label}: max |out - float32 reference| {err:.1e}",
                      flush=True)
                if not err < 2e-2:
                    raise SystemExit(f"{label}: wrong output")
            res.setdefault(label, []).append(
                timer([launch(k_, v_, uniform) for k_, v_ in caches], expected))
        install({})
        if torch is not None:
            tq = bench.as_torch(torch, q).transpose(1, 2)
            views = [(bench.as_torch(torch, k).transpose(1, 2),
                      bench.as_torch(torch, v).transpose(1, 2)) for k, v in caches]
            for tname in ("torch_cudnn", "torch_flash"):
                sd = backends[tname]
                res.setdefault(tname, []).append(
                    timer([(lambda k=k, v=v: sd(tq, k, v, False)) for k, v in views], expected))
    best_t = min(min(ts) for name, ts in res.items() if name.startswith("torch")) \
        if torch is not None else float("nan")
    print(f"B={B:3d} L={L:6d} ({kv_bytes / 2**20:.0f} MiB), us per call, rounds; "
          f"copy fraction and torch best / ours of the best round:", flush=True)
    for name, ts in res.items():
        ms = min(ts)
        print(f"   {name:18s} " + " / ".join(f"{t * 1e3:8.2f}" for t in ts)
              + f"   copy {kv_bytes / ms / 1e6 / copy_gbs:.3f}"
              + ("" if name.startswith("torch") else f"  x torch best {best_t / ms:.3f}"),
              flush=True)
    del caches
    cupy.get_default_memory_pool().free_all_blocks()
