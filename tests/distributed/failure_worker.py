"""Run under a launcher: failure modes that must end the job instead of hanging.

    python failure_worker.py timeout   # rank 1 never joins an all_reduce: the timeout aborts
    python failure_worker.py raise     # rank 1 raises: the job ends with a non-zero exit
    python failure_worker.py idle      # a finished irecv must not leave the timeout armed
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
elif mode == "idle":
    got = torch.zeros(2)
    if rank == 0:
        dist.irecv(got, src=1).wait()  # completes while the worker polls, 0.3 s after posting
    elif rank == 1:
        time.sleep(0.3)
        dist.send(torch.ones(2), dst=0)
    time.sleep(4.5)  # idle for longer than the 3 s timeout
    dist.all_reduce(got)
    print(f"rank {rank} idle ok {got.tolist()}", flush=True)
elif mode == "raise":
    if rank == 1:
        raise RuntimeError("planted failure on rank 1")
    dist.all_reduce(torch.ones(1))
dist.destroy_process_group()
