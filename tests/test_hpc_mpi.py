"""The hpc_mpi backend under real launchers: every op x dtype x reduce op, sub-groups, async
ops, errors, DDP against gloo (one collected test per case and launcher), timeouts and failures
that end the job instead of hanging."""
import functools
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import torch_hpc
from launchers import WORKERS, mpiexec_command, run_workers, torchrun_supported

pytestmark = pytest.mark.skipif(not torch_hpc.build_info().get("mpi"),
                                reason="torch_hpc was built without MPI")
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


DTYPES = ["float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8",
          "bool"]
# The cases collectives_worker.py reports, each a test of its own: `pytest -k reduce_scatter`.
CASES = ([f"{op}-{dtype}" for op in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
                                     "gather", "scatter", "all_to_all_single", "reduce",
                                     "reduce_scatter", "reduce_scatter_tensor") for dtype in DTYPES]
         + [f"send_recv-{dtype}" for dtype in ("float32", "float16", "int64", "bool")]
         + ["all_reduce_noncontiguous", "all_reduce_1M", "all_to_all_single_uneven", "all_to_all",
            "all_gather_coalesced", "all_gather_into_tensor_in_place",
            "all_reduce_coalesced", "isend_irecv", "batch_isend_irecv", "async_all_reduce",
            "async_queue", "recv_any_source", "sub_groups", "options", "sparse_all_reduce", "errors",
            "gil_release", "ddp_vs_gloo", "monitored_barrier"])
RUNS = [("mpiexec", 2, "cpu"), ("mpiexec", 4, "cpu"), ("torchrun", 2, "cpu"),
        pytest.param("mpiexec", 2, "cuda", marks=requires_gpu),
        pytest.param("torchrun", 2, "cuda", marks=requires_gpu)]


def test_backend_is_registered_without_initialising_mpi():
    assert "hpc_mpi" in dist.Backend.backend_list
    torch_hpc.distributed.register()  # idempotent
    assert dist.Backend.backend_list.count("hpc_mpi") == 1


def _skip_torchrun_without_mpich(launcher):
    if launcher == "torchrun" and not torchrun_supported():
        pytest.skip("torchrun launches need an MPICH-family MPI or Open MPI 4 "
                    "(see test_torchrun_with_other_mpi_fails_clearly)")


@functools.cache
def _collectives(launcher, n, device):
    """One run of the worker per launcher, world size and device, shared by its cases."""
    proc, lines = run_workers(launcher, n, "collectives_worker.py", device, timeout=300)
    reports = {}
    for line in lines:  # one line per rank and case
        rank = reports.setdefault(line["rank"], {"size": line["size"], "device": line["device"],
                                                 "cases": {}})
        rank["cases"][line["case"]] = {"checks": line["checks"], "failures": line["failures"]}
    return proc, reports


def _run_ok(launcher, n, device):
    _skip_torchrun_without_mpich(launcher)
    proc, reports = _collectives(launcher, n, device)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert sorted(reports) == list(range(n)), proc.stderr[-3000:]
    assert all(r["size"] == n and r["device"].startswith(device) for r in reports.values())
    return reports


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("launcher,n,device", RUNS)
def test_collective(launcher, n, device, case):
    reports = _run_ok(launcher, n, device)
    results = [r["cases"].get(case) for r in reports.values()]
    assert all(res is not None for res in results), f"the worker ran no case {case!r}"
    failures = [f"rank {rank}: {f}" for rank, r in reports.items() for f in r["cases"][case]["failures"]]
    assert not failures, "\n".join(failures[:20])
    assert sum(res["checks"] for res in results) > 0, f"case {case!r} checked nothing"


@pytest.mark.parametrize("launcher,n,device", RUNS)
def test_collectives_worker_reports_only_listed_cases(launcher, n, device):
    reports = _run_ok(launcher, n, device)
    for rank, r in reports.items():
        outside = r["cases"].pop("setup", {"failures": []})["failures"]  # failures outside any case
        assert not outside, f"rank {rank}: " + "\n".join(outside)
        assert set(r["cases"]) == set(CASES), sorted(set(r["cases"]) ^ set(CASES))


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
    proc = subprocess.run(mpiexec_command(2, python=True) + ["-m", "mpi4py",
                                                str(WORKERS / "failure_worker.py"), "raise"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "planted failure on rank 1" in proc.stderr
    assert time.monotonic() - start < 40


ECOSYSTEM = ["functional_collectives", "autograd_collectives", "object_collectives", "new_subgroups",
             "coalescing_manager", "dtensor", "fsdp2", "distributed_checkpoint"]


@functools.cache
def _ecosystem(launcher, n, checkpoint_dir):
    proc, lines = run_workers(launcher, n, "ecosystem_worker.py", checkpoint_dir, timeout=300)
    return proc, lines


@pytest.mark.parametrize("case", ECOSYSTEM)
@pytest.mark.parametrize("launcher,n", [("mpiexec", 2), ("torchrun", 2)])
def test_ecosystem_on_hpc_mpi(tmp_path_factory, launcher, n, case):
    """Functional and autograd collectives, object collectives, new_subgroups, coalescing,
    DTensor, FSDP2 and distributed checkpointing run on hpc_mpi (CPU tensors)."""
    _skip_torchrun_without_mpich(launcher)
    proc, lines = _ecosystem(launcher, n, str(tmp_path_factory.getbasetemp() / f"dcp-{launcher}-{n}"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    mine = [line for line in lines if line["case"] == case]
    assert sorted(line["rank"] for line in mine) == list(range(n)), proc.stderr[-3000:]
    failures = [f"rank {line['rank']}: {x}" for line in mine for x in line["failures"]]
    assert not failures, "\n".join(failures)


def test_comm_benchmark_runs_and_reports_its_targets(tmp_path):
    """benchmarks/comm.py end to end at small sizes (numbers come from real runs of it, not here)."""
    import json
    from launchers import run_script
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "comm.py"
    proc, _ = run_script("mpiexec", 2, bench, "--max-bytes", "16384", "--out", tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "comm-cpu-2ranks.json").read_text())
    assert set(result["summary"]) == {"hpc_mpi/gloo from 4 KiB"}  # the others start at 1 and 4 MiB
    assert {"hpc_mpi", "process_group", "gloo", "mpi4py"} <= set(result["rows"][0])
    assert (tmp_path / "comm-cpu-2ranks.png").exists()
