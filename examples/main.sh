#!/usr/bin/env bash
# The main job: set up, then the GEMM accuracy/speed table on the device at hand
# (CUDA when a GPU and the CUDA kernels are there, else the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash examples/setup_env.sh | tail -n 1)
echo "== torch_hpc build: $("$PY" -c 'import torch_hpc, json; print(json.dumps(torch_hpc.build_info()))')"
"$PY" benchmarks/gemm.py --out benchmarks/results/local "$@"
