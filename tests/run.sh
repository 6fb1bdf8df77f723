#!/usr/bin/env bash
# The test command: set up, then pytest (GPU tests skip without a CUDA kernel and a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash examples/setup_env.sh | tail -n 1)
"$PY" -m pytest tests -q -p no:cacheprovider --durations=15 "$@"
