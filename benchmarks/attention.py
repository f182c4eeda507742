"""Attention on the GPU: cupyflash against standard attention and torch SDPA.

FlashAttention's benchmark grid: 16k tokens in total and model dim 2048, so
``batch = 16384 // s`` and ``heads = 2048 // d``. FLOPs: forward ``4 * b * h * s^2 * d``,
halved when causal; backward 2.5 times the forward (``--op bwd``: the gradients from a
saved forward; ``--op fwdbwd``: both, 3.5 times). Every provider is timed in the same run with ``triton.testing.do_bench``
(median; CUDA events; it clears the L2 cache between runs) when Triton is importable,
else with CUDA events around each call (median). Ratios are against torch SDPA's flash
(FlashAttention-2) and cuDNN backends measured here, now.

    python benchmarks/attention.py                     # the whole grid
    python benchmarks/attention.py --quick             # s = 1k, 4k; d = 64, 128
    python benchmarks/attention.py --d 128 --s 4096 --dtype bfloat16 --causal 0
    python benchmarks/attention.py --op bwd --providers cupyflash torch_flash torch_cudnn
    python benchmarks/attention.py --providers cupyflash_wgmma cupyflash_mma torch_cudnn
    python benchmarks/attention.py --rounds 3          # each row's providers 3x, interleaved

Providers ``cupyflash_wgmma`` and ``cupyflash_mma`` are cupyflash with
``CUPYFLASH_FWD_KERNEL`` set to ``wgmma`` (the Hopper kernel, sm_90 only) or ``mma``
while they are timed, ``cupyflash_bwd_wgmma`` and ``cupyflash_bwd_mma`` likewise with
``CUPYFLASH_BWD_KERNEL`` (the backward's kernel); ``cupyflash`` uses whatever the
environment says. The ratio
columns compare each cupyflash provider with torch SDPA's flash and cuDNN backends.

Results are appended as JSON records to ``benchmarks/results/attention_<gpu>.json``:
keys gpu, provider, op, dtype, d, causal, s, b, h, ms, tflops, peak_extra_bytes, rounds
(how many timings ms is the median of), and run (the run's start time: ratios are only
meaningful between records of one run).

Within one run the GPU's speed drifts: on an H100 two columns timing the same kernel
differed by up to 15% (benchmarks/NOTES.md, session 6). ``--rounds N`` times every
provider of a row N times, in a rotated order, and reports the median.
"""

import argparse
import contextlib
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import cupyflash  # noqa: E402
from cupyflash import _measure  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _random(cupy, shape, dtype):
    """Standard normal values of ``dtype`` drawn on the GPU (bfloat16: the top 16 bits of
    float32 draws, which truncates rather than rounds; fine for timing)."""
    x = cupy.random.standard_normal(shape, dtype=np.float32)
    if dtype.name == "bfloat16":
        return (x.view(np.uint32) >> 16).astype(np.uint16).view(dtype)
    return x.astype(dtype)


def make_timer():
    """``timer(fn) -> ms``: Triton's do_bench (median) if present, else CUDA events."""
    try:
        from triton.testing import do_bench

        def timer(fn):
            return do_bench(fn, warmup=25, rep=100, return_mode="median")
        return timer, "triton.testing.do_bench (median, L2 cleared between runs)"
    except Exception:
        import cupy

        def timer(fn):
            return _measure.time_ms(fn, cupy, repeats=20, warmup=3)
        return timer, "CUDA events (median of 20 after 3 warm-ups)"


def torch_providers():
    """{name: fn(q, k, v, causal)} for torch SDPA's flash and cuDNN backends, if present."""
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
        import torch.nn.functional as F
    except Exception:
        return {}, None

    def backend(kind):
        def run(q, k, v, causal):
            with sdpa_kernel([kind]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run
    return ({"torch_flash": backend(SDPBackend.FLASH_ATTENTION),
             "torch_cudnn": backend(SDPBackend.CUDNN_ATTENTION),
             "torch_efficient": backend(SDPBackend.EFFICIENT_ATTENTION)}, torch)


OP_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}  # times the forward's FLOPs

# cupyflash providers: the environment each is timed under (besides the caller's).
CUPYFLASH_PROVIDERS = {
    "cupyflash": {},
    "cupyflash_mma": {"CUPYFLASH_FWD_KERNEL": "mma"},
    "cupyflash_wgmma": {"CUPYFLASH_FWD_KERNEL": "wgmma"},
    "cupyflash_persistent": {"CUPYFLASH_FWD_PERSISTENT": "1"},
    "cupyflash_static": {"CUPYFLASH_FWD_PERSISTENT": "0"},   # one block per tile
    "cupyflash_bwd_mma": {"CUPYFLASH_BWD_KERNEL": "mma"},
    "cupyflash_bwd_wgmma": {"CUPYFLASH_BWD_KERNEL": "wgmma"},
}


@contextlib.contextmanager
def forward_kernel(settings):
    """The environment variables ``settings`` (a dict, or None) inside the block."""
    settings = settings or {}
    old = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def _cupyflash_fn(cupy, op, q, k, v, causal, deterministic):
    """The timed call: the forward, the backward from a saved forward, or both."""
    if op == "fwd":
        return lambda: cupyflash.attention(q, k, v, causal=causal)
    out, lse = cupyflash.attention(q, k, v, causal=causal, return_lse=True)
    dout = _random(cupy, out.shape, out.dtype)
    if op == "bwd":
        return lambda: cupyflash.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                                    deterministic=deterministic)

    def fwdbwd():
        o, m = cupyflash.attention(q, k, v, causal=causal, return_lse=True)
        return cupyflash.attention_backward(dout, q, k, v, o, m, causal=causal,
                                            deterministic=deterministic)
    return fwdbwd


def _torch_fn(torch, sdpa, op, tq, tk, tv, causal):
    """torch SDPA's forward, its backward (autograd from a saved graph) or both."""
    if op == "fwd":
        return lambda: sdpa(tq, tk, tv, causal)
    tq, tk, tv = (t.detach().requires_grad_() for t in (tq, tk, tv))
    out = sdpa(tq, tk, tv, causal)
    dout = torch.randn_like(out)
    if op == "bwd":
        return lambda: torch.autograd.grad(out, (tq, tk, tv), dout, retain_graph=True)
    return lambda: torch.autograd.grad(sdpa(tq, tk, tv, causal), (tq, tk, tv), dout)


def _ratio(row, provider, anchor):
    """row[provider] / row[anchor] in a 7-character column (blank if either is missing)."""
    if provider in row and anchor in row:
        return f"{row[provider] / row[anchor]:7.2f}"
    return " " * 7


def peak_extra(fn, out_bytes):
    """Peak bytes the call allocates beyond its output (CuPy memory pool hook)."""
    import cupy
    with _measure.peak_memory(cupy) as peak:
        r = fn()
        cupy.cuda.get_current_stream().synchronize()
    del r
    return max(peak.peak - out_bytes, 0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--d", type=int, nargs="*", default=None)
    ap.add_argument("--s", type=int, nargs="*", default=None)
    ap.add_argument("--dtype", nargs="*", default=["float16", "bfloat16"])
    ap.add_argument("--causal", type=int, nargs="*", default=[0, 1])
    ap.add_argument("--providers", nargs="*",
                    default=["cupyflash", "standard", "torch_flash", "torch_cudnn"])
    ap.add_argument("--standard-max-s", type=int, default=16384,
                    help="skip standard attention above this length")
    ap.add_argument("--out", default=None, help="JSON file to append records to")
    ap.add_argument("--op", choices=sorted(OP_FLOPS), default="fwd")
    ap.add_argument("--deterministic", action="store_true",
                    help="cupyflash's backward with deterministic=True")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every provider this many times per row, interleaved, and "
                         "report the median")
    args = ap.parse_args(argv)

    import cupy
    ds = args.d or ([64, 128] if args.quick else [64, 128, 256])
    ss = args.s or ([1024, 4096] if args.quick else [512, 1024, 2048, 4096, 8192, 16384])
    timer, timer_desc = make_timer()
    tprov, torch = torch_providers()
    gpu = _measure.gpu_name()
    print(f"GPU: {gpu}; CuPy {cupy.__version__}; NumPy {np.__version__}; "
          f"torch {torch.__version__ if torch else 'absent'}; cupyflash {cupyflash.__version__}; "
          f"Python {platform.python_version()}")
    print(f"op {args.op}{' (deterministic)' if args.deterministic else ''}; timer: "
          f"{timer_desc}. FLOPs = {OP_FLOPS[args.op]} * 4*b*h*s^2*d (halved when causal); "
          f"grid: b = 16384 // s, h = 2048 // d; "
          f"CUPYFLASH_FWD_KERNEL={os.environ.get('CUPYFLASH_FWD_KERNEL', '(unset)')}, "
          f"CUPYFLASH_BWD_KERNEL={os.environ.get('CUPYFLASH_BWD_KERNEL', '(unset)')}")

    records = []
    run = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    ours = [p for p in args.providers if p in CUPYFLASH_PROVIDERS]
    width = max([15] + [len(p) for p in args.providers])
    header = (f"{'dtype':9s} {'d':>4s} {'causal':>6s} {'s':>6s} | "
              + " ".join(f"{p:>{width}s}" for p in args.providers)
              + " | " + " ".join(f"{'/flash':>7s} {'/cudnn':>7s}" for _ in ours)
              + " | extra MiB (" + " / ".join(ours + ["std"]) + ")")
    if len(ours) > 1:
        print("ratio columns, in order: " + ", ".join(ours))
    print(header)
    for dtype_name in args.dtype:
        dt = _dtype(dtype_name)
        for d in ds:
            for causal in map(bool, args.causal):
                for s in ss:
                    b, h = 16384 // s, 2048 // d
                    shape = (b, h, s, d)
                    q, k, v = (_random(cupy, shape, dt) for _ in range(3))
                    flops = _measure.attention_flops(b, h, s, d, causal) * OP_FLOPS[args.op]
                    out_bytes = q.nbytes * (1 if args.op == "fwd" else 3)  # out, or dq dk dv
                    fns = {}  # provider -> the timed call
                    for prov in args.providers:
                        if prov in CUPYFLASH_PROVIDERS:
                            with forward_kernel(CUPYFLASH_PROVIDERS[prov]):
                                fns[prov] = _cupyflash_fn(cupy, args.op, q, k, v, causal,
                                                          args.deterministic)
                        elif args.op != "fwd" and prov == "standard":
                            continue
                        elif prov == "standard":
                            # CuPy has no bfloat16 matmul, so there is no bf16 baseline.
                            if s > args.standard_max_s or dtype_name == "bfloat16":
                                continue
                            fns[prov] = lambda: _measure.standard_attention(q, k, v, causal=causal)  # noqa: E731
                        elif prov in tprov:
                            tq, tk, tv = (torch.as_tensor(x, device="cuda") for x in (q, k, v)) \
                                if dtype_name != "bfloat16" else \
                                (torch.from_dlpack(x.view(np.uint16)).view(torch.bfloat16)
                                 for x in (q, k, v))
                            fns[prov] = _torch_fn(torch, tprov[prov], args.op, tq, tk, tv,
                                                  causal)
                    # --rounds: every provider timed once per round, the order rotated each
                    # round, and the median taken, so that a slow spell of the GPU (clocks
                    # drift within a run) does not fall on one provider only.
                    times, extra = {p: [] for p in fns}, {}
                    order = list(fns)
                    for r in range(args.rounds):
                        for prov in order[r % len(order):] + order[:r % len(order)]:
                            if prov not in times:  # (failed in an earlier round)
                                continue
                            try:
                                with forward_kernel(CUPYFLASH_PROVIDERS.get(prov)):
                                    times[prov].append(timer(fns[prov]))
                                    if r == 0 and (prov in CUPYFLASH_PROVIDERS
                                                   or prov == "standard"):
                                        extra[prov] = peak_extra(fns[prov], out_bytes)
                            except Exception as e:  # e.g. a backend that rejects this shape
                                print(f"  {prov}: {type(e).__name__}: {str(e)[:120]}")
                                del times[prov]
                    row = {}
                    for prov, ms_list in times.items():
                        ms = statistics.median(ms_list)
                        row[prov] = flops / ms / 1e9
                        name = (prov + "_deterministic" if prov in CUPYFLASH_PROVIDERS
                                and args.deterministic and args.op != "fwd" else prov)
                        records.append(dict(gpu=gpu, run=run, provider=name, op=args.op, dtype=dtype_name,
                                            d=d, causal=causal, s=s, b=b, h=h, ms=ms,
                                            tflops=row[prov], peak_extra_bytes=extra.get(prov),
                                            rounds=len(ms_list)))
                    ratios = " ".join(f"{_ratio(row, p, 'torch_flash')} "
                                      f"{_ratio(row, p, 'torch_cudnn')}" for p in ours)
                    mem = " / ".join(f"{extra[p] / 2**20:.1f}" if extra.get(p) is not None else "-"
                                     for p in ours + ["standard"])
                    print(f"{dtype_name:9s} {d:4d} {str(causal):>6s} {s:6d} | "
                          + " ".join(f"{row[p]:{width}.1f}" if p in row else f"{'-':>{width}s}"
                                     for p in args.providers)
                          + f" | {ratios} | {mem}", flush=True)
                    del q, k, v
                    cupy.get_default_memory_pool().free_all_blocks()

    out = pathlib.Path(args.out) if args.out else RESULTS / (
        "attention_" + "".join(c if c.isalnum() else "_" for c in gpu) + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(old + records, indent=1))
    print(f"wrote {len(records)} records to {out}")


if __name__ == "__main__":
    main()
