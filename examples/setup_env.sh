#!/usr/bin/env bash
# Sets up torch_hpc on a fresh machine and prints the Python to use (last line of stdout).
#   default: a venv in .venv with torch==2.13.0 (CPU wheel) and the build/test tools
#   TORCH_HPC_PYTHON=python3: use that interpreter and the torch it already has (2.11-2.13)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${TORCH_HPC_PYTHON:-}" ]; then
  PY=$TORCH_HPC_PYTHON
else
  VENV=${TORCH_HPC_VENV:-.venv}
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  PY=$VENV/bin/python
  "$PY" -m pip install -q --disable-pip-version-check torch==2.13.0 numpy ninja wheel pytest expecttest matplotlib scikit-learn mpich mpi4py >&2
fi
# compat: the checkout's folder goes on sys.path (a .pth file), so this package wins over a
# folder named torch_hpc in the working directory (the default editable finder comes last and
# loses to it: `import torch_hpc` then finds an empty namespace package)
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e . \
  --config-settings editable_mode=compat >&2
echo "$PY"
