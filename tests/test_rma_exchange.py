"""The RMA exchange (torch_hpc.distributed.rma) under mpiexec: exactness of concurrent
accumulates and one-sided progress while a target rank sleeps."""
import pytest

import torch_hpc
from launchers import mpich_family, run_workers

pytestmark = pytest.mark.skipif(not torch_hpc.build_info().get("mpi"),
                                reason="torch_hpc was built without MPI")


def _ok(proc, reports, n):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert sorted(r["rank"] for r in reports) == list(range(n)), proc.stderr[-3000:]


def test_concurrent_accumulates_lose_nothing():
    proc, reports = run_workers("mpiexec", 4, "rma_worker.py", "exact", timeout=120)
    _ok(proc, reports, 4)
    for r in reports:
        assert r["max_error"] == 0.0
        assert r["skipped"] == 1 and r["exchanges"] == 100  # the NaN delta was not sent


# A transport that needs the target's progress: MPICH's network module for local ranks too.
_NETMOD = {"MPIR_CVAR_NOLOCAL": "1"}


@pytest.mark.parametrize("transport", ["default", "netmod"])
def test_sleeping_rank_does_not_stall_others(transport):
    if transport == "netmod" and not mpich_family():
        pytest.skip("the netmod-only control uses MPICH's MPIR_CVAR_NOLOCAL")
    env = _NETMOD if transport == "netmod" else {}
    proc, reports = run_workers("mpiexec", 3, "rma_worker.py", "progress", 10, timeout=120, env=env)
    _ok(proc, reports, 3)
    sleeper = next(r for r in reports if r["rank"] == 1)
    assert all(c >= 100 for c in sleeper["completed_before_wake"]), sleeper  # done while it slept
    assert all(r["total"] == r["expected"] for r in reports)


def test_without_progress_thread_a_sleeping_target_stalls_netmod():
    """Negative control: the same test over MPICH's network module, progress thread off,
    stalls until the sleeper wakes (MPICH's shared-memory path needs no target progress)."""
    if not mpich_family():
        pytest.skip("the netmod-only control uses MPICH's MPIR_CVAR_NOLOCAL")
    proc, reports = run_workers("mpiexec", 3, "rma_worker.py", "progress", 4, "--no-progress-thread",
                                timeout=120, env=_NETMOD)
    _ok(proc, reports, 3)
    sleeper = next(r for r in reports if r["rank"] == 1)
    assert any(c < 100 for c in sleeper["completed_before_wake"]), sleeper
    assert all(r["total"] == r["expected"] for r in reports)
