"""Run under a launcher: failure modes that must end the job instead of hanging.

    python failure_worker.py timeout   # rank 1 never joins an all_reduce: the timeout aborts
    python failure_worker.py raise     # rank 1 raises: the job ends with a non-zero exit
"""
import datetime
import sys
import time

import torch
import torch.distributed as dist

import torch_hpc

mode = sys.argv[1]
torch_hpc.distributed.init("hpc_mpi", timeout=datetime.timedelta(seconds=3))
rank = dist.get_rank()
dist.all_reduce(torch.ones(1))
print(f"rank {rank} initialised", flush=True)
if mode == "timeout":
    if rank == 1:
        time.sleep(60)
    dist.all_reduce(torch.ones(1))
elif mode == "raise":
    if rank == 1:
        raise RuntimeError("planted failure on rank 1")
    dist.all_reduce(torch.ones(1))
dist.destroy_process_group()
