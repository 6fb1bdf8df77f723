"""Global fp32 vectors in MPI one-sided windows (see csrc/comm/rma_exchange.h).

Windows are freed collectively (MPI_Win_free): every rank must close them in the same order.
Those still open at interpreter exit are closed there, in creation order, before MPI_Finalize.
"""
import atexit
import os
import sys
import threading
import time

_open = []          # exchanges not closed yet, in creation order
_lock = threading.Lock()
_hooks_installed = False


def _close_all():
    with _lock:
        pending = list(_open)
        _open.clear()
    for x in pending:
        x.close()


def _abort_on_uncaught_exception():
    """An uncaught exception on one rank must end the job: its peers would otherwise wait for it
    in a staleness gate or in the collective MPI_Win_free forever. Prints the traceback, then
    MPI_Abort (mpirun and torchrun then stop every rank)."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        try:
            sys.stderr.flush()
            time.sleep(0.5)  # the launcher forwards this rank's output before the abort kills it
            from mpi4py import MPI
            if MPI.Is_initialized() and not MPI.Is_finalized():
                MPI.COMM_WORLD.Abort(1)
        finally:
            os._exit(1)

    sys.excepthook = hook


def _defaults():
    """The progress thread's defaults: env TORCH_HPC_PROGRESS_THREAD (1; 0 turns it off, for
    experiments) and TORCH_HPC_PROGRESS_US (500, the interval between its MPI progress calls)."""
    return (os.environ.get("TORCH_HPC_PROGRESS_THREAD", "1") not in ("0", "false", "False"),
            int(os.environ.get("TORCH_HPC_PROGRESS_US", "500")))


def exchange(numel: int, comm=None, progress_thread: bool | None = None,
             progress_interval_us: int | None = None):
    """A new global vector of `numel` fp32 values sharded over `comm` (default: the MPI world
    torch_hpc formed, see init_mpi). Collective. progress_thread: a thread that enters MPI every
    progress_interval_us so that other ranks' one-sided operations on this rank's shard progress
    while this rank computes (None: the defaults, see _defaults). Returns
    torch_hpc._comm.RmaExchange."""
    global _hooks_installed
    from . import mpi
    from .backend import _comm_module
    if comm is None:
        comm = mpi.init_mpi()
        if not mpi.rma_available():  # read after init_mpi, which records why
            raise RuntimeError(
                "torch_hpc: MPI one-sided windows are unavailable on this MPI world "
                f"({mpi._rma_error}); the asynchronous exchange needs them. Launch with mpirun/mpiexec, "
                "or use an MPICH-family MPI under torchrun")
    default_thread, default_interval = _defaults()
    progress_thread = default_thread if progress_thread is None else progress_thread
    progress_interval_us = default_interval if progress_interval_us is None else progress_interval_us
    x = _comm_module().RmaExchange(comm.py2f(), int(numel), bool(progress_thread),
                                   int(progress_interval_us))
    with _lock:
        _open.append(x)
        if not _hooks_installed:
            atexit.register(_close_all)  # runs before mpi4py's MPI_Finalize (registered earlier)
            _abort_on_uncaught_exception()
            _hooks_installed = True
    return x


def close(x) -> None:
    """Collective: frees x's windows (every rank, same order)."""
    with _lock:
        if x in _open:
            _open.remove(x)
    x.close()
