#!/usr/bin/env bash
# The prepared GPU check (see scripts/gpu_check.py): one command, no network, at most --budget_s (default 420 s).
#   bash scripts/gpu_check.sh            # writes out/gpu_check.json and prints a table
# Uses .venv when it holds a CUDA build of torch, else the machine's python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  PY=.venv/bin/python
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PY" -m scripts.gpu_check "$@"
