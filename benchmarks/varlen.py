"""Packed variable-length attention on the GPU against a dense batch of the same tokens.

Issue 6's bar, on an H100: ``cupyflash.attention_varlen`` over sequences of random
lengths 1..4k runs at >= 0.9x the speed of the same total tokens in one dense batch.

Lengths are drawn uniformly from 1..max_len until ``--tokens`` are packed (q, k, v of
shape ``(total, H, D)``, H = 2048 // D). Speed is FLOP/s with FlashAttention's count per
sequence, ``4 * H * L_i^2 * D`` (halved when causal), so that short and long sequences
weigh what they cost. The dense batch is ``(total // s, H, s, D)`` with s the mean
length, in the (B, L, H, D) layout the packed arrays have. Each call is timed whole
(host work included: attention_varlen reads its offsets on the host and, up to d = 128
for fp16/bf16, launches one kernel for all sequences), as a user sees it.

    python benchmarks/varlen.py [--tokens 65536] [--max-len 4096] [--d 128] [--rounds 3]

``--rounds`` repeats every line, the calls of one line timed back to back, so that the
card's power state (benchmarks/NOTES.md, session 7) weighs on both sides of a ratio
alike. Columns after the first ratio (offsets on the device), each as a ratio to the dense
batch: the public call with the offsets on the host (NumPy; nothing waits for the GPU),
the launch alone, after validation ("kernel": ``_cupy_backend.attention_varlen_forward``,
without the validation's read of the offsets to the host, which waits for the GPU to
drain the queue), and that launch with ``CUPYFLASH_FWD_PERSISTENT=0`` (the Hopper packed
kernel one block per tile instead of persistent over its tile list); the dense batch
keeps the default. Last, the host time of one public call with the GPU idle
before it (median of 20), with device and with host offsets.
"""

import argparse
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import cupyflash  # noqa: E402
from cupyflash import _cupy_backend, _measure  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from attention import _dtype, _random, make_timer  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--d", type=int, nargs="*", default=[64, 128])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)

    import cupy
    timer, how = make_timer()
    print(f"GPU: {_measure.gpu_name()}; timer: {how}")
    rng = np.random.default_rng(0)
    lengths = []
    while sum(lengths) < args.tokens:
        lengths.append(int(rng.integers(1, args.max_len + 1)))
    lengths = np.array(lengths)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    total = int(cu[-1])
    s = int(round(lengths.mean()))
    print(f"{len(lengths)} sequences, lengths 1..{args.max_len} (mean {s}), {total} tokens")
    print(f"{'dtype':9s} {'d':>4s} {'causal':>6s} | {'varlen ms':>9s} {'TFLOP/s':>8s} | "
          f"{'dense ms':>9s} {'TFLOP/s':>8s} (b x s) | ratio | host-offsets ms ratio | "
          f"kernel ms ratio | 1-block kernel ms ratio | host us (device / host offsets)")
    dtype = _dtype(args.dtype)
    cu_gpu = cupy.asarray(cu)
    for d in args.d:
        h = 2048 // d
        q, k, v = (_random(cupy, (total, h, d), dtype) for _ in range(3))
        out = cupy.empty_like(q)
        lse = cupy.empty((h, total), dtype=np.float32)
        b = total // s
        dq, dk, dv = (x[: b * s].reshape(b, s, h, d).transpose(0, 2, 1, 3) for x in (q, k, v))
        for causal in (False, True):
            half = 0.5 if causal else 1.0
            flops_varlen = half * 4 * h * d * float((lengths.astype(np.float64) ** 2).sum())
            flops_dense = half * 4 * b * h * s * s * d

            def varlen():
                return cupyflash.attention_varlen(q, k, v, cu_gpu, cu_gpu, causal=causal)

            def varlen_host():  # offsets from the host, as a data loader has them
                return cupyflash.attention_varlen(q, k, v, cu, cu, causal=causal)

            def kernel():  # the launch alone, after attention_varlen's validation
                return _cupy_backend.attention_varlen_forward(
                    q, k, v, cu_gpu, cu_gpu, int(lengths.max()), int(lengths.max()), causal,
                    d ** -0.5, out, lse, [lengths, lengths])

            def one_block(fn):  # fn with CUPYFLASH_FWD_PERSISTENT=0
                saved = os.environ.get("CUPYFLASH_FWD_PERSISTENT")
                os.environ["CUPYFLASH_FWD_PERSISTENT"] = "0"
                try:
                    return timer(fn)
                finally:
                    if saved is None:
                        del os.environ["CUPYFLASH_FWD_PERSISTENT"]
                    else:
                        os.environ["CUPYFLASH_FWD_PERSISTENT"] = saved

            for _ in range(args.rounds):
                t_var = timer(varlen)
                t_host = timer(varlen_host)
                host_us = [host_time(fn) for fn in (varlen, varlen_host)]
                t_dense = timer(lambda: cupyflash.attention(dq, dk, dv, causal=causal))
                t_kernel = timer(kernel)
                t_one = one_block(kernel)
                tf_dense = flops_dense / t_dense / 1e9

                def ratio(t):
                    return flops_varlen / t / 1e9 / tf_dense
                print(f"{args.dtype:9s} {d:4d} {str(causal):>6s} | {t_var:9.3f} "
                      f"{flops_varlen / t_var / 1e9:8.1f} | {t_dense:9.3f} {tf_dense:8.1f} "
                      f"({b} x {s}) | {ratio(t_var):5.2f} | {t_host:7.3f} {ratio(t_host):5.2f} | "
                      f"{t_kernel:7.3f} {ratio(t_kernel):5.2f} | {t_one:7.3f} "
                      f"{ratio(t_one):5.2f} | {host_us[0]:6.0f} / {host_us[1]:4.0f}", flush=True)


def host_time(fn, calls=20):
    """Median host time of one call in microseconds, the GPU idle before each (from the
    call until it returns: validation, preparation, the offsets' read and the launch)."""
    import time

    import cupy
    times = []
    for _ in range(calls):
        cupy.cuda.get_current_stream().synchronize()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    cupy.cuda.get_current_stream().synchronize()
    return 1e6 * float(np.median(times))


if __name__ == "__main__":
    main()
