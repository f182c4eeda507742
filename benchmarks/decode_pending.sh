#!/usr/bin/env bash
# The one-call GPU check of the decode work of sessions 20-21 (the cluster kernel's L2
# prefetch before its PDL wait, with the next grid allowed only when 2 tiles of a block
# remain, so that it prefetches as the grid before ends; R4 of
# results/session21_H100.txt). Rerun it after changing a decode kernel. ~2 min:
#
#     OUT=/tmp/run bash benchmarks/decode_pending.sh
#
# 1. the decode GPU suites (the kernel changed; the prefetch racing an append, now also
#    with 8 tiles a split);
# 2. SASS of the cluster kernel (every instruction: the bulk prefetch, no local memory);
# 3. benchmarks/decode_prefetch.py: the A/B of the prefetch and allow settings at batch 1,
#    torch's cuDNN and flash in the same run;
# 4. the lab cluster kernel's timeline with the next grid allowed at the start or late;
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
stage "lab timeline" 90 "$OUT/timeline.txt" env CL_TRIGGER=1 CL_STAMPS=1 \
    $PY benchmarks/cluster_decode.py 8192
stage "decode grid" 150 "$OUT/grid.txt" $PY benchmarks/decode.py --heads 8/8 \
    --out "$OUT/grid.json"
cat "$OUT/summary.txt"
