"""Kernel launches with programmatic dependent launch (PDL) on Hopper.

A decode step is short (~19 us at batch 1 with an 8k cache), and between two kernels of
a stream the GPU spends ~3 us (session 12's timeline) launching the second and
scheduling its blocks after the first has drained. With PDL
(``CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION``) a kernel may be scheduled
while the kernel before it still runs; the kernel itself then waits (``griddepcontrol.wait``,
``decode::wait_for_previous_grid`` in ``cuda/flash_decode.cuh``) before it touches
global memory, so the overlap is exact whatever the previous kernel wrote. Only kernels
written that way may be launched with :func:`launch` and ``overlap=True``.

CuPy 14 launches through ``cuLaunchKernel``, which has no launch attributes, so
``cuLaunchKernelEx`` is called here through :mod:`ctypes` on ``libcuda.so.1``, the
driver library CuPy itself runs on (as ``_tensor_map`` does for tensor maps).

Thread-block clusters (sm_90, ``cluster=`` of :func:`launch`) are a launch attribute too
(``CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION``): the decode kernel whose splits merge in one
block's shared memory (``flash_decode_cluster``) is launched with it.

``CUPYFLASH_PDL=0`` launches every kernel without PDL (for A/B timing).
"""

import ctypes
import functools
import os

# Enum values of cuda.h (CUDA 12 and 13).
CLUSTER_DIMENSION = 4                   # CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
PROGRAMMATIC_STREAM_SERIALIZATION = 6   # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


class _LaunchAttribute(ctypes.Structure):
    """``CUlaunchAttribute``: an id, padding to 8 bytes, a 64-byte value union (read here
    as 16 unsigned ints: PDL's flag is the first, a cluster's x, y, z the first three)."""
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4),
                ("value", ctypes.c_uint * 16)]


class _LaunchConfig(ctypes.Structure):
    """``CUlaunchConfig``."""
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint),
                ("gridDimZ", ctypes.c_uint), ("blockDimX", ctypes.c_uint),
                ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


assert ctypes.sizeof(_LaunchAttribute) == 72 and ctypes.sizeof(_LaunchConfig) == 56

def _attribute(attribute_id, *values):
    attribute = _LaunchAttribute(id=attribute_id)
    for i, x in enumerate(values):
        attribute.value[i] = x
    return attribute


# The one attribute of every PDL launch (built once: launches are on the host's hot path).
_PDL_ATTRIBUTE = ctypes.pointer(_attribute(PROGRAMMATIC_STREAM_SERIALIZATION, 1))


@functools.lru_cache(maxsize=None)
def _cluster_attributes(cluster, overlap):
    """The attributes of a launch in clusters of ``cluster`` blocks (x), with PDL or not."""
    attributes = [_attribute(CLUSTER_DIMENSION, cluster, 1, 1)]
    if overlap:
        attributes.append(_attribute(PROGRAMMATIC_STREAM_SERIALIZATION, 1))
    return (_LaunchAttribute * len(attributes))(*attributes), len(attributes)


@functools.lru_cache(maxsize=1)
def _driver():
    """``(cuLaunchKernelEx, cuGetErrorName)`` from ``libcuda.so.1``, or None without them
    (a driver older than CUDA 12)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        launch_ex = lib.cuLaunchKernelEx
        error_name = lib.cuGetErrorName
    except (OSError, AttributeError):
        return None
    launch_ex.restype = ctypes.c_int
    launch_ex.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p,
                          ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    error_name.restype = ctypes.c_int
    error_name.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return launch_ex, error_name


def clusters_available(compute_capability):
    """Whether :func:`launch` can launch thread-block clusters on a device of this compute
    capability: sm_90 and later, with ``cuLaunchKernelEx``."""
    return compute_capability >= 90 and _driver() is not None


def pdl_enabled(compute_capability):
    """Whether kernels written for it are launched with PDL on a device of this compute
    capability (an int, 90 for sm_90): sm_90 and later, a driver with
    ``cuLaunchKernelEx``, and ``CUPYFLASH_PDL`` not ``0``."""
    return (compute_capability >= 90 and os.environ.get("CUPYFLASH_PDL", "1") != "0"
            and _driver() is not None)


def launch(kernel, grid, block, params, shared_mem=0, *, overlap=False, cluster=None):
    """Launch ``kernel`` (a ``cupy.cuda.function.Function``) on the current stream with one
    by-value argument ``params`` (a NumPy structured scalar, as CuPy would pass it).

    ``overlap=True`` launches it with PDL (the kernel must wait for the previous grid
    before it touches global memory; the caller checks :func:`pdl_enabled`);
    ``cluster=n`` in clusters of n blocks along x (sm_90; the caller checks
    :func:`clusters_available`); otherwise this is CuPy's own launch.
    """
    if not overlap and cluster is None:
        kernel(grid, block, (params,), shared_mem=shared_mem)
        return
    import cupy

    launch_ex, error_name = _driver()
    data = ctypes.create_string_buffer(params.tobytes(), params.dtype.itemsize)
    args = (ctypes.c_void_p * 1)(ctypes.addressof(data))
    grid = tuple(grid) + (1,) * (3 - len(grid))
    block = tuple(block) + (1,) * (3 - len(block))
    if cluster is None:
        attributes, count = _PDL_ATTRIBUTE, 1
    else:
        array, count = _cluster_attributes(int(cluster), bool(overlap))
        attributes = ctypes.cast(array, ctypes.POINTER(_LaunchAttribute))
    config = _LaunchConfig(*grid, *block, shared_mem, cupy.cuda.get_current_stream().ptr,
                           attributes, count)
    status = launch_ex(ctypes.byref(config), kernel.ptr, args, None)
    if status != 0:
        name = ctypes.c_char_p()
        error_name(status, ctypes.byref(name))
        raise RuntimeError(f"cupyflash: cuLaunchKernelEx failed: "
                           f"{(name.value or b'?').decode()} ({status})")
