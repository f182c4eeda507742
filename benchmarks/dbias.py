"""The cost of return_dbias in the GPU backward (bf16, d = 128, a float32 bias).

For s = 1k and 4k (b = 16384 // s, h = 16) and a bias of shape (B, H, s, s) (one score
per dbias element: plain stores), (1, 1, s, s) and (B, 1, 1, s) (summed: atomic adds,
or with deterministic=True an array of the full shape summed by CuPy), times
attention_backward with and without return_dbias (benchmarks/NOTES.md, session 7).

    python benchmarks/dbias.py
"""
import sys, pathlib
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import numpy as np, cupy
import cupyflash
from attention import _dtype, _random, make_timer

timer, how = make_timer()
print("timer:", how)
dt = _dtype("bfloat16")
for s in (1024, 4096):
    b, h, d = 16384 // s, 16, 128
    q, k, v, do = (_random(cupy, (b, h, s, d), dt) for _ in range(4))
    for name, shape in (("(B,H,s,s)", (b, h, s, s)), ("(1,1,s,s)", (1, 1, s, s)),
                        ("(B,1,1,s)", (b, 1, 1, s))):
        if np.prod(shape) * 4 > 2**33:
            continue
        bias = cupy.asarray(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
        out, lse = cupyflash.attention(q, k, v, bias=bias, return_lse=True)
        for det in (False, True):
            row = []
            for rd in (False, True):
                ms = timer(lambda: cupyflash.attention_backward(do, q, k, v, out, lse, bias=bias,
                                                                return_dbias=rd, deterministic=det))
                row.append(ms)
            print(f"s={s} bias {name:10s} deterministic={det!s:5s}: backward {row[0]:8.3f} ms, "
                  f"with dbias {row[1]:8.3f} ms ({row[1] / row[0]:.2f}x)", flush=True)
        del bias, out, lse
