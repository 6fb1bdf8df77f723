"""MPI initialisation under any launcher: one world communicator whose ranks equal the
launcher's, initialised with MPI_THREAD_MULTIPLE, self-tested before use. Never runs at import.

Under mpirun the world is MPI_COMM_WORLD. Under torchrun every process starts as an MPI
singleton: with an MPICH-family MPI torch_hpc serves the PMI protocol so that MPI_COMM_WORLD is
the whole job; with Open MPI 4 the singletons join through an ompi-server into a merged
communicator (use the communicator init_mpi returns, not MPI_COMM_WORLD)."""
import atexit
import datetime
import os
import sys
import time

from .addresses import local_ipv4_addresses
from .launcher import LaunchInfo, detect_launcher

_pmi_server = None  # rank 0's PMI server process, kept alive for the job's life
_world = None       # COMM_WORLD once formed and self-tested
_joined = []        # communicators spanning joined singletons, freed before MPI_Finalize
_open_port = None   # rank 0's port of the Open MPI join, closed at exit


def release_at_exit(comm) -> None:
    """Open MPI's joined singletons must finalize together: at exit every rank meets in a
    barrier, frees the communicators that span the join and rank 0 closes its port (measured:
    without the barrier a rank that leaves first breaks its peers' finalize half the time;
    MPI_Comm_disconnect hangs there)."""
    if not _joined:
        atexit.register(_release_joined)
    _joined.append(comm)


def _release_joined():
    MPI = _mpi4py()
    if MPI.Is_finalized() or not _joined:
        return
    _joined[0].Barrier()
    if _open_port is not None:
        MPI.Close_port(_open_port)
    for comm in reversed(_joined):
        comm.Free()
    _joined.clear()


class MPIInitError(RuntimeError):
    pass


def _mpi4py():
    import mpi4py
    if "mpi4py.MPI" not in sys.modules:
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


def _mpi_family(MPI) -> str:
    """'mpich' (MPICH, Intel MPI, MVAPICH, Cray), 'openmpi4', 'openmpi5' or 'other'."""
    version = MPI.Get_library_version()  # callable before MPI_Init
    if any(name in version for name in ("MPICH", "Intel", "MVAPICH")):
        return "mpich"
    if "Open MPI" in version:
        return "openmpi4" if "Open MPI v4" in version else "openmpi5"
    return "other"


def _restart_key(name: str) -> str:
    return f"torch_hpc/{name}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _join_world_through_pmi(launch: LaunchInfo, store, timeout):
    """MPICH family: torch_hpc serves the PMI-1 protocol to its own ranks before MPI_Init."""
    global _pmi_server
    from . import pmi
    key = _restart_key("pmi")
    if launch.rank == 0:
        _pmi_server, port = pmi.start_server(launch.world_size, launch.local_world_size)
        hosts = os.environ.get("TORCH_HPC_PMI_HOST") or ",".join(local_ipv4_addresses())
        store.set(key, f"{hosts}:{port}")
    store.wait([key], timeout)
    hosts, _, port = store.get(key).decode().rpartition(":")
    pmi.connect_client(hosts.split(","), int(port), launch.rank, launch.world_size)


def _prepare_ompi_server(launch: LaunchInfo, store, timeout):
    """Open MPI 4, before MPI_Init: rank 0 starts an ompi-server, through which the singletons
    can accept/connect; one-sided windows then need the UCX osc component (shared-memory osc
    refuses processes joined this way)."""
    global _pmi_server
    import shutil
    import signal
    import subprocess
    import tempfile
    key = _restart_key("ompi-server")
    if launch.rank == 0:
        exe = shutil.which("ompi-server")
        if exe is None:
            raise MPIInitError("torch_hpc: joining torchrun's processes with Open MPI 4 needs "
                               "`ompi-server` on PATH; or launch with mpirun")
        uri_file = os.path.join(tempfile.mkdtemp(prefix="torch_hpc_"), "uri")

        def die_with_parent():  # the server must not outlive rank 0
            import ctypes
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

        _pmi_server = subprocess.Popen([exe, "--no-daemonize", "-r", uri_file],
                                       preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout.total_seconds()
        uri = ""
        while not uri:
            if time.monotonic() > deadline or _pmi_server.poll() is not None:
                raise MPIInitError("torch_hpc: ompi-server did not start")
            time.sleep(0.01)
            uri = open(uri_file).read().strip() if os.path.exists(uri_file) else ""
        store.set(key, uri)
    store.wait([key], timeout)
    os.environ["OMPI_MCA_pmix_server_uri"] = store.get(key).decode()
    os.environ.setdefault("OMPI_MCA_osc", "ucx")


def _connect_world(MPI, launch: LaunchInfo, store, timeout):
    """Open MPI 4, after MPI_Init: the singletons join one by one through MPI_Comm_accept/connect
    on rank 0's port, in rank order, so the merged communicator's ranks are the launcher's."""
    global _open_port
    port_key, joined_key = _restart_key("ompi-port"), _restart_key("ompi-joined")
    comm = MPI.COMM_SELF
    if launch.rank == 0:
        port = MPI.Open_port()
        store.set(port_key, port)
    store.wait([port_key], timeout)
    port = store.get(port_key).decode()
    for k in range(1, launch.world_size):
        if launch.rank < k:
            inter = comm.Accept(port, root=0)
            merged = inter.Merge(high=False)
            inter.Disconnect()
            if comm is not MPI.COMM_SELF:
                comm.Free()
            comm = merged
            if comm.rank == 0:
                store.set(f"{joined_key}/{k}", "1")
        elif launch.rank == k:
            if k > 1:  # wait for the previous rank: the port accepts whoever connects first
                store.wait([f"{joined_key}/{k - 1}"], timeout)
            inter = MPI.COMM_SELF.Connect(port, root=0)
            comm = inter.Merge(high=True)
            inter.Disconnect()
    if launch.rank == 0:
        _open_port = port
    return comm


_rma_error = None   # why one-sided windows are unavailable on the world, if they are


def rma_available() -> bool:
    """Whether the self-test could create an RMA window on the world communicator (with Open
    MPI's torchrun join this needs a working UCX; collectives work either way)."""
    return _world is not None and _rma_error is None


def self_test(comm) -> None:
    """An allreduce and concurrent MPI_Accumulate on a fresh window must give exact answers:
    some MPI configurations form a world that gives wrong ones (MPICH joined by accept/connect,
    Debian MPICH 4.0.2 on shared-memory windows: both seen giving wrong sums). A window
    that cannot be created at all is reported (warning, rma_available() False), not fatal:
    collectives do not need one."""
    global _rma_error
    import warnings

    import numpy as np
    MPI = _mpi4py()
    n, rank, reps = comm.size, comm.rank, 50
    total = comm.allreduce(rank + 1, op=MPI.SUM)
    if total != n * (n + 1) // 2:
        raise MPIInitError(f"torch_hpc: MPI self-test failed: allreduce gave {total}, "
                           f"expected {n * (n + 1) // 2}")
    try:
        win = MPI.Win.Allocate(8 * n if rank == 0 else 0, 8, comm=comm)
    except MPI.Exception as e:
        _rma_error = str(e)
    failed = comm.allreduce(int(_rma_error is not None), op=MPI.MAX)
    if failed:
        if _rma_error is None:
            win.Free()
            _rma_error = "a window could not be created on another rank"
        warnings.warn(f"torch_hpc: MPI one-sided windows are unavailable on this communicator "
                      f"({_rma_error}); collectives work, RMA-based features will refuse to run",
                      RuntimeWarning, stacklevel=3)
        return
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
    join = None
    if not MPI.Is_initialized():
        if launch.world_size > 1 and not launch.is_mpi_launch:
            family = _mpi_family(MPI)
            if family not in ("mpich", "openmpi4"):
                raise MPIInitError(
                    "torch_hpc: processes started by torchrun (or another non-MPI launcher) can form "
                    "an MPI world with an MPICH-family MPI (MPICH, Intel MPI, MVAPICH, Cray MPICH) or "
                    f"Open MPI 4, not with {MPI.Get_library_version().splitlines()[0]!r}. Launch "
                    "with mpirun/mpiexec instead, or install MPICH (`pip install mpich mpi4py`).")
            store = store or _launcher_store(launch, timeout)
            if family == "mpich":
                _join_world_through_pmi(launch, store, timeout)
            else:
                _prepare_ompi_server(launch, store, timeout)
                join = lambda: _connect_world(MPI, launch, store, timeout)  # noqa: E731
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
    if join:
        comm = join()
        release_at_exit(comm)
    if (comm.size, comm.rank) != (launch.world_size, launch.rank):
        raise MPIInitError(
            f"torch_hpc: MPI_COMM_WORLD is rank {comm.rank} of {comm.size} but the launcher "
            f"({launch.launcher}) says rank {launch.rank} of {launch.world_size}; if mpi4py.MPI "
            "was imported before torch_hpc.distributed.init_mpi, it made this process an MPI "
            "singleton (set mpi4py.rc.initialize = False first)")
    self_test(comm)
    _world = comm
    return comm
