#!/usr/bin/env bash
# The whole study (experiments/studies/study.py), every arm and seed, then docs/results.md with its plots:
#   experiments/studies/run_study.sh          (measured time: docs/results.md, section 5; a rerun resumes)
# 1. prepare: the teacher (trained once, loaded by checkpoint by every arm), a synthetic IJB-C set, the budget curve;
# 2. stream 1 (the face-KD table, then the recursion with its best loss) and stream 2 (the paper's loss through
#    generations with its controls, the P x K diagnosis) side by side: on 2 cores two processes of one torch thread
#    each train these small students faster than one process of two;
# 3. the report.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
export WANDB_MODE=${WANDB_MODE:-disabled}
mkdir -p runs/study
"$PYTHON" experiments/studies/study.py --stream prepare "$@"
"$PYTHON" experiments/studies/study.py --stream 1 "$@" > runs/study/stream-1.log 2>&1 &
one=$!
"$PYTHON" experiments/studies/study.py --stream 2 "$@" > runs/study/stream-2.log 2>&1 &
two=$!
status=0
wait $one || { echo "stream 1 failed: see runs/study/stream-1.log" >&2; status=1; }
wait $two || { echo "stream 2 failed: see runs/study/stream-2.log" >&2; status=1; }
[ $status -eq 0 ] || exit $status
"$PYTHON" experiments/studies/study.py --stream report "$@"
