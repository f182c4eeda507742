#!/usr/bin/env bash
# GPU runs of the Hopper backward (cuda/flash_bwd_wgmma.cuh), stage by stage, each under
# its own time limit, logs and summary.txt under $OUT:
#
#     OUT=/tmp/run bash benchmarks/hopper_bwd_run.sh first    # SASS, spot check, bench, tests
#     OUT=/tmp/run bash benchmarks/hopper_bwd_run.sh grid     # checks, then the backward grid
#                                                             # (both dtypes; deterministic too)
set -u
OUT=${OUT:-/tmp/hopper_bwd}
# shellcheck source=benchmarks/stage.sh
source "$(dirname "$0")/stage.sh"  # cd to the repository root; PY; stage()

nvidia-smi --query-gpu=name,driver_version --format=csv >"$OUT/versions.txt" 2>&1
BENCH="$PY benchmarks/attention.py --op bwd --providers cupyflash_bwd_wgmma cupyflash_bwd_mma torch_flash torch_cudnn"

case "${1:-first}" in
first)
    stage "sass" 60 "$OUT/sass.txt" $PY benchmarks/sass.py --kernel wgmma_bwd --filter "" \
        --dump "$OUT/sass"
    stage "spot check" 150 "$OUT/check.txt" $PY benchmarks/check_backward.py || exit 1
    stage "bench" 150 "$OUT/bench.txt" $BENCH --dtype bfloat16 --d 64 128 \
        --s 1024 4096 16384 --out "$OUT/bwd.json"
    stage "tests" 200 "$OUT/tests.txt" $PY -m pytest -m gpu -q -n 8 -p no:cacheprovider -x \
        tests/test_backward.py
    ;;
grid)
    stage "spot check" 150 "$OUT/check.txt" $PY benchmarks/check_backward.py || exit 1
    stage "tests" 200 "$OUT/tests.txt" $PY -m pytest -m gpu -q -n 8 -p no:cacheprovider -x \
        tests/test_backward.py || exit 1
    stage "grid" 240 "$OUT/grid.txt" $PY benchmarks/attention.py --op bwd --d 64 128 \
        --providers cupyflash torch_flash torch_cudnn --out "$OUT/bwd.json"
    stage "grid deterministic" 120 "$OUT/grid_det.txt" $PY benchmarks/attention.py --op bwd \
        --d 64 128 --providers cupyflash --deterministic --out "$OUT/bwd.json"
    ;;
*)
    echo "usage: $0 first|grid" >&2
    exit 2
    ;;
esac
