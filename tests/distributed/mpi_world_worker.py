"""Run under a launcher: forms the MPI world with torch_hpc and reports what each rank sees."""
import json
import sys

import torch_hpc.distributed as thd

launch = thd.detect_launcher()
comm = thd.init_mpi()
from mpi4py import MPI  # noqa: E402  (after init_mpi decided how MPI starts)

ranks = comm.allgather(comm.rank)
local = comm.Split_type(MPI.COMM_TYPE_SHARED).size
print("RESULT " + json.dumps({
    "launcher": launch.launcher, "rank": comm.rank, "size": comm.size, "launch_rank": launch.rank,
    "thread_multiple": MPI.Query_thread() == MPI.THREAD_MULTIPLE, "ranks": ranks,
    "shared_memory_peers": local, "sum": comm.allreduce(comm.rank + 1),
    "rma": thd.rma_available()}), flush=True)
sys.exit(0)
