#!/usr/bin/env bash
# One device call: build, tests, sanitizer, SASS, benchmarks. Logs go to ${OUT:-.out}.
#   bash benchmarks/gpu_check.sh [gemm benchmark args...]
#   BUILD=0 keeps an earlier build. PARTS="gemm comm" selects what runs (default both): gemm = GEMM tests, memcheck, SASS and
#   benchmarks/gemm.py; comm = distributed tests (CUDA tensors too) and benchmarks/comm.py;
#   optim = DistributedOptimizer tests (CUDA model too); train = benchmarks/train.py;
#   conv = convolution tests and benchmarks/conv.py (CONV_ARGS; layers by index, e.g. --layers 2 3);
#   smoke = one product and one implicit-GEMM convolution with its gradients under a short
#   timeout, stopping the call if they fail (a new kernel's first run); ncu = Nsight Compute on one
#   8192^3 torch_hpc.mm (split and GEMM kernels: speed of light, pipes, stalls; NCU_SHAPE=MxNxK);
#   ncu-conv = the same on the implicit-GEMM kernel's forward and both gradients of one ResNet-50
#   layer, channels_last, batch 64 (NCU_LAYER=index into benchmarks/conv.py's RESNET50, default 2);
#   attention = the attention tests (with PyTorch's OpInfo samples), benchmarks/attention.py
#   (ATTN_ARGS) and the nn.TransformerEncoder models of benchmarks/models.py (MODELS_ARGS).
set -uo pipefail
OUT=${OUT:-.out}; mkdir -p "$OUT"
PARTS=${PARTS:-gemm comm}
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PY=${PYTHON:-python3}
NCU_SECTIONS=(--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis
  --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats)
# A compiler that has only a static libstdc++ (e.g. a g++ in /opt/gcc) gives the extension a
# private copy whose iostreams crash when formatting numbers (segfaults in error paths): link
# the system's shared libstdc++.so.6 instead.
if [ "$(${CXX:-g++} -print-file-name=libstdc++.so)" = "libstdc++.so" ]; then
  so=$(ldconfig -p | awk '/libstdc\+\+\.so\.6 /{print $NF; exit}')
  mkdir -p /tmp/torch_hpc_stdlib && ln -sf "$so" /tmp/torch_hpc_stdlib/libstdc++.so
  export LDFLAGS="-L/tmp/torch_hpc_stdlib ${LDFLAGS:-}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [ "${BUILD:-1}" = 1 ] || ! ls torch_hpc/_C*.so > /dev/null 2>&1; then  # BUILD=0 reuses the last build
  rm -rf build torch_hpc/_C*.so torch_hpc/_comm*.so
  t0=$(date +%s)
  $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s"; grep -A8 "build configuration" "$OUT/build.log"
fi

if [[ " $PARTS " == *" smoke "* ]]; then
  timeout 120 $PY -c "
import torch, torch_hpc
a = torch.randn(1000, 3000, device='cuda'); b = torch.randn(3000, 700, device='cuda')
with torch_hpc.backends.gemm.flags(sgemm_fallback=False):
    c = torch_hpc.mm(a, b)
print('mm rel err', ((c.double() - a.double() @ b.double()).norm() / (a.double() @ b.double()).norm()).item())
x = torch.randn(4, 64, 16, 16, device='cuda').contiguous(memory_format=torch.channels_last).requires_grad_()
w = torch.randn(128, 64, 3, 3, device='cuda').requires_grad_()
with torch_hpc.backends.conv.flags(implicit_gemm=True):
    y = torch_hpc.conv2d(x, w, None, 1, 1)
    y.square().sum().backward()
torch.cuda.synchronize()
ref = torch.nn.functional.conv2d(x.double(), w.double(), None, 1, 1)
print('conv rel err', ((y.double() - ref).norm() / ref.norm()).item(), torch_hpc.exact_path_stats())
" 2>&1 | tee "$OUT/smoke.log" || { echo "smoke failed"; exit 1; }
fi

if [[ " $PARTS " == *" gemm "* ]]; then
  cuobjdump -sass torch_hpc/_C*.so > /tmp/sass.txt 2>&1
  { echo "== HMMA/HGMMA counts per kernel"; awk '/Function :/{f=$3} /HGMMA/{g[f]++} /HMMA/{h[f]++} END{for(k in h) print "HMMA", h[k], k; for(k in g) print "HGMMA", g[k], k}' /tmp/sass.txt; } > "$OUT/sass.txt"
  cat "$OUT/sass.txt"
  # TESTS="tests/test_gemm.py -k cuda" narrows the suite (the whole one takes ~8 min on 16 cores)
  timeout 600 $PY -m pytest ${TESTS:-tests --ignore=tests/test_hpc_mpi.py --ignore=tests/test_mpi_world.py \
    --ignore=tests/test_torch_suite.py --ignore=tests/multinode} -q -p no:logging -rs 2>&1 | tee "$OUT/tests.log" | tail -25
  compute-sanitizer --tool memcheck --error-exitcode 9 $PY -c "
import torch, torch_hpc
for m, k, n in [(1, 1, 1), (130, 33, 129), (257, 1000, 64)]:
    a = torch.randn(m, k, device='cuda'); b = torch.randn(k, n, device='cuda'); a[0, 0] = float('inf')
    torch_hpc.mm(a, b); torch_hpc.mm(a.t().contiguous().t(), b); torch_hpc.bmm(a.expand(2, m, k), b.expand(2, k, n))
torch.cuda.synchronize(); print('memcheck shapes done')
" > "$OUT/memcheck.log" 2>&1; echo "memcheck exit $?"; tail -3 "$OUT/memcheck.log"
  $PY benchmarks/gemm.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v '^\['
fi

if [[ " $PARTS " == *" comm "* ]]; then
  $PY -m pytest tests/test_hpc_mpi.py tests/test_mpi_world.py -q -p no:logging -rs 2>&1 | tee "$OUT/tests-comm.log" | tail -15
  mapfile -t MPIEXEC < <($PY -c 'from torch_hpc.distributed.launcher import mpiexec_command
print("\n".join(mpiexec_command(2, python=True)))')
  for dev in cpu cuda; do
    timeout 300 "${MPIEXEC[@]}" benchmarks/comm.py --device $dev --out "$OUT" 2>/dev/null | tee "$OUT/comm-$dev.log" | tail -4
  done
fi

if [[ " $PARTS " == *" optim "* ]]; then
  $PY -m pytest tests/test_optim.py -q -p no:logging -rs 2>&1 | tee "$OUT/tests-optim.log" | tail -15
fi

if [[ " $PARTS " == *" train "* ]]; then
  timeout 900 $PY benchmarks/train.py --out "$OUT" ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train.log" | tail -14
fi

if [[ " $PARTS " == *" conv "* ]]; then
  timeout 400 $PY -m pytest tests/test_conv.py -q -p no:logging -rs -x 2>&1 | tee "$OUT/tests-conv.log" | tail -25
  timeout 500 $PY benchmarks/conv.py --out "$OUT" ${CONV_ARGS:---networks resnet50 superres} 2>&1 | tee "$OUT/conv.log" | grep -v '^\['
fi

if [[ " $PARTS " == *" attention "* ]]; then
  timeout 300 $PY -m pytest tests/test_attention.py tests/test_torch_infos.py -k "attention or scaled_dot" -q \
    -p no:logging -rs 2>&1 | tee "$OUT/tests-attention.log" | tail -15
  timeout 400 $PY benchmarks/attention.py --out "$OUT" ${ATTN_ARGS:-} 2>&1 | tee "$OUT/attention.log" | grep -v '^\['
  timeout 300 $PY benchmarks/models.py --out "$OUT" ${MODELS_ARGS:---models encoder-1024 encoder-4096 --seeds 2 --steps 6} \
    2>&1 | tee "$OUT/models.log" | tail -8
fi

if [[ " $PARTS " == *" ncu "* ]]; then
  IFS=x read -r M N K <<< "${NCU_SHAPE:-8192x8192x8192}"
  # the third call's kernels (the first two warm up); clocks left alone
  timeout 400 ncu --clock-control none --kernel-name regex:'split_|gemm_sm|fallback' --launch-skip 6 --launch-count 6 \
    "${NCU_SECTIONS[@]}" \
    $PY -c "
import torch, torch_hpc
a = torch.randn($M, $K, device='cuda'); b = torch.randn($K, $N, device='cuda')
for _ in range(4):
    torch_hpc.mm(a, b)
torch.cuda.synchronize()
" > "$OUT/ncu.txt" 2>&1; echo "ncu exit $?"
  grep -E '^  [a-z_0-9]+.*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|Issue Slots Busy|No Eligible|Registers Per|Achieved Occupancy' "$OUT/ncu.txt" | head -60
fi

if [[ " $PARTS " == *" ncu-conv "* ]]; then
  # the second forward + backward's three conv_sm90 launches (the backward runs on autograd's
  # thread, so no NVTX range: launches are counted)
  timeout 400 ncu --clock-control none --kernel-name regex:conv_sm90 --launch-skip 3 --launch-count 3 \
    "${NCU_SECTIONS[@]}" \
    $PY -c "
import sys, torch, torch_hpc
sys.path.insert(0, 'benchmarks')
from conv import RESNET50, prepare, implicit_conv2d
x, w, kw = prepare(RESNET50[${NCU_LAYER:-2}], 'implicit', 64, 1, 'cuda', 0, channels_last=True)
for i in range(2):
    y = implicit_conv2d(x, w, None, **kw)
    torch.autograd.grad(y, (x, w), torch.ones_like(y))
    torch.cuda.synchronize()
" > "$OUT/ncu-conv.txt" 2>&1; echo "ncu-conv exit $?"
  grep -E '^  [a-zA-Z_0-9:<>]+.*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|Issue Slots Busy|No Eligible|Registers Per|Achieved Occupancy' "$OUT/ncu-conv.txt" | head -90
fi
