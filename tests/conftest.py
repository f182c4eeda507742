"""Test configuration: the ``gpu`` marker, the Hypothesis profiles and the ``xp`` fixture.

Hypothesis profiles (choose with the environment variable ``HYPOTHESIS_PROFILE``):

* ``cupyflash`` (default): a few dozen examples per property, lengths up to 300; the CPU
  suite runs in a few minutes on two cores.
* ``thorough``: many more examples and longer sequences, for a nightly CPU run.
* ``gpu``: for a machine with a CUDA device, where the kernels are fast and the float64
  reference on the host sets the pace; sequences up to 1100.

Sizes per profile are in ``strategies.py``.
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from backends import BACKENDS

settings.register_profile(
    "cupyflash",
    deadline=None,  # one example may take a second on a slow CPU
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,  # a failure prints the @reproduce_failure blob
    max_examples=300,
)
settings.register_profile("thorough", parent=settings.get_profile("cupyflash"),
                          max_examples=1000)
settings.register_profile("gpu", parent=settings.get_profile("cupyflash"),
                          max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "cupyflash"))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA device and CuPy; skipped where there is none")


@pytest.fixture(scope="session", params=BACKENDS)
def xp(request):
    """The array module a test runs on: numpy, or cupy (marked gpu, skipped without one)."""
    if request.param == "numpy":
        return np
    import cupy
    return cupy
