"""cupyflash: exact FlashAttention for NumPy and CuPy arrays.

Public names: :func:`attention`, its gradients :func:`attention_backward` and
:func:`attention_vjp`, :func:`merge_attention` (partial results over chunks of the keys),
:func:`softmax`, :func:`log_softmax`, :func:`logsumexp`, packed variable-length
attention :func:`attention_varlen`, KV-cache decoding :func:`attention_decode`, and the
float64 ground truth in :mod:`cupyflash.reference`.
"""

from . import reference
from ._api import (attention, attention_backward, attention_vjp, log_softmax, logsumexp,
                   merge_attention, softmax)
from ._sequences import attention_decode, attention_varlen

__version__ = "0.1.0"

__all__ = ["attention", "attention_backward", "attention_vjp", "merge_attention", "softmax",
           "log_softmax", "logsumexp", "reference", "__version__"]
__all__ += ["attention_varlen", "attention_decode"]
