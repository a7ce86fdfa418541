#!/usr/bin/env bash
# The GPU benchmarks of issue 5 in one go, on one CUDA GPU, in under 8 minutes (H200):
# train_throughput for MaskRCNN-ResNet50 at 1024 px, batch 4 and 2, and for
# MaskRCNN-EfficientNetB2B at 1024 px, batch 4; data_throughput for R50 at 1024 px; then
# learn_shapes if enough of the budget is left. Every step has its own timeout; a failed or
# timed-out step is recorded as {"benchmark": ..., "error": ...} and the suite goes on.
#
#   bash benchmarks/gpu_suite.sh [RESULTS_DIR]      # from anywhere; default benchmarks/results
#
# Writes RESULTS_DIR/gpu-<UTC time>.jsonl (each benchmark's last-line JSON object) and
# RESULTS_DIR/gpu-<UTC time>.log (everything printed), and prints the JSON lines at the end.
# Python: $PYTHON if set, else .venv/bin/python if it sees a GPU, else python3. The trainer is
# imported from this checkout; if its dependencies are missing, wheels in .whl/ are installed
# (offline machines), else `pip install -e '.[trainer]'` into .venv.
set -euo pipefail

cd "$(dirname "$0")/.."
RESULTS_DIR=${1:-benchmarks/results}
BUDGET_S=${BUDGET_S:-470}  # learn_shapes runs only inside what is left of this
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RESULTS_DIR"
RESULTS=$RESULTS_DIR/gpu-$STAMP.jsonl
LOG=$RESULTS_DIR/gpu-$STAMP.log
DATA=$(mktemp -d /tmp/instseg-gpu-suite-XXXXXX)
trap 'rm -rf "$DATA"' EXIT
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/trainer${PYTHONPATH:+:$PYTHONPATH}

if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]] &&
        .venv/bin/python -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
        PYTHON=.venv/bin/python
    else
        PYTHON=python3
    fi
fi
if ! "$PYTHON" -c 'import instseg_trainer.engine.trainer' 2>/dev/null; then
    if compgen -G '.whl/*.whl' >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/instseg-site \
            .whl/*.whl
        export PYTHONPATH=$PYTHONPATH:/tmp/instseg-site
    else
        python3 -m venv .venv
        .venv/bin/python -m pip install -q -e '.[trainer]'
        PYTHON=.venv/bin/python
    fi
fi
"$PYTHON" - <<'EOF' | tee -a "$LOG"
import torch, torchvision
assert torch.cuda.is_available(), "gpu_suite.sh needs a CUDA GPU"
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"{torch.cuda.get_device_name()}, python at {__import__('sys').executable}")
EOF

# run_step NAME TIMEOUT_S ARGS...: runs "$PYTHON ARGS...", keeps its last line as the result
run_step() {
    local name=$1 limit=$2 rc=0 started=$SECONDS
    shift 2
    echo "== $name (timeout ${limit} s, at ${SECONDS} s)" | tee -a "$LOG"
    timeout -k 10 "$limit" "$PYTHON" "$@" 2> >(tee -a "$LOG" >&2) |
        tee -a "$LOG" "$DATA/$name.out" || rc=$?
    local last
    last=$(tail -n 1 "$DATA/$name.out" 2>/dev/null || true)
    if [[ $rc -eq 0 && $last == \{* ]]; then
        echo "$last" >>"$RESULTS"
    else
        ((rc == 124 || rc == 137)) && rc="$rc, timed out"
        printf '{"benchmark": "%s", "error": "exit %s after %s s"}\n' \
            "$name" "$rc" "$((SECONDS - started))" | tee -a "$RESULTS"
    fi
}

# one dataset at ~1024 px for every step: 80 train images (the largest step needs 20 x 4)
run_step sample_data 180 -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from train_throughput import sample_dataset
sample_dataset(Path('$DATA/shapes'), 80, 1024, Path('$DATA'))
print('{\"benchmark\": \"sample_data\", \"train_images\": 80, \"input_size\": 1024}')
"
COMMON=(--device cuda --input-size 1024 --warmup 5 --steps 15 --rounds 2 --data "$DATA/shapes")
run_step train_r50_b4 180 benchmarks/train_throughput.py --template MaskRCNN-ResNet50 \
    --batch-size 4 "${COMMON[@]}"
run_step train_r50_b2 150 benchmarks/train_throughput.py --template MaskRCNN-ResNet50 \
    --batch-size 2 "${COMMON[@]}"
run_step train_effb2b_b4 150 benchmarks/train_throughput.py \
    --template MaskRCNN-EfficientNetB2B --batch-size 4 "${COMMON[@]}"
run_step data_r50_b4 120 benchmarks/data_throughput.py --template MaskRCNN-ResNet50 \
    --input-size 1024 --batch-size 4 --batches 15 --workers 0,1,2,4,8 --device cuda \
    --model-warmup 5 --model-steps 10 --data "$DATA/shapes"

left=$((BUDGET_S - SECONDS))
if ((left >= 90)); then
    run_step learn_shapes "$left" benchmarks/learn_shapes.py --device cuda --output "$DATA/learn"
else
    printf '{"benchmark": "learn_shapes", "error": "skipped: %s s of the budget left"}\n' \
        "$left" | tee -a "$RESULTS"
fi

echo "== done in $SECONDS s; results in $RESULTS, log in $LOG" | tee -a "$LOG"
cat "$RESULTS"
