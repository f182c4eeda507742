"""Hypothesis strategies for attention problems, and the sizes each profile allows.

A drawn :class:`AttentionCase` holds only sizes, options and a seed; its
:meth:`~AttentionCase.inputs` builds the arrays from the seed, so that a case prints
compactly, shrinks on its sizes, and can be written out in an ``@example``.
"""

import dataclasses
import os

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

from accuracy import DTYPES

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "cupyflash")

# Examples per property of the files that count them (a few tens per property keeps each
# under a minute on two cores); the thorough profile draws four times as many.
SCALE_EXAMPLES = {"thorough": 4}.get(PROFILE, 1)


def examples(n):
    """Hypothesis settings with ``n`` examples, scaled by the profile."""
    return settings(max_examples=n * SCALE_EXAMPLES)

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


# ----------------------------------------------------------------------------------------
# attention variants: bias, mask, window, alibi_slopes, softcap
# ----------------------------------------------------------------------------------------

# Where a mask keeps keys (a bias is finite there and -inf elsewhere), per kind:
#   dense:   everywhere
#   random:  each entry with probability 0.7
#   blocky:  8 x 8 tiles, each kept with probability 0.5 (whole key blocks of the
#            small-block backend tests are hidden, so they are skipped)
#   rows:    random, and about a third of the rows hide every key (rows that see nothing)
#   padding: the first n keys of each row, n drawn in [0, Lk] per row of the operand's
#            own shape: (B, 1, 1, Lk) is a padding mask per batch element, n = 0 hides all
OPERAND_KINDS = ("dense", "random", "blocky", "rows", "padding")

VARIANT_OPTIONS = ("bias", "mask", "window", "alibi_slopes", "softcap")

SOFTCAPS = (0.5, 5.0, 30.0, 50.0)


def _keep(rng, shape, kind):
    """A boolean keep-pattern of ``shape`` (the operand's own) of the given kind."""
    if kind == "dense" or not shape:
        return np.ones(shape, dtype=bool)
    if kind == "random":
        return rng.random(shape) < 0.7
    if kind == "blocky":
        coarse = rng.random(tuple(-(-n // 8) for n in shape)) < 0.5
        for axis in range(len(shape)):
            coarse = np.repeat(coarse, 8, axis=axis)
        return coarse[tuple(slice(0, n) for n in shape)]
    if kind == "rows":
        return (rng.random(shape) < 0.7) & (rng.random(shape[:-1] + (1,)) < 0.7)
    if kind == "padding":
        lengths = rng.integers(0, shape[-1] + 1, shape[:-1])
        return np.arange(shape[-1]) < lengths[..., None]
    raise ValueError(kind)


@dataclasses.dataclass(frozen=True)
class VariantCase:
    """An :class:`AttentionCase` with the variants of ``cupyflash.attention``.

    ``bias_kind`` / ``mask_kind`` (one of :data:`OPERAND_KINDS`, or None for no bias /
    mask) with the operand's own shape (broadcastable to ``(batch..., Lq, Lk)``); a bias
    is ``bias_scale * N(0, 1)`` where its pattern keeps a key, ``-inf`` elsewhere, in
    ``bias_dtype``. ``slopes_shape`` (None: no ALiBi) broadcasts to the batch shape; the
    slopes are uniform in ``[-slopes_max / 4, slopes_max]`` (mostly positive, as ALiBi's).
    """

    case: AttentionCase
    bias_kind: str = None
    bias_shape: tuple = ()
    bias_dtype: str = "float32"
    bias_scale: float = 1.0
    mask_kind: str = None
    mask_shape: tuple = ()
    window: tuple = None
    slopes_shape: tuple = None
    slopes_max: float = 1.0
    softcap: float = None
    seed: int = 0

    def inputs(self):
        """``(q, k, v, scale, options)``: the case's inputs and a dict of the variants
        to pass to ``attention`` (NumPy arrays; options that are off are left out)."""
        q, k, v, scale = self.case.inputs()
        rng = np.random.default_rng(self.seed)
        options = {}
        if self.bias_kind is not None:
            keep = _keep(rng, self.bias_shape, self.bias_kind)
            bias = np.where(keep, rng.standard_normal(self.bias_shape) * self.bias_scale,
                            -np.inf)
            options["bias"] = np.asarray(bias).astype(DTYPES[self.bias_dtype])
        if self.mask_kind is not None:
            options["mask"] = _keep(rng, self.mask_shape, self.mask_kind)
        if self.window is not None:
            options["window"] = self.window
        if self.slopes_shape is not None:
            options["alibi_slopes"] = rng.uniform(-self.slopes_max / 4, self.slopes_max,
                                                  self.slopes_shape)
        if self.softcap is not None:
            options["softcap"] = self.softcap
        return q, k, v, scale, options


@st.composite
def _operand_shapes(draw, full):
    """A shape that broadcasts to ``full``: some leading dimensions dropped, some others 1."""
    drop = draw(st.integers(0, len(full)))
    return tuple(n if draw(st.booleans()) else 1 for n in full[drop:])


@st.composite
def window_sides(draw, Lq, Lk):
    """None (unbounded) or an int >= 0: mostly small (a side of a few keys), sometimes
    near the lengths or past them."""
    return draw(st.one_of(st.none(), st.integers(0, 3), st.integers(0, max(Lq, Lk) + 2)))


@st.composite
def variant_cases(draw, options=VARIANT_OPTIONS, required=(), **case_options):
    """A :class:`VariantCase`: each option in ``options`` is on with probability 1/2, each
    in ``required`` always; ``case_options`` go to :func:`attention_cases`."""
    case = draw(attention_cases(**case_options))
    on = {name: name in required or (name in options and draw(st.booleans()))
          for name in VARIANT_OPTIONS}
    full = case.batch_shape + (case.Lq, case.Lk)
    fields = {}
    if on["bias"]:
        fields.update(bias_kind=draw(st.sampled_from(OPERAND_KINDS)),
                      bias_shape=draw(_operand_shapes(full)),
                      bias_dtype=draw(st.sampled_from(DTYPE_NAMES)),
                      bias_scale=draw(st.sampled_from([1.0, 10.0])))
    if on["mask"]:
        fields.update(mask_kind=draw(st.sampled_from(OPERAND_KINDS)),
                      mask_shape=draw(_operand_shapes(full)))
    if on["window"]:
        fields.update(window=(draw(window_sides(case.Lq, case.Lk)),
                              draw(window_sides(case.Lq, case.Lk))))
    if on["alibi_slopes"]:
        fields.update(slopes_shape=draw(_operand_shapes(case.batch_shape)),
                      slopes_max=draw(st.sampled_from([0.05, 1.0])))
    if on["softcap"]:
        fields.update(softcap=draw(st.sampled_from(SOFTCAPS)))
    return VariantCase(case=case, seed=draw(st.integers(0, 2**32 - 1)), **fields)
