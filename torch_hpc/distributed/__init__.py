"""torch_hpc.distributed: launcher detection and MPI initialisation (no MPI call at import)."""
from .launcher import LaunchInfo, detect_launcher
from .mpi import MPIInitError, init_mpi, self_test

__all__ = ["LaunchInfo", "detect_launcher", "init_mpi", "self_test", "MPIInitError"]
