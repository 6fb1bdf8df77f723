"""Which launcher started this process, and the rank layout it gives."""
import dataclasses
import os
import shutil
import subprocess
import sys

# (launcher, rank, size, local rank, local size) variables, most specific first.
_LAUNCHERS = [
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE", None),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", None),
    ("pmix", "PMIX_RANK", None, None, None, None),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", None),
    ("env", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", None),
]


@dataclasses.dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str  # torchrun | openmpi | mpich | pmix | slurm | env | singleton

    @property
    def is_mpi_launch(self) -> bool:
        """Started by an MPI launcher: MPI_Init gives the full world by itself."""
        return self.launcher in ("openmpi", "mpich", "pmix")

    def device(self, requested: str = "auto"):
        """The torch.device this rank should train on. "auto": cuda:<local rank> when every local
        rank can have a GPU of its own, else the CPU (measured: 16 ranks sharing one H200 ran the
        digits example 7x slower than the same ranks on the host's 16 cores). "cuda": GPUs shared
        round-robin if there are fewer than ranks. "cpu": the CPU."""
        import torch
        if requested not in ("auto", "cuda", "cpu"):
            raise ValueError(f"torch_hpc LaunchInfo.device: requested must be 'auto', 'cuda' or "
                             f"'cpu', got {requested!r}")
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if requested == "cuda" and gpus == 0:
            raise RuntimeError("torch_hpc LaunchInfo.device: 'cuda' was asked for but no GPU is visible")
        if requested == "cpu" or (requested == "auto" and gpus < self.local_world_size):
            return torch.device("cpu")
        return torch.device("cuda", self.local_rank % gpus)


def _int(env, name, default):
    value = env.get(name) if name else None
    if value is None or value == "":
        return default
    try:
        return int(value.split("(")[0].split(",")[0])
    except ValueError as e:
        raise RuntimeError(f"torch_hpc: launcher variable {name}={value!r} is not an integer") from e


def detect_launcher(env=None) -> LaunchInfo:
    """Reads the launcher's variables (torchrun, Open MPI's mpirun, MPICH/Hydra, PMIx, Slurm,
    plain RANK/WORLD_SIZE); a process started by none of them is a singleton."""
    env = os.environ if env is None else env
    for name, rank_var, size_var, lrank_var, lsize_var, marker in _LAUNCHERS:
        if rank_var not in env or (marker and marker not in env):
            continue
        if name == "slurm" and "PMI_RANK" not in env and "OMPI_COMM_WORLD_RANK" not in env \
                and "SLURM_STEP_ID" not in env:
            continue  # an allocation, not a task of srun
        size = _int(env, size_var, 1)
        if name == "pmix" and size_var is None:
            size = _int(env, "OMPI_COMM_WORLD_SIZE", _int(env, "PMIX_SIZE", 1))
        rank = _int(env, rank_var, 0)
        if not 0 <= rank < size:
            raise RuntimeError(f"torch_hpc: {name} gave rank {rank} outside world size {size}")
        return LaunchInfo(rank, size, _int(env, lrank_var, rank), _int(env, lsize_var, size), name)
    return LaunchInfo(0, 1, 0, 1, "singleton")


def mpiexec_command(n: int, bind_to_none: bool = False, python: bool = False) -> list[str]:
    """`mpiexec -n N` with the flags its MPI needs, the mpiexec beside this interpreter (a venv's
    MPICH) first. Open MPI refuses more ranks than cores without --oversubscribe and root without
    --allow-run-as-root; MPICH's mpiexec rejects both. bind_to_none: Open MPI binds each rank to
    one core, which starves a rank's helper threads (the RMA progress thread, hpc_mpi's worker).
    python: ends with this interpreter's absolute path (Open MPI's mpiexec, run by absolute path,
    puts its own bin/ first on the ranks' PATH, where `python3` may be another interpreter).
    Raises FileNotFoundError when no mpiexec is found."""
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    exe = local if os.path.exists(local) else shutil.which("mpiexec")
    if exe is None:
        raise FileNotFoundError("torch_hpc: no mpiexec beside the interpreter or on PATH")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    cmd = [exe, "-n", str(n)]
    if "Open MPI" in version or "OpenRTE" in version:
        cmd += ["--oversubscribe"] + (["--bind-to", "none"] if bind_to_none else [])
        cmd += ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return cmd + ([sys.executable] if python else [])
