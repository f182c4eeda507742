#!/usr/bin/env bash
# First GPU run of the Hopper forward kernel (cupyflash/cuda/flash_fwd_wgmma.cuh), in one
# go on an H100 or H200, from the repository root:
#
#     OUT=/tmp/first_run bash benchmarks/hopper_first_run.sh
#
# Stages, each under its own time limit so that a hung kernel (a deadlocked mbarrier or
# named barrier) costs one stage, not the session; about 5 minutes when all goes well,
# at most 9 (inside one 10-minute device command) when every stage runs to its limit:
#   1. debug.txt     GPU, versions; per head dim 128, 64, 256: small problems through the
#                    wgmma and mma.sync kernels, errors against float64 and where they
#                    sit (benchmarks/wgmma_debug.py). If all three hang, stop here.
#   2. sass.txt      registers, spills, C75xx diagnostics and instruction counts (HGMMA,
#                    UTMALDG, SYNCS, ...) of every wgmma variant, as this machine's NVRTC
#                    builds them (benchmarks/sass.py --kernel wgmma)
#   3. test_wgmma.txt        pytest -m gpu tests/test_wgmma.py (wgmma selected)
#   4. test_suite_wgmma.txt  the fp16/bf16 GPU attention suite with CUPYFLASH_FWD_KERNEL=wgmma
#   5. bench.txt, attention.json   bf16 forward, d = 64/128/256, s = 1k..16k, causal and
#                    not: wgmma, mma.sync, torch SDPA flash (FA2) and cuDNN in one process
#   summary.txt      each stage's exit status and seconds
# Everything is written under $OUT (default /tmp/hopper_first_run).
set -u
OUT=${OUT:-/tmp/hopper_first_run}
# shellcheck source=benchmarks/stage.sh
source "$(dirname "$0")/stage.sh"  # cd to the repository root; PY; stage()
CUOBJDUMP=${CUOBJDUMP:-$(command -v cuobjdump || echo /usr/local/cuda/bin/cuobjdump)}
export CUOBJDUMP

{
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
    $PY -c "import cupy, numpy, sys; from cupy.cuda import nvrtc; \
print('python', sys.version.split()[0], 'cupy', cupy.__version__, 'numpy', numpy.__version__, \
'nvrtc', nvrtc.getVersion(), 'cc', cupy.cuda.Device().compute_capability)"
    $PY -c "import torch; print('torch', torch.__version__, \
'cudnn', torch.backends.cudnn.version())"
    echo "cuobjdump: $CUOBJDUMP"; git log -1 --oneline 2>/dev/null
} >"$OUT/debug.txt" 2>&1

hung=0
for d in 128 64 256; do
    stage "debug d=$d" 45 "$OUT/debug.txt" $PY benchmarks/wgmma_debug.py --d "$d"
    status=$?
    { [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; } && hung=$((hung + 1))
done
if [ "$hung" -eq 3 ]; then  # the tests and the benchmark would only hang in turn
    echo "the wgmma kernel hung at every head dim: tests and benchmark skipped" \
        | tee -a "$OUT/summary.txt"
    exit 1
fi

stage "sass" 45 "$OUT/sass.txt" $PY benchmarks/sass.py --kernel wgmma --filter "" \
    --cuobjdump "$CUOBJDUMP"

CUPYFLASH_FWD_KERNEL=wgmma stage "test_wgmma" 150 "$OUT/test_wgmma.txt" \
    $PY -m pytest -m gpu -q --maxfail=8 -p no:cacheprovider tests/test_wgmma.py

CUPYFLASH_FWD_KERNEL=wgmma stage "GPU suite on wgmma" 80 "$OUT/test_suite_wgmma.txt" \
    $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_cupy_attention.py \
    -k "float16 or bfloat16 or 2_to_the_31"

stage "benchmark" 120 "$OUT/bench.txt" $PY benchmarks/attention.py --dtype bfloat16 \
    --d 64 128 256 --s 1024 2048 4096 8192 16384 --causal 0 1 \
    --providers cupyflash_wgmma cupyflash_mma torch_flash torch_cudnn --out "$OUT/attention.json"

echo "total $SECONDS s" | tee -a "$OUT/summary.txt"
