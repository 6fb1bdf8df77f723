"""The hpc_mpi backend under real launchers: every op x dtype x reduce op, sub-groups, async
ops, errors, DDP against gloo, timeouts and failures that end the job instead of hanging."""
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import torch_hpc
from launchers import WORKERS, mpiexec_command, run_workers, torchrun_supported

pytestmark = pytest.mark.skipif(not torch_hpc.build_info().get("mpi"),
                                reason="torch_hpc was built without MPI")


def _launchers(n_torchrun=2):
    return [("mpiexec", 2), ("mpiexec", 4), ("torchrun", n_torchrun)]


def test_backend_is_registered_without_initialising_mpi():
    assert "hpc_mpi" in dist.Backend.backend_list
    torch_hpc.distributed.register()  # idempotent
    assert dist.Backend.backend_list.count("hpc_mpi") == 1


def _check_reports(proc, reports, n, min_checks=150):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert sorted(r["rank"] for r in reports) == list(range(n)), proc.stderr[-3000:]
    for r in reports:
        assert r["size"] == n
        assert not r["failures"], f"rank {r['rank']}: " + "\n".join(r["failures"][:20])
        assert r["checks"] >= min_checks


def _skip_torchrun_without_mpich(launcher):
    if launcher == "torchrun" and not torchrun_supported():
        pytest.skip("torchrun launches need an MPICH-family MPI or Open MPI 4 "
                    "(see test_torchrun_with_other_mpi_fails_clearly)")


@pytest.mark.parametrize("launcher,n", _launchers())
def test_collectives_cpu(launcher, n):
    _skip_torchrun_without_mpich(launcher)
    proc, reports = run_workers(launcher, n, "collectives_worker.py", "cpu", timeout=300)
    _check_reports(proc, reports, n)
    assert all(r["ddp_max_diff"] <= (1e-6 if n == 2 else 1e-5) for r in reports)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("launcher", ["mpiexec", "torchrun"])
def test_collectives_cuda(launcher):
    _skip_torchrun_without_mpich(launcher)
    proc, reports = run_workers(launcher, 2, "collectives_worker.py", "cuda", timeout=300)
    _check_reports(proc, reports, 2)
    assert all(r["device"].startswith("cuda") for r in reports)


def test_torchrun_with_other_mpi_fails_clearly():
    if torchrun_supported():
        pytest.skip("this MPI supports torchrun launches")
    proc, _ = run_workers("torchrun", 2, "mpi_world_worker.py", timeout=120)
    assert proc.returncode != 0 and "Launch with mpirun/mpiexec instead" in proc.stderr


def test_timeout_aborts_the_job():
    start = time.monotonic()
    proc, _ = run_workers("mpiexec", 2, "failure_worker.py", "timeout", timeout=60)
    assert proc.returncode != 0
    assert "exceeded the process group's timeout" in proc.stderr
    assert time.monotonic() - start < 40  # 3 s timeout, not rank 1's 60 s sleep


def test_idle_after_finished_p2p_is_not_a_timeout():
    proc, _ = run_workers("mpiexec", 2, "failure_worker.py", "idle", timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("idle ok") == 2


def test_exception_on_one_rank_ends_the_job():
    start = time.monotonic()  # `python -m mpi4py` turns an uncaught exception into MPI_Abort
    proc = subprocess.run(mpiexec_command(2) + [sys.executable, "-m", "mpi4py",
                                                str(WORKERS / "failure_worker.py"), "raise"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "planted failure on rank 1" in proc.stderr
    assert time.monotonic() - start < 40
