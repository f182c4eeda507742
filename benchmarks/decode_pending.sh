#!/usr/bin/env bash
# The first GPU run of session 20's decode changes, written in a session without a GPU:
# the host's uniform length (DecodeParams::uniform_keys: no dependent cache_seqlens load)
# in every split kernel, and the cluster kernel's L2 prefetch before its PDL wait
# (prefetch_keys). One device call, ~5 min:
#
#     OUT=/tmp/run bash benchmarks/decode_pending.sh
#
# 1. the decode GPU suites (the kernels changed; two new tests: the prefetch racing an
#    append, and host lengths against loaded ones bit for bit);
# 2. SASS of the cluster kernel (every instruction: the bulk prefetch, no local memory);
# 3. benchmarks/decode_prefetch.py: the A/B of the prefetch settings at batch 1 and of a
#    one-split cluster kernel at batch 16, torch's cuDNN and flash in the same run;
# 4. the lab cluster kernel's timeline with 0, 2, 4 tiles prefetched (are the next grid's
#    blocks resident before the grid before ends? when does their first tile land?);
# 5. benchmarks/decode.py --heads 8/8: the whole 8/8 grid with the tree's defaults.
# Then, in a second call, the whole GPU suite (python3 -m pytest -m gpu -q -n 8).
set -u
OUT=${OUT:-/tmp/decode_pending}
# shellcheck source=benchmarks/stage.sh
source "$(dirname "$0")/stage.sh"  # cd to the repository root; PY; stage()

{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  git log -1 --oneline; } >"$OUT/versions.txt" 2>&1

stage "decode tests" 200 "$OUT/tests.txt" $PY -m pytest -m gpu -q -p no:cacheprovider -n 8 \
    tests/test_decode_gpu.py tests/test_sequences.py
stage "SASS" 90 "$OUT/sass.txt" $PY benchmarks/sass.py --kernel decode --all-ops \
    --filter "flash_decode_cluster<__nv_bfloat16, 128>"
stage "prefetch A/B" 240 "$OUT/prefetch.txt" $PY benchmarks/decode_prefetch.py
stage "lab timeline" 90 "$OUT/timeline.txt" env CL_PREFETCH=1 CL_STAMPS=1 \
    $PY benchmarks/cluster_decode.py 8192
stage "decode grid" 150 "$OUT/grid.txt" $PY benchmarks/decode.py --heads 8/8 \
    --out "$OUT/grid.json"
cat "$OUT/summary.txt"
