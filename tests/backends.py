"""The two array backends the tests run on, and moving arrays between them.

Every property test takes the ``xp`` fixture (see ``conftest.py``): ``numpy`` always,
``cupy`` only where a CUDA device exists. A test draws its inputs as NumPy arrays (already
rounded to the dtype under test), moves them with :func:`to_xp`, calls cupyflash, and
brings the results back with :func:`to_numpy` before comparing them with the float64
reference on the host.
"""

import numpy as np
import pytest


def _gpu_available():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, a driver too old for the runtime, ...
        return False


HAS_GPU = _gpu_available()

requires_gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")]

# Parameters of the ``xp`` fixture: ``pytest -m gpu`` selects exactly the CuPy ones.
BACKENDS = [pytest.param("numpy", id="numpy"),
            pytest.param("cupy", id="cupy", marks=requires_gpu)]


def is_cupy(x):
    return type(x).__module__.split(".")[0] == "cupy"


def to_xp(xp, *arrays):
    """The arrays as ``xp`` arrays (one array in, one out; several in, a tuple out)."""
    moved = tuple(xp.asarray(a) for a in arrays)
    return moved[0] if len(moved) == 1 else moved


def to_numpy(x):
    """A NumPy copy of a NumPy or CuPy array."""
    return x.get() if is_cupy(x) else np.array(x, copy=True)
