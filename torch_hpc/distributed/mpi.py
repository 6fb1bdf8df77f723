"""MPI initialisation under any launcher: one MPI_COMM_WORLD whose ranks equal the launcher's,
initialised with MPI_THREAD_MULTIPLE, self-tested before use. Never runs at import."""
import datetime
import os
import socket

from .launcher import LaunchInfo, detect_launcher

_pmi_server = None  # rank 0's PMI server process, kept alive for the job's life
_world = None       # COMM_WORLD once formed and self-tested


class MPIInitError(RuntimeError):
    pass


def _mpi4py():
    import mpi4py
    if "mpi4py.MPI" not in __import__("sys").modules:
        mpi4py.rc.initialize = False  # MPI_Init waits until the world's environment is set
        mpi4py.rc.finalize = True     # MPI_Finalize at exit (mpirun kills ranks that skip it)
        mpi4py.rc.thread_level = "multiple"
    from mpi4py import MPI
    return MPI


def _launcher_store(launch: LaunchInfo, timeout: datetime.timedelta):
    import torch.distributed as dist
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise MPIInitError("torch_hpc: forming an MPI world outside mpirun needs MASTER_ADDR and "
                           "MASTER_PORT (set by torchrun) or a torch Store")
    # torchrun's agent owns the TCPStore at MASTER_PORT: every worker is a client.
    return dist.TCPStore(addr, int(port), launch.world_size, is_master=False, timeout=timeout,
                         wait_for_workers=False)


def _join_world_through_pmi(MPI, launch: LaunchInfo, store, timeout):
    global _pmi_server
    from . import pmi
    version = MPI.Get_library_version()
    if "MPICH" not in version and "Intel" not in version and "MVAPICH" not in version:
        raise MPIInitError(
            "torch_hpc: processes started by torchrun (or another non-MPI launcher) can form an MPI "
            "world only with an MPICH-family MPI (MPICH, Intel MPI, MVAPICH, Cray MPICH); this "
            f"mpi4py uses {version.splitlines()[0]!r}. Launch with mpirun/mpiexec instead, or "
            "install MPICH (`pip install mpich mpi4py`).")
    store = store or _launcher_store(launch, timeout)
    key = f"torch_hpc/pmi/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if launch.rank == 0:
        _pmi_server, port = pmi.start_server(launch.world_size, launch.local_world_size)
        host = os.environ.get("TORCH_HPC_PMI_HOST") or socket.gethostname()
        store.set(key, f"{host}:{port}")
    store.wait([key], timeout)
    host, _, port = store.get(key).decode().rpartition(":")
    pmi.connect_client(host, int(port), launch.rank, launch.world_size)


def self_test(comm) -> None:
    """An allreduce and concurrent MPI_Accumulate on a fresh window must give exact answers:
    some MPI configurations form a world that gives wrong ones (../shared/FACTS.md)."""
    import numpy as np
    MPI = _mpi4py()
    n, rank, reps = comm.size, comm.rank, 50
    total = comm.allreduce(rank + 1, op=MPI.SUM)
    if total != n * (n + 1) // 2:
        raise MPIInitError(f"torch_hpc: MPI self-test failed: allreduce gave {total}, "
                           f"expected {n * (n + 1) // 2}")
    win = MPI.Win.Allocate(8 * n if rank == 0 else 0, 8, comm=comm)
    try:
        win.Lock_all()
        if rank == 0:
            win.Put(np.zeros(n, dtype=np.int64), 0)
            win.Flush(0)
        win.Unlock_all()
        comm.Barrier()
        win.Lock_all()
        ones = np.ones(n, dtype=np.int64)
        for _ in range(reps):
            win.Accumulate(ones, 0, op=MPI.SUM)
        win.Flush(0)
        result = np.empty(n, dtype=np.int64)
        comm.Barrier()
        win.Get_accumulate(np.zeros(n, dtype=np.int64), result, 0, op=MPI.NO_OP)
        win.Flush(0)
        win.Unlock_all()
    finally:
        win.Free()
    ok = comm.allreduce(int((result == n * reps).all()), op=MPI.MIN)
    if not ok:
        raise MPIInitError(f"torch_hpc: MPI self-test failed: concurrent MPI_Accumulate gave "
                           f"{result.tolist()}, expected {n * reps} everywhere; this MPI "
                           "configuration loses one-sided updates")


def init_mpi(store=None, timeout: datetime.timedelta = datetime.timedelta(minutes=5),
             launch: LaunchInfo | None = None):
    """Initialises MPI once (MPI_THREAD_MULTIPLE) so that MPI_COMM_WORLD matches the launcher:
    under mpirun/mpiexec MPI already is the world; under torchrun (or any launcher that gives
    ranks and a torch Store) the world is formed through torch_hpc's PMI server.
    Returns mpi4py's COMM_WORLD after a self-test (done once per process)."""
    global _world
    MPI = _mpi4py()
    launch = launch or detect_launcher()
    if _world is not None:
        if (_world.size, _world.rank) != (launch.world_size, launch.rank):
            raise MPIInitError(f"torch_hpc: MPI_COMM_WORLD is rank {_world.rank} of {_world.size}, "
                               f"but rank {launch.rank} of {launch.world_size} was asked for")
        return _world
    if not MPI.Is_initialized():
        if launch.world_size > 1 and not launch.is_mpi_launch:
            _join_world_through_pmi(MPI, launch, store, timeout)
        provided = MPI.Init_thread(MPI.THREAD_MULTIPLE)
        if provided < MPI.THREAD_MULTIPLE:
            raise MPIInitError(f"torch_hpc: the MPI library provides thread level {provided}, "
                               "but MPI_THREAD_MULTIPLE is needed (the backend's thread and "
                               "the progress thread call MPI concurrently)")
    elif MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        raise MPIInitError("torch_hpc: MPI was initialised elsewhere without MPI_THREAD_MULTIPLE; "
                           "import torch_hpc.distributed before mpi4py.MPI or set "
                           "mpi4py.rc.thread_level = 'multiple'")
    comm = MPI.COMM_WORLD
    if (comm.size, comm.rank) != (launch.world_size, launch.rank):
        raise MPIInitError(
            f"torch_hpc: MPI_COMM_WORLD is rank {comm.rank} of {comm.size} but the launcher "
            f"({launch.launcher}) says rank {launch.rank} of {launch.world_size}; if mpi4py.MPI "
            "was imported before torch_hpc.distributed.init_mpi, it made this process an MPI "
            "singleton (set mpi4py.rc.initialize = False first)")
    self_test(comm)
    _world = comm
    return comm
