"""Builds torch_hpc's compiled modules against the torch already installed.

    pip install --no-build-isolation -e .

torch_hpc._C (the GEMM ops, no MPI): CUDA is built when torch has CUDA and a toolkit is found
(TORCH_HPC_FORCE_CPU=1 disables it); TORCH_CUDA_ARCH_LIST chooses the GPU targets (default
"8.0;9.0a;9.0+PTX"). torch_hpc._comm (the hpc_mpi backend): built against the first `mpicxx` on
PATH (or $MPICXX), skipped with a message when there is none (or TORCH_HPC_NO_MPI=1).
MAX_JOBS is honoured.
"""
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0a;9.0+PTX"


def cuda_gencode_flags(arch_list):
    """'8.0;9.0a;9.0+PTX' -> nvcc -gencode flags (sm_XY cubins, compute_XY PTX where +PTX)."""
    flags, archs = [], []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry)
        if not match:
            raise SystemExit(f"torch_hpc: cannot parse TORCH_CUDA_ARCH_LIST entry {entry!r}")
        major, minor, suffix, ptx = match.groups()
        if int(major) < 8:
            raise SystemExit(f"torch_hpc: sm_{major}{minor} has no fp16 mma.sync path; need 8.0 or newer")
        cc = f"{major}{minor}{suffix}"
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        archs.append(f"sm_{cc}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
            archs.append(f"compute_{cc}")
    return flags, archs


def mpi_flags():
    """Compile/link flags from `mpicxx -show` (Open MPI and MPICH wrappers both answer it)."""
    if os.environ.get("TORCH_HPC_NO_MPI", "0") == "1":
        return None, "disabled by TORCH_HPC_NO_MPI=1"
    search = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    mpicxx = os.environ.get("MPICXX") or shutil.which("mpicxx", path=search)
    if not mpicxx:
        return None, "no mpicxx found on PATH: the hpc_mpi backend is not built"
    show = subprocess.run([mpicxx, "-show"], capture_output=True, text=True)
    if show.returncode != 0:
        return None, f"`{mpicxx} -show` failed: the hpc_mpi backend is not built"
    include, library, libs, compile_args, link_args = [], [], [], [], []
    for token in shlex.split(show.stdout)[1:]:
        if token.startswith("-I"):
            include.append(token[2:])
        elif token.startswith("-L"):
            library.append(token[2:])
            link_args.append(f"-Wl,-rpath,{token[2:]}")
        elif token.startswith("-l"):
            libs.append(token[2:])
        elif token.startswith("-Wl,") or token == "-pthread":
            link_args.append(token)
            compile_args += ["-pthread"] if token == "-pthread" else []
    return dict(include_dirs=include, library_dirs=library, libraries=libs,
                extra_compile_args=compile_args, extra_link_args=link_args), mpicxx


def sources(*patterns):
    return sorted(f for p in patterns for f in glob.glob(os.path.join("csrc", p)))


with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
             and os.environ.get("TORCH_HPC_FORCE_CPU", "0") != "1")
cxx_flags = ["-O3", "-g0", "-fopenmp", "-DTORCH_HPC_PYTHON_MODULE"]
ops_sources = sources("gemm/*.cpp", "gemm/cpu/*.cpp")
archs = []
if with_cuda:
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    gencode, archs = cuda_gencode_flags(arch_list)
    ops = CUDAExtension(
        "torch_hpc._C",
        ops_sources + sources("gemm/cuda/*.cpp", "gemm/cuda/*.cu"),
        extra_compile_args={"cxx": cxx_flags,
                            "nvcc": ["-O3", "-std=c++17", "-lineinfo"] + gencode
                            + (["-DTORCH_HPC_SM90A"] if "sm_90a" in archs else [])},
        extra_link_args=["-fopenmp"],
    )
else:
    ops = CppExtension("torch_hpc._C", ops_sources, extra_compile_args={"cxx": cxx_flags},
                       extra_link_args=["-fopenmp"])

def warn_if_static_libstdcxx():
    """A compiler without a shared libstdc++ links a private copy into the extension, whose
    iostreams then crash inside torch's error messages: say so at build time."""
    cxx = os.environ.get("CXX", "g++")
    try:
        found = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True,
                               text=True).stdout.strip()
    except OSError:
        return
    if found == "libstdc++.so" and "-L" not in os.environ.get("LDFLAGS", ""):
        print(f"torch_hpc: WARNING: {cxx} has no shared libstdc++ (a static copy crashes when torch "
              "formats error messages); build with a g++ that has one, or put a directory holding "
              "a libstdc++.so link to the system's libstdc++.so.6 in LDFLAGS=-L<dir> "
              "(benchmarks/gpu_check.sh does)")


warn_if_static_libstdcxx()
mpi, mpi_note = mpi_flags()
ext_modules = [ops]
if mpi:
    ext_modules.append(CppExtension(
        "torch_hpc._comm", sources("comm/*.cpp"), include_dirs=mpi["include_dirs"],
        library_dirs=mpi["library_dirs"], libraries=mpi["libraries"],
        extra_compile_args={"cxx": ["-O3", "-g0"] + mpi["extra_compile_args"]},
        extra_link_args=mpi["extra_link_args"]))
else:
    print(f"torch_hpc: {mpi_note}")

build_info = {
    "torch_version": torch.__version__,
    "cuda": with_cuda,
    "cuda_version": torch.version.cuda if with_cuda else None,
    "cuda_archs": archs,
    "mpi": bool(mpi),
    "mpicxx": mpi_note if mpi else None,
}
with open(os.path.join(ROOT, "torch_hpc", "_build_info.json"), "w") as f:
    json.dump(build_info, f, indent=1)
print("torch_hpc build configuration:")
for key, value in build_info.items():
    print(f"  {key:14s} {value}")
print(f"  {'MAX_JOBS':14s} {os.environ.get('MAX_JOBS', '(ninja default)')}")

setup(
    name="torch_hpc",
    version="0.1.0",
    description="fp32 GEMM emulated with 3xfp16 on tensor cores, and MPI one-sided gradient exchange",
    packages=find_packages(include=["torch_hpc", "torch_hpc.*"]),
    package_data={"torch_hpc": ["_build_info.json"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["numpy"],
)
