#!/usr/bin/env bash
# The prepared GPU check: prints ONE JSON line with every GPU throughput figure and the checks of the GPU-only and
# multi-rank paths (compile, GPU decoding, fp16, determinism, SIGTERM + resume, two ranks, a loaded teacher + IJB;
# see gpu_check.py).
#   benchmarks/gpu_check.sh                       one GPU, at most 10 minutes (--budget SECONDS)
#   benchmarks/gpu_check.sh --device cpu --tiny   the same code on a CPU with tiny sizes, in seconds
# Uses $PYTHON, else the repository's .venv (make install), else python3. Progress goes to stderr.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py="python3"; fi
fi
if ! "$py" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('torch') and u.find_spec('distill')))" 2>/dev/null; then
  echo "gpu_check.sh: $py cannot import facedistill and torch; run 'make install' in $root first (or set PYTHON)" >&2
  exit 2
fi
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" benchmarks/gpu_check.py "$@"
