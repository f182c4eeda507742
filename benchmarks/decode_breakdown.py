"""Where the one-row decode kernel's time goes (session 16): the same calls timed on
copies of the package with one part of the split kernel taken out or changed, side by
side in one run, with torch's cuDNN backend (bf16, heads of 128, decode.py's queue
timer, two rounds each; us per call, and in brackets the best round's fraction of the
1 GiB copy's bandwidth).

Each variant is the package copied to _exp/pkgs/cf_<name> with text edits of
cuda/flash_decode.cuh (and _cupy_decode.py where the launcher mirrors the kernel);
an edit whose text is gone from the kernel stops the run. The variants that drop work
give wrong results and are for timing only:

    base        the tree as it is
    head        a package prepared at _exp/pkgs/cf_head (the last commit, say)
    stages4/5   the one-row pipeline 4 or 5 tiles deep instead of 3 (64/80 KiB)
    nlen        the split's length a constant (8192) instead of cache_seqlens[b]: what
                the dependent load before the first copies costs (8k cases only)
    notail      no split merge: a block stores its partial and leaves
    nomath      the loop reads every word it copied and does no arithmetic
    nomath_notail  both
    mma1        one query row on the tensor-core kernel (MMA_ONE_ROW)
    stages2     the one-row pipeline 2 tiles deep (16 KiB in flight while computing)
    warps8      blocks of several units (batch 32-64) on the 8-warp one-row kernel
                (sessions 18-24) instead of the producer-warp one (session 25)
    mma_s3      the tensor-core kernel 3 stages deep (as before session 17; now 2)
    chunk16     the split merge issuing 16 splits' loads at once instead of 8

    before3     (session 24) the two-pass row refilling its slot before the wait, 3
                stages, as before session 24 (v17: after the wait, 4 stages), with no
                producer warp
    ws0         (session 25) no producer warps: each compute warp copies its own tiles
                (v17's loop); wsPsSfF: P producer warps, S slots, F tiles in flight
                (the tree: ws4s4f3); mb3 the tree with 3 blocks per SM in its launch
                bounds (~80 registers) instead of 2; ownwait: a producer lane refills
                once its own copies of the oldest tile have landed, not the whole tile

The default cases are batch 1-16 with 8/8 heads and three grouped-query lines (32/8);
CASES=gqa runs the tensor-core kernel's grid instead (16/8, 32/8 and 64/8 heads);
CASES=big batches 32-64 with 8/8 heads (the one-row kernel's blocks of several units);
CASES=bar issue 6's 8/8 lines at batch 4-64; CASES=16x32768,64x8192 those (8/8 heads). PLACES=n rotates every case's calls over at
least n separately allocated caches where 60% of the free memory holds them (the time is
their mean: where a cache lies moves a read by up to 1.5%, session 23).

    python3 benchmarks/decode_breakdown.py                  # every variant, default cases
    python3 benchmarks/decode_breakdown.py base notail      # some variants
    CASES=gqa python3 benchmarks/decode_breakdown.py base mma_s3   # grouped heads only
"""
import importlib, os, pathlib, re, shutil, sys
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import numpy as np
import cupy
import decode as bench

CUH, PY = "cuda/flash_decode.cuh", "_cupy_decode.py"
PKGS = REPO / "_exp" / "pkgs"
SRC = (REPO / "cupyflash" / CUH).read_text()


def stages(k):
    return [(CUH, "static constexpr int STAGES = TWO_PASS_ROW ? (WARPS == 8 ? 2 : 3) : 4;",
             f"static constexpr int STAGES = TWO_PASS_ROW ? (WARPS == 8 ? 2 : {k}) : 4;"),
            (CUH, "ROWS == 1 && PIPE_BYTES <= 48 * 1024 ? 4 : 2;",
             "ROWS == 1 && PIPE_BYTES <= 48 * 1024 ? 4 : ROWS == 1 && PIPE_BYTES <= 64 * 1024 ? 3 : 2;"),
            (PY, "stages = (2 if warps == 8 else 3) if two_pass_row else STAGES",
             f"stages = (2 if warps == 8 else {k}) if two_pass_row else STAGES")
            ] + ([(CUH, "ROWS == 1 && PIPE_BYTES <= 32 * 1024 ? 6", "ROWS == 1 && PIPE_BYTES <= 32 * 1024 ? 4"),
                  (PY, "INFLIGHT_PER_SM = 24 * 1024", "INFLIGHT_PER_SM = 16 * 1024")]
                 if k == 2 else [])   # (six blocks' 80 registers spill; base's split counts)


NLEN = [(CUH, "below 2^30)\n    const int n = p.cache_seqlens[b] + static_cast<int>(p.L_new);",
         "below 2^30)\n    const int n = 8192;")]
NOTAIL = [(CUH, "if (one_split || p.split_counters == nullptr) return;", "return;")]
_a = SRC.index("            // -- S = q K^T: s[ps][r] for key t0")
_b = SRC.index("            if constexpr (Tr::PRODUCER) {   // the warp has read the slot")
NOMATH = [(CUH, SRC[_a:_b], """            unsigned xo = 0;   // (every copied word read, no arithmetic)
#pragma unroll
            for (int i = 0; i < STAGE_VECS; ++i) {
                const decode::Vec16<T> x = decode::lds_vec16<T>(slot(stage, i, warp));
                const unsigned* w = reinterpret_cast<const unsigned*>(&x);
                xo ^= w[0] ^ w[1] ^ w[2] ^ w[3];
            }
            acc[0][0] += __uint_as_float(xo & 0x3f000000u);
            (void)t0;
""")]


# (warps8, warps8s2: the one-row 16-bit kernel with 8 warps and 3 or 2 stages, as text
# edits, sessions 17-18; the 2-stage one is DecodeTraits' WARPS = 8, which sessions 18-24
# launched for blocks of several units; "warps8" times the tree with it, "warps4" was
# the tree without it then.)


MMA_S3 = [(CUH, "static constexpr int STAGES = 2;\n    static constexpr int WARP_STAGE_BYTES",
           "static constexpr int STAGES = 3;\n    static constexpr int WARP_STAGE_BYTES"),
          (PY, "MMA_STAGES = 2 ", "MMA_STAGES = 3 ")]
CHUNK16 = [(CUH, "static constexpr int value = 128 / 16 / (int(sizeof(Acc)) / 4); };",
            "static constexpr int value = 256 / 16 / (int(sizeof(Acc)) / 4); };")]
# Session 24: v17 refills the two-pass row's slot after its wait (4 stages, 3 tiles in
# flight throughout); "before3" is v17 (the tree without producer warps) with the order
# before it (3 stages, refilled before the wait), keeping the loop's other changes.
BEFORE3 = [(PY, "PRODUCER_WARPS = 4", "PRODUCER_WARPS = 0"),
           (CUH, "REFILL_AFTER_WAIT = TWO_PASS_ROW && WARPS == 4 && !PRODUCER;",
            "REFILL_AFTER_WAIT = false;"),
           (CUH, ": TWO_PASS_ROW && WARPS == 8 ? 2 : 4;  // tiles in the pipeline",
            ": TWO_PASS_ROW ? (WARPS == 8 ? 2 : 3) : 4;  // tiles in the pipeline"),
           (PY, "else 2 if two_pass_row and warps == 8 else STAGES",
            "else (2 if warps == 8 else 3) if two_pass_row else STAGES")]
# Session 25: the two-pass row's copies issued by producer warps (the tree: four, one per
# compute warp, 4 slots, 3 tiles in flight); ws0 is the tree without them (v17's loop).
WS = {"ws0": [(PY, "PRODUCER_WARPS = 4", "PRODUCER_WARPS = 0")],
      "mb3": [(CUH, ": REFILL_AFTER_WAIT ? 3\n", ": REFILL_AFTER_WAIT || PRODUCER ? 3\n")],
      "ownwait": [(CUH, "            decode::ring_wait(full(g % STAGES), (g / STAGES) & 1);\n", "")]}
VARIANTS = {**WS, "base": [], "head": [], "before3": BEFORE3, "stages2": stages(2), "chunk16": CHUNK16, "stages4": stages(4), "stages5": stages(5),
            "nlen": NLEN, "mma_s3": MMA_S3,
            "warps8": [(PY, "MANY_UNITS_WARPS = 4", "MANY_UNITS_WARPS = 8")],
            "notail": NOTAIL, "nomath": NOMATH, "nomath_notail": NOMATH + NOTAIL,
            "mma1": [(PY, "MMA_ONE_ROW = False", "MMA_ONE_ROW = True")]}
EXACT = (*WS, "base", "head", "before3", "stages2", "mma_s3", "chunk16", "stages4", "stages5", "nlen", "mma1", "warps8")   # variants that still compute the answer


def make(name, edits):
    """The package copied to _exp/pkgs/cf_<name> with `edits`; its _cupy_decode module.
    "head" is a package put at _exp/pkgs/cf_head beforehand (e.g. `git archive HEAD
    cupyflash | tar -x -C _exp/pkgs/cf_head --strip-components=1`), used as it is."""
    dst = PKGS / f"cf_{name}"
    if name == "head":
        sys.path.insert(0, str(PKGS))
        return importlib.import_module("cf_head._cupy_decode")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(REPO / "cupyflash", dst, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, old, new in edits:
        f = dst / rel
        text = f.read_text()
        assert text.count(old) == 1, (name, rel, old[:60])
        f.write_text(text.replace(old, new))
    if str(PKGS) not in sys.path:
        sys.path.insert(0, str(PKGS))
    return importlib.import_module(f"cf_{name}._cupy_decode")


names = sys.argv[1:] or list(VARIANTS)
for n in names:   # wsPsSfF: P producer warps, S slots, F tiles in flight
    m = re.fullmatch(r"ws(\d)s(\d)f(\d)", n)
    if m:
        P, S, F = m.groups()
        VARIANTS[n] = [(PY, "PRODUCER_WARPS = 4", f"PRODUCER_WARPS = {P}"),
                       (PY, "PRODUCER_STAGES = 4", f"PRODUCER_STAGES = {S}"),
                       (PY, "PRODUCER_IN_FLIGHT = 3 ", f"PRODUCER_IN_FLIGHT = {F} "),
                       (CUH, "static constexpr int IN_FLIGHT = 3;",
                        f"static constexpr int IN_FLIGHT = {F};")]
        EXACT += (n,)
mods = {n: make(n, VARIANTS[n]) for n in names}
timer = bench.QueueTimer(cupy, 20, 5)
stream = cupy.cuda.Stream(non_blocking=True)
stream.use()
torch, backends = bench.torch_backends(stream)
copy_gbs = bench.copy_bandwidth(cupy, timer)
print(f"GPU {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()} copy {copy_gbs:.0f} GB/s",
      flush=True)
dt = bench._dtype("bfloat16")
Hk = 8
D = 128
CASES = [(1, 8192, None, 8), (1, 8192, 12, 8), (4, 8192, None, 8), (1, 32768, None, 8),
         (16, 32768, None, 8), (16, 32768, 2, 8),
         (1, 8192, None, 32), (16, 8192, None, 32), (16, 32768, None, 32)]
if os.environ.get("CASES") == "gqa":   # the tensor-core kernel's grid (G = 2, 4, 8)
    CASES = [(B, L, None, H) for H in (16, 32, 64)
             for B, L in ((1, 8192), (4, 8192), (16, 8192), (64, 8192), (1, 32768), (16, 32768))]
if os.environ.get("CASES") == "big":   # several units per block of the one-row kernel
    CASES = [(64, 8192, None, 8), (64, 32768, None, 8), (64, 131072, None, 8),
             (32, 8192, None, 8), (48, 32768, None, 8), (16, 131072, None, 8)]
if os.environ.get("CASES") == "bar":   # session 24: issue 6's 8/8 lines
    CASES = [(B, L, None, 8) for B, L in ((16, 32768), (16, 131072), (64, 8192), (4, 8192),
                                          (16, 8192), (4, 131072), (64, 131072))]
if "x" in os.environ.get("CASES", ""):   # CASES=16x32768,64x8192: those, 8/8 heads
    CASES = [(*map(int, c.split("x")), None, 8) for c in os.environ["CASES"].split(",")]
PLACES = int(os.environ.get("PLACES", "1"))   # at least this many caches (as memory allows)
for B, L, S, H in CASES:
    run = [n for n in names if not (n == "nlen" and L != 8192)]
    kv_bytes = 2 * B * L * Hk * D * 2
    copies = max(1, -(-4 * 50 * 2**20 // kv_bytes))
    copies = max(copies, min(PLACES, int(cupy.cuda.runtime.memGetInfo()[0] * 0.6 // kv_bytes)))
    q = bench._random(cupy, (B, 1, H, D), dt)
    caches = [(bench._random(cupy, (B, L, Hk, D), dt), bench._random(cupy, (B, L, Hk, D), dt))
              for _ in range(copies)]
    seqlens = cupy.full((B,), L, dtype=np.int32)

    def call(m, k, v):
        return m.attention_decode(q, k, v, seqlens, None, None, None, num_splits=S,
                                  causal=False, scale=D ** -0.5, max_keys=L)
    ref = None
    for n in run:   # the variants that compute the answer agree with each other
        o = call(mods[n], *caches[0])[0].astype(np.float32)
        if n in EXACT:
            ref = o if ref is None else ref
            assert float(abs(o - ref).max()) < 1e-2, n
    tq = bench.as_torch(torch, q).transpose(1, 2)
    views = [(bench.as_torch(torch, k).transpose(1, 2), bench.as_torch(torch, v).transpose(1, 2))
             for k, v in caches]
    res = {}
    for _ in range(2):
        for n in run:
            res.setdefault(n, []).append(timer(
                [(lambda k=k, v=v, m=mods[n]: call(m, k, v)) for k, v in caches], kv_bytes / 2.5e9))
        sd = backends["torch_cudnn"]
        res.setdefault("cudnn", []).append(timer(
            [(lambda k=k, v=v: sd(tq, k, v, H != Hk)) for k, v in views], kv_bytes / 2.5e9))
    line = f"B={B} H={H}/{Hk} L={L} S={S} |"
    for n, ts in res.items():
        line += (f" {n} " + "/".join(f"{t * 1e3:.2f}" for t in ts)
                 + f" ({kv_bytes / min(ts) / 1e6 / copy_gbs:.3f})")
    print(line, flush=True)
    del caches, views   # (q is small; deleting it here left the call closure a dangling name)
    cupy.get_default_memory_pool().free_all_blocks()
