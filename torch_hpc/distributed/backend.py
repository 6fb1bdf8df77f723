"""The hpc_mpi torch.distributed backend: registration, the creator torch calls for every
process group, and init() for launches by mpirun, MPICH/Hydra, Slurm or torchrun."""
import atexit
import datetime
import hashlib
import os
import socket
import time

import torch.distributed as dist

from .addresses import reachable_by_all
from .launcher import LaunchInfo, detect_launcher
from .mpi import init_mpi, release_at_exit
from .options import Options

BACKEND = "hpc_mpi"
_base = None          # a duplicate of COMM_WORLD that only builds sub-communicators
_default_options = None  # the default group's: new groups without pg_options take them
_atexit_registered = False
_exit_yield_registered = False


def _comm_module():
    try:
        from torch_hpc import _comm
    except ImportError as e:
        raise RuntimeError(
            "torch_hpc: the hpc_mpi backend is not built (no mpicxx was found when torch_hpc was "
            "built, see torch_hpc.build_info()); install an MPI (e.g. `pip install mpich mpi4py`) "
            f"and rebuild ({e})") from e
    return _comm


def _group_tag(group_id: str) -> int:
    return int(hashlib.sha1(group_id.encode()).hexdigest(), 16) % 32768


def _create_backend(opts, backend_options=None):
    """torch calls this on member ranks for the default group and for every new_group;
    backend_options is the pg_options given there (a torch_hpc.distributed.Options or None)."""
    global _base, _default_options, _atexit_registered
    _comm = _comm_module()
    if backend_options is not None and not isinstance(backend_options, Options):
        raise TypeError("torch_hpc hpc_mpi: pg_options must be a torch_hpc.distributed.Options, got "
                        f"{type(backend_options).__name__}")
    timeout = opts.timeout if isinstance(opts.timeout, datetime.timedelta) else \
        datetime.timedelta(seconds=float(opts.timeout))
    ranks = list(opts.global_ranks_in_group) or list(range(opts.group_size))
    if _base is None:  # the default group: every rank of the world is here
        detected = detect_launcher()
        launch = LaunchInfo(opts.group_rank, opts.group_size, detected.local_rank,
                            detected.local_world_size if detected.world_size == opts.group_size
                            else opts.group_size, detected.launcher)
        world = init_mpi(store=opts.store, timeout=timeout, launch=launch)
        _base = world.Dup()
        _default_options = backend_options or Options()
        from mpi4py import MPI
        if world != MPI.COMM_WORLD:  # singletons joined by Open MPI
            release_at_exit(_base)
    if ranks == list(range(_base.size)):
        comm, owned = _base, False
    else:
        group = _base.Get_group().Incl(ranks)
        comm, owned = _base.Create_group(group, tag=_group_tag(opts.group_id)), True
        group.Free()
    try:
        if comm.rank != opts.group_rank:
            raise RuntimeError(f"torch_hpc hpc_mpi: MPI rank {comm.rank} differs from the process "
                               f"group rank {opts.group_rank} (ranks {ranks})")
        options = backend_options or _default_options
        backend = _comm.create_backend(comm.py2f(), opts.group_rank, opts.group_size,
                                       timeout.total_seconds(), options.inline_blocking,
                                       options.resolved_spin_us(), options.allreduce_chunk_bytes)
    finally:
        if owned:
            comm.Free()
    if not _atexit_registered:  # drain and stop backends before mpi4py finalizes MPI
        atexit.register(_comm.shutdown_all)
        _atexit_registered = True
    return backend


def register() -> None:
    """Registers hpc_mpi with torch.distributed and lets init_process_group's default env://
    rendezvous find the ranks of an MPI launcher or srun (idempotent; no MPI call)."""
    if not dist.is_available():
        return
    _wrap_env_rendezvous()
    if BACKEND in dist.Backend.backend_list:
        return
    dist.Backend.register_backend(BACKEND, _create_backend, extended_api=True,
                                  devices=["cpu", "cuda"])


_LAUNCH_HINT = ("torch_hpc: start the job with mpirun/mpiexec (Open MPI, MPICH), srun or torchrun, "
                "which give each process its rank, or call torch_hpc.distributed.init(), which does "
                "the same for init_process_group")
_ENV_NEEDED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _wrap_env_rendezvous() -> None:
    """torch's env:// rendezvous (init_process_group's default) needs RANK, WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT, which torchrun sets and mpirun, mpiexec and srun do not. Where
    one is missing under such a launcher, the wrapper completes them as init() does (MPI gives
    the ranks, rank 0 publishes a rendezvous address) before torch's handler runs, so that
    init_process_group("hpc_mpi") works as torch's own "mpi" backend does; a process no launcher
    started still gets torch's error, with the launchers named."""
    import importlib
    rdzv = importlib.import_module("torch.distributed.rendezvous")  # the module, not its function
    handlers = getattr(rdzv, "_rendezvous_handlers", None)
    if not isinstance(handlers, dict) or "env" not in handlers or getattr(handlers["env"], "torch_hpc", False):
        return
    torch_env = handlers["env"]

    def env_rendezvous(url, **kwargs):
        import urllib.parse
        query = urllib.parse.parse_qs(urllib.parse.urlparse(url).query)
        given = {"RANK": "rank" in query, "WORLD_SIZE": "world_size" in query}
        missing = [v for v in _ENV_NEEDED if not given.get(v) and not os.environ.get(v)]
        if missing:
            launch = detect_launcher()
            if launch.is_mpi_launch or launch.launcher == "slurm":
                _complete_environment(launch)
        try:
            yield from torch_env(url, **kwargs)
        except ValueError as e:
            if "environment variable" in str(e):
                raise ValueError(f"{e}. {_LAUNCH_HINT}") from e
            raise

    env_rendezvous.torch_hpc = True
    handlers["env"] = env_rendezvous


def _complete_environment(launch: LaunchInfo) -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE from the launcher and a rendezvous address
    (MPI's rank 0 publishes one under mpirun, mpiexec and srun), where not set already."""
    if launch.is_mpi_launch or (launch.launcher == "slurm" and launch.world_size > 1):
        _publish_master_address(init_mpi(launch=launch))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    for key, value in (("RANK", launch.rank), ("WORLD_SIZE", launch.world_size),
                       ("LOCAL_RANK", launch.local_rank),
                       ("LOCAL_WORLD_SIZE", launch.local_world_size)):
        os.environ.setdefault(key, str(value))


def _publish_master_address(comm) -> None:
    """Under an MPI launcher rank 0 chooses MASTER_ADDR/PORT and broadcasts them: MASTER_ADDR
    as set, else 127.0.0.1 on one host, else an address of rank 0 every rank could connect to
    (host names may resolve to loopback on every host)."""
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        return
    host = os.environ.get("MASTER_ADDR") or reachable_by_all(comm)
    port = None
    if comm.rank == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
    port = comm.bcast(port, root=0)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = host, str(port)


def init(backend: str = BACKEND, options: Options | None = None, **kwargs) -> LaunchInfo:
    """Detects the launcher (mpirun/Open MPI, MPICH/Hydra, Slurm, torchrun), prepares what
    torch.distributed needs (ranks, a rendezvous address) and calls init_process_group.
    `options` (hpc_mpi only) tunes the backend (see Options); extra keyword arguments go to
    init_process_group (timeout, device_id, ...)."""
    if options is not None:
        if backend != BACKEND:
            raise ValueError(f"torch_hpc.distributed.init: options are for the {BACKEND} backend, "
                             f"not {backend!r}")
        kwargs["pg_options"] = options
    launch = detect_launcher()
    _complete_environment(launch)
    dist.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size, **kwargs)
    _yield_to_backend_threads_at_exit()
    return launch


def _yield_to_backend_threads_at_exit():
    """A backend's worker thread (gloo's) frees a finished collective's tensors after wait()
    returns, taking the GIL to do so; one still waiting for it when the interpreter shuts down
    aborts the process. Releasing the GIL for a moment at exit, before shutdown, lets it finish."""
    global _exit_yield_registered
    if not _exit_yield_registered:
        atexit.register(time.sleep, 0.02)
        _exit_yield_registered = True
