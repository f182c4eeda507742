# Sourced by the GPU session scripts (gpu_session.sh, hopper_first_run.sh,
# hopper_bwd_run.sh) after they set OUT: the repository root as the working directory,
# PY, and stage(), which runs one command under a time limit (so that a hung kernel costs
# one stage, not the session), appends its output to a log, and records its exit status
# and seconds in $OUT/summary.txt.
mkdir -p "$OUT"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

stage() {  # stage NAME LIMIT_SECONDS LOGFILE COMMAND...
    local name=$1 limit=$2 log=$3
    shift 3
    local start=$SECONDS
    echo "== $name (limit ${limit}s): $*" | tee -a "$log"
    timeout -k 5 "$limit" "$@" >>"$log" 2>&1
    local status=$?
    echo "$name: exit $status after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt" "$log"
    return "$status"
}
