"""Launching the CUDA kernels on CuPy arrays.

``attention_forward`` prepares kernel-ready views of q, k, v (copying only what a kernel
cannot read in place), chooses a kernel variant in one plain function of
(head dim, dtype, compute capability, causal) and launches it on CuPy's current stream
on the arrays' device. No host synchronisation happens in a call.

fp16/bf16 forward kernels: ``flash_fwd_mma`` (mma.sync, any GPU from sm_80) and
``flash_fwd_wgmma`` (wgmma + TMA, sm_90 only). ``CUPYFLASH_FWD_KERNEL`` chooses:
``auto`` (the default), ``mma`` or ``wgmma``. See :func:`forward_kernel`.
"""

import collections
import contextlib
import functools
import math
import os
import struct
import threading

import numpy as np

from . import _kernels, _philox, _tensor_map

MAX_BATCH_DIMS = 4  # as in cuda/attention_common.cuh
SOFTMAX_CLUSTER = 8  # blocks per row of softmax_cluster (cuda/online_softmax.cuh)

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

def _cpp_bool(x):
    return "true" if x else "false"


_DTYPE_TO_CUDA = {"float16": "__half", "bfloat16": "__nv_bfloat16",
                  "float32": "float", "float64": "double"}


# ----------------------------------------------------------------------------------------
# devices and arrays
# ----------------------------------------------------------------------------------------

def _device_of(fn, arrays):
    """The one device all arrays live on, else ValueError naming the arrays."""
    ids = [a.data.device_id for _, a in arrays]
    if ids.count(ids[0]) != len(ids):
        where = ", ".join(f"{n} on device {d}" for (n, _), d in zip(arrays, ids))
        raise ValueError(f"{fn}: arrays must be on one device; got {where}")
    return ids[0]


def _on_device(device_id):
    """A context making ``device_id`` current; free when it already is (the usual case)."""
    import cupy
    if cupy.cuda.runtime.getDevice() == device_id:
        return contextlib.nullcontext()
    return cupy.cuda.Device(device_id)


@functools.lru_cache(maxsize=None)
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

    ``strides_per_tensor`` is a list of stride lists (elements, 0 where broadcast).
    Returns ``(sizes, [strides...])`` with at most as many dims as the input.
    """
    sizes, merged = [], [[] for _ in strides_per_tensor]
    for i, size in enumerate(batch_shape):
        if size == 1:
            continue
        if sizes and all(m[-1] == st[i] * size for m, st in zip(merged, strides_per_tensor)):
            sizes[-1] *= size
            for m, st in zip(merged, strides_per_tensor):
                m[-1] = st[i]
            continue
        sizes.append(size)
        for m, st in zip(merged, strides_per_tensor):
            m.append(st[i])
    return sizes, merged


def _batch_strides(x, batch_shape):
    """Element strides of x's batch dimensions, broadcast to ``batch_shape`` (0 = broadcast)."""
    own, item = x.shape[:-2], x.itemsize
    return [0] * (len(batch_shape) - len(own)) + [
        0 if n == 1 else st // item for n, st in zip(own, x.strides[:-2])]


# struct AttentionParams as bytes: 5 pointers, 5 x MAX_BATCH_DIMS batch sizes and strides,
# 9 scalars, 2 doubles (little-endian, no padding: every field is 8 bytes).
_PARAMS_STRUCT = struct.Struct(f"<5Q{5 * MAX_BATCH_DIMS}q9q2d")
assert _PARAMS_STRUCT.size == ATTENTION_PARAMS_DTYPE.itemsize


def _batch_layout(problem, tensors):
    """``(sizes, [strides per tensor])`` of the collapsed batch dimensions (element
    strides, 0 where broadcast), or None past MAX_BATCH_DIMS dimensions."""
    sizes, strides = _collapse_batch(problem.batch_shape,
                                     [_batch_strides(t, problem.batch_shape) for t in tensors])
    return None if len(sizes) > MAX_BATCH_DIMS else (sizes, strides)


def _pack_params(problem, q, k, v, o, lse, extra=(), layout=None):
    """Fill the ``AttentionParams`` struct (see cuda/attention_common.cuh).

    ``extra``: more tensors of shape ``(batch..., rows, cols)`` (the variants' bias and
    mask) whose batch dimensions are collapsed together with those of q, k, v and o.
    ``layout``: ``_batch_layout(problem, (q, k, v, o) + extra)``, possibly with other units
    for the batch strides (the wgmma kernel counts q, k, v's in tensor-map slices);
    computed here when None. Returns ``(params, extra_strides)``, the latter one
    MAX_BATCH_DIMS list of batch strides per extra tensor; ``(None, None)`` if the batch
    needs more than MAX_BATCH_DIMS dimensions even after collapsing (the caller then makes
    q, k, v contiguous).
    """
    tensors = (q, k, v, o) + tuple(extra)
    layout = layout or _batch_layout(problem, tensors)
    if layout is None:
        return None, None
    sizes, strides = layout
    pad = [0] * (MAX_BATCH_DIMS - len(sizes))
    strides = [pad + st for st in strides]
    fields = [q.data.ptr, k.data.ptr, v.data.ptr, o.data.ptr, lse.data.ptr]
    fields += [1] * len(pad) + sizes
    for st in strides[:4]:
        fields += st
    fields += [t.strides[-2] // t.itemsize for t in tensors[:4]]
    fields += [math.prod(problem.batch_shape), problem.Lq, problem.Lk, problem.D, problem.Dv,
               problem.scale, problem.scale * _LOG2_E]
    # CuPy passes a structured NumPy scalar to the kernel by value, as the C struct.
    params = np.frombuffer(_PARAMS_STRUCT.pack(*fields), dtype=ATTENTION_PARAMS_DTYPE)[0]
    return params, strides[4:]


# The layout of ``struct VariantParams`` in cuda/attention_variants.cuh (8-byte fields).
VARIANT_PARAMS_DTYPE = np.dtype(
    [(name, np.uint64) for name in ("bias", "mask", "slopes", "key_end")]
    + [(name, np.int64, (MAX_BATCH_DIMS,)) for name in ("bias_batch_stride", "mask_batch_stride")]
    + [(name, np.int64) for name in (
        "bias_row_stride", "bias_col_stride", "mask_row_stride", "mask_col_stride",
        "bias_is_float", "window_left", "window_right")]
    + [("softcap", np.float64)]
    + [(name, np.uint64) for name in ("cu_seqlens_q", "cu_seqlens_k")]
    + [("dropout_seed", np.uint64), ("dropout_threshold", np.int64),
       ("dropout_scale", np.float64), ("prefix_masks_done", np.int64)])
UNBOUNDED = 1 << 62  # as in cuda/attention_variants.cuh: a window side that is not given


def _as_matrix_view(x):
    """``x`` with at least two dimensions (a view): a bias or mask of shape ``(Lk,)``
    broadcasts as ``(1, Lk)``."""
    return x.reshape((1,) * (2 - x.ndim) + x.shape) if x.ndim < 2 else x


def _matrix_strides(x):
    """Element strides of the last two dimensions, 0 where a dimension broadcasts."""
    return [0 if n == 1 else st // x.itemsize for n, st in zip(x.shape[-2:], x.strides[-2:])]


def _kernel_bias(bias, dtype):
    """``(bias, is_float)``: the bias as the kernel reads it, in place if it holds the
    kernel's element type or float32, else a float32 copy of the (unbroadcast) array."""
    import cupy
    if bias.dtype == dtype:
        return bias, dtype == np.float32
    if bias.dtype == np.float32:
        return bias, True
    return cupy.asarray(bias, dtype=np.float32), True


def _expand(problem, x):
    """x as a contiguous array of the broadcast batch shape (its last two dims kept): for a
    batch that does not collapse into MAX_BATCH_DIMS dimensions."""
    import cupy
    return cupy.ascontiguousarray(cupy.broadcast_to(x, problem.batch_shape + x.shape[-2:]))


def _variant_operands(problem, bias, mask, expand=False):
    """``(kernel_bias, mask, extra)`` as the kernels read them: the bias as
    :func:`_kernel_bias` gives it (``(array, is_float)``), the mask as a matrix view (None
    where absent), and ``extra``, the arrays among them for ``_pack_params``. ``expand``:
    both copied by :func:`_expand` first."""
    kernel_bias = mask_m = None
    if bias is not None:
        b, is_float = _kernel_bias(_as_matrix_view(bias), problem.dtype)
        kernel_bias = (_expand(problem, b) if expand else b, is_float)
    if mask is not None:
        mask_m = _as_matrix_view(mask)
        mask_m = _expand(problem, mask_m) if expand else mask_m
    extra = [x for x in (kernel_bias and kernel_bias[0], mask_m) if x is not None]
    return kernel_bias, mask_m, extra


def _pack_variants(problem, bias, mask, alibi_slopes, extra_strides):
    """Fill the ``VariantParams`` struct. ``bias`` (already as :func:`_kernel_bias` gives
    it, with its is_float flag) and ``mask`` are the matrix views whose batch strides
    ``_pack_params`` collapsed (in that order, the absent ones left out)."""
    import cupy
    fields = np.zeros((), dtype=VARIANT_PARAMS_DTYPE)
    strides = iter(extra_strides)
    if bias is not None:
        bias, is_float = bias
        fields["bias"] = bias.data.ptr
        fields["bias_batch_stride"] = next(strides)
        fields["bias_row_stride"], fields["bias_col_stride"] = _matrix_strides(bias)
        fields["bias_is_float"] = int(is_float)
    if mask is not None:
        fields["mask"] = mask.data.ptr
        fields["mask_batch_stride"] = next(strides)
        fields["mask_row_stride"], fields["mask_col_stride"] = _matrix_strides(mask)
    slopes = None
    if alibi_slopes is not None:  # one slope per batch element, in the accumulator type
        acc = np.float64 if problem.dtype == np.float64 else np.float32
        slopes = cupy.ascontiguousarray(
            cupy.broadcast_to(cupy.asarray(alibi_slopes, dtype=acc), problem.batch_shape))
        fields["slopes"] = slopes.data.ptr
    left, right = problem.window if problem.window is not None else (None, None)
    if problem.causal:
        right = 0 if right is None else min(right, 0)
    fields["window_left"] = UNBOUNDED if left is None else min(left, UNBOUNDED)
    fields["window_right"] = UNBOUNDED if right is None else min(right, UNBOUNDED)
    fields["softcap"] = problem.softcap or 0.0
    if problem.dropout_p > 0:  # the keep mask of _philox.py, drawn in the kernel
        fields["dropout_seed"] = problem.seed
        fields["dropout_threshold"] = _philox.dropout_threshold(problem.dropout_p)
        fields["dropout_scale"] = 1.0 / (1.0 - problem.dropout_p)
    return fields[()], slopes  # slopes: kept alive by the caller until the launch


_LOG2_E = math.log2(math.e)


# ----------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------

class KernelConfig:
    """One launchable variant: where its source is and how to launch it.

    ``kernel`` names the family ("mma", "wgmma", "simt"); ``block_n`` is the key block of
    the wgmma kernel (the rows of its K and V tensor-map boxes), 0 for the others.
    ``persistent``: one block per SM at most, taking tiles from a counter (the last
    argument), instead of a block per ``block_m`` queries of each batch element.
    ``local``: ``flash_fwd_wgmma_local``, the plain Hopper kernel for a window and/or a
    padding mask alone (it takes the variants' parameters, and the counter, as the plain
    kernel).
    """

    __slots__ = ("source", "name_expression", "block_m", "num_threads", "smem_bytes",
                 "align_elems", "pad_d_to", "kernel", "block_n", "persistent", "local")

    def __init__(self, source, name_expression, block_m, num_threads, smem_bytes,
                 align_elems, pad_d_to, kernel="mma", block_n=0, persistent=False,
                 local=False):
        self.source, self.name_expression = source, name_expression
        self.block_m, self.num_threads, self.smem_bytes = block_m, num_threads, smem_bytes
        self.align_elems, self.pad_d_to = align_elems, pad_d_to
        self.kernel, self.block_n = kernel, block_n
        self.persistent, self.local = persistent, local


FWD_KERNELS = ("auto", "mma", "wgmma")


def forward_kernel():
    """The fp16/bf16 forward kernel family that ``CUPYFLASH_FWD_KERNEL`` asks for.

    ``wgmma``: the Hopper kernel (cuda/flash_fwd_wgmma.cuh) wherever it applies: fp16/bf16
    on a GPU of compute capability 9.0, head dims up to 256, and q, k, v that tensor maps
    can describe (otherwise the mma.sync kernel runs). ``auto`` (or unset): as ``wgmma``
    for head dims above 32 (``WGMMA_AUTO_MIN_HEAD_DIM``), the mma.sync kernel for the
    rest. ``mma``: the mma.sync kernel everywhere.
    """
    choice = os.environ.get("CUPYFLASH_FWD_KERNEL", "auto").strip().lower() or "auto"
    if choice not in FWD_KERNELS:
        raise ValueError(f"attention: CUPYFLASH_FWD_KERNEL must be one of "
                         f"{', '.join(FWD_KERNELS)}, got {choice!r}")
    return choice


FWD_PERSISTENT = ("auto", "1", "0")


def forward_persistent():
    """Whether the plain Hopper forward runs persistent, as ``CUPYFLASH_FWD_PERSISTENT``
    asks: ``auto`` (or unset) where :func:`persistent_pays`, ``1`` always, ``0`` never (one
    block per tile), for benchmarks and tests."""
    choice = os.environ.get("CUPYFLASH_FWD_PERSISTENT", "auto").strip().lower() or "auto"
    if choice not in FWD_PERSISTENT:
        raise ValueError(f"attention: CUPYFLASH_FWD_PERSISTENT must be one of "
                         f"{', '.join(FWD_PERSISTENT)}, got {choice!r}")
    return choice


# Where the persistent Hopper forward is faster than one block per tile, as measured on an
# H100 (bf16, both in one run, benchmarks/NOTES.md session 6): at d = 64 everywhere (1-15%,
# most at s = 1k); at d = 128 when causal (0-13%) or with at most 2048 keys (0-4%), while
# non-causal at 16k it is 7% slower; at d = 256 it is 1-7% slower everywhere.
PERSISTENT_MAX_KEYS = 2048


def persistent_pays(head_dim, causal, long_keys):
    """Whether the persistent kernel pays for a padded ``head_dim`` (``long_keys``: more
    than PERSISTENT_MAX_KEYS keys)."""
    return head_dim <= 64 or (head_dim <= 128 and (causal or not long_keys))


def attention_config(D, Dv, dtype_name, compute_capability, causal, variants=False,
                     dropout=False, bias=False, Lk=None, local=False):
    """Choose the kernel variant for one problem: the one place tile sizes are chosen.

    ``variants``: the problem has a bias, mask, window, ALiBi slopes, softcap or dropout;
    the kernel is then built with ``VARIANTS`` (cuda/attention_variants.cuh), which also
    takes the causal mask as part of its window, so ``causal`` is ignored.
    ``local`` (with ``variants``): the only variants are a window (causal or not) and a
    row-broadcast mask (:func:`band_only`); where the Hopper kernel runs, that is
    ``flash_fwd_wgmma_local``, the plain kernel with the plain tiles, and ``Lk`` should
    be the keys one query sees at most (:func:`band_keys`). ``dropout``
    (which needs ``variants``): the Hopper kernel has no dropout, so fp16/bf16 take the
    mma.sync variants kernel on every GPU. ``bias`` (which needs ``variants``): the Hopper
    kernel's tiles for a bias (WGMMA_BIAS_TILES). ``Lk``, the number of keys, decides
    whether the plain Hopper kernel runs persistent (:func:`forward_persistent`; None:
    many keys).
    """
    # (causal reaches _attention_config where the kernel applies it itself: without
    # variants, and in the local kernel's band, where it decides persistence as it does
    # for the plain kernel)
    return _attention_config(D, Dv, dtype_name, compute_capability,
                             causal and (not variants or local),
                             variants, os.environ.get("CUPYFLASH_MMA_TILES", ""),
                             forward_kernel(), dropout, bias and variants, forward_persistent(),
                             Lk is None or Lk > PERSISTENT_MAX_KEYS, local and variants)


@functools.lru_cache(maxsize=512)
def _attention_config(D, Dv, dtype_name, compute_capability, causal, variants, _tiles_knob,
                      fwd_kernel, dropout=False, bias=False, persistent="auto", long_keys=True,
                      local=False):
    if dtype_name in ("float16", "bfloat16"):
        wgmma = not dropout and (fwd_kernel == "wgmma" or (
            fwd_kernel == "auto" and max(D, Dv) > WGMMA_AUTO_MIN_HEAD_DIM))
        if wgmma and compute_capability == 90 and max(D, Dv) <= WGMMA_HEAD_DIMS[-1]:
            persistent = persistent == "1" or (persistent == "auto" and persistent_pays(
                _wgmma_head_dim(D, Dv), causal, long_keys))
            if local:
                return _wgmma_config(D, Dv, dtype_name, False, persistent=persistent,
                                     local=True)
            return _wgmma_config(D, Dv, dtype_name, causal, variants, bias, persistent)
        return _mma_config(D, Dv, dtype_name, compute_capability, causal, variants)
    return _simt_config(D, Dv, dtype_name, compute_capability, causal, variants)


# Tensor-core tiles per padded head dim and mask:
# (BLOCK_M, BLOCK_N, NUM_WARPS, KV_BUFFERS, MIN_BLOCKS). Each warp owns BLOCK_M / NUM_WARPS
# query rows: 32 while the fp32 accumulators fit in registers (HEAD_DIM <= 128), 16 above.
# Measured on an H200 (benchmarks/NOTES.md): one K/V buffer is 3-8% faster than two at
# d = 64 and 128 (two spill at d = 128 with BLOCK_N = 64); at d = 64, BLOCK_N = 128 with two
# blocks per multiprocessor is 3-5% faster than BLOCK_N = 64 with three (MIN_BLOCKS = 3
# caps registers at 168), and BLOCK_N = 32 is 10% slower than 64 at d = 128.
MMA_HEAD_DIMS = (32, 64, 96, 128, 192, 256)
MMA_TILES = {
    # head_dim: {causal: tiles}
    32: {False: (128, 128, 4, 1, 1), True: (128, 128, 4, 1, 1)},
    64: {False: (128, 128, 4, 1, 2), True: (128, 128, 4, 1, 2)},
    96: {False: (128, 64, 4, 1, 1), True: (128, 64, 4, 1, 1)},
    128: {False: (128, 64, 4, 1, 1), True: (128, 64, 4, 1, 1)},
    192: {False: (64, 64, 4, 1, 1), True: (64, 64, 4, 1, 1)},
    256: {False: (64, 64, 4, 1, 1), True: (64, 64, 4, 1, 1)},
}
# The kernels built with VARIANTS (bias, mask, window, ALiBi, softcap). The score modifier
# needs registers the plain tiles do not have (they sit at 238-255 already): with them
# ptxas spills 0.6-2 KiB per thread at d <= 128. Eight warps of 16 rows halve each warp's
# S and O accumulators; no variant spills on sm_80 or sm_90a (ptxas -v, 2026-11-22).
# On an H100 they serve head dims <= 32 and CUPYFLASH_FWD_KERNEL=mma; elsewhere all.
VARIANT_MMA_TILES = {
    32: (128, 128, 8, 1, 1),
    64: (128, 128, 8, 1, 1),
    96: (128, 64, 8, 1, 1),
    128: (128, 64, 8, 1, 1),
    192: (64, 64, 4, 1, 1),
    256: (64, 32, 4, 1, 1),
}


def _mma_smem_bytes(head_dim, block_m, block_n, kv_buffers):
    """As FwdMmaTraits::SMEM_BYTES: a Q tile and kv_buffers K and V tiles, rows padded to 64
    elements."""
    smem_row = -(-head_dim // 64) * 64
    return (block_m + 2 * kv_buffers * block_n) * smem_row * 2


@functools.lru_cache(maxsize=8)
def _tile_overrides(spec):
    """Parse ``CUPYFLASH_MMA_TILES`` ("64:128,128,4,1,1;128:64,64,4,2,1"), a knob for
    benchmarking other tile shapes without editing MMA_TILES (it applies to both masks)."""
    tiles = {}
    for item in filter(None, spec.split(";")):
        head_dim, shape = item.split(":")
        tiles[int(head_dim)] = tuple(int(x) for x in shape.split(","))
    return tiles


def _mma_config(D, Dv, dtype_name, compute_capability, causal, variants=False):
    head_dim = next((h for h in MMA_HEAD_DIMS if h >= D), None)
    if head_dim is None:
        raise ValueError(f"attention: head dims up to {MMA_HEAD_DIMS[-1]} are supported on the "
                         f"GPU, got {D}")
    tiles = _tile_overrides(os.environ.get("CUPYFLASH_MMA_TILES", ""))
    block_m, block_n, num_warps, kv_buffers, min_blocks = tiles.get(
        head_dim, VARIANT_MMA_TILES[head_dim] if variants else MMA_TILES[head_dim][causal])
    name = (f"cupyflash::flash_fwd_mma{'_variants' * variants}<{_DTYPE_TO_CUDA[dtype_name]}, "
            f"{head_dim}, {block_m}, {block_n}, {num_warps}, {kv_buffers}, {min_blocks}"
            f"{'' if variants else ', ' + _cpp_bool(causal)}>")
    return KernelConfig("flash_fwd_mma.cuh", name, block_m, 32 * num_warps,
                        _mma_smem_bytes(head_dim, block_m, block_n, kv_buffers),
                        align_elems=8, pad_d_to=8)


def mma_attention_variants():
    """The (source, name_expression) of every tensor-core forward variant."""
    return [(c.source, c.name_expression)
            for c in (_mma_config(h, h, dt, 90, causal, variants)
                      for h in MMA_HEAD_DIMS for dt in ("float16", "bfloat16")
                      for causal, variants in ((False, False), (True, False), (False, True)))]


# Hopper tiles per padded head dim: (BLOCK_N, NUM_CONSUMERS, STAGES) of
# cuda/flash_fwd_wgmma.cuh; BLOCK_M = 64 * NUM_CONSUMERS query rows per block, plus one
# producer warpgroup. FlashAttention-3's shapes, adapted to fit without spills (registers
# per consumer thread: 240 with two consumers, 160 with three). Stages measured on an H100
# (benchmarks/tune_tiles.py --kernel wgmma, NOTES.md session 4): a third K/V stage is
# 0-11% faster at d = 128 (most at s = 1k, causal) and 1-3% at d = 64; (64 keys, 4
# stages) at d = 128 is 5-15% slower.
#   d = 64: three consumers (BLOCK_M = 192), as FA3: at d = 64 the products are short
#           and the softmax relatively long, so more warpgroups take turns; 3 stages.
#   d = 128: two consumers x 64 rows, BLOCK_N = 128, three stages (225 KiB of smem).
#   d = 256: BLOCK_N = 64 (acc alone is 128 registers a thread), two stages (192 KiB;
#            a third does not fit).
WGMMA_HEAD_DIMS = (64, 128, 256)
# The Hopper kernel numbers tiles (query block, batch element) and batch elements in 32
# bits (its producer has few registers; tensor-map coordinates are 32-bit anyway). Past
# this many tiles (broadcast q, k and v can make a batch that large with little memory),
# the mma.sync kernel runs.
WGMMA_MAX_TILES = 2 ** 31 - 2 ** 16
# auto picks the wgmma kernel above this head dim. On an H100 (benchmarks/NOTES.md,
# session 4) it beat the mma.sync kernel at d = 64, 128, 256, s = 1k..16k, causal and not
# (1.0-2.3x); at d <= 32 padding to 64 would double the work of Q K^T.
WGMMA_AUTO_MIN_HEAD_DIM = 32
WGMMA_TILES = {64: (128, 3, 3), 128: (128, 2, 3), 256: (64, 2, 2)}
# With variants, d = 64 takes 64-key blocks: with 128 the score modifier's registers do
# not fit in the 160 a consumer thread has with three consumers (ptxas spills 388 bytes).
WGMMA_VARIANT_TILES = {**WGMMA_TILES, 64: (64, 3, 2)}
# With a bias, d = 128 takes two stages: on the H100 a (B, 1, 1, s) bias costs 2.31-2.66x
# plain attention with two, 2.85-2.97x with three (s = 4k, 16k; the other variants are
# 0-10% faster with three; benchmarks/NOTES.md, session 5).
WGMMA_BIAS_TILES = {**WGMMA_VARIANT_TILES, 128: (128, 2, 2)}
# A window and/or padding mask alone (flash_fwd_wgmma_local): the plain tiles. (At d = 64 three consumers, 192
# query rows a block, visit 10 key blocks for a 1k window where two visit 9 for 128 rows.)
WGMMA_LOCAL_TILES = dict(WGMMA_TILES)


def _wgmma_smem_bytes(head_dim, block_m, block_n, stages):
    """As FwdWgmmaTraits::SMEM_BYTES: 1024 bytes of alignment slack, Q, ``stages`` K and V
    tiles, 2 + 4 * stages mbarriers and the tile slot (32 bytes)."""
    return 1024 + 2 * head_dim * (block_m + 2 * stages * block_n) + 8 * (2 + 4 * stages) + 32


def _wgmma_head_dim(D, Dv):
    """The HEAD_DIM of WGMMA_HEAD_DIMS that ``max(D, Dv)`` is padded up to."""
    return next(h for h in WGMMA_HEAD_DIMS if h >= max(D, Dv))


def _wgmma_config(D, Dv, dtype_name, causal, variants=False, bias=False, persistent=False,
                  local=False):
    """The Hopper kernel of cuda/flash_fwd_wgmma.cuh for one problem (sm_90 only);
    ``flash_fwd_wgmma_variants`` with ``variants`` (``causal`` is then ignored);
    ``flash_fwd_wgmma_local`` with ``local`` (:func:`band_only`, WGMMA_LOCAL_TILES). The
    plain and local kernels are persistent if ``persistent``; the variants kernels never
    are.

    ``max(D, Dv)`` is padded up to a HEAD_DIM in WGMMA_HEAD_DIMS; the padding costs no
    copy, since the tensor maps fill columns past D (Dv) with zeros. q, k, v and out must
    have 16-byte aligned rows (``align_elems = pad_d_to = 8``), as for the mma kernel.
    """
    head_dim = _wgmma_head_dim(D, Dv)
    table = ((WGMMA_BIAS_TILES if bias else WGMMA_VARIANT_TILES) if variants
             else WGMMA_LOCAL_TILES if local else WGMMA_TILES)
    block_n, consumers, stages = table[head_dim]
    block_m = 64 * consumers
    persistent = persistent and not variants
    tiles = f"<{_DTYPE_TO_CUDA[dtype_name]}, {head_dim}, {block_n}, {consumers}, {stages}"
    if local:
        name = f"cupyflash::flash_fwd_wgmma_local{tiles}, {_cpp_bool(persistent)}>"
    elif variants:
        name = f"cupyflash::flash_fwd_wgmma_variants{tiles}>"
    else:
        name = f"cupyflash::flash_fwd_wgmma{tiles}, {_cpp_bool(causal)}, {_cpp_bool(persistent)}>"
    return KernelConfig("flash_fwd_wgmma.cuh", name, block_m, 128 * (consumers + 1),
                        _wgmma_smem_bytes(head_dim, block_m, block_n, stages),
                        align_elems=8, pad_d_to=8, kernel="wgmma", block_n=block_n,
                        persistent=persistent, local=local)


def wgmma_attention_variants():
    """The (source, name_expression) of every Hopper forward variant (sm_90a only)."""
    return list(dict.fromkeys(
        (c.source, c.name_expression)
        for c in (_wgmma_config(h, h, dt, causal, variants, bias, persistent, local)
                  for h in WGMMA_HEAD_DIMS for dt in ("float16", "bfloat16")
                  for causal, variants, bias, local in (
                      (False, False, False, False), (True, False, False, False),
                      (False, True, False, False), (False, True, True, False),
                      (False, False, False, True))
                  for persistent in (True, False))))


# attention_varlen's fp16/bf16 packed kernels (flash_fwd_{mma,wgmma}_varlen), for head dims
# up to this. Above it the sequences' own pointers and lengths, held in registers, spill the
# d = 192 / 256 kernels (ptxas -v, 2026-11-22); attention_varlen then runs the forward per
# sequence. (flash_fwd_simt_varlen, float32/float64, has every head dim.)
VARLEN_MAX_HEAD_DIM = 128


def varlen_config(D, Dv, dtype_name, compute_capability, causal):
    """The packed-sequence forward: ``flash_fwd_mma_varlen`` or, where
    :func:`attention_config` picks the Hopper kernel, ``flash_fwd_wgmma_varlen`` for
    fp16/bf16; ``flash_fwd_simt_varlen`` for float32/float64. The mma and SIMT ones are
    the variants kernels under the varlen entry point (the causal mask is their window);
    the Hopper one is the plain kernel's body and tiles, causal or not, persistent over
    the tiles of :func:`varlen_tiles` unless ``CUPYFLASH_FWD_PERSISTENT=0`` (then one
    block per tile). None for fp16/bf16 head dims above VARLEN_MAX_HEAD_DIM."""
    if dtype_name in ("float16", "bfloat16") and max(D, Dv) > VARLEN_MAX_HEAD_DIM:
        return None
    cfg = attention_config(max(D, Dv), Dv, dtype_name, compute_capability, False,
                           variants=True)
    if cfg.kernel == "wgmma":
        return _wgmma_varlen_config(D, Dv, dtype_name, causal,
                                    persistent=forward_persistent() != "0")
    return _as_varlen(cfg)


def _as_varlen(cfg):
    name = cfg.name_expression.replace("_variants<", "_varlen<")
    return KernelConfig(cfg.source, name, cfg.block_m, cfg.num_threads, cfg.smem_bytes,
                        cfg.align_elems, cfg.pad_d_to, cfg.kernel, cfg.block_n)


def _wgmma_varlen_config(D, Dv, dtype_name, causal, persistent):
    """``flash_fwd_wgmma_varlen``: the plain Hopper kernel's tiles, persistent or one
    block per tile."""
    cfg = _wgmma_config(D, Dv, dtype_name, causal, persistent=persistent)
    name = cfg.name_expression.replace("flash_fwd_wgmma<", "flash_fwd_wgmma_varlen<")
    return KernelConfig(cfg.source, name, cfg.block_m, cfg.num_threads, cfg.smem_bytes,
                        cfg.align_elems, cfg.pad_d_to, cfg.kernel, cfg.block_n,
                        persistent=persistent)


def varlen_tiles(lengths_q, lengths_k, heads, block_m, block_n, causal):
    """The persistent varlen kernel's tiles: the sequences that have queries, heaviest
    first, as one int32 array ``[first tile of each (n of them), number of tiles,
    sequence of each]``.

    A sequence's tiles are its query blocks for each of its ``heads``, head by head (a
    dense batch element each, the kernel taking its query blocks in the dense kernel's
    order). A query block weighs the key blocks it visits (causal: those up to the
    bottom-right aligned diagonal of its last row) plus one for its fixed cost (Q, the
    epilogue). Taken in this order from a counter, the longest sequences start at once
    and the short ones fill the gaps at the end (longest-processing-time-first list
    scheduling, by sequence), while the blocks running at one time work on the K and V
    of a few heads."""
    lq = np.asarray(lengths_q, dtype=np.int64)
    lk = np.asarray(lengths_k, dtype=np.int64)
    n_blocks = -(-lq // block_m)
    seq = np.repeat(np.arange(len(lq), dtype=np.int64), n_blocks)
    block = np.arange(len(seq), dtype=np.int64) - np.repeat(np.cumsum(n_blocks) - n_blocks,
                                                            n_blocks)
    keys = lk[seq]
    if causal:  # query i of the sequence sees keys j <= i + Lk - Lq
        last_row = np.minimum((block + 1) * block_m, lq[seq])
        keys = np.clip(last_row + lk[seq] - lq[seq], 0, lk[seq])
    weight = np.bincount(seq, weights=-(-keys // block_n) + 1, minlength=len(lq))
    order = np.argsort(-weight, kind="stable")
    order = order[n_blocks[order] > 0]
    first = np.concatenate([[0], np.cumsum(n_blocks[order] * heads)])
    return np.concatenate([first, order]).astype(np.int32)


def varlen_attention_variants():
    """The (source, name_expression, arch) of every packed-sequence forward."""
    mma = [(c.source, c.name_expression, arch)
           for arch in ("sm_80", "sm_90a")
           for c in (_as_varlen(_mma_config(h, h, dt, 90, False, variants=True))
                     for h in MMA_HEAD_DIMS if h <= VARLEN_MAX_HEAD_DIM
                     for dt in ("float16", "bfloat16"))]
    wgmma = [(c.source, c.name_expression, "sm_90a")
             for c in (_wgmma_varlen_config(h, h, dt, causal, persistent)
                       for h in WGMMA_HEAD_DIMS if h <= VARLEN_MAX_HEAD_DIM
                       for dt in ("float16", "bfloat16") for causal in (False, True)
                       for persistent in (True, False))]
    simt = [(c.source, c.name_expression, arch)
            for arch in ("sm_80", "sm_90a")
            for c in (_as_varlen(_simt_config(h, h, dt, 90, False, variants=True))
                      for dt in ("float32", "float64") for h in (32, 64, 128, 256))]
    return mma + wgmma + simt


def _wgmma_arguments(problem, cfg, q, k, v, o, lse, extra=()):
    """``(params, (map_q, map_k, map_v), extra_strides)``: the wgmma kernel's arguments
    and the batch strides of ``extra`` (the variants' bias and mask, as for
    ``_pack_params``); or None when tensor maps cannot describe q, k or v (negative
    strides, broadcast rows, batch strides that are not multiples of one another, more
    than MAX_BATCH_DIMS batch dimensions) and the caller should use the mma.sync kernel
    instead.

    Each of q, k, v is read through a 3-D map (head dim, L, slices): its batch offsets,
    all multiples of its smallest non-zero batch stride, index slices of that stride
    (``_tensor_map.slice_layout``), and the batch strides in ``AttentionParams`` are
    packed in those units. o keeps element strides (the kernel writes it with plain
    stores).
    """
    layout = _batch_layout(problem, (q, k, v, o) + tuple(extra))
    if layout is None:
        return None
    sizes, strides = layout
    sliced = slice_maps(sizes, strides, (q, k, v), (cfg.block_m, cfg.block_n, cfg.block_n))
    if sliced is None:
        return None
    maps, units = sliced
    params, extra_strides = _pack_params(problem, q, k, v, o, lse, extra,
                                         layout=(sizes, units + strides[3:]))
    return params, maps, extra_strides


def slice_maps(sizes, strides, tensors, rows):
    """``(maps, units)``: the 3-D tensor map of each of ``tensors`` (batch ``strides`` over
    the collapsed batch ``sizes``) for boxes of ``rows`` rows, and its batch strides in
    slices (``_tensor_map.slice_layout``); None when a map cannot describe one of them."""
    maps, units = [], []
    for x, st, r in zip(tensors, strides, rows):
        sliced = _tensor_map.slice_layout(sizes, st)
        if sliced is None:
            return None
        slice_stride, n_slices, in_slices = sliced
        tensor_map = _tensor_map.attention_map(x, slice_stride, n_slices, r)
        if tensor_map is None:
            return None
        maps.append(tensor_map)
        units.append(in_slices)
    return tuple(maps), units


@functools.lru_cache(maxsize=None)
def _launch_registers(function_ptr):
    """Registers per thread a loaded kernel is launched with (CU_FUNC_ATTRIBUTE_NUM_REGS)."""
    from cupy_backends.cuda.api import driver
    return driver.funcGetAttribute(driver.CU_FUNC_ATTRIBUTE_NUM_REGS, function_ptr)


def check_register_split(kernel, num_threads, name_expression, fn="attention",
                         knob="CUPYFLASH_FWD_KERNEL"):
    """Refuse to launch a wgmma kernel whose register split cannot be met.

    The setmaxnreg split of FwdWgmmaTraits and BwdWgmmaTraits (producer down, consumers up)
    hands over exactly the registers the block is launched with: 65536 / threads a thread,
    rounded down to 8 (168 at 384 threads, 128 at 512). ptxas gives the kernel that many under
    ``__launch_bounds__(threads, 1)`` (tests/test_kernel_compile.py checks it for the CI's
    NVRTC), but the kernel is compiled at run time by whatever NVRTC is installed. Launched
    with fewer, the consumers' ``setmaxnreg.inc`` would wait forever for registers the
    block's pool never gets (PTX ISA, setmaxnreg: ".inc blocks the execution until enough
    registers are available in the CTA's register pool"): a hung GPU, not an error.
    """
    expected = 65536 // num_threads // 8 * 8
    got = _launch_registers(kernel.ptr)
    if got != expected:
        raise RuntimeError(
            f"{fn}: {name_expression} was compiled to {got} registers a thread, "
            f"but its setmaxnreg split needs exactly {expected} (this NVRTC's ptxas differs "
            f"from the one it was checked with); launching it would hang. Set "
            f"{knob}=mma to use the mma.sync kernel")


def _simt_config(D, Dv, dtype_name, compute_capability, causal, variants=False):
    """The float32/float64 FMA kernel of cuda/flash_fwd_simt.cuh for one problem.

    ``D`` is padded up to the next ``HEAD_DIM`` in (32, 64, 128, 256). The tile table
    repeats ``SimtTiles`` of the .cuh (tests/test_kernel_compile.py checks that the two
    agree) and the shared memory is ``SimtTraits::SMEM_BYTES``: Q and K tiles with rows
    padded by 16 bytes, an unpadded V tile, and the ``BLOCK_M x (BLOCK_N + 4)`` tile of
    probabilities. Every entry fits in 99 KiB, the smallest opt-in limit of a GPU from
    sm_80 on, so ``compute_capability`` does not change the choice. K and V arrive in
    16-byte copies: rows must be 16-byte aligned, with a length that is a multiple of
    16 bytes (``align_elems = pad_d_to = 16 // itemsize``).
    """
    tiles = {  # (BLOCK_M, BLOCK_N) per HEAD_DIM; 128 threads in every block
        "float32": {32: (64, 64), 64: (64, 64), 128: (64, 32), 256: (32, 24)},
        "float64": {32: (64, 32), 64: (64, 32), 128: (32, 24), 256: (16, 16)},
    }[dtype_name]
    D = max(D, Dv)
    head_dim = next((h for h in sorted(tiles) if h >= D), None)
    if head_dim is None:
        raise ValueError(f"attention: head dims up to {max(tiles)} are supported on the GPU, "
                         f"got {D}")
    block_m, block_n = tiles[head_dim]
    itemsize = np.dtype(dtype_name).itemsize
    vec = 16 // itemsize
    smem_bytes = itemsize * ((block_m + block_n) * (head_dim + vec)  # Q, K (padded rows)
                             + block_n * head_dim                    # V
                             + block_m * (block_n + 4))              # P~
    name = (f"cupyflash::flash_fwd_simt{'_variants' * variants}<{_DTYPE_TO_CUDA[dtype_name]}, "
            f"{head_dim}{'' if variants else ', ' + _cpp_bool(causal)}>")
    return KernelConfig("flash_fwd_simt.cuh", name, block_m, 128, smem_bytes,
                        align_elems=vec, pad_d_to=vec, kernel="simt")


def simt_attention_variants():
    """The (source, name_expression) of every float32/float64 forward variant."""
    return [(c.source, c.name_expression)
            for c in (_simt_config(h, h, dt, 90, causal, variants)
                      for dt in ("float32", "float64") for h in (32, 64, 128, 256)
                      for causal, variants in ((False, False), (True, False), (False, True)))]


class SimtBackwardConfig:
    """The two float32/float64 backward kernels of cuda/flash_bwd_simt.cuh for one problem.

    ``flash_bwd_simt`` (``dkdv_name``, or ``dkdv_atomic_name`` to also add dQ into a zeroed
    ``dq_accum`` by atomics) runs one block per ``block_n`` keys: grid
    ``launch_grid(ceil(Lk / block_n), n_batch)``, ``dkdv_smem_bytes`` of shared memory.
    ``flash_bwd_dq_simt`` (``dq_name``, the deterministic dQ, plain stores) runs one block
    per ``block_m`` queries: grid ``launch_grid(ceil(Lq / block_m), n_batch)``,
    ``dq_smem_bytes``. Both take ``num_threads`` threads. ``dkdv_block_m`` and
    ``dq_block_n`` are the tiles each kernel streams through (for information).
    """

    __slots__ = ("source", "dkdv_name", "dkdv_atomic_name", "dq_name", "head_dim", "block_n",
                 "block_m", "dkdv_block_m", "dq_block_n", "num_threads", "dkdv_smem_bytes",
                 "dq_smem_bytes", "align_elems", "pad_d_to")

    def __init__(self, **fields):
        for name in self.__slots__:
            setattr(self, name, fields.pop(name))
        assert not fields, fields

    def __repr__(self):
        return "SimtBackwardConfig(" + ", ".join(
            f"{n}={getattr(self, n)!r}" for n in self.__slots__) + ")"


# (BLOCK_M, BLOCK_N) of flash_bwd_simt and (DQ_BLOCK_M, DQ_BLOCK_N) of flash_bwd_dq_simt per
# HEAD_DIM: SimtBwdTiles of cuda/flash_bwd_simt.cuh, whose comment says why.
SIMT_BACKWARD_TILES = {
    "float32": {32: (32, 64, 64, 64), 64: (32, 64, 64, 32), 128: (32, 32, 32, 32),
                256: (16, 16, 16, 16)},
    "float64": {32: (32, 32, 64, 32), 64: (16, 32, 32, 32), 128: (16, 16, 16, 16),
                256: (8, 16, 16, 8)},
}


def _simt_backward_config(D, Dv, dtype_name, causal, variants=False):
    """The float32/float64 FMA backward kernels of cuda/flash_bwd_simt.cuh for one problem.

    ``max(D, Dv)`` is padded up to the next ``HEAD_DIM`` in (32, 64, 128, 256). The shared
    memory is ``SimtBwdLayout``'s: Q, dO, K and V tiles with rows of ``HEAD_DIM + VEC``
    elements, and ``BLOCK_M x (BLOCK_N + VEC)`` tiles of dS and (flash_bwd_simt only) P.
    Every entry fits in 99 KiB, so the choice does not depend on the GPU. q, k, v and dout
    are read with 16-byte copies, as in the forward (``align_elems = pad_d_to = VEC``);
    dk, dv and dq_accum are written element by element, any ``grad_row``.
    """
    tiles = SIMT_BACKWARD_TILES[dtype_name]
    width = max(D, Dv)
    head_dim = next((h for h in sorted(tiles) if h >= width), None)
    if head_dim is None:
        raise ValueError(f"attention backward: head dims up to {max(tiles)} are supported on "
                         f"the GPU, got {width}")
    block_m, block_n, dq_block_m, dq_block_n = tiles[head_dim]
    itemsize = np.dtype(dtype_name).itemsize
    vec = 16 // itemsize
    stride = head_dim + vec  # padded rows of Q, dO, K, V
    ctype = _DTYPE_TO_CUDA[dtype_name]
    if variants:  # the causal mask is part of the window (cuda/attention_variants.cuh)
        names = (f"cupyflash::flash_bwd_simt_variants<{ctype}, {head_dim}, false>",
                 f"cupyflash::flash_bwd_simt_variants<{ctype}, {head_dim}, true>",
                 f"cupyflash::flash_bwd_dq_simt_variants<{ctype}, {head_dim}>")
    else:
        mask = _cpp_bool(causal)
        names = (f"cupyflash::flash_bwd_simt<{ctype}, {head_dim}, {mask}, false>",
                 f"cupyflash::flash_bwd_simt<{ctype}, {head_dim}, {mask}, true>",
                 f"cupyflash::flash_bwd_dq_simt<{ctype}, {head_dim}, {mask}>")
    return SimtBackwardConfig(
        source="flash_bwd_simt.cuh",
        dkdv_name=names[0], dkdv_atomic_name=names[1], dq_name=names[2],
        head_dim=head_dim, block_n=block_n, block_m=dq_block_m, dkdv_block_m=block_m,
        dq_block_n=dq_block_n, num_threads=128,
        dkdv_smem_bytes=itemsize * (2 * (block_m + block_n) * stride     # Q, dO, K, V
                                    + 2 * block_m * (block_n + vec)),    # dS, P
        dq_smem_bytes=itemsize * (2 * (dq_block_m + dq_block_n) * stride
                                  + dq_block_m * (dq_block_n + vec)),    # dS
        align_elems=vec, pad_d_to=vec)


def simt_backward_variants():
    """The (source, name_expression) of every float32/float64 backward kernel variant."""
    variants = []
    for dtype_name in ("float32", "float64"):
        for head_dim in (32, 64, 128, 256):
            for causal, with_variants in ((False, False), (True, False), (False, True)):
                c = _simt_backward_config(head_dim, head_dim, dtype_name, causal, with_variants)
                variants += [(c.source, c.dkdv_name), (c.source, c.dkdv_atomic_name),
                             (c.source, c.dq_name)]
    return variants


def all_attention_variants():
    """Every (source, name_expression) the library can request, for the CI compile check."""
    return mma_attention_variants() + [MASK_KEY_END]


@functools.lru_cache(maxsize=None)
def num_sms(device_id):
    """The number of SMs of a device."""
    import cupy
    return cupy.cuda.runtime.deviceGetAttribute(
        cupy.cuda.runtime.cudaDevAttrMultiProcessorCount, device_id)


# Counters in global memory, per (device, stream, user): int32 zeros that a kernel counts
# in and leaves zero again when it ends (the persistent forward's tile counter; the decode
# kernel's split arrivals, whose last split resets its counter). Calls on one stream run
# one after another and share its buffer; calls on different streams never share one.
_STREAM_COUNTERS = {}


def stream_counters(device_id, user, count):
    """A zeroed int32 buffer of at least ``count`` counters, for ``user``'s launches on the
    current stream."""
    import cupy
    key = (device_id, cupy.cuda.get_current_stream().ptr, user)
    buf = _STREAM_COUNTERS.get(key)
    if buf is None or buf.size < count:
        buf = cupy.zeros(max(count, 1024), dtype=cupy.int32)  # enqueued on that stream
        _STREAM_COUNTERS[key] = buf
    return buf


# Scratch memory in global memory, per (device, stream, user): what one launch writes and
# the launches after it on the same stream read before the next call does (the decode
# kernel's split partials), so that a call allocates nothing for it. Calls on one stream
# run in order (a kernel launched with PDL waits for the grid before it before touching
# memory); calls on different streams never share a buffer. A buffer is the largest its
# stream has needed, kept until the process ends (a few hundred KiB for decoding).
_STREAM_WORKSPACES = {}


def stream_workspace(device_id, user, nbytes):
    """The device address of at least ``nbytes`` bytes (256-byte aligned) of scratch for
    ``user``'s launches on the current stream; its contents are whatever the last such
    launch left."""
    import cupy
    key = (device_id, cupy.cuda.get_current_stream().ptr, user)
    buf = _STREAM_WORKSPACES.get(key)
    if buf is None or buf.nbytes < nbytes:
        buf = cupy.empty(max(nbytes, 1 << 16), dtype=cupy.uint8)
        _STREAM_WORKSPACES[key] = buf
    return buf.data.ptr


# Small int32 arrays uploaded for the kernels (attention_varlen's host offsets and tile
# lists), kept by content per (device, stream): a model calls attention_varlen once per
# layer with the same offsets, and only the first call copies them. An array dropped from
# here is freed to CuPy's pool, which hands it out again only to later work on that stream.
_UPLOADS = collections.OrderedDict()
_UPLOADS_LOCK = threading.Lock()
UPLOADS_KEPT = 64


def uploaded(device_id, key, make):
    """The device copy of the int32 host array ``make()`` that ``key`` (hashable, a
    function of the array's content alone) names, for the current stream of
    ``device_id``: copied once (CuPy's pinned staging: no wait for the GPU), then kept
    for the next UPLOADS_KEPT distinct keys. Kernels only read it."""
    import cupy
    with _on_device(device_id):
        full_key = (device_id, cupy.cuda.get_current_stream().ptr) + key
        with _UPLOADS_LOCK:
            x = _UPLOADS.get(full_key)
            if x is not None:
                _UPLOADS.move_to_end(full_key)
                return x
        x = cupy.asarray(make(), dtype=np.int32)
        with _UPLOADS_LOCK:
            _UPLOADS[full_key] = x
            while len(_UPLOADS) > UPLOADS_KEPT:
                _UPLOADS.popitem(last=False)
        return x


def launch_grid(num_m_blocks, n_batch):
    """``(m blocks, batch, batch overflow)``: a kernel's batch index is
    ``blockIdx.z * gridDim.y + blockIdx.y`` (blocks past ``n_batch`` return at once)."""
    y = min(n_batch, 65535)
    return (num_m_blocks, y, -(-n_batch // y))


def _mask_key_end(device_id, cc, params, variant_params):
    """For a mask broadcast along the rows, per batch element: one past the last key it
    keeps, then (after all of those) its first hidden key, as one int64 device array of
    2 n_batch (``mask_key_end`` of cuda/attention_variants.cuh), so that the forward
    kernels skip the key blocks of a padding mask's padding and read no mask byte
    before it."""
    import cupy
    n_batch = int(params["n_batch"])
    key_end = cupy.empty(2 * n_batch, dtype=np.int64)
    kernel = _kernels.get_function(device_id, MASK_KEY_END[0], MASK_KEY_END[1],
                                   _kernels.arch_for(cc), 0)
    kernel((min(n_batch, 1 << 16), 1, 1), (MASK_KEY_END_THREADS, 1, 1),
           (params, variant_params, key_end))
    return key_end


MASK_KEY_END_THREADS = 256
MASK_KEY_END = ("attention_variants.cuh", f"cupyflash::mask_key_end<{MASK_KEY_END_THREADS}>")


def has_variants(problem, bias=None, mask=None, alibi_slopes=None):
    """Whether a problem needs the kernels built with VARIANTS (dropout included)."""
    return (bias is not None or mask is not None or alibi_slopes is not None
            or problem.window is not None or problem.softcap is not None
            or problem.dropout_p > 0)


def band_only(problem, bias=None, mask=None, alibi_slopes=None):
    """Whether a problem's only variants are a window (causal or not) and a mask
    broadcast along the query rows (a padding mask), at least one of them: what
    ``flash_fwd_wgmma_local`` computes, the mask where it keeps a prefix of the keys."""
    row_mask = mask is None or _as_matrix_view(mask).shape[-2] == 1
    return ((problem.window is not None or mask is not None) and row_mask and bias is None
            and alibi_slopes is None and problem.softcap is None and problem.dropout_p == 0)


def band_keys(problem):
    """The most keys one query sees through a window: left + right + 1 (a causal
    window's right side is 0), at most Lk (Lk without a window)."""
    if problem.window is None:
        return problem.Lk
    left, right = problem.window
    if problem.causal:
        right = 0 if right is None else min(right, 0)
    if left is None or right is None:
        return problem.Lk
    return max(0, min(problem.Lk, left + right + 1))


def attention_forward(q, k, v, problem, out=None, bias=None, mask=None, alibi_slopes=None):
    """Return ``(out, lse)`` computed on the GPU for a validated problem (with the
    variants' arrays, validated by ``_api.validate_variants``)."""
    import cupy

    fn = "attention"
    arrays = [("q", q), ("k", k), ("v", v)] + ([("out", out)] if out is not None else [])
    arrays += [(n, a) for n, a in (("bias", bias), ("mask", mask),
                                   ("alibi_slopes", alibi_slopes)) if a is not None]
    device_id = _device_of(fn, arrays)
    with _on_device(device_id):
        lse_dtype = np.float64 if problem.dtype == np.float64 else np.float32
        result = out if out is not None else cupy.empty(problem.out_shape, dtype=problem.dtype)
        lse = cupy.empty(problem.lse_shape, dtype=lse_dtype)
        if lse.size == 0:  # no query row at all (Dv = 0 alone still needs lse)
            return result, lse
        if problem.Lk == 0:  # no key at all: zeros, lse = -inf (no kernel needed)
            result.fill(0)
            lse.fill(-np.inf)
            return result, lse

        variants = has_variants(problem, bias, mask, alibi_slopes)
        local = variants and band_only(problem, bias, mask, alibi_slopes)
        cc = _compute_capability(device_id)
        config = functools.partial(attention_config, max(problem.D, problem.Dv), problem.Dv,
                                   problem.dtype.name, cc, problem.causal, variants,
                                   dropout=problem.dropout_p > 0, bias=bias is not None)
        cfg = config(Lk=band_keys(problem) if local else problem.Lk, local=local)
        qk = [_kernel_ready(t, cfg.align_elems, cfg.pad_d_to) for t in (q, k, v)]
        o = _kernel_ready(result, cfg.align_elems, cfg.pad_d_to)
        slopes, maps = None, ()
        kernel_bias, mask_m, extra = _variant_operands(problem, bias, mask)
        packed = None
        n_batch = math.prod(problem.batch_shape)
        if cfg.kernel == "wgmma" and -(-problem.Lq // cfg.block_m) * n_batch < WGMMA_MAX_TILES:
            packed = _wgmma_arguments(problem, cfg, *qk, o, lse, extra)
        # The local kernel takes the batch elements whose padding mask keeps a prefix of the
        # keys, the variants kernel (rest) the others, in a second launch.
        rest = None
        if cfg.local and mask is not None and packed is not None:
            rest_cfg = config(Lk=problem.Lk)
            rest_packed = None
            if rest_cfg.kernel == "wgmma" and (
                    -(-problem.Lq // rest_cfg.block_m) * n_batch < WGMMA_MAX_TILES):
                rest_packed = _wgmma_arguments(problem, rest_cfg, *qk, o, lse, extra)
            if rest_packed is None:  # (then the mma.sync variants kernel, below, for all)
                cfg, packed = rest_cfg, None
            else:
                rest = rest_cfg, rest_packed
        if cfg.kernel == "wgmma":
            if packed is None:  # a layout tensor maps cannot describe (or too many tiles):
                # the mma.sync kernel
                cfg = _mma_config(max(problem.D, problem.Dv), problem.Dv, problem.dtype.name,
                                  cc, problem.causal and not variants, variants)
            else:
                params, maps, extra_strides = packed
        if packed is None:
            params, extra_strides = _pack_params(problem, *qk, o, lse, extra)
            if params is None:  # too many batch dims even after collapsing: copy to contiguous
                qk = [_expand(problem, t) for t in qk]
                kernel_bias, mask_m, extra = _variant_operands(problem, bias, mask, expand=True)
                params, extra_strides = _pack_params(problem, *qk, o, lse, extra)
        args = (params,)
        key_end = None
        if variants:
            variant_params, slopes = _pack_variants(problem, kernel_bias, mask_m,
                                                    alibi_slopes, extra_strides)
            if mask_m is not None and variant_params["mask_row_stride"] == 0:
                key_end = _mask_key_end(device_id, cc, params, variant_params)
                variant_params["key_end"] = key_end.data.ptr
            args = (params, variant_params)
        args += maps  # the wgmma kernel's tensor maps of q, k, v

        kernel = _kernels.get_function(device_id, cfg.source, cfg.name_expression,
                                       _kernels.arch_for(cc), cfg.smem_bytes)
        if cfg.kernel == "wgmma":
            check_register_split(kernel, cfg.num_threads, cfg.name_expression)
        n_m_blocks = -(-problem.Lq // cfg.block_m)
        grid = launch_grid(n_m_blocks, n_batch)
        if cfg.persistent:  # (fewer than WGMMA_MAX_TILES tiles: 32-bit tile numbers)
            grid = (min(n_m_blocks * n_batch, num_sms(device_id)), 1, 1)
        if cfg.kernel == "wgmma" and (cfg.local or not variants):  # (read only when persistent)
            args += (stream_counters(device_id, "tiles", 1),)
        kernel(grid, (cfg.num_threads, 1, 1), args, shared_mem=cfg.smem_bytes)
        if rest is not None:  # the masks with holes (the local kernel skipped them)
            rest_cfg, (rest_params, rest_maps, _) = rest
            rest_variants = np.array(variant_params, dtype=VARIANT_PARAMS_DTYPE)
            rest_variants["prefix_masks_done"] = 1
            kernel = _kernels.get_function(device_id, rest_cfg.source,
                                           rest_cfg.name_expression, _kernels.arch_for(cc),
                                           rest_cfg.smem_bytes)
            check_register_split(kernel, rest_cfg.num_threads, rest_cfg.name_expression)
            kernel(launch_grid(-(-problem.Lq // rest_cfg.block_m), n_batch),
                   (rest_cfg.num_threads, 1, 1),
                   (rest_params, rest_variants[()]) + tuple(rest_maps),
                   shared_mem=rest_cfg.smem_bytes)
        del slopes, key_end  # (the pool reuses memory only for later work on this stream)
        if o is not result:
            result[...] = o[..., :problem.Dv]
        return result, lse


def attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, causal, scale, out, lse, host_lengths):
    """The forward of ``attention_varlen`` over all packed sequences in one launch:
    :func:`prepare_varlen_forward`, then its launch. Returns False, having launched
    nothing, where no packed kernel applies (the caller then runs the forward per
    sequence); the arguments are those of the two steps."""
    launch = prepare_varlen_forward(q, k, v, len(cu_seqlens_q) - 1, causal, scale, out, lse)
    if launch is None:
        return False
    launch(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, host_lengths)
    return True


def prepare_varlen_forward(q, k, v, n_seq, causal, scale, out, lse):
    """Everything of the packed-sequence forward that does not depend on the offsets'
    values (:func:`varlen_config`, the kernel, aligned copies, tensor maps, the
    parameters), so that ``attention_varlen`` does it before it reads device offsets to
    the host, which waits for the GPU to drain; the GPU then idles only for the work
    after that read. Returns None where no packed kernel applies (fp16/bf16 head dims
    above VARLEN_MAX_HEAD_DIM, tensors tensor maps cannot describe; nothing is launched,
    and the caller runs the forward per sequence), else
    ``launch(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, host_lengths)``.

    Validated arguments: q ``(total_q, H, D)``, k ``(total_k, Hk, D)``, v ``(total_k, Hk,
    Dv)``, the number of sequences, ``out`` ``(total_q, H, Dv)`` and ``lse`` ``(H,
    total_q)`` (float32, float64 for float64; contiguous) to write. ``launch`` takes the
    validated offsets as int32 device arrays ``(n_seq + 1,)``, the longest lengths, and
    ``host_lengths``, the sequences' query and key lengths as host arrays (the
    persistent kernel's tile list).

    Layout: the batch is ``(1, n_seq, Hk, G)`` (``G = H // Hk``) with a sequence stride of
    0, and each tile moves to the first rows of its own sequence (``sequence_params`` in
    cuda/attention_variants.cuh). The grid is sized by the longest sequence, or, for the
    persistent Hopper kernel, one block per SM over the tiles of :func:`varlen_tiles`.
    The causal mask is the window ``(None, 0)``, aligned per sequence to its bottom-right
    corner.
    """
    fn = "attention_varlen"
    total_q, H, D = q.shape
    total_k, Hk, Dv = v.shape
    if total_q == 0:
        return lambda *args: None
    device_id = _device_of(fn, [("q", q), ("k", k), ("v", v), ("out", out)])
    with _on_device(device_id):
        cc = _compute_capability(device_id)
        cfg = varlen_config(D, Dv, q.dtype.name, cc, causal)
    if cfg is None:
        return None
    if total_k == 0:  # no key at all: zeros, lse = -inf (no kernel needed)
        def no_keys(cu_seqlens_q, cu_seqlens_k, *args):
            _device_of(fn, [("q", q), ("cu_seqlens_q", cu_seqlens_q),
                            ("cu_seqlens_k", cu_seqlens_k)])
            with _on_device(device_id):
                out.fill(0)
                lse.fill(-np.inf)
        return no_keys
    with _on_device(device_id):
        qkv = [_kernel_ready(t, cfg.align_elems, cfg.pad_d_to) for t in (q, k, v)]
        o = _kernel_ready(out, cfg.align_elems, cfg.pad_d_to)
        q, k, v = qkv
        G = H // Hk
        item = q.itemsize
        row = [t.strides[0] // item for t in (q, k, v, o)]
        head = [t.strides[1] // item for t in (q, k, v, o)]
        maps = ()
        if cfg.kernel == "wgmma":
            # (D, total rows, heads) maps; batch strides count heads (slices)
            units = [[0, 0, G, 1], [0, 0, 1, 0], [0, 0, 1, 0]]
            for x, h_stride, rows in zip((q, k, v), head[:3],
                                         (cfg.block_m, cfg.block_n, cfg.block_n)):
                tensor_map = _tensor_map.attention_map(x.transpose(1, 0, 2), h_stride,
                                                       x.shape[1], rows)
                if tensor_map is None:
                    return None
                maps += (tensor_map,)
        else:
            units = [[0, 0, G * head[0], head[0]], [0, 0, head[1], 0], [0, 0, head[2], 0]]
        fields = [q.data.ptr, k.data.ptr, v.data.ptr, o.data.ptr, lse.data.ptr]
        fields += [1, n_seq, Hk, G]
        for st in units + [[0, 0, G * head[3], head[3]]]:
            fields += st
        fields += row
        tail = [n_seq * H, None, None, q.shape[-1], v.shape[-1], scale, scale * _LOG2_E]
        kernel = _kernels.get_function(device_id, cfg.source, cfg.name_expression,
                                       _kernels.arch_for(cc), cfg.smem_bytes)
        if cfg.kernel == "wgmma":
            check_register_split(kernel, cfg.num_threads, cfg.name_expression)
        counter = None
        if cfg.kernel == "wgmma":
            counter = stream_counters(device_id, "tiles", 1)

    def launch(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, host_lengths):
        import cupy
        _device_of(fn, [("q", q), ("cu_seqlens_q", cu_seqlens_q),
                        ("cu_seqlens_k", cu_seqlens_k)])
        tail[1:3] = max_seqlen_q, max_seqlen_k
        params = np.frombuffer(_PARAMS_STRUCT.pack(*fields, *tail),
                               dtype=ATTENTION_PARAMS_DTYPE)[0]
        vp = np.zeros((), dtype=VARIANT_PARAMS_DTYPE)
        vp["window_left"] = UNBOUNDED
        vp["window_right"] = 0 if causal else UNBOUNDED
        vp["cu_seqlens_q"] = cu_seqlens_q.data.ptr
        vp["cu_seqlens_k"] = cu_seqlens_k.data.ptr
        args = (params, vp[()]) + maps
        grid = launch_grid(-(-max_seqlen_q // cfg.block_m), n_seq * H)
        run_cfg, run_kernel = cfg, kernel
        with _on_device(device_id):
            if cfg.kernel == "wgmma":
                # the persistent kernel's tiles, sequence by sequence, heaviest first
                # (32-bit tile numbers)
                n_seqs, tiles_ptr = 0, np.uint64(0)
                if cfg.persistent:
                    lengths_q, lengths_k = host_lengths
                    n_tiles = int((-(-lengths_q // cfg.block_m)).sum()) * H
                    if n_tiles < WGMMA_MAX_TILES:
                        n_seqs = int(np.count_nonzero(lengths_q))  # those varlen_tiles lists
                        key = ("varlen_tiles", lengths_q.tobytes(), lengths_k.tobytes(), H,
                               cfg.block_m, cfg.block_n, causal)
                        tiles_ptr = uploaded(device_id, key, lambda: varlen_tiles(
                            lengths_q, lengths_k, H, cfg.block_m, cfg.block_n, causal))
                        grid = (min(n_tiles, num_sms(device_id)), 1, 1)
                    else:
                        run_cfg = _wgmma_varlen_config(D, Dv, q.dtype.name, causal,
                                                       persistent=False)
                        run_kernel = _kernels.get_function(
                            device_id, run_cfg.source, run_cfg.name_expression,
                            _kernels.arch_for(cc), run_cfg.smem_bytes)
                args += (tiles_ptr, np.int32(n_seqs), counter)
            run_kernel(grid, (run_cfg.num_threads, 1, 1), args,
                       shared_mem=run_cfg.smem_bytes)
            if o is not out:
                out[...] = o[..., :Dv]
    return launch


# ----------------------------------------------------------------------------------------
# softmax, log_softmax, logsumexp
# ----------------------------------------------------------------------------------------

def softmax_family(x, axes, kind):
    """softmax, log_softmax or logsumexp of a CuPy array over ``axes`` (cuda/online_softmax.cuh).

    ``axes`` is a sorted tuple of axes (``_api.normalize_axis``); ``kind`` is "softmax",
    "log_softmax" or "logsumexp". The result has x's dtype, computed in float32 (float64
    for float64) with the semantics of ``_numpy_backend.softmax_family``.

    Layout: the reduced axes are moved to the end, in order, and the array is read as
    ``n_rows`` rows of ``row_len = prod(reduced sizes)`` elements. x is read in place when
    that view is C-contiguous and 16-byte aligned (a reduction over the trailing axes of a
    C-contiguous array); otherwise it is first copied to a contiguous array, one extra read
    and write of x. softmax and log_softmax are written in that row layout and returned
    with x's axis order: a transposed view when the reduced axes were not the trailing ones.

    Kernels: a row of up to 512 threads x 16 vectors of 16 bytes (8 for 16-bit types: 32k
    float32, float16 or bfloat16 elements, 16k float64) is read once into the registers of
    one group of threads (``softmax_rows``). Longer rows, and a few long rows that would
    leave most SMs idle, are cut into segments of ``seg_vecs`` vectors:
    ``softmax_partials`` writes each segment's running (max, sum) and ``softmax_finish``
    merges them and writes the output, reading x a second time. On sm_90, rows up to 8
    times the one-group limit (256k float32 elements) instead go to ``softmax_cluster``:
    one cluster of 8 blocks per row, each holding a segment in registers, the blocks'
    (max, sum) merged through distributed shared memory, x read once (when rows are
    16-byte multiples and enough to fill the GPU). Everything runs on CuPy's current
    stream; nothing waits for the device.
    """
    import cupy

    kind_id = {"softmax": 0, "log_softmax": 1, "logsumexp": 2}[kind]  # SoftmaxKind in the .cuh
    kept = [a for a in range(x.ndim) if a not in axes]
    perm = kept + list(axes)
    kept_shape = tuple(x.shape[a] for a in kept)
    row_len = math.prod(x.shape[a] for a in axes)
    n_rows = math.prod(kept_shape)
    out_shape = kept_shape if kind == "logsumexp" else x.shape
    device_id = x.data.device_id
    with _on_device(device_id):
        if n_rows == 0 or (kind != "logsumexp" and row_len == 0):
            return cupy.empty(out_shape, dtype=x.dtype)  # nothing to compute
        # An empty row (row_len == 0) of logsumexp goes to the kernel: it reads nothing
        # and writes -inf.

        # -- rows of row_len contiguous elements, 16-byte aligned
        xt = x.transpose(tuple(perm)) if perm != list(range(x.ndim)) else x
        if not (xt.flags.c_contiguous and xt.data.ptr % 16 == 0):
            bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize]  # any dtype copies
            xt = cupy.array(xt.view(bits), copy=True, order="C").view(x.dtype)

        ctype = _DTYPE_TO_CUDA[x.dtype.name]
        arch = _kernels.arch_for(_compute_capability(device_id))
        vec = 16 // x.dtype.itemsize           # elements per 16-byte vector
        row_vecs = 8 if vec == 8 else 16       # SoftmaxRowVecs<T> in the .cuh
        max_threads = 512                      # SOFTMAX_ROW_MAX_THREADS
        split_threads = 256                    # SOFTMAX_SPLIT_THREADS
        n_vec = row_len // vec                 # at least the vectors of any row
        # threads per row: about 8 vectors each, at least one per head/tail element
        tpr = max(8, 1 << max(0, math.ceil(math.log2(max(1, -(-n_vec // 8))))))
        tpr = min(tpr, max_threads)
        fits = tpr * row_vecs >= n_vec
        block = max(256, tpr)
        n_blocks = -(-n_rows // (block // tpr))
        n_sm = cupy.cuda.runtime.deviceGetAttribute(
            cupy.cuda.runtime.cudaDevAttrMultiProcessorCount, device_id)
        seg_vecs = 8 * split_threads           # 32 KiB segments
        few_long_rows = n_blocks < n_sm and n_vec >= 2 * seg_vecs
        y = cupy.empty(out_shape if kind == "logsumexp" else xt.shape, dtype=x.dtype)

        # sm_90: a row that one block cannot hold in registers but 8 can (one cluster per
        # row, softmax_cluster) is still read once; with rows enough to fill the GPU. Not
        # for logsumexp, which reads only: on an H100 the split-row kernels read 256k rows
        # at 0.93 of the copy's bandwidth, the cluster kernel at 0.60.
        cluster = SOFTMAX_CLUSTER
        use_cluster = (not fits and kind != "logsumexp" and _compute_capability(device_id) == 90
                       and row_len % vec == 0
                       and -(-n_vec // cluster) <= max_threads * row_vecs
                       and n_rows * cluster >= n_sm)
        if use_cluster:
            kind_name = ("cupyflash::KIND_SOFTMAX", "cupyflash::KIND_LOG_SOFTMAX",
                         "cupyflash::KIND_LOGSUMEXP")[kind_id]
            rows = _kernels.get_function(device_id, "online_softmax.cuh",
                                         f"cupyflash::softmax_cluster<{ctype}, {kind_name}>",
                                         arch)
            rows((cluster * min(n_rows, 1 << 16),), (max_threads,),
                 (xt, y, np.int64(n_rows), np.int64(row_len)))
        elif fits and not few_long_rows:
            kind_name = ("cupyflash::KIND_SOFTMAX", "cupyflash::KIND_LOG_SOFTMAX",
                         "cupyflash::KIND_LOGSUMEXP")[kind_id]
            rows = _kernels.get_function(device_id, "online_softmax.cuh",
                                         f"cupyflash::softmax_rows<{ctype}, {kind_name}>", arch)
            rows((min(n_blocks, 2**31 - 1),), (block,),
                 (xt, y, np.int64(n_rows), np.int64(row_len), np.int32(tpr.bit_length() - 1)))
        else:
            # enough blocks to fill the GPU twice over, and at most 1024 segments per row
            if n_rows * -(-n_vec // seg_vecs) < 2 * n_sm:
                seg_vecs = max(split_threads, -(-n_rows * n_vec // (2 * n_sm)))
            seg_vecs = max(seg_vecs, -(-n_vec // 1024))
            seg_vecs = -(-seg_vecs // split_threads) * split_threads
            n_seg = max(1, -(-n_vec // seg_vecs))
            grid_rows = min(n_rows, 65535)
            partial = cupy.empty((n_rows, n_seg, 2),
                                 dtype=np.float64 if x.dtype == np.float64 else np.float32)
            partials = _kernels.get_function(device_id, "online_softmax.cuh",
                                             f"cupyflash::softmax_partials<{ctype}>", arch)
            finish = _kernels.get_function(device_id, "online_softmax.cuh",
                                           f"cupyflash::softmax_finish<{ctype}>", arch)
            sizes = (np.int64(n_rows), np.int64(row_len), np.int64(n_seg), np.int64(seg_vecs))
            partials((n_seg, grid_rows), (split_threads,), (xt, partial) + sizes)
            finish((1 if kind == "logsumexp" else n_seg, grid_rows), (split_threads,),
                   (xt, y, partial) + sizes + (np.int32(kind_id),))

        if kind == "logsumexp" or perm == list(range(x.ndim)):
            return y
        return y.transpose(tuple(int(a) for a in np.argsort(perm)))  # x's axis order


def all_softmax_variants():
    """Every (source, name_expression) of the softmax kernels, for the CI compile check."""
    variants = []
    for ctype in ("float", "double", "__half", "__nv_bfloat16"):
        for kind_name in ("KIND_SOFTMAX", "KIND_LOG_SOFTMAX", "KIND_LOGSUMEXP"):
            variants.append(("online_softmax.cuh",
                             f"cupyflash::softmax_rows<{ctype}, cupyflash::{kind_name}>"))
            variants.append(("online_softmax.cuh",
                             f"cupyflash::softmax_cluster<{ctype}, cupyflash::{kind_name}>"))
        variants.append(("online_softmax.cuh", f"cupyflash::softmax_partials<{ctype}>"))
        variants.append(("online_softmax.cuh", f"cupyflash::softmax_finish<{ctype}>"))
    return variants
