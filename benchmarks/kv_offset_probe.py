"""Does where V lies relative to K change the decode read's speed? (session 23)

At batch 16 with a 32k cache the one-row decode kernel's time moved by ~1% between
processes and cases (679.5 us for the second case of a `decode.py` run, 688.5 for the
first case of a lab script, every round), while torch's cuDNN backend, timed on the same
caches, stayed at 685-688. Our kernel (and its read skeletons) copy K and V of the same
keys in the same instruction pair; cuDNN's kernel reads K and V tiles at different times.
If the DRAM's address hash maps K[i] and V[i] to the same channels or banks for some
distances between the two arrays, our reads collide there and cuDNN's do not.

This probe places K at the start of one buffer and V at ``1 GiB + delta`` after it (and
V before K), fills both with the same random values each time, and times
``attention_decode`` and cuDNN on each placement, in the same process and rounds.

    python3 benchmarks/kv_offset_probe.py            # batch 16, 32k keys, bf16
    python3 benchmarks/kv_offset_probe.py 64 8192
    python3 benchmarks/kv_offset_probe.py 16 32768 alloc 6  # six separately allocated caches
    python3 benchmarks/kv_offset_probe.py 16 32768 pad     # batch strides of L + pad keys
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import cupy  # noqa: E402
import decode as bench  # noqa: E402
from cupyflash import _cupy_decode  # noqa: E402

B = int(sys.argv[1]) if len(sys.argv) > 1 else 16
L = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
Hk, D = 8, 128
timer, stream, torch, backends, copy = bench.lab_session(cupy)
dt = bench._dtype("bfloat16")
shape = (B, L, Hk, D)
size = B * L * Hk * D * dt.itemsize
print(f"batch {B}, {L} keys, {Hk} kv heads of {D}, bf16; K and V {size / 2**30:.3f} GiB each",
      flush=True)
kv_bytes = 2 * size
q = bench._random(cupy, (B, 1, Hk, D), dt)
k_vals = bench._random(cupy, shape, dt)
v_vals = bench._random(cupy, shape, dt)
seqlens = cupy.full((B,), L, dtype=np.int32)
SLACK = 64 << 20
buf = cupy.empty(2 * size + SLACK, dtype=np.uint8)
print(f"buffer at {buf.data.ptr:#x} (mod 2 MiB: {buf.data.ptr % (2 << 20):#x})", flush=True)


def place(k_off, v_off):
    k = buf[k_off:k_off + size].view(dt).reshape(shape)
    v = buf[v_off:v_off + size].view(dt).reshape(shape)
    k[...] = k_vals
    v[...] = v_vals
    return k, v


def report(name, ms):
    gbs = kv_bytes / ms / 1e6
    print(f"{name:44s} {ms * 1e3:9.2f} us {gbs:6.0f} GB/s", flush=True)


if len(sys.argv) > 3 and sys.argv[3] == "alloc":
    # N (K, V) pairs (argv[4], default 6), each allocated on its own and all kept: the
    # same values at N places in memory, each timed with the one-row SIMT kernel, the
    # tensor-core kernel on one row (MMA_ONE_ROW) and cuDNN.
    del buf
    pairs = []
    for i in range(int(sys.argv[4]) if len(sys.argv) > 4 else 6):
        k, v = cupy.empty(shape, dt), cupy.empty(shape, dt)
        k[...] = k_vals
        v[...] = v_vals
        pairs.append((k, v))
        print(f"pair {i}: K at {k.data.ptr:#x}, V at {v.data.ptr:#x}", flush=True)
    del k_vals, v_vals
    cupy.get_default_memory_pool().free_all_blocks()

    def ours(k, v, mma):
        _cupy_decode.MMA_ONE_ROW = mma
        try:
            return timer([lambda: _cupy_decode.attention_decode(
                q, k, v, seqlens, None, None, None, num_splits=None, causal=False,
                scale=D ** -0.5, max_keys=L)], kv_bytes / 3.1e9)
        finally:
            _cupy_decode.MMA_ONE_ROW = False
    for rnd in range(2):
        for i, (k, v) in enumerate(pairs):
            simt, mma = ours(k, v, False), ours(k, v, True)
            tq = bench.as_torch(torch, q).transpose(1, 2)
            tk = bench.as_torch(torch, k).transpose(1, 2)
            tv = bench.as_torch(torch, v).transpose(1, 2)
            ms = timer([lambda: backends["torch_cudnn"](tq, tk, tv, False)], kv_bytes / 3.1e9)
            print(f"r{rnd} pair {i}: simt {simt * 1e3:8.2f} us  mma {mma * 1e3:8.2f} us  "
                  f"cudnn {ms * 1e3:8.2f} us  ratios {ms / simt:.4f} {ms / mma:.4f}", flush=True)
    sys.exit(0)

if len(sys.argv) > 3 and sys.argv[3] == "pad":
    # The batch stride of a (B, L, Hk, D) cache is L * 4 KiB of K (64 MiB at 32k): the 16
    # batch elements' rows that the blocks read together lie a power of two apart. A
    # (B, L + pad, Hk, D) cache viewed [:, :L] moves them; three placements each.
    del buf

    def decode(k, v):
        out, _ = _cupy_decode.attention_decode(q, k, v, seqlens, None, None, None,
                                               num_splits=None, causal=False,
                                               scale=D ** -0.5, max_keys=L)
        return out.astype(np.float32)
    expect = decode(k_vals, v_vals)
    for pad in (0, 1, 16, 33):
        pairs = []
        for i in range(3):
            k = cupy.empty((B, L + pad, Hk, D), dt)[:, :L]
            v = cupy.empty((B, L + pad, Hk, D), dt)[:, :L]
            k[...] = k_vals
            v[...] = v_vals
            pairs.append((k, v))
        print(f"pad {pad}: outputs as the contiguous cache's: "
              f"{bool((decode(*pairs[0]) == expect).all())}", flush=True)
        for rnd in range(2):
            for i, (k, v) in enumerate(pairs):
                ours = timer([lambda: _cupy_decode.attention_decode(
                    q, k, v, seqlens, None, None, None, num_splits=None, causal=False,
                    scale=D ** -0.5, max_keys=L)], kv_bytes / 3.1e9)
                tq = bench.as_torch(torch, q).transpose(1, 2)
                tk = bench.as_torch(torch, k).transpose(1, 2)
                tv = bench.as_torch(torch, v).transpose(1, 2)
                ms = timer([lambda: backends["torch_cudnn"](tq, tk, tv, False)],
                           kv_bytes / 3.1e9)
                print(f"pad {pad:2d} r{rnd} place {i}: ours {ours * 1e3:8.2f} us  "
                      f"cudnn {ms * 1e3:8.2f} us  ratio {ms / ours:.4f}", flush=True)
        del pairs, k, v
        cupy.get_default_memory_pool().free_all_blocks()
    sys.exit(0)

# (label, K's offset, V's offset) in the buffer
GAP = size
LAYOUTS = [("V = K + size", 0, GAP),
           ("V = K + size + 256 B", 0, GAP + 256),
           ("V = K + size + 2 KiB", 0, GAP + 2048),
           ("V = K + size + 64 KiB", 0, GAP + 65536),
           ("V = K + size + 1 MiB", 0, GAP + (1 << 20)),
           ("V = K + size + 2 MiB", 0, GAP + (2 << 20)),
           ("V = K + size + 33 MiB", 0, GAP + (33 << 20)),
           ("K = V + size (V first)", GAP, 0)]
for rnd in range(2):
    for label, k_off, v_off in LAYOUTS:
        k, v = place(k_off, v_off)
        ours = timer([lambda: _cupy_decode.attention_decode(
            q, k, v, seqlens, None, None, None, num_splits=None, causal=False,
            scale=D ** -0.5, max_keys=L)], kv_bytes / 3.1e9)
        line = f"r{rnd} {label}"
        report(line + " ours", ours)
        if "torch_cudnn" in backends:
            tq = bench.as_torch(torch, q).transpose(1, 2)
            tk = bench.as_torch(torch, k).transpose(1, 2)
            tv = bench.as_torch(torch, v).transpose(1, 2)
            ms = timer([lambda: backends["torch_cudnn"](tq, tk, tv, False)], kv_bytes / 3.1e9)
            report(line + " cudnn", ms)
            print(f"{'':44s} ratio {ms / ours:.4f}", flush=True)
