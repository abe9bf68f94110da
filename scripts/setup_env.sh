#!/usr/bin/env bash
# Create/refresh the local virtual environment .venv with the pinned requirements.
#   bash scripts/setup_env.sh            # runtime + test dependencies
# Re-running is cheap: pip runs only when a requirements file changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing requirements into .venv (first run takes about 2 minutes)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
  # the toolkit itself, editable: `from evaluation.api import MedicalVQA` works from any folder
  .venv/bin/python -c "import setuptools" 2>/dev/null || .venv/bin/python -m pip install -q setuptools
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
