"""Options of the hpc_mpi backend, passed as `pg_options` to init_process_group or new_group
(or as `options=` to torch_hpc.distributed.init). A new group without options takes the
default group's.

    opts = torch_hpc.distributed.Options(inline_blocking=False)
    dist.init_process_group("hpc_mpi", pg_options=opts)

The environment variables below give the defaults; nothing else in hpc_mpi reads them
(see docs/switches.md).
"""
import dataclasses
import os


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _env_int(name, default):
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"torch_hpc: {name} must be an integer, got {value!r}") from None


@dataclasses.dataclass
class Options:
    """inline_blocking: a blocking CPU collective (async_op=False) with nothing queued or running
    runs on the calling thread instead of the backend's worker (saves 20-70 us per call; env
    TORCH_HPC_INLINE=0 turns it off). spin_us: how long a handoff between the caller and the
    worker spins before it sleeps; None: 50 where the process may run on >= 4 CPUs, else 0 (a
    spinning thread steals the core of a rank bound to one; env TORCH_HPC_SPIN_US).
    allreduce_chunk_bytes: large allreduces run in pieces of this size, which stay in cache
    (0: whole; env TORCH_HPC_ALLREDUCE_CHUNK_BYTES, default 4 MiB)."""

    inline_blocking: bool = dataclasses.field(
        default_factory=lambda: os.environ.get("TORCH_HPC_INLINE", "1") != "0")
    spin_us: int | None = dataclasses.field(
        default_factory=lambda: _env_int("TORCH_HPC_SPIN_US", None))
    allreduce_chunk_bytes: int = dataclasses.field(
        default_factory=lambda: _env_int("TORCH_HPC_ALLREDUCE_CHUNK_BYTES", 4 << 20))

    def __post_init__(self):
        if not isinstance(self.inline_blocking, bool):
            raise TypeError(f"torch_hpc hpc_mpi Options: inline_blocking must be a bool, got "
                            f"{self.inline_blocking!r}")
        if self.spin_us is not None and (not isinstance(self.spin_us, int) or self.spin_us < 0):
            raise ValueError(f"torch_hpc hpc_mpi Options: spin_us must be None or an integer >= 0, "
                             f"got {self.spin_us!r}")
        if not isinstance(self.allreduce_chunk_bytes, int) or self.allreduce_chunk_bytes < 0:
            raise ValueError("torch_hpc hpc_mpi Options: allreduce_chunk_bytes must be an integer "
                             f">= 0, got {self.allreduce_chunk_bytes!r}")

    def resolved_spin_us(self) -> int:
        if self.spin_us is not None:
            return self.spin_us
        return 50 if _cpus() >= 4 else 0
