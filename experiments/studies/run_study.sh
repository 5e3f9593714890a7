#!/usr/bin/env bash
# The whole study (experiments/studies/study.py), every arm and seed, then docs/results.md with its plots:
#   experiments/studies/run_study.sh          (measured time: docs/results.md, section 5; a rerun resumes)
# 1. prepare: the teacher (trained once, loaded by checkpoint by every arm) and a synthetic IJB-C set;
# 2. the budget curve in two halves side by side (curve-1, curve-2);
# 3. stream 1 (the face-KD table, then the recursion with its best loss) and stream 2 (the paper's loss through
#    generations with its controls, the P x K diagnosis) side by side: on 2 cores two processes of one torch thread
#    each train these small students faster than one process of two;
# 4. the report (docs/results.md and the summary in README.md's evidence section), with the wall time from the
#    start to it (runs/study/timing-wall.json).
# When one of two side-by-side parts fails, the other is stopped (a rerun skips every finished point).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
export WANDB_MODE=${WANDB_MODE:-disabled}
mkdir -p runs/study
start=$(date +%s)

side_by_side() {  # side_by_side A B: study.py --stream A and --stream B at once, logs in runs/study/stream-<X>.log
  "$PYTHON" experiments/studies/study.py --stream "$1" "${@:3}" > "runs/study/stream-$1.log" 2>&1 &
  local one=$!
  "$PYTHON" experiments/studies/study.py --stream "$2" "${@:3}" > "runs/study/stream-$2.log" 2>&1 &
  local two=$!
  local status=0 first
  for first in 1 2; do  # whichever ends first; a failure stops the other
    wait -n $one $two 2>/dev/null || status=$?
    if [ $status -ne 0 ]; then
      kill $one $two 2>/dev/null || true
      wait 2>/dev/null || true
      echo "study: stream $1 or $2 failed: see runs/study/stream-$1.log and runs/study/stream-$2.log" >&2
      exit $status
    fi
  done
}

"$PYTHON" experiments/studies/study.py --stream prepare "$@"
side_by_side curve-1 curve-2 "$@"
side_by_side 1 2 "$@"
echo "{\"seconds\": $(( $(date +%s) - start ))}" > runs/study/timing-wall.json
"$PYTHON" experiments/studies/study.py --stream report --readme README.md "$@"
