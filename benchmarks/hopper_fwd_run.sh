#!/usr/bin/env bash
# GPU runs of the Hopper forward (cuda/flash_fwd_wgmma.cuh), stage by stage, each under
# its own time limit, logs and summary.txt under $OUT:
#
#     OUT=/tmp/run bash benchmarks/hopper_fwd_run.sh tests        # test_wgmma.py
#     OUT=/tmp/run bash benchmarks/hopper_fwd_run.sh suite        # the attention GPU tests
#     OUT=/tmp/run bash benchmarks/hopper_fwd_run.sh grid         # forward grid, FA2, cuDNN
#                                                                 # (persistent on/off too)
#     OUT=/tmp/run bash benchmarks/hopper_fwd_run.sh ab DIR       # + the same grid (ours only)
#                                                                 # from the tree in DIR
set -u
OUT=${OUT:-/tmp/hopper_fwd}
# shellcheck source=benchmarks/stage.sh
source "$(dirname "$0")/stage.sh"  # cd to the repository root; PY; stage()

nvidia-smi --query-gpu=name,driver_version --format=csv >"$OUT/versions.txt" 2>&1
GRID="benchmarks/attention.py --op fwd --d 64 128 256"

case "${1:-tests}" in
tests)
    stage "wgmma tests" 200 "$OUT/tests.txt" $PY -m pytest -m gpu -q -p no:cacheprovider \
        --maxfail=5 tests/test_wgmma.py
    ;;
suite)
    stage "attention tests" 300 "$OUT/suite.txt" $PY -m pytest -m gpu -q -p no:cacheprovider \
        --maxfail=5 tests/test_cupy_attention.py tests/test_attention.py
    ;;
grid)  # the default (auto), and each way of the persistent dispatch
    stage "grid" 300 "$OUT/grid.txt" $PY $GRID --providers cupyflash cupyflash_static \
        cupyflash_persistent torch_flash torch_cudnn --out "$OUT/fwd.json"
    ;;
ab)
    stage "grid" 240 "$OUT/grid.txt" $PY $GRID --dtype bfloat16 \
        --providers cupyflash torch_flash torch_cudnn --out "$OUT/fwd.json"
    (cd "$2" && export PYTHONPATH=$PWD && stage "grid of $2" 200 "$OUT/grid_ab.txt" $PY \
        $GRID --dtype bfloat16 --providers cupyflash --out "$OUT/fwd_ab.json")
    ;;
*)
    echo "usage: $0 tests|suite|grid|ab DIR" >&2
    exit 2
    ;;
esac
