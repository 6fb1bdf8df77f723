"""torch_hpc.distributed: the hpc_mpi backend, launcher detection and MPI initialisation.
Importing it registers the backend name; no MPI call happens until a process group is made."""
from .backend import BACKEND, init, register
from .launcher import LaunchInfo, detect_launcher
from .monitored import monitored_barrier
from .mpi import MPIInitError, init_mpi, rma_available, self_test
from .options import Options

register()

__all__ = ["BACKEND", "init", "register", "Options", "LaunchInfo", "detect_launcher", "init_mpi",
           "self_test", "rma_available", "MPIInitError", "monitored_barrier"]
