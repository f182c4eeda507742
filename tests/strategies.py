"""Hypothesis strategies for attention problems, and the sizes each profile allows.

A drawn :class:`AttentionCase` holds only sizes, options and a seed; its
:meth:`~AttentionCase.inputs` builds the arrays from the seed, so that a case prints
compactly, shrinks on its sizes, and can be written out in an ``@example``.
"""

import dataclasses
import os

import numpy as np
from hypothesis import strategies as st

from accuracy import DTYPES

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "cupyflash")

# Largest Lq or Lk drawn at random, and the largest batch * Lq * Lk * (D + Dv) drawn: the
# float64 reference and the naive computation materialise the whole score matrix on the
# host. The default keeps the CPU suite to a few minutes on two cores; the awkward long
# sizes (1023, 1025) come in as explicit examples.
MAX_LEN = {"cupyflash": 300, "thorough": 600, "gpu": 1100}.get(PROFILE, 300)
MAX_WORK = {"cupyflash": 3 * 10**7, "thorough": 10**8, "gpu": 4 * 10**8}.get(PROFILE, 3 * 10**7)

DTYPE_NAMES = tuple(DTYPES)

# Lengths around the block sizes (NumPy backend 256, GPU tiles 64 and 128), then anything.
EDGE_LENGTHS = (1, 2, 3, 16, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257)
EDGE_HEAD_DIMS = (1, 2, 3, 7, 8, 16, 32, 59, 64, 80, 96, 111, 128, 160, 192, 256)

# Largest |score| of a case (None: the default scale 1/sqrt(D) on standard normal data).
LOGIT_MAXES = (None, 1e-3, 0.5, 5.0, 50.0, 1e3, 1e4)

# How keys are given -inf scores: q[..., 0] = 1 for every query and k[j, 0] = -inf for a
# hidden key j, the other components finite, so score(i, j) = -inf for every i.
#   random: each key with probability 0.3, per batch element of k
#   prefix: the first n keys (with causal, early queries may then see only -inf keys)
#   all:    every key, in a random non-empty set of k's batch elements
NEG_INF_MODES = ("none", "random", "prefix", "all")

# float16 overflows at 65504: keep |q * scale| well below it.
FLOAT16_SAFE = 3.0e4


def lengths(max_len=MAX_LEN):
    return st.one_of(st.sampled_from([n for n in EDGE_LENGTHS if n <= max_len]),
                     st.integers(1, max_len))


def head_dims(max_dim=256):
    return st.one_of(st.sampled_from([d for d in EDGE_HEAD_DIMS if d <= max_dim]),
                     st.integers(1, max_dim))


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    """One attention problem: sizes, options and the seed of its data."""

    dtype: str
    Lq: int
    Lk: int
    D: int
    Dv: int
    q_batch: tuple = ()
    k_batch: tuple = ()
    v_batch: tuple = ()
    causal: bool = False
    logit_max: float = None
    negative_scale: bool = False
    neg_inf: str = "none"
    v_scale: float = 1.0
    seed: int = 0

    def inputs(self):
        """Return ``(q, k, v, scale)``: NumPy arrays already rounded to the dtype, and the
        scale to pass (None for the default)."""
        dtype = DTYPES[self.dtype]
        rng = np.random.default_rng(self.seed)
        q = rng.standard_normal(self.q_batch + (self.Lq, self.D))
        k = rng.standard_normal(self.k_batch + (self.Lk, self.D))
        v = rng.standard_normal(self.v_batch + (self.Lk, self.Dv)) * self.v_scale
        if self.neg_inf != "none":
            assert not self.negative_scale, "a negative scale turns -inf keys into +inf scores"
            q[..., 0] = 1.0
            k[..., 0] = np.where(self._hidden_keys(rng), -np.inf, k[..., 0])
        q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
        if self.logit_max is None:
            return q, k, v, None
        # Scale so that the largest finite |score| is logit_max (of the rounded inputs).
        s = np.matmul(q.astype(np.float64), np.swapaxes(k.astype(np.float64), -1, -2))
        finite = np.abs(s[np.isfinite(s)])
        peak = float(finite.max()) if finite.size else 0.0
        scale = self.logit_max / peak if peak > 0 else self.logit_max
        if self.dtype == "float16" and q.size:
            scale = min(scale, FLOAT16_SAFE / max(float(np.abs(q.astype(np.float64)).max()), 1.0))
        return q, k, v, -scale if self.negative_scale else scale

    def _hidden_keys(self, rng):
        shape = self.k_batch + (self.Lk,)
        if self.neg_inf == "random":
            return rng.random(shape) < 0.3
        if self.neg_inf == "prefix":
            return np.broadcast_to(np.arange(self.Lk) < rng.integers(1, self.Lk + 1), shape)
        chosen = rng.random(self.k_batch) < 0.5  # "all"
        chosen.flat[0] = True
        return np.broadcast_to(chosen[..., None], shape)

    @property
    def batch_shape(self):
        return np.broadcast_shapes(self.q_batch, self.k_batch, self.v_batch)


@st.composite
def batch_shapes(draw, max_elems):
    """Batch shapes of q, k, v that broadcast: each drops some leading dimensions of a
    common shape and sets some others to 1 (grouped-query attention, broadcast q, ...)."""
    full, n = [], 1
    for _ in range(draw(st.integers(0, 3))):
        size = draw(st.integers(1, max(1, min(3, max_elems // n))))
        full.append(size)
        n *= size

    def one():
        drop = draw(st.integers(0, len(full)))
        return tuple(s if draw(st.booleans()) else 1 for s in full[drop:])

    return one(), one(), one()


@st.composite
def attention_cases(draw, dtypes=DTYPE_NAMES, causal=st.booleans(),
                    logit_max=st.sampled_from(LOGIT_MAXES),
                    neg_inf=st.sampled_from(NEG_INF_MODES),
                    max_len=MAX_LEN, max_head_dim=256, max_work=MAX_WORK):
    dtype = draw(st.sampled_from(dtypes))
    Lq, Lk = draw(lengths(max_len)), draw(lengths(max_len))
    D = draw(head_dims(max_head_dim))
    Dv = draw(st.one_of(st.just(D), head_dims(max_head_dim)))
    max_batch = max(1, min(8, max_work // (Lq * Lk * (D + Dv))))
    q_batch, k_batch, v_batch = draw(batch_shapes(max_batch))
    mode = draw(neg_inf)
    return AttentionCase(
        dtype=dtype, Lq=Lq, Lk=Lk, D=D, Dv=Dv,
        q_batch=q_batch, k_batch=k_batch, v_batch=v_batch,
        causal=draw(causal), logit_max=draw(logit_max),
        negative_scale=mode == "none" and draw(st.booleans()),
        neg_inf=mode,
        v_scale=draw(st.sampled_from([1.0, 1e-3, 1e3])),
        seed=draw(st.integers(0, 2**32 - 1)))


# ----------------------------------------------------------------------------------------
# softmax, log_softmax, logsumexp
# ----------------------------------------------------------------------------------------

# Largest |x| drawn per dtype: float16 stops at 65504; the others go far beyond 1e4.
SOFTMAX_MAGNITUDES = {
    "float16": (1e-3, 1.0, 30.0, 1e4),
    "bfloat16": (1e-3, 1.0, 30.0, 1e4, 1e30),
    "float32": (1e-3, 1.0, 30.0, 1e4, 1e30),
    "float64": (1e-3, 1.0, 30.0, 1e4, 1e300),
}

# Offsets added to x: a large offset with a small spread makes near-ties at a huge
# magnitude, where log(l) must not be rounded to the spacing of the maximum (and in float16
# the spacing at 1e4 is 8, so there are exact ties).
SOFTMAX_OFFSETS = {
    "float16": (0.0, 1e4, -3e4),
    "bfloat16": (0.0, 1e4, -1e30),
    "float32": (0.0, 1e4, 1e30, -1e30),
    "float64": (0.0, 1e4, 1e300, -1e300),
}

# Special values planted in x:
#   neg_inf_slices: whole slices along the reduced axes are -inf (others finite)
#   neg_inf:        single entries are -inf
#   pos_inf:        single entries are +inf
#   nan:            single entries are NaN
SOFTMAX_SPECIALS = ("none", "neg_inf_slices", "neg_inf", "pos_inf", "nan")


@dataclasses.dataclass(frozen=True)
class SoftmaxCase:
    """One softmax-family problem: x's dtype, shape and data (``offset + magnitude * N(0, 1)``
    with special values planted), and the axis argument."""

    dtype: str
    shape: tuple
    axis: object = -1
    magnitude: float = 1.0
    offset: float = 0.0
    special: str = "none"
    seed: int = 0

    def x(self):
        """x as a NumPy array rounded to the dtype."""
        rng = np.random.default_rng(self.seed)
        x = self.offset + rng.standard_normal(self.shape) * self.magnitude
        if self.special == "neg_inf_slices":
            # one random draw per slice, broadcast along the reduced axes
            ndim = len(self.shape)
            axes = range(ndim) if self.axis is None else (
                self.axis if isinstance(self.axis, tuple) else (self.axis,))
            reduced = {a % ndim for a in axes}
            per_slice = tuple(1 if i in reduced else n for i, n in enumerate(self.shape))
            x = np.where(rng.random(per_slice) < 0.5, -np.inf, x)
        elif self.special != "none":
            value = {"neg_inf": -np.inf, "pos_inf": np.inf, "nan": np.nan}[self.special]
            x = np.where(rng.random(self.shape) < 0.2, value, x)
        if self.dtype == "float16":  # stay finite: infinities come only from `special`
            x = np.clip(x, -6e4, 6e4)
        return np.asarray(x).astype(DTYPES[self.dtype])


@st.composite
def axes_for(draw, ndim):
    """An axis argument valid for ``ndim`` dimensions: None, an int (maybe negative) or a
    tuple of distinct ints (maybe empty, maybe negative)."""
    kind = draw(st.sampled_from(["none", "int", "tuple"] if ndim else ["none", "tuple"]))
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.integers(-ndim, ndim - 1))
    if not ndim:
        return ()
    axes = draw(st.lists(st.integers(0, ndim - 1), unique=True, max_size=ndim))
    return tuple(a - ndim if draw(st.booleans()) else a for a in axes)


@st.composite
def softmax_cases(draw, dtypes=DTYPE_NAMES, specials=st.sampled_from(SOFTMAX_SPECIALS),
                  max_size=4096):
    dtype = draw(st.sampled_from(dtypes))
    shape, size = [], 1
    for _ in range(draw(st.integers(0, 4))):
        n = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 5, 8, 33, 257, 1025]),
                           st.integers(0, 64)))
        n = min(n, max_size // max(size, 1))
        shape.append(n)
        size *= max(n, 1)
    return SoftmaxCase(dtype=dtype, shape=tuple(shape), axis=draw(axes_for(len(shape))),
                       magnitude=draw(st.sampled_from(SOFTMAX_MAGNITUDES[dtype])),
                       offset=draw(st.sampled_from(SOFTMAX_OFFSETS[dtype])),
                       special=draw(specials), seed=draw(st.integers(0, 2**32 - 1)))
