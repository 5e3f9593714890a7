#!/usr/bin/env bash
# EKD's comparison table on one pipeline (experiments/studies/face_kd_table.yaml), end to end:
#   experiments/studies/run_face_kd_table.sh [seed=0,1,2 ...]      (one seed: about 25 minutes on 2 CPU cores)
# 1. the teacher, trained once (teacher stage only; the same one recursive_kd.yaml loads, skipped when finished);
# 2. every row (distill sweep: finished rows are skipped on a rerun);
# 3. the table: `distill compare` over the rows, also as runs/face_kd_table/compare.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
DISTILL=${DISTILL:-.venv/bin/distill}
export WANDB_MODE=${WANDB_MODE:-disabled}
"$DISTILL" run experiments/quickstart.yaml generations=0 baseline=false teacher.train.epochs=6 \
  --out runs/study/teacher-r18 --no-progress
"$DISTILL" sweep experiments/studies/face_kd_table.yaml "$@"
"$DISTILL" compare runs/face_kd_table --json > runs/face_kd_table/compare.json
