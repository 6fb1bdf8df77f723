"""Runs worker scripts under real launchers (mpiexec, torchrun) and collects their reports."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from torch_hpc.distributed import launcher

WORKERS = Path(__file__).resolve().parent / "distributed"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def mpiexec_command(n: int, python: bool = False) -> list[str]:
    try:
        return launcher.mpiexec_command(n, python=python)
    except FileNotFoundError:
        pytest.skip("no mpiexec")


def mpi_version() -> str:
    from torch_hpc import _comm  # MPI_Get_library_version needs no MPI_Init
    return _comm.library_version()


def mpich_family() -> bool:
    return any(name in mpi_version() for name in ("MPICH", "Intel", "MVAPICH"))


def torchrun_supported() -> bool:
    """torch_hpc joins torchrun's processes with MPICH-family MPIs and Open MPI 4."""
    return mpich_family() or "Open MPI v4" in mpi_version()


def torchrun_command(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]


def run_script(launcher: str, n: int, path: Path, *args, timeout=120, env=None):
    """Returns (completed process, list of the JSON reports that ranks printed as 'RESULT ...')."""
    base = mpiexec_command(n, python=True) if launcher == "mpiexec" else torchrun_command(n)
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(base + [str(path), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=full_env)
    return proc, parse_reports(proc.stdout)


def run_workers(launcher: str, n: int, script: str, *args, timeout=120, env=None):
    """A worker script of tests/distributed under a launcher (see run_script)."""
    return run_script(launcher, n, WORKERS / script, *args, timeout=timeout, env=env)


def run_example(launcher: str, n: int, script: str, *args, timeout=300, env=None) -> dict:
    """An example (with --quiet) under a launcher; it must succeed and rank 0 report once."""
    proc, reports = run_script(launcher, n, EXAMPLES / script, "--quiet", *args, timeout=timeout,
                               env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert len(reports) == 1, proc.stdout[-2000:]
    return reports[0]


def parse_reports(stdout: str) -> list[dict]:
    """Every 'RESULT {json}' in the output; ranks' lines may run together."""
    decoder, reports = json.JSONDecoder(), []
    for chunk in stdout.split("RESULT ")[1:]:
        reports.append(decoder.raw_decode(chunk)[0])
    return reports
