"""cupyflash: exact FlashAttention for NumPy and CuPy arrays.

Public names: :func:`attention`, :func:`softmax`, :func:`log_softmax`,
:func:`logsumexp`, and the float64 ground truth in :mod:`cupyflash.reference`.
"""

from . import reference
from ._api import attention, log_softmax, logsumexp, softmax

__version__ = "0.1.0"

__all__ = ["attention", "softmax", "log_softmax", "logsumexp", "reference", "__version__"]
