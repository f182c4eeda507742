"""KV-cache decoding on the GPU: cupyflash.attention_decode against a device copy and
torch SDPA.

The issue's grid: batch 1, 4, 16, 64; one new query token; H = 8 query heads over Hk = 8
kv heads (and a grouped-query line, H = 32 over Hk = 8); head dim 128; caches of 8k, 32k
and 128k keys; float16 and bfloat16. The cache is FlashAttention's layout
``(B, L, Hk, D)``; torch gets the ``(B, Hk, L, D)`` view of the same memory (its flash
backend's own layout underneath, so no copy), with ``enable_gqa`` for grouped heads.

What is timed, and how:

* **kernel time** (the bar): the GPU time per call of many calls enqueued back to back
  behind a spinning kernel, so that neither the host's launch cost nor its Python code
  shows (the GPU works through a full queue). cupyflash is called through
  ``_cupy_decode.attention_decode``, the launch after validation (one split kernel, which
  merges its splits itself; "2-launch" times the same call with the separate combine
  kernel, "no clust" with flash_decode where the call runs flash_decode_cluster); the public call adds the validation's host synchronisation (it reads
  ``cache_seqlens`` to the host) and ~50 us of Python, reported separately as "api".
  Calls rotate over enough copies of the cache to exceed four times the L2 cache, so
  every call reads its keys and values from DRAM, and over at least ``--places`` (4)
  copies where half the free memory holds them: where a cache lies in memory moves one
  kernel's time by up to ~1.5% (session 23: batch 16, 32k, the same cache allocated at six
  places read in 678-688 us by flash_decode, 685-687 by cuDNN, each place the same in
  every round), so a line timed on one allocation is one draw of that. Median of
  ``--reps`` repetitions of a queue of ``--calls`` calls (fewer for long calls: ~20 ms of
  work per queue).
* **bandwidth**: the K and V bytes the call must read, ``B * Hk * L * 2 * D * itemsize``,
  over the kernel time, against a device-to-device copy of 1 GiB (read + write bytes over
  its time) measured in the same run, and as a ratio to torch's best SDPA backend
  (flash, efficient, cuDNN, math: each that accepts the problem) timed the same way.
  The math backend is skipped where it would need more than ``MATH_MAX_BYTES``, the
  efficient one with grouped-query heads (it rejects them); the full grid takes ~1 min.

    python benchmarks/decode.py                 # the whole grid
    python benchmarks/decode.py --quick         # batch 1 and 16, 8k and 32k
    python benchmarks/decode.py --batch 1 --length 131072 --dtype bfloat16

Records are appended as JSON to ``benchmarks/results/decode_<gpu>.json``: gpu, run,
provider, dtype, b, h, hk, d, l, ms, kv_gbs, copy_gbs, frac_of_copy, and for cupyflash
num_splits and api_ms. Runs to completion without torch (cupyflash and the copy only).
"""

import argparse
import json
import math
import pathlib
import platform
import statistics
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import cupyflash  # noqa: E402
from cupyflash import _cupy_decode, _measure  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# A kernel that spins for a given number of nanoseconds: the GPU is busy while the host
# enqueues the calls to time, which then run back to back.
SPIN_SOURCE = r'''
extern "C" __global__ void spin(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
'''


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _random(cupy, shape, dtype):
    """Standard normal values of ``dtype`` drawn on the GPU (bfloat16: the top 16 bits of
    float32 draws), one batch element at a time (a 128k cache in float32 would not fit)."""
    out = cupy.empty(shape, dtype=dtype)
    for b in range(shape[0]):
        x = cupy.random.standard_normal(shape[1:], dtype=np.float32)
        if dtype.name == "bfloat16":
            out[b] = (x.view(np.uint32) >> 16).astype(np.uint16).view(dtype)
        else:
            out[b] = x.astype(dtype)
    return out


class QueueTimer:
    """GPU time per call of calls enqueued back to back behind a spinning kernel, on
    CuPy's current stream (torch is pointed at the same stream)."""

    def __init__(self, cupy, calls, reps, warm_ms=50.0):
        self.cupy, self.calls, self.reps, self.warm_ms = cupy, calls, reps, warm_ms
        self.spin = cupy.RawKernel(SPIN_SOURCE, "spin")

    def __call__(self, fns, expected_ms=None):
        """Median over reps of (time of ``calls`` calls) / calls; ``fns`` are rotated.

        ``expected_ms`` (a guess of one call's time) shortens the queue of long calls to
        what keeps ~20 ms of GPU work per queue (at least 4 calls, at most ``calls``): a
        queue of 11 ms calls needs no 20 of them to hide the host."""
        cupy = self.cupy
        calls = self.calls
        if expected_ms:
            calls = max(4, min(calls, int(20.0 / expected_ms)))
        stream = cupy.cuda.get_current_stream()
        for fn in fns:                                       # warm-up: compiles, caches
            fn()
        stream.synchronize()
        # then at least warm_ms of these calls, as triton's do_bench warms up: the first
        # provider timed right after a long case (batch 64, 128k) read ~12% slow on the
        # batch-1 8k line, whichever dtype came first, while the providers timed after it
        # on the same line did not (session 21, R4 and R5)
        warm_end = time.perf_counter() + self.warm_ms * 1e-3
        while time.perf_counter() < warm_end:
            for fn in fns:
                fn()
            stream.synchronize()
        t0 = time.perf_counter()                             # the host's enqueue time
        for i in range(calls):
            fns[i % len(fns)]()
        host_s = time.perf_counter() - t0
        stream.synchronize()
        # The spin outlasts 3x the warm enqueue and the queue's expected GPU time: the
        # host's enqueueing, which at times took 5x as long as while warming up (the
        # first H100 run), then never starves the GPU.
        spin_s = max(2e-3, 3 * host_s, 1.5 * calls * (expected_ms or 0.0) * 1e-3)
        spin_ns = int(spin_s * 1e9)
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        times = []
        tries = 0
        while len(times) < self.reps:
            tries += 1
            self.spin((1,), (1,), (np.uint64(spin_ns),))
            start.record()
            t0 = time.perf_counter()
            for i in range(calls):
                fns[i % len(fns)]()
            enqueue_s = time.perf_counter() - t0
            end.record()
            end.synchronize()
            if enqueue_s * 1e9 > spin_ns:
                # the GPU may have waited for the host: time the queue again, at most
                # `reps` extra times, then keep what came
                print(f"  warning: enqueueing took {enqueue_s * 1e3:.2f} ms, longer than "
                      f"the spin ({spin_ns / 1e6:.2f} ms): "
                      f"{'timed again' if tries < 2 * self.reps else 'kept'}", flush=True)
                if tries < 2 * self.reps:
                    continue
            times.append(cupy.cuda.get_elapsed_time(start, end) / calls)
        return statistics.median(times)


def api_time_ms(cupy, fn, reps):
    """Median CUDA-event time of one public call (host work and its synchronisation show)."""
    fn()
    cupy.cuda.get_current_stream().synchronize()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def copy_bandwidth(cupy, timer):
    """GB/s of a device-to-device copy of 1 GiB, read + write bytes."""
    x = cupy.empty(1 << 28, dtype=np.float32)
    y = cupy.empty_like(x)
    ms = timer([lambda: y.__setitem__(Ellipsis, x)])
    return 2 * (1 << 30) / ms / 1e6


# The math backend materialises K and V per query head in float32 and the scores; above
# this many bytes it is skipped (at 128k keys and batch 64 it asked for 32 GiB and failed,
# slowly). It is never the fastest backend for decoding.
MATH_MAX_BYTES = 2 << 30


def torch_can_run(name, B, H, Hk, L, D):
    """Whether torch backend ``name`` is worth a try on one problem: the math backend
    only while its float32 copies of K and V (expanded to H heads) stay below
    MATH_MAX_BYTES; the efficient backend not with grouped-query heads (it rejects
    them, through warnings, in every torch tried)."""
    if name == "torch_math":
        return 2 * B * H * L * D * 4 <= MATH_MAX_BYTES
    if name == "torch_efficient":
        return H == Hk
    return True


def torch_backends(stream):
    """``(torch, {name: sdpa(q, k, v, gqa)})`` for torch SDPA's backends, on CuPy's
    stream; ``(None, {})`` without torch. torch's warnings (a backend explaining why it
    declines a problem) are silenced: a refusal is reported by its exception."""
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception:
        return None, {}
    tstream = torch.cuda.ExternalStream(stream.ptr)

    def backend(kind):
        def run(q, k, v, gqa):
            with torch.cuda.stream(tstream), sdpa_kernel([kind]), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                extra = {"enable_gqa": True} if gqa else {}
                return F.scaled_dot_product_attention(q, k, v, **extra)
        return run
    return torch, {"torch_flash": backend(SDPBackend.FLASH_ATTENTION),
                   "torch_efficient": backend(SDPBackend.EFFICIENT_ATTENTION),
                   "torch_cudnn": backend(SDPBackend.CUDNN_ATTENTION),
                   "torch_math": backend(SDPBackend.MATH)}


def as_torch(torch, x):
    """A torch view of a CuPy array (bfloat16 through its bits)."""
    if x.dtype.name == "bfloat16":
        return torch.from_dlpack(x.view(np.uint16)).view(torch.bfloat16)
    return torch.from_dlpack(x)


def lab_session(cupy):
    """What the A/B lab scripts share: ``(timer, stream, torch, backends, copy_gbs)`` with
    a non-blocking stream made current and the GPU and its copy bandwidth printed."""
    timer = QueueTimer(cupy, 20, 5)
    stream = cupy.cuda.Stream(non_blocking=True)
    stream.use()
    torch, backends = torch_backends(stream)
    copy_gbs = copy_bandwidth(cupy, timer)
    print(f"GPU {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()} "
          f"copy {copy_gbs:.0f} GB/s", flush=True)
    return timer, stream, torch, backends, copy_gbs


def rotating_caches(cupy, B, L, H, Hk, D, dt):
    """``(kv_bytes, q, caches, seqlens)`` for a lab A/B: a random q, enough random (K, V)
    caches to rotate over four times 50 MiB of L2, and every length L."""
    kv_bytes = 2 * B * L * Hk * D * dt.itemsize
    copies = max(1, -(-4 * 50 * 2**20 // kv_bytes))
    q = _random(cupy, (B, 1, H, D), dt)
    caches = [(_random(cupy, (B, L, Hk, D), dt), _random(cupy, (B, L, Hk, D), dt))
              for _ in range(copies)]
    return kv_bytes, q, caches, cupy.full((B,), L, dtype=np.int32)


def bench_case(cupy, torch, backends, timer, gpu, run, copy_gbs, dtype_name, dt, B, H, Hk, L,
               D, copies, kv_bytes, reps, compare_combine):
    """Time one problem; print its line and return its records."""
    q = _random(cupy, (B, 1, H, D), dt)
    caches = [(_random(cupy, (B, L, Hk, D), dt), _random(cupy, (B, L, Hk, D), dt))
              for _ in range(copies)]
    seqlens = cupy.full((B,), L, dtype=np.int32)
    scale = 1.0 / math.sqrt(D)

    def launch(k, v):
        return lambda: _cupy_decode.attention_decode(
            q, k, v, seqlens, None, None, None, num_splits=None,
            causal=False, scale=scale, max_keys=L, min_keys=L)
    expected_ms = kv_bytes / 2.5e9            # at 2.5 TB/s: sizes the timed queues
    ms = timer([launch(k, v) for k, v in caches], expected_ms)
    api_ms = api_time_ms(cupy, lambda: cupyflash.attention_decode(
        q, caches[0][0], caches[0][1], seqlens), reps)
    cfg = _cupy_decode.decode_config(D, D, dtype_name, 90, H // Hk)
    device_id = cupy.cuda.Device().id
    cc = _cupy_decode._compute_capability(device_id)
    arch = _cupy_decode._kernels.arch_for(cc)
    clustered = _cupy_decode.uses_cluster(cc, dtype_name, D, D, H // Hk, B * Hk, False, True,
                                          None, _cupy_decode.num_sms(device_id))
    splits = _cupy_decode.CLUSTER_SIZE if clustered else _cupy_decode.launched_splits(
        None, cfg, B * Hk * -(-(H // Hk) // cfg.rows), L, 2 * D * dt.itemsize,
        _cupy_decode.num_sms(device_id),
        _cupy_decode.resident_blocks(device_id, cfg.name_expression, arch, cfg.smem_bytes,
                                     cfg.num_threads))
    kernel_name = (_cupy_decode.cluster_name(dtype_name, D) if clustered
                   else cfg.name_expression)
    no_cluster_ms = None   # flash_decode instead of flash_decode_cluster (same run)
    if clustered and compare_combine:
        _cupy_decode.CLUSTER_DECODE = False
        try:
            no_cluster_ms = timer([launch(k, v) for k, v in caches], expected_ms)
        finally:
            _cupy_decode.CLUSTER_DECODE = True
    two_launch_ms = None   # the splits merged by flash_decode_combine, a second launch
    if splits > 1 and compare_combine and not clustered:
        _cupy_decode.FUSE_COMBINE = False
        try:
            two_launch_ms = timer([launch(k, v) for k, v in caches], expected_ms)
        finally:
            _cupy_decode.FUSE_COMBINE = True
    mma_ms = None          # one row per kv head on the tensor-core kernel
    if compare_combine and H == Hk and dtype_name in ("float16", "bfloat16") and not clustered:
        _cupy_decode.MMA_ONE_ROW = True
        try:
            mma_ms = timer([launch(k, v) for k, v in caches], expected_ms)
        finally:
            _cupy_decode.MMA_ONE_ROW = False
    gbs = kv_bytes / ms / 1e6
    common = dict(gpu=gpu, run=run, dtype=dtype_name, b=B, h=H, hk=Hk, d=D,
                  l=L, copy_gbs=copy_gbs)
    records = [dict(common, provider="cupyflash", ms=ms, kv_gbs=gbs,
                    frac_of_copy=gbs / copy_gbs, num_splits=splits, api_ms=api_ms,
                    kernel=kernel_name, two_launch_ms=two_launch_ms,
                    mma_one_row_ms=mma_ms, no_cluster_ms=no_cluster_ms)]
    best = None
    ours = None
    for name, sdpa in backends.items():
        if not torch_can_run(name, B, H, Hk, L, D):
            continue
        tq = as_torch(torch, q).transpose(1, 2)        # (B, H, 1, D)
        views = [(as_torch(torch, k).transpose(1, 2),  # (B, Hk, L, D)
                  as_torch(torch, v).transpose(1, 2)) for k, v in caches]
        try:
            ref = sdpa(tq, *views[0], H != Hk)
            t_ms = timer([(lambda k=k, v=v: sdpa(tq, k, v, H != Hk)) for k, v in views],
                         expected_ms)
        except Exception as e:  # a backend that rejects the problem
            print(f"  {name}: {type(e).__name__}: {str(e)[:100]}")
            continue
        if ours is None:  # a sanity check of the values while here
            ours = cupyflash.attention_decode(q, caches[0][0], caches[0][1], seqlens)
            diff = float(abs(as_torch(torch, ours).float()
                             - ref.transpose(1, 2).float()).max())
            if diff > 3e-2:
                print(f"  warning: cupyflash and {name} differ by {diff:.3g}")
        t_gbs = kv_bytes / t_ms / 1e6
        records.append(dict(common, provider=name, ms=t_ms, kv_gbs=t_gbs,
                            frac_of_copy=t_gbs / copy_gbs))
        if best is None or t_ms < best[1]:
            best = (name, t_ms)
    torch_cells = (f"{best[0]:>16s} {best[1]:8.4f} {best[1] / ms:5.2f}"
                   if best else f"{'-':>16s} {'-':>8s} {'-':>5s}")
    two = f"{two_launch_ms:8.4f}" if two_launch_ms else f"{'-':>8s}"
    plain = f"{no_cluster_ms:8.4f}" if no_cluster_ms else f"{'-':>8s}"
    mma = f"{mma_ms:8.4f}" if mma_ms else f"{'-':>8s}"
    print(f"{dtype_name:9s} {B:3d} {H:2d}/{Hk:<2d} {L:7d} | {splits:6d} "
          f"{ms:8.4f} {gbs:6.0f} {gbs / copy_gbs:5.2f} {api_ms:7.3f} {two} {mma} {plain} | "
          f"{torch_cells}", flush=True)
    return records


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, nargs="*", default=None)
    ap.add_argument("--length", type=int, nargs="*", default=None)
    ap.add_argument("--dtype", nargs="*", default=["float16", "bfloat16"])
    ap.add_argument("--heads", nargs="*", default=["8/8", "32/8"],
                    help="H/Hk pairs (query heads / kv heads)")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--calls", type=int, default=20, help="calls per timed queue")
    ap.add_argument("--reps", type=int, default=5, help="timed queues (median)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-compare-combine", action="store_true",
                    help="do not also time the splits merged by a second launch, nor one "
                         "row per kv head on the tensor-core kernel")
    ap.add_argument("--places", type=int, default=4,
                    help="separately allocated caches to rotate over at least (where half "
                         "the free memory holds them): the time is then their mean")
    ap.add_argument("--out", default=None, help="JSON file to append records to")
    args = ap.parse_args(argv)

    import cupy
    wall0 = time.perf_counter()
    batches = args.batch or ([1, 16] if args.quick else [1, 4, 16, 64])
    lengths = args.length or ([8192, 32768] if args.quick else [8192, 32768, 131072])
    heads = [tuple(int(x) for x in pair.split("/")) for pair in args.heads]
    D = args.d
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        timer = QueueTimer(cupy, args.calls, args.reps)
        torch, backends = (None, {}) if args.no_torch else torch_backends(stream)
        gpu = _measure.gpu_name()
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        l2_bytes = int(props.get("l2CacheSize", 50 << 20))
        copy_gbs = copy_bandwidth(cupy, timer)
        print(f"GPU: {gpu}; CuPy {cupy.__version__}; torch "
              f"{torch.__version__ if torch else 'absent'}; cupyflash {cupyflash.__version__}; "
              f"Python {platform.python_version()}")
        print(f"device-to-device copy of 1 GiB: {copy_gbs:.0f} GB/s (read + write); L2 "
              f"{l2_bytes >> 20} MiB; timer: {args.calls} calls queued behind a spin kernel, "
              f"median of {args.reps}")
        print(f"{'dtype':9s} {'B':>3s} {'H/Hk':>5s} {'L':>7s} | {'splits':>6s} {'ms':>8s} "
              f"{'GB/s':>6s} {'copy':>5s} {'api ms':>7s} {'2-launch':>8s} {'mma 1row':>8s} {'no clust':>8s} | "
              f"{'torch best':>16s} {'ms':>8s} "
              f"{'ratio':>5s}")
        records = []
        run = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        for dtype_name in args.dtype:
            dt = _dtype(dtype_name)
            for H, Hk in heads:
                for L in lengths:
                    for B in batches:
                        kv_bytes = 2 * B * L * Hk * D * dt.itemsize
                        free, _ = cupy.cuda.runtime.memGetInfo()
                        copies = max(1, math.ceil(4 * l2_bytes / kv_bytes),
                                     min(args.places, int(0.5 * free // kv_bytes)))
                        if copies * kv_bytes > 0.8 * free:
                            print(f"{dtype_name:9s} {B:3d} {H:2d}/{Hk:<2d} {L:7d} | skipped: "
                                  f"{copies * kv_bytes / 2**30:.1f} GiB of cache needed")
                            continue
                        records += bench_case(cupy, torch, backends, timer, gpu, run, copy_gbs,
                                              dtype_name, dt, B, H, Hk, L, D, copies, kv_bytes,
                                              args.reps, not args.no_compare_combine)
                        cupy.get_default_memory_pool().free_all_blocks()
                        if torch is not None:
                            torch.cuda.empty_cache()

    out = pathlib.Path(args.out) if args.out else RESULTS / (
        "decode_" + "".join(c if c.isalnum() else "_" for c in gpu) + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(old + records, indent=1))
    print(f"wrote {len(records)} records to {out} ({time.perf_counter() - wall0:.0f} s)")
    print("ratio = torch's best time / cupyflash's time (> 1: cupyflash is faster); copy = "
          "fraction of the copy's bandwidth; api ms = one public call, host work included; "
          "2-launch = kernel time with the splits merged by flash_decode_combine instead of "
          "the split kernel's last block; mma 1row = one query row per kv head on the "
          "tensor-core kernel instead of the SIMT one (H = Hk); no clust = flash_decode "
          "instead of flash_decode_cluster (where the call runs the cluster kernel)")


if __name__ == "__main__":
    main()
