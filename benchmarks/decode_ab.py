"""Decode A/B in one run (session 14): programmatic dependent launch on and off
(CUPYFLASH_PDL) times units per block (units_per_block's choice, or 1), with torch's
cuDNN and flash backends timed alike, two rounds each, bf16, head dim 128, 8/8 heads,
benchmarks/decode.py's queue timer. Times per call in us, round 0 / round 1.

    python3 benchmarks/decode_ab.py                 # batch 1..64, 8k..128k
    python3 benchmarks/decode_ab.py 64x8192 16x32768
"""
import os, sys, pathlib
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import cupy
import decode as bench
from cupyflash import _cupy_decode

timer, stream, torch, backends, copy_gbs = bench.lab_session(cupy)
dt = bench._dtype("bfloat16")
cases = [(1, 8192), (4, 8192), (16, 8192), (16, 32768), (32, 8192), (64, 8192), (64, 32768), (64, 131072)]
if len(sys.argv) > 1:
    cases = [tuple(int(x) for x in c.split("x")) for c in sys.argv[1:]]
H = Hk = 8; D = 128
for B, L in cases:
    kv_bytes, q, caches, seqlens = bench.rotating_caches(cupy, B, L, H, Hk, D, dt)
    def launch(k, v):
        return lambda: _cupy_decode.attention_decode(q, k, v, seqlens, None, None, None, num_splits=None, causal=False, scale=D ** -0.5, max_keys=L, min_keys=L)
    expected = kv_bytes / 2.5e9
    units = B * Hk * _cupy_decode.launched_splits(None, _cupy_decode.decode_config(D, D, "bfloat16", 90, 1), B * Hk, L, 512, _cupy_decode.num_sms(0), 4)
    auto_k = _cupy_decode.units_per_block(units, _cupy_decode.num_sms(0))
    configs = [("pdl1", "1", None), ("pdl0", "0", None)]
    if auto_k > 1:
        configs += [("pdl1_k1", "1", 1), ("pdl0_k1", "0", 1)]
    tq = bench.as_torch(torch, q).transpose(1, 2)
    views = [(bench.as_torch(torch, k).transpose(1, 2), bench.as_torch(torch, v).transpose(1, 2)) for k, v in caches]
    res = {}
    for rnd in range(2):
        for name, pdl, k in configs:
            os.environ["CUPYFLASH_PDL"] = pdl
            _cupy_decode.UNITS_PER_BLOCK = k
            res.setdefault(name, []).append(timer([launch(k_, v_) for k_, v_ in caches], expected))
        os.environ["CUPYFLASH_PDL"] = "1"; _cupy_decode.UNITS_PER_BLOCK = None
        for tname in ("torch_cudnn", "torch_flash"):
            sd = backends[tname]
            res.setdefault(tname, []).append(timer([(lambda k=k, v=v: sd(tq, k, v, False)) for k, v in views], expected))
    best_t = min(min(res["torch_cudnn"]), min(res["torch_flash"]))
    line = f"B={B:3d} L={L:6d} units={units} auto_k={auto_k} |"
    for name, ts in res.items():
        line += f" {name} " + "/".join(f"{t*1e3:.2f}" for t in ts) + "us"
    ours = min(res["pdl1"])
    line += f" | pdl1 best {ours*1e3:.2f}us {kv_bytes/ours/1e6:.0f}GB/s copy {kv_bytes/ours/1e6/copy_gbs:.3f} x_best_torch {best_t/ours:.3f}"
    print(line, flush=True)
    del caches, views, q
    cupy.get_default_memory_pool().free_all_blocks()
