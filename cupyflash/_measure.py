"""Measuring tools for ``python -m cupyflash`` and the scripts in ``benchmarks/``.

* :func:`time_ms`: median time of a call, through CUDA events on CuPy's current stream
  for CuPy and ``time.perf_counter`` for NumPy, after warm-up runs;
* :func:`peak_memory`: the peak of memory allocated above the level at entry, through
  ``tracemalloc`` for NumPy (NumPy reports its array buffers to it) and a
  ``cupy.cuda.MemoryHook`` on the memory pool for CuPy;
* :func:`standard_attention`: the baseline FlashAttention replaces (matmul, safe softmax,
  matmul, with the whole ``(..., Lq, Lk)`` matrix), in the inputs' array module and dtype;
* :func:`attention_flops`, :func:`find_gpu` and :func:`machine_info`.

Private: the names may change with the benchmarks that use them.
"""

import contextlib
import math
import os
import platform
import statistics
import time
import tracemalloc

import numpy as np

# ----------------------------------------------------------------------------------------
# array modules
# ----------------------------------------------------------------------------------------


def array_module(x):
    """``cupy`` for a CuPy array, else ``numpy`` (CuPy is imported only when needed)."""
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy
        return cupy
    return np


def to_host(x):
    """A NumPy array holding the values of a NumPy or CuPy array."""
    return x.get() if hasattr(x, "get") else np.asarray(x)


def find_gpu():
    """Return ``(cupy, description)`` if CuPy imports and sees a CUDA device, else
    ``(None, reason)``; never raises."""
    try:
        import cupy
    except Exception as e:  # not installed, or a broken CUDA install
        return None, f"CuPy is not importable ({type(e).__name__}: {e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, or a driver older than CuPy's CUDA
        return None, f"CuPy {cupy.__version__} sees no CUDA device ({e})"
    if n == 0:
        return None, f"CuPy {cupy.__version__} sees no CUDA device"
    return cupy, f"{gpu_name()} (CuPy {cupy.__version__})"


def gpu_name(device_id=None):
    import cupy
    device_id = cupy.cuda.Device().id if device_id is None else device_id
    name = cupy.cuda.runtime.getDeviceProperties(device_id)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


# ----------------------------------------------------------------------------------------
# FLOPs and the baseline
# ----------------------------------------------------------------------------------------


def attention_flops(b, h, s_q, d, causal=False, s_k=None):
    """Forward FLOPs by FlashAttention's convention: ``4 * b * h * s_q * s_k * d``
    (two matrix products of ``2 * s_q * s_k * d`` each), halved when causal."""
    s_k = s_q if s_k is None else s_k
    flops = 4 * b * h * s_q * s_k * d
    return flops // 2 if causal else flops


def standard_attention(q, k, v, *, causal=False, scale=None, return_lse=False):
    """Standard attention in the inputs' array module and dtype: ``S = q k^T * scale``
    as one ``(..., Lq, Lk)`` array, safe softmax in place, ``P v``.

    This is what FlashAttention replaces: one score matrix of ``Lq * Lk`` elements per
    batch element is written and read back. Done in place, so its peak extra memory is
    that matrix plus the output (a fair baseline, not a wasteful one). A row that sees
    no key gives NaN here (unlike :func:`cupyflash.attention`).
    """
    xp = array_module(q)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    # S = Q K^T: (..., Lq, Lk). NumPy's matmul of ml_dtypes.bfloat16 gives float32: cast
    # back (a no-op for every other dtype).
    s = xp.matmul(q, xp.swapaxes(k, -1, -2)).astype(q.dtype, copy=False)
    s *= s.dtype.type(scale)
    if causal:  # bottom-right aligned: query i sees key j iff j <= i + (Lk - Lq)
        Lq, Lk = s.shape[-2:]
        hidden = xp.arange(Lk)[None, :] > xp.arange(Lq)[:, None] + (Lk - Lq)
        xp.copyto(s, s.dtype.type(-np.inf), where=hidden)     # in place, unlike s[..., hidden]
    m = s.max(axis=-1, keepdims=True)                         # row max: safe softmax
    s -= m
    xp.exp(s, out=s)                                          # P~ = exp(S - m)
    l = s.sum(axis=-1, keepdims=True)                         # row sum
    s /= l                                                    # P = P~ / l
    out = xp.matmul(s, v).astype(q.dtype, copy=False)
    if return_lse:
        return out, (m + xp.log(l))[..., 0]
    return out


# ----------------------------------------------------------------------------------------
# time
# ----------------------------------------------------------------------------------------


def time_ms(fn, xp=np, *, repeats=5, warmup=1):
    """Median time of ``fn()`` in milliseconds over ``repeats`` runs after ``warmup``.

    CuPy: each run is bracketed by CUDA events on the current stream (GPU time; the
    launches are asynchronous). NumPy: ``time.perf_counter`` around each call.
    """
    if repeats < 1:
        raise ValueError(f"time_ms: repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    if xp is np:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    import cupy
    cupy.cuda.get_current_stream().synchronize()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


# ----------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------


class MemoryPeak:
    """Filled by :func:`peak_memory`: ``peak`` is the highest number of bytes allocated
    above the level at entry (arrays created inside and still alive count too)."""

    __slots__ = ("peak",)

    def __init__(self):
        self.peak = 0

    def __repr__(self):
        return f"MemoryPeak(peak={self.peak})"


@contextlib.contextmanager
def peak_memory(xp=np):
    """Measure the peak extra memory of the code in the ``with`` block.

    >>> import numpy as np
    >>> with peak_memory(np) as mem:
    ...     x = np.ones(1 << 20)  # 8 MiB
    ...     del x
    >>> mem.peak >= 8 << 20
    True

    NumPy: ``tracemalloc`` (started here if it is not running; its peak is reset, so
    two of these must not be nested). CuPy: a memory hook on the current device's memory
    pool counting the bytes the pool hands out and takes back, so memory the pool
    caches does not hide an allocation. Memory that CuPy or a library allocates
    outside the pool (cuBLAS workspaces, say) is not counted.
    """
    result = MemoryPeak()
    if xp is np:
        started = not tracemalloc.is_tracing()
        if started:
            tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            yield result
        finally:
            result.peak = max(0, tracemalloc.get_traced_memory()[1] - base)
            if started:
                tracemalloc.stop()
        return
    hook = _pool_peak_hook()(result)
    with hook:
        yield result


def _pool_peak_hook():
    from cupy.cuda import memory_hook

    class PoolPeakHook(memory_hook.MemoryHook):
        # malloc/free are the pool handing a block to an array and getting it back: they
        # fire on every allocation. (alloc fires only when the pool must grow from the
        # device, so a cached block would go unseen.) mem_size is the rounded size.
        name = "cupyflash_peak_memory"

        def __init__(self, result):
            self.result = result
            self.current = 0

        def malloc_postprocess(self, **kwargs):
            self.current += kwargs["mem_size"]
            self.result.peak = max(self.result.peak, self.current)

        def free_postprocess(self, **kwargs):
            self.current -= kwargs["mem_size"]

    return PoolPeakHook


# ----------------------------------------------------------------------------------------
# the machine
# ----------------------------------------------------------------------------------------


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _blas_name():
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas['name']} {blas.get('version', '')}".strip()
    except Exception:  # older NumPy, or a build without the dict
        return "unknown"


def machine_info(xp=np):
    """What a benchmark record needs to be read later: CPU, versions, and the GPU."""
    import cupyflash
    info = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": _blas_name(),
        "cupyflash": cupyflash.__version__,
        "gpu": None,
    }
    if xp is not np:
        import cupy
        info["cupy"] = cupy.__version__
        info["gpu"] = gpu_name()
        info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        info["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
    return info


def format_bytes(n):
    """``1.5 GiB``-style text for a byte count."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
