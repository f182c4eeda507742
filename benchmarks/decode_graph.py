"""Decode timed by CUDA-graph replays as well as by decode.py's queue (a lab tool,
session 13; benchmarks/NOTES.md "Session 13").

decode.py times calls enqueued back to back, which still leaves the gap between two
launches in every call (about 2.9 us at batch 1, session 12). A CUDA graph of the same
calls replays them with shorter gaps (the method notes' advice for small launches). Here
cupyflash (the launch after validation, ``_cupy_decode.attention_decode``, captured on a
CuPy stream) and torch SDPA's cuDNN backend (``torch.cuda.graph``) are each captured as
``n`` calls rotating over copies of the cache larger than L2, replayed 9 times, and the
median of the last 7 replays over ``n`` is the time per call; the queue's time is printed
beside it. bf16, 8 query heads over 8 kv heads of 128, one query, batch 1..64, 8k and 32k
keys; bandwidth as a fraction of a 1 GiB device copy timed in the same run. The last
graph call's output is compared with cuDNN's.

    python3 benchmarks/decode_graph.py     # on the GPU, torch present
"""

import math
import pathlib
import statistics
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from cupyflash import _cupy_decode  # noqa: E402
from decode import QueueTimer, _dtype, _random, as_torch, copy_bandwidth  # noqa: E402

REPLAYS, WARM = 9, 2


def cupy_graph_ms(cupy, fns, n):
    """Per-call ms of a CuPy graph of ``n`` calls of ``fns`` (rotated); and the outputs."""
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        for fn in fns:  # warm-up on this stream: its split counters exist before capture
            fn()
        stream.synchronize()
        stream.begin_capture()
        outs = [fns[i % len(fns)]() for i in range(n)]
        graph = stream.end_capture()
        graph.upload()
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        times = []
        for r in range(REPLAYS):
            start.record(stream)
            graph.launch(stream)
            end.record(stream)
            end.synchronize()
            if r >= WARM:
                times.append(cupy.cuda.get_elapsed_time(start, end) / n)
    return statistics.median(times), outs


def torch_graph_ms(torch, fns, n):
    """Per-call ms of a torch CUDA graph of ``n`` calls of ``fns`` (rotated)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        outs = [fns[i % len(fns)]() for i in range(n)]
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    times = []
    with torch.cuda.stream(stream):
        for r in range(REPLAYS):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            if r >= WARM:
                times.append(start.elapsed_time(end) / n)
    return statistics.median(times), outs


def main():
    import cupy
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    queue = QueueTimer(cupy, 20, 5)
    copy_gbs = copy_bandwidth(cupy, queue)
    print(f"GPU: {torch.cuda.get_device_name()}; 1 GiB copy {copy_gbs:.0f} GB/s; "
          f"us per call (fraction of the copy's bandwidth)")
    dt = _dtype("bfloat16")
    H = Hk = 8
    D = 128
    for L in (8192, 32768):
        for B in (1, 4, 16, 64):
            if L * B > 16 * 32768:
                continue
            kv_bytes = B * Hk * L * 2 * D * dt.itemsize
            copies = max(2, -(-4 * 50 * 2**20 // kv_bytes) + 1)  # 4x a 50 MiB L2
            q = _random(cupy, (B, 1, H, D), dt)
            caches = [(_random(cupy, (B, L, Hk, D), dt), _random(cupy, (B, L, Hk, D), dt))
                      for _ in range(copies)]
            seqlens = cupy.full((B,), L, dtype=np.int32)
            scale = 1 / math.sqrt(D)
            ours = [(lambda k=k, v=v: _cupy_decode.attention_decode(
                q, k, v, seqlens, None, None, None, num_splits=None, causal=False,
                scale=scale, max_keys=L)[0]) for k, v in caches]
            n = max(len(caches), min(40, int(20.0 / (kv_bytes / 2.5e9))))
            n -= n % len(caches)
            tq = as_torch(torch, q).transpose(1, 2)
            views = [(as_torch(torch, k).transpose(1, 2), as_torch(torch, v).transpose(1, 2))
                     for k, v in caches]

            def cudnn(k, v):
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return F.scaled_dot_product_attention(tq, k, v)
            theirs = [(lambda k=k, v=v: cudnn(k, v)) for k, v in views]

            q_ours = queue(ours, kv_bytes / 2.5e9)
            cupy.cuda.get_current_stream().synchronize()
            g_ours, outs = cupy_graph_ms(cupy, ours, n)
            g_theirs, ref = torch_graph_ms(torch, theirs, n)
            diff = float((as_torch(torch, outs[-1]).float()
                          - ref[-1].transpose(1, 2).float()).abs().max())

            def cell(ms):
                return f"{ms * 1e3:8.2f} ({kv_bytes / ms / 1e6 / copy_gbs:.2f})"
            print(f"L {L:6d} B {B:3d} n {n:2d} | queue: cupyflash {cell(q_ours)} | graph: "
                  f"cupyflash {cell(g_ours)} cudnn {cell(g_theirs)} x cudnn "
                  f"{g_theirs / g_ours:.3f} | max diff {diff:.2g}", flush=True)
            del outs, ref, caches, views


if __name__ == "__main__":
    main()
