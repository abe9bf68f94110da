#!/usr/bin/env bash
# The test command (README, CI):  bash scripts/test.sh [pytest args]
# Sets up .venv if needed, then runs the whole suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export CUDA_VISIBLE_DEVICES=""        # tests are CPU-only and deterministic
# a fixed thread count (training otherwise picks one from the machine's load, infra.runtime.cpu_threads)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # tests never touch the network
exec .venv/bin/python -m pytest "$@"
