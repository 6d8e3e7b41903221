#!/usr/bin/env bash
# The GPU check, prepared to run unattended on a GPU machine that has this repository and a package
# registry (or a Python with a CUDA torch already installed). Within GPU_CHECK_BUDGET seconds (480,
# i.e. 8 minutes) it:
#   1. records the machine (nvidia-smi, torch, triton);
#   2. installs, unless a Python with a CUDA torch is already there (pip: torch's CUDA wheel, the
#      package, pytest);
#   3. runs the kernel and offload-transfer tests natively on the GPU;
#   4. runs bench_engram.py --device cuda --json (layer vs PLE and the reference, gather vs copy);
#   5. runs bench_offload.py --device cuda --json (resident vs host vs disk tables);
#   6. writes summary.json and summary.md (benchmarks/gpu_summary.py), even after a failure.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--skip-install] [--out DIR]
#
# Results go to $OUT if set, else --out, else ./gpu-check-out. Each step has a time limit that
# shrinks to what is left of the budget, and its log and status are kept, so a failing or slow
# step leaves the others' results. --dry-run prints the plan and writes a summary without running.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT_DIR=${OUT:-$REPO/gpu-check-out}
DRY=0
INSTALL=auto
BUDGET=${GPU_CHECK_BUDGET:-480}
PY=${PYTHON:-python3}

while (($#)); do
    case $1 in
        --dry-run) DRY=1 ;;
        --skip-install) INSTALL=no ;;
        --out)
            OUT_DIR=$2
            shift
            ;;
        -h | --help)
            sed -n '2,20p' "$0"
            exit 0
            ;;
        *)
            echo "gpu_check.sh: unknown argument $1" >&2
            exit 2
            ;;
    esac
    shift
done

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
STEPS=$OUT_DIR/steps.tsv
printf 'step\tstatus\tseconds\tdetail\n' >"$STEPS"
START=$(date +%s)
SUMMARY_RESERVE=20

elapsed() { echo $(($(date +%s) - START)); }

# step NAME LIMIT_S CMD...: run CMD with its output in NAME.log, within LIMIT_S and the budget left.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SUMMARY_RESERVE - $(elapsed)))
    if ((left < 15)); then
        printf '%s\tskipped\t0\tno time left in the %ss budget\n' "$name" "$BUDGET" >>"$STEPS"
        echo "- [$name] skipped: no time left"
        return 0
    fi
    if ((limit > left)); then
        limit=$left
    fi
    echo "+ [$name] (limit ${limit}s) $*"
    if ((DRY)); then
        printf '%s\tdry-run\t0\t%s\n' "$name" "$*" >>"$STEPS"
        return 0
    fi
    local t0 rc=0 status=ok stdout=$OUT_DIR/$name.log
    if [[ -n ${STDOUT_JSON:-} ]]; then
        stdout=$OUT_DIR/$name.json
    fi
    t0=$(date +%s)
    if [[ $stdout == "$OUT_DIR/$name.log" ]]; then
        timeout --kill-after=10 "$limit" "$@" >"$stdout" 2>&1 || rc=$?
    else
        timeout --kill-after=10 "$limit" "$@" >"$stdout" 2>"$OUT_DIR/$name.log" || rc=$?
    fi
    if ((rc == 124 || rc == 137)); then
        status=timeout
    elif ((rc != 0)); then
        status=failed
    fi
    printf '%s\t%s\t%s\trc=%s\n' "$name" "$status" "$(($(date +%s) - t0))" "$rc" >>"$STEPS"
    tail -n 3 "$OUT_DIR/$name.log" || true
    return 0
}

# step_json NAME LIMIT_S CMD...: like step, with stdout (the benchmark's JSON report) in NAME.json.
step_json() {
    STDOUT_JSON=1 step "$@"
}

summarize() {
    local flags=()
    if ((DRY)); then
        flags+=(--dry-run)
    fi
    "$PY" "$REPO/benchmarks/gpu_summary.py" "$OUT_DIR" --budget "$BUDGET" --elapsed "$(elapsed)" \
        ${flags[@]+"${flags[@]}"} || echo "summary failed" >&2
}
trap summarize EXIT

# 1. The machine.
step machine 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; \
    $PY -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)' || true"

# 2. A Python with a CUDA torch: the one here if it has one, else a fresh venv from the registry.
has_cuda_torch() {
    "$1" -c 'import torch, triton, transformers; assert torch.cuda.is_available()' >/dev/null 2>&1
}
if [[ $INSTALL == no ]] || { ((!DRY)) && has_cuda_torch "$PY"; }; then
    echo "using $PY"
else
    VENV=${TMPDIR:-/tmp}/engram-hf-gpu-venv
    step install 300 bash -c "set -e; $PY -m venv '$VENV'; '$VENV/bin/pip' install -q --upgrade pip; \
        '$VENV/bin/pip' install -q 'torch>=2.6,<2.15'; '$VENV/bin/pip' install -q -e '$REPO' pytest"
    if ((!DRY)); then
        PY=$VENV/bin/python
        if ! has_cuda_torch "$PY"; then
            echo "no CUDA torch after the install step; see $OUT_DIR/install.log" >&2
        fi
    fi
fi
export PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH}
export TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET

# 3. Kernel tests, natively on the GPU (conftest only turns the interpreter on without a GPU).
step tests 150 "$PY" -m pytest tests/test_kernels.py tests/test_offload_transfer.py -q -p no:cacheprovider

# 4. The layer: ours vs PLE and the reference approach, gather vs device copy. Sized to fit: a
#    prefill-sized batch, two decode contexts.
step_json bench_engram 170 "$PY" benchmarks/bench_engram.py --device cuda --json --repeats 5 \
    --batch 8 --seq 1024 --decode-contexts 128 4096 --decode-steps 50

# 5. Offloaded tables on the GPU at a realistic batch (3 GiB of tables).
step_json bench_offload 170 "$PY" benchmarks/bench_offload.py --device cuda --json \
    --batch 8 --seq 512 --batches 8 --decode-tokens 16 --cache-rows 65536

echo "done in $(elapsed)s; results in $OUT_DIR"
