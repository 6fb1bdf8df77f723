#!/usr/bin/env bash
# One device call: build, CUDA tests, sanitizer, SASS, benchmark. Logs go to ${OUT:-.out}.
# Usage: bash benchmarks/gpu_check.sh [benchmark args...]
set -uo pipefail
OUT=${OUT:-.out}; mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# A compiler that has only a static libstdc++ (the GPU image's /opt/gcc) gives the extension a
# private copy whose iostreams crash when formatting numbers: use the system g++ when so.
if [ "$(${CXX:-g++} -print-file-name=libstdc++.so)" = "libstdc++.so" ] && [ -x /usr/bin/g++ ]; then
  export CXX=/usr/bin/g++ CC=/usr/bin/gcc
fi
rm -rf build torch_hpc/_C*.so
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
t0=$(date +%s)
$PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"; grep -A6 "build configuration" "$OUT/build.log"
so=$(ls torch_hpc/_C*.so)
cuobjdump -sass "$so" > /tmp/sass.txt 2>&1
{ echo "== HMMA/HGMMA counts per kernel"; awk '/Function :/{f=$3} /HGMMA/{g[f]++} /HMMA/{h[f]++} END{for(k in h) print "HMMA", h[k], k; for(k in g) print "HGMMA", g[k], k}' /tmp/sass.txt; } > "$OUT/sass.txt"
cat "$OUT/sass.txt"
$PY -m pytest tests -q -p no:logging -rs 2>&1 | tee "$OUT/tests.log" | tail -25
compute-sanitizer --tool memcheck --error-exitcode 9 $PY -c "
import torch, torch_hpc
for m, k, n in [(1, 1, 1), (130, 33, 129), (257, 1000, 64)]:
    a = torch.randn(m, k, device='cuda'); b = torch.randn(k, n, device='cuda'); a[0, 0] = float('inf')
    torch_hpc.mm(a, b); torch_hpc.mm(a.t().contiguous().t(), b); torch_hpc.bmm(a.expand(2, m, k), b.expand(2, k, n))
torch.cuda.synchronize(); print('memcheck shapes done')
" > "$OUT/memcheck.log" 2>&1; echo "memcheck exit $?"; tail -3 "$OUT/memcheck.log"
PYTHONPATH=$PWD $PY benchmarks/gemm.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v '^\['
