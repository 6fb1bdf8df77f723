"""torch_hpc.distributed: launcher detection and one MPI world under mpiexec and torchrun."""
import os
import subprocess
import sys

import pytest
import torch

from launchers import (WORKERS, mpich_family, mpiexec_command, parse_reports, run_workers, torchrun_command,
                       torchrun_supported)
from torch_hpc.distributed import detect_launcher


@pytest.mark.parametrize("env,expected", [
    ({}, ("singleton", 0, 1, 0)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
      "TORCHELASTIC_RUN_ID": "x"}, ("torchrun", 3, 4, 1)),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "5", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "1", "PMIX_RANK": "2"}, ("openmpi", 2, 5, 0)),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},
     ("mpich", 1, 2, 1)),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
      "SLURM_NTASKS_PER_NODE": "4(x2)"}, ("slurm", 5, 8, 1)),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, ("singleton", 0, 1, 0)),  # allocation, no task
    ({"RANK": "1", "WORLD_SIZE": "2"}, ("env", 1, 2, 1)),
])
def test_detect_launcher(env, expected):
    info = detect_launcher(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == expected


def test_detect_launcher_rejects_bad_values():
    with pytest.raises(RuntimeError, match="outside world size"):
        detect_launcher({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(RuntimeError, match="not an integer"):
        detect_launcher({"PMI_RANK": "x", "PMI_SIZE": "2"})


def test_launch_device_gives_each_local_rank_a_gpu_or_the_cpu():
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    one = detect_launcher({"RANK": "0", "WORLD_SIZE": "1"})
    crowded = detect_launcher({"RANK": "3", "WORLD_SIZE": "64", "LOCAL_RANK": "3",
                               "LOCAL_WORLD_SIZE": str(gpus + 1)})
    assert crowded.device("auto") == torch.device("cpu")  # ranks would share a GPU
    assert one.device("cpu") == torch.device("cpu")
    if gpus:
        assert one.device("auto") == torch.device("cuda", 0)
        assert crowded.device("cuda") == torch.device("cuda", 3 % gpus)
    else:
        assert one.device("auto") == torch.device("cpu")
        with pytest.raises(RuntimeError, match="no GPU"):
            one.device("cuda")
    with pytest.raises(ValueError, match="'auto', 'cuda' or 'cpu'"):
        one.device("gpu")


@pytest.mark.parametrize("launcher,n", [("mpiexec", 2), ("mpiexec", 4), ("torchrun", 2), ("torchrun", 4)])
def test_one_mpi_world_with_the_launchers_ranks(launcher, n):
    if launcher == "torchrun" and not torchrun_supported():
        pytest.skip("torchrun launches need an MPICH-family MPI or Open MPI 4")
    proc, reports = run_workers(launcher, n, "mpi_world_worker.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(r["rank"] for r in reports) == list(range(n)), proc.stdout + proc.stderr[-2000:]
    for r in reports:
        assert r["size"] == n and r["rank"] == r["launch_rank"]
        assert r["thread_multiple"] and r["ranks"] == list(range(n))
        assert r["sum"] == n * (n + 1) // 2
        if mpich_family() or launcher == "mpiexec":  # Open MPI's joined singletons share no memory
            assert r["shared_memory_peers"] == n
            assert r["rma"]  # the self-test's concurrent accumulates were exact
        assert r["launcher"] == ("torchrun" if launcher == "torchrun" else r["launcher"])


@pytest.mark.parametrize("launcher,via_init,backend", [
    ("mpiexec", False, "hpc_mpi"), ("mpiexec", True, "hpc_mpi"), ("mpiexec", False, "gloo"),
    ("torchrun", False, "hpc_mpi"), ("torchrun", True, "hpc_mpi")])
def test_init_process_group_finds_the_launchers_ranks(launcher, via_init, backend):
    """dist.init_process_group("hpc_mpi") with nothing set by hand, as users of torch's own "mpi"
    backend write it: under mpiexec (MPICH's Hydra here, Open MPI on the GPU machine) the
    default env:// rendezvous takes the ranks from MPI; under torchrun from torchrun."""
    if launcher == "torchrun" and not torchrun_supported():
        pytest.skip("torchrun launches need an MPICH-family MPI or Open MPI 4")
    unset = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if launcher == "mpiexec" else ()
    env = {k: v for k, v in os.environ.items() if k not in unset}
    args = ["--backend", backend] + (["--via-init"] if via_init else [])
    base = mpiexec_command(2, python=True) if launcher == "mpiexec" else torchrun_command(2)
    proc = subprocess.run(base + [str(WORKERS / "init_pg_worker.py"), *args], capture_output=True, text=True,
                          timeout=120, env=dict(env, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    reports = parse_reports(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert all(r["size"] == 2 and r["sum"] == 3.0 and r["backend"] == backend for r in reports), reports


def test_init_process_group_without_a_launcher_names_them():
    """A plain `python script.py` (no launcher) gets torch's error with the launchers and
    torch_hpc.distributed.init() named, not only 'RANK expected'."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") and not k.startswith(("PMI_", "OMPI_"))}
    proc = subprocess.run([sys.executable, str(WORKERS / "init_pg_worker.py")], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode != 0
    assert "RANK" in proc.stderr and "mpirun/mpiexec" in proc.stderr and "torchrun" in proc.stderr \
        and "torch_hpc.distributed.init()" in proc.stderr, proc.stderr[-2000:]


def test_mpiexec_command_runs_this_interpreter_whatever_path_says(tmp_path):
    """Open MPI's mpiexec, run by absolute path, puts its own bin/ first on the ranks' PATH,
    where `python3` is often the system's interpreter without torch. The launch command names
    this interpreter by absolute path, so a `python3` earlier on PATH must not matter."""
    for name in ("python", "python3"):
        fake = tmp_path / name
        fake.write_text("#!/bin/sh\necho 'the wrong interpreter ran' >&2\nexit 3\n")
        fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    # one write per rank: print() writes its pieces separately when unbuffered, and the two
    # ranks' pieces can interleave in mpiexec's merged stdout
    code = "import sys, torch_hpc; sys.stdout.write('RANK_RAN=' + sys.executable + '\\n')"
    proc = subprocess.run(mpiexec_command(2, python=True) + ["-c", code], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count(f"RANK_RAN={sys.executable}\n") == 2, proc.stdout


def test_gloo_ddp_job_exits_cleanly_after_a_last_collective():
    """Without init()'s exit hook about one such run in five aborted at interpreter shutdown
    (2-core machine, MPICH); twelve runs miss that with probability under 5 %."""
    for attempt in range(12):
        proc, reports = run_workers("mpiexec", 2, "gloo_exit_worker.py", timeout=120)
        assert proc.returncode == 0, f"run {attempt}: " + proc.stderr[-3000:]
        assert sorted(r["rank"] for r in reports) == [0, 1]
        assert all(r["gathered"] == [{"rank": 0}, {"rank": 1}] for r in reports)
