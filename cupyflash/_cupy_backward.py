"""The backward pass on CuPy arrays: launching the kernels of ``cuda/flash_bwd_*.cuh``.

``attention_backward`` runs, on CuPy's current stream and the arrays' device:

1. ``flash_bwd_preprocess``: ``delta = rowsum(dout * out)`` per query row;
2. the main kernel, one thread block per key block: dK and dV, and by default dQ added
   in float32 atomics to a zeroed ``dq_accum``;
3. with ``deterministic=True``, the dQ kernel instead, one thread block per query block,
   summing over key blocks in a fixed order (no atomics: bitwise reproducible);
4. ``scale_convert``: ``dq = dq_accum * scale`` in the inputs' dtype, and the sums of
   the gradients over broadcast batch dimensions (grouped-query attention) in float32.

On a GPU of compute capability 9.0 the main kernel of fp16/bf16 problems at head dims
33..256 without variants is the Hopper one (``flash_bwd_wgmma``: wgmma, TMA, warp
specialisation), unless ``CUPYFLASH_BWD_KERNEL=mma`` (see :func:`backward_kernel`). It
adds dQ in 64 x 64 fp32 tiles by bulk reduce-adds (``dq_accum`` is then tiled, and
``dq_from_tiles`` replaces step 4's ``scale_convert`` for dQ); with ``deterministic=True``
it computes dK and dV only, and step 3 runs. The variants keep the mma.sync kernels.

The gradients of each batch element are written contiguously, in rows of the kernel's
padded head dim, and then copied (or summed) into arrays of q's, k's and v's shapes.
Nothing waits for the device.
"""

import functools
import math
import os

import numpy as np

from . import _kernels
from ._cupy_backend import (_DTYPE_TO_CUDA, MAX_BATCH_DIMS, _as_matrix_view, _batch_layout,
                            _compute_capability, _device_of, _expand, _kernel_ready,
                            _matrix_strides, _on_device, _pack_params, _pack_variants,
                            _variant_operands, check_register_split, has_variants,
                            launch_grid, slice_maps)

# struct BackwardParams of cuda/attention_common.cuh: 5 pointers, grad_row, and dbias's
# pointer, batch strides, row and column strides and atomic flag (8-byte fields).
BACKWARD_PARAMS_DTYPE = np.dtype(
    [(name, np.uint64) for name in ("dout", "delta", "dq_accum", "dk", "dv")]
    + [("grad_row", np.int64), ("dbias", np.uint64),
       ("dbias_batch_stride", np.int64, (MAX_BATCH_DIMS,))]
    + [(name, np.int64) for name in ("dbias_row_stride", "dbias_col_stride", "dbias_atomic")])

# ----------------------------------------------------------------------------------------
# tile choice
# ----------------------------------------------------------------------------------------

BWD_HEAD_DIMS = (32, 64, 96, 128, 192, 256)

# flash_bwd_mma: (BLOCK_M, NUM_WARPS, D_SPLIT, Q_BUFFERS, MIN_BLOCKS); keys per block =
# 16 NUM_WARPS / D_SPLIT. flash_bwd_dq_mma: (BLOCK_M, BLOCK_N, NUM_WARPS). Tables for sm_90
# ('hopper': 227 KiB of shared memory per block, bulk reduce-adds of dQ), for GPUs with at
# least 163 KiB (sm_80, sm_87, sm_100) and for 99 KiB (sm_86, sm_89, sm_120). Measured on an H100 (benchmarks/NOTES.md): 64 queries per step at d = 128 are
# 11-28% faster than 32 and 128 at d = 64 are 26% faster than 64 (both fit sm_90a's 255
# registers without spills, not sm_80's at d = 128); two blocks of 4 warps per SM are
# slower than one of 8. d = 256 spills with BLOCK_M = 64, not with 32.
BWD_MMA_TILES = {
    "hopper": {32: (128, 8, 1, 2, 1), 64: (128, 8, 1, 2, 1), 96: (64, 8, 1, 2, 1), 128: (64, 8, 1, 2, 1),
               192: (32, 8, 2, 2, 1), 256: (32, 8, 2, 2, 1)},
    "large": {32: (64, 8, 1, 2, 1), 64: (64, 8, 1, 2, 1), 96: (64, 8, 1, 2, 1), 128: (32, 8, 1, 2, 1),
              192: (32, 8, 2, 2, 1), 256: (32, 8, 2, 2, 1)},
    "small": {32: (64, 8, 1, 2, 1), 64: (64, 8, 1, 2, 1), 96: (64, 4, 1, 1, 1), 128: (64, 4, 1, 1, 1),
              192: (32, 4, 2, 1, 1), 256: (32, 4, 2, 1, 1)},
}
# flash_bwd_mma_variants where the plain tiles leave no registers for the score modifier:
# on sm_90a ptxas spills 16-20 bytes at d = 128 with BLOCK_M = 64 (none with 32) and 12
# bytes for bf16 at d = 64 with BLOCK_M = 128 (none with 64: 196-208 registers). On GPUs
# with 99 KiB, d = 128 takes BLOCK_M = 32: with dropout's keep mask (held in the same
# kernel behind a runtime switch) BLOCK_M = 64 spills 4 bytes on sm_80. Not yet measured
# on a GPU. With softcap's factor (a_ds, live from P to dS, behind a runtime switch too)
# the 99 KiB tiles spilled 8-16 bytes on sm_80 at d = 128 (32, 4, 1, 1, 1) and 8 bytes
# at d = 256 (32, 4, 2, 1, 1, atomic dQ): d = 128 takes two Q/dO buffers (251-254
# registers, 82 KiB), d = 256 16 query rows a step (237-238 registers). Not measured.
# return_dbias's stores (behind a runtime switch) spilled d = 96 by 4-8 bytes on sm_80 and
# sm_90a, whose tiles cannot take 32 query rows (its column split): the variants run the
# d = 128 kernel at d = 96 (columns past D read as zeros).
BWD_MMA_VARIANT_TILES = {"hopper": {64: (64, 8, 1, 2, 1), 128: (32, 8, 1, 2, 1)},
                         "large": {}, "small": {128: (32, 4, 1, 2, 1), 256: (16, 4, 2, 1, 1)}}
BWD_DQ_MMA_TILES = {
    "hopper": {32: (64, 64, 4), 64: (64, 64, 4), 96: (64, 64, 4), 128: (64, 64, 4),
               192: (64, 32, 4), 256: (64, 32, 4)},
    "large": {32: (64, 64, 4), 64: (64, 64, 4), 96: (64, 64, 4), 128: (64, 64, 4),
              192: (64, 32, 4), 256: (64, 32, 4)},
    "small": {32: (64, 64, 4), 64: (64, 64, 4), 96: (64, 64, 4), 128: (64, 64, 4),
              192: (32, 32, 2), 256: (32, 32, 2)},
}


def _smem_class(compute_capability):
    """'hopper' for sm_90 (227 KiB of shared memory per block, bulk reduce-adds of dQ),
    'large' where a block may use >= 163 KiB (sm_80, sm_87, sm_100), else 'small'
    (99 KiB: sm_86, sm_89, sm_120)."""
    cc = int(compute_capability)
    return "hopper" if cc == 90 else "large" if cc in (80, 87, 100, 103) else "small"


class BackwardConfig:
    """The kernels of one backward problem and how to launch them. ``kernel``: the main
    kernel's family ("mma", "wgmma" or "simt"); ``block_m``: the query rows of its inner
    step (the rows of the wgmma kernel's Q and dO tensor-map boxes)."""

    __slots__ = ("head_dim", "main_source", "main_name", "main_threads", "main_smem",
                 "block_n", "dq_source", "dq_name", "dq_threads", "dq_smem", "block_m_dq",
                 "align_elems", "pad_d_to", "kernel", "block_m")

    def __init__(self, **kw):
        for name in self.__slots__:
            setattr(self, name, kw[name])


BWD_KERNELS = ("auto", "mma", "wgmma")


def backward_kernel():
    """The fp16/bf16 backward kernel family that ``CUPYFLASH_BWD_KERNEL`` asks for.

    ``wgmma``: the Hopper kernel (cuda/flash_bwd_wgmma.cuh) wherever it applies: fp16/bf16
    on a GPU of compute capability 9.0, head dims up to 256, no variants, and q, k, v,
    dout that tensor maps can describe (otherwise the mma.sync kernel runs). ``auto`` (or
    unset): as ``wgmma`` for head dims above 32; at 32 and below padding to 64 would
    double the work. ``mma``: the mma.sync kernel everywhere.
    """
    choice = os.environ.get("CUPYFLASH_BWD_KERNEL", "auto").strip().lower() or "auto"
    if choice not in BWD_KERNELS:
        raise ValueError(f"attention_backward: CUPYFLASH_BWD_KERNEL must be one of "
                         f"{', '.join(BWD_KERNELS)}, got {choice!r}")
    return choice


# cuda/flash_bwd_wgmma.cuh: BwdWgmmaTraits' shape (two consumer warpgroups, 64 query rows
# a step; 64 keys each, or at d = 256 64 keys shared and the head dim split between them)
# and its Q/dO stages per head dim.
WGMMA_BWD_HEAD_DIMS = (64, 128, 256)
WGMMA_BWD_BLOCK_M = 64
WGMMA_BWD_BLOCK_N = {64: 128, 128: 128, 256: 64}
WGMMA_BWD_STAGES = {64: 2, 128: 2, 256: 2}
WGMMA_BWD_AUTO_MIN_HEAD_DIM = 32


def _wgmma_bwd_smem_bytes(head_dim, stages):
    """As BwdWgmmaTraits::SMEM_BYTES."""
    bm, bn = WGMMA_BWD_BLOCK_M, WGMMA_BWD_BLOCK_N[head_dim]
    split_d = head_dim == 256
    # d = 256: P^T through two shared tiles, dQ staged in Q's and dO's stages, a dq_full
    # mbarrier per stage; else two fp32 dQ staging tiles per dQ consumer
    p_tiles = 2 * bn * bm * 2 if split_d else 0
    dq_stage = 0 if split_d else 2 * 64 * 64 * 4 * (head_dim // 64)
    return (1024 + 2 * bn * head_dim * 2 + 2 * stages * bm * head_dim * 2 + p_tiles
            + 2 * bn * bm * 2 + dq_stage + 2 * stages * bm * 4
            + 8 * (1 + (3 if split_d else 2) * stages))


@functools.lru_cache(maxsize=64)
def _wgmma_backward_config(D, dtype_name, compute_capability, causal, deterministic):
    """flash_bwd_wgmma for dK, dV and (atomic) dQ; with ``deterministic``, dK and dV only,
    and flash_bwd_dq_mma for dQ (the mma.sync path's deterministic dQ kernel)."""
    head_dim = next(h for h in WGMMA_BWD_HEAD_DIMS if h >= D)
    stages = WGMMA_BWD_STAGES[head_dim]
    mma = _mma_backward_config(D, dtype_name, compute_capability, causal, True, "")
    return BackwardConfig(
        head_dim=head_dim, main_source="flash_bwd_wgmma.cuh",
        main_name=(f"cupyflash::flash_bwd_wgmma<{_DTYPE_TO_CUDA[dtype_name]}, {head_dim}, "
                   f"{stages}, {'true' if causal else 'false'}, "
                   f"{'false' if deterministic else 'true'}>"),
        main_threads=384, main_smem=_wgmma_bwd_smem_bytes(head_dim, stages),
        block_n=WGMMA_BWD_BLOCK_N[head_dim], dq_source=mma.dq_source, dq_name=mma.dq_name,
        dq_threads=mma.dq_threads, dq_smem=mma.dq_smem, block_m_dq=mma.block_m_dq,
        align_elems=8, pad_d_to=8, kernel="wgmma", block_m=WGMMA_BWD_BLOCK_M)


def wgmma_backward_variants():
    """The (source, name_expression) of every Hopper backward kernel (sm_90a only)."""
    return [(c.main_source, c.main_name)
            for c in (_wgmma_backward_config(h, dt, 90, causal, det)
                      for h in WGMMA_BWD_HEAD_DIMS for dt in ("float16", "bfloat16")
                      for causal in (False, True) for det in (False, True))]


def _tile_knob(name):
    """``CUPYFLASH_BWD_TILES="128:32,8,1,2,1"``: other flash_bwd_mma tiles for benchmarking."""
    tiles = {}
    for item in filter(None, os.environ.get(name, "").split(";")):
        head_dim, shape = item.split(":")
        tiles[int(head_dim)] = tuple(int(x) for x in shape.split(","))
    return tiles


@functools.lru_cache(maxsize=256)
def _mma_backward_config(D, dtype_name, compute_capability, causal, deterministic, knob,
                         variants=False):
    head_dim = next((h for h in BWD_HEAD_DIMS if h >= D), None)
    if head_dim is None:
        raise ValueError(f"attention_backward: head dims up to {BWD_HEAD_DIMS[-1]} are "
                         f"supported on the GPU, got {D}")
    if variants and head_dim == 96:
        head_dim = 128  # (see BWD_MMA_VARIANT_TILES)
    size = _smem_class(compute_capability)
    tiles = BWD_MMA_TILES[size][head_dim]
    if variants:
        tiles = BWD_MMA_VARIANT_TILES[size].get(head_dim, tiles)
    block_m, num_warps, d_split, q_buffers, min_blocks = _tile_knob("CUPYFLASH_BWD_TILES").get(
        head_dim, tiles)
    dq_m, dq_n, dq_warps = BWD_DQ_MMA_TILES[size][head_dim]
    ctype = _DTYPE_TO_CUDA[dtype_name]
    c = "true" if causal else "false"
    atomic = "false" if deterministic else "true"
    if variants:  # the causal mask is part of the window (cuda/attention_variants.cuh)
        main_name = (f"cupyflash::flash_bwd_mma_variants<{ctype}, {head_dim}, {block_m}, "
                     f"{num_warps}, {d_split}, {q_buffers}, {min_blocks}, {atomic}>")
        dq_name = f"cupyflash::flash_bwd_dq_mma_variants<{ctype}, {head_dim}, {dq_m}, {dq_n}, {dq_warps}>"
    else:
        main_name = (f"cupyflash::flash_bwd_mma<{ctype}, {head_dim}, {block_m}, {num_warps}, "
                     f"{d_split}, {q_buffers}, {min_blocks}, {c}, {atomic}>")
        dq_name = f"cupyflash::flash_bwd_dq_mma<{ctype}, {head_dim}, {dq_m}, {dq_n}, {dq_warps}, {c}>"
    smem_row = -(-head_dim // 64) * 64
    ds_row = -(-block_m // 64) * 64
    block_n = 16 * num_warps // d_split
    main_smem = (2 * block_n * smem_row + 2 * q_buffers * block_m * smem_row
                 + 2 * block_n * ds_row) * 2 + 2 * q_buffers * block_m * 4
    if size == "hopper" and not deterministic:  # BwdMmaTraits::DQ_STAGE_BYTES
        main_smem += block_m * (head_dim + 8) * 4
    return BackwardConfig(
        head_dim=head_dim, main_source="flash_bwd_mma.cuh",
        main_name=main_name,
        main_threads=32 * num_warps, main_smem=main_smem, block_n=block_n,
        dq_source="flash_bwd_mma.cuh",
        dq_name=dq_name,
        dq_threads=32 * dq_warps, dq_smem=(2 * dq_m + 4 * dq_n) * smem_row * 2,
        block_m_dq=dq_m, align_elems=8, pad_d_to=8, kernel="mma", block_m=block_m)


def backward_config(D, dtype_name, compute_capability, causal, deterministic, variants=False,
                    hopper=True):
    """Choose the backward kernels for one problem: the one place their tiles are chosen.
    ``variants``: built with VARIANTS (bias, mask, window, ALiBi; the causal mask is then
    part of the window and ``causal`` is ignored). ``hopper=False``: not the wgmma kernel
    (the launcher's fallback where tensor maps cannot describe the operands)."""
    causal = causal and not variants
    if dtype_name in ("float16", "bfloat16"):
        choice = backward_kernel()
        if (hopper and int(compute_capability) == 90 and not variants
                and D <= WGMMA_BWD_HEAD_DIMS[-1]
                and (choice == "wgmma"
                     or (choice == "auto" and D > WGMMA_BWD_AUTO_MIN_HEAD_DIM))):
            return _wgmma_backward_config(D, dtype_name, int(compute_capability), causal,
                                          bool(deterministic))
        return _mma_backward_config(D, dtype_name, compute_capability, causal, deterministic,
                                    os.environ.get("CUPYFLASH_BWD_TILES", ""), variants)
    from ._cupy_backend import _simt_backward_config
    s = _simt_backward_config(D, D, dtype_name, causal, variants)
    return BackwardConfig(
        head_dim=s.head_dim, main_source="flash_bwd_simt.cuh",
        main_name=s.dkdv_name if deterministic else s.dkdv_atomic_name,
        main_threads=s.num_threads, main_smem=s.dkdv_smem_bytes, block_n=s.block_n,
        dq_source="flash_bwd_simt.cuh", dq_name=s.dq_name, dq_threads=s.num_threads,
        dq_smem=s.dq_smem_bytes, block_m_dq=s.block_m, align_elems=s.align_elems,
        pad_d_to=s.pad_d_to, kernel="simt", block_m=s.block_m)


def mma_backward_variants(arch):
    """Every (source, name_expression) of the fp16/bf16 backward that a GPU compiled for
    ``arch`` ("sm_80": the 'large' and 'small' tables; "sm_90a": 'hopper') can request,
    both dQ modes, and the preprocessing kernels of every dtype: the CI compile check."""
    out = []
    for cc in ((90,) if arch == "sm_90a" else (80, 86)):
        for h in BWD_HEAD_DIMS:
            for dt in ("float16", "bfloat16"):
                for causal, variants in ((False, False), (True, False), (False, True)):
                    for det in (False, True):
                        c = _mma_backward_config(h, dt, cc, causal, det, "", variants)
                        out += [(c.main_source, c.main_name), (c.dq_source, c.dq_name)]
    for ctype in ("__half", "__nv_bfloat16", "float", "double"):
        acc = "double" if ctype == "double" else "float"
        out.append(("flash_bwd_preprocess.cuh",
                    f"cupyflash::flash_bwd_preprocess<{ctype}, {acc}>"))
        out.append(("flash_bwd_preprocess.cuh",
                    f"cupyflash::scale_convert<{acc}, {ctype}, {acc}>"))
        out.append(("flash_bwd_preprocess.cuh",
                    f"cupyflash::scale_convert<{ctype}, {acc}, {acc}>"))
        if ctype != "double":
            out.append(("flash_bwd_preprocess.cuh", f"cupyflash::dq_from_tiles<{ctype}>"))
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------------------
# launching
# ----------------------------------------------------------------------------------------

def _scale_convert(device_id, x, x_row, y, n_rows, cols, scale):
    """y (contiguous, n_rows x cols) = x[:, :cols] * scale, converting the element type."""
    acc = "double" if np.float64 in (x.dtype, y.dtype) else "float"
    name = (f"cupyflash::scale_convert<{_DTYPE_TO_CUDA[x.dtype.name]}, "
            f"{_DTYPE_TO_CUDA[y.dtype.name]}, {acc}>")
    kernel = _kernels.get_function(device_id, "flash_bwd_preprocess.cuh", name,
                                   _kernels.arch_for(_compute_capability(device_id)))
    n = n_rows * cols
    if n == 0:
        return
    kernel((min(-(-n // 256), 65535 * 16),), (256,),
           (x, np.int64(x_row), y, np.int64(n_rows), np.int64(cols), np.float64(scale)))


def _broadcast_axes(full_shape, shape):
    """Axes of ``full_shape`` to sum so that the result has ``shape``."""
    lead = len(full_shape) - len(shape)
    return tuple(range(lead)) + tuple(
        lead + i for i, (n, m) in enumerate(zip(shape, full_shape[lead:])) if n == 1 and m != 1)


def _finish(device_id, buf, row, full_shape, cols, scale, target, result):
    """Write the gradient ``buf`` (n_batch x L x row, float or T) times ``scale`` into
    ``result`` (target's shape, T), summing over broadcast dimensions in float32/64."""
    import cupy

    T = result.dtype
    acc = np.float64 if T == np.float64 else np.float32
    n_rows = math.prod(full_shape[:-1])
    axes = _broadcast_axes(full_shape, target.shape)
    if not axes:
        if buf.dtype == T and scale == 1.0:  # a copy (dk, dv not written in place)
            result[...] = buf[..., :cols].reshape(full_shape)
            return
        tmp = result if result.flags.c_contiguous else cupy.empty(full_shape, dtype=T)
        _scale_convert(device_id, buf, row, tmp, n_rows, cols, scale)
        if tmp is not result:
            result[...] = tmp
        return
    full = cupy.empty(full_shape, dtype=acc)
    _scale_convert(device_id, buf, row, full, n_rows, cols, scale)
    summed = cupy.ascontiguousarray(full.sum(axis=axes).reshape(target.shape))
    tmp = result if result.flags.c_contiguous else cupy.empty(target.shape, dtype=T)
    _scale_convert(device_id, summed, cols, tmp, summed.size // max(cols, 1), cols, 1.0)
    if tmp is not result:
        result[...] = tmp


def _wgmma_backward_arguments(problem, cfg, q, k, v, dout, lse):
    """``(params, (map_q, map_k, map_v, map_do))`` of flash_bwd_wgmma, or None when tensor
    maps cannot describe q, k, v or dout (then the mma.sync kernel runs).

    As ``_cupy_backend._wgmma_arguments``: each operand is read through a 3-D map (head
    dim, L, slices) whose boxes have the kernel's rows (BLOCK_M for q and dout, BLOCK_N for
    k and v), and the batch strides of ``AttentionParams`` count slices; dout takes o's
    place (the kernel reads neither o nor its pointer)."""
    layout = _batch_layout(problem, (q, k, v, dout))
    if layout is None:
        return None
    sizes, strides = layout
    sliced = slice_maps(sizes, strides, (q, k, v, dout),
                        (cfg.block_m, cfg.block_n, cfg.block_n, cfg.block_m))
    if sliced is None:
        return None
    maps, units = sliced
    params, _ = _pack_params(problem, q, k, v, dout, lse, layout=(sizes, units))
    return params, maps


def _dq_from_tiles(device_id, tiles, y, n_batch, Lq, cols, head_dim, scale):
    """y (contiguous, n_batch x Lq x cols) = flash_bwd_wgmma's tiled dQ accumulator * scale."""
    name = f"cupyflash::dq_from_tiles<{_DTYPE_TO_CUDA[y.dtype.name]}>"
    kernel = _kernels.get_function(device_id, "flash_bwd_preprocess.cuh", name,
                                   _kernels.arch_for(_compute_capability(device_id)))
    n = n_batch * Lq * cols
    if n:
        kernel((min(-(-n // 256), 65535 * 16),), (256,),
               (tiles, y, np.int64(n_batch), np.int64(Lq), np.int64(cols),
                np.int32(head_dim // 64), np.float64(scale)))


def _finish_tiled(device_id, tiles, full_shape, head_dim, scale, target, result):
    """As :func:`_finish` for dQ from flash_bwd_wgmma's tiled accumulator: straight into
    ``result`` where no dimension is broadcast, else through a float32 row-major copy."""
    import cupy

    n_batch, Lq, cols = tiles.shape[0], full_shape[-2], full_shape[-1]
    if not _broadcast_axes(full_shape, target.shape):
        tmp = result if result.flags.c_contiguous else cupy.empty(full_shape, dtype=result.dtype)
        _dq_from_tiles(device_id, tiles, tmp, n_batch, Lq, cols, head_dim, scale)
        if tmp is not result:
            result[...] = tmp
        return
    rows = cupy.empty((n_batch, Lq, cols), dtype=np.float32)
    _dq_from_tiles(device_id, tiles, rows, n_batch, Lq, cols, head_dim, scale)
    _finish(device_id, rows, cols, full_shape, cols, 1.0, target, result)


def _params_buffer(dout, delta, dq_accum, dk, dv, grad_row, dbias=None):
    """The ``BackwardParams`` struct; ``dbias``: ``(accumulator, batch strides, atomic)``
    for return_dbias (see :class:`_DbiasAccumulator`)."""
    fields = np.zeros((), dtype=BACKWARD_PARAMS_DTYPE)
    for name, x in (("dout", dout), ("delta", delta), ("dq_accum", dq_accum), ("dk", dk),
                    ("dv", dv)):
        fields[name] = x.data.ptr
    fields["grad_row"] = grad_row
    if dbias is not None:
        acc, batch_strides, atomic = dbias
        fields["dbias"] = acc.data.ptr
        fields["dbias_batch_stride"] = batch_strides
        fields["dbias_row_stride"], fields["dbias_col_stride"] = _matrix_strides(acc)
        fields["dbias_atomic"] = int(atomic)
    return fields[()]


class _DbiasAccumulator:
    """Where the variants' dK/dV kernel adds dbias = dS (return_dbias), in the accumulator
    type, and how it becomes the gradient of the bias.

    By default an array of the bias's own (matrix-view) shape: where the bias broadcasts
    along a batch dimension, the rows or the columns, several scores add into one element,
    atomically. With ``deterministic`` such a bias (or a batch the kernels can only read
    expanded) gets an array of the full ``(batch..., Lq, Lk)`` shape instead, each element
    stored once, and the sum over the broadcast dimensions is CuPy's (a fixed order): that
    costs ``4 Lq Lk`` bytes per batch element (8 for float64).
    """

    def __init__(self, problem, bias, acc_dtype, deterministic, expand):
        import cupy
        self.bias_shape, self.bias_dtype = bias.shape, bias.dtype
        full = problem.batch_shape + (problem.Lq, problem.Lk)
        own = _as_matrix_view(bias).shape
        own = (1,) * (len(full) - len(own)) + own
        shared = own != full
        self.full = shared and (deterministic or expand)
        self.array = cupy.zeros(full if self.full else _as_matrix_view(bias).shape,
                                dtype=acc_dtype)
        self.atomic = shared and not self.full
        self.axes = tuple(i for i, (n, m) in enumerate(zip(own, full)) if n != m)

    def finish(self):
        """dbias of the bias's shape and dtype (beyond a float16 bias's range: +-inf)."""
        acc = self.array.sum(axis=self.axes, keepdims=True) if self.full else self.array
        return acc.reshape(self.bias_shape).astype(self.bias_dtype)


def attention_backward(dout, q, k, v, out, lse, problem, deterministic=False,
                       dq=None, dk=None, dv=None, bias=None, mask=None, alibi_slopes=None,
                       return_dbias=False):
    """Return ``(dq, dk, dv)`` computed on the GPU for a validated problem (with the
    variants' arrays), and ``dbias`` after them with ``return_dbias`` (a bias given)."""
    import cupy

    fn = "attention_backward"
    arrays = [("dout", dout), ("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse)]
    arrays += [(n, a) for n, a in (("dq", dq), ("dk", dk), ("dv", dv)) if a is not None]
    device_id = _device_of(fn, arrays)
    T = problem.dtype
    with _on_device(device_id):
        dq = dq if dq is not None else cupy.empty(q.shape, dtype=T)
        dk = dk if dk is not None else cupy.empty(k.shape, dtype=T)
        dv = dv if dv is not None else cupy.empty(v.shape, dtype=T)
        p = problem
        n_batch = math.prod(p.batch_shape)
        if n_batch == 0 or p.Lq == 0 or p.Lk == 0:  # nothing, or no query or no key: 0
            for g in (dq, dk, dv):
                g.fill(0)
            if return_dbias:
                return dq, dk, dv, cupy.zeros(bias.shape, dtype=bias.dtype)
            return dq, dk, dv

        cc = _compute_capability(device_id)
        variants = has_variants(p, bias, mask, alibi_slopes)
        cfg = backward_config(max(p.D, p.Dv), T.name, cc, p.causal, bool(deterministic),
                              variants)
        qkv = [_kernel_ready(t, cfg.align_elems, cfg.pad_d_to) for t in (q, k, v)]
        o = _kernel_ready(out, cfg.align_elems, cfg.pad_d_to)
        do = _kernel_ready(dout, cfg.align_elems, cfg.pad_d_to)
        if o.strides != do.strides:  # the kernels read dout with out's strides
            o, do = (cupy.ascontiguousarray(x) for x in (o, do))
        acc = np.float64 if T == np.float64 else np.float32
        lse_c = cupy.ascontiguousarray(lse, dtype=acc)
        main_args = None
        if cfg.kernel == "wgmma":
            main_args = _wgmma_backward_arguments(p, cfg, *qkv, do, lse_c)
            if main_args is None:  # a layout tensor maps cannot describe: mma.sync
                cfg = backward_config(max(p.D, p.Dv), T.name, cc, p.causal,
                                      bool(deterministic), variants, hopper=False)
        kernel_bias, mask_m, extra = _variant_operands(p, bias, mask)
        dbias = _DbiasAccumulator(p, bias, acc, deterministic, False) if return_dbias else None
        params, extra_strides = _pack_params(p, *qkv, o, lse_c,
                                             extra + ([dbias.array] if dbias else []))
        if params is None:  # too many batch dims even after collapsing: copy to contiguous
            qkv = [_expand(p, t) for t in qkv]
            o, do = (cupy.ascontiguousarray(x) for x in (o, do))
            kernel_bias, mask_m, extra = _variant_operands(p, bias, mask, expand=True)
            if return_dbias:
                dbias = _DbiasAccumulator(p, bias, acc, deterministic, True)
            params, extra_strides = _pack_params(p, *qkv, o, lse_c,
                                                 extra + ([dbias.array] if dbias else []))
        vargs, slopes = (), None
        if variants:
            vparams, slopes = _pack_variants(p, kernel_bias, mask_m, alibi_slopes, extra_strides)
            vargs = (vparams,)

        row = cfg.head_dim
        delta = cupy.empty((n_batch, p.Lq), dtype=acc)
        # flash_bwd_wgmma adds dQ into a tiled accumulator (DqTiles); with deterministic the
        # dQ kernel of flash_bwd_mma.cuh writes it row-major
        tiled_dq = main_args is not None and not deterministic
        if tiled_dq:
            dq_accum = cupy.zeros((n_batch, -(-p.Lq // 64), row // 64, 64, 64), dtype=acc)
        else:
            dq_accum = (cupy.empty if deterministic else cupy.zeros)((n_batch, p.Lq, row),
                                                                     dtype=acc)
        batch = p.batch_shape
        # dk and dv go straight into the result where it has the kernel's layout (not
        # broadcast, contiguous, head dim = the kernel's); else into a buffer, copied or
        # summed below.
        dk_buf, dv_buf = (
            g if (tuple(g.shape) == batch + (p.Lk, row) and g.flags.c_contiguous)
            else cupy.empty((n_batch, p.Lk, row), dtype=T) for g in (dk, dv))
        bparams = _params_buffer(do, delta, dq_accum, dk_buf, dv_buf, row,
                                 (dbias.array, extra_strides[-1], dbias.atomic) if dbias
                                 else None)

        arch = _kernels.arch_for(cc)
        get = functools.partial(_kernels.get_function, device_id)
        acc_name = "double" if T == np.float64 else "float"
        pre = get("flash_bwd_preprocess.cuh",
                  f"cupyflash::flash_bwd_preprocess<{_DTYPE_TO_CUDA[T.name]}, {acc_name}>", arch)
        pre(launch_grid(-(-p.Lq // 8), n_batch), (256, 1, 1), (params, bparams))
        main = get(cfg.main_source, cfg.main_name, arch, cfg.main_smem)
        if main_args is not None:  # the Hopper kernel: its params and tensor maps
            check_register_split(main, cfg.main_threads, cfg.main_name, "attention_backward",
                                 "CUPYFLASH_BWD_KERNEL")
            wparams, maps = main_args
            args = (wparams, bparams) + maps
        else:
            args = (params, bparams) + vargs
        main(launch_grid(-(-p.Lk // cfg.block_n), n_batch), (cfg.main_threads, 1, 1), args,
             shared_mem=cfg.main_smem)
        if deterministic:
            dq_kernel = get(cfg.dq_source, cfg.dq_name, arch, cfg.dq_smem)
            dq_kernel(launch_grid(-(-p.Lq // cfg.block_m_dq), n_batch), (cfg.dq_threads, 1, 1),
                      (params, bparams) + vargs, shared_mem=cfg.dq_smem)
        del slopes  # (the pool reuses its memory only for later work on this stream)

        if tiled_dq:
            _finish_tiled(device_id, dq_accum, batch + (p.Lq, p.D), row, p.scale, q, dq)
        else:
            _finish(device_id, dq_accum, row, batch + (p.Lq, p.D), p.D, p.scale, q, dq)
        if dk_buf is not dk:
            _finish(device_id, dk_buf, row, batch + (p.Lk, p.D), p.D, 1.0, k, dk)
        if dv_buf is not dv:
            _finish(device_id, dv_buf, row, batch + (p.Lk, p.Dv), p.Dv, 1.0, v, dv)
        if dbias is not None:
            return dq, dk, dv, dbias.finish()
        return dq, dk, dv
