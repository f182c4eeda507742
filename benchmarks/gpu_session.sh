#!/usr/bin/env bash
# The first GPU run of what branch gpu-pending adds (written in a session without a GPU):
# the variant kernels (forward and backward), attention_varlen and attention_decode on
# CuPy, dropout's Philox on the device, and the unchanged plain kernels around them. The
# Hopper kernel has its own script, benchmarks/hopper_first_run.sh.
#
#     OUT=/tmp/run bash benchmarks/gpu_session.sh verify     # ~6 min: tests
#     OUT=/tmp/run bash benchmarks/gpu_session.sh sanitize   # ~3 min: compute-sanitizer
#     OUT=/tmp/run bash benchmarks/gpu_session.sh bench      # ~4 min: issue 6's bars
#
# Each stage runs under its own time limit and writes its log and summary.txt under $OUT.
set -u
OUT=${OUT:-/tmp/gpu_session}
# shellcheck source=benchmarks/stage.sh
source "$(dirname "$0")/stage.sh"  # cd to the repository root; PY; stage()

{ nvidia-smi --query-gpu=name,driver_version --format=csv; git log -1 --oneline; } \
    >"$OUT/versions.txt" 2>&1

case "${1:-verify}" in
verify)
    # the new GPU paths first (they fail fastest), then everything else of the GPU suite
    stage "new GPU paths" 240 "$OUT/verify_new.txt" $PY -m pytest -m gpu -q -p no:cacheprovider \
        --maxfail=10 tests/test_variants.py tests/test_variants_backward.py \
        tests/test_sequences.py tests/test_dropout.py tests/test_decode_gpu.py
    stage "GPU suite" 330 "$OUT/verify_suite.txt" $PY -m pytest -m gpu -q -p no:cacheprovider \
        --maxfail=10 --ignore=tests/test_wgmma.py --ignore=tests/test_variants.py \
        --ignore=tests/test_variants_backward.py --ignore=tests/test_sequences.py \
        --ignore=tests/test_dropout.py --ignore=tests/test_decode_gpu.py tests
    ;;
sanitize)
    for tool in memcheck racecheck; do
        stage "compute-sanitizer $tool" 150 "$OUT/sanitize.txt" compute-sanitizer --tool "$tool" \
            --error-exitcode 1 $PY benchmarks/sanitize.py variants decode
    done
    ;;
bench)
    stage "variants" 150 "$OUT/variants.txt" $PY benchmarks/variants.py --s 4096,16384 \
        --d 64,128 --out "$OUT/variants.json"
    if [ -f benchmarks/decode.py ]; then
        stage "decode" 150 "$OUT/decode.txt" $PY benchmarks/decode.py --out "$OUT/decode.json"
    fi
    ;;
*)
    echo "usage: $0 verify|sanitize|bench" >&2
    exit 2
    ;;
esac
echo "total $SECONDS s" | tee -a "$OUT/summary.txt"
