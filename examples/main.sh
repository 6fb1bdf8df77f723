#!/usr/bin/env bash
# The main job: set up, train the digits example under mpirun (asynchronous DistributedOptimizer
# over MPI RMA; a GPU per rank where there are enough, else CPU), then the GEMM accuracy/speed
# table for the device at hand, then a short summary. Results (JSON/PNG) go to benchmarks/results/local/.
#   RANKS=N overrides the number of ranks (default 4 where there are 4 cores, else 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash examples/setup_env.sh | tail -n 1)
OUT=benchmarks/results/local
mkdir -p "$OUT"
echo "== torch_hpc build: $("$PY" -c 'import torch_hpc, json; print(json.dumps(torch_hpc.build_info()))')"

CORES=$(nproc)
RANKS=${RANKS:-$([ "$CORES" -ge 4 ] && echo 4 || echo 2)}
mapfile -t LAUNCH < <("$PY" -c 'import sys; from torch_hpc.distributed.launcher import mpiexec_command
print("\n".join(mpiexec_command(int(sys.argv[1]), bind_to_none=True, python=True)))' "$RANKS")
[ "${#LAUNCH[@]}" -gt 0 ] || { echo "main.sh: no mpiexec (examples/setup_env.sh installs MPICH)" >&2; exit 1; }
echo "== 1/2 training: ${LAUNCH[*]} examples/train_digits.py --mode async"
OMP_NUM_THREADS=1 "${LAUNCH[@]}" examples/train_digits.py --mode async --steps 300 \
  --report "$OUT/train_digits.json" | grep -v '^RESULT '
echo "== 2/2 GEMM: python benchmarks/gemm.py"
"$PY" benchmarks/gemm.py --out "$OUT" "$@"

"$PY" - "$OUT" <<'PYEOF'
import glob, json, os, sys
out = sys.argv[1]
t = json.load(open(os.path.join(out, "train_digits.json")))
g = json.load(open(max(glob.glob(os.path.join(out, "gemm-*.json")), key=os.path.getmtime)))
print("\n================ summary ================")
tta = f"{t['time_to_target']:.2f} s" if t["time_to_target"] else "not reached"
rates = ", ".join(f"{r['steps_per_second']:.0f}" for r in t["ranks"])
print(f"training  {t['world_size']} ranks ({t['launcher']}), {t['mode']} on {t['device']}: held-out "
      f"accuracy {t['final_accuracy']:.2%} (time to {t['target']:.0%}: {tta}; steps/s per rank {rates})")
row = max(g["rows"], key=lambda r: r["m"] * r["n"] * r["k"])
f32, hpc = row["fp32"], row["torch_hpc"]
print(f"GEMM      {row['m']}x{row['n']}x{row['k']} on {g['meta']['card']}: torch_hpc {hpc['tflops']:.3g} "
      f"TFLOP/s, error {hpc['error']:.1e} vs fp32 {f32['tflops']:.3g} TFLOP/s, error {f32['error']:.1e} "
      f"({hpc['tflops'] / f32['tflops']:.2f}x speed, {hpc['error'] / f32['error']:.2f}x error)")
if g["meta"]["device"] == "cpu":
    print("          (the CPU kernel is the exact reference, not a fast path: speed is the GPU's)")
print(f"files     {out}/ (train_digits.json, gemm-*.json/png)")
PYEOF
