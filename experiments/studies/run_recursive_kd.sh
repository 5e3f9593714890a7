#!/usr/bin/env bash
# The recursive-distillation study end to end (experiments/studies/recursive_kd.yaml), then docs/results.md:
#   experiments/studies/run_recursive_kd.sh            (about 45 minutes on 2 CPU cores; reruns resume)
# 1. the two teachers, trained once (teacher stage only) and loaded by every point through teacher.checkpoint;
# 2. every point of the study (distill sweep: finished points are skipped on a rerun);
# 3. docs/results.md and docs/results.png from the points' result files (experiments/studies/results.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
DISTILL=${DISTILL:-.venv/bin/distill}
PYTHON=${PYTHON:-.venv/bin/python}
export WANDB_MODE=${WANDB_MODE:-disabled}
"$DISTILL" run experiments/quickstart.yaml generations=0 baseline=false --out runs/study/teacher-r18 --no-progress
"$DISTILL" run experiments/quickstart_born_again.yaml generations=0 baseline=false --out runs/study/teacher-bornagain \
  --no-progress
"$DISTILL" sweep experiments/studies/recursive_kd.yaml "$@"
"$PYTHON" experiments/studies/results.py runs/recursive_kd --out docs/results.md
