"""Tensor maps for Hopper's tensor-memory accelerator (TMA), encoded by the CUDA driver.

A tensor map (the driver's ``CUtensorMap``) is 128 opaque bytes that describe a strided
tensor in global memory and the box one ``cp.async.bulk.tensor`` instruction copies into
shared memory. The driver encodes it (``cuTensorMapEncodeTiled``); CuPy 14 has no binding
for that function, so it is called here through :mod:`ctypes` on ``libcuda.so.1``, the
driver library CuPy itself runs on. The kernel receives each map by value, as a
``const __grid_constant__`` parameter (``TmaDescriptor`` in ``cuda/flash_fwd_wgmma.cuh``);
CuPy passes it as a one-element NumPy array of 128 bytes, which it hands to the launch
by pointer.

How the Hopper attention kernel sees q, k and v (:func:`attention_map`): a 3-D map
``(head dim, L, slices)``, innermost first, whose element ``(d, l, n)`` sits at
``ptr + d + l * row_stride + n * slice_stride`` (elements). A *slice* is one ``(L, D)``
matrix of the batch; batch element ``b`` of the broadcast batch reads slice
``sum_i index_i(b) * batch_stride_i / slice_stride`` (:func:`slice_layout`), so one map
serves every batch element, including broadcast (stride-0) batch dimensions, which a
tensor map itself cannot express (its strides must be positive multiples of 16 bytes).

The box is 64 elements (128 bytes) by ``rows`` rows by one slice: with 128-byte
swizzling, the layout that wgmma reads without conversion, a box's inner extent may be at
most 128 bytes, so the kernel loads a row of 128 (256) head dims as 2 (4) boxes, one per
64-column "slab". Elements outside the tensor (head dims past ``D``, rows past ``L``) are
filled with zeros: the kernel needs no bounds checks on its loads, and any head dim up to
the kernel's ``HEAD_DIM`` is read correctly (the zero columns add nothing to a product).
"""

import ctypes
import functools

import numpy as np

# Enum values of cuda.h (CUDA 12 and 13).
DATA_TYPE = {"float16": 6, "bfloat16": 9}  # CU_TENSOR_MAP_DATA_TYPE_FLOAT16 / _BFLOAT16
INTERLEAVE_NONE = 0                        # CU_TENSOR_MAP_INTERLEAVE_NONE
SWIZZLE_128B = 3                           # CU_TENSOR_MAP_SWIZZLE_128B
L2_PROMOTION_256B = 3                      # CU_TENSOR_MAP_L2_PROMOTION_L2_256B
OOB_FILL_ZERO = 0                          # CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE: zeros

TENSOR_MAP_BYTES = 128
TENSOR_MAP_ALIGN = 64
TENSOR_MAP_DTYPE = np.dtype((np.void, TENSOR_MAP_BYTES))
BOX_COLUMNS = 64          # elements of a 128-byte box row (2-byte types)
MAX_BOX_ROWS = 256        # boxDim[i] <= 256
MAX_DIM = 2 ** 31         # globalDim[i] <= 2^31
MAX_STRIDE_BYTES = 2 ** 40  # globalStrides[i] < 2^40


class TensorMapError(RuntimeError):
    """The CUDA driver could not be found or refused to encode a tensor map."""


@functools.lru_cache(maxsize=1)
def _encode_tiled():
    """``cuTensorMapEncodeTiled`` from ``libcuda.so.1``, with its prototype."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise TensorMapError(
            f"cupyflash: the Hopper attention kernel needs the CUDA driver library "
            f"libcuda.so.1 to encode its tensor maps, and it could not be loaded ({e}); "
            f"set CUPYFLASH_FWD_KERNEL=mma to use the other kernels") from None
    fn = lib.cuTensorMapEncodeTiled
    u32, u64 = ctypes.c_uint32, ctypes.c_uint64
    fn.argtypes = [ctypes.c_void_p,      # CUtensorMap *tensorMap (64-byte aligned)
                   ctypes.c_int,         # CUtensorMapDataType
                   u32,                  # tensorRank
                   ctypes.c_void_p,      # globalAddress
                   ctypes.POINTER(u64),  # globalDim[rank]
                   ctypes.POINTER(u64),  # globalStrides[rank - 1], bytes, dims 1..
                   ctypes.POINTER(u32),  # boxDim[rank]
                   ctypes.POINTER(u32),  # elementStrides[rank]
                   ctypes.c_int,         # CUtensorMapInterleave
                   ctypes.c_int,         # CUtensorMapSwizzle
                   ctypes.c_int,         # CUtensorMapL2promotion
                   ctypes.c_int]         # CUtensorMapFloatOOBfill
    fn.restype = ctypes.c_int            # CUresult
    return fn


def _aligned_map_buffer():
    """A one-element array of TENSOR_MAP_DTYPE whose data is 64-byte aligned: the driver
    writes the map there, and CuPy passes the kernel a pointer to it."""
    raw = np.zeros(TENSOR_MAP_BYTES + TENSOR_MAP_ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % TENSOR_MAP_ALIGN
    return raw[start:start + TENSOR_MAP_BYTES].view(TENSOR_MAP_DTYPE)


def encode_tiled(dtype_name, address, dims, strides_bytes, box):
    """Encode a tiled tensor map: 128-byte swizzle, no interleave, zero fill, unit
    element strides. The last ENCODED_CACHE maps are kept: a map is a function of these
    arguments alone, so a call on the same tensors (a training step's next layer, a
    benchmark's next call) reuses the map instead of the driver's encoding and its
    ctypes marshalling, tens of microseconds of host time per map. The returned array
    is shared: callers pass it to a launch and never write it.

    Parameters
    ----------
    dtype_name : {"float16", "bfloat16"}
    address : int
        Device address of element (0, ..., 0); a multiple of 16.
    dims : sequence of int
        Extent of each dimension, innermost (contiguous) first.
    strides_bytes : sequence of int
        Byte stride of dimensions 1, 2, ... (``len(dims) - 1`` values; dimension 0 is
        contiguous), each a positive multiple of 16 below 2^40.
    box : sequence of int
        Elements per box in each dimension, innermost first; ``box[0]`` times the element
        size at most 128 bytes (the swizzle span).

    Returns
    -------
    numpy.ndarray
        Shape ``(1,)``, dtype ``V128``, 64-byte aligned: the kernel argument.
    """
    return _encode_tiled_cached(dtype_name, int(address), tuple(map(int, dims)),
                                tuple(map(int, strides_bytes)), tuple(map(int, box)))


ENCODED_CACHE = 256


@functools.lru_cache(maxsize=ENCODED_CACHE)
def _encode_tiled_cached(dtype_name, address, dims, strides_bytes, box):
    rank = len(dims)
    if len(strides_bytes) != rank - 1 or len(box) != rank:
        raise ValueError(f"encode_tiled: {rank} dims need {rank - 1} strides and {rank} box "
                         f"sizes, got {len(strides_bytes)} and {len(box)}")
    out = _aligned_map_buffer()
    u32, u64 = ctypes.c_uint32, ctypes.c_uint64
    result = _encode_tiled()(
        out.ctypes.data, DATA_TYPE[dtype_name], rank, address,
        (u64 * rank)(*dims), (u64 * max(rank - 1, 1))(*strides_bytes),
        (u32 * rank)(*box), (u32 * rank)(*([1] * rank)),
        INTERLEAVE_NONE, SWIZZLE_128B, L2_PROMOTION_256B, OOB_FILL_ZERO)
    if result != 0:
        raise TensorMapError(
            f"cupyflash: cuTensorMapEncodeTiled failed with CUresult {result} for "
            f"{dtype_name} at {address:#x}, dims {tuple(dims)}, strides {tuple(strides_bytes)} "
            f"bytes, box {tuple(box)}")
    return out


def slice_layout(batch_sizes, batch_strides):
    """How a tensor's batch dimensions become one slice dimension of its tensor map.

    ``batch_strides`` are the tensor's element strides over ``batch_sizes`` (0 where it
    is broadcast). The slice stride is the smallest non-zero stride; every batch offset
    must be a non-negative multiple of it. Returns ``(slice_stride, n_slices,
    strides_in_slices)``, or None when the strides do not allow it (a negative stride,
    or strides that are not multiples of the smallest one). With no non-zero stride the
    tensor is one slice (``slice_stride`` 0).

    >>> slice_layout([2, 3], [3 * 80, 80])          # contiguous (2, 3, L, D): 6 slices
    (80, 6, [3, 1])
    >>> slice_layout([2, 4], [50, 0])               # broadcast over the second dim
    (50, 2, [1, 0])
    """
    nonzero = [s for s in batch_strides if s != 0]
    if not nonzero:
        return 0, 1, [0] * len(batch_strides)
    if min(nonzero) < 0:
        return None
    unit = min(nonzero)
    if any(s % unit for s in nonzero):
        return None
    n_slices = 1 + sum((n - 1) * s for n, s in zip(batch_sizes, batch_strides)) // unit
    return unit, n_slices, [s // unit for s in batch_strides]


def attention_map_shape(x_shape, x_strides, itemsize, slice_stride, n_slices, rows):
    """``(dims, strides_bytes, box)`` of :func:`attention_map`, or None when a tensor map
    cannot describe the tensor (an empty or too long dimension, a row stride that is not
    a positive multiple of 16 bytes, strides of 2^40 bytes or more, more than 256 rows per
    box). Pure arithmetic: the part of :func:`attention_map` that is checked without a GPU.
    """
    cols, length = x_shape[-1], x_shape[-2]
    if not (0 < cols < MAX_DIM and 0 < length < MAX_DIM and 0 < n_slices < MAX_DIM):
        return None
    if not 0 < rows <= MAX_BOX_ROWS:
        return None
    row_bytes = x_strides[-2]
    if length == 1:  # one row: its stride is never used, any valid one will do
        row_bytes = -(-cols * itemsize // 16) * 16
    slice_bytes = slice_stride * itemsize
    if n_slices == 1:  # one slice: likewise
        slice_bytes = row_bytes * length
    for stride in (row_bytes, slice_bytes):
        if stride <= 0 or stride % 16 or stride >= MAX_STRIDE_BYTES:
            return None
    return (cols, length, n_slices), (row_bytes, slice_bytes), (BOX_COLUMNS, rows, 1)


def attention_map(x, slice_stride, n_slices, rows):
    """The 3-D tensor map ``(head dim, L, slices)`` of a CuPy array ``x`` of shape
    ``(batch..., L, D)`` with a contiguous last dimension (see the module docstring), for
    boxes of ``rows`` rows; None when a tensor map cannot describe it."""
    shape = attention_map_shape(x.shape, x.strides, x.itemsize, slice_stride, n_slices, rows)
    if shape is None or x.data.ptr % 16:
        return None
    dims, strides_bytes, box = shape
    return encode_tiled(x.dtype.name, x.data.ptr, dims, strides_bytes, box)
