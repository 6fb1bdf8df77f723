"""CMakeLists.txt builds the same ops for C++ users; the library registers working kernels."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_build_registers_the_ops(tmp_path):
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), "-DTORCH_HPC_WITH_CUDA=OFF",
                    f"-DPython3_EXECUTABLE={sys.executable}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True,
                   timeout=900)
    lib = next(build.glob("libtorch_hpc_ops*.so"))
    code = f"""
import torch
torch.ops.load_library({str(lib)!r})
a, b = torch.randn(33, 70, dtype=torch.float32), torch.randn(70, 9)
c = torch.ops.torch_hpc.mm(a, b)
err = ((c.double() - a.double() @ b.double()).norm() / (a.double() @ b.double()).norm()).item()
print(err)
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert float(out.stdout.strip()) < 1e-6
