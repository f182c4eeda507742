"""Launching the CUDA kernels on CuPy arrays.

``attention_forward`` prepares kernel-ready views of q, k, v (copying only what a kernel
cannot read in place), chooses a kernel variant in one plain function of
(head dim, dtype, compute capability, causal) and launches it on CuPy's current stream
on the arrays' device. No host synchronisation happens in a call.
"""

import math

import numpy as np

from . import _kernels

MAX_BATCH_DIMS = 4  # as in cuda/attention_common.cuh

# The layout of ``struct AttentionParams`` in cuda/attention_common.cuh: every field is
# 8 bytes wide, so NumPy's packed layout is the C layout. CuPy passes a structured NumPy
# scalar to a kernel by value.
ATTENTION_PARAMS_DTYPE = np.dtype(
    [(name, np.uint64) for name in ("q", "k", "v", "o", "lse")]
    + [(name, np.int64, (MAX_BATCH_DIMS,)) for name in (
        "batch_size", "q_batch_stride", "k_batch_stride", "v_batch_stride", "o_batch_stride")]
    + [(name, np.int64) for name in (
        "q_row_stride", "k_row_stride", "v_row_stride", "o_row_stride",
        "n_batch", "Lq", "Lk", "D", "Dv")]
    + [("scale", np.float64), ("scale_log2", np.float64)])

_DTYPE_TO_CUDA = {"float16": "__half", "bfloat16": "__nv_bfloat16",
                  "float32": "float", "float64": "double"}


# ----------------------------------------------------------------------------------------
# devices and arrays
# ----------------------------------------------------------------------------------------

def _device_of(fn, arrays):
    """The one device all arrays live on, else ValueError naming the arrays."""
    ids = {name: a.device.id for name, a in arrays}
    if len(set(ids.values())) > 1:
        where = ", ".join(f"{n} on device {d}" for n, d in ids.items())
        raise ValueError(f"{fn}: arrays must be on one device; got {where}")
    return next(iter(ids.values()))


def _compute_capability(device_id):
    import cupy
    return int(cupy.cuda.Device(device_id).compute_capability)


def _kernel_ready(x, align_elems, pad_last_to):
    """Return ``x`` itself if a kernel can read it in place, else an aligned copy.

    In place means: the last dimension is contiguous, and the data pointer and every
    other stride are multiples of ``align_elems`` elements (16-byte vector loads), and
    the last dimension is a multiple of ``pad_last_to``. The copy is zero-padded in the
    last dimension up to that multiple (the padding adds 0 to every dot product).
    """
    import cupy

    item = x.itemsize
    n = x.shape[-1]
    in_place = (
        (x.strides[-1] == item or n <= 1)
        and n % pad_last_to == 0
        and x.data.ptr % (align_elems * item) == 0
        and all(s % (align_elems * item) == 0 for s in x.strides[:-1])
    )
    if in_place:
        return x
    n_pad = -(-n // pad_last_to) * pad_last_to
    y = cupy.zeros(x.shape[:-1] + (n_pad,), dtype=x.dtype)
    y[..., :n] = x
    return y


def _collapse_batch(batch_shape, strides_per_tensor):
    """Merge batch dimensions that are contiguous in every tensor; drop size-1 ones.

    ``strides_per_tensor`` is a list of stride tuples (elements, 0 where broadcast).
    Returns ``(sizes, [strides...])`` with at most as many dims as the input.
    """
    dims = [(s, [st[i] for st in strides_per_tensor])
            for i, s in enumerate(batch_shape) if s != 1]
    merged = []
    for size, strides in dims:
        if merged:
            prev_size, prev_strides = merged[-1]
            if all(ps == s * size for ps, s in zip(prev_strides, strides)):
                merged[-1] = (prev_size * size, strides)
                continue
        merged.append((size, strides))
    sizes = [m[0] for m in merged]
    return sizes, [[m[1][t] for m in merged] for t in range(len(strides_per_tensor))]


def _batch_strides(x, batch_shape):
    """Element strides of x's batch dimensions, broadcast to ``batch_shape`` (0 = broadcast)."""
    nb = len(batch_shape)
    own = x.shape[:-2]
    pad = nb - len(own)
    strides = [0] * nb
    for i, (size, stride) in enumerate(zip(own, x.strides[:-2])):
        strides[pad + i] = 0 if size == 1 else stride // x.itemsize
    return strides


def _pack_params(problem, q, k, v, o, lse):
    """Fill the ``AttentionParams`` struct (see cuda/attention_common.cuh).

    Returns None if the batch needs more than MAX_BATCH_DIMS dimensions even after
    collapsing (the caller then makes q, k, v contiguous).
    """
    tensors = (q, k, v, o)
    sizes, strides = _collapse_batch(problem.batch_shape,
                                     [_batch_strides(t, problem.batch_shape) for t in tensors])
    if len(sizes) > MAX_BATCH_DIMS:
        return None
    pad = MAX_BATCH_DIMS - len(sizes)
    p = np.zeros((), dtype=ATTENTION_PARAMS_DTYPE)
    p["q"], p["k"], p["v"], p["o"], p["lse"] = (t.data.ptr for t in (q, k, v, o, lse))
    p["batch_size"] = [1] * pad + sizes
    for name, st in zip(("q", "k", "v", "o"), strides):
        p[f"{name}_batch_stride"] = [0] * pad + st
    for name, t in zip(("q", "k", "v", "o"), tensors):
        p[f"{name}_row_stride"] = t.strides[-2] // t.itemsize
    p["n_batch"] = math.prod(problem.batch_shape)
    p["Lq"], p["Lk"], p["D"], p["Dv"] = problem.Lq, problem.Lk, problem.D, problem.Dv
    p["scale"] = problem.scale
    p["scale_log2"] = problem.scale * math.log2(math.e)
    return p[()]


# ----------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------

class KernelConfig:
    """One launchable variant: where its source is and how to launch it."""

    __slots__ = ("source", "name_expression", "block_m", "num_threads", "smem_bytes",
                 "align_elems", "pad_d_to")

    def __init__(self, source, name_expression, block_m, num_threads, smem_bytes,
                 align_elems, pad_d_to):
        self.source, self.name_expression = source, name_expression
        self.block_m, self.num_threads, self.smem_bytes = block_m, num_threads, smem_bytes
        self.align_elems, self.pad_d_to = align_elems, pad_d_to


def attention_config(D, Dv, dtype_name, compute_capability, causal):
    """Choose the kernel variant for one problem: the one place tile sizes are chosen."""
    if dtype_name in ("float16", "bfloat16"):
        return _mma_config(D, Dv, dtype_name, compute_capability, causal)
    return _simt_config(D, Dv, dtype_name, compute_capability, causal)


def _mma_config(D, Dv, dtype_name, compute_capability, causal):
    raise NotImplementedError("attention: the fp16/bf16 tensor-core kernel is not built yet")


def _simt_config(D, Dv, dtype_name, compute_capability, causal):
    raise NotImplementedError("attention: the fp32/fp64 kernel is not built yet")


def all_attention_variants():
    """Every (source, name_expression) the library can request, for the CI compile check."""
    return []


def launch_grid(num_m_blocks, n_batch):
    """``(m blocks, batch, batch overflow)``: a kernel's batch index is
    ``blockIdx.z * gridDim.y + blockIdx.y`` (blocks past ``n_batch`` return at once)."""
    y = min(n_batch, 65535)
    return (num_m_blocks, y, -(-n_batch // y))


def attention_forward(q, k, v, problem, out=None):
    """Return ``(out, lse)`` computed on the GPU for a validated problem."""
    import cupy

    fn = "attention"
    arrays = [("q", q), ("k", k), ("v", v)] + ([("out", out)] if out is not None else [])
    device_id = _device_of(fn, arrays)
    with cupy.cuda.Device(device_id):
        lse_dtype = np.float64 if problem.dtype == np.float64 else np.float32
        result = out if out is not None else cupy.empty(problem.out_shape, dtype=problem.dtype)
        lse = cupy.empty(problem.lse_shape, dtype=lse_dtype)
        if result.size == 0:
            return result, lse
        if problem.Lk == 0:  # no key at all: zeros, lse = -inf (no kernel needed)
            result.fill(0)
            lse.fill(-np.inf)
            return result, lse

        cfg = attention_config(max(problem.D, problem.Dv), problem.Dv, problem.dtype.name,
                               _compute_capability(device_id), problem.causal)
        qk = [_kernel_ready(t, cfg.align_elems, cfg.pad_d_to) for t in (q, k, v)]
        o = _kernel_ready(result, cfg.align_elems, cfg.pad_d_to)
        params = _pack_params(problem, *qk, o, lse)
        if params is None:  # too many batch dims even after collapsing: copy to contiguous
            qk = [cupy.ascontiguousarray(cupy.broadcast_to(t, problem.batch_shape + t.shape[-2:]))
                  for t in qk]
            params = _pack_params(problem, *qk, o, lse)

        kernel = _kernels.get_function(device_id, cfg.source, cfg.name_expression,
                                       _kernels.arch_for(_compute_capability(device_id)))
        if cfg.smem_bytes > 48 * 1024:
            kernel.max_dynamic_shared_size_bytes = cfg.smem_bytes
        grid = launch_grid(-(-problem.Lq // cfg.block_m), math.prod(problem.batch_shape))
        kernel(grid, (cfg.num_threads, 1, 1), (params,), shared_mem=cfg.smem_bytes)
        if o is not result:
            result[...] = o[..., :problem.Dv]
        return result, lse


# ----------------------------------------------------------------------------------------
# softmax, log_softmax, logsumexp
# ----------------------------------------------------------------------------------------

def softmax_family(x, axes, kind):
    raise NotImplementedError(f"{kind}: the CuPy kernels are not built yet")


def all_softmax_variants():
    """Every (source, name_expression) of the softmax kernels, for the CI compile check."""
    return []
