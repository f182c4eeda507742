"""KV-cache decoding on CuPy arrays: launching the split-KV kernels of
``cuda/flash_decode.cuh``.

:func:`attention_decode` runs, on CuPy's current stream and the arrays' device:

1. ``decode_append`` (with ``k_new``): the new keys and values into the cache, in place,
   at positions ``cache_seqlens[b] .. + L_new`` (through the block table when paged);
2. the split kernel: ``flash_decode_cluster`` on sm_90 for one query row per kv head
   when its clusters fill at most half the SMs, batch 1 at 8 kv heads (fp16/bf16, a
   contiguous cache: :func:`uses_cluster`), whose 8 splits of a
   kv head are one thread-block cluster and merge in one block's shared memory; else
   ``flash_decode_mma`` (fp16/bf16 with several query rows per kv head:
   tensor cores) or ``flash_decode`` (the rest): one thread block per (batch element, kv
   head, split, row chunk), or for the one-row kernel at large batches one block per SM
   taking several of them in turn (:func:`units_per_block`); each reads its split's keys
   and values once for all ``G * Lq`` query rows of its kv head and writes the final out
   and lse (one split) or its partial out and lse in the accumulator dtype (several);
   with several splits, the last block of each (batch element, kv head, row chunk) to
   finish merges them exactly through their lse (it counts the arrivals in counters of
   :func:`._cupy_backend.stream_counters`);
3. ``flash_decode_combine``, only with ``FUSE_COMBINE`` off (tests and benchmarks compare
   the two): the same merge as a second launch.

On sm_90 every one of these kernels is launched with programmatic dependent launch
(:mod:`._launch`): it may be scheduled while the kernel before it in the stream still runs,
and waits for that kernel to complete before it touches global memory.

Nothing here waits for the device. The host synchronisation of a call is the validation's
(``_sequences.attention_decode``): it reads ``cache_seqlens`` and ``block_table`` to the
host when they are CuPy arrays (host arrays are checked where they are and uploaded
without a wait, :func:`._cupy_backend.uploaded`), because the NumPy semantics require
their values to be checked (lengths that fit the cache, block indices in range, an append
that writes each slot once) before anything is written. Those host values also give the
longest sequence, which :func:`choose_num_splits` uses, and whether all sequences have one
length, which the kernels then take from their arguments (``uniform_keys``) instead of
loading it.

Memory: out and lse, the int32 copies of ``cache_seqlens`` and ``block_table`` when they
are not int32 already, and with several splits the partial results,
``B * Hk * num_splits * G * Lq * (Dv + 1)`` accumulator elements (rows padded to 16
bytes), all from CuPy's pool; and a persistent buffer of split counters per stream.
Nothing of q, the cache, k_new or v_new is copied: the kernels read any strides (the
cache with 16-byte vector copies where its rows allow, else element by element).
"""

import functools
import math
import struct

import numpy as np

from . import _kernels, _launch
from ._cupy_backend import (_DTYPE_TO_CUDA, _compute_capability, _device_of, _on_device,
                            num_sms, stream_counters, stream_workspace)

SOURCE = "flash_decode.cuh"

# ----------------------------------------------------------------------------------------
# the argument structs (cuda/flash_decode.cuh): every field 8 bytes, so the packed
# little-endian layout below is the C layout. "Q": pointer, "q": int64, "d": double.
# ----------------------------------------------------------------------------------------

DECODE_PARAMS = tuple(
    [(n, "Q") for n in ("q", "k", "v", "cache_seqlens", "block_table", "out", "lse",
                        "out_partial", "lse_partial", "split_counters")]
    + [(n, "q") for n in (
        "q_batch_stride", "q_token_stride", "q_head_stride", "q_dim_stride",
        "k_page_stride", "k_token_stride", "k_head_stride", "k_dim_stride",
        "v_page_stride", "v_token_stride", "v_head_stride", "v_dim_stride",
        "out_batch_stride", "out_token_stride", "out_head_stride", "table_stride",
        "B", "Lq", "H", "Hk", "G", "M", "D", "Dv", "L_new",
        "page_size", "page_size_mul", "page_size_shift",
        "num_splits", "row_chunks", "partial_row", "causal", "k_vectorized", "v_vectorized",
        "units", "uniform_keys", "prefetch_keys")]
    + [("scale", "d"), ("scale_log2", "d")])

COMBINE_PARAMS = tuple(
    [(n, "Q") for n in ("out_partial", "lse_partial", "out", "lse")]
    + [(n, "q") for n in ("out_batch_stride", "out_token_stride", "out_head_stride",
                          "B", "Lq", "H", "Hk", "G", "M", "Dv", "num_splits", "partial_row")])

APPEND_PARAMS = tuple(
    [(n, "Q") for n in ("k_cache", "v_cache", "k_new", "v_new", "cache_seqlens",
                        "block_table")]
    + [(n, "q") for n in (
        "k_page_stride", "k_token_stride", "k_head_stride", "k_dim_stride",
        "v_page_stride", "v_token_stride", "v_head_stride", "v_dim_stride",
        "kn_batch_stride", "kn_token_stride", "kn_head_stride", "kn_dim_stride",
        "vn_batch_stride", "vn_token_stride", "vn_head_stride", "vn_dim_stride",
        "table_stride", "B", "L_new", "Hk", "D", "Dv", "page_size")])


@functools.lru_cache(maxsize=None)
def _struct(fields):
    """``(struct.Struct, NumPy dtype, field names, their frozenset)`` of a field list."""
    layout = struct.Struct("<" + "".join(kind for _, kind in fields))
    dtype = np.dtype([(name, {"Q": np.uint64, "q": np.int64, "d": np.float64}[kind])
                      for name, kind in fields])
    assert layout.size == dtype.itemsize
    names = tuple(name for name, _ in fields)
    return layout, dtype, names, frozenset(names)


def _pack(fields, values):
    """The C struct of ``fields`` (a tuple) filled from ``values`` (a dict; absent fields
    are 0), as the NumPy structured scalar CuPy passes to a kernel by value. (It is on
    every decode call's host path: the names come precomputed with the layout.)"""
    layout, dtype, names, known = _struct(fields)
    if not values.keys() <= known:
        raise AssertionError(sorted(values.keys() - known))
    data = layout.pack(*[values.get(name, 0) for name in names])
    return np.frombuffer(data, dtype=dtype)[0]


# ----------------------------------------------------------------------------------------
# tile choice
# ----------------------------------------------------------------------------------------

DECODE_HEAD_DIMS = (32, 64, 128, 256)
NUM_THREADS = 128             # DecodeTraits::NUM_THREADS: 4 warps
STAGES = 4                    # DecodeTraits::STAGES (2 for TWO_PASS_ROW with 8 warps)
PIPE_ALIGN = 128              # DECODE_PIPE_ALIGN: slack to align the pipelines to 128 bytes
COMBINE_THREADS = 128         # COMBINE_THREADS of the .cuh
COMBINE_MAX_SPLITS = 1024     # COMBINE_MAX_SPLITS of the .cuh
APPEND_THREADS = 256          # APPEND_THREADS of the .cuh


def max_rows(dtype_name, head_dim):
    """The most query rows one SIMT block holds in registers: 8, or 4 for float64 at 256
    (its q and acc take 32 registers per row per lane)."""
    return 4 if dtype_name == "float64" and head_dim == 256 else 8


MMA_ROWS = 16                 # DecodeMmaTraits::ROWS: one m16 tile of query rows
MMA_HEAD_DIMS = (32, 64, 128)  # the head dims of flash_decode_mma
MMA_STAGES = 2                # DecodeMmaTraits::STAGES


# True: one query row per kv head goes to the tensor-core kernel too (for benchmarks).
MMA_ONE_ROW = False

# The two-pass one-row kernel's producer warps (DecodeTraits::PRODUCERS; 0: none, each
# compute warp copies its own tiles) and the slots of their ring (PRODUCER_STAGES).
# Measured on an H100 (benchmarks/NOTES.md, session 25; bf16, 8/8 heads of 128, paired
# at 4 places): 4 producer warps and 4 slots read 16 x 32k in 686.4 us against 691.4
# without them (cuDNN 693.7), 16 x 128k 2744 against 2765; 2 producer warps the same,
# 1 slower than none, 5 or 6 slots no better, 4 tiles in flight slower.
PRODUCER_WARPS = 4
PRODUCER_STAGES = 4
PRODUCER_IN_FLIGHT = 3        # DecodeTraits::IN_FLIGHT


def uses_mma(dtype_name, head_dim, M, one_row=None):
    """Whether a problem goes to the tensor-core kernel: fp16/bf16, HEAD_DIM up to 128,
    and more than one query row per kv head (one row wastes nothing on the CUDA cores,
    where the SIMT kernel reads at the copy's bandwidth at batch 64; ``MMA_ONE_ROW``
    sends one row there too)."""
    one_row = MMA_ONE_ROW if one_row is None else one_row
    return (dtype_name in ("float16", "bfloat16") and head_dim in MMA_HEAD_DIMS
            and (M > 1 or one_row))


class DecodeConfig:
    """One launchable variant of the split kernel and its companions.

    ``name_expression``: ``flash_decode<T, HEAD_DIM, ROWS>`` (SIMT) or
    ``flash_decode_mma<T, HEAD_DIM>`` (tensor cores, ROWS = 16); ``traits``: its traits
    struct. ``rows``: query rows per block; a kv head's ``G * Lq`` rows go in
    ``ceil(G * Lq / rows)`` row chunks, each a block that reads the keys again (through
    L2: the chunks of one split are neighbouring blocks). ``block_n``: keys per block and
    tile; a split is a whole number of tiles. ``inflight_bytes``: K and V bytes a block
    keeps in flight.
    """

    __slots__ = ("name_expression", "traits", "combine_name", "append_name", "head_dim",
                 "rows", "block_n", "num_threads", "smem_bytes", "inflight_bytes")

    def __init__(self, **fields):
        for name in self.__slots__:
            setattr(self, name, fields.pop(name))
        assert not fields, fields

    def __repr__(self):
        return "DecodeConfig(" + ", ".join(
            f"{n}={getattr(self, n)!r}" for n in self.__slots__) + ")"


def decode_config(D, Dv, dtype_name, compute_capability, M, warps=4):
    """Choose the variant for one problem: the one place tiles are chosen.

    ``max(D, Dv)`` is padded up to the next HEAD_DIM in (32, 64, 128, 256) (columns past D
    and Dv are not read). fp16/bf16 with ``M = G * Lq > 1`` query rows per kv head and
    HEAD_DIM up to 128 go to the tensor-core kernel (:func:`uses_mma`): 16 rows per block,
    4 warps of WARP_N = 2048 / HEAD_DIM keys per tile (8 KiB of K and V), 2 stages. The
    rest go to the SIMT kernel, whose ROWS = 1 (plain decoding, no wasted arithmetic), 4
    or 8 by M; its tiles repeat ``DecodeTraits`` of the .cuh: 4 warps, each lane holding
    VECS_PER_LANE 16-byte vectors of a row (2 for ROWS <= 4, else 1, more for rows wider
    than 32 vectors; VEC = 16 / itemsize elements each), two K and two V vectors per lane
    and tile, STAGES = 4; one row with two vectors a lane takes two passes (four K and
    four V vectors a tile) and has PRODUCER_WARPS more warps that issue its copies
    (PRODUCER_STAGES slots, 3 tiles in flight throughout; with PRODUCER_WARPS = 0 each warp
    copies its own and refills a slot after its wait, REFILL_AFTER_WAIT, as before session
    25). tests/test_kernel_compile.py checks that both
    agree with the .cuh. Every variant fits in 99 KiB of shared memory, so ``compute_capability`` does
    not change the choice.

    ``warps=8`` asks for the one-row 16-bit kernel with 8 warps and 2 stages (what
    :func:`attention_decode` launches when its blocks take several units each and
    ``MANY_UNITS_WARPS`` is 8); any other problem then raises ValueError.
    """
    return _decode_config(D, Dv, dtype_name, compute_capability, M, MMA_ONE_ROW, warps,
                          PRODUCER_WARPS, PRODUCER_STAGES)


@functools.lru_cache(maxsize=256)
def _decode_config(D, Dv, dtype_name, compute_capability, M, mma_one_row, warps=4,
                   producers=0, producer_stages=4):
    """decode_config, kept per problem (it is on every call's host path)."""
    width = max(D, Dv)
    head_dim = next((h for h in DECODE_HEAD_DIMS if h >= width), None)
    if head_dim is None:
        raise ValueError(f"attention_decode: head dims up to {DECODE_HEAD_DIMS[-1]} are "
                         f"supported on the GPU, got {width}")
    ctype = _DTYPE_TO_CUDA[dtype_name]
    common = dict(combine_name=f"cupyflash::flash_decode_combine<{ctype}>",
                  append_name=f"cupyflash::decode_append<{ctype}>",
                  head_dim=head_dim, num_threads=32 * warps)
    if warps != 4 and (warps != 8 or M > 1 or dtype_name not in ("float16", "bfloat16")):
        raise ValueError(f"attention_decode: {warps} warps: only the one-row 16-bit kernel "
                         f"has 8 warps, not {dtype_name} with {M} rows")
    if warps == 4 and uses_mma(dtype_name, head_dim, M, mma_one_row):
        warp_n = 2048 // head_dim
        warp_stage = 2 * warp_n * head_dim * 2            # K and V of a warp's tile
        merge_bytes = (4 * MMA_ROWS * head_dim + 2 * 4 * MMA_ROWS) * 4
        return DecodeConfig(
            name_expression=f"cupyflash::flash_decode_mma<{ctype}, {head_dim}>",
            traits=f"cupyflash::DecodeMmaTraits<{ctype}, {head_dim}>",
            rows=MMA_ROWS, block_n=4 * warp_n,
            smem_bytes=max(MMA_STAGES * 4 * warp_stage, merge_bytes) + PIPE_ALIGN,
            inflight_bytes=(MMA_STAGES - 1) * 4 * warp_stage, **common)
    top = max_rows(dtype_name, head_dim)
    rows = 1 if M <= 1 else 4 if M <= 4 or top == 4 else 8
    itemsize = np.dtype(dtype_name).itemsize
    acc_size = 8 if dtype_name == "float64" else 4
    vec = 16 // itemsize
    d_vecs = head_dim // vec
    min_vecs = 2 if rows <= 4 else 1           # vectors of a row per lane (see DecodeTraits)
    vecs_per_lane = max(d_vecs // 32, min(min_vecs, d_vecs))
    lanes_per_key = d_vecs // vecs_per_lane
    two_pass_row = rows == 1 and vecs_per_lane == 2   # DecodeTraits::TWO_PASS_ROW
    passes = 1 if vecs_per_lane >= 2 and not two_pass_row else 2
    producers = producers if two_pass_row and warps == 4 else 0
    stages = producer_stages if producers else 2 if two_pass_row and warps == 8 else STAGES
    in_flight = PRODUCER_IN_FLIGHT if producers else stages - 1
    block_n = warps * passes * (32 // lanes_per_key)
    stage_vecs = 2 * passes * vecs_per_lane
    pipe_bytes = stages * stage_vecs * 32 * warps * 16
    merge_bytes = (warps * rows * head_dim + 2 * warps * rows) * acc_size
    targs = f"{ctype}, {head_dim}, {rows}" + (
        f", 4, {producers}, {stages}" if producers else f", {warps}" if warps != 4 else "")
    common["num_threads"] = 32 * (warps + producers)
    return DecodeConfig(
        name_expression=f"cupyflash::flash_decode<{targs}>",
        traits=f"cupyflash::DecodeTraits<{targs}>",
        rows=rows, block_n=block_n, smem_bytes=max(pipe_bytes, merge_bytes) + PIPE_ALIGN,
        inflight_bytes=in_flight * stage_vecs * 32 * warps * 16, **common)


def decode_variants():
    """Every (source, name_expression) of the decode kernels, for the CI compile check."""
    variants = []
    for dtype_name in ("float16", "bfloat16", "float32", "float64"):
        for head_dim in DECODE_HEAD_DIMS:
            for M in (1, 4, 8, 16):
                cfg = decode_config(head_dim, head_dim, dtype_name, 90, M)
                variants.append((SOURCE, cfg.name_expression))
            if dtype_name in ("float16", "bfloat16"):   # (blocks of several units)
                variants.append((SOURCE, decode_config(head_dim, head_dim, dtype_name, 90, 1,
                                                       warps=8).name_expression))
            # (the one-row kernel without producer warps: PRODUCER_WARPS = 0)
            variants.append((SOURCE, _decode_config(head_dim, head_dim, dtype_name, 90, 1,
                                                    MMA_ONE_ROW, 4, 0).name_expression))
            if dtype_name in ("float16", "bfloat16") and head_dim in CLUSTER_HEAD_DIMS:
                variants.append((SOURCE, cluster_name(dtype_name, head_dim)))
        variants += [(SOURCE, cfg.combine_name), (SOURCE, cfg.append_name)]
    return list(dict.fromkeys(variants))


# Splits: every multiprocessor should keep INFLIGHT_PER_SM bytes of K and V in flight (an
# H100 needs ~25 KiB per SM: 3.35 TB/s times ~1 us of loaded DRAM latency, over 132 SMs),
# which takes `need` blocks. Without splitting, B * Hk * row_chunks blocks may be fewer;
# then the keys are split into the most splits that keep the blocks at or below `need`
# (so at least half of it: a block more than one per SM shares that SM's reading and adds
# a start and an end, the warps' merge and the partial write), never more than the GPU holds at
# once (a second, partial wave of blocks would add a whole block's time), each split at
# least MIN_SPLIT_BYTES of K and V, so that a block's start (q, the first DRAM latency) and
# end stay small beside its reading. Measured on an H100 (benchmarks/NOTES.md, session 11;
# d = 128, 8/8 heads, aligned pipelines): one block per SM is the best of the counts
# tried (batch 1, 8k: 16 splits 20.5 us, 32 splits 21.4, 64 splits 23.9; batch 4: 4
# splits 52.5, 16 splits 54.1; batch 16: 1 split 175.1, 4 splits 183.5).
INFLIGHT_PER_SM = 24 * 1024
MIN_SPLIT_BYTES = 64 * 1024


def choose_num_splits(base_blocks, max_keys, block_n, key_bytes, num_sms, inflight_bytes,
                      resident_per_sm=None):
    """The split count for ``num_splits=None``: a plain function of the problem.

    ``base_blocks = B * Hk * row_chunks`` blocks exist without splitting; ``max_keys`` is
    the longest sequence (cache plus appended keys), ``key_bytes`` the K and V bytes of one
    key of one kv head, ``inflight_bytes`` what one block keeps in flight,
    ``resident_per_sm`` how many blocks of the kernel an SM holds at once (None: no
    limit). With ``need = num_sms * ceil(INFLIGHT_PER_SM / inflight_bytes)`` blocks
    keeping every SM busy, returns ``need // base_blocks`` (at least 1) but at most
    ``num_sms * resident_per_sm`` blocks (one wave), with whole
    tiles of ``block_n`` keys per split, at least MIN_SPLIT_BYTES per split and at most
    COMBINE_MAX_SPLITS; the count is then trimmed so that no split of the longest sequence
    is empty.

    >>> choose_num_splits(8, 8192, 32, 512, 132, 32768, 4)     # B = 1, Hk = 8, d = 128 fp16
    16
    >>> choose_num_splits(32, 8192, 32, 512, 132, 32768, 4)    # B = 4
    4
    >>> choose_num_splits(128, 8192, 32, 512, 132, 32768, 4)   # B = 16: one block per SM
    1
    >>> choose_num_splits(32, 8192, 64, 512, 132, 32768, 2)    # B = 4, G = 4: tensor cores
    4
    """
    tiles = -(-max_keys // block_n)
    if tiles <= 1:
        return 1
    need = num_sms * -(-INFLIGHT_PER_SM // inflight_bytes)
    splits = max(1, need // base_blocks)
    if resident_per_sm:
        splits = min(splits, num_sms * resident_per_sm // base_blocks)
    min_tiles = max(1, -(-MIN_SPLIT_BYTES // (block_n * key_bytes)))
    splits = max(1, min(splits, tiles // min_tiles, COMBINE_MAX_SPLITS))
    return -(-tiles // -(-tiles // splits))  # as many as whole-tile splits need


def launched_splits(num_splits, cfg, base_blocks, max_keys, key_bytes, num_sms,
                    resident_per_sm=None):
    """The split count a call launches: ``num_splits`` as given, or chosen when None;
    then at most the tiles of the longest sequence (more would be empty for every batch
    element) and COMBINE_MAX_SPLITS."""
    if num_splits is None:
        num_splits = choose_num_splits(base_blocks, max_keys, cfg.block_n, key_bytes, num_sms,
                                       cfg.inflight_bytes, resident_per_sm)
    tiles = max(1, -(-max_keys // cfg.block_n))
    return max(1, min(int(num_splits), tiles, COMBINE_MAX_SPLITS))


@functools.lru_cache(maxsize=None)
def resident_blocks(device_id, name_expression, arch, smem_bytes, num_threads=NUM_THREADS):
    """How many blocks of a split kernel one SM holds at once (the driver's occupancy
    calculator: registers and shared memory)."""
    from cupy.cuda import driver
    kernel = _kernels.get_function(device_id, SOURCE, name_expression, arch, smem_bytes)
    return max(1, driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.ptr, num_threads,
                                                                   smem_bytes))


# An int: the one-row split kernel's units per block, whatever units_per_block would choose
# (for tests and benchmarks; the grid is then ceil(units / UNITS_PER_BLOCK) blocks).
UNITS_PER_BLOCK = None
MIN_SM_COVER = 0.95


# The warps of the one-row 16-bit kernel when its blocks take several units each (batch
# 32-64 at 8 kv heads): 4, the kernel of one unit a block (4 compute and PRODUCER_WARPS
# producer warps); 8 asks for the 8-warp kernel with 2 stages (DecodeTraits), which
# session 18 measured 0.1-0.6% faster than the 4-warp kernel of then (benchmarks/NOTES.md).
# Measured on an H100 (session 25, bf16, 8/8 heads of 128, paired at 4 places), the
# producer-warp kernel against the 8-warp one: batch 64 at 8k 684.3 against 688.4 us, at
# 32k 2729 against 2745, batch 32 at 8k 344.2 against 346.2, batch 48 at 32k 2042
# against 2058.
MANY_UNITS_WARPS = 4


def units_per_block(units, num_sms):
    """How many work units (b, hk, split, row chunk) each block of the one-row SIMT split
    kernel takes, one after the other (``flash_decode``'s loop, ROWS = 1).

    One block per unit, unless there are at least two units per SM and ``k = ceil(units
    / num_sms)`` units per block still leave at least ``MIN_SM_COVER`` of the SMs a block.
    Then every SM streams with one block, as one split at batch 16 does (the fastest
    decode line, ~3.13 TB/s), instead of three or four blocks per SM, which read ~1%
    slower when they are all resident and leave SMs idle in the last wave when not.

    >>> units_per_block(512, 132)    # batch 64, 8 kv heads: 128 blocks of 4 units
    4
    >>> units_per_block(128, 132)    # batch 16: a block each
    1
    >>> units_per_block(300, 132)    # 3 units a block would leave 32 SMs idle
    1
    """
    if UNITS_PER_BLOCK is not None:
        return max(1, int(UNITS_PER_BLOCK))
    k = -(-units // num_sms)
    if k < 2 or -(-units // k) < MIN_SM_COVER * num_sms:
        return 1
    return k


# False: always merge the splits with flash_decode_combine (for tests and benchmarks).
FUSE_COMBINE = True


# The cluster kernel (flash_decode_cluster, sm_90): the CLUSTER_SIZE splits of a kv head
# are one thread-block cluster of CLUSTER_THREADS-thread blocks, merged in block 0's shared
# memory, with no round trip through L2 after the last key. Measured on an H100
# (benchmarks/NOTES.md, session 19; bf16, 8/8 heads of 128, batch 1): 8k keys 14.0 us
# against 17.7 for flash_decode (16 splits, counter merge), 32k 45.5 against 50.0, 128k
# 173.6 against 176.8; at batch 2 (128 blocks: two blocks of a cluster land on one SM
# where a GPC has too few free SMs) 7-31% slower, at batch 4 7-12%, so it takes only
# problems whose clusters fill at most half the SMs. False: never (tests and benchmarks).
CLUSTER_DECODE = True
CLUSTER_SIZE = 8               # DecodeClusterTraits::CLUSTER
CLUSTER_THREADS = 256          # DecodeClusterTraits::NUM_THREADS
CLUSTER_HEAD_DIMS = (64, 128, 256)
CLUSTER_SMEM_BYTES = 3 * 2 * 4 * CLUSTER_THREADS * 16 + PIPE_ALIGN   # ::SMEM_BYTES


def cluster_name(dtype_name, head_dim):
    return f"cupyflash::flash_decode_cluster<{_DTYPE_TO_CUDA[dtype_name]}, {head_dim}>"


def cluster_block_n(head_dim):
    """DecodeClusterTraits::BLOCK_N: keys per tile, 4 per thread of 256, HEAD_DIM / 8
    threads a key."""
    return CLUSTER_THREADS // (head_dim // 8) * 4


# Before its PDL wait, a block of the cluster kernel prefetches the first
# CLUSTER_PREFETCH_TILES tiles of its split to L2 (DecodeParams::prefetch_keys), while the
# grid before it ends, so that its first copies after the wait hit L2 instead of waiting
# ~1.8 us for DRAM (session 19's timeline). A prefetching grid allows the next one only
# with 2 tiles of its blocks left (DecodeClusterTraits::ALLOW_LEFT), so the prefetched rows
# are read ~2.5 us later, whatever the call's size. Only with every sequence of one length
# (known on the host before the wait: no cache_seqlens load). 0 tiles: never, and the next
# grid is allowed at the start. Session 21, batch 1, 8k, bf16: 13.4-13.5 us against
# 13.9-14.0 (the lab kernel, cluster_decode.py CL_TRIGGER=1).
CLUSTER_PREFETCH_TILES = 2


def cluster_prefetch_keys(uniform_keys, head_dim):
    """DecodeParams::prefetch_keys of a cluster call: keys per split to prefetch.

    >>> cluster_prefetch_keys(8192, 128)      # batch 1, 8k: 2 tiles of 64 keys
    128
    >>> cluster_prefetch_keys(-1, 128)        # lengths differ: no
    0
    """
    if uniform_keys <= 0:
        return 0
    return CLUSTER_PREFETCH_TILES * cluster_block_n(head_dim)


def uses_cluster(compute_capability, dtype_name, D, Dv, M, pairs, paged, vectorized,
                 num_splits, num_sms):
    """Whether a call runs ``flash_decode_cluster``: one query row per kv head (``M = G *
    Lq = 1``) of fp16/bf16 with ``D = Dv`` in CLUSTER_HEAD_DIMS, a contiguous cache of
    16-byte rows (``vectorized``), the split count left to the library, ``pairs = B * Hk``
    clusters of CLUSTER_SIZE blocks on at most half the SMs, on sm_90 with cluster launches;
    unless CLUSTER_DECODE is off (or FUSE_COMBINE / MMA_ONE_ROW ask for another kernel).

    >>> uses_cluster(90, "bfloat16", 128, 128, 1, 8, False, True, None, 132) == (
    ...     _launch.clusters_available(90))                      # batch 1, 8 kv heads
    True
    >>> uses_cluster(90, "bfloat16", 128, 128, 1, 16, False, True, None, 132)   # batch 2
    False
    >>> uses_cluster(80, "float16", 128, 128, 1, 8, False, True, None, 108)     # an A100
    False
    """
    return (CLUSTER_DECODE and FUSE_COMBINE and not MMA_ONE_ROW and num_splits is None
            and M == 1 and D == Dv and D in CLUSTER_HEAD_DIMS
            and dtype_name in ("float16", "bfloat16") and not paged and vectorized
            and pairs * CLUSTER_SIZE <= num_sms // 2 and _launch.clusters_available(compute_capability))


def fuses_combine(splits):
    """Whether the split kernel merges the splits itself (its last block per kv head and
    row chunk does, see combine_splits in the .cuh) instead of flash_decode_combine: with
    several splits, unless ``FUSE_COMBINE`` is off. (Its merge needs NUM_THREADS running
    sums in shared memory, whatever the split count: every variant has them, which the
    kernels assert.)"""
    return FUSE_COMBINE and splits > 1


def page_divisor(page_size):
    """``(mul, shift)`` with ``t // page_size == (t * mul >> 32) >> shift`` for every
    ``0 <= t < 2**31`` (``mul = 0`` for page_size 1, which the kernel special-cases):
    the round-up reciprocal of Granlund and Montgomery, as CUTLASS's FastDivmod.

    >>> mul, shift = page_divisor(16)
    >>> all((t * mul >> 32) >> shift == t // 16 for t in (0, 15, 16, 2**31 - 1))
    True
    """
    if page_size <= 1:
        return 0, 0
    p = 31 + (page_size - 1).bit_length()
    return ((1 << p) + page_size - 1) // page_size, p - 32


# ----------------------------------------------------------------------------------------
# launching
# ----------------------------------------------------------------------------------------

def _strides(x):
    """Element strides of a CuPy array."""
    return [s // x.itemsize for s in x.strides]


def _vectorized(x):
    """Whether the kernel may copy x's rows (its last dimension) in 16-byte vectors: the
    last dimension contiguous, the data 16-byte aligned, and every other stride that is
    used (dimension longer than 1) a multiple of 16 bytes."""
    return ((x.shape[-1] <= 1 or x.strides[-1] == x.itemsize)
            and x.data.ptr % 16 == 0
            and all(s % 16 == 0 for n, s in zip(x.shape[:-1], x.strides[:-1]) if n > 1))


def _int32(x):
    """x as a contiguous int32 CuPy array (itself when it is one already)."""
    import cupy
    return cupy.ascontiguousarray(x, dtype=cupy.int32)


def attention_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, *,
                     num_splits, causal, scale, max_keys, min_keys=None):
    """``(out, lse)`` of a validated decoding problem on the GPU, after appending ``k_new``
    and ``v_new`` (if given) to the cache in place.

    ``max_keys`` is the longest ``cache_seqlens[b] + L_new`` (the validation's host copy);
    it sizes the split choice. ``min_keys``, the shortest (None: not known): when both are
    equal the kernels take that length from their arguments instead of loading
    ``cache_seqlens``, and the cluster kernel prefetches its first keys before its PDL
    wait. ``num_splits`` None chooses (:func:`choose_num_splits`); an explicit count is
    used as given, except that splits beyond the tiles of the longest
    sequence (which would be empty for every batch element) and beyond COMBINE_MAX_SPLITS
    are not launched.
    """
    import cupy

    fn = "attention_decode"
    named = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache),
             ("cache_seqlens", cache_seqlens)]
    named += [("k_new", k_new), ("v_new", v_new)] if k_new is not None else []
    named += [("block_table", block_table)] if block_table is not None else []
    device_id = _device_of(fn, named)
    B, Lq, H, D = q.shape
    Hk, Dv = k_cache.shape[2], v_cache.shape[3]
    G = H // Hk
    M = G * Lq
    paged = block_table is not None
    L_new = k_new.shape[1] if k_new is not None else 0
    capacity = (block_table.shape[1] if paged else 1) * k_cache.shape[1]
    if capacity >= 2**30 or B >= 2**31:  # the kernels index positions in 32 bits
        raise ValueError(f"{fn}: caches of 2**30 or more positions per sequence are not "
                         f"supported on the GPU, got {capacity}")
    acc_dtype = np.float64 if q.dtype == np.float64 else np.float32

    with _on_device(device_id):
        out = cupy.empty((B, Lq, H, Dv), dtype=q.dtype)
        lse = cupy.empty((B, H, Lq), dtype=acc_dtype)
        seqlens = _int32(cache_seqlens)
        table = _int32(block_table) if paged else None
        cc = _compute_capability(device_id)
        arch = _kernels.arch_for(cc)
        page = dict(page_size=k_cache.shape[1] if paged else 0,
                    table_stride=table.shape[1] if paged else 0)
        cache_strides = {}
        for prefix, x in (("k", k_cache), ("v", v_cache)):
            st = _strides(x)
            cache_strides.update({f"{prefix}_page_stride": st[0], f"{prefix}_token_stride": st[1],
                                  f"{prefix}_head_stride": st[2], f"{prefix}_dim_stride": st[3]})
        dtype_name = q.dtype.name
        cfg = decode_config(D, Dv, dtype_name, cc, M)
        # every kernel of this file waits for the previous grid before it touches memory
        pdl = _launch.pdl_enabled(cc)

        # -- 1. the append, before anything reads the cache (same stream)
        if L_new and B:
            new_strides = {}
            for prefix, x in (("kn", k_new), ("vn", v_new)):
                st = _strides(x)
                new_strides.update({f"{prefix}_batch_stride": st[0],
                                    f"{prefix}_token_stride": st[1],
                                    f"{prefix}_head_stride": st[2],
                                    f"{prefix}_dim_stride": st[3]})
            params = _pack(APPEND_PARAMS, dict(
                k_cache=k_cache.data.ptr, v_cache=v_cache.data.ptr, k_new=k_new.data.ptr,
                v_new=v_new.data.ptr, cache_seqlens=seqlens.data.ptr,
                block_table=table.data.ptr if paged else 0,
                B=B, L_new=L_new, Hk=Hk, D=D, Dv=Dv, **cache_strides, **new_strides, **page))
            append = _kernels.get_function(device_id, SOURCE, cfg.append_name, arch)
            _launch.launch(append, (B * L_new,), (APPEND_THREADS,), params, overlap=pdl)

        if M == 0 or B == 0:  # no query row: nothing to attend
            return out, lse

        # -- 2. the splits
        row_chunks = -(-M // cfg.rows)
        base_blocks = B * Hk * row_chunks
        k_vectorized, v_vectorized = _vectorized(k_cache), _vectorized(v_cache)
        clustered = uses_cluster(cc, dtype_name, D, Dv, M, B * Hk, paged,
                                 k_vectorized and v_vectorized, num_splits, num_sms(device_id))
        if clustered:   # a cluster of CLUSTER_SIZE splits per kv head, merged in the cluster
            splits = CLUSTER_SIZE
        else:
            splits = launched_splits(num_splits, cfg, base_blocks, max_keys,
                                     (D + Dv) * q.dtype.itemsize, num_sms(device_id),
                                     resident_blocks(device_id, cfg.name_expression, arch,
                                                     cfg.smem_bytes, cfg.num_threads))
        units = base_blocks * splits   # (b, hk, split, row chunk): at most one block each
        if units >= 2**31 or B * Hk * M >= 2**31:
            raise ValueError(f"{fn}: {units} thread blocks are more than one "
                             f"launch can have on the GPU")
        acc_size = np.dtype(acc_dtype).itemsize
        partial_row = -(-Dv * acc_size // 16) * 16 // acc_size  # rows of 16-byte vectors
        fused = fuses_combine(splits) and not clustered
        out_partial = lse_partial = 0   # (B, Hk, splits, M, partial_row), (B, Hk, splits, M)
        if splits > 1 and not clustered:   # in the stream's scratch: no allocation a call
            out_bytes = -(-B * Hk * splits * M * partial_row * acc_size // 256) * 256
            out_partial = stream_workspace(device_id, "decode partials",
                                           out_bytes + B * Hk * splits * M * acc_size)
            lse_partial = out_partial + out_bytes
        counters = stream_counters(device_id, "decode splits", base_blocks) if fused else None
        mul, shift = page_divisor(page["page_size"])
        q_st, out_st = _strides(q), _strides(out)
        uniform_keys = max_keys if min_keys == max_keys else -1
        prefetch_keys = cluster_prefetch_keys(uniform_keys, D) if clustered else 0
        params = _pack(DECODE_PARAMS, dict(
            q=q.data.ptr, k=k_cache.data.ptr, v=v_cache.data.ptr,
            cache_seqlens=seqlens.data.ptr, block_table=table.data.ptr if paged else 0,
            out=out.data.ptr, lse=lse.data.ptr,
            out_partial=out_partial, lse_partial=lse_partial,
            split_counters=counters.data.ptr if fused else 0,
            q_batch_stride=q_st[0], q_token_stride=q_st[1], q_head_stride=q_st[2],
            q_dim_stride=q_st[3], **cache_strides,
            out_batch_stride=out_st[0], out_token_stride=out_st[1], out_head_stride=out_st[2],
            B=B, Lq=Lq, H=H, Hk=Hk, G=G, M=M, D=D, Dv=Dv, L_new=L_new,
            page_size_mul=mul, page_size_shift=shift, **page,
            num_splits=splits, row_chunks=row_chunks, partial_row=partial_row,
            causal=int(causal), units=units,
            uniform_keys=uniform_keys, prefetch_keys=prefetch_keys,
            k_vectorized=int(k_vectorized), v_vectorized=int(v_vectorized),
            scale=scale, scale_log2=scale * math.log2(math.e)))
        if clustered:
            kernel = _kernels.get_function(device_id, SOURCE, cluster_name(dtype_name, D), arch,
                                           CLUSTER_SMEM_BYTES)
            _launch.launch(kernel, (units,), (CLUSTER_THREADS,), params, CLUSTER_SMEM_BYTES,
                           overlap=pdl, cluster=CLUSTER_SIZE)
            return out, lse
        # (only the one-row SIMT kernel loops over units; the tensor-core one has 16 rows)
        per_block = units_per_block(units, num_sms(device_id)) if cfg.rows == 1 else 1
        if per_block > 1 and MANY_UNITS_WARPS != 4 and q.dtype.itemsize == 2:
            cfg = decode_config(D, Dv, dtype_name, cc, M, warps=MANY_UNITS_WARPS)
        kernel = _kernels.get_function(device_id, SOURCE, cfg.name_expression, arch,
                                       cfg.smem_bytes)
        _launch.launch(kernel, (-(-units // per_block),), (cfg.num_threads,), params,
                       cfg.smem_bytes, overlap=pdl)

        # -- 3. the merge of the splits, where the split kernel did not
        if splits > 1 and not fused:
            params = _pack(COMBINE_PARAMS, dict(
                out_partial=out_partial, lse_partial=lse_partial,
                out=out.data.ptr, lse=lse.data.ptr, out_batch_stride=out_st[0],
                out_token_stride=out_st[1], out_head_stride=out_st[2],
                B=B, Lq=Lq, H=H, Hk=Hk, G=G, M=M, Dv=Dv, num_splits=splits,
                partial_row=partial_row))
            combine = _kernels.get_function(device_id, SOURCE, cfg.combine_name, arch)
            _launch.launch(combine, (B * Hk * M,), (COMBINE_THREADS,), params, overlap=pdl)
        return out, lse
