"""cupyflash: exact FlashAttention for NumPy and CuPy arrays.

Public names: :func:`attention`, its gradients :func:`attention_backward` and
:func:`attention_vjp`, :func:`softmax`, :func:`log_softmax`, :func:`logsumexp`, and the
float64 ground truth in :mod:`cupyflash.reference`.
"""

from . import reference
from ._api import (attention, attention_backward, attention_vjp, log_softmax, logsumexp,
                   softmax)

__version__ = "0.1.0"

__all__ = ["attention", "attention_backward", "attention_vjp", "softmax", "log_softmax",
           "logsumexp", "reference", "__version__"]
